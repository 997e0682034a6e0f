#!/usr/bin/env bash
# Builds the example app bundle packaging/examples/notes → notes.run (in the current
# directory, or $1) with ovl-pack and its built-in runtime, and shows what it holds.
#   packaging/build-example.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-notes.run}"
(cd "$here/.." && cargo build --quiet --release --bin ovl-pack)
target_dir="$(cd "$here/.." && realpath -m "${CARGO_TARGET_DIR:-target}")"
"$target_dir/release/ovl-pack" "$here/examples/notes" -o "$out"
case "$out" in /*) ;; *) out="./$out" ;; esac
"$out" --ovl-info
