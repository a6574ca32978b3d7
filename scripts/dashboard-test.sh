#!/usr/bin/env bash
# The dashboard's browser test (tests/dashboard/): the real `drover dev` binary driven through
# Debian's headless Chromium by playwright-core. Installs what a fresh Debian 12 lacks (as
# root): chromium, nodejs and npm from apt, playwright-core from the committed lock file (no
# browser download: the test uses /usr/bin/chromium). Screenshots land in
# tests/dashboard/artifacts/ (or $DASHBOARD_ARTIFACTS).
#
# A missing tool fails the run: the browser test never skips.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v chromium >/dev/null || need+=(chromium)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]} for the dashboard's browser test"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
command -v chromium >/dev/null || { echo "chromium is missing and could not be installed" >&2; exit 1; }
command -v node >/dev/null || { echo "node is missing and could not be installed" >&2; exit 1; }
# playwright-core needs Node.js 20 or later; Debian 12's own nodejs is 18 (this machine kind
# ships Node.js 20 from NodeSource, whose apt source is disabled here, so it cannot be fetched).
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "node $(node --version) is too old for playwright-core (needs >= 20): install Node.js 20+" >&2
  exit 1
fi

cargo build --locked --quiet --bin drover
export DROVER_BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug/drover
export CHROMIUM=${CHROMIUM:-$(command -v chromium)}

cd tests/dashboard
# playwright-core would otherwise try to fetch a browser build of its own, which cannot work here.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
npm ci --no-audit --no-fund --loglevel=error
node --test dashboard.test.mjs
