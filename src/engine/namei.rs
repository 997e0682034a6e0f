//! Name lookup: resolves a name in a merged directory to the real entries behind it.
//!
//! The upper layer is consulted first, then each lower directory merged into the parent, top
//! to bottom. A whiteout ends the search (the name is deleted); a non-directory ends it (it hides
//! everything below); a directory continues it unless it is opaque, collecting every lower
//! directory to merge.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use fuser::FileAttr;

use crate::engine::inode::{Found, Inode, InodeState, Kind, LowerEntry};
use crate::engine::layers::{self, LayerStack, Redirect};
use crate::engine::lower::{Real, RealRef};
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
        for i in 0..layers.lowers.len() {
            let dir = layers.lower_root(i)?;
            if id.is_none() {
                let st = layers.stat(dir.r())?;
                id = Some((st.st_dev, st.st_ino));
            }
            let marks = layers.marks(dir.r())?;
            lowers.push(LowerEntry {
                layer: i,
                dir,
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
    /// The entry's stat, and for a directory a handle on it.
    Present(libc::stat, Option<Real>),
    /// A directory whose inode is live (a lookup reference taken): nothing more to probe.
    Known(libc::stat, Arc<Inode>),
}

/// Where the lower layers are searched for an entry (see [`Redirect`]).
enum Target {
    /// This name in the parent's lower directories.
    Name(CString),
    /// This path from the lower layers' roots, from the given layer down.
    Path(Vec<CString>, usize),
}

/// What the lower layers hold besides the directories collected.
enum Lower {
    Nothing,
    /// A non-directory in this layer ends the search.
    File(usize),
    /// The topmost entry is a live directory inode (a lookup reference taken), in layer `.1`.
    Known(Arc<Inode>, usize, libc::stat),
}

/// Where a walk down a redirect path ended in one lower layer.
enum Walk {
    /// The path is not in this layer: the next one is searched.
    Missing,
    /// A whiteout or non-directory on the way hides the path in every layer below.
    Stop,
    /// The directory holding the last component.
    Dir {
        dir: Real,
        xwhiteouts: bool,
        /// An opaque directory on the way: the layers below are not searched.
        opaque: bool,
        /// The path for the layers below (a redirect on the way changes it).
        next: Vec<CString>,
    },
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
        dir: RealRef<'_>,
        cname: &std::ffi::CStr,
        xwhiteouts: bool,
        shown: bool,
    ) -> OpResult<Probe> {
        let st = match self.layers.stat_at(dir, cname) {
            Ok(Some(st)) => st,
            Ok(None) => return Ok(Probe::Absent),
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
            let d = self.layers.open_at(dir, cname, true)?;
            return Ok(Probe::Present(st, Some(d)));
        }
        if xwhiteouts
            && fmt == libc::S_IFREG
            && st.st_size == 0
            && self.layers.is_xattr_whiteout_at(dir, cname, &st)?
        {
            return Ok(Probe::Whiteout);
        }
        Ok(Probe::Present(st, None))
    }

    /// Searches the lower layers for an entry, as the kernel does with redirect_dir=on:
    /// a name in the parent's lower directories, or after an absolute redirect a path from
    /// the lower roots; a redirect found on a lower directory changes what the layers below
    /// it are searched for. Collects every directory to merge into `lowers`.
    fn search_lowers(
        &self,
        pst: &InodeState,
        mut target: Target,
        shown: &mut Option<(libc::stat, usize)>,
        lowers: &mut Vec<LowerEntry>,
    ) -> OpResult<Lower> {
        let nlayers = self.layers.lowers.len();
        let mut pi = 0; // next entry of the parent's lower directories (name mode)
        loop {
            // The layer directory to probe, the name in it, and whether the layers below
            // are searched after it.
            let walked;
            let (dir, layer, xwhiteouts, name, mut stop) = match &mut target {
                Target::Name(n) => {
                    let Some(l) = pst.lowers.get(pi) else { break };
                    pi += 1;
                    (l.dir.r(), l.layer, l.xwhiteouts, n.clone(), false)
                }
                Target::Path(comps, li) => {
                    if *li >= nlayers {
                        break;
                    }
                    let layer = *li;
                    *li += 1;
                    match self.walk_lower(layer, comps)? {
                        Walk::Missing => continue,
                        Walk::Stop => break,
                        Walk::Dir {
                            dir,
                            xwhiteouts,
                            opaque,
                            next,
                        } => {
                            let name = comps.last().cloned().ok_or_else(|| errno(libc::EIO))?;
                            *comps = next;
                            walked = dir;
                            (walked.r(), layer, xwhiteouts, name, opaque)
                        }
                    }
                }
            };
            let more = match &target {
                Target::Name(_) => pi < pst.lowers.len(),
                Target::Path(_, li) => *li < nlayers,
            };
            match self.probe(dir, &name, xwhiteouts, shown.is_none())? {
                Probe::Whiteout => break,
                Probe::Known(st, inode) => return Ok(Lower::Known(inode, layer + 1, st)),
                Probe::Present(st, None) => {
                    if shown.is_none() {
                        *shown = Some((st, layer + 1));
                    }
                    return Ok(Lower::File(layer));
                }
                Probe::Present(st, Some(d)) => {
                    if shown.is_none() {
                        *shown = Some((st, layer + 1));
                    }
                    let marks = self.layers.marks(d.r())?;
                    // The redirect only matters to the layers below (none below the last).
                    let redirect = if marks.opaque || layer + 1 >= nlayers {
                        None
                    } else {
                        self.layers.redirect_of(d.r())?
                    };
                    lowers.push(LowerEntry {
                        layer,
                        dir: d,
                        xwhiteouts: marks.xwhiteouts,
                    });
                    if marks.opaque {
                        break;
                    }
                    match redirect {
                        Some(Redirect::Relative(n)) => match &mut target {
                            Target::Name(t) => *t = n,
                            Target::Path(c, _) => {
                                if let Some(last) = c.last_mut() {
                                    *last = n;
                                }
                            }
                        },
                        Some(Redirect::Absolute(c)) => {
                            stop = false;
                            target = Target::Path(c, layer + 1);
                        }
                        None => {}
                    }
                }
                Probe::Absent => {
                    // An aufs-style whiteout here hides the layers further down.
                    if more
                        && self
                            .layers
                            .has_wh_marker(dir, OsStr::from_bytes(name.to_bytes()))?
                    {
                        break;
                    }
                }
            }
            if stop {
                break;
            }
        }
        Ok(Lower::Nothing)
    }

    /// Walks all but the last component of a redirect path down from the root of lower
    /// `layer`. A redirect on a directory passed changes the path for the layers below
    /// (relative: that component; absolute: everything up to it), not the walk in this one.
    fn walk_lower(&self, layer: usize, comps: &[CString]) -> OpResult<Walk> {
        let mut dir = self.layers.lower_root(layer)?;
        let mut xwhiteouts = self.layers.marks(dir.r())?.xwhiteouts;
        let mut next = comps.to_vec();
        let mut opaque = false;
        let last = comps.len().saturating_sub(1);
        for (i, c) in comps[..last].iter().enumerate() {
            let st = match self.layers.stat_at(dir.r(), c)? {
                Some(st) => st,
                None => {
                    let marker = self
                        .layers
                        .has_wh_marker(dir.r(), OsStr::from_bytes(c.to_bytes()))?;
                    return Ok(if marker { Walk::Stop } else { Walk::Missing });
                }
            };
            // A whiteout or any other non-directory ends the path in this layer and below.
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                return Ok(Walk::Stop);
            }
            let d = self.layers.open_at(dir.r(), c, true)?;
            let marks = self.layers.marks(d.r())?;
            if marks.opaque {
                opaque = true;
            } else if let Some(r) = self.layers.redirect_of(d.r())? {
                // Components after this one, kept as they are.
                let after = last - i;
                let tail = next.split_off(next.len() - after);
                match r {
                    Redirect::Relative(n) => {
                        next.pop();
                        next.push(n);
                    }
                    Redirect::Absolute(a) => {
                        opaque = false;
                        next = a;
                    }
                }
                next.extend(tail);
            }
            xwhiteouts = marks.xwhiteouts;
            dir = d;
        }
        Ok(Walk::Dir {
            dir,
            xwhiteouts,
            opaque,
            next,
        })
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
        let mut target = Target::Name(cname.clone());

        if let Some(udir) = &pst.upper {
            match self.probe(
                RealRef::Fd(udir.as_fd_borrowed()),
                &cname,
                pst.upper_xwh,
                true,
            )? {
                Probe::Whiteout => return Ok(None),
                Probe::Known(st, inode) => return Ok(Some((Resolved::Known(inode, 0), st))),
                Probe::Present(st, Some(d)) => {
                    // The upper is a directory layer.
                    let Real::Fd(fd) = d else {
                        return Err(errno(libc::EIO));
                    };
                    let marks = layers::dir_marks(fd.as_fd_borrowed())?;
                    state.opaque = marks.opaque;
                    state.upper_xwh = marks.xwhiteouts;
                    search_lower &= !state.opaque;
                    // An opaque directory's redirect is not read (the kernel's order).
                    if !state.opaque && !self.layers.lowers.is_empty() {
                        match self.layers.redirect(fd.as_fd_borrowed())? {
                            Some(Redirect::Relative(n)) => target = Target::Name(n),
                            Some(Redirect::Absolute(c)) => {
                                // From the lower roots, whatever the parent merges.
                                search_lower = true;
                                target = Target::Path(c, 0);
                            }
                            None => {}
                        }
                    }
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
            match self.search_lowers(&pst, target, &mut shown, &mut lowers)? {
                Lower::Known(inode, layer, st) => {
                    return Ok(Some((Resolved::Known(inode, layer), st)));
                }
                // A non-directory: shown if nothing is above it, else hidden by the
                // directory above.
                Lower::File(layer) if lowers.is_empty() && state.upper.is_none() => {
                    state.set_lower_layer(layer);
                }
                _ => {}
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
            if let Some(st) = self.layers.stat_at(l.dir.r(), &cname)? {
                if sys::is_whiteout_dev(&st) {
                    return Ok(false);
                }
                if l.xwhiteouts && st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size == 0 {
                    return Ok(!self.layers.is_xattr_whiteout_at(l.dir.r(), &cname, &st)?);
                }
                return Ok(true);
            }
        }
        Ok(false)
    }
}
