#!/bin/sh
# Runs uring-probe's matrix (as root; turns FUSE io_uring on for the ring rows). Each row is
# retried (up to 5 times) while other processes used more than 0.1 CPU during it: the numbers
# depend on whether the other CPUs are idle.
# Usage: bench/uring-probe/run.sh [reps] [calls] [target: root|file]
set -e
cd "$(dirname "$0")"
cargo build --release -q
P=./target/release/uring-probe
reps=${1:-5}
calls=${2:-100000}
t=${3:-root}
echo Y > /sys/module/fuse/parameters/enable_uring
quiet() {
  for try in 1 2 3 4 5; do
    out=$("$P" "$@" --target "$t" 2>/dev/null)
    noisy=$(echo "$out" | awk '{ if ($NF == "cpu" && $(NF-1) + 0 > 0.1) n++ } END { print n + 0 }')
    [ "$noisy" = 0 ] && break
    sleep 5
  done
  echo "$out"
}
for r in $(seq "$reps"); do
  quiet classic --threads 1 --calls "$calls" --clients 1
  quiet classic --threads 2 --calls "$calls" --clients 1
  quiet classic --threads 2 --calls "$calls" --clients 2
  quiet classic --threads 1 --calls "$calls" --clients 1 --pin-client 0 --pin-server 0
  quiet classic --threads 1 --calls "$((calls / 10))" --clients 1 --pin-client 0 --pin-server 1
  quiet fuser --threads 2 --calls "$calls" --clients 1
  quiet fuser --threads 2 --calls "$calls" --clients 2
  quiet fuser-ring --defer --calls "$calls" --clients 1
  quiet fuser-ring --defer --calls "$calls" --clients 2
  quiet ring --calls "$calls" --clients 1
  quiet ring --calls "$calls" --clients 2
  quiet ring --calls "$calls" --clients 1 --pin-client 0 --defer
  quiet ring --calls "$calls" --clients 1 --defer
  quiet ring --calls "$calls" --clients 2 --defer
done
