//! The index: Ferry's SQLite database of file records, as an actor.
//!
//! It stores the local device's records of every folder (what the scanner found, with
//! versions and sequence numbers), every remote device's announced records, a lookup from
//! block hash to local file data, and per name the *global* version (the one every device
//! converges to) with a `need` flag saying whether this device must act on it. The schema
//! lives in `migrations/` and is commented there.
//!
//! What it is not: it knows nothing of the wire, the disk or peers' connections. It does
//! not decide what to do about a need; the puller does, and reports back with
//! [`Index::commit_pulled`].
//!
//! How it is used: [`Index::open`] applies the migrations and moves the one
//! `rusqlite::Connection` into a dedicated thread ("ferry-index"). [`Index`] is a cheap
//! `Clone` handle: every method sends a command over a bounded channel and awaits the
//! reply, so all database work is serialised in one place and every command that writes
//! does so in one transaction. Blocking callers use `futures::executor::block_on`. Once
//! the actor has stopped (after [`Index::close`]) every method returns
//! [`Error::Stopped`].
//!
//! Global and need are maintained incrementally: whenever any device's record of a name
//! changes, that name's global is recomputed from that name's rows alone with
//! [`select_global`]. Nothing ever loads a folder's whole need list.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::types::Type;
use rusqlite::{params, Connection, OptionalExtension, Row};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};
use crate::types::{
    select_global, Block, Counter, DeviceId, FileInfo, FileKind, FolderId, Known, LocalChange,
    LocalMeta, VersionOrdering, VersionVector,
};

/// The schema migrations, applied in order; `PRAGMA user_version` is how many have been
/// applied. Append only: an applied migration is never edited.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_folder_counts.sql"),
    include_str!("../migrations/0003_ignore_delete.sql"),
    include_str!("../migrations/0004_ignore_patterns.sql"),
    include_str!("../migrations/0005_device_counts.sql"),
];

/// Answers "does this device ignore `name`?" (`is_dir` tells whether it is a directory)
/// for one folder. The rules are matched outside the index (`crate::ignore`); the index
/// only asks.
pub type IgnoreRule = Arc<dyn Fn(&str, bool) -> bool + Send + Sync>;

/// The `devices.idx` reserved for this device.
const LOCAL: i64 = 0;

/// Commands waiting for the actor. Small: a caller that outruns the database waits
/// (back-pressure) instead of queueing unbounded work.
const CHANNEL_CAPACITY: usize = 64;

/// Encoded size of one block in `files.blocks`: offset u64, size u32, BLAKE3 hash.
const BLOCK_RECORD: usize = 8 + 4 + 32;

/// `find_block` answers at most this many places: the puller needs one that still
/// matches, not every copy of a common block (e.g. a block of zeros).
const MAX_BLOCK_LOCATIONS: usize = 64;

/// Counters above this are not followed by the folder's sequence (see
/// `commit_local_changes`): no real history gets there, and the sequence must not run
/// out of room because a peer announced a huge counter.
const MAX_FOLLOWED_COUNTER: u64 = 1 << 60;

/// Names handled per round when dropping a device's records, to bound memory.
const DROP_BATCH: i64 = 1000;

/// The columns of a full record, in the order [`row_to_file`] reads them.
/// Local rows (`files f`, folder ?1) that are this device's (?2) own, unreverted edits:
/// an empty version marks a reverted one, and a deletion of a name no other device has
/// is no edit to undo.
macro_rules! local_edits {
    () => {
        "f.folder = ?1 AND f.device = 0 AND f.modified_by = ?2 AND length(f.version) > 0 \
         AND (f.deleted = 0 OR EXISTS (SELECT 1 FROM files r \
           WHERE r.folder = f.folder AND r.name = f.name AND r.device != 0))"
    };
}

macro_rules! file_cols {
    () => {
        "name, kind, size, mtime_ns, mode, deleted, version, sequence, modified_by, \
         symlink_target, blocks, inode"
    };
}

/// A folder's local index identity and position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderMeta {
    /// Random, non-zero; changes only when the database is rebuilt.
    pub index_id: u64,
    /// Highest sequence given to a local record of the folder (0 = none yet).
    pub max_sequence: i64,
}

/// Totals for status displays. "Files" counts every non-deleted name (files, directories
/// and symlinks); bytes are file sizes.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct FolderCounts {
    pub local_files: u64,
    pub local_bytes: u64,
    pub global_files: u64,
    pub global_bytes: u64,
    pub need_files: u64,
    pub need_bytes: u64,
}

/// One name this device needs, with what the puller needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedItem {
    /// The global record: what the name must become (possibly a tombstone).
    pub global: FileInfo,
    /// The local record, if any: what should be on disk now.
    pub local: Option<FileInfo>,
    /// Remote devices announcing exactly the global version: where blocks can come from.
    pub devices: Vec<DeviceId>,
}

impl NeedItem {
    /// This item's place in the need order, to continue a need list after it.
    pub fn cursor(&self) -> NeedCursor {
        let (class, key) = need_order(&self.global.name, &self.global);
        NeedCursor {
            class,
            key,
            name: self.global.name.clone(),
        }
    }
}

/// A position in the need order (pull class, key within the class, name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeedCursor {
    class: i64,
    key: i64,
    name: String,
}

/// Where a block with a given hash sits in a local file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockLocation {
    pub folder: FolderId,
    pub name: String,
    pub offset: u64,
    pub size: u32,
}

/// What the actor thread owns.
struct State {
    conn: Connection,
}

type Job = Box<dyn FnOnce(&mut State) + Send>;

enum Command {
    Run(Job),
    /// Checkpoint the WAL, close the connection, then reply and stop.
    Close(oneshot::Sender<Result<()>>),
}

/// A handle on the index actor. Cloning is cheap; all clones talk to the same thread.
#[derive(Clone)]
pub struct Index {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("stopped", &self.tx.is_closed())
            .finish()
    }
}

impl Index {
    /// Opens (creating if needed) the database at `path`, brings its schema up to date
    /// and starts the actor thread. Refuses a database written by a newer Ferry.
    ///
    /// The database belongs to this process until it exits: SQLite's file locks are taken
    /// once and kept (`locking_mode=EXCLUSIVE`), and the WAL's index lives in the
    /// process's memory instead of a shared `-shm` file. Every transaction then skips
    /// the `fcntl` lock calls and shared-memory barriers of the shared mode: b (10,000
    /// small files) ran about 5 % faster in five alternating pairs (BENCHMARKS.md,
    /// "SQLite's locks"). A second process (a daemon started during an offline `ferry
    /// scan`, or the reverse) waits a few seconds and is then refused.
    pub fn open(path: &Path) -> Result<Index> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        Self::start(conn).map_err(|e| match e {
            Error::Db(rusqlite::Error::SqliteFailure(f, _))
                if f.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                Error::Index(format!(
                    "the index {} is in use by another Ferry process (a running daemon, or \
                     `ferry scan` without one): stop it and try again",
                    path.display()
                ))
            }
            e => e,
        })
    }

    /// A private in-memory database, for tests.
    pub fn open_in_memory() -> Result<Index> {
        Self::start(Connection::open_in_memory()?)
    }

    fn start(mut conn: Connection) -> Result<Index> {
        configure(&conn)?;
        migrate(&mut conn)?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        std::thread::Builder::new()
            .name("ferry-index".into())
            .spawn(move || actor(conn, rx))
            .map_err(|e| Error::Index(format!("cannot start the index thread: {e}")))?;
        Ok(Index { tx })
    }

    /// Runs `f` on the actor thread and returns its result.
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        self.call_state(move |state| f(&mut state.conn)).await
    }

    /// Runs `f` on the actor thread with all of the actor's state.
    async fn call_state<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut State) -> Result<T> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |state| {
            let _ = reply.send(f(state));
        });
        self.tx
            .send(Command::Run(job))
            .await
            .map_err(|_| Error::Stopped)?;
        answer.await.map_err(|_| Error::Stopped)?
    }

    /// Runs `f` inside one transaction on the actor thread: all of it commits or none.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        self.call_state(move |state| {
            let tx = state.conn.transaction()?;
            let out = f(&tx)?;
            flush_counts(&tx)?;
            tx.commit()?;
            Ok(out)
        })
        .await
    }

    /// The folder's meta, creating the folder with a fresh random index ID if missing.
    pub async fn ensure_folder(&self, folder: &str) -> Result<FolderMeta> {
        let folder = folder.to_string();
        self.write(move |c| Ok(ensure_folder_row(c, &folder)?.1))
            .await
    }

    /// Sets whether the folder ignores deletions from other devices (config.toml's
    /// `ignore_delete`). A deletion is not needed where deletions are ignored, so on a
    /// change every deleted global of the folder gets its need recomputed. Creates the
    /// folder if missing.
    pub async fn set_ignore_delete(&self, folder: &str, on: bool) -> Result<()> {
        let folder = folder.to_string();
        self.write(move |c| {
            let (fidx, _) = ensure_folder_row(c, &folder)?;
            let changed = c
                .prepare_cached(
                    "UPDATE folders SET ignore_delete = ?2 WHERE idx = ?1 AND ignore_delete <> ?2",
                )?
                .execute(params![fidx, on])?;
            if changed > 0 {
                recompute_selected(
                    c,
                    fidx,
                    "SELECT name FROM global WHERE folder = ?1 AND deleted = 1",
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Hands the index the folder's ignore rules: a name they match is not needed here,
    /// so it is neither pulled nor deleted, and does not keep the folder below 100%.
    ///
    /// `patterns` is the text the rules were built from (`""` and `None`: no rules). When
    /// it differs from the text the folder's need flags were computed with, the need of
    /// every name this device does not hold at its global version is recomputed (a name
    /// whose global row is the local one is not needed, ignored or not, so a folder in
    /// sync has little to redo). When it is the same but these are the first rules this
    /// index has been given for the folder since it opened, only the needed names are:
    /// records that arrived before then were computed as if nothing were ignored, which
    /// can only have made a name needed wrongly, never unneeded. Creates the folder if
    /// missing.
    pub async fn set_ignores(
        &self,
        folder: &str,
        patterns: String,
        rule: Option<IgnoreRule>,
    ) -> Result<()> {
        let folder = folder.to_string();
        self.write(move |c| {
            let (fidx, _) = ensure_folder_row(c, &folder)?;
            let stored: String = c
                .prepare_cached("SELECT ignore_patterns FROM folders WHERE idx = ?1")?
                .query_row(params![fidx], |r| r.get(0))?;
            let first = IGNORE_RULES.with(|m| {
                let mut m = m.borrow_mut();
                let first = !m.contains_key(&fidx);
                m.insert(fidx, rule);
                first
            });
            if stored != patterns {
                c.prepare_cached("UPDATE folders SET ignore_patterns = ?2 WHERE idx = ?1")?
                    .execute(params![fidx, patterns])?;
                recompute_selected(
                    c,
                    fidx,
                    "SELECT name FROM global WHERE folder = ?1 AND (need = 1 OR device <> 0)",
                )?;
            } else if first && !patterns.is_empty() {
                recompute_selected(
                    c,
                    fidx,
                    "SELECT name FROM global WHERE folder = ?1 AND need = 1",
                )?;
            }
            Ok(())
        })
        .await
    }

    /// The folder's meta, or `None` if the index has no such folder.
    pub async fn folder_meta(&self, folder: &str) -> Result<Option<FolderMeta>> {
        let folder = folder.to_string();
        self.call(move |c| Ok(folder_row(c, &folder)?.map(|(_, m)| m)))
            .await
    }

    /// Drops the folder and every record of it (local, remote, global, blocks).
    pub async fn remove_folder(&self, folder: &str) -> Result<()> {
        let folder = folder.to_string();
        self.write(move |c| {
            c.execute("DELETE FROM folders WHERE id = ?1", params![folder])?;
            Ok(())
        })
        .await
    }

    /// What the scanner needs to tell unchanged names from a stat alone: every local
    /// record of the folder (tombstones included), or, for each subdirectory such as
    /// `"a/b"` in `prefixes`, that name and the names below it.
    pub async fn local_snapshot(&self, folder: &str, prefixes: Vec<String>) -> Result<Known> {
        let folder = folder.to_string();
        self.call(move |c| {
            let mut out = Known::new();
            let Some((fidx, _)) = folder_row(c, &folder)? else {
                return Ok(out);
            };
            let prefixes: Vec<String> = prefixes
                .iter()
                .map(|p| p.trim_matches('/'))
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect();
            let mut push = |r: &Row<'_>| -> rusqlite::Result<()> {
                let meta = LocalMeta {
                    kind: kind_from(r, 1)?,
                    size: r.get::<_, i64>(2)? as u64,
                    mtime_ns: r.get(3)?,
                    mode: r.get::<_, i64>(4)? as u32,
                    inode: r.get::<_, i64>(5)? as u64,
                    deleted: r.get(6)?,
                };
                out.push(r.get_ref(0)?.as_str()?, meta);
                Ok(())
            };
            if prefixes.is_empty() {
                // In name order, as the (folder, name, device) index serves it: no sort.
                let mut st = c.prepare_cached(
                    "SELECT name, kind, size, mtime_ns, mode, inode, deleted FROM files \
                     WHERE folder = ?1 AND device = 0 ORDER BY name",
                )?;
                let mut rows = st.query(params![fidx])?;
                while let Some(r) = rows.next()? {
                    push(r)?;
                }
            }
            for p in &prefixes {
                // "a/b" and the names below it all sort in ["a/b", "a/b0") ('0'
                // follows '/'), a range the (folder, name, device) index serves; the
                // OR drops siblings such as "a/b!" that sort inside it.
                let lower = format!("{p}/");
                let upper = format!("{p}0");
                let mut st = c.prepare_cached(
                    "SELECT name, kind, size, mtime_ns, mode, inode, deleted FROM files \
                     WHERE folder = ?1 AND device = 0 \
                       AND name >= ?2 AND name < ?4 AND (name = ?2 OR name >= ?3) \
                     ORDER BY name",
                )?;
                let mut rows = st.query(params![fidx, p, lower, upper])?;
                while let Some(r) = rows.next()? {
                    push(r)?;
                }
            }
            Ok(out.finish())
        })
        .await
    }

    /// The local record of `name`, tombstones included.
    pub async fn get_local(&self, folder: &str, name: &str) -> Result<Option<FileInfo>> {
        Ok(self
            .get_local_with_inode(folder, name)
            .await?
            .map(|(f, _)| f))
    }

    /// The local record of `name` with the inode the scanner last saw for it.
    pub async fn get_local_with_inode(
        &self,
        folder: &str,
        name: &str,
    ) -> Result<Option<(FileInfo, u64)>> {
        let (folder, name) = (folder.to_string(), name.to_string());
        self.call(move |c| {
            let Some((fidx, _)) = folder_row(c, &folder)? else {
                return Ok(None);
            };
            Ok(get_row(c, fidx, &name, LOCAL)?)
        })
        .await
    }

    /// [`Index::get_local_with_inode`] for many names in one call (the puller asks for a
    /// whole round at once): the names that have a local record, with it and its inode.
    pub async fn get_locals_with_inode(
        &self,
        folder: &str,
        names: Vec<String>,
    ) -> Result<HashMap<String, (FileInfo, u64)>> {
        let folder = folder.to_string();
        self.call(move |c| {
            let Some((fidx, _)) = folder_row(c, &folder)? else {
                return Ok(HashMap::new());
            };
            let mut out = HashMap::new();
            for name in names {
                if let Some(row) = get_row(c, fidx, &name, LOCAL)? {
                    out.insert(name, row);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Which of `hashes` some local file (in any folder) has: the puller asks
    /// [`Index::find_block`] only for these, not once per block of new content.
    pub async fn known_blocks(&self, hashes: Vec<[u8; 32]>) -> Result<HashSet<[u8; 32]>> {
        self.call(move |c| {
            let mut stmt =
                c.prepare_cached("SELECT 1 FROM blocks WHERE hash_key = ?1 AND hash = ?2 LIMIT 1")?;
            let mut out = HashSet::new();
            for h in hashes {
                if stmt.exists(params![hash_key(&h), &h[..]])? {
                    out.insert(h);
                }
            }
            Ok(out)
        })
        .await
    }

    /// Records what the scanner found. For each change: version = the existing local
    /// version (or none) bumped for `local_short`, sequence = the folder's next one,
    /// modified_by = `local_short`. Skipped: changes identical to the record (same
    /// content, mtime, mode and deleted flag; a new inode is stored silently), and
    /// deletions of names with no local record or already deleted. A deletion becomes a
    /// tombstone keeping the recorded kind and mode. Returns the committed records in
    /// sequence order, to announce to peers. Creates the folder if missing.
    pub async fn commit_local_changes(
        &self,
        folder: &str,
        local_short: u64,
        changes: Vec<LocalChange>,
    ) -> Result<Vec<FileInfo>> {
        let folder = folder.to_string();
        self.write(move |c| {
            let (fidx, meta) = ensure_folder_row(c, &folder)?;
            let mut seq = meta.max_sequence;
            let mut out = Vec::new();
            for change in changes {
                let mut f = change.file;
                let existing = get_row_with_id(c, fidx, &f.name, LOCAL)?;
                // What the row written below replaces, for `upsert_local_row_known`.
                let replaced = existing.as_ref().map(|(old, _, id)| {
                    (*id, (old.deleted, old.kind.as_i64(), clamp_i64(old.size)))
                });
                let mut inode = change.inode;
                let old_version = match existing {
                    None if f.deleted => continue,
                    None => VersionVector::new(),
                    Some((old, _, _)) if f.deleted && old.deleted => continue,
                    Some((old, old_inode, id)) if !f.deleted && is_unchanged(&old, &f) => {
                        if old_inode != change.inode {
                            c.prepare_cached("UPDATE files SET inode = ?2 WHERE id = ?1")?
                                .execute(params![id, change.inode as i64])?;
                        }
                        continue;
                    }
                    Some((old, _, _)) => {
                        if f.deleted {
                            // The scanner saw only an absence: keep what we knew.
                            f.kind = old.kind;
                            f.mode = old.mode;
                            if f.mtime_ns == 0 {
                                f.mtime_ns = old.mtime_ns;
                            }
                        }
                        old.version
                    }
                };
                if f.deleted {
                    f.size = 0;
                    f.blocks.clear();
                    f.symlink_target = None;
                    inode = 0;
                } else if let Some(g) = remote_global_if_same(c, fidx, &f, &old_version)? {
                    // This file is exactly a version another device made (a pull that was
                    // cut off, e.g. by kill -9, after the rename but before it was recorded
                    // here): it is that version, not a new edit of this device, which
                    // would conflict with the original and come back as a conflict copy.
                    seq += 1;
                    f.version = g.version;
                    f.modified_by = g.modified_by;
                    f.sequence = seq;
                    upsert_local_row_known(c, fidx, &f, inode, replaced)?;
                    recompute_global(c, fidx, &f.name)?;
                    out.push(f);
                    continue;
                }
                // The counter is at least the record's sequence, and the sequence follows
                // the counter: every counter this device issues is larger than the last,
                // even after adopting a conflict winner that lacks its earlier ones (see
                // `VersionVector::bump_at_least`). A counter past any real history (a
                // peer's garbage) is not followed.
                let next = seq + 1;
                f.version = old_version.bump_at_least(local_short, next as u64);
                let counter = f.version.get(local_short);
                seq = if counter <= MAX_FOLLOWED_COUNTER {
                    next.max(counter as i64)
                } else {
                    next
                };
                f.sequence = seq;
                f.modified_by = local_short;
                upsert_local_row_known(c, fidx, &f, inode, replaced)?;
                recompute_global(c, fidx, &f.name)?;
                out.push(f);
            }
            if seq != meta.max_sequence {
                set_max_sequence(c, fidx, seq)?;
            }
            Ok(out)
        })
        .await
    }

    /// The puller finished `file` (a global record, possibly a tombstone or directory):
    /// store it as the local record with its version unchanged, a new local sequence and
    /// `inode`, update the block lookup and recompute global/need. Refused when the local
    /// record is by now strictly newer than `file` (a local edit raced the pull).
    /// Returns the stored record.
    pub async fn commit_pulled(
        &self,
        folder: &str,
        file: FileInfo,
        inode: u64,
    ) -> Result<FileInfo> {
        let folder = folder.to_string();
        self.write(move |c| {
            let (fidx, meta) = ensure_folder_row(c, &folder)?;
            let f = record_pulled(c, &folder, fidx, meta.max_sequence + 1, file, inode)?;
            set_max_sequence(c, fidx, f.sequence)?;
            Ok(f)
        })
        .await
    }

    /// [`Index::commit_pulled`] for many files in one transaction: the puller finishes
    /// small files far faster than one transaction each allows. Each file gets its own
    /// result (a refused one does not undo the others), in the order given.
    pub async fn commit_pulled_batch(
        &self,
        folder: &str,
        files: Vec<(FileInfo, u64)>,
    ) -> Result<Vec<Result<FileInfo>>> {
        let folder = folder.to_string();
        self.write(move |c| {
            let (fidx, meta) = ensure_folder_row(c, &folder)?;
            let mut next = meta.max_sequence + 1;
            let mut out = Vec::with_capacity(files.len());
            for (file, inode) in files {
                match record_pulled(c, &folder, fidx, next, file, inode) {
                    Ok(f) => {
                        next += 1;
                        out.push(Ok(f));
                    }
                    // Refused (the local record moved on): that file only.
                    Err(e @ Error::Folder { .. }) => out.push(Err(e)),
                    // The database failed: undo the whole batch.
                    Err(e) => return Err(e),
                }
            }
            // Once for the batch, in the same transaction: nothing reads it meanwhile.
            if next - 1 != meta.max_sequence {
                set_max_sequence(c, fidx, next - 1)?;
            }
            Ok(out)
        })
        .await
    }

    /// How many local records of `folder` are this device's own edits (`local_short`)
    /// that differ from what the other devices have: in a receive-only folder, the
    /// "locally changed" items that `revert_local_edits` would undo.
    pub async fn local_edit_count(&self, folder: &str, local_short: u64) -> Result<u64> {
        let folder = folder.to_string();
        self.call(move |c| {
            let Some((fidx, _)) = folder_row(c, &folder)? else {
                return Ok(0);
            };
            let n: i64 = c
                .prepare_cached(concat!(
                    "SELECT COUNT(*) FROM files f WHERE ",
                    local_edits!()
                ))?
                .query_row(params![fidx, local_short as i64], |r| r.get(0))?;
            Ok(n as u64)
        })
        .await
    }

    /// Undoes this device's own edits in a receive-only folder. A name the other devices
    /// also have gets an empty (oldest) local version, so their version becomes global
    /// and the puller restores it — the file on disk still matches the local record, so
    /// it is replaced, not kept as a conflict. Returns the names only this device has
    /// (locally added files): the caller removes those from disk and rescans.
    pub async fn revert_local_edits(&self, folder: &str, local_short: u64) -> Result<Vec<String>> {
        let folder = folder.to_string();
        self.write(move |c| {
            let Some((fidx, _)) = folder_row(c, &folder)? else {
                return Ok(Vec::new());
            };
            let names: Vec<(String, bool)> = c
                .prepare_cached(concat!(
                    "SELECT f.name, EXISTS (SELECT 1 FROM files r WHERE r.folder = f.folder \
                           AND r.name = f.name AND r.device != 0) FROM files f WHERE ",
                    local_edits!()
                ))?
                .query_map(params![fidx, local_short as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            let mut only_here = Vec::new();
            for (name, remote_has) in names {
                if !remote_has {
                    only_here.push(name);
                    continue;
                }
                if let Some((mut f, inode)) = get_row(c, fidx, &name, LOCAL)? {
                    f.version = VersionVector::new();
                    upsert_local_row(c, fidx, &f, inode)?;
                    recompute_global(c, fidx, &name)?;
                }
            }
            Ok(only_here)
        })
        .await
    }

    /// Up to `limit` local records with a sequence above `after_sequence`, in sequence
    /// order: what a peer that has seen up to `after_sequence` is missing.
    pub async fn local_since(
        &self,
        folder: &str,
        after_sequence: i64,
        limit: usize,
    ) -> Result<Vec<FileInfo>> {
        let folder = folder.to_string();
        self.call(move |c| {
            let Some((fidx, _)) = folder_row(c, &folder)? else {
                return Ok(Vec::new());
            };
            let mut st = c.prepare_cached(concat!(
                "SELECT ",
                file_cols!(),
                " FROM files WHERE folder = ?1 AND device = 0 AND sequence > ?2 \
                 ORDER BY sequence LIMIT ?3"
            ))?;
            let rows = st
                .query_map(params![fidx, after_sequence, limit_i64(limit)], |r| {
                    row_to_file(r)
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    /// What we hold of `device`'s index of the folder: its index ID (0 = nothing) and the
    /// highest sequence received.
    pub async fn remote_state(&self, folder: &str, device: DeviceId) -> Result<(u64, i64)> {
        let folder = folder.to_string();
        self.call(move |c| {
            let row = c
                .prepare_cached(
                    "SELECT r.index_id, r.max_sequence FROM remote_indexes r \
                     JOIN folders f ON f.idx = r.folder JOIN devices d ON d.idx = r.device \
                     WHERE f.id = ?1 AND d.device_id = ?2",
                )?
                .query_row(params![folder, &device.0[..]], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)?))
                })
                .optional()?;
            Ok(row.unwrap_or((0, 0)))
        })
        .await
    }

    /// Stores records from `device`'s index of the folder. When `index_id` differs from
    /// the one stored, that device's old records of the folder are dropped first (its
    /// database was rebuilt; it resends everything). Recomputes global/need for every
    /// touched name and remembers the highest sequence. Returns how many names this
    /// device now needs in the folder. Creates the folder if missing.
    pub async fn apply_remote(
        &self,
        folder: &str,
        device: DeviceId,
        index_id: u64,
        records: Vec<FileInfo>,
    ) -> Result<u64> {
        let folder = folder.to_string();
        self.write(move |c| {
            let (fidx, _) = ensure_folder_row(c, &folder)?;
            let dev = device_idx(c, &device, true)?.unwrap_or(LOCAL);
            if dev == LOCAL {
                return Err(Error::Index("cannot register a remote device".into()));
            }
            let stored: Option<(i64, i64)> = c
                .prepare_cached(
                    "SELECT index_id, max_sequence FROM remote_indexes \
                     WHERE folder = ?1 AND device = ?2",
                )?
                .query_row(params![fidx, dev], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            let mut max_seq = match stored {
                Some((id, seq)) if id == index_id as i64 => seq,
                Some(_) => {
                    drop_device_rows(c, fidx, dev)?;
                    0
                }
                None => 0,
            };
            for mut r in records {
                r.version = canonical(&r.version);
                max_seq = max_seq.max(r.sequence);
                // A record older than the one held (a batch that was in flight when the
                // device's sender was replaced, applied after the new sender's first
                // batch) must not take the newer one's place: the device would not send
                // that name again, and its newer version would never be seen here.
                let mut rows = name_rows(c, fidx, &r.name)?;
                let held = rows.iter().find(|row| row.dev == dev);
                if held.is_some_and(|row| row.file.sequence > r.sequence) {
                    continue;
                }
                let (old_id, credit) = held.map_or((None, 0), |row| (Some(row.id), row.credit));
                // The global first, from the rows as they will be: the row is then
                // written once, with its credit.
                put_row(
                    &mut rows,
                    NameRow::written(dev, &r, old_id.unwrap_or(0), credit),
                );
                let credit = recompute_global_from(c, fidx, &r.name, &rows, Some(dev))?;
                write_files_row(c, fidx, dev, &r, 0, credit, old_id)?;
            }
            c.prepare_cached(
                "INSERT INTO remote_indexes (folder, device, index_id, max_sequence) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (folder, device) DO UPDATE \
                 SET index_id = excluded.index_id, max_sequence = excluded.max_sequence",
            )?
            .execute(params![fidx, dev, index_id as i64, max_seq])?;
            Ok(read_counts(c, fidx)?.need_files)
        })
        .await
    }

    /// Drops every record of `device` in every folder (it was unpaired) and recomputes
    /// the globals it took part in.
    pub async fn forget_device(&self, device: DeviceId) -> Result<()> {
        self.write(move |c| {
            let Some(dev) = device_idx(c, &device, false)? else {
                return Ok(());
            };
            let folders: Vec<i64> = c
                .prepare("SELECT idx FROM folders")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for fidx in folders {
                drop_device_rows(c, fidx, dev)?;
            }
            c.execute("DELETE FROM devices WHERE idx = ?1", params![dev])?;
            Ok(())
        })
        .await
    }

    /// Up to `limit` names this device needs, in pull order: directories (shallow first),
    /// then files and symlinks (smallest first), then deletions (deepest first, so a
    /// directory's contents go before it).
    pub async fn need_list(&self, folder: &str, limit: usize) -> Result<Vec<NeedItem>> {
        self.need_list_after(folder, None, limit).await
    }

    /// The need list from just after `after` (see [`NeedItem::cursor`]) on, in the same
    /// order: lets a caller page past items it is skipping (failed, held back) instead
    /// of being handed the same first ones again.
    pub async fn need_list_after(
        &self,
        folder: &str,
        after: Option<NeedCursor>,
        limit: usize,
    ) -> Result<Vec<NeedItem>> {
        self.need_items(folder, after, limit, false).await
    }

    /// The first `limit` directories this device needs, in pull order (shallow first):
    /// the start of the need list, for a pull whose cursor has gone past the directories
    /// while more directory records arrived.
    pub async fn needed_dirs(&self, folder: &str, limit: usize) -> Result<Vec<NeedItem>> {
        self.need_items(folder, None, limit, true).await
    }

    async fn need_items(
        &self,
        folder: &str,
        after: Option<NeedCursor>,
        limit: usize,
        dirs_only: bool,
    ) -> Result<Vec<NeedItem>> {
        let folder = folder.to_string();
        self.call(move |c| {
            let Some((fidx, _)) = folder_row(c, &folder)? else {
                return Ok(Vec::new());
            };
            // Below every real key: classes are 0..=2 and a first page starts at (-1, ..).
            let after = after.unwrap_or(NeedCursor {
                class: -1,
                key: i64::MIN,
                name: String::new(),
            });
            // Directories are class 0 (see `need_order`).
            let last_class: i64 = if dirs_only { 0 } else { i64::MAX };
            let names: Vec<(String, i64)> = c
                .prepare_cached(
                    "SELECT name, device FROM global WHERE folder = ?1 AND need = 1 \
                       AND (need_class, need_key, name) > (?2, ?3, ?4) AND need_class <= ?6 \
                     ORDER BY need_class, need_key, name LIMIT ?5",
                )?
                .query_map(
                    params![
                        fidx,
                        after.class,
                        after.key,
                        after.name,
                        limit_i64(limit),
                        last_class
                    ],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::with_capacity(names.len());
            for (name, dev) in names {
                out.push(need_item(c, fidx, &name, dev).and_then(|item| {
                    item.ok_or_else(|| {
                        Error::Index(format!(
                            "{folder}/{name}: the global record points at a missing row"
                        ))
                    })
                })?);
            }
            Ok(out)
        })
        .await
    }

    /// The global record of `name`, if any device has a record of it.
    pub async fn global_record(&self, folder: &str, name: &str) -> Result<Option<FileInfo>> {
        let (folder, name) = (folder.to_string(), name.to_string());
        self.call(move |c| {
            let Some((fidx, _)) = folder_row(c, &folder)? else {
                return Ok(None);
            };
            let dev: Option<i64> = c
                .prepare_cached("SELECT device FROM global WHERE folder = ?1 AND name = ?2")?
                .query_row(params![fidx, name], |r| r.get(0))
                .optional()?;
            match dev {
                None => Ok(None),
                Some(dev) => Ok(get_row(c, fidx, &name, dev)?.map(|(f, _)| f)),
            }
        })
        .await
    }

    /// Local files (any folder) holding a block with this hash, as recorded at their last
    /// scan or pull; the caller must verify the data it reads. At most 64 places.
    pub async fn find_block(&self, hash: [u8; 32]) -> Result<Vec<BlockLocation>> {
        self.call(move |c| {
            let rows = c
                .prepare_cached(
                    "SELECT fo.id, f.name, b.start, b.size FROM blocks b \
                     JOIN files f ON f.id = b.file JOIN folders fo ON fo.idx = f.folder \
                     WHERE b.hash_key = ?1 AND b.hash = ?2 LIMIT ?3",
                )?
                .query_map(
                    params![hash_key(&hash), &hash[..], MAX_BLOCK_LOCATIONS as i64],
                    |r| {
                        Ok(BlockLocation {
                            folder: r.get(0)?,
                            name: r.get(1)?,
                            offset: r.get::<_, i64>(2)? as u64,
                            size: r.get::<_, i64>(3)? as u32,
                        })
                    },
                )?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows)
        })
        .await
    }

    /// Totals of the folder. Local and global totals count regular files only (as
    /// Syncthing's "files"), never deletions; the need totals count every needed item.
    /// One lookup: every write keeps the totals up to date (`0002_folder_counts.sql`).
    pub async fn counts(&self, folder: &str) -> Result<FolderCounts> {
        let folder = folder.to_string();
        self.call(move |c| {
            let Some((fidx, _)) = folder_row(c, &folder)? else {
                return Ok(FolderCounts::default());
            };
            Ok(read_counts(c, fidx)?)
        })
        .await
    }

    /// How far `device` is from the folder's global state, 0..=100: the share of global
    /// bytes it announces at the global version, every name weighing at least one byte so
    /// empty files and directories count. A global deletion the device has not made yet
    /// weighs one (not done). 100 when there is nothing to have. A lookup of totals that
    /// every write keeps up to date (`0005_device_counts.sql`), at any folder size.
    pub async fn device_completion(&self, folder: &str, device: DeviceId) -> Result<f64> {
        let folder = folder.to_string();
        self.call(move |c| completion(c, &folder, &device)).await
    }

    /// Checkpoints the WAL, closes the database and stops the actor; later calls return
    /// [`Error::Stopped`]. Commands already queued behind it are answered with
    /// `Stopped`. Closing an already stopped index is not an error.
    pub async fn close(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        if self.tx.send(Command::Close(reply)).await.is_err() {
            return Ok(());
        }
        answer.await.unwrap_or(Ok(()))
    }
}

/// The actor: runs commands one at a time until closed or every handle is dropped.
fn actor(conn: Connection, mut rx: mpsc::Receiver<Command>) {
    let mut state = State { conn };
    let mut close_reply = None;
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Command::Run(job) => {
                // A panic must not take the index down with it: the transaction of the
                // failed command rolls back when dropped, its caller sees `Stopped`
                // (its reply channel is dropped) and the next command runs normally.
                if catch_unwind(AssertUnwindSafe(|| job(&mut state))).is_err() {
                    tracing::error!("an index command panicked; its changes were rolled back");
                }
                // A write that failed or panicked leaves the total changes it held: they
                // were rolled back with it, and must not reach the next command.
                discard_counts();
            }
            Command::Close(reply) => {
                close_reply = Some(reply);
                break;
            }
        }
    }
    rx.close();
    drop(rx); // queued commands' callers get `Stopped`
    let result = checkpoint_and_close(state.conn);
    if let Err(e) = &result {
        tracing::warn!("closing the index: {e}");
    }
    if let Some(reply) = close_reply {
        let _ = reply.send(result);
    }
}

/// See [`Index::device_completion`].
fn completion(c: &Connection, folder: &str, device: &DeviceId) -> Result<f64> {
    let Some((fidx, _)) = folder_row(c, folder)? else {
        return Ok(100.0);
    };
    // An unknown device announces nothing: -1 matches no row.
    let dev = device_idx(c, device, false)?.unwrap_or(-1);
    // The totals kept by every write (0005_device_counts.sql); held changes first.
    flush_counts(c)?;
    let weight: i64 = c
        .prepare_cached("SELECT global_weight FROM folder_counts WHERE folder = ?1")?
        .query_row(params![fidx], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let (have, pending_deletes): (i64, i64) = c
        .prepare_cached(
            "SELECT have, pending_deletes FROM device_counts WHERE folder = ?1 AND device = ?2",
        )?
        .query_row(params![fidx, dev], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?
        .unwrap_or((0, 0));
    let (total, done) = (weight + pending_deletes, have);
    if total <= 0 {
        return Ok(100.0);
    }
    Ok((done as f64 * 100.0 / total as f64).clamp(0.0, 100.0))
}

fn checkpoint_and_close(conn: Connection) -> Result<()> {
    // Let SQLite refresh its planner statistics where it thinks they are stale, then
    // fold the WAL back into the database so the next start has nothing to replay.
    conn.execute_batch("PRAGMA optimize")?;
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
    conn.close().map_err(|(_, e)| Error::Db(e))
}

fn configure(conn: &Connection) -> Result<()> {
    // WAL: readers never block the writer, and a commit is one sequential append.
    // synchronous=NORMAL in WAL mode: a power cut may lose the last commits but never
    // corrupts the database; a lost commit is rediscovered by the next scan.
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // 32 MiB of page cache (negative = KiB): the hot indexes of a large folder fit.
    conn.pragma_update(None, "cache_size", -32768)?;
    // Checkpoint every ~40 MiB of WAL instead of 4 MiB: a page rewritten by several
    // batches of a big scan is copied back once. The file is trimmed back to 64 MiB.
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    // Plans do not depend on bound values. Without this the block lookup by hash was
    // re-prepared at nearly every call (bundled SQLite has STAT4, which lets a plan look
    // at bound values): a quarter of the index thread's time in a pull of 10,000 small
    // files (perf, bench/compare scenario b).
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    // Only this process's own backup tools should ever hold a lock; wait, don't fail.
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(())
}

/// Applies the migrations the database has not seen, each in its own transaction
/// together with the `user_version` that records it.
fn migrate(conn: &mut Connection) -> Result<()> {
    let current: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(Error::Index(format!(
            "index.db was written by a newer Ferry (schema {current}, this binary knows {known})"
        )));
    }
    if current < 0 {
        return Err(Error::Index(format!(
            "index.db has an invalid schema version {current}"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
        tracing::debug!("index schema migrated to version {}", i + 1);
    }
    Ok(())
}

fn folder_row(c: &Connection, folder: &str) -> rusqlite::Result<Option<(i64, FolderMeta)>> {
    c.prepare_cached("SELECT idx, index_id, max_sequence FROM folders WHERE id = ?1")?
        .query_row(params![folder], |r| {
            Ok((
                r.get(0)?,
                FolderMeta {
                    index_id: r.get::<_, i64>(1)? as u64,
                    max_sequence: r.get(2)?,
                },
            ))
        })
        .optional()
}

fn ensure_folder_row(c: &Connection, folder: &str) -> Result<(i64, FolderMeta)> {
    if let Some(row) = folder_row(c, folder)? {
        return Ok(row);
    }
    // Positive and non-zero, so it reads the same signed or unsigned.
    let index_id = (rand::random::<u64>() >> 1).max(1);
    c.prepare_cached("INSERT INTO folders (id, index_id, max_sequence) VALUES (?1, ?2, 0)")?
        .execute(params![folder, index_id as i64])?;
    let fidx = c.last_insert_rowid();
    c.prepare_cached("INSERT INTO folder_counts (folder) VALUES (?1)")?
        .execute(params![fidx])?;
    Ok((
        fidx,
        FolderMeta {
            index_id,
            max_sequence: 0,
        },
    ))
}

fn set_max_sequence(c: &Connection, fidx: i64, seq: i64) -> rusqlite::Result<()> {
    c.prepare_cached("UPDATE folders SET max_sequence = ?2 WHERE idx = ?1")?
        .execute(params![fidx, seq])?;
    Ok(())
}

fn device_idx(c: &Connection, device: &DeviceId, create: bool) -> rusqlite::Result<Option<i64>> {
    let found: Option<i64> = c
        .prepare_cached("SELECT idx FROM devices WHERE device_id = ?1")?
        .query_row(params![&device.0[..]], |r| r.get(0))
        .optional()?;
    if found.is_some() || !create {
        return Ok(found);
    }
    c.prepare_cached("INSERT INTO devices (device_id) VALUES (?1)")?
        .execute(params![&device.0[..]])?;
    Ok(Some(c.last_insert_rowid()))
}

/// [`get_row`], with the row's `files.id`.
fn get_row_with_id(
    c: &Connection,
    fidx: i64,
    name: &str,
    dev: i64,
) -> rusqlite::Result<Option<(FileInfo, u64, i64)>> {
    c.prepare_cached(concat!(
        "SELECT ",
        file_cols!(),
        ", id FROM files WHERE folder = ?1 AND name = ?2 AND device = ?3"
    ))?
    .query_row(params![fidx, name, dev], |r| {
        Ok((row_to_file(r)?, r.get::<_, i64>(11)? as u64, r.get(12)?))
    })
    .optional()
}

/// The record of `name` held for device `dev`, with its inode (0 for remote rows).
fn get_row(
    c: &Connection,
    fidx: i64,
    name: &str,
    dev: i64,
) -> rusqlite::Result<Option<(FileInfo, u64)>> {
    c.prepare_cached(concat!(
        "SELECT ",
        file_cols!(),
        " FROM files WHERE folder = ?1 AND name = ?2 AND device = ?3"
    ))?
    .query_row(params![fidx, name, dev], |r| {
        Ok((row_to_file(r)?, r.get::<_, i64>(11)? as u64))
    })
    .optional()
}

/// Inserts or replaces this device's record of `f.name`; the block lookup and the
/// folder's local totals follow it.
fn upsert_local_row(c: &Connection, fidx: i64, f: &FileInfo, inode: u64) -> rusqlite::Result<()> {
    let old = c
        .prepare_cached(
            "SELECT id, deleted, kind, size FROM files \
             WHERE folder = ?1 AND name = ?2 AND device = 0",
        )?
        .query_row(params![fidx, f.name], |r| {
            Ok((r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?)))
        })
        .optional()?;
    upsert_local_row_known(c, fidx, f, inode, old).map(|_| ())
}

/// The parameters of [`write_files_row`]'s statements for record `f` of device `dev`
/// (and the row's id, for the update).
macro_rules! files_params {
    ($fidx:expr, $dev:expr, $f:expr, $inode:expr, $credit:expr $(, $id:expr)?) => {
        params![
            $fidx,
            $dev,
            $f.name,
            $f.kind.as_i64(),
            clamp_i64($f.size),
            $f.mtime_ns,
            $f.mode as i64,
            $f.deleted,
            $f.version.to_bytes(),
            $f.sequence,
            $f.modified_by as i64,
            $f.symlink_target,
            $inode as i64,
            encode_blocks(&$f.blocks),
            $credit,
            $($id,)?
        ]
    };
}

/// Writes record `f` of device `dev` into `files`, with `credit` (see `credit`; 0 for
/// local rows): a new row when `id` is `None`, else over row `id` (the one held for the
/// same folder, name and device). Returns the row's id.
///
/// Two plain statements rather than an upsert with `RETURNING`: every caller knows
/// already whether the row exists, and the upsert cost a statement journal and a
/// temporary table per row.
fn write_files_row(
    c: &Connection,
    fidx: i64,
    dev: i64,
    f: &FileInfo,
    inode: u64,
    credit: i64,
    id: Option<i64>,
) -> rusqlite::Result<i64> {
    match id {
        None => {
            c.prepare_cached(
                "INSERT INTO files (folder, device, name, kind, size, mtime_ns, mode, deleted, \
                                    version, sequence, modified_by, symlink_target, inode, \
                                    blocks, credit) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )?
            .execute(files_params!(fidx, dev, f, inode, credit))?;
            Ok(c.last_insert_rowid())
        }
        Some(id) => {
            let changed = c
                .prepare_cached(
                    "UPDATE files SET kind = ?4, size = ?5, mtime_ns = ?6, mode = ?7, \
                       deleted = ?8, version = ?9, sequence = ?10, modified_by = ?11, \
                       symlink_target = ?12, inode = ?13, blocks = ?14, credit = ?15 \
                     WHERE id = ?16 AND folder = ?1 AND device = ?2 AND name = ?3",
                )?
                .execute(files_params!(fidx, dev, f, inode, credit, id))?;
            if changed != 1 {
                return Err(rusqlite::Error::StatementChangedRows(changed));
            }
            Ok(id)
        }
    }
}

/// [`upsert_local_row`], for a caller that has read the row already: `old` is its id and
/// its `(deleted, kind, size)`, `None` when there is none. Returns the row's id.
fn upsert_local_row_known(
    c: &Connection,
    fidx: i64,
    f: &FileInfo,
    inode: u64,
    old: Option<(i64, (bool, i64, i64))>,
) -> rusqlite::Result<i64> {
    let (old_n, old_b) = counted(old.map(|(_, counted)| counted));
    let (new_n, new_b) = counted(Some((f.deleted, f.kind.as_i64(), clamp_i64(f.size))));
    add_counts(c, fidx, [new_n - old_n, new_b - old_b, 0, 0, 0, 0])?;
    let old_id = old.map(|(id, _)| id);
    // Local rows earn no credit (see `credit`).
    let id = write_files_row(c, fidx, LOCAL, f, inode, 0, old_id)?;
    // A new row has no blocks to drop.
    if old_id.is_some() {
        c.prepare_cached("DELETE FROM blocks WHERE file = ?1")?
            .execute(params![id])?;
    }
    if !f.deleted && f.kind == FileKind::File {
        let mut ins = c.prepare_cached(
            "INSERT OR IGNORE INTO blocks (file, start, size, hash, hash_key) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for b in &f.blocks {
            ins.execute(params![
                id,
                clamp_i64(b.offset),
                b.size as i64,
                &b.hash[..],
                hash_key(&b.hash)
            ])?;
        }
    }
    Ok(id)
}

/// Recomputes the global, and so the need, of each name of the folder that `sql` selects
/// (`?1` is the folder).
fn recompute_selected(c: &Connection, fidx: i64, sql: &str) -> Result<()> {
    let names: Vec<String> = c
        .prepare_cached(sql)?
        .query_map(params![fidx], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for name in names {
        recompute_global(c, fidx, &name)?;
    }
    Ok(())
}

/// One device's row of a name, as [`recompute_global`] weighs it: its record without
/// name or blocks, its `files.id` and its `credit`.
struct NameRow {
    dev: i64,
    file: FileInfo,
    id: i64,
    credit: i64,
}

impl NameRow {
    /// The row `f` of device `dev` becomes once written with id `id` (an update keeps
    /// its credit until the global is recomputed).
    fn written(dev: i64, f: &FileInfo, id: i64, credit: i64) -> NameRow {
        NameRow {
            dev,
            file: FileInfo {
                name: String::new(),
                blocks: Vec::new(),
                version: f.version.clone(),
                symlink_target: f.symlink_target.clone(),
                ..*f
            },
            id,
            credit,
        }
    }
}

/// Puts `row` among `rows` (in device order) in place of that device's old row.
fn put_row(rows: &mut Vec<NameRow>, row: NameRow) {
    match rows.binary_search_by_key(&row.dev, |r| r.dev) {
        Ok(i) => rows[i] = row,
        Err(i) => rows.insert(i, row),
    }
}

/// Recomputes the global version of one name from that name's rows on every device,
/// and whether this device needs it.
fn recompute_global(c: &Connection, fidx: i64, name: &str) -> Result<()> {
    let rows = name_rows(c, fidx, name)?;
    recompute_global_from(c, fidx, name, &rows, None).map(|_| ())
}

/// Every device's row of `name`, in device order: the local row (device 0) comes first
/// and stays the winner against any remote row with an equal version, so "global ==
/// local" means "the global row is device 0".
fn name_rows(c: &Connection, fidx: i64, name: &str) -> rusqlite::Result<Vec<NameRow>> {
    c.prepare_cached(
        "SELECT device, kind, size, mtime_ns, mode, deleted, version, sequence, \
                modified_by, symlink_target, id, credit \
         FROM files WHERE folder = ?1 AND name = ?2 ORDER BY device",
    )?
    .query_map(params![fidx, name], |r| {
        Ok(NameRow {
            dev: r.get(0)?,
            // Blocks are not needed to pick a winner; not loaded (can be megabytes).
            file: record_fields(r)?,
            id: r.get(10)?,
            credit: r.get(11)?,
        })
    })?
    .collect()
}

/// [`recompute_global`] from the name's rows as they now are (see [`name_rows`]).
///
/// `unwritten` names a remote device whose row in `rows` is not written yet: its credit
/// is counted but not stored, and returned for the caller to write with the row (one
/// statement instead of two). Otherwise returns 0.
fn recompute_global_from(
    c: &Connection,
    fidx: i64,
    name: &str,
    rows: &[NameRow],
    unwritten: Option<i64>,
) -> Result<i64> {
    debug_assert!(rows.windows(2).all(|w| w[0].dev < w[1].dev));
    debug_assert_ne!(unwritten, Some(LOCAL));
    let mut unwritten_credit = 0;
    // (deleted, kind, size, need), then the winner (device, version).
    type Counted = (bool, i64, i64, bool);
    let old_row: Option<(Counted, (i64, Vec<u8>))> = c
        .prepare_cached(
            "SELECT deleted, kind, size, need, device, version FROM global \
             WHERE folder = ?1 AND name = ?2",
        )?
        .query_row(params![fidx, name], |r| {
            Ok((
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?),
                (r.get(4)?, r.get(5)?),
            ))
        })
        .optional()?;
    let (old, old_winner) = old_row.unzip();
    let (old_n, old_b) = counted(old.map(|(d, k, s, _)| (d, k, s)));
    let (old_need_n, old_need_b) = needed(old.map(|(_, _, s, n)| (n, s)));
    let old_weight = old.map_or(0, |(d, _, s, _)| if d { 0 } else { s.max(1) });
    let Some(w) = select_global(rows.iter().map(|r| &r.file)) else {
        c.prepare_cached("DELETE FROM global WHERE folder = ?1 AND name = ?2")?
            .execute(params![fidx, name])?;
        add_counts(c, fidx, [0, 0, -old_n, -old_b, -old_need_n, -old_need_b])?;
        add_global_weight(fidx, -old_weight);
        return Ok(unwritten_credit);
    };
    let (wdev, g) = (&rows[w].dev, &rows[w].file);
    // What each remote row adds to its device's completion, against this global.
    add_global_weight(
        fidx,
        if g.deleted {
            0
        } else {
            clamp_i64(g.size).max(1)
        } - old_weight,
    );
    for row in rows {
        if row.dev == LOCAL {
            continue;
        }
        let new_credit = credit(g, &row.file);
        if Some(row.dev) == unwritten {
            unwritten_credit = new_credit;
        } else if new_credit != row.credit {
            c.prepare_cached("UPDATE files SET credit = ?2 WHERE id = ?1")?
                .execute(params![row.id, new_credit])?;
        }
        if new_credit != row.credit {
            add_credit_change(fidx, row.dev, row.credit, new_credit);
        }
    }
    let local = rows.iter().find(|r| r.dev == LOCAL).map(|r| &r.file);
    let need = needs(g, local)
        && !(g.deleted && ignores_deletes(c, fidx)?)
        && !ignored_here(fidx, name, g.kind == FileKind::Dir);
    let (new_n, new_b) = counted(Some((g.deleted, g.kind.as_i64(), clamp_i64(g.size))));
    let (new_need_n, new_need_b) = needed(Some((need, clamp_i64(g.size))));
    add_counts(
        c,
        fidx,
        [
            0,
            0,
            new_n - old_n,
            new_b - old_b,
            new_need_n - old_need_n,
            new_need_b - old_need_b,
        ],
    )?;
    let version = g.version.to_bytes();
    // The same winner with the same record and need: the row would be rewritten as it
    // is (every other column follows from these and the name). A peer's announcement of
    // what it just pulled from here is that, once per file.
    let same = old == Some((g.deleted, g.kind.as_i64(), clamp_i64(g.size), need))
        && old_winner.is_some_and(|(d, v)| d == *wdev && v == version);
    if same {
        return Ok(unwritten_credit);
    }
    let (class, key) = need_order(name, g);
    c.prepare_cached(
        "INSERT INTO global (folder, name, device, version, kind, size, deleted, need, \
                             need_class, need_key) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) \
         ON CONFLICT (folder, name) DO UPDATE SET \
           device = excluded.device, version = excluded.version, kind = excluded.kind, \
           size = excluded.size, deleted = excluded.deleted, need = excluded.need, \
           need_class = excluded.need_class, need_key = excluded.need_key",
    )?
    .execute(params![
        fidx,
        name,
        wdev,
        version,
        g.kind.as_i64(),
        clamp_i64(g.size),
        g.deleted,
        need,
        class,
        key
    ])?;
    Ok(unwritten_credit)
}

fn read_counts(c: &Connection, fidx: i64) -> rusqlite::Result<FolderCounts> {
    flush_counts(c)?;
    let n =
        |r: &Row<'_>, i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(i)?.max(0) as u64) };
    let counts = c
        .prepare_cached(
            "SELECT local_files, local_bytes, global_files, global_bytes, need_files, need_bytes \
             FROM folder_counts WHERE folder = ?1",
        )?
        .query_row(params![fidx], |r| {
            Ok(FolderCounts {
                local_files: n(r, 0)?,
                local_bytes: n(r, 1)?,
                global_files: n(r, 2)?,
                global_bytes: n(r, 3)?,
                need_files: n(r, 4)?,
                need_bytes: n(r, 5)?,
            })
        })
        .optional()?;
    Ok(counts.unwrap_or_default())
}

/// What a (deleted, kind, size) record adds to the local or global "files"/"bytes"
/// totals: one file and its size when it is a regular file that is not deleted.
fn counted(row: Option<(bool, i64, i64)>) -> (i64, i64) {
    match row {
        Some((false, kind, size)) if kind == FileKind::File.as_i64() => (1, size),
        _ => (0, 0),
    }
}

/// What a (need, size) global adds to the need totals.
fn needed(row: Option<(bool, i64)>) -> (i64, i64) {
    match row {
        Some((true, size)) => (1, size),
        _ => (0, 0),
    }
}

/// Adjusts the folder's running totals (see `0002_folder_counts.sql`) by `d`: local
/// files and bytes, global files and bytes, need files and bytes.
///
/// The change is held until the write's transaction commits ([`flush_counts`]), so that a
/// batch of 1,000 records updates the totals row once rather than up to three times per
/// record (a tenth of the receiving daemon's CPU in scenario b went to those updates).
fn add_counts(_c: &Connection, fidx: i64, d: [i64; 6]) -> rusqlite::Result<()> {
    if d == [0; 6] {
        return Ok(());
    }
    PENDING_COUNTS.with(|p| {
        let mut p = p.borrow_mut();
        let sum = p.entry(fidx).or_insert([0; 7]);
        for (s, x) in sum.iter_mut().zip(d) {
            *s += x;
        }
    });
    Ok(())
}

/// Adjusts the folder's `global_weight` (see `0005_device_counts.sql`) by `d`, held
/// like [`add_counts`].
fn add_global_weight(fidx: i64, d: i64) {
    if d != 0 {
        PENDING_COUNTS.with(|p| p.borrow_mut().entry(fidx).or_insert([0; 7])[6] += d);
    }
}

/// What a remote row adds to its device's completion totals, given the name's global:
/// the global's weight when the row has the global version, -1 for a global deletion
/// the device has not made, else 0 (see `0005_device_counts.sql`).
fn credit(g: &FileInfo, row: &FileInfo) -> i64 {
    if !g.deleted {
        if row.version == g.version {
            clamp_i64(g.size).max(1)
        } else {
            0
        }
    } else if !row.deleted {
        -1
    } else {
        0
    }
}

/// Moves a remote row's credit from `old` to `new` in its device's totals, held like
/// [`add_counts`].
fn add_credit_change(fidx: i64, dev: i64, old: i64, new: i64) {
    let have = new.max(0) - old.max(0);
    let pending_deletes = i64::from(new < 0) - i64::from(old < 0);
    if have != 0 || pending_deletes != 0 {
        PENDING_DEVICE_COUNTS.with(|p| {
            let mut p = p.borrow_mut();
            let sum = p.entry((fidx, dev)).or_insert([0; 2]);
            sum[0] += have;
            sum[1] += pending_deletes;
        });
    }
}

thread_local! {
    /// Changes to the totals made by the transaction in progress on this thread (the
    /// index actor's), by folder, not yet written ([`add_counts`]): the six of
    /// `add_counts`, then `global_weight`.
    static PENDING_COUNTS: RefCell<HashMap<i64, [i64; 7]>> = RefCell::new(HashMap::new());
    /// The same for `device_counts`, by (folder, device): have, pending deletes.
    static PENDING_DEVICE_COUNTS: RefCell<HashMap<(i64, i64), [i64; 2]>> =
        RefCell::new(HashMap::new());
}

/// Writes the held changes to the totals: before the transaction commits, and before
/// the totals are read.
fn flush_counts(c: &Connection) -> rusqlite::Result<()> {
    let pending = PENDING_COUNTS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for (fidx, d) in pending {
        if d == [0; 7] {
            continue;
        }
        c.prepare_cached(
            "UPDATE folder_counts SET \
               local_files = local_files + ?2, local_bytes = local_bytes + ?3, \
               global_files = global_files + ?4, global_bytes = global_bytes + ?5, \
               need_files = need_files + ?6, need_bytes = need_bytes + ?7, \
               global_weight = global_weight + ?8 \
             WHERE folder = ?1",
        )?
        .execute(params![fidx, d[0], d[1], d[2], d[3], d[4], d[5], d[6]])?;
    }
    let pending = PENDING_DEVICE_COUNTS.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for ((fidx, dev), d) in pending {
        if d == [0; 2] {
            continue;
        }
        c.prepare_cached(
            "INSERT INTO device_counts (folder, device, have, pending_deletes) \
             VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (folder, device) DO UPDATE SET \
               have = have + excluded.have, \
               pending_deletes = pending_deletes + excluded.pending_deletes",
        )?
        .execute(params![fidx, dev, d[0], d[1]])?;
    }
    Ok(())
}

/// Forgets the held changes (their transaction rolled back).
fn discard_counts() {
    PENDING_COUNTS.with(|p| p.borrow_mut().clear());
    PENDING_DEVICE_COUNTS.with(|p| p.borrow_mut().clear());
}

/// The global record of `f.name` when another device holds it and `f` (as scanned) is
/// exactly it — same kind, size, mtime, link target and blocks — and this device's own
/// previous version (`old`) does not already supersede it.
fn remote_global_if_same(
    c: &Connection,
    fidx: i64,
    f: &FileInfo,
    old: &VersionVector,
) -> rusqlite::Result<Option<FileInfo>> {
    let dev: Option<i64> = c
        .prepare_cached("SELECT device FROM global WHERE folder = ?1 AND name = ?2")?
        .query_row(params![fidx, f.name], |r| r.get(0))
        .optional()?;
    let Some(dev) = dev.filter(|d| *d != LOCAL) else {
        return Ok(None);
    };
    let Some((g, _)) = get_row(c, fidx, &f.name, dev)? else {
        return Ok(None);
    };
    let same = match f.kind {
        // A directory is its kind and mode (the scanner never compares a directory's
        // mtime, which every entry added or removed changes). One made here as the parent
        // of a pulled file, before the pull reached the directory's own record, is that
        // record: a new version of it would come back to its maker as a change.
        FileKind::Dir => g.same_bytes(f) && g.mode == f.mode,
        _ => g.same_bytes(f) && g.mtime_ns == f.mtime_ns && g.symlink_target == f.symlink_target,
    };
    // (An empty version, no record here, compares as older.)
    let behind = matches!(
        old.compare(&g.version),
        VersionOrdering::Lesser | VersionOrdering::Concurrent
    );
    Ok((same && behind).then_some(g))
}

/// Whether the folder ignores deletions from other devices (see `set_ignore_delete`).
fn ignores_deletes(c: &Connection, fidx: i64) -> rusqlite::Result<bool> {
    c.prepare_cached("SELECT ignore_delete FROM folders WHERE idx = ?1")?
        .query_row(params![fidx], |r| r.get(0))
}

thread_local! {
    /// The ignore rules of each folder (by `folders.idx`) as last handed to the index
    /// actor on this thread ([`Index::set_ignores`]); `None` or no entry: no rules.
    static IGNORE_RULES: RefCell<HashMap<i64, Option<IgnoreRule>>> = RefCell::new(HashMap::new());
}

/// Whether this device's ignore rules for the folder exclude `name`.
fn ignored_here(fidx: i64, name: &str, is_dir: bool) -> bool {
    IGNORE_RULES.with(|m| match m.borrow().get(&fidx) {
        Some(Some(rule)) => rule(name, is_dir),
        _ => false,
    })
}

/// Whether this device must act on `global`, given its own record of the name.
fn needs(global: &FileInfo, local: Option<&FileInfo>) -> bool {
    match local {
        Some(l) if l.version == global.version => false,
        // A deletion of something absent or already deleted here changes nothing on disk.
        _ if global.deleted => local.is_some_and(|l| !l.deleted),
        _ => true,
    }
}

/// The (class, key) a needed name sorts by; see the `global` table in the migration.
fn need_order(name: &str, g: &FileInfo) -> (i64, i64) {
    let depth = name.matches('/').count() as i64;
    if g.deleted {
        (2, -depth)
    } else if g.kind == FileKind::Dir {
        (0, depth)
    } else {
        (1, clamp_i64(g.size))
    }
}

/// Drops every row of device `dev` in the folder, a bounded batch of names at a time,
/// recomputing each name's global.
fn drop_device_rows(c: &Connection, fidx: i64, dev: i64) -> Result<()> {
    loop {
        // INDEXED BY: the (folder, name, device) index would make each round a walk of
        // the whole folder.
        let names: Vec<String> = c
            .prepare_cached(
                "SELECT name FROM files INDEXED BY files_by_sequence \
                 WHERE folder = ?1 AND device = ?2 LIMIT ?3",
            )?
            .query_map(params![fidx, dev, DROP_BATCH], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if names.is_empty() {
            return Ok(());
        }
        let mut del = c.prepare_cached(
            "DELETE FROM files WHERE folder = ?1 AND name = ?2 AND device = ?3 RETURNING credit",
        )?;
        for name in &names {
            let credit: Option<i64> = del
                .query_row(params![fidx, name, dev], |r| r.get(0))
                .optional()?;
            if let Some(old) = credit {
                add_credit_change(fidx, dev, old, 0);
            }
            recompute_global(c, fidx, name)?;
        }
    }
}

/// The need item of `name` whose global row is device `dev`'s: that row, the local row,
/// and the remote devices holding the global version, from one query over the name's
/// rows (three lookups per item were a seventh of the receiving index thread's time in
/// scenario b). Only the global and local rows' block lists are read. `None` when `dev`
/// has no row of the name.
fn need_item(c: &Connection, fidx: i64, name: &str, dev: i64) -> Result<Option<NeedItem>> {
    let mut rows: Vec<(i64, FileInfo, Option<Vec<u8>>)> = c
        .prepare_cached(
            "SELECT name, kind, size, mtime_ns, mode, deleted, version, sequence, modified_by, \
                    symlink_target, CASE WHEN device IN (?3, 0) THEN blocks ELSE x'' END, \
                    inode, device, (SELECT device_id FROM devices WHERE idx = files.device) \
             FROM files WHERE folder = ?1 AND name = ?2 ORDER BY device",
        )?
        .query_map(params![fidx, name, dev], |r| {
            Ok((r.get(12)?, row_to_file(r)?, r.get(13)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let Some(g) = rows.iter().position(|(d, _, _)| *d == dev) else {
        return Ok(None);
    };
    let mut devices = Vec::new();
    for (d, f, id) in &rows {
        if *d != LOCAL && f.version == rows[g].1.version {
            let id = id.as_deref().unwrap_or_default();
            let arr: [u8; 32] = id
                .try_into()
                .map_err(|_| Error::Index(format!("{name}: device ID is not 32 bytes")))?;
            devices.push(DeviceId(arr));
        }
    }
    let local = rows
        .iter()
        .find(|(d, _, _)| *d == LOCAL)
        .map(|(_, f, _)| f.clone());
    let global = rows.swap_remove(g).1;
    Ok(Some(NeedItem {
        global,
        local,
        devices,
    }))
}

/// True when a scanned file is what the record already says: nothing to announce.
fn is_unchanged(old: &FileInfo, new: &FileInfo) -> bool {
    old.same_content(new) && old.mtime_ns == new.mtime_ns
}

/// The canonical form of a version vector (sorted by ID, no zero counters, one counter
/// per ID), so that equal versions have equal bytes and SQL can compare them.
fn canonical(v: &VersionVector) -> VersionVector {
    let mut c: Vec<Counter> = v.0.iter().filter(|c| c.value != 0).copied().collect();
    c.sort_by_key(|c| (c.id, std::cmp::Reverse(c.value)));
    c.dedup_by_key(|c| c.id);
    VersionVector(c)
}

/// A record's fields from columns 1 to 9 of a `files` row (kind through symlink_target,
/// in `file_cols!`'s order), without its name and blocks.
fn record_fields(r: &Row<'_>) -> rusqlite::Result<FileInfo> {
    Ok(FileInfo {
        name: String::new(),
        kind: kind_from(r, 1)?,
        size: r.get::<_, i64>(2)? as u64,
        mtime_ns: r.get(3)?,
        mode: r.get::<_, i64>(4)? as u32,
        deleted: r.get(5)?,
        version: version_from(r, 6)?,
        sequence: r.get(7)?,
        modified_by: r.get::<_, i64>(8)? as u64,
        symlink_target: r.get(9)?,
        blocks: Vec::new(),
    })
}

fn row_to_file(r: &Row<'_>) -> rusqlite::Result<FileInfo> {
    let blocks: Vec<u8> = r.get(10)?;
    Ok(FileInfo {
        name: r.get(0)?,
        blocks: decode_blocks(&blocks)
            .ok_or_else(|| conversion(10, Type::Blob, "block list has a bad length"))?,
        ..record_fields(r)?
    })
}

fn kind_from(r: &Row<'_>, i: usize) -> rusqlite::Result<FileKind> {
    FileKind::from_i64(r.get(i)?).ok_or_else(|| conversion(i, Type::Integer, "unknown file kind"))
}

fn version_from(r: &Row<'_>, i: usize) -> rusqlite::Result<VersionVector> {
    let b: Vec<u8> = r.get(i)?;
    VersionVector::from_bytes(&b)
        .ok_or_else(|| conversion(i, Type::Blob, "version vector has a bad length"))
}

fn conversion(i: usize, t: Type, msg: &str) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(i, t, msg.to_string().into())
}

fn encode_blocks(blocks: &[Block]) -> Vec<u8> {
    let mut out = Vec::with_capacity(blocks.len() * BLOCK_RECORD);
    for b in blocks {
        out.extend_from_slice(&b.offset.to_be_bytes());
        out.extend_from_slice(&b.size.to_be_bytes());
        out.extend_from_slice(&b.hash);
    }
    out
}

fn decode_blocks(b: &[u8]) -> Option<Vec<Block>> {
    if b.len() % BLOCK_RECORD != 0 {
        return None;
    }
    b.chunks_exact(BLOCK_RECORD)
        .map(|c| {
            Some(Block {
                offset: u64::from_be_bytes(c[..8].try_into().ok()?),
                size: u32::from_be_bytes(c[8..12].try_into().ok()?),
                hash: c[12..].try_into().ok()?,
            })
        })
        .collect()
}

/// Sizes and offsets are u64 on the wire; SQLite integers are i64. Nothing real is
/// that large, but an untrusted peer's record must not turn into a negative size.
fn hash_key(h: &[u8; 32]) -> i64 {
    i64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

fn clamp_i64(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn limit_i64(limit: usize) -> i64 {
    limit.min(i64::MAX as usize) as i64
}

/// Stores a pulled file as the local record with sequence `seq` (see `commit_pulled`).
fn record_pulled(
    c: &Connection,
    folder: &str,
    fidx: i64,
    seq: i64,
    file: FileInfo,
    inode: u64,
) -> Result<FileInfo> {
    let mut f = file;
    f.version = canonical(&f.version);
    // Every device's row of the name, read once: the local one's version (for the
    // check) and what it counts for (for the totals), and all of them for the global.
    let mut rows = name_rows(c, fidx, &f.name)?;
    let old = rows.first().filter(|r| r.dev == LOCAL);
    if let Some(old) = old {
        if old.file.version.compare(&f.version) == VersionOrdering::Greater {
            return Err(Error::Folder {
                folder: folder.to_string(),
                msg: format!(
                    "{}: not recording the pulled version, the local record is newer",
                    f.name
                ),
            });
        }
    }
    let inode = if f.deleted {
        f.size = 0;
        f.blocks.clear();
        0
    } else {
        inode
    };
    f.sequence = seq;
    let old = old.map(|r| {
        let counted = (r.file.deleted, r.file.kind.as_i64(), clamp_i64(r.file.size));
        (r.id, counted)
    });
    let id = upsert_local_row_known(c, fidx, &f, inode, old)?;
    put_row(&mut rows, NameRow::written(LOCAL, &f, id, 0));
    recompute_global_from(c, fidx, &f.name, &rows, None)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use proptest::prelude::*;

    const F: &str = "docs";
    const ME: u64 = 0xAAAA;

    fn dev(n: u8) -> DeviceId {
        DeviceId([n; 32])
    }

    fn block(offset: u64, size: u32, tag: u8) -> Block {
        Block {
            offset,
            size,
            hash: [tag; 32],
        }
    }

    fn file(name: &str, size: u64, mtime_ns: i64, tag: u8) -> FileInfo {
        let blocks = if size == 0 {
            Vec::new()
        } else {
            vec![block(0, size as u32, tag)]
        };
        FileInfo {
            name: name.into(),
            kind: FileKind::File,
            size,
            mtime_ns,
            mode: 0o644,
            deleted: false,
            version: VersionVector::new(),
            sequence: 0,
            modified_by: 0,
            blocks,
            symlink_target: None,
        }
    }

    fn dir(name: &str) -> FileInfo {
        FileInfo {
            kind: FileKind::Dir,
            blocks: Vec::new(),
            mode: 0o755,
            ..file(name, 0, 1, 0)
        }
    }

    fn change(f: FileInfo) -> LocalChange {
        LocalChange { file: f, inode: 7 }
    }

    fn gone(name: &str) -> LocalChange {
        LocalChange {
            file: FileInfo {
                deleted: true,
                ..file(name, 0, 0, 0)
            },
            inode: 0,
        }
    }

    /// A remote record with the given version.
    fn remote(
        name: &str,
        size: u64,
        mtime_ns: i64,
        tag: u8,
        version: VersionVector,
        seq: i64,
    ) -> FileInfo {
        FileInfo {
            version,
            sequence: seq,
            modified_by: 0xBBBB,
            ..file(name, size, mtime_ns, tag)
        }
    }

    fn commit(idx: &Index, changes: Vec<LocalChange>) -> Vec<FileInfo> {
        block_on(idx.commit_local_changes(F, ME, changes)).unwrap()
    }

    fn need_names(idx: &Index) -> Vec<String> {
        block_on(idx.need_list(F, 100))
            .unwrap()
            .into_iter()
            .map(|n| n.global.name)
            .collect()
    }

    #[test]
    fn migrates_an_empty_database_and_reopens_without_losing_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        let idx = Index::open(&path).unwrap();
        let meta = block_on(idx.ensure_folder(F)).unwrap();
        assert_ne!(meta.index_id, 0);
        assert_eq!(meta.max_sequence, 0);
        commit(&idx, vec![change(file("a", 10, 1, 1))]);
        block_on(idx.close()).unwrap();
        assert!(matches!(block_on(idx.counts(F)), Err(Error::Stopped)));
        block_on(idx.close()).unwrap(); // closing twice is fine

        let conn = Connection::open(&path).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        drop(conn);

        let idx = Index::open(&path).unwrap();
        let again = block_on(idx.ensure_folder(F)).unwrap();
        assert_eq!(again.index_id, meta.index_id);
        assert_eq!(again.max_sequence, 1);
        assert_eq!(block_on(idx.get_local(F, "a")).unwrap().unwrap().size, 10);
    }

    #[test]
    fn the_database_belongs_to_one_opener_until_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        let idx = Index::open(&path).unwrap();
        commit(&idx, vec![change(file("a", 10, 1, 1))]);
        // No shared-memory WAL index: the locks and the WAL's index stay in this process.
        assert!(!dir.path().join("index.db-shm").exists());
        // A second opener (SQLite keeps locks per connection, also within one process)
        // waits out the busy timeout, then gets a clear refusal.
        let Err(err) = Index::open(&path) else {
            panic!("a second opener was let in");
        };
        assert!(
            err.to_string()
                .contains("is in use by another Ferry process"),
            "{err}"
        );
        block_on(idx.close()).unwrap();
        let idx = Index::open(&path).unwrap();
        block_on(idx.ensure_folder(F)).unwrap();
        assert_eq!(block_on(idx.get_local(F, "a")).unwrap().unwrap().size, 10);
    }

    #[test]
    fn a_database_from_a_newer_ferry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        drop(Index::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Index::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("index.db was written by a newer Ferry (schema 99, this binary knows 5)"),
            "{err}"
        );
    }

    #[test]
    fn migration_2_fills_the_folder_totals_of_an_existing_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        let idx = Index::open(&path).unwrap();
        commit(
            &idx,
            vec![change(file("a", 10, 1, 1)), change(file("b", 5, 1, 2))],
        );
        let v = VersionVector::new().bump(0xBBBB);
        block_on(idx.apply_remote(F, dev(1), 5, vec![remote("c", 7, 1, 3, v, 1)])).unwrap();
        let before = block_on(idx.counts(F)).unwrap();
        let pct = block_on(idx.device_completion(F, dev(1))).unwrap();
        assert!((pct - 100.0 * 7.0 / 22.0).abs() < 1e-9, "{pct}");
        block_on(idx.close()).unwrap();

        // Turn it back into a schema 1 database.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE folder_counts; ALTER TABLE folders DROP COLUMN ignore_delete; \
             ALTER TABLE folders DROP COLUMN ignore_patterns; DROP TABLE device_counts; \
             ALTER TABLE files DROP COLUMN credit; PRAGMA user_version = 1;",
        )
        .unwrap();
        drop(conn);

        let idx = Index::open(&path).unwrap();
        assert_eq!(block_on(idx.counts(F)).unwrap(), before);
        // Migration 5 filled the completion totals too.
        assert_eq!(block_on(idx.device_completion(F, dev(1))).unwrap(), pct);
        assert_eq!(
            block_on(idx.device_completion(F, dev(1))).unwrap(),
            completion_from_scratch(&idx, dev(1))
        );
        assert_eq!(
            (before.local_files, before.global_files, before.need_files),
            (2, 3, 1)
        );
    }

    #[test]
    fn local_changes_bump_versions_and_sequences_and_unchanged_ones_are_skipped() {
        let idx = Index::open_in_memory().unwrap();
        let out = commit(&idx, vec![change(file("a", 10, 1, 1)), change(dir("d"))]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].sequence, 1);
        assert_eq!(out[1].sequence, 2);
        assert_eq!(out[0].version.get(ME), 1);
        assert_eq!(out[0].modified_by, ME);

        // Same content and mtime: nothing new, but the new inode is remembered.
        let same = LocalChange {
            inode: 99,
            ..change(file("a", 10, 1, 1))
        };
        assert!(commit(&idx, vec![same]).is_empty());
        let (_, inode) = block_on(idx.get_local_with_inode(F, "a")).unwrap().unwrap();
        assert_eq!(inode, 99);

        let edited = commit(&idx, vec![change(file("a", 12, 2, 2))]);
        assert_eq!(edited[0].sequence, 3);
        assert!(edited[0].version.get(ME) > out[0].version.get(ME));
        assert_eq!(block_on(idx.ensure_folder(F)).unwrap().max_sequence, 3);

        // Deleting: a tombstone with the kind kept and a new version; twice is a no-op,
        // and deleting an unknown name is too.
        let del = commit(&idx, vec![gone("a"), gone("a"), gone("nope")]);
        assert_eq!(del.len(), 1);
        assert!(del[0].deleted && del[0].blocks.is_empty() && del[0].size == 0);
        assert!(del[0].version.get(ME) > edited[0].version.get(ME));
        assert!(commit(&idx, vec![gone("a")]).is_empty());

        let snap = block_on(idx.local_snapshot(F, vec![])).unwrap();
        assert!(snap.get("a").unwrap().deleted);
        assert_eq!(snap.get("d").unwrap().kind, FileKind::Dir);
        assert!(need_names(&idx).is_empty());
    }

    /// Regression (counter reuse after a lost conflict): the device edits "a" (counter
    /// n), loses a conflict to a winner whose vector lacks n, adopts it, and edits again.
    /// With `bump` alone the new counter was n again, so a third device that had built on
    /// the first edit saw the second as already seen and dropped it without a conflict.
    #[test]
    fn a_counter_is_never_issued_twice_after_adopting_a_conflict_winner() {
        let idx = Index::open_in_memory().unwrap();
        // Some history first, so counters and sequences differ.
        commit(
            &idx,
            vec![change(file("x", 1, 1, 1)), change(file("y", 1, 1, 2))],
        );
        let mine = commit(&idx, vec![change(file("a", 10, 100, 3))]).remove(0);
        let first = mine.version.get(ME);
        // A concurrent winner from a device that never saw our edit (later mtime).
        let winner = remote("a", 20, 900, 4, VersionVector::new().bump(0xBBBB), 1);
        block_on(idx.apply_remote(F, dev(1), 5, vec![winner.clone()])).unwrap();
        assert_eq!(need_names(&idx), vec!["a"]);
        let adopted = block_on(idx.commit_pulled(F, winner, 7)).unwrap();
        assert_eq!(adopted.version.get(ME), 0, "the winner's vector, as it is");
        let again = commit(&idx, vec![change(file("a", 30, 950, 5))]).remove(0);
        assert!(
            again.version.get(ME) > first,
            "counter {} issued again after {first}",
            again.version.get(ME)
        );
        // And the folder's sequence keeps ahead of every counter issued.
        let meta = block_on(idx.ensure_folder(F)).unwrap();
        assert!(meta.max_sequence as u64 >= again.version.get(ME));
    }

    /// Regression (a sender replaced while its batch was in flight): the late, older
    /// batch arrived after the new sender's newer records and put an old version of a
    /// name back; the device would never send that name again.
    #[test]
    fn an_older_remote_record_arriving_late_does_not_replace_a_newer_one() {
        let idx = Index::open_in_memory().unwrap();
        let v1 = VersionVector::new().bump(0xBBBB);
        let old = remote("a", 1, 100, 1, v1.clone(), 3);
        let new = remote("a", 2, 200, 2, v1.bump(0xBBBB), 5);
        block_on(idx.apply_remote(F, dev(1), 5, vec![new.clone()])).unwrap();
        block_on(idx.apply_remote(F, dev(1), 5, vec![old])).unwrap();
        let g = block_on(idx.global_record(F, "a")).unwrap().unwrap();
        assert_eq!(g.version, new.version);
        assert_eq!(block_on(idx.remote_state(F, dev(1))).unwrap(), (5, 5));
        // A newer one still replaces it, and so does a full resend (new index ID).
        let newer = remote("a", 3, 300, 3, new.version.bump(0xBBBB), 9);
        block_on(idx.apply_remote(F, dev(1), 5, vec![newer.clone()])).unwrap();
        assert_eq!(
            block_on(idx.global_record(F, "a"))
                .unwrap()
                .unwrap()
                .version,
            newer.version
        );
        let rebuilt = remote("a", 4, 400, 4, newer.version.bump(0xBBBB), 1);
        block_on(idx.apply_remote(F, dev(1), 6, vec![rebuilt.clone()])).unwrap();
        assert_eq!(
            block_on(idx.global_record(F, "a"))
                .unwrap()
                .unwrap()
                .version,
            rebuilt.version
        );
    }

    #[test]
    fn local_snapshot_limits_to_a_prefix() {
        let idx = Index::open_in_memory().unwrap();
        commit(
            &idx,
            vec![
                change(dir("a")),
                change(dir("a/b")),
                change(file("a/b/c", 1, 1, 1)),
                change(file("a/bc", 1, 1, 1)),
                change(file("a/b0", 1, 1, 1)),
                change(file("z", 1, 1, 1)),
            ],
        );
        let snap = block_on(idx.local_snapshot(F, vec!["a/b/".into()])).unwrap();
        let names: Vec<_> = snap.iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["a/b", "a/b/c"]);
        // Two prefixes whose ranges interleave in name order come back sorted.
        let snap = block_on(idx.local_snapshot(F, vec!["z".into(), "a/b".into()])).unwrap();
        let names: Vec<_> = snap.iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["a/b", "a/b/c", "z"]);
        let all = block_on(idx.local_snapshot(F, vec![])).unwrap();
        assert_eq!(all.len(), 6);
        let names: Vec<_> = all.iter().map(|(n, _)| n).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(block_on(idx.local_snapshot("other", vec![]))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn newer_remote_is_needed_equal_is_not_and_concurrent_goes_to_the_winner() {
        let idx = Index::open_in_memory().unwrap();
        let mine = commit(&idx, vec![change(file("a", 10, 100, 1))]).remove(0);

        // Equal version: nothing to do.
        let equal = FileInfo {
            sequence: 1,
            ..mine.clone()
        };
        assert_eq!(
            block_on(idx.apply_remote(F, dev(1), 5, vec![equal])).unwrap(),
            0
        );
        let g = block_on(idx.global_record(F, "a")).unwrap().unwrap();
        assert_eq!(g.version, mine.version);

        // Newer: needed, from that device.
        let newer = remote("a", 20, 200, 2, mine.version.bump(0xBBBB), 2);
        assert_eq!(
            block_on(idx.apply_remote(F, dev(1), 5, vec![newer.clone()])).unwrap(),
            1
        );
        let need = block_on(idx.need_list(F, 10)).unwrap();
        assert_eq!(need.len(), 1);
        assert_eq!(need[0].global, newer);
        assert_eq!(need[0].local.as_ref().unwrap().version, mine.version);
        assert_eq!(need[0].devices, vec![dev(1)]);
        // A second device with the same version is a source too; a third with the old
        // one is not, and its blocks are not the global's.
        let same = FileInfo {
            sequence: 1,
            ..newer.clone()
        };
        let stale = FileInfo {
            sequence: 1,
            ..remote("a", 10, 100, 9, mine.version.clone(), 1)
        };
        block_on(idx.apply_remote(F, dev(3), 5, vec![stale])).unwrap();
        block_on(idx.apply_remote(F, dev(2), 5, vec![same])).unwrap();
        let need = block_on(idx.need_list(F, 10)).unwrap();
        assert_eq!(need.len(), 1);
        assert_eq!(need[0].global, newer);
        assert_eq!(need[0].local.as_ref().unwrap().blocks, mine.blocks);
        let mut sources = need[0].devices.clone();
        sources.sort_by_key(|d| d.0);
        assert_eq!(sources, vec![dev(1), dev(2)]);

        // Pulled: recorded with the global version, a new local sequence, no need.
        let stored = block_on(idx.commit_pulled(F, newer.clone(), 42)).unwrap();
        assert_eq!(stored.version, newer.version);
        assert_eq!(stored.sequence, 2);
        assert!(need_names(&idx).is_empty());
        assert_eq!(
            block_on(idx.get_local_with_inode(F, "a"))
                .unwrap()
                .unwrap()
                .1,
            42
        );
        assert_eq!(block_on(idx.find_block([2; 32])).unwrap().len(), 1);
        assert!(block_on(idx.find_block([1; 32])).unwrap().is_empty());

        // Concurrent, remote later mtime: the remote wins and is needed.
        let base = stored.version.clone();
        commit(&idx, vec![change(file("b", 1, 100, 3))]);
        let local_b = block_on(idx.get_local(F, "b")).unwrap().unwrap();
        let theirs = remote("b", 2, 500, 4, VersionVector::new().bump(0xBBBB), 3);
        block_on(idx.apply_remote(F, dev(1), 5, vec![theirs.clone()])).unwrap();
        assert_eq!(need_names(&idx), vec!["b"]);
        assert_eq!(
            block_on(idx.global_record(F, "b"))
                .unwrap()
                .unwrap()
                .version,
            theirs.version
        );

        // Concurrent, local later mtime: local wins, nothing needed.
        let older = remote("a", 5, 1, 5, base.bump(0xCCCC), 4);
        assert_eq!(older.version.compare(&base), VersionOrdering::Greater);
        commit(&idx, vec![change(file("a", 30, 900, 6))]);
        let mine_a = block_on(idx.get_local(F, "a")).unwrap().unwrap();
        assert_eq!(
            mine_a.version.compare(&older.version),
            VersionOrdering::Concurrent
        );
        block_on(idx.apply_remote(F, dev(2), 9, vec![older])).unwrap();
        assert_eq!(need_names(&idx), vec!["b"]);
        assert_eq!(
            block_on(idx.global_record(F, "a"))
                .unwrap()
                .unwrap()
                .version,
            mine_a.version
        );
        assert_ne!(local_b.version, theirs.version);
    }

    #[test]
    fn pulling_over_a_newer_local_record_is_refused() {
        let idx = Index::open_in_memory().unwrap();
        let v1 = commit(&idx, vec![change(file("a", 1, 1, 1))]).remove(0);
        commit(&idx, vec![change(file("a", 2, 2, 2))]);
        let stale = FileInfo { sequence: 1, ..v1 };
        assert!(block_on(idx.commit_pulled(F, stale, 0)).is_err());
        assert_eq!(block_on(idx.get_local(F, "a")).unwrap().unwrap().size, 2);
    }

    #[test]
    fn a_pulled_batch_takes_consecutive_sequences_and_skips_a_refused_file() {
        let idx = Index::open_in_memory().unwrap();
        // "b" has a newer local edit than the version that will be pulled for it.
        let v1 = commit(&idx, vec![change(file("b", 1, 1, 1))]).remove(0);
        commit(&idx, vec![change(file("b", 2, 2, 2))]);
        let start = block_on(idx.ensure_folder(F)).unwrap().max_sequence;
        let theirs =
            |name: &str, tag: u8| remote(name, 3, 3, tag, VersionVector::new().bump(0xBBBB), 1);
        let batch = vec![
            (theirs("a", 3), 1),
            (FileInfo { sequence: 1, ..v1 }, 2),
            (theirs("c", 4), 3),
        ];
        let out = block_on(idx.commit_pulled_batch(F, batch)).unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().unwrap().sequence, start + 1);
        assert!(out[1].is_err());
        assert_eq!(out[2].as_ref().unwrap().sequence, start + 2);
        // The folder's sequence follows the last record, and the next local change and
        // a peer asking for news see them in order.
        assert_eq!(
            block_on(idx.ensure_folder(F)).unwrap().max_sequence,
            start + 2
        );
        let next = commit(&idx, vec![change(file("d", 1, 1, 5))]).remove(0);
        assert_eq!(next.sequence, start + 3);
        let news: Vec<(String, i64)> = block_on(idx.local_since(F, start, 10))
            .unwrap()
            .into_iter()
            .map(|f| (f.name, f.sequence))
            .collect();
        assert_eq!(
            news,
            vec![
                ("a".to_string(), start + 1),
                ("c".to_string(), start + 2),
                ("d".to_string(), start + 3)
            ]
        );
        // The refused name kept its own newer record; four local files, none needed.
        assert_eq!(block_on(idx.get_local(F, "b")).unwrap().unwrap().size, 2);
        let c = block_on(idx.counts(F)).unwrap();
        assert_eq!((c.local_files, c.need_files), (4, 0));
    }

    #[test]
    fn deletions_are_needed_only_when_the_name_exists_here() {
        let idx = Index::open_in_memory().unwrap();
        let mine = commit(&idx, vec![change(file("a", 10, 1, 1))]).remove(0);
        let tomb = FileInfo {
            deleted: true,
            size: 0,
            blocks: Vec::new(),
            ..remote("a", 0, 2, 0, mine.version.bump(0xBBBB), 1)
        };
        // A remote deletion of a name we have: needed.
        block_on(idx.apply_remote(F, dev(1), 5, vec![tomb.clone()])).unwrap();
        let need = block_on(idx.need_list(F, 10)).unwrap();
        assert!(need[0].global.deleted);
        // A remote deletion of a name we never had: not needed.
        let other = FileInfo {
            name: "x".into(),
            sequence: 2,
            ..tomb.clone()
        };
        block_on(idx.apply_remote(F, dev(1), 5, vec![other])).unwrap();
        assert_eq!(need_names(&idx), vec!["a"]);
        // The puller deletes it: local tombstone at the global version, nothing needed.
        block_on(idx.commit_pulled(F, tomb, 0)).unwrap();
        assert!(need_names(&idx).is_empty());
        assert!(block_on(idx.find_block([1; 32])).unwrap().is_empty());
        let c = block_on(idx.counts(F)).unwrap();
        assert_eq!((c.local_files, c.global_files, c.need_files), (0, 0, 0));
    }

    #[test]
    fn a_scanned_file_that_is_exactly_a_remote_version_takes_that_version() {
        let idx = Index::open_in_memory().unwrap();
        let theirs = VersionVector::new().bump(0xBBBB);
        let r = remote("a", 10, 5, 5, theirs.clone(), 1);
        block_on(idx.apply_remote(F, dev(1), 5, vec![r])).unwrap();
        assert_eq!(need_names(&idx), vec!["a"]);
        // The pull put it in place but was killed before recording it; the scan finds it.
        let got = commit(&idx, vec![change(file("a", 10, 5, 5))]);
        assert_eq!(got[0].version, theirs, "no new version of this device");
        assert_eq!(got[0].modified_by, 0xBBBB);
        assert!(need_names(&idx).is_empty());
        // The same bytes with another mtime are an edit made here.
        let r = remote("b", 10, 5, 6, theirs.clone(), 2);
        block_on(idx.apply_remote(F, dev(1), 5, vec![r])).unwrap();
        let got = commit(&idx, vec![change(file("b", 10, 6, 6))]);
        assert_eq!(got[0].version.get(ME), got[0].sequence as u64);
        // A local version that already supersedes the remote one is not rolled back.
        let mine = commit(&idx, vec![change(file("a", 11, 7, 7))]).remove(0);
        assert!(mine.version.get(ME) > 0);
        let back = commit(&idx, vec![change(file("a", 10, 5, 5))]).remove(0);
        assert_eq!(
            back.version.compare(&mine.version),
            VersionOrdering::Greater
        );
    }

    /// The puller makes the parent directories of the files it pulls. When a pull pass
    /// reaches files before their directory's record (records that arrived while the pass
    /// was past the directories), the scan finds those directories first: they take the
    /// remote version, whatever their mtime, rather than a new one of this device.
    #[test]
    fn a_scanned_directory_like_the_remote_one_takes_its_version() {
        let idx = Index::open_in_memory().unwrap();
        let theirs = VersionVector::new().bump(0xBBBB);
        let r = FileInfo {
            version: theirs.clone(),
            sequence: 1,
            modified_by: 0xBBBB,
            mtime_ns: 111,
            ..dir("d")
        };
        block_on(idx.apply_remote(F, dev(1), 5, vec![r.clone()])).unwrap();
        assert_eq!(need_names(&idx), vec!["d"]);
        let got = commit(
            &idx,
            vec![change(FileInfo {
                mtime_ns: 999,
                ..dir("d")
            })],
        );
        assert_eq!(got[0].version, theirs, "no new version of this device");
        assert!(need_names(&idx).is_empty());
        // Another mode is a change made here.
        let r = FileInfo {
            name: "e".into(),
            ..r
        };
        block_on(idx.apply_remote(F, dev(1), 5, vec![r])).unwrap();
        let got = commit(
            &idx,
            vec![change(FileInfo {
                mode: 0o700,
                ..dir("e")
            })],
        );
        assert_eq!(got[0].version.get(ME), got[0].sequence as u64);
    }

    #[test]
    fn batch_lookups_answer_as_the_single_ones() {
        let idx = Index::open_in_memory().unwrap();
        commit(
            &idx,
            vec![change(file("a", 10, 1, 1)), change(file("b", 20, 1, 2))],
        );
        let names = vec!["a".to_string(), "b".into(), "missing".into()];
        let got = block_on(idx.get_locals_with_inode(F, names)).unwrap();
        assert_eq!(got.len(), 2);
        for n in ["a", "b"] {
            assert_eq!(
                Some(&got[n]),
                block_on(idx.get_local_with_inode(F, n)).unwrap().as_ref()
            );
        }
        let known = block_on(idx.known_blocks(vec![[1; 32], [2; 32], [3; 32]])).unwrap();
        assert_eq!(known, HashSet::from([[1; 32], [2; 32]]));
        assert!(
            block_on(idx.get_locals_with_inode("nope", vec!["a".into()]))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn ignored_deletions_are_not_needed_until_deletes_count_again() {
        let idx = Index::open_in_memory().unwrap();
        let mine = commit(&idx, vec![change(file("a", 10, 1, 1))]).remove(0);
        let tomb = FileInfo {
            deleted: true,
            size: 0,
            blocks: Vec::new(),
            ..remote("a", 0, 2, 0, mine.version.bump(0xBBBB), 1)
        };
        block_on(idx.set_ignore_delete(F, true)).unwrap();
        block_on(idx.apply_remote(F, dev(1), 5, vec![tomb.clone()])).unwrap();
        assert!(need_names(&idx).is_empty());
        assert_eq!(c_need(&idx), 0);
        // A remote edit is still needed where deletions are ignored.
        let edit = remote("b", 3, 3, 3, VersionVector::new().bump(0xBBBB), 2);
        block_on(idx.apply_remote(F, dev(1), 5, vec![edit])).unwrap();
        assert_eq!(need_names(&idx), vec!["b"]);
        // Setting it back makes the ignored deletion needed, and the totals follow.
        block_on(idx.set_ignore_delete(F, false)).unwrap();
        assert_eq!(need_names(&idx), vec!["b", "a"]);
        assert_eq!(c_need(&idx), 2);
        assert_eq!(counts_from_scratch(&idx).need_files, 2);
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn ignored_names_are_not_needed_and_rules_survive_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("index.db");
        let text = "*.log\ncache/\n".to_string();
        let rule = || -> Option<IgnoreRule> {
            Some(Arc::new(|n: &str, is_dir: bool| {
                n.ends_with(".log") || (n == "cache" && is_dir) || n.starts_with("cache/")
            }))
        };
        let idx = Index::open(&path).unwrap();
        let kept = commit(&idx, vec![change(file("keep.log", 4, 1, 1))]).remove(0);
        block_on(idx.set_ignores(F, text.clone(), rule())).unwrap();
        let v = VersionVector::new().bump(0xBBBB);
        let tomb = FileInfo {
            deleted: true,
            size: 0,
            blocks: Vec::new(),
            ..remote("keep.log", 0, 2, 0, kept.version.bump(0xBBBB), 1)
        };
        let recs = vec![
            tomb,
            remote("a.log", 5, 1, 2, v.clone(), 2),
            remote("a.txt", 6, 1, 3, v.clone(), 3),
            FileInfo {
                version: v.clone(),
                sequence: 4,
                modified_by: 0xBBBB,
                ..dir("cache")
            },
            remote("cache/x", 7, 1, 4, v.clone(), 5),
        ];
        block_on(idx.apply_remote(F, dev(1), 5, recs)).unwrap();
        // Neither the ignored new names nor the deletion of an ignored local file.
        assert_eq!(need_names(&idx), vec!["a.txt"]);
        assert_eq!(c_need(&idx), 1);
        assert_eq!(counts_from_scratch(&idx), block_on(idx.counts(F)).unwrap());
        block_on(idx.close()).unwrap();

        // After a restart, records that arrive before the rules are handed over again are
        // needed for a moment; the same rules put that right.
        let idx = Index::open(&path).unwrap();
        let late = remote("b.log", 8, 1, 5, v.clone(), 6);
        block_on(idx.apply_remote(F, dev(1), 5, vec![late])).unwrap();
        assert_eq!(sorted(need_names(&idx)), vec!["a.txt", "b.log"]);
        block_on(idx.set_ignores(F, text.clone(), rule())).unwrap();
        assert_eq!(need_names(&idx), vec!["a.txt"]);
        assert_eq!(counts_from_scratch(&idx), block_on(idx.counts(F)).unwrap());

        // No rules: everything is needed again, the deletion included.
        block_on(idx.set_ignores(F, String::new(), None)).unwrap();
        assert_eq!(
            sorted(need_names(&idx)),
            vec!["a.log", "a.txt", "b.log", "cache", "cache/x", "keep.log"]
        );
        assert_eq!(c_need(&idx), 6);
        assert_eq!(counts_from_scratch(&idx), block_on(idx.counts(F)).unwrap());

        // And new rules over names already needed take them out again.
        block_on(idx.set_ignores(F, text, rule())).unwrap();
        assert_eq!(need_names(&idx), vec!["a.txt"]);
        assert_eq!(counts_from_scratch(&idx), block_on(idx.counts(F)).unwrap());
    }

    #[test]
    fn a_new_index_id_drops_the_old_records() {
        let idx = Index::open_in_memory().unwrap();
        let v = VersionVector::new().bump(0xBBBB);
        let recs = vec![
            remote("a", 1, 1, 1, v.clone(), 1),
            remote("b", 1, 1, 2, v.clone(), 2),
        ];
        assert_eq!(block_on(idx.apply_remote(F, dev(1), 5, recs)).unwrap(), 2);
        assert_eq!(block_on(idx.remote_state(F, dev(1))).unwrap(), (5, 2));
        assert_eq!(block_on(idx.remote_state(F, dev(2))).unwrap(), (0, 0));

        let n = block_on(idx.apply_remote(F, dev(1), 6, vec![remote("c", 1, 1, 3, v, 1)])).unwrap();
        assert_eq!(n, 1);
        assert_eq!(need_names(&idx), vec!["c"]);
        assert_eq!(block_on(idx.remote_state(F, dev(1))).unwrap(), (6, 1));
        assert!(block_on(idx.global_record(F, "a")).unwrap().is_none());

        block_on(idx.forget_device(dev(1))).unwrap();
        assert!(need_names(&idx).is_empty());
        assert_eq!(block_on(idx.remote_state(F, dev(1))).unwrap(), (0, 0));
        assert_eq!(block_on(idx.counts(F)).unwrap(), FolderCounts::default());
    }

    #[test]
    fn local_since_pages_in_sequence_order() {
        let idx = Index::open_in_memory().unwrap();
        let changes = (0..25)
            .map(|i| change(file(&format!("f{i:02}"), 1, 1, 1)))
            .collect();
        commit(&idx, changes);
        commit(&idx, vec![change(file("f00", 2, 2, 2))]); // moves to the end
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let page = block_on(idx.local_since(F, after, 10)).unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 10);
            after = page.last().unwrap().sequence;
            seen.extend(page);
        }
        assert_eq!(seen.len(), 25);
        assert!(seen.windows(2).all(|w| w[0].sequence < w[1].sequence));
        assert_eq!(seen.last().unwrap().name, "f00");
        assert_eq!(seen.last().unwrap().sequence, 26);
    }

    #[test]
    fn find_block_finds_local_files_only() {
        let idx = Index::open_in_memory().unwrap();
        let mut f = file("big", 300, 1, 0);
        f.blocks = vec![block(0, 100, 1), block(100, 200, 2)];
        commit(&idx, vec![change(f)]);
        block_on(idx.commit_local_changes("other", ME, vec![change(file("copy", 200, 1, 2))]))
            .unwrap();
        let v = VersionVector::new().bump(0xBBBB);
        block_on(idx.apply_remote(F, dev(1), 5, vec![remote("r", 10, 1, 9, v, 1)])).unwrap();

        let mut at = block_on(idx.find_block([2; 32])).unwrap();
        at.sort_by(|a, b| a.folder.cmp(&b.folder));
        assert_eq!(
            at,
            vec![
                BlockLocation {
                    folder: F.into(),
                    name: "big".into(),
                    offset: 100,
                    size: 200
                },
                BlockLocation {
                    folder: "other".into(),
                    name: "copy".into(),
                    offset: 0,
                    size: 200
                },
            ]
        );
        assert!(block_on(idx.find_block([9; 32])).unwrap().is_empty());
        // Same first 8 bytes (the lookup key), different hash: no match.
        let mut near = [2u8; 32];
        near[31] = 3;
        assert!(block_on(idx.find_block(near)).unwrap().is_empty());
        block_on(idx.remove_folder("other")).unwrap();
        assert_eq!(block_on(idx.find_block([2; 32])).unwrap().len(), 1);
    }

    #[test]
    fn a_block_list_repeating_an_offset_is_stored_without_failing_the_batch() {
        let idx = Index::open_in_memory().unwrap();
        let mut f = file("twice", 200, 1, 0);
        f.blocks = vec![block(0, 100, 1), block(0, 100, 2), block(100, 100, 3)];
        let mut g = file("other", 100, 1, 0);
        g.blocks = vec![block(0, 100, 4)];
        let out = commit(&idx, vec![change(f.clone()), change(g)]);
        assert_eq!(out.len(), 2);
        // The first block at an offset is kept and a later one at that offset dropped;
        // the other blocks are all there.
        assert_eq!(block_on(idx.find_block([1; 32])).unwrap().len(), 1);
        assert!(block_on(idx.find_block([2; 32])).unwrap().is_empty());
        assert_eq!(block_on(idx.find_block([3; 32])).unwrap().len(), 1);
        assert_eq!(block_on(idx.find_block([4; 32])).unwrap().len(), 1);
        // Rewritten (a new version of the same name): the old block rows go first.
        f.mtime_ns += 1;
        f.blocks = vec![block(0, 100, 5), block(0, 100, 5), block(100, 100, 6)];
        assert_eq!(commit(&idx, vec![change(f)]).len(), 1);
        assert!(block_on(idx.find_block([1; 32])).unwrap().is_empty());
        assert_eq!(block_on(idx.find_block([5; 32])).unwrap().len(), 1);
    }

    #[test]
    fn need_list_orders_dirs_then_small_files_then_deepest_deletions() {
        let idx = Index::open_in_memory().unwrap();
        commit(
            &idx,
            vec![
                change(dir("old")),
                change(dir("old/sub")),
                change(file("old/sub/f", 1, 1, 1)),
            ],
        );
        let r = |name: &str, v: VersionVector, seq| FileInfo {
            version: v,
            sequence: seq,
            modified_by: 0xBBBB,
            ..file(name, 0, 1, 0)
        };
        let fresh = VersionVector::new().bump(0xBBBB);
        let mut recs = vec![
            FileInfo {
                kind: FileKind::Dir,
                blocks: vec![],
                ..r("n/deep", fresh.clone(), 1)
            },
            FileInfo {
                kind: FileKind::Dir,
                blocks: vec![],
                ..r("n", fresh.clone(), 2)
            },
            remote("big", 1000, 1, 1, fresh.clone(), 3),
            remote("small", 10, 1, 2, fresh.clone(), 4),
            remote("empty", 0, 1, 3, fresh.clone(), 5),
            FileInfo {
                kind: FileKind::Symlink,
                blocks: vec![],
                symlink_target: Some("small".into()),
                ..r("link", fresh.clone(), 6)
            },
        ];
        for (i, name) in ["old", "old/sub", "old/sub/f"].into_iter().enumerate() {
            let local = block_on(idx.get_local(F, name)).unwrap().unwrap();
            recs.push(FileInfo {
                deleted: true,
                size: 0,
                blocks: vec![],
                ..r(name, local.version.bump(0xBBBB), 7 + i as i64)
            });
        }
        block_on(idx.apply_remote(F, dev(1), 5, recs)).unwrap();
        assert_eq!(
            need_names(&idx),
            vec![
                "n",
                "n/deep",
                "empty",
                "link",
                "small",
                "big",
                "old/sub/f",
                "old/sub",
                "old"
            ]
        );
        let first2 = block_on(idx.need_list(F, 2)).unwrap();
        assert_eq!(first2.len(), 2);
        // Paging with cursors walks the same order.
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let page = block_on(idx.need_list_after(F, after, 2)).unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.cursor());
            paged.extend(page.into_iter().map(|n| n.global.name));
        }
        assert_eq!(paged, need_names(&idx));
    }

    #[test]
    fn held_count_changes_commit_with_their_write_and_roll_back_with_it() {
        let idx = Index::open_in_memory().unwrap();
        commit(&idx, vec![change(file("a", 300, 1, 1))]);
        let before = block_on(idx.counts(F)).unwrap();
        // A write that changes the totals, then fails: nothing of it stays.
        let failed = block_on(idx.write(|c| {
            let (fidx, _) = ensure_folder_row(c, F)?;
            add_counts(c, fidx, [5, 500, 0, 0, 0, 0])?;
            Err::<(), _>(Error::Invalid("fails after the change".into()))
        }));
        assert!(failed.is_err());
        assert_eq!(block_on(idx.counts(F)).unwrap(), before);
        // Or panics: the same.
        let panicked = block_on(idx.write(|c| -> Result<()> {
            let (fidx, _) = ensure_folder_row(c, F)?;
            add_counts(c, fidx, [7, 700, 0, 0, 0, 0])?;
            panic!("a bug in a write");
        }));
        assert!(panicked.is_err());
        assert_eq!(block_on(idx.counts(F)).unwrap(), before);
        // Changes read back inside their own write, and kept once it commits.
        let seen = block_on(idx.write(|c| {
            let (fidx, _) = ensure_folder_row(c, F)?;
            add_counts(c, fidx, [1, 10, 0, 0, 0, 0])?;
            add_counts(c, fidx, [1, 10, 0, 0, 0, 0])?;
            Ok(read_counts(c, fidx)?.local_files)
        }))
        .unwrap();
        assert_eq!(seen, before.local_files + 2);
        let after = block_on(idx.counts(F)).unwrap();
        assert_eq!(after.local_files, before.local_files + 2);
        assert_eq!(after.local_bytes, before.local_bytes + 20);
    }

    #[test]
    fn counts_and_device_completion() {
        let idx = Index::open_in_memory().unwrap();
        assert_eq!(block_on(idx.device_completion(F, dev(1))).unwrap(), 100.0);
        let out = commit(
            &idx,
            vec![
                change(file("a", 300, 1, 1)),
                change(file("b", 100, 1, 2)),
                change(file("e", 0, 1, 3)),
                change(file("gone", 5, 1, 4)),
            ],
        );
        commit(&idx, vec![gone("gone")]);
        let c = block_on(idx.counts(F)).unwrap();
        assert_eq!(
            c,
            FolderCounts {
                local_files: 3,
                local_bytes: 400,
                global_files: 3,
                global_bytes: 400,
                need_files: 0,
                need_bytes: 0
            }
        );
        // dev 1 has a and e at the global version and a b of its own that loses the
        // conflict with ours (an earlier mtime): (300 + 1) / (300 + 100 + 1).
        let old_b = FileInfo {
            version: VersionVector::new().bump(0xBBBB),
            mtime_ns: 0,
            modified_by: 0xBBBB,
            ..out[1].clone()
        };
        block_on(idx.apply_remote(F, dev(1), 5, vec![out[0].clone(), out[2].clone(), old_b]))
            .unwrap();
        let pct = block_on(idx.device_completion(F, dev(1))).unwrap();
        assert!((pct - 100.0 * 301.0 / 401.0).abs() < 1e-9, "{pct}");
        assert_eq!(c_need(&idx), 0);
        // A device we know nothing of has nothing.
        assert_eq!(block_on(idx.device_completion(F, dev(2))).unwrap(), 0.0);

        let newer = remote("n", 50, 1, 9, VersionVector::new().bump(0xCCCC), 1);
        block_on(idx.apply_remote(F, dev(2), 7, vec![newer])).unwrap();
        let c = block_on(idx.counts(F)).unwrap();
        assert_eq!((c.need_files, c.need_bytes), (1, 50));
        assert_eq!((c.global_files, c.global_bytes), (4, 450));
        // The memoised answers moved with the write: 300 + 100 + 1 + 50 in total.
        let pct = block_on(idx.device_completion(F, dev(2))).unwrap();
        assert!((pct - 100.0 * 50.0 / 451.0).abs() < 1e-9, "{pct}");
        let pct = block_on(idx.device_completion(F, dev(1))).unwrap();
        assert!((pct - 100.0 * 301.0 / 451.0).abs() < 1e-9, "{pct}");
        assert_eq!(c.local_files, 3);
    }

    fn c_need(idx: &Index) -> u64 {
        block_on(idx.counts(F)).unwrap().need_files
    }

    #[test]
    fn a_stopped_index_answers_stopped() {
        let idx = Index::open_in_memory().unwrap();
        let other = idx.clone();
        block_on(idx.close()).unwrap();
        assert!(matches!(
            block_on(other.ensure_folder(F)),
            Err(Error::Stopped)
        ));
        assert!(matches!(
            block_on(other.need_list(F, 1)),
            Err(Error::Stopped)
        ));
    }

    /// Every name's global, recomputed from scratch from all rows: what the incremental
    /// maintenance must always equal.
    fn globals_from_scratch(idx: &Index) -> Vec<(String, i64, Vec<u8>, bool)> {
        block_on(idx.call(|c| {
            let fidx = folder_row(c, F)?.map(|(i, _)| i).unwrap_or(-1);
            let names: Vec<String> = c
                .prepare("SELECT DISTINCT name FROM files WHERE folder = ?1 ORDER BY name")?
                .query_map(params![fidx], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut out = Vec::new();
            for name in names {
                let mut rows = Vec::new();
                for dev in 0..4 {
                    if let Some((f, _)) = get_row(c, fidx, &name, dev)? {
                        rows.push((dev, f));
                    }
                }
                let w = select_global(rows.iter().map(|(_, f)| f)).unwrap();
                let local = rows.iter().find(|(d, _)| *d == 0).map(|(_, f)| f);
                let need = needs(&rows[w].1, local);
                out.push((name, rows[w].0, rows[w].1.version.to_bytes(), need));
            }
            Ok(out)
        }))
        .unwrap()
    }

    /// The totals summed from the tables, as migration 2 does.
    /// A device's completion summed over the whole folder, as `device_completion` was
    /// computed before `0005_device_counts.sql`.
    fn completion_from_scratch(idx: &Index, device: DeviceId) -> f64 {
        block_on(idx.call(move |c| {
            let fidx = folder_row(c, F)?.map(|(i, _)| i).unwrap_or(-1);
            let dev = device_idx(c, &device, false)?.unwrap_or(-1);
            let (total, done): (i64, i64) = c.query_row(
                "SELECT \
                   COALESCE(SUM(CASE WHEN g.deleted = 0 THEN MAX(g.size, 1) \
                                     WHEN f.deleted = 0 THEN 1 ELSE 0 END), 0), \
                   COALESCE(SUM(CASE WHEN g.deleted = 0 AND f.version = g.version \
                                     THEN MAX(g.size, 1) ELSE 0 END), 0) \
                 FROM global g LEFT JOIN files f \
                   ON f.folder = g.folder AND f.name = g.name AND f.device = ?2 \
                 WHERE g.folder = ?1",
                params![fidx, dev],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            Ok(if total <= 0 {
                100.0
            } else {
                (done as f64 * 100.0 / total as f64).clamp(0.0, 100.0)
            })
        }))
        .unwrap()
    }

    fn counts_from_scratch(idx: &Index) -> FolderCounts {
        block_on(idx.call(|c| {
            let fidx = folder_row(c, F)?.map(|(i, _)| i).unwrap_or(-1);
            let pair = |sql: &str| -> rusqlite::Result<(u64, u64)> {
                c.query_row(sql, params![fidx], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })
            };
            let (local_files, local_bytes) = pair(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files \
                 WHERE folder = ?1 AND device = 0 AND deleted = 0 AND kind = 0",
            )?;
            let (global_files, global_bytes) = pair(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM global \
                 WHERE folder = ?1 AND deleted = 0 AND kind = 0",
            )?;
            let (need_files, need_bytes) = pair(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM global \
                 WHERE folder = ?1 AND need = 1",
            )?;
            Ok(FolderCounts {
                local_files,
                local_bytes,
                global_files,
                global_bytes,
                need_files,
                need_bytes,
            })
        }))
        .unwrap()
    }

    fn globals_stored(idx: &Index) -> Vec<(String, i64, Vec<u8>, bool)> {
        block_on(idx.call(|c| {
            Ok(
                c.prepare("SELECT name, device, version, need FROM global ORDER BY name")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect::<rusqlite::Result<_>>()?,
            )
        }))
        .unwrap()
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Local edit (or deletion) of name n with mtime t.
        Local { n: u8, t: i64, del: bool },
        /// Device d announces a version of name n: the current global bumped by d
        /// (`on_global`) or its own previous one bumped (possibly concurrent).
        Remote {
            d: u8,
            n: u8,
            t: i64,
            del: bool,
            on_global: bool,
        },
        /// The puller took the current global of name n.
        Pull { n: u8 },
        /// Device d rebuilt its database.
        Reset { d: u8 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4, 0i64..5, any::<bool>()).prop_map(|(n, t, del)| Op::Local { n, t, del }),
            (1u8..4, 0u8..4, 0i64..5, any::<bool>(), any::<bool>()).prop_map(
                |(d, n, t, del, on_global)| Op::Remote {
                    d,
                    n,
                    t,
                    del,
                    on_global
                }
            ),
            (0u8..4).prop_map(|n| Op::Pull { n }),
            (1u8..4).prop_map(|d| Op::Reset { d }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn incremental_global_equals_recomputed(ops in proptest::collection::vec(op(), 1..40)) {
            let idx = Index::open_in_memory().unwrap();
            let mut index_ids = [0u64, 1, 1, 1];
            let mut seqs = [0i64; 4];
            for op in ops {
                match op {
                    Op::Local { n, t, del } => {
                        let name = format!("f{n}");
                        let c = if del {
                            gone(&name)
                        } else if t == 4 {
                            change(dir(&name)) // kinds change too
                        } else {
                            change(file(&name, t as u64, t, t as u8))
                        };
                        commit(&idx, vec![c]);
                    }
                    Op::Remote { d, n, t, del, on_global } => {
                        let name = format!("f{n}");
                        let short = 0x1000 + d as u64;
                        let base = if on_global {
                            block_on(idx.global_record(F, &name)).unwrap().map(|g| g.version)
                        } else {
                            block_on(idx.call({
                                let name = name.clone();
                                move |c| {
                                    let fidx = folder_row(c, F)?.map(|(i, _)| i).unwrap_or(-1);
                                    let dv = device_idx(c, &dev(d), false)?.unwrap_or(-1);
                                    Ok(get_row(c, fidx, &name, dv)?.map(|(f, _)| f.version))
                                }
                            })).unwrap()
                        };
                        seqs[d as usize] += 1;
                        let mut r = remote(&name, t as u64, t, t as u8, base.unwrap_or_default().bump(short), seqs[d as usize]);
                        r.modified_by = short;
                        if del { r.deleted = true; r.size = 0; r.blocks.clear(); }
                        block_on(idx.apply_remote(F, dev(d), index_ids[d as usize], vec![r])).unwrap();
                    }
                    Op::Pull { n } => {
                        let name = format!("f{n}");
                        if let Some(g) = block_on(idx.global_record(F, &name)).unwrap() {
                            let _ = block_on(idx.commit_pulled(F, g, 1));
                        }
                    }
                    Op::Reset { d } => {
                        index_ids[d as usize] += 1;
                        seqs[d as usize] = 0;
                        block_on(idx.apply_remote(F, dev(d), index_ids[d as usize], vec![])).unwrap();
                    }
                }
                prop_assert_eq!(globals_stored(&idx), globals_from_scratch(&idx));
                prop_assert_eq!(block_on(idx.counts(F)).unwrap(), counts_from_scratch(&idx));
                for d in 1..=3 {
                    prop_assert_eq!(
                        block_on(idx.device_completion(F, dev(d))).unwrap(),
                        completion_from_scratch(&idx, dev(d))
                    );
                }
            }
            let counts = block_on(idx.counts(F)).unwrap();
            let stored = globals_stored(&idx);
            prop_assert_eq!(counts.need_files, stored.iter().filter(|g| g.3).count() as u64);
        }
    }
}
