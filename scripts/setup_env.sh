#!/usr/bin/env bash
# Set up everything qext needs on a fresh Debian 12 machine, then build and install qext itself.
#
#   bash scripts/setup_env.sh        (from anywhere; idempotent; a re-run only rebuilds what changed)
#
# 1. Debian packages (apt-get update + install only when one is missing).
# 2. .venv in the repository root (python3 -m venv), with requirements.txt installed only when
#    `pip freeze` shows a pin is not satisfied (torch is several GB; a re-run must not touch it).
# 3. qext: pip install --no-build-isolation --no-deps -e .  (setup.py drives CMake in ./build, incremental).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '[setup_env] %s\n' "$*"; }

# ---------------------------------------------------------------- 1. Debian packages
APT_PACKAGES=(cmake ninja-build ccache g++ libgtest-dev googletest zlib1g-dev dataset-fashion-mnist)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    SUDO=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            SUDO=(sudo)
        else
            say "missing Debian packages: ${missing[*]}; run this script as root (or install sudo)" >&2
            exit 1
        fi
    fi
    say "installing Debian packages: ${missing[*]}"
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
else
    say "Debian packages present: ${APT_PACKAGES[*]}"
fi

# ---------------------------------------------------------------- 2. virtual environment
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
if [[ ! -x "$VENV/bin/python" ]]; then
    say "creating virtual environment $VENV with $("$PYTHON" --version 2>&1) ($(command -v "$PYTHON"))"
    "$PYTHON" -m venv "$VENV"
else
    say "virtual environment present: $VENV ($("$VENV/bin/python" --version 2>&1))"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)

# Which pins of requirements.txt does `pip freeze` not satisfy?  Names are compared after PEP 503
# normalisation; a local version label is accepted (torch==2.11.0 is satisfied by 2.11.0+cu130, as pip
# itself would decide).
unsatisfied_pins() {
    local freeze
    freeze="$("${PIP[@]}" freeze --all 2>/dev/null || true)"
    FREEZE="$freeze" "$VPY" - "$1" <<'PY'
import os, re, sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

have = {}
for line in os.environ["FREEZE"].splitlines():
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line.strip())
    if m:
        have[norm(m.group(1))] = m.group(2)

for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)$", line)
    if not m:
        print(line)  # not a plain pin: let pip decide
        continue
    got = have.get(norm(m.group(1)))
    if got is None or got.split("+", 1)[0] != m.group(2):
        print(line)
PY
}

# A venv starts with the pip bundled with Python (23.2 here), which installs editable projects through
# the deprecated `setup.py develop`; setuptools 80 then re-runs pip *with* build isolation, where torch
# is missing. pip >= 25 uses PEP 660 editable wheels directly, honouring --no-build-isolation.
PIP_PIN=25.3
if [[ "$("$VPY" -m pip --version | awk '{print $2}')" != "$PIP_PIN" ]]; then
    say "installing pip==$PIP_PIN"
    "${PIP[@]}" install "pip==$PIP_PIN"
fi

todo_text="$(unsatisfied_pins "$ROOT/requirements.txt")"
todo=()
[[ -n "$todo_text" ]] && mapfile -t todo <<<"$todo_text"
if ((${#todo[@]})); then
    say "installing from requirements.txt (not yet satisfied: ${todo[*]}); torch is several GB, this takes a while"
    "${PIP[@]}" install -r "$ROOT/requirements.txt"
else
    say "requirements.txt satisfied: $(grep -Ev '^\s*(#|$)' "$ROOT/requirements.txt" | tr '\n' ' ')"
fi

"$VPY" - <<'PY'
import torch
print(f"[setup_env] torch {torch.__version__} (CUDA {torch.version.cuda}, GPU available: {torch.cuda.is_available()})")
PY

# ---------------------------------------------------------------- 3. qext itself
say "building and installing qext: pip install --no-build-isolation --no-deps -e . (CMake build in ./build)"
"${PIP[@]}" install --no-build-isolation --no-deps -e "$ROOT"
"$VPY" -c 'import qext; print("[setup_env] qext importable from", qext.__file__)'
say "done"
