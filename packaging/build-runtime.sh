#!/usr/bin/env bash
# Builds the bundle runtime as a static executable (glibc +crt-static), the file that heads
# every app.run. Prints its path. Needs libc6-dev (libc.a), which setup-deps.sh installs.
#   packaging/build-runtime.sh            # → $CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/runtime/ovl-runtime
set -euo pipefail
cd "$(dirname "$0")/.."
triple=x86_64-unknown-linux-gnu
# RUSTFLAGS with an explicit --target apply to the runtime and its dependencies, not to
# build scripts and proc macros (which must stay dynamic to be loaded by the compiler).
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --profile runtime --target "$triple" -p ovl-runtime
target_dir=$(realpath "${CARGO_TARGET_DIR:-target}")
bin="$target_dir/$triple/runtime/ovl-runtime"
# ldd says "statically linked" (static-pie) or "not a dynamic executable" (static).
if ! ldd "$bin" 2>&1 | grep -qE "statically linked|not a dynamic executable"; then
    echo "build-runtime.sh: $bin is dynamically linked; is libc6-dev installed?" >&2
    exit 1
fi
size=$(stat -c %s "$bin")
echo "build-runtime.sh: $bin: $size bytes ($(awk "BEGIN{printf \"%.2f\", $size/1048576}") MiB, static)" >&2
echo "$bin"
