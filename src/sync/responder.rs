//! Serves block requests from peers: only for folders shared with the asking device,
//! only for names that pass the same checks as names we pull. The data is not hashed
//! here: the requester verifies every block anyway (and stops asking a device whose data
//! does not match), so hashing on both sides would only double the CPU per byte.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tokio::sync::oneshot;
use tracing::debug;

use super::source::{read_at, read_cached};
use super::Ctx;
use crate::protocol::{BlockRequest, BlockResponse, MAX_BLOCK_SIZE};
use crate::types::DeviceId;

pub fn serve(ctx: &Ctx, peer: DeviceId, req: BlockRequest, reply: oneshot::Sender<BlockResponse>) {
    let Some(path) = allowed_path(ctx, &peer, &req) else {
        let _ = reply.send(BlockResponse::Refused);
        return;
    };
    // Data in the page cache (as it usually is: just scanned, or just written) is
    // answered here; only a read that would wait for the disk goes to the blocking pool.
    if let Some(d) = read_cached(&path, req.offset, req.size) {
        let _ = reply.send(BlockResponse::Data(d));
        return;
    }
    tokio::task::spawn_blocking(move || {
        let _ = reply.send(read(&path, &req));
    });
}

/// Serves a batch of small blocks: each checked as in [`serve`], all read in one pass on
/// one blocking thread (a batch is at most 1 MiB), answered in order.
pub fn serve_batch(
    ctx: &Ctx,
    peer: DeviceId,
    reqs: Vec<BlockRequest>,
    reply: oneshot::Sender<Vec<BlockResponse>>,
) {
    // Folder roots looked up once per folder, not once per block.
    let mut roots: HashMap<&str, Option<PathBuf>> = HashMap::new();
    let paths: Vec<_> = reqs
        .iter()
        .map(|r| {
            let root = roots
                .entry(r.folder.as_str())
                .or_insert_with(|| shared_root(ctx, &peer, &r.folder));
            checked_join(root.as_deref()?, r)
        })
        .collect();
    tokio::task::spawn_blocking(move || {
        let resps = reqs
            .iter()
            .zip(paths)
            .map(|(req, path)| match path {
                Some(p) => read(&p, req),
                None => BlockResponse::Refused,
            })
            .collect();
        let _ = reply.send(resps);
    });
}

/// Where `req` points, if `peer` may read it: the folder is shared with it, the size is
/// within the protocol's limit and the name is safe.
fn allowed_path(ctx: &Ctx, peer: &DeviceId, req: &BlockRequest) -> Option<PathBuf> {
    checked_join(&shared_root(ctx, peer, &req.folder)?, req)
}

/// The root of `folder` if it is shared with `peer`.
fn shared_root(ctx: &Ctx, peer: &DeviceId, folder: &str) -> Option<PathBuf> {
    let root = ctx.shared_with(folder, peer).map(|f| f.path);
    if root.is_none() {
        debug!(device = %peer, %folder, "block request for a folder not shared with it");
    }
    root
}

fn checked_join(root: &Path, req: &BlockRequest) -> Option<PathBuf> {
    if req.size > MAX_BLOCK_SIZE {
        return None;
    }
    super::names::safe_join(root, &req.name).ok()
}

fn read(path: &Path, req: &BlockRequest) -> BlockResponse {
    match read_at(path, req.offset, req.size) {
        Some(d) => BlockResponse::Data(d),
        None => BlockResponse::NotFound,
    }
}
