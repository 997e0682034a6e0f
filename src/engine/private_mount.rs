//! Private copies of the layer mounts, as the kernel's overlayfs takes them
//! (`clone_private_mount`): the overlay's descriptors then pin a detached clone instead of the
//! user's mount, so `umount merged && umount lower` succeeds at once, however long the daemon
//! takes to exit, and a mount made under a layer later does not show through.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

use crate::engine::sys::{self, BorrowFd};

/// An `O_PATH` handle on the directory `path`, in a detached clone of the mount tree from
/// `path` down (`open_tree(OPEN_TREE_CLONE | AT_RECURSIVE)`) where we may clone mounts (root,
/// or our own user and mount namespace); a plain handle elsewhere.
pub fn open_layer_dir(path: &Path) -> io::Result<OwnedFd> {
    let fd = match clone_tree(path, libc::AT_RECURSIVE as libc::c_uint) {
        Ok(fd) => fd,
        // Not allowed to clone mounts here, or a kernel before 5.2: pin the mount itself.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EPERM | libc::ENOSYS | libc::EINVAL)
            ) =>
        {
            return sys::open_dir_path(path);
        }
        Err(e) => return Err(e),
    };
    // open_tree accepts any file; the layers must be directories (as the plain open checks).
    let st = sys::fstat(fd.as_fd_borrowed())?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
    }
    Ok(fd)
}

/// `open_tree(path, OPEN_TREE_CLONE | extra)`: a detached copy of the mount at `path`.
fn clone_tree(path: &Path, extra: libc::c_uint) -> io::Result<OwnedFd> {
    let c = sys::cstr(path.as_os_str())?;
    // SAFETY: open_tree takes a NUL-terminated path and flags; it returns a new descriptor.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | extra,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `O_PATH` handles on the upper and work directories inside one private clone (renames
/// between them need one mount): a non-recursive clone of the deepest directory holding both,
/// which is on their mount when they share one. Elsewhere (not allowed to clone, or they are
/// on different mounts, which the work-dir check then refuses) plain handles.
pub fn open_upper_work(upper: &Path, work: &Path) -> io::Result<(OwnedFd, OwnedFd)> {
    let plain = || Ok((sys::open_dir_path(upper)?, sys::open_dir_path(work)?));
    let (Ok(u), Ok(w)) = (upper.canonicalize(), work.canonicalize()) else {
        return plain();
    };
    let common: std::path::PathBuf = u
        .components()
        .zip(w.components())
        .take_while(|(a, b)| a == b)
        .map(|(a, _)| a)
        .collect();
    let Ok(base) = clone_tree(&common, 0) else {
        return plain();
    };
    let open_in = |p: &Path| -> io::Result<OwnedFd> {
        let rel = p.strip_prefix(&common).expect("a prefix");
        let name = if rel.as_os_str().is_empty() {
            c".".to_owned()
        } else {
            sys::cstr(rel.as_os_str())?
        };
        let fd = unsafe {
            libc::openat(
                std::os::fd::AsRawFd::as_raw_fd(&base),
                name.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let (Ok(ufd), Ok(wfd)) = (open_in(&u), open_in(&w)) else {
        // A mount in between (upper or work on another mount than their common parent).
        return plain();
    };
    let same_dev = |a: &OwnedFd, b: &Path| {
        let (Ok(x), Ok(y)) = (sys::fstat(a.as_fd_borrowed()), std::fs::metadata(b)) else {
            return false;
        };
        x.st_dev == std::os::unix::fs::MetadataExt::dev(&y)
    };
    if !same_dev(&ufd, &u) || !same_dev(&wfd, &w) {
        return plain();
    }
    Ok((ufd, wfd))
}
