//! Thin, safe wrappers over the `*at` system calls the engine is built on.
//!
//! Everything here works relative to a directory file descriptor and never follows a symlink in
//! the final component, so the overlay can never be tricked into leaving its layers. Errors come
//! back as `io::Error` carrying the raw errno, which the FUSE layer forwards unchanged.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

/// Converts a name to a C string; names containing NUL cannot exist on Linux.
pub fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `openat(dir, name, flags | O_CLOEXEC | O_NOFOLLOW, mode)`.
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let fd = check(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An `O_PATH` handle on `name` inside `dir` (the entry itself, never a symlink's target).
pub fn open_path(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    openat(dir, name, libc::O_PATH, 0)
}

/// Opens a directory path (used once per layer at mount time).
pub fn open_dir_path(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = cstr(path.as_os_str())?;
    let fd = check(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat` that also works on `O_PATH` descriptors.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    check(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            st.as_mut_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(unsafe { st.assume_init() })
}

/// Like [`fstatat`] but maps ENOENT to `None`.
pub fn fstatat_opt(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
    match fstatat(dir, name) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `/proc/self/fd/N`: the path through which an `O_PATH` handle is re-opened or used with the
/// path-only calls (xattrs, chmod, utimes). The magic link resolves to the very inode the handle
/// holds, even if it was renamed or unlinked, and never follows a symlink beyond it.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL in a number")
}

/// Re-opens an `O_PATH` handle with real access flags.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let p = proc_path(fd.as_raw_fd());
    let flags = flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_NOFOLLOW);
    let fd = check(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mkdirat`.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `mknodat`.
pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> io::Result<()> {
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

/// `symlinkat`.
pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `linkat` of an `O_PATH` handle (AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH, so the
/// `/proc/self/fd` form with AT_SYMLINK_FOLLOW is used, which any owner may do).
pub fn link_fd(src: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let p = proc_path(src.as_raw_fd());
    check(unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            p.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    })
    .map(drop)
}

/// `unlinkat` (`dir_flag` = AT_REMOVEDIR for directories).
pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `renameat2` with flags (RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT).
pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
    flags: u32,
) -> io::Result<()> {
    check(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// `readlinkat` of an `O_PATH` symlink handle.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// `fchownat(fd, "", AT_EMPTY_PATH)`: changes the owner of what the handle points at.
pub fn fchown_fd(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `fchownat(dir, name, AT_SYMLINK_NOFOLLOW)`.
pub fn fchownat_nofollow(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `fchmodat(dir, name, mode)`: follows a final symlink, so only for names known not to be one.
pub fn fchmodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) }).map(drop)
}

/// `fchmod` of a really open file (not an `O_PATH` handle: see [`fchmod_fd`]).
pub fn fchmod_open(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// chmod of the inode a handle points at (never of a symlink's target).
pub fn fchmod_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let p = proc_path(fd.as_raw_fd());
    check(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

/// utimensat on the inode a handle points at.
pub fn futimens_fd(
    fd: BorrowedFd<'_>,
    times: &[libc::timespec; 2],
    symlink: bool,
) -> io::Result<()> {
    if symlink {
        // The /proc magic link would be followed for a symlink handle in some kernels; symlinks
        // are only reached through their parent in that case, which the caller avoids by passing
        // AT_EMPTY_PATH (supported for utimensat since Linux 5.8 through the fd form below).
        return check(unsafe {
            libc::utimensat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                times.as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(drop);
    }
    let p = proc_path(fd.as_raw_fd());
    check(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }).map(drop)
}

/// Reads an xattr of the inode behind a handle. `None` when it is absent.
pub fn fgetxattr(fd: RawFd, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let p = proc_path(fd);
    let mut buf = vec![0u8; 256];
    loop {
        let n = unsafe {
            libc::getxattr(
                p.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(Some(buf));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
            Some(libc::ERANGE) => {
                let size =
                    unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
                if size < 0 {
                    return Err(io::Error::last_os_error());
                }
                buf.resize(size as usize + 1, 0);
            }
            _ => return Err(e),
        }
    }
}

/// Raw getxattr as FUSE wants it: with `size` 0 only the value's length is returned (and an
/// empty buffer); otherwise the value, or ERANGE when it does not fit.
pub fn getxattr_raw(fd: RawFd, name: &CStr, size: usize) -> io::Result<(usize, Vec<u8>)> {
    let p = proc_path(fd);
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    let n = unsafe { libc::getxattr(p.as_ptr(), name.as_ptr(), ptr, size) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok((n as usize, buf))
}

/// `getxattr_raw` of the entry `name` in directory `dir`, never following it (lgetxattr on
/// `/proc/self/fd/DIR/NAME`): no descriptor to open for the entry.
pub fn getxattr_at(
    dir: RawFd,
    name: &CStr,
    attr: &CStr,
    size: usize,
) -> io::Result<(usize, Vec<u8>)> {
    let p = at_path(dir, name)?;
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    let n = unsafe { libc::lgetxattr(p.as_ptr(), attr.as_ptr(), ptr, size) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok((n as usize, buf))
}

/// `/proc/self/fd/DIR/NAME`: the entry `name` in `dir` as a path for the `l*xattr` calls,
/// which do not follow it, so the entry needs no descriptor of its own.
fn at_path(dir: RawFd, name: &CStr) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{dir}/").into_bytes();
    p.extend_from_slice(name.to_bytes());
    CString::new(p).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Whether the entry `name` in `dir` has the xattr `attr` (not following it; a filesystem
/// without xattrs has none).
pub fn has_xattr_at(dir: RawFd, name: &CStr, attr: &CStr) -> io::Result<bool> {
    match getxattr_at(dir, name, attr, 0) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ENOTSUP)) => {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// [`flistxattr`] of the entry `name` in `dir`, never following it.
pub fn llistxattr_at(dir: RawFd, name: &CStr) -> io::Result<Vec<u8>> {
    list_xattrs(&at_path(dir, name)?, true)
}

/// [`fsetxattr`] of the entry `name` in `dir`, never following it.
pub fn lsetxattr_at(
    dir: RawFd,
    name: &CStr,
    attr: &CStr,
    value: &[u8],
    flags: i32,
) -> io::Result<()> {
    let p = at_path(dir, name)?;
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            attr.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// [`fremovexattr`] of the entry `name` in `dir`, never following it.
pub fn lremovexattr_at(dir: RawFd, name: &CStr, attr: &CStr) -> io::Result<()> {
    let p = at_path(dir, name)?;
    check(unsafe { libc::lremovexattr(p.as_ptr(), attr.as_ptr()) }).map(drop)
}

/// Lists xattr names (NUL-separated) of the inode behind a handle.
pub fn flistxattr(fd: RawFd) -> io::Result<Vec<u8>> {
    list_xattrs(&proc_path(fd), false)
}

/// listxattr (or llistxattr: `nofollow`) of a path; a filesystem without xattrs lists none.
fn list_xattrs(p: &CStr, nofollow: bool) -> io::Result<Vec<u8>> {
    let list = |buf: *mut libc::c_char, len: usize| unsafe {
        if nofollow {
            libc::llistxattr(p.as_ptr(), buf, len)
        } else {
            libc::listxattr(p.as_ptr(), buf, len)
        }
    };
    loop {
        let size = list(std::ptr::null_mut(), 0);
        if size < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOTSUP) {
                return Ok(Vec::new());
            }
            return Err(e);
        }
        let mut buf = vec![0u8; size as usize];
        let n = list(buf.as_mut_ptr().cast(), buf.len());
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
    }
}

/// Sets an xattr on the inode behind a handle.
pub fn fsetxattr(fd: RawFd, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let p = proc_path(fd);
    check(unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// Removes an xattr from the inode behind a handle.
pub fn fremovexattr(fd: RawFd, name: &CStr) -> io::Result<()> {
    let p = proc_path(fd);
    check(unsafe { libc::removexattr(p.as_ptr(), name.as_ptr()) }).map(drop)
}

/// Directory entry as read by [`read_dir`]: name and d_type.
pub struct RawDirent {
    pub name: Vec<u8>,
    pub dtype: u8,
}

/// Reads every entry of a directory (except `.` and `..`) through a fresh descriptor.
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<RawDirent>> {
    let fd = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            break;
        }
        let mut off = 0usize;
        while off < n as usize {
            // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
            let reclen = u16::from_ne_bytes(buf[off + 16..off + 18].try_into().expect("2 bytes"));
            let dtype = buf[off + 18];
            let name_bytes = &buf[off + 19..off + reclen as usize];
            let len = name_bytes
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_bytes.len());
            let name = &name_bytes[..len];
            if name != b"." && name != b".." {
                out.push(RawDirent {
                    name: name.to_vec(),
                    dtype,
                });
            }
            off += reclen as usize;
        }
    }
    Ok(out)
}

/// Copies `len` bytes from `src` to `dst` with a reflink when the filesystem can, else
/// `copy_file_range` (which itself shares extents or copies in the kernel), else read/write.
pub fn copy_data(src: BorrowedFd<'_>, dst: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    const FICLONE: libc::c_ulong = 0x4004_9409;
    if len == 0 {
        return Ok(());
    }
    if unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let mut off_in: i64 = 0;
    let mut off_out: i64 = 0;
    let mut left = len;
    while left > 0 {
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                left.min(1 << 30) as usize,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EXDEV)
                | Some(libc::ENOSYS)
                | Some(libc::EINVAL)
                | Some(libc::EOPNOTSUPP) => {
                    return copy_plain(src, dst, off_in as u64, left);
                }
                Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
        if n == 0 {
            break; // source shrank underneath us; the caller's size was an upper bound
        }
        left -= n as u64;
    }
    Ok(())
}

fn copy_plain(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    mut off: u64,
    mut left: u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = (left as usize).min(buf.len());
        let n = unsafe { libc::pread(src.as_raw_fd(), buf.as_mut_ptr().cast(), want, off as i64) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        let mut done = 0usize;
        while done < n as usize {
            let w = unsafe {
                libc::pwrite(
                    dst.as_raw_fd(),
                    buf[done..].as_ptr().cast(),
                    n as usize - done,
                    (off + done as u64) as i64,
                )
            };
            if w < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            done += w as usize;
        }
        off += n as u64;
        left -= n as u64;
    }
    Ok(())
}

/// `fsync`.
pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> io::Result<()> {
    check(unsafe {
        if datasync {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    })
    .map(drop)
}

/// Removes a directory tree below `dir`/`name` without ever following a symlink.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let st = match fstatat_opt(dir, name)? {
        None => return Ok(()),
        Some(st) => st,
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return unlinkat(dir, name, 0);
    }
    let sub = openat(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
    for ent in read_dir(sub.as_fd_borrowed())? {
        let c = CString::new(ent.name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        if ent.dtype == libc::DT_DIR {
            remove_tree(sub.as_fd_borrowed(), &c)?;
            continue;
        }
        // Mostly whiteouts: unlink without a stat first; a directory (d_type unknown) refuses.
        match unlinkat(sub.as_fd_borrowed(), &c, 0) {
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                remove_tree(sub.as_fd_borrowed(), &c)?
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            r => r?,
        }
    }
    unlinkat(dir, name, libc::AT_REMOVEDIR)
}

/// Small extension so call sites read `fd.as_fd_borrowed()` without importing `AsFd` everywhere.
pub trait BorrowFd {
    /// Borrows the descriptor.
    fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
}

impl BorrowFd for OwnedFd {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.as_fd()
    }
}

/// True when `st` describes an overlay whiteout device (char 0/0).
pub fn is_whiteout_dev(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

/// Raises RLIMIT_NOFILE as far as allowed: every inode the kernel holds keeps an `O_PATH`
/// descriptor open, so a large tree needs many. Root lifts the hard limit to `fs.nr_open`;
/// others get their hard limit.
pub fn raise_nofile_limit() {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return;
        }
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        if let Some(max) = nr_open.filter(|&m| m > rl.rlim_max) {
            let want = libc::rlimit {
                rlim_cur: max,
                rlim_max: max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return;
            }
        }
        if rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        }
    }
}
