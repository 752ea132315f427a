#!/usr/bin/env bash
# Whole test suite: C++ tests (CTest, gtest) and Python tests (pytest).  Installs what it needs first.
# Both suites always run; the exit status is non-zero if either failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash "$ROOT/scripts/setup_env.sh"

status=0

echo "[run_tests] ctest --test-dir build --output-on-failure --no-tests=error"
if ctest --test-dir build --output-on-failure --no-tests=error; then
    ctest_rc=0
else
    ctest_rc=$?
    status=1
fi

echo "[run_tests] .venv/bin/python -m pytest -q tests/python"
if "$ROOT/.venv/bin/python" -m pytest -q tests/python; then
    pytest_rc=0
else
    pytest_rc=$?
    status=1
fi

echo "[run_tests] ctest: $([[ $ctest_rc -eq 0 ]] && echo passed || echo "FAILED (rc=$ctest_rc)"), pytest: $([[ $pytest_rc -eq 0 ]] && echo passed || echo "FAILED (rc=$pytest_rc)")"
exit "$status"
