//! The inode store: the one owner of every overlay inode the kernel knows.
//!
//! Invariants:
//! - An inode is in `by_ino` exactly while the kernel holds lookups on it (`lookups > 0`), plus
//!   the root, which is never forgotten. `lookup`/`create`/`readdirplus` add one, `forget`
//!   subtracts what the kernel says; at zero the inode leaves the table and its descriptors close.
//! - `by_id` maps the real file backing an inode (`st_dev`, `st_ino` of its upper entry if any,
//!   else of its topmost lower entry) to the inode number, so every name of one real file
//!   (hard links) resolves to the same overlay inode. A deleted upper file leaves `by_id` at once,
//!   even while the kernel still holds its inode: its real number may be reused. After copy-up the
//!   key moves from the lower file to the upper file: like the kernel without `index=on`, other
//!   names of a hard-linked lower file then become separate files.
//! - Inode numbers are never reused for a different file while the kernel may still know the old
//!   one: virtual numbers come from a counter; persistent numbers are derived from the layer and
//!   the real inode number, with a collision falling back to a counter in a reserved range.
//! - A forgotten inode whose file still has a name leaves a [`Ghost`] (its number, parent
//!   number and name) and keeps its `by_id` entry, so the file keeps its number for the whole
//!   mount and a file handle the kernel gave out for it (which names only the number) can be
//!   resolved again by looking the name up in the parent. About 100 bytes per forgotten file.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use crate::engine::lower::{Real, RealRef};
use crate::engine::sys::BorrowFd;

/// How st_ino values are assigned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InodeMode {
    /// Numbers are handed out in order while mounted (small, dense, never reused in a mount).
    #[default]
    Virtual,
    /// The same unchanged file gets the same number on every mount:
    /// `(layer + 1) << 56 | real st_ino` for a file whose data lives in lower `layer`, and
    /// `real st_ino` (layer 0 = upper) for a file in the upper. Unique because each layer's
    /// real numbers are unique within it and the top byte names the layer; a real number that
    /// does not fit in 56 bits, or a number already taken in this mount by another file (a
    /// copied-up file keeps its number while mounted), falls back to a counter with the top
    /// bit set, which no derived number can reach with fewer than 127 layers.
    Persistent,
}

/// The kind of a real entry, fixed for the life of an overlay inode.
pub type Kind = fuser::FileType;

/// A real directory in one lower layer: the layer index and a handle on it.
#[derive(Debug)]
pub struct LowerEntry {
    pub layer: usize,
    pub dir: Real,
    /// The directory is marked to hold xattr whiteouts (see [`crate::engine::layers::DirMarks`]).
    pub xwhiteouts: bool,
}

/// Mutable state of an inode, guarded by the inode's lock.
///
/// Directories hold `O_PATH` handles on their real directories (every operation on their
/// children is relative to them). Non-directories hold none: they are reached as `name` in
/// the parent's real directory of their layer when needed, so the descriptors open stay
/// proportional to the directories the kernel holds, not the files (a 200 000-file tree must
/// not need 200 000 descriptors).
#[derive(Debug, Default)]
pub struct InodeState {
    /// Directories: the upper directory, once it exists (created or copied up).
    pub upper: Option<OwnedFd>,
    /// Directories: the upper directory is marked to hold xattr whiteouts.
    pub upper_xwh: bool,
    /// Directories: the upper directory is known to hold no `.wh.` marker file (it was made
    /// by this mount, or listed), so a name absent there needs no marker check. Only set when
    /// the mount writes device whiteouts: it then never makes markers, so this stays true.
    pub upper_wh_free: AtomicBool,
    /// Non-directories: the entry exists in the upper layer.
    pub in_upper: bool,
    /// Directories: every lower directory merged into this one, topmost first, stopping at the
    /// first opaque one.
    pub lowers: Box<[LowerEntry]>,
    /// Non-directories: the lower layer whose entry is shown (if not in the upper); see
    /// [`InodeState::lower_layer`]. 16 bits: the state of every inode is kept small.
    pub lower: Option<u16>,
    /// Non-directories whose last name went while the kernel still holds them (open files):
    /// a handle on the real entry, which has no name any more.
    pub pinned: Option<Real>,
    /// The parent and name through which the inode was last reached; copy-up recreates the
    /// entry there. For directories this is the only name. The parent is held strongly so a
    /// copy-up can always walk up to the root.
    pub parent: Option<Arc<Inode>>,
    pub name: Box<OsStr>,
    /// Further names of a hard-linked non-directory (beyond `parent`/`name`), so a copy-up
    /// can link every known name to the copy and losing one name never strands the inode.
    /// Boxed: almost every inode has none.
    pub extra_names: Option<Box<Vec<ExtraName>>>,
    /// The upper directory is opaque: lower directories are not merged.
    pub opaque: bool,
    /// The last name was removed while the kernel still holds the inode (open files). For a
    /// lower-only file the real link count cannot show it, so st_nlink is reported as 0.
    pub unlinked: bool,
}

impl InodeState {
    /// Directories: the handle whose metadata is shown (upper, else topmost lower).
    pub fn dir_real(&self) -> Option<RealRef<'_>> {
        match &self.upper {
            Some(u) => Some(RealRef::Fd(u.as_fd_borrowed())),
            None => self.lowers.first().map(|l| l.dir.r()),
        }
    }

    /// Records that the upper directory holds no `.wh.` marker (see `upper_wh_free`); ignored
    /// unless the mount writes device whiteouts (`whiteout_dev`).
    pub fn set_upper_wh_free(&self, whiteout_dev: bool) {
        if whiteout_dev {
            self.upper_wh_free.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the upper directory may hold a `.wh.<name>` marker (a check is needed).
    pub fn upper_may_have_wh(&self) -> bool {
        !self.upper_wh_free.load(Ordering::Relaxed)
    }

    /// The entry exists in the upper layer.
    pub fn has_upper(&self) -> bool {
        self.in_upper || self.upper.is_some()
    }

    /// The entry exists in a lower layer.
    pub fn has_lower(&self) -> bool {
        self.lower.is_some() || !self.lowers.is_empty()
    }

    /// Non-directories: the lower layer whose entry is shown (if not in the upper).
    pub fn lower_layer(&self) -> Option<usize> {
        self.lower.map(usize::from)
    }

    /// Sets the lower layer shown (layer indexes fit 16 bits: see `LayerStack::open`).
    pub fn set_lower_layer(&mut self, layer: usize) {
        self.lower = Some(layer as u16);
    }

    /// The further names of a hard-linked non-directory.
    pub fn extra_names(&self) -> &[ExtraName] {
        self.extra_names.as_deref().map_or(&[], |v| v.as_slice())
    }

    /// Records that the inode is reachable as `name` in `parent` (lookup, link, rename target).
    pub fn add_name(&mut self, parent: &Arc<Inode>, name: &OsStr, is_dir: bool) {
        let same = |p: &Arc<Inode>, n: &OsStr| Arc::ptr_eq(p, parent) && n == name;
        if is_dir || self.unlinked || self.parent.is_none() {
            // A directory has one name; an unlinked inode got a name back.
            self.parent = Some(parent.clone());
            self.name = name.into();
            self.extra_names = None;
            self.unlinked = false;
            return;
        }
        let known = self.parent.as_ref().is_some_and(|p| same(p, &self.name))
            || self.extra_names().iter().any(|(p, n)| same(p, n));
        if !known {
            self.extra_names
                .get_or_insert_with(Default::default)
                .push((parent.clone(), name.into()));
        }
    }

    /// Forgets the name `name` in `parent` (unlink, or renamed away / replaced). When no name
    /// is left the inode is unlinked.
    pub fn remove_name(&mut self, parent: &Arc<Inode>, name: &OsStr) {
        let same = |p: &Arc<Inode>, n: &OsStr| Arc::ptr_eq(p, parent) && n == name;
        if self.parent.as_ref().is_some_and(|p| same(p, &self.name)) {
            match self.extra_names.as_mut().and_then(|v| v.pop()) {
                Some((p, n)) => {
                    self.parent = Some(p);
                    self.name = n;
                }
                None => self.unlinked = true,
            }
        } else if let Some(v) = &mut self.extra_names {
            v.retain(|(p, n)| !same(p, n));
        }
        if self.extra_names.as_ref().is_some_and(|v| v.is_empty()) {
            self.extra_names = None;
        }
    }
}

/// A further name of a hard-linked file: its parent and the name there.
pub type ExtraName = (Arc<Inode>, Box<OsStr>);

/// One overlay inode.
#[derive(Debug)]
pub struct Inode {
    /// Inode number, both the FUSE node id and the st_ino shown.
    pub ino: u64,
    pub kind: Kind,
    /// Lookups the kernel holds (see module invariants).
    lookups: AtomicU64,
    pub state: RwLock<InodeState>,
    /// Serialises copy-up of this inode so two writers never race to create it.
    pub copy_up_lock: Mutex<()>,
    /// Open file handles on this inode (removing its last name must then keep it reachable).
    pub open_files: AtomicU64,
    /// The real file is known to have no `security.capability` xattr, which the kernel asks
    /// for before writes. Set only by a getxattr that found none, with the state read-locked;
    /// cleared by setxattr with it write-locked, after its change: see `Overlay::getxattr`.
    pub no_file_caps: AtomicBool,
    /// Writable handles open through FUSE passthrough. While there are any, the real file can
    /// change behind the kernel's cached attributes (a write through a shared mapping goes
    /// straight to it), so attributes are replied with no cache time (see `fs.rs`).
    pub passthrough_writers: AtomicU64,
    /// Key in `by_id` (dev, ino of the backing real file), updated on copy-up. Only read and
    /// written with the tables' lock held, so two atomics need no lock of their own.
    id: [AtomicU64; 2],
}

impl Inode {
    /// Reads the state, tolerating a poisoned lock (a panicked request must not wedge the mount).
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, InodeState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the state.
    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, InodeState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The `by_id` key (read under the tables' lock).
    fn id(&self) -> (u64, u64) {
        (
            self.id[0].load(Ordering::Relaxed),
            self.id[1].load(Ordering::Relaxed),
        )
    }

    /// Is this a directory?
    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Directory
    }
}

fn id_atomics((dev, ino): (u64, u64)) -> [AtomicU64; 2] {
    [AtomicU64::new(dev), AtomicU64::new(ino)]
}

/// At most this many forgotten inodes are remembered (about 120 MB).
const MAX_GHOSTS: usize = 1 << 20;

/// Root inode number, fixed by FUSE.
pub const ROOT_INO: u64 = 1;
const FALLBACK_BASE: u64 = 1 << 63;

/// The table of live inodes. See the module documentation for its invariants.
#[derive(Debug)]
pub struct InodeStore {
    mode: InodeMode,
    inner: RwLock<Tables>,
    next_virtual: AtomicU64,
    next_fallback: AtomicU64,
}

#[derive(Debug, Default)]
struct Tables {
    by_ino: HashMap<u64, Arc<Inode>>,
    by_id: HashMap<(u64, u64), u64>,
    /// Forgotten inodes whose files still have a name, by number (see the module invariants).
    ghosts: HashMap<u64, Ghost>,
}

/// What is kept of a forgotten inode: enough to find its file again by name.
#[derive(Debug)]
struct Ghost {
    kind: Kind,
    /// The inode itself while something else (a live child's parent link) still holds it:
    /// it is then brought back as it is, handles and all.
    inode: Weak<Inode>,
    parent: u64,
    name: Box<OsStr>,
}

/// Where a forgotten inode can be found again: its kind, the inode itself if still held
/// elsewhere, else its parent's number and its name there.
pub enum GhostRef {
    Held(Arc<Inode>),
    Named(Kind, u64, Box<OsStr>),
}

/// What is known about a real entry found by lookup, used to find or create its inode.
pub struct Found {
    pub kind: Kind,
    /// (dev, ino) of the backing real file.
    pub id: (u64, u64),
    /// Layer the backing file lives in: 0 = upper, n = lower n-1.
    pub layer: usize,
    pub state: InodeState,
}

impl InodeStore {
    /// Creates a store holding only the root inode.
    pub fn new(mode: InodeMode, root: Found) -> Self {
        let root_inode = Arc::new(Inode {
            ino: ROOT_INO,
            kind: Kind::Directory,
            lookups: AtomicU64::new(1),
            state: RwLock::new(root.state),
            copy_up_lock: Mutex::new(()),
            open_files: AtomicU64::new(0),
            no_file_caps: AtomicBool::new(false),
            passthrough_writers: AtomicU64::new(0),
            id: id_atomics(root.id),
        });
        let mut t = Tables::default();
        t.by_ino.insert(ROOT_INO, root_inode);
        t.by_id.insert(root.id, ROOT_INO);
        InodeStore {
            mode,
            inner: RwLock::new(t),
            next_virtual: AtomicU64::new(ROOT_INO + 1),
            next_fallback: AtomicU64::new(FALLBACK_BASE),
        }
    }

    fn tables(&self) -> std::sync::RwLockReadGuard<'_, Tables> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn tables_mut(&self) -> std::sync::RwLockWriteGuard<'_, Tables> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The inode with number `ino`, if the kernel still holds it.
    pub fn get(&self, ino: u64) -> Option<Arc<Inode>> {
        self.tables().by_ino.get(&ino).cloned()
    }

    /// Number of live inodes (for tests and memory accounting).
    pub fn len(&self) -> usize {
        self.tables().by_ino.len()
    }

    /// True when only the root is left.
    pub fn is_empty(&self) -> bool {
        self.len() <= 1
    }

    /// Finds the inode for a real entry or creates it, and takes one lookup reference.
    /// An existing inode gets its parent/name refreshed (the kernel just reached it there).
    pub fn lookup_or_insert(&self, found: Found) -> Arc<Inode> {
        let mut t = self.tables_mut();
        let mut ghost_ino = None;
        if let Some(ino) = t.by_id.get(&found.id).copied() {
            let live = t.by_ino.get(&ino).cloned();
            // A forgotten inode of this file: it comes back under its number (and as the same
            // object when something still holds it).
            let live = live.or_else(|| match t.ghosts.remove(&ino) {
                Some(g) if g.kind == found.kind => {
                    ghost_ino = Some(ino);
                    let inode = g.inode.upgrade()?;
                    inode.lookups.store(0, Ordering::Relaxed);
                    t.by_ino.insert(ino, inode.clone());
                    Some(inode)
                }
                _ => None,
            });
            if let Some(inode) = live {
                if inode.kind == found.kind {
                    inode.lookups.fetch_add(1, Ordering::Relaxed);
                    drop(t);
                    if let Some(parent) = &found.state.parent {
                        inode
                            .write()
                            .add_name(parent, &found.state.name, inode.is_dir());
                    }
                    return inode;
                }
            }
        }
        let ino = ghost_ino.unwrap_or_else(|| self.assign(&t, &found));
        let inode = Arc::new(Inode {
            ino,
            kind: found.kind,
            lookups: AtomicU64::new(1),
            state: RwLock::new(found.state),
            copy_up_lock: Mutex::new(()),
            open_files: AtomicU64::new(0),
            no_file_caps: AtomicBool::new(false),
            passthrough_writers: AtomicU64::new(0),
            id: id_atomics(found.id),
        });
        t.by_ino.insert(ino, inode.clone());
        t.by_id.insert(found.id, ino);
        inode
    }

    /// The live directory inode backed by the real directory `id`, with one lookup reference
    /// taken, if the kernel holds one: its state (handles, merged lowers, marks) is kept up to
    /// date by the overlay's own changes, so a lookup need not probe the layers again.
    pub fn acquire_dir(&self, id: (u64, u64)) -> Option<Arc<Inode>> {
        // The read lock excludes `forget` (which takes the write lock) while counting.
        let t = self.tables();
        let inode = t.by_ino.get(t.by_id.get(&id)?)?;
        if !inode.is_dir() {
            return None;
        }
        inode.lookups.fetch_add(1, Ordering::Relaxed);
        Some(inode.clone())
    }

    /// Takes a lookup reference on an inode the overlay holds (a child's parent) for a lookup
    /// of "." or "..". The kernel may have forgotten it meanwhile: then the real file's
    /// current inode is used if one was looked up again since, else this one is
    /// put back under its own number (which nothing else can have taken: virtual numbers are
    /// never reused and a persistent one belongs to this real file). `None` when its
    /// number went to another inode.
    pub fn revive(&self, inode: &Arc<Inode>) -> Option<Arc<Inode>> {
        let mut t = self.tables_mut();
        t.ghosts.remove(&inode.ino);
        if let Some(live) = t.by_ino.get(&inode.ino) {
            if !Arc::ptr_eq(live, inode) {
                return None;
            }
            inode.lookups.fetch_add(1, Ordering::Relaxed);
            return Some(inode.clone());
        }
        let id = inode.id();
        if let Some(live) = t.by_id.get(&id).and_then(|n| t.by_ino.get(n)) {
            if live.kind == inode.kind {
                live.lookups.fetch_add(1, Ordering::Relaxed);
                return Some(live.clone());
            }
            return None;
        }
        inode.lookups.store(1, Ordering::Relaxed);
        t.by_ino.insert(inode.ino, inode.clone());
        t.by_id.insert(id, inode.ino);
        Some(inode.clone())
    }

    fn assign(&self, t: &Tables, found: &Found) -> u64 {
        if self.mode == InodeMode::Persistent {
            let (_, real) = found.id;
            if real < (1 << 56) && found.layer < 127 {
                let n = ((found.layer as u64) << 56) | real;
                if n > ROOT_INO && !t.by_ino.contains_key(&n) && !t.ghosts.contains_key(&n) {
                    return n;
                }
            }
            return self.next_fallback.fetch_add(1, Ordering::Relaxed);
        }
        self.next_virtual.fetch_add(1, Ordering::Relaxed)
    }

    /// Drops `n` lookup references; at zero the inode leaves the table.
    pub fn forget(&self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut t = self.tables_mut();
        let Some(inode) = t.by_ino.get(&ino) else {
            return;
        };
        let prev = inode.lookups.fetch_sub(
            n.min(inode.lookups.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        if prev <= n {
            let id = inode.id();
            let Some(inode) = t.by_ino.remove(&ino) else {
                return;
            };
            // `try_read`: a writer of the state may be waiting for the tables' lock (copy-up
            // re-keys the inode); rather than wait, keep no ghost (its handles go stale).
            let ghost = inode.state.try_read().ok().and_then(|st| {
                let parent = st.parent.as_ref()?.ino;
                // A weak link only to an inode held elsewhere: it would keep the allocation
                // of one held by nobody (most files) alive for nothing.
                let held = Arc::strong_count(&inode) > 1;
                (!st.unlinked).then(|| Ghost {
                    kind: inode.kind,
                    inode: if held {
                        Arc::downgrade(&inode)
                    } else {
                        Weak::new()
                    },
                    parent,
                    name: st.name.clone(),
                })
            });
            match ghost {
                Some(g) if t.by_id.get(&id) == Some(&ino) => {
                    if t.ghosts.len() >= MAX_GHOSTS {
                        // Bounded memory: forget every ghost at once (amortised over as many
                        // forgets). Their files get new numbers and their handles go stale.
                        let Tables {
                            by_ino,
                            by_id,
                            ghosts,
                        } = &mut *t;
                        ghosts.clear();
                        by_id.retain(|_, n| by_ino.contains_key(n));
                    }
                    t.ghosts.insert(ino, g);
                }
                _ => {
                    if t.by_id.get(&id) == Some(&ino) {
                        t.by_id.remove(&id);
                    }
                }
            }
        }
    }

    /// Where the forgotten inode `ino` can be found again; `None` if the number is live or
    /// names nothing (never given, or its file was deleted).
    pub fn ghost(&self, ino: u64) -> Option<GhostRef> {
        let t = self.tables();
        let g = t.ghosts.get(&ino)?;
        Some(match g.inode.upgrade() {
            Some(inode) => GhostRef::Held(inode),
            None => GhostRef::Named(g.kind, g.parent, g.name.clone()),
        })
    }

    /// The real file behind `inode` was deleted while the kernel may still hold the inode:
    /// unmap its (dev, ino), which the filesystem is free to reuse for a new file. A new file
    /// found under that number then gets an inode of its own instead of this one (whose
    /// cached attributes and pages in the kernel belong to the deleted file).
    pub fn forget_real_file(&self, inode: &Inode) {
        let mut t = self.tables_mut();
        let id = inode.id();
        if t.by_id.get(&id) == Some(&inode.ino) {
            t.by_id.remove(&id);
        }
    }

    /// Re-keys an inode after copy-up: it is now backed by the upper file `id`.
    pub fn rekey(&self, inode: &Inode, id: (u64, u64)) {
        let mut t = self.tables_mut();
        let cur = inode.id();
        if t.by_id.get(&cur) == Some(&inode.ino) {
            t.by_id.remove(&cur);
        }
        inode.id[0].store(id.0, Ordering::Relaxed);
        inode.id[1].store(id.1, Ordering::Relaxed);
        t.by_id.insert(id, inode.ino);
    }
}
