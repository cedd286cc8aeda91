#!/usr/bin/env bash
# Cluster fan-out against the single-node figure, on one machine:
#   single:  one Herald (in-memory broker), subscribers and publishes on it;
#   cluster: one redis-server and two Herald nodes (--redis), the subscribers spread over both
#            nodes (round-robin), the publishes on node A.
# Same total subscribers, payload and duration in both; each run is bounded (--duration, and
# herald-bench --timeout). Servers (Herald and redis-server) are pinned to CPU 0 and the load
# generator to CPU 1 when the machine has two CPUs, so the cluster gets the same server CPU as
# the single node. Prints the median deliveries/s and p99 over RUNS runs. Every process started
# here is stopped by its PID. Exits non-zero if any message was lost or duplicated (CI runs it
# briefly as a smoke test).
#
# HISTORY_SIZES="100 0" runs both setups once per history size (`--history-size` on every node;
# the first size is the numerator of the ratios), one after the other within each run, so a
# history write's cost per publish shows side by side; the Redis CPU per publish is Redis's CPU
# time over herald-bench's measurement window (herald-bench --server-pid, read from /proc)
# divided by the publishes in it; Redis's own time per script call (INFO commandstats, when
# redis-cli is installed) counts the publishes and the stream read each subscribe makes. The
# default is the server's own default, one size.
#
# PUB_CONNECTIONS and IN_FLIGHT set the publish side (HTTP keep-alive connections, publishes in
# flight in total): with few subscribers the publishes, not the fan-out, are the work.
#
#   scripts/bench-cluster.sh     SUBSCRIBERS=2000 SIZE=64 DURATION=5s RUNS=3 HISTORY_SIZES=100
#                                PUB_CONNECTIONS=4 IN_FLIGHT=16
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUBSCRIBERS="${SUBSCRIBERS:-2000}"
SIZE="${SIZE:-64}"
DURATION="${DURATION:-5s}"
RUNS="${RUNS:-3}"
read -r -a HISTORY_SIZES <<<"${HISTORY_SIZES:-100}"
PUB_CONNECTIONS="${PUB_CONNECTIONS:-4}"
IN_FLIGHT="${IN_FLIGHT:-16}"

command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 1; }
cargo build --release --bin herald --bin herald-bench >/dev/null 2>&1

THREADS=1
if [ "$(nproc)" -ge 2 ]; then
  SERVER_CPU=(taskset -c 0)
  BENCH_CPU=(taskset -c 1)
else
  SERVER_CPU=()
  BENCH_CPU=()
fi

source scripts/lib.sh

PIDS=()
OUT=$(mktemp -d -t herald-cluster.XXXXXX)
stop_all() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
trap 'stop_all; rm -rf "$OUT"' EXIT

# wait_http PORT PATH: until the route answers 200 (bounded).
wait_http() {
  for _ in $(seq 1 200); do
    if { exec 3<>/dev/tcp/127.0.0.1/"$1"; } 2>/dev/null; then
      printf 'GET %s HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n' "$2" >&3
      if head -c 12 <&3 | grep -q ' 200'; then exec 3>&-; return 0; fi
      exec 3>&-
    fi
    sleep 0.05
  done
  echo "no 200 from 127.0.0.1:$1$2" >&2; return 1
}

herald() {
  "${SERVER_CPU[@]}" target/release/herald --shards 1 --client-publish-rate 0 "$@" >>"$OUT/herald.log" 2>&1 &
  PIDS+=($!)
}

# bench NAME PID PUB_PORT SUB_PORT...: one fanout run, JSON to $OUT/NAME.json; PID is the process
# whose CPU herald-bench reads over the measurement (the node, or redis-server).
bench() {
  local name=$1 pid=$2 pub=$3
  shift 3
  local subs=()
  for port in "$@"; do subs+=(--sub-url "ws://127.0.0.1:$port/ws?channels=bench"); done
  "${BENCH_CPU[@]}" target/release/herald-bench --threads "$THREADS" --json --quiet --timeout 90s \
    --server-pid "$pid" \
    fanout --subscribers "$SUBSCRIBERS" --size "$SIZE" --messages 2000000 --duration "$DURATION" \
    --pub-connections "$PUB_CONNECTIONS" --in-flight "$IN_FLIGHT" --pub-url "http://127.0.0.1:$pub/api/publish/bench" "${subs[@]}" >"$OUT/$name.json"
}

for run in $(seq 1 "$RUNS"); do
  for history in "${HISTORY_SIZES[@]}"; do
    P=$(free_port)
    herald --listen "127.0.0.1:$P" --history-size "$history"
    wait_http "$P" /healthz
    bench "single-$history-$run" "${PIDS[0]}" "$P" "$P"
    stop_all

    R=$(free_port)
    "${SERVER_CPU[@]}" redis-server --port "$R" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
    PIDS+=($!)
    A=$(free_port)
    B=$(free_port)
    herald --listen "127.0.0.1:$A" --redis "redis://127.0.0.1:$R/" --history-size "$history"
    herald --listen "127.0.0.1:$B" --redis "redis://127.0.0.1:$R/" --history-size "$history"
    wait_http "$A" /readyz
    wait_http "$B" /readyz
    bench "cluster-$history-$run" "${PIDS[0]}" "$A" "$A" "$B"
    # Redis's own account of the scripts it ran (the publishes, and one stream read per
    # subscriber as it subscribes): calls and microseconds per call.
    if command -v redis-cli >/dev/null; then
      redis-cli -p "$R" info commandstats | tr -d '\r' | grep '^cmdstat_evalsha:' >"$OUT/cluster-$history-$run.evalsha" || true
    fi
    stop_all
  done
  echo "run $run of $RUNS done" >&2
done

python3 - "$OUT" "$RUNS" "$SUBSCRIBERS" "$SIZE" "$DURATION" "$PUB_CONNECTIONS" "$IN_FLIGHT" "${HISTORY_SIZES[@]}" <<'PY'
import json, statistics, sys
out, runs, subs, size, duration, pub_connections, in_flight = sys.argv[1], int(sys.argv[2]), *sys.argv[3:8]
sizes = sys.argv[8:]
rows = {}
for history in sizes:
    for kind in ("single", "cluster"):
        results = [json.load(open(f"{out}/{kind}-{history}-{run}.json")) for run in range(1, runs + 1)]
        each = ", ".join(f"{r['deliveries_per_s']/1e6:.2f}M/s p99 {r['latency_ms']['p99']:.1f} ms" for r in results)
        print(f"{kind} history {history} runs: {each}")
        # In the cluster, herald-bench read redis-server's CPU: per publish measured.
        cpu = [r["server_cpu_s"] / r["published"] * 1e6 for r in results if kind == "cluster" and r.get("server_cpu_s") is not None and r["published"]]
        script = []
        for run in range(1, runs + 1):
            try:
                stats = dict(kv.split("=") for kv in open(f"{out}/{kind}-{history}-{run}.evalsha").read().strip().split(":", 1)[1].split(","))
                script.append(float(stats["usec_per_call"]))
            except (OSError, IndexError, KeyError, ValueError):
                pass
        rows[kind, history] = (
            statistics.median(r["deliveries_per_s"] for r in results),
            statistics.median(r["publishes_per_s"] for r in results),
            statistics.median(r["latency_ms"]["p99"] for r in results),
            statistics.median(cpu) if cpu else None,
            statistics.median(script) if script else None,
            sum(r["lost"] for r in results),
            sum(r["duplicates"] for r in results),
        )
print(f"fanout: {subs} subscribers, {size} B, {duration}, {pub_connections} publish connections, {in_flight} in flight, median of {runs} runs")
print("| setup | --history-size | deliveries/s | publishes/s | p99 ms | Redis CPU us per publish | Redis us per script call | lost | duplicates |")
print("|---|---|---|---|---|---|---|---|---|")
for history in sizes:
    for kind, label in (("single", "1 node (in-memory broker)"), ("cluster", "2 nodes + Redis, subscribers split")):
        rate, pubs, p99, cpu, script, lost, dup = rows[kind, history]
        redis = "–" if cpu is None else f"{cpu:.1f}"
        call = "–" if script is None else f"{script:.2f}"
        print(f"| {label} | {history} | {rate/1e6:.2f}M/s | {pubs/1e3:.1f}k/s | {p99:.1f} | {redis} | {call} | {lost} | {dup} |")
for history in sizes:
    c, s1 = rows["cluster", history], rows["single", history]
    print(f"cluster / single (history {history}): deliveries/s {c[0]/s1[0]:.2f}, p99 {c[2]/s1[2]:.2f}")
if len(sizes) > 1:
    a, b = sizes[0], sizes[-1]
    for kind in ("single", "cluster"):
        x, y = rows[kind, a], rows[kind, b]
        redis = f", Redis CPU per publish {x[3]/y[3]:.2f}" if x[3] and y[3] else ""
        redis += f", Redis us per script call {x[4]/y[4]:.2f}" if x[4] and y[4] else ""
        print(f"{kind}, history {a} / history {b}: deliveries/s {x[0]/y[0]:.2f}, publishes/s {x[1]/y[1]:.2f}, p99 {x[2]/y[2]:.2f}{redis}")
if any(row[5] or row[6] for row in rows.values()):
    sys.exit("FAIL: messages were lost or duplicated")
PY
