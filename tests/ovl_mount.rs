//! The `ovl-mount` command line: fuse-overlayfs compatible options, daemon, errors.

mod common;
use common::*;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ovl-mount");

fn layers() -> (tempfile::TempDir, String) {
    let t = tempfile::tempdir().unwrap();
    for d in ["lower", "upper", "work", "mnt"] {
        fs::create_dir(t.path().join(d)).unwrap();
    }
    fs::write(t.path().join("lower/f"), "lower").unwrap();
    let p = t.path().display();
    let opts = format!("lowerdir={p}/lower,upperdir={p}/upper,workdir={p}/work");
    (t, opts)
}

fn is_mounted(p: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let s = p.display().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(s.as_str()))
}

#[test]
fn daemon_mounts_and_exits_on_umount() {
    let (t, opts) = layers();
    let mnt = t.path().join("mnt");
    let out = Command::new(BIN)
        .args(["-o", &opts])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The mount is live when the command returns.
    assert_eq!(fs::read_to_string(mnt.join("f")).unwrap(), "lower");
    fs::write(mnt.join("g"), "new").unwrap();
    unmount_retrying("umount", &[], &mnt);
    assert!(!is_mounted(&mnt));
    assert_eq!(fs::read_to_string(t.path().join("upper/g")).unwrap(), "new");
}

#[test]
fn foreground_exits_cleanly_after_fusermount_u() {
    let (t, opts) = layers();
    let mnt = t.path().join("mnt");
    let mut child = Command::new(BIN)
        .args(["-f", "-o", &opts])
        .arg(&mnt)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !is_mounted(&mnt) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "mount never appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read_to_string(mnt.join("f")).unwrap(), "lower");
    unmount_retrying("fusermount3", &["-u"], &mnt);
    let st = child.wait().unwrap();
    assert!(st.success(), "{st:?}");
}

#[test]
fn mount_helper_form_source_mountpoint_options() {
    // `mount -t fuse.ovl-mount SRC MNT -o OPTS` makes mount.fuse3 run `ovl-mount SRC MNT -o OPTS`.
    let (t, opts) = layers();
    let mnt = t.path().join("mnt");
    let out = Command::new(BIN)
        .arg("ovl")
        .arg(&mnt)
        .args(["-o", &format!("rw,nodev,nosuid,threads=1,{opts}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::read_to_string(mnt.join("f")).unwrap(), "lower");
    unmount_retrying("umount", &[], &mnt);
    if is_root() && Path::new("/sbin/mount.fuse3").exists() {
        // `-t fuse` with `PROGRAM#SOURCE` names the helper by path (mount(8) does not pass our
        // PATH on to mount.fuse3, so `-t fuse.ovl-mount` needs ovl-mount installed in PATH).
        let out = Command::new("mount")
            .args(["-t", "fuse", &format!("{BIN}#ovl")])
            .arg(&mnt)
            .args(["-o", &opts])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(fs::read_to_string(mnt.join("f")).unwrap(), "lower");
        unmount_retrying("umount", &[], &mnt);
    }
}

/// Unmounts with `prog`, retrying while it fails: a process forked by another test thread may
/// hold a descriptor in the mount for a moment (fork copies descriptors until exec), which
/// makes the mount busy.
fn unmount_retrying(prog: &str, args: &[&str], mnt: &Path) {
    for _ in 0..40 {
        let st = Command::new(prog).args(args).arg(mnt).status().unwrap();
        if st.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{prog} {} kept failing", mnt.display());
}

#[test]
fn bad_options_and_paths_fail_with_one_line() {
    let (t, opts) = layers();
    let mnt = t.path().join("mnt");
    let p = t.path().display();
    let cases = [
        (
            format!("{opts},bogus_option"),
            "unknown mount option 'bogus_option'",
        ),
        (
            format!("lowerdir={p}/nope,upperdir={p}/upper,workdir={p}/work"),
            "nope",
        ),
        (
            format!("lowerdir={p}/lower,upperdir={p}/lower/up,workdir={p}/work"),
            "overlaps lower",
        ),
        (format!("upperdir={p}/upper"), "no lowerdir"),
        (format!("{opts},threads=0"), "threads=0: give a number"),
        (
            format!("{opts},threads=many"),
            "threads=many: give a number",
        ),
    ];
    for (o, want) in cases {
        let out = Command::new(BIN)
            .args(["-o", &o])
            .arg(&mnt)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{o}: {err}");
        assert!(err.contains(want), "{o}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(!is_mounted(&mnt));
    }
    assert!(
        !t.path().join("lower/up").exists(),
        "nothing created on bad input"
    );
}

#[test]
fn usage_errors_are_one_line() {
    for (args, want) in [
        (&[][..], "required arguments were not provided: <PATHS>..."),
        (&["--bogus", "/x"][..], "unexpected argument '--bogus'"),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(
            err.starts_with("ovl-mount: ") && err.contains(want),
            "{err}"
        );
        assert!(err.contains("(see ovl-mount --help)"), "{err}");
    }
}

/// Issue 11 item 6: relative paths mean the caller's working directory (the kernel and
/// fuse-overlayfs agree), for every layer and the mount point, in both the daemon and `-f`.
#[test]
fn relative_paths_resolve_against_the_working_directory() {
    let t = tempfile::tempdir().unwrap();
    // Names unique to this test: nothing of that name may appear at / either.
    let tag = t.path().file_name().unwrap().to_str().unwrap().to_string();
    let [l1, l2, up, wk, mnt] = ["l1", "l2", "up", "wk", "mnt"].map(|n| format!("{n}{tag}"));
    for d in [&l1, &l2, &up, &wk, &mnt] {
        fs::create_dir(t.path().join(d)).unwrap();
    }
    fs::write(t.path().join(&l1).join("a"), "1").unwrap();
    fs::write(t.path().join(&l2).join("b"), "2").unwrap();
    let abs_l1 = t.path().join(&l1).display().to_string();
    for lowers in [format!("{l1}:{l2}"), format!("{abs_l1}:./{l2}")] {
        let out = Command::new(BIN)
            .current_dir(t.path())
            .args([
                "-o",
                &format!("lowerdir={lowers},upperdir={up},workdir={wk}"),
            ])
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(out.status.success(), "{lowers}: {out:?}");
        let m = t.path().join(&mnt);
        assert!(is_mounted(&m), "{lowers}: not mounted at {}", m.display());
        assert_eq!(fs::read_to_string(m.join("a")).unwrap(), "1");
        assert_eq!(fs::read_to_string(m.join("b")).unwrap(), "2");
        fs::write(m.join("c"), lowers.as_bytes()).unwrap();
        unmount_retrying("umount", &[], &m);
        assert_eq!(
            fs::read_to_string(t.path().join(&up).join("c")).unwrap(),
            lowers
        );
        for d in [&up, &wk, &mnt] {
            assert!(!Path::new("/").join(d).exists(), "/{d} was created");
        }
    }
}
