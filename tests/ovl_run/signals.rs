//! Signals and the subreaper: forwarding, waiting for what the command left behind, SIGKILL of
//! ovl-run ending everything with no dead mount and nothing finalized.

use super::*;

#[test]
fn sigterm_is_forwarded_to_the_command() {
    let w = World::new();
    let mut r = Running::start(w.ovl_lower(&[
        "-q",
        "--",
        "sh",
        "-c",
        "trap \"echo got >$OVL_MOUNTPOINT/term; exit 7\" TERM; echo ready; \
         while :; do sleep 0.05; done",
    ]));
    assert_eq!(r.next_line(DEADLINE), "ready");
    r.signal(libc::SIGTERM);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 7, "{o:?}");
    assert_eq!(read(w.upper().join("term")), "got\n");
}

#[test]
fn other_signals_are_forwarded_too() {
    let w = World::new();
    let mut r = Running::start(w.ovl_lower(&[
        "-q",
        "--",
        "sh",
        "-c",
        "trap 'echo usr1' USR1; trap 'echo usr2' USR2; trap 'echo int; exit 9' INT; \
         echo ready; while :; do sleep 0.05; done",
    ]));
    assert_eq!(r.next_line(DEADLINE), "ready");
    r.signal(libc::SIGUSR1);
    assert_eq!(r.next_line(DEADLINE), "usr1");
    r.signal(libc::SIGUSR2);
    assert_eq!(r.next_line(DEADLINE), "usr2");
    // A SIGINT sent with kill(2) (not typed at a terminal) is passed on as well.
    r.signal(libc::SIGINT);
    assert_eq!(r.next_line(DEADLINE), "int");
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 9, "{o:?}");
}

#[test]
fn sigterm_right_after_the_command_starts_is_not_lost() {
    // The command has started (it printed "ready") when the signal is sent, so it must get
    // it, however soon. Repeated to catch a race between starting and forwarding.
    let w = World::new();
    for round in 0..30 {
        let mut r = Running::start(w.ovl_lower(&[
            "-q",
            "--",
            "sh",
            "-c",
            "trap 'exit 7' TERM; echo ready; while :; do sleep 0.05; done",
        ]));
        assert_eq!(r.next_line(DEADLINE), "ready");
        r.signal(libc::SIGTERM);
        let start = Instant::now();
        while r.child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(3) {
                r.kill();
                panic!("round {round}: SIGTERM sent after the command started was lost");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let o = r.wait(DEADLINE);
        assert_eq!(o.code, 7, "round {round}: {o:?}");
    }
}

#[test]
fn waits_for_processes_the_command_left_behind() {
    let w = World::new();
    let start = Instant::now();
    let o = run(w.ovl_lower(&[
        "-q",
        "--",
        "sh",
        "-c",
        "(sleep 0.5; echo late > $OVL_MOUNTPOINT/bg) & exit 0",
    ]));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert_eq!(read(w.upper().join("bg")), "late\n");
    assert_eq!(w.mount_dirs(), Vec::<String>::new());

    // A daemon in its own session, reparented to ovl-run (the subreaper).
    let o = run(w.ovl_lower(&[
        "-q",
        "--",
        "sh",
        "-c",
        "setsid sh -c 'sleep 0.3; echo daemon > $OVL_MOUNTPOINT/d' & exit 4",
    ]));
    assert_eq!(o.code, 4, "{o:?}");
    assert_eq!(read(w.upper().join("d")), "daemon\n");
}

#[test]
fn command_exiting_125_is_still_finalized() {
    // 125 is also ovl-run's own failure status, but a command may exit 125 itself: its
    // changes must still be finalized (and reported) like after any other status.
    let w = World::new();
    let o = run(w.ovl_lower(&[
        "--on-exit",
        "discard",
        "--",
        "sh",
        "-c",
        "echo x > x; exit 125",
    ]));
    assert_eq!(o.code, 125, "{o:?}");
    assert_eq!(o.stderr, "ovl-run: discarded 1 changes\n");
    assert!(!w.upper().exists(), "upper left after discard");
    assert!(!w.work().exists(), "work dir left after discard");
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

/// Starts `cmd` (an ovl-run whose command writes `x`, starts two background sleeps and prints
/// `ready`), SIGKILLs the ovl-run process (`name`d `ovl-run`, maybe below a runuser) and
/// checks that the command and everything it started end within a second.
fn sigkill_ends_everything(cmd: Command) {
    let mut r = Running::start(cmd);
    assert_eq!(r.next_line(DEADLINE), "ready");
    let top = r.pid();
    let ovl = if comm(top) == "ovl-run" {
        top
    } else {
        find_descendant(top, "ovl-run").expect("ovl-run")
    };
    let procs = wait_for("the sleeps", DEADLINE, || {
        let d = descendants(ovl);
        (d.iter().filter(|&&p| comm(p) == "sleep").count() == 2).then_some(d)
    });
    unsafe { libc::kill(ovl, libc::SIGKILL) };
    let o = r.wait(DEADLINE);
    assert!(o.code == 137 || top != ovl, "{o:?}");
    let t = Instant::now();
    wait_for(
        "the command's processes to end",
        Duration::from_secs(1),
        || procs.iter().all(|&p| is_gone(p)).then_some(()),
    );
    eprintln!("all ended {:?} after the SIGKILL", t.elapsed());
}

#[test]
fn sigkill_of_ovl_run_ends_everything_the_command_started() {
    let script = "echo x > x; sleep 100 & sleep 100 & echo ready; wait";
    // A plain command, committing: nothing is committed, the upper is kept for the next run.
    let w = World::new();
    sigkill_ends_everything(w.ovl_lower(&["-q", "--on-exit", "commit", "--", "sh", "-c", script]));
    assert!(!w.lower.join("x").exists(), "committed after SIGKILL");
    assert_eq!(read(w.upper().join("x")), "x\n");
    let o = run(w.ovl_lower(&["-q", "--", "cat", "x"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "x\n"), "{o:?}");
    assert_eq!(fuse_mounts_under(&w.root), Vec::<String>::new());

    // A --root session (its own PID namespace), discarding everything: nothing discarded.
    let w = World::new();
    let rootfs = make_rootfs(&w);
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep")).unwrap();
    let mut c = w.ovl();
    c.args(["-q", "--on-exit", "discard-all", "--root", "--lower"])
        .arg(&rootfs)
        .args(["--", "/bin/sh", "-c", script]);
    sigkill_ends_everything(c);
    assert_eq!(read(w.p("rootfs_upper/x")), "x\n");

    // A normal user (a user namespace) with a plain command.
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let lower = w.lower.to_str().unwrap().to_string();
    sigkill_ends_everything(as_user(
        &w,
        &bin,
        &["-q", "--lower", &lower, "--", "sh", "-c", script],
    ));
    assert_eq!(read(w.upper().join("x")), "x\n");

    // A normal user's --root session with a process switched to another uid (the kernel ends
    // the PID namespace; a signal from the caller could not reach that process).
    let w = World::new();
    let (bin, uid, gid) = user_world(&w);
    let sub = ensure_subids();
    let rootfs = dpkg_rootfs(&w, uid, gid, Some(sub), 0);
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep")).unwrap();
    sigkill_ends_everything(as_user(
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
            "echo x > x; /usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups sleep 100 & \
             sleep 100 & echo ready; wait",
        ],
    ));
}

#[test]
fn sigkill_leaves_no_dead_mount_and_the_next_run_cleans_up() {
    let w = World::new();
    let r = Running::start(w.ovl_lower(&["-q", "--", "sleep", "30"]));
    let pid = r.pid();
    let sleep = wait_for("the command to start", DEADLINE, || {
        find_descendant(pid, "sleep")
    });
    let dirs = w.mount_dirs();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert!(
        dirs[0].starts_with(&format!("mount_lower_{pid}_")),
        "{dirs:?}"
    );
    r.signal(libc::SIGKILL);
    unsafe { libc::kill(sleep, libc::SIGKILL) };
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 137);
    wait_for("the command to die", DEADLINE, || {
        is_gone(sleep).then_some(())
    });
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    // The directory is left over (nobody could remove it)...
    assert_eq!(w.mount_dirs(), dirs);
    // ... and the next run removes it.
    let o = run(w.ovl_lower(&["-q", "--", "true"]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
}

#[test]
fn a_dead_mount_left_by_someone_else_is_detached_and_removed() {
    // A `mount_*` directory of a process that is gone, with a dead FUSE mount on it
    // (ENOTCONN): a FUSE server SIGKILLed without auto_unmount (ovl-mount -f, as root).
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let stale = w.cache.join(format!("mount_lower_{dead}_1"));
    fs::create_dir_all(&stale).unwrap();
    for d in ["u2", "w2"] {
        fs::create_dir(w.p(d)).unwrap();
    }
    let mut c = Command::new(env!("CARGO_BIN_EXE_ovl-mount"));
    c.arg("-f")
        .arg("-o")
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            w.lower.display(),
            w.p("u2").display(),
            w.p("w2").display()
        ))
        .arg(&stale);
    let server = Running::start(c);
    wait_for("ovl-mount to mount", DEADLINE, || {
        (!fuse_mounts_under(&stale).is_empty()).then_some(())
    });
    server.signal(libc::SIGKILL);
    assert_eq!(server.wait(DEADLINE).code, 137);
    let e = fs::metadata(&stale).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "not a dead mount");

    let o = run(w.ovl_lower(&["-q", "--", "true"]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}
