#!/usr/bin/env bash
# Builds the example app bundle packaging/examples/notes → notes.run (in the current
# directory, or $1) with the static runtime, and shows what it holds.
#   packaging/build-example.sh [OUT]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-notes.run}"
runtime="$("$here/build-runtime.sh")"
target_dir="$(dirname "$(dirname "$(dirname "$runtime")")")"
(cd "$here/.." && cargo build --quiet --release --bin ovl-pack)
"$target_dir/release/ovl-pack" "$here/examples/notes" -o "$out" --runtime "$runtime"
case "$out" in /*) ;; *) out="./$out" ;; esac
"$out" --ovl-info
