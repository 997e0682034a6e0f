#!/usr/bin/env bash
# app.run start-up: a Python interpreter and its standard library bundled with ovl-pack, started
# for the first time (empty cache: the tree is extracted) and again (cached), against the same
# tree run from a plain directory. Median of $REPS runs; writes bench/results-bundle.md.
#   bench/bundle.sh [--build]            as root (drops caches between runs)
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH_DIR")
REPS=${REPS:-5}
WORK=${OVL_BENCH_DIR:-/tmp/ovl-bench}/bundle
OUT=${OUT:-$BENCH_DIR/results-bundle.md}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-bench}
[[ $(id -u) == 0 ]] || { echo "bench/bundle.sh: run as root (it drops the page cache)" >&2; exit 1; }

RUNTIME=$("$REPO/packaging/build-runtime.sh")
if [[ ${1:-} == --build || ! -x $CARGO_TARGET_DIR/release/ovl-pack ]]; then
    (cd "$REPO" && cargo build --release --quiet --bin ovl-pack)
fi
PACK=$CARGO_TARGET_DIR/release/ovl-pack

PY_BIN=$(readlink -f /usr/bin/python3)
PY_VER=$("$PY_BIN" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PY_LIB=$("$PY_BIN" -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
IMPORTS='import json, re, decimal, email, http.client, sqlite3, asyncio, unittest, xml.etree.ElementTree, argparse, logging, csv'

rm -rf "$WORK"
mkdir -p "$WORK/app/py/bin" "$WORK/app/py/lib"
trap 'rm -rf "$WORK"' EXIT
cp -a "$PY_BIN" "$WORK/app/py/bin/python3"
cp -a "$PY_LIB" "$WORK/app/py/lib/python$PY_VER"
cat >"$WORK/app/AppRun" <<'EOF'
#!/bin/sh
export PYTHONHOME="$APPDIR/py" PYTHONDONTWRITEBYTECODE=1
exec "$APPDIR/py/bin/python3" "$@"
EOF
chmod +x "$WORK/app/AppRun"
files=$(find "$WORK/app" -type f | wc -l)
tree_mib=$(du -sm "$WORK/app" | cut -f1)

t0=$EPOCHREALTIME
"$PACK" "$WORK/app" -o "$WORK/py.run" --runtime "$RUNTIME" 2>/dev/null
pack_s=$(printf '%.1f' "$(echo "$EPOCHREALTIME - $t0" | bc)")
bundle_mib=$(echo "scale=1; $(stat -c %s "$WORK/py.run") / 1048576" | bc)

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# Seconds a command takes (wall clock).
timed() {
    local s=$EPOCHREALTIME
    "$@" >/dev/null
    printf '%.3f\n' "$(echo "$EPOCHREALTIME - $s" | bc)"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

export HOME=$WORK/home XDG_CACHE_HOME=$WORK/home/cache XDG_DATA_HOME=$WORK/home/data
plain() { APPDIR=$WORK/app "$WORK/app/AppRun" -c "$IMPORTS"; }
bundle() { (cd "$WORK" && ./py.run -c "$IMPORTS"); }
# The upper would keep nothing (PYTHONDONTWRITEBYTECODE), but start each run from the same state.
fresh_upper() { rm -rf "$XDG_DATA_HOME"; }

declare -A R
for ((i = 0; i < REPS; i++)); do
    drop_caches; R[plain_cold]+="$(timed plain) "
    R[plain_warm]+="$(timed plain) "
    rm -rf "$XDG_CACHE_HOME"; fresh_upper; drop_caches
    R[first]+="$(timed bundle) "
    fresh_upper; drop_caches; R[second_cold]+="$(timed bundle) "
    fresh_upper; R[second_warm]+="$(timed bundle) "
done
m() { tr ' ' '\n' <<<"${R[$1]}" | grep . | median; }
ratio() { printf '%.2f' "$(echo "scale=4; $1 / $2" | bc)"; }
pc=$(m plain_cold) pw=$(m plain_warm)
{
    echo "# app.run start-up (bench/bundle.sh)"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, kernel $(uname -r), load at end $(cut -d' ' -f1-3 /proc/loadavg),"
    echo "ovl $(git -C "$REPO" rev-parse --short HEAD). App: python $PY_VER and its standard library"
    echo "($files files, $tree_mib MiB) with an AppRun that runs \`python3 -c '$IMPORTS'\`."
    echo "Bundle: $bundle_mib MiB (static runtime included), packed in ${pack_s}s. Median of $REPS runs;"
    echo "cold = page cache dropped before the run."
    echo
    echo "| start | seconds | ÷ plain directory (same cache state) |"
    echo "|---|---:|---:|"
    echo "| plain directory, cold | $pc | 1.00× |"
    echo "| plain directory, warm | $pw | 1.00× |"
    echo "| bundle, first run (empty cache: extract, mount, run), cold | $(m first) | $(ratio "$(m first)" "$pc")× |"
    echo "| bundle, later run (cached tree, mount, run), cold | $(m second_cold) | $(ratio "$(m second_cold)" "$pc")× |"
    echo "| bundle, later run, warm | $(m second_warm) | $(ratio "$(m second_warm)" "$pw")× |"
    echo
    echo "<details><summary>Every run (seconds)</summary>"
    echo
    for k in plain_cold plain_warm first second_cold second_warm; do echo "- $k: ${R[$k]}"; done
    echo
    echo "</details>"
} | tee "$OUT"
