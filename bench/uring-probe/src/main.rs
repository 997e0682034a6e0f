//! uring-probe: how long one FUSE round trip takes when the server talks to the kernel through
//! read(2)/write(2) on /dev/fuse ("classic") and through FUSE over io_uring ("ring", Linux ≥
//! 6.14 with /sys/module/fuse/parameters/enable_uring = Y).
//!
//! The file system is a root directory holding one empty file `f`; every attribute and entry
//! timeout is 0, so each stat(2) of the root is one GETATTR and each stat of `f` is a LOOKUP and
//! a GETATTR. The server counts the requests it answers, so the report gives the time per stat
//! and per request.
//!
//! Modes: `classic` (our read/write loop, `--threads` readers on cloned descriptors), `ring`
//! (our loop answers INIT with FUSE_OVER_IO_URING, then one io_uring per possible CPU, pinned to
//! it, serves the requests), `fuser` (fuser 0.18's own loop, as the engine runs it: `--threads`,
//! clone_fd) and `fuser-ring` (fuser answers INIT and asks for the ring; our ring threads on a
//! duplicate of the descriptor serve everything else, fuser keeps forgets and interrupts).
//!
//! Usage (root): uring-probe classic|ring|fuser|fuser-ring [--threads N] [--calls N]
//!     [--clients 1,2] [--depth N] [--defer] [--target root|file] [--pin-client CPU]
//!     [--pin-server CPU]
//! `--defer`: the rings use IORING_SETUP_DEFER_TASKRUN|SINGLE_ISSUER (else COOP_TASKRUN).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

// ---- The FUSE protocol, the part this probe needs (include/uapi/linux/fuse.h) ----

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_STATFS: u32 = 17;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_ACCESS: u32 = 34;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;

const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;
/// fuse_attr: six u64 then ten u32.
const ATTR: usize = 88;

/// fuse_init_out flags we answer with.
const FUSE_ASYNC_READ: u64 = 1 << 0;
const FUSE_BIG_WRITES: u64 = 1 << 5;
const FUSE_MAX_PAGES: u64 = 1 << 22;
const FUSE_INIT_EXT: u64 = 1 << 30;
const FUSE_PASSTHROUGH: u64 = 1 << 37;
const FUSE_OVER_IO_URING: u64 = 1 << 41;
const FOPEN_PASSTHROUGH: u32 = 1 << 7;
/// _IOW(229, 1, struct fuse_backing_map { i32 fd; u32 flags; u64 padding })
const FUSE_DEV_IOC_BACKING_OPEN: libc::c_ulong = 0x4010_e501;
/// _IOW(229, 2, uint32_t)
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// `--passthrough PATH`: `f` is opened in passthrough mode on PATH (our loops only), to show
/// that backing files registered on /dev/fuse serve opens answered through the ring.
static BACKING: std::sync::OnceLock<(String, u64)> = std::sync::OnceLock::new();
static BAD_REGISTER: AtomicBool = AtomicBool::new(false);
static FUSE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// The ring's per-entry header: in_out (fuse_in_header / fuse_out_header) 128 bytes, op_in 128
/// bytes, then fuse_uring_ent_in_out { flags u64, commit_id u64, payload_sz u32, padding u32,
/// reserved u64 }.
const RING_HEADER: usize = 128 + 128 + 32;
const RING_OP_IN: usize = 128;
const RING_ENT: usize = 256;
const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

/// _IOR(229, 0, uint32_t)
const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;

const MAX_WRITE: u32 = 128 * 1024;
const MAX_PAGES: u16 = 32;
/// Large enough for any request with the limits above (the ring requires at least
/// max(max_write, max_pages * page size)).
const PAYLOAD: usize = 256 * 1024;

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

struct InHeader {
    opcode: u32,
    unique: u64,
    nodeid: u64,
}

fn parse_in_header(b: &[u8]) -> InHeader {
    InHeader {
        opcode: get_u32(b, 4),
        unique: get_u64(b, 8),
        nodeid: get_u64(b, 16),
    }
}

fn put_out_header(b: &mut [u8], len: usize, error: i32, unique: u64) {
    put_u32(b, 0, len as u32);
    put_u32(b, 4, error as u32);
    put_u64(b, 8, unique);
}

fn put_attr(b: &mut [u8], ino: u64) {
    b[..ATTR].fill(0);
    let dir = ino == 1;
    put_u64(b, 0, ino);
    if !dir {
        put_u64(b, 8, BACKING.get().map_or(0, |b| b.1)); // size
    }
    put_u32(b, 60, if dir { 0o40755 } else { 0o100644 }); // mode
    put_u32(b, 64, if dir { 2 } else { 1 }); // nlink
    put_u32(b, 80, 4096); // blksize
}

/// What the file system does with one request: the request's per-op header (`arg`) and what
/// follows it (`rest`) go in, the reply's body is written to `out`. `None`: no reply (forgets).
fn serve(
    h: &InHeader,
    arg: &[u8],
    rest: &[u8],
    out: &mut [u8],
    ring: bool,
) -> Option<Result<usize, i32>> {
    Some(match h.opcode {
        FUSE_INIT => {
            let (major, minor) = (get_u32(arg, 0), get_u32(arg, 4));
            let mut flags = get_u32(arg, 12) as u64;
            if flags & FUSE_INIT_EXT != 0 {
                flags |= (get_u32(arg, 16) as u64) << 32;
            }
            eprintln!(
                "INIT {major}.{minor} kernel flags {flags:#x} (io_uring offered: {})",
                flags & FUSE_OVER_IO_URING != 0
            );
            let mut want = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_INIT_EXT;
            if ring {
                want |= FUSE_OVER_IO_URING;
            }
            if BACKING.get().is_some() {
                want |= FUSE_PASSTHROUGH;
            }
            let reply = want & flags;
            out[..64].fill(0);
            put_u32(out, 0, 7);
            put_u32(out, 4, minor.min(45));
            put_u32(out, 8, get_u32(arg, 8)); // max_readahead
            put_u32(out, 12, reply as u32);
            put_u16(out, 16, 16); // max_background
            put_u16(out, 18, 12); // congestion_threshold
            put_u32(out, 20, MAX_WRITE);
            put_u32(out, 24, 1); // time_gran
            put_u16(out, 28, MAX_PAGES);
            put_u32(out, 32, (reply >> 32) as u32); // flags2
            if reply & FUSE_PASSTHROUGH != 0 {
                put_u32(out, 36, 1); // max_stack_depth
            } else if BACKING.get().is_some() {
                eprintln!("passthrough refused by the kernel");
            }
            Ok(64)
        }
        FUSE_LOOKUP => {
            let name = rest.split(|&c| c == 0).next().unwrap_or(b"");
            if h.nodeid != 1 || name != b"f" {
                return Some(Err(libc::ENOENT));
            }
            out[..40].fill(0);
            put_u64(out, 0, 2); // nodeid
            put_attr(&mut out[40..], 2);
            Ok(40 + ATTR)
        }
        FUSE_OPEN => {
            let Some((path, _)) = BACKING.get() else {
                return Some(Err(libc::ENOSYS));
            };
            let c = CString::new(path.as_str()).unwrap();
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Some(Err(io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)));
            }
            let mut map = [0u8; 16];
            put_u32(&mut map, 0, fd as u32);
            let id = unsafe {
                libc::ioctl(
                    FUSE_FD.load(Ordering::Relaxed),
                    FUSE_DEV_IOC_BACKING_OPEN,
                    map.as_ptr(),
                )
            };
            let e = io::Error::last_os_error();
            unsafe { libc::close(fd) };
            if id < 0 {
                eprintln!("FUSE_DEV_IOC_BACKING_OPEN: {e}");
                return Some(Err(e.raw_os_error().unwrap_or(libc::EIO)));
            }
            out[..16].fill(0);
            put_u64(out, 0, id as u64); // fh: the backing id, closed at release
            put_u32(out, 8, FOPEN_PASSTHROUGH);
            put_u32(out, 12, id as u32);
            Ok(16)
        }
        FUSE_RELEASE => {
            let id = get_u64(arg, 0) as u32;
            unsafe {
                libc::ioctl(
                    FUSE_FD.load(Ordering::Relaxed),
                    FUSE_DEV_IOC_BACKING_CLOSE,
                    &id,
                )
            };
            Ok(0)
        }
        FUSE_FLUSH => Ok(0),
        FUSE_READ => {
            eprintln!("READ reached the server: passthrough is not in effect");
            Err(libc::EIO)
        }
        FUSE_GETATTR => {
            out[..16].fill(0);
            put_attr(&mut out[16..], h.nodeid);
            Ok(16 + ATTR)
        }
        FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => return None,
        FUSE_OPENDIR => {
            out[..16].fill(0);
            Ok(16)
        }
        FUSE_RELEASEDIR | FUSE_ACCESS => Ok(0),
        FUSE_STATFS => {
            out[..80].fill(0);
            put_u32(out, 56, 4096); // bsize
            put_u32(out, 60, 255); // namelen
            Ok(80)
        }
        FUSE_DESTROY => Ok(0),
        _ => Err(libc::ENOSYS),
    })
}

/// Length of the per-op header that comes first in a request's body (the ring gets it in op_in).
fn op_header_len(opcode: u32) -> usize {
    match opcode {
        FUSE_GETATTR => 16,
        FUSE_INIT => 64,
        FUSE_OPENDIR => 8,
        FUSE_OPEN => 8,
        FUSE_READ => 40,
        FUSE_RELEASE => 24,
        FUSE_FLUSH => 24,
        FUSE_RELEASEDIR => 24,
        FUSE_ACCESS => 8,
        FUSE_FORGET => 8,
        FUSE_INTERRUPT => 8,
        FUSE_BATCH_FORGET => 8,
        _ => 0, // LOOKUP (name only), STATFS, DESTROY
    }
}

struct Shared {
    requests: AtomicU64,
    stop: AtomicBool,
    ring: bool,
}

// ---- classic: read(2) a request from /dev/fuse, write(2) the reply ----

fn classic_loop(fd: RawFd, sh: Arc<Shared>, init_done: Option<std::sync::mpsc::Sender<()>>) {
    let mut buf = vec![0u8; PAYLOAD + 4096];
    let mut out = vec![0u8; PAYLOAD + OUT_HEADER];
    let mut init_done = init_done;
    loop {
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) | Some(libc::ENOENT) | Some(libc::EAGAIN) => continue,
                Some(libc::ENODEV) => return,
                _ => {
                    if !sh.stop.load(Ordering::Relaxed) {
                        eprintln!("read /dev/fuse: {e}");
                    }
                    return;
                }
            }
        }
        let req = &buf[..n as usize];
        let h = parse_in_header(req);
        let body = &req[IN_HEADER..];
        let split = op_header_len(h.opcode).min(body.len());
        let (arg, rest) = body.split_at(split);
        let Some(r) = serve(&h, arg, rest, &mut out[OUT_HEADER..], sh.ring) else {
            continue;
        };
        sh.requests.fetch_add(1, Ordering::Relaxed);
        let len = match r {
            Ok(len) => {
                put_out_header(&mut out, OUT_HEADER + len, 0, h.unique);
                OUT_HEADER + len
            }
            Err(e) => {
                put_out_header(&mut out, OUT_HEADER, -e, h.unique);
                OUT_HEADER
            }
        };
        let w = unsafe { libc::write(fd, out.as_ptr().cast(), len) };
        if w < 0 && !sh.stop.load(Ordering::Relaxed) {
            eprintln!("write /dev/fuse: {}", io::Error::last_os_error());
        }
        if h.opcode == FUSE_INIT {
            if let Some(tx) = init_done.take() {
                let _ = tx.send(());
            }
        }
    }
}

// ---- ring: IORING_OP_URING_CMD on /dev/fuse, one queue per CPU ----

/// One ring entry: a header block and a payload buffer the kernel fills with a request and
/// reads the reply from. They must not move while registered.
struct RingEntry {
    header: Box<[u8; RING_HEADER]>,
    payload: Vec<u8>,
    iov: Box<[libc::iovec; 2]>,
}

fn uring_cmd(
    fd: RawFd,
    op: u32,
    qid: u16,
    commit_id: u64,
    user_data: u64,
    iov: Option<*const libc::iovec>,
) -> io_uring::squeue::Entry128 {
    // fuse_uring_cmd_req in the SQE's 80-byte command area: flags u64, commit_id u64, qid u16.
    let mut cmd = [0u8; 80];
    put_u64(&mut cmd, 8, commit_id);
    cmd[16..18].copy_from_slice(&qid.to_le_bytes());
    let mut b = io_uring::opcode::UringCmd80::new(io_uring::types::Fd(fd), op).cmd(cmd);
    if let Some(p) = iov {
        b = b.addr(Some(p as u64));
    }
    let e = b.build().user_data(user_data);
    match iov {
        None => e,
        Some(_) => {
            // REGISTER also wants sqe->len = 2 (header and payload iovecs), which the builder
            // does not set; the entry is the C struct, len is the u32 at byte 24.
            let mut raw: [u8; 128] = unsafe { std::mem::transmute(e) };
            put_u32(&mut raw, 24, 2);
            unsafe { std::mem::transmute::<[u8; 128], io_uring::squeue::Entry128>(raw) }
        }
    }
}

fn pin_to_cpu(cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn ring_loop(
    fd: RawFd,
    qid: u16,
    depth: usize,
    defer: bool,
    sh: Arc<Shared>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    pin_to_cpu(qid as usize);
    let mut b = io_uring::IoUring::<io_uring::squeue::Entry128, io_uring::cqueue::Entry>::builder();
    if defer {
        b.setup_single_issuer().setup_defer_taskrun();
    } else {
        b.setup_coop_taskrun();
    }
    let mut ring = match b.build((depth as u32 * 2).next_power_of_two()) {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    // `--bad-register`: a header too short for the kernel, to show what a failed registration
    // does to a connection that negotiated the ring (the kernel falls back to /dev/fuse).
    let header_len = if BAD_REGISTER.load(Ordering::Relaxed) {
        8
    } else {
        RING_HEADER
    };
    let mut ents: Vec<RingEntry> = (0..depth)
        .map(|_| {
            let mut header = Box::new([0u8; RING_HEADER]);
            let mut payload = vec![0u8; PAYLOAD];
            let iov = Box::new([
                libc::iovec {
                    iov_base: header.as_mut_ptr().cast(),
                    iov_len: header_len,
                },
                libc::iovec {
                    iov_base: payload.as_mut_ptr().cast(),
                    iov_len: PAYLOAD,
                },
            ]);
            RingEntry {
                header,
                payload,
                iov,
            }
        })
        .collect();
    // The kernel answers a register only when a request arrives, so an error shows at once and
    // success shows as nothing. EAGAIN: INIT is not answered yet (fuser's thread answers it).
    for attempt in 0.. {
        for (i, e) in ents.iter().enumerate() {
            let sqe = uring_cmd(
                fd,
                FUSE_IO_URING_CMD_REGISTER,
                qid,
                0,
                i as u64,
                Some(e.iov.as_ptr()),
            );
            unsafe { ring.submission().push(&sqe).expect("sq full") };
        }
        if let Err(e) = ring.submit() {
            let _ = ready.send(Err(e));
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut again = false;
        let mut cq = ring.completion();
        cq.sync();
        for c in cq {
            if c.result() == -libc::EAGAIN && attempt < 200 {
                again = true;
            } else if c.result() < 0 {
                let _ = ready.send(Err(io::Error::from_raw_os_error(-c.result())));
                return;
            } else {
                // The probe registers before it sends requests.
                panic!("a completion before any request");
            }
        }
        if !again {
            break;
        }
    }
    let _ = ready.send(Ok(()));
    let mut done: Vec<(usize, i32)> = Vec::with_capacity(depth);
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                eprintln!("io_uring_enter: {e}");
                return;
            }
        }
        done.clear();
        for c in ring.completion() {
            done.push((c.user_data() as usize, c.result()));
        }
        for &(i, res) in &done {
            if res < 0 {
                if !sh.stop.load(Ordering::Relaxed) && res != -libc::ENOTCONN {
                    eprintln!(
                        "ring {qid}: entry {i}: {}",
                        io::Error::from_raw_os_error(-res)
                    );
                }
                return;
            }
            let e = &mut ents[i];
            let hdr = &mut e.header;
            let h = parse_in_header(&hdr[..IN_HEADER]);
            let commit_id = get_u64(&hdr[..], RING_ENT + 8);
            let in_len = get_u32(&hdr[..], RING_ENT + 16) as usize;
            let arg_len = op_header_len(h.opcode).min(RING_OP_IN);
            let arg: [u8; RING_OP_IN] = hdr[RING_OP_IN..2 * RING_OP_IN].try_into().unwrap();
            // The reply's body is written over the request's payload; copy what the file
            // system reads first (names are short here).
            let rest = e.payload[..in_len].to_vec();
            let r = serve(&h, &arg[..arg_len], &rest, &mut e.payload, true);
            sh.requests.fetch_add(1, Ordering::Relaxed);
            let (err, len) = match r {
                Some(Ok(len)) => (0, len),
                Some(Err(e)) => (-e, 0),
                None => (-libc::ENOSYS, 0),
            };
            put_out_header(&mut hdr[..], OUT_HEADER + len, err, h.unique);
            put_u32(&mut hdr[..], RING_ENT + 16, len as u32);
            let sqe = uring_cmd(
                fd,
                FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                qid,
                commit_id,
                i as u64,
                None,
            );
            unsafe { ring.submission().push(&sqe).expect("sq full") };
        }
    }
}

// ---- the same file system served by fuser (the engine's library) ----

struct ProbeFs {
    sh: Arc<Shared>,
}

fn fuser_attr(ino: u64) -> fuser::FileAttr {
    let dir = ino == 1;
    fuser::FileAttr {
        ino: fuser::INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: std::time::UNIX_EPOCH,
        mtime: std::time::UNIX_EPOCH,
        ctime: std::time::UNIX_EPOCH,
        crtime: std::time::UNIX_EPOCH,
        kind: if dir {
            fuser::FileType::Directory
        } else {
            fuser::FileType::RegularFile
        },
        perm: if dir { 0o755 } else { 0o644 },
        nlink: if dir { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl fuser::Filesystem for ProbeFs {
    fn init(&mut self, _req: &fuser::Request, config: &mut fuser::KernelConfig) -> io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        if self.sh.ring {
            // fuser answers INIT; the flag makes the kernel wait for ring entries on every
            // queue and then send everything but forgets and interrupts through them.
            let r = config.add_capabilities(fuser::InitFlags::FUSE_OVER_IO_URING);
            eprintln!("fuser: FUSE_OVER_IO_URING requested: {r:?}");
        }
        if BACKING.get().is_some() {
            let r = config.add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH);
            let d = config.set_max_stack_depth(1);
            eprintln!("fuser: FUSE_PASSTHROUGH requested: {r:?}, max_stack_depth: {d:?}");
        }
        Ok(())
    }

    fn lookup(
        &self,
        _req: &fuser::Request,
        parent: fuser::INodeNo,
        name: &std::ffi::OsStr,
        reply: fuser::ReplyEntry,
    ) {
        self.sh.requests.fetch_add(1, Ordering::Relaxed);
        if parent.0 != 1 || name != "f" {
            return reply.error(fuser::Errno::from_i32(libc::ENOENT));
        }
        reply.entry(
            &std::time::Duration::ZERO,
            &fuser_attr(2),
            fuser::Generation(0),
        );
    }

    fn getattr(
        &self,
        _req: &fuser::Request,
        ino: fuser::INodeNo,
        _fh: Option<fuser::FileHandle>,
        reply: fuser::ReplyAttr,
    ) {
        self.sh.requests.fetch_add(1, Ordering::Relaxed);
        reply.attr(&std::time::Duration::ZERO, &fuser_attr(ino.0));
    }
}

// ---- mount and measure ----

fn mount(mnt: &str) -> io::Result<OwnedFd> {
    let dev = CString::new("/dev/fuse").unwrap();
    let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let opts = CString::new(format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,max_read={}",
        fd.as_raw_fd(),
        MAX_WRITE
    ))
    .unwrap();
    let src = CString::new("uring-probe").unwrap();
    let typ = CString::new("fuse.uring-probe").unwrap();
    let target = CString::new(mnt).unwrap();
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            typ.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn clone_fd(fd: RawFd) -> io::Result<OwnedFd> {
    let dev = CString::new("/dev/fuse").unwrap();
    let nfd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if nfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let nfd = unsafe { OwnedFd::from_raw_fd(nfd) };
    let mut src = fd as u32;
    if unsafe { libc::ioctl(nfd.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut src) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(nfd)
}

fn unmount_and_exit(mnt: &str, code: i32) -> ! {
    let t = CString::new(mnt).unwrap();
    unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
    let _ = std::fs::remove_dir(mnt);
    std::process::exit(code)
}

fn ncpus() -> usize {
    // Queues are per possible CPU.
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    s.trim()
        .split(',')
        .map(|r| match r.split_once('-') {
            Some((_, b)) => b.parse::<usize>().unwrap_or(0) + 1,
            None => r.parse::<usize>().map_or(1, |v| v + 1),
        })
        .max()
        .unwrap_or(1)
}

/// CPU time of the whole machine (busy jiffies in /proc/stat) and of this process, in seconds:
/// the difference over a run is what other processes used meanwhile (a noisy run).
fn cpu_times() -> (f64, f64) {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
        .map(|(_, v)| v)
        .sum::<f64>()
        / hz;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (busy, tv(ru.ru_utime) + tv(ru.ru_stime))
}

/// How often the calling thread moved to another CPU so far (the scheduler's count).
fn migrations() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/sched").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("se.nr_migrations"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn bench(
    path: &str,
    calls: usize,
    clients: usize,
    pin: Option<usize>,
    sh: &Shared,
) -> (f64, f64, f64, u64) {
    let moves = AtomicU64::new(0);
    let c = CString::new(path).unwrap();
    // warm up
    for _ in 0..1000 {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        unsafe { libc::stat(c.as_ptr(), &mut st) };
    }
    let before = sh.requests.load(Ordering::Relaxed);
    let (busy0, own0) = cpu_times();
    let t = Instant::now();
    std::thread::scope(|s| {
        for k in 0..clients {
            let c = &c;
            let moves = &moves;
            s.spawn(move || {
                if let Some(cpu) = pin {
                    pin_to_cpu((cpu + k) % ncpus());
                }
                let mut st: libc::stat = unsafe { std::mem::zeroed() };
                let m0 = migrations();
                for _ in 0..calls / clients {
                    if unsafe { libc::stat(c.as_ptr(), &mut st) } != 0 {
                        panic!("stat: {}", io::Error::last_os_error());
                    }
                }
                moves.fetch_add(migrations() - m0, Ordering::Relaxed);
            });
        }
    });
    let el = t.elapsed().as_secs_f64();
    let (busy1, own1) = cpu_times();
    let others = ((busy1 - busy0) - (own1 - own0)).max(0.0) / el;
    let reqs = sh.requests.load(Ordering::Relaxed) - before;
    (
        el * 1e6 / calls as f64,
        el * 1e6 / reqs as f64,
        others,
        moves.into_inner(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("classic");
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let threads: usize = opt("--threads").map_or(1, |v| v.parse().unwrap());
    let calls: usize = opt("--calls").map_or(200_000, |v| v.parse().unwrap());
    let clients: Vec<usize> = opt("--clients").map_or(vec![1, 2], |v| {
        v.split(',').map(|x| x.parse().unwrap()).collect()
    });
    let depth: usize = opt("--depth").map_or(4, |v| v.parse().unwrap());
    let target = opt("--target").unwrap_or_else(|| "root".into());
    let pin_client: Option<usize> = opt("--pin-client").map(|v| v.parse().unwrap());
    let pin_server: Option<usize> = opt("--pin-server").map(|v| v.parse().unwrap());
    BAD_REGISTER.store(
        args.iter().any(|a| a == "--bad-register"),
        Ordering::Relaxed,
    );
    let defer = args.iter().any(|a| a == "--defer");
    let ring = mode == "ring" || mode == "fuser-ring";
    let use_fuser = mode.starts_with("fuser");

    let mnt = format!("/tmp/uring-probe.{}", std::process::id());
    std::fs::create_dir_all(&mnt).unwrap();
    if let Some(p) = opt("--passthrough") {
        let size = std::fs::metadata(&p).expect("--passthrough file").len();
        let _ = BACKING.set((p, size));
    }
    let fd = mount(&mnt).expect("mount");
    let sh = Arc::new(Shared {
        requests: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        ring,
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let conn = fd.try_clone().unwrap();
    let raw = conn.as_raw_fd();
    FUSE_FD.store(raw, Ordering::Relaxed);
    let mut _session = None;
    if use_fuser {
        let mut config = fuser::Config::default();
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(threads);
        config.clone_fd = true;
        let fs = ProbeFs { sh: sh.clone() };
        _session = Some(
            fuser::Session::from_fd(fs, fd, fuser::SessionACL::All, config)
                .and_then(|s| s.spawn())
                .expect("fuser session"),
        );
        let _ = tx.send(());
    } else {
        let sh = sh.clone();
        std::thread::spawn(move || {
            if let Some(cpu) = pin_server {
                pin_to_cpu(cpu);
            }
            classic_loop(raw, sh, Some(tx))
        });
    }
    rx.recv().expect("INIT");
    let mut extra = Vec::new();
    if use_fuser && !ring {
        eprintln!("fuser: {threads} thread(s), clone_fd");
    } else if ring {
        let q = ncpus();
        for qid in 0..q {
            let (rtx, rrx) = std::sync::mpsc::channel();
            let sh = sh.clone();
            std::thread::spawn(move || ring_loop(raw, qid as u16, depth, defer, sh, rtx));
            if let Err(e) = rrx.recv().unwrap() {
                eprintln!("ring register on queue {qid}: {e}");
                if !BAD_REGISTER.load(Ordering::Relaxed) {
                    unmount_and_exit(&mnt, 1);
                }
                println!("{mode}: registration failed ({e}); requests go on through /dev/fuse");
                break;
            }
        }
        eprintln!(
            "ring: {q} queues x {depth} entries{}",
            if defer { ", DEFER_TASKRUN" } else { "" }
        );
    } else {
        for _ in 1..threads {
            let c = clone_fd(raw).expect("FUSE_DEV_IOC_CLONE");
            let r = c.as_raw_fd();
            extra.push(c);
            let sh = sh.clone();
            let k = extra.len();
            std::thread::spawn(move || {
                if let Some(cpu) = pin_server {
                    pin_to_cpu((cpu + k) % ncpus());
                }
                classic_loop(r, sh, None)
            });
        }
        eprintln!("classic: {threads} reader thread(s)");
    }
    if let Some((backing, _)) = BACKING.get() {
        let t = Instant::now();
        let through = std::fs::read(format!("{mnt}/f")).unwrap_or_else(|e| {
            eprintln!("read through the mount: {e}");
            unmount_and_exit(&mnt, 1)
        });
        let el = t.elapsed();
        let direct = std::fs::read(backing).unwrap();
        println!(
            "{mode}: passthrough read of {} bytes: {} ({:.1} ms), {} requests served",
            through.len(),
            if through == direct {
                "same bytes as the backing file"
            } else {
                "DIFFERENT bytes"
            },
            el.as_secs_f64() * 1e3,
            sh.requests.load(Ordering::Relaxed)
        );
    }
    let path = if target == "file" {
        format!("{mnt}/f")
    } else {
        mnt.clone()
    };
    for &n in &clients {
        let (per_call, per_req, others, moves) = bench(&path, calls, n, pin_client, &sh);
        println!(
            "{mode}{} target={target} clients={n} server_threads={} pin(client,server)={pin_client:?},{pin_server:?}: {per_call:.2} us/stat, {per_req:.2} us/request, client CPU moves {moves}, others {others:.2} cpu",
            if ring && defer { "+defer" } else { "" },
            if ring { ncpus() } else { threads }
        );
    }
    sh.stop.store(true, Ordering::Relaxed);
    drop(extra);
    unmount_and_exit(&mnt, 0);
}
