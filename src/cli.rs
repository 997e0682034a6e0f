//! Command-line parsing shared by the binaries: clap's errors cut to one line.

/// What a binary does when its command line does not parse into `T`.
#[derive(Debug)]
pub enum ArgsError {
    /// `--help` or `--version` was printed: exit successfully.
    Printed,
    /// A usage error, as one line naming what is wrong and where to look.
    Usage(String),
}

/// Parses the process's arguments. clap's usage errors are several lines; the one that says
/// what is wrong is kept, followed by a pointer to `PROG --help`.
///
/// ```no_run
/// #[derive(clap::Parser)]
/// struct Args { path: std::path::PathBuf }
/// match ovl::cli::parse::<Args>("tool") {
///     Ok(args) => { /* run */ }
///     Err(ovl::cli::ArgsError::Printed) => {}
///     Err(ovl::cli::ArgsError::Usage(line)) => eprintln!("tool: {line}"),
/// }
/// ```
pub fn parse<T: clap::Parser>(prog: &str) -> Result<T, ArgsError> {
    if let Some(dir) = std::env::var_os(GENERATE_DOCS) {
        return match generate_docs(&T::command(), prog, std::path::Path::new(&dir)) {
            Ok(()) => Err(ArgsError::Printed),
            Err(e) => Err(ArgsError::Usage(format!(
                "writing the man page and completions into {}: {e}",
                std::path::Path::new(&dir).display()
            ))),
        };
    }
    T::try_parse().map_err(|e| {
        use clap::error::ErrorKind::*;
        if matches!(e.kind(), DisplayHelp | DisplayVersion) {
            let _ = e.print();
            return ArgsError::Printed;
        }
        let text = e.to_string();
        let mut lines = text.lines().skip_while(|l| !l.starts_with("error:"));
        let mut line = lines
            .next()
            .unwrap_or("invalid arguments")
            .trim_start_matches("error: ")
            .to_string();
        // "the following required arguments were not provided:" lists them below.
        if line.ends_with(':') {
            let items: Vec<&str> = lines
                .take_while(|l| l.starts_with("  "))
                .map(str::trim)
                .collect();
            line = format!("{} {}", line, items.join(", "));
        }
        ArgsError::Usage(format!("{line} (see {prog} --help)"))
    })
}

/// Set to a directory, a binary writes its man page and shell completions there (from the same
/// clap definition that parses its arguments) and exits: `packaging/gen-docs.sh` uses it.
pub const GENERATE_DOCS: &str = "OVL_GENERATE_DOCS";

/// Writes `DIR/share/man/man1/PROG.1` and the bash, zsh and fish completions under
/// `DIR/share/...` in the places those shells look when DIR is a prefix such as `/usr/local`.
pub fn generate_docs(
    cmd: &clap::Command,
    prog: &str,
    dir: &std::path::Path,
) -> std::io::Result<()> {
    use clap_complete::Shell;
    use std::fs;
    let cmd = cmd.clone().bin_name(prog.to_string());
    let man = dir.join("share/man/man1");
    fs::create_dir_all(&man)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut page)?;
    fs::write(man.join(format!("{prog}.1")), page)?;
    for (shell, sub, file) in [
        (
            Shell::Bash,
            "share/bash-completion/completions",
            prog.to_string(),
        ),
        (Shell::Zsh, "share/zsh/site-functions", format!("_{prog}")),
        (
            Shell::Fish,
            "share/fish/vendor_completions.d",
            format!("{prog}.fish"),
        ),
    ] {
        let d = dir.join(sub);
        fs::create_dir_all(&d)?;
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), prog, &mut out);
        fs::write(d.join(file), out)?;
    }
    Ok(())
}
