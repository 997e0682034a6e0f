//! The library's entry point: [`OverlayFS`] checks the paths, prepares the upper, finishes an
//! interrupted commit, then starts the engine's session ([`crate::engine::session`]).
//! Finalization (`overlay_action`) is in [`crate::finalize`].
//!
//! # Example
//! ```no_run
//! use ovl::{InodeMode, OverlayFS};
//! let mut ofs = OverlayFS::new("/srv/rootfs");
//! ofs.set_upper("/srv/rootfs_upper")
//!     .set_mountpoint("/mnt/merged")
//!     .set_inode_mode(InodeMode::Persistent);
//! ofs.mount()?;
//! println!("mounted at {}", ofs.handle().unwrap().mount_point().display());
//! ofs.umount()?;
//! # Ok::<(), ovl::Error>(())
//! ```

use std::io;
use std::path::{Path, PathBuf};

use crate::engine::inode::InodeMode;
use crate::engine::layers::LayerStack;
use crate::engine::lower::LowerSource;
use crate::engine::session::{self, MountHandle, MountMethod, SessionOptions};
use crate::error::{Error, Result};

/// An overlay to mount: lower layers, optional upper, mount point and options.
#[derive(Debug, Default)]
pub struct OverlayFS {
    lowers: Vec<LowerSource>,
    upper: Option<PathBuf>,
    work: Option<PathBuf>,
    mountpoint: Option<PathBuf>,
    inode_mode: InodeMode,
    allow_other: bool,
    suid_dev: bool,
    passthrough: bool,
    writeback: bool,
    fsname: Option<String>,
    threads: Option<usize>,
    /// FUSE over io_uring: `None` follows `OVL_URING` (see [`OverlayFS::set_uring`]).
    uring: Option<bool>,
    auto_unmount: bool,
    method: MountMethod,
    container: crate::engine::session::ContainerOptions,
    require_empty: bool,
    /// The mount point was chosen by [`OverlayFS::mountpoint_as_home`]: created on mount and
    /// removed after unmount.
    own_mountpoint: bool,
    handle: Option<MountHandle>,
}

/// A lower given as a directory path that is an image file (`ovl-pack --image-only`) is that
/// image, read in place.
fn image_if_file(l: &LowerSource) -> LowerSource {
    match l {
        LowerSource::Dir(p) if p.is_file() && crate::image::is_image(p) => LowerSource::Image {
            path: p.clone(),
            offset: 0,
            owner: None,
        },
        l => l.clone(),
    }
}

fn canonical(what: &str, p: &Path) -> Result<PathBuf> {
    let c = p.canonicalize().map_err(|e| {
        Error::bad(
            p,
            format!("{what} is not accessible ({e}): create it or fix the path"),
        )
    })?;
    if !c.is_dir() {
        return Err(Error::bad(
            p,
            format!("{what} is not a directory: give a directory"),
        ));
    }
    Ok(c)
}

/// Are `a` and `b` the same directory or is one inside the other?
fn overlaps(a: &Path, b: &Path) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

/// Resolves a path that may not exist yet: its nearest existing ancestor canonicalized, plus
/// the rest.
fn resolve_future(p: &Path) -> PathBuf {
    let abs = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = cur.canonicalize() {
            let mut out = c;
            for r in rest.iter().rev() {
                out.push(r);
            }
            return out;
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// The default work directory for an upper: a hidden sibling on the same filesystem.
pub fn default_workdir(upper: &Path) -> PathBuf {
    hidden_sibling(upper, ".ovl-work")
}

/// `.<name of upper><suffix>` beside the upper: where files that belong to an upper live.
pub fn hidden_sibling(upper: &Path, suffix: &str) -> PathBuf {
    let name = upper
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upper".into());
    upper
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!(".{name}{suffix}"))
}

impl OverlayFS {
    /// An overlay over one lower directory (more with [`OverlayFS::add_lower`]).
    pub fn new(lower: impl Into<PathBuf>) -> Self {
        OverlayFS {
            lowers: vec![LowerSource::Dir(lower.into())],
            passthrough: true,
            ..Default::default()
        }
    }

    /// An overlay over one lower layer of any kind: a directory, or an image read in place.
    ///
    /// ```no_run
    /// use ovl::engine::lower::LowerSource;
    /// // The tree packed by `ovl-pack DIR --image-only -o app.img`, never extracted.
    /// let mut ofs = ovl::OverlayFS::with_lower(LowerSource::Image {
    ///     path: "app.img".into(),
    ///     offset: 0,
    ///     owner: None,
    /// });
    /// ofs.set_upper("app_upper").set_mountpoint("merged");
    /// ofs.mount()?;
    /// # Ok::<(), ovl::Error>(())
    /// ```
    pub fn with_lower(lower: LowerSource) -> Self {
        OverlayFS {
            lowers: vec![lower],
            passthrough: true,
            ..Default::default()
        }
    }

    /// Adds a lower directory below the ones given so far.
    pub fn add_lower(&mut self, lower: impl Into<PathBuf>) -> &mut Self {
        self.lowers.push(LowerSource::Dir(lower.into()));
        self
    }

    /// Adds a lower layer of any kind below the ones given so far.
    pub fn add_lower_source(&mut self, lower: LowerSource) -> &mut Self {
        self.lowers.push(lower);
        self
    }

    /// Sets the writable upper directory (created if missing). Without one the mount is read-only.
    pub fn set_upper(&mut self, upper: impl Into<PathBuf>) -> &mut Self {
        self.upper = Some(upper.into());
        self
    }

    /// Sets the work directory (default: a hidden sibling of the upper, see [`default_workdir`]).
    pub fn set_workdir(&mut self, work: impl Into<PathBuf>) -> &mut Self {
        self.work = Some(work.into());
        self
    }

    /// Sets the mount point (created if missing).
    pub fn set_mountpoint(&mut self, mountpoint: impl Into<PathBuf>) -> &mut Self {
        self.mountpoint = Some(mountpoint.into());
        self
    }

    /// Chooses how inode numbers are assigned.
    pub fn set_inode_mode(&mut self, mode: InodeMode) -> &mut Self {
        self.inode_mode = mode;
        self
    }

    /// Lets other users (root included) access the mount (`allow_other`).
    pub fn set_allow_other(&mut self, allow: bool) -> &mut Self {
        self.allow_other = allow;
        self
    }

    /// Honours setuid bits and device nodes in the mount (root only; fuse-overlayfs does so).
    pub fn set_suid_dev(&mut self, on: bool) -> &mut Self {
        self.suid_dev = on;
        self
    }

    /// Serves requests over FUSE-over-io_uring where the kernel allows it (Linux 6.14+ with
    /// `/sys/module/fuse/parameters/enable_uring` on), else through /dev/fuse as always.
    /// Default: off, unless the environment has `OVL_URING=1` (how the test suites run
    /// under the ring).
    pub fn set_uring(&mut self, on: bool) -> &mut Self {
        self.uring = Some(on);
        self
    }

    /// Uses FUSE passthrough for open files when the kernel allows (default: on).
    pub fn set_passthrough(&mut self, on: bool) -> &mut Self {
        self.passthrough = on;
        self
    }

    /// Asks for the kernel's writeback cache (default: off). Refused, with a warning in the
    /// log: with it `write()` succeeds once the data is in the kernel's page cache, and a full
    /// upper fails only the later write-back (at fsync or close, with the data gone), so ovl
    /// serves every write itself and `write()` reports ENOSPC.
    pub fn set_writeback_cache(&mut self, on: bool) -> &mut Self {
        self.writeback = on;
        self
    }

    /// Options container engines pass (id mappings, squashing, `fsync=0`, `userxattr`,
    /// `context=`): see [`crate::engine::session::ContainerOptions`].
    pub fn set_container_options(
        &mut self,
        o: crate::engine::session::ContainerOptions,
    ) -> &mut Self {
        self.container = o;
        self
    }

    /// Sets the filesystem name shown in /proc/mounts.
    pub fn set_fsname(&mut self, name: impl Into<String>) -> &mut Self {
        self.fsname = Some(name.into());
        self
    }

    /// Unprivileged mounts only: let fusermount3 unmount as soon as this process dies, however
    /// it dies, so no dead mount (ENOTCONN) is ever left behind.
    pub fn set_auto_unmount(&mut self, on: bool) -> &mut Self {
        self.auto_unmount = on;
        self
    }

    /// Chooses how the FUSE mount is made (default: [`MountMethod::Auto`]).
    pub fn set_mount_method(&mut self, method: MountMethod) -> &mut Self {
        self.method = method;
        self
    }

    /// Refuses a mount point that is not empty (instead of hiding its content).
    pub fn set_require_empty_mountpoint(&mut self, on: bool) -> &mut Self {
        self.require_empty = on;
        self
    }

    /// Mounts at a fresh directory `$XDG_CACHE_HOME/mount_<name>_<pid>_<time>` (else under
    /// `~/.cache`), unique so parallel runs over one lower never collide; it is created on
    /// mount and removed after unmount.
    pub fn mountpoint_as_home(&mut self) -> &mut Self {
        let name = self.lowers[0]
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "root".into());
        self.mountpoint_as_home_named(&name)
    }

    /// [`OverlayFS::mountpoint_as_home`] with `name` in the directory's name instead of the
    /// first lower's (e.g. an app's name).
    pub fn mountpoint_as_home_named(&mut self, name: &str) -> &mut Self {
        let base = mountpoint_base();
        let name: String = name
            .chars()
            .map(|c| {
                if c.is_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        self.mountpoint = Some(base.join(format!("mount_{name}_{}_{ts}", std::process::id())));
        self.own_mountpoint = true;
        self
    }

    /// The mount point, once set.
    pub fn mountpoint(&self) -> Option<&Path> {
        self.mountpoint.as_deref()
    }

    /// Number of FUSE worker threads (default: one per CPU).
    pub fn set_threads(&mut self, n: usize) -> &mut Self {
        self.threads = Some(n.max(1));
        self
    }

    /// The paths of the lower layers (directories or image files), topmost first.
    pub fn lowers(&self) -> Vec<PathBuf> {
        self.lowers.iter().map(|l| l.path().to_path_buf()).collect()
    }

    /// The lower layers, topmost first.
    pub fn lower_sources(&self) -> &[LowerSource] {
        &self.lowers
    }

    /// Whether a lower layer is an image (the kernel cannot mount those, and a commit cannot
    /// write into one).
    pub fn has_image_lower(&self) -> bool {
        self.lowers.iter().any(|l| image_if_file(l).is_image())
    }

    /// The upper directory, if any.
    pub fn upper(&self) -> Option<&Path> {
        self.upper.as_deref()
    }

    /// The work directory that will be (or is) used.
    pub fn workdir(&self) -> Option<PathBuf> {
        self.work
            .clone()
            .or_else(|| self.upper.as_deref().map(default_workdir))
    }

    /// The live mount, if mounted.
    pub fn handle(&self) -> Option<&MountHandle> {
        self.handle.as_ref()
    }

    /// Takes the live mount out (to wait on it with [`MountHandle::join`]).
    pub fn take_handle(&mut self) -> Option<MountHandle> {
        self.handle.take()
    }

    /// Checks every path without changing anything on disk. Returns the canonical lower
    /// directories.
    pub fn validate(&self) -> Result<Vec<PathBuf>> {
        self.validate_sources().map(|(dirs, _)| dirs)
    }

    /// [`OverlayFS::validate`], also returning every lower layer canonicalized.
    fn validate_sources(&self) -> Result<(Vec<PathBuf>, Vec<LowerSource>)> {
        if self.lowers.is_empty() {
            return Err(Error::bad(
                "",
                "no lower directory given: pass at least one",
            ));
        }
        let mut lowers = Vec::new();
        let mut sources = Vec::new();
        for l in &self.lowers {
            match &image_if_file(l) {
                LowerSource::Dir(l) => {
                    let c = canonical("lower directory", l)?;
                    if let Err(e) = std::fs::read_dir(&c) {
                        return Err(Error::bad(
                            l,
                            format!("lower directory is not readable ({e}): fix its permissions"),
                        ));
                    }
                    sources.push(LowerSource::Dir(c.clone()));
                    lowers.push(c);
                }
                LowerSource::Image {
                    path,
                    offset,
                    owner,
                } => {
                    let c = path.canonicalize().map_err(|e| {
                        Error::bad(
                            path,
                            format!("lower image is not accessible ({e}): fix the path"),
                        )
                    })?;
                    if let Err(e) = std::fs::File::open(&c) {
                        return Err(Error::bad(
                            path,
                            format!("lower image is not readable ({e}): fix its permissions"),
                        ));
                    }
                    sources.push(LowerSource::Image {
                        path: c,
                        offset: *offset,
                        owner: *owner,
                    });
                }
                LowerSource::Opened { .. } => sources.push(l.clone()),
            }
        }
        let mut layers: Vec<(&str, PathBuf)> =
            lowers.iter().map(|l| ("lower", l.clone())).collect();
        if let Some(u) = &self.upper {
            let cu = resolve_future(u);
            for l in &lowers {
                if overlaps(&cu, l) {
                    return Err(Error::bad(
                        u,
                        format!(
                            "upper directory overlaps lower directory {}: put the upper outside every lower",
                            l.display()
                        ),
                    ));
                }
            }
            if cu.exists() && !cu.is_dir() {
                return Err(Error::bad(u, "upper is not a directory: give a directory"));
            }
            let cw = resolve_future(&self.workdir().unwrap_or_default());
            for (what, p) in layers.iter().chain([("upper", cu.clone())].iter()) {
                if overlaps(&cw, p) {
                    return Err(Error::bad(
                        &cw,
                        format!(
                            "work directory overlaps {what} directory {}: put it beside the upper",
                            p.display()
                        ),
                    ));
                }
            }
            layers.push(("upper", cu));
        }
        let m = self
            .mountpoint
            .as_ref()
            .ok_or_else(|| Error::bad("", "no mount point given: set one"))?;
        let cm = resolve_future(m);
        if cm.exists() && !cm.is_dir() {
            return Err(Error::bad(
                m,
                "mount point is not a directory: give a directory",
            ));
        }
        if self.require_empty && cm.is_dir() {
            let mut entries = std::fs::read_dir(&cm)
                .map_err(|e| Error::bad(m, format!("mount point is not readable ({e})")))?;
            if entries.next().is_some() {
                return Err(Error::bad(
                    m,
                    "mount point is not empty: give an empty or new directory",
                ));
            }
        }
        for (what, p) in &layers {
            if overlaps(&cm, p) {
                return Err(Error::bad(
                    m,
                    format!(
                        "mount point overlaps {what} directory {}: mount outside the layers",
                        p.display()
                    ),
                ));
            }
        }
        Ok((lowers, sources))
    }

    /// Mounts the overlay; returns when the mount is live.
    ///
    /// The mount is served by threads of the calling process. Such a process must not
    /// memory-map files of its own mount for writing without passthrough: unmapping dirty
    /// pages writes them back while the kernel holds the process's memory-map lock, which the
    /// server threads need to receive them, and the process can deadlock with itself. Serve
    /// such a mount from another process (`ovl-mount`, `ovl-run`, or a child that mounts).
    pub fn mount(&mut self) -> Result<()> {
        if self.handle.is_some() {
            return Ok(());
        }
        let (_, lowers) = self.prepare_sources()?;
        let mountpoint = self.mountpoint.clone().ok_or(Error::NotMounted)?;
        let work = self.workdir();
        crate::engine::sys::raise_nofile_limit();

        let stack = LayerStack::open(&lowers, self.upper.as_deref(), work.as_deref())
            .map_err(|e| Error::io("opening layers for", lowers[0].path(), e))?;
        let opts = SessionOptions {
            inode_mode: self.inode_mode,
            read_only: self.upper.is_none(),
            allow_other: self.allow_other,
            suid_dev: self.suid_dev,
            passthrough: self.passthrough,
            writeback: self.writeback,
            fsname: self.fsname.clone().unwrap_or_else(|| "ovl".into()),
            threads: self.threads,
            uring: self
                .uring
                .unwrap_or_else(|| std::env::var_os("OVL_URING").is_some_and(|v| v == "1")),
            auto_unmount: self.auto_unmount,
            method: self.method,
            container: self.container.clone(),
        };
        self.handle = Some(session::start(stack, &mountpoint, &opts)?);
        Ok(())
    }

    /// What [`OverlayFS::mount`] does on disk before it mounts, for a caller that mounts the
    /// layers another way (ovl-run's kernel backend): checks the paths, finishes or rolls
    /// back an interrupted commit, creates the mount point, the upper (a new one gets the
    /// lower root's metadata) and the work directory. Returns the canonical lowers.
    pub fn prepare(&self) -> Result<Vec<PathBuf>> {
        self.prepare_sources().map(|(dirs, _)| dirs)
    }

    /// [`OverlayFS::prepare`], also returning every lower layer canonicalized.
    fn prepare_sources(&self) -> Result<(Vec<PathBuf>, Vec<LowerSource>)> {
        let (lowers, sources) = self.validate_sources()?;
        let mountpoint = self.mountpoint.clone().ok_or(Error::NotMounted)?;
        let work = self.workdir();
        // An interrupted commit is finished or rolled back before the layers are used.
        if let (Some(u), Some(w)) = (&self.upper, &work) {
            crate::commit::recover(w, u)?;
        }
        // First, so that a mount point we may not make changes nothing else.
        std::fs::create_dir_all(&mountpoint).map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Error::bad(
                &mountpoint,
                format!(
                    "cannot create the mount point ({e}): choose one where you may write \
                     (ovl-run --mountpoint DIR, or set XDG_CACHE_HOME)"
                ),
            ),
            _ => Error::io("creating mount point", &mountpoint, e),
        })?;
        if let Some(u) = &self.upper {
            // Missing or empty: a new upper. An existing one we cannot read is not "fresh":
            // its metadata is never overwritten (opening the layers reports the error).
            let fresh = match std::fs::read_dir(u) {
                Ok(mut d) => d.next().is_none(),
                Err(e) => e.kind() == io::ErrorKind::NotFound,
            };
            let existed = u.exists();
            std::fs::create_dir_all(u).map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => Error::bad(
                    u,
                    format!(
                        "cannot create the upper directory ({e}): choose an upper directory \
                         where you may write"
                    ),
                ),
                _ => Error::io("creating upper directory", u, e),
            })?;
            if fresh {
                // The merged root shows the upper root: a new (empty) upper gets the lower
                // root's owner, mode, times and xattrs, as a copy-up would, so the mount looks
                // like the lower and a commit carries only real changes of the root.
                let copy = || -> io::Result<()> {
                    use crate::engine::copy_up::{copy_meta, copy_xattrs, copy_xattrs_with};
                    use crate::engine::lower;
                    use crate::engine::sys::BorrowFd;
                    let ufd = crate::engine::sys::open_dir_path(u)?;
                    let st = match &sources[0] {
                        LowerSource::Dir(d) => {
                            let lfd = crate::engine::sys::open_dir_path(d)?;
                            copy_xattrs(lfd.as_fd_borrowed(), ufd.as_fd_borrowed(), false)?;
                            crate::engine::sys::fstat(lfd.as_fd_borrowed())?
                        }
                        src => {
                            let il = src
                                .open_image(0)?
                                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTDIR))?;
                            let root = crate::image::ROOT_INO;
                            copy_xattrs_with(
                                il.image.listxattr(root)?,
                                |n| lower::image_getxattr(&il, root, n),
                                ufd.as_fd_borrowed(),
                                false,
                            )?;
                            lower::image_stat(&il, root)?
                        }
                    };
                    copy_meta(ufd.as_fd_borrowed(), &st, session::initial_userns_root())
                };
                copy().map_err(|e| {
                    // Nothing is left behind: a directory made just now goes again.
                    if !existed {
                        let _ = std::fs::remove_dir(u);
                    }
                    Error::io("initialising upper directory", u, e)
                })?;
            }
        }
        if let Some(w) = &work {
            std::fs::create_dir_all(w).map_err(|e| Error::io("creating work directory", w, e))?;
        }
        Ok((lowers, sources))
    }

    /// Unmounts, if mounted (and removes a mount point made by `mountpoint_as_home`).
    /// A busy mount stays mounted (and handled here) and an error says so.
    pub fn umount(&mut self) -> Result<()> {
        if let Some(h) = self.handle.as_mut() {
            h.do_umount()?;
        }
        self.handle = None;
        if self.own_mountpoint {
            if let Some(m) = &self.mountpoint {
                // Only an empty directory goes: rmdir never removes content.
                let _ = std::fs::remove_dir(m);
            }
        }
        Ok(())
    }

    /// Takes the live mount out, for a caller that waits on it and then finalizes.
    pub fn handle_mut(&mut self) -> Option<&mut MountHandle> {
        self.handle.as_mut()
    }
}

/// Where [`OverlayFS::mountpoint_as_home`] makes mount points: `$XDG_CACHE_HOME` (else
/// `~/.cache`) when it exists or could be made, else the temporary directory (a user without
/// a home, as system accounts often are). Nothing is created here.
pub fn mountpoint_base() -> PathBuf {
    dirs::cache_dir()
        .filter(|d| could_create_in(d))
        .unwrap_or_else(std::env::temp_dir)
}

/// `dir` exists and we may write in it, or its nearest existing ancestor lets us make it.
fn could_create_in(dir: &Path) -> bool {
    let existing = dir.ancestors().find(|a| a.exists());
    existing.is_some_and(|a| {
        crate::engine::sys::cstr(a.as_os_str())
            .is_ok_and(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0)
    })
}
