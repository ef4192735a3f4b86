#!/usr/bin/env bash
# What --metrics-file costs: `keepfs ls` (the baseline: reads every version from the
# catalog) against `keepfs ls --metrics-file` (the same, plus gathering and writing the
# metrics), on a repository of N versions over 20 names, best of 5 runs each; prints the
# ratio. Usage: contrib/bench/metrics.sh [N] (default 500). KEEPFS names the binary.
set -euo pipefail
n=${1:-500}
keepfs=${KEEPFS:-keepfs}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
export KEEPFS_HOME="$dir/home"
for i in $(seq 1 "$n"); do
    "$keepfs" backup -l daily "null://1M" "name$((i % 20))" >/dev/null 2>&1
done
best() {
    local b=999999
    for _ in 1 2 3 4 5; do
        local t0 t1
        t0=$(date +%s%N)
        "$@" >/dev/null 2>&1
        t1=$(date +%s%N)
        b=$(( (t1 - t0) / 1000 < b ? (t1 - t0) / 1000 : b ))
    done
    echo "$b"
}
base=$(best "$keepfs" ls)
with=$(best "$keepfs" ls --metrics-file "$dir/k.prom")
echo "versions: $n"
echo "keepfs ls:                  ${base} us"
echo "keepfs ls --metrics-file:   ${with} us"
awk -v a="$with" -v b="$base" 'BEGIN { printf "ratio: %.2f\n", a / b }'
