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
#   scripts/bench-cluster.sh                 SUBSCRIBERS=2000 SIZE=64 DURATION=5s RUNS=3
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SUBSCRIBERS="${SUBSCRIBERS:-2000}"
SIZE="${SIZE:-64}"
DURATION="${DURATION:-5s}"
RUNS="${RUNS:-3}"

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

# bench NAME PUB_PORT SUB_PORT...: one fanout run, JSON to $OUT/NAME.json.
bench() {
  local name=$1 pub=$2
  shift 2
  local subs=()
  for port in "$@"; do subs+=(--sub-url "ws://127.0.0.1:$port/ws?channels=bench"); done
  "${BENCH_CPU[@]}" target/release/herald-bench --threads "$THREADS" --json --quiet --timeout 90s \
    fanout --subscribers "$SUBSCRIBERS" --size "$SIZE" --messages 2000000 --duration "$DURATION" \
    --pub-url "http://127.0.0.1:$pub/api/publish/bench" "${subs[@]}" >"$OUT/$name.json"
}

for run in $(seq 1 "$RUNS"); do
  P=$(free_port)
  herald --listen "127.0.0.1:$P"
  wait_http "$P" /healthz
  bench "single-$run" "$P" "$P"
  stop_all

  R=$(free_port)
  "${SERVER_CPU[@]}" redis-server --port "$R" --bind 127.0.0.1 --save '' --appendonly no >"$OUT/redis.log" 2>&1 &
  PIDS+=($!)
  A=$(free_port)
  B=$(free_port)
  herald --listen "127.0.0.1:$A" --redis "redis://127.0.0.1:$R/"
  herald --listen "127.0.0.1:$B" --redis "redis://127.0.0.1:$R/"
  wait_http "$A" /readyz
  wait_http "$B" /readyz
  bench "cluster-$run" "$A" "$A" "$B"
  stop_all
  echo "run $run of $RUNS done" >&2
done

python3 - "$OUT" "$RUNS" "$SUBSCRIBERS" "$SIZE" "$DURATION" <<'PY'
import json, statistics, sys
out, runs, subs, size, duration = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
rows = {}
for kind in ("single", "cluster"):
    results = [json.load(open(f"{out}/{kind}-{run}.json")) for run in range(1, runs + 1)]
    each = ", ".join(f"{r['deliveries_per_s']/1e6:.2f}M/s p99 {r['latency_ms']['p99']:.1f} ms" for r in results)
    print(f"{kind} runs: {each}")
    rows[kind] = (
        statistics.median(r["deliveries_per_s"] for r in results),
        statistics.median(r["latency_ms"]["p99"] for r in results),
        sum(r["lost"] for r in results),
        sum(r["duplicates"] for r in results),
    )
print(f"fanout: {subs} subscribers, {size} B, {duration}, median of {runs} runs")
print("| setup | deliveries/s | p99 ms | lost | duplicates |")
print("|---|---|---|---|---|")
for kind, label in (("single", "1 node (in-memory broker)"), ("cluster", "2 nodes + Redis, subscribers split")):
    rate, p99, lost, dup = rows[kind]
    print(f"| {label} | {rate/1e6:.2f}M/s | {p99:.1f} | {lost} | {dup} |")
print(f"cluster / single: deliveries/s {rows['cluster'][0]/rows['single'][0]:.2f}, p99 {rows['cluster'][1]/rows['single'][1]:.2f}")
if any(row[2] or row[3] for row in rows.values()):
    sys.exit("FAIL: messages were lost or duplicated")
PY
