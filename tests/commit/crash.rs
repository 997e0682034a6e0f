//! A crash at every step (`OVL_COMMIT_CRASH_AFTER=N` for every N) and the recovery by the
//! next run: the lower old or new, the upper intact until the new lower is there.

use super::*;

mod sigkill;

const CRASH_SCRIPT: &str = r#"set -e
cd "$OVL_MOUNTPOINT"
echo new-a > a
printf more >> b
chmod 4755 b
rm c
chmod 644 same
mkdir -p n/m
echo deep > n/m/f
mv d1 d1moved
mv d2/sub subm
mkdir q
mv d1moved/d q/dd
rm -r d2
mkdir d2
echo fresh > d2/g
ln -s a sl2
rm s1
mkdir s1
echo inside > s1/f
rm s2
echo notalink > s2
ln a hl
mkfifo p2
mknod cdev c 1 3
setfattr -n user.k -v v2 xa
mkdir -m 1777 sticky
mv d3/e e2
yes 0123456789abcdef | head -c 200000 > d3/big
"#;

fn crash_lower(l: &Path) {
    let t = l.parent().unwrap();
    make_elsewhere(t);
    fs::write(l.join("a"), "alpha\n").unwrap();
    fs::write(l.join("b"), "bravo").unwrap();
    chmod(&l.join("b"), 0o600);
    fs::write(l.join("c"), "charlie\n").unwrap();
    fs::write(l.join("same"), "same\n").unwrap();
    chmod(&l.join("same"), 0o644);
    fs::write(l.join("keep"), "keep\n").unwrap();
    fs::create_dir_all(l.join("d1/d")).unwrap();
    fs::write(l.join("d1/x"), "x\n").unwrap();
    fs::write(l.join("d1/y"), "y\n").unwrap();
    fs::create_dir_all(l.join("d2/sub")).unwrap();
    fs::write(l.join("d2/sub/z"), "z\n").unwrap();
    fs::write(l.join("d2/w"), "w\n").unwrap();
    fs::create_dir(l.join("d3")).unwrap();
    chmod(&l.join("d3"), 0o750);
    fs::write(l.join("d3/e"), "").unwrap();
    fs::write(l.join("h1"), "linked\n").unwrap();
    fs::hard_link(l.join("h1"), l.join("d3/h2")).unwrap();
    symlink("../elsewhere", &l.join("s1"));
    symlink("../elsewhere/file", &l.join("s2"));
    mknod(&l.join("fifo0"), libc::S_IFIFO | 0o644, 0).unwrap();
    fs::write(l.join("xa"), "xa\n").unwrap();
    lsetxattr(&l.join("xa"), "user.k", b"v1", 0).unwrap();
}

/// A fresh test dir: `L` (the lower), `elsewhere`, `cache`.
fn crash_fixture() -> (TempDir, PathBuf) {
    let t = tempfile::Builder::new()
        .prefix("ovl-crash")
        .tempdir()
        .unwrap();
    let lower = t.path().join("L");
    fs::create_dir(&lower).unwrap();
    fs::create_dir(t.path().join("cache")).unwrap();
    crash_lower(&lower);
    (t, lower)
}

fn run_changes(t: &Path, lower: &Path, action: OverlayAction, crash: Option<u64>) -> Output {
    ovl_run(
        t,
        &[
            os("--lower"),
            lower.as_os_str(),
            os("--on-exit"),
            os(on_exit(action)),
            os("--"),
            os("sh"),
            os("-c"),
            os(CRASH_SCRIPT),
        ],
        crash,
    )
}

/// Entries of the test dir besides the expected ones (temporaries beside the lower).
fn strays(t: &Path) -> Vec<String> {
    names(t)
        .into_iter()
        .filter(|n| {
            ![
                "L",
                "L_upper",
                ".L_upper.ovl-work",
                "elsewhere",
                "cache",
                "mnt",
            ]
            .contains(&n.as_str())
        })
        .collect()
}

/// Recovery as the next run does it: ovl-run, or the library (mount + unmount).
fn recover(t: &Path, lower: &Path, library: bool) {
    if library {
        let mut ofs = OverlayFS::new(lower);
        ofs.set_upper(t.join("L_upper"))
            .set_mountpoint(t.join("mnt"));
        ofs.mount()
            .unwrap_or_else(|e| panic!("library recovery (mount): {e}"));
        unmounting(|| ofs.umount()).unwrap();
    } else {
        let out = ovl_run(
            t,
            &[os("--lower"), lower.as_os_str(), os("--"), os("true")],
            None,
        );
        assert!(
            out.status.success(),
            "recovery run failed: {}",
            stderr(&out)
        );
    }
}

fn entries_of(s: &Snap) -> usize {
    s.len().saturating_sub(1)
}

/// Per file: old or new, never anything else (directories: exist where old or new has one).
fn per_file_problems(old: &Snap, new: &Snap, cur: &Snap) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).chain(cur.keys()).collect();
    for k in keys {
        if k.starts_with(".ovl-commit-") {
            continue; // the staging directory, removed by recovery (checked after it)
        }
        let (o, n, c) = (old.get(k), new.get(k), cur.get(k));
        let ok = match c {
            Some(c) if c.kind == 'd' => {
                o.is_some_and(|o| o.kind == 'd') || n.is_some_and(|n| n.kind == 'd')
            }
            Some(c) => {
                let s = show(c, false);
                o.is_some_and(|o| show(o, false) == s) || n.is_some_and(|n| show(n, false) == s)
            }
            None => o.is_none() || n.is_none(),
        };
        if !ok {
            out.push(format!(
                "{k}: {} (old {}, new {})",
                c.map_or("absent".into(), |c| show(c, false)),
                o.map_or("absent".into(), |c| show(c, false)),
                n.map_or("absent".into(), |c| show(c, false)),
            ));
        }
    }
    out
}

/// The trees every crash is checked against.
struct CrashRef {
    action: OverlayAction,
    /// The lower before the commit.
    old: Snap,
    /// The lower after a clean commit (checked equal to a plain copy with the same changes).
    new: Snap,
    /// The upper the changes make (what must survive until the new lower is durable).
    upper: Snap,
    /// `elsewhere`, outside the lower.
    outside: Snap,
}

impl CrashRef {
    fn new(action: OverlayAction) -> CrashRef {
        let (t0, l0) = crash_fixture();
        let old = snap(&l0);
        let outside = snap(&t0.path().join("elsewhere"));
        let copy = t0.path().join("copy");
        cp_a(&l0, &copy);
        sh_in(&copy, CRASH_SCRIPT);
        let plain = snap(&copy);
        let out = ovl_run(
            t0.path(),
            &[
                os("--lower"),
                l0.as_os_str(),
                os("--"),
                os("sh"),
                os("-c"),
                os(CRASH_SCRIPT),
            ],
            None,
        );
        assert!(out.status.success(), "preserve run: {}", stderr(&out));
        let upper = snap(&t0.path().join("L_upper"));
        let (t1, l1) = crash_fixture();
        let out = run_changes(t1.path(), &l1, action, None);
        assert!(out.status.success(), "clean commit run: {}", stderr(&out));
        let new = snap(&l1);
        let d = tree_diff("clean commit", &new, "plain copy", &plain, LINKS);
        assert!(
            d.is_empty(),
            "{action:?}: clean commit differs from the plain copy:\n{d}"
        );
        CrashRef {
            action,
            old,
            new,
            upper,
            outside,
        }
    }
}

#[derive(Default)]
struct CrashTally {
    points: u64,
    old: u64,
    new: u64,
    partial: u64,
    /// Recovery finished the commit (it had begun moving directories).
    finished: u64,
    problems: Vec<String>,
}

impl CrashTally {
    fn finish(self, what: &str) {
        eprintln!(
            "{what}: {} crash points (lower afterwards: {} old, {} new, {} in between; \
             {} finished by recovery)",
            self.points, self.old, self.new, self.partial, self.finished
        );
        assert!(
            self.problems.is_empty(),
            "{what}: crash recovery problems:\n{}",
            self.problems.join("\n")
        );
    }
}

/// After a crash in `tp` (lower `L`): the lower is old or new (atomic: as a whole; in place:
/// file by file), nothing outside changed, the upper is intact unless the lower is new; then
/// recovery (the next run: ovl-run, or the library when `library`) must leave no temporaries
/// and change nothing, and committing again must give exactly the new tree.
fn check_crash(
    r: &CrashRef,
    tp: &Path,
    lower: &Path,
    label: &str,
    library: bool,
    tally: &mut CrashTally,
) {
    let atomic = r.action == OverlayAction::CommitAtomic;
    let mut pr = Problems::default();
    let cur = snap(lower);
    let upper = tp.join("L_upper");
    let is_old = same_tree(&cur, &r.old, LINKS);
    let is_new = same_tree(&cur, &r.new, LINKS);
    tally.points += 1;
    if is_old {
        tally.old += 1;
    } else if is_new {
        tally.new += 1;
    } else {
        tally.partial += 1;
    }
    if atomic {
        pr.check(is_old || is_new, || {
            format!(
                "lower is neither old nor new after the crash:\n{}",
                tree_diff("lower", &cur, "old", &r.old, LINKS)
            )
        });
    } else {
        let pf = per_file_problems(&r.old, &r.new, &cur);
        pr.check(pf.is_empty(), || {
            format!(
                "files neither old nor new after the crash:\n    {}",
                pf.join("\n    ")
            )
        });
    }
    let upper_intact = |what: &str, pr: &mut Problems| {
        let u = exists(&upper).then(|| snap(&upper));
        pr.check(
            u.as_ref().is_some_and(|u| same_tree(u, &r.upper, LINKS)),
            || match &u {
                None => format!("{what}: the upper is gone but the lower is not the new tree"),
                Some(u) => format!(
                    "{what}: the upper changed although the lower is not the new tree:\n{}",
                    tree_diff("upper", u, "expected", &r.upper, LINKS)
                ),
            },
        );
    };
    if !is_new {
        upper_intact("after the crash", &mut pr);
    }
    pr.check(
        same_tree(&snap(&tp.join("elsewhere")), &r.outside, UNTOUCHED),
        || "the crash changed files outside the lower".into(),
    );
    for s in strays(tp) {
        pr.check(s.starts_with(".L.ovl-new-"), || {
            format!("unexpected entry {s:?} beside the lower")
        });
    }
    // Recovery, as the next run does it.
    recover(tp, lower, library);
    let how = if library { "library" } else { "ovl-run" };
    let rec = snap(lower);
    let staging: Vec<&String> = rec
        .keys()
        .filter(|k| k.starts_with(".ovl-commit-"))
        .collect();
    pr.check(staging.is_empty(), || {
        format!("{how} recovery left {staging:?} in the lower")
    });
    let clean = |s: &Snap| -> Snap {
        s.iter()
            .filter(|(k, _)| !k.starts_with(".ovl-commit-"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let (rec_clean, cur_clean) = (clean(&rec), clean(&cur));
    // An in-place commit that had begun moving renamed directories is finished instead
    // (the upper's redirects no longer match the lower): then exactly the new tree, and the
    // upper gone. Anything else must be left as the crash left it.
    let upper_gone = !exists(&upper) || entries_of(&snap(&upper)) == 0;
    let finished = !atomic && !is_new && upper_gone && same_tree(&rec_clean, &r.new, LINKS);
    if finished {
        tally.finished += 1;
    }
    pr.check(finished || same_tree(&rec_clean, &cur_clean, LINKS), || {
        format!(
            "{how} recovery changed the lower:\n{}",
            tree_diff("after", &rec_clean, "before", &cur_clean, LINKS)
        )
    });
    pr.check(strays(tp).is_empty(), || {
        format!("{how} recovery left {:?} beside the lower", strays(tp))
    });
    pr.check(
        !exists(&tp.join(".L_upper.ovl-work/ovl-commit.journal")),
        || format!("{how} recovery left the journal"),
    );
    if atomic && is_new {
        let u = exists(&upper).then(|| snap(&upper));
        pr.check(u.as_ref().is_none_or(|u| entries_of(u) == 0), || {
            format!("{how} recovery kept the upper of a commit that had landed")
        });
    }
    if !is_new && !finished {
        upper_intact(&format!("after {how} recovery"), &mut pr);
    }
    // Commit again (the upper is empty if the commit had landed): exactly the new tree.
    let out = ovl_run(
        tp,
        &[
            os("--lower"),
            lower.as_os_str(),
            os("--on-exit"),
            os(on_exit(r.action)),
            os("--"),
            os("true"),
        ],
        None,
    );
    pr.check(out.status.success(), || {
        format!("commit after recovery failed: {}", stderr(&out))
    });
    let fin = snap(lower);
    pr.check(same_tree(&fin, &r.new, LINKS), || {
        format!(
            "after recovery and a new commit the lower is not the new tree:\n{}",
            tree_diff("lower", &fin, "new", &r.new, LINKS)
        )
    });
    pr.check(
        same_tree(&snap(&tp.join("elsewhere")), &r.outside, UNTOUCHED),
        || "recovery or the second commit changed files outside the lower".into(),
    );
    pr.check(strays(tp).is_empty(), || {
        format!("left beside the lower: {:?}", strays(tp))
    });
    if !pr.0.is_empty() {
        let state = if is_old {
            "old"
        } else if is_new {
            "new"
        } else {
            "in between"
        };
        tally.problems.push(format!(
            "{label} (lower {state} after the crash, {how} recovery):\n  - {}",
            pr.0.join("\n  - ")
        ));
    }
}

fn crash_test(action: OverlayAction) {
    let r = CrashRef::new(action);
    let mut tally = CrashTally::default();
    let mut n = 1;
    loop {
        assert!(n < 500, "{action:?}: still crashing after {n} steps");
        let (t, lower) = crash_fixture();
        let out = run_changes(t.path(), &lower, action, Some(n));
        if out.status.success() {
            let d = tree_diff("lower", &snap(&lower), "new", &r.new, LINKS);
            assert!(
                d.is_empty(),
                "{action:?}: uncrashed run N={n} differs:\n{d}"
            );
            break;
        }
        let aborted = out.status.signal() == Some(libc::SIGABRT) || out.status.code() == Some(134);
        assert!(
            aborted,
            "{action:?} N={n}: not a crash: {:?} {}",
            out.status,
            stderr(&out)
        );
        check_crash(
            &r,
            t.path(),
            &lower,
            &format!("N={n}"),
            n % 2 == 0,
            &mut tally,
        );
        n += 1;
    }
    let (pts, old, new) = (tally.points, tally.old, tally.new);
    tally.finish(&format!("{action:?} (OVL_COMMIT_CRASH_AFTER)"));
    assert!(
        pts > 3,
        "{action:?}: the crash hook fired at only {pts} points"
    );
    if action == OverlayAction::CommitAtomic {
        assert!(old > 0 && new > 0, "{action:?}: old {old}, new {new}");
    }
}

#[test]
fn commit_atomic_survives_a_crash_at_every_step() {
    need_root!();
    crash_test(OverlayAction::CommitAtomic);
}

#[test]
fn commit_in_place_survives_a_crash_at_every_step() {
    need_root!();
    crash_test(OverlayAction::Commit);
}

#[test]
fn commit_atomic_survives_a_crash_at_every_step_on_the_kernel_backend() {
    on_kernel(commit_atomic_survives_a_crash_at_every_step);
}

#[test]
fn commit_in_place_survives_a_crash_at_every_step_on_the_kernel_backend() {
    on_kernel(commit_in_place_survives_a_crash_at_every_step);
}
