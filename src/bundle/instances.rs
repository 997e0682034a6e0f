//! Any number of instances of one app over one kept upper.
//!
//! The first run of an app whose upper is free takes the upper's writer lock
//! ([`state::try_lock_upper`]) and starts the **server**: a process of its own (forked
//! twice, in a session of its own, stdio on /dev/null so that nobody waiting for the first
//! run's output waits for the server) that mounts the overlay in a private namespace, as
//! `ovl-run` does, and listens on a unix socket beside the upper (`.<upper>.ovl-sock`, in the
//! app's 0700 state directory). Every run, the first included, is then a **client**: it
//! connects, receives the server's user and mount namespaces as file descriptors (no process
//! id that could be reused) and the mount point, and runs the entry point as its own child,
//! which enters those namespaces just before exec. So each instance keeps its own arguments,
//! environment, working directory, terminal, signals and exit status, and returns as soon as
//! its app (and what the app left running) is done; the runtime process itself never enters
//! the server's namespaces.
//!
//! The server keeps the mount while any instance runs. When the last one has left (exited, or
//! died: its connection closes with it), it stops listening, ends what killed instances left
//! running in its namespace, finalizes once (preserve; or commit, if an instance asked for
//! one) and exits; the instance that left last, and those that asked for the commit, wait for
//! that and show its result. An instance that asks for a commit while others run says so and
//! waits. A killed server leaves a socket nobody listens on and a free lock: the next run
//! takes the lock and serves (a stale socket is removed only by the lock's holder).
//!
//! Protocol: SOCK_SEQPACKET, each message NUL-separated fields. Client: `HELLO proto id path
//! commit`, later `DONE commit`. Server: `READY mountpoint` (with the namespace fds), `FAIL
//! message`, `FALLBACK message` (FUSE cannot mount: run without it), then `BYE`, or `WAIT n`,
//! `NOTE message` and `FINAL 0|1 message`.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, sockopt,
};

use super::extract::Bundle;
use super::state::{self, UpperLock};
use crate::OverlayFS;
use crate::launcher::{self, Launch};
use crate::overlayfs::hidden_sibling;

/// Changes whenever the messages do: a server and a client of other runtimes (one payload in
/// two bundle files) only talk if they speak the same.
const PROTO: &str = "1";
const MAX_MSG: usize = 16384;

/// Where the server of `upper` listens.
pub fn socket_path(upper: &Path) -> PathBuf {
    hidden_sibling(upper, ".ovl-sock")
}

/// The server's log (its stderr, unless `--ovl-verbose` kept the first run's): each instance
/// shows what was logged while it ran (a damaged block of the bundle, say) when its app ends.
pub fn log_path(upper: &Path) -> PathBuf {
    hidden_sibling(upper, ".ovl-log")
}

/// Prints what the server logged from byte `from` on (see [`log_path`]).
fn show_log(upper: &Path, from: u64) {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = fs::File::open(log_path(upper)) else {
        return;
    };
    let mut s = String::new();
    if f.seek(SeekFrom::Start(from)).is_ok()
        && f.take(MAX_MSG as u64).read_to_string(&mut s).is_ok()
    {
        eprint!("{s}");
    }
}

/// A message's fields and the descriptors that came with it.
type Message = (Vec<Vec<u8>>, Vec<OwnedFd>);

/// A connection between an instance and the server.
#[derive(Debug)]
pub struct Conn {
    fd: OwnedFd,
}

impl Conn {
    fn send(&self, fields: &[&[u8]], fds: &[RawFd]) -> io::Result<()> {
        let msg = fields.join(&0u8);
        let iov = [io::IoSlice::new(&msg)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsg: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        loop {
            match socket::sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
                Ok(_) => return Ok(()),
            }
        }
    }

    fn say(&self, fields: &[&str]) -> io::Result<()> {
        let f: Vec<&[u8]> = fields.iter().map(|s| s.as_bytes()).collect();
        self.send(&f, &[])
    }

    /// The next message and the descriptors that came with it; `None` once the peer is gone.
    fn recv(&self) -> io::Result<Option<Message>> {
        let mut buf = vec![0u8; MAX_MSG];
        let mut cbuf = nix::cmsg_space!([RawFd; 4]);
        loop {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let (n, fds) = match socket::recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cbuf),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(Errno::EINTR) => continue,
                Err(Errno::ECONNRESET) => return Ok(None),
                Err(e) => return Err(e.into()),
                Ok(r) => {
                    let mut fds = Vec::new();
                    for c in r.cmsgs().map_err(io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(v) = c {
                            fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                        }
                    }
                    (r.bytes, fds)
                }
            };
            // Every message has a verb: an empty read is the end.
            if n == 0 {
                return Ok(None);
            }
            let fields = buf[..n].split(|b| *b == 0).map(<[u8]>::to_vec).collect();
            return Ok(Some((fields, fds)));
        }
    }

    /// The uid and pid of the process at the other end.
    fn peer(&self) -> io::Result<(u32, i32)> {
        let c = socket::getsockopt(&self.fd, sockopt::PeerCredentials)?;
        Ok((c.uid(), c.pid()))
    }
}

fn text(f: &[u8]) -> String {
    String::from_utf8_lossy(f).into_owned()
}

/// An address for `path`; through `/proc/self/fd` (with the directory's descriptor, to keep
/// while the address is used) when the path is too long for a socket address.
fn address(path: &Path) -> io::Result<(UnixAddr, Option<OwnedFd>)> {
    if let Ok(a) = UnixAddr::new(path) {
        return Ok((a, None));
    }
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    let dir: OwnedFd = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(parent)?
        .into();
    let mut short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    short.push(name);
    Ok((UnixAddr::new(&short)?, Some(dir)))
}

use std::os::unix::fs::OpenOptionsExt;

fn new_socket() -> io::Result<OwnedFd> {
    Ok(socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Connects to the server at `path`, which must run as we do.
fn connect(path: &Path) -> io::Result<Conn> {
    let fd = new_socket()?;
    let (addr, _dir) = address(path)?;
    loop {
        match socket::connect(fd.as_raw_fd(), &addr) {
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
            Ok(()) => break,
        }
    }
    let conn = Conn { fd };
    let (uid, pid) = conn.peer()?;
    let me = unsafe { libc::geteuid() };
    if uid != me {
        return Err(io::Error::other(format!(
            "it is served by process {pid} of uid {uid}, not by one of ours (uid {me})"
        )));
    }
    Ok(conn)
}

/// How this run takes part.
#[derive(Debug)]
pub enum Attach {
    /// The upper is free and now ours: start the server.
    Serve(UpperLock),
    /// A server runs: join it.
    Join(Conn),
}

/// Joins the server of `upper`, or takes the upper to start one when none runs. A server that
/// is starting or finishing (the lock held, nobody answering yet or any more) is waited for.
pub fn attach(upper: &Path, name: &str) -> Result<Attach, String> {
    let sock = socket_path(upper);
    let start = Instant::now();
    let mut noted = false;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(lock) = state::try_lock_upper(upper)? {
            return Ok(Attach::Serve(lock));
        }
        match connect(&sock) {
            Ok(c) => return Ok(Attach::Join(c)),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENOENT | libc::ECONNREFUSED | libc::EAGAIN)
                ) => {}
            Err(e) => {
                return Err(format!(
                    "{}: cannot join the run of {name} using this upper ({e}): run this one \
                     with --ovl-upper=DIR or --ovl-on-exit=discard",
                    sock.display()
                ));
            }
        }
        if !noted && start.elapsed() > Duration::from_secs(3) {
            eprintln!(
                "{name}: waiting for another run of {name} to be done with {}",
                upper.display()
            );
            noted = true;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// What the server serves.
pub struct Server<'a> {
    pub bundle: &'a Bundle,
    pub upper: PathBuf,
    /// The overlay, checked, not mounted (its mount point is chosen by the server).
    pub ofs: OverlayFS,
    /// The writer's lock, held by the server for its whole life.
    pub lock: UpperLock,
    /// Keep the first run's stderr for the server's log (`--ovl-verbose`).
    pub verbose: bool,
}

/// Waits (briefly) until threads that were just joined are gone: a fork must not copy a
/// process whose other threads may hold the allocator's locks.
fn wait_single_threaded() {
    for _ in 0..200 {
        if fs::read_dir("/proc/self/task").map_or(1, |d| d.count()) <= 1 {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Listens at the upper's socket (the caller holds the writer's lock).
fn listen(upper: &Path) -> Result<OwnedFd, String> {
    let sock = socket_path(upper);
    // Only the lock's holder removes a socket: one a killed server left.
    match fs::remove_file(&sock) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(format!("removing {}: {e}", sock.display()));
        }
        _ => {}
    }
    let listener = new_socket().map_err(|e| format!("creating a socket: {e}"))?;
    let bound = address(&sock).and_then(|(addr, _dir)| {
        socket::bind(listener.as_raw_fd(), &addr)?;
        socket::listen(&listener, socket::Backlog::new(128).expect("valid backlog"))?;
        Ok(())
    });
    bound.map_err(|e| {
        format!(
            "{}: cannot listen for other instances ({e}): give the app a state directory on a \
             local filesystem with --ovl-upper=DIR",
            sock.display()
        )
    })?;
    Ok(listener)
}

/// For a run that holds the writer's lock without serving instances (`--ovl-mount`): every
/// run that tries to join is told `why`, until [`stop_refusing`].
pub fn refuse_joiners(upper: &Path, why: String) -> Result<(), String> {
    let listener = listen(upper)?;
    std::thread::Builder::new()
        .name("ovl-refuse".into())
        .spawn(move || {
            while let Some(c) = accept(&listener) {
                let _ = c.say(&["FAIL", &why]);
            }
        })
        .map_err(|e| format!("starting a thread: {e}"))?;
    Ok(())
}

/// Removes the socket [`refuse_joiners`] made (still holding the writer's lock).
pub fn stop_refusing(upper: &Path) {
    let _ = fs::remove_file(socket_path(upper));
}

/// Starts the server (the caller holds the writer's lock, in `srv`) and returns the caller's
/// own connection to it.
pub fn start(srv: Server) -> Result<Conn, String> {
    let sock = socket_path(&srv.upper);
    let listener = listen(&srv.upper)?;
    // Queued before the server exists: it finds this connection, so it never waits for a
    // first instance that died before connecting.
    let conn = connect(&sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    {
        use std::io::Write;
        let _ = io::stdout().flush();
        let _ = io::stderr().flush();
    }
    wait_single_threaded();
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let _ = fs::remove_file(&sock);
        return Err(format!(
            "starting the server of {}: fork: {}",
            srv.upper.display(),
            io::Error::last_os_error()
        ));
    }
    if pid == 0 {
        // Not a child of the first instance (which waits for all its children), and in a
        // session of its own: a terminal's signals and hangup are for the instances.
        drop(conn);
        unsafe {
            libc::setsid();
            match libc::fork() {
                0 => {}
                -1 => libc::_exit(1),
                _ => libc::_exit(0),
            }
            // Holds no directory of the user's busy (every path it uses is absolute).
            libc::chdir(c"/".as_ptr());
        }
        serve(srv, listener);
    }
    let mut st = 0;
    while unsafe { libc::waitpid(pid, &mut st, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
    if !(libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 0) {
        let _ = fs::remove_file(&sock);
        return Err(format!(
            "starting the server of {}: fork failed",
            srv.upper.display()
        ));
    }
    Ok(conn)
}

#[derive(Debug, PartialEq)]
enum Phase {
    /// Connected, no HELLO yet.
    New,
    /// Its app runs on the mount.
    Running,
    /// Its app is done; it waits for the finalization (it left last, or asked for a commit).
    Waiting { commit: bool },
}

struct Client {
    conn: Conn,
    phase: Phase,
}

/// The next connection; `None` when none is waiting (a non-blocking listener) or on error.
fn accept(listener: &OwnedFd) -> Option<Conn> {
    loop {
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            return Some(Conn {
                fd: unsafe { OwnedFd::from_raw_fd(fd) },
            });
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return None;
        }
    }
}

fn open_ns(which: &str) -> io::Result<OwnedFd> {
    Ok(fs::File::open(format!("/proc/self/ns/{which}"))?.into())
}

/// The server's life; never returns.
fn serve(srv: Server, listener: OwnedFd) -> ! {
    let Server {
        bundle,
        upper,
        mut ofs,
        lock,
        verbose,
    } = srv;
    let log = if verbose {
        None
    } else {
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_APPEND)
            .open(log_path(&upper))
            .ok()
    };
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            if !verbose {
                libc::dup2(log.as_ref().map_or(null, |l| l.as_raw_fd()), 2);
            }
            if null > 2 {
                libc::close(null);
            }
        }
    }
    drop(log);
    // Polled; a last look when the last instance leaves must not block.
    unsafe {
        let fl = libc::fcntl(listener.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(listener.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let name = bundle.manifest().name.clone();
    let sock = socket_path(&upper);
    let sock_id = fs::symlink_metadata(&sock).ok().map(|m| (m.dev(), m.ino()));
    // Removes our socket (never one a later server made).
    let unlink = || {
        let now = fs::symlink_metadata(&sock).ok().map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == sock_id {
            let _ = fs::remove_file(&sock);
        }
    };
    let mut guardian = None;
    let private = match launcher::enter_private_namespace() {
        Ok(n) => {
            log::info!("server of {name}: in a {n:?} namespace");
            ofs.set_mount_method(crate::MountMethod::Direct)
                .set_allow_other(true);
            guardian = launcher::pidns::spawn_guardian();
            true
        }
        Err(e) => {
            log::info!("no private namespace ({e}); mounting through fusermount3");
            ofs.set_mount_method(crate::MountMethod::Helper)
                .set_auto_unmount(true);
            false
        }
    };
    // Named after this process: `remove_stale_mountpoints` leaves it alone while we live.
    ofs.mountpoint_as_home_named(&name);
    let ns = ofs.mount().map_err(|e| e.to_string()).and_then(|()| {
        let open = |w| open_ns(w).map_err(|e| format!("opening our {w} namespace: {e}"));
        Ok((open("user")?, open("mnt")?))
    });
    let (user_ns, mnt_ns) = match ns {
        Ok(x) => x,
        Err(e) => {
            // Everyone queued is told; later ones find the lock free and try themselves.
            unlink();
            while let Some(c) = accept(&listener) {
                let _ = c.say(&["FALLBACK", &e]);
            }
            let _ = ofs.umount();
            std::process::exit(0);
        }
    };
    let mnt = ofs.mountpoint().expect("mounted").to_path_buf();
    let prefetch = super::prefetch::start(bundle, &upper);
    let me = unsafe { libc::geteuid() };
    let mut clients: Vec<Client> = Vec::new();
    let mut listening = Some(listener);
    let mut running = 0usize;
    let mut commit = false;
    let mut seen = false;
    while let Some(listener) = &listening {
        if seen && running == 0 && clients.iter().all(|c| c.phase != Phase::New) {
            // The last instance left. One that connected meanwhile keeps the mount; after
            // this last look, a newcomer finds nobody listening and starts over.
            if let Some(c) = accept(listener) {
                clients.push(Client {
                    conn: c,
                    phase: Phase::New,
                });
                continue;
            }
            unlink();
            listening = None;
            break;
        }
        let mut pfds = vec![libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        pfds.extend(clients.iter().map(|c| libc::pollfd {
            fd: c.conn.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        if unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) } < 0 {
            continue;
        }
        let mut gone = Vec::new();
        for (i, p) in pfds.iter().enumerate().skip(1) {
            if p.revents == 0 {
                continue;
            }
            let c = &mut clients[i - 1];
            let msg = c.conn.recv().ok().flatten();
            let Some((f, _)) = msg else {
                // Gone (exited after its DONE, or died).
                if c.phase == Phase::Running {
                    running -= 1;
                }
                gone.push(i - 1);
                continue;
            };
            let verb = f.first().map(|v| v.as_slice()).unwrap_or_default();
            match (&c.phase, verb) {
                (Phase::New, b"HELLO") => {
                    let field = |n: usize| f.get(n).map(|v| v.as_slice()).unwrap_or_default();
                    let path = Path::new(OsStr::from_bytes(field(3)));
                    let wants_commit = field(4) == b"1";
                    let refusal = if field(1) != PROTO.as_bytes() {
                        Some(format!(
                            "{}: {name} is running from {} with another version of the ovl \
                             runtime; wait for it to exit, or run this one with \
                             --ovl-upper=DIR",
                            upper.display(),
                            bundle.path().display()
                        ))
                    } else if c.conn.peer().map(|p| p.0).ok() != Some(me) {
                        Some(format!("{}: not our user's instance", upper.display()))
                    } else if field(2) != bundle.id().as_bytes() {
                        Some(format!(
                            "{}: {name} is running from {}, another version of it, with this \
                             state; wait for it to exit, or run this one with --ovl-upper=DIR",
                            upper.display(),
                            bundle.path().display()
                        ))
                    } else if wants_commit && path != bundle.path() {
                        Some(format!(
                            "{}: {name} is running from {}, another copy of it, with this \
                             state; a commit into this copy would take the state from that \
                             one: wait for it to exit, or commit from that file",
                            upper.display(),
                            bundle.path().display()
                        ))
                    } else {
                        None
                    };
                    if let Some(r) = refusal {
                        let _ = c.conn.say(&["FAIL", &r]);
                        gone.push(i - 1);
                        continue;
                    }
                    if path != bundle.path() {
                        if let Err(e) = state::note_user_file(&upper, &text(field(2)), path) {
                            log::warn!("{e}");
                        }
                    }
                    let fds = [user_ns.as_raw_fd(), mnt_ns.as_raw_fd()];
                    if c.conn
                        .send(&[b"READY", mnt.as_os_str().as_bytes()], &fds)
                        .is_ok()
                    {
                        c.phase = Phase::Running;
                        running += 1;
                    } else {
                        gone.push(i - 1);
                    }
                }
                (Phase::Running, b"DONE") => {
                    running -= 1;
                    let wants = f.get(1).is_some_and(|v| v == b"1");
                    commit |= wants;
                    if running == 0 {
                        c.phase = Phase::Waiting { commit: wants };
                    } else if wants {
                        let _ = c.conn.say(&["WAIT", &running.to_string()]);
                        c.phase = Phase::Waiting { commit: true };
                    } else {
                        let _ = c.conn.say(&["BYE"]);
                        gone.push(i - 1);
                    }
                }
                _ => {
                    let _ = c.conn.say(&["FAIL", "protocol error"]);
                    if c.phase == Phase::Running {
                        running -= 1;
                    }
                    gone.push(i - 1);
                }
            }
        }
        for i in gone.into_iter().rev() {
            clients.remove(i);
        }
        if pfds[0].revents != 0 {
            if let Some(c) = accept(listener) {
                seen = true;
                clients.push(Client {
                    conn: c,
                    phase: Phase::New,
                });
            }
        }
    }
    drop(listening);
    if let Some(p) = prefetch {
        p.finish();
    }
    super::prefetch::save(bundle, &upper);
    // Nobody runs any more: what is left in our namespace was started by instances that were
    // killed, and would keep the mount busy.
    if private {
        kill_others_in_namespace(guardian);
    }
    let waiters: Vec<(Conn, bool)> = clients
        .into_iter()
        .filter_map(|c| match c.phase {
            Phase::Waiting { commit } => Some((c.conn, commit)),
            _ => None,
        })
        .collect();
    let res = if commit {
        let note = || {
            let msg =
                format!("{name}: waiting for discard runs of {name} to exit before committing");
            for (c, wants) in &waiters {
                if *wants {
                    let _ = c.say(&["NOTE", &msg]);
                }
            }
        };
        state::commit_bundle(bundle, &mut ofs, &upper, &note)
    } else {
        ofs.umount().map(|()| String::new()).map_err(|e| {
            format!(
                "{e}; nothing was finalized, the changes stay in {}",
                upper.display()
            )
        })
    };
    // Every instance showed its part of the log before it said DONE.
    let _ = fs::remove_file(log_path(&upper));
    // The next run may start as soon as the first waiter hears of the end.
    drop(lock);
    for (c, wants) in &waiters {
        let reply = match (&res, wants | !commit) {
            (Ok(m), true) => ["FINAL", "0", m.as_str()],
            (Err(e), true) => ["FINAL", "1", e.as_str()],
            (_, false) => ["FINAL", "0", ""],
        };
        let _ = c.say(&reply);
    }
    std::process::exit(0);
}

/// Kills every process in our mount namespace but us and `except`, until none is left.
fn kill_others_in_namespace(except: Option<i32>) {
    let me = fs::read_link("/proc/self/ns/mnt").ok();
    let self_pid = unsafe { libc::getpid() };
    for _ in 0..1000 {
        let mut found = false;
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                continue;
            };
            if pid != self_pid
                && Some(pid) != except
                && me.is_some()
                && fs::read_link(e.path().join("ns/mnt")).ok() == me
            {
                log::info!("ending process {pid}, left by an instance that was killed");
                unsafe { libc::kill(pid, libc::SIGKILL) };
                found = true;
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How a joined run ended.
#[derive(Debug)]
pub enum Joined {
    /// The app's exit status.
    Exit(i32),
    /// The server ended before taking us in: start over.
    Retry,
    /// The server could not mount (no usable FUSE): run without it.
    Fallback(String),
}

/// (device, inode) of a namespace.
fn ns_id(f: &fs::File) -> Option<(u64, u64)> {
    f.metadata().ok().map(|m| (m.dev(), m.ino()))
}

/// Tries, in a throwaway child, to enter the namespaces, so that a refusal is reported as
/// such and not as an app that could not start.
fn probe(ns: &[(RawFd, libc::c_int)]) -> io::Result<()> {
    if ns.is_empty() {
        return Ok(());
    }
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            for &(fd, t) in ns {
                if libc::setns(fd, t) < 0 {
                    libc::_exit(*libc::__errno_location());
                }
            }
            libc::_exit(0);
        }
    }
    let mut st = 0;
    while unsafe { libc::waitpid(pid, &mut st, 0) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    match (libc::WIFEXITED(st), libc::WEXITSTATUS(st)) {
        (true, 0) => Ok(()),
        (true, e) => Err(io::Error::from_raw_os_error(e)),
        _ => Err(io::Error::other("the probe died")),
    }
}

/// Runs this instance on the server's mount: `make` builds the command from the mount point.
/// `commit`: this instance asks for the changes to be committed once all instances are done.
pub fn run_joined(
    conn: Conn,
    bundle: &Bundle,
    upper: &Path,
    commit: bool,
    make: impl FnOnce(&Path) -> Launch,
) -> Result<Joined, String> {
    let name = &bundle.manifest().name;
    let id = bundle.id();
    let flag: &[u8] = if commit { b"1" } else { b"0" };
    let hello = [
        b"HELLO".as_slice(),
        PROTO.as_bytes(),
        id.as_bytes(),
        bundle.path().as_os_str().as_bytes(),
        flag,
    ];
    // A server that refuses at once may be gone before this arrives: its answer is read all
    // the same.
    let _ = conn.send(&hello, &[]);
    let protocol = || {
        format!(
            "{}: the server of {name} answered nonsense",
            upper.display()
        )
    };
    let Some((f, fds)) = conn.recv().ok().flatten() else {
        return Ok(Joined::Retry);
    };
    match f.first().map(|v| v.as_slice()) {
        Some(b"READY") => {}
        Some(b"FAIL") => return Err(f.get(1).map(|m| text(m)).unwrap_or_else(protocol)),
        Some(b"FALLBACK") => {
            return Ok(Joined::Fallback(
                f.get(1).map(|m| text(m)).unwrap_or_default(),
            ));
        }
        _ => return Err(protocol()),
    }
    let (Some(mnt), [user_ns, mnt_ns]) = (f.get(1), fds.as_slice()) else {
        return Err(protocol());
    };
    let mnt = PathBuf::from(OsStr::from_bytes(mnt));
    // What the server logs from now on is this instance's to show.
    let log_from = fs::metadata(log_path(upper)).map_or(0, |m| m.len());
    // Only the namespaces that are not ours already (no private namespace: one
    // fusermount3 mount everyone sees).
    let mut enter = Vec::new();
    for (fd, which, t) in [
        (user_ns, "user", libc::CLONE_NEWUSER),
        (mnt_ns, "mnt", libc::CLONE_NEWNS),
    ] {
        let theirs = fs::File::from(fd.try_clone().map_err(|e| e.to_string())?);
        let ours = fs::File::open(format!("/proc/self/ns/{which}")).ok();
        if ours.as_ref().and_then(ns_id) != ns_id(&theirs) {
            enter.push((fd.as_raw_fd(), t));
        }
    }
    probe(&enter).map_err(|e| {
        format!(
            "{}: cannot enter the namespaces of the run of {name} serving this upper ({e}): \
             run this one with --ovl-upper=DIR or --ovl-on-exit=discard",
            upper.display()
        )
    })?;
    let launch = make(&mnt);
    // The starting directory, by path in the server's namespace if it is the same
    // directory there, else by descriptor.
    let owd: Option<OwnedFd> = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(&launch.cwd)
        .ok()
        .map(Into::into);
    let cwd = crate::engine::sys::cstr(launch.cwd.as_os_str()).map_err(|e| e.to_string())?;
    let owd_raw = owd.as_ref().map(|f| f.as_raw_fd());
    let hook: launcher::PreExec = Box::new(move || {
        for &(fd, t) in &enter {
            if unsafe { libc::setns(fd, t) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let Some(owd) = owd_raw else {
            return Ok(());
        };
        unsafe {
            let mut a: libc::stat = std::mem::zeroed();
            let mut b: libc::stat = std::mem::zeroed();
            let same = libc::chdir(cwd.as_ptr()) == 0
                && libc::stat(c".".as_ptr(), &mut a) == 0
                && libc::fstat(owd, &mut b) == 0
                && (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino);
            if !same && libc::fchdir(owd) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    });
    let target = Arc::new(launcher::Target::default());
    let fwd = launcher::forward_signals(target.clone())
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    let out = launcher::run_outcome_entering(&launch, &target, &[], Some(hook));
    fwd.close();
    drop(owd);
    show_log(upper, log_from);
    let code = out
        .map_err(|e| format!("running {:?}: {e}", launch.argv[0]))?
        .code;
    let gone = || {
        format!(
            "{}: the run of {name} serving this upper ended before this instance did (was it \
             killed?)",
            upper.display()
        )
    };
    if conn.say(&["DONE", if commit { "1" } else { "0" }]).is_err() {
        return server_gone(commit, code, gone());
    }
    loop {
        let Some((f, _)) = conn.recv().ok().flatten() else {
            return server_gone(commit, code, gone());
        };
        let field = |n: usize| f.get(n).map(|v| text(v)).unwrap_or_default();
        match f.first().map(|v| v.as_slice()) {
            Some(b"BYE") => return Ok(Joined::Exit(code)),
            Some(b"WAIT") => {
                let n = field(1);
                let s = if n == "1" { "" } else { "s" };
                eprintln!(
                    "{name}: waiting for {n} other instance{s} of {name} to exit before \
                     committing"
                );
                // Interrupting the wait is the user's call; the commit still happens.
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    unsafe { libc::signal(sig, libc::SIG_DFL) };
                }
            }
            Some(b"NOTE") => eprintln!("{}", field(1)),
            Some(b"FINAL") => {
                let msg = field(2);
                if field(1) != "0" {
                    return Err(msg);
                }
                if !msg.is_empty() {
                    eprintln!("{msg}");
                }
                return Ok(Joined::Exit(code));
            }
            _ => return Err(protocol()),
        }
    }
}

fn server_gone(commit: bool, code: i32, why: String) -> Result<Joined, String> {
    if commit {
        return Err(format!(
            "{why}; nothing was committed, the changes stay in the upper (run again with \
             --ovl-on-exit=commit)"
        ));
    }
    eprintln!("{why}");
    Ok(Joined::Exit(code))
}
