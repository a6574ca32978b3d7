#!/usr/bin/env bash
# schemathesis (PyPI) against a real `drover api` on Redis, with a fresh admin key: a bounded
# run over every operation of /openapi.json that fails on any 5xx and on any response that does
# not match the OpenAPI document (status code, content type, body schema, headers).
#
# Usage: scripts/schemathesis.sh
#   ST_MAX_EXAMPLES  examples per operation (default 125: ~2,000 requests over the 16 operations)
#   DROVER_ST_REDIS  Redis URL (default redis://127.0.0.1:6379/0); only keys under the run's own
#                    prefix are written, and they are deleted at the end
#   ST_PG            Postgres server URL without a database (default postgres://postgres@127.0.0.1:5432)
# Installs schemathesis into a venv under the tools cache (the one scripts/test.sh uses).
set -euo pipefail
cd "$(dirname "$0")/.."
examples=${ST_MAX_EXAMPLES:-125}
redis_url=${DROVER_ST_REDIS:-redis://127.0.0.1:6379/0}
pg=${ST_PG:-postgres://postgres@127.0.0.1:5432}
tools=${DROVER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/drover-tools}
venv=$tools/schemathesis-venv

if [[ ! -x $venv/bin/st ]]; then
  command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-venv; }
  python3 -m venv "$venv" 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv && python3 -m venv "$venv"; }
  "$venv/bin/pip" install -q 'schemathesis>=4,<5'
fi

cargo build --locked --quiet
drover=${CARGO_TARGET_DIR:-target}/debug/drover

prefix="drover_st_$$"
db="drover_st_$$"
work=$(mktemp -d)
api_pid=
cleanup() {
  [[ -n $api_pid ]] && kill "$api_pid" 2>/dev/null && wait "$api_pid" 2>/dev/null || true
  redis-cli -u "$redis_url" --scan --pattern "$prefix:*" | xargs -r -n 500 redis-cli -u "$redis_url" unlink >/dev/null
  psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

psql -q "$pg/postgres" -c "CREATE DATABASE $db" >/dev/null
export DROVER_BROKER_URL=$redis_url DROVER_BROKER_PREFIX=$prefix DROVER_DATABASE_URL="$pg/$db"
export DROVER_LOG=${DROVER_LOG:-warn}
"$drover" migrate >/dev/null
key=$("$drover" keys create --role admin --name schemathesis --expires-in 1h 2>/dev/null)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$drover" api --listen "127.0.0.1:$port" >"$work/api.log" 2>&1 &
api_pid=$!
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done

start=$(date +%s)
status=0
"$venv/bin/st" run "http://127.0.0.1:$port/openapi.json" \
  --header "Authorization: Bearer $key" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
  --max-examples "$examples" \
  --seed 1 \
  --suppress-health-check all \
  --no-color || status=$?
echo "schemathesis: $(( $(date +%s) - start )) s, exit $status"
if [[ $status -ne 0 ]]; then
  echo "--- drover api log (last 50 lines)"; tail -50 "$work/api.log"
fi
exit $status
