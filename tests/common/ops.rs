//! Random file-system operations for the seeded property tests (tests/commit and
//! tests/differential): the operations, applied the same way to the mount under test and to the
//! reference tree, each returning what it read or its errno. Each suite keeps its own generator
//! (its weights and name pools are what it tests), so a seed replays the same sequence as before.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::{Rng, rngs::StdRng};

use super::sys::*;

#[derive(Clone, Debug)]
pub enum Op {
    /// open(O_WRONLY|O_CREAT|O_TRUNC [|O_EXCL], 0644) + write.
    Create {
        path: String,
        data: String,
        excl: bool,
    },
    Append {
        path: String,
        data: String,
    },
    Truncate {
        path: String,
        len: u64,
    },
    WriteAt {
        path: String,
        off: u64,
        data: String,
    },
    /// renameat2 with flags 0, RENAME_NOREPLACE or RENAME_EXCHANGE.
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Link {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Mkdir {
        path: String,
        mode: Mode,
    },
    Rmdir {
        path: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    Chmod {
        path: String,
        mode: Mode,
    },
    /// lchown.
    Chown {
        path: String,
        uid: u32,
        gid: u32,
    },
    /// utimensat(AT_SYMLINK_NOFOLLOW) of the mtime only.
    SetTimes {
        path: String,
        mtime: (i64, i64),
    },
    SetXattr {
        path: String,
        name: String,
        value: String,
        flags: i32,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    Read {
        path: String,
    },
    Stat {
        path: String,
    },
    /// An empty path lists the root.
    ListDir {
        path: String,
    },
}

/// A mode, shown in octal.
#[derive(Clone, Copy)]
pub struct Mode(pub u32);

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0o{:o}", self.0)
    }
}

/// What a step returned: data it read (empty for most), or the errno.
pub type Res = Result<String, i32>;

pub fn show(r: &Res) -> String {
    match r {
        Ok(s) if s.is_empty() => "ok".into(),
        Ok(s) => format!("ok {s}"),
        Err(e) => format!("errno {e} ({})", io::Error::from_raw_os_error(*e)),
    }
}

pub fn pick<'a>(rng: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[rng.gen_range(0..from.len())]
}

/// 0 to 23 random lowercase letters.
pub fn data(rng: &mut StdRng) -> String {
    let n = rng.gen_range(0..24);
    (0..n)
        .map(|_| (b'a' + rng.gen_range(0..26u8)) as char)
        .collect()
}

/// One letter per file type, as `ls -l` shows it (`f` for a regular file).
pub fn kind_char(ft: fs::FileType) -> char {
    if ft.is_dir() {
        'd'
    } else if ft.is_file() {
        'f'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_socket() {
        's'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else {
        '?'
    }
}

/// Applies `op` under `root`. `Stat` shows kind, mode and (not for directories) size, plus the
/// link count with `stat_nlink` (where both sides are expected to count links alike).
pub fn apply(root: &Path, op: &Op, stat_nlink: bool) -> Res {
    let j = |p: &str| -> PathBuf {
        if p.is_empty() {
            root.to_path_buf()
        } else {
            root.join(p)
        }
    };
    let r: io::Result<String> = (|| {
        match op {
            Op::Create { path, data, excl } => {
                let mut o = fs::OpenOptions::new();
                o.write(true).mode(0o644);
                if *excl {
                    o.create_new(true);
                } else {
                    o.create(true).truncate(true);
                }
                o.open(j(path))?.write_all(data.as_bytes())?;
            }
            Op::Append { path, data } => {
                fs::OpenOptions::new()
                    .append(true)
                    .open(j(path))?
                    .write_all(data.as_bytes())?;
            }
            Op::Truncate { path, len } => {
                let cp = cpath(&j(path));
                check(unsafe { libc::truncate(cp.as_ptr(), *len as libc::off_t) })?;
            }
            Op::WriteAt { path, off, data } => {
                fs::OpenOptions::new()
                    .write(true)
                    .open(j(path))?
                    .write_all_at(data.as_bytes(), *off)?;
            }
            Op::Rename { from, to, flags } => renameat2(&j(from), &j(to), *flags)?,
            Op::Link { from, to } => fs::hard_link(j(from), j(to))?,
            Op::Unlink { path } => fs::remove_file(j(path))?,
            Op::Mkdir { path, mode } => fs::DirBuilder::new().mode(mode.0).create(j(path))?,
            Op::Rmdir { path } => fs::remove_dir(j(path))?,
            Op::Symlink { target, path } => std::os::unix::fs::symlink(target, j(path))?,
            Op::Chmod { path, mode } => {
                fs::set_permissions(j(path), fs::Permissions::from_mode(mode.0))?
            }
            Op::Chown { path, uid, gid } => lchown(&j(path), *uid, *gid)?,
            Op::SetTimes { path, mtime } => set_times(&j(path), None, Some(*mtime))?,
            Op::SetXattr {
                path,
                name,
                value,
                flags,
            } => lsetxattr(&j(path), name, value.as_bytes(), *flags)?,
            Op::RemoveXattr { path, name } => lremovexattr(&j(path), name)?,
            Op::Read { path } => return Ok(fs::read(j(path))?.escape_ascii().to_string()),
            Op::Stat { path } => {
                let md = fs::symlink_metadata(j(path))?;
                let k = kind_char(md.file_type());
                let mut s = format!("{k} mode={:o}", md.mode() & 0o7777);
                if k != 'd' {
                    s += &format!(" size={}", md.size());
                    if stat_nlink {
                        s += &format!(" nlink={}", md.nlink());
                    }
                }
                return Ok(s);
            }
            Op::ListDir { path } => {
                let mut ns = fs::read_dir(j(path))?
                    .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                    .collect::<io::Result<Vec<_>>>()?;
                ns.sort();
                return Ok(ns.join(","));
            }
        }
        Ok(String::new())
    })();
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}
