//! Metadata: mode (with setuid/setgid/sticky), owner, times and xattrs of files, directories
//! and symlinks, the root directory's included.

use super::*;

const T_ATIME: (i64, i64) = (1_000_000_000, 111_111_111);
const T_MTIME: (i64, i64) = (1_100_000_000, 123_456_789);
const T_MTIME2: (i64, i64) = (1_200_000_000, 987_654_321);
const T_DIRMTIME: (i64, i64) = (1_300_000_000, 5);
const T_SYMMTIME: (i64, i64) = (1_400_000_000, 7);

fn metadata_lower(l: &Path, _t: &Path) {
    for f in [
        "m_mode", "m_suid", "m_sgid", "m_owner", "m_times", "m_mtime", "m_xset", "m_xrm",
    ] {
        fs::write(l.join(f), format!("{f}\n")).unwrap();
        chmod(&l.join(f), 0o644);
    }
    lsetxattr(&l.join("m_xrm"), "user.old", b"old", 0).unwrap();
    lsetxattr(&l.join("m_xset"), "user.keep", b"k", 0).unwrap();
    for d in [
        "d_mode", "d_sticky", "d_sgid", "d_owner", "d_xset", "d_xrm", "d_times",
    ] {
        fs::create_dir(l.join(d)).unwrap();
        fs::write(l.join(d).join("child"), "c\n").unwrap();
        chmod(&l.join(d), 0o755);
    }
    lsetxattr(&l.join("d_xrm"), "user.old", b"old", 0).unwrap();
    symlink("m_mode", &l.join("sym"));
    for p in snap(l).keys() {
        set_times(&l.join(p), Some(OLD), Some(OLD)).unwrap();
    }
}

fn metadata_case(action: OverlayAction) {
    let mut fx = Fx::new(metadata_lower);
    let p = |r: &str| fx.p(r);
    // Content and attribute changes first, then the view (reading files moves atimes), then
    // the times, which are read back with stat only.
    fs::write(p("m_times"), "changed\n").unwrap();
    chmod(&p("m_mode"), 0o600);
    chmod(&p("m_suid"), 0o4755);
    chmod(&p("m_sgid"), 0o2755);
    lchown(&p("m_owner"), 1234, 2345).unwrap();
    chmod(&p("m_owner"), 0o6750);
    lsetxattr(&p("m_xset"), "user.new", b"v", 0).unwrap();
    // trusted.* (root only) where the mount takes it: the view comparison below covers it.
    let _ = lsetxattr(&p("m_xset"), "trusted.t", b"1", 0);
    let _ = lsetxattr(&p("d_xset"), "trusted.t", b"2", 0);
    lremovexattr(&p("m_xrm"), "user.old").unwrap();
    chmod(&p("d_mode"), 0o700);
    chmod(&p("d_sticky"), 0o1777);
    chmod(&p("d_sgid"), 0o2775);
    lchown(&p("d_owner"), 1234, 2345).unwrap();
    lsetxattr(&p("d_xset"), "user.d", b"1", 0).unwrap();
    lremovexattr(&p("d_xrm"), "user.old").unwrap();
    lchown(&p("sym"), 1234, 2345).unwrap();
    // What the mount shows is what the lower must hold afterwards.
    let view = snap(&fx.mnt);
    set_times(&p("m_times"), Some(T_ATIME), Some(T_MTIME)).unwrap();
    set_times(&p("m_mtime"), None, Some(T_MTIME2)).unwrap();
    set_times(&p("d_times"), None, Some(T_DIRMTIME)).unwrap();
    let sym_times = set_times(&p("sym"), None, Some(T_SYMMTIME)).is_ok();
    let view_md: HashMap<String, (i64, i64)> = view
        .keys()
        .map(|k| {
            let m = fs::symlink_metadata(fx.mnt.join(k)).unwrap();
            (k.clone(), (m.mtime(), m.mtime_nsec()))
        })
        .collect();
    let r = fx.finish(action);
    let rep = r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
    let l = |r: &str| fx.l(r);
    let md = |r: &str| fs::symlink_metadata(l(r)).unwrap();
    let mut pr = Problems::default();
    // Times first: reading the files below would move atimes.
    pr.eq(
        "m_times mtime",
        (md("m_times").mtime(), md("m_times").mtime_nsec()),
        T_MTIME,
    );
    pr.eq(
        "m_times atime",
        (md("m_times").atime(), md("m_times").atime_nsec()),
        T_ATIME,
    );
    pr.eq(
        "m_mtime mtime (only the mtime changed)",
        (md("m_mtime").mtime(), md("m_mtime").mtime_nsec()),
        T_MTIME2,
    );
    pr.eq(
        "d_times mtime",
        (md("d_times").mtime(), md("d_times").mtime_nsec()),
        T_DIRMTIME,
    );
    if sym_times {
        pr.eq(
            "sym mtime",
            (md("sym").mtime(), md("sym").mtime_nsec()),
            T_SYMMTIME,
        );
    }
    pr.eq("m_mode mode", mode_of(&l("m_mode")), 0o600);
    pr.eq("m_suid mode", mode_of(&l("m_suid")), 0o4755);
    pr.eq("m_sgid mode", mode_of(&l("m_sgid")), 0o2755);
    pr.eq(
        "m_owner owner",
        (md("m_owner").uid(), md("m_owner").gid()),
        (1234, 2345),
    );
    pr.eq("m_owner mode", mode_of(&l("m_owner")), 0o6750);
    pr.eq("d_mode mode", mode_of(&l("d_mode")), 0o700);
    pr.eq("d_sticky mode", mode_of(&l("d_sticky")), 0o1777);
    pr.eq("d_sgid mode", mode_of(&l("d_sgid")), 0o2775);
    pr.eq(
        "d_owner owner",
        (md("d_owner").uid(), md("d_owner").gid()),
        (1234, 2345),
    );
    pr.eq(
        "sym owner",
        (md("sym").uid(), md("sym").gid()),
        (1234, 2345),
    );
    let user = |p: PathBuf| -> BTreeSet<String> {
        llistxattr(&p)
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with("user."))
            .collect()
    };
    pr.eq(
        "m_xset user xattrs",
        user(l("m_xset")),
        ["user.keep".to_string(), "user.new".to_string()].into(),
    );
    pr.eq("m_xrm xattrs", llistxattr(&l("m_xrm")).unwrap(), vec![]);
    pr.eq(
        "d_xset user xattrs",
        user(l("d_xset")),
        ["user.d".to_string()].into(),
    );
    pr.eq(
        "d_xrm xattrs (removed from a directory)",
        llistxattr(&l("d_xrm")).unwrap(),
        vec![],
    );
    pr.eq(
        "m_times content",
        fs::read(l("m_times")).unwrap(),
        b"changed\n".to_vec(),
    );
    // Everything else the mount showed (types, modes, owners, contents, xattrs, links).
    let got = snap(&fx.lower);
    let d = tree_diff("lower", &got, "mount view", &view, LINKS);
    pr.check(d.is_empty(), || {
        format!("lower differs from the mount view:\n{d}")
    });
    // mtimes of non-directories as the mount showed them (copy-up and commit keep them).
    for (k, e) in &got {
        if e.kind != 'd' {
            if let Some(v) = view_md.get(k) {
                pr.check(e.mtime == *v, || {
                    format!("{k}: mtime {:?}, the mount showed {v:?}", e.mtime)
                });
            }
        }
    }
    pr.check(rep.written >= 8, || format!("report {rep:?}"));
    pr.assert_none(&format!("{action:?}: metadata not committed"));
}

#[test]
fn commit_applies_metadata() {
    need_root!();
    metadata_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_applies_metadata() {
    need_root!();
    metadata_case(OverlayAction::CommitAtomic);
}

/// The mount's root directory is the upper root: its mode, owner, times and xattrs are
/// changes like any other directory's.
#[test]
fn root_directory_metadata_is_committed() {
    need_root!();
    let mut pr = Problems::default();
    for action in MODES {
        let mut fx = Fx::new(|l, _| {
            fs::write(l.join("f"), "f\n").unwrap();
            chmod(l, 0o755);
        });
        chmod(&fx.mnt, 0o750);
        lchown(&fx.mnt, 1234, 2345).unwrap();
        lsetxattr(&fx.mnt, "user.root", b"r", 0).unwrap();
        fx.finish(action)
            .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        let md = fs::symlink_metadata(&fx.lower).unwrap();
        pr.eq(&format!("{action:?}: root mode"), md.mode() & 0o7777, 0o750);
        pr.eq(
            &format!("{action:?}: root owner"),
            (md.uid(), md.gid()),
            (1234, 2345),
        );
        pr.eq(
            &format!("{action:?}: root xattrs"),
            llistxattr(&fx.lower).unwrap(),
            vec!["user.root".to_string()],
        );
    }
    pr.assert_none("root directory metadata");
}

/// A root directory nobody changed keeps its mode, owner and xattrs (the atomic commit
/// rebuilds it).
#[test]
fn untouched_root_directory_keeps_its_metadata() {
    need_root!();
    for action in MODES {
        let mut fx = Fx::new(|l, _| {
            fs::write(l.join("f"), "f\n").unwrap();
            lchown(l, 1234, 2345).unwrap();
            chmod(l, 0o2751);
            lsetxattr(l, "user.keep", b"k", 0).unwrap();
        });
        let before = ent(&fx.lower).unwrap();
        fs::write(fx.p("f"), "changed\n").unwrap();
        fx.finish(action)
            .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        let after = ent(&fx.lower).unwrap();
        assert_eq!(show(&after, false), show(&before, false), "{action:?}");
    }
}
