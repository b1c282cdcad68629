#!/usr/bin/env bash
# One-shot GPU check of streaming-mads; prints one table (see benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh              # on one GPU, under 8 minutes
#   bash benchmarks/gpu_check.sh --cpu-smoke  # tiny sizes on the CPU (run by the test suite)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
if [ "${1:-}" != "--cpu-smoke" ]; then
  "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no GPU: use --cpu-smoke")'
fi
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
