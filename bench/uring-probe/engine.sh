#!/bin/bash
# The engine (release ovl-mount, root) with and without FUSE over io_uring: the round trip
# (statx-loop, one GETATTR per call) and a few workloads that are one request per file.
# Usage (root): bench/uring-probe/engine.sh [reps]; prints medians in ms (µs for statx).
# "cold" reads run on a fresh mount (the kernel's FUSE caches empty; the lower is tmpfs, so
# no disk); nothing drops the machine's caches.
set -euo pipefail
REPS=${1:-5}
HERE=$(cd "$(dirname "$0")" && pwd)
MOUNT=${OVL_MOUNT:-$HERE/../../target/release/ovl-mount}
W=$(mktemp -d /tmp/ovl-uring-bench.XXXX)
trap 'umount -l $W/m 2>/dev/null || true; rm -rf $W' EXIT
cc -O2 -pthread -o $W/statx-loop $HERE/statx-loop.c
mkdir -p $W/l/small $W/src $W/m
for i in $(seq 2000); do echo "file $i" > $W/l/small/f$i; done
mkdir -p $W/src/t && for i in $(seq 2000); do echo "file $i" > $W/src/t/f$i; done
tar -C $W/src -cf $W/t.tar t
now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mnt() { # $1: uring|nouring
    rm -rf $W/u $W/w; mkdir -p $W/u $W/w
    $MOUNT -o lowerdir=$W/l,upperdir=$W/u,workdir=$W/w,$1 $W/m
}
for mode in nouring uring; do
    mnt $mode
    for c in 1 2; do
        echo "$mode statx root, $c client(s): $($W/statx-loop $W/m 100000 $c)"
    done
    umount $W/m
    cold=(); warm=(); untar=(); rmrf=()
    for r in $(seq $REPS); do
        mnt $mode
        t=$(now); cat $W/m/small/* > /dev/null; cold+=($(( ($(now) - t) / 1000000 )))
        t=$(now); cat $W/m/small/* > /dev/null; warm+=($(( ($(now) - t) / 1000000 )))
        t=$(now); tar -C $W/m -xf $W/t.tar; untar+=($(( ($(now) - t) / 1000000 )))
        t=$(now); rm -rf $W/m/t; rmrf+=($(( ($(now) - t) / 1000000 )))
        umount $W/m
    done
    echo "$mode read-2000 cold $(printf '%s\n' "${cold[@]}" | median) ms," \
        "warm $(printf '%s\n' "${warm[@]}" | median) ms," \
        "untar $(printf '%s\n' "${untar[@]}" | median) ms," \
        "rm -rf $(printf '%s\n' "${rmrf[@]}" | median) ms" \
        "(medians of $REPS; cold ${cold[*]})"
done
