//! The overlay's shared state and the helpers every operation module uses.
//!
//! `Overlay` owns the three pieces of state, each with one owner: the layer stack
//! ([`crate::engine::layers`]), the inode store ([`crate::engine::inode`]) and the open-file table
//! ([`crate::engine::file`]). The operation modules (`namei`, `dir`, `file`, `attr`, `xattr`,
//! `readdir`, `copy_up`) add `impl Overlay` blocks; `fs` dispatches FUSE requests to them.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType};

use crate::engine::file::FileTable;
use crate::engine::inode::{Inode, InodeMode, InodeState, InodeStore};
use crate::engine::layers::LayerStack;
use crate::engine::lower::{Real, RealRef};
use crate::engine::sys::{self, BorrowFd};

/// Result type of the operation modules: errno-carrying I/O errors.
pub type OpResult<T> = io::Result<T>;

/// The mounted overlay (everything a request handler needs).
#[derive(Debug)]
pub struct Overlay {
    pub layers: LayerStack,
    pub inodes: InodeStore,
    pub files: FileTable,
    /// How long the kernel may cache entries and attributes. The mount owns its layers (they
    /// must not change underneath it), so every change goes through us and the kernel's cache
    /// is kept exact by our replies: a long TTL is safe.
    pub ttl: Duration,
    /// We run as root: chown new entries to the caller and allow device nodes.
    pub privileged: bool,
    /// FUSE passthrough was negotiated with the kernel at init.
    pub passthrough: AtomicBool,
    /// Passthrough was asked for (it is still only used when the kernel agrees).
    pub want_passthrough: bool,
    /// The writeback cache was asked for: refused (it cannot report ENOSPC from write()),
    /// which `init` says once.
    pub want_writeback: bool,
    /// The generation of every node id this mount gives, different on every mount: the
    /// kernel puts it in file handles and refuses a handle whose generation differs, so a
    /// handle from an earlier mount (whose numbers may now name other files) gives ESTALE
    /// instead of opening another file.
    pub generation: u32,
    /// Sends notifications to the kernel (set by the session once it runs).
    pub notifier: std::sync::OnceLock<fuser::Notifier>,
    /// Owner translation at the FUSE boundary (`uidmapping=`, `squash_*`; identity by default).
    pub idmap: crate::engine::idmap::IdMap,
    /// `fsync=0` / `volatile`: fsync requests and copy-up skip syncing (faster, not crash-safe).
    pub no_sync: bool,
}

/// Returns the error for a raw errno.
pub fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Linux NAME_MAX; FUSE does not enforce it for us.
pub const NAME_MAX: usize = 255;

/// Checks a name the user wants to create: length and the reserved `.wh.` prefix.
pub fn check_new_name(name: &OsStr) -> OpResult<()> {
    if name.len() > NAME_MAX {
        return Err(errno(libc::ENAMETOOLONG));
    }
    if crate::engine::layers::is_reserved_name(name) {
        return Err(errno(libc::EINVAL));
    }
    if name.as_bytes().contains(&b'/') {
        return Err(errno(libc::EINVAL));
    }
    Ok(())
}

fn to_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new((-sec) as u64, 0) + Duration::from_nanos(nsec as u64)
    }
}

/// The FUSE file type of a `st_mode`.
pub fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// Builds the attributes shown for inode `ino` from the real entry's stat.
pub fn attr_from_stat(ino: u64, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino: fuser::INodeNo(ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: to_time(st.st_atime, st.st_atime_nsec),
        mtime: to_time(st.st_mtime, st.st_mtime_nsec),
        ctime: to_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// A generation number unlikely to repeat between mounts: the clock's nanoseconds mixed with
/// the process id, never 0 (what a mount without it would have used).
fn mount_generation() -> u32 {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let x = (t ^ (u64::from(std::process::id()) << 32)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    ((x >> 32) as u32) | 1
}

impl Overlay {
    /// Creates the overlay over an opened layer stack.
    pub fn new(
        layers: LayerStack,
        mode: InodeMode,
        want_passthrough: bool,
        want_writeback: bool,
    ) -> io::Result<Self> {
        let root = crate::engine::namei::root_entry(&layers)?;
        Ok(Overlay {
            layers,
            inodes: InodeStore::new(mode, root),
            files: FileTable::default(),
            ttl: Duration::from_secs(86400),
            privileged: unsafe { libc::geteuid() } == 0,
            passthrough: AtomicBool::new(false),
            want_passthrough,
            want_writeback,
            generation: mount_generation(),
            notifier: std::sync::OnceLock::new(),
            idmap: Default::default(),
            no_sync: false,
        })
    }

    /// Makes the kernel drop its cached attributes of `ino` (not its cached data), so the
    /// next stat asks us. Failure is harmless: the kernel may not hold the inode.
    pub fn invalidate_attrs(&self, ino: u64) {
        if let Some(n) = self.notifier.get() {
            if let Err(e) = n.inval_inode(fuser::INodeNo(ino), -1, 0) {
                log::debug!("invalidating the attributes of inode {ino}: {e}");
            }
        }
    }

    /// How long the kernel may cache these attributes: not at all while the file is open for
    /// writing through passthrough, where a write through a shared mapping changes the real
    /// file's times without any request reaching us (the kernel's overlay always asks the
    /// real inode); else [`Overlay::ttl`].
    pub fn attr_ttl(&self, attr: &FileAttr) -> Duration {
        if attr.kind == FileType::RegularFile
            && self.passthrough.load(std::sync::atomic::Ordering::Relaxed)
        {
            if let Some(inode) = self.inodes.get(attr.ino.0) {
                if inode
                    .passthrough_writers
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
                {
                    return Duration::ZERO;
                }
            }
        }
        self.ttl
    }

    /// The live inode `ino`, or ENOENT/ESTALE when the kernel sends a number we never gave.
    pub fn inode(&self, ino: u64) -> OpResult<Arc<Inode>> {
        self.inodes.get(ino).ok_or_else(|| errno(libc::ESTALE))
    }

    /// A copied-up hard-linked lower file has an extra link (its index entry) and may have
    /// names not linked up yet: show the number of names it has in the merged tree.
    pub(crate) fn fix_indexed_nlink(&self, inode: &Inode, attr: &mut FileAttr) {
        if inode.is_dir() || attr.nlink < 2 || !inode.read().has_upper() {
            return;
        }
        if let Ok(fd) = self.upper_fd(inode) {
            use crate::engine::sys::BorrowFd;
            if let Some(n) = self.indexed_nlink(fd.as_fd_borrowed(), attr.nlink as u64) {
                attr.nlink = n as u32;
            }
        }
    }

    /// The real directory holding a non-directory's entry: its parent's upper one, or the
    /// lower one of layer `layer`.
    fn entry_dir<'a>(pst: &'a InodeState, layer: Option<usize>) -> OpResult<RealRef<'a>> {
        match layer {
            None => pst.upper.as_ref().map(|u| RealRef::Fd(u.as_fd_borrowed())),
            Some(l) => pst.lowers.iter().find(|e| e.layer == l).map(|e| e.dir.r()),
        }
        .ok_or_else(|| errno(libc::ESTALE))
    }

    /// A handle on a non-directory's entry as `name` in its parent's real directory of
    /// layer `layer` (`None`: the upper).
    fn entry_real(&self, st: &InodeState, layer: Option<usize>) -> OpResult<Real> {
        let parent = st.parent.as_ref().ok_or_else(|| errno(libc::ESTALE))?;
        let cname = sys::cstr(&st.name)?;
        let pst = parent.read();
        self.layers
            .open_at(Self::entry_dir(&pst, layer)?, &cname, false)
    }

    /// Runs `f` on the shown entry of a non-directory as (its parent's real directory of that
    /// layer, name): `None` for directories, pinned files and entries of an image layer (use
    /// [`Overlay::real`]).
    pub fn with_real_at<R>(
        &self,
        inode: &Inode,
        f: impl FnOnce(std::os::fd::BorrowedFd<'_>, &std::ffi::CStr) -> OpResult<R>,
    ) -> Option<OpResult<R>> {
        let st = inode.read();
        if inode.is_dir() || st.pinned.is_some() {
            return None;
        }
        let parent = st.parent.as_ref()?;
        let cname = match sys::cstr(&st.name) {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let pst = parent.read();
        let layer = if st.in_upper { None } else { st.lower_layer() };
        match Self::entry_dir(&pst, layer).ok()? {
            RealRef::Fd(dir) => Some(f(dir, &cname)),
            RealRef::Img { .. } => None,
        }
    }

    /// Runs `f` on the upper entry of a non-directory as (parent's upper directory, name), so
    /// metadata calls are one `*at` system call with no descriptor to open. `None` when the
    /// inode is a directory, not in the upper, or pinned (no name left).
    pub fn with_upper_at<R>(
        &self,
        inode: &Inode,
        f: impl FnOnce(std::os::fd::BorrowedFd<'_>, &std::ffi::CStr) -> OpResult<R>,
    ) -> Option<OpResult<R>> {
        // `in_upper` never goes back to false, so the entry found below is the upper one.
        if !inode.read().in_upper {
            return None;
        }
        self.with_real_at(inode, f)
    }

    /// A handle on the real entry whose metadata and data are shown.
    pub fn real(&self, inode: &Inode) -> OpResult<Real> {
        let st = inode.read();
        if inode.is_dir() {
            return match st.dir_real().ok_or_else(|| errno(libc::ESTALE))? {
                RealRef::Fd(fd) => Ok(Real::Fd(fd.try_clone_to_owned()?)),
                RealRef::Img { layer, ino } => Ok(Real::Img { layer, ino }),
            };
        }
        if let Some(p) = &st.pinned {
            return p.try_clone();
        }
        if st.in_upper {
            self.entry_real(&st, None)
        } else {
            self.entry_real(&st, st.lower_layer())
        }
    }

    /// An `O_PATH` handle on the real entry whose metadata and data are shown; EIO for an
    /// entry of an image layer (which has no descriptor: see [`Overlay::real`]).
    pub fn real_fd(&self, inode: &Inode) -> OpResult<OwnedFd> {
        match self.real(inode)? {
            Real::Fd(fd) => Ok(fd),
            Real::Img { .. } => Err(errno(libc::EIO)),
        }
    }

    /// The image entry shown for `inode`, when it is one (not copied up, in an image layer).
    pub fn image_entry(&self, inode: &Inode) -> OpResult<Option<(u16, u32)>> {
        if !self.layers.has_image() || inode.read().has_upper() {
            return Ok(None);
        }
        Ok(match self.real(inode)? {
            Real::Img { layer, ino } => Some((layer, ino)),
            Real::Fd(_) => None,
        })
    }

    /// An `O_PATH` handle on the upper entry (EIO when there is none: copy up first).
    pub fn upper_fd(&self, inode: &Inode) -> OpResult<OwnedFd> {
        let st = inode.read();
        if inode.is_dir() {
            return st
                .upper
                .as_ref()
                .ok_or_else(|| errno(libc::EIO))?
                .try_clone();
        }
        if !st.in_upper {
            return Err(errno(libc::EIO));
        }
        let real = match &st.pinned {
            Some(p) => p.try_clone()?,
            None => self.entry_real(&st, None)?,
        };
        match real {
            Real::Fd(fd) => Ok(fd),
            Real::Img { .. } => Err(errno(libc::EIO)),
        }
    }

    /// A handle on the topmost lower entry (the copy-up source).
    pub fn lower_real(&self, inode: &Inode) -> OpResult<Real> {
        let st = inode.read();
        if inode.is_dir() {
            let l = st.lowers.first().ok_or_else(|| errno(libc::EIO))?;
            return l.dir.try_clone();
        }
        match (&st.pinned, st.lower_layer()) {
            (Some(p), _) if !st.in_upper => p.try_clone(),
            (_, Some(l)) => self.entry_real(&st, Some(l)),
            _ => Err(errno(libc::EIO)),
        }
    }

    /// Current attributes of an inode, from its real entry.
    pub fn stat_inode(&self, inode: &Inode) -> OpResult<FileAttr> {
        let s = {
            let st = inode.read();
            match (inode.is_dir(), &st.pinned) {
                (true, _) => self
                    .layers
                    .stat(st.dir_real().ok_or_else(|| errno(libc::ESTALE))?)?,
                (false, Some(p)) => self.layers.stat(p.r())?,
                (false, None) => {
                    // One fstatat in the parent's directory: no descriptor to open.
                    let parent = st.parent.as_ref().ok_or_else(|| errno(libc::ESTALE))?;
                    let cname = sys::cstr(&st.name)?;
                    let pst = parent.read();
                    let layer = if st.in_upper { None } else { st.lower_layer() };
                    self.layers
                        .stat_at(Self::entry_dir(&pst, layer)?, &cname)?
                        .ok_or_else(|| errno(libc::ENOENT))?
                }
            }
        };
        let st = inode.read();
        let mut attr = attr_from_stat(inode.ino, &s);
        // A merged directory's link count is unknown without counting every layer's
        // subdirectories; like the kernel, report 1 ("unknown" to find and friends).
        if inode.is_dir() && st.lowers.len() + usize::from(st.upper.is_some()) > 1 {
            attr.nlink = 1;
        }
        if st.unlinked && !st.has_upper() {
            attr.nlink = 0;
        }
        drop(st);
        self.fix_indexed_nlink(inode, &mut attr);
        Ok(attr)
    }
}
