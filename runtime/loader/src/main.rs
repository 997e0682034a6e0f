//! The head of every `app.run`: a few kilobytes of static code (no libc) plus the bundle
//! runtime, LZ4-compressed. It unpacks the runtime into an anonymous in-memory file (memfd)
//! and executes that with the same arguments and environment, adding
//! `OVL_RUNTIME_BUNDLE=<this file>`: the runtime's `/proc/self/exe` is then the memfd, so it
//! takes its bundle's path from there. The bundle format does not see any of this: the
//! loader, runtime inside, is the bundle's runtime part, and, as an ELF file whose section
//! headers end it, a bare one is still recognized as such.
//!
//! x86_64 Linux only (the system calls are made here); elsewhere the build uses the runtime
//! uncompressed.

#![cfg_attr(ovl_loader, no_std, no_main)]

#[cfg(ovl_loader)]
mod loader;
#[cfg(ovl_loader)]
mod lz4;

/// Built without a runtime to carry (a plain `cargo build --workspace`; build.rs sets
/// `ovl_loader` when there is one): this stand-in only says how to build the real one.
#[cfg(not(ovl_loader))]
fn main() {
    eprintln!("ovl runtime loader: build it with packaging/build-runtime.sh (profile runtime)");
    std::process::exit(125);
}
