//! Lower layers of two kinds, behind one set of operations: a directory, reached through
//! `O_PATH` handles and the `*at` system calls, and an image ([`crate::image`]), read in place
//! (no extraction: lookups are binary searches in memory, contents are decompressed on demand).
//!
//! Lookup, readdir, attributes, xattrs, open and copy-up reach lower entries through a
//! [`Real`] handle and the [`LayerStack`] methods here, so an image lower behaves exactly as a
//! directory holding the same tree: whiteouts (char 0/0, `.wh.` markers), hard links, xattrs,
//! modes, owners and times. An image carries no overlay marks (the packer drops
//! `overlay.*` xattrs), so its directories are never opaque and have no redirects.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::engine::layers::{self, DirMarks, LayerStack, Redirect, WH_PREFIX};
use crate::engine::sys::{self, BorrowFd, RawDirent};
use crate::image::Image;

/// What a lower layer is made of, as given to [`LayerStack::open`].
#[derive(Clone, Debug)]
pub enum LowerSource {
    /// A directory tree.
    Dir(PathBuf),
    /// An image starting at byte `offset` of file `path` (0 for a bare image, the payload
    /// offset for an app.run bundle). `owner`: show every entry as owned by this uid/gid
    /// instead of the owners stored (a normal user's run shows the app as its own, as an
    /// extraction by that user would).
    Image {
        path: PathBuf,
        offset: u64,
        owner: Option<(u32, u32)>,
    },
    /// [`LowerSource::Image`] already opened (and its metadata checked) by the caller, who
    /// shares it instead of having it read and checked again: an app.run bundle opens its
    /// image to read the manifest's entry, then mounts it.
    Opened {
        image: Arc<Image>,
        /// The file it is read from (for messages and checks).
        path: PathBuf,
        owner: Option<(u32, u32)>,
    },
}

impl LowerSource {
    /// The directory or image file.
    pub fn path(&self) -> &std::path::Path {
        match self {
            LowerSource::Dir(p)
            | LowerSource::Image { path: p, .. }
            | LowerSource::Opened { path: p, .. } => p,
        }
    }

    /// Whether the layer is an image.
    pub fn is_image(&self) -> bool {
        !matches!(self, LowerSource::Dir(_))
    }

    /// Opens an image layer as lower `layer` (`None` for a directory).
    pub fn open_image(&self, layer: usize) -> io::Result<Option<ImageLayer>> {
        Ok(match self {
            LowerSource::Dir(_) => None,
            LowerSource::Image {
                path,
                offset,
                owner,
            } => Some(open_image(layer, path, *offset, *owner)?),
            LowerSource::Opened { image, owner, .. } => {
                Some(ImageLayer::new(image.clone(), layer, *owner))
            }
        })
    }
}

/// An open image layer.
#[derive(Debug)]
pub struct ImageLayer {
    pub image: Arc<Image>,
    /// The `st_dev` reported for its entries: unlike any real device (see [`image_dev`]).
    pub dev: u64,
    pub owner: Option<(u32, u32)>,
    /// A damaged block was reported (once per mount: every read of it fails the same way).
    damage_reported: std::sync::atomic::AtomicBool,
}

/// The `st_dev` of the entries of image layer `layer`. The inode store keys files by
/// (dev, ino), so it must differ from every real device and from other image layers: the
/// kernel's st_dev fits in 32 bits, so the top bit set never names a real one.
pub fn image_dev(layer: usize) -> u64 {
    (1 << 63) | layer as u64
}

/// Opens image layer `layer`.
pub fn open_image(
    layer: usize,
    path: &std::path::Path,
    offset: u64,
    owner: Option<(u32, u32)>,
) -> io::Result<ImageLayer> {
    let file = File::open(path)?;
    let image = Image::open(file, offset, crate::image::read::DEFAULT_CACHE)?;
    Ok(ImageLayer::new(Arc::new(image), layer, owner))
}

impl ImageLayer {
    fn new(image: Arc<Image>, layer: usize, owner: Option<(u32, u32)>) -> ImageLayer {
        ImageLayer {
            image,
            dev: image_dev(layer),
            owner,
            damage_reported: Default::default(),
        }
    }
}

/// The stat of an image inode, as a directory layer's fstat would give it.
pub fn image_stat(il: &ImageLayer, ino: u32) -> io::Result<libc::stat> {
    let a = il.image.getattr(ino)?;
    // SAFETY: stat is plain data; all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    st.st_dev = il.dev;
    st.st_ino = u64::from(ino);
    st.st_mode = a.mode;
    st.st_nlink = u64::from(a.nlink);
    (st.st_uid, st.st_gid) = il.owner.unwrap_or((a.uid, a.gid));
    st.st_rdev = a.rdev;
    st.st_size = a.size as i64;
    st.st_blksize = 4096;
    st.st_blocks = a.blocks as i64;
    st.st_mtime = a.mtime;
    st.st_mtime_nsec = i64::from(a.mtime_nsec);
    // The image keeps one time (as squashfs): atime and ctime read as the mtime.
    st.st_atime = a.mtime;
    st.st_atime_nsec = st.st_mtime_nsec;
    st.st_ctime = a.mtime;
    st.st_ctime_nsec = st.st_mtime_nsec;
    Ok(st)
}

/// getxattr of an image inode; `None` if it has no such attribute.
pub fn image_getxattr(il: &ImageLayer, ino: u32, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    match il.image.getxattr(ino, name.to_bytes()) {
        Ok(v) => Ok(Some(v.to_vec())),
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A handle on a real entry of a layer: an `O_PATH` descriptor (a directory layer or the
/// upper), or an inode of image layer `layer`. The same size as a descriptor in an `Option`.
#[derive(Debug)]
pub enum Real {
    Fd(OwnedFd),
    Img { layer: u16, ino: u32 },
}

/// A borrowed [`Real`].
#[derive(Clone, Copy, Debug)]
pub enum RealRef<'a> {
    Fd(BorrowedFd<'a>),
    Img { layer: u16, ino: u32 },
}

impl Real {
    pub fn r(&self) -> RealRef<'_> {
        match self {
            Real::Fd(fd) => RealRef::Fd(fd.as_fd_borrowed()),
            Real::Img { layer, ino } => RealRef::Img {
                layer: *layer,
                ino: *ino,
            },
        }
    }

    /// The descriptor, or `None` for an image entry.
    pub fn fd(&self) -> Option<&OwnedFd> {
        match self {
            Real::Fd(fd) => Some(fd),
            Real::Img { .. } => None,
        }
    }

    pub fn try_clone(&self) -> io::Result<Real> {
        Ok(match self {
            Real::Fd(fd) => Real::Fd(fd.try_clone()?),
            Real::Img { layer, ino } => Real::Img {
                layer: *layer,
                ino: *ino,
            },
        })
    }
}

impl<'a> From<BorrowedFd<'a>> for RealRef<'a> {
    fn from(fd: BorrowedFd<'a>) -> Self {
        RealRef::Fd(fd)
    }
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOENT)
}

impl LayerStack {
    /// The image of lower `layer` (EIO if it is a directory layer: a handle never mixes them).
    pub fn image(&self, layer: u16) -> io::Result<&ImageLayer> {
        self.lowers
            .get(usize::from(layer))
            .and_then(|l| l.image.as_deref())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))
    }

    /// The root of lower `layer`.
    pub fn lower_root(&self, layer: usize) -> io::Result<Real> {
        let l = &self.lowers[layer];
        match &l.image {
            Some(_) => Ok(Real::Img {
                layer: layer as u16,
                ino: crate::image::ROOT_INO,
            }),
            None => Ok(Real::Fd(sys::open_path(l.root.as_fd_borrowed(), c".")?)),
        }
    }

    fn image_stat(&self, layer: u16, ino: u32) -> io::Result<libc::stat> {
        image_stat(self.image(layer)?, ino)
    }

    /// getxattr of an image inode; `None` if it has no such attribute.
    fn image_getxattr(&self, layer: u16, ino: u32, name: &CStr) -> io::Result<Option<Vec<u8>>> {
        image_getxattr(self.image(layer)?, ino, name)
    }

    /// fstat of a handle.
    pub fn stat(&self, r: RealRef<'_>) -> io::Result<libc::stat> {
        match r {
            RealRef::Fd(fd) => sys::fstat(fd),
            RealRef::Img { layer, ino } => self.image_stat(layer, ino),
        }
    }

    /// The image inode of `name` in image directory `dir`, if there is one.
    fn image_child(&self, layer: u16, dir: u32, name: &[u8]) -> io::Result<Option<u32>> {
        match self.image(layer)?.image.lookup(dir, name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
            r => r,
        }
    }

    /// fstatat of `name` in directory `dir` (never following a symlink); `None` if absent.
    pub fn stat_at(&self, dir: RealRef<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
        match dir {
            RealRef::Fd(fd) => sys::fstatat_opt(fd, name),
            RealRef::Img { layer, ino } => match self.image_child(layer, ino, name.to_bytes())? {
                Some(c) => self.image_stat(layer, c).map(Some),
                None => Ok(None),
            },
        }
    }

    /// A handle on `name` in directory `dir` (`O_PATH`, never following a symlink);
    /// `directory`: it must be one (ENOTDIR otherwise).
    pub fn open_at(&self, dir: RealRef<'_>, name: &CStr, directory: bool) -> io::Result<Real> {
        match dir {
            RealRef::Fd(fd) => {
                let flags = if directory {
                    libc::O_PATH | libc::O_DIRECTORY
                } else {
                    libc::O_PATH
                };
                sys::openat(fd, name, flags, 0).map(Real::Fd)
            }
            RealRef::Img { layer, ino } => {
                let c = self
                    .image_child(layer, ino, name.to_bytes())?
                    .ok_or_else(enoent)?;
                if directory && !self.image(layer)?.image.getattr(c)?.is_dir() {
                    return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
                }
                Ok(Real::Img { layer, ino: c })
            }
        }
    }

    /// Every entry of a directory (no `.`, `..`).
    pub fn read_dir_of(&self, dir: RealRef<'_>) -> io::Result<Vec<RawDirent>> {
        match dir {
            RealRef::Fd(fd) => sys::read_dir(fd),
            RealRef::Img { layer, ino } => self
                .image(layer)?
                .image
                .readdir(ino, 0)?
                .map(|e| {
                    e.map(|e| RawDirent {
                        name: e.name.to_vec(),
                        dtype: e.dtype,
                    })
                })
                .collect(),
        }
    }

    /// The overlay marks of a lower directory (an image has none).
    pub fn marks(&self, dir: RealRef<'_>) -> io::Result<DirMarks> {
        match dir {
            RealRef::Fd(fd) => layers::dir_marks(fd),
            RealRef::Img { .. } => Ok(DirMarks::default()),
        }
    }

    /// The redirect of a lower directory (an image has none).
    pub fn redirect_of(&self, dir: RealRef<'_>) -> io::Result<Option<Redirect>> {
        match dir {
            RealRef::Fd(fd) => self.redirect(fd),
            RealRef::Img { .. } => Ok(None),
        }
    }

    /// Does `dir` hold an aufs-style `.wh.<name>` marker?
    pub fn has_wh_marker(&self, dir: RealRef<'_>, name: &OsStr) -> io::Result<bool> {
        match dir {
            RealRef::Fd(fd) => layers::has_aufs_whiteout(fd, name),
            RealRef::Img { layer, ino } => {
                let mut n = WH_PREFIX.to_vec();
                n.extend_from_slice(name.as_bytes());
                Ok(self.image_child(layer, ino, &n)?.is_some())
            }
        }
    }

    /// Is the empty regular file `name` in `dir` (stat `st`) an xattr whiteout? Only asked
    /// in directories marked for them, which an image never is.
    pub fn is_xattr_whiteout_at(
        &self,
        dir: RealRef<'_>,
        name: &CStr,
        st: &libc::stat,
    ) -> io::Result<bool> {
        match dir {
            RealRef::Fd(fd) => {
                let h = sys::open_path(fd, name)?;
                self.is_whiteout(st, h.as_fd_borrowed())
            }
            RealRef::Img { .. } => Ok(false),
        }
    }

    /// readlink of a handle.
    pub fn readlink_of(&self, r: RealRef<'_>) -> io::Result<Vec<u8>> {
        match r {
            RealRef::Fd(fd) => sys::readlink_fd(fd),
            RealRef::Img { layer, ino } => Ok(self.image(layer)?.image.readlink(ino)?.to_vec()),
        }
    }

    /// listxattr of a handle: the names, each followed by a NUL.
    pub fn listxattr_of(&self, r: RealRef<'_>) -> io::Result<Vec<u8>> {
        match r {
            RealRef::Fd(fd) => sys::flistxattr(fd.as_raw_fd()),
            RealRef::Img { layer, ino } => self.image(layer)?.image.listxattr(ino),
        }
    }

    /// getxattr of a handle; `None` if it has no such attribute.
    pub fn getxattr_of(&self, r: RealRef<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
        match r {
            RealRef::Fd(fd) => sys::fgetxattr(fd.as_raw_fd(), name),
            RealRef::Img { layer, ino } => self.image_getxattr(layer, ino, name),
        }
    }

    /// Reads from regular file `ino` of image layer `layer` at `offset`.
    pub fn image_read(&self, layer: u16, ino: u32, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let img = &self.image(layer)?.image;
        // The kernel asks for whole readahead windows: no buffer beyond the file's end.
        let left = img.getattr(ino)?.size.saturating_sub(offset);
        let mut buf = vec![0u8; left.min(u64::from(size)) as usize];
        let n = img
            .read(ino, offset, &mut buf)
            .map_err(|e| self.image_failed(layer, e))?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Copies regular file `ino` of image layer `layer` into the empty file `out`.
    pub fn image_copy_to(&self, layer: u16, ino: u32, out: &File) -> io::Result<()> {
        self.image(layer)?
            .image
            .copy_to(ino, out)
            .map_err(|e| self.image_failed(layer, e))
    }

    /// A read of an image failed: a damaged block (its hash differs) is said once on stderr,
    /// naming the file, as the user must know why the app sees EIO; other errors go to the
    /// caller only.
    fn image_failed(&self, layer: u16, e: io::Error) -> io::Error {
        use std::sync::atomic::Ordering;
        if e.kind() == io::ErrorKind::InvalidData {
            if let Ok(il) = self.image(layer) {
                if !il.damage_reported.swap(true, Ordering::Relaxed) {
                    log::error!(
                        "{}: {e}: reads of the damaged part fail with EIO (get an intact \
                         copy of the file)",
                        self.lowers[usize::from(layer)].path.display()
                    );
                }
            }
        }
        io::Error::from_raw_os_error(crate::image::read::errno(&e))
    }

    /// Whether any lower layer is an image.
    pub fn has_image(&self) -> bool {
        self.lowers.iter().any(|l| l.image.is_some())
    }
}
