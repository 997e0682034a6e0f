//! fsx-style random I/O data-integrity test: random operations on one file in the mount, every
//! result checked against an in-memory model of the expected content (a `Vec<u8>`).
//!
//! Operations: pwrite anywhere (past EOF too, leaving holes; through an O_APPEND descriptor it
//! appends), pread anywhere (content, zero-filled holes, exact short read at EOF), ftruncate and
//! truncate by path up and down, fallocate (plain, KEEP_SIZE, ZERO_RANGE, PUNCH_HOLE|KEEP_SIZE),
//! shared mmap reads and writes + msync within the size, fsync, close and reopen (sometimes
//! O_TRUNC), and a second descriptor (read-only, read-write or O_APPEND) used for a while to
//! check coherence. Sizes are checked with fstat after every operation.
//!
//! Runs: a file created in the mount; a file that starts in the lower layer (dense, sparse or
//! empty; read through a read-only descriptor first, then copied up by a write-open, O_TRUNC
//! or truncate by path), checked unchanged in the lower afterwards; both across remounts. Each
//! run ends by comparing the upper file with the model. Everything runs with passthrough (the
//! harness's mount as root) and without it (the kernel page cache in front of ovl's I/O).
//!
//! Reproduce a failing run with `OVL_FSX_SEED=<seed>` (and optionally `OVL_FSX_OPS=<n>`);
//! every failure message names its seed, the failing operation and the operations before it.

mod common;
use common::*;

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ovl::InodeMode;
use rand::{Rng, SeedableRng, rngs::StdRng};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
/// How many recent operations a failure report shows.
const LOG_LEN: usize = 40;

/// The seeds to run: `OVL_FSX_SEED` when set, else `defaults`.
fn seeds(defaults: &[u64]) -> Vec<u64> {
    match std::env::var("OVL_FSX_SEED") {
        Ok(s) => vec![s.trim().parse().expect("OVL_FSX_SEED must be an integer")],
        Err(_) => defaults.to_vec(),
    }
}

/// Operations per seed: `OVL_FSX_OPS` when set, else `default`.
fn nops(default: usize) -> usize {
    std::env::var("OVL_FSX_OPS")
        .ok()
        .map(|s| s.trim().parse().expect("OVL_FSX_OPS must be an integer"))
        .unwrap_or(default)
}

fn page_size() -> usize {
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }) as usize
}

/// truncate(2) by path (a setattr without a file handle).
fn truncate_path(path: &Path, size: usize) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    if unsafe { libc::truncate(c.as_ptr(), size as libc::off_t) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// Describes where `actual` differs from `expected` (same length assumed), or None.
fn diff(expected: &[u8], actual: &[u8], base: usize) -> Option<String> {
    if expected == actual {
        return None;
    }
    let first = expected.iter().zip(actual).position(|(a, b)| a != b)?;
    let last = expected
        .iter()
        .zip(actual)
        .rposition(|(a, b)| a != b)
        .unwrap();
    let bad = expected.iter().zip(actual).filter(|(a, b)| a != b).count();
    let end = (first + 16).min(expected.len());
    let zeros = actual[first..=last].iter().all(|&b| b == 0);
    Some(format!(
        "{bad} bytes differ in file range [{:#x}, {:#x}] (actual all zero there: {zeros}); \
         at {:#x}: expected {:02x?}, actual {:02x?}",
        base + first,
        base + last,
        base + first,
        &expected[first..end],
        &actual[first..end],
    ))
}

/// Random bytes cheap enough for unoptimised builds (rand's generators are slow there):
/// xorshift64* over whole words.
fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `v.resize(len, 0)`, as memset/memcpy: resize's element loop is slow in unoptimised builds.
fn resize_zeroed(v: &mut Vec<u8>, len: usize) {
    if len <= v.len() {
        v.truncate(len);
    } else {
        v.extend_from_slice(&vec![0u8; len - v.len()]);
    }
}

/// `s.fill(0)`, fast in unoptimised builds too.
fn zero(s: &mut [u8]) {
    s.copy_from_slice(&vec![0u8; s.len()]);
}

/// Which optional fallocate modes the stack supports (EOPNOTSUPP turns one off).
#[derive(Clone, Copy)]
struct Falloc {
    plain: bool,
    keep_size: bool,
    punch: bool,
    zero: bool,
}

/// How the second descriptor was opened.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fd2Mode {
    ReadOnly,
    ReadWrite,
    /// O_RDWR | O_APPEND: every write lands at EOF, whatever offset pwrite names.
    Append,
}

/// A second descriptor on the file, closed after `left` more operations.
struct Fd2 {
    file: File,
    mode: Fd2Mode,
    left: usize,
    /// Opened before the copy-up: not mapped, since a page fault that reads short (the old
    /// lower file is shorter) is a SIGBUS that would end the whole test binary.
    pre_copy_up: bool,
}

struct Fsx {
    name: String,
    seed: u64,
    rng: StdRng,
    path: PathBuf,
    model: Vec<u8>,
    max_size: usize,
    page: usize,
    fd: Option<File>,
    fd2: Option<Fd2>,
    opno: usize,
    log: VecDeque<String>,
    /// How many operations of each kind ran (by the first word of their log line).
    counts: BTreeMap<String, usize>,
    falloc: Falloc,
    /// Random bytes that written data is sliced from (at a random place each time).
    pool: Vec<u8>,
}

impl Fsx {
    fn new(name: &str, seed: u64, path: PathBuf, model: Vec<u8>, max_size: usize) -> Self {
        Fsx {
            name: name.to_string(),
            seed,
            rng: StdRng::seed_from_u64(seed),
            path,
            model,
            max_size,
            page: page_size(),
            fd: None,
            fd2: None,
            opno: 0,
            log: VecDeque::new(),
            counts: BTreeMap::new(),
            falloc: Falloc {
                plain: true,
                keep_size: true,
                punch: true,
                zero: true,
            },
            pool: random_bytes(seed ^ 0xda7a, 4 * MIB),
        }
    }

    /// `len` (at most 1 MiB) random bytes.
    fn data(&mut self, len: usize) -> Vec<u8> {
        let at = self.rng.gen_range(0..=self.pool.len() - len);
        self.pool[at..at + len].to_vec()
    }

    fn note(&mut self, s: String) {
        let kind = s.split(' ').next().unwrap_or_default();
        *self.counts.entry(kind.to_string()).or_default() += 1;
        if self.log.len() == LOG_LEN {
            self.log.pop_front();
        }
        self.log.push_back(format!("#{} {s}", self.opno));
    }

    #[track_caller]
    fn fail(&self, msg: String) -> ! {
        let log: Vec<&str> = self.log.iter().map(|s| s.as_str()).collect();
        panic!(
            "fsx {} seed {} failed at op #{} (reproduce: OVL_FSX_SEED={}): {msg}\n\
             model size {:#x}\nrecent ops:\n  {}",
            self.name,
            self.seed,
            self.opno,
            self.seed,
            self.model.len(),
            log.join("\n  ")
        );
    }

    fn fd(&self) -> &File {
        self.fd.as_ref().expect("file open")
    }

    fn open(&mut self, trunc: bool) {
        let r = OpenOptions::new()
            .read(true)
            .write(true)
            .truncate(trunc)
            .open(&self.path);
        match r {
            Ok(f) => self.fd = Some(f),
            Err(e) => self.fail(format!("open O_RDWR (trunc {trunc}): {e}")),
        }
        if trunc {
            self.model.clear();
        }
    }

    fn close(&mut self) {
        self.fd2 = None;
        self.fd = None;
    }

    /// A random offset: anywhere below the size limit, inside the file, near EOF or aligned.
    fn pick_offset(&mut self) -> usize {
        let size = self.model.len();
        let max = self.max_size;
        match self.rng.gen_range(0..100) {
            0..40 => self.rng.gen_range(0..max),
            40..70 if size > 0 => self.rng.gen_range(0..size),
            70..85 => {
                let lo = size.saturating_sub(2 * self.page);
                let hi = (size + 2 * self.page).min(max);
                self.rng.gen_range(lo..hi)
            }
            _ => self.rng.gen_range(0..max / self.page) * self.page,
        }
    }

    /// A random length >= 1: mostly small, sometimes up to 1 MiB, sometimes page multiples.
    fn pick_len(&mut self) -> usize {
        let len = match self.rng.gen_range(0..100) {
            0..40 => self.rng.gen_range(1..=512),
            40..70 => self.rng.gen_range(1..=16 * KIB),
            70..90 => self.rng.gen_range(1..=128 * KIB),
            _ => self.rng.gen_range(1..=MIB),
        };
        if self.rng.gen_ratio(1, 5) {
            len.div_ceil(self.page) * self.page
        } else {
            len
        }
    }

    /// Picks the descriptor for a data operation: the second one sometimes, when it suits.
    fn pick_fd(&mut self, write: bool) -> bool {
        match &self.fd2 {
            Some(f) => (!write || f.mode != Fd2Mode::ReadOnly) && self.rng.gen_ratio(1, 3),
            None => false,
        }
    }

    /// The descriptor `pick_fd` chose, its name for the log, and whether it appends.
    fn which(&self, second: bool) -> (&File, &'static str, bool) {
        match &self.fd2 {
            Some(f) if second => (&f.file, "fd2", f.mode == Fd2Mode::Append),
            _ => (self.fd(), "fd", false),
        }
    }

    fn check_size(&self, what: &str) {
        let want = self.model.len() as u64;
        match self.fd().metadata() {
            Ok(m) if m.len() == want => {}
            Ok(m) => self.fail(format!(
                "{what}: fstat size {:#x}, expected {want:#x}",
                m.len()
            )),
            Err(e) => self.fail(format!("{what}: fstat: {e}")),
        }
        if let Some(f2) = &self.fd2 {
            match f2.file.metadata() {
                Ok(m) if m.len() == want => {}
                Ok(m) => self.fail(format!(
                    "{what}: fstat(fd2) size {:#x}, expected {want:#x}",
                    m.len()
                )),
                Err(e) => self.fail(format!("{what}: fstat(fd2): {e}")),
            }
        }
    }

    fn check_path_size(&self) {
        let want = self.model.len() as u64;
        match std::fs::metadata(&self.path) {
            Ok(m) if m.len() == want => {}
            Ok(m) => self.fail(format!(
                "stat(path) size {:#x}, expected {want:#x}",
                m.len()
            )),
            Err(e) => self.fail(format!("stat(path): {e}")),
        }
    }

    /// One pread; returns the byte count. A regular file reads short only at EOF.
    fn read_once(&self, f: &File, buf: &mut [u8], off: usize, who: &str) -> usize {
        match f.read_at(buf, off as u64) {
            Ok(n) => n,
            Err(e) => self.fail(format!(
                "pread({who}, off {off:#x}, len {:#x}): {e}",
                buf.len()
            )),
        }
    }

    /// pread until `buf` is full or EOF; returns the byte count.
    fn read_full(&self, f: &File, buf: &mut [u8], off: usize, who: &str) -> usize {
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], (off + done) as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) => self.fail(format!(
                    "pread({who}, off {:#x}, len {:#x}): {e}",
                    off + done,
                    buf.len() - done
                )),
            }
        }
        done
    }

    /// Reads the whole file (and a bit past EOF) through the main descriptor and compares.
    fn verify_all(&mut self, what: &str) {
        self.check_size(what);
        let mut buf = vec![0xa5u8; self.model.len() + self.page];
        let n = self.read_full(self.fd(), &mut buf, 0, "fd");
        if n != self.model.len() {
            self.fail(format!(
                "{what}: full read returned {n:#x} bytes, expected {:#x}",
                self.model.len()
            ));
        }
        if let Some(d) = diff(&self.model, &buf[..n], 0) {
            self.fail(format!("{what}: full-file content: {d}"));
        }
    }

    fn op_write(&mut self) {
        let mut second = self.pick_fd(true);
        let size = self.model.len();
        if second && self.which(true).2 && size == self.max_size {
            second = false;
        }
        let (off, append) = if self.which(second).2 {
            // pwrite on an O_APPEND descriptor appends (Linux ignores the offset).
            (size, true)
        } else {
            (self.pick_offset().min(self.max_size - 1), false)
        };
        let len = self.pick_len().min(self.max_size - off);
        let data = self.data(len);
        let asked = if append {
            self.rng.gen_range(0..=self.max_size)
        } else {
            off
        };
        let (f, who, _) = self.which(second);
        let r = f.write_at(&data, asked as u64);
        self.note(format!(
            "pwrite({who}) off {off:#x} len {len:#x} end {:#x} (size {size:#x}{})",
            off + len,
            if append {
                format!(", O_APPEND, pwrite offset {asked:#x}")
            } else if off > size {
                ", past EOF".to_string()
            } else {
                String::new()
            }
        ));
        match r {
            Ok(n) if n == len => {}
            Ok(n) => self.fail(format!("pwrite wrote {n:#x} of {len:#x} bytes")),
            Err(e) => self.fail(format!("pwrite: {e}")),
        }
        if off + len > self.model.len() {
            resize_zeroed(&mut self.model, off + len);
        }
        self.model[off..off + len].copy_from_slice(&data);
    }

    fn op_read(&mut self) {
        let off = self.pick_offset();
        let len = self.pick_len();
        let size = self.model.len();
        let mut buf = vec![0xa5u8; len];
        let second = self.pick_fd(false);
        let who = self.which(second).1;
        self.note(format!(
            "pread({who}) off {off:#x} len {len:#x} (size {size:#x})"
        ));
        let n = self.read_once(self.which(second).0, &mut buf, off, who);
        let want = size.saturating_sub(off).min(len);
        if n != want {
            self.fail(format!("pread returned {n:#x} bytes, expected {want:#x}"));
        }
        if let Some(d) = diff(
            &self.model[off.min(size)..off.min(size) + want],
            &buf[..n],
            off,
        ) {
            self.fail(format!("pread content: {d}"));
        }
    }

    fn op_truncate(&mut self) {
        let size = self.model.len();
        let new = match self.rng.gen_range(0..100) {
            0..10 => 0,
            10..40 => self.rng.gen_range(0..=self.max_size),
            40..70 => {
                let lo = size.saturating_sub(2 * self.page);
                let hi = (size + 2 * self.page).min(self.max_size);
                self.rng.gen_range(lo..=hi)
            }
            _ => self.rng.gen_range(0..=size),
        };
        if self.rng.gen_ratio(1, 5) {
            self.note(format!("truncate(path) {size:#x} -> {new:#x}"));
            if let Err(e) = truncate_path(&self.path, new) {
                self.fail(format!("truncate(path): {e}"));
            }
        } else {
            self.note(format!("ftruncate {size:#x} -> {new:#x}"));
            if let Err(e) = self.fd().set_len(new as u64) {
                self.fail(format!("ftruncate: {e}"));
            }
        }
        resize_zeroed(&mut self.model, new);
    }

    fn fallocate(&mut self, mode: i32, off: usize, len: usize, name: &str) -> bool {
        let size = self.model.len();
        self.note(format!(
            "fallocate({name}) off {off:#x} len {len:#x} end {:#x} (size {size:#x})",
            off + len
        ));
        let r = unsafe { libc::fallocate(self.fd().as_raw_fd(), mode, off as i64, len as i64) };
        if r == 0 {
            return true;
        }
        let e = last_errno();
        if e == libc::EOPNOTSUPP {
            eprintln!(
                "fsx {}: fallocate({name}) not supported, skipping it",
                self.name
            );
            return false;
        }
        self.fail(format!(
            "fallocate({name}): {}",
            std::io::Error::from_raw_os_error(e)
        ));
    }

    fn op_fallocate(&mut self) {
        let off = self.pick_offset().min(self.max_size - 1);
        let len = self.pick_len().min(self.max_size - off);
        let size = self.model.len();
        let end = off + len;
        match self.rng.gen_range(0..4) {
            0 if self.falloc.plain => {
                if self.fallocate(0, off, len, "0") {
                    resize_zeroed(&mut self.model, size.max(end));
                } else {
                    self.falloc.plain = false;
                }
            }
            1 if self.falloc.keep_size => {
                // Blocks past EOF: no visible change (until a later size-up shows zeros).
                let ok = self.fallocate(libc::FALLOC_FL_KEEP_SIZE, off, len, "KEEP_SIZE");
                self.falloc.keep_size = ok;
            }
            2 if self.falloc.zero => {
                let keep = self.rng.gen_bool(0.5);
                let (mode, name) = if keep {
                    (
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                        "ZERO_RANGE|KEEP_SIZE",
                    )
                } else {
                    (libc::FALLOC_FL_ZERO_RANGE, "ZERO_RANGE")
                };
                if self.fallocate(mode, off, len, name) {
                    if !keep {
                        resize_zeroed(&mut self.model, size.max(end));
                    }
                    let zend = end.min(self.model.len());
                    if off < zend {
                        zero(&mut self.model[off..zend]);
                    }
                } else {
                    self.falloc.zero = false;
                }
            }
            _ if self.falloc.punch => {
                let mode = libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE;
                if self.fallocate(mode, off, len, "PUNCH_HOLE|KEEP_SIZE") {
                    let zend = end.min(size);
                    if off < zend {
                        zero(&mut self.model[off..zend]);
                    }
                } else {
                    self.falloc.punch = false;
                }
            }
            _ => {}
        }
    }

    /// A random range inside the current size (None for an empty file).
    fn pick_range_inside(&mut self) -> Option<(usize, usize)> {
        let size = self.model.len();
        if size == 0 {
            return None;
        }
        let off = if self.rng.gen_ratio(1, 4) {
            self.rng.gen_range(0..size.div_ceil(self.page)) * self.page
        } else {
            self.rng.gen_range(0..size)
        };
        let len = self.pick_len().min(size - off);
        Some((off, len))
    }

    fn op_mmap(&mut self, write: bool) {
        let Some((off, len)) = self.pick_range_inside() else {
            return;
        };
        let pa = off / self.page * self.page;
        let size = self.model.len();
        // A read that reaches EOF maps the rest of the last page too: it must read as zeros.
        let map_end = if !write && off + len == size {
            size.div_ceil(self.page) * self.page
        } else {
            off + len
        };
        let maplen = map_end - pa;
        let second = self.pick_fd(write) && self.fd2.as_ref().is_some_and(|f| !f.pre_copy_up);
        let (f, who, _) = self.which(second);
        let fd = f.as_raw_fd();
        self.note(format!(
            "mmap{}({who}) off {off:#x} len {len:#x} (map at {pa:#x} len {maplen:#x}, size {size:#x})",
            if write { "_write+msync" } else { "_read" }
        ));
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                maplen,
                prot,
                libc::MAP_SHARED,
                fd,
                pa as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            self.fail(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let rel = off - pa;
        if write {
            let data = self.data(len);
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>().add(rel), len);
            }
            if unsafe { libc::msync(p, maplen, libc::MS_SYNC) } != 0 {
                let e = std::io::Error::last_os_error();
                unsafe { libc::munmap(p, maplen) };
                self.fail(format!("msync: {e}"));
            }
            self.model[off..off + len].copy_from_slice(&data);
        } else {
            let got = unsafe { std::slice::from_raw_parts(p.cast::<u8>().add(rel), maplen - rel) };
            let mut want = self.model[off..off + len].to_vec();
            resize_zeroed(&mut want, maplen - rel);
            if let Some(d) = diff(&want, got, off) {
                unsafe { libc::munmap(p, maplen) };
                self.fail(format!("mmap read content (zeros past EOF): {d}"));
            }
        }
        if unsafe { libc::munmap(p, maplen) } != 0 {
            self.fail(format!("munmap: {}", std::io::Error::last_os_error()));
        }
    }

    fn op_reopen(&mut self) {
        let trunc = self.rng.gen_ratio(1, 4);
        self.note(format!("reopen{}", if trunc { " O_TRUNC" } else { "" }));
        self.close();
        self.open(trunc);
    }

    /// Opens a second descriptor (or uses the open one) and checks a random range through it.
    fn op_second_fd(&mut self) {
        if self.fd2.is_none() {
            let mode = match self.rng.gen_range(0..3) {
                0 => Fd2Mode::ReadOnly,
                1 => Fd2Mode::ReadWrite,
                _ => Fd2Mode::Append,
            };
            let left = self.rng.gen_range(5..60);
            self.note(format!("open_fd2 {mode:?} for {left} ops"));
            let r = OpenOptions::new()
                .read(true)
                .write(mode == Fd2Mode::ReadWrite)
                .append(mode == Fd2Mode::Append)
                .open(&self.path);
            match r {
                Ok(file) => {
                    self.fd2 = Some(Fd2 {
                        file,
                        mode,
                        left,
                        pre_copy_up: false,
                    })
                }
                Err(e) => self.fail(format!("open fd2 {mode:?}: {e}")),
            }
        }
        let off = self.pick_offset();
        let len = self.pick_len();
        let size = self.model.len();
        let mut buf = vec![0x5au8; len];
        self.note(format!(
            "fd2_check off {off:#x} len {len:#x} (size {size:#x})"
        ));
        let n = self.read_once(&self.fd2.as_ref().unwrap().file, &mut buf, off, "fd2");
        let want = size.saturating_sub(off).min(len);
        if n != want {
            self.fail(format!(
                "pread(fd2) returned {n:#x} bytes, expected {want:#x}"
            ));
        }
        if let Some(d) = diff(
            &self.model[off.min(size)..off.min(size) + want],
            &buf[..n],
            off,
        ) {
            self.fail(format!("pread(fd2) content: {d}"));
        }
    }

    fn op_fsync(&mut self) {
        let data = self.rng.gen_bool(0.5);
        self.note(if data { "fdatasync" } else { "fsync" }.to_string());
        let r = if data {
            self.fd().sync_data()
        } else {
            self.fd().sync_all()
        };
        if let Err(e) = r {
            self.fail(format!("fsync: {e}"));
        }
    }

    fn step(&mut self) {
        self.opno += 1;
        match self.rng.gen_range(0..100) {
            0..24 => self.op_write(),
            24..46 => self.op_read(),
            46..54 => self.op_truncate(),
            54..64 => self.op_fallocate(),
            64..72 => self.op_mmap(false),
            72..80 => self.op_mmap(true),
            80..83 => self.op_reopen(),
            83..91 => self.op_second_fd(),
            91..92 => self.op_fsync(),
            92..94 => {
                self.note("verify (full file)".into());
                self.verify_all("full verify");
            }
            _ => {
                self.note("stat(path)".into());
                self.check_path_size();
            }
        }
        self.check_size("after op");
        if let Some(f) = &mut self.fd2 {
            f.left -= 1;
            if f.left == 0 {
                self.note("close_fd2".into());
                self.fd2 = None;
            }
        }
    }

    /// Reads and mmap-reads through a read-only descriptor (a lower file stays in the lower).
    /// `keep`: the descriptor stays open as the second one, across the copy-up that the next
    /// write-open does.
    fn readonly_prelude(&mut self, ops: usize, keep: bool) {
        let f = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) => self.fail(format!("open O_RDONLY: {e}")),
        };
        self.fd = Some(f);
        for _ in 0..ops {
            self.opno += 1;
            if self.rng.gen_bool(0.7) {
                self.op_read();
            } else {
                self.op_mmap(false);
            }
            self.check_size("read-only prelude");
        }
        let file = self.fd.take().unwrap();
        if keep {
            let left = self.rng.gen_range(20..300);
            self.note(format!("keep_ro (read-only fd kept as fd2 for {left} ops)"));
            self.fd2 = Some(Fd2 {
                file,
                mode: Fd2Mode::ReadOnly,
                left,
                pre_copy_up: true,
            });
        } else {
            self.note("close_ro (read-only fd)".into());
        }
    }
}

/// A mount under test: the shared harness (passthrough on, as the kernel allows it for root),
/// or the same layers mounted with passthrough off, where the kernel page cache sits in front of
/// ovl's own read/write.
///
/// Without passthrough the mount is served by an `ovl-mount` process, not by threads of this
/// test process: munmap of a dirty shared mapping writes the pages back while holding this
/// process's mmap lock, and a server in the same process needs that lock to receive them
/// (deadlock, seen with parallel tests). Passthrough mappings never reach the server.
struct Target {
    m: Mounted,
    /// The mount when passthrough is off.
    cached: Option<Daemon>,
    /// Without passthrough: the kernel's writeback cache asked for too.
    writeback: bool,
}

/// How a run without passthrough mounts: odd seeds with the writeback cache.
fn writeback_for(seed: u64) -> bool {
    seed % 2 == 1
}

impl Target {
    fn new(passthrough: bool, seed: u64, mode: InodeMode, setup: impl FnOnce(&Path)) -> Self {
        Self::with_lower_kind(passthrough, seed, mode, lower_image_default(), setup)
    }

    /// [`Target::new`]; `image`: the lower is read in place from an image packed from it.
    fn with_lower_kind(
        passthrough: bool,
        seed: u64,
        mode: InodeMode,
        image: bool,
        setup: impl FnOnce(&Path),
    ) -> Self {
        let io = if passthrough {
            Io::Passthrough
        } else {
            Io::Cached
        };
        let mut m = Mounted::with_lower_kind(mode, io, image, setup);
        let writeback = !passthrough && writeback_for(seed);
        let cached = if passthrough {
            None
        } else {
            m.umount();
            Some(Self::mount_cached(&m, writeback))
        };
        Target {
            m,
            cached,
            writeback,
        }
    }

    fn mount_cached(m: &Mounted, writeback: bool) -> Daemon {
        Daemon::mount(m, writeback)
    }

    fn passthrough(&self) -> bool {
        self.cached.is_none()
    }

    fn remount(&mut self) {
        match &mut self.cached {
            None => self.m.remount(),
            Some(d) => {
                d.umount();
                *d = Self::mount_cached(&self.m, self.writeback);
            }
        }
    }
}

/// `ovl-mount -f` serving the layers of a [`Mounted`] (unmounted there first) at its mount
/// point, without passthrough.
struct Daemon {
    mnt: PathBuf,
    child: Option<std::process::Child>,
}

impl Daemon {
    fn mount(m: &Mounted, writeback: bool) -> Self {
        let mut o = format!(
            "lowerdir={},upperdir={},workdir={},nopassthrough",
            m.lower_layer().display(),
            m.upper.display(),
            m.work.display()
        );
        if writeback {
            o.push_str(",writeback");
        }
        if m.mode == InodeMode::Persistent {
            o.push_str(",inode_mode=persistent");
        }
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_ovl-mount"))
            .args(["-f", "-o", &o])
            .arg(&m.mnt)
            .spawn()
            .expect("start ovl-mount");
        let d = Daemon {
            mnt: m.mnt.clone(),
            child: Some(child),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !d.mounted() {
            assert!(
                std::time::Instant::now() < deadline,
                "ovl-mount did not mount"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        d
    }

    fn mounted(&self) -> bool {
        let want = self.mnt.to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
    }

    /// Unmounts and waits for the server to exit (it must, cleanly).
    fn umount(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        for _ in 0..100 {
            let st = std::process::Command::new("umount").arg(&self.mnt).status();
            if st.is_ok_and(|s| s.success()) || !self.mounted() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let st = child.wait().expect("wait for ovl-mount");
        assert!(st.success(), "ovl-mount exited with {st}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() && !std::thread::panicking() {
            self.umount();
        } else if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.mnt)
                .status();
            let _ = c.wait();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.cached.take();
    }
}

/// One fsx run on `rel` in `t`: `ops` random operations, a remount after each index in
/// `remount_at`, then checks of the final content through a fresh open and in the upper layer.
/// `lower`: the file starts in the lower layer with content `model`.
#[allow(clippy::too_many_arguments)]
fn run(
    t: &mut Target,
    name: &str,
    seed: u64,
    rel: &str,
    lower: bool,
    model: Vec<u8>,
    ops: usize,
    remount_at: &[usize],
) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let max_size = rng
        .gen_range(256 * KIB..=4 * MIB)
        .max(model.len() + 64 * KIB);
    let name = format!(
        "{name} ({}, {:?} inodes)",
        if t.passthrough() {
            "passthrough"
        } else if t.writeback {
            "writeback cache"
        } else {
            "no passthrough"
        },
        t.m.mode
    );
    let mut fsx = Fsx::new(&name, seed, t.m.p(rel), model, max_size);
    let started = std::time::Instant::now();
    if lower {
        // With passthrough on, ovl refuses (ETXTBSY) a write-open while a handle on the lower
        // file is open, so the read-only one is kept across the copy-up only without it.
        let keep = !t.passthrough() && rng.gen_bool(0.5);
        fsx.readonly_prelude(50, keep);
        // The operation that copies the file up.
        match rng.gen_range(0..10) {
            0..2 => {
                let new = rng.gen_range(0..=max_size);
                fsx.note(format!(
                    "truncate(path) {:#x} -> {new:#x} (copy-up)",
                    fsx.model.len()
                ));
                if let Err(e) = truncate_path(&fsx.path, new) {
                    fsx.fail(format!("truncate(path) of the lower file: {e}"));
                }
                resize_zeroed(&mut fsx.model, new);
                fsx.open(false);
            }
            2 => {
                fsx.note("open O_TRUNC (copy-up)".into());
                fsx.open(true);
            }
            _ => {
                fsx.note("open O_RDWR (copy-up)".into());
                fsx.open(false);
            }
        }
    } else {
        fsx.open(false);
    }
    fsx.verify_all("first open");
    for i in 0..ops {
        fsx.step();
        if remount_at.contains(&i) {
            fsx.note("remount (close all, remount, reopen)".into());
            fsx.close();
            t.remount();
            fsx.open(false);
            fsx.check_path_size();
            fsx.verify_all("after remount");
        }
    }
    fsx.verify_all("end of run");
    fsx.close();
    fsx.open(false);
    fsx.verify_all("fresh open at end");
    fsx.close();
    let upper = std::fs::read(t.m.upper.join(rel)).expect("read upper copy");
    if upper.len() != fsx.model.len() {
        fsx.fail(format!(
            "upper file has {:#x} bytes, expected {:#x}",
            upper.len(),
            fsx.model.len()
        ));
    }
    if let Some(d) = diff(&fsx.model, &upper, 0) {
        fsx.fail(format!("upper file content: {d}"));
    }
    eprintln!(
        "fsx {name} seed {seed}: {ops} ops, max size {max_size:#x}, final size {:#x}, {:?}, {:?}",
        fsx.model.len(),
        started.elapsed(),
        fsx.counts
    );
}

/// Known random content for the lower file: dense, sparse (random extents in a hole) or empty.
/// Returns the content and the extents that hold data (the rest is a hole).
fn lower_content(seed: u64) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x10_3e2);
    match rng.gen_range(0..8) {
        0 => (Vec::new(), Vec::new()),
        1..4 => {
            let len = rng.gen_range(1..=3 * MIB);
            let mut data = vec![0u8; len];
            let mut extents = Vec::new();
            for _ in 0..rng.gen_range(1..12) {
                let off = rng.gen_range(0..len);
                let n = rng.gen_range(1..=256 * KIB).min(len - off);
                data[off..off + n].copy_from_slice(&random_bytes(rng.r#gen(), n));
                extents.push((off, n));
            }
            (data, extents)
        }
        _ => {
            let len = rng.gen_range(1..=2 * MIB);
            (random_bytes(rng.r#gen(), len), vec![(0, len)])
        }
    }
}

/// Writes `data` as the file `path`, leaving holes outside `extents`.
fn write_sparse(path: &Path, data: &[u8], extents: &[(usize, usize)]) {
    let f = File::create(path).unwrap();
    f.set_len(data.len() as u64).unwrap();
    for &(off, n) in extents {
        f.write_all_at(&data[off..off + n], off as u64).unwrap();
    }
}

fn check_lower(t: &Target, rel: &str, orig: &[u8], seed: u64) {
    let now = std::fs::read(t.m.lower.join(rel)).expect("read lower file");
    assert_eq!(
        now.len(),
        orig.len(),
        "seed {seed}: lower file size changed"
    );
    if let Some(d) = diff(orig, &now, 0) {
        panic!("seed {seed}: lower file modified: {d}");
    }
}

fn new_file(passthrough: bool, defaults: &[u64]) {
    for seed in seeds(defaults) {
        let mut t = Target::new(passthrough, seed, InodeMode::Virtual, |_| {});
        std::fs::write(t.m.p("f"), b"").unwrap();
        let ops = nops(3000);
        run(&mut t, "new file", seed, "f", false, Vec::new(), ops, &[]);
    }
}

fn lower_file(passthrough: bool, defaults: &[u64]) {
    lower_file_in(passthrough, false, defaults)
}

/// Random I/O on a file that starts in the lower (a directory, or an image when `image`).
fn lower_file_in(passthrough: bool, image: bool, defaults: &[u64]) {
    for seed in seeds(defaults) {
        let (orig, extents) = lower_content(seed);
        let mut t = Target::with_lower_kind(passthrough, seed, InodeMode::Virtual, image, |l| {
            write_sparse(&l.join("f"), &orig, &extents)
        });
        assert!(!t.m.upper.join("f").exists());
        let ops = nops(3000);
        run(
            &mut t,
            "lower file",
            seed,
            "f",
            true,
            orig.clone(),
            ops,
            &[],
        );
        check_lower(&t, "f", &orig, seed);
    }
}

/// Remounts in the middle; odd seeds with persistent inode numbers (a copied-up file changes
/// its number at the remount).
fn remount(passthrough: bool, defaults: &[u64]) {
    for seed in seeds(defaults) {
        let ops = nops(3000);
        let mode = if seed % 2 == 1 {
            InodeMode::Persistent
        } else {
            InodeMode::Virtual
        };
        // A new file, remounted halfway.
        let mut t = Target::new(passthrough, seed, mode, |_| {});
        std::fs::write(t.m.p("f"), b"").unwrap();
        let name = "remount new file";
        run(&mut t, name, seed, "f", false, Vec::new(), ops, &[ops / 2]);
        drop(t);
        // A lower file, remounted before its copy-up and twice more.
        let (orig, extents) = lower_content(seed);
        let mut t = Target::new(passthrough, seed, mode, |l| {
            write_sparse(&l.join("f"), &orig, &extents)
        });
        t.remount();
        let name = "remount lower file";
        let at = [ops / 3, 2 * ops / 3];
        run(&mut t, name, seed, "f", true, orig.clone(), ops, &at);
        check_lower(&t, "f", &orig, seed);
    }
}

#[test]
fn fsx_new_file() {
    new_file(true, &[1, 2, 3]);
}

#[test]
fn fsx_lower_file() {
    lower_file(true, &[11, 12, 13]);
}

/// The lower file read in place from an image (reads decompress only the pieces they touch,
/// then the first write copies it up), with and without passthrough.
#[test]
fn fsx_image_lower_file() {
    lower_file_in(true, true, &[61, 62]);
    lower_file_in(false, true, &[63, 64]);
}

#[test]
fn fsx_remount() {
    remount(true, &[21, 22]);
}

// The same runs with passthrough off: the kernel page cache in front of ovl's read/write, and
// a read-only handle from before the copy-up kept open across it (ETXTBSY with passthrough).

#[test]
fn fsx_no_passthrough_new_file() {
    new_file(false, &[31, 32]);
}

#[test]
fn fsx_no_passthrough_lower_file() {
    lower_file(false, &[41, 42]);
}

#[test]
fn fsx_no_passthrough_remount() {
    remount(false, &[51]);
}

// Minimal reproductions of what the no-passthrough runs found.

/// Dirty pages of a shared mapping are written back through the handle the mapping was made
/// from; they must land at their own offset even when that handle was opened O_APPEND.
#[test]
fn no_passthrough_mmap_write_through_o_append_handle() {
    let t = Target::new(false, 0, InodeMode::Virtual, |_| {});
    let p = t.m.p("f");
    std::fs::write(&p, vec![b'A'; 8192]).unwrap();
    let f = OpenOptions::new().read(true).append(true).open(&p).unwrap();
    unsafe {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let m = libc::mmap(
            std::ptr::null_mut(),
            8192,
            prot,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(m, libc::MAP_FAILED);
        std::ptr::copy_nonoverlapping(b"BBBB".as_ptr(), m.cast::<u8>(), 4);
        assert_eq!(libc::msync(m, 8192, libc::MS_SYNC), 0);
        libc::munmap(m, 8192);
    }
    drop(f);
    let mut want = vec![b'A'; 8192];
    want[..4].copy_from_slice(b"BBBB");
    let got = std::fs::read(&p).unwrap();
    assert_eq!(got.len(), want.len(), "file size after msync");
    assert!(got == want, "{}", diff(&want, &got, 0).unwrap());
}

/// A read-only handle opened before a copy-up reads the upper copy after it (as the kernel's
/// overlayfs does), and what it reads does not leave stale lower data in the page cache.
#[test]
fn no_passthrough_read_handle_across_copy_up() {
    let t = Target::new(false, 0, InodeMode::Virtual, |l| {
        std::fs::write(l.join("f"), vec![b'A'; 16384]).unwrap()
    });
    let p = t.m.p("f");
    let ro = File::open(&p).unwrap();
    let rw = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    rw.write_all_at(b"BB", 100).unwrap();
    rw.write_all_at(&[b'C'; 100], 20000).unwrap();
    let mut buf = [0u8; 4];
    ro.read_exact_at(&mut buf, 100).unwrap();
    let fresh = File::open(&p).unwrap();
    let mut buf2 = [0u8; 4];
    fresh.read_exact_at(&mut buf2, 100).unwrap();
    let mut tail = vec![0u8; 8192];
    let n = ro.read_at(&mut tail, 16384).unwrap();
    assert_eq!(
        (&buf, &buf2, n),
        (b"BBAA", b"BBAA", 3716),
        "old handle, new handle, bytes past the old EOF"
    );
}
