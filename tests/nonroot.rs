//! A normal user mounts with ovl-mount through fusermount3 (no privileges, no setuid of ours).

mod common;
use common::*;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ovl-mount");
const USER: &str = "ovl-test";

/// Creates the test user once (the only test that does).
fn ensure_user() -> (u32, u32) {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, USER]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let st = Command::new("useradd")
            .args(["-M", "-s", "/bin/sh", USER])
            .status()
            .expect("useradd");
        assert!(
            st.success() || id("-u").is_some(),
            "could not create user {USER}"
        );
    }
    (id("-u").unwrap(), id("-g").unwrap())
}

fn as_user(script: &str) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", USER, "--", "sh", "-c", script])
        .output()
        .expect("runuser")
}

#[test]
fn normal_user_mounts_via_fusermount3() {
    if !is_root() {
        eprintln!("needs root to create the test user; run the suite as root");
        return;
    }
    let mode = fs::metadata("/dev/fuse").expect("/dev/fuse").mode();
    assert_eq!(
        mode & 0o006,
        0o006,
        "/dev/fuse is not open to users: run packaging/setup-deps.sh (chmod 0666 /dev/fuse)"
    );
    let (uid, gid) = ensure_user();
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    fs::set_permissions(r, fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["lower/d", "upper", "work", "mnt"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    fs::write(r.join("lower/f"), "lower data").unwrap();
    fs::write(r.join("lower/d/g"), "g").unwrap();
    // The binary where the user can run it.
    fs::copy(BIN, r.join("ovl-mount")).unwrap();
    let chown = |p: &Path| std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    for d in [
        "lower",
        "lower/d",
        "lower/f",
        "lower/d/g",
        "upper",
        "work",
        "mnt",
        "ovl-mount",
    ] {
        chown(&r.join(d));
    }
    let p = r.display();
    let out = as_user(&format!(
        "set -e; {p}/ovl-mount -o lowerdir={p}/lower,upperdir={p}/upper,workdir={p}/work {p}/mnt
         cat {p}/mnt/f; echo; echo new > {p}/mnt/new; rm {p}/mnt/d/g; echo more >> {p}/mnt/f
         ls {p}/mnt {p}/mnt/d; stat -c %U {p}/mnt/new
         fusermount3 -u {p}/mnt"
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "lower data",
            &format!("{p}/mnt:"),
            "d",
            "f",
            "new",
            "",
            &format!("{p}/mnt/d:"),
            USER
        ]
    );
    // Changes landed in the upper, owned by the user; the lower is untouched.
    assert_eq!(fs::read_to_string(r.join("upper/new")).unwrap(), "new\n");
    assert_eq!(
        fs::read_to_string(r.join("upper/f")).unwrap(),
        "lower datamore\n"
    );
    assert_eq!(fs::metadata(r.join("upper/new")).unwrap().uid(), uid);
    let wh = fs::symlink_metadata(r.join("upper/d/g")).unwrap();
    assert_eq!((wh.mode() & libc::S_IFMT, wh.rdev()), (libc::S_IFCHR, 0));
    assert_eq!(fs::read_to_string(r.join("lower/f")).unwrap(), "lower data");
    assert!(r.join("lower/d/g").exists());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&format!("{p}/mnt ")), "still mounted");
}
