#!/usr/bin/env bash
# drover on Redis against BullMQ 6.7 on the same workload (../shared/bench/WORKLOAD.md), run
# alternately so that both see the same machine: ROUNDS rounds (default 3), each drover then
# BullMQ back to back; prints both RESULT lines per round, the per-round ratios, and the medians.
#
# Usage: scripts/bench-compare.sh            (BENCH_* knobs as in WORKLOAD.md pass through)
#   DROVER_BENCH_REDIS   Redis URL for drover (default redis://127.0.0.1:6379/0; drover touches
#                        only keys under its own drover_bench_<pid> prefix)
#   BENCH_DATABASE_URL   history database for drover's workers (default: a temporary SQLite file)
# BullMQ always uses Redis DB 15, which its harness flushes: never point anything else at it.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
redis_url=${DROVER_BENCH_REDIS:-redis://127.0.0.1:6379/0}
bullmq=${BULLMQ_RUN:-../shared/bench/bullmq/run.sh}
[[ -x $bullmq ]] || bullmq=/work/shared/bench/bullmq/run.sh
[[ -x $bullmq ]] || { echo "bench-compare: $bullmq not found (the BullMQ harness)" >&2; exit 2; }
cargo build --release --locked --quiet
drover=${CARGO_TARGET_DIR:-target}/release/drover

field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

declare -a drain enq p50 p99 bdrain benq bp50 bp99
for r in $(seq 1 "$rounds"); do
  d=$("$drover" bench "$redis_url" 2>/dev/null | grep '^RESULT')
  b=$("$bullmq" 2>/dev/null | grep '^RESULT')
  echo "round $r"
  echo "  $d"
  echo "  $b"
  drain+=("$(field "$d" jobs_per_s)"); bdrain+=("$(field "$b" jobs_per_s)")
  enq+=("$(field "$d" enqueue_per_s)"); benq+=("$(field "$b" enqueue_per_s)")
  p50+=("$(field "$d" p50_ms)"); bp50+=("$(field "$b" p50_ms)")
  p99+=("$(field "$d" p99_ms)"); bp99+=("$(field "$b" p99_ms)")
  echo "  ratio drover/bullmq: drain $(ratio "${drain[-1]}" "${bdrain[-1]}")x" \
    "enqueue $(ratio "${enq[-1]}" "${benq[-1]}")x" \
    "p50 ${p50[-1]} vs ${bp50[-1]} ms, p99 ${p99[-1]} vs ${bp99[-1]} ms"
done
m() { printf '%s\n' "$@" | median; }
echo "median of $rounds: drover drain $(m "${drain[@]}")/s vs bullmq $(m "${bdrain[@]}")/s" \
  "($(ratio "$(m "${drain[@]}")" "$(m "${bdrain[@]}")")x);" \
  "enqueue $(m "${enq[@]}")/s vs $(m "${benq[@]}")/s ($(ratio "$(m "${enq[@]}")" "$(m "${benq[@]}")")x);" \
  "p50 $(m "${p50[@]}") vs $(m "${bp50[@]}") ms; p99 $(m "${p99[@]}") vs $(m "${bp99[@]}") ms"
