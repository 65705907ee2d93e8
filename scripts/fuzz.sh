#!/usr/bin/env bash
# Runs the libFuzzer targets in fuzz/ (cargo-fuzz) for a fixed time each.
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]      default: all, 60 s each
#
# Corpora grow in fuzz/corpus/<target> (the committed seeds are written by
# fuzz/seeds.py); inputs in fuzz/regressions/<target> run first. A crashing
# input lands in fuzz/artifacts/<target>: minimise it with
# `cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz tmin TARGET ARTIFACT`, keep it in
# fuzz/regressions/<target> and show it with `cargo fuzz fmt TARGET FILE`.
#
# Every run appends a line to results/fuzzing.tsv (date, target, seconds,
# executions, corpus size, outcome); scripts/fuzz-summary.sh totals them.
set -euo pipefail
cd "$(dirname "$0")/.."

target="${1:-all}"
seconds="${2:-60}"
case "$seconds" in '' | *[!0-9]*) echo "SECONDS must be a whole number, not '$seconds'" >&2; exit 2 ;; esac

[ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

# libFuzzer instrumentation needs nightly-only compiler flags; this lets the
# stable toolchain accept them for the fuzz build only.
export RUSTC_BOOTSTRAP=1

cd fuzz
all_targets=$(cargo fuzz list)
if [ "$target" = all ]; then
    targets=$all_targets
elif grep -qx -- "$target" <<<"$all_targets"; then
    targets=$target
else
    echo "unknown fuzz target '$target'; one of: all" $all_targets >&2
    exit 2
fi

results=../results/fuzzing.tsv
[ -f "$results" ] || printf 'date\ttarget\tseconds\texecutions\tcorpus\toutcome\n' >"$results"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

failed=()
for t in $targets; do
    printf '\n== fuzzing %s for %s s\n' "$t" "$seconds" >&2
    mkdir -p "corpus/$t"
    # Saved crashes run first, with the seeds: a fixed bug must stay fixed.
    dirs=("corpus/$t")
    [ -d "regressions/$t" ] && dirs+=("regressions/$t")
    cargo fuzz build "$t" >&2
    started=$(date +%s)
    outcome=ok
    if ! cargo fuzz run "$t" "${dirs[@]}" -- -max_total_time="$seconds" -timeout=10 -print_final_stats=1 2>&1 | tee "$log" >&2; then
        outcome=crash
        failed+=("$t")
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$(date -u +%FT%TZ)" "$t" "$(($(date +%s) - started))" \
        "${execs:-0}" "$(find "corpus/$t" -type f | wc -l)" "$outcome" >>"$results"
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found failures in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "no failures in: $(echo $targets)" >&2
