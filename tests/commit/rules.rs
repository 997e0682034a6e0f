//! The merge rules: new and changed files, whiteouts, opaque directories, renames, hard links,
//! special files (recreated, never opened), dedupe (identical files keep their inode), and
//! overlay internals (xattrs, whiteout formats) never reaching the lower.

use super::*;

fn basic_lower(l: &Path, _t: &Path) {
    fs::write(l.join("keep"), "keep\n").unwrap();
    fs::write(l.join("mod"), "old content\n").unwrap();
    fs::write(l.join("append"), "head\n").unwrap();
    fs::write(l.join("del"), "delete me\n").unwrap();
    fs::write(l.join("mv-src"), "moved file\n").unwrap();
    fs::create_dir_all(l.join("dir/sub")).unwrap();
    fs::write(l.join("dir/a"), "a\n").unwrap();
    fs::write(l.join("dir/sub/b"), "b\n").unwrap();
    fs::create_dir_all(l.join("opq/deep")).unwrap();
    fs::write(l.join("opq/old1"), "old1\n").unwrap();
    fs::write(l.join("opq/deep/old2"), "old2\n").unwrap();
    fs::create_dir_all(l.join("ren/inner")).unwrap();
    fs::write(l.join("ren/r1"), "r1\n").unwrap();
    fs::write(l.join("ren/inner/r2"), "r2\n").unwrap();
    fs::create_dir(l.join("gone")).unwrap();
    fs::write(l.join("gone/g"), "g\n").unwrap();
    fs::write(l.join("file2dir"), "was a file\n").unwrap();
    fs::create_dir(l.join("dir2file")).unwrap();
    fs::write(l.join("dir2file/x"), "x\n").unwrap();
    symlink("keep", &l.join("sym"));
    symlink("keep", &l.join("sym2file"));
}

const BASIC_SCRIPT: &str = r#"
echo "new content" > mod
echo tail >> append
rm del
echo created > new
mkdir -p newdir/nested && echo n > newdir/nested/n
mv mv-src mv-dst
echo a2 > dir/a
rm dir/sub/b
rm -r opq && mkdir opq && echo fresh > opq/fresh
mv ren renamed
rm -r gone
rm file2dir && mkdir file2dir && echo inside > file2dir/f
rm -r dir2file && echo now-a-file > dir2file
rm sym && ln -s mod sym
rm sym2file && echo plain > sym2file
ln -s newdir/nested/n newsym
"#;

fn basic_merge(action: OverlayAction) {
    let (fx, r, expected) = scenario(basic_lower, BASIC_SCRIPT, action);
    let rep = r.unwrap_or_else(|e| panic!("{action:?} failed: {e}"));
    assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
    assert_finalized(&fx, &format!("{action:?}"));
    assert!(rep.written >= 10, "{action:?}: report {rep:?}");
    assert!(rep.deleted >= 4, "{action:?}: report {rep:?}");
    assert!(rep.dirs_replaced >= 1, "{action:?}: report {rep:?}");
}

#[test]
fn commit_merges_changes_whiteouts_opaque_dirs_renames() {
    need_root!();
    basic_merge(OverlayAction::Commit);
}

#[test]
fn commit_atomic_merges_changes_whiteouts_opaque_dirs_renames() {
    need_root!();
    basic_merge(OverlayAction::CommitAtomic);
}

/// Renames land as renames or as delete + create; either way no data is lost and no stale copy
/// stays behind, also for a lower directory moved into another lower directory.
#[test]
fn renames_of_lower_files_and_directories() {
    need_root!();
    for action in MODES {
        let (fx, r, expected) = scenario(
            |l, _| {
                fs::create_dir_all(l.join("a/b/c")).unwrap();
                fs::write(l.join("a/b/c/f"), "deep\n").unwrap();
                fs::write(l.join("a/top"), "top\n").unwrap();
                fs::create_dir(l.join("z")).unwrap();
                fs::write(l.join("one"), "1\n").unwrap();
                fs::write(l.join("two"), "2\n").unwrap();
            },
            "mv a/b z/b\nmv one two\nmv z/b/c/f z/b/c/g\nmv a a2\n",
            action,
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
    }
}

// ---------------------------------------------------------------------------------------------
// Hard links

#[test]
fn hard_links_in_the_upper_stay_linked_in_the_lower() {
    need_root!();
    for action in MODES {
        let (fx, r, expected) = scenario(
            |l, _| {
                fs::write(l.join("a"), "a\n").unwrap();
                fs::create_dir(l.join("d")).unwrap();
                fs::write(l.join("d/x"), "x\n").unwrap();
                fs::write(l.join("h1"), "h\n").unwrap();
                fs::hard_link(l.join("h1"), l.join("d/h2")).unwrap();
            },
            "echo n > n1\nln n1 n2\nln n1 d/n3\nln a a2\nln d/x y\necho more >> y\n",
            action,
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
        let l = |r: &str| ino_of(&fx.l(r));
        assert_eq!(l("n1"), l("n2"), "{action:?}");
        assert_eq!(l("n1"), l("d/n3"), "{action:?}");
        assert_eq!(l("a"), l("a2"), "{action:?}");
        assert_eq!(l("d/x"), l("y"), "{action:?}");
        // An untouched lower hard-link pair stays one inode.
        assert_eq!(l("h1"), l("d/h2"), "{action:?}");
    }
}

/// A lower file with two names, written through one of them: through the mount both names
/// show the new content (one file), so the committed lower must too.
#[test]
fn lower_hard_link_written_through_one_name() {
    need_root!();
    let mut pr = Problems::default();
    for action in MODES {
        let mut fx = Fx::new(|l, _| {
            fs::write(l.join("h1"), "old\n").unwrap();
            fs::create_dir(l.join("d")).unwrap();
            fs::hard_link(l.join("h1"), l.join("d/h2")).unwrap();
            fs::write(l.join("m1"), "m\n").unwrap();
            fs::hard_link(l.join("m1"), l.join("d/m2")).unwrap();
        });
        // Only h1 and m1 are looked up: d/h2 and d/m2 are never named through the mount
        // (looking at them would link them up in the upper and hide the problem).
        fs::write(fx.p("h1"), "new content\n").unwrap();
        chmod(&fx.p("m1"), 0o600);
        fx.finish(action)
            .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        let l = |r: &str| fx.l(r);
        for (a, b) in [("h1", "d/h2"), ("m1", "d/m2")] {
            pr.eq(
                &format!("{action:?}: {b} is the same file as {a}"),
                ino_of(&l(b)),
                ino_of(&l(a)),
            );
        }
        pr.eq(
            &format!("{action:?}: d/h2 content"),
            fs::read_to_string(l("d/h2")).unwrap(),
            "new content\n".to_string(),
        );
        pr.eq(
            &format!("{action:?}: d/m2 mode"),
            mode_of(&l("d/m2")),
            0o600,
        );
    }
    pr.assert_none("hard-linked lower file changed through one name");
}

// ---------------------------------------------------------------------------------------------
// Special files: recreated as what they are, never opened

fn special_case(action: OverlayAction) {
    let mut fx = Fx::new(|l, _| {
        mknod(&l.join("lfifo"), libc::S_IFIFO | 0o644, 0).unwrap();
        mknod(&l.join("lfifo2"), libc::S_IFIFO | 0o644, 0).unwrap();
        mknod(&l.join("lchr"), libc::S_IFCHR | 0o600, libc::makedev(1, 3)).unwrap();
        fs::write(l.join("f"), "f\n").unwrap();
    });
    let p = |r: &str| fx.p(r);
    mknod(&p("fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
    mknod(&p("chr"), libc::S_IFCHR | 0o620, libc::makedev(1, 5)).unwrap();
    mknod(&p("blk"), libc::S_IFBLK | 0o660, libc::makedev(7, 200)).unwrap();
    drop(std::os::unix::net::UnixListener::bind(p("sock")).unwrap());
    fs::create_dir(p("sub")).unwrap();
    mknod(&p("sub/fifo"), libc::S_IFIFO | 0o600, 0).unwrap();
    chmod(&p("lfifo"), 0o600); // changed lower fifo
    lchown(&p("lfifo2"), 0, 0).unwrap(); // copied up, identical
    lchown(&p("lchr"), 1234, 2345).unwrap();
    let view = snap(&fx.mnt);
    let lower = fx.lower.clone();
    // If the commit opened a fifo it would block here forever (no writer).
    unmounting(|| fx.ofs.umount()).unwrap();
    let mut ofs = std::mem::replace(&mut fx.ofs, OverlayFS::new(&lower));
    let r = with_timeout(30, "commit with fifos", move || {
        ofs.overlay_action(action).map_err(|e| e.to_string())
    });
    r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
    let got = snap(&fx.lower);
    let d = tree_diff("lower", &got, "mount view", &view, LINKS);
    assert!(d.is_empty(), "{action:?}: special files differ:\n{d}");
    let k = |r: &str| got[r].kind;
    assert_eq!(
        (
            k("fifo"),
            k("chr"),
            k("blk"),
            k("sock"),
            k("sub/fifo"),
            k("lfifo")
        ),
        ('p', 'c', 'b', 's', 'p', 'p')
    );
    assert_eq!(got["chr"].rdev, libc::makedev(1, 5));
    assert_eq!(got["blk"].rdev, libc::makedev(7, 200));
}

#[test]
fn commit_recreates_fifos_sockets_devices_without_opening_them() {
    need_root!();
    special_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_recreates_fifos_sockets_devices_without_opening_them() {
    need_root!();
    special_case(OverlayAction::CommitAtomic);
}

// ---------------------------------------------------------------------------------------------
// Dedupe

fn dedupe_case(action: OverlayAction) {
    let mut fx = Fx::new(|l, _| {
        for f in [
            "untouched",
            "rewritten",
            "chmod_same",
            "samesize",
            "mode",
            "owner",
            "xattr",
        ] {
            fs::write(l.join(f), format!("{f} data\n")).unwrap();
            chmod(&l.join(f), 0o644);
            set_times(&l.join(f), Some(OLD), Some(OLD)).unwrap();
        }
        fs::create_dir(l.join("d")).unwrap();
        fs::write(l.join("d/inner"), "inner\n").unwrap();
    });
    let before: HashMap<String, u64> = snap(&fx.lower)
        .into_iter()
        .map(|(k, e)| (k, e.ino))
        .collect();
    // Same content, mode, owner, xattrs: identical, whatever happened to it on the way.
    fs::write(fx.p("rewritten"), "rewritten data\n").unwrap();
    chmod(&fx.p("chmod_same"), 0o644);
    chmod(&fx.p("d/inner"), 0o644);
    // Same size and same mtime as the lower's, other content: must be written.
    fs::write(fx.p("samesize"), "SAMESIZE DATA\n").unwrap();
    set_times(&fx.p("samesize"), Some(OLD), Some(OLD)).unwrap();
    assert_eq!(
        fs::metadata(fx.p("samesize")).unwrap().len(),
        fs::metadata(fx.l("samesize")).unwrap().len()
    );
    // Same content, one attribute different: must be written.
    chmod(&fx.p("mode"), 0o640);
    lchown(&fx.p("owner"), 1234, 2345).unwrap();
    lsetxattr(&fx.p("xattr"), "user.x", b"1", 0).unwrap();
    let view = snap(&fx.mnt);
    let rep = fx
        .finish(action)
        .unwrap_or_else(|e| panic!("{action:?}: {e}"));
    let ino = |r: &str| ino_of(&fx.l(r));
    let mut pr = Problems::default();
    for f in ["untouched", "rewritten", "chmod_same", "d/inner"] {
        pr.eq(&format!("{f}: inode (deduplicated)"), ino(f), before[f]);
    }
    pr.eq(
        "samesize content",
        fs::read(fx.l("samesize")).unwrap(),
        b"SAMESIZE DATA\n".to_vec(),
    );
    let got = snap(&fx.lower);
    let d = tree_diff("lower", &got, "mount view", &view, LINKS);
    pr.check(d.is_empty(), || {
        format!("lower differs from the mount view:\n{d}")
    });
    pr.check(rep.deduplicated >= 3, || {
        format!(
            "report counts {} deduplicated, expected >= 3: {rep:?}",
            rep.deduplicated
        )
    });
    pr.check(rep.written >= 4, || format!("report {rep:?}"));
    pr.assert_none(&format!("{action:?}: dedupe"));
}

#[test]
fn commit_dedupes_identical_files_only() {
    need_root!();
    dedupe_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_dedupes_identical_files_only() {
    need_root!();
    dedupe_case(OverlayAction::CommitAtomic);
}

// ---------------------------------------------------------------------------------------------
// Internal xattrs and whiteout formats never reach the lower

#[test]
fn internal_overlay_xattrs_never_leak() {
    need_root!();
    for action in MODES {
        let (fx, r, expected) = scenario(
            |l, _| {
                fs::create_dir_all(l.join("d/e")).unwrap();
                fs::write(l.join("d/e/f"), "f\n").unwrap();
                fs::write(l.join("d/g"), "g\n").unwrap();
                fs::create_dir(l.join("o")).unwrap();
                fs::write(l.join("o/x"), "x\n").unwrap();
                fs::write(l.join("h1"), "h\n").unwrap();
                fs::hard_link(l.join("h1"), l.join("h2")).unwrap();
                fs::write(l.join("w"), "w\n").unwrap();
            },
            // A renamed lower dir (copied up whole, opaque), an opaque re-created dir, a
            // whiteout, a copied-up hard link (indexed), a directory over a whiteout.
            "mv d d2\nrm -r o && mkdir o && echo y > o/y\nrm w\necho more >> h1\ncat h2 >/dev/null\n\
             rm d2/g && mkdir d2/g\nmkdir n && touch n/m\n",
            action,
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        let got = snap(&fx.lower);
        let l = leaks(&got);
        assert!(l.is_empty(), "{action:?}: overlay internals leaked: {l:#?}");
        let d = tree_diff("lower", &got, "expected", &expected, LINKS);
        assert!(d.is_empty(), "{action:?}: lower differs:\n{d}");
    }
}
