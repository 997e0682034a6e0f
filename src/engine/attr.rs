//! Attributes: getattr, setattr (chmod, chown, truncate, utimens), readlink, statfs.
//!
//! Any change to a lower entry copies it up first; the lower layers are never modified.

use std::os::fd::AsRawFd;
use std::time::UNIX_EPOCH;

use fuser::{FileAttr, TimeOrNow};

use crate::engine::overlay::{OpResult, Overlay, errno};
use crate::engine::sys::{self, BorrowFd};

/// The changes one setattr asks for.
#[derive(Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    /// An open handle to truncate through (works after the last name is gone).
    pub fh: Option<u64>,
    /// The calling process (a truncate by one without CAP_FSETID drops set-ID bits).
    pub pid: u32,
}

impl SetAttr {
    fn changes_nothing(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.size.is_none()
            && self.atime.is_none()
            && self.mtime.is_none()
    }
}

fn timespec(t: Option<TimeOrNow>) -> libc::timespec {
    match t {
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        Some(TimeOrNow::Now) => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as i64,
            },
            Err(e) => {
                let d = e.duration();
                let mut sec = -(d.as_secs() as i64);
                let mut nsec = d.subsec_nanos() as i64;
                if nsec > 0 {
                    sec -= 1;
                    nsec = 1_000_000_000 - nsec;
                }
                libc::timespec {
                    tv_sec: sec,
                    tv_nsec: nsec,
                }
            }
        },
    }
}

impl Overlay {
    /// FUSE getattr. With an open handle the real open file is asked, so an unlinked file
    /// still answers (with st_nlink 0).
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> OpResult<FileAttr> {
        let inode = self.inode(ino)?;
        if let Some(fh) = fh {
            if let Ok(f) = self.files.file(fh) {
                let st = sys::fstat(self.read_fd(&f)?)?;
                let mut attr = crate::engine::overlay::attr_from_stat(ino, &st);
                let st = inode.read();
                if st.unlinked && !st.has_upper() {
                    attr.nlink = 0;
                }
                return Ok(attr);
            }
        }
        self.stat_inode(&inode)
    }

    /// FUSE setattr.
    pub fn setattr(&self, ino: u64, req: SetAttr) -> OpResult<FileAttr> {
        let inode = self.inode(ino)?;
        // Truncating to zero needs none of the old data.
        let need_data = req.size != Some(0);
        self.copy_up_with(&inode, need_data)?;
        if req.mode.is_some() && inode.kind == crate::engine::inode::Kind::Symlink {
            return Err(errno(libc::EOPNOTSUPP));
        }
        let handle = req.fh.and_then(|fh| self.files.file(fh).ok());
        // A file in the upper with a name: one *at call per change, nothing to open.
        let done = self.with_upper_at(&inode, |dir, name| {
            let d = dir.as_raw_fd();
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            if req.uid.is_some() || req.gid.is_some() {
                let (u, g) = (req.uid.unwrap_or(u32::MAX), req.gid.unwrap_or(u32::MAX));
                check(unsafe {
                    libc::fchownat(d, name.as_ptr(), u, g, libc::AT_SYMLINK_NOFOLLOW)
                })?;
            }
            if let Some(mode) = req.mode {
                // Not a symlink (refused above), so following the name is following nothing.
                check(unsafe { libc::fchmodat(d, name.as_ptr(), mode & 0o7777, 0) })?;
            }
            if let Some(size) = req.size {
                match &handle {
                    Some(f) => check(unsafe { libc::ftruncate(f.fd()?.as_raw_fd(), size as i64) })?,
                    None => {
                        let fd = sys::openat(dir, name, libc::O_WRONLY, 0)?;
                        check(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) })?;
                    }
                }
            }
            if req.atime.is_some() || req.mtime.is_some() {
                let times = [timespec(req.atime), timespec(req.mtime)];
                check(unsafe {
                    libc::utimensat(d, name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW)
                })?;
            }
            Ok(())
        });
        match done {
            Some(r) => r?,
            None => self.setattr_fd(&inode, &req, handle.as_deref())?,
        }
        let attr = self.stat_inode(&inode)?;
        // A truncate, or a SETATTR that changes nothing: the kernel sends that for a write
        // through passthrough (and for `chown(-1, -1)`) where it would drop set-ID bits
        // itself without HANDLE_KILLPRIV_V2 (see `crate::engine::setid`). Only a file that has such
        // a bit costs more than the stat above.
        let mode = attr.perm as u32 | libc::S_IFREG;
        if (req.size.is_some() || req.changes_nothing())
            && req.mode.is_none()
            && attr.kind == fuser::FileType::RegularFile
            && crate::engine::setid::killed_mode(mode).is_some()
        {
            let fd = self.upper_fd(&inode)?;
            if crate::engine::setid::kill_after_truncate(fd.as_fd_borrowed(), req.pid)?.1 {
                return self.stat_inode(&inode);
            }
        }
        Ok(attr)
    }

    /// setattr through an `O_PATH` handle (directories, pinned files).
    fn setattr_fd(
        &self,
        inode: &crate::engine::inode::Inode,
        req: &SetAttr,
        handle: Option<&crate::engine::file::OpenFile>,
    ) -> OpResult<()> {
        let fd = self.upper_fd(inode)?;
        let fd = fd.as_fd_borrowed();
        if req.uid.is_some() || req.gid.is_some() {
            sys::fchown_fd(fd, req.uid.unwrap_or(u32::MAX), req.gid.unwrap_or(u32::MAX))?;
        }
        if let Some(mode) = req.mode {
            sys::fchmod_fd(fd, mode & 0o7777)?;
        }
        if let Some(size) = req.size {
            let r = match handle {
                Some(f) => unsafe { libc::ftruncate(f.fd()?.as_raw_fd(), size as i64) },
                None => {
                    let p = sys::proc_path(fd.as_raw_fd());
                    unsafe { libc::truncate(p.as_ptr(), size as i64) }
                }
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        if req.atime.is_some() || req.mtime.is_some() {
            let times = [timespec(req.atime), timespec(req.mtime)];
            sys::futimens_fd(
                fd,
                &times,
                inode.kind == crate::engine::inode::Kind::Symlink,
            )?;
        }
        Ok(())
    }

    /// FUSE readlink.
    pub fn readlink(&self, ino: u64) -> OpResult<Vec<u8>> {
        let inode = self.inode(ino)?;
        self.layers.readlink_of(self.real(&inode)?.r())
    }

    /// FUSE statfs: the upper's filesystem (where writes go), else the top lower's.
    pub fn statfs(&self) -> OpResult<libc::statvfs> {
        let layer = self
            .layers
            .upper
            .as_ref()
            .or(self.layers.lowers.first())
            .ok_or_else(|| errno(libc::EIO))?;
        let mut sv = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        let p = sys::proc_path(layer.root.as_raw_fd());
        if unsafe { libc::statvfs(p.as_ptr(), sv.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(unsafe { sv.assume_init() })
    }
}
