//! File handles (`name_to_handle_at`/`open_by_handle_at`, NFS export, fanotify).
//!
//! The kernel encodes a handle itself from the FUSE node id (the inode number) and asks us only
//! when it no longer holds that inode: a LOOKUP of "." in the node. A live inode answers at
//! once; a forgotten one is found again through the ghost the inode store kept of it (see
//! [`crate::engine::inode`]): by looking its name up in its parent, itself found the same way
//! up to the root, and accepting the result only if it is the same file (the same number).

use std::sync::Arc;

use fuser::FileAttr;

use crate::engine::inode::{GhostRef, Inode};
use crate::engine::overlay::{OpResult, Overlay, errno};

impl Overlay {
    /// LOOKUP of "." in node `ino`: the inode and its attributes, with a lookup reference
    /// taken. ESTALE when the number names no file any more.
    pub fn lookup_handle(&self, ino: u64) -> OpResult<(Arc<Inode>, FileAttr)> {
        let inode = self.find_by_number(ino)?;
        match self.getattr(ino, None) {
            Ok(attr) => Ok((inode, attr)),
            Err(e) => {
                self.inodes.forget(ino, 1);
                Err(e)
            }
        }
    }

    /// The inode numbered `ino`, live or brought back, with one lookup reference taken.
    fn find_by_number(&self, ino: u64) -> OpResult<Arc<Inode>> {
        let stale = || errno(libc::ESTALE);
        if let Some(inode) = self.inodes.get(ino) {
            // The kernel asks only for a node it no longer holds, so nothing has this one
            // open; unlinked, it is gone (as a closed, deleted file on a disk file system),
            // even while the kernel's FORGET of it is still on its way. (With FUSE over
            // io_uring that FORGET comes through /dev/fuse and this LOOKUP through the ring,
            // so the LOOKUP often overtakes it.)
            if inode.read().unlinked {
                return Err(stale());
            }
            return self.inodes.revive(&inode).ok_or_else(stale);
        }
        let (kind, parent, name) = match self.inodes.ghost(ino).ok_or_else(stale)? {
            GhostRef::Held(inode) => return self.inodes.revive(&inode).ok_or_else(stale),
            GhostRef::Named(kind, parent, name) => (kind, parent, name),
        };
        let parent = self.find_by_number(parent)?;
        let found = self.lookup_in(&parent, &name);
        self.inodes.forget(parent.ino, 1);
        let (inode, _) = found.map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => stale(),
            _ => e,
        })?;
        if inode.ino != ino || inode.kind != kind {
            self.inodes.forget(inode.ino, 1);
            return Err(stale());
        }
        Ok(inode)
    }
}
