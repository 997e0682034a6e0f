//! The blocks a start of an app reads, remembered for the next start: the instance server
//! decompresses them on a thread of its own as soon as the mount is up, so the app's reads
//! (one at a time, each waiting for its block) find them ready instead of decompressing them
//! in turn. A start of the 740 MB Python distribution reads ~12 MiB of blocks, ~10 ms of
//! decompression on the critical path without this, done on the other core with it.
//!
//! The list is a hint: it lives beside the kept upper (`.NAME.ovl-prefetch`), names the bundle
//! it was made for (another version's list is ignored), and is written without syncing (lost
//! or torn, the next start just reads its blocks as they come).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::extract::Bundle;
use crate::overlayfs::hidden_sibling;

/// Blocks remembered (a start's working set is tens; a long session's, more).
const MAX_BLOCKS: usize = 1024;
/// Decompressed bytes prefetched at most (the reader keeps 64 MiB of blocks).
const BUDGET: usize = 32 << 20;
const MAGIC: &str = "ovl-prefetch 1";

fn list_path(upper: &Path) -> PathBuf {
    hidden_sibling(upper, ".ovl-prefetch")
}

/// The list made for bundle `id`, or nothing (none, another bundle's, unreadable).
fn read_list(upper: &Path, id: &str) -> Vec<u32> {
    let Ok(text) = fs::read_to_string(list_path(upper)) else {
        return Vec::new();
    };
    let mut lines = text.lines();
    if lines.next() != Some(&format!("{MAGIC} {id}")) {
        return Vec::new();
    }
    lines
        .next()
        .unwrap_or_default()
        .split(' ')
        .filter_map(|n| n.parse().ok())
        .take(MAX_BLOCKS)
        .collect()
}

/// The prefetch thread of a mount; [`Prefetch::finish`] stops it between two blocks.
pub struct Prefetch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Prefetch {
    /// Stops the thread after the block it is on and waits for it (so the mount is left by
    /// nobody, and the thread's line is in the log).
    pub fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Starts decompressing, on a thread of its own, the blocks the last runs of this bundle with
/// this upper read. Call once the mount is up.
pub fn start(bundle: &Bundle, upper: &Path) -> Option<Prefetch> {
    let list = read_list(upper, &bundle.id());
    if list.is_empty() {
        return None;
    }
    let image = Arc::clone(bundle.shared_image());
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("ovl-prefetch".into())
        .spawn(move || {
            // At the app's own priority: a read that wants the block this thread is
            // decompressing waits for it, so a thread held back would hold the app back.
            let n = image.prefetch(&list, BUDGET, &flag);
            log::info!("prefetched {n} of {} blocks", list.len());
        });
    match spawned {
        Ok(thread) => Some(Prefetch { stop, thread }),
        Err(e) => {
            log::info!("no prefetch thread: {e}");
            None
        }
    }
}

/// Remembers the blocks this run read, first, then those the earlier list named that this run
/// did not read (a short run does not make the next long one slow), for the next start.
pub fn save(bundle: &Bundle, upper: &Path) {
    let mut list = bundle.image().touched_blocks();
    if list.is_empty() {
        return;
    }
    let seen: std::collections::HashSet<u32> = list.iter().copied().collect();
    list.extend(
        read_list(upper, &bundle.id())
            .into_iter()
            .filter(|b| !seen.contains(b)),
    );
    list.truncate(MAX_BLOCKS);
    let numbers: Vec<String> = list.iter().map(u32::to_string).collect();
    let text = format!("{MAGIC} {}\n{}\n", bundle.id(), numbers.join(" "));
    let path = list_path(upper);
    let tmp = hidden_sibling(upper, &format!(".ovl-prefetch.{}", std::process::id()));
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        log::info!("{}: not saved: {e}", path.display());
    }
}
