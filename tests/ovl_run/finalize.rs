//! Defaults (upper beside the lower, mount point removed, the report) and the finalizations:
//! preserve, discard (never touching a kept upper, also when killed), discard-all.

use super::*;

#[test]
fn defaults_upper_beside_lower_mountpoint_removed_and_report() {
    let w = World::new();
    assert!(!w.upper().exists());
    let o = run(w.ovl_lower(&["--", "sh", "-c", "echo new > new; cat f"]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, "lower\n");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 1 changes in {}\n", w.upper().display())
    );
    assert!(w.upper().is_dir());
    assert!(w.work().is_dir());
    assert_eq!(read(w.upper().join("new")), "new\n");
    assert!(!w.lower.join("new").exists());
    // The mount point is gone, and nothing is mounted.
    assert!(w.cache.is_dir());
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
    assert_eq!(fuse_mounts_under(&w.root), Vec::<String>::new());

    // -q: no report.
    let o = run(w.ovl_lower(&["-q", "--", "true"]));
    assert_eq!((o.code, o.stderr.as_str()), (0, ""), "{o:?}");

    // --keep-mountpoint: the (empty, unmounted) directory stays.
    let r = Running::start(w.ovl_lower(&["-q", "--keep-mountpoint", "--", "true"]));
    let pid = r.pid();
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 0, "{o:?}");
    let dirs = w.mount_dirs();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert!(
        dirs[0].starts_with(&format!("mount_lower_{pid}_")),
        "{dirs:?}"
    );
    let kept = w.cache.join(&dirs[0]);
    assert!(kept.is_dir());
    assert_eq!(fs::read_dir(&kept).unwrap().count(), 0);
    assert_eq!(fuse_mounts_under(&w.root), Vec::<String>::new());
}

#[test]
fn preserve_keeps_changes_for_the_next_run_and_discard_drops_only_its_own() {
    let w = World::new();
    // Run 1: a new file and a deletion, preserved (the default, and explicitly).
    let o = run(w.ovl_lower(&[
        "--on-exit",
        "preserve",
        "--",
        "sh",
        "-c",
        "echo a > a; rm f",
    ]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 2 changes in {}\n", w.upper().display())
    );
    assert!(w.upper().is_dir() && w.work().is_dir());
    assert_eq!(read(w.upper().join("a")), "a\n");
    assert_eq!(read(w.lower.join("f")), "lower\n");
    let kept = tree(&w.upper());

    // A run that changes nothing reports 0 changes, not the upper's.
    let o = run(w.ovl_lower(&["--", "cat", "a"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\n"), "{o:?}");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 0 changes in {}\n", w.upper().display())
    );
    assert_eq!(tree(&w.upper()), kept);

    // Run 2 sees them, changes and deletes things, and discards what it did: only that.
    let o = run(w.ovl_lower(&[
        "--on-exit",
        "discard",
        "--",
        "sh",
        "-c",
        "cat a; test -e f && echo f-exists; echo b > b; rm a; echo lower2 > sub/g",
    ]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\n"), "{o:?}");
    assert_eq!(
        o.stderr,
        format!(
            "ovl-run: discarded 4 changes of this run; {} is as it was\n",
            w.upper().display()
        )
    );
    assert_eq!(tree(&w.upper()), kept, "the kept upper was changed");

    // Run 3: the preserved state, not the discarded one; this run's change is counted.
    let o = run(w.ovl_lower(&["--", "sh", "-c", "cat a sub/g; ls; touch a"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\ng\na\nsub\n"), "{o:?}");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 1 changes in {}\n", w.upper().display())
    );

    // A discard run with no upper yet leaves none behind.
    let w2 = World::new();
    let o = run(w2.ovl_lower(&["--on-exit", "discard", "--", "sh", "-c", "echo x > x"]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stderr, "ovl-run: discarded 1 changes\n");
    assert!(!w2.upper().exists() && !w2.work().exists());
    assert_eq!(names(&w2.root), set(&["cache", "lower"]));
}

#[test]
fn discard_all_drops_the_kept_upper_and_says_so() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "echo a > a; rm f"]));
    assert_eq!(o.code, 0, "{o:?}");
    let o = run(w.ovl_lower(&[
        "--on-exit",
        "discard-all",
        "--",
        "sh",
        "-c",
        "cat a; echo b > b",
    ]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\n"), "{o:?}");
    assert_eq!(
        o.stderr,
        format!(
            "ovl-run: discarded everything in {} (3 entries, 1 changes of this run) and its \
             work dir {}\n",
            w.upper().display(),
            w.work().display()
        )
    );
    assert!(!w.upper().exists(), "upper left after discard-all");
    assert!(!w.work().exists(), "work dir left after discard-all");
    assert_eq!(names(&w.root), set(&["cache", "lower"]));
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "cat f; ls"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "lower\nf\nsub\n"), "{o:?}");
}

#[test]
fn sigkill_of_a_discard_run_keeps_the_preserved_state() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "echo a > a; rm f; mkdir d"]));
    assert_eq!(o.code, 0, "{o:?}");
    let kept = tree(&w.upper());
    let work = tree(&w.work());
    // The discard run writes, deletes and renames over the kept state, then is killed.
    let mut r = Running::start(w.ovl_lower(&[
        "-q",
        "--on-exit",
        "discard",
        "--",
        "sh",
        "-c",
        "echo b > b; rm a; rmdir d; mv sub sub2; echo ready; exec sleep 30",
    ]));
    assert_eq!(r.next_line(DEADLINE), "ready");
    let scratch: Vec<String> = names(&w.root)
        .into_iter()
        .filter(|n| n.starts_with(".lower_upper.ovl-scratch-"))
        .collect();
    assert_eq!(scratch.len(), 2, "a scratch dir and its lock: {scratch:?}");
    r.signal(libc::SIGKILL);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 137, "{o:?}");
    assert_eq!(tree(&w.upper()), kept, "the kept upper was changed");
    assert_eq!(tree(&w.work()), work, "the kept work dir was changed");
    // The next run sees the preserved state and removes the dead run's scratch dir.
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "cat a; ls"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\na\nd\nsub\n"), "{o:?}");
    assert_eq!(
        names(&w.root),
        set(&["cache", "lower", "lower_upper", ".lower_upper.ovl-work"])
    );
}

#[test]
fn non_root_user_discard_keeps_the_preserved_state() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let o = user_sh(&w, &bin, &["-q"], "echo a > a; rm f");
    assert_eq!(o.code, 0, "{o:?}");
    let kept = tree(&w.upper());
    let o = user_sh(
        &w,
        &bin,
        &["--on-exit", "discard"],
        "cat a; rm a; echo b > b",
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\n"), "{o:?}");
    assert_eq!(
        o.stderr,
        format!(
            "ovl-run: discarded 2 changes of this run; {} is as it was\n",
            w.upper().display()
        )
    );
    assert_eq!(tree(&w.upper()), kept);
    let o = user_sh(&w, &bin, &["-q"], "ls");
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\nsub\n"), "{o:?}");
}

#[test]
fn a_discard_run_and_a_writer_exclude_each_other() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "echo a > a"]));
    assert_eq!(o.code, 0, "{o:?}");
    let mut r = Running::start(w.ovl_lower(&[
        "-q",
        "--on-exit",
        "discard",
        "--",
        "sh",
        "-c",
        "echo ready; exec sleep 30",
    ]));
    assert_eq!(r.next_line(DEADLINE), "ready");
    // Another discard run shares the upper; a writer is refused, naming it.
    let o = run(w.ovl_lower(&["-q", "--on-exit", "discard", "--", "cat", "a"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\n"), "{o:?}");
    let o = run(w.ovl_lower(&["--", "sh", "-c", "echo b > b"]));
    assert_eq!(o.code, 125, "{o:?}");
    assert_eq!(
        o.stderr,
        format!(
            "ovl-run: {}: another ovl-run is using this upper; wait for it to finish, or give \
             this run another --upper DIR or --on-exit discard\n",
            w.upper().display()
        )
    );
    assert!(!w.upper().join("b").exists());
    r.signal(libc::SIGTERM);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 143, "{o:?}");
}

#[test]
fn quiet_means_nothing_on_stderr_even_with_files_open_at_exit() {
    // The command exits holding many open files: the kernel sends their RELEASEs
    // asynchronously, racing with ovl-run's unmount. -q must still print nothing.
    let w = World::new();
    for i in 0..50 {
        fs::write(w.lower.join(format!("m{i}")), "m").unwrap();
    }
    let script = "for i in $(seq 1 900); do exec {fd}<m$((i % 50)); done; exit 0";
    for round in 0..10 {
        let o = run(w.ovl_lower(&["-q", "--", "bash", "-c", script]));
        assert_eq!((o.code, o.stderr.as_str()), (0, ""), "round {round}: {o:?}");
    }
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

#[test]
fn two_lowers_topmost_first() {
    let w = World::new();
    let l2 = w.p("lower2");
    fs::create_dir(&l2).unwrap();
    fs::write(l2.join("f"), "hidden\n").unwrap();
    fs::write(l2.join("only2"), "two\n").unwrap();
    let o = run(w.ovl_lower(&[
        "-q",
        "--lower",
        l2.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "cat f only2; echo \"$OVL_LOWER\"",
    ]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        o.stdout,
        format!("lower\ntwo\n{}:{}\n", w.lower.display(), l2.display())
    );
    // The default upper is beside the first lower.
    assert!(w.upper().is_dir());
    assert!(!w.p("lower2_upper").exists());
}
