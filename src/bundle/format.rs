//! The on-disk format of an `app.run` bundle.
//!
//! ```text
//! [ runtime (static ELF) ][ blob 0 ][ blob 1 ] … [ manifest (zstd) ][ trailer (96 bytes) ]
//!                         ^ payload_offset                          ^ file length − 96
//! ```
//!
//! The **trailer** is fixed-size and last, so the runtime finds everything with one read from
//! the end. The **payload** is every byte from `payload_offset` to the trailer; its BLAKE3 is
//! stored in the trailer and is the bundle's identity (the manifest, read at every launch,
//! has a check of its own) (the name of its cached lower), so a
//! launch never rehashes. Each **blob** is one distinct file content, zstd-compressed on its
//! own (so extraction runs in parallel) and stored once however many files share it. The
//! **manifest** lists the tree: entry point, name, default finalization, and per entry its
//! path, type, mode, owner, mtime, xattrs, blob or symlink target.
//!
//! All integers are little-endian. Nothing in the format depends on when or where it was
//! built, so packing the same tree twice gives the same bytes.

use std::io;

use crate::OverlayAction;

/// Size of the trailer at the end of every bundle.
pub const TRAILER_LEN: u64 = 96;
const MAGIC: &[u8; 8] = b"OVLBNDL\0";
const MAGIC_END: &[u8; 8] = b"OVLTRAIL";
const MANIFEST_MAGIC: &[u8; 4] = b"OVLM";
/// Format version written and understood.
pub const VERSION: u32 = 1;
/// Upper bound of a decompressed manifest (a tree of millions of entries stays far below).
const MAX_MANIFEST: u64 = 1 << 30;

/// The fixed-size record at the end of a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// Where the payload starts (the runtime's size).
    pub payload_offset: u64,
    /// Where the compressed manifest starts (absolute).
    pub manifest_offset: u64,
    /// Compressed manifest size; it ends where the trailer begins.
    pub manifest_clen: u64,
    /// Decompressed manifest size.
    pub manifest_len: u64,
    /// BLAKE3 of the payload (blobs and manifest).
    pub hash: [u8; 32],
    /// First 8 bytes of the BLAKE3 of the compressed manifest: checked at every open (the
    /// manifest is small), because launches do not rehash the payload and a damaged manifest
    /// could otherwise still decode into a wrong tree.
    pub manifest_check: [u8; 8],
}

impl Trailer {
    /// Serializes to exactly [`TRAILER_LEN`] bytes.
    pub fn encode(&self) -> [u8; TRAILER_LEN as usize] {
        let mut b = [0u8; TRAILER_LEN as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        // 12..16: flags, none defined.
        b[16..24].copy_from_slice(&self.payload_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.manifest_clen.to_le_bytes());
        b[40..48].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[48..80].copy_from_slice(&self.hash);
        b[80..88].copy_from_slice(&self.manifest_check);
        b[88..96].copy_from_slice(MAGIC_END);
        b
    }

    /// Parses and checks a trailer read from the end of a file of `file_len` bytes.
    pub fn decode(b: &[u8], file_len: u64) -> Result<Trailer, String> {
        if file_len < TRAILER_LEN
            || b.len() != TRAILER_LEN as usize
            || &b[88..96] != MAGIC_END
            || &b[0..8] != MAGIC
        {
            return Err(
                "no bundle trailer at the end of the file (truncated, or not built by \
                        ovl-pack)"
                    .into(),
            );
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(format!(
                "bundle format version {version}; this runtime reads version {VERSION}"
            ));
        }
        if u32_at(12) != 0 {
            return Err("unknown bundle flags (built by a newer ovl-pack)".into());
        }
        let t = Trailer {
            payload_offset: u64_at(16),
            manifest_offset: u64_at(24),
            manifest_clen: u64_at(32),
            manifest_len: u64_at(40),
            hash: b[48..80].try_into().unwrap(),
            manifest_check: b[80..88].try_into().unwrap(),
        };
        let end = file_len - TRAILER_LEN;
        if t.payload_offset > t.manifest_offset
            || t.manifest_offset.checked_add(t.manifest_clen) != Some(end)
            || t.manifest_len > MAX_MANIFEST
            || t.manifest_clen > MAX_MANIFEST
        {
            return Err(
                "bundle trailer does not match the file's size (truncated or corrupt)".into(),
            );
        }
        Ok(t)
    }

    /// The bundle's identity: the first 128 bits of the payload hash, in hex.
    pub fn id(&self) -> String {
        self.hash[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One distinct file content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blob {
    /// Start of the compressed bytes, relative to the payload.
    pub offset: u64,
    /// Compressed size.
    pub clen: u64,
    /// Decompressed size.
    pub len: u64,
    /// BLAKE3 of the decompressed content (checked while extracting).
    pub hash: [u8; 32],
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// A regular file; `None` when empty.
    File {
        blob: Option<u32>,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Another name of an earlier file entry (by index).
    HardLink {
        to: u32,
    },
}

/// One entry of the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the tree's root, `/`-separated; empty for the root itself.
    pub path: Vec<u8>,
    pub kind: Kind,
    /// Permission bits including set-id and sticky (`& 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The bundle's table of contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Short name: names the upper (`$XDG_DATA_HOME/ovl/<name>`) and messages.
    pub name: String,
    /// What runs, relative to the tree's root.
    pub entry: String,
    /// Finalization when the user does not choose one.
    pub on_exit: OverlayAction,
    pub blobs: Vec<Blob>,
    /// Parents before children; the root first.
    pub entries: Vec<Entry>,
}

fn action_code(a: OverlayAction) -> u8 {
    match a {
        OverlayAction::Preserve => 0,
        OverlayAction::Discard => 1,
        OverlayAction::Commit | OverlayAction::CommitAtomic => 2,
    }
}

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
}

struct Dec<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or("manifest ends early")?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, String> {
        let n = self.u32()? as usize;
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?).map_err(|_| "manifest string is not UTF-8".to_string())
    }
}

impl Manifest {
    /// Serializes (uncompressed).
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc(Vec::new());
        e.0.extend_from_slice(MANIFEST_MAGIC);
        e.bytes(self.name.as_bytes());
        e.bytes(self.entry.as_bytes());
        e.u8(action_code(self.on_exit));
        e.u32(self.blobs.len() as u32);
        for b in &self.blobs {
            e.u64(b.offset);
            e.u64(b.clen);
            e.u64(b.len);
            e.0.extend_from_slice(&b.hash);
        }
        e.u32(self.entries.len() as u32);
        for en in &self.entries {
            e.bytes(&en.path);
            match &en.kind {
                Kind::Dir => e.u8(0),
                Kind::File { blob } => {
                    e.u8(1);
                    e.u32(blob.unwrap_or(u32::MAX));
                }
                Kind::Symlink { target } => {
                    e.u8(2);
                    e.bytes(target);
                }
                Kind::HardLink { to } => {
                    e.u8(3);
                    e.u32(*to);
                }
            }
            e.u32(en.mode);
            e.u32(en.uid);
            e.u32(en.gid);
            e.u64(en.mtime as u64);
            e.u32(en.mtime_nsec);
            e.u32(en.xattrs.len() as u32);
            for (k, v) in &en.xattrs {
                e.bytes(k);
                e.bytes(v);
            }
        }
        e.0
    }

    /// Parses and validates a manifest whose blobs must lie within `blob_area` bytes of
    /// payload. Validation makes extraction safe: every path is relative and normalized,
    /// and its parent is a directory listed before it (never a symlink), so extracting can
    /// never write outside the target directory.
    pub fn decode(b: &[u8], blob_area: u64) -> Result<Manifest, String> {
        let mut d = Dec { b, pos: 0 };
        if d.take(4)? != MANIFEST_MAGIC {
            return Err("manifest has a bad magic number".into());
        }
        let name = d.string()?;
        let entry = d.string()?;
        let on_exit = match d.u8()? {
            0 => OverlayAction::Preserve,
            1 => OverlayAction::Discard,
            2 => OverlayAction::Commit,
            n => return Err(format!("manifest has unknown finalization {n}")),
        };
        check_name(&name)?;
        let nblobs = d.u32()? as usize;
        let mut blobs = Vec::with_capacity(nblobs.min(1 << 20));
        for _ in 0..nblobs {
            let blob = Blob {
                offset: d.u64()?,
                clen: d.u64()?,
                len: d.u64()?,
                hash: d.take(32)?.try_into().unwrap(),
            };
            if blob
                .offset
                .checked_add(blob.clen)
                .is_none_or(|e| e > blob_area)
            {
                return Err("manifest points a file's data outside the payload".into());
            }
            blobs.push(blob);
        }
        let nentries = d.u32()? as usize;
        let mut entries: Vec<Entry> = Vec::with_capacity(nentries.min(1 << 20));
        let mut dirs = std::collections::HashSet::new();
        for i in 0..nentries {
            let path = d.bytes()?;
            let kind = match d.u8()? {
                0 => Kind::Dir,
                1 => {
                    let b = d.u32()?;
                    if b != u32::MAX && b as usize >= blobs.len() {
                        return Err("manifest names a missing blob".into());
                    }
                    Kind::File {
                        blob: (b != u32::MAX).then_some(b),
                    }
                }
                2 => Kind::Symlink { target: d.bytes()? },
                3 => {
                    let to = d.u32()?;
                    if !entries
                        .get(to as usize)
                        .is_some_and(|e| matches!(e.kind, Kind::File { .. }))
                    {
                        return Err("manifest has a hard link to a missing file".into());
                    }
                    Kind::HardLink { to }
                }
                n => return Err(format!("manifest has unknown entry type {n}")),
            };
            let mode = d.u32()?;
            let (uid, gid) = (d.u32()?, d.u32()?);
            let mtime = d.u64()? as i64;
            let mtime_nsec = d.u32()?;
            let nx = d.u32()? as usize;
            let mut xattrs = Vec::with_capacity(nx.min(64));
            for _ in 0..nx {
                xattrs.push((d.bytes()?, d.bytes()?));
            }
            if i == 0 {
                if !path.is_empty() || kind != Kind::Dir {
                    return Err("manifest does not start with the root directory".into());
                }
            } else {
                check_path(&path)?;
                let parent = match path.iter().rposition(|&c| c == b'/') {
                    Some(p) => &path[..p],
                    None => &path[..0],
                };
                if !dirs.contains(parent) {
                    return Err(format!(
                        "manifest lists {:?} before its directory",
                        String::from_utf8_lossy(&path)
                    ));
                }
            }
            if kind == Kind::Dir && !dirs.insert(path.clone()) {
                return Err("manifest lists a directory twice".into());
            }
            if mode & !0o7777 != 0 || mtime_nsec >= 1_000_000_000 {
                return Err("manifest has an invalid mode or time".into());
            }
            entries.push(Entry {
                path,
                kind,
                mode,
                uid,
                gid,
                mtime,
                mtime_nsec,
                xattrs,
            });
        }
        if entries.is_empty() {
            return Err("manifest has no root directory".into());
        }
        if d.pos != b.len() {
            return Err("manifest has trailing bytes".into());
        }
        check_path(entry.as_bytes()).map_err(|e| format!("entry point: {e}"))?;
        Ok(Manifest {
            name,
            entry,
            on_exit,
            blobs,
            entries,
        })
    }

    /// Compresses the encoded manifest (level fixed: the bytes must not depend on options).
    pub fn compress(&self) -> io::Result<(Vec<u8>, u64)> {
        let raw = self.encode();
        Ok((zstd::bulk::compress(&raw, 19)?, raw.len() as u64))
    }
}

/// The trailer's check of the compressed manifest.
pub fn manifest_check(compressed: &[u8]) -> [u8; 8] {
    blake3::hash(compressed).as_bytes()[..8].try_into().unwrap()
}

/// A bundle name is one path component of printable characters: it names a directory.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.len() > 200
        || name.chars().any(|c| c == '/' || c.is_control())
    {
        return Err(format!(
            "invalid bundle name {name:?}: use one file-name component, e.g. \"myapp\""
        ));
    }
    Ok(())
}

/// A relative, normalized, non-empty path: no leading `/`, no empty, `.` or `..` component.
pub fn check_path(p: &[u8]) -> Result<(), String> {
    if p.is_empty()
        || p.contains(&0)
        || p.split(|&c| c == b'/')
            .any(|c| c.is_empty() || c == b"." || c == b"..")
    {
        return Err(format!(
            "invalid path {:?} (must be relative, without . or ..)",
            String::from_utf8_lossy(p)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let e = |path: &str, kind| Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o755,
            uid: 1,
            gid: 2,
            mtime: -5,
            mtime_nsec: 7,
            xattrs: vec![(b"user.a".to_vec(), b"v".to_vec())],
        };
        Manifest {
            name: "app".into(),
            entry: "AppRun".into(),
            on_exit: OverlayAction::Discard,
            blobs: vec![Blob {
                offset: 0,
                clen: 10,
                len: 20,
                hash: [3; 32],
            }],
            entries: vec![
                e("", Kind::Dir),
                e("AppRun", Kind::File { blob: Some(0) }),
                e("d", Kind::Dir),
                e(
                    "d/l",
                    Kind::Symlink {
                        target: b"../AppRun".to_vec(),
                    },
                ),
                e("d/h", Kind::HardLink { to: 1 }),
                e("d/empty", Kind::File { blob: None }),
            ],
        }
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode(), 10).unwrap(), m);
    }

    #[test]
    fn manifest_rejects_escapes_and_bad_offsets() {
        let mut m = sample();
        m.entries[3].path = b"../x".to_vec();
        assert!(
            Manifest::decode(&m.encode(), 10)
                .unwrap_err()
                .contains("invalid path")
        );
        let mut m = sample();
        // A file under a symlink would let extraction write through it.
        m.entries[5].path = b"d/l/x".to_vec();
        assert!(
            Manifest::decode(&m.encode(), 10)
                .unwrap_err()
                .contains("before its directory")
        );
        let m = sample();
        assert!(
            Manifest::decode(&m.encode(), 9)
                .unwrap_err()
                .contains("outside")
        );
        let enc = m.encode();
        for cut in [0, 5, enc.len() / 2, enc.len() - 1] {
            assert!(Manifest::decode(&enc[..cut], 10).is_err());
        }
    }

    #[test]
    fn trailer_round_trips_and_checks_size() {
        let t = Trailer {
            payload_offset: 100,
            manifest_offset: 150,
            manifest_clen: 50,
            manifest_len: 70,
            hash: [9; 32],
            manifest_check: [1; 8],
        };
        let b = t.encode();
        assert_eq!(Trailer::decode(&b, 200 + TRAILER_LEN).unwrap(), t);
        assert!(Trailer::decode(&b, 199 + TRAILER_LEN).is_err());
        let mut bad = b;
        bad[90] ^= 1;
        assert!(Trailer::decode(&bad, 200 + TRAILER_LEN).is_err());
        assert_eq!(t.id().len(), 32);
    }
}
