//! The daemon: builds every actor and channel, runs the engine, and stops it in order.
//!
//! `start` opens the index, starts the network loop and one folder loop per folder, and
//! returns a [`DaemonHandle`] — what the control API, the tray and `ferry demo` use.
//! `run` adds the control API and waits for a stop signal.
//!
//! Shutdown order: stop the folder loops (no new scans or pulls; an in-flight file keeps
//! its temp file for the next start), stop the index senders, stop the network loop,
//! then let the index commit and checkpoint.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};
use tracing::{info, warn};

use crate::client::DaemonInfo;
use crate::config::{Config, Home};
use crate::error::{Error, Result};
use crate::events::{Event, EVENT_CAPACITY};
use crate::identity::Identity;
use crate::index::Index;
use crate::net::{self, NetConfig, NetEvent, PeerEntry};
use crate::protocol::{JoinRequest, JoinResponse};
use crate::sync::exchange::{self, Senders};
use crate::sync::folder::{self, FolderCmd};
use crate::sync::{responder, Ctx};
use crate::types::DeviceId;

/// How long an invite stays valid.
pub const INVITE_TTL: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides the config's `mdns = true` for this run.
    pub no_mdns: bool,
}

/// `ferry status --json`. Field names are a contract: add, never rename.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub device_id: String,
    pub name: String,
    pub listen: Vec<String>,
    pub paused: bool,
    pub folders: Vec<FolderStatus>,
    pub devices: Vec<DeviceStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FolderStatus {
    pub id: String,
    pub label: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub state: String,
    pub error: Option<String>,
    pub local_files: u64,
    pub local_bytes: u64,
    pub global_files: u64,
    pub global_bytes: u64,
    pub need_files: u64,
    pub need_bytes: u64,
    pub completion: f64,
    pub devices: Vec<FolderDeviceStatus>,
    /// Receive-only folders: local edits not sent to others (`ferry folder revert` undoes
    /// them). 0 for other folder types.
    #[serde(default)]
    pub local_changes: u64,
    /// Names that could not be pulled, with why (refused names, unavailable data…).
    #[serde(default)]
    pub pull_errors: Vec<PullError>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PullError {
    pub name: String,
    pub error: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FolderDeviceStatus {
    pub id: String,
    pub completion: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub id: String,
    pub name: String,
    pub connected: bool,
    pub address: Option<String>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub connection_type: Option<String>,
    /// Large blocks from this device come on a block lane (absent from older daemons).
    #[serde(default)]
    pub block_lane: bool,
}

struct Invite {
    folder: Option<String>,
    expires: SystemTime,
    used: bool,
}

/// An index request waiting in its peer's queue, with where to answer.
type IndexJob = (
    crate::protocol::IndexRequest,
    oneshot::Sender<crate::protocol::IndexResponse>,
);

struct Inner {
    ctx: Ctx,
    /// Per peer, the queue its index requests are handled from, in order. Bounded in
    /// practice by the peer: a sender waits for each answer before the next batch.
    index_queues: Mutex<HashMap<DeviceId, tokio::sync::mpsc::UnboundedSender<IndexJob>>>,
    home: Home,
    identity: Identity,
    senders: Senders,
    invites: Mutex<HashMap<Vec<u8>, Invite>>,
    /// Serialises config changes that need reconciling (folder loops, peers).
    reconcile_lock: tokio::sync::Mutex<()>,
}

/// The engine's handle. Cheap to clone.
#[derive(Clone)]
pub struct DaemonHandle {
    inner: Arc<Inner>,
}

/// Loads (or creates with defaults) the config and identity of `home`.
pub fn load_or_init(home: &Home) -> Result<(Config, Identity)> {
    let identity = Identity::load_or_create(&home.identity_path())?;
    let path = home.config_path();
    let config = if path.exists() {
        Config::load(&path)?
    } else {
        let c = Config::new_default(None);
        c.save(&path)?;
        c
    };
    Ok((config, identity))
}

pub async fn start(home: Home, opts: RunOptions) -> Result<DaemonHandle> {
    let (config, identity) = load_or_init(&home)?;
    std::fs::create_dir_all(&home.data_dir).map_err(|e| Error::io(&home.data_dir, e))?;
    let index = Index::open(&home.index_path())?;
    let listen = config
        .listen
        .iter()
        .filter_map(|a| a.parse().ok())
        .collect();
    let (net, mut net_rx) = net::start(NetConfig {
        keypair: identity.libp2p_keypair(),
        listen,
        mdns: config.mdns && !opts.no_mdns,
        lanes: config.options.block_lanes,
    })
    .await?;
    let (events, _) = broadcast::channel(EVENT_CAPACITY);
    let ctx = Ctx {
        own: identity.device_id(),
        index,
        net,
        config: Arc::new(RwLock::new(config)),
        events,
        folders: Arc::new(Mutex::new(HashMap::new())),
        connected: Arc::new(Mutex::new(HashSet::new())),
        config_path: home.config_path(),
    };
    let handle = DaemonHandle {
        inner: Arc::new(Inner {
            ctx,
            home,
            identity,
            senders: Senders::default(),
            index_queues: Mutex::new(HashMap::new()),
            invites: Mutex::new(HashMap::new()),
            reconcile_lock: tokio::sync::Mutex::new(()),
        }),
    };
    handle.reconcile().await?;
    let h = handle.clone();
    tokio::spawn(async move {
        while let Some(ev) = net_rx.recv().await {
            h.on_net_event(ev).await;
        }
    });
    info!(device = %handle.device_id(), "engine started");
    Ok(handle)
}

/// Puts the calling thread, and every thread it starts from then on, under Linux's
/// `SCHED_BATCH` policy; call it on the thread that builds the engine's runtime, before
/// building it. A batch thread gets the same share of the CPU as any other at its nice
/// level, but when it wakes it does not preempt the thread running: it waits for the
/// next turn. Syncing many small files, the two sides wake each other thousands of times
/// a second (every message, every file-system event); on two cores those wakeups
/// preempting busy threads cost about a tenth of bench b's time and CPU (BENCHMARKS.md,
/// "Batch scheduling"). A background daemon need not preempt anyone either. Elsewhere,
/// or if the kernel refuses, nothing changes.
pub fn use_batch_scheduling() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: a plain syscall on the calling thread (pid 0) with a valid parameter.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
            tracing::debug!(
                "cannot use SCHED_BATCH: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The engine's async runtime: one worker thread per two cores (at least one), and at
/// most [`BLOCKING_THREADS`] threads for file writes, reads that would wait and scans.
/// `TOKIO_WORKER_THREADS`, when set, decides instead.
///
/// Fewer workers means fewer wake-ups across threads: a block or a message handed from
/// one task to another stays on the thread that made it rather than waking the other
/// worker. On this project's 2-core bench host, one worker against two, alternating
/// (BENCHMARKS.md, "`013af11`: one async worker on two cores"): a 1.36–1.50 s against
/// 1.55–1.72 s with about 0.2 CPU-s less on each daemon, c 0.79 against 0.89 s, b and d
/// the same.
pub fn engine_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return tokio::runtime::Runtime::new();
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(async_workers(cores))
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
}

/// Threads of the blocking pool at most (tokio's default is 512). A pull of many small
/// files keeps up to 256 of them in flight, each a short file-system call, and the pool
/// grew to all 512 threads, each with its stack and its share of glibc's arenas: in
/// `bench/compare` h with a pre-seeded pair of 300,000 files the pulling daemon ended at
/// 91 MiB with 518 threads and at 78 MiB with this bound (70 threads). 64 short calls at
/// once keep a disk's queue full; a folder's scan holds one thread while it runs.
pub const BLOCKING_THREADS: usize = 64;

/// Async worker threads for `cores` cores: half of them, at least one.
fn async_workers(cores: usize) -> usize {
    (cores / 2).max(1)
}

/// Runs the daemon with its control API until `shutdown` resolves.
pub async fn run(home: Home, opts: RunOptions, shutdown: impl Future<Output = ()>) -> Result<()> {
    let handle = start(home.clone(), opts).await?;
    let api_addr = handle.config().api.address.clone();
    let (api_stop_tx, api_stop_rx) = oneshot::channel::<()>();
    let (bound, api_task) = crate::api::serve(handle.clone(), &api_addr, api_stop_rx).await?;
    let info = DaemonInfo {
        pid: std::process::id(),
        api: bound.to_string(),
    };
    let info_text = serde_json::to_vec(&info).map_err(|e| Error::Invalid(e.to_string()))?;
    crate::fsutil::write_atomic(&home.daemon_path(), &info_text)?;
    info!("control API on http://{bound}");
    shutdown.await;
    info!("stopping");
    let _ = api_stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(2), api_task).await;
    handle.stop().await;
    let _ = std::fs::remove_file(home.daemon_path());
    Ok(())
}

impl DaemonHandle {
    pub fn ctx(&self) -> &Ctx {
        &self.inner.ctx
    }

    pub fn device_id(&self) -> DeviceId {
        self.inner.identity.device_id()
    }

    pub fn home(&self) -> &Home {
        &self.inner.home
    }

    pub fn config(&self) -> Config {
        self.inner
            .ctx
            .config
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.ctx.events.subscribe()
    }

    /// Applies a config change (validated by `f`), saves it, and brings the engine in
    /// line with it: folder loops, paired peers, folder offers.
    pub async fn update_config<R>(&self, f: impl FnOnce(&mut Config) -> Result<R>) -> Result<R> {
        let r = self.inner.ctx.edit_config(f)?;
        self.reconcile().await?;
        self.inner.ctx.emit(Event::ConfigChanged);
        Ok(r)
    }

    /// Makes the running parts match the config.
    async fn reconcile(&self) -> Result<()> {
        let _g = self.inner.reconcile_lock.lock().await;
        let ctx = &self.inner.ctx;
        let cfg = self.config();
        // Folder loops: start new ones, restart changed ones, stop removed ones.
        let mut to_stop = Vec::new();
        {
            let mut folders = ctx.folders.lock().map_err(|_| Error::Stopped)?;
            let running: Vec<String> = folders.keys().cloned().collect();
            for id in running {
                let keep = cfg.folder(&id).is_some_and(|f| {
                    folders.get(&id).is_some_and(|h| {
                        h.config.path == f.path
                            && h.config.kind == f.kind
                            && h.config.versioning == f.versioning
                            && h.config.ignore_delete == f.ignore_delete
                    })
                });
                if !keep {
                    if let Some(h) = folders.remove(&id) {
                        to_stop.push(h);
                    }
                }
            }
        }
        for h in to_stop {
            let _ = h.cmd.send(FolderCmd::Stop).await;
            let _ = tokio::time::timeout(Duration::from_secs(10), h.task).await;
        }
        {
            let mut folders = ctx.folders.lock().map_err(|_| Error::Stopped)?;
            for f in &cfg.folders {
                if !folders.contains_key(&f.id) {
                    folders.insert(f.id.clone(), folder::spawn(ctx.clone(), f.clone()));
                }
            }
        }
        // Peers: the paired set, with their configured addresses.
        let peers = cfg
            .devices
            .iter()
            .map(|d| PeerEntry {
                id: d.id,
                addrs: d.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
            })
            .collect();
        ctx.net.set_peers(peers).await?;
        let joins_open = self.invites_open();
        ctx.net.set_join_open(joins_open).await?;
        // Tell connected peers what we share now (new shares become offers there).
        let connected: Vec<DeviceId> = ctx
            .connected
            .lock()
            .map(|c| c.iter().copied().collect())
            .unwrap_or_default();
        for peer in connected {
            if cfg.device(&peer).is_some() {
                let c = ctx.clone();
                tokio::spawn(async move { exchange::send_cluster_config(&c, peer).await });
            }
        }
        Ok(())
    }

    async fn on_net_event(&self, ev: NetEvent) {
        let ctx = &self.inner.ctx;
        match ev {
            NetEvent::Connected { peer, addr } => {
                info!(device = %peer, %addr, "connected");
                if let Ok(mut c) = ctx.connected.lock() {
                    c.insert(peer);
                }
                ctx.emit(Event::DeviceConnected {
                    device: peer,
                    address: addr.to_string(),
                });
                let c = ctx.clone();
                tokio::spawn(async move { exchange::send_cluster_config(&c, peer).await });
            }
            NetEvent::Disconnected { peer } => {
                info!(device = %peer, "disconnected");
                if let Ok(mut c) = ctx.connected.lock() {
                    c.remove(&peer);
                }
                self.inner.senders.stop_device(&peer);
                ctx.emit(Event::DeviceDisconnected { device: peer });
            }
            NetEvent::UnknownPeer { peer, addr } => {
                let newly = ctx
                    .edit_config(|c| {
                        Ok(c.note_pending_device(peer, String::new(), addr.to_string()))
                    })
                    .unwrap_or(false);
                if newly {
                    info!(device = %peer, %addr, "unknown device tried to connect; accept with `ferry device accept {peer}`");
                    ctx.emit(Event::PendingDevice {
                        device: peer,
                        name: String::new(),
                        address: addr.to_string(),
                    });
                }
            }
            NetEvent::IndexRequest { peer, req, reply } => {
                // One queue per peer: its index batches are applied in the order they
                // arrived, without one slow peer holding up the others or the net loop.
                let tx = {
                    let mut queues = match self.inner.index_queues.lock() {
                        Ok(q) => q,
                        Err(p) => p.into_inner(),
                    };
                    queues.retain(|_, tx| !tx.is_closed());
                    queues
                        .entry(peer)
                        .or_insert_with(|| {
                            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<IndexJob>();
                            let (c, s) = (ctx.clone(), self.inner.senders.clone());
                            tokio::spawn(async move {
                                while let Some((req, reply)) = rx.recv().await {
                                    exchange::handle_request(&c, &s, peer, req, reply).await;
                                }
                            });
                            tx
                        })
                        .clone()
                };
                let _ = tx.send((req, reply));
            }
            NetEvent::BlockRequest { peer, req, reply } => responder::serve(ctx, peer, req, reply),
            NetEvent::BlockBatch { peer, reqs, reply } => {
                responder::serve_batch(ctx, peer, reqs, reply)
            }
            NetEvent::JoinRequest {
                peer,
                addr,
                req,
                reply,
            } => {
                let resp = self.accept_join(peer, addr.to_string(), req).await;
                let _ = reply.send(resp);
            }
        }
    }

    pub async fn status(&self) -> Result<Status> {
        let ctx = &self.inner.ctx;
        let cfg = self.config();
        let stats = ctx.net.peer_stats().await.unwrap_or_default();
        let mut folders = Vec::new();
        for f in &cfg.folders {
            let counts = ctx.index.counts(&f.id).await.unwrap_or_default();
            let rt = ctx
                .folders
                .lock()
                .ok()
                .and_then(|m| {
                    m.get(&f.id)
                        .and_then(|h| h.runtime.lock().ok().map(|r| r.clone()))
                })
                .unwrap_or_default();
            let mut devices = Vec::new();
            for d in &f.devices {
                devices.push(FolderDeviceStatus {
                    id: d.to_string(),
                    completion: ctx.index.device_completion(&f.id, *d).await.unwrap_or(0.0),
                });
            }
            let local_changes = if f.kind == crate::config::FolderType::ReceiveOnly {
                ctx.index
                    .local_edit_count(&f.id, ctx.own.short())
                    .await
                    .unwrap_or(0)
            } else {
                0
            };
            let completion = if counts.need_files == 0 {
                100.0
            } else if counts.global_bytes == 0 {
                0.0
            } else {
                let have = counts.global_bytes.saturating_sub(counts.need_bytes) as f64;
                (100.0 * have / counts.global_bytes as f64).min(99.9)
            };
            let state = if cfg.paused || f.paused {
                "paused".to_string()
            } else if rt.state.is_empty() {
                "idle".into()
            } else {
                rt.state.clone()
            };
            folders.push(FolderStatus {
                id: f.id.clone(),
                label: f.label.clone(),
                path: f.path.display().to_string(),
                kind: f.kind.as_str().into(),
                state,
                error: rt.error.clone(),
                local_files: counts.local_files,
                local_bytes: counts.local_bytes,
                global_files: counts.global_files,
                global_bytes: counts.global_bytes,
                need_files: counts.need_files,
                need_bytes: counts.need_bytes,
                completion,
                devices,
                local_changes,
                pull_errors: rt
                    .pull_errors
                    .iter()
                    .map(|(n, e)| PullError {
                        name: n.clone(),
                        error: e.clone(),
                    })
                    .collect(),
            });
        }
        let devices = cfg
            .devices
            .iter()
            .map(|d| {
                let s = stats.iter().find(|s| s.id == d.id);
                DeviceStatus {
                    id: d.id.to_string(),
                    name: d.name.clone(),
                    connected: s.is_some_and(|s| s.connected),
                    address: s.and_then(|s| s.address.clone()),
                    bytes_in: s.map(|s| s.bytes_in).unwrap_or(0),
                    bytes_out: s.map(|s| s.bytes_out).unwrap_or(0),
                    connection_type: s.and_then(|s| s.connection_type.clone()),
                    block_lane: s.is_some_and(|s| s.block_lane),
                }
            })
            .collect();
        let listen = ctx
            .net
            .listen_addrs()
            .await
            .unwrap_or_default()
            .iter()
            .map(|a| a.to_string())
            .collect();
        Ok(Status {
            device_id: self.device_id().to_string(),
            name: cfg.name.clone(),
            listen,
            paused: cfg.paused,
            folders,
            devices,
        })
    }

    /// Rescans one folder (or all) and waits until the scan is committed.
    pub async fn scan(&self, folder: Option<&str>) -> Result<()> {
        let targets: Vec<(String, tokio::sync::mpsc::Sender<FolderCmd>)> = {
            let f = self.inner.ctx.folders.lock().map_err(|_| Error::Stopped)?;
            match folder {
                Some(id) => vec![(
                    id.to_string(),
                    f.get(id)
                        .map(|h| h.cmd.clone())
                        .ok_or_else(|| Error::Invalid(format!("no folder with id {id:?}")))?,
                )],
                None => f.iter().map(|(k, h)| (k.clone(), h.cmd.clone())).collect(),
            }
        };
        for (_id, tx) in targets {
            let (rtx, rrx) = oneshot::channel();
            tx.send(FolderCmd::Scan(None, Some(rtx)))
                .await
                .map_err(|_| Error::Stopped)?;
            rrx.await.map_err(|_| Error::Stopped)??;
        }
        Ok(())
    }

    /// Undoes the local changes of a receive-only folder; returns how many there were.
    pub async fn revert(&self, folder: &str) -> Result<usize> {
        let tx = self
            .inner
            .ctx
            .folders
            .lock()
            .map_err(|_| Error::Stopped)?
            .get(folder)
            .map(|h| h.cmd.clone())
            .ok_or_else(|| Error::Invalid(format!("no folder with id {folder:?}")))?;
        let (rtx, rrx) = oneshot::channel();
        tx.send(FolderCmd::Revert(rtx))
            .await
            .map_err(|_| Error::Stopped)?;
        rrx.await.map_err(|_| Error::Stopped)?
    }

    pub async fn set_paused(&self, paused: bool) -> Result<()> {
        self.update_config(|c| {
            c.paused = paused;
            Ok(())
        })
        .await?;
        if !paused {
            let txs: Vec<_> = self
                .inner
                .ctx
                .folders
                .lock()
                .map(|f| f.values().map(|h| h.cmd.clone()).collect())
                .unwrap_or_default();
            for tx in txs {
                let _ = tx.try_send(FolderCmd::Scan(None, None));
            }
        }
        Ok(())
    }

    fn invites_open(&self) -> bool {
        let now = SystemTime::now();
        self.inner
            .invites
            .lock()
            // Used invites count too until they expire, so a second join with the same
            // invite hears "already used" instead of a closed connection.
            .map(|m| m.values().any(|i| i.expires > now))
            .unwrap_or(false)
    }

    /// Makes a one-time invite for this device (and optionally a folder).
    pub async fn invite(&self, folder: Option<String>) -> Result<String> {
        let cfg = self.config();
        if let Some(f) = &folder {
            if cfg.folder(f).is_none() {
                return Err(Error::Invalid(format!("no folder with id {f:?}")));
            }
        }
        let addrs: Vec<String> = self
            .inner
            .ctx
            .net
            .listen_addrs()
            .await?
            .iter()
            .map(|a| a.to_string())
            .collect();
        let secret: [u8; 32] = rand::random();
        let expires = SystemTime::now() + INVITE_TTL;
        let inv = crate::invite::Invite {
            device: self.device_id(),
            addrs,
            secret: secret.to_vec(),
            folder: folder.clone(),
            expires: expires
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        if let Ok(mut m) = self.inner.invites.lock() {
            m.insert(
                secret.to_vec(),
                Invite {
                    folder,
                    expires,
                    used: false,
                },
            );
        }
        self.inner.ctx.net.set_join_open(true).await?;
        Ok(inv.encode())
    }

    /// The inviter's side of a join.
    async fn accept_join(&self, peer: DeviceId, addr: String, req: JoinRequest) -> JoinResponse {
        let verdict = {
            let mut m = match self.inner.invites.lock() {
                Ok(m) => m,
                Err(_) => return JoinResponse::Refused("inviter is shutting down".into()),
            };
            match m.get_mut(&req.secret) {
                None => Err("this invite is not known here (altered, or made before the inviting device restarted)".to_string()),
                Some(i) if i.used => Err("this invite was already used; ask for a new one".to_string()),
                Some(i) if i.expires < SystemTime::now() => Err("this invite has expired; ask for a new one".to_string()),
                Some(i) => {
                    i.used = true;
                    Ok(i.folder.clone())
                }
            }
        };
        let folder = match verdict {
            Ok(f) => f,
            Err(why) => {
                warn!(device = %peer, "join refused: {why}");
                return JoinResponse::Refused(why);
            }
        };
        let own = self.device_id();
        let name = req.device_name.clone();
        let res = self
            .update_config(|c| {
                // The joiner reached us from `addr`; it is a good address to dial back.
                let addrs = if addr.is_empty() { vec![] } else { vec![addr] };
                c.add_device(peer, Some(name), addrs, own)?;
                let mut shared = None;
                if let Some(f) = &folder {
                    c.share_folder(f, peer)?;
                    shared = c.folder(f).map(|fc| (fc.id.clone(), fc.label.clone()));
                }
                Ok((c.name.clone(), shared))
            })
            .await;
        match res {
            Ok((device_name, folder)) => {
                info!(device = %peer, "paired by invite");
                JoinResponse::Accepted {
                    device_name,
                    folder,
                }
            }
            Err(e) => JoinResponse::Refused(e.to_string()),
        }
    }

    /// The joiner's side: pairs with the inviter and accepts its folder at `path`.
    pub async fn join(&self, invite: &str, path: Option<PathBuf>) -> Result<String> {
        let inv = crate::invite::Invite::decode(invite)?;
        if inv.expired() {
            return Err(Error::Invalid(
                "this invite has expired; ask for a new one".into(),
            ));
        }
        let own = self.device_id();
        let peer = inv.device;
        let was_paired = self.config().device(&peer).is_some();
        self.update_config(|c| c.add_device(peer, None, inv.addrs.clone(), own))
            .await?;
        let addrs = inv.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        let req = JoinRequest {
            secret: inv.secret.clone(),
            device_name: self.config().name,
        };
        let resp = self.inner.ctx.net.join(peer, addrs, req).await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => JoinResponse::Refused(format!("could not reach the inviting device: {e}")),
        };
        match resp {
            JoinResponse::Refused(why) => {
                if !was_paired {
                    let _ = self.update_config(|c| c.remove_device(&peer)).await;
                }
                Err(Error::Invalid(format!("invite refused: {why}")))
            }
            JoinResponse::Accepted {
                device_name,
                folder,
            } => {
                let mut msg = format!("Paired with {device_name} ({peer}).");
                let dn = device_name.clone();
                self.update_config(|c| {
                    if let Some(d) = c.devices.iter_mut().find(|d| d.id == peer) {
                        d.name = dn;
                    }
                    Ok(())
                })
                .await?;
                if let Some((id, label)) = folder {
                    let dir = match path {
                        Some(p) => p,
                        None => default_folder_path(&label, &id),
                    };
                    let l = label.clone();
                    let i = id.clone();
                    let d = dir.clone();
                    self.update_config(move |c| {
                        if c.folder(&i).is_none() {
                            c.note_pending_folder(&i, &l, peer);
                            c.accept_folder(&i, &d)?;
                        } else {
                            c.share_folder(&i, peer)?;
                        }
                        Ok(())
                    })
                    .await?;
                    msg.push_str(&format!(" Folder {label:?} syncs to {}.", dir.display()));
                }
                Ok(msg)
            }
        }
    }

    /// Stops the engine in order (see the module docs).
    pub async fn stop(&self) {
        let ctx = &self.inner.ctx;
        let handles: Vec<_> = ctx
            .folders
            .lock()
            .map(|mut f| f.drain().map(|(_, h)| h).collect())
            .unwrap_or_default();
        for h in &handles {
            let _ = h.cmd.try_send(FolderCmd::Stop);
        }
        for h in handles {
            let _ = tokio::time::timeout(Duration::from_secs(5), h.task).await;
        }
        self.inner.senders.stop_all();
        let _ = ctx.net.shutdown().await;
        let _ = ctx.index.close().await;
    }
}

fn default_folder_path(label: &str, id: &str) -> PathBuf {
    let base = directories::UserDirs::new()
        .map(|u| u.home_dir().to_path_buf())
        .unwrap_or_else(|| PathBuf::from("."));
    let name = if label.is_empty() { id } else { label };
    let clean: String = name
        .chars()
        .map(|c| if c == '/' || c == '\0' { '_' } else { c })
        .collect();
    base.join("Ferry").join(clean)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_engine_gets_one_async_worker_per_two_cores_and_at_least_one() {
        assert_eq!(super::async_workers(1), 1);
        assert_eq!(super::async_workers(2), 1);
        assert_eq!(super::async_workers(3), 1);
        assert_eq!(super::async_workers(8), 4);
    }

    #[test]
    fn the_engine_runtime_runs_tasks_and_blocking_work() {
        let rt = super::engine_runtime().unwrap();
        let got = rt.block_on(async {
            let spawned = tokio::spawn(async { 20 }).await.unwrap();
            let blocking = tokio::task::spawn_blocking(|| 22).await.unwrap();
            // Timers and I/O are enabled.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            spawned + blocking
        });
        assert_eq!(got, 42);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn batch_scheduling_holds_for_the_thread_and_the_threads_it_starts() {
        std::thread::spawn(|| {
            // SAFETY: reads the calling thread's own policy.
            let policy = || unsafe { libc::sched_getscheduler(0) };
            // Whatever policy the test runner was started with, start from the default.
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: a plain syscall on the calling thread with a valid parameter.
            assert_eq!(
                unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) },
                0
            );
            assert_eq!(policy(), libc::SCHED_OTHER);
            super::use_batch_scheduling();
            assert_eq!(policy(), libc::SCHED_BATCH);
            let child = std::thread::spawn(policy).join().unwrap();
            assert_eq!(child, libc::SCHED_BATCH);
        })
        .join()
        .unwrap();
    }
}
