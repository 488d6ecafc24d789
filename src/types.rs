//! The leaf of the crate: the words every other module speaks.
//!
//! `DeviceId`, `FileInfo`, `Block`, `VersionVector` and the pure rules that compare
//! versions and pick a winner between concurrent ones. Nothing here does I/O, so the
//! rules can be property-tested in isolation and every device applies them the same way.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use serde::{Deserialize, Serialize};

/// Folder identifiers are short strings chosen by the person (or generated); they are the
/// same on every device that shares the folder.
pub type FolderId = String;

/// Base32 alphabet of RFC 4648, the one device IDs are written in.
const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

/// A device is named by its 32-byte ed25519 public key. People see it as 56 base32
/// characters (52 of key, one Luhn mod-32 check character after each 13) in 8 groups of 7.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub [u8; 32]);

/// Device IDs travel (config, JSON) in their canonical text form.
impl Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a string is not a device ID. The messages are shown to people as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceIdError {
    #[error("a device ID has 56 characters (52 without check characters); this one has {0}")]
    Length(usize),
    #[error("character {0:?} cannot appear in a device ID (only A-Z and 2-7)")]
    BadChar(char),
    #[error("check character {group} does not match: a character in group {group} of the device ID is wrong (mistyped?)")]
    Check { group: usize },
}

impl DeviceId {
    /// The short ID used as the key in version vectors: the first 8 bytes of the key,
    /// big endian. Collisions across one person's devices are astronomically unlikely.
    pub fn short(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_be_bytes(b)
    }

    /// The first seven characters of the canonical form, as used in conflict file names.
    pub fn prefix7(&self) -> String {
        self.to_string()[..7].to_string()
    }
}

/// Luhn mod 32 over base32 characters, exactly as Syncthing computes it.
fn luhn32(s: &[u8]) -> u8 {
    let mut factor = 1u32;
    let mut sum = 0u32;
    for &c in s {
        let v = ALPHABET.iter().position(|&a| a == c).unwrap_or(0) as u32;
        let addend = factor * v;
        factor = if factor == 2 { 1 } else { 2 };
        sum += addend / 32 + addend % 32;
    }
    ALPHABET[((32 - sum % 32) % 32) as usize]
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b32 = BASE32_NOPAD.encode(&self.0); // 52 chars
        let mut with_check = Vec::with_capacity(56);
        for chunk in b32.as_bytes().chunks(13) {
            with_check.extend_from_slice(chunk);
            with_check.push(luhn32(chunk));
        }
        let groups: Vec<&str> = with_check
            .chunks(7)
            .map(|c| std::str::from_utf8(c).expect("base32 is ascii"))
            .collect();
        f.write_str(&groups.join("-"))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", &self.to_string()[..15])
    }
}

impl FromStr for DeviceId {
    type Err = DeviceIdError;

    /// Accepts any case, with or without dashes and spaces. With 56 characters the check
    /// characters are verified; 52 characters (no checks) are accepted as Syncthing does.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut clean = Vec::with_capacity(56);
        for c in s.chars() {
            if c == '-' || c.is_whitespace() {
                continue;
            }
            let u = c.to_ascii_uppercase();
            if !u.is_ascii() || !ALPHABET.contains(&(u as u8)) {
                return Err(DeviceIdError::BadChar(c));
            }
            clean.push(u as u8);
        }
        let key_chars: Vec<u8> = match clean.len() {
            56 => {
                let mut out = Vec::with_capacity(52);
                for (i, chunk) in clean.chunks(14).enumerate() {
                    let (data, check) = chunk.split_at(13);
                    if luhn32(data) != check[0] {
                        return Err(DeviceIdError::Check { group: i + 1 });
                    }
                    out.extend_from_slice(data);
                }
                out
            }
            52 => clean,
            n => return Err(DeviceIdError::Length(n)),
        };
        let bytes = BASE32_NOPAD
            .decode(&key_chars)
            .map_err(|_| DeviceIdError::Length(key_chars.len()))?;
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|v: Vec<u8>| DeviceIdError::Length(v.len()))?;
        Ok(DeviceId(arr))
    }
}

/// What a name in a folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
}

impl FileKind {
    pub fn as_i64(self) -> i64 {
        match self {
            FileKind::File => 0,
            FileKind::Dir => 1,
            FileKind::Symlink => 2,
        }
    }
    pub fn from_i64(v: i64) -> Option<Self> {
        match v {
            0 => Some(FileKind::File),
            1 => Some(FileKind::Dir),
            2 => Some(FileKind::Symlink),
            _ => None,
        }
    }
}

/// One content-defined chunk of a file: where it sits and what it hashes to (BLAKE3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Block {
    pub offset: u64,
    pub size: u32,
    pub hash: [u8; 32],
}

/// One entry of a version vector: a device (by short ID) and how many changes it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter {
    pub id: u64,
    pub value: u64,
}

/// How two versions relate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionOrdering {
    Equal,
    /// self is strictly newer
    Greater,
    /// self is strictly older
    Lesser,
    /// neither contains the other: a conflict
    Concurrent,
}

/// A version vector, kept sorted by device short ID with no zero counters, so that equal
/// histories have equal encodings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionVector(pub Vec<Counter>);

impl VersionVector {
    pub fn new() -> Self {
        Self(Vec::new())
    }

    pub fn get(&self, id: u64) -> u64 {
        self.0
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.value)
            .unwrap_or(0)
    }

    /// Records a local change by device `id`: its counter becomes larger than every
    /// counter in the vector, so the result is newer than anything this device has seen.
    pub fn bump(&self, id: u64) -> Self {
        self.bump_at_least(id, 0)
    }

    /// As [`bump`](Self::bump), with the new counter also at least `floor`.
    ///
    /// A device must never hand out the same counter twice for a name: a version it
    /// announced earlier may live on inside other devices' newer versions, and a second
    /// version with that counter would look "already seen" to them and be dropped without
    /// a conflict. `bump` alone cannot promise that: after losing a conflict the device
    /// adopts the winner's vector, which may lack its own earlier counter. The index passes
    /// a floor that grows with every counter the device issues (the folder's sequence).
    pub fn bump_at_least(&self, id: u64, floor: u64) -> Self {
        let max = self.0.iter().map(|c| c.value).max().unwrap_or(0);
        let value = max.saturating_add(1).max(floor);
        let mut out = self.clone();
        match out.0.iter_mut().find(|c| c.id == id) {
            Some(c) => c.value = value,
            None => {
                out.0.push(Counter { id, value });
                out.0.sort_by_key(|c| c.id);
            }
        }
        out
    }

    /// The element-wise maximum: a version that has seen both histories.
    pub fn merge(&self, other: &Self) -> Self {
        let mut out = self.clone();
        for c in &other.0 {
            match out.0.iter_mut().find(|x| x.id == c.id) {
                Some(x) => x.value = x.value.max(c.value),
                None => out.0.push(*c),
            }
        }
        out.0.sort_by_key(|c| c.id);
        out
    }

    pub fn compare(&self, other: &Self) -> VersionOrdering {
        let mut greater = false;
        let mut lesser = false;
        let mut ids: Vec<u64> = self.0.iter().chain(other.0.iter()).map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            match self.get(id).cmp(&other.get(id)) {
                Ordering::Greater => greater = true,
                Ordering::Less => lesser = true,
                Ordering::Equal => {}
            }
        }
        match (greater, lesser) {
            (false, false) => VersionOrdering::Equal,
            (true, false) => VersionOrdering::Greater,
            (false, true) => VersionOrdering::Lesser,
            (true, true) => VersionOrdering::Concurrent,
        }
    }

    /// Compact binary encoding for the index: 16 bytes per counter, big endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 16);
        for c in &self.0 {
            out.extend_from_slice(&c.id.to_be_bytes());
            out.extend_from_slice(&c.value.to_be_bytes());
        }
        out
    }

    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() % 16 != 0 {
            return None;
        }
        let v = b
            .chunks(16)
            .map(|c| Counter {
                id: u64::from_be_bytes(c[..8].try_into().unwrap_or_default()),
                value: u64::from_be_bytes(c[8..].try_into().unwrap_or_default()),
            })
            .collect();
        Some(Self(v))
    }
}

/// Everything known about one name in a folder, as stored in the index and sent to peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Relative to the folder root, `/`-separated, Unicode NFC.
    pub name: String,
    pub kind: FileKind,
    /// Bytes; 0 for directories, symlinks and deleted entries.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Permission bits (the low 12 bits of st_mode).
    pub mode: u32,
    pub deleted: bool,
    pub version: VersionVector,
    /// Position in the announcing device's folder index; strictly increasing per change.
    pub sequence: i64,
    /// Short ID of the device that made this version.
    pub modified_by: u64,
    pub blocks: Vec<Block>,
    pub symlink_target: Option<String>,
}

impl FileInfo {
    /// Same kind, size and block hashes, neither deleted: the same bytes (mtime, mode and
    /// versions aside).
    pub fn same_bytes(&self, other: &FileInfo) -> bool {
        !self.deleted
            && !other.deleted
            && self.kind == other.kind
            && self.size == other.size
            && self.same_blocks(other)
    }

    /// The same block hashes, in the same order.
    fn same_blocks(&self, other: &FileInfo) -> bool {
        self.blocks.len() == other.blocks.len()
            && self
                .blocks
                .iter()
                .zip(&other.blocks)
                .all(|(a, b)| a.hash == b.hash)
    }

    /// True when `self` wins over a concurrent `other` by the rule every device applies:
    /// the later mtime wins, ties go to the larger modifying device.
    pub fn wins_conflict_over(&self, other: &FileInfo) -> bool {
        // A real edit beats a deletion; Syncthing users expect edits to survive deletes.
        if self.deleted != other.deleted {
            return !self.deleted;
        }
        // A directory beats a file or link: the directory may hold files that are live
        // on their own, and a file cannot stand where they need a directory. The file's
        // content is kept as a conflict copy, the directory's contents stay where they are.
        let (self_dir, other_dir) = (self.kind == FileKind::Dir, other.kind == FileKind::Dir);
        if !self.deleted && self_dir != other_dir {
            return self_dir;
        }
        match self.mtime_ns.cmp(&other.mtime_ns) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => self.modified_by > other.modified_by,
        }
    }

    /// Same kind, size, content and permissions: the files are interchangeable on disk.
    pub fn same_content(&self, other: &FileInfo) -> bool {
        self.kind == other.kind
            && self.deleted == other.deleted
            && self.size == other.size
            && self.mode == other.mode
            && self.symlink_target == other.symlink_target
            && self.same_blocks(other)
    }
}

/// What the scanner knows about a name as it was last recorded locally: enough to tell
/// "unchanged" from a stat alone, without reading the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalMeta {
    pub kind: FileKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub inode: u64,
    pub deleted: bool,
}

/// What the index recorded locally for a folder (or part of it), as the scanner reads it:
/// [`LocalMeta`] by name, sorted by name (byte order, as SQLite's), every name in one
/// buffer. About 60 bytes per name where a `HashMap<String, LocalMeta>` took about 190,
/// which is what a full scan of a million-file folder holds.
#[derive(Debug, Clone, Default)]
pub struct Known {
    names: String,
    entries: Vec<KnownEntry>,
}

#[derive(Debug, Clone, Copy)]
struct KnownEntry {
    start: usize,
    len: u32,
    meta: LocalMeta,
}

impl Known {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a name. Names may come in any order; [`Known::finish`] sorts them.
    pub fn push(&mut self, name: &str, meta: LocalMeta) {
        let start = self.names.len();
        self.names.push_str(name);
        self.entries.push(KnownEntry {
            start,
            len: u32::try_from(name.len()).unwrap_or(u32::MAX),
            meta,
        });
    }

    /// Sorts by name (a no-op when pushed in order) and keeps the last entry of a name
    /// pushed twice.
    pub fn finish(mut self) -> Self {
        let names = &self.names;
        let key = |e: &KnownEntry| &names[e.start..e.start + e.len as usize];
        if !self.entries.windows(2).all(|w| key(&w[0]) < key(&w[1])) {
            // Stable: of equal names, the last pushed stays last.
            self.entries.sort_by(|a, b| key(a).cmp(key(b)));
            let mut out: Vec<KnownEntry> = Vec::with_capacity(self.entries.len());
            for e in self.entries.drain(..) {
                match out.last_mut() {
                    Some(l) if key(l) == key(&e) => *l = e,
                    _ => out.push(e),
                }
            }
            self.entries = out;
        }
        self
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name at position `i` (`i < len()`).
    pub fn name(&self, i: usize) -> &str {
        let e = &self.entries[i];
        &self.names[e.start..e.start + e.len as usize]
    }

    /// The meta at position `i` (`i < len()`).
    pub fn meta(&self, i: usize) -> &LocalMeta {
        &self.entries[i].meta
    }

    /// The position of `name`, if recorded.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.entries
            .binary_search_by(|e| self.names[e.start..e.start + e.len as usize].cmp(name))
            .ok()
    }

    /// Like [`Known::position`], trying `hint` first: a walk in name order finds most
    /// names right after the previous one, without a search.
    pub fn position_near(&self, name: &str, hint: usize) -> Option<usize> {
        if hint < self.len() && self.name(hint) == name {
            return Some(hint);
        }
        self.position(name)
    }

    pub fn get(&self, name: &str) -> Option<&LocalMeta> {
        self.position(name).map(|i| self.meta(i))
    }

    /// Every name and its meta, in name order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&str, &LocalMeta)> + '_ {
        (0..self.len()).map(move |i| (self.name(i), self.meta(i)))
    }
}

impl<S: AsRef<str>> FromIterator<(S, LocalMeta)> for Known {
    fn from_iter<I: IntoIterator<Item = (S, LocalMeta)>>(iter: I) -> Self {
        let mut k = Known::new();
        for (name, meta) in iter {
            k.push(name.as_ref(), meta);
        }
        k.finish()
    }
}

/// A change the scanner found on disk, before the index gives it a version and sequence.
/// `file.version` and `file.sequence` are ignored by the index; `file.deleted` marks a
/// name that is gone from disk (a tombstone will be recorded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalChange {
    pub file: FileInfo,
    /// Local inode number (0 when unknown): part of the "unchanged?" check, never sent.
    pub inode: u64,
}

/// Picks the global version among candidate records for one name: the one newer than or
/// equal to all others; among concurrent ones, the conflict winner. Returns its index.
///
/// The answer depends only on the set of candidates, never on their order, so every
/// device that knows the same records picks the same global. Only versions that no other
/// candidate supersedes can win: folding pairwise ("keep the newer or the conflict
/// winner") is not enough, because a version can beat an older one on mtime and still be
/// concurrent with that one's successor. Among equal versions the first is kept (the index
/// lists the local record first).
pub fn select_global<'a, I>(candidates: I) -> Option<usize>
where
    I: IntoIterator<Item = &'a FileInfo>,
{
    let list: Vec<&FileInfo> = candidates.into_iter().collect();
    let superseded = |f: &FileInfo| {
        list.iter()
            .any(|o| o.version.compare(&f.version) == VersionOrdering::Greater)
    };
    let mut best: Option<usize> = None;
    for (i, f) in list.iter().enumerate() {
        if superseded(f) {
            continue;
        }
        best = Some(match best {
            None => i,
            Some(b) if f.version.compare(&list[b].version) == VersionOrdering::Equal => b,
            Some(b) => {
                let (fw, bw) = (f.wins_conflict_over(list[b]), list[b].wins_conflict_over(f));
                // Neither wins (same liveness, mtime and device): settle it by the versions
                // themselves, so the choice is still free of the order.
                if fw || (!bw && f.version.to_bytes() > list[b].version.to_bytes()) {
                    i
                } else {
                    b
                }
            }
        });
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn meta(size: u64) -> LocalMeta {
        LocalMeta {
            kind: FileKind::File,
            size,
            mtime_ns: 1,
            mode: 0o644,
            inode: 0,
            deleted: false,
        }
    }

    #[test]
    fn known_sorts_by_byte_order_and_keeps_the_last_of_a_name() {
        // Walk order ("a", "a/x", "a-c") is not byte order ("a", "a-c", "a/x").
        let k: Known = [
            ("a", meta(1)),
            ("a/x", meta(2)),
            ("a-c", meta(3)),
            ("a/x", meta(4)),
        ]
        .into_iter()
        .collect();
        let names: Vec<&str> = k.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "a-c", "a/x"]);
        assert_eq!(k.get("a/x").unwrap().size, 4);
        assert_eq!(k.get("a-c").unwrap().size, 3);
        assert!(k.get("a/").is_none() && k.get("b").is_none());
        assert_eq!(k.position_near("a-c", 1), Some(1));
        assert_eq!(k.position_near("a-c", 2), Some(1));
        assert_eq!(k.position_near("a", 99), Some(0));
        assert!(Known::new().is_empty() && Known::new().position_near("a", 0).is_none());
    }

    proptest! {
        #[test]
        fn known_answers_as_a_map(names in proptest::collection::vec("[a-c/.-]{0,4}", 0..40)) {
            let mut map = std::collections::HashMap::new();
            let mut k = Known::new();
            for (i, n) in names.iter().enumerate() {
                map.insert(n.clone(), meta(i as u64));
                k.push(n, meta(i as u64));
            }
            let k = k.finish();
            prop_assert_eq!(k.len(), map.len());
            for (n, m) in &map {
                prop_assert_eq!(k.get(n), Some(m));
            }
            let order: Vec<&str> = k.iter().map(|(n, _)| n).collect();
            let mut sorted = order.clone();
            sorted.sort();
            prop_assert_eq!(order, sorted);
        }
    }

    const SAMPLE: &str = "P56IOI7-MZJNU2Y-IQGDREY-DM2MGTI-MGL3BXN-PQ6W5BM-TBBZ4TJ-XZWICQ2";

    #[test]
    fn syncthing_sample_id_parses_and_prints_back() {
        let id: DeviceId = SAMPLE.parse().expect("valid sample");
        assert_eq!(id.to_string(), SAMPLE);
        let lower = SAMPLE.to_lowercase().replace('-', " ");
        assert_eq!(lower.parse::<DeviceId>().unwrap(), id);
        let nodash = SAMPLE.replace('-', "");
        assert_eq!(nodash.parse::<DeviceId>().unwrap(), id);
    }

    #[test]
    fn every_single_character_substitution_is_caught() {
        let chars: Vec<char> = SAMPLE.chars().collect();
        for (i, &c) in chars.iter().enumerate() {
            if c == '-' {
                continue;
            }
            for &a in ALPHABET.iter() {
                let a = a as char;
                if a == c {
                    continue;
                }
                let mut typo = chars.clone();
                typo[i] = a;
                let s: String = typo.into_iter().collect();
                assert!(
                    s.parse::<DeviceId>().is_err(),
                    "substitution {c}->{a} at {i} not caught: {s}"
                );
            }
        }
    }

    #[test]
    fn bad_inputs_say_why() {
        assert!(matches!(
            "ABC".parse::<DeviceId>(),
            Err(DeviceIdError::Length(3))
        ));
        assert!(matches!(
            SAMPLE.replace('P', "1").parse::<DeviceId>(),
            Err(DeviceIdError::BadChar('1'))
        ));
    }

    proptest! {
        #[test]
        fn device_id_round_trips(bytes in proptest::array::uniform32(any::<u8>())) {
            let id = DeviceId(bytes);
            let s = id.to_string();
            prop_assert_eq!(s.len(), 63);
            prop_assert_eq!(s.split('-').count(), 8);
            prop_assert_eq!(s.parse::<DeviceId>().unwrap(), id);
            prop_assert_eq!(s.to_lowercase().parse::<DeviceId>().unwrap(), id);
        }

        #[test]
        fn version_bytes_round_trip(c in proptest::collection::vec((any::<u64>(), 1u64..1000), 0..5)) {
            let mut v = VersionVector::new();
            for (id, n) in c { for _ in 0..(n % 3) { v = v.bump(id); } }
            prop_assert_eq!(VersionVector::from_bytes(&v.to_bytes()).unwrap(), v);
        }
    }

    #[test]
    fn a_directory_wins_a_conflict_over_a_file_whatever_the_times() {
        let f = |kind, mtime_ns, modified_by| FileInfo {
            name: "x".into(),
            kind,
            size: 0,
            mtime_ns,
            mode: 0,
            deleted: false,
            version: VersionVector::new().bump(modified_by),
            sequence: 1,
            modified_by,
            blocks: vec![],
            symlink_target: None,
        };
        let dir = f(FileKind::Dir, 1, 1);
        let file = f(FileKind::File, 9, 2);
        let link = f(FileKind::Symlink, 9, 3);
        assert!(dir.wins_conflict_over(&file) && !file.wins_conflict_over(&dir));
        assert!(dir.wins_conflict_over(&link) && !link.wins_conflict_over(&dir));
        // Between files and links the later mtime still decides.
        assert!(file.wins_conflict_over(&f(FileKind::Symlink, 8, 3)));
        // And a deletion of a directory still loses to a live file.
        let mut gone = f(FileKind::Dir, 9, 1);
        gone.deleted = true;
        assert!(f(FileKind::File, 1, 2).wins_conflict_over(&gone));
    }

    #[test]
    fn bump_makes_newer_and_concurrent_edits_are_detected() {
        let base = VersionVector::new().bump(1);
        let a = base.bump(1);
        let b = base.bump(2);
        assert_eq!(a.compare(&base), VersionOrdering::Greater);
        assert_eq!(base.compare(&a), VersionOrdering::Lesser);
        assert_eq!(a.compare(&b), VersionOrdering::Concurrent);
        assert_eq!(a.merge(&b).compare(&a), VersionOrdering::Greater);
        assert_eq!(a.compare(&a.clone()), VersionOrdering::Equal);
    }
}
