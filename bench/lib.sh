# bench/lib.sh — shared by bench/run.sh and bench/profile.sh (source it; not executable).
#
# Configuration (environment):
#   OVL_BENCH_DIR   work dir for fixtures, uppers and mount points   (default /tmp/ovl-bench)
#   CARGO_TARGET_DIR  where ovl-mount / ovl-run are looked for        (default /work/target-bench)
#   OVL_MOUNT, OVL_RUN  explicit binaries (default $CARGO_TARGET_DIR/release/{ovl-mount,ovl-run})
#   REGEN=1         regenerate the fixtures even if they are up to date
#   OVL_OPTS        extra ovl-mount options, e.g. nopassthrough (for experiments)
#   BENCH_STORAGE=ram|disk|dir   where the fixtures and uppers live (default ram, see below)
#
# Everything the workloads touch (lowers, the plain copy, uppers, work dirs) lives on a private
# ext4 filesystem at $OVL_BENCH_DIR/fs, the same for every contender:
#   ram  (default) ext4 on a private zram device (hot-added, removed at the end; a loop device
#        over a file in a tmpfs at $OVL_BENCH_DIR/ram where zram is missing). "Cold" then means what drop_caches drops (page cache, dentries, inodes: ext4 re-reads
#        its metadata and data through the block layer, the FUSE daemons get FORGETs) without
#        disk latency, so runs measure the filesystems rather than the disk, and repeat well.
#        Everything, fixtures included, is gone after the run (they take ~20 s to generate).
#   disk ext4 on a loop device over a sparse image $OVL_BENCH_DIR/fs.img on the host disk,
#        kept with its fixtures for later runs. Cold runs then include disk latency.
#   dir  no image: directly in $OVL_BENCH_DIR.
# Why not the host filesystem directly: on the machine this was written on, / is ext4 mounted
# with `discard`, which makes every unlink of a file with data wait for a discard (~2.7 ms per
# file): deleting 20 000 small files took 45-77 s, and removing each repetition's upper
# dominated the run. The images are mounted `nodiscard`.

WORK=${OVL_BENCH_DIR:-/tmp/ovl-bench}
TARGET=${CARGO_TARGET_DIR:-/work/target-bench}
OVL_MOUNT=${OVL_MOUNT:-$TARGET/release/ovl-mount}
OVL_RUN=${OVL_RUN:-$TARGET/release/ovl-run}
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

BENCH_STORAGE=${BENCH_STORAGE:-ram}
case $BENCH_STORAGE in
    ram) IMG=$WORK/ram/fs.img DATA=$WORK/fs IMG_GIB=4 ;;
    disk) IMG=$WORK/fs.img DATA=$WORK/fs IMG_GIB=8 ;;
    dir) IMG= DATA=$WORK ;;
    *) echo "BENCH_STORAGE must be ram, disk or dir" >&2; exit 1 ;;
esac

LOWER=$DATA/lower            # tree/ tree10k/ deltree/ big py/
LOWER_HUGE=$DATA/lower-200k  # huge/ (200 000 empty files), only for the RSS test
PLAIN=$DATA/plain            # the plain-directory baseline: a copy of $LOWER
CREATE_TAR=$DATA/create.tar  # 20 000 small files, extracted by the create workload
CREATE10K_TAR=$DATA/create10k.tar  # the same with 10 000 (see SMALL_TREE in run.sh)
UPPER=$DATA/upper
WDIR=$DATA/workdir
MNT=$WORK/mnt                # every overlay is mounted here, one at a time

# Fixture shape. 200 dirs x 100 files = 20 000 files, sizes 1..4096 bytes; tree10k: 100 dirs.
TREE_DIRS=200 TREE_FILES=100 TREE_MAX=4096 SMALL_DIRS=100
HUGE_DIRS=2000 HUGE_FILES=100
BIG_MIB=256

# The interpreter copied into the lower: the system python and its standard library.
PY_SRC_BIN=$(readlink -f "${PY_SRC_BIN:-/usr/bin/python3}")
PY_VER=$("$PY_SRC_BIN" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PY_SRC_LIB=$("$PY_SRC_BIN" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
PY_IMPORTS='import json, re, decimal, email, http.client, sqlite3, asyncio, unittest, xml.etree.ElementTree, argparse, logging, csv'

FIXTURE_VERSION="v3 small=${SMALL_DIRS} tree=${TREE_DIRS}x${TREE_FILES}x${TREE_MAX} big=${BIG_MIB} huge=${HUGE_DIRS}x${HUGE_FILES} py=$PY_SRC_BIN"

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

ZRAM_ID_FILE=$WORK/zram.id

# Mounts the private ext4 filesystem at $DATA (creating its device or image when needed).
mount_data() {
    [[ -n $IMG ]] || return 0
    mkdir -p "$DATA"
    mountpoint -q "$DATA" && return 0
    local dev
    if [[ $BENCH_STORAGE == ram && -e /sys/class/zram-control/hot_add ]]; then
        remove_zram
        local id
        id=$(cat /sys/class/zram-control/hot_add)
        echo "$id" >"$ZRAM_ID_FILE"
        dev=/dev/zram$id
        grep -qw lz4 "/sys/block/zram$id/comp_algorithm" && echo lz4 >"/sys/block/zram$id/comp_algorithm"
        echo "${IMG_GIB}G" >"/sys/block/zram$id/disksize"
        mkfs.ext4 -q -F -E nodiscard -N 600000 "$dev"
    else
        if [[ $BENCH_STORAGE == ram ]]; then
            mkdir -p "$WORK/ram"
            mountpoint -q "$WORK/ram" || mount -t tmpfs -o size=$((IMG_GIB + 1))G,mode=700 ovl-bench-ram "$WORK/ram"
        fi
        if [[ -n ${REGEN:-} || ! -f $IMG ]]; then
            log "creating ${IMG_GIB} GiB ext4 image $IMG"
            rm -f "$IMG"
            truncate -s ${IMG_GIB}G "$IMG"
            mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 -N 600000 "$IMG"
        fi
        dev=$(losetup --find --show "$IMG")
    fi
    mount -o nodiscard,relatime "$dev" "$DATA" || die "cannot mount $dev on $DATA"
}

# Removes the zram device an earlier (or this) run added, if it is not mounted.
remove_zram() {
    [[ -f $ZRAM_ID_FILE ]] || return 0
    local id
    id=$(<"$ZRAM_ID_FILE")
    if [[ -e /sys/block/zram$id ]] && ! grep -q "^/dev/zram$id " /proc/mounts; then
        # Right after umount the device can still be busy for a moment.
        local i
        for ((i = 0; i < 50; i++)); do
            echo 1 >"/sys/block/zram$id/reset" 2>/dev/null &&
                echo "$id" >/sys/class/zram-control/hot_remove 2>/dev/null && break
            sleep 0.2
        done
        [[ -e /sys/block/zram$id ]] && log "could not remove zram$id (echo $id >/sys/class/zram-control/hot_remove)"
    fi
    rm -f "$ZRAM_ID_FILE"
}

# Unmounts it (ram: and frees the memory; the fixtures go with it).
umount_data() {
    [[ -n $IMG ]] || return 0
    local i
    if mountpoint -q "$DATA"; then
        local dev
        dev=$(findmnt -n -o SOURCE --mountpoint "$DATA")
        umount "$DATA" || umount -l "$DATA"
        if [[ $dev == /dev/loop* ]]; then
            losetup -d "$dev"
            for ((i = 0; i < 100; i++)); do [[ -z $(losetup -j "$IMG") ]] && break; sleep 0.1; done
        fi
    fi
    remove_zram
    if [[ $BENCH_STORAGE == ram ]] && mountpoint -q "$WORK/ram"; then
        umount "$WORK/ram"
    fi
    return 0
}

ensure_fixtures() {
    mkdir -p "$WORK"
    mount_data
    if [[ -z ${REGEN:-} && -f $DATA/fixtures.ok && $(<"$DATA/fixtures.ok") == "$FIXTURE_VERSION" ]]; then
        log "fixtures up to date in $WORK (REGEN=1 to rebuild)"
        FIXTURES_NOTE="reused from an earlier run"
        return
    fi
    local s=$EPOCHREALTIME
    log "generating fixtures in $WORK"
    rm -f "$DATA/fixtures.ok"
    rm -rf "$LOWER" "$LOWER_HUGE" "$PLAIN" "$CREATE_TAR" "$CREATE10K_TAR"
    mkdir -p "$LOWER" "$LOWER_HUGE"
    local gen=(/usr/bin/python3 "$BENCH_DIR/mkfixtures.py")
    "${gen[@]}" tree "$LOWER/tree" $TREE_DIRS $TREE_FILES $TREE_MAX 1 &
    "${gen[@]}" tree "$LOWER/deltree" $TREE_DIRS $TREE_FILES $TREE_MAX 2 &
    "${gen[@]}" tree "$LOWER/tree10k" $SMALL_DIRS $TREE_FILES $TREE_MAX 4 &
    wait
    "${gen[@]}" big "$LOWER/big" $BIG_MIB &
    "${gen[@]}" tree "$LOWER_HUGE/huge" $HUGE_DIRS $HUGE_FILES 0 3 &
    wait
    mkdir -p "$LOWER/py/bin" "$LOWER/py/lib"
    cp -a "$PY_SRC_BIN" "$LOWER/py/bin/python3"
    cp -a "$PY_SRC_LIB" "$LOWER/py/lib/python$PY_VER"
    # Sanity: the copied interpreter imports from the copy.
    PYTHONHOME="$LOWER/py" PYTHONDONTWRITEBYTECODE=1 "$LOWER/py/bin/python3" -c "$PY_IMPORTS
import sys, json
assert json.__file__.startswith('$LOWER/py/'), json.__file__" || die "copied python does not work"
    tar cf "$CREATE_TAR" -C "$LOWER" tree
    tar cf "$CREATE10K_TAR" -C "$LOWER" tree10k
    cp -a "$LOWER" "$PLAIN"
    sync
    echo "$FIXTURE_VERSION" >"$DATA/fixtures.ok"
    FIXTURES_NOTE="generated in $(awk -v s=$s -v e=$EPOCHREALTIME 'BEGIN{printf "%.0f", e-s}') s"
    log "fixtures ready ($FIXTURES_NOTE)"
}

# Puts the plain copy back in its initial state (what the workloads changed).
restore_plain() {
    rm -rf "$PLAIN/new" "$PLAIN/new10k" "$PLAIN/seqw" "$PLAIN/small"
    truncate -s $((BIG_MIB << 20)) "$PLAIN/big"
    [[ -d $PLAIN/deltree ]] || cp -a "$LOWER/deltree" "$PLAIN/deltree"
}

# PID of the FUSE daemon serving mount point $1 (its command line names the mount point).
daemon_pid() {
    local m=$1 p
    for p in $(pgrep -x fuse-overlayfs) $(pgrep -x ovl-mount); do
        if tr '\0' '\n' <"/proc/$p/cmdline" 2>/dev/null | grep -qxF -- "$m"; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# fs_mount FS LOWER UPPER WORKDIR MOUNTPOINT: a fresh upper and work dir each time.
fs_mount() {
    local fs=$1 l=$2 u=$3 w=$4 m=$5
    rm -rf "$u" "$w"
    mkdir -p "$u" "$w" "$m"
    local o="lowerdir=$l,upperdir=$u,workdir=$w"
    case $fs in
        kernel) mount -t overlay overlay -o "$o" "$m" ;;
        fuse-overlayfs) fuse-overlayfs -o "$o" "$m" ;;
        ovl) "$OVL_MOUNT" -o "$o${OVL_OPTS:+,$OVL_OPTS}" "$m" ;;
        *) die "fs_mount: unknown fs $fs" ;;
    esac
    mountpoint -q "$m" || die "$fs: $m is not mounted"
}

# Is process $1 alive? A zombie is not: a daemon is reparented to PID 1 (or a subreaper),
# which may take a second or more to reap it, and kill -0 succeeds on zombies.
running() {
    local st
    st=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# Unmounts and waits for the FUSE daemon (if any) to exit, so runs never overlap.
fs_umount() {
    local m=$1 pid i
    mountpoint -q "$m" || return 0
    pid=$(daemon_pid "$m" || true)
    umount "$m" 2>/dev/null || { sleep 0.5; umount "$m" 2>/dev/null; } || umount -l "$m"
    if [[ -n $pid ]]; then
        for ((i = 0; i < 1000; i++)); do
            running "$pid" || break
            sleep 0.005
        done
    fi
}

# Unmounts every overlay this benchmark may have left mounted under $WORK (not the image).
cleanup_mounts() {
    local m
    for m in $(awk -v w="$WORK/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r); do
        [[ $m == "$DATA" || $m == "$WORK/ram" ]] && continue
        log "cleanup: unmounting $m"
        fs_umount "$m" || umount -l "$m" || true
    done
}

# ---------------------------------------------------------------------------------------
# Workloads: each takes the mount point (or the plain directory) as $1; the tree workloads
# take the tree (default tree, 20 000 files) or tarball as $2.
w_stat() { find "$1/${2:-tree}" -printf '%s\n' >/dev/null; }
w_read() { tar cf - -C "$1" "${2:-tree}" | cat >/dev/null; }
w_py() { (cd / && PYTHONHOME="$1/py" PYTHONDONTWRITEBYTECODE=1 "$1/py/bin/python3" -c "$PY_IMPORTS"); }
w_seqread() { dd if="$1/big" of=/dev/null bs=1M status=none; }
w_seqwrite() { dd if=/dev/zero of="$1/seqw" bs=1M count=$BIG_MIB conv=fsync status=none; }
w_smallwrite() { dd if=/dev/zero of="$1/small" bs=4k count=4096 conv=notrunc status=none; }
# The cost of one request to the filesystem: isatty() is an ioctl the kernel hands to a FUSE
# daemon every time (and answers itself for ext4 and overlayfs).
w_rtt() {
    /usr/bin/python3 -c 'import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
for _ in range(20000):
    os.isatty(fd)' "$1/big"
}
w_copyup() { printf x >>"$1/big"; }
w_create() { tar xf "${2:-$CREATE_TAR}" -C "$1/${3:-new}"; }
w_delete() { rm -rf "$1/deltree"; }
w_stat_huge() { find "$1/huge" -printf '%s\n' >/dev/null; }
