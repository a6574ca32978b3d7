#!/usr/bin/env bash
# Runs drover's whole test suite on this machine: makes sure the services the tests use are up
# (starting them the way this machine's image does if not), then format, lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

up() { # name, host:port, start command
  local name=$1 addr=$2 start=$3
  if ! (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then
    say "$name is down on $addr: starting it"
    bash -c "$start"
    for _ in $(seq 1 60); do
      (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null && return 0
      sleep 1
    done
    echo "$name did not come up on $addr (tried: $start)" >&2
    exit 1
  fi
}

# A fresh machine of this kind has these; install them if one is missing (as root, Debian).
need=()
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
command -v redis-server >/dev/null || need+=(redis-server)
command -v rabbitmq-server >/dev/null || need+=(rabbitmq-server)
command -v kill >/dev/null || need+=(procps)   # the SIGTERM tests signal the real binary
command -v pg_dump >/dev/null || need+=(postgresql-client)   # the backup tests dump and restore
command -v curl >/dev/null || need+=(curl)   # scripts/schemathesis.sh waits for the API with it
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  mkdir -p /var/lib/redis /var/log/redis
fi

up PostgreSQL 127.0.0.1:5432 'pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start'
up Redis 127.0.0.1:6379 'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log'
up RabbitMQ 127.0.0.1:5672 'rabbitmq-server -detached'

# pg_dump refuses a server newer than itself: the backup tests need the client of the
# server's major version (Debian's pg_wrapper picks it once installed).
server_major=$(psql -h 127.0.0.1 -U postgres -tAc 'SHOW server_version_num' | awk '{print int($1 / 10000)}')
dump_major=$(pg_dump --version | awk '{print int($3)}')
if [ "$dump_major" -lt "$server_major" ]; then
  say "pg_dump $dump_major is older than the server ($server_major): installing postgresql-client-$server_major"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "postgresql-client-$server_major"
fi

# The Dockerfile, docker-compose.yml and every k8s/ overlay (no Docker engine, no cluster here).
./scripts/check-deploy.sh
# The manifest tests (tests/e2e/k8s.rs) render the overlays with kubectl too.
export PATH="${DROVER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/drover-tools}/bin:$PATH"

if ! cargo nextest --version >/dev/null 2>&1; then
  say "installing cargo-nextest"
  cargo install cargo-nextest --locked
fi

if ! cargo deny --version >/dev/null 2>&1; then
  say "installing cargo-deny"
  cargo install --locked cargo-deny
fi
# Licenses, bans and sources need nothing from outside. The advisory database comes from
# GitHub, which this machine's kind cannot reach: advisories are checked when a copy can be
# fetched (or is already in ~/.cargo/advisory-dbs), and said so when not.
say "cargo deny check"
cargo deny check licenses bans sources
if cargo deny fetch db >/dev/null 2>&1 || ls "${CARGO_HOME:-$HOME/.cargo}"/advisory-dbs/*/ >/dev/null 2>&1; then
  cargo deny check --disable-fetch advisories
else
  echo "cargo deny: the advisory database could not be fetched; advisories not checked this run"
fi

say "cargo fmt --check"
cargo fmt --all --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The optional OTLP exporter (off in the default build): linted and tested here.
cargo clippy -p drover --all-targets --locked --features otlp -- -D warnings
say "tests"
cargo nextest run --workspace --locked --no-fail-fast
cargo nextest run -p drover --features otlp --test e2e --locked with_otlp
say "the dashboard in headless Chromium (scripts/dashboard-test.sh)"
./scripts/dashboard-test.sh
say "schemathesis against a running drover api (scripts/schemathesis.sh)"
./scripts/schemathesis.sh
