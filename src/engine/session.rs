//! Running the FUSE session: mounting an opened layer stack (by `mount(2)` or through
//! fusermount3), serving it on worker threads, and unmounting it again.
//!
//! This is the engine's lowest public entry; [`crate::OverlayFS`] builds on it (path checks,
//! upper initialisation, commit recovery).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use super::fs::OverlayFs;
use super::inode::InodeMode;
use super::layers::LayerStack;
use super::overlay::Overlay;
use crate::error::{Error, Result};

/// How a session is mounted and served.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub inode_mode: InodeMode,
    pub read_only: bool,
    pub allow_other: bool,
    pub suid_dev: bool,
    /// FUSE passthrough where the kernel allows it (root in the initial user namespace).
    pub passthrough: bool,
    pub writeback: bool,
    pub fsname: String,
    /// Worker threads (default: one per CPU).
    pub threads: Option<usize>,
    pub auto_unmount: bool,
    pub method: MountMethod,
}

/// Mounts `stack` at `mountpoint` and serves it on background threads; returns when the mount
/// is live.
pub fn start(stack: LayerStack, mountpoint: &Path, o: &SessionOptions) -> Result<MountHandle> {
    let lower0 = mountpoint.to_path_buf();
    let overlay = Arc::new(
        Overlay::new(
            stack,
            o.inode_mode,
            o.passthrough && initial_userns_root(),
            o.writeback,
        )
        .map_err(|e| Error::io("reading layer roots for", lower0, e))?,
    );
    let root = unsafe { libc::geteuid() } == 0;
    let mut opts = vec![
        MountOption::FSName(o.fsname.clone()),
        MountOption::Subtype("ovl".into()),
        MountOption::DefaultPermissions,
    ];
    if o.read_only {
        opts.push(MountOption::RO);
    }
    if o.suid_dev && root {
        opts.push(MountOption::Suid);
        opts.push(MountOption::Dev);
    }
    let mut config = Config::default();
    config.mount_options = opts;
    config.acl = if o.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(
        o.threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
    );
    config.clone_fd = true;
    let fs = OverlayFs(overlay.clone());
    let direct = match o.method {
        MountMethod::Auto => root,
        MountMethod::Direct => true,
        MountMethod::Helper => false,
    };
    let (session, helper) = if direct {
        let s = fuser::Session::new(fs, mountpoint, &config)
            .and_then(|s| s.spawn())
            .map_err(|e| mount_error(mountpoint, e))?;
        (s, None)
    } else {
        // Without privileges fusermount3 mounts for us (it works even where /dev/fuse is
        // not open to users).
        let mut opt = format!(
            "fsname={},subtype=ovl,default_permissions,{}",
            o.fsname,
            if o.read_only { "ro" } else { "rw" }
        );
        if o.allow_other {
            opt.push_str(",allow_other");
        }
        let (fd, helper) = super::fusermount::mount(mountpoint, &opt, o.auto_unmount)
            .map_err(|e| mount_error(mountpoint, e))?;
        let s = fuser::Session::from_fd(fs, fd, config.acl, config.clone())
            .and_then(|s| s.spawn())
            .map_err(|e| mount_error(mountpoint, e))?;
        (s, Some(helper))
    };
    let _ = overlay.notifier.set(session.notifier());
    Ok(MountHandle {
        session: Some(session),
        helper,
        mountpoint: mountpoint.to_path_buf(),
        overlay,
    })
}

/// How the FUSE mount is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MountMethod {
    /// `mount(2)` as root, the fusermount3 helper otherwise.
    #[default]
    Auto,
    /// `mount(2)`: needs root or a user namespace of our own (see `ovl::launcher`).
    Direct,
    /// The setuid fusermount3 helper.
    Helper,
}

/// A live mount. Unmounts when dropped.
#[derive(Debug)]
pub struct MountHandle {
    session: Option<BackgroundSession>,
    /// Set when fusermount3 mounted for us (unprivileged); it also unmounts.
    helper: Option<super::fusermount::HelperMount>,
    mountpoint: PathBuf,
    overlay: Arc<Overlay>,
}

impl MountHandle {
    /// Where the merged tree is visible.
    pub fn mount_point(&self) -> &Path {
        &self.mountpoint
    }

    /// Number of inodes the kernel currently holds (memory grows with this, not the tree).
    pub fn live_inodes(&self) -> usize {
        self.overlay.inodes.len()
    }

    /// Unmounts and waits for the FUSE session to end.
    pub fn umount(mut self) -> Result<()> {
        self.do_umount()
    }

    /// Waits until the filesystem is unmounted by someone else (`umount`, `fusermount3 -u`).
    pub fn join(mut self) -> Result<()> {
        self.wait_unmounted()
    }

    /// Like [`MountHandle::join`], keeping the handle.
    pub fn wait_unmounted(&mut self) -> Result<()> {
        if let Some(s) = self.session.take() {
            match s.join() {
                Err(e) if e.raw_os_error() != Some(libc::ECONNABORTED) => {
                    return Err(Error::io("serving", self.mountpoint.clone(), e));
                }
                _ => {}
            }
        }
        if let Some(h) = self.helper.as_mut() {
            h.release();
        }
        self.helper = None;
        Ok(())
    }

    /// Pids of helper processes that live as long as the mount (fusermount3 auto_unmount,
    /// the unmount watchdog).
    pub fn helper_pids(&self) -> Vec<i32> {
        self.helper.as_ref().map(|h| h.pids()).unwrap_or_default()
    }

    pub(crate) fn do_umount(&mut self) -> Result<()> {
        if self.session.is_none() {
            return Ok(());
        }
        // Unmount first and keep the session if that fails (busy: a process still uses the
        // mount), so the caller can retry and nothing is finalized under a live mount.
        let unmounted = match self.helper.as_mut() {
            Some(h) => h.unmount(&self.mountpoint),
            None => {
                let c = super::sys::cstr(self.mountpoint.as_os_str())
                    .map_err(|e| Error::io("unmounting", self.mountpoint.clone(), e))?;
                if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            }
        };
        if let Err(e) = unmounted {
            let busy = e.raw_os_error() == Some(libc::EBUSY);
            return Err(Error::io(
                if busy {
                    "unmounting (still in use: close what uses it and retry)"
                } else {
                    "unmounting"
                },
                self.mountpoint.clone(),
                e,
            ));
        }
        let s = self.session.take().expect("checked above");
        let res = s.join();
        // The kernel aborting the connection as the mount goes away is the session's end,
        // not a failure (fuser only treats ENODEV so).
        let res = match res {
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
            r => r,
        };
        self.helper = None;
        res.map_err(|e| Error::io("unmounting", self.mountpoint.clone(), e))
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        // An explicit `umount` refuses a busy mount; a dropped handle has nobody to retry, so
        // it detaches lazily rather than leave the mount and its session behind.
        if let Err(e) = self.do_umount() {
            log::warn!("{e}; detaching lazily");
            if let Err(e) = super::fusermount::unmount_path(&self.mountpoint) {
                log::error!("detaching {}: {e}", self.mountpoint.display());
                return;
            }
            if let Some(s) = self.session.take() {
                let _ = s.join();
            }
            if let Some(h) = self.helper.as_mut() {
                h.release();
            }
        }
    }
}

fn mount_error(mountpoint: &Path, e: io::Error) -> Error {
    let fuse_dev_closed = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied);
    let hint = match e.raw_os_error() {
        _ if fuse_dev_closed => {
            " (/dev/fuse is not open to this user: as root run `chmod 0666 /dev/fuse`, the mode udev gives it on Debian)"
        }
        Some(libc::ENOENT) if !Path::new("/dev/fuse").exists() => {
            " (no /dev/fuse: load the fuse module or run where FUSE is available)"
        }
        Some(libc::EPERM) | Some(libc::EACCES) => {
            " (not allowed to mount: run as root, or install fuse3 for fusermount3)"
        }
        _ => "",
    };
    Error::Io {
        what: if hint.is_empty() {
            "mounting"
        } else {
            "mounting (see hint)"
        },
        path: mountpoint.to_path_buf(),
        source: io::Error::new(e.kind(), format!("{e}{hint}")),
    }
}
/// For a process that will serve a mount: at most two malloc arenas (unless the user set
/// `MALLOC_ARENA_MAX`). The request threads each allocate from their own arena by default,
/// which made the daemon's peak memory with 200 000 live inodes vary from 55 to 60 MiB between
/// runs; with two it stays near 55 MiB, no slower. Call it first thing in `main`, before threads
/// exist; a library user's allocator is left alone.
pub fn tune_allocator_for_daemon() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes glibc's allocator settings.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    }
}

/// Root in the initial user namespace: what FUSE passthrough needs (CAP_SYS_ADMIN there).
pub fn initial_userns_root() -> bool {
    let euid = unsafe { libc::geteuid() };
    euid == 0
        && std::fs::read_to_string("/proc/self/uid_map")
            .is_ok_and(|m| m.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"])
}
