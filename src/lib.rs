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
//! The engine is split by operation like the kernel's fs/overlayfs: [`namei`] (lookup),
//! `dir` (create/unlink/rename), `file` (I/O), `attr`, `xattr`, `readdir`, `copy_up`, and
//! [`mount`]; `fs` is the thin FUSE dispatch over them.
//!
//! Above the engine, using only its API: [`launcher`] (`ovl-run`), [`commit`] and [`bundle`]
//! (`app.run` files).

pub mod action;
mod attr;
pub mod bundle;
pub mod cli;
pub mod commit;
mod copy_up;
mod dir;
pub mod error;
mod file;
mod fs;
pub mod fusermount;
pub mod inode;
pub mod launcher;
pub mod layers;
pub mod mount;
pub mod namei;
mod overlay;
mod readdir;
mod setid;
mod sys;
mod xattr;

pub use action::{OverlayAction, Report};
pub use error::{Error, Result};
pub use inode::InodeMode;
pub use mount::{MountHandle, MountMethod, OverlayFS};
