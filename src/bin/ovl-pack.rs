//! `ovl-pack`: build a single-file `app.run` bundle from an app directory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use ovl::OverlayAction;
use ovl::bundle::{PackOptions, pack};

const EXAMPLES: &str = "\
Examples:
  ovl-pack MyApp.AppDir -o myapp.run                 runs MyApp.AppDir/AppRun
  ovl-pack tree -o tool.run --entry bin/tool --name tool --on-exit discard

Running the bundle: ./myapp.run [ARGS]; ./myapp.run --ovl-help lists the runtime's options.";

#[derive(Parser, Debug)]
#[command(
    name = "ovl-pack",
    version,
    about = "Build a single-file app bundle (runtime + compressed tree) that runs APPDIR's entry \
             point in an overlay with a writable layer",
    after_help = EXAMPLES
)]
struct Args {
    /// The app's directory tree.
    appdir: PathBuf,
    /// The bundle to write (replaced atomically if it exists).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// What runs, relative to APPDIR (default: AppRun).
    #[arg(long, value_name = "REL/PATH")]
    entry: Option<String>,
    /// Name of the app: names its writable layer, $XDG_DATA_HOME/ovl/NAME (default: APPDIR's
    /// name without .AppDir).
    #[arg(long)]
    name: Option<String>,
    /// What happens to a run's changes unless the user says otherwise: preserve, discard or
    /// commit (rewrite the bundle).
    #[arg(long = "on-exit", value_name = "ACTION", default_value = "preserve")]
    on_exit: String,
    /// zstd compression level, 1 (fast) to 22 (small); above 9 is much slower for little gain.
    #[arg(long, default_value_t = 9)]
    level: i32,
    /// Write only the payload image (the format app.run will serve in place: see
    /// ovl::image), without runtime or bundle trailer; for measuring it and for tools.
    #[arg(long)]
    image_only: bool,
    /// With --image-only: the largest block in KiB (a power of two, 4 to 16384).
    #[arg(long, value_name = "KIB", default_value_t = 1024)]
    block_size: u32,
    /// With --image-only: the largest block of packed small files in KiB (4 to --block-size).
    #[arg(long, value_name = "KIB", default_value_t = 512)]
    pack_size: u32,
    /// The runtime to put first (default: $OVL_RUNTIME, else the one built into ovl-pack).
    #[arg(long, value_name = "FILE")]
    runtime: Option<PathBuf>,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("ovl-pack: {msg}");
    ExitCode::from(1)
}

/// The static runtime this ovl-pack was built with (see build.rs), if it could be built.
#[cfg(ovl_embedded_runtime)]
const EMBEDDED_RUNTIME: Option<&[u8]> = Some(include_bytes!(env!("OVL_EMBEDDED_RUNTIME")));
#[cfg(not(ovl_embedded_runtime))]
const EMBEDDED_RUNTIME: Option<&[u8]> = None;

/// The runtime's bytes and where they came from: `--runtime`, `$OVL_RUNTIME`, else the one
/// built into ovl-pack.
fn find_runtime(given: Option<PathBuf>) -> Result<(Vec<u8>, String), String> {
    if let Some(p) = given.or_else(|| std::env::var_os("OVL_RUNTIME").map(PathBuf::from)) {
        let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        return Ok((bytes, p.display().to_string()));
    }
    EMBEDDED_RUNTIME
        .map(|b| (b.to_vec(), "the built-in runtime".to_string()))
        .ok_or_else(|| {
            "this ovl-pack was built without a runtime (libc6-dev was missing): build one with              packaging/build-runtime.sh and pass --runtime FILE"
                .to_string()
        })
}

/// A dynamically linked runtime only runs where its libraries are: say so.
fn is_static(elf: &[u8]) -> bool {
    // PT_INTERP names the dynamic loader; a static executable has none.
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let u16_at = |i: usize| u16::from_le_bytes([elf[i], elf[i + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).all(|i| {
        let off = phoff + i * phentsize;
        elf.get(off..off + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != 3)
    })
}

/// `--image-only`: the tree's image alone, written beside OUTPUT, synced, renamed over it.
fn pack_image(args: &Args) -> ExitCode {
    use std::os::unix::fs::OpenOptionsExt;
    let opts = ovl::image::ImageOptions {
        level: args.level,
        block_size: args.block_size.saturating_mul(1024),
        pack_size: args.pack_size.saturating_mul(1024),
        threads: 0,
        special_files: true,
    };
    let out = &args.output;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(base) = out.file_name() else {
        return fail(format!("{}: output must name a file", out.display()));
    };
    let tmp = dir.join(format!(
        ".{}.ovl-pack-{}",
        base.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
    {
        Ok(f) => f,
        Err(e) => return fail(format!("creating {}: {e}", tmp.display())),
    };
    let res = ovl::image::write_image(&args.appdir, &file, 0, &opts).and_then(|s| {
        file.sync_all()
            .and_then(|()| std::fs::rename(&tmp, out))
            .map_err(|e| ovl::Error::Io {
                what: "writing",
                path: out.clone(),
                source: e,
            })?;
        Ok(s)
    });
    match res {
        Ok(s) => {
            eprintln!(
                "ovl-pack: {}: {} inodes, {} files, {} distinct contents ({:.1} MiB), {} blocks, \
                 metadata {:.1} MiB raw, image {:.1} MiB",
                out.display(),
                s.inodes,
                s.files,
                s.distinct,
                s.data_bytes as f64 / (1 << 20) as f64,
                s.blocks,
                s.meta_len as f64 / (1 << 20) as f64,
                s.image_len as f64 / (1 << 20) as f64,
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            fail(e)
        }
    }
}

fn main() -> ExitCode {
    let args = match ovl::cli::parse::<Args>("ovl-pack") {
        Ok(a) => a,
        Err(ovl::cli::ArgsError::Printed) => return ExitCode::SUCCESS,
        Err(ovl::cli::ArgsError::Usage(line)) => return fail(line),
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let on_exit = match args.on_exit.as_str() {
        "preserve" => OverlayAction::Preserve,
        "discard" => OverlayAction::Discard,
        "commit" => OverlayAction::Commit,
        other => {
            return fail(format!(
                "unknown --on-exit action '{other}': use preserve, discard or commit"
            ));
        }
    };
    if args.image_only {
        return pack_image(&args);
    }
    let (runtime, runtime_path) = match find_runtime(args.runtime) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    if &runtime[..runtime.len().min(4)] != b"\x7fELF" {
        return fail(format!(
            "{runtime_path}: not an executable: pass the ovl-runtime binary with --runtime"
        ));
    }
    if !is_static(&runtime) {
        eprintln!(
            "ovl-pack: warning: {runtime_path} is dynamically linked: the bundle only runs where \
             its libraries are (packaging/build-runtime.sh builds the static one)"
        );
    }
    let opts = PackOptions {
        name: args.name,
        entry: args.entry,
        on_exit,
        level: args.level,
        threads: 0,
    };
    match pack(&args.appdir, &runtime, &args.output, &opts) {
        Ok(s) => {
            eprintln!(
                "ovl-pack: {}: {} entries, {} distinct contents ({:.1} MiB), bundle {:.1} MiB, id {}",
                args.output.display(),
                s.entries,
                s.blobs,
                s.data_bytes as f64 / (1 << 20) as f64,
                s.bundle_bytes as f64 / (1 << 20) as f64,
                s.id
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}
