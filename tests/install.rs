//! What `cargo install --path .` gives a user: the binaries alone in a directory, nothing of the
//! source tree or its target directory beside them. ovl-pack must pack with its built-in runtime
//! and the bundle must run (as a normal user's PATH would find it, with no OVL_RUNTIME).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
fn a_copied_ovl_pack_packs_with_its_built_in_runtime() {
    let t = tempfile::tempdir().unwrap();
    let bin = t.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let pack = bin.join("ovl-pack");
    fs::copy(env!("CARGO_BIN_EXE_ovl-pack"), &pack).unwrap();

    let app = t.path().join("app");
    fs::create_dir(&app).unwrap();
    fs::write(app.join("AppRun"), "#!/bin/sh\necho \"hello $1\"\nexit 7\n").unwrap();
    fs::set_permissions(app.join("AppRun"), fs::Permissions::from_mode(0o755)).unwrap();

    let out = t.path().join("x.run");
    let st = Command::new(&pack)
        .arg(&app)
        .arg("-o")
        .arg(&out)
        .env_remove("OVL_RUNTIME")
        .current_dir(t.path())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "ovl-pack alone failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );

    // The bundle runs on its own: the runtime at its head is the static one.
    let run = Command::new(&out)
        .arg("world")
        .env("XDG_CACHE_HOME", t.path().join("cache"))
        .env("XDG_DATA_HOME", t.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "hello world\n");
    assert_eq!(run.status.code(), Some(7));
    let ldd = Command::new("ldd").arg(&out).output().unwrap();
    let said =
        String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    assert!(
        said.contains("statically linked") || said.contains("not a dynamic executable"),
        "the built-in runtime is not static: {said}"
    );
}

#[test]
fn a_runtime_given_with_runtime_that_is_not_an_executable_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let app = t.path().join("app");
    fs::create_dir(&app).unwrap();
    fs::write(app.join("AppRun"), "#!/bin/sh\n").unwrap();
    fs::write(t.path().join("junk"), "not an ELF").unwrap();
    let out = t.path().join("x.run");
    let st = Command::new(env!("CARGO_BIN_EXE_ovl-pack"))
        .arg(&app)
        .arg("-o")
        .arg(&out)
        .arg("--runtime")
        .arg(t.path().join("junk"))
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(1));
    let err = String::from_utf8_lossy(&st.stderr);
    assert!(err.contains("junk: not an executable"), "{err}");
    assert!(!out.exists(), "nothing is written on bad input");
}

/// Man pages and completions come from the binaries' own clap definitions
/// (`packaging/gen-docs.sh`): every binary writes them, and they name its real options.
#[test]
fn man_pages_and_completions_are_generated_from_the_command_lines() {
    let t = tempfile::tempdir().unwrap();
    // An option each man page must describe, and one its bash completion must offer.
    for (prog, bin, option, completed) in [
        (
            "ovl-run",
            env!("CARGO_BIN_EXE_ovl-run"),
            "--on-exit",
            "--on-exit",
        ),
        (
            "ovl-mount",
            env!("CARGO_BIN_EXE_ovl-mount"),
            "lowerdir",
            "--help",
        ),
        (
            "ovl-pack",
            env!("CARGO_BIN_EXE_ovl-pack"),
            "--entry",
            "--entry",
        ),
    ] {
        let st = Command::new(bin)
            .env("OVL_GENERATE_DOCS", t.path())
            .status()
            .unwrap();
        assert!(st.success(), "{prog}");
        let man = fs::read_to_string(t.path().join(format!("share/man/man1/{prog}.1"))).unwrap();
        // roff writes a literal hyphen as \-.
        let man = man.replace("\\-", "-");
        assert!(
            man.starts_with(".ie") || man.contains(".TH"),
            "{prog}: not roff"
        );
        assert!(man.contains(option), "{prog}.1 lacks {option}");
        let bash = t
            .path()
            .join(format!("share/bash-completion/completions/{prog}"));
        let syntax = Command::new("bash").arg("-n").arg(&bash).status().unwrap();
        assert!(syntax.success(), "{prog}: bash completion does not parse");
        assert!(
            fs::read_to_string(&bash).unwrap().contains(completed),
            "{prog}: completion lacks {completed}"
        );
        for f in [
            format!("share/zsh/site-functions/_{prog}"),
            format!("share/fish/vendor_completions.d/{prog}.fish"),
        ] {
            assert!(fs::metadata(t.path().join(&f)).unwrap().len() > 0, "{f}");
        }
    }
}
