//! Unmounting: ovl only ever unmounts its own mount, and lets go of its layers as the session
//! ends (issue 11, items 1 and 2). Each test repeats a race enough times to catch it.

mod common;
use common::*;

use std::fs;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ovl::OverlayFS;

const BIN: &str = env!("CARGO_BIN_EXE_ovl-mount");

/// The filesystem type of the topmost mount at `p`, if `p` is a mount point.
fn fstype_at(p: &Path) -> Option<String> {
    let s = p.display().to_string();
    // The last matching line is the topmost mount (mountinfo lists mounts as they were made).
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(s.as_str()))
        .map(|l| {
            let (_, post) = l.split_once(" - ").unwrap();
            post.split(' ').next().unwrap().to_string()
        })
}

fn is_fuse(p: &Path) -> bool {
    fstype_at(p).is_some_and(|t| t == "fuse" || t.starts_with("fuse."))
}

fn run(prog: &str, args: &[&str], path: &Path) {
    let out = Command::new(prog).args(args).arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?} {}: {out:?}",
        path.display()
    );
}

/// Unmounts, retrying while busy: a process forked by another test thread may hold a
/// descriptor in the mount for a moment (fork copies descriptors until exec).
fn umount_retrying(p: &Path) {
    for _ in 0..50 {
        if Command::new("umount").arg(p).status().unwrap().success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("umount {} kept failing", p.display());
}

struct Layers {
    t: tempfile::TempDir,
    opts: String,
}

impl Layers {
    fn new() -> Self {
        let t = tempfile::tempdir().unwrap();
        for d in ["lower", "upper", "work", "mnt"] {
            fs::create_dir(t.path().join(d)).unwrap();
        }
        fs::write(t.path().join("lower/a"), "lower\n").unwrap();
        let p = t.path().display();
        let opts = format!("lowerdir={p}/lower,upperdir={p}/upper,workdir={p}/work");
        Layers { t, opts }
    }

    fn mnt(&self) -> std::path::PathBuf {
        self.t.path().join("mnt")
    }

    /// `ovl-mount -f`, returned once the mount is live.
    fn foreground(&self) -> Daemon {
        let mnt = self.mnt();
        let mut child = Command::new(BIN)
            .args(["-f", "-o", &self.opts])
            .arg(&mnt)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !is_fuse(&mnt) {
            assert!(child.try_wait().unwrap().is_none(), "ovl-mount exited");
            assert!(start.elapsed() < Duration::from_secs(10), "never mounted");
            std::thread::sleep(Duration::from_millis(5));
        }
        Daemon(child)
    }
}

/// A foreground ovl-mount, killed if a failing test leaves it running.
struct Daemon(Child);

impl Daemon {
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.0.wait()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Issue 11 item 1, first recipe: after `umount M`, a tmpfs mounted at M at once must survive
/// the exiting daemon (which used to `umount2(M)` by path on its way out).
#[test]
fn exiting_daemon_leaves_the_next_mount_alone() {
    if !is_root() {
        eprintln!("skipped: mounting tmpfs needs root");
        return;
    }
    let l = Layers::new();
    let mnt = l.mnt();
    for i in 0..25 {
        let mut child = l.foreground();
        fs::OpenOptions::new()
            .append(true)
            .open(mnt.join("a"))
            .unwrap();
        umount_retrying(&mnt);
        run("mount", &["-t", "tmpfs", "t"], &mnt);
        assert!(child.wait().unwrap().success());
        assert_eq!(
            fstype_at(&mnt).as_deref(),
            Some("tmpfs"),
            "try {i}: the daemon unmounted a tmpfs that was not its own"
        );
        run("umount", &[], &mnt);
    }
}

/// Issue 11 item 1, second recipe: `umount M; ovl-mount … M` straight after must leave the
/// new mount in place once the old daemon exits.
#[test]
fn remount_straight_after_umount_stays() {
    let l = Layers::new();
    let mnt = l.mnt();
    for i in 0..25 {
        let mut old = l.foreground();
        umount_retrying(&mnt);
        let out = Command::new(BIN)
            .args(["-o", &l.opts])
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert!(old.wait().unwrap().success());
        assert!(
            is_fuse(&mnt),
            "try {i}: the old daemon unmounted the new mount"
        );
        assert_eq!(fs::read_to_string(mnt.join("a")).unwrap(), "lower\n");
        umount_retrying(&mnt);
    }
}

/// The library: a handle whose mount was unmounted by someone else, with another mount at the
/// path now, must not unmount that one (neither `umount()` nor drop).
#[test]
fn handle_never_unmounts_a_mount_that_is_not_its_own() {
    if !is_root() {
        eprintln!("skipped: mounting tmpfs needs root");
        return;
    }
    let l = Layers::new();
    let mnt = l.mnt();
    for explicit in [true, false] {
        let mut ofs = OverlayFS::new(l.t.path().join("lower"));
        ofs.set_upper(l.t.path().join("upper"))
            .set_workdir(l.t.path().join("work"))
            .set_mountpoint(&mnt);
        ofs.mount().unwrap();
        umount_retrying(&mnt);
        run("mount", &["-t", "tmpfs", "t"], &mnt);
        if explicit {
            ofs.umount().unwrap();
        } else {
            drop(ofs);
        }
        assert_eq!(
            fstype_at(&mnt).as_deref(),
            Some("tmpfs"),
            "explicit={explicit}"
        );
        run("umount", &[], &mnt);
    }
    // A mount covering ours while ours is live: ours cannot be unmounted without unmounting
    // the other, so `umount` says so and changes nothing.
    let mut ofs = OverlayFS::new(l.t.path().join("lower"));
    ofs.set_upper(l.t.path().join("upper"))
        .set_workdir(l.t.path().join("work"))
        .set_mountpoint(&mnt);
    ofs.mount().unwrap();
    run("mount", &["-t", "tmpfs", "t"], &mnt);
    let err = ofs.umount().unwrap_err().to_string();
    assert!(err.contains("no longer ours"), "{err}");
    assert_eq!(fstype_at(&mnt).as_deref(), Some("tmpfs"));
    run("umount", &[], &mnt);
    ofs.umount().unwrap();
    assert_eq!(fstype_at(&mnt), None);
}

/// Issue 11 item 2: `umount merged && umount lower` succeeds at once, as with the kernel's
/// overlay (ovl's descriptors pin a private clone of the lower mount, not the user's mount).
#[test]
fn lower_unmounts_right_after_merged() {
    if !is_root() {
        eprintln!("skipped: mounting tmpfs needs root");
        return;
    }
    let l = Layers::new();
    let lower = l.t.path().join("lower");
    let mnt = l.mnt();
    for i in 0..15 {
        run("mount", &["-t", "tmpfs", "lowerfs"], &lower);
        fs::create_dir(lower.join("d")).unwrap();
        for j in 0..300 {
            fs::write(lower.join(format!("d/f{j}")), "x").unwrap();
        }
        fs::write(lower.join("a"), "lower\n").unwrap();
        let out = Command::new(BIN)
            .args(["-o", &l.opts])
            .arg(&mnt)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        for e in fs::read_dir(mnt.join("d")).unwrap() {
            fs::metadata(e.unwrap().path()).unwrap();
        }
        fs::write(mnt.join("d/f1"), "changed").unwrap();
        umount_retrying(&mnt);
        let out = Command::new("umount").arg(&lower).output().unwrap();
        assert!(
            out.status.success(),
            "try {i}: umount lower right after umount merged: {out:?}"
        );
        assert_eq!(
            fs::read_to_string(l.t.path().join("upper/d/f1")).unwrap(),
            "changed"
        );
    }
}

/// The detach helpers other threads use (ovl-run's signal handler, stale mount clean-up):
/// `Unmounter` detaches only its own mount, `unmount_path` only a FUSE mount.
#[test]
fn detach_helpers_leave_other_mounts_alone() {
    if !is_root() {
        eprintln!("skipped: mounting tmpfs needs root");
        return;
    }
    let l = Layers::new();
    let mnt = l.mnt();
    let mut ofs = OverlayFS::new(l.t.path().join("lower"));
    ofs.set_upper(l.t.path().join("upper"))
        .set_workdir(l.t.path().join("work"))
        .set_mountpoint(&mnt);
    ofs.mount().unwrap();
    let unmounter = ofs.handle().unwrap().unmounter();
    umount_retrying(&mnt);
    run("mount", &["-t", "tmpfs", "t"], &mnt);
    unmounter.detach().unwrap();
    assert_eq!(fstype_at(&mnt).as_deref(), Some("tmpfs"));
    ovl::engine::fusermount::unmount_path(&mnt).unwrap();
    assert_eq!(fstype_at(&mnt).as_deref(), Some("tmpfs"));
    run("umount", &[], &mnt);
    drop(ofs);

    // While ours is live at the path, both detach it.
    for by_path in [false, true] {
        let mut ofs = OverlayFS::new(l.t.path().join("lower"));
        ofs.set_upper(l.t.path().join("upper"))
            .set_workdir(l.t.path().join("work"))
            .set_mountpoint(&mnt);
        ofs.mount().unwrap();
        if by_path {
            ovl::engine::fusermount::unmount_path(&mnt).unwrap();
        } else {
            ofs.handle().unwrap().unmounter().detach().unwrap();
        }
        assert_eq!(fstype_at(&mnt), None, "by_path={by_path}");
        ofs.handle_mut().unwrap().wait_unmounted().unwrap();
    }
}

/// A process that makes a mount namespace while ovl is mounted holds a copy of the mount, which
/// keeps the FUSE connection alive after ovl's own unmount. `umount` must not wait for the
/// session forever (it hung: rootless podman's pause process held a test's mount): it fails,
/// naming the holder, and keeps the session so nothing is finalized while it may still serve.
#[test]
fn umount_names_a_namespace_that_holds_a_copy_instead_of_hanging() {
    if !is_root() {
        eprintln!("skipped: unshare -m needs root");
        return;
    }
    let l = Layers::new();
    let mnt = l.mnt();
    let mut ofs = OverlayFS::new(l.t.path().join("lower"));
    ofs.set_upper(l.t.path().join("upper"))
        .set_workdir(l.t.path().join("work"))
        .set_mountpoint(&mnt);
    ofs.mount().unwrap();
    let ready = l.t.path().join("ready");
    let mut holder = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg("touch \"$1\"; exec sleep 60")
        .arg("sh")
        .arg(&ready)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "the holder did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    let start = Instant::now();
    let err = ofs.umount().unwrap_err().to_string();
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "umount waited {:?}",
        start.elapsed()
    );
    assert!(err.contains("copies of the mount live on"), "{err}");
    assert!(err.contains(&format!("pid {}", holder.id())), "{err}");
    // Ours is gone from this namespace all the same.
    assert_eq!(fstype_at(&mnt), None);
    holder.kill().unwrap();
    holder.wait().unwrap();
    drop(ofs);
}
