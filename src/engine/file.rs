//! File I/O and the open-file table.
//!
//! An open overlay file keeps the real file open for its whole life: reads and writes are one
//! `pread`/`pwrite` on a descriptor we already hold, with no path resolution per request. A
//! write-open of a lower file copies it up first and opens the upper copy, so the lower layers
//! are never written. Directory handles hold the snapshot their listing is served from.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::engine::inode::Inode;
use crate::engine::lower::{Real, RealRef};
use crate::engine::overlay::{OpResult, Overlay, errno};
use crate::engine::readdir::DirEntry;
use crate::engine::sys::{self, BorrowFd};

/// An open regular file.
#[derive(Debug)]
pub struct OpenFile {
    /// The real file: a descriptor, or (read-only) a file of an image layer.
    pub real: Real,
    /// The overlay inode number (for the passthrough registry).
    pub ino: u64,
    /// Kernel passthrough registration, released when the handle closes.
    pub backing: Option<Arc<crate::engine::ops::Backing>>,
    /// The inode, whose open count this handle holds.
    inode: Arc<Inode>,
    /// Opened on the lower file (read-only, before any copy-up).
    on_lower: bool,
    /// The upper file, opened for reading once the inode was copied up after this handle was
    /// opened: reads then see what was written since, as on one real file.
    upper: std::sync::OnceLock<OwnedFd>,
    /// Counted in the inode's `passthrough_writers` (writable, passed through).
    pub passthrough_writer: bool,
}

impl OpenFile {
    /// A handle on `inode`'s real file `fd`; counted in the inode's open files (and, when
    /// `writable` and passed through, in its passthrough writers).
    pub fn new(
        inode: Arc<Inode>,
        real: Real,
        backing: Option<Arc<crate::engine::ops::Backing>>,
        writable: bool,
    ) -> Self {
        inode.open_files.fetch_add(1, Ordering::Relaxed);
        let passthrough_writer = writable && backing.is_some();
        if passthrough_writer {
            inode.passthrough_writers.fetch_add(1, Ordering::Relaxed);
        }
        let on_lower = !inode.read().has_upper();
        OpenFile {
            real,
            ino: inode.ino,
            backing,
            inode,
            on_lower,
            upper: std::sync::OnceLock::new(),
            passthrough_writer,
        }
    }
}

impl OpenFile {
    /// The descriptor written through (EBADF for a file of an image layer, only ever opened
    /// read-only: the kernel checks the access mode before it sends us a write).
    pub fn fd(&self) -> OpResult<BorrowedFd<'_>> {
        match &self.real {
            Real::Fd(fd) => Ok(fd.as_fd_borrowed()),
            Real::Img { .. } => Err(errno(libc::EBADF)),
        }
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        self.inode.open_files.fetch_sub(1, Ordering::Relaxed);
        if self.passthrough_writer {
            self.inode
                .passthrough_writers
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// An open directory: the inode and the listing snapshot (`None` until first read).
#[derive(Debug)]
pub struct OpenDir {
    pub inode: Arc<Inode>,
    pub entries: Mutex<Option<Arc<Vec<DirEntry>>>>,
}

/// The open-file table: the one owner of every handle given to the kernel.
#[derive(Debug, Default)]
pub struct FileTable {
    next: AtomicU64,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    dirs: RwLock<HashMap<u64, Arc<OpenDir>>>,
    /// How each open inode is served when passthrough is on (see [`IoMode`]).
    io_modes: Mutex<HashMap<u64, IoMode>>,
}

/// The kernel serves an inode either through one passthrough backing file shared by all its
/// opens, or through our read/write with its page cache; it refuses to mix the two on one
/// inode. This records which one each open inode is in.
#[derive(Debug)]
enum IoMode {
    /// Passed through to the real file (dev, ino); alive while a handle holds the id.
    Passthrough((u64, u64), Weak<crate::engine::ops::Backing>),
    /// Served by us (registration failed once); the number of such handles.
    Cached(usize),
}

/// Files below this size opened read-only are served through the page cache.
const SMALL_FILE: i64 = 1 << 20;

/// How one open is to be served.
pub enum OpenMode {
    Passthrough(Arc<crate::engine::ops::Backing>),
    Cached,
}

impl FileTable {
    fn next_fh(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Decides how an open of inode `ino` on real file `fd` is served: sharing the inode's
    /// passthrough registration, or a new one from `register`, or cached when the inode is
    /// already served by us. ETXTBSY when the inode is passed through to a different real
    /// file: handles opened before a copy-up still read the lower file, and the kernel allows
    /// only one backing file per inode until they close.
    ///
    /// A small file opened read-only is served from the page cache (no registration, and
    /// later stats stay cached): passthrough pays off for large or written files only.
    pub fn open_mode(
        &self,
        ino: u64,
        fd: &OwnedFd,
        read_only: bool,
        known: Option<&libc::stat>,
        register: impl FnOnce(&OwnedFd) -> std::io::Result<crate::engine::ops::Backing>,
    ) -> OpResult<OpenMode> {
        // `known`: the caller's fresh stat of this very file (create), spares an fstat.
        let st = match known {
            Some(st) => *st,
            None => sys::fstat(fd.as_fd_borrowed())?,
        };
        let real = (st.st_dev, st.st_ino);
        let mut map = self.io_modes.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(&ino) {
            Some(IoMode::Cached(n)) => {
                *n += 1;
                return Ok(OpenMode::Cached);
            }
            Some(IoMode::Passthrough(r, weak)) => {
                if let Some(id) = weak.upgrade() {
                    return if *r == real {
                        Ok(OpenMode::Passthrough(id))
                    } else {
                        Err(errno(libc::ETXTBSY))
                    };
                }
            }
            None => {}
        }
        if read_only && st.st_size < SMALL_FILE {
            map.insert(ino, IoMode::Cached(1));
            return Ok(OpenMode::Cached);
        }
        match register(fd) {
            Ok(id) => {
                let id = Arc::new(id);
                map.insert(ino, IoMode::Passthrough(real, Arc::downgrade(&id)));
                Ok(OpenMode::Passthrough(id))
            }
            Err(e) => {
                log::debug!("passthrough registration failed, serving inode {ino} ourselves: {e}");
                map.insert(ino, IoMode::Cached(1));
                Ok(OpenMode::Cached)
            }
        }
    }

    /// An open of inode `ino` served by us whatever passthrough allows (a file of an image
    /// layer: nothing to pass through), counted like the cached opens of [`open_mode`] so the
    /// inode's io mode stays right when the handle closes.
    ///
    /// [`open_mode`]: FileTable::open_mode
    pub fn open_cached(&self, ino: u64) -> OpResult<OpenMode> {
        let mut map = self.io_modes.lock().unwrap_or_else(|e| e.into_inner());
        match map.get_mut(&ino) {
            Some(IoMode::Cached(n)) => *n += 1,
            Some(IoMode::Passthrough(_, weak)) if weak.strong_count() > 0 => {
                return Err(errno(libc::ETXTBSY));
            }
            _ => {
                map.insert(ino, IoMode::Cached(1));
            }
        }
        Ok(OpenMode::Cached)
    }

    /// Registers an open file and returns its handle number.
    pub fn insert_file(&self, f: OpenFile) -> u64 {
        let fh = self.next_fh();
        self.files
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(f));
        fh
    }

    /// The open file `fh`.
    pub fn file(&self, fh: u64) -> OpResult<Arc<OpenFile>> {
        self.files
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }

    /// Closes `fh`. `tracked`: passthrough is on, so the inode's io mode is accounted.
    pub fn remove_file(&self, fh: u64, tracked: bool) {
        let f = self
            .files
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
        let Some(f) = f else { return };
        if !tracked {
            return;
        }
        let ino = f.ino;
        let cached = f.backing.is_none();
        // Dropping the last handle of a passthrough inode releases its registration.
        drop(f);
        let mut map = self.io_modes.lock().unwrap_or_else(|e| e.into_inner());
        let done = match map.get_mut(&ino) {
            Some(IoMode::Cached(n)) if cached => {
                *n -= 1;
                *n == 0
            }
            Some(IoMode::Passthrough(_, w)) => w.strong_count() == 0,
            _ => false,
        };
        if done {
            map.remove(&ino);
        }
    }

    /// Registers an open directory.
    pub fn insert_dir(&self, d: OpenDir) -> u64 {
        let fh = self.next_fh();
        self.dirs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, Arc::new(d));
        fh
    }

    /// The open directory `fh`.
    pub fn dir(&self, fh: u64) -> OpResult<Arc<OpenDir>> {
        self.dirs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned()
            .ok_or_else(|| errno(libc::EBADF))
    }

    /// Closes directory handle `fh`.
    pub fn remove_dir(&self, fh: u64) {
        self.dirs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh);
    }
}

fn cvt(n: isize) -> OpResult<usize> {
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Does an open with `flags` need a writable upper copy?
pub fn wants_write(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

impl Overlay {
    /// Opens the real file behind `inode` for `flags`, copying it up first when the open can
    /// write (O_TRUNC skips copying the data it would throw away).
    ///
    /// O_APPEND is left out: the kernel computes append offsets itself and sends them, and
    /// writes of mmap'ed pages may go through any writable handle, which must honour the
    /// offset they carry.
    pub fn open_real(&self, inode: &Arc<Inode>, flags: i32) -> OpResult<Real> {
        if wants_write(flags) {
            self.copy_up_with(inode, flags & libc::O_TRUNC == 0)?;
        } else if let Some((layer, ino)) = self.image_entry(inode)? {
            // Read in place: nothing to open.
            return Ok(Real::Img { layer, ino });
        }
        let flags = flags & !(libc::O_APPEND | libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY);
        self.open_real_as(inode, flags).map(Real::Fd)
    }

    fn open_real_as(&self, inode: &Arc<Inode>, flags: i32) -> OpResult<OwnedFd> {
        // A file with a name: one openat in its layer directory (never following the name),
        // no O_PATH handle to open, re-open through /proc and close.
        if let Some(r) = self.with_real_at(inode, |dir, name| sys::openat(dir, name, flags, 0)) {
            return r;
        }
        sys::reopen(self.real_fd(inode)?.as_fd_borrowed(), flags)
    }

    /// The image file to read from: the handle's, unless the inode was copied up since it
    /// was opened (reads then see the copy, as on one real file).
    fn read_image(&self, f: &OpenFile) -> Option<(u16, u32)> {
        match f.real {
            Real::Img { layer, ino } if !f.inode.read().has_upper() => Some((layer, ino)),
            _ => None,
        }
    }

    /// The descriptor to read through: the handle's own, or the upper copy when the handle
    /// was opened on the lower file and the inode has been copied up since.
    pub fn read_fd<'a>(&self, f: &'a OpenFile) -> OpResult<BorrowedFd<'a>> {
        if f.on_lower && f.inode.read().has_upper() {
            if f.upper.get().is_none() {
                let up = self.upper_fd(&f.inode)?;
                let fd = sys::reopen(up.as_fd_borrowed(), libc::O_RDONLY)?;
                let _ = f.upper.set(fd);
            }
            if let Some(fd) = f.upper.get() {
                return Ok(fd.as_fd_borrowed());
            }
        }
        f.fd()
    }

    /// FUSE open, by process `pid`. With `O_TRUNC`, also the opened file's fresh stat (taken
    /// for the set-ID check; it spares the caller another fstat).
    pub fn open(
        &self,
        ino: u64,
        flags: i32,
        pid: u32,
    ) -> OpResult<(Arc<Inode>, Real, Option<libc::stat>)> {
        let inode = self.inode(ino)?;
        if inode.is_dir() && wants_write(flags) {
            return Err(errno(libc::EISDIR));
        }
        let fd = self.open_real(&inode, flags)?;
        // O_TRUNC by a caller without CAP_FSETID drops set-ID bits (see `crate::engine::setid`).
        let mut known = None;
        if let (Real::Fd(f), true) = (&fd, flags & libc::O_TRUNC != 0 && !inode.is_dir()) {
            known = Some(crate::engine::setid::kill_after_truncate(f.as_fd_borrowed(), pid)?.0);
        }
        Ok((inode, fd, known))
    }

    /// FUSE read.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> OpResult<Vec<u8>> {
        let f = self.files.file(fh)?;
        if let Some((layer, ino)) = self.read_image(&f) {
            return self.layers.image_read(layer, ino, offset, size);
        }
        let fd = self.read_fd(&f)?;
        let mut buf: Vec<u8> = Vec::with_capacity(size as usize);
        let n = cvt(unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                size as usize,
                offset as i64,
            )
        })?;
        // SAFETY: pread initialised the first n bytes.
        unsafe { buf.set_len(n) };
        Ok(buf)
    }

    /// FUSE write: writes all of `data` unless the filesystem fails (short writes retried).
    /// `kill_setid`: the kernel says the writer lacks CAP_FSETID (see [`crate::engine::setid`]).
    pub fn write(&self, fh: u64, offset: u64, data: &[u8], kill_setid: bool) -> OpResult<u32> {
        let f = self.files.file(fh)?;
        let fd = f.fd()?;
        if kill_setid {
            crate::engine::setid::kill_after_write(fd)?;
        }
        let mut done = 0usize;
        while done < data.len() {
            let n = unsafe {
                libc::pwrite(
                    fd.as_raw_fd(),
                    data[done..].as_ptr().cast(),
                    data.len() - done,
                    (offset + done as u64) as i64,
                )
            };
            match cvt(n) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if done > 0 && e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(done as u32)
    }

    /// FUSE fsync / fsyncdir on an open file.
    pub fn fsync(&self, fh: u64, datasync: bool) -> OpResult<()> {
        let f = self.files.file(fh)?;
        if self.read_image(&f).is_some() {
            // Nothing of it was written: an image never changes.
            return Ok(());
        }
        // A handle opened on the lower file before a copy-up syncs the upper copy, where the
        // data now is.
        sys::fsync(self.read_fd(&f)?, datasync)
    }

    /// FUSE fsyncdir: syncs every real directory of the merged one that we may have written.
    pub fn fsyncdir(&self, fh: u64, datasync: bool) -> OpResult<()> {
        let d = self.files.dir(fh)?;
        let st = d.inode.read();
        if let Some(u) = &st.upper {
            let fd = sys::reopen(u.as_fd_borrowed(), libc::O_RDONLY | libc::O_DIRECTORY)?;
            sys::fsync(fd.as_fd_borrowed(), datasync)?;
        }
        Ok(())
    }

    /// FUSE fallocate.
    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> OpResult<()> {
        let f = self.files.file(fh)?;
        let r = unsafe { libc::fallocate(f.fd()?.as_raw_fd(), mode, offset as i64, length as i64) };
        cvt(r as isize).map(drop)
    }

    /// FUSE lseek (SEEK_DATA / SEEK_HOLE answered by the real file).
    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> OpResult<i64> {
        let f = self.files.file(fh)?;
        if let Some((layer, ino)) = self.read_image(&f) {
            // An image file is all data (its holes read as zeros, as a sparse file's).
            let size = self.layers.stat(RealRef::Img { layer, ino })?.st_size;
            return match whence {
                libc::SEEK_DATA if offset >= 0 && offset < size => Ok(offset),
                libc::SEEK_HOLE if offset >= 0 && offset < size => Ok(size),
                libc::SEEK_DATA | libc::SEEK_HOLE => Err(errno(libc::ENXIO)),
                _ => Err(errno(libc::EINVAL)),
            };
        }
        let r = unsafe { libc::lseek(self.read_fd(&f)?.as_raw_fd(), offset, whence) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(r)
    }

    /// FUSE copy_file_range between two open files: done by the kernel on the real files
    /// (reflinks where the filesystem can).
    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> OpResult<u32> {
        let fin = self.files.file(fh_in)?;
        let fout = self.files.file(fh_out)?;
        let max = len.min(u32::MAX as u64 & !0xfff) as usize;
        if let Some((layer, ino)) = self.read_image(&fin) {
            // Decompressed here and written: the kernel cannot copy out of an image.
            let data = self
                .layers
                .image_read(layer, ino, off_in, max.min(1 << 20) as u32)?;
            let out = fout.fd()?;
            let mut done = 0;
            while done < data.len() {
                let n = cvt(unsafe {
                    libc::pwrite(
                        out.as_raw_fd(),
                        data[done..].as_ptr().cast(),
                        data.len() - done,
                        (off_out + done as u64) as i64,
                    )
                })?;
                if n == 0 {
                    break;
                }
                done += n;
            }
            return Ok(done as u32);
        }
        let mut oi = off_in as i64;
        let mut oo = off_out as i64;
        let n = unsafe {
            libc::copy_file_range(
                self.read_fd(&fin)?.as_raw_fd(),
                &mut oi,
                fout.fd()?.as_raw_fd(),
                &mut oo,
                max,
                0,
            )
        };
        cvt(n).map(|n| n as u32)
    }
}
