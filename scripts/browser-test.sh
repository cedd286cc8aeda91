#!/usr/bin/env bash
# Builds Herald, starts it on a free loopback port and runs the headless-browser
# end-to-end test of the demo page (tests/browser/demo.test.mjs) against it.
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

# --- start it on a free loopback port ----------------------------------------
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"
URL="http://127.0.0.1:$PORT"
mkdir -p tests/browser/artifacts
SERVER_LOG="tests/browser/artifacts/herald-$PORT.log"

SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting $BIN --listen 127.0.0.1:$PORT (log: $SERVER_LOG)"
"$BIN" --listen "127.0.0.1:$PORT" >"$SERVER_LOG" 2>&1 &
SERVER_PID=$!

# --- wait (at most 20 s) until /healthz answers ------------------------------
ready=0
for _ in $(seq 1 100); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    log "herald exited before becoming ready; its log:"
    cat "$SERVER_LOG" >&2 || true
    exit 1
  fi
  if curl -fsS --max-time 1 "$URL/healthz" >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.2
done
if [[ "$ready" -ne 1 ]]; then
  log "herald did not answer $URL/healthz within 20 s; its log:"
  cat "$SERVER_LOG" >&2 || true
  exit 1
fi
log "herald is up at $URL"

# --- run the test -------------------------------------------------------------
status=0
(
  cd tests/browser
  HERALD_URL="$URL" node --test --test-reporter=spec demo.test.mjs
) || status=$?

if [[ "$status" -ne 0 ]]; then
  log "browser test failed (exit $status); server log follows, screenshots in tests/browser/artifacts/"
  tail -n 100 "$SERVER_LOG" >&2 || true
else
  rm -f "$SERVER_LOG"
fi
exit "$status"
