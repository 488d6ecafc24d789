//! The wire codecs of the three Ferry protocols, each one defensive about what it reads.
//!
//! Every message is read with a hard cap ([`crate::protocol`] limits): a peer that sends
//! more, or something that does not decode, is reported rather than trusted. How it is
//! reported depends on the direction, because `request_response` surfaces the two
//! differently:
//!
//! - an undecodable *request* becomes [`Msg::Invalid`] (the behaviour silently swallows
//!   read errors of inbound requests, so the event loop would otherwise never learn of
//!   them); the loop then closes that peer's connections;
//! - an undecodable *response* is an `io::Error` carrying [`Malformed`], which arrives as
//!   an outbound failure naming the peer; the loop closes that peer's connections too.
//!
//! Index and join messages are CBOR (via libp2p's cbor codec, fed from a buffer we have
//! already bounded). Block requests are a compact binary record and block responses are
//! a status byte followed by the raw data, so a 1 MiB block is never copied through a
//! self-describing encoding.

use std::{fmt, io, marker::PhantomData};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{request_response, StreamProtocol};
use serde::{de::DeserializeOwned, Serialize};

use crate::protocol::{
    BlockRequest, BlockResponse, MAX_BATCHED_BLOCK, MAX_BATCH_BLOCKS, MAX_BATCH_DATA,
    MAX_BATCH_REQUEST, MAX_BLOCK_REQUEST, MAX_BLOCK_SIZE,
};

/// A request as it came off the wire: decoded, or not, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Msg<T> {
    Valid(T),
    /// Read side: the bytes were oversized or undecodable; the string says why.
    /// Write side: the string's bytes are sent verbatim instead of an encoding. Only
    /// tests do that, to play a misbehaving peer.
    Invalid(String),
}

/// Marks an `io::Error` as "the peer sent a malformed message" (as opposed to a reset
/// stream or a closed connection), so the event loop can tell misbehaviour from bad luck.
#[derive(Debug)]
pub(crate) struct Malformed(pub String);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Malformed {}

fn malformed(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, Malformed(why))
}

/// The reason, if `e` says the peer sent a malformed message.
pub(crate) fn malformed_reason(e: &io::Error) -> Option<&str> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Malformed>())
        .map(|m| m.0.as_str())
}

/// Reads the whole stream (the sender closes its write side after one message), but never
/// more than `max` bytes: `Ok(Err(why))` when the peer sent more. The buffer grows by
/// doubling from `initial`, so small answers do not allocate the maximum.
async fn read_capped<T>(io: &mut T, max: u64, initial: usize) -> io::Result<Result<Vec<u8>, String>>
where
    T: AsyncRead + Unpin + Send,
{
    let limit = usize::try_from(max.saturating_add(1)).unwrap_or(usize::MAX);
    read_capped_into(io, max, vec![0u8; initial.min(limit).max(1)]).await
}

/// [`read_capped`] into `buf`, whose initialised length is the first read's room (at
/// least one byte).
async fn read_capped_into<T>(
    io: &mut T,
    max: u64,
    mut buf: Vec<u8>,
) -> io::Result<Result<Vec<u8>, String>>
where
    T: AsyncRead + Unpin + Send,
{
    // One byte beyond the cap tells "exactly max" from "too long" without reading on.
    let limit = usize::try_from(max.saturating_add(1)).unwrap_or(usize::MAX);
    if buf.is_empty() {
        buf.push(0);
    }
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            if buf.len() >= limit {
                return Ok(Err(format!("message larger than the {max}-byte limit")));
            }
            let grown = buf.len().saturating_mul(2).min(limit);
            buf.resize(grown, 0);
        }
        let n = io.read(&mut buf[filled..]).await?;
        if n == 0 {
            buf.truncate(filled);
            return Ok(Ok(buf));
        }
        filled += n;
    }
}

/// Reads a whole request of at most `max` bytes and decodes it; one that is oversized or
/// does not decode comes back as [`Msg::Invalid`] saying why.
async fn read_decoded<T, R>(
    io: &mut T,
    max: u64,
    initial: usize,
    what: &str,
    decode: fn(&[u8]) -> Result<R, String>,
) -> io::Result<Msg<R>>
where
    T: AsyncRead + Unpin + Send,
{
    Ok(match read_capped(io, max, initial).await? {
        Ok(bytes) => match decode(&bytes) {
            Ok(r) => Msg::Valid(r),
            Err(why) => Msg::Invalid(why),
        },
        Err(why) => Msg::Invalid(format!("{what} request: {why}")),
    })
}

/// A response stream that ends before its first byte is the peer declining to answer
/// (it dropped the request, e.g. because we are not paired with it): a plain failure,
/// not misbehaviour.
fn no_answer_if_empty(bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the stream without answering",
        ));
    }
    Ok(())
}

/// CBOR request/response codec with our own caps on both directions.
pub(crate) struct CborCodec<Req, Resp> {
    max_request: u64,
    max_response: u64,
    inner: request_response::cbor::codec::Codec<Req, Resp>,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> CborCodec<Req, Resp> {
    pub(crate) fn new(max_request: u64, max_response: u64) -> Self {
        Self {
            max_request,
            max_response,
            // The inner codec only ever decodes a buffer we already capped; its own caps
            // are set to the same values so they never disagree with ours.
            inner: request_response::cbor::codec::Codec::default()
                .set_request_size_maximum(max_request)
                .set_response_size_maximum(max_response),
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for CborCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self {
            max_request: self.max_request,
            max_response: self.max_response,
            inner: self.inner.clone(),
            _types: PhantomData,
        }
    }
}

/// Encodes `value` into a buffer with the inner codec so its size is checked before a
/// byte is sent: we never send what the peer would have to reject.
async fn encode_capped<F, Fut>(max: u64, what: &str, encode: F) -> io::Result<Vec<u8>>
where
    F: FnOnce(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = io::Result<Vec<u8>>>,
{
    let buf = encode(Vec::new()).await?;
    if buf.len() as u64 > max {
        return Err(io::Error::other(format!(
            "refusing to send a {} {what} (limit {max} bytes)",
            buf.len()
        )));
    }
    Ok(buf)
}

impl<Req, Resp> request_response::Codec for CborCodec<Req, Resp>
where
    Req: Send + Serialize + DeserializeOwned,
    Resp: Send + Serialize + DeserializeOwned,
{
    type Protocol = StreamProtocol;
    type Request = Msg<Req>;
    type Response = Resp;

    async fn read_request<T>(&mut self, p: &Self::Protocol, io: &mut T) -> io::Result<Msg<Req>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = match read_capped(io, self.max_request, 4096).await? {
            Ok(b) => b,
            Err(why) => return Ok(Msg::Invalid(format!("{p} request: {why}"))),
        };
        match self.inner.read_request(p, &mut bytes.as_slice()).await {
            Ok(req) => Ok(Msg::Valid(req)),
            Err(e) => Ok(Msg::Invalid(format!("{p} request does not decode: {e}"))),
        }
    }

    async fn read_response<T>(&mut self, p: &Self::Protocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_capped(io, self.max_response, 1024)
            .await?
            .map_err(|why| malformed(format!("{p} response: {why}")))?;
        no_answer_if_empty(&bytes)?;
        self.inner
            .read_response(p, &mut bytes.as_slice())
            .await
            .map_err(|e| malformed(format!("{p} response does not decode: {e}")))
    }

    async fn write_request<T>(
        &mut self,
        p: &Self::Protocol,
        io: &mut T,
        req: Msg<Req>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let buf = match req {
            Msg::Valid(req) => {
                let mut inner = self.inner.clone();
                encode_capped(self.max_request, "request", |mut b| async move {
                    inner.write_request(p, &mut b, req).await.map(|()| b)
                })
                .await?
            }
            Msg::Invalid(raw) => raw.into_bytes(),
        };
        io.write_all(&buf).await
    }

    async fn write_response<T>(
        &mut self,
        p: &Self::Protocol,
        io: &mut T,
        resp: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let mut inner = self.inner.clone();
        let buf = encode_capped(self.max_response, "response", |mut b| async move {
            inner.write_response(p, &mut b, resp).await.map(|()| b)
        })
        .await?;
        io.write_all(&buf).await
    }
}

/// The block protocol's codec. Request layout (big endian):
/// `u16 folder_len, folder, u16 name_len, name, u64 offset, u32 size, [u8; 32] hash`.
/// Response: one status byte ([`BlockResponse::STATUS_DATA`] and friends), then for
/// `Data` the block itself, up to [`MAX_BLOCK_SIZE`] bytes.
#[derive(Clone, Default)]
pub(crate) struct BlockCodec {
    /// The size asked for by the request written with this codec value. The handler
    /// clones the codec per stream and uses that clone to write the request and then
    /// read its response, so this is per request: the response buffer is allocated once
    /// at the right size, and data longer than asked for is rejected. `None` (if that
    /// ever changes): only the protocol limit applies.
    expected: Option<u32>,
    /// Tests only: append this many junk bytes to every data response, to play a peer
    /// that exceeds the response limit.
    #[cfg(test)]
    pub(crate) junk_after_data: usize,
}

pub(crate) fn encode_block_request(r: &BlockRequest) -> io::Result<Vec<u8>> {
    let folder = r.folder.as_bytes();
    let name = r.name.as_bytes();
    let len = 2 + folder.len() + 2 + name.len() + 8 + 4 + 32;
    if len as u64 > MAX_BLOCK_REQUEST {
        return Err(io::Error::other(format!(
            "refusing to send a {len}-byte block request (limit {MAX_BLOCK_REQUEST})"
        )));
    }
    let mut out = Vec::with_capacity(len);
    // Both lengths fit in u16: the whole request is at most 8 KiB.
    out.extend_from_slice(&(folder.len() as u16).to_be_bytes());
    out.extend_from_slice(folder);
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&r.offset.to_be_bytes());
    out.extend_from_slice(&r.size.to_be_bytes());
    out.extend_from_slice(&r.hash);
    Ok(out)
}

/// Strict decoding: every length checked, valid UTF-8, nothing left over, and no block
/// larger than the chunker can produce.
pub(crate) fn decode_block_request(b: &[u8]) -> Result<BlockRequest, String> {
    struct Cur<'a>(&'a [u8]);
    impl<'a> Cur<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err("block request truncated".into());
            }
            let (head, tail) = self.0.split_at(n);
            self.0 = tail;
            Ok(head)
        }
        fn string(&mut self, what: &str) -> Result<String, String> {
            let len = u16::from_be_bytes([self.take(1)?[0], self.take(1)?[0]]) as usize;
            let raw = self.take(len)?;
            String::from_utf8(raw.to_vec())
                .map_err(|_| format!("block request {what} is not UTF-8"))
        }
    }
    let mut c = Cur(b);
    let folder = c.string("folder")?;
    let name = c.string("name")?;
    let mut u64b = [0u8; 8];
    u64b.copy_from_slice(c.take(8)?);
    let mut u32b = [0u8; 4];
    u32b.copy_from_slice(c.take(4)?);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(c.take(32)?);
    if !c.0.is_empty() {
        return Err(format!("{} stray bytes after the block request", c.0.len()));
    }
    let size = u32::from_be_bytes(u32b);
    if size > MAX_BLOCK_SIZE {
        return Err(format!(
            "block request for {size} bytes (limit {MAX_BLOCK_SIZE})"
        ));
    }
    Ok(BlockRequest {
        folder,
        name,
        offset: u64::from_be_bytes(u64b),
        size,
        hash,
    })
}

/// Reads a block response: the status byte, then for data at most `max` bytes (what was
/// asked for, else [`MAX_BLOCK_SIZE`]); anything after a bodiless status is malformed.
async fn read_block_response<T>(io: &mut T, expected: Option<u32>) -> io::Result<BlockResponse>
where
    T: AsyncRead + Unpin + Send,
{
    let mut status = [0u8; 1];
    if io.read(&mut status).await? == 0 {
        no_answer_if_empty(&[])?;
    }
    match status[0] {
        BlockResponse::STATUS_DATA => {
            let max = expected.unwrap_or(MAX_BLOCK_SIZE).min(MAX_BLOCK_SIZE);
            // One spare byte so the end of the stream is seen without growing the buffer.
            // The buffer comes from the pool the puller returns it to once written.
            let initial = expected.map_or(256 * 1024, |n| n as usize + 1);
            let initial = initial.min(max as usize + 1);
            let buf = crate::bufpool::take_filled(initial);
            match read_capped_into(io, u64::from(max), buf).await? {
                Ok(data) => Ok(BlockResponse::Data(data)),
                Err(_) => Err(malformed(format!(
                    "block response longer than the {max} bytes asked for"
                ))),
            }
        }
        s @ (BlockResponse::STATUS_NOT_FOUND | BlockResponse::STATUS_REFUSED) => {
            if read_capped(io, 0, 1).await?.is_err() {
                return Err(malformed(format!(
                    "stray bytes after block response status {s}"
                )));
            }
            Ok(if s == BlockResponse::STATUS_NOT_FOUND {
                BlockResponse::NotFound
            } else {
                BlockResponse::Refused
            })
        }
        other => Err(malformed(format!("unknown block response status {other}"))),
    }
}

impl request_response::Codec for BlockCodec {
    type Protocol = StreamProtocol;
    type Request = Msg<BlockRequest>;
    type Response = BlockResponse;

    async fn read_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
    ) -> io::Result<Msg<BlockRequest>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_decoded(io, MAX_BLOCK_REQUEST, 512, "block", decode_block_request).await
    }

    async fn read_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
    ) -> io::Result<BlockResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_block_response(io, self.expected).await
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        req: Msg<BlockRequest>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let buf = match req {
            Msg::Valid(r) => {
                self.expected = Some(r.size);
                encode_block_request(&r)?
            }
            Msg::Invalid(raw) => raw.into_bytes(),
        };
        io.write_all(&buf).await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        resp: BlockResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match resp {
            BlockResponse::Data(data) => {
                if data.len() > MAX_BLOCK_SIZE as usize {
                    return Err(io::Error::other(format!(
                        "refusing to send a {}-byte block (limit {MAX_BLOCK_SIZE})",
                        data.len()
                    )));
                }
                // Two writes rather than one copy of up to 1 MiB into a fresh buffer.
                io.write_all(&[BlockResponse::STATUS_DATA]).await?;
                io.write_all(&data).await?;
                crate::bufpool::give(data);
                #[cfg(test)]
                if self.junk_after_data > 0 {
                    io.write_all(&vec![0xA5; self.junk_after_data]).await?;
                }
                Ok(())
            }
            BlockResponse::NotFound => io.write_all(&[BlockResponse::STATUS_NOT_FOUND]).await,
            BlockResponse::Refused => io.write_all(&[BlockResponse::STATUS_REFUSED]).await,
        }
    }
}

/// The batched block protocol's codec. Request (big endian): `u16 count`, then per block
/// `u16 len` and a [`BlockCodec`] request of that length; at most [`MAX_BATCH_BLOCKS`],
/// each at most [`MAX_BATCHED_BLOCK`], together at most [`MAX_BATCH_DATA`]. Response: per
/// block, in request order, a status byte and for `Data` a `u32 len` and the data (no
/// longer than asked for); nothing after the last.
#[derive(Clone, Default)]
pub(crate) struct BatchCodec {
    /// The sizes asked for by the request written with this codec value (the handler
    /// clones the codec per stream, as for [`BlockCodec::expected`]).
    expected: Vec<u32>,
}

pub(crate) fn encode_batch_request(reqs: &[BlockRequest]) -> io::Result<Vec<u8>> {
    check_batch(reqs).map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(2 + reqs.len() * 96);
    out.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        let one = encode_block_request(r)?;
        // One request is at most MAX_BLOCK_REQUEST (8 KiB): its length fits in u16.
        out.extend_from_slice(&(one.len() as u16).to_be_bytes());
        out.extend_from_slice(&one);
    }
    if out.len() as u64 > MAX_BATCH_REQUEST {
        return Err(io::Error::other(format!(
            "refusing to send a {}-byte batch request (limit {MAX_BATCH_REQUEST})",
            out.len()
        )));
    }
    Ok(out)
}

/// The limits every batch keeps, checked by the sender before sending and the receiver
/// after decoding.
pub(crate) fn check_batch(reqs: &[BlockRequest]) -> Result<(), String> {
    if reqs.is_empty() || reqs.len() > MAX_BATCH_BLOCKS {
        return Err(format!(
            "batch of {} blocks (1 to {MAX_BATCH_BLOCKS} allowed)",
            reqs.len()
        ));
    }
    if let Some(r) = reqs.iter().find(|r| r.size > MAX_BATCHED_BLOCK) {
        return Err(format!(
            "batched block of {} bytes (limit {MAX_BATCHED_BLOCK})",
            r.size
        ));
    }
    let total: u64 = reqs.iter().map(|r| u64::from(r.size)).sum();
    if total > MAX_BATCH_DATA {
        return Err(format!(
            "batch asks for {total} bytes (limit {MAX_BATCH_DATA})"
        ));
    }
    Ok(())
}

pub(crate) fn decode_batch_request(b: &[u8]) -> Result<Vec<BlockRequest>, String> {
    let (count, mut rest) = split_u16(b).ok_or("batch request truncated")?;
    let mut reqs = Vec::with_capacity(usize::from(count).min(MAX_BATCH_BLOCKS));
    for _ in 0..count {
        let (len, tail) = split_u16(rest).ok_or("batch request truncated")?;
        let len = usize::from(len);
        if tail.len() < len {
            return Err("batch request truncated".into());
        }
        reqs.push(decode_block_request(&tail[..len])?);
        rest = &tail[len..];
        if reqs.len() > MAX_BATCH_BLOCKS {
            break;
        }
    }
    check_batch(&reqs)?;
    if !rest.is_empty() {
        return Err(format!(
            "{} stray bytes after the batch request",
            rest.len()
        ));
    }
    Ok(reqs)
}

fn split_u16(b: &[u8]) -> Option<(u16, &[u8])> {
    let (head, tail) = b.split_first_chunk::<2>()?;
    Some((u16::from_be_bytes(*head), tail))
}

/// Builds a whole batch response in one buffer (at most [`MAX_BATCH_DATA`] plus a few
/// bytes per block), so it goes out in a few large frames rather than one per block.
pub(crate) fn encode_batch_response(resps: &[BlockResponse]) -> io::Result<Vec<u8>> {
    let data: usize = resps
        .iter()
        .map(|r| match r {
            BlockResponse::Data(d) => d.len(),
            _ => 0,
        })
        .sum();
    if data as u64 > MAX_BATCH_DATA {
        return Err(io::Error::other(format!(
            "refusing to send a batch of {data} bytes (limit {MAX_BATCH_DATA})"
        )));
    }
    let mut out = Vec::with_capacity(data + resps.len() * 5);
    for r in resps {
        match r {
            BlockResponse::Data(d) => {
                out.push(BlockResponse::STATUS_DATA);
                out.extend_from_slice(&(d.len() as u32).to_be_bytes());
                out.extend_from_slice(d);
            }
            BlockResponse::NotFound => out.push(BlockResponse::STATUS_NOT_FOUND),
            BlockResponse::Refused => out.push(BlockResponse::STATUS_REFUSED),
        }
    }
    Ok(out)
}

/// Reads a batch response: exactly one answer per size in `expected`, data no longer
/// than asked for, then the end of the stream.
async fn read_batch_response<T>(io: &mut T, expected: &[u32]) -> io::Result<Vec<BlockResponse>>
where
    T: AsyncRead + Unpin + Send,
{
    let max: u64 = expected.iter().map(|&n| u64::from(n) + 5).sum();
    let bytes = read_capped(io, max, max.min(64 * 1024) as usize)
        .await?
        .map_err(|why| malformed(format!("batch response: {why}")))?;
    no_answer_if_empty(&bytes)?;
    let mut rest = bytes.as_slice();
    let mut out = Vec::with_capacity(expected.len());
    for &asked in expected {
        let Some((&status, tail)) = rest.split_first() else {
            return Err(malformed(format!(
                "batch response has {} of {} answers",
                out.len(),
                expected.len()
            )));
        };
        rest = tail;
        out.push(match status {
            BlockResponse::STATUS_DATA => {
                let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                    return Err(malformed("batch response truncated".into()));
                };
                let len = u32::from_be_bytes(*len);
                if len > asked || tail.len() < len as usize {
                    return Err(malformed(format!(
                        "batch response holds {len} bytes for a block of {asked}"
                    )));
                }
                let (data, tail) = tail.split_at(len as usize);
                rest = tail;
                BlockResponse::Data(data.to_vec())
            }
            BlockResponse::STATUS_NOT_FOUND => BlockResponse::NotFound,
            BlockResponse::STATUS_REFUSED => BlockResponse::Refused,
            other => return Err(malformed(format!("unknown block response status {other}"))),
        });
    }
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} stray bytes after the batch response",
            rest.len()
        )));
    }
    Ok(out)
}

impl request_response::Codec for BatchCodec {
    type Protocol = StreamProtocol;
    type Request = Msg<Vec<BlockRequest>>;
    type Response = Vec<BlockResponse>;

    async fn read_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
    ) -> io::Result<Msg<Vec<BlockRequest>>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_decoded(io, MAX_BATCH_REQUEST, 4096, "batch", decode_batch_request).await
    }

    async fn read_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
    ) -> io::Result<Vec<BlockResponse>>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_batch_response(io, &self.expected).await
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        req: Msg<Vec<BlockRequest>>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let buf = match req {
            Msg::Valid(reqs) => {
                self.expected = reqs.iter().map(|r| r.size).collect();
                encode_batch_request(&reqs)?
            }
            Msg::Invalid(raw) => raw.into_bytes(),
        };
        io.write_all(&buf).await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        resps: Vec<BlockResponse>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&encode_batch_response(&resps)?).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::IndexRequest;
    use libp2p::request_response::Codec as _;

    fn sample() -> BlockRequest {
        BlockRequest {
            folder: "docs".into(),
            name: "a/b/ünï.txt".into(),
            offset: 1 << 40,
            size: MAX_BLOCK_SIZE,
            hash: [7; 32],
        }
    }

    #[test]
    fn block_request_round_trips_and_rejects_damage() {
        let r = sample();
        let b = encode_block_request(&r).unwrap();
        assert_eq!(decode_block_request(&b).unwrap(), r);
        for cut in 0..b.len() {
            assert!(
                decode_block_request(&b[..cut]).is_err(),
                "truncated at {cut}"
            );
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode_block_request(&long).is_err());
        let big = BlockRequest {
            size: MAX_BLOCK_SIZE + 1,
            ..r.clone()
        };
        assert!(decode_block_request(&encode_block_request(&big).unwrap()).is_err());
        let huge = BlockRequest {
            name: "x".repeat(9000),
            ..r
        };
        assert!(encode_block_request(&huge).is_err());
    }

    async fn read_resp(bytes: &[u8], expected: Option<u32>) -> io::Result<BlockResponse> {
        read_block_response(&mut &bytes[..], expected).await
    }

    #[tokio::test]
    async fn block_responses_decode_strictly() {
        let data = |v: &[u8]| BlockResponse::Data(v.to_vec());
        assert_eq!(read_resp(&[0, 1, 2], Some(2)).await.unwrap(), data(&[1, 2]));
        assert_eq!(read_resp(&[0, 1, 2], None).await.unwrap(), data(&[1, 2]));
        assert_eq!(read_resp(&[0], Some(0)).await.unwrap(), data(&[]));
        assert_eq!(
            read_resp(&[1], Some(5)).await.unwrap(),
            BlockResponse::NotFound
        );
        assert_eq!(
            read_resp(&[2], Some(5)).await.unwrap(),
            BlockResponse::Refused
        );
        // An empty stream is "no answer", not misbehaviour.
        let e = read_resp(&[], Some(5)).await.unwrap_err();
        assert!(malformed_reason(&e).is_none());
        for bad in [&[1u8, 0][..], &[9], &[0, 1, 2, 3]] {
            let e = read_resp(bad, Some(2)).await.unwrap_err();
            assert!(malformed_reason(&e).is_some(), "{bad:?}");
        }
        let mut over = vec![0u8; MAX_BLOCK_SIZE as usize + 2];
        let e = read_resp(&over, None).await.unwrap_err();
        assert!(malformed_reason(&e).is_some());
        over.pop();
        assert!(read_resp(&over, None).await.is_ok());
        assert!(read_resp(&over, Some(MAX_BLOCK_SIZE)).await.is_ok());
    }

    fn small(name: &str, size: u32) -> BlockRequest {
        BlockRequest {
            folder: "docs".into(),
            name: name.into(),
            offset: 0,
            size,
            hash: [3; 32],
        }
    }

    #[test]
    fn batch_requests_round_trip_and_keep_their_limits() {
        let reqs: Vec<_> = (0..3).map(|i| small(&format!("d/{i}"), 4096)).collect();
        let b = encode_batch_request(&reqs).unwrap();
        assert_eq!(decode_batch_request(&b).unwrap(), reqs);
        for cut in 0..b.len() {
            assert!(decode_batch_request(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(decode_batch_request(&long).is_err());
        // Empty, too many, a block too big, too much data in all: refused both ways.
        let too_many: Vec<_> = (0..=MAX_BATCH_BLOCKS).map(|_| small("x", 1)).collect();
        let too_big = vec![small("x", MAX_BATCHED_BLOCK + 1)];
        let too_much: Vec<_> = (0..=MAX_BATCH_DATA / u64::from(MAX_BATCHED_BLOCK))
            .map(|_| small("x", MAX_BATCHED_BLOCK))
            .collect();
        for bad in [vec![], too_many, too_big, too_much] {
            assert!(encode_batch_request(&bad).is_err(), "{} blocks", bad.len());
            // Hand-encoded, as a peer ignoring the limits would send it.
            let mut raw = (bad.len() as u16).to_be_bytes().to_vec();
            for r in &bad {
                let one = encode_block_request(r).unwrap();
                raw.extend_from_slice(&(one.len() as u16).to_be_bytes());
                raw.extend_from_slice(&one);
            }
            assert!(decode_batch_request(&raw).is_err(), "{} blocks", bad.len());
        }
    }

    #[tokio::test]
    async fn batch_responses_decode_strictly() {
        let resps = vec![
            BlockResponse::Data(vec![1, 2, 3]),
            BlockResponse::NotFound,
            BlockResponse::Data(vec![]),
            BlockResponse::Refused,
        ];
        let expected = [3, 9, 4, 2];
        let b = encode_batch_response(&resps).unwrap();
        assert_eq!(
            read_batch_response(&mut &b[..], &expected).await.unwrap(),
            resps
        );
        // Truncated anywhere, or with bytes after the last answer: malformed.
        for cut in 1..b.len() {
            let e = read_batch_response(&mut &b[..cut], &expected)
                .await
                .unwrap_err();
            assert!(malformed_reason(&e).is_some(), "cut at {cut}");
        }
        let mut long = b.clone();
        long.push(1);
        let e = read_batch_response(&mut &long[..], &expected)
            .await
            .unwrap_err();
        assert!(malformed_reason(&e).is_some());
        // More data than asked for, an unknown status: malformed.
        let e = read_batch_response(&mut &b[..], &[2, 9, 4, 2])
            .await
            .unwrap_err();
        assert!(malformed_reason(&e).is_some());
        let e = read_batch_response(&mut &[7u8][..], &[1])
            .await
            .unwrap_err();
        assert!(malformed_reason(&e).is_some());
        // Nothing at all is the peer declining, not misbehaviour.
        let e = read_batch_response(&mut &[][..], &[1]).await.unwrap_err();
        assert!(malformed_reason(&e).is_none());
    }

    #[tokio::test]
    async fn read_capped_tells_exact_from_too_long() {
        let data = vec![1u8; 1000];
        let got = read_capped(&mut data.as_slice(), 1000, 16).await.unwrap();
        assert_eq!(got.unwrap().len(), 1000);
        let got = read_capped(&mut data.as_slice(), 999, 16).await.unwrap();
        assert!(got.is_err());
        let got = read_capped(&mut [].as_slice(), 10, 16).await.unwrap();
        assert_eq!(got.unwrap(), Vec::<u8>::new());
    }

    #[tokio::test]
    async fn cbor_codec_caps_and_flags_garbage() {
        let p = StreamProtocol::new(crate::protocol::INDEX_PROTOCOL);
        let mut c: CborCodec<IndexRequest, crate::protocol::IndexResponse> = CborCodec::new(64, 64);
        let req = IndexRequest::ClusterConfig {
            device_name: "a".into(),
            folders: vec![],
        };
        let mut buf = Vec::new();
        c.write_request(&p, &mut buf, Msg::Valid(req.clone()))
            .await
            .unwrap();
        assert_eq!(
            c.read_request(&p, &mut buf.as_slice()).await.unwrap(),
            Msg::Valid(req)
        );
        let garbage = [0xffu8, 0x00, 0x13];
        assert!(matches!(
            c.read_request(&p, &mut garbage.as_slice()).await.unwrap(),
            Msg::Invalid(_)
        ));
        let long = vec![0u8; 65];
        assert!(matches!(
            c.read_request(&p, &mut long.as_slice()).await.unwrap(),
            Msg::Invalid(_)
        ));
        let big = IndexRequest::ClusterConfig {
            device_name: "a".repeat(100),
            folders: vec![],
        };
        assert!(c
            .write_request(&p, &mut Vec::new(), Msg::Valid(big))
            .await
            .is_err());
        let err = c
            .read_response(&p, &mut garbage.as_slice())
            .await
            .unwrap_err();
        assert!(malformed_reason(&err).is_some());
    }
}
