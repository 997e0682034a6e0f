//! Owner translation between the layers on disk and what the mount shows: fuse-overlayfs's
//! `uidmapping=`/`gidmapping=` (shift ids instead of chowning a whole image for a user
//! namespace), `squash_to_root`/`squash_to_uid=`/`squash_to_gid=`, and `static_nlink`.
//!
//! Everything inside the engine works with the ids on disk; only the FUSE boundary translates:
//! attributes on their way to the kernel ([`IdMap::show`]) and the owners a caller asks for (a
//! new entry's creator, chown) on their way in ([`IdMap::uid_to_disk`]).

use fuser::{FileAttr, FileType};

/// The id shown for an id a mapping does not cover (the kernel's overflow id).
pub const OVERFLOW_ID: u32 = 65534;

/// One range of a mapping: ids `disk..disk+len` on disk are `shown..shown+len` in the mount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub disk: u32,
    pub shown: u32,
    pub len: u32,
}

/// How owners and link counts are shown. The default changes nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdMap {
    /// `uidmapping=`: empty means ids as on disk.
    pub uids: Vec<Range>,
    /// `gidmapping=`.
    pub gids: Vec<Range>,
    /// `squash_to_uid=` (or 0 for `squash_to_root`): every entry shows this owner.
    pub squash_uid: Option<u32>,
    /// `squash_to_gid=` (or 0 for `squash_to_root`).
    pub squash_gid: Option<u32>,
    /// `static_nlink`: directories show a link count of 1.
    pub static_nlink: bool,
}

/// Parses a fuse-overlayfs mapping, `DISK:SHOWN:LEN[:DISK:SHOWN:LEN...]` (the form of one line
/// of `/proc/PID/uid_map` each). Ranges must not be empty, overflow, or overlap on either side.
pub fn parse_mapping(spec: &str) -> Result<Vec<Range>, String> {
    let nums = spec
        .split(':')
        .map(|n| n.parse::<u32>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("'{spec}': give DISK:SHOWN:LEN triples of numbers"))?;
    if nums.is_empty() || nums.len() % 3 != 0 {
        return Err(format!("'{spec}': give DISK:SHOWN:LEN triples of numbers"));
    }
    let ranges: Vec<Range> = nums
        .chunks(3)
        .map(|c| Range {
            disk: c[0],
            shown: c[1],
            len: c[2],
        })
        .collect();
    for (i, r) in ranges.iter().enumerate() {
        if r.len == 0
            || r.disk.checked_add(r.len - 1).is_none()
            || r.shown.checked_add(r.len - 1).is_none()
        {
            return Err(format!(
                "'{spec}': range {}:{}:{} is empty or runs past 2^32",
                r.disk, r.shown, r.len
            ));
        }
        let overlaps =
            |a: u32, b: u32, n: u32, m: u32| a < b.saturating_add(m) && b < a.saturating_add(n);
        for o in &ranges[..i] {
            if overlaps(r.disk, o.disk, r.len, o.len) || overlaps(r.shown, o.shown, r.len, o.len) {
                return Err(format!("'{spec}': ranges overlap"));
            }
        }
    }
    Ok(ranges)
}

fn map(ranges: &[Range], id: u32, to_disk: bool) -> u32 {
    if ranges.is_empty() {
        return id;
    }
    for r in ranges {
        let (from, to) = if to_disk {
            (r.shown, r.disk)
        } else {
            (r.disk, r.shown)
        };
        if id >= from && id - from < r.len {
            return to + (id - from);
        }
    }
    OVERFLOW_ID
}

impl IdMap {
    /// Whether this changes nothing (the common case: no translation at all).
    pub fn is_identity(&self) -> bool {
        *self == IdMap::default()
    }

    /// The attributes as the mount shows them.
    pub fn show(&self, mut attr: FileAttr) -> FileAttr {
        if self.is_identity() {
            return attr;
        }
        attr.uid = self
            .squash_uid
            .unwrap_or_else(|| map(&self.uids, attr.uid, false));
        attr.gid = self
            .squash_gid
            .unwrap_or_else(|| map(&self.gids, attr.gid, false));
        if self.static_nlink && attr.kind == FileType::Directory {
            attr.nlink = 1;
        }
        attr
    }

    /// The id on disk for a user id the caller gave (a creator, a chown). Squashing changes
    /// only what is shown: new entries still belong to their (mapped) creator on disk.
    pub fn uid_to_disk(&self, uid: u32) -> u32 {
        map(&self.uids, uid, true)
    }

    /// Like [`IdMap::uid_to_disk`] for group ids.
    pub fn gid_to_disk(&self, gid: u32) -> u32 {
        map(&self.gids, gid, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_maps_both_ways() {
        let r = parse_mapping("0:1000:1:1:110000:65536").unwrap();
        assert_eq!(map(&r, 0, false), 1000);
        assert_eq!(map(&r, 1, false), 110000);
        assert_eq!(map(&r, 65536, false), 175535);
        assert_eq!(map(&r, 65537, false), OVERFLOW_ID);
        assert_eq!(map(&r, 110005, true), 6);
        assert_eq!(map(&r, 5, true), OVERFLOW_ID);
        for bad in [
            "",
            "0:1",
            "0:1:0",
            "a:b:c",
            "0:0:10:5:100:1",
            "4294967295:0:2",
        ] {
            assert!(parse_mapping(bad).is_err(), "{bad}");
        }
    }
}
