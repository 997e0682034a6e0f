//! Shared test harness: real FUSE mounts in private temp dirs (tests run in parallel).
#![allow(dead_code)]

pub mod backend;
pub mod ops;
pub mod sys;
pub mod user;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ovl::{InodeMode, OverlayFS};
use tempfile::TempDir;

/// A test overlay: `root/lower`, `root/upper`, `root/work`, mounted at `root/mnt`.
pub struct Mounted {
    pub root: TempDir,
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub mnt: PathBuf,
    pub mode: InodeMode,
    /// FUSE passthrough asked for (else the kernel page cache sits in front of ovl's I/O).
    pub passthrough: bool,
    /// The lower is read from `root/lower.img`, packed from `lower` when the test mounted
    /// (see [`lower_image_default`]); `lower` stays as it was.
    pub image: bool,
    /// The kernel's writeback cache asked for (used when passthrough is not).
    pub writeback: bool,
    ofs: Option<OverlayFS>,
}

/// Whether test mounts use passthrough: yes, unless `OVL_TEST_PASSTHROUGH=0` (to run a whole
/// suite in the mode unprivileged users get).
pub fn passthrough_default() -> bool {
    std::env::var("OVL_TEST_PASSTHROUGH").map_or(true, |v| v != "0")
}

/// Whether test mounts ask for the writeback cache: `OVL_TEST_WRITEBACK=1` (with
/// `OVL_TEST_PASSTHROUGH=0`, where it takes effect).
pub fn writeback_default() -> bool {
    std::env::var("OVL_TEST_WRITEBACK").is_ok_and(|v| v == "1")
}

/// Whether test mounts read their lower from an image packed from the lower directory (the
/// way app.run serves its tree) instead of the directory itself: `OVL_TEST_LOWER=image`, or
/// a test binary named `*image_lower*` (tests/posix_image_lower.rs runs the POSIX suite so).
pub fn lower_image_default() -> bool {
    std::env::var("OVL_TEST_LOWER").is_ok_and(|v| v == "image")
        || std::env::current_exe().is_ok_and(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("image_lower"))
        })
}

/// Whether test mounts are served over FUSE-over-io_uring: `OVL_URING=1` (which the library
/// reads itself), or a test binary named `*uring*` (tests/posix_uring.rs runs the POSIX suite
/// so). Where the kernel offers it (root, `enable_uring` on), a mount that asked for the ring
/// must have got it, so such a suite cannot pass on /dev/fuse by accident.
pub fn uring_default() -> bool {
    std::env::var("OVL_URING").is_ok_and(|v| v == "1")
        || std::env::current_exe().is_ok_and(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains("uring"))
        })
}

/// Whether this machine serves FUSE over io_uring for us (root, Linux 6.14+, enabled).
pub fn uring_available() -> bool {
    (unsafe { libc::geteuid() }) == 0
        && std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
            .is_ok_and(|v| v.trim() == "Y")
}

/// Packs directory `dir` into image file `img` (the bundle image format), every core.
pub fn pack_image(dir: &Path, img: &Path) {
    let f = std::fs::File::create(img).unwrap();
    ovl::image::write_image(dir, &f, 0, &Default::default()).expect("packing the lower");
}

/// The three ways ovl can serve file I/O, for tests that cover each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Io {
    Passthrough,
    Cached,
    Writeback,
}

impl Io {
    pub const ALL: [Io; 3] = [Io::Passthrough, Io::Cached, Io::Writeback];

    /// Applies this mode to a mount being configured.
    pub fn apply(self, ofs: &mut OverlayFS) {
        ofs.set_passthrough(self == Io::Passthrough)
            .set_writeback_cache(self == Io::Writeback);
    }
}

impl Mounted {
    /// Creates the layers, lets `setup` fill the lower, and mounts.
    pub fn new(setup: impl FnOnce(&Path)) -> Self {
        Self::with_mode(InodeMode::Virtual, setup)
    }

    pub fn with_mode(mode: InodeMode, setup: impl FnOnce(&Path)) -> Self {
        Self::with(mode, passthrough_default(), setup)
    }

    pub fn with(mode: InodeMode, passthrough: bool, setup: impl FnOnce(&Path)) -> Self {
        Self::with_io(
            mode,
            if passthrough {
                Io::Passthrough
            } else {
                Io::Cached
            },
            setup,
        )
    }

    pub fn with_io(mode: InodeMode, io: Io, setup: impl FnOnce(&Path)) -> Self {
        Self::with_lower_kind(mode, io, lower_image_default(), setup)
    }

    /// [`Mounted::with_io`]; `image`: the lower is read from an image packed from it.
    pub fn with_lower_kind(
        mode: InodeMode,
        io: Io,
        image: bool,
        setup: impl FnOnce(&Path),
    ) -> Self {
        let (passthrough, writeback) = match io {
            Io::Passthrough => (passthrough_default(), writeback_default()),
            Io::Cached => (false, false),
            Io::Writeback => (false, true),
        };
        let root = tempfile::Builder::new()
            .prefix("ovl-test")
            .tempdir()
            .unwrap();
        let lower = root.path().join("lower");
        let upper = root.path().join("upper");
        let work = root.path().join("work");
        let mnt = root.path().join("mnt");
        for d in [&lower, &upper, &work, &mnt] {
            std::fs::create_dir(d).unwrap();
        }
        setup(&lower);
        if image {
            pack_image(&lower, &root.path().join("lower.img"));
        }
        let mut m = Mounted {
            root,
            lower,
            upper,
            work,
            mnt,
            mode,
            passthrough,
            image,
            writeback,
            ofs: None,
        };
        m.mount();
        m
    }

    /// What the mount reads as its lower: the image file, or the lower directory.
    pub fn lower_layer(&self) -> PathBuf {
        if self.image {
            self.root.path().join("lower.img")
        } else {
            self.lower.clone()
        }
    }

    /// Path inside the mount.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn mount(&mut self) {
        let mut ofs = if self.image {
            OverlayFS::with_lower(ovl::engine::lower::LowerSource::Image {
                path: self.root.path().join("lower.img"),
                offset: 0,
                owner: None,
            })
        } else {
            OverlayFS::new(&self.lower)
        };
        ofs.set_upper(&self.upper)
            .set_workdir(&self.work)
            .set_mountpoint(&self.mnt)
            .set_inode_mode(self.mode)
            .set_passthrough(self.passthrough)
            .set_writeback_cache(self.writeback);
        let uring = uring_default();
        if uring {
            ofs.set_uring(true);
        }
        ofs.mount().expect("mount");
        if uring && uring_available() {
            let h = ofs.handle().expect("mounted");
            assert!(
                h.uring_active(),
                "asked for FUSE over io_uring, got /dev/fuse"
            );
        }
        self.ofs = Some(ofs);
    }

    pub fn umount(&mut self) {
        if let Some(mut o) = self.ofs.take() {
            o.umount().expect("umount");
        }
    }

    pub fn remount(&mut self) {
        self.umount();
        self.mount();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut o) = self.ofs.take() {
            let _ = o.umount();
        }
    }
}

/// A kernel overlayfs mount (the reference), unmounted on drop.
pub struct KernelMount {
    pub mnt: PathBuf,
}

impl KernelMount {
    pub fn new(lowers: &[&Path], upper: &Path, work: &Path, mnt: &Path) -> Self {
        Self::with_options(lowers, upper, work, mnt, "")
    }

    /// Mounts with extra overlay options (e.g. `index=on`, the kernel mode whose hard-link
    /// semantics ovl follows: all names of a lower file stay one file after copy-up).
    pub fn with_options(
        lowers: &[&Path],
        upper: &Path,
        work: &Path,
        mnt: &Path,
        extra: &str,
    ) -> Self {
        let lower = lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "{extra}{}lowerdir={lower},upperdir={},workdir={}",
                if extra.is_empty() { "" } else { "," },
                upper.display(),
                work.display()
            ))
            .arg(mnt)
            .status()
            .expect("run mount");
        assert!(st.success(), "kernel overlay mount failed");
        KernelMount {
            mnt: mnt.to_path_buf(),
        }
    }
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// errno of an io::Error (0 for success).
pub fn errno<T>(r: &std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Polls `f` until it gives a value; fails the test after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `p` is a mount point (exactly, in this mount namespace).
pub fn is_mounted(p: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let s = p.display().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(s.as_str()))
}
