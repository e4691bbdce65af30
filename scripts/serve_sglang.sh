#!/usr/bin/env bash
# One SGLang server: the base model (reasoning mode) plus the Free-Module LoRA named "free" (cleaning mode).
# Flags as in sglang 0.5.23 (srt/arg_groups/fields/{lora,model,parallel,serving}.py).
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
Usage: MODEL_PATH=... ADAPTER_PATH=... scripts/serve_sglang.sh [--deterministic] [--dry-run] [-- EXTRA_SGLANG_ARGS...]

Required:
  MODEL_PATH        base model: local directory (or Hub id)
  ADAPTER_PATH      Free-Module adapter directory (adapter_config.json + *.safetensors);
                    SGLang treats a non-directory as a Hub id, e.g. ldsjmdy/Qwen3-8B-FreeLM-LoRA
Optional:
  PORT (30000)  HOST (127.0.0.1)  TP (1)  CONTEXT_LENGTH (40960)
  MAX_LORA_RANK (64)  LORA_TARGET_MODULES ("q_proj k_proj v_proj o_proj")  MAX_LORAS_PER_BATCH (2)
  SERVED_MODEL_NAME (basename of MODEL_PATH)  MEM_FRACTION_STATIC  PYTHON (python)
  DETERMINISTIC (0)  1 = --enable-deterministic-inference (same as --deterministic)
MAX_LORAS_PER_BATCH counts the base model, so base + Free-Module needs at least 2.
--enable-cache-report is always passed (cached_tokens in OpenAI-route usage; /generate reports it anyway).

Options:
  --deterministic   serve with --enable-deterministic-inference: only then does SGLang apply a request's
                    sampling_seed (sampling/sampling_batch_info.py), so runner.py --seed reproduces rollouts and
                    the reward filter's paired seeds mean something. Costs throughput (batch-invariant kernels);
                    its sampler asserts on min_p > 0 (layers/sampler.py): keep --min-p 0 (runner.py refuses it).
  --dry-run         print the command instead of starting the server.
EOF_USAGE
}

# shellcheck disable=SC1091  # scripts/lib/options.bash: parse_options
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/options.bash"
dry_run=0 extra=()
parse_options "--dry-run --deterministic --" "$@"

: "${MODEL_PATH:?MODEL_PATH is not set: the base model directory}"
: "${ADAPTER_PATH:?ADAPTER_PATH is not set: the Free-Module adapter directory}"
PORT="${PORT:-30000}"
HOST="${HOST:-127.0.0.1}"
TP="${TP:-1}"
CONTEXT_LENGTH="${CONTEXT_LENGTH:-40960}"
MAX_LORA_RANK="${MAX_LORA_RANK:-64}"
LORA_TARGET_MODULES="${LORA_TARGET_MODULES:-q_proj k_proj v_proj o_proj}"
MAX_LORAS_PER_BATCH="${MAX_LORAS_PER_BATCH:-2}"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-$(basename "$MODEL_PATH")}"

if (( MAX_LORAS_PER_BATCH < 2 )); then
  echo "error: MAX_LORAS_PER_BATCH=$MAX_LORAS_PER_BATCH: it counts the base model, base + Free-Module needs >= 2" >&2
  exit 2
fi

read -r -a targets <<<"$LORA_TARGET_MODULES"
cmd=("${PYTHON:-python}" -m sglang.launch_server
  --model-path "$MODEL_PATH" --served-model-name "$SERVED_MODEL_NAME"
  --enable-lora --lora-paths "free=$ADAPTER_PATH"
  --max-loras-per-batch "$MAX_LORAS_PER_BATCH" --max-lora-rank "$MAX_LORA_RANK"
  --lora-target-modules "${targets[@]}"
  --context-length "$CONTEXT_LENGTH" --tp-size "$TP"
  --host "$HOST" --port "$PORT" --enable-cache-report)
if [[ "${DETERMINISTIC:-0}" == 1 ]]; then cmd+=(--enable-deterministic-inference); fi
if [[ -n "${MEM_FRACTION_STATIC:-}" ]]; then cmd+=(--mem-fraction-static "$MEM_FRACTION_STATIC"); fi
cmd+=("${extra[@]}")

if [[ "$dry_run" == 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
