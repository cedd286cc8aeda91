#!/usr/bin/env bash
# Side-by-side comparison of Herald with the peers in shared/peers (bun-uws, fastapi-seed, node-ws, nchan,
# axum-broadcast), measured by herald-bench. Each server is started fresh for every run, pinned to
# CPU $SERVER_CPU; herald-bench runs pinned to CPU $BENCH_CPU with one thread. Within a scenario
# the servers take turns run by run (run 1 of every server, then run 2, ...), so that a change in
# the machine's load lands on all of them rather than on one.
#
# usage: scripts/bench-peers.sh [SERVER ...]      (default: herald bun-uws axum-broadcast node-ws nchan fastapi-seed)
# env:   RUNS=3                 runs per cell (the table shows the median); RUNS=1 for a quick pass
#        SCENARIOS="..."        subset of: fanout-1k-64 fanout-1k-1k fanout-10k-64 fanout-10k-1k
#                               idle-10k idle-15k slow-10of1k echo-50 echo-1000 handshakes
#                               (idle-15k runs for herald only; echo-* and handshakes for servers
#                               with an echo URL; echo-1000 is not in the default list)
#        DURATION=8s            publishing time per fan-out run (closed loop, 4 HTTP keep-alive
#                               connections, 16 publishes in flight)
#        PEERS_DIR=...          where the peers are (default: ../shared/peers or /work/shared/peers);
#                               they are copied to target/bench/peers, where installs are cached
#        SERVER_CPU=0 BENCH_CPU=1
# Output: one JSON line per run appended to target/bench/results.jsonl (each herald-bench JSON
# object plus run_id, server, scenario, run) and a markdown table on stdout.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=${RUNS:-3}
DURATION=${DURATION:-8s}
SCENARIOS=${SCENARIOS:-"fanout-1k-64 fanout-1k-1k fanout-10k-64 fanout-10k-1k idle-10k idle-15k slow-10of1k echo-50 handshakes"}
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}
OUT_DIR=$ROOT/target/bench
OUT=$OUT_DIR/results.jsonl
LOG_DIR=$OUT_DIR/logs
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)-$$
if [ "$#" -gt 0 ]; then SERVERS=("$@"); else SERVERS=(herald bun-uws axum-broadcast node-ws nchan fastapi-seed); fi
if [ -z "${PEERS_DIR:-}" ]; then
  for candidate in "$ROOT/../shared/peers" /work/shared/peers; do
    [ -d "$candidate" ] && PEERS_DIR=$candidate && break
  done
fi
mkdir -p "$OUT_DIR" "$LOG_DIR"

cargo build --release --bin herald --bin herald-bench >&2

# A writable copy of the peers, so installs (venv, node_modules, cargo target) are cached here.
if [ -n "${PEERS_DIR:-}" ]; then
  mkdir -p "$OUT_DIR/peers"
  cp -R "$PEERS_DIR/." "$OUT_DIR/peers/"
  chmod -R u+w "$OUT_DIR/peers"
  PEERS=$OUT_DIR/peers
fi

SERVER_PID=
stop_server() {
  local pid=${SERVER_PID:-}
  SERVER_PID=
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
trap stop_server EXIT

source scripts/lib.sh

# start_server NAME PORT: sets SERVER_PID, SUB_URL, PUB_URL.
start_server() {
  local name=$1 port=$2
  if [ "$name" = herald ]; then
    taskset -c "$SERVER_CPU" target/release/herald --listen "127.0.0.1:$port" --shards 1 --client-publish-rate 0 \
      >"$LOG_DIR/herald-$port.log" 2>&1 &
    SERVER_PID=$!
    wait_port "$port" "$SERVER_PID" "$LOG_DIR/herald-$port.log"
    SUB_URL="ws://127.0.0.1:$port/ws?channels=bench"
    PUB_URL="http://127.0.0.1:$port/api/publish/bench"
    ECHO_URL="ws://127.0.0.1:$port/echo"
  else
    [ -n "${PEERS:-}" ] && [ -x "$PEERS/$name/start.sh" ] || { echo "no peer $name" >&2; return 1; }
    SERVER_PID=$(SERVER_CPU=$SERVER_CPU LOG_DIR=$LOG_DIR "$PEERS/$name/start.sh" "$port" | tail -n 1)
    # shellcheck disable=SC1090
    (. "$PEERS/$name/peer.env"; echo "$SUB_URL"; echo "$PUB_URL"; echo "${ECHO_URL:-}") >"$LOG_DIR/urls"
    SUB_URL=$(sed -n 1p "$LOG_DIR/urls" | sed "s/{port}/$port/")
    PUB_URL=$(sed -n 2p "$LOG_DIR/urls" | sed "s/{port}/$port/")
    ECHO_URL=$(sed -n 3p "$LOG_DIR/urls" | sed "s/{port}/$port/")
  fi
}

scenario_args() {
  case $1 in
    fanout-1k-64) echo "fanout --subscribers 1000 --size 64 --messages 200000 --duration $DURATION" ;;
    fanout-1k-1k) echo "fanout --subscribers 1000 --size 1024 --messages 200000 --duration $DURATION" ;;
    fanout-10k-64) echo "fanout --subscribers 10000 --size 64 --messages 20000 --duration $DURATION" ;;
    fanout-10k-1k) echo "fanout --subscribers 10000 --size 1024 --messages 20000 --duration $DURATION" ;;
    slow-10of1k) echo "slow --subscribers 1000 --slow 10 --size 64 --messages 200000 --duration $DURATION" ;;
    idle-10k) echo "idle --connections 10000 --settle 3s" ;;
    idle-15k) echo "idle --connections 15000 --settle 3s" ;;
    echo-50) echo "echo --connections 50 --size 64 --duration $DURATION" ;;
    echo-1000) echo "echo --connections 1000 --size 64 --duration $DURATION" ;;
    handshakes) echo "handshakes --count 20000 --concurrency 64" ;;
    *) echo "unknown scenario $1" >&2; return 1 ;;
  esac
}

for scenario in $SCENARIOS; do
  read -r -a args <<<"$(scenario_args "$scenario")"
  for run in $(seq 1 "$RUNS"); do
    for server in "${SERVERS[@]}"; do
      [ "$scenario" = idle-15k ] && [ "$server" != herald ] && continue
      port=$(free_port)
      if ! start_server "$server" "$port"; then
        echo "{\"run_id\":\"$RUN_ID\",\"server\":\"$server\",\"scenario\":\"$scenario\",\"run\":$run,\"error\":\"server did not start\"}" >>"$OUT"
        continue
      fi
      if [ "${args[0]}" = idle ]; then
        urls=(--url "$SUB_URL")
      elif [ "${args[0]}" = echo ] || [ "${args[0]}" = handshakes ]; then
        if [ -z "$ECHO_URL" ]; then stop_server; continue; fi
        urls=(--url "$ECHO_URL")
      else
        urls=(--sub-url "$SUB_URL" --pub-url "$PUB_URL" --pub-connections 4 --in-flight 16)
      fi
      echo "== $server $scenario run $run/$RUNS (port $port, pid $SERVER_PID)" >&2
      result=$(taskset -c "$BENCH_CPU" target/release/herald-bench --threads 1 --json --quiet \
        --timeout 240s --server-pid "$SERVER_PID" "${args[@]}" "${urls[@]}" 2>"$LOG_DIR/bench-stderr.txt") || true
      alive=true
      kill -0 "$SERVER_PID" 2>/dev/null || alive=false
      stop_server
      python3 - "$RUN_ID" "$server" "$scenario" "$run" "$alive" "$result" "$LOG_DIR/bench-stderr.txt" >>"$OUT" <<'PY'
import json, sys
run_id, server, scenario, run, alive, text, err = sys.argv[1:8]
try:
    r = json.loads(text)
except ValueError:
    r = {"error": "no JSON from herald-bench: " + open(err).read()[-400:]}
r.update(run_id=run_id, server=server, scenario=scenario, run=int(run), server_alive_after=alive == "true")
r["pinning"] = "server taskset CPU0" + (" (herald --shards 1; 1 tokio worker by affinity)" if server == "herald" else "") + ", herald-bench taskset CPU1 --threads 1"
print(json.dumps(r))
PY
      tail -n 1 "$OUT" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
keys = ["deliveries_per_s", "lost", "connections_failed", "bytes_per_connection", "slow_dropped", "bench_cpu_pct", "server_cpu_pct", "cpu_busy_pct", "stalled", "error"]
print("   ", {k: r[k] for k in keys if k in r}, "p99", r.get("latency_ms", {}).get("p99"))' >&2
    done
  done
done

python3 - "$OUT" "$RUN_ID" "$BENCH_CPU" "$SERVER_CPU" <<'PY'
import json, statistics, sys
path, run_id, bench_cpu, server_cpu = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rows = [json.loads(l) for l in open(path) if l.strip()]
rows = [r for r in rows if r.get("run_id") == run_id]
servers = list(dict.fromkeys(r["server"] for r in rows))
def cell(server, scenario, get):
    vals = [get(r) for r in rows if r["server"] == server and r["scenario"] == scenario and "error" not in r]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None
def bench_max(server, scenario):
    v = [r.get("bench_cpu_pct", 0) for r in rows if r["server"] == server and r["scenario"] == scenario]
    return max(v) if v else 0
def core_max(server, scenario, cpu):
    v = [(r.get("cpu_busy_pct") or [0] * (cpu + 1))[cpu] for r in rows if r["server"] == server and r["scenario"] == scenario]
    return max(v) if v else 0
def fmt_rate(v):
    if v is None: return "–"
    return f"{v/1e6:.2f}M/s" if v >= 1e6 else f"{v/1e3:.0f}k/s"
def star(server, scenario):
    return "*" if max(bench_max(server, scenario), core_max(server, scenario, bench_cpu)) >= 90 else ""
cols = [
    ("N=1k S=64", "fanout-1k-64", lambda r: r.get("deliveries_per_s"), fmt_rate, True),
    ("N=1k S=1 KiB", "fanout-1k-1k", lambda r: r.get("deliveries_per_s"), fmt_rate, True),
    ("N=10k S=64", "fanout-10k-64", lambda r: r.get("deliveries_per_s"), fmt_rate, True),
    ("N=10k S=1 KiB", "fanout-10k-1k", lambda r: r.get("deliveries_per_s"), fmt_rate, True),
    ("p99 ms N=10k S=64", "fanout-10k-64", lambda r: r.get("latency_ms", {}).get("p99"), lambda v: "–" if v is None else f"{v:.1f}", False),
    ("server CPU-s per M deliveries (1k/64)", "fanout-1k-64", lambda r: r.get("server_cpu_s_per_million_deliveries"), lambda v: "–" if v is None else f"{v:.3f}", False),
    ("server CPU-s per M deliveries (10k/64)", "fanout-10k-64", lambda r: r.get("server_cpu_s_per_million_deliveries"), lambda v: "–" if v is None else f"{v:.3f}", False),
    ("idle bytes/conn (10k)", "idle-10k", lambda r: r.get("bytes_per_connection"), lambda v: "–" if v is None else f"{v/1000:.1f} KB", False),
    ("idle bytes/conn (15k)", "idle-15k", lambda r: r.get("bytes_per_connection"), lambda v: "–" if v is None else f"{v/1000:.1f} KB", False),
    ("slow 10/1000: rest", "slow-10of1k", lambda r: r.get("deliveries_per_s"), fmt_rate, True),
    ("echo round trips/s (50 conns, 64 B)", "echo-50", lambda r: r.get("round_trips_per_s"), fmt_rate, True),
    ("echo round trips/s (1000 conns, 64 B)", "echo-1000", lambda r: r.get("round_trips_per_s"), fmt_rate, True),
    ("server CPU-s per M round trips (50 conns)", "echo-50", lambda r: r.get("server_cpu_s_per_million_round_trips"), lambda v: "–" if v is None else f"{v:.2f}", False),
    ("handshakes/s", "handshakes", lambda r: r.get("handshakes_per_s"), fmt_rate, True),
    ("server CPU-ms per 1000 handshakes", "handshakes", lambda r: r.get("server_cpu_ms_per_thousand_handshakes"), lambda v: "–" if v is None else f"{v:.1f}", False),
]
print(f"\n### herald-bench results (run {run_id}, median of up to {max([r['run'] for r in rows] or [0])} runs)\n")
print("| server | " + " | ".join(c[0] for c in cols) + " | slow: dropped / RSS growth | lost (all runs) |")
print("|---|" + "---|" * (len(cols) + 2))
for s in servers:
    cells = []
    for name, scen, get, fmt, can_star in cols:
        v = cell(s, scen, get)
        cells.append(fmt(v) + (star(s, scen) if can_star and v is not None else ""))
    dropped = cell(s, "slow-10of1k", lambda r: r.get("slow_dropped"))
    growth = cell(s, "slow-10of1k", lambda r: r.get("server_rss_growth"))
    slow = "–" if dropped is None else f"{dropped:.0f} / {(growth or 0)/1e6:+.1f} MB"
    lost = sum(r.get("lost", 0) for r in rows if r["server"] == s)
    errors = sum(1 for r in rows if r["server"] == s and "error" in r)
    cells.append(slow)
    cells.append(f"{lost}" + (f" ({errors} failed runs)" if errors else ""))
    print(f"| {s} | " + " | ".join(cells) + " |")
print("\n\\* herald-bench's core (CPU %d, counting every process and kernel softirq work) was >= 90%% busy in that cell: the figure may be a lower bound for the server." % bench_cpu)
if "herald" in servers:
    print("\n#### herald / peer ratios (throughput: > 1 means herald delivers more; p99, CPU-s, bytes: < 1 means herald needs less)\n")
    print("| peer | " + " | ".join(c[0] for c in cols if c[1] != "idle-15k") + " |")
    print("|---|" + "---|" * len([c for c in cols if c[1] != "idle-15k"]))
    for s in servers:
        if s == "herald": continue
        cells = []
        for name, scen, get, fmt, _ in cols:
            if scen == "idle-15k": continue
            h, p = cell("herald", scen, get), cell(s, scen, get)
            cells.append(f"{h/p:.2f}" if h is not None and p not in (None, 0) else "–")
        print(f"| {s} | " + " | ".join(cells) + " |")
bench = {(r["server"], r["scenario"]): r.get("bench_cpu_pct") for r in rows}
print("\nper cell, max over runs: herald-bench's own CPU %% / its core busy %% (CPU %d) / server core busy %% (CPU %d) / server's own CPU %%:" % (bench_cpu, server_cpu))
for s in servers:
    parts = []
    for sc in dict.fromkeys(r["scenario"] for r in rows if r["server"] == s):
        if sc.startswith("idle"): continue
        srv = max([r.get("server_cpu_pct", 0) for r in rows if r["server"] == s and r["scenario"] == sc] or [0])
        parts.append(f"{sc} {bench_max(s, sc):.0f}/{core_max(s, sc, bench_cpu):.0f}/{core_max(s, sc, server_cpu):.0f}/{srv:.0f}")
    print(f"- {s}: " + ", ".join(parts))
PY
