#!/usr/bin/env bash
# Main job: end-to-end Fashion-MNIST run (fp32 training, int8 fake-quant QAT, 4-bit LSQ QAT) with a results
# table.  Installs what it needs first.  Extra arguments go to the example (e.g. --steps 600 --threads 4).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash "$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/examples/fashion_mnist_qat.py" "$@"
