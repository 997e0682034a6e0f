//! The FUSE front: a thin dispatch from fuser's `Filesystem` trait into the operation modules.
//! No overlay logic lives here, only argument conversion and replies.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::engine::attr::SetAttr;
use crate::engine::dir::Creator;
use crate::engine::file::{OpenDir, OpenFile, OpenMode};
use crate::engine::inode::Inode;
use crate::engine::lower::Real;
use crate::engine::overlay::Overlay;
use crate::engine::xattr::XattrReply;

fn err(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

/// The `fuser::Filesystem` implementation over a shared [`Overlay`].
#[derive(Debug)]
pub struct OverlayFs(pub Arc<Overlay>);

impl OverlayFs {
    /// Answers a mknod, mkdir or symlink with the entry it made.
    fn reply_new_entry<T>(&self, made: std::io::Result<(T, fuser::FileAttr)>, reply: ReplyEntry) {
        match made {
            Ok((_, attr)) => reply.entry(
                &self.0.ttl,
                &self.0.idmap.show(attr),
                self.generation(&attr),
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    /// Who a new entry belongs to: the caller's ids as stored on disk (through the mount's id
    /// mapping), with the mode asked for.
    fn creator(&self, req: &Request, mode: u32) -> Creator {
        Creator {
            uid: self.0.idmap.uid_to_disk(req.uid()),
            gid: self.0.idmap.gid_to_disk(req.gid()),
            mode,
        }
    }

    /// The generation of the node id in `attr` (see [`Overlay::generation`]); 0 for the
    /// root, which the kernel made itself with generation 0 (another one would make it take
    /// the root for a reused node id and mark it bad).
    fn generation(&self, attr: &fuser::FileAttr) -> Generation {
        if attr.ino.0 == crate::engine::inode::ROOT_INO {
            Generation(0)
        } else {
            Generation(self.0.generation.into())
        }
    }

    fn passthrough(&self) -> bool {
        self.0.passthrough.load(Ordering::Relaxed)
    }

    /// How an open of `ino` is served (passthrough when negotiated, else our cached I/O).
    fn open_mode(
        &self,
        ino: u64,
        fd: &OwnedFd,
        read_only: bool,
        known: Option<&libc::stat>,
        register: impl FnOnce(&OwnedFd) -> io::Result<fuser::BackingId>,
    ) -> io::Result<OpenMode> {
        if self.passthrough() {
            self.0.files.open_mode(ino, fd, read_only, known, register)
        } else {
            Ok(OpenMode::Cached)
        }
    }

    /// Registers the handle; returns it with its open flags and passthrough id.
    fn insert(
        &self,
        inode: Arc<Inode>,
        fd: Real,
        mode: OpenMode,
        writable: bool,
    ) -> (FileHandle, FopenFlags, Option<Arc<fuser::BackingId>>) {
        let backing = match mode {
            OpenMode::Passthrough(id) => Some(id),
            OpenMode::Cached => None,
        };
        let f = OpenFile::new(inode, fd, backing.clone(), writable);
        let fh = FileHandle(self.0.files.insert_file(f));
        // The mount owns its layers, so cached pages stay valid across opens.
        let flags = if backing.is_some() {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        };
        (fh, flags, backing)
    }

    fn reply_open(
        &self,
        inode: Arc<Inode>,
        fd: Real,
        read_only: bool,
        known: Option<&libc::stat>,
        reply: ReplyOpen,
    ) {
        let ino = inode.ino;
        let mode = match &fd {
            Real::Fd(f) => self.open_mode(ino, f, read_only, known, |fd| reply.open_backing(fd)),
            // Served by us from the image, through the page cache (keep_cache: an image
            // never changes under a mount).
            Real::Img { .. } if self.passthrough() => self.0.files.open_cached(ino),
            Real::Img { .. } => Ok(OpenMode::Cached),
        };
        match mode {
            Ok(mode) => match self.insert(inode, fd, mode, !read_only) {
                (fh, flags, Some(id)) => {
                    if !read_only {
                        // Attributes the kernel cached before this open would stay valid
                        // through writes to a shared mapping: drop them (see `attr_ttl`).
                        self.0.invalidate_attrs(ino);
                    }
                    reply.opened_passthrough(fh, flags, &id)
                }
                (fh, flags, None) => reply.opened(fh, flags),
            },
            Err(e) => reply.error(err(e)),
        }
    }
}

impl Filesystem for OverlayFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Readdirplus for every listing: entries arrive with attributes (one round trip for
        // `ls -l`/`find`), and every listed name gets a real inode number.
        let wanted = [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_EXPORT_SUPPORT,
            InitFlags::FUSE_HANDLE_KILLPRIV_V2,
        ];
        for f in wanted {
            let _ = config.add_capabilities(f);
        }
        if self.0.want_passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.0.passthrough.store(true, Ordering::Relaxed);
        } else if self.0.want_writeback {
            // Refused: with the kernel's writeback cache write() succeeds as soon as the data
            // is in the page cache, and a full upper fails only the later write-back (the
            // error shows at fsync or close, the data is gone). ENOSPC must come from
            // write(), so every write is served synchronously instead.
            log::warn!(
                "the writeback cache is not used: it cannot report a full upper from write()"
            );
        }
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        // "." is how the kernel asks for a node it forgot when a file handle names it.
        let found = if name == "." {
            self.0.lookup_handle(parent.0)
        } else {
            self.0.lookup(parent.0, name)
        };
        match found {
            Ok((_, attr)) => reply.entry_with_ttls(
                &self.0.attr_ttl(&attr),
                &self.0.ttl,
                &self.0.idmap.show(attr),
                self.generation(&attr),
            ),
            // A negative entry (node id 0) with a TTL: the kernel caches "no such name", so
            // repeated probes (PATH and import searches) stay in the kernel. Every create goes
            // through us, and the kernel replaces the negative dentry itself.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let mut attr =
                    crate::engine::overlay::attr_from_stat(0, &unsafe { std::mem::zeroed() });
                attr.kind = fuser::FileType::RegularFile;
                reply.entry(
                    &self.0.ttl,
                    &self.0.idmap.show(attr),
                    self.generation(&attr),
                )
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.0.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(attr) => reply.attr(&self.0.attr_ttl(&attr), &self.0.idmap.show(attr)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let req = SetAttr {
            mode,
            uid: uid.map(|u| self.0.idmap.uid_to_disk(u)),
            gid: gid.map(|g| self.0.idmap.gid_to_disk(g)),
            size,
            atime,
            mtime,
            fh: fh.map(|f| f.0),
            pid: req.pid(),
        };
        match self.0.setattr(ino.0, req) {
            Ok(attr) => reply.attr(&self.0.attr_ttl(&attr), &self.0.idmap.show(attr)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.0.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let who = self.creator(req, mode);
        self.reply_new_entry(self.0.mknod(parent.0, name, who, rdev), reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let who = self.creator(req, mode);
        self.reply_new_entry(self.0.mkdir(parent.0, name, who), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.0.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.0.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let who = self.creator(req, 0);
        self.reply_new_entry(
            self.0.symlink(parent.0, link_name, target.as_os_str(), who),
            reply,
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self
            .0
            .rename(parent.0, name, newparent.0, newname, flags.bits())
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        match self.0.link(ino.0, newparent.0, newname) {
            Ok((_, attr)) => reply.entry_with_ttls(
                &self.0.attr_ttl(&attr),
                &self.0.ttl,
                &self.0.idmap.show(attr),
                self.generation(&attr),
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (inode, fd, known) = match self.0.open(ino.0, flags.0, req.pid()) {
            Ok(x) => x,
            Err(e) => return reply.error(err(e)),
        };
        let read_only = !crate::engine::file::wants_write(flags.0);
        self.reply_open(inode, fd, read_only, known.as_ref(), reply);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.0.read(fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(err(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let kill = write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        match self.0.write(fh.0, offset, data, kill) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do on close (no locks kept, writes are already in the real file):
        // ENOSYS tells the kernel never to send FLUSH again, one round trip less per close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.0.files.remove_file(fh.0, self.passthrough());
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.0.no_sync {
            return reply.ok();
        }
        match self.0.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.0.inode(ino.0) {
            Ok(inode) if inode.is_dir() => {
                let fh = self.0.files.insert_dir(OpenDir {
                    inode,
                    entries: Default::default(),
                });
                reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR,
                );
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let res = self
            .0
            .readdir_entries(fh.0, offset, &mut |ino, off, kind, name| {
                reply.add(INodeNo(ino), off, kind, name)
            });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let ttl = self.0.ttl;
        let idmap = &self.0.idmap;
        let res = self
            .0
            .readdirplus_entries(fh.0, offset, &mut |off, name, attr| {
                let ttl = if attr.kind == fuser::FileType::RegularFile {
                    self.0.attr_ttl(attr)
                } else {
                    ttl
                };
                reply.add(
                    attr.ino,
                    off,
                    name,
                    &ttl,
                    &idmap.show(*attr),
                    self.generation(attr),
                )
            });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.0.files.remove_dir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.0.no_sync {
            return reply.ok();
        }
        match self.0.fsyncdir(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.0.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                crate::engine::overlay::NAME_MAX as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(err(e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self.0.setxattr(ino.0, name, value, flags) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.0.getxattr(ino.0, name, size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.0.listxattr(ino.0, size) {
            Ok(XattrReply::Size(n)) => reply.size(n),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(err(e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.0.removexattr(ino.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions); only existence here.
        match self.0.inode(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let who = self.creator(req, mode);
        match self.0.create(parent.0, name, who, flags) {
            Ok((inode, attr, fd, st)) => {
                let ino = inode.ino;
                let writable = crate::engine::file::wants_write(flags);
                match self.open_mode(ino, &fd, false, Some(&st), |fd| reply.open_backing(fd)) {
                    Ok(mode) => {
                        let (fh, flags, id) = self.insert(inode, Real::Fd(fd), mode, writable);
                        let ttl = self.0.attr_ttl(&attr);
                        match id {
                            Some(id) => reply.created_passthrough(
                                &ttl,
                                &self.0.idmap.show(attr),
                                self.generation(&attr),
                                fh,
                                flags,
                                &id,
                            ),
                            None => reply.created(
                                &ttl,
                                &self.0.idmap.show(attr),
                                self.generation(&attr),
                                fh,
                                flags,
                            ),
                        }
                    }
                    Err(e) => reply.error(err(e)),
                }
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.0.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.0.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(err(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self
            .0
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(err(e)),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        // No ioctls are served (as on a plain file: "not a tty"). Answered here rather than by
        // fuser's default, which logs a warning for every one: every `isatty` on an open file
        // (Python asks for each module it imports) would write a log line.
        reply.error(Errno::ENOTTY);
    }
}
