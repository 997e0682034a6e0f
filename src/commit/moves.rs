//! Directory renames in the upper (`overlay.redirect`, the kernel's redirect_dir format),
//! applied to the lower as moves of the lower directories, never as copies.
//!
//! Before anything changes, the upper is read for every redirected directory and where its
//! lower content is (the same resolution the mount does): that is the plan, journaled before
//! the first move. Then every source is detached into the staging directory (deepest first, so
//! each is still at its path), and the merge attaches each one at its new path when it gets
//! there, then merges the upper into it as usual. Each step is one rename; the state on disk
//! tells how far a move got (its source still holds the journaled inode, or it waits in
//! staging, or it is in place), so an interrupted commit is finished from the journal.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{cname, io_err, is_dir, step};
use crate::engine::layers::{self, Redirect, WH_PREFIX};
use crate::engine::sys::{self, BorrowFd};
use crate::error::{Error, Result};

/// One directory rename: the lower directory at `src` (relative to the lower root, inode
/// `ino`) goes to `dst`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Move {
    pub(super) src: PathBuf,
    pub(super) dst: PathBuf,
    pub(super) ino: u64,
}

/// What the upper's redirects mean for the merge.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// The moves, in journal order (index = staging name).
    pub(super) moves: Vec<Move>,
    /// Every redirected directory (by path) and the lower directory it shows, if any.
    pub(super) redirected: HashMap<PathBuf, Option<PathBuf>>,
}

/// The xattr namespace whose redirects count: the one a mount by this user reads.
pub(super) fn prefix() -> &'static str {
    if unsafe { libc::geteuid() } == 0 {
        "trusted."
    } else {
        "user."
    }
}

/// Staging name of move `k` while detached.
pub(super) fn staged_name(k: usize) -> CString {
    CString::new(format!("m{k:x}")).expect("no NUL")
}

/// Staging name of what a move displaced at its destination (hidden by it, removed).
fn displaced_name(k: usize) -> CString {
    CString::new(format!("x{k:x}")).expect("no NUL")
}

fn open_dir_nofollow(dir: BorrowedFd<'_>, name: &CStr) -> std::io::Result<Option<OwnedFd>> {
    match sys::openat(
        dir,
        name,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Opens the lower directory at `rel`, never following a symlink; `None` if it is not one.
fn open_lower(lower: BorrowedFd<'_>, rel: &Path) -> Result<Option<OwnedFd>> {
    let mut fd = sys::open_path(lower, c".").map_err(io_err("opening", rel))?;
    for c in rel.iter() {
        let c = cname(c.as_bytes())?;
        match open_dir_nofollow(fd.as_fd_borrowed(), &c).map_err(io_err("opening", rel))? {
            Some(next) => fd = next,
            None => return Ok(None),
        }
    }
    Ok(Some(fd))
}

/// Reads the plan from the upper and the lower (before either changes).
pub(super) fn plan(upper: BorrowedFd<'_>, lower: BorrowedFd<'_>) -> Result<Plan> {
    let mut p = Plan::default();
    let root = sys::open_path(lower, c".").map_err(io_err("opening", Path::new("")))?;
    let opaque = layers::is_opaque_dir(upper).map_err(io_err("reading", Path::new("")))?;
    let lsrc = (!opaque).then(|| (PathBuf::new(), root));
    walk(upper, Path::new(""), lsrc, lower, &mut p)?;
    let mut seen = HashSet::new();
    for m in &p.moves {
        if !seen.insert(m.src.clone()) {
            return Err(Error::bad(
                m.dst.clone(),
                format!(
                    "two directories of the upper redirect to the lower directory {}: fix \
                     their overlay.redirect xattrs, then commit again",
                    m.src.display()
                ),
            ));
        }
    }
    order(&mut p.moves);
    Ok(p)
}

/// Deepest sources first (each is detached while still at its path), then by destination:
/// one order from the plan and from the journal, as a move's index names it in staging.
fn order(moves: &mut [Move]) {
    moves.sort_by(|a, b| {
        (std::cmp::Reverse(a.src.components().count()), &a.dst)
            .cmp(&(std::cmp::Reverse(b.src.components().count()), &b.dst))
    });
}

fn walk(
    udir: BorrowedFd<'_>,
    upath: &Path,
    lsrc: Option<(PathBuf, OwnedFd)>,
    lower: BorrowedFd<'_>,
    p: &mut Plan,
) -> Result<()> {
    for e in sys::read_dir(udir).map_err(io_err("reading", upath))? {
        if e.name.starts_with(WH_PREFIX) || !matches!(e.dtype, libc::DT_DIR | libc::DT_UNKNOWN) {
            continue;
        }
        let c = cname(&e.name)?;
        let path = upath.join(OsStr::from_bytes(&e.name));
        let Some(child) = open_dir_nofollow(udir, &c).map_err(io_err("reading", &path))? else {
            continue;
        };
        let opaque =
            layers::is_opaque_dir(child.as_fd_borrowed()).map_err(io_err("reading", &path))?;
        let redirect = if opaque {
            None
        } else {
            layers::read_redirect(child.as_fd_borrowed(), prefix())
                .map_err(io_err("reading the redirect of", &path))?
        };
        if redirect.is_none() && !opaque && prefix() == "trusted." {
            // A normal user's mount renamed this directory: root does not follow such
            // redirects (see `LayerStack::redirect`), and merging it as it stands would lose
            // the moved content (its old name is whited out).
            let user = layers::read_redirect(child.as_fd_borrowed(), "user.")
                .map_err(io_err("reading the redirect of", &path))?;
            if user.is_some() {
                return Err(Error::bad(
                    &path,
                    "renamed by a normal user's mount (user.overlay.redirect): commit it as \
                     the user who owns the upper",
                ));
            }
        }
        // Where the kernel would look for this directory's lower content.
        let src = match (&redirect, &lsrc) {
            _ if opaque => None,
            (Some(Redirect::Absolute(comps)), _) => {
                let rel: PathBuf = comps
                    .iter()
                    .map(|c| OsStr::from_bytes(c.to_bytes()))
                    .collect();
                open_lower(lower, &rel)?.map(|fd| (rel, fd))
            }
            (Some(Redirect::Relative(n)), Some((pp, pfd))) => {
                open_dir_nofollow(pfd.as_fd_borrowed(), n)
                    .map_err(io_err("reading", &path))?
                    .map(|fd| (pp.join(OsStr::from_bytes(n.to_bytes())), fd))
            }
            (None, Some((pp, pfd))) => open_dir_nofollow(pfd.as_fd_borrowed(), &c)
                .map_err(io_err("reading", &path))?
                .map(|fd| (pp.join(OsStr::from_bytes(&e.name)), fd)),
            _ => None,
        };
        if redirect.is_some() {
            let s = src.as_ref().map(|(sp, _)| sp.clone());
            if let Some((sp, fd)) = &src {
                if *sp != path {
                    let st = sys::fstat(fd.as_fd_borrowed()).map_err(io_err("reading", sp))?;
                    p.moves.push(Move {
                        src: sp.clone(),
                        dst: path.clone(),
                        ino: st.st_ino,
                    });
                }
            }
            p.redirected.insert(path.clone(), s);
        }
        walk(child.as_fd_borrowed(), &path, src, lower, p)?;
    }
    Ok(())
}

/// Clears what an interrupted run left in `staging` besides the detached directories:
/// half-written temporaries and displaced entries, garbage either way.
pub(super) fn clear_leftovers(staging: BorrowedFd<'_>, moves: usize) -> Result<()> {
    let keep: HashSet<Vec<u8>> = (0..moves).map(|k| staged_name(k).into_bytes()).collect();
    for e in sys::read_dir(staging).map_err(io_err("reading", Path::new("staging")))? {
        if !keep.contains(&e.name) {
            let c = cname(&e.name)?;
            sys::remove_tree(staging, &c).map_err(io_err("deleting", Path::new("staging")))?;
        }
    }
    Ok(())
}

/// Detaches every source not detached yet into `staging` (its name there: its index in
/// `moves`, which are deepest first). A source whose path no longer holds its inode was
/// detached by an interrupted run.
pub(super) fn detach_all(
    moves: &[Move],
    lower: BorrowedFd<'_>,
    staging: BorrowedFd<'_>,
) -> Result<()> {
    for (k, m) in moves.iter().enumerate() {
        let (Some(parent), Some(name)) = (m.src.parent(), m.src.file_name()) else {
            return Err(Error::bad(&m.src, "a redirect names the lower root"));
        };
        let Some(pfd) = open_lower(lower, parent)? else {
            continue;
        };
        let c = cname(name.as_bytes())?;
        let here = sys::fstatat_opt(pfd.as_fd_borrowed(), &c).map_err(io_err("reading", &m.src))?;
        if !here.is_some_and(|st| is_dir(&st) && st.st_ino == m.ino) {
            continue;
        }
        sys::renameat2(
            pfd.as_fd_borrowed(),
            &c,
            staging,
            &staged_name(k),
            libc::RENAME_NOREPLACE,
        )
        .map_err(io_err("moving", &m.src))?;
        step();
    }
    Ok(())
}

/// Puts move `k`'s directory at `name` in `ldir` (its destination), if it still waits in
/// staging (else an interrupted run did): whatever the lower has there is hidden by it and
/// goes.
pub(super) fn attach(
    k: usize,
    staging: BorrowedFd<'_>,
    ldir: BorrowedFd<'_>,
    name: &CStr,
    path: &Path,
) -> Result<()> {
    let staged = staged_name(k);
    if sys::fstatat_opt(staging, &staged)
        .map_err(io_err("reading", path))?
        .is_none()
    {
        return Ok(());
    }
    // Two steps, so a leftover in staging is never mistaken for the moved directory.
    let displaced = displaced_name(k);
    if sys::fstatat_opt(ldir, name)
        .map_err(io_err("reading", path))?
        .is_some()
    {
        sys::renameat2(ldir, name, staging, &displaced, libc::RENAME_NOREPLACE)
            .map_err(io_err("replacing", path))?;
        step();
    }
    sys::renameat2(staging, &staged, ldir, name, libc::RENAME_NOREPLACE)
        .map_err(io_err("moving into", path))?;
    step();
    if sys::fstatat_opt(staging, &displaced)
        .map_err(io_err("reading", path))?
        .is_some()
    {
        sys::remove_tree(staging, &displaced).map_err(io_err("deleting old", path))?;
    }
    Ok(())
}

impl Plan {
    /// The plan as the journal keeps it.
    pub(super) fn to_journal(&self) -> Vec<(PathBuf, Option<PathBuf>, u64)> {
        let ino: HashMap<&PathBuf, u64> = self.moves.iter().map(|m| (&m.dst, m.ino)).collect();
        let mut v: Vec<_> = self
            .redirected
            .iter()
            .map(|(dst, src)| (dst.clone(), src.clone(), ino.get(dst).copied().unwrap_or(0)))
            .collect();
        v.sort();
        v
    }

    /// The plan of an interrupted run, from its journal.
    pub(super) fn from_journal(entries: &[(PathBuf, Option<PathBuf>, u64)]) -> Plan {
        let mut p = Plan::default();
        for (dst, src, ino) in entries {
            if let Some(s) = src {
                if s != dst {
                    p.moves.push(Move {
                        src: s.clone(),
                        dst: dst.clone(),
                        ino: *ino,
                    });
                }
            }
            p.redirected.insert(dst.clone(), src.clone());
        }
        order(&mut p.moves);
        p
    }
}
