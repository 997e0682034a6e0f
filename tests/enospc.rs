//! A full upper: `write()` reports ENOSPC in every I/O mode, and every byte it reported written
//! is in the upper afterwards (none silently dropped, no zero-filled holes).

mod common;
use common::*;

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A 30 MiB tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(at: &Path) -> Self {
        fs::create_dir(at).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=30m", "ovl-test-full"])
            .arg(at)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs");
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn pattern(off: usize, len: usize) -> Vec<u8> {
    (off..off + len).map(|i| (i % 251) as u8 + 1).collect()
}

#[test]
fn full_upper_reports_enospc_from_write() {
    if !is_root() {
        eprintln!("needs root to mount a small tmpfs; run the suite as root");
        return;
    }
    for io in Io::ALL {
        let t = tempfile::tempdir().unwrap();
        let small = Tmpfs::new(&t.path().join("small"));
        let (lower, mnt) = (t.path().join("lower"), t.path().join("mnt"));
        let (upper, work) = (small.0.join("upper"), small.0.join("work"));
        for d in [&lower, &mnt, &upper, &work] {
            fs::create_dir_all(d).unwrap();
        }
        let mut ofs = ovl::OverlayFS::new(&lower);
        ofs.set_upper(&upper)
            .set_workdir(&work)
            .set_mountpoint(&mnt);
        io.apply(&mut ofs);
        ofs.mount().unwrap();
        // Write until write() fails, at most twice the filesystem.
        let mut f = fs::File::create(mnt.join("f")).unwrap();
        let chunk = 64 << 10;
        let mut written = 0;
        let err = loop {
            if written >= 60 << 20 {
                break None;
            }
            match f.write(&pattern(written, chunk)) {
                Ok(n) => written += n,
                Err(e) => break Some(e),
            }
        };
        let what = format!("{io:?}, {written} bytes reported written");
        assert_eq!(
            err.as_ref().and_then(|e| e.raw_os_error()),
            Some(libc::ENOSPC),
            "{what}: {err:?}"
        );
        drop(f);
        ofs.umount().unwrap();
        let mut data = Vec::new();
        fs::File::open(upper.join("f"))
            .unwrap()
            .read_to_end(&mut data)
            .unwrap();
        assert!(data.len() >= written, "{what}, {} in the upper", data.len());
        assert!(
            data[..written] == pattern(0, written)[..],
            "{what}: data lost"
        );
    }
}
