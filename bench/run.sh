#!/usr/bin/env bash
# bench/run.sh — one command: the same workloads, in one run, on a plain directory (a copy of
# the lower), kernel overlayfs, fuse-overlayfs and ovl (ovl-mount), over the same generated
# lower tree, a fresh upper per repetition; median of REPS runs; table of seconds and ratios
# to kernel overlayfs, printed and written to bench/results.md. Run as root.
# `ovl-user` is ovl as a non-root user through ovl-run (user + mount namespace, fusermount-free
# FUSE mount, no passthrough): a user (OVL_BENCH_USER, default ovl-bench, created if missing)
# runs one ovl-run session per repetition, whose command executes the timed workloads sent by
# this script (so drop_caches and checks stay here); the lower is chowned to that user so it
# may write and delete (root ignores ownership, the other contenders are unaffected).
#
#   bench/run.sh [--build] [--reps N] [--fs "plain kernel fuse-overlayfs ovl ovl-user"] [--out FILE]
#
#   --build   build ovl first (cargo build --release into $CARGO_TARGET_DIR)
# Environment: see bench/lib.sh (OVL_BENCH_DIR, CARGO_TARGET_DIR, OVL_MOUNT, OVL_RUN, REGEN,
# BENCH_STORAGE), and SMALL_TREE=auto|1|0: also run the tree workloads on a 10 000-file tree
# (auto: when ovl cannot stat the 20 000-file tree under the inherited RLIMIT_NOFILE).
# Fixtures are generated under $OVL_BENCH_DIR (default /tmp/ovl-bench) on a private RAM-backed
# ext4 (see bench/lib.sh for why), which is unmounted and freed at the end, even on failure.
set -euo pipefail
export LC_ALL=C

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPS=3
FS_LIST="plain kernel fuse-overlayfs ovl ovl-user"
OUT=$BENCH_DIR/results.md
BUILD=
while (($#)); do
    case $1 in
        --build) BUILD=1 ;;
        --reps) REPS=$2; shift ;;
        --fs) FS_LIST=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done

(($(id -u) == 0)) || die "run as root (kernel overlayfs, drop_caches, allow_other)"
command -v fuse-overlayfs >/dev/null || die "fuse-overlayfs not installed (apt-get install fuse-overlayfs)"
if [[ -n $BUILD ]]; then
    (cd "$BENCH_DIR/.." && CARGO_TARGET_DIR=$TARGET cargo build --release) || die "build failed"
fi
[[ -x $OVL_MOUNT ]] || die "$OVL_MOUNT not found: build it (bench/run.sh --build)"

# ovl keeps an O_PATH descriptor per inode the kernel holds, and raises its soft
# RLIMIT_NOFILE to the hard limit; a hard limit below ~20 300 (this machine's is 20 000) makes
# it fail the 20k-file workloads with EMFILE, and the 200k test needs ~200 000. Raise the hard
# limit for everything started here (kernel overlayfs and fuse-overlayfs do not care), and
# record what ovl does under the inherited limit (checked once below).
NOFILE_INHERITED="$(ulimit -Sn)/$(ulimit -Hn)"
# (Raising a hard limit needs CAP_SYS_RESOURCE; without it the inherited limit stays.)
ulimit -Hn "$(cat /proc/sys/fs/nr_open)" 2>/dev/null || true
ulimit -Sn "$(ulimit -Hn)"

RUN_START=$EPOCHREALTIME
RES=$WORK/results
RAW=$RES/raw.tsv
mkdir -p "$WORK"
rm -rf "$RES"
mkdir -p "$RES"
: >"$RAW"

trap 'user_session_abort; cleanup_mounts; umount_data' EXIT
trap 'log "interrupted"; exit 130' INT TERM
cleanup_mounts

# ---------------------------------------------------------------------------------------
# Workload table: id | label | cache state. The report prints rows in this order.
cat >"$RES/workloads.tsv" <<EOF
stat_cold	stat 20k files (find -printf %s)	cold	main
stat_warm	stat 20k files, again	warm	main
read_cold	read 20k small files (tar cf - \| cat)	cold	main
read_warm	read 20k small files, again	warm	main
py_cold	python3 + 12 stdlib imports, 1st run	cold	main
py_warm	python3 + 12 stdlib imports, 2nd run	warm	main
seqread	seq read 256 MiB (dd bs=1M)	cold	main
seqwrite	seq write 256 MiB (dd bs=1M conv=fsync)	dropped	main
smallwrite	small writes: 4096 × 4 KiB into a new file (dd bs=4k)	warm	main
rtt	20 000 isatty() on an open file (FUSE: 1 round trip each)	warm	main
copyup	append 1 byte to 256 MiB lower file (copy-up)	cold	main
create	create: untar 20k small files	dropped	main
delete	delete: rm -rf 20k-file lower tree	cold	main
cycle	mount + true + umount	-	main
ovlrun_true	ovl-run --lower X -- true (end to end)	-	main
ovlrun_commit	ovl-run --on-exit commit -- tar xf (20k files, end to end)	dropped	main
stat10k_cold	stat 10k files	cold	small
stat10k_warm	stat 10k files, again	warm	small
read10k_cold	read 10k small files	cold	small
read10k_warm	read 10k small files, again	warm	small
create10k	create: untar 10k small files	dropped	small
stat_huge	stat 200k files, 1 run (RSS test)	cold	huge
EOF

# timed ID FS REP CMD...: runs CMD, appends "FS ID REP seconds" (or FAIL) to the raw table.
timed() {
    local id=$1 fs=$2 rep=$3 s e v
    shift 3
    s=$EPOCHREALTIME
    if "$@" >/dev/null 2>"$RES/last.err"; then
        e=$EPOCHREALTIME
        v=$(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.3f", e - s }')
    else
        v=FAIL
        grep -q 'Too many open files' "$RES/last.err" && v=FAIL:EMFILE
        log "  $fs $id rep $rep FAILED: $(head -c 400 "$RES/last.err")"
    fi
    record "$fs" "$id" "$rep" "$v"
    [[ $v == FAIL* ]] || log "  $fs $id rep $rep: $v s"
}
record() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$RAW"; }
# A check after the timed part failed: the run does not count.
check() {
    local fs=$1 id=$2 rep=$3 what=$4
    shift 4
    if ! "$@"; then
        log "  $fs $id rep $rep: check failed: $what"
        record "$fs" "$id" "$rep" FAIL
        echo "- $fs $id rep $rep: check failed: $what" >>"$RES/notes.md"
    fi
}
size_is() { [[ $(stat -c %s "$1") == "$2" ]]; }
count_files() { [[ $(find "$1" -type f | wc -l) == "$2" ]]; }

NFILES=$((TREE_DIRS * TREE_FILES))

# One repetition of the main workloads on one filesystem.
suite() {
    local fs=$1 rep=$2 m pid
    if [[ $fs == ovl-user ]]; then
        suite_user "$rep"
        return
    fi
    if [[ $fs == plain ]]; then
        restore_plain
        m=$PLAIN
    else
        fs_mount "$fs" "$LOWER" "$UPPER" "$WDIR" "$MNT"
        m=$MNT
        grep -F " $MNT " /proc/mounts | head -1 >"$RES/mountopts.$fs"
    fi
    log "$fs, repetition $rep"
    drop_caches; timed stat_cold "$fs" "$rep" w_stat "$m"
    timed stat_warm "$fs" "$rep" w_stat "$m"
    drop_caches; timed read_cold "$fs" "$rep" w_read "$m"
    timed read_warm "$fs" "$rep" w_read "$m"
    drop_caches; timed py_cold "$fs" "$rep" w_py "$m"
    timed py_warm "$fs" "$rep" w_py "$m"
    drop_caches; timed seqread "$fs" "$rep" w_seqread "$m"
    drop_caches; timed seqwrite "$fs" "$rep" w_seqwrite "$m"
    check "$fs" seqwrite "$rep" "size" size_is "$m/seqw" $((BIG_MIB << 20))
    : >"$m/small"
    timed smallwrite "$fs" "$rep" w_smallwrite "$m"
    check "$fs" smallwrite "$rep" "size" size_is "$m/small" $((4096 * 4096))
    timed rtt "$fs" "$rep" w_rtt "$m"
    drop_caches; timed copyup "$fs" "$rep" w_copyup "$m"
    check "$fs" copyup "$rep" "size" size_is "$m/big" $(((BIG_MIB << 20) + 1))
    mkdir "$m/new"
    drop_caches; timed create "$fs" "$rep" w_create "$m"
    check "$fs" create "$rep" "$NFILES files" count_files "$m/new" $NFILES
    drop_caches; timed delete "$fs" "$rep" w_delete "$m"
    check "$fs" delete "$rep" "gone" test ! -e "$m/deltree"
    if [[ $fs != plain ]]; then
        if [[ $fs == fuse-overlayfs || $fs == ovl ]]; then
            pid=$(daemon_pid "$MNT" || true)
            if [[ -n $pid ]]; then
                awk -v f="$fs" -v r="$rep" '/^VmHWM/ { print f "\t" r "\t" $2 }' \
                    "/proc/$pid/status" >>"$RES/hwm_suite.tsv"
            fi
        fi
        fs_umount "$MNT"
        # Mount, run one command, unmount: what a launcher pays end to end (empty upper).
        rm -rf "$UPPER" "$WDIR"; mkdir -p "$UPPER" "$WDIR"
        timed cycle "$fs" "$rep" mount_true_umount "$fs"
    fi
}
# The tree workloads again on a 10 000-file tree (fresh mount and upper).
suite_small() {
    local fs=$1 rep=$2 m
    [[ $fs != ovl-user ]] || return 0
    if [[ $fs == plain ]]; then
        restore_plain
        m=$PLAIN
    else
        fs_mount "$fs" "$LOWER" "$UPPER" "$WDIR" "$MNT"
        m=$MNT
    fi
    log "$fs, repetition $rep, 10k-file tree"
    drop_caches; timed stat10k_cold "$fs" "$rep" w_stat "$m" tree10k
    timed stat10k_warm "$fs" "$rep" w_stat "$m" tree10k
    drop_caches; timed read10k_cold "$fs" "$rep" w_read "$m" tree10k
    timed read10k_warm "$fs" "$rep" w_read "$m" tree10k
    mkdir "$m/new10k"
    # Dropped so the 10 100 inodes above are forgotten (ovl would otherwise run out of fds).
    drop_caches; timed create10k "$fs" "$rep" w_create "$m" "$CREATE10K_TAR" new10k
    check "$fs" create10k "$rep" "$((NFILES / 2)) files" count_files "$m/new10k" $((NFILES / 2))
    [[ $fs == plain ]] || fs_umount "$MNT"
}

# --- ovl as a non-root user, through ovl-run -------------------------------------------------
BENCH_USER=${OVL_BENCH_USER:-ovl-bench}
UDIR=$DATA/ovl-user  # owned by the user: upper (+ its work dir beside it), mount point, FIFOs

# Creates the user if missing and gives it the lower. Prints why ovl-user cannot run, if so.
user_setup() {
    [[ -x $OVL_RUN ]] || { echo "ovl-run not built ($OVL_RUN)"; return; }
    id -u "$BENCH_USER" >/dev/null 2>&1 || useradd -M -s /bin/sh "$BENCH_USER" ||
        { echo "cannot create user $BENCH_USER"; return; }
    command -v setpriv >/dev/null || { echo "setpriv (util-linux) missing"; return; }
    chown -R "$BENCH_USER:" "$LOWER"
    chmod 755 "$DATA"
    rm -rf "$UDIR"; mkdir -p "$UDIR"; chown "$BENCH_USER:" "$UDIR"
    as_user "$OVL_RUN" -q --lower "$LOWER" --upper "$UDIR/u0" --mountpoint "$UDIR/m0" \
        --on-exit discard -- test -f "$UDIR/m0/big" 2>"$RES/user-probe.err" ||
        { echo "ovl-run as $BENCH_USER failed: $(head -c 300 "$RES/user-probe.err")"; return; }
    echo ok
}

# Runs a command as the bench user: no PAM, a minimal environment, HOME in its directory.
as_user() {
    setpriv --reuid="$(id -u "$BENCH_USER")" --regid="$(id -g "$BENCH_USER")" --clear-groups \
        env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$UDIR" XDG_CACHE_HOME="$UDIR/cache" \
        LC_ALL=C "$@"
}

# Starts the user's ovl-run session: a bash loop inside the mount that reads one command per
# line from $UDIR/in, runs it (timed there, with the workload functions of lib.sh) and answers
# "STATUS SECONDS" on $UDIR/out.
user_session_start() {
    rm -rf "$UDIR/upper" "$UDIR/.upper.ovl-work" "$UDIR/mnt" "$UDIR/in" "$UDIR/out"
    mkfifo "$UDIR/in" "$UDIR/out"
    {
        declare -p PY_IMPORTS BIG_MIB CREATE_TAR CREATE10K_TAR
        declare -f w_stat w_read w_py w_seqread w_seqwrite w_smallwrite w_rtt w_copyup w_create \
            w_delete size_is count_files
        cat <<'EOS'
exec 3<"$1/in" 4>"$1/out"
echo ready >&4
while IFS= read -r line <&3; do
    [[ $line == quit ]] && break
    s=$EPOCHREALTIME
    if eval "$line" >/dev/null 2>>"$1/session.err"; then rc=0; else rc=1; fi
    e=$EPOCHREALTIME
    echo "$rc $(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.3f", e - s }')" >&4
done
EOS
    } >"$UDIR/session.sh"
    chown "$BENCH_USER:" "$UDIR"/{in,out,session.sh}
    (cd "$UDIR" && as_user "$OVL_RUN" -q --lower "$LOWER" --upper "$UDIR/upper" \
        --mountpoint "$UDIR/mnt" --on-exit discard -- bash "$UDIR/session.sh" "$UDIR" \
        >>"$RES/user-session.log" 2>&1) &
    USER_SESSION=$!
    exec {UIN}>"$UDIR/in" {UOUT}<"$UDIR/out"
    local ready
    read -r ready <&"$UOUT"
    [[ $ready == ready ]]
}
user_session_stop() {
    echo quit >&"$UIN"
    exec {UIN}>&- {UOUT}<&-
    wait "$USER_SESSION" || log "  ovl-user session ended with status $?"
    USER_SESSION=
}
# On exit: closing the FIFO ends the session's loop; ovl-run then unmounts and discards.
user_session_abort() {
    [[ -n ${USER_SESSION:-} ]] || return 0
    exec {UIN}>&- {UOUT}<&- 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$USER_SESSION" 2>/dev/null || return 0
        sleep 0.1
    done
    kill "$USER_SESSION" 2>/dev/null || true
}
# ucmd CMD...: runs CMD in the session; sets URC (0 = success) and USECS.
ucmd() {
    printf '%q ' "$@" >&"$UIN"
    echo >&"$UIN"
    read -r URC USECS <&"$UOUT"
}
ucheck() { ucmd "$@"; [[ $URC == 0 ]]; }
# utimed ID REP CMD...: like `timed`, for the session (the time is taken inside it).
utimed() {
    local id=$1 rep=$2 v
    shift 2
    ucmd "$@"
    if [[ $URC == 0 ]]; then v=$USECS; else v=FAIL; log "  ovl-user $id rep $rep FAILED: $(tail -c 400 "$UDIR/session.err" 2>/dev/null)"; fi
    record ovl-user "$id" "$rep" "$v"
    [[ $v == FAIL ]] || log "  ovl-user $id rep $rep: $v s"
}

# One repetition of the main workloads as the bench user, in one ovl-run session (fresh upper).
suite_user() {
    local rep=$1 m=$UDIR/mnt
    if [[ $USER_OK != ok ]]; then
        local id
        for id in stat_cold stat_warm read_cold read_warm py_cold py_warm seqread seqwrite \
            smallwrite rtt copyup create delete cycle; do
            record ovl-user "$id" "$rep" SKIP
        done
        return
    fi
    log "ovl-user, repetition $rep"
    user_session_start || { log "  ovl-user: session did not start: $(tail -c 400 "$RES/user-session.log")"; return; }
    drop_caches; utimed stat_cold "$rep" w_stat "$m"
    utimed stat_warm "$rep" w_stat "$m"
    drop_caches; utimed read_cold "$rep" w_read "$m"
    utimed read_warm "$rep" w_read "$m"
    drop_caches; utimed py_cold "$rep" w_py "$m"
    utimed py_warm "$rep" w_py "$m"
    drop_caches; utimed seqread "$rep" w_seqread "$m"
    drop_caches; utimed seqwrite "$rep" w_seqwrite "$m"
    check ovl-user seqwrite "$rep" "size" ucheck size_is "$m/seqw" $((BIG_MIB << 20))
    ucmd truncate -s 0 "$m/small"
    utimed smallwrite "$rep" w_smallwrite "$m"
    check ovl-user smallwrite "$rep" "size" ucheck size_is "$m/small" $((4096 * 4096))
    utimed rtt "$rep" w_rtt "$m"
    drop_caches; utimed copyup "$rep" w_copyup "$m"
    check ovl-user copyup "$rep" "size" ucheck size_is "$m/big" $(((BIG_MIB << 20) + 1))
    ucmd mkdir "$m/new"
    drop_caches; utimed create "$rep" w_create "$m"
    check ovl-user create "$rep" "$NFILES files" ucheck count_files "$m/new" $NFILES
    drop_caches; utimed delete "$rep" w_delete "$m"
    check ovl-user delete "$rep" "gone" ucheck test ! -e "$m/deltree"
    user_session_stop
    rm -rf "$UDIR/upper" "$UDIR/.upper.ovl-work"
    # End to end: ovl-run mounts, runs `true`, unmounts, discards (fresh upper).
    timed cycle ovl-user "$rep" as_user "$OVL_RUN" -q --lower "$LOWER" --upper "$UDIR/upper" \
        --mountpoint "$UDIR/mnt" --on-exit discard -- true
    rm -rf "$UDIR/upper" "$UDIR/.upper.ovl-work"
}

mount_true_umount() {
    fs_mount "$1" "$LOWER" "$UPPER" "$WDIR" "$MNT" && true && fs_umount "$MNT"
}

# ovl-run workloads (placeholders, recorded as skipped, while ovl-run is not built in the
# target dir). ovl-run mounts, starts the command in the mount at the caller's cwd relative to
# the lower, waits for it, unmounts and finalizes; the upper (default <lower>_upper) and its
# work dir (.<upper>.ovl-work) are put in $DATA here and removed after each timed run.
ovlrun_suite() {
    local rep=$1 cl=$DATA/commit-lower ru=$DATA/run-upper
    if [[ ! -x $OVL_RUN ]] || ! "$OVL_RUN" --help >/dev/null 2>&1; then
        record ovl ovlrun_true "$rep" SKIP
        record ovl ovlrun_commit "$rep" SKIP
        return
    fi
    rm -rf "$ru" "$DATA/.run-upper.ovl-work"
    timed ovlrun_true ovl "$rep" "$OVL_RUN" -q --lower "$LOWER" --upper "$ru" -- true
    rm -rf "$ru" "$DATA/.run-upper.ovl-work"
    # The commit merges the upper into the lower: a scratch lower, never the shared one.
    rm -rf "$cl" "$ru"; mkdir -p "$cl"
    drop_caches
    timed ovlrun_commit ovl "$rep" bash -c 'cd "$1" && "$2" -q --lower "$1" --upper "$3" --on-exit commit -- tar xf "$4"' \
        _ "$cl" "$OVL_RUN" "$ru" "$CREATE_TAR"
    check ovl ovlrun_commit "$rep" "$NFILES files committed into the lower" count_files "$cl" $NFILES
    rm -rf "$cl" "$ru" "$DATA/.run-upper.ovl-work"
}

# Peak RSS of the FUSE daemons after stat-ing 200 000 files (one run each, fresh mount).
rss_suite() {
    local fs m pid
    for fs in $FS_LIST; do
        [[ $fs != ovl-user ]] || continue
        if [[ $fs == plain ]]; then
            m=$LOWER_HUGE
        else
            fs_mount "$fs" "$LOWER_HUGE" "$UPPER" "$WDIR" "$MNT"
            m=$MNT
        fi
        log "$fs, 200k-file stat"
        drop_caches; timed stat_huge "$fs" 1 w_stat_huge "$m"
        if [[ $fs == fuse-overlayfs || $fs == ovl ]]; then
            pid=$(daemon_pid "$MNT" || true)
            if [[ -n $pid ]]; then
                awk -v f="$fs" -v n="$(ls "/proc/$pid/fd" | wc -l)" '/^VmHWM|^VmRSS/ { v[$1] = $2 }
                    END { print f "\t" v["VmHWM:"] "\t" v["VmRSS:"] "\t" n }' "/proc/$pid/status" >>"$RES/rss.tsv"
            fi
        fi
        [[ $fs == plain ]] || fs_umount "$MNT"
    done
}

# Stats the 20k-file tree through ovl with the inherited RLIMIT_NOFILE; prints the outcome.
ovl_nofile_check() {
    [[ " $FS_LIST " == *" ovl "* ]] || { echo "not run"; return; }
    local soft=${NOFILE_INHERITED%/*} hard=${NOFILE_INHERITED#*/} out
    out=$( (ulimit -Hn "$hard" && ulimit -Sn "$soft" && fs_mount ovl "$LOWER" "$UPPER" "$WDIR" "$MNT") 2>&1 >/dev/null) ||
        { echo "mount failed: $out"; return; }
    drop_caches
    if out=$(w_stat "$MNT" 2>&1); then
        echo "stat of the 20k-file tree works under $NOFILE_INHERITED"
    else
        echo "stat of the 20k-file tree FAILS under $NOFILE_INHERITED: $(grep -c . <<<"$out") errors, e.g. '$(head -1 <<<"$out")'"
    fi
    fs_umount "$MNT"
}

# ---------------------------------------------------------------------------------------
ensure_fixtures

OVL_NOFILE=$(ovl_nofile_check)
USER_OK="not run"
if [[ " $FS_LIST " == *" ovl-user "* ]]; then
    USER_OK=$(user_setup)
    [[ $USER_OK == ok ]] || log "ovl-user rows skipped: $USER_OK"
fi
case ${SMALL_TREE:-auto} in
    auto) if [[ $OVL_NOFILE == *FAILS* ]]; then SMALL=1; else SMALL=; fi ;;
    1) SMALL=1 ;;
    *) SMALL= ;;
esac

{
    echo "small_tree=${SMALL:-0}"
    echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "nproc=$(nproc)"
    echo "kernel=$(uname -r)"
    echo "cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
    echo "mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
    if [[ $BENCH_STORAGE == ram ]]; then
        echo "workfs=$(findmnt -n -o FSTYPE,SOURCE,OPTIONS --mountpoint "$DATA" | tr -s ' ') (RAM-backed block device: cold = caches dropped, no disk latency)"
    elif [[ $BENCH_STORAGE == disk ]]; then
        echo "workfs=$(findmnt -n -o FSTYPE,OPTIONS --mountpoint "$DATA" | tr -s ' ') on a loop device over a sparse image on host $(findmnt -n -o FSTYPE,SOURCE,OPTIONS -T "$WORK" | tr -s ' ')"
    else
        echo "workfs=$(findmnt -n -o FSTYPE,SOURCE,OPTIONS -T "$DATA" | tr -s ' ')"
    fi
    echo "nofile=inherited soft/hard $NOFILE_INHERITED, $(ulimit -Sn)/$(ulimit -Hn) for the run (raised to fs.nr_open where CAP_SYS_RESOURCE allows)"
    echo "ovl_inherited_nofile=$OVL_NOFILE"
    [[ $USER_OK == "not run" ]] || echo "ovl_user=$([[ $USER_OK == ok ]] && echo "user $BENCH_USER (uid $(id -u "$BENCH_USER")), ovl-run --lower LOWER --upper U --mountpoint M --on-exit discard -- bash session; lower chowned to the user" || echo "skipped: $USER_OK")"
    echo "fuse_overlayfs=$(fuse-overlayfs --version 2>&1 | awk '/fuse-overlayfs: version/ { print $3 }')"
    echo "ovl=$(cd "$BENCH_DIR/.." && git rev-parse --short HEAD 2>/dev/null)$(cd "$BENCH_DIR/.." &&
        git diff --quiet HEAD -- src Cargo.toml 2>/dev/null ||
        echo " + uncommitted changes to $(git diff --name-only HEAD -- src Cargo.toml | tr '\n' ' ')(diff sha1 $(git diff HEAD -- src Cargo.toml | sha1sum | cut -c1-10))")"
    [[ -x $OVL_RUN ]] && echo "ovl_run=$OVL_RUN ($(date -u -r "$OVL_RUN" '+%Y-%m-%d %H:%M UTC'))"
    echo "ovl_mount=$OVL_MOUNT ($(date -u -r "$OVL_MOUNT" '+%Y-%m-%d %H:%M UTC'))$(
        [[ -n $(find "$BENCH_DIR/../src" "$BENCH_DIR/../Cargo.toml" -newer "$OVL_MOUNT" 2>/dev/null | head -1) ]] &&
            echo ' — OLDER than the sources above: results are for an earlier build (use --build)')"
    echo "python=$PY_SRC_BIN $PY_VER ($(find "$LOWER/py" -type f | wc -l) files)"
    echo "reps=$REPS"
    echo "load_start=$(cut -d' ' -f1-3 /proc/loadavg) (1/5/15-min load average when the run started)"
} >"$RES/meta.txt"

read -ra FS_ARR <<<"$FS_LIST"
for ((rep = 1; rep <= REPS; rep++)); do
    # Rotate the order each repetition so no filesystem always runs first or last.
    n=${#FS_ARR[@]}
    for ((k = 0; k < n; k++)); do
        suite "${FS_ARR[(k + rep - 1) % n]}" "$rep"
    done
    if [[ -n $SMALL ]]; then
        for ((k = 0; k < n; k++)); do
            suite_small "${FS_ARR[(k + rep - 1) % n]}" "$rep"
        done
    fi
    if [[ " $FS_LIST " == *" ovl "* ]]; then ovlrun_suite "$rep"; fi
done
rss_suite
rm -rf "$UPPER" "$WDIR"

RUN_SECS=$(awk -v s="$RUN_START" -v e="$EPOCHREALTIME" 'BEGIN { printf "%.0f", e - s }')
echo "runtime=${RUN_SECS} s (fixtures ${FIXTURES_NOTE:-?})" >>"$RES/meta.txt"
echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$RES/meta.txt"
for f in "$RES"/mountopts.*; do
    [[ -f $f ]] && echo "mount_${f##*.}=$(awk '{ print $3 " " $4 }' "$f")" >>"$RES/meta.txt"
done
/usr/bin/python3 "$BENCH_DIR/report.py" "$RES" "$FS_LIST" | tee "$OUT"
log "wrote $OUT (raw data in $RES); total ${RUN_SECS} s"
