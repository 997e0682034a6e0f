//! The cache of extracted bundle trees: `$XDG_CACHE_HOME/ovl/bundles/<id>/`, one per payload
//! id, shared read-only by every run of every bundle with that payload.
//!
//! Files beside each tree:
//! - `<id>.lock`: held exclusively while the tree is being extracted, so parallel first runs
//!   extract once (the others wait, then find the tree).
//! - `<id>.use`: held shared by every run using the tree; `--ovl-gc` removes a tree only when
//!   it can take this exclusively (no run uses it).
//! - `<id>.bundles`: bundle paths that ran with this id, one per line (which bundles still
//!   need the tree, for `--ovl-gc`).
//!
//! A tree appears in one `rename` from `.tmp-<id>-<pid>` after its data is synced, so a crash
//! or a kill never leaves a half-extracted tree under its final name.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::extract::Bundle;
use crate::error::{Error, Result};

/// A cached tree in use: the shared lock lives as long as this.
#[derive(Debug)]
pub struct CachedTree {
    pub path: PathBuf,
    _use_lock: File,
}

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

/// Whether `f` (locked) is still the file at `path`: a failed first run unlinks its lock
/// files, so a lock taken on an unlinked file protects nothing and must be taken again.
fn is_current(f: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
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

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Returns the bundle's tree, extracting it first if no run has yet. Holds the tree's use
/// lock until the returned value is dropped.
pub fn tree_for(bundle: &Bundle) -> Result<CachedTree> {
    let root = cache_root()?;
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(|e| Error::io("creating", &root, e))?;
    }
    let id = bundle.id();
    let tree = root.join(&id);
    let use_path = root.join(format!("{id}.use"));
    loop {
        let use_lock = lock_file(&use_path)?;
        flock(&use_lock, libc::LOCK_SH, &use_path)?;
        if !is_current(&use_lock, &use_path) {
            continue;
        }
        // Under the shared lock gc cannot remove the tree: if it is there, it stays.
        if tree.is_dir() {
            record_user(&root, &id, bundle.path());
            return Ok(CachedTree {
                path: tree,
                _use_lock: use_lock,
            });
        }
        drop(use_lock);
        let lock_path = root.join(format!("{id}.lock"));
        let lock = lock_file(&lock_path)?;
        flock(&lock, libc::LOCK_EX, &lock_path)?;
        if !is_current(&lock, &lock_path) {
            continue;
        }
        if !tree.is_dir() {
            // Under this id's lock no one else extracts it: its temporaries are leftovers.
            remove_stale_temps(&root, &format!(".tmp-{id}-"));
            let tmp = root.join(format!(".tmp-{id}-{}", std::process::id()));
            if tmp.exists() {
                crate::finalize::remove_dir_tree(&tmp)?;
            }
            fs::create_dir(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
            let res = bundle.extract_to(&tmp, 0).and_then(|()| {
                // One syncfs instead of an fsync per file: the data is durable before the
                // tree gets its final name.
                let d = File::open(&tmp).map_err(|e| Error::io("opening", &tmp, e))?;
                if unsafe { libc::syncfs(d.as_raw_fd()) } < 0 {
                    return Err(Error::io("syncing", &tmp, io::Error::last_os_error()));
                }
                match fs::rename(&tmp, &tree) {
                    // Someone put the tree there without the lock: it is a complete tree.
                    Err(e) if tree.is_dir() => {
                        log::info!("{} appeared meanwhile ({e})", tree.display());
                        crate::finalize::remove_dir_tree(&tmp)
                    }
                    r => r.map_err(|e| Error::io("renaming into place", &tree, e)),
                }
            });
            if let Err(e) = res {
                // Nothing of a failed run stays: the temporary tree, then the lock files
                // (`.lock` last, while held; waiters on it see it unlinked and start over).
                let _ = crate::finalize::remove_dir_tree(&tmp);
                let _ = fs::remove_file(&use_path);
                let _ = fs::remove_file(&lock_path);
                return Err(e);
            }
            sync_dir(&root);
        }
        // Loop: take the use lock and check again (gc may run between).
    }
}

/// Remembers that `bundle` uses tree `id` (for `--ovl-gc`).
pub(crate) fn record_user(root: &Path, id: &str, bundle: &Path) {
    let list = root.join(format!("{id}.bundles"));
    let me = bundle.as_os_str().as_bytes();
    if let Ok(s) = fs::read(&list) {
        if s.split(|&c| c == b'\n').any(|l| l == me) {
            return;
        }
    }
    let mut line = me.to_vec();
    line.push(b'\n');
    // One O_APPEND write of a short line: concurrent runs do not interleave.
    let r = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&list)
        .and_then(|mut f| f.write_all(&line));
    if let Err(e) = r {
        log::warn!("recording {}: {e}", list.display());
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

/// Copies a tree, keeping hard links, symlinks, modes, times, xattrs, and owners when root.
/// File data goes through `copy_file_range`, which clones (reflinks) on filesystems that
/// can. `dst` must not exist. Used to give a run without FUSE a private tree, and to build a
/// commit.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = unsafe { libc::geteuid() } == 0;
    let mut links: std::collections::HashMap<(u64, u64), PathBuf> = Default::default();
    let mut dirs = Vec::new();
    let mut stack = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((s, d)) = stack.pop() {
        let md = fs::symlink_metadata(&s).map_err(|e| Error::io("reading", &s, e))?;
        let ft = md.file_type();
        if ft.is_dir() {
            fs::create_dir(&d).map_err(|e| Error::io("creating", &d, e))?;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io("chmod", &d, e))?;
            for e in fs::read_dir(&s).map_err(|e| Error::io("reading", &s, e))? {
                let e = e.map_err(|e| Error::io("reading", &s, e))?;
                stack.push((e.path(), d.join(e.file_name())));
            }
            dirs.push((s, d, md));
            continue;
        }
        if ft.is_symlink() {
            let t = fs::read_link(&s).map_err(|e| Error::io("reading", &s, e))?;
            std::os::unix::fs::symlink(&t, &d).map_err(|e| Error::io("creating", &d, e))?;
        } else if ft.is_file() {
            let key = (md.dev(), md.ino());
            if md.nlink() > 1 {
                if let Some(first) = links.get(&key) {
                    fs::hard_link(first, &d).map_err(|e| Error::io("linking", &d, e))?;
                    continue;
                }
                links.insert(key, d.clone());
            }
            let mut from = File::open(&s).map_err(|e| Error::io("reading", &s, e))?;
            let mut to = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&d)
                .map_err(|e| Error::io("creating", &d, e))?;
            io::copy(&mut from, &mut to).map_err(|e| Error::io("copying into", &d, e))?;
        } else {
            return Err(Error::bad(&s, "special files cannot be copied here"));
        }
        copy_meta(&s, &d, &md, root)?;
    }
    for (s, d, md) in dirs.iter().rev() {
        copy_meta(s, d, md, root)?;
    }
    Ok(())
}

/// Gives `d` the metadata of `s` the way extraction applies an image inode's, so a copy
/// and an extraction of the same tree agree (xattrs only root may set are counted and
/// reported, not silently dropped).
fn copy_meta(s: &Path, d: &Path, md: &fs::Metadata, root: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let entry = super::extract::Meta {
        symlink: md.file_type().is_symlink(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        xattrs: super::pack::read_xattrs(s)?,
    };
    let skipped = std::sync::atomic::AtomicUsize::new(0);
    super::extract::apply_meta(d, &entry, root, &skipped)?;
    let n = skipped.into_inner();
    if n > 0 {
        log::warn!(
            "{}: {n} extended attribute(s) need root; copied without them",
            d.display()
        );
    }
    Ok(())
}
