//! app.run bundles end to end: ovl-pack builds a bundle with the static runtime, and the tests
//! run it for real (FUSE mounts, as root and as a normal user), each in its own HOME, cache
//! and data directories.

mod common;
use common::is_root;
use common::user::{TEST_USER, ensure_test_user};

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

const PACK: &str = env!("CARGO_BIN_EXE_ovl-pack");
const USER: &str = TEST_USER;

/// The static runtime, built (or found up to date) once per test process by the same
/// script users run, into this build's target directory.
fn runtime() -> &'static Path {
    static RT: OnceLock<PathBuf> = OnceLock::new();
    RT.get_or_init(|| {
        let target = Path::new(PACK).parent().unwrap().parent().unwrap();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(repo.join("packaging/build-runtime.sh"))
            .env("CARGO_TARGET_DIR", target)
            .stderr(Stdio::inherit())
            .output()
            .expect("packaging/build-runtime.sh");
        assert!(out.status.success(), "building the static runtime failed");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

/// A test's world: its own HOME/XDG dirs and a small app (a shell script plus data files).
struct World {
    _t: tempfile::TempDir,
    root: PathBuf,
}

const APP_RUN: &str = r#"#!/bin/sh
# Test app: shows what it sees, keeps a counter in its own tree.
echo "args=$*"
echo "appdir=$APPDIR"
echo "bundle=$OVL_BUNDLE"
echo "appimage=$APPIMAGE"
echo "argv0=$ARGV0"
echo "owd=$OWD"
echo "pwd=$(pwd)"
echo "greeting=$(cat "$APPDIR/share/greeting.txt")"
n=$(cat "$APPDIR/state/count" 2>/dev/null || echo 0)
n=$((n+1))
echo $n > "$APPDIR/state/count"
echo "count=$n"
case "$1" in
    exit) exit "$2" ;;
    rm) rm "$APPDIR/share/$2" ;;
    sleep) exec sleep "$2" ;;
    touch) echo "$2" > "$APPDIR/state/$2"; sleep "$3" ;;
    append) echo more >> "$APPDIR/share/greeting.txt" ;;
    mv) mv "$APPDIR/share/$2" "$APPDIR/share/$3" ;;
    wait) echo "mine=$OVL_TEST_MINE"; echo "$2" > "$APPDIR/state/$2"; echo ready
          read x < "$3"; exit "$4" ;;
    write) echo "state=$(ls "$APPDIR/state" | tr '\n' ' ')"
           echo "$2" > "$APPDIR/state/$2"; exit "$3" ;;
esac
"#;

impl World {
    fn new() -> World {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        let app = root.join("app");
        for d in ["share/sub", "state", "bin", "home"] {
            let p = if d == "home" {
                root.join(d)
            } else {
                app.join(d)
            };
            fs::create_dir_all(p).unwrap();
        }
        fs::write(app.join("AppRun"), APP_RUN).unwrap();
        fs::set_permissions(app.join("AppRun"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(app.join("share/greeting.txt"), "hello bundle").unwrap();
        // Same content twice: stored once.
        fs::write(app.join("share/sub/copy.txt"), "hello bundle").unwrap();
        fs::write(app.join("share/big.bin"), pseudo_random(300_000)).unwrap();
        fs::write(app.join("share/empty"), "").unwrap();
        fs::hard_link(app.join("share/greeting.txt"), app.join("share/hard.txt")).unwrap();
        std::os::unix::fs::symlink("../share/greeting.txt", app.join("bin/link")).unwrap();
        fs::set_permissions(
            app.join("share/sub/copy.txt"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        xattr::set(app.join("share/greeting.txt"), "user.note", b"kept").unwrap();
        set_mtime(&app.join("share/greeting.txt"), 1_000_000_000);
        World { _t: t, root }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn pack(&self, args: &[&str]) -> Output {
        Command::new(PACK)
            .arg(self.p("app"))
            .args(args)
            .arg("--runtime")
            .arg(runtime())
            .output()
            .unwrap()
    }

    /// Builds `app.run` from the app.
    fn bundle(&self) -> PathBuf {
        let out = self.pack(&["-o", self.p("app.run").to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.p("app.run")
    }

    fn cmd(&self, bundle: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(bundle);
        c.args(args)
            .current_dir(&self.root)
            .env("HOME", self.p("home"))
            .env("XDG_CACHE_HOME", self.p("home/cache"))
            .env("XDG_DATA_HOME", self.p("home/data"))
            .stdin(Stdio::null());
        c
    }

    fn run(&self, bundle: &Path, args: &[&str]) -> Output {
        retry_busy(|| self.cmd(bundle, args).output())
    }

    fn upper(&self) -> PathBuf {
        self.p("home/data/ovl/app/upper")
    }

    fn cache(&self) -> PathBuf {
        self.p("home/cache/ovl/bundles")
    }

    /// Cached trees (ids), and whether any temporary extraction is left.
    fn cached(&self) -> (Vec<String>, bool) {
        let mut ids = Vec::new();
        let mut temps = false;
        if let Ok(rd) = fs::read_dir(self.cache()) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with('.') {
                    temps = true;
                } else if e.path().is_dir() {
                    ids.push(n);
                }
            }
        }
        ids.sort();
        (ids, temps)
    }
}

/// Runs `f` again while exec fails with ETXTBSY: a file this test just wrote can still be
/// open for a moment in a child another test thread forked (fds are copied until its exec).
fn retry_busy<T>(mut f: impl FnMut() -> std::io::Result<T>) -> T {
    for _ in 0..100 {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            r => return r.unwrap(),
        }
    }
    panic!("still ETXTBSY after 2 s");
}

/// Reads the child's stdout up to the first line starting with `prefix` and returns it.
fn first_line_starting(child: &mut std::process::Child, prefix: &str) -> String {
    use std::io::BufRead;
    let out = std::io::BufReader::new(child.stdout.take().expect("stdout piped"));
    for line in out.lines() {
        let line = line.unwrap();
        if line.starts_with(prefix) {
            return line;
        }
    }
    panic!("the child's output ended before a line starting with {prefix:?}");
}

fn spawn(c: &mut Command) -> std::process::Child {
    retry_busy(|| c.spawn())
}

fn output(c: &mut Command) -> Output {
    retry_busy(|| c.output())
}

fn pseudo_random(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn set_mtime(p: &Path, secs: i64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), [t, t].as_ptr(), 0) },
        0
    );
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The value of `key=` in the app's output.
fn field(o: &Output, key: &str) -> String {
    stdout(o)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
        .unwrap_or_else(|| panic!("no {key}= in output: {}{}", stdout(o), stderr(o)))
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// Flips one byte of a file in place.
fn flip(p: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    // A run's watcher process (the runtime, forked: it ends the app if the runtime is
    // killed) exits just after the runtime does, and executes the bundle until then.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let f = loop {
        match fs::OpenOptions::new().read(true).write(true).open(p) {
            Err(e)
                if e.raw_os_error() == Some(libc::ETXTBSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            r => break r.unwrap(),
        }
    };
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, at).unwrap();
}

fn runtime_len() -> u64 {
    fs::metadata(runtime()).unwrap().len()
}

#[test]
fn runtime_is_static_and_bundles_are_reproducible() {
    let out = Command::new("ldd").arg(runtime()).output().unwrap();
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(
        text.contains("statically linked") || text.contains("not a dynamic executable"),
        "ldd says: {text}"
    );
    let w = World::new();
    let a = w.bundle();
    let b = w.p("again.run");
    ok(&w.pack(&["-o", b.to_str().unwrap()]));
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
    let bytes = fs::read(&a).unwrap();
    assert!(bytes.starts_with(&fs::read(runtime()).unwrap()));
    assert!(bytes.ends_with(b"OVLTRAIL"));
    // The 300 kB of random data is stored once, and the two copies of the greeting once.
    let info = w.run(&a, &["--ovl-info"]);
    ok(&info);
    assert!(stdout(&info).contains("name:     app"), "{}", stdout(&info));
    assert!(
        stdout(&info).contains("3 distinct contents"),
        "{}",
        stdout(&info)
    );
}

#[test]
fn runs_the_entry_with_args_env_and_cwd_and_keeps_state() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let o = w.run(&b, &["one", "two words"]);
    ok(&o);
    assert_eq!(field(&o, "args"), "one two words");
    assert_eq!(field(&o, "greeting"), "hello bundle");
    assert_eq!(field(&o, "bundle"), b.to_str().unwrap());
    assert_eq!(field(&o, "appimage"), b.to_str().unwrap());
    assert_eq!(field(&o, "argv0"), b.to_str().unwrap());
    assert_eq!(field(&o, "owd"), w.root.to_str().unwrap());
    assert_eq!(field(&o, "pwd"), w.root.to_str().unwrap());
    assert_eq!(field(&o, "count"), "1");
    let appdir = field(&o, "appdir");
    assert!(
        !Path::new(&appdir).join("AppRun").exists(),
        "mount left behind"
    );
    // Preserve (the default): the next run sees the state; it lives in the upper.
    let o = w.run(&b, &[]);
    ok(&o);
    assert_eq!(field(&o, "count"), "2");
    assert_eq!(
        fs::read_to_string(w.upper().join("state/count")).unwrap(),
        "2\n"
    );
    // The tree is read in place from the bundle: nothing is extracted into the cache.
    let (ids, temps) = w.cached();
    assert!(ids.is_empty(), "{ids:?}");
    assert!(!temps);
    // Exit status is the app's.
    let o = w.run(&b, &["exit", "7"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
}

#[test]
fn signals_reach_the_app_and_its_status_is_returned() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let mut child = spawn(w.cmd(&b, &["sleep", "30"]).stdout(Stdio::piped()));
    first_line_starting(&mut child, "count=");
    std::thread::sleep(std::time::Duration::from_millis(200));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(128 + libc::SIGTERM));
    // Unmounted and the state kept.
    assert_eq!(
        fs::read_to_string(w.upper().join("state/count")).unwrap(),
        "1\n"
    );
    assert!(
        fs::read_dir(w.p("home/cache"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("mount_"))
    );
}

#[test]
fn extracted_tree_is_the_app_tree() {
    let w = World::new();
    let b = w.bundle();
    let o = w.run(&b, &["--ovl-extract", w.p("x").to_str().unwrap()]);
    ok(&o);
    let (src, dst) = (w.p("app"), w.p("x"));
    for rel in [
        "AppRun",
        "share/greeting.txt",
        "share/sub/copy.txt",
        "share/big.bin",
        "share/empty",
    ] {
        assert_eq!(
            fs::read(src.join(rel)).unwrap(),
            fs::read(dst.join(rel)).unwrap(),
            "{rel}"
        );
        let (a, b) = (
            fs::metadata(src.join(rel)).unwrap(),
            fs::metadata(dst.join(rel)).unwrap(),
        );
        assert_eq!(a.mode(), b.mode(), "{rel}");
        assert_eq!(a.mtime(), b.mtime(), "{rel}");
    }
    assert_eq!(
        fs::read_link(dst.join("bin/link")).unwrap(),
        Path::new("../share/greeting.txt")
    );
    let (g, h) = (
        fs::metadata(dst.join("share/greeting.txt")).unwrap(),
        fs::metadata(dst.join("share/hard.txt")).unwrap(),
    );
    assert_eq!(g.ino(), h.ino(), "hard link kept");
    assert_eq!(g.mtime(), 1_000_000_000);
    assert_eq!(
        xattr::get(dst.join("share/greeting.txt"), "user.note").unwrap(),
        Some(b"kept".to_vec())
    );
    // An existing, non-empty directory is refused and left alone.
    let o = w.run(&b, &["--ovl-extract", w.p("x").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1);
}

#[test]
fn discard_drops_this_runs_changes_and_keeps_earlier_ones() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    ok(&w.run(&b, &[]));
    assert_eq!(field(&w.run(&b, &[]), "count"), "2");
    // A discard run sees the kept state, changes it, and the change is gone afterwards.
    let o = w.run(&b, &["--ovl-on-exit=discard", "rm", "greeting.txt"]);
    ok(&o);
    assert_eq!(field(&o, "count"), "3");
    assert_eq!(
        fs::read_to_string(w.upper().join("state/count")).unwrap(),
        "2\n"
    );
    assert!(
        !w.upper().join("share").exists(),
        "the discard run's whiteout leaked"
    );
    let o = w.run(&b, &[]);
    assert_eq!(field(&o, "count"), "3");
    assert_eq!(field(&o, "greeting"), "hello bundle");
    // Nothing of the discard run is left in the run scratch space.
    let runs = w.p("home/cache/ovl/runs");
    assert_eq!(fs::read_dir(runs).map(|d| d.count()).unwrap_or(0), 0);
}

#[test]
fn commit_rewrites_the_bundle() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let before = fs::read(&b).unwrap();
    let old_ino = fs::metadata(&b).unwrap().ino();
    ok(&w.run(&b, &[]));
    let o = w.run(&b, &["--ovl-on-exit=commit", "rm", "sub/copy.txt"]);
    ok(&o);
    assert!(stderr(&o).contains("committed"), "{}", stderr(&o));
    // Replaced by rename (a new file), not written in place.
    assert_ne!(fs::metadata(&b).unwrap().ino(), old_ino);
    let after = fs::read(&b).unwrap();
    assert_ne!(before, after);
    assert!(after.starts_with(&fs::read(runtime()).unwrap()));
    let v = w.run(&b, &["--ovl-verify"]);
    ok(&v);
    // The upper's changes are in the bundle now, and the upper is empty.
    assert!(fs::read_dir(w.upper()).map(|d| d.count()).unwrap_or(0) == 0);
    let x = w.p("x");
    ok(&w.run(&b, &["--ovl-extract", x.to_str().unwrap()]));
    assert_eq!(fs::read_to_string(x.join("state/count")).unwrap(), "2\n");
    assert!(!x.join("share/sub/copy.txt").exists());
    assert_eq!(
        fs::read(x.join("share/big.bin")).unwrap(),
        pseudo_random(300_000)
    );
    // A copy of the new bundle runs anywhere with that state: a fresh cache and data dir.
    let w2 = World::new();
    let b2 = w2.p("copy.run");
    fs::copy(&b, &b2).unwrap();
    let o = w2.run(&b2, &[]);
    ok(&o);
    assert_eq!(field(&o, "count"), "3");
    // Neither version was extracted: --ovl-gc finds nothing to remove.
    ok(&w.run(&b, &[]));
    assert!(w.cached().0.is_empty());
    let g = w.run(&b, &["--ovl-gc"]);
    ok(&g);
    assert!(stdout(&g).contains("removed 0"), "{}", stdout(&g));
    ok(&w.run(&b, &[]));
}

/// A directory of the bundle renamed in one run (kept as a redirect in the upper, nothing
/// copied) shows its content in the next run, and a commit packs it at its new name.
#[test]
fn a_renamed_directory_is_kept_and_committed() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    ok(&w.run(&b, &["mv", "sub", "moved"]));
    let up = w.upper().join("share/moved");
    assert!(
        xattr::get(&up, "trusted.overlay.redirect")
            .unwrap()
            .is_some(),
        "no redirect in the upper"
    );
    assert_eq!(
        fs::read_dir(&up).unwrap().count(),
        0,
        "the directory was copied up"
    );
    ok(&w.run(&b, &["--ovl-on-exit=commit", "mv", "moved", "sub2"]));
    let x = w.p("x");
    ok(&w.run(&b, &["--ovl-extract", x.to_str().unwrap()]));
    assert_eq!(
        fs::read_to_string(x.join("share/sub2/copy.txt")).unwrap(),
        "hello bundle"
    );
    assert!(!x.join("share/sub").exists() && !x.join("share/moved").exists());
}

#[test]
fn a_crash_during_commit_loses_nothing_and_applies_once() {
    if !is_root() {
        return;
    }
    for (step, replaced) in [("marker", false), ("placed", true), ("cleared", true)] {
        let w = World::new();
        let b = w.bundle();
        let old = fs::read(&b).unwrap();
        ok(&w.run(&b, &[]));
        let o = output(
            w.cmd(&b, &["--ovl-on-exit=commit", "rm", "empty"])
                .env("OVL_BUNDLE_CRASH_AT", step),
        );
        assert!(!o.status.success(), "{step}: the hook did not fire");
        assert_eq!(fs::read(&b).unwrap() != old, replaced, "{step}");
        // The next run finishes (bundle replaced) or keeps (not replaced) the changes.
        let o = w.run(&b, &[]);
        ok(&o);
        assert_eq!(field(&o, "count"), "3", "{step}");
        let whiteout = w.upper().join("share/empty");
        assert_eq!(
            whiteout.symlink_metadata().is_ok(),
            !replaced,
            "{step}: the deletion must live in exactly one place"
        );
        let x = w.p("x");
        ok(&w.run(&b, &["--ovl-extract", x.to_str().unwrap()]));
        assert_eq!(x.join("share/empty").exists(), !replaced, "{step}");
        assert!(
            !w.upper()
                .parent()
                .unwrap()
                .join(".upper.ovl-committed")
                .exists()
        );
    }
}

#[test]
fn commit_keeps_hard_links_and_the_file_mode() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    fs::set_permissions(&b, fs::Permissions::from_mode(0o700)).unwrap();
    // greeting.txt and hard.txt are one file: changing one name changes what both show.
    ok(&w.run(&b, &["--ovl-on-exit=commit", "append"]));
    assert_eq!(fs::metadata(&b).unwrap().mode() & 0o7777, 0o700);
    let x = w.p("x");
    ok(&w.run(&b, &["--ovl-extract", x.to_str().unwrap()]));
    let (g, h) = (x.join("share/greeting.txt"), x.join("share/hard.txt"));
    assert_eq!(fs::read_to_string(&h).unwrap(), "hello bundlemore\n");
    assert_eq!(
        fs::metadata(&g).unwrap().ino(),
        fs::metadata(&h).unwrap().ino()
    );
}

#[test]
fn concurrent_commits_never_lose_a_change() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let start = |name: &str| {
        spawn(
            w.cmd(
                &b,
                &[
                    &format!("--ovl-upper={}", w.p(name).display()),
                    "--ovl-on-exit=commit",
                    "touch",
                    name,
                    "1",
                ],
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
        )
    };
    let (a, c) = (start("one"), start("two"));
    let (a, c) = (a.wait_with_output().unwrap(), c.wait_with_output().unwrap());
    // One commit lands; the other finds the bundle replaced and keeps its changes.
    let codes = [a.status.code(), c.status.code()];
    assert!(codes.contains(&Some(0)), "{}{}", stderr(&a), stderr(&c));
    let x = w.p("x");
    ok(&w.run(&b, &["--ovl-extract", x.to_str().unwrap()]));
    for (name, o) in [("one", &a), ("two", &c)] {
        let in_bundle = x.join("state").join(name).exists();
        let kept = w.p(name).join("state").join(name).exists();
        if o.status.success() {
            assert!(in_bundle && !kept, "{name}: {}", stderr(o));
        } else {
            assert_eq!(o.status.code(), Some(125));
            assert!(stderr(o).contains("replaced while"), "{}", stderr(o));
            assert!(!in_bundle && kept, "{name}: the change must be kept");
            // Committing again puts it on top of the other one.
            let again = w.run(
                &b,
                &[
                    &format!("--ovl-upper={}", w.p(name).display()),
                    "--ovl-on-exit=commit",
                ],
            );
            ok(&again);
        }
    }
    fs::remove_dir_all(&x).unwrap();
    ok(&w.run(&b, &["--ovl-extract", x.to_str().unwrap()]));
    assert!(x.join("state/one").exists() && x.join("state/two").exists());
}

#[test]
fn commit_with_no_changes_leaves_the_file_alone() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let ino = fs::metadata(&b).unwrap().ino();
    // Mounted and released without a write: nothing to commit.
    let mut child = spawn(
        w.cmd(&b, &["--ovl-mount", "--ovl-on-exit=commit"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let line = first_line_starting(&mut child, "");
    assert!(Path::new(line.trim()).join("AppRun").exists());
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    ok(&o);
    assert!(
        stderr(&o).contains("no changes to commit"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::metadata(&b).unwrap().ino(), ino);
}

#[test]
fn parallel_first_runs_share_the_bundle_in_place() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let children: Vec<_> = (0..6)
        .map(|i| {
            let upper = w.p(&format!("upper{i}"));
            spawn(
                w.cmd(&b, &[&format!("--ovl-upper={}", upper.display()), "arg"])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped()),
            )
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().unwrap();
        ok(&o);
        assert_eq!(field(&o, "count"), "1");
        assert_eq!(field(&o, "greeting"), "hello bundle");
    }
    let (ids, temps) = w.cached();
    assert!(ids.is_empty() && !temps, "{ids:?}: nothing is extracted");
    for i in 0..6 {
        assert_eq!(
            fs::read_to_string(w.p(&format!("upper{i}/state/count"))).unwrap(),
            "1\n"
        );
    }
}

#[test]
fn a_run_beside_ovl_mount_is_refused() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let mut first = spawn(w.cmd(&b, &["--ovl-mount"]).stdout(Stdio::piped()));
    // Wait until it serves (it printed the mount point).
    first_line_starting(&mut first, "");
    let o = w.run(&b, &[]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("--ovl-mount"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    // A run of another upper works meanwhile.
    let o = w.run(&b, &[&format!("--ovl-upper={}", w.p("other").display())]);
    ok(&o);
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    assert!(first.wait().unwrap().success());
    // And once it is gone, the socket it answered on is too, and runs work again.
    assert!(!w.p("home/data/ovl/app/.upper.ovl-sock").exists());
    ok(&w.run(&b, &[]));
}

/// An instance started with `wait NAME FIFO STATUS`: it wrote `state/NAME` and waits for a
/// line on its fifo, then exits with STATUS.
struct Instance {
    child: std::process::Child,
    /// Its output up to `ready`.
    lines: Vec<String>,
    fifo: PathBuf,
}

impl Instance {
    /// Starts `c` (a run with `wait`; its stdout is piped here).
    fn spawn(c: &mut Command, fifo: PathBuf) -> Instance {
        let child = spawn(c.stdout(Stdio::piped()).stderr(Stdio::piped()));
        Instance {
            child,
            lines: Vec::new(),
            fifo,
        }
    }

    /// Waits until the app runs (it printed `ready`).
    fn ready(&mut self) -> &mut Self {
        use std::io::BufRead;
        let out = std::io::BufReader::new(self.child.stdout.take().expect("stdout piped"));
        for line in out.lines() {
            let line = line.unwrap();
            let done = line == "ready";
            self.lines.push(line);
            if done {
                return self;
            }
        }
        let err = self.child.stderr.take().map(|mut e| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            s
        });
        panic!(
            "the instance ended before it was ready: {:?} {err:?}",
            self.lines
        );
    }

    fn field(&self, key: &str) -> &str {
        self.lines
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {key}= in {:?}", self.lines))
    }

    fn release(&self) {
        fs::write(&self.fifo, "go\n").unwrap();
    }

    /// Its exit status and stderr.
    fn finish(self) -> (Option<i32>, String) {
        let o = self.child.wait_with_output().unwrap();
        (o.status.code(), stderr(&o))
    }
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
}

impl World {
    /// A run of `bundle` with the runtime options `opts` whose app is `wait NAME FIFO CODE`:
    /// started, and running (it printed `ready`); `release` lets it exit with CODE.
    fn waiting(&self, bundle: &Path, name: &str, opts: &[&str], code: &str) -> Instance {
        let fifo = self.p(&format!("fifo-{name}"));
        mkfifo(&fifo);
        let mut all = opts.to_vec();
        all.extend(["wait", name, fifo.to_str().unwrap(), code]);
        let mut i = Instance::spawn(&mut self.cmd(bundle, &all), fifo);
        i.ready();
        i
    }
}

/// Nothing of the instances is left: no mount point, no socket, no server.
fn assert_all_gone(w: &World) {
    let mounts: Vec<_> = fs::read_dir(w.p("home/cache"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("mount_"))
        .collect();
    assert!(mounts.is_empty(), "mount points left: {mounts:?}");
    assert!(!w.p("home/data/ovl/app/.upper.ovl-sock").exists());
    assert_eq!(lock_holders(w), Vec::<i32>::new());
}

/// Processes holding the app's upper lock open (the server).
fn lock_holders(w: &World) -> Vec<i32> {
    let lock = w.p("home/data/ovl/app/.upper.ovl-lock");
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|f| fs::read_link(f.path()).is_ok_and(|l| l == lock))
        {
            out.push(pid);
        }
    }
    out
}

/// `n` instances started at once on a world nobody ran yet (they race to be first), each in
/// its own directory with its own argument, variable and exit status, as root or as `user`.
fn concurrent_instances(n: usize, user: Option<&str>) {
    let w = World::new();
    let b = w.bundle();
    for i in 0..n {
        fs::create_dir(w.p(&format!("cwd{i}"))).unwrap();
        mkfifo(&w.p(&format!("fifo{i}")));
    }
    if let Some(user) = user {
        ensure_test_user();
        let st = Command::new("chown")
            .args(["-R", user])
            .arg(&w.root)
            .status()
            .unwrap();
        assert!(st.success());
    }
    let mut inst: Vec<Instance> = (0..n)
        .map(|i| {
            let fifo = w.p(&format!("fifo{i}"));
            let args = [
                "wait".to_string(),
                format!("i{i}"),
                fifo.display().to_string(),
                (10 + i).to_string(),
            ];
            let mut c = match user {
                None => {
                    let mut c = w.cmd(&b, &args.iter().map(String::as_str).collect::<Vec<_>>());
                    c.current_dir(w.p(&format!("cwd{i}")));
                    c
                }
                Some(user) => {
                    let mut c = Command::new("runuser");
                    c.args(["-u", user, "--", "env"])
                        .arg(format!("HOME={}", w.p("home").display()))
                        .arg(format!("XDG_CACHE_HOME={}", w.p("home/cache").display()))
                        .arg(format!("XDG_DATA_HOME={}", w.p("home/data").display()))
                        .arg(&b)
                        .args(&args)
                        .current_dir(w.p(&format!("cwd{i}")))
                        .stdin(Stdio::null());
                    c
                }
            };
            c.env("OVL_TEST_MINE", format!("mine{i}"));
            Instance::spawn(&mut c, fifo)
        })
        .collect();
    for i in inst.iter_mut() {
        i.ready();
    }
    // One mount, one server.
    let appdir = inst[0].field("appdir").to_string();
    for (i, x) in inst.iter().enumerate() {
        assert_eq!(x.field("appdir"), appdir, "instance {i}");
        assert_eq!(x.field("mine"), format!("mine{i}"));
        let cwd = w.p(&format!("cwd{i}"));
        assert_eq!(x.field("pwd"), cwd.to_str().unwrap());
        assert_eq!(x.field("owd"), cwd.to_str().unwrap());
        assert!(x.field("args").starts_with(&format!("wait i{i} ")));
    }
    assert_eq!(lock_holders(&w).len(), 1, "one server");
    // Released in another order than they started; each exits as its own app did.
    for (i, x) in inst.into_iter().enumerate().rev() {
        x.release();
        let (code, err) = x.finish();
        assert_eq!(code, Some(10 + i as i32), "instance {i}: {err}");
        assert!(!err.contains("error"), "instance {i}: {err}");
    }
    for i in 0..n {
        assert_eq!(
            fs::read_to_string(w.upper().join(format!("state/i{i}"))).unwrap(),
            format!("i{i}\n")
        );
    }
    assert_all_gone(&w);
    // The next run sees every instance's file.
    let o = w.run(&b, &["write", "after", "4"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    for i in 0..n {
        assert!(
            field(&o, "state").contains(&format!("i{i} ")),
            "{}",
            stdout(&o)
        );
    }
}

#[test]
fn two_instances_share_one_mount_and_exit_as_their_apps() {
    if !is_root() {
        return;
    }
    concurrent_instances(2, None);
}

#[test]
fn eight_instances_share_one_mount_and_exit_as_their_apps() {
    if !is_root() {
        return;
    }
    concurrent_instances(8, None);
}

#[test]
fn a_normal_users_instances_share_one_mount() {
    if !is_root() {
        return;
    }
    concurrent_instances(3, Some(USER));
}

#[test]
fn a_signal_reaches_only_its_own_instance() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let start = |name: &str, code: &str| w.waiting(&b, name, &[], code);
    let (a, c) = (start("a", "5"), start("c", "6"));
    unsafe { libc::kill(c.child.id() as i32, libc::SIGTERM) };
    let (code, err) = c.finish();
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}");
    // The other one still runs on the mount.
    let o = w.run(&b, &["write", "d", "7"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert_eq!(field(&o, "appdir"), a.field("appdir"));
    a.release();
    assert_eq!(a.finish().0, Some(5));
    assert_all_gone(&w);
}

#[test]
fn instances_exiting_while_others_join() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    // Waves of short instances: some start the server, some join it, some find it finishing
    // (its last instance just left) and start the next one.
    for round in 0..8 {
        let children: Vec<_> = (0..4)
            .map(|i| {
                let name = format!("r{round}i{i}");
                let code = (20 + i).to_string();
                spawn(
                    w.cmd(&b, &["write", &name, &code])
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped()),
                )
            })
            .collect();
        for (i, c) in children.into_iter().enumerate() {
            let o = c.wait_with_output().unwrap();
            assert_eq!(o.status.code(), Some(20 + i as i32), "{}", stderr(&o));
        }
    }
    // And short ones joining and leaving a long one.
    let long = w.waiting(&b, "long", &[], "9");
    for i in 0..6 {
        let o = w.run(&b, &["write", &format!("short{i}"), &i.to_string()]);
        assert_eq!(o.status.code(), Some(i), "{}", stderr(&o));
        assert_eq!(field(&o, "appdir"), long.field("appdir"));
    }
    long.release();
    assert_eq!(long.finish().0, Some(9));
    assert_all_gone(&w);
    let names: Vec<String> = (0..8)
        .flat_map(|r| (0..4).map(move |i| format!("r{r}i{i}")))
        .chain((0..6).map(|i| format!("short{i}")))
        .chain(["long".to_string()])
        .collect();
    for n in names {
        assert!(w.upper().join("state").join(&n).exists(), "{n} lost");
    }
}

#[test]
fn a_killed_instance_or_server_does_not_block_later_runs() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let start = |name: &str| w.waiting(&b, name, &[], "0");
    // The first instance killed: the server finishes without it.
    let mut a = start("a");
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let o = w.run(&b, &["write", "after-a", "3"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(field(&o, "state").contains("a "), "{}", stdout(&o));
    // The server killed: its instances end (their mount is gone), and the next run serves.
    let c = start("c");
    let server = lock_holders(&w);
    assert_eq!(server.len(), 1);
    unsafe { libc::kill(server[0], libc::SIGKILL) };
    let (code, err) = c.finish();
    assert_eq!(code, Some(128 + libc::SIGKILL), "{err}");
    assert!(err.contains("ended before this instance"), "{err}");
    assert!(
        w.p("home/data/ovl/app/.upper.ovl-sock").exists(),
        "stale socket"
    );
    let o = w.run(&b, &["write", "after-c", "4"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert!(field(&o, "state").contains("c "), "{}", stdout(&o));
    assert_all_gone(&w);
}

#[test]
fn a_discard_run_goes_beside_live_instances() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let a = w.waiting(&b, "a", &[], "5");
    let o = w.run(&b, &["--ovl-on-exit=discard", "write", "d", "6"]);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    // It saw the kept state, on a mount of its own, and left nothing.
    assert!(field(&o, "state").contains("a "), "{}", stdout(&o));
    assert_ne!(field(&o, "appdir"), a.field("appdir"));
    assert!(!w.upper().join("state/d").exists());
    a.release();
    assert_eq!(a.finish().0, Some(5));
    assert!(w.upper().join("state/a").exists());
    assert_all_gone(&w);
}

#[test]
fn another_version_beside_live_instances_is_refused_and_a_commit_waits_for_discard_runs() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let a = w.waiting(&b, "a", &[], "5");
    // Another version of the app (another tree) cannot show its tree on this mount.
    fs::write(w.p("app/share/new.txt"), "v2").unwrap();
    let v2 = w.p("v2.run");
    ok(&w.pack(&["-o", v2.to_str().unwrap()]));
    let o = w.run(&v2, &["write", "v2", "4"]);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(stderr(&o).contains("another version"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    a.release();
    assert_eq!(a.finish().0, Some(5));
    // A discard run reads the kept upper: a commit clears it only after that run is done.
    let d = w.waiting(&b, "d", &["--ovl-on-exit=discard"], "6");
    let mut c = spawn(
        w.cmd(&b, &["--ovl-on-exit=commit", "write", "c", "3"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut err = std::io::BufReader::new(c.stderr.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut err, &mut line).unwrap();
    assert!(
        line.contains("waiting for discard runs of app to exit before committing"),
        "{line}"
    );
    assert!(w.upper().join("state/a").exists());
    d.release();
    assert_eq!(d.finish().0, Some(6));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert_eq!(c.wait().unwrap().code(), Some(3), "{rest}");
    assert!(rest.contains("committed"), "{rest}");
    let x = w.p("x");
    ok(&w.run(&b, &["--ovl-extract", x.to_str().unwrap()]));
    assert!(x.join("state/a").exists() && x.join("state/c").exists());
    assert!(!x.join("state/d").exists());
    assert_all_gone(&w);
}

#[test]
fn a_commit_asked_by_one_instance_waits_for_the_others_and_happens_once() {
    if !is_root() {
        return;
    }
    use std::io::BufRead;
    let w = World::new();
    let b = w.bundle();
    let ino = fs::metadata(&b).unwrap().ino();
    let start = |name: &str, opts: &[&str], code: &str| w.waiting(&b, name, opts, code);
    let a = start("a", &[], "5");
    let mut c = start("c", &["--ovl-on-exit=commit"], "3");
    c.release();
    // Its app is done; it says that it waits for the other one, and does.
    let mut err = std::io::BufReader::new(c.child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(
        line.contains("waiting for 1 other instance of app to exit before committing"),
        "{line}"
    );
    assert!(c.child.try_wait().unwrap().is_none());
    assert_eq!(fs::metadata(&b).unwrap().ino(), ino, "committed too early");
    a.release();
    let (code, a_err) = a.finish();
    assert_eq!(code, Some(5), "{a_err}");
    assert!(!a_err.contains("committed"), "{a_err}");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert_eq!(c.child.wait().unwrap().code(), Some(3), "{rest}");
    assert_eq!(rest.matches("committed").count(), 1, "{rest}");
    assert_ne!(fs::metadata(&b).unwrap().ino(), ino);
    // Both instances' changes are in the bundle, none left in the upper.
    let x = w.p("x");
    ok(&w.run(&b, &["--ovl-extract", x.to_str().unwrap()]));
    assert!(x.join("state/a").exists() && x.join("state/c").exists());
    assert!(!w.upper().join("state").exists());
    assert_all_gone(&w);
}

#[test]
fn verify_catches_a_flipped_byte_in_every_part() {
    let w = World::new();
    let b = w.bundle();
    ok(&w.run(&b, &["--ovl-verify"]));
    let bytes = fs::read(&b).unwrap();
    let len = bytes.len() as u64;
    let rt = runtime_len();
    let mstart = u64::from_le_bytes(
        bytes[(len - 72) as usize..(len - 64) as usize]
            .try_into()
            .unwrap(),
    );
    let trailer = len - 128;
    // The runtime's section headers end the ELF file and are not loaded: the damaged runtime
    // still runs and must find itself damaged.
    let unloaded = [rt - 1, rt - 30, rt - 200];
    let offsets: Vec<u64> = unloaded
        .into_iter()
        .chain([0, 1000, rt / 2]) // more of the runtime
        .chain([rt, rt + 1000, (rt + mstart) / 2, mstart - 1]) // image
        .chain([mstart, (mstart + trailer) / 2, trailer - 1]) // manifest
        .chain(trailer..len) // every byte of the trailer
        .collect();
    let c = w.p("c.run");
    for at in offsets {
        let mut copy = bytes.clone();
        copy[at as usize] ^= 0x5a;
        fs::write(&c, &copy).unwrap();
        fs::set_permissions(&c, fs::Permissions::from_mode(0o755)).unwrap();
        let o = (0..100)
            .map(|_| w.cmd(&c, &["--ovl-verify"]).output())
            .find(|r| !matches!(r, Err(e) if e.raw_os_error() == Some(libc::ETXTBSY)))
            .unwrap();
        let o = match o {
            Ok(o) => o,
            // A damaged ELF header: the file does not even start, which is a failure too.
            Err(e) if at < rt => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOEXEC), "flip at {at}: {e}");
                continue;
            }
            Err(e) => panic!("flip at {at}: {e}"),
        };
        assert!(!stdout(&o).contains("OK"), "flip at {at} verified");
        if at < rt && !unloaded.contains(&at) {
            // Damaged code or data of the runtime may fail in any way, never with success.
            assert_ne!(o.status.code(), Some(0), "flip at {at}");
            continue;
        }
        assert_eq!(o.status.code(), Some(1), "flip at {at}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(err.contains("damaged"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        if at < rt {
            assert!(err.contains("runtime part does not match"), "{err}");
        }
    }
}

#[test]
fn a_damaged_manifest_is_never_extracted() {
    let w = World::new();
    let b = w.bundle();
    let len = fs::metadata(&b).unwrap().len();
    // Every byte of the (small) compressed manifest, one bit each: none may decode silently
    // (a flipped bit once renamed AppRun to @ppRun).
    let bytes = fs::read(&b).unwrap();
    let mstart = u64::from_le_bytes(
        bytes[(len - 72) as usize..(len - 64) as usize]
            .try_into()
            .unwrap(),
    );
    let c = w.p("c.run");
    for at in mstart..len - 128 {
        let mut copy = bytes.clone();
        copy[at as usize] ^= 0x04;
        fs::write(&c, &copy).unwrap();
        fs::set_permissions(&c, fs::Permissions::from_mode(0o755)).unwrap();
        let o = w.run(&c, &["--ovl-extract", w.p("x").to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(125), "flip at {at} extracted");
        assert!(stderr(&o).contains("corrupt bundle"), "{}", stderr(&o));
    }
    // The tree's own metadata (the image's superblock byte by byte, its metadata section one
    // byte in three): refused when the bundle is opened, before anything is extracted.
    let u64_at = |i: u64| u64::from_le_bytes(bytes[i as usize..i as usize + 8].try_into().unwrap());
    let image = u64_at(len - 80);
    let (meta, meta_len) = (image + u64_at(image + 32), u64_at(image + 40));
    assert_eq!(
        meta + meta_len,
        mstart,
        "the image's metadata ends where the manifest starts"
    );
    for at in (image..image + 128).chain((meta..mstart).step_by(3)) {
        let mut copy = bytes.clone();
        copy[at as usize] ^= 0x04;
        fs::write(&c, &copy).unwrap();
        fs::set_permissions(&c, fs::Permissions::from_mode(0o755)).unwrap();
        let o = w.run(&c, &["--ovl-extract", w.p("x").to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(125), "flip at {at} extracted");
        assert!(stderr(&o).contains("corrupt bundle"), "{}", stderr(&o));
    }
    assert!(!w.p("x").exists());
}

#[test]
fn corrupt_data_fails_the_first_run_without_a_half_extracted_cache() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    // A byte of the first data block (after the image's 128-byte superblock), which holds
    // the first packed small files, AppRun among them (no extension sorts first): the tree
    // is read in place, so the damage shows when the entry is read: it cannot be run.
    let at = runtime_len() + 128 + 20;
    flip(&b, at);
    let o = w.run(&b, &[]);
    assert_eq!(o.status.code(), Some(126));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{}: corrupt image", b.display())),
        "{err}"
    );
    assert!(err.contains("Input/output error"), "{err}");
    assert!(!err.contains("panicked"));
    // Nothing is extracted, and no lock or temporary is left in the cache.
    let left: Vec<_> = fs::read_dir(w.cache())
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    // The intact bundle then runs as usual.
    flip(&b, at);
    ok(&w.run(&b, &[]));
    assert!(w.cached().0.is_empty());
}

#[test]
fn an_unwritable_cache_falls_back_with_one_warning() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let id = stdout(&w.run(&b, &["--ovl-info"]))
        .lines()
        .find_map(|l| l.strip_prefix("id:").map(|s| s.trim().to_string()))
        .unwrap();
    // The cache's place is under a file: it cannot be made. A normal run needs nothing there
    // (the tree is read in place; the mount point goes to the temporary directory).
    fs::write(w.p("home/file"), "").unwrap();
    fs::create_dir_all(w.p("run")).unwrap();
    fs::create_dir_all(w.p("tmp")).unwrap();
    let o = output(
        w.cmd(&b, &["one"])
            .env("XDG_CACHE_HOME", w.p("home/file/cache"))
            .env("TMPDIR", w.p("tmp")),
    );
    ok(&o);
    assert_eq!(stderr(&o), "");
    // A discard run keeps its scratch upper in the cache: first $XDG_RUNTIME_DIR, then the
    // temporary directory, with one warning.
    for runtime_dir in [true, false] {
        let mut c = w.cmd(&b, &["--ovl-on-exit=discard", "one"]);
        c.env("XDG_CACHE_HOME", w.p("home/file/cache"))
            .env("TMPDIR", w.p("tmp"));
        if runtime_dir {
            c.env("XDG_RUNTIME_DIR", w.p("run"));
        } else {
            c.env_remove("XDG_RUNTIME_DIR");
        }
        let o = output(&mut c);
        ok(&o);
        assert_eq!(field(&o, "args"), "one");
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains("warning") && err.contains("home/file/cache"),
            "{err}"
        );
        let root = if runtime_dir {
            w.p("run/ovl/bundles")
        } else {
            w.p("tmp/ovl-cache-0/bundles")
        };
        assert!(err.contains(root.to_str().unwrap()), "{err}");
        // Its runs' scratch uppers went there; the tree is read in place, never extracted.
        assert!(root.parent().unwrap().join("runs").is_dir());
        assert!(!root.join(&id).exists());
    }
    assert_eq!(
        fs::metadata(w.p("tmp/ovl-cache-0")).unwrap().mode() & 0o777,
        0o700
    );
    // A fallback directory that is not ours is refused, with nothing run.
    fs::remove_dir_all(w.p("tmp/ovl-cache-0")).unwrap();
    std::os::unix::fs::symlink(w.p("run"), w.p("tmp/ovl-cache-0")).unwrap();
    let o = output(
        w.cmd(&b, &["--ovl-on-exit=discard", "one"])
            .env("XDG_CACHE_HOME", w.p("home/file/cache"))
            .env("TMPDIR", w.p("tmp"))
            .env_remove("XDG_RUNTIME_DIR"),
    );
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("not a private directory"),
        "{}",
        stderr(&o)
    );
    assert!(!stdout(&o).contains("args="));

    // A normal user whose cache directory is read-only to them (root's, mode 0555).
    ensure_test_user();
    fs::create_dir_all(w.p("utmp")).unwrap();
    let chown = Command::new("chown")
        .args(["-R", USER])
        .arg(&w.root)
        .status()
        .unwrap();
    assert!(chown.success());
    fs::create_dir_all(w.p("home/rocache")).unwrap();
    fs::set_permissions(w.p("home/rocache"), fs::Permissions::from_mode(0o555)).unwrap();
    let script = format!(
        "cd {root} && HOME={root}/home XDG_CACHE_HOME={root}/home/rocache \
         XDG_DATA_HOME={root}/home/data TMPDIR={root}/utmp {b} --appimage-extract-and-run two",
        root = w.root.display(),
        b = b.display()
    );
    let o = Command::new("runuser")
        .args([
            "-u",
            USER,
            "--",
            "env",
            "-u",
            "XDG_RUNTIME_DIR",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    ok(&o);
    assert_eq!(field(&o, "args"), "two");
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("home/rocache/ovl/bundles"), "{err}");
    let fallback: Vec<PathBuf> = fs::read_dir(w.p("utmp"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(fallback.len(), 1, "{fallback:?}");
    assert!(fallback[0].join("runs").is_dir(), "{fallback:?}");
    assert!(!fallback[0].join("bundles").join(&id).exists());
    assert!(fs::read_dir(w.p("home/rocache")).unwrap().next().is_none());
}

#[test]
fn truncated_bundle_is_refused() {
    let w = World::new();
    let b = w.bundle();
    let len = fs::metadata(&b).unwrap().len();
    for keep in [len - 1, len - 200, runtime_len() + 10] {
        let t = w.p("t.run");
        let bytes = fs::read(&b).unwrap();
        fs::write(&t, &bytes[..keep as usize]).unwrap();
        fs::set_permissions(&t, fs::Permissions::from_mode(0o755)).unwrap();
        let o = w.run(&t, &[]);
        assert_eq!(o.status.code(), Some(125), "keep {keep}: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("truncated"), "{err}");
        assert!(w.cached().0.is_empty());
    }
    // The bare runtime says what it is.
    let o = w.run(runtime(), &[]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("bare ovl runtime"), "{}", stderr(&o));
}

#[test]
fn runtime_options_are_checked() {
    let w = World::new();
    let b = w.bundle();
    let o = w.run(&b, &["--ovl-bogus"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("--ovl-help"));
    let o = w.run(&b, &["--ovl-help"]);
    ok(&o);
    assert!(stdout(&o).contains("--ovl-on-exit"));
    let o = w.run(&b, &["--ovl-on-exit=keep"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(w.cached().0.is_empty(), "a refused run must not extract");
}

#[test]
fn pack_refuses_bad_input_and_writes_nothing() {
    let w = World::new();
    let out = w.p("o.run");
    let o = w.pack(&["-o", out.to_str().unwrap(), "--entry", "missing"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("entry point"), "{}", stderr(&o));
    let o = w.pack(&["-o", out.to_str().unwrap(), "--name", "a/b"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("invalid bundle name"), "{}", stderr(&o));
    let fifo = std::ffi::CString::new(w.p("app/share/fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    let o = w.pack(&["-o", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("FIFO"), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1);
    assert!(!out.exists());
    assert_eq!(
        fs::read_dir(&w.root)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("ovl-pack"))
            .count(),
        0,
        "temporary file left"
    );
}

#[test]
fn without_fuse_runs_a_private_copy_and_refuses_commit() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    ok(&w.run(&b, &[]));
    // A mount namespace whose /dev has no fuse device.
    let script = format!(
        "mount --make-rprivate / && mount -t tmpfs tmpfs /dev && \
         mknod -m 666 /dev/null c 1 3 && \
         {b} one; echo rc=$?; {b} --ovl-on-exit=commit two; echo rc=$?",
        b = b.display()
    );
    let o = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .current_dir(&w.root)
        .env("HOME", w.p("home"))
        .env("XDG_CACHE_HOME", w.p("home/cache"))
        .env("XDG_DATA_HOME", w.p("home/data"))
        .output()
        .unwrap();
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(out.contains("args=one"), "{out}{err}");
    // The kept state is there (count was 1), this run's change is not kept.
    assert!(out.contains("count=2"), "{out}{err}");
    assert!(out.contains("rc=0\n"), "{out}{err}");
    assert!(err.contains("FUSE is not available"), "{err}");
    assert!(out.contains("rc=125"), "{out}{err}");
    assert!(err.contains("--ovl-on-exit=commit needs FUSE"), "{err}");
    assert!(
        !out.contains("args=two"),
        "commit run must not start the app: {out}"
    );
    // Discard semantics: nothing of this run kept; the private copy was extracted into the
    // run's scratch directory, gone now, and nothing into the cache.
    assert_eq!(
        fs::read_to_string(w.upper().join("state/count")).unwrap(),
        "1\n"
    );
    assert!(w.cached().0.is_empty());
}

#[test]
fn appimage_options_and_variables() {
    let w = World::new();
    let b = w.bundle();
    // Information: offset, versions, help, the sections bundles do not carry.
    let o = w.run(&b, &["--appimage-offset"]);
    ok(&o);
    assert_eq!(stdout(&o), format!("{}\n", runtime_len()));
    let o = w.run(&b, &["--ovl-version"]);
    ok(&o);
    assert!(stdout(&o).starts_with("ovl runtime "), "{}", stdout(&o));
    let o = w.run(&b, &["--appimage-version"]);
    ok(&o);
    assert!(stderr(&o).starts_with("ovl runtime "), "{}", stderr(&o));
    let o = w.run(&b, &["--appimage-help"]);
    ok(&o);
    assert!(stdout(&o).contains("--appimage-extract-and-run"));
    for opt in ["--appimage-signature", "--appimage-updateinformation"] {
        let o = w.run(&b, &[opt]);
        ok(&o);
        assert_eq!(stdout(&o), "\n", "{opt}");
    }
    let o = w.run(&b, &["--appimage-bogus"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("--appimage-bogus"), "{}", stderr(&o));

    // --appimage-extract: the whole tree into ./squashfs-root, replacing what is there.
    let sq = w.p("squashfs-root");
    ok(&w.run(&b, &["--appimage-extract"]));
    assert_eq!(fs::read(sq.join("AppRun")).unwrap(), APP_RUN.as_bytes());
    assert_eq!(
        fs::read_link(sq.join("bin/link")).unwrap(),
        Path::new("../share/greeting.txt")
    );
    let ino = |p: &str| fs::metadata(sq.join(p)).unwrap().ino();
    assert_eq!(ino("share/greeting.txt"), ino("share/hard.txt"));
    assert_eq!(
        fs::metadata(sq.join("share/sub/copy.txt")).unwrap().mode() & 0o7777,
        0o640
    );
    fs::write(sq.join("AppRun"), "changed").unwrap();
    fs::write(sq.join("mine"), "kept").unwrap();
    ok(&w.run(&b, &["--appimage-extract"]));
    assert_eq!(fs::read(sq.join("AppRun")).unwrap(), APP_RUN.as_bytes());
    assert_eq!(fs::read_to_string(sq.join("mine")).unwrap(), "kept");
    fs::remove_dir_all(&sq).unwrap();
    // With a pattern: only the matching paths (a matching directory brings its contents).
    ok(&w.run(&b, &["--appimage-extract", "share/*.txt"]));
    assert!(sq.join("share/greeting.txt").is_file());
    assert!(sq.join("share/hard.txt").is_file());
    assert!(!sq.join("share/sub").exists() && !sq.join("AppRun").exists());
    assert!(!sq.join("share/big.bin").exists());
    fs::remove_dir_all(&sq).unwrap();
    ok(&w.run(&b, &["--appimage-extract", "share"]));
    assert!(sq.join("share/sub/copy.txt").is_file() && !sq.join("bin").exists());
    let o = w.run(&b, &["--appimage-extract", "a", "b"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("usage"), "{}", stderr(&o));
    // Nothing left beside it.
    let names: Vec<_> = fs::read_dir(&w.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(names.is_empty(), "{names:?}");

    // --appimage-extract-and-run and APPIMAGE_EXTRACT_AND_RUN: the app runs from a copy,
    // with the variables AppImage sets, the flag not passed on, this run's changes dropped.
    let sub = w.p("app/share");
    for env in [false, true] {
        let mut c = w.cmd(&b, &[]);
        if env {
            c.env("APPIMAGE_EXTRACT_AND_RUN", "1").args(["exit", "3"]);
        } else {
            c.args([
                "--appimage-extract-and-run",
                "exit",
                "--appimage-extract-and-run",
                "3",
            ]);
        }
        c.current_dir(&sub);
        let o = output(&mut c);
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        assert_eq!(field(&o, "args"), "exit 3");
        assert_eq!(field(&o, "appimage"), b.to_str().unwrap());
        assert_eq!(field(&o, "argv0"), b.to_str().unwrap());
        assert_eq!(field(&o, "owd"), sub.to_str().unwrap());
        assert_eq!(field(&o, "greeting"), "hello bundle");
        assert_eq!(field(&o, "count"), "1");
        let appdir = field(&o, "appdir");
        assert!(Path::new(&appdir).is_absolute());
        assert!(!Path::new(&appdir).exists(), "copy left behind: {appdir}");
        assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    }
    assert!(!w.upper().join("state/count").exists());

    // --appimage-mount: prints the mount point, serves until interrupted.
    if is_root() {
        let mut child = spawn(
            w.cmd(&b, &["--appimage-mount"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let mnt = PathBuf::from(first_line_starting(&mut child, "").trim());
        assert_eq!(
            fs::read_to_string(mnt.join("share/greeting.txt")).unwrap(),
            "hello bundle"
        );
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        assert!(child.wait().unwrap().success());
        assert!(!mnt.join("AppRun").exists());
    }
}

#[test]
fn two_copies_share_the_state_by_name_and_a_commit_never_takes_it_from_the_other() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let a = w.bundle();
    // Another version of the same app (same name, another payload) in another file.
    fs::write(w.p("app/share/greeting.txt"), "hello version two").unwrap();
    let b = w.p("b.run");
    ok(&w.pack(&["-o", b.to_str().unwrap()]));
    let warned = |o: &Output| stderr(o).matches("another version").count();
    let o = w.run(&a, &[]);
    ok(&o);
    assert_eq!((field(&o, "count"), warned(&o)), ("1".into(), 0));
    // State belongs to the name: the other version runs on it, with the switch noted once.
    let o = w.run(&b, &[]);
    ok(&o);
    assert_eq!(field(&o, "greeting"), "hello version two");
    assert_eq!((field(&o, "count"), warned(&o)), ("2".into(), 1));
    for (f, n) in [(&a, 3), (&b, 4), (&a, 5)] {
        let o = w.run(f, &[]);
        ok(&o);
        assert_eq!((field(&o, "count"), warned(&o)), (n.to_string(), 0));
    }
    // A commit into one file would take the state from the other: refused, nothing lost.
    let o = w.run(&a, &["--ovl-on-exit=commit"]);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(stderr(&o).contains(b.to_str().unwrap()), "{}", stderr(&o));
    assert_eq!(
        fs::read_to_string(w.upper().join("state/count")).unwrap(),
        "6\n"
    );
    let o = w.run(&b, &[]);
    ok(&o);
    assert_eq!(field(&o, "count"), "7");
    // With the other copy gone, the commit goes through.
    fs::remove_file(&b).unwrap();
    ok(&w.run(&a, &["--ovl-on-exit=commit"]));
    assert!(!w.upper().join("state/count").exists());
    let o = w.run(&a, &[]);
    ok(&o);
    assert_eq!((field(&o, "count"), warned(&o)), ("9".into(), 0));
}

#[test]
fn mount_option_serves_until_signalled() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let mut child = spawn(
        w.cmd(&b, &["--ovl-mount"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let line = first_line_starting(&mut child, "");
    let mnt = PathBuf::from(line.trim());
    assert_eq!(
        fs::read_to_string(mnt.join("share/greeting.txt")).unwrap(),
        "hello bundle"
    );
    fs::write(mnt.join("state/count"), "41\n").unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert!(!mnt.join("AppRun").exists());
    assert_eq!(field(&w.run(&b, &[]), "count"), "42");
}

#[test]
fn normal_user_runs_a_bundle() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    // Through a symlink to the tree: the tree is packed.
    std::os::unix::fs::symlink(w.p("app"), w.p("applink")).unwrap();
    let o = Command::new(PACK)
        .arg(w.p("applink"))
        .arg("-o")
        .arg(&b)
        .arg("--runtime")
        .arg(runtime())
        .output()
        .unwrap();
    ok(&o);
    ensure_test_user();
    let chown = Command::new("chown")
        .args(["-R", USER])
        .arg(&w.root)
        .status()
        .unwrap();
    assert!(chown.success());
    let script = format!(
        "cd {root} && export HOME={root}/home XDG_CACHE_HOME={root}/home/cache \
         XDG_DATA_HOME={root}/home/data && {b} a; {b} b; {b} --ovl-on-exit=discard c; {b} d; \
         {b} --ovl-on-exit=commit e; echo rc=$?",
        root = w.root.display(),
        b = b.display()
    );
    let o = Command::new("runuser")
        .args(["-u", USER, "--", "sh", "-c", &script])
        .output()
        .unwrap();
    let (out, err) = (stdout(&o), stderr(&o));
    let counts: Vec<_> = out
        .lines()
        .filter_map(|l| l.strip_prefix("count="))
        .collect();
    assert_eq!(counts, ["1", "2", "3", "3", "4"], "{out}{err}");
    assert!(out.contains("rc=0"), "{out}{err}");
    assert!(err.contains("committed"), "{err}");
    // The user's bundle now carries count 4.
    let x = w.p("x");
    ok(&w.run(&b, &["--ovl-extract", x.to_str().unwrap()]));
    assert_eq!(fs::read_to_string(x.join("state/count")).unwrap(), "4\n");
}

#[test]
fn example_recipe_builds_and_runs() {
    if !is_root() {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let w = World::new();
    let out = w.p("notes.run");
    let o = Command::new(PACK)
        .arg(repo.join("packaging/examples/notes"))
        .arg("-o")
        .arg(&out)
        .arg("--runtime")
        .arg(runtime())
        .output()
        .unwrap();
    ok(&o);
    ok(&w.run(&out, &["add", "first note"]));
    let o = w.run(&out, &["list"]);
    ok(&o);
    assert!(stdout(&o).contains("1\tfirst note"), "{}", stdout(&o));
    let o = w.run(&out, &["where"]);
    assert!(stdout(&o).contains(&format!("OWD={}", w.root.display())));
}

/// A run remembers, beside the kept upper, the blocks of the bundle its app read (named with
/// the bundle's id); the next run decompresses them ahead on a thread of its own (its log says
/// so), a discard run too, and the list stays. A list made for another bundle is ignored, and
/// replaced.
#[test]
fn the_blocks_a_run_read_are_prefetched_by_the_next() {
    if !is_root() {
        return;
    }
    let w = World::new();
    let b = w.bundle();
    let info = stdout(&w.run(&b, &["--ovl-info"]));
    let id = info
        .lines()
        .find_map(|l| l.strip_prefix("id:"))
        .unwrap()
        .trim()
        .to_string();
    let list = w.p("home/data/ovl/app/.upper.ovl-prefetch");
    let first = w.run(&b, &[]);
    ok(&first);
    assert!(!stderr(&first).contains("prefetched"), "{}", stderr(&first));
    let text = fs::read_to_string(&list).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(format!("ovl-prefetch 1 {id}").as_str()));
    let blocks: Vec<u32> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    // AppRun and greeting.txt at least (both small: maybe one packed block).
    assert!(!blocks.is_empty(), "{text}");
    let second = w.run(&b, &["--ovl-verbose"]);
    ok(&second);
    // How many were loaded before the app was done depends on the machine's load.
    let want = format!(" of {} blocks", blocks.len());
    assert!(
        stderr(&second)
            .lines()
            .any(|l| l.contains("prefetched ") && l.ends_with(&want)),
        "{}",
        stderr(&second)
    );
    assert_eq!(fs::read_to_string(&list).unwrap(), text);

    // A discard run (a mount of its own) prefetches from the same list.
    let discard = w.run(&b, &["--ovl-verbose", "--ovl-on-exit=discard"]);
    ok(&discard);
    assert!(
        stderr(&discard).contains("prefetched "),
        "{}",
        stderr(&discard)
    );

    fs::write(&list, "ovl-prefetch 1 0123456789abcdef\n1 2 3\n").unwrap();
    let third = w.run(&b, &["--ovl-verbose"]);
    ok(&third);
    assert!(!stderr(&third).contains("prefetched"), "{}", stderr(&third));
    assert_eq!(fs::read_to_string(&list).unwrap(), text);
}
