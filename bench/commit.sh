#!/usr/bin/env bash
# What a commit costs as the lower grows: `ovl-run --on-exit commit` and `commit-atomic` of the
# same small change (10 files written, 10 deleted) over lowers of 1 000 to 100 000 files.
# In-place commit touches only what changed; the atomic one builds a hard-linked copy of the
# whole lower before the switch, so it grows with the lower. Median of $REPS; writes
# bench/results-commit.md.
#   bench/commit.sh [--build]
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH_DIR")
REPS=${REPS:-3}
SIZES=${SIZES:-"1000 10000 100000"}
WORK=${OVL_BENCH_DIR:-/tmp/ovl-bench}/commit
OUT=${OUT:-$BENCH_DIR/results-commit.md}
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

# A lower of N small files in directories of 100.
make_lower() {
    local dir=$1 n=$2
    python3 - "$dir" "$n" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    d = os.path.join(root, "d%04d" % (i // 100))
    if i % 100 == 0:
        os.makedirs(d)
    with open(os.path.join(d, "f%03d" % (i % 100)), "w") as f:
        f.write("x" * (i % 512))
EOF
}
CHANGE='for i in 0 1 2 3 4 5 6 7 8 9; do echo new > d0000/n$i; rm d0001/f00$i; done'
timed() {
    local s=$EPOCHREALTIME
    "$@" >/dev/null 2>&1
    printf '%.3f\n' "$(echo "$EPOCHREALTIME - $s" | bc)"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

rows=()
for n in $SIZES; do
    make_lower "$WORK/master$n" "$n"
    for mode in commit commit-atomic; do
        runs=()
        for ((i = 0; i < REPS; i++)); do
            rm -rf "$WORK/lower"
            cp -a "$WORK/master$n" "$WORK/lower"
            sync
            runs+=("$(timed "$RUN" --lower "$WORK/lower" --on-exit "$mode" -- sh -c "$CHANGE")")
            # The change must have landed.
            [[ -f $WORK/lower/d0000/n9 && ! -e $WORK/lower/d0001/f009 ]] || { echo "commit did not land" >&2; exit 1; }
        done
        rows+=("| $n | $mode | $(printf '%s\n' "${runs[@]}" | median) | ${runs[*]} |")
    done
    rm -rf "$WORK/master$n"
done
{
    echo "# Commit cost against lower size (bench/commit.sh)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, kernel $(uname -r), load at end $(cut -d' ' -f1-3 /proc/loadavg), ovl $(git -C "$REPO" rev-parse --short HEAD)."
    echo "Each run: \`ovl-run --lower L --on-exit MODE -- sh -c '10 new files, 10 deletions'\`, end to end"
    echo "(mount, run, unmount, commit with fsyncs), on $(df --output=fstype "$WORK" | tail -1). Median of $REPS."
    echo
    echo "| lower files | mode | seconds (median) | runs |"
    echo "|---:|---|---:|---|"
    printf '%s\n' "${rows[@]}"
} | tee "$OUT"
