//! The layer stack: the read-only lowers, the optional upper, and the private work directory.
//!
//! This module owns the on-disk format: which entries are whiteouts, which directories are
//! opaque, and which xattr names are the overlay's own. The format is kernel overlayfs's, so an
//! upper written here mounts with the kernel or fuse-overlayfs, and the other way round.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::lower::{ImageLayer, LowerSource};
use crate::engine::sys::{self, BorrowFd};

/// Prefix of whiteout marker files (the aufs-style format fuse-overlayfs also reads).
pub const WH_PREFIX: &[u8] = b".wh.";
/// Marker file that makes its directory opaque (aufs-style).
pub const OPAQUE_MARKER: &CStr = c".wh..wh..opq";

/// Xattr namespaces whose `overlay.*` names are the overlay's own.
const TRUSTED_OVL: &[u8] = b"trusted.overlay.";
const USER_OVL: &[u8] = b"user.overlay.";

/// True for xattr names that belong to the overlay and are never shown to or set by users.
pub fn is_private_xattr(name: &[u8]) -> bool {
    name.starts_with(TRUSTED_OVL) || name.starts_with(USER_OVL)
}

/// True for names reserved by the whiteout format (`.wh.*`).
pub fn is_reserved_name(name: &OsStr) -> bool {
    name.as_bytes().starts_with(WH_PREFIX)
}

/// One read-only layer (or the upper): a directory handle held for the whole mount.
#[derive(Debug)]
pub struct Layer {
    /// The directory as given by the user.
    pub path: PathBuf,
    /// `O_PATH` handle on the layer root; all access goes through it.
    pub root: OwnedFd,
    /// `st_dev` of the layer root.
    pub dev: u64,
    /// An image layer: the image (`root` is then a handle on the image file, not a
    /// directory: every access goes through [`crate::engine::lower`]).
    pub image: Option<Box<ImageLayer>>,
}

impl Layer {
    fn open(path: &Path) -> io::Result<Layer> {
        Self::with_root(path, crate::engine::private_mount::open_layer_dir(path)?)
    }

    fn with_root(path: &Path, root: OwnedFd) -> io::Result<Layer> {
        let st = sys::fstat(root.as_fd_borrowed())?;
        Ok(Layer {
            path: path.to_path_buf(),
            root,
            dev: st.st_dev,
            image: None,
        })
    }

    fn open_source(layer: usize, src: &LowerSource) -> io::Result<Layer> {
        match src.open_image(layer)? {
            None => Self::open(src.path()),
            Some(img) => Ok(Layer {
                path: src.path().to_path_buf(),
                root: OwnedFd::from(std::fs::File::open(src.path())?),
                dev: img.dev,
                image: Some(Box::new(img)),
            }),
        }
    }
}

/// All layers of one mount. Owned by the overlay for the mount's lifetime.
#[derive(Debug)]
pub struct LayerStack {
    /// Lower layers, topmost first.
    pub lowers: Vec<Layer>,
    /// The writable layer, if any (none: a read-only mount).
    pub upper: Option<Layer>,
    /// `O_PATH` handle on the temporaries directory inside the work dir (same filesystem as
    /// upper), where copy-ups and replacements are prepared before an atomic rename.
    work: Option<OwnedFd>,
    /// `O_PATH` handle on the hard-link index inside the work dir: one link per copied-up
    /// lower file that has several names, named after its lower layer and inode, so every
    /// other name of it is linked to the same copy (now or at its first lookup, also in a
    /// later mount). Kept across mounts, unlike the temporaries.
    index: Option<OwnedFd>,
    /// Counter for temporary names in the work dir; unique within this mount, and the work dir
    /// is emptied at mount time, so names never collide with leftovers of an earlier crash.
    tmp_seq: AtomicU64,
    /// The xattr namespace the overlay writes its own markers in: `trusted.` as root (what the
    /// kernel reads by default), `user.` otherwise (the kernel's `userxattr` option).
    pub xattr_prefix: &'static str,
    /// Whether mknod of a char 0/0 whiteout works on the upper (else `.wh.` files are written).
    pub whiteout_dev: bool,
}

/// Name of the temporaries directory inside the work dir (the kernel uses `work/work`).
const WORK_TMP: &CStr = c"ovl-tmp";
/// Name of the hard-link index inside the work dir (not the kernel's `index`, whose names are
/// file handles: the kernel would take ours for stale entries).
const INDEX_DIR: &CStr = c"ovl-index";

impl LayerStack {
    /// Opens every layer. `work` must be on the upper's filesystem; it is created if missing
    /// and its temporaries directory is cleared of leftovers from an earlier crash.
    pub fn open(
        lowers: &[LowerSource],
        upper: Option<&Path>,
        work: Option<&Path>,
    ) -> io::Result<Self> {
        let lowers = lowers
            .iter()
            .enumerate()
            .map(|(i, src)| Layer::open_source(i, src))
            .collect::<io::Result<Vec<_>>>()?;
        if lowers.len() > usize::from(u16::MAX) {
            // Inodes record their lower layer in 16 bits.
            return Err(io::Error::other(
                "too many lower directories (at most 65535)",
            ));
        }
        // Upper and work in one private mount: renames between them must stay on one mount.
        let (upper, mut wdir) = match (upper, work) {
            (Some(u), Some(w)) => {
                let (ufd, wfd) = crate::engine::private_mount::open_upper_work(u, w)?;
                (Some(Layer::with_root(u, ufd)?), Some(wfd))
            }
            (u, _) => (u.map(Layer::open).transpose()?, None),
        };
        // trusted.* needs root of the initial user namespace (not root of a user namespace,
        // as in an `ovl-run --root` session of a normal user).
        let root = crate::engine::session::initial_userns_root();
        let mut stack = LayerStack {
            lowers,
            upper,
            work: None,
            index: None,
            tmp_seq: AtomicU64::new(0),
            xattr_prefix: if root { "trusted." } else { "user." },
            whiteout_dev: true,
        };
        if let (Some(upper), Some(work), Some(wdir)) = (&stack.upper, work, wdir.take()) {
            let wst = sys::fstat(wdir.as_fd_borrowed())?;
            if wst.st_dev != upper.dev {
                return Err(io::Error::other(format!(
                    "work directory {} is not on the same filesystem as upper directory {}",
                    work.display(),
                    upper.path.display()
                )));
            }
            // Leftovers are incomplete copy-ups or replaced entries awaiting removal: by design
            // nothing live is ever only in the work dir, so clearing it loses nothing.
            sys::remove_tree(wdir.as_fd_borrowed(), WORK_TMP)?;
            sys::mkdirat(wdir.as_fd_borrowed(), WORK_TMP, 0o700)?;
            let tmp = sys::open_path(wdir.as_fd_borrowed(), WORK_TMP)?;
            stack.work = Some(tmp);
            match sys::mkdirat(wdir.as_fd_borrowed(), INDEX_DIR, 0o700) {
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
                _ => {}
            }
            stack.index = Some(sys::open_path(wdir.as_fd_borrowed(), INDEX_DIR)?);
            stack.whiteout_dev = stack.probe_whiteout();
        }
        Ok(stack)
    }

    /// Tries to create a char 0/0 whiteout in the work dir.
    fn probe_whiteout(&self) -> bool {
        let Some(work) = &self.work else { return false };
        let name = self.tmp_name();
        let ok = sys::mknodat(work.as_fd_borrowed(), &name, libc::S_IFCHR, 0).is_ok();
        if ok {
            let _ = sys::unlinkat(work.as_fd_borrowed(), &name, 0);
        }
        ok
    }

    /// The work temporaries directory. Only valid when there is an upper.
    pub fn work(&self) -> io::Result<BorrowedFd<'_>> {
        self.work
            .as_ref()
            .map(|w| w.as_fd_borrowed())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EROFS))
    }

    /// A fresh temporary name for the work dir.
    pub fn tmp_name(&self) -> CString {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        CString::new(format!("t{n:x}")).expect("no NUL")
    }

    /// The hard-link index directory, if the mount is writable.
    pub fn index(&self) -> Option<BorrowedFd<'_>> {
        self.index.as_ref().map(|i| i.as_fd_borrowed())
    }

    /// Index entry name of the lower file `ino` in lower layer `layer`.
    pub fn index_name(layer: usize, ino: u64) -> CString {
        CString::new(format!("L{layer}-{ino:x}")).expect("no NUL")
    }

    /// The upper copy of a hard-linked lower file, if one was made.
    pub fn index_lookup(&self, layer: usize, ino: u64) -> io::Result<Option<OwnedFd>> {
        let Some(index) = self.index() else {
            return Ok(None);
        };
        match sys::open_path(index, &Self::index_name(layer, ino)) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The upper layer, or EROFS for a read-only mount.
    pub fn upper(&self) -> io::Result<&Layer> {
        self.upper
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EROFS))
    }

    /// Full name of one of the overlay's own xattrs in the namespace this mount writes.
    pub fn ovl_xattr(&self, what: &str) -> CString {
        CString::new(format!("{}overlay.{what}", self.xattr_prefix)).expect("no NUL")
    }

    /// See [`is_opaque_dir`].
    pub fn is_opaque_dir(&self, fd: BorrowedFd<'_>) -> io::Result<bool> {
        is_opaque_dir(fd)
    }

    /// See [`is_whiteout`].
    pub fn is_whiteout(&self, st: &libc::stat, fd: BorrowedFd<'_>) -> io::Result<bool> {
        is_whiteout(st, fd)
    }

    /// Marks a directory (in the upper) opaque.
    pub fn set_opaque(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        sys::fsetxattr(fd.as_raw_fd(), &self.ovl_xattr("opaque"), b"y", 0)
    }

    /// Creates a whiteout named `name` in `dir` (char 0/0, or a `.wh.` file where mknod is
    /// refused). Used on temporaries in the work dir, which are then renamed into place.
    pub fn make_whiteout(&self, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        sys::mknodat(dir, name, libc::S_IFCHR, 0)
    }
}

/// Where a directory's lower content is, per its `overlay.redirect` xattr (the kernel's
/// redirect_dir format): instead of its own name, the lower layers are searched at another
/// name in the parent's lower directories, or at a path from the lower layers' roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// A name (no `/`), looked up in the parent's lower directories.
    Relative(CString),
    /// Components of a path from the root of each lower layer (stored with a leading `/`).
    Absolute(Vec<CString>),
}

impl Redirect {
    /// Parses an xattr value as the kernel does: absolute values start with `/` and have no
    /// empty component; relative ones hold no `/`. `.` and `..` are refused too (a lookup
    /// of them would leave the directory it names). `None`: not a valid redirect.
    pub fn parse(v: &[u8]) -> Option<Redirect> {
        let ok = |c: &[u8]| !c.is_empty() && c != b"." && c != b".." && !c.contains(&0);
        if let Some(rest) = v.strip_prefix(b"/") {
            let comps: Vec<&[u8]> = rest.split(|&b| b == b'/').collect();
            if !comps.iter().all(|c| ok(c)) {
                return None;
            }
            Some(Redirect::Absolute(
                comps
                    .into_iter()
                    .map(|c| CString::new(c).expect("checked"))
                    .collect(),
            ))
        } else if ok(v) && !v.contains(&b'/') {
            Some(Redirect::Relative(CString::new(v).expect("checked")))
        } else {
            None
        }
    }

    /// The xattr value.
    pub fn value(&self) -> Vec<u8> {
        match self {
            Redirect::Relative(n) => n.to_bytes().to_vec(),
            Redirect::Absolute(c) => {
                let mut v = Vec::new();
                for x in c {
                    v.push(b'/');
                    v.extend_from_slice(x.to_bytes());
                }
                v
            }
        }
    }
}

impl LayerStack {
    /// The redirect of a layer directory, read in the namespace this mount writes (the
    /// kernel, too, reads only its own: a `user.` redirect written by an unprivileged user
    /// could otherwise reach lower directories a privileged mount hides from them).
    /// A malformed value is an error (EINVAL), as in the kernel.
    pub fn redirect(&self, fd: BorrowedFd<'_>) -> io::Result<Option<Redirect>> {
        read_redirect(fd, self.xattr_prefix)
    }

    /// Sets a directory's redirect (in the upper).
    pub fn set_redirect(&self, fd: BorrowedFd<'_>, r: &Redirect) -> io::Result<()> {
        sys::fsetxattr(fd.as_raw_fd(), &self.ovl_xattr("redirect"), &r.value(), 0)
    }
}

/// Reads `<prefix>overlay.redirect` of a layer directory (see [`LayerStack::redirect`]).
pub fn read_redirect(fd: BorrowedFd<'_>, prefix: &str) -> io::Result<Option<Redirect>> {
    let name = CString::new(format!("{prefix}overlay.redirect")).expect("no NUL");
    let v = match sys::fgetxattr(fd.as_raw_fd(), &name) {
        // A directory we may not read (another user's, mode 0700): its xattrs are unreadable
        // to us, and so is anything a redirect of it could lead to.
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => return Ok(None),
        r => r?,
    };
    match v {
        None => Ok(None),
        Some(v) => match Redirect::parse(&v) {
            Some(r) => Ok(Some(r)),
            None => {
                log::warn!("invalid overlay.redirect {:?}", String::from_utf8_lossy(&v));
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            }
        },
    }
}

/// Builds the aufs-style whiteout marker name for `name`.
pub fn wh_name(name: &OsStr) -> io::Result<CString> {
    let mut v = WH_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    CString::new(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Does `dir` hold an aufs-style `.wh.<name>` marker? A name too long to carry the prefix
/// cannot have one.
pub fn has_aufs_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    if name.len() + WH_PREFIX.len() > crate::engine::overlay::NAME_MAX {
        return Ok(false);
    }
    Ok(sys::fstatat_opt(dir, &wh_name(name)?)?.is_some())
}

/// Removes the `.wh.<name>` marker, if any: an entry now exists above it.
pub fn remove_aufs_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    if has_aufs_whiteout(dir, name)? {
        sys::unlinkat(dir, &wh_name(name)?, 0)?;
    }
    Ok(())
}

/// Is the directory behind `fd` opaque (hides the layers below)? Reads both xattr
/// namespaces and the aufs-style marker file, as every overlay writer uses one of them.
pub fn is_opaque_dir(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(dir_marks(fd)?.opaque)
}

/// What a layer directory's `overlay.opaque` xattr (or marker file) says about it.
#[derive(Clone, Copy, Debug, Default)]
pub struct DirMarks {
    /// `y` or the `.wh..wh..opq` marker: the layers below are hidden here.
    pub opaque: bool,
    /// `x`: entries here may be xattr whiteouts (the kernel only honours those in directories
    /// so marked, which spares checking every empty file elsewhere).
    pub xwhiteouts: bool,
}

/// Reads one of the overlay's marks (`trusted.overlay.*` or `user.overlay.*`) on a layer entry.
/// A mark this process may not read counts as absent, as in the kernel's overlay: `user.`
/// xattrs need read permission, so a normal user's lookup of another user's 0700 directory
/// gets EACCES, and that directory must still be listed and stat'ed like on the host.
pub fn read_mark(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    match sys::fgetxattr(fd.as_raw_fd(), name) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)) => Ok(None),
        r => r,
    }
}

/// Reads the marks of a layer directory.
pub fn dir_marks(fd: BorrowedFd<'_>) -> io::Result<DirMarks> {
    let mut m = DirMarks::default();
    for name in [c"trusted.overlay.opaque", c"user.overlay.opaque"] {
        match read_mark(fd, name)?.as_deref() {
            Some(b"y") => m.opaque = true,
            Some(b"x") => m.xwhiteouts = true,
            _ => {}
        }
    }
    if !m.opaque {
        // A directory this process may not search cannot show the marker (nor anything else).
        m.opaque = match sys::fstatat_opt(fd, OPAQUE_MARKER) {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => false,
            r => r?.is_some(),
        };
    }
    Ok(m)
}

/// Like [`is_whiteout`], with xattr whiteouts honoured only where `xwhiteouts` says so.
pub fn is_whiteout_in(st: &libc::stat, fd: BorrowedFd<'_>, xwhiteouts: bool) -> io::Result<bool> {
    if sys::is_whiteout_dev(st) {
        return Ok(true);
    }
    if !xwhiteouts {
        return Ok(false);
    }
    is_whiteout(st, fd)
}

/// Is the entry with stat `st` (handle `fd`) a whiteout? Char 0/0, or an empty regular file
/// carrying an `overlay.whiteout` xattr (the kernel's xattr whiteouts).
pub fn is_whiteout(st: &libc::stat, fd: BorrowedFd<'_>) -> io::Result<bool> {
    if sys::is_whiteout_dev(st) {
        return Ok(true);
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size == 0 {
        for name in [c"trusted.overlay.whiteout", c"user.overlay.whiteout"] {
            if read_mark(fd, name)?.is_some() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}
