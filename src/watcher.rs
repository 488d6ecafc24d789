//! The watcher: file-system notifications in, debounced sets of names to scan out.
//!
//! It watches a folder recursively (notify 8) and, once the folder has been quiet for
//! `debounce` (150 ms by default; names never wait longer than that while events keep
//! coming), sends the changed names — relative, `/`-separated, NFC, deduplicated — on a
//! channel. Changes that are finished when they happen (a file renamed in or closed after
//! writing, a removal, a new directory) go at once when no batch went out within the
//! last debounce: a file saved or moved into the folder does not wait for quiet. It never
//! reads file contents and never writes the index: the scanner stays the one source of
//! truth about disk, and the watcher only says where to look. Every
//! path an event names is reported, so a rename reports both names. Ferry's own files
//! (`.ferry/`, `.ferry-tmp-*`) and `.ferryignore`d names are dropped. The name `""` means
//! "rescan the whole folder": it is sent when the OS dropped events (queue overflow), when
//! the folder root itself was removed or moved, and when `.ferryignore` changed (the
//! watcher then reloads it itself, and names it no longer ignores must be found).
//!
//! Events are not interpreted, only collected: a debouncer that merges them (as
//! `notify-debouncer-full` does) decides that a name "created, then removed" within the
//! window had nothing happen to it — but "created" may be a file renamed over one the
//! index knows, and then that file's disappearance would never be scanned.
//!
//! Latency matters (a change should reach a peer in well under a second), so nothing here
//! waits longer than the debounce.
//!
//! The notify threads never block on the consumer: names are merged into a pending set
//! and a small forwarding thread hands them over with `try_send`; while the channel is full
//! new names keep merging into the next batch. A batch holds at most
//! [`MAX_BATCH_NAMES`] names: past that it becomes `""`, one full rescan. A folder busy
//! with a long pull reads no batches meanwhile, and the pull's own writes are events
//! too: a pull of a million files had its daemon hold every one of those names and then
//! scan them one by one; with the bound its peak fell from 320 to 209 MiB (BENCHMARKS.md,
//! "This session: h's pulling daemon's memory"), and once the names merged into a held
//! batch stopped being remembered as mid-write, to a rescan's 129–132 MiB ("The
//! watcher's mid-write set").
//!
//! When the OS watch limit is hit (Linux inotify, `fs.inotify.max_user_watches`), one
//! warning says so and what to do; the parts already watched keep working and the periodic
//! full rescan still catches the rest.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
use notify::{Event, RecursiveMode, Watcher};
use tokio::sync::mpsc::error::TrySendError;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

use crate::error::{Error, Result};
use crate::ignore::{Ignores, IGNORE_FILE};

/// The default quiet time before a change is handed to the scanner.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(150);
/// Shortest debounce accepted: below this the debouncer thread would spin.
const MIN_DEBOUNCE: Duration = Duration::from_millis(10);
/// How often the forwarder retries a full channel (while merging newer names).
const RETRY_FULL: Duration = Duration::from_millis(20);
/// Quiet time before a batch of finished changes goes out early (without the debounce):
/// long enough for the rest of the same burst of events to arrive. A rename is two events
/// (the old name, then the new); sent apart, a peer deletes the old file before it learns
/// of the new name and fetches the whole file again instead of copying it locally.
const EARLY_QUIET: Duration = Duration::from_millis(10);

/// A running watch. Dropping it stops watching (and the threads behind it).
pub struct WatchHandle {
    watcher: Option<notify::RecommendedWatcher>,
    shared: Arc<Shared>,
    forwarder: Option<JoinHandle<()>>,
}

impl WatchHandle {
    /// When the newest event in the batches sent so far came in (every one of them
    /// happened before this). `None` before the first batch.
    pub fn newest_sent_event(&self) -> Option<Instant> {
        *self
            .shared
            .last_batch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the ignore rules (after `.ferryignore` changed).
    pub fn set_ignores(&self, ignores: Ignores) {
        *self
            .shared
            .ignores
            .write()
            .unwrap_or_else(|e| e.into_inner()) = ignores;
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        drop(self.watcher.take());
        self.shared.stop.store(true, Ordering::Release);
        self.shared.ready.notify_all();
        if let Some(t) = self.forwarder.take() {
            let _ = t.join();
        }
    }
}

/// State shared by the notify callback, the forwarder and the handle.
struct Shared {
    /// The folder root as given, and canonicalized (some platforms report real paths).
    root: PathBuf,
    root_canonical: PathBuf,
    ignores: RwLock<Ignores>,
    /// Names waiting to be sent, and when the last of them arrived.
    pending: Mutex<Pending>,
    ready: Condvar,
    /// Quiet time before names are sent.
    debounce: Duration,
    stop: AtomicBool,
    /// The watch-limit warning is logged once per watch.
    warned_limit: AtomicBool,
    /// See [`WatchHandle::newest_sent_event`].
    last_batch: Mutex<Option<Instant>>,
}

/// Names one batch holds at most; more become `""` (rescan the whole folder), which costs
/// about what scanning that many names one by one does in a large folder (a warm rescan
/// of 1,000,000 files took 3 s, `bench/compare` h) and holds one name instead of all.
pub const MAX_BATCH_NAMES: usize = 16_384;

/// Adds `more` to a batch, which becomes `{""}` (a full rescan) once it asks for one or
/// holds more than [`MAX_BATCH_NAMES`].
fn merge_names(batch: &mut BTreeSet<String>, more: impl IntoIterator<Item = String>) {
    if asks_full_rescan(batch) {
        return;
    }
    batch.extend(more);
    if batch.len() > MAX_BATCH_NAMES || asks_full_rescan(batch) {
        *batch = BTreeSet::from([String::new()]);
    }
}

/// Whether a batch holds `""` (it sorts first).
fn asks_full_rescan(batch: &BTreeSet<String>) -> bool {
    batch.first().is_some_and(|n| n.is_empty())
}

#[derive(Default)]
struct Pending {
    names: BTreeSet<String>,
    /// The pending names whose last event leaves them mid-write (created or modified, not
    /// yet closed). While there are none, the batch need not wait for quiet.
    unfinished: BTreeSet<String>,
    last: Option<Instant>,
}

/// What the kernel is asked to report: changes, and a file closed after writing (which
/// [`finishes`] it). Not opens or reads: the only events it sends for a file being read
/// (by us to hash or serve it, or by any program), and a wake-up of the watcher's thread
/// each, which this watcher ignored anyway. Serving 10,000 small files was 10,000 of them.
const EVENT_KINDS: notify::EventKindMask =
    notify::EventKindMask::CORE.union(notify::EventKindMask::ACCESS_CLOSE);

/// Whether an event leaves its name finished for now: a file closed after writing, a
/// rename, a removal, a new directory. A created or modified file is mid-write until it is
/// closed; a metadata change may come before the data (`fchmod`, then `write`).
fn finishes(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Create(CreateKind::Folder)
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_)
    )
}

/// Watches `root` recursively; after `debounce` of quiet (see [`DEFAULT_DEBOUNCE`]) sends
/// the set of changed relative names (deduplicated, `/`-separated, NFC, ignored names,
/// `.ferry/` and temp files removed) to `tx`. `""` asks for a full rescan.
pub fn watch(
    root: &Path,
    debounce: Duration,
    ignores: Ignores,
    tx: tokio::sync::mpsc::Sender<Vec<String>>,
) -> Result<WatchHandle> {
    let debounce = debounce.max(MIN_DEBOUNCE);
    let root_canonical = std::fs::canonicalize(root).map_err(|e| Error::io(root, e))?;
    let shared = Arc::new(Shared {
        root: root.to_path_buf(),
        root_canonical,
        ignores: RwLock::new(ignores),
        pending: Mutex::new(Pending::default()),
        ready: Condvar::new(),
        debounce,
        stop: AtomicBool::new(false),
        warned_limit: AtomicBool::new(false),
        last_batch: Mutex::new(None),
    });

    let handler_shared = shared.clone();
    let mut watcher = notify::RecommendedWatcher::new(
        move |res: notify::Result<Event>| handler_shared.handle(res),
        notify::Config::default().with_event_kinds(EVENT_KINDS),
    )
    .map_err(|e| notify_error(root, e))?;

    match watcher.watch(root, RecursiveMode::Recursive) {
        Ok(()) => {}
        Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => shared.warn_limit(),
        Err(e) => return Err(notify_error(root, e)),
    }

    let fwd_shared = shared.clone();
    let forwarder = std::thread::Builder::new()
        .name("ferry-watch-forward".into())
        .spawn(move || fwd_shared.forward(tx))
        .map_err(|e| Error::io(root, e))?;

    Ok(WatchHandle {
        watcher: Some(watcher),
        shared,
        forwarder: Some(forwarder),
    })
}

fn notify_error(root: &Path, e: notify::Error) -> Error {
    match e.kind {
        notify::ErrorKind::Io(io) => Error::io(root, io),
        other => Error::io(root, std::io::Error::other(format!("watch: {other:?}"))),
    }
}

impl Shared {
    /// Runs on the notify thread: turn an event into names and wake the forwarder.
    fn handle(&self, res: notify::Result<Event>) {
        match res {
            Ok(ev) => {
                let mut names = Vec::new();
                self.names_of(&ev, &mut names);
                if !names.is_empty() {
                    let finished = finishes(&ev.kind);
                    let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                    // The forwarder needs waking only when it may act sooner than it
                    // planned: a first name to wait for, or the last unfinished file
                    // finished (an early batch). Otherwise its timed wait covers it; a
                    // wake-up per event cost a futex call and a thread switch for each of
                    // the several events of every file a pull writes.
                    let first = pending.names.is_empty();
                    let had_unfinished = !pending.unfinished.is_empty();
                    if asks_full_rescan(&pending.names) {
                        // One full rescan is pending: which names are mid-write no longer
                        // matters, only that some may be (`""` stays in `unfinished`
                        // until the batch goes, so it waits for quiet).
                        if !finished {
                            pending.unfinished.insert(String::new());
                        }
                    } else {
                        for name in &names {
                            if finished {
                                pending.unfinished.remove(name);
                            } else {
                                pending.unfinished.insert(name.clone());
                            }
                        }
                    }
                    let settled = had_unfinished && pending.unfinished.is_empty();
                    merge_names(&mut pending.names, names);
                    if asks_full_rescan(&pending.names) && pending.unfinished.len() > 1 {
                        pending.unfinished = BTreeSet::from([String::new()]);
                    }
                    // Every mid-write name is also a pending one (both are emptied
                    // together when names go into a batch), so the bound on batches
                    // bounds this set too.
                    debug_assert!(pending.unfinished.len() <= pending.names.len().max(1));
                    pending.last = Some(Instant::now());
                    drop(pending);
                    if first || settled {
                        self.ready.notify_one();
                    }
                }
            }
            Err(e) => {
                if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) {
                    self.warn_limit();
                } else {
                    tracing::warn!("{}: file watcher: {e}", self.root.display());
                }
            }
        }
    }

    fn warn_limit(&self) {
        if !self.warned_limit.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "{}: the operating system's limit on watched directories was reached, so \
                 changes in some directories are not seen right away. Raise it, e.g. \
                 `sudo sysctl fs.inotify.max_user_watches=1048576` (and set it in \
                 /etc/sysctl.conf to keep it); until then the periodic rescans still pick \
                 up every change, only later.",
                self.root.display()
            );
        }
    }

    /// The folder-relative names an event is about, filtered.
    fn names_of(&self, ev: &Event, out: &mut Vec<String>) {
        if ev.need_rescan() {
            out.push(String::new());
            return;
        }
        match ev.kind {
            // Opening or reading a file changes nothing (and the scanner's own reads would
            // otherwise wake us); closing a file written to does.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {}
            EventKind::Access(_) => return,
            _ => {}
        }
        for path in &ev.paths {
            match self.relative(path) {
                Some(name) if name.is_empty() => {
                    // The root itself: only its removal or move matters, and then everything.
                    if matches!(
                        ev.kind,
                        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                    ) {
                        out.push(String::new());
                    }
                }
                Some(name) if name == IGNORE_FILE => {
                    // New rules: filter with them from now on, and rescan everything so
                    // names that are no longer ignored are found.
                    self.reload_ignores();
                    out.push(name);
                    out.push(String::new());
                }
                // Ferry's own temp files (always ignored): no stat for them. A pull of
                // many small files makes several events per temp file.
                Some(name) if crate::ignore::is_temp_name(&name) => {}
                Some(name) => {
                    let ignores = self.ignores.read().unwrap_or_else(|e| e.into_inner());
                    let (as_file, as_dir) = (
                        ignores.is_ignored(&name, false),
                        ignores.is_ignored(&name, true),
                    );
                    // Only rules that differ for directories (`build/`) need a stat.
                    let ignored = if as_file == as_dir {
                        as_file
                    } else if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
                        as_dir
                    } else {
                        as_file
                    };
                    if !ignored {
                        out.push(name);
                    }
                }
                None => {}
            }
        }
    }

    fn reload_ignores(&self) {
        match Ignores::load(&self.root) {
            Ok(ig) => *self.ignores.write().unwrap_or_else(|e| e.into_inner()) = ig,
            Err(e) => tracing::warn!("{e}; keeping the previous ignore rules"),
        }
    }

    /// `path` relative to the root as an NFC, `/`-separated name; `None` outside the root
    /// or not valid UTF-8.
    fn relative(&self, path: &Path) -> Option<String> {
        let rel = path
            .strip_prefix(&self.root)
            .or_else(|_| path.strip_prefix(&self.root_canonical))
            .ok()?;
        let s = rel.to_str()?;
        #[cfg(windows)]
        let s = &s.replace('\\', "/");
        Some(match is_nfc_quick(s.chars()) {
            IsNormalized::Yes => s.to_string(),
            _ => s.nfc().collect(),
        })
    }

    /// Notes when the newest event of a batch about to be sent came in (see
    /// [`WatchHandle::newest_sent_event`]); called before the batch can reach the channel.
    fn stamp_batch(&self, last_event: Option<Instant>) {
        let mut stamp = self.last_batch.lock().unwrap_or_else(|e| e.into_inner());
        *stamp = (*stamp).max(last_event);
    }

    /// Runs on the forwarding thread: once names are pending and the folder has been
    /// quiet for the debounce (or names have waited that long), hands them to the channel
    /// without ever blocking the notify side; a full channel makes names merge into the
    /// next batch.
    ///
    /// Leading edge: when every pending name is finished (a file renamed in or closed
    /// after writing, a removal; see [`finishes`]) and no batch went out within the last
    /// debounce, the batch goes at once. A file moved or saved into the folder is then
    /// scanned without waiting, and a burst still gets at most one early batch per
    /// debounce, the rest merging as before.
    fn forward(&self, tx: tokio::sync::mpsc::Sender<Vec<String>>) {
        let mut last_sent: Option<Instant> = None;
        loop {
            let mut batch: BTreeSet<String> = {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                while pending.names.is_empty() && !self.stop.load(Ordering::Acquire) {
                    pending = self.ready.wait(pending).unwrap_or_else(|e| e.into_inner());
                }
                let first = Instant::now();
                loop {
                    if self.stop.load(Ordering::Acquire) {
                        return;
                    }
                    let quiet = pending.last.map_or(self.debounce, |t| t.elapsed());
                    let waited = first.elapsed();
                    if quiet >= self.debounce || waited >= self.debounce {
                        break;
                    }
                    let early = pending.unfinished.is_empty()
                        && last_sent.is_none_or(|t| t.elapsed() >= self.debounce);
                    if early && quiet >= EARLY_QUIET {
                        break;
                    }
                    let left = if early {
                        EARLY_QUIET.saturating_sub(quiet)
                    } else {
                        (self.debounce - quiet).min(self.debounce - waited)
                    };
                    pending = self
                        .ready
                        .wait_timeout(pending, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                pending.unfinished.clear();
                self.stamp_batch(pending.last);
                std::mem::take(&mut pending.names)
            };
            last_sent = Some(Instant::now());
            loop {
                match tx.try_send(batch.into_iter().collect()) {
                    Ok(()) => break,
                    Err(TrySendError::Closed(_)) => return,
                    Err(TrySendError::Full(names)) => {
                        batch = names.into_iter().collect();
                        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                        let (mut pending, _) = self
                            .ready
                            .wait_timeout(pending, RETRY_FULL)
                            .unwrap_or_else(|e| e.into_inner());
                        if self.stop.load(Ordering::Acquire) {
                            return;
                        }
                        self.stamp_batch(pending.last);
                        merge_names(&mut batch, std::mem::take(&mut pending.names));
                        // As when a batch is taken above: the names are in the batch now,
                        // and whether they were mid-write no longer holds it back. Kept,
                        // this set grew by a name per file a long pull wrote.
                        pending.unfinished.clear();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use tokio::sync::mpsc;
    use tokio::time::{timeout, Instant};

    /// Generous: CI machines are slow. Nothing here asserts a timing tightly.
    const WAIT: Duration = Duration::from_secs(10);

    /// Collects batches until every name in `want` has been seen (or the wait runs out).
    async fn collect_until(rx: &mut mpsc::Receiver<Vec<String>>, want: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        while !want.iter().all(|w| seen.iter().any(|s| s == w)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left, rx.recv()).await {
                Ok(Some(batch)) => {
                    let unique: HashSet<&String> = batch.iter().collect();
                    assert_eq!(unique.len(), batch.len(), "batch has duplicates: {batch:?}");
                    seen.extend(batch);
                }
                _ => panic!("timed out waiting for {want:?}; saw {seen:?}"),
            }
        }
        seen
    }

    #[test]
    fn a_batch_of_too_many_names_becomes_one_full_rescan() {
        let names = |r: std::ops::Range<usize>| r.map(|i| format!("f{i}")).collect::<Vec<_>>();
        let mut batch = BTreeSet::new();
        merge_names(&mut batch, names(0..MAX_BATCH_NAMES));
        assert_eq!(
            batch.len(),
            MAX_BATCH_NAMES,
            "up to the bound, every name is kept"
        );
        merge_names(&mut batch, names(0..10));
        assert_eq!(
            batch.len(),
            MAX_BATCH_NAMES,
            "names already there count once"
        );
        merge_names(&mut batch, names(MAX_BATCH_NAMES..MAX_BATCH_NAMES + 1));
        assert_eq!(batch, BTreeSet::from([String::new()]));
        merge_names(&mut batch, names(0..3));
        assert_eq!(
            batch,
            BTreeSet::from([String::new()]),
            "a full rescan covers them"
        );

        // A batch that asks for a full rescan (the OS dropped events) keeps no names.
        let mut batch = BTreeSet::from(["a".to_string()]);
        merge_names(&mut batch, ["".to_string(), "b".to_string()]);
        assert_eq!(batch, BTreeSet::from([String::new()]));
    }

    /// A folder loop that reads nothing for a while (a long pull) while more files change
    /// than a batch holds: what waits for it is one full rescan, not every name.
    #[tokio::test]
    async fn names_waiting_for_a_busy_folder_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let _w = watch(dir.path(), DEFAULT_DEBOUNCE, Ignores::empty(), tx).unwrap();
        std::fs::write(dir.path().join("first"), b"1").unwrap();
        // The first batch fills the channel; nothing is read until every file is written.
        let deadline = Instant::now() + WAIT;
        while rx.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for i in 0..MAX_BATCH_NAMES + 100 {
            std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
        }
        let mut seen = Vec::new();
        while !seen.iter().any(|b: &Vec<String>| b == &[String::new()]) {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout(left + WAIT, rx.recv()).await {
                Ok(Some(batch)) => {
                    assert!(batch.len() <= MAX_BATCH_NAMES, "a batch of {}", batch.len());
                    seen.push(batch);
                }
                _ => panic!(
                    "no full rescan asked for; batches of {:?} names",
                    seen.iter().map(Vec::len).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// A pull sets each file's time after writing it: a metadata event, which leaves the
    /// name "mid-write" until it is closed, and a pull never reopens it. While the folder
    /// reads no batches, those names go into the batch being held; what the watcher
    /// remembers about them must go with them, or it grows by one name per pulled file
    /// until the pull ends (11.7 MB at 300,000 files, heaptrack in BENCHMARKS.md).
    #[tokio::test]
    async fn names_merged_into_a_held_batch_are_not_remembered_as_mid_write() {
        const FILES: usize = 2_000;
        let dir = tempfile::tempdir().unwrap();
        for i in 0..FILES {
            std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
        }
        let (tx, mut rx) = mpsc::channel(1);
        let w = watch(dir.path(), DEFAULT_DEBOUNCE, Ignores::empty(), tx).unwrap();
        // The first batch fills the channel; the second is held by the forwarder (its
        // names were taken once the newest event sent is the second file's).
        let deadline = Instant::now() + WAIT;
        std::fs::write(dir.path().join("first"), b"1").unwrap();
        while rx.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let before_second = std::time::Instant::now();
        std::fs::write(dir.path().join("second"), b"1").unwrap();
        while w.newest_sent_event().is_none_or(|t| t < before_second) {
            assert!(
                Instant::now() < deadline,
                "the second batch was never taken"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(rx.len(), 1, "the channel is full");

        for i in 0..FILES {
            crate::fsutil::set_mtime(&dir.path().join(format!("f{i}")), 1_000_000_000).unwrap();
        }
        // Once the events are in, every pending name has gone into the held batch; read
        // under one lock, so an event arriving late cannot make the two disagree.
        tokio::time::sleep(DEFAULT_DEBOUNCE).await;
        let unfinished = loop {
            {
                let pending = w.shared.pending.lock().unwrap();
                if pending.names.is_empty() || Instant::now() >= deadline {
                    break pending.unfinished.len();
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(unfinished, 0, "names remembered as mid-write");

        // And the names themselves are delivered once the folder reads again.
        let mut want: Vec<String> = (0..FILES).map(|i| format!("f{i}")).collect();
        want.push("second".into());
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        collect_until(&mut rx, &want).await;
    }

    #[tokio::test]
    async fn a_new_file_is_reported_by_its_relative_name() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _w = watch(dir.path(), DEFAULT_DEBOUNCE, Ignores::empty(), tx).unwrap();
        let started = std::time::Instant::now();
        std::fs::write(dir.path().join("hello.txt"), b"hi").unwrap();
        collect_until(&mut rx, &["hello.txt"]).await;
        eprintln!("change reported after {:?}", started.elapsed());

        std::fs::create_dir(dir.path().join("sub")).unwrap();
        collect_until(&mut rx, &["sub"]).await;
        std::fs::write(dir.path().join("sub/x.txt"), b"x").unwrap();
        collect_until(&mut rx, &["sub/x.txt"]).await;
    }

    /// The kernel is asked for changes and closes after writing, never for opens: a
    /// folder that is only read (hashed, served to a peer) wakes nobody. Read from the
    /// watch list the kernel keeps for each inotify descriptor (`/proc/self/fdinfo`).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_kernel_reports_no_opens_or_reads() {
        const IN_ACCESS: u32 = 0x1;
        const IN_MODIFY: u32 = 0x2;
        const IN_CLOSE_WRITE: u32 = 0x8;
        const IN_CLOSE_NOWRITE: u32 = 0x10;
        const IN_OPEN: u32 = 0x20;
        const IN_CREATE: u32 = 0x100;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let (tx, _rx) = mpsc::channel(16);
        let _w = watch(dir.path(), DEFAULT_DEBOUNCE, Ignores::empty(), tx).unwrap();
        // Every inotify watch of this process (other tests' watchers too: all are ours).
        let mut masks = Vec::new();
        for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let is_inotify = std::fs::read_link(fd.path())
                .is_ok_and(|l| l.to_string_lossy().contains("inotify"));
            let info = std::fs::read_to_string(format!(
                "/proc/self/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ));
            if let (true, Ok(info)) = (is_inotify, info) {
                masks.extend(info.lines().filter_map(|l| {
                    let m = l
                        .strip_prefix("inotify ")?
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("mask:"))?;
                    u32::from_str_radix(m, 16).ok()
                }));
            }
        }
        assert!(
            masks.len() >= 2,
            "the root and sub/ are watched: {masks:x?}"
        );
        for m in masks {
            assert_eq!(
                m & (IN_OPEN | IN_ACCESS | IN_CLOSE_NOWRITE),
                0,
                "mask {m:#x}"
            );
            assert_eq!(
                m & (IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE),
                IN_CREATE | IN_MODIFY | IN_CLOSE_WRITE,
                "mask {m:#x}"
            );
        }
    }

    #[tokio::test]
    async fn ignored_names_ferry_files_and_temp_files_are_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".ferry")).unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let ig = Ignores::from_patterns("*.log\nbuild/\n");
        let _w = watch(dir.path(), DEFAULT_DEBOUNCE, ig, tx).unwrap();
        std::fs::write(dir.path().join(".ferry/state"), b"x").unwrap();
        std::fs::write(dir.path().join(".ferry-tmp-a.txt"), b"x").unwrap();
        std::fs::write(dir.path().join("debug.log"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("build")).unwrap();
        std::fs::write(dir.path().join("build/out.o"), b"x").unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // `build/` ignores directories only: a file of that name is reported.
        std::fs::write(dir.path().join("src/build"), b"x").unwrap();
        std::fs::write(dir.path().join("real.txt"), b"x").unwrap();
        let mut seen = collect_until(&mut rx, &["src/build", "real.txt"]).await;
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen,
            ["real.txt", "src/build"],
            "only the real files: {seen:?}"
        );
    }

    #[tokio::test]
    async fn editing_ferryignore_reloads_the_rules_and_asks_for_a_full_rescan() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _w = watch(dir.path(), DEFAULT_DEBOUNCE, Ignores::empty(), tx).unwrap();
        std::fs::write(dir.path().join(IGNORE_FILE), "*.log\n").unwrap();
        // The full rescan covers the rule file's own name too.
        collect_until(&mut rx, &[""]).await;
        std::fs::write(dir.path().join("now-ignored.log"), b"x").unwrap();
        std::fs::write(dir.path().join("kept.txt"), b"x").unwrap();
        let seen = collect_until(&mut rx, &["kept.txt"]).await;
        assert!(!seen.iter().any(|n| n == "now-ignored.log"), "{seen:?}");
    }

    #[tokio::test]
    async fn a_rename_reports_both_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("old.txt"), b"x").unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _w = watch(dir.path(), DEFAULT_DEBOUNCE, Ignores::empty(), tx).unwrap();
        std::fs::rename(dir.path().join("old.txt"), dir.path().join("new.txt")).unwrap();
        collect_until(&mut rx, &["old.txt", "new.txt"]).await;
        // The puller's pattern: temp file renamed into place reports only the real name.
        std::fs::write(dir.path().join(".ferry-tmp-b.txt"), b"x").unwrap();
        std::fs::rename(
            dir.path().join(".ferry-tmp-b.txt"),
            dir.path().join("b.txt"),
        )
        .unwrap();
        let seen = collect_until(&mut rx, &["b.txt"]).await;
        assert!(seen.iter().all(|n| !n.contains(".ferry-tmp")), "{seen:?}");
    }

    /// Regression: an early batch took the old name of a rename alone when the new name's
    /// event came a few milliseconds later (the notify thread preempted on a busy machine),
    /// so a peer deleted the file and then fetched it again under its new name (seen in the
    /// e2e test `sync::create_modify_delete_rename_and_odd_names`, about one run in seven).
    #[tokio::test]
    async fn the_two_names_of_a_rename_go_out_together_even_when_their_events_are_apart() {
        use notify::event::RenameMode;
        const LONG: Duration = Duration::from_secs(600);
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let w = watch(dir.path(), LONG, Ignores::empty(), tx).unwrap();
        let event = |mode, name: &str| {
            Ok(Event::new(EventKind::Modify(ModifyKind::Name(mode)))
                .add_path(dir.path().join(name)))
        };
        w.shared.handle(event(RenameMode::From, "old.bin"));
        // Far less than EARLY_QUIET, so an overslept thread cannot fail the test, and far
        // more than the forwarder needs to wake, so without the quiet time it splits.
        std::thread::sleep(Duration::from_millis(2));
        w.shared.handle(event(RenameMode::To, "new.bin"));
        let first = timeout(WAIT, rx.recv()).await.unwrap().unwrap();
        assert_eq!(first, ["new.bin", "old.bin"]);
    }

    /// Regression: a file the index knows, replaced by a rename onto it and then renamed
    /// away (or deleted) within the debounce, used to produce no event for its name (the
    /// debouncer took "moved in, then out" for a file that never existed), so its
    /// disappearance was not scanned until the next full rescan.
    #[tokio::test]
    async fn a_file_replaced_by_a_rename_then_moved_away_quickly_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("w");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("known.txt"), b"old").unwrap();
        std::fs::write(root.join("known2.txt"), b"old").unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _w = watch(&root, DEFAULT_DEBOUNCE, Ignores::empty(), tx).unwrap();
        for (i, name) in ["known.txt", "known2.txt"].iter().enumerate() {
            let scratch = dir.path().join(format!("scratch{i}"));
            std::fs::write(&scratch, b"new").unwrap();
            std::fs::rename(&scratch, root.join(name)).unwrap();
            if i == 0 {
                std::fs::rename(root.join(name), root.join("elsewhere.txt")).unwrap();
            } else {
                std::fs::remove_file(root.join(name)).unwrap();
            }
        }
        collect_until(&mut rx, &["known.txt", "known2.txt", "elsewhere.txt"]).await;
    }

    /// With a debounce far longer than the test waits: what is reported at once went out
    /// on the leading edge, not after a quiet time.
    #[tokio::test]
    async fn finished_changes_go_at_once_and_files_being_written_wait() {
        const LONG: Duration = Duration::from_secs(600);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("w");
        std::fs::create_dir(&root).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _w = watch(&root, LONG, Ignores::empty(), tx).unwrap();

        // A file written elsewhere and renamed in is complete: reported without waiting.
        std::fs::write(dir.path().join("done.bin"), b"whole").unwrap();
        std::fs::rename(dir.path().join("done.bin"), root.join("done.bin")).unwrap();
        assert_eq!(collect_until(&mut rx, &["done.bin"]).await, ["done.bin"]);

        // Within the debounce after that early batch, even a finished change waits.
        std::fs::write(dir.path().join("second.bin"), b"x").unwrap();
        std::fs::rename(dir.path().join("second.bin"), root.join("second.bin")).unwrap();
        assert!(timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err());
    }

    #[tokio::test]
    async fn a_file_still_open_for_writing_is_not_reported_early() {
        const LONG: Duration = Duration::from_secs(600);
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let _w = watch(dir.path(), LONG, Ignores::empty(), tx).unwrap();
        let mut f = std::fs::File::create(dir.path().join("growing.log")).unwrap();
        std::io::Write::write_all(&mut f, b"first line\n").unwrap();
        assert!(timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err());
        // Closed: now it is finished, and goes at once.
        drop(f);
        assert_eq!(
            collect_until(&mut rx, &["growing.log"]).await,
            ["growing.log"]
        );
    }

    #[tokio::test]
    async fn a_full_channel_merges_names_into_a_later_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let _w = watch(dir.path(), Duration::from_millis(20), Ignores::empty(), tx).unwrap();
        let mut want = Vec::new();
        for i in 0..5 {
            let name = format!("f{i}");
            std::fs::write(dir.path().join(&name), b"x").unwrap();
            want.push(name);
            // Let each land in its own debounce window while nobody reads the channel.
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        collect_until(&mut rx, &want).await;
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_watch() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let w = watch(dir.path(), DEFAULT_DEBOUNCE, Ignores::empty(), tx).unwrap();
        drop(w);
        std::fs::write(dir.path().join("late.txt"), b"x").unwrap();
        // The sender went away with the handle: the channel closes, nothing arrives.
        assert_eq!(timeout(WAIT, rx.recv()).await.unwrap(), None);
    }

    #[test]
    fn watching_a_missing_folder_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        assert!(watch(
            &dir.path().join("nope"),
            DEFAULT_DEBOUNCE,
            Ignores::empty(),
            tx
        )
        .is_err());
    }
}
