//! SIGKILL at any instant: injected by strace at sampled syscalls of the commit, and while
//! the upper is removed.

use super::*;

fn have_strace() -> bool {
    let _g = FORK.read().unwrap_or_else(|e| e.into_inner());
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

macro_rules! need_strace {
    () => {
        if !have_strace() {
            eprintln!("skipping: needs strace (apt-get install strace) to inject SIGKILL");
            return;
        }
    };
}

/// A crash fixture whose upper already holds the changes (a preserve run): committing it is
/// `ovl-run --lower L --on-exit ACTION -- true`, the same syscalls every time.
fn preserved_fixture() -> (TempDir, PathBuf) {
    let (t, lower) = crash_fixture();
    let out = ovl_run(
        t.path(),
        &[
            os("--lower"),
            lower.as_os_str(),
            os("--"),
            os("sh"),
            os("-c"),
            os(CRASH_SCRIPT),
        ],
        None,
    );
    assert!(out.status.success(), "preserve run: {}", stderr(&out));
    (t, lower)
}

fn commit_true(lower: &Path, action: OverlayAction) -> [&OsStr; 6] {
    [
        os("--lower"),
        lower.as_os_str(),
        os("--on-exit"),
        os(on_exit(action)),
        os("--"),
        os("true"),
    ]
}

/// One syscall of ovl-run's main thread: name, its occurrence number (per name, from the
/// start, as strace's `when=` counts), and the traced line.
struct Sys {
    name: String,
    nth: u64,
    line: String,
}

/// The syscalls from the commit's first journal write on, from a `strace -y` log of the main
/// thread only (no -f: the FUSE threads and the command are not counted).
fn commit_syscalls(log: &str) -> Vec<Sys> {
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut started = false;
    let mut out = Vec::new();
    for line in log.lines() {
        let Some(i) = line.find('(') else { continue };
        let name = &line[..i];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        let c = counts.entry(name.to_string()).or_default();
        *c += 1;
        started |= line.contains("ovl-commit.journal.tmp");
        if started {
            out.push(Sys {
                name: name.to_string(),
                nth: *c,
                line: line.to_string(),
            });
        }
    }
    out
}

/// Kill points: evenly spread over the commit, plus every directory removal in the upper
/// (an opaque directory emptied but still there is the dangerous state), plus the swap.
fn kill_points(sys: &[Sys], spread: usize) -> Vec<&Sys> {
    let mut idx: BTreeSet<usize> = (0..spread).map(|i| i * sys.len() / spread).collect();
    for (i, s) in sys.iter().enumerate() {
        let upper_rmdir =
            s.name == "unlinkat" && s.line.contains("/L_upper") && s.line.contains("AT_REMOVEDIR");
        let swap = s.name == "renameat2" && s.line.contains("RENAME_EXCHANGE");
        if upper_rmdir || swap {
            idx.insert(i);
        }
    }
    idx.into_iter().map(|i| &sys[i]).collect()
}

fn kill_sweep(action: OverlayAction) {
    let r = CrashRef::new(action);
    // Dry run: which syscalls does the commit make?
    let (t, lower) = preserved_fixture();
    let log = t.path().join("strace.log");
    let out = ovl_run_under(
        &[os("strace"), os("-qq"), os("-y"), os("-o"), log.as_os_str()],
        t.path(),
        &commit_true(&lower, action),
        None,
    );
    assert!(
        out.status.success(),
        "{action:?} traced commit: {}",
        stderr(&out)
    );
    let d = tree_diff("lower", &snap(&lower), "new", &r.new, LINKS);
    assert!(
        d.is_empty(),
        "{action:?}: committing the preserved upper differs:\n{d}"
    );
    let text = fs::read_to_string(&log).unwrap();
    let sys = commit_syscalls(&text);
    assert!(
        sys.len() > 20,
        "{action:?}: no commit found in the strace log:\n{text}"
    );
    drop(t);
    let points = kill_points(&sys, 24);
    let mut tally = CrashTally::default();
    for (i, s) in points.iter().enumerate() {
        let (t, lower) = preserved_fixture();
        let (trace, inject) = (
            format!("trace={}", s.name),
            format!("inject={}:signal=SIGKILL:when={}", s.name, s.nth),
        );
        let out = ovl_run_under(
            &[
                os("strace"),
                os("-qq"),
                os("-o"),
                os("/dev/null"),
                os("-e"),
                os(&trace),
                os("-e"),
                os(&inject),
            ],
            t.path(),
            &commit_true(&lower, action),
            None,
        );
        let label = format!("SIGKILL at {} #{}: {}", s.name, s.nth, s.line);
        let killed = out.status.signal() == Some(libc::SIGKILL) || out.status.code() == Some(137);
        if !killed {
            assert!(
                out.status.success(),
                "{label}: {:?} {}",
                out.status,
                stderr(&out)
            );
        }
        check_crash(&r, t.path(), &lower, &label, i % 2 == 1, &mut tally);
    }
    tally.finish(&format!("{action:?} (SIGKILL at syscalls)"));
}

#[test]
fn commit_atomic_survives_sigkill_at_any_syscall() {
    need_root!();
    need_strace!();
    kill_sweep(OverlayAction::CommitAtomic);
}

#[test]
fn commit_in_place_survives_sigkill_at_any_syscall() {
    need_root!();
    need_strace!();
    kill_sweep(OverlayAction::Commit);
}

/// The smallest case of the in-place window after the merge: the lower is new, the upper is
/// being removed. Killed with an opaque directory half emptied, the next run must not take
/// the remains for the user's changes.
#[test]
fn sigkill_while_removing_the_upper_loses_nothing() {
    need_root!();
    need_strace!();
    let mut pr = Problems::default();
    for action in MODES {
        let fixture = || {
            let t = tempfile::tempdir().unwrap();
            let lower = t.path().join("L");
            fs::create_dir_all(lower.join("o")).unwrap();
            fs::create_dir(t.path().join("cache")).unwrap();
            for i in 0..10 {
                fs::write(lower.join(format!("o/f{i}")), format!("v{i}\n")).unwrap();
            }
            fs::write(lower.join("a"), "a\n").unwrap();
            let script = "set -e; cd \"$OVL_MOUNTPOINT\"; rm -r o; mkdir o; \
                          for i in 0 1 2 3 4 5 6 7 8 9; do echo v$i > o/f$i; done; \
                          echo x > o/extra; echo b > a";
            let out = ovl_run(
                t.path(),
                &[
                    os("--lower"),
                    lower.as_os_str(),
                    os("--"),
                    os("sh"),
                    os("-c"),
                    os(script),
                ],
                None,
            );
            assert!(out.status.success(), "{}", stderr(&out));
            (t, lower)
        };
        let (t, lower) = fixture();
        let log = t.path().join("strace.log");
        let out = ovl_run_under(
            &[os("strace"), os("-qq"), os("-y"), os("-o"), log.as_os_str()],
            t.path(),
            &commit_true(&lower, action),
            None,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let new = snap(&lower);
        assert_eq!(names(&lower.join("o")).len(), 11);
        let sys = commit_syscalls(&fs::read_to_string(&log).unwrap());
        // The third removal inside the upper's opaque directory.
        let Some(point) = sys
            .iter()
            .filter(|s| s.name == "unlinkat" && s.line.contains("/L_upper/o>"))
            .nth(2)
        else {
            eprintln!("{action:?}: the upper is not removed entry by entry: nothing to test");
            continue;
        };
        drop(t);
        let (t, lower) = fixture();
        let inject = format!("inject=unlinkat:signal=SIGKILL:when={}", point.nth);
        let out = ovl_run_under(
            &[
                os("strace"),
                os("-qq"),
                os("-o"),
                os("/dev/null"),
                os("-e"),
                os("trace=unlinkat"),
                os("-e"),
                os(&inject),
            ],
            t.path(),
            &commit_true(&lower, action),
            None,
        );
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", stderr(&out));
        let left = names(&t.path().join("L_upper/o")).len();
        assert!(
            (1..11).contains(&left),
            "{action:?}: not killed in the window ({left} entries left)"
        );
        assert!(
            same_tree(&snap(&lower), &new, LINKS),
            "{action:?}: the lower is not new yet: not the window under test"
        );
        // The next run: it recovers, shows the tree, and commits again.
        let view = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--"),
                os("sh"),
                os("-c"),
                os("ls \"$OVL_MOUNTPOINT/o\" | wc -l"),
            ],
            None,
        );
        let shown = String::from_utf8_lossy(&view.stdout).trim().to_string();
        pr.eq(
            &format!("{action:?}: entries of o the next mount shows"),
            shown.as_str(),
            "11",
        );
        let out = ovl_run(t.path(), &commit_true(&lower, action), None);
        pr.check(out.status.success(), || {
            format!("{action:?}: commit after recovery: {}", stderr(&out))
        });
        let fin = snap(&lower);
        let d = tree_diff("lower", &fin, "committed", &new, LINKS);
        pr.check(d.is_empty(), || {
            format!(
                "{action:?}: after a kill with {left} of 11 entries of the upper's opaque o left, \
                 recovery + commit changed the committed lower:\n{d}"
            )
        });
    }
    pr.assert_none("SIGKILL while the upper is removed");
}
