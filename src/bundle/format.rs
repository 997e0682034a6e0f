//! The on-disk format of an `app.run` bundle.
//!
//! ```text
//! [ runtime (static ELF) ][ image ][ manifest (zstd) ][ trailer (128 bytes) ]
//!                         ^ payload_offset              ^ file length − 128
//! ```
//!
//! The **trailer** is fixed-size and last, so the runtime finds everything with one read from
//! the end. The **payload** is every byte from `payload_offset` to the trailer; its BLAKE3 is
//! stored in the trailer and is the bundle's identity (the name of its cached lower), so a
//! launch never rehashes. The trailer also holds the BLAKE3 of the runtime part, which only
//! `--ovl-verify` checks: with both, and the trailer's own fields checked when it is decoded,
//! every byte of the file is covered, while bundles of one payload built with different
//! runtimes still share their cached tree. The **image** is the app's tree, read in place
//! ([`crate::image`]: compressed blocks with their own BLAKE3, checked on every read). The
//! **manifest** says what to run: name, entry point, default finalization; it has a check of
//! its own in the trailer.
//!
//! All integers are little-endian. Nothing in the format depends on when or where it was
//! built, so packing the same tree twice gives the same bytes.

use std::io;

use crate::OverlayAction;

/// Size of the trailer at the end of every bundle.
pub const TRAILER_LEN: u64 = 128;
/// Where version 2's 96-byte trailer started within the last [`TRAILER_LEN`] bytes.
const V2_START: usize = 32;
const MAGIC: &[u8; 8] = b"OVLBNDL\0";
const MAGIC_END: &[u8; 8] = b"OVLTRAIL";
const MANIFEST_MAGIC: &[u8; 4] = b"OVLM";
/// Format version written and understood.
pub const VERSION: u32 = 3;
/// Upper bound of a manifest (two names and a byte).
const MAX_MANIFEST: u64 = 1 << 16;

/// The fixed-size record at the end of a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// BLAKE3 of the runtime part (bytes `0..payload_offset`); not part of the id.
    pub runtime_hash: [u8; 32],
    /// Where the payload starts (the runtime's size).
    pub payload_offset: u64,
    /// Where the compressed manifest starts (absolute); the image ends here.
    pub manifest_offset: u64,
    /// Compressed manifest size; it ends where the trailer begins.
    pub manifest_clen: u64,
    /// Decompressed manifest size.
    pub manifest_len: u64,
    /// BLAKE3 of the payload (image and manifest).
    pub hash: [u8; 32],
    /// First 8 bytes of the BLAKE3 of the compressed manifest: checked at every open (the
    /// manifest is small), because launches do not rehash the payload and a damaged manifest
    /// could otherwise still decode into a wrong entry point.
    pub manifest_check: [u8; 8],
}

impl Trailer {
    /// Serializes to exactly [`TRAILER_LEN`] bytes.
    pub fn encode(&self) -> [u8; TRAILER_LEN as usize] {
        let mut b = [0u8; TRAILER_LEN as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        // 12..16: flags, none defined.
        b[16..48].copy_from_slice(&self.runtime_hash);
        b[48..56].copy_from_slice(&self.payload_offset.to_le_bytes());
        b[56..64].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[64..72].copy_from_slice(&self.manifest_clen.to_le_bytes());
        b[72..80].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[80..112].copy_from_slice(&self.hash);
        b[112..120].copy_from_slice(&self.manifest_check);
        b[120..128].copy_from_slice(MAGIC_END);
        b
    }

    /// Parses and checks a trailer read from the end of a file of `file_len` bytes.
    pub fn decode(b: &[u8], file_len: u64) -> Result<Trailer, String> {
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        if b.len() == TRAILER_LEN as usize
            && &b[120..128] == MAGIC_END
            && &b[V2_START..V2_START + 8] == MAGIC
        {
            // An older, shorter trailer: say which version rather than "no trailer".
            return Err(format!(
                "bundle format version {}; this runtime reads version {VERSION}: rebuild it \
                 with this ovl-pack",
                u32_at(V2_START + 8)
            ));
        }
        if file_len < TRAILER_LEN
            || b.len() != TRAILER_LEN as usize
            || &b[120..128] != MAGIC_END
            || &b[0..8] != MAGIC
        {
            return Err(
                "no bundle trailer at the end of the file (truncated, or not built by \
                        ovl-pack)"
                    .into(),
            );
        }
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
            runtime_hash: b[16..48].try_into().unwrap(),
            payload_offset: u64_at(48),
            manifest_offset: u64_at(56),
            manifest_clen: u64_at(64),
            manifest_len: u64_at(72),
            hash: b[80..112].try_into().unwrap(),
            manifest_check: b[112..120].try_into().unwrap(),
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

/// What the bundle says about its app (the tree itself is the image).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Short name: names the upper (`$XDG_DATA_HOME/ovl/<name>`) and messages.
    pub name: String,
    /// What runs, relative to the tree's root.
    pub entry: String,
    /// Finalization when the user does not choose one.
    pub on_exit: OverlayAction,
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
    fn string(&mut self) -> Result<String, String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| "manifest string is not UTF-8".to_string())
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
        e.0
    }

    /// Parses and validates a manifest.
    pub fn decode(b: &[u8]) -> Result<Manifest, String> {
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
        if d.pos != b.len() {
            return Err("manifest has trailing bytes".into());
        }
        check_path(entry.as_bytes()).map_err(|e| format!("entry point: {e}"))?;
        Ok(Manifest {
            name,
            entry,
            on_exit,
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
        Manifest {
            name: "app".into(),
            entry: "bin/AppRun".into(),
            on_exit: OverlayAction::Discard,
        }
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn manifest_rejects_escapes_and_bad_names() {
        let mut m = sample();
        m.entry = "../x".into();
        assert!(
            Manifest::decode(&m.encode())
                .unwrap_err()
                .contains("invalid path")
        );
        let mut m = sample();
        m.name = "a/b".into();
        assert!(
            Manifest::decode(&m.encode())
                .unwrap_err()
                .contains("invalid bundle name")
        );
        let enc = sample().encode();
        for cut in [0, 5, enc.len() / 2, enc.len() - 1] {
            assert!(Manifest::decode(&enc[..cut]).is_err());
        }
    }

    #[test]
    fn trailer_round_trips_and_checks_size() {
        let t = Trailer {
            runtime_hash: [7; 32],
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
        bad[122] ^= 1;
        assert!(Trailer::decode(&bad, 200 + TRAILER_LEN).is_err());
        assert_eq!(t.id().len(), 32);
    }
}
