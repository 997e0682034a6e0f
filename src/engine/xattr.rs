//! Extended attributes: get, set, list, remove.
//!
//! The overlay's own attributes (`trusted.overlay.*`, `user.overlay.*`) are its on-disk format:
//! they are never listed, read or written through the mount. Setting or removing an attribute
//! of a lower entry copies it up first.

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;

use crate::engine::layers::is_private_xattr;
use crate::engine::lower::Real;
use crate::engine::overlay::{OpResult, Overlay, errno};
use crate::engine::sys;

/// Result of getxattr/listxattr with the FUSE size protocol: the size alone when the caller
/// passed 0, else the bytes.
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

/// The file capabilities xattr, which the kernel reads before every write of a file.
const FILE_CAPS: &std::ffi::CStr = c"security.capability";

fn check_name(name: &OsStr) -> OpResult<std::ffi::CString> {
    if is_private_xattr(name.as_bytes()) {
        // What kernel overlayfs answers for its own attributes.
        return Err(errno(libc::EOPNOTSUPP));
    }
    sys::cstr(name)
}

impl Overlay {
    /// FUSE getxattr.
    pub fn getxattr(&self, ino: u64, name: &OsStr, size: u32) -> OpResult<XattrReply> {
        let cname = check_name(name)?;
        let inode = self.inode(ino)?;
        let caps = cname.as_c_str() == FILE_CAPS;
        if caps && inode.no_file_caps.load(Ordering::Relaxed) {
            return Err(errno(libc::ENODATA));
        }
        // Files: one lgetxattr by name (the kernel asks security.capability before every
        // write, so this path is hot); directories and pinned files through their handle.
        let at = self.with_real_at(&inode, |dir, name| {
            let r = sys::getxattr_at(dir.as_raw_fd(), name, &cname, size as usize);
            if caps
                && r.as_ref()
                    .is_err_and(|e| e.raw_os_error() == Some(libc::ENODATA))
            {
                // Still under the state's read lock: a setxattr clears the mark only after
                // this section (it takes the write lock), so the mark is never stale. The
                // mount owns its layers and a copy-up carries no more xattrs than it had.
                inode.no_file_caps.store(true, Ordering::Relaxed);
            }
            r
        });
        let (len, data) = match at {
            Some(r) => r?,
            None => match self.real(&inode)? {
                Real::Fd(fd) => sys::getxattr_raw(fd.as_raw_fd(), &cname, size as usize)?,
                img => {
                    let v = self
                        .layers
                        .getxattr_of(img.r(), &cname)?
                        .ok_or_else(|| errno(libc::ENODATA))?;
                    if size != 0 && v.len() > size as usize {
                        return Err(errno(libc::ERANGE));
                    }
                    (v.len(), v)
                }
            },
        };
        Ok(if size == 0 {
            XattrReply::Size(len as u32)
        } else {
            XattrReply::Data(data)
        })
    }

    /// FUSE listxattr, without the overlay's own names.
    pub fn listxattr(&self, ino: u64, size: u32) -> OpResult<XattrReply> {
        let inode = self.inode(ino)?;
        // Files by name in their layer directory, like getxattr.
        let all = match self.with_real_at(&inode, |dir, name| {
            sys::llistxattr_at(dir.as_raw_fd(), name)
        }) {
            Some(r) => r?,
            None => self.layers.listxattr_of(self.real(&inode)?.r())?,
        };
        let mut out = Vec::with_capacity(all.len());
        for n in all.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if !is_private_xattr(n) {
                out.extend_from_slice(n);
                out.push(0);
            }
        }
        if size == 0 {
            return Ok(XattrReply::Size(out.len() as u32));
        }
        if out.len() > size as usize {
            return Err(errno(libc::ERANGE));
        }
        Ok(XattrReply::Data(out))
    }

    /// FUSE setxattr.
    pub fn setxattr(&self, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> OpResult<()> {
        let cname = check_name(name)?;
        let inode = self.inode(ino)?;
        self.copy_up(&inode)?;
        let r = match self.with_upper_at(&inode, |dir, name| {
            sys::lsetxattr_at(dir.as_raw_fd(), name, &cname, value, flags)
        }) {
            Some(r) => r,
            None => sys::fsetxattr(self.upper_fd(&inode)?.as_raw_fd(), &cname, value, flags),
        };
        if cname.as_c_str() == FILE_CAPS {
            // After the change, with the write lock: see `getxattr`.
            let _st = inode.write();
            inode.no_file_caps.store(false, Ordering::Relaxed);
        }
        r
    }

    /// FUSE removexattr.
    pub fn removexattr(&self, ino: u64, name: &OsStr) -> OpResult<()> {
        let cname = check_name(name)?;
        let inode = self.inode(ino)?;
        // Removing an attribute that is not there must not copy the file up.
        let present = match self.with_real_at(&inode, |dir, name| {
            sys::has_xattr_at(dir.as_raw_fd(), name, &cname)
        }) {
            Some(r) => r?,
            None => self
                .layers
                .getxattr_of(self.real(&inode)?.r(), &cname)?
                .is_some(),
        };
        if !present {
            return Err(errno(libc::ENODATA));
        }
        self.copy_up(&inode)?;
        if let Some(r) = self.with_upper_at(&inode, |dir, name| {
            sys::lremovexattr_at(dir.as_raw_fd(), name, &cname)
        }) {
            return r;
        }
        let fd = self.upper_fd(&inode)?;
        sys::fremovexattr(fd.as_raw_fd(), &cname)
    }
}
