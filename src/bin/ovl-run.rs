//! `ovl-run`: run a command inside an overlay, unprivileged, and finalize when it exits.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use ovl::launcher::{self, EXIT_FAILURE, Launch};
use ovl::{InodeMode, OverlayAction, OverlayFS};

const EXAMPLES: &str = "\
Examples:
  ovl-run --lower rootfs -- make install       run a build; changes land in rootfs_upper
  ovl-run --lower app --on-exit discard -- ./test.sh
                                               try something, throw the changes away
  ovl-run --lower data --on-exit commit -- ./migrate
                                               keep the changes: merge them into data
  ovl-run --root --lower debian-rootfs -- bash a shell in a root filesystem, no root needed
  ovl-run --lower rootfs                       mount, print the mount point, serve until
                                               Ctrl-C or `fusermount3 -u`, then finalize

Exit status: the command's own; 128+N if it died of signal N; 125 if ovl-run failed;
126 if the command cannot be executed; 127 if it was not found.";

#[derive(Parser, Debug)]
#[command(
    name = "ovl-run",
    version,
    about = "Run a command inside an overlay of DIR(s), then keep, discard or commit its changes",
    after_help = EXAMPLES
)]
struct Args {
    /// Read-only lower directory (repeat for more; the first is topmost).
    #[arg(long = "lower", value_name = "DIR", required = true)]
    lowers: Vec<PathBuf>,
    /// Writable upper directory (default: <first lower>_upper beside it; created if missing).
    #[arg(long, value_name = "DIR")]
    upper: Option<PathBuf>,
    /// Where to mount (default: a fresh directory under $XDG_CACHE_HOME, removed afterwards).
    #[arg(long, value_name = "DIR")]
    mountpoint: Option<PathBuf>,
    /// What to do with the changes afterwards: preserve, discard, commit or commit-atomic.
    #[arg(long = "on-exit", value_name = "ACTION", default_value = "preserve")]
    on_exit: String,
    /// Inode numbers: virtual (assigned while mounted) or persistent (stable across mounts).
    #[arg(long = "inode-mode", value_name = "MODE", default_value = "virtual")]
    inode_mode: String,
    /// Run the command with the merged tree as its `/` (a container-like rootfs session).
    #[arg(long)]
    root: bool,
    /// Keep the mount point directory afterwards.
    #[arg(long)]
    keep_mountpoint: bool,
    /// Let the kernel gather writes in its page cache (only without passthrough, i.e. as a
    /// normal user): many small writes get much faster, opening many small files to read
    /// them somewhat slower.
    #[arg(long)]
    writeback_cache: bool,
    /// More logging (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Do not print the finalization report.
    #[arg(short, long)]
    quiet: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

fn fail(msg: impl std::fmt::Display) -> i32 {
    eprintln!("ovl-run: {msg}");
    EXIT_FAILURE
}

fn main() -> ExitCode {
    ovl::engine::session::tune_allocator_for_daemon();
    ExitCode::from(real_main().clamp(0, 255) as u8)
}

fn real_main() -> i32 {
    let args = match ovl::cli::parse::<Args>("ovl-run") {
        Ok(a) => a,
        Err(ovl::cli::ArgsError::Printed) => return 0,
        Err(ovl::cli::ArgsError::Usage(line)) => return fail(line),
    };
    // fuser's own messages are noise to users (e.g. replies racing an unmount); -vv shows them.
    let level = match (args.quiet, args.verbose) {
        (true, 0) => "error,fuser=off",
        (false, 0) => "warn,fuser=off",
        (_, 1) => "info,fuser=off",
        _ => "debug",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level)).init();

    let action: OverlayAction = match args.on_exit.parse() {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let inode_mode = match args.inode_mode.as_str() {
        "virtual" => InodeMode::Virtual,
        "persistent" => InodeMode::Persistent,
        other => {
            return fail(format!(
                "unknown inode mode '{other}': use virtual or persistent"
            ));
        }
    };
    let dashdash = std::env::args_os().any(|a| a == "--");
    if dashdash && args.command.is_empty() {
        return fail(
            "no COMMAND after `--`: give the command to run, or leave out `--` to just mount",
        );
    }

    let lower0 = args.lowers[0].clone();
    let upper = args.upper.clone().unwrap_or_else(|| default_upper(&lower0));
    let mut ofs = OverlayFS::new(&lower0);
    for l in &args.lowers[1..] {
        ofs.add_lower(l);
    }
    ofs.set_upper(&upper)
        .set_inode_mode(inode_mode)
        .set_writeback_cache(args.writeback_cache)
        .set_require_empty_mountpoint(true);
    match &args.mountpoint {
        Some(m) => ofs.set_mountpoint(m),
        None => ofs.mountpoint_as_home(),
    };
    if let Err(e) = ofs.validate() {
        return fail(e);
    }
    if matches!(action, OverlayAction::Commit | OverlayAction::CommitAtomic)
        && args.lowers.len() > 1
    {
        // Refused before anything is mounted or written.
        return fail(format!(
            "{}: --on-exit {} needs a single --lower: commit merges into one directory",
            args.lowers[0].display(),
            args.on_exit
        ));
    }
    {
        let base = ovl::overlayfs::mountpoint_base();
        launcher::remove_stale_mountpoints(&base);
    }

    let res = if args.command.is_empty() {
        launcher::serve(&mut ofs)
    } else {
        run_command(&mut ofs, &args, &upper)
    };
    // ovl-run's own failure: nothing to finalize (the command's status, even 125, is not one).
    let code = match res {
        Ok(code) => code,
        Err(msg) => {
            let _ = ofs.umount();
            return fail(msg);
        }
    };
    let mountpoint = ofs.mountpoint().map(Path::to_path_buf);
    let result = ofs.overlay_action(action);
    if args.keep_mountpoint {
        if let Some(m) = mountpoint {
            let _ = std::fs::create_dir_all(m);
        }
    }
    match result {
        Ok(report) => {
            if !args.quiet {
                eprintln!("ovl-run: {report}");
            }
            code
        }
        Err(e) => fail(e),
    }
}

/// `<lower>_upper` beside the lower.
fn default_upper(lower: &Path) -> PathBuf {
    let lower = lower.canonicalize().unwrap_or_else(|_| lower.to_path_buf());
    let name = lower
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into());
    lower
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!("{name}_upper"))
}

/// With a command: a private namespace (so the mount dies with us), mount, run, wait for the
/// command and everything it left running.
fn run_command(ofs: &mut OverlayFS, args: &Args, upper: &Path) -> Result<i32, String> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    launcher::run_in_overlay(ofs, args.root, |mnt| {
        let inside = launcher::map_cwd(&cwd, &args.lowers[0], mnt);
        // Absolute paths: the command starts somewhere else.
        let abs = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        let lowers = std::env::join_paths(args.lowers.iter().map(|l| abs(l))).unwrap_or_default();
        // Inside --root the merged tree is `/`.
        let shown_mnt = if args.root {
            PathBuf::from("/")
        } else {
            mnt.to_path_buf()
        };
        let env = vec![
            ("OVL_MOUNTPOINT".into(), shown_mnt.into_os_string()),
            ("OVL_LOWER".into(), lowers),
            ("OVL_UPPER".into(), abs(upper).into_os_string()),
        ];
        if args.root {
            let rel = inside.strip_prefix(mnt).unwrap_or(Path::new(""));
            Launch {
                argv: args.command.clone(),
                cwd: Path::new("/").join(rel),
                env,
                chroot: Some(mnt.to_path_buf()),
            }
        } else {
            Launch {
                argv: args.command.clone(),
                cwd: inside,
                env,
                chroot: None,
            }
        }
    })
}
