//! `ovl-run`: run a command inside an overlay, unprivileged, and finalize when it exits.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use ovl::finalize::Baseline;
use ovl::launcher::upper::{self, Scratch, UpperLock};
use ovl::launcher::{self, Backend, EXIT_FAILURE, Launch, Outcome};
use ovl::{InodeMode, OverlayAction, OverlayFS};

/// `--on-exit`: the library's finalizations, plus discard-all (a discard of the kept upper
/// itself; plain discard only drops this run's changes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnExit {
    Preserve,
    Discard,
    DiscardAll,
    Commit(OverlayAction),
}

impl std::str::FromStr for OnExit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "preserve" => OnExit::Preserve,
            "discard" => OnExit::Discard,
            "discard-all" => OnExit::DiscardAll,
            "commit" => OnExit::Commit(OverlayAction::Commit),
            "commit-atomic" => OnExit::Commit(OverlayAction::CommitAtomic),
            _ => {
                return Err(format!(
                    "unknown finalization '{s}': use preserve, discard, discard-all, commit or \
                     commit-atomic"
                ));
            }
        })
    }
}

const EXAMPLES: &str = "\
Examples:
  ovl-run --lower rootfs -- make install       run a build; changes land in rootfs_upper
  ovl-run --lower app --on-exit discard -- ./test.sh
                                               try something, throw this run's changes away
                                               (app_upper, if kept from earlier runs, stays)
  ovl-run --lower data --on-exit commit -- ./migrate
                                               keep the changes: merge them into data
  ovl-run --root --lower debian-rootfs -- bash a shell in a root filesystem, no root needed
                                               (root inside; your /etc/subuid ids the others)
  ovl-run --backend fuse --lower src -- make   always ovl's FUSE engine (the default,
                                               auto, takes the kernel's overlay where the
                                               kernel allows it: no FUSE round trips)
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
    /// What to do with the changes afterwards: preserve (keep them in the upper), discard
    /// (this run's; an existing upper stays as it was), discard-all (this run's and the
    /// upper's), commit or commit-atomic (merge the upper into the lower).
    #[arg(long = "on-exit", value_name = "ACTION", default_value = "preserve")]
    on_exit: String,
    /// Inode numbers: virtual (assigned while mounted) or persistent (stable across mounts).
    #[arg(long = "inode-mode", value_name = "MODE", default_value = "virtual")]
    inode_mode: String,
    /// Run the command with the merged tree as its `/` (a container-like rootfs session): as
    /// a normal user you are root inside, your subordinate ids (/etc/subuid) the other users.
    #[arg(long)]
    root: bool,
    /// With --root as a normal user: stay your own uid and gid inside instead of root.
    #[arg(long, requires = "root")]
    keep_uid: bool,
    /// What serves the command's overlay: auto (the kernel's overlay where the kernel accepts
    /// the mount, else fuse; -v says which), kernel (the kernel's overlay, mounted in the
    /// run's private namespace, or fail) or fuse (ovl's engine, for its semantics: e.g. a
    /// normal user's rename of a lower directory). Default: $OVL_RUN_BACKEND, else auto.
    /// Without a command, and with --inode-mode persistent: fuse.
    #[arg(long, value_name = "BACKEND")]
    backend: Option<String>,
    /// Keep the mount point directory afterwards.
    #[arg(long)]
    keep_mountpoint: bool,
    /// Accepted for compatibility, no effect: the kernel's writeback cache cannot report a
    /// full upper from write(), so every write is served synchronously.
    #[arg(long, hide = true)]
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

    let action: OnExit = match args.on_exit.parse() {
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
    let mut backend = match backend(&args) {
        Ok(b) => b,
        Err(e) => return fail(e),
    };
    let dashdash = std::env::args_os().any(|a| a == "--");
    if dashdash && args.command.is_empty() {
        return fail(
            "no COMMAND after `--`: give the command to run, or leave out `--` to just mount",
        );
    }

    let lower0 = args.lowers[0].clone();
    let upper = args.upper.clone().unwrap_or_else(|| default_upper(&lower0));
    let upper = std::path::absolute(&upper).unwrap_or(upper);
    let mut ofs = overlay(&args, inode_mode, &[], &upper, None);
    if let Err(e) = ofs.validate() {
        return fail(e);
    }
    if matches!(action, OnExit::Commit(_)) && ofs.has_image_lower() {
        return fail(format!(
            "{}: --on-exit {} cannot write into an image: keep the upper (preserve), or pack \
             the merged tree with ovl-pack",
            args.lowers[0].display(),
            args.on_exit
        ));
    }
    if backend != Backend::Fuse && ofs.has_image_lower() {
        // The kernel's overlay takes directories only. Refused before anything is written.
        let why = "a lower is an image file (read in place by the FUSE engine only)";
        if backend == Backend::Kernel {
            return fail(format!("{why}: use --backend fuse or auto"));
        }
        log::info!("{why}: using the FUSE engine");
        backend = Backend::Fuse;
    }
    if matches!(action, OnExit::Commit(_)) && args.lowers.len() > 1 {
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

    // What this run makes, so that a run whose command never started can leave nothing.
    let made_mountpoint = ofs
        .mountpoint()
        .map(upper::missing_dirs)
        .unwrap_or_default();
    let made_parent = match upper::create_dir_all_tracked(upper.parent().unwrap_or(Path::new("/")))
    {
        Ok(m) => m,
        Err(e) => {
            return fail(format!(
                "{}: cannot create its parent directory ({e}): choose an upper directory \
                 where you may write",
                upper.display()
            ));
        }
    };
    let made_upper = upper.symlink_metadata().is_err();
    let work = ovl::overlayfs::default_workdir(&upper);
    let made_work = work.symlink_metadata().is_err();
    let forget = |lock: Option<UpperLock>| {
        drop(lock);
        upper::remove_created(&made_mountpoint);
        upper::remove_created(&made_parent);
    };

    let lock = match UpperLock::acquire(&upper, action != OnExit::Discard) {
        Ok(l) => l,
        Err(e) => {
            forget(None);
            return fail(e);
        }
    };
    upper::remove_dead_scratch(&upper);
    // A discard run stacks a kept upper as its topmost lower and writes a scratch upper.
    let mut scratch = None;
    let mut kept = false;
    if action == OnExit::Discard {
        kept = std::fs::read_dir(&upper).is_ok_and(|mut d| d.next().is_some());
        let s = match Scratch::beside(&upper) {
            Ok(s) => s,
            Err(e) => {
                forget(Some(lock));
                return fail(e);
            }
        };
        let extra = if kept { vec![upper.clone()] } else { vec![] };
        ofs = overlay(&args, inode_mode, &extra, &s.upper(), Some(&s.work()));
        scratch = Some(s);
    }
    // What the upper held before, to count this run's changes (a discard run's are all in
    // its scratch upper; a commit reports what it wrote).
    let before = if !matches!(action, OnExit::Preserve | OnExit::DiscardAll) {
        Ok(Baseline::default())
    } else {
        Baseline::take(&upper)
    };
    let baseline = match before {
        Ok(b) => b,
        Err(e) => {
            forget(Some(lock));
            return fail(e);
        }
    };

    if backend != Backend::Fuse {
        // What an earlier FUSE run left that the kernel's overlay would show otherwise (hard
        // links ovl indexed) or refuse (a normal user's directory renames).
        let userns = unsafe { libc::geteuid() } != 0;
        match launcher::kernel::fuse_only_state(&upper, &work, userns) {
            Ok(None) => {}
            Ok(Some(why)) if backend == Backend::Auto => {
                log::info!("{why}: using the FUSE engine");
                backend = Backend::Fuse;
            }
            Ok(Some(why)) => {
                drop(scratch);
                forget(Some(lock));
                return fail(format!("{why}: use --backend fuse or auto"));
            }
            Err(e) if backend == Backend::Auto => {
                log::info!("{}: {e}: using the FUSE engine", upper.display());
                backend = Backend::Fuse;
            }
            // The kernel says what it thinks of the upper.
            Err(_) => {}
        }
    }
    let res = if args.command.is_empty() {
        launcher::serve(&mut ofs).map(|code| Outcome {
            code,
            started: true,
        })
    } else {
        run_command(&mut ofs, &args, backend)
    };
    let code = match res {
        Ok(o) if o.started => o.code,
        // Nothing ran, so nothing is kept: what this run made goes again.
        res => {
            let _ = ofs.umount();
            drop(scratch);
            // An error may come after the command ran: only an empty upper goes, and its work
            // dir (which may index hard links of files in the upper) with it.
            let upper_gone = made_upper && std::fs::remove_dir(&upper).is_ok();
            let never_ran = res.is_ok();
            if made_work && (upper_gone || never_ran) {
                let _ = ovl::finalize::remove_dir_tree(&work);
            }
            forget(Some(lock));
            return match res {
                Ok(o) => o.code,
                Err(msg) => fail(msg),
            };
        }
    };
    let mountpoint = ofs.mountpoint().map(Path::to_path_buf);
    let result = finalize(&mut ofs, action, &upper, &baseline, kept);
    if args.keep_mountpoint {
        if let Some(m) = mountpoint {
            let _ = std::fs::create_dir_all(m);
        }
    }
    drop(scratch);
    drop(lock);
    if !upper.exists() {
        upper::remove_created(&made_parent);
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

/// The overlay to mount: `extra` lowers on top of the given ones, `upper` (and `work`).
fn overlay(
    args: &Args,
    inode_mode: InodeMode,
    extra: &[PathBuf],
    upper: &Path,
    work: Option<&Path>,
) -> OverlayFS {
    let mut lowers = extra.iter().chain(&args.lowers);
    let mut ofs = OverlayFS::new(lowers.next().expect("a lower"));
    for l in lowers {
        ofs.add_lower(l);
    }
    ofs.set_upper(upper)
        .set_inode_mode(inode_mode)
        .set_writeback_cache(args.writeback_cache)
        .set_require_empty_mountpoint(true);
    if let Some(w) = work {
        ofs.set_workdir(w);
    }
    match &args.mountpoint {
        Some(m) => ofs.set_mountpoint(m),
        None => ofs.mountpoint_as_home_named(&mount_name(&args.lowers[0])),
    };
    ofs
}

/// The first lower's name, for the default mount point's.
fn mount_name(lower: &Path) -> String {
    lower
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "root".into())
}

/// Applies the finalization; returns the report line. Counts are this run's changes.
fn finalize(
    ofs: &mut OverlayFS,
    action: OnExit,
    upper: &Path,
    baseline: &Baseline,
    kept: bool,
) -> Result<String, String> {
    let s = |e: ovl::Error| e.to_string();
    Ok(match action {
        OnExit::Preserve => ofs
            .overlay_action_since(OverlayAction::Preserve, Some(baseline))
            .map_err(s)?
            .to_string(),
        OnExit::Commit(a) => ofs.overlay_action(a).map_err(s)?.to_string(),
        OnExit::Discard => {
            // The scratch upper goes; the kept one was never written.
            let r = ofs.overlay_action(OverlayAction::Discard).map_err(s)?;
            if kept {
                format!(
                    "discarded {} changes of this run; {} is as it was",
                    r.changes,
                    upper.display()
                )
            } else {
                format!("discarded {} changes", r.changes)
            }
        }
        OnExit::DiscardAll => {
            ofs.umount().map_err(s)?;
            let ours = baseline.changes(upper).map_err(s)?;
            let work = ofs.workdir().unwrap_or_default();
            let r = ofs.overlay_action(OverlayAction::Discard).map_err(s)?;
            format!(
                "discarded everything in {} ({} entries, {ours} changes of this run) and its \
                 work dir {}",
                upper.display(),
                r.changes,
                work.display()
            )
        }
    })
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
fn run_command(ofs: &mut OverlayFS, args: &Args, backend: Backend) -> Result<Outcome, String> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let upper = ofs.upper().expect("an upper").to_path_buf();
    let ids = if args.root && !args.keep_uid {
        launcher::Ids::Root
    } else {
        launcher::Ids::Own
    };
    if ids == launcher::Ids::Root && unsafe { libc::geteuid() } != 0 {
        warn_other_id_convention(&args.lowers[0]);
    }
    let res = launcher::run_in_overlay_with(ofs, args.root, ids, backend, |mnt| {
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
            ("OVL_UPPER".into(), abs(&upper).into_os_string()),
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
    });
    res.map(|(outcome, _)| outcome)
}

/// The backend asked for (`--backend`, else `$OVL_RUN_BACKEND`, else auto), checked against
/// what only the FUSE engine does: serving without a command, persistent inode numbers.
fn backend(args: &Args) -> Result<Backend, String> {
    let (asked, from) = match (&args.backend, std::env::var("OVL_RUN_BACKEND")) {
        (Some(b), _) => (b.clone(), "--backend"),
        (None, Ok(b)) if !b.is_empty() => (b, "OVL_RUN_BACKEND"),
        _ => (String::from("auto"), "default"),
    };
    let b: Backend = asked.parse().map_err(|e| format!("{from}: {e}"))?;
    let fuse_only = if args.command.is_empty() {
        Some("serving without a command")
    } else if args.inode_mode == "persistent" {
        Some("--inode-mode persistent")
    } else {
        None
    };
    match (b, fuse_only) {
        (Backend::Kernel, Some(what)) if from == "--backend" => Err(format!(
            "--backend kernel: {what} is the FUSE engine's only: use --backend fuse or auto"
        )),
        (Backend::Kernel | Backend::Auto, Some(what)) => {
            log::info!("{what}: using the FUSE engine");
            Ok(Backend::Fuse)
        }
        (b, _) => Ok(b),
    }
}

/// A root filesystem whose `/` belongs to the caller's first subordinate uid was made in a
/// namespace mapping root there (`mmdebstrap --mode=unshare` writing a directory), not as
/// `--root` maps ids (root is the caller, N is first + N - 1): its owners would be off by one.
fn warn_other_id_convention(lower: &Path) {
    use std::os::unix::fs::MetadataExt;
    let (Some(first), Ok(md)) = (
        launcher::userns::first_subordinate_uid(),
        std::fs::metadata(lower),
    ) else {
        return;
    };
    if md.uid() == first {
        eprintln!(
            "ovl-run: warning: {} belongs to your first subordinate uid {first} (root of a \
             namespace mapping root there, as `mmdebstrap --mode=unshare` makes): inside, its \
             root's files show up as uid 1; unpack it as README.md's ovl-run example shows",
            lower.display()
        );
    }
}
