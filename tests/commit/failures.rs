//! Failures (disk full, permission denied, a file turned into a directory, a busy mount):
//! reported, non-zero exit, the upper kept.

use super::*;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tmpfs")
            .arg(at));
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        run(Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={size}"))
            .arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = output(Command::new("umount").arg("-l").arg(&self.0));
    }
}

fn disk_full_case(action: OverlayAction) {
    let t = tempfile::tempdir().unwrap();
    let fsroot = t.path().join("small");
    let tmpfs = Tmpfs::new(&fsroot, "1m");
    let lower = fsroot.join("lower");
    fs::create_dir(&lower).unwrap();
    fs::write(lower.join("a"), "a\n").unwrap();
    fs::write(lower.join("b"), "b\n").unwrap();
    let (upper, work, mnt) = (
        t.path().join("up"),
        t.path().join("wk"),
        t.path().join("mnt"),
    );
    let old = snap(&lower);
    let copy = t.path().join("copy");
    cp_a(&lower, &copy);
    let script = "head -c 3000000 /dev/zero > big\necho a2 > a\nrm b\n";
    sh_in(&copy, script);
    let expected = snap(&copy);
    let mut ofs = OverlayFS::new(&lower);
    ofs.set_upper(&upper)
        .set_workdir(&work)
        .set_mountpoint(&mnt);
    ofs.mount().unwrap();
    sh_in(&mnt, script);
    let upper_before = snap(&upper);
    let err = match unmounting(|| ofs.overlay_action(action)) {
        Ok(r) => panic!("{action:?}: commit into a full filesystem succeeded: {r:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("No space left on device") && err.contains("big"),
        "{action:?}: the error must say what failed (file big, ENOSPC): {err}"
    );
    // Checked last: the rest of the behaviour matters more than the wording.
    let names_lower_path = err.contains(&lower.join("big").display().to_string());
    // The upper is kept, whole.
    let d = tree_diff("upper", &snap(&upper), "before", &upper_before, LINKS);
    assert!(
        d.is_empty(),
        "{action:?}: upper changed by a failed commit:\n{d}"
    );
    // No temporaries left behind; the lower holds no torn file.
    let got = snap(&lower);
    if action == OverlayAction::CommitAtomic {
        let d = tree_diff("lower", &got, "old", &old, EXACT);
        assert!(
            d.is_empty(),
            "{action:?}: failed atomic commit changed the lower:\n{d}"
        );
    } else {
        for (p, e) in &got {
            let s = show(e, false);
            assert!(
                old.get(p).is_some_and(|o| show(o, false) == s)
                    || expected.get(p).is_some_and(|n| show(n, false) == s),
                "{action:?}: {p} is neither old nor new after a failed commit: {s}"
            );
        }
    }
    assert_eq!(names(&fsroot), vec!["lower".to_string()], "{action:?}");
    // With room again, committing the kept upper finishes the job.
    tmpfs.resize("16m");
    let mut ofs = OverlayFS::new(&lower);
    ofs.set_upper(&upper)
        .set_workdir(&work)
        .set_mountpoint(&mnt);
    ofs.mount().unwrap();
    unmounting(|| ofs.overlay_action(action)).unwrap_or_else(|e| panic!("{action:?}: retry: {e}"));
    assert_tree(&format!("{action:?} retry"), &lower, &expected, EXACT);
    assert!(!exists(&upper));
    assert!(
        names_lower_path,
        "{action:?}: the error must name the user's file {}, not a temporary: {err}",
        lower.join("big").display()
    );
    drop(tmpfs);
}

#[test]
fn commit_disk_full_reports_and_keeps_upper() {
    need_root!();
    disk_full_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_disk_full_reports_and_keeps_upper() {
    need_root!();
    disk_full_case(OverlayAction::CommitAtomic);
}

#[test]
fn ovl_run_failed_commit_exits_nonzero_and_keeps_upper() {
    need_root!();
    for action in MODES {
        let t = tempfile::tempdir().unwrap();
        let tmpfs = Tmpfs::new(&t.path().join("small"), "1m");
        let lower = t.path().join("small/L");
        fs::create_dir(&lower).unwrap();
        fs::write(lower.join("a"), "a\n").unwrap();
        let upper = t.path().join("U");
        let out = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--upper"),
                upper.as_os_str(),
                os("--on-exit"),
                os(on_exit(action)),
                os("--"),
                os("sh"),
                os("-c"),
                os("cd \"$OVL_MOUNTPOINT\" && head -c 3000000 /dev/zero > big && echo a2 > a"),
            ],
            None,
        );
        let err = stderr(&out);
        assert!(
            !out.status.success(),
            "{action:?}: exit status {:?}",
            out.status
        );
        assert_eq!(out.status.code(), Some(125), "{action:?}: {err}");
        assert!(
            err.contains("No space left on device") && err.contains("big"),
            "{action:?}: {err}"
        );
        assert_eq!(
            fs::metadata(upper.join("big")).map(|m| m.len()).ok(),
            Some(3_000_000),
            "{action:?}: upper must be kept"
        );
        tmpfs.resize("16m");
        let out = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--upper"),
                upper.as_os_str(),
                os("--on-exit"),
                os(on_exit(action)),
                os("--"),
                os("true"),
            ],
            None,
        );
        assert!(out.status.success(), "{action:?}: retry: {}", stderr(&out));
        assert_eq!(fs::metadata(lower.join("big")).unwrap().len(), 3_000_000);
        assert_eq!(fs::read_to_string(lower.join("a")).unwrap(), "a2\n");
        assert!(!exists(&upper));
    }
}

#[test]
fn ovl_run_failed_commit_exits_nonzero_and_keeps_upper_on_the_kernel_backend() {
    on_kernel(ovl_run_failed_commit_exits_nonzero_and_keeps_upper);
}

/// Clears the immutable flag of the given paths on drop (else the temp dir cannot go).
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: &[PathBuf]) -> Immutable {
        for p in paths {
            run(Command::new("chattr").arg("+i").arg(p));
        }
        Immutable(paths.to_vec())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = output(Command::new("chattr").arg("-i").arg(p));
        }
    }
}

fn permission_case(action: OverlayAction) {
    let mut fx = Fx::new(|l, _| {
        fs::write(l.join("locked"), "old\n").unwrap();
        fs::write(l.join("other"), "other\n").unwrap();
    });
    let old = snap(&fx.lower);
    let script = "echo new > locked\necho o2 > other\necho n > added\n";
    let copy = fx.t("copy");
    cp_a(&fx.lower, &copy);
    sh_in(&copy, script);
    let expected = snap(&copy);
    fx.sh(script);
    let upper_before = snap(&fx.upper);
    let guard = Immutable::set(&[fx.l("locked")]);
    let err = match fx.finish(action) {
        Ok(r) => panic!("{action:?}: commit over an immutable file succeeded: {r:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("locked") && err.contains("Operation not permitted"),
        "{action:?}: the error must say what failed: {err}"
    );
    let names_lower_path = err.contains(&fx.l("locked").display().to_string());
    let d = tree_diff("upper", &snap(&fx.upper), "before", &upper_before, LINKS);
    assert!(
        d.is_empty(),
        "{action:?}: upper changed by a failed commit:\n{d}"
    );
    let got = snap(&fx.lower);
    if action == OverlayAction::CommitAtomic {
        let d = tree_diff("lower", &got, "old", &old, EXACT);
        assert!(
            d.is_empty(),
            "{action:?}: failed atomic commit changed the lower:\n{d}"
        );
    }
    assert_eq!(fs::read_to_string(fx.l("locked")).unwrap(), "old\n");
    let mut top = names(fx.dir.path());
    top.retain(|n| !["lower", "upper", "work", "mnt", "copy"].contains(&n.as_str()));
    assert!(top.is_empty(), "{action:?}: temporaries left: {top:?}");
    // Once the file may change again, committing the kept upper finishes the job.
    drop(guard);
    fx.ofs.mount().unwrap();
    fx.finish(action)
        .unwrap_or_else(|e| panic!("{action:?}: retry: {e}"));
    assert_tree(&format!("{action:?} retry"), &fx.lower, &expected, EXACT);
    assert!(
        names_lower_path,
        "{action:?}: the error must name the user's file {}, not a temporary: {err}",
        fx.l("locked").display()
    );
}

#[test]
fn commit_permission_denied_reports_and_keeps_upper() {
    need_root!();
    permission_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_permission_denied_reports_and_keeps_upper() {
    need_root!();
    permission_case(OverlayAction::CommitAtomic);
}

/// The lower changed under the overlay: a file the overlay rewrote became a directory that
/// cannot be removed. In place, the commit must fail naming it and keep the upper.
#[test]
fn commit_fails_cleanly_when_a_file_turned_into_a_directory() {
    need_root!();
    let mut fx = Fx::new(|l, _| {
        fs::write(l.join("turned"), "file\n").unwrap();
        fs::write(l.join("x"), "x\n").unwrap();
    });
    fx.sh("echo rewritten > turned\necho x2 > x\n");
    unmounting(|| fx.ofs.umount()).unwrap();
    let upper_before = snap(&fx.upper);
    fs::remove_file(fx.l("turned")).unwrap();
    fs::create_dir(fx.l("turned")).unwrap();
    fs::write(fx.l("turned/user-data"), "precious\n").unwrap();
    let _guard = Immutable::set(&[fx.l("turned")]);
    let err = match fx.finish(OverlayAction::Commit) {
        Ok(r) => panic!("commit replaced an immutable directory: {r:?}"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("turned"), "error must name the entry: {err}");
    let d = tree_diff("upper", &snap(&fx.upper), "before", &upper_before, LINKS);
    assert!(d.is_empty(), "upper changed by a failed commit:\n{d}");
    assert_eq!(
        fs::read_to_string(fx.l("turned/user-data")).unwrap(),
        "precious\n"
    );
}

// =============================================================================================
// The overlay is unmounted while committing

#[test]
fn commit_runs_unmounted_and_refuses_a_busy_mount() {
    need_root!();
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    for action in MODES {
        let mut fx = Fx::new(|l, _| fs::write(l.join("f"), "old\n").unwrap());
        fs::write(fx.p("f"), "new\n").unwrap();
        // A file held open in the mount, released after 2 s (so a commit that waits for the
        // mount to go idle cannot hang the test).
        let busy = fs::File::open(fx.p("f")).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let rel = released.clone();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            drop(busy);
            rel.store(true, Ordering::SeqCst);
        });
        let r = fx.finish(action);
        let was_released = released.load(Ordering::SeqCst);
        let mounted = is_mounted(&fx.mnt);
        match &r {
            Ok(rep) => {
                assert!(
                    was_released,
                    "{action:?}: committed while a file in the mount was open: {rep:?}"
                );
            }
            Err(e) => {
                // Refused: nothing may have happened.
                assert_eq!(fs::read_to_string(fx.l("f")).unwrap(), "old\n", "{e}");
                assert_eq!(fs::read_to_string(fx.upper.join("f")).unwrap(), "new\n");
            }
        }
        holder.join().unwrap();
        let r = if r.is_err() {
            assert!(mounted, "{action:?}: refused, yet the mount is gone");
            // Once nothing holds the mount, the same call unmounts and commits. A process
            // forked by another test thread while the file was open may hold a copy of its
            // descriptor for a moment: retry briefly while the mount is still busy.
            let mut r = fx.finish(action);
            for _ in 0..40 {
                match &r {
                    Err(e) if e.to_string().contains("busy") => {
                        std::thread::sleep(Duration::from_millis(250));
                        r = fx.finish(action);
                    }
                    _ => break,
                }
            }
            r
        } else {
            r
        };
        let still = is_mounted(&fx.mnt);
        if still {
            let _ = output(Command::new("umount").arg("-l").arg(&fx.mnt));
        }
        assert!(
            !still,
            "{action:?}: the overlay is still mounted after the commit returned {r:?}"
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_eq!(fs::read_to_string(fx.l("f")).unwrap(), "new\n");
        assert_finalized(&fx, &format!("{action:?}"));
    }
}
