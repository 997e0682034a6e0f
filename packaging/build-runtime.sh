#!/usr/bin/env bash
# Builds the file that heads every app.run and prints its path: the bundle runtime (runtime/,
# a static executable, glibc +crt-static), LZ4-compressed inside a small static loader
# (runtime/loader, no libc) that unpacks it into memory and runs it. `cargo build` does the
# same through build.rs (ovl-pack embeds it) in the same directories, so whichever runs second
# finds it up to date. Needs libc6-dev (libc.a), which setup-deps.sh installs.
#   packaging/build-runtime.sh   # → $CARGO_TARGET_DIR/runtime-build/loader/x86_64-unknown-linux-gnu/runtime/ovl-runtime
set -euo pipefail
cd "$(dirname "$0")/.."
triple=x86_64-unknown-linux-gnu
target_dir="$(realpath -m "${CARGO_TARGET_DIR:-target}")/runtime-build"
# RUSTFLAGS with an explicit --target apply to the runtime and its dependencies, not to
# build scripts and proc macros (which must stay dynamic to be loaded by the compiler).
# OVL_BUILDING_RUNTIME: build.rs then does not build the runtime again inside this build.
# The CFLAGS leave out zstd's block compressors the runtime never uses (see build.rs, which
# passes the same).
cflags_var="CFLAGS_${triple//-/_}"
cflags="${!cflags_var:-${CFLAGS:-}} -DZSTD_EXCLUDE_GREEDY_BLOCK_COMPRESSOR"
cflags+=" -DZSTD_EXCLUDE_LAZY_BLOCK_COMPRESSOR -DZSTD_EXCLUDE_DFAST_BLOCK_COMPRESSOR"
env "$cflags_var=$cflags" \
    CARGO_ENCODED_RUSTFLAGS="-Ctarget-feature=+crt-static" OVL_BUILDING_RUNTIME=1 \
    cargo build --profile runtime --target "$triple" -p ovl-runtime --target-dir "$target_dir"
main="$target_dir/$triple/runtime/ovl-runtime-main"
# The loader: static, not position-independent, its own target dir (other flags).
OVL_RUNTIME_BIN="$main" OVL_BUILDING_RUNTIME=1 \
    CARGO_ENCODED_RUSTFLAGS=$'-Ctarget-feature=+crt-static\x1f-Crelocation-model=static' \
    cargo build --profile runtime --target "$triple" -p ovl-runtime-loader \
    --target-dir "$target_dir/loader"
bin="$target_dir/loader/$triple/runtime/ovl-runtime"
# ldd says "statically linked" (static-pie) or "not a dynamic executable" (static).
for f in "$main" "$bin"; do
    said=$(ldd "$f" 2>&1 || true)
    if ! grep -qE "statically linked|not a dynamic executable" <<<"$said"; then
        echo "build-runtime.sh: $f is dynamically linked; is libc6-dev installed?" >&2
        exit 1
    fi
done
mib() { awk "BEGIN{printf \"%.2f\", $1/1048576}"; }
size=$(stat -c %s "$bin")
main_size=$(stat -c %s "$main")
echo "build-runtime.sh: $bin: $size bytes ($(mib "$size") MiB, static; the runtime inside: $main_size bytes, $(mib "$main_size") MiB)" >&2
echo "$bin"
