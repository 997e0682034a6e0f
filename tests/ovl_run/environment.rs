//! The working directory mapped into the mount, and the environment the command gets.

use super::*;

#[test]
fn cwd_maps_into_the_mount_and_env_is_set() {
    let w = World::new();
    let script = "pwd; echo \"$OVL_MOUNTPOINT\"; echo \"$OVL_LOWER\"; echo \"$OVL_UPPER\"; cat g";
    let mut c = w.ovl_lower(&["-q", "--", "sh", "-c", script]);
    c.current_dir(w.lower.join("sub"));
    let r = Running::start(c);
    let pid = r.pid();
    let o = r.wait(DEADLINE);
    assert_eq!(o.code, 0, "{o:?}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{o:?}");
    let mnt = Path::new(lines[1]);
    assert_eq!(mnt.parent(), Some(w.cache.as_path()), "{o:?}");
    let name = mnt.file_name().unwrap().to_string_lossy();
    assert!(name.starts_with(&format!("mount_lower_{pid}_")), "{o:?}");
    assert_eq!(Path::new(lines[0]), mnt.join("sub"));
    assert_eq!(lines[2], w.lower.to_str().unwrap());
    assert_eq!(lines[3], w.upper().to_str().unwrap());
    assert_eq!(lines[4], "g");

    // From outside the lower: the root of the mount.
    let mut c = w.ovl_lower(&["-q", "--", "sh", "-c", "pwd; echo \"$OVL_MOUNTPOINT\""]);
    c.current_dir("/");
    let o = run(c);
    assert_eq!(o.code, 0, "{o:?}");
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{o:?}");
    assert_eq!(lines[0], lines[1]);
    assert!(Path::new(lines[0]).starts_with(&w.cache), "{o:?}");

    // An explicit upper is passed on as given.
    let up = w.p("explicit_upper");
    let o = run(w.ovl_lower(&[
        "-q",
        "--upper",
        up.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo \"$OVL_UPPER\"",
    ]));
    assert_eq!(
        (o.code, o.stdout.trim()),
        (0, up.to_str().unwrap()),
        "{o:?}"
    );
}

/// Each build of the suite runs on its backend, as root and as the normal user: the command
/// sees ovl's FUSE mount in `ovl_run`, the kernel's overlay in `ovl_run_kernel` (where the
/// kernel can serve it here), and `-v` names the backend.
#[test]
fn the_suite_runs_on_its_backend() {
    let want = |b: &str| match b {
        "kernel" => "overlayfs\n",
        _ => "fuseblk\n",
    };
    let w = World::new();
    let o = run(w.ovl_lower(&["-v", "--", "stat", "-f", "-c", "%T", "."]));
    assert_eq!((o.code, o.stdout.as_str()), (0, want(backend())), "{o:?}");
    if backend() != "auto" {
        assert!(
            o.stderr.contains(&format!("backend: {}\n", backend())),
            "{o:?}"
        );
    }
    if !root_or_skip() {
        return;
    }
    let w = World::new();
    let (bin, _, _) = user_world(&w);
    let o = user_sh(&w, &bin, &["-q"], "stat -f -c %T .");
    assert_eq!(
        (o.code, o.stdout.as_str()),
        (0, want(user_backend())),
        "{o:?}"
    );
}
