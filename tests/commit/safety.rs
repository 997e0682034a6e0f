//! Safety: no symlink is followed out of the lower, nothing outside it changes, temporary
//! names never clash with (or delete) the user's entries.

use super::*;

fn safety_lower(l: &Path, t: &Path) {
    let e = make_elsewhere(t);
    // Symlinks out of the lower, absolute and relative.
    symlink(&e, &l.join("link"));
    symlink(e.join("file"), &l.join("lfile"));
    symlink("../elsewhere/dir", &l.join("rel"));
    symlink(e.join("dir2"), &l.join("wh"));
    symlink(e.join("dir"), &l.join("keep_link"));
    fs::create_dir(l.join("realdir")).unwrap();
    fs::write(l.join("realdir/f"), "real\n").unwrap();
    fs::create_dir(l.join("opq")).unwrap();
    symlink(&e, &l.join("opq/esc"));
    fs::write(l.join("opq/f"), "f\n").unwrap();
    // A lower file that shares its inode with a file outside the lower.
    fs::hard_link(e.join("linked"), l.join("hl_out")).unwrap();
    set_times(&e.join("linked"), Some(OLD), Some(OLD)).unwrap();
}

const SAFETY_SCRIPT: &str = r#"
rm link && mkdir link && echo inside > link/f && mkdir link/sub && echo g > link/sub/g
chmod 700 link
rm lfile && mkdir lfile && echo in > lfile/x
rm rel && echo plain > rel
rm wh
rm -r realdir && ln -s ../elsewhere/dir realdir
rm -r opq && mkdir opq && echo new > opq/new
ln -s ../elsewhere up
echo appended >> hl_out
chmod 600 hl_out
"#;

fn safety_case(action: OverlayAction) {
    let mut fx = Fx::new(safety_lower);
    let outside = fx.t("elsewhere");
    let before = snap(&outside);
    let copy = fx.t("copy");
    cp_a(&fx.lower, &copy);
    // (`cp -a` copies hl_out as a file of its own: the outside link is not in the copy.)
    sh_in(&copy, SAFETY_SCRIPT);
    let mid = snap(&outside);
    assert!(
        same_tree(&before, &mid, UNTOUCHED),
        "test bug: the plain run changed the outside"
    );
    fx.sh(SAFETY_SCRIPT);
    let r = fx.finish(action);
    let after = snap(&outside);
    let d = tree_diff("after", &after, "before", &before, UNTOUCHED);
    assert!(
        d.is_empty(),
        "{action:?}: commit changed files OUTSIDE the lower:\n{d}"
    );
    r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
    let got = snap(&fx.lower);
    let expected = snap(&copy);
    let d = tree_diff("lower", &got, "expected", &expected, LINKS);
    assert!(d.is_empty(), "{action:?}: lower differs:\n{d}");
    assert_eq!(
        got["link"].kind, 'd',
        "{action:?}: link must be a real directory"
    );
    assert_eq!(got["link"].mode, 0o700);
    assert_eq!(got["lfile"].kind, 'd');
    // The test directory holds nothing new beside the layers.
    let mut top = names(fx.dir.path());
    top.retain(|n| !["lower", "mnt", "copy", "elsewhere"].contains(&n.as_str()));
    assert!(top.is_empty(), "{action:?}: left in the test dir: {top:?}");
}

#[test]
fn commit_never_follows_symlinks_out_of_the_lower() {
    need_root!();
    safety_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_never_follows_symlinks_out_of_the_lower() {
    need_root!();
    safety_case(OverlayAction::CommitAtomic);
}

// ---------------------------------------------------------------------------------------------
// Temporary names never clash with the user's entries

const USER_BESIDE: &[&str] = &[
    "lower.backup",
    "lower.new",
    ".lower.new",
    "lower.old",
    ".lower.old",
    "lower.tmp",
    ".lower.ovl-new",
    ".lower.ovl-new-0000000000000000",
    "lower_upper",
];
const USER_INSIDE: &[&str] = &[
    ".ovl-commit",
    ".ovl-commit-0000000000000000",
    ".ovl-staging-",
    "ovl-commit.journal",
    "t1",
    ".new",
    ".backup",
];

#[test]
fn temporary_names_never_clash_with_user_entries() {
    need_root!();
    for action in MODES {
        let (fx, r, expected) = scenario(
            |l, t| {
                for n in USER_BESIDE {
                    fs::create_dir(t.join(n)).unwrap();
                    fs::write(t.join(n).join("data"), format!("user {n}\n")).unwrap();
                }
                for n in USER_INSIDE {
                    fs::create_dir(l.join(n)).unwrap();
                    fs::write(l.join(n).join("data"), format!("user {n}\n")).unwrap();
                }
                fs::create_dir(l.join("sub")).unwrap();
                fs::write(l.join("sub/t1"), "t1\n").unwrap();
            },
            "echo 2 > t2\necho changed > sub/t1\necho x > .ovl-commit/data\n\
             mkdir .ovl-commit-new && echo y > .ovl-commit-new/f\nrm -r .new\n",
            action,
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
        for n in USER_BESIDE {
            assert_eq!(
                fs::read_to_string(fx.t(n).join("data")).ok(),
                Some(format!("user {n}\n")),
                "{action:?}: user directory {n} beside the lower"
            );
        }
        let mut top = names(fx.dir.path());
        top.retain(|n| {
            !["lower", "mnt", "copy"].contains(&n.as_str()) && !USER_BESIDE.contains(&n.as_str())
        });
        assert!(
            top.is_empty(),
            "{action:?}: temporaries left beside the lower: {top:?}"
        );
    }
}

/// Journal and temporary paths are derived from the lower's path; a lower whose name holds a
/// newline (legal on Linux) must not make recovery delete a sibling directory.
#[test]
fn recovery_never_deletes_outside_the_lower_whatever_its_name() {
    need_root!();
    let mut pr = Problems::default();
    for (action, crash) in [(OverlayAction::Commit, 1), (OverlayAction::CommitAtomic, 1)] {
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("data\nx");
        fs::create_dir(&lower).unwrap();
        fs::write(lower.join("f"), "f\n").unwrap();
        for sib in ["data", ".data"] {
            fs::create_dir(t.path().join(sib)).unwrap();
            fs::write(t.path().join(sib).join("precious"), "precious\n").unwrap();
        }
        let before = snap(t.path());
        let out = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--on-exit"),
                os(on_exit(action)),
                os("--"),
                os("sh"),
                os("-c"),
                os("echo new > \"$OVL_MOUNTPOINT/g\""),
            ],
            Some(crash),
        );
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{out:?}");
        let rec = ovl_run(
            t.path(),
            &[os("--lower"), lower.as_os_str(), os("--"), os("true")],
            None,
        );
        let commit = ovl_run(
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
        for sib in ["data", ".data"] {
            let p = t.path().join(sib);
            pr.check(
                before.contains_key(&format!("{sib}/precious")) && exists(&p.join("precious")),
                || {
                    format!(
                        "{action:?}: recovery deleted the sibling directory {sib:?} of lower \"data\\nx\" \
                         (recovery: {}; commit: {})",
                        stderr(&rec).trim(),
                        stderr(&commit).trim()
                    )
                },
            );
        }
        pr.check(
            fs::read_to_string(lower.join("g")).ok().as_deref() == Some("new\n"),
            || {
                format!(
                    "{action:?}: commit after recovery did not land: {}",
                    stderr(&commit)
                )
            },
        );
    }
    pr.assert_none("lower named \"data\\nx\"");
}

#[test]
fn recovery_never_deletes_outside_the_lower_whatever_its_name_on_the_kernel_backend() {
    on_kernel(recovery_never_deletes_outside_the_lower_whatever_its_name);
}
