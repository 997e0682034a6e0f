//! Directory renames land as moves: redirects (also a normal user's) commit as renames of the
//! lower directories, files keep their inodes, interrupted moves are finished by the next
//! commit.

use super::*;

/// Renames of lower and merged directories (recorded by the mount as redirects: relative,
/// absolute, nested, under a new opaque directory, renamed again and back, exchanged, over a
/// hidden lower directory) land as moves of the lower directories: the tree is the plain
/// copy's, and in place every file keeps its inode (nothing was copied).
#[test]
fn directory_renames_are_moved_not_copied() {
    need_root!();
    let setup = |l: &Path, _: &Path| {
        for d in ["a/b/c", "z", "p/q", "x", "y", "e"] {
            fs::create_dir_all(l.join(d)).unwrap();
        }
        for f in [
            "a/f", "a/b/g", "a/b/c/h", "z/i", "p/q/j", "x/k", "y/l", "e/m",
        ] {
            fs::write(l.join(f), format!("{f}\n")).unwrap();
        }
    };
    let script = "\
mv a a2
mv a2/b top
mkdir a
mv top/c a/c2
mv z z2
mv z2 z
mv p/q pq
mv pq p/q2
echo new > p/q2/n
mv x xt
mv y x
mv xt y
rm e/m
mv -T x e
";
    // Where each lower file ends up.
    let moved = [
        ("a/f", "a2/f"),
        ("a/b/g", "top/g"),
        ("a/b/c/h", "a/c2/h"),
        ("z/i", "z/i"),
        ("p/q/j", "p/q2/j"),
        ("x/k", "y/k"),
        ("y/l", "e/l"),
    ];
    for action in MODES {
        let inos = std::cell::RefCell::new(HashMap::new());
        let (fx, r, expected) = scenario(
            |l, t| {
                setup(l, t);
                for (f, _) in moved {
                    inos.borrow_mut().insert(f, ino_of(&l.join(f)));
                }
            },
            script,
            action,
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
        let l = leaks(&snap(&fx.lower));
        assert!(l.is_empty(), "{action:?}: overlay internals leaked: {l:?}");
        if action == OverlayAction::Commit {
            for (from, to) in moved {
                assert_eq!(
                    ino_of(&fx.l(to)),
                    inos.borrow()[from],
                    "{to} (was {from}) was rewritten, not moved"
                );
            }
        }
    }
}

/// As a normal user on ovl's FUSE engine (user.* xattrs, no passthrough): a renamed lower
/// directory is stored as a `user.overlay.redirect` (not copied), shows its content again in
/// the next run, and commit moves it in the lower (its files keep their inodes). The kernel's
/// overlay does not do this for a normal user: see the next test.
#[test]
fn non_root_directory_rename_is_a_redirect_and_commits_as_a_move() {
    need_root!();
    let (uid, gid) = ensure_test_user();
    let t = tempfile::Builder::new().prefix("ovl-nr").tempdir().unwrap();
    let r = t.path();
    chmod(r, 0o755);
    let (lower, upper) = (r.join("L"), r.join("L_upper"));
    fs::create_dir_all(lower.join("big/sub")).unwrap();
    for i in 0..50 {
        fs::write(lower.join(format!("big/f{i}")), format!("{i}\n")).unwrap();
    }
    fs::write(lower.join("big/sub/g"), "g\n").unwrap();
    fs::create_dir(r.join("cache")).unwrap();
    fs::copy(OVL_RUN, r.join("ovl-run")).unwrap();
    run(Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(r));
    let ino = ino_of(&lower.join("big/f7"));
    let user_run = |args: &[&str]| {
        output(
            Command::new("runuser")
                .current_dir(r)
                .args(["-u", TEST_USER, "--", "env"])
                .arg(format!("XDG_CACHE_HOME={}", r.join("cache").display()))
                .arg(r.join("ovl-run"))
                .args(["-q", "--backend", "fuse", "--lower"])
                .arg(&lower)
                .args(args),
        )
    };
    let o = user_run(&[
        "--",
        "sh",
        "-c",
        "mv \"$OVL_MOUNTPOINT/big\" \"$OVL_MOUNTPOINT/moved\"",
    ]);
    assert!(o.status.success(), "mv as the user: {}", stderr(&o));
    assert_eq!(
        lgetxattr(&upper.join("moved"), "user.overlay.redirect").unwrap(),
        b"big",
        "no redirect stored"
    );
    assert_eq!(
        names(&upper.join("moved")),
        Vec::<String>::new(),
        "the subtree was copied up"
    );
    let o = user_run(&[
        "--",
        "sh",
        "-c",
        "cat \"$OVL_MOUNTPOINT/moved/f7\" \"$OVL_MOUNTPOINT/moved/sub/g\"",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "7\ng\n",
        "{}",
        stderr(&o)
    );
    let o = user_run(&["--on-exit", "commit", "--", "true"]);
    assert!(o.status.success(), "commit as the user: {}", stderr(&o));
    assert!(!exists(&lower.join("big")));
    assert_eq!(
        fs::read_to_string(lower.join("moved/sub/g")).unwrap(),
        "g\n"
    );
    assert_eq!(names(&lower.join("moved")).len(), 51);
    assert_eq!(
        ino_of(&lower.join("moved/f7")),
        ino,
        "committed as a copy, not a move"
    );
}

/// The same rename as a normal user on the kernel's overlay (README, Known differences): in a
/// user namespace the kernel writes no redirect (`userxattr` means `redirect_dir=nofollow`),
/// so rename(2) of a lower directory fails with EXDEV. `mv` then copies the tree and deletes
/// the original, which users see as a working (slower) `mv`; the upper holds a full copy,
/// and commit writes it as new files (other inodes) and deletes the old directory.
#[test]
fn non_root_directory_rename_on_the_kernel_backend_is_a_copy() {
    need_root!();
    if common::backend::kernel_for_user() != "kernel" {
        eprintln!("skipping: the kernel's overlay cannot serve a normal user's ovl-run here");
        return;
    }
    let (uid, gid) = ensure_test_user();
    let t = tempfile::Builder::new()
        .prefix("ovl-nrk")
        .tempdir()
        .unwrap();
    let r = t.path();
    chmod(r, 0o755);
    let (lower, upper) = (r.join("L"), r.join("L_upper"));
    fs::create_dir_all(lower.join("big/sub")).unwrap();
    for i in 0..50 {
        fs::write(lower.join(format!("big/f{i}")), format!("{i}\n")).unwrap();
    }
    fs::write(lower.join("big/sub/g"), "g\n").unwrap();
    fs::create_dir(r.join("cache")).unwrap();
    fs::copy(OVL_RUN, r.join("ovl-run")).unwrap();
    run(Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(r));
    let ino = ino_of(&lower.join("big/f7"));
    let user_sh = |args: &[&str], script: &str| {
        output(
            Command::new("runuser")
                .current_dir(r)
                .args(["-u", TEST_USER, "--", "env"])
                .arg(format!("XDG_CACHE_HOME={}", r.join("cache").display()))
                .arg(r.join("ovl-run"))
                .args(["-q", "--backend", "kernel", "--lower"])
                .arg(&lower)
                .args(args)
                .args(["--", "sh", "-c", script]),
        )
    };
    let out = |o: &Output| String::from_utf8_lossy(&o.stdout).into_owned();
    // rename(2) itself: EXDEV, nothing changed; then mv, which copies.
    let o = user_sh(
        &[],
        "cd \"$OVL_MOUNTPOINT\" && perl -e 'rename(\"big\", \"moved\") or print 0+$!, \"\\n\"' \
         && ls && mv big moved && ls && cat moved/f7",
    );
    assert!(o.status.success(), "as the user: {}", stderr(&o));
    assert_eq!(out(&o), format!("{}\nbig\nmoved\n7\n", libc::EXDEV));
    assert!(
        lgetxattr(&upper.join("moved"), "user.overlay.redirect").is_err(),
        "a redirect was stored"
    );
    assert_eq!(names(&upper.join("moved")).len(), 51, "not copied up whole");
    let big = fs::symlink_metadata(upper.join("big")).unwrap();
    assert_eq!((kind_char(big.file_type()), big.rdev()), ('c', 0));
    let o = user_sh(
        &["--on-exit", "commit"],
        "cat \"$OVL_MOUNTPOINT/moved/sub/g\"",
    );
    assert!(o.status.success(), "commit as the user: {}", stderr(&o));
    assert_eq!(out(&o), "g\n");
    assert!(!exists(&lower.join("big")));
    assert_eq!(names(&lower.join("moved")).len(), 51);
    assert_eq!(fs::read_to_string(lower.join("moved/f7")).unwrap(), "7\n");
    assert_ne!(ino_of(&lower.join("moved/f7")), ino, "a copy, not a move");
    let l = leaks(&snap(&lower));
    assert!(l.is_empty(), "overlay internals leaked: {l:?}");
    assert!(!exists(&upper));
}

/// An in-place commit interrupted after it moved directories is finished by the next commit
/// through the library (no mount in between), at every crash point: the lower is the new tree
/// and nothing is left behind.
#[test]
fn interrupted_directory_moves_are_finished_by_the_next_library_commit() {
    need_root!();
    let script = "cd \"$OVL_MOUNTPOINT\"; mv d1 d1moved; mv d2/sub subm; echo b > a";
    let setup = |l: &Path| {
        fs::create_dir_all(l.join("d1/d")).unwrap();
        fs::create_dir_all(l.join("d2/sub")).unwrap();
        fs::write(l.join("d1/x"), "x\n").unwrap();
        fs::write(l.join("d2/sub/z"), "z\n").unwrap();
        fs::write(l.join("a"), "a\n").unwrap();
    };
    let want = {
        let t = tempfile::tempdir().unwrap();
        let c = t.path().join("c");
        fs::create_dir(&c).unwrap();
        setup(&c);
        sh_in(&c, "mv d1 d1moved; mv d2/sub subm; echo b > a");
        snap(&c)
    };
    let mut finished = 0;
    for n in 1.. {
        let t = tempfile::Builder::new().prefix("ovl-mv").tempdir().unwrap();
        let lower = t.path().join("L");
        fs::create_dir(&lower).unwrap();
        setup(&lower);
        let o = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--on-exit"),
                os("commit"),
                os("--"),
                os("sh"),
                os("-c"),
                os(script),
            ],
            Some(n),
        );
        if o.status.success() {
            break; // past the last step
        }
        let mut ofs = OverlayFS::new(&lower);
        ofs.set_upper(t.path().join("L_upper"));
        let r = ofs.overlay_action(OverlayAction::Commit);
        assert!(
            r.is_ok(),
            "N={n}: the next commit failed: {}",
            r.unwrap_err()
        );
        assert_tree(&format!("N={n}"), &lower, &want, EXACT);
        assert_eq!(
            names(t.path()),
            ["L", "cache"],
            "N={n}: left beside the lower"
        );
        finished += 1;
    }
    assert!(finished > 3, "too few crash points: {finished}");
}

#[test]
fn interrupted_directory_moves_are_finished_by_the_next_library_commit_on_the_kernel_backend() {
    on_kernel(interrupted_directory_moves_are_finished_by_the_next_library_commit);
}

/// Root never follows a `user.overlay.redirect` (a normal user's mount wrote it; see README),
/// and merging such a directory as it stands would lose its moved content: the commit refuses
/// with one line naming it, and nothing changes.
#[test]
fn root_refuses_to_commit_a_user_redirect() {
    need_root!();
    for action in MODES {
        let t = tempfile::Builder::new().prefix("ovl-ur").tempdir().unwrap();
        let (lower, upper) = (t.path().join("L"), t.path().join("U"));
        fs::create_dir_all(lower.join("d")).unwrap();
        fs::write(lower.join("d/f"), "f\n").unwrap();
        fs::create_dir_all(upper.join("moved")).unwrap();
        lsetxattr(&upper.join("moved"), "user.overlay.redirect", b"d", 0).unwrap();
        mknod(&upper.join("d"), libc::S_IFCHR, 0).unwrap();
        let (before_l, before_u) = (snap(&lower), snap(&upper));
        let mut ofs = OverlayFS::new(&lower);
        ofs.set_upper(&upper);
        let e = ofs.overlay_action(action).unwrap_err().to_string();
        assert!(
            e.contains("moved") && e.contains("user.overlay.redirect"),
            "{action:?}: {e}"
        );
        assert!(
            same_tree(&snap(&lower), &before_l, LINKS),
            "{action:?}: lower changed"
        );
        assert!(
            same_tree(&snap(&upper), &before_u, LINKS),
            "{action:?}: upper changed"
        );
    }
}

/// A directory whose lower path is too long for a redirect (over PATH_MAX) is still renamed
/// across directories: copied up whole instead, and committed to its new place.
#[test]
fn rename_of_a_directory_too_deep_for_a_redirect_still_works() {
    need_root!();
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    fn open_dir(at: &OwnedFd, name: &str) -> OwnedFd {
        let c = std::ffi::CString::new(name).unwrap();
        let fd = unsafe {
            libc::openat(
                at.as_raw_fd(),
                c.as_ptr(),
                libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        assert!(fd >= 0, "openat {name}: {}", io::Error::last_os_error());
        unsafe { OwnedFd::from_raw_fd(fd) }
    }
    let names: Vec<String> = (0..17)
        .map(|i| format!("{i:02}{}", "n".repeat(250)))
        .collect();
    let mut fx = Fx::new(|l, _| {
        let mut fd = OwnedFd::from(fs::File::open(l).unwrap());
        for n in &names {
            let c = std::ffi::CString::new(n.as_str()).unwrap();
            assert_eq!(
                unsafe { libc::mkdirat(fd.as_raw_fd(), c.as_ptr(), 0o755) },
                0
            );
            fd = open_dir(&fd, n);
        }
        let c = std::ffi::CString::new("f").unwrap();
        let f = unsafe {
            libc::openat(
                fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                0o644,
            )
        };
        assert!(f >= 0);
        assert_eq!(unsafe { libc::write(f, b"deep".as_ptr().cast(), 4) }, 4);
        unsafe { libc::close(f) };
    });
    let mnt = OwnedFd::from(fs::File::open(&fx.mnt).unwrap());
    let mut fd = open_dir(&mnt, &names[0]);
    for n in &names[1..16] {
        fd = open_dir(&fd, n);
    }
    let from = std::ffi::CString::new(names[16].as_str()).unwrap();
    let r = unsafe {
        libc::renameat(
            fd.as_raw_fd(),
            from.as_ptr(),
            mnt.as_raw_fd(),
            c"top".as_ptr(),
        )
    };
    assert_eq!(r, 0, "rename: {}", io::Error::last_os_error());
    assert_eq!(fs::read_to_string(fx.mnt.join("top/f")).unwrap(), "deep");
    drop((fd, mnt));
    fx.finish(OverlayAction::Commit).unwrap();
    assert_eq!(fs::read_to_string(fx.l("top/f")).unwrap(), "deep");
}
