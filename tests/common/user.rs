//! The unprivileged test users, made on first use (as root). Suites running in parallel (and
//! tests inside one suite) may create the same user at the same instant: `useradd` fails for
//! all but one, so success is judged by the user existing afterwards.

use std::process::Command;
use std::time::{Duration, Instant};

/// The normal user the non-root tests run as.
pub const TEST_USER: &str = "ovl-test";

/// uid and gid of `name`, if it exists.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, name]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Creates `name` without a home (`useradd -M -s /bin/sh EXTRA... name`) unless it exists;
/// `None` if it still does not exist 10 s later.
pub fn try_ensure_user(name: &str, extra: &[&str]) -> Option<(u32, u32)> {
    if let Some(ids) = user_ids(name) {
        return Some(ids);
    }
    let _ = Command::new("useradd")
        .args(["-M", "-s", "/bin/sh"])
        .args(extra)
        .arg(name)
        .status();
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(ids) = user_ids(name) {
            return Some(ids);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`try_ensure_user`], panicking when the user cannot be made.
pub fn ensure_user(name: &str, extra: &[&str]) -> (u32, u32) {
    try_ensure_user(name, extra).unwrap_or_else(|| panic!("could not create user {name}"))
}

/// The ids of [`TEST_USER`], created if missing.
pub fn ensure_test_user() -> (u32, u32) {
    ensure_user(TEST_USER, &[])
}
