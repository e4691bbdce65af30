# Sourced by the serving scripts (serve_endpoints.sh, serve_gateway.sh): what they share.

# resolve_hosts: HOST (default 127.0.0.1) is the bind address; ADVERTISE_HOST (default HOST, or `hostname -f`
# when HOST is 0.0.0.0) is what other machines are told; PROBE_HOST is where this node reaches the server.
# shellcheck disable=SC2034  # ADVERTISE_HOST and PROBE_HOST are for the sourcing script
resolve_hosts() {
  HOST="${HOST:-127.0.0.1}"
  local default_advertise="$HOST" probe="$HOST"
  if [[ "$HOST" == "0.0.0.0" ]]; then default_advertise="$(hostname -f)"; probe=127.0.0.1; fi
  ADVERTISE_HOST="${ADVERTISE_HOST:-$default_advertise}"
  PROBE_HOST="$probe"
}

# wait_ready URL PID WHAT LOG TIMEOUT: poll URL every 5 s until it answers 2xx; exit 1 if PID dies or TIMEOUT
# seconds pass.
wait_ready() {
  local url="$1" pid="$2" what="$3" log="$4" timeout="$5" waited=0
  until curl -sf -o /dev/null "$url"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "error: $what exited; see $log" >&2; exit 1
    fi
    if (( waited >= timeout )); then
      echo "error: $what not ready ($url) after ${timeout}s; see $log" >&2; exit 1
    fi
    sleep 5; waited=$(( waited + 5 ))
  done
}
