#!/usr/bin/env bash
# Builds and runs every cargo-fuzz target in fuzz/, one after the other.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 30)
#
# All targets are built once and the binaries are copied aside, so every
# target runs against the same snapshot of Herald even if src/ changes while
# the script runs. Then, for each target:
#   1. every file in fuzz/regressions/<target>/ (except *.md) is replayed once;
#      a crash there fails the target and it is not fuzzed;
#   2. the target is fuzzed for the given number of seconds from a scratch
#      corpus seeded with a copy of fuzz/seeds/<target>/ (the committed seeds
#      are never modified).
# One line per target reports the executions, executions per second, edge
# coverage, final corpus files and regression inputs replayed. Exits non-zero
# if any target crashes (a fuzzing crash input is left in fuzz/artifacts/<target>/).
# Everything runs under `nice -n 19`, one fuzz process at a time. Works on
# stable Rust through RUSTC_BOOTSTRAP=1.
#
# Environment:
#   FUZZ_TARGETS   space-separated subset of targets to run (default: all)
set -euo pipefail

# Stay out of the way of anything else on the machine (benchmarks, builds).
if [ "$(nice)" -lt 19 ]; then
    exec nice -n 19 bash "${BASH_SOURCE[0]}" "$@"
fi

SECONDS_PER_TARGET="${1:-30}"
if ! [[ "$SECONDS_PER_TARGET" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ_DIR="$ROOT/fuzz"
export RUSTC_BOOTSTRAP=1
# What `cargo fuzz run` sets for the binaries it starts.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz..." >&2
    cargo install cargo-fuzz --locked
fi

cd "$FUZZ_DIR"
TARGETS="${FUZZ_TARGETS:-$(cargo fuzz list)}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/herald-fuzz.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

echo "building fuzz targets..." >&2
if ! cargo fuzz build >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" >&2
    echo "build failed" >&2
    exit 1
fi
tail -n 1 "$WORK/build.log" >&2

# cargo fuzz builds for the host triple into <target dir>/<triple>/release.
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
BIN_DIR="${CARGO_TARGET_DIR:-$FUZZ_DIR/target}/$TRIPLE/release"
mkdir -p "$WORK/bin"
for target in $TARGETS; do
    if [ ! -x "$BIN_DIR/$target" ]; then
        echo "no fuzz target binary $BIN_DIR/$target" >&2
        exit 1
    fi
    cp "$BIN_DIR/$target" "$WORK/bin/$target"
done

# Pulls one `stat::` value out of a libFuzzer log (-print_final_stats=1).
fuzz_stat() {
    grep -Eo "stat::$1: *[0-9]+" "$2" | tail -n 1 | grep -Eo '[0-9]+$' || true
}

failed=()
summary=()
for target in $TARGETS; do
    bin="$WORK/bin/$target"
    log="$WORK/$target.log"

    # 1. Replay the regression inputs (libFuzzer runs files given by name once).
    regressions=()
    if [ -d "$FUZZ_DIR/regressions/$target" ]; then
        while IFS= read -r -d '' file; do
            regressions+=("$file")
        done < <(find "$FUZZ_DIR/regressions/$target" -maxdepth 1 -type f ! -name '*.md' ! -name '.*' -print0 | sort -z)
    fi
    replayed=""
    if [ "${#regressions[@]}" -ne 0 ]; then
        echo "replaying ${#regressions[@]} regression input(s) for $target..." >&2
        status=0
        timeout --signal=KILL 300 "$bin" -rss_limit_mb=2048 -timeout=20 "${regressions[@]}" \
            >"$log" 2>&1 || status=$?
        ran="$(grep -c '^Executed ' "$log" || true)"
        if [ "$status" -ne 0 ] || [ "$ran" -ne "${#regressions[@]}" ]; then
            line="$(printf '%-16s FAILED regression inputs (exit %s, %s/%s ran), log below' \
                "$target" "$status" "$ran" "${#regressions[@]}")"
            failed+=("$target")
            echo "----- $target regressions (last 60 lines) -----" >&2
            tail -n 60 "$log" >&2
            echo "-----" >&2
            echo "$line"
            summary+=("$line")
            continue
        fi
        replayed=", ${#regressions[@]} regression input(s) ok"
    fi

    # 2. Fuzz.
    corpus="$WORK/corpus/$target"
    mkdir -p "$corpus" "$FUZZ_DIR/artifacts/$target"
    if [ -d "$FUZZ_DIR/seeds/$target" ]; then
        cp -R "$FUZZ_DIR/seeds/$target/." "$corpus/"
    fi
    echo "fuzzing $target for ${SECONDS_PER_TARGET}s..." >&2
    status=0
    # The hard timeout is a backstop in case libFuzzer ignores -max_total_time
    # (a hang inside one input, say); -timeout flags single slow inputs.
    timeout --signal=KILL "$((SECONDS_PER_TARGET + 120))" \
        "$bin" "$corpus" \
        -artifact_prefix="$FUZZ_DIR/artifacts/$target/" \
        -max_total_time="$SECONDS_PER_TARGET" \
        -rss_limit_mb=2048 \
        -timeout=20 \
        -max_len=4096 \
        -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    execs="$(fuzz_stat number_of_executed_units "$log")"
    rate="$(fuzz_stat average_exec_per_sec "$log")"
    files="$(find "$corpus" -type f | wc -l)"
    # Coverage (edges) from libFuzzer's last status line ("#N NEW cov: ..."):
    # it only grows when a NEW line is printed.
    cov="$(grep -E '^#[0-9]+[[:space:]]' "$log" | grep -Eo 'cov: [0-9]+' | tail -n 1 | grep -Eo '[0-9]+' || true)"
    if [ "$status" -eq 0 ]; then
        line="$(printf '%-16s ok     %12s execs in %ss (%s/s), cov %s, corpus %s files%s' \
            "$target" "${execs:-?}" "$SECONDS_PER_TARGET" "${rate:-?}" "${cov:-?}" "$files" "$replayed")"
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
    echo "crashed: ${failed[*]} (fuzzing inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
