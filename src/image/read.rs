//! Reading an image in place: the API an engine lower layer is built on.
//!
//! [`Image`] is `Send + Sync`; every method takes `&self`, so FUSE worker threads share one.
//! What a lower layer needs maps one to one:
//!
//! | filesystem operation | `Image` |
//! |---|---|
//! | LOOKUP(parent, name) | [`Image::lookup`] (binary search of the sorted entries) then [`Image::getattr`] |
//! | GETATTR | [`Image::getattr`] → [`Attr`] (mode with type bits, nlink, owner, size, mtime, rdev) |
//! | READDIR(offset) | [`Image::readdir`] from an entry index; the index + 1 is the next offset |
//! | READLINK | [`Image::readlink`] |
//! | LISTXATTR / GETXATTR | [`Image::xattrs`] / [`Image::getxattr`] |
//! | READ(offset, size) | [`Image::read`] (only the blocks the range touches are decompressed) |
//! | copy-up | [`Image::read`] in a loop, or [`Image::copy_to`] (writes holes as holes) |
//!
//! Inode numbers are stable for the image's life (`1` is the root) and hard links share one.
//! Errors are `io::Error`s whose [`raw_os_error`](io::Error::raw_os_error) is the errno to
//! answer with ([`errno`]): `ENOENT`, `ENOTDIR`, `EISDIR`, `EINVAL`, `ENODATA`, and `EIO` for
//! an image that fails its checks (the message says what). The image never changes while it is
//! open, so the kernel may keep its page cache (`FOPEN_KEEP_CACHE`) and entry/attr timeouts may
//! be long.
//!
//! Data is read with `pread` (no mapping: a truncated file is an `EIO`, not a `SIGBUS`), its
//! BLAKE3 checked, decompressed, and kept in a bounded cache of decompressed blocks shared by
//! all threads.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::*;

/// An image's failure to pass its checks: the message names what (an `EIO` for a caller that
/// wants an errno).
pub type ImageError = io::Error;

fn corrupt(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("corrupt image: {what}"))
}

fn os(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// The errno a filesystem should answer for an error from [`Image`]: its own when it has
/// one, else `EIO` (a failed check, or a read error of the file).
pub fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// The attributes of one inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u32,
    /// `st_mode`: file type and permission bits.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes of content; a symlink's target length; for a directory, a size computed from
    /// its entries.
    pub size: u64,
    /// 512-byte blocks as a file of this size would use (holes not subtracted).
    pub blocks: u64,
    /// Modification time (also reported as atime and ctime).
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Device number of a character or block device, else 0.
    pub rdev: u64,
}

impl Attr {
    /// `DT_*` type of the inode.
    pub fn dtype(&self) -> u8 {
        dtype_of(self.mode)
    }
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }
}

/// Counts of an image's tree ([`Image::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Regular files (a file with hard links counts once), directories, symlinks, others.
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub special: u64,
    /// Distinct non-empty contents and their total size.
    pub distinct: u64,
    pub data_bytes: u64,
    /// Compressed size of all data blocks.
    pub stored_bytes: u64,
}

/// One directory entry, borrowed from the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub name: &'a [u8],
    pub ino: u32,
    /// `DT_*` type of the entry.
    pub dtype: u8,
}

thread_local! {
    /// Each reading thread's zstd context, kept between blocks.
    static DCTX: std::cell::RefCell<Option<zstd::zstd_safe::DCtx<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// A block's first decompression stops at the zstd block boundary after the bytes the read
/// needs (a file packed at the start of a 512 KiB block costs one 128 KiB zstd block, not the
/// whole block); what is decompressed is a multiple of this, unless it is the whole block.
const PREFIX_STEP: usize = 128 << 10;

/// How many bytes of a block of `ulen` bytes to decompress for a read that needs its first
/// `need`: whole steps, or all of it when that leaves little out (the rest would likely be
/// wanted soon, and a second load starts again from the beginning).
fn prefix_len(need: usize, ulen: usize) -> usize {
    let want = need.div_ceil(PREFIX_STEP).max(1) * PREFIX_STEP;
    if want >= ulen - ulen / 4 { ulen } else { want }
}

/// A zstd output buffer over uninitialized memory: decompression writes it once, so zeroing
/// it first (and faulting every page in twice over) would be wasted.
struct Uninit<'a> {
    buf: &'a mut [std::mem::MaybeUninit<u8>],
    filled: usize,
}

// SAFETY: `as_mut_ptr` is valid for `capacity` bytes, `as_slice` covers only the bytes
// `filled_until` declared written.
unsafe impl zstd::zstd_safe::WriteBuf for Uninit<'_> {
    fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `filled` bytes were written (see `filled_until`).
        unsafe { std::slice::from_raw_parts(self.buf.as_ptr().cast(), self.filled) }
    }
    fn capacity(&self) -> usize {
        self.buf.len()
    }
    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.buf.as_mut_ptr().cast()
    }
    unsafe fn filled_until(&mut self, n: usize) {
        self.filled = n;
    }
}

/// Decompresses the first `len` bytes of the zstd frame `z`, whose whole content is `ulen`
/// bytes, into a new shared buffer; fails unless exactly that many came out.
fn decompress_prefix(z: &[u8], len: usize, ulen: usize) -> io::Result<Arc<[u8]>> {
    use zstd::zstd_safe::{DCtx, InBuffer, OutBuffer, ResetDirective};
    let mut d = Arc::<[u8]>::new_uninit_slice(len);
    let mut out = Uninit {
        buf: Arc::get_mut(&mut d).expect("not shared yet"),
        filled: 0,
    };
    let err = |c: usize| corrupt(zstd::zstd_safe::get_error_name(c));
    DCTX.with(|c| -> io::Result<()> {
        let mut slot = c.borrow_mut();
        let dc = slot.get_or_insert_with(DCtx::create);
        if len == ulen {
            // The whole frame, in one pass straight into the buffer; an error if it holds more.
            dc.decompress(&mut out, z).map_err(err)?;
        } else {
            dc.reset(ResetDirective::SessionOnly).map_err(err)?;
            let mut input = InBuffer::around(z);
            let mut o = OutBuffer::around(&mut out);
            // Stops when the buffer is full; a frame that ends first is short (checked below).
            while o.pos() < len {
                let before = (input.pos(), o.pos());
                let hint = dc.decompress_stream(&mut o, &mut input).map_err(err)?;
                if hint == 0 || before == (input.pos(), o.pos()) {
                    break;
                }
            }
        }
        Ok(())
    })?;
    if out.filled != len {
        return Err(corrupt("a block has the wrong size"));
    }
    // SAFETY: all `len` bytes were written by the decompressor (checked just above).
    Ok(unsafe { d.assume_init() })
}

/// Decompressed blocks, bounded by bytes; evicts the least recently used. Sharded by block
/// number so threads reading different blocks do not wait on one lock. A block being loaded
/// is marked, so threads that want it at the same time (the kernel's parallel readahead into
/// one block) wait for that load instead of decompressing it again.
struct BlockCache {
    shards: Vec<(Mutex<Shard>, Condvar)>,
    per_shard: usize,
    tick: AtomicU64,
}

#[derive(Default)]
struct Shard {
    map: HashMap<u32, (Arc<[u8]>, u64)>,
    loading: HashSet<u32>,
    bytes: usize,
}

const SHARDS: usize = 16;

/// Clears a block's loading mark and wakes its waiters, also if the load unwinds.
struct Loading<'a> {
    cache: &'a BlockCache,
    b: u32,
}

impl Drop for Loading<'_> {
    fn drop(&mut self) {
        let (m, cv) = &self.cache.shards[self.b as usize % SHARDS];
        m.lock()
            .unwrap_or_else(|e| e.into_inner())
            .loading
            .remove(&self.b);
        cv.notify_all();
    }
}

impl BlockCache {
    fn new(bytes: usize) -> BlockCache {
        BlockCache {
            shards: (0..SHARDS).map(|_| Default::default()).collect(),
            per_shard: bytes / SHARDS,
            tick: AtomicU64::new(0),
        }
    }

    /// The cached block if it holds at least its first `need` bytes, else `load(had)`'s
    /// (`had`: how many bytes the cache held of it), loaded by one thread at a time.
    fn get_or_load(
        &self,
        b: u32,
        need: usize,
        load: impl FnOnce(usize) -> io::Result<Arc<[u8]>>,
    ) -> io::Result<Arc<[u8]>> {
        let (m, cv) = &self.shards[b as usize % SHARDS];
        let mut s = m.lock().unwrap();
        let had = loop {
            let t = self.tick.fetch_add(1, Ordering::Relaxed);
            let had = match s.map.get_mut(&b) {
                Some(e) if e.0.len() >= need => {
                    e.1 = t;
                    return Ok(e.0.clone());
                }
                Some(e) => e.0.len(),
                None => 0,
            };
            if s.loading.insert(b) {
                break had;
            }
            s = cv.wait(s).unwrap();
        };
        drop(s);
        let _mark = Loading { cache: self, b };
        let d = load(had)?;
        self.put(b, d.clone());
        Ok(d)
    }

    /// Whether some of block `b` is cached (or being loaded).
    fn contains(&self, b: u32) -> bool {
        let s = self.shards[b as usize % SHARDS].0.lock().unwrap();
        s.map.contains_key(&b) || s.loading.contains(&b)
    }

    fn put(&self, b: u32, data: Arc<[u8]>) {
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut s = self.shards[b as usize % SHARDS].0.lock().unwrap();
        let len = data.len();
        if let Some(old) = s.map.insert(b, (data, t)) {
            s.bytes -= old.0.len();
        }
        s.bytes += len;
        // At least the block just read stays, whatever the bound.
        while s.bytes > self.per_shard && s.map.len() > 1 {
            let (&k, _) = s
                .map
                .iter()
                .filter(|(k, _)| **k != b)
                .min_by_key(|(_, v)| v.1)
                .unwrap();
            let old = s.map.remove(&k).unwrap();
            s.bytes -= old.0.len();
        }
    }
}

/// The decompressed metadata, decompressed a frame at a time as it is first read: a start
/// that looks up a few hundred names of 50 000 decompresses a fraction of it (a whole 4 MB
/// section took 3-4 ms of every start). Frames are found by their headers, so an image
/// written with the metadata in one frame reads the same (all of it at the first access).
struct Meta {
    /// The compressed section, kept for the frames not decompressed yet.
    z: Vec<u8>,
    /// Per frame: (offset in `z`, compressed size, offset in the decompressed bytes).
    frames: Vec<(usize, usize, usize)>,
    /// The decompressed bytes, `len` of them; frame `f`'s range is written once, by the
    /// thread that runs `done[f]`'s initialization, and read only after it completed.
    buf: std::ptr::NonNull<std::mem::MaybeUninit<u8>>,
    len: usize,
    /// Per frame: whether it decompressed to exactly its range (once set, never changes).
    done: Box<[std::sync::OnceLock<bool>]>,
}

// SAFETY: `buf` is owned; each range is written once before its `OnceLock` completes and only
// read (through shared slices) after, so threads never see a byte being written.
unsafe impl Send for Meta {}
unsafe impl Sync for Meta {}

impl Drop for Meta {
    fn drop(&mut self) {
        // SAFETY: made from a boxed slice of `len` in `new`, dropped once.
        drop(unsafe {
            Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                self.buf.as_ptr(),
                self.len,
            ))
        });
    }
}

impl Meta {
    /// Finds the frames of the compressed section `z` (checked against its hash already),
    /// which must decompress to `len` bytes in all.
    fn new(z: Vec<u8>, len: u64) -> io::Result<Meta> {
        use zstd::zstd_safe;
        if len > MAX_META {
            return Err(corrupt("the metadata is too large"));
        }
        let len = len as usize;
        let mut frames = Vec::new();
        let (mut pos, mut upos) = (0usize, 0usize);
        while pos < z.len() {
            let rest = &z[pos..];
            let clen = zstd_safe::find_frame_compressed_size(rest)
                .map_err(|_| corrupt("the metadata is not zstd frames"))?;
            let ulen = match zstd_safe::get_frame_content_size(rest) {
                Ok(Some(n)) => n,
                _ => return Err(corrupt("a metadata frame does not say its size")),
            };
            let uend = (upos as u64).checked_add(ulen).filter(|&e| e <= len as u64);
            let Some(uend) = uend else {
                return Err(corrupt("the metadata has the wrong size"));
            };
            frames.push((pos, clen, upos));
            pos += clen;
            upos = uend as usize;
        }
        if upos != len {
            return Err(corrupt("the metadata has the wrong size"));
        }
        let buf = Box::into_raw(Box::<[u8]>::new_uninit_slice(len));
        Ok(Meta {
            z,
            done: (0..frames.len()).map(|_| Default::default()).collect(),
            frames,
            // SAFETY: from a box, never null.
            buf: unsafe { std::ptr::NonNull::new_unchecked(buf.cast()) },
            len,
        })
    }

    /// Bytes `start..end`, decompressing the frames they lie in first if need be.
    fn get(&self, start: usize, end: usize) -> io::Result<&[u8]> {
        if start > end || end > self.len {
            return Err(corrupt("a record lies outside the metadata"));
        }
        if start < end {
            let first = self.frames.partition_point(|f| f.2 <= start) - 1;
            let last = self.frames.partition_point(|f| f.2 < end) - 1;
            for f in first..=last {
                if !*self.done[f].get_or_init(|| self.decompress(f)) {
                    return Err(corrupt(format!("metadata frame {f} does not decompress")));
                }
            }
        }
        // SAFETY: in bounds, and every byte of the range was written (its frames are done).
        Ok(unsafe { std::slice::from_raw_parts(self.buf.as_ptr().add(start).cast(), end - start) })
    }

    /// Decompresses frame `f` into its range; whether it filled it exactly.
    fn decompress(&self, f: usize) -> bool {
        let (pos, clen, upos) = self.frames[f];
        let uend = self.frames.get(f + 1).map_or(self.len, |n| n.2);
        // SAFETY: this frame's range, written only here, once (inside its OnceLock), and read
        // by nobody until that completes.
        let range =
            unsafe { std::slice::from_raw_parts_mut(self.buf.as_ptr().add(upos), uend - upos) };
        let mut out = Uninit {
            buf: range,
            filled: 0,
        };
        let full = out.buf.len();
        let ok = DCTX.with(|c| {
            let mut slot = c.borrow_mut();
            let dc = slot.get_or_insert_with(zstd::zstd_safe::DCtx::create);
            dc.decompress(&mut out, &self.z[pos..pos + clen]).is_ok()
        });
        ok && out.filled == full
    }
}

/// An open image. See the module documentation for the API a lower layer uses.
pub struct Image {
    file: File,
    base: u64,
    sb: Superblock,
    meta: Meta,
    /// (offset, count) of each metadata table.
    tables: [(usize, usize); TABLES],
    cache: BlockCache,
    loads: AtomicU64,
    /// Per inode: the directory that names it, for directories its checked parent claimed.
    parents: Box<[AtomicU32]>,
    /// A bit per inode: a directory [`Image::check_dir`] passed.
    checked: Box<[AtomicU64]>,
    /// A bit per block: read by a file read since the image was opened ...
    touched_bits: Box<[AtomicU64]>,
    /// ... and those blocks in the order they were first read (see [`Image::touched_blocks`]).
    touched: Mutex<Vec<u32>>,
}

/// At most this many blocks are remembered as touched (a start's working set is tens).
const MAX_TOUCHED: usize = 4096;

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("base", &self.base)
            .field("superblock", &self.sb)
            .finish_non_exhaustive()
    }
}

/// Default bound of the decompressed-block cache.
pub const DEFAULT_CACHE: usize = 64 << 20;

impl Image {
    /// Opens the image that starts at byte `offset` of `file`: reads and checks the
    /// superblock, reads, checks and decompresses the metadata. `cache_bytes` bounds the
    /// decompressed blocks kept in memory ([`DEFAULT_CACHE`] is a good start).
    pub fn open(file: File, offset: u64, cache_bytes: usize) -> io::Result<Image> {
        let mut b = [0u8; SUPERBLOCK_LEN as usize];
        file.read_exact_at(&mut b, offset)
            .map_err(|e| read_err(e, "superblock"))?;
        let sb = Superblock::decode(&b).map_err(corrupt)?;
        let flen = file.metadata()?.len();
        if offset.checked_add(sb.image_len).is_none_or(|e| e > flen) {
            return Err(corrupt("the file ends before the image does (truncated?)"));
        }
        let mut mz = vec![0u8; sb.meta_clen as usize];
        file.read_exact_at(&mut mz, offset + sb.meta_offset)
            .map_err(|e| read_err(e, "metadata"))?;
        if *blake3::hash(&mz).as_bytes() != sb.meta_hash {
            return Err(corrupt("the metadata does not match its hash"));
        }
        let meta = Meta::new(mz, sb.meta_len)?;
        let head = meta.get(0, META_HEADER_LEN.min(sb.meta_len as usize))?;
        if head.len() < META_HEADER_LEN || &head[..8] != META_MAGIC {
            return Err(corrupt("the metadata has the wrong size or magic"));
        }
        let mut tables = [(0usize, 0usize); TABLES];
        let mut end = META_HEADER_LEN as u64;
        for (i, t) in tables.iter_mut().enumerate() {
            let off = u64_at(head, 8 + i * 16);
            let count = u64_at(head, 16 + i * 16);
            let len = count.checked_mul(RECORD_LEN[i] as u64);
            if off != end || len.is_none_or(|l| off + l > sb.meta_len) {
                return Err(corrupt("a metadata table lies outside the metadata"));
            }
            end = off + len.unwrap();
            *t = (off as usize, count as usize);
        }
        if tables[T_INODES].1 != sb.inodes as usize || tables[T_BLOCKS].1 != sb.blocks as usize {
            return Err(corrupt("the metadata does not match the superblock"));
        }
        let sb_inodes = sb.inodes as usize;
        let sb_blocks = sb.blocks as usize;
        let img = Image {
            file,
            base: offset,
            sb,
            meta,
            tables,
            cache: BlockCache::new(cache_bytes),
            loads: AtomicU64::new(0),
            parents: (0..=sb_inodes).map(|_| AtomicU32::new(0)).collect(),
            checked: (0..=sb_inodes / 64).map(|_| AtomicU64::new(0)).collect(),
            touched_bits: (0..=sb_blocks / 64).map(|_| AtomicU64::new(0)).collect(),
            touched: Mutex::new(Vec::new()),
        };
        if !img.getattr(ROOT_INO)?.is_dir() {
            return Err(corrupt("the root is not a directory"));
        }
        Ok(img)
    }

    /// Checks what every user of a directory relies on, the first time it is used (checking
    /// the whole tree at open took 3-4 ms of every start for 50 000 entries, of which a run
    /// touches a few hundred), so a crafted image (its hashes match, its structure lies) gives
    /// `EIO` for the directory it spoils, never a loop or a wrong answer: names are names (not
    /// empty, `.`, `..`, no `/` or NUL), entries strictly sorted (binary search, no
    /// duplicates), types as the inodes say, and every directory but the root named by one
    /// parent only (no loops, no directory hard links: a directory is only reached through its
    /// parent, which is checked first and claims it).
    fn check_dir(&self, ino: u32, first: usize, count: usize) -> io::Result<()> {
        let word = &self.checked[ino as usize / 64];
        let bit = 1u64 << (ino % 64);
        if word.load(Ordering::Acquire) & bit != 0 {
            return Ok(());
        }
        let mut prev: Option<&[u8]> = None;
        let mut subdirs = HashSet::new();
        for i in first..first.saturating_add(count) {
            let e = self.dirent(i)?;
            if e.name.is_empty()
                || e.name == b"."
                || e.name == b".."
                || e.name.contains(&b'/')
                || e.name.contains(&0)
            {
                return Err(corrupt(format!("directory {ino} has an invalid name")));
            }
            if prev.is_some_and(|p| p >= e.name) {
                return Err(corrupt(format!("directory {ino} is not sorted")));
            }
            prev = Some(e.name);
            let mode = u32_at(self.inode(e.ino)?, 0);
            if dtype_of(mode) != e.dtype {
                return Err(corrupt(format!(
                    "an entry of directory {ino} has the wrong type"
                )));
            }
            if mode & libc::S_IFMT == libc::S_IFDIR {
                // The first parent checked claims the directory; it stays claimed.
                let claim = self.parents[e.ino as usize].compare_exchange(
                    0,
                    ino,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                // (Claimed by `ino` already: by another check of it, or by an earlier entry.)
                if e.ino == ROOT_INO || claim.is_err_and(|p| p != ino) || !subdirs.insert(e.ino) {
                    return Err(corrupt(format!("directory {} is named twice", e.ino)));
                }
            }
        }
        word.fetch_or(bit, Ordering::Release);
        Ok(())
    }

    /// Checks every directory (what [`Image::check_dir`] does as each is first used): for
    /// `--ovl-verify` and whole-tree walks.
    pub fn check_tree(&self) -> io::Result<()> {
        // Parents before children (directories are reached from the root), as use does.
        let mut stack = vec![ROOT_INO];
        while let Some(dir) = stack.pop() {
            let (first, count) = self.dir_range(dir)?;
            for i in first..first + count {
                let e = self.dirent(i)?;
                if e.dtype == libc::DT_DIR {
                    stack.push(e.ino);
                }
            }
        }
        // A directory no checked parent claims is unreachable: nothing can use it.
        Ok(())
    }

    /// The superblock (sizes, block size).
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Number of inodes (the largest inode number).
    pub fn inodes(&self) -> u32 {
        self.sb.inodes
    }

    /// Record `i` of table `t`, bounds-checked (a crafted index is an error, not a panic).
    fn record(&self, t: usize, i: usize) -> io::Result<&[u8]> {
        let (off, count) = self.tables[t];
        if i >= count {
            return Err(corrupt("an index points outside its table"));
        }
        let len = RECORD_LEN[t];
        self.meta.get(off + i * len, off + (i + 1) * len)
    }

    fn pool(&self, off: u32, len: usize) -> io::Result<&[u8]> {
        let (start, count) = self.tables[T_POOL];
        let end = (off as usize).checked_add(len).filter(|&e| e <= count);
        match end {
            Some(e) => self.meta.get(start + off as usize, start + e),
            None => Err(corrupt("a name points outside the metadata")),
        }
    }

    fn inode(&self, ino: u32) -> io::Result<&[u8]> {
        if ino == 0 || ino > self.sb.inodes {
            return Err(os(libc::ENOENT));
        }
        self.record(T_INODES, ino as usize - 1)
    }

    /// The attributes of `ino`.
    pub fn getattr(&self, ino: u32) -> io::Result<Attr> {
        let r = self.inode(ino)?;
        let mode = u32_at(r, 0);
        let size = u64_at(r, 16);
        let fmt = mode & libc::S_IFMT;
        let rdev = if fmt == libc::S_IFCHR || fmt == libc::S_IFBLK {
            u32_at(r, 40) as u64 | (u32_at(r, 44) as u64) << 32
        } else {
            0
        };
        Ok(Attr {
            ino,
            mode,
            uid: u32_at(r, 4),
            gid: u32_at(r, 8),
            nlink: u32_at(r, 12),
            size,
            blocks: size.div_ceil(512),
            mtime: u64_at(r, 24) as i64,
            mtime_nsec: u32_at(r, 32),
            rdev,
        })
    }

    /// (first entry, count) of directory `ino`.
    /// A directory's entries (first index, count), checked the first time (see
    /// [`Image::check_dir`]).
    fn dir_range(&self, ino: u32) -> io::Result<(usize, usize)> {
        let r = self.inode(ino)?;
        if u32_at(r, 0) & libc::S_IFMT != libc::S_IFDIR {
            return Err(os(libc::ENOTDIR));
        }
        let (first, count) = (u32_at(r, 40) as usize, u32_at(r, 44) as usize);
        self.check_dir(ino, first, count)?;
        Ok((first, count))
    }

    fn dirent(&self, i: usize) -> io::Result<DirEntry<'_>> {
        let r = self.record(T_DIRENTS, i)?;
        let name = self.pool(u32_at(r, 0), u16_at(r, 8) as usize)?;
        Ok(DirEntry {
            name,
            ino: u32_at(r, 4),
            dtype: r[10],
        })
    }

    /// The inode of `name` in directory `dir`: `None` if there is no such entry, `ENOTDIR` if
    /// `dir` is not a directory.
    pub fn lookup(&self, dir: u32, name: &[u8]) -> io::Result<Option<u32>> {
        let (first, count) = self.dir_range(dir)?;
        let (mut lo, mut hi) = (0usize, count);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.dirent(first + mid)?;
            match e.name.cmp(name) {
                std::cmp::Ordering::Equal => return Ok(Some(e.ino)),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        Ok(None)
    }

    /// Number of entries of directory `dir` (without `.` and `..`).
    pub fn dir_len(&self, dir: u32) -> io::Result<usize> {
        Ok(self.dir_range(dir)?.1)
    }

    /// The entries of directory `dir` from index `start` on, sorted by name (without `.` and
    /// `..`).
    pub fn readdir(
        &self,
        dir: u32,
        start: usize,
    ) -> io::Result<impl Iterator<Item = io::Result<DirEntry<'_>>> + '_> {
        let (first, count) = self.dir_range(dir)?;
        Ok((start.min(count)..count).map(move |i| self.dirent(first + i)))
    }

    /// The target of symlink `ino` (`EINVAL` for another type, as readlink(2)).
    pub fn readlink(&self, ino: u32) -> io::Result<&[u8]> {
        let r = self.inode(ino)?;
        if u32_at(r, 0) & libc::S_IFMT != libc::S_IFLNK {
            return Err(os(libc::EINVAL));
        }
        let len = usize::try_from(u64_at(r, 16)).map_err(|_| corrupt("symlink length"))?;
        self.pool(u32_at(r, 40), len)
    }

    /// The xattrs of `ino`, sorted by name.
    pub fn xattrs(&self, ino: u32) -> io::Result<Vec<(&[u8], &[u8])>> {
        let set = u32_at(self.inode(ino)?, 36);
        if set == NO_XATTRS {
            return Ok(Vec::new());
        }
        let s = self.record(T_XSETS, set as usize)?;
        let (first, count) = (u32_at(s, 0) as usize, u32_at(s, 4) as usize);
        (first..first.saturating_add(count))
            .map(|i| {
                let x = self.record(T_XATTRS, i)?;
                Ok((
                    self.pool(u32_at(x, 0), u32_at(x, 4) as usize)?,
                    self.pool(u32_at(x, 8), u32_at(x, 12) as usize)?,
                ))
            })
            .collect()
    }

    /// The value of xattr `name` of `ino`; `ENODATA` if it has none of that name.
    pub fn getxattr(&self, ino: u32, name: &[u8]) -> io::Result<&[u8]> {
        let all = self.xattrs(ino)?;
        match all.binary_search_by(|(k, _)| (*k).cmp(name)) {
            Ok(i) => Ok(all[i].1),
            Err(_) => Err(os(libc::ENODATA)),
        }
    }

    /// listxattr(2)'s answer: the names, each followed by a NUL.
    pub fn listxattr(&self, ino: u32) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        for (k, _) in self.xattrs(ino)? {
            out.extend_from_slice(k);
            out.push(0);
        }
        Ok(out)
    }

    /// Size and first extent of regular file `ino`.
    fn file(&self, ino: u32) -> io::Result<(u64, usize)> {
        let r = self.inode(ino)?;
        match u32_at(r, 0) & libc::S_IFMT {
            libc::S_IFREG => Ok((u64_at(r, 16), u32_at(r, 40) as usize)),
            libc::S_IFDIR => Err(os(libc::EISDIR)),
            _ => Err(os(libc::EINVAL)),
        }
    }

    /// At least the first `need` bytes of block `b` decompressed, from the cache or the file.
    /// A first load decompresses a prefix ([`prefix_len`]); a block wanted beyond what is
    /// cached is decompressed whole.
    fn block(&self, b: u32, need: usize) -> io::Result<Arc<[u8]>> {
        self.cache.get_or_load(b, need, |had| {
            let r = self.record(T_BLOCKS, b as usize)?;
            let (pos, clen, ulen) = (u64_at(r, 0), u32_at(r, 8), u32_at(r, 12));
            if ulen > self.sb.block_size
                || pos < SUPERBLOCK_LEN
                || pos
                    .checked_add(clen as u64)
                    .is_none_or(|e| e > self.sb.meta_offset)
            {
                return Err(corrupt(format!("block {b} lies outside the data")));
            }
            let ulen = ulen as usize;
            if need > ulen {
                return Err(corrupt(format!("an extent lies outside block {b}")));
            }
            let z = self.read_stored(b, r)?;
            let len = if had > 0 {
                ulen
            } else {
                prefix_len(need, ulen)
            };
            let d = decompress_prefix(&z, len, ulen)
                .map_err(|e| corrupt(format!("block {b} does not decompress ({e})")))?;
            self.loads.fetch_add(1, Ordering::Relaxed);
            Ok(d)
        })
    }

    fn touch(&self, b: u32) {
        let (word, bit) = (&self.touched_bits[b as usize / 64], 1u64 << (b % 64));
        if word.load(Ordering::Relaxed) & bit == 0
            && word.fetch_or(bit, Ordering::Relaxed) & bit == 0
        {
            let mut t = self.touched.lock().unwrap();
            if t.len() < MAX_TOUCHED {
                t.push(b);
            }
        }
    }

    /// The blocks file reads have used since the image was opened, in the order of their first
    /// use: what a later start of the same program will likely read again (see
    /// [`Image::prefetch`]).
    pub fn touched_blocks(&self) -> Vec<u32> {
        self.touched.lock().unwrap().clone()
    }

    /// Decompresses the blocks `blocks` into the cache, in that order, skipping those cached
    /// already (or being loaded), numbers that name no block, and blocks that fail (a read that
    /// needs one reports it), until `budget` bytes are loaded or `stop` is set. Meant for a
    /// thread of its own started with the mount, given what [`Image::touched_blocks`] said at
    /// the end of an earlier run: the reads of a start then find their blocks decompressed on
    /// another core. Returns how many blocks it loaded.
    pub fn prefetch(&self, blocks: &[u32], budget: usize, stop: &AtomicBool) -> usize {
        let (mut loaded, mut bytes) = (0, 0usize);
        for &b in blocks {
            if bytes >= budget || stop.load(Ordering::Relaxed) {
                break;
            }
            let Ok(r) = self.record(T_BLOCKS, b as usize) else {
                continue;
            };
            let ulen = u32_at(r, 12) as usize;
            if self.cache.contains(b) || ulen > self.sb.block_size as usize {
                continue;
            }
            if self.block(b, ulen).is_ok() {
                loaded += 1;
                bytes += ulen;
            }
        }
        loaded
    }

    /// How many blocks have been read from the file and decompressed since the image was
    /// opened (cache misses).
    pub fn blocks_loaded(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// Reads up to `buf.len()` bytes of regular file `ino` at `offset`; returns how many (0
    /// at or past the end). Decompresses only the blocks the range touches.
    pub fn read(&self, ino: u32, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let (size, first) = self.file(ino)?;
        if offset >= size {
            return Ok(0);
        }
        let bs = self.sb.block_size as u64;
        let n = buf.len().min((size - offset) as usize);
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let piece = pos / bs;
            let piece_len = bs.min(size - piece * bs);
            let within = pos - piece * bs;
            let take = ((piece_len - within) as usize).min(n - done);
            let e = self.record(T_EXTENTS, first + piece as usize)?;
            let (block, boff) = (u32_at(e, 0), u32_at(e, 4) as u64);
            let dst = &mut buf[done..done + take];
            if block == HOLE {
                dst.fill(0);
            } else {
                // The whole piece must lie in the block, however little of it is read.
                let ulen = u32_at(self.record(T_BLOCKS, block as usize)?, 12);
                if boff + piece_len > ulen as u64 {
                    return Err(corrupt(format!(
                        "an extent of inode {ino} lies outside its block"
                    )));
                }
                let s = (boff + within) as usize;
                self.touch(block);
                let d = self.block(block, s + take)?;
                dst.copy_from_slice(&d[s..s + take]);
            }
            done += take;
        }
        Ok(n)
    }

    /// Whether the `block_size` piece of `ino` holding `offset` is a hole.
    fn is_hole(&self, first: usize, piece: u64) -> io::Result<bool> {
        Ok(u32_at(self.record(T_EXTENTS, first + piece as usize)?, 0) == HOLE)
    }

    /// Writes the content of regular file `ino` into `out` (at offset 0, which must be an
    /// empty file): holes are skipped and the length set at the end, so they stay holes.
    pub fn copy_to(&self, ino: u32, out: &File) -> io::Result<()> {
        let (size, first) = self.file(ino)?;
        let bs = self.sb.block_size as u64;
        let mut buf = vec![0u8; bs.min(size) as usize];
        let mut pos = 0;
        while pos < size {
            let len = bs.min(size - pos) as usize;
            if !self.is_hole(first, pos / bs)? {
                let n = self.read(ino, pos, &mut buf[..len])?;
                out.write_all_at(&buf[..n], pos)?;
            }
            pos += len as u64;
        }
        out.set_len(size)
    }

    /// Counts of the tree, for `--ovl-info` (one pass over the inode table).
    pub fn stats(&self) -> io::Result<Stats> {
        let mut st = Stats::default();
        let mut seen = std::collections::HashSet::new();
        for ino in 1..=self.sb.inodes {
            let r = self.inode(ino)?;
            match u32_at(r, 0) & libc::S_IFMT {
                libc::S_IFDIR => st.dirs += 1,
                libc::S_IFLNK => st.symlinks += 1,
                libc::S_IFREG => {
                    st.files += 1;
                    let size = u64_at(r, 16);
                    // Identical contents share their first extent.
                    if size > 0 && seen.insert(u32_at(r, 40)) {
                        st.distinct += 1;
                        st.data_bytes += size;
                    }
                }
                _ => st.special += 1,
            }
        }
        for b in 0..self.sb.blocks {
            st.stored_bytes += u32_at(self.record(T_BLOCKS, b as usize)?, 8) as u64;
        }
        Ok(st)
    }

    /// Checks every directory and reads and checks every block (and so every file's content):
    /// what `--ovl-verify` does.
    pub fn verify(&self) -> io::Result<()> {
        self.check_tree()?;
        for b in 0..self.sb.blocks {
            self.read_stored(b, self.record(T_BLOCKS, b as usize)?)?;
        }
        Ok(())
    }

    /// The compressed bytes of block `b` (record `r`), read from the file and checked
    /// against their BLAKE3.
    fn read_stored(&self, b: u32, r: &[u8]) -> io::Result<Vec<u8>> {
        let (pos, clen) = (u64_at(r, 0), u32_at(r, 8));
        let mut z = vec![0u8; clen as usize];
        self.file
            .read_exact_at(&mut z, self.base + pos)
            .map_err(|e| read_err(e, "data"))?;
        if blake3::hash(&z).as_bytes() != &r[16..48] {
            return Err(corrupt(format!("block {b} does not match its hash")));
        }
        Ok(z)
    }
}

fn read_err(e: io::Error, what: &str) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        corrupt(format!("the file ends inside the {what} (truncated?)"))
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keeps_its_bound_and_the_newest_block() {
        let c = BlockCache::new(SHARDS * 100);
        for b in 0..64u32 {
            c.put(b * SHARDS as u32, vec![b as u8; 60].into());
        }
        // One shard, room for one 60-byte block.
        assert_eq!(c.shards[0].0.lock().unwrap().map.len(), 1);
        let fail = |_| -> io::Result<Arc<[u8]>> { Err(os(libc::EIO)) };
        assert_eq!(c.get_or_load(63 * SHARDS as u32, 60, fail).unwrap()[0], 63);
        assert!(c.get_or_load(0, 1, fail).is_err());
        // A failed load leaves no mark behind: the next one runs.
        assert_eq!(c.get_or_load(0, 1, |_| Ok(vec![7].into())).unwrap()[0], 7);
        // A cached prefix too short for a read is loaded again, told how much was there.
        let had = std::cell::Cell::new(usize::MAX);
        let grow = |h| {
            had.set(h);
            Ok(vec![8; 2].into())
        };
        assert_eq!(c.get_or_load(0, 2, grow).unwrap().len(), 2);
        assert_eq!(had.get(), 1);
        assert_eq!(c.get_or_load(0, 2, fail).unwrap()[1], 8);
    }

    fn frames(data: &[u8], piece: usize) -> Vec<u8> {
        data.chunks(piece)
            .flat_map(|c| zstd::bulk::compress(c, 3).unwrap())
            .collect()
    }

    #[test]
    fn metadata_frames_decompress_when_first_read() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let m = Meta::new(frames(&data, 65536), data.len() as u64).unwrap();
        assert_eq!(m.frames.len(), 5);
        assert!(m.done.iter().all(|d| d.get().is_none()));
        // A range across the boundary of frames 1 and 2 decompresses those two only.
        assert_eq!(m.get(100_000, 140_000).unwrap(), &data[100_000..140_000]);
        let done: Vec<bool> = m.done.iter().map(|d| d.get().is_some()).collect();
        assert_eq!(done, [false, true, true, false, false]);
        assert_eq!(m.get(0, data.len()).unwrap(), &data[..]);
        assert_eq!(m.get(5, 5).unwrap(), b"");
        assert!(m.get(0, data.len() + 1).is_err());
        // One frame (images written before the frames) reads the same.
        let one = Meta::new(frames(&data, data.len()), data.len() as u64).unwrap();
        assert_eq!(one.get(299_000, 300_000).unwrap(), &data[299_000..]);
        // Sizes that do not add up are refused at open.
        assert!(Meta::new(frames(&data, 65536), data.len() as u64 - 1).is_err());
        assert!(Meta::new(frames(&data, 65536), data.len() as u64 + 1).is_err());
    }

    #[test]
    fn a_bad_metadata_frame_fails_the_reads_of_its_range_only() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        // With zstd's own checksums, so that a damaged frame is sure to fail (the image's
        // frames rely on the BLAKE3 of the whole section instead).
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.include_checksum(true).unwrap();
        let mut z: Vec<u8> = data
            .chunks(65536)
            .flat_map(|p| c.compress(p).unwrap())
            .collect();
        let m = Meta::new(z.clone(), data.len() as u64).unwrap();
        // Damage the middle of frame 1's compressed bytes (headers intact, so it opens).
        let (pos, clen, _) = m.frames[1];
        for b in &mut z[pos + clen / 2..pos + clen / 2 + 8] {
            *b ^= 0x5a;
        }
        let m = Meta::new(z, data.len() as u64).unwrap();
        assert!(m.get(70_000, 70_010).is_err());
        assert!(m.get(70_000, 70_010).is_err(), "it stays an error");
        assert_eq!(m.get(10, 20).unwrap(), &data[10..20]);
        assert_eq!(m.get(150_000, 150_010).unwrap(), &data[150_000..150_010]);
    }

    #[test]
    fn prefixes_are_whole_steps_or_the_whole_block() {
        let k = PREFIX_STEP;
        assert_eq!(prefix_len(1, 4 * k), k);
        assert_eq!(prefix_len(k, 4 * k), k);
        assert_eq!(prefix_len(k + 1, 4 * k), 2 * k);
        // Three quarters or more: all of it.
        assert_eq!(prefix_len(2 * k + 1, 4 * k), 4 * k);
        assert_eq!(prefix_len(10, 1000), 1000);
    }

    #[test]
    fn a_prefix_decompresses_exactly_and_a_short_frame_is_an_error() {
        let data: Vec<u8> = (0..600_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let z = zstd::bulk::compress(&data, 3).unwrap();
        let p = decompress_prefix(&z, PREFIX_STEP, data.len()).unwrap();
        assert_eq!(&p[..], &data[..PREFIX_STEP]);
        let all = decompress_prefix(&z, data.len(), data.len()).unwrap();
        assert_eq!(&all[..], &data[..]);
        // A frame that holds less than claimed, or more.
        assert!(decompress_prefix(&z, data.len() + 1, data.len() + 1).is_err());
        assert!(decompress_prefix(&z, data.len() - 1, data.len() - 1).is_err());
        let short = zstd::bulk::compress(&data[..1000], 3).unwrap();
        assert!(decompress_prefix(&short, PREFIX_STEP, data.len()).is_err());
    }
}
