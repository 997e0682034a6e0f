//! FUSE over io_uring (Linux 6.14+): requests taken from per-CPU ring queues instead of read
//! from /dev/fuse. See bench/uring.md for the protocol, the measurements and the design.
//!
//! fuser keeps the mount, INIT, forgets and interrupts (the kernel still sends those through
//! /dev/fuse) and notifications; when INIT agreed on `FUSE_OVER_IO_URING`, the threads here
//! serve everything else. The kernel queues each request on the queue of the CPU its caller
//! runs on, and each queue's threads are pinned to that CPU: a request never wakes the other
//! CPU, which on a VM whose idle vCPUs halt is most of a /dev/fuse round trip's cost.
//!
//! Every queue gets [`PER_QUEUE`] threads with one ring entry each, so one slow request
//! (a copy-up, an fsync) does not stall every other request from that CPU: the kernel hands
//! the next request to the queue's other free entry.
//!
//! Fallbacks, all silent but for a `log::info!`: the ring is asked for only when
//! `enable_uring` is on and an io_uring with 128-byte entries can be made ([`Probe`]); a
//! kernel that does not offer it at INIT keeps /dev/fuse; a REGISTER the kernel refuses
//! makes the kernel itself go back to /dev/fuse; and when a queue got no thread at all we
//! send a REGISTER it must refuse, for the same effect (the alternative is every request
//! waiting forever for that queue).

mod proto;
mod sys;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use std::thread::JoinHandle;
use std::time::Duration;

use crate::engine::ops::{MAX_READAHEAD, MAX_WRITE, Ops};
use sys::{Ring, Sqe};

/// Threads (each with one ring entry) per CPU queue; `OVL_URING_THREADS` (1 to 8) changes it
/// for measurements.
pub const PER_QUEUE: usize = 2;

fn per_queue() -> usize {
    std::env::var("OVL_URING_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=8).contains(n))
        .unwrap_or(PER_QUEUE)
}
/// enum fuse_uring_cmd
const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;
/// Completion of the poll on the stop eventfd; the entry's own completions use 0.
const STOP: u64 = 1;
const ENTRY: u64 = 0;

/// Whether the ring can be served here, checked before the mount asks the kernel for it.
/// Holds a ring of our own, used only to make the kernel fall back if the serving threads
/// cannot be started after all (see the module doc).
#[derive(Debug)]
pub struct Probe {
    ring: Ring,
}

impl Probe {
    /// `None` (and why, at info level) when the ring is not to be asked for.
    pub fn new() -> Option<Probe> {
        let param = "/sys/module/fuse/parameters/enable_uring";
        match std::fs::read_to_string(param) {
            Ok(v) if v.trim() == "Y" => {}
            Ok(_) => {
                log::info!("FUSE over io_uring is off in the kernel ({param}): using /dev/fuse");
                return None;
            }
            Err(e) => {
                log::info!("FUSE over io_uring is not available ({param}: {e}): using /dev/fuse");
                return None;
            }
        }
        // Seccomp filters and kernel.io_uring_disabled refuse it here.
        match Ring::new(4, sys::SETUP_SQE128) {
            Ok(ring) => Some(Probe { ring }),
            Err(e) => {
                log::info!("io_uring cannot be set up ({e}): using /dev/fuse");
                None
            }
        }
    }
}

/// The running ring threads. Dropping stops and joins them: only once the connection is over
/// (a queue without its threads would hold its requests forever).
#[derive(Debug)]
pub struct Rings {
    threads: Vec<JoinHandle<()>>,
    stop: Arc<OwnedFd>,
    /// Every queue got its threads (else the kernel was made to fall back).
    active: bool,
}

impl Rings {
    /// Whether requests are served through the ring (as far as we know: a registration the
    /// kernel refuses later makes a queue's threads end, so its threads end).
    pub fn active(&self) -> bool {
        self.active && self.threads.iter().all(|t| !t.is_finished())
    }

    /// Ends the threads (the connection is over) and waits for them.
    pub fn stop(self) {
        drop(self)
    }

    /// Lets the threads run on unjoined (the connection lives on in other mount namespaces).
    pub fn detach(mut self) {
        self.threads.clear();
    }
}

impl Drop for Rings {
    fn drop(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), 8) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Queues the kernel makes: one per possible CPU (numbered by CPU).
fn queues() -> usize {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    s.trim()
        .split(',')
        .filter_map(|r| r.rsplit('-').next()?.parse::<usize>().ok())
        .max()
        .map_or(1, |m| m + 1)
}

/// The payload buffer each entry needs: the kernel refuses one smaller than
/// max(max_write, max_pages × page size), with max_pages as fuser derives it at INIT.
fn payload_len() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let max_pages = (MAX_WRITE.max(MAX_READAHEAD) as usize - 1) / page + 1;
    (MAX_WRITE as usize).max(max_pages * page).max(8192)
}

/// Called once the session is running, with INIT's answer on `init` (fuser answers INIT
/// before the session exists): when the kernel agreed to the ring, starts the queue threads.
/// `None`: /dev/fuse serves everything.
pub fn start(probe: Probe, ops: Arc<Ops>, init: Receiver<bool>) -> Option<Rings> {
    match init.try_recv() {
        Ok(true) => {}
        Ok(false) => {
            log::info!("the kernel did not offer FUSE over io_uring: using /dev/fuse");
            return None;
        }
        Err(_) => {
            log::info!("no FUSE INIT answer seen: using /dev/fuse");
            return None;
        }
    }
    // SAFETY: plain eventfd creation.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if efd < 0 {
        log::info!(
            "FUSE over io_uring: eventfd: {}",
            io::Error::last_os_error()
        );
        refuse(probe, &ops);
        return None;
    }
    // SAFETY: a new descriptor we own.
    let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(efd) });
    let n = queues();
    let payload = payload_len();
    let mut threads = Vec::new();
    let per_queue = per_queue();
    let mut served = vec![0usize; n];
    for (qid, served) in served.iter_mut().enumerate() {
        for k in 0..per_queue {
            let (tx, rx) = sync_channel(1);
            let (ops, stop) = (ops.clone(), stop.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("ovl-ring-{qid}.{k}"))
                .spawn(move || serve_queue(qid as u16, &ops, &stop, payload, tx));
            let Ok(t) = spawned else { continue };
            threads.push(t);
            match rx.recv() {
                Ok(Ok(())) => *served += 1,
                Ok(Err(e)) => log::info!("FUSE over io_uring: queue {qid}: {e}"),
                Err(_) => {}
            }
        }
    }
    let active = !served.contains(&0);
    if !active {
        // Until every queue has an entry, every request waits: give up the ring instead.
        log::info!("FUSE over io_uring: not every CPU queue could be served: using /dev/fuse");
        refuse(probe, &ops);
    } else {
        log::info!("serving FUSE over io_uring: {n} queues x {per_queue} threads");
    }
    Some(Rings {
        threads,
        stop,
        active,
    })
}

/// Sends the kernel a REGISTER it must refuse (a header buffer too short): a refused
/// registration turns the connection's ring off, and waiting requests go to /dev/fuse.
fn refuse(mut probe: Probe, ops: &Ops) {
    let mut tiny = [0u8; 8];
    let mut big = vec![0u8; payload_len()];
    let iov = [
        libc::iovec {
            iov_base: tiny.as_mut_ptr().cast(),
            iov_len: tiny.len(),
        },
        libc::iovec {
            iov_base: big.as_mut_ptr().cast(),
            iov_len: big.len(),
        },
    ];
    let mut done = Vec::new();
    for _ in 0..500 {
        probe.ring.push(&register(ops.conn().as_raw_fd(), 0, &iov));
        // The refusal completes during the submission; never wait (a registration that
        // were accepted would complete only with a request).
        if probe.ring.enter(0).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
        done.clear();
        probe.ring.reap(&mut done);
        // EAGAIN: INIT's reply is not processed yet.
        if done.iter().all(|&(_, r)| r != -libc::EAGAIN) {
            return;
        }
    }
    log::warn!("FUSE over io_uring: could not make the kernel fall back; requests may hang");
}

fn register(fd: RawFd, qid: u16, iov: &[libc::iovec; 2]) -> Sqe {
    let mut s = Sqe::new(sys::OP_URING_CMD, fd, ENTRY)
        .cmd_op(CMD_REGISTER)
        .addr(iov.as_ptr() as u64)
        .len(2);
    // struct fuse_uring_cmd_req { flags u64, commit_id u64, qid u16, padding }
    s.cmd_mut()[16..18].copy_from_slice(&qid.to_le_bytes());
    s
}

fn commit(fd: RawFd, qid: u16, commit_id: u64) -> Sqe {
    let mut s = Sqe::new(sys::OP_URING_CMD, fd, ENTRY).cmd_op(CMD_COMMIT_AND_FETCH);
    s.cmd_mut()[8..16].copy_from_slice(&commit_id.to_le_bytes());
    s.cmd_mut()[16..18].copy_from_slice(&qid.to_le_bytes());
    s
}

/// Keeps the thread on `cpu`, where the requests of its queue come from.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays in bounds for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
            return;
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            log::debug!(
                "ring thread for CPU {cpu} not pinned: {}",
                io::Error::last_os_error()
            );
        }
    }
}

/// A ring thread's setup outcome, sent once.
type Setup = std::sync::mpsc::SyncSender<io::Result<()>>;

/// One thread of queue `qid`: registers one entry and serves the requests it receives until
/// the connection ends or `stop` is signalled.
fn serve_queue(qid: u16, ops: &Ops, stop: &OwnedFd, payload: usize, setup: Setup) {
    pin(qid.into());
    // DEFER_TASKRUN: the kernel's work for our entry (copying a request in) runs when we
    // enter the ring, not as an interrupt of whatever the thread is doing (3.3 against
    // 4.3 µs a round trip in bench/uring.md).
    let ring = Ring::new(
        4,
        sys::SETUP_SQE128 | sys::SETUP_SINGLE_ISSUER | sys::SETUP_DEFER_TASKRUN,
    )
    .or_else(|_| Ring::new(4, sys::SETUP_SQE128 | sys::SETUP_COOP_TASKRUN));
    let mut ring = match ring {
        Ok(r) => r,
        Err(e) => {
            let _ = setup.send(Err(e));
            return;
        }
    };
    let fd = ops.conn().as_raw_fd();
    // The kernel keeps these addresses while the entry is registered: boxed, never moved.
    let mut header = vec![0u8; proto::HEADER].into_boxed_slice();
    let mut body = vec![0u8; payload].into_boxed_slice();
    let iov = Box::new([
        libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: body.as_mut_ptr().cast(),
            iov_len: body.len(),
        },
    ]);
    let poll = Sqe::new(sys::OP_POLL_ADD, stop.as_raw_fd(), STOP).op_flags(libc::POLLIN as u32);
    ring.push(&poll);
    ring.push(&register(fd, qid, &iov));
    let _ = setup.send(Ok(()));
    let mut registering = true;
    let mut retries = 0;
    let mut done = Vec::new();
    let mut out = Vec::new();
    // While it waits (and so while its COMMIT_AND_FETCH wakes the app that asked), the thread
    // is SCHED_IDLE: a CPU running only such threads counts as idle when the scheduler places
    // a woken task, so the app is woken right here, on the CPU its next request will come from,
    // instead of on the other CPU, which on a VM may have to be woken from halt (one client's
    // round trip: 5.3 µs so, 15-34 µs without, 9.5 µs over /dev/fuse; bench/uring.md). It is
    // back to normal as soon as a request is in: serving never runs at idle priority.
    let policy = |p: libc::c_int| {
        let sp = libc::sched_param { sched_priority: 0 };
        // SAFETY: plain system call on this thread (pid 0) with a valid parameter.
        unsafe { libc::sched_setscheduler(0, p, &sp) };
    };
    loop {
        policy(libc::SCHED_IDLE);
        let r = ring.enter(1);
        policy(libc::SCHED_OTHER);
        match r {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                log::warn!("FUSE ring {qid}: io_uring_enter: {e}");
                return;
            }
        }
        done.clear();
        ring.reap(&mut done);
        for &(what, res) in &done {
            if what == STOP {
                if res > 0 {
                    return;
                }
                continue;
            }
            if res == 0 {
                registering = false;
                let commit_id = serve(ops, &mut header, &mut body, &mut out);
                ring.push(&commit(fd, qid, commit_id));
                continue;
            }
            match -res {
                // INIT's reply is not processed yet.
                libc::EAGAIN if registering && retries < 500 => {
                    retries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                    ring.push(&register(fd, qid, &iov));
                }
                // The connection is over (unmounted or aborted).
                libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV => return,
                e if registering => {
                    // The kernel turned the ring off for this connection: /dev/fuse serves.
                    log::info!(
                        "FUSE over io_uring: queue {qid} refused ({}): using /dev/fuse",
                        io::Error::from_raw_os_error(e)
                    );
                    return;
                }
                e => {
                    // The reply found no request (it ended meanwhile): the kernel dropped
                    // our entry with it, so register the buffers again as a new one.
                    log::debug!(
                        "FUSE ring {qid}: commit: {}",
                        io::Error::from_raw_os_error(e)
                    );
                    registering = true;
                    ring.push(&register(fd, qid, &iov));
                }
            }
        }
    }
}

/// Serves the request in the entry and writes the reply into it; returns the commit id.
fn serve(ops: &Ops, header: &mut [u8], body: &mut [u8], out: &mut Vec<u8>) -> u64 {
    let h = proto::InHeader::parse(&header[..proto::IN_OUT]);
    let (commit_id, len) = proto::ent_in(header);
    let arg: [u8; proto::OP_IN] = header[proto::IN_OUT..proto::IN_OUT + proto::OP_IN]
        .try_into()
        .expect("op_in");
    let input = &body[..len.min(body.len())];
    // A panic in an operation must not take the entry with it (its queue would lose a
    // server): it is answered with EIO like any failure.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        proto::dispatch(ops, &h, &arg, input, out)
    }))
    .unwrap_or(Err(libc::EIO));
    let r = match r {
        Ok(()) if out.len() <= body.len() => {
            body[..out.len()].copy_from_slice(out);
            Ok(out.len())
        }
        Ok(()) => Err(libc::EIO),
        Err(e) => Err(e),
    };
    proto::set_reply(header, h.unique, r);
    commit_id
}
