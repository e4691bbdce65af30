#!/usr/bin/env bash
# Main table: vanilla vs Free()LM, N rollouts per problem, on every benchmark of a model config.
#
#   1. freelm data prepare aime24 aime25 hmmt_feb25 brumo25 beyond_aime imo_answerbench   (once)
#   2. scripts/reproduce_main.sh CONFIG OUT_DIR --tokenizer DIR --endpoint HOST:PORT [--endpoint HOST:PORT ...]
#                                [--cleaner-endpoint HOST:PORT] [--data-dir DIR]
#
# Step 1 downloads the config's $BENCHMARKS at pinned upstream revisions into data/benchmarks/ of this
# working copy (git-ignored; `freelm data list` shows sources and revisions), the default --data-dir.
# CONFIG is configs/<model>.env (every setting lives there and is copied to OUT_DIR/config.env).
# --tokenizer is the served model's tokenizer directory: the runner sends token ids.
# The servers must serve the base model with the Free-Module LoRA loaded under $ADAPTER_NAME.
# Runs are resumable: rerunning the same command continues where it stopped.
# Each mode is ONE runner invocation over every benchmark (--data repeated), so the servers never idle
# through one benchmark's tail. Outputs: OUT_DIR/{vanilla,freelm}.jsonl (+ .manifest.json),
# metrics.json, table.md (paper layout), accuracy_vs_tokens.png, peak_context.png, efficiency.md.
set -euo pipefail

usage() { sed -n '2,16p' "$0"; exit "${1:-2}"; }
[[ ${1:-} == -h || ${1:-} == --help ]] && usage 0
[[ $# -ge 2 ]] || usage
config=$1 out=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
data_dir="$repo/data/benchmarks" taken=0
python=${PYTHON:-python3}
# shellcheck disable=SC1091  # scripts/lib/reproduce.bash: run_option, require_run_options, run_runner
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
[[ -f $config ]] || { echo "config not found: $config" >&2; exit 2; }

# shellcheck source=/dev/null
source "$config"
mkdir -p "$out"
cp "$config" "$out/config.env"

data_args=()
for bench in $BENCHMARKS; do
  data="$data_dir/$bench.jsonl"
  [[ -f $data ]] || { echo "benchmark file not found: $data (see docs/evaluation.md)" >&2; exit 2; }
  data_args+=(--data "$data")
done

for mode in vanilla freelm; do
  echo "== $MODEL_NAME $mode: $BENCHMARKS" >&2
  run_runner "$mode" "${data_args[@]}" --output "$out/$mode.jsonl"
done

# shellcheck disable=SC2086  # BENCHMARKS is a word list
"$python" "$repo/eval_passk.py" --input "Free()LM=$out/freelm.jsonl" --baseline "Vanilla=$out/vanilla.jsonl" \
  --benchmarks $BENCHMARKS --output "$out/metrics.json" --markdown "$out/table.md" --plots-dir "$out"
"$python" -m freelm.evaluation.report_cli --input "Free()LM=$out/freelm.jsonl" --baseline "Vanilla=$out/vanilla.jsonl" \
  --model "$KV_MODEL" --output "$out/efficiency.json" --markdown "$out/efficiency.md"
echo "table: $out/table.md  efficiency: $out/efficiency.md" >&2
