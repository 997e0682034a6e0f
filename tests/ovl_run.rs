//! The `ovl-run` launcher, end to end: the real binary on real mounts. Exit statuses, signal
//! forwarding, the subreaper, no dead mounts and no surviving processes after SIGKILL, cwd
//! mapping and environment, defaults, finalization (discard never touches a kept upper),
//! serve mode, non-root runs, `--root` sessions (root inside, subordinate ids) and bad input.
//!
//! Every test works in its own temp dir with its own `XDG_CACHE_HOME`, so the default mount
//! points of parallel tests never collide and stale-directory cleanup can be checked.

mod common;
use common::*;

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
const USER: &str = "ovl-test";
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

/// Polls `f` until it gives a value; fails the test after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
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

fn user_ids() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, USER]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// Creates the test user if missing (tests/nonroot.rs may be doing the same concurrently).
fn ensure_user() -> (u32, u32) {
    if let Some(ids) = user_ids() {
        return ids;
    }
    let _ = Command::new("useradd")
        .args(["-M", "-s", "/bin/sh", USER])
        .status()
        .expect("useradd");
    wait_for("the test user", Duration::from_secs(10), user_ids)
}

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
    let (uid, gid) = ensure_user();
    let bin = w.p("ovl-run");
    fs::copy(BIN, &bin).unwrap();
    fs::create_dir_all(&w.cache).unwrap();
    chown_tree(&w.root, uid, gid);
    (bin, uid, gid)
}

/// `runuser -u ovl-test -- env XDG_CACHE_HOME=CACHE BIN ARGS...`, in `root`.
fn as_user(w: &World, bin: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("runuser");
    c.current_dir(&w.root)
        .env_remove("RUST_LOG")
        .args(["-u", USER, "--", "env"])
        .arg(format!("XDG_CACHE_HOME={}", w.cache.display()))
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
// Exit status
// ---------------------------------------------------------------------------------------------

#[test]
fn exit_status_is_the_commands() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "true"]));
    assert_eq!((o.code, o.stderr.as_str()), (0, ""), "{o:?}");
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "exit 3"]));
    assert_eq!((o.code, o.stderr.as_str()), (3, ""), "{o:?}");
}

#[test]
fn death_by_signal_is_128_plus_n() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "kill -INT $$"]));
    assert_eq!(o.code, 130, "{o:?}");
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "kill -KILL $$"]));
    assert_eq!(o.code, 137, "{o:?}");
}

#[test]
fn command_not_found_is_127() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "ovl-no-such-command-xyz"]));
    assert_eq!(o.code, 127, "{o:?}");
    assert!(o.stderr.contains("ovl-no-such-command-xyz"), "{o:?}");
    // Nothing was left mounted or lying around.
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

#[test]
fn a_command_that_never_started_leaves_nothing_on_disk() {
    // No upper, work dir, mount point, cache dir or lock file appears: with the defaults, with
    // directories given that do not exist yet, for --root, and for every finalization.
    let w = World::new();
    let rootfs = make_rootfs(&w);
    let before = snapshot(&w.root);
    let lower = w.lower.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["--lower", lower, "--", "/nonexistent"],
        vec!["--lower", lower, "--", "/etc/passwd"],
        vec![
            "--lower",
            lower,
            "--on-exit",
            "discard",
            "--",
            "/nonexistent",
        ],
        vec![
            "--lower",
            lower,
            "--on-exit",
            "commit",
            "--",
            "/nonexistent",
        ],
        vec![
            "--lower",
            lower,
            "--on-exit",
            "discard-all",
            "--",
            "/nonexistent",
        ],
        vec![
            "--lower",
            lower,
            "--upper",
            "new/deep/up",
            "--mountpoint",
            "mnt/deep",
            "--",
            "/nonexistent",
        ],
        vec!["--root", "--lower", "rootfs", "--", "/nonexistent"],
    ];
    for args in cases {
        let o = run({
            let mut c = w.ovl();
            c.args(&args);
            c
        });
        let want = if args.contains(&"/etc/passwd") {
            126
        } else {
            127
        };
        assert_eq!(o.code, want, "{args:?}: {o:?}");
        assert_eq!(o.stderr.lines().count(), 1, "{args:?}: {o:?}");
        assert_eq!(snapshot(&w.root), before, "{args:?}: left something: {o:?}");
        assert!(!w.cache.exists(), "{args:?}");
    }
    // An existing upper stays exactly as it was.
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "echo a > a"]));
    assert_eq!(o.code, 0, "{o:?}");
    let before = (snapshot(&w.root), tree(&w.upper()));
    let o = run(w.ovl_lower(&["--", "/nonexistent"]));
    assert_eq!(o.code, 127, "{o:?}");
    assert_eq!((snapshot(&w.root), tree(&w.upper())), before, "{o:?}");
    assert!(rootfs.is_dir());
}

#[test]
fn command_not_executable_is_126() {
    let w = World::new();
    let f = w.p("not-executable");
    fs::write(&f, "#!/bin/sh\necho should not run\n").unwrap();
    fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(w.ovl_lower(&["-q", "--", f.to_str().unwrap()]));
    assert_eq!((o.code, o.stdout.as_str()), (126, ""), "{o:?}");
    assert!(o.stderr.contains(f.to_str().unwrap()), "{o:?}");
}

// ---------------------------------------------------------------------------------------------
// Signals and the subreaper
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_is_forwarded_to_the_command() {
    let w = World::new();
    let mut r = Running::start(w.ovl_lower(&[
        "-q",
        "--",
        "sh",
        "-c",
        "trap \"echo got >$OVL_MOUNTPOINT/term; exit 7\" TERM; echo ready; \
         while :; do sleep 0.05; done",
    ]));
    assert_eq!(r.next_line(DEADLINE), "ready");
    r.signal(libc::SIGTERM);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 7, "{o:?}");
    assert_eq!(read(w.upper().join("term")), "got\n");
}

#[test]
fn other_signals_are_forwarded_too() {
    let w = World::new();
    let mut r = Running::start(w.ovl_lower(&[
        "-q",
        "--",
        "sh",
        "-c",
        "trap 'echo usr1' USR1; trap 'echo usr2' USR2; trap 'echo int; exit 9' INT; \
         echo ready; while :; do sleep 0.05; done",
    ]));
    assert_eq!(r.next_line(DEADLINE), "ready");
    r.signal(libc::SIGUSR1);
    assert_eq!(r.next_line(DEADLINE), "usr1");
    r.signal(libc::SIGUSR2);
    assert_eq!(r.next_line(DEADLINE), "usr2");
    // A SIGINT sent with kill(2) (not typed at a terminal) is passed on as well.
    r.signal(libc::SIGINT);
    assert_eq!(r.next_line(DEADLINE), "int");
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 9, "{o:?}");
}

#[test]
fn sigterm_right_after_the_command_starts_is_not_lost() {
    // The command has started (it printed "ready") when the signal is sent, so it must get
    // it, however soon. Repeated to catch a race between starting and forwarding.
    let w = World::new();
    for round in 0..30 {
        let mut r = Running::start(w.ovl_lower(&[
            "-q",
            "--",
            "sh",
            "-c",
            "trap 'exit 7' TERM; echo ready; while :; do sleep 0.05; done",
        ]));
        assert_eq!(r.next_line(DEADLINE), "ready");
        r.signal(libc::SIGTERM);
        let start = Instant::now();
        while r.child.try_wait().unwrap().is_none() {
            if start.elapsed() > Duration::from_secs(3) {
                r.kill();
                panic!("round {round}: SIGTERM sent after the command started was lost");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let o = r.wait(DEADLINE);
        assert_eq!(o.code, 7, "round {round}: {o:?}");
    }
}

#[test]
fn waits_for_processes_the_command_left_behind() {
    let w = World::new();
    let start = Instant::now();
    let o = run(w.ovl_lower(&[
        "-q",
        "--",
        "sh",
        "-c",
        "(sleep 0.5; echo late > $OVL_MOUNTPOINT/bg) & exit 0",
    ]));
    assert_eq!(o.code, 0, "{o:?}");
    assert!(start.elapsed() >= Duration::from_millis(500));
    assert_eq!(read(w.upper().join("bg")), "late\n");
    assert_eq!(w.mount_dirs(), Vec::<String>::new());

    // A daemon in its own session, reparented to ovl-run (the subreaper).
    let o = run(w.ovl_lower(&[
        "-q",
        "--",
        "sh",
        "-c",
        "setsid sh -c 'sleep 0.3; echo daemon > $OVL_MOUNTPOINT/d' & exit 4",
    ]));
    assert_eq!(o.code, 4, "{o:?}");
    assert_eq!(read(w.upper().join("d")), "daemon\n");
}

#[test]
fn command_exiting_125_is_still_finalized() {
    // 125 is also ovl-run's own failure status, but a command may exit 125 itself: its
    // changes must still be finalized (and reported) like after any other status.
    let w = World::new();
    let o = run(w.ovl_lower(&[
        "--on-exit",
        "discard",
        "--",
        "sh",
        "-c",
        "echo x > x; exit 125",
    ]));
    assert_eq!(o.code, 125, "{o:?}");
    assert_eq!(o.stderr, "ovl-run: discarded 1 changes\n");
    assert!(!w.upper().exists(), "upper left after discard");
    assert!(!w.work().exists(), "work dir left after discard");
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

/// Starts `cmd` (an ovl-run whose command writes `x`, starts two background sleeps and prints
/// `ready`), SIGKILLs the ovl-run process (`name`d `ovl-run`, maybe below a runuser) and
/// checks that the command and everything it started end within a second.
fn sigkill_ends_everything(cmd: Command) {
    let mut r = Running::start(cmd);
    assert_eq!(r.next_line(DEADLINE), "ready");
    let top = r.pid();
    let ovl = if comm(top) == "ovl-run" {
        top
    } else {
        find_descendant(top, "ovl-run").expect("ovl-run")
    };
    let procs = wait_for("the sleeps", DEADLINE, || {
        let d = descendants(ovl);
        (d.iter().filter(|&&p| comm(p) == "sleep").count() == 2).then_some(d)
    });
    unsafe { libc::kill(ovl, libc::SIGKILL) };
    let o = r.wait(DEADLINE);
    assert!(o.code == 137 || top != ovl, "{o:?}");
    let t = Instant::now();
    wait_for(
        "the command's processes to end",
        Duration::from_secs(1),
        || procs.iter().all(|&p| is_gone(p)).then_some(()),
    );
    eprintln!("all ended {:?} after the SIGKILL", t.elapsed());
}

#[test]
fn sigkill_of_ovl_run_ends_everything_the_command_started() {
    let script = "echo x > x; sleep 100 & sleep 100 & echo ready; wait";
    // A plain command, committing: nothing is committed, the upper is kept for the next run.
    let w = World::new();
    sigkill_ends_everything(w.ovl_lower(&["-q", "--on-exit", "commit", "--", "sh", "-c", script]));
    assert!(!w.lower.join("x").exists(), "committed after SIGKILL");
    assert_eq!(read(w.upper().join("x")), "x\n");
    let o = run(w.ovl_lower(&["-q", "--", "cat", "x"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "x\n"), "{o:?}");
    assert_eq!(fuse_mounts_under(&w.root), Vec::<String>::new());

    // A --root session (its own PID namespace), discarding everything: nothing discarded.
    let w = World::new();
    let rootfs = make_rootfs(&w);
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep")).unwrap();
    let mut c = w.ovl();
    c.args(["-q", "--on-exit", "discard-all", "--root", "--lower"])
        .arg(&rootfs)
        .args(["--", "/bin/sh", "-c", script]);
    sigkill_ends_everything(c);
    assert_eq!(read(w.p("rootfs_upper/x")), "x\n");

    // A normal user (a user namespace) with a plain command.
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let lower = w.lower.to_str().unwrap().to_string();
    sigkill_ends_everything(as_user(
        &w,
        &bin,
        &["-q", "--lower", &lower, "--", "sh", "-c", script],
    ));
    assert_eq!(read(w.upper().join("x")), "x\n");

    // A normal user's --root session with a process switched to another uid (the kernel ends
    // the PID namespace; a signal from the caller could not reach that process).
    let w = World::new();
    let (bin, uid, gid) = user_world(&w);
    let sub = ensure_subids();
    let rootfs = dpkg_rootfs(&w, uid, gid, Some(sub), 0);
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep")).unwrap();
    sigkill_ends_everything(as_user(
        &w,
        &bin,
        &[
            "-q",
            "--root",
            "--lower",
            rootfs.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "echo x > x; /usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups sleep 100 & \
             sleep 100 & echo ready; wait",
        ],
    ));
}

#[test]
fn non_root_user_discard_keeps_the_preserved_state() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let o = user_sh(&w, &bin, &["-q"], "echo a > a; rm f");
    assert_eq!(o.code, 0, "{o:?}");
    let kept = tree(&w.upper());
    let o = user_sh(
        &w,
        &bin,
        &["--on-exit", "discard"],
        "cat a; rm a; echo b > b",
    );
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\n"), "{o:?}");
    assert_eq!(
        o.stderr,
        format!(
            "ovl-run: discarded 2 changes of this run; {} is as it was\n",
            w.upper().display()
        )
    );
    assert_eq!(tree(&w.upper()), kept);
    let o = user_sh(&w, &bin, &["-q"], "ls");
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\nsub\n"), "{o:?}");
}

#[test]
fn sigkill_leaves_no_dead_mount_and_the_next_run_cleans_up() {
    let w = World::new();
    let r = Running::start(w.ovl_lower(&["-q", "--", "sleep", "30"]));
    let pid = r.pid();
    let sleep = wait_for("the command to start", DEADLINE, || {
        find_descendant(pid, "sleep")
    });
    let dirs = w.mount_dirs();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert!(
        dirs[0].starts_with(&format!("mount_lower_{pid}_")),
        "{dirs:?}"
    );
    r.signal(libc::SIGKILL);
    unsafe { libc::kill(sleep, libc::SIGKILL) };
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 137);
    wait_for("the command to die", DEADLINE, || {
        is_gone(sleep).then_some(())
    });
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    // The directory is left over (nobody could remove it)...
    assert_eq!(w.mount_dirs(), dirs);
    // ... and the next run removes it.
    let o = run(w.ovl_lower(&["-q", "--", "true"]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
}

#[test]
fn a_dead_mount_left_by_someone_else_is_detached_and_removed() {
    // A `mount_*` directory of a process that is gone, with a dead FUSE mount on it
    // (ENOTCONN): a FUSE server SIGKILLed without auto_unmount (ovl-mount -f, as root).
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let dead = {
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    };
    let stale = w.cache.join(format!("mount_lower_{dead}_1"));
    fs::create_dir_all(&stale).unwrap();
    for d in ["u2", "w2"] {
        fs::create_dir(w.p(d)).unwrap();
    }
    let mut c = Command::new(env!("CARGO_BIN_EXE_ovl-mount"));
    c.arg("-f")
        .arg("-o")
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            w.lower.display(),
            w.p("u2").display(),
            w.p("w2").display()
        ))
        .arg(&stale);
    let server = Running::start(c);
    wait_for("ovl-mount to mount", DEADLINE, || {
        (!fuse_mounts_under(&stale).is_empty()).then_some(())
    });
    server.signal(libc::SIGKILL);
    assert_eq!(server.wait(DEADLINE).code, 137);
    let e = fs::metadata(&stale).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "not a dead mount");

    let o = run(w.ovl_lower(&["-q", "--", "true"]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// Working directory and environment
// ---------------------------------------------------------------------------------------------

#[test]
fn cwd_maps_into_the_mount_and_env_is_set() {
    let w = World::new();
    let script = "pwd; echo \"$OVL_MOUNTPOINT\"; echo \"$OVL_LOWER\"; echo \"$OVL_UPPER\"; cat g";
    let mut c = w.ovl_lower(&["-q", "--", "sh", "-c", script]);
    c.current_dir(w.lower.join("sub"));
    let r = Running::start(c);
    let pid = r.pid();
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 0, "{o:?}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{o:?}");
    let mnt = Path::new(lines[1]);
    assert_eq!(mnt.parent(), Some(w.cache.as_path()), "{o:?}");
    let name = mnt.file_name().unwrap().to_string_lossy();
    assert!(name.starts_with(&format!("mount_lower_{pid}_")), "{o:?}");
    assert_eq!(Path::new(lines[0]), mnt.join("sub"));
    assert_eq!(lines[2], w.lower.to_str().unwrap());
    assert_eq!(lines[3], w.upper().to_str().unwrap());
    assert_eq!(lines[4], "g");

    // From outside the lower: the root of the mount.
    let mut c = w.ovl_lower(&["-q", "--", "sh", "-c", "pwd; echo \"$OVL_MOUNTPOINT\""]);
    c.current_dir("/");
    let o = run(c);
    assert_eq!(o.code, 0, "{o:?}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{o:?}");
    assert_eq!(lines[0], lines[1]);
    assert!(Path::new(lines[0]).starts_with(&w.cache), "{o:?}");

    // An explicit upper is passed on as given.
    let up = w.p("explicit_upper");
    let o = run(w.ovl_lower(&[
        "-q",
        "--upper",
        up.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo \"$OVL_UPPER\"",
    ]));
    assert_eq!(
        (o.code, o.stdout.trim()),
        (0, up.to_str().unwrap()),
        "{o:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Defaults and finalization
// ---------------------------------------------------------------------------------------------

#[test]
fn defaults_upper_beside_lower_mountpoint_removed_and_report() {
    let w = World::new();
    assert!(!w.upper().exists());
    let o = run(w.ovl_lower(&["--", "sh", "-c", "echo new > new; cat f"]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, "lower\n");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 1 changes in {}\n", w.upper().display())
    );
    assert!(w.upper().is_dir());
    assert!(w.work().is_dir());
    assert_eq!(read(w.upper().join("new")), "new\n");
    assert!(!w.lower.join("new").exists());
    // The mount point is gone, and nothing is mounted.
    assert!(w.cache.is_dir());
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
    assert_eq!(fuse_mounts_under(&w.root), Vec::<String>::new());

    // -q: no report.
    let o = run(w.ovl_lower(&["-q", "--", "true"]));
    assert_eq!((o.code, o.stderr.as_str()), (0, ""), "{o:?}");

    // --keep-mountpoint: the (empty, unmounted) directory stays.
    let r = Running::start(w.ovl_lower(&["-q", "--keep-mountpoint", "--", "true"]));
    let pid = r.pid();
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 0, "{o:?}");
    let dirs = w.mount_dirs();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert!(
        dirs[0].starts_with(&format!("mount_lower_{pid}_")),
        "{dirs:?}"
    );
    let kept = w.cache.join(&dirs[0]);
    assert!(kept.is_dir());
    assert_eq!(fs::read_dir(&kept).unwrap().count(), 0);
    assert_eq!(fuse_mounts_under(&w.root), Vec::<String>::new());
}

#[test]
fn preserve_keeps_changes_for_the_next_run_and_discard_drops_only_its_own() {
    let w = World::new();
    // Run 1: a new file and a deletion, preserved (the default, and explicitly).
    let o = run(w.ovl_lower(&[
        "--on-exit",
        "preserve",
        "--",
        "sh",
        "-c",
        "echo a > a; rm f",
    ]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 2 changes in {}\n", w.upper().display())
    );
    assert!(w.upper().is_dir() && w.work().is_dir());
    assert_eq!(read(w.upper().join("a")), "a\n");
    assert_eq!(read(w.lower.join("f")), "lower\n");
    let kept = tree(&w.upper());

    // A run that changes nothing reports 0 changes, not the upper's.
    let o = run(w.ovl_lower(&["--", "cat", "a"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\n"), "{o:?}");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 0 changes in {}\n", w.upper().display())
    );
    assert_eq!(tree(&w.upper()), kept);

    // Run 2 sees them, changes and deletes things, and discards what it did: only that.
    let o = run(w.ovl_lower(&[
        "--on-exit",
        "discard",
        "--",
        "sh",
        "-c",
        "cat a; test -e f && echo f-exists; echo b > b; rm a; echo lower2 > sub/g",
    ]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\n"), "{o:?}");
    assert_eq!(
        o.stderr,
        format!(
            "ovl-run: discarded 4 changes of this run; {} is as it was\n",
            w.upper().display()
        )
    );
    assert_eq!(tree(&w.upper()), kept, "the kept upper was changed");

    // Run 3: the preserved state, not the discarded one; this run's change is counted.
    let o = run(w.ovl_lower(&["--", "sh", "-c", "cat a sub/g; ls; touch a"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\ng\na\nsub\n"), "{o:?}");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 1 changes in {}\n", w.upper().display())
    );

    // A discard run with no upper yet leaves none behind.
    let w2 = World::new();
    let o = run(w2.ovl_lower(&["--on-exit", "discard", "--", "sh", "-c", "echo x > x"]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stderr, "ovl-run: discarded 1 changes\n");
    assert!(!w2.upper().exists() && !w2.work().exists());
    assert_eq!(names(&w2.root), set(&["cache", "lower"]));
}

#[test]
fn discard_all_drops_the_kept_upper_and_says_so() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "echo a > a; rm f"]));
    assert_eq!(o.code, 0, "{o:?}");
    let o = run(w.ovl_lower(&[
        "--on-exit",
        "discard-all",
        "--",
        "sh",
        "-c",
        "cat a; echo b > b",
    ]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\n"), "{o:?}");
    assert_eq!(
        o.stderr,
        format!(
            "ovl-run: discarded everything in {} (3 entries, 1 changes of this run) and its \
             work dir {}\n",
            w.upper().display(),
            w.work().display()
        )
    );
    assert!(!w.upper().exists(), "upper left after discard-all");
    assert!(!w.work().exists(), "work dir left after discard-all");
    assert_eq!(names(&w.root), set(&["cache", "lower"]));
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "cat f; ls"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "lower\nf\nsub\n"), "{o:?}");
}

#[test]
fn sigkill_of_a_discard_run_keeps_the_preserved_state() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "echo a > a; rm f; mkdir d"]));
    assert_eq!(o.code, 0, "{o:?}");
    let kept = tree(&w.upper());
    let work = tree(&w.work());
    // The discard run writes, deletes and renames over the kept state, then is killed.
    let mut r = Running::start(w.ovl_lower(&[
        "-q",
        "--on-exit",
        "discard",
        "--",
        "sh",
        "-c",
        "echo b > b; rm a; rmdir d; mv sub sub2; echo ready; exec sleep 30",
    ]));
    assert_eq!(r.next_line(DEADLINE), "ready");
    let scratch: Vec<String> = names(&w.root)
        .into_iter()
        .filter(|n| n.starts_with(".lower_upper.ovl-scratch-"))
        .collect();
    assert_eq!(scratch.len(), 2, "a scratch dir and its lock: {scratch:?}");
    r.signal(libc::SIGKILL);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 137, "{o:?}");
    assert_eq!(tree(&w.upper()), kept, "the kept upper was changed");
    assert_eq!(tree(&w.work()), work, "the kept work dir was changed");
    // The next run sees the preserved state and removes the dead run's scratch dir.
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "cat a; ls"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\na\nd\nsub\n"), "{o:?}");
    assert_eq!(
        names(&w.root),
        set(&["cache", "lower", "lower_upper", ".lower_upper.ovl-work"])
    );
}

#[test]
fn a_discard_run_and_a_writer_exclude_each_other() {
    let w = World::new();
    let o = run(w.ovl_lower(&["-q", "--", "sh", "-c", "echo a > a"]));
    assert_eq!(o.code, 0, "{o:?}");
    let mut r = Running::start(w.ovl_lower(&[
        "-q",
        "--on-exit",
        "discard",
        "--",
        "sh",
        "-c",
        "echo ready; exec sleep 30",
    ]));
    assert_eq!(r.next_line(DEADLINE), "ready");
    // Another discard run shares the upper; a writer is refused, naming it.
    let o = run(w.ovl_lower(&["-q", "--on-exit", "discard", "--", "cat", "a"]));
    assert_eq!((o.code, o.stdout.as_str()), (0, "a\n"), "{o:?}");
    let o = run(w.ovl_lower(&["--", "sh", "-c", "echo b > b"]));
    assert_eq!(o.code, 125, "{o:?}");
    assert_eq!(
        o.stderr,
        format!(
            "ovl-run: {}: another ovl-run is using this upper; wait for it to finish, or give \
             this run another --upper DIR or --on-exit discard\n",
            w.upper().display()
        )
    );
    assert!(!w.upper().join("b").exists());
    r.signal(libc::SIGTERM);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 143, "{o:?}");
}

#[test]
fn quiet_means_nothing_on_stderr_even_with_files_open_at_exit() {
    // The command exits holding many open files: the kernel sends their RELEASEs
    // asynchronously, racing with ovl-run's unmount. -q must still print nothing.
    let w = World::new();
    for i in 0..50 {
        fs::write(w.lower.join(format!("m{i}")), "m").unwrap();
    }
    let script = "for i in $(seq 1 900); do exec {fd}<m$((i % 50)); done; exit 0";
    for round in 0..10 {
        let o = run(w.ovl_lower(&["-q", "--", "bash", "-c", script]));
        assert_eq!((o.code, o.stderr.as_str()), (0, ""), "round {round}: {o:?}");
    }
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

#[test]
fn two_lowers_topmost_first() {
    let w = World::new();
    let l2 = w.p("lower2");
    fs::create_dir(&l2).unwrap();
    fs::write(l2.join("f"), "hidden\n").unwrap();
    fs::write(l2.join("only2"), "two\n").unwrap();
    let o = run(w.ovl_lower(&[
        "-q",
        "--lower",
        l2.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "cat f only2; echo \"$OVL_LOWER\"",
    ]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        o.stdout,
        format!("lower\ntwo\n{}:{}\n", w.lower.display(), l2.display())
    );
    // The default upper is beside the first lower.
    assert!(w.upper().is_dir());
    assert!(!w.p("lower2_upper").exists());
}

// ---------------------------------------------------------------------------------------------
// Serve mode
// ---------------------------------------------------------------------------------------------

#[test]
fn serve_mode_prints_mountpoint_and_ends_on_sigterm() {
    let w = World::new();
    let mut r = Running::start(w.ovl_lower(&[]));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    assert_eq!(mnt.parent(), Some(w.cache.as_path()));
    // Usable by other processes.
    let cat = Command::new("cat").arg(mnt.join("f")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "lower\n", "{cat:?}");
    fs::write(mnt.join("served"), "s\n").unwrap();
    assert_eq!(fuse_mounts_under(&mnt).len(), 1);
    r.signal(libc::SIGTERM);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 1 changes in {}\n", w.upper().display())
    );
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert!(!mnt.exists(), "mount point left behind");
    assert_eq!(read(w.upper().join("served")), "s\n");
}

#[test]
fn serve_mode_ends_on_fusermount_u() {
    let w = World::new();
    let mut r = Running::start(w.ovl_lower(&["-q", "--on-exit", "discard"]));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    fs::write(mnt.join("x"), "x").unwrap();
    let st = Command::new("fusermount3")
        .arg("-u")
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success());
    let o = r.wait(DEADLINE);
    assert_eq!((o.code, o.stderr.as_str()), (0, ""), "{o:?}");
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert!(!mnt.exists(), "mount point left behind");
    assert!(!w.upper().exists() && !w.work().exists(), "not discarded");
}

#[test]
fn serve_mode_sigkill_leaves_no_dead_mount() {
    let w = World::new();
    let mut r = Running::start(w.ovl_lower(&["-q"]));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    assert_eq!(read(mnt.join("f")), "lower\n");
    r.signal(libc::SIGKILL);
    assert_eq!(r.wait(DEADLINE).code, 137);
    // fusermount3 (auto_unmount) takes the mount away.
    wait_for("the mount to go away", DEADLINE, || {
        fuse_mounts_under(&w.cache).is_empty().then_some(())
    });
    let o = run(w.ovl_lower(&["-q", "--", "true"]));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// A normal user
// ---------------------------------------------------------------------------------------------

#[test]
fn non_root_user_runs_a_command() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, uid, gid) = user_world(&w);
    let o = user_sh(&w, &bin, &[], "id -u; cat f; echo mine > mine");
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, format!("{uid}\nlower\n"));
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 1 changes in {}\n", w.upper().display())
    );
    let m = fs::metadata(w.upper().join("mine")).unwrap();
    assert_eq!((m.uid(), m.gid()), (uid, gid));
    assert_eq!(read(w.upper().join("mine")), "mine\n");
    assert_eq!(fs::metadata(w.upper()).unwrap().uid(), uid);
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

#[test]
fn non_root_user_with_files_of_a_foreign_group() {
    // The user's files may belong to a group the user namespace does not map (here root's):
    // inside it shows as 65534, chown to it fails with EINVAL, and the kernel refuses writes to
    // such files. A lower whose root is like that must still mount (its root's metadata is
    // copied to the new upper), read, and take writes where the ids are the user's.
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, uid, gid) = user_world(&w);
    fs::create_dir(w.lower.join("mine")).unwrap();
    fs::write(w.lower.join("mine/g"), "g\n").unwrap();
    chown_tree(&w.lower, uid, 0);
    chown_tree(&w.lower.join("mine"), uid, gid);
    let script = "cat f; echo more >> mine/g; cat mine/g; echo x >> f 2>/dev/null || echo refused";
    let o = user_sh(&w, &bin, &[], script);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, "lower\ng\nmore\nrefused\n");
    assert_eq!(read(w.upper().join("mine/g")), "g\nmore\n");
    assert!(!w.upper().join("f").exists());
    assert_eq!(read(w.lower.join("mine/g")), "g\n");
}

#[test]
fn non_root_user_without_a_home() {
    // System accounts often have no home directory: the default mount point then goes to the
    // temporary directory instead of failing on ~/.cache, and is removed afterwards.
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let tmp = w.p("tmp");
    fs::create_dir(&tmp).unwrap();
    chown_tree(&tmp, user_ids().unwrap().0, user_ids().unwrap().1);
    let mut c = Command::new("runuser");
    c.current_dir(&w.root)
        .env_remove("RUST_LOG")
        .args([
            "-u",
            USER,
            "--",
            "env",
            "-u",
            "XDG_CACHE_HOME",
            "HOME=/nonexistent",
        ])
        .arg(format!("TMPDIR={}", tmp.display()))
        .arg(&bin)
        .args(["--lower", w.lower.to_str().unwrap(), "--", "cat", "f"]);
    let o = run(c);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, "lower\n");
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "mount point left in TMPDIR"
    );
}

#[test]
fn non_root_user_upper_where_they_may_not_write() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let locked = w.p("locked");
    fs::create_dir(&locked).unwrap(); // root's, 0755
    let up = locked.join("up");
    let o = user_sh(&w, &bin, &["--upper", up.to_str().unwrap()], "true");
    assert_eq!(o.code, 125, "{o:?}");
    assert_eq!(o.stderr.lines().count(), 1, "{o:?}");
    assert!(o.stderr.contains(up.to_str().unwrap()), "{o:?}");
    assert!(
        o.stderr
            .contains("choose an upper directory where you may write"),
        "{o:?}"
    );
    assert_eq!(fs::read_dir(&locked).unwrap().count(), 0);
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
}

#[test]
fn non_root_user_writeback_cache_commits_every_write() {
    // With the writeback cache, written pages sit in the kernel until written back: a commit
    // right after the command exits must still see every byte, also of a file the command
    // mapped and wrote through memory.
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let script = "set -e; i=0; while [ $i -lt 200 ]; do printf '%05d\\n' $i >> log; i=$((i+1)); done; \
                  dd if=/dev/zero of=big bs=4k count=512 status=none; printf x > f; \
                  python3 -c \"import mmap,os; fd=os.open('m',os.O_RDWR|os.O_CREAT,0o644); os.ftruncate(fd,8192); mm=mmap.mmap(fd,8192); mm[4096:4100]=b'MMAP'; mm.close(); os.close(fd)\"";
    let o = user_sh(
        &w,
        &bin,
        &["--writeback-cache", "--on-exit", "commit"],
        script,
    );
    assert_eq!(o.code, 0, "{o:?}");
    let want: String = (0..200).map(|i| format!("{i:05}\n")).collect();
    assert_eq!(read(w.lower.join("log")), want);
    assert_eq!(
        fs::read(w.lower.join("big")).unwrap(),
        vec![0u8; 4096 * 512]
    );
    assert_eq!(read(w.lower.join("f")), "x");
    let m = fs::read(w.lower.join("m")).unwrap();
    assert_eq!(m.len(), 8192);
    assert_eq!(&m[4096..4100], b"MMAP");
    assert!(m[..4096].iter().all(|&b| b == 0));
}

#[test]
fn non_root_user_serve_sigkill_leaves_no_dead_mount() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let mut r = Running::start(as_user(
        &w,
        &bin,
        &["-q", "--lower", w.lower.to_str().unwrap()],
    ));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    assert_eq!(fuse_mounts_under(&mnt).len(), 1);
    let ovl = find_descendant(r.pid(), "ovl-run").expect("ovl-run below runuser");
    assert_eq!(unsafe { libc::kill(ovl, libc::SIGKILL) }, 0);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 137, "{o:?}");
    // fusermount3 (auto_unmount) should take the mount away by itself.
    let start = Instant::now();
    let mut left = fuse_mounts_under(&w.cache);
    while !left.is_empty() && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
        left = fuse_mounts_under(&w.cache);
    }
    // Whatever happened, the next run (as the user) detaches and removes what is left.
    let o = run(as_user(
        &w,
        &bin,
        &["-q", "--lower", w.lower.to_str().unwrap(), "--", "true"],
    ));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(w.mount_dirs(), Vec::<String>::new());
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert_eq!(
        left,
        Vec::<String>::new(),
        "a dead mount stayed behind after ovl-run (serve mode, non-root) was SIGKILLed"
    );
}

#[test]
fn non_root_user_serves() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, uid, _) = user_world(&w);
    let mut r = Running::start(as_user(&w, &bin, &["--lower", w.lower.to_str().unwrap()]));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    assert_eq!(mnt.parent(), Some(w.cache.as_path()));
    // Another process of the user uses the mount.
    let m = mnt.display();
    let o = Command::new("runuser")
        .args(["-u", USER, "--", "sh", "-c"])
        .arg(format!("cat {m}/f && echo s > {m}/s"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "lower\n");
    // SIGTERM to ovl-run itself (a child of runuser).
    let ovl = find_descendant(r.pid(), "ovl-run").expect("ovl-run below runuser");
    assert_eq!(unsafe { libc::kill(ovl, libc::SIGTERM) }, 0);
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        o.stderr,
        format!("ovl-run: preserved 1 changes in {}\n", w.upper().display())
    );
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert!(!mnt.exists(), "mount point left behind");
    assert_eq!(fs::metadata(w.upper().join("s")).unwrap().uid(), uid);

    // Ended by the user's fusermount3 -u.
    let mut r = Running::start(as_user(
        &w,
        &bin,
        &["-q", "--lower", w.lower.to_str().unwrap()],
    ));
    let mnt = PathBuf::from(r.next_line(DEADLINE));
    let o = Command::new("runuser")
        .args(["-u", USER, "--", "fusermount3", "-u"])
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let o = r.wait(DEADLINE);
    assert_eq!((o.code, o.stderr.as_str()), (0, ""), "{o:?}");
    assert_eq!(fuse_mounts_under(&w.cache), Vec::<String>::new());
    assert!(!mnt.exists(), "mount point left behind");
}

// ---------------------------------------------------------------------------------------------
// --root
// ---------------------------------------------------------------------------------------------

#[test]
fn root_session_in_a_busybox_rootfs() {
    let w = World::new();
    let rootfs = make_rootfs(&w);
    let o = run({
        let mut c = w.ovl();
        c.args(["--root", "--lower"]).arg(&rootfs).args([
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/os-release",
        ]);
        c
    });
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, OS_RELEASE);
    // Nothing of the session's own mounts leaked into the upper.
    assert_eq!(
        o.stderr,
        format!(
            "ovl-run: preserved 0 changes in {}\n",
            w.p("rootfs_upper").display()
        )
    );
    assert_eq!(w.mount_dirs(), Vec::<String>::new());

    // The cwd maps into the new root; a missing command is 127, a non-executable one 126.
    let mut c = w.ovl();
    c.current_dir(rootfs.join("etc"))
        .args(["-q", "--root", "--lower"])
        .arg(&rootfs)
        .args(["--", "/bin/sh", "-c", "pwd; cat os-release"]);
    let o = run(c);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, format!("/etc\n{OS_RELEASE}"));
    for (cmd, code) in [("/no/such/cmd", 127), ("/etc/os-release", 126)] {
        let mut c = w.ovl();
        c.args(["-q", "--root", "--lower"])
            .arg(&rootfs)
            .args(["--", cmd]);
        let o = run(c);
        assert_eq!(o.code, code, "{cmd}: {o:?}");
    }
}

#[test]
fn root_session_as_non_root_user() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let rootfs = make_rootfs(&w);
    let (bin, uid, _) = user_world(&w);
    let o = run(as_user(
        &w,
        &bin,
        &[
            "-q",
            "--root",
            "--lower",
            rootfs.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "cat /etc/os-release; echo y > /y",
        ],
    ));
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, OS_RELEASE);
    let up = w.p("rootfs_upper");
    assert_eq!(read(up.join("y")), "y\n");
    assert_eq!(fs::metadata(up.join("y")).unwrap().uid(), uid);
}

// ---------------------------------------------------------------------------------------------
// --root as a normal user: root inside, subordinate ids, other users
// ---------------------------------------------------------------------------------------------

/// A user without subordinate ids (a system user gets none).
const NOSUB_USER: &str = "ovl-test-nosub";

fn named_user_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, name]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn ensure_nosub_user() -> (u32, u32) {
    if named_user_ids(NOSUB_USER).is_none() {
        let _ = Command::new("useradd")
            .args(["-r", "-M", "-s", "/bin/sh", NOSUB_USER])
            .status()
            .expect("useradd");
    }
    let ids = wait_for("the test user", Duration::from_secs(10), || {
        named_user_ids(NOSUB_USER)
    });
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

#[test]
fn root_session_with_subordinate_ids_has_root_and_other_users() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, uid, gid) = user_world(&w);
    let sub = ensure_subids();
    let rootfs = dpkg_rootfs(&w, uid, gid, Some(sub), 0);
    let before = tree(&rootfs);
    let nobody = "/usr/bin/setpriv --reuid=65534 --regid=65534 --clear-groups";
    let apt = "/usr/bin/setpriv --reuid=42 --regid=42 --clear-groups";
    let script = format!(
        "export PATH=/usr/sbin:/usr/bin:/sbin:/bin; id -u; echo x > /x; chown 1234:1234 /x; \
         stat -c %u:%g /x; dpkg -i /pkgs/hello.deb >/dev/null && cat /usr/share/hello/greeting; \
         echo root >> /var/apt/f; {apt} cat /var/apt/f; {nobody} ls /pkgs; \
         {nobody} cat /var/apt/f || echo nobody-may-not-read; \
         {nobody} sh -c 'echo > /nope' || echo nobody-may-not-write; \
         rm -r /var/lib/dpkg/parts && mkdir /var/lib/dpkg/parts && ls -a /var/lib/dpkg/parts"
    );
    let o = run(as_user(
        &w,
        &bin,
        &[
            "-q",
            "--root",
            "--lower",
            rootfs.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            &script,
        ],
    ));
    assert_eq!(
        o.stdout,
        "0\n1234:1234\nhi\napt\nroot\nhello.deb\nnobody-may-not-read\nnobody-may-not-write\n.\n..\n",
        "{o:?}"
    );
    assert_eq!(o.code, 0, "{o:?}");
    assert!(!o.stderr.contains("warning"), "{o:?}");
    assert_eq!(tree(&rootfs), before, "the rootfs changed");
    // In the upper, as the namespace maps them: 1234 is the 1234th subordinate id.
    let up = w.p("rootfs_upper");
    let m = fs::metadata(up.join("x")).unwrap();
    assert_eq!((m.uid(), m.gid()), (sub.0 + 1233, sub.1 + 1233));
    let m = fs::metadata(up.join("var/apt/f")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o7777), (sub.0 + 41, 0o600));
    assert_eq!(read(up.join("usr/share/hello/greeting")), "hi\n");

    // --keep-uid: the caller's own ids inside.
    let o = run(as_user(
        &w,
        &bin,
        &[
            "-q",
            "--root",
            "--keep-uid",
            "--lower",
            rootfs.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            "id -u",
        ],
    ));
    assert_eq!((o.code, o.stdout.clone()), (0, format!("{uid}\n")), "{o:?}");

    // A rootfs made where root was the first subordinate id (mmdebstrap --mode=unshare
    // writing a directory) is named, once.
    std::os::unix::fs::lchown(&rootfs, Some(sub.0), Some(sub.1)).unwrap();
    let o = run(as_user(
        &w,
        &bin,
        &[
            "-q",
            "--root",
            "--on-exit",
            "discard",
            "--lower",
            rootfs.to_str().unwrap(),
            "--",
            "/bin/id",
        ],
    ));
    assert_eq!(o.stderr.lines().count(), 1, "{o:?}");
    assert!(
        o.stderr.starts_with(&format!(
            "ovl-run: warning: {} belongs to your first subordinate uid {}",
            rootfs.display(),
            sub.0
        )),
        "{o:?}"
    );
    std::os::unix::fs::lchown(&rootfs, Some(uid), Some(gid)).unwrap();

    // As root the mount is open to the session's other users too.
    let mut c = w.ovl();
    c.args(["-q", "--root", "--on-exit", "discard", "--lower"])
        .arg(&rootfs)
        .args(["--", "/bin/sh", "-c", &format!("{nobody} ls /pkgs")]);
    let o = run(c);
    assert_eq!((o.code, o.stdout.as_str()), (0, "hello.deb\n"), "{o:?}");
}

#[test]
fn root_session_without_subordinate_ids_warns_once_and_foreign_files_are_read_only() {
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (uid, gid) = ensure_nosub_user();
    let bin = w.p("ovl-run");
    fs::copy(BIN, &bin).unwrap();
    fs::create_dir_all(&w.cache).unwrap();
    chown_tree(&w.root, uid, gid);
    let rootfs = dpkg_rootfs(&w, uid, gid, None, 4321);
    let before = tree(&rootfs);
    let mut c = Command::new("runuser");
    c.current_dir(&w.root)
        .env_remove("RUST_LOG")
        .args(["-u", NOSUB_USER, "--", "env"])
        .arg(format!("XDG_CACHE_HOME={}", w.cache.display()))
        .arg(&bin)
        .args(["-q", "--root", "--lower"])
        .arg(&rootfs)
        .args([
            "--",
            "/bin/sh",
            "-c",
            "id -u; echo x > /x && echo wrote-own; stat -c %u /var/apt/f; \
             echo y >> /var/apt/f || echo foreign-read-only",
        ]);
    let o = run(c);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(
        o.stdout, "0\nwrote-own\n65534\nforeign-read-only\n",
        "{o:?}"
    );
    let warnings: Vec<&str> = o.stderr.lines().filter(|l| l.contains("warning")).collect();
    assert_eq!(warnings.len(), 1, "{o:?}");
    assert!(
        warnings[0].starts_with("ovl-run: warning: only your own ids are mapped: ")
            && warnings[0].contains(&format!(
                "{NOSUB_USER} has no subordinate ids in /etc/subuid"
            ))
            && warnings[0].contains("files of other owners are read-only"),
        "{o:?}"
    );
    assert_eq!(tree(&rootfs), before, "the rootfs changed");
    assert_eq!(fs::metadata(w.p("rootfs_upper/x")).unwrap().uid(), uid);
}

// ---------------------------------------------------------------------------------------------
// Bad input: 125, one line naming the path, nothing changed on disk
// ---------------------------------------------------------------------------------------------

/// Runs `ovl-run ARGS...`, expects 125 with a single stderr line containing `names`, and no
/// change at all below the world's root (the cache dir, and so any mount point, not created).
fn assert_bad_input(w: &World, args: &[&str], names: &str) {
    assert_bad_input_with(w, args, names, |_| {});
}

fn assert_bad_input_with(w: &World, args: &[&str], names: &str, f: impl FnOnce(&mut Command)) {
    let before = snapshot(&w.root);
    let mut c = w.ovl();
    c.args(args);
    f(&mut c);
    let o = run(c);
    assert_eq!(o.code, 125, "{args:?}: {o:?}");
    assert_eq!(o.stdout, "", "{args:?}: {o:?}");
    assert!(o.stderr.ends_with('\n'), "{args:?}: {o:?}");
    assert_eq!(o.stderr.lines().count(), 1, "{args:?}: not one line: {o:?}");
    assert!(o.stderr.starts_with("ovl-run: "), "{args:?}: {o:?}");
    assert!(
        o.stderr.contains(names),
        "{args:?}: error does not name {names}: {o:?}"
    );
    let after = snapshot(&w.root);
    assert_eq!(before, after, "{args:?}: changed the disk: {o:?}");
    assert!(!w.cache.exists(), "{args:?}: created the cache dir");
    assert_eq!(fuse_mounts_under(&w.root), Vec::<String>::new());
}

#[test]
fn bad_lower_missing() {
    let w = World::new();
    let l = w.p("missing");
    assert_bad_input(
        &w,
        &["--lower", l.to_str().unwrap(), "--", "true"],
        l.to_str().unwrap(),
    );
    assert!(!w.p("missing_upper").exists());
}

#[test]
fn bad_lower_is_a_file() {
    let w = World::new();
    let l = w.lower.join("f");
    assert_bad_input(
        &w,
        &["--lower", l.to_str().unwrap(), "--", "true"],
        l.to_str().unwrap(),
    );
    assert!(!w.lower.join("f_upper").exists());
}

#[test]
fn bad_upper_equals_lower() {
    let w = World::new();
    let l = w.lower.to_str().unwrap();
    assert_bad_input(&w, &["--lower", l, "--upper", l, "--", "true"], l);
    // The same directory through a symlink.
    let link = w.p("link");
    std::os::unix::fs::symlink(&w.lower, &link).unwrap();
    let link = link.to_str().unwrap();
    assert_bad_input(&w, &["--lower", l, "--upper", link, "--", "true"], link);
}

#[test]
fn bad_upper_inside_lower() {
    let w = World::new();
    let u = w.lower.join("u");
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--upper",
            u.to_str().unwrap(),
            "--",
            "true",
        ],
        u.to_str().unwrap(),
    );
}

#[test]
fn bad_lower_inside_upper() {
    let w = World::new();
    let sub = w.lower.join("sub");
    let u = w.lower.to_str().unwrap();
    assert_bad_input(
        &w,
        &["--lower", sub.to_str().unwrap(), "--upper", u, "--", "true"],
        u,
    );
}

#[test]
fn bad_mountpoint_inside_a_layer() {
    let w = World::new();
    let m = w.lower.join("m");
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--mountpoint",
            m.to_str().unwrap(),
            "--",
            "true",
        ],
        m.to_str().unwrap(),
    );
    // Inside the (default) upper.
    fs::create_dir(w.upper()).unwrap();
    let m = w.upper().join("m");
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--mountpoint",
            m.to_str().unwrap(),
            "--",
            "true",
        ],
        m.to_str().unwrap(),
    );
}

#[test]
fn bad_mountpoint_not_empty() {
    let w = World::new();
    let m = w.p("mnt");
    fs::create_dir(&m).unwrap();
    fs::write(m.join("x"), "x").unwrap();
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--mountpoint",
            m.to_str().unwrap(),
            "--",
            "true",
        ],
        m.to_str().unwrap(),
    );
    assert!(!w.upper().exists());
}

#[test]
fn bad_on_exit_action() {
    let w = World::new();
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--on-exit",
            "bogus",
            "--",
            "true",
        ],
        "bogus",
    );
    assert!(!w.upper().exists());
}

#[test]
fn bad_dashdash_without_command() {
    let w = World::new();
    assert_bad_input(&w, &["--lower", w.lower.to_str().unwrap(), "--"], "`--`");
    assert!(!w.upper().exists());
}

#[test]
fn bad_default_mountpoint_inside_a_layer() {
    // XDG_CACHE_HOME inside the lower: the default mount point would be inside it.
    let w = World::new();
    let cache = w.lower.join("cache");
    assert_bad_input_with(
        &w,
        &["--lower", w.lower.to_str().unwrap(), "--", "true"],
        cache.to_str().unwrap(),
        |c| {
            c.env("XDG_CACHE_HOME", &cache);
        },
    );
    assert!(!cache.exists());
    assert!(!w.upper().exists());
}

#[test]
fn bad_upper_is_a_file() {
    let w = World::new();
    let u = w.p("ufile");
    fs::write(&u, "").unwrap();
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--upper",
            u.to_str().unwrap(),
            "--",
            "true",
        ],
        u.to_str().unwrap(),
    );
}

#[test]
fn bad_mountpoint_is_a_file() {
    let w = World::new();
    let m = w.p("mfile");
    fs::write(&m, "").unwrap();
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--mountpoint",
            m.to_str().unwrap(),
            "--",
            "true",
        ],
        m.to_str().unwrap(),
    );
    assert!(!w.upper().exists());
}

#[test]
fn bad_inode_mode() {
    let w = World::new();
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--inode-mode",
            "bogus",
            "--",
            "true",
        ],
        "bogus",
    );
}

#[test]
fn bad_second_lower_missing() {
    let w = World::new();
    let l2 = w.p("missing2");
    assert_bad_input(
        &w,
        &[
            "--lower",
            w.lower.to_str().unwrap(),
            "--lower",
            l2.to_str().unwrap(),
            "--",
            "true",
        ],
        l2.to_str().unwrap(),
    );
    assert!(!w.upper().exists());
}
