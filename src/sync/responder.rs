//! Serves block requests from peers: only for folders shared with the asking device,
//! only for names that pass the same checks as names we pull. The data is not hashed
//! here: the requester verifies every block anyway (and stops asking a device whose data
//! does not match), so hashing on both sides would only double the CPU per byte.

use tokio::sync::oneshot;
use tracing::debug;

use super::source::read_at;
use super::Ctx;
use crate::protocol::{BlockRequest, BlockResponse, MAX_BLOCK_SIZE};
use crate::types::DeviceId;

pub fn serve(ctx: &Ctx, peer: DeviceId, req: BlockRequest, reply: oneshot::Sender<BlockResponse>) {
    let Some(folder) = ctx.shared_with(&req.folder, &peer) else {
        debug!(device = %peer, folder = %req.folder, "block request for a folder not shared with it");
        let _ = reply.send(BlockResponse::Refused);
        return;
    };
    if req.size > MAX_BLOCK_SIZE {
        let _ = reply.send(BlockResponse::Refused);
        return;
    }
    let Ok(path) = super::names::safe_join(&folder.path, &req.name) else {
        let _ = reply.send(BlockResponse::Refused);
        return;
    };
    tokio::task::spawn_blocking(move || {
        let resp = match read_at(&path, req.offset, req.size) {
            Some(d) => BlockResponse::Data(d),
            None => BlockResponse::NotFound,
        };
        let _ = reply.send(resp);
    });
}
