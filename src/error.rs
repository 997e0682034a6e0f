//! The library's error type: every error names the path involved and, for bad input, the fix.

use std::io;
use std::path::PathBuf;

/// Errors of the library API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller asked for something that cannot work; nothing was changed on disk.
    #[error("{}: {msg}", path.display())]
    BadInput {
        /// The offending path.
        path: PathBuf,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// A system call failed on `path`.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The operation needs a mounted overlay.
    #[error("the overlay is not mounted")]
    NotMounted,
}

impl Error {
    pub(crate) fn bad(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadInput {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            source,
        }
    }
}

/// Result alias of the library API.
pub type Result<T> = std::result::Result<T, Error>;
