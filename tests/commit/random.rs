//! Seeded random operations through the mount, the same on a plain copy, then a commit: the
//! lower must equal the copy (reproduce one seed with `OVL_COMMIT_SEED=<n>`, optionally
//! `OVL_COMMIT_OPS=<n>`; more seeds with `OVL_COMMIT_SEEDS=<count>`).

use super::*;
use crate::common::ops::*;

const PROP_SEEDS: u64 = 5;
const PROP_OPS: usize = 150;
const HISTORY: usize = 40;

const NAMES: &[&str] = &[
    "a", "b", "c", "d1", "d1/x", "d1/y", "d1/d", "d1/d/q", "d2", "d2/sub", "d2/sub/z", "d2/h2",
    "d3", "d3/e", "d4", "d4/f", "h1", "s1",
];
/// Symlink targets. None climbs out of the root: the operations themselves follow symlinks
/// (open, chmod, truncate), and must stay inside the tree on both sides.
const TARGETS: &[&str] = &["a", "d1/../a", "d1", "x", "nowhere", "sub/z", "h1"];
const XATTRS: &[&str] = &["user.k1", "user.k2", "user.lo"];
const PMODES: &[u32] = &[0o644, 0o600, 0o755, 0o700, 0o640, 0o4755, 0o2775, 0o1777];
const TIMES: &[(i64, i64)] = &[(1_000_000_000, 0), (1_111_111_111, 222_333_444)];

fn prop_lower(l: &Path, _t: &Path) {
    fs::write(l.join("a"), "alpha\n").unwrap();
    fs::write(l.join("b"), "bravo").unwrap();
    chmod(&l.join("b"), 0o600);
    fs::create_dir(l.join("d1")).unwrap();
    fs::write(l.join("d1/x"), "x-one").unwrap();
    fs::write(l.join("d1/y"), "y-one\n").unwrap();
    fs::create_dir(l.join("d1/d")).unwrap();
    fs::create_dir_all(l.join("d2/sub")).unwrap();
    fs::write(l.join("d2/sub/z"), "zeta").unwrap();
    fs::write(l.join("h1"), "hardlinked").unwrap();
    fs::hard_link(l.join("h1"), l.join("d2/h2")).unwrap();
    fs::create_dir(l.join("d3")).unwrap();
    chmod(&l.join("d3"), 0o750);
    fs::write(l.join("d3/e"), "").unwrap();
    symlink("a", &l.join("s1"));
    lsetxattr(&l.join("a"), "user.lo", b"lower", 0).unwrap();
    lsetxattr(&l.join("d1"), "user.k1", b"dir", 0).unwrap();
    let mut ps: Vec<String> = snap(l).into_keys().collect();
    ps.reverse(); // children before parents
    for p in ps {
        set_times(&l.join(p), Some(OLD), Some(OLD)).unwrap();
    }
}

fn gen_op(rng: &mut StdRng) -> Op {
    let p = |rng: &mut StdRng| pick(rng, NAMES).to_string();
    match rng.gen_range(0..100) {
        0..12 => Op::Create {
            path: p(rng),
            data: data(rng),
            excl: rng.gen_bool(0.3),
        },
        12..18 => Op::Append {
            path: p(rng),
            data: data(rng),
        },
        18..22 => Op::Truncate {
            path: p(rng),
            len: rng.gen_range(0..20),
        },
        22..27 => Op::WriteAt {
            path: p(rng),
            off: rng.gen_range(0..16),
            data: data(rng),
        },
        27..41 => Op::Rename {
            from: p(rng),
            to: p(rng),
            flags: match rng.gen_range(0..10) {
                0..7 => 0,
                7..9 => libc::RENAME_NOREPLACE,
                _ => libc::RENAME_EXCHANGE,
            },
        },
        41..46 => Op::Link {
            from: p(rng),
            to: p(rng),
        },
        46..54 => Op::Unlink { path: p(rng) },
        54..63 => Op::Mkdir {
            path: p(rng),
            mode: Mode(PMODES[rng.gen_range(0..PMODES.len())]),
        },
        63..69 => Op::Rmdir { path: p(rng) },
        69..74 => Op::Symlink {
            target: pick(rng, TARGETS).to_string(),
            path: p(rng),
        },
        74..79 => Op::Chmod {
            path: p(rng),
            mode: Mode(PMODES[rng.gen_range(0..PMODES.len())]),
        },
        79..82 => Op::Chown {
            path: p(rng),
            uid: [0, 1234][rng.gen_range(0..2)],
            gid: [0, 2345][rng.gen_range(0..2)],
        },
        82..85 => Op::SetTimes {
            path: p(rng),
            mtime: TIMES[rng.gen_range(0..TIMES.len())],
        },
        85..91 => Op::SetXattr {
            path: p(rng),
            name: pick(rng, XATTRS).to_string(),
            value: data(rng),
            flags: 0,
        },
        91..95 => Op::RemoveXattr {
            path: p(rng),
            name: pick(rng, XATTRS).to_string(),
        },
        95..97 => Op::Read { path: p(rng) },
        97..99 => Op::Stat { path: p(rng) },
        _ => Op::ListDir { path: p(rng) },
    }
}

fn prop_seed(seed: u64, ops: usize, action: OverlayAction) -> Result<String, String> {
    let mut fx = Fx::new(prop_lower);
    let copy = fx.t("copy");
    cp_a(&fx.lower, &copy);
    let orig_lower = snap(&fx.lower);
    let orig_copy = snap(&copy);
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut history = Vec::new();
    let hist = |h: &[String]| h[h.len().saturating_sub(HISTORY)..].join("\n");
    for step in 1..=ops {
        let op = gen_op(&mut rng);
        let ro = apply(&fx.mnt, &op, false);
        let rc = apply(&copy, &op, false);
        history.push(format!("  {step:4}: {op:?} => {ro:?}"));
        if ro != rc {
            return Err(format!(
                "the mount and the plain copy diverged at step {step} (an overlay bug, not a \
                 commit bug): mount {ro:?}, copy {rc:?}\n{}",
                hist(&history)
            ));
        }
    }
    let view = snap(&fx.mnt);
    let expected = snap(&copy);
    let d = tree_diff("mount", &view, "copy", &expected, LINKS);
    if !d.is_empty() {
        return Err(format!(
            "before the commit the mount differs from the plain copy (an overlay bug, not a \
             commit bug):\n{d}\n{}",
            hist(&history)
        ));
    }
    let rep = fx
        .finish(action)
        .map_err(|e| format!("commit failed: {e}\n{}", hist(&history)))?;
    let got = snap(&fx.lower);
    let mut pr = Problems::default();
    let d = tree_diff("lower", &got, "copy", &expected, EXACT);
    pr.check(d.is_empty(), || {
        format!("committed lower differs from the plain copy:\n{d}")
    });
    pr.check(!exists(&fx.upper) && !exists(&fx.work), || {
        "upper or work dir left after a successful commit".into()
    });
    pr.check(names(fx.dir.path()) == ["copy", "lower", "mnt"], || {
        format!("left in the test dir: {:?}", names(fx.dir.path()))
    });
    let l = leaks(&got);
    pr.check(l.is_empty(), || format!("overlay internals leaked: {l:?}"));
    for (p, e) in &expected {
        let Some(g) = got.get(p) else { continue };
        if e.kind == 'd' || g.kind != e.kind {
            continue;
        }
        // mtimes the run did not set to "now" (kept from the lower or set explicitly).
        if e.mtime.0 < t0 {
            pr.check(g.mtime == e.mtime, || {
                format!("{p}: mtime {:?}, the plain copy has {:?}", g.mtime, e.mtime)
            });
        }
        // Files no operation touched (same inode, same ctime in the copy) stay the same inode.
        if let (Some(oc), Some(ol)) = (orig_copy.get(p), orig_lower.get(p)) {
            if oc.ino == e.ino && oc.ctime == e.ctime {
                pr.check(g.ino == ol.ino, || {
                    format!("{p}: untouched by every operation, yet rewritten (new inode)")
                });
            }
        }
    }
    if pr.0.is_empty() {
        Ok(format!(
            "{} entries; report: {} written, {} unchanged, {} deleted, {} replaced dirs",
            got.len(),
            rep.written,
            rep.deduplicated,
            rep.deleted,
            rep.dirs_replaced
        ))
    } else {
        Err(format!(
            "{}\nrecent operations:\n{}",
            pr.0.join("\n"),
            hist(&history)
        ))
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

fn prop_test(action: OverlayAction, base: u64) {
    let ops = env_u64("OVL_COMMIT_OPS").map_or(PROP_OPS, |n| n as usize);
    let seeds: Vec<u64> = match env_u64("OVL_COMMIT_SEED") {
        Some(s) => vec![s],
        None => (base..base + env_u64("OVL_COMMIT_SEEDS").unwrap_or(PROP_SEEDS)).collect(),
    };
    let mut failed = Vec::new();
    for seed in seeds {
        match prop_seed(seed, ops, action) {
            Ok(s) => eprintln!("{action:?} seed {seed}: ok ({s})"),
            Err(e) => {
                eprintln!("\n=== {action:?} seed {seed} FAILED ===\n{e}\n");
                failed.push(seed);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{action:?}: failing seeds {failed:?} (details above; reproduce with \
         OVL_COMMIT_SEED=<seed> cargo test --release --test commit {})",
        if action == OverlayAction::Commit {
            "property_commit_matches"
        } else {
            "property_commit_atomic_matches"
        }
    );
}

#[test]
fn property_commit_matches_plain_copy() {
    need_root!();
    prop_test(OverlayAction::Commit, 1);
}

#[test]
fn property_commit_atomic_matches_plain_copy() {
    need_root!();
    prop_test(OverlayAction::CommitAtomic, 101);
}
