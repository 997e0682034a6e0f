//! An app's kept state (its upper) and the bundle commit: who may write the upper, what to do
//! when the lower under it changed, and folding the upper into a new bundle file.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::extract::Bundle;
use crate::OverlayFS;

use crate::overlayfs::hidden_sibling as beside;

/// A hold on an upper (a lock on a file beside it). Two files: `.<upper>.ovl-lock`, held
/// exclusively by the one process that serves the upper writable (the instances of the app
/// join it), and `.<upper>.ovl-readers`, shared by the runs that read it as a lower (discard
/// runs, runs without FUSE) and taken exclusively only to clear it (a commit): readers and the
/// writer run side by side, but the upper never goes from under a reader.
#[derive(Debug)]
pub struct UpperLock {
    _file: fs::File,
}

fn open_lock(upper: &Path, suffix: &str) -> Result<fs::File, String> {
    let parent = upper.parent().unwrap_or(Path::new("/"));
    // The app's state may hold anything of the user's: private by default.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let path = beside(upper, suffix);
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))
}

fn flock(f: &fs::File, op: libc::c_int) -> bool {
    loop {
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return true;
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return false;
        }
    }
}

/// The writer's lock, if no other process holds it (the one serving the upper does, for its
/// whole life, finalization included).
pub fn try_lock_upper(upper: &Path) -> Result<Option<UpperLock>, String> {
    let file = open_lock(upper, ".ovl-lock")?;
    Ok(flock(&file, libc::LOCK_EX | libc::LOCK_NB).then_some(UpperLock { _file: file }))
}

/// The error for a run that needs the writer's lock and cannot wait for it.
pub fn upper_busy(upper: &Path, name: &str) -> String {
    format!(
        "{}: another run of {name} is using this upper; wait for it to finish, or run this one \
         with --ovl-upper=DIR or --ovl-on-exit=discard",
        upper.display()
    )
}

/// A reader's hold (a discard run, a run without FUSE): shared with other readers and with
/// the writer; waits while a commit clears the upper.
pub fn share_upper(upper: &Path, name: &str) -> Result<UpperLock, String> {
    let file = open_lock(upper, ".ovl-readers")?;
    if !flock(&file, libc::LOCK_SH | libc::LOCK_NB) {
        eprintln!("{name}: waiting for a commit of {name} to finish");
        if !flock(&file, libc::LOCK_SH) {
            return Err(format!(
                "locking {}: {}",
                beside(upper, ".ovl-readers").display(),
                io::Error::last_os_error()
            ));
        }
    }
    Ok(UpperLock { _file: file })
}

/// Keeps the readers out (to clear the upper): waits for the discard runs that use it,
/// calling `waiting` first if there are some.
fn exclude_readers(upper: &Path, waiting: &dyn Fn()) -> Result<UpperLock, String> {
    let file = open_lock(upper, ".ovl-readers")?;
    if !flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
        waiting();
        if !flock(&file, libc::LOCK_EX) {
            return Err(format!(
                "locking {}: {}",
                beside(upper, ".ovl-readers").display(),
                io::Error::last_os_error()
            ));
        }
    }
    Ok(UpperLock { _file: file })
}

use std::os::unix::fs::DirBuilderExt;

/// The marker a commit leaves between replacing the bundle and clearing the upper.
fn commit_marker(upper: &Path) -> PathBuf {
    beside(upper, ".ovl-committed")
}

/// Whether the upper's changes are already inside `bundle` (a commit was interrupted after
/// the new bundle took the old one's place, before the upper was cleared).
pub fn upper_already_committed(bundle: &Bundle, upper: &Path) -> bool {
    fs::read_to_string(commit_marker(upper)).is_ok_and(|id| id.trim() == bundle.id())
}

/// Finishes a commit a crash interrupted (call with the upper locked exclusively): if the
/// bundle already carries the committed tree, the upper's changes are in it and the upper is
/// cleared; otherwise the bundle was not replaced and the upper still holds the only copy of
/// the changes (kept).
pub fn finish_interrupted_commit(bundle: &Bundle, upper: &Path) -> Result<(), String> {
    let marker = commit_marker(upper);
    if !marker.exists() {
        return Ok(());
    }
    if upper_already_committed(bundle, upper) {
        let name = &bundle.manifest().name;
        let _readers = exclude_readers(upper, &|| {
            eprintln!("{name}: waiting for discard runs of {name} to exit (finishing a commit)")
        })?;
        log::warn!(
            "finishing an interrupted commit: {} is already in {}",
            upper.display(),
            bundle.path().display()
        );
        clear_upper(upper)?;
    }
    match fs::remove_file(&marker) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(format!("removing {}: {e}", marker.display()))
        }
        _ => Ok(()),
    }
}

fn clear_upper(upper: &Path) -> Result<(), String> {
    for p in [
        upper.to_path_buf(),
        crate::overlayfs::default_workdir(upper),
    ] {
        if p.symlink_metadata().is_ok() {
            crate::finalize::remove_dir_tree(&p).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Records which lower tree the upper sits on (call with the upper locked exclusively). The
/// hard-link index in the work dir names lower files by inode number, which means nothing
/// on another tree: a new version of the app, or the tree of an older ovl that extracted it
/// into the cache. Then the index is dropped (lower hard links are no longer joined through
/// it; a stale entry would show one file's content under another's name). The bundle's image
/// is read in place, and its inode numbers are the image's: the same for the same payload.
/// State kept from another version stays on top of this one, with a warning.
pub fn note_lower(upper: &Path, bundle: &Bundle) -> Result<(), String> {
    let work = crate::overlayfs::default_workdir(upper);
    let now = format!("{} image\n", bundle.id());
    let record = work.join("ovl-bundle-lower");
    let before = fs::read_to_string(&record).ok();
    if before.as_deref() == Some(now.as_str()) {
        return Ok(());
    }
    let index = work.join("ovl-index");
    if index.exists() {
        crate::finalize::remove_dir_tree(&index).map_err(|e| e.to_string())?;
    }
    let changes = crate::finalize::count_entries(upper).unwrap_or(0);
    let seen = note_user(upper, bundle)?;
    if let Some(old_id) = before.as_deref().and_then(|b| b.split(' ').next()) {
        // Noted once per version: copies of two versions used in turn do not warn each time.
        if old_id != bundle.id() && changes > 0 && !seen {
            log::warn!(
                "{}: the kept state was made with another version of this app ({old_id}); it \
                 stays on top of this one (--ovl-upper=DIR starts from a clean state)",
                upper.display()
            );
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&work)
        .map_err(|e| format!("creating {}: {e}", work.display()))?;
    write_synced(&record, now.as_bytes())
}

/// The bundle files that use this state, one `<id> <path>` line each, beside the work dir's
/// other records.
fn users_record(upper: &Path) -> PathBuf {
    crate::overlayfs::default_workdir(upper).join("ovl-bundle-users")
}

fn read_users(upper: &Path) -> Vec<(String, PathBuf)> {
    fs::read_to_string(users_record(upper))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(id, p)| (id.to_string(), PathBuf::from(p)))
        .collect()
}

/// Records that `bundle` (its path and payload id) uses the state in `upper`, forgetting files
/// that are gone; returns whether a file with this payload had used it before.
pub fn note_user(upper: &Path, bundle: &Bundle) -> Result<bool, String> {
    note_user_file(upper, &bundle.id(), bundle.path())
}

/// [`note_user`] by the file's payload id and path (another instance's bundle file).
pub fn note_user_file(upper: &Path, id: &str, path: &Path) -> Result<bool, String> {
    let before = read_users(upper);
    let seen = before.iter().any(|(i, _)| i == id);
    let mut now: Vec<(String, PathBuf)> = before
        .iter()
        .filter(|(_, p)| p != path && p.exists())
        .cloned()
        .collect();
    now.push((id.to_string(), path.to_path_buf()));
    if now != before {
        let work = crate::overlayfs::default_workdir(upper);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&work)
            .map_err(|e| format!("creating {}: {e}", work.display()))?;
        let text: String = now
            .iter()
            .map(|(id, p)| format!("{id} {}\n", p.display()))
            .collect();
        write_synced(&users_record(upper), text.as_bytes())?;
    }
    Ok(seen)
}

/// Other bundle files that still exist and use this state (another copy, another version).
fn other_users(upper: &Path, bundle: &Bundle) -> Vec<PathBuf> {
    read_users(upper)
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| p != bundle.path() && super::extract::read_trailer(p).is_ok())
        .collect()
}

/// Exclusive hold on the bundle file for a commit, valid only while the path still names
/// the file this run started from.
struct BundleLock<'a> {
    _bundle: &'a Bundle,
}

fn lock_bundle(bundle: &Bundle) -> Result<BundleLock<'_>, String> {
    let fd = bundle.file().as_raw_fd();
    loop {
        if unsafe { libc::flock(fd, libc::LOCK_EX) } == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("locking {}: {e}", bundle.path().display()));
        }
    }
    // Another commit (or a rebuild) replaced the file while this run was going: committing
    // on top of the old tree would undo that one.
    let ours = bundle.file().metadata().map_err(|e| e.to_string())?;
    let now =
        fs::metadata(bundle.path()).map_err(|e| format!("{}: {e}", bundle.path().display()))?;
    if (ours.dev(), ours.ino()) != (now.dev(), now.ino()) {
        return Err(format!(
            "{} was replaced while this run went on (another commit, or a rebuild)",
            bundle.path().display()
        ));
    }
    Ok(BundleLock { _bundle: bundle })
}

/// Commit: what the app saw (the overlay, mounted again if needed) becomes a new bundle,
/// renamed over this one; the running file is never written in place. Packing from the
/// mount, not from the layers, gives exactly the merged view, hard links included.
///
/// Order, for crashes: the new bundle is complete and synced; a marker records its id; the
/// rename; the upper is cleared; the marker goes. A crash after the rename is finished by the
/// next run ([`finish_interrupted_commit`]); one before it leaves the bundle and the upper as
/// they were.
///
/// The upper is cleared only with the readers kept out ([`share_upper`]): `waiting` is called
/// first if discard runs still read it. Returns the line to show the user.
pub fn commit_bundle(
    bundle: &Bundle,
    ofs: &mut OverlayFS,
    upper: &Path,
    waiting: &dyn Fn(),
) -> Result<String, String> {
    let m = bundle.manifest();
    let changes = crate::finalize::count_entries(upper).unwrap_or(0);
    if changes == 0 {
        ofs.umount().map_err(|e| e.to_string())?;
        return Ok(format!("{}: no changes to commit", m.name));
    }
    let keep = |e: String| {
        format!(
            "commit failed: {e}; the changes are kept in {} (run again with \
             --ovl-on-exit=commit to commit them)",
            upper.display()
        )
    };
    let res = (|| {
        // The state is shared by name: moving it into this file would take it from the
        // others, which would then show their tree without it.
        if let Some(other) = other_users(upper, bundle).first() {
            return Err(format!(
                "the kept state is also used by {} (another copy of {}); committing it into \
                 this file would take it from that one: remove that copy, or give this one a \
                 state of its own with --ovl-upper=DIR",
                other.display(),
                m.name
            ));
        }
        let readers = exclude_readers(upper, waiting)?;
        let _lock = lock_bundle(bundle)?;
        remove_stale_pack_temps(bundle.path());
        ofs.mount().map_err(|e| e.to_string())?;
        let mnt = ofs.mountpoint().expect("mounted").to_path_buf();
        let runtime = bundle.runtime_bytes().map_err(|e| e.to_string())?;
        let opts = super::PackOptions {
            name: Some(m.name.clone()),
            entry: Some(m.entry.clone()),
            on_exit: m.on_exit,
            ..Default::default()
        };
        let packed = super::pack::pack_unplaced(&mnt, &runtime, bundle.path(), &opts);
        ofs.umount().map_err(|e| e.to_string())?;
        let packed = packed.map_err(|e| e.to_string())?;
        // The new file takes the old one's mode (and owner, as root): a private bundle stays
        // private.
        let old = bundle.file().metadata().map_err(|e| e.to_string())?;
        packed
            .set_mode_owner(old.mode() & 0o7777, old.uid(), old.gid())
            .map_err(|e| e.to_string())?;
        let new_id = packed.summary.id.clone();
        let marker = commit_marker(upper);
        write_synced(&marker, new_id.as_bytes())?;
        crash_point("marker");
        if let Err(e) = packed.place() {
            let _ = fs::remove_file(&marker);
            return Err(e.to_string());
        }
        Ok((new_id, readers))
    })();
    let (new_id, _readers) = match res {
        Ok(x) => x,
        Err(e) => {
            let _ = ofs.umount();
            return Err(keep(e));
        }
    };
    crash_point("placed");
    clear_upper(upper)?;
    crash_point("cleared");
    let marker = commit_marker(upper);
    fs::remove_file(&marker).map_err(|e| format!("removing {}: {e}", marker.display()))?;
    Ok(format!(
        "{}: committed {changes} changes into {} (id {new_id})",
        m.name,
        bundle.path().display()
    ))
}

/// Removes `.<bundle>.ovl-pack-<pid>` files a killed commit left beside the bundle (called
/// under the bundle lock, which every commit holds while it packs).
fn remove_stale_pack_temps(bundle: &Path) {
    let (Some(dir), Some(base)) = (bundle.parent(), bundle.file_name()) else {
        return;
    };
    let prefix = format!(".{}.ovl-pack-", base.to_string_lossy());
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name
            .strip_prefix(&prefix)
            .is_some_and(|p| p.parse::<u32>().is_ok())
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Test hook: `OVL_BUNDLE_CRASH_AT=marker|placed|cleared` aborts right after that step of a
/// bundle commit, so tests can check that the next run finishes or undoes it.
fn crash_point(step: &str) {
    if std::env::var("OVL_BUNDLE_CRASH_AT").is_ok_and(|s| s == step) {
        std::process::abort();
    }
}

/// Writes `data` to `path` durably and atomically (a unique temporary, fsync, rename).
fn write_synced(path: &Path, data: &[u8]) -> Result<(), String> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let r = (|| {
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(d) = path.parent() {
            fs::File::open(d)?.sync_all()?;
        }
        Ok::<(), io::Error>(())
    })();
    r.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        format!("writing {}: {e}", path.display())
    })
}
