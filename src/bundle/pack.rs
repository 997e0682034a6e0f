//! Building a bundle: the runtime, then the tree's distinct contents compressed, then the
//! manifest and the trailer (see [`super::format`]).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::format::{Blob, Entry, Kind, Manifest, Trailer, check_name, check_path};
use crate::OverlayAction;
use crate::error::{Error, Result};

/// What to put in the manifest and how hard to compress.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// Bundle name (default: the tree directory's name).
    pub name: Option<String>,
    /// Entry point relative to the tree (default: `AppRun`).
    pub entry: Option<String>,
    /// Default finalization.
    pub on_exit: OverlayAction,
    /// zstd level (1-22).
    pub level: i32,
    /// Compression threads (0: one per CPU).
    pub threads: usize,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            name: None,
            entry: None,
            on_exit: OverlayAction::Preserve,
            level: 9,
            threads: 0,
        }
    }
}

/// Numbers about a built bundle.
#[derive(Clone, Debug, Default)]
pub struct PackSummary {
    pub id: String,
    pub entries: usize,
    pub blobs: usize,
    /// Sum of the distinct contents' sizes.
    pub data_bytes: u64,
    /// The bundle file's size.
    pub bundle_bytes: u64,
}

/// Private xattrs of an overlay describe layer structure, never content, and SELinux labels
/// belong to the host's policy: neither is packed (nor extracted from a crafted bundle).
pub(crate) fn packable_xattr(name: &[u8]) -> bool {
    !(name.starts_with(b"trusted.overlay.")
        || name.starts_with(b"user.overlay.")
        || name == b"security.selinux")
}

/// The packable xattrs of `path` (not following a symlink), sorted by name.
pub(crate) fn read_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut xattrs = Vec::new();
    let names = xattr::list(path).map_err(|e| Error::io("listing xattrs of", path, e))?;
    for n in names {
        let nb = n.as_bytes();
        if !packable_xattr(nb) {
            continue;
        }
        if let Some(v) = xattr::get(path, &n).map_err(|e| Error::io("reading", path, e))? {
            xattrs.push((nb.to_vec(), v));
        }
    }
    xattrs.sort();
    Ok(xattrs)
}

/// Reads the tree into manifest entries (parents first, names sorted bytewise) plus, per
/// regular file entry that owns content, its path. Special files are refused: a bundle
/// carries programs and data, and device nodes would not extract for a normal user.
/// Regular files that own content: (entry index, path).
type ContentFiles = Vec<(usize, PathBuf)>;

fn scan(root: &Path) -> Result<(Vec<Entry>, ContentFiles)> {
    let mut entries = Vec::new();
    let mut files = Vec::new();
    let mut inodes: HashMap<(u64, u64), u32> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), Vec::new())];
    while let Some((path, rel)) = stack.pop() {
        let md = fs::symlink_metadata(&path).map_err(|e| Error::io("reading", &path, e))?;
        let ft = md.file_type();
        let xattrs = read_xattrs(&path)?;
        let kind = if ft.is_dir() {
            let mut children: Vec<_> = fs::read_dir(&path)
                .map_err(|e| Error::io("reading", &path, e))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()
                .map_err(|e| Error::io("reading", &path, e))?;
            // Reverse order on the stack pops them sorted: a deterministic walk.
            children.sort_by(|a, b| b.as_bytes().cmp(a.as_bytes()));
            for c in children {
                let mut r = rel.clone();
                if !r.is_empty() {
                    r.push(b'/');
                }
                r.extend_from_slice(c.as_bytes());
                stack.push((path.join(&c), r));
            }
            Kind::Dir
        } else if ft.is_file() {
            let key = (md.dev(), md.ino());
            match inodes.get(&key) {
                Some(&to) if md.nlink() > 1 => Kind::HardLink { to },
                _ => {
                    inodes.insert(key, entries.len() as u32);
                    if md.len() > 0 {
                        files.push((entries.len(), path.clone()));
                    }
                    Kind::File { blob: None }
                }
            }
        } else if ft.is_symlink() {
            let t = fs::read_link(&path).map_err(|e| Error::io("reading", &path, e))?;
            Kind::Symlink {
                target: t.as_os_str().as_bytes().to_vec(),
            }
        } else {
            let what = if ft.is_fifo() {
                "a FIFO"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "a device node"
            };
            return Err(Error::bad(
                &path,
                format!("is {what}, which a bundle cannot carry: remove it from the tree"),
            ));
        };
        entries.push(Entry {
            path: rel,
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            mtime_nsec: md.mtime_nsec() as u32,
            xattrs,
        });
    }
    Ok((entries, files))
}

/// One file read and compressed: its content hash, size and compressed bytes.
struct Compressed {
    hash: [u8; 32],
    len: u64,
    data: Vec<u8>,
}

fn compress_file(path: &Path, level: i32) -> Result<Compressed> {
    let mut f = File::open(path).map_err(|e| Error::io("reading", path, e))?;
    let mut hasher = blake3::Hasher::new();
    let mut enc = zstd::stream::Encoder::new(Vec::new(), level)
        .map_err(|e| Error::io("compressing", path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        enc.write_all(&buf[..n])
            .map_err(|e| Error::io("compressing", path, e))?;
        len += n as u64;
    }
    let data = enc
        .finish()
        .map_err(|e| Error::io("compressing", path, e))?;
    Ok(Compressed {
        hash: *hasher.finalize().as_bytes(),
        len,
        data,
    })
}

/// Writes that also hash and count.
struct HashingWriter<W> {
    inner: W,
    hasher: blake3::Hasher,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.inner.write_all(b)?;
        self.hasher.update(b);
        self.written += b.len() as u64;
        Ok(())
    }
}

/// Builds `out` from `runtime` (the launcher's bytes) and the tree at `appdir`. The file is
/// written beside `out` under a temporary name, synced, and renamed into place, so `out` is
/// never half-written (it may be the bundle that is running).
///
/// ```no_run
/// let runtime = std::fs::read("ovl-runtime")?;
/// let s = ovl::bundle::pack(std::path::Path::new("MyApp.AppDir"), &runtime,
///                           std::path::Path::new("myapp.run"), &Default::default())?;
/// println!("bundle id {}", s.id);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn pack(appdir: &Path, runtime: &[u8], out: &Path, opts: &PackOptions) -> Result<PackSummary> {
    pack_unplaced(appdir, runtime, out, opts)?.place()
}

/// A bundle written and synced under a temporary name beside its destination; removed
/// unless [`Packed::place`] renames it into place.
#[derive(Debug)]
pub struct Packed {
    tmp: PathBuf,
    out: PathBuf,
    pub summary: PackSummary,
    placed: bool,
}

impl Packed {
    /// Gives the new file a mode, and as root an owner (a commit keeps the old file's).
    pub fn set_mode_owner(&self, mode: u32, uid: u32, gid: u32) -> Result<()> {
        let c = crate::engine::sys::cstr(self.tmp.as_os_str())
            .map_err(|e| Error::io("naming", &self.tmp, e))?;
        if unsafe { libc::geteuid() } == 0 && unsafe { libc::lchown(c.as_ptr(), uid, gid) } < 0 {
            return Err(Error::io("chown", &self.tmp, io::Error::last_os_error()));
        }
        fs::set_permissions(&self.tmp, fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io("chmod", &self.tmp, e))
    }

    /// Renames the bundle over its destination in one step and syncs the directory.
    pub fn place(mut self) -> Result<PackSummary> {
        fs::rename(&self.tmp, &self.out)
            .map_err(|e| Error::io("renaming into place", &self.out, e))?;
        self.placed = true;
        let dir = self
            .out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(self.summary.clone())
    }
}

impl Drop for Packed {
    fn drop(&mut self) {
        if !self.placed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Like [`pack`], but leaves the synced bundle under its temporary name (a commit records
/// the new id before the rename).
pub fn pack_unplaced(
    appdir: &Path,
    runtime: &[u8],
    out: &Path,
    opts: &PackOptions,
) -> Result<Packed> {
    // A symlink to the tree packs the tree.
    let appdir = &appdir
        .canonicalize()
        .map_err(|e| Error::io("reading", appdir, e))?;
    let md = fs::metadata(appdir).map_err(|e| Error::io("reading", appdir, e))?;
    if !md.is_dir() {
        return Err(Error::bad(
            appdir,
            "is not a directory: give the app's tree",
        ));
    }
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => appdir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .map(|n| n.trim_end_matches(".AppDir").to_string())
            .unwrap_or_else(|| "app".into()),
    };
    check_name(&name).map_err(|e| Error::bad(appdir, format!("{e} (--name)")))?;
    let entry = opts.entry.clone().unwrap_or_else(|| "AppRun".into());
    let entry = entry.trim_start_matches("./").to_string();
    check_path(entry.as_bytes()).map_err(|e| Error::bad(appdir.join(&entry), e))?;
    let emd = fs::metadata(appdir.join(&entry));
    if !emd
        .as_ref()
        .is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
    {
        return Err(Error::bad(
            appdir.join(&entry),
            "the entry point must be an executable file in the tree: add it (chmod +x), or \
             name another with --entry",
        ));
    }
    if !(1..=22).contains(&opts.level) {
        return Err(Error::bad(appdir, "compression level must be 1 to 22"));
    }
    let (mut entries, files) = scan(appdir)?;

    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = out
        .file_name()
        .ok_or_else(|| Error::bad(out, "output must name a file"))?;
    let tmp = dir.join(format!(
        ".{}.ovl-pack-{}",
        base.to_string_lossy(),
        std::process::id()
    ));
    // Never through a symlink someone planted under our temporary name.
    let _ = fs::remove_file(&tmp);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| Error::io("creating", &tmp, e))?;
    let result = write_bundle(file, &tmp, runtime, &mut entries, &files, name, entry, opts)
        .and_then(|s| {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
                .map_err(|e| Error::io("chmod", &tmp, e))?;
            Ok(s)
        });
    match result {
        Ok(summary) => Ok(Packed {
            tmp,
            out: out.to_path_buf(),
            summary,
            placed: false,
        }),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn write_bundle(
    file: File,
    path: &Path,
    runtime: &[u8],
    entries: &mut [Entry],
    files: &[(usize, PathBuf)],
    name: String,
    entry: String,
    opts: &PackOptions,
) -> Result<PackSummary> {
    let werr = |e| Error::io("writing", path, e);
    let mut out = io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(runtime).map_err(werr)?;
    let payload_offset = runtime.len() as u64;
    let mut w = HashingWriter {
        inner: out,
        hasher: blake3::Hasher::new(),
        written: 0,
    };
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        opts.threads
    };
    let mut blobs: Vec<Blob> = Vec::new();
    let mut by_hash: HashMap<[u8; 32], u32> = HashMap::new();
    let mut data_bytes = 0;
    // Compress in batches (parallel inside, in order across) so memory stays bounded and the
    // output does not depend on thread timing.
    for batch in files.chunks(threads * 16) {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut results: Vec<(usize, Result<Compressed>)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads.min(batch.len()))
                .map(|_| {
                    s.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some((_, path)) = batch.get(i) else { break };
                            done.push((i, compress_file(path, opts.level)));
                        }
                        done
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("compression thread panicked"))
                .collect()
        });
        // Back in tree order: the bytes must not depend on thread timing.
        results.sort_by_key(|(i, _)| *i);
        let results = results.into_iter().map(|(_, r)| r);
        for ((idx, _), r) in batch.iter().zip(results) {
            let c = r?;
            let blob = match by_hash.get(&c.hash) {
                Some(&b) => b,
                None => {
                    let b = blobs.len() as u32;
                    blobs.push(Blob {
                        offset: w.written,
                        clen: c.data.len() as u64,
                        len: c.len,
                        hash: c.hash,
                    });
                    w.put(&c.data).map_err(werr)?;
                    data_bytes += c.len;
                    by_hash.insert(c.hash, b);
                    b
                }
            };
            entries[*idx].kind = Kind::File { blob: Some(blob) };
        }
    }
    let manifest = Manifest {
        name,
        entry,
        on_exit: opts.on_exit,
        blobs,
        entries: entries.to_vec(),
    };
    let (mz, mlen) = manifest.compress().map_err(werr)?;
    let manifest_offset = payload_offset + w.written;
    w.put(&mz).map_err(werr)?;
    let trailer = Trailer {
        payload_offset,
        manifest_offset,
        manifest_clen: mz.len() as u64,
        manifest_len: mlen,
        hash: *w.hasher.finalize().as_bytes(),
        manifest_check: super::format::manifest_check(&mz),
    };
    let mut out = w.inner;
    out.write_all(&trailer.encode()).map_err(werr)?;
    let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
    file.sync_all().map_err(werr)?;
    Ok(PackSummary {
        id: trailer.id(),
        entries: manifest.entries.len(),
        blobs: manifest.blobs.len(),
        data_bytes,
        bundle_bytes: manifest_offset + mz.len() as u64 + super::format::TRAILER_LEN,
    })
}
