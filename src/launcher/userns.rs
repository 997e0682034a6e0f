//! Who the command is in a normal user's user namespace: the caller's own ids (a plain run),
//! or root (a `--root` session), with the caller's subordinate ids from /etc/subuid and
//! /etc/subgid mapped as well when it has some, as podman does: then a root filesystem with
//! many owners is writable and its system users work.

use std::io;
use std::path::PathBuf;

/// How a normal user's ids appear in the user namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Ids {
    /// The caller's own uid and gid (files keep showing up as the caller's).
    #[default]
    Own,
    /// The caller is root (0) inside, its subordinate ids (if any) are 1 and up.
    Root,
}

/// A subordinate id range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    start: u32,
    count: u32,
}

/// The first range of `name` (or the numeric `id`) in a subuid/subgid file.
fn sub_range(file: &str, name: Option<&str>, id: u32) -> Option<Range> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let (who, start, count) = (f.next()?, f.next()?, f.next()?);
        if Some(who) != name && who.parse::<u32>().ok() != Some(id) {
            return None;
        }
        let r = Range {
            start: start.parse().ok()?,
            count: count.parse().ok()?,
        };
        (r.count > 0).then_some(r)
    })
}

/// The caller's first subordinate uid (from /etc/subuid), if it has a range.
pub fn first_subordinate_uid() -> Option<u32> {
    let uid = unsafe { libc::geteuid() };
    sub_range("/etc/subuid", user_name(uid).as_deref(), uid).map(|r| r.start)
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 16384];
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut res = std::ptr::null_mut();
    let r = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut res) };
    if r != 0 || res.is_null() {
        return None;
    }
    let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

fn find_in_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
}

fn write_file(path: &str, data: &str) -> io::Result<()> {
    std::fs::write(path, data).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn unshare() -> io::Result<()> {
    check(unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) })
}

/// Maps the ids not mapped yet one to one: `inside` for the caller's own.
fn map_self(inside_uid: u32, inside_gid: u32, uid: u32, gid: u32) -> io::Result<()> {
    if map_empty("uid_map") {
        write_file("/proc/self/uid_map", &format!("{inside_uid} {uid} 1"))?;
    }
    if map_empty("gid_map") {
        write_file("/proc/self/setgroups", "deny")?;
        write_file("/proc/self/gid_map", &format!("{inside_gid} {gid} 1"))?;
    }
    Ok(())
}

fn map_empty(which: &str) -> bool {
    std::fs::read_to_string(format!("/proc/self/{which}")).is_ok_and(|m| m.trim().is_empty())
}

/// Enters a user and mount namespace as a normal user, mapping `ids`. Call single-threaded.
pub(super) fn enter(ids: Ids) -> io::Result<()> {
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if ids == Ids::Own {
        unshare()?;
        return map_self(uid, gid, uid, gid);
    }
    let name = user_name(uid);
    let who = name.clone().unwrap_or_else(|| uid.to_string());
    let ranges = (
        sub_range("/etc/subuid", name.as_deref(), uid),
        // Keyed by user name (or uid) too.
        sub_range("/etc/subgid", name.as_deref(), uid),
    );
    let tools = (find_in_path("newuidmap"), find_in_path("newgidmap"));
    let why = match (ranges, tools) {
        ((Some(u), Some(g)), (Some(nu), Some(ng))) => {
            match map_with_helpers(uid, gid, u, g, &nu, &ng)? {
                None => return Ok(()),
                Some(e) => format!("{} failed ({e})", nu.display()),
            }
        }
        ((Some(_), Some(_)), _) => {
            unshare()?;
            "newuidmap/newgidmap are not installed (apt install uidmap)".to_string()
        }
        _ => {
            unshare()?;
            format!(
                "{who} has no subordinate ids in /etc/subuid and /etc/subgid (add some: usermod \
                 --add-subuids 100000-165535 --add-subgids 100000-165535 {who})"
            )
        }
    };
    map_self(0, 0, uid, gid)?;
    eprintln!(
        "{}: warning: only your own ids are mapped: {why}; inside, files of other owners are \
         read-only and no other user can be switched to",
        super::program_name()
    );
    Ok(())
}

/// Unshares, having a helper forked beforehand (it stays outside the namespace, where the
/// setuid newuidmap/newgidmap work) map 0 to the caller and 1.. to its ranges. Returns the
/// helper's complaint when it could not; whatever map it did not write is still empty.
fn map_with_helpers(
    uid: u32,
    gid: u32,
    u: Range,
    g: Range,
    newuidmap: &std::path::Path,
    newgidmap: &std::path::Path,
) -> io::Result<Option<String>> {
    let mut go = [0; 2];
    let mut report = [0; 2];
    check(unsafe { libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) })?;
    check(unsafe { libc::pipe2(report.as_mut_ptr(), libc::O_CLOEXEC) })?;
    let me = unsafe { libc::getpid() };
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // The helper: wait for the namespace, map it, tell what went wrong, if anything.
        unsafe {
            libc::close(go[1]);
            libc::close(report[0]);
        }
        let mut b = [0u8; 1];
        if unsafe { libc::read(go[0], b.as_mut_ptr().cast(), 1) } != 1 {
            unsafe { libc::_exit(1) };
        }
        let mut err = String::new();
        for (tool, own, r) in [(newuidmap, uid, u), (newgidmap, gid, g)] {
            let out = std::process::Command::new(tool)
                .arg(me.to_string())
                .args(["0", &own.to_string(), "1", "1"])
                .args([r.start.to_string(), r.count.to_string()])
                .stdin(std::process::Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    err = String::from_utf8_lossy(&o.stderr)
                        .trim()
                        .replace('\n', "; ");
                    if err.is_empty() {
                        err = o.status.to_string();
                    }
                    break;
                }
                Err(e) => {
                    err = e.to_string();
                    break;
                }
            }
        }
        unsafe {
            libc::write(report[1], err.as_ptr().cast(), err.len());
            libc::_exit(0);
        }
    }
    unsafe {
        libc::close(go[0]);
        libc::close(report[1]);
    }
    let res = unshare();
    if res.is_ok() {
        unsafe { libc::write(go[1], b"x".as_ptr().cast(), 1) };
    }
    unsafe { libc::close(go[1]) };
    let mut msg = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = unsafe { libc::read(report[0], buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        msg.extend_from_slice(&buf[..n as usize]);
    }
    unsafe {
        libc::close(report[0]);
        let mut st = 0;
        while libc::waitpid(pid, &mut st, 0) < 0
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
    }
    res?;
    Ok((!msg.is_empty()).then(|| String::from_utf8_lossy(&msg).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_by_name_or_id() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("subuid");
        std::fs::write(&f, "alice:100000:65536\n1002:200000:1000\nbob:300000:0\n").unwrap();
        let f = f.to_str().unwrap();
        let r = |start, count| Some(Range { start, count });
        assert_eq!(sub_range(f, Some("alice"), 1001), r(100000, 65536));
        assert_eq!(sub_range(f, Some("carol"), 1002), r(200000, 1000));
        assert_eq!(sub_range(f, Some("bob"), 1003), None);
        assert_eq!(sub_range(f, None, 1004), None);
    }
}
