//! Running the FUSE session: mounting an opened layer stack (by `mount(2)` or through
//! fusermount3), serving it on worker threads, and unmounting it again.
//!
//! This is the engine's lowest public entry; [`crate::OverlayFS`] builds on it (path checks,
//! upper initialisation, commit recovery).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, SessionACL};

use super::fs::{InitExtra, OverlayFs};
use super::inode::InodeMode;
use super::layers::LayerStack;
use super::ops::Ops;
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
    pub container: ContainerOptions,
    /// Serve requests over FUSE-over-io_uring (Linux 6.14+, `enable_uring` on) instead of
    /// /dev/fuse reads, where the kernel allows it; /dev/fuse otherwise. Opt-in while it is
    /// measured (see bench/uring.md).
    pub uring: bool,
}

/// The options container engines pass (fuse-overlayfs 1.10's); the default changes nothing.
#[derive(Clone, Debug, Default)]
pub struct ContainerOptions {
    /// `uidmapping=`, `gidmapping=`, `squash_to_*`, `static_nlink`.
    pub idmap: super::idmap::IdMap,
    /// `fsync=0` or `volatile`: no syncing for fsync requests or copy-up.
    pub no_sync: bool,
    /// `userxattr`: the overlay's own marks go to `user.overlay.*` even as root (the kernel's
    /// option of that name; read either way).
    pub userxattr: bool,
    /// `context=LABEL`: the SELinux label of every file, given to the kernel with the mount.
    pub context: Option<String>,
}

/// Mounts `stack` at `mountpoint` and serves it on background threads; returns when the mount
/// is live.
pub fn start(mut stack: LayerStack, mountpoint: &Path, o: &SessionOptions) -> Result<MountHandle> {
    let lower0 = mountpoint.to_path_buf();
    // trusted.* needs CAP_SYS_ADMIN in the initial user namespace: root in a user namespace
    // (rootless podman) writes the marks in user.overlay.*, as the kernel's userxattr.
    if o.container.userxattr || !initial_userns_root() {
        stack.xattr_prefix = "user.";
    }
    let mut overlay = Overlay::new(
        stack,
        o.inode_mode,
        o.passthrough && initial_userns_root(),
        o.writeback,
    )
    .map_err(|e| Error::io("reading layer roots for", lower0, e))?;
    overlay.idmap = o.container.idmap.clone();
    overlay.no_sync = o.container.no_sync;
    let overlay = Arc::new(overlay);
    let root = unsafe { libc::geteuid() } == 0;
    let mut config = Config::default();
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
    let direct = match o.method {
        MountMethod::Auto => root,
        MountMethod::Direct => true,
        MountMethod::Helper => false,
    };
    let (fd, helper) = if direct {
        match mount_direct(mountpoint, o) {
            Ok(fd) => (fd, None),
            // Not allowed here (e.g. a user namespace without its own mount namespace, or a
            // container that filters mount(2)):
            // fusermount3 may still mount for us, as fuser and libfuse fall back.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => helper_mount(mountpoint, o)?,
            Err(e) => return Err(mount_error(mountpoint, e)),
        }
    } else {
        helper_mount(mountpoint, o)?
    };
    let conn = Arc::new(fd.try_clone().map_err(|e| mount_error(mountpoint, e))?);
    let ops = Arc::new(Ops::new(overlay.clone(), conn.clone()));
    // The ring is asked for at init only when it can be served: once the kernel agreed, every
    // request waits for ring entries on all queues.
    let ring_setup = if o.uring {
        super::uring::Probe::new()
    } else {
        None
    };
    let (uring_tx, uring_rx) = std::sync::mpsc::sync_channel(1);
    let fs = OverlayFs {
        ops: ops.clone(),
        extra: InitExtra {
            uring: ring_setup.as_ref().map(|_| uring_tx),
        },
    };
    // A session made from a descriptor never unmounts by path on its own (fuser's own mount
    // would, after the kernel already ended it: see `MountHandle`).
    let session = fuser::Session::from_fd(fs, fd, config.acl, config.clone())
        .and_then(|s| s.spawn())
        .map_err(|e| mount_error(mountpoint, e))?;
    let _ = overlay.notifier.set(session.notifier());
    let ring = match ring_setup {
        Some(probe) => super::uring::start(probe, ops, uring_rx),
        None => None,
    };
    // Recorded now, while nothing else can have been mounted over ours yet: every later
    // unmount first checks the mount at the path is still this one.
    let id =
        MountId::at(mountpoint).map_err(|e| Error::io("checking the new mount", mountpoint, e))?;
    Ok(MountHandle {
        session: Some(session),
        ring,
        helper,
        mountpoint: mountpoint.to_path_buf(),
        overlay,
        id,
        conn: Some(conn),
        lingering: false,
    })
}

/// Mounts through fusermount3 (without privileges it mounts for us; it works even where
/// /dev/fuse is not open to users); returns the connection.
fn helper_mount(
    mountpoint: &Path,
    o: &SessionOptions,
) -> Result<(OwnedFd, Option<super::fusermount::HelperMount>)> {
    let mut opt = format!(
        "fsname={},subtype=ovl,default_permissions,{}",
        o.fsname,
        if o.read_only { "ro" } else { "rw" }
    );
    if o.allow_other {
        opt.push_str(",allow_other");
    }
    if let Some(c) = selinux_context(o) {
        opt.push_str(&format!(",context=\"{c}\""));
    }
    let (fd, helper) = super::fusermount::mount(mountpoint, &opt, o.auto_unmount)
        .map_err(|e| mount_error(mountpoint, e))?;
    Ok((fd, Some(helper)))
}

/// The `context=` label to give the kernel: only where SELinux is on. Elsewhere the kernel
/// refuses the option, and mount(8) drops it too (libmount does so without SELinux).
fn selinux_context(o: &SessionOptions) -> Option<&str> {
    let c = o.container.context.as_deref()?;
    if Path::new("/sys/fs/selinux/enforce").exists() {
        Some(c)
    } else {
        log::info!("SELinux is not enabled: context={c} has no effect");
        None
    }
}

/// `mount(2)` of a fresh /dev/fuse connection at `mountpoint` (root, or a user namespace with
/// its own mount namespace); returns the connection.
fn mount_direct(mountpoint: &Path, o: &SessionOptions) -> io::Result<OwnedFd> {
    use std::os::unix::fs::MetadataExt;
    let rootmode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let fd = OwnedFd::from(dev);
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={},default_permissions",
        fd.as_raw_fd(),
        rootmode,
        unsafe { libc::getuid() },
        unsafe { libc::getgid() },
    );
    if o.allow_other {
        data.push_str(",allow_other");
    }
    if let Some(c) = selinux_context(o) {
        data.push_str(&format!(",context=\"{c}\""));
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV;
    if o.suid_dev && unsafe { libc::geteuid() } == 0 {
        flags = 0;
    }
    if o.read_only {
        flags |= libc::MS_RDONLY;
    }
    let src = super::sys::cstr(std::ffi::OsStr::new(&o.fsname))?;
    let target = super::sys::cstr(mountpoint.as_os_str())?;
    let data = std::ffi::CString::new(data).expect("no NUL");
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            c"fuse.ovl".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Which mount is ours: the FUSE connection's device number and the kernel's mount id. While
/// our connection is alive its device number is taken, so a mount showing it at our path is
/// ours; the mount id (never reused where the kernel has `STATX_MNT_ID_UNIQUE`, 6.8+) tells a
/// bind mount of it apart too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MountId {
    dev: u64,
    mnt: u64,
}

impl MountId {
    /// The topmost mount at `path`, the one `umount2(path)` would remove. Asks the kernel's
    /// cache only (`AT_STATX_DONT_SYNC`): on our own mount a FUSE request from the serving
    /// process itself could wait for a thread that is not serving yet.
    fn at(path: &Path) -> io::Result<MountId> {
        let c = super::sys::cstr(path.as_os_str())?;
        let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
        let r = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                c.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT | libc::AT_STATX_DONT_SYNC,
                libc::STATX_MNT_ID_UNIQUE | libc::STATX_MNT_ID,
                stx.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let stx = unsafe { stx.assume_init() };
        Ok(MountId {
            dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
            mnt: stx.stx_mnt_id,
        })
    }
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
///
/// Only ever unmounts its own mount: once the kernel has ended the session (someone ran
/// `umount`) the path may already hold somebody else's mount, so nothing is unmounted then, and
/// before any unmount the mount at the path is checked to be still ours ([`MountId`]).
#[derive(Debug)]
pub struct MountHandle {
    session: Option<BackgroundSession>,
    /// The io_uring transport's threads, when the ring was negotiated.
    ring: Option<super::uring::Rings>,
    /// Set when fusermount3 mounted for us (unprivileged); it also unmounts.
    helper: Option<super::fusermount::HelperMount>,
    mountpoint: PathBuf,
    overlay: Arc<Overlay>,
    id: MountId,
    /// A duplicate of the session's /dev/fuse descriptor, to see whether the kernel still
    /// holds the connection (it reports an error on it once the mount is gone).
    conn: Option<Arc<OwnedFd>>,
    /// Our unmount succeeded but copies of the mount live on in other mount namespaces, so the
    /// session goes on serving them: it is never waited for (that could be forever).
    lingering: bool,
}

impl MountHandle {
    /// Where the merged tree is visible.
    pub fn mount_point(&self) -> &Path {
        &self.mountpoint
    }

    /// Whether requests are served over FUSE-over-io_uring ([`SessionOptions::uring`] asked
    /// for it and the kernel took it), not /dev/fuse.
    pub fn uring_active(&self) -> bool {
        self.ring.as_ref().is_some_and(|r| r.active())
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
        let res = match self.session.take().map(|s| s.join()) {
            Some(Err(e)) if e.raw_os_error() != Some(libc::ECONNABORTED) => {
                Err(Error::io("serving", self.mountpoint.clone(), e))
            }
            _ => Ok(()),
        };
        // Serving stopped on an error while the kernel still holds the mount: it is dead now,
        // detach it (ours only) rather than leave ENOTCONN behind.
        if res.is_err() && self.connected() {
            let _ = self.detach_if_ours();
        }
        self.finish();
        res
    }

    /// A handle another thread can use to detach this mount (e.g. on a signal), which checks
    /// first that the mount at the path is still this one.
    pub fn unmounter(&self) -> Unmounter {
        Unmounter {
            mountpoint: self.mountpoint.clone(),
            id: self.id,
            conn: self.conn.as_ref().and_then(|c| c.try_clone().ok()),
        }
    }

    /// Pids of helper processes that live as long as the mount (fusermount3 auto_unmount,
    /// the unmount watchdog).
    pub fn helper_pids(&self) -> Vec<i32> {
        self.helper.as_ref().map(|h| h.pids()).unwrap_or_default()
    }

    /// Whether the kernel still holds our FUSE connection (the mount exists, maybe detached).
    fn connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| fuse_connected(c))
    }

    /// Waits up to `limit` for the kernel to end the connection after our unmount.
    fn disconnects_within(&self, limit: std::time::Duration) -> bool {
        let Some(conn) = &self.conn else { return true };
        let start = std::time::Instant::now();
        while fuse_connected(conn) {
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// Lazily detaches the mount at our path if it is ours.
    fn detach_if_ours(&mut self) -> io::Result<()> {
        self.unmounter().detach()
    }

    /// The session is over: the helpers go, and so does our hold on the connection.
    fn finish(&mut self) {
        if let Some(h) = self.helper.as_mut() {
            h.release();
        }
        self.helper = None;
        // The connection is over, so the ring threads have ended or are ending.
        if let Some(r) = self.ring.take() {
            r.stop();
        }
        self.conn = None;
    }

    pub(crate) fn do_umount(&mut self) -> Result<()> {
        if self.session.is_none() {
            return Ok(());
        }
        // The kernel already ended the session (someone unmounted us): nothing of ours is
        // mounted any more, and whatever is at the path now belongs to someone else.
        if !self.connected() {
            return self.wait_unmounted();
        }
        if MountId::at(&self.mountpoint).ok() != Some(self.id) {
            return Err(Error::io(
                "unmounting",
                self.mountpoint.clone(),
                io::Error::other(
                    "the mount there is no longer ours (another was mounted over it, or ours \
                     was moved or detached); unmount that one first",
                ),
            ));
        }
        // Unmount first and keep the session if that fails (busy: a process still uses the
        // mount), so the caller can retry and nothing is finalized under a live mount.
        let unmounted = match self.helper.as_mut() {
            Some(h) => h.unmount(&self.mountpoint),
            None => {
                let c = super::sys::cstr(self.mountpoint.as_os_str())
                    .map_err(|e| Error::io("unmounting", self.mountpoint.clone(), e))?;
                if unsafe { libc::umount2(c.as_ptr(), libc::UMOUNT_NOFOLLOW) } == 0 {
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
        // A process that made a mount namespace while we were mounted holds a copy of the
        // mount there, which keeps the connection (and the session) alive after our unmount
        // until that copy goes. Waiting for the session could then hang forever: say who holds
        // it instead, and keep the session, so nothing is finalized while it may still write.
        if !self.disconnects_within(std::time::Duration::from_secs(3)) {
            self.lingering = true;
            return Err(Error::io(
                "unmounting",
                self.mountpoint.clone(),
                io::Error::other(format!(
                    "unmounted here, but copies of the mount live on in other mount \
                     namespaces (held by {}) and are still served: end those processes",
                    holders_of(self.id.dev)
                )),
            ));
        }
        let s = self.session.take().expect("checked above");
        let res = s.join();
        self.finish();
        // The kernel aborting the connection as the mount goes away is the session's end,
        // not a failure (fuser only treats ENODEV so).
        match res {
            Err(e) if e.raw_os_error() != Some(libc::ECONNABORTED) => {
                Err(Error::io("unmounting", self.mountpoint.clone(), e))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if self.lingering {
            // Its threads serve the other namespaces' copies until those go; joining could
            // wait forever, and the mount is no longer ours to detach.
            if let Some(s) = self.session.take() {
                std::mem::forget(s);
            }
            if let Some(r) = self.ring.take() {
                r.detach();
            }
            return;
        }
        // An explicit `umount` refuses a busy mount; a dropped handle has nobody to retry, so
        // it detaches lazily rather than leave the mount and its session behind.
        if let Err(e) = self.do_umount() {
            log::warn!("{e}; detaching lazily");
            if let Err(e) = self.detach_if_ours() {
                log::error!("detaching {}: {e}", self.mountpoint.display());
                return;
            }
            if let Some(s) = self.session.take() {
                let _ = s.join();
            }
            self.finish();
        }
    }
}

/// Detaches one mount, from any thread, only while it is still the one at its path (see
/// [`MountHandle::unmounter`]).
#[derive(Debug)]
pub struct Unmounter {
    mountpoint: PathBuf,
    id: MountId,
    conn: Option<OwnedFd>,
}

impl Unmounter {
    /// The mount point this detaches.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Lazily detaches the mount (`umount -l`; `fusermount3 -u -z` without privileges).
    /// Does nothing when the session already ended or the mount at the path is another one.
    pub fn detach(&self) -> io::Result<()> {
        if !self.conn.as_ref().is_some_and(fuse_connected) {
            return Ok(());
        }
        if MountId::at(&self.mountpoint)? != self.id {
            return Ok(());
        }
        super::fusermount::unmount_path(&self.mountpoint)
    }
}

/// Processes whose mount namespace holds a mount of device `dev`, as "pid N (comm)", a few.
fn holders_of(dev: u64) -> String {
    let key = format!(" {}:{} ", libc::major(dev), libc::minor(dev));
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(ns) = std::fs::read_link(e.path().join("ns/mnt")) else {
            continue;
        };
        if seen.contains(&ns) {
            continue;
        }
        let held = std::fs::read_to_string(e.path().join("mountinfo")).is_ok_and(|m| {
            m.lines()
                .any(|l| l.split(' ').nth(2).is_some_and(|d| key.trim() == d))
        });
        if held {
            seen.push(ns);
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            out.push(format!("pid {pid} ({})", comm.trim()));
            if out.len() == 5 {
                break;
            }
        }
    }
    if out.is_empty() {
        "a process that could not be found".into()
    } else {
        out.join(", ")
    }
}

/// Whether the kernel still holds the FUSE connection behind `fd`: it reports POLLERR on the
/// device once the connection is aborted (the mount is gone).
fn fuse_connected(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    loop {
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        if r >= 0 {
            return p.revents & libc::POLLERR == 0;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
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
