//! The FUSE protocol as the ring carries it: decoding each request the engine serves and
//! encoding its reply, both into [`Ops`] calls. fuser does this for requests read from
//! /dev/fuse, but privately, so the ring needs its own. Layouts from
//! include/uapi/linux/fuse.h (protocol 7.42); little-endian fields read at fixed offsets.
//!
//! On the ring a request arrives split: the in-header in the entry's `in_out` area, the
//! operation's fixed-size argument struct (`fuse_*_in`, the kernel's "argument 0") in `op_in`,
//! and everything after it (names, write data) in the payload. The reply goes back the same
//! way: the out-header in `in_out`, the whole reply body in the payload.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, TimeOrNow};

use crate::engine::attr::SetAttr;
use crate::engine::ops::{Entry, FOPEN_PASSTHROUGH, Opened, Ops};
use crate::engine::xattr::XattrReply;

// Opcodes (enum fuse_opcode).
const LOOKUP: u32 = 1;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const READLINK: u32 = 5;
const SYMLINK: u32 = 6;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const UNLINK: u32 = 10;
const RMDIR: u32 = 11;
const RENAME: u32 = 12;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const STATFS: u32 = 17;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const SETXATTR: u32 = 21;
const GETXATTR: u32 = 22;
const LISTXATTR: u32 = 23;
const REMOVEXATTR: u32 = 24;
const FLUSH: u32 = 25;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const FSYNCDIR: u32 = 30;
const ACCESS: u32 = 34;
const CREATE: u32 = 35;
const DESTROY: u32 = 38;
const IOCTL: u32 = 39;
const FALLOCATE: u32 = 43;
const READDIRPLUS: u32 = 44;
const RENAME2: u32 = 45;
const LSEEK: u32 = 46;
const COPY_FILE_RANGE: u32 = 47;

// fuse_setattr_in.valid
const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_FH: u32 = 1 << 6;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
const GETATTR_FH: u32 = 1;
const FSYNC_FDATASYNC: u32 = 1;
const WRITE_KILL_SUIDGID: u32 = 1 << 2;

/// Sizes of the ring entry's header block (struct fuse_uring_req_header).
pub const IN_OUT: usize = 128;
pub const OP_IN: usize = 128;
/// struct fuse_uring_ent_in_out { flags u64, commit_id u64, payload_sz u32, pad u32, rsv u64 }
pub const ENT_IN_OUT: usize = 32;
pub const HEADER: usize = IN_OUT + OP_IN + ENT_IN_OUT;
const ENT: usize = IN_OUT + OP_IN;

const ENTRY_OUT: usize = 40 + ATTR;
const ATTR: usize = 88;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The fields of struct fuse_in_header the engine uses.
#[derive(Clone, Copy, Debug)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> InHeader {
        // len u32, opcode u32, unique u64, nodeid u64, uid, gid, pid u32, extlen u16, pad u16
        InHeader {
            opcode: u32_at(b, 4),
            unique: u64_at(b, 8),
            nodeid: u64_at(b, 16),
            uid: u32_at(b, 24),
            gid: u32_at(b, 28),
            pid: u32_at(b, 32),
        }
    }
}

/// The commit id (the request's unique) and payload length the kernel wrote into the entry.
pub fn ent_in(header: &[u8]) -> (u64, usize) {
    (u64_at(header, ENT + 8), u32_at(header, ENT + 16) as usize)
}

/// Writes the out-header and the reply's payload length into the entry's header block.
pub fn set_reply(header: &mut [u8], unique: u64, res: Result<usize, i32>) {
    let (error, len) = match res {
        Ok(len) => (0, len),
        Err(e) => (-e, 0),
    };
    // struct fuse_out_header { len u32, error i32, unique u64 }
    put32(header, 0, (16 + len) as u32);
    put32(header, 4, error as u32);
    put64(header, 8, unique);
    put32(header, ENT + 16, len as u32);
}

/// The NUL-terminated string at the start of `b`, and what follows it.
fn cstr(b: &[u8]) -> Result<(&OsStr, &[u8]), i32> {
    let n = b.iter().position(|&c| c == 0).ok_or(libc::EINVAL)?;
    Ok((OsStr::from_bytes(&b[..n]), &b[n + 1..]))
}

fn time(t: &SystemTime) -> (u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs(), d.subsec_nanos()),
        // Before 1970: seconds count down, nanoseconds up (as struct timespec).
        Err(e) => {
            let d = e.duration();
            let (s, n) = (d.as_secs() as i64, d.subsec_nanos());
            if n == 0 {
                ((-s) as u64, 0)
            } else {
                ((-s - 1) as u64, 1_000_000_000 - n)
            }
        }
    }
}

fn time_in(secs: u64, nsec: u32) -> SystemTime {
    let s = secs as i64;
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs()) + Duration::from_nanos(nsec.into())
    }
}

fn kind_bits(k: FileType) -> u32 {
    match k {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    }
}

/// struct fuse_attr (88 bytes).
fn put_attr(out: &mut Vec<u8>, a: &FileAttr) {
    let (at, atn) = time(&a.atime);
    let (mt, mtn) = time(&a.mtime);
    let (ct, ctn) = time(&a.ctime);
    for v in [a.ino.0, a.size, a.blocks, at, mt, ct] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let mode = kind_bits(a.kind) | u32::from(a.perm);
    for v in [
        atn, mtn, ctn, mode, a.nlink, a.uid, a.gid, a.rdev, a.blksize, 0,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// struct fuse_entry_out (128 bytes); readdirplus gives its one timeout for both.
fn put_entry(out: &mut Vec<u8>, e: &Entry, entry_ttl: Duration) {
    for v in [
        e.attr.ino.0,
        e.generation,
        entry_ttl.as_secs(),
        e.attr_ttl.as_secs(),
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&entry_ttl.subsec_nanos().to_le_bytes());
    out.extend_from_slice(&e.attr_ttl.subsec_nanos().to_le_bytes());
    put_attr(out, &e.attr);
}

/// struct fuse_attr_out (104 bytes).
fn put_attr_out(out: &mut Vec<u8>, attr: &FileAttr, ttl: Duration) {
    out.extend_from_slice(&ttl.as_secs().to_le_bytes());
    out.extend_from_slice(&ttl.subsec_nanos().to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    put_attr(out, attr);
}

/// struct fuse_open_out (16 bytes), with the passthrough id where there is one.
fn put_open(out: &mut Vec<u8>, o: &Opened) {
    let (flags, id) = match &o.backing {
        Some(b) => (o.flags | FOPEN_PASSTHROUGH, b.id()),
        None => (o.flags, 0),
    };
    out.extend_from_slice(&o.fh.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
}

/// One struct fuse_dirent with its name, padded to 8 bytes; false (nothing added) when it
/// would not fit in `max` bytes in all.
fn put_dirent(
    out: &mut Vec<u8>,
    max: usize,
    ino: u64,
    off: u64,
    kind: FileType,
    name: &[u8],
) -> bool {
    let len = (24 + name.len()).next_multiple_of(8);
    if out.len() + len > max {
        return false;
    }
    out.extend_from_slice(&ino.to_le_bytes());
    out.extend_from_slice(&off.to_le_bytes());
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&(kind_bits(kind) >> 12).to_le_bytes());
    out.extend_from_slice(name);
    out.resize(out.len() + (len - 24 - name.len()), 0);
    true
}

fn errno(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn xattr(out: &mut Vec<u8>, r: io::Result<XattrReply>) -> Result<(), i32> {
    match r.map_err(errno)? {
        // struct fuse_getxattr_out { size u32, padding u32 }
        XattrReply::Size(n) => {
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        XattrReply::Data(d) => *out = d,
    }
    Ok(())
}

/// Serves one request: `arg` is the entry's `op_in`, `input` the payload the kernel wrote.
/// The reply body goes to `out` (cleared first). `Err` is the errno to answer with.
pub fn dispatch(
    ops: &Ops,
    h: &InHeader,
    arg: &[u8],
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), i32> {
    out.clear();
    let ino = h.nodeid;
    let who = (h.uid, h.gid);
    let entry = |out: &mut Vec<u8>, r: io::Result<Entry>| -> Result<(), i32> {
        let e = r.map_err(errno)?;
        put_entry(out, &e, e.entry_ttl);
        Ok(())
    };
    let unit = |r: io::Result<()>| r.map_err(errno);
    match h.opcode {
        LOOKUP => entry(out, ops.lookup(ino, cstr(input)?.0)),
        GETATTR => {
            let fh = (u32_at(arg, 0) & GETATTR_FH != 0).then(|| u64_at(arg, 8));
            let (attr, ttl) = ops.getattr(ino, fh).map_err(errno)?;
            put_attr_out(out, &attr, ttl);
            Ok(())
        }
        SETATTR => {
            let valid = u32_at(arg, 0);
            let has = |bit| valid & bit != 0;
            let when = |bit_set, bit_now, at: usize, nsec_at: usize| {
                has(bit_set).then(|| {
                    if has(bit_now) {
                        TimeOrNow::Now
                    } else {
                        TimeOrNow::SpecificTime(time_in(u64_at(arg, at), u32_at(arg, nsec_at)))
                    }
                })
            };
            let set = SetAttr {
                mode: has(FATTR_MODE).then(|| u32_at(arg, 68)),
                uid: has(FATTR_UID).then(|| u32_at(arg, 76)),
                gid: has(FATTR_GID).then(|| u32_at(arg, 80)),
                size: has(FATTR_SIZE).then(|| u64_at(arg, 16)),
                atime: when(FATTR_ATIME, FATTR_ATIME_NOW, 32, 56),
                mtime: when(FATTR_MTIME, FATTR_MTIME_NOW, 40, 60),
                fh: has(FATTR_FH).then(|| u64_at(arg, 8)),
                pid: h.pid,
            };
            let (attr, ttl) = ops.setattr(ino, set).map_err(errno)?;
            put_attr_out(out, &attr, ttl);
            Ok(())
        }
        READLINK => {
            *out = ops.readlink(ino).map_err(errno)?;
            Ok(())
        }
        SYMLINK => {
            let (name, rest) = cstr(input)?;
            let (target, _) = cstr(rest)?;
            entry(out, ops.symlink(who, ino, name, target))
        }
        MKNOD => {
            let name = cstr(input)?.0;
            entry(
                out,
                ops.mknod(who, ino, name, u32_at(arg, 0), u32_at(arg, 4)),
            )
        }
        MKDIR => entry(out, ops.mkdir(who, ino, cstr(input)?.0, u32_at(arg, 0))),
        UNLINK => unit(ops.unlink(ino, cstr(input)?.0)),
        RMDIR => unit(ops.rmdir(ino, cstr(input)?.0)),
        RENAME | RENAME2 => {
            let flags = if h.opcode == RENAME2 {
                u32_at(arg, 8)
            } else {
                0
            };
            let (name, rest) = cstr(input)?;
            let (newname, _) = cstr(rest)?;
            unit(ops.rename(ino, name, u64_at(arg, 0), newname, flags))
        }
        LINK => entry(out, ops.link(u64_at(arg, 0), ino, cstr(input)?.0)),
        OPEN => {
            let o = ops.open(ino, u32_at(arg, 0) as i32, h.pid).map_err(errno)?;
            put_open(out, &o);
            Ok(())
        }
        READ => {
            let (fh, off, size) = (u64_at(arg, 0), u64_at(arg, 8), u32_at(arg, 16));
            *out = ops.read(fh, off, size).map_err(errno)?;
            Ok(())
        }
        WRITE => {
            let size = u32_at(arg, 16) as usize;
            let data = input.get(..size).ok_or(libc::EINVAL)?;
            let kill = u32_at(arg, 20) & WRITE_KILL_SUIDGID != 0;
            let n = ops
                .write(u64_at(arg, 0), u64_at(arg, 8), data, kill)
                .map_err(errno)?;
            // struct fuse_write_out { size u32, padding u32 }
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            Ok(())
        }
        STATFS => {
            let s = ops.statfs().map_err(errno)?;
            for v in [s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            let name_max = crate::engine::overlay::NAME_MAX as u32;
            for v in [s.f_bsize as u32, name_max, s.f_frsize as u32, 0] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.resize(80, 0);
            Ok(())
        }
        RELEASE => {
            ops.release(u64_at(arg, 0));
            Ok(())
        }
        FSYNC => unit(ops.fsync(u64_at(arg, 0), u32_at(arg, 8) & FSYNC_FDATASYNC != 0)),
        SETXATTR => {
            // fuse_setxattr_in without FUSE_SETXATTR_EXT: { size u32, flags u32 }
            let (name, value) = cstr(input)?;
            let value = value.get(..u32_at(arg, 0) as usize).ok_or(libc::EINVAL)?;
            unit(ops.setxattr(ino, name, value, u32_at(arg, 4) as i32))
        }
        GETXATTR => xattr(out, ops.getxattr(ino, cstr(input)?.0, u32_at(arg, 0))),
        LISTXATTR => xattr(out, ops.listxattr(ino, u32_at(arg, 0))),
        REMOVEXATTR => unit(ops.removexattr(ino, cstr(input)?.0)),
        FLUSH => unit(ops.flush()),
        OPENDIR => {
            let o = ops.opendir(ino).map_err(errno)?;
            put_open(out, &o);
            Ok(())
        }
        READDIR => {
            let (fh, off, max) = (u64_at(arg, 0), u64_at(arg, 8), u32_at(arg, 16) as usize);
            ops.readdir(fh, off, &mut |ino, next, kind, name| {
                !put_dirent(out, max, ino, next, kind, name.as_bytes())
            })
            .map_err(errno)
        }
        READDIRPLUS => {
            let (fh, off, max) = (u64_at(arg, 0), u64_at(arg, 8), u32_at(arg, 16) as usize);
            ops.readdirplus(fh, off, &mut |next, name, e| {
                let len = ENTRY_OUT + (24 + name.len()).next_multiple_of(8);
                if out.len() + len > max {
                    return true;
                }
                put_entry(out, e, e.attr_ttl);
                put_dirent(out, max, e.attr.ino.0, next, e.attr.kind, name.as_bytes());
                false
            })
            .map_err(errno)
        }
        RELEASEDIR => {
            ops.releasedir(u64_at(arg, 0));
            Ok(())
        }
        FSYNCDIR => unit(ops.fsyncdir(u64_at(arg, 0), u32_at(arg, 8) & FSYNC_FDATASYNC != 0)),
        ACCESS => unit(ops.access(ino)),
        CREATE => {
            let name = cstr(input)?.0;
            let (flags, mode) = (u32_at(arg, 0) as i32, u32_at(arg, 4));
            let (e, o) = ops.create(who, ino, name, mode, flags).map_err(errno)?;
            put_entry(out, &e, e.entry_ttl);
            put_open(out, &o);
            Ok(())
        }
        FALLOCATE => unit(ops.fallocate(
            u64_at(arg, 0),
            u64_at(arg, 8),
            u64_at(arg, 16),
            u32_at(arg, 24) as i32,
        )),
        LSEEK => {
            let o = ops
                .lseek(
                    u64_at(arg, 0),
                    u64_at(arg, 8) as i64,
                    u32_at(arg, 16) as i32,
                )
                .map_err(errno)?;
            out.extend_from_slice(&o.to_le_bytes());
            Ok(())
        }
        COPY_FILE_RANGE => {
            let n = ops
                .copy_file_range(
                    u64_at(arg, 0),
                    u64_at(arg, 8),
                    u64_at(arg, 24),
                    u64_at(arg, 32),
                    u64_at(arg, 40),
                )
                .map_err(errno)?;
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            Ok(())
        }
        IOCTL => unit(ops.ioctl()),
        DESTROY => Ok(()),
        // Locks, bmap, poll, statx, tmpfile, syncfs, ...: not implemented, as fuser answers.
        _ => Err(libc::ENOSYS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_kernel_structs() {
        let attr = FileAttr {
            ino: fuser::INodeNo(7),
            size: 1,
            blocks: 2,
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: 3,
            gid: 4,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        };
        let e = Entry {
            attr,
            attr_ttl: Duration::from_millis(1500),
            entry_ttl: Duration::from_secs(1),
            generation: 9,
        };
        let mut out = Vec::new();
        put_entry(&mut out, &e, e.entry_ttl);
        assert_eq!(out.len(), ENTRY_OUT);
        assert_eq!(u64_at(&out, 0), 7);
        assert_eq!(u64_at(&out, 8), 9);
        assert_eq!(u32_at(&out, 36), 500_000_000);
        // fuse_attr.mode at 40 + 60
        assert_eq!(u32_at(&out, 100), libc::S_IFDIR | 0o755);
        assert_eq!(u32_at(&out, 120), 4096);
        out.clear();
        put_attr_out(&mut out, &attr, Duration::ZERO);
        assert_eq!(out.len(), 104);
        out.clear();
        assert!(put_dirent(&mut out, 100, 5, 3, FileType::Symlink, b"abc"));
        assert_eq!(out.len(), 32);
        assert_eq!(u32_at(&out, 20), libc::DT_LNK.into());
        assert!(!put_dirent(&mut out, 40, 5, 3, FileType::Symlink, b"abc"));
        let o = Opened {
            fh: 3,
            flags: 2,
            backing: None,
        };
        out.clear();
        put_open(&mut out, &o);
        assert_eq!(out.len(), 16);
    }

    #[test]
    fn times_before_1970() {
        let t = UNIX_EPOCH - Duration::from_millis(1500);
        let (s, n) = time(&t);
        assert_eq!((s as i64, n), (-2, 500_000_000));
        assert_eq!(time_in(s, n), t);
    }
}
