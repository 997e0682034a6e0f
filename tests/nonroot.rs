//! A normal user mounts with ovl-mount through fusermount3 (no privileges, no setuid of ours).

mod common;
use common::user::*;
use common::*;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ovl-mount");
const USER: &str = TEST_USER;

fn as_user(script: &str) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", USER, "--", "sh", "-c", script])
        .output()
        .expect("runuser")
}

#[test]
fn normal_user_mounts_via_fusermount3() {
    if !is_root() {
        eprintln!("needs root to create the test user; run the suite as root");
        return;
    }
    let mode = fs::metadata("/dev/fuse").expect("/dev/fuse").mode();
    assert_eq!(
        mode & 0o006,
        0o006,
        "/dev/fuse is not open to users: run packaging/setup-deps.sh (chmod 0666 /dev/fuse)"
    );
    let (uid, gid) = ensure_test_user();
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    fs::set_permissions(r, fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["lower/d", "upper", "work", "mnt"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    fs::write(r.join("lower/f"), "lower data").unwrap();
    fs::write(r.join("lower/d/g"), "g").unwrap();
    // The binary where the user can run it.
    fs::copy(BIN, r.join("ovl-mount")).unwrap();
    let chown = |p: &Path| std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
    for d in [
        "lower",
        "lower/d",
        "lower/f",
        "lower/d/g",
        "upper",
        "work",
        "mnt",
        "ovl-mount",
    ] {
        chown(&r.join(d));
    }
    let p = r.display();
    let out = as_user(&format!(
        "set -e; {p}/ovl-mount -o lowerdir={p}/lower,upperdir={p}/upper,workdir={p}/work {p}/mnt
         cat {p}/mnt/f; echo; echo new > {p}/mnt/new; rm {p}/mnt/d/g; echo more >> {p}/mnt/f
         ls {p}/mnt {p}/mnt/d; stat -c %U {p}/mnt/new
         fusermount3 -u {p}/mnt"
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "lower data",
            &format!("{p}/mnt:"),
            "d",
            "f",
            "new",
            "",
            &format!("{p}/mnt/d:"),
            USER
        ]
    );
    // Changes landed in the upper, owned by the user; the lower is untouched.
    assert_eq!(fs::read_to_string(r.join("upper/new")).unwrap(), "new\n");
    assert_eq!(
        fs::read_to_string(r.join("upper/f")).unwrap(),
        "lower datamore\n"
    );
    assert_eq!(fs::metadata(r.join("upper/new")).unwrap().uid(), uid);
    let wh = fs::symlink_metadata(r.join("upper/d/g")).unwrap();
    assert_eq!((wh.mode() & libc::S_IFMT, wh.rdev()), (libc::S_IFCHR, 0));
    assert_eq!(fs::read_to_string(r.join("lower/f")).unwrap(), "lower data");
    assert!(r.join("lower/d/g").exists());
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&format!("{p}/mnt ")), "still mounted");
}

/// Set-ID bits of files a normal user writes, truncates or chowns, on a mount made by root
/// (shared, as fuse-overlayfs's): on the kernel overlay, and on ovl with and without
/// passthrough. ovl negotiates HANDLE_KILLPRIV_V2, so dropping the bits is its own job.
#[test]
fn setid_bits_dropped_like_the_kernel() {
    if !is_root() {
        eprintln!("needs root to create the test user; run the suite as root");
        return;
    }
    let (uid, gid) = ensure_test_user();
    // 2 MB files are written through passthrough, 100-byte ones too once opened for writing.
    let script = |m: &Path| {
        let m = m.display();
        format!(
            "echo x >> {m}/append; truncate -s 10 {m}/truncate; echo y > {m}/otrunc; \
             dd if=/dev/zero of={m}/pwrite bs=1 count=1 conv=notrunc status=none; \
             chown {USER} {m}/chown; echo z >> {m}/mlock"
        )
    };
    let names = [
        "append", "truncate", "otrunc", "pwrite", "chown", "mlock", "root",
    ];
    let run = |m: &Path, size: usize| -> Vec<String> {
        fs::set_permissions(m, fs::Permissions::from_mode(0o777)).unwrap();
        for n in names {
            let p = m.join(n);
            fs::write(&p, vec![0u8; size]).unwrap();
            std::os::unix::fs::chown(&p, Some(uid), Some(gid)).unwrap();
            // `mlock`: set-group-ID without group execute (mandatory locking) is kept.
            let mode = if n == "mlock" { 0o6745 } else { 0o6775 };
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
        let out = as_user(&script(m));
        assert!(out.status.success(), "{out:?}");
        // Root keeps the bits when it writes (CAP_FSETID).
        fs::OpenOptions::new()
            .append(true)
            .open(m.join("root"))
            .unwrap()
            .write_all(b"r")
            .unwrap();
        names
            .iter()
            .map(|n| format!("{n} {:o}", fs::metadata(m.join(n)).unwrap().mode() & 0o7777))
            .collect()
    };
    use std::io::Write;
    for size in [100, 2_000_000] {
        let k = tempfile::tempdir().unwrap();
        fs::set_permissions(k.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let kp = |s: &str| k.path().join(s);
        for d in ["lower", "upper", "work", "mnt"] {
            fs::create_dir(kp(d)).unwrap();
        }
        let want = {
            let _km = KernelMount::new(&[&kp("lower")], &kp("upper"), &kp("work"), &kp("mnt"));
            run(&kp("mnt"), size)
        };
        assert_eq!(
            want,
            [
                "append 775",
                "truncate 775",
                "otrunc 775",
                "pwrite 775",
                "chown 775",
                "mlock 2745",
                "root 6775"
            ]
        );
        for passthrough in [true, false] {
            let t = tempfile::tempdir().unwrap();
            fs::set_permissions(t.path(), fs::Permissions::from_mode(0o755)).unwrap();
            let tp = |s: &str| t.path().join(s);
            for d in ["lower", "upper", "work", "mnt"] {
                fs::create_dir(tp(d)).unwrap();
            }
            let mut ofs = ovl::OverlayFS::new(tp("lower"));
            ofs.set_upper(tp("upper"))
                .set_workdir(tp("work"))
                .set_mountpoint(tp("mnt"))
                .set_allow_other(true)
                .set_passthrough(passthrough);
            ofs.mount().unwrap();
            let got = run(&tp("mnt"), size);
            ofs.umount().unwrap();
            assert_eq!(got, want, "passthrough {passthrough}, {size}-byte files");
            // As stored, not only as the kernel had cached it.
            for line in &want {
                let (n, mode) = line.split_once(' ').unwrap();
                let stored = fs::metadata(tp("upper").join(n)).unwrap().mode() & 0o7777;
                assert_eq!(format!("{stored:o}"), mode, "{n} in the upper");
            }
        }
    }
}

/// A normal user lists a directory holding another user's 0700 subdirectory: the lookup's
/// read of the subdirectory's `user.overlay.opaque` mark fails with EACCES, which means "no
/// mark" (as in the kernel's overlay with `userxattr`), so `ls -la` and `stat` work as on the
/// host, and only entering the subdirectory is refused.
#[test]
fn unreadable_subdirectory_of_another_user_is_listed() {
    if !is_root() {
        eprintln!("needs root to create the test user; run the suite as root");
        return;
    }
    let (uid, gid) = ensure_test_user();
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    fs::set_permissions(r, fs::Permissions::from_mode(0o755)).unwrap();
    for d in ["lower/private/inner", "lower/pub", "upper", "work", "mnt"] {
        fs::create_dir_all(r.join(d)).unwrap();
    }
    // Root's private directory, with an opaque mark the user could not read anyway.
    xattr::set(r.join("lower/private"), "user.overlay.opaque", b"y").unwrap();
    fs::set_permissions(r.join("lower/private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::copy(BIN, r.join("ovl-mount")).unwrap();
    for d in ["upper", "work", "mnt", "ovl-mount"] {
        std::os::unix::fs::chown(r.join(d), Some(uid), Some(gid)).unwrap();
    }
    let p = r.display();
    let out = as_user(&format!(
        "{p}/ovl-mount -o lowerdir={p}/lower,upperdir={p}/upper,workdir={p}/work {p}/mnt || exit 9
         cd {p}/mnt; ls -la | awk 'NR > 1 {{ print $1, $NF }}'; stat -c '%a %U %n' private
         ls private 2>&1 | sed 's/.*: //'; cd /; fusermount3 -u {p}/mnt"
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "drwxr-xr-x .",
            "drwxr-xr-x ..",
            "drwx------ private",
            "drwxr-xr-x pub",
            "700 root private",
            "Permission denied",
        ],
        "{out:?}"
    );
}
