//! The folder loop: one task per folder that owns "what is on disk here".
//!
//! It runs the scans (start-up, watcher batches, periodic, on request) and the puller,
//! one at a time, so a scan never races the puller over the same folder. The index is
//! the only thing it shares; peers learn of new local records through the folder's
//! sequence watch (see `exchange`).
//!
//! Safety first: a folder whose `.ferry/` marker is missing (an unmounted disk, a
//! deleted folder) is not scanned or pulled at all — otherwise its absence would travel
//! to every peer as a mass deletion.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::puller::{self, ExpectedLocal, PullOptions, PullOutcome, Versioning};
use super::source::FolderSource;
use super::Ctx;
use crate::config::{FolderConfig, FolderType, MARKER_DIR};
use crate::error::{Error, Result};
use crate::events::Event;
use crate::ignore::Ignores;
use crate::index::{IgnoreRule, NeedItem};
use crate::scanner::{self, ScanRequest};
use crate::types::{FileInfo, FileKind, VersionOrdering, VersionVector};

/// Items asked of the index per round of the puller. A round of small files ends with
/// one file-system flush, so bigger rounds mean fewer flushes: on a journaled ext4, b
/// (10,000 × 4 KiB) took 1.95–1.97 s with 256 and 1.82–1.83 s with 1,024 (`bench/compare
/// --scenarios b`, alternating). Each staged file stays open until its round is
/// installed (see `fsutil::raise_open_file_limit`).
const NEED_BATCH: usize = 1024;
/// How many times one pull goes back to the start of the need list for what arrived
/// behind its cursor.
const EXTRA_PASSES: u32 = 3;
/// Files up to this size are pulled several at a time (each is at most a few blocks);
/// larger ones one at a time, with their blocks in flight instead.
const SMALL_FILE: u64 = 1024 * 1024;
/// Small files pulled concurrently: enough to hide per-file round trips, while blocks
/// in memory stay bounded (16 × ~1 MiB).
const SMALL_FILES_IN_FLIGHT: usize = 16;
/// Files of one block of at most this size are pulled more at a time: their cost is
/// round trips, not bytes (128 × 64 KiB in memory at most). Their blocks travel in
/// batches (`/ferry/blocks/1`), so more in flight means fuller batches; measured with
/// `bench/profile-b` on a journaled ext4, 10,000 × 4 KiB: 64 → 3.2–3.3 s, 128 → 3.0–3.2 s,
/// 256 → 3.1–3.3 s (pages of 256 names then). With pages of 1,024 and TLS (`bench/compare
/// --scenarios b`, journaled ext4): 128 → 1.71–1.76 s, 256 → 1.61–1.63 s (B's peak RSS 36
/// MiB), 512 → 1.61–1.66 s (40 MiB).
const TINY_FILE: u64 = 64 * 1024;
const TINY_FILES_IN_FLIGHT: usize = 256;
/// How long a file that failed to pull waits before it is tried again, doubling with
/// every failure of the same version up to `RETRY_MAX`. A new global version of the name,
/// or a device connecting, retries it at once. The first wait is short: most failures
/// are a race that the rescan they trigger, or the deletions later in the same pull,
/// have already resolved (a directory replaced by a file waits for its contents'
/// deletions).
const RETRY_AFTER: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How often the loop looks for failed names whose wait is over (a map lookup).
const RETRY_TICK: Duration = Duration::from_secs(1);

pub enum FolderCmd {
    /// Rescan (None = everything), reply when done.
    Scan(Option<Vec<String>>, Option<oneshot::Sender<Result<()>>>),
    /// The remote side changed: see what is needed.
    Pull,
    /// Receive-only folders: undo local edits (restore what the others have, remove
    /// locally added files).
    Revert(oneshot::Sender<Result<usize>>),
    /// A device (re)connected: retry what failed (it may have the blocks), then pull.
    Retry,
    Stop,
}

/// A name whose pull failed: when to try again, and at which global version it failed.
struct Failed {
    until: Instant,
    version: VersionVector,
    attempts: u32,
    /// Why, for the status report.
    error: String,
}

/// What the status report shows of a folder.
#[derive(Debug, Clone, Default)]
pub struct FolderRuntime {
    pub state: String,
    pub error: Option<String>,
    /// Names whose pull failed and that still need pulling, with why (refused names,
    /// missing blocks, ...), until they succeed or are no longer needed.
    pub pull_errors: Vec<(String, String)>,
    /// Scans that went through since the loop started (full or of some names).
    pub scans: u64,
    /// The folder's ignore rules as last read, for the block responder: peers are not
    /// served what this device ignores. `None` until the loop has read them.
    pub ignores: Option<Ignores>,
}

pub struct FolderHandle {
    /// The config the loop was started with (a change of path or type restarts it).
    pub config: FolderConfig,
    pub cmd: mpsc::Sender<FolderCmd>,
    pub runtime: Arc<Mutex<FolderRuntime>>,
    /// The folder's highest local sequence; index senders wait on it.
    pub sequence: watch::Receiver<i64>,
    pub task: tokio::task::JoinHandle<()>,
}

pub fn spawn(ctx: Ctx, cfg: FolderConfig) -> FolderHandle {
    let (tx, rx) = mpsc::channel(64);
    let (seq_tx, seq_rx) = watch::channel(0i64);
    let runtime = Arc::new(Mutex::new(FolderRuntime {
        state: "idle".into(),
        ..Default::default()
    }));
    let mut lp = FolderLoop {
        ctx,
        id: cfg.id.clone(),
        root: cfg.path.clone(),
        cfg: cfg.clone(),
        runtime: runtime.clone(),
        seq: seq_tx,
        failed: HashMap::new(),
        temps: HashSet::new(),
        marker_missing: false,
        full_scan_from: None,
        ignore_text: None,
        ignores: Ignores::empty(),
        self_tx: tx.clone(),
    };
    let task = tokio::spawn(async move { lp.run(rx).await });
    FolderHandle {
        config: cfg,
        cmd: tx,
        runtime,
        sequence: seq_rx,
        task,
    }
}

struct FolderLoop {
    ctx: Ctx,
    id: String,
    root: PathBuf,
    cfg: FolderConfig,
    runtime: Arc<Mutex<FolderRuntime>>,
    seq: watch::Sender<i64>,
    /// Names that failed to pull, and when to try again.
    failed: HashMap<String, Failed>,
    /// Names that may have a temp file no pull finished (a failed or interrupted pull,
    /// or found at start-up): once a name is no longer needed its temp file is removed.
    temps: HashSet<String>,
    /// The last scan found the `.ferry/` marker missing: scan again on the retry tick
    /// until it is back.
    marker_missing: bool,
    /// When the last full scan that went through started: any change made before then
    /// was seen by it.
    full_scan_from: Option<Instant>,
    /// The `.ferryignore` text whose rules the index has (`None`: none handed over yet).
    ignore_text: Option<String>,
    /// The rules built from it.
    ignores: Ignores,
    self_tx: mpsc::Sender<FolderCmd>,
}

impl FolderLoop {
    fn set_state(&self, state: &str, error: Option<String>) {
        let changed = {
            let mut rt = match self.runtime.lock() {
                Ok(rt) => rt,
                Err(p) => p.into_inner(),
            };
            let changed = rt.state != state || rt.error != error;
            rt.state = state.to_string();
            rt.error = error.clone();
            changed
        };
        if changed {
            if let Some(e) = &error {
                warn!(folder = %self.id, "{e}");
                self.ctx.emit(Event::Error {
                    folder: Some(self.id.clone()),
                    message: e.clone(),
                });
            }
            self.ctx.emit(Event::FolderState {
                folder: self.id.clone(),
                state: state.to_string(),
                error,
            });
        }
    }

    /// Undoes local edits in a receive-only folder; returns how many names it touched.
    async fn revert(&mut self) -> Result<usize> {
        if self.cfg.kind != FolderType::ReceiveOnly {
            return Err(Error::Invalid(format!(
                "folder {} is not receive-only; only receive-only folders have local changes to revert",
                self.id
            )));
        }
        let before = self
            .ctx
            .index
            .local_edit_count(&self.id, self.ctx.own.short())
            .await?;
        let only_here = self
            .ctx
            .index
            .revert_local_edits(&self.id, self.ctx.own.short())
            .await?;
        // Files only this device has: remove them (deepest first, so directories empty).
        let mut names = only_here.clone();
        names.sort_by_key(|n| std::cmp::Reverse(n.matches('/').count()));
        let root = self.root.clone();
        let removed = names.clone();
        tokio::task::spawn_blocking(move || {
            for n in removed {
                if let Ok(p) = super::names::safe_join(&root, &n) {
                    match std::fs::symlink_metadata(&p) {
                        Ok(m) if m.is_dir() => {
                            let _ = std::fs::remove_dir(&p);
                        }
                        Ok(_) => {
                            let _ = std::fs::remove_file(&p);
                        }
                        Err(_) => {}
                    }
                }
            }
        })
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?;
        if !names.is_empty() {
            let _ = self.scan(Some(names)).await;
        }
        info!(folder = %self.id, "reverted {before} local changes");
        Ok(before as usize)
    }

    /// Drops versioned copies older than the folder's keep-days (trash-can versioning).
    async fn prune_versions(&self) {
        let Some(v) = &self.cfg.versioning else {
            return;
        };
        if v.keep_days == 0 || !self.marker_ok() {
            return;
        }
        let (root, days) = (self.root.clone(), v.keep_days);
        match tokio::task::spawn_blocking(move || puller::prune_versions(&root, days)).await {
            Ok(Ok(n)) if n > 0 => {
                info!(folder = %self.id, "removed {n} versioned copies older than {days} days")
            }
            Ok(Err(e)) => warn!(folder = %self.id, "pruning versions: {e}"),
            _ => {}
        }
    }

    /// Wakes the index senders: records up to `seq` are committed.
    fn bump_seq(&self, seq: i64) {
        bump(&self.seq, seq);
    }

    fn paused(&self) -> bool {
        let cfg = self.ctx.config.read();
        cfg.map(|c| c.paused || c.folder(&self.id).map(|f| f.paused).unwrap_or(true))
            .unwrap_or(false)
    }

    fn marker_ok(&self) -> bool {
        self.root.join(MARKER_DIR).is_dir()
    }

    async fn run(&mut self, mut rx: mpsc::Receiver<FolderCmd>) {
        let meta = match self.ctx.index.ensure_folder(&self.id).await {
            Ok(m) => m,
            Err(e) => {
                self.set_state("error", Some(format!("index: {e}")));
                return;
            }
        };
        let _ = self.seq.send(meta.max_sequence);
        // The need computation honours the folder's ignore-deletes setting.
        if let Err(e) = self
            .ctx
            .index
            .set_ignore_delete(&self.id, self.cfg.ignore_delete)
            .await
        {
            self.set_state("error", Some(format!("index: {e}")));
            return;
        }
        // And the folder's `.ferryignore`: handed over before any pull.
        if let Err(e) = self.hand_over_ignores().await {
            warn!(folder = %self.id, "cannot read the ignore rules: {e}");
        }
        if self.marker_ok() {
            let root = self.root.clone();
            if let Ok(Ok((_, kept))) = tokio::task::spawn_blocking(move || {
                puller::cleanup_and_list_temp_files(&root, Duration::from_secs(7 * 24 * 3600))
            })
            .await
            {
                // Fresh ones are kept for a resume, until their names turn out unneeded.
                self.temps.extend(kept);
            }
        }

        // Batches are merged when read, so a few slots are enough; while the loop is busy
        // (a long pull) the watcher merges into its next batch, which it bounds.
        let (watch_tx, mut watch_rx) = mpsc::channel::<Vec<String>>(2);
        let mut _watcher = None;
        let mut rescan =
            tokio::time::interval(Duration::from_secs(self.cfg.rescan_interval_s.max(10)));
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick fires at once: that is the start-up scan.
        let mut retry = tokio::time::interval(RETRY_TICK);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            // (Re)start the watcher once the folder is there.
            if _watcher.is_none() && self.marker_ok() {
                let debounce = Duration::from_millis(
                    self.ctx
                        .config
                        .read()
                        .map(|c| c.options.watch_debounce_ms)
                        .unwrap_or(150),
                );
                let ign = Ignores::load(&self.root).unwrap_or_else(|_| Ignores::empty());
                match crate::watcher::watch(&self.root, debounce, ign, watch_tx.clone()) {
                    Ok(w) => _watcher = Some(w),
                    Err(e) => {
                        warn!(folder = %self.id, "cannot watch {}: {e}; relying on periodic rescans", self.root.display())
                    }
                }
            }
            tokio::select! {
                _ = rescan.tick() => {
                    let _ = self.scan(None).await;
                    self.pull().await;
                    self.prune_versions().await;
                }
                _ = retry.tick() => {
                    if self.marker_missing {
                        let _ = self.scan(None).await;
                        self.pull().await;
                    } else if self.failed.values().any(|f| f.until <= Instant::now()) {
                        // Only the pull: a name that changed on disk was rescanned when
                        // its pull said so, and a full scan of a large folder every few
                        // seconds for one stuck name would cost more than it finds.
                        self.pull().await;
                    }
                }
                Some(mut paths) = watch_rx.recv() => {
                    // Coalesce whatever else is already queued.
                    while let Ok(more) = watch_rx.try_recv() {
                        paths.extend(more);
                    }
                    // Every event in these batches came before a full scan that has
                    // since gone through (a scan asked for while the watcher waited for
                    // quiet, e.g. after a tree was moved in): it saw them all already.
                    let batched = _watcher.as_ref().and_then(|w| w.newest_sent_event());
                    if batched.zip(self.full_scan_from).is_some_and(|(b, f)| b < f) {
                        debug!(folder = %self.id, paths = paths.len(), "changes already scanned");
                        continue;
                    }
                    let _ = self.scan(Some(paths)).await;
                }
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    if matches!(cmd, FolderCmd::Pull) {
                        // Coalesce a burst of index updates into one pull; any other
                        // command found on the way is kept and handled right after.
                        let mut later = Vec::new();
                        while let Ok(c) = rx.try_recv() {
                            if !matches!(c, FolderCmd::Pull) {
                                later.push(c);
                            }
                        }
                        self.pull().await;
                        let mut stop = false;
                        for c in later {
                            if stop {
                                // Answer nothing more; dropped replies read as "stopped".
                                break;
                            }
                            stop = self.handle(c).await;
                        }
                        if stop {
                            break;
                        }
                    } else if self.handle(cmd).await {
                        break;
                    }
                }
            }
        }
        debug!(folder = %self.id, "folder loop stopped");
    }

    /// Carries out one command; true means stop the loop.
    async fn handle(&mut self, cmd: FolderCmd) -> bool {
        match cmd {
            FolderCmd::Stop => return true,
            FolderCmd::Scan(paths, reply) => {
                let r = self.scan(paths).await;
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
                self.pull().await;
            }
            FolderCmd::Revert(reply) => {
                let r = self.revert().await;
                let _ = reply.send(r);
                self.pull().await;
            }
            FolderCmd::Pull => self.pull().await,
            FolderCmd::Retry => {
                self.failed.clear();
                self.pull().await;
            }
        }
        false
    }

    /// Reads the folder's `.ferryignore` and hands its rules to the index, which leaves
    /// the names they match unneeded: this device neither pulls nor deletes them. Returns
    /// whether the rules differ from the last ones handed over, and the rules.
    async fn hand_over_ignores(&mut self) -> Result<(bool, Ignores)> {
        let root = self.root.clone();
        let (text, ignores) = tokio::task::spawn_blocking(move || Ignores::load_with_text(&root))
            .await
            .map_err(|e| Error::Folder {
                folder: self.id.clone(),
                msg: format!("reading the ignore rules failed: {e}"),
            })??;
        if self.ignore_text.as_deref() == Some(text.as_str()) {
            return Ok((false, ignores));
        }
        let rule: Option<IgnoreRule> = ignores.has_patterns().then(|| {
            let m = ignores.clone();
            Arc::new(move |name: &str, is_dir: bool| m.is_ignored(name, is_dir)) as IgnoreRule
        });
        self.ctx
            .index
            .set_ignores(&self.id, text.clone(), rule)
            .await?;
        let changed = self.ignore_text.is_some();
        self.ignore_text = Some(text);
        self.ignores = ignores.clone();
        if let Ok(mut rt) = self.runtime.lock() {
            rt.ignores = Some(ignores.clone());
        }
        Ok((changed, ignores))
    }

    /// Scans the folder (or some names in it) and commits what changed.
    async fn scan(&mut self, paths: Option<Vec<String>>) -> Result<()> {
        if self.paused() {
            self.set_state("paused", None);
            return Ok(());
        }
        self.marker_missing = !self.marker_ok();
        if self.marker_missing {
            let msg = format!(
                "folder marker {} is missing (disk unmounted or folder removed?); not syncing to avoid propagating mass deletions",
                self.root.join(MARKER_DIR).display()
            );
            self.set_state("error", Some(msg.clone()));
            return Err(Error::Folder {
                folder: self.id.clone(),
                msg,
            });
        }
        let subpaths = paths.map(normalise_paths).unwrap_or_default();
        let (t_scan, n_paths) = (Instant::now(), subpaths.len());
        let full = subpaths.is_empty();
        // Names the scanner should treat as known: the subtree under each path.
        let mut rules = None;
        if subpaths.is_empty() {
            self.set_state("scanning", None);
            // A full scan follows every change of `.ferryignore` (the watcher asks for
            // one): the need computation gets the new rules, and the scan uses the same.
            match self.hand_over_ignores().await {
                Ok((changed, ignores)) => {
                    if changed {
                        // Names no longer ignored may be needed now.
                        let _ = self.self_tx.try_send(FolderCmd::Pull);
                    }
                    rules = Some(ignores);
                }
                Err(e) => {
                    self.set_state("error", Some(format!("scan failed: {e}")));
                    return Err(e);
                }
            }
        }
        let known = self
            .ctx
            .index
            .local_snapshot(&self.id, subpaths.clone())
            .await?;
        let index = self.ctx.index.clone();
        let id = self.id.clone();
        let root = self.root.clone();
        let short = self.ctx.own.short();
        let kind = self.cfg.kind;
        let events = self.ctx.events.clone();
        let seq = self.seq.clone();
        let res = tokio::task::spawn_blocking(move || -> Result<(i64, scanner::ScanStats)> {
            let ignores = match rules {
                Some(r) => r,
                None => Ignores::load(&root)?,
            };
            let req = ScanRequest {
                root: &root,
                subpaths,
                known: &known,
                ignores: &ignores,
                progress: None,
            };
            let mut max_seq = 0i64;
            let stats = scanner::scan(&req, &mut |changes| {
                let _ = kind; // receive-only folders record local edits too; exchange holds them back
                let n = changes.len();
                let committed =
                    futures::executor::block_on(index.commit_local_changes(&id, short, changes))?;
                if let Some(m) = committed.iter().map(|f| f.sequence).max() {
                    max_seq = max_seq.max(m);
                    // Each batch is committed: peers get it now rather than when a long
                    // scan ends, and can start pulling while the rest is hashed.
                    bump(&seq, max_seq);
                }
                for f in committed.iter().take(16) {
                    tracing::trace!(folder = %id, file = %f.name, deleted = f.deleted, version = ?f.version.0, "recorded a local change");
                }
                if n > 0 {
                    let _ = events.send(Event::LocalIndexUpdated {
                        folder: id.clone(),
                        files: committed.len(),
                    });
                }
                Ok(())
            })?;
            Ok((max_seq, stats))
        })
        .await
        .map_err(|e| Error::Folder {
            folder: self.id.clone(),
            msg: format!("scan task failed: {e}"),
        })?;
        match res {
            Ok((max_seq, stats)) => {
                self.bump_seq(max_seq);
                debug!(
                    folder = %self.id,
                    paths = n_paths,
                    changed = stats.changed,
                    deleted = stats.deleted,
                    ms = t_scan.elapsed().as_millis() as u64,
                    "scan done"
                );
                if full {
                    self.full_scan_from = Some(t_scan);
                }
                if let Ok(mut rt) = self.runtime.lock() {
                    rt.scans += 1;
                }
                crate::mem::handled((stats.files + stats.dirs) as usize);
                crate::mem::job_done();
                if !stats.retry_later.is_empty() {
                    // Files still being written: look again shortly.
                    let tx = self.self_tx.clone();
                    let names = stats.retry_later.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        let _ = tx.send(FolderCmd::Scan(Some(names), None)).await;
                    });
                }
                self.set_state("idle", None);
                Ok(())
            }
            Err(e) => {
                self.set_state("error", Some(format!("scan failed: {e}")));
                Err(e)
            }
        }
    }

    /// Pulls everything the index says this device needs, until nothing more can be done.
    ///
    /// Each batch of the need list is applied in three phases that keep the need order's
    /// promises: directories first (so files have somewhere to go), then files and
    /// symlinks — several small files at once, large ones one at a time — and deletions
    /// last (so a rename's new name is built from the old file's blocks before the old
    /// name goes). The index records each phase's results in one transaction.
    async fn pull(&mut self) {
        if self.cfg.kind == FolderType::SendOnly || self.paused() || !self.marker_ok() {
            return;
        }
        let mut round = Round::default();
        // Paged by cursor: names waiting for a retry are stepped over, never in the way
        // of the ones behind them.
        let mut after = None;
        // The last page's small files being flushed and renamed into place while this
        // page is staged. Always finished (and recorded) before `pull` returns.
        let mut installing: Option<Installing> = None;
        // The next page's need list, asked of the index while this page is staged.
        let mut next: Option<tokio::task::JoinHandle<NextPage>> = None;
        // Whether this pass over the need list found something to do, and how many passes
        // went back to its start (see the end of the list below).
        let (mut worked, mut passes) = (false, 0);
        loop {
            let t_need = Instant::now();
            let (listed, mut prefetched) = match next.take() {
                Some(asked) => asked.await.unwrap_or_else(|e| {
                    let e = Error::Invalid(format!("need list task failed: {e}"));
                    (Err(e), None)
                }),
                None => {
                    let listed = self
                        .ctx
                        .index
                        .need_list_after(&self.id, after.take(), NEED_BATCH)
                        .await;
                    (listed, None)
                }
            };
            let items = match listed {
                Ok(i) => i,
                Err(e) => {
                    self.finish_install(installing.take(), &mut round).await;
                    self.set_state("error", Some(format!("index: {e}")));
                    return;
                }
            };
            let need_ms = t_need.elapsed().as_millis() as u64;
            let Some(last) = items.last() else {
                // A peer's index arrives in batches while this pass pulls: a record that
                // came after the pass had paged past its place in the need order (a
                // smaller file; a directory after the last page, see `needed_dirs` below)
                // is behind the cursor. Go back once more rather than leave it for the
                // next pull: a scan in between (this device's watcher reporting the pull's
                // own changes) would find such a directory, made for the files pulled
                // into it, and take it for a local one. Bounded, so a peer that keeps
                // changing cannot hold the folder's other work off for ever.
                if worked && passes < EXTRA_PASSES {
                    // The last page recorded first, or it would be listed again.
                    self.finish_install(installing.take(), &mut round).await;
                    (worked, passes, after) = (false, passes + 1, None);
                    continue;
                }
                break;
            };
            after = Some(last.cursor());
            let ahead = (items.len() == NEED_BATCH).then(|| last.cursor());
            let now = Instant::now();
            let failed = &self.failed;
            let mut due = |i: &NeedItem| match failed.get(&i.global.name) {
                // Waiting to be retried, unless its global changed since.
                Some(f) if f.version == i.global.version && f.until > now => {
                    round.still_failing.insert(i.global.name.clone());
                    false
                }
                _ => true,
            };
            let mut todo: Vec<_> = items.into_iter().filter(&mut due).collect();
            if todo.is_empty() {
                continue;
            }
            // Directory records that came after this pass paged past the directories (a
            // peer's index arrives in batches while the pull runs) are made with this
            // page: they are recorded and announced now, not at the end of the pull.
            if !todo.iter().any(|i| is_dir(&i)) {
                let late = self.ctx.index.needed_dirs(&self.id, NEED_BATCH).await;
                todo.splice(0..0, late.unwrap_or_default().into_iter().filter(&mut due));
            }
            worked = true;
            // Each page allocates and frees memory for every name it handles.
            crate::mem::handled(todo.len());
            // A name the last page is still installing is here again (a newer version
            // came meanwhile): that install goes first.
            if installing
                .as_ref()
                .is_some_and(|i| todo.iter().any(|t| i.names.contains(&t.global.name)))
            {
                self.finish_install(installing.take(), &mut round).await;
                // What was prefetched of that name predates its install.
                prefetched = None;
            }
            if let Some(msg) = self.low_disk() {
                self.finish_install(installing.take(), &mut round).await;
                self.set_state("error", Some(msg));
                return;
            }
            self.set_state("syncing", None);
            let (dirs, rest): (Vec<_>, Vec<_>) = todo.iter().partition(is_dir);
            let (deletes, files): (Vec<_>, Vec<_>) =
                rest.into_iter().partition(|i| i.global.deleted);
            let (small, large): (Vec<_>, Vec<_>) =
                files.into_iter().partition(|i| i.global.size <= SMALL_FILE);

            let results = self.pull_dirs(dirs).await;
            self.record(results, &mut round).await;
            if let Some(cursor) = ahead {
                // The next page's list and prefetch, asked now so that the index answers
                // while this page is staged. They are as current as asking later would
                // make them: a name changed meanwhile (a newer version arriving) is
                // pulled at the version listed, and again in the pull that change
                // starts; a name this page installs and that comes up again is caught
                // above, and its page's prefetch dropped.
                let (index, id) = (self.ctx.index.clone(), self.id.clone());
                let (root, min_free) = (self.root.clone(), self.min_free_bytes());
                next = Some(tokio::spawn(async move {
                    let listed = index.need_list_after(&id, Some(cursor), NEED_BATCH).await;
                    let pre = match &listed {
                        Ok(items) => {
                            prefetch_page(index, id, root, min_free, small_files(items)).await
                        }
                        Err(_) => None,
                    };
                    (listed, pre)
                }));
            }

            // Small files: built several at a time, then made durable and put in place
            // together (one file-system flush, one fsync per directory).
            let this = &*self;
            // Boxed: the loop is spawned, so its future must be Send for every lifetime.
            let t_stage = Instant::now();
            // What the index knows of these names and their blocks, in two calls for the
            // whole round instead of two or more per file.
            let mut pre = match prefetched.take() {
                Some(p) => Some(p),
                None => self.prefetch(&small).await,
            };
            if let Some(p) = pre.as_mut().filter(|p| p.batch_checked) {
                // The parents the page's files go into, made durable together. Here, not
                // in the prefetch that may run ahead: whoever finds a directory here
                // takes it to be durable.
                let root = self.root.clone();
                let names: Vec<String> = small.iter().map(|i| i.global.name.clone()).collect();
                p.batch_checked = tokio::task::spawn_blocking(move || {
                    puller::make_parents(&root, names.iter().map(String::as_str))
                })
                .await
                .unwrap_or(false);
            }
            let pre = pre.as_ref();
            let prefetch_ms = t_stage.elapsed().as_millis() as u64;
            let (tiny, small): (Vec<_>, Vec<_>) =
                small.into_iter().partition(|i| i.global.size <= TINY_FILE);
            let mut steps = Vec::new();
            for (part, in_flight) in [(tiny, TINY_FILES_IN_FLIGHT), (small, SMALL_FILES_IN_FLIGHT)]
            {
                let pulls: Vec<futures::future::BoxFuture<'_, (&NeedItem, Result<Step>)>> = part
                    .into_iter()
                    .map(|item| async move { (item, this.step_one(item, pre).await) }.boxed())
                    .collect();
                steps.extend(
                    futures::stream::iter(pulls)
                        .buffer_unordered(in_flight)
                        .collect::<Vec<_>>()
                        .await,
                );
            }
            let mut results = Vec::new();
            let mut staged = Vec::new();
            for (item, step) in steps {
                match step {
                    Ok(Step::Applied(a)) => results.push((item, Ok(a))),
                    Ok(Step::Staged(s)) => staged.push((item, s)),
                    Err(e) => results.push((item, Err(e))),
                }
            }
            let (n_staged, t_install) = (staged.len(), Instant::now());
            // The last page's install ran while this one was staged.
            self.finish_install(installing.take(), &mut round).await;
            if large.is_empty() && deletes.is_empty() && open_files_allow_two_pages() {
                // Nothing else in this page waits for its files to be in place: install
                // them while the next page is staged.
                installing = self.start_install(staged);
                let t_record = Instant::now();
                self.record(results, &mut round).await;
                debug!(
                    folder = %self.id,
                    staged = n_staged,
                    need_ms,
                    prefetch_ms,
                    stage_ms = t_install.duration_since(t_stage).as_millis() as u64,
                    record_ms = t_record.elapsed().as_millis() as u64,
                    "pull round, installing behind the next"
                );
                continue;
            }
            results.extend(self.install_staged(staged).await);
            let t_large = Instant::now();
            for item in large {
                results.push((item, self.pull_one(item).await));
            }
            let t_record = Instant::now();
            self.record(results, &mut round).await;
            debug!(
                folder = %self.id,
                staged = n_staged,
                need_ms,
                prefetch_ms,
                stage_ms = t_install.duration_since(t_stage).as_millis() as u64,
                install_ms = t_large.duration_since(t_install).as_millis() as u64,
                large_ms = t_record.duration_since(t_large).as_millis() as u64,
                record_ms = t_record.elapsed().as_millis() as u64,
                "pull round"
            );

            let mut results = Vec::new();
            for item in deletes {
                results.push((item, self.pull_one(item).await));
            }
            self.record(results, &mut round).await;
        }
        self.finish_install(installing.take(), &mut round).await;
        // The whole need list was seen: a failed name not in it is not needed any more,
        // and a temp file of a name not waiting for a retry will not be finished.
        self.failed.retain(|n, _| round.still_failing.contains(n));
        self.drop_unneeded_temps().await;
        // Every name still failing, including those that waited for their retry.
        let mut errors: Vec<(String, String)> = self
            .failed
            .iter()
            .map(|(n, f)| (n.clone(), f.error.clone()))
            .collect();
        errors.sort();
        if let Ok(mut rt) = self.runtime.lock() {
            rt.pull_errors = errors;
        }
        crate::mem::job_done();
        self.set_state("idle", None);
    }

    /// After a pull that went through the whole need list: a name with a leftover temp
    /// file that is not waiting for a retry is done (by other means than that temp file,
    /// e.g. its content was already here) or not needed any more (deleted before this
    /// device got it, or replaced by a version it already has): nothing will finish
    /// that temp file.
    async fn drop_unneeded_temps(&mut self) {
        let stale: Vec<String> = self
            .temps
            .iter()
            .filter(|n| !self.failed.contains_key(*n))
            .cloned()
            .collect();
        if stale.is_empty() {
            return;
        }
        for name in &stale {
            self.temps.remove(name);
        }
        let root = self.root.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for name in stale {
                match puller::remove_temp_of(&root, &name) {
                    Ok(true) => debug!(file = %name, "removed a temp file no pull needs"),
                    Ok(false) => {}
                    Err(e) => debug!(file = %name, "cannot remove its temp file: {e}"),
                }
            }
        })
        .await;
    }

    /// Commits what a phase applied (one transaction), reports every item, and puts
    /// failures aside until their retry time (or a new global version).
    async fn record(&mut self, results: Vec<(&NeedItem, Result<Applied>)>, round: &mut Round) {
        self.record_committed(results, None, round).await;
    }

    /// [`Self::record`], where `committed` (if given) is the index's answer to these
    /// results' commits, already made (by an install running behind the next page).
    async fn record_committed(
        &mut self,
        results: Vec<(&NeedItem, Result<Applied>)>,
        committed: Option<Committed>,
        round: &mut Round,
    ) {
        let mut commits = Vec::new();
        // Conflict copies to scan, so they sync: scanned here, not queued (a burst of
        // thousands would overflow the command channel).
        let mut rescans = Vec::new();
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for (item, r) in results {
            match r {
                Ok(a) => {
                    if let Some(c) = a.commit {
                        commits.push(c);
                    }
                    if let Some(n) = a.rescan {
                        rescans.push(n);
                    }
                    done.push((item, a.action));
                }
                Err(e) => failed.push((item, e.to_string())),
            }
        }
        let committed = match committed {
            // Made already: `commits` holds the same records again (see `start_install`).
            Some(c) => Some(c),
            None if commits.is_empty() => None,
            None => Some(self.ctx.index.commit_pulled_batch(&self.id, commits).await),
        };
        if let Some(committed) = committed {
            match committed {
                Ok(recs) => {
                    for r in recs {
                        match r {
                            Ok(f) => self.bump_seq(f.sequence),
                            Err(e) => warn!(folder = %self.id, "{e}"),
                        }
                    }
                }
                Err(e) => self.set_state("error", Some(format!("index: {e}"))),
            }
        }
        if !rescans.is_empty() {
            let _ = self.scan(Some(rescans)).await;
        }
        for (item, action) in done {
            let name = item.global.name.clone();
            debug!(folder = %self.id, file = %name, %action, version = ?item.global.version.0, "pulled");
            self.failed.remove(&name);
            self.ctx.emit(Event::ItemFinished {
                folder: self.id.clone(),
                name,
                action: action.into(),
                error: None,
            });
        }
        for (item, e) in failed {
            let name = item.global.name.clone();
            warn!(folder = %self.id, file = %name, "pull failed: {e}");
            let attempts = match self.failed.get(&name) {
                Some(f) if f.version == item.global.version => f.attempts + 1,
                _ => 1,
            };
            let wait = RETRY_AFTER
                .saturating_mul(1 << (attempts - 1).min(8))
                .min(RETRY_MAX);
            self.failed.insert(
                name.clone(),
                Failed {
                    until: Instant::now() + wait,
                    version: item.global.version.clone(),
                    attempts,
                    error: e.clone(),
                },
            );
            if item.global.kind == FileKind::File && !item.global.deleted {
                self.temps.insert(name.clone());
            }
            round.still_failing.insert(name.clone());
            self.ctx.emit(Event::ItemFinished {
                folder: self.id.clone(),
                name,
                action: "error".into(),
                error: Some(e),
            });
        }
    }

    fn low_disk(&self) -> Option<String> {
        let pct = self
            .ctx
            .config
            .read()
            .map(|c| c.options.min_free_percent)
            .unwrap_or(1.0);
        let (avail, total) = crate::fsutil::free_space(&self.root).ok()?;
        if total > 0 && (avail as f64) < (total as f64) * pct / 100.0 {
            Some(format!(
                "not enough free disk space at {} ({} MB free, minimum {pct}%); pulling paused",
                self.root.display(),
                avail / 1_000_000
            ))
        } else {
            None
        }
    }

    fn min_free_bytes(&self) -> u64 {
        let pct = self
            .ctx
            .config
            .read()
            .map(|c| c.options.min_free_percent)
            .unwrap_or(1.0);
        crate::fsutil::free_space(&self.root)
            .map(|(_, total)| (total as f64 * pct / 100.0) as u64)
            .unwrap_or(0)
    }

    /// Sets mode and mtime of a file whose content already matches `g`, if the file on
    /// disk is still what the index recorded (else: rescan first, as for any pull).
    async fn apply_metadata(
        &self,
        g: &crate::types::FileInfo,
        expected: Option<ExpectedLocal>,
    ) -> Result<PullOutcome> {
        let path = super::names::safe_join(&self.root, &g.name)?;
        let (mode, mtime) = (puller::applied_mode(g), g.mtime_ns);
        tokio::task::spawn_blocking(move || -> Result<PullOutcome> {
            let disk = crate::fsutil::try_stat(&path)?;
            match (disk, expected) {
                (Some(d), Some(e)) if e.matches(&d) => {
                    if d.mode != mode {
                        crate::fsutil::set_mode(&path, mode)?;
                    }
                    crate::fsutil::set_mtime(&path, mtime)?;
                    Ok(PullOutcome::Done { inode: d.inode })
                }
                _ => Ok(PullOutcome::TargetChanged),
            }
        })
        .await
        .map_err(|e| Error::Folder {
            folder: self.id.clone(),
            msg: format!("metadata task failed: {e}"),
        })?
    }

    /// Brings one name to its global version. Returns what was done.
    async fn pull_one(&self, item: &NeedItem) -> Result<Applied> {
        match self.step_one(item, None).await? {
            Step::Applied(a) => Ok(a),
            Step::Staged(s) => {
                // Not asked for; finished as a batch of one.
                let mut out = self.install_staged(vec![(item, s)]).await;
                out.pop().map(|(_, r)| r).unwrap_or_else(|| {
                    Err(Error::Folder {
                        folder: self.id.clone(),
                        msg: format!("{}: install lost", item.global.name),
                    })
                })
            }
        }
    }

    /// Finishes staged files together (see `puller::install_batch`) and turns each
    /// outcome into what was applied.
    async fn install_staged<'a>(
        &self,
        staged: Vec<(&'a NeedItem, puller::Staged)>,
    ) -> Vec<(&'a NeedItem, Result<Applied>)> {
        if staged.is_empty() {
            return Vec::new();
        }
        let (items, staged): (Vec<_>, Vec<_>) = staged.into_iter().unzip();
        let outcomes = install_on_blocking_thread(self.root.clone(), staged).await;
        items
            .into_iter()
            .zip(outcomes)
            .map(|(item, o)| {
                (
                    item,
                    o.and_then(|o| self.applied(&item.global, o, "update")),
                )
            })
            .collect()
    }

    /// Starts [`Self::install_staged`]'s work on a blocking thread, and the index commit of
    /// what it installed after it, and returns at once; [`Self::finish_install`] waits for
    /// both and does the rest of [`Self::record`].
    fn start_install(&self, staged: Vec<(&NeedItem, puller::Staged)>) -> Option<Installing> {
        if staged.is_empty() {
            return None;
        }
        let (items, staged): (Vec<NeedItem>, Vec<_>) = staged
            .into_iter()
            .map(|(item, s)| (item.clone(), s))
            .unzip();
        let names = items.iter().map(|i| i.global.name.clone()).collect();
        let globals: Vec<FileInfo> = items.iter().map(|i| i.global.clone()).collect();
        let (root, index, folder) = (self.root.clone(), self.ctx.index.clone(), self.id.clone());
        // Installed files are recorded by the same task, so that the index commit too runs
        // while the next page is staged; `finish_install` does the rest of `record`.
        let task = tokio::spawn(async move {
            let outcomes = install_on_blocking_thread(root, staged).await;
            let commits: Vec<(FileInfo, u64)> = globals
                .iter()
                .zip(&outcomes)
                .filter_map(|(g, o)| match o {
                    Ok(PullOutcome::Done { inode } | PullOutcome::Conflict { inode, .. }) => {
                        Some((as_applied(g), *inode))
                    }
                    _ => None,
                })
                .collect();
            let committed = index.commit_pulled_batch(&folder, commits).await;
            (outcomes, committed)
        });
        Some(Installing { items, names, task })
    }

    async fn finish_install(&mut self, installing: Option<Installing>, round: &mut Round) {
        let Some(inst) = installing else { return };
        let n = inst.items.len();
        let t = Instant::now();
        let (outcomes, committed) = inst.task.await.unwrap_or_else(|e| {
            let failed = (0..n)
                .map(|_| Err(Error::Invalid(format!("install task failed: {e}"))))
                .collect();
            (failed, Ok(Vec::new()))
        });
        let waited_ms = t.elapsed().as_millis() as u64;
        let results = inst
            .items
            .iter()
            .zip(outcomes)
            .map(|(item, o)| {
                (
                    item,
                    o.and_then(|o| self.applied(&item.global, o, "update")),
                )
            })
            .collect();
        let t = Instant::now();
        self.record_committed(results, Some(committed), round).await;
        debug!(
            folder = %self.id,
            installed = n,
            waited_ms,
            record_ms = t.elapsed().as_millis() as u64,
            "installed behind the next page"
        );
    }

    /// The local records of `items` and which of their blocks some local file has, for
    /// `step_one`. `None` if the index cannot say (each item then asks on its own).
    async fn prefetch(&self, items: &[&NeedItem]) -> Option<Prefetched> {
        prefetch_page(
            self.ctx.index.clone(),
            self.id.clone(),
            self.root.clone(),
            self.min_free_bytes(),
            items.iter().map(|i| &i.global),
        )
        .await
    }

    /// What stands where `g` is to go, as the index knows it (`local`: this device's
    /// record of the name and its inode): what to expect on disk, and whether that
    /// version lost a conflict to `g` (and whose it was). A file (or link) where a
    /// directory or link is to go is replaced when the new version supersedes it, kept
    /// as a conflict copy when it lost a conflict.
    fn in_the_way(
        &self,
        g: &crate::types::FileInfo,
        local: Option<&(crate::types::FileInfo, u64)>,
    ) -> puller::InTheWay {
        let expected = local
            .filter(|(f, _)| !f.deleted)
            .map(|(f, ino)| ExpectedLocal {
                kind: f.kind,
                size: f.size,
                mtime_ns: f.mtime_ns,
                inode: *ino,
            });
        let concurrent_loser = local
            .map(|(f, _)| {
                !f.deleted && f.version.compare(&g.version) == VersionOrdering::Concurrent
            })
            .unwrap_or(false);
        // Named in the conflict copy: whoever made the losing content. For a recorded
        // concurrent version that is its modifier; for an unrecorded edit, this device.
        let loser_device = local
            .filter(|_| concurrent_loser)
            .and_then(|(f, _)| self.ctx.device_by_short(f.modified_by))
            .unwrap_or(self.ctx.own);
        puller::InTheWay {
            expected,
            concurrent_loser,
            conflict_device: Some(loser_device),
            versioning: self.cfg.versioning.as_ref().map(|v| Versioning {
                keep_days: v.keep_days,
            }),
        }
    }

    /// The error for a name a peer may not give.
    fn refused(&self, name: &str, e: super::names::NameError) -> Error {
        Error::Folder {
            folder: self.id.clone(),
            msg: format!("refusing name {name:?} from peer: {e}"),
        }
    }

    /// Brings a page's directories to their global versions together: made on one
    /// blocking thread and made durable at the end with one fsync per parent
    /// (`puller::apply_dirs`), rather than one blocking call and one journal commit each.
    async fn pull_dirs<'a>(
        &self,
        items: Vec<&'a NeedItem>,
    ) -> Vec<(&'a NeedItem, Result<Applied>)> {
        if items.is_empty() {
            return Vec::new();
        }
        let names = items.iter().map(|i| i.global.name.clone()).collect();
        let locals = match self.ctx.index.get_locals_with_inode(&self.id, names).await {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("index: {e}");
                return items
                    .into_iter()
                    .map(|i| {
                        let err = Error::Folder {
                            folder: self.id.clone(),
                            msg: msg.clone(),
                        };
                        (i, Err(err))
                    })
                    .collect();
            }
        };
        // Names a peer may not give are refused here, each with its own error.
        let mut out = Vec::new();
        let mut valid = Vec::new();
        for item in items {
            match super::names::check_name(&item.global.name) {
                Ok(()) => valid.push(item),
                Err(e) => out.push((item, Err(self.refused(&item.global.name, e)))),
            }
        }
        let batch = valid
            .iter()
            .map(|i| {
                let g = &i.global;
                (g.clone(), self.in_the_way(g, locals.get(&g.name)))
            })
            .collect();
        let outcomes = puller::apply_dirs(&self.root, batch).await;
        for (item, outcome) in valid.into_iter().zip(outcomes) {
            let applied = outcome.and_then(|o| self.applied(&item.global, o, "dir"));
            out.push((item, applied));
        }
        out
    }

    /// Brings one name to its global version; with `pre` (a round of small files) and a
    /// file to build, only as far as a staged temp file for `install_staged`.
    async fn step_one(&self, item: &NeedItem, pre: Option<&Prefetched>) -> Result<Step> {
        let g = &item.global;
        super::names::check_name(&g.name).map_err(|e| self.refused(&g.name, e))?;
        let stage = pre.is_some();
        let local = match pre {
            Some(p) => p.locals.get(&g.name).cloned(),
            None => {
                self.ctx
                    .index
                    .get_local_with_inode(&self.id, &g.name)
                    .await?
            }
        };
        let in_the_way = self.in_the_way(g, local.as_ref());
        let (expected, concurrent_loser, versioning) = (
            in_the_way.expected,
            in_the_way.concurrent_loser,
            in_the_way.versioning,
        );
        let loser_device = in_the_way.conflict_device.unwrap_or(self.ctx.own);
        let (outcome, action) = if g.deleted {
            if self.cfg.ignore_delete {
                return Ok(Step::Applied(Applied {
                    action: "ignored-delete",
                    commit: None,
                    rescan: None,
                }));
            }
            let outcome =
                puller::apply_delete(&self.root, g, expected.as_ref(), versioning.as_ref()).await?;
            if matches!(outcome, PullOutcome::TargetChanged)
                && g.kind == FileKind::Dir
                && self.ignores.has_patterns()
            {
                // Not emptied by a change a rescan would find, but by names this device
                // ignores: they stay, and so does the directory (as Syncthing does). Say
                // so rather than rescan for ever.
                let (root, name, ignores) =
                    (self.root.clone(), g.name.clone(), self.ignores.clone());
                let held = tokio::task::spawn_blocking(move || {
                    only_ignored_inside(&root, &name, &ignores)
                })
                .await
                .ok()
                .flatten();
                if let Some(held) = held {
                    return Err(Error::Folder {
                        folder: self.id.clone(),
                        msg: format!(
                            "{} was deleted elsewhere but is kept here: it holds {held}, \
                             which .ferryignore excludes; remove that to let the deletion through",
                            g.name
                        ),
                    });
                }
            }
            (outcome, "delete")
        } else {
            match g.kind {
                FileKind::Dir => (
                    puller::apply_dir_over(&self.root, g, &in_the_way).await?,
                    "dir",
                ),
                FileKind::Symlink => (
                    puller::apply_symlink_over(&self.root, g, &in_the_way).await?,
                    "symlink",
                ),
                FileKind::File if local.as_ref().is_some_and(|(lf, _)| lf.same_bytes(g)) => {
                    // The bytes are already here (both devices made the same file, or only
                    // the mtime or mode changed): no data to move and no conflict to keep,
                    // just the metadata.
                    (self.apply_metadata(g, expected).await?, "metadata")
                }
                FileKind::File => {
                    let source = FolderSource::new(
                        self.ctx.clone(),
                        &self.id,
                        &g.name,
                        item.devices.clone(),
                    )
                    .with_known(pre.map(|p| Arc::clone(&p.known)))
                    .with_base(
                        local
                            .as_ref()
                            .filter(|(f, _)| !f.deleted && f.kind == FileKind::File)
                            .map(|(f, _)| f.blocks.clone())
                            .unwrap_or_default(),
                    );
                    let opts = PullOptions {
                        max_in_flight: self
                            .ctx
                            .config
                            .read()
                            .map(|c| c.options.pull_blocks_in_flight)
                            .unwrap_or(16),
                        min_free_bytes: pre
                            .map(|p| p.min_free_bytes)
                            .unwrap_or_else(|| self.min_free_bytes()),
                        versioning,
                        // An unrecorded local edit in the way is kept as a conflict copy.
                        allow_conflict: true,
                        batch_checked: pre.is_some_and(|p| p.batch_checked),
                        root_dir: pre.and_then(|p| p.root_dir.clone()),
                    };
                    let staged = puller::stage_file(
                        &self.root,
                        g,
                        expected.as_ref(),
                        concurrent_loser,
                        &loser_device,
                        &source,
                        &opts,
                    )
                    .await?;
                    if stage {
                        return Ok(Step::Staged(staged));
                    }
                    (puller::install_now(&self.root, staged).await?, "update")
                }
            }
        };
        self.applied(g, outcome, action).map(Step::Applied)
    }

    /// What applying `g` with this outcome means for the index, the log and a rescan.
    fn applied(
        &self,
        g: &crate::types::FileInfo,
        outcome: PullOutcome,
        action: &'static str,
    ) -> Result<Applied> {
        match outcome {
            PullOutcome::Done { inode } => Ok(Applied {
                action,
                commit: Some((as_applied(g), inode)),
                rescan: None,
            }),
            PullOutcome::Conflict { kept_as, inode } => {
                info!(folder = %self.id, file = %g.name, "conflict: kept the other version as {kept_as}");
                // The conflict copy is a new local file: scan it so it syncs.
                Ok(Applied {
                    action: "conflict",
                    commit: Some((as_applied(g), inode)),
                    rescan: Some(kept_as),
                })
            }
            PullOutcome::TargetChanged => {
                // The disk moved on since the last scan: rescan that name; the pull is
                // retried afterwards with up-to-date versions.
                let _ = self
                    .self_tx
                    .try_send(FolderCmd::Scan(Some(vec![g.name.clone()]), None));
                Err(Error::Folder {
                    folder: self.id.clone(),
                    msg: format!("{} changed on disk while pulling; rescanning", g.name),
                })
            }
        }
    }
}

/// When the directory `name` holds nothing but names the rules ignore (at any depth;
/// Ferry's temp files aside), the first of them. `None` when it holds anything else, is
/// empty, or cannot be read.
fn only_ignored_inside(root: &std::path::Path, name: &str, ignores: &Ignores) -> Option<String> {
    let mut first = None;
    for entry in std::fs::read_dir(root.join(name)).ok()? {
        let entry = entry.ok()?;
        let base = entry.file_name().into_string().ok()?;
        if crate::ignore::is_temp_name(&base) {
            continue;
        }
        let child = format!("{name}/{base}");
        let is_dir = entry.file_type().ok()?.is_dir();
        if ignores.is_ignored(&child, is_dir) {
            first.get_or_insert(child);
        } else if is_dir {
            let inner = only_ignored_inside(root, &child, ignores)?;
            first.get_or_insert(inner);
        } else {
            return None;
        }
    }
    first
}

/// Raises the committed sequence to `seq` (never lowers it), waking the index senders.
fn bump(tx: &watch::Sender<i64>, seq: i64) {
    tx.send_if_modified(|s| {
        if seq > *s {
            *s = seq;
            true
        } else {
            false
        }
    });
}

/// The record to store as local after applying `g`: the global as it is, but for the
/// permission bits the pull actually left on disk (only rwx travel; a directory stays
/// writable by its owner). Recording the global's bits instead made the next scan see a
/// "change", which went back to the sender as a new version and altered its own file.
fn as_applied(g: &crate::types::FileInfo) -> crate::types::FileInfo {
    let mut rec = g.clone();
    if !g.deleted {
        rec.mode = puller::applied_mode(g);
    }
    rec
}

/// What one pull collects as it goes.
#[derive(Default)]
struct Round {
    /// Failed names met in the need list: the others are not needed any more.
    still_failing: HashSet<String>,
}

/// A page's staged small files being made durable, put in place and recorded in the
/// index ([`FolderLoop::start_install`]), while the folder goes on with the next page.
struct Installing {
    items: Vec<NeedItem>,
    names: HashSet<String>,
    task: tokio::task::JoinHandle<(Vec<Result<PullOutcome>>, Committed)>,
}

/// The index's answer to recording pulled files: the whole batch, then each file.
type Committed = Result<Vec<Result<FileInfo>>>;

/// A directory to make (not a directory's deletion).
fn is_dir(i: &&NeedItem) -> bool {
    !i.global.deleted && i.global.kind == FileKind::Dir
}

/// Staged files stay open until installed, so installing one page behind the next holds
/// two pages of open files: only done when the process may open that many with room to
/// spare (`main` raises the soft limit to the hard one).
fn open_files_allow_two_pages() -> bool {
    let needed = (3 * NEED_BATCH + TINY_FILES_IN_FLIGHT + 1024) as u64;
    crate::fsutil::open_file_limit().is_some_and(|soft| soft >= needed)
}

/// [`puller::install_batch`] on the blocking pool; a task that died fails every file.
async fn install_on_blocking_thread(
    root: PathBuf,
    staged: Vec<puller::Staged>,
) -> Vec<Result<PullOutcome>> {
    let n = staged.len();
    tokio::task::spawn_blocking(move || puller::install_batch(&root, staged))
        .await
        .unwrap_or_else(|e| {
            (0..n)
                .map(|_| Err(Error::Invalid(format!("install task failed: {e}"))))
                .collect()
        })
}

/// What the index knows of a page's small files (`files`) and their blocks, in two calls
/// for the whole page instead of two or more per file; and the checks of the root, its
/// marker and free space, once for the page ([`puller::check_batch`]). `None` for an
/// empty page or when the index could not say.
async fn prefetch_page<'a>(
    index: crate::index::Index,
    folder: String,
    root: std::path::PathBuf,
    min_free_bytes: u64,
    files: impl Iterator<Item = &'a FileInfo>,
) -> Option<Prefetched> {
    let mut names = Vec::new();
    let mut hashes = Vec::new();
    let mut sizes = Vec::new();
    for g in files {
        names.push(g.name.clone());
        hashes.extend(g.blocks.iter().map(|b| b.hash));
        sizes.push((g.name.clone(), g.size));
    }
    if names.is_empty() {
        return None;
    }
    let locals = index.get_locals_with_inode(&folder, names).await;
    let known = index.known_blocks(hashes).await;
    let (batch_checked, root_dir) = tokio::task::spawn_blocking(move || {
        let files = sizes.iter().map(|(name, size)| (name.as_str(), *size));
        let checked = puller::check_batch(&root, files, min_free_bytes);
        (checked, std::fs::File::open(&root).ok().map(Arc::new))
    })
    .await
    .unwrap_or((false, None));
    Some(Prefetched {
        locals: locals.ok()?,
        known: Arc::new(known.ok()?),
        min_free_bytes,
        batch_checked,
        root_dir,
    })
}

/// The small files of a listed page, as the pull loop sorts them out: what it builds
/// in batches and so prefetches for.
fn small_files(items: &[NeedItem]) -> impl Iterator<Item = &FileInfo> {
    items
        .iter()
        .map(|i| &i.global)
        .filter(|g| !g.deleted && g.kind != FileKind::Dir && g.size <= SMALL_FILE)
}

/// A page's need list and what was prefetched for its small files, asked while the page
/// before it was staged.
type NextPage = (Result<Vec<NeedItem>>, Option<Prefetched>);

/// What the index said about a round of small files, asked once for all of them.
struct Prefetched {
    locals: HashMap<String, (crate::types::FileInfo, u64)>,
    known: Arc<HashSet<[u8; 32]>>,
    /// [`FolderLoop::min_free_bytes`], asked once for the round.
    min_free_bytes: u64,
    /// [`puller::check_batch`] passed for the whole round.
    batch_checked: bool,
    /// The folder root, opened for the round ([`puller::PullOptions::root_dir`]).
    root_dir: Option<Arc<std::fs::File>>,
}

/// How far `step_one` took an item.
enum Step {
    Applied(Applied),
    /// A file built in its temp file, to be installed with others.
    Staged(puller::Staged),
}

/// What applying one needed item did, for the phase's batched index commit.
struct Applied {
    action: &'static str,
    /// The record to store as local, with the new file's inode.
    commit: Option<(crate::types::FileInfo, u64)>,
    /// A new local name to scan (a conflict copy).
    rescan: Option<String>,
}

/// Keeps the watcher's names as they are but drops duplicates and names inside others.
fn normalise_paths(mut paths: Vec<String>) -> Vec<String> {
    paths.sort();
    paths.dedup();
    let mut out: Vec<String> = Vec::new();
    for p in paths {
        if p.is_empty() {
            return Vec::new(); // the root itself: scan everything
        }
        if out
            .last()
            .map(|l| p.starts_with(&format!("{l}/")))
            .unwrap_or(false)
        {
            continue;
        }
        out.push(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, DeviceConfig};
    use crate::identity::Identity;
    use crate::index::Index;
    use crate::net::{self, NetConfig};
    use crate::types::{DeviceId, FileInfo};
    use std::path::Path;
    use std::sync::RwLock;

    /// A folder loop over a real index and a network handle that listens nowhere and
    /// dials no one, sharing folder "f" at `root` with one (never connected) peer.
    async fn folder_loop(root: &Path, home: &Path) -> (Ctx, FolderHandle, DeviceId) {
        let me = Identity::generate();
        let peer = Identity::generate().device_id();
        let mut cfg = Config::new_default(Some("test".into()));
        cfg.listen.clear();
        cfg.mdns = false;
        cfg.devices.push(DeviceConfig {
            id: peer,
            name: "peer".into(),
            addresses: vec![],
        });
        let folder = FolderConfig {
            id: "f".into(),
            label: String::new(),
            path: root.to_path_buf(),
            kind: FolderType::SendReceive,
            devices: vec![peer],
            rescan_interval_s: 3600,
            ignore_delete: false,
            paused: false,
            versioning: None,
        };
        cfg.folders.push(folder.clone());
        let (net, _events) = net::start(NetConfig {
            keypair: me.libp2p_keypair(),
            listen: vec![],
            mdns: false,
            lanes: true,
        })
        .await
        .unwrap();
        let ctx = Ctx {
            own: me.device_id(),
            index: Index::open_in_memory().unwrap(),
            net,
            config: Arc::new(RwLock::new(cfg)),
            // Room for every event of a pull of a few thousand files: tests read them all.
            events: tokio::sync::broadcast::channel(16 * 1024).0,
            folders: Default::default(),
            connected: Default::default(),
            config_path: home.join("config.toml"),
        };
        let h = spawn(ctx.clone(), folder);
        (ctx, h, peer)
    }

    /// [`folder_loop`] over an empty folder `folder` in a new temp dir, once the loop's
    /// start-up scan is done.
    async fn started_folder() -> (tempfile::TempDir, PathBuf, Ctx, FolderHandle, DeviceId) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("folder");
        std::fs::create_dir_all(root.join(MARKER_DIR)).unwrap();
        let (ctx, h, peer) = folder_loop(&root, tmp.path()).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while h.runtime.lock().unwrap().scans == 0 {
            assert!(Instant::now() < deadline, "no start-up scan");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (tmp, root, ctx, h, peer)
    }

    /// A peer is not served a name this device ignores, even when it guesses the name;
    /// before the loop has read the rules, nothing in the folder is served.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ignored_names_are_not_served_to_peers() {
        use crate::protocol::{BlockRequest, BlockResponse};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("folder");
        std::fs::create_dir_all(root.join(MARKER_DIR)).unwrap();
        std::fs::create_dir_all(root.join("keys")).unwrap();
        std::fs::write(root.join(crate::ignore::IGNORE_FILE), "secret.txt\nkeys/\n").unwrap();
        for name in ["secret.txt", "public.txt", "keys/id"] {
            std::fs::write(root.join(name), b"some bytes").unwrap();
        }
        let (ctx, h, peer) = folder_loop(&root, tmp.path()).await;
        let runtime = h.runtime.clone();
        ctx.folders.lock().unwrap().insert("f".into(), h);
        let ask = |name: &str| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let req = BlockRequest {
                folder: "f".into(),
                name: name.into(),
                offset: 0,
                size: 4,
                hash: [0; 32],
            };
            super::super::responder::serve(&ctx, peer, req, tx);
            rx
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while runtime.lock().unwrap().scans == 0 {
            assert!(Instant::now() < deadline, "no start-up scan");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            ask("public.txt").await.unwrap(),
            BlockResponse::Data(b"some".to_vec())
        );
        assert_eq!(ask("secret.txt").await.unwrap(), BlockResponse::Refused);
        assert_eq!(ask("keys/id").await.unwrap(), BlockResponse::Refused);

        // The same through a batch, answered in order.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let batch = ["secret.txt", "public.txt", "keys/id"]
            .map(|name| BlockRequest {
                folder: "f".into(),
                name: name.into(),
                offset: 5,
                size: 5,
                hash: [0; 32],
            })
            .to_vec();
        super::super::responder::serve_batch(&ctx, peer, batch, tx);
        assert_eq!(
            rx.await.unwrap(),
            [
                BlockResponse::Refused,
                BlockResponse::Data(b"bytes".to_vec()),
                BlockResponse::Refused
            ]
        );

        // Rules not read yet: nothing is served.
        runtime.lock().unwrap().ignores = None;
        assert_eq!(ask("public.txt").await.unwrap(), BlockResponse::Refused);
    }

    fn empty_file(name: &str, seq: i64) -> FileInfo {
        FileInfo {
            name: name.into(),
            kind: FileKind::File,
            size: 0,
            mtime_ns: 1_700_000_000_000_000_000,
            mode: 0o644,
            deleted: false,
            version: VersionVector::new().bump(0xFEED),
            sequence: seq,
            modified_by: 0xFEED,
            blocks: vec![],
            symlink_target: None,
        }
    }

    /// Names from a peer that would leave the folder are refused by the folder loop and
    /// nothing is written outside the folder: absolute, `..`, names through a symlink the
    /// peer itself made, the reserved `.ferry/`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn escaping_names_from_a_peer_are_refused_and_nothing_is_written_outside() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        let root = tmp.path().join("inside/folder");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::create_dir_all(root.join(MARKER_DIR)).unwrap();
        let (ctx, h, peer) = folder_loop(&root, tmp.path()).await;

        let bad = [
            "../escape",
            "/abs",
            "a/../../x",
            "../../outside/planted",
            "./dot",
            "a//b",
            ".ferry/evil",
            "nul\0byte",
        ];
        let mut records: Vec<FileInfo> = bad
            .iter()
            .enumerate()
            .map(|(i, n)| empty_file(&n.replace("\\0", "\0"), i as i64 + 1))
            .collect();
        let mut link = empty_file("link", 20);
        link.kind = FileKind::Symlink;
        link.symlink_target = Some(outside.to_string_lossy().into_owned());
        records.push(link);
        records.push(empty_file("link/through.txt", 21));
        let mut dir = empty_file("../escaped-dir", 22);
        dir.kind = FileKind::Dir;
        records.push(dir);
        records.push(empty_file("good.txt", 30));
        ctx.index.apply_remote("f", peer, 7, records).await.unwrap();
        h.cmd.send(FolderCmd::Pull).await.unwrap();

        let deadline = Instant::now() + Duration::from_secs(20);
        let errors = loop {
            let errors = h.runtime.lock().unwrap().pull_errors.clone();
            if root.join("good.txt").exists() && errors.len() > bad.len() {
                break errors;
            }
            assert!(Instant::now() < deadline, "pull did not finish: {errors:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for n in bad
            .iter()
            .map(|n| n.replace("\\0", "\0"))
            .chain(["../escaped-dir".into()])
        {
            let e = errors
                .iter()
                .find(|(name, _)| *name == n)
                .unwrap_or_else(|| panic!("{n:?} not refused: {errors:?}"));
            assert!(e.1.contains("refusing name"), "{e:?}");
        }
        // Either the link came first and the name through it was refused, or the name
        // came first and made a real directory (then the link could not replace it).
        let through = root.join("link/through.txt");
        let refused_through = errors.iter().any(|(n, _)| n == "link/through.txt");
        assert!(
            refused_through
                || std::fs::symlink_metadata(root.join("link"))
                    .unwrap()
                    .is_dir()
        );
        assert!(
            !through.exists()
                || !std::fs::symlink_metadata(root.join("link"))
                    .unwrap()
                    .is_symlink()
        );
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "written outside"
        );
        let mut beside: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        beside.sort();
        assert_eq!(beside, ["inside", "outside"]);
        assert_eq!(
            std::fs::read_dir(tmp.path().join("inside"))
                .unwrap()
                .count(),
            1,
            "only the folder"
        );
        let _ = h.cmd.send(FolderCmd::Stop).await;
    }

    /// A tree moved in and a scan asked for at once (what a script or the bench does): the
    /// watcher's batch for the tree comes after the full scan has started, which saw it
    /// all, so it is not scanned again; changes after that scan still are.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn watcher_changes_seen_by_a_later_full_scan_are_not_scanned_again() {
        let (tmp, root, _ctx, h, _peer) = started_folder().await;
        let scans = || h.runtime.lock().unwrap().scans;
        let wait_for = |what: &str, n: u64| {
            let deadline = Instant::now() + Duration::from_secs(20);
            let what = what.to_string();
            async move {
                while scans() < n {
                    assert!(Instant::now() < deadline, "{what}: {} scans", scans());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        // A change the watcher reports: it is up.
        std::fs::write(root.join("probe"), b"x").unwrap();
        wait_for("the watcher's scan of a new file", 2).await;

        let outside = tmp.path().join("tree");
        for d in 0..3 {
            std::fs::create_dir_all(outside.join(format!("d{d}"))).unwrap();
            for f in 0..20 {
                std::fs::write(outside.join(format!("d{d}/f{f}")), b"data").unwrap();
            }
        }
        std::fs::rename(&outside, root.join("tree")).unwrap();
        // The watcher stamps an event when it reads it: give it that long (a batch so soon
        // after the probe's waits out the debounce; if it goes first all the same, it is
        // scanned before the full scan and counted in `after_full`).
        tokio::time::sleep(Duration::from_millis(30)).await;
        let (tx, rx) = oneshot::channel();
        h.cmd.send(FolderCmd::Scan(None, Some(tx))).await.unwrap();
        rx.await.unwrap().unwrap();
        let after_full = scans();
        // Well past the watcher's debounce (150 ms): its batch has come and gone.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(scans(), after_full, "the moved-in tree was scanned twice");

        std::fs::write(root.join("tree/d0/new"), b"later").unwrap();
        wait_for("a change after the full scan", after_full + 1).await;
        let _ = h.cmd.send(FolderCmd::Stop).await;
    }

    /// Records that arrive while a pull is under way, behind its cursor, are applied by
    /// that same pull (nothing else asks for another one here): a directory's record with
    /// the next page, not after all the files (the pull had made the directory for them;
    /// otherwise only the watcher's scan of the pull's own changes would find it), and a
    /// file that sorts before the cursor by the pass that goes back at the end.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_arriving_behind_the_pull_are_applied_by_it() {
        let (_tmp, root, ctx, h, peer) = started_folder().await;
        let mut events = ctx.events.subscribe();
        // The start-up scan's pull is over too, so no pull but the one asked for below
        // can find the late records.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        const FILES: usize = 4 * NEED_BATCH;
        let last = format!("d/f{:05}", FILES - 1);
        let files: Vec<FileInfo> = (0..FILES)
            .map(|i| empty_file(&format!("d/f{i:05}"), i as i64 + 1))
            .collect();
        ctx.index.apply_remote("f", peer, 7, files).await.unwrap();
        h.cmd.send(FolderCmd::Pull).await.unwrap();
        while !root.join("d/f00000").exists() {
            assert!(Instant::now() < deadline, "the pull did not start");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut dir = empty_file("d", FILES as i64 + 1);
        dir.kind = FileKind::Dir;
        dir.mode = 0o755;
        let early = empty_file("a", FILES as i64 + 2);
        ctx.index
            .apply_remote("f", peer, 7, vec![dir, early])
            .await
            .unwrap();
        assert!(
            !root.join(&last).exists(),
            "inconclusive: the pull was over before the late records came"
        );
        let mut order = Vec::new();
        while !(order.iter().any(|n| n == "d") && order.iter().any(|n| n == "a")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, events.recv()).await {
                Ok(Ok(Event::ItemFinished { name, error, .. })) => {
                    assert_eq!(error, None, "{name}");
                    order.push(name);
                }
                Ok(Ok(_)) => {}
                other => panic!("the pull did not apply the late records: {other:?}"),
            }
        }
        let at = |name: &str| order.iter().position(|n| n == name);
        assert!(
            at(&last).is_none_or(|l| at("d") < Some(l)),
            "the directory waited for the end of the pull"
        );
        loop {
            let idle = h.runtime.lock().unwrap().state == "idle";
            if idle && root.join(&last).exists() {
                break;
            }
            assert!(Instant::now() < deadline, "the pull did not finish");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = ctx.index.need_list_after("f", None, 10).await.unwrap();
        let left: Vec<_> = left.iter().map(|i| i.global.name.as_str()).collect();
        assert!(left.is_empty(), "still needed after the pull: {left:?}");
        let _ = h.cmd.send(FolderCmd::Stop).await;
    }

    #[test]
    fn nested_watch_paths_collapse() {
        let v = normalise_paths(vec![
            "a/b".into(),
            "a".into(),
            "c".into(),
            "a/b".into(),
            "ab".into(),
        ]);
        assert_eq!(v, vec!["a".to_string(), "ab".into(), "c".into()]);
        assert!(normalise_paths(vec!["x".into(), "".into()]).is_empty());
    }
}
