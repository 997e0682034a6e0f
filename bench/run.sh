#!/usr/bin/env bash
# bench/run.sh — one command: the same workloads, in one run, on a plain directory (a copy of
# the lower), kernel overlayfs, fuse-overlayfs and ovl (ovl-mount), over the same generated
# lower tree, a fresh upper per repetition; median of REPS runs; table of seconds and ratios
# to kernel overlayfs, printed and written to bench/results.md. Run as root.
# The ovl-run columns are ovl-run sessions, one per backend and user, so no column changes
# backend with ovl-run's default: `ovlrun-fuse` / `ovlrun-kernel` run
# `ovl-run --backend fuse|kernel` as root, `ovlrun-user-fuse` / `ovlrun-user-kernel` as a
# normal user (user + mount namespace; FUSE without passthrough). A user (OVL_BENCH_USER,
# default ovl-bench, created if missing) gets the lower chowned to it so it may write and
# delete (root ignores ownership, the other contenders are unaffected). Each repetition runs
# one ovl-run session per column, whose command executes the timed workloads sent by this
# script (so drop_caches and checks stay here), after checking it runs on the filesystem its
# backend names (overlayfs or fuseblk). `ovl-user` is accepted for `ovlrun-user-fuse`.
#
#   bench/run.sh [--build] [--quick] [--reps N] [--fs "plain kernel ... ovlrun-user-kernel"]
#                [--out FILE]
#
#   --build   build ovl first (cargo build --release into $CARGO_TARGET_DIR)
#   --quick   prove the script works, not a measurement: 1 repetition over tiny fixtures
#             (2 000-file trees, 16 MiB big file) in /tmp/ovl-bench-quick (OVL_BENCH_DIR), the
#             report written to that dir (not bench/results.md) unless --out is given
# Environment: see bench/lib.sh (OVL_BENCH_DIR, CARGO_TARGET_DIR, OVL_MOUNT, OVL_RUN, REGEN,
# BENCH_STORAGE), and SMALL_TREE=auto|1|0: also run the tree workloads on a 10 000-file tree
# (auto: when ovl cannot stat the 20 000-file tree under the inherited RLIMIT_NOFILE).
# Fixtures are generated under $OVL_BENCH_DIR (default /tmp/ovl-bench) on a private RAM-backed
# ext4 (see bench/lib.sh for why), which is unmounted and freed at the end, even on failure.
set -euo pipefail
export LC_ALL=C

QUICK=
for a; do [[ $a == --quick ]] && QUICK=1; done
# Quick runs never share a work dir (or fixtures) with full ones.
[[ -z $QUICK ]] || export OVL_BENCH_DIR=${OVL_BENCH_DIR:-/tmp/ovl-bench-quick}

source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPS=3
FS_LIST="plain kernel fuse-overlayfs ovl ovlrun-fuse ovlrun-kernel ovlrun-user-fuse ovlrun-user-kernel"
OUT=$BENCH_DIR/results.md
BUILD=
while (($#)); do
    case $1 in
        --build) BUILD=1 ;;
        --quick) ;;
        --reps) REPS=$2; shift ;;
        --fs) FS_LIST=$2; shift ;;
        --out) OUT=$2; shift ;;
        -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
done
FS_LIST=$(sed -E 's/(^| )ovl-user( |$)/\1ovlrun-user-fuse\2/g' <<<"$FS_LIST")
if [[ -n $QUICK ]]; then
    REPS=1
    [[ $OUT != "$BENCH_DIR/results.md" ]] || OUT=$WORK/results-quick.md
    TREE_DIRS=20 SMALL_DIRS=10 HUGE_DIRS=20 BIG_MIB=16
    FIXTURE_VERSION="quick small=${SMALL_DIRS} tree=${TREE_DIRS}x${TREE_FILES}x${TREE_MAX} big=${BIG_MIB} huge=${HUGE_DIRS}x${HUGE_FILES} py=$PY_SRC_BIN"
fi

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

trap 'session_abort; cleanup_mounts; umount_data' EXIT
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
    if [[ $fs == ovlrun-* ]]; then
        suite_session "$fs" "$rep"
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
    [[ $fs != ovlrun-* ]] || return 0
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

# --- ovl-run sessions: a column per backend, as root and as a normal user ---------------------
BENCH_USER=${OVL_BENCH_USER:-ovl-bench}
declare -A SESSION_OK  # column -> ok, or why it is skipped

# A column's user (root or user) and backend (fuse or kernel): ovlrun[-user]-BACKEND.
col_who() { if [[ $1 == ovlrun-user-* ]]; then echo user; else echo root; fi; }
col_backend() { echo "${1##*-}"; }
# The column's directory: upper (+ its work dir beside it), mount point, FIFOs, cache; owned
# by whoever runs the session.
col_dir() { echo "$DATA/$1"; }
# What `stat -f -c %T` says in the mount of a backend.
col_fstype() { if [[ $(col_backend "$1") == kernel ]]; then echo overlayfs; else echo fuseblk; fi; }

# run_as COL CMD...: runs CMD as the column's user, with a minimal environment, HOME in the
# column's directory (root: no PAM, the same environment).
run_as() {
    local col=$1 d
    d=$(col_dir "$col")
    shift
    local env=(env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$d" XDG_CACHE_HOME="$d/cache" LC_ALL=C)
    if [[ $(col_who "$col") == user ]]; then
        setpriv --reuid="$(id -u "$BENCH_USER")" --regid="$(id -g "$BENCH_USER")" --clear-groups \
            "${env[@]}" "$@"
    else
        "${env[@]}" "$@"
    fi
}

# The column's ovl-run with its backend pinned: ovl-run OPTS... (as the column's user).
col_ovlrun() { run_as "$1" "$OVL_RUN" -q --backend "$(col_backend "$1")" "${@:2}"; }

# Sets up every ovl-run column of FS_LIST (the user, the lower chowned to it, a probe run on
# the column's backend); SESSION_OK says per column ok or why not.
session_setup() {
    local fs d why user_why=
    for fs in $FS_LIST; do
        [[ $fs == ovlrun-* ]] || continue
        case $fs in ovlrun-fuse | ovlrun-kernel | ovlrun-user-fuse | ovlrun-user-kernel) ;;
            *) die "unknown column $fs (ovlrun-fuse, ovlrun-kernel, ovlrun-user-fuse, ovlrun-user-kernel)" ;;
        esac
        why=
        if [[ ! -x $OVL_RUN ]]; then
            why="ovl-run not built ($OVL_RUN)"
        elif [[ $(col_who "$fs") == user ]]; then
            if [[ -z $user_why ]]; then
                user_why=ok
                if ! id -u "$BENCH_USER" >/dev/null 2>&1 && ! useradd -M -s /bin/sh "$BENCH_USER"; then
                    user_why="cannot create user $BENCH_USER"
                elif ! command -v setpriv >/dev/null; then
                    user_why="setpriv (util-linux) missing"
                else
                    chown -R "$BENCH_USER:" "$LOWER"
                    chmod 755 "$DATA"
                fi
            fi
            [[ $user_why == ok ]] || why=$user_why
        fi
        if [[ -z $why ]]; then
            d=$(col_dir "$fs")
            rm -rf "$d"; mkdir -p "$d"
            [[ $(col_who "$fs") == root ]] || chown "$BENCH_USER:" "$d"
            if ! (cd "$d" && col_ovlrun "$fs" --lower "$LOWER" --upper "$d/u0" --mountpoint "$d/m0" \
                --on-exit discard -- sh -c 'test -f big && stat -f -c %T .' >"$RES/$fs-probe.out" 2>"$RES/$fs-probe.err"); then
                why="ovl-run --backend $(col_backend "$fs") as $(col_who "$fs") failed: $(head -c 300 "$RES/$fs-probe.err")"
            elif [[ $(<"$RES/$fs-probe.out") != "$(col_fstype "$fs")" ]]; then
                why="ovl-run --backend $(col_backend "$fs") ran on $(<"$RES/$fs-probe.out"), not $(col_fstype "$fs")"
            fi
        fi
        SESSION_OK[$fs]=${why:-ok}
        [[ -z $why ]] || log "$fs rows skipped: $why"
    done
}

# Starts column COL's ovl-run session: a bash loop inside the mount that reads one command per
# line from DIR/in, runs it (timed there, with the workload functions of lib.sh) and answers
# "STATUS SECONDS" on DIR/out. The session first says which filesystem it runs on.
session_start() {
    local fs=$1 d
    d=$(col_dir "$fs")
    rm -rf "$d/upper" "$d/.upper.ovl-work" "$d/mnt" "$d/in" "$d/out"
    mkfifo "$d/in" "$d/out"
    {
        declare -p PY_IMPORTS BIG_MIB CREATE_TAR CREATE10K_TAR
        declare -f w_stat w_read w_py w_seqread w_seqwrite w_smallwrite w_rtt w_copyup w_create \
            w_delete size_is count_files
        cat <<'EOS'
exec 3<"$1/in" 4>"$1/out"
echo "ready $(stat -f -c %T .)" >&4
while IFS= read -r line <&3; do
    [[ $line == quit ]] && break
    s=$EPOCHREALTIME
    if eval "$line" >/dev/null 2>>"$1/session.err"; then rc=0; else rc=1; fi
    e=$EPOCHREALTIME
    echo "$rc $(awk -v s="$s" -v e="$e" 'BEGIN { printf "%.3f", e - s }')" >&4
done
EOS
    } >"$d/session.sh"
    [[ $(col_who "$fs") == root ]] || chown "$BENCH_USER:" "$d"/{in,out,session.sh}
    (cd "$d" && col_ovlrun "$fs" --lower "$LOWER" --upper "$d/upper" --mountpoint "$d/mnt" \
        --on-exit discard -- bash "$d/session.sh" "$d" >>"$RES/$fs-session.log" 2>&1) &
    SESSION=$!
    exec {UIN}>"$d/in" {UOUT}<"$d/out"
    local ready
    read -r ready <&"$UOUT"
    [[ $ready == "ready $(col_fstype "$fs")" ]] ||
        { log "  $fs: the session runs on '${ready#ready }', not $(col_fstype "$fs")"; session_stop "$fs"; return 1; }
}
session_stop() {
    echo quit >&"$UIN"
    exec {UIN}>&- {UOUT}<&-
    wait "$SESSION" || log "  $1 session ended with status $?"
    SESSION=
}
# On exit: closing the FIFO ends the session's loop; ovl-run then unmounts and discards.
session_abort() {
    [[ -n ${SESSION:-} ]] || return 0
    exec {UIN}>&- {UOUT}<&- 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$SESSION" 2>/dev/null || return 0
        sleep 0.1
    done
    kill "$SESSION" 2>/dev/null || true
}
# ucmd CMD...: runs CMD in the session; sets URC (0 = success) and USECS.
ucmd() {
    printf '%q ' "$@" >&"$UIN"
    echo >&"$UIN"
    read -r URC USECS <&"$UOUT"
}
ucheck() { ucmd "$@"; [[ $URC == 0 ]]; }
# utimed FS ID REP CMD...: like `timed`, for the session (the time is taken inside it).
utimed() {
    local fs=$1 id=$2 rep=$3 v
    shift 3
    ucmd "$@"
    if [[ $URC == 0 ]]; then v=$USECS; else v=FAIL; log "  $fs $id rep $rep FAILED: $(tail -c 400 "$(col_dir "$fs")/session.err" 2>/dev/null)"; fi
    record "$fs" "$id" "$rep" "$v"
    [[ $v == FAIL ]] || log "  $fs $id rep $rep: $v s"
}

# One repetition of the main workloads in one ovl-run session of column FS (fresh upper).
suite_session() {
    local fs=$1 rep=$2 d m
    d=$(col_dir "$fs")
    m=$d/mnt
    if [[ ${SESSION_OK[$fs]} != ok ]]; then
        local id
        for id in stat_cold stat_warm read_cold read_warm py_cold py_warm seqread seqwrite \
            smallwrite rtt copyup create delete cycle; do
            record "$fs" "$id" "$rep" SKIP
        done
        return
    fi
    log "$fs, repetition $rep"
    session_start "$fs" || { log "  $fs: session did not start: $(tail -c 400 "$RES/$fs-session.log")"; return; }
    drop_caches; utimed "$fs" stat_cold "$rep" w_stat "$m"
    utimed "$fs" stat_warm "$rep" w_stat "$m"
    drop_caches; utimed "$fs" read_cold "$rep" w_read "$m"
    utimed "$fs" read_warm "$rep" w_read "$m"
    drop_caches; utimed "$fs" py_cold "$rep" w_py "$m"
    utimed "$fs" py_warm "$rep" w_py "$m"
    drop_caches; utimed "$fs" seqread "$rep" w_seqread "$m"
    drop_caches; utimed "$fs" seqwrite "$rep" w_seqwrite "$m"
    check "$fs" seqwrite "$rep" "size" ucheck size_is "$m/seqw" $((BIG_MIB << 20))
    ucmd truncate -s 0 "$m/small"
    utimed "$fs" smallwrite "$rep" w_smallwrite "$m"
    check "$fs" smallwrite "$rep" "size" ucheck size_is "$m/small" $((4096 * 4096))
    utimed "$fs" rtt "$rep" w_rtt "$m"
    drop_caches; utimed "$fs" copyup "$rep" w_copyup "$m"
    check "$fs" copyup "$rep" "size" ucheck size_is "$m/big" $(((BIG_MIB << 20) + 1))
    ucmd mkdir "$m/new"
    drop_caches; utimed "$fs" create "$rep" w_create "$m"
    check "$fs" create "$rep" "$NFILES files" ucheck count_files "$m/new" $NFILES
    drop_caches; utimed "$fs" delete "$rep" w_delete "$m"
    check "$fs" delete "$rep" "gone" ucheck test ! -e "$m/deltree"
    session_stop "$fs"
    rm -rf "$d/upper" "$d/.upper.ovl-work"
    # End to end: ovl-run mounts, runs `true`, unmounts, discards (fresh upper).
    timed cycle "$fs" "$rep" col_ovlrun "$fs" --lower "$LOWER" --upper "$d/upper" \
        --mountpoint "$d/mnt" --on-exit discard -- true
    rm -rf "$d/upper" "$d/.upper.ovl-work"
}

mount_true_umount() {
    fs_mount "$1" "$LOWER" "$UPPER" "$WDIR" "$MNT" && true && fs_umount "$MNT"
}

# ovl-run end to end, as root, in each root ovl-run column (its backend pinned): ovl-run
# mounts, starts the command in the mount at the caller's cwd relative to the lower, waits for
# it, unmounts and finalizes; the upper (default <lower>_upper) and its work dir
# (.<upper>.ovl-work) are put in $DATA here and removed after each timed run.
ovlrun_suite() {
    local rep=$1 fs b cl=$DATA/commit-lower ru=$DATA/run-upper
    for fs in $FS_LIST; do
        [[ $fs == ovlrun-fuse || $fs == ovlrun-kernel ]] || continue
        if [[ ${SESSION_OK[$fs]} != ok ]]; then
            record "$fs" ovlrun_true "$rep" SKIP
            record "$fs" ovlrun_commit "$rep" SKIP
            continue
        fi
        b=$(col_backend "$fs")
        rm -rf "$ru" "$DATA/.run-upper.ovl-work"
        timed ovlrun_true "$fs" "$rep" "$OVL_RUN" -q --backend "$b" --lower "$LOWER" --upper "$ru" -- true
        rm -rf "$ru" "$DATA/.run-upper.ovl-work"
        # The commit merges the upper into the lower: a scratch lower, never the shared one.
        rm -rf "$cl" "$ru"; mkdir -p "$cl"
        drop_caches
        timed ovlrun_commit "$fs" "$rep" bash -c 'cd "$1" && "$2" -q --backend "$5" --lower "$1" --upper "$3" --on-exit commit -- tar xf "$4"' \
            _ "$cl" "$OVL_RUN" "$ru" "$CREATE_TAR" "$b"
        check "$fs" ovlrun_commit "$rep" "$NFILES files committed into the lower" count_files "$cl" $NFILES
        rm -rf "$cl" "$ru" "$DATA/.run-upper.ovl-work"
    done
}

# Peak RSS of the FUSE daemons after stat-ing 200 000 files (one run each, fresh mount).
rss_suite() {
    local fs m pid
    for fs in $FS_LIST; do
        [[ $fs != ovlrun-* ]] || continue
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
session_setup
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
    for fs in $FS_LIST; do
        [[ $fs == ovlrun-* ]] || continue
        if [[ ${SESSION_OK[$fs]} == ok ]]; then
            echo "session_$fs=ovl-run --backend $(col_backend "$fs") as $(if [[ $(col_who "$fs") == user ]]; then echo "user $BENCH_USER (uid $(id -u "$BENCH_USER"); lower chowned to it)"; else echo root; fi), --lower LOWER --upper U --mountpoint M --on-exit discard -- bash session; ran on $(col_fstype "$fs")"
        else
            echo "session_$fs=skipped: ${SESSION_OK[$fs]}"
        fi
    done
    [[ -z $QUICK ]] || echo "quick=1 (--quick: tiny fixtures, 1 repetition: proves the script, measures nothing)"
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
    ovlrun_suite "$rep"
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
