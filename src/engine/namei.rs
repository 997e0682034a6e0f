//! Name lookup: resolves a name in a merged directory to the real entries behind it.
//!
//! The upper layer is consulted first, then each lower directory merged into the parent, top
//! to bottom. A whiteout ends the search (the name is deleted); a non-directory ends it (it hides
//! everything below); a directory continues it unless it is opaque, collecting every lower
//! directory to merge.

use std::ffi::OsStr;
use std::io;
use std::sync::Arc;

use fuser::FileAttr;

use crate::engine::inode::{Found, Inode, InodeState, Kind, LowerEntry};
use crate::engine::layers::{self, LayerStack};
use crate::engine::overlay::{NAME_MAX, OpResult, Overlay, attr_from_stat, errno, kind_of};
use crate::engine::sys::{self, BorrowFd};

/// Builds the root entry: the upper root and every lower root, merged.
pub fn root_entry(layers: &LayerStack) -> io::Result<Found> {
    let mut state = InodeState::default();
    let mut id = None;
    if let Some(u) = &layers.upper {
        let fd = sys::open_path(u.root.as_fd_borrowed(), c".")?;
        let st = sys::fstat(fd.as_fd_borrowed())?;
        id = Some((st.st_dev, st.st_ino));
        let marks = layers::dir_marks(fd.as_fd_borrowed())?;
        state.opaque = marks.opaque;
        state.upper_xwh = marks.xwhiteouts;
        state.upper = Some(fd);
    }
    if !state.opaque {
        let mut lowers = Vec::new();
        for (i, l) in layers.lowers.iter().enumerate() {
            let fd = sys::open_path(l.root.as_fd_borrowed(), c".")?;
            if id.is_none() {
                let st = sys::fstat(fd.as_fd_borrowed())?;
                id = Some((st.st_dev, st.st_ino));
            }
            let marks = layers::dir_marks(fd.as_fd_borrowed())?;
            lowers.push(LowerEntry {
                layer: i,
                fd,
                xwhiteouts: marks.xwhiteouts,
            });
            if marks.opaque {
                break;
            }
        }
        state.lowers = lowers.into_boxed_slice();
    }
    Ok(Found {
        kind: Kind::Directory,
        id: id.ok_or_else(|| io::Error::other("an overlay needs at least one layer"))?,
        layer: 0,
        state,
    })
}

fn is_enoent(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

/// What one layer directory holds under a name.
enum Probe {
    Absent,
    Whiteout,
    /// The entry's stat, and for a directory an `O_PATH` handle on it.
    Present(libc::stat, Option<std::os::fd::OwnedFd>),
    /// A directory whose inode is live (a lookup reference taken): nothing more to probe.
    Known(libc::stat, Arc<Inode>),
}

/// What [`Overlay::find`] resolved a name to.
pub enum Resolved {
    /// A new inode's description.
    New(Found),
    /// A live directory inode (a lookup reference taken), shown from layer `.1`.
    Known(Arc<Inode>, usize),
}

impl Overlay {
    /// Looks at `name` in one layer directory: one fstatat, plus an open for directories
    /// (kept as the inode's handle) and for empty files (which may be xattr whiteouts).
    /// `shown`: this entry would be the one shown, so a directory whose inode is live is
    /// taken as it is.
    fn probe(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        cname: &std::ffi::CStr,
        xwhiteouts: bool,
        shown: bool,
    ) -> OpResult<Probe> {
        let st = match sys::fstatat(dir, cname) {
            Ok(st) => st,
            Err(e) if is_enoent(&e) => return Ok(Probe::Absent),
            Err(e) => return Err(e),
        };
        if sys::is_whiteout_dev(&st) {
            return Ok(Probe::Whiteout);
        }
        let fmt = st.st_mode & libc::S_IFMT;
        if fmt == libc::S_IFDIR {
            if shown {
                if let Some(inode) = self.inodes.acquire_dir((st.st_dev, st.st_ino)) {
                    return Ok(Probe::Known(st, inode));
                }
            }
            let fd = sys::openat(dir, cname, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            return Ok(Probe::Present(st, Some(fd)));
        }
        if xwhiteouts && fmt == libc::S_IFREG && st.st_size == 0 {
            let fd = sys::open_path(dir, cname)?;
            if self.layers.is_whiteout(&st, fd.as_fd_borrowed())? {
                return Ok(Probe::Whiteout);
            }
        }
        Ok(Probe::Present(st, None))
    }

    /// Resolves `name` in `parent` without touching the inode store. `Ok(None)`: no such name.
    /// Also returns the stat of the entry whose attributes are shown.
    pub fn find(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
    ) -> OpResult<Option<(Resolved, libc::stat)>> {
        if name.len() > NAME_MAX {
            return Err(errno(libc::ENAMETOOLONG));
        }
        if layers::is_reserved_name(name) {
            return Ok(None);
        }
        if !parent.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let cname = sys::cstr(name)?;
        let pst = parent.read();
        let mut state = InodeState {
            parent: Some(parent.clone()),
            name: name.into(),
            ..Default::default()
        };
        let mut shown: Option<(libc::stat, usize)> = None;
        let mut search_lower = !pst.opaque;

        if let Some(udir) = &pst.upper {
            match self.probe(udir.as_fd_borrowed(), &cname, pst.upper_xwh, true)? {
                Probe::Whiteout => return Ok(None),
                Probe::Known(st, inode) => return Ok(Some((Resolved::Known(inode, 0), st))),
                Probe::Present(st, Some(fd)) => {
                    let marks = layers::dir_marks(fd.as_fd_borrowed())?;
                    state.opaque = marks.opaque;
                    state.upper_xwh = marks.xwhiteouts;
                    search_lower &= !state.opaque;
                    state.upper = Some(fd);
                    shown = Some((st, 0));
                }
                Probe::Present(st, None) => {
                    search_lower = false;
                    state.in_upper = true;
                    shown = Some((st, 0));
                }
                Probe::Absent => {
                    if pst.upper_may_have_wh()
                        && layers::has_aufs_whiteout(udir.as_fd_borrowed(), name)?
                    {
                        return Ok(None);
                    }
                }
            }
        }

        let mut lowers = Vec::new();
        if search_lower {
            let n = pst.lowers.len();
            for (i, l) in pst.lowers.iter().enumerate() {
                match self.probe(l.fd.as_fd_borrowed(), &cname, l.xwhiteouts, shown.is_none())? {
                    Probe::Whiteout => break,
                    Probe::Known(st, inode) => {
                        return Ok(Some((Resolved::Known(inode, l.layer + 1), st)));
                    }
                    Probe::Present(st, dirfd) => {
                        if shown.is_none() {
                            shown = Some((st, l.layer + 1));
                        }
                        match dirfd {
                            Some(fd) => {
                                let marks = layers::dir_marks(fd.as_fd_borrowed())?;
                                lowers.push(LowerEntry {
                                    layer: l.layer,
                                    fd,
                                    xwhiteouts: marks.xwhiteouts,
                                });
                                if marks.opaque {
                                    break;
                                }
                            }
                            // A non-directory: shown if nothing is above it, else hidden by
                            // the directory above; either way it ends the search.
                            None => {
                                if lowers.is_empty() && state.upper.is_none() {
                                    state.set_lower_layer(l.layer);
                                }
                                break;
                            }
                        }
                    }
                    Probe::Absent => {
                        // An aufs-style whiteout here hides the layers further down.
                        if i + 1 < n && layers::has_aufs_whiteout(l.fd.as_fd_borrowed(), name)? {
                            break;
                        }
                    }
                }
            }
        }
        drop(pst);
        state.lowers = lowers.into_boxed_slice();

        let Some((mut st, mut layer)) = shown else {
            return Ok(None);
        };
        // Another name of this hard-linked lower file was copied up: link this name to the
        // same copy (the kernel's index=on behaviour), so all names stay one file.
        if let (Some(lower_layer), false) = (state.lower_layer(), state.in_upper) {
            if st.st_nlink > 1 {
                if let Some(ifd) = self.layers.index_lookup(lower_layer, st.st_ino)? {
                    self.link_up(&ifd, parent, name)?;
                    st = sys::fstat(ifd.as_fd_borrowed())?;
                    layer = 0;
                    state.in_upper = true;
                }
            }
        }
        Ok(Some((
            Resolved::New(Found {
                kind: kind_of(st.st_mode),
                id: (st.st_dev, st.st_ino),
                layer,
                state,
            }),
            st,
        )))
    }

    /// FUSE lookup: resolves the name and takes a lookup reference on the inode.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> OpResult<(Arc<Inode>, FileAttr)> {
        let parent = self.inode(parent)?;
        self.lookup_in(&parent, name)
    }

    /// Lookup with the parent inode in hand.
    pub fn lookup_in(&self, parent: &Arc<Inode>, name: &OsStr) -> OpResult<(Arc<Inode>, FileAttr)> {
        self.lookup_shown(parent, name).map(|(i, a, _)| (i, a))
    }

    /// [`Overlay::lookup_in`], also telling which layer's entry is shown (0 = upper, n = lower
    /// n-1): above 0, a lower entry is visible at this name, so removing it needs a whiteout.
    pub fn lookup_shown(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
    ) -> OpResult<(Arc<Inode>, FileAttr, usize)> {
        if name == "." || name == ".." {
            return self.lookup_dots(parent, name == "..");
        }
        let (resolved, st) = self
            .find(parent, name)?
            .ok_or_else(|| errno(libc::ENOENT))?;
        let (inode, layer, merged) = match resolved {
            Resolved::New(found) => {
                let layer = found.layer;
                let merged = found.kind == Kind::Directory
                    && (found.state.lowers.len() + usize::from(found.state.upper.is_some())) > 1;
                (self.inodes.lookup_or_insert(found), layer, merged)
            }
            Resolved::Known(inode, layer) => {
                let merged = {
                    let mut s = inode.write();
                    // The kernel just reached it here (as `lookup_or_insert` records).
                    s.add_name(parent, name, true);
                    s.lowers.len() + usize::from(s.upper.is_some()) > 1
                };
                (inode, layer, merged)
            }
        };
        let mut attr = attr_from_stat(inode.ino, &st);
        if merged {
            attr.nlink = 1;
        }
        self.fix_indexed_nlink(&inode, &mut attr);
        Ok((inode, attr, layer))
    }

    /// LOOKUP of "." or "..": the kernel sends these (with export support) to reconnect a
    /// file handle's directory to the tree. They name the directory itself and the overlay
    /// parent it was reached through (the root is its own parent), never a real directory of
    /// a layer, whose ".." may lie outside the overlay.
    fn lookup_dots(
        &self,
        dir: &Arc<Inode>,
        dotdot: bool,
    ) -> OpResult<(Arc<Inode>, FileAttr, usize)> {
        if dotdot && !dir.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let target = if dotdot {
            dir.read().parent.clone().unwrap_or_else(|| dir.clone())
        } else {
            dir.clone()
        };
        let inode = self
            .inodes
            .revive(&target)
            .ok_or_else(|| errno(libc::ESTALE))?;
        match self.getattr(inode.ino, None) {
            Ok(attr) => Ok((inode, attr, 0)),
            Err(e) => {
                self.inodes.forget(inode.ino, 1);
                Err(e)
            }
        }
    }

    /// Whether any lower directory merged into `parent` has a visible entry `name`: removing
    /// or renaming away the upper entry must then leave a whiteout.
    pub fn lower_positive(&self, parent: &Inode, name: &OsStr) -> OpResult<bool> {
        let cname = sys::cstr(name)?;
        let pst = parent.read();
        if pst.opaque {
            return Ok(false);
        }
        for l in &pst.lowers {
            if let Some(st) = sys::fstatat_opt(l.fd.as_fd_borrowed(), &cname)? {
                if sys::is_whiteout_dev(&st) {
                    return Ok(false);
                }
                if l.xwhiteouts && st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size == 0 {
                    let fd = sys::open_path(l.fd.as_fd_borrowed(), &cname)?;
                    return Ok(!self.layers.is_whiteout(&st, fd.as_fd_borrowed())?);
                }
                return Ok(true);
            }
        }
        Ok(false)
    }
}
