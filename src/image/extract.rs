//! Extracting an image into a directory through the reader (the no-FUSE fallback and
//! `--ovl-extract`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::read::Image;
use super::write::open_beneath;
use super::*;
use crate::engine::sys;
use crate::error::{Error, Result};

/// One name to create: its path relative to the destination and its inode.
struct Item {
    rel: Vec<u8>,
    ino: u32,
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut r = parent.to_vec();
    if !r.is_empty() {
        r.push(b'/');
    }
    r.extend_from_slice(name);
    r
}

/// Splits `rel` into its parent directory and last component.
fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(p) => (&rel[..p], &rel[p + 1..]),
        None => (&rel[..0], rel),
    }
}

fn cstr(b: &[u8]) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl Image {
    /// Extracts the tree into `dest`, an existing empty directory, with `threads` workers (0:
    /// one per CPU). Owners are applied only as root; xattrs the caller may not set (e.g.
    /// `trusted.*` for a normal user, `security.*` a host refuses) are skipped and counted in
    /// the result. Every block read is checked against its hash. Names that could leave
    /// `dest` (`..`, a `/`) and directory cycles are refused as corruption. On error `dest`
    /// holds a partial tree: callers extract into a temporary directory.
    pub fn extract_to(&self, dest: &Path, threads: usize) -> Result<usize> {
        let root = unsafe { libc::geteuid() } == 0;
        let destfd = sys::open_dir_path(dest)
            .and_then(|f| sys::reopen(f.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY))
            .map_err(|e| Error::io("opening", dest, e))?;
        let at = |rel: &[u8]| dest.join(super::write::bytes_path(rel));
        let bad = |what: String| Error::bad(dest, format!("corrupt image: {what}"));
        let ierr = |rel: &[u8], e: io::Error| Error::io("reading the image for", at(rel), e);

        // Directories first, breadth-first; other names collected.
        let mut dirs: Vec<Item> = vec![Item {
            rel: Vec::new(),
            ino: ROOT_INO,
        }];
        let mut seen_dirs = HashSet::from([ROOT_INO]);
        let mut items = Vec::new();
        let mut links = Vec::new();
        let mut first: HashMap<u32, usize> = HashMap::new();
        let mut queue = VecDeque::from([0usize]);
        while let Some(d) = queue.pop_front() {
            let (drel, dino) = (dirs[d].rel.clone(), dirs[d].ino);
            let pfd = open_beneath(destfd.as_fd(), &drel, libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(|e| Error::io("opening", at(&drel), e))?;
            for e in self.readdir(dino, 0).map_err(|e| ierr(&drel, e))? {
                let e = e.map_err(|e| ierr(&drel, e))?;
                if e.name.is_empty()
                    || e.name == b"."
                    || e.name == b".."
                    || e.name.contains(&b'/')
                    || e.name.contains(&0)
                {
                    return Err(bad(format!(
                        "an entry of {} has an invalid name",
                        at(&drel).display()
                    )));
                }
                let rel = join(&drel, e.name);
                let attr = self.getattr(e.ino).map_err(|err| ierr(&rel, err))?;
                if attr.is_dir() {
                    if !seen_dirs.insert(e.ino) {
                        return Err(bad(format!("{} is a directory twice", at(&rel).display())));
                    }
                    sys::mkdirat(pfd.as_fd(), &cstr(e.name).unwrap(), 0o700)
                        .map_err(|err| Error::io("creating", at(&rel), err))?;
                    dirs.push(Item { rel, ino: e.ino });
                    queue.push_back(dirs.len() - 1);
                } else {
                    match first.entry(e.ino) {
                        std::collections::hash_map::Entry::Occupied(_) => {
                            links.push(Item { rel, ino: e.ino })
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(items.len());
                            items.push(Item { rel, ino: e.ino });
                        }
                    }
                }
            }
        }

        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        };
        let skipped = AtomicUsize::new(0);
        let next = AtomicUsize::new(0);
        let failed = std::sync::Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.min(items.len()).max(1) {
                s.spawn(|| {
                    while failed.lock().unwrap().is_none() {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(it) = items.get(i) else { break };
                        if let Err(e) = self.extract_one(destfd.as_fd(), dest, it, root, &skipped) {
                            *failed.lock().unwrap() = Some(e);
                        }
                    }
                });
            }
        });
        if let Some(e) = failed.into_inner().unwrap() {
            return Err(e);
        }
        for l in &links {
            let src = cstr(&items[first[&l.ino]].rel).unwrap();
            let dst = cstr(&l.rel).unwrap();
            // Both paths are directories this extraction made, then the name.
            if unsafe {
                libc::linkat(
                    destfd.as_raw_fd(),
                    src.as_ptr(),
                    destfd.as_raw_fd(),
                    dst.as_ptr(),
                    0,
                )
            } < 0
            {
                return Err(Error::io("linking", at(&l.rel), io::Error::last_os_error()));
            }
        }
        // Directory metadata last, deepest first: creating entries changes a directory's mtime,
        // and a read-only directory would refuse its children.
        for d in dirs.iter().rev() {
            let fd = open_beneath(destfd.as_fd(), &d.rel, libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(|e| Error::io("opening", at(&d.rel), e))?;
            self.apply_meta(fd.as_fd(), None, d.ino, root, &skipped)
                .map_err(|e| Error::io("setting metadata of", at(&d.rel), e))?;
        }
        let n = skipped.into_inner();
        if n > 0 {
            log::warn!(
                "{}: {n} extended attribute(s) could not be set (e.g. trusted.* without root); \
                 extracted without them",
                dest.display()
            );
        }
        Ok(n)
    }

    fn extract_one(
        &self,
        destfd: BorrowedFd<'_>,
        dest: &Path,
        it: &Item,
        root: bool,
        skipped: &AtomicUsize,
    ) -> Result<()> {
        let path = dest.join(super::write::bytes_path(&it.rel));
        let err = |what, e| Error::io(what, &path, e);
        let (prel, name) = split(&it.rel);
        let pfd = open_beneath(destfd, prel, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| err("opening", e))?;
        let cname = cstr(name).map_err(|e| err("naming", e))?;
        let a = self
            .getattr(it.ino)
            .map_err(|e| err("reading the image for", e))?;
        let fmt = a.mode & libc::S_IFMT;
        let fd = match fmt {
            libc::S_IFREG => {
                let fd = sys::openat(
                    pfd.as_fd(),
                    &cname,
                    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                    0o600,
                )
                .map_err(|e| err("creating", e))?;
                let f = File::from(fd);
                self.copy_to(it.ino, &f).map_err(|e| err("extracting", e))?;
                f.into()
            }
            libc::S_IFLNK => {
                let t = self
                    .readlink(it.ino)
                    .map_err(|e| err("reading the image for", e))?;
                let t = cstr(t).map_err(|e| err("creating", e))?;
                sys::symlinkat(&t, pfd.as_fd(), &cname).map_err(|e| err("creating", e))?;
                sys::open_path(pfd.as_fd(), &cname).map_err(|e| err("opening", e))?
            }
            libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK => {
                sys::mknodat(pfd.as_fd(), &cname, fmt | 0o600, a.rdev)
                    .map_err(|e| err("creating", e))?;
                sys::open_path(pfd.as_fd(), &cname).map_err(|e| err("opening", e))?
            }
            _ => {
                return Err(Error::bad(
                    &path,
                    format!("corrupt image: unknown file type {:o}", a.mode),
                ));
            }
        };
        self.apply_meta(
            fd.as_fd(),
            Some((pfd.as_fd(), &cname)),
            it.ino,
            root,
            skipped,
        )
        .map_err(|e| err("setting metadata of", e))
    }

    /// Owner (root only), xattrs, mode, mtime of `ino` onto `fd`, in the order that keeps
    /// each: chown clears set-id bits, so chmod comes after it. Xattrs go through `entry`
    /// (parent, name) when given: the only way to reach a symlink's own.
    fn apply_meta(
        &self,
        fd: BorrowedFd<'_>,
        entry: Option<(BorrowedFd<'_>, &std::ffi::CStr)>,
        ino: u32,
        root: bool,
        skipped: &AtomicUsize,
    ) -> io::Result<()> {
        let a = self.getattr(ino)?;
        let symlink = a.mode & libc::S_IFMT == libc::S_IFLNK;
        if root {
            sys::fchown_fd(fd, a.uid, a.gid)?;
        }
        for (k, v) in self.xattrs(ino)? {
            if !packable_xattr(k) {
                continue;
            }
            let ck = cstr(k)?;
            let r = match entry {
                Some((dir, name)) => sys::lsetxattr_at(dir.as_raw_fd(), name, &ck, v, 0),
                None => sys::fsetxattr(fd.as_raw_fd(), &ck, v, 0),
            };
            if let Err(e) = r {
                let host_specific = k.starts_with(b"security.") || !root;
                match e.raw_os_error() {
                    Some(libc::EPERM | libc::EACCES | libc::ENOTSUP | libc::EINVAL)
                        if host_specific =>
                    {
                        skipped.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => return Err(e),
                }
            }
        }
        if !symlink {
            sys::fchmod_fd(fd, a.mode & 0o7777)?;
        }
        let t = libc::timespec {
            tv_sec: a.mtime,
            tv_nsec: a.mtime_nsec as _,
        };
        sys::futimens_fd(fd, &[t, t], symlink)
    }
}
