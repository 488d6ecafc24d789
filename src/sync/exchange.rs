//! Index exchange with connected devices.
//!
//! On connect each side sends a cluster config: per folder it shares with the other, its
//! own index ID and how far it has got in the other's index. Receiving that starts one
//! sender task per (folder, device) that sends local records newer than what the peer
//! has, in bounded batches, and then each new local change as soon as it is committed
//! (it waits on the folder's sequence watch). Incoming batches go to the index, which
//! recomputes global versions; the folder loop is then told to pull.
//!
//! Receive-only folders do not send records of local edits (Syncthing's "locally
//! changed" items stay local).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::folder::FolderCmd;
use super::Ctx;
use crate::config::FolderType;
use crate::events::Event;
use crate::protocol::{FolderOffer, IndexRequest, IndexResponse, MAX_INDEX_BATCH_RECORDS};
use crate::types::DeviceId;

/// After sending a partial batch, how long a sender lets new records gather.
const BATCH_GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// One index sender task per (folder, device).
type SenderMap = HashMap<(String, DeviceId), JoinHandle<()>>;

/// Running index senders.
#[derive(Clone, Default)]
pub struct Senders(Arc<Mutex<SenderMap>>);

impl Senders {
    pub fn stop_device(&self, device: &DeviceId) {
        if let Ok(mut m) = self.0.lock() {
            m.retain(|(_, d), h| {
                if d == device {
                    h.abort();
                    false
                } else {
                    true
                }
            });
        }
    }

    pub fn stop_all(&self) {
        if let Ok(mut m) = self.0.lock() {
            for (_, h) in m.drain() {
                h.abort();
            }
        }
    }

    /// Is a sender for this folder and device running?
    fn running(&self, key: &(String, DeviceId)) -> bool {
        self.0
            .lock()
            .map(|m| m.get(key).is_some_and(|h| !h.is_finished()))
            .unwrap_or(false)
    }

    fn replace(&self, key: (String, DeviceId), h: JoinHandle<()>) {
        if let Ok(mut m) = self.0.lock() {
            if let Some(old) = m.insert(key, h) {
                old.abort();
            }
        }
    }
}

/// Sends our cluster config to `peer`: every folder shared with it.
pub async fn send_cluster_config(ctx: &Ctx, peer: DeviceId) {
    let (name, folders) = match ctx.config.read() {
        Ok(c) => (
            c.name.clone(),
            c.folders
                .iter()
                .filter(|f| f.devices.contains(&peer))
                .map(|f| (f.id.clone(), f.label.clone()))
                .collect::<Vec<_>>(),
        ),
        Err(_) => return,
    };
    let mut offers = Vec::new();
    for (id, label) in folders {
        let Ok(meta) = ctx.index.ensure_folder(&id).await else {
            continue;
        };
        let (peer_index_id, peer_max_sequence) =
            ctx.index.remote_state(&id, peer).await.unwrap_or((0, 0));
        offers.push(FolderOffer {
            id,
            label,
            index_id: meta.index_id,
            peer_index_id,
            peer_max_sequence,
        });
    }
    let req = IndexRequest::ClusterConfig {
        device_name: name,
        folders: offers,
    };
    match ctx.net.send_index(peer, req).await {
        Ok(IndexResponse::Ok) => {}
        Ok(IndexResponse::Refused(why)) => warn!(device = %peer, "cluster config refused: {why}"),
        Err(e) => debug!(device = %peer, "cluster config not delivered: {e}"),
    }
}

/// Handles an index-protocol message from a paired device.
pub async fn handle_request(
    ctx: &Ctx,
    senders: &Senders,
    peer: DeviceId,
    req: IndexRequest,
    reply: oneshot::Sender<IndexResponse>,
) {
    match req {
        IndexRequest::ClusterConfig {
            device_name,
            folders,
        } => {
            let _ = reply.send(IndexResponse::Ok);
            let _ = ctx.edit_config(|c| {
                if let Some(d) = c.devices.iter_mut().find(|d| d.id == peer) {
                    if d.name.is_empty() && !device_name.is_empty() {
                        d.name = device_name.clone();
                    }
                }
                Ok(())
            });
            // A folder that became shared both ways since the peer last heard from us
            // (it just accepted our offer, or we just connected): tell it again, so it
            // starts sending its index too. Ends after one round: then both run senders.
            let mut newly_mutual = false;
            for offer in folders {
                match ctx.shared_with(&offer.id, &peer) {
                    Some(_) => {
                        newly_mutual |= !senders.running(&(offer.id.clone(), peer));
                        let Ok(meta) = ctx.index.ensure_folder(&offer.id).await else {
                            continue;
                        };
                        // The peer holds our index up to peer_max_sequence, unless it
                        // holds an older incarnation of it: then everything again.
                        let from = if offer.peer_index_id == meta.index_id {
                            offer.peer_max_sequence
                        } else {
                            0
                        };
                        start_sender(ctx, senders, offer.id.clone(), peer, from);
                        // The device is back: what failed for want of it can go again.
                        if let Some(tx) = folder_cmd(ctx, &offer.id) {
                            let _ = tx.try_send(FolderCmd::Retry);
                        }
                    }
                    None => offer_pending(ctx, &offer.id, &offer.label, peer),
                }
            }
            if newly_mutual {
                let c = ctx.clone();
                tokio::spawn(async move { send_cluster_config(&c, peer).await });
            }
        }
        IndexRequest::IndexUpdate {
            folder,
            index_id,
            records,
        } => {
            let Some(_) = ctx.shared_with(&folder, &peer) else {
                let _ = reply.send(IndexResponse::Refused(format!(
                    "folder {folder:?} is not shared with you"
                )));
                return;
            };
            let n = records.len();
            match ctx
                .index
                .apply_remote(&folder, peer, index_id, records)
                .await
            {
                Ok(_) => {
                    let _ = reply.send(IndexResponse::Ok);
                    debug!(device = %peer, %folder, records = n, "index update applied");
                    ctx.emit(Event::RemoteIndexUpdated {
                        folder: folder.clone(),
                        device: peer,
                        files: n,
                    });
                    if let Some(tx) = folder_cmd(ctx, &folder) {
                        let _ = tx.try_send(FolderCmd::Pull);
                    }
                }
                Err(e) => {
                    warn!(device = %peer, %folder, "cannot store index update: {e}");
                    let _ = reply.send(IndexResponse::Refused(e.to_string()));
                }
            }
        }
    }
}

/// The command channel of the folder's loop, if it runs.
fn folder_cmd(ctx: &Ctx, folder: &str) -> Option<tokio::sync::mpsc::Sender<FolderCmd>> {
    ctx.folders
        .lock()
        .ok()
        .and_then(|f| f.get(folder).map(|h| h.cmd.clone()))
}

/// The folder loop's sequence watch, if the loop runs.
fn folder_sequence(ctx: &Ctx, folder: &str) -> Option<tokio::sync::watch::Receiver<i64>> {
    ctx.folders
        .lock()
        .ok()
        .and_then(|f| f.get(folder).map(|h| h.sequence.clone()))
}

/// Records a folder offer from `peer` as pending (a person accepts it to a path).
fn offer_pending(ctx: &Ctx, id: &str, label: &str, peer: DeviceId) {
    // A folder we have but do not share with this device is not an offer.
    let newly = ctx
        .edit_config(|c| Ok(c.folder(id).is_none() && c.note_pending_folder(id, label, peer)))
        .unwrap_or(false);
    if newly {
        info!(device = %peer, folder = %id, "device offers folder {label:?}; accept with `ferry folder accept {id} PATH`");
        ctx.emit(Event::PendingFolder {
            folder: id.to_string(),
            label: label.to_string(),
            device: peer,
        });
        ctx.emit(Event::ConfigChanged);
    }
}

fn start_sender(ctx: &Ctx, senders: &Senders, folder: String, peer: DeviceId, from: i64) {
    let c = ctx.clone();
    let f = folder.clone();
    let h = tokio::spawn(async move {
        if let Err(e) = run_sender(&c, &f, peer, from).await {
            debug!(device = %peer, folder = %f, "index sender stopped: {e}");
        }
    });
    senders.replace((folder, peer), h);
}

async fn run_sender(ctx: &Ctx, folder: &str, peer: DeviceId, mut last: i64) -> crate::Result<()> {
    let Some(mut seq) = folder_sequence(ctx, folder) else {
        return Ok(());
    };
    let meta = ctx.index.ensure_folder(folder).await?;
    loop {
        let kind = ctx.folder_config(folder).map(|f| f.kind);
        let Some(kind) = kind else { return Ok(()) };
        // Marked before the query, so a commit racing it still wakes us below.
        seq.mark_unchanged();
        let mut records = ctx
            .index
            .local_since(folder, last, MAX_INDEX_BATCH_RECORDS)
            .await?;
        if records.is_empty() {
            if seq.changed().await.is_err() {
                // The folder loop stopped: restarted with a new config (keep sending,
                // from the new loop's watch) or removed (stop).
                seq = loop {
                    if ctx.folder_config(folder).is_none() {
                        return Ok(());
                    }
                    match folder_sequence(ctx, folder) {
                        Some(s) if s.has_changed().is_ok() => break s,
                        _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
                    }
                };
            }
            continue;
        }
        let batch_last = records.last().map(|r| r.sequence).unwrap_or(last);
        if kind == FolderType::ReceiveOnly {
            let own = ctx.own.short();
            records.retain(|r| r.modified_by != own);
        }
        let sent = records.len();
        if !records.is_empty() {
            let req = IndexRequest::IndexUpdate {
                folder: folder.to_string(),
                index_id: meta.index_id,
                records,
            };
            match ctx.net.send_index(peer, req).await? {
                IndexResponse::Ok => {}
                IndexResponse::Refused(why) => {
                    warn!(device = %peer, %folder, "index update refused: {why}");
                    return Ok(());
                }
            }
        }
        last = batch_last;
        if sent < MAX_INDEX_BATCH_RECORDS {
            // A burst of changes (a puller finishing small files, a big copy) would
            // otherwise go out one record per message, each a transaction on the peer.
            // The first change of a quiet period still leaves at once; later ones wait
            // this long to travel together.
            tokio::time::sleep(BATCH_GATHER).await;
        }
    }
}
