//! `ovl-runtime-main`: the runtime of every `app.run` bundle, which heads it LZ4-compressed
//! inside the small loader of `runtime/loader` (or as it is, elsewhere than x86_64).
//!
//! All the work is in [`ovl::bundle::runtime`]; this stub only hands over the process. It is
//! built with glibc's `+crt-static` (see `packaging/build-runtime.sh`) so a bundle runs on any
//! Linux, whatever its libraries.

fn main() -> std::process::ExitCode {
    let code = ovl::bundle::runtime::main();
    std::process::ExitCode::from(code.clamp(0, 255) as u8)
}
