//! The `ovl-run` launcher, end to end: the real binary on real mounts. Exit statuses, signal
//! forwarding, the subreaper, no dead mounts and no surviving processes after SIGKILL, cwd
//! mapping and environment, defaults, finalization (discard never touches a kept upper),
//! serve mode, non-root runs, `--root` sessions (root inside, subordinate ids) and bad input.
//!
//! Every test works in its own temp dir with its own `XDG_CACHE_HOME`, so the default mount
//! points of parallel tests never collide and stale-directory cleanup can be checked.
//!
//! This file is the shared harness (the world, running and watching ovl-run, the normal user,
//! root filesystems); the modules hold the tests by behaviour: `exit_status`, `signals`,
//! `environment`, `finalize`, `serve`, `nonroot`, `root`, `bad_input`.
//!
//! The suite runs twice, once per backend (`OVL_RUN_BACKEND` for every run, see [`backend`]):
//! as the test target `ovl_run` (this file) on ovl's FUSE engine, and as `ovl_run_kernel`
//! (tests/ovl_run_kernel.rs includes this file as its module `suite`) on the kernel's overlay,
//! where the kernel can mount it here (else on auto, saying so).

#[path = "../common/mod.rs"]
pub(crate) mod common;
use common::user::*;
use common::*;

mod bad_input;
mod environment;
mod exit_status;
mod finalize;
mod image_lower;
mod nonroot;
mod root;
mod serve;
mod signals;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ovl-run");
const USER: &str = TEST_USER;

/// Whether this build of the suite is the kernel backend's (the test target `ovl_run_kernel`).
pub(crate) const ON_KERNEL: bool = same(env!("CARGO_CRATE_NAME"), "ovl_run_kernel");

const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The backend every ovl-run of this suite runs on as root (`OVL_RUN_BACKEND`): `fuse`, or in
/// the kernel build `kernel` (`auto` where the kernel cannot serve it here).
fn backend() -> &'static str {
    if ON_KERNEL {
        common::backend::kernel_for_root()
    } else {
        "fuse"
    }
}

/// [`backend`] for the runs as the normal user.
fn user_backend() -> &'static str {
    if ON_KERNEL {
        common::backend::kernel_for_user()
    } else {
        "fuse"
    }
}

/// `OVL_RUN_BACKEND=...` for `env` in front of a normal user's ovl-run.
fn user_backend_env() -> String {
    format!("OVL_RUN_BACKEND={}", user_backend())
}
/// Longest any single ovl-run invocation may take before the test fails (and kills it).
const DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A test's private world: `root/lower` (with `f` and `sub/g`), and `root/cache` as
/// `XDG_CACHE_HOME` (not created: ovl-run creates it when it mounts).
struct World {
    _t: tempfile::TempDir,
    root: PathBuf,
    lower: PathBuf,
    cache: PathBuf,
}

impl World {
    fn new() -> Self {
        let t = tempfile::Builder::new()
            .prefix("ovl-run")
            .tempdir()
            .unwrap();
        let root = t.path().canonicalize().unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let lower = root.join("lower");
        fs::create_dir_all(lower.join("sub")).unwrap();
        fs::write(lower.join("f"), "lower\n").unwrap();
        fs::write(lower.join("sub/g"), "g\n").unwrap();
        World {
            root: root.clone(),
            lower,
            cache: root.join("cache"),
            _t: t,
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// The default upper of `lower` and its work directory.
    fn upper(&self) -> PathBuf {
        self.p("lower_upper")
    }

    fn work(&self) -> PathBuf {
        self.p(".lower_upper.ovl-work")
    }

    /// `ovl-run` as root, in `root`, with this world's cache dir.
    fn ovl(&self) -> Command {
        let mut c = Command::new(BIN);
        c.current_dir(&self.root)
            .env("XDG_CACHE_HOME", &self.cache)
            .env("OVL_RUN_BACKEND", backend())
            .env_remove("RUST_LOG");
        c
    }

    /// `ovl-run --lower LOWER ARGS...`.
    fn ovl_lower(&self, args: &[&str]) -> Command {
        let mut c = self.ovl();
        c.arg("--lower").arg(&self.lower).args(args);
        c
    }

    /// The `mount_*` directories in the cache dir.
    fn mount_dirs(&self) -> Vec<String> {
        let mut v: Vec<String> = match fs::read_dir(&self.cache) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("mount_"))
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }
}

/// What a finished ovl-run did.
#[derive(Debug)]
struct Out {
    /// Exit status, or 128+N when killed by signal N.
    code: i32,
    stdout: String,
    stderr: String,
}

/// A running process (in its own process group) with its output collected on the side.
struct Running {
    child: Child,
    lines: Receiver<String>,
    stderr: Receiver<String>,
    done: bool,
}

impl Running {
    fn start(mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().expect("spawn ovl-run");
        let (ltx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if ltx.send(l).is_err() {
                    break;
                }
            }
        });
        let (etx, stderr) = mpsc::channel();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            let _ = etx.send(s);
        });
        Running {
            child,
            lines,
            stderr,
            done: false,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "kill");
    }

    /// The next stdout line; fails the test (killing the process) after `timeout`.
    fn next_line(&mut self, timeout: Duration) -> String {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => l,
            Err(e) => {
                self.kill();
                let err = self.stderr.recv_timeout(Duration::from_secs(2));
                panic!("no stdout line from ovl-run ({e:?}); stderr: {err:?}");
            }
        }
    }

    fn kill(&mut self) {
        if !self.done {
            unsafe { libc::kill(-self.pid(), libc::SIGKILL) };
            let _ = self.child.wait();
            self.done = true;
        }
    }

    /// Waits for the exit (failing the test after `timeout`) and collects the output.
    fn wait(mut self, timeout: Duration) -> Out {
        let start = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if start.elapsed() > timeout {
                self.kill();
                let err = self.stderr.recv_timeout(Duration::from_secs(2));
                panic!("ovl-run did not exit within {timeout:?}; stderr: {err:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.done = true;
        let mut stdout = String::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(2)) {
                Ok(l) => {
                    stdout.push_str(&l);
                    stdout.push('\n');
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("stdout still open after exit"),
            }
        }
        let stderr = self
            .stderr
            .recv_timeout(Duration::from_secs(2))
            .expect("stderr still open after exit");
        let code = status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        Out {
            code,
            stdout,
            stderr,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs to completion with the default deadline.
fn run(cmd: Command) -> Out {
    Running::start(cmd).wait(DEADLINE)
}

/// Direct children of `pid` (all its threads), from /proc.
fn children_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children_of(p) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A descendant of `pid` running `name`.
fn find_descendant(pid: i32, name: &str) -> Option<i32> {
    descendants(pid).into_iter().find(|&p| comm(p) == name)
}

/// Gone or a zombie.
fn is_gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// FUSE mounts (in our mount namespace) whose mount point is `dir` or below it.
fn fuse_mounts_under(dir: &Path) -> Vec<String> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    mounts
        .lines()
        .filter(|l| {
            let mp = l.split(' ').nth(4).unwrap_or("");
            let fstype = l.split(" - ").nth(1).unwrap_or("");
            Path::new(mp).starts_with(dir) && fstype.starts_with("fuse")
        })
        .map(str::to_string)
        .collect()
}

/// Every entry below `dir` with its type, mode, owner and size: to check nothing changed.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u32, u32, u64)> {
    fn walk(d: &Path, base: &Path, out: &mut BTreeMap<PathBuf, (u32, u32, u64)>) {
        for e in fs::read_dir(d).unwrap().flatten() {
            let m = e.path().symlink_metadata().unwrap();
            let rel = e.path().strip_prefix(base).unwrap().to_path_buf();
            out.insert(
                rel,
                (m.mode(), m.uid(), if m.is_dir() { 0 } else { m.len() }),
            );
            if m.is_dir() {
                walk(&e.path(), base, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The names in `dir` (hidden ones included).
fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Every entry below `dir` with its metadata, content, link target and xattrs: to check a
/// tree is exactly as it was.
fn tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(d: &Path, base: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let m = p.symlink_metadata().unwrap();
            let mut xattrs: Vec<String> = xattr::list(&p)
                .unwrap()
                .map(|n| {
                    let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                    format!("{}={v:?}", n.to_string_lossy())
                })
                .collect();
            xattrs.sort();
            let content = if m.is_file() {
                format!("{:?}", fs::read(&p).unwrap())
            } else if m.file_type().is_symlink() {
                fs::read_link(&p).unwrap().display().to_string()
            } else {
                String::new()
            };
            let desc = format!(
                "{:o} {}:{} {} rdev={} mtime={}.{} ino={} {content} {xattrs:?}",
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                m.rdev(),
                m.mtime(),
                m.mtime_nsec(),
                m.ino()
            );
            out.insert(p.strip_prefix(base).unwrap().to_path_buf(), desc);
            if m.is_dir() {
                walk(&p, base, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn read(p: impl AsRef<Path>) -> String {
    let p = p.as_ref();
    fs::read_to_string(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// The non-root user
// ---------------------------------------------------------------------------------------------

/// Root is needed to create the user, chown and runuser; says so and skips otherwise.
fn root_or_skip() -> bool {
    if !is_root() {
        eprintln!("needs root (test user, chown, runuser); run the suite as root");
    }
    is_root()
}

fn chown_tree(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
    if p.symlink_metadata().unwrap().is_dir() {
        for e in fs::read_dir(p).unwrap().flatten() {
            chown_tree(&e.path(), uid, gid);
        }
    }
}

/// Prepares a world for the user: the binary copied in, everything owned by the user, the
/// cache dir created. Returns the copied binary and the ids.
fn user_world(w: &World) -> (PathBuf, u32, u32) {
    let (uid, gid) = ensure_test_user();
    let bin = w.p("ovl-run");
    fs::copy(BIN, &bin).unwrap();
    fs::create_dir_all(&w.cache).unwrap();
    chown_tree(&w.root, uid, gid);
    (bin, uid, gid)
}

/// `runuser -u ovl-test -- env XDG_CACHE_HOME=CACHE OVL_RUN_BACKEND=... BIN ARGS...`, in
/// `root`.
fn as_user(w: &World, bin: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("runuser");
    c.current_dir(&w.root)
        .env_remove("RUST_LOG")
        .args(["-u", USER, "--", "env"])
        .arg(format!("XDG_CACHE_HOME={}", w.cache.display()))
        .arg(user_backend_env())
        .arg(bin)
        .args(args);
    c
}

/// As the user: `ovl-run --lower LOWER OPTS... -- sh -c SCRIPT`.
fn user_sh(w: &World, bin: &Path, opts: &[&str], script: &str) -> Out {
    let mut args = vec!["--lower", w.lower.to_str().unwrap()];
    args.extend_from_slice(opts);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    run(as_user(w, bin, &args))
}

/// A small busybox root filesystem at `root/rootfs`.
const OS_RELEASE: &str = "NAME=\"ovl test\"\nID=ovltest\nVERSION_ID=1\n";

fn make_rootfs(w: &World) -> PathBuf {
    let r = w.p("rootfs");
    for d in ["bin", "etc", "proc", "dev", "sys", "tmp"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    for l in ["sh", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(l)).unwrap();
    }
    fs::write(r.join("etc/os-release"), OS_RELEASE).unwrap();
    r
}

// ---------------------------------------------------------------------------------------------
// --root as a normal user: subordinate ids, a user without them, a rootfs with dpkg
// ---------------------------------------------------------------------------------------------

/// A user without subordinate ids (a system user gets none).
const NOSUB_USER: &str = "ovl-test-nosub";

fn ensure_nosub_user() -> (u32, u32) {
    let ids = ensure_user(NOSUB_USER, &["-r"]);
    for f in ["/etc/subuid", "/etc/subgid"] {
        let t = fs::read_to_string(f).unwrap_or_default();
        assert!(
            !t.lines().any(|l| l.starts_with(&format!("{NOSUB_USER}:"))),
            "{NOSUB_USER} has subordinate ids in {f}"
        );
    }
    ids
}

/// The test user's first subordinate uid and gid, added if it has none.
fn ensure_subids() -> (u32, u32) {
    let first = |f: &str| -> Option<u32> {
        let t = fs::read_to_string(f).ok()?;
        let l = t.lines().find(|l| l.starts_with(&format!("{USER}:")))?;
        let mut p = l.split(':').skip(1);
        let (start, count) = (p.next()?.parse().ok()?, p.next()?.parse::<u32>().ok()?);
        (count >= 65536).then_some(start)
    };
    if first("/etc/subuid").is_none() || first("/etc/subgid").is_none() {
        let st = Command::new("usermod")
            .args([
                "--add-subuids",
                "300000-365535",
                "--add-subgids",
                "300000-365535",
                USER,
            ])
            .status()
            .unwrap();
        assert!(st.success(), "usermod --add-subuids");
    }
    for tool in ["newuidmap", "newgidmap"] {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .unwrap()
                .status
                .success(),
            "{tool} is missing: run packaging/setup-deps.sh (apt install uidmap)"
        );
    }
    (first("/etc/subuid").unwrap(), first("/etc/subgid").unwrap())
}

/// Copies a host binary and the libraries it links into `root`.
fn copy_with_libs(root: &Path, bin: &str) {
    let mut files = vec![bin.to_string()];
    let out = Command::new("ldd").arg(bin).output().unwrap();
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        files.extend(
            l.split_whitespace()
                .filter(|w| w.starts_with('/'))
                .map(str::to_string),
        );
    }
    for f in files {
        let dst = root.join(f.trim_start_matches('/'));
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(&f, &dst).unwrap();
    }
}

/// A small root filesystem with busybox, dpkg and setpriv, a .deb to install (`/pkgs/
/// hello.deb`, putting `/usr/share/hello/greeting`), and a file of another user:
/// `/var/apt/f` (0600), owned by uid/gid 42 inside. Owned as `--root` maps ids: root's files by
/// `uid`/`gid`, those of N > 0 by `sub + N - 1` (`sub`: the first subordinate id, or None:
/// then 42's file is owned by `other`).
fn dpkg_rootfs(w: &World, uid: u32, gid: u32, sub: Option<(u32, u32)>, other: u32) -> PathBuf {
    let r = w.p("rootfs");
    for d in [
        "bin",
        "sbin",
        "etc",
        "proc",
        "dev",
        "sys",
        "tmp",
        "pkgs",
        "var/apt",
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
        "var/lib/dpkg/parts",
        "var/lib/dpkg/alternatives",
        "var/log",
    ] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    for l in [
        "sh", "cat", "ls", "id", "chown", "rm", "mkdir", "stat", "echo",
    ] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(l)).unwrap();
    }
    for b in ["/usr/bin/dpkg", "/usr/bin/dpkg-deb", "/usr/bin/setpriv"] {
        copy_with_libs(&r, b);
    }
    // What dpkg insists on finding in PATH.
    fs::write(r.join("sbin/ldconfig"), "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(r.join("sbin/ldconfig"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("/bin/busybox", r.join("sbin/start-stop-daemon")).unwrap();
    fs::write(r.join("var/lib/dpkg/status"), "").unwrap();
    fs::write(r.join("var/lib/dpkg/parts/old"), "").unwrap();
    fs::write(
        r.join("etc/passwd"),
        "root:x:0:0::/:/bin/sh\n_apt:x:42:42::/:/bin/sh\n",
    )
    .unwrap();
    fs::write(r.join("etc/group"), "root:x:0:\n_apt:x:42:\n").unwrap();
    let pkg = w.p("pkg");
    fs::create_dir_all(pkg.join("DEBIAN")).unwrap();
    fs::create_dir_all(pkg.join("usr/share/hello")).unwrap();
    fs::write(
        pkg.join("DEBIAN/control"),
        "Package: hello-ovl\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\n\
         Description: test\n",
    )
    .unwrap();
    fs::write(pkg.join("usr/share/hello/greeting"), "hi\n").unwrap();
    let st = Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&pkg)
        .arg(r.join("pkgs/hello.deb"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "dpkg-deb --build");
    fs::write(r.join("var/apt/f"), "apt\n").unwrap();
    fs::set_permissions(r.join("var/apt/f"), fs::Permissions::from_mode(0o600)).unwrap();
    chown_tree(&r, uid, gid);
    let (ou, og) = match sub {
        Some((su, sg)) => (su + 41, sg + 41),
        None => (other, other),
    };
    std::os::unix::fs::lchown(r.join("var/apt/f"), Some(ou), Some(og)).unwrap();
    r
}
