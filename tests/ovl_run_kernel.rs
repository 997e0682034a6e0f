//! `ovl-run --backend kernel|auto`: the kernel's overlay in the run's private namespace. Every
//! finalization on what it leaves (and a FUSE run reading it), a commit crashed at every step
//! and finished by the next run, `--root`, a normal user, and auto's fallback to FUSE where
//! the kernel refuses (an upper on an overlay, an option only FUSE has).
//!
//! Skipped, saying so, where the kernel's overlay cannot be mounted.
//!
//! This target also runs the whole `tests/ovl_run` suite again (module `suite`), every
//! ovl-run of it on the kernel backend (`tests/ovl_run/main.rs` says how).

#[path = "ovl_run/main.rs"]
mod suite;
use common::*;
use suite::common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

// The suite included here knows it is the kernel backend's build (it tells by this target's
// crate name): renaming the target must not quietly run it on FUSE again.
const _: () = assert!(
    suite::ON_KERNEL,
    "tests/ovl_run/main.rs: ON_KERNEL names this target"
);

const BIN: &str = env!("CARGO_BIN_EXE_ovl-run");
const USER: &str = "ovl-test";

/// A test's own directory: `lower` (with `f` and `sub/g`) and a cache dir for mount points.
struct World {
    _t: tempfile::TempDir,
    root: PathBuf,
    lower: PathBuf,
}

impl World {
    fn new() -> Self {
        let t = tempfile::Builder::new()
            .prefix("ovl-run-kernel")
            .tempdir()
            .unwrap();
        let root = t.path().canonicalize().unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let lower = root.join("lower");
        fs::create_dir_all(lower.join("sub")).unwrap();
        fs::write(lower.join("f"), "lower\n").unwrap();
        fs::write(lower.join("sub/g"), "g\n").unwrap();
        World { root, lower, _t: t }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn upper(&self) -> PathBuf {
        self.p("lower_upper")
    }

    fn work(&self) -> PathBuf {
        self.p(".lower_upper.ovl-work")
    }

    /// `ovl-run -v --backend BACKEND --lower LOWER OPTS... -- sh -c SCRIPT` as root.
    fn sh(&self, backend: &str, opts: &[&str], script: &str) -> Out {
        let mut c = Command::new(BIN);
        c.current_dir(&self.root)
            .env("XDG_CACHE_HOME", self.p("cache"))
            .env_remove("RUST_LOG")
            .env_remove("OVL_RUN_BACKEND")
            .args(["-v", "--backend", backend, "--lower"])
            .arg(&self.lower)
            .args(opts)
            .args(["--", "sh", "-c", script]);
        run(c)
    }
}

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(mut c: Command) -> Out {
    let out = c
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {c:?}: {e}"));
    use std::os::unix::process::ExitStatusExt;
    Out {
        code: out
            .status
            .code()
            .unwrap_or_else(|| 128 + out.status.signal().unwrap_or(0)),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Asserts a run succeeded on `backend` (what `-v` reports).
fn ok_on(o: &Out, backend: &str) {
    assert_eq!(o.code, 0, "{o:?}");
    assert!(
        o.stderr.contains(&format!("backend: {backend}")),
        "not on {backend}: {o:?}"
    );
}

/// Whether the kernel's overlay can be mounted here (as root, in a private namespace).
fn kernel_or_skip() -> bool {
    if !is_root() {
        eprintln!("skipping: needs root (mounts, test user)");
        return false;
    }
    let w = World::new();
    let o = w.sh("kernel", &[], "true");
    if o.code != 0 {
        eprintln!("skipping: the kernel's overlay cannot be mounted here: {o:?}");
        return false;
    }
    true
}

/// The tree below `dir`: `path kind content` per entry, sorted (xattrs aside).
fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let md = p.symlink_metadata().unwrap();
            let ft = md.file_type();
            if ft.is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &p, out);
            } else if ft.is_char_device() {
                out.push(format!("{rel} c{}", md.rdev()));
            } else {
                out.push(format!(
                    "{rel} {}",
                    fs::read_to_string(&p).unwrap_or_default().trim()
                ));
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, dir, &mut v);
    v.sort();
    v
}

fn xattr_of(p: &Path, name: &str) -> Option<Vec<u8>> {
    xattr::get(p, name).ok().flatten()
}

#[test]
fn kernel_backend_finalizations_as_root() {
    if !kernel_or_skip() {
        return;
    }
    let w = World::new();
    // The command sees the kernel's overlay; a lower directory is renamed with a redirect.
    let o = w.sh(
        "kernel",
        &[],
        "stat -f -c %T . && mv sub sub2 && rm f && echo new > n",
    );
    ok_on(&o, "kernel");
    assert_eq!(o.stdout, "overlayfs\n");
    assert!(o.stderr.contains("preserved 4 changes"), "{o:?}");
    let up = w.upper();
    assert_eq!(tree(&up), ["f c0", "n new", "sub c0", "sub2/"]);
    assert_eq!(
        xattr_of(&up.join("sub2"), "trusted.overlay.redirect").as_deref(),
        Some(&b"sub"[..])
    );
    // A run that changes nothing counts no change (the kernel's whiteouts share one inode,
    // whose name in the kernel's work dir must not be left for the next mount to remove).
    let o = w.sh("kernel", &[], "cat n");
    ok_on(&o, "kernel");
    assert!(o.stderr.contains("preserved 0 changes"), "{o:?}");
    // ovl's FUSE engine reads what the kernel left, redirect included.
    let o = w.sh("fuse", &[], "stat -f -c %T . && ls && cat sub2/g");
    ok_on(&o, "fuse");
    assert_eq!(o.stdout, "fuseblk\nn\nsub2\ng\n");
    // Discard: the kept upper is a lower of the kernel's overlay and stays as it was.
    let o = w.sh(
        "kernel",
        &["--on-exit", "discard"],
        "cat n sub2/g && echo d > d && rm n",
    );
    ok_on(&o, "kernel");
    assert_eq!(o.stdout, "new\ng\n");
    assert_eq!(tree(&up), ["f c0", "n new", "sub c0", "sub2/"]);
    let leftovers: Vec<_> = fs::read_dir(&w.root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("scratch"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Commit: the rename lands as a move, the whiteout deletes.
    let g_ino = fs::metadata(w.lower.join("sub/g")).unwrap().ino();
    let o = w.sh("kernel", &["--on-exit", "commit"], "echo more >> n");
    ok_on(&o, "kernel");
    assert_eq!(tree(&w.lower), ["n new\nmore", "sub2/", "sub2/g g"]);
    assert_eq!(fs::metadata(w.lower.join("sub2/g")).unwrap().ino(), g_ino);
    assert!(!up.exists());
    // Commit-atomic.
    let o = w.sh(
        "kernel",
        &["--on-exit", "commit-atomic"],
        "echo x > x && rm -r sub2",
    );
    ok_on(&o, "kernel");
    assert_eq!(tree(&w.lower), ["n new\nmore", "x x"]);
    // Discard-all: the upper and the work dir (the kernel's inside it) go.
    let o = w.sh("kernel", &[], "echo y > y");
    ok_on(&o, "kernel");
    assert!(w.work().join("kernel").is_dir());
    let o = w.sh("kernel", &["--on-exit", "discard-all"], "cat y");
    ok_on(&o, "kernel");
    assert_eq!(o.stdout, "y\n");
    assert!(!up.exists() && !w.work().exists());
    assert_eq!(tree(&w.lower), ["n new\nmore", "x x"]);
    // No mount point left behind.
    let cache: Vec<_> = fs::read_dir(w.p("cache")).unwrap().flatten().collect();
    assert!(cache.is_empty(), "{cache:?}");
}

/// A commit killed after each of its durable steps (`OVL_COMMIT_CRASH_AFTER`, the commit
/// tests' hook) is finished or rolled back by the next kernel-backend run, which then
/// commits what is left: the lower ends as one clean commit would leave it.
#[test]
fn kernel_backend_commit_crash_recovery() {
    if !kernel_or_skip() {
        return;
    }
    let want = ["f changed", "n new", "sub2/", "sub2/g g"];
    for n in 1.. {
        let w = World::new();
        let o = w.sh(
            "kernel",
            &[],
            "echo changed > f && echo new > n && mv sub sub2",
        );
        ok_on(&o, "kernel");
        let mut c = Command::new(BIN);
        c.current_dir(&w.root)
            .env("XDG_CACHE_HOME", w.p("cache"))
            .env("OVL_COMMIT_CRASH_AFTER", n.to_string())
            .args(["--backend", "kernel", "--on-exit", "commit", "--lower"])
            .arg(&w.lower)
            .args(["--", "true"]);
        let crashed = run(c);
        let o = w.sh("kernel", &["--on-exit", "commit"], "cat f n sub2/g");
        ok_on(&o, "kernel");
        assert_eq!(o.stdout, "changed\nnew\ng\n", "crash after {n}");
        assert_eq!(tree(&w.lower), want, "crash after {n}: {crashed:?}");
        assert!(!w.upper().exists(), "crash after {n}");
        if crashed.code == 0 {
            assert!(n > 2, "the commit never crashed");
            break;
        }
        assert!(n < 100, "still crashing after {n} steps");
    }
}

fn busybox_rootfs(w: &World) -> PathBuf {
    let r = w.p("rootfs");
    for d in ["bin", "etc", "proc", "dev", "sys", "tmp"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", r.join("bin/busybox")).unwrap();
    for l in ["sh", "cat", "ls", "id"] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(l)).unwrap();
    }
    fs::write(r.join("etc/hostname"), "lower\n").unwrap();
    r
}

#[test]
fn kernel_backend_root_session() {
    if !kernel_or_skip() {
        return;
    }
    if !Path::new("/bin/busybox").exists() {
        eprintln!("skipping: needs /bin/busybox (apt-get install busybox-static)");
        return;
    }
    let w = World::new();
    let rootfs = busybox_rootfs(&w);
    let mut c = Command::new(BIN);
    c.current_dir(&w.root)
        .env("XDG_CACHE_HOME", w.p("cache"))
        .env_remove("OVL_RUN_BACKEND")
        .args(["-v", "--backend", "kernel", "--root", "--lower"])
        .arg(&rootfs)
        .args([
            "--",
            "sh",
            "-c",
            "cat /proc/self/mounts | while read dev dir t rest; do [ $dir = / ] && echo $t; \
             done; echo $$; echo upper > /etc/hostname; ls /tmp | wc -l",
        ]);
    let o = run(c);
    ok_on(&o, "kernel");
    // The kernel's overlay as `/`, the session's own PID namespace, a fresh /tmp.
    let lines: Vec<_> = o.stdout.lines().collect();
    assert_eq!(
        (lines.len(), lines[0], lines[2]),
        (3, "overlay", "0"),
        "{o:?}"
    );
    let pid: u32 = lines[1].parse().unwrap();
    assert!(pid < 10, "not in its own PID namespace: {o:?}");
    assert_eq!(
        fs::read_to_string(w.p("rootfs_upper/etc/hostname")).unwrap(),
        "upper\n"
    );
    assert_eq!(
        fs::read_to_string(rootfs.join("etc/hostname")).unwrap(),
        "lower\n"
    );
}

// ---------------------------------------------------------------------------------------------
// A normal user

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, name]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// The test user (tests/ovl_run.rs and tests/nonroot.rs make the same one, maybe right now).
fn ensure_user() -> (u32, u32) {
    if let Some(ids) = user_ids(USER) {
        return ids;
    }
    let _ = Command::new("useradd")
        .args(["-M", "-s", "/bin/sh", USER])
        .status();
    for _ in 0..1000 {
        if let Some(ids) = user_ids(USER) {
            return ids;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no test user {USER}");
}

fn chown_tree(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
    if p.symlink_metadata().unwrap().is_dir() {
        for e in fs::read_dir(p).unwrap().flatten() {
            chown_tree(&e.path(), uid, gid);
        }
    }
}

/// As the test user: `ovl-run -v --backend BACKEND --lower LOWER OPTS... -- sh -c SCRIPT`.
fn user_sh(w: &World, bin: &Path, backend: &str, opts: &[&str], script: &str) -> Out {
    let mut c = Command::new("runuser");
    c.current_dir(&w.root)
        .env_remove("RUST_LOG")
        .env_remove("OVL_RUN_BACKEND")
        .args(["-u", USER, "--", "env"])
        .arg(format!("XDG_CACHE_HOME={}", w.p("cache").display()))
        .arg(bin)
        .args(["-v", "--backend", backend, "--lower"])
        .arg(&w.lower)
        .args(opts)
        .args(["--", "sh", "-c", script]);
    run(c)
}

#[test]
fn kernel_backend_as_a_normal_user() {
    if !kernel_or_skip() {
        return;
    }
    let (uid, gid) = ensure_user();
    let w = World::new();
    let bin = w.p("ovl-run");
    fs::copy(BIN, &bin).unwrap();
    fs::create_dir_all(w.p("cache")).unwrap();
    chown_tree(&w.root, uid, gid);
    // In a user namespace the kernel needs userxattr; renaming a lower directory is EXDEV
    // there (redirect_dir=nofollow), so mv copies it.
    let o = user_sh(
        &w,
        &bin,
        "kernel",
        &[],
        "stat -f -c %T . && id -u && rm f && echo new > n && mv sub sub2 && ls",
    );
    ok_on(&o, "kernel");
    assert_eq!(o.stdout, format!("overlayfs\n{uid}\nn\nsub2\n"));
    let up = w.upper();
    assert_eq!(tree(&up), ["f c0", "n new", "sub c0", "sub2/", "sub2/g g"]);
    assert_eq!(fs::metadata(up.join("n")).unwrap().uid(), uid);
    // The FUSE engine reads it as the user; a discard run on the kernel leaves it as it was.
    let o = user_sh(&w, &bin, "fuse", &[], "ls && cat sub2/g");
    ok_on(&o, "fuse");
    assert_eq!(o.stdout, "n\nsub2\ng\n");
    let o = user_sh(&w, &bin, "kernel", &["--on-exit", "discard"], "rm n && ls");
    ok_on(&o, "kernel");
    assert_eq!(o.stdout, "sub2\n");
    assert_eq!(tree(&up), ["f c0", "n new", "sub c0", "sub2/", "sub2/g g"]);
    // Commit as the user.
    let o = user_sh(&w, &bin, "kernel", &["--on-exit", "commit"], "echo x > x");
    ok_on(&o, "kernel");
    assert_eq!(tree(&w.lower), ["n new", "sub2/", "sub2/g g", "x x"]);
    assert!(!up.exists());
}

/// A directory a FUSE run as a normal user renamed (`user.overlay.redirect`) would be refused
/// by the kernel's overlay in a user namespace: auto stays on FUSE, kernel refuses to start.
#[test]
fn user_upper_with_redirects_stays_on_fuse() {
    if !kernel_or_skip() {
        return;
    }
    let (uid, gid) = ensure_user();
    let w = World::new();
    let bin = w.p("ovl-run");
    fs::copy(BIN, &bin).unwrap();
    fs::create_dir_all(w.p("cache")).unwrap();
    chown_tree(&w.root, uid, gid);
    let o = user_sh(&w, &bin, "fuse", &[], "mv sub sub2");
    ok_on(&o, "fuse");
    assert!(xattr_of(&w.upper().join("sub2"), "user.overlay.redirect").is_some());
    let o = user_sh(&w, &bin, "auto", &["--on-exit", "discard"], "cat sub2/g");
    ok_on(&o, "fuse");
    assert_eq!(o.stdout, "g\n");
    assert!(
        o.stderr.contains("sub2: renamed by an earlier run"),
        "{o:?}"
    );
    let o = user_sh(&w, &bin, "kernel", &[], "cat sub2/g");
    assert_eq!(o.code, 125, "{o:?}");
    assert_eq!(
        o.stderr.trim(),
        format!(
            "ovl-run: {}: renamed by an earlier run (user.overlay.redirect), which the kernel's \
             overlay refuses in a user namespace: use --backend fuse or auto",
            w.upper().join("sub2").display()
        )
    );
    assert_eq!(tree(&w.upper()), ["sub c0", "sub2/"]);
}

/// A lower file with two names, copied up through one by a FUSE run: ovl's engine indexes the
/// link (WORK/ovl-index) and shows the other name as the copy too, where the kernel's overlay
/// (index=off) would show it with the lower's old content. auto stays on FUSE for such an
/// upper (and says why with -v), kernel refuses to start; nothing changes either way.
#[test]
fn upper_with_indexed_hard_links_stays_on_fuse() {
    if !kernel_or_skip() {
        return;
    }
    let w = World::new();
    fs::hard_link(w.lower.join("f"), w.lower.join("sub/f2")).unwrap();
    let o = w.sh("fuse", &[], "echo more >> f");
    ok_on(&o, "fuse");
    let index = w.work().join("ovl-index");
    assert_eq!(fs::read_dir(&index).unwrap().count(), 1);
    let o = w.sh("auto", &[], "stat -f -c %T . && cat sub/f2");
    ok_on(&o, "fuse");
    assert_eq!(o.stdout, "fuseblk\nlower\nmore\n");
    assert!(
        o.stderr.contains(&format!(
            "{}: hard links of lower files that ovl's engine copied up",
            index.display()
        )),
        "{o:?}"
    );
    let before = tree(&w.upper());
    let o = w.sh("kernel", &[], "cat sub/f2");
    assert_eq!((o.code, o.stdout.as_str()), (125, ""), "{o:?}");
    assert!(
        o.stderr
            .trim()
            .starts_with(&format!("ovl-run: {}: hard links", index.display()))
            && o.stderr.trim().ends_with("use --backend fuse or auto"),
        "{o:?}"
    );
    assert_eq!(tree(&w.upper()), before);
    // Committed (on FUSE), the lower has both names as one file again, and runs are on the
    // kernel from then on.
    let o = w.sh("auto", &["--on-exit", "commit"], "true");
    ok_on(&o, "fuse");
    let o = w.sh("auto", &[], "stat -f -c %T . && cat sub/f2");
    ok_on(&o, "kernel");
    assert_eq!(o.stdout, "overlayfs\nlower\nmore\n");
}

// ---------------------------------------------------------------------------------------------
// auto

/// Where the kernel refuses the mount (an upper on an overlay: the kernel takes no overlay as
/// upper filesystem), auto runs on FUSE, and `--backend kernel` fails with one line, leaving
/// nothing.
#[test]
fn auto_falls_back_to_fuse_where_the_kernel_refuses() {
    if !kernel_or_skip() {
        return;
    }
    let w = World::new();
    for d in ["base/l", "base/u", "base/w", "base/m"] {
        fs::create_dir_all(w.p(d)).unwrap();
    }
    let ovl_run = |backend: &str, upper: &str| {
        format!(
            "{BIN} -v --backend {backend} --lower {} --upper {}/base/m/{upper} -- sh -c \
             'echo n > n && rm f && stat -f -c %T .'; echo rc=$?",
            w.lower.display(),
            w.root.display()
        )
    };
    // In a mount namespace of the test's own: a kernel overlay, the upper inside it.
    let script = format!(
        "mount -t overlay overlay -o lowerdir={r}/base/l,upperdir={r}/base/u,workdir={r}/base/w \
         {r}/base/m && {} && {} && ls -A {r}/base/m",
        ovl_run("auto", "up"),
        ovl_run("kernel", "up2"),
        r = w.root.display()
    );
    let mut c = Command::new("unshare");
    c.current_dir(&w.root)
        .env("XDG_CACHE_HOME", w.p("cache"))
        .env_remove("OVL_RUN_BACKEND")
        .args(["-m", "sh", "-c", &script]);
    let o = run(c);
    assert_eq!(o.code, 0, "{o:?}");
    // auto: on FUSE, work done; kernel: 125, nothing made.
    assert_eq!(
        o.stdout, "fuseblk\nrc=0\nrc=125\n.up.ovl-work\nup\n",
        "{o:?}"
    );
    assert!(
        o.stderr.contains("the kernel refused") && o.stderr.contains("backend: fuse"),
        "{o:?}"
    );
    let lines: Vec<_> = o
        .stderr
        .lines()
        .filter(|l| l.starts_with("ovl-run:"))
        .collect();
    assert_eq!(lines.len(), 2, "{o:?}");
    assert!(
        lines[1].contains("/base/m/up2: the kernel refused")
            && lines[1].ends_with("use --backend fuse"),
        "{o:?}"
    );
    // FUSE's whiteout on an overlay upper (which refuses a 0/0 device) is a `.wh.` file.
    assert_eq!(tree(&w.p("base/u/up")), [".wh.f ", "n n"]);
}

/// An option only the FUSE engine has: auto serves it on FUSE, kernel refuses it up front.
/// Without `--backend` or `$OVL_RUN_BACKEND`, a run is auto's.
#[test]
fn auto_uses_fuse_for_fuse_only_options() {
    if !kernel_or_skip() {
        return;
    }
    let w = World::new();
    let o = w.sh("kernel", &["--inode-mode", "persistent"], "true");
    assert_eq!(o.code, 125, "{o:?}");
    assert_eq!(
        o.stderr.trim(),
        "ovl-run: --backend kernel: --inode-mode persistent is the FUSE engine's only: use \
         --backend fuse or auto"
    );
    assert!(!w.upper().exists() && !w.work().exists());
    let o = w.sh("auto", &["--inode-mode", "persistent"], "stat -f -c %T .");
    ok_on(&o, "fuse");
    assert_eq!(o.stdout, "fuseblk\n");
    let o = w.sh("auto", &[], "stat -f -c %T .");
    ok_on(&o, "kernel");
    assert_eq!(o.stdout, "overlayfs\n");
    // The default is auto: on the kernel here, and -v says so.
    let mut c = Command::new(BIN);
    c.current_dir(&w.root)
        .env("XDG_CACHE_HOME", w.p("cache"))
        .env_remove("OVL_RUN_BACKEND")
        .env_remove("RUST_LOG")
        .args(["-v", "--lower"])
        .arg(&w.lower)
        .args(["--", "stat", "-f", "-c", "%T", "."]);
    let o = run(c);
    ok_on(&o, "kernel");
    assert_eq!(o.stdout, "overlayfs\n");
    // The default backend follows OVL_RUN_BACKEND.
    let mut c = Command::new(BIN);
    c.current_dir(&w.root)
        .env("XDG_CACHE_HOME", w.p("cache"))
        .env("OVL_RUN_BACKEND", "kernel")
        .args(["--lower"])
        .arg(&w.lower)
        .args(["--", "stat", "-f", "-c", "%T", "."]);
    let o = run(c);
    assert_eq!((o.code, o.stdout.as_str()), (0, "overlayfs\n"), "{o:?}");
}
