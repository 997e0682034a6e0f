//! Commits of uppers the kernel's overlay wrote (ovl-run's kernel backend, the default where
//! the kernel allows it). What the kernel adds to an upper is layer structure, never content:
//! its origin file handles, impure and uuid marks, redirects and opaque markers (`trusted.*`
//! as root, `user.overlay.*` for a normal user) never land in the lower. And a lower hard
//! link the kernel broke on copy-up (it indexes none: `index=off`) commits as the run saw it.
//!
//! Skipped, saying so, where the kernel's overlay cannot serve ovl-run here.

use super::*;

/// Copy-ups (origin, a parent marked impure), a lower directory renamed (a redirect as root;
/// a copy for a normal user), an opaque directory, a whiteout, a user xattr.
const SCRIPT: &str = "set -e
cd \"$OVL_MOUNTPOINT\"
echo changed > a
chmod 600 d/x
mv d moved
rm -r o
mkdir o
echo new > o/n
rm gone
setfattr -n user.k -v v a
";

fn kernel_lower(l: &Path) {
    fs::create_dir_all(l.join("d/sub")).unwrap();
    fs::create_dir_all(l.join("o")).unwrap();
    fs::write(l.join("a"), "a\n").unwrap();
    fs::write(l.join("gone"), "gone\n").unwrap();
    fs::write(l.join("d/x"), "x\n").unwrap();
    fs::write(l.join("d/sub/y"), "y\n").unwrap();
    fs::write(l.join("o/old"), "old\n").unwrap();
}

/// The overlay's own xattrs on entries of `upper`, as `path: name`.
fn overlay_xattrs(upper: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for (p, e) in snap(upper) {
        for k in e.xattrs.keys() {
            if k.starts_with("trusted.overlay.") || k.starts_with("user.overlay.") {
                out.push(format!("{p}: {k}"));
            }
        }
    }
    out
}

fn kernel_or_skip(user: bool) -> bool {
    let b = if user {
        common::backend::kernel_for_user()
    } else {
        common::backend::kernel_for_root()
    };
    if b != "kernel" {
        eprintln!("skipping: the kernel's overlay cannot serve ovl-run here");
    }
    b == "kernel"
}

#[test]
fn a_kernel_written_upper_commits_without_overlay_xattrs() {
    need_root!();
    if !kernel_or_skip(false) {
        return;
    }
    on_kernel(|| {
        for action in MODES {
            let t = tempfile::Builder::new().prefix("ovl-ck").tempdir().unwrap();
            let lower = t.path().join("L");
            fs::create_dir(&lower).unwrap();
            kernel_lower(&lower);
            let copy = t.path().join("copy");
            cp_a(&lower, &copy);
            sh_in(&copy, SCRIPT);
            let o = ovl_run(
                t.path(),
                &[
                    os("-v"),
                    os("--lower"),
                    lower.as_os_str(),
                    os("--"),
                    os("sh"),
                    os("-c"),
                    os(SCRIPT),
                ],
                None,
            );
            assert!(o.status.success(), "{action:?}: {}", stderr(&o));
            assert!(stderr(&o).contains("backend: kernel"), "{}", stderr(&o));
            // What the kernel wrote (so the check below is not vacuous).
            let upper = t.path().join("L_upper");
            let x = overlay_xattrs(&upper);
            for want in [
                "a: trusted.overlay.origin",
                "moved: trusted.overlay.redirect",
                "o: trusted.overlay.opaque",
                ".: trusted.overlay.impure",
            ] {
                assert!(x.iter().any(|e| e == want), "{action:?}: no {want}: {x:?}");
            }
            let o = ovl_run(
                t.path(),
                &[
                    os("--lower"),
                    lower.as_os_str(),
                    os("--on-exit"),
                    os(on_exit(action)),
                    os("--"),
                    os("true"),
                ],
                None,
            );
            assert!(o.status.success(), "{action:?}: {}", stderr(&o));
            let got = snap(&lower);
            let l = leaks(&got);
            assert!(l.is_empty(), "{action:?}: overlay internals leaked: {l:?}");
            assert_tree(&format!("{action:?}"), &lower, &snap(&copy), EXACT);
            assert!(!exists(&upper));
        }
    });
}

/// As a normal user (`userxattr`: the kernel's marks are `user.overlay.*`, which a user's
/// lower may otherwise hold as ordinary xattrs): committed, none of them is in the lower.
#[test]
fn a_normal_users_kernel_written_upper_commits_without_overlay_xattrs() {
    need_root!();
    if !kernel_or_skip(true) {
        return;
    }
    let (uid, gid) = ensure_test_user();
    for action in MODES {
        let t = tempfile::Builder::new()
            .prefix("ovl-cku")
            .tempdir()
            .unwrap();
        let r = t.path();
        chmod(r, 0o755);
        let lower = r.join("L");
        fs::create_dir(&lower).unwrap();
        kernel_lower(&lower);
        fs::create_dir(r.join("cache")).unwrap();
        fs::copy(OVL_RUN, r.join("ovl-run")).unwrap();
        run(Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(r));
        let copy = r.join("copy");
        cp_a(&lower, &copy);
        let as_user = |args: &[&OsStr]| {
            output(
                Command::new("runuser")
                    .current_dir(r)
                    .args(["-u", TEST_USER, "--", "env"])
                    .arg(format!("XDG_CACHE_HOME={}", r.join("cache").display()))
                    .arg(format!("OVL_MOUNTPOINT={}", copy.display()))
                    .args(args),
            )
        };
        let o = as_user(&[os("sh"), os("-c"), os(SCRIPT)]);
        assert!(o.status.success(), "the script on the copy: {}", stderr(&o));
        let ovl = r.join("ovl-run");
        let o = as_user(&[
            ovl.as_os_str(),
            os("-v"),
            os("--backend"),
            os("kernel"),
            os("--lower"),
            lower.as_os_str(),
            os("--"),
            os("sh"),
            os("-c"),
            os(SCRIPT),
        ]);
        assert!(o.status.success(), "{action:?}: {}", stderr(&o));
        let upper = r.join("L_upper");
        let x = overlay_xattrs(&upper);
        assert!(
            x.iter().any(|e| e == "o: user.overlay.opaque"),
            "{action:?}: {x:?}"
        );
        let o = as_user(&[
            ovl.as_os_str(),
            os("--backend"),
            os("kernel"),
            os("--lower"),
            lower.as_os_str(),
            os("--on-exit"),
            os(on_exit(action)),
            os("--"),
            os("true"),
        ]);
        assert!(o.status.success(), "{action:?}: {}", stderr(&o));
        let l = leaks(&snap(&lower));
        assert!(l.is_empty(), "{action:?}: overlay internals leaked: {l:?}");
        assert_tree(&format!("{action:?}"), &lower, &snap(&copy), EXACT);
        assert!(!exists(&upper));
    }
}

/// A lower file with two names (`h1`, `d/h2`), one of them given new times (a copy-up with
/// unchanged content), or replaced by an equal new file. The other name keeps its times, as
/// the run showed it: on the kernel's overlay, which breaks the link on copy-up, and for the
/// replaced file on both backends. (On the FUSE engine a touched name is still one file with
/// the other, which shows the new times too.) Equal content must not make the commit set the
/// times on the shared lower inode.
#[test]
fn new_times_on_one_name_of_a_lower_hard_link_commit_as_the_run_saw_them() {
    need_root!();
    const NEW: i64 = 1_500_000_000;
    let cases = [
        ("touch", "touch -d @1500000000 h1"),
        (
            "replace",
            "rm h1 && printf linked > h1 && chmod 644 h1 && touch -d @1500000000 h1",
        ),
    ];
    for kernel in [false, true] {
        if kernel && !kernel_or_skip(false) {
            continue;
        }
        for (case, script) in cases {
            for action in MODES {
                let what = format!("{case}, {action:?}, kernel {kernel}");
                let t = tempfile::Builder::new().prefix("ovl-hl").tempdir().unwrap();
                let lower = t.path().join("L");
                fs::create_dir_all(lower.join("d")).unwrap();
                fs::write(lower.join("h1"), "linked").unwrap();
                chmod(&lower.join("h1"), 0o644);
                fs::hard_link(lower.join("h1"), lower.join("d/h2")).unwrap();
                set_times(&lower.join("h1"), Some(OLD), Some(OLD)).unwrap();
                let go = || {
                    ovl_run(
                        t.path(),
                        &[
                            os("--lower"),
                            lower.as_os_str(),
                            os("--on-exit"),
                            os(on_exit(action)),
                            os("--"),
                            os("sh"),
                            os("-c"),
                            os(&format!(
                                "cd \"$OVL_MOUNTPOINT\" && {script} && stat -c %Y d/h2"
                            )),
                        ],
                        None,
                    )
                };
                let o = if kernel { on_kernel(go) } else { go() };
                assert!(o.status.success(), "{what}: {}", stderr(&o));
                let seen: i64 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
                let want_h2 = if !kernel && case == "touch" {
                    NEW
                } else {
                    OLD.0
                };
                assert_eq!(seen, want_h2, "{what}: d/h2 as the run saw it");
                let mtime = |p: &str| fs::symlink_metadata(lower.join(p)).unwrap().mtime();
                assert_eq!(
                    (mtime("h1"), mtime("d/h2")),
                    (NEW, want_h2),
                    "{what}: committed times of h1, d/h2"
                );
                assert_eq!(fs::read_to_string(lower.join("d/h2")).unwrap(), "linked");
            }
        }
    }
}
