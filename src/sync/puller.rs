//! The puller's disk side: builds one needed file, applies a directory, a symlink or a
//! deletion — the place where Ferry decides whether a person keeps their data.
//!
//! It knows nothing of the network or the index. Blocks come from a [`BlockSource`] (the
//! caller implements it with local block reuse first and peer requests second); what the
//! index believes is on disk comes in as an [`ExpectedLocal`]; the result goes back as a
//! [`PullOutcome`] which the caller records in the index. Nothing here trusts its inputs:
//! names go through `names::safe_join`, block lists must tile the file exactly, and every
//! block is BLAKE3-verified here, whatever the source claims.
//!
//! # Building a file, in order ([`pull_file`])
//!
//! 1. check the name and join it under the root without crossing a symlink; check free
//!    space; create missing parent directories (each re-checked: a real directory, no link);
//! 2. open the temp file `.ferry-tmp-<base>` beside the target (never through a symlink,
//!    never a hard link to something else, locked against a second puller); blocks already
//!    in it from an interrupted pull that hash correctly are kept (resume); the space of
//!    the rest of a file of 1 MiB or more is reserved (a disk too full for it fails here);
//! 3. fetch the missing blocks, several at once, verify each, write each at its offset;
//! 4. truncate to the file size, set mode and mtime on the temp inode, fsync it;
//! 5. re-check the target against what the index expects; if it changed, or if the local
//!    version lost a concurrent edit, move the on-disk file aside under its conflict name
//!    (or, without `allow_conflict`, stop and leave the temp for a later resume); if it
//!    already holds exactly this version (a pull cut off before the index recorded it),
//!    keep it and drop the temp;
//! 6. with versioning, move the replaced file into `.ferry/versions/`;
//! 7. rename temp → target, fsync the directory; (the caller) records the result in the
//!    index.
//!
//! Many small files go through [`stage_file`] (steps 1 to 4 without the fsync) and then
//! [`install_batch`]: one `syncfs` makes all of them durable before any rename, and each
//! directory is fsynced once after its renames. The same guarantees in the same order,
//! with one journal commit instead of one per file. (Fewer than 16 files are fsynced one
//! by one: `syncfs` also waits for every other program's dirty data on that disk.)
//!
//! Mode and mtime are set on the temp file's inode before the rename rather than on the
//! final path after it: the same inode ends up at the target, but this way the file never
//! shows under its real name with the wrong permissions, and one fsync makes data and
//! attributes durable together. A temp file of a checked batch is created with its final
//! mode where the umask allows (`created_mode`), and beneath the open folder root in
//! one `openat2` that refuses symlinks on the way, which covers steps 1 and 2 for it
//! (`create_checked`).
//!
//! Versioned copies live at `.ferry/versions/<dir>/<stem>~YYYYMMDD-HHMMSS<.ext>` (UTC,
//! the time it was replaced or deleted; the extension is kept at the end so the copy still
//! opens in its application; no extension for dotfiles and names without a dot).
//!
//! # What the caller must know
//!
//! - Record the on-disk state after a pull by stat'ing the target (`fsutil::try_stat`),
//!   not from the `FileInfo`: some file systems round mtimes.
//! - `TargetChanged` means "rescan this name, then decide again"; the temp file (with its
//!   verified blocks) is left for the retry.
//! - A file or directory swapped for a symlink by a local process between the checks and
//!   the rename is not defended against (same as Syncthing); peers cannot cause it.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::stream::{self, StreamExt};
use futures::FutureExt;
use time::macros::format_description;
use time::OffsetDateTime;

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{
    self, floor_char_boundary, fsync_dir, is_temp_name, open_no_follow, rename_noreplace,
    temp_name, try_stat, DiskMeta, MAX_NAME_BYTES,
};
use crate::protocol::MAX_BLOCK_SIZE;
use crate::sync::conflict::conflict_name;
use crate::sync::names::{check_name, safe_join, safe_join_parents, FERRY_DIR};
use crate::types::{Block, DeviceId, FileInfo, FileKind, LocalMeta};

/// Where versioned copies go, under the folder root.
pub const VERSIONS_DIR: &str = ".ferry/versions";

/// Where blocks come from. The caller implements it with local block lookup (the index's
/// block table + reading another local file) and remote requests.
pub trait BlockSource: Send + Sync {
    /// Returns the block's bytes, or an error. Unless [`BlockSource::verifies`] says
    /// otherwise the puller verifies the hash itself: a source may be wrong (a local file
    /// changed since it was indexed, a lying peer).
    fn fetch(&self, block: &Block) -> BoxFuture<'_, Result<Vec<u8>>>;

    /// True when every block `fetch` returns has already been checked against its
    /// BLAKE3 hash (a source that must verify anyway, to fall back to another peer when
    /// one sends bad data). The puller then checks only the length, and each block is
    /// hashed once instead of twice; a 1 GiB pull saves about a CPU-second.
    fn verifies(&self) -> bool {
        false
    }

    /// The blocks the file now at the target name held when last recorded (its local
    /// record), if any. The puller reads those of them it needs straight from the target
    /// in one sequential pass, verifying each, before asking `fetch` for the rest: an
    /// edit inside a big file then costs one read of the old file instead of a lookup
    /// and two thread hand-offs per block.
    fn base_blocks(&self) -> &[Block] {
        &[]
    }
}

/// How a pull behaves. `Default` gives 16 blocks in flight, no free-space reserve beyond
/// the file itself, no versioning, and conflicts allowed.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Blocks fetched concurrently; bounds memory at `max_in_flight` × 1 MiB.
    pub max_in_flight: usize,
    /// Bytes that must remain free on the folder's file system after the file is written.
    pub min_free_bytes: u64,
    pub versioning: Option<Versioning>,
    /// When the target changed on disk since the index last saw it: `true` moves the
    /// on-disk file aside as a conflict copy and installs the new one (keep both);
    /// `false` returns [`PullOutcome::TargetChanged`] and leaves everything as it is.
    pub allow_conflict: bool,
    /// The caller has just run [`check_batch`] for a batch holding this file, and it
    /// passed: the folder root and its marker are there, and each parent's file system
    /// has room for the whole batch. The file is then not checked again on its own.
    pub batch_checked: bool,
    /// The folder root, opened when the batch was checked: with `batch_checked`, temp
    /// files are created beneath it in one call ([`fsutil::create_new_beneath`]).
    pub root_dir: Option<Arc<File>>,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            max_in_flight: 16,
            min_free_bytes: 0,
            versioning: None,
            allow_conflict: true,
            batch_checked: false,
            root_dir: None,
        }
    }
}

/// Checks, once for a batch of files about to be pulled, what [`pull_file`] would
/// otherwise check for each: the folder root is a directory with its marker, and the
/// file system of every parent directory the files go into (or of its nearest existing
/// ancestor, for one not made yet) has room for all of them with `min_free_bytes` to
/// spare. False when anything is missing or short: then each file is checked on its
/// own, and says what is wrong. Pass the result as [`PullOptions::batch_checked`].
/// `files` are the batch's names and sizes.
pub fn check_batch<'a>(
    root: &Path,
    files: impl IntoIterator<Item = (&'a str, u64)>,
    min_free_bytes: u64,
) -> bool {
    if check_root(root).is_err() {
        return false;
    }
    let mut needed = min_free_bytes;
    let mut parents: Vec<&str> = files
        .into_iter()
        .map(|(name, size)| {
            needed = needed.saturating_add(size);
            name.rsplit_once('/').map_or("", |(dir, _)| dir)
        })
        .collect();
    parents.sort_unstable();
    parents.dedup();
    parents.into_iter().all(|dir| {
        let mut at = root.join(dir);
        loop {
            match fsutil::free_space(&at) {
                Ok((avail, _)) => return avail >= needed,
                Err(_) if at.as_path() != root && at.pop() => {}
                Err(_) => return false,
            }
        }
    })
}

/// Makes the missing parent directories of a batch of files about to be pulled, as
/// [`pull_file`] would for each file, but durable together: one fsync per directory
/// that got new entries, at the end, instead of one after each directory made (on a
/// journaled file system each such fsync waits for a journal commit, and a pull's
/// files can arrive before the records of their directories). A parent that cannot be
/// made (a bad name, a symlink or a file in the way) is left for that file's own pull
/// to report. False when a directory made could not be made durable: then call it
/// not checked ([`PullOptions::batch_checked`]). `names` are the batch's file names.
pub fn make_parents<'a>(root: &Path, names: impl IntoIterator<Item = &'a str>) -> bool {
    let mut dirs: Vec<&str> = names
        .into_iter()
        .filter_map(|name| name.rsplit_once('/').map(|(dir, _)| dir))
        .collect();
    dirs.sort_unstable();
    dirs.dedup();
    let mut made_in = Vec::new();
    for dir in dirs {
        if check_name(dir).is_err() {
            continue;
        }
        let mut p = root.to_path_buf();
        for comp in dir.split('/') {
            p.push(comp);
            if ensure_real_dir_deferred(&p, &mut made_in).is_err() {
                break;
            }
        }
    }
    match sync_made(&made_in) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("new directories not made durable: {e}");
            false
        }
    }
}

/// Trash-can versioning: replaced and deleted files move to `.ferry/versions/` and are
/// pruned after `keep_days` days (0 = kept forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Versioning {
    pub keep_days: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullOutcome {
    /// Applied. `inode` is the new file's (0 after a deletion).
    Done { inode: u64 },
    /// Applied, and the content that was on disk before (the losing version) now lives at
    /// `kept_as` (a folder-relative name): it is a new local file for the scanner to pick up.
    Conflict { kept_as: String, inode: u64 },
    /// The local file changed since the index said (or is a non-empty directory where a
    /// file should go): the caller should rescan the name and retry later.
    TargetChanged,
}

/// What the index says is on disk now, as the scanner last recorded it.
/// Compared with `lstat`: for files kind, size and mtime; for symlinks kind and mtime;
/// for directories only the kind. An `inode` of 0 means unknown and is not compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpectedLocal {
    pub kind: FileKind,
    pub size: u64,
    pub mtime_ns: i64,
    pub inode: u64,
}

impl ExpectedLocal {
    /// From the index's local record; `None` when that record is a deletion (nothing
    /// should be on disk).
    pub fn from_local(m: &LocalMeta) -> Option<Self> {
        (!m.deleted).then_some(Self {
            kind: m.kind,
            size: m.size,
            mtime_ns: m.mtime_ns,
            inode: m.inode,
        })
    }

    /// True when the on-disk state is what the index expects.
    pub fn matches(&self, d: &DiskMeta) -> bool {
        if self.kind != d.kind {
            return false;
        }
        if self.inode != 0 && d.inode != 0 && self.inode != d.inode {
            return false;
        }
        match self.kind {
            FileKind::File => self.size == d.size && self.mtime_ns == d.mtime_ns,
            FileKind::Symlink => self.mtime_ns == d.mtime_ns,
            // A directory's mtime changes with every child; its children are checked
            // on their own.
            FileKind::Dir => true,
        }
    }
}

/// Builds `file` (kind `File`) at `root/file.name`; see the module docs for the steps.
///
/// `expected_local`: what the index says is on disk now (`None` = nothing should be).
/// `local_is_concurrent_loser`: the index found the local version concurrent with this
/// one and losing; the on-disk file is then moved aside as a conflict copy.
/// `conflict_device`: the device whose version loses, named in the conflict copy (the
/// local device for an unrecorded local edit).
pub async fn pull_file(
    root: &Path,
    file: &FileInfo,
    expected_local: Option<&ExpectedLocal>,
    local_is_concurrent_loser: bool,
    conflict_device: &DeviceId,
    source: &dyn BlockSource,
    opts: &PullOptions,
) -> Result<PullOutcome> {
    let staged = stage_file(
        root,
        file,
        expected_local,
        local_is_concurrent_loser,
        conflict_device,
        source,
        opts,
    )
    .await?;
    install_now(root, staged).await
}

/// Steps 4 to 7 for one staged file: fsync it, re-check, rename, fsync its directory.
pub async fn install_now(root: &Path, staged: Staged) -> Result<PullOutcome> {
    let root = root.to_path_buf();
    blocking(move || install(&root, staged, Durability::ThisFile)).await
}

/// A file built in its temp file (steps 1 to 4 but the fsync), not yet durable or in
/// place: [`install_batch`] finishes many of these with one flush of the file system.
pub struct Staged {
    record: FileInfo,
    prep: Prepared,
    expected: Option<ExpectedLocal>,
    concurrent_loser: bool,
    conflict_device: DeviceId,
    opts: PullOptions,
}

/// Steps 1 to 4 of [`pull_file`] without the fsync: the temp file holds every verified
/// block at its exact length. Arguments as for [`pull_file`].
pub async fn stage_file(
    root: &Path,
    file: &FileInfo,
    expected_local: Option<&ExpectedLocal>,
    local_is_concurrent_loser: bool,
    conflict_device: &DeviceId,
    source: &dyn BlockSource,
    opts: &PullOptions,
) -> Result<Staged> {
    if file.kind != FileKind::File || file.deleted {
        return Err(Error::Invalid(format!(
            "{}: pull_file builds files; this record is a {:?}{}",
            file.name,
            file.kind,
            if file.deleted { " deletion" } else { "" }
        )));
    }
    check_blocks(file)?;

    // Steps 1 and 2: checks, parents, temp file, resume. For a small file that is a few
    // metadata calls and at most one small read: done in place, like its write, since a
    // hand-off to the blocking pool and back cost more (thread switches were the largest
    // item in a profile of 10,000 × 4 KiB files).
    let t_prepare = std::time::Instant::now();
    let prep = if file.size <= INLINE_WRITE as u64 {
        prepare(root, file, opts)?
    } else {
        let (root, file, opts) = (root.to_path_buf(), file.clone(), opts.clone());
        let base = source.base_blocks().to_vec();
        blocking(move || {
            let mut prep = prepare(&root, &file, &opts)?;
            prep.from_base = copy_from_base(&mut prep, &base)?;
            Ok(prep)
        })
        .await?
    };
    if prep.reused > 0 {
        tracing::debug!(
            name = %file.name,
            reused = prep.reused,
            "resuming from verified blocks in the temp file"
        );
    }
    if prep.from_base > 0 {
        tracing::debug!(name = %file.name, blocks = prep.from_base, prepare_ms = t_prepare.elapsed().as_millis() as u64, "blocks copied from the old file");
    }

    // Step 3: fetch what is missing, verify, write at its offset. At most
    // `max_in_flight` blocks are held in memory at once. Large blocks are verified side
    // by side on blocking threads but written one at a time (`one_writer`): the kernel
    // lets one write into a file at a time anyway, and writers that wait for its lock
    // spin on a CPU while the holder copies. (The lock only saves CPU: writes at distinct
    // offsets are safe together. A small block, written from the async task, never
    // waits for it.)
    let one_writer = Arc::new(std::sync::Mutex::new(()));
    let fetches = prep.missing.iter().map(|(block, offsets)| {
        let (f, temp) = (Arc::clone(&prep.file), prep.temp.clone());
        let one_writer = Arc::clone(&one_writer);
        let (block, offsets, name) = (*block, offsets.clone(), file.name.clone());
        let verified = source.verifies();
        async move {
            let data = source.fetch(&block).await.map_err(|e| {
                Error::Invalid(format!(
                    "{name}: fetching block at offset {} ({} bytes): {e}",
                    block.offset, block.size
                ))
            })?;
            let inline = block.size as usize <= INLINE_WRITE;
            let write = move || {
                if verified {
                    check_len(&name, &block, &data)?;
                } else {
                    verify_block(&name, &block, &data)?;
                }
                {
                    let _one =
                        (!inline).then(|| one_writer.lock().unwrap_or_else(|e| e.into_inner()));
                    for &off in &offsets {
                        write_all_at(&f, &data, off).at(&temp)?;
                    }
                }
                for off in offsets {
                    start_writeback_of(&f, &data, off);
                }
                crate::bufpool::give(data);
                Ok(())
            };
            // A small block is written in place (a page-cache copy costs less than a
            // hand-off to the blocking pool); a large one on a blocking thread.
            if inline {
                write()
            } else {
                blocking(write).await
            }
        }
        // Boxed so the future's type does not carry the closure's borrow: the folder loop
        // that awaits `pull_file` is spawned, and must be `Send` for every lifetime.
        .boxed()
    });
    let fetches: Vec<_> = fetches.collect();
    let mut results = stream::iter(fetches).buffer_unordered(opts.max_in_flight.max(1));
    while let Some(r) = results.next().await {
        // The temp file holds only verified blocks, so a failure leaves it resumable.
        r?;
    }
    drop(results);

    // Step 4, the exact length (the fsync comes with the install). The blocks tile
    // `[0, size)` and every one was written or found in place, so the file is `size`
    // long unless it was longer when opened (a leftover of another version); a truncate
    // to the same length would still cost a file-system transaction and an inotify event
    // per small file.
    if prep.len_at_open > file.size {
        prep.file.set_len(file.size).at(&prep.temp)?;
    }
    Ok(Staged {
        record: file.clone(),
        prep,
        expected: expected_local.copied(),
        concurrent_loser: local_is_concurrent_loser,
        conflict_device: *conflict_device,
        opts: opts.clone(),
    })
}

/// Blocks read and verified ahead of the writer when copying from the old file.
const BASE_READ_AHEAD: usize = 4;

/// Blocks up to this size are written from the async task that fetched them.
const INLINE_WRITE: usize = 64 * 1024;

/// How an install makes its file durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// fsync the temp file before the rename and its directory after.
    ThisFile,
    /// The caller flushed the whole file system after sealing, and fsyncs the
    /// directories after the renames ([`install_batch`]).
    Flushed,
}

/// Finishes staged files together: final mode and mtime on each temp file, one flush of
/// the file system for all of them (`syncfs`; one fsync each where that is missing or
/// fails), then steps 5 to 7 for each, then one fsync per directory that got a file.
/// On a journaled file system this is one journal commit instead of one per file, which
/// is what bounds a pull of many small files. Outcomes come back in the given order.
pub fn install_batch(root: &Path, staged: Vec<Staged>) -> Vec<Result<PullOutcome>> {
    install_batch_from(root, staged, FLUSH_MIN_FILES)
}

/// [`install_batch`], flushing the file system from `flush_min` files on.
fn install_batch_from(
    root: &Path,
    staged: Vec<Staged>,
    flush_min: usize,
) -> Vec<Result<PullOutcome>> {
    if staged.len() < flush_min {
        // `syncfs` writes out everything dirty on the file system, other programs' data
        // too: right after 20,000 files were copied in, one new file waited 340 ms for
        // it instead of a few ms for its own fsync. A few files are cheaper one by one.
        return staged
            .into_iter()
            .map(|s| install(root, s, Durability::ThisFile))
            .collect();
    }
    let mut sealed: Vec<Result<Staged>> =
        staged.into_iter().map(|s| seal(&s).map(|()| s)).collect();
    if !flush_file_system(root) {
        for s in sealed.iter_mut() {
            if let Ok(st) = s {
                if let Err(e) = st.prep.file.sync_all().at(&st.prep.temp) {
                    *s = Err(e);
                }
            }
        }
    }
    // Each outcome with the directory its file went into.
    let mut outcomes: Vec<(Option<PathBuf>, Result<PullOutcome>)> = sealed
        .into_iter()
        .map(|s| {
            let s = match s {
                Ok(s) => s,
                Err(e) => return (None, Err(e)),
            };
            let dir = parent_of(&s.prep.target).to_path_buf();
            match install(root, s, Durability::Flushed) {
                Ok(PullOutcome::TargetChanged) => (None, Ok(PullOutcome::TargetChanged)),
                r => (Some(dir), r),
            }
        })
        .collect();
    let mut dirs: Vec<&PathBuf> = outcomes.iter().filter_map(|(d, _)| d.as_ref()).collect();
    dirs.sort();
    dirs.dedup();
    let failed: Vec<(PathBuf, String)> = dirs
        .into_iter()
        .filter_map(|d| fsync_dir(d).err().map(|e| (d.clone(), e.to_string())))
        .collect();
    for (dir, msg) in failed {
        // In place but not known to be durable: not recorded; the next scan finds it.
        for (d, o) in outcomes.iter_mut() {
            if d.as_ref() == Some(&dir) && o.is_ok() {
                *o = Err(Error::Invalid(msg.clone()));
            }
        }
    }
    outcomes.into_iter().map(|(_, o)| o).collect()
}

/// Below this many files, [`install_batch`] makes each durable with its own fsync rather
/// than flushing the whole file system.
const FLUSH_MIN_FILES: usize = 16;

/// `syncfs` on the file system holding `root`: true when it flushed everything.
#[cfg(target_os = "linux")]
fn flush_file_system(root: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(d) = File::open(root) else {
        return false;
    };
    // SAFETY: a plain syscall on an open file descriptor; no memory is passed.
    unsafe { libc::syncfs(d.as_raw_fd()) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn flush_file_system(_: &Path) -> bool {
    false
}

/// Final mode and mtime on the temp inode (see the module docs).
fn seal(s: &Staged) -> Result<()> {
    let (f, temp) = (&s.prep.file, &s.prep.temp);
    if !s.prep.mode_set {
        set_fd_mode(f, file_mode(s.record.mode)).at(temp)?;
    }
    f.set_times(fs::FileTimes::new().set_modified(system_time(s.record.mtime_ns)))
        .at(temp)
}

/// The block list from a peer must tile `[0, size)` exactly, in order, each block no
/// larger than the protocol allows. Anything else is refused before any disk I/O.
fn check_blocks(file: &FileInfo) -> Result<()> {
    let mut next = 0u64;
    for b in &file.blocks {
        if b.offset != next || b.size > MAX_BLOCK_SIZE {
            return Err(Error::Invalid(format!(
                "{}: malformed block list (block at offset {} of {} bytes, expected offset {next}, at most {MAX_BLOCK_SIZE} bytes)",
                file.name, b.offset, b.size
            )));
        }
        next += u64::from(b.size);
    }
    if next != file.size {
        return Err(Error::Invalid(format!(
            "{}: block list covers {next} bytes but the file has {}",
            file.name, file.size
        )));
    }
    Ok(())
}

fn verify_block(name: &str, block: &Block, data: &[u8]) -> Result<()> {
    check_len(name, block, data)?;
    let got = blake3::hash(data);
    if got.as_bytes() != &block.hash {
        return Err(Error::Invalid(format!(
            "{name}: block at offset {} ({} bytes) failed verification: expected BLAKE3 {}, got {}",
            block.offset,
            block.size,
            blake3::Hash::from(block.hash).to_hex(),
            got.to_hex()
        )));
    }
    Ok(())
}

fn check_len(name: &str, block: &Block, data: &[u8]) -> Result<()> {
    if data.len() != block.size as usize {
        return Err(Error::Invalid(format!(
            "{name}: block at offset {} should be {} bytes, the source sent {}",
            block.offset,
            block.size,
            data.len()
        )));
    }
    Ok(())
}

/// Room for the rest of `file` (all but `resumable` bytes) and `min_free_bytes` on the
/// file system it goes to.
fn check_free_space(
    root: &Path,
    target: &Path,
    parents_exist: bool,
    file: &FileInfo,
    resumable: u64,
    opts: &PullOptions,
) -> Result<()> {
    let min_free_bytes = opts.min_free_bytes;
    let needed = min_free_bytes.saturating_add(file.size - resumable);
    let space_at = if parents_exist {
        parent_of(target).to_path_buf()
    } else {
        nearest_existing(target, root)
    };
    let (avail, _) = fsutil::free_space(&space_at)?;
    if avail < needed {
        return Err(Error::Invalid(format!(
            "{}: not enough free space: {avail} bytes available, {needed} needed ({} for the file, {min_free_bytes} to keep free)",
            file.name,
            file.size - resumable
        )));
    }
    Ok(())
}

/// What step 1-2 hand to the fetch loop and to `finish`.
struct Prepared {
    target: PathBuf,
    temp: PathBuf,
    /// Open read-write, exclusively locked while this pull runs.
    file: Arc<File>,
    /// Its length when opened (a fresh temp file: 0).
    len_at_open: u64,
    /// Blocks still to fetch, one entry per distinct hash with every offset it goes to
    /// (a file of zeros fetches its zero block once).
    missing: MissingBlocks,
    reused: usize,
    /// Blocks copied from the file at the target name ([`copy_from_base`]).
    from_base: usize,
    /// The temp file was created with the record's final mode, so the install need not
    /// set it ([`created_mode`]).
    mode_set: bool,
}

/// Blocks still to fetch: one entry per distinct hash, with every offset it goes to.
type MissingBlocks = Vec<(Block, Vec<u64>)>;

fn prepare(root: &Path, file: &FileInfo, opts: &PullOptions) -> Result<Prepared> {
    if let Some(prep) = create_checked(root, file, opts)? {
        return Ok(prep);
    }
    // 1. The name, the root, free space, the parents. Each path is looked at once: in a
    //    pull of many small files, metadata calls are a large part of the work per file.
    let (target, parents_exist) = safe_join_parents(root, &file.name)?;
    let temp = temp_path(&target);
    // The common case in a checked batch: no temp file yet. Creating it exclusively
    // says so, and that it is a fresh regular file of ours, without looking first.
    let create_mode = created_mode(file.mode);
    let fresh = if opts.batch_checked {
        if !parents_exist {
            ensure_parent_dirs(root, &file.name)?;
        }
        create_temp_new(&temp, create_mode.unwrap_or(0o600))?
    } else {
        None
    };
    let mode_set = fresh.is_some() && create_mode.is_some();
    let (f, len) = match fresh {
        Some(f) => (f, 0),
        None => {
            let temp_meta = fs::symlink_metadata(&temp);
            if !opts.batch_checked {
                check_root(root)?;
                let resumable = match &temp_meta {
                    Ok(md) if md.is_file() => md.len().min(file.size),
                    _ => 0,
                };
                check_free_space(root, &target, parents_exist, file, resumable, opts)?;
                if !parents_exist {
                    ensure_parent_dirs(root, &file.name)?;
                }
            }
            // 2. The temp file, and whatever an interrupted pull left in it.
            open_temp_seen(&temp, temp_meta)?
        }
    };
    let (missing, reused) = blocks_to_fetch(file, &f, len, &temp)?;
    reserve_space(&f, len, file, &temp)?;
    Ok(Prepared {
        target,
        temp,
        file: Arc::new(f),
        len_at_open: len,
        missing,
        reused,
        from_base: 0,
        mode_set,
    })
}

/// Files at least this big get their space reserved before the transfer
/// ([`reserve_space`]); below it the one more syscall per file is not worth it.
const RESERVE_MIN: u64 = 1 << 20;

/// Reserves the space of the rest of `file` (past the `len` bytes the temp file `f`
/// holds) before any block is fetched: ext4 then writes each block into space it already
/// allocated instead of reserving it 4 KiB at a time under the file's lock. Writing 1 GiB
/// in 256 KiB pieces took 0.15 instead of 0.23 CPU-s (`bench/write-cost`), and B's CPU in
/// bench scenario a fell from 1.98 to 1.69 CPU-s (means of six alternating pairs of three
/// runs; BENCHMARKS.md). `fallocate` with `KEEP_SIZE`: the temp file's length still says
/// how much an interrupted pull wrote, for the resume. A disk too full for the file is an
/// error now, with the reservation given back and an empty temp file removed, rather than
/// a failed write after part of the transfer.
fn reserve_space(f: &File, len: u64, file: &FileInfo, temp: &Path) -> Result<()> {
    let rest = file.size.saturating_sub(len);
    if rest < RESERVE_MIN {
        return Ok(());
    }
    match fsutil::preallocate(f, len, rest) {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = fsutil::release_preallocated(f);
            if len == 0 {
                let _ = fs::remove_file(temp);
            }
            if e.raw_os_error() == Some(libc::ENOSPC) {
                Err(Error::Invalid(format!(
                    "{}: not enough free space: {rest} bytes needed for the file",
                    file.name
                )))
            } else {
                Err(e).at(temp)
            }
        }
    }
}

/// The blocks of `file` still to fetch, one entry per distinct hash with every offset it
/// goes to (a file of zeros fetches its zero block once), and how many blocks the first
/// `len` bytes of the open temp file `f` already hold, verified.
fn blocks_to_fetch(
    file: &FileInfo,
    f: &File,
    len: u64,
    temp: &Path,
) -> Result<(MissingBlocks, usize)> {
    let mut missing = MissingBlocks::new();
    let mut by_hash: HashMap<[u8; 32], usize> = HashMap::new();
    let mut reused = 0usize;
    let mut buf = Vec::new();
    for b in &file.blocks {
        if b.size == 0 {
            continue;
        }
        let end = b.offset + u64::from(b.size);
        if end <= len {
            buf.resize(b.size as usize, 0);
            read_exact_at(f, &mut buf, b.offset).at(temp)?;
            if blake3::hash(&buf).as_bytes() == &b.hash {
                reused += 1;
                continue;
            }
        }
        match by_hash.get(&b.hash) {
            Some(&i) if missing[i].0.size == b.size => missing[i].1.push(b.offset),
            _ => {
                by_hash.insert(b.hash, missing.len());
                missing.push((*b, vec![b.offset]));
            }
        }
    }
    Ok((missing, reused))
}

/// The common case of a checked batch in one call: the temp file created under the
/// batch's open folder root ([`PullOptions::root_dir`]) by a kernel that refuses a
/// symlink or a non-directory anywhere on the way, so the parents need no `lstat` of
/// their own and cannot be swapped between a check and the create. `None` when that is
/// not possible or anything is unusual (a temp file already there, a parent missing or
/// in the way): then [`prepare`] takes its usual steps, which also say what is wrong.
fn create_checked(root: &Path, file: &FileInfo, opts: &PullOptions) -> Result<Option<Prepared>> {
    let Some(dir) = opts.root_dir.as_deref().filter(|_| opts.batch_checked) else {
        return Ok(None);
    };
    check_name(&file.name)?;
    let temp_name = fsutil::temp_name(&file.name);
    let mode = created_mode(file.mode);
    let f = match fsutil::create_new_beneath(dir, &temp_name, mode.unwrap_or(0o600)) {
        Ok(f) => f,
        Err(_) => return Ok(None),
    };
    let temp = root.join(&temp_name);
    lock_temp(&f, &temp)?;
    let (missing, reused) = blocks_to_fetch(file, &f, 0, &temp)?;
    reserve_space(&f, 0, file, &temp)?;
    Ok(Some(Prepared {
        target: root.join(&file.name),
        temp,
        file: Arc::new(f),
        len_at_open: 0,
        missing,
        reused,
        from_base: 0,
        mode_set: mode.is_some(),
    }))
}

/// Copies the missing blocks that `base` (the target's last local record) says the file
/// at the target name holds, in one pass in the old file's order: a helper thread reads
/// and BLAKE3-verifies, this one writes to every offset that needs the block. A block
/// that does not verify (the file changed since it was recorded) stays missing, for the
/// block source. Returns how many blocks it copied and drops them from `prep.missing`.
/// The old file's page cache is given back as the read passes it ([`ReadRelease`]).
fn copy_from_base(prep: &mut Prepared, base: &[Block]) -> Result<usize> {
    if base.is_empty() || prep.missing.is_empty() {
        return Ok(0);
    }
    let at: HashMap<[u8; 32], &Block> = base.iter().map(|b| (b.hash, b)).collect();
    let wanted = |b: &Block| at.get(&b.hash).is_some_and(|o| o.size == b.size);
    if !prep.missing.iter().any(|(b, _)| wanted(b)) {
        return Ok(0);
    }
    let old = match open_no_follow(&prep.target) {
        Ok(f) => f,
        Err(_) => return Ok(0), // gone or not readable: the source finds the blocks
    };
    if !old.metadata().is_ok_and(|m| m.is_file()) {
        return Ok(0);
    }
    // In the old file's order: a sequential read, whatever order the new blocks are in.
    let mut todo: Vec<(u64, usize)> = prep
        .missing
        .iter()
        .enumerate()
        .filter(|(_, (b, _))| wanted(b))
        .map(|(i, (b, _))| (at[&b.hash].offset, i))
        .collect();
    todo.sort_unstable();
    // Two threads: this one writes while a helper reads and verifies the next blocks.
    let mut copied = vec![false; prep.missing.len()];
    let missing = &prep.missing;
    std::thread::scope(|s| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>)>(BASE_READ_AHEAD);
        let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        s.spawn(move || {
            let mut read = ReadRelease::new(&old);
            for (old_off, i) in todo {
                let block = &missing[i].0;
                let mut buf = back_rx.try_recv().unwrap_or_default();
                buf.resize(block.size as usize, 0);
                let good = read_exact_at(&old, &mut buf, old_off).is_ok()
                    && blake3::hash(&buf).as_bytes() == &block.hash;
                read.up_to(old_off + buf.len() as u64);
                if good && tx.send((i, buf)).is_err() {
                    return; // the writer stopped on an error
                }
            }
        });
        for (i, buf) in rx {
            for &off in &missing[i].1 {
                write_at(&prep.file, &buf, off).at(&prep.temp)?;
            }
            copied[i] = true;
            let _ = back_tx.send(buf);
        }
        Ok(())
    })?;
    let n = copied.iter().filter(|c| **c).count();
    let mut i = 0;
    prep.missing.retain(|_| {
        i += 1;
        !copied[i - 1]
    });
    Ok(n)
}

/// Opens `p` for reading, refusing a symlink at its last component.
fn install(root: &Path, staged: Staged, durability: Durability) -> Result<PullOutcome> {
    let Staged {
        record,
        prep,
        expected,
        concurrent_loser: local_is_concurrent_loser,
        conflict_device,
        opts,
    } = staged;
    let (file, expected, conflict_device) = (&record, expected.as_ref(), &conflict_device);
    let Prepared {
        target,
        temp,
        file: f,
        mode_set,
        ..
    } = prep;

    // 4. Mode, mtime and data made durable together, before the re-check: the slow
    //    part happens first, so the window between re-check and rename stays short.
    if durability == Durability::ThisFile {
        f.set_times(fs::FileTimes::new().set_modified(system_time(file.mtime_ns)))
            .at(&temp)?;
        if !mode_set {
            set_fd_mode(&f, file_mode(file.mode)).at(&temp)?;
        }
        let t = std::time::Instant::now();
        f.sync_all().at(&temp)?;
        if file.size > INLINE_WRITE as u64 {
            tracing::debug!(name = %file.name, size = file.size, fsync_ms = t.elapsed().as_millis() as u64, "temp file made durable");
        }
    }
    // A temp left behind (`TargetChanged`) gets a fresh mtime back, so that
    // `cleanup_temp_files` does not take it for an old leftover.
    let left_behind = |f: &File| -> Result<PullOutcome> {
        let _ = f.set_times(fs::FileTimes::new().set_modified(SystemTime::now()));
        Ok(PullOutcome::TargetChanged)
    };

    // 5. Re-check the target: is it still what the index says? Where nothing is
    //    expected there (a new file, the common case), the rename that refuses to
    //    overwrite is that check: it fails only when something appeared at the target
    //    since, and then the full check below decides what to do with it.
    if expected.is_none() && !local_is_concurrent_loser {
        match rename_noreplace(&temp, &target) {
            Ok(()) => return finish_placed(&f, &target, durability, None),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(&target, e)),
        }
    }
    let mut on_disk = try_stat(&target)?;
    let changed = match (expected, &on_disk) {
        (_, None) => false, // gone (deleted locally, not yet scanned): the edit wins
        (None, Some(_)) => true,
        (Some(e), Some(d)) => !e.matches(d),
    };
    // What is on disk may already be exactly this version: put in place by a pull that
    // was cut off (crash, kill -9) before the index recorded it. That is neither a local
    // edit nor a losing version, and a conflict copy of it would be one made up from
    // nothing. Same size and the record's mtime are checked first; only then the bytes.
    if (changed || local_is_concurrent_loser)
        && on_disk.is_some_and(|d| {
            d.kind == FileKind::File && d.size == file.size && d.mtime_ns == file.mtime_ns
        })
        && holds_content(&target, file)
    {
        drop(f);
        let _ = fs::remove_file(&temp);
        let inode = try_stat(&target)?.map(|d| d.inode).unwrap_or(0);
        return Ok(PullOutcome::Done { inode });
    }
    if changed && !opts.allow_conflict {
        return left_behind(&f);
    }
    if on_disk.is_some_and(|d| d.kind == FileKind::Dir) {
        // A directory cannot be kept as a conflict copy; an empty one can go.
        if !remove_dir_if_empty(&target)? {
            return left_behind(&f);
        }
        on_disk = None;
    }
    let mut kept_as = None;
    if on_disk.is_some() && (changed || local_is_concurrent_loser) {
        // The on-disk content is the losing version: keep it under its conflict name.
        kept_as = Some(move_aside_as_conflict(
            root,
            &file.name,
            &target,
            conflict_device,
        )?);
        on_disk = None;
    }

    // 6. Versioning: the replaced file goes to the trash can instead of being unlinked.
    if let (Some(_), Some(d)) = (&opts.versioning, &on_disk) {
        if d.kind == FileKind::File {
            move_to_versions(root, &file.name, &target)?;
            on_disk = None;
        }
    }

    // 7. Into place. Where nothing should be at the target any more, refuse to overwrite
    //    whatever may have appeared there meanwhile. An existing target is swapped out
    //    atomically (below); if it went away since the re-check, there is nothing to swap.
    let swapped = match on_disk {
        Some(_) => match fsutil::rename_exchange(&temp, &target) {
            Ok(done) => Some(done),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                on_disk = None;
                None
            }
            Err(e) => return Err(Error::io(&target, e)),
        },
        None => None,
    };
    if on_disk.is_none() {
        match rename_noreplace(&temp, &target) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return left_behind(&f),
            Err(e) => return Err(Error::io(&target, e)),
        }
    } else if swapped == Some(true) {
        // The file replaced is now at the temp name. It was checked a moment ago; a
        // local write in that moment (in place, or a file renamed over it) must not be
        // lost to the rename.
        if let Some(k) = settle_replaced(root, &file.name, &temp, on_disk, conflict_device)? {
            kept_as = Some(k);
        }
    } else {
        fs::rename(&temp, &target).at(&target)?;
    }
    finish_placed(&f, &target, durability, kept_as)
}

/// The new file `f` is at `target`: its directory made durable (unless the caller does
/// that for a batch), and the outcome with its inode.
fn finish_placed(
    f: &File,
    target: &Path,
    durability: Durability,
    kept_as: Option<String>,
) -> Result<PullOutcome> {
    if durability == Durability::ThisFile {
        fsync_dir(parent_of(target))?;
    }
    let inode = fsutil::meta_of(&f.metadata().at(target)?).inode;
    Ok(placed(kept_as, inode))
}

/// The outcome of putting a new entry with `inode` in place: a conflict when the old one
/// was kept as the copy `kept_as`.
fn placed(kept_as: Option<String>, inode: u64) -> PullOutcome {
    match kept_as {
        Some(kept_as) => PullOutcome::Conflict { kept_as, inode },
        None => PullOutcome::Done { inode },
    }
}

/// After an exchange put the new file in place, `swapped` holds what was replaced. It is
/// removed if it is what the re-check saw (`checked`); otherwise it changed in between
/// and is kept as a conflict copy, whose name is returned.
fn settle_replaced(
    root: &Path,
    name: &str,
    swapped: &Path,
    checked: Option<DiskMeta>,
    device: &DeviceId,
) -> Result<Option<String>> {
    match (try_stat(swapped)?, checked) {
        (None, _) => Ok(None),
        (Some(r), Some(c))
            if r.kind == c.kind
                && r.inode == c.inode
                && r.size == c.size
                && r.mtime_ns == c.mtime_ns =>
        {
            remove_replaced(swapped, r.size).map(|()| None)
        }
        (Some(_), _) => {
            tracing::info!(%name, "changed on disk as it was being replaced; keeping that version");
            move_aside_as_conflict(root, name, swapped, device).map(Some)
        }
    }
}

/// Files at least this large are freed on another thread once removed.
const FREE_LATER_MIN: u64 = 16 << 20;

/// Removes the replaced file. A big one is opened first: the unlink then only drops its
/// name, and its pages and extents are freed when that descriptor closes, on a thread of
/// its own (for a 1 GiB file that took about 0.24 s, after the new file was in place).
fn remove_replaced(path: &Path, size: u64) -> Result<()> {
    let keep_open = (size >= FREE_LATER_MIN)
        .then(|| open_no_follow(path).ok())
        .flatten();
    fs::remove_file(path).at(path)?;
    if let Some(f) = keep_open {
        // If no thread can be started, the closure and the file are dropped here.
        let _ = std::thread::Builder::new()
            .name("ferry-free".into())
            .spawn(move || drop(f));
    }
    Ok(())
}

/// True when the file at `path` holds exactly `file`'s blocks (each BLAKE3-checked).
fn holds_content(path: &Path, file: &FileInfo) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(f) = File::open(path) else {
        return false;
    };
    if f.metadata().map(|m| m.len()).ok() != Some(file.size) {
        return false;
    }
    let mut buf = Vec::new();
    file.blocks.iter().all(|b| {
        buf.resize(b.size as usize, 0);
        f.read_exact_at(&mut buf, b.offset).is_ok() && blake3::hash(&buf).as_bytes() == &b.hash
    })
}

/// Applies a directory record: creates it (parents too) or fixes its mode. Anything
/// else at that name (a file, a link) is left alone: `TargetChanged`, so the caller
/// deletes or resolves it first. Directory mtimes are not synced.
pub async fn apply_dir(root: &Path, file: &FileInfo) -> Result<PullOutcome> {
    apply_dir_over(root, file, &InTheWay::default()).await
}

/// What is known of the entry that may stand where a directory or symlink is to be
/// made: what the index expects there, whether that local version lost a conflict
/// against the one being applied (and whose it was), and the folder's versioning.
#[derive(Debug, Clone, Default)]
pub struct InTheWay {
    pub expected: Option<ExpectedLocal>,
    pub concurrent_loser: bool,
    pub conflict_device: Option<DeviceId>,
    pub versioning: Option<Versioning>,
}

/// As [`apply_dir`], and a file or symlink in the way is dealt with as a new version of
/// the name deals with the old one: if it is what the index expects, it is replaced
/// (removed, or moved to the versions with versioning) — unless its version lost a
/// conflict to this one, then it is kept as a conflict copy. Anything the index does not
/// know of stays: `TargetChanged` (rescan, then decide).
pub async fn apply_dir_over(root: &Path, file: &FileInfo, way: &InTheWay) -> Result<PullOutcome> {
    let mut out = apply_dirs(root, vec![(file.clone(), way.clone())]).await;
    out.pop()
        .unwrap_or_else(|| Err(Error::Invalid(format!("{}: no outcome", file.name))))
}

/// [`apply_dir_over`] for several directories, on one blocking thread. The new entries
/// are made durable together at the end, one fsync per distinct parent directory,
/// instead of one after each directory made: on a journaled file system each of those
/// fsyncs waits for a journal commit. A directory is reported done only once its entry
/// is durable; should a parent's fsync fail, every directory made under it gets that
/// error. Outcomes come back in the given order.
pub async fn apply_dirs(root: &Path, dirs: Vec<(FileInfo, InTheWay)>) -> Vec<Result<PullOutcome>> {
    let n = dirs.len();
    let root = root.to_path_buf();
    let joined = tokio::task::spawn_blocking(move || {
        let mut out = Vec::with_capacity(dirs.len());
        // For each directory, the parents whose fsync makes it durable.
        let mut needs: Vec<Vec<PathBuf>> = Vec::with_capacity(dirs.len());
        for (file, way) in &dirs {
            let mut made = Vec::new();
            out.push(apply_dir_deferred(&root, file, way, &mut made));
            needs.push(made);
        }
        let mut failed: HashMap<PathBuf, String> = HashMap::new();
        let distinct: std::collections::BTreeSet<&PathBuf> = needs.iter().flatten().collect();
        for d in distinct {
            if let Err(e) = fsync_dir(d) {
                failed.insert(d.clone(), e.to_string());
            }
        }
        if !failed.is_empty() {
            for (r, made) in out.iter_mut().zip(&needs) {
                if let Some(e) = made
                    .iter()
                    .find_map(|d| failed.get(d))
                    .filter(|_| r.is_ok())
                {
                    *r = Err(Error::Invalid(format!(
                        "making a new directory durable: {e}"
                    )));
                }
            }
        }
        out
    })
    .await;
    joined.unwrap_or_else(|e| {
        (0..n)
            .map(|_| Err(Error::Invalid(format!("puller task failed: {e}"))))
            .collect()
    })
}

/// The work of [`apply_dir_over`] but the fsyncs of the directories it makes: the
/// parent of each one made is pushed to `made_in`, for the caller to fsync.
fn apply_dir_deferred(
    root: &Path,
    file: &FileInfo,
    way: &InTheWay,
    made_in: &mut Vec<PathBuf>,
) -> Result<PullOutcome> {
    if file.kind != FileKind::Dir || file.deleted {
        return Err(Error::Invalid(format!(
            "{}: apply_dir applies directories, not this record",
            file.name
        )));
    }
    let target = safe_join(root, &file.name)?;
    check_root(root)?;
    let mode = dir_mode(file.mode);
    let mut kept_as = None;
    match try_stat(&target)? {
        Some(d) if d.kind == FileKind::Dir => {
            if d.mode != mode {
                fsutil::set_mode(&target, mode)?;
            }
            return Ok(PullOutcome::Done { inode: d.inode });
        }
        Some(d) => match make_way(root, &file.name, &target, &d, way)? {
            Some(k) => kept_as = k,
            None => return Ok(PullOutcome::TargetChanged),
        },
        None => {}
    }
    ensure_parent_dirs_deferred(root, &file.name, made_in)?;
    ensure_real_dir_deferred(&target, made_in)?;
    fsutil::set_mode(&target, mode)?;
    let d = try_stat(&target)?.ok_or_else(|| vanished(&target))?;
    Ok(placed(kept_as, d.inode))
}

/// Clears a file or symlink `d` at `target` (named `name`) for a new entry of another
/// kind, as [`apply_dir_over`] describes. `Some(None)`: removed; `Some(Some(kept))`: kept
/// as the conflict copy `kept`; `None`: not ours to touch (`TargetChanged`).
fn make_way(
    root: &Path,
    name: &str,
    target: &Path,
    d: &DiskMeta,
    way: &InTheWay,
) -> Result<Option<Option<String>>> {
    if d.kind == FileKind::Dir || !way.expected.is_some_and(|e| e.matches(d)) {
        return Ok(None);
    }
    if way.concurrent_loser {
        let device = way.conflict_device.ok_or_else(|| {
            Error::Invalid(format!("{name}: a conflict copy needs the losing device"))
        })?;
        return Ok(Some(Some(move_aside_as_conflict(
            root, name, target, &device,
        )?)));
    }
    if way.versioning.is_some() && d.kind == FileKind::File {
        move_to_versions(root, name, target)?;
    } else {
        fs::remove_file(target).at(target)?;
    }
    fsync_dir(parent_of(target))?;
    Ok(Some(None))
}

/// Applies a symlink record: creates the link itself (never following anything), with
/// its mtime. An existing link with the same target is kept; any other existing entry
/// is replaced only if it is exactly what the index expects (and is not a directory).
pub async fn apply_symlink(
    root: &Path,
    file: &FileInfo,
    expected_local: Option<&ExpectedLocal>,
) -> Result<PullOutcome> {
    let way = InTheWay {
        expected: expected_local.copied(),
        ..InTheWay::default()
    };
    apply_symlink_over(root, file, &way).await
}

/// As [`apply_symlink`], and: a file whose version lost a conflict to this link is kept
/// as a conflict copy instead of being replaced, with versioning a replaced file goes to
/// the versions, and an empty directory in the way is removed (a directory replaced by a
/// link: its contents' deletions come after the link in the pull order, so the link
/// waits for a retry until they are done).
pub async fn apply_symlink_over(
    root: &Path,
    file: &FileInfo,
    way: &InTheWay,
) -> Result<PullOutcome> {
    let link_to = match (&file.symlink_target, file.kind, file.deleted) {
        (Some(t), FileKind::Symlink, false) if !t.is_empty() && !t.contains('\0') => t.clone(),
        _ => {
            return Err(Error::Invalid(format!(
                "{}: not a valid symlink record (kind {:?}, target {:?})",
                file.name, file.kind, file.symlink_target
            )))
        }
    };
    let (root, file, way) = (root.to_path_buf(), file.clone(), way.clone());
    blocking(move || {
        let target = safe_join(&root, &file.name)?;
        check_root(&root)?;
        let mut on_disk = try_stat(&target)?;
        let mut kept_as = None;
        match on_disk {
            None => {}
            Some(d) if d.kind == FileKind::Symlink && read_link_str(&target)? == link_to => {
                // Already there: only the time may differ.
                fsutil::set_mtime(&target, file.mtime_ns)?;
                return Ok(PullOutcome::Done { inode: d.inode });
            }
            Some(d) if d.kind == FileKind::Dir => {
                if !remove_dir_if_empty(&target)? {
                    return Ok(PullOutcome::TargetChanged);
                }
                on_disk = None;
            }
            Some(d) if way.concurrent_loser && d.kind == FileKind::File => {
                match make_way(&root, &file.name, &target, &d, &way)? {
                    Some(k) => kept_as = k,
                    None => return Ok(PullOutcome::TargetChanged),
                }
                on_disk = None;
            }
            Some(d)
                if way.expected.is_some_and(|e| e.matches(&d))
                    && way.versioning.is_some()
                    && d.kind == FileKind::File =>
            {
                move_to_versions(&root, &file.name, &target)?;
                on_disk = None;
            }
            Some(d) if way.expected.is_some_and(|e| e.matches(&d)) => {}
            Some(_) => return Ok(PullOutcome::TargetChanged),
        }
        ensure_parent_dirs(&root, &file.name)?;
        let temp = temp_path(&target);
        remove_stale_temp(&temp)?;
        make_symlink(&link_to, &temp)?;
        fsutil::set_mtime(&temp, file.mtime_ns)?;
        if on_disk.is_none() {
            match rename_noreplace(&temp, &target) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let _ = fs::remove_file(&temp);
                    return Ok(PullOutcome::TargetChanged);
                }
                Err(e) => return Err(Error::io(&target, e)),
            }
        } else {
            fs::rename(&temp, &target).at(&target)?;
        }
        fsync_dir(parent_of(&target))?;
        let d = try_stat(&target)?.ok_or_else(|| vanished(&target))?;
        Ok(placed(kept_as, d.inode))
    })
    .await
}

/// Applies a deletion. A file or symlink is removed only if it still matches what the
/// index expects (with versioning, a file moves to `.ferry/versions/`); a directory only
/// once empty, where Ferry's own `.ferry-tmp-*` leftovers do not count (they are removed
/// with it). Anything else: `TargetChanged`. Already gone: `Done`.
pub async fn apply_delete(
    root: &Path,
    file: &FileInfo,
    expected_local: Option<&ExpectedLocal>,
    versioning: Option<&Versioning>,
) -> Result<PullOutcome> {
    if !file.deleted {
        return Err(Error::Invalid(format!(
            "{}: apply_delete needs a deletion record",
            file.name
        )));
    }
    let (root, file) = (root.to_path_buf(), file.clone());
    let (expected, versioning) = (expected_local.copied(), versioning.copied());
    blocking(move || {
        let target = safe_join(&root, &file.name)?;
        check_root(&root)?;
        // A temp file of this name (an interrupted pull of an earlier version) will
        // never be finished now.
        remove_unlocked_temp(&temp_path(&target))?;
        let Some(d) = try_stat(&target)? else {
            return Ok(PullOutcome::Done { inode: 0 });
        };
        if d.kind == FileKind::Dir {
            let kinds_agree =
                file.kind == FileKind::Dir && expected.is_none_or(|e| e.kind == FileKind::Dir);
            if !kinds_agree || !remove_dir_if_empty(&target)? {
                return Ok(PullOutcome::TargetChanged);
            }
        } else {
            if !expected.is_some_and(|e| e.matches(&d)) {
                return Ok(PullOutcome::TargetChanged);
            }
            if versioning.is_some() && d.kind == FileKind::File {
                move_to_versions(&root, &file.name, &target)?;
            } else {
                fs::remove_file(&target).at(&target)?;
            }
        }
        fsync_dir(parent_of(&target))?;
        Ok(PullOutcome::Done { inode: 0 })
    })
    .await
}

/// Removes the temp file of `name` (under `root`) if there is one and no pull holds it:
/// used when the name no longer needs pulling. Returns whether one was removed.
pub fn remove_temp_of(root: &Path, name: &str) -> Result<bool> {
    let target = safe_join(root, name)?;
    check_root(root)?;
    remove_unlocked_temp(&temp_path(&target))
}

/// Removes the temp file at `temp` unless a puller holds it; a link or other non-file
/// planted there goes too. Returns whether something was removed.
fn remove_unlocked_temp(temp: &Path) -> Result<bool> {
    match fs::symlink_metadata(temp) {
        Ok(m) if m.is_dir() => Ok(false),
        Ok(m) if m.is_file() && is_locked(temp) => Ok(false),
        Ok(_) => match fs::remove_file(temp) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(temp, e)),
        },
        Err(_) => Ok(false),
    }
}

/// Removes `.ferry-tmp-*` files older than `max_age` (by mtime, which every block write
/// refreshes) anywhere under `root` except in
/// `.ferry/`, skipping any a puller holds open. Never follows symlinks. Returns how many
/// were removed; unreadable directories are skipped with a warning.
pub fn cleanup_temp_files(root: &Path, max_age: Duration) -> Result<usize> {
    Ok(cleanup_and_list_temp_files(root, max_age)?.0)
}

/// As [`cleanup_temp_files`], and also returns the folder-relative names of the files
/// whose temp files remain (fresh ones), so the caller can drop those no pull needs.
/// Temp files of names too long to carry in the temp name are not listed.
pub fn cleanup_and_list_temp_files(root: &Path, max_age: Duration) -> Result<(usize, Vec<String>)> {
    check_root(root)?;
    let cutoff = SystemTime::now().checked_sub(max_age).unwrap_or(UNIX_EPOCH);
    let mut removed = 0;
    let mut kept = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "temp cleanup skipped a directory: {e}");
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if ft.is_dir() {
                if !(dir == root && name == FERRY_DIR) {
                    stack.push(path);
                }
                continue;
            }
            if !ft.is_file() || !is_temp_name(&name) {
                continue;
            }
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < cutoff);
            if old && !is_locked(&path) {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), "cannot remove temp file: {e}")
                    }
                }
            } else if let Some(name) = target_name_of_temp(root, &path) {
                kept.push(name);
            }
        }
    }
    Ok((removed, kept))
}

/// The folder-relative name a temp file at `path` is building, when its name says so.
fn target_name_of_temp(root: &Path, path: &Path) -> Option<String> {
    let base = path.file_name()?.to_str()?;
    let target = base.strip_prefix(fsutil::TEMP_PREFIX)?;
    let rel = path.parent()?.strip_prefix(root).ok()?.join(target);
    let name = rel.to_str()?.replace('\\', "/");
    // A name cut to fit and given a hash suffix (`~` + 8 hex digits, at the length
    // limit) does not map back.
    let hashed = base.len() + 4 > MAX_NAME_BYTES
        && base.len() > 9
        && base.as_bytes()[base.len() - 9] == b'~'
        && base.as_bytes()[base.len() - 8..]
            .iter()
            .all(u8::is_ascii_hexdigit);
    (!hashed).then_some(name)
}

/// Removes versioned copies older than `keep_days` (by the stamp in their name) from
/// `.ferry/versions/`, then the directories that became empty. `keep_days == 0` keeps
/// everything. Returns how many copies were removed.
pub fn prune_versions(root: &Path, keep_days: u32) -> Result<usize> {
    let base = root.join(VERSIONS_DIR);
    if keep_days == 0 || !fs::symlink_metadata(&base).is_ok_and(|m| m.is_dir()) {
        return Ok(0);
    }
    let cutoff = OffsetDateTime::now_utc() - time::Duration::days(i64::from(keep_days));
    let mut removed = 0;
    prune_dir(&base, cutoff, &mut removed)?;
    Ok(removed)
}

/// Prunes one directory; returns true when it is empty afterwards.
fn prune_dir(dir: &Path, cutoff: OffsetDateTime, removed: &mut usize) -> Result<bool> {
    let mut left = 0usize;
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let path = entry.path();
        let ft = entry.file_type().at(&path)?;
        if ft.is_dir() {
            if prune_dir(&path, cutoff, removed)? {
                fs::remove_dir(&path).at(&path)?;
            } else {
                left += 1;
            }
            continue;
        }
        let stamp = version_stamp(&entry.file_name().to_string_lossy());
        if stamp.is_some_and(|t| t < cutoff) {
            fs::remove_file(&path).at(&path)?;
            *removed += 1;
        } else {
            left += 1;
        }
    }
    Ok(left == 0)
}

/// The time in a versioned copy's name: `~YYYYMMDD-HHMMSS` followed by the end or `.ext`.
fn version_stamp(base: &str) -> Option<OffsetDateTime> {
    let i = base.rfind('~')?;
    let s = &base.as_bytes()[i + 1..];
    if s.len() < 15 || (s.len() > 15 && s[15] != b'.') || s[8] != b'-' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = std::str::from_utf8(&s[r]).ok()?;
        t.bytes()
            .all(|b| b.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let month = time::Month::try_from(u8::try_from(num(4..6)?).ok()?).ok()?;
    let date =
        time::Date::from_calendar_date(i32::try_from(num(0..4)?).ok()?, month, num(6..8)? as u8)
            .ok()?;
    let t = time::Time::from_hms(num(9..11)? as u8, num(11..13)? as u8, num(13..15)? as u8).ok()?;
    Some(time::PrimitiveDateTime::new(date, t).assume_utc())
}

/// `<stem>~YYYYMMDD-HHMMSS<.ext>` for a basename, cut to fit 255 bytes.
fn version_name(base: &str, when: OffsetDateTime) -> String {
    let (stem, ext) = match base.rfind('.') {
        Some(i) if i > 0 => (&base[..i], &base[i..]),
        _ => (base, ""),
    };
    let stamp = when
        .format(format_description!(
            "~[year][month][day]-[hour][minute][second]"
        ))
        .unwrap_or_else(|_| "~00000000-000000".to_string());
    let room = MAX_NAME_BYTES.saturating_sub(stamp.len() + ext.len());
    format!("{}{stamp}{ext}", &stem[..floor_char_boundary(stem, room)])
}

/// Moves the file at `target` (named `name`) into `.ferry/versions/`, never overwriting
/// an older copy: a clash takes the next second.
fn move_to_versions(root: &Path, name: &str, target: &Path) -> Result<PathBuf> {
    let (dir, base) = match name.rfind('/') {
        Some(i) => (&name[..i], &name[i + 1..]),
        None => ("", name),
    };
    let mut vdir = root.to_path_buf();
    for comp in VERSIONS_DIR.split('/').chain(dir.split('/')) {
        if comp.is_empty() {
            continue;
        }
        vdir.push(comp);
        ensure_real_dir(&vdir)?;
    }
    let mut when = OffsetDateTime::now_utc();
    for _ in 0..120 {
        let dest = vdir.join(version_name(base, when));
        match rename_noreplace(target, &dest) {
            Ok(()) => {
                fsync_dir(&vdir)?;
                return Ok(dest);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                when += time::Duration::SECOND;
            }
            Err(e) => return Err(Error::io(target, e)),
        }
    }
    Err(Error::Invalid(format!(
        "{name}: no free name for a versioned copy in {}",
        vdir.display()
    )))
}

/// Renames the on-disk `target` to its conflict name (a clash takes the next second, so
/// an earlier conflict copy is never overwritten). Returns the folder-relative name.
fn move_aside_as_conflict(
    root: &Path,
    name: &str,
    target: &Path,
    device: &DeviceId,
) -> Result<String> {
    let mut when = OffsetDateTime::now_utc();
    for _ in 0..120 {
        let cname = conflict_name(name, when, device);
        let cpath = safe_join(root, &cname)?;
        match rename_noreplace(target, &cpath) {
            Ok(()) => {
                tracing::info!(%name, kept_as = %cname, "conflict: kept the losing version");
                return Ok(cname);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                when += time::Duration::SECOND;
            }
            Err(e) => return Err(Error::io(target, e)),
        }
    }
    Err(Error::Invalid(format!("{name}: no free conflict name")))
}

/// The root must exist, be a directory and hold the `.ferry` marker: a folder without
/// its marker (an unmounted disk leaves an empty mount point) is never written to, and
/// the marker is never created here, or the next sync would fill the mount point.
fn check_root(root: &Path) -> Result<()> {
    match fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::io(
                root,
                io::Error::new(
                    io::ErrorKind::NotADirectory,
                    "folder root is not a directory",
                ),
            ))
        }
        Err(e) => return Err(Error::io(root, e)),
    }
    match fs::symlink_metadata(root.join(FERRY_DIR)) {
        Ok(m) if m.is_dir() => Ok(()),
        _ => Err(Error::io(
            root,
            io::Error::new(
                io::ErrorKind::NotFound,
                "the folder marker .ferry/ is missing (unmounted disk?): not writing to this folder",
            ),
        )),
    }
}

/// Creates the missing parent directories of `name` under `root`, each checked to be a
/// real directory (never a symlink) once it exists.
fn ensure_parent_dirs(root: &Path, name: &str) -> Result<()> {
    let mut made_in = Vec::new();
    ensure_parent_dirs_deferred(root, name, &mut made_in)?;
    sync_made(&made_in)
}

/// [`ensure_parent_dirs`], leaving the fsyncs to the caller (see [`ensure_real_dir_deferred`]).
fn ensure_parent_dirs_deferred(root: &Path, name: &str, made_in: &mut Vec<PathBuf>) -> Result<()> {
    let comps: Vec<&str> = name.split('/').collect();
    let mut p = root.to_path_buf();
    for comp in &comps[..comps.len() - 1] {
        p.push(comp);
        ensure_real_dir_deferred(&p, made_in)?;
    }
    Ok(())
}

/// Makes sure `p` is a real directory: creates it (mode 0755, durable) if missing,
/// refuses a symlink or anything else in its place.
fn ensure_real_dir(p: &Path) -> Result<()> {
    let mut made_in = Vec::new();
    ensure_real_dir_deferred(p, &mut made_in)?;
    sync_made(&made_in)
}

/// fsyncs each directory in `dirs` once.
fn sync_made(dirs: &[PathBuf]) -> Result<()> {
    let distinct: std::collections::BTreeSet<&PathBuf> = dirs.iter().collect();
    for d in distinct {
        fsync_dir(d)?;
    }
    Ok(())
}

/// [`ensure_real_dir`] without the fsync: when it makes `p`, it pushes `p`'s parent to
/// `made_in`, and `p` is durable only once the caller has fsynced that.
fn ensure_real_dir_deferred(p: &Path, made_in: &mut Vec<PathBuf>) -> Result<()> {
    let not_dir = || {
        Error::io(
            p,
            io::Error::new(
                io::ErrorKind::NotADirectory,
                "exists and is not a directory (or is a symlink); refusing to write through it",
            ),
        )
    };
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => return Err(not_dir()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(p, e)),
    }
    let mut b = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o755);
    }
    match b.create(p) {
        Ok(()) => made_in.push(parent_of(p).to_path_buf()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(p, e)),
    }
    // Re-check: someone may have raced us with a symlink.
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        _ => Err(not_dir()),
    }
}

/// Removes a directory that is empty but for Ferry temp files nobody holds open (those
/// are removed too). Returns false, touching nothing else, when it has other content.
fn remove_dir_if_empty(dir: &Path) -> Result<bool> {
    let mut temps = Vec::new();
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        let path = entry.path();
        if is_file && is_temp_name(&entry.file_name().to_string_lossy()) && !is_locked(&path) {
            temps.push(path);
        } else {
            return Ok(false);
        }
    }
    for t in temps {
        fs::remove_file(&t).at(&t)?;
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        // Something appeared meanwhile.
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(false),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// Opens (or creates) the temp file for writing without following a symlink, refuses a
/// hard link to another file, and locks it so two pulls never write one temp file.
/// `seen` is what `lstat` said of the temp name a moment ago. Also returns the open
/// file's length.
fn open_temp_seen(temp: &Path, seen: io::Result<fs::Metadata>) -> Result<(File, u64)> {
    remove_stale_temp_if_not_file_seen(temp, seen)?;
    let f = match open_rw(temp) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            // A read-only mode set just before an earlier rename that never happened.
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(temp, fs::Permissions::from_mode(0o600)).at(temp)?;
            }
            open_rw(temp).at(temp)?
        }
        r => r.at(temp)?,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let md = f.metadata().at(temp)?;
        if md.nlink() > 1 {
            // Someone hard-linked our temp name to another file; writing would change it.
            drop(f);
            fs::remove_file(temp).at(temp)?;
            return open_temp_seen(temp, fs::symlink_metadata(temp));
        }
        lock_temp(&f, temp)?;
        Ok((f, md.len()))
    }
    #[cfg(not(unix))]
    {
        let len = f.metadata().at(temp)?.len();
        Ok((f, len))
    }
}

/// Creates the temp file, failing if the name exists: `None` then (or when its
/// directory is gone), for [`open_temp_seen`] to look at what is there. A file this
/// creates is a fresh, empty regular file with one link, already locked.
fn create_temp_new(temp: &Path, mode: u32) -> Result<Option<File>> {
    let mut o = fs::OpenOptions::new();
    o.read(true).write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(mode).custom_flags(libc::O_NOFOLLOW);
    }
    #[cfg(not(unix))]
    let _ = mode;
    match o.open(temp) {
        Ok(f) => {
            lock_temp(&f, temp)?;
            Ok(Some(f))
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::AlreadyExists | io::ErrorKind::NotFound
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::io(temp, e)),
    }
}

/// Locks an open temp file so two pulls never write it at once.
fn lock_temp(f: &File, temp: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: flock on a file descriptor the caller owns and keeps open.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Error::io(
                temp,
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "another pull of this file is in progress",
                ),
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (f, temp);
    Ok(())
}

fn open_rw(p: &Path) -> io::Result<File> {
    let mut o = fs::OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Private until the final mode is set just before the rename.
        o.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    o.open(p)
}

/// A temp name occupied by something that is not a regular file (a symlink planted
/// there, a directory) is removed if it can be, refused otherwise.
fn remove_stale_temp_if_not_file(temp: &Path) -> Result<()> {
    remove_stale_temp_if_not_file_seen(temp, fs::symlink_metadata(temp))
}

/// [`remove_stale_temp_if_not_file`], given what `lstat` said of the temp name.
fn remove_stale_temp_if_not_file_seen(temp: &Path, seen: io::Result<fs::Metadata>) -> Result<()> {
    match seen {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) if m.is_dir() => fs::remove_dir(temp).at(temp),
        Ok(_) => fs::remove_file(temp).at(temp),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(temp, e)),
    }
}

/// Clears the temp name entirely (for symlinks, which are rebuilt from scratch).
fn remove_stale_temp(temp: &Path) -> Result<()> {
    remove_stale_temp_if_not_file(temp)?;
    match fs::remove_file(temp) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(temp, e)),
    }
}

/// True when some process holds an exclusive lock on the file (a pull in progress).
fn is_locked(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::io::AsRawFd;
        let Ok(f) = open_no_follow(path) else {
            return false;
        };
        // SAFETY: flock on a descriptor we own; released when `f` closes.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

fn temp_path(target: &Path) -> PathBuf {
    let base = target
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(temp_name(&base))
}

fn parent_of(p: &Path) -> &Path {
    p.parent().unwrap_or(Path::new("."))
}

/// The deepest existing ancestor of `target` (for statvfs before parents exist).
fn nearest_existing(target: &Path, root: &Path) -> PathBuf {
    let mut p = parent_of(target);
    while !p.exists() && p != root {
        match p.parent() {
            Some(q) => p = q,
            None => break,
        }
    }
    p.to_path_buf()
}

fn vanished(p: &Path) -> Error {
    Error::io(
        p,
        io::Error::new(
            io::ErrorKind::NotFound,
            "vanished right after being created",
        ),
    )
}

/// The permission bits a pull leaves on disk for `file`, as the scanner reads them back
/// (a file: the announced rwx bits, never setuid, setgid or sticky, 0o644 when none were
/// announced; a directory: the same with the owner's rwx added, 0o755 when none; a symlink
/// keeps what it announced).
pub fn applied_mode(file: &FileInfo) -> u32 {
    match file.kind {
        FileKind::File => file_mode(file.mode),
        FileKind::Dir => dir_mode(file.mode),
        FileKind::Symlink => file.mode,
    }
}

/// Permission bits for a file from a peer: only rwx for user/group/other (never setuid,
/// setgid or sticky from the network); 0 means the peer has no permissions to offer.
fn file_mode(mode: u32) -> u32 {
    match mode & 0o777 {
        0 => 0o644,
        m => m,
    }
}

/// As [`file_mode`], and the owner can always enter and write the directory, or syncing
/// its children would fail.
fn dir_mode(mode: u32) -> u32 {
    match mode & 0o777 {
        0 => 0o755,
        m => m | 0o700,
    }
}

fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// The mode to create a temp file with so that it already has the record's final mode
/// (`file_mode`), which saves a `fchmod` per file: `None` where the process umask would
/// clear some of its bits (then the temp file is created private, 0600, and its mode set
/// before the rename), or where the owner could not write it (a resumed pull reopens
/// the temp file for writing).
fn created_mode(record_mode: u32) -> Option<u32> {
    let mode = file_mode(record_mode);
    let umask = fsutil::process_umask()?;
    (mode & 0o600 == 0o600 && mode & umask == 0).then_some(mode)
}

#[cfg(unix)]
fn set_fd_mode(f: &File, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_fd_mode(f: &File, mode: u32) -> io::Result<()> {
    let mut p = f.metadata()?.permissions();
    p.set_readonly(mode & 0o200 == 0);
    f.set_permissions(p)
}

/// Writes `buf` at `off` and, if it is large, starts its writeback.
fn write_at(f: &File, buf: &[u8], off: u64) -> io::Result<()> {
    write_all_at(f, buf, off)?;
    start_writeback_of(f, buf, off);
    Ok(())
}

#[cfg(unix)]
fn write_all_at(f: &File, buf: &[u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(f, buf, off)
}

/// [`start_writeback`] for `buf` just written at `off`, if it is large. Small writes are
/// a small file or a tail: left to the flush that installs them (one `syncfs` for a
/// round of small files); an I/O started per 4 KiB file only cost CPU.
fn start_writeback_of(f: &File, buf: &[u8], off: u64) {
    if buf.len() > INLINE_WRITE {
        start_writeback(f, off, buf.len());
    }
}

/// Starts writing a just-written range to disk without waiting for it, so the final
/// fsync of a large file finds little left to flush: the transfer and the disk overlap
/// instead of running one after the other. Only a hint; errors are ignored (the fsync
/// before the rename is what guarantees durability).
#[cfg(target_os = "linux")]
fn start_writeback(f: &File, off: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open file descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(
            f.as_raw_fd(),
            off as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn start_writeback(_: &File, _: u64, _: usize) {}

/// Gives back the page cache of the file being replaced as its copy reads past it (the
/// renamed temp file supersedes it). The temp file's writes then reuse those pages
/// instead of growing the cache by the file's size: on a virtual machine that hands free
/// memory back to its host, every page touched for the first time costs a fault on the
/// host, which made B's CPU for rebuilding a 1 GiB file three to four times as high
/// (BENCHMARKS.md, "c no longer pays for memory the host took back"). The rest of the
/// file goes when this is dropped. Only a hint: errors are ignored, and a file that
/// stays (a failed pull) is merely no longer cached.
struct ReadRelease<'a> {
    file: &'a File,
    /// Everything before this offset has been given back.
    done: u64,
}

/// The page cache holds a file in folios of up to 2 MiB (x86-64's PMD size), and
/// `POSIX_FADV_DONTNEED` drops only the folios wholly inside its range (on Linux 6.18's
/// ext4, a written file given back 256 KiB at a time kept every page:
/// `bench/page-cache-folios`): ranges are given back in whole, aligned 2 MiB steps.
const RELEASE_STEP: u64 = 2 << 20;

impl<'a> ReadRelease<'a> {
    fn new(file: &'a File) -> Self {
        ReadRelease { file, done: 0 }
    }

    /// The copy has read everything it needs before `end`.
    fn up_to(&mut self, end: u64) {
        let upto = end & !(RELEASE_STEP - 1);
        if upto > self.done {
            dont_need(self.file, self.done, upto - self.done);
            self.done = upto;
        }
    }
}

impl Drop for ReadRelease<'_> {
    fn drop(&mut self) {
        dont_need(self.file, self.done, 0); // 0: to the end of the file
    }
}

#[cfg(target_os = "linux")]
fn dont_need(f: &File, off: u64, len: u64) {
    fsutil::fadvise(f, off, len, libc::POSIX_FADV_DONTNEED);
}

#[cfg(not(target_os = "linux"))]
fn dont_need(_: &File, _: u64, _: u64) {}

#[cfg(unix)]
fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, off)
}

#[cfg(windows)]
fn write_all_at(f: &File, mut buf: &[u8], mut off: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = f.seek_write(buf, off)?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

#[cfg(windows)]
fn read_exact_at(f: &File, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = f.seek_read(buf, off)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        off += n as u64;
    }
    Ok(())
}

#[cfg(unix)]
fn make_symlink(link_to: &str, at: &Path) -> Result<()> {
    std::os::unix::fs::symlink(link_to, at).at(at)
}

#[cfg(not(unix))]
fn make_symlink(_link_to: &str, at: &Path) -> Result<()> {
    Err(Error::io(
        at,
        io::Error::new(
            io::ErrorKind::Unsupported,
            "symlinks are not synced on this platform",
        ),
    ))
}

fn read_link_str(p: &Path) -> Result<String> {
    Ok(fs::read_link(p).at(p)?.to_string_lossy().into_owned())
}

/// Runs blocking file-system work off the async runtime.
async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(format!("puller task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Blocks by hash, counting fetches; optionally flips a byte of every answer.
    #[derive(Default)]
    struct MemSource {
        blocks: HashMap<[u8; 32], Vec<u8>>,
        fetched: Mutex<Vec<u64>>,
        fetches: AtomicUsize,
        corrupt: bool,
        base: Vec<Block>,
    }

    impl BlockSource for MemSource {
        fn base_blocks(&self) -> &[Block] {
            &self.base
        }

        fn fetch(&self, block: &Block) -> BoxFuture<'_, Result<Vec<u8>>> {
            let block = *block;
            Box::pin(async move {
                self.fetches.fetch_add(1, Ordering::SeqCst);
                self.fetched.lock().unwrap().push(block.offset);
                let mut data = self
                    .blocks
                    .get(&block.hash)
                    .cloned()
                    .ok_or_else(|| Error::Invalid("no such block".into()))?;
                if self.corrupt && !data.is_empty() {
                    data[0] ^= 0xff;
                }
                Ok(data)
            })
        }
    }

    const MTIME: i64 = 1_700_000_000_123_456_789;

    /// A folder root with its `.ferry` marker.
    fn folder() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join(FERRY_DIR)).unwrap();
        dir
    }

    fn dev() -> DeviceId {
        DeviceId([7u8; 32])
    }

    /// A FileInfo for `data` cut at `splits`, and a source that holds its blocks.
    fn file_of(name: &str, data: &[u8], splits: &[usize]) -> (FileInfo, MemSource) {
        let mut blocks = Vec::new();
        let mut src = MemSource::default();
        let mut start = 0;
        for &end in splits.iter().chain(std::iter::once(&data.len())) {
            if end <= start {
                continue;
            }
            let chunk = &data[start..end];
            let hash = *blake3::hash(chunk).as_bytes();
            blocks.push(Block {
                offset: start as u64,
                size: chunk.len() as u32,
                hash,
            });
            src.blocks.insert(hash, chunk.to_vec());
            start = end;
        }
        let file = FileInfo {
            name: name.to_string(),
            kind: FileKind::File,
            size: data.len() as u64,
            mtime_ns: MTIME,
            mode: 0o640,
            deleted: false,
            version: Default::default(),
            sequence: 1,
            modified_by: 1,
            blocks,
            symlink_target: None,
        };
        (file, src)
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn expected_of(path: &Path) -> ExpectedLocal {
        let d = try_stat(path).unwrap().unwrap();
        ExpectedLocal {
            kind: d.kind,
            size: d.size,
            mtime_ns: d.mtime_ns,
            inode: d.inode,
        }
    }

    async fn pull(
        root: &Path,
        f: &FileInfo,
        exp: Option<&ExpectedLocal>,
        loser: bool,
        src: &MemSource,
        opts: &PullOptions,
    ) -> Result<PullOutcome> {
        pull_file(root, f, exp, loser, &dev(), src, opts).await
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// Pulls `file` over what is at its name now (as the index expects it) and returns the
    /// offsets `src` was asked for, sorted.
    async fn pull_over(root: &Path, file: &FileInfo, src: &MemSource) -> Vec<u64> {
        let exp = expected_of(&root.join(&file.name));
        pull_expecting(root, file, Some(&exp), src).await
    }

    /// Pulls `file` to a name nothing is at yet (a temp file may be) and returns the
    /// offsets `src` was asked for, sorted.
    async fn pull_new(root: &Path, file: &FileInfo, src: &MemSource) -> Vec<u64> {
        pull_expecting(root, file, None, src).await
    }

    async fn pull_expecting(
        root: &Path,
        file: &FileInfo,
        exp: Option<&ExpectedLocal>,
        src: &MemSource,
    ) -> Vec<u64> {
        let out = pull(root, file, exp, false, src, &PullOptions::default())
            .await
            .unwrap();
        assert!(matches!(out, PullOutcome::Done { .. }), "{out:?}");
        let mut fetched = src.fetched.lock().unwrap().clone();
        fetched.sort_unstable();
        fetched
    }

    #[tokio::test]
    async fn blocks_the_old_file_holds_are_copied_from_it_and_the_rest_fetched() {
        let dir = folder();
        let root = dir.path();
        let old = data(400_000);
        let (old_file, _) = file_of("big.bin", &old, &[100_000, 200_000, 300_000]);
        fs::write(root.join("big.bin"), &old).unwrap();
        // Eight bytes inserted at the start and the third block rewritten: every old block
        // moves, two new ones come from the source, which has nothing else.
        let mut new = b"inserted".to_vec();
        new.extend_from_slice(&old[..200_000]);
        new.extend(std::iter::repeat_n(0xa5u8, 100_000));
        new.extend_from_slice(&old[300_000..]);
        let (new_file, all) = file_of("big.bin", &new, &[8, 100_008, 200_008, 300_008]);
        let src = MemSource {
            blocks: all
                .blocks
                .into_iter()
                .filter(|(h, _)| !old_file.blocks.iter().any(|b| &b.hash == h))
                .collect(),
            base: old_file.blocks.clone(),
            ..MemSource::default()
        };
        assert_eq!(pull_over(root, &new_file, &src).await, [0, 200_008]);
        assert_eq!(fs::read(root.join("big.bin")).unwrap(), new);

        // The old file changed since its record (the same size and mtime): the block that
        // no longer verifies is asked from the source instead, never copied.
        let (newer_file, all) = file_of("big.bin", &old, &[100_000, 200_000, 300_000]);
        let mut on_disk = new.clone();
        on_disk[150_000] ^= 0xff; // inside the record's second block (100,008..200,008)
        fs::write(root.join("big.bin"), &on_disk).unwrap();
        let src = MemSource {
            blocks: all.blocks,
            base: new_file.blocks.clone(),
            ..MemSource::default()
        };
        // 100,000: no longer verifies on disk; 200,000: not in the old file at all.
        assert_eq!(pull_over(root, &newer_file, &src).await, [100_000, 200_000]);
        assert_eq!(fs::read(root.join("big.bin")).unwrap(), old);
    }

    /// Which of a file's pages are in the page cache (`mincore` over a read-only map).
    #[cfg(target_os = "linux")]
    fn resident_pages(f: &File, len: usize) -> Vec<bool> {
        use std::os::fd::AsRawFd;
        let pages = len.div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: a shared read-only map of an open file of `len` bytes, unmapped below;
        // mincore writes one byte per page into `vec`, which has that many.
        unsafe {
            let at = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(at, libc::MAP_FAILED);
            assert_eq!(libc::mincore(at, len, vec.as_mut_ptr()), 0);
            libc::munmap(at, len);
        }
        vec.iter().map(|b| b & 1 == 1).collect()
    }

    #[cfg(target_os = "linux")]
    fn on_tmpfs(f: &File) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: fstatfs fills the zeroed struct we pass for an open descriptor.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) }, 0);
        st.f_type == libc::TMPFS_MAGIC
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_replaced_file_leaves_the_page_cache_as_its_copy_reads_past_it() {
        const MIB: usize = 1 << 20;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.bin");
        fs::write(&path, data(9 * MIB)).unwrap();
        let f = File::open(&path).unwrap();
        f.sync_all().unwrap(); // only clean pages can be dropped
        let mut buf = vec![0u8; 9 * MIB];
        read_exact_at(&f, &mut buf, 0).unwrap();
        assert!(resident_pages(&f, buf.len()).iter().all(|r| *r));
        if on_tmpfs(&f) {
            return; // tmpfs holds its pages in memory for good; DONTNEED leaves them
        }
        let gone = |f: &File| {
            let r = resident_pages(f, buf.len());
            (0..r.len()).filter(|i| !r[*i]).count() * 4096
        };
        let mut read = ReadRelease::new(&f);
        read.up_to(3 * MIB as u64 + 100); // read past 3 MiB: the first 2 MiB step goes
        assert_eq!(gone(&f), 2 * MIB);
        read.up_to(MIB as u64); // behind what was given back already: nothing more
        assert_eq!(gone(&f), 2 * MIB);
        read.up_to(8 * MIB as u64);
        assert_eq!(gone(&f), 8 * MIB);
        drop(read); // the rest, to the end of the file
        assert_eq!(gone(&f), 9 * MIB);
    }

    #[tokio::test]
    async fn builds_files_of_edge_sizes_with_mode_and_mtime() {
        let dir = folder();
        let root = dir.path();
        let cases: Vec<(usize, Vec<usize>)> = vec![
            (0, vec![]),
            (1, vec![]),
            (1000, vec![100, 101, 600]),
            (300_000, vec![65_536, 200_000]),
        ];
        for (n, splits) in cases {
            let name = format!("sub/dir/f{n}.bin");
            let content = data(n);
            let (f, src) = file_of(&name, &content, &splits);
            let out = pull(root, &f, None, false, &src, &PullOptions::default())
                .await
                .unwrap();
            let path = root.join(&name);
            assert_eq!(fs::read(&path).unwrap(), content, "size {n}");
            let d = try_stat(&path).unwrap().unwrap();
            assert_eq!(out, PullOutcome::Done { inode: d.inode });
            assert_eq!(d.mtime_ns, MTIME);
            #[cfg(unix)]
            assert_eq!(d.mode, 0o640);
            assert_eq!(src.fetches.load(Ordering::SeqCst), f.blocks.len());
        }
        assert_eq!(
            names_in(&root.join("sub/dir")),
            ["f0.bin", "f1.bin", "f1000.bin", "f300000.bin"],
            "no temp files left"
        );
    }

    /// The folder loop runs pulls in spawned tasks: `pull_file`'s future must be `Send`.
    #[tokio::test]
    async fn pull_file_runs_in_a_spawned_task() {
        let dir = folder();
        let root = dir.path().to_path_buf();
        let content = data(3000);
        let (f, src) = file_of("spawned", &content, &[1000, 2000]);
        let task = tokio::spawn(async move {
            pull_file(
                &root,
                &f,
                None,
                false,
                &dev(),
                &src,
                &PullOptions::default(),
            )
            .await
        });
        assert!(matches!(
            task.await.unwrap().unwrap(),
            PullOutcome::Done { .. }
        ));
        assert_eq!(fs::read(dir.path().join("spawned")).unwrap(), content);
    }

    #[tokio::test]
    async fn repeated_blocks_are_fetched_once() {
        let dir = folder();
        let content = vec![0u8; 4096];
        let (f, src) = file_of("zeros", &content, &[1024, 2048, 3072]);
        pull(dir.path(), &f, None, false, &src, &PullOptions::default())
            .await
            .unwrap();
        assert_eq!(fs::read(dir.path().join("zeros")).unwrap(), content);
        assert_eq!(src.fetches.load(Ordering::SeqCst), 1);
    }

    /// Answers after a few scheduler turns and records how many fetches overlapped.
    struct SlowSource {
        inner: MemSource,
        now: AtomicUsize,
        peak: AtomicUsize,
    }

    impl BlockSource for SlowSource {
        fn fetch(&self, block: &Block) -> BoxFuture<'_, Result<Vec<u8>>> {
            let block = *block;
            Box::pin(async move {
                let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
                self.peak.fetch_max(n, Ordering::SeqCst);
                for _ in 0..5 {
                    tokio::task::yield_now().await;
                }
                let r = self.inner.fetch(&block).await;
                self.now.fetch_sub(1, Ordering::SeqCst);
                r
            })
        }
    }

    #[tokio::test]
    async fn blocks_in_flight_are_bounded() {
        let dir = folder();
        let content = data(64 * 100);
        let splits: Vec<usize> = (1..64).map(|i| i * 100).collect();
        let (f, inner) = file_of("many", &content, &splits);
        let src = SlowSource {
            inner,
            now: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        };
        let opts = PullOptions {
            max_in_flight: 4,
            ..Default::default()
        };
        pull_file(dir.path(), &f, None, false, &dev(), &src, &opts)
            .await
            .unwrap();
        assert_eq!(fs::read(dir.path().join("many")).unwrap(), content);
        let peak = src.peak.load(Ordering::SeqCst);
        assert!((2..=4).contains(&peak), "peak {peak}");
    }

    #[tokio::test]
    async fn a_corrupted_block_is_an_error_and_the_target_is_untouched() {
        let dir = folder();
        let root = dir.path();
        fs::write(root.join("doc.txt"), b"old content").unwrap();
        let exp = expected_of(&root.join("doc.txt"));
        let (f, mut src) = file_of("doc.txt", &data(5000), &[2500]);
        src.corrupt = true;
        let e = pull(root, &f, Some(&exp), false, &src, &PullOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("doc.txt") && e.contains("offset"), "{e}");
        assert!(e.contains("verification"), "{e}");
        assert_eq!(fs::read(root.join("doc.txt")).unwrap(), b"old content");

        // A source that lies about the size is refused too.
        let (f, mut src) = file_of("new.txt", &data(10), &[]);
        src.blocks.values_mut().for_each(|v| v.push(0));
        assert!(pull(root, &f, None, false, &src, &PullOptions::default())
            .await
            .is_err());
        assert!(!root.join("new.txt").exists());
    }

    #[tokio::test]
    async fn malformed_block_lists_are_refused_before_any_io() {
        let dir = folder();
        let (mut f, src) = file_of("x", &data(100), &[50]);
        f.blocks[1].offset = 60;
        assert!(
            pull(dir.path(), &f, None, false, &src, &PullOptions::default())
                .await
                .is_err()
        );
        let (mut f, src) = file_of("x", &data(100), &[50]);
        f.size = 1 << 40;
        assert!(
            pull(dir.path(), &f, None, false, &src, &PullOptions::default())
                .await
                .is_err()
        );
        assert_eq!(names_in(dir.path()), [".ferry"]);
    }

    #[tokio::test]
    async fn an_interrupted_pull_resumes_from_verified_blocks() {
        let dir = folder();
        let root = dir.path();
        let content = data(8000);
        let splits = [1000, 2000, 3000, 4000, 5000, 6000, 7000];
        let (f, src) = file_of("big.bin", &content, &splits);
        // An earlier pull wrote the first half, plus a torn fifth block.
        let mut partial = content[..4000].to_vec();
        partial.extend_from_slice(&[0xAA; 1000]);
        fs::write(root.join(".ferry-tmp-big.bin"), &partial).unwrap();

        assert_eq!(pull_new(root, &f, &src).await, [4000, 5000, 6000, 7000]);
        assert_eq!(fs::read(root.join("big.bin")).unwrap(), content);
        assert!(!root.join(".ferry-tmp-big.bin").exists());
    }

    /// A file big enough to have its space reserved first still resumes from what an
    /// interrupted pull wrote (the reservation keeps the temp file's length), and ends up
    /// holding no more space than its data.
    #[tokio::test]
    async fn a_reserved_big_file_resumes_and_keeps_no_extra_space() {
        let dir = folder();
        let root = dir.path();
        let content = data(3 * (1 << 20) + 5);
        let splits: Vec<usize> = (1..6).map(|i| i * (512 << 10)).collect();
        let (f, src) = file_of("big.bin", &content, &splits);
        assert!(f.size >= RESERVE_MIN);
        fs::write(root.join(".ferry-tmp-big.bin"), &content[..1 << 20]).unwrap();

        let fetched = pull_new(root, &f, &src).await;
        assert_eq!(fetched, [1 << 20, 3 << 19, 2 << 20, 5 << 19]);
        assert_eq!(fs::read(root.join("big.bin")).unwrap(), content);
        assert!(!root.join(".ferry-tmp-big.bin").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let used = fs::metadata(root.join("big.bin")).unwrap().blocks() * 512;
            assert!(used <= f.size.next_multiple_of(4096) + (64 << 10), "{used}");
        }
    }

    /// Space the disk cannot give is an error before anything is fetched: the empty temp
    /// file is removed, and a temp file with data keeps its data for a later resume.
    #[cfg(target_os = "linux")]
    #[test]
    fn space_the_disk_cannot_give_is_refused_and_changes_nothing() {
        let dir = folder();
        let root = dir.path();
        let mut f = file_of("huge.bin", &data(10), &[]).0;
        f.size = 1 << 62;
        let temp = root.join(".ferry-tmp-huge.bin");
        let t = fs::File::create(&temp).unwrap();
        assert!(reserve_space(&t, 0, &f, &temp).is_err());
        assert!(!temp.exists(), "the empty temp file is removed");

        fs::write(&temp, b"verified part").unwrap();
        let t = fs::OpenOptions::new().write(true).open(&temp).unwrap();
        assert!(reserve_space(&t, 13, &f, &temp).is_err());
        assert_eq!(fs::read(&temp).unwrap(), b"verified part");
        // Small files are not reserved at all.
        f.size = RESERVE_MIN - 1;
        assert!(reserve_space(&t, 0, &f, &temp).is_ok());
    }

    #[tokio::test]
    async fn a_leftover_temp_longer_than_the_file_is_cut_to_its_length() {
        let dir = folder();
        let root = dir.path();
        let content = data(8000);
        let (f, src) = file_of("d/short.bin", &content, &[2000, 4000, 6000]);
        // A temp file of an earlier, longer version: its first half is this version's.
        let mut leftover = content[..4000].to_vec();
        leftover.extend_from_slice(&[0x55; 8000]);
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/.ferry-tmp-short.bin"), &leftover).unwrap();

        let out = pull(root, &f, None, false, &src, &PullOptions::default())
            .await
            .unwrap();
        assert!(matches!(out, PullOutcome::Done { .. }));
        assert_eq!(fs::read(root.join("d/short.bin")).unwrap(), content);
        let mut fetched = src.fetched.lock().unwrap().clone();
        fetched.sort();
        assert_eq!(fetched, [4000, 6000]);
    }

    #[tokio::test]
    async fn a_target_changed_since_the_index_is_kept_as_a_conflict_copy() {
        let dir = folder();
        let root = dir.path();
        let target = root.join("notes.txt");
        fs::write(&target, b"indexed").unwrap();
        let exp = expected_of(&target);
        // A local edit the index has not seen yet.
        fs::write(&target, b"local edit, not yet scanned").unwrap();
        fsutil::set_mtime(&target, MTIME - 5_000_000_000).unwrap();

        let content = data(3000);
        let (f, src) = file_of("notes.txt", &content, &[1500]);
        let out = pull(root, &f, Some(&exp), false, &src, &PullOptions::default())
            .await
            .unwrap();
        let PullOutcome::Conflict { kept_as, inode } = out else {
            panic!("{out:?}")
        };
        assert!(
            crate::sync::conflict::is_conflict_name(&kept_as),
            "{kept_as}"
        );
        assert!(kept_as.starts_with("notes.sync-conflict-") && kept_as.ends_with(".txt"));
        assert!(kept_as.contains(&dev().prefix7()));
        assert_eq!(
            fs::read(root.join(&kept_as)).unwrap(),
            b"local edit, not yet scanned"
        );
        assert_eq!(fs::read(&target).unwrap(), content);
        assert_eq!(try_stat(&target).unwrap().unwrap().inode, inode);
    }

    #[tokio::test]
    async fn without_allow_conflict_a_changed_target_stops_the_pull_and_keeps_the_temp() {
        let dir = folder();
        let root = dir.path();
        let target = root.join("a.txt");
        fs::write(&target, b"unknown to the index").unwrap();
        let (f, src) = file_of("a.txt", &data(100), &[]);
        let opts = PullOptions {
            allow_conflict: false,
            ..Default::default()
        };
        let out = pull(root, &f, None, false, &src, &opts).await.unwrap();
        assert_eq!(out, PullOutcome::TargetChanged);
        assert_eq!(fs::read(&target).unwrap(), b"unknown to the index");
        assert!(root.join(".ferry-tmp-a.txt").exists(), "kept for resume");

        // Retried with the rescanned state, the verified temp is reused: nothing fetched.
        let exp = expected_of(&target);
        let (f, src) = file_of("a.txt", &data(100), &[]);
        let out = pull(root, &f, Some(&exp), false, &src, &opts)
            .await
            .unwrap();
        assert!(matches!(out, PullOutcome::Done { .. }));
        assert_eq!(src.fetches.load(Ordering::SeqCst), 0);
        assert_eq!(fs::read(&target).unwrap(), data(100));
    }

    #[tokio::test]
    async fn an_unexpected_file_is_kept_beside_the_new_one() {
        let dir = folder();
        let root = dir.path();
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/.bashrc"), b"mine").unwrap();
        let (f, src) = file_of("d/.bashrc", b"theirs", &[]);
        let out = pull(root, &f, None, false, &src, &PullOptions::default())
            .await
            .unwrap();
        let PullOutcome::Conflict { kept_as, .. } = out else {
            panic!("{out:?}")
        };
        assert!(kept_as.starts_with("d/.bashrc.sync-conflict-"), "{kept_as}");
        assert_eq!(fs::read(root.join(&kept_as)).unwrap(), b"mine");
        assert_eq!(fs::read(root.join("d/.bashrc")).unwrap(), b"theirs");
    }

    #[tokio::test]
    async fn a_concurrent_losing_local_version_becomes_the_conflict_copy() {
        let dir = folder();
        let root = dir.path();
        let target = root.join("plan.md");
        fs::write(&target, b"local concurrent version").unwrap();
        let exp = expected_of(&target);
        let (f, src) = file_of("plan.md", b"remote winner", &[]);
        let out = pull(root, &f, Some(&exp), true, &src, &PullOptions::default())
            .await
            .unwrap();
        let PullOutcome::Conflict { kept_as, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(
            fs::read(root.join(&kept_as)).unwrap(),
            b"local concurrent version"
        );
        assert_eq!(fs::read(&target).unwrap(), b"remote winner");

        // Twice in the same second: the first conflict copy is never overwritten.
        fs::write(&target, b"second local version").unwrap();
        let exp = expected_of(&target);
        let (f, src) = file_of("plan.md", b"remote again", &[]);
        let out = pull(root, &f, Some(&exp), true, &src, &PullOptions::default())
            .await
            .unwrap();
        let PullOutcome::Conflict { kept_as: k2, .. } = out else {
            panic!("{out:?}")
        };
        assert_ne!(k2, kept_as);
        assert_eq!(
            fs::read(root.join(&kept_as)).unwrap(),
            b"local concurrent version"
        );
        assert_eq!(fs::read(root.join(&k2)).unwrap(), b"second local version");
    }

    #[tokio::test]
    async fn a_target_already_holding_this_version_is_no_conflict() {
        // A pull renamed v2 into place and was killed before the index recorded it: the
        // index still expects v1, the disk holds v2 exactly (bytes and mtime).
        let dir = folder();
        let root = dir.path();
        let target = root.join("r.txt");
        fs::write(&target, b"v1").unwrap();
        let exp = expected_of(&target);
        let (f, src) = file_of("r.txt", &data(5000), &[2000]);
        fs::write(&target, data(5000)).unwrap();
        fsutil::set_mtime(&target, f.mtime_ns).unwrap();
        for concurrent_loser in [false, true] {
            let out = pull(
                root,
                &f,
                Some(&exp),
                concurrent_loser,
                &src,
                &PullOptions::default(),
            )
            .await
            .unwrap();
            assert!(matches!(out, PullOutcome::Done { .. }), "{out:?}");
            assert_eq!(fs::read(&target).unwrap(), data(5000));
            assert_eq!(
                names_in(root),
                [".ferry", "r.txt"],
                "no conflict copy, no temp"
            );
        }
        // Same size and mtime but other bytes: a real local edit, kept.
        let mut edited = data(5000);
        edited[4000] ^= 1;
        fs::write(&target, &edited).unwrap();
        fsutil::set_mtime(&target, f.mtime_ns).unwrap();
        let out = pull(root, &f, Some(&exp), false, &src, &PullOptions::default())
            .await
            .unwrap();
        let PullOutcome::Conflict { kept_as, .. } = out else {
            panic!("{out:?}")
        };
        assert_eq!(fs::read(root.join(kept_as)).unwrap(), edited);
    }

    #[tokio::test]
    async fn a_staged_batch_is_installed_together_with_each_outcome_in_order() {
        // Both ways: one flush of the file system for all, and one fsync per file.
        for flush_min in [0, usize::MAX] {
            staged_batch_outcomes(flush_min).await;
        }
    }

    async fn staged_batch_outcomes(flush_min: usize) {
        let dir = folder();
        let root = dir.path();
        fs::create_dir_all(root.join("d1")).unwrap();
        // A local edit the index has not seen, where b.txt is to go.
        fs::write(root.join("d1/b.txt"), b"indexed").unwrap();
        let exp_b = expected_of(&root.join("d1/b.txt"));
        fs::write(root.join("d1/b.txt"), b"edited here").unwrap();
        // An unexpected file where c.txt is to go, in a pull that allows no conflict.
        fs::write(root.join("c.txt"), b"unknown").unwrap();

        let (fa, sa) = file_of("d1/a.txt", &data(3000), &[]);
        let (fb, sb) = file_of("d1/b.txt", &data(4000), &[1000]);
        let (fc, sc) = file_of("c.txt", &data(10), &[]);
        let (fd, sd) = file_of("d2/new/d.txt", b"", &[]);
        let opts = PullOptions::default();
        let strict = PullOptions {
            allow_conflict: false,
            ..Default::default()
        };
        let stage = |f, exp, src, opts| async move {
            stage_file(root, f, exp, false, &dev(), src, opts)
                .await
                .unwrap()
        };
        let staged = vec![
            stage(&fa, None, &sa, &opts).await,
            stage(&fb, Some(&exp_b), &sb, &opts).await,
            stage(&fc, None, &sc, &strict).await,
            stage(&fd, None, &sd, &opts).await,
        ];
        assert!(
            !root.join("d1/a.txt").exists(),
            "nothing in place before the install"
        );
        let out = install_batch_from(root, staged, flush_min);
        assert_eq!(out.len(), 4);
        assert!(
            matches!(out[0], Ok(PullOutcome::Done { .. })),
            "{:?}",
            out[0]
        );
        let Ok(PullOutcome::Conflict { kept_as, .. }) = &out[1] else {
            panic!("{:?}", out[1])
        };
        assert!(
            matches!(out[2], Ok(PullOutcome::TargetChanged)),
            "{:?}",
            out[2]
        );
        assert!(
            matches!(out[3], Ok(PullOutcome::Done { .. })),
            "{:?}",
            out[3]
        );

        assert_eq!(fs::read(root.join("d1/a.txt")).unwrap(), data(3000));
        assert_eq!(fs::read(root.join("d1/b.txt")).unwrap(), data(4000));
        assert_eq!(fs::read(root.join(kept_as)).unwrap(), b"edited here");
        assert_eq!(fs::read(root.join("c.txt")).unwrap(), b"unknown");
        assert_eq!(fs::read(root.join("d2/new/d.txt")).unwrap(), b"");
        // Mode and mtime of the record, as for a single pull.
        let d = try_stat(&root.join("d1/a.txt")).unwrap().unwrap();
        assert_eq!((d.mtime_ns, d.mode), (fa.mtime_ns, file_mode(fa.mode)));
        // The temp left for c.txt is fresh, so start-up cleaning keeps it for a resume.
        let temp = root.join(".ferry-tmp-c.txt");
        let age = fs::metadata(&temp).unwrap().modified().unwrap().elapsed();
        assert!(age.map(|a| a < Duration::from_secs(60)).unwrap_or(true));
        assert_eq!(
            names_in(&root.join("d1")).len(),
            3,
            "a, b and b's conflict copy"
        );
    }

    #[test]
    fn a_replaced_file_that_changed_after_the_check_is_kept() {
        let dir = folder();
        let root = dir.path();
        let swapped = root.join(".ferry-tmp-n.txt");
        fs::write(&swapped, b"as checked").unwrap();
        let checked = try_stat(&swapped).unwrap();
        // Unchanged since the check: simply removed.
        assert_eq!(
            settle_replaced(root, "n.txt", &swapped, checked, &dev()).unwrap(),
            None
        );
        assert!(!swapped.exists());
        // A big one too (freed on another thread, but its name is gone at once).
        File::create(&swapped)
            .unwrap()
            .set_len(FREE_LATER_MIN)
            .unwrap();
        let checked = try_stat(&swapped).unwrap();
        assert_eq!(
            settle_replaced(root, "n.txt", &swapped, checked, &dev()).unwrap(),
            None
        );
        assert!(!swapped.exists());
        // Written in place after the check: kept as a conflict copy.
        fs::write(&swapped, b"as checked").unwrap();
        let checked = try_stat(&swapped).unwrap();
        fs::write(&swapped, b"written in the window").unwrap();
        fsutil::set_mtime(&swapped, MTIME).unwrap();
        let kept = settle_replaced(root, "n.txt", &swapped, checked, &dev())
            .unwrap()
            .unwrap();
        assert!(kept.starts_with("n.sync-conflict-"), "{kept}");
        assert_eq!(fs::read(root.join(kept)).unwrap(), b"written in the window");
        // A file renamed over it (another inode), even with the same size and mtime.
        fs::write(&swapped, b"same").unwrap();
        let checked = try_stat(&swapped).unwrap();
        let other = root.join("other");
        fs::write(&other, b"diff").unwrap();
        fsutil::set_mtime(&other, checked.unwrap().mtime_ns).unwrap();
        fs::rename(&other, &swapped).unwrap();
        assert!(settle_replaced(root, "n.txt", &swapped, checked, &dev())
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn a_matching_target_is_replaced_without_conflict() {
        let dir = folder();
        let root = dir.path();
        let target = root.join("r.txt");
        fs::write(&target, b"v1").unwrap();
        let exp = expected_of(&target);
        let (f, src) = file_of("r.txt", b"v2 is longer", &[]);
        let out = pull(root, &f, Some(&exp), false, &src, &PullOptions::default())
            .await
            .unwrap();
        assert!(matches!(out, PullOutcome::Done { .. }));
        assert_eq!(fs::read(&target).unwrap(), b"v2 is longer");
        assert_eq!(names_in(root), [".ferry", "r.txt"]);
    }

    #[tokio::test]
    async fn versioning_moves_the_replaced_file_into_ferry_versions() {
        let dir = folder();
        let root = dir.path();
        fs::create_dir_all(root.join(".ferry")).unwrap();
        fs::create_dir_all(root.join("docs")).unwrap();
        let target = root.join("docs/report.txt");
        fs::write(&target, b"v1").unwrap();
        let exp = expected_of(&target);
        let (f, src) = file_of("docs/report.txt", b"v2", &[]);
        let opts = PullOptions {
            versioning: Some(Versioning { keep_days: 30 }),
            ..Default::default()
        };
        let out = pull(root, &f, Some(&exp), false, &src, &opts)
            .await
            .unwrap();
        assert!(matches!(out, PullOutcome::Done { .. }));
        assert_eq!(fs::read(&target).unwrap(), b"v2");
        let vdir = root.join(".ferry/versions/docs");
        let kept = names_in(&vdir);
        assert_eq!(kept.len(), 1);
        assert!(
            kept[0].starts_with("report~") && kept[0].ends_with(".txt"),
            "{kept:?}"
        );
        assert_eq!(fs::read(vdir.join(&kept[0])).unwrap(), b"v1");
        assert!(version_stamp(&kept[0]).is_some());

        // Nothing is pruned while young; everything once the window is in the past.
        assert_eq!(prune_versions(root, 30).unwrap(), 0);
        let old = "report~20000101-000000.txt";
        fs::write(vdir.join(old), b"ancient").unwrap();
        fs::create_dir_all(root.join(".ferry/versions/gone")).unwrap();
        fs::write(
            root.join(".ferry/versions/gone/x~20000101-000000"),
            b"ancient",
        )
        .unwrap();
        assert_eq!(prune_versions(root, 30).unwrap(), 2);
        assert_eq!(names_in(&vdir), kept);
        assert!(!root.join(".ferry/versions/gone").exists());
        assert_eq!(prune_versions(root, 0).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_folder_without_its_marker_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let (f, src) = file_of("a/x", b"data", &[]);
        let e = pull(root, &f, None, false, &src, &PullOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(".ferry"), "{e}");
        let mut d = tombstone("d", FileKind::Dir);
        d.deleted = false;
        assert!(apply_dir(root, &d).await.is_err());
        assert!(names_in(root).is_empty());
        assert!(apply_dir(&root.join("missing"), &d).await.is_err());
        assert!(!root.join("missing").exists());
    }

    #[tokio::test]
    async fn too_little_free_space_is_an_error_and_nothing_is_written() {
        let dir = folder();
        let root = dir.path();
        let (f, src) = file_of("deep/er/x.bin", &data(10), &[]);
        let opts = PullOptions {
            min_free_bytes: u64::MAX / 2,
            ..Default::default()
        };
        let e = pull(root, &f, None, false, &src, &opts)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("free space"), "{e}");
        assert_eq!(names_in(root), [".ferry"]);
        assert_eq!(src.fetches.load(Ordering::SeqCst), 0);
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn names_through_symlinks_and_planted_temp_links_are_refused() {
        let dir = folder();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
        let (f, src) = file_of("out/evil", b"x", &[]);
        assert!(pull(root, &f, None, false, &src, &PullOptions::default())
            .await
            .is_err());
        assert!(names_in(outside.path()).is_empty());

        // A symlink planted at the temp name is replaced, never written through.
        let victim = outside.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, root.join(".ferry-tmp-t")).unwrap();
        let (f, src) = file_of("t", b"new data", &[]);
        pull(root, &f, None, false, &src, &PullOptions::default())
            .await
            .unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(root.join("t")).unwrap(), b"new data");

        // So is a hard link planted there.
        let victim2 = root.join("victim2");
        fs::write(&victim2, b"precious too").unwrap();
        fs::hard_link(&victim2, root.join(".ferry-tmp-u")).unwrap();
        let (f, src) = file_of("u", b"other data", &[]);
        pull(root, &f, None, false, &src, &PullOptions::default())
            .await
            .unwrap();
        assert_eq!(fs::read(&victim2).unwrap(), b"precious too");
    }

    #[test]
    fn a_batch_passes_its_check_only_with_the_marker_its_parents_and_room_for_all() {
        let dir = folder();
        let root = dir.path();
        fs::create_dir(root.join("d")).unwrap();
        let files = [("top.bin", 10), ("d/a.bin", 10), ("d/b.bin", 10)];
        assert!(check_batch(root, files, 0));
        // A parent not made yet: its nearest existing ancestor is asked.
        assert!(check_batch(root, [("new/er/a.bin", 10)], 0));
        // Each file fits on its own, the batch does not.
        let half = u64::MAX / 2;
        assert!(!check_batch(
            root,
            [("d/a.bin", half), ("d/b.bin", half)],
            0
        ));
        assert!(!check_batch(root, files, u64::MAX));
        fs::remove_dir(root.join(FERRY_DIR)).unwrap();
        assert!(!check_batch(root, files, 0));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_batch_makes_the_parents_it_can_and_never_writes_through_a_link() {
        let dir = folder();
        let root = dir.path();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        fs::write(root.join("file"), b"x").unwrap();
        let names = [
            "top.bin",
            "new/er/a.bin",
            "new/er/b.bin",
            "new/c.bin",
            "link/in/x.bin",
            "file/y.bin",
            "../up/z.bin",
            ".ferry/w.bin",
        ];
        assert!(make_parents(root, names));
        assert!(root.join("new/er").is_dir());
        // Left for each file's own pull to report.
        assert!(fs::read_dir(outside.path()).unwrap().next().is_none());
        assert!(root.join("file").is_file());
        assert!(!root.join("../up").exists());
        assert!(!root.join(".ferry/w.bin").exists());
        assert_eq!(names_in(&root.join(FERRY_DIR)), Vec::<String>::new());
        // The files of a batch whose parents were made this way are pulled as usual.
        let (f, src) = file_of("new/er/a.bin", b"here", &[]);
        let opts = PullOptions {
            batch_checked: true,
            ..PullOptions::default()
        };
        let out = pull(root, &f, None, false, &src, &opts).await.unwrap();
        assert!(matches!(out, PullOutcome::Done { .. }));
        assert_eq!(fs::read(root.join("new/er/a.bin")).unwrap(), b"here");
    }

    /// With the batch's open root, a temp file is created in one call where nothing is
    /// unusual, and left to the usual steps otherwise.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_temp_file_is_created_beneath_the_open_root_or_left_to_the_usual_steps() {
        let dir = folder();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("d")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        let opts = PullOptions {
            batch_checked: true,
            root_dir: Some(Arc::new(File::open(root).unwrap())),
            ..Default::default()
        };
        let (f, _) = file_of("d/a.bin", &data(10), &[]);
        let prep = create_checked(root, &f, &opts).unwrap().unwrap();
        assert_eq!(prep.temp, root.join("d/.ferry-tmp-a.bin"));
        assert_eq!(prep.target, root.join("d/a.bin"));
        assert!(prep.temp.is_file());
        assert_eq!(prep.missing.len(), 1);
        // Already there, a missing parent, a symlinked parent: the usual steps.
        assert!(create_checked(root, &f, &opts).unwrap().is_none());
        for name in ["new/a.bin", "link/a.bin"] {
            let (f, _) = file_of(name, &data(10), &[]);
            assert!(create_checked(root, &f, &opts).unwrap().is_none(), "{name}");
        }
        assert!(fs::read_dir(outside.path()).unwrap().next().is_none());
        // A bad name is refused before anything is looked at.
        let (f, _) = file_of("../a.bin", &data(10), &[]);
        assert!(create_checked(root, &f, &opts).is_err());
        // Unchecked, or without the open root: nothing done here.
        let (f, _) = file_of("d/b.bin", &data(10), &[]);
        let plain = PullOptions {
            root_dir: opts.root_dir.clone(),
            ..Default::default()
        };
        assert!(create_checked(root, &f, &plain).unwrap().is_none());
        assert!(!root.join("d/.ferry-tmp-b.bin").exists());
    }

    /// A checked batch creates its temp files with the final mode where the umask lets
    /// it, and sets it otherwise: either way each file ends with its record's mode.
    #[cfg(unix)]
    #[tokio::test]
    async fn every_file_of_a_checked_batch_gets_its_records_mode() {
        let dir = folder();
        let root = dir.path();
        let checked = PullOptions {
            batch_checked: true,
            ..Default::default()
        };
        let umask = fsutil::process_umask().unwrap();
        let mut staged = Vec::new();
        let modes = [0o644, 0o755, 0o600, 0o666, 0o777, 0o444, 0o200, 0];
        for (i, mode) in modes.into_iter().enumerate() {
            let (mut f, src) = file_of(&format!("m/{i}.bin"), &data(100 + i), &[]);
            f.mode = mode;
            let by_create = created_mode(mode).is_some();
            assert_eq!(
                by_create,
                file_mode(mode) & umask == 0 && file_mode(mode) & 0o600 == 0o600,
                "{mode:o}"
            );
            staged.push(
                stage_file(root, &f, None, false, &dev(), &src, &checked)
                    .await
                    .unwrap(),
            );
            assert_eq!(staged[i].prep.mode_set, by_create, "{mode:o}");
        }
        // With a flush for the batch, and one by one.
        let second = staged.split_off(4);
        let mut outs = install_batch_from(root, staged, 0);
        outs.extend(install_batch_from(root, second, usize::MAX));
        for (i, (mode, out)) in modes.into_iter().zip(outs).enumerate() {
            assert!(matches!(out, Ok(PullOutcome::Done { .. })), "{out:?}");
            let d = try_stat(&root.join(format!("m/{i}.bin"))).unwrap().unwrap();
            assert_eq!(d.mode, file_mode(mode), "record mode {mode:o}");
        }
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn a_checked_batch_keeps_every_check_of_the_temp_name_and_the_parents() {
        // Path by path, and with the temp files created beneath the open root.
        for with_root_dir in [false, true] {
            checked_batch_checks(with_root_dir).await;
        }
    }

    #[cfg(unix)]
    async fn checked_batch_checks(with_root_dir: bool) {
        let dir = folder();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path();
        let checked = PullOptions {
            batch_checked: true,
            root_dir: with_root_dir.then(|| Arc::new(File::open(root).unwrap())),
            ..Default::default()
        };
        // A fresh file, with the directory it goes into.
        let (f, src) = file_of("d/fresh.bin", &data(3000), &[1000, 2000]);
        pull(root, &f, None, false, &src, &checked).await.unwrap();
        assert_eq!(fs::read(root.join("d/fresh.bin")).unwrap(), data(3000));

        // An interrupted pull's temp file is resumed from its verified blocks.
        let content = data(8000);
        let (f, src) = file_of("d/big.bin", &content, &[2000, 4000, 6000]);
        let mut partial = content[..4000].to_vec();
        partial.extend_from_slice(&[0xAA; 1000]);
        fs::write(root.join("d/.ferry-tmp-big.bin"), &partial).unwrap();
        pull(root, &f, None, false, &src, &checked).await.unwrap();
        assert_eq!(fs::read(root.join("d/big.bin")).unwrap(), content);
        let mut fetched = src.fetched.lock().unwrap().clone();
        fetched.sort();
        assert_eq!(fetched, [4000, 6000]);

        // A symlink or a hard link planted at the temp name is never written through.
        let victim = outside.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, root.join("d/.ferry-tmp-t")).unwrap();
        let (f, src) = file_of("d/t", b"new data", &[]);
        pull(root, &f, None, false, &src, &checked).await.unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(fs::read(root.join("d/t")).unwrap(), b"new data");
        let victim2 = root.join("victim2");
        fs::write(&victim2, b"precious too").unwrap();
        fs::hard_link(&victim2, root.join("d/.ferry-tmp-u")).unwrap();
        let (f, src) = file_of("d/u", b"other data", &[]);
        pull(root, &f, None, false, &src, &checked).await.unwrap();
        assert_eq!(fs::read(&victim2).unwrap(), b"precious too");
        assert_eq!(fs::read(root.join("d/u")).unwrap(), b"other data");

        // A temp file another pull holds is left to it.
        let held = File::create(root.join("d/.ferry-tmp-v")).unwrap();
        lock_temp(&held, &root.join("d/.ferry-tmp-v")).unwrap();
        let (f, src) = file_of("d/v", b"v", &[]);
        let e = pull(root, &f, None, false, &src, &checked)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("in progress"), "{e}");
        drop(held);

        // A parent that is a symlink is refused, at any depth, and so is a name the
        // folder must not hold.
        std::os::unix::fs::symlink(outside.path(), root.join("out")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("d/out")).unwrap();
        for name in ["out/evil", "d/out/evil", "../evil", ".ferry/evil"] {
            let (f, src) = file_of(name, b"x", &[]);
            let e = pull(root, &f, None, false, &src, &checked)
                .await
                .unwrap_err();
            assert!(e.to_string().contains("refused file name"), "{name}: {e}");
        }
        assert_eq!(names_in(outside.path()), ["victim"]);
        assert!(!root.join(".ferry/evil").exists());
    }

    #[tokio::test]
    async fn an_empty_directory_in_the_way_is_replaced_a_full_one_is_not() {
        let dir = folder();
        let root = dir.path();
        fs::create_dir_all(root.join("x")).unwrap();
        let (f, src) = file_of("x", b"file now", &[]);
        let exp = expected_of(&root.join("x"));
        let out = pull(root, &f, Some(&exp), false, &src, &PullOptions::default())
            .await
            .unwrap();
        assert!(matches!(out, PullOutcome::Done { .. }));
        assert_eq!(fs::read(root.join("x")).unwrap(), b"file now");

        fs::create_dir_all(root.join("y")).unwrap();
        fs::write(root.join("y/child"), b"c").unwrap();
        let exp = expected_of(&root.join("y"));
        let (f, src) = file_of("y", b"file now", &[]);
        let out = pull(root, &f, Some(&exp), false, &src, &PullOptions::default())
            .await
            .unwrap();
        assert_eq!(out, PullOutcome::TargetChanged);
        assert_eq!(fs::read(root.join("y/child")).unwrap(), b"c");
    }

    #[tokio::test]
    async fn a_batch_of_directories_is_made_in_order_with_each_outcome() {
        use std::os::unix::fs::PermissionsExt;
        let dir = folder();
        let root = dir.path();
        let d = |name: &str, mode: u32| FileInfo {
            kind: FileKind::Dir,
            mode,
            deleted: false,
            ..tombstone(name, FileKind::Dir)
        };
        fs::create_dir(root.join("old")).unwrap();
        fs::set_permissions(root.join("old"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(root.join("taken"), b"unknown to the index").unwrap();
        fs::write(root.join("outside"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("outside"), root.join("link")).unwrap();
        let batch = [
            d("a/b/c", 0o755),
            d("old", 0o755),
            d("taken", 0o755),
            d("link/in", 0o755),
            d("a", 0o750),
            d("", 0o755),
        ];
        let out = apply_dirs(
            root,
            batch
                .iter()
                .map(|f| (f.clone(), InTheWay::default()))
                .collect(),
        )
        .await;
        assert_eq!(out.len(), batch.len());
        let inode = |p: &str| fs::metadata(root.join(p)).unwrap().ino();
        use std::os::unix::fs::MetadataExt;
        // Missing parents are made with it.
        assert_eq!(
            out[0].as_ref().ok(),
            Some(&PullOutcome::Done {
                inode: inode("a/b/c")
            })
        );
        assert!(root.join("a/b").is_dir());
        // An existing directory gets its mode.
        assert_eq!(
            out[1].as_ref().ok(),
            Some(&PullOutcome::Done {
                inode: inode("old")
            })
        );
        let mode = fs::metadata(root.join("old")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        // A file the index does not know of is left alone.
        assert_eq!(out[2].as_ref().ok(), Some(&PullOutcome::TargetChanged));
        assert_eq!(
            fs::read(root.join("taken")).unwrap(),
            b"unknown to the index"
        );
        // Never through a symlink; the others are still made.
        assert!(out[3].is_err(), "{:?}", out[3]);
        assert!(!root.join("outside").is_dir());
        assert_eq!(
            out[4].as_ref().ok(),
            Some(&PullOutcome::Done { inode: inode("a") })
        );
        assert!(out[5].is_err(), "{:?}", out[5]);
        // A batch without the folder's marker writes nothing.
        fs::remove_dir(root.join(FERRY_DIR)).unwrap();
        let out = apply_dirs(root, vec![(d("new", 0o755), InTheWay::default())]).await;
        assert!(out[0].is_err());
        assert!(!root.join("new").exists());
    }

    fn tombstone(name: &str, kind: FileKind) -> FileInfo {
        FileInfo {
            name: name.into(),
            kind,
            size: 0,
            mtime_ns: MTIME,
            mode: 0,
            deleted: true,
            version: Default::default(),
            sequence: 2,
            modified_by: 1,
            blocks: vec![],
            symlink_target: None,
        }
    }

    #[tokio::test]
    async fn deletion_refuses_a_modified_file_and_removes_a_matching_one() {
        let dir = folder();
        let root = dir.path();
        let p = root.join("gone.txt");
        fs::write(&p, b"indexed").unwrap();
        let exp = expected_of(&p);
        fs::write(&p, b"edited since").unwrap();
        let t = tombstone("gone.txt", FileKind::File);
        assert_eq!(
            apply_delete(root, &t, Some(&exp), None).await.unwrap(),
            PullOutcome::TargetChanged
        );
        assert_eq!(
            apply_delete(root, &t, None, None).await.unwrap(),
            PullOutcome::TargetChanged,
            "unknown to the index: not ours to delete"
        );
        assert_eq!(fs::read(&p).unwrap(), b"edited since");

        let exp = expected_of(&p);
        assert_eq!(
            apply_delete(root, &t, Some(&exp), None).await.unwrap(),
            PullOutcome::Done { inode: 0 }
        );
        assert!(!p.exists());
        // Already gone is fine.
        assert_eq!(
            apply_delete(root, &t, Some(&exp), None).await.unwrap(),
            PullOutcome::Done { inode: 0 }
        );
    }

    /// Regression (stale temp files in the stress test): a pull that failed left
    /// `.ferry-tmp-<name>`; the name was then deleted everywhere, and nothing ever
    /// finished or removed the temp file, so folders never became identical.
    #[tokio::test]
    async fn a_deletion_removes_the_stale_temp_file_of_its_name() {
        let dir = folder();
        let root = dir.path();
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/.ferry-tmp-f.txt"), b"half a pull").unwrap();
        fs::write(root.join("d/.ferry-tmp-never.txt"), b"half a pull").unwrap();
        // Never here at all (deleted before this device got it) ...
        let t = tombstone("d/never.txt", FileKind::File);
        assert_eq!(
            apply_delete(root, &t, None, None).await.unwrap(),
            PullOutcome::Done { inode: 0 }
        );
        // ... or here and deleted.
        fs::write(root.join("d/f.txt"), b"indexed").unwrap();
        let exp = expected_of(&root.join("d/f.txt"));
        let t = tombstone("d/f.txt", FileKind::File);
        assert_eq!(
            apply_delete(root, &t, Some(&exp), None).await.unwrap(),
            PullOutcome::Done { inode: 0 }
        );
        assert!(names_in(&root.join("d")).is_empty());
        // A temp file a pull holds open stays.
        let held_at = root.join("d/.ferry-tmp-held.txt");
        let (held, _) = open_temp_seen(&held_at, fs::symlink_metadata(&held_at)).unwrap();
        assert!(!remove_temp_of(root, "d/held.txt").unwrap());
        drop(held);
        assert!(remove_temp_of(root, "d/held.txt").unwrap());
    }

    #[tokio::test]
    async fn fresh_temp_files_are_listed_by_the_name_they_build() {
        let dir = folder();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::write(root.join("a/b/.ferry-tmp-x.bin"), b"").unwrap();
        fs::write(root.join(".ferry-tmp-top"), b"").unwrap();
        fs::write(root.join("a/.ferry-tmp-old"), b"").unwrap();
        fsutil::set_mtime(&root.join("a/.ferry-tmp-old"), 0).unwrap();
        let long = "é".repeat(200);
        let long_temp = temp_name(&long);
        fs::write(root.join(&long_temp), b"").unwrap();
        let (removed, mut kept) =
            cleanup_and_list_temp_files(root, Duration::from_secs(3600)).unwrap();
        kept.sort();
        assert_eq!(removed, 1);
        assert_eq!(
            kept,
            ["a/b/x.bin", "top"],
            "a hashed long name is not listed"
        );
    }

    #[tokio::test]
    async fn deletion_with_versioning_keeps_a_copy() {
        let dir = folder();
        let root = dir.path();
        let p = root.join("noext");
        fs::write(&p, b"keep me").unwrap();
        let exp = expected_of(&p);
        let v = Versioning { keep_days: 1 };
        let t = tombstone("noext", FileKind::File);
        apply_delete(root, &t, Some(&exp), Some(&v)).await.unwrap();
        assert!(!p.exists());
        let kept = names_in(&root.join(VERSIONS_DIR));
        assert_eq!(kept.len(), 1);
        assert!(kept[0].starts_with("noext~"), "{kept:?}");
        assert_eq!(
            fs::read(root.join(VERSIONS_DIR).join(&kept[0])).unwrap(),
            b"keep me"
        );
    }

    #[tokio::test]
    async fn a_directory_is_deleted_only_when_empty_but_for_temp_files() {
        let dir = folder();
        let root = dir.path();
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/real"), b"x").unwrap();
        fs::write(root.join("d/.ferry-tmp-partial"), b"y").unwrap();
        let exp = expected_of(&root.join("d"));
        let t = tombstone("d", FileKind::Dir);
        assert_eq!(
            apply_delete(root, &t, Some(&exp), None).await.unwrap(),
            PullOutcome::TargetChanged
        );
        assert!(root.join("d/real").exists());
        fs::remove_file(root.join("d/real")).unwrap();
        assert_eq!(
            apply_delete(root, &t, Some(&exp), None).await.unwrap(),
            PullOutcome::Done { inode: 0 }
        );
        assert!(!root.join("d").exists());
        // A file tombstone never removes a directory.
        fs::create_dir_all(root.join("e")).unwrap();
        let t = tombstone("e", FileKind::File);
        assert_eq!(
            apply_delete(root, &t, None, None).await.unwrap(),
            PullOutcome::TargetChanged
        );
    }

    /// Regression (a file replaced by a directory of the same name never arrived: the
    /// file stayed in the way for ever), and no edit is lost when a name changes kind
    /// in a conflict: the losing file becomes a conflict copy.
    #[tokio::test]
    async fn a_file_in_the_way_of_a_directory_or_link_is_replaced_or_kept_as_a_conflict() {
        let dir = folder();
        let root = dir.path();
        let mut d = tombstone("x", FileKind::Dir);
        d.deleted = false;
        let mut l = tombstone("y", FileKind::Symlink);
        l.deleted = false;
        l.symlink_target = Some("x".into());
        for name in ["x", "y"] {
            fs::write(root.join(name), b"indexed file").unwrap();
        }
        let way = |p: &Path, loser: bool| InTheWay {
            expected: Some(expected_of(p)),
            concurrent_loser: loser,
            conflict_device: Some(dev()),
            versioning: None,
        };

        // Not what the index knows: left alone until rescanned.
        let unknown = InTheWay::default();
        assert_eq!(
            apply_dir_over(root, &d, &unknown).await.unwrap(),
            PullOutcome::TargetChanged
        );
        assert_eq!(
            apply_symlink_over(root, &l, &unknown).await.unwrap(),
            PullOutcome::TargetChanged
        );

        // Superseded (the other device replaced the file knowingly): replaced.
        let w = way(&root.join("x"), false);
        assert!(matches!(
            apply_dir_over(root, &d, &w).await.unwrap(),
            PullOutcome::Done { .. }
        ));
        assert!(root.join("x").is_dir());
        assert_eq!(names_in(root), [".ferry", "x", "y"]);

        // Lost a conflict: kept beside the link.
        let w = way(&root.join("y"), true);
        let PullOutcome::Conflict { kept_as, .. } = apply_symlink_over(root, &l, &w).await.unwrap()
        else {
            panic!("expected a conflict copy");
        };
        assert!(kept_as.starts_with("y.sync-conflict-"), "{kept_as}");
        assert_eq!(fs::read(root.join(&kept_as)).unwrap(), b"indexed file");
        assert_eq!(fs::read_link(root.join("y")).unwrap(), PathBuf::from("x"));

        // A directory that lost a conflict to... a file in its place: the same for dirs.
        fs::remove_dir(root.join("x")).unwrap();
        fs::write(root.join("x"), b"edited here").unwrap();
        let w = way(&root.join("x"), true);
        let PullOutcome::Conflict { kept_as, .. } = apply_dir_over(root, &d, &w).await.unwrap()
        else {
            panic!("expected a conflict copy");
        };
        assert_eq!(fs::read(root.join(&kept_as)).unwrap(), b"edited here");
        assert!(root.join("x").is_dir());

        // A directory replaced by a link: once its contents are gone it goes.
        let mut l2 = l.clone();
        l2.name = "x".into();
        fs::write(root.join("x/inside"), b"").unwrap();
        assert_eq!(
            apply_symlink_over(root, &l2, &InTheWay::default())
                .await
                .unwrap(),
            PullOutcome::TargetChanged
        );
        fs::remove_file(root.join("x/inside")).unwrap();
        assert!(matches!(
            apply_symlink_over(root, &l2, &InTheWay::default())
                .await
                .unwrap(),
            PullOutcome::Done { .. }
        ));
        assert!(fs::symlink_metadata(root.join("x")).unwrap().is_symlink());
    }

    #[tokio::test]
    async fn directories_are_created_with_their_mode() {
        let dir = folder();
        let root = dir.path();
        let mut d = tombstone("a/b/c", FileKind::Dir);
        d.deleted = false;
        d.mode = 0o750;
        let out = apply_dir(root, &d).await.unwrap();
        let m = try_stat(&root.join("a/b/c")).unwrap().unwrap();
        assert_eq!(out, PullOutcome::Done { inode: m.inode });
        assert_eq!(m.kind, FileKind::Dir);
        #[cfg(unix)]
        assert_eq!(m.mode, 0o750);
        d.mode = 0o755;
        apply_dir(root, &d).await.unwrap();
        #[cfg(unix)]
        assert_eq!(try_stat(&root.join("a/b/c")).unwrap().unwrap().mode, 0o755);
        fs::write(root.join("file"), b"x").unwrap();
        let mut d2 = d.clone();
        d2.name = "file".into();
        assert_eq!(
            apply_dir(root, &d2).await.unwrap(),
            PullOutcome::TargetChanged
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlinks_are_created_as_links_and_replaced_only_when_expected() {
        let dir = folder();
        let root = dir.path();
        let mut l = tombstone("links/l", FileKind::Symlink);
        l.deleted = false;
        l.symlink_target = Some("../../etc/passwd".into());
        let out = apply_symlink(root, &l, None).await.unwrap();
        assert!(matches!(out, PullOutcome::Done { .. }));
        let p = root.join("links/l");
        assert_eq!(
            fs::read_link(&p).unwrap(),
            PathBuf::from("../../etc/passwd")
        );
        let m = try_stat(&p).unwrap().unwrap();
        assert_eq!((m.kind, m.mtime_ns), (FileKind::Symlink, MTIME));

        // Same link again: nothing to do.
        assert!(matches!(
            apply_symlink(root, &l, None).await.unwrap(),
            PullOutcome::Done { .. }
        ));
        // A different target replaces the link only if it is what the index expects.
        let exp = expected_of(&p);
        l.symlink_target = Some("elsewhere".into());
        let stale = ExpectedLocal { mtime_ns: 1, ..exp };
        assert_eq!(
            apply_symlink(root, &l, Some(&stale)).await.unwrap(),
            PullOutcome::TargetChanged
        );
        apply_symlink(root, &l, Some(&exp)).await.unwrap();
        assert_eq!(fs::read_link(&p).unwrap(), PathBuf::from("elsewhere"));
        // A regular file the index does not know is never replaced.
        fs::write(root.join("links/f"), b"data").unwrap();
        l.name = "links/f".into();
        assert_eq!(
            apply_symlink(root, &l, None).await.unwrap(),
            PullOutcome::TargetChanged
        );
        assert_eq!(fs::read(root.join("links/f")).unwrap(), b"data");
        assert_eq!(names_in(&root.join("links")), ["f", "l"]);
    }

    #[tokio::test]
    async fn old_temp_files_are_cleaned_up_outside_ferry_dir() {
        let dir = folder();
        let root = dir.path();
        fs::create_dir_all(root.join("a/b")).unwrap();
        fs::create_dir_all(root.join(".ferry")).unwrap();
        fs::write(root.join(".ferry-tmp-x"), b"").unwrap();
        fs::write(root.join("a/b/.ferry-tmp-y"), b"").unwrap();
        fs::write(root.join("a/b/keep"), b"").unwrap();
        fs::write(root.join(".ferry/.ferry-tmp-z"), b"").unwrap();
        assert_eq!(
            cleanup_temp_files(root, Duration::from_secs(3600)).unwrap(),
            0
        );
        fsutil::set_mtime(&root.join("a/b/.ferry-tmp-y"), 0).unwrap();
        fsutil::set_mtime(&root.join(".ferry/.ferry-tmp-z"), 0).unwrap();
        assert_eq!(
            cleanup_temp_files(root, Duration::from_secs(3600)).unwrap(),
            1
        );
        assert_eq!(names_in(&root.join("a/b")), ["keep"]);
        assert!(root.join(".ferry/.ferry-tmp-z").exists());
        assert!(root.join(".ferry-tmp-x").exists());
    }

    #[test]
    fn version_names_keep_the_extension_and_parse_back() {
        let when = time::macros::datetime!(2024-01-02 03:04:05 UTC);
        assert_eq!(version_name("a.tar.gz", when), "a.tar~20240102-030405.gz");
        assert_eq!(version_name(".bashrc", when), ".bashrc~20240102-030405");
        assert_eq!(version_stamp("a.tar~20240102-030405.gz"), Some(when));
        assert_eq!(version_stamp(".bashrc~20240102-030405"), Some(when));
        assert_eq!(version_stamp("x~2024"), None);
        assert_eq!(version_stamp("x~20241302-030405"), None);
        let long = "x".repeat(250) + ".txt";
        assert!(version_name(&long, when).len() <= MAX_NAME_BYTES);
    }
}
