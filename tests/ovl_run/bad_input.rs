//! Bad input: exit 125, one line naming the path, nothing changed on disk.

use super::*;

/// Runs `ovl-run ARGS...`, expects 125 with a single stderr line containing `names`, and no
/// change at all below the world's root (the cache dir, and so any mount point, not created).
fn assert_bad_input(w: &World, args: &[&str], names: &str) {
    assert_bad_input_with(w, args, names, |_| {});
}

fn assert_bad_input_with(w: &World, args: &[&str], names: &str, f: impl FnOnce(&mut Command)) {
    let before = snapshot(&w.root);
    let mut c = w.ovl();
    c.args(args);
    f(&mut c);
    let o = run(c);
    assert_eq!(o.code, 125, "{args:?}: {o:?}");
    assert_eq!(o.stdout, "", "{args:?}: {o:?}");
    assert!(o.stderr.ends_with('\n'), "{args:?}: {o:?}");
    assert_eq!(o.stderr.lines().count(), 1, "{args:?}: not one line: {o:?}");
    assert!(o.stderr.starts_with("ovl-run: "), "{args:?}: {o:?}");
    assert!(
        o.stderr.contains(names),
        "{args:?}: error does not name {names}: {o:?}"
    );
    let after = snapshot(&w.root);
    assert_eq!(before, after, "{args:?}: changed the disk: {o:?}");
    assert!(!w.cache.exists(), "{args:?}: created the cache dir");
    assert_eq!(fuse_mounts_under(&w.root), Vec::<String>::new());
}

#[test]
fn bad_lower_missing() {
    let w = World::new();
    let l = w.p("missing");
    assert_bad_input(
        &w,
        &["--lower", l.to_str().unwrap(), "--", "true"],
        l.to_str().unwrap(),
    );
    assert!(!w.p("missing_upper").exists());
}

#[test]
fn bad_lower_is_a_file() {
    let w = World::new();
    let l = w.lower.join("f");
    assert_bad_input(
        &w,
        &["--lower", l.to_str().unwrap(), "--", "true"],
        l.to_str().unwrap(),
    );
    assert!(!w.lower.join("f_upper").exists());
}

#[test]
fn bad_upper_equals_lower() {
    let w = World::new();
    let l = w.lower.to_str().unwrap();
    assert_bad_input(&w, &["--lower", l, "--upper", l, "--", "true"], l);
    // The same directory through a symlink.
    let link = w.p("link");
    std::os::unix::fs::symlink(&w.lower, &link).unwrap();
    let link = link.to_str().unwrap();
    assert_bad_input(&w, &["--lower", l, "--upper", link, "--", "true"], link);
}

#[test]
fn bad_upper_inside_lower() {
    let w = World::new();
    let u = w.lower.join("u");
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--upper",
            u.to_str().unwrap(),
            "--",
            "true",
        ],
        u.to_str().unwrap(),
    );
}

#[test]
fn bad_lower_inside_upper() {
    let w = World::new();
    let sub = w.lower.join("sub");
    let u = w.lower.to_str().unwrap();
    assert_bad_input(
        &w,
        &["--lower", sub.to_str().unwrap(), "--upper", u, "--", "true"],
        u,
    );
}

#[test]
fn bad_mountpoint_inside_a_layer() {
    let w = World::new();
    let m = w.lower.join("m");
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--mountpoint",
            m.to_str().unwrap(),
            "--",
            "true",
        ],
        m.to_str().unwrap(),
    );
    // Inside the (default) upper.
    fs::create_dir(w.upper()).unwrap();
    let m = w.upper().join("m");
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--mountpoint",
            m.to_str().unwrap(),
            "--",
            "true",
        ],
        m.to_str().unwrap(),
    );
}

#[test]
fn bad_mountpoint_not_empty() {
    let w = World::new();
    let m = w.p("mnt");
    fs::create_dir(&m).unwrap();
    fs::write(m.join("x"), "x").unwrap();
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--mountpoint",
            m.to_str().unwrap(),
            "--",
            "true",
        ],
        m.to_str().unwrap(),
    );
    assert!(!w.upper().exists());
}

#[test]
fn bad_on_exit_action() {
    let w = World::new();
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--on-exit",
            "bogus",
            "--",
            "true",
        ],
        "bogus",
    );
    assert!(!w.upper().exists());
}

#[test]
fn bad_dashdash_without_command() {
    let w = World::new();
    assert_bad_input(&w, &["--lower", w.lower.to_str().unwrap(), "--"], "`--`");
    assert!(!w.upper().exists());
}

#[test]
fn bad_default_mountpoint_inside_a_layer() {
    // XDG_CACHE_HOME inside the lower: the default mount point would be inside it.
    let w = World::new();
    let cache = w.lower.join("cache");
    assert_bad_input_with(
        &w,
        &["--lower", w.lower.to_str().unwrap(), "--", "true"],
        cache.to_str().unwrap(),
        |c| {
            c.env("XDG_CACHE_HOME", &cache);
        },
    );
    assert!(!cache.exists());
    assert!(!w.upper().exists());
}

#[test]
fn bad_upper_is_a_file() {
    let w = World::new();
    let u = w.p("ufile");
    fs::write(&u, "").unwrap();
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--upper",
            u.to_str().unwrap(),
            "--",
            "true",
        ],
        u.to_str().unwrap(),
    );
}

#[test]
fn bad_mountpoint_is_a_file() {
    let w = World::new();
    let m = w.p("mfile");
    fs::write(&m, "").unwrap();
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--mountpoint",
            m.to_str().unwrap(),
            "--",
            "true",
        ],
        m.to_str().unwrap(),
    );
    assert!(!w.upper().exists());
}

#[test]
fn bad_inode_mode() {
    let w = World::new();
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--inode-mode",
            "bogus",
            "--",
            "true",
        ],
        "bogus",
    );
}

#[test]
fn bad_second_lower_missing() {
    let w = World::new();
    let l2 = w.p("missing2");
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--lower",
            l2.to_str().unwrap(),
            "--",
            "true",
        ],
        l2.to_str().unwrap(),
    );
    assert!(!w.upper().exists());
}
