//! The commit journal: durable record of a running commit, read by [`recover`].

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::io_err;
use crate::error::{Error, Result};

/// Journal file name inside the work directory.
const JOURNAL: &str = "ovl-commit.journal";

/// The commit journal: which commit runs, where its temporaries are, how far it got.
/// Stored as `key=<hex of the value's bytes>` lines, so any path (newlines included) comes
/// back exactly as written.
#[derive(Debug, Default, Clone)]
pub(super) struct Journal {
    /// "inplace" or "atomic".
    pub(super) mode: String,
    pub(super) lower: PathBuf,
    /// In-place: the staging directory. Atomic: the new tree being built.
    pub(super) temp: PathBuf,
    /// Atomic: inode of the new tree's root (0 until it is complete).
    pub(super) new_ino: u64,
    /// The lower is complete and durable: only the upper's removal is left.
    pub(super) merged: bool,
    /// In-place commits with directory renames: every redirected directory of the upper
    /// (its path, the lower directory it shows, that one's inode), written before the first
    /// move. With these a run that was interrupted is finished, never rolled back (a moved
    /// directory is no longer where the upper's redirect says).
    pub(super) redirects: Vec<(PathBuf, Option<PathBuf>, u64)>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Journal {
    /// Records a commit of `mode` into `lower` whose temporary directory is `temp`, then
    /// creates that directory: journaled before it exists, so recovery never guesses names.
    pub(super) fn begin(work: &Path, mode: &str, lower: &Path, temp: &Path) -> Result<Journal> {
        let j = Journal {
            mode: mode.into(),
            lower: lower.to_path_buf(),
            temp: temp.to_path_buf(),
            ..Default::default()
        };
        write_journal(work, &j)?;
        std::fs::create_dir(temp).map_err(io_err("creating", temp))?;
        Ok(j)
    }

    fn encode(&self) -> String {
        let mut s = format!(
            "mode={}\nlower={}\ntemp={}\nnew_ino={}\nmerged={}\n",
            hex(self.mode.as_bytes()),
            hex(self.lower.as_os_str().as_bytes()),
            hex(self.temp.as_os_str().as_bytes()),
            hex(self.new_ino.to_string().as_bytes()),
            hex(if self.merged { b"1" } else { b"0" }),
        );
        // One line each: `redirect=<dst>:<src, empty for none>:<inode>`, paths in hex.
        for (dst, src, ino) in &self.redirects {
            let src = src
                .as_ref()
                .map_or(String::new(), |p| hex(p.as_os_str().as_bytes()));
            s.push_str(&format!(
                "redirect={}:{src}:{ino}\n",
                hex(dst.as_os_str().as_bytes())
            ));
        }
        s
    }

    fn decode(text: &str) -> Option<Journal> {
        let mut f: HashMap<&str, Vec<u8>> = HashMap::new();
        let mut redirects = Vec::new();
        let path_of = |h: &str| unhex(h).map(|v| PathBuf::from(OsStr::from_bytes(&v)));
        for l in text.lines() {
            let (k, v) = l.split_once('=')?;
            if k == "redirect" {
                let mut it = v.split(':');
                let dst = path_of(it.next()?)?;
                let src = match it.next()? {
                    "" => None,
                    h => Some(path_of(h)?),
                };
                let ino = it.next()?.parse().ok()?;
                redirects.push((dst, src, ino));
                continue;
            }
            f.insert(k, unhex(v)?);
        }
        let path = |k: &str| f.get(k).map(|v| PathBuf::from(OsStr::from_bytes(v)));
        let text = |k: &str| f.get(k).and_then(|v| String::from_utf8(v.clone()).ok());
        Some(Journal {
            mode: text("mode")?,
            lower: path("lower")?,
            temp: path("temp")?,
            new_ino: text("new_ino")?.parse().ok()?,
            merged: text("merged")? == "1",
            redirects,
        })
    }
}

/// Writes the journal durably (temp + fsync + rename + fsync dir).
pub(super) fn write_journal(work: &Path, j: &Journal) -> Result<()> {
    let tmp = work.join(format!("{JOURNAL}.tmp"));
    let fin = work.join(JOURNAL);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io_err("writing journal", &tmp))?;
        f.write_all(j.encode().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io_err("writing journal", &tmp))?;
    }
    std::fs::rename(&tmp, &fin).map_err(io_err("writing journal", &fin))?;
    sync_dir(work)
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(io_err("syncing", dir))?;
    f.sync_all().map_err(io_err("syncing", dir))
}

pub(super) fn remove_journal(work: &Path) -> Result<()> {
    let j = work.join(JOURNAL);
    match std::fs::remove_file(&j) {
        Ok(()) => sync_dir(work),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing journal", j, e)),
    }
}

/// Finishes or rolls back a commit that was interrupted (a crash, a kill). Returns whether
/// there was one.
/// - An in-place commit that had begun moving renamed directories is finished (the merge runs
///   again from the journal's plan), as the half-moved lower no longer matches the upper.
/// - Once the lower is complete (in-place: every file merged and synced; atomic: the new tree
///   swapped in), recovery rolls forward: the temporaries and the upper go.
/// - Before that it rolls back: the staging directory or half-built tree goes and the upper
///   stays whole. For in-place commits the files already renamed into place are complete, so
///   committing again finishes the job; an atomic commit never touched the lower.
pub fn recover(work: &Path, upper: &Path) -> Result<bool> {
    let jpath = work.join(JOURNAL);
    let text = match std::fs::read_to_string(&jpath) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("reading journal", jpath, e)),
    };
    let j = Journal::decode(&text).ok_or_else(|| {
        Error::bad(
            &jpath,
            "unreadable commit journal: inspect it and remove it by hand",
        )
    })?;
    let done = match j.mode.as_str() {
        // Directories were moved: finish the merge (the upper is still whole).
        "inplace" if !j.merged && !j.redirects.is_empty() => {
            super::resume_in_place(work, upper, j.clone())?;
            true
        }
        "inplace" => j.merged,
        "atomic" => {
            let lower_ino = std::fs::symlink_metadata(&j.lower).map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.ino()
            });
            // The new tree sits at the lower's path: the swap happened.
            j.new_ino != 0 && lower_ino.as_ref().is_ok_and(|i| *i == j.new_ino)
        }
        _ => {
            return Err(Error::bad(
                &jpath,
                "unknown commit journal: inspect it and remove it by hand",
            ));
        }
    };
    // In-place: the staging dir; atomic before the swap: the new tree; after: the old tree.
    if j.temp.exists() {
        crate::finalize::remove_dir_tree(&j.temp)?;
    }
    if done && upper.exists() {
        crate::finalize::remove_dir_tree(upper)?;
    }
    remove_journal(work)?;
    Ok(true)
}
