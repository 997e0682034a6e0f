#!/usr/bin/env bash
# Builds the bundle runtime as a static executable (glibc +crt-static), the file that heads
# every app.run, and prints its path. `cargo build` does the same through build.rs (ovl-pack
# embeds it) into the same directory, so whichever runs second finds it up to date.
# Needs libc6-dev (libc.a), which setup-deps.sh installs.
#   packaging/build-runtime.sh   # → $CARGO_TARGET_DIR/runtime-build/x86_64-unknown-linux-gnu/runtime/ovl-runtime
set -euo pipefail
cd "$(dirname "$0")/.."
triple=x86_64-unknown-linux-gnu
target_dir="$(realpath -m "${CARGO_TARGET_DIR:-target}")/runtime-build"
# RUSTFLAGS with an explicit --target apply to the runtime and its dependencies, not to
# build scripts and proc macros (which must stay dynamic to be loaded by the compiler).
# OVL_BUILDING_RUNTIME: build.rs then does not build the runtime again inside this build.
CARGO_ENCODED_RUSTFLAGS="-Ctarget-feature=+crt-static" OVL_BUILDING_RUNTIME=1 \
    cargo build --profile runtime --target "$triple" -p ovl-runtime --target-dir "$target_dir"
bin="$target_dir/$triple/runtime/ovl-runtime"
# ldd says "statically linked" (static-pie) or "not a dynamic executable" (static).
if ! ldd "$bin" 2>&1 | grep -qE "statically linked|not a dynamic executable"; then
    echo "build-runtime.sh: $bin is dynamically linked; is libc6-dev installed?" >&2
    exit 1
fi
size=$(stat -c %s "$bin")
echo "build-runtime.sh: $bin: $size bytes ($(awk "BEGIN{printf \"%.2f\", $size/1048576}") MiB, static)" >&2
echo "$bin"
