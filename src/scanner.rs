//! The scanner: what is on disk now, compared with what the index last recorded.
//!
//! It is pure file system and hashing. It does not know the index: the caller hands it the
//! last-recorded metadata of each name ([`LocalMeta`](crate::types::LocalMeta), through
//! [`ScanRequest::known`]) and receives [`LocalChange`]s through a sink, in batches. The
//! index then gives each change its version and sequence.
//!
//! A scan has two phases:
//!
//! 1. **Walk** (one thread, `ignore`'s walker, never following symlinks): every entry costs
//!    a `readdir` slot and an `lstat`. An entry whose kind, size, mtime, mode and inode equal
//!    the recorded ones is unchanged and costs nothing more. Directories and symlinks that
//!    changed are complete after the walk; changed regular files are queued for hashing.
//!    Walking first gives the progress bar honest totals.
//! 2. **Hash** (a small pool of worker threads): each queued file is split into
//!    content-defined chunks ([FastCDC v2020](fastcdc::v2020), fixed [`CHUNK_MIN`],
//!    [`CHUNK_AVG`], [`CHUNK_MAX`]) and every chunk is hashed with BLAKE3. Finding cut
//!    points is the slowest step and is sequential, so for a large file one thread only cuts
//!    while a helper reads the next [`READ_BUF`]-sized buffers and hashes the chunks already
//!    cut: one big file also keeps two cores busy. Memory stays at a few buffers per file,
//!    whatever its size. Results are handed to the sink in walk order (a directory before its
//!    contents), then the deletions (contents before their directory).
//!
//! Measured on the 2-core dev machine (`cargo bench --bench scan`): 1 GiB costs ~0.9 CPU-s
//! to chunk and hash; a warm rescan of 100,000 unchanged files ~0.3 CPU-s.
//!
//! Safety rules that callers rely on:
//! - A file that changed while it was being hashed (size, mtime or inode differ after
//!   hashing from what the walk saw, or a different number of bytes was read) is not
//!   reported; its name goes to [`ScanStats::retry_later`].
//! - A name is reported deleted only if it is absent from disk. Names under a directory that
//!   could not be read, names that are now ignored and names whose file could not be opened
//!   are never reported deleted, so an unreadable or newly ignored subtree does not turn into
//!   a mass deletion on the peers.
//! - A missing folder root is an error, never "everything was deleted".
//!
//! Directories are compared by kind and mode only: a directory's mtime changes whenever an
//! entry is added or removed, which is already reported through that entry.

use std::collections::BTreeMap;
use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use crate::error::{Error, IoContext, Result};
use crate::ignore::Ignores;
use crate::types::{Block, FileInfo, FileKind, Known, LocalChange, VersionVector};

/// FastCDC v2020 minimum chunk size. The chunk parameters are part of the index format:
/// identical content must give identical chunks on every device. Never change them silently.
pub const CHUNK_MIN: u32 = 64 * 1024;
/// FastCDC v2020 average (target) chunk size.
pub const CHUNK_AVG: u32 = 256 * 1024;
/// FastCDC v2020 maximum chunk size.
pub const CHUNK_MAX: u32 = 1024 * 1024;

/// Size of one read buffer. Must be at least twice [`CHUNK_MAX`] so a buffer always holds a
/// whole maximal chunk after the unfinished tail of the previous one. 4 MiB keeps the
/// pipelined hasher at three buffers (15 MiB with their headroom) per large file.
pub const READ_BUF: usize = 4 << 20;
/// Files at least this large are cut on one thread while a helper reads and hashes (two
/// cores for one file); smaller ones are not worth a thread.
const PIPELINE_MIN: u64 = 8 << 20;
/// Buffers per pipelined file: about one being cut, one being hashed, one being read.
const PIPELINE_BUFFERS: usize = 3;
/// Largest batch handed to the sink.
pub const BATCH_MAX: usize = 1000;
/// The walk hands what it found to the hashers and the sink whenever this many entries
/// wait, so a scan that finds a million new files never holds them all.
const PENDING_MAX: usize = if cfg!(test) { 64 } else { 16 * 1024 };
/// How far hashing may run ahead of the in-order emission (in files): bounds the memory of
/// finished-but-not-yet-emitted results while a big file earlier in the order is hashed.
const HASH_WINDOW: usize = 1024;
/// At most this many hashing threads, whatever the core count: more mostly costs memory.
const MAX_WORKERS: usize = 4;
/// Progress callbacks are rate-limited to one per this interval (plus a final one).
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// What to scan and what the index recorded for it.
pub struct ScanRequest<'a> {
    /// The folder root on disk.
    pub root: &'a Path,
    /// Relative names ("a/b.txt") whose subtree to scan; empty = the whole folder. The name
    /// `""` also means the whole folder. Overlapping names are scanned once.
    pub subpaths: Vec<String>,
    /// What the index recorded for this folder (or the subtree): name -> LocalMeta.
    pub known: &'a Known,
    pub ignores: &'a Ignores,
    /// Called at most every 100 ms while scanning, and once at the end.
    pub progress: Option<&'a (dyn Fn(ScanProgress) + Sync)>,
}

/// Where a scan is. Totals count the files that need hashing (known after the walk).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanProgress {
    pub files_done: u64,
    pub bytes_done: u64,
    pub files_total: u64,
    pub bytes_total: u64,
}

/// Totals of one scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// Regular files seen on disk (changed or not), and their bytes.
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    /// Files read and chunked, and their bytes.
    pub hashed_files: u64,
    pub hashed_bytes: u64,
    /// Changes reported (new, modified, kind or permission changes), deletions excluded.
    pub changed: u64,
    /// Deletions reported.
    pub deleted: u64,
    /// Names that changed while being read or vanished mid-scan: scan them again shortly.
    pub retry_later: Vec<String>,
}

/// Chunks one file with FastCDC v2020 and BLAKE3-hashes each chunk, streaming: at most a few
/// [`READ_BUF`] buffers are in memory, whatever the file size. An empty file has no blocks.
pub fn hash_file(path: &Path) -> Result<Vec<Block>> {
    let file = File::open(path).at(path)?;
    let size = file.metadata().at(path)?.len();
    advise_sequential(&file, size);
    let mut buf = Vec::new();
    let (blocks, _) = hash_reader(file, size, &mut buf, None).at(path)?;
    Ok(blocks)
}

/// Same as [`hash_file`], over an in-memory buffer.
pub fn hash_bytes(data: &[u8]) -> Vec<Block> {
    fastcdc::v2020::FastCDC::new(data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
        .map(|c| Block {
            offset: c.offset as u64,
            size: c.length as u32,
            hash: *blake3::hash(&data[c.offset..c.offset + c.length]).as_bytes(),
        })
        .collect()
}

/// mtime in nanoseconds since the epoch, permission bits (`mode & 0o7777`) and inode of an
/// entry, from its (l)stat metadata.
pub fn metadata_of(path: &Path, meta: &Metadata) -> (i64, u32, u64) {
    #[cfg(unix)]
    {
        let _ = path;
        use std::os::unix::fs::MetadataExt;
        let mtime = meta.mtime().saturating_mul(1_000_000_000) + meta.mtime_nsec();
        (mtime, meta.mode() & 0o7777, meta.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let mode = if meta.is_dir() {
            0o755
        } else if meta.permissions().readonly() {
            0o444
        } else {
            0o644
        };
        (mtime, mode, 0)
    }
}

/// Walks, stats, chunks and hashes what changed, and calls `sink` with batches (at most
/// [`BATCH_MAX`]) of changes in walk order (directories before their contents), then with
/// the deletions: names in `known`, within the scanned subpaths, not found on disk and not
/// already deleted (contents before their directory). An error from `sink` stops the scan
/// and is returned.
pub fn scan(
    req: &ScanRequest,
    sink: &mut dyn FnMut(Vec<LocalChange>) -> Result<()>,
) -> Result<ScanStats> {
    let root_meta = std::fs::metadata(req.root).at(req.root)?;
    if !root_meta.is_dir() {
        return Err(Error::io(
            req.root,
            io::Error::new(
                io::ErrorKind::NotADirectory,
                "folder root is not a directory",
            ),
        ));
    }
    let subpaths = normalize_subpaths(&req.subpaths)?;

    let mut walk = Walker {
        req,
        sink,
        seen: vec![0; req.known.len().div_ceil(64)],
        hint: 0,
        flushed: (0, 0),
        batch: Vec::new(),
        unreadable: Vec::new(),
        pending: Vec::new(),
        jobs: Vec::new(),
        stats: ScanStats::default(),
    };
    match &subpaths {
        None => walk.walk_dir(req.root, "")?,
        Some(list) => {
            for sp in list {
                walk.scan_subpath(sp)?;
            }
        }
    }

    walk.flush()?;
    let Walker {
        seen,
        unreadable,
        mut stats,
        sink,
        batch,
        ..
    } = walk;
    if !batch.is_empty() {
        sink(batch)?;
    }

    // Deletions: known, in scope, not seen, not already a tombstone, not now ignored, not
    // under something we could not read.
    let in_scope = |name: &str| match &subpaths {
        None => true,
        Some(list) => under_any(name, list),
    };
    let known = req.known;
    // Reverse name order puts "a/b" before "a": contents before their directory.
    let gone = (0..known.len()).rev().filter(|&i| {
        let (name, meta) = (known.name(i), known.meta(i));
        !meta.deleted
            && seen[i / 64] & (1 << (i % 64)) == 0
            && in_scope(name)
            && !req.ignores.is_ignored(name, meta.kind == FileKind::Dir)
            && !under_any_path(name, &unreadable)
    });
    let mut batch = Vec::new();
    for i in gone {
        let (name, meta) = (known.name(i), known.meta(i));
        batch.push(LocalChange {
            file: FileInfo {
                name: name.to_string(),
                kind: meta.kind,
                size: 0,
                mtime_ns: meta.mtime_ns,
                mode: meta.mode,
                deleted: true,
                version: VersionVector::new(),
                sequence: 0,
                modified_by: 0,
                blocks: Vec::new(),
                symlink_target: None,
            },
            inode: 0,
        });
        stats.deleted += 1;
        if batch.len() == BATCH_MAX {
            sink(std::mem::take(&mut batch))?;
        }
    }
    if !batch.is_empty() {
        sink(batch)?;
    }
    Ok(stats)
}

/// One entry found by the walk that needs reporting.
enum Pending {
    /// Complete already (directory, symlink).
    Ready(LocalChange),
    /// A regular file whose blocks come from the next [`HashJob`] in order.
    Hash(LocalChange),
}

/// What a hash worker needs: where the file is and what the walk saw (to detect a change
/// while hashing). Kept apart from [`Pending`] so the workers borrow only this.
struct HashJob {
    path: PathBuf,
    size: u64,
    mtime_ns: i64,
    inode: u64,
}

/// Phase one: the walk. Owns what the walk learns, and hands it on to phase two
/// ([`emit_changes`]) every [`PENDING_MAX`] entries and at the end.
struct Walker<'a> {
    req: &'a ScanRequest<'a>,
    sink: &'a mut dyn FnMut(Vec<LocalChange>) -> Result<()>,
    /// One bit per `known` position: the name exists on disk.
    seen: Vec<u64>,
    /// Where in `known` the next name of the walk probably is.
    hint: usize,
    /// Files and bytes handed to the hashers so far (for progress totals).
    flushed: (u64, u64),
    /// Changes hashed but not yet handed to the sink (fewer than [`BATCH_MAX`]).
    batch: Vec<LocalChange>,
    /// Names (relative, NFC) of directories or entries that could not be read: nothing
    /// under them is reported deleted.
    unreadable: Vec<String>,
    pending: Vec<Pending>,
    jobs: Vec<HashJob>,
    stats: ScanStats,
}

impl<'a> Walker<'a> {
    /// Scans one subpath: resolves it on disk (without following symlinks, matching
    /// non-NFC names on disk), then handles the entry itself and, for a directory, its tree.
    fn scan_subpath(&mut self, name: &str) -> Result<()> {
        // Checked as a file first; a dir-only pattern is checked once the kind is known.
        if self.req.ignores.is_ignored(name, false) {
            return Ok(());
        }
        let path = match resolve_on_disk(self.req.root, name) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()), // gone: deletions will say so
            Err(e) => {
                tracing::warn!("{}: cannot scan {name}: {e}", self.req.root.display());
                self.unreadable.push(name.to_string());
                return Ok(());
            }
        };
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                tracing::warn!("{}: {e}", path.display());
                self.unreadable.push(name.to_string());
                return Ok(());
            }
        };
        if meta.is_dir() {
            if self.req.ignores.is_ignored(name, true) {
                return Ok(());
            }
            self.walk_dir(&path, name)
        } else {
            self.visit(path, name.to_string(), &meta);
            Ok(())
        }
    }

    /// Walks the directory `dir` (whose relative name is `dir_name`, "" for the root),
    /// including `dir` itself unless it is the root.
    fn walk_dir(&mut self, dir: &Path, dir_name: &str) -> Result<()> {
        let root = self.req.root.to_path_buf();
        let ignores = self.req.ignores.clone();
        let mut builder = ::ignore::WalkBuilder::new(dir);
        builder
            .standard_filters(false)
            .hidden(false)
            .parents(false)
            .ignore(false)
            .git_ignore(false)
            .git_global(false)
            .git_exclude(false)
            .require_git(false)
            .follow_links(false)
            .same_file_system(false)
            .sort_by_file_name(|a, b| a.cmp(b))
            .filter_entry(move |e| {
                if e.depth() == 0 {
                    return true; // the walk's start: the root, or a subpath checked already
                }
                let Some(base) = e.file_name().to_str() else {
                    tracing::warn!(
                        "{}: skipping a name that is not valid UTF-8",
                        e.path().display()
                    );
                    return false;
                };
                if base.starts_with(crate::ignore::TEMP_PREFIX) {
                    return false;
                }
                if !ignores.has_patterns() {
                    // Fast path: only `.ferry` at the root remains to check.
                    return !(base == crate::ignore::FERRY_DIR
                        && e.path().parent() == Some(root.as_path()));
                }
                let is_dir = e.file_type().is_some_and(|t| t.is_dir());
                match relative_name(&root, e.path()) {
                    RelName::Root => true,
                    RelName::Name(n) => !ignores.is_ignored_entry(&n, is_dir),
                    RelName::NotUtf8 => {
                        tracing::warn!(
                            "{}: skipping a name that is not valid UTF-8",
                            e.path().display()
                        );
                        false
                    }
                }
            });
        for entry in builder.build() {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    self.walk_error(dir_name, e);
                    continue;
                }
            };
            let name = match relative_name(self.req.root, entry.path()) {
                RelName::Root => continue,
                RelName::Name(n) => n,
                RelName::NotUtf8 => continue, // warned by the filter
            };
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) => {
                    if !is_not_found(&e) {
                        tracing::warn!("{}: {e}", entry.path().display());
                        self.unreadable.push(name);
                    }
                    continue;
                }
            };
            if name_is_duplicate(entry.path(), &name) {
                tracing::warn!(
                    "{}: skipping: another entry in the same directory has the same name in \
                     Unicode NFC form",
                    entry.path().display()
                );
                self.unreadable.push(name);
                continue;
            }
            self.visit(entry.into_path(), name, &meta);
            if self.pending.len() >= PENDING_MAX {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Hashes what the walk queued and hands it to the sink, in walk order.
    fn flush(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let jobs = std::mem::take(&mut self.jobs);
        let files = jobs.len() as u64;
        let bytes: u64 = jobs.iter().map(|j| j.size).sum();
        emit_changes(
            self.req,
            pending,
            jobs,
            self.flushed,
            &mut self.stats,
            &mut self.batch,
            &mut *self.sink,
        )?;
        self.flushed = (self.flushed.0 + files, self.flushed.1 + bytes);
        Ok(())
    }

    /// A walk error: log it, and protect whatever is under the failing path from being
    /// reported deleted. An error without a path protects the whole walked directory.
    fn walk_error(&mut self, dir_name: &str, e: ::ignore::Error) {
        let path = error_path(&e);
        if is_not_found(&e) {
            return; // vanished while walking: it is gone, deletions will say so
        }
        tracing::warn!("{}: scan: {e}", self.req.root.display());
        let protected = path
            .and_then(|p| match relative_name(self.req.root, p) {
                RelName::Name(n) => Some(n),
                RelName::Root => Some(String::new()),
                RelName::NotUtf8 => None,
            })
            .unwrap_or_else(|| dir_name.to_string());
        self.unreadable.push(protected);
    }

    /// One entry on disk: compare with `known`, queue what changed.
    fn visit(&mut self, path: PathBuf, name: String, meta: &Metadata) {
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            FileKind::Dir
        } else if ft.is_symlink() {
            FileKind::Symlink
        } else if ft.is_file() {
            FileKind::File
        } else {
            tracing::debug!("{}: skipping special file", path.display());
            return;
        };
        let (mtime_ns, mode, inode) = metadata_of(&path, meta);
        let size = if kind == FileKind::File {
            meta.len()
        } else {
            0
        };
        match kind {
            FileKind::File => {
                self.stats.files += 1;
                self.stats.bytes += size;
            }
            FileKind::Dir => self.stats.dirs += 1,
            FileKind::Symlink => {}
        }

        let known = self.req.known.position_near(&name, self.hint).map(|i| {
            self.seen[i / 64] |= 1 << (i % 64);
            self.hint = i + 1;
            self.req.known.meta(i)
        });
        if let Some(old) = known {
            let unchanged = !old.deleted
                && old.kind == kind
                && old.mode == mode
                && match kind {
                    FileKind::Dir => true,
                    // A symlink is retargeted by replacing it: new inode and mtime.
                    FileKind::File | FileKind::Symlink => {
                        old.size == size
                            && old.mtime_ns == mtime_ns
                            && (old.inode == 0 || old.inode == inode)
                    }
                };
            if unchanged {
                return;
            }
        }

        let mut file = FileInfo {
            name,
            kind,
            size,
            mtime_ns,
            mode,
            deleted: false,
            version: VersionVector::new(),
            sequence: 0,
            modified_by: 0,
            blocks: Vec::new(),
            symlink_target: None,
        };
        match kind {
            FileKind::Dir => self
                .pending
                .push(Pending::Ready(LocalChange { file, inode })),
            FileKind::Symlink => match std::fs::read_link(&path) {
                Ok(target) => match target.to_str() {
                    Some(t) => {
                        file.symlink_target = Some(t.to_string());
                        self.pending
                            .push(Pending::Ready(LocalChange { file, inode }));
                    }
                    None => {
                        tracing::warn!(
                            "{}: skipping symlink whose target is not valid UTF-8",
                            path.display()
                        );
                        self.unreadable.push(file.name);
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!("{}: {e}", path.display());
                    self.unreadable.push(file.name);
                }
            },
            FileKind::File => {
                self.jobs.push(HashJob {
                    path,
                    size,
                    mtime_ns,
                    inode,
                });
                self.pending
                    .push(Pending::Hash(LocalChange { file, inode }));
            }
        }
    }
}

/// What a hash worker found for one file.
enum Outcome {
    Hashed(Vec<Block>, u64),
    /// Changed while being read, or vanished: scan again later.
    Retry,
    /// Could not be read (logged): neither reported nor deleted.
    Failed,
}

/// Phase two: hash the queued files on a worker pool and hand every change to the sink in
/// walk order, in batches of [`BATCH_MAX`]; a batch not yet full stays in `batch` for the
/// next call.
fn emit_changes(
    req: &ScanRequest,
    pending: Vec<Pending>,
    jobs: Vec<HashJob>,
    (files_before, bytes_before): (u64, u64),
    stats: &mut ScanStats,
    batch: &mut Vec<LocalChange>,
    sink: &mut dyn FnMut(Vec<LocalChange>) -> Result<()>,
) -> Result<()> {
    let files_total = files_before + jobs.len() as u64;
    let bytes_total: u64 = bytes_before + jobs.iter().map(|j| j.size).sum::<u64>();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, MAX_WORKERS)
        .min(jobs.len().max(1));

    let next_job = AtomicUsize::new(0);
    let emitted_jobs = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let bytes_done = AtomicU64::new(0);
    let progress = req.progress;
    let mut files_done = files_before;
    let mut last_progress = Instant::now();
    let report = |files_done: u64, force: bool, last: &mut Instant| {
        if let Some(p) = progress {
            if force || last.elapsed() >= PROGRESS_EVERY {
                *last = Instant::now();
                p(ScanProgress {
                    files_done,
                    bytes_done: (bytes_before + bytes_done.load(Ordering::Relaxed))
                        .min(bytes_total),
                    files_total,
                    bytes_total,
                });
            }
        }
    };

    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = mpsc::channel::<(usize, Outcome)>();
        if !jobs.is_empty() {
            for _ in 0..workers {
                let tx = tx.clone();
                let jobs = &jobs;
                let (next_job, emitted_jobs, stop, bytes_done) =
                    (&next_job, &emitted_jobs, &stop, &bytes_done);
                s.spawn(move || {
                    let mut buf = Vec::new();
                    loop {
                        let j = next_job.fetch_add(1, Ordering::Relaxed);
                        if j >= jobs.len() {
                            break;
                        }
                        // Stay within the window ahead of the emitter.
                        while j >= emitted_jobs.load(Ordering::Acquire) + HASH_WINDOW {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let outcome = hash_one(&jobs[j], &mut buf, bytes_done);
                        if tx.send((j, outcome)).is_err() {
                            return;
                        }
                    }
                });
            }
        }
        drop(tx);

        let result = (|| -> Result<()> {
            let mut done: BTreeMap<usize, Outcome> = BTreeMap::new();
            let mut job = 0usize;
            for p in pending {
                let change = match p {
                    Pending::Ready(c) => Some(c),
                    Pending::Hash(mut change) => {
                        let outcome = loop {
                            if let Some(o) = done.remove(&job) {
                                break o;
                            }
                            match rx.recv_timeout(PROGRESS_EVERY) {
                                Ok((j, o)) => {
                                    done.insert(j, o);
                                }
                                Err(mpsc::RecvTimeoutError::Timeout) => {
                                    report(files_done, false, &mut last_progress);
                                }
                                Err(mpsc::RecvTimeoutError::Disconnected) => {
                                    return Err(Error::Invalid(
                                        "scanner: a hashing thread stopped unexpectedly".into(),
                                    ));
                                }
                            }
                        };
                        job += 1;
                        emitted_jobs.store(job, Ordering::Release);
                        files_done += 1;
                        match outcome {
                            Outcome::Hashed(blocks, n) => {
                                stats.hashed_files += 1;
                                stats.hashed_bytes += n;
                                change.file.blocks = blocks;
                                Some(change)
                            }
                            Outcome::Retry => {
                                stats.retry_later.push(change.file.name);
                                None
                            }
                            Outcome::Failed => None,
                        }
                    }
                };
                if let Some(c) = change {
                    stats.changed += 1;
                    batch.push(c);
                    if batch.len() == BATCH_MAX {
                        sink(std::mem::take(batch))?;
                    }
                }
                report(files_done, false, &mut last_progress);
            }
            Ok(())
        })();
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        drop(rx);
        result
    })?;
    report(files_done, true, &mut last_progress);
    Ok(())
}

/// Hashes one queued file and checks that it did not change meanwhile.
fn hash_one(job: &HashJob, buf: &mut Vec<u8>, progress: &AtomicU64) -> Outcome {
    let path = &job.path;
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Outcome::Retry,
        Err(e) => {
            tracing::warn!("{}: cannot read: {e}", path.display());
            return Outcome::Failed;
        }
    };
    advise_sequential(&file, job.size);
    let (blocks, n) = match hash_reader(file, job.size, buf, Some(progress)) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("{}: cannot read: {e}", path.display());
            return Outcome::Failed;
        }
    };
    // The stat after hashing must match the walk's: otherwise the content we hashed may be
    // a mix of old and new data.
    match std::fs::symlink_metadata(path) {
        Ok(after) => {
            let (mtime_ns, _, inode) = metadata_of(path, &after);
            if !after.is_file()
                || after.len() != job.size
                || n != job.size
                || mtime_ns != job.mtime_ns
                || inode != job.inode
            {
                return Outcome::Retry;
            }
        }
        Err(_) => return Outcome::Retry,
    }
    Outcome::Hashed(blocks, n)
}

/// Chunks and hashes everything `r` yields. Returns the blocks and the number of bytes read.
/// `size_hint` (the stat size) chooses between hashing in line and the two-thread pipeline;
/// `buf` is a reusable read buffer (grown to [`READ_BUF`] on first use).
fn hash_reader<R: Read + Send>(
    r: R,
    size_hint: u64,
    buf: &mut Vec<u8>,
    progress: Option<&AtomicU64>,
) -> io::Result<(Vec<Block>, u64)> {
    if size_hint >= PIPELINE_MIN {
        return hash_reader_pipelined(r, size_hint, progress);
    }
    if buf.len() < READ_BUF {
        // Zeroed by the OS on first touch: reading small files only touches a few pages.
        *buf = vec![0u8; READ_BUF];
    }
    let mut blocks = Vec::new();
    let mut chunker = Chunker::new(r);
    while chunker.fill(buf)? {
        let cuts = chunker.cut(buf);
        let base = chunker.base;
        for (start, len) in cuts {
            blocks.push(Block {
                offset: base + start as u64,
                size: len as u32,
                hash: *blake3::hash(&buf[start..start + len]).as_bytes(),
            });
        }
        if let Some(p) = progress {
            p.fetch_add(chunker.consumed() as u64, Ordering::Relaxed);
        }
        chunker.shift(buf);
    }
    Ok((blocks, chunker.total))
}

/// The two-thread variant for large files. Finding cut points is the slowest step and is
/// inherently sequential, so this thread does only that; a helper thread reads the next
/// buffers and hashes the chunks already cut. Each buffer keeps [`CHUNK_MAX`] bytes of
/// headroom in front of its data, where the unfinished tail of the previous buffer is copied
/// so that every cut sees contiguous data. Memory: [`PIPELINE_BUFFERS`] buffers.
fn hash_reader_pipelined<R: Read + Send>(
    mut r: R,
    size_hint: u64,
    progress: Option<&AtomicU64>,
) -> io::Result<(Vec<Block>, u64)> {
    const HEAD: usize = CHUNK_MAX as usize;
    /// A buffer whose data is `buf[HEAD..HEAD + n]`; `eof` when the stream ended there.
    struct Filled {
        buf: Vec<u8>,
        n: usize,
        eof: bool,
    }
    /// A buffer and its chunks: `(position in buf, length, stream offset)`.
    struct Cut {
        buf: Vec<u8>,
        cuts: Vec<(usize, usize, u64)>,
    }
    let (filled_tx, filled_rx) = mpsc::sync_channel::<io::Result<Filled>>(PIPELINE_BUFFERS);
    let (cut_tx, cut_rx) = mpsc::sync_channel::<Cut>(PIPELINE_BUFFERS);

    std::thread::scope(|s| {
        let helper = s.spawn(move || {
            let mut blocks = Vec::with_capacity((size_hint / CHUNK_AVG as u64 + 16) as usize);
            let mut total = 0u64;
            let mut eof = false;
            // Fills `buf[HEAD..]` and hands it to the cutter; false once nothing more will come.
            let mut refill = |mut buf: Vec<u8>, eof: &mut bool, total: &mut u64| -> bool {
                let mut n = 0;
                let mut err = None;
                while HEAD + n < buf.len() {
                    match r.read(&mut buf[HEAD + n..]) {
                        Ok(0) => {
                            *eof = true;
                            break;
                        }
                        Ok(k) => n += k,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                *total += n as u64;
                let msg = match err {
                    Some(e) => {
                        *eof = true;
                        Err(e)
                    }
                    None => Ok(Filled { buf, n, eof: *eof }),
                };
                filled_tx.send(msg).is_ok() && !*eof
            };
            let mut reading = true;
            for _ in 0..PIPELINE_BUFFERS {
                if !reading {
                    break;
                }
                reading = refill(vec![0u8; HEAD + READ_BUF], &mut eof, &mut total);
            }
            for cut in cut_rx {
                let mut n = 0;
                for &(pos, len, offset) in &cut.cuts {
                    blocks.push(Block {
                        offset,
                        size: len as u32,
                        hash: *blake3::hash(&cut.buf[pos..pos + len]).as_bytes(),
                    });
                    n += len;
                }
                if let Some(p) = progress {
                    p.fetch_add(n as u64, Ordering::Relaxed);
                }
                if reading {
                    reading = refill(cut.buf, &mut eof, &mut total);
                }
            }
            (blocks, total)
        });

        // This thread: find the cut points, buffer after buffer. The closure is called in
        // place so its channel ends drop when it returns: that is what ends the helper.
        let cut_result = (move || -> io::Result<()> {
            let stopped = || io::Error::other("reading thread stopped");
            let first = filled_rx.recv().map_err(|_| stopped())??;
            let (mut cur, mut start, mut end, mut eof) =
                (first.buf, HEAD, HEAD + first.n, first.eof);
            // Stream offset of `cur[start]`.
            let mut offset = 0u64;
            loop {
                let cdc =
                    fastcdc::v2020::FastCDC::new(&cur[..end], CHUNK_MIN, CHUNK_AVG, CHUNK_MAX);
                let mut cuts = Vec::with_capacity((end - start) / CHUNK_AVG as usize + 2);
                let mut pos = start;
                while pos < end && (eof || end - pos >= CHUNK_MAX as usize) {
                    let (_, e) = cdc.cut(pos, end - pos);
                    cuts.push((pos, e - pos, offset + (pos - start) as u64));
                    pos = e;
                }
                if eof {
                    let _ = cut_tx.send(Cut { buf: cur, cuts });
                    return Ok(());
                }
                let mut next = filled_rx.recv().map_err(|_| stopped())??;
                // The unfinished tail (< CHUNK_MAX bytes) goes in front of the next data.
                let tail = end - pos;
                let next_start = HEAD - tail;
                next.buf[next_start..HEAD].copy_from_slice(&cur[pos..end]);
                offset += (pos - start) as u64;
                cut_tx.send(Cut { buf: cur, cuts }).map_err(|_| stopped())?;
                (cur, start, end, eof) = (next.buf, next_start, HEAD + next.n, next.eof);
            }
        })();
        let (blocks, total) = helper
            .join()
            .map_err(|_| io::Error::other("hashing thread panicked"))?;
        cut_result?;
        Ok((blocks, total))
    })
}

/// Tells the kernel a large file will be read front to back (bigger read-ahead).
fn advise_sequential(f: &File, size: u64) {
    #[cfg(target_os = "linux")]
    if size >= PIPELINE_MIN {
        crate::fsutil::fadvise(f, 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (f, size);
}

/// Finds FastCDC cut points over a stream read into a sliding buffer. Gives exactly the
/// chunks of `FastCDC::new(whole_stream)`: a cut is only searched where at least
/// [`CHUNK_MAX`] bytes are buffered (FastCDC never looks further) or at end of stream.
struct Chunker<R> {
    r: R,
    /// Bytes valid at the start of the buffer.
    len: usize,
    /// Bytes of the buffer already cut into chunks.
    pos: usize,
    /// Stream offset of the buffer's first byte.
    base: u64,
    /// Bytes read from the stream so far.
    total: u64,
    eof: bool,
}

impl<R: Read> Chunker<R> {
    fn new(r: R) -> Self {
        Chunker {
            r,
            len: 0,
            pos: 0,
            base: 0,
            total: 0,
            eof: false,
        }
    }

    /// Reads until the buffer is full or the stream ends. False when nothing is left to cut.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        debug_assert!(buf.len() >= 2 * CHUNK_MAX as usize);
        while !self.eof && self.len < buf.len() {
            match self.r.read(&mut buf[self.len..]) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.len += n;
                    self.total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(self.len > 0)
    }

    /// Cut points in the filled part: `(start, len)` pairs relative to the buffer.
    fn cut(&mut self, buf: &[u8]) -> Vec<(usize, usize)> {
        let data = &buf[..self.len];
        let cdc = fastcdc::v2020::FastCDC::new(data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX);
        let mut cuts = Vec::with_capacity(self.len / CHUNK_AVG as usize + 2);
        let mut pos = 0;
        while pos < self.len && (self.eof || self.len - pos >= CHUNK_MAX as usize) {
            let (_, end) = cdc.cut(pos, self.len - pos);
            cuts.push((pos, end - pos));
            pos = end;
        }
        self.pos = pos;
        cuts
    }

    fn consumed(&self) -> usize {
        self.pos
    }

    /// Moves the unfinished tail to the front of the same buffer.
    fn shift(&mut self, buf: &mut [u8]) {
        buf.copy_within(self.pos..self.len, 0);
        self.advance();
    }

    fn advance(&mut self) {
        self.base += self.pos as u64;
        self.len -= self.pos;
        self.pos = 0;
    }
}

/// Validates and normalizes the requested subpaths: `None` means the whole folder.
fn normalize_subpaths(subpaths: &[String]) -> Result<Option<Vec<String>>> {
    if subpaths.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(subpaths.len());
    for sp in subpaths {
        let s = sp.trim_matches('/');
        let s = s.strip_prefix("./").unwrap_or(s);
        if s.is_empty() || s == "." {
            return Ok(None);
        }
        if sp.starts_with('/')
            || s.contains('\\')
            || s.split('/').any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(Error::Invalid(format!(
                "scan: {sp:?} is not a relative name inside the folder"
            )));
        }
        out.push(nfc(s));
    }
    out.sort_unstable();
    out.dedup();
    // Drop names covered by an ancestor in the list: each subtree is walked once.
    let mut kept: Vec<String> = Vec::with_capacity(out.len());
    for s in out {
        if !kept.last().is_some_and(|k| is_under(&s, k)) {
            kept.push(s);
        }
    }
    Ok(Some(kept))
}

/// `name` equals `dir` or lies below it.
fn is_under(name: &str, dir: &str) -> bool {
    dir.is_empty()
        || name == dir
        || (name.len() > dir.len() && name.starts_with(dir) && name.as_bytes()[dir.len()] == b'/')
}

/// `name` is one of the sorted, ancestor-free `dirs` or lies below one of them.
fn under_any(name: &str, dirs: &[String]) -> bool {
    // Check the name and each of its ancestors: O(depth · log n).
    let mut cut = name.len();
    loop {
        let prefix = &name[..cut];
        if dirs.binary_search_by(|d| d.as_str().cmp(prefix)).is_ok() {
            return true;
        }
        match prefix.rfind('/') {
            Some(i) => cut = i,
            None => return false,
        }
    }
}

/// Like [`under_any`] for an unsorted (short) list; "" covers everything.
fn under_any_path(name: &str, dirs: &[String]) -> bool {
    dirs.iter().any(|d| is_under(name, d))
}

fn nfc(s: &str) -> String {
    match is_nfc_quick(s.chars()) {
        IsNormalized::Yes => s.to_string(),
        _ => s.nfc().collect(),
    }
}

enum RelName {
    Root,
    Name(String),
    NotUtf8,
}

/// The folder-relative, `/`-separated NFC name of `path`.
fn relative_name(root: &Path, path: &Path) -> RelName {
    let rel = match path.strip_prefix(root) {
        Ok(r) => r,
        Err(_) => return RelName::NotUtf8,
    };
    if rel.as_os_str().is_empty() {
        return RelName::Root;
    }
    match rel.to_str() {
        #[cfg(windows)]
        Some(s) => RelName::Name(nfc(&s.replace('\\', "/"))),
        #[cfg(not(windows))]
        Some(s) => RelName::Name(nfc(s)),
        None => RelName::NotUtf8,
    }
}

/// True when the entry's name on disk is not NFC and a sibling exists under the NFC
/// spelling: both would map to the same name, so the non-NFC one is skipped.
fn name_is_duplicate(path: &Path, name: &str) -> bool {
    let on_disk = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let normalized = name.rsplit('/').next().unwrap_or(name);
    if on_disk == normalized {
        return false;
    }
    match path.parent() {
        Some(parent) => std::fs::symlink_metadata(parent.join(normalized)).is_ok(),
        None => false,
    }
}

/// Finds the on-disk path of an NFC name, component by component, without following
/// symlinks: `Ok(None)` if it does not exist inside the folder (including when an ancestor
/// is a symlink or a file). A component that is not on disk as spelled is looked up among
/// its siblings by NFC form (names written in NFD by another system).
fn resolve_on_disk(root: &Path, name: &str) -> io::Result<Option<PathBuf>> {
    let mut path = root.to_path_buf();
    let comps: Vec<&str> = name.split('/').collect();
    for (i, comp) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let candidate = path.join(comp);
        let meta = match std::fs::symlink_metadata(&candidate) {
            Ok(m) => Some((candidate, m)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => find_by_nfc(&path, comp)?,
            Err(e) => return Err(e),
        };
        let Some((p, m)) = meta else {
            return Ok(None);
        };
        if !last && !m.is_dir() {
            return Ok(None); // an ancestor is a file or a symlink: never follow it
        }
        path = p;
    }
    Ok(Some(path))
}

fn find_by_nfc(dir: &Path, comp: &str) -> io::Result<Option<(PathBuf, Metadata)>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in rd {
        let entry = entry?;
        if let Some(n) = entry.file_name().to_str() {
            if n != comp && nfc(n) == comp {
                let p = entry.path();
                return match std::fs::symlink_metadata(&p) {
                    Ok(m) => Ok(Some((p, m))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e),
                };
            }
        }
    }
    Ok(None)
}

fn error_path(e: &::ignore::Error) -> Option<&Path> {
    match e {
        ::ignore::Error::WithPath { path, .. } => Some(path),
        ::ignore::Error::WithDepth { err, .. } | ::ignore::Error::WithLineNumber { err, .. } => {
            error_path(err)
        }
        ::ignore::Error::Loop { child, .. } => Some(child),
        _ => None,
    }
}

fn is_not_found(e: &::ignore::Error) -> bool {
    e.io_error()
        .is_some_and(|io| io.kind() == io::ErrorKind::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::LocalMeta;
    use std::collections::{HashMap, HashSet};
    use std::os::unix::fs::PermissionsExt;

    /// Deterministic pseudo-random bytes (xorshift64*), so failures reproduce.
    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        out.truncate(n);
        out
    }

    fn check_blocks(data: &[u8], blocks: &[Block]) {
        let mut off = 0u64;
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(b.offset, off, "block {i} is not contiguous");
            assert!(b.size <= CHUNK_MAX, "block {i} too large: {}", b.size);
            if i + 1 < blocks.len() {
                assert!(b.size >= CHUNK_MIN, "inner block {i} too small: {}", b.size);
            }
            let slice = &data[b.offset as usize..(b.offset + b.size as u64) as usize];
            assert_eq!(b.hash, *blake3::hash(slice).as_bytes(), "block {i} hash");
            off += b.size as u64;
        }
        assert_eq!(off, data.len() as u64, "blocks do not cover the data");
        assert_eq!(blocks.is_empty(), data.is_empty());
    }

    #[test]
    fn chunk_edge_sizes_cover_the_data_and_match_the_file_hash() {
        let dir = tempfile::tempdir().unwrap();
        let (min, max) = (CHUNK_MIN as usize, CHUNK_MAX as usize);
        let sizes = [
            0,
            1,
            min - 1,
            min,
            min + 1,
            max - 1,
            max,
            max + 1,
            3 * max + 7,
            READ_BUF + 1,
            PIPELINE_MIN as usize + 12_345, // the two-thread path
        ];
        for (i, &n) in sizes.iter().enumerate() {
            let data = random_bytes(n, 42 + i as u64);
            let blocks = hash_bytes(&data);
            check_blocks(&data, &blocks);
            let p = dir.path().join(format!("f{i}"));
            std::fs::write(&p, &data).unwrap();
            assert_eq!(
                hash_file(&p).unwrap(),
                blocks,
                "hash_file != hash_bytes for {n} bytes"
            );
        }
        // Pathological data (no cut points): every chunk is CHUNK_MAX but the last.
        let zeros = vec![0u8; 5 * max + 3];
        let blocks = hash_bytes(&zeros);
        check_blocks(&zeros, &blocks);
        assert!(blocks[..blocks.len() - 1]
            .iter()
            .all(|b| b.size == CHUNK_MAX));
        let p = dir.path().join("zeros");
        std::fs::write(&p, &zeros).unwrap();
        assert_eq!(hash_file(&p).unwrap(), blocks);
    }

    /// A reader that returns few bytes per call, to exercise partial fills.
    struct Trickle<'a>(&'a [u8], usize);
    impl Read for Trickle<'_> {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(out.len()).min(self.1);
            out[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn streaming_gives_the_in_memory_chunks_whatever_the_read_sizes() {
        let data = random_bytes(11 * CHUNK_MAX as usize + 99, 7);
        let want = hash_bytes(&data);
        for step in [4093, 1 << 20, 3 << 20] {
            let mut buf = Vec::new();
            let (got, n) = hash_reader(Trickle(&data, step), 0, &mut buf, None).unwrap();
            assert_eq!(n, data.len() as u64);
            assert_eq!(got, want, "serial, reads of {step}");
            let (got, _) = hash_reader(Trickle(&data, step), PIPELINE_MIN, &mut buf, None).unwrap();
            assert_eq!(got, want, "pipelined, reads of {step}");
        }
    }

    /// A reader that fails after `ok` bytes.
    struct Failing(usize);
    impl Read for Failing {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::other("disk on fire"));
            }
            let n = self.0.min(out.len());
            out[..n].fill(7);
            self.0 -= n;
            Ok(n)
        }
    }

    #[test]
    fn a_read_error_is_returned_not_hung_on() {
        let mut buf = Vec::new();
        for ok in [0, 1000, 5 << 20, 13 << 20] {
            for hint in [0, PIPELINE_MIN] {
                let r = hash_reader(Failing(ok), hint, &mut buf, None);
                assert!(r.is_err(), "error after {ok} bytes (hint {hint}) was lost");
            }
        }
    }

    #[test]
    fn inserting_one_byte_at_the_start_changes_only_the_first_chunks() {
        let data = random_bytes(4 << 20, 99);
        let mut shifted = vec![0x5a];
        shifted.extend_from_slice(&data);
        let before = hash_bytes(&data);
        let after = hash_bytes(&shifted);
        assert!(
            before.len() >= 8,
            "expected many chunks, got {}",
            before.len()
        );
        let old: HashSet<[u8; 32]> = before.iter().map(|b| b.hash).collect();
        let new_chunks = after.iter().filter(|b| !old.contains(&b.hash)).count();
        assert!(
            new_chunks <= 2,
            "{new_chunks} of {} chunks changed",
            after.len()
        );
    }

    // ---- scanning real trees ----

    fn known_of(changes: &[LocalChange]) -> HashMap<String, LocalMeta> {
        changes
            .iter()
            .map(|c| {
                (
                    c.file.name.clone(),
                    LocalMeta {
                        kind: c.file.kind,
                        size: c.file.size,
                        mtime_ns: c.file.mtime_ns,
                        mode: c.file.mode,
                        inode: c.inode,
                        deleted: c.file.deleted,
                    },
                )
            })
            .collect()
    }

    /// Applies changes to a known map the way the index would.
    fn apply(known: &mut HashMap<String, LocalMeta>, changes: &[LocalChange]) {
        for (k, v) in known_of(changes) {
            known.insert(k, v);
        }
    }

    fn run(
        root: &Path,
        subpaths: &[&str],
        known: &HashMap<String, LocalMeta>,
        ignores: &Ignores,
    ) -> (Vec<LocalChange>, ScanStats) {
        let known: Known = known.iter().map(|(k, v)| (k, *v)).collect();
        let req = ScanRequest {
            root,
            subpaths: subpaths.iter().map(|s| s.to_string()).collect(),
            known: &known,
            ignores,
            progress: None,
        };
        let mut all = Vec::new();
        let stats = scan(&req, &mut |batch| {
            assert!(!batch.is_empty() && batch.len() <= BATCH_MAX);
            all.extend(batch);
            Ok(())
        })
        .unwrap();
        (all, stats)
    }

    fn names(changes: &[LocalChange]) -> Vec<&str> {
        changes.iter().map(|c| c.file.name.as_str()).collect()
    }

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join("docs/deep")).unwrap();
        std::fs::write(r.join("a.txt"), b"hello").unwrap();
        std::fs::write(r.join("docs/b.bin"), random_bytes(300_000, 1)).unwrap();
        std::fs::write(r.join("docs/deep/c.txt"), b"").unwrap();
        std::os::unix::fs::symlink("docs/b.bin", r.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc", r.join("docs/outside")).unwrap();
        dir
    }

    #[test]
    fn a_new_tree_is_reported_in_order_with_kinds_blocks_and_targets() {
        let dir = tree();
        let r = dir.path();
        let (changes, stats) = run(r, &[], &HashMap::new(), &Ignores::empty());
        assert_eq!(
            names(&changes),
            [
                "a.txt",
                "docs",
                "docs/b.bin",
                "docs/deep",
                "docs/deep/c.txt",
                "docs/outside",
                "link"
            ]
        );
        let by: HashMap<&str, &FileInfo> = changes
            .iter()
            .map(|c| (c.file.name.as_str(), &c.file))
            .collect();
        assert_eq!(by["docs"].kind, FileKind::Dir);
        assert_eq!(by["docs"].size, 0);
        let b = by["docs/b.bin"];
        assert_eq!((b.kind, b.size), (FileKind::File, 300_000));
        assert_eq!(b.blocks, hash_file(&r.join("docs/b.bin")).unwrap());
        assert_eq!(by["a.txt"].blocks, hash_bytes(b"hello"));
        assert!(by["docs/deep/c.txt"].blocks.is_empty());
        assert_eq!(by["link"].kind, FileKind::Symlink);
        assert_eq!(by["link"].symlink_target.as_deref(), Some("docs/b.bin"));
        assert_eq!(by["docs/outside"].symlink_target.as_deref(), Some("/etc"));
        for c in &changes {
            assert!(!c.file.deleted && c.file.version.0.is_empty() && c.file.sequence == 0);
            assert_eq!(c.file.modified_by, 0);
            assert!(c.inode != 0);
            assert!(c.file.mtime_ns > 1_500_000_000_000_000_000);
        }
        assert_eq!((stats.files, stats.dirs, stats.bytes), (3, 2, 300_005));
        assert_eq!((stats.hashed_files, stats.hashed_bytes), (3, 300_005));
        assert_eq!((stats.changed, stats.deleted), (7, 0));
        assert!(stats.retry_later.is_empty());
    }

    #[test]
    fn a_rescan_of_an_unchanged_tree_reports_nothing_and_reads_nothing() {
        let dir = tree();
        let (changes, _) = run(dir.path(), &[], &HashMap::new(), &Ignores::empty());
        let known = known_of(&changes);
        let (again, stats) = run(dir.path(), &[], &known, &Ignores::empty());
        assert!(again.is_empty(), "unexpected: {:?}", names(&again));
        assert_eq!((stats.hashed_files, stats.files, stats.dirs), (0, 3, 2));
    }

    #[test]
    fn modifications_deletions_and_permission_changes_are_detected() {
        let dir = tree();
        let r = dir.path();
        let ig = Ignores::empty();
        let (changes, _) = run(r, &[], &HashMap::new(), &ig);
        let mut known = known_of(&changes);

        std::fs::write(r.join("a.txt"), b"hello, world").unwrap();
        std::fs::remove_dir_all(r.join("docs/deep")).unwrap();
        std::fs::set_permissions(r.join("docs/b.bin"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::fs::remove_file(r.join("link")).unwrap();
        std::os::unix::fs::symlink("a.txt", r.join("link")).unwrap();
        let (changes, stats) = run(r, &[], &known, &ig);
        assert_eq!(
            names(&changes),
            [
                "a.txt",
                "docs/b.bin",
                "link",
                "docs/deep/c.txt",
                "docs/deep"
            ]
        );
        let a = &changes[0].file;
        assert_eq!(a.blocks, hash_bytes(b"hello, world"));
        assert_eq!(a.size, 12);
        let b = &changes[1].file;
        assert_eq!(b.mode, 0o600);
        assert_eq!(
            b.blocks,
            hash_file(&r.join("docs/b.bin")).unwrap(),
            "content hash kept"
        );
        assert_eq!(changes[2].file.symlink_target.as_deref(), Some("a.txt"));
        assert!(changes[3].file.deleted && changes[4].file.deleted);
        assert_eq!(changes[4].file.kind, FileKind::Dir);
        assert_eq!((stats.changed, stats.deleted), (3, 2));

        // Tombstones are not reported again; a name that comes back is new.
        apply(&mut known, &changes);
        let (none, _) = run(r, &[], &known, &ig);
        assert!(none.is_empty(), "unexpected: {:?}", names(&none));
        std::fs::create_dir(r.join("docs/deep")).unwrap();
        let (back, _) = run(r, &[], &known, &ig);
        assert_eq!(names(&back), ["docs/deep"]);
        assert!(!back[0].file.deleted);
    }

    #[test]
    fn same_size_edit_with_a_new_mtime_is_rehashed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"aaaa").unwrap();
        let (changes, _) = run(dir.path(), &[], &HashMap::new(), &Ignores::empty());
        let mut known = known_of(&changes);
        std::fs::write(&p, b"bbbb").unwrap();
        // Make sure the recorded mtime differs even on coarse-grained file systems.
        known.get_mut("f").unwrap().mtime_ns -= 1_000_000_000;
        let (changes, _) = run(dir.path(), &[], &known, &Ignores::empty());
        assert_eq!(names(&changes), ["f"]);
        assert_eq!(changes[0].file.blocks, hash_bytes(b"bbbb"));
    }

    #[test]
    fn ferryignore_ferry_dir_and_temp_files_are_skipped_and_never_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        std::fs::create_dir_all(r.join(".ferry/versions")).unwrap();
        std::fs::write(r.join(".ferry/versions/old.txt"), b"x").unwrap();
        std::fs::create_dir_all(r.join("sub/.ferry")).unwrap();
        std::fs::write(r.join("sub/.ferry-tmp-x.txt"), b"partial").unwrap();
        std::fs::write(r.join(".ferry-tmp-y"), b"partial").unwrap();
        std::fs::create_dir_all(r.join("build/out")).unwrap();
        std::fs::write(r.join("build/out/a.o"), b"obj").unwrap();
        std::fs::write(r.join("keep.log"), b"k").unwrap();
        std::fs::write(r.join("drop.log"), b"d").unwrap();
        std::fs::write(r.join(".ferryignore"), "build/\n*.log\n!keep.log\n").unwrap();
        let ig = Ignores::load(r).unwrap();
        let (changes, _) = run(r, &[], &HashMap::new(), &ig);
        assert_eq!(
            names(&changes),
            [".ferryignore", "keep.log", "sub", "sub/.ferry"]
        );

        // A name that was synced and is now ignored is not turned into a deletion.
        let mut known = known_of(&changes);
        known.insert(
            "drop.log".into(),
            LocalMeta {
                kind: FileKind::File,
                size: 1,
                mtime_ns: 1,
                mode: 0o644,
                inode: 1,
                deleted: false,
            },
        );
        let (changes, _) = run(r, &[], &known, &ig);
        assert!(changes.is_empty(), "unexpected: {:?}", names(&changes));
        // Subpath scans honour the same rules.
        let (changes, _) = run(r, &["build/out", ".ferry", "drop.log"], &known, &ig);
        assert!(changes.is_empty(), "unexpected: {:?}", names(&changes));
    }

    #[test]
    fn names_are_reported_in_nfc_and_found_again_by_subpath() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        let nfd = "Cafe\u{301}"; // "Café" with a combining accent, as macOS writes it
        let nfc_name = "Caf\u{e9}";
        std::fs::create_dir(r.join(nfd)).unwrap();
        std::fs::write(r.join(nfd).join("x.txt"), b"x").unwrap();
        let (changes, _) = run(r, &[], &HashMap::new(), &Ignores::empty());
        assert_eq!(
            names(&changes),
            [nfc_name.to_string(), format!("{nfc_name}/x.txt")]
        );
        let known = known_of(&changes);
        let sub = format!("{nfc_name}/x.txt");
        let (none, _) = run(r, &[&sub], &known, &Ignores::empty());
        assert!(
            none.is_empty(),
            "NFC subpath must find the NFD file: {:?}",
            names(&none)
        );
        std::fs::write(r.join(nfd).join("x.txt"), b"changed").unwrap();
        let (changed, _) = run(r, &[&sub], &known, &Ignores::empty());
        assert_eq!(names(&changed), [sub.as_str()]);
    }

    #[test]
    fn subpath_scans_stay_inside_their_subtrees() {
        let dir = tree();
        let r = dir.path();
        let ig = Ignores::empty();
        let (changes, _) = run(r, &[], &HashMap::new(), &ig);
        let known = known_of(&changes);
        std::fs::remove_file(r.join("a.txt")).unwrap();
        std::fs::write(r.join("docs/deep/c.txt"), b"new").unwrap();
        std::fs::write(r.join("docs/deep/d.txt"), b"new").unwrap();

        let (changes, _) = run(r, &["docs/deep"], &known, &ig);
        assert_eq!(names(&changes), ["docs/deep/c.txt", "docs/deep/d.txt"]);
        // Overlapping subpaths are scanned once; a vanished one yields its deletion.
        let (changes, _) = run(r, &["docs", "docs/deep/d.txt", "a.txt"], &known, &ig);
        assert_eq!(
            names(&changes),
            ["docs/deep/c.txt", "docs/deep/d.txt", "a.txt"]
        );
        assert!(changes[2].file.deleted);
        // A subpath through a symlink is not followed: "docs/outside/passwd" is not ours.
        let (changes, _) = run(r, &["docs/outside/passwd", "link/x"], &known, &ig);
        assert!(changes.is_empty(), "unexpected: {:?}", names(&changes));
        // "" and "." mean the whole folder.
        let (changes, _) = run(r, &[""], &known, &ig);
        assert_eq!(changes.len(), 3);
        assert!(matches!(
            scan(
                &ScanRequest {
                    root: r,
                    subpaths: vec!["../x".into()],
                    known: &known.iter().map(|(k, v)| (k, *v)).collect(),
                    ignores: &ig,
                    progress: None,
                },
                &mut |_| Ok(()),
            ),
            Err(Error::Invalid(_))
        ));
    }

    #[test]
    fn the_root_and_subpaths_are_walked_whatever_their_own_names() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join(".ferry-tmp-odd");
        std::fs::create_dir_all(root.join("x/.ferry")).unwrap();
        std::fs::write(root.join("x/.ferry/a.txt"), b"a").unwrap();
        let (changes, _) = run(&root, &[], &HashMap::new(), &Ignores::empty());
        assert_eq!(names(&changes), ["x", "x/.ferry", "x/.ferry/a.txt"]);
        let (changes, _) = run(&root, &["x/.ferry"], &HashMap::new(), &Ignores::empty());
        assert_eq!(names(&changes), ["x/.ferry", "x/.ferry/a.txt"]);
    }

    #[test]
    fn a_missing_root_is_an_error_not_a_mass_deletion() {
        let dir = tree();
        let (changes, _) = run(dir.path(), &[], &HashMap::new(), &Ignores::empty());
        let known = known_of(&changes);
        let gone = dir.path().join("unmounted");
        let req = ScanRequest {
            root: &gone,
            subpaths: vec![],
            known: &known.iter().map(|(k, v)| (k, *v)).collect(),
            ignores: &Ignores::empty(),
            progress: None,
        };
        let mut calls = 0;
        assert!(scan(&req, &mut |_| {
            calls += 1;
            Ok(())
        })
        .is_err());
        assert_eq!(calls, 0);
    }

    #[test]
    fn an_unreadable_directory_is_not_reported_deleted() {
        if unsafe { libc::geteuid() } == 0 {
            // root reads everything; the permission cannot be taken away in this test.
            return;
        }
        let dir = tree();
        let r = dir.path();
        let (changes, _) = run(r, &[], &HashMap::new(), &Ignores::empty());
        let known = known_of(&changes);
        std::fs::set_permissions(r.join("docs/deep"), std::fs::Permissions::from_mode(0o000))
            .unwrap();
        let (changes, _) = run(r, &[], &known, &Ignores::empty());
        std::fs::set_permissions(r.join("docs/deep"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        assert!(
            changes.iter().all(|c| !c.file.deleted),
            "{:?}",
            names(&changes)
        );
    }

    #[test]
    fn a_file_that_changes_while_hashed_is_retried_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"content").unwrap();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        let (mtime_ns, _, inode) = metadata_of(&p, &meta);
        let mut job = HashJob {
            path: p.clone(),
            size: 7,
            mtime_ns,
            inode,
        };
        let counter = AtomicU64::new(0);
        let mut buf = Vec::new();
        let mut outcome = |job: &HashJob| hash_one(job, &mut buf, &counter);
        assert!(matches!(outcome(&job), Outcome::Hashed(_, 7)));
        // What the walk saw no longer matches the file: as if it was written meanwhile.
        job.mtime_ns -= 1;
        assert!(matches!(outcome(&job), Outcome::Retry));
        job.mtime_ns += 1;
        job.size = 3;
        assert!(matches!(outcome(&job), Outcome::Retry));
        job.size = 7;
        job.inode += 1;
        assert!(matches!(outcome(&job), Outcome::Retry));
        job.inode -= 1;
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(outcome(&job), Outcome::Retry));
    }

    #[test]
    fn a_rescan_of_many_names_reports_exactly_the_ones_gone() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for d in 0..5 {
            std::fs::create_dir(r.join(format!("d{d}"))).unwrap();
            std::fs::create_dir(r.join(format!("d{d}-x"))).unwrap();
            for i in 0..60 {
                std::fs::write(r.join(format!("d{d}/f{i}")), b"x").unwrap();
            }
        }
        let (changes, _) = run(r, &[], &HashMap::new(), &Ignores::empty());
        assert_eq!(changes.len(), 310);
        let known = known_of(&changes);
        let mut removed = vec![];
        for (d, i) in [(0, 0), (1, 59), (3, 7), (3, 8), (4, 33)] {
            let name = format!("d{d}/f{i}");
            std::fs::remove_file(r.join(&name)).unwrap();
            removed.push(name);
        }
        std::fs::remove_dir(r.join("d2-x")).unwrap();
        removed.push("d2-x".into());
        let (changes, stats) = run(r, &[], &known, &Ignores::empty());
        assert!(changes.iter().all(|c| c.file.deleted));
        removed.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(names(&changes), removed);
        assert_eq!((stats.files, stats.deleted), (295, 6));
    }

    #[test]
    fn many_files_come_in_bounded_batches_with_progress() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        for i in 0..2500 {
            std::fs::write(r.join(format!("f{i:05}")), i.to_string()).unwrap();
        }
        let last = std::sync::Mutex::new(ScanProgress::default());
        let progress = |p: ScanProgress| {
            let mut last = last.lock().unwrap();
            assert!(p.files_done >= last.files_done && p.files_total >= last.files_total);
            assert!(p.files_done <= p.files_total && p.bytes_done <= p.bytes_total);
            *last = p;
        };
        let known = Known::new();
        let ig = Ignores::empty();
        let req = ScanRequest {
            root: r,
            subpaths: vec![],
            known: &known,
            ignores: &ig,
            progress: Some(&progress),
        };
        let mut sizes = Vec::new();
        let mut order = Vec::new();
        let stats = scan(&req, &mut |b| {
            sizes.push(b.len());
            order.extend(b.into_iter().map(|c| c.file.name));
            Ok(())
        })
        .unwrap();
        // The walk handed its findings on in parts (every PENDING_MAX, 64 in tests); the
        // sink still sees full batches.
        assert_eq!(sizes, [1000, 1000, 500]);
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "walk order is kept through the worker pool");
        assert_eq!(stats.hashed_files, 2500);
        let p = *last.lock().unwrap();
        assert_eq!((p.files_done, p.files_total), (2500, 2500));
        assert_eq!(p.bytes_done, p.bytes_total);

        // A failing sink stops the scan with its error.
        *last.lock().unwrap() = ScanProgress::default();
        let err = scan(&req, &mut |_| Err(Error::Stopped));
        assert!(matches!(err, Err(Error::Stopped)));
    }
}
