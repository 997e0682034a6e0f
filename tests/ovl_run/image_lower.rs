//! An image file (`ovl-pack --image-only`) as the lower: read in place by the FUSE engine,
//! whatever backend is asked for by default; the kernel's overlay cannot take it.

use super::*;

/// Packs the world's lower into `lower.img` beside it.
fn image(w: &World) -> PathBuf {
    let img = w.p("lower.img");
    let f = fs::File::create(&img).unwrap();
    ovl::image::write_image(&w.lower, &f, 0, &Default::default()).unwrap();
    img
}

#[test]
fn an_image_lower_is_read_in_place_and_kept_state_sits_on_it() {
    let w = World::new();
    let img = image(&w);
    let upper = w.p("img_upper");
    let ovl = |args: &[&str]| {
        let mut c = w.ovl();
        c.arg("--lower")
            .arg(&img)
            .arg("--upper")
            .arg(&upper)
            .args(["--backend", "auto", "-v"])
            .args(args);
        run(c)
    };
    let o = ovl(&["--", "sh", "-c", "cat f sub/g; echo new > new; rm sub/g"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, "lower\ng\n");
    assert!(o.stderr.contains("backend: fuse"), "{}", o.stderr);
    assert!(o.stderr.contains("image file"), "{}", o.stderr);
    // The changes are in the upper, the image is untouched, and the next run sees them.
    assert_eq!(read(upper.join("new")), "new\n");
    let o = ovl(&["--", "sh", "-c", "ls; ls sub | wc -l"]);
    assert_eq!(o.code, 0, "{o:?}");
    assert_eq!(o.stdout, "f\nnew\nsub\n0\n");
}

#[test]
fn the_kernel_backend_refuses_an_image_lower_and_changes_nothing() {
    let w = World::new();
    let img = image(&w);
    let before = fs::read(&img).unwrap();
    let upper = w.p("img_upper");
    let mut c = w.ovl();
    c.arg("--lower").arg(&img).arg("--upper").arg(&upper).args([
        "--backend",
        "kernel",
        "--",
        "true",
    ]);
    let o = run(c);
    assert_eq!(o.code, 125, "{o:?}");
    assert_eq!(
        o.stderr,
        "ovl-run: a lower is an image file (read in place by the FUSE engine only): use \
         --backend fuse or auto\n"
    );
    assert!(!upper.exists());
    assert_eq!(fs::read(&img).unwrap(), before);
}

#[test]
fn a_commit_into_an_image_is_refused_before_anything_runs() {
    let w = World::new();
    let img = image(&w);
    let before = fs::read(&img).unwrap();
    for how in ["commit", "commit-atomic"] {
        let mut c = w.ovl();
        c.arg("--lower")
            .arg(&img)
            .args(["--on-exit", how, "--", "sh", "-c", "echo ran"]);
        let o = run(c);
        assert_eq!(o.code, 125, "{o:?}");
        assert_eq!(o.stdout, "");
        assert_eq!(
            o.stderr,
            format!(
                "ovl-run: {}: --on-exit {how} cannot write into an image: keep the upper \
                 (preserve), or pack the merged tree with ovl-pack\n",
                img.display()
            )
        );
    }
    assert_eq!(fs::read(&img).unwrap(), before);
    assert!(!w.p("lower.img_upper").exists());
}
