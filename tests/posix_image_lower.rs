//! The POSIX suite of tests/posix.rs again, with every mount reading its lower in place from
//! an image packed from the lower directory (the way app.run serves its tree): the binary's
//! name makes `common::lower_image_default` true.

#[path = "posix.rs"]
mod posix;
