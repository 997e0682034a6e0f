//! Differential test: the same seeded random sequence of filesystem operations is applied to an
//! ovl mount and to a kernel overlayfs mount over identical lower trees. After every step the
//! errno (0 for success) and any data the step read must match; every `CHECK_EVERY` steps and at
//! the end the whole visible trees must match (paths, types, sizes, contents, modes, symlink
//! targets, nlink of non-directories, user xattrs).
//!
//! The kernel runs with `redirect_dir=on,index=on`: it renames lower and merged directories by
//! writing redirects, as ovl does. At the end the upper ovl wrote is also mounted by the kernel,
//! which must show the same tree, and committed into ovl's lower (Commit or CommitAtomic), which
//! must then hold that tree.
//!
//! The same sequences also run on ovl-run's kernel backend (the kernel's overlay in the run's
//! private namespace, reached through `/proc/PID/root`) against the plain kernel overlay with
//! the options ovl-run gives it (`redirect_dir=on,index=off,metacopy=off`); the run then
//! preserves (ovl mounts the upper and commits it), commits or commits atomically, and the
//! lower must hold the tree the reference shows.
//!
//! Reproduce one seed with `OVL_DIFF_SEED=<seed>` (and optionally `OVL_DIFF_OPS=<n>`); run more
//! seeds with `OVL_DIFF_SEEDS=<count>` (both tests).

mod common;
use common::ops::*;
use common::sys::*;
use common::*;

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use rand::{Rng, SeedableRng, rngs::StdRng};
use tempfile::TempDir;

/// Default seeds and steps per seed.
const SEEDS: u64 = 8;
const OPS: usize = 300;
/// Full tree comparison interval.
const CHECK_EVERY: usize = 25;
/// How many recent steps a failure report lists.
const HISTORY: usize = 30;

/// The name pool: few enough names that operations collide (EEXIST, ENOENT, ENOTEMPTY,
/// ENOTDIR...), nested enough to rename across directories.
const NAMES: &[&str] = &[
    "a", "b", "c", "d1", "d1/x", "d1/y", "d1/d", "d1/d/q", "d2", "d2/sub", "d2/sub/z", "d2/h2",
    "d3", "d3/e", "d4", "d4/f", "h1", "s1",
];
/// Names that start out as (lower) directories: half the renames move one of these, so
/// redirects pile up (renamed again, nested, exchanged, renamed back).
const DIR_NAMES: &[&str] = &["d1", "d1/d", "d2", "d2/sub", "d3", "d4"];
/// Symlink targets (relative, so they resolve the same way in both mounts).
const TARGETS: &[&str] = &["a", "../a", "d1", "x", "nowhere", "sub/z", "h1"];
const XATTRS: &[&str] = &["user.k1", "user.k2", "user.lo"];
const MODES: &[u32] = &[0o644, 0o600, 0o755, 0o700, 0o640, 0o4755, 0o2775, 0o1777];

/// The common lower tree: files, nested directories, a symlink, a hard-linked pair, an xattr.
fn setup_lower(l: &Path) {
    fs::write(l.join("a"), "alpha\n").unwrap();
    fs::write(l.join("b"), "bravo").unwrap();
    fs::set_permissions(l.join("b"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(l.join("d1")).unwrap();
    fs::write(l.join("d1/x"), "x-one").unwrap();
    fs::write(l.join("d1/y"), "y-one\n").unwrap();
    fs::create_dir(l.join("d1/d")).unwrap();
    fs::write(l.join("d1/d/q"), "quux").unwrap();
    fs::create_dir_all(l.join("d2/sub")).unwrap();
    fs::write(l.join("d2/sub/z"), "zeta").unwrap();
    fs::write(l.join("h1"), "hardlinked").unwrap();
    fs::hard_link(l.join("h1"), l.join("d2/h2")).unwrap();
    fs::create_dir(l.join("d3")).unwrap();
    fs::set_permissions(l.join("d3"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(l.join("d3/e"), "").unwrap();
    std::os::unix::fs::symlink("a", l.join("s1")).unwrap();
    lsetxattr(&l.join("a"), "user.lo", b"lower", 0).unwrap();
    lsetxattr(&l.join("d1"), "user.k1", b"dir", 0).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Operations

fn gen_op(rng: &mut StdRng) -> Op {
    let p = |rng: &mut StdRng| pick(rng, NAMES).to_string();
    match rng.gen_range(0..100) {
        0..10 => Op::Create {
            path: p(rng),
            data: data(rng),
            excl: rng.gen_bool(0.3),
        },
        10..16 => Op::Append {
            path: p(rng),
            data: data(rng),
        },
        16..21 => Op::Truncate {
            path: p(rng),
            len: rng.gen_range(0..20),
        },
        21..26 => Op::WriteAt {
            path: p(rng),
            off: rng.gen_range(0..16),
            data: data(rng),
        },
        26..40 => Op::Rename {
            from: if rng.gen_bool(0.5) {
                pick(rng, DIR_NAMES).to_string()
            } else {
                p(rng)
            },
            to: p(rng),
            flags: match rng.gen_range(0..10) {
                0..6 => 0,
                6..8 => libc::RENAME_NOREPLACE,
                _ => libc::RENAME_EXCHANGE,
            },
        },
        40..45 => Op::Link {
            from: p(rng),
            to: p(rng),
        },
        45..53 => Op::Unlink { path: p(rng) },
        53..62 => Op::Mkdir {
            path: p(rng),
            mode: pick_mode(rng),
        },
        62..68 => Op::Rmdir { path: p(rng) },
        68..73 => Op::Symlink {
            target: pick(rng, TARGETS).to_string(),
            path: p(rng),
        },
        73..78 => Op::Chmod {
            path: p(rng),
            mode: pick_mode(rng),
        },
        78..84 => Op::SetXattr {
            path: p(rng),
            name: pick(rng, XATTRS).to_string(),
            value: data(rng),
            flags: match rng.gen_range(0..4) {
                0 => libc::XATTR_CREATE,
                1 => libc::XATTR_REPLACE,
                _ => 0,
            },
        },
        84..87 => Op::RemoveXattr {
            path: p(rng),
            name: pick(rng, XATTRS).to_string(),
        },
        87..92 => Op::Read { path: p(rng) },
        92..96 => Op::Stat { path: p(rng) },
        _ => Op::ListDir {
            path: if rng.gen_bool(0.2) {
                String::new()
            } else {
                p(rng)
            },
        },
    }
}

fn pick_mode(rng: &mut StdRng) -> Mode {
    Mode(MODES[rng.gen_range(0..MODES.len())])
}

// ---------------------------------------------------------------------------------------------
// Visible trees

#[derive(Clone, PartialEq, Eq)]
struct Entry {
    kind: char,
    mode: u32,
    /// Size of non-directories.
    size: Option<u64>,
    /// Contents of regular files.
    data: Option<String>,
    target: Option<String>,
    /// nlink of non-directories (when compared).
    nlink: Option<u64>,
    /// user.* xattrs.
    xattrs: BTreeMap<String, String>,
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {:04o}", self.kind, self.mode)?;
        if let Some(s) = self.size {
            write!(f, " size={s}")?;
        }
        if let Some(n) = self.nlink {
            write!(f, " nlink={n}")?;
        }
        if let Some(t) = &self.target {
            write!(f, " -> {t:?}")?;
        }
        if let Some(d) = &self.data {
            write!(f, " data=\"{d}\"")?;
        }
        if !self.xattrs.is_empty() {
            write!(f, " xattrs={:?}", self.xattrs)?;
        }
        Ok(())
    }
}

type Tree = BTreeMap<String, Entry>;

fn entry(p: &Path, with_nlink: bool) -> io::Result<Entry> {
    let md = fs::symlink_metadata(p)?;
    let kind = kind_char(md.file_type());
    let dir = kind == 'd';
    let mut xattrs = BTreeMap::new();
    for n in llistxattr(p)? {
        if n.starts_with("user.") {
            xattrs.insert(n.clone(), lgetxattr(p, &n)?.escape_ascii().to_string());
        }
    }
    Ok(Entry {
        kind,
        mode: md.mode() & 0o7777,
        size: (!dir).then(|| md.size()),
        data: if kind == 'f' {
            Some(fs::read(p)?.escape_ascii().to_string())
        } else {
            None
        },
        target: if kind == 'l' {
            Some(fs::read_link(p)?.to_string_lossy().into_owned())
        } else {
            None
        },
        nlink: (!dir && with_nlink).then(|| md.nlink()),
        xattrs,
    })
}

/// The visible tree below `base` (which is "." itself), not following symlinks.
fn walk(base: &Path, with_nlink: bool) -> io::Result<Tree> {
    fn rec(base: &Path, rel: &str, with_nlink: bool, out: &mut Tree) -> io::Result<()> {
        let p = if rel.is_empty() {
            base.to_path_buf()
        } else {
            base.join(rel)
        };
        let e = entry(&p, with_nlink)?;
        let dir = e.kind == 'd';
        out.insert(
            if rel.is_empty() {
                ".".into()
            } else {
                rel.into()
            },
            e,
        );
        if dir {
            let mut names = fs::read_dir(&p)?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<io::Result<Vec<_>>>()?;
            names.sort();
            for n in names {
                let r = if rel.is_empty() {
                    n
                } else {
                    format!("{rel}/{n}")
                };
                rec(base, &r, with_nlink, out)?;
            }
        }
        Ok(())
    }
    let mut t = Tree::new();
    rec(base, "", with_nlink, &mut t)?;
    Ok(t)
}

/// Human-readable differences between two trees (empty if equal).
fn diff(a_name: &str, a: &Tree, b_name: &str, b: &Tree) -> String {
    let mut out = String::new();
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (x, y) => {
                out.push_str(&format!(
                    "    {k}:\n      {a_name}: {x:?}\n      {b_name}: {y:?}\n"
                ));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Kernel side: the reference overlay, and mirroring ovl's directory renames

struct KernelSide {
    // Unmounted before the directory goes away (fields drop in order).
    km: KernelMount,
    _root: TempDir,
}

impl KernelSide {
    fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("ovl-diff-kernel")
            .tempdir()
            .unwrap();
        let d = |n: &str| root.path().join(n);
        for n in ["lower", "upper", "work", "mnt"] {
            fs::create_dir(d(n)).unwrap();
        }
        setup_lower(&d("lower"));
        // index=on: the kernel mode whose hard-link semantics ovl has (a copied-up lower file
        // keeps all its names; see copy_up.rs). redirect_dir=on: lower and merged directories
        // are renamed (recorded as redirects), as ovl does.
        let km = KernelMount::with_options(
            &[&d("lower")],
            &d("upper"),
            &d("work"),
            &d("mnt"),
            "redirect_dir=on,index=on",
        );
        KernelSide { km, _root: root }
    }
}

fn is_dir(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

// ---------------------------------------------------------------------------------------------
// The run

struct Run {
    seed: u64,
    history: Vec<String>,
    /// Directory renames that succeeded (the kernel records each as a redirect).
    dir_renames: usize,
}

impl Run {
    fn fail(&self, step: usize, what: &str) -> ! {
        let start = self.history.len().saturating_sub(HISTORY);
        panic!(
            "\n=== ovl/kernel overlayfs mismatch: seed {} step {step} ===\n{what}\n\
             recent steps (ovl result / kernel result):\n{}\n\
             reproduce: OVL_DIFF_SEED={} cargo test --test differential\n",
            self.seed,
            self.history[start..].join("\n"),
            self.seed,
        );
    }

    fn compare_trees(&self, step: usize, ovl: &Path, kern: &Path, when: &str) {
        self.compare_trees_with(step, ovl, kern, when, true)
    }

    fn compare_trees_with(&self, step: usize, ovl: &Path, kern: &Path, when: &str, nlink: bool) {
        let a = walk(ovl, nlink).unwrap_or_else(|e| self.fail(step, &format!("walking ovl: {e}")));
        let b =
            walk(kern, nlink).unwrap_or_else(|e| self.fail(step, &format!("walking kernel: {e}")));
        let d = diff("ovl", &a, "kernel", &b);
        if !d.is_empty() {
            self.fail(step, &format!("visible trees differ ({when}):\n{d}"));
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// One seed; `image`: ovl reads its lower from an image packed from the lower directory
/// (the kernel, from the directory).
fn run_seed(seed: u64, ops: usize, image: bool) -> usize {
    // The seeds take turns at the three ways ovl serves file I/O.
    let m = Mounted::with_lower_kind(
        ovl::InodeMode::Virtual,
        Io::ALL[seed as usize % 3],
        image,
        setup_lower,
    );
    let k = KernelSide::new();
    let (ovl, kern) = (m.mnt.clone(), k.km.mnt.clone());
    let mut run = Run {
        seed,
        history: Vec::new(),
        dir_renames: 0,
    };
    run.compare_trees(0, &ovl, &kern, "before any step");
    let mut rng = StdRng::seed_from_u64(seed);
    for step in 1..=ops {
        let op = gen_op(&mut rng);
        let dir_rename = matches!(&op, Op::Rename { from, .. } if is_dir(&kern.join(from)));
        let ro = apply(&ovl, &op, true);
        let rk = apply(&kern, &op, true);
        run.history.push(format!(
            "  {step:4}: {op:?} => {} / {}",
            show(&ro),
            show(&rk)
        ));
        let what = |note: &str| {
            format!(
                "op: {op:?}\n  ovl:    {}\n  kernel: {}\n{note}",
                show(&ro),
                show(&rk)
            )
        };
        if ro != rk {
            run.fail(step, &what("results differ"));
        }
        if dir_rename && rk.is_ok() {
            run.dir_renames += 1;
        }
        if step % CHECK_EVERY == 0 {
            run.compare_trees(step, &ovl, &kern, "periodic check");
        }
    }
    run.compare_trees(ops, &ovl, &kern, "end of run");
    let mut m = m;
    m.remount();
    run.compare_trees(ops, &ovl, &kern, "end of run, after remounting ovl");
    m.umount();
    // The upper ovl wrote, mounted by the kernel (redirect_dir=on), shows the same tree.
    {
        let d = |n: &str| m.root.path().join(n);
        fs::create_dir(d("kwork")).unwrap();
        fs::create_dir(d("kmnt")).unwrap();
        let km = KernelMount::with_options(
            &[&m.lower],
            &m.upper,
            &d("kwork"),
            &d("kmnt"),
            "redirect_dir=on,index=on",
        );
        // Without nlink: the kernel counts the link ovl keeps in its hard-link index (see
        // README, Known differences).
        run.compare_trees_with(
            ops,
            &km.mnt,
            &kern,
            "the kernel mounting ovl's upper",
            false,
        );
    }
    if image {
        // An image is never written: its upper is committed by packing the merged view
        // (app.run's commit, tested in tests/bundle.rs).
        return run.dir_renames;
    }
    // Committed (the seeds take turns at both ways), the lower is the tree the mounts showed.
    let action = if seed % 2 == 0 {
        ovl::OverlayAction::Commit
    } else {
        ovl::OverlayAction::CommitAtomic
    };
    let mut ofs = ovl::OverlayFS::new(&m.lower);
    ofs.set_upper(&m.upper).set_workdir(&m.work);
    if let Err(e) = ofs.overlay_action(action) {
        run.fail(ops, &format!("{action:?} of ovl's upper failed: {e}"));
    }
    run.compare_trees(ops, &m.lower, &kern, &format!("the lower after {action:?}"));
    run.dir_renames
}

/// Runs each seed, catching failures so every failing seed is reported.
fn run_seeds(seeds: impl IntoIterator<Item = u64>) {
    run_seeds_on(seeds, false)
}

fn run_seeds_on(seeds: impl IntoIterator<Item = u64>, image: bool) {
    if !is_root() {
        eprintln!("skipping differential test: needs root (FUSE and kernel overlayfs mounts)");
        return;
    }
    let ops = env_u64("OVL_DIFF_OPS").map_or(OPS, |n| n as usize);
    let mut failed = Vec::new();
    for seed in seeds {
        let r = std::panic::catch_unwind(|| run_seed(seed, ops, image));
        match r {
            Ok(dir_renames) => {
                eprintln!("seed {seed}: {ops} steps match ({dir_renames} directory renames)")
            }
            Err(_) => failed.push(seed),
        }
    }
    assert!(
        failed.is_empty(),
        "failing seeds: {failed:?} (details above)"
    );
}

#[test]
fn differential_vs_kernel_overlayfs() {
    if let Some(seed) = env_u64("OVL_DIFF_SEED") {
        return run_seeds([seed]);
    }
    let n = env_u64("OVL_DIFF_SEEDS").unwrap_or(SEEDS);
    run_seeds(1..=n);
}

/// The same random operations with ovl's lower read in place from an image of the lower
/// tree (as app.run serves its payload), against the kernel's overlay of the directory.
#[test]
fn differential_image_lower_vs_kernel_overlayfs() {
    if let Some(seed) = env_u64("OVL_DIFF_SEED") {
        return run_seeds_on([seed], true);
    }
    let n = env_u64("OVL_DIFF_SEEDS").unwrap_or(SEEDS / 2);
    run_seeds_on(101..=100 + n, true);
}

/// Directory renames the kernel records as redirects (relative within a directory, absolute
/// across directories, under a new opaque directory, nested, renamed again, exchanged).
fn kernel_dir_renames(m: &Path) {
    let r = |a: &str, b: &str| fs::rename(m.join(a), m.join(b)).unwrap();
    r("d1", "n1"); // relative redirect "d1"
    r("d2/sub", "top"); // absolute "/d2/sub"
    fs::create_dir(m.join("d1")).unwrap(); // a new opaque d1 over the whiteout
    r("n1/d", "d1/dd"); // absolute "/d1/d", under an opaque directory
    r("top", "n1/top2"); // already absolute: kept
    r("d3", "d4"); // over an empty lower-less name
    renameat2(&m.join("n1"), &m.join("d4"), libc::RENAME_EXCHANGE).unwrap();
    r("d1", "d5"); // a new directory holding a redirected one: moved as it is
}

/// Regression (issue 11, item 5): an upper written by the kernel with redirect_dir=on, mounted
/// by ovl, shows every renamed directory with its lower content exactly as the kernel does
/// (ovl showed them empty, the redirects unread).
#[test]
fn kernel_redirected_upper_reads_the_same() {
    if !is_root() {
        eprintln!("skipping: needs root (kernel overlayfs and FUSE mounts)");
        return;
    }
    let root = tempfile::Builder::new()
        .prefix("ovl-redir")
        .tempdir()
        .unwrap();
    let d = |n: &str| root.path().join(n);
    for n in ["lower", "upper", "work", "kmnt", "owork", "omnt"] {
        fs::create_dir(d(n)).unwrap();
    }
    setup_lower(&d("lower"));
    let want = {
        let km = KernelMount::with_options(
            &[&d("lower")],
            &d("upper"),
            &d("work"),
            &d("kmnt"),
            "redirect_dir=on,index=on",
        );
        kernel_dir_renames(&km.mnt);
        walk(&km.mnt, true).unwrap()
    };
    assert!(
        lgetxattr(&d("upper/d4"), "trusted.overlay.redirect").is_ok(),
        "the kernel wrote no redirect: the test would prove nothing"
    );
    let mut ofs = ovl::OverlayFS::new(d("lower"));
    ofs.set_upper(d("upper"))
        .set_workdir(d("owork"))
        .set_mountpoint(d("omnt"));
    ofs.mount().expect("mount");
    let got = walk(&d("omnt"), true).unwrap();
    ofs.umount().unwrap();
    let dd = diff("ovl", &got, "kernel", &want);
    assert!(
        dd.is_empty(),
        "ovl shows the kernel's upper differently:\n{dd}"
    );
    // The renamed directories really carry lower content (the comparison is not vacuous).
    assert_eq!(want["d4/x"].data.as_deref(), Some("x-one"));
    assert_eq!(want["d4/top2/z"].data.as_deref(), Some("zeta"));
}

/// Redirects in a lower layer (a kernel-written upper stacked as the middle layer) change where
/// the layers below are searched, as in the kernel: the same stack mounted by both shows the
/// same tree.
#[test]
fn redirects_in_lower_layers_read_the_same() {
    if !is_root() {
        eprintln!("skipping: needs root (kernel overlayfs and FUSE mounts)");
        return;
    }
    let root = tempfile::Builder::new()
        .prefix("ovl-redir2")
        .tempdir()
        .unwrap();
    let d = |n: &str| root.path().join(n);
    for n in [
        "lower", "mid", "work", "kmnt", "up", "kwork2", "kmnt2", "oup", "owork", "omnt",
    ] {
        fs::create_dir(d(n)).unwrap();
    }
    setup_lower(&d("lower"));
    let km = KernelMount::with_options(
        &[&d("lower")],
        &d("mid"),
        &d("work"),
        &d("kmnt"),
        "redirect_dir=on,index=on",
    );
    kernel_dir_renames(&km.mnt);
    drop(km);
    let want = {
        let km = KernelMount::with_options(
            &[&d("mid"), &d("lower")],
            &d("up"),
            &d("kwork2"),
            &d("kmnt2"),
            "redirect_dir=on",
        );
        walk(&km.mnt, false).unwrap()
    };
    let mut ofs = ovl::OverlayFS::new(d("mid"));
    ofs.add_lower(d("lower"))
        .set_upper(d("oup"))
        .set_workdir(d("owork"))
        .set_mountpoint(d("omnt"));
    ofs.mount().expect("mount");
    let got = walk(&d("omnt"), false).unwrap();
    ofs.umount().unwrap();
    let dd = diff("ovl", &got, "kernel", &want);
    assert!(dd.is_empty(), "ovl shows the stack differently:\n{dd}");
    assert_eq!(want["d4/x"].data.as_deref(), Some("x-one"));
}

// ---------------------------------------------------------------------------------------------
// ovl-run's kernel backend against the plain kernel overlay

/// An `ovl-run --backend kernel --mountpoint MNT -- sh -c 'echo $$; read x; exit 0'` whose command
/// waits: the steps are applied to its mount through `/proc/PID/root/MNT` (the mount lives in
/// the run's private namespace). Closing the command's stdin ends the run (which finalizes).
struct KernelRun {
    child: std::process::Child,
    view: std::path::PathBuf,
}

impl KernelRun {
    fn start(lower: &Path, mnt: &Path, cache: &Path, on_exit: &str) -> KernelRun {
        use std::io::BufRead;
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_ovl-run"))
            .env("XDG_CACHE_HOME", cache)
            .env_remove("OVL_RUN_BACKEND")
            .args(["-q", "--backend", "kernel", "--lower"])
            .arg(lower)
            .arg("--mountpoint")
            .arg(mnt)
            .args([
                "--on-exit",
                on_exit,
                "--",
                "sh",
                "-c",
                "echo $$; read x; exit 0",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ovl-run");
        let mut line = String::new();
        io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let pid: u32 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("ovl-run's command printed {line:?}"));
        let view = Path::new(&format!("/proc/{pid}/root")).join(mnt.strip_prefix("/").unwrap());
        assert!(
            common::backend::is_kernel_overlay(&view),
            "{} is not the kernel's overlay",
            view.display()
        );
        KernelRun { child, view }
    }

    /// Ends the command; ovl-run unmounts and finalizes. Its exit status.
    fn finish(mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        self.child.wait().unwrap()
    }
}

impl Drop for KernelRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The finalizations the seeds take turns at.
const FINALIZATIONS: [&str; 3] = ["preserve", "commit", "commit-atomic"];

fn run_kernel_backend_seed(seed: u64, ops: usize) -> usize {
    let root = tempfile::Builder::new()
        .prefix("ovl-diff-run")
        .tempdir()
        .unwrap();
    let d = |n: &str| root.path().join(n);
    for n in ["lower", "mnt", "cache", "fwork", "fmnt"] {
        fs::create_dir(d(n)).unwrap();
    }
    setup_lower(&d("lower"));
    let on_exit = FINALIZATIONS[seed as usize % 3];
    let r = KernelRun::start(&d("lower"), &d("mnt"), &d("cache"), on_exit);
    // The reference: the kernel's overlay with the options ovl-run gives it (README).
    let k = {
        let kroot = tempfile::Builder::new()
            .prefix("ovl-diff-kernel")
            .tempdir()
            .unwrap();
        let kd = |n: &str| kroot.path().join(n);
        for n in ["lower", "upper", "work", "mnt"] {
            fs::create_dir(kd(n)).unwrap();
        }
        setup_lower(&kd("lower"));
        let km = KernelMount::with_options(
            &[&kd("lower")],
            &kd("upper"),
            &kd("work"),
            &kd("mnt"),
            "redirect_dir=on,index=off,metacopy=off",
        );
        KernelSide { km, _root: kroot }
    };
    let (run_mnt, kern) = (r.view.clone(), k.km.mnt.clone());
    let mut run = Run {
        seed,
        history: Vec::new(),
        dir_renames: 0,
    };
    run.compare_trees(0, &run_mnt, &kern, "before any step");
    let mut rng = StdRng::seed_from_u64(seed);
    for step in 1..=ops {
        let op = gen_op(&mut rng);
        let dir_rename = matches!(&op, Op::Rename { from, .. } if is_dir(&kern.join(from)));
        let ro = apply(&run_mnt, &op, true);
        let rk = apply(&kern, &op, true);
        run.history.push(format!(
            "  {step:4}: {op:?} => {} / {}",
            show(&ro),
            show(&rk)
        ));
        if ro != rk {
            run.fail(
                step,
                &format!(
                    "op: {op:?}\n  ovl-run: {}\n  kernel:  {}\nresults differ",
                    show(&ro),
                    show(&rk)
                ),
            );
        }
        if dir_rename && rk.is_ok() {
            run.dir_renames += 1;
        }
        if step % CHECK_EVERY == 0 {
            run.compare_trees(step, &run_mnt, &kern, "periodic check");
        }
    }
    run.compare_trees(ops, &run_mnt, &kern, "end of run");
    let st = r.finish();
    if !st.success() {
        run.fail(ops, &format!("ovl-run --on-exit {on_exit} exited {st:?}"));
    }
    // Without nlink from here on: a lower file with two names whose one name was copied up
    // is two files in the kernel's view (index=off), one of them still linked in the lower.
    if on_exit == "preserve" {
        // ovl's FUSE engine mounts what the kernel left and shows the same tree; then the
        // library commits it.
        let mut ofs = ovl::OverlayFS::new(d("lower"));
        ofs.set_upper(d("lower_upper"))
            .set_workdir(d("fwork"))
            .set_mountpoint(d("fmnt"));
        if let Err(e) = ofs.mount() {
            run.fail(ops, &format!("mounting the kernel's upper with ovl: {e}"));
        }
        run.compare_trees_with(ops, &d("fmnt"), &kern, "ovl mounting the upper", false);
        ofs.umount().unwrap();
        if let Err(e) = ofs.overlay_action(ovl::OverlayAction::Commit) {
            run.fail(ops, &format!("committing the kernel's upper: {e}"));
        }
    }
    run.compare_trees_with(
        ops,
        &d("lower"),
        &kern,
        &format!("the lower after {on_exit}"),
        false,
    );
    // Nothing of the overlay's in the committed lower.
    for (p, _) in walk(&d("lower"), false).unwrap() {
        let path = d("lower").join(&p);
        for x in llistxattr(&path).unwrap() {
            if x.contains("overlay.") {
                run.fail(ops, &format!("{p}: {x} in the committed lower"));
            }
        }
    }
    run.dir_renames
}

/// ovl-run's kernel backend (its mount options, its private namespace, then every
/// finalization) against the plain kernel overlay with the same options: the same seeded
/// steps give the same errno and data at every step and the same trees; what the run leaves
/// is that tree (committed in place or atomically by ovl-run, or preserved: then ovl's FUSE
/// engine mounts it and shows it, and the library commits it), with no overlay xattr in the
/// lower. Skipped, saying so, where the kernel cannot serve ovl-run.
#[test]
fn ovl_run_kernel_backend_vs_kernel_overlayfs() {
    if !is_root() {
        eprintln!("skipping: needs root (kernel overlayfs mounts)");
        return;
    }
    if common::backend::kernel_for_root() != "kernel" {
        eprintln!("skipping: the kernel's overlay cannot serve ovl-run here");
        return;
    }
    let ops = env_u64("OVL_DIFF_OPS").map_or(OPS, |n| n as usize);
    let seeds: Vec<u64> = match env_u64("OVL_DIFF_SEED") {
        Some(s) => vec![s],
        None => (1..=env_u64("OVL_DIFF_SEEDS").unwrap_or(6)).collect(),
    };
    let mut failed = Vec::new();
    for seed in seeds {
        match std::panic::catch_unwind(|| run_kernel_backend_seed(seed, ops)) {
            Ok(n) => eprintln!(
                "seed {seed}: {ops} steps match ({n} directory renames), {}",
                FINALIZATIONS[seed as usize % 3]
            ),
            Err(_) => failed.push(seed),
        }
    }
    assert!(
        failed.is_empty(),
        "failing seeds: {failed:?} (details above)"
    );
}
