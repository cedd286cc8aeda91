#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target in fuzz/, one after the other.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 30)
#
# Each target starts from a scratch corpus seeded with a copy of
# fuzz/seeds/<target>/ (the committed seeds are never modified) and runs for
# the given number of seconds. One line per target reports the executions.
# Exits non-zero if any target crashes (the input is left in
# fuzz/artifacts/<target>/). Works on stable Rust through RUSTC_BOOTSTRAP=1.
#
# Environment:
#   FUZZ_TARGETS       space-separated subset of targets to run (default: all)
#   HERALD_FUZZ_STRICT=1  also assert properties that known bugs break
#                      (see fuzz/regressions/*/README.md)
set -euo pipefail

SECONDS_PER_TARGET="${1:-30}"
if ! [[ "$SECONDS_PER_TARGET" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_DIR="$ROOT/fuzz"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz..." >&2
    cargo install cargo-fuzz --locked
fi

cd "$FUZZ_DIR"
TARGETS="${FUZZ_TARGETS:-$(cargo fuzz list)}"

echo "building fuzz targets..." >&2
cargo fuzz build 2>&1 | tail -n 3 >&2

WORK="$(mktemp -d "${TMPDIR:-/tmp}/herald-fuzz.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

failed=()
summary=()
for target in $TARGETS; do
    corpus="$WORK/corpus/$target"
    mkdir -p "$corpus" "$FUZZ_DIR/artifacts/$target"
    if [ -d "$FUZZ_DIR/seeds/$target" ]; then
        cp -R "$FUZZ_DIR/seeds/$target/." "$corpus/"
    fi
    log="$WORK/$target.log"
    echo "fuzzing $target for ${SECONDS_PER_TARGET}s..." >&2
    status=0
    # The hard timeout is a backstop in case libFuzzer ignores -max_total_time
    # (a hang inside one input, say); -timeout flags single slow inputs.
    timeout --signal=KILL "$((SECONDS_PER_TARGET + 120))" \
        cargo fuzz run "$target" "$corpus" -- \
        -max_total_time="$SECONDS_PER_TARGET" \
        -rss_limit_mb=2048 \
        -timeout=20 \
        -max_len=4096 \
        -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    execs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | tail -n 1 | grep -Eo '[0-9]+$' || true)"
    if [ "$status" -eq 0 ]; then
        line="$(printf '%-16s ok     %12s execs in %ss' "$target" "${execs:-?}" "$SECONDS_PER_TARGET")"
    else
        line="$(printf '%-16s FAILED %12s execs (exit %s), log below' "$target" "${execs:-?}" "$status")"
        failed+=("$target")
        echo "----- $target (last 60 lines) -----" >&2
        tail -n 60 "$log" >&2
        echo "-----" >&2
    fi
    echo "$line"
    summary+=("$line")
done

echo
echo "summary:"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "crashed: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
