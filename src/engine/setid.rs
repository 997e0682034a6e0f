//! Removing set-user-ID and set-group-ID bits when an unprivileged process writes or
//! truncates a file, as every Linux filesystem does.
//!
//! With `FUSE_HANDLE_KILLPRIV_V2` the kernel leaves this to us: it stops asking for
//! `security.capability` before every write (one round trip per `write(2)` otherwise) and
//! expects the filesystem to drop the bits itself. It says so with a flag on WRITE; fuser
//! does not pass on the flags of SETATTR (truncate) and OPEN (`O_TRUNC`), so for those the
//! caller's capability is read from `/proc`, only for the rare file that has such a bit.
//! A chown needs nothing here: the real `fchownat` drops the bits as the kernel rules say.

use std::os::fd::BorrowedFd;

use crate::engine::overlay::OpResult;
use crate::engine::sys;

/// CAP_FSETID: keeps set-ID bits across writes.
const CAP_FSETID: u32 = 4;

/// The mode a write by a caller without CAP_FSETID leaves: set-user-ID cleared, and
/// set-group-ID when the group may execute (without it, the bit marks mandatory locking and
/// stays). `None` when nothing changes.
pub fn killed_mode(mode: u32) -> Option<u32> {
    if mode & libc::S_IFMT != libc::S_IFREG {
        return None;
    }
    let mut m = mode & 0o7777;
    m &= !libc::S_ISUID;
    if m & libc::S_IXGRP != 0 {
        m &= !libc::S_ISGID;
    }
    (m != mode & 0o7777).then_some(m)
}

/// Whether process `pid` holds CAP_FSETID in the initial user namespace (what the kernel
/// checks). A process in another user namespace never does; neither does one we cannot
/// read (it has exited, or pid 0 for kernel-internal requests): the safe answer is "no".
pub fn caller_has_fsetid(pid: u32) -> bool {
    if pid == 0 || !same_user_ns(pid) || !in_initial_user_ns() {
        return false;
    }
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_FSETID) != 0)
}

fn same_user_ns(pid: u32) -> bool {
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/user"));
    let ours = std::fs::read_link("/proc/self/ns/user");
    matches!((theirs, ours), (Ok(a), Ok(b)) if a == b)
}

/// The daemon runs in the initial user namespace (its uid map is the identity).
fn in_initial_user_ns() -> bool {
    static INITIAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *INITIAL.get_or_init(|| {
        std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| {
            let f: Vec<&str> = m.split_whitespace().collect();
            f == ["0", "0", "4294967295"]
        })
    })
}

/// After a write or truncate of the real file `fd` by a caller without CAP_FSETID: drops
/// its set-ID bits. Returns whether the mode changed.
pub fn kill_after_write(fd: BorrowedFd<'_>) -> OpResult<bool> {
    let st = sys::fstat(fd)?;
    match killed_mode(st.st_mode) {
        Some(m) => sys::fchmod_fd(fd, m).map(|_| true),
        None => Ok(false),
    }
}

/// As [`kill_after_write`] for a truncate or `O_TRUNC` open by process `pid`: only when the
/// file has a set-ID bit to lose is the caller's capability looked up. Returns the file's
/// stat as it is afterwards (callers reuse it) and whether the mode changed.
pub fn kill_after_truncate(fd: BorrowedFd<'_>, pid: u32) -> OpResult<(libc::stat, bool)> {
    let mut st = sys::fstat(fd)?;
    match killed_mode(st.st_mode) {
        Some(m) if !caller_has_fsetid(pid) => {
            sys::fchmod_fd(fd, m)?;
            st.st_mode = (st.st_mode & libc::S_IFMT) | m;
            Ok((st, true))
        }
        _ => Ok((st, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::killed_mode;

    #[test]
    fn which_bits_go() {
        let reg = libc::S_IFREG;
        assert_eq!(killed_mode(reg | 0o6775), Some(0o0775));
        assert_eq!(killed_mode(reg | 0o4755), Some(0o0755));
        // Set-group-ID without group execute marks mandatory locking: kept.
        assert_eq!(killed_mode(reg | 0o6745), Some(0o2745));
        assert_eq!(killed_mode(reg | 0o2745), None);
        assert_eq!(killed_mode(reg | 0o0755), None);
        assert_eq!(killed_mode(libc::S_IFDIR | 0o6775), None);
    }
}
