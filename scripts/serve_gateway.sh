#!/usr/bin/env bash
# Start SGLang's model gateway (sglang-router) with cache_aware routing in front of the SGLang servers listed in
# WORKERS_FILE (as scripts/serve_endpoints.sh writes it), and write the gateway's own HOST:PORT to ENDPOINTS_FILE:
# runner.py --endpoints-file ENDPOINTS_FILE then sees the whole fleet as one endpoint.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
Usage: WORKERS_FILE=... ENDPOINTS_FILE=... scripts/serve_gateway.sh [--dry-run] [-- EXTRA_ROUTER_ARGS...]

Required:
  WORKERS_FILE               the SGLang servers: one HOST:PORT (or http://HOST:PORT) per line, # comments
                             (scripts/serve_endpoints.sh writes it; several nodes may append to one file)
  ENDPOINTS_FILE             where to write the gateway's HOST:PORT for runner.py --endpoints-file (overwritten)
Optional:
  PORT (30080)               the gateway's port        HOST (127.0.0.1)   address it binds to
  ADVERTISE_HOST             what goes into ENDPOINTS_FILE (HOST, or `hostname -f` when HOST is 0.0.0.0)
  POLICY (cache_aware)       --policy: cache_aware | round_robin | random | power_of_two
  LOG_FILE (./sglang_logs/gateway.log)
  READY_TIMEOUT (600)        seconds to wait for GET /readiness (200 once a worker is healthy)
  PYTHON (python)            the interpreter with sglang-router installed (pip install sglang-router)
Arguments after -- go to the gateway unchanged, e.g. -- --balance-abs-threshold 32 --request-timeout-secs 3600.

The gateway runs `python -m sglang_router.launch_router --worker-urls ... --policy cache_aware`. cache_aware
routes a request to the worker whose approximate prefix tree (one per worker, kept by the gateway) matches the
most of it, unless the load is unbalanced (more than --balance-abs-threshold (64) requests apart and
--balance-rel-threshold (1.5) times): then to the least loaded. A /generate call with input_ids is matched on
the ids written as decimal text, so a rollout's growing token prefix keeps its worker; cleaning calls (text)
are matched on their text. The gateway retries 408/429/5xx itself (--retry-max-retries 5) and has its own
circuit breaker; its /health is liveness only, so the runner asks /readiness (docs/pipeline.md).
The script keeps running until interrupted (Ctrl-C / scancel stops the gateway).

Options:
  --dry-run   print the gateway command and start nothing.
EOF_USAGE
}

# shellcheck disable=SC1091  # scripts/lib/options.bash: parse_options
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/options.bash"
dry_run=0 extra=()
parse_options "--dry-run --" "$@"

: "${WORKERS_FILE:?WORKERS_FILE is not set: the SGLang servers (HOST:PORT per line, from serve_endpoints.sh)}"
: "${ENDPOINTS_FILE:?ENDPOINTS_FILE is not set: where to write the gateway endpoint for runner.py --endpoints-file}"
# shellcheck disable=SC1091  # scripts/lib/serving.bash: resolve_hosts, wait_ready
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/serving.bash"
resolve_hosts
PORT="${PORT:-30080}"
POLICY="${POLICY:-cache_aware}"
LOG_FILE="${LOG_FILE:-./sglang_logs/gateway.log}"
READY_TIMEOUT="${READY_TIMEOUT:-600}"
PYTHON="${PYTHON:-python}"

if [[ ! -r "$WORKERS_FILE" ]]; then
  echo "error: WORKERS_FILE '$WORKERS_FILE' is not readable" >&2; exit 2
fi
workers=()
lineno=0
while IFS= read -r line || [[ -n "$line" ]]; do
  lineno=$(( lineno + 1 ))
  line="${line%%#*}"; line="${line//[[:space:]]/}"
  [[ -z "$line" ]] && continue
  [[ "$line" == http://* || "$line" == https://* ]] || line="http://$line"
  if [[ ! "$line" =~ ^https?://[^/:]+:[0-9]+/?$ ]]; then
    echo "error: $WORKERS_FILE:$lineno: '$line' is not HOST:PORT" >&2; exit 2
  fi
  workers+=("${line%/}")
done <"$WORKERS_FILE"
if (( ${#workers[@]} == 0 )); then
  echo "error: $WORKERS_FILE lists no server" >&2; exit 2
fi

cmd=("$PYTHON" -m sglang_router.launch_router --host "$HOST" --port "$PORT" --policy "$POLICY"
     --worker-urls "${workers[@]}" "${extra[@]}")
if [[ "$dry_run" == 1 ]]; then
  echo "gateway: ${cmd[*]}"
  echo "-> $ADVERTISE_HOST:$PORT into $ENDPOINTS_FILE (${#workers[@]} worker(s))"
  exit 0
fi

mkdir -p "$(dirname "$LOG_FILE")"
"${cmd[@]}" >"$LOG_FILE" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT INT TERM

# /readiness: 200 once a worker is healthy (the gateway's /health is liveness only)
wait_ready "http://$PROBE_HOST:$PORT/readiness" "$pid" "the gateway" "$LOG_FILE" "$READY_TIMEOUT"

mkdir -p "$(dirname "$ENDPOINTS_FILE")"
echo "$ADVERTISE_HOST:$PORT" >"$ENDPOINTS_FILE"
echo "ready: gateway $ADVERTISE_HOST:$PORT in front of ${#workers[@]} server(s), listed in $ENDPOINTS_FILE"
wait "$pid"
