//! The POSIX suite of tests/posix.rs again, every mount served over FUSE-over-io_uring where
//! the kernel offers it (the binary's name makes `common::uring_default` true, and the mount
//! checks it got the ring).

#[path = "posix.rs"]
mod posix;
