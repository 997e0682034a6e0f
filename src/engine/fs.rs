//! The FUSE front for requests read from /dev/fuse: a thin dispatch from fuser's `Filesystem`
//! trait into [`Ops`]. No overlay logic lives here, only argument conversion and replies (the
//! io_uring front, `uring`, calls the same functions).

use std::ffi::OsStr;
use std::io;
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
use crate::engine::ops::{Entry, MAX_READAHEAD, MAX_WRITE, Opened, Ops};
use crate::engine::xattr::XattrReply;

fn err(e: io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn empty(r: io::Result<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(err(e)),
    }
}

fn entry(r: io::Result<Entry>, reply: ReplyEntry) {
    match r {
        Ok(e) => {
            reply.entry_with_ttls(&e.attr_ttl, &e.entry_ttl, &e.attr, Generation(e.generation))
        }
        Err(e) => reply.error(err(e)),
    }
}

fn xattr(r: io::Result<XattrReply>, reply: ReplyXattr) {
    match r {
        Ok(XattrReply::Size(n)) => reply.size(n),
        Ok(XattrReply::Data(d)) => reply.data(&d),
        Err(e) => reply.error(err(e)),
    }
}

/// What `init` is to ask of the kernel beyond the engine's usual capabilities, and where it
/// says what it got.
#[derive(Debug, Default)]
pub struct InitExtra {
    /// Ask for `FUSE_OVER_IO_URING`; the answer (whether the kernel offered it and it was
    /// taken) is sent once init ran.
    pub uring: Option<std::sync::mpsc::SyncSender<bool>>,
}

/// The `fuser::Filesystem` implementation over the shared [`Ops`].
#[derive(Debug)]
pub struct OverlayFs {
    pub ops: Arc<Ops>,
    pub extra: InitExtra,
}

impl OverlayFs {
    fn ov(&self) -> &crate::engine::overlay::Overlay {
        &self.ops.ov
    }
}

/// Sends an open reply through fuser; a passthrough registration (ours, see
/// [`crate::engine::ops::Backing`]) is lent to fuser's wrapper for the reply and taken back,
/// so only the handle's own [`crate::engine::ops::Backing`] ever closes it.
fn reply_open(o: Opened, reply: ReplyOpen) {
    let flags = FopenFlags::from_bits_retain(o.flags);
    match &o.backing {
        Some(b) => {
            // SAFETY: the id stays registered while `o.backing` lives (past this reply);
            // `into_raw` keeps fuser's wrapper from closing it.
            let id = unsafe { reply.wrap_backing(b.id()) };
            reply.opened_passthrough(FileHandle(o.fh), flags, &id);
            let _ = id.into_raw();
        }
        None => reply.opened(FileHandle(o.fh), flags),
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
        if self.ov().want_passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok()
        {
            self.ov().passthrough.store(true, Ordering::Relaxed);
        } else if self.ov().want_writeback {
            // Refused: with the kernel's writeback cache write() succeeds as soon as the data
            // is in the page cache, and a full upper fails only the later write-back (the
            // error shows at fsync or close, the data is gone). ENOSPC must come from
            // write(), so every write is served synchronously instead.
            log::warn!(
                "the writeback cache is not used: it cannot report a full upper from write()"
            );
        }
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_READAHEAD);
        if let Some(tx) = self.extra.uring.take() {
            // Not offered when enable_uring is off or the kernel is too old: the session
            // stays on /dev/fuse. fuser runs this handshake inside `Session::from_fd`, so the
            // session reads the answer right after (a buffered channel: no waiting here).
            let taken = config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            let _ = tx.send(taken);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        entry(self.ops.lookup(parent.0, name), reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.ops.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.ops.getattr(ino.0, fh.map(|f| f.0)) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
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
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh: fh.map(|f| f.0),
            pid: req.pid(),
        };
        match self.ops.setattr(ino.0, set) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.ops.readlink(ino.0) {
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
        let who = (req.uid(), req.gid());
        entry(self.ops.mknod(who, parent.0, name, mode, rdev), reply);
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
        let who = (req.uid(), req.gid());
        entry(self.ops.mkdir(who, parent.0, name, mode), reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.ops.unlink(parent.0, name), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.ops.rmdir(parent.0, name), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let who = (req.uid(), req.gid());
        let made = self
            .ops
            .symlink(who, parent.0, link_name, target.as_os_str());
        entry(made, reply);
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
        let r = self
            .ops
            .rename(parent.0, name, newparent.0, newname, flags.bits());
        empty(r, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        entry(self.ops.link(ino.0, newparent.0, newname), reply);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.ops.open(ino.0, flags.0, req.pid()) {
            Ok(o) => reply_open(o, reply),
            Err(e) => reply.error(err(e)),
        }
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
        match self.ops.read(fh.0, offset, size) {
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
        match self.ops.write(fh.0, offset, data, kill) {
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
        empty(self.ops.flush(), reply);
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
        self.ops.release(fh.0);
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
        empty(self.ops.fsync(fh.0, datasync), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.ops.opendir(ino.0) {
            Ok(o) => reply_open(o, reply),
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
        let res = self.ops.readdir(fh.0, offset, &mut |ino, off, kind, name| {
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
        let res = self.ops.readdirplus(fh.0, offset, &mut |off, name, e| {
            reply.add(
                e.attr.ino,
                off,
                name,
                &e.attr_ttl,
                &e.attr,
                Generation(e.generation),
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
        self.ops.releasedir(fh.0);
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
        empty(self.ops.fsyncdir(fh.0, datasync), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.ops.statfs() {
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
        empty(self.ops.setxattr(ino.0, name, value, flags), reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr(self.ops.getxattr(ino.0, name, size), reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr(self.ops.listxattr(ino.0, size), reply);
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.ops.removexattr(ino.0, name), reply);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        empty(self.ops.access(ino.0), reply);
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
        let (e, o) = match self
            .ops
            .create((req.uid(), req.gid()), parent.0, name, mode, flags)
        {
            Ok(x) => x,
            Err(e) => return reply.error(err(e)),
        };
        let flags = FopenFlags::from_bits_retain(o.flags);
        let generation = Generation(e.generation);
        match &o.backing {
            Some(b) => {
                // SAFETY: as in `reply_open`.
                let id = unsafe { reply.wrap_backing(b.id()) };
                reply.created_passthrough(
                    &e.attr_ttl,
                    &e.attr,
                    generation,
                    FileHandle(o.fh),
                    flags,
                    &id,
                );
                let _ = id.into_raw();
            }
            None => reply.created(&e.attr_ttl, &e.attr, generation, FileHandle(o.fh), flags),
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
        empty(self.ops.fallocate(fh.0, offset, length, mode), reply);
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
        match self.ops.lseek(fh.0, offset, whence) {
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
            .ops
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
        // Answered here rather than by fuser's default, which logs a warning for every one:
        // every `isatty` on an open file (Python asks for each module it imports) would write
        // a log line.
        match self.ops.ioctl() {
            Ok(()) => reply.ioctl(0, &[]),
            Err(e) => reply.error(err(e)),
        }
    }
}
