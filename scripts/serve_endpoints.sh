#!/usr/bin/env bash
# Start one SGLang server (scripts/serve_sglang.sh) per group of TP GPUs on this node and write the
# endpoint list runner.py reads with --endpoints-file: one HOST:PORT per line.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
Usage: MODEL_PATH=... ADAPTER_PATH=... ENDPOINTS_FILE=... scripts/serve_endpoints.sh [--deterministic] [--dry-run]

Required:
  MODEL_PATH, ADAPTER_PATH   as for scripts/serve_sglang.sh
  ENDPOINTS_FILE             where to write the HOST:PORT list (appended to, so several nodes can share one file)
Optional:
  GPUS ("0 1 2 3 4 5 6 7")   GPU ids on this node          TP (1)   GPUs per server
  BASE_PORT (30000)          server i listens on BASE_PORT+i
  HOST (127.0.0.1)           address servers bind to; ADVERTISE_HOST (HOST, or `hostname -f` when HOST is 0.0.0.0)
                             is what goes into ENDPOINTS_FILE
  LOG_DIR (./sglang_logs)    one log per server
  READY_TIMEOUT (1800)       seconds to wait for each server's GET /health
Other variables (CONTEXT_LENGTH, MAX_LORA_RANK, LORA_TARGET_MODULES, ...) pass through to serve_sglang.sh.
The script waits until every server answers /health, writes the list, and keeps running until
interrupted (Ctrl-C / scancel stops all servers).

Options:
  --deterministic   every server runs with --enable-deterministic-inference (DETERMINISTIC=1): only then are
                    per-request seeds honoured (see scripts/serve_sglang.sh --help); runner.py records in its
                    manifest whether they were.
  --dry-run         print the plan and start nothing.
EOF_USAGE
}

# shellcheck disable=SC1091  # scripts/lib/options.bash: parse_options
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/options.bash"
dry_run=0
parse_options "--dry-run --deterministic" "$@"

: "${MODEL_PATH:?MODEL_PATH is not set: the base model directory}"
: "${ADAPTER_PATH:?ADAPTER_PATH is not set: the Free-Module adapter directory}"
: "${ENDPOINTS_FILE:?ENDPOINTS_FILE is not set: the endpoint list to write for runner.py --endpoints-file}"
read -r -a gpus <<<"${GPUS:-0 1 2 3 4 5 6 7}"
TP="${TP:-1}"
BASE_PORT="${BASE_PORT:-30000}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC1091  # scripts/lib/serving.bash: resolve_hosts, wait_ready
source "$here/lib/serving.bash"
resolve_hosts
LOG_DIR="${LOG_DIR:-./sglang_logs}"
READY_TIMEOUT="${READY_TIMEOUT:-1800}"

if (( ${#gpus[@]} == 0 || ${#gpus[@]} % TP != 0 )); then
  echo "error: ${#gpus[@]} GPUs (GPUS='${GPUS:-}') do not split into groups of TP=$TP" >&2
  exit 2
fi
servers=$(( ${#gpus[@]} / TP ))

endpoints=()
for (( i = 0; i < servers; i++ )); do
  group="$(IFS=,; echo "${gpus[*]:i*TP:TP}")"
  port=$(( BASE_PORT + i ))
  endpoints+=("$ADVERTISE_HOST:$port")
  if [[ "$dry_run" == 1 ]]; then
    echo "server $i: CUDA_VISIBLE_DEVICES=$group PORT=$port DETERMINISTIC=${DETERMINISTIC:-0} -> $ADVERTISE_HOST:$port"
  fi
done
if [[ "$dry_run" == 1 ]]; then exit 0; fi

mkdir -p "$LOG_DIR"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
for (( i = 0; i < servers; i++ )); do
  group="$(IFS=,; echo "${gpus[*]:i*TP:TP}")"
  CUDA_VISIBLE_DEVICES="$group" PORT=$(( BASE_PORT + i )) HOST="$HOST" TP="$TP" \
    "$here/serve_sglang.sh" >"$LOG_DIR/server_$i.log" 2>&1 &
  pids+=("$!")
done

for (( i = 0; i < servers; i++ )); do
  wait_ready "http://$PROBE_HOST:$(( BASE_PORT + i ))/health" "${pids[i]}" "server $i" "$LOG_DIR/server_$i.log" \
    "$READY_TIMEOUT"
done

mkdir -p "$(dirname "$ENDPOINTS_FILE")"
printf '%s\n' "${endpoints[@]}" >>"$ENDPOINTS_FILE"
echo "ready: ${#endpoints[@]} server(s) listed in $ENDPOINTS_FILE"
wait
