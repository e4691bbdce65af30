#!/usr/bin/env bash
# Long-horizon experiment: the problems whose VANILLA rollouts need more than
# $LONG_HORIZON_THRESHOLD generated tokens (paper: 80k), rerun with Free()LM, accuracy on that subset.
#
#   1. freelm data prepare aime24 aime25 hmmt_feb25 brumo25 beyond_aime imo_answerbench   (once)
#   2. scripts/reproduce_long_horizon.sh CONFIG VANILLA_JSONL OUT_DIR --tokenizer DIR --endpoint HOST:PORT [...]
#                                        [--endpoints-file FILE] [--cleaner-endpoint HOST:PORT] [--data-dir DIR]
#                                        [--backend sglang|vllm|openai] [--served-model NAME]
#                                        [--threshold TOKENS] [--rule mean|any]
#
# Step 1 downloads the config's $BENCHMARKS at pinned upstream revisions into data/benchmarks/ of this
# working copy (git-ignored; `freelm data list` shows sources and revisions), the default --data-dir.
# CONFIG is checked and copied as by reproduce_main.sh (config.env, clean_template.txt).
# VANILLA_JSONL is a finished vanilla run (e.g. OUT_DIR/vanilla.jsonl of reproduce_main.sh, run with a
# budget above the threshold). A problem is selected when its mean (or, with --rule any, its longest)
# vanilla rollout reaches the threshold. Outputs: OUT_DIR/subset/{problems,vanilla}.jsonl,
# OUT_DIR/freelm.jsonl, OUT_DIR/table.md, OUT_DIR/metrics.json, plots.
set -euo pipefail

usage() { sed -n '2,17p' "$0"; exit "${1:-2}"; }
[[ ${1:-} == -h || ${1:-} == --help ]] && usage 0
[[ $# -ge 3 ]] || usage
config=$1 vanilla=$2 out=$3
shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC2034  # data_dir: the default the sourced library reads (--data-dir overrides it)
data_dir="$repo/data/benchmarks" taken=0
bench_files=()  # the config's benchmark files, filled by load_config
python=${PYTHON:-python3}
threshold="" rule=mean
# shellcheck disable=SC1091  # scripts/lib/reproduce.bash: run_option, load_config, keep_config, run_runner
source "$repo/scripts/lib/reproduce.bash"
while [[ $# -gt 0 ]]; do
  run_option "$@"
  if ((taken)); then shift "$taken"; continue; fi
  case $1 in
    --threshold) threshold=$2; shift 2 ;;
    --rule) rule=$2; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
require_run_options
[[ -f $vanilla ]] || { echo "vanilla run not found: $vanilla" >&2; exit 2; }
load_config "$config"
threshold=${threshold:-${LONG_HORIZON_THRESHOLD:-}}
[[ -n $threshold ]] || { echo "$config: LONG_HORIZON_THRESHOLD is not set (or pass --threshold)" >&2; exit 2; }
mkdir -p "$out"
keep_config "$config" "$out"
echo "threshold=$threshold rule=$rule vanilla=$vanilla" > "$out/selection.txt"

if ! "$python" -m freelm.evaluation.long_horizon --vanilla "$vanilla" --data "${bench_files[@]}" \
  --threshold "$threshold" --rule "$rule" --out-dir "$out/subset"; then
  echo "no problem reaches $threshold tokens: nothing to rerun" >&2
  exit 1
fi

run_runner freelm --data "$out/subset/problems.jsonl" --output "$out/freelm.jsonl"

"$python" "$repo/eval_passk.py" --input "Free()LM=$out/freelm.jsonl" --baseline "Vanilla=$out/subset/vanilla.jsonl" \
  --output "$out/metrics.json" --markdown "$out/table.md" --plots-dir "$out"
