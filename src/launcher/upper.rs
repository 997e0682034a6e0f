//! A kept upper shared by runs: who may use it (a lock on the upper directory), and where a
//! run that must not change it puts its own changes (a scratch upper beside it, on the same
//! filesystem, removed afterwards, or by a later run if this one was killed).
//!
//! A discard run stacks the kept upper as its topmost lower: it sees the earlier runs' work
//! and never writes it, so however it ends (SIGKILL included) the kept upper stays as it was.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::overlayfs::hidden_sibling;

/// Whether `path` (followed, as it was opened) still names the file `f` holds.
fn same_file(f: &fs::File, path: &Path) -> bool {
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn flock(f: &fs::File, op: libc::c_int) -> bool {
    unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) == 0 }
}

/// Opens the directory `path` and locks it with `op`, making sure the lock is on the
/// directory the path names (a run that removes an upper does so holding it exclusively, and
/// whoever opened the removed one first finds that out here and tries again). A writer
/// creates the directory when missing. `Ok(None)`: (a reader) there is no upper; held by
/// others: `WouldBlock`.
fn lock_dir(path: &Path, op: libc::c_int, create: bool) -> io::Result<Option<fs::File>> {
    for _ in 0..100 {
        if create {
            match fs::create_dir(path) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        let dir = match fs::File::open(path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if create {
                    continue;
                }
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if !flock(&dir, op) {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        if same_file(&dir, path) {
            return Ok(Some(dir));
        }
    }
    Err(io::Error::other("the directory keeps being replaced"))
}

/// A run's hold on an upper: a lock on the upper directory itself (nothing is added beside
/// it, so a killed run leaves nothing). Writers (preserve, commit, discard-all) are
/// exclusive: two runs writing one upper would corrupt it. Discard runs only read it and
/// share.
#[derive(Debug)]
pub struct UpperLock {
    _dir: Option<fs::File>,
}

impl UpperLock {
    /// Locks `upper` (whose parent must exist; a writer creates it). A reader first finishes
    /// a commit a crash interrupted in the upper's work dir (which needs the upper to itself),
    /// so that it reads the upper as the commit left it.
    pub fn acquire(upper: &Path, writer: bool) -> Result<UpperLock, String> {
        let busy = || {
            format!(
                "{}: another ovl-run is using this upper; wait for it to finish, or give this \
                 run another --upper DIR{}",
                upper.display(),
                if writer { " or --on-exit discard" } else { "" }
            )
        };
        let err = |e: io::Error| match e.kind() {
            io::ErrorKind::WouldBlock => busy(),
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => format!(
                "{}: cannot create or open the upper directory ({e}): choose an upper \
                 directory where you may write",
                upper.display()
            ),
            _ => format!("locking {}: {e}", upper.display()),
        };
        if writer {
            let dir = lock_dir(upper, libc::LOCK_EX, true).map_err(err)?;
            return Ok(UpperLock { _dir: dir });
        }
        // A reader: alone, it first finishes a commit a crash interrupted (recovery writes);
        // sharing with other readers, one of them did (writers are kept out meanwhile).
        let dir = match lock_dir(upper, libc::LOCK_EX, false) {
            Ok(Some(dir)) => {
                let work = crate::overlayfs::default_workdir(upper);
                if work.is_dir() {
                    crate::commit::recover(&work, upper).map_err(|e| e.to_string())?;
                }
                // Not atomic: a writer may slip in between, then this run waits for later.
                if !flock(&dir, libc::LOCK_SH) {
                    return Err(busy());
                }
                dir
            }
            Ok(None) => return Ok(UpperLock { _dir: None }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                match lock_dir(upper, libc::LOCK_SH, false).map_err(err)? {
                    Some(dir) => dir,
                    None => return Ok(UpperLock { _dir: None }),
                }
            }
            Err(e) => return Err(err(e)),
        };
        Ok(UpperLock { _dir: Some(dir) })
    }
}

/// A discard run's own upper and work dir: `.<upper>.ovl-scratch-<pid>-<n>/` beside the kept
/// upper, alive while `<that>.lock` is locked. Removed on drop; a killed run's is removed by
/// the next run ([`remove_dead_scratch`]).
#[derive(Debug)]
pub struct Scratch {
    /// The scratch directory (holding `upper` and `work`).
    pub dir: PathBuf,
    lock_path: PathBuf,
    _lock: fs::File,
}

fn scratch_prefix(upper: &Path) -> String {
    hidden_sibling(upper, ".ovl-scratch-")
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Scratch {
    /// Makes a fresh scratch dir beside `upper` (whose parent must exist).
    pub fn beside(upper: &Path) -> Result<Scratch, String> {
        let parent = upper.parent().unwrap_or(Path::new("/"));
        Self::create_in(parent, &scratch_prefix(upper))
    }

    /// Makes a fresh scratch dir `<prefix><pid>-<n>` in `parent`, after removing those of
    /// runs that are gone (the bundle runtime keeps its runs' dirs this way too).
    pub fn create_in(parent: &Path, prefix: &str) -> Result<Scratch, String> {
        remove_dead_scratch_in(parent, prefix);
        for n in 0u32..100 {
            let dir = parent.join(format!("{prefix}{}-{n}", std::process::id()));
            let mut lock_path = dir.clone().into_os_string();
            lock_path.push(".lock");
            let lock_path = PathBuf::from(lock_path);
            let lock = match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock_path)
            {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("creating {}: {e}", lock_path.display())),
            };
            // A cleaner may have locked, judged dead and removed the file in between.
            if !flock(&lock, libc::LOCK_EX) || !same_file(&lock, &lock_path) {
                continue;
            }
            if dir.symlink_metadata().is_ok() {
                crate::finalize::remove_dir_tree(&dir).map_err(|e| e.to_string())?;
            }
            fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
            return Ok(Scratch {
                dir,
                lock_path,
                _lock: lock,
            });
        }
        Err(format!("{}: no free scratch name in it", parent.display()))
    }

    /// The scratch upper.
    pub fn upper(&self) -> PathBuf {
        self.dir.join("upper")
    }

    /// The scratch work dir.
    pub fn work(&self) -> PathBuf {
        self.dir.join("work")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Left for the next run's cleanup if it cannot go now; the lock file goes last.
        if crate::finalize::remove_dir_tree(&self.dir).is_ok() {
            let _ = fs::remove_file(&self.lock_path);
        }
    }
}

/// Removes the scratch dirs beside `upper` of runs that are gone.
pub fn remove_dead_scratch(upper: &Path) {
    let parent = upper.parent().unwrap_or(Path::new("/"));
    remove_dead_scratch_in(parent, &scratch_prefix(upper));
}

/// Removes the scratch dirs `<prefix>*` in `parent` of runs that are gone (their lock file can
/// be locked). The dir goes first, the lock file last, while locked.
pub fn remove_dead_scratch_in(parent: &Path, prefix: &str) {
    let Ok(rd) = fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(base) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(".lock"))
        else {
            continue;
        };
        let Ok(f) = fs::File::open(e.path()) else {
            continue;
        };
        if flock(&f, libc::LOCK_EX) && same_file(&f, &e.path()) {
            let dir = parent.join(format!("{prefix}{base}"));
            if dir.symlink_metadata().is_err() || crate::finalize::remove_dir_tree(&dir).is_ok() {
                log::info!(
                    "removed the scratch dir of a run that is gone: {}",
                    dir.display()
                );
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Creates `dir` and its missing parents; returns the ones made (deepest first), so a run
/// that ends up leaving nothing can remove them again with [`remove_created`].
pub fn create_dir_all_tracked(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let made = missing_dirs(dir);
    fs::create_dir_all(dir)?;
    Ok(made)
}

/// `p` and its ancestors that do not exist yet, deepest first.
pub fn missing_dirs(p: &Path) -> Vec<PathBuf> {
    p.ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && a.symlink_metadata().is_err())
        .map(Path::to_path_buf)
        .collect()
}

/// Removes directories [`create_dir_all_tracked`] made, if still empty (deepest first).
pub fn remove_created(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = fs::remove_dir(d);
    }
}
