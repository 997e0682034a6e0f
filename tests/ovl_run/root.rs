//! `--root` sessions: root inside a busybox rootfs, as root and as a normal user (subordinate
//! ids, dpkg -i, other users; without subordinate ids foreign files are read-only).

use super::*;

#[test]
fn root_session_in_a_busybox_rootfs() {
    let w = World::new();
    let rootfs = make_rootfs(&w);
    let o = run({
        let mut c = w.ovl();
        c.args(["--root", "--lower"]).arg(&rootfs).args([
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/os-release",
        ]);
        c
    });
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, OS_RELEASE);
    // Nothing of the session's own mounts leaked into the upper.
    assert_eq!(
        o.stderr,
        format!(
            "ovl-run: preserved 0 changes in {}\n",
            w.p("rootfs_upper").display()
        )
    );
    assert_eq!(w.mount_dirs(), Vec::<String>::new());

    // The cwd maps into the new root; a missing command is 127, a non-executable one 126.
    let mut c = w.ovl();
    c.current_dir(rootfs.join("etc"))
        .args(["-q", "--root", "--lower"])
        .arg(&rootfs)
        .args(["--", "/bin/sh", "-c", "pwd; cat os-release"]);
    let o = run(c);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, format!("/etc\n{OS_RELEASE}"));
    for (cmd, code) in [("/no/such/cmd", 127), ("/etc/os-release", 126)] {
        let mut c = w.ovl();
        c.args(["-q", "--root", "--lower"])
            .arg(&rootfs)
            .args(["--", cmd]);
        let o = run(c);
        assert_eq!(o.code, code, "{cmd}: {o:?}");
    }
}

#[test]
fn root_session_as_non_root_user() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let rootfs = make_rootfs(&w);
    let (bin, uid, _) = user_world(&w);
    let o = run(as_user(
        &w,
        &bin,
        &[
            "-q",
            "--root",
            "--lower",
            rootfs.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/os-release; echo y > /y",
        ],
    ));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, OS_RELEASE);
    let up = w.p("rootfs_upper");
    assert_eq!(read(up.join("y")), "y\n");
    assert_eq!(fs::metadata(up.join("y")).unwrap().uid(), uid);
}

// ---------------------------------------------------------------------------------------------
// --root as a normal user: root inside, subordinate ids, other users
// ---------------------------------------------------------------------------------------------

#[test]
fn root_session_with_subordinate_ids_has_root_and_other_users() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, uid, gid) = user_world(&w);
    let sub = ensure_subids();
    let rootfs = dpkg_rootfs(&w, uid, gid, Some(sub), 0);
    let before = tree(&rootfs);
    let nobody = "/usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups";
    let apt = "/usr/bin/setpriv --reuid=42 --regid=42 --clear-groups";
    let script = format!(
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin; id -u; echo x > /x; chown 1234:1234 /x; \
         stat -c %u:%g /x; dpkg -i /pkgs/hello.deb >/dev/null && cat /usr/share/hello/greeting; \
         echo root >> /var/apt/f; {apt} cat /var/apt/f; {nobody} ls /pkgs; \
         {nobody} cat /var/apt/f || echo nobody-may-not-read; \
         {nobody} sh -c 'echo > /nope' || echo nobody-may-not-write; \
         rm -r /var/lib/dpkg/parts && mkdir /var/lib/dpkg/parts && ls -a /var/lib/dpkg/parts"
    );
    let o = run(as_user(
        &w,
        &bin,
        &[
            "-q",
            "--root",
            "--lower",
            rootfs.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            &script,
        ],
    ));
    assert_eq!(
        o.stdout,
        "0\n1234:1234\nhi\napt\nroot\nhello.deb\nnobody-may-not-read\nnobody-may-not-write\n.\n..\n",
        "{o:?}"
    );
    assert_eq!(o.code, 0, "{o:?}");
    assert!(!o.stderr.contains("warning"), "{o:?}");
    assert_eq!(tree(&rootfs), before, "the rootfs changed");
    // In the upper, as the namespace maps them: 1234 is the 1234th subordinate id.
    let up = w.p("rootfs_upper");
    let m = fs::metadata(up.join("x")).unwrap();
    assert_eq!((m.uid(), m.gid()), (sub.0 + 1233, sub.1 + 1233));
    let m = fs::metadata(up.join("var/apt/f")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (sub.0 + 41, 0o600));
    assert_eq!(read(up.join("usr/share/hello/greeting")), "hi\n");

    // --keep-uid: the caller's own ids inside.
    let o = run(as_user(
        &w,
        &bin,
        &[
            "-q",
            "--root",
            "--keep-uid",
            "--lower",
            rootfs.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "id -u",
        ],
    ));
    assert_eq!((o.code, o.stdout.clone()), (0, format!("{uid}\n")), "{o:?}");

    // A rootfs made where root was the first subordinate id (mmdebstrap --mode=unshare
    // writing a directory) is named, once.
    std::os::unix::fs::lchown(&rootfs, Some(sub.0), Some(sub.1)).unwrap();
    let o = run(as_user(
        &w,
        &bin,
        &[
            "-q",
            "--root",
            "--on-exit",
            "discard",
            "--lower",
            rootfs.to_str().unwrap(),
            "--",
            "/bin/id",
        ],
    ));
    assert_eq!(o.stderr.lines().count(), 1, "{o:?}");
    assert!(
        o.stderr.starts_with(&format!(
            "ovl-run: warning: {} belongs to your first subordinate uid {}",
            rootfs.display(),
            sub.0
        )),
        "{o:?}"
    );
    std::os::unix::fs::lchown(&rootfs, Some(uid), Some(gid)).unwrap();

    // As root the mount is open to the session's other users too.
    let mut c = w.ovl();
    c.args(["-q", "--root", "--on-exit", "discard", "--lower"])
        .arg(&rootfs)
        .args(["--", "/bin/sh", "-c", &format!("{nobody} ls /pkgs")]);
    let o = run(c);
    assert_eq!((o.code, o.stdout.as_str()), (0, "hello.deb\n"), "{o:?}");
}

#[test]
fn root_session_without_subordinate_ids_warns_once_and_foreign_files_are_read_only() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (uid, gid) = ensure_nosub_user();
    let bin = w.p("ovl-run");
    fs::copy(BIN, &bin).unwrap();
    fs::create_dir_all(&w.cache).unwrap();
    chown_tree(&w.root, uid, gid);
    let rootfs = dpkg_rootfs(&w, uid, gid, None, 4321);
    let before = tree(&rootfs);
    let mut c = Command::new("runuser");
    c.current_dir(&w.root)
        .env_remove("RUST_LOG")
        .args(["-u", NOSUB_USER, "--", "env"])
        .arg(format!("XDG_CACHE_HOME={}", w.cache.display()))
        .arg(user_backend_env())
        .arg(&bin)
        .args(["-q", "--root", "--lower"])
        .arg(&rootfs)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "id -u; echo x > /x && echo wrote-own; stat -c %u /var/apt/f; \
             echo y >> /var/apt/f || echo foreign-read-only",
        ]);
    let o = run(c);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        o.stdout, "0\nwrote-own\n65534\nforeign-read-only\n",
        "{o:?}"
    );
    let warnings: Vec<&str> = o.stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{o:?}");
    assert!(
        warnings[0].starts_with("ovl-run: warning: only your own ids are mapped: ")
            && warnings[0].contains(&format!(
                "{NOSUB_USER} has no subordinate ids in /etc/subuid"
            ))
            && warnings[0].contains("files of other owners are read-only"),
        "{o:?}"
    );
    assert_eq!(tree(&rootfs), before, "the rootfs changed");
    assert_eq!(fs::metadata(w.p("rootfs_upper/x")).unwrap().uid(), uid);
}
