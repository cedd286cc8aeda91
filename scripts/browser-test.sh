#!/usr/bin/env bash
# Builds Herald, starts it on free loopback ports (once anonymous; once with JWT auth, tokens
# minted by `herald token` and an API key; once with the same JWT secret and
# --allowed-origins, whose own page still connects while a page from elsewhere does not; and
# as two cluster nodes sharing a redis-server when one is installed) and runs the
# headless-browser end-to-end test of the demo page (tests/browser/demo.test.mjs) against
# them. The test starts a few servers of its own
# (HERALD_BIN: one it stops, one whose redis-server it kills and restarts).
#
# Needs: cargo, node >= 20 + npm, and Debian's chromium (installed here if missing).
# Exit code: the node test runner's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[browser-test] %s\n' "$*" >&2; }

# --- Chromium (Debian's; Playwright must never download a browser) ----------
if [[ ! -x /usr/bin/chromium ]]; then
  log "installing chromium with apt-get"
  SUDO=""
  if [[ "$(id -u)" -ne 0 ]]; then SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium chromium-driver
fi

# --- node dependencies (playwright-core only) --------------------------------
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
(
  cd tests/browser
  if [[ -f package-lock.json ]]; then
    npm ci --no-audit --no-fund
  else
    npm install --no-audit --no-fund
  fi
)

# --- build the server --------------------------------------------------------
log "building herald"
cargo build --release --bin herald
BIN="$ROOT/target/release/herald"

# --- start servers on free loopback ports: anonymous, with JWT auth, with other origins ---
source scripts/lib.sh

mkdir -p tests/browser/artifacts
SERVER_PIDS=()
SERVER_LOGS=()
cleanup() {
  for pid in "${SERVER_PIDS[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      kill -9 "$pid" 2>/dev/null || true
      wait "$pid" 2>/dev/null || true
    fi
  done
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_server PORT [FLAGS...]: starts herald and waits (at most 20 s) for /healthz.
start_server() {
  local port="$1"; shift
  local url="http://127.0.0.1:$port"
  local log_file="tests/browser/artifacts/herald-$port.log"
  log "starting $BIN --listen 127.0.0.1:$port $* (log: $log_file)"
  "$BIN" --listen "127.0.0.1:$port" "$@" >"$log_file" 2>&1 &
  local pid=$!
  SERVER_PIDS+=("$pid")
  SERVER_LOGS+=("$log_file")
  for _ in $(seq 1 100); do
    if ! kill -0 "$pid" 2>/dev/null; then
      log "herald exited before becoming ready; its log:"
      cat "$log_file" >&2 || true
      exit 1
    fi
    if curl -fsS --max-time 1 "$url/healthz" >/dev/null 2>&1; then
      log "herald is up at $url"
      return 0
    fi
    sleep 0.2
  done
  log "herald did not answer $url/healthz within 20 s; its log:"
  cat "$log_file" >&2 || true
  exit 1
}

PORT="$(free_port)"
URL="http://127.0.0.1:$PORT"
start_server "$PORT"

AUTH_PORT="$(free_port)"
AUTH_URL="http://127.0.0.1:$AUTH_PORT"
JWT_SECRET="browser-test-secret-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
API_KEY="browser-test-key-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export HERALD_JWT_SECRET="$JWT_SECRET"
start_server "$AUTH_PORT" --api-key "$API_KEY"
mint() {
  "$BIN" token --sub "$1" --channels 'news,room:*' --publish 'room:*' --send '*' --ttl 10m
}
TOKEN_ALICE="$(mint alice)"
TOKEN_BOB="$(mint bob)"
ORIGIN_PORT="$(free_port)"
ORIGIN_URL="http://127.0.0.1:$ORIGIN_PORT"
start_server "$ORIGIN_PORT" --allowed-origins https://app.example.com
unset HERALD_JWT_SECRET

# --- two cluster nodes sharing one redis-server (skipped without redis-server) --
CLUSTER_URLS=""
if command -v redis-server >/dev/null 2>&1; then
  REDIS_PORT="$(free_port)"
  log "starting redis-server on 127.0.0.1:$REDIS_PORT"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
    >"tests/browser/artifacts/redis-$REDIS_PORT.log" 2>&1 &
  SERVER_PIDS+=("$!")
  SERVER_LOGS+=("tests/browser/artifacts/redis-$REDIS_PORT.log")
  for _ in 1 2; do
    NODE_PORT="$(free_port)"
    start_server "$NODE_PORT" --redis "redis://127.0.0.1:$REDIS_PORT/"
    CLUSTER_URLS="$CLUSTER_URLS http://127.0.0.1:$NODE_PORT"
  done
else
  log "redis-server not installed: the cluster scenario is skipped"
fi

# --- run the test -------------------------------------------------------------
status=0
(
  cd tests/browser
  HERALD_URL="$URL" HERALD_AUTH_URL="$AUTH_URL" HERALD_TOKEN_ALICE="$TOKEN_ALICE" \
    HERALD_TOKEN_BOB="$TOKEN_BOB" HERALD_AUTH_API_KEY="$API_KEY" HERALD_TEST_JWT_SECRET="$JWT_SECRET" \
    HERALD_ORIGIN_URL="$ORIGIN_URL" HERALD_BIN="$BIN" HERALD_CLUSTER_URLS="${CLUSTER_URLS# }" \
    node --test --test-reporter=spec demo.test.mjs
) || status=$?

if [[ "$status" -ne 0 ]]; then
  log "browser test failed (exit $status); server logs follow, screenshots in tests/browser/artifacts/"
  for log_file in "${SERVER_LOGS[@]}"; do
    tail -n 100 "$log_file" >&2 || true
  done
else
  rm -f "${SERVER_LOGS[@]}"
fi
exit "$status"
