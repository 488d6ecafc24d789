//! Where the puller's blocks come from: local data first, peers second.
//!
//! A block whose hash any local file has (a rename, a copy, the unchanged part of an
//! edited file) is read from disk and verified; otherwise it is requested from a
//! connected device that announced the needed version, spreading requests over devices
//! by block offset. A device that answers with data of the wrong hash is not asked again
//! for this file. The puller verifies every block again before writing it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tracing::warn;

use super::puller::BlockSource;
use super::Ctx;
use crate::error::{Error, Result};
use crate::protocol::{BlockRequest, BlockResponse};
use crate::types::{Block, DeviceId};

pub struct FolderSource {
    ctx: Ctx,
    folder: String,
    name: String,
    devices: Vec<DeviceId>,
    /// Devices that sent bad data for this file.
    bad: Mutex<HashSet<DeviceId>>,
    /// When given: the only hashes some local file has (looked up for a whole round at
    /// once); the index is not asked about the others.
    known: Option<Arc<HashSet<[u8; 32]>>>,
    /// The blocks of the file's own local record (see [`BlockSource::base_blocks`]).
    base: Vec<Block>,
}

impl FolderSource {
    pub fn new(ctx: Ctx, folder: &str, name: &str, devices: Vec<DeviceId>) -> Self {
        FolderSource {
            ctx,
            folder: folder.to_string(),
            name: name.to_string(),
            devices,
            bad: Mutex::new(HashSet::new()),
            known: None,
            base: Vec::new(),
        }
    }

    /// The blocks the file at this name held when last recorded locally.
    pub fn with_base(mut self, blocks: Vec<Block>) -> Self {
        self.base = blocks;
        self
    }

    /// Only the hashes in `known` are looked for locally.
    pub fn with_known(mut self, known: Option<Arc<HashSet<[u8; 32]>>>) -> Self {
        self.known = known;
        self
    }

    async fn local(&self, block: &Block) -> Option<Vec<u8>> {
        if self
            .known
            .as_ref()
            .is_some_and(|k| !k.contains(&block.hash))
        {
            return None;
        }
        let locs = self.ctx.index.find_block(block.hash).await.ok()?;
        for loc in locs.into_iter().take(4) {
            let Some(root) = self.ctx.folder_config(&loc.folder).map(|f| f.path) else {
                continue;
            };
            let Ok(path) = super::names::safe_join(&root, &loc.name) else {
                continue;
            };
            let (offset, size, hash) = (loc.offset, loc.size, block.hash);
            let got =
                tokio::task::spawn_blocking(move || read_verified(&path, offset, size, &hash))
                    .await
                    .ok()
                    .flatten();
            if got.is_some() {
                return got;
            }
        }
        None
    }

    async fn remote(&self, block: &Block) -> Result<Vec<u8>> {
        let candidates: Vec<DeviceId> = {
            let bad = self.bad.lock().map(|b| b.clone()).unwrap_or_default();
            self.devices
                .iter()
                .filter(|d| !bad.contains(d) && self.ctx.is_connected(d))
                .copied()
                .collect()
        };
        if candidates.is_empty() {
            return Err(Error::Folder {
                folder: self.folder.clone(),
                msg: format!("{}: no connected device has the needed version", self.name),
            });
        }
        // Spread blocks over devices: start at a device chosen by the block's position.
        let start = (block.offset / (256 * 1024)) as usize % candidates.len();
        let mut last_err = None;
        for i in 0..candidates.len() {
            let dev = candidates[(start + i) % candidates.len()];
            let req = BlockRequest {
                folder: self.folder.clone(),
                name: self.name.clone(),
                offset: block.offset,
                size: block.size,
                hash: block.hash,
            };
            match self.ctx.net.request_block(dev, req).await {
                Ok(BlockResponse::Data(d)) => {
                    if d.len() == block.size as usize && blake3::hash(&d).as_bytes() == &block.hash
                    {
                        return Ok(d);
                    }
                    warn!(folder = %self.folder, file = %self.name, device = %dev, "block from this device does not match its hash (changed there since it was announced, or corrupt); not asking it again for this file");
                    if let Ok(mut b) = self.bad.lock() {
                        b.insert(dev);
                    }
                    last_err = Some(format!("{dev} sent bad data"));
                }
                Ok(other) => last_err = Some(format!("{dev}: {other:?}")),
                Err(e) => last_err = Some(format!("{dev}: {e}")),
            }
        }
        Err(Error::Folder {
            folder: self.folder.clone(),
            msg: format!(
                "{}: block at {} unavailable ({})",
                self.name,
                block.offset,
                last_err.unwrap_or_default()
            ),
        })
    }
}

impl BlockSource for FolderSource {
    /// Local blocks come through `read_verified`, remote ones are hashed on arrival (to
    /// stop asking a device that sends bad data): every block is already verified.
    fn verifies(&self) -> bool {
        true
    }

    fn base_blocks(&self) -> &[Block] {
        &self.base
    }

    fn fetch(&self, block: &Block) -> BoxFuture<'_, Result<Vec<u8>>> {
        let block = *block;
        Box::pin(async move {
            if let Some(d) = self.local(&block).await {
                return Ok(d);
            }
            self.remote(&block).await
        })
    }
}

/// Reads `size` bytes at `offset` of `path` and returns them only if they hash to `hash`.
pub fn read_verified(path: &Path, offset: u64, size: u32, hash: &[u8; 32]) -> Option<Vec<u8>> {
    let buf = read_at(path, offset, size)?;
    (blake3::hash(&buf).as_bytes() == hash).then_some(buf)
}

/// Reads exactly `size` bytes at `offset` of `path` (None if the file is shorter).
pub fn read_at(path: &Path, offset: u64, size: u32) -> Option<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; size as usize];
    f.read_exact_at(&mut buf, offset).ok()?;
    Some(buf)
}
