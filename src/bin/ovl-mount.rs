//! `ovl-mount`: a drop-in for fuse-overlayfs's command line.
//!
//! ```text
//! ovl-mount [-f] [-d] -o lowerdir=A:B,upperdir=U,workdir=W[,OPTS] MOUNTPOINT
//! ovl-mount SOURCE MOUNTPOINT -o OPTS        (the form mount.fuse3 uses)
//! ```
//! Daemonizes once the mount is live unless `-f`; exits when unmounted (`umount`,
//! `fusermount3 -u`).

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ovl::engine::idmap;
use ovl::engine::session::ContainerOptions;
use ovl::{InodeMode, OverlayFS};

#[derive(Parser, Debug)]
#[command(
    name = "ovl-mount",
    version,
    about = "Mount an overlay filesystem (fuse-overlayfs compatible command line)",
    after_help = "Examples:\n  ovl-mount -o lowerdir=/lower,upperdir=/upper,workdir=/work /merged\n  \
                  ovl-mount -f -o lowerdir=/a:/b /merged     (read-only, foreground)\n  \
                  mount -t fuse.ovl-mount ovl /merged -o lowerdir=/l,upperdir=/u,workdir=/w\n\n\
                  Options: lowerdir=, upperdir=, workdir=, inode_mode=virtual|persistent,\n  \
                  passthrough, nopassthrough, writeback, nowriteback, allow_other, allow_root, default_permissions,\n  \
                  suid, nosuid, dev, nodev, exec, noexec, ro, rw, atime, noatime, relatime,\n  \
                  fsname=NAME, subtype=NAME, threads=N (request threads; default one per CPU),\n  \
                  uring, nouring (FUSE over io_uring where the kernel allows; default: OVL_URING=1)\n\n\
                  Container options (fuse-overlayfs 1.10): uidmapping=DISK:SHOWN:LEN[:...],\n  \
                  gidmapping=..., squash_to_root, squash_to_uid=N, squash_to_gid=N, static_nlink,\n  \
                  fsync=0|1, volatile, userxattr, context=LABEL; accepted with no effect: noacl,\n  \
                  xattr_permissions=, redirect_dir=, index=, metacopy=, timeout=, threaded="
)]
struct Args {
    /// Stay in the foreground.
    #[arg(short = 'f')]
    foreground: bool,
    /// Debug logging (implies -f).
    #[arg(short = 'd')]
    debug: bool,
    /// Comma-separated mount options (may be repeated).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// SOURCE MOUNTPOINT, or just MOUNTPOINT.
    #[arg(required = true, num_args = 1..=2)]
    paths: Vec<PathBuf>,
}

#[derive(Debug, Default)]
struct Opts {
    lowers: Vec<PathBuf>,
    upper: Option<PathBuf>,
    work: Option<PathBuf>,
    inode_mode: InodeMode,
    allow_other: Option<bool>,
    suid_dev: Option<bool>,
    passthrough: bool,
    fsname: Option<String>,
    threads: Option<usize>,
    uring: Option<bool>,
    writeback: bool,
    container: ContainerOptions,
    squash_to_root: bool,
}

/// Splits `-o` lists at commas outside double quotes (an SELinux `context="a:b:c:s0:c1,c2"`
/// holds commas).
fn split_options(list: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in list.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&list[start..]);
    out
}

fn parse_id(k: &str, v: &str) -> Result<u32, String> {
    v.parse()
        .map_err(|_| format!("{k}={v}: give a numeric id (e.g. {k}=1000)"))
}

fn parse_opts(list: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        passthrough: true,
        ..Default::default()
    };
    for opt in list
        .iter()
        .flat_map(|s| split_options(s))
        .filter(|s| !s.is_empty())
    {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (k, v) {
            ("lowerdir", Some(v)) => {
                o.lowers = v
                    .split(':')
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from)
                    .collect()
            }
            ("upperdir", Some(v)) => o.upper = Some(v.into()),
            ("workdir", Some(v)) => o.work = Some(v.into()),
            ("inode_mode", Some("virtual")) => o.inode_mode = InodeMode::Virtual,
            ("inode_mode", Some("persistent")) => o.inode_mode = InodeMode::Persistent,
            ("fsname", Some(v)) => o.fsname = Some(v.into()),
            ("allow_other" | "allow_root", None) => o.allow_other = Some(true),
            ("suid" | "dev", None) => o.suid_dev = Some(true),
            ("nosuid" | "nodev", None) => o.suid_dev = Some(false),
            ("passthrough", None) => o.passthrough = true,
            ("nopassthrough", None) => o.passthrough = false,
            ("uring", None) => o.uring = Some(true),
            ("nouring", None) => o.uring = Some(false),
            ("writeback", None) => o.writeback = true,
            ("nowriteback", None) => o.writeback = false,
            ("threads", Some(v)) => match v.parse::<usize>() {
                Ok(n) if (1..=256).contains(&n) => o.threads = Some(n),
                _ => {
                    return Err(format!(
                        "threads={v}: give a number of threads from 1 to 256"
                    ));
                }
            },
            ("uidmapping", Some(v)) => {
                o.container.idmap.uids =
                    idmap::parse_mapping(v).map_err(|e| format!("uidmapping={e}"))?
            }
            ("gidmapping", Some(v)) => {
                o.container.idmap.gids =
                    idmap::parse_mapping(v).map_err(|e| format!("gidmapping={e}"))?
            }
            ("squash_to_root", None) => o.squash_to_root = true,
            ("squash_to_uid", Some(v)) => o.container.idmap.squash_uid = Some(parse_id(k, v)?),
            ("squash_to_gid", Some(v)) => o.container.idmap.squash_gid = Some(parse_id(k, v)?),
            ("static_nlink", None) => o.container.idmap.static_nlink = true,
            ("fsync", Some("0")) | ("volatile", None) => o.container.no_sync = true,
            ("fsync", Some("1")) => o.container.no_sync = false,
            ("fsync", Some(v)) => return Err(format!("fsync={v}: give fsync=0 or fsync=1")),
            ("userxattr", None) => o.container.userxattr = true,
            ("context", Some(v)) => {
                let v = v.trim_matches('"');
                if v.is_empty() || v.contains('"') {
                    return Err(format!("context={v}: give one SELinux label"));
                }
                o.container.context = Some(v.to_string());
            }
            // Accepted as fuse-overlayfs accepts them, with no effect: POSIX ACLs are stored
            // as the xattrs they are either way (noacl), xattrs are always checked by the
            // kernel's own rules (xattr_permissions=), ovl always follows the kernel's index=on
            // semantics for hard links and decides redirects and metacopy itself
            // (redirect_dir=, index=, metacopy=), entry caching is ovl's own (timeout=), and
            // it always serves on several threads (threaded=; threads=N sets how many).
            (
                "noacl" | "xattr_permissions" | "redirect_dir" | "index" | "metacopy" | "timeout"
                | "threaded",
                _,
            ) => {}
            // Accepted for compatibility: these are what ovl does anyway, or are decided by
            // the kernel mount flags mount(8) passes separately.
            (
                "default_permissions"
                | "rw"
                | "exec"
                | "noexec"
                | "atime"
                | "noatime"
                | "relatime"
                | "ro"
                | "subtype"
                | "auto_unmount",
                _,
            ) => {}
            _ => {
                return Err(format!(
                    "unknown mount option '{opt}': see `ovl-mount --help` for the supported ones"
                ));
            }
        }
    }
    if o.squash_to_root {
        // squash_to_uid=/squash_to_gid= take precedence, as in fuse-overlayfs.
        let m = &mut o.container.idmap;
        m.squash_uid.get_or_insert(0);
        m.squash_gid.get_or_insert(0);
    }
    if o.lowers.is_empty() {
        return Err("no lowerdir= given: pass -o lowerdir=DIR[:DIR...]".into());
    }
    if o.work.is_some() && o.upper.is_none() {
        return Err("workdir= given without upperdir=: add upperdir=DIR".into());
    }
    Ok(o)
}

fn main() -> ExitCode {
    ovl::engine::session::tune_allocator_for_daemon();
    let args = match ovl::cli::parse::<Args>("ovl-mount") {
        Ok(a) => a,
        Err(ovl::cli::ArgsError::Printed) => return ExitCode::SUCCESS,
        Err(ovl::cli::ArgsError::Usage(line)) => {
            eprintln!("ovl-mount: {line}");
            return ExitCode::from(1);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(if args.debug {
        "debug"
    } else {
        // fuser warns when a mount it no longer owns is already gone (after `umount`).
        "warn,fuser::mnt=error"
    }))
    .init();
    let opts = match parse_opts(&args.options) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("ovl-mount: {e}");
            return ExitCode::from(1);
        }
    };
    // Relative paths mean the caller's working directory, as for the kernel and fuse-overlayfs;
    // the daemon works from / after forking, so they are made absolute now.
    let cwd = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("ovl-mount: the current directory: {e} (give absolute paths)");
            return ExitCode::from(1);
        }
    };
    let abs = |p: &PathBuf| cwd.join(p);
    let mountpoint = abs(args.paths.last().expect("clap requires one path"));
    let opts = Opts {
        lowers: opts.lowers.iter().map(abs).collect(),
        upper: opts.upper.as_ref().map(abs),
        work: opts.work.as_ref().map(abs),
        ..opts
    };
    let root = unsafe { libc::geteuid() } == 0;

    let mut ofs = OverlayFS::new(opts.lowers[0].clone());
    for l in &opts.lowers[1..] {
        ofs.add_lower(l);
    }
    if let Some(u) = &opts.upper {
        ofs.set_upper(u);
    }
    if let Some(w) = &opts.work {
        ofs.set_workdir(w);
    }
    if let Some(n) = &opts.fsname {
        ofs.set_fsname(n);
    }
    // As fuse-overlayfs: root mounts are shared (allow_other) and honour suid and devices.
    ofs.set_mountpoint(&mountpoint)
        .set_inode_mode(opts.inode_mode)
        .set_allow_other(opts.allow_other.unwrap_or(root))
        .set_suid_dev(opts.suid_dev.unwrap_or(root))
        .set_passthrough(opts.passthrough)
        .set_writeback_cache(opts.writeback)
        .set_container_options(opts.container.clone());
    if let Some(n) = opts.threads {
        ofs.set_threads(n);
    }
    if let Some(on) = opts.uring {
        ofs.set_uring(on);
    }
    if let Err(e) = ofs.validate() {
        eprintln!("ovl-mount: {e}");
        return ExitCode::from(1);
    }

    let foreground = args.foreground || args.debug;
    if !foreground {
        return daemonize(ofs);
    }
    serve(ofs, None)
}

/// Mounts, reports readiness on `ready` (daemon mode), then serves until unmounted.
fn serve(mut ofs: OverlayFS, ready: Option<std::fs::File>) -> ExitCode {
    let res = ofs.mount();
    let daemon = ready.is_some();
    if let Some(mut w) = ready {
        let msg = match &res {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        };
        let _ = w.write_all(msg.as_bytes());
    }
    if let Err(e) = res {
        if !daemon {
            eprintln!("ovl-mount: {e}");
        }
        return ExitCode::from(1);
    }
    let mut handle = ofs.take_handle().expect("mounted");
    let code = match handle.wait_unmounted() {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("ovl-mount: {e}");
            1
        }
    };
    // The session is over and nothing is left to write: exit without freeing the inode table
    // one descriptor at a time (the kernel drops them all at exit), so the layers are let go
    // as soon as possible after `umount`.
    std::process::exit(code)
}

/// Forks: the child mounts and serves; the parent exits once the child says the mount is live
/// (0) or failed (1, with the child's error).
fn daemonize(ofs: OverlayFS) -> ExitCode {
    let mut fds = [0i32; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("ovl-mount: pipe: {}", std::io::Error::last_os_error());
        return ExitCode::from(1);
    }
    let (rfd, wfd) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!("ovl-mount: fork: {}", std::io::Error::last_os_error());
            ExitCode::from(1)
        }
        0 => {
            drop(rfd);
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                // Detach from the caller's terminal and pipes entirely (a caller reading our
                // output must see EOF); mount errors travel through the readiness pipe.
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::dup2(null, 2);
                    libc::close(null);
                }
            }
            let _ = std::env::set_current_dir("/");
            serve(ofs, Some(wfd))
        }
        _ => {
            drop(wfd);
            let mut msg = String::new();
            let mut rfd = rfd;
            match rfd.read_to_string(&mut msg) {
                Ok(_) if msg.is_empty() => ExitCode::SUCCESS,
                Ok(_) => {
                    eprintln!("ovl-mount: {msg}");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("ovl-mount: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
