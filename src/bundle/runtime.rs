//! What runs when a user starts `./app.run`: find the payload at the end of our own file,
//! make sure its tree is in the cache, mount it under the app's upper, run the entry point,
//! then keep, discard or commit the changes.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use super::cache;
use super::extract::Bundle;
use super::format::Manifest;
use super::state;
use crate::launcher::upper::Scratch;
use crate::launcher::{self, EXIT_FAILURE, Launch};
use crate::{OverlayAction, OverlayFS};

const HELP: &str = "\
This file is an ovl bundle: a runtime followed by an app's files. Running it mounts the app
with a writable layer and runs it; every argument after the leading --ovl-* and --appimage-*
options goes to the app.

Runtime options (before the app's own arguments):
  --ovl-help               this text
  --ovl-info               name, entry point, sizes, id, cache and upper locations
  --ovl-verify             check every byte of the file (BLAKE3 of the runtime part and of
                           the payload); exit 1 if the file is damaged
  --ovl-extract [DIR]      extract the app's tree into DIR (default NAME.AppDir)
  --ovl-on-exit=ACTION     this run's changes: preserve (keep for the next run), discard
                           (throw away this run's changes, keep earlier ones), or commit
                           (write them into this bundle file)
  --ovl-upper=DIR          keep the app's writable layer in DIR
                           (default $XDG_DATA_HOME/ovl/NAME/upper)
  --ovl-mount              mount, print the mount point, serve until Ctrl-C, then finalize
  --ovl-gc                 remove cached trees that no bundle uses any more
  --ovl-verbose            log what the runtime does
  --ovl-version            the runtime's version and bundle format

AppImage's runtime options, same meaning:
  --appimage-extract [PATTERN]  extract into ./squashfs-root (the entries whose path matches
                                the glob PATTERN, e.g. 'usr/share/*'; existing files replaced)
  --appimage-extract-and-run    run from a private extracted copy, without FUSE (this run's
                                changes are discarded); also APPIMAGE_EXTRACT_AND_RUN=1
  --appimage-mount              as --ovl-mount
  --appimage-offset             byte offset of the payload (the runtime's size)
  --appimage-help, --appimage-version
  --appimage-signature, --appimage-updateinformation   an empty line: bundles carry neither

Runs of one app at the same time share one mount of its kept state, each with its own
arguments, directory, environment, signals and exit status; the state is finalized once,
when the last of them exits (a commit asked for meanwhile waits for that). A discard run
gets a mount of its own over the kept state.

Exit status: the app's own; 128+N if it died of signal N; 125 if the runtime failed.
Environment for the app: APPIMAGE and OVL_BUNDLE (this file, absolute), APPDIR (its mounted
tree), ARGV0 (how it was started), OWD (the directory it was started from).";

/// Runtime options, from the leading `--ovl-*` arguments.
#[derive(Debug, Default)]
struct Opts {
    help: bool,
    info: bool,
    verify: bool,
    extract: Option<Option<PathBuf>>,
    on_exit: Option<OverlayAction>,
    upper: Option<PathBuf>,
    mount: bool,
    gc: bool,
    verbose: bool,
    version: bool,
    /// `--appimage-extract [PATTERN]`.
    appimage_extract: Option<Option<String>>,
    /// `--appimage-extract-and-run` (or `APPIMAGE_EXTRACT_AND_RUN`, applied in [`main`]).
    extract_and_run: bool,
    appimage_offset: bool,
    appimage_version: bool,
    /// `--appimage-signature`, `--appimage-updateinformation`: data bundles do not carry.
    appimage_absent: bool,
}

/// What `--appimage-extract-and-run` is called when it appears among the app's arguments
/// (AppImage removes it there too).
const EXTRACT_AND_RUN: &str = "--appimage-extract-and-run";

fn is_runtime_option(a: &str) -> bool {
    a.starts_with("--ovl-") || a.starts_with("--appimage-")
}

/// Splits the runtime's own leading `--ovl-*` options from the app's arguments.
fn parse(args: &[OsString]) -> Result<(Opts, Vec<OsString>), String> {
    let mut o = Opts::default();
    let mut i = 0;
    while let Some(a) = args.get(i).and_then(|a| a.to_str()) {
        if !is_runtime_option(a) {
            break;
        }
        i += 1;
        let (key, val) = match a.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (a, None),
        };
        // An option's value: after `=`, or the next argument.
        let mut value = |what: &str| -> Result<String, String> {
            if let Some(v) = &val {
                return Ok(v.clone());
            }
            let v = args
                .get(i)
                .and_then(|v| v.to_str())
                .ok_or_else(|| format!("{key} needs {what}"))?;
            i += 1;
            Ok(v.to_string())
        };
        match key {
            "--ovl-help" => o.help = true,
            "--ovl-info" => o.info = true,
            "--ovl-verify" => o.verify = true,
            "--ovl-mount" => o.mount = true,
            "--ovl-gc" => o.gc = true,
            "--ovl-verbose" => o.verbose = true,
            "--ovl-version" => o.version = true,
            "--appimage-help" => o.help = true,
            "--appimage-mount" => o.mount = true,
            "--appimage-offset" => o.appimage_offset = true,
            "--appimage-version" => o.appimage_version = true,
            "--appimage-signature" | "--appimage-updateinformation" | "--appimage-updateinfo" => {
                o.appimage_absent = true
            }
            "--appimage-extract-and-run" => o.extract_and_run = true,
            "--appimage-extract" => {
                // As AppImage: the one argument after it, if any, is the pattern.
                let pattern = match args.get(i) {
                    Some(next) if !is_runtime_option(&next.to_string_lossy()) => {
                        i += 1;
                        Some(next.to_string_lossy().into_owned())
                    }
                    _ => None,
                };
                o.appimage_extract = Some(pattern);
            }
            "--ovl-extract" => {
                let dir = match val {
                    Some(v) => Some(PathBuf::from(v)),
                    None => match args.get(i) {
                        Some(next) if !is_runtime_option(&next.to_string_lossy()) => {
                            i += 1;
                            Some(PathBuf::from(next))
                        }
                        _ => None,
                    },
                };
                o.extract = Some(dir);
            }
            "--ovl-on-exit" => {
                let v = value("an action (preserve, discard or commit)")?;
                o.on_exit = Some(match v.as_str() {
                    "preserve" => OverlayAction::Preserve,
                    "discard" => OverlayAction::Discard,
                    // A bundle commit always replaces the file in one step.
                    "commit" | "commit-atomic" => OverlayAction::Commit,
                    _ => {
                        return Err(format!(
                            "unknown --ovl-on-exit action '{v}': use preserve, discard or commit"
                        ));
                    }
                });
            }
            "--ovl-upper" => o.upper = Some(PathBuf::from(value("a directory")?)),
            _ => return Err(format!("unknown runtime option {a} (see --ovl-help)")),
        }
    }
    Ok((o, args[i..].to_vec()))
}

/// The runtime's entry point; returns the process exit status.
pub fn main() -> i32 {
    crate::engine::session::tune_allocator_for_daemon();
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let argv0 = if args.is_empty() {
        OsString::from("app.run")
    } else {
        args.remove(0)
    };
    let prog = Path::new(&argv0)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "app.run".into());
    let fail = |msg: String| {
        eprintln!("{prog}: {msg}");
        EXIT_FAILURE
    };
    let (mut opts, mut app_args) = match parse(&args) {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    // Our own variable, so the app's RUST_LOG does not make the runtime chatty.
    let level = if opts.verbose {
        "info,fuser=off"
    } else {
        "warn,fuser=off"
    };
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("OVL_LOG", level))
        .format_target(false)
        .format_timestamp(None)
        .init();
    if opts.help {
        println!("{HELP}");
        return 0;
    }
    if opts.version {
        println!("{}", version());
        return 0;
    }
    if opts.appimage_version {
        // AppImage's runtime prints its version on stderr.
        eprintln!("{}", version());
        return 0;
    }
    if opts.appimage_absent {
        // What AppImage's runtime prints when the file has no such section: an empty line.
        println!();
        return 0;
    }
    let exe = match own_file() {
        Ok(p) => p,
        Err(e) => return fail(format!("finding our own file (/proc/self/exe): {e}")),
    };
    let actions = [
        opts.info,
        opts.verify,
        opts.extract.is_some(),
        opts.gc,
        opts.mount,
        opts.appimage_extract.is_some(),
        opts.appimage_offset,
        opts.extract_and_run,
    ];
    let chosen = actions.iter().filter(|&&a| a).count();
    if chosen > 1 {
        return fail(
            "--ovl-info, --ovl-verify, --ovl-extract, --ovl-gc, --ovl-mount and the \
             --appimage-* actions do different things: give one"
                .into(),
        );
    }
    // AppImage's variable: set (to anything) means extract and run, unless an action is given.
    if chosen == 0 && std::env::var_os("APPIMAGE_EXTRACT_AND_RUN").is_some() {
        opts.extract_and_run = true;
    }
    if opts.extract_and_run {
        app_args.retain(|a| a != EXTRACT_AND_RUN);
    }
    if opts.appimage_extract.is_some() && !app_args.is_empty() {
        return fail("usage: --appimage-extract [PATTERN] (one pattern at most)".into());
    }
    if opts.verify {
        // Needs only the trailer: a damaged manifest is reported as a mismatch too.
        return match verify(&exe) {
            Ok(code) => code,
            Err(e) => fail(e),
        };
    }
    let bundle = match Bundle::open(&exe) {
        Ok(b) => b,
        Err(e) => {
            if is_bare_runtime(&exe) {
                return fail(format!(
                    "{}: this is the bare ovl runtime, with no app after it: build a bundle \
                     with `ovl-pack APPDIR -o app.run`",
                    exe.display()
                ));
            }
            return fail(e.to_string());
        }
    };
    let res = if opts.info {
        info(&bundle, &opts)
    } else if opts.appimage_offset {
        println!("{}", bundle.trailer().payload_offset);
        Ok(0)
    } else if let Some(pattern) = &opts.appimage_extract {
        appimage_extract(&bundle, pattern.as_deref())
    } else if let Some(dir) = &opts.extract {
        extract(&bundle, dir.as_deref())
    } else if opts.gc {
        gc(&bundle)
    } else {
        run_app(&bundle, &opts, app_args, argv0)
    };
    match res {
        Ok(code) => code,
        Err(e) => fail(e),
    }
}

/// The bundle we head: `/proc/self/exe`, unless that is the in-memory copy the bundle's loader
/// (runtime/loader) unpacked us into: the loader then names the bundle in OVL_RUNTIME_BUNDLE.
fn own_file() -> io::Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let exe = fs::read_link("/proc/self/exe")?;
    match std::env::var_os("OVL_RUNTIME_BUNDLE") {
        Some(b) if exe.as_os_str().as_bytes().starts_with(b"/memfd:") => Ok(b.into()),
        _ => Ok(exe),
    }
}

fn version() -> String {
    format!(
        "ovl runtime {} (bundle format {})",
        env!("CARGO_PKG_VERSION"),
        super::format::VERSION
    )
}

/// glibc's `FNM_LEADING_DIR` (not in the libc crate): a pattern matching a directory matches
/// everything under it, as AppImage's extraction patterns do.
const FNM_LEADING_DIR: libc::c_int = 1 << 3;

/// `--appimage-extract [PATTERN]`: the tree (or the entries whose path relative to its root
/// matches the glob) into `./squashfs-root`, replacing what is there, as AppImage does. The
/// tree is extracted beside it first, then moved in entry by entry, so a failed extraction
/// leaves `squashfs-root` as it was.
fn appimage_extract(bundle: &Bundle, pattern: Option<&str>) -> Result<i32, String> {
    let dest = Path::new("squashfs-root");
    let pattern = pattern
        .map(|p| std::ffi::CString::new(p).map_err(|_| "the pattern contains a NUL byte"))
        .transpose()?;
    let tmp = PathBuf::from(format!(".squashfs-root.ovl-extract-{}", std::process::id()));
    fs::create_dir(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let res = bundle
        .extract_to(&tmp, 0)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            fs::create_dir_all(dest).map_err(|e| format!("creating {}: {e}", dest.display()))?;
            move_matching(&tmp, dest, "", pattern.as_deref())
        });
    let cleanup = crate::finalize::remove_dir_tree(&tmp);
    res?;
    cleanup.map_err(|e| e.to_string())?;
    Ok(0)
}

/// Moves the entries of `src` whose path (`rel` + name) matches `pattern` into `dst`, creating
/// the directories above them; a matched directory that `dst` lacks moves whole.
fn move_matching(
    src: &Path,
    dst: &Path,
    rel: &str,
    pattern: Option<&std::ffi::CStr>,
) -> Result<(), String> {
    let rd = fs::read_dir(src).map_err(|e| format!("{}: {e}", src.display()))?;
    for e in rd {
        let e = e.map_err(|e| format!("{}: {e}", src.display()))?;
        let name = e.file_name();
        let path = if rel.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{rel}/{}", name.to_string_lossy())
        };
        let matched = pattern.is_none_or(|p| {
            let c = std::ffi::CString::new(path.as_bytes()).unwrap_or_default();
            let flags = libc::FNM_PATHNAME | FNM_LEADING_DIR;
            (unsafe { libc::fnmatch(p.as_ptr(), c.as_ptr(), flags) }) == 0
        });
        let (from, to) = (e.path(), dst.join(&name));
        let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
        let target_dir = to.symlink_metadata().is_ok_and(|m| m.is_dir());
        if is_dir && (!matched || target_dir) {
            move_matching(&from, &to, &path, pattern)?;
        } else if matched {
            fs::create_dir_all(dst).map_err(|e| format!("creating {}: {e}", dst.display()))?;
            if is_dir && to.symlink_metadata().is_ok() {
                // A file where the tree has a directory: the tree's entry wins.
                fs::remove_file(&to).map_err(|e| format!("{}: {e}", to.display()))?;
            }
            fs::rename(&from, &to).map_err(|e| format!("{}: {e}", to.display()))?;
        }
    }
    Ok(())
}

/// Whether the file is just the runtime's ELF image with nothing appended (a bare runtime,
/// as opposed to a bundle whose end was cut off). The section header table ends the image.
fn is_bare_runtime(p: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(f) = fs::File::open(p) else {
        return false;
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut h = [0u8; 64];
    if f.read_exact_at(&mut h, 0).is_err() || &h[..4] != b"\x7fELF" {
        return false;
    }
    let shoff = u64::from_le_bytes(h[40..48].try_into().unwrap());
    let shentsize = u16::from_le_bytes([h[58], h[59]]) as u64;
    let shnum = u16::from_le_bytes([h[60], h[61]]) as u64;
    shoff.checked_add(shentsize * shnum) == Some(len)
}

fn default_upper(name: &str) -> Result<PathBuf, String> {
    let base = dirs::data_dir()
        .ok_or("no data directory: set XDG_DATA_HOME or HOME, or pass --ovl-upper=DIR")?;
    Ok(base.join("ovl").join(name).join("upper"))
}

fn action_name(a: OverlayAction) -> &'static str {
    match a {
        OverlayAction::Preserve => "preserve",
        OverlayAction::Discard => "discard",
        OverlayAction::Commit | OverlayAction::CommitAtomic => "commit",
    }
}

fn info(bundle: &Bundle, opts: &Opts) -> Result<i32, String> {
    let m: &Manifest = bundle.manifest();
    let t = bundle.trailer();
    let st = bundle.image().stats().map_err(|e| e.to_string())?;
    let payload = t.manifest_offset + t.manifest_clen - t.payload_offset;
    let cache = cache::cache_root()
        .map(|r| r.join(bundle.id()))
        .map_err(|e| e.to_string())?;
    let upper = match &opts.upper {
        Some(u) => u.clone(),
        None => default_upper(&m.name)?,
    };
    println!("bundle:   {}", bundle.path().display());
    println!("name:     {}", m.name);
    println!("id:       {}", bundle.id());
    println!("entry:    {}", m.entry);
    println!("on-exit:  {}", action_name(m.on_exit));
    println!("runtime:  {} bytes", t.payload_offset);
    println!(
        "payload:  {payload} bytes: {} files, {} directories, {} symlinks; {} distinct \
         contents, {} bytes, {} compressed",
        st.files, st.dirs, st.symlinks, st.distinct, st.data_bytes, st.stored_bytes
    );
    println!(
        "cache:    {} ({})",
        cache.display(),
        if cache.is_dir() {
            "extracted"
        } else {
            "not extracted yet"
        }
    );
    println!(
        "upper:    {} ({})",
        upper.display(),
        match crate::finalize::count_entries(&upper) {
            Ok(0) | Err(_) => "no changes kept".to_string(),
            Ok(n) => format!("{n} changed entries kept"),
        }
    );
    Ok(0)
}

/// Every byte: the trailer (decoded and checked), the payload, the manifest and the image's
/// metadata (opened), the runtime part.
fn verify(path: &Path) -> Result<i32, String> {
    let damaged = |what: String| {
        eprintln!(
            "{}: {what}: the file is damaged; download or build it again",
            path.display()
        );
        Ok(1)
    };
    let (file, trailer) = match super::extract::read_trailer(path) {
        Ok(x) => x,
        Err(crate::error::Error::Io { source, .. }) => {
            return Err(format!("reading {}: {source}", path.display()));
        }
        Err(e) => return damaged(format!("the trailer does not check ({e})")),
    };
    let id = trailer.id();
    let e = |e: crate::error::Error| e.to_string();
    if !super::extract::verify_payload(&file, path, &trailer).map_err(e)?
        || Bundle::open(path).is_err()
    {
        return damaged(format!("the payload does not match its BLAKE3 (id {id})"));
    }
    if !super::extract::verify_runtime(&file, path, &trailer).map_err(e)? {
        return damaged(format!(
            "the runtime part does not match its BLAKE3 (id {id})"
        ));
    }
    println!("{}: OK (id {id})", path.display());
    Ok(0)
}

fn extract(bundle: &Bundle, dir: Option<&Path>) -> Result<i32, String> {
    let name = format!("{}.AppDir", bundle.manifest().name);
    let dir = dir.unwrap_or(Path::new(&name));
    if dir.symlink_metadata().is_ok() {
        let empty = fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
        if !empty {
            return Err(format!(
                "{}: already exists: remove it or name another directory",
                dir.display()
            ));
        }
        fs::remove_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = dir
        .file_name()
        .ok_or_else(|| format!("{}: name a directory to extract into", dir.display()))?;
    let tmp = parent.join(format!(
        ".{}.ovl-extract-{}",
        base.to_string_lossy(),
        std::process::id()
    ));
    fs::create_dir(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let res = bundle
        .extract_to(&tmp, 0)
        .map_err(|e| e.to_string())
        .and_then(|()| fs::rename(&tmp, dir).map_err(|e| format!("{}: {e}", dir.display())));
    if let Err(e) = res {
        let _ = crate::finalize::remove_dir_tree(&tmp);
        return Err(e);
    }
    eprintln!(
        "extracted {} entries into {}",
        bundle.image().inodes(),
        dir.display()
    );
    Ok(0)
}

fn gc(bundle: &Bundle) -> Result<i32, String> {
    let r = cache::gc(&bundle.id()).map_err(|e| e.to_string())?;
    println!(
        "removed {} cached tree(s) ({:.1} MiB); kept {}; {} in use",
        r.removed.len(),
        r.bytes_freed as f64 / (1 << 20) as f64,
        r.kept,
        r.busy
    );
    Ok(0)
}

/// Why FUSE cannot be used here, if it cannot.
fn fuse_missing() -> Option<String> {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some("/dev/fuse does not exist".into()),
        // Opening is the setuid helper's job for a normal user.
        Err(e) => match crate::engine::fusermount::find_helper() {
            Some(_) => None,
            None => Some(format!("/dev/fuse: {e}, and fusermount3 is not installed")),
        },
    }
}

/// Per-run scratch space under `$XDG_CACHE_HOME/ovl/runs/`, alive as long as the value (the
/// launcher's lock-file protocol: a process id would not do, it may belong to another PID
/// namespace or host sharing the home directory). Dirs of runs that are gone are removed.
fn new_scratch() -> Result<Scratch, String> {
    let root = cache::cache_root().map_err(|e| e.to_string())?;
    let runs = root.parent().expect("cache root has a parent").join("runs");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&runs)
        .map_err(|e| format!("creating {}: {e}", runs.display()))?;
    Scratch::create_in(&runs, "")
}

fn app_env(
    bundle: &Bundle,
    appdir: &Path,
    argv0: &OsString,
    owd: &Path,
) -> Vec<(OsString, OsString)> {
    vec![
        ("APPIMAGE".into(), bundle.path().as_os_str().to_owned()),
        ("APPDIR".into(), appdir.as_os_str().to_owned()),
        ("OVL_BUNDLE".into(), bundle.path().as_os_str().to_owned()),
        ("ARGV0".into(), argv0.clone()),
        ("OWD".into(), owd.as_os_str().to_owned()),
    ]
}

/// The overlay a run mounts, and the cached tree it stands on (keep it while mounted): the
/// app's tree under the kept upper for a writer; for a discard run the kept upper stacked
/// over the tree as lowers, under the run's own `scratch` upper. A writer holds the upper's
/// writer lock.
fn overlay_for(
    bundle: &Bundle,
    upper: &Path,
    scratch: Option<&Scratch>,
) -> Result<OverlayFS, String> {
    let m = bundle.manifest();
    // The tree is the bundle's image, read in place: nothing is extracted.
    let lower = bundle.lower_source();
    let mut ofs = match scratch {
        None => {
            state::finish_interrupted_commit(bundle, upper)?;
            state::note_lower(upper, bundle)?;
            let mut ofs = OverlayFS::with_lower(lower);
            ofs.set_upper(upper);
            ofs
        }
        Some(scratch) => {
            // Earlier runs' state stays visible (the kept upper becomes a lower); this run's
            // changes go to a scratch upper that is thrown away. An upper a crashed commit
            // already put into the bundle is not shown twice.
            let kept = crate::finalize::count_entries(upper).unwrap_or(0) > 0
                && !state::upper_already_committed(bundle, upper);
            if kept {
                state::note_user(upper, bundle)?;
            }
            let mut ofs = if kept {
                let mut ofs = OverlayFS::new(upper);
                ofs.add_lower_source(lower);
                ofs
            } else {
                OverlayFS::with_lower(lower)
            };
            ofs.set_upper(scratch.dir.join("upper"));
            ofs
        }
    };
    ofs.set_fsname(format!("ovl:{}", m.name))
        .set_require_empty_mountpoint(true)
        .mountpoint_as_home_named(&m.name);
    ofs.validate().map_err(|e| e.to_string())?;
    launcher::remove_stale_mountpoints(&crate::overlayfs::mountpoint_base());
    Ok(ofs)
}

fn run_app(
    bundle: &Bundle,
    opts: &Opts,
    app_args: Vec<OsString>,
    argv0: OsString,
) -> Result<i32, String> {
    let m = bundle.manifest();
    let action = opts.on_exit.unwrap_or(m.on_exit);
    let upper = match &opts.upper {
        Some(u) => std::path::absolute(u).map_err(|e| format!("{}: {e}", u.display()))?,
        None => default_upper(&m.name)?,
    };
    let owd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    if opts.extract_and_run {
        return run_without_fuse(bundle, opts, action, &upper, None, app_args, argv0, &owd);
    }
    if let Some(why) = fuse_missing() {
        return run_without_fuse(
            bundle,
            opts,
            action,
            &upper,
            Some(&why),
            app_args,
            argv0,
            &owd,
        );
    }
    let writer = action != OverlayAction::Discard;
    if writer && !opts.mount {
        return run_instance(bundle, opts, action, &upper, app_args, argv0, &owd);
    }
    // A run that serves its own overlay: --ovl-mount, or a discard run (its own upper).
    let _lock = if writer {
        let lock =
            state::try_lock_upper(&upper)?.ok_or_else(|| state::upper_busy(&upper, &m.name))?;
        let why = format!(
            "{}: another run of {name} serves this upper with --ovl-mount; use its mount, or \
             stop it first, or run this one with --ovl-upper=DIR or --ovl-on-exit=discard",
            upper.display(),
            name = m.name
        );
        super::instances::refuse_joiners(&upper, why)?;
        lock
    } else {
        state::share_upper(&upper, &m.name)?
    };
    let scratch = new_scratch()?;
    let mut ofs = overlay_for(bundle, &upper, (!writer).then_some(&scratch))?;
    let app_args_copy = app_args.clone();
    let mut prefetch = None;
    let res = if opts.mount {
        launcher::serve(&mut ofs)
    } else {
        launcher::run_in_overlay(&mut ofs, false, |mnt| {
            // Mounted (in this process): the blocks earlier runs read, ahead of the app.
            prefetch = super::prefetch::start(bundle, &upper);
            let mut argv = vec![mnt.join(&m.entry).into_os_string()];
            argv.extend(app_args);
            Launch {
                argv,
                cwd: owd.clone(),
                env: app_env(bundle, mnt, &argv0, &owd),
                chroot: None,
            }
        })
    };
    if let Some(p) = prefetch {
        p.finish();
    }
    // What this run read, for the next start (a discard run's reads are as good a guess).
    super::prefetch::save(bundle, &upper);
    let code = match res {
        Ok(c) => c,
        Err(e) if ofs.handle().is_none() && action != OverlayAction::Commit && !opts.mount => {
            // FUSE is there but mounting failed (no namespace and no usable fusermount3, a
            // container without the capability...): run from a private copy as without FUSE.
            drop(ofs);
            drop(_lock);
            drop(scratch);
            return run_without_fuse(
                bundle,
                opts,
                action,
                &upper,
                Some(&e),
                app_args_copy,
                argv0,
                &owd,
            );
        }
        Err(e) => {
            let _ = ofs.umount();
            return Err(e);
        }
    };
    let fin = match action {
        OverlayAction::Preserve => ofs.umount().map_err(|e| e.to_string()),
        OverlayAction::Discard => ofs
            .overlay_action(OverlayAction::Discard)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        _ => state::commit_bundle(bundle, &mut ofs, &upper, &|| {
            eprintln!(
                "{name}: waiting for discard runs of {name} to exit before committing",
                name = m.name
            )
        })
        .map(|msg| eprintln!("{msg}")),
    };
    if writer {
        super::instances::stop_refusing(&upper);
    }
    fin.map(|()| code)
}

/// A writing run (preserve or commit) of the app: an instance on the mount of the process
/// serving the kept upper, started by this run if none serves it yet (see
/// [`super::instances`]).
fn run_instance(
    bundle: &Bundle,
    opts: &Opts,
    action: OverlayAction,
    upper: &Path,
    app_args: Vec<OsString>,
    argv0: OsString,
    owd: &Path,
) -> Result<i32, String> {
    use super::instances::{self, Attach, Joined};
    let m = bundle.manifest();
    loop {
        let conn = match instances::attach(upper, &m.name)? {
            Attach::Join(conn) => conn,
            Attach::Serve(lock) => {
                let ofs = overlay_for(bundle, upper, None)?;
                instances::start(instances::Server {
                    bundle,
                    upper: upper.to_path_buf(),
                    ofs,
                    lock,
                    verbose: opts.verbose,
                })?
            }
        };
        let commit = action == OverlayAction::Commit;
        let args = app_args.clone();
        let res = instances::run_joined(conn, bundle, upper, commit, |mnt| {
            let mut argv = vec![mnt.join(&m.entry).into_os_string()];
            argv.extend(args);
            Launch {
                argv,
                cwd: owd.to_path_buf(),
                env: app_env(bundle, mnt, &argv0, owd),
                chroot: None,
            }
        })?;
        match res {
            Joined::Exit(code) => return Ok(code),
            Joined::Retry => continue,
            // FUSE is there but mounting failed (no namespace and no usable fusermount3, a
            // container without the capability...): run from a private copy as without FUSE.
            Joined::Fallback(why) => {
                return run_without_fuse(
                    bundle,
                    opts,
                    action,
                    upper,
                    Some(&why),
                    app_args,
                    argv0,
                    owd,
                );
            }
        }
    }
}

/// No FUSE (`why`), or `--appimage-extract-and-run` (`None`): one line of warning if FUSE is
/// missing, then the entry runs from a private copy of the tree with the kept state
/// merged in, removed afterwards (Discard). A commit cannot work.
#[allow(clippy::too_many_arguments)]
fn run_without_fuse(
    bundle: &Bundle,
    opts: &Opts,
    action: OverlayAction,
    upper: &Path,
    why: Option<&str>,
    app_args: Vec<OsString>,
    argv0: OsString,
    owd: &Path,
) -> Result<i32, String> {
    let name = &bundle.manifest().name;
    if action == OverlayAction::Commit || opts.mount {
        let what = if opts.mount {
            "--ovl-mount"
        } else {
            "--ovl-on-exit=commit"
        };
        return Err(match why {
            Some(why) => {
                format!("{what} needs FUSE ({why}): run where FUSE works (apt install fuse3)")
            }
            None => format!("{what} needs FUSE: leave out --appimage-extract-and-run"),
        });
    }
    if let Some(why) = why {
        eprintln!(
            "{name}: warning: FUSE is not available ({why}); running from a private copy, \
             this run's changes will be discarded"
        );
    }
    let _lock = state::share_upper(upper, name)?;
    let scratch = new_scratch()?;
    // Extracted straight into the run's scratch directory: nothing is kept in the cache.
    let copy = scratch.dir.join("tree");
    fs::create_dir(&copy).map_err(|e| format!("creating {}: {e}", copy.display()))?;
    bundle.extract_to(&copy, 0).map_err(|e| e.to_string())?;
    if crate::finalize::count_entries(upper).unwrap_or(0) > 0
        && !state::upper_already_committed(bundle, upper)
    {
        crate::commit::merge_keeping_upper(&copy, upper, &scratch.dir.join("work"))
            .map_err(|e| e.to_string())?;
    }
    let mut argv = vec![copy.join(&bundle.manifest().entry).into_os_string()];
    argv.extend(app_args);
    let launch = Launch {
        argv,
        cwd: owd.to_path_buf(),
        env: app_env(bundle, &copy, &argv0, owd),
        chroot: None,
    };
    let target = std::sync::Arc::new(launcher::Target::default());
    let fwd = launcher::forward_signals(target.clone())
        .map_err(|e| format!("installing signal handlers: {e}"))?;
    let r = launcher::run(&launch, &target, &[]).map_err(|e| e.to_string());
    fwd.close();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn leading_runtime_options_are_taken_the_rest_go_to_the_app() {
        let (o, rest) = parse(&os(&[
            "--ovl-on-exit",
            "discard",
            "--ovl-upper=/x",
            "a",
            "--ovl-info",
        ]))
        .unwrap();
        assert_eq!(o.on_exit, Some(OverlayAction::Discard));
        assert_eq!(o.upper.as_deref(), Some(Path::new("/x")));
        assert!(!o.info);
        assert_eq!(rest, os(&["a", "--ovl-info"]));
        let (o, rest) = parse(&os(&["--ovl-extract", "--ovl-verbose"])).unwrap();
        assert_eq!(o.extract, Some(None));
        assert!(o.verbose && rest.is_empty());
        let (o, _) = parse(&os(&["--ovl-extract", "dir"])).unwrap();
        assert_eq!(o.extract, Some(Some(PathBuf::from("dir"))));
        assert!(
            parse(&os(&["--ovl-bogus"]))
                .unwrap_err()
                .contains("--ovl-help")
        );
        assert!(
            parse(&os(&["--ovl-on-exit=keep"]))
                .unwrap_err()
                .contains("preserve")
        );
        assert!(parse(&os(&["--ovl-upper"])).unwrap_err().contains("needs"));
    }
}
