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

/// Reads exactly `size` bytes at `offset` of `path` (None if the file is shorter). A
/// symlink at `path` is not followed: its target may be anywhere.
pub fn read_at(path: &Path, offset: u64, size: u32) -> Option<Vec<u8>> {
    read_file_at(&crate::fsutil::open_no_follow(path).ok()?, offset, size)
}

/// Reads exactly `size` bytes at `offset` of the open file `f` (None if it is shorter).
pub fn read_file_at(f: &std::fs::File, offset: u64, size: u32) -> Option<Vec<u8>> {
    pread_exact(f, offset, size, 0)
}

/// Like [`read_file_at`], but only when every byte is in the page cache already: a read
/// that would wait for the disk gives up at once (`RWF_NOWAIT`) and returns `None`, as does
/// any other failure, for the caller to read on a blocking thread instead. Lets the
/// responder answer from its async task without a hand-off to the blocking pool and back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn read_file_cached(f: &std::fs::File, offset: u64, size: u32) -> Option<Vec<u8>> {
    pread_exact(f, offset, size, libc::RWF_NOWAIT)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn read_file_cached(_f: &std::fs::File, _offset: u64, _size: u32) -> Option<Vec<u8>> {
    None
}

/// Reads exactly `size` bytes at `offset` into a pooled buffer that is not zeroed first (a
/// block is up to 1 MiB, and the read overwrites all of it). `None` if the file is
/// shorter or a read fails (with `RWF_NOWAIT`: would wait for the disk).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn pread_exact(f: &std::fs::File, offset: u64, size: u32, flags: libc::c_int) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let size = size as usize;
    let mut buf = crate::bufpool::take_empty(size);
    let mut done = 0usize;
    while done < size {
        let at = libc::off_t::try_from(offset + done as u64).ok()?;
        let iov = libc::iovec {
            // SAFETY: `done < size <= capacity`, so the pointer stays inside the allocation.
            iov_base: unsafe { buf.as_mut_ptr().add(done) }.cast(),
            iov_len: size - done,
        };
        // SAFETY: one iovec over the unfilled spare capacity of our own buffer, on a
        // descriptor we own; the kernel writes at most `iov_len` bytes there.
        let n = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, at, flags) };
        if n <= 0 {
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return None; // not cached (EAGAIN), the file is shorter (0), or an error
        }
        done += n as usize;
    }
    // SAFETY: the reads above initialised exactly `size` bytes.
    unsafe { buf.set_len(size) };
    Some(buf)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn pread_exact(f: &std::fs::File, offset: u64, size: u32, _flags: i32) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; size as usize];
    std::os::unix::fs::FileExt::read_exact_at(f, &mut buf, offset).ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_read_gives_the_bytes_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        // Just written, so in the page cache.
        let f = std::fs::File::open(&p).unwrap();
        let got = read_file_cached(&f, 1000, 200_000);
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert_eq!(got.as_deref(), Some(&data[1000..201_000]));
        } else {
            assert!(got.is_none());
        }
        assert_eq!(read_at(&p, 1000, 200_000).unwrap(), &data[1000..201_000]);
        // Past the end, or no such file: nothing, never short data.
        assert!(read_file_cached(&f, 250_000, 100_000).is_none());
        assert!(read_file_at(&f, 250_000, 100_000).is_none());
        assert!(read_at(&dir.path().join("missing"), 0, 10).is_none());
    }
}
