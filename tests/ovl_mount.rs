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
            format!("{opts},uidmapping=0:1"),
            "uidmapping='0:1': give DISK:SHOWN:LEN",
        ),
        (format!("{opts},gidmapping=0:0:5:3:9:1"), "ranges overlap"),
        (
            format!("{opts},fsync=2"),
            "fsync=2: give fsync=0 or fsync=1",
        ),
        (
            format!("{opts},squash_to_uid=me"),
            "squash_to_uid=me: give a numeric id",
        ),
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

/// Mounts `opts` with ovl-mount (daemon) at `mnt`.
fn mount_with(opts: &str, mnt: &Path) {
    let out = Command::new(BIN)
        .args(["-o", opts])
        .arg(mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "{opts}: {out:?}");
}

fn owner(p: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid())
}

/// Issue 11 item 7: the options containers/storage passes are accepted, and the ones that
/// change behaviour do: id mappings both ways, squashing, static_nlink, userxattr.
#[test]
fn container_options_map_ids_and_squash() {
    use std::os::unix::fs::MetadataExt;
    if !is_root() {
        eprintln!("skipped: chown needs root");
        return;
    }
    let (t, opts) = layers();
    let mnt = t.path().join("mnt");
    let lower = t.path().join("lower");
    let upper = t.path().join("upper");
    fs::write(lower.join("mine"), "x").unwrap();
    std::os::unix::fs::lchown(lower.join("mine"), Some(1000), Some(1000)).unwrap();
    fs::create_dir_all(lower.join("d/sub")).unwrap();
    fs::write(lower.join("d/old"), "x").unwrap();
    let accepted = "noacl,xattr_permissions=0,static_nlink,redirect_dir=off,index=off,\
                    metacopy=off,timeout=1,threaded=1,volatile,fsync=0,userxattr,\
                    context=\"system_u:object_r:container_file_t:s0:c1,c2\"";
    mount_with(
        &format!(
            "{opts},{accepted},uidmapping=0:100000:1000:1000:5000:1,gidmapping=0:100000:65536"
        ),
        &mnt,
    );
    // On disk 0 is shown as 100000, 1000 as 5000 (uid) and 101000 (gid).
    assert_eq!(owner(&mnt.join("f")), (100000, 100000));
    assert_eq!(owner(&mnt.join("mine")), (5000, 101000));
    // A chown names shown ids; the disk gets the mapped ones.
    std::os::unix::fs::lchown(mnt.join("f"), Some(100005), Some(100007)).unwrap();
    assert_eq!(owner(&mnt.join("f")), (100005, 100007));
    assert_eq!(owner(&upper.join("f")), (5, 7));
    // The caller (root, id 0) is outside the mapping: a new entry gets the overflow id on
    // disk, as with fuse-overlayfs.
    fs::write(mnt.join("new"), "n").unwrap();
    assert_eq!(owner(&upper.join("new")), (65534, 65534));
    // static_nlink: directories show one link.
    assert_eq!(fs::metadata(mnt.join("d")).unwrap().nlink(), 1);
    // userxattr as root: an opaque directory is marked in user.overlay.*, not trusted.*.
    fs::remove_dir_all(mnt.join("d")).unwrap();
    fs::create_dir(mnt.join("d")).unwrap();
    assert_eq!(fs::read_dir(mnt.join("d")).unwrap().count(), 0);
    assert_eq!(
        sys::lgetxattr(&upper.join("d"), "user.overlay.opaque").unwrap(),
        b"y"
    );
    assert!(sys::lgetxattr(&upper.join("d"), "trusted.overlay.opaque").is_err());
    unmount_retrying("umount", &[], &mnt);

    mount_with(&format!("{opts},squash_to_root,squash_to_gid=7"), &mnt);
    for name in ["f", "mine", "new", "d"] {
        assert_eq!(owner(&mnt.join(name)), (0, 7), "{name}");
    }
    unmount_retrying("umount", &[], &mnt);
}

/// `fsync=0` (and `volatile`): neither an fsync request nor a copy-up syncs; without it both
/// do. Counted with strace on a foreground daemon.
#[test]
fn fsync_0_syncs_nothing() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("skipped: strace is not installed");
        return;
    }
    for (extra, want_syncs) in [("", true), (",fsync=0", false)] {
        let (t, opts) = layers();
        let mnt = t.path().join("mnt");
        let log = t.path().join("strace.log");
        let mut child = Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=fsync,fdatasync", "-o"])
            .arg(&log)
            .arg(BIN)
            .args(["-f", "-o", &format!("{opts}{extra}")])
            .arg(&mnt)
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !is_mounted(&mnt) {
            assert!(start.elapsed() < Duration::from_secs(10), "never mounted");
            std::thread::sleep(Duration::from_millis(20));
        }
        // A copy-up with data (append to the lower file), then an fsync request.
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(mnt.join("f"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"+").unwrap();
        f.sync_all().unwrap();
        drop(f);
        unmount_retrying("umount", &[], &mnt);
        assert!(child.wait().unwrap().success());
        let text = fs::read_to_string(&log).unwrap();
        let syncs = text.lines().filter(|l| l.contains("sync(")).count();
        assert_eq!(syncs > 0, want_syncs, "options '{extra}': {text}");
        assert_eq!(
            fs::read_to_string(t.path().join("upper/f")).unwrap(),
            "lower+"
        );
    }
}
