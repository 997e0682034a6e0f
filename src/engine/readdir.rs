//! Readdir: the merged listing of a directory across its layers.
//!
//! A listing is taken once when the directory is opened (and again on rewind to offset 0) and
//! served from that snapshot, so offsets are stable indexes: telldir/seekdir work, and entries
//! created or removed during a listing never make it skip or repeat a surviving entry.

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStringExt;
use std::sync::Arc;

use fuser::FileType;

use crate::engine::file::OpenDir;
use crate::engine::inode::Inode;
use crate::engine::layers::{OPAQUE_MARKER, WH_PREFIX};
use crate::engine::lower::RealRef;
use crate::engine::overlay::{OpResult, Overlay, errno, kind_of};
use crate::engine::sys::{self, BorrowFd};

/// One visible entry of a merged directory.
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: OsString,
    pub kind: FileType,
}

fn kind_of_dtype(dtype: u8) -> Option<FileType> {
    Some(match dtype {
        libc::DT_DIR => FileType::Directory,
        libc::DT_REG => FileType::RegularFile,
        libc::DT_LNK => FileType::Symlink,
        libc::DT_FIFO => FileType::NamedPipe,
        libc::DT_SOCK => FileType::Socket,
        libc::DT_CHR => FileType::CharDevice,
        libc::DT_BLK => FileType::BlockDevice,
        _ => return None,
    })
}

impl Overlay {
    /// Lists the visible entries of a merged directory (no `.`/`..`): upper first, then each
    /// merged lower; whiteouts and `.wh.` markers hide names of the layers below them.
    pub fn merged_entries(&self, dir: &Inode) -> OpResult<Vec<DirEntry>> {
        if !dir.is_dir() {
            return Err(errno(libc::ENOTDIR));
        }
        let st = dir.read();
        // Each layer directory with its `opaque=x` mark, as read when the directory was
        // looked up: xattr whiteouts count only where it is set.
        let mut layer_dirs = Vec::with_capacity(1 + st.lowers.len());
        if let Some(u) = &st.upper {
            layer_dirs.push((RealRef::Fd(u.as_fd_borrowed()), st.upper_xwh, true));
        }
        for l in &st.lowers {
            layer_dirs.push((l.dir.r(), l.xwhiteouts, false));
        }
        let last = layer_dirs.len().saturating_sub(1);
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut out = Vec::new();
        for (i, &(d, xwhiteouts, is_upper)) in layer_dirs.iter().enumerate() {
            let below = i < last;
            let mut markers = false;
            for e in self.layers.read_dir_of(d)? {
                if e.name.starts_with(WH_PREFIX) {
                    markers = true;
                    if below && e.name.as_slice() != OPAQUE_MARKER.to_bytes() {
                        seen.insert(e.name[WH_PREFIX.len()..].to_vec());
                    }
                    continue;
                }
                if seen.contains(&e.name) {
                    continue;
                }
                let cname = CString::new(e.name.clone()).map_err(|_| errno(libc::EINVAL))?;
                let mut kind = kind_of_dtype(e.dtype);
                let check_whiteout = match kind {
                    None => true,
                    Some(FileType::CharDevice) => true,
                    Some(FileType::RegularFile) => xwhiteouts,
                    _ => false,
                };
                if check_whiteout {
                    let Some(stat) = self.layers.stat_at(d, &cname)? else {
                        continue;
                    };
                    kind = Some(kind_of(stat.st_mode));
                    // The stat decides, except for an empty file where xattr whiteouts count.
                    let whiteout = sys::is_whiteout_dev(&stat)
                        || (xwhiteouts
                            && stat.st_mode & libc::S_IFMT == libc::S_IFREG
                            && stat.st_size == 0
                            && self.layers.is_xattr_whiteout_at(d, &cname, &stat)?);
                    if whiteout {
                        if below {
                            seen.insert(e.name);
                        }
                        continue;
                    }
                }
                if below {
                    seen.insert(e.name.clone());
                }
                out.push(DirEntry {
                    name: OsString::from_vec(e.name),
                    kind: kind.unwrap_or(FileType::RegularFile),
                });
            }
            if is_upper && !markers {
                // Lookups of absent names here can skip the `.wh.<name>` check.
                st.set_upper_wh_free(self.layers.whiteout_dev);
            }
        }
        Ok(out)
    }

    /// Is the merged directory empty (only whiteouts left)? Used by rmdir and rename.
    pub fn is_empty_dir(&self, dir: &Inode) -> OpResult<bool> {
        Ok(self.merged_entries(dir)?.is_empty())
    }
}

impl Overlay {
    /// The listing snapshot of an open directory: taken on the first read and again on a
    /// read from offset 0 (rewinddir), so a rewound listing sees changes.
    fn snapshot(&self, fh: u64, offset: u64) -> OpResult<(Arc<OpenDir>, Arc<Vec<DirEntry>>)> {
        let d = self.files.dir(fh)?;
        let mut g = d.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entries = match (&*g, offset) {
            (Some(e), o) if o != 0 => e.clone(),
            _ => {
                let e = Arc::new(self.merged_entries(&d.inode)?);
                *g = Some(e.clone());
                e
            }
        };
        drop(g);
        Ok((d, entries))
    }

    fn parent_of(dir: &Arc<Inode>) -> Arc<Inode> {
        dir.read().parent.clone().unwrap_or_else(|| dir.clone())
    }

    /// Plain readdir. Offsets: 0 is `.`, 1 is `..`, 2 + i is entry i; each entry carries the
    /// offset of the next. The kernel uses readdirplus whenever it can (we ask for it at init),
    /// so this path only serves kernels without it; its d_ino comes from a lookup.
    pub fn readdir_entries(
        &self,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> OpResult<()> {
        let (d, entries) = self.snapshot(fh, offset)?;
        let total = entries.len() as u64 + 2;
        for idx in offset..total {
            let full = match idx {
                0 => add(d.inode.ino, 1, FileType::Directory, OsStr::new(".")),
                1 => add(
                    Self::parent_of(&d.inode).ino,
                    2,
                    FileType::Directory,
                    OsStr::new(".."),
                ),
                _ => {
                    let e = &entries[(idx - 2) as usize];
                    let ino = match self.lookup_in(&d.inode, &e.name) {
                        Ok((inode, _)) => {
                            self.inodes.forget(inode.ino, 1);
                            inode.ino
                        }
                        Err(_) => continue,
                    };
                    add(ino, idx + 1, e.kind, &e.name)
                }
            };
            if full {
                break;
            }
        }
        Ok(())
    }

    /// Readdirplus: like readdir, with each entry looked up (the kernel takes a lookup
    /// reference on every entry it receives, except `.` and `..`).
    pub fn readdirplus_entries(
        &self,
        fh: u64,
        offset: u64,
        add: &mut dyn FnMut(u64, &OsStr, &fuser::FileAttr) -> bool,
    ) -> OpResult<()> {
        let (d, entries) = self.snapshot(fh, offset)?;
        let total = entries.len() as u64 + 2;
        for idx in offset..total {
            let full = match idx {
                0 => add(1, OsStr::new("."), &self.stat_inode(&d.inode)?),
                1 => add(
                    2,
                    OsStr::new(".."),
                    &self.stat_inode(&Self::parent_of(&d.inode))?,
                ),
                _ => {
                    let e = &entries[(idx - 2) as usize];
                    let (inode, attr) = match self.lookup_in(&d.inode, &e.name) {
                        Ok(x) => x,
                        // Removed since the snapshot: a listing does not show the dead.
                        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => continue,
                        Err(err) => return Err(err),
                    };
                    let full = add(idx + 1, &e.name, &attr);
                    if full {
                        self.inodes.forget(inode.ino, 1);
                    }
                    full
                }
            };
            if full {
                break;
            }
        }
        Ok(())
    }
}
