//! Serve mode: the mount point printed, the session ending on SIGTERM, `fusermount -u` or
//! SIGKILL without a dead mount.

use super::*;

#[test]
fn serve_mode_prints_mountpoint_and_ends_on_sigterm() {
    let w = World::new();
    let mut r = Running::start(w.ovl_lower(&[]));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    assert_eq!(mnt.parent(), Some(w.cache.as_path()));
    // Usable by other processes.
    let cat = Command::new("cat").arg(mnt.join("f")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "lower\n", "{cat:?}");
    fs::write(mnt.join("served"), "s\n").unwrap();
    assert_eq!(fuse_mounts_under(&mnt).len(), 1);
    r.signal(libc::SIGTERM);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 1 changes in {}\n", w.upper().display())
    );
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert!(!mnt.exists(), "mount point left behind");
    assert_eq!(read(w.upper().join("served")), "s\n");
}

#[test]
fn serve_mode_ends_on_fusermount_u() {
    let w = World::new();
    let mut r = Running::start(w.ovl_lower(&["-q", "--on-exit", "discard"]));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    fs::write(mnt.join("x"), "x").unwrap();
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());
    let o = r.wait(DEADLINE);
    assert_eq!((o.code, o.stderr.as_str()), (0, ""), "{o:?}");
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert!(!mnt.exists(), "mount point left behind");
    assert!(!w.upper().exists() && !w.work().exists(), "not discarded");
}

#[test]
fn serve_mode_sigkill_leaves_no_dead_mount() {
    let w = World::new();
    let mut r = Running::start(w.ovl_lower(&["-q"]));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    assert_eq!(read(mnt.join("f")), "lower\n");
    r.signal(libc::SIGKILL);
    assert_eq!(r.wait(DEADLINE).code, 137);
    // fusermount3 (auto_unmount) takes the mount away.
    wait_for("the mount to go away", DEADLINE, || {
        fuse_mounts_under(&w.cache).is_empty().then_some(())
    });
    let o = run(w.ovl_lower(&["-q", "--", "true"]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}
