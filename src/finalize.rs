//! Finalizations: what happens to the upper layer once the work is done.
//!
//! A layer above the engine: it works on the layer directories with the overlay unmounted.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::engine::sys::{self, BorrowFd};
use crate::error::{Error, Result};

/// What to do with the upper layer after unmounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OverlayAction {
    /// Keep the upper as it is (a later mount, or the kernel, can use it again).
    #[default]
    Preserve,
    /// Remove the upper and the work directory.
    Discard,
    /// Merge the upper into the lower, file by file, each file replaced atomically.
    Commit,
    /// Switch the whole lower from old to new in one step.
    CommitAtomic,
}

impl std::str::FromStr for OverlayAction {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "preserve" => Ok(Self::Preserve),
            "discard" => Ok(Self::Discard),
            "commit" => Ok(Self::Commit),
            "commit-atomic" => Ok(Self::CommitAtomic),
            _ => Err(format!(
                "unknown finalization '{s}': use preserve, discard, commit or commit-atomic"
            )),
        }
    }
}

/// The outcome of a finalization, printed by ovl-run in one line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub action: OverlayAction,
    /// Where the outcome landed (the upper for Preserve/Discard, the lower for commits).
    pub path: PathBuf,
    /// Entries in the upper (files, directories, whiteouts) when it was finalized, or, with a
    /// [`Baseline`], the entries created, changed or removed since it was taken.
    pub changes: u64,
    /// Files written into the lower (commits).
    pub written: u64,
    /// Files left untouched because they were identical (commits).
    pub deduplicated: u64,
    /// Entries deleted from the lower (commits).
    pub deleted: u64,
    /// Directories whose content was replaced (opaque directories, commits).
    pub dirs_replaced: u64,
    /// Bytes written into the lower (commits).
    pub bytes: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.path.display();
        match self.action {
            OverlayAction::Preserve => write!(f, "preserved {} changes in {p}", self.changes),
            OverlayAction::Discard => write!(f, "discarded {} changes from {p}", self.changes),
            OverlayAction::Commit | OverlayAction::CommitAtomic => write!(
                f,
                "committed {} files, {} deletions, {} replaced directories ({} unchanged, {} bytes) into {p}{}",
                self.written,
                self.deleted,
                self.dirs_replaced,
                self.deduplicated,
                self.bytes,
                if self.action == OverlayAction::CommitAtomic {
                    " atomically"
                } else {
                    ""
                }
            ),
        }
    }
}

/// Counts the entries of a tree without following symlinks.
pub fn count_entries(dir: &Path) -> Result<u64> {
    fn walk(fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<u64> {
        let mut n = 0;
        for e in sys::read_dir(fd)? {
            n += 1;
            if e.dtype == libc::DT_DIR {
                let c = std::ffi::CString::new(e.name).map_err(std::io::Error::other)?;
                let sub = sys::openat(fd, &c, libc::O_PATH | libc::O_DIRECTORY, 0)?;
                n += walk(sub.as_fd_borrowed())?;
            }
        }
        Ok(n)
    }
    if !dir.exists() {
        return Ok(0);
    }
    let fd = sys::open_dir_path(dir).map_err(|e| Error::io("reading", dir, e))?;
    walk(fd.as_fd_borrowed()).map_err(|e| Error::io("reading", dir, e))
}

/// The entries of an upper before a run (inode number and change time of each), so that
/// the run's own changes can be counted afterwards: an entry whose change time moved was
/// written (the kernel sets it on every change; nobody can set it back).
#[derive(Debug, Default)]
pub struct Baseline {
    entries: std::collections::HashMap<u64, (i64, i64)>,
}

fn walk_stats(
    fd: std::os::fd::BorrowedFd<'_>,
    f: &mut dyn FnMut(&libc::stat),
) -> std::io::Result<()> {
    for e in sys::read_dir(fd)? {
        let c = std::ffi::CString::new(e.name).map_err(std::io::Error::other)?;
        let Some(st) = sys::fstatat_opt(fd, &c)? else {
            continue;
        };
        f(&st);
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let sub = sys::openat(fd, &c, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            walk_stats(sub.as_fd_borrowed(), f)?;
        }
    }
    Ok(())
}

impl Baseline {
    /// Records every entry below `dir` (nothing when it does not exist yet).
    pub fn take(dir: &Path) -> Result<Baseline> {
        let mut b = Baseline::default();
        if !dir.exists() {
            return Ok(b);
        }
        let fd = sys::open_dir_path(dir).map_err(|e| Error::io("reading", dir, e))?;
        walk_stats(fd.as_fd_borrowed(), &mut |st| {
            b.entries.insert(st.st_ino, (st.st_ctime, st.st_ctime_nsec));
        })
        .map_err(|e| Error::io("reading", dir, e))?;
        Ok(b)
    }

    /// Entries below `dir` created or changed since the baseline, plus those removed.
    pub fn changes(&self, dir: &Path) -> Result<u64> {
        if !dir.exists() {
            return Ok(self.entries.len() as u64);
        }
        let fd = sys::open_dir_path(dir).map_err(|e| Error::io("reading", dir, e))?;
        let (mut changed, mut kept) = (0u64, 0u64);
        walk_stats(
            fd.as_fd_borrowed(),
            &mut |st| match self.entries.get(&st.st_ino) {
                Some(&t) if t == (st.st_ctime, st.st_ctime_nsec) => kept += 1,
                Some(_) => {
                    kept += 1;
                    changed += 1
                }
                None => changed += 1,
            },
        )
        .map_err(|e| Error::io("reading", dir, e))?;
        // Entries still there matched one recorded each (inode numbers are unique per
        // filesystem); the rest of the recorded ones are gone.
        Ok(changed + (self.entries.len() as u64).saturating_sub(kept))
    }
}

/// Removes a directory tree, never following a symlink out of it.
pub fn remove_dir_tree(path: &Path) -> Result<()> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Error::bad(path, "refusing to remove a filesystem root"));
    };
    let pfd = sys::open_dir_path(if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    })
    .map_err(|e| Error::io("opening", parent, e))?;
    let cname = sys::cstr(name).map_err(|e| Error::io("removing", path, e))?;
    sys::remove_tree(pfd.as_fd_borrowed(), &cname).map_err(|e| Error::io("removing", path, e))
}

impl crate::OverlayFS {
    /// Unmounts (if mounted) and applies a finalization to the upper layer.
    pub fn overlay_action(&mut self, action: OverlayAction) -> Result<Report> {
        self.overlay_action_since(action, None)
    }

    /// [`OverlayFS::overlay_action`], reporting as changes only what changed in the upper
    /// since `baseline` (taken before mounting): a run's own changes on top of a kept upper.
    pub fn overlay_action_since(
        &mut self,
        action: OverlayAction,
        baseline: Option<&Baseline>,
    ) -> Result<Report> {
        self.umount()?;
        let upper = self
            .upper()
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::bad("", "no upper layer: there is nothing to finalize"))?;
        let changes = match baseline {
            Some(b) => b.changes(&upper)?,
            None => count_entries(&upper)?,
        };
        let mut report = Report {
            action,
            path: upper.clone(),
            changes,
            ..Default::default()
        };
        match action {
            OverlayAction::Preserve => {}
            OverlayAction::Discard => {
                if upper.exists() {
                    remove_dir_tree(&upper)?;
                }
                if let Some(w) = self.workdir().filter(|w| w.exists()) {
                    remove_dir_tree(&w)?;
                }
            }
            OverlayAction::Commit | OverlayAction::CommitAtomic => {
                if self.has_image_lower() {
                    return Err(Error::bad(
                        &self.lowers()[0],
                        "commit cannot write into an image: keep the upper (preserve), or pack \
                         the merged tree with ovl-pack",
                    ));
                }
                if self.lowers().len() > 1 {
                    return Err(Error::bad(
                        &self.lowers()[0],
                        "commit needs a single lower directory: merge the lowers first",
                    ));
                }
                let work = self
                    .workdir()
                    .unwrap_or_else(|| crate::overlayfs::default_workdir(&upper));
                let lower = self.lowers()[0]
                    .canonicalize()
                    .map_err(|e| Error::io("resolving", &self.lowers()[0], e))?;
                report = crate::commit::commit(
                    &lower,
                    &upper,
                    &work,
                    action == OverlayAction::CommitAtomic,
                )?;
            }
        }
        Ok(report)
    }
}
