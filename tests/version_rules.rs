//! Property test of the global-version and conflict rules (`ferry::types`), over a model
//! of replicas that edit one name and exchange records.
//!
//! Each replica holds its local record of one name and, per other replica, the record it
//! last learned from it (what the index stores per device). An exchange "i learns j"
//! copies j's current local record into i's view; i then picks the global with
//! `select_global` over everything it knows and applies it the way the folder loop does:
//! a local live version that is *concurrent* with the global and loses is kept as a
//! conflict copy, anything else is simply replaced.
//!
//! Edits write new file content or turn the name into a directory (which has no content
//! of its own to lose, and wins a conflict against a file).
//!
//! What must hold, for random histories of edits, deletions and exchanges on 2–4 replicas:
//! - the global depends only on the set of records known, never on their order (every
//!   replica that has seen the same records picks the same winner), and is never a version
//!   that another known version supersedes;
//! - after everyone has talked to everyone, all replicas hold the same version;
//! - no edit is silently dropped: every content ever written is either the final one, a
//!   conflict copy, or was knowingly replaced (edited over or deleted by a replica that had
//!   it on disk).

use std::collections::{BTreeMap, BTreeSet};

use ferry::types::{select_global, FileInfo, FileKind, VersionOrdering, VersionVector};
use proptest::prelude::*;

/// One record as a replica knows it, with the content it names (0 for a deletion).
#[derive(Debug, Clone)]
struct Rec {
    info: FileInfo,
    content: u64,
}

#[derive(Debug)]
struct Replica {
    short: u64,
    /// The folder's local sequence, as the index keeps it.
    sequence: u64,
    local: Option<Rec>,
    /// What this replica last learned of each other replica's local record.
    known: BTreeMap<usize, Rec>,
}

#[derive(Debug, Clone)]
enum Op {
    /// A new file content, or (`dir`) the name becoming a directory.
    Edit {
        r: usize,
        mtime: i64,
        dir: bool,
    },
    Delete {
        r: usize,
        mtime: i64,
    },
    /// `to` learns `from`'s current record, then resolves; `rot` rotates the candidates.
    Sync {
        to: usize,
        from: usize,
        rot: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    // Few distinct mtimes on purpose: ties exercise the device tie-break, and mtimes that
    // go backwards along a causal chain (a file restored with an old mtime) are common.
    prop_oneof![
        3 => (0usize..4, 0i64..6, proptest::bool::weighted(0.2))
            .prop_map(|(r, mtime, dir)| Op::Edit { r, mtime, dir }),
        1 => (0usize..4, 0i64..6).prop_map(|(r, mtime)| Op::Delete { r, mtime }),
        5 => (0usize..4, 0usize..4, 0usize..8).prop_map(|(to, from, rot)| Op::Sync { to, from, rot }),
    ]
}

struct World {
    reps: Vec<Replica>,
    next_content: u64,
    /// Every content ever written.
    created: BTreeSet<u64>,
    /// Contents a replica had on disk when it edited over or deleted them.
    replaced: BTreeSet<u64>,
    /// Contents kept as conflict copies (which then sync like any file).
    conflict_copies: BTreeSet<u64>,
}

impl World {
    fn new(shorts: &[u64]) -> World {
        World {
            reps: shorts
                .iter()
                .map(|&short| Replica {
                    short,
                    sequence: 0,
                    local: None,
                    known: BTreeMap::new(),
                })
                .collect(),
            next_content: 1,
            created: BTreeSet::new(),
            replaced: BTreeSet::new(),
            conflict_copies: BTreeSet::new(),
        }
    }

    fn local_change(&mut self, r: usize, mtime: i64, delete: bool, dir: bool) {
        let rep = &mut self.reps[r];
        let (old_version, old_live, was_dir) = match &rep.local {
            Some(l) => (
                l.info.version.clone(),
                (!l.info.deleted).then_some(l.content),
                !l.info.deleted && l.info.kind == FileKind::Dir,
            ),
            None => (VersionVector::new(), None, false),
        };
        if delete && old_live.is_none() {
            return; // nothing on disk to delete
        }
        if dir && was_dir {
            return; // already a directory: nothing changes
        }
        if let Some(c) = old_live.filter(|&c| c != 0) {
            self.replaced.insert(c);
        }
        // As the index's commit_local_changes: the counter is at least the next sequence,
        // and the sequence follows the counter.
        let next = rep.sequence + 1;
        let version = old_version.bump_at_least(rep.short, next);
        rep.sequence = next.max(version.get(rep.short));
        // A directory has no content of its own to lose (its files are names of their own).
        let content = if delete || dir {
            0
        } else {
            let c = self.next_content;
            self.next_content += 1;
            self.created.insert(c);
            c
        };
        rep.local = Some(Rec {
            info: FileInfo {
                name: "f".into(),
                kind: if dir { FileKind::Dir } else { FileKind::File },
                size: 0,
                mtime_ns: mtime,
                mode: 0o644,
                deleted: delete,
                version: version.clone(),
                sequence: 0,
                modified_by: rep.short,
                blocks: Vec::new(),
                symlink_target: None,
            },
            content,
        });
    }

    /// `to` learns `from`'s record and applies the global. Returns true if `to` changed.
    fn sync(&mut self, to: usize, from: usize, rot: usize) -> Result<bool, TestCaseError> {
        if to == from {
            return Ok(false);
        }
        if let Some(rec) = self.reps[from].local.clone() {
            self.reps[to].known.insert(from, rec);
        }
        self.resolve(to, rot)
    }

    fn resolve(&mut self, r: usize, rot: usize) -> Result<bool, TestCaseError> {
        let rep = &self.reps[r];
        // The local record first, as the index orders rows; then the others rotated.
        let mut cands: Vec<Rec> = rep.local.iter().cloned().collect();
        let mut others: Vec<Rec> = rep.known.values().cloned().collect();
        if !others.is_empty() {
            let k = rot % others.len();
            others.rotate_left(k);
        }
        cands.extend(others);
        if cands.is_empty() {
            return Ok(false);
        }
        let g = winner(&cands)?;
        let changed = match &rep.local {
            Some(l) if l.info.version == g.info.version => false,
            None if g.info.deleted => false,
            Some(l) => {
                if !l.info.deleted
                    && l.info.kind == FileKind::File
                    && l.info.version.compare(&g.info.version) == VersionOrdering::Concurrent
                {
                    // The loser's content is kept beside the winner.
                    self.conflict_copies.insert(l.content);
                }
                true
            }
            None => true,
        };
        if changed {
            // Recorded as the index's commit_pulled does: the global's version as it is,
            // a new local sequence.
            self.reps[r].local = Some(g);
            self.reps[r].sequence += 1;
        }
        Ok(changed)
    }
}

/// The global among `cands`, checked to be the same whatever the order of the candidates
/// and not superseded by any of them.
fn winner(cands: &[Rec]) -> Result<Rec, TestCaseError> {
    let pick = |order: &[&Rec]| -> Rec {
        let i = select_global(order.iter().map(|r| &r.info)).expect("non-empty");
        order[i].clone()
    };
    let refs: Vec<&Rec> = cands.iter().collect();
    let first = pick(&refs);
    for perm in permutations(refs.len()) {
        let order: Vec<&Rec> = perm.iter().map(|&i| refs[i]).collect();
        let other = pick(&order);
        prop_assert_eq!(
            &other.info.version,
            &first.info.version,
            "the global depends on the order of the records: {:?} vs {:?} among {:?}",
            other,
            first,
            cands
        );
        prop_assert_eq!(other.content, first.content);
    }
    for c in cands {
        prop_assert_ne!(
            c.info.version.compare(&first.info.version),
            VersionOrdering::Greater,
            "global {:?} is superseded by {:?}",
            first,
            c
        );
    }
    Ok(first)
}

/// Every permutation of 0..n (n is at most 4 here).
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

fn run(shorts: Vec<u64>, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let n = shorts.len();
    let mut w = World::new(&shorts);
    for op in ops {
        match op {
            Op::Edit { r, mtime, dir } => w.local_change(r % n, mtime, false, dir),
            Op::Delete { r, mtime } => w.local_change(r % n, mtime, true, false),
            Op::Sync { to, from, rot } => {
                w.sync(to % n, from % n, rot)?;
            }
        }
    }
    // Quiet: everyone talks to everyone until nothing changes.
    let mut rounds = 0;
    loop {
        let mut changed = false;
        for to in 0..n {
            for from in 0..n {
                changed |= w.sync(to, from, to + from)?;
            }
        }
        if !changed {
            break;
        }
        rounds += 1;
        prop_assert!(rounds < 10, "no convergence after {rounds} rounds");
    }
    // On disk: the live content and its version, or nothing (no record or a tombstone:
    // a replica that never had the file records nothing for its deletion).
    let finals: Vec<Option<(&VersionVector, u64)>> = w
        .reps
        .iter()
        .map(|r| {
            r.local
                .as_ref()
                .filter(|l| !l.info.deleted)
                .map(|l| (&l.info.version, l.content))
        })
        .collect();
    for f in &finals {
        prop_assert_eq!(f, &finals[0], "replicas did not converge: {:?}", finals);
    }
    let final_content = finals[0].map(|(_, c)| c);
    for c in &w.created {
        prop_assert!(
            Some(*c) == final_content || w.conflict_copies.contains(c) || w.replaced.contains(c),
            "content {c} was silently dropped (final {final_content:?}, conflict copies {:?}, replaced {:?})",
            w.conflict_copies,
            w.replaced
        );
    }
    Ok(())
}

fn shorts() -> impl Strategy<Value = Vec<u64>> {
    // Distinct short IDs; small values so ties in mtime fall to a real comparison.
    (2usize..=4).prop_flat_map(|n| {
        proptest::collection::btree_set(1u64..1000, n).prop_map(|s| s.into_iter().collect())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_replica_picks_the_same_winner_and_no_edit_is_dropped(
        shorts in shorts(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run(shorts, ops)?;
    }
}

/// The case that made `select_global` depend on the order of the rows: `k` supersedes
/// `j` but has an older mtime than `i`, which loses to `j` on mtime. Seen in the order
/// (k, i, j) the old fold ended on `j`, a version `k` supersedes.
#[test]
fn global_is_order_independent_with_a_superseding_older_mtime() {
    let mk = |short: u64, version: VersionVector, mtime: i64| FileInfo {
        name: "f".into(),
        kind: FileKind::File,
        size: 0,
        mtime_ns: mtime,
        mode: 0o644,
        deleted: false,
        version,
        sequence: 0,
        modified_by: short,
        blocks: Vec::new(),
        symlink_target: None,
    };
    let i = mk(1, VersionVector::new().bump(1), 5);
    let j = mk(2, VersionVector::new().bump(2), 10);
    let k = mk(3, j.version.bump(3), 3);
    let orders: [[&FileInfo; 3]; 3] = [[&i, &j, &k], [&k, &i, &j], [&j, &k, &i]];
    let picked: Vec<VersionVector> = orders
        .iter()
        .map(|o| o[select_global(o.iter().copied()).unwrap()].version.clone())
        .collect();
    // The maximal versions are i and k; i has the later mtime.
    for v in &picked {
        assert_eq!(v, &i.version, "{picked:?}");
    }
}
