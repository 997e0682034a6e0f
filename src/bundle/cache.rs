//! The runtime's cache directory (`$XDG_CACHE_HOME/ovl`, or a fallback), and `--ovl-gc` of the
//! trees older versions extracted there.
//!
//! Bundles are served in place (the image is the overlay's lower), so nothing is extracted any
//! more. Runtimes before that extracted each payload once into `bundles/<id>/`, shared by every
//! bundle with that payload, with files beside each tree:
//! - `<id>.lock`: held exclusively while the tree was being extracted;
//! - `<id>.use`: held shared by every run using the tree; `--ovl-gc` removes a tree only when
//!   it can take this exclusively (no run of an old bundle uses it);
//! - `<id>.bundles`: bundle paths that ran with this id, one per line (which bundles still
//!   need the tree).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::extract::Bundle;
use crate::error::{Error, Result};

/// `$XDG_CACHE_HOME/ovl/bundles`; when that cannot be made or written (a read-only home, a
/// cache directory of another user), `$XDG_RUNTIME_DIR/ovl/bundles` or a private directory in
/// the temporary directory, with one warning line. Chosen once per process.
pub fn cache_root() -> Result<PathBuf> {
    static CHOSEN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(p) = CHOSEN.get() {
        return Ok(p.clone());
    }
    let base = dirs::cache_dir().ok_or_else(|| {
        Error::bad(
            "$XDG_CACHE_HOME",
            "no cache directory: set XDG_CACHE_HOME or HOME",
        )
    })?;
    let primary = base.join("ovl").join("bundles");
    let chosen = match usable_dir(&primary) {
        Ok(()) => primary,
        Err(why) => {
            let fallback = fallback_root()?;
            eprintln!(
                "ovl: warning: cache {} is not usable ({why}); using {} (make the cache \
                 writable or set XDG_CACHE_HOME to keep extracted apps)",
                primary.display(),
                fallback.display()
            );
            fallback
        }
    };
    Ok(CHOSEN.get_or_init(|| chosen).clone())
}

/// Makes `dir` (mode 0700) if needed and checks that we may write in it.
fn usable_dir(dir: &Path) -> std::result::Result<(), io::Error> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let c = crate::engine::sys::cstr(dir.as_os_str())?;
    // access() answers for root too where it matters here: a read-only filesystem.
    if unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `$XDG_RUNTIME_DIR/ovl/bundles`, else `<tmp>/ovl-cache-<uid>/bundles` in a directory only we
/// own (a shared temporary directory may hold someone else's dir or symlink under that name).
fn fallback_root() -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        let root = PathBuf::from(run).join("ovl").join("bundles");
        if usable_dir(&root).is_ok() {
            return Ok(root);
        }
    }
    let uid = unsafe { libc::geteuid() };
    let own = std::env::temp_dir().join(format!("ovl-cache-{uid}"));
    match fs::DirBuilder::new().mode(0o700).create(&own) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io("creating", &own, e)),
    }
    let m = fs::symlink_metadata(&own).map_err(|e| Error::io("reading", &own, e))?;
    if !m.is_dir() || m.uid() != uid || m.mode() & 0o077 != 0 {
        return Err(Error::bad(
            &own,
            "the cache is not writable and this fallback is not a private directory of ours: \
             remove it, or set XDG_CACHE_HOME to a writable directory",
        ));
    }
    let root = own.join("bundles");
    usable_dir(&root).map_err(|e| Error::io("creating", &root, e))?;
    Ok(root)
}

fn lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io("opening lock", path, e))
}

/// flock, retried on EINTR; `Ok(false)` when non-blocking and busy.
fn flock(f: &File, op: i32, path: &Path) -> Result<bool> {
    loop {
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if op & libc::LOCK_NB != 0 => return Ok(false),
            _ => return Err(Error::io("locking", path, e)),
        }
    }
}

/// Removes leftover temporaries named `<prefix>*` (a killed extraction or gc). Callers hold
/// the lock that every writer of such names holds, so none of them is in use.
fn remove_stale_temps(root: &Path, prefix: &str) {
    let Ok(rd) = fs::read_dir(root) else { return };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            let _ = crate::finalize::remove_dir_tree(&e.path());
        }
    }
}

/// What `--ovl-gc` did.
#[derive(Debug, Default)]
pub struct GcReport {
    pub removed: Vec<String>,
    pub kept: usize,
    pub busy: usize,
    pub bytes_freed: u64,
}

fn tree_bytes(p: &Path) -> u64 {
    let mut n = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if let Ok(md) = e.metadata() {
                if md.is_dir() {
                    stack.push(e.path());
                } else {
                    n += md.len();
                }
            }
        }
    }
    n
}

/// Removes cached trees that no existing bundle uses any more: every bundle recorded as
/// using it is gone or now has another payload (it was committed or rebuilt), and no run
/// holds it. `keep` is kept regardless (the bundle running the gc).
pub fn gc(keep: &str) -> Result<GcReport> {
    let root = cache_root()?;
    let mut report = GcReport::default();
    let Ok(rd) = fs::read_dir(&root) else {
        return Ok(report);
    };
    let mut ids: Vec<String> = rd
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    ids.sort();
    for id in ids {
        let users = fs::read(root.join(format!("{id}.bundles"))).unwrap_or_default();
        let needed = id == keep
            || users
                .split(|&c| c == b'\n')
                .filter(|l| !l.is_empty())
                .any(|l| {
                    let p = Path::new(std::ffi::OsStr::from_bytes(l));
                    Bundle::open(p).is_ok_and(|b| b.id() == id)
                });
        if needed {
            report.kept += 1;
            continue;
        }
        let use_path = root.join(format!("{id}.use"));
        let lock = lock_file(&use_path)?;
        if !flock(&lock, libc::LOCK_EX | libc::LOCK_NB, &use_path)? {
            report.busy += 1;
            continue;
        }
        // Also exclusive against an extraction of this id (it removes `.tmp-<id>-*`).
        let lock_path = root.join(format!("{id}.lock"));
        let xlock = lock_file(&lock_path)?;
        if !flock(&xlock, libc::LOCK_EX | libc::LOCK_NB, &lock_path)? {
            report.busy += 1;
            continue;
        }
        let tree = root.join(&id);
        let bytes = tree_bytes(&tree);
        // Renamed away first: a crash mid-removal leaves a `.tmp-<id>-` tree that the next
        // extraction or gc of this id removes, never a partial tree under the id's name.
        let trash = root.join(format!(".tmp-{id}-gc"));
        remove_stale_temps(&root, &format!(".tmp-{id}-"));
        fs::rename(&tree, &trash).map_err(|e| Error::io("removing", &tree, e))?;
        crate::finalize::remove_dir_tree(&trash)?;
        // The lock files stay: a run waiting on them must find the same files afterwards.
        let _ = fs::remove_file(root.join(format!("{id}.bundles")));
        report.removed.push(id);
        report.bytes_freed += bytes;
    }
    Ok(report)
}
