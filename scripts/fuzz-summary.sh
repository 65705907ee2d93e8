#!/usr/bin/env bash
# Totals results/fuzzing.tsv per target: runs, seconds, executions, crashes.
set -euo pipefail
cd "$(dirname "$0")/.."
awk -F'\t' 'NR > 1 { runs[$2]++; secs[$2] += $3; execs[$2] += $4; if ($6 != "ok") crash[$2]++ }
    END {
        printf "%-14s %5s %9s %14s %8s\n", "target", "runs", "minutes", "executions", "crashes"
        for (t in runs) printf "%-14s %5d %9.1f %14d %8d\n", t, runs[t], secs[t] / 60, execs[t], crash[t] + 0
    }' results/fuzzing.tsv | (read -r h; echo "$h"; sort)
