#!/usr/bin/env bash
# Renaming a big lower directory, then committing: `mv big moved` inside
# `ovl-run --lower L --on-exit MODE` over a lower whose directory `big` holds $N files (default
# 100 000). The rename writes a redirect (nothing is copied); commit moves the lower directory.
# Times: the mv alone (inside the mount) and the whole run end to end (mount, mv, unmount,
# commit with fsyncs). Median of $REPS; writes bench/results-rename.md.
#   bench/rename-dir.sh [--build]
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH_DIR")
REPS=${REPS:-3}
N=${N:-100000}
WORK=${OVL_BENCH_DIR:-/tmp/ovl-bench}/rename
OUT=${OUT:-$BENCH_DIR/results-rename.md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-bench}
if [[ ${1:-} == --build || ! -x $CARGO_TARGET_DIR/release/ovl-run ]]; then
    (cd "$REPO" && cargo build --release --quiet --bin ovl-run)
fi
RUN=$CARGO_TARGET_DIR/release/ovl-run
# ovl-run's FUSE engine, as in the recorded results (its default backend, auto, would take the
# kernel's overlay here); OVL_RUN_BACKEND=kernel measures that one.
export OVL_RUN_BACKEND=${OVL_RUN_BACKEND:-fuse}
rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT
export XDG_CACHE_HOME=$WORK/cache

python3 - "$WORK/master/big" "$N" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
os.makedirs(root)
for i in range(n):
    with open(os.path.join(root, "f%06d" % i), "w") as f:
        f.write("x")
EOF
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
MV='s=$EPOCHREALTIME; mv "$OVL_MOUNTPOINT/big" "$OVL_MOUNTPOINT/moved"; e=$EPOCHREALTIME; echo "$e - $s" | bc > "$T"'

rows=()
for mode in preserve commit commit-atomic; do
    mvs=() ends=()
    for ((i = 0; i < REPS; i++)); do
        rm -rf "$WORK/L" "$WORK/L_upper" "$WORK/.L_upper.ovl-work"
        cp -a "$WORK/master" "$WORK/L"
        sync
        s=$EPOCHREALTIME
        T=$WORK/t "$RUN" -q --lower "$WORK/L" --on-exit "$mode" -- bash -c "$MV"
        ends+=("$(printf '%.3f' "$(echo "$EPOCHREALTIME - $s" | bc)")")
        mvs+=("$(printf '%.3f' "$(cat "$WORK/t")")")
        if [[ $mode == preserve ]]; then
            [[ $(ls "$WORK/L_upper/moved" | wc -l) == 0 ]] || { echo "the subtree was copied up" >&2; exit 1; }
        else
            [[ $(ls "$WORK/L/moved" | wc -l) == "$N" && ! -e $WORK/L/big ]] || { echo "commit did not land" >&2; exit 1; }
        fi
    done
    rows+=("| $mode | $(printf '%s\n' "${mvs[@]}" | median) | $(printf '%s\n' "${ends[@]}" | median) | ${ends[*]} |")
done
{
    echo "# Renaming a $N-file lower directory (bench/rename-dir.sh)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, kernel $(uname -r), load at end $(cut -d' ' -f1-3 /proc/loadavg), ovl $(git -C "$REPO" rev-parse --short HEAD)."
    echo "Each run: \`ovl-run --lower L --on-exit MODE -- mv big moved\` as root, on $(df --output=fstype "$WORK" | tail -1). Median of $REPS."
    echo
    echo "| on exit | mv (s) | whole run (s) | whole runs |"
    echo "|---|---:|---:|---|"
    printf '%s\n' "${rows[@]}"
} | tee "$OUT"
