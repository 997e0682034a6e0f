//! Commit and CommitAtomic: merging the upper layer into the lower, on real mounts.
//!
//! Every test builds its own layers in fresh temporary directories, changes the tree through a
//! real FUSE mount (the library's `OverlayFS`, or the `ovl-run` binary), finalizes with
//! `OverlayAction::Commit` / `CommitAtomic` (or `--on-exit commit|commit-atomic`) and checks the
//! lower against an independent reference: the same changes applied to a plain `cp -a` copy of
//! the original lower.
//!
//! - merge semantics: new/changed files, whiteouts, opaque directories, renames, metadata
//!   (mode incl. setuid/setgid/sticky, owner, times, xattrs), symlinks, hard links, fifos,
//!   sockets and device nodes (never opened), the root directory;
//! - dedupe: identical files keep their inode; same size + same mtime + other content is written;
//! - safety: no symlink in the lower or upper is followed, nothing outside the lower changes,
//!   temporary names never clash with (or delete) the user's entries, internal xattrs never leak;
//! - failures (disk full, permission denied) report what failed, exit non-zero, keep the upper;
//! - crashes: `OVL_COMMIT_CRASH_AFTER=N` for every N, and SIGKILL injected by strace at sampled
//!   syscalls of the commit (any instant, also after the last durable step); recovery by the
//!   next run (ovl-run or the library); lower old-or-new (atomic: the whole tree; in place:
//!   every file), upper intact until the new lower is there, the next commit exactly the new
//!   tree;
//! - a seeded random property test against a plain copy (reproduce one seed with
//!   `OVL_COMMIT_SEED=<n>`, optionally `OVL_COMMIT_OPS=<n>`; more seeds with
//!   `OVL_COMMIT_SEEDS=<count>`).
//!
//! Everything needs root (FUSE mounts, device nodes, chown, chattr, tmpfs); without it the tests
//! print a note and pass. The SIGKILL tests also need `strace` (skipped with a note without it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{self, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{
    DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt,
};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{RwLock, mpsc};
use std::time::Duration;

use ovl::{OverlayAction, OverlayFS, Report};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tempfile::TempDir;

mod common;
use common::sys::*;

const OVL_RUN: &str = env!("CARGO_BIN_EXE_ovl-run");
const CRASH_ENV: &str = "OVL_COMMIT_CRASH_AFTER";
const MODES: [OverlayAction; 2] = [OverlayAction::Commit, OverlayAction::CommitAtomic];

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipping: commit tests need root (FUSE, mknod, chown, chattr, tmpfs)");
            return;
        }
    };
}

fn on_exit(action: OverlayAction) -> &'static str {
    match action {
        OverlayAction::CommitAtomic => "commit-atomic",
        OverlayAction::Commit => "commit",
        OverlayAction::Discard => "discard",
        OverlayAction::Preserve => "preserve",
    }
}

// ---------------------------------------------------------------------------------------------
// Small system helpers

/// Tests run in parallel threads of one process. A `fork` copies every open descriptor, also
/// those another test holds on its mount at that instant, and the copy lives until `exec`:
/// an unmount in that window fails with EBUSY. Spawning takes this lock shared, unmounting
/// takes it exclusively.
static FORK: RwLock<()> = RwLock::new(());

fn spawn(cmd: &mut Command) -> Child {
    let _g = FORK.read().unwrap_or_else(|e| e.into_inner());
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
}

/// `Command::output` through [`spawn`].
fn output(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    spawn(cmd).wait_with_output().unwrap()
}

/// Runs `f` (which unmounts) while no other thread is between fork and exec.
fn unmounting<T>(f: impl FnOnce() -> T) -> T {
    let _g = FORK.write().unwrap_or_else(|e| e.into_inner());
    f()
}

/// utimensat(AT_SYMLINK_NOFOLLOW) with explicit (sec, nsec) pairs; `None` leaves a time as is.
fn set_times(p: &Path, atime: Option<(i64, i64)>, mtime: Option<(i64, i64)>) -> io::Result<()> {
    let ts = |t: Option<(i64, i64)>| match t {
        Some((s, n)) => libc::timespec {
            tv_sec: s,
            tv_nsec: n,
        },
        None => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
    };
    let times = [ts(atime), ts(mtime)];
    let cp = cpath(p);
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cp.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let cp = cpath(p);
    check(unsafe { libc::lchown(cp.as_ptr(), uid, gid) })
}

fn mknod(p: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let cp = cpath(p);
    check(unsafe { libc::mknod(cp.as_ptr(), mode, dev) })
}

fn symlink(target: impl AsRef<Path>, at: &Path) {
    std::os::unix::fs::symlink(target, at).unwrap();
}

fn mode_of(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn ino_of(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().ino()
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

fn run(cmd: &mut Command) {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cp_a(from: &Path, to: &Path) {
    run(Command::new("cp").arg("-a").arg(from).arg(to));
}

fn is_mounted(p: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let s = p.display().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(s.as_str()))
}

/// Names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Runs `f` on a thread and panics if it takes longer than `secs` (a commit that opens a FIFO
/// blocks forever).
fn with_timeout<T: Send + 'static>(
    secs: u64,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s (blocked?)"))
}

// ---------------------------------------------------------------------------------------------
// Snapshots: what a tree holds, compared as text so failures show readable differences

#[derive(Clone, Debug)]
struct Ent {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    rdev: u64,
    data: Option<Vec<u8>>,
    target: Option<Vec<u8>>,
    /// All xattrs except security.* (so leaked trusted.overlay.* ones show up).
    xattrs: BTreeMap<String, Vec<u8>>,
    ino: u64,
    nlink: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

type Snap = BTreeMap<String, Ent>;

fn kind_char(ft: fs::FileType) -> char {
    if ft.is_dir() {
        'd'
    } else if ft.is_file() {
        'f'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_socket() {
        's'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else {
        '?'
    }
}

fn ent(p: &Path) -> io::Result<Ent> {
    let md = fs::symlink_metadata(p)?;
    let kind = kind_char(md.file_type());
    let mut xattrs = BTreeMap::new();
    for n in llistxattr(p)? {
        if !n.starts_with("security.") {
            xattrs.insert(n.clone(), lgetxattr(p, &n)?);
        }
    }
    Ok(Ent {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        rdev: if matches!(kind, 'c' | 'b') {
            md.rdev()
        } else {
            0
        },
        // Only regular files are read: fifos, sockets and devices are never opened.
        data: (kind == 'f').then(|| fs::read(p)).transpose()?,
        target: (kind == 'l')
            .then(|| fs::read_link(p).map(|t| t.into_os_string().into_vec()))
            .transpose()?,
        xattrs,
        ino: md.ino(),
        nlink: md.nlink(),
        mtime: (md.mtime(), md.mtime_nsec()),
        ctime: (md.ctime(), md.ctime_nsec()),
    })
}

/// The tree below `root` ("." is the root itself), not following symlinks.
fn snap(root: &Path) -> Snap {
    fn rec(base: &Path, rel: &str, out: &mut Snap) -> io::Result<()> {
        let p = if rel.is_empty() {
            base.to_path_buf()
        } else {
            base.join(rel)
        };
        let e = ent(&p)?;
        let dir = e.kind == 'd';
        out.insert(
            if rel.is_empty() {
                ".".into()
            } else {
                rel.into()
            },
            e,
        );
        if dir {
            let mut ns: Vec<OsString> = fs::read_dir(&p)?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()?;
            ns.sort();
            for n in ns {
                let n = n.to_string_lossy().into_owned();
                let r = if rel.is_empty() {
                    n
                } else {
                    format!("{rel}/{n}")
                };
                rec(base, &r, out)?;
            }
        }
        Ok(())
    }
    let mut s = Snap::new();
    rec(root, "", &mut s).unwrap_or_else(|e| panic!("walking {}: {e}", root.display()));
    s
}

fn show_bytes(b: &[u8]) -> String {
    if b.len() <= 48 {
        format!("\"{}\"", b.escape_ascii())
    } else {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        b.hash(&mut h);
        format!(
            "\"{}\"...({} bytes, hash {:016x})",
            b[..24].escape_ascii(),
            b.len(),
            h.finish()
        )
    }
}

/// What is compared of one entry (no inode numbers, no times unless asked).
fn show(e: &Ent, mtime: bool) -> String {
    let mut s = format!("{} {:04o} {}:{}", e.kind, e.mode, e.uid, e.gid);
    if matches!(e.kind, 'c' | 'b') {
        s += &format!(" rdev={:#x}", e.rdev);
    }
    if let Some(d) = &e.data {
        s += &format!(" data={}", show_bytes(d));
    }
    if let Some(t) = &e.target {
        s += &format!(" -> {}", show_bytes(t));
    }
    for (k, v) in &e.xattrs {
        s += &format!(" {k}={}", show_bytes(v));
    }
    if mtime {
        s += &format!(" mtime={}.{:09}", e.mtime.0, e.mtime.1);
    }
    s
}

#[derive(Clone, Copy, Default)]
struct Cmp {
    /// Hard-link groups: the other paths of the tree sharing the entry's inode.
    links: bool,
    /// st_nlink of non-directories (catches hidden extra links).
    nlink: bool,
    /// mtime of every entry (for trees nothing may touch).
    mtime: bool,
}

fn describe(s: &Snap, cmp: Cmp) -> BTreeMap<String, String> {
    let mut groups: HashMap<u64, Vec<&str>> = HashMap::new();
    for (p, e) in s {
        if e.kind != 'd' {
            groups.entry(e.ino).or_default().push(p);
        }
    }
    s.iter()
        .map(|(p, e)| {
            let mut d = show(e, cmp.mtime);
            if e.kind != 'd' {
                if cmp.links {
                    let others: Vec<&str> =
                        groups[&e.ino].iter().copied().filter(|o| o != p).collect();
                    if !others.is_empty() {
                        d += &format!(" links={others:?}");
                    }
                }
                if cmp.nlink {
                    d += &format!(" nlink={}", e.nlink);
                }
            }
            (p.clone(), d)
        })
        .collect()
}

/// Human-readable differences (empty if equal).
fn diff(an: &str, a: &BTreeMap<String, String>, bn: &str, b: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let (x, y) = (a.get(k), b.get(k));
        if x != y {
            let f = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(absent)".into());
            out += &format!("    {k}:\n      {an}: {}\n      {bn}: {}\n", f(x), f(y));
        }
    }
    out
}

fn tree_diff(an: &str, a: &Snap, bn: &str, b: &Snap, cmp: Cmp) -> String {
    diff(an, &describe(a, cmp), bn, &describe(b, cmp))
}

fn same_tree(a: &Snap, b: &Snap, cmp: Cmp) -> bool {
    describe(a, cmp) == describe(b, cmp)
}

const LINKS: Cmp = Cmp {
    links: true,
    nlink: false,
    mtime: false,
};
const EXACT: Cmp = Cmp {
    links: true,
    nlink: true,
    mtime: false,
};
const UNTOUCHED: Cmp = Cmp {
    links: true,
    nlink: false,
    mtime: true,
};

/// Entries of `s` carrying one of the overlay's own xattrs or a whiteout-format name.
fn leaks(s: &Snap) -> Vec<String> {
    let mut out = Vec::new();
    for (p, e) in s {
        for k in e.xattrs.keys() {
            if k.starts_with("trusted.overlay.") || k.starts_with("user.overlay.") {
                out.push(format!("{p}: xattr {k}"));
            }
        }
        let name = p.rsplit('/').next().unwrap_or(p);
        if name.starts_with(".wh.") {
            out.push(format!("{p}: whiteout-format name"));
        }
        if e.kind == 'c' && e.rdev == 0 {
            out.push(format!("{p}: whiteout device 0/0"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Library fixture: lower/upper/work in a private temp dir, mounted at mnt

struct Fx {
    dir: TempDir,
    lower: PathBuf,
    upper: PathBuf,
    work: PathBuf,
    mnt: PathBuf,
    ofs: OverlayFS,
}

impl Fx {
    /// `setup(lower, test_dir)` fills the lower (and whatever else it wants in the test dir).
    fn new(setup: impl FnOnce(&Path, &Path)) -> Fx {
        let dir = tempfile::Builder::new()
            .prefix("ovl-commit")
            .tempdir()
            .unwrap();
        let lower = dir.path().join("lower");
        let upper = dir.path().join("upper");
        let work = dir.path().join("work");
        let mnt = dir.path().join("mnt");
        for d in [&lower, &upper, &work, &mnt] {
            fs::create_dir(d).unwrap();
        }
        setup(&lower, dir.path());
        Self::mount_at(dir, lower, upper, work, mnt)
    }

    fn mount_at(dir: TempDir, lower: PathBuf, upper: PathBuf, work: PathBuf, mnt: PathBuf) -> Fx {
        let mut ofs = OverlayFS::new(&lower);
        ofs.set_upper(&upper)
            .set_workdir(&work)
            .set_mountpoint(&mnt);
        ofs.mount().expect("mount");
        Fx {
            dir,
            lower,
            upper,
            work,
            mnt,
            ofs,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn l(&self, rel: &str) -> PathBuf {
        self.lower.join(rel)
    }

    fn t(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Unmounts and finalizes.
    fn finish(&mut self, action: OverlayAction) -> ovl::Result<Report> {
        unmounting(|| self.ofs.overlay_action(action))
    }

    /// Runs a shell script with `$OVL_MOUNTPOINT` = the mount.
    fn sh(&self, script: &str) {
        sh_in(&self.mnt, script);
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        let _ = unmounting(|| self.ofs.umount());
        if is_mounted(&self.mnt) {
            let _ = output(Command::new("umount").arg("-l").arg(&self.mnt));
        }
    }
}

fn sh_in(dir: &Path, script: &str) {
    let out = output(
        Command::new("sh")
            .arg("-c")
            .arg(format!("set -e\ncd \"$OVL_MOUNTPOINT\"\n{script}"))
            .env("OVL_MOUNTPOINT", dir)
            .current_dir(dir),
    );
    assert!(
        out.status.success(),
        "script failed in {}:\n{script}\nstderr: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Applies `script` to a plain copy of the fixture's lower (`<test dir>/copy`, made before the
/// mount changes anything) and through the mount, then finalizes with `action`.
fn scenario(
    setup: impl FnOnce(&Path, &Path),
    script: &str,
    action: OverlayAction,
) -> (Fx, ovl::Result<Report>, Snap) {
    let mut fx = Fx::new(setup);
    let copy = fx.t("copy");
    cp_a(&fx.lower, &copy);
    sh_in(&copy, script);
    fx.sh(script);
    let r = fx.finish(action);
    let expected = snap(&copy);
    (fx, r, expected)
}

/// After a successful commit: upper and work directory are gone, the mount point is free.
fn assert_finalized(fx: &Fx, what: &str) {
    assert!(
        !exists(&fx.upper),
        "{what}: upper still exists after commit"
    );
    assert!(
        !exists(&fx.work),
        "{what}: work dir still exists after commit"
    );
    assert!(!is_mounted(&fx.mnt), "{what}: still mounted after commit");
}

fn assert_tree(what: &str, lower: &Path, expected: &Snap, cmp: Cmp) {
    let got = snap(lower);
    let d = tree_diff("lower", &got, "expected", expected, cmp);
    assert!(d.is_empty(), "{what}: committed lower differs:\n{d}");
}

/// Collects failed expectations so one run reports all of them.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, msg: impl FnOnce() -> String) {
        if !ok {
            self.0.push(msg());
        }
    }

    fn eq<T: PartialEq + fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        if got != want {
            self.0
                .push(format!("{what}: got {got:?}, expected {want:?}"));
        }
    }

    fn assert_none(self, title: &str) {
        assert!(self.0.is_empty(), "{title}:\n  - {}", self.0.join("\n  - "));
    }
}

// ---------------------------------------------------------------------------------------------
// ovl-run helper

/// Runs ovl-run in `dir` (its cache dir, hence its mount point, inside `dir`), without core
/// dumps, with `OVL_COMMIT_CRASH_AFTER` only when `crash` is given. Killed after 60 s.
fn ovl_run(dir: &Path, args: &[&OsStr], crash: Option<u64>) -> Output {
    ovl_run_under(&[], dir, args, crash)
}

/// [`ovl_run`] under a wrapper command (`strace ...`), given as its argv prefix.
fn ovl_run_under(wrapper: &[&OsStr], dir: &Path, args: &[&OsStr], crash: Option<u64>) -> Output {
    let mut c = match wrapper.split_first() {
        Some((prog, rest)) => {
            let mut c = Command::new(prog);
            c.args(rest).arg(OVL_RUN);
            c
        }
        None => Command::new(OVL_RUN),
    };
    c.args(args)
        .current_dir(dir)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env_remove(CRASH_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(n) = crash {
        c.env(CRASH_ENV, n.to_string());
    }
    unsafe {
        c.pre_exec(|| {
            let rl = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &rl);
            Ok(())
        });
    }
    let child = spawn(&mut c);
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(r) => r.unwrap(),
        Err(_) => {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("ovl-run {args:?} did not finish within 60 s");
        }
    }
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// =============================================================================================
// Merge semantics

fn basic_lower(l: &Path, _t: &Path) {
    fs::write(l.join("keep"), "keep\n").unwrap();
    fs::write(l.join("mod"), "old content\n").unwrap();
    fs::write(l.join("append"), "head\n").unwrap();
    fs::write(l.join("del"), "delete me\n").unwrap();
    fs::write(l.join("mv-src"), "moved file\n").unwrap();
    fs::create_dir_all(l.join("dir/sub")).unwrap();
    fs::write(l.join("dir/a"), "a\n").unwrap();
    fs::write(l.join("dir/sub/b"), "b\n").unwrap();
    fs::create_dir_all(l.join("opq/deep")).unwrap();
    fs::write(l.join("opq/old1"), "old1\n").unwrap();
    fs::write(l.join("opq/deep/old2"), "old2\n").unwrap();
    fs::create_dir_all(l.join("ren/inner")).unwrap();
    fs::write(l.join("ren/r1"), "r1\n").unwrap();
    fs::write(l.join("ren/inner/r2"), "r2\n").unwrap();
    fs::create_dir(l.join("gone")).unwrap();
    fs::write(l.join("gone/g"), "g\n").unwrap();
    fs::write(l.join("file2dir"), "was a file\n").unwrap();
    fs::create_dir(l.join("dir2file")).unwrap();
    fs::write(l.join("dir2file/x"), "x\n").unwrap();
    symlink("keep", &l.join("sym"));
    symlink("keep", &l.join("sym2file"));
}

const BASIC_SCRIPT: &str = r#"
echo "new content" > mod
echo tail >> append
rm del
echo created > new
mkdir -p newdir/nested && echo n > newdir/nested/n
mv mv-src mv-dst
echo a2 > dir/a
rm dir/sub/b
rm -r opq && mkdir opq && echo fresh > opq/fresh
mv ren renamed
rm -r gone
rm file2dir && mkdir file2dir && echo inside > file2dir/f
rm -r dir2file && echo now-a-file > dir2file
rm sym && ln -s mod sym
rm sym2file && echo plain > sym2file
ln -s newdir/nested/n newsym
"#;

fn basic_merge(action: OverlayAction) {
    let (fx, r, expected) = scenario(basic_lower, BASIC_SCRIPT, action);
    let rep = r.unwrap_or_else(|e| panic!("{action:?} failed: {e}"));
    assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
    assert_finalized(&fx, &format!("{action:?}"));
    assert!(rep.written >= 10, "{action:?}: report {rep:?}");
    assert!(rep.deleted >= 4, "{action:?}: report {rep:?}");
    assert!(rep.dirs_replaced >= 1, "{action:?}: report {rep:?}");
}

#[test]
fn commit_merges_changes_whiteouts_opaque_dirs_renames() {
    need_root!();
    basic_merge(OverlayAction::Commit);
}

#[test]
fn commit_atomic_merges_changes_whiteouts_opaque_dirs_renames() {
    need_root!();
    basic_merge(OverlayAction::CommitAtomic);
}

/// Renames land as renames or as delete + create; either way no data is lost and no stale copy
/// stays behind, also for a lower directory moved into another lower directory.
#[test]
fn renames_of_lower_files_and_directories() {
    need_root!();
    for action in MODES {
        let (fx, r, expected) = scenario(
            |l, _| {
                fs::create_dir_all(l.join("a/b/c")).unwrap();
                fs::write(l.join("a/b/c/f"), "deep\n").unwrap();
                fs::write(l.join("a/top"), "top\n").unwrap();
                fs::create_dir(l.join("z")).unwrap();
                fs::write(l.join("one"), "1\n").unwrap();
                fs::write(l.join("two"), "2\n").unwrap();
            },
            "mv a/b z/b\nmv one two\nmv z/b/c/f z/b/c/g\nmv a a2\n",
            action,
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
    }
}

/// Renames of lower and merged directories (recorded by the mount as redirects: relative,
/// absolute, nested, under a new opaque directory, renamed again and back, exchanged, over a
/// hidden lower directory) land as moves of the lower directories: the tree is the plain
/// copy's, and in place every file keeps its inode (nothing was copied).
#[test]
fn directory_renames_are_moved_not_copied() {
    need_root!();
    let setup = |l: &Path, _: &Path| {
        for d in ["a/b/c", "z", "p/q", "x", "y", "e"] {
            fs::create_dir_all(l.join(d)).unwrap();
        }
        for f in [
            "a/f", "a/b/g", "a/b/c/h", "z/i", "p/q/j", "x/k", "y/l", "e/m",
        ] {
            fs::write(l.join(f), format!("{f}\n")).unwrap();
        }
    };
    let script = "\
mv a a2
mv a2/b top
mkdir a
mv top/c a/c2
mv z z2
mv z2 z
mv p/q pq
mv pq p/q2
echo new > p/q2/n
mv x xt
mv y x
mv xt y
rm e/m
mv -T x e
";
    // Where each lower file ends up.
    let moved = [
        ("a/f", "a2/f"),
        ("a/b/g", "top/g"),
        ("a/b/c/h", "a/c2/h"),
        ("z/i", "z/i"),
        ("p/q/j", "p/q2/j"),
        ("x/k", "y/k"),
        ("y/l", "e/l"),
    ];
    for action in MODES {
        let inos = std::cell::RefCell::new(HashMap::new());
        let (fx, r, expected) = scenario(
            |l, t| {
                setup(l, t);
                for (f, _) in moved {
                    inos.borrow_mut().insert(f, ino_of(&l.join(f)));
                }
            },
            script,
            action,
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
        let l = leaks(&snap(&fx.lower));
        assert!(l.is_empty(), "{action:?}: overlay internals leaked: {l:?}");
        if action == OverlayAction::Commit {
            for (from, to) in moved {
                assert_eq!(
                    ino_of(&fx.l(to)),
                    inos.borrow()[from],
                    "{to} (was {from}) was rewritten, not moved"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata

const T_ATIME: (i64, i64) = (1_000_000_000, 111_111_111);
const T_MTIME: (i64, i64) = (1_100_000_000, 123_456_789);
const T_MTIME2: (i64, i64) = (1_200_000_000, 987_654_321);
const T_DIRMTIME: (i64, i64) = (1_300_000_000, 5);
const T_SYMMTIME: (i64, i64) = (1_400_000_000, 7);
const OLD: (i64, i64) = (1_262_304_000, 0);

fn metadata_lower(l: &Path, _t: &Path) {
    for f in [
        "m_mode", "m_suid", "m_sgid", "m_owner", "m_times", "m_mtime", "m_xset", "m_xrm",
    ] {
        fs::write(l.join(f), format!("{f}\n")).unwrap();
        chmod(&l.join(f), 0o644);
    }
    lsetxattr(&l.join("m_xrm"), "user.old", b"old", 0).unwrap();
    lsetxattr(&l.join("m_xset"), "user.keep", b"k", 0).unwrap();
    for d in [
        "d_mode", "d_sticky", "d_sgid", "d_owner", "d_xset", "d_xrm", "d_times",
    ] {
        fs::create_dir(l.join(d)).unwrap();
        fs::write(l.join(d).join("child"), "c\n").unwrap();
        chmod(&l.join(d), 0o755);
    }
    lsetxattr(&l.join("d_xrm"), "user.old", b"old", 0).unwrap();
    symlink("m_mode", &l.join("sym"));
    for p in snap(l).keys() {
        set_times(&l.join(p), Some(OLD), Some(OLD)).unwrap();
    }
}

fn metadata_case(action: OverlayAction) {
    let mut fx = Fx::new(metadata_lower);
    let p = |r: &str| fx.p(r);
    // Content and attribute changes first, then the view (reading files moves atimes), then
    // the times, which are read back with stat only.
    fs::write(p("m_times"), "changed\n").unwrap();
    chmod(&p("m_mode"), 0o600);
    chmod(&p("m_suid"), 0o4755);
    chmod(&p("m_sgid"), 0o2755);
    lchown(&p("m_owner"), 1234, 2345).unwrap();
    chmod(&p("m_owner"), 0o6750);
    lsetxattr(&p("m_xset"), "user.new", b"v", 0).unwrap();
    // trusted.* (root only) where the mount takes it: the view comparison below covers it.
    let _ = lsetxattr(&p("m_xset"), "trusted.t", b"1", 0);
    let _ = lsetxattr(&p("d_xset"), "trusted.t", b"2", 0);
    lremovexattr(&p("m_xrm"), "user.old").unwrap();
    chmod(&p("d_mode"), 0o700);
    chmod(&p("d_sticky"), 0o1777);
    chmod(&p("d_sgid"), 0o2775);
    lchown(&p("d_owner"), 1234, 2345).unwrap();
    lsetxattr(&p("d_xset"), "user.d", b"1", 0).unwrap();
    lremovexattr(&p("d_xrm"), "user.old").unwrap();
    lchown(&p("sym"), 1234, 2345).unwrap();
    // What the mount shows is what the lower must hold afterwards.
    let view = snap(&fx.mnt);
    set_times(&p("m_times"), Some(T_ATIME), Some(T_MTIME)).unwrap();
    set_times(&p("m_mtime"), None, Some(T_MTIME2)).unwrap();
    set_times(&p("d_times"), None, Some(T_DIRMTIME)).unwrap();
    let sym_times = set_times(&p("sym"), None, Some(T_SYMMTIME)).is_ok();
    let view_md: HashMap<String, (i64, i64)> = view
        .keys()
        .map(|k| {
            let m = fs::symlink_metadata(fx.mnt.join(k)).unwrap();
            (k.clone(), (m.mtime(), m.mtime_nsec()))
        })
        .collect();
    let r = fx.finish(action);
    let rep = r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
    let l = |r: &str| fx.l(r);
    let md = |r: &str| fs::symlink_metadata(l(r)).unwrap();
    let mut pr = Problems::default();
    // Times first: reading the files below would move atimes.
    pr.eq(
        "m_times mtime",
        (md("m_times").mtime(), md("m_times").mtime_nsec()),
        T_MTIME,
    );
    pr.eq(
        "m_times atime",
        (md("m_times").atime(), md("m_times").atime_nsec()),
        T_ATIME,
    );
    pr.eq(
        "m_mtime mtime (only the mtime changed)",
        (md("m_mtime").mtime(), md("m_mtime").mtime_nsec()),
        T_MTIME2,
    );
    pr.eq(
        "d_times mtime",
        (md("d_times").mtime(), md("d_times").mtime_nsec()),
        T_DIRMTIME,
    );
    if sym_times {
        pr.eq(
            "sym mtime",
            (md("sym").mtime(), md("sym").mtime_nsec()),
            T_SYMMTIME,
        );
    }
    pr.eq("m_mode mode", mode_of(&l("m_mode")), 0o600);
    pr.eq("m_suid mode", mode_of(&l("m_suid")), 0o4755);
    pr.eq("m_sgid mode", mode_of(&l("m_sgid")), 0o2755);
    pr.eq(
        "m_owner owner",
        (md("m_owner").uid(), md("m_owner").gid()),
        (1234, 2345),
    );
    pr.eq("m_owner mode", mode_of(&l("m_owner")), 0o6750);
    pr.eq("d_mode mode", mode_of(&l("d_mode")), 0o700);
    pr.eq("d_sticky mode", mode_of(&l("d_sticky")), 0o1777);
    pr.eq("d_sgid mode", mode_of(&l("d_sgid")), 0o2775);
    pr.eq(
        "d_owner owner",
        (md("d_owner").uid(), md("d_owner").gid()),
        (1234, 2345),
    );
    pr.eq(
        "sym owner",
        (md("sym").uid(), md("sym").gid()),
        (1234, 2345),
    );
    let user = |p: PathBuf| -> BTreeSet<String> {
        llistxattr(&p)
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with("user."))
            .collect()
    };
    pr.eq(
        "m_xset user xattrs",
        user(l("m_xset")),
        ["user.keep".to_string(), "user.new".to_string()].into(),
    );
    pr.eq("m_xrm xattrs", llistxattr(&l("m_xrm")).unwrap(), vec![]);
    pr.eq(
        "d_xset user xattrs",
        user(l("d_xset")),
        ["user.d".to_string()].into(),
    );
    pr.eq(
        "d_xrm xattrs (removed from a directory)",
        llistxattr(&l("d_xrm")).unwrap(),
        vec![],
    );
    pr.eq(
        "m_times content",
        fs::read(l("m_times")).unwrap(),
        b"changed\n".to_vec(),
    );
    // Everything else the mount showed (types, modes, owners, contents, xattrs, links).
    let got = snap(&fx.lower);
    let d = tree_diff("lower", &got, "mount view", &view, LINKS);
    pr.check(d.is_empty(), || {
        format!("lower differs from the mount view:\n{d}")
    });
    // mtimes of non-directories as the mount showed them (copy-up and commit keep them).
    for (k, e) in &got {
        if e.kind != 'd' {
            if let Some(v) = view_md.get(k) {
                pr.check(e.mtime == *v, || {
                    format!("{k}: mtime {:?}, the mount showed {v:?}", e.mtime)
                });
            }
        }
    }
    pr.check(rep.written >= 8, || format!("report {rep:?}"));
    pr.assert_none(&format!("{action:?}: metadata not committed"));
}

#[test]
fn commit_applies_metadata() {
    need_root!();
    metadata_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_applies_metadata() {
    need_root!();
    metadata_case(OverlayAction::CommitAtomic);
}

/// The mount's root directory is the upper root: its mode, owner, times and xattrs are
/// changes like any other directory's.
#[test]
fn root_directory_metadata_is_committed() {
    need_root!();
    let mut pr = Problems::default();
    for action in MODES {
        let mut fx = Fx::new(|l, _| {
            fs::write(l.join("f"), "f\n").unwrap();
            chmod(l, 0o755);
        });
        chmod(&fx.mnt, 0o750);
        lchown(&fx.mnt, 1234, 2345).unwrap();
        lsetxattr(&fx.mnt, "user.root", b"r", 0).unwrap();
        fx.finish(action)
            .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        let md = fs::symlink_metadata(&fx.lower).unwrap();
        pr.eq(&format!("{action:?}: root mode"), md.mode() & 0o7777, 0o750);
        pr.eq(
            &format!("{action:?}: root owner"),
            (md.uid(), md.gid()),
            (1234, 2345),
        );
        pr.eq(
            &format!("{action:?}: root xattrs"),
            llistxattr(&fx.lower).unwrap(),
            vec!["user.root".to_string()],
        );
    }
    pr.assert_none("root directory metadata");
}

/// A root directory nobody changed keeps its mode, owner and xattrs (the atomic commit
/// rebuilds it).
#[test]
fn untouched_root_directory_keeps_its_metadata() {
    need_root!();
    for action in MODES {
        let mut fx = Fx::new(|l, _| {
            fs::write(l.join("f"), "f\n").unwrap();
            lchown(l, 1234, 2345).unwrap();
            chmod(l, 0o2751);
            lsetxattr(l, "user.keep", b"k", 0).unwrap();
        });
        let before = ent(&fx.lower).unwrap();
        fs::write(fx.p("f"), "changed\n").unwrap();
        fx.finish(action)
            .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        let after = ent(&fx.lower).unwrap();
        assert_eq!(show(&after, false), show(&before, false), "{action:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Hard links

#[test]
fn hard_links_in_the_upper_stay_linked_in_the_lower() {
    need_root!();
    for action in MODES {
        let (fx, r, expected) = scenario(
            |l, _| {
                fs::write(l.join("a"), "a\n").unwrap();
                fs::create_dir(l.join("d")).unwrap();
                fs::write(l.join("d/x"), "x\n").unwrap();
                fs::write(l.join("h1"), "h\n").unwrap();
                fs::hard_link(l.join("h1"), l.join("d/h2")).unwrap();
            },
            "echo n > n1\nln n1 n2\nln n1 d/n3\nln a a2\nln d/x y\necho more >> y\n",
            action,
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
        let l = |r: &str| ino_of(&fx.l(r));
        assert_eq!(l("n1"), l("n2"), "{action:?}");
        assert_eq!(l("n1"), l("d/n3"), "{action:?}");
        assert_eq!(l("a"), l("a2"), "{action:?}");
        assert_eq!(l("d/x"), l("y"), "{action:?}");
        // An untouched lower hard-link pair stays one inode.
        assert_eq!(l("h1"), l("d/h2"), "{action:?}");
    }
}

/// A lower file with two names, written through one of them: through the mount both names
/// show the new content (one file), so the committed lower must too.
#[test]
fn lower_hard_link_written_through_one_name() {
    need_root!();
    let mut pr = Problems::default();
    for action in MODES {
        let mut fx = Fx::new(|l, _| {
            fs::write(l.join("h1"), "old\n").unwrap();
            fs::create_dir(l.join("d")).unwrap();
            fs::hard_link(l.join("h1"), l.join("d/h2")).unwrap();
            fs::write(l.join("m1"), "m\n").unwrap();
            fs::hard_link(l.join("m1"), l.join("d/m2")).unwrap();
        });
        // Only h1 and m1 are looked up: d/h2 and d/m2 are never named through the mount
        // (looking at them would link them up in the upper and hide the problem).
        fs::write(fx.p("h1"), "new content\n").unwrap();
        chmod(&fx.p("m1"), 0o600);
        fx.finish(action)
            .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        let l = |r: &str| fx.l(r);
        for (a, b) in [("h1", "d/h2"), ("m1", "d/m2")] {
            pr.eq(
                &format!("{action:?}: {b} is the same file as {a}"),
                ino_of(&l(b)),
                ino_of(&l(a)),
            );
        }
        pr.eq(
            &format!("{action:?}: d/h2 content"),
            fs::read_to_string(l("d/h2")).unwrap(),
            "new content\n".to_string(),
        );
        pr.eq(
            &format!("{action:?}: d/m2 mode"),
            mode_of(&l("d/m2")),
            0o600,
        );
    }
    pr.assert_none("hard-linked lower file changed through one name");
}

// ---------------------------------------------------------------------------------------------
// Special files: recreated as what they are, never opened

fn special_case(action: OverlayAction) {
    let mut fx = Fx::new(|l, _| {
        mknod(&l.join("lfifo"), libc::S_IFIFO | 0o644, 0).unwrap();
        mknod(&l.join("lfifo2"), libc::S_IFIFO | 0o644, 0).unwrap();
        mknod(&l.join("lchr"), libc::S_IFCHR | 0o600, libc::makedev(1, 3)).unwrap();
        fs::write(l.join("f"), "f\n").unwrap();
    });
    let p = |r: &str| fx.p(r);
    mknod(&p("fifo"), libc::S_IFIFO | 0o640, 0).unwrap();
    mknod(&p("chr"), libc::S_IFCHR | 0o620, libc::makedev(1, 5)).unwrap();
    mknod(&p("blk"), libc::S_IFBLK | 0o660, libc::makedev(7, 200)).unwrap();
    drop(std::os::unix::net::UnixListener::bind(p("sock")).unwrap());
    fs::create_dir(p("sub")).unwrap();
    mknod(&p("sub/fifo"), libc::S_IFIFO | 0o600, 0).unwrap();
    chmod(&p("lfifo"), 0o600); // changed lower fifo
    lchown(&p("lfifo2"), 0, 0).unwrap(); // copied up, identical
    lchown(&p("lchr"), 1234, 2345).unwrap();
    let view = snap(&fx.mnt);
    let lower = fx.lower.clone();
    // If the commit opened a fifo it would block here forever (no writer).
    unmounting(|| fx.ofs.umount()).unwrap();
    let mut ofs = std::mem::replace(&mut fx.ofs, OverlayFS::new(&lower));
    let r = with_timeout(30, "commit with fifos", move || {
        ofs.overlay_action(action).map_err(|e| e.to_string())
    });
    r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
    let got = snap(&fx.lower);
    let d = tree_diff("lower", &got, "mount view", &view, LINKS);
    assert!(d.is_empty(), "{action:?}: special files differ:\n{d}");
    let k = |r: &str| got[r].kind;
    assert_eq!(
        (
            k("fifo"),
            k("chr"),
            k("blk"),
            k("sock"),
            k("sub/fifo"),
            k("lfifo")
        ),
        ('p', 'c', 'b', 's', 'p', 'p')
    );
    assert_eq!(got["chr"].rdev, libc::makedev(1, 5));
    assert_eq!(got["blk"].rdev, libc::makedev(7, 200));
}

#[test]
fn commit_recreates_fifos_sockets_devices_without_opening_them() {
    need_root!();
    special_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_recreates_fifos_sockets_devices_without_opening_them() {
    need_root!();
    special_case(OverlayAction::CommitAtomic);
}

// ---------------------------------------------------------------------------------------------
// Dedupe

fn dedupe_case(action: OverlayAction) {
    let mut fx = Fx::new(|l, _| {
        for f in [
            "untouched",
            "rewritten",
            "chmod_same",
            "samesize",
            "mode",
            "owner",
            "xattr",
        ] {
            fs::write(l.join(f), format!("{f} data\n")).unwrap();
            chmod(&l.join(f), 0o644);
            set_times(&l.join(f), Some(OLD), Some(OLD)).unwrap();
        }
        fs::create_dir(l.join("d")).unwrap();
        fs::write(l.join("d/inner"), "inner\n").unwrap();
    });
    let before: HashMap<String, u64> = snap(&fx.lower)
        .into_iter()
        .map(|(k, e)| (k, e.ino))
        .collect();
    // Same content, mode, owner, xattrs: identical, whatever happened to it on the way.
    fs::write(fx.p("rewritten"), "rewritten data\n").unwrap();
    chmod(&fx.p("chmod_same"), 0o644);
    chmod(&fx.p("d/inner"), 0o644);
    // Same size and same mtime as the lower's, other content: must be written.
    fs::write(fx.p("samesize"), "SAMESIZE DATA\n").unwrap();
    set_times(&fx.p("samesize"), Some(OLD), Some(OLD)).unwrap();
    assert_eq!(
        fs::metadata(fx.p("samesize")).unwrap().len(),
        fs::metadata(fx.l("samesize")).unwrap().len()
    );
    // Same content, one attribute different: must be written.
    chmod(&fx.p("mode"), 0o640);
    lchown(&fx.p("owner"), 1234, 2345).unwrap();
    lsetxattr(&fx.p("xattr"), "user.x", b"1", 0).unwrap();
    let view = snap(&fx.mnt);
    let rep = fx
        .finish(action)
        .unwrap_or_else(|e| panic!("{action:?}: {e}"));
    let ino = |r: &str| ino_of(&fx.l(r));
    let mut pr = Problems::default();
    for f in ["untouched", "rewritten", "chmod_same", "d/inner"] {
        pr.eq(&format!("{f}: inode (deduplicated)"), ino(f), before[f]);
    }
    pr.eq(
        "samesize content",
        fs::read(fx.l("samesize")).unwrap(),
        b"SAMESIZE DATA\n".to_vec(),
    );
    let got = snap(&fx.lower);
    let d = tree_diff("lower", &got, "mount view", &view, LINKS);
    pr.check(d.is_empty(), || {
        format!("lower differs from the mount view:\n{d}")
    });
    pr.check(rep.deduplicated >= 3, || {
        format!(
            "report counts {} deduplicated, expected >= 3: {rep:?}",
            rep.deduplicated
        )
    });
    pr.check(rep.written >= 4, || format!("report {rep:?}"));
    pr.assert_none(&format!("{action:?}: dedupe"));
}

#[test]
fn commit_dedupes_identical_files_only() {
    need_root!();
    dedupe_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_dedupes_identical_files_only() {
    need_root!();
    dedupe_case(OverlayAction::CommitAtomic);
}

// ---------------------------------------------------------------------------------------------
// Report

const REPORT_SCRIPT: &str = r#"
chmod 644 same
printf 'HELLO!' > mod
rm del
rm -r dir && mkdir dir && echo c > dir/c
printf xyz > new
"#;

fn report_lower(l: &Path) {
    fs::write(l.join("keep"), "keep\n").unwrap();
    fs::write(l.join("same"), "same\n").unwrap();
    chmod(&l.join("same"), 0o644);
    fs::write(l.join("mod"), "hello").unwrap();
    fs::write(l.join("del"), "bye").unwrap();
    fs::create_dir(l.join("dir")).unwrap();
    fs::write(l.join("dir/a"), "a").unwrap();
    fs::write(l.join("dir/b"), "b").unwrap();
}

fn check_report(what: &str, r: &Report, action: OverlayAction, lower: &Path) {
    let want = (3, 1, 3, 1, 11);
    assert_eq!(
        (
            r.written,
            r.deduplicated,
            r.deleted,
            r.dirs_replaced,
            r.bytes
        ),
        want,
        "{what}: (written, deduplicated, deleted, dirs_replaced, bytes) of {r:?}"
    );
    assert_eq!(r.action, action, "{what}");
    assert_eq!(r.path, lower.canonicalize().unwrap(), "{what}");
}

#[test]
fn library_returns_report() {
    need_root!();
    for action in MODES {
        let (fx, r, expected) = scenario(|l, _| report_lower(l), REPORT_SCRIPT, action);
        let r = r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
        check_report(&format!("{action:?}"), &r, action, &fx.lower);
    }
}

#[test]
fn ovl_run_prints_report_in_one_line() {
    need_root!();
    for action in MODES {
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("L");
        fs::create_dir(&lower).unwrap();
        report_lower(&lower);
        let copy = t.path().join("copy");
        cp_a(&lower, &copy);
        sh_in(&copy, REPORT_SCRIPT);
        let script = format!("set -e\ncd \"$OVL_MOUNTPOINT\"\n{REPORT_SCRIPT}");
        let out = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--on-exit"),
                os(on_exit(action)),
                os("--"),
                os("sh"),
                os("-c"),
                os(&script),
            ],
            None,
        );
        let err = stderr(&out);
        assert!(out.status.success(), "{action:?}: {out:?}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{action:?}: expected one line, got {err:?}");
        let line = lines[0];
        for part in [
            "3 files",
            "3 deletions",
            "1 replaced",
            "1 unchanged",
            "11 bytes",
        ] {
            assert!(line.contains(part), "{action:?}: {line:?} lacks {part:?}");
        }
        assert!(line.contains(&lower.display().to_string()), "{line:?}");
        assert_eq!(
            line.ends_with("atomically"),
            action == OverlayAction::CommitAtomic,
            "{line:?}"
        );
        assert_tree(&format!("{action:?}"), &lower, &snap(&copy), EXACT);
        assert!(
            !exists(&t.path().join("L_upper")),
            "upper left after commit"
        );
        assert!(
            !exists(&t.path().join(".L_upper.ovl-work")),
            "work dir left after commit"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Internal xattrs and whiteout formats never reach the lower

#[test]
fn internal_overlay_xattrs_never_leak() {
    need_root!();
    for action in MODES {
        let (fx, r, expected) = scenario(
            |l, _| {
                fs::create_dir_all(l.join("d/e")).unwrap();
                fs::write(l.join("d/e/f"), "f\n").unwrap();
                fs::write(l.join("d/g"), "g\n").unwrap();
                fs::create_dir(l.join("o")).unwrap();
                fs::write(l.join("o/x"), "x\n").unwrap();
                fs::write(l.join("h1"), "h\n").unwrap();
                fs::hard_link(l.join("h1"), l.join("h2")).unwrap();
                fs::write(l.join("w"), "w\n").unwrap();
            },
            // A renamed lower dir (copied up whole, opaque), an opaque re-created dir, a
            // whiteout, a copied-up hard link (indexed), a directory over a whiteout.
            "mv d d2\nrm -r o && mkdir o && echo y > o/y\nrm w\necho more >> h1\ncat h2 >/dev/null\n\
             rm d2/g && mkdir d2/g\nmkdir n && touch n/m\n",
            action,
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        let got = snap(&fx.lower);
        let l = leaks(&got);
        assert!(l.is_empty(), "{action:?}: overlay internals leaked: {l:#?}");
        let d = tree_diff("lower", &got, "expected", &expected, LINKS);
        assert!(d.is_empty(), "{action:?}: lower differs:\n{d}");
    }
}

// =============================================================================================
// Safety: nothing outside the lower tree is ever written, deleted or chmod-ed

/// `elsewhere` (outside the lower) with content the lower's symlinks point at.
fn make_elsewhere(t: &Path) -> PathBuf {
    let e = t.join("elsewhere");
    fs::create_dir_all(e.join("dir/sub")).unwrap();
    fs::write(e.join("file"), "outside file\n").unwrap();
    fs::write(e.join("dir/inner"), "outside inner\n").unwrap();
    fs::write(e.join("dir/sub/deep"), "outside deep\n").unwrap();
    fs::create_dir(e.join("dir2")).unwrap();
    fs::write(e.join("dir2/keep"), "keep\n").unwrap();
    fs::write(e.join("linked"), "shared inode\n").unwrap();
    lsetxattr(&e.join("linked"), "user.out", b"o", 0).unwrap();
    chmod(&e.join("dir"), 0o755);
    chmod(&e.join("file"), 0o644);
    for p in snap(&e).keys() {
        set_times(&e.join(p), Some(OLD), Some(OLD)).unwrap();
    }
    e
}

fn safety_lower(l: &Path, t: &Path) {
    let e = make_elsewhere(t);
    // Symlinks out of the lower, absolute and relative.
    symlink(&e, &l.join("link"));
    symlink(e.join("file"), &l.join("lfile"));
    symlink("../elsewhere/dir", &l.join("rel"));
    symlink(e.join("dir2"), &l.join("wh"));
    symlink(e.join("dir"), &l.join("keep_link"));
    fs::create_dir(l.join("realdir")).unwrap();
    fs::write(l.join("realdir/f"), "real\n").unwrap();
    fs::create_dir(l.join("opq")).unwrap();
    symlink(&e, &l.join("opq/esc"));
    fs::write(l.join("opq/f"), "f\n").unwrap();
    // A lower file that shares its inode with a file outside the lower.
    fs::hard_link(e.join("linked"), l.join("hl_out")).unwrap();
    set_times(&e.join("linked"), Some(OLD), Some(OLD)).unwrap();
}

const SAFETY_SCRIPT: &str = r#"
rm link && mkdir link && echo inside > link/f && mkdir link/sub && echo g > link/sub/g
chmod 700 link
rm lfile && mkdir lfile && echo in > lfile/x
rm rel && echo plain > rel
rm wh
rm -r realdir && ln -s ../elsewhere/dir realdir
rm -r opq && mkdir opq && echo new > opq/new
ln -s ../elsewhere up
echo appended >> hl_out
chmod 600 hl_out
"#;

fn safety_case(action: OverlayAction) {
    let mut fx = Fx::new(safety_lower);
    let outside = fx.t("elsewhere");
    let before = snap(&outside);
    let copy = fx.t("copy");
    cp_a(&fx.lower, &copy);
    // (`cp -a` copies hl_out as a file of its own: the outside link is not in the copy.)
    sh_in(&copy, SAFETY_SCRIPT);
    let mid = snap(&outside);
    assert!(
        same_tree(&before, &mid, UNTOUCHED),
        "test bug: the plain run changed the outside"
    );
    fx.sh(SAFETY_SCRIPT);
    let r = fx.finish(action);
    let after = snap(&outside);
    let d = tree_diff("after", &after, "before", &before, UNTOUCHED);
    assert!(
        d.is_empty(),
        "{action:?}: commit changed files OUTSIDE the lower:\n{d}"
    );
    r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
    let got = snap(&fx.lower);
    let expected = snap(&copy);
    let d = tree_diff("lower", &got, "expected", &expected, LINKS);
    assert!(d.is_empty(), "{action:?}: lower differs:\n{d}");
    assert_eq!(
        got["link"].kind, 'd',
        "{action:?}: link must be a real directory"
    );
    assert_eq!(got["link"].mode, 0o700);
    assert_eq!(got["lfile"].kind, 'd');
    // The test directory holds nothing new beside the layers.
    let mut top = names(fx.dir.path());
    top.retain(|n| !["lower", "mnt", "copy", "elsewhere"].contains(&n.as_str()));
    assert!(top.is_empty(), "{action:?}: left in the test dir: {top:?}");
}

#[test]
fn commit_never_follows_symlinks_out_of_the_lower() {
    need_root!();
    safety_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_never_follows_symlinks_out_of_the_lower() {
    need_root!();
    safety_case(OverlayAction::CommitAtomic);
}

// ---------------------------------------------------------------------------------------------
// Temporary names never clash with the user's entries

const USER_BESIDE: &[&str] = &[
    "lower.backup",
    "lower.new",
    ".lower.new",
    "lower.old",
    ".lower.old",
    "lower.tmp",
    ".lower.ovl-new",
    ".lower.ovl-new-0000000000000000",
    "lower_upper",
];
const USER_INSIDE: &[&str] = &[
    ".ovl-commit",
    ".ovl-commit-0000000000000000",
    ".ovl-staging-",
    "ovl-commit.journal",
    "t1",
    ".new",
    ".backup",
];

#[test]
fn temporary_names_never_clash_with_user_entries() {
    need_root!();
    for action in MODES {
        let (fx, r, expected) = scenario(
            |l, t| {
                for n in USER_BESIDE {
                    fs::create_dir(t.join(n)).unwrap();
                    fs::write(t.join(n).join("data"), format!("user {n}\n")).unwrap();
                }
                for n in USER_INSIDE {
                    fs::create_dir(l.join(n)).unwrap();
                    fs::write(l.join(n).join("data"), format!("user {n}\n")).unwrap();
                }
                fs::create_dir(l.join("sub")).unwrap();
                fs::write(l.join("sub/t1"), "t1\n").unwrap();
            },
            "echo 2 > t2\necho changed > sub/t1\necho x > .ovl-commit/data\n\
             mkdir .ovl-commit-new && echo y > .ovl-commit-new/f\nrm -r .new\n",
            action,
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_tree(&format!("{action:?}"), &fx.lower, &expected, EXACT);
        for n in USER_BESIDE {
            assert_eq!(
                fs::read_to_string(fx.t(n).join("data")).ok(),
                Some(format!("user {n}\n")),
                "{action:?}: user directory {n} beside the lower"
            );
        }
        let mut top = names(fx.dir.path());
        top.retain(|n| {
            !["lower", "mnt", "copy"].contains(&n.as_str()) && !USER_BESIDE.contains(&n.as_str())
        });
        assert!(
            top.is_empty(),
            "{action:?}: temporaries left beside the lower: {top:?}"
        );
    }
}

/// Journal and temporary paths are derived from the lower's path; a lower whose name holds a
/// newline (legal on Linux) must not make recovery delete a sibling directory.
#[test]
fn recovery_never_deletes_outside_the_lower_whatever_its_name() {
    need_root!();
    let mut pr = Problems::default();
    for (action, crash) in [(OverlayAction::Commit, 1), (OverlayAction::CommitAtomic, 1)] {
        let t = tempfile::tempdir().unwrap();
        let lower = t.path().join("data\nx");
        fs::create_dir(&lower).unwrap();
        fs::write(lower.join("f"), "f\n").unwrap();
        for sib in ["data", ".data"] {
            fs::create_dir(t.path().join(sib)).unwrap();
            fs::write(t.path().join(sib).join("precious"), "precious\n").unwrap();
        }
        let before = snap(t.path());
        let out = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--on-exit"),
                os(on_exit(action)),
                os("--"),
                os("sh"),
                os("-c"),
                os("echo new > \"$OVL_MOUNTPOINT/g\""),
            ],
            Some(crash),
        );
        assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{out:?}");
        let rec = ovl_run(
            t.path(),
            &[os("--lower"), lower.as_os_str(), os("--"), os("true")],
            None,
        );
        let commit = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--on-exit"),
                os(on_exit(action)),
                os("--"),
                os("true"),
            ],
            None,
        );
        for sib in ["data", ".data"] {
            let p = t.path().join(sib);
            pr.check(
                before.contains_key(&format!("{sib}/precious")) && exists(&p.join("precious")),
                || {
                    format!(
                        "{action:?}: recovery deleted the sibling directory {sib:?} of lower \"data\\nx\" \
                         (recovery: {}; commit: {})",
                        stderr(&rec).trim(),
                        stderr(&commit).trim()
                    )
                },
            );
        }
        pr.check(
            fs::read_to_string(lower.join("g")).ok().as_deref() == Some("new\n"),
            || {
                format!(
                    "{action:?}: commit after recovery did not land: {}",
                    stderr(&commit)
                )
            },
        );
    }
    pr.assert_none("lower named \"data\\nx\"");
}

// =============================================================================================
// Failures: report what failed, exit non-zero, keep the upper

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn new(at: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(at).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("tmpfs")
            .arg(at));
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        run(Command::new("mount")
            .args(["-o"])
            .arg(format!("remount,size={size}"))
            .arg(&self.0));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = output(Command::new("umount").arg("-l").arg(&self.0));
    }
}

fn disk_full_case(action: OverlayAction) {
    let t = tempfile::tempdir().unwrap();
    let fsroot = t.path().join("small");
    let tmpfs = Tmpfs::new(&fsroot, "1m");
    let lower = fsroot.join("lower");
    fs::create_dir(&lower).unwrap();
    fs::write(lower.join("a"), "a\n").unwrap();
    fs::write(lower.join("b"), "b\n").unwrap();
    let (upper, work, mnt) = (
        t.path().join("up"),
        t.path().join("wk"),
        t.path().join("mnt"),
    );
    let old = snap(&lower);
    let copy = t.path().join("copy");
    cp_a(&lower, &copy);
    let script = "head -c 3000000 /dev/zero > big\necho a2 > a\nrm b\n";
    sh_in(&copy, script);
    let expected = snap(&copy);
    let mut ofs = OverlayFS::new(&lower);
    ofs.set_upper(&upper)
        .set_workdir(&work)
        .set_mountpoint(&mnt);
    ofs.mount().unwrap();
    sh_in(&mnt, script);
    let upper_before = snap(&upper);
    let err = match unmounting(|| ofs.overlay_action(action)) {
        Ok(r) => panic!("{action:?}: commit into a full filesystem succeeded: {r:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("No space left on device") && err.contains("big"),
        "{action:?}: the error must say what failed (file big, ENOSPC): {err}"
    );
    // Checked last: the rest of the behaviour matters more than the wording.
    let names_lower_path = err.contains(&lower.join("big").display().to_string());
    // The upper is kept, whole.
    let d = tree_diff("upper", &snap(&upper), "before", &upper_before, LINKS);
    assert!(
        d.is_empty(),
        "{action:?}: upper changed by a failed commit:\n{d}"
    );
    // No temporaries left behind; the lower holds no torn file.
    let got = snap(&lower);
    if action == OverlayAction::CommitAtomic {
        let d = tree_diff("lower", &got, "old", &old, EXACT);
        assert!(
            d.is_empty(),
            "{action:?}: failed atomic commit changed the lower:\n{d}"
        );
    } else {
        for (p, e) in &got {
            let s = show(e, false);
            assert!(
                old.get(p).is_some_and(|o| show(o, false) == s)
                    || expected.get(p).is_some_and(|n| show(n, false) == s),
                "{action:?}: {p} is neither old nor new after a failed commit: {s}"
            );
        }
    }
    assert_eq!(names(&fsroot), vec!["lower".to_string()], "{action:?}");
    // With room again, committing the kept upper finishes the job.
    tmpfs.resize("16m");
    let mut ofs = OverlayFS::new(&lower);
    ofs.set_upper(&upper)
        .set_workdir(&work)
        .set_mountpoint(&mnt);
    ofs.mount().unwrap();
    unmounting(|| ofs.overlay_action(action)).unwrap_or_else(|e| panic!("{action:?}: retry: {e}"));
    assert_tree(&format!("{action:?} retry"), &lower, &expected, EXACT);
    assert!(!exists(&upper));
    assert!(
        names_lower_path,
        "{action:?}: the error must name the user's file {}, not a temporary: {err}",
        lower.join("big").display()
    );
    drop(tmpfs);
}

#[test]
fn commit_disk_full_reports_and_keeps_upper() {
    need_root!();
    disk_full_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_disk_full_reports_and_keeps_upper() {
    need_root!();
    disk_full_case(OverlayAction::CommitAtomic);
}

#[test]
fn ovl_run_failed_commit_exits_nonzero_and_keeps_upper() {
    need_root!();
    for action in MODES {
        let t = tempfile::tempdir().unwrap();
        let tmpfs = Tmpfs::new(&t.path().join("small"), "1m");
        let lower = t.path().join("small/L");
        fs::create_dir(&lower).unwrap();
        fs::write(lower.join("a"), "a\n").unwrap();
        let upper = t.path().join("U");
        let out = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--upper"),
                upper.as_os_str(),
                os("--on-exit"),
                os(on_exit(action)),
                os("--"),
                os("sh"),
                os("-c"),
                os("cd \"$OVL_MOUNTPOINT\" && head -c 3000000 /dev/zero > big && echo a2 > a"),
            ],
            None,
        );
        let err = stderr(&out);
        assert!(
            !out.status.success(),
            "{action:?}: exit status {:?}",
            out.status
        );
        assert_eq!(out.status.code(), Some(125), "{action:?}: {err}");
        assert!(
            err.contains("No space left on device") && err.contains("big"),
            "{action:?}: {err}"
        );
        assert_eq!(
            fs::metadata(upper.join("big")).map(|m| m.len()).ok(),
            Some(3_000_000),
            "{action:?}: upper must be kept"
        );
        tmpfs.resize("16m");
        let out = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--upper"),
                upper.as_os_str(),
                os("--on-exit"),
                os(on_exit(action)),
                os("--"),
                os("true"),
            ],
            None,
        );
        assert!(out.status.success(), "{action:?}: retry: {}", stderr(&out));
        assert_eq!(fs::metadata(lower.join("big")).unwrap().len(), 3_000_000);
        assert_eq!(fs::read_to_string(lower.join("a")).unwrap(), "a2\n");
        assert!(!exists(&upper));
    }
}

/// Clears the immutable flag of the given paths on drop (else the temp dir cannot go).
struct Immutable(Vec<PathBuf>);

impl Immutable {
    fn set(paths: &[PathBuf]) -> Immutable {
        for p in paths {
            run(Command::new("chattr").arg("+i").arg(p));
        }
        Immutable(paths.to_vec())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = output(Command::new("chattr").arg("-i").arg(p));
        }
    }
}

fn permission_case(action: OverlayAction) {
    let mut fx = Fx::new(|l, _| {
        fs::write(l.join("locked"), "old\n").unwrap();
        fs::write(l.join("other"), "other\n").unwrap();
    });
    let old = snap(&fx.lower);
    let script = "echo new > locked\necho o2 > other\necho n > added\n";
    let copy = fx.t("copy");
    cp_a(&fx.lower, &copy);
    sh_in(&copy, script);
    let expected = snap(&copy);
    fx.sh(script);
    let upper_before = snap(&fx.upper);
    let guard = Immutable::set(&[fx.l("locked")]);
    let err = match fx.finish(action) {
        Ok(r) => panic!("{action:?}: commit over an immutable file succeeded: {r:?}"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("locked") && err.contains("Operation not permitted"),
        "{action:?}: the error must say what failed: {err}"
    );
    let names_lower_path = err.contains(&fx.l("locked").display().to_string());
    let d = tree_diff("upper", &snap(&fx.upper), "before", &upper_before, LINKS);
    assert!(
        d.is_empty(),
        "{action:?}: upper changed by a failed commit:\n{d}"
    );
    let got = snap(&fx.lower);
    if action == OverlayAction::CommitAtomic {
        let d = tree_diff("lower", &got, "old", &old, EXACT);
        assert!(
            d.is_empty(),
            "{action:?}: failed atomic commit changed the lower:\n{d}"
        );
    }
    assert_eq!(fs::read_to_string(fx.l("locked")).unwrap(), "old\n");
    let mut top = names(fx.dir.path());
    top.retain(|n| !["lower", "upper", "work", "mnt", "copy"].contains(&n.as_str()));
    assert!(top.is_empty(), "{action:?}: temporaries left: {top:?}");
    // Once the file may change again, committing the kept upper finishes the job.
    drop(guard);
    fx.ofs.mount().unwrap();
    fx.finish(action)
        .unwrap_or_else(|e| panic!("{action:?}: retry: {e}"));
    assert_tree(&format!("{action:?} retry"), &fx.lower, &expected, EXACT);
    assert!(
        names_lower_path,
        "{action:?}: the error must name the user's file {}, not a temporary: {err}",
        fx.l("locked").display()
    );
}

#[test]
fn commit_permission_denied_reports_and_keeps_upper() {
    need_root!();
    permission_case(OverlayAction::Commit);
}

#[test]
fn commit_atomic_permission_denied_reports_and_keeps_upper() {
    need_root!();
    permission_case(OverlayAction::CommitAtomic);
}

/// The lower changed under the overlay: a file the overlay rewrote became a directory that
/// cannot be removed. In place, the commit must fail naming it and keep the upper.
#[test]
fn commit_fails_cleanly_when_a_file_turned_into_a_directory() {
    need_root!();
    let mut fx = Fx::new(|l, _| {
        fs::write(l.join("turned"), "file\n").unwrap();
        fs::write(l.join("x"), "x\n").unwrap();
    });
    fx.sh("echo rewritten > turned\necho x2 > x\n");
    unmounting(|| fx.ofs.umount()).unwrap();
    let upper_before = snap(&fx.upper);
    fs::remove_file(fx.l("turned")).unwrap();
    fs::create_dir(fx.l("turned")).unwrap();
    fs::write(fx.l("turned/user-data"), "precious\n").unwrap();
    let _guard = Immutable::set(&[fx.l("turned")]);
    let err = match fx.finish(OverlayAction::Commit) {
        Ok(r) => panic!("commit replaced an immutable directory: {r:?}"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("turned"), "error must name the entry: {err}");
    let d = tree_diff("upper", &snap(&fx.upper), "before", &upper_before, LINKS);
    assert!(d.is_empty(), "upper changed by a failed commit:\n{d}");
    assert_eq!(
        fs::read_to_string(fx.l("turned/user-data")).unwrap(),
        "precious\n"
    );
}

// =============================================================================================
// The overlay is unmounted while committing

#[test]
fn commit_runs_unmounted_and_refuses_a_busy_mount() {
    need_root!();
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    for action in MODES {
        let mut fx = Fx::new(|l, _| fs::write(l.join("f"), "old\n").unwrap());
        fs::write(fx.p("f"), "new\n").unwrap();
        // A file held open in the mount, released after 2 s (so a commit that waits for the
        // mount to go idle cannot hang the test).
        let busy = fs::File::open(fx.p("f")).unwrap();
        let released = Arc::new(AtomicBool::new(false));
        let rel = released.clone();
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(2));
            drop(busy);
            rel.store(true, Ordering::SeqCst);
        });
        let r = fx.finish(action);
        let was_released = released.load(Ordering::SeqCst);
        let mounted = is_mounted(&fx.mnt);
        match &r {
            Ok(rep) => {
                assert!(
                    was_released,
                    "{action:?}: committed while a file in the mount was open: {rep:?}"
                );
            }
            Err(e) => {
                // Refused: nothing may have happened.
                assert_eq!(fs::read_to_string(fx.l("f")).unwrap(), "old\n", "{e}");
                assert_eq!(fs::read_to_string(fx.upper.join("f")).unwrap(), "new\n");
            }
        }
        holder.join().unwrap();
        let r = if r.is_err() {
            assert!(mounted, "{action:?}: refused, yet the mount is gone");
            // Once nothing holds the mount, the same call unmounts and commits. A process
            // forked by another test thread while the file was open may hold a copy of its
            // descriptor for a moment: retry briefly while the mount is still busy.
            let mut r = fx.finish(action);
            for _ in 0..40 {
                match &r {
                    Err(e) if e.to_string().contains("busy") => {
                        std::thread::sleep(Duration::from_millis(250));
                        r = fx.finish(action);
                    }
                    _ => break,
                }
            }
            r
        } else {
            r
        };
        let still = is_mounted(&fx.mnt);
        if still {
            let _ = output(Command::new("umount").arg("-l").arg(&fx.mnt));
        }
        assert!(
            !still,
            "{action:?}: the overlay is still mounted after the commit returned {r:?}"
        );
        r.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_eq!(fs::read_to_string(fx.l("f")).unwrap(), "new\n");
        assert_finalized(&fx, &format!("{action:?}"));
    }
}

// =============================================================================================
// Crashes: OVL_COMMIT_CRASH_AFTER=N for every N

const CRASH_SCRIPT: &str = r#"set -e
cd "$OVL_MOUNTPOINT"
echo new-a > a
printf more >> b
chmod 4755 b
rm c
chmod 644 same
mkdir -p n/m
echo deep > n/m/f
mv d1 d1moved
mv d2/sub subm
mkdir q
mv d1moved/d q/dd
rm -r d2
mkdir d2
echo fresh > d2/g
ln -s a sl2
rm s1
mkdir s1
echo inside > s1/f
rm s2
echo notalink > s2
ln a hl
mkfifo p2
mknod cdev c 1 3
setfattr -n user.k -v v2 xa
mkdir -m 1777 sticky
mv d3/e e2
yes 0123456789abcdef | head -c 200000 > d3/big
"#;

fn crash_lower(l: &Path) {
    let t = l.parent().unwrap();
    make_elsewhere(t);
    fs::write(l.join("a"), "alpha\n").unwrap();
    fs::write(l.join("b"), "bravo").unwrap();
    chmod(&l.join("b"), 0o600);
    fs::write(l.join("c"), "charlie\n").unwrap();
    fs::write(l.join("same"), "same\n").unwrap();
    chmod(&l.join("same"), 0o644);
    fs::write(l.join("keep"), "keep\n").unwrap();
    fs::create_dir_all(l.join("d1/d")).unwrap();
    fs::write(l.join("d1/x"), "x\n").unwrap();
    fs::write(l.join("d1/y"), "y\n").unwrap();
    fs::create_dir_all(l.join("d2/sub")).unwrap();
    fs::write(l.join("d2/sub/z"), "z\n").unwrap();
    fs::write(l.join("d2/w"), "w\n").unwrap();
    fs::create_dir(l.join("d3")).unwrap();
    chmod(&l.join("d3"), 0o750);
    fs::write(l.join("d3/e"), "").unwrap();
    fs::write(l.join("h1"), "linked\n").unwrap();
    fs::hard_link(l.join("h1"), l.join("d3/h2")).unwrap();
    symlink("../elsewhere", &l.join("s1"));
    symlink("../elsewhere/file", &l.join("s2"));
    mknod(&l.join("fifo0"), libc::S_IFIFO | 0o644, 0).unwrap();
    fs::write(l.join("xa"), "xa\n").unwrap();
    lsetxattr(&l.join("xa"), "user.k", b"v1", 0).unwrap();
}

/// A fresh test dir: `L` (the lower), `elsewhere`, `cache`.
fn crash_fixture() -> (TempDir, PathBuf) {
    let t = tempfile::Builder::new()
        .prefix("ovl-crash")
        .tempdir()
        .unwrap();
    let lower = t.path().join("L");
    fs::create_dir(&lower).unwrap();
    fs::create_dir(t.path().join("cache")).unwrap();
    crash_lower(&lower);
    (t, lower)
}

fn run_changes(t: &Path, lower: &Path, action: OverlayAction, crash: Option<u64>) -> Output {
    ovl_run(
        t,
        &[
            os("--lower"),
            lower.as_os_str(),
            os("--on-exit"),
            os(on_exit(action)),
            os("--"),
            os("sh"),
            os("-c"),
            os(CRASH_SCRIPT),
        ],
        crash,
    )
}

/// Entries of the test dir besides the expected ones (temporaries beside the lower).
fn strays(t: &Path) -> Vec<String> {
    names(t)
        .into_iter()
        .filter(|n| {
            ![
                "L",
                "L_upper",
                ".L_upper.ovl-work",
                "elsewhere",
                "cache",
                "mnt",
            ]
            .contains(&n.as_str())
        })
        .collect()
}

/// Recovery as the next run does it: ovl-run, or the library (mount + unmount).
fn recover(t: &Path, lower: &Path, library: bool) {
    if library {
        let mut ofs = OverlayFS::new(lower);
        ofs.set_upper(t.join("L_upper"))
            .set_mountpoint(t.join("mnt"));
        ofs.mount()
            .unwrap_or_else(|e| panic!("library recovery (mount): {e}"));
        unmounting(|| ofs.umount()).unwrap();
    } else {
        let out = ovl_run(
            t,
            &[os("--lower"), lower.as_os_str(), os("--"), os("true")],
            None,
        );
        assert!(
            out.status.success(),
            "recovery run failed: {}",
            stderr(&out)
        );
    }
}

fn entries_of(s: &Snap) -> usize {
    s.len().saturating_sub(1)
}

/// Per file: old or new, never anything else (directories: exist where old or new has one).
fn per_file_problems(old: &Snap, new: &Snap, cur: &Snap) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).chain(cur.keys()).collect();
    for k in keys {
        if k.starts_with(".ovl-commit-") {
            continue; // the staging directory, removed by recovery (checked after it)
        }
        let (o, n, c) = (old.get(k), new.get(k), cur.get(k));
        let ok = match c {
            Some(c) if c.kind == 'd' => {
                o.is_some_and(|o| o.kind == 'd') || n.is_some_and(|n| n.kind == 'd')
            }
            Some(c) => {
                let s = show(c, false);
                o.is_some_and(|o| show(o, false) == s) || n.is_some_and(|n| show(n, false) == s)
            }
            None => o.is_none() || n.is_none(),
        };
        if !ok {
            out.push(format!(
                "{k}: {} (old {}, new {})",
                c.map_or("absent".into(), |c| show(c, false)),
                o.map_or("absent".into(), |c| show(c, false)),
                n.map_or("absent".into(), |c| show(c, false)),
            ));
        }
    }
    out
}

/// The trees every crash is checked against.
struct CrashRef {
    action: OverlayAction,
    /// The lower before the commit.
    old: Snap,
    /// The lower after a clean commit (checked equal to a plain copy with the same changes).
    new: Snap,
    /// The upper the changes make (what must survive until the new lower is durable).
    upper: Snap,
    /// `elsewhere`, outside the lower.
    outside: Snap,
}

impl CrashRef {
    fn new(action: OverlayAction) -> CrashRef {
        let (t0, l0) = crash_fixture();
        let old = snap(&l0);
        let outside = snap(&t0.path().join("elsewhere"));
        let copy = t0.path().join("copy");
        cp_a(&l0, &copy);
        sh_in(&copy, CRASH_SCRIPT);
        let plain = snap(&copy);
        let out = ovl_run(
            t0.path(),
            &[
                os("--lower"),
                l0.as_os_str(),
                os("--"),
                os("sh"),
                os("-c"),
                os(CRASH_SCRIPT),
            ],
            None,
        );
        assert!(out.status.success(), "preserve run: {}", stderr(&out));
        let upper = snap(&t0.path().join("L_upper"));
        let (t1, l1) = crash_fixture();
        let out = run_changes(t1.path(), &l1, action, None);
        assert!(out.status.success(), "clean commit run: {}", stderr(&out));
        let new = snap(&l1);
        let d = tree_diff("clean commit", &new, "plain copy", &plain, LINKS);
        assert!(
            d.is_empty(),
            "{action:?}: clean commit differs from the plain copy:\n{d}"
        );
        CrashRef {
            action,
            old,
            new,
            upper,
            outside,
        }
    }
}

#[derive(Default)]
struct CrashTally {
    points: u64,
    old: u64,
    new: u64,
    partial: u64,
    /// Recovery finished the commit (it had begun moving directories).
    finished: u64,
    problems: Vec<String>,
}

impl CrashTally {
    fn finish(self, what: &str) {
        eprintln!(
            "{what}: {} crash points (lower afterwards: {} old, {} new, {} in between; \
             {} finished by recovery)",
            self.points, self.old, self.new, self.partial, self.finished
        );
        assert!(
            self.problems.is_empty(),
            "{what}: crash recovery problems:\n{}",
            self.problems.join("\n")
        );
    }
}

/// After a crash in `tp` (lower `L`): the lower is old or new (atomic: as a whole; in place:
/// file by file), nothing outside changed, the upper is intact unless the lower is new; then
/// recovery (the next run: ovl-run, or the library when `library`) must leave no temporaries
/// and change nothing, and committing again must give exactly the new tree.
fn check_crash(
    r: &CrashRef,
    tp: &Path,
    lower: &Path,
    label: &str,
    library: bool,
    tally: &mut CrashTally,
) {
    let atomic = r.action == OverlayAction::CommitAtomic;
    let mut pr = Problems::default();
    let cur = snap(lower);
    let upper = tp.join("L_upper");
    let is_old = same_tree(&cur, &r.old, LINKS);
    let is_new = same_tree(&cur, &r.new, LINKS);
    tally.points += 1;
    if is_old {
        tally.old += 1;
    } else if is_new {
        tally.new += 1;
    } else {
        tally.partial += 1;
    }
    if atomic {
        pr.check(is_old || is_new, || {
            format!(
                "lower is neither old nor new after the crash:\n{}",
                tree_diff("lower", &cur, "old", &r.old, LINKS)
            )
        });
    } else {
        let pf = per_file_problems(&r.old, &r.new, &cur);
        pr.check(pf.is_empty(), || {
            format!(
                "files neither old nor new after the crash:\n    {}",
                pf.join("\n    ")
            )
        });
    }
    let upper_intact = |what: &str, pr: &mut Problems| {
        let u = exists(&upper).then(|| snap(&upper));
        pr.check(
            u.as_ref().is_some_and(|u| same_tree(u, &r.upper, LINKS)),
            || match &u {
                None => format!("{what}: the upper is gone but the lower is not the new tree"),
                Some(u) => format!(
                    "{what}: the upper changed although the lower is not the new tree:\n{}",
                    tree_diff("upper", u, "expected", &r.upper, LINKS)
                ),
            },
        );
    };
    if !is_new {
        upper_intact("after the crash", &mut pr);
    }
    pr.check(
        same_tree(&snap(&tp.join("elsewhere")), &r.outside, UNTOUCHED),
        || "the crash changed files outside the lower".into(),
    );
    for s in strays(tp) {
        pr.check(s.starts_with(".L.ovl-new-"), || {
            format!("unexpected entry {s:?} beside the lower")
        });
    }
    // Recovery, as the next run does it.
    recover(tp, lower, library);
    let how = if library { "library" } else { "ovl-run" };
    let rec = snap(lower);
    let staging: Vec<&String> = rec
        .keys()
        .filter(|k| k.starts_with(".ovl-commit-"))
        .collect();
    pr.check(staging.is_empty(), || {
        format!("{how} recovery left {staging:?} in the lower")
    });
    let clean = |s: &Snap| -> Snap {
        s.iter()
            .filter(|(k, _)| !k.starts_with(".ovl-commit-"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let (rec_clean, cur_clean) = (clean(&rec), clean(&cur));
    // An in-place commit that had begun moving renamed directories is finished instead
    // (the upper's redirects no longer match the lower): then exactly the new tree, and the
    // upper gone. Anything else must be left as the crash left it.
    let upper_gone = !exists(&upper) || entries_of(&snap(&upper)) == 0;
    let finished = !atomic && !is_new && upper_gone && same_tree(&rec_clean, &r.new, LINKS);
    if finished {
        tally.finished += 1;
    }
    pr.check(finished || same_tree(&rec_clean, &cur_clean, LINKS), || {
        format!(
            "{how} recovery changed the lower:\n{}",
            tree_diff("after", &rec_clean, "before", &cur_clean, LINKS)
        )
    });
    pr.check(strays(tp).is_empty(), || {
        format!("{how} recovery left {:?} beside the lower", strays(tp))
    });
    pr.check(
        !exists(&tp.join(".L_upper.ovl-work/ovl-commit.journal")),
        || format!("{how} recovery left the journal"),
    );
    if atomic && is_new {
        let u = exists(&upper).then(|| snap(&upper));
        pr.check(u.as_ref().is_none_or(|u| entries_of(u) == 0), || {
            format!("{how} recovery kept the upper of a commit that had landed")
        });
    }
    if !is_new && !finished {
        upper_intact(&format!("after {how} recovery"), &mut pr);
    }
    // Commit again (the upper is empty if the commit had landed): exactly the new tree.
    let out = ovl_run(
        tp,
        &[
            os("--lower"),
            lower.as_os_str(),
            os("--on-exit"),
            os(on_exit(r.action)),
            os("--"),
            os("true"),
        ],
        None,
    );
    pr.check(out.status.success(), || {
        format!("commit after recovery failed: {}", stderr(&out))
    });
    let fin = snap(lower);
    pr.check(same_tree(&fin, &r.new, LINKS), || {
        format!(
            "after recovery and a new commit the lower is not the new tree:\n{}",
            tree_diff("lower", &fin, "new", &r.new, LINKS)
        )
    });
    pr.check(
        same_tree(&snap(&tp.join("elsewhere")), &r.outside, UNTOUCHED),
        || "recovery or the second commit changed files outside the lower".into(),
    );
    pr.check(strays(tp).is_empty(), || {
        format!("left beside the lower: {:?}", strays(tp))
    });
    if !pr.0.is_empty() {
        let state = if is_old {
            "old"
        } else if is_new {
            "new"
        } else {
            "in between"
        };
        tally.problems.push(format!(
            "{label} (lower {state} after the crash, {how} recovery):\n  - {}",
            pr.0.join("\n  - ")
        ));
    }
}

fn crash_test(action: OverlayAction) {
    let r = CrashRef::new(action);
    let mut tally = CrashTally::default();
    let mut n = 1;
    loop {
        assert!(n < 500, "{action:?}: still crashing after {n} steps");
        let (t, lower) = crash_fixture();
        let out = run_changes(t.path(), &lower, action, Some(n));
        if out.status.success() {
            let d = tree_diff("lower", &snap(&lower), "new", &r.new, LINKS);
            assert!(
                d.is_empty(),
                "{action:?}: uncrashed run N={n} differs:\n{d}"
            );
            break;
        }
        let aborted = out.status.signal() == Some(libc::SIGABRT) || out.status.code() == Some(134);
        assert!(
            aborted,
            "{action:?} N={n}: not a crash: {:?} {}",
            out.status,
            stderr(&out)
        );
        check_crash(
            &r,
            t.path(),
            &lower,
            &format!("N={n}"),
            n % 2 == 0,
            &mut tally,
        );
        n += 1;
    }
    let (pts, old, new) = (tally.points, tally.old, tally.new);
    tally.finish(&format!("{action:?} (OVL_COMMIT_CRASH_AFTER)"));
    assert!(
        pts > 3,
        "{action:?}: the crash hook fired at only {pts} points"
    );
    if action == OverlayAction::CommitAtomic {
        assert!(old > 0 && new > 0, "{action:?}: old {old}, new {new}");
    }
}

#[test]
fn commit_atomic_survives_a_crash_at_every_step() {
    need_root!();
    crash_test(OverlayAction::CommitAtomic);
}

#[test]
fn commit_in_place_survives_a_crash_at_every_step() {
    need_root!();
    crash_test(OverlayAction::Commit);
}

// ---------------------------------------------------------------------------------------------
// kill -9 at any instant: SIGKILL injected with strace at syscalls of the commit

fn have_strace() -> bool {
    let _g = FORK.read().unwrap_or_else(|e| e.into_inner());
    Command::new("strace")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

macro_rules! need_strace {
    () => {
        if !have_strace() {
            eprintln!("skipping: needs strace (apt-get install strace) to inject SIGKILL");
            return;
        }
    };
}

/// A crash fixture whose upper already holds the changes (a preserve run): committing it is
/// `ovl-run --lower L --on-exit ACTION -- true`, the same syscalls every time.
fn preserved_fixture() -> (TempDir, PathBuf) {
    let (t, lower) = crash_fixture();
    let out = ovl_run(
        t.path(),
        &[
            os("--lower"),
            lower.as_os_str(),
            os("--"),
            os("sh"),
            os("-c"),
            os(CRASH_SCRIPT),
        ],
        None,
    );
    assert!(out.status.success(), "preserve run: {}", stderr(&out));
    (t, lower)
}

fn commit_true(lower: &Path, action: OverlayAction) -> [&OsStr; 6] {
    [
        os("--lower"),
        lower.as_os_str(),
        os("--on-exit"),
        os(on_exit(action)),
        os("--"),
        os("true"),
    ]
}

/// One syscall of ovl-run's main thread: name, its occurrence number (per name, from the
/// start, as strace's `when=` counts), and the traced line.
struct Sys {
    name: String,
    nth: u64,
    line: String,
}

/// The syscalls from the commit's first journal write on, from a `strace -y` log of the main
/// thread only (no -f: the FUSE threads and the command are not counted).
fn commit_syscalls(log: &str) -> Vec<Sys> {
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut started = false;
    let mut out = Vec::new();
    for line in log.lines() {
        let Some(i) = line.find('(') else { continue };
        let name = &line[..i];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            continue;
        }
        let c = counts.entry(name.to_string()).or_default();
        *c += 1;
        started |= line.contains("ovl-commit.journal.tmp");
        if started {
            out.push(Sys {
                name: name.to_string(),
                nth: *c,
                line: line.to_string(),
            });
        }
    }
    out
}

/// Kill points: evenly spread over the commit, plus every directory removal in the upper
/// (an opaque directory emptied but still there is the dangerous state), plus the swap.
fn kill_points(sys: &[Sys], spread: usize) -> Vec<&Sys> {
    let mut idx: BTreeSet<usize> = (0..spread).map(|i| i * sys.len() / spread).collect();
    for (i, s) in sys.iter().enumerate() {
        let upper_rmdir =
            s.name == "unlinkat" && s.line.contains("/L_upper") && s.line.contains("AT_REMOVEDIR");
        let swap = s.name == "renameat2" && s.line.contains("RENAME_EXCHANGE");
        if upper_rmdir || swap {
            idx.insert(i);
        }
    }
    idx.into_iter().map(|i| &sys[i]).collect()
}

fn kill_sweep(action: OverlayAction) {
    let r = CrashRef::new(action);
    // Dry run: which syscalls does the commit make?
    let (t, lower) = preserved_fixture();
    let log = t.path().join("strace.log");
    let out = ovl_run_under(
        &[os("strace"), os("-qq"), os("-y"), os("-o"), log.as_os_str()],
        t.path(),
        &commit_true(&lower, action),
        None,
    );
    assert!(
        out.status.success(),
        "{action:?} traced commit: {}",
        stderr(&out)
    );
    let d = tree_diff("lower", &snap(&lower), "new", &r.new, LINKS);
    assert!(
        d.is_empty(),
        "{action:?}: committing the preserved upper differs:\n{d}"
    );
    let text = fs::read_to_string(&log).unwrap();
    let sys = commit_syscalls(&text);
    assert!(
        sys.len() > 20,
        "{action:?}: no commit found in the strace log:\n{text}"
    );
    drop(t);
    let points = kill_points(&sys, 24);
    let mut tally = CrashTally::default();
    for (i, s) in points.iter().enumerate() {
        let (t, lower) = preserved_fixture();
        let (trace, inject) = (
            format!("trace={}", s.name),
            format!("inject={}:signal=SIGKILL:when={}", s.name, s.nth),
        );
        let out = ovl_run_under(
            &[
                os("strace"),
                os("-qq"),
                os("-o"),
                os("/dev/null"),
                os("-e"),
                os(&trace),
                os("-e"),
                os(&inject),
            ],
            t.path(),
            &commit_true(&lower, action),
            None,
        );
        let label = format!("SIGKILL at {} #{}: {}", s.name, s.nth, s.line);
        let killed = out.status.signal() == Some(libc::SIGKILL) || out.status.code() == Some(137);
        if !killed {
            assert!(
                out.status.success(),
                "{label}: {:?} {}",
                out.status,
                stderr(&out)
            );
        }
        check_crash(&r, t.path(), &lower, &label, i % 2 == 1, &mut tally);
    }
    tally.finish(&format!("{action:?} (SIGKILL at syscalls)"));
}

#[test]
fn commit_atomic_survives_sigkill_at_any_syscall() {
    need_root!();
    need_strace!();
    kill_sweep(OverlayAction::CommitAtomic);
}

#[test]
fn commit_in_place_survives_sigkill_at_any_syscall() {
    need_root!();
    need_strace!();
    kill_sweep(OverlayAction::Commit);
}

/// The smallest case of the in-place window after the merge: the lower is new, the upper is
/// being removed. Killed with an opaque directory half emptied, the next run must not take
/// the remains for the user's changes.
#[test]
fn sigkill_while_removing_the_upper_loses_nothing() {
    need_root!();
    need_strace!();
    let mut pr = Problems::default();
    for action in MODES {
        let fixture = || {
            let t = tempfile::tempdir().unwrap();
            let lower = t.path().join("L");
            fs::create_dir_all(lower.join("o")).unwrap();
            fs::create_dir(t.path().join("cache")).unwrap();
            for i in 0..10 {
                fs::write(lower.join(format!("o/f{i}")), format!("v{i}\n")).unwrap();
            }
            fs::write(lower.join("a"), "a\n").unwrap();
            let script = "set -e; cd \"$OVL_MOUNTPOINT\"; rm -r o; mkdir o; \
                          for i in 0 1 2 3 4 5 6 7 8 9; do echo v$i > o/f$i; done; \
                          echo x > o/extra; echo b > a";
            let out = ovl_run(
                t.path(),
                &[
                    os("--lower"),
                    lower.as_os_str(),
                    os("--"),
                    os("sh"),
                    os("-c"),
                    os(script),
                ],
                None,
            );
            assert!(out.status.success(), "{}", stderr(&out));
            (t, lower)
        };
        let (t, lower) = fixture();
        let log = t.path().join("strace.log");
        let out = ovl_run_under(
            &[os("strace"), os("-qq"), os("-y"), os("-o"), log.as_os_str()],
            t.path(),
            &commit_true(&lower, action),
            None,
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let new = snap(&lower);
        assert_eq!(names(&lower.join("o")).len(), 11);
        let sys = commit_syscalls(&fs::read_to_string(&log).unwrap());
        // The third removal inside the upper's opaque directory.
        let Some(point) = sys
            .iter()
            .filter(|s| s.name == "unlinkat" && s.line.contains("/L_upper/o>"))
            .nth(2)
        else {
            eprintln!("{action:?}: the upper is not removed entry by entry: nothing to test");
            continue;
        };
        drop(t);
        let (t, lower) = fixture();
        let inject = format!("inject=unlinkat:signal=SIGKILL:when={}", point.nth);
        let out = ovl_run_under(
            &[
                os("strace"),
                os("-qq"),
                os("-o"),
                os("/dev/null"),
                os("-e"),
                os("trace=unlinkat"),
                os("-e"),
                os(&inject),
            ],
            t.path(),
            &commit_true(&lower, action),
            None,
        );
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{}", stderr(&out));
        let left = names(&t.path().join("L_upper/o")).len();
        assert!(
            (1..11).contains(&left),
            "{action:?}: not killed in the window ({left} entries left)"
        );
        assert!(
            same_tree(&snap(&lower), &new, LINKS),
            "{action:?}: the lower is not new yet: not the window under test"
        );
        // The next run: it recovers, shows the tree, and commits again.
        let view = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--"),
                os("sh"),
                os("-c"),
                os("ls \"$OVL_MOUNTPOINT/o\" | wc -l"),
            ],
            None,
        );
        let shown = String::from_utf8_lossy(&view.stdout).trim().to_string();
        pr.eq(
            &format!("{action:?}: entries of o the next mount shows"),
            shown.as_str(),
            "11",
        );
        let out = ovl_run(t.path(), &commit_true(&lower, action), None);
        pr.check(out.status.success(), || {
            format!("{action:?}: commit after recovery: {}", stderr(&out))
        });
        let fin = snap(&lower);
        let d = tree_diff("lower", &fin, "committed", &new, LINKS);
        pr.check(d.is_empty(), || {
            format!(
                "{action:?}: after a kill with {left} of 11 entries of the upper's opaque o left, \
                 recovery + commit changed the committed lower:\n{d}"
            )
        });
    }
    pr.assert_none("SIGKILL while the upper is removed");
}

// =============================================================================================
// Property test: random operations through the mount vs. the same on a plain copy

const PROP_SEEDS: u64 = 5;
const PROP_OPS: usize = 150;
const HISTORY: usize = 40;

const NAMES: &[&str] = &[
    "a", "b", "c", "d1", "d1/x", "d1/y", "d1/d", "d1/d/q", "d2", "d2/sub", "d2/sub/z", "d2/h2",
    "d3", "d3/e", "d4", "d4/f", "h1", "s1",
];
/// Symlink targets. None climbs out of the root: the operations themselves follow symlinks
/// (open, chmod, truncate), and must stay inside the tree on both sides.
const TARGETS: &[&str] = &["a", "d1/../a", "d1", "x", "nowhere", "sub/z", "h1"];
const XATTRS: &[&str] = &["user.k1", "user.k2", "user.lo"];
const PMODES: &[u32] = &[0o644, 0o600, 0o755, 0o700, 0o640, 0o4755, 0o2775, 0o1777];
const TIMES: &[(i64, i64)] = &[(1_000_000_000, 0), (1_111_111_111, 222_333_444)];

fn prop_lower(l: &Path, _t: &Path) {
    fs::write(l.join("a"), "alpha\n").unwrap();
    fs::write(l.join("b"), "bravo").unwrap();
    chmod(&l.join("b"), 0o600);
    fs::create_dir(l.join("d1")).unwrap();
    fs::write(l.join("d1/x"), "x-one").unwrap();
    fs::write(l.join("d1/y"), "y-one\n").unwrap();
    fs::create_dir(l.join("d1/d")).unwrap();
    fs::create_dir_all(l.join("d2/sub")).unwrap();
    fs::write(l.join("d2/sub/z"), "zeta").unwrap();
    fs::write(l.join("h1"), "hardlinked").unwrap();
    fs::hard_link(l.join("h1"), l.join("d2/h2")).unwrap();
    fs::create_dir(l.join("d3")).unwrap();
    chmod(&l.join("d3"), 0o750);
    fs::write(l.join("d3/e"), "").unwrap();
    symlink("a", &l.join("s1"));
    lsetxattr(&l.join("a"), "user.lo", b"lower", 0).unwrap();
    lsetxattr(&l.join("d1"), "user.k1", b"dir", 0).unwrap();
    let mut ps: Vec<String> = snap(l).into_keys().collect();
    ps.reverse(); // children before parents
    for p in ps {
        set_times(&l.join(p), Some(OLD), Some(OLD)).unwrap();
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        path: String,
        data: String,
        excl: bool,
    },
    Append {
        path: String,
        data: String,
    },
    Truncate {
        path: String,
        len: u64,
    },
    WriteAt {
        path: String,
        off: u64,
        data: String,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Link {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Rmdir {
        path: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Chown {
        path: String,
        uid: u32,
        gid: u32,
    },
    SetTimes {
        path: String,
        mtime: (i64, i64),
    },
    SetXattr {
        path: String,
        name: String,
        value: String,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    Read {
        path: String,
    },
    Stat {
        path: String,
    },
    ListDir {
        path: String,
    },
}

fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[rng.gen_range(0..from.len())]
}

fn data(rng: &mut StdRng) -> String {
    let n = rng.gen_range(0..24);
    (0..n)
        .map(|_| (b'a' + rng.gen_range(0..26u8)) as char)
        .collect()
}

fn gen_op(rng: &mut StdRng) -> Op {
    let p = |rng: &mut StdRng| pick(rng, NAMES).to_string();
    match rng.gen_range(0..100) {
        0..12 => Op::Create {
            path: p(rng),
            data: data(rng),
            excl: rng.gen_bool(0.3),
        },
        12..18 => Op::Append {
            path: p(rng),
            data: data(rng),
        },
        18..22 => Op::Truncate {
            path: p(rng),
            len: rng.gen_range(0..20),
        },
        22..27 => Op::WriteAt {
            path: p(rng),
            off: rng.gen_range(0..16),
            data: data(rng),
        },
        27..41 => Op::Rename {
            from: p(rng),
            to: p(rng),
            flags: match rng.gen_range(0..10) {
                0..7 => 0,
                7..9 => libc::RENAME_NOREPLACE,
                _ => libc::RENAME_EXCHANGE,
            },
        },
        41..46 => Op::Link {
            from: p(rng),
            to: p(rng),
        },
        46..54 => Op::Unlink { path: p(rng) },
        54..63 => Op::Mkdir {
            path: p(rng),
            mode: PMODES[rng.gen_range(0..PMODES.len())],
        },
        63..69 => Op::Rmdir { path: p(rng) },
        69..74 => Op::Symlink {
            target: pick(rng, TARGETS).to_string(),
            path: p(rng),
        },
        74..79 => Op::Chmod {
            path: p(rng),
            mode: PMODES[rng.gen_range(0..PMODES.len())],
        },
        79..82 => Op::Chown {
            path: p(rng),
            uid: [0, 1234][rng.gen_range(0..2)],
            gid: [0, 2345][rng.gen_range(0..2)],
        },
        82..85 => Op::SetTimes {
            path: p(rng),
            mtime: TIMES[rng.gen_range(0..TIMES.len())],
        },
        85..91 => Op::SetXattr {
            path: p(rng),
            name: pick(rng, XATTRS).to_string(),
            value: data(rng),
        },
        91..95 => Op::RemoveXattr {
            path: p(rng),
            name: pick(rng, XATTRS).to_string(),
        },
        95..97 => Op::Read { path: p(rng) },
        97..99 => Op::Stat { path: p(rng) },
        _ => Op::ListDir { path: p(rng) },
    }
}

/// Applies `op` under `root`; the errno on failure.
fn apply(root: &Path, op: &Op) -> Result<String, i32> {
    let j = |p: &str| root.join(p);
    let r: io::Result<String> = (|| {
        match op {
            Op::Create { path, data, excl } => {
                let mut o = fs::OpenOptions::new();
                o.write(true).mode(0o644);
                if *excl {
                    o.create_new(true);
                } else {
                    o.create(true).truncate(true);
                }
                o.open(j(path))?.write_all(data.as_bytes())?;
            }
            Op::Append { path, data } => {
                fs::OpenOptions::new()
                    .append(true)
                    .open(j(path))?
                    .write_all(data.as_bytes())?;
            }
            Op::Truncate { path, len } => {
                let cp = cpath(&j(path));
                check(unsafe { libc::truncate(cp.as_ptr(), *len as libc::off_t) })?;
            }
            Op::WriteAt { path, off, data } => {
                fs::OpenOptions::new()
                    .write(true)
                    .open(j(path))?
                    .write_all_at(data.as_bytes(), *off)?;
            }
            Op::Rename { from, to, flags } => renameat2(&j(from), &j(to), *flags)?,
            Op::Link { from, to } => fs::hard_link(j(from), j(to))?,
            Op::Unlink { path } => fs::remove_file(j(path))?,
            Op::Mkdir { path, mode } => fs::DirBuilder::new().mode(*mode).create(j(path))?,
            Op::Rmdir { path } => fs::remove_dir(j(path))?,
            Op::Symlink { target, path } => std::os::unix::fs::symlink(target, j(path))?,
            Op::Chmod { path, mode } => {
                fs::set_permissions(j(path), fs::Permissions::from_mode(*mode))?
            }
            Op::Chown { path, uid, gid } => lchown(&j(path), *uid, *gid)?,
            Op::SetTimes { path, mtime } => set_times(&j(path), None, Some(*mtime))?,
            Op::SetXattr { path, name, value } => lsetxattr(&j(path), name, value.as_bytes(), 0)?,
            Op::RemoveXattr { path, name } => lremovexattr(&j(path), name)?,
            Op::Read { path } => return Ok(fs::read(j(path))?.escape_ascii().to_string()),
            Op::Stat { path } => {
                let md = fs::symlink_metadata(j(path))?;
                return Ok(format!(
                    "{} {:o} size={}",
                    kind_char(md.file_type()),
                    md.mode() & 0o7777,
                    if md.is_dir() { 0 } else { md.len() }
                ));
            }
            Op::ListDir { path } => {
                let mut ns = fs::read_dir(j(path))?
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<io::Result<Vec<_>>>()?;
                ns.sort();
                return Ok(ns.join(","));
            }
        }
        Ok(String::new())
    })();
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

fn prop_seed(seed: u64, ops: usize, action: OverlayAction) -> Result<String, String> {
    let mut fx = Fx::new(prop_lower);
    let copy = fx.t("copy");
    cp_a(&fx.lower, &copy);
    let orig_lower = snap(&fx.lower);
    let orig_copy = snap(&copy);
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut history = Vec::new();
    let hist = |h: &[String]| h[h.len().saturating_sub(HISTORY)..].join("\n");
    for step in 1..=ops {
        let op = gen_op(&mut rng);
        let ro = apply(&fx.mnt, &op);
        let rc = apply(&copy, &op);
        history.push(format!("  {step:4}: {op:?} => {ro:?}"));
        if ro != rc {
            return Err(format!(
                "the mount and the plain copy diverged at step {step} (an overlay bug, not a \
                 commit bug): mount {ro:?}, copy {rc:?}\n{}",
                hist(&history)
            ));
        }
    }
    let view = snap(&fx.mnt);
    let expected = snap(&copy);
    let d = tree_diff("mount", &view, "copy", &expected, LINKS);
    if !d.is_empty() {
        return Err(format!(
            "before the commit the mount differs from the plain copy (an overlay bug, not a \
             commit bug):\n{d}\n{}",
            hist(&history)
        ));
    }
    let rep = fx
        .finish(action)
        .map_err(|e| format!("commit failed: {e}\n{}", hist(&history)))?;
    let got = snap(&fx.lower);
    let mut pr = Problems::default();
    let d = tree_diff("lower", &got, "copy", &expected, EXACT);
    pr.check(d.is_empty(), || {
        format!("committed lower differs from the plain copy:\n{d}")
    });
    pr.check(!exists(&fx.upper) && !exists(&fx.work), || {
        "upper or work dir left after a successful commit".into()
    });
    pr.check(names(fx.dir.path()) == ["copy", "lower", "mnt"], || {
        format!("left in the test dir: {:?}", names(fx.dir.path()))
    });
    let l = leaks(&got);
    pr.check(l.is_empty(), || format!("overlay internals leaked: {l:?}"));
    for (p, e) in &expected {
        let Some(g) = got.get(p) else { continue };
        if e.kind == 'd' || g.kind != e.kind {
            continue;
        }
        // mtimes the run did not set to "now" (kept from the lower or set explicitly).
        if e.mtime.0 < t0 {
            pr.check(g.mtime == e.mtime, || {
                format!("{p}: mtime {:?}, the plain copy has {:?}", g.mtime, e.mtime)
            });
        }
        // Files no operation touched (same inode, same ctime in the copy) stay the same inode.
        if let (Some(oc), Some(ol)) = (orig_copy.get(p), orig_lower.get(p)) {
            if oc.ino == e.ino && oc.ctime == e.ctime {
                pr.check(g.ino == ol.ino, || {
                    format!("{p}: untouched by every operation, yet rewritten (new inode)")
                });
            }
        }
    }
    if pr.0.is_empty() {
        Ok(format!(
            "{} entries; report: {} written, {} unchanged, {} deleted, {} replaced dirs",
            got.len(),
            rep.written,
            rep.deduplicated,
            rep.deleted,
            rep.dirs_replaced
        ))
    } else {
        Err(format!(
            "{}\nrecent operations:\n{}",
            pr.0.join("\n"),
            hist(&history)
        ))
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

fn prop_test(action: OverlayAction, base: u64) {
    let ops = env_u64("OVL_COMMIT_OPS").map_or(PROP_OPS, |n| n as usize);
    let seeds: Vec<u64> = match env_u64("OVL_COMMIT_SEED") {
        Some(s) => vec![s],
        None => (base..base + env_u64("OVL_COMMIT_SEEDS").unwrap_or(PROP_SEEDS)).collect(),
    };
    let mut failed = Vec::new();
    for seed in seeds {
        match prop_seed(seed, ops, action) {
            Ok(s) => eprintln!("{action:?} seed {seed}: ok ({s})"),
            Err(e) => {
                eprintln!("\n=== {action:?} seed {seed} FAILED ===\n{e}\n");
                failed.push(seed);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{action:?}: failing seeds {failed:?} (details above; reproduce with \
         OVL_COMMIT_SEED=<seed> cargo test --release --test commit {})",
        if action == OverlayAction::Commit {
            "property_commit_matches"
        } else {
            "property_commit_atomic_matches"
        }
    );
}

#[test]
fn property_commit_matches_plain_copy() {
    need_root!();
    prop_test(OverlayAction::Commit, 1);
}

#[test]
fn property_commit_atomic_matches_plain_copy() {
    need_root!();
    prop_test(OverlayAction::CommitAtomic, 101);
}

/// As a normal user (user.* xattrs, no passthrough): a renamed lower directory is stored as a
/// `user.overlay.redirect` (not copied), shows its content again in the next run, and commit
/// moves it in the lower (its files keep their inodes).
#[test]
fn non_root_directory_rename_is_a_redirect_and_commits_as_a_move() {
    need_root!();
    const USER: &str = "ovl-test";
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, USER]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id("-u").is_none() {
        let _ = Command::new("useradd")
            .args(["-M", "-s", "/bin/sh", USER])
            .status();
    }
    // tests/nonroot.rs and tests/ovl_run.rs may be creating the same user concurrently.
    let (uid, gid) = with_timeout(10, "creating the test user", move || {
        loop {
            if let (Some(u), Some(g)) = (id("-u"), id("-g")) {
                return (u, g);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let t = tempfile::Builder::new().prefix("ovl-nr").tempdir().unwrap();
    let r = t.path();
    chmod(r, 0o755);
    let (lower, upper) = (r.join("L"), r.join("L_upper"));
    fs::create_dir_all(lower.join("big/sub")).unwrap();
    for i in 0..50 {
        fs::write(lower.join(format!("big/f{i}")), format!("{i}\n")).unwrap();
    }
    fs::write(lower.join("big/sub/g"), "g\n").unwrap();
    fs::create_dir(r.join("cache")).unwrap();
    fs::copy(OVL_RUN, r.join("ovl-run")).unwrap();
    run(Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(r));
    let ino = ino_of(&lower.join("big/f7"));
    let user_run = |args: &[&str]| {
        output(
            Command::new("runuser")
                .current_dir(r)
                .args(["-u", USER, "--", "env"])
                .arg(format!("XDG_CACHE_HOME={}", r.join("cache").display()))
                .arg(r.join("ovl-run"))
                .args(["-q", "--lower"])
                .arg(&lower)
                .args(args),
        )
    };
    let o = user_run(&[
        "--",
        "sh",
        "-c",
        "mv \"$OVL_MOUNTPOINT/big\" \"$OVL_MOUNTPOINT/moved\"",
    ]);
    assert!(o.status.success(), "mv as the user: {}", stderr(&o));
    assert_eq!(
        lgetxattr(&upper.join("moved"), "user.overlay.redirect").unwrap(),
        b"big",
        "no redirect stored"
    );
    assert_eq!(
        names(&upper.join("moved")),
        Vec::<String>::new(),
        "the subtree was copied up"
    );
    let o = user_run(&[
        "--",
        "sh",
        "-c",
        "cat \"$OVL_MOUNTPOINT/moved/f7\" \"$OVL_MOUNTPOINT/moved/sub/g\"",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "7\ng\n",
        "{}",
        stderr(&o)
    );
    let o = user_run(&["--on-exit", "commit", "--", "true"]);
    assert!(o.status.success(), "commit as the user: {}", stderr(&o));
    assert!(!exists(&lower.join("big")));
    assert_eq!(
        fs::read_to_string(lower.join("moved/sub/g")).unwrap(),
        "g\n"
    );
    assert_eq!(names(&lower.join("moved")).len(), 51);
    assert_eq!(
        ino_of(&lower.join("moved/f7")),
        ino,
        "committed as a copy, not a move"
    );
}

/// An in-place commit interrupted after it moved directories is finished by the next commit
/// through the library (no mount in between), at every crash point: the lower is the new tree
/// and nothing is left behind.
#[test]
fn interrupted_directory_moves_are_finished_by_the_next_library_commit() {
    need_root!();
    let script = "cd \"$OVL_MOUNTPOINT\"; mv d1 d1moved; mv d2/sub subm; echo b > a";
    let setup = |l: &Path| {
        fs::create_dir_all(l.join("d1/d")).unwrap();
        fs::create_dir_all(l.join("d2/sub")).unwrap();
        fs::write(l.join("d1/x"), "x\n").unwrap();
        fs::write(l.join("d2/sub/z"), "z\n").unwrap();
        fs::write(l.join("a"), "a\n").unwrap();
    };
    let want = {
        let t = tempfile::tempdir().unwrap();
        let c = t.path().join("c");
        fs::create_dir(&c).unwrap();
        setup(&c);
        sh_in(&c, "mv d1 d1moved; mv d2/sub subm; echo b > a");
        snap(&c)
    };
    let mut finished = 0;
    for n in 1.. {
        let t = tempfile::Builder::new().prefix("ovl-mv").tempdir().unwrap();
        let lower = t.path().join("L");
        fs::create_dir(&lower).unwrap();
        setup(&lower);
        let o = ovl_run(
            t.path(),
            &[
                os("--lower"),
                lower.as_os_str(),
                os("--on-exit"),
                os("commit"),
                os("--"),
                os("sh"),
                os("-c"),
                os(script),
            ],
            Some(n),
        );
        if o.status.success() {
            break; // past the last step
        }
        let mut ofs = OverlayFS::new(&lower);
        ofs.set_upper(t.path().join("L_upper"));
        let r = ofs.overlay_action(OverlayAction::Commit);
        assert!(
            r.is_ok(),
            "N={n}: the next commit failed: {}",
            r.unwrap_err()
        );
        assert_tree(&format!("N={n}"), &lower, &want, EXACT);
        assert_eq!(
            names(t.path()),
            ["L", "cache"],
            "N={n}: left beside the lower"
        );
        finished += 1;
    }
    assert!(finished > 3, "too few crash points: {finished}");
}

/// Root never follows a `user.overlay.redirect` (a normal user's mount wrote it; see README),
/// and merging such a directory as it stands would lose its moved content: the commit refuses
/// with one line naming it, and nothing changes.
#[test]
fn root_refuses_to_commit_a_user_redirect() {
    need_root!();
    for action in MODES {
        let t = tempfile::Builder::new().prefix("ovl-ur").tempdir().unwrap();
        let (lower, upper) = (t.path().join("L"), t.path().join("U"));
        fs::create_dir_all(lower.join("d")).unwrap();
        fs::write(lower.join("d/f"), "f\n").unwrap();
        fs::create_dir_all(upper.join("moved")).unwrap();
        lsetxattr(&upper.join("moved"), "user.overlay.redirect", b"d", 0).unwrap();
        mknod(&upper.join("d"), libc::S_IFCHR, 0).unwrap();
        let (before_l, before_u) = (snap(&lower), snap(&upper));
        let mut ofs = OverlayFS::new(&lower);
        ofs.set_upper(&upper);
        let e = ofs.overlay_action(action).unwrap_err().to_string();
        assert!(
            e.contains("moved") && e.contains("user.overlay.redirect"),
            "{action:?}: {e}"
        );
        assert!(
            same_tree(&snap(&lower), &before_l, LINKS),
            "{action:?}: lower changed"
        );
        assert!(
            same_tree(&snap(&upper), &before_u, LINKS),
            "{action:?}: upper changed"
        );
    }
}

/// A directory whose lower path is too long for a redirect (over PATH_MAX) is still renamed
/// across directories: copied up whole instead, and committed to its new place.
#[test]
fn rename_of_a_directory_too_deep_for_a_redirect_still_works() {
    need_root!();
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    fn open_dir(at: &OwnedFd, name: &str) -> OwnedFd {
        let c = std::ffi::CString::new(name).unwrap();
        let fd = unsafe {
            libc::openat(
                at.as_raw_fd(),
                c.as_ptr(),
                libc::O_DIRECTORY | libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        assert!(fd >= 0, "openat {name}: {}", io::Error::last_os_error());
        unsafe { OwnedFd::from_raw_fd(fd) }
    }
    let names: Vec<String> = (0..17)
        .map(|i| format!("{i:02}{}", "n".repeat(250)))
        .collect();
    let mut fx = Fx::new(|l, _| {
        let mut fd = OwnedFd::from(fs::File::open(l).unwrap());
        for n in &names {
            let c = std::ffi::CString::new(n.as_str()).unwrap();
            assert_eq!(
                unsafe { libc::mkdirat(fd.as_raw_fd(), c.as_ptr(), 0o755) },
                0
            );
            fd = open_dir(&fd, n);
        }
        let c = std::ffi::CString::new("f").unwrap();
        let f = unsafe {
            libc::openat(
                fd.as_raw_fd(),
                c.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                0o644,
            )
        };
        assert!(f >= 0);
        assert_eq!(unsafe { libc::write(f, b"deep".as_ptr().cast(), 4) }, 4);
        unsafe { libc::close(f) };
    });
    let mnt = OwnedFd::from(fs::File::open(&fx.mnt).unwrap());
    let mut fd = open_dir(&mnt, &names[0]);
    for n in &names[1..16] {
        fd = open_dir(&fd, n);
    }
    let from = std::ffi::CString::new(names[16].as_str()).unwrap();
    let r = unsafe {
        libc::renameat(
            fd.as_raw_fd(),
            from.as_ptr(),
            mnt.as_raw_fd(),
            c"top".as_ptr(),
        )
    };
    assert_eq!(r, 0, "rename: {}", io::Error::last_os_error());
    assert_eq!(fs::read_to_string(fx.mnt.join("top/f")).unwrap(), "deep");
    drop((fd, mnt));
    fx.finish(OverlayAction::Commit).unwrap();
    assert_eq!(fs::read_to_string(fx.l("top/f")).unwrap(), "deep");
}
