//! ovl-run's kernel backend: the kernel's own overlay, mounted in the run's private namespace
//! over the same lower, upper and work directories, where the kernel allows it. Every request
//! is then served in the kernel (no FUSE round trips); the upper it leaves is in the format
//! ovl reads, so the finalizations, the commit journal and recovery work on it unchanged.

use std::io;
use std::path::{Path, PathBuf};

/// Which filesystem serves the command's overlay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// The kernel's overlay where the kernel accepts the mount, else ovl's FUSE engine.
    #[default]
    Auto,
    /// The kernel's overlay, or fail.
    Kernel,
    /// ovl's FUSE engine.
    Fuse,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Backend::Auto),
            "kernel" => Ok(Backend::Kernel),
            "fuse" => Ok(Backend::Fuse),
            _ => Err(format!("unknown backend '{s}': use auto, kernel or fuse")),
        }
    }
}

/// The kernel's work directory: a subdirectory of ovl's (which holds ovl's own `ovl-tmp`,
/// `ovl-index` and commit journal), so neither cleans up the other's files.
pub fn kernel_workdir(work: &Path) -> PathBuf {
    work.join("kernel")
}

/// Escapes what the kernel's option parser splits on (`,` between options, `:` between
/// lowers) and its escape character.
fn escape(p: &Path) -> String {
    let mut out = String::new();
    for c in p.to_string_lossy().chars() {
        if matches!(c, '\\' | ',' | ':') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The mount options for the kernel's overlay. As root (trusted.* xattrs): `redirect_dir=on`,
/// so a lower directory is renamed as ovl's engine does (a redirect ovl and its commit read).
/// Inside a user namespace the kernel needs `userxattr` (user.* xattrs, as ovl writes them
/// there) and then forces `redirect_dir=nofollow`: renaming a lower directory gives EXDEV.
/// `index=off`: the kernel's index would tie the upper to the lower's and upper's inodes
/// (a later mount after commit-atomic swapped the lower would be refused), and ovl keeps its
/// own hard-link index; `metacopy=off`: ovl does not read metacopy files.
pub fn options(lowers: &[PathBuf], upper: &Path, work: &Path, userxattr: bool) -> String {
    let lower = lowers
        .iter()
        .map(|l| escape(l))
        .collect::<Vec<_>>()
        .join(":");
    let mut o = format!(
        "lowerdir={lower},upperdir={},workdir={},index=off,metacopy=off",
        escape(upper),
        escape(work)
    );
    if userxattr {
        o.push_str(",userxattr");
    } else {
        o.push_str(",redirect_dir=on");
    }
    o
}

/// Mounts the kernel's overlay at `mountpoint` (inside our private namespace). Creates the
/// kernel's work directory. The error is the kernel's (EINVAL for options or layers it
/// refuses, EPERM without the right, ENODEV without overlayfs).
pub fn mount(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    mountpoint: &Path,
    userxattr: bool,
) -> io::Result<()> {
    let kwork = kernel_workdir(work);
    match std::fs::create_dir(&kwork) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let data = crate::engine::sys::cstr(options(lowers, upper, &kwork, userxattr).as_ref())?;
    let target = crate::engine::sys::cstr(mountpoint.as_os_str())?;
    let r = unsafe {
        libc::mount(
            c"overlay".as_ptr(),
            target.as_ptr(),
            c"overlay".as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unmounts the kernel's overlay once everything that used it has exited. Never detaches
/// lazily: a mount still in use would go on writing the upper while it is finalized.
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    let target = crate::engine::sys::cstr(mountpoint.as_os_str())?;
    for _ in 0..300 {
        if unsafe { libc::umount2(target.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
        // A process that just exited may still hold a reference for a moment.
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Err(io::Error::from_raw_os_error(libc::EBUSY))
}

/// Empties the kernel's work directory after unmounting. The kernel shares one whiteout inode
/// among the whiteouts it creates, with a name in its `work/` subdirectory, and removes that
/// name at its next mount: every whiteout in the upper would then seem changed (its ctime)
/// by a run that did not touch it. Removed now, the change belongs to the run that made it.
pub fn clear_work(work: &Path) -> crate::Result<()> {
    let w = kernel_workdir(work).join("work");
    if w.symlink_metadata().is_ok() {
        crate::finalize::remove_dir_tree(&w)?;
    }
    Ok(())
}

/// Why the kernel's overlay would show `upper` (with ovl's work dir `work`) otherwise than ovl's
/// engine does, if it would; `userns`: the kernel would mount it in a user namespace. Two
/// states an earlier FUSE run can leave:
/// - hard links ovl indexed (`WORK/ovl-index`): a lower file with several names, copied up
///   through one of them. ovl shows every name as the copy; the kernel (`index=off`) would
///   show the names the upper does not hold yet with the lower's old content.
/// - in a user namespace, directories renamed by a normal user's FUSE run (see
///   [`find_user_redirect`]), which the kernel refuses there.
///
/// The error is one reading the upper or the work dir.
pub fn fuse_only_state(upper: &Path, work: &Path, userns: bool) -> io::Result<Option<String>> {
    let index = work.join("ovl-index");
    match std::fs::read_dir(&index) {
        Ok(mut d) => {
            if d.next().is_some() {
                return Ok(Some(format!(
                    "{}: hard links of lower files that ovl's engine copied up (kept as one \
                     file, which the kernel's overlay would show as separate files, some with \
                     their old content)",
                    index.display()
                )));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if userns {
        if let Some(dir) = find_user_redirect(upper)? {
            return Ok(Some(format!(
                "{}: renamed by an earlier run (user.overlay.redirect), which the kernel's \
                 overlay refuses in a user namespace",
                dir.display()
            )));
        }
    }
    Ok(None)
}

/// The first directory below `upper` (itself included) that a FUSE run as a normal user
/// renamed (`user.overlay.redirect`): the kernel's overlay in a user namespace follows no
/// redirect and refuses such a directory (EPERM), so such an upper stays on FUSE. Walks the
/// upper's directories only (a preserve run walks the whole upper anyway).
pub fn find_user_redirect(upper: &Path) -> io::Result<Option<PathBuf>> {
    use crate::engine::sys::{self, BorrowFd};
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    fn walk(dir: std::os::fd::BorrowedFd<'_>, at: &Path) -> io::Result<Option<PathBuf>> {
        for e in sys::read_dir(dir)? {
            if e.dtype != libc::DT_DIR {
                continue;
            }
            let name = std::ffi::CString::new(e.name).map_err(io::Error::other)?;
            let here = at.join(std::ffi::OsStr::from_bytes(name.as_bytes()));
            if sys::has_xattr_at(dir.as_raw_fd(), &name, c"user.overlay.redirect")? {
                return Ok(Some(here));
            }
            let sub = sys::openat(dir, &name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            if let Some(p) = walk(sub.as_fd_borrowed(), &here)? {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }
    match sys::open_dir_path(upper) {
        Ok(fd) => walk(fd.as_fd_borrowed(), upper),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_escape_separators() {
        let o = options(
            &[PathBuf::from("/a:b"), PathBuf::from("/c,d")],
            Path::new("/u\\p"),
            Path::new("/w"),
            true,
        );
        assert_eq!(
            o,
            "lowerdir=/a\\:b:/c\\,d,upperdir=/u\\\\p,workdir=/w,index=off,metacopy=off,userxattr"
        );
    }
}
