//! Puts the bundle runtime inside the loader: `OVL_RUNTIME_BIN` names the static runtime
//! (runtime/, built first by build.rs or packaging/build-runtime.sh); it is LZ4-compressed
//! here (src/lz4.rs) and `include_bytes!`d by src/loader.rs, after a 16-byte header: the
//! unpacked size and its checksum. Without it (a `cargo build --workspace`), main.rs builds a
//! std stand-in that only says how to build the real loader.

use std::env;
use std::path::PathBuf;

#[path = "src/lz4.rs"]
mod lz4;

fn main() {
    println!("cargo::rerun-if-env-changed=OVL_RUNTIME_BIN");
    println!("cargo::rerun-if-changed=src/lz4.rs");
    println!("cargo::rustc-check-cfg=cfg(ovl_loader)");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("runtime.lz4");
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
            let block = lz4::compress(&raw);
            let mut back = vec![0u8; raw.len()];
            assert!(
                lz4::decompress(&block, &mut back) && back == raw,
                "the compressed runtime does not decode to the runtime"
            );
            let mut packed = Vec::with_capacity(16 + block.len());
            packed.extend_from_slice(&(raw.len() as u64).to_le_bytes());
            packed.extend_from_slice(&lz4::checksum(&raw).to_le_bytes());
            packed.extend_from_slice(&block);
            packed
        }
        None => Vec::new(), // the stand-in
    };
    std::fs::write(&out, packed).expect("writing the compressed runtime");
    println!("cargo::rustc-env=OVL_RUNTIME_LZ4={}", out.display());
}
