//! What runs when a user starts `./app.run`: find the payload at the end of our own file,
//! make sure its tree is in the cache, mount it under the app's upper, run the entry point,
//! then keep, discard or commit the changes.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::cache::{self, CachedTree};
use super::extract::Bundle;
use super::format::{Kind, Manifest};
use crate::launcher::{self, EXIT_FAILURE, Launch};
use crate::{OverlayAction, OverlayFS};

const HELP: &str = "\
This file is an ovl bundle: a runtime followed by an app's files. Running it mounts the app
with a writable layer and runs it; every argument not starting with --ovl- goes to the app.

Runtime options (before the app's own arguments):
  --ovl-help               this text
  --ovl-info               name, entry point, sizes, id, cache and upper locations
  --ovl-verify             recompute the payload's BLAKE3; exit 1 if it does not match
  --ovl-extract [DIR]      extract the app's tree into DIR (default NAME.AppDir)
  --ovl-on-exit=ACTION     this run's changes: preserve (keep for the next run), discard
                           (throw away this run's changes, keep earlier ones), or commit
                           (write them into this bundle file)
  --ovl-upper=DIR          keep the app's writable layer in DIR
                           (default $XDG_DATA_HOME/ovl/NAME/upper)
  --ovl-mount              mount, print the mount point, serve until Ctrl-C, then finalize
  --ovl-gc                 remove cached trees that no bundle uses any more
  --ovl-verbose            log what the runtime does

Exit status: the app's own; 128+N if it died of signal N; 125 if the runtime failed.
Environment for the app: APPDIR (its mounted tree), OVL_BUNDLE (this file), ARGV0, OWD.";

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
}

/// Splits the runtime's own leading `--ovl-*` options from the app's arguments.
fn parse(args: &[OsString]) -> Result<(Opts, Vec<OsString>), String> {
    let mut o = Opts::default();
    let mut i = 0;
    while let Some(a) = args.get(i).and_then(|a| a.to_str()) {
        if !a.starts_with("--ovl-") {
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
            "--ovl-extract" => {
                let dir = match val {
                    Some(v) => Some(PathBuf::from(v)),
                    None => match args.get(i) {
                        Some(next) if !next.to_string_lossy().starts_with("--ovl-") => {
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
    let (opts, app_args) = match parse(&args) {
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
    let exe = match fs::read_link("/proc/self/exe") {
        Ok(p) => p,
        Err(e) => return fail(format!("finding our own file (/proc/self/exe): {e}")),
    };
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
    } else if opts.verify {
        verify(&bundle)
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
    shoff + shentsize * shnum == len
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
    let count = |f: fn(&Kind) -> bool| m.entries.iter().filter(|e| f(&e.kind)).count();
    let files = count(|k| matches!(k, Kind::File { .. } | Kind::HardLink { .. }));
    let dirs = count(|k| matches!(k, Kind::Dir));
    let links = count(|k| matches!(k, Kind::Symlink { .. }));
    let data: u64 = m.blobs.iter().map(|b| b.len).sum();
    let stored: u64 = m.blobs.iter().map(|b| b.clen).sum();
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
        "payload:  {payload} bytes: {files} files, {dirs} directories, {links} symlinks; \
         {} distinct contents, {data} bytes, {stored} compressed",
        m.blobs.len()
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
        match crate::action::count_entries(&upper) {
            Ok(0) | Err(_) => "no changes kept".to_string(),
            Ok(n) => format!("{n} changed entries kept"),
        }
    );
    Ok(0)
}

fn verify(bundle: &Bundle) -> Result<i32, String> {
    if bundle.verify().map_err(|e| e.to_string())? {
        println!("{}: OK (id {})", bundle.path().display(), bundle.id());
        Ok(0)
    } else {
        eprintln!(
            "{}: payload does not match its BLAKE3 (id {}): the file is damaged; download or \
             build it again",
            bundle.path().display(),
            bundle.id()
        );
        Ok(1)
    }
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
        let _ = crate::action::remove_dir_tree(&tmp);
        return Err(e);
    }
    eprintln!(
        "extracted {} entries into {}",
        bundle.manifest().entries.len(),
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
        Err(e) => match crate::fusermount::find_helper() {
            Some(_) => None,
            None => Some(format!("/dev/fuse: {e}, and fusermount3 is not installed")),
        },
    }
}

/// Per-run scratch space, `$XDG_CACHE_HOME/ovl/runs/<pid>`, on the cache's filesystem (a
/// merged tree is renamed into the cache from there). Those of dead runs are removed.
fn run_dir() -> Result<PathBuf, String> {
    let root = cache::cache_root().map_err(|e| e.to_string())?;
    let runs = root.parent().expect("cache root has a parent").join("runs");
    if let Ok(rd) = fs::read_dir(&runs) {
        for e in rd.flatten() {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok();
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = crate::action::remove_dir_tree(&e.path());
            }
        }
    }
    let dir = runs.join(std::process::id().to_string());
    if dir.exists() {
        crate::action::remove_dir_tree(&dir).map_err(|e| e.to_string())?;
    }
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Exclusive use of an upper: two runs writing one upper would corrupt it. A discard run
/// only reads it (as a lower) and shares.
struct UpperLock {
    _file: fs::File,
}

fn lock_upper(upper: &Path, name: &str, exclusive: bool) -> Result<UpperLock, String> {
    let parent = upper.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let base = upper
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upper".into());
    let path = parent.join(format!(".{base}.ovl-lock"));
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    if unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) } < 0 {
        return Err(format!(
            "{}: another run of {name} is using this upper; wait for it to finish, or run this \
             one with --ovl-on-exit=discard or --ovl-upper=DIR",
            upper.display()
        ));
    }
    Ok(UpperLock { _file: file })
}

/// The marker a commit leaves between replacing the bundle and clearing the upper.
fn commit_marker(upper: &Path) -> PathBuf {
    let base = upper
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "upper".into());
    upper
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!(".{base}.ovl-committed"))
}

/// Finishes a commit a crash interrupted: if the bundle already carries the committed tree,
/// the upper's changes are in it and the upper is cleared; otherwise the bundle was not
/// replaced and the upper still holds the only copy of the changes (kept).
fn finish_interrupted_commit(bundle: &Bundle, upper: &Path) -> Result<(), String> {
    let marker = commit_marker(upper);
    let Ok(id) = fs::read_to_string(&marker) else {
        return Ok(());
    };
    if id.trim() == bundle.id() {
        log::warn!(
            "finishing an interrupted commit: {} is already in {}",
            upper.display(),
            bundle.path().display()
        );
        clear_upper(upper)?;
    }
    fs::remove_file(&marker).map_err(|e| format!("removing {}: {e}", marker.display()))
}

fn clear_upper(upper: &Path) -> Result<(), String> {
    for p in [upper.to_path_buf(), crate::mount::default_workdir(upper)] {
        if p.symlink_metadata().is_ok() {
            crate::action::remove_dir_tree(&p).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
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
    if let Some(why) = fuse_missing() {
        if action == OverlayAction::Commit {
            return Err(format!(
                "cannot commit without FUSE ({why}): run where FUSE works (apt install fuse3), \
                 or without --ovl-on-exit=commit"
            ));
        }
        eprintln!(
            "{}: warning: FUSE is not available ({why}); running from a private copy, this \
             run's changes will be discarded",
            m.name
        );
        return run_copy(bundle, app_args, argv0, &owd);
    }
    let tree = cache::tree_for(bundle).map_err(|e| e.to_string())?;
    let _lock = lock_upper(&upper, &m.name, action != OverlayAction::Discard)?;
    finish_interrupted_commit(bundle, &upper)?;
    remove_stale_pack_temps(bundle.path());
    let scratch = run_dir()?;
    let mut ofs = match action {
        OverlayAction::Discard => {
            // Earlier runs' state stays visible (the kept upper becomes a lower); this run's
            // changes go to a scratch upper that is thrown away.
            let kept = crate::action::count_entries(&upper).unwrap_or(0) > 0;
            let mut ofs = OverlayFS::new(if kept { &upper } else { &tree.path });
            if kept {
                ofs.add_lower(&tree.path);
            }
            ofs.set_upper(scratch.join("upper"));
            ofs
        }
        _ => {
            let mut ofs = OverlayFS::new(&tree.path);
            ofs.set_upper(&upper);
            ofs
        }
    };
    ofs.set_fsname(format!("ovl:{}", m.name))
        .set_require_empty_mountpoint(true)
        .mountpoint_as_home_named(&m.name);
    ofs.validate().map_err(|e| e.to_string())?;
    if let Some(base) = dirs::cache_dir() {
        launcher::remove_stale_mountpoints(&base);
    }
    let res = if opts.mount {
        launcher::serve(&mut ofs)
    } else {
        let env = |mnt: &Path| {
            vec![
                ("APPDIR".into(), mnt.as_os_str().to_owned()),
                ("OVL_BUNDLE".into(), bundle.path().as_os_str().to_owned()),
                ("ARGV0".into(), argv0.clone()),
                ("OWD".into(), owd.as_os_str().to_owned()),
            ]
        };
        launcher::run_in_overlay(&mut ofs, false, |mnt| {
            let mut argv = vec![mnt.join(&m.entry).into_os_string()];
            argv.extend(app_args);
            Launch {
                argv,
                cwd: owd.clone(),
                env: env(mnt),
                chroot: None,
            }
        })
    };
    let code = match res {
        Ok(c) => c,
        Err(e) => {
            let _ = ofs.umount();
            let _ = crate::action::remove_dir_tree(&scratch);
            return Err(e);
        }
    };
    let fin = match action {
        OverlayAction::Preserve => ofs.umount().map_err(|e| e.to_string()),
        OverlayAction::Discard => ofs
            .overlay_action(OverlayAction::Discard)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        _ => ofs
            .umount()
            .map_err(|e| e.to_string())
            .and_then(|()| commit_bundle(bundle, &tree, &upper, &scratch)),
    };
    let _ = crate::action::remove_dir_tree(&scratch);
    fin.map(|()| code)
}

/// Commit: the cached tree plus the upper's changes become a new bundle, renamed over this
/// one (the running file is never written in place). Order, for crashes: the new bundle is
/// complete and synced; a marker records its id; the rename; the upper is cleared; the
/// marker goes. A crash after the rename is finished by the next run
/// ([`finish_interrupted_commit`]); one before it leaves the bundle and the upper as they were.
fn commit_bundle(
    bundle: &Bundle,
    tree: &CachedTree,
    upper: &Path,
    scratch: &Path,
) -> Result<(), String> {
    let name = &bundle.manifest().name;
    let changes = crate::action::count_entries(upper).unwrap_or(0);
    if changes == 0 {
        eprintln!("{name}: no changes to commit");
        return Ok(());
    }
    let keep = |e: String| {
        format!(
            "{e}; the changes are kept in {} (commit again, or run with --ovl-on-exit=preserve)",
            upper.display()
        )
    };
    let merged = scratch.join("merged");
    cache::copy_tree(&tree.path, &merged).map_err(|e| keep(e.to_string()))?;
    let work = scratch.join("commit-work");
    crate::commit::merge_keeping_upper(&merged, upper, &work).map_err(|e| keep(e.to_string()))?;
    let m = bundle.manifest();
    let runtime = bundle.runtime_bytes().map_err(|e| keep(e.to_string()))?;
    let opts = super::PackOptions {
        name: Some(m.name.clone()),
        entry: Some(m.entry.clone()),
        on_exit: m.on_exit,
        ..Default::default()
    };
    let packed = super::pack::pack_unplaced(&merged, &runtime, bundle.path(), &opts)
        .map_err(|e| keep(e.to_string()))?;
    let new_id = packed.summary.id.clone();
    let marker = commit_marker(upper);
    write_synced(&marker, new_id.as_bytes()).map_err(keep)?;
    crash_point("marker");
    if let Err(e) = packed.place() {
        let _ = fs::remove_file(&marker);
        return Err(keep(e.to_string()));
    }
    crash_point("placed");
    clear_upper(upper)?;
    crash_point("cleared");
    fs::remove_file(&marker).map_err(|e| format!("removing {}: {e}", marker.display()))?;
    // The merged tree is exactly what the new bundle extracts to: seed the cache with it.
    seed_cache(&merged, &new_id, bundle.path());
    eprintln!(
        "{name}: committed {changes} changes into {} (id {new_id})",
        bundle.path().display()
    );
    Ok(())
}

/// Removes `.<bundle>.ovl-pack-<pid>` files a killed commit left beside the bundle.
fn remove_stale_pack_temps(bundle: &Path) {
    let (Some(dir), Some(base)) = (bundle.parent(), bundle.file_name()) else {
        return;
    };
    let prefix = format!(".{}.ovl-pack-", base.to_string_lossy());
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Test hook: `OVL_BUNDLE_CRASH_AT=marker|placed|cleared` aborts right after that step of a
/// bundle commit, so tests can check that the next run finishes or undoes it.
fn crash_point(step: &str) {
    if std::env::var("OVL_BUNDLE_CRASH_AT").is_ok_and(|s| s == step) {
        std::process::abort();
    }
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let r = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(d) = path.parent() {
            fs::File::open(d)?.sync_all()?;
        }
        Ok::<(), io::Error>(())
    })();
    r.map_err(|e| format!("writing {}: {e}", path.display()))
}

fn seed_cache(merged: &Path, id: &str, bundle: &Path) {
    let Ok(root) = cache::cache_root() else {
        return;
    };
    let dest = root.join(id);
    if dest.exists() {
        return;
    }
    let synced = fs::File::open(merged).is_ok_and(|d| unsafe { libc::syncfs(d.as_raw_fd()) } == 0);
    if synced && fs::rename(merged, &dest).is_ok() {
        cache::record_user(&root, id, bundle);
    }
}

/// No FUSE: run the entry from a private copy of the cached tree, removed afterwards.
fn run_copy(
    bundle: &Bundle,
    app_args: Vec<OsString>,
    argv0: OsString,
    owd: &Path,
) -> Result<i32, String> {
    let tree = cache::tree_for(bundle).map_err(|e| e.to_string())?;
    let scratch = run_dir()?;
    let copy = scratch.join("tree");
    let res = cache::copy_tree(&tree.path, &copy)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            let mut argv = vec![copy.join(&bundle.manifest().entry).into_os_string()];
            argv.extend(app_args);
            let launch = Launch {
                argv,
                cwd: owd.to_path_buf(),
                env: vec![
                    ("APPDIR".into(), copy.as_os_str().to_owned()),
                    ("OVL_BUNDLE".into(), bundle.path().as_os_str().to_owned()),
                    ("ARGV0".into(), argv0),
                    ("OWD".into(), owd.as_os_str().to_owned()),
                ],
                chroot: None,
            };
            let target = std::sync::Arc::new(launcher::Target::default());
            let fwd = launcher::forward_signals(target.clone())
                .map_err(|e| format!("installing signal handlers: {e}"))?;
            let r = launcher::run(&launch, &target, &[]).map_err(|e| e.to_string());
            fwd.close();
            r
        });
    let _ = crate::action::remove_dir_tree(&scratch);
    res
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
