#!/usr/bin/env bash
# bench/profile.sh — profile the ovl-mount daemon (or fuse-overlayfs) during one workload of
# bench/run.sh, on the same fixtures and storage.
#
#   bench/profile.sh WORKLOAD [perf|strace|time] [ovl|fuse-overlayfs|kernel|plain]
#
#   WORKLOAD: stat | read_cold | read_warm | create  (on the 10k-file tree)
#             stat20k | read20k_cold | read20k_warm | create20k  (the 20k-file tree, as run.sh)
#             delete (the 20k-file deltree) | cycle (20 x mount + true + umount)
#   perf   (default) perf record --call-graph dwarf -p PID (cpu-clock; this VM has no PMU),
#          then perf report --no-children and a caller view, into $OVL_BENCH_DIR/profile/
#          (dwarf unwinding wants debug info: `cargo build --profile profiling` and
#          OVL_MOUNT=target/profiling/ovl-mount; release builds carry symbols only)
#   strace strace -c -f -p PID: syscalls of the daemon, counts and time
#   time   just the wall time
# KEEP_DATA=1 leaves the benchmark filesystem (and its fixtures) mounted for the next call.
set -euo pipefail
export LC_ALL=C
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WL=${1:?usage: bench/profile.sh WORKLOAD [perf|strace|time] [FS]}
TOOL=${2:-perf}
FS=${3:-ovl}
OUTD=$WORK/profile
mkdir -p "$OUTD"
trap 'cleanup_mounts; [[ -n ${KEEP_DATA:-} ]] || umount_data' EXIT
ensure_fixtures

m=$MNT
if [[ $FS == plain ]]; then
    restore_plain
    m=$PLAIN
elif [[ $WL != cycle ]]; then
    fs_mount "$FS" "$LOWER" "$UPPER" "$WDIR" "$MNT"
fi

case $WL in
    stat) prep() { drop_caches; }; run() { w_stat "$m" tree10k; } ;;
    read_cold) prep() { drop_caches; }; run() { w_read "$m" tree10k; } ;;
    read_warm) prep() { w_read "$m" tree10k; }; run() { w_read "$m" tree10k; } ;;
    create20k) prep() { rm -rf "$m/new"; mkdir "$m/new"; drop_caches; }; run() { w_create "$m"; } ;;
    stat20k) prep() { drop_caches; }; run() { w_stat "$m"; } ;;
    read20k_cold) prep() { drop_caches; }; run() { w_read "$m"; } ;;
    read20k_warm) prep() { w_read "$m"; }; run() { w_read "$m"; } ;;
    create) prep() { rm -rf "$m/new10k"; mkdir "$m/new10k"; drop_caches; }; run() { w_create "$m" "$CREATE10K_TAR" new10k; } ;;
    delete) prep() { drop_caches; }; run() { w_delete "$m"; } ;;
    cycle) prep() { :; }; run() {
        local i
        for ((i = 0; i < 20; i++)); do
            fs_mount "$FS" "$LOWER" "$UPPER" "$WDIR" "$MNT"; true; fs_umount "$MNT"
        done
    } ;;
    *) die "unknown workload $WL" ;;
esac

prep
pid=
[[ $FS == ovl || $FS == fuse-overlayfs ]] && [[ $WL != cycle ]] && pid=$(daemon_pid "$MNT")
tag=$WL-$FS-$TOOL
case $TOOL in
    perf)
        if [[ -n $pid ]]; then
            perf record -q -e cpu-clock -F 4000 --call-graph dwarf,16384 -o "$OUTD/$tag.data" -p "$pid" &
        else
            perf record -q -e cpu-clock -F 4000 --call-graph dwarf,16384 -o "$OUTD/$tag.data" -a &
        fi
        ppid=$!
        sleep 1
        ;;
    strace)
        [[ -n $pid ]] || die "strace needs a FUSE daemon"
        strace -c -f -p "$pid" -o "$OUTD/$tag.txt" &
        ppid=$!
        sleep 1
        ;;
    time) ppid= ;;
    *) die "unknown tool $TOOL" ;;
esac
# Daemon CPU seconds (all threads) and context switches, for the time mode's summary.
dstat() {
    [[ -n $pid ]] || { echo "0 0 0"; return; }
    local cpu=0 vol=0 inv=0 t
    for t in /proc/"$pid"/task/*; do
        cpu=$((cpu + $(awk '{ print $14 + $15 }' "$t/stat")))
        vol=$((vol + $(awk '/^voluntary_ctxt_switches/ { print $2 }' "$t/status")))
        inv=$((inv + $(awk '/^nonvoluntary_ctxt_switches/ { print $2 }' "$t/status")))
    done
    echo "$cpu $vol $inv"
}
read -r c0 v0 i0 < <(dstat)
s=$EPOCHREALTIME
run
e=$EPOCHREALTIME
read -r c1 v1 i1 < <(dstat)
log "$WL on $FS: $(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.3f", e - s }') s$([[ -n $pid ]] &&
    echo ", daemon CPU $(awk -v c=$((c1 - c0)) -v h="$(getconf CLK_TCK)" 'BEGIN { printf "%.2f", c / h }') s, context switches $((v1 - v0)) voluntary + $((i1 - i0)) involuntary")"
if [[ -n $ppid ]]; then
    kill -INT "$ppid"
    wait "$ppid" || true
fi
case $TOOL in
    perf)
        perf report -i "$OUTD/$tag.data" --no-children --sort symbol --stdio -g none --percent-limit 0.7 \
            2>/dev/null | grep -v '^$' >"$OUTD/$tag.flat.txt" || true
        perf report -i "$OUTD/$tag.data" --children --sort symbol --stdio -g none --percent-limit 2 \
            2>/dev/null | grep -v '^$' >"$OUTD/$tag.children.txt" || true
        log "flat profile: $OUTD/$tag.flat.txt; inclusive: $OUTD/$tag.children.txt"
        head -45 "$OUTD/$tag.flat.txt"
        ;;
    strace) head -30 "$OUTD/$tag.txt" ;;
esac
