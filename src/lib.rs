//! # ovl — a userspace overlay filesystem
//!
//! A read-only stack of **lower** directories sits under a writable **upper** directory;
//! FUSE shows the merge at a mount point. Writes copy files up, deletions leave whiteouts, and
//! the lower layers are never touched while mounted. The upper uses kernel overlayfs's on-disk
//! format, so it can be mounted by the kernel or fuse-overlayfs as well.
//!
//! ```no_run
//! let mut ofs = ovl::OverlayFS::new("rootfs");
//! ofs.set_upper("rootfs_upper").set_mountpoint("merged");
//! ofs.mount()?;
//! // ... use ./merged ...
//! ofs.umount()?;
//! # Ok::<(), ovl::Error>(())
//! ```
//!
//! Layers, each using only the ones below it:
//! - [`image`]: a read-only tree packed into one file, read in place (lookups, reads) without
//!   extracting it: an app.run bundle's payload, and a kind of lower layer (it borrows the
//!   engine's syscall wrappers, `engine::sys`).
//! - [`engine`]: the filesystem, split by operation like the kernel's fs/overlayfs, and the
//!   FUSE session that serves it.
//! - [`commit`]: merging an upper into its lower, crash-safe (journal, recovery).
//! - [`overlayfs`] and [`finalize`]: the library API, [`OverlayFS`] (mount, unmount) and its
//!   finalizations (preserve, discard, commit).
//! - [`launcher`]: `ovl-run` (namespaces, signals, running a command in the overlay).
//! - [`bundle`]: `app.run` files (format, packing, the runtime).
//! - `src/bin`: the command lines, parsed by [`cli`].

pub mod bundle;
pub mod cli;
pub mod commit;
pub mod engine;
pub mod error;
pub mod finalize;
pub mod image;
pub mod launcher;
pub mod overlayfs;

pub use engine::inode::InodeMode;
pub use engine::session::{MountHandle, MountMethod};
pub use error::{Error, Result};
pub use finalize::{OverlayAction, Report};
pub use overlayfs::OverlayFS;
