//! Mounting without privileges through the setuid `fusermount3` helper (libfuse's protocol).
//!
//! fusermount3 opens `/dev/fuse`, mounts it, and hands the descriptor back over a socket named
//! in `_FUSE_COMMFD`. Used when we are not root: it works even where `/dev/fuse` is not
//! readable by users. With `auto_unmount` the helper stays alive holding the other end of the
//! socket and unmounts as soon as we die, however we die (SIGKILL included).

use std::io::{self, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

/// The helper's name, as libfuse 3 installs it.
pub const HELPER: &str = "fusermount3";

/// Finds fusermount3 (or the libfuse 2 `fusermount`) in PATH and the usual places.
pub fn find_helper() -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    for name in [HELPER, "fusermount"] {
        for dir in path
            .split(':')
            .chain(["/usr/bin", "/bin", "/usr/local/bin"])
        {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// A mount made by the helper: (with auto_unmount) the helper process and our end of its
/// socket, which must stay open while mounted.
#[derive(Debug)]
pub struct HelperMount {
    helper: Option<(Child, UnixStream)>,
    /// Our own guard for unprivileged auto_unmount (see [`spawn_watchdog`]): a process that
    /// unmounts when the pipe we hold closes, i.e. when we die.
    watchdog: Option<(Child, OwnedFd)>,
    bin: PathBuf,
}

/// fusermount3 before libfuse 3.16 cannot auto-unmount a mount made without `allow_other` for
/// an unprivileged user (it checks access as root and is refused), and it leaves a connection
/// served over io_uring, which the kernel tears down a moment after the server died: either
/// way a SIGKILLed server left a dead mount. This guard runs as the user, in its own session
/// (terminal signals do not reach it), blocks reading a pipe whose only writer is us, and once
/// it reads EOF unmounts the path if the mount there is dead (a live one, which `statfs`
/// answers, is somebody else's: ours died with us; `statfs` because the kernel may answer a
/// `stat` of a FUSE mount's root from its cache). On a normal end we kill it first
/// ([`HelperMount::release`]).
fn spawn_watchdog(bin: &Path, mountpoint: &Path) -> io::Result<(Child, OwnedFd)> {
    let mut fds = [0i32; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("read _; stat -f -- \"$1\" >/dev/null 2>&1 || exec \"$0\" -u -z -- \"$1\"")
        .arg(bin)
        .arg(mountpoint)
        .stdin(Stdio::from(r))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            // It lives as long as the mount: it must hold nothing else open (a descriptor
            // another thread opened without O_CLOEXEC, in another mount, would keep that
            // mount busy). Standard input, output and error are set up by now.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    Ok((child, w))
}

/// Mounts with `fusermount3 -o OPTIONS -- MOUNTPOINT`; returns the `/dev/fuse` descriptor.
pub fn mount(
    mountpoint: &Path,
    options: &str,
    auto_unmount: bool,
) -> io::Result<(OwnedFd, HelperMount)> {
    let bin = find_helper().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "fusermount3 not found: install fuse3 (e.g. apt-get install fuse3)",
        )
    })?;
    let (ours, theirs) = UnixStream::pair()?;
    let theirs_fd = theirs.as_raw_fd();
    let mut opts = options.to_string();
    if auto_unmount {
        opts.push_str(",auto_unmount");
    }
    let mut cmd = Command::new(&bin);
    cmd.arg("-o")
        .arg(&opts)
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", theirs_fd.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // The helper must inherit its end of the socket.
    unsafe {
        cmd.pre_exec(move || {
            let flags = libc::fcntl(theirs_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(theirs_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(theirs);

    let fd = receive_fd(&ours);
    let fd = match fd {
        Ok(fd) => fd,
        Err(e) => {
            let out = child.wait_with_output()?;
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(io::Error::new(
                e.kind(),
                if msg.is_empty() { e.to_string() } else { msg },
            ));
        }
    };
    let helper = if auto_unmount {
        Some((child, ours))
    } else {
        child.wait()?;
        None
    };
    // Root too: fusermount3 unmounts only a mount it finds dead when we die, and a connection
    // served over io_uring dies a moment later (the kernel tears the rings down after the
    // process is gone), so fusermount3 left it mounted; the guard's `stat` waits for that.
    let watchdog = if auto_unmount {
        Some(spawn_watchdog(&bin, mountpoint)?)
    } else {
        None
    };
    Ok((
        fd,
        HelperMount {
            helper,
            watchdog,
            bin,
        },
    ))
}

fn receive_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    let mut buf = [0u8; 8];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::PermissionDenied,
        "fusermount3 did not mount",
    ))
}

impl HelperMount {
    /// Pids of the helper processes that live as long as the mount (auto_unmount helper and
    /// watchdog), which a subreaper must not wait for.
    pub fn pids(&self) -> Vec<i32> {
        let h = self.helper.as_ref().map(|(c, _)| c.id() as i32);
        let w = self.watchdog.as_ref().map(|(c, _)| c.id() as i32);
        h.into_iter().chain(w).collect()
    }

    /// Lets the helpers go after the mount is gone.
    pub fn release(&mut self) {
        if let Some((mut child, sock)) = self.helper.take() {
            drop(sock);
            let _ = child.wait();
        }
        if let Some((mut child, pipe)) = self.watchdog.take() {
            // Killed before its pipe closes: the mount is gone already, and the path may hold
            // somebody else's mount by now, which the guard must not unmount.
            let _ = child.kill();
            let _ = child.wait();
            drop(pipe);
        }
    }

    /// Unmounts (`fusermount3 -u -z`) and lets an auto_unmount helper exit.
    pub fn unmount(&mut self, mountpoint: &Path) -> io::Result<()> {
        let out = Command::new(&self.bin)
            .args(["-u", "-z", "--"])
            .arg(mountpoint)
            .stdin(Stdio::null())
            .output()?;
        self.release();
        if out.status.success() {
            Ok(())
        } else {
            let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
            // Already unmounted by someone else: nothing left to do.
            if msg.contains("not mounted") || msg.contains("not found in") {
                return Ok(());
            }
            Err(io::Error::other(msg))
        }
    }
}

/// Unmounts `mountpoint` lazily, as root directly, otherwise through fusermount3. Only a FUSE
/// mount (live or dead) is unmounted: anything else at the path cannot be ours. (fusermount3
/// checks that itself for normal users.) [`crate::engine::session::MountHandle::unmounter`]
/// also checks it is our own FUSE mount.
pub fn unmount_path(mountpoint: &Path) -> io::Result<()> {
    if unsafe { libc::geteuid() } == 0 {
        let mut sfs = std::mem::MaybeUninit::<libc::statfs>::zeroed();
        let c = crate::engine::sys::cstr(mountpoint.as_os_str())?;
        // A dead FUSE mount answers ENOTCONN; a live one its magic number.
        const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
        if unsafe { libc::statfs(c.as_ptr(), sfs.as_mut_ptr()) } == 0 {
            // f_type's integer type differs between architectures.
            #[allow(clippy::unnecessary_cast)]
            let kind = unsafe { sfs.assume_init() }.f_type as i64;
            if kind != FUSE_SUPER_MAGIC {
                return Ok(());
            }
        }
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
    }
    let bin = find_helper().ok_or_else(|| io::Error::other("fusermount3 not found"))?;
    let out = Command::new(bin)
        .args(["-u", "-z", "--"])
        .arg(mountpoint)
        .stdin(Stdio::null())
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}
