//! Copy-up: gives a lower entry a copy in the upper layer before it is modified.
//!
//! The copy is built completely in the work directory (data, owner, mode with setuid/setgid,
//! xattrs, timestamps), data flushed to disk, then renamed into place in one step. A crash leaves
//! either no upper entry (the lower one still shows) or the complete copy, never a partial file;
//! leftovers in the work directory are cleared at the next mount. Parents are copied up first,
//! each with its own metadata.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::engine::inode::{Inode, Kind};
use crate::engine::layers::{self, LayerStack};
use crate::engine::lower::Real;

/// Private xattr on an indexed copy: "LINKED TOTAL", how many of the lower file's names are
/// linked up to it, and how many names the lower file has.
const LINKED_XATTR: &str = "ovl-linked";
use crate::engine::overlay::{OpResult, Overlay, errno};
use crate::engine::sys::{self, BorrowFd};

/// Copies every user-visible xattr from `src` to `dst`.
pub fn copy_xattrs(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, symlink: bool) -> io::Result<()> {
    copy_xattrs_with(
        sys::flistxattr(src.as_raw_fd())?,
        |n| sys::fgetxattr(src.as_raw_fd(), n),
        dst,
        symlink,
    )
}

/// Copies every user-visible xattr named in `list` (NUL-separated), read with `get`, to `dst`.
pub fn copy_xattrs_with(
    list: Vec<u8>,
    get: impl Fn(&std::ffi::CStr) -> io::Result<Option<Vec<u8>>>,
    dst: BorrowedFd<'_>,
    symlink: bool,
) -> io::Result<()> {
    for name in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if layers::is_private_xattr(name) {
            continue;
        }
        let cname = CString::new(name).map_err(|_| errno(libc::EINVAL))?;
        let Some(value) = get(&cname)? else {
            continue;
        };
        if let Err(e) = sys::fsetxattr(dst.as_raw_fd(), &cname, &value, 0) {
            // Namespaces the upper's filesystem or our privileges do not allow (user.* on a
            // symlink, security.* or trusted.* without privilege) are skipped, as the kernel does.
            match e.raw_os_error() {
                Some(libc::ENOTSUP) | Some(libc::EPERM)
                    if symlink || !name.starts_with(b"user.") => {}
                _ => return Err(e),
            }
        }
    }
    Ok(())
}

/// Applies owner, mode and times of `st` to the new entry behind `fd`.
pub fn copy_meta(fd: BorrowedFd<'_>, st: &libc::stat, privileged: bool) -> io::Result<()> {
    let symlink = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
    if let Err(e) = sys::fchown_fd(fd, st.st_uid, st.st_gid) {
        // Without privilege files stay owned by whoever mounted; the kernel overlay's behaviour
        // in a user namespace as well. There an id the namespace does not map (shown as the
        // overflow id 65534) cannot even be named: EINVAL rather than EPERM.
        if privileged || !matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL)) {
            return Err(e);
        }
    }
    if !symlink {
        // After chown, which clears setuid/setgid.
        sys::fchmod_fd(fd, st.st_mode & 0o7777)?;
    }
    let times = [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ];
    sys::futimens_fd(fd, &times, symlink)
}

impl Overlay {
    /// Makes sure `inode` has an upper entry, copying data too.
    pub fn copy_up(&self, inode: &Arc<Inode>) -> OpResult<()> {
        self.copy_up_with(inode, true)
    }

    /// Copies `inode` up; `with_data: false` creates an empty file (open with O_TRUNC throws
    /// the data away, so copying it would be wasted work).
    ///
    /// A lower file with several names is copied once: the copy is also linked into the
    /// hard-link index, and every other name of it (known now, or looked up later) is linked
    /// to that copy, so a write through one name is seen through all of them.
    pub fn copy_up_with(&self, inode: &Arc<Inode>, with_data: bool) -> OpResult<()> {
        if inode.read().has_upper() {
            return Ok(());
        }
        self.layers.upper()?;
        let _guard = inode.copy_up_lock.lock().unwrap_or_else(|e| e.into_inner());
        if inode.read().has_upper() {
            return Ok(());
        }
        let (parent, name, layer, unlinked) = {
            let st = inode.read();
            let layer = match inode.is_dir() {
                true => st.lowers.first().map(|l| l.layer),
                false => st.lower_layer(),
            };
            (st.parent.clone(), st.name.clone(), layer, st.unlinked)
        };
        if unlinked {
            // No name left to copy it up to (open after unlink): it stays as it is.
            return Err(errno(libc::EROFS));
        }
        let layer = layer.ok_or_else(|| errno(libc::EIO))?;
        let lower = self.lower_real(inode)?;
        let parent = parent.ok_or_else(|| errno(libc::EIO))?;
        self.copy_up(&parent)?;
        let st = self.layers.stat(lower.r())?;
        let indexed =
            inode.kind != Kind::Directory && st.st_nlink > 1 && self.layers.index().is_some();
        let existing = if indexed {
            self.layers.index_lookup(layer, st.st_ino)?
        } else {
            None
        };
        let newfd = match existing {
            // Another name of this lower file was copied up before (maybe in an earlier mount).
            Some(fd) => {
                self.link_up(&fd, &parent, &name)?;
                fd
            }
            None => {
                match self.copy_into_place(
                    inode,
                    &lower,
                    &st,
                    &parent,
                    &name,
                    with_data,
                    indexed.then_some(layer),
                )? {
                    Some(fd) => fd,
                    None => return Ok(()), // directory adopted from a twin inode object
                }
            }
        };
        let s = sys::fstat(newfd.as_fd_borrowed())?;
        self.inodes.rekey(inode, (s.st_dev, s.st_ino));
        let extra = {
            let mut st = inode.write();
            if inode.is_dir() {
                st.upper = Some(newfd.try_clone()?);
                // Made empty in the work dir: no `.wh.` markers inside.
                st.set_upper_wh_free(self.layers.whiteout_dev);
            } else {
                st.in_upper = true;
            }
            st.extra_names().to_vec()
        };
        for (p, n) in extra {
            if let Err(e) = self.link_up(&newfd, &p, &n) {
                if e.raw_os_error() != Some(libc::EEXIST) {
                    log::warn!("linking copied-up file to its other name {n:?}: {e}");
                }
            }
        }
        Ok(())
    }

    /// Builds the copy in the work dir and renames it into place. For an indexed file the
    /// copy enters the index first (a crash then leaves an index entry that the next lookup
    /// of the name links up, never a name without its data).
    #[allow(clippy::too_many_arguments)]
    fn copy_into_place(
        &self,
        inode: &Arc<Inode>,
        lower: &Real,
        st: &libc::stat,
        parent: &Arc<Inode>,
        name: &std::ffi::OsStr,
        with_data: bool,
        index_layer: Option<usize>,
    ) -> OpResult<Option<OwnedFd>> {
        let cname = sys::cstr(name)?;
        let work = self.layers.work()?;
        let tmp = self.layers.tmp_name();
        let newfd = match self.build_copy(inode.kind, lower, st, work, &tmp, with_data) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = sys::remove_tree(work, &tmp);
                return Err(e);
            }
        };
        if let (Some(layer), Some(index)) = (index_layer, self.layers.index()) {
            let links = format!("1 {}", st.st_nlink);
            let set = sys::fsetxattr(
                newfd.as_raw_fd(),
                &self.layers.ovl_xattr(LINKED_XATTR),
                links.as_bytes(),
                0,
            );
            let linked = set.and_then(|_| {
                sys::link_fd(
                    newfd.as_fd_borrowed(),
                    index,
                    &LayerStack::index_name(layer, st.st_ino),
                )
            });
            if let Err(e) = linked {
                let _ = sys::unlinkat(work, &tmp, 0);
                return Err(e);
            }
        }
        let pstate = parent.read();
        let pupper = pstate.upper.as_ref().ok_or_else(|| errno(libc::EIO))?;
        // A copy-up is not a change of the directory: keep its times, as the kernel does.
        let before = sys::fstat(pupper.as_fd_borrowed())?;
        match sys::renameat2(
            work,
            &tmp,
            pupper.as_fd_borrowed(),
            &cname,
            libc::RENAME_NOREPLACE,
        ) {
            Ok(()) => {
                let times = [
                    libc::timespec {
                        tv_sec: before.st_atime,
                        tv_nsec: before.st_atime_nsec,
                    },
                    libc::timespec {
                        tv_sec: before.st_mtime,
                        tv_nsec: before.st_mtime_nsec,
                    },
                ];
                sys::futimens_fd(pupper.as_fd_borrowed(), &times, false)?;
                Ok(Some(newfd))
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && inode.kind == Kind::Directory => {
                // Another inode object for the same directory (the kernel forgot and re-looked
                // it up while a child still pointed here) copied it up first: adopt that one.
                let _ = sys::remove_tree(work, &tmp);
                let fd = sys::open_path(pupper.as_fd_borrowed(), &cname)?;
                let s = sys::fstat(fd.as_fd_borrowed())?;
                if s.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    return Err(errno(libc::EIO));
                }
                drop(pstate);
                self.inodes.rekey(inode, (s.st_dev, s.st_ino));
                inode.write().upper = Some(fd);
                Ok(None)
            }
            Err(e) => {
                let _ = sys::remove_tree(work, &tmp);
                Err(e)
            }
        }
    }

    /// Links the upper copy `fd` of a hard-linked lower file at `name` in `parent` (copied up
    /// first) and counts the name as settled in the copy's link bookkeeping.
    pub fn link_up(
        &self,
        fd: &OwnedFd,
        parent: &Arc<Inode>,
        name: &std::ffi::OsStr,
    ) -> OpResult<()> {
        self.copy_up(parent)?;
        let cname = sys::cstr(name)?;
        {
            let pst = parent.read();
            let pupper = pst.upper.as_ref().ok_or_else(|| errno(libc::EIO))?;
            sys::link_fd(fd.as_fd_borrowed(), pupper.as_fd_borrowed(), &cname)?;
        }
        let key = self.layers.ovl_xattr(LINKED_XATTR);
        if let Some((linked, total)) = self.link_counts(fd.as_fd_borrowed()) {
            let v = format!("{} {total}", linked + 1);
            sys::fsetxattr(fd.as_raw_fd(), &key, v.as_bytes(), 0)?;
        }
        Ok(())
    }

    /// The link bookkeeping of an indexed copy: (lower names linked up, lower names in all).
    fn link_counts(&self, fd: BorrowedFd<'_>) -> Option<(u64, u64)> {
        let v = sys::fgetxattr(fd.as_raw_fd(), &self.layers.ovl_xattr(LINKED_XATTR)).ok()??;
        let v = String::from_utf8(v).ok()?;
        let (a, b) = v.split_once(' ')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }

    /// st_nlink of an indexed (hard-linked, copied-up) lower file: its names in the upper
    /// (without the index entry) plus the lower names not linked up yet. `None` for others.
    pub fn indexed_nlink(&self, upper: BorrowedFd<'_>, upper_nlink: u64) -> Option<u64> {
        let (linked, total) = self.link_counts(upper)?;
        Some(upper_nlink.saturating_sub(1) + total.saturating_sub(linked))
    }

    fn build_copy(
        &self,
        kind: Kind,
        lower: &Real,
        st: &libc::stat,
        work: BorrowedFd<'_>,
        tmp: &CString,
        with_data: bool,
    ) -> OpResult<OwnedFd> {
        match kind {
            Kind::Directory => sys::mkdirat(work, tmp, 0o700)?,
            Kind::RegularFile => {
                let dst = sys::openat(
                    work,
                    tmp,
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                    0o600,
                )?;
                if with_data && st.st_size > 0 {
                    match lower {
                        Real::Fd(lower) => {
                            let src = sys::reopen(lower.as_fd_borrowed(), libc::O_RDONLY)?;
                            sys::copy_data(
                                src.as_fd_borrowed(),
                                dst.as_fd_borrowed(),
                                st.st_size as u64,
                            )?;
                        }
                        // Decompressed straight into the copy; holes stay holes.
                        Real::Img { layer, ino } => self.layers.image_copy_to(
                            *layer,
                            *ino,
                            &std::fs::File::from(dst.try_clone()?),
                        )?,
                    }
                    // The data must be durable before the copy is renamed into place, or a
                    // crash could show an empty file where the lower one had data. (An empty
                    // copy has nothing to lose: as the kernel, no fsync then. `volatile` asks
                    // for no syncing at all, as the kernel's option of that name.)
                    if !self.no_sync {
                        sys::fsync(dst.as_fd_borrowed(), false)?;
                    }
                }
            }
            Kind::Symlink => {
                let target = self.layers.readlink_of(lower.r())?;
                let target = CString::new(target).map_err(|_| errno(libc::EINVAL))?;
                sys::symlinkat(&target, work, tmp)?;
            }
            _ => sys::mknodat(work, tmp, st.st_mode, st.st_rdev)?,
        }
        let newfd = sys::open_path(work, tmp)?;
        copy_xattrs_with(
            self.layers.listxattr_of(lower.r())?,
            |n| self.layers.getxattr_of(lower.r(), n),
            newfd.as_fd_borrowed(),
            kind == Kind::Symlink,
        )?;
        copy_meta(newfd.as_fd_borrowed(), st, self.privileged)?;
        Ok(newfd)
    }

    /// Copies a directory and everything visible below it into the upper layer and marks it
    /// opaque, so it no longer depends on where it sits in the lower layers (a rename falls
    /// back to it when a redirect cannot be stored).
    pub fn copy_up_tree(&self, dir: &Arc<Inode>) -> OpResult<()> {
        self.copy_up(dir)?;
        if dir.read().lowers.is_empty() {
            return Ok(());
        }
        for ent in self.merged_entries(dir)? {
            let (child, _) = self.lookup_in(dir, &ent.name)?;
            let res = if child.is_dir() {
                self.copy_up_tree(&child)
            } else {
                self.copy_up(&child)
            };
            self.inodes.forget(child.ino, 1);
            res?;
        }
        let st = dir.read();
        let upper = st.upper.as_ref().ok_or_else(|| errno(libc::EIO))?;
        self.layers.set_opaque(upper.as_fd_borrowed())?;
        drop(st);
        let mut st = dir.write();
        st.opaque = true;
        st.lowers = Box::default();
        Ok(())
    }
}
