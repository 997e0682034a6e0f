//! File handles: `name_to_handle_at` + `open_by_handle_at` on live, linked files of the merged
//! tree, also after the kernel forgot their inodes (dropped caches), as an NFS server or a
//! fanotify listener uses them.

mod common;
use common::*;

use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use ovl::InodeMode;

/// `struct file_handle` with room for any handle FUSE makes.
#[repr(C)]
struct Handle {
    bytes: u32,
    kind: i32,
    data: [u8; 128],
}

fn handle_of(p: &Path) -> std::io::Result<Handle> {
    let mut h = Handle {
        bytes: 128,
        kind: 0,
        data: [0; 128],
    };
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut mount_id = 0;
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            c.as_ptr(),
            &mut h as *mut Handle,
            &mut mount_id as *mut i32,
            0,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(h)
}

fn open_handle(mnt: &fs::File, h: &Handle) -> std::io::Result<fs::File> {
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mnt.as_raw_fd(),
            h as *const Handle,
            libc::O_RDONLY,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(unsafe { fs::File::from_raw_fd(fd as i32) })
}

/// Makes the kernel drop unused dentries and inodes, so it sends FORGET for ours.
fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
}

#[test]
fn handles_open_live_files_after_caches_drop() {
    if !is_root() {
        eprintln!("open_by_handle_at needs CAP_DAC_READ_SEARCH; run the suite as root");
        return;
    }
    for mode in [InodeMode::Virtual, InodeMode::Persistent] {
        let m = Mounted::with_mode(mode, |l| {
            fs::create_dir_all(l.join("d/e")).unwrap();
            fs::write(l.join("f"), "lower f").unwrap();
            fs::write(l.join("d/g"), "lower g").unwrap();
            fs::write(l.join("d/e/h"), "lower h").unwrap();
            fs::write(l.join("gone"), "x").unwrap();
        });
        fs::write(m.p("new"), "upper new").unwrap();
        fs::create_dir(m.p("nd")).unwrap();
        // (path when the handle is taken, path it is checked against, content or "" for a dir)
        let cases = [
            ("f", "f", "lower f"),
            ("d", "d", ""),
            ("d/e", "d/e", ""),
            ("new", "new", "upper new"),
            ("nd", "nd", ""),
            ("d/g", "d/g", "lower g, more"),
            ("d/e/h", "moved-h", "lower h"),
        ];
        let handles: Vec<Handle> = cases
            .iter()
            .map(|(p, _, _)| handle_of(&m.p(p)).unwrap())
            .collect();
        let gone = handle_of(&m.p("gone")).unwrap();
        // After the handles were taken: a copy-up, a rename, a deletion.
        fs::write(m.p("d/g"), "lower g, more").unwrap();
        fs::rename(m.p("d/e/h"), m.p("moved-h")).unwrap();
        fs::remove_file(m.p("gone")).unwrap();
        let mnt = fs::File::open(&m.mnt).unwrap();
        for round in 0..2 {
            if round == 1 {
                drop_caches();
            }
            for ((taken, now, content), h) in cases.iter().zip(&handles) {
                let what = format!("{taken} ({mode:?}, round {round})");
                let mut f = open_handle(&mnt, h).unwrap_or_else(|e| panic!("{what}: {e}"));
                let (a, b) = (f.metadata().unwrap(), fs::metadata(m.p(now)).unwrap());
                assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()), "{what}");
                if !content.is_empty() {
                    let mut s = String::new();
                    f.read_to_string(&mut s).unwrap();
                    assert_eq!(&s, content, "{what}");
                }
            }
            assert_eq!(
                errno(&open_handle(&mnt, &gone)),
                libc::ESTALE,
                "deleted file, round {round}"
            );
        }
    }
}

/// A handle from an earlier mount never opens another file: virtual inode numbers start over
/// on every mount, so its number may now name a different file; the mount's generation, which
/// the kernel checks, differs.
#[test]
fn handles_from_an_earlier_mount_are_stale() {
    if !is_root() {
        eprintln!("open_by_handle_at needs CAP_DAC_READ_SEARCH; run the suite as root");
        return;
    }
    let mut m = Mounted::with_mode(InodeMode::Virtual, |l| {
        fs::write(l.join("a"), "a").unwrap();
        fs::write(l.join("b"), "b").unwrap();
    });
    fs::metadata(m.p("b")).unwrap();
    let h = handle_of(&m.p("b")).unwrap();
    // The root's handle keeps working: the kernel made the root itself.
    let root = handle_of(&m.mnt).unwrap();
    m.remount();
    // `a` now gets the number `b` had.
    let ino_a = fs::metadata(m.p("a")).unwrap().ino();
    let mnt = fs::File::open(&m.mnt).unwrap();
    match open_handle(&mnt, &h) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}"),
        Ok(f) => panic!(
            "opened inode {} (a is {ino_a}) through b's handle from the earlier mount",
            f.metadata().unwrap().ino()
        ),
    }
    let r = open_handle(&mnt, &root).unwrap();
    assert_eq!(r.metadata().unwrap().ino(), 1);
    // Every name still resolves after the root was handed out again.
    assert_eq!(fs::read_to_string(m.p("b")).unwrap(), "b");
}
