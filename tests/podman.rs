//! podman as a real client of ovl-mount (issue 11, item 7): `mount_program` in storage.conf,
//! an image imported from a local tarball, `podman run` and `podman build` with RUN steps that
//! write, delete and replace a directory; as root and rootless. Skipped, saying why, where
//! podman (`apt-get install podman`), busybox-static or root is missing.

mod common;
use common::user::*;
use common::*;

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ovl-mount");
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/podman-smoke.sh");
/// The unprivileged test user (tests/common/user.rs).
const USER: &str = TEST_USER;

fn has(prog: &str) -> bool {
    Command::new(prog).arg("--version").output().is_ok()
}

/// The test user, made if missing, with subordinate ids (rootless podman needs them).
fn rootless_user_ready() -> bool {
    // useradd gives a new user its subordinate ids: read them after.
    try_ensure_user(USER, &[]).is_some()
        && std::fs::read_to_string("/etc/subuid")
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(&format!("{USER}:")))
}

/// Runs the smoke script, as `user` if given, always in a private mount namespace:
/// - without the FUSE mounts of tests running beside this one: rootless podman keeps a pause
///   process, and every mount namespace made under it, for good; a copy of another test's mount
///   in such a namespace keeps that mount's FUSE connection alive after its `umount`, and the
///   test waiting for its session to end hangs (seen: pjdfstest's mount held by `catatonit`);
/// - with cgroup2 alone at /sys/fs/cgroup where the host has a hybrid layout (v1 controllers
///   beside v2), which crun refuses (containers run with cgroups disabled).
fn smoke(dir: &Path, user: Option<&str>) -> String {
    let mut argv: Vec<String> = Vec::new();
    if let Some(u) = user {
        argv.extend(["runuser", "-u", u, "--"].map(String::from));
    }
    argv.extend([
        "sh".into(),
        SCRIPT.into(),
        BIN.into(),
        dir.display().to_string(),
    ]);
    let prelude = "mount --make-rprivate / && \
        findmnt -rn -o TARGET,FSTYPE | awk '$2 ~ /^fuse/ {print $1}' | tac | \
        while read -r m; do umount -l \"$(printf '%b' \"$m\")\"; done && \
        { [ -e /sys/fs/cgroup/cgroup.controllers ] || mount -t cgroup2 none /sys/fs/cgroup; } && \
        exec \"$@\"";
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", prelude, "sh"])
        .args(&argv)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "podman smoke test ({}) failed:\n{stdout}\n{}",
        user.unwrap_or("root"),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn podman_runs_and_builds_on_ovl_mount() {
    if !has("podman") {
        eprintln!("skipped: podman is not installed (apt-get install podman)");
        return;
    }
    if !is_root() {
        eprintln!("skipped: the podman test runs as root (it also makes the rootless run)");
        return;
    }
    if !Path::new("/bin/busybox").exists() {
        eprintln!("skipped: busybox-static is needed for the test image");
        return;
    }
    let want = "run: written\nroot fs: fuse.ovl\nbuilt: built only vi-gone \n";
    let t = tempfile::tempdir().unwrap();
    assert_eq!(smoke(t.path(), None), want, "root");

    if !rootless_user_ready() {
        eprintln!("skipped rootless: no user {USER} with subordinate ids in /etc/subuid");
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let st = Command::new("chown")
        .arg(USER)
        .arg(t.path())
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(smoke(t.path(), Some(USER)), want, "rootless");
}
