//! Thin wrappers over the system calls tests need and std does not offer (xattrs and
//! renameat2 without following symlinks), shared by the test suites.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn lsetxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> io::Result<()> {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap());
    check(unsafe {
        libc::lsetxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

pub fn lremovexattr(p: &Path, name: &str) -> io::Result<()> {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap());
    check(unsafe { libc::lremovexattr(cp.as_ptr(), cn.as_ptr()) })
}

/// Runs a size-then-fill xattr call: `call(buf)` with an empty buffer asks the size, then
/// with a buffer that large; retried when the value grew in between (ERANGE).
fn sized(call: impl Fn(&mut [u8]) -> isize) -> io::Result<Vec<u8>> {
    loop {
        let n = call(&mut []);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; n as usize];
        let m = call(&mut buf);
        if m < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(e);
        }
        buf.truncate(m as usize);
        return Ok(buf);
    }
}

/// All xattr names of `p` (not following symlinks).
pub fn llistxattr(p: &Path) -> io::Result<Vec<String>> {
    let cp = cpath(p);
    let buf = sized(|b| unsafe { libc::llistxattr(cp.as_ptr(), b.as_mut_ptr().cast(), b.len()) })?;
    Ok(buf
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect())
}

pub fn lgetxattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let (cp, cn) = (cpath(p), CString::new(name).unwrap());
    sized(|b| unsafe { libc::lgetxattr(cp.as_ptr(), cn.as_ptr(), b.as_mut_ptr().cast(), b.len()) })
}

pub fn renameat2(from: &Path, to: &Path, flags: u32) -> io::Result<()> {
    let (f, t) = (cpath(from), cpath(to));
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            flags,
        )
    })
}

/// utimensat(AT_SYMLINK_NOFOLLOW) with explicit (sec, nsec) pairs; `None` leaves a time as is.
pub fn set_times(p: &Path, atime: Option<(i64, i64)>, mtime: Option<(i64, i64)>) -> io::Result<()> {
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

pub fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let cp = cpath(p);
    check(unsafe { libc::lchown(cp.as_ptr(), uid, gid) })
}
