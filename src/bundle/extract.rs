//! Reading a bundle: trailer, manifest, verification, and extraction of the tree.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::format::{Entry, Kind, Manifest, TRAILER_LEN, Trailer};
use crate::error::{Error, Result};

/// An opened bundle with its manifest parsed and validated.
#[derive(Debug)]
pub struct Bundle {
    file: File,
    path: PathBuf,
    trailer: Trailer,
    manifest: Manifest,
}

/// A `Read` over a byte range of a file, by positioned reads (threads share the file).
struct RangeReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min((self.end - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "bundle ends early",
            ));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::bad(
        path,
        format!("corrupt bundle: {what}; download or build it again (ovl-pack)"),
    )
}

impl Bundle {
    /// Opens `path`, reads the trailer (one read from the end) and the manifest.
    pub fn open(path: &Path) -> Result<Bundle> {
        let (file, trailer) = read_trailer(path)?;
        let mut mz = vec![0u8; trailer.manifest_clen as usize];
        file.read_exact_at(&mut mz, trailer.manifest_offset)
            .map_err(|e| Error::io("reading", path, e))?;
        if super::format::manifest_check(&mz) != trailer.manifest_check {
            return Err(corrupt(path, "the manifest does not match its check"));
        }
        let raw = zstd::bulk::decompress(&mz, trailer.manifest_len as usize)
            .map_err(|e| corrupt(path, format!("manifest does not decompress ({e})")))?;
        if raw.len() as u64 != trailer.manifest_len {
            return Err(corrupt(path, "manifest has the wrong size"));
        }
        let manifest = Manifest::decode(&raw, trailer.manifest_offset - trailer.payload_offset)
            .map_err(|e| corrupt(path, e))?;
        Ok(Bundle {
            file,
            path: path.to_path_buf(),
            trailer,
            manifest,
        })
    }

    /// The open bundle file (what this run started from, even if the path is replaced).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The bundle's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn trailer(&self) -> &Trailer {
        &self.trailer
    }

    /// Identity of the payload (names its cached lower).
    pub fn id(&self) -> String {
        self.trailer.id()
    }

    /// The runtime's bytes (everything before the payload): a commit reuses them.
    pub fn runtime_bytes(&self) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.trailer.payload_offset as usize];
        self.file
            .read_exact_at(&mut b, 0)
            .map_err(|e| Error::io("reading", &self.path, e))?;
        Ok(b)
    }

    /// Recomputes the payload's BLAKE3 and compares it with the trailer's.
    pub fn verify(&self) -> Result<bool> {
        verify_payload(&self.file, &self.path, &self.trailer)
    }
}

/// Reads only the trailer of `path` (what `--ovl-verify` needs even when the manifest is
/// damaged).
pub fn read_trailer(path: &Path) -> Result<(File, Trailer)> {
    let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("reading", path, e))?
        .len();
    if len < TRAILER_LEN {
        return Err(corrupt(path, "too short to hold a payload (truncated?)"));
    }
    let mut tb = [0u8; TRAILER_LEN as usize];
    file.read_exact_at(&mut tb, len - TRAILER_LEN)
        .map_err(|e| Error::io("reading", path, e))?;
    let trailer = Trailer::decode(&tb, len).map_err(|e| corrupt(path, e))?;
    Ok((file, trailer))
}

/// Recomputes the payload's BLAKE3 and compares it with the trailer's.
pub fn verify_payload(file: &File, path: &Path, trailer: &Trailer) -> Result<bool> {
    let end = trailer.manifest_offset + trailer.manifest_clen;
    let mut r = RangeReader {
        file,
        pos: trailer.payload_offset,
        end,
    };
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(*h.finalize().as_bytes() == trailer.hash)
}

impl Bundle {
    /// Extracts the tree into `dest`, an existing empty directory, with `threads` workers
    /// (0: one per CPU). Owners are applied only when running as root, and xattrs the
    /// caller may not set (e.g. `trusted.*` for a normal user) are counted and reported as
    /// a warning, not silently dropped. Each file's content is checked against its BLAKE3.
    /// On error `dest` holds a partial tree: callers extract into a temporary directory.
    pub fn extract_to(&self, dest: &Path, threads: usize) -> Result<()> {
        let root = unsafe { libc::geteuid() } == 0;
        let m = &self.manifest;
        let path_of = |e: &Entry| dest.join(OsStr::from_bytes(&e.path));
        let skipped_xattrs = AtomicUsize::new(0);
        // Directories first (parents come before children in the manifest).
        for e in &m.entries[1..] {
            if e.kind == Kind::Dir {
                let p = path_of(e);
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&p)
                    .map_err(|err| Error::io("creating", &p, err))?;
            }
        }
        let files: Vec<&Entry> = m
            .entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::File { .. } | Kind::Symlink { .. }))
            .collect();
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            threads
        };
        let next = AtomicUsize::new(0);
        let failed = std::sync::Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.min(files.len()).max(1) {
                s.spawn(|| {
                    while failed.lock().unwrap().is_none() {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(e) = files.get(i) else { break };
                        if let Err(err) = self.extract_one(e, &path_of(e), root, &skipped_xattrs) {
                            *failed.lock().unwrap() = Some(err);
                        }
                    }
                });
            }
        });
        if let Some(err) = failed.into_inner().unwrap() {
            return Err(err);
        }
        for e in &m.entries {
            if let Kind::HardLink { to } = e.kind {
                let (src, dst) = (path_of(&m.entries[to as usize]), path_of(e));
                fs::hard_link(&src, &dst).map_err(|err| Error::io("linking", &dst, err))?;
            }
        }
        // Directory metadata last, deepest first: creating entries changes a dir's mtime, and
        // a read-only directory would refuse its children.
        for e in m.entries.iter().rev() {
            if e.kind == Kind::Dir {
                let p = path_of(e);
                apply_meta(&p, e, root, &skipped_xattrs)?;
            }
        }
        let n = skipped_xattrs.into_inner();
        if n > 0 {
            log::warn!(
                "{}: {n} extended attribute(s) could not be set without root (e.g. trusted.*, \
                 security.*); extracted without them",
                self.path.display()
            );
        }
        Ok(())
    }

    fn extract_one(&self, e: &Entry, p: &Path, root: bool, skipped: &AtomicUsize) -> Result<()> {
        match &e.kind {
            Kind::Symlink { target } => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), p)
                    .map_err(|err| Error::io("creating", p, err))?;
            }
            Kind::File { blob } => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(p)
                    .map_err(|err| Error::io("creating", p, err))?;
                if let Some(b) = blob {
                    let b = &self.manifest.blobs[*b as usize];
                    let start = self.trailer.payload_offset + b.offset;
                    let src = RangeReader {
                        file: &self.file,
                        pos: start,
                        end: start + b.clen,
                    };
                    let mut dec = zstd::stream::Decoder::new(src)
                        .map_err(|err| Error::io("decompressing into", p, err))?;
                    let mut h = blake3::Hasher::new();
                    let mut buf = vec![0u8; 256 << 10];
                    let mut len = 0u64;
                    loop {
                        let n = match dec.read(&mut buf) {
                            Ok(n) => n,
                            Err(err) => {
                                return Err(corrupt(
                                    &self.path,
                                    format!("data of {} does not decompress ({err})", p.display()),
                                ));
                            }
                        };
                        if n == 0 {
                            break;
                        }
                        len += n as u64;
                        if len > b.len {
                            // Stop a decompression bomb at once, not after filling the disk.
                            return Err(corrupt(
                                &self.path,
                                format!("data of {} is longer than recorded", p.display()),
                            ));
                        }
                        h.update(&buf[..n]);
                        f.write_all(&buf[..n])
                            .map_err(|err| Error::io("writing", p, err))?;
                    }
                    if len != b.len || *h.finalize().as_bytes() != b.hash {
                        return Err(corrupt(
                            &self.path,
                            format!("content of {} does not match its hash", p.display()),
                        ));
                    }
                }
                drop(f);
            }
            _ => unreachable!("only files and symlinks are extracted in parallel"),
        }
        apply_meta(p, e, root, skipped)
    }
}

/// Owner (root only), xattrs, mode, mtime, in the order that keeps each: chown clears
/// set-id bits, so chmod comes after it.
pub(super) fn apply_meta(p: &Path, e: &Entry, root: bool, skipped: &AtomicUsize) -> Result<()> {
    let c = crate::engine::sys::cstr(p.as_os_str()).map_err(|err| Error::io("naming", p, err))?;
    let symlink = matches!(e.kind, Kind::Symlink { .. });
    if root && unsafe { libc::lchown(c.as_ptr(), e.uid, e.gid) } < 0 {
        return Err(Error::io("chown", p, io::Error::last_os_error()));
    }
    for (k, v) in e
        .xattrs
        .iter()
        .filter(|(k, _)| super::pack::packable_xattr(k))
    {
        if let Err(err) = xattr::set(p, OsStr::from_bytes(k), v) {
            let host_specific = k.starts_with(b"security.") || !root;
            match err.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::ENOTSUP)
                | Some(libc::EINVAL)
                    if host_specific =>
                {
                    skipped.fetch_add(1, Ordering::Relaxed);
                }
                _ => return Err(Error::io("setting xattrs of", p, err)),
            }
        }
    }
    if !symlink && unsafe { libc::chmod(c.as_ptr(), e.mode) } < 0 {
        return Err(Error::io("chmod", p, io::Error::last_os_error()));
    }
    let t = libc::timespec {
        tv_sec: e.mtime,
        tv_nsec: e.mtime_nsec as _,
    };
    let times = [t, t];
    if unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } < 0
    {
        return Err(Error::io("setting times of", p, io::Error::last_os_error()));
    }
    Ok(())
}
