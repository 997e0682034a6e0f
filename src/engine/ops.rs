//! What one FUSE request does, independent of how it reached us. Two fronts call these
//! functions: fuser's `Filesystem` (`fs`, requests read from /dev/fuse) and the io_uring
//! transport (`uring`, requests taken from the kernel's ring). Each front only decodes
//! arguments and encodes these plain results, so both answer every request the same way.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fuser::{FileAttr, FileType};

use crate::engine::attr::SetAttr;
use crate::engine::dir::Creator;
use crate::engine::file::{OpenDir, OpenFile, OpenMode};
use crate::engine::inode::Inode;
use crate::engine::lower::Real;
use crate::engine::overlay::Overlay;
use crate::engine::xattr::XattrReply;

/// `max_write` asked for at init. The ring's payload buffers are sized from it, so both live
/// here.
pub(crate) const MAX_WRITE: u32 = 1 << 20;
/// `max_readahead` asked for at init (fuser derives `max_pages` from the larger of the two).
pub(crate) const MAX_READAHEAD: u32 = 1 << 20;

/// `FOPEN_*` bits of an open reply (include/uapi/linux/fuse.h).
pub(crate) const FOPEN_KEEP_CACHE: u32 = 1 << 1;
pub(crate) const FOPEN_CACHE_DIR: u32 = 1 << 3;
pub(crate) const FOPEN_PASSTHROUGH: u32 = 1 << 7;

/// `FUSE_DEV_IOC_BACKING_OPEN`: `_IOW(229, 1, struct fuse_backing_map)` (16 bytes).
const BACKING_OPEN: libc::c_ulong = 0x4010_e501;
/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, u32)`.
const BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// A passthrough registration of a real file with the kernel, closed when the last handle
/// using it goes. Ours rather than fuser's `BackingId`, which only fuser's reply objects can
/// make: the ring front has none. Registration is an ioctl on any descriptor of the connection.
#[derive(Debug)]
pub struct Backing {
    conn: Arc<OwnedFd>,
    id: u32,
}

impl Backing {
    fn open(conn: &Arc<OwnedFd>, fd: &OwnedFd) -> io::Result<Backing> {
        // struct fuse_backing_map { s32 fd; u32 flags; u64 padding; }
        let mut map = [0u8; 16];
        map[..4].copy_from_slice(&fd.as_raw_fd().to_ne_bytes());
        // SAFETY: the ioctl reads the 16-byte map, which lives across the call.
        let id = unsafe { libc::ioctl(conn.as_raw_fd(), BACKING_OPEN, map.as_ptr()) };
        if id < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Backing {
            conn: conn.clone(),
            id: id as u32,
        })
    }

    /// The id the kernel gave the registration (goes into the open reply).
    pub fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        // SAFETY: the ioctl reads one u32. After the connection ended it fails: nothing to do.
        let r = unsafe { libc::ioctl(self.conn.as_raw_fd(), BACKING_CLOSE, &self.id) };
        if r != 0 {
            log::debug!(
                "closing passthrough id {}: {}",
                self.id,
                io::Error::last_os_error()
            );
        }
    }
}

/// An entry reply (lookup, mknod, mkdir, symlink, link, create, readdirplus): attributes as
/// the kernel is to see them, how long it may cache them and the name, and the generation.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub attr: FileAttr,
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    pub generation: u64,
}

/// An open reply: the handle, `FOPEN_*` flags (without `FOPEN_PASSTHROUGH`) and the
/// passthrough registration, if any.
#[derive(Debug)]
pub struct Opened {
    pub fh: u64,
    pub flags: u32,
    pub backing: Option<Arc<Backing>>,
}

/// The operations, over one mounted overlay and its FUSE connection.
#[derive(Debug)]
pub struct Ops {
    pub ov: Arc<Overlay>,
    /// A descriptor of the connection, for passthrough registrations.
    conn: Arc<OwnedFd>,
}

type Res<T> = io::Result<T>;

impl Ops {
    pub fn new(ov: Arc<Overlay>, conn: Arc<OwnedFd>) -> Ops {
        Ops { ov, conn }
    }

    /// The generation of the node id in `attr` (see [`Overlay::generation`]); 0 for the
    /// root, which the kernel made itself with generation 0 (another one would make it take
    /// the root for a reused node id and mark it bad).
    fn generation(&self, attr: &FileAttr) -> u64 {
        if attr.ino.0 == crate::engine::inode::ROOT_INO {
            0
        } else {
            self.ov.generation.into()
        }
    }

    /// An entry whose attributes may be cached like its name (new directories, symlinks and
    /// nodes).
    fn entry_plain(&self, attr: FileAttr) -> Entry {
        Entry {
            attr: self.ov.idmap.show(attr),
            attr_ttl: self.ov.ttl,
            entry_ttl: self.ov.ttl,
            generation: self.generation(&attr),
        }
    }

    /// An entry whose attribute timeout depends on how the file is open (see `attr_ttl`).
    fn entry(&self, attr: FileAttr) -> Entry {
        Entry {
            attr_ttl: self.ov.attr_ttl(&attr),
            ..self.entry_plain(attr)
        }
    }

    /// Who a new entry belongs to: the caller's ids as stored on disk (through the mount's id
    /// mapping), with the mode asked for.
    fn creator(&self, uid: u32, gid: u32, mode: u32) -> Creator {
        Creator {
            uid: self.ov.idmap.uid_to_disk(uid),
            gid: self.ov.idmap.gid_to_disk(gid),
            mode,
        }
    }

    fn passthrough(&self) -> bool {
        self.ov.passthrough.load(Ordering::Relaxed)
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Res<Entry> {
        // "." is how the kernel asks for a node it forgot when a file handle names it.
        let found = if name == "." {
            self.ov.lookup_handle(parent)
        } else {
            self.ov.lookup(parent, name)
        };
        match found {
            Ok((_, attr)) => Ok(self.entry(attr)),
            // A negative entry (node id 0) with a TTL: the kernel caches "no such name", so
            // repeated probes (PATH and import searches) stay in the kernel. Every create goes
            // through us, and the kernel replaces the negative dentry itself.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // SAFETY: a stat of zeros is a valid value.
                let mut attr =
                    crate::engine::overlay::attr_from_stat(0, &unsafe { std::mem::zeroed() });
                attr.kind = FileType::RegularFile;
                Ok(self.entry_plain(attr))
            }
            Err(e) => Err(e),
        }
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        self.ov.inodes.forget(ino, nlookup);
    }

    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Res<(FileAttr, Duration)> {
        let attr = self.ov.getattr(ino, fh)?;
        Ok((self.ov.idmap.show(attr), self.ov.attr_ttl(&attr)))
    }

    /// `req` carries the caller's ids as the kernel sent them; mapped to disk here.
    pub fn setattr(&self, ino: u64, mut req: SetAttr) -> Res<(FileAttr, Duration)> {
        req.uid = req.uid.map(|u| self.ov.idmap.uid_to_disk(u));
        req.gid = req.gid.map(|g| self.ov.idmap.gid_to_disk(g));
        let attr = self.ov.setattr(ino, req)?;
        Ok((self.ov.idmap.show(attr), self.ov.attr_ttl(&attr)))
    }

    pub fn readlink(&self, ino: u64) -> Res<Vec<u8>> {
        self.ov.readlink(ino)
    }

    pub fn mknod(
        &self,
        (uid, gid): (u32, u32),
        parent: u64,
        name: &OsStr,
        mode: u32,
        rdev: u32,
    ) -> Res<Entry> {
        let who = self.creator(uid, gid, mode);
        Ok(self.entry_plain(self.ov.mknod(parent, name, who, rdev)?.1))
    }

    pub fn mkdir(
        &self,
        (uid, gid): (u32, u32),
        parent: u64,
        name: &OsStr,
        mode: u32,
    ) -> Res<Entry> {
        let who = self.creator(uid, gid, mode);
        Ok(self.entry_plain(self.ov.mkdir(parent, name, who)?.1))
    }

    pub fn symlink(
        &self,
        (uid, gid): (u32, u32),
        parent: u64,
        name: &OsStr,
        target: &OsStr,
    ) -> Res<Entry> {
        let who = self.creator(uid, gid, 0);
        Ok(self.entry_plain(self.ov.symlink(parent, name, target, who)?.1))
    }

    pub fn unlink(&self, parent: u64, name: &OsStr) -> Res<()> {
        self.ov.unlink(parent, name)
    }

    pub fn rmdir(&self, parent: u64, name: &OsStr) -> Res<()> {
        self.ov.rmdir(parent, name)
    }

    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Res<()> {
        self.ov.rename(parent, name, newparent, newname, flags)
    }

    pub fn link(&self, ino: u64, newparent: u64, newname: &OsStr) -> Res<Entry> {
        Ok(self.entry(self.ov.link(ino, newparent, newname)?.1))
    }

    /// How an open of `ino` is served: passthrough when negotiated (a new registration of
    /// `fd`, or the inode's existing one), else our cached I/O.
    fn open_mode(
        &self,
        ino: u64,
        fd: &OwnedFd,
        read_only: bool,
        known: Option<&libc::stat>,
    ) -> Res<OpenMode> {
        if self.passthrough() {
            self.ov.files.open_mode(ino, fd, read_only, known, |fd| {
                Backing::open(&self.conn, fd)
            })
        } else {
            Ok(OpenMode::Cached)
        }
    }

    /// Registers the handle and says how the kernel is to use it.
    fn insert(&self, inode: Arc<Inode>, fd: Real, mode: OpenMode, writable: bool) -> Opened {
        let backing = match mode {
            OpenMode::Passthrough(id) => Some(id),
            OpenMode::Cached => None,
        };
        let f = OpenFile::new(inode, fd, backing.clone(), writable);
        let fh = self.ov.files.insert_file(f);
        // The mount owns its layers, so cached pages stay valid across opens.
        let flags = if backing.is_some() {
            0
        } else {
            FOPEN_KEEP_CACHE
        };
        Opened { fh, flags, backing }
    }

    pub fn open(&self, ino: u64, flags: i32, pid: u32) -> Res<Opened> {
        let (inode, fd, known) = self.ov.open(ino, flags, pid)?;
        let read_only = !crate::engine::file::wants_write(flags);
        let mode = match &fd {
            Real::Fd(f) => self.open_mode(ino, f, read_only, known.as_ref())?,
            // Served by us from the image, through the page cache (keep_cache: an image
            // never changes under a mount).
            Real::Img { .. } if self.passthrough() => self.ov.files.open_cached(ino)?,
            Real::Img { .. } => OpenMode::Cached,
        };
        let opened = self.insert(inode, fd, mode, !read_only);
        if opened.backing.is_some() && !read_only {
            // Attributes the kernel cached before this open would stay valid through writes
            // to a shared mapping: drop them (see `attr_ttl`).
            self.ov.invalidate_attrs(ino);
        }
        Ok(opened)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        self.ov.read(fh, offset, size)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_suidgid: bool) -> Res<u32> {
        self.ov.write(fh, offset, data, kill_suidgid)
    }

    /// Nothing to do on close (no locks kept, writes are already in the real file): ENOSYS
    /// tells the kernel never to send FLUSH again, one round trip less per close.
    pub fn flush(&self) -> Res<()> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    pub fn release(&self, fh: u64) {
        self.ov.files.remove_file(fh, self.passthrough());
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Res<()> {
        if self.ov.no_sync {
            return Ok(());
        }
        self.ov.fsync(fh, datasync)
    }

    pub fn opendir(&self, ino: u64) -> Res<Opened> {
        let inode = self.ov.inode(ino)?;
        if !inode.is_dir() {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        let fh = self.ov.files.insert_dir(OpenDir {
            inode,
            entries: Default::default(),
        });
        Ok(Opened {
            fh,
            flags: FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR,
            backing: None,
        })
    }

    /// Lists from `offset`; `add(ino, next offset, kind, name)` returns true when full.
    pub fn readdir(
        &self,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> Res<()> {
        self.ov.readdir_entries(fh, offset, add)
    }

    /// Lists with attributes from `offset`; `add(next offset, name, entry)` returns true when
    /// full (the kernel takes a lookup reference on every entry it receives but `.`/`..`).
    pub fn readdirplus(
        &self,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(u64, &OsStr, &Entry) -> bool,
    ) -> Res<()> {
        self.ov
            .readdirplus_entries(fh, offset, &mut |off, name, attr| {
                let e = if attr.kind == FileType::RegularFile {
                    self.entry(*attr)
                } else {
                    self.entry_plain(*attr)
                };
                add(off, name, &e)
            })
    }

    pub fn releasedir(&self, fh: u64) {
        self.ov.files.remove_dir(fh);
    }

    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> Res<()> {
        if self.ov.no_sync {
            return Ok(());
        }
        self.ov.fsyncdir(fh, datasync)
    }

    pub fn statfs(&self) -> Res<libc::statvfs> {
        self.ov.statfs()
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Res<()> {
        self.ov.setxattr(ino, name, value, flags)
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> Res<XattrReply> {
        self.ov.getxattr(ino, name, size)
    }

    pub fn listxattr(&self, ino: u64, size: u32) -> Res<XattrReply> {
        self.ov.listxattr(ino, size)
    }

    pub fn removexattr(&self, ino: u64, name: &OsStr) -> Res<()> {
        self.ov.removexattr(ino, name)
    }

    /// Permissions are checked by the kernel (default_permissions); only existence here.
    pub fn access(&self, ino: u64) -> Res<()> {
        self.ov.inode(ino).map(|_| ())
    }

    pub fn create(
        &self,
        (uid, gid): (u32, u32),
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
    ) -> Res<(Entry, Opened)> {
        let who = self.creator(uid, gid, mode);
        let (inode, attr, fd, st) = self.ov.create(parent, name, who, flags)?;
        let writable = crate::engine::file::wants_write(flags);
        let mode = self.open_mode(inode.ino, &fd, false, Some(&st))?;
        let opened = self.insert(inode, Real::Fd(fd), mode, writable);
        Ok((self.entry(attr), opened))
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Res<()> {
        self.ov.fallocate(fh, offset, length, mode)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> Res<i64> {
        self.ov.lseek(fh, offset, whence)
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        offset_in: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
    ) -> Res<u32> {
        self.ov
            .copy_file_range(fh_in, offset_in, fh_out, offset_out, len)
    }

    /// No ioctls are served (as on a plain file: "not a tty").
    pub fn ioctl(&self) -> Res<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTTY))
    }

    /// The connection descriptor (the ring transport's commands go to it).
    pub fn conn(&self) -> &Arc<OwnedFd> {
        &self.conn
    }
}
