//! The launcher: runs a command inside a mounted overlay the way `env`, `timeout` and container
//! runtimes do (exit status, signals, orphans), and keeps the mount private to it.
//!
//! A layer above the engine: it only uses the library API ([`crate::OverlayFS`]).

use std::ffi::OsString;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use signal_hook::consts::signal::*;
use signal_hook::iterator::SignalsInfo;
use signal_hook::iterator::exfiltrator::WithOrigin;
use signal_hook::low_level::siginfo::Cause;

pub mod kernel;
pub mod pidns;
pub mod upper;
pub mod userns;

pub use kernel::Backend;
pub use userns::Ids;

/// Exit status when the launcher itself failed (docker/env convention).
pub const EXIT_FAILURE: i32 = 125;
/// Exit status when the command exists but cannot be executed.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
/// Exit status when the command is not found.
pub const EXIT_NOT_FOUND: i32 = 127;

/// Which namespace the launcher is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Namespace {
    /// A private mount namespace (root): our mounts are invisible to others and die with us.
    PrivateMount,
    /// A user + mount namespace (no privileges needed), mapping ids as asked ([`Ids`]).
    User,
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes every mount below `/` private, so nothing we mount propagates out.
fn make_mounts_private() -> io::Result<()> {
    check(unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })
}

/// Enters a namespace where our mounts are private and vanish when the last process in it
/// exits, so a SIGKILLed launcher leaves no dead mount behind. As root a private mount
/// namespace; otherwise a user namespace mapping our own uid and gid (files keep showing up
/// as owned by the caller). Must be called while the process is single-threaded.
pub fn enter_private_namespace() -> io::Result<Namespace> {
    enter_private_namespace_as(Ids::Own)
}

/// [`enter_private_namespace`], mapping a normal user's ids as `ids` says.
pub fn enter_private_namespace_as(ids: Ids) -> io::Result<Namespace> {
    wait_single_threaded();
    if unsafe { libc::geteuid() } == 0 {
        check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
        make_mounts_private()?;
        return Ok(Namespace::PrivateMount);
    }
    userns::enter(ids)?;
    make_mounts_private()?;
    Ok(Namespace::User)
}

/// unshare(CLONE_NEWUSER) fails with EINVAL while the process has other threads, and a
/// thread that was just joined can linger in the kernel for a moment (e.g. after a parallel
/// extraction): wait for it, briefly.
fn wait_single_threaded() {
    for _ in 0..200 {
        let threads = std::fs::read_dir("/proc/self/task").map_or(1, |d| d.count());
        if threads <= 1 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

fn bind(src: &Path, dst: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let s = crate::engine::sys::cstr(src.as_os_str())?;
    let d = crate::engine::sys::cstr(dst.as_os_str())?;
    check(unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | flags,
            std::ptr::null(),
        )
    })
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("bind {} on {}: {e}", src.display(), dst.display()),
        )
    })
}

/// Prepares a mounted tree to be a command's `/` (inside our private namespace): the host's
/// /proc, /dev and /sys bound in, a fresh tmpfs on /tmp, and the host's resolv.conf so the
/// network resolves. Targets the tree lacks are skipped rather than created in the upper.
pub fn prepare_rootfs(root: &Path) -> io::Result<()> {
    for d in ["proc", "dev", "sys"] {
        let target = root.join(d);
        if d == "proc" && target.is_dir() && pidns::is_namespace_init() {
            // The /proc of the session's PID namespace, so its pids mean what they say.
            let t = crate::engine::sys::cstr(target.as_os_str())?;
            let r = unsafe {
                libc::mount(
                    c"proc".as_ptr(),
                    t.as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                )
            };
            if r == 0 {
                continue;
            }
            log::warn!(
                "cannot mount a /proc for the session ({}): the host's is used, whose \
                 process ids differ from the session's",
                io::Error::last_os_error()
            );
        }
        if target.is_dir() {
            bind(Path::new("/").join(d).as_path(), &target, libc::MS_REC)?;
        } else {
            log::warn!("{} has no /{d}: not providing it", root.display());
        }
    }
    let tmp = root.join("tmp");
    if tmp.is_dir() {
        let t = crate::engine::sys::cstr(tmp.as_os_str())?;
        check(unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                t.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=1777".as_ptr().cast(),
            )
        })?;
    }
    let resolv = root.join("etc/resolv.conf");
    if Path::new("/etc/resolv.conf").exists() && resolv.is_file() {
        bind(Path::new("/etc/resolv.conf"), &resolv, 0)?;
    }
    Ok(())
}

/// Detaches what [`prepare_rootfs`] mounted, so the overlay itself can be unmounted.
pub fn unprepare_rootfs(root: &Path) {
    for d in ["etc/resolv.conf", "tmp", "sys", "dev", "proc"] {
        if let Ok(c) = crate::engine::sys::cstr(root.join(d).as_os_str()) {
            // Not mounted (skipped in prepare) is fine: EINVAL.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Where the command starts: the same place relative to the mount as the caller's cwd is
/// relative to the first lower, else the mount's root.
pub fn map_cwd(cwd: &Path, lower: &Path, mount: &Path) -> PathBuf {
    let (Ok(cwd), Ok(lower)) = (cwd.canonicalize(), lower.canonicalize()) else {
        return mount.to_path_buf();
    };
    match cwd.strip_prefix(&lower) {
        Ok(rel) => mount.join(rel),
        Err(_) => mount.to_path_buf(),
    }
}

/// What to run and how.
#[derive(Debug)]
pub struct Launch {
    pub argv: Vec<OsString>,
    /// Directory to start in (inside the mount, or inside the new root with `chroot`).
    pub cwd: PathBuf,
    pub env: Vec<(OsString, OsString)>,
    /// Run with this directory as `/`.
    pub chroot: Option<PathBuf>,
}

/// Signals the launcher passes on to the command.
pub const FORWARDED: &[i32] = &[
    SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH, SIGCONT,
];

/// Where forwarded signals go: the command once it runs; before that they wait (a signal
/// sent right after start is not lost); after it exited, the processes it left behind.
#[derive(Debug, Default)]
pub struct Target {
    state: Mutex<TargetState>,
}

#[derive(Debug, Default)]
struct TargetState {
    pid: i32,
    pending: Vec<i32>,
    exited: bool,
    helpers: Vec<i32>,
}

impl Target {
    fn deliver(&self, sig: i32) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.exited && pidns::is_namespace_init() {
            // Everyone else in the namespace (the pids /proc shows are the host's).
            unsafe { libc::kill(-1, sig) };
        } else if st.exited {
            for p in children() {
                if !st.helpers.contains(&p) {
                    unsafe { libc::kill(p, sig) };
                }
            }
        } else if st.pid > 0 {
            unsafe { libc::kill(st.pid, sig) };
        } else {
            st.pending.push(sig);
        }
    }

    fn started(&self, pid: i32) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.pid = pid;
        for sig in std::mem::take(&mut st.pending) {
            unsafe { libc::kill(pid, sig) };
        }
    }

    fn exited(&self, helpers: &[i32]) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.exited = true;
        st.helpers = helpers.to_vec();
    }
}

/// Starts forwarding [`FORWARDED`] signals to `target`. Signals the terminal generated
/// (Ctrl-C, Ctrl-\, resize) already reached the command, which shares our foreground
/// process group, so they are not sent twice.
pub fn forward_signals(target: Arc<Target>) -> io::Result<signal_hook::iterator::Handle> {
    let mut signals = SignalsInfo::<WithOrigin>::new(FORWARDED)?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("ovl-signals".into())
        .spawn(move || {
            for info in signals.forever() {
                let from_tty = matches!(info.cause, Cause::Kernel)
                    && matches!(info.signal, SIGINT | SIGQUIT | SIGWINCH);
                if !from_tty {
                    target.deliver(info.signal);
                }
            }
        })?;
    Ok(handle)
}

/// How a command run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The exit status to report (see [`run`]).
    pub code: i32,
    /// Whether the command started at all (126/127: it did not).
    pub started: bool,
}

/// Runs the command and waits for it **and every process it left behind** (we are their
/// subreaper), so a daemonizing child never finds the overlay gone. Returns the exit status
/// to report: the command's own, 128+N if it died of signal N, 126/127 if it could not start.
pub fn run(launch: &Launch, target: &Target, keep_waiting_for: &[i32]) -> io::Result<i32> {
    run_outcome(launch, target, keep_waiting_for).map(|o| o.code)
}

/// [`run`], telling also whether the command started.
pub fn run_outcome(
    launch: &Launch,
    target: &Target,
    keep_waiting_for: &[i32],
) -> io::Result<Outcome> {
    run_outcome_entering(launch, target, keep_waiting_for, None)
}

/// What the command's process does last before exec (e.g. enter another process's
/// namespaces): async-signal-safe calls only.
pub type PreExec = Box<dyn FnMut() -> io::Result<()> + Send + Sync>;

/// [`run_outcome`], running `enter` in the command's process just before exec (after its
/// working directory is set: `enter` may change it).
pub fn run_outcome_entering(
    launch: &Launch,
    target: &Target,
    keep_waiting_for: &[i32],
    enter: Option<PreExec>,
) -> io::Result<Outcome> {
    check(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) })?;
    let (prog, args) = launch
        .argv
        .split_first()
        .ok_or_else(|| io::Error::other("no command given"))?;
    let mut cmd = Command::new(prog);
    cmd.args(args).envs(launch.env.iter().cloned());
    unsafe {
        // A killed launcher takes the command with it (without a PID namespace, its own
        // children may stay).
        cmd.pre_exec(|| {
            check(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ))
        });
    }
    match &launch.chroot {
        Some(root) => {
            let root = crate::engine::sys::cstr(root.as_os_str())?;
            let cwd = crate::engine::sys::cstr(launch.cwd.as_os_str())?;
            unsafe {
                cmd.pre_exec(move || {
                    check(libc::chroot(root.as_ptr()))?;
                    if libc::chdir(cwd.as_ptr()) < 0 {
                        check(libc::chdir(c"/".as_ptr()))?;
                    }
                    Ok(())
                });
            }
        }
        None => {
            cmd.current_dir(&launch.cwd);
        }
    }
    if let Some(f) = enter {
        unsafe { cmd.pre_exec(f) };
    }
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                io::ErrorKind::NotFound => EXIT_NOT_FOUND,
                _ => EXIT_NOT_EXECUTABLE,
            };
            eprintln!("{}: {}: {e}", program_name(), prog.to_string_lossy());
            return Ok(Outcome {
                code,
                started: false,
            });
        }
    };
    let main = child.id() as i32;
    target.started(main);
    let mut status = None;
    loop {
        let mut st = 0;
        let pid = unsafe { libc::waitpid(-1, &mut st, 0) };
        if pid < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => break,
                _ => return Err(e),
            }
        }
        if pid == main {
            status = Some(st);
            target.exited(keep_waiting_for);
        }
        if status.is_some() && only_these_children_left(keep_waiting_for) {
            break;
        }
    }
    let st = status.ok_or_else(|| io::Error::other("lost the command's exit status"))?;
    Ok(Outcome {
        code: exit_code(st),
        started: true,
    })
}

/// Our name as the user invoked us (ovl-run, or an app.run bundle), for messages.
fn program_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|a| {
            Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "ovl-run".into())
}

/// The status to report for a wait status: the exit code, or 128+N for death by signal N.
fn exit_code(st: libc::c_int) -> i32 {
    if libc::WIFEXITED(st) {
        libc::WEXITSTATUS(st)
    } else if libc::WIFSIGNALED(st) {
        128 + libc::WTERMSIG(st)
    } else {
        EXIT_FAILURE
    }
}

/// True when every child of ours is one of `helpers` (e.g. fusermount3 in auto_unmount mode,
/// which lives as long as we do and must not be waited for).
fn only_these_children_left(helpers: &[i32]) -> bool {
    children().iter().all(|p| helpers.contains(p))
}

/// Our current children (direct ones and orphans reparented to us), from /proc.
pub fn children() -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out
}

/// Mounts `ofs` privately (own mount namespace, or fusermount3 when none can be had), runs
/// the command `make` builds from the mount point, and waits for it and everything it left
/// running. With `root`, the command gets the merged tree as `/` and a private namespace is
/// required. The overlay stays mounted on return: the caller unmounts and finalizes. Errors
/// are one line, for the user.
pub fn run_in_overlay(
    ofs: &mut crate::OverlayFS,
    root: bool,
    make: impl FnOnce(&Path) -> Launch,
) -> Result<i32, String> {
    run_in_overlay_outcome(ofs, root, Ids::Own, make).map(|o| o.code)
}

/// [`run_in_overlay`], with a normal user's ids inside mapped as `ids` says, telling also
/// whether the command started.
pub fn run_in_overlay_outcome(
    ofs: &mut crate::OverlayFS,
    root: bool,
    ids: Ids,
    make: impl FnOnce(&Path) -> Launch,
) -> Result<Outcome, String> {
    run_in_overlay_with(ofs, root, ids, Backend::Fuse, make).map(|(o, _)| o)
}

/// [`run_in_overlay_outcome`] on the given backend; returns also the backend used (Kernel or
/// Fuse). With `Auto` the kernel's overlay is tried first and FUSE serves when the kernel
/// refuses (the reason is logged at info level, `-v`). A kernel overlay is unmounted before
/// returning, so the caller finalizes the layers as after a FUSE run.
pub fn run_in_overlay_with(
    ofs: &mut crate::OverlayFS,
    root: bool,
    ids: Ids,
    backend: Backend,
    make: impl FnOnce(&Path) -> Launch,
) -> Result<(Outcome, Backend), String> {
    let mut guardian = None;
    let mut ns = None;
    match enter_private_namespace_as(ids) {
        Ok(n) => {
            log::info!("running in {n:?} namespace");
            ns = Some(n);
            // The mount is the session's own: every id in it may use it (su, daemons, apt's
            // sandbox user), the kernel checking permissions (default_permissions).
            ofs.set_mount_method(crate::MountMethod::Direct)
                .set_allow_other(true);
            // A root filesystem session gets its own PID namespace (its own /proc); a plain
            // command keeps seeing the host's processes.
            if !(root && pidns::enter_pid_namespace()) {
                guardian = pidns::spawn_guardian();
            }
        }
        Err(e) if root => {
            return Err(format!(
                "--root needs a private namespace ({e}): enable unprivileged user namespaces \
                 (sysctl kernel.unprivileged_userns_clone=1) or run as root"
            ));
        }
        Err(e) if backend == Backend::Kernel => {
            return Err(format!(
                "--backend kernel needs a private namespace ({e}): enable unprivileged user \
                 namespaces or use --backend fuse"
            ));
        }
        Err(e) => {
            log::info!("no private namespace ({e}); mounting through fusermount3");
            ofs.set_mount_method(crate::MountMethod::Helper)
                .set_auto_unmount(true);
        }
    }
    let used = match (backend, ns) {
        (Backend::Fuse, _) | (_, None) => Backend::Fuse,
        (_, Some(n)) => match mount_kernel(ofs, n == Namespace::User) {
            Ok(()) => Backend::Kernel,
            Err(e) if backend == Backend::Kernel => return Err(format!("{e}: use --backend fuse")),
            Err(e) => {
                log::info!("{e}: using the FUSE engine");
                Backend::Fuse
            }
        },
    };
    if used == Backend::Fuse {
        ofs.mount().map_err(|e| e.to_string())?;
    }
    log::info!(
        "backend: {}",
        if used == Backend::Kernel {
            "kernel"
        } else {
            "fuse"
        }
    );
    let mnt = ofs.mountpoint().expect("mounted").to_path_buf();
    let res = run_mounted(ofs, &mnt, make, guardian);
    if used == Backend::Kernel {
        // Everything that used the mount has exited (we waited for it all).
        kernel::unmount(&mnt).map_err(|e| {
            format!(
                "unmounting the kernel overlay at {}: {e}; nothing was finalized",
                mnt.display()
            )
        })?;
        if let Some(w) = ofs.workdir() {
            kernel::clear_work(&w).map_err(|e| e.to_string())?;
        }
    }
    res.map(|o| (o, used))
}

/// Prepares the layers as [`crate::OverlayFS::mount`] does and mounts the kernel's overlay at
/// the mount point. The error says why the kernel refused.
fn mount_kernel(ofs: &crate::OverlayFS, userxattr: bool) -> Result<(), String> {
    let lowers = ofs.prepare().map_err(|e| e.to_string())?;
    let (Some(upper), Some(work), Some(mnt)) = (ofs.upper(), ofs.workdir(), ofs.mountpoint())
    else {
        return Err("the kernel backend needs an upper directory".into());
    };
    kernel::mount(&lowers, upper, &work, mnt, userxattr).map_err(|e| {
        format!(
            "{}: the kernel refused to mount its overlay with this upper ({e}; the kernel log \
             says why)",
            upper.display()
        )
    })
}

/// Runs the command on a mounted overlay and waits for it and all it left running.
fn run_mounted(
    ofs: &crate::OverlayFS,
    mnt: &Path,
    make: impl FnOnce(&Path) -> Launch,
    guardian: Option<i32>,
) -> Result<Outcome, String> {
    let launch = make(mnt);
    if launch.chroot.is_some() {
        prepare_rootfs(mnt).map_err(|e| {
            // What was mounted goes again: the overlay itself must be unmountable.
            unprepare_rootfs(mnt);
            format!("preparing {} as a root filesystem: {e}", mnt.display())
        })?;
    }
    let target = Arc::new(Target::default());
    let fwd =
        forward_signals(target.clone()).map_err(|e| format!("installing signal handlers: {e}"))?;
    let mut helpers = ofs.handle().map(|h| h.helper_pids()).unwrap_or_default();
    helpers.extend(guardian);
    let res = run_outcome(&launch, &target, &helpers);
    fwd.close();
    if launch.chroot.is_some() {
        unprepare_rootfs(mnt);
    }
    res.map_err(|e| format!("running {:?}: {e}", launch.argv[0]))
}

/// Mounts `ofs` where the caller's other processes can use it (fusermount3 with
/// auto_unmount: gone even if we are SIGKILLed), prints the mount point on stdout, and serves
/// until SIGINT/SIGTERM/SIGHUP or an external unmount. Returns 0 once unmounted.
pub fn serve(ofs: &mut crate::OverlayFS) -> Result<i32, String> {
    use std::io::Write;
    ofs.set_mount_method(crate::MountMethod::Helper)
        .set_auto_unmount(true);
    ofs.mount().map_err(|e| e.to_string())?;
    let mnt = ofs.mountpoint().expect("mounted").to_path_buf();
    // Detaches only while the mount at the path is still ours (never another one made there).
    let stop = ofs.handle().expect("mounted").unmounter();
    // Handlers before the mount point is announced: whoever reads it may signal at once.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            if let Err(e) = stop.detach() {
                eprintln!("unmounting {}: {e}", stop.mountpoint().display());
            }
        }
    });
    println!("{}", mnt.display());
    let _ = std::io::stdout().flush();
    match ofs.handle_mut().map(|h| h.wait_unmounted()) {
        Some(Err(e)) => Err(e.to_string()),
        _ => Ok(0),
    }
}

/// Removes `mount_*` directories an earlier, killed run of ours left in the cache dir: only
/// when their owner process is gone, and only empty directories (a dead mount is detached
/// first).
pub fn remove_stale_mountpoints(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("mount_") {
            continue;
        }
        let mut parts = name.rsplitn(3, '_');
        let (_ts, pid) = (parts.next(), parts.next());
        let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        // A zombie is gone too (its parent may never reap it, e.g. a container's init).
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"));
        if state.is_ok_and(|s| s.rsplit_once(") ").is_none_or(|(_, r)| !r.starts_with('Z'))) {
            continue;
        }
        let path = e.path();
        if let Err(err) = std::fs::metadata(&path) {
            if err.raw_os_error() == Some(libc::ENOTCONN) {
                let _ = crate::engine::fusermount::unmount_path(&path);
            }
        }
        if std::fs::remove_dir(&path).is_ok() {
            log::info!("removed stale mount point {}", path.display());
        }
    }
}
