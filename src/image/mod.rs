//! The payload image: a read-only filesystem tree in one byte range of a file, built to be
//! served in place (looked up, listed and read without extracting it) and to compress like
//! squashfs does.
//!
//! ```text
//! [ superblock (128 bytes) ][ data block 0 ][ data block 1 ] … [ metadata (one zstd frame) ]
//! ^ image offset in its file
//! ```
//!
//! **Data blocks** are independently zstd-compressed runs of at most `block_size` bytes
//! (default 1 MiB). A regular file's content is a list of *extents*, one per `block_size`
//! piece of the file: extent *i* covers bytes `[i·bs, min((i+1)·bs, size))` and names the
//! block and the offset inside its decompressed bytes where they lie. Full pieces of large
//! files are blocks of their own; small files and the tails of large ones are packed
//! together into shared blocks (squashfs's fragments, dwarfs's blocks), in an order that puts
//! similar files side by side (by extension, then name), so many small files compress as one
//! stream. An all-zero full piece is a hole (no block). Identical contents are stored once:
//! their inodes share one extent list. A read of any range decompresses only the blocks its
//! extents name.
//!
//! The **metadata** is fixed-size little-endian records in tables (inodes, directory
//! entries, extents, xattr sets, xattrs, blocks) plus one byte pool (names, symlink targets,
//! xattr names and values). It is compressed as independent zstd frames of 64 KiB each, one
//! after the other (one zstd stream as a whole), and each frame is decompressed the first time
//! a lookup reads from it (a start that looks up a few hundred of 50 000 names decompresses a
//! fraction of the few MB); the records are then read in place: no per-entry parsing, no
//! allocation. Directory entries are sorted by
//! name bytewise, so a lookup is a binary search.
//!
//! **Integrity**: the superblock carries a check of itself and the BLAKE3 of the stored
//! metadata; the block table carries the BLAKE3 of every compressed block, checked each time
//! the block is read from the file (before it is decompressed), so a flipped byte anywhere is
//! an error, never wrong data.
//!
//! Only what a read-only lower needs is kept: type, mode, owner, mtime with nanoseconds,
//! size, link count (counted inside the tree), device numbers, symlink targets and xattrs
//! (exact, sorted by name). atime and ctime read as the mtime (as squashfs does), so the
//! bytes depend only on what `cp -a` preserves: the same tree packs to the same bytes,
//! whatever the thread count.

pub mod extract;
pub mod read;
pub mod write;

pub use read::{Attr, DirEntry, Image, ImageError, Stats};
pub use write::{ImageOptions, ImageSummary, write_image};

/// Private xattrs of an overlay describe layer structure, never content, and SELinux labels
/// belong to the host's policy: neither is packed (nor extracted from a crafted bundle).
pub fn packable_xattr(name: &[u8]) -> bool {
    !(name.starts_with(b"trusted.overlay.")
        || name.starts_with(b"user.overlay.")
        || name == b"security.selinux")
}

/// Bytes of the superblock at the start of an image.
pub const SUPERBLOCK_LEN: u64 = 128;
const MAGIC: &[u8; 8] = b"OVLIMG\0\x01";
const META_MAGIC: &[u8; 8] = b"OVLMETA\0";
/// Image format version written and understood.
pub const VERSION: u32 = 1;
/// The root directory's inode number (inode numbers start at 1).
pub const ROOT_INO: u32 = 1;
/// An extent whose block is this is a hole (reads as zeros).
const HOLE: u32 = u32::MAX;
/// "No xattrs" in an inode's xattr-set field.
const NO_XATTRS: u32 = u32::MAX;
/// Upper bound of a decompressed metadata section and of a block (a crafted image must
/// not make the reader allocate without limit).
const MAX_META: u64 = 1 << 32;
const MIN_BLOCK: u32 = 4096;
const MAX_BLOCK: u32 = 16 << 20;

/// Record sizes of the metadata tables, in table order.
const INODE_LEN: usize = 48;
const DIRENT_LEN: usize = 12;
const EXTENT_LEN: usize = 8;
const XSET_LEN: usize = 8;
const XATTR_LEN: usize = 16;
const BLOCK_LEN: usize = 48;
const TABLES: usize = 7;
/// Metadata header: magic, then (offset, count) of each table; the last table is the byte
/// pool.
const META_HEADER_LEN: usize = 8 + TABLES * 16;
const T_INODES: usize = 0;
const T_DIRENTS: usize = 1;
const T_EXTENTS: usize = 2;
const T_XSETS: usize = 3;
const T_XATTRS: usize = 4;
const T_BLOCKS: usize = 5;
const T_POOL: usize = 6;
const RECORD_LEN: [usize; TABLES] = [
    INODE_LEN, DIRENT_LEN, EXTENT_LEN, XSET_LEN, XATTR_LEN, BLOCK_LEN, 1,
];

/// Whether the file at `path` starts with an image (its magic bytes; the rest is checked
/// when it is opened).
pub fn is_image(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok_and(|()| &b == MAGIC)
}

/// The fixed record at the start of an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Largest decompressed size of a data block.
    pub block_size: u32,
    /// Bytes of the whole image, superblock included.
    pub image_len: u64,
    /// Where the compressed metadata starts, from the image's start.
    pub meta_offset: u64,
    /// Compressed metadata size (it ends where the image ends).
    pub meta_clen: u64,
    /// Decompressed metadata size.
    pub meta_len: u64,
    pub inodes: u32,
    pub blocks: u32,
    /// BLAKE3 of the compressed metadata.
    pub meta_hash: [u8; 32],
}

impl Superblock {
    /// Serializes to exactly [`SUPERBLOCK_LEN`] bytes.
    pub fn encode(&self) -> [u8; SUPERBLOCK_LEN as usize] {
        let mut b = [0u8; SUPERBLOCK_LEN as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        // 12..16: flags, none defined.
        b[16..20].copy_from_slice(&self.block_size.to_le_bytes());
        b[20..24].copy_from_slice(&self.inodes.to_le_bytes());
        b[24..32].copy_from_slice(&self.image_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.meta_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.meta_clen.to_le_bytes());
        b[48..56].copy_from_slice(&self.meta_len.to_le_bytes());
        b[56..60].copy_from_slice(&self.blocks.to_le_bytes());
        // 60..64 reserved.
        b[64..96].copy_from_slice(&self.meta_hash);
        let check = blake3::hash(&b[..96]);
        b[96..112].copy_from_slice(&check.as_bytes()[..16]);
        b
    }

    /// Parses and checks a superblock.
    pub fn decode(b: &[u8]) -> Result<Superblock, String> {
        if b.len() < SUPERBLOCK_LEN as usize || b[0..7] != MAGIC[..7] {
            return Err("no ovl image here (bad magic number)".into());
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        if b[7] != MAGIC[7] || u32_at(8) != VERSION {
            return Err(format!(
                "image format version {}; this build reads version {VERSION}",
                u32_at(8)
            ));
        }
        if blake3::hash(&b[..96]).as_bytes()[..16] != b[96..112] || b[112..128] != [0; 16] {
            return Err("the image's superblock does not match its check".into());
        }
        if u32_at(12) != 0 || u32_at(60) != 0 {
            return Err("unknown image flags (built by a newer ovl-pack)".into());
        }
        let sb = Superblock {
            block_size: u32_at(16),
            inodes: u32_at(20),
            image_len: u64_at(24),
            meta_offset: u64_at(32),
            meta_clen: u64_at(40),
            meta_len: u64_at(48),
            blocks: u32_at(56),
            meta_hash: b[64..96].try_into().unwrap(),
        };
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&sb.block_size)
            || sb.meta_offset < SUPERBLOCK_LEN
            || sb.meta_offset.checked_add(sb.meta_clen) != Some(sb.image_len)
            || sb.meta_len > MAX_META
            || sb.meta_len < META_HEADER_LEN as u64
            || sb.inodes == 0
        {
            return Err("the image's superblock is inconsistent".into());
        }
        Ok(sb)
    }
}

/// Little-endian field readers over a byte slice (the caller has bounds-checked the record).
fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes(b[i..i + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().unwrap())
}

/// The file type bits of a mode, as `d_type` (`DT_*` = `S_IFMT >> 12`).
fn dtype_of(mode: u32) -> u8 {
    ((mode & libc::S_IFMT) >> 12) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_and_checks_itself() {
        let sb = Superblock {
            block_size: 1 << 20,
            image_len: 1000,
            meta_offset: 900,
            meta_clen: 100,
            meta_len: 5000,
            inodes: 3,
            blocks: 2,
            meta_hash: [7; 32],
        };
        let b = sb.encode();
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        for i in [0, 17, 30, 70, 100] {
            let mut bad = b;
            bad[i] ^= 1;
            assert!(Superblock::decode(&bad).is_err(), "byte {i}");
        }
    }
}
