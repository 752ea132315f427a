#!/usr/bin/env bash
# Main job: end-to-end Fashion-MNIST run of the quantization workflow, with one results table: fp32
# training, then qext int8 QAT (fake-quant and converted integer model), PTQ static int8, 4-bit LSQ QAT,
# and PyTorch's own torch.ao QAT / PTQ on the same net and budget (about 10 minutes on 2 cores).
# Installs what it needs first. Extra arguments go to the example (e.g. --quick, --epochs 1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash "$ROOT/scripts/setup_env.sh"
exec "$ROOT/.venv/bin/python" "$ROOT/examples/fashion_mnist_workflow.py" "$@"
