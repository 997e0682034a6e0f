//! Directory operations: create, mknod, mkdir, symlink, link, unlink, rmdir, rename.
//!
//! Every change to the upper is one atomic step on disk, so a crash leaves the old or the new
//! state and never one that shows a deleted file again or hides a live one:
//! - a new entry over a whiteout is built in the work directory and renamed over the whiteout
//!   (a directory is exchanged with it, as rename cannot put a directory over a device node);
//! - removing an entry that hides a lower one renames a fresh whiteout over it;
//! - removing a directory first moves it out of the way (exchanged with a whiteout when one is
//!   needed), then cleans it up in the work directory;
//! - rename uses RENAME_WHITEOUT so the source name stays hidden in the same step; a lower or
//!   merged directory is copied up alone and given an `overlay.redirect` to its lower content
//!   first (the kernel's redirect_dir=on format), so renaming it costs the same at any size.

use std::ffi::{CStr, OsStr};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use fuser::FileAttr;

use crate::engine::inode::{Found, Inode, InodeState};
use crate::engine::layers::{self, Redirect};
use crate::engine::overlay::{OpResult, Overlay, attr_from_stat, check_new_name, errno, kind_of};
use crate::engine::sys::{self, BorrowFd};

/// A lookup reference taken for the duration of one operation, given back on drop.
struct Held<'a> {
    ov: &'a Overlay,
    inode: Arc<Inode>,
    /// The link count shown by the lookup.
    nlink: u32,
    /// The lookup showed a lower layer's entry: one is visible at this name.
    from_lower: bool,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.ov.inodes.forget(self.inode.ino, 1);
    }
}

/// What occupies a name in the parent's upper directory before a create.
#[derive(PartialEq)]
enum Slot {
    /// Nothing there; `aufs_marker`: a `.wh.<name>` marker file exists and must go once the
    /// entry is in place.
    Free { aufs_marker: bool },
    /// A whiteout (device or xattr form) that the new entry replaces atomically.
    Whiteout,
}

/// Who creates an entry and with which mode.
#[derive(Clone, Copy, Debug)]
pub struct Creator {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits and file type for the new entry (umask already applied).
    pub mode: u32,
}

impl Overlay {
    fn held<'a>(&'a self, parent: &Arc<Inode>, name: &OsStr) -> OpResult<Held<'a>> {
        let (inode, attr, layer) = self.lookup_shown(parent, name)?;
        Ok(Held {
            ov: self,
            inode,
            nlink: attr.nlink,
            from_lower: layer > 0,
        })
    }

    fn held_opt<'a>(&'a self, parent: &Arc<Inode>, name: &OsStr) -> OpResult<Option<Held<'a>>> {
        match self.held(parent, name) {
            Ok(h) => Ok(Some(h)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Copies the parent up and tells whether `name` is free in its upper directory or held by
    /// a whiteout. A visible entry there means EEXIST.
    fn prepare_create(&self, parent: &Arc<Inode>, name: &OsStr) -> OpResult<Slot> {
        check_new_name(name)?;
        if !parent.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        self.copy_up(parent)?;
        let cname = sys::cstr(name)?;
        let pst = parent.read();
        let upper = pst.upper.as_ref().ok_or_else(|| errno(libc::EROFS))?;
        match sys::open_path(upper.as_fd_borrowed(), &cname) {
            Ok(fd) => {
                let st = sys::fstat(fd.as_fd_borrowed())?;
                if layers::is_whiteout_in(&st, fd.as_fd_borrowed(), pst.upper_xwh)? {
                    Ok(Slot::Whiteout)
                } else {
                    Err(errno(libc::EEXIST))
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let aufs_wh = pst.upper_may_have_wh()
                    && layers::has_aufs_whiteout(upper.as_fd_borrowed(), name)?;
                drop(pst);
                if !aufs_wh && self.lower_positive(parent, name)? {
                    return Err(errno(libc::EEXIST));
                }
                Ok(Slot::Free {
                    aufs_marker: aufs_wh,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// The owner a new entry gets: the caller, with the group inherited from a setgid parent.
    /// Also returns whether the parent is setgid (new directories inherit the bit; done by
    /// hand because an entry built in the work directory does not get it from there).
    fn owner(
        &self,
        parent_upper: BorrowedFd<'_>,
        who: &Creator,
    ) -> OpResult<(Option<(u32, u32)>, bool)> {
        let pst = sys::fstat(parent_upper)?;
        let sgid = pst.st_mode & libc::S_ISGID != 0;
        if !self.privileged {
            return Ok((None, sgid));
        }
        let gid = if sgid { pst.st_gid } else { who.gid };
        Ok((Some((who.uid, gid)), sgid))
    }

    /// Creates an entry with `make` (called with a directory and a name), gives it its owner
    /// and exact mode, and puts it in place: directly when the name is free, else built in the
    /// work directory and swapped in for the whiteout. Returns what `make` opened, if anything,
    /// and the new entry's stat.
    ///
    /// The inode is built from what this call already holds (the descriptor `make` opened, or
    /// the name), not by a second lookup: nothing else writes to the upper while mounted.
    fn create_entry(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        who: &Creator,
        make: &dyn Fn(BorrowedFd<'_>, &CStr) -> OpResult<Option<OwnedFd>>,
    ) -> OpResult<(Arc<Inode>, FileAttr, Option<OwnedFd>, libc::stat)> {
        let slot = self.prepare_create(parent, name)?;
        let cname = sys::cstr(name)?;
        let is_dir = who.mode & libc::S_IFMT == libc::S_IFDIR;
        let is_link = who.mode & libc::S_IFMT == libc::S_IFLNK;
        // A new directory where a lower one is hidden (whiteout or `.wh.` marker) must not
        // merge it.
        let opaque = is_dir && slot != (Slot::Free { aufs_marker: false });
        let opened;
        let mut dirfd = None;
        let st;
        {
            let pst = parent.read();
            let pupper = pst.upper.as_ref().ok_or_else(|| errno(libc::EROFS))?;
            let pupper = pupper.as_fd_borrowed();
            let (owner, parent_sgid) = self.owner(pupper, who)?;
            let (dir, tmpname) = match slot {
                Slot::Free { .. } => (pupper, cname.clone()),
                Slot::Whiteout => (self.layers.work()?, self.layers.tmp_name()),
            };
            opened = make(dir, &tmpname)?;
            let mut finish = || -> OpResult<libc::stat> {
                if is_dir {
                    // Kept as the new inode's handle on its upper directory.
                    dirfd = Some(sys::openat(
                        dir,
                        &tmpname,
                        libc::O_PATH | libc::O_DIRECTORY,
                        0,
                    )?);
                }
                // The handle to change: what `make` opened (a real open file), the new
                // directory, or else the name itself (never followed).
                let h = opened
                    .as_ref()
                    .or(dirfd.as_ref())
                    .map(|f| f.as_fd_borrowed());
                if let Some((uid, gid)) = owner {
                    match h {
                        Some(fd) => sys::fchown_fd(fd, uid, gid)?,
                        None => sys::fchownat_nofollow(dir, &tmpname, uid, gid)?,
                    }
                }
                let mut st = match h {
                    Some(fd) => sys::fstat(fd)?,
                    None => sys::fstatat(dir, &tmpname)?,
                };
                if !is_link {
                    // The process umask (ours, not the caller's) may have cut bits, and chown
                    // clears setuid/setgid: set the exact mode the caller asked for.
                    let want = who.mode & 0o7777;
                    let want = if is_dir && parent_sgid {
                        want | libc::S_ISGID
                    } else {
                        want
                    };
                    if st.st_mode & 0o7777 != want {
                        match (&opened, h) {
                            (Some(f), _) => sys::fchmod_open(f.as_fd_borrowed(), want)?,
                            (None, Some(fd)) => sys::fchmod_fd(fd, want)?,
                            // Not a symlink, so following the name follows nothing.
                            (None, None) => sys::fchmodat(dir, &tmpname, want)?,
                        }
                        // Again, for the ctime the change gave it.
                        st = match h {
                            Some(fd) => sys::fstat(fd)?,
                            None => sys::fstatat(dir, &tmpname)?,
                        };
                    }
                }
                if opaque {
                    let fd = dirfd.as_ref().ok_or_else(|| errno(libc::EIO))?;
                    self.layers.set_opaque(fd.as_fd_borrowed())?;
                }
                if slot == Slot::Whiteout {
                    if is_dir {
                        sys::renameat2(dir, &tmpname, pupper, &cname, libc::RENAME_EXCHANGE)?;
                        // Now the whiteout sits in the work dir; stale ones are cleared at mount.
                        let _ = sys::unlinkat(dir, &tmpname, 0);
                    } else {
                        sys::renameat2(dir, &tmpname, pupper, &cname, 0)?;
                    }
                }
                Ok(st)
            };
            st = match finish() {
                Ok(st) => st,
                Err(e) => {
                    let _ = sys::remove_tree(dir, &tmpname);
                    return Err(e);
                }
            };
            // An aufs-style marker for this name is obsolete now that the entry exists above it.
            match slot {
                Slot::Free { aufs_marker: true } => {
                    sys::unlinkat(pupper, &layers::wh_name(name)?, 0)?
                }
                Slot::Whiteout if pst.upper_may_have_wh() => {
                    layers::remove_aufs_whiteout(pupper, name)?
                }
                _ => {}
            }
        }
        let mut state = InodeState {
            parent: Some(parent.clone()),
            name: name.into(),
            ..Default::default()
        };
        match dirfd {
            Some(fd) => {
                // Empty, made here: nothing to merge, no markers of any kind inside.
                state.upper = Some(fd);
                state.opaque = opaque;
                state.set_upper_wh_free(self.layers.whiteout_dev);
            }
            None => state.in_upper = true,
        }
        let inode = self.inodes.lookup_or_insert(Found {
            kind: kind_of(st.st_mode),
            id: (st.st_dev, st.st_ino),
            layer: 0,
            state,
        });
        let attr = attr_from_stat(inode.ino, &st);
        Ok((inode, attr, opened, st))
    }

    /// FUSE mknod (fifo, socket, regular file; devices when privileged).
    pub fn mknod(
        &self,
        parent: u64,
        name: &OsStr,
        who: Creator,
        rdev: u32,
    ) -> OpResult<(Arc<Inode>, FileAttr)> {
        let parent = self.inode(parent)?;
        let fmt = who.mode & libc::S_IFMT;
        if fmt == libc::S_IFCHR && rdev == 0 {
            // A char 0/0 is the whiteout format: it cannot be a user's file.
            return Err(errno(libc::EPERM));
        }
        let mode = who.mode;
        let (inode, attr, _, _) = self.create_entry(&parent, name, &who, &|d, n| {
            sys::mknodat(d, n, mode, rdev as u64)?;
            Ok(None)
        })?;
        Ok((inode, attr))
    }

    /// FUSE mkdir.
    pub fn mkdir(
        &self,
        parent: u64,
        name: &OsStr,
        mut who: Creator,
    ) -> OpResult<(Arc<Inode>, FileAttr)> {
        let parent = self.inode(parent)?;
        who.mode = (who.mode & 0o7777) | libc::S_IFDIR;
        let (inode, attr, _, _) = self.create_entry(&parent, name, &who, &|d, n| {
            sys::mkdirat(d, n, 0o700)?;
            Ok(None)
        })?;
        Ok((inode, attr))
    }

    /// FUSE symlink.
    pub fn symlink(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        mut who: Creator,
    ) -> OpResult<(Arc<Inode>, FileAttr)> {
        let parent = self.inode(parent)?;
        who.mode = libc::S_IFLNK | 0o777;
        let ctarget = sys::cstr(target)?;
        let (inode, attr, _, _) = self.create_entry(&parent, name, &who, &|d, n| {
            sys::symlinkat(&ctarget, d, n)?;
            Ok(None)
        })?;
        Ok((inode, attr))
    }

    /// FUSE create: a new regular file, opened with `flags`.
    pub fn create(
        &self,
        parent: u64,
        name: &OsStr,
        mut who: Creator,
        flags: i32,
    ) -> OpResult<(Arc<Inode>, FileAttr, OwnedFd, libc::stat)> {
        let parent = self.inode(parent)?;
        who.mode = (who.mode & 0o7777) | libc::S_IFREG;
        // No O_APPEND on the real file: see `open_real`.
        let oflags = (flags
            & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_NOCTTY | libc::O_APPEND))
            | libc::O_CREAT
            | libc::O_EXCL;
        let mode = who.mode & 0o7777;
        let (inode, attr, fd, st) = self.create_entry(&parent, name, &who, &|d, n| {
            Ok(Some(sys::openat(d, n, oflags, mode)?))
        })?;
        let fd = fd.ok_or_else(|| errno(libc::EIO))?;
        Ok((inode, attr, fd, st))
    }

    /// FUSE link: a new name for an existing inode (copied up first: links live in the upper).
    pub fn link(
        &self,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
    ) -> OpResult<(Arc<Inode>, FileAttr)> {
        let inode = self.inode(ino)?;
        let parent = self.inode(newparent)?;
        if inode.is_dir() {
            return Err(errno(libc::EPERM));
        }
        self.copy_up(&inode)?;
        let src = self.upper_fd(&inode)?;
        let (found, attr) = self.link_entry(&parent, newname, &src)?;
        Ok((found, attr))
    }

    /// Puts a hard link to `src` at `name`, over a whiteout in one step if there is one.
    fn link_entry(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        src: &OwnedFd,
    ) -> OpResult<(Arc<Inode>, FileAttr)> {
        let slot = self.prepare_create(parent, name)?;
        let cname = sys::cstr(name)?;
        {
            let pst = parent.read();
            let pupper = pst.upper.as_ref().ok_or_else(|| errno(libc::EROFS))?;
            let pupper = pupper.as_fd_borrowed();
            match slot {
                Slot::Free { .. } => sys::link_fd(src.as_fd_borrowed(), pupper, &cname)?,
                Slot::Whiteout => {
                    let work = self.layers.work()?;
                    let tmp = self.layers.tmp_name();
                    sys::link_fd(src.as_fd_borrowed(), work, &tmp)?;
                    if let Err(e) = sys::renameat2(work, &tmp, pupper, &cname, 0) {
                        let _ = sys::unlinkat(work, &tmp, 0);
                        return Err(e);
                    }
                }
            }
            if slot != (Slot::Free { aufs_marker: false }) && pst.upper_may_have_wh() {
                layers::remove_aufs_whiteout(pupper, name)?;
            }
        }
        self.lookup_in(parent, name)
    }

    /// Puts a whiteout at `name` in the parent's upper directory, replacing whatever is there
    /// in one step.
    fn whiteout_over(
        &self,
        pupper: BorrowedFd<'_>,
        cname: &CStr,
        name: &OsStr,
        exists: bool,
        is_dir: bool,
    ) -> OpResult<()> {
        if !self.layers.whiteout_dev {
            // Without mknod rights: the aufs-style marker, then the entry goes. A crash in
            // between leaves the entry visible (never a lost file).
            let wh = layers::wh_name(name)?;
            drop(sys::openat(
                pupper,
                &wh,
                libc::O_CREAT | libc::O_WRONLY,
                0o600,
            )?);
            if exists {
                self.remove_upper_entry(pupper, cname, is_dir)?;
            }
            return Ok(());
        }
        if !exists {
            return sys::mknodat(pupper, cname, libc::S_IFCHR, 0);
        }
        let work = self.layers.work()?;
        let tmp = self.layers.tmp_name();
        self.layers.make_whiteout(work, &tmp)?;
        if is_dir {
            if let Err(e) = sys::renameat2(work, &tmp, pupper, cname, libc::RENAME_EXCHANGE) {
                let _ = sys::unlinkat(work, &tmp, 0);
                return Err(e);
            }
            // The old directory is now in the work dir; it holds only whiteouts.
            if let Err(e) = sys::remove_tree(work, &tmp) {
                log::warn!("leaving removed directory in work dir for the next mount: {e}");
            }
            Ok(())
        } else {
            sys::renameat2(work, &tmp, pupper, cname, 0).inspect_err(|_| {
                let _ = sys::unlinkat(work, &tmp, 0);
            })
        }
    }

    /// Removes an upper entry that hides nothing; a directory is moved to the work dir first
    /// (it may still hold whiteouts) so the removal is one step.
    fn remove_upper_entry(
        &self,
        pupper: BorrowedFd<'_>,
        cname: &CStr,
        is_dir: bool,
    ) -> OpResult<()> {
        if !is_dir {
            return sys::unlinkat(pupper, cname, 0);
        }
        let work = self.layers.work()?;
        let tmp = self.layers.tmp_name();
        sys::renameat2(pupper, cname, work, &tmp, libc::RENAME_NOREPLACE)?;
        if let Err(e) = sys::remove_tree(work, &tmp) {
            log::warn!("leaving removed directory in work dir for the next mount: {e}");
        }
        Ok(())
    }

    fn remove(&self, parent: u64, name: &OsStr, dir: bool) -> OpResult<()> {
        let parent = self.inode(parent)?;
        let child = self.held(&parent, name)?;
        match (dir, child.inode.is_dir()) {
            (false, true) => return Err(errno(libc::EISDIR)),
            (true, false) => return Err(errno(libc::ENOTDIR)),
            (true, true) if !self.is_empty_dir(&child.inode)? => {
                return Err(errno(libc::ENOTEMPTY));
            }
            _ => {}
        }
        self.copy_up(&parent)?;
        self.settle_hardlink(&child)?;
        let need_wh = child.from_lower || self.lower_positive(&parent, name)?;
        let cname = sys::cstr(name)?;
        let has_upper = child.inode.read().has_upper();
        let frees = Self::frees_real_file(&child, has_upper);
        let pin = self.pin_if_open(&child.inode)?;
        {
            let pst = parent.read();
            let pupper = pst.upper.as_ref().ok_or_else(|| errno(libc::EROFS))?;
            let pupper = pupper.as_fd_borrowed();
            if need_wh {
                self.whiteout_over(pupper, &cname, name, has_upper, dir)?;
            } else if has_upper {
                self.remove_upper_entry(pupper, &cname, dir)?;
            }
        }
        let mut st = child.inode.write();
        st.remove_name(&parent, name);
        let gone = st.unlinked;
        if gone {
            st.pinned = pin;
        }
        drop(st);
        if gone && frees {
            self.inodes.forget_real_file(&child.inode);
        }
        Ok(())
    }

    /// Removing this name deletes the real upper file (its only link): from then on the upper
    /// filesystem may give its inode number to a new file, which must not be taken for this
    /// one while the kernel still holds it (see [`crate::engine::inode::InodeStore::forget_real_file`]).
    /// Directories keep their real directory open while the kernel holds them, so their
    /// number cannot be reused meanwhile.
    fn frees_real_file(held: &Held<'_>, has_upper: bool) -> bool {
        has_upper && !held.inode.is_dir() && held.nlink <= 1
    }

    /// FUSE unlink.
    pub fn unlink(&self, parent: u64, name: &OsStr) -> OpResult<()> {
        self.remove(parent, name, false)
    }

    /// FUSE rmdir.
    pub fn rmdir(&self, parent: u64, name: &OsStr) -> OpResult<()> {
        self.remove(parent, name, true)
    }

    /// An open file keeps working after its last name goes: before removing a name of a
    /// non-directory that has open handles, take a handle on its real entry.
    fn pin_if_open(&self, inode: &Arc<Inode>) -> OpResult<Option<crate::engine::lower::Real>> {
        use std::sync::atomic::Ordering;
        if inode.is_dir() || inode.open_files.load(Ordering::Relaxed) == 0 {
            return Ok(None);
        }
        Ok(Some(self.real(inode)?))
    }

    /// Before one name of a hard-linked lower file goes away, copy it up (into the index), so
    /// the link count its other names show stays right, as the kernel does with index=on.
    fn settle_hardlink(&self, held: &Held<'_>) -> OpResult<()> {
        let inode = &held.inode;
        let lower_only = {
            let st = inode.read();
            !inode.is_dir() && !st.has_upper() && st.lower.is_some()
        };
        if !lower_only {
            return Ok(());
        }
        // The shown attributes are the lower file's, as the lookup just read them.
        if held.nlink > 1 && self.layers.index().is_some() {
            self.copy_up(inode)?;
        }
        Ok(())
    }

    /// Gets an entry ready to move from `from` to `to`: copied up; a directory with lower
    /// content also gets a redirect to where that content is (the kernel's redirect_dir=on),
    /// so only the directory itself is copied, never its subtree. Its inode keeps its lower
    /// directories: nothing moves in the lower layers.
    fn prepare_move(&self, inode: &Arc<Inode>, from: &Arc<Inode>, to: &Arc<Inode>) -> OpResult<()> {
        self.copy_up(inode)?;
        if !inode.is_dir() || inode.read().lowers.is_empty() {
            return Ok(());
        }
        let samedir = Arc::ptr_eq(from, to);
        let ufd = self.upper_fd(inode)?;
        let existing = self.layers.redirect(ufd.as_fd_borrowed())?;
        // A redirect that stays right: relative ones within the same directory, absolute
        // ones anywhere (as the kernel keeps them).
        match existing {
            Some(Redirect::Absolute(_)) => return Ok(()),
            Some(Redirect::Relative(_)) if samedir => return Ok(()),
            _ => {}
        }
        let r = if samedir {
            Redirect::Relative(sys::cstr(&inode.read().name)?)
        } else {
            match self.lower_path(inode) {
                Ok(p) => Redirect::Absolute(p),
                // Too long for a path: copied instead, as below.
                Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                    return self.copy_up_tree(inode);
                }
                Err(e) => return Err(e),
            }
        };
        match self.layers.set_redirect(ufd.as_fd_borrowed(), &r) {
            Ok(()) => Ok(()),
            // A path too long for the upper's xattrs: move a self-contained copy instead
            // (where the kernel says EXDEV and leaves the copy to `mv`).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::E2BIG | libc::ENOSPC | libc::ERANGE)
                ) =>
            {
                self.copy_up_tree(inode)
            }
            Err(e) => Err(e),
        }
    }

    /// Where a directory's lower content is, as a path from the lower roots: its name (or
    /// redirect) below each ancestor's, up to the root or to an absolute redirect. Every
    /// ancestor is in the upper (copied up before a move).
    fn lower_path(&self, inode: &Arc<Inode>) -> OpResult<Vec<std::ffi::CString>> {
        let mut rev = Vec::new();
        let mut cur = inode.clone();
        while cur.ino != crate::engine::inode::ROOT_INO {
            let (parent, name, upper) = {
                let s = cur.read();
                let upper = s.upper.as_ref().map(|f| f.try_clone()).transpose()?;
                (s.parent.clone(), s.name.clone(), upper)
            };
            let r = match &upper {
                Some(fd) => self.layers.redirect(fd.as_fd_borrowed())?,
                None => None,
            };
            match r {
                Some(Redirect::Absolute(c)) => {
                    rev.extend(c.into_iter().rev());
                    break;
                }
                Some(Redirect::Relative(n)) => rev.push(n),
                None => rev.push(sys::cstr(&name)?),
            }
            cur = parent.ok_or_else(|| errno(libc::ESTALE))?;
        }
        rev.reverse();
        if rev.iter().map(|c| c.as_bytes().len() + 1).sum::<usize>() >= libc::PATH_MAX as usize {
            return Err(errno(libc::ENAMETOOLONG));
        }
        Ok(rev)
    }

    /// FUSE rename, with RENAME_NOREPLACE and RENAME_EXCHANGE.
    pub fn rename(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> OpResult<()> {
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0
            || flags == libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE
        {
            return Err(errno(libc::EINVAL));
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        check_new_name(newname)?;
        let parent = self.inode(parent)?;
        let newparent = self.inode(newparent)?;
        let src = self.held(&parent, name)?;
        let tgt = self.held_opt(&newparent, newname)?;
        if let Some(t) = &tgt {
            if flags & libc::RENAME_NOREPLACE != 0 {
                return Err(errno(libc::EEXIST));
            }
            if Arc::ptr_eq(&t.inode, &src.inode) && !exchange {
                // Two names of one file (or the same name): POSIX says do nothing.
                return Ok(());
            }
            if !exchange {
                match (src.inode.is_dir(), t.inode.is_dir()) {
                    (true, false) => return Err(errno(libc::ENOTDIR)),
                    (false, true) => return Err(errno(libc::EISDIR)),
                    (true, true) if !self.is_empty_dir(&t.inode)? => {
                        return Err(errno(libc::ENOTEMPTY));
                    }
                    _ => {}
                }
            }
        } else if exchange {
            return Err(errno(libc::ENOENT));
        }

        self.copy_up(&parent)?;
        self.copy_up(&newparent)?;
        self.prepare_move(&src.inode, &parent, &newparent)?;
        if exchange {
            let t = tgt.as_ref().ok_or_else(|| errno(libc::ENOENT))?;
            self.prepare_move(&t.inode, &newparent, &parent)?;
        } else if let Some(t) = &tgt {
            self.settle_hardlink(t)?;
        }
        let cname = sys::cstr(name)?;
        let cnew = sys::cstr(newname)?;
        // A replaced file may still be open: keep a handle on it (see `remove`).
        let tgt_pin = match &tgt {
            Some(t) if !exchange => self.pin_if_open(&t.inode)?,
            _ => None,
        };
        let tgt_frees = match &tgt {
            Some(t) if !exchange => Self::frees_real_file(t, t.inode.read().has_upper()),
            _ => false,
        };
        let src_wh = !exchange && (src.from_lower || self.lower_positive(&parent, name)?);
        // A directory of the upper alone landing where a lower directory of that name exists
        // must not merge it (one with lower content has its redirect, which says where).
        let upper_only = |i: &Inode| i.is_dir() && i.read().lowers.is_empty();
        if upper_only(&src.inode) && self.lower_positive(&newparent, newname)? {
            self.set_opaque_upper(&src.inode)?;
        }
        if exchange {
            let t = tgt.as_ref().ok_or_else(|| errno(libc::ENOENT))?;
            if upper_only(&t.inode) && self.lower_positive(&parent, name)? {
                self.set_opaque_upper(&t.inode)?;
            }
        }

        {
            let pst = parent.read();
            let npst;
            let (pupper, npupper, tgt_may_wh) = if Arc::ptr_eq(&parent, &newparent) {
                let u = pst
                    .upper
                    .as_ref()
                    .ok_or_else(|| errno(libc::EROFS))?
                    .as_fd_borrowed();
                (u, u, pst.upper_may_have_wh())
            } else {
                npst = newparent.read();
                (
                    pst.upper
                        .as_ref()
                        .ok_or_else(|| errno(libc::EROFS))?
                        .as_fd_borrowed(),
                    npst.upper
                        .as_ref()
                        .ok_or_else(|| errno(libc::EROFS))?
                        .as_fd_borrowed(),
                    npst.upper_may_have_wh(),
                )
            };
            if exchange {
                sys::renameat2(pupper, &cname, npupper, &cnew, libc::RENAME_EXCHANGE)?;
            } else {
                self.rename_upper(
                    pupper,
                    &cname,
                    name,
                    npupper,
                    &cnew,
                    newname,
                    src.inode.is_dir(),
                    tgt.as_ref(),
                    src_wh,
                    tgt_may_wh,
                )?;
            }
        }

        {
            let mut s = src.inode.write();
            s.remove_name(&parent, name);
            s.add_name(&newparent, newname, src.inode.is_dir());
        }
        if let Some(t) = &tgt {
            let mut s = t.inode.write();
            s.remove_name(&newparent, newname);
            if exchange {
                s.add_name(&parent, name, t.inode.is_dir());
            } else if s.unlinked {
                s.pinned = tgt_pin;
                drop(s);
                if tgt_frees {
                    self.inodes.forget_real_file(&t.inode);
                }
            }
        }
        Ok(())
    }

    fn set_opaque_upper(&self, dir: &Inode) -> OpResult<()> {
        let mut st = dir.write();
        let upper = st.upper.as_ref().ok_or_else(|| errno(libc::EIO))?;
        self.layers.set_opaque(upper.as_fd_borrowed())?;
        st.opaque = true;
        st.lowers = Box::default();
        Ok(())
    }

    /// The non-exchange rename in the upper layer.
    #[allow(clippy::too_many_arguments)]
    fn rename_upper(
        &self,
        pupper: BorrowedFd<'_>,
        cname: &CStr,
        name: &OsStr,
        npupper: BorrowedFd<'_>,
        cnew: &CStr,
        newname: &OsStr,
        src_is_dir: bool,
        tgt: Option<&Held<'_>>,
        src_wh: bool,
        tgt_may_wh: bool,
    ) -> OpResult<()> {
        // What is at the target name in the upper right now?
        let tgt_upper = match sys::open_path(npupper, cnew) {
            Ok(fd) => {
                let st = sys::fstat(fd.as_fd_borrowed())?;
                Some((self.layers.is_whiteout(&st, fd.as_fd_borrowed())?, st))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(e) => return Err(e),
        };
        if let (Some((false, st)), Some(t)) = (&tgt_upper, tgt) {
            // Replacing an empty merged directory: its upper may still hold whiteouts, which the
            // real rename would refuse with ENOTEMPTY. Swap in an empty opaque directory first.
            if st.st_mode & libc::S_IFMT == libc::S_IFDIR && t.inode.is_dir() {
                let ufd = t
                    .inode
                    .read()
                    .upper
                    .as_ref()
                    .map(|f| f.try_clone())
                    .transpose()?;
                if let Some(ufd) = ufd {
                    if !sys::read_dir(ufd.as_fd_borrowed())?.is_empty() {
                        let work = self.layers.work()?;
                        let tmp = self.layers.tmp_name();
                        sys::mkdirat(work, &tmp, 0o700)?;
                        let nfd = sys::open_path(work, &tmp)?;
                        let meta = sys::fstat(ufd.as_fd_borrowed())?;
                        crate::engine::copy_up::copy_meta(
                            nfd.as_fd_borrowed(),
                            &meta,
                            self.privileged,
                        )?;
                        self.layers.set_opaque(nfd.as_fd_borrowed())?;
                        sys::renameat2(work, &tmp, npupper, cnew, libc::RENAME_EXCHANGE)?;
                        if let Err(e) = sys::remove_tree(work, &tmp) {
                            log::warn!("leaving replaced directory in work dir: {e}");
                        }
                    }
                }
            }
        }
        let over_whiteout = matches!(tgt_upper, Some((true, _)));
        if over_whiteout && src_is_dir {
            // rename(2) cannot put a directory over a device node: exchange them, which also
            // leaves the whiteout at the source name, exactly what a hidden lower entry needs.
            sys::renameat2(pupper, cname, npupper, cnew, libc::RENAME_EXCHANGE)?;
            if !src_wh {
                sys::unlinkat(pupper, cname, 0)?;
            }
        } else if src_wh {
            match sys::renameat2(pupper, cname, npupper, cnew, libc::RENAME_WHITEOUT) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EPERM)) => {
                    // No RENAME_WHITEOUT here: move, then hide. A crash in between shows the
                    // lower file again at the old name but loses nothing.
                    sys::renameat2(pupper, cname, npupper, cnew, 0)?;
                    self.whiteout_over(pupper, cname, name, false, false)?;
                }
                Err(e) => return Err(e),
            }
        } else {
            sys::renameat2(pupper, cname, npupper, cnew, 0)?;
        }
        if tgt_may_wh {
            layers::remove_aufs_whiteout(npupper, newname)?;
        }
        Ok(())
    }
}
