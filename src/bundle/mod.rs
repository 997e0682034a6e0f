//! `app.run` bundles: one file holding a static runtime and an app's tree, which runs the
//! app inside an overlay with a writable layer of its own.
//!
//! A layer above the engine, like the launcher and the commit engine:
//! - [`format`]: the bytes (trailer, manifest; the tree is an [`crate::image`]);
//! - [`pack`](mod@pack): building a bundle from a directory (`ovl-pack`);
//! - [`extract`]: opening, verifying and extracting one;
//! - [`cache`]: the shared cache of extracted trees, and `--ovl-gc`;
//! - [`state`]: an app's kept upper, and committing it into a new bundle file;
//! - [`instances`]: the server that runs every instance of an app on one mount;
//! - [`prefetch`]: the blocks a start reads, remembered and decompressed ahead the next time;
//! - [`runtime`]: what `./app.run` does (`runtime/` is the binary around it).
//!
//! ```no_run
//! use std::path::Path;
//! let runtime = std::fs::read("target/x86_64-unknown-linux-gnu/runtime/ovl-runtime")?;
//! ovl::bundle::pack(Path::new("hello"), &runtime, Path::new("hello.run"), &Default::default())?;
//! let b = ovl::bundle::Bundle::open(Path::new("hello.run"))?;
//! assert!(b.verify()?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod cache;
pub mod extract;
pub mod format;
pub mod instances;
pub mod pack;
pub mod prefetch;
pub mod runtime;
pub mod state;

pub use extract::Bundle;
pub use pack::{PackOptions, PackSummary, pack};
