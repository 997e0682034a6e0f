//! Puts the bundle runtime inside the loader: `OVL_RUNTIME_BIN` names the static runtime
//! (runtime/, built first by build.rs or packaging/build-runtime.sh); it is compressed here
//! and `include_bytes!`d by src/loader.rs. Without it (a `cargo build --workspace`), main.rs
//! builds a std stand-in that only says how to build the real loader.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo::rerun-if-env-changed=OVL_RUNTIME_BIN");
    println!("cargo::rustc-check-cfg=cfg(ovl_loader)");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("runtime.zst");
    let packed = match env::var_os("OVL_RUNTIME_BIN") {
        Some(bin) => {
            println!("cargo::rerun-if-changed={}", bin.to_string_lossy());
            // The loader proper (main.rs): no C runtime, its own `_start`, its own system
            // calls. Needs `panic = "abort"` (the runtime profile).
            println!("cargo::rustc-cfg=ovl_loader");
            println!("cargo::rustc-link-arg-bins=-nostartfiles");
            println!("cargo::rustc-link-arg-bins=-nostdlib");
            println!("cargo::rustc-link-arg-bins=-Wl,--build-id=none");
            let raw = std::fs::read(&bin)
                .unwrap_or_else(|e| panic!("OVL_RUNTIME_BIN={}: {e}", bin.to_string_lossy()));
            // 19: the best ratio without --ultra's memory (22 saves under 0.1%). The frame
            // header holds the size (the loader makes that much room) and a checksum: a
            // damaged file is refused before it runs (XXH64, a tenth of the unpacking time).
            let mut c = zstd::bulk::Compressor::new(19).expect("zstd");
            c.include_checksum(true).expect("zstd");
            c.include_contentsize(true).expect("zstd");
            c.compress(&raw).expect("compressing the runtime")
        }
        None => Vec::new(), // the stand-in
    };
    std::fs::write(&out, packed).expect("writing the compressed runtime");
    println!("cargo::rustc-env=OVL_RUNTIME_ZST={}", out.display());
}
