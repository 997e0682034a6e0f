//! The overlay filesystem engine, split by operation like the kernel's fs/overlayfs.
//!
//! - [`layers`]: the layer stack and the on-disk format (whiteouts, opaque marks, xattrs).
//! - [`inode`]: the inode store (one owner, refcounts tied to FUSE lookup/forget).
//! - [`lower`]: the two kinds of lower layer (a directory, an image read in place).
//! - [`namei`]: name lookup through the layers.
//! - `dir`: create, unlink, rename; `file`: open files and I/O; `attr`, `xattr`, `readdir`.
//! - `export`: file handles (resolving a node id the kernel forgot).
//! - `copy_up`: bringing a lower entry into the upper (temp file + fsync + rename).
//! - `overlay`: the state every operation shares; `fs`: the thin FUSE dispatch over them.
//! - [`session`]: mounting and serving a layer stack; [`fusermount`]: unprivileged mounts.
//!
//! Nothing here knows about commit, the launcher or bundles: those layers sit above and use
//! [`crate::OverlayFS`].

mod attr;
pub(crate) mod copy_up;
mod dir;
mod export;
mod file;
mod fs;
pub mod fusermount;
pub mod idmap;
pub mod inode;
pub mod layers;
pub mod lower;
pub mod namei;
mod ops;
pub(crate) mod overlay;
mod private_mount;
mod readdir;
pub mod session;
mod setid;
pub(crate) mod sys;
mod uring;
mod xattr;
