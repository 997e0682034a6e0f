#!/usr/bin/env bash
# app.run against AppImage's engine (squashfuse on `mksquashfs -comp zstd`) and the plain
# directory, for two apps: a Python interpreter with its standard library (small), and a whole
# Python distribution with its site-packages (large: >= 500 MB, >= 40 000 files). Per app:
# bundle size and pack time (ovl-pack against mksquashfs, both on every core), then start-up:
# app.run's first run (empty cache and state), later runs cold and warm, squashfuse mount + run + umount
# cold and warm, the plain directory cold and warm, and the disk the cache grew by.
# Median of $REPS runs; writes bench/results-bundle.md.
#   bench/bundle.sh [--build]        as root (drops caches between runs)
#   BIG_PY=/opt/python3.11 bench/bundle.sh   the large app's tree (default: sys.base_prefix of
#                                             the python3 on PATH); LARGE=0 skips it
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH_DIR")
REPS=${REPS:-5}
LARGE_REPS=${LARGE_REPS:-3}
WORK=${OVL_BENCH_DIR:-/tmp/ovl-bench}/bundle
OUT=${OUT:-$BENCH_DIR/results-bundle.md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-bench}
[[ $(id -u) == 0 ]] || { echo "bench/bundle.sh: run as root (it drops the page cache)" >&2; exit 1; }
for tool in mksquashfs squashfuse fusermount3 bc; do
    command -v $tool >/dev/null || { echo "bench/bundle.sh: needs $tool (apt install squashfs-tools squashfuse fuse3 bc)" >&2; exit 1; }
done

RUNTIME=$("$REPO/packaging/build-runtime.sh")
if [[ ${1:-} == --build || ! -x $CARGO_TARGET_DIR/release/ovl-pack ]]; then
    (cd "$REPO" && cargo build --release --quiet --bin ovl-pack)
fi
PACK=$CARGO_TARGET_DIR/release/ovl-pack

rm -rf "$WORK"
mkdir -p "$WORK"
cleanup() {
    mountpoint -q "$WORK/sq" 2>/dev/null && fusermount3 -u "$WORK/sq"
    rm -rf "$WORK"
}
trap cleanup EXIT

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# Seconds a command takes (wall clock).
timed() {
    local s=$EPOCHREALTIME
    "$@" >/dev/null
    printf '%.3f\n' "$(echo "$EPOCHREALTIME - $s" | bc)"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mib() { echo "scale=1; $1 / 1048576" | bc; }
ratio() { printf '%.2f' "$(echo "scale=4; $1 / $2" | bc)"; }

# The app: $1/app holds python (bin/python3 + its library) and an AppRun.
make_app() {
    local dir=$1 prefix=$2 pybin=$3
    mkdir -p "$dir"
    if [[ -n $prefix ]]; then
        cp -a "$prefix" "$dir/py"
    else
        mkdir -p "$dir/py/bin" "$dir/py/lib"
        cp -a "$pybin" "$dir/py/bin/python3"
        local ver lib
        ver=$("$pybin" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        lib=$("$pybin" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
        cp -a "$lib" "$dir/py/lib/python$ver"
    fi
    cat >"$dir/AppRun" <<'EOF'
#!/bin/sh
export PYTHONHOME="$APPDIR/py" PYTHONDONTWRITEBYTECODE=1
exec "$APPDIR/py/bin/python3" "$@"
EOF
    chmod +x "$dir/AppRun"
}

# One app: packs it both ways, times its start-ups, appends a section to $REPORT.
bench_app() {
    local title=$1 app=$2 imports=$3 reps=$4
    local files tree_mib
    files=$(find "$app" -type f | wc -l)
    tree_mib=$(du -sm "$app" | cut -f1)
    rm -f "$WORK/app.run" "$WORK/app.sqfs"
    drop_caches
    local t0=$EPOCHREALTIME
    "$PACK" "$app" -o "$WORK/app.run" --name app --runtime "$RUNTIME" 2>/dev/null
    local pack_s
    pack_s=$(printf '%.1f' "$(echo "$EPOCHREALTIME - $t0" | bc)")
    drop_caches
    t0=$EPOCHREALTIME
    mksquashfs "$app" "$WORK/app.sqfs" -comp zstd -noappend -quiet -no-progress >/dev/null
    local sq_s
    sq_s=$(printf '%.1f' "$(echo "$EPOCHREALTIME - $t0" | bc)")
    local run_b sq_b
    run_b=$(stat -c %s "$WORK/app.run")
    sq_b=$(stat -c %s "$WORK/app.sqfs")

    export HOME=$WORK/home XDG_CACHE_HOME=$WORK/home/cache XDG_DATA_HOME=$WORK/home/data
    mkdir -p "$WORK/sq"
    plain() { APPDIR=$app "$app/AppRun" -c "$imports"; }
    bundle() { (cd "$WORK" && ./app.run -c "$imports"); }
    squash() {
        squashfuse "$WORK/app.sqfs" "$WORK/sq" && APPDIR=$WORK/sq "$WORK/sq/AppRun" -c "$imports"
        fusermount3 -u "$WORK/sq"
    }
    # A first run starts without state (it makes the kept upper and its records, synced);
    # later runs find the state the first one left. The app writes nothing
    # (PYTHONDONTWRITEBYTECODE), so every later run sees the same state.
    fresh_upper() { rm -rf "$XDG_DATA_HOME"; }
    declare -A R=()
    local cache_kib=0
    for ((i = 0; i < reps; i++)); do
        drop_caches; R[plain_cold]+="$(timed plain) "
        R[plain_warm]+="$(timed plain) "
        rm -rf "$XDG_CACHE_HOME"; fresh_upper; drop_caches
        R[first]+="$(timed bundle) "
        cache_kib=$(du -sk "$XDG_CACHE_HOME" | cut -f1)
        drop_caches; R[later_cold]+="$(timed bundle) "
        R[later_warm]+="$(timed bundle) "
        drop_caches; R[sq_cold]+="$(timed squash) "
        R[sq_warm]+="$(timed squash) "
    done
    m() { tr ' ' '\n' <<<"${R[$1]}" | grep . | median; }
    local pc pw
    pc=$(m plain_cold) pw=$(m plain_warm)
    {
        echo "## $title"
        echo
        echo "$files files, $tree_mib MiB; the AppRun runs \`python3 -c '$imports'\`. Median of $reps runs;"
        echo "cold = page cache dropped before the run."
        echo
        echo "| | bytes | MiB | ÷ mksquashfs | pack seconds | ÷ mksquashfs |"
        echo "|---|---:|---:|---:|---:|---:|"
        echo "| app.run (ovl-pack, runtime included) | $run_b | $(mib "$run_b") | $(ratio "$run_b" "$sq_b")× | $pack_s | $(ratio "$pack_s" "$sq_s")× |"
        echo "| mksquashfs -comp zstd | $sq_b | $(mib "$sq_b") | 1.00× | $sq_s | 1.00× |"
        echo
        echo "Of the bundle, the static runtime is $(stat -c %s "$RUNTIME") bytes; the rest (the tree's image, the manifest and"
        echo "the trailer) is $(ratio "$((run_b - $(stat -c %s "$RUNTIME")))" "$sq_b")× the squashfs image."
        echo
        echo "| start | seconds | ÷ plain directory (same cache state) |"
        echo "|---|---:|---:|"
        echo "| plain directory, cold | $pc | 1.00× |"
        echo "| plain directory, warm | $pw | 1.00× |"
        echo "| app.run, first run (empty cache and state: mount the image in place, run), cold | $(m first) | $(ratio "$(m first)" "$pc")× |"
        echo "| app.run, later run, cold | $(m later_cold) | $(ratio "$(m later_cold)" "$pc")× |"
        echo "| app.run, later run, warm | $(m later_warm) | $(ratio "$(m later_warm)" "$pw")× |"
        echo "| squashfuse mount + run + umount, cold | $(m sq_cold) | $(ratio "$(m sq_cold)" "$pc")× |"
        echo "| squashfuse mount + run + umount, warm | $(m sq_warm) | $(ratio "$(m sq_warm)" "$pw")× |"
        echo
        echo "Disk the first run added to the cache: $(mib $((cache_kib * 1024))) MiB (squashfuse: none)."
        echo
        echo "<details><summary>Every run (seconds)</summary>"
        echo
        for k in plain_cold plain_warm first later_cold later_warm sq_cold sq_warm; do echo "- $k: ${R[$k]}"; done
        echo
        echo "</details>"
        echo
    } >>"$REPORT"
    rm -rf "$XDG_CACHE_HOME" "$XDG_DATA_HOME"
}

REPORT=$WORK/report.md
{
    echo "# app.run start-up, size and packing (bench/bundle.sh)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, kernel $(uname -r), load at start $(cut -d' ' -f1-3 /proc/loadavg),"
    echo "ovl $(git -C "$REPO" rev-parse --short HEAD); $(mksquashfs -version 2>&1 | head -1); squashfuse $(dpkg-query -W -f '${Version}' squashfuse 2>/dev/null)."
    echo "dwarfs: not in this system's apt repositories, not measured."
    echo
} >"$REPORT"

SMALL_PY=$(readlink -f /usr/bin/python3)
make_app "$WORK/small" "" "$SMALL_PY"
bench_app "Python $("$SMALL_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])') and its standard library" \
    "$WORK/small" 'import json, re, decimal, email, http.client, sqlite3, asyncio, unittest, xml.etree.ElementTree, argparse, logging, csv' "$REPS"
rm -rf "$WORK/small"

if [[ ${LARGE:-1} != 0 ]]; then
    BIG_PY=${BIG_PY:-$(python3 -c 'import sys; print(sys.base_prefix)')}
    files=$(find "$BIG_PY" -type f | wc -l)
    mb=$(du -sm "$BIG_PY" | cut -f1)
    if ((files < 40000 || mb < 500)); then
        echo "bench/bundle.sh: $BIG_PY has $files files, $mb MiB: the large case wants >= 40 000 files and >= 500 MB;" \
             "point BIG_PY at a bigger Python prefix (e.g. pip install into it), or LARGE=0" >&2
        exit 1
    fi
    make_app "$WORK/large" "$BIG_PY" ""
    bench_app "A Python distribution with site-packages ($BIG_PY)" "$WORK/large" 'import json, sqlite3, email' "$LARGE_REPS"
fi
tee "$OUT" <"$REPORT"
