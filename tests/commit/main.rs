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
//! This file is the shared harness (snapshots, the library fixture, the ovl-run helper); the
//! modules hold the tests by behaviour: `rules`, `metadata`, `report`, `safety`, `failures`,
//! `crash` (and `crash::sigkill`), `random`, `moves`.
//!
//! Everything needs root (FUSE mounts, device nodes, chown, chattr, tmpfs); without it the tests
//! print a note and pass. The SIGKILL tests also need `strace` (skipped with a note without it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{RwLock, mpsc};
use std::time::Duration;

use ovl::{OverlayAction, OverlayFS, Report};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tempfile::TempDir;

#[path = "../common/mod.rs"]
mod common;
use common::ops::kind_char;
use common::sys::*;
use common::user::*;
use common::{is_mounted, is_root};

const OVL_RUN: &str = env!("CARGO_BIN_EXE_ovl-run");
const CRASH_ENV: &str = "OVL_COMMIT_CRASH_AFTER";
const MODES: [OverlayAction; 2] = [OverlayAction::Commit, OverlayAction::CommitAtomic];
/// A time in the past (2010-01-01) for lower entries, so a rewrite shows in the mtime.
const OLD: (i64, i64) = (1_262_304_000, 0);

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("skipping: commit tests need root (FUSE, mknod, chown, chattr, tmpfs)");
            return;
        }
    };
}

mod crash;
mod failures;
mod kernel;
mod metadata;
mod moves;
mod random;
mod report;
mod rules;
mod safety;

// ---------------------------------------------------------------------------------------------
// ovl-run's backend

std::thread_local! {
    /// The backend the test on this thread runs ovl-run on (`OVL_RUN_BACKEND`): ovl's FUSE
    /// engine, unless the test runs inside [`on_kernel`].
    static BACKEND: std::cell::Cell<&'static str> = const { std::cell::Cell::new("fuse") };
}

/// Runs a test with every ovl-run of it on the kernel's overlay (`auto`, which then serves on
/// FUSE, where the kernel cannot serve ovl-run here; said once). The tests that go through
/// ovl-run have such a twin, named `..._on_the_kernel_backend`: the commit then merges an
/// upper the kernel wrote (its origin, impure and uuid xattrs, its redirects and whiteouts).
fn on_kernel<T>(test: impl FnOnce() -> T) -> T {
    if !is_root() {
        return test();
    }
    let before = BACKEND.with(|b| b.replace(common::backend::kernel_for_root()));
    struct Restore(&'static str);
    impl Drop for Restore {
        fn drop(&mut self) {
            BACKEND.with(|b| b.set(self.0));
        }
    }
    let _r = Restore(before);
    test()
}

fn backend() -> &'static str {
    BACKEND.with(|b| b.get())
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

/// Xattrs the kernel's overlay writes into an upper whose values belong to one instance: the
/// file handle of the lower entry a file was copied up from (`overlay.origin`: another lower
/// of equal content has other inode numbers) and the overlay's random id (`overlay.uuid`).
/// Compared by name only: two runs over equal trees write different values.
fn instance_xattr(name: &str) -> bool {
    ["trusted.overlay.", "user.overlay."].iter().any(|ns| {
        name.strip_prefix(ns)
            .is_some_and(|n| n == "origin" || n == "uuid")
    })
}

/// What is compared of one entry (no inode numbers, no times unless asked; of
/// [`instance_xattr`]s only the name).
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
        if instance_xattr(k) {
            s += &format!(" {k}=(this overlay's)");
        } else {
            s += &format!(" {k}={}", show_bytes(v));
        }
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
        .env("OVL_RUN_BACKEND", backend())
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
