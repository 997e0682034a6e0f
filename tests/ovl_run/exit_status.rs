//! Exit statuses: the command's own, 128+N after a signal, 126/127 when it cannot run, and
//! a command that never started leaves nothing on disk.

use super::*;

#[test]
fn exit_status_is_the_commands() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "true"]));
    assert_eq!((o.code, o.stderr.as_str()), (0, ""), "{o:?}");
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "exit 3"]));
    assert_eq!((o.code, o.stderr.as_str()), (3, ""), "{o:?}");
}

#[test]
fn death_by_signal_is_128_plus_n() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "kill -INT $$"]));
    assert_eq!(o.code, 130, "{o:?}");
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "kill -KILL $$"]));
    assert_eq!(o.code, 137, "{o:?}");
}

#[test]
fn command_not_found_is_127() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "ovl-no-such-command-xyz"]));
    assert_eq!(o.code, 127, "{o:?}");
    assert!(o.stderr.contains("ovl-no-such-command-xyz"), "{o:?}");
    // Nothing was left mounted or lying around.
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

#[test]
fn a_command_that_never_started_leaves_nothing_on_disk() {
    // No upper, work dir, mount point, cache dir or lock file appears: with the defaults, with
    // directories given that do not exist yet, for --root, and for every finalization.
    let w = World::new();
    let rootfs = make_rootfs(&w);
    let before = snapshot(&w.root);
    let lower = w.lower.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--lower", lower, "--", "/nonexistent"],
        vec!["--lower", lower, "--", "/etc/passwd"],
        vec![
            "--lower",
            lower,
            "--on-exit",
            "discard",
            "--",
            "/nonexistent",
        ],
        vec![
            "--lower",
            lower,
            "--on-exit",
            "commit",
            "--",
            "/nonexistent",
        ],
        vec![
            "--lower",
            lower,
            "--on-exit",
            "discard-all",
            "--",
            "/nonexistent",
        ],
        vec![
            "--lower",
            lower,
            "--upper",
            "new/deep/up",
            "--mountpoint",
            "mnt/deep",
            "--",
            "/nonexistent",
        ],
        vec!["--root", "--lower", "rootfs", "--", "/nonexistent"],
    ];
    for args in cases {
        let o = run({
            let mut c = w.ovl();
            c.args(&args);
            c
        });
        let want = if args.contains(&"/etc/passwd") {
            126
        } else {
            127
        };
        assert_eq!(o.code, want, "{args:?}: {o:?}");
        assert_eq!(o.stderr.lines().count(), 1, "{args:?}: {o:?}");
        assert_eq!(snapshot(&w.root), before, "{args:?}: left something: {o:?}");
        assert!(!w.cache.exists(), "{args:?}");
    }
    // An existing upper stays exactly as it was.
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "echo a > a"]));
    assert_eq!(o.code, 0, "{o:?}");
    let before = (snapshot(&w.root), tree(&w.upper()));
    let o = run(w.ovl_lower(&["--", "/nonexistent"]));
    assert_eq!(o.code, 127, "{o:?}");
    assert_eq!((snapshot(&w.root), tree(&w.upper())), before, "{o:?}");
    assert!(rootfs.is_dir());
}

#[test]
fn command_not_executable_is_126() {
    let w = World::new();
    let f = w.p("not-executable");
    fs::write(&f, "#!/bin/sh\necho should not run\n").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(w.ovl_lower(&["-q", "--", f.to_str().unwrap()]));
    assert_eq!((o.code, o.stdout.as_str()), (126, ""), "{o:?}");
    assert!(o.stderr.contains(f.to_str().unwrap()), "{o:?}");
}
