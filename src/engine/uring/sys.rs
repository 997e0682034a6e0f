//! The io_uring system calls, the part the FUSE ring needs: a ring with 128-byte submission
//! entries (`IORING_SETUP_SQE128`, which `IORING_OP_URING_CMD` to /dev/fuse requires), pushing
//! raw entries and reaping completions. Our own ~150 lines rather than the `io-uring` crate:
//! its `UringCmd80` builder cannot set `sqe->len`, which the FUSE REGISTER command needs, so
//! we would have patched its entries by hand anyway. Layouts from include/uapi/linux/io_uring.h.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

pub const SETUP_COOP_TASKRUN: u32 = 1 << 8;
pub const SETUP_SQE128: u32 = 1 << 10;
pub const SETUP_SINGLE_ISSUER: u32 = 1 << 12;
pub const SETUP_DEFER_TASKRUN: u32 = 1 << 13;
const FEAT_SINGLE_MMAP: u32 = 1;
const ENTER_GETEVENTS: u32 = 1;
const OFF_CQ_RING: i64 = 0x800_0000;
const OFF_SQES: i64 = 0x1000_0000;

pub const OP_POLL_ADD: u8 = 6;
pub const OP_URING_CMD: u8 = 46;

/// One 128-byte submission entry (struct io_uring_sqe followed by the 64 extra bytes of
/// SQE128), built field by field. The command area of a `URING_CMD` starts at byte 48.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Sqe(pub [u8; 128]);

impl Sqe {
    pub fn new(opcode: u8, fd: RawFd, user_data: u64) -> Sqe {
        let mut s = Sqe([0; 128]);
        s.0[0] = opcode;
        s.0[4..8].copy_from_slice(&fd.to_ne_bytes());
        s.0[32..40].copy_from_slice(&user_data.to_ne_bytes());
        s
    }
    /// `cmd_op` of a `URING_CMD` (the union at byte 8).
    pub fn cmd_op(mut self, op: u32) -> Sqe {
        self.0[8..12].copy_from_slice(&op.to_ne_bytes());
        self
    }
    pub fn addr(mut self, addr: u64) -> Sqe {
        self.0[16..24].copy_from_slice(&addr.to_ne_bytes());
        self
    }
    pub fn len(mut self, len: u32) -> Sqe {
        self.0[24..28].copy_from_slice(&len.to_ne_bytes());
        self
    }
    /// The per-op flags word (`poll32_events` for `POLL_ADD`).
    pub fn op_flags(mut self, v: u32) -> Sqe {
        self.0[28..32].copy_from_slice(&v.to_ne_bytes());
        self
    }
    /// The 80-byte command area of a `URING_CMD`.
    pub fn cmd_mut(&mut self) -> &mut [u8] {
        &mut self.0[48..128]
    }
}

/// A mapping of part of the ring, unmapped on drop.
struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(fd: RawFd, len: usize, offset: i64) -> io::Result<Map> {
        // SAFETY: a fresh shared mapping of the ring's fd; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Map {
            ptr: ptr.cast(),
            len,
        })
    }
    /// The u32 at byte `off` (a ring index or the array), shared with the kernel.
    fn u32_at(&self, off: u32) -> *mut u32 {
        assert!(off as usize + 4 <= self.len);
        // SAFETY: in bounds (checked), and the kernel aligns these fields.
        unsafe { self.ptr.add(off as usize).cast() }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our own mapping, no longer used.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// An io_uring instance. Not `Sync`: one thread submits (and with `SINGLE_ISSUER` it must be
/// the one that created it).
pub struct Ring {
    // Declared first: dropped (unmapped) before the descriptor closes. Only held: the
    // pointers below point into them.
    _sq: Map,
    _cq: Option<Map>,
    sqes: Map,
    fd: OwnedFd,
    sq_head: *const AtomicU32,
    sq_tail: *const AtomicU32,
    sq_mask: u32,
    sq_entries: u32,
    sq_array: *mut u32,
    cq_head: *const AtomicU32,
    cq_tail: *const AtomicU32,
    cq_mask: u32,
    cqes: *const u8,
    /// Entries pushed since the last `enter`.
    unsubmitted: u32,
}

// SAFETY: the raw pointers point into mappings the ring owns; it moves between threads only
// before use (created, then handed over), never shared.
unsafe impl Send for Ring {}

impl Ring {
    pub fn new(entries: u32, flags: u32) -> io::Result<Ring> {
        // struct io_uring_params: 10 u32, then sq_off and cq_off (10 u32 each).
        let mut p = [0u32; 30];
        p[2] = flags;
        // SAFETY: the kernel fills the 120-byte params.
        let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, entries, p.as_mut_ptr()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let (sq_entries, cq_entries, features) = (p[0], p[1], p[5]);
        let (sq_off, cq_off) = (&p[10..20], &p[20..30]);
        let sq_len = sq_off[6] as usize + sq_entries as usize * 4;
        let cq_len = cq_off[5] as usize + cq_entries as usize * 16;
        let raw = fd.as_raw_fd();
        let (sq, cq) = if features & FEAT_SINGLE_MMAP != 0 {
            (Map::new(raw, sq_len.max(cq_len), 0)?, None)
        } else {
            (
                Map::new(raw, sq_len, 0)?,
                Some(Map::new(raw, cq_len, OFF_CQ_RING)?),
            )
        };
        let sqes = Map::new(raw, sq_entries as usize * 128, OFF_SQES)?;
        let cqm = cq.as_ref().unwrap_or(&sq);
        // SAFETY: the kernel's ring_mask / ring_entries, read once.
        let (sq_mask, sq_n, cq_mask) = unsafe {
            (
                *sq.u32_at(sq_off[2]),
                *sq.u32_at(sq_off[3]),
                *cqm.u32_at(cq_off[2]),
            )
        };
        Ok(Ring {
            sq_head: sq.u32_at(sq_off[0]).cast(),
            sq_tail: sq.u32_at(sq_off[1]).cast(),
            sq_mask,
            sq_entries: sq_n,
            sq_array: sq.u32_at(sq_off[6]),
            cq_head: cqm.u32_at(cq_off[0]).cast(),
            cq_tail: cqm.u32_at(cq_off[1]).cast(),
            cq_mask,
            cqes: cqm.u32_at(cq_off[5]).cast(),
            _sq: sq,
            _cq: cq,
            sqes,
            fd,
            unsubmitted: 0,
        })
    }

    /// Queues one entry for the next [`Ring::enter`]; false when the submission queue is full.
    pub fn push(&mut self, sqe: &Sqe) -> bool {
        // SAFETY: head/tail are the kernel's shared indices; only we write the tail.
        unsafe {
            let head = (*self.sq_head).load(Ordering::Acquire);
            let tail = (*self.sq_tail).load(Ordering::Relaxed);
            if tail.wrapping_sub(head) >= self.sq_entries {
                return false;
            }
            let i = tail & self.sq_mask;
            std::ptr::copy_nonoverlapping(sqe.0.as_ptr(), self.sqes.ptr.add(i as usize * 128), 128);
            *self.sq_array.add(i as usize) = i;
            (*self.sq_tail).store(tail.wrapping_add(1), Ordering::Release);
        }
        self.unsubmitted += 1;
        true
    }

    /// Submits what was pushed and waits until at least `wait` completions are there (this is
    /// also where the kernel's deferred task work, e.g. copying a FUSE request in, runs).
    pub fn enter(&mut self, wait: u32) -> io::Result<()> {
        let flags = if wait > 0 { ENTER_GETEVENTS } else { 0 };
        // SAFETY: plain syscall on our ring.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                self.fd.as_raw_fd(),
                self.unsubmitted,
                wait,
                flags,
                std::ptr::null::<libc::sigset_t>(),
                0usize,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.unsubmitted = self.unsubmitted.saturating_sub(r as u32);
        Ok(())
    }

    /// Takes every completion there is, as (user_data, res).
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        // SAFETY: entries between head and tail are the kernel's finished ones; we move head.
        unsafe {
            let mut head = (*self.cq_head).load(Ordering::Relaxed);
            let tail = (*self.cq_tail).load(Ordering::Acquire);
            while head != tail {
                let c = self.cqes.add((head & self.cq_mask) as usize * 16);
                let user_data = u64::from_ne_bytes(*c.cast::<[u8; 8]>());
                let res = i32::from_ne_bytes(*c.add(8).cast::<[u8; 4]>());
                out.push((user_data, res));
                head = head.wrapping_add(1);
            }
            (*self.cq_head).store(head, Ordering::Release);
        }
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("fd", &self.fd).finish()
    }
}
