#!/usr/bin/env bash
# Idle-memory regression check: what an idle connection costs Herald's server in resident memory,
# against a budget, so that the figure never creeps back up unnoticed. CI runs it.
#
# For each transport (a WebSocket subscribed to one channel, and a Server-Sent Events stream of
# one channel), $RUNS times: a fresh release server, `herald-bench idle` holding $CONNECTIONS
# connections, and the server's RSS growth divided by the connections held (herald-bench reads
# /proc/PID/status before connecting and after settling). The median must stay within the
# budget: the figure measured when the budget was set, plus $TOLERANCE percent.
#
# Memory, unlike time, does not depend on the machine's speed or load: the same build measured
# within 3% run to run. What can move it is the allocator and the kernel's page accounting,
# which is why the budget has a tolerance and is stated next to the measurement it came from.
#
#   scripts/idle-guard.sh         env: RUNS=3 CONNECTIONS=5000 TOLERANCE=10
#                                      (WS_MEASURED, SSE_MEASURED override the figures below)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Bytes per idle connection at 5000 connections, release build of main at 4de9407, measured
# 2026-12-01 with this script (medians of 3; see BENCHMARKS.md "Idle memory regression check").
# Lower them when a change saves memory, so that the saving is kept.
WS_MEASURED=${WS_MEASURED:-1600}
SSE_MEASURED=${SSE_MEASURED:-17150}

RUNS=${RUNS:-3}
CONNECTIONS=${CONNECTIONS:-5000}
TOLERANCE=${TOLERANCE:-10}

cargo build --release --bin herald --bin herald-bench

source scripts/lib.sh

SERVER=
stop_server() {
  local pid=${SERVER:-}
  SERVER=
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
trap stop_server EXIT

# measure PATH: prints the bytes per idle connection of one fresh server, held over PATH.
measure() {
  local path=$1 port log scheme
  port=$(free_port)
  log=$(mktemp -t herald-idle.XXXXXX.log)
  target/release/herald --listen "127.0.0.1:$port" --max-connections $((CONNECTIONS + 100)) >"$log" 2>&1 &
  SERVER=$!
  wait_port "$port" "$SERVER" "$log"
  scheme=ws
  [[ $path == /sse* ]] && scheme=http
  target/release/herald-bench --json --quiet --timeout 120s --server-pid "$SERVER" \
    idle --connections "$CONNECTIONS" --settle 2s --url "$scheme://127.0.0.1:$port$path" |
    python3 -c '
import json, sys
r = json.load(sys.stdin)
held = r.get("open_at_measurement", 0)
if r.get("connections_failed") or held != r["connections"] or "bytes_per_connection" not in r:
    sys.exit("idle run did not hold every connection: " + json.dumps(r))
print(r["bytes_per_connection"])'
  stop_server
  rm -f "$log"
}

failures=0
# check NAME PATH MEASURED
check() {
  local name=$1 path=$2 measured=$3 values=() run
  for run in $(seq 1 "$RUNS"); do
    values+=("$(measure "$path")")
  done
  if python3 - "$name" "$measured" "$TOLERANCE" "${values[@]}" <<'PY'
import statistics, sys
name, measured, tolerance = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
values = [float(v) for v in sys.argv[4:]]
median = statistics.median(values)
budget = measured * (1 + tolerance / 100)
ok = median <= budget
print(f"{'ok  ' if ok else 'FAIL'} {name}: {median:.0f} bytes per idle connection (runs {', '.join(f'{v:.0f}' for v in values)}); "
      f"budget {budget:.0f} = measured {measured:.0f} + {tolerance:.0f}%")
sys.exit(0 if ok else 1)
PY
  then :
  else failures=$((failures + 1))
  fi
}

check websocket "/ws?channels=idle" "$WS_MEASURED"
check sse "/sse?channels=idle" "$SSE_MEASURED"
[ "$failures" -eq 0 ] || { echo "idle memory grew past its budget: see BENCHMARKS.md"; exit 1; }
echo "idle memory within budget"
