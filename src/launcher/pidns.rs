//! Ending with the launcher: the command's processes must not outlive a SIGKILLed launcher
//! (they would go on against a dead mount, and the upper would change under the next run).

use super::{FORWARDED, exit_code};

/// Whether this process is the init of a PID namespace (made by [`enter_pid_namespace`]):
/// every other process in it was started by the command.
pub fn is_namespace_init() -> bool {
    unsafe { libc::getpid() == 1 }
}

/// Splits the launcher in two (call it single-threaded, inside the private namespace): the
/// caller returns as init of a new PID namespace, where it mounts, runs the command and
/// finalizes; the original process stays outside and only waits, passing signals on and
/// exiting with the inner one's status. When the outer process dies, however it dies, the
/// kernel kills the init (its parent-death signal) and with it every process in the
/// namespace, so nothing the command started survives and nothing is finalized. Returns false,
/// with nothing changed, when no PID namespace can be made.
pub fn enter_pid_namespace() -> bool {
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0 {
        log::info!(
            "no PID namespace ({}): the command's own children may outlive a killed ovl-run",
            std::io::Error::last_os_error()
        );
        return false;
    }
    // Tells the inner process whether the outer one is still there (the write end closes
    // when it dies).
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        // The namespace is waiting for its init: our next child would be it.
        fatal("pipe");
    }
    // The outer process cannot start threads any more (its new children's PID namespace is
    // not its own), so it takes signals synchronously: blocked from before the fork on, so
    // none is lost.
    let (set, old) = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, s);
        }
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        (set, old)
    };
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fatal("fork");
    }
    if pid == 0 {
        unsafe {
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            libc::close(fds[1]);
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            );
            // The outer process may have died before the line above.
            let mut p = libc::pollfd {
                fd: fds[0],
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut p, 1, 0) > 0 && p.revents & libc::POLLHUP != 0 {
                libc::_exit(128 + libc::SIGKILL);
            }
        }
        return true;
    }
    unsafe { libc::close(fds[0]) };
    wait_outside(pid, &set)
}

fn fatal(what: &str) -> ! {
    eprintln!(
        "ovl-run: {what} for the PID namespace: {}",
        std::io::Error::last_os_error()
    );
    std::process::exit(super::EXIT_FAILURE);
}

/// The outer process's whole life: pass signals on to the inner one, exit as it did.
/// Signals a terminal sent (Ctrl-C, Ctrl-\, resize) reached the inner one already (one process
/// group), so they are not sent twice.
fn wait_outside(inner: i32, set: &libc::sigset_t) -> ! {
    loop {
        let mut st = 0;
        let r = unsafe { libc::waitpid(inner, &mut st, libc::WNOHANG) };
        if r == inner {
            std::process::exit(exit_code(st));
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            fatal("waiting");
        }
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let sig = unsafe { libc::sigwaitinfo(set, &mut info) };
        let from_tty = info.si_code == libc::SI_KERNEL
            && matches!(sig, libc::SIGINT | libc::SIGQUIT | libc::SIGWINCH);
        if sig > 0 && sig != libc::SIGCHLD && !from_tty {
            unsafe { libc::kill(inner, sig) };
        }
    }
}

/// Keeps watch for a launcher that runs the command in the host's PID namespace (a plain
/// command keeps seeing the host's processes): a small process in the launcher's private
/// mount namespace that, once the launcher is gone, kills whatever else is still in that
/// namespace, i.e. what the command started (the command itself has a parent-death signal).
/// After a normal end it finds nobody. Call it single-threaded, inside the namespace.
/// Returns its pid: a child of ours not to wait for.
pub fn spawn_guardian() -> Option<i32> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        log::info!("no guardian: {}", std::io::Error::last_os_error());
        return None;
    }
    let pid = unsafe { libc::fork() };
    if pid != 0 {
        unsafe { libc::close(fds[0]) };
        if pid < 0 {
            log::info!("no guardian: {}", std::io::Error::last_os_error());
            unsafe { libc::close(fds[1]) };
            return None;
        }
        // The write end stays open in the launcher (and closes with it).
        return Some(pid);
    }
    unsafe {
        // Holds nothing of the launcher's (a lock, a pipe a caller waits on) and outlives
        // terminal signals and process-group kills meant for the command.
        libc::dup2(fds[0], 0);
        libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32);
        libc::setsid();
        let mut buf = [0u8; 1];
        while libc::read(0, buf.as_mut_ptr().cast(), 1) != 0 {
            if *libc::__errno_location() != libc::EINTR {
                break;
            }
        }
    }
    let me = std::fs::read_link("/proc/self/ns/mnt").ok();
    let self_pid = unsafe { libc::getpid() };
    // Until a pass finds nobody: a process may fork while we kill.
    for _ in 0..100 {
        let mut found = false;
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                    continue;
                };
                if pid != self_pid
                    && me.is_some()
                    && std::fs::read_link(e.path().join("ns/mnt")).ok() == me
                {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    found = true;
                }
            }
        }
        if !found {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    unsafe { libc::_exit(0) };
}
