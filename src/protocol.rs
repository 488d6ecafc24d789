//! The wire messages between two Ferry devices, and their limits.
//!
//! Goals, in order: be paranoid about data integrity (every block is verified by its
//! BLAKE3 hash on arrival, never trusted), bound everything (each message has a maximum
//! encoded size; a peer that exceeds it is disconnected), and keep the common path cheap
//! (block data travels as raw bytes, not inside a self-describing encoding).
//!
//! Three request/response protocols, each versioned so a later format can live beside it:
//!
//! - `/ferry/index/1`: [`IndexRequest`] → [`IndexResponse`]. Folder offers (cluster
//!   config) on connect and on config change; then index batches, resumed from the last
//!   sequence the receiver said it has.
//! - `/ferry/block/1`: [`BlockRequest`] → [`BlockResponse`] (raw, length-prefixed).
//! - `/ferry/blocks/1`: many small [`BlockRequest`]s → as many [`BlockResponse`]s, in
//!   order, in one stream. Small files are one block each; asking for them one stream
//!   apiece made the stream setup, not the data, the cost of syncing many small files.
//!   A peer that does not speak it is asked block by block instead.
//! - `/ferry/join/1`: [`JoinRequest`] → [`JoinResponse`], the one-step invite pairing.
//!
//! Beside them, blocks larger than [`MAX_BATCHED_BLOCK`] travel on a block lane when the
//! two devices have one: a TCP + TLS connection of its own on the same port, outside
//! libp2p's muxer, with the same [`BlockRequest`] encoding (see `net::lane`). A device
//! without lanes is asked with `/ferry/block/1`.
//!
//! Encoding: index and join messages are CBOR (serde); block responses are a status byte
//! followed by the data. This module only defines types and limits; `net` moves them.

use serde::{Deserialize, Serialize};

use crate::types::{FileInfo, FolderId};

pub const INDEX_PROTOCOL: &str = "/ferry/index/1";
pub const BLOCK_PROTOCOL: &str = "/ferry/block/1";
pub const JOIN_PROTOCOL: &str = "/ferry/join/1";
pub const BLOCKS_PROTOCOL: &str = "/ferry/blocks/1";

/// Largest encoded index request. Index batches are cut well below this
/// ([`MAX_INDEX_BATCH_RECORDS`]); a file with 1 MiB max chunks and 40 bytes per block
/// record needs 4 MiB of block list only when it is ~100 GiB.
pub const MAX_INDEX_MESSAGE: u64 = 16 * 1024 * 1024;
/// Records per index batch sent to a peer.
pub const MAX_INDEX_BATCH_RECORDS: usize = 1000;
/// Largest block anyone may ask for: the FastCDC maximum chunk size.
pub const MAX_BLOCK_SIZE: u32 = 1024 * 1024;
/// Block requests are tiny; anything bigger is malformed.
pub const MAX_BLOCK_REQUEST: u64 = 8 * 1024;
/// A block response: status byte + data.
pub const MAX_BLOCK_RESPONSE: u64 = MAX_BLOCK_SIZE as u64 + 1;
/// Blocks in one batch request.
pub const MAX_BATCH_BLOCKS: usize = 256;
/// Only blocks up to this size travel in batches: below the chunker's minimum, so a
/// batched block is a whole small file or the tail of a bigger one.
pub const MAX_BATCHED_BLOCK: u32 = 64 * 1024;
/// The sizes asked for in one batch add up to at most this (a batch response is built
/// and read whole, so this bounds the memory one batch takes on either side).
pub const MAX_BATCH_DATA: u64 = 1024 * 1024;
/// An encoded batch request: a count, then each request with its length.
pub const MAX_BATCH_REQUEST: u64 = 512 * 1024;
/// Join messages are small.
pub const MAX_JOIN_MESSAGE: u64 = 64 * 1024;

/// One folder as offered to a peer in a cluster config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderOffer {
    pub id: FolderId,
    pub label: String,
    /// The sender's index ID for this folder; changes when its database is rebuilt.
    pub index_id: u64,
    /// The index ID of the receiver's index that the sender holds records of (0 = none).
    pub peer_index_id: u64,
    /// The highest sequence of the receiver's index that the sender holds; the receiver
    /// sends only records above it (or everything, if `peer_index_id` is stale).
    pub peer_max_sequence: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexRequest {
    /// "These are the folders I share with you, and where I am in your index."
    ClusterConfig {
        device_name: String,
        folders: Vec<FolderOffer>,
    },
    /// Records of the sender's index for one folder, in sequence order.
    IndexUpdate {
        folder: FolderId,
        index_id: u64,
        records: Vec<FileInfo>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IndexResponse {
    Ok,
    /// The message was understood but refused (e.g. folder not shared with the sender).
    Refused(String),
}

/// Asks for `size` bytes at `offset` of `name` in `folder`, which should hash to `hash`.
/// The responder reads from disk and checks the hash before answering, so a file that
/// changed under it answers `NotFound` rather than wrong data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRequest {
    pub folder: FolderId,
    pub name: String,
    pub offset: u64,
    pub size: u32,
    pub hash: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockResponse {
    Data(Vec<u8>),
    NotFound,
    /// Folder not shared with the requester, bad name, or similar.
    Refused,
}

impl BlockResponse {
    pub const STATUS_DATA: u8 = 0;
    pub const STATUS_NOT_FOUND: u8 = 1;
    pub const STATUS_REFUSED: u8 = 2;
}

/// Sent by the joining device to the inviter: proves knowledge of the invite secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The one-time secret from the invite (32 random bytes).
    pub secret: Vec<u8>,
    pub device_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinResponse {
    /// Accepted: the inviter has added the joiner; the folder (if any) is shared with it.
    Accepted {
        device_name: String,
        folder: Option<(FolderId, String)>,
    },
    Refused(String),
}
