//! Reading a bundle: trailer, manifest, image, verification, and extraction of the tree.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{Manifest, TRAILER_LEN, Trailer};
use crate::error::{Error, Result};
use crate::image::Image;

/// An opened bundle: manifest parsed and validated, image opened (its metadata checked).
#[derive(Debug)]
pub struct Bundle {
    file: File,
    path: PathBuf,
    trailer: Trailer,
    manifest: Manifest,
    image: std::sync::Arc<Image>,
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
        let manifest = Manifest::decode(&raw).map_err(|e| corrupt(path, e))?;
        let image_file = file
            .try_clone()
            .map_err(|e| Error::io("opening", path, e))?;
        let image = Image::open(
            image_file,
            trailer.payload_offset,
            crate::image::read::DEFAULT_CACHE,
        )
        .map_err(|e| image_error(path, e))?;
        if image.superblock().image_len != trailer.manifest_offset - trailer.payload_offset {
            return Err(corrupt(
                path,
                "the image does not end where the manifest starts",
            ));
        }
        Ok(Bundle {
            file,
            path: path.to_path_buf(),
            trailer,
            manifest,
            image: std::sync::Arc::new(image),
        })
    }

    /// The app's tree as an overlay's lower layer, read in place from this file (nothing
    /// extracted). As a normal user every entry shows as the user's own, as a tree the user
    /// extracted would (root sees the owners stored).
    pub fn lower_source(&self) -> crate::engine::lower::LowerSource {
        let owner = match unsafe { libc::geteuid() } {
            0 => None,
            uid => Some((uid, unsafe { libc::getegid() })),
        };
        // The image opened (and checked) here is shared, not read again.
        crate::engine::lower::LowerSource::Opened {
            image: self.image.clone(),
            path: self.path.clone(),
            owner,
        }
    }

    /// The app's tree, read in place.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The same, shared (the engine's lower holds this one too).
    pub fn shared_image(&self) -> &std::sync::Arc<Image> {
        &self.image
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

    /// Recomputes the BLAKE3 of the payload and of the runtime part and compares them with
    /// the trailer's (every byte of the file is then checked: the trailer's own fields are
    /// checked when it is decoded).
    pub fn verify(&self) -> Result<bool> {
        Ok(verify_payload(&self.file, &self.path, &self.trailer)?
            && verify_runtime(&self.file, &self.path, &self.trailer)?)
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
    Ok(hash_range(file, path, trailer.payload_offset, end)? == trailer.hash)
}

/// Recomputes the runtime part's BLAKE3 and compares it with the trailer's.
pub fn verify_runtime(file: &File, path: &Path, trailer: &Trailer) -> Result<bool> {
    Ok(hash_range(file, path, 0, trailer.payload_offset)? == trailer.runtime_hash)
}

fn hash_range(file: &File, path: &Path, pos: u64, end: u64) -> Result<[u8; 32]> {
    let mut r = RangeReader { file, pos, end };
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
    Ok(*h.finalize().as_bytes())
}

/// An image's failed check is a corrupt bundle; other errors are read errors of the file.
fn image_error(path: &Path, e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::InvalidData {
        corrupt(path, e)
    } else {
        Error::io("reading", path, e)
    }
}

impl Bundle {
    /// Extracts the tree into `dest`, an existing empty directory, with `threads` workers
    /// (0: one per CPU), through the image reader (see [`Image::extract_to`]): owners only as
    /// root, xattrs the caller may not set reported as a warning, every block checked
    /// against its BLAKE3. On error `dest` holds a partial tree: callers extract into a
    /// temporary directory.
    pub fn extract_to(&self, dest: &Path, threads: usize) -> Result<()> {
        match self.image.extract_to(dest, threads) {
            Ok(_) => Ok(()),
            Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::InvalidData => {
                Err(corrupt(&self.path, source))
            }
            Err(e) => Err(e),
        }
    }
}
