//! A kept upper shared by runs: who may use it (a lock file beside it), and where a run that
//! must not change it puts its own changes (a scratch upper beside it, on the same filesystem,
//! removed afterwards, or by a later run if this one was killed).
//!
//! A discard run stacks the kept upper as its topmost lower: it sees the earlier runs' work
//! and never writes it, so however it ends (SIGKILL included) the kept upper stays as it was.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::overlayfs::hidden_sibling;

fn same_file(f: &fs::File, path: &Path) -> bool {
    match (f.metadata(), fs::symlink_metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn flock(f: &fs::File, op: libc::c_int) -> bool {
    unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) == 0 }
}

/// Opens `path` (creating it) and locks it with `op`, making sure the lock is on the file the
/// path names: a run that removes a lock file does so holding it exclusively, and whoever
/// opened the removed file before finds that out here and tries again. `None`: held by others.
fn lock_file(path: &Path, op: libc::c_int) -> io::Result<Option<fs::File>> {
    for _ in 0..100 {
        let file = match fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                match fs::OpenOptions::new().read(true).write(true).open(path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        if !flock(&file, op) {
            return Ok(None);
        }
        if same_file(&file, path) {
            return Ok(Some(file));
        }
    }
    Err(io::Error::other("the lock file keeps being replaced"))
}

/// A run's hold on an upper. Writers (preserve, commit, discard-all) are exclusive: two
/// runs writing one upper would corrupt it. Discard runs only read it and share.
#[derive(Debug)]
pub struct UpperLock {
    file: fs::File,
    path: PathBuf,
}

impl UpperLock {
    /// Locks `upper` (whose parent must exist). A reader first finishes a commit a crash
    /// interrupted in the upper's work dir (which needs the upper to itself), so that it reads
    /// the upper as the commit left it.
    pub fn acquire(upper: &Path, writer: bool) -> Result<UpperLock, String> {
        let path = hidden_sibling(upper, ".ovl-lock");
        let busy = || {
            format!(
                "{}: another ovl-run is using this upper; wait for it to finish, or give this \
                 run another --upper DIR{}",
                upper.display(),
                if writer { " or --on-exit discard" } else { "" }
            )
        };
        let io_err = |e: io::Error| match e.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => format!(
                "{}: cannot make its lock file {} ({e}): choose an upper directory where you \
                 may write",
                upper.display(),
                path.display()
            ),
            _ => format!("locking {}: {e}", path.display()),
        };
        if let Some(file) = lock_file(&path, libc::LOCK_EX).map_err(io_err)? {
            let lock = UpperLock {
                file,
                path: path.clone(),
            };
            if writer {
                return Ok(lock);
            }
            let work = crate::overlayfs::default_workdir(upper);
            if work.is_dir() && upper.is_dir() {
                crate::commit::recover(&work, upper).map_err(|e| e.to_string())?;
            }
            // Not atomic: a writer may slip in between, then this run waits for another time.
            if !flock(&lock.file, libc::LOCK_SH) {
                return Err(busy());
            }
            return Ok(lock);
        }
        if writer {
            return Err(busy());
        }
        match lock_file(&path, libc::LOCK_SH).map_err(io_err)? {
            Some(file) => Ok(UpperLock { file, path }),
            None => Err(busy()),
        }
    }

    /// Releases the lock, removing the lock file unless another run holds it (a lock file
    /// is there only while runs are).
    pub fn release(self) {
        if flock(&self.file, libc::LOCK_EX) && same_file(&self.file, &self.path) {
            let _ = fs::remove_file(&self.path);
        }
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
        remove_dead_scratch(upper);
        let parent = upper.parent().unwrap_or(Path::new("/"));
        let prefix = scratch_prefix(upper);
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
        Err(format!(
            "{}: no free scratch name beside it",
            upper.display()
        ))
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

/// Removes the scratch dirs beside `upper` of runs that are gone (their lock file can be
/// locked). The dir goes first, the lock file last, while locked.
pub fn remove_dead_scratch(upper: &Path) {
    let parent = upper.parent().unwrap_or(Path::new("/"));
    let prefix = scratch_prefix(upper);
    let Ok(rd) = fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(base) = name
            .strip_prefix(&prefix)
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
