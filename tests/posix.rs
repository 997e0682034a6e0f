//! POSIX semantics of the overlay on real mounts, with the kernel overlay as the reference.

mod common;
use common::*;

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use ovl::InodeMode;

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn renameat2(a: &Path, b: &Path, flags: u32) -> std::io::Result<()> {
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c(a).as_ptr(),
            libc::AT_FDCWD,
            c(b).as_ptr(),
            flags,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn lower_tree(l: &Path) {
    fs::write(l.join("file"), "lower file").unwrap();
    fs::create_dir_all(l.join("dir/sub")).unwrap();
    fs::write(l.join("dir/a"), "a").unwrap();
    fs::write(l.join("dir/sub/b"), "b").unwrap();
    symlink("file", l.join("link")).unwrap();
    symlink("/nonexistent/target", l.join("dangling")).unwrap();
}

#[test]
fn unlink_lower_leaves_char_whiteout_and_keeps_lower() {
    let m = Mounted::new(lower_tree);
    fs::remove_file(m.p("file")).unwrap();
    assert!(!m.p("file").exists());
    assert_eq!(names(&m.mnt), ["dangling", "dir", "link"]);
    let st = fs::symlink_metadata(m.upper.join("file")).unwrap();
    assert_eq!(st.mode() & libc::S_IFMT, libc::S_IFCHR);
    assert_eq!(st.rdev(), 0);
    assert_eq!(
        fs::read_to_string(m.lower.join("file")).unwrap(),
        "lower file"
    );
    // Re-creating over the whiteout works and shows only the new content.
    fs::write(m.p("file"), "new").unwrap();
    assert_eq!(fs::read_to_string(m.p("file")).unwrap(), "new");
    assert!(
        fs::symlink_metadata(m.upper.join("file"))
            .unwrap()
            .is_file()
    );
}

#[test]
fn rmdir_merged_dir_and_recreate_is_opaque() {
    let m = Mounted::new(lower_tree);
    let e = fs::remove_dir(m.p("dir")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    fs::remove_dir_all(m.p("dir")).unwrap();
    assert!(!m.p("dir").exists());
    fs::create_dir(m.p("dir")).unwrap();
    assert!(
        names(&m.p("dir")).is_empty(),
        "new dir must not show lower content"
    );
    assert_eq!(
        xattr_get(&m.upper.join("dir"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    // Lower untouched.
    assert_eq!(names(&m.lower.join("dir")), ["a", "sub"]);
}

#[test]
fn rmdir_merged_dir_with_only_whiteouts_left() {
    let m = Mounted::new(lower_tree);
    fs::remove_file(m.p("dir/a")).unwrap();
    fs::remove_file(m.p("dir/sub/b")).unwrap();
    fs::remove_dir(m.p("dir/sub")).unwrap();
    fs::remove_dir(m.p("dir")).unwrap();
    assert_eq!(names(&m.mnt), ["dangling", "file", "link"]);
}

fn xattr_get(p: &Path, name: &str) -> Option<Vec<u8>> {
    let cn = CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    let n = unsafe {
        libc::lgetxattr(
            c(p).as_ptr(),
            cn.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return None;
    }
    buf.truncate(n as usize);
    Some(buf)
}

fn xattr_set(p: &Path, name: &str, v: &[u8]) -> std::io::Result<()> {
    let cn = CString::new(name).unwrap();
    let r = unsafe { libc::lsetxattr(c(p).as_ptr(), cn.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn xattr_list(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let n = unsafe { libc::llistxattr(c(p).as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    assert!(n >= 0);
    buf.truncate(n as usize);
    buf.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[test]
fn reads_every_whiteout_and_opaque_form() {
    // Upper prepared by hand in each format other writers use.
    let m = Mounted::new(|l| {
        for n in ["wh_dev", "wh_aufs", "wh_xattr"] {
            fs::write(l.join(n), "x").unwrap();
        }
        for d in ["op_trusted", "op_user", "op_marker"] {
            fs::create_dir(l.join(d)).unwrap();
            fs::write(l.join(d).join("hidden"), "x").unwrap();
        }
        fs::write(l.join("keep"), "x").unwrap();
    });
    let mut m = m;
    m.umount();
    let u = &m.upper;
    let wh = CString::new(u.join("wh_dev").as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR, 0) }, 0);
    fs::write(u.join(".wh.wh_aufs"), "").unwrap();
    fs::create_dir(u.join("xw")).unwrap();
    fs::write(u.join("wh_xattr"), "").unwrap();
    xattr_set(&u.join("wh_xattr"), "trusted.overlay.whiteout", b"").unwrap();
    // Xattr whiteouts count only in directories marked overlay.opaque=x (as in the kernel);
    // an unmarked empty file with the xattr is an ordinary file.
    xattr_set(u, "trusted.overlay.opaque", b"x").unwrap();
    for (d, x) in [
        ("op_trusted", Some("trusted.overlay.opaque")),
        ("op_user", Some("user.overlay.opaque")),
        ("op_marker", None),
    ] {
        fs::create_dir(u.join(d)).unwrap();
        fs::write(u.join(d).join("mine"), "m").unwrap();
        match x {
            Some(x) => xattr_set(&u.join(d), x, b"y").unwrap(),
            None => fs::write(u.join(d).join(".wh..wh..opq"), "").unwrap(),
        }
    }
    m.mount();
    assert_eq!(
        names(&m.mnt),
        ["keep", "op_marker", "op_trusted", "op_user", "xw"]
    );
    for d in ["op_trusted", "op_user", "op_marker"] {
        assert_eq!(names(&m.p(d)), ["mine"], "{d}");
        assert!(!m.p(d).join("hidden").exists());
    }
    for n in ["wh_dev", "wh_aufs", "wh_xattr"] {
        assert!(fs::symlink_metadata(m.p(n)).is_err(), "{n} must be hidden");
    }
}

#[test]
fn reserved_names_and_private_xattrs() {
    let m = Mounted::new(|l| {
        fs::write(l.join("f"), "x").unwrap();
        xattr_set(&l.join("f"), "trusted.overlay.origin", b"z").unwrap();
        xattr_set(&l.join("f"), "user.keep", b"v").unwrap();
    });
    let e = fs::write(m.p(".wh.foo"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    let e = fs::create_dir(m.p(".wh.dir")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    assert_eq!(xattr_list(&m.p("f")), ["user.keep"]);
    assert_eq!(xattr_get(&m.p("f"), "trusted.overlay.origin"), None);
    assert!(xattr_set(&m.p("f"), "trusted.overlay.opaque", b"y").is_err());
    assert!(xattr_set(&m.p("f"), "user.overlay.opaque", b"y").is_err());
    assert_eq!(
        xattr_get(&m.p("f"), "user.keep").as_deref(),
        Some(&b"v"[..])
    );
}

#[test]
fn copy_up_keeps_metadata_and_parents() {
    let m = Mounted::new(|l| {
        fs::create_dir_all(l.join("p/q")).unwrap();
        fs::write(l.join("p/q/f"), "data").unwrap();
        // chown first: it clears setuid.
        std::os::unix::fs::chown(l.join("p/q/f"), Some(1234), Some(4321)).unwrap();
        std::os::unix::fs::chown(l.join("p/q"), Some(1), Some(2)).unwrap();
        fs::set_permissions(l.join("p/q/f"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::set_permissions(l.join("p/q"), fs::Permissions::from_mode(0o750)).unwrap();
        xattr_set(&l.join("p/q/f"), "user.tag", b"t").unwrap();
        let t = CString::new(l.join("p/q/f").as_os_str().as_bytes()).unwrap();
        let times = [
            libc::timespec {
                tv_sec: 1_000_000,
                tv_nsec: 5,
            },
            libc::timespec {
                tv_sec: 2_000_000,
                tv_nsec: 7,
            },
        ];
        unsafe { libc::utimensat(libc::AT_FDCWD, t.as_ptr(), times.as_ptr(), 0) };
    });
    // Appending copies up with the data.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.p("p/q/f"))
        .unwrap();
    f.write_all(b"+").unwrap();
    drop(f);
    let up = fs::metadata(m.upper.join("p/q/f")).unwrap();
    assert_eq!(fs::read(m.upper.join("p/q/f")).unwrap(), b"data+");
    assert_eq!((up.uid(), up.gid()), (1234, 4321));
    assert_eq!(up.mode() & 0o7777, 0o4755);
    assert_eq!(
        xattr_get(&m.upper.join("p/q/f"), "user.tag").as_deref(),
        Some(&b"t"[..])
    );
    let q = fs::metadata(m.upper.join("p/q")).unwrap();
    assert_eq!((q.uid(), q.gid(), q.mode() & 0o7777), (1, 2, 0o750));
    // chmod-only copy-up keeps the timestamps.
    let m2 = Mounted::new(|l| {
        fs::write(l.join("g"), "g").unwrap();
        let t = CString::new(l.join("g").as_os_str().as_bytes()).unwrap();
        let times = [
            libc::timespec {
                tv_sec: 1_000_000,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: 2_000_000,
                tv_nsec: 0,
            },
        ];
        unsafe { libc::utimensat(libc::AT_FDCWD, t.as_ptr(), times.as_ptr(), 0) };
    });
    fs::set_permissions(m2.p("g"), fs::Permissions::from_mode(0o600)).unwrap();
    let g = fs::metadata(m2.upper.join("g")).unwrap();
    assert_eq!(g.mtime(), 2_000_000);
    assert_eq!(g.mode() & 0o7777, 0o600);
    assert_eq!(fs::read(m2.upper.join("g")).unwrap(), b"g");
}

#[test]
fn open_trunc_of_lower_file() {
    let m = Mounted::new(|l| fs::write(l.join("big"), vec![7u8; 1 << 20]).unwrap());
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.p("big"))
        .unwrap();
    f.write_all(b"small").unwrap();
    drop(f);
    assert_eq!(fs::read(m.p("big")).unwrap(), b"small");
    assert_eq!(fs::read(m.lower.join("big")).unwrap().len(), 1 << 20);
}

#[test]
fn rename_files_and_directories_anywhere() {
    let m = Mounted::new(lower_tree);
    // A lower directory moves with its content (the kernel says EXDEV here).
    fs::rename(m.p("dir"), m.p("moved")).unwrap();
    assert!(!m.p("dir").exists());
    assert_eq!(names(&m.p("moved")), ["a", "sub"]);
    assert_eq!(fs::read_to_string(m.p("moved/sub/b")).unwrap(), "b");
    // The old name does not resurface after a remount.
    let mut m = m;
    m.remount();
    assert!(!m.p("dir").exists());
    assert_eq!(names(&m.p("moved/sub")), ["b"]);
    // File over file.
    fs::write(m.p("x"), "x").unwrap();
    fs::rename(m.p("x"), m.p("file")).unwrap();
    assert_eq!(fs::read_to_string(m.p("file")).unwrap(), "x");
    assert!(!m.p("x").exists());
    // Errors a normal filesystem returns.
    fs::create_dir(m.p("empty")).unwrap();
    assert_eq!(
        fs::rename(m.p("file"), m.p("moved"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EISDIR)
    );
    assert_eq!(
        fs::rename(m.p("empty"), m.p("file"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOTDIR)
    );
    assert_eq!(
        fs::rename(m.p("empty"), m.p("moved"))
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    // Directory over an empty directory.
    fs::create_dir(m.p("e2")).unwrap();
    fs::write(m.p("e2/in"), "1").unwrap();
    fs::rename(m.p("e2"), m.p("empty")).unwrap();
    assert_eq!(names(&m.p("empty")), ["in"]);
    // Lower file moved into a lower-merged dir; the source is hidden.
    fs::rename(m.p("link"), m.p("moved/link2")).unwrap();
    assert_eq!(
        fs::read_link(m.p("moved/link2")).unwrap(),
        Path::new("file")
    );
    assert!(fs::symlink_metadata(m.p("link")).is_err());
}

#[test]
fn rename_noreplace_and_exchange() {
    let m = Mounted::new(lower_tree);
    assert_eq!(
        renameat2(&m.p("file"), &m.p("link"), libc::RENAME_NOREPLACE)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EEXIST)
    );
    renameat2(&m.p("file"), &m.p("dir"), libc::RENAME_EXCHANGE).unwrap();
    assert!(m.p("file").is_dir());
    assert_eq!(fs::read_to_string(m.p("dir")).unwrap(), "lower file");
    assert_eq!(names(&m.p("file")), ["a", "sub"]);
    assert_eq!(
        renameat2(&m.p("file"), &m.p("nope"), libc::RENAME_EXCHANGE)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOENT)
    );
    let mut m = m;
    m.remount();
    assert!(m.p("file").is_dir());
    assert_eq!(fs::read_to_string(m.p("dir")).unwrap(), "lower file");
}

#[test]
fn hard_links_share_inode_and_count() {
    let m = Mounted::new(|l| {
        fs::write(l.join("h1"), "shared").unwrap();
        fs::hard_link(l.join("h1"), l.join("h2")).unwrap();
    });
    let a = fs::metadata(m.p("h1")).unwrap();
    assert_eq!(
        a.nlink(),
        2,
        "real st_nlink before the other name is looked up"
    );
    let b = fs::metadata(m.p("h2")).unwrap();
    assert_eq!(a.ino(), b.ino());
    // Links made in the mount.
    fs::write(m.p("n1"), "one").unwrap();
    fs::hard_link(m.p("n1"), m.p("n2")).unwrap();
    let (s1, s2) = (
        fs::metadata(m.p("n1")).unwrap(),
        fs::metadata(m.p("n2")).unwrap(),
    );
    assert_eq!(s1.ino(), s2.ino());
    assert_eq!((s1.nlink(), s2.nlink()), (2, 2));
    fs::OpenOptions::new()
        .write(true)
        .open(m.p("n2"))
        .unwrap()
        .write_all(b"ONE")
        .unwrap();
    assert_eq!(fs::read_to_string(m.p("n1")).unwrap(), "ONE");
    fs::remove_file(m.p("n1")).unwrap();
    assert_eq!(fs::metadata(m.p("n2")).unwrap().nlink(), 1);
    // Linking a lower file copies it up first.
    fs::hard_link(m.p("h1"), m.p("h3")).unwrap();
    assert_eq!(fs::read_to_string(m.p("h3")).unwrap(), "shared");
    assert_eq!(
        fs::metadata(m.p("h1")).unwrap().ino(),
        fs::metadata(m.p("h3")).unwrap().ino()
    );
}

#[test]
fn open_fd_survives_unlink_and_rename() {
    let m = Mounted::new(lower_tree);
    for name in ["file", "fresh"] {
        if name == "fresh" {
            fs::write(m.p(name), "lower file").unwrap();
        }
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.p(name))
            .unwrap();
        fs::remove_file(m.p(name)).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "lower file");
        f.write_all(b"!").unwrap();
        assert_eq!(f.metadata().unwrap().nlink(), 0, "{name}");
        f.set_permissions(fs::Permissions::from_mode(0o600))
            .unwrap();
        assert_eq!(f.metadata().unwrap().mode() & 0o777, 0o600);
        f.seek(SeekFrom::Start(0)).unwrap();
        s.clear();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "lower file!");
    }
    // Read-only fd of a lower file, then unlink: still readable, st_nlink 0.
    let mut f = fs::File::open(m.p("dir/a")).unwrap();
    fs::remove_file(m.p("dir/a")).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "a");
    assert_eq!(f.metadata().unwrap().nlink(), 0);
    // Rename keeps the fd.
    fs::write(m.p("r"), "r").unwrap();
    let mut f = fs::OpenOptions::new().append(true).open(m.p("r")).unwrap();
    fs::rename(m.p("r"), m.p("dir/r2")).unwrap();
    f.write_all(b"2").unwrap();
    assert_eq!(fs::read_to_string(m.p("dir/r2")).unwrap(), "r2");
}

#[test]
fn cwd_in_renamed_directory_keeps_working() {
    let m = Mounted::new(lower_tree);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {d}/dir/sub && mv {d}/dir {d}/dir2 && echo hi > new && cat b && pwd -P >/dev/null",
            d = m.mnt.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "b");
    assert_eq!(fs::read_to_string(m.p("dir2/sub/new")).unwrap(), "hi\n");
}

#[test]
fn symlinks_are_never_followed() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("victim"), "safe").unwrap();
    fs::set_permissions(
        outside.path().join("victim"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let target = outside.path().join("victim");
    let m = Mounted::new(|l| {
        symlink(&target, l.join("out")).unwrap();
        symlink("/nonexistent", l.join("dangle")).unwrap();
    });
    assert_eq!(
        fs::read_link(m.p("dangle")).unwrap(),
        Path::new("/nonexistent")
    );
    // lchown on the symlink copies the link up, not its target.
    std::os::unix::fs::lchown(m.p("out"), Some(77), Some(77)).unwrap();
    assert_eq!(fs::symlink_metadata(m.upper.join("out")).unwrap().uid(), 77);
    assert_eq!(fs::metadata(&target).unwrap().uid(), 0);
    // Replacing the link by a directory keeps everything inside the overlay.
    fs::remove_file(m.p("out")).unwrap();
    fs::create_dir(m.p("out")).unwrap();
    fs::write(m.p("out/victim"), "inside").unwrap();
    assert_eq!(fs::read_to_string(&target).unwrap(), "safe");
    assert_eq!(
        fs::read_to_string(m.upper.join("out/victim")).unwrap(),
        "inside"
    );
}

#[test]
fn inode_numbers_stable_and_match_readdir() {
    let m = Mounted::new(lower_tree);
    let before = fs::metadata(m.p("file")).unwrap();
    fs::write(m.p("file"), "copied up now").unwrap();
    let after = fs::metadata(m.p("file")).unwrap();
    assert_eq!(
        before.ino(),
        after.ino(),
        "copy-up keeps st_ino while mounted"
    );
    let root = fs::metadata(&m.mnt).unwrap();
    for e in fs::read_dir(m.p("dir")).unwrap() {
        let e = e.unwrap();
        let st = fs::symlink_metadata(e.path()).unwrap();
        assert_eq!(e.ino(), st.ino(), "d_ino == st_ino for {:?}", e.file_name());
        assert_eq!(st.dev(), root.dev());
    }
    let d1 = fs::metadata(m.p("dir/sub")).unwrap().ino();
    assert_ne!(d1, fs::metadata(m.p("dir")).unwrap().ino());
}

#[test]
fn persistent_inode_numbers_survive_remount() {
    let mut m = Mounted::with_mode(InodeMode::Persistent, lower_tree);
    fs::write(m.p("newfile"), "n").unwrap();
    let take = |m: &Mounted| -> Vec<u64> {
        ["file", "dir", "dir/a", "dir/sub/b", "link", "newfile"]
            .iter()
            .map(|p| fs::symlink_metadata(m.p(p)).unwrap().ino())
            .collect()
    };
    let a = take(&m);
    m.remount();
    let b = take(&m);
    assert_eq!(a, b);
    let mut uniq = a.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), a.len());
}

#[test]
fn readdir_offsets_are_stable_while_dir_changes() {
    let m = Mounted::new(|l| {
        for i in 0..300 {
            fs::write(l.join(format!("f{i:03}")), "x").unwrap();
        }
    });
    let dir = c(&m.mnt);
    unsafe {
        let d = libc::opendir(dir.as_ptr());
        assert!(!d.is_null());
        let mut seen = Vec::new();
        let mut pos_at_100 = 0;
        loop {
            if seen.len() == 100 {
                pos_at_100 = libc::telldir(d);
                // Change the directory in the middle of the listing.
                for i in 100..150 {
                    fs::remove_file(m.p(&format!("f{i:03}"))).unwrap_or(());
                }
                fs::write(m.p("zz_new"), "n").unwrap();
            }
            let ent = libc::readdir(d);
            if ent.is_null() {
                break;
            }
            let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr())
                .to_string_lossy()
                .into_owned();
            if name != "." && name != ".." {
                seen.push(name);
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), seen.len(), "no entry repeated");
        for i in (0..100).chain(150..300) {
            assert!(seen.contains(&format!("f{i:03}")), "f{i:03} skipped");
        }
        // seekdir back to a told position gives the same continuation.
        libc::seekdir(d, pos_at_100);
        let ent = libc::readdir(d);
        let name = std::ffi::CStr::from_ptr((*ent).d_name.as_ptr())
            .to_string_lossy()
            .into_owned();
        assert_eq!(name, seen[100]);
        libc::closedir(d);
    }
}

#[test]
fn non_utf8_names_and_name_limits() {
    let m = Mounted::new(|l| {
        fs::write(l.join(OsStr::from_bytes(b"lower-\xff\xfe")), "bin").unwrap();
    });
    let bad = m.mnt.join(OsStr::from_bytes(b"caf\xe9"));
    fs::write(&bad, "x").unwrap();
    assert_eq!(fs::read_to_string(&bad).unwrap(), "x");
    let listed: Vec<Vec<u8>> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().as_bytes().to_vec())
        .collect();
    assert!(listed.contains(&b"caf\xe9".to_vec()));
    assert!(listed.contains(&b"lower-\xff\xfe".to_vec()));
    let ok = "n".repeat(255);
    fs::write(m.p(&ok), "x").unwrap();
    let long = "n".repeat(256);
    assert_eq!(
        fs::write(m.p(&long), "x").unwrap_err().raw_os_error(),
        Some(libc::ENAMETOOLONG)
    );
    // Paths up to PATH_MAX: build 40 levels of 100-char names with relative mkdir.
    let comp = "d".repeat(100);
    let mut p = m.mnt.clone();
    for _ in 0..40 {
        p.push(&comp);
    }
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && for i in $(seq 40); do mkdir {comp} && cd {comp} || exit 1; done; echo deep > f && cat f",
            m.mnt.display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "deep\n");
    assert!(p.as_os_str().len() > 4000);
}

#[test]
fn timestamps_follow_posix() {
    let m = Mounted::new(lower_tree);
    let f = m.p("stamp");
    fs::write(&f, "1").unwrap();
    let a = fs::metadata(&f).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::OpenOptions::new()
        .append(true)
        .open(&f)
        .unwrap()
        .write_all(b"2")
        .unwrap();
    let b = fs::metadata(&f).unwrap();
    assert!(
        b.mtime_nsec() != a.mtime_nsec() || b.mtime() > a.mtime(),
        "write updates mtime"
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::set_permissions(&f, fs::Permissions::from_mode(0o640)).unwrap();
    let c2 = fs::metadata(&f).unwrap();
    assert!(
        (c2.ctime(), c2.ctime_nsec()) > (b.ctime(), b.ctime_nsec()),
        "chmod updates ctime"
    );
    assert_eq!(
        (c2.mtime(), c2.mtime_nsec()),
        (b.mtime(), b.mtime_nsec()),
        "chmod keeps mtime"
    );
    let d0 = fs::metadata(&m.mnt).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(m.p("another"), "x").unwrap();
    let d1 = fs::metadata(&m.mnt).unwrap();
    assert!(
        (d1.mtime(), d1.mtime_nsec()) > (d0.mtime(), d0.mtime_nsec()),
        "create updates dir mtime"
    );
}

#[test]
fn fifo_socket_and_devices() {
    let m = Mounted::new(|_| {});
    let fifo = c(&m.p("fifo"));
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::metadata(m.p("fifo")).unwrap().file_type()
    ));
    let sock = std::os::unix::net::UnixListener::bind(m.p("sock")).unwrap();
    drop(sock);
    assert!(std::os::unix::fs::FileTypeExt::is_socket(
        &fs::symlink_metadata(m.p("sock")).unwrap().file_type()
    ));
    let dev = c(&m.p("null"));
    assert_eq!(
        unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) },
        0
    );
    assert_eq!(
        fs::metadata(m.p("null")).unwrap().rdev(),
        libc::makedev(1, 3)
    );
    // char 0/0 is the whiteout format, never a user's file.
    let wh = c(&m.p("wh"));
    assert_eq!(
        unsafe { libc::mknod(wh.as_ptr(), libc::S_IFCHR | 0o666, 0) },
        -1
    );
}

#[test]
fn multiple_lowers_merge_top_first() {
    let root = tempfile::tempdir().unwrap();
    let (l1, l2, up, wk, mnt) = (
        root.path().join("l1"),
        root.path().join("l2"),
        root.path().join("up"),
        root.path().join("wk"),
        root.path().join("mnt"),
    );
    for d in [&l1, &l2, &up, &wk, &mnt] {
        fs::create_dir(d).unwrap();
    }
    fs::create_dir(l1.join("d")).unwrap();
    fs::create_dir(l2.join("d")).unwrap();
    fs::write(l1.join("d/top"), "1").unwrap();
    fs::write(l2.join("d/bottom"), "2").unwrap();
    fs::write(l1.join("same"), "from l1").unwrap();
    fs::write(l2.join("same"), "from l2").unwrap();
    fs::write(l2.join("gone"), "x").unwrap();
    fs::write(l1.join(".wh.gone"), "").unwrap();
    let mut ofs = ovl::OverlayFS::new(&l1);
    ofs.add_lower(&l2)
        .set_upper(&up)
        .set_workdir(&wk)
        .set_mountpoint(&mnt);
    ofs.mount().unwrap();
    assert_eq!(names(&mnt.join("d")), ["bottom", "top"]);
    assert_eq!(fs::read_to_string(mnt.join("same")).unwrap(), "from l1");
    assert!(!mnt.join("gone").exists());
    assert_eq!(names(&mnt), ["d", "same"]);
    fs::remove_file(mnt.join("d/bottom")).unwrap();
    assert_eq!(names(&mnt.join("d")), ["top"]);
    ofs.umount().unwrap();
}

#[test]
fn read_only_without_upper() {
    let root = tempfile::tempdir().unwrap();
    let l = root.path().join("l");
    let mnt = root.path().join("m");
    fs::create_dir(&l).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(l.join("f"), "ro").unwrap();
    let mut ofs = ovl::OverlayFS::new(&l);
    ofs.set_mountpoint(&mnt);
    ofs.mount().unwrap();
    assert_eq!(fs::read_to_string(mnt.join("f")).unwrap(), "ro");
    assert_eq!(
        fs::write(mnt.join("g"), "x").unwrap_err().raw_os_error(),
        Some(libc::EROFS)
    );
    ofs.umount().unwrap();
}

#[test]
fn upper_is_kernel_overlayfs_compatible() {
    if !is_root() {
        return;
    }
    let mut m = Mounted::new(lower_tree);
    fs::remove_file(m.p("file")).unwrap();
    fs::remove_dir_all(m.p("dir")).unwrap();
    fs::create_dir(m.p("dir")).unwrap();
    fs::write(m.p("dir/new"), "n").unwrap();
    fs::write(m.p("link2"), "l2").unwrap();
    let ours = names(&m.mnt);
    m.umount();
    {
        let kmnt = m.root.path().join("kmnt");
        fs::create_dir(&kmnt).unwrap();
        let _k = KernelMount::new(&[&m.lower], &m.upper, &m.work, &kmnt);
        assert_eq!(names(&kmnt), ours);
        assert_eq!(names(&kmnt.join("dir")), ["new"]);
        // And the other way: changes made by the kernel are read by ovl.
        fs::remove_file(kmnt.join("link")).unwrap();
        fs::create_dir(kmnt.join("kdir")).unwrap();
    }
    m.mount();
    assert_eq!(names(&m.mnt), ["dangling", "dir", "kdir", "link2"]);
}

#[test]
fn bad_input_is_refused_without_changes() {
    let root = tempfile::tempdir().unwrap();
    let l = root.path().join("l");
    fs::create_dir(&l).unwrap();
    let before = names(root.path());
    let cases: Vec<(ovl::OverlayFS, &str)> = vec![
        {
            let mut o = ovl::OverlayFS::new(root.path().join("missing"));
            o.set_mountpoint(root.path().join("m1"));
            (o, "missing")
        },
        {
            let mut o = ovl::OverlayFS::new(&l);
            o.set_upper(l.join("up"))
                .set_mountpoint(root.path().join("m2"));
            (o, "overlaps lower")
        },
        {
            let mut o = ovl::OverlayFS::new(&l);
            o.set_upper(root.path().join("u"))
                .set_mountpoint(l.join("m"));
            (o, "mount point overlaps")
        },
        {
            let mut o = ovl::OverlayFS::new(&l);
            o.set_mountpoint(&l);
            (o, "mount point overlaps")
        },
    ];
    for (mut o, want) in cases {
        let e = o.mount().unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
        assert!(!e.contains('\n'));
    }
    assert_eq!(names(root.path()), before, "nothing created");
    assert!(names(&l).is_empty());
}

#[test]
fn copy_file_range_seek_data_hole_and_statfs() {
    use std::os::fd::AsRawFd;
    let m = Mounted::new(|l| fs::write(l.join("src"), vec![b'x'; 10_000]).unwrap());
    let src = fs::File::open(m.p("src")).unwrap();
    let dst = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.p("dst"))
        .unwrap();
    let (mut off_in, mut off_out) = (1000i64, 0i64);
    let n = unsafe {
        libc::copy_file_range(
            src.as_raw_fd(),
            &mut off_in,
            dst.as_raw_fd(),
            &mut off_out,
            5000,
            0,
        )
    };
    assert_eq!(n, 5000);
    drop(dst);
    assert_eq!(fs::read(m.p("dst")).unwrap(), vec![b'x'; 5000]);
    assert_eq!(fs::read(m.upper.join("dst")).unwrap().len(), 5000);

    // A sparse file: data at 0 and at 1 MiB, a hole between.
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.p("sparse"))
        .unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", 1 << 20).unwrap();
    f.sync_all().unwrap();
    let fd = f.as_raw_fd();
    let hole = unsafe { libc::lseek(fd, 0, libc::SEEK_HOLE) };
    assert!(hole > 0 && hole < 1 << 20, "first hole at {hole}");
    let data = unsafe { libc::lseek(fd, hole, libc::SEEK_DATA) };
    assert!(data > hole && data <= 1 << 20, "data again at {data}");

    let mut sv = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    let p = c(&m.mnt);
    assert_eq!(unsafe { libc::statvfs(p.as_ptr(), sv.as_mut_ptr()) }, 0);
    let sv = unsafe { sv.assume_init() };
    assert_eq!(sv.f_namemax, 255);
    assert!(sv.f_blocks > 0);
}

#[test]
fn entries_made_over_aufs_markers_hide_what_the_marker_hid() {
    let mut m = Mounted::new(|l| {
        fs::create_dir(l.join("d")).unwrap();
        fs::write(l.join("d/old"), "lower").unwrap();
        fs::write(l.join("f"), "lower").unwrap();
    });
    m.umount();
    fs::write(m.upper.join(".wh.d"), "").unwrap();
    fs::write(m.upper.join(".wh.f"), "").unwrap();
    m.mount();
    assert!(names(&m.mnt).is_empty());
    assert!(fs::symlink_metadata(m.p("d")).is_err());
    // A new directory where the marker hid a lower one must not merge it.
    fs::create_dir(m.p("d")).unwrap();
    assert!(names(&m.p("d")).is_empty());
    fs::write(m.p("f"), "new").unwrap();
    assert_eq!(fs::read_to_string(m.p("f")).unwrap(), "new");
    assert_eq!(names(&m.mnt), ["d", "f"]);
    // The markers went with the new entries; a fresh mount shows the same.
    m.umount();
    assert!(!m.upper.join(".wh.d").exists() && !m.upper.join(".wh.f").exists());
    m.mount();
    assert!(names(&m.p("d")).is_empty());
    assert_eq!(fs::read_to_string(m.p("f")).unwrap(), "new");
    // Removing them again hides the lower entries (a whiteout, as the lower ones exist).
    fs::remove_dir(m.p("d")).unwrap();
    fs::remove_file(m.p("f")).unwrap();
    assert!(names(&m.mnt).is_empty());
}

#[test]
fn new_directory_lookups_skip_no_marker() {
    // A directory made through the mount is known to hold no `.wh.` markers; names created,
    // removed and re-created in it behave as anywhere else.
    let m = Mounted::new(|l| {
        fs::create_dir(l.join("d")).unwrap();
        fs::write(l.join("d/x"), "lower").unwrap();
    });
    fs::create_dir(m.p("n")).unwrap();
    for i in 0..3 {
        fs::write(m.p("n").join("a"), format!("{i}")).unwrap();
        assert_eq!(fs::read_to_string(m.p("n/a")).unwrap(), format!("{i}"));
        fs::remove_file(m.p("n/a")).unwrap();
        assert!(fs::symlink_metadata(m.p("n/a")).is_err());
    }
    // A copied-up directory: the lower name is hidden by a whiteout, then re-created.
    assert_eq!(names(&m.p("d")), ["x"]);
    fs::remove_file(m.p("d/x")).unwrap();
    assert!(names(&m.p("d")).is_empty());
    fs::write(m.p("d/x"), "upper").unwrap();
    assert_eq!(fs::read_to_string(m.p("d/x")).unwrap(), "upper");
    fs::rename(m.p("d/x"), m.p("n/y")).unwrap();
    assert!(names(&m.p("d")).is_empty());
    assert_eq!(names(&m.p("n")), ["y"]);
}

#[test]
fn file_capabilities_absence_is_not_remembered_past_a_setxattr() {
    // ovl answers "no security.capability" from the inode once it has seen none (the kernel
    // asks before every write); setting one must show at once.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let m = Mounted::new(|l| fs::write(l.join("f"), "x").unwrap());
    let f = m.p("f");
    for _ in 0..2 {
        assert_eq!(xattr_get(&f, "security.capability"), None);
    }
    fs::write(&f, "written").unwrap();
    assert_eq!(xattr_get(&f, "security.capability"), None);
    // VFS_CAP_REVISION_2: magic, then (permitted, inheritable) for each of 2 words.
    let mut cap = 0x0200_0000u32.to_le_bytes().to_vec();
    cap.extend_from_slice(&[0x0020_0000u32.to_le_bytes(), [0; 4], [0; 4], [0; 4]].concat());
    xattr_set(&f, "security.capability", &cap).unwrap();
    assert_eq!(
        xattr_get(&f, "security.capability").as_deref(),
        Some(&cap[..])
    );
    let c = CString::new(f.as_os_str().as_bytes()).unwrap();
    assert_eq!(
        unsafe { libc::removexattr(c.as_ptr(), c"security.capability".as_ptr()) },
        0
    );
    assert_eq!(xattr_get(&f, "security.capability"), None);
}

#[test]
fn ioctl_on_a_file_is_not_a_tty() {
    // isatty() on every opened file (Python does it per import) must get ENOTTY, as on a
    // plain file, for lower and for upper files alike.
    use std::os::fd::AsRawFd;
    let m = Mounted::new(|l| fs::write(l.join("low"), b"x").unwrap());
    fs::write(m.p("up"), b"y").unwrap();
    for name in ["low", "up"] {
        let f = fs::File::open(m.p(name)).unwrap();
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TCGETS, &mut t) };
        assert_eq!(r, -1, "{name}");
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOTTY),
            "{name}"
        );
    }
}

#[test]
fn a_new_file_never_takes_over_a_replaced_file_still_held_by_the_kernel() {
    // The kernel may hold an overlay inode after its file was replaced (here an inotify watch
    // holds it; otherwise until the FORGET arrives). The upper filesystem is free to give the
    // replaced file's real inode number to the next file created: that file must get a new
    // overlay inode, not the old one with its cached attributes and pages.
    use std::os::unix::ffi::OsStrExt;
    let m = Mounted::new(|_| {});
    for i in 0..200 {
        let f = m.p("f");
        fs::write(&f, format!("old {i}")).unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), format!("old {i}"));
        let old_ino = fs::metadata(&f).unwrap().ino();
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        let cf = CString::new(f.as_os_str().as_bytes()).unwrap();
        assert!(unsafe { libc::inotify_add_watch(fd, cf.as_ptr(), libc::IN_ATTRIB) } >= 0);
        fs::write(m.p("tmp"), b"replacement").unwrap();
        fs::rename(m.p("tmp"), &f).unwrap();
        let g = m.p(&format!("g{i}"));
        let text = format!("brand new file {i}");
        fs::write(&g, &text).unwrap();
        assert_eq!(fs::read_to_string(&g).unwrap(), text);
        assert_eq!(fs::read_to_string(&f).unwrap(), "replacement");
        let new_ino = fs::metadata(&g).unwrap().ino();
        assert_ne!(
            new_ino, old_ino,
            "round {i}: g took over the replaced file's inode"
        );
        unsafe { libc::close(fd) };
        fs::remove_file(&g).unwrap();
    }
}

/// A file handle of `p` (name_to_handle_at), as the raw struct bytes with room for the handle.
fn file_handle(p: &Path) -> Vec<u64> {
    let mut buf = vec![0u64; 32];
    let h = buf.as_mut_ptr().cast::<libc::file_handle>();
    unsafe { (*h).handle_bytes = 128 }; // MAX_HANDLE_SZ
    let mut mount_id = 0;
    let r = unsafe { libc::name_to_handle_at(libc::AT_FDCWD, c(p).as_ptr(), h, &mut mount_id, 0) };
    assert_eq!(r, 0, "{}: {}", p.display(), std::io::Error::last_os_error());
    buf
}

#[test]
fn file_handles_reconnect_directories_through_their_parents() {
    // NFS export and open_by_handle_at: a directory inode the kernel still holds (here through
    // an inotify watch) but whose dentries were dropped is reconnected by looking up ".." in
    // it, up to the root. ".." and "." must name the overlay's own directories, never the real
    // layer directory above.
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if !is_root() {
        return; // open_by_handle_at needs CAP_DAC_READ_SEARCH
    }
    let m = Mounted::new(|l| fs::create_dir_all(l.join("low/deep")).unwrap());
    fs::create_dir_all(m.p("up/deep")).unwrap();
    let root = fs::File::open(&m.mnt).unwrap();
    for rel in ["up/deep", "low/deep"] {
        let p = m.p(rel);
        let ino = fs::metadata(&p).unwrap().ino();
        let mut handle = file_handle(&p);
        let watch = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        let watch = unsafe { OwnedFd::from_raw_fd(watch) };
        assert!(
            unsafe { libc::inotify_add_watch(watch.as_raw_fd(), c(&p).as_ptr(), libc::IN_ATTRIB) }
                >= 0
        );
        // Drop unused dentries (the watched inode stays).
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        let fd = unsafe {
            libc::open_by_handle_at(
                root.as_raw_fd(),
                handle.as_mut_ptr().cast(),
                libc::O_RDONLY | libc::O_DIRECTORY,
            )
        };
        assert!(fd >= 0, "{rel}: {}", std::io::Error::last_os_error());
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let shown = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert_eq!(shown, p, "{rel}");
        let f = fs::File::from(fd);
        assert_eq!(f.metadata().unwrap().ino(), ino, "{rel}");
        // The tree still works below and above the reconnected directory.
        fs::write(p.join("x"), b"1").unwrap();
        assert_eq!(names(p.parent().unwrap()), vec!["deep".to_string()]);
        assert_eq!(names(&m.mnt), vec!["low".to_string(), "up".to_string()]);
    }
}

/// mtime and ctime as a program asking only for them (`stat -c '%Y %Z'`) sees them: a statx
/// without the atime bit, which the kernel's mmap invalidates.
fn times(p: &Path) -> (i64, u32, i64, u32) {
    let mut x: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c(p).as_ptr(),
            0,
            libc::STATX_MTIME | libc::STATX_CTIME,
            &mut x,
        )
    };
    assert_eq!(r, 0, "statx {}", p.display());
    (
        x.stx_mtime.tv_sec,
        x.stx_mtime.tv_nsec,
        x.stx_ctime.tv_sec,
        x.stx_ctime.tv_nsec,
    )
}

/// A write through a shared mapping advances mtime and ctime in the merged view, as in the
/// real file (with passthrough the mapping is the real file's, so no request reaches ovl: the
/// kernel must not keep answering from attributes cached before the open).
#[test]
fn shared_mapping_write_advances_times() {
    for io in Io::ALL {
        let m = Mounted::with_io(InodeMode::Virtual, io, |l| {
            fs::write(l.join("lower"), vec![b'l'; 4096]).unwrap();
        });
        fs::write(m.p("upper"), vec![b'u'; 4096]).unwrap();
        for name in ["upper", "lower"] {
            let p = m.p(name);
            // Old times, then a stat that caches them.
            let old = fs::FileTimes::new()
                .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200));
            fs::File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_times(old)
                .unwrap();
            let before = times(&p);
            std::thread::sleep(std::time::Duration::from_millis(20));
            let f = fs::File::options().read(true).write(true).open(&p).unwrap();
            unsafe {
                use std::os::fd::AsRawFd;
                let a = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                );
                assert_ne!(a, libc::MAP_FAILED);
                let b = a.cast::<u8>();
                assert_eq!(b.read_volatile(), name.as_bytes()[0]);
                b.write_volatile(b'M');
                assert_eq!(libc::msync(a, 4096, libc::MS_SYNC), 0);
                libc::munmap(a, 4096);
            }
            let open = times(&p);
            drop(f);
            let closed = times(&p);
            let real = fs::metadata(m.upper.join(name)).unwrap();
            let real = (
                real.mtime(),
                real.mtime_nsec() as u32,
                real.ctime(),
                real.ctime_nsec() as u32,
            );
            let what = format!("{name}, {io:?}");
            assert!(real.0 > before.0 + 3600, "{what}: real mtime {real:?}");
            assert_eq!(open, real, "{what}: while open (before {before:?})");
            assert_eq!(closed, real, "{what}: after close (before {before:?})");
            let data = fs::read(&p).unwrap();
            assert_eq!(&data[..2], [b'M', name.as_bytes()[0]], "{what}");
        }
    }
}

/// A handle opened on a lower file (an image's, read in place, under
/// tests/posix_image_lower.rs) and closed after the file was copied up and opened again must
/// not end the io mode of the copy's handles: a later writable open still works and reads
/// and writes the same file as every other handle.
#[test]
fn handles_across_a_copy_up_keep_the_io_mode_consistent() {
    let m = Mounted::new(|l| fs::write(l.join("f"), "lower").unwrap());
    let a = fs::File::open(m.p("f")).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(m.p("f"))
        .unwrap()
        .write_all(b"+b")
        .unwrap();
    let mut c = fs::File::open(m.p("f")).unwrap();
    drop(a);
    let mut d = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.p("f"))
        .unwrap();
    d.seek(SeekFrom::End(0)).unwrap();
    d.write_all(b"+d").unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    assert_eq!(s, "lower+b+d");
    assert_eq!(fs::read_to_string(m.upper.join("f")).unwrap(), "lower+b+d");
}
