#!/usr/bin/env bash
# Runs the Autobahn|Testsuite conformance suite (fuzzingclient) against herald's /echo endpoint
# and fails on any regression against the committed results in autobahn/expected-results.json.
#
#   scripts/autobahn.sh            # check against the expected results
#   scripts/autobahn.sh --update   # rewrite autobahn/expected-results.json from this run
#
# Needs ../shared/autobahn (a self-contained Python 2.7 wstest; see its README). Without it, run
# the suite yourself and point it at a herald started as below, e.g. with Docker:
#   docker run --rm --net=host -v "$PWD/autobahn:/config" crossbario/autobahn-testsuite \
#     wstest -m fuzzingclient -s /config/fuzzingclient.json
#
# The 9.* cases send messages of up to 16 MiB, so for this run only herald is started with
# --max-message-bytes 16777216 (the default, 64 KiB, would close them with 1009).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
AUTOBAHN="${AUTOBAHN_DIR:-$ROOT/../shared/autobahn}"
EXPECTED="$ROOT/autobahn/expected-results.json"
REPORT="$ROOT/target/autobahn"
log() { printf '[autobahn] %s\n' "$*" >&2; }

if [[ ! -x "$AUTOBAHN/run.sh" ]]; then
  log "no Autobahn runner at $AUTOBAHN (set AUTOBAHN_DIR); see the comment at the top of this script"
  exit 2
fi

cargo build --release --bin herald
source scripts/lib.sh
PORT="$(free_port)"
mkdir -p "$REPORT"
target/release/herald --listen "127.0.0.1:$PORT" --max-message-bytes 16777216 >"$REPORT/herald.log" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -fsS --max-time 1 "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

# Every case, 12.*/13.* included: without permessage-deflate they end UNIMPLEMENTED in seconds.
status=0
AUTOBAHN_EXCLUDE="" "$AUTOBAHN/run.sh" "ws://127.0.0.1:$PORT/echo" herald "$REPORT" || status=$?
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
  log "herald died during the run; its log:"
  tail -50 "$REPORT/herald.log" >&2
  exit 1
fi

python3 - "$REPORT/index.json" "$EXPECTED" "${1:-}" <<'PY'
import json, sys
index_path, expected_path, mode = sys.argv[1:]
cases = json.load(open(index_path))["herald"]
got = {case: [r["behavior"], r["behaviorClose"]] for case, r in cases.items()}
key = lambda c: [int(p) for p in c.split(".")]
got = dict(sorted(got.items(), key=lambda kv: key(kv[0])))
tally = {}
for behavior, close in got.values():
    tally[behavior] = tally.get(behavior, 0) + 1
print("autobahn tally:", ", ".join(f"{n} {b}" for b, n in sorted(tally.items())), f"({len(got)} cases)")
if mode == "--update":
    json.dump(got, open(expected_path, "w"), indent=1)
    open(expected_path, "a").write("\n")
    print(f"wrote {expected_path}")
    sys.exit(0)
expected = json.load(open(expected_path))
diff = [(c, expected.get(c), got.get(c)) for c in sorted(set(expected) | set(got), key=key)
        if expected.get(c) != got.get(c)]
for case, want, have in diff:
    print(f"  case {case}: expected {want}, got {have}")
if diff:
    print(f"autobahn: {len(diff)} case(s) differ from {expected_path}")
    sys.exit(1)
print("autobahn: results match the expected results")
PY
exit $status
