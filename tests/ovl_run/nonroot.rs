//! A normal user: through fusermount3, foreign groups, no home, an upper they may not
//! write, the writeback cache, serving.

use super::*;

#[test]
fn non_root_user_runs_a_command() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, uid, gid) = user_world(&w);
    let o = user_sh(&w, &bin, &[], "id -u; cat f; echo mine > mine");
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, format!("{uid}\nlower\n"));
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 1 changes in {}\n", w.upper().display())
    );
    let m = fs::metadata(w.upper().join("mine")).unwrap();
    assert_eq!((m.uid(), m.gid()), (uid, gid));
    assert_eq!(read(w.upper().join("mine")), "mine\n");
    assert_eq!(fs::metadata(w.upper()).unwrap().uid(), uid);
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

#[test]
fn non_root_user_with_files_of_a_foreign_group() {
    // The user's files may belong to a group the user namespace does not map (here root's):
    // inside it shows as 65534, chown to it fails with EINVAL, and the kernel refuses writes to
    // such files. A lower whose root is like that must still mount (its root's metadata is
    // copied to the new upper), read, and take writes where the ids are the user's.
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, uid, gid) = user_world(&w);
    fs::create_dir(w.lower.join("mine")).unwrap();
    fs::write(w.lower.join("mine/g"), "g\n").unwrap();
    chown_tree(&w.lower, uid, 0);
    chown_tree(&w.lower.join("mine"), uid, gid);
    let script = "cat f; echo more >> mine/g; cat mine/g; echo x >> f 2>/dev/null || echo refused";
    let o = user_sh(&w, &bin, &[], script);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, "lower\ng\nmore\nrefused\n");
    assert_eq!(read(w.upper().join("mine/g")), "g\nmore\n");
    assert!(!w.upper().join("f").exists());
    assert_eq!(read(w.lower.join("mine/g")), "g\n");
}

#[test]
fn non_root_user_without_a_home() {
    // System accounts often have no home directory: the default mount point then goes to the
    // temporary directory instead of failing on ~/.cache, and is removed afterwards.
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, uid, gid) = user_world(&w);
    let tmp = w.p("tmp");
    fs::create_dir(&tmp).unwrap();
    chown_tree(&tmp, uid, gid);
    let mut c = Command::new("runuser");
    c.current_dir(&w.root)
        .env_remove("RUST_LOG")
        .args([
            "-u",
            USER,
            "--",
            "env",
            "-u",
            "XDG_CACHE_HOME",
            "HOME=/nonexistent",
        ])
        .arg(format!("TMPDIR={}", tmp.display()))
        .arg(user_backend_env())
        .arg(&bin)
        .args(["--lower", w.lower.to_str().unwrap(), "--", "cat", "f"]);
    let o = run(c);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, "lower\n");
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "mount point left in TMPDIR"
    );
}

#[test]
fn non_root_user_upper_where_they_may_not_write() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let locked = w.p("locked");
    fs::create_dir(&locked).unwrap(); // root's, 0755
    let up = locked.join("up");
    let o = user_sh(&w, &bin, &["--upper", up.to_str().unwrap()], "true");
    assert_eq!(o.code, 125, "{o:?}");
    assert_eq!(o.stderr.lines().count(), 1, "{o:?}");
    assert!(o.stderr.contains(up.to_str().unwrap()), "{o:?}");
    assert!(
        o.stderr
            .contains("choose an upper directory where you may write"),
        "{o:?}"
    );
    assert_eq!(fs::read_dir(&locked).unwrap().count(), 0);
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

#[test]
fn non_root_user_writeback_cache_commits_every_write() {
    // With the writeback cache, written pages sit in the kernel until written back: a commit
    // right after the command exits must still see every byte, also of a file the command
    // mapped and wrote through memory.
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let script = "set -e; i=0; while [ $i -lt 200 ]; do printf '%05d\\n' $i >> log; i=$((i+1)); done; \
                  dd if=/dev/zero of=big bs=4k count=512 status=none; printf x > f; \
                  python3 -c \"import mmap,os; fd=os.open('m',os.O_RDWR|os.O_CREAT,0o644); os.ftruncate(fd,8192); mm=mmap.mmap(fd,8192); mm[4096:4100]=b'MMAP'; mm.close(); os.close(fd)\"";
    let o = user_sh(
        &w,
        &bin,
        &["--writeback-cache", "--on-exit", "commit"],
        script,
    );
    assert_eq!(o.code, 0, "{o:?}");
    let want: String = (0..200).map(|i| format!("{i:05}\n")).collect();
    assert_eq!(read(w.lower.join("log")), want);
    assert_eq!(
        fs::read(w.lower.join("big")).unwrap(),
        vec![0u8; 4096 * 512]
    );
    assert_eq!(read(w.lower.join("f")), "x");
    let m = fs::read(w.lower.join("m")).unwrap();
    assert_eq!(m.len(), 8192);
    assert_eq!(&m[4096..4100], b"MMAP");
    assert!(m[..4096].iter().all(|&b| b == 0));
}

#[test]
fn non_root_user_serve_sigkill_leaves_no_dead_mount() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let mut r = Running::start(as_user(
        &w,
        &bin,
        &["-q", "--lower", w.lower.to_str().unwrap()],
    ));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    assert_eq!(fuse_mounts_under(&mnt).len(), 1);
    let ovl = find_descendant(r.pid(), "ovl-run").expect("ovl-run below runuser");
    assert_eq!(unsafe { libc::kill(ovl, libc::SIGKILL) }, 0);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 137, "{o:?}");
    // fusermount3 (auto_unmount) should take the mount away by itself.
    let start = Instant::now();
    let mut left = fuse_mounts_under(&w.cache);
    while !left.is_empty() && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
        left = fuse_mounts_under(&w.cache);
    }
    // Whatever happened, the next run (as the user) detaches and removes what is left.
    let o = run(as_user(
        &w,
        &bin,
        &["-q", "--lower", w.lower.to_str().unwrap(), "--", "true"],
    ));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert_eq!(
        left,
        Vec::<String>::new(),
        "a dead mount stayed behind after ovl-run (serve mode, non-root) was SIGKILLed"
    );
}

#[test]
fn non_root_user_serves() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, uid, _) = user_world(&w);
    let mut r = Running::start(as_user(&w, &bin, &["--lower", w.lower.to_str().unwrap()]));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    assert_eq!(mnt.parent(), Some(w.cache.as_path()));
    // Another process of the user uses the mount.
    let m = mnt.display();
    let o = Command::new("runuser")
        .args(["-u", USER, "--", "sh", "-c"])
        .arg(format!("cat {m}/f && echo s > {m}/s"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "lower\n");
    // SIGTERM to ovl-run itself (a child of runuser).
    let ovl = find_descendant(r.pid(), "ovl-run").expect("ovl-run below runuser");
    assert_eq!(unsafe { libc::kill(ovl, libc::SIGTERM) }, 0);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 1 changes in {}\n", w.upper().display())
    );
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert!(!mnt.exists(), "mount point left behind");
    assert_eq!(fs::metadata(w.upper().join("s")).unwrap().uid(), uid);

    // Ended by the user's fusermount3 -u.
    let mut r = Running::start(as_user(
        &w,
        &bin,
        &["-q", "--lower", w.lower.to_str().unwrap()],
    ));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    let o = Command::new("runuser")
        .args(["-u", USER, "--", "fusermount3", "-u"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let o = r.wait(DEADLINE);
    assert_eq!((o.code, o.stderr.as_str()), (0, ""), "{o:?}");
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert!(!mnt.exists(), "mount point left behind");
}
