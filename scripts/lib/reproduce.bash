# Sourced by the reproduction scripts (reproduce_main.sh, reproduce_long_horizon.sh): what they share.
# They set `repo`, `python`, `data_dir` (the default) and `taken`, then read the run options with
# run_option, check them with require_run_options, source the model config and call run_runner.

endpoint_args=() extra_args=()

# run_option ARGS...: take the option both scripts accept at the head of ARGS (--endpoint,
# --cleaner-endpoint, --tokenizer, --data-dir); sets `taken` to the words used (0: not one of them).
# shellcheck disable=SC2034  # data_dir and taken are the sourcing script's
run_option() {
  taken=0
  case $1 in
    --endpoint | --cleaner-endpoint) endpoint_args+=("$1" "$2"); taken=2 ;;
    --tokenizer) extra_args+=("$1" "$2"); taken=2 ;;
    --data-dir) data_dir=$2; taken=2 ;;
  esac
}

# require_run_options: at least one --endpoint and the --tokenizer, before anything is written.
require_run_options() {
  [[ ${#endpoint_args[@]} -gt 0 ]] || { echo "at least one --endpoint is required" >&2; exit 2; }
  [[ ${#extra_args[@]} -gt 0 ]] || { echo "--tokenizer DIR is required (the runner sends token ids)" >&2; exit 2; }
}

# run_runner MODE RUNNER_ARGS...: runner.py in MODE with the config's settings, the endpoints and the tokenizer.
# shellcheck disable=SC2154  # repo and python are the sourcing script's, the settings the model config's
run_runner() {
  local mode=$1
  shift
  "$python" "$repo/runner.py" "$@" \
    --n-rollouts "$N_ROLLOUTS" --seed "$SEED" --backend sglang "${endpoint_args[@]}" "${extra_args[@]}" \
    --mode "$mode" --adapter-name "$ADAPTER_NAME" --clean-every "$CLEAN_EVERY" \
    --max-tokens "$MAX_TOKENS" --context-limit "$CONTEXT_LIMIT" \
    --temperature "$TEMPERATURE" --top-p "$TOP_P" --top-k "$TOP_K" --concurrency "$CONCURRENCY"
}
