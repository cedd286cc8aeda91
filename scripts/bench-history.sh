#!/usr/bin/env bash
# Channel history on vs off, side by side in one run: for every run and scenario, Herald with
# each of $HISTORY (default `--history-size 100` and `--history-size 0`), started fresh, pinned
# to CPU $SERVER_CPU (`--shards 1`), measured by herald-bench pinned to CPU $BENCH_CPU with one
# thread; the order of the two alternates from run to run. Every run is bounded (--duration or
# the storm's phases, and herald-bench --timeout); every server is stopped by its PID.
#
#   scripts/bench-history.sh            RUNS=3 DURATION=5s SCENARIOS="fanout-10k-64 fanout-1k-1k storm-5k"
# env:   SCENARIOS   subset of: fanout-10k-64 fanout-1k-1k storm-5k storm-5k-fast storm-200
#                    (fan-out: closed loop, 4 HTTP keep-alive connections, 16 publishes in
#                    flight, as in bench-peers.sh; storm-5k: 5000 clients, 100 publishes/s, the
#                    drop 2 s in and 3 s more of publishing; storm-5k-fast: the same at 500/s,
#                    past what 100 messages of history cover while 5000 clients reconnect)
#        HISTORY="100 0"  history sizes to compare (the first is the numerator of the ratio)
#        SERVER_CPU=0 BENCH_CPU=1
# Output: one JSON line per run appended to target/bench/history.jsonl (herald-bench's object
# plus run_id, history, scenario, run) and markdown tables of the medians on stdout.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

RUNS=${RUNS:-3}
DURATION=${DURATION:-5s}
SCENARIOS=${SCENARIOS:-"fanout-10k-64 fanout-1k-1k storm-5k"}
read -r -a SIZES <<<"${HISTORY:-100 0}"
SERVER_CPU=${SERVER_CPU:-0}
BENCH_CPU=${BENCH_CPU:-1}
OUT_DIR=$ROOT/target/bench
OUT=$OUT_DIR/history.jsonl
LOG_DIR=$OUT_DIR/logs
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)-$$
mkdir -p "$OUT_DIR" "$LOG_DIR"

cargo build --release --bin herald --bin herald-bench >&2

source scripts/lib.sh

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

scenario_args() {
  local h=$1
  case $2 in
    fanout-10k-64) echo "fanout --subscribers 10000 --size 64 --messages 20000 --duration $DURATION --sub-url ws://$h/ws?channels=bench --pub-url http://$h/api/publish/bench --pub-connections 4 --in-flight 16" ;;
    fanout-1k-1k) echo "fanout --subscribers 1000 --size 1024 --messages 200000 --duration $DURATION --sub-url ws://$h/ws?channels=bench --pub-url http://$h/api/publish/bench --pub-connections 4 --in-flight 16" ;;
    storm-5k) echo "storm --clients 5000 --rate 100 --before 2s --after 3s --url ws://$h/ws --pub-url http://$h/api/publish/storm" ;;
    storm-5k-fast) echo "storm --clients 5000 --rate 500 --before 2s --after 3s --url ws://$h/ws --pub-url http://$h/api/publish/storm" ;;
    storm-200) echo "storm --clients 200 --rate 200 --before 1s --after 1s --url ws://$h/ws --pub-url http://$h/api/publish/storm" ;;
    *) echo "unknown scenario $2" >&2; return 1 ;;
  esac
}

for run in $(seq 1 "$RUNS"); do
  # Alternate which history size goes first, so that neither always runs on a warmer machine.
  order=("${SIZES[@]}")
  if [ $((run % 2)) -eq 0 ]; then
    order=()
    for ((k = ${#SIZES[@]} - 1; k >= 0; k--)); do order+=("${SIZES[k]}"); done
  fi
  for scenario in $SCENARIOS; do
    for size in "${order[@]}"; do
      port=$(free_port)
      log=$LOG_DIR/herald-history-$size-$port.log
      taskset -c "$SERVER_CPU" target/release/herald --listen "127.0.0.1:$port" --shards 1 \
        --client-publish-rate 0 --history-size "$size" >"$log" 2>&1 &
      SERVER_PID=$!
      wait_port "$port" "$SERVER_PID" "$log"
      read -r -a args <<<"$(scenario_args "127.0.0.1:$port" "$scenario")"
      echo "== history $size $scenario run $run/$RUNS (port $port, pid $SERVER_PID)" >&2
      result=$(taskset -c "$BENCH_CPU" target/release/herald-bench --threads 1 --json --quiet \
        --timeout 120s --server-pid "$SERVER_PID" "${args[@]}" 2>"$LOG_DIR/bench-stderr.txt") || true
      stop_server
      python3 - "$RUN_ID" "$size" "$scenario" "$run" "$result" "$LOG_DIR/bench-stderr.txt" >>"$OUT" <<'PY'
import json, sys
run_id, size, scenario, run, text, err = sys.argv[1:7]
try:
    r = json.loads(text)
except ValueError:
    r = {"error": "no JSON from herald-bench: " + open(err).read()[-400:]}
r.update(run_id=run_id, history=int(size), scenario=scenario, run=int(run))
print(json.dumps(r))
PY
      tail -n 1 "$OUT" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
keys = ["deliveries_per_s", "lost", "duplicates", "recovered", "unrecovered", "reconnects_per_s", "server_cpu_s_per_million_deliveries", "bench_cpu_pct", "cpu_busy_pct", "error"]
print("   ", {k: r[k] for k in keys if k in r}, "p99", (r.get("latency_ms") or r.get("caught_up_ms") or {}).get("p99"))' >&2
    done
  done
done

python3 - "$OUT" "$RUN_ID" "${SIZES[@]}" <<'PY'
import json, statistics, sys
path, run_id, sizes = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3:]]
rows = [json.loads(l) for l in open(path) if l.strip()]
rows = [r for r in rows if r.get("run_id") == run_id]
def runs(scenario, size):
    return [r for r in rows if r["scenario"] == scenario and r["history"] == size and "error" not in r]
def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
def rate(v):
    return "–" if v is None else (f"{v/1e6:.2f}M/s" if v >= 1e6 else f"{v/1e3:.0f}k/s")
def num(v, digits=1):
    return "–" if v is None else f"{v:.{digits}f}"
def ratio(a, b):
    return "–" if a is None or not b else f"{a/b:.2f}"
scenarios = list(dict.fromkeys(r["scenario"] for r in rows))
failed = sum(1 for r in rows if "error" in r)
print(f"\n### History on vs off (run {run_id}, medians of {max([r['run'] for r in rows] or [0])} runs{f', {failed} failed runs' if failed else ''})")
for scenario in scenarios:
    if scenario.startswith("fanout"):
        print(f"\n{scenario}:\n")
        print("| --history-size | deliveries/s | p99 ms | server CPU-s per M deliveries | server's own CPU % | bench core busy % | lost | duplicates | runs (deliveries/s) |")
        print("|---|---|---|---|---|---|---|---|---|")
        cells = {}
        for size in sizes:
            rs = runs(scenario, size)
            cells[size] = (
                med(r["deliveries_per_s"] for r in rs),
                med(r["latency_ms"]["p99"] for r in rs),
                med(r.get("server_cpu_s_per_million_deliveries") for r in rs),
                med(r.get("server_cpu_pct") for r in rs),
                med((r.get("cpu_busy_pct") or [0, 0])[-1] for r in rs),
            )
            lost = sum(r["lost"] for r in rs)
            dups = sum(r["duplicates"] for r in rs)
            each = ", ".join(rate(r["deliveries_per_s"]) for r in rs)
            d, p, c, own, b = cells[size]
            print(f"| {size} | {rate(d)} | {num(p)} | {num(c, 3)} | {num(own, 0)} | {num(b, 0)} | {lost} | {dups} | {each} |")
        a, b = sizes[0], sizes[-1]
        print(f"\nhistory {a} / history {b}, of the medians: deliveries/s {ratio(cells[a][0], cells[b][0])}, p99 {ratio(cells[a][1], cells[b][1])}, server CPU per delivery {ratio(cells[a][2], cells[b][2])}")
        # The two sizes of one run were measured a few seconds apart: their ratio is the least
        # disturbed by load that comes and goes on the machine.
        def paired(get):
            by_run = {}
            for r in rows:
                if r["scenario"] == scenario and "error" not in r and get(r) is not None:
                    by_run.setdefault(r["run"], {})[r["history"]] = get(r)
            ratios = [v[a] / v[b] for v in by_run.values() if a in v and b in v and v[b]]
            return (f"{statistics.median(ratios):.2f} (runs: {', '.join(f'{x:.2f}' for x in ratios)})") if ratios else "–"
        print(f"history {a} / history {b}, median of each run's pair: deliveries/s {paired(lambda r: r['deliveries_per_s'])}; server CPU per delivery {paired(lambda r: r.get('server_cpu_s_per_million_deliveries'))}")
    else:
        print(f"\n{scenario}:\n")
        print("| --history-size | recovered | unrecovered | reasons (all runs) | lost | duplicates (all runs) | out of order (all runs) | replayed | reconnects/s | rejoined p50 / p99 / max ms | caught up p50 / p99 / max ms | server CPU-s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for size in sizes:
            rs = runs(scenario, size)
            if not rs:
                continue
            reasons = {}
            for r in rs:
                for k, v in r["unrecovered_reasons"].items():
                    reasons[k] = reasons.get(k, 0) + v
            def hist(key):
                return " / ".join(num(med(r[key][q] for r in rs), 0) for q in ("p50", "p99", "max"))
            print(f"| {size} | {num(med(r['recovered'] for r in rs), 0)} of {rs[0]['clients']} | {num(med(r['unrecovered'] for r in rs), 0)} | {', '.join(f'{k} {v}' for k, v in reasons.items()) or 'none'} | {num(med(r['lost'] for r in rs), 0)} | {sum(r['duplicates'] for r in rs)} | {sum(r['out_of_order'] for r in rs)} | {num(med(r['replayed'] for r in rs), 0)} | {num(med(r.get('reconnects_per_s') for r in rs), 0)} | {hist('rejoined_ms')} | {hist('caught_up_ms')} | {num(med(r.get('server_cpu_s') for r in rs), 2)} |")
        print("\nper run: " + "; ".join(f"history {r['history']} run {r['run']}: recovered {r['recovered']}, lost {r['lost']}, {r.get('reconnects_per_s', 0):.0f} reconnects/s, caught up p99 {r['caught_up_ms']['p99']:.0f} ms" for r in rows if r["scenario"] == scenario and "error" not in r))
PY
