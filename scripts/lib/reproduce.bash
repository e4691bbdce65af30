# Sourced by the reproduction scripts (reproduce_main.sh, reproduce_long_horizon.sh): what they share.
# They set `repo`, `python`, `data_dir` (the default) and `taken`, then read the run options with
# run_option, check them with require_run_options, read the model config with load_config, keep a copy
# of it with keep_config and call run_runner.

endpoint_args=() extra_args=() backend_override="" served_model_override="" reasoners=0

# Every variable a model config must set (configs/qwen3-8b.env documents each); the optional ones are
# SERVED_MODEL, CLEANER_BACKEND, MAX_CLEAN_ROUNDS, PROBLEM_SUFFIX, LIMIT (reproduce_main.sh: the first LIMIT
# problems of each benchmark) and LONG_HORIZON_THRESHOLD.
CONFIG_VARS=(MODEL_NAME KV_MODEL BACKEND ADAPTER_NAME CLEAN_TEMPLATE CLEAN_MAX_TOKENS CLEAN_RESERVE N_ROLLOUTS SEED
  TEMPERATURE TOP_P TOP_K MIN_P CLEAN_EVERY MAX_TOKENS CONTEXT_LIMIT CONCURRENCY BENCHMARKS)

# run_option ARGS...: take the option both scripts accept at the head of ARGS (--endpoint,
# --endpoints-file, --cleaner-endpoint, --tokenizer, --data-dir, --backend, --served-model); sets `taken`
# to the words used (0: not one of them).
# shellcheck disable=SC2034  # data_dir and taken are the sourcing script's
run_option() {
  taken=0
  case $1 in
    --endpoint | --endpoints-file) endpoint_args+=("$1" "$2"); reasoners=1; taken=2 ;;
    --cleaner-endpoint) endpoint_args+=("$1" "$2"); taken=2 ;;
    --tokenizer) extra_args+=("$1" "$2"); taken=2 ;;
    --data-dir) data_dir=$2; taken=2 ;;
    --backend) backend_override=$2; taken=2 ;;
    --served-model) served_model_override=$2; taken=2 ;;
  esac
}

# require_run_options: the reasoner's endpoints and the --tokenizer, before anything is written.
require_run_options() {
  ((reasoners)) || { echo "at least one --endpoint (or an --endpoints-file) is required" >&2; exit 2; }
  [[ ${#extra_args[@]} -gt 0 ]] || { echo "--tokenizer DIR is required (the runner sends token ids)" >&2; exit 2; }
}

# config_path PATH: PATH as given when absolute, else relative to the config file's folder.
# shellcheck disable=SC2154  # config_dir is set by load_config
config_path() {
  if [[ $1 == /* ]]; then echo "$1"; else echo "$config_dir/$1"; fi
}

# load_config CONFIG: source the model config and check it before anything runs (exit 2 naming the
# variable): every setting present, the cleaning template readable and a template, and every benchmark
# file present. Sets clean_template (its path), bench_names and bench_files (one per BENCHMARKS word:
# NAME reads DATA_DIR/NAME.jsonl, NAME=PATH reads PATH, relative to the config's folder).
# shellcheck disable=SC2034,SC2153,SC2154  # the settings are the config's; bench_* are the sourcing script's
load_config() {
  local config=$1 var bench error
  [[ -f $config && -r $config ]] || { echo "config not found or unreadable: $config" >&2; exit 2; }
  config_dir=$(cd "$(dirname "$config")" && pwd)
  # shellcheck source=/dev/null
  source "$config"
  BACKEND=${backend_override:-${BACKEND:-}}
  SERVED_MODEL=${served_model_override:-${SERVED_MODEL:-}}
  for var in "${CONFIG_VARS[@]}"; do
    [[ -n ${!var:-} ]] || { echo "$config: $var is not set (every setting: configs/qwen3-8b.env)" >&2; exit 2; }
  done
  clean_template=$(config_path "$CLEAN_TEMPLATE")
  if ! error=$("$python" -c 'import sys; from freelm.prompts import load_clean_template as load
try:
    load(sys.argv[1])
except ValueError as exc:
    sys.exit(str(exc))' "$clean_template" 2>&1); then
    echo "$config: CLEAN_TEMPLATE=$CLEAN_TEMPLATE: $error" >&2
    echo "  a released adapter's template: freelm template infer --sft ROWS -o FILE, then CLEAN_TEMPLATE=FILE" \
      "(docs/pipeline.md); the project's own: CLEAN_TEMPLATE=$repo/freelm/templates/clean.txt" >&2
    exit 2
  fi
  bench_names=() bench_files=()
  for bench in $BENCHMARKS; do
    if [[ $bench == *=* ]]; then
      bench_names+=("${bench%%=*}") bench_files+=("$(config_path "${bench#*=}")")
    else
      bench_names+=("$bench") bench_files+=("$data_dir/$bench.jsonl")
    fi
    [[ -f ${bench_files[-1]} ]] || {
      echo "$config: BENCHMARKS: file not found: ${bench_files[-1]} (see docs/evaluation.md)" >&2
      exit 2
    }
  done
}

# keep_config CONFIG OUT: copy the config and its cleaning template into OUT (config.env,
# clean_template.txt), with the values this run used appended, so OUT/config.env reruns the same run
# (given as CONFIG, it is kept as it is). A different template already in OUT (runs made with it) is refused.
# shellcheck disable=SC2154  # clean_template is set by load_config
keep_config() {
  local config=$1 out=$2
  if [[ -f $out/clean_template.txt ]] && ! cmp -s "$clean_template" "$out/clean_template.txt"; then
    echo "$out holds runs made with another cleaning template ($out/clean_template.txt, not $clean_template):" \
      "use another output folder, or move it aside" >&2
    exit 2
  fi
  [[ $clean_template -ef $out/clean_template.txt ]] || cp "$clean_template" "$out/clean_template.txt"
  [[ $config -ef $out/config.env ]] && return  # rerun from the copy: it already says all this
  cp "$config" "$out/config.env"
  {
    echo
    echo "# --- as run by $(basename "$0") on $(date -u +%Y-%m-%dT%H:%M:%SZ): the copied template and the engine"
    echo "CLEAN_TEMPLATE=clean_template.txt  # copied from $clean_template"
    printf 'BACKEND=%q\nSERVED_MODEL=%q\n' "$BACKEND" "$SERVED_MODEL"
  } >>"$out/config.env"
}

# run_runner MODE RUNNER_ARGS...: runner.py in MODE with every setting of the config, the endpoints and
# the tokenizer. A runner that fails stops the script with its exit code (3: the cleaning-outcome rule
# flagged the run; its message names the cause), before any table is written.
# shellcheck disable=SC2154  # repo and python are the sourcing script's, the settings the model config's
run_runner() {
  local mode=$1 code=0
  shift
  local optional=()
  [[ -n ${SERVED_MODEL:-} ]] && optional+=(--served-model "$SERVED_MODEL")
  [[ -n ${CLEANER_BACKEND:-} ]] && optional+=(--cleaner-backend "$CLEANER_BACKEND")
  [[ -n ${MAX_CLEAN_ROUNDS:-} ]] && optional+=(--max-clean-rounds "$MAX_CLEAN_ROUNDS")
  [[ -n ${PROBLEM_SUFFIX+set} ]] && optional+=(--problem-suffix "$PROBLEM_SUFFIX")
  "$python" "$repo/runner.py" "$@" \
    --n-rollouts "$N_ROLLOUTS" --seed "$SEED" --backend "$BACKEND" "${endpoint_args[@]}" "${extra_args[@]}" \
    --mode "$mode" --adapter-name "$ADAPTER_NAME" --clean-template "$clean_template" \
    --clean-max-tokens "$CLEAN_MAX_TOKENS" --clean-reserve "$CLEAN_RESERVE" --clean-every "$CLEAN_EVERY" \
    --max-tokens "$MAX_TOKENS" --context-limit "$CONTEXT_LIMIT" \
    --temperature "$TEMPERATURE" --top-p "$TOP_P" --top-k "$TOP_K" --min-p "$MIN_P" \
    --concurrency "$CONCURRENCY" "${optional[@]}" || code=$?
  if ((code)); then
    echo "$(basename "$0"): runner.py --mode $mode exited $code (see above); no table written" >&2
    exit "$code"
  fi
}
