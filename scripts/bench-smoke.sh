#!/usr/bin/env bash
# Smoke test of herald-bench against a real Herald: builds release, starts target/release/herald on
# a free loopback port, runs every mode briefly with --json, checks each output parses (and that
# fan-out lost nothing, and that a reconnect storm recovered every client without loss), and
# stops the server by its PID. No timing assertions. CI calls this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --bin herald --bin herald-bench
started=$SECONDS

source scripts/lib.sh

PORT=$(free_port)
LOG=$(mktemp -t herald-smoke.XXXXXX.log)
OUT=$(mktemp -d -t herald-smoke.XXXXXX)
# The publisher WebSocket of the fanout-ws check is a load generator, not a chat client: lift
# the per-connection publish rate limit (50/s by default) for this server.
target/release/herald --listen "127.0.0.1:$PORT" --client-publish-rate 0 >"$LOG" 2>&1 &
SERVER=$!
cleanup() {
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  rm -rf "$OUT"
}
trap cleanup EXIT
wait_port "$PORT" "$SERVER" "$LOG"

H=127.0.0.1:$PORT
BENCH=(target/release/herald-bench --json --quiet --timeout 40s --server-pid "$SERVER")
failures=0

# run NAME CHECK ARGS... : runs one mode, checks its JSON with the python expression CHECK (on r).
run() {
  local name=$1 check=$2
  shift 2
  local t0=$SECONDS
  if ! "${BENCH[@]}" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"; then
    echo "FAIL $name: herald-bench exited non-zero"; cat "$OUT/$name.err"; failures=$((failures + 1)); return
  fi
  if python3 - "$OUT/$name.json" "$check" <<'PY'
import json, sys
with open(sys.argv[1]) as f:
    text = f.read()
r = json.loads(text)
ok = eval(sys.argv[2], {}, {"r": r})
print(("ok   " if ok else "FAIL ") + text.strip()[:600])
sys.exit(0 if ok else 1)
PY
  then echo "     ^ $name ($((SECONDS - t0)) s)"
  else echo "     ^ FAIL $name: check failed: $check"; failures=$((failures + 1))
  fi
}

run fanout-http "r['lost'] == 0 and r['deliveries'] == r['expected_deliveries'] == 100 * 200 and r['connections_failed'] == 0" \
  fanout --subscribers 100 --messages 200 --size 64 \
  --sub-url "ws://$H/ws?channels=bench" --pub-url "http://$H/api/publish/bench"
run fanout-ws "r['lost'] == 0 and r['deliveries'] == r['expected_deliveries'] == 100 * 200" \
  fanout --subscribers 100 --messages 200 --size 1024 --sub-url "ws://$H/ws?channels=benchws" \
  --pub-ws-url "ws://$H/ws" --pub-ws-template '{"type":"publish","channel":"benchws","data":"{payload}"}'
run fanout-open "r['lost'] == 0 and r['deliveries'] == 50 * 400" \
  fanout --subscribers 50 --messages 400 --rate 2000 \
  --sub-url "ws://$H/ws?channels=open" --pub-url "http://$H/api/publish/open"
run idle "r['connected'] == 200 and 'bytes_per_connection' in r" \
  idle --connections 200 --settle 1s --url "ws://$H/ws?channels=idle"
run slow "r['slow_connected'] == 2 and r['connected'] == 50 and 'slow_dropped' in r" \
  slow --subscribers 50 --slow 2 --messages 2000 \
  --sub-url "ws://$H/ws?channels=slow" --pub-url "http://$H/api/publish/slow"
run echo "r['round_trips'] > 0 and r['connections_failed'] == 0" \
  echo --connections 20 --duration 2s --url "ws://$H/echo"
run handshakes "r['completed'] == 500" \
  handshakes --count 500 --concurrency 32 --url "ws://$H/ws"
# 200 clients drop at once and come back with ?since=: every one recovered (the history holds
# 100 messages, some 0.5 s of publishing at this rate), nothing lost, duplicated or reordered.
run storm "r['connected'] == r['recovered'] == 200 and r['lost'] == 0 and r['duplicates'] == 0 and r['out_of_order'] == 0 and r['caught_up_to_last'] == 200 and r['deliveries'] == r['expected_deliveries'] > 0" \
  storm --clients 200 --rate 200 --before 1s --after 1s --channel storm \
  --url "ws://$H/ws" --pub-url "http://$H/api/publish/storm"

kill -0 "$SERVER" 2>/dev/null || { echo "FAIL: herald died during the smoke test"; cat "$LOG"; failures=$((failures + 1)); }
echo "bench smoke: $((8 - failures)) passed, $failures failed ($((SECONDS - started)) s after the build)"
[ "$failures" -eq 0 ]
