# Sourced by the launchers (serve_sglang.sh, serve_endpoints.sh, serve_gateway.sh, train_freelm.sh):
# their one command-line convention.

# parse_options ACCEPTED ARGS...: read ARGS by the launchers' convention into `dry_run` and `extra`, which
# the script initialises (dry_run=0 extra=()) first. ACCEPTED lists the options this
# script takes besides -h/--help (always: calls the script's `usage`, exits 0), out of: --dry-run (sets
# dry_run=1), --deterministic (exports DETERMINISTIC=1), -- (the words after it go to the array `extra`).
# Anything else exits 2 naming the argument.
# shellcheck disable=SC2034  # dry_run and extra are the sourcing script's
parse_options() {
  local accepted=" $1 "
  shift
  while [[ $# -gt 0 ]]; do
    if [[ $1 != -h && $1 != --help && $accepted != *" $1 "* ]]; then
      echo "error: unknown argument '$1' (see --help)" >&2; exit 2
    fi
    case "$1" in
      -h|--help) usage; exit 0 ;;
      --dry-run) dry_run=1 ;;
      --deterministic) export DETERMINISTIC=1 ;;
      --) shift; extra=("$@"); break ;;
    esac
    shift
  done
}
