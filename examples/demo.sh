#!/usr/bin/env bash
# Demo: mount examples/demo-lower under a fresh upper, change things, show where they landed.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/ovl-mount
[ -x "$bin" ] || cargo build --release --quiet
tmp=$(mktemp -d)
trap 'umount "$tmp/merged" 2>/dev/null || fusermount3 -u "$tmp/merged" 2>/dev/null || true; rm -rf "$tmp"' EXIT
mkdir "$tmp/upper" "$tmp/work" "$tmp/merged"
"$bin" -o "lowerdir=$PWD/examples/demo-lower,upperdir=$tmp/upper,workdir=$tmp/work" "$tmp/merged"
echo "== merged view"; ls -lR "$tmp/merged"
cat "$tmp/merged/etc/greeting"
echo "changed in the overlay" > "$tmp/merged/etc/greeting"
rm "$tmp/merged/app/run.sh"
mkdir "$tmp/merged/new"; echo data > "$tmp/merged/new/file"
echo "== after changes"; cat "$tmp/merged/etc/greeting"; ls "$tmp/merged/app"
echo "== upper layer (kernel overlayfs format: c 0,0 = whiteout)"; ls -lR "$tmp/upper"
echo "== lower untouched"; cat examples/demo-lower/etc/greeting; ls examples/demo-lower/app
