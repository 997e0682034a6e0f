//! Building a bundle: the runtime, then the tree's image, then the manifest and the trailer
//! (see [`super::format`]).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::format::{Manifest, Trailer, check_name, check_path};
use crate::OverlayAction;
use crate::error::{Error, Result};
use crate::image::{ImageOptions, write_image};

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
    /// Inodes of the tree (a file with hard links counts once).
    pub entries: usize,
    /// Distinct file contents.
    pub blobs: usize,
    /// Sum of the distinct contents' sizes.
    pub data_bytes: u64,
    /// The bundle file's size.
    pub bundle_bytes: u64,
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
    // Read too: the payload is hashed back from the file.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o755)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| Error::io("creating", &tmp, e))?;
    let result = write_bundle(file, appdir, &tmp, runtime, name, entry, opts).and_then(|s| {
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

fn write_bundle(
    file: File,
    appdir: &Path,
    path: &Path,
    runtime: &[u8],
    name: String,
    entry: String,
    opts: &PackOptions,
) -> Result<PackSummary> {
    let werr = |e| Error::io("writing", path, e);
    file.write_all_at(runtime, 0).map_err(werr)?;
    let payload_offset = runtime.len() as u64;
    let iopts = ImageOptions {
        level: opts.level,
        threads: opts.threads,
        special_files: false,
        ..Default::default()
    };
    let image = write_image(appdir, &file, payload_offset, &iopts)?;
    let manifest = Manifest {
        name,
        entry,
        on_exit: opts.on_exit,
    };
    let (mz, mlen) = manifest.compress().map_err(werr)?;
    let manifest_offset = payload_offset + image.image_len;
    file.write_all_at(&mz, manifest_offset).map_err(werr)?;
    // The image was written out of order (its superblock last): hash the payload as stored.
    let end = manifest_offset + mz.len() as u64;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = payload_offset;
    while pos < end {
        let n = buf.len().min((end - pos) as usize);
        file.read_exact_at(&mut buf[..n], pos)
            .map_err(|e| Error::io("reading back", path, e))?;
        h.update(&buf[..n]);
        pos += n as u64;
    }
    let trailer = Trailer {
        runtime_hash: *blake3::hash(runtime).as_bytes(),
        payload_offset,
        manifest_offset,
        manifest_clen: mz.len() as u64,
        manifest_len: mlen,
        hash: *h.finalize().as_bytes(),
        manifest_check: super::format::manifest_check(&mz),
    };
    file.write_all_at(&trailer.encode(), end).map_err(werr)?;
    file.sync_all().map_err(werr)?;
    Ok(PackSummary {
        id: trailer.id(),
        entries: image.inodes as usize,
        blobs: image.distinct,
        data_bytes: image.data_bytes,
        bundle_bytes: end + super::format::TRAILER_LEN,
    })
}
