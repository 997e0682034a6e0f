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
