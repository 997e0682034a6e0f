//! Commit: merging an upper layer into its lower directory, with the overlay unmounted.
//!
//! A layer above the engine; it reads the upper in the engine's on-disk format (whiteouts,
//! opaque directories) and writes the lower through directory descriptors only, never
//! following a symlink, so nothing outside the lower tree is ever touched.
//!
//! - **Commit** (in place): each changed file is written beside its target (in a staging
//!   directory inside the lower), fsynced and renamed over it, so every file is either old or
//!   new, never torn. Identical files (content by BLAKE3, mode, owner, xattrs) are left alone.
//! - **CommitAtomic**: a new tree is built beside the lower (unchanged files hard-linked, so
//!   the cost grows with the number of lower entries, not their bytes), the upper merged into
//!   it, everything fsynced, then swapped with the lower by `renameat2(RENAME_EXCHANGE)`.
//!
//! A journal in the work directory names the temporaries before they exist; the next commit,
//! mount or finalization reads it and finishes or rolls back (see [`recover`]). The upper is
//! removed only after the lower is durable.

mod journal;
mod moves;

pub use journal::recover;
use journal::{Journal, remove_journal, sync_dir, write_journal};

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr, OsString};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::engine::copy_up::{copy_meta, copy_xattrs};
use crate::engine::layers::{self, OPAQUE_MARKER, WH_PREFIX};
use crate::engine::sys::{self, BorrowFd};
use crate::error::{Error, Result};
use crate::finalize::{OverlayAction, Report};

/// Test hook: `OVL_COMMIT_CRASH_AFTER=N` aborts the process right after the N-th durable step,
/// so tests can check recovery from a crash at every point.
fn step() {
    static STEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = STEPS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    if let Ok(limit) = std::env::var("OVL_COMMIT_CRASH_AFTER") {
        if limit.parse::<u64>().ok() == Some(n) {
            std::process::abort();
        }
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |e| Error::io(what, path, e)
}

fn rand_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let h = blake3::hash(format!("{t}-{}", std::process::id()).as_bytes());
    h.to_hex()[..16].to_string()
}

/// Identity of an upper file with several names, to recreate its hard links in the lower.
type InodeKey = (u64, u64);

struct Merger<'a> {
    report: &'a mut Report,
    /// Staging directory (inside the lower's filesystem) where replacements are built.
    staging: OwnedFd,
    staging_path: PathBuf,
    seq: u64,
    privileged: bool,
    /// Links a file of the tree being merged into has when no other name shares it: 1 in
    /// place; 2 in an atomic commit's new tree (each name is also linked from the old tree).
    lone_links: libc::nlink_t,
    /// Upper inode → (lower dir handle, name) of the first name committed, for hard links.
    linked: HashMap<InodeKey, (OwnedFd, CString)>,
    progress: Progress,
    /// The upper's directory renames (see [`moves`]).
    plan: moves::Plan,
    /// Destination path -> index of its move in `plan.moves`.
    move_of: HashMap<PathBuf, usize>,
}

/// Progress on stderr for long commits (over a second), only when stderr is a terminal.
struct Progress {
    start: std::time::Instant,
    last: std::time::Instant,
    entries: u64,
    shown: bool,
    tty: bool,
}

impl Progress {
    fn new() -> Self {
        let now = std::time::Instant::now();
        Progress {
            start: now,
            last: now,
            entries: 0,
            shown: false,
            tty: unsafe { libc::isatty(2) } == 1,
        }
    }

    fn tick(&mut self, report: &Report) {
        self.entries += 1;
        if !self.tty || self.start.elapsed().as_secs() < 1 {
            return;
        }
        if self.last.elapsed().as_millis() >= 200 || !self.shown {
            self.last = std::time::Instant::now();
            self.shown = true;
            eprint!(
                "\rovl: committing: {} entries, {} written, {} deleted, {} MiB\x1b[K",
                self.entries,
                report.written,
                report.deleted,
                report.bytes >> 20
            );
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.shown {
            eprint!("\r\x1b[K");
        }
    }
}

fn cname(name: &[u8]) -> Result<CString> {
    CString::new(name).map_err(|_| Error::bad(OsStr::from_bytes(name), "name contains NUL"))
}

fn lstat_opt(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
    sys::fstatat_opt(dir, name)
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn file_hash(fd: BorrowedFd<'_>) -> io::Result<blake3::Hash> {
    let f = sys::reopen(fd, libc::O_RDONLY)?;
    let mut file = std::fs::File::from(f);
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize())
}

fn xattrs_of(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let list = sys::flistxattr(fd.as_raw_fd())?;
    let mut out = Vec::new();
    for n in list.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if layers::is_private_xattr(n) {
            continue;
        }
        let c = CString::new(n).map_err(io::Error::other)?;
        if let Some(v) = sys::fgetxattr(fd.as_raw_fd(), &c)? {
            out.push((n.to_vec(), v));
        }
    }
    out.sort();
    Ok(out)
}

impl<'a> Merger<'a> {
    fn new(
        report: &'a mut Report,
        staging_path: &Path,
        privileged: bool,
        atomic: bool,
    ) -> Result<Self> {
        Ok(Merger {
            report,
            staging: sys::open_dir_path(staging_path).map_err(io_err("opening", staging_path))?,
            staging_path: staging_path.to_path_buf(),
            seq: 0,
            privileged,
            lone_links: if atomic { 2 } else { 1 },
            linked: HashMap::new(),
            progress: Progress::new(),
            plan: moves::Plan::default(),
            move_of: HashMap::new(),
        })
    }

    /// Reads the upper's directory renames and detaches their lower directories (see
    /// [`moves`]). `journaled`: the plan of an interrupted run, used as it is.
    fn prepare_moves(
        &mut self,
        upper: BorrowedFd<'_>,
        lower: BorrowedFd<'_>,
        journaled: Option<moves::Plan>,
        mut journal: Option<(&Path, &mut Journal)>,
    ) -> Result<()> {
        let plan = match journaled {
            Some(p) => {
                moves::clear_leftovers(self.staging.as_fd_borrowed(), p.moves.len())?;
                p
            }
            None => {
                let p = moves::plan(upper, lower)?;
                if let Some((work, j)) = journal.as_mut() {
                    if !p.moves.is_empty() {
                        j.redirects = p.to_journal();
                        write_journal(work, j)?;
                        step();
                    }
                }
                p
            }
        };
        moves::detach_all(&plan.moves, lower, self.staging.as_fd_borrowed())?;
        self.move_of = plan
            .moves
            .iter()
            .enumerate()
            .map(|(k, m)| (m.dst.clone(), k))
            .collect();
        self.plan = plan;
        Ok(())
    }

    /// Re-points names found by [`indexed_names`] at the committed copy of their file (see
    /// there); names the merge replaced or deleted no longer hold the old inode and are left.
    fn relink_indexed(&mut self, names: IndexedNames) -> Result<()> {
        for (ino, (key, _pin, found)) in names {
            let Some((dfd, dname)) = self.linked.get(&key) else {
                continue; // the copy was not committed (no name of it left in the upper)
            };
            let src = sys::open_path(dfd.as_fd_borrowed(), dname)
                .map_err(io_err("linking", Path::new("")))?;
            for (dir, name, path) in found {
                // Still the old inode (pinned, so its number cannot have been reused)?
                match sys::fstatat_opt(dir.as_fd_borrowed(), &name)
                    .map_err(io_err("reading", &path))?
                {
                    Some(st) if st.st_ino == ino && !is_dir(&st) => {}
                    _ => continue,
                }
                let tmp = self.tmp();
                let st_dir = self.staging.as_fd_borrowed();
                sys::link_fd(src.as_fd_borrowed(), st_dir, &tmp)
                    .map_err(io_err("linking", &path))?;
                sys::renameat2(st_dir, &tmp, dir.as_fd_borrowed(), &name, 0)
                    .map_err(io_err("replacing", &path))?;
                self.report.written += 1;
                step();
            }
        }
        Ok(())
    }

    fn tmp(&mut self) -> CString {
        self.seq += 1;
        CString::new(format!("t{:x}", self.seq)).expect("no NUL")
    }

    /// Merges upper directory `udir` into lower directory `ldir` (`path` for messages).
    /// `opaque`: the lower's own entries are hidden here, so those not in the upper go.
    fn merge_dir(
        &mut self,
        udir: BorrowedFd<'_>,
        ldir: BorrowedFd<'_>,
        path: &Path,
        opaque: bool,
    ) -> Result<()> {
        let entries = sys::read_dir(udir).map_err(io_err("reading", path))?;
        let mut upper_names: HashSet<Vec<u8>> = HashSet::new();
        for e in &entries {
            self.progress.tick(self.report);
            let name = e.name.as_slice();
            if name == OPAQUE_MARKER.to_bytes() {
                continue;
            }
            if let Some(target) = name.strip_prefix(WH_PREFIX) {
                self.delete(ldir, target, &path.join(OsStr::from_bytes(target)))?;
                continue;
            }
            upper_names.insert(name.to_vec());
            let p = path.join(OsStr::from_bytes(name));
            self.merge_entry(udir, ldir, name, &p, opaque)?;
        }
        if opaque {
            for e in sys::read_dir(ldir).map_err(io_err("reading", path))? {
                if !upper_names.contains(&e.name) {
                    let p = path.join(OsStr::from_bytes(&e.name));
                    self.delete(ldir, &e.name, &p)?;
                }
            }
        }
        sys::fsync(
            sys::reopen(ldir, libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(io_err("syncing", path))?
                .as_fd_borrowed(),
            false,
        )
        .map_err(io_err("syncing", path))
    }

    fn delete(&mut self, ldir: BorrowedFd<'_>, name: &[u8], path: &Path) -> Result<()> {
        let c = cname(name)?;
        if lstat_opt(ldir, &c)
            .map_err(io_err("reading", path))?
            .is_some()
        {
            sys::remove_tree(ldir, &c).map_err(io_err("deleting", path))?;
            self.report.deleted += 1;
            step();
        }
        Ok(())
    }

    fn merge_entry(
        &mut self,
        udir: BorrowedFd<'_>,
        ldir: BorrowedFd<'_>,
        name: &[u8],
        path: &Path,
        parent_opaque: bool,
    ) -> Result<()> {
        let c = cname(name)?;
        let ufd = sys::open_path(udir, &c).map_err(io_err("reading", path))?;
        let ust = sys::fstat(ufd.as_fd_borrowed()).map_err(io_err("reading", path))?;
        if layers::is_whiteout(&ust, ufd.as_fd_borrowed()).map_err(io_err("reading", path))? {
            return self.delete(ldir, name, path);
        }
        let mut lst = lstat_opt(ldir, &c).map_err(io_err("reading", path))?;
        if is_dir(&ust) {
            let own_opaque =
                layers::is_opaque_dir(ufd.as_fd_borrowed()).map_err(io_err("reading", path))?;
            // A renamed directory shows the lower directory its redirect names (moved here
            // now), whatever its parent hides; one whose redirect leads nowhere shows none.
            let (opaque, moved) = match self.plan.redirected.get(path) {
                _ if own_opaque => (true, None),
                Some(Some(src)) if src != path => (false, self.move_of.get(path).copied()),
                Some(Some(_)) => (false, None),
                Some(None) => (true, None),
                None => (parent_opaque, None),
            };
            if let Some(k) = moved {
                moves::attach(k, self.staging.as_fd_borrowed(), ldir, &c, path)?;
                lst = lstat_opt(ldir, &c).map_err(io_err("reading", path))?;
            }
            match lst {
                Some(l) if is_dir(&l) => {
                    if opaque {
                        self.report.dirs_replaced += 1;
                    }
                }
                // A file, symlink or nothing: a real directory takes its place. A symlink is
                // replaced, never followed.
                Some(_) => {
                    let tmp = self.tmp();
                    sys::mkdirat(self.staging.as_fd_borrowed(), &tmp, 0o700)
                        .map_err(io_err("creating", path))?;
                    sys::renameat2(
                        self.staging.as_fd_borrowed(),
                        &tmp,
                        ldir,
                        &c,
                        libc::RENAME_EXCHANGE,
                    )
                    .map_err(io_err("replacing", path))?;
                    sys::remove_tree(self.staging.as_fd_borrowed(), &tmp)
                        .map_err(io_err("deleting old", path))?;
                    self.report.deleted += 1;
                    step();
                }
                None => {
                    sys::mkdirat(ldir, &c, 0o700).map_err(io_err("creating", path))?;
                    step();
                }
            }
            let lsub = sys::openat(ldir, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err("opening", path))?;
            let usub = sys::openat(udir, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err("opening", path))?;
            self.merge_dir(usub.as_fd_borrowed(), lsub.as_fd_borrowed(), path, opaque)?;
            sync_xattrs(ufd.as_fd_borrowed(), lsub.as_fd_borrowed())
                .map_err(io_err("setting xattrs on", path))?;
            copy_meta(lsub.as_fd_borrowed(), &ust, self.privileged)
                .map_err(io_err("setting metadata on", path))?;
            return Ok(());
        }

        // Non-directories: identical files stay; others are built in staging and renamed in.
        if let Some(l) = &lst {
            let times_differ = (l.st_mtime, l.st_mtime_nsec, l.st_atime, l.st_atime_nsec)
                != (
                    ust.st_mtime,
                    ust.st_mtime_nsec,
                    ust.st_atime,
                    ust.st_atime_nsec,
                );
            // New times are set on the lower inode itself only when no other name of the lower
            // shares it: a file with another name the run did not touch (its link broken by
            // the kernel's overlay on copy-up, which indexes none, or a new file over one
            // name) is rewritten instead, so the other name keeps its times.
            if (!times_differ || l.st_nlink <= self.lone_links)
                && self
                    .identical(&ufd, &ust, ldir, &c, l)
                    .map_err(io_err("comparing", path))?
            {
                // Same content and attributes: keep the inode, but times changed through the
                // mount (touch) still land.
                if times_differ {
                    let times = [
                        libc::timespec {
                            tv_sec: ust.st_atime,
                            tv_nsec: ust.st_atime_nsec,
                        },
                        libc::timespec {
                            tv_sec: ust.st_mtime,
                            tv_nsec: ust.st_mtime_nsec,
                        },
                    ];
                    let r = unsafe {
                        libc::utimensat(
                            ldir.as_raw_fd(),
                            c.as_ptr(),
                            times.as_ptr(),
                            libc::AT_SYMLINK_NOFOLLOW,
                        )
                    };
                    if r < 0 {
                        return Err(Error::io(
                            "setting times on",
                            path,
                            io::Error::last_os_error(),
                        ));
                    }
                }
                self.report.deduplicated += 1;
                return Ok(());
            }
        }
        let key = (ust.st_dev, ust.st_ino);
        let tmp = self.tmp();
        let st_dir = self.staging.as_fd_borrowed();
        let fmt = ust.st_mode & libc::S_IFMT;
        let hardlink_to = if ust.st_nlink > 1 {
            self.linked.get(&key)
        } else {
            None
        };
        if let Some((dfd, dname)) = hardlink_to {
            // Another name of this upper file was committed already: link to it.
            let src =
                sys::open_path(dfd.as_fd_borrowed(), dname).map_err(io_err("linking", path))?;
            sys::link_fd(src.as_fd_borrowed(), st_dir, &tmp).map_err(io_err("linking", path))?;
        } else {
            match fmt {
                libc::S_IFREG => {
                    let dst = sys::openat(
                        st_dir,
                        &tmp,
                        libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                        0o600,
                    )
                    .map_err(io_err("writing", path))?;
                    let src = sys::reopen(ufd.as_fd_borrowed(), libc::O_RDONLY)
                        .map_err(io_err("reading", path))?;
                    sys::copy_data(
                        src.as_fd_borrowed(),
                        dst.as_fd_borrowed(),
                        ust.st_size as u64,
                    )
                    .map_err(io_err("writing", path))?;
                    sys::fsync(dst.as_fd_borrowed(), false).map_err(io_err("syncing", path))?;
                    self.report.bytes += ust.st_size as u64;
                }
                libc::S_IFLNK => {
                    let target =
                        sys::readlink_fd(ufd.as_fd_borrowed()).map_err(io_err("reading", path))?;
                    let t = CString::new(target)
                        .map_err(|_| Error::bad(path, "symlink target has NUL"))?;
                    sys::symlinkat(&t, st_dir, &tmp).map_err(io_err("creating", path))?;
                }
                _ => sys::mknodat(st_dir, &tmp, ust.st_mode, ust.st_rdev)
                    .map_err(io_err("creating", path))?,
            }
            let nfd = sys::open_path(st_dir, &tmp).map_err(io_err("creating", path))?;
            copy_xattrs(
                ufd.as_fd_borrowed(),
                nfd.as_fd_borrowed(),
                fmt == libc::S_IFLNK,
            )
            .map_err(io_err("setting xattrs on", path))?;
            copy_meta(nfd.as_fd_borrowed(), &ust, self.privileged)
                .map_err(io_err("setting metadata on", path))?;
        }
        match lst {
            Some(l) if is_dir(&l) => {
                // A directory becomes a file: swap, then remove the old directory.
                sys::renameat2(st_dir, &tmp, ldir, &c, libc::RENAME_EXCHANGE)
                    .map_err(io_err("replacing", path))?;
                sys::remove_tree(st_dir, &tmp).map_err(io_err("deleting old", path))?;
                self.report.deleted += 1;
            }
            _ => sys::renameat2(st_dir, &tmp, ldir, &c, 0).map_err(io_err("replacing", path))?,
        }
        self.report.written += 1;
        step();
        if ust.st_nlink > 1 && !self.linked.contains_key(&key) {
            let d = sys::openat(ldir, c".", libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err("opening", path))?;
            self.linked.insert(key, (d, c));
        }
        Ok(())
    }

    /// Is the lower entry already exactly the upper one? Never judged on size and mtime:
    /// regular files compare BLAKE3 of the content when sizes match.
    fn identical(
        &self,
        ufd: &OwnedFd,
        ust: &libc::stat,
        ldir: BorrowedFd<'_>,
        c: &CStr,
        lst: &libc::stat,
    ) -> io::Result<bool> {
        let same_meta = ust.st_mode == lst.st_mode
            && ust.st_uid == lst.st_uid
            && ust.st_gid == lst.st_gid
            && ust.st_rdev == lst.st_rdev
            && ust.st_size == lst.st_size;
        // Hard-linked upper files are always rewritten so the links come out right.
        if !same_meta || ust.st_nlink > 1 {
            return Ok(false);
        }
        let lfd = sys::open_path(ldir, c)?;
        let fmt = ust.st_mode & libc::S_IFMT;
        if fmt != libc::S_IFLNK
            && xattrs_of(ufd.as_fd_borrowed())? != xattrs_of(lfd.as_fd_borrowed())?
        {
            return Ok(false);
        }
        Ok(match fmt {
            libc::S_IFREG => file_hash(ufd.as_fd_borrowed())? == file_hash(lfd.as_fd_borrowed())?,
            libc::S_IFLNK => {
                sys::readlink_fd(ufd.as_fd_borrowed())? == sys::readlink_fd(lfd.as_fd_borrowed())?
            }
            _ => true,
        })
    }
}

/// Commits `upper` into `lower` (see the module documentation). `work` holds the journal.
/// On success the upper and work directory are removed; on failure both are kept and the
/// error names what failed.
pub fn commit(lower: &Path, upper: &Path, work: &Path, atomic: bool) -> Result<Report> {
    commit_with(lower, upper, work, atomic, false)
}

/// Merges `upper` into `lower` in place, like [`commit`], but leaves the upper as it was:
/// for a lower that is itself a scratch copy (a bundle commit builds the new tree this way
/// and clears the upper only once the new bundle is in place). `work` is removed on success.
pub fn merge_keeping_upper(lower: &Path, upper: &Path, work: &Path) -> Result<Report> {
    commit_with(lower, upper, work, false, true)
}

fn commit_with(
    lower: &Path,
    upper: &Path,
    work: &Path,
    atomic: bool,
    keep_upper: bool,
) -> Result<Report> {
    std::fs::create_dir_all(work).map_err(io_err("creating", work))?;
    let finished = recover(work, upper)? && !upper.exists();
    let action = if atomic {
        OverlayAction::CommitAtomic
    } else {
        OverlayAction::Commit
    };
    if finished {
        // Recovery finished an interrupted commit of this upper: nothing is left to do.
        crate::finalize::remove_dir_tree(work)?;
        return Ok(Report {
            action,
            path: lower.to_path_buf(),
            ..Default::default()
        });
    }
    let mut report = Report {
        action,
        path: lower.to_path_buf(),
        changes: crate::finalize::count_entries(upper)?,
        ..Default::default()
    };
    let privileged = unsafe { libc::geteuid() } == 0;
    let ufd = sys::open_dir_path(upper).map_err(io_err("opening", upper))?;
    if atomic {
        commit_atomic(lower, upper, work, &ufd, &mut report, privileged)?;
    } else {
        let mut j = commit_in_place(lower, work, &ufd, &mut report, privileged, None)?;
        // The lower is complete and durable: from here recovery rolls forward.
        j.merged = true;
        write_journal(work, &j)?;
        step();
    }
    // Only now does the upper go; a crash while removing it is finished by `recover`.
    if !keep_upper {
        crate::finalize::remove_dir_tree(upper)?;
        step();
    }
    remove_journal(work)?;
    crate::finalize::remove_dir_tree(work)?;
    Ok(report)
}

fn new_staging(parent: &Path, prefix: &str) -> Result<(PathBuf, OsString)> {
    for _ in 0..16 {
        let name = OsString::from(format!("{prefix}{}", rand_suffix()));
        let p = parent.join(&name);
        match std::fs::create_dir(&p) {
            Ok(()) => return Ok((p, name)),
            // A user's entry of that name is never touched: pick another.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("creating", p, e)),
        }
    }
    Err(Error::bad(parent, "could not find a free temporary name"))
}

fn commit_in_place(
    lower: &Path,
    work: &Path,
    ufd: &OwnedFd,
    report: &mut Report,
    privileged: bool,
    resume: Option<Journal>,
) -> Result<Journal> {
    let (mut journal, journaled) = match resume {
        Some(j) => {
            let plan = moves::Plan::from_journal(&j.redirects);
            (j, Some(plan))
        }
        None => {
            // The staging path is journaled before it exists, so recovery knows it without
            // guessing.
            let name = format!(".ovl-commit-{}", rand_suffix());
            (
                Journal::begin(work, "inplace", lower, &lower.join(&name))?,
                None,
            )
        }
    };
    let staging_path = journal.temp.clone();
    if journaled.is_some() && std::fs::symlink_metadata(&staging_path).is_err() {
        // Interrupted after the merge emptied and removed it (every move was in place):
        // a fresh one serves the repeated merge.
        std::fs::create_dir(&staging_path).map_err(io_err("creating", &staging_path))?;
    }
    let lfd = sys::open_dir_path(lower).map_err(io_err("opening", lower))?;
    let mut m = Merger::new(report, &staging_path, privileged, false)?;
    step();
    let opaque = layers::is_opaque_dir(ufd.as_fd_borrowed()).map_err(io_err("reading", lower))?;
    let res = m
        .prepare_moves(
            ufd.as_fd_borrowed(),
            lfd.as_fd_borrowed(),
            journaled,
            Some((work, &mut journal)),
        )
        .and_then(|()| indexed_names(work, lfd.as_fd_borrowed()))
        .and_then(|names| {
            m.merge_dir(
                ufd.as_fd_borrowed(),
                lfd.as_fd_borrowed(),
                Path::new(""),
                opaque,
            )?;
            m.relink_indexed(names)
        });
    match res {
        Err(e) if !journal.redirects.is_empty() => {
            // Directories may wait in staging: it stays, and the next commit or mount
            // finishes from the journal.
            // Said in the error itself: a log line is not seen without -v.
            return Err(match prefix_error(e, lower) {
                Error::Io { what, path, source } => Error::Io {
                    what,
                    path,
                    source: std::io::Error::new(
                        source.kind(),
                        format!(
                            "{source} (directories were already moved: the next commit or \
                             mount finishes this commit)"
                        ),
                    ),
                },
                other => other,
            });
        }
        _ => {}
    }
    let cleanup = crate::finalize::remove_dir_tree(&m.staging_path);
    res.map_err(|e| prefix_error(e, lower))?;
    cleanup?;
    step();
    apply_root_meta(ufd, &lfd, lower, privileged)?;
    sync_dir(lower)?;
    Ok(journal)
}

/// Finishes an in-place commit interrupted after it began moving directories (called by
/// [`recover`]): the merge runs again with the journaled plan, then the lower is marked
/// complete.
fn resume_in_place(work: &Path, upper: &Path, j: Journal) -> Result<()> {
    let privileged = unsafe { libc::geteuid() } == 0;
    let ufd = sys::open_dir_path(upper).map_err(io_err("opening", upper))?;
    let mut report = Report::default();
    let lower = j.lower.clone();
    let mut j = commit_in_place(&lower, work, &ufd, &mut report, privileged, Some(j))?;
    j.merged = true;
    write_journal(work, &j)?;
    step();
    Ok(())
}

/// Makes the lower root's metadata the upper root's (what the mount showed: the upper root is
/// created with the lower root's metadata, see `mount`).
fn apply_root_meta(ufd: &OwnedFd, lfd: &OwnedFd, lower: &Path, privileged: bool) -> Result<()> {
    let ust = sys::fstat(ufd.as_fd_borrowed()).map_err(io_err("reading", lower))?;
    sync_xattrs(ufd.as_fd_borrowed(), lfd.as_fd_borrowed())
        .map_err(io_err("setting xattrs on", lower))?;
    copy_meta(lfd.as_fd_borrowed(), &ust, privileged).map_err(io_err("setting metadata on", lower))
}

/// Makes `dst`'s user-visible xattrs exactly `src`'s: copies every one and removes those
/// `src` no longer has.
fn sync_xattrs(src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> io::Result<()> {
    copy_xattrs(src, dst, false)?;
    let keep: HashSet<Vec<u8>> = xattrs_of(src)?.into_iter().map(|(n, _)| n).collect();
    for (name, _) in xattrs_of(dst)? {
        if !keep.contains(&name) {
            let c = CString::new(name).map_err(io::Error::other)?;
            match sys::fremovexattr(dst.as_raw_fd(), &c) {
                Err(e) if e.raw_os_error() != Some(libc::ENODATA) => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Lower inode -> (the upper copy's key, a handle pinning the lower inode, its names).
type IndexedNames = HashMap<u64, (InodeKey, OwnedFd, Vec<(OwnedFd, CString, PathBuf)>)>;

/// A lower file with several names that was copied up (the engine's hard-link index in the
/// work dir) may have names never reached through the mount: they exist only in the lower,
/// still naming the old inode. Found before the merge (each inode pinned by a handle, so its
/// number cannot be reused by a file the merge writes), and re-pointed at the committed copy
/// after it, so all names stay one file. `root` is the tree being committed into.
fn indexed_names(work: &Path, root: BorrowedFd<'_>) -> Result<IndexedNames> {
    let mut want: HashMap<u64, InodeKey> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir(work.join("ovl-index")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(ino) = name
                .strip_prefix("L0-")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            else {
                continue;
            };
            use std::os::unix::fs::MetadataExt;
            if let Ok(meta) = std::fs::symlink_metadata(e.path()) {
                want.insert(ino, (meta.dev(), meta.ino()));
            }
        }
    }
    let mut out = IndexedNames::new();
    if want.is_empty() {
        return Ok(out);
    }
    let mut found = Vec::new();
    find_inodes(root, Path::new(""), &want, &mut found)?;
    for (dir, name, path, ino) in found {
        let entry = match out.entry(ino) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let pin = sys::open_path(dir.as_fd_borrowed(), &name)
                    .map_err(io_err("opening", &path))?;
                v.insert((want[&ino], pin, Vec::new()))
            }
        };
        entry.2.push((dir, name, path));
    }
    Ok(out)
}

/// Non-directories under `dir` (same device) whose inode is a key of `want`.
type FoundName = (OwnedFd, CString, PathBuf, u64);
fn find_inodes(
    dir: BorrowedFd<'_>,
    path: &Path,
    want: &HashMap<u64, InodeKey>,
    out: &mut Vec<FoundName>,
) -> Result<()> {
    let dst = sys::fstat(dir).map_err(io_err("reading", path))?;
    for e in sys::read_dir(dir).map_err(io_err("reading", path))? {
        let c = cname(&e.name)?;
        let p = path.join(OsStr::from_bytes(&e.name));
        let st = sys::fstatat(dir, &c).map_err(io_err("reading", &p))?;
        if st.st_dev != dst.st_dev {
            continue;
        }
        if is_dir(&st) {
            let sub = sys::openat(dir, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err("opening", &p))?;
            find_inodes(sub.as_fd_borrowed(), &p, want, out)?;
        } else if want.contains_key(&st.st_ino) {
            let d = sys::openat(dir, c".", libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err("opening", path))?;
            out.push((d, c, p, st.st_ino));
        }
    }
    Ok(())
}

/// Makes error paths (relative inside the merge) absolute under `lower`.
fn prefix_error(e: Error, lower: &Path) -> Error {
    match e {
        Error::Io { what, path, source } => Error::Io {
            what,
            path: lower.join(path),
            source,
        },
        other => other,
    }
}

/// Hard-links (or for directories recreates) the whole lower tree into `dst`.
fn link_tree(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    path: &Path,
    privileged: bool,
) -> Result<()> {
    for e in sys::read_dir(src).map_err(io_err("reading", path))? {
        let c = cname(&e.name)?;
        let p = path.join(OsStr::from_bytes(&e.name));
        let st = sys::fstatat(src, &c).map_err(io_err("reading", &p))?;
        if is_dir(&st) {
            sys::mkdirat(dst, &c, 0o700).map_err(io_err("creating", &p))?;
            let s = sys::openat(src, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err("opening", &p))?;
            let d = sys::openat(dst, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(io_err("opening", &p))?;
            link_tree(s.as_fd_borrowed(), d.as_fd_borrowed(), &p, privileged)?;
            copy_xattrs(s.as_fd_borrowed(), d.as_fd_borrowed(), false)
                .map_err(io_err("setting xattrs on", &p))?;
            copy_meta(d.as_fd_borrowed(), &st, privileged)
                .map_err(io_err("setting metadata on", &p))?;
        } else {
            let r = unsafe {
                libc::linkat(src.as_raw_fd(), c.as_ptr(), dst.as_raw_fd(), c.as_ptr(), 0)
            };
            if r < 0 {
                return Err(Error::io("linking", p, io::Error::last_os_error()));
            }
        }
    }
    step();
    Ok(())
}

fn commit_atomic(
    lower: &Path,
    upper: &Path,
    work: &Path,
    ufd: &OwnedFd,
    report: &mut Report,
    privileged: bool,
) -> Result<()> {
    let parent = lower
        .parent()
        .ok_or_else(|| Error::bad(lower, "cannot commit atomically into a filesystem root"))?;
    let lname = lower
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = format!(".{lname}.ovl-new-{}", rand_suffix());
    let new = parent.join(&name);
    let mut journal = Journal::begin(work, "atomic", lower, &new)?;
    let mut build = || -> Result<()> {
        let lfd = sys::open_dir_path(lower).map_err(io_err("opening", lower))?;
        let nfd = sys::open_dir_path(&new).map_err(io_err("opening", &new))?;
        link_tree(
            lfd.as_fd_borrowed(),
            nfd.as_fd_borrowed(),
            Path::new(""),
            privileged,
        )
        .map_err(|e| prefix_error(e, lower))?;
        // Replacements are staged inside the new tree: same filesystem, removed with it.
        let (staging_path, _) = new_staging(&new, ".ovl-staging-")?;
        let mut m = Merger::new(&mut *report, &staging_path, privileged, true)?;
        let opaque =
            layers::is_opaque_dir(ufd.as_fd_borrowed()).map_err(io_err("reading", upper))?;
        // Nothing to journal: an interrupted build is removed whole.
        m.prepare_moves(ufd.as_fd_borrowed(), nfd.as_fd_borrowed(), None, None)
            .and_then(|()| indexed_names(work, nfd.as_fd_borrowed()))
            .and_then(|names| {
                m.merge_dir(
                    ufd.as_fd_borrowed(),
                    nfd.as_fd_borrowed(),
                    Path::new(""),
                    opaque,
                )?;
                m.relink_indexed(names)
            })
            .map_err(|e| prefix_error(e, lower))?;
        crate::finalize::remove_dir_tree(&staging_path)?;
        apply_root_meta(ufd, &nfd, lower, privileged)?;
        sync_tree(&new)?;
        Ok(())
    };
    if let Err(e) = build() {
        // Roll back now; the journal goes only once the half-built tree is gone, so if the
        // removal fails the next mount or commit still knows the tree and removes it.
        match crate::finalize::remove_dir_tree(&new).and_then(|()| remove_journal(work)) {
            Ok(()) => {}
            Err(cleanup) => log::warn!("left for recovery at the next mount: {cleanup}"),
        }
        return Err(e);
    }
    let new_ino = {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(&new)
            .map_err(io_err("reading", &new))?
            .ino()
    };
    // Recovery tells "swapped" from "not yet" by which inode sits at the lower's path.
    journal.new_ino = new_ino;
    write_journal(work, &journal)?;
    step();
    let pfd = sys::open_dir_path(parent).map_err(io_err("opening", parent))?;
    let ln = sys::cstr(lower.file_name().unwrap_or_default()).map_err(io_err("swapping", lower))?;
    let nn = sys::cstr(OsStr::new(&name)).map_err(io_err("swapping", lower))?;
    sys::renameat2(
        pfd.as_fd_borrowed(),
        &nn,
        pfd.as_fd_borrowed(),
        &ln,
        libc::RENAME_EXCHANGE,
    )
    .map_err(io_err("swapping in the new tree at", lower))?;
    sync_dir(parent)?;
    step();
    // `new` now names the old tree.
    crate::finalize::remove_dir_tree(&new)
}

/// fsyncs every directory and regular file written under `root` (new data must be durable
/// before the swap makes it the lower).
fn sync_tree(root: &Path) -> Result<()> {
    fn walk(fd: BorrowedFd<'_>, path: &Path) -> Result<()> {
        for e in sys::read_dir(fd).map_err(io_err("syncing", path))? {
            if e.dtype == libc::DT_DIR {
                let c = cname(&e.name)?;
                let p = path.join(OsStr::from_bytes(&e.name));
                let sub = sys::openat(fd, &c, libc::O_PATH | libc::O_DIRECTORY, 0)
                    .map_err(io_err("syncing", &p))?;
                walk(sub.as_fd_borrowed(), &p)?;
            }
        }
        let d =
            sys::reopen(fd, libc::O_RDONLY | libc::O_DIRECTORY).map_err(io_err("syncing", path))?;
        sys::fsync(d.as_fd_borrowed(), false).map_err(io_err("syncing", path))
    }
    // Files were fsynced when written (Merger); hard-linked ones were durable already.
    let fd = sys::open_dir_path(root).map_err(io_err("syncing", root))?;
    walk(fd.as_fd_borrowed(), root)
}
