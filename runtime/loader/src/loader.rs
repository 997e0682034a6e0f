//! The loader proper (see main.rs), built with `panic = "abort"` (the runtime profile).

use core::arch::{asm, global_asm};

use crate::lz4;

/// The runtime as build.rs packed it: its size and checksum (u64 each), then the LZ4 block.
static PACKED: &[u8] = include_bytes!(env!("OVL_RUNTIME_LZ4"));

/// The variable that tells the runtime which file it heads.
const BUNDLE_VAR: &[u8] = b"OVL_RUNTIME_BUNDLE=";

/// The runtime's exit status for "the runtime failed" (`launcher::EXIT_FAILURE`).
const EXIT_FAILURE: i32 = 125;

// The kernel starts us with the stack pointer at argc, then argv, NULL, envp, NULL.
global_asm!(
    ".globl _start",
    "_start:",
    "xor ebp, ebp",
    "mov rdi, rsp",
    "and rsp, -16",
    "call {main}",
    "ud2",
    main = sym start,
);

mod sys {
    use super::asm;

    pub const O_RDONLY: usize = 0;
    pub const O_CLOEXEC: usize = 0o2000000;
    pub const PROT_READ: usize = 1;
    pub const PROT_WRITE: usize = 2;
    pub const MAP_SHARED: usize = 1;
    pub const MAP_PRIVATE: usize = 2;
    pub const MAP_ANONYMOUS: usize = 0x20;
    pub const MAP_POPULATE: usize = 0x8000;
    pub const MFD_CLOEXEC: usize = 1;
    pub const AT_EMPTY_PATH: usize = 0x1000;
    pub const ENOSYS: isize = 38;
    pub const ETXTBSY: isize = 26;

    pub const WRITE: usize = 1;
    pub const OPEN: usize = 2;
    pub const CLOSE: usize = 3;
    pub const MMAP: usize = 9;
    pub const MUNMAP: usize = 11;
    pub const EXECVE: usize = 59;
    pub const FTRUNCATE: usize = 77;
    pub const READLINK: usize = 89;
    pub const EXIT_GROUP: usize = 231;
    pub const MEMFD_CREATE: usize = 319;
    pub const EXECVEAT: usize = 322;

    /// A system call; a negative result is `-errno`.
    #[inline(always)]
    pub unsafe fn call(n: usize, a: [usize; 6]) -> isize {
        let ret: isize;
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") n as isize => ret,
                in("rdi") a[0],
                in("rsi") a[1],
                in("rdx") a[2],
                in("r10") a[3],
                in("r8") a[4],
                in("r9") a[5],
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret
    }
}

fn write_err(parts: &[&[u8]]) {
    for p in parts {
        unsafe { sys::call(sys::WRITE, [2, p.as_ptr() as usize, p.len(), 0, 0, 0]) };
    }
}

fn die(what: &[u8], err: isize) -> ! {
    // errno in decimal, the runtime's format for failures otherwise being "app.run: what".
    let mut num = [0u8; 20];
    let mut i = num.len();
    let mut e = err.unsigned_abs();
    loop {
        i -= 1;
        num[i] = b'0' + (e % 10) as u8;
        e /= 10;
        if e == 0 {
            break;
        }
    }
    write_err(&[
        b"ovl runtime loader: ",
        what,
        b" (errno ",
        &num[i..],
        b")\n",
    ]);
    exit(EXIT_FAILURE)
}

/// The runtime inside does not unpack (`path`: our file).
fn damaged(path: &[u8]) -> ! {
    write_err(&[
        path,
        b": the runtime part does not unpack: the file is damaged; download or build it again\n",
    ]);
    exit(EXIT_FAILURE)
}

fn exit(code: i32) -> ! {
    unsafe {
        sys::call(sys::EXIT_GROUP, [code as usize, 0, 0, 0, 0, 0]);
        core::hint::unreachable_unchecked()
    }
}

fn check(r: isize, what: &[u8]) -> usize {
    if r < 0 {
        die(what, -r);
    }
    r as usize
}

/// Anonymous memory, at least `len` bytes.
fn alloc(len: usize) -> *mut u8 {
    let prot = sys::PROT_READ | sys::PROT_WRITE;
    let flags = sys::MAP_PRIVATE | sys::MAP_ANONYMOUS;
    let r = unsafe { sys::call(sys::MMAP, [0, len, prot, flags, usize::MAX, 0]) };
    check(r, b"allocating memory") as *mut u8
}

unsafe extern "C" fn start(sp: *const usize) -> ! {
    let argc = unsafe { *sp };
    let argv = unsafe { sp.add(1) };
    let envp = unsafe { argv.add(argc + 1) } as *const *const u8;
    // Our own file, for the runtime: "OVL_RUNTIME_BUNDLE=/path\0".
    let var_cap = BUNDLE_VAR.len() + 4097;
    let var = alloc(var_cap);
    unsafe { core::ptr::copy_nonoverlapping(BUNDLE_VAR.as_ptr(), var, BUNDLE_VAR.len()) };
    let at = unsafe { var.add(BUNDLE_VAR.len()) } as usize;
    let exe = c"/proc/self/exe".as_ptr() as usize;
    let n = check(
        unsafe { sys::call(sys::READLINK, [exe, at, 4096, 0, 0, 0]) },
        b"finding our own file (/proc/self/exe)",
    );
    if n >= 4096 {
        die(b"finding our own file (/proc/self/exe): path too long", 36);
    }
    unsafe { *var.add(BUNDLE_VAR.len() + n) = 0 };
    let path = unsafe { core::slice::from_raw_parts(at as *const u8, n) };

    // The environment with that variable first (and any inherited one left out).
    let mut envc = 0;
    while !unsafe { *envp.add(envc) }.is_null() {
        envc += 1;
    }
    let env = alloc((envc + 2) * 8) as *mut *const u8;
    unsafe { *env = var };
    let mut k = 1;
    for i in 0..envc {
        let e = unsafe { *envp.add(i) };
        if !starts_with(e, BUNDLE_VAR) {
            unsafe { *env.add(k) = e };
            k += 1;
        }
    }
    unsafe { *env.add(k) = core::ptr::null() };

    // The runtime, unpacked straight into a memfd's pages.
    let u64_at = |i: usize| u64::from_le_bytes(PACKED[i..i + 8].try_into().unwrap());
    let (len, sum) = (u64_at(0) as usize, u64_at(8));
    let name = c"ovl-runtime".as_ptr() as usize;
    let fd = check(
        unsafe { sys::call(sys::MEMFD_CREATE, [name, sys::MFD_CLOEXEC, 0, 0, 0, 0]) },
        b"memfd_create",
    );
    check(
        unsafe { sys::call(sys::FTRUNCATE, [fd, len, 0, 0, 0, 0]) },
        b"sizing the memfd",
    );
    let prot = sys::PROT_READ | sys::PROT_WRITE;
    let flags = sys::MAP_SHARED | sys::MAP_POPULATE;
    let dst = check(
        unsafe { sys::call(sys::MMAP, [0, len, prot, flags, fd, 0]) },
        b"mapping the memfd",
    ) as *mut u8;
    let out = unsafe { core::slice::from_raw_parts_mut(dst, len) };
    if !lz4::decompress(&PACKED[16..], out) || lz4::checksum(out) != sum {
        damaged(path);
    }
    unsafe { sys::call(sys::MUNMAP, [dst as usize, len, 0, 0, 0, 0]) };

    let empty = c"".as_ptr() as usize;
    let (argv, env) = (argv as usize, env as usize);
    let mut r = unsafe { sys::call(sys::EXECVEAT, [fd, empty, argv, env, sys::AT_EMPTY_PATH, 0]) };
    if r == -sys::ENOSYS || r == -sys::ETXTBSY {
        // Before Linux 3.19 (no execveat), or a kernel that refuses a file open for
        // writing: the memfd again, read-only, by its /proc path.
        let path = fd_path(fd);
        let flags = sys::O_RDONLY | sys::O_CLOEXEC;
        let ro = check(
            unsafe { sys::call(sys::OPEN, [path.as_ptr() as usize, flags, 0, 0, 0, 0]) },
            b"reopening the memfd",
        );
        unsafe { sys::call(sys::CLOSE, [fd, 0, 0, 0, 0, 0]) };
        r = unsafe { sys::call(sys::EXECVEAT, [ro, empty, argv, env, sys::AT_EMPTY_PATH, 0]) };
        if r == -sys::ENOSYS {
            let path = fd_path(ro);
            r = unsafe { sys::call(sys::EXECVE, [path.as_ptr() as usize, argv, env, 0, 0, 0]) };
        }
    }
    die(b"executing the runtime", -r)
}

/// "/proc/self/fd/N\0".
fn fd_path(fd: usize) -> [u8; 32] {
    let mut path = [0u8; 32];
    path[..14].copy_from_slice(b"/proc/self/fd/");
    let mut digits = [0u8; 10];
    let (mut i, mut v) = (digits.len(), fd);
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    path[14..14 + digits.len() - i].copy_from_slice(&digits[i..]);
    path
}

fn starts_with(s: *const u8, prefix: &[u8]) -> bool {
    prefix
        .iter()
        .enumerate()
        .all(|(i, &b)| unsafe { *s.add(i) } == b)
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    write_err(&[b"ovl runtime loader: internal error\n"]);
    exit(EXIT_FAILURE)
}

// The C library's memory functions, which the compiler calls (there is no libc here).
// `rep movsb`/`rep stosb`: fast on current CPUs for long copies; the decoder does short ones
// itself.

#[unsafe(no_mangle)]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dst
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // No overlap that a forward copy would clobber.
        return unsafe { memcpy(dst, src, n) };
    }
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _,
             inout("rdi") dst.add(n).wrapping_sub(1) => _,
             inout("rsi") src.add(n).wrapping_sub(1) => _,
             options(nostack));
    }
    dst
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

#[unsafe(no_mangle)]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[unsafe(no_mangle)]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    unsafe { memcmp(a, b, n) }
}
