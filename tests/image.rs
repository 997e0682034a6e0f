//! The payload image (ovl::image): real trees packed, read back in place through the
//! reader, extracted, compared with the originals; damaged images refused.

mod common;
use common::is_root;
use common::sys::{lgetxattr, llistxattr, lsetxattr};

use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use ovl::image::{Image, ImageOptions, ROOT_INO, write_image};

const PACK: &str = env!("CARGO_BIN_EXE_ovl-pack");

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// Text-like content: compressible, different per seed.
fn text(n: usize, seed: u64) -> Vec<u8> {
    let words = [
        "import ", "def ", "return ", "self", "(x)", ": ", "\n    ", "os.path",
    ];
    let r = pseudo_random(n, seed);
    let mut out = Vec::new();
    let mut i = 0;
    while out.len() < n {
        out.extend_from_slice(words[r[i % n] as usize % words.len()].as_bytes());
        out.extend_from_slice(format!("{}", r[(i + 1) % n]).as_bytes());
        i += 2;
    }
    out.truncate(n);
    out
}

fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let c = common::sys::cpath(p);
    let t = libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

const BS: u32 = 64 << 10;

/// A tree with every file type, hard links (one across directories), xattrs, odd modes and
/// owners, nanosecond times, duplicate contents, a sparse file and files around the block size.
fn make_tree(root: &Path) {
    for d in ["a/b/c", "empty_dir", "x"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::write(root.join("a/small.py"), text(1000, 1)).unwrap();
    fs::write(root.join("a/b/same.py"), text(1000, 1)).unwrap();
    fs::write(root.join("a/b/c/other.py"), text(3000, 2)).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("exact_block"), pseudo_random(BS as usize, 3)).unwrap();
    fs::write(root.join("a/mid.bin"), pseudo_random(40_000, 7)).unwrap();
    fs::write(
        root.join("big.bin"),
        pseudo_random(5 * BS as usize + 777, 4),
    )
    .unwrap();
    fs::write(root.join("big_text"), text(3 * BS as usize + 5, 5)).unwrap();
    for i in 0..300 {
        fs::write(
            root.join(format!("x/f{i:03}.txt")),
            text(50 + i * 7, 100 + i as u64),
        )
        .unwrap();
    }
    // Sparse: data, a hole of several blocks, data, and a hole at the end.
    let f = File::create(root.join("sparse")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"head", 10).unwrap();
    f.write_all_at(&pseudo_random(1000, 6), 6 * BS as u64 + 3)
        .unwrap();
    f.set_len(12 * BS as u64 + 17).unwrap();
    drop(f);
    fs::hard_link(root.join("a/small.py"), root.join("x/hard.py")).unwrap();
    fs::hard_link(root.join("a/small.py"), root.join("a/b/hard2.py")).unwrap();
    std::os::unix::fs::symlink("../a/small.py", root.join("x/link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/dangling", root.join("dangling")).unwrap();
    Command::new("mkfifo")
        .arg(root.join("fifo"))
        .status()
        .unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();
    fs::set_permissions(
        root.join("a/b/c/other.py"),
        fs::Permissions::from_mode(0o4751),
    )
    .unwrap();
    fs::set_permissions(root.join("x"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::set_permissions(root.join("empty"), fs::Permissions::from_mode(0o400)).unwrap();
    lsetxattr(&root.join("a/small.py"), "user.one", b"1", 0).unwrap();
    lsetxattr(&root.join("a/small.py"), "user.bin", b"\0\xff\0", 0).unwrap();
    lsetxattr(&root.join("a"), "user.dir", b"directory value", 0).unwrap();
    lsetxattr(&root.join("big.bin"), "user.empty", b"", 0).unwrap();
    if is_root() {
        // A device node, foreign owners, and xattrs only root may set (also on a symlink).
        let c = common::sys::cpath(&root.join("null"));
        assert_eq!(
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o620, libc::makedev(1, 3)) },
            0
        );
        std::os::unix::fs::lchown(root.join("a/b/same.py"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(root.join("x/link"), Some(42), Some(43)).unwrap();
        lsetxattr(&root.join("x/link"), "trusted.on_link", b"L", 0).unwrap();
        lsetxattr(&root.join("big_text"), "trusted.t", b"T", 0).unwrap();
    }
    set_mtime(&root.join("a/small.py"), 1_000_000_000, 123_456_789);
    set_mtime(&root.join("x/link"), 1_100_000_000, 5);
    set_mtime(&root.join("fifo"), -1000, 999_999_999);
    // Directories last: creating entries above moved their times.
    set_mtime(&root.join("a/b"), 1_200_000_000, 1);
    set_mtime(root, 1_300_000_000, 2);
}

fn pack(tree: &Path, out: &Path, threads: usize) -> ovl::image::ImageSummary {
    let f = File::create(out).unwrap();
    let opts = ImageOptions {
        block_size: BS,
        // Small: the 40 000-byte file is a packed tail too long for a shared block.
        pack_size: 16 << 10,
        threads,
        ..Default::default()
    };
    write_image(tree, &f, 0, &opts).unwrap()
}

fn open(img: &Path) -> Image {
    Image::open(File::open(img).unwrap(), 0, 1 << 20).unwrap()
}

/// Walks a path from the root through `lookup`.
fn resolve(img: &Image, rel: &Path) -> u32 {
    let mut ino = ROOT_INO;
    for c in rel.components() {
        use std::os::unix::ffi::OsStrExt;
        ino = img
            .lookup(ino, c.as_os_str().as_bytes())
            .unwrap()
            .unwrap_or_else(|| panic!("{} not in the image", rel.display()));
    }
    ino
}

/// Every path of a tree, relative, parents first.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![PathBuf::new()];
    let mut i = 0;
    while i < out.len() {
        let p = root.join(&out[i]);
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            let mut names: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            for n in names {
                out.push(out[i].join(n));
            }
        }
        i += 1;
    }
    out
}

fn xattrs_of(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut v: Vec<_> = llistxattr(p)
        .unwrap()
        .into_iter()
        .filter(|n| !n.starts_with("security.selinux"))
        .map(|n| (n.as_bytes().to_vec(), lgetxattr(p, &n).unwrap()))
        .collect();
    v.sort();
    v
}

/// Number of names a non-directory has inside `root` (the image counts links in the tree).
fn links_in_tree(root: &Path) -> HashMap<u64, u32> {
    let mut m = HashMap::new();
    for rel in walk(root) {
        let md = fs::symlink_metadata(root.join(rel)).unwrap();
        if !md.is_dir() {
            *m.entry(md.ino()).or_insert(0) += 1;
        }
    }
    m
}

/// Everything the reader says about the image equals the tree's own metadata and content.
fn assert_image_matches(img: &Image, tree: &Path) {
    let links = links_in_tree(tree);
    let mut ino_of: HashMap<u64, u32> = HashMap::new();
    for rel in walk(tree) {
        let p = tree.join(&rel);
        let md = fs::symlink_metadata(&p).unwrap();
        let ino = resolve(img, &rel);
        let a = img.getattr(ino).unwrap();
        let what = rel.display();
        assert_eq!(a.mode, md.mode(), "mode of {what}");
        assert_eq!((a.uid, a.gid), (md.uid(), md.gid()), "owner of {what}");
        assert_eq!(
            (a.mtime, a.mtime_nsec as i64),
            (md.mtime(), md.mtime_nsec()),
            "mtime of {what}"
        );
        assert_eq!(
            a.rdev,
            if md.file_type().is_char_device() {
                md.rdev()
            } else {
                0
            }
        );
        let want: Vec<(Vec<u8>, Vec<u8>)> = xattrs_of(&p)
            .into_iter()
            .filter(|(k, _)| !k.starts_with(b"trusted.overlay."))
            .collect();
        let got: Vec<(Vec<u8>, Vec<u8>)> = img
            .xattrs(ino)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(got, want, "xattrs of {what}");
        let list: Vec<u8> = want
            .iter()
            .flat_map(|(k, _)| k.iter().copied().chain([0]))
            .collect();
        assert_eq!(img.listxattr(ino).unwrap(), list);
        for (k, v) in &want {
            assert_eq!(img.getxattr(ino, k).unwrap(), &v[..]);
        }
        let ft = md.file_type();
        if ft.is_dir() {
            let mut names: Vec<Vec<u8>> = fs::read_dir(&p)
                .unwrap()
                .map(|e| {
                    use std::os::unix::ffi::OsStrExt;
                    e.unwrap().file_name().as_bytes().to_vec()
                })
                .collect();
            names.sort();
            let listed: Vec<Vec<u8>> = img
                .readdir(ino, 0)
                .unwrap()
                .map(|e| e.unwrap().name.to_vec())
                .collect();
            assert_eq!(listed, names, "entries of {what}");
            let subdirs = img
                .readdir(ino, 0)
                .unwrap()
                .filter(|e| e.as_ref().unwrap().dtype == libc::DT_DIR)
                .count();
            assert_eq!(a.nlink as usize, 2 + subdirs, "nlink of {what}");
            assert_eq!(md.nlink() as usize, 2 + subdirs);
        } else {
            assert_eq!(a.nlink, links[&md.ino()], "nlink of {what}");
            // Hard links are one inode in the image too.
            assert_eq!(
                *ino_of.entry(md.ino()).or_insert(ino),
                ino,
                "inode of {what}"
            );
        }
        if ft.is_file() {
            assert_eq!(a.size, md.len(), "size of {what}");
            let mut buf = vec![0u8; md.len() as usize + 10];
            let n = img.read(ino, 0, &mut buf).unwrap();
            assert_eq!(n as u64, md.len());
            assert!(buf[..n] == fs::read(&p).unwrap()[..], "content of {what}");
        }
        if ft.is_symlink() {
            use std::os::unix::ffi::OsStrExt;
            assert_eq!(
                img.readlink(ino).unwrap(),
                fs::read_link(&p).unwrap().as_os_str().as_bytes()
            );
            assert_eq!(
                a.size as usize,
                fs::read_link(&p).unwrap().as_os_str().len()
            );
        }
    }
}

#[test]
fn round_trip_of_every_file_type() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    let s = pack(&tree, &t.path().join("img"), 0);
    // small.py and same.py share one content; the hard links are one inode.
    assert_eq!(s.files, 308);
    assert_eq!(s.distinct, 307);
    let img = open(&t.path().join("img"));
    assert_image_matches(&img, &tree);
    assert_eq!(img.inodes() as usize, walk(&tree).len() - 2);
    // The sparse file's holes are stored as holes: its image is far smaller than its size.
    assert!(s.image_len < 1_000_000, "image of {} bytes", s.image_len);
    img.verify().unwrap();
}

#[test]
fn random_reads_match_the_original() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    pack(&tree, &t.path().join("img"), 2);
    // A cache smaller than one block: every read goes back to the file.
    let img = Image::open(File::open(t.path().join("img")).unwrap(), 0, 1000).unwrap();
    let r = pseudo_random(40_000, 77);
    let word = |i: usize| u64::from_le_bytes(r[i * 8..i * 8 + 8].try_into().unwrap());
    let mut k = 0;
    for name in [
        "big.bin",
        "big_text",
        "sparse",
        "exact_block",
        "x/f123.txt",
        "a/b/same.py",
    ] {
        let orig = fs::read(tree.join(name)).unwrap();
        let ino = resolve(&img, Path::new(name));
        for _ in 0..200 {
            let len = orig.len() as u64 + 100;
            let off = word(k) % len;
            // Mostly short reads, some across several blocks.
            let n = (word(k + 1) % if k % 5 == 0 { 3 * BS as u64 } else { 9000 }) as usize;
            k += 2;
            let mut buf = vec![0xaa; n];
            let got = img.read(ino, off, &mut buf).unwrap();
            let end = (off as usize + n).min(orig.len());
            let want = orig.get(off as usize..end).unwrap_or(&[]);
            assert_eq!(got, want.len(), "{name} at {off}+{n}");
            assert!(buf[..got] == *want, "{name} at {off}+{n}");
        }
        // Boundaries exactly.
        for off in [
            0,
            BS as u64 - 1,
            BS as u64,
            2 * BS as u64 + 1,
            orig.len() as u64,
        ] {
            let mut buf = vec![0u8; 3];
            let got = img.read(ino, off, &mut buf).unwrap();
            let end = (off as usize + 3).min(orig.len());
            assert_eq!(&buf[..got], orig.get(off as usize..end).unwrap_or(&[]));
        }
    }
}

#[test]
fn reads_from_many_threads_agree() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    pack(&tree, &t.path().join("img"), 0);
    let img = Image::open(
        File::open(t.path().join("img")).unwrap(),
        0,
        3 * BS as usize,
    )
    .unwrap();
    let names: Vec<String> = (0..300)
        .map(|i| format!("x/f{i:03}.txt"))
        .chain(["big.bin".into(), "big_text".into()])
        .collect();
    std::thread::scope(|s| {
        for th in 0..8 {
            let (img, names, tree) = (&img, &names, &tree);
            s.spawn(move || {
                for round in 0..3 {
                    for (i, n) in names.iter().enumerate() {
                        if (i + th + round) % 3 != 0 {
                            continue;
                        }
                        let want = fs::read(tree.join(n)).unwrap();
                        let mut buf = vec![0u8; want.len()];
                        let ino = resolve(img, Path::new(n));
                        assert_eq!(img.read(ino, 0, &mut buf).unwrap(), want.len());
                        assert!(buf == want, "{n}");
                    }
                }
            });
        }
    });
}

#[test]
fn threads_wanting_one_block_decompress_it_once() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    pack(&tree, &t.path().join("img"), 0);
    let fresh = || Image::open(File::open(t.path().join("img")).unwrap(), 0, 64 << 20).unwrap();
    let want = fs::read(tree.join("big.bin")).unwrap();
    let read_all = |img: &Image| {
        let ino = resolve(img, Path::new("big.bin"));
        let mut buf = vec![0u8; want.len()];
        assert_eq!(img.read(ino, 0, &mut buf).unwrap(), want.len());
        assert!(buf == want);
    };
    let alone = fresh();
    read_all(&alone);
    // Five full pieces and the tail's packed block.
    assert_eq!(alone.blocks_loaded(), 6);
    for _ in 0..5 {
        let img = fresh();
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    start.wait();
                    read_all(&img);
                });
            }
        });
        assert_eq!(img.blocks_loaded(), 6);
    }
}

#[test]
fn extraction_recreates_the_tree() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    pack(&tree, &t.path().join("img"), 0);
    let img = open(&t.path().join("img"));
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    assert_eq!(
        img.extract_to(&out, 3).unwrap(),
        0,
        "no xattr skipped as root"
    );
    // The extracted tree packs to an image that reads the same as the original...
    assert_image_matches(&img, &out);
    // ...hard links are links again, the sparse file is sparse again.
    let md = |p: &str| fs::symlink_metadata(out.join(p)).unwrap();
    assert_eq!(md("a/small.py").ino(), md("x/hard.py").ino());
    assert_eq!(md("a/small.py").ino(), md("a/b/hard2.py").ino());
    assert!(
        md("sparse").blocks() * 512 < 3 * BS as u64,
        "{} blocks",
        md("sparse").blocks()
    );
    assert!(md("fifo").file_type().is_fifo());
    assert!(md("sock").file_type().is_socket());
}

#[test]
fn same_tree_same_bytes_whatever_the_threads_or_copy() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    pack(&tree, &t.path().join("one"), 1);
    pack(&tree, &t.path().join("four"), 4);
    // A copy has other inode numbers, creation order and ctimes; the image does not see them.
    let copy = t.path().join("copy");
    assert!(
        Command::new("cp")
            .args(["-a"])
            .arg(&tree)
            .arg(&copy)
            .status()
            .unwrap()
            .success()
    );
    pack(&copy, &t.path().join("copy.img"), 3);
    let one = fs::read(t.path().join("one")).unwrap();
    assert!(one == fs::read(t.path().join("four")).unwrap());
    assert!(one == fs::read(t.path().join("copy.img")).unwrap());
    // And a change of one byte of one file changes the image.
    fs::write(tree.join("x/f007.txt"), text(99, 1)).unwrap();
    pack(&tree, &t.path().join("changed"), 1);
    assert!(one != fs::read(t.path().join("changed")).unwrap());
}

#[test]
fn errors_are_the_errnos_a_filesystem_answers() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    pack(&tree, &t.path().join("img"), 0);
    let img = open(&t.path().join("img"));
    let errno = |r: std::io::Error| r.raw_os_error();
    let file = resolve(&img, Path::new("a/small.py"));
    let dir = resolve(&img, Path::new("a"));
    assert_eq!(img.lookup(ROOT_INO, b"missing").unwrap(), None);
    assert_eq!(img.lookup(ROOT_INO, b"").unwrap(), None);
    assert_eq!(
        errno(img.lookup(file, b"x").unwrap_err()),
        Some(libc::ENOTDIR)
    );
    assert_eq!(errno(img.readlink(file).unwrap_err()), Some(libc::EINVAL));
    assert_eq!(
        errno(img.read(dir, 0, &mut [0; 4]).unwrap_err()),
        Some(libc::EISDIR)
    );
    assert_eq!(
        errno(img.getxattr(file, b"user.none").unwrap_err()),
        Some(libc::ENODATA)
    );
    assert_eq!(errno(img.getattr(0).unwrap_err()), Some(libc::ENOENT));
    assert_eq!(
        errno(img.getattr(img.inodes() + 1).unwrap_err()),
        Some(libc::ENOENT)
    );
    // readdir from an offset continues where it left.
    let all: Vec<_> = img
        .readdir(ROOT_INO, 0)
        .unwrap()
        .map(|e| e.unwrap().name.to_vec())
        .collect();
    let rest: Vec<_> = img
        .readdir(ROOT_INO, 3)
        .unwrap()
        .map(|e| e.unwrap().name.to_vec())
        .collect();
    assert_eq!(&all[3..], &rest[..]);
    assert_eq!(img.readdir(ROOT_INO, 1000).unwrap().count(), 0);
}

#[test]
fn an_image_is_read_at_its_offset_in_a_bigger_file() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    let f = File::create(t.path().join("bundle")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&[0x7f; 12345], 0).unwrap();
    let opts = ImageOptions {
        block_size: BS,
        pack_size: BS,
        ..Default::default()
    };
    let s = write_image(&tree, &f, 12345, &opts).unwrap();
    f.write_all_at(b"trailer after the image", 12345 + s.image_len)
        .unwrap();
    let img = Image::open(File::open(t.path().join("bundle")).unwrap(), 12345, 1 << 20).unwrap();
    assert_image_matches(&img, &tree);
}

/// Flips one byte of a copy of the image at `at` and returns the copy's path.
fn damaged(img: &Path, at: u64) -> PathBuf {
    let mut b = fs::read(img).unwrap();
    b[at as usize] ^= 0x10;
    let p = img.with_extension(format!("bad{at}"));
    fs::write(&p, b).unwrap();
    p
}

#[test]
fn a_damaged_byte_is_an_error_never_wrong_data() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("a.txt"), text(5000, 1)).unwrap();
    fs::write(tree.join("big"), pseudo_random(3 * BS as usize, 2)).unwrap();
    let path = t.path().join("img");
    pack(&tree, &path, 0);
    let sb = open(&path).superblock().clone();
    let len = fs::metadata(&path).unwrap().len();
    assert_eq!(len, sb.image_len);
    // Superblock and metadata: the image does not open.
    for at in [
        0,
        20,
        70,
        sb.meta_offset,
        sb.meta_offset + sb.meta_clen / 2,
        len - 1,
    ] {
        let e = Image::open(File::open(damaged(&path, at)).unwrap(), 0, 1 << 20).unwrap_err();
        assert!(
            e.to_string().contains("corrupt image") || e.to_string().contains("no ovl image"),
            "byte {at}: {e}"
        );
    }
    // Data: the image opens, the read of the damaged block fails with EIO, others still work.
    for at in [200, sb.meta_offset - 1000] {
        let img = Image::open(File::open(damaged(&path, at)).unwrap(), 0, 1 << 20).unwrap();
        let mut failed = 0;
        for name in ["a.txt", "big"] {
            let ino = img.lookup(ROOT_INO, name.as_bytes()).unwrap().unwrap();
            let want = fs::read(tree.join(name)).unwrap();
            let mut buf = vec![0u8; want.len()];
            match img.read(ino, 0, &mut buf) {
                Ok(n) => assert!(n == want.len() && buf == want, "{name} read wrong data"),
                Err(e) => {
                    assert_eq!(ovl::image::read::errno(&e), libc::EIO);
                    assert!(e.to_string().contains("does not match its hash"), "{e}");
                    failed += 1;
                }
            }
        }
        assert_eq!(failed, 1, "byte {at}");
        assert!(img.verify().is_err());
    }
    // Truncated: refused at open.
    let b = fs::read(&path).unwrap();
    fs::write(t.path().join("short"), &b[..b.len() - 1]).unwrap();
    let e = Image::open(File::open(t.path().join("short")).unwrap(), 0, 1 << 20).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
}

#[test]
fn special_files_are_refused_when_asked() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir_all(tree.join("d")).unwrap();
    fs::write(tree.join("d/a"), "a").unwrap();
    assert!(
        Command::new("mkfifo")
            .arg(tree.join("d/fifo"))
            .status()
            .unwrap()
            .success()
    );
    let f = File::create(t.path().join("img")).unwrap();
    let opts = ImageOptions {
        special_files: false,
        ..Default::default()
    };
    let e = write_image(&tree, &f, 0, &opts).unwrap_err().to_string();
    assert!(e.contains("d/fifo: is a FIFO"), "{e}");
    assert_eq!(
        f.metadata().unwrap().len(),
        0,
        "nothing written before the tree is read"
    );
}

#[test]
fn ovl_pack_image_only_writes_an_image_or_nothing() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    make_tree(&tree);
    let out = t.path().join("tree.img");
    let o = Command::new(PACK)
        .arg(&tree)
        .args([
            "--image-only",
            "--block-size",
            "64",
            "--pack-size",
            "64",
            "-o",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_image_matches(&open(&out), &tree);
    // Bad input: one line naming the path, nothing written.
    let missing = t.path().join("missing");
    let o = Command::new(PACK)
        .arg(&missing)
        .args(["--image-only", "-o"])
        .arg(t.path().join("m.img"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&*missing.to_string_lossy()), "{err}");
    let left: Vec<_> = fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}

/// An edit of an image's decompressed metadata, given the offset of its directory entries.
type Edit = Box<dyn FnOnce(&mut Vec<u8>, usize)>;

/// Rewrites the metadata of the image at `path` through `edit(meta, dirents_offset)` and
/// fixes up what the hashes cover, as a crafted (not merely damaged) image would be.
fn craft(path: &Path, out: &Path, edit: Edit) {
    let mut b = fs::read(path).unwrap();
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let (moff, mclen, mlen) = (u64_at(&b, 32), u64_at(&b, 40), u64_at(&b, 48));
    let mut meta =
        zstd::bulk::decompress(&b[moff as usize..(moff + mclen) as usize], mlen as usize).unwrap();
    // Table 1 (directory entries): its offset is the second (offset, count) of the header.
    let dirents = u64_at(&meta, 8 + 16) as usize;
    edit(&mut meta, dirents);
    let mz = zstd::bulk::compress(&meta, 3).unwrap();
    b.truncate(moff as usize);
    b.extend_from_slice(&mz);
    let len = b.len() as u64;
    b[24..32].copy_from_slice(&len.to_le_bytes());
    b[40..48].copy_from_slice(&(mz.len() as u64).to_le_bytes());
    b[64..96].copy_from_slice(blake3::hash(&mz).as_bytes());
    let check = blake3::hash(&b[..96]);
    b[96..112].copy_from_slice(&check.as_bytes()[..16]);
    fs::write(out, b).unwrap();
}

/// The reader refuses what would make a walk of the tree loop or leave an extraction's
/// directory, or a lookup miss: such an image is crafted, not damaged (its hashes match). A
/// directory is checked when it is first used, so the spoiled directory gives EIO, and so do
/// a whole-tree check (`--ovl-verify`) and an extraction; the rest of the tree still reads.
#[test]
fn crafted_directories_are_refused_when_used() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir_all(tree.join("d/e")).unwrap();
    fs::write(tree.join("d/xy"), "data").unwrap();
    let path = t.path().join("img");
    pack(&tree, &path, 1);
    // Entries, sorted, breadth-first: root: d; d: e, xy. Each record is 12 bytes.
    let name_of = |meta: &[u8], dirents: usize, i: usize| {
        let r = &meta[dirents + 12 * i..dirents + 12 * (i + 1)];
        u32::from_le_bytes(r[0..4].try_into().unwrap()) as usize
    };
    let cases: Vec<(&str, Edit)> = vec![
        (
            "is not sorted",
            // d's two entries swapped.
            Box::new(|m: &mut Vec<u8>, d: usize| {
                let e: Vec<u8> = m[d + 12..d + 24].to_vec();
                m.copy_within(d + 24..d + 36, d + 12);
                m[d + 24..d + 36].copy_from_slice(&e);
            }),
        ),
        (
            "wrong type",
            // d/xy listed as a directory.
            Box::new(|m: &mut Vec<u8>, d: usize| m[d + 24 + 10] = libc::DT_DIR),
        ),
        (
            "is named twice",
            // d/e names the root: a loop.
            Box::new(|m: &mut Vec<u8>, d: usize| {
                m[d + 12 + 4..d + 12 + 8].copy_from_slice(&1u32.to_le_bytes())
            }),
        ),
        (
            "is named twice",
            // d/xy made a second name of the directory d/e: a directory hard link.
            Box::new(|m: &mut Vec<u8>, d: usize| {
                m.copy_within(d + 12 + 4..d + 12 + 8, d + 24 + 4);
                m[d + 24 + 10] = libc::DT_DIR;
            }),
        ),
        (
            "has an invalid name",
            // d/xy renamed "..".
            Box::new(move |m: &mut Vec<u8>, d: usize| {
                let pool =
                    u64::from_le_bytes(m[8 + 6 * 16..8 + 6 * 16 + 8].try_into().unwrap()) as usize;
                let at = pool + name_of(m, d, 2);
                m[at..at + 2].copy_from_slice(b"..");
            }),
        ),
        (
            "has an invalid name",
            // d/xy renamed "x/": a path, not a name.
            Box::new(move |m: &mut Vec<u8>, d: usize| {
                let pool =
                    u64::from_le_bytes(m[8 + 6 * 16..8 + 6 * 16 + 8].try_into().unwrap()) as usize;
                let at = pool + name_of(m, d, 2);
                m[at..at + 2].copy_from_slice(b"x/");
            }),
        ),
    ];
    for (i, (want, edit)) in cases.into_iter().enumerate() {
        let crafted = t.path().join(format!("crafted{i}"));
        craft(&path, &crafted, edit);
        let img = Image::open(File::open(&crafted).unwrap(), 0, 1 << 20).unwrap();
        // The root is sound: d is found there.
        let d = img.lookup(1, b"d").unwrap().unwrap();
        let uses = [
            ("lookup", img.lookup(d, b"xy").map(drop)),
            ("readdir", img.readdir(d, 0).map(drop)),
            ("verify", img.verify()),
        ];
        for (what, r) in uses {
            let e = r.unwrap_err();
            assert!(e.to_string().contains(want), "case {i}, {what}: {e}");
            assert_eq!(ovl::image::read::errno(&e), libc::EIO, "case {i}, {what}");
        }
        let out = t.path().join(format!("x{i}"));
        fs::create_dir(&out).unwrap();
        let e = img.extract_to(&out, 1).unwrap_err();
        assert!(e.to_string().contains(want), "case {i}, extract: {e}");
    }
    // The same round through craft() without an edit opens: the refusals are the edits'.
    craft(&path, &t.path().join("same"), Box::new(|_, _| {}));
    assert_image_matches(&open(&t.path().join("same")), &tree);
}

/// A start's reads are remembered block by block in the order they came; prefetching that list
/// into a fresh open of the image decompresses exactly those blocks, after which the same reads
/// decompress nothing. Numbers that name no block and blocks already cached are skipped, and
/// the byte budget or the stop flag stops it.
#[test]
fn touched_blocks_prefetch_into_a_fresh_open() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("tree");
    fs::create_dir(&tree).unwrap();
    // Whole BS pieces of their own: a read of each piece touches one block.
    fs::write(tree.join("a.bin"), pseudo_random(3 * BS as usize, 1)).unwrap();
    fs::write(tree.join("b.bin"), pseudo_random(3 * BS as usize, 2)).unwrap();
    let path = t.path().join("img");
    pack(&tree, &path, 1);
    let reads = |img: &Image| {
        let (a, b) = (
            resolve(img, Path::new("a.bin")),
            resolve(img, Path::new("b.bin")),
        );
        let mut buf = vec![0u8; 100];
        for (ino, at) in [(a, 0), (b, BS as u64), (a, 2 * BS as u64), (a, 10)] {
            img.read(ino, at, &mut buf).unwrap();
        }
    };
    let first = open(&path);
    assert!(first.touched_blocks().is_empty());
    reads(&first);
    let list = first.touched_blocks();
    assert_eq!(list.len(), 3, "{list:?}");
    assert_eq!(first.blocks_loaded(), 3);

    let go = AtomicBool::new(false);
    let again = open(&path);
    assert_eq!(again.prefetch(&list, usize::MAX, &go), 3);
    assert_eq!(again.blocks_loaded(), 3);
    reads(&again);
    assert_eq!(
        again.blocks_loaded(),
        3,
        "the reads found every block prefetched"
    );
    assert_eq!(again.touched_blocks(), list, "prefetching is not a read");
    assert_eq!(again.prefetch(&list, usize::MAX, &go), 0, "cached already");
    assert_eq!(again.prefetch(&[u32::MAX, 1 << 30], usize::MAX, &go), 0);

    let budget = open(&path);
    assert_eq!(
        budget.prefetch(&list, 1, &go),
        1,
        "one block, then the budget is spent"
    );
    let stopped = open(&path);
    assert_eq!(
        stopped.prefetch(&list, usize::MAX, &AtomicBool::new(true)),
        0
    );
}
