#!/usr/bin/env bash
# Create ./.venv with a CPU build of torch and freelm installed editable (+ local and dev extras).
# Idempotent: re-running only installs what is missing.
#   TORCH_SPEC   the torch requirement (default torch==2.13.0, a CPU build on this project's machines;
#                elsewhere point pip at PyTorch's CPU wheel index via PIP_EXTRA_INDEX_URL)
#   PYTHON       the interpreter that creates the venv (default python3, >= 3.10)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,6p' "$0"; exit 0
fi
python_bin=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
[[ -x .venv/bin/python ]] || "$python_bin" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$torch_spec"
.venv/bin/python -m pip install -q -e '.[local,dev]'
echo "freelm environment ready: $(.venv/bin/python -c 'import freelm, torch; print("freelm", freelm.__version__, "torch", torch.__version__)')"
