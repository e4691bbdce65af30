#!/usr/bin/env bash
# Main table: vanilla vs Free()LM, N rollouts per problem, on every benchmark of a model config.
#
#   1. freelm data prepare aime24 aime25 hmmt_feb25 brumo25 beyond_aime imo_answerbench   (once)
#   2. scripts/reproduce_main.sh CONFIG OUT_DIR --tokenizer DIR --endpoint HOST:PORT [--endpoint HOST:PORT ...]
#                                [--endpoints-file FILE]
#                                [--cleaner-endpoint HOST:PORT] [--data-dir DIR]
#                                [--backend sglang|vllm|openai] [--served-model NAME]
#
# Step 1 downloads the config's $BENCHMARKS at pinned upstream revisions into data/benchmarks/ of this
# working copy (git-ignored; `freelm data list` shows sources and revisions), the default --data-dir.
# CONFIG is configs/<model>.env: every results-deciding setting (sampling, budgets, the cleaner's template,
# budget and adapter name, the engine's protocol) lives there; it is checked before anything runs (exit 2
# naming the variable) and copied with its template to OUT_DIR/config.env and OUT_DIR/clean_template.txt.
# --backend / --served-model override the config's BACKEND / SERVED_MODEL (recorded in the copy).
# --tokenizer is the served model's tokenizer directory: the runner sends token ids.
# The servers must serve the base model with the Free-Module LoRA loaded under $ADAPTER_NAME.
# Runs are resumable: rerunning the same command continues where it stopped. A Free()LM run whose
# cleaner (nearly) never gave a usable deletion list stops the script with exit 3 and the cause.
# Outputs: OUT_DIR/{vanilla,freelm}.jsonl (+ .manifest.json), metrics.json, table.md (paper layout),
# accuracy_vs_tokens.png, peak_context.png, efficiency.md.
set -euo pipefail

usage() { sed -n '2,21p' "$0"; exit "${1:-2}"; }
[[ ${1:-} == -h || ${1:-} == --help ]] && usage 0
[[ $# -ge 2 ]] || usage
config=$1 out=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC2034  # data_dir: the default the sourced library reads (--data-dir overrides it)
data_dir="$repo/data/benchmarks" taken=0
bench_names=() bench_files=()  # the config's benchmarks, filled by load_config
python=${PYTHON:-python3}
# shellcheck disable=SC1091  # scripts/lib/reproduce.bash: run_option, load_config, keep_config, run_runner
source "$repo/scripts/lib/reproduce.bash"
while [[ $# -gt 0 ]]; do
  run_option "$@"
  if ((taken)); then shift "$taken"; continue; fi
  case $1 in
    -h | --help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
require_run_options
load_config "$config"
mkdir -p "$out"
keep_config "$config" "$out"

data_args=()
for data in "${bench_files[@]}"; do data_args+=(--data "$data"); done
[[ -n ${LIMIT:-} ]] && data_args+=(--limit "$LIMIT")  # a config's subset: the first LIMIT problems of each

# Each mode is ONE runner invocation over every benchmark (--data repeated), so the servers never idle
# through one benchmark's tail.
for mode in vanilla freelm; do
  echo "== $MODEL_NAME $mode: $BENCHMARKS" >&2
  run_runner "$mode" "${data_args[@]}" --output "$out/$mode.jsonl"
done

"$python" "$repo/eval_passk.py" --input "Free()LM=$out/freelm.jsonl" --baseline "Vanilla=$out/vanilla.jsonl" \
  --benchmarks "${bench_names[@]}" --output "$out/metrics.json" --markdown "$out/table.md" --plots-dir "$out"
"$python" -m freelm.evaluation.report_cli --input "Free()LM=$out/freelm.jsonl" --baseline "Vanilla=$out/vanilla.jsonl" \
  --model "$KV_MODEL" --output "$out/efficiency.json" --markdown "$out/efficiency.md"
echo "table: $out/table.md  efficiency: $out/efficiency.md" >&2
