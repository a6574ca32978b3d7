#!/usr/bin/env bash
# The HTTP API under load: `drover api` on Redis with a Postgres history database, driven by wrk
# over keep-alive loopback connections. Prints requests/s, jobs/s and latency percentiles for
# `POST /v1/jobs` (one noop job per request) and `POST /v1/jobs/batch` (BATCH jobs per request).
#
# Usage: scripts/bench-http.sh
#   HTTP_DURATION  seconds per run (default 10)       HTTP_CONNS   connections (default 64)
#   BATCH          jobs per batch request (default 1000)
#   DROVER_BENCH_REDIS  Redis URL (default redis://127.0.0.1:6379/0); only keys under the bench's
#                  own prefix are written, and they are deleted at the end
#   BENCH_PG       Postgres server URL without a database (default postgres://postgres@127.0.0.1:5432);
#                  the bench creates and drops its own database on it
# Installs wrk (Debian package) if it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${HTTP_DURATION:-10}
conns=${HTTP_CONNS:-64}
batch=${BATCH:-1000}
redis_url=${DROVER_BENCH_REDIS:-redis://127.0.0.1:6379/0}
pg=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}

if ! command -v wrk >/dev/null; then
  apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk; }
fi
cargo build --release --locked --quiet
drover=${CARGO_TARGET_DIR:-target}/release/drover

prefix="drover_bench_http_$$"
db="drover_bench_http_$$"
work=$(mktemp -d)
api_pid=
cleanup() {
  [[ -n $api_pid ]] && kill "$api_pid" 2>/dev/null && wait "$api_pid" 2>/dev/null || true
  redis-cli -u "$redis_url" --scan --pattern "$prefix:*" | xargs -r -n 500 redis-cli -u "$redis_url" unlink >/dev/null
  psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

psql -q "$pg/postgres" -c "CREATE DATABASE $db" >/dev/null
export DROVER_BROKER_URL=$redis_url DROVER_BROKER_PREFIX=$prefix DROVER_DATABASE_URL="$pg/$db"
export DROVER_LOG=${DROVER_LOG:-warn}
"$drover" migrate >/dev/null
# An operator key, as a client would hold one (the per-key rate limit is off by default).
key=$("$drover" keys create --role operator --name bench-http 2>/dev/null)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$drover" api --listen "127.0.0.1:$port" >"$work/api.log" 2>&1 &
api_pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done

cat >"$work/single.lua" <<EOF
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer $key"
wrk.body = '{"kind":"noop","payload":{}}'
EOF
python3 - "$batch" >"$work/batch.json" <<'EOF'
import json, sys
print(json.dumps({"jobs": [{"kind": "noop", "payload": {}}] * int(sys.argv[1])}))
EOF
cat >"$work/batch.lua" <<EOF
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["authorization"] = "Bearer $key"
local f = io.open("$work/batch.json"); wrk.body = f:read("*a"); f:close()
EOF
# Prints requests/s and p50/p99 from wrk's own summary; non-2xx answers are counted and shown.
report() { # name, jobs per request, wrk output
  awk -v name="$1" -v per="$2" '
    /Requests\/sec/ { rps = $2 }
    /^ +50%/ { p50 = $2 } /^ +99%/ { p99 = $2 }
    /Non-2xx/ { bad = $NF }
    END { printf "HTTP %s req_per_s=%.0f jobs_per_s=%.0f p50=%s p99=%s non_2xx=%d\n", name, rps, rps * per, p50, p99, bad }
  ' <<<"$3"
}
cpu() { awk '{ print $14 + $15 }' "/proc/$api_pid/stat"; }

ticks=$(getconf CLK_TCK)
for run in single batch; do
  per=1 path=/v1/jobs
  [[ $run == batch ]] && per=$batch path=/v1/jobs/batch
  c0=$(cpu)
  # PERF_OUT=/tmp/api.perf records a CPU profile of the API process during each run.
  perf_pid=
  if [[ -n ${PERF_OUT:-} ]]; then
    perf record -q -F 499 ${PERF_OPTS:--g} -p "$api_pid" -o "$PERF_OUT.$run" -- sleep "$duration" 2>/dev/null &
    perf_pid=$!
  fi
  out=$(wrk -t2 -c"$conns" -d"${duration}s" --latency -s "$work/$run.lua" "http://127.0.0.1:$port$path")
  c1=$(cpu)
  [[ -n $perf_pid ]] && wait "$perf_pid"
  report "$run" "$per" "$out"
  awk -v c="$((c1 - c0))" -v t="$ticks" -v d="$duration" 'BEGIN { printf "  api process CPU: %.2f cores\n", c / t / d }'
done
