//! The report: what the library returns and the one line ovl-run prints.

use super::*;

const REPORT_SCRIPT: &str = r#"
chmod 644 same
printf 'HELLO!' > mod
rm del
rm -r dir && mkdir dir && echo c > dir/c
printf xyz > new
"#;

fn report_lower(l: &Path) {
    fs::write(l.join("keep"), "keep\n").unwrap();
    fs::write(l.join("same"), "same\n").unwrap();
    chmod(&l.join("same"), 0o644);
    fs::write(l.join("mod"), "hello").unwrap();
    fs::write(l.join("del"), "bye").unwrap();
    fs::create_dir(l.join("dir")).unwrap();
    fs::write(l.join("dir/a"), "a").unwrap();
    fs::write(l.join("dir/b"), "b").unwrap();
}

fn check_report(what: &str, r: &Report, action: OverlayAction, lower: &Path) {
    let want = (3, 1, 3, 1, 11);
    assert_eq!(
        (
            r.written,
            r.deduplicated,
            r.deleted,
            r.dirs_replaced,
            r.bytes
        ),
        want,
        "{what}: (written, deduplicated, deleted, dirs_replaced, bytes) of {r:?}"
    );
    assert_eq!(r.action, action, "{what}");
    assert_eq!(r.path, lower.canonicalize().unwrap(), "{what}");
}

#[test]
fn library_returns_report() {
    need_root!();
    for action in MODES {
        let (fx, r, expected) = scenario(|l, _| report_lower(l), REPORT_SCRIPT, action);
        let r = r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
        check_report(&format!("{action:?}"), &r, action, &fx.lower);
    }
}

#[test]
fn ovl_run_prints_report_in_one_line() {
    need_root!();
    for action in MODES {
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("L");
        fs::create_dir(&lower).unwrap();
        report_lower(&lower);
        let copy = t.path().join("copy");
        cp_a(&lower, &copy);
        sh_in(&copy, REPORT_SCRIPT);
        let script = format!("set -e\ncd \"$OVL_MOUNTPOINT\"\n{REPORT_SCRIPT}");
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
                os(&script),
            ],
            None,
        );
        let err = stderr(&out);
        assert!(out.status.success(), "{action:?}: {out:?}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{action:?}: expected one line, got {err:?}");
        let line = lines[0];
        for part in [
            "3 files",
            "3 deletions",
            "1 replaced",
            "1 unchanged",
            "11 bytes",
        ] {
            assert!(line.contains(part), "{action:?}: {line:?} lacks {part:?}");
        }
        assert!(line.contains(&lower.display().to_string()), "{line:?}");
        assert_eq!(
            line.ends_with("atomically"),
            action == OverlayAction::CommitAtomic,
            "{line:?}"
        );
        assert_tree(&format!("{action:?}"), &lower, &snap(&copy), EXACT);
        assert!(
            !exists(&t.path().join("L_upper")),
            "upper left after commit"
        );
        assert!(
            !exists(&t.path().join(".L_upper.ovl-work")),
            "work dir left after commit"
        );
    }
}

#[test]
fn ovl_run_prints_report_in_one_line_on_the_kernel_backend() {
    on_kernel(ovl_run_prints_report_in_one_line);
}
