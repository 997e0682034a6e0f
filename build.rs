//! Builds the static bundle runtime (`runtime/`, the launcher at the head of every app.run) in
//! the same `cargo build`, so that `ovl-pack` can carry it inside itself: an installed
//! (`cargo install --path .`) or copied `ovl-pack` packs without anything beside it.
//!
//! The runtime is built by a nested cargo into `<target>/runtime-build` (its own target dir:
//! static glibc and a size profile need their own artifacts; `packaging/build-runtime.sh` uses
//! the same dir, so either build serves the other), then, on x86_64, compressed into the small
//! static loader of `runtime/loader` (`<target>/runtime-build/loader`): that is the file that
//! heads a bundle, 2.6 MiB of runtime in 1.3 MiB. Where it cannot be built (no `libc.a`:
//! Debian's libc6-dev), the build goes on with a warning and `ovl-pack` asks for `--runtime`.
//! `OVL_RUNTIME_PREBUILT=FILE` embeds a runtime built elsewhere instead.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ovl_embedded_runtime)");
    println!("cargo::rerun-if-env-changed=OVL_RUNTIME_PREBUILT");
    // The nested build compiles this package's library again: do nothing there.
    if env::var_os("OVL_BUILDING_RUNTIME").is_some() {
        return;
    }
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    if let Some(p) = env::var_os("OVL_RUNTIME_PREBUILT") {
        embed(Path::new(&p));
        return;
    }
    for watched in [
        "src",
        "runtime/src",
        "runtime/Cargo.toml",
        "runtime/loader/src",
        "runtime/loader/build.rs",
        "runtime/loader/Cargo.toml",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo::rerun-if-changed={watched}");
    }
    let target = env::var("TARGET").expect("set by cargo");
    let dir = target_dir(&manifest).join("runtime-build");
    // The runtime proper: static glibc (with an explicit --target these flags do not reach
    // build scripts and proc macros, which must stay dynamic).
    let main_bin = dir.join(&target).join("runtime/ovl-runtime-main");
    let cflags_var = format!("CFLAGS_{}", target.replace('-', "_"));
    let cflags = env::var(&cflags_var)
        .or_else(|_| env::var("CFLAGS"))
        .unwrap_or_default();
    let built = nested_cargo(&manifest, "ovl-runtime", &target, &dir)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env(&cflags_var, format!("{cflags} {RUNTIME_ZSTD_DEFINES}"))
        .status();
    match built {
        Ok(s) if s.success() && main_bin.is_file() => {}
        Ok(s) => {
            return println!(
                "cargo::warning=the static bundle runtime did not build ({s}; is libc6-dev \
                 installed?): ovl-pack will need --runtime FILE"
            );
        }
        Err(e) => {
            return println!(
                "cargo::warning=could not run cargo for the bundle runtime ({e}): ovl-pack \
                 will need --runtime FILE"
            );
        }
    }
    // What heads a bundle: the runtime compressed inside the small static loader (its own
    // target dir: no libc, not position-independent). x86_64 only; elsewhere, or if it
    // fails, the runtime as it is.
    if env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("x86_64") {
        return embed(&main_bin);
    }
    let loader_dir = dir.join("loader");
    let loader_bin = loader_dir.join(&target).join("runtime/ovl-runtime");
    let built = nested_cargo(&manifest, "ovl-runtime-loader", &target, &loader_dir)
        .env("OVL_RUNTIME_BIN", &main_bin)
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Ctarget-feature=+crt-static\x1f-Crelocation-model=static",
        )
        .status();
    match built {
        Ok(s) if s.success() && loader_bin.is_file() => {
            embed(&loader_bin);
            let inner = std::fs::metadata(&main_bin).map(|m| m.len()).unwrap_or(0);
            println!(
                "cargo::warning=  (the runtime inside, LZ4-compressed: {inner} bytes, {:.2} MiB)",
                inner as f64 / 1048576.0
            );
        }
        other => {
            println!(
                "cargo::warning=the bundle runtime's loader did not build ({other:?}): \
                 bundles carry the runtime uncompressed"
            );
            embed(&main_bin)
        }
    }
}

/// zstd's block compressors the runtime never uses (it compresses at levels 9, 12 and 19 only:
/// lazy2, btlazy2, btopt and btultra2 at every input size): 110 KB less runtime. Keep in step
/// with packaging/build-runtime.sh.
const RUNTIME_ZSTD_DEFINES: &str = "-DZSTD_EXCLUDE_GREEDY_BLOCK_COMPRESSOR \
    -DZSTD_EXCLUDE_LAZY_BLOCK_COMPRESSOR -DZSTD_EXCLUDE_DFAST_BLOCK_COMPRESSOR";

/// `cargo build --profile runtime -p PACKAGE` for `target` into `dir`, as
/// packaging/build-runtime.sh runs it.
fn nested_cargo(manifest: &Path, package: &str, target: &str, dir: &Path) -> Command {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.args([
        "build",
        "--profile",
        "runtime",
        "-p",
        package,
        "--target",
        target,
    ])
    .arg("--manifest-path")
    .arg(manifest.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(dir)
    // The nested build compiles this package's library again: build.rs does nothing there.
    .env("OVL_BUILDING_RUNTIME", "1")
    .env_remove("RUSTFLAGS")
    .env_remove("CARGO_TARGET_DIR")
    .env_remove("CARGO_BUILD_TARGET");
    c
}

fn embed(bin: &Path) {
    let size = std::fs::metadata(bin).map(|m| m.len()).unwrap_or(0);
    println!("cargo::rustc-cfg=ovl_embedded_runtime");
    println!("cargo::rustc-env=OVL_EMBEDDED_RUNTIME={}", bin.display());
    println!("cargo::rerun-if-changed={}", bin.display());
    // The size is a target of its own (issue: under 1.5 MiB): show it on every build of it.
    println!(
        "cargo::warning=bundle runtime {}: {size} bytes ({:.2} MiB)",
        bin.display(),
        size as f64 / 1048576.0
    );
}

/// The target directory of the build running us: the nearest ancestor of OUT_DIR that cargo
/// tagged with CACHEDIR.TAG, else `<manifest>/target`.
fn target_dir(manifest: &Path) -> PathBuf {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    out.ancestors()
        .find(|a| a.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.join("target"))
}
