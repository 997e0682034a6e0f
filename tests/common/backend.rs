//! ovl-run's backends, for the suites that run it under both (tests/ovl_run twice, the
//! ovl-run tests of tests/commit, tests/ovl_run_kernel.rs, tests/differential.rs): can the
//! kernel's overlay serve a run here, as root and as the test user?
//!
//! Each answer comes from one real run (`ovl-run --backend kernel -- true`), made once per
//! test process. Where the kernel refuses (an old kernel, no user namespaces), the suites run
//! on `auto` instead (which then serves on FUSE) and say so once.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::user::{TEST_USER, ensure_test_user};

const BIN: &str = env!("CARGO_BIN_EXE_ovl-run");

/// Runs `ovl-run --backend kernel --lower DIR/lower -- true` in a fresh temp dir, as root or
/// (with `user`) as the test user with a copy of the binary; the run's stderr if it failed.
fn probe(user: bool) -> Result<(), String> {
    let t = tempfile::Builder::new()
        .prefix("ovl-probe")
        .tempdir()
        .unwrap();
    let root = t.path();
    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).unwrap();
    fs::create_dir(root.join("lower")).unwrap();
    fs::create_dir(root.join("cache")).unwrap();
    let mut c = if user {
        let (uid, gid) = ensure_test_user();
        // The user cannot reach target/ everywhere: a copy of the binary in the dir.
        fs::copy(BIN, root.join("ovl-run")).unwrap();
        for p in ["", "lower", "cache", "ovl-run"] {
            std::os::unix::fs::lchown(root.join(p), Some(uid), Some(gid)).unwrap();
        }
        let mut c = Command::new("runuser");
        c.args(["-u", TEST_USER, "--", "env"])
            .arg(format!("XDG_CACHE_HOME={}", root.join("cache").display()))
            .arg(root.join("ovl-run"));
        c
    } else {
        let mut c = Command::new(BIN);
        c.env("XDG_CACHE_HOME", root.join("cache"));
        c
    };
    let out = c
        .current_dir(root)
        .env_remove("OVL_RUN_BACKEND")
        .args(["-q", "--backend", "kernel", "--lower"])
        .arg(root.join("lower"))
        .args(["--", "true"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn answer(cell: &'static OnceLock<&'static str>, user: bool) -> &'static str {
    cell.get_or_init(|| match probe(user) {
        Ok(()) => "kernel",
        Err(e) => {
            eprintln!(
                "note: the kernel's overlay cannot serve ovl-run {} here ({e}): the \
                 kernel-backend tests run on auto (FUSE)",
                if user { "as a normal user" } else { "as root" }
            );
            "auto"
        }
    })
}

/// `kernel` if ovl-run's kernel backend works here as root, else `auto`.
pub fn kernel_for_root() -> &'static str {
    static A: OnceLock<&'static str> = OnceLock::new();
    answer(&A, false)
}

/// `kernel` if ovl-run's kernel backend works here for the test user, else `auto`. Needs
/// root (it makes the user).
pub fn kernel_for_user() -> &'static str {
    static A: OnceLock<&'static str> = OnceLock::new();
    answer(&A, true)
}

/// Whether `dir` (seen from this process) is served by the kernel's overlay.
pub fn is_kernel_overlay(dir: &Path) -> bool {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type == 0x794c_7630 }
}
