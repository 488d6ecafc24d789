//! The block lane: large blocks on a TLS connection of their own, beside libp2p.
//!
//! Why: every block asked through libp2p goes through the network loop, a request-response
//! substream, Yamux's frames (each body copied on write and again on read) and
//! [`super::coalesce::Coalesce`]. Moving 1 GiB that way costs both ends together 1.1–1.6
//! CPU-s on this 2-core host; on a lane, 0.6–0.9 (`FERRY_BENCH_NET=tcp cargo bench --bench
//! net`, with and without `FERRY_BENCH_LANES=0`; BENCHMARKS.md, "The block lane
//! (`24d2115`)"). Large files are CPU-bound on such a host, so this is their transfer time.
//!
//! How: when a paired device connects over direct TCP, each side dials a lane to the
//! other's TCP listen address — the port libp2p listens on. The dialer sends [`MAGIC`]
//! before anything else; the listener's transport looks at the first byte of every
//! incoming connection ([`divert`]) and hands a lane to [`Lanes::accept`] instead of to
//! libp2p (whose connections start with multistream-select's `0x13`). Then TLS 1.3 with
//! the device certificates, as for libp2p's own connections: both sides prove their
//! PeerId, and a device that is not paired is refused.
//!
//! A lane carries one direction: its dialer asks, its acceptor answers. Requests are
//! `id: u32, len: u16, request` (the `/ferry/block/1` encoding); answers come in any
//! order as `id: u32, status: u8, len: u32, data`. Blocks of [`MAX_BATCHED_BLOCK`] bytes
//! or less still travel in libp2p's batches. A request whose lane closes before it is
//! answered is handed back and asked through libp2p ([`super::NetHandle::request_block`]);
//! a device without a lane (an older Ferry, a relayed or QUIC-only connection, a port
//! that cannot be reached) is asked through libp2p alone. Lane bytes count in the same
//! per-device figures as libp2p's.
//!
//! [`MAX_BATCHED_BLOCK`]: crate::protocol::MAX_BATCHED_BLOCK

use std::{
    collections::{HashMap, HashSet},
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::{
    io::{ReadHalf, WriteHalf},
    stream::FuturesUnordered,
    AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt, StreamExt,
};
use libp2p::{core::ConnectedPoint, multiaddr::Protocol, Multiaddr, PeerId};
use tokio::{
    io::AsyncWriteExt as _,
    sync::{mpsc, oneshot},
    task::AbortHandle,
};

use super::{
    codec::{decode_block_request, encode_block_request},
    counting::{Traffic, TrafficTable},
    secure::LaneTls,
    NetEvent,
};
use crate::{
    protocol::{BlockRequest, BlockResponse, MAX_BLOCK_REQUEST, MAX_BLOCK_SIZE},
    types::DeviceId,
};

/// What a lane's dialer sends first. Its first byte can never start a libp2p connection
/// (multistream-select's first message is 19 bytes long, so it starts with `0x13`).
pub(crate) const MAGIC: &[u8] = b"\xF7ferry-lane/1\n";
/// Answers not yet given per lane: beyond this the acceptor stops reading requests.
const IN_FLIGHT: usize = 256;
/// Dialing one address of a lane.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The magic and the TLS handshake, on either side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A device whose lane could not be dialed is tried again at most this often.
const REDIAL_AFTER: Duration = Duration::from_secs(30);
/// The status of an answer the acceptor's daemon never gave (its reply was dropped or
/// took longer than the block timeout): the asker gets an error, as a libp2p request
/// left unanswered does.
const STATUS_NO_ANSWER: u8 = 0xFF;
/// Request and answer headers.
const REQUEST_HEAD: usize = 4 + 2;
const ANSWER_HEAD: usize = 4 + 1 + 4;

pub(super) type Stream = futures_rustls::TlsStream<libp2p::tcp::tokio::TcpStream>;

/// Why a lane gave no answer.
pub(crate) enum Unanswered {
    /// The lane closed first (or could not take it): the request, to go another way.
    NotCarried(BlockRequest),
    /// The other side's daemon gave no answer, as a libp2p request can go unanswered.
    NoAnswer,
}

type Reply = oneshot::Sender<Result<BlockResponse, Unanswered>>;

/// Every lane of this device, both directions, and what is needed to make more.
pub(crate) struct Lanes {
    tls: Option<LaneTls>,
    events: mpsc::Sender<NetEvent>,
    traffic: TrafficTable,
    /// How long an acceptor waits for its daemon's answer.
    answer_timeout: Duration,
    state: Mutex<State>,
    /// Blocks answered on lanes since start (data or not).
    served: Arc<AtomicU64>,
    /// Tests only: junk bytes appended to every block this device answers on a lane.
    #[cfg(test)]
    pub(crate) junk: usize,
}

#[derive(Default)]
struct State {
    paired: HashMap<PeerId, DeviceId>,
    /// Connected paired devices and the TCP addresses their lanes may be dialed at.
    connected: HashMap<PeerId, Vec<SocketAddr>>,
    /// Lanes this device dialed: where its requests go.
    asking: HashMap<PeerId, Asker>,
    dialing: HashSet<PeerId>,
    last_dial: HashMap<PeerId, Instant>,
    /// Every lane task per device, to stop them on unpairing, disconnection or shutdown.
    tasks: HashMap<PeerId, Vec<AbortHandle>>,
    /// Lanes made since start, to tell an old lane's end from a newer lane's.
    made: u64,
    closed: bool,
}

impl State {
    fn forget(&mut self, peer: &PeerId) {
        self.asking.remove(peer);
        for t in self.tasks.remove(peer).into_iter().flatten() {
            t.abort();
        }
    }
}

/// The asking end of a lane this device dialed.
#[derive(Clone)]
pub(crate) struct Asker {
    tx: mpsc::Sender<(BlockRequest, Reply)>,
    lane: u64,
}

impl Asker {
    /// Sends `req` on the lane and waits for its answer. [`Unanswered::NotCarried`] when
    /// the lane closed before answering: the request may go another way.
    pub(crate) async fn ask(&self, req: BlockRequest) -> Result<BlockResponse, Unanswered> {
        let (tx, rx) = oneshot::channel();
        if let Err(e) = self.tx.send((req, tx)).await {
            return Err(Unanswered::NotCarried(e.0 .0));
        }
        // Dropped unanswered only when the lane's tasks were stopped (unpairing, shutdown).
        rx.await.unwrap_or(Err(Unanswered::NoAnswer))
    }
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lanes")
            .field("enabled", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Lanes {
    /// `tls` None: no lanes at all (dialed or accepted), as a Ferry from before them.
    pub(crate) fn new(
        tls: Option<LaneTls>,
        events: mpsc::Sender<NetEvent>,
        traffic: TrafficTable,
        answer_timeout: Duration,
    ) -> Self {
        Lanes {
            tls,
            events,
            traffic,
            answer_timeout,
            state: Mutex::new(State::default()),
            served: Arc::default(),
            #[cfg(test)]
            junk: 0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere mid-update; the maps stay usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The paired devices; lanes of any other device are closed.
    pub(crate) fn set_paired(&self, paired: HashMap<PeerId, DeviceId>) {
        let mut st = self.state();
        let gone: Vec<PeerId> = st
            .tasks
            .keys()
            .chain(st.connected.keys())
            .filter(|p| !paired.contains_key(p))
            .copied()
            .collect();
        for p in gone {
            st.forget(&p);
            st.connected.remove(&p);
        }
        st.paired = paired;
    }

    /// A paired device is connected (or learned new addresses): dial its lane at `addrs`
    /// unless one is up or being dialed.
    pub(crate) fn connected(self: &Arc<Self>, peer: PeerId, addrs: &[Multiaddr]) {
        let addrs: Vec<SocketAddr> = addrs.iter().filter_map(tcp_socket_addr).collect();
        {
            let mut st = self.state();
            if !st.paired.contains_key(&peer) {
                return;
            }
            let known = st.connected.entry(peer).or_default();
            for a in addrs {
                if !known.contains(&a) {
                    known.push(a);
                }
            }
        }
        self.dial_if_needed(peer, false);
    }

    /// The device's last libp2p connection closed: its lanes go too.
    pub(crate) fn disconnected(&self, peer: &PeerId) {
        let mut st = self.state();
        st.connected.remove(peer);
        st.last_dial.remove(peer);
        st.forget(peer);
    }

    /// Closes every lane and makes no more.
    pub(crate) fn shutdown(&self) {
        let mut st = self.state();
        st.closed = true;
        let peers: Vec<PeerId> = st.tasks.keys().copied().collect();
        for p in peers {
            st.forget(&p);
        }
    }

    /// The lane to ask `peer` through, if one is up; if none is and none was tried
    /// lately, one is dialed for the requests to come.
    pub(crate) fn asker(self: &Arc<Self>, peer: &PeerId) -> Option<Asker> {
        if let Some(a) = self.state().asking.get(peer) {
            return Some(a.clone());
        }
        self.dial_if_needed(*peer, true);
        None
    }

    /// This device has a lane to ask `peer` through.
    pub(crate) fn has_lane_to(&self, peer: &PeerId) -> bool {
        self.state().asking.contains_key(peer)
    }

    /// Blocks this device answered on lanes since start.
    #[cfg(test)]
    pub(crate) fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn dial_if_needed(self: &Arc<Self>, peer: PeerId, only_after_pause: bool) {
        let Some(tls) = self.tls.clone() else { return };
        let addrs = {
            let mut st = self.state();
            if st.closed || st.asking.contains_key(&peer) || st.dialing.contains(&peer) {
                return;
            }
            let Some(addrs) = st.connected.get(&peer).filter(|a| !a.is_empty()).cloned() else {
                return;
            };
            let now = Instant::now();
            if only_after_pause
                && st
                    .last_dial
                    .get(&peer)
                    .is_some_and(|t| now.duration_since(*t) < REDIAL_AFTER)
            {
                return;
            }
            st.dialing.insert(peer);
            st.last_dial.insert(peer, now);
            addrs
        };
        let lanes = self.clone();
        tokio::spawn(async move {
            let mut last_err = String::from("no address");
            for addr in addrs {
                match dial(&tls, addr, peer).await {
                    Ok(stream) => {
                        tracing::debug!(peer = %super::label(&peer), "block lane to {addr} up");
                        lanes.start_asking(peer, stream);
                        return;
                    }
                    Err(e) => last_err = format!("{addr}: {e}"),
                }
            }
            tracing::debug!(peer = %super::label(&peer), "no block lane ({last_err}); blocks go through libp2p");
            lanes.state().dialing.remove(&peer);
        });
    }

    fn start_asking(self: &Arc<Self>, peer: PeerId, stream: Stream) {
        let mut st = self.state();
        st.dialing.remove(&peer);
        if st.closed || !st.connected.contains_key(&peer) {
            return;
        }
        st.made += 1;
        let lane = st.made;
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let traffic = self.traffic.entry(peer);
        let (read, write) = stream.split();
        let w = tokio::spawn(ask_loop(write, rx, pending.clone(), traffic.clone()));
        let lanes = self.clone();
        let r = tokio::spawn(async move {
            let end = read_answers(read, &pending, &traffic).await;
            // Whatever was not answered goes another way.
            fail_pending(&pending);
            let mut st = lanes.state();
            if st.asking.get(&peer).is_some_and(|a| a.lane == lane) {
                st.asking.remove(&peer);
            }
            drop(st);
            match end {
                Ok(()) => tracing::debug!(peer = %super::label(&peer), "block lane closed"),
                Err(e) => tracing::debug!(peer = %super::label(&peer), "block lane closed: {e}"),
            }
        });
        st.asking.insert(peer, Asker { tx, lane });
        let tasks = st.tasks.entry(peer).or_default();
        tasks.retain(|t| !t.is_finished());
        tasks.extend([w.abort_handle(), r.abort_handle()]);
    }

    /// A connection that began with [`MAGIC`] (already read): TLS, then, for a paired
    /// device, its requests answered until it closes.
    pub(crate) fn accept(self: &Arc<Self>, socket: libp2p::tcp::tokio::TcpStream) {
        let Some(tls) = self.tls.clone() else { return };
        let lanes = self.clone();
        tokio::spawn(async move {
            let (peer, stream) =
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(socket)).await {
                    Ok(Ok(done)) => done,
                    Ok(Err(e)) => {
                        tracing::debug!("block lane handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!("block lane handshake timed out");
                        return;
                    }
                };
            let dev = {
                let st = lanes.state();
                match st.paired.get(&peer) {
                    Some(dev) if !st.closed => *dev,
                    _ => {
                        tracing::debug!(peer = %super::label(&peer), "block lane from a device that is not paired: closed");
                        return;
                    }
                }
            };
            let traffic = lanes.traffic.entry(peer);
            let (read, write) = stream.split();
            let (ans_tx, ans_rx) = mpsc::channel(IN_FLIGHT);
            #[cfg(not(test))]
            let junk = 0;
            #[cfg(test)]
            let junk = lanes.junk;
            let w = tokio::spawn(answer_loop(
                write,
                ans_rx,
                lanes.answer_timeout,
                traffic.clone(),
                lanes.served.clone(),
                junk,
            ));
            let events = lanes.events.clone();
            let r = tokio::spawn(async move {
                if let Err(e) = read_requests(read, dev, &events, &ans_tx, &traffic).await {
                    match e.kind() {
                        io::ErrorKind::InvalidData => {
                            tracing::warn!(peer = %dev, "closing its block lane: {e}")
                        }
                        _ => tracing::debug!(peer = %dev, "block lane closed: {e}"),
                    }
                }
            });
            let mut st = lanes.state();
            if st.closed || !st.paired.contains_key(&peer) {
                w.abort();
                r.abort();
                return;
            }
            let tasks = st.tasks.entry(peer).or_default();
            tasks.retain(|t| !t.is_finished());
            tasks.extend([w.abort_handle(), r.abort_handle()]);
        });
    }
}

/// The transport's look at each new TCP connection before libp2p's: a listener-side
/// connection that starts with [`MAGIC`] becomes a lane (and an error to libp2p, which
/// logs it at debug level); any other goes on to libp2p untouched.
pub(crate) async fn divert(
    lanes: Arc<Lanes>,
    stream: libp2p::tcp::tokio::TcpStream,
    endpoint: ConnectedPoint,
) -> io::Result<libp2p::tcp::tokio::TcpStream> {
    if endpoint.is_dialer() || lanes.tls.is_none() {
        return Ok(stream);
    }
    let mut first = [0u8; 1];
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.0.peek(&mut first)).await {
        Ok(Ok(1)) if first[0] == MAGIC[0] => {}
        // Anything else (libp2p, nothing yet, an error) is libp2p's to deal with.
        _ => return Ok(stream),
    }
    let mut stream = stream;
    let mut magic = [0u8; MAGIC.len()];
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio::io::AsyncReadExt::read_exact(&mut stream.0, &mut magic),
    )
    .await
    .map_err(|_| io::Error::other("block lane: timed out reading its first bytes"))??;
    if magic != MAGIC {
        return Err(io::Error::other(
            "neither libp2p nor a block lane: unknown first bytes",
        ));
    }
    lanes.accept(stream);
    Err(io::Error::other("taken as a block lane"))
}

/// `/ip4|ip6/…/tcp/PORT` (a trailing `/p2p/…` allowed) as a socket address; anything
/// else (DNS names, QUIC, relayed circuits) has no lane.
pub(super) fn tcp_socket_addr(addr: &Multiaddr) -> Option<SocketAddr> {
    let mut it = addr.iter();
    let ip: IpAddr = match it.next()? {
        Protocol::Ip4(ip) => ip.into(),
        Protocol::Ip6(ip) => ip.into(),
        _ => return None,
    };
    let Protocol::Tcp(port) = it.next()? else {
        return None;
    };
    match it.next() {
        None | Some(Protocol::P2p(_)) if it.next().is_none() => Some(SocketAddr::new(ip, port)),
        _ => None,
    }
}

pub(super) async fn dial(tls: &LaneTls, addr: SocketAddr, expected: PeerId) -> io::Result<Stream> {
    let mut tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::other("timed out connecting"))??;
    tcp.set_nodelay(true)?;
    tcp.write_all(MAGIC).await?;
    let (peer, stream) = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tls.connect(libp2p::tcp::tokio::TcpStream(tcp)),
    )
    .await
    .map_err(|_| io::Error::other("TLS handshake timed out"))?
    .map_err(io::Error::other)?;
    if peer != expected {
        return Err(io::Error::other(format!(
            "the device there is {}, not the one dialed",
            super::label(&peer)
        )));
    }
    Ok(stream)
}

/// Requests sent and not yet answered, by id. `None` once the lane is closed.
type Pending = Arc<Mutex<Option<HashMap<u32, (BlockRequest, Reply)>>>>;

fn fail_pending(pending: &Pending) {
    let taken = pending.lock().unwrap_or_else(|p| p.into_inner()).take();
    for (_, (req, reply)) in taken.into_iter().flatten() {
        let _ = reply.send(Err(Unanswered::NotCarried(req)));
    }
}

/// The dialer's writing half: the requests handed to [`Asker::ask`], in frames, as many
/// as are waiting before each flush.
async fn ask_loop(
    mut w: WriteHalf<Stream>,
    mut rx: mpsc::Receiver<(BlockRequest, Reply)>,
    pending: Pending,
    traffic: Arc<Traffic>,
) {
    let mut next_id: u32 = 0;
    let mut frames = Vec::new();
    while let Some(first) = rx.recv().await {
        frames.clear();
        let mut ask = Some(first);
        while let Some((req, reply)) = ask.take().or_else(|| rx.try_recv().ok()) {
            let encoded = match encode_block_request(&req) {
                Ok(e) => e,
                Err(_) => {
                    // Too long a name for the protocol: libp2p will refuse it the same way.
                    let _ = reply.send(Err(Unanswered::NotCarried(req)));
                    continue;
                }
            };
            next_id = next_id.wrapping_add(1);
            {
                let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
                let Some(map) = p.as_mut() else {
                    drop(p);
                    let _ = reply.send(Err(Unanswered::NotCarried(req)));
                    continue;
                };
                map.insert(next_id, (req, reply));
            }
            frames.extend_from_slice(&next_id.to_be_bytes());
            frames.extend_from_slice(&(encoded.len() as u16).to_be_bytes());
            frames.extend_from_slice(&encoded);
        }
        if frames.is_empty() {
            continue;
        }
        let sent = async {
            w.write_all(&frames).await?;
            w.flush().await
        };
        if sent.await.is_err() {
            break;
        }
        traffic
            .outbound
            .fetch_add(frames.len() as u64, Ordering::Relaxed);
    }
    fail_pending(&pending);
    let _ = w.close().await;
}

/// Reads the next frame's header; false when the lane ended instead.
async fn next_head(r: &mut ReadHalf<Stream>, head: &mut [u8]) -> io::Result<bool> {
    match r.read_exact(head).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn malformed(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// The dialer's reading half: answers matched to their requests until the lane ends.
async fn read_answers(
    mut r: ReadHalf<Stream>,
    pending: &Pending,
    traffic: &Traffic,
) -> io::Result<()> {
    let mut head = [0u8; ANSWER_HEAD];
    loop {
        if !next_head(&mut r, &mut head).await? {
            return Ok(());
        }
        let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let status = head[4];
        let len = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
        let asked = {
            let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
            p.as_mut().and_then(|m| m.remove(&id))
        };
        let Some((req, reply)) = asked else {
            return Err(malformed(format!("an answer to request {id}, never asked")));
        };
        // A broken answer closes the lane; its request is handed back with the others.
        let handed_back = |req: BlockRequest, reply: Reply, e: io::Error| {
            let _ = reply.send(Err(Unanswered::NotCarried(req)));
            Err(e)
        };
        let answer = match status {
            BlockResponse::STATUS_DATA => {
                if len > req.size || len > MAX_BLOCK_SIZE {
                    let why = format!("a {len}-byte block for a {}-byte request", req.size);
                    return handed_back(req, reply, malformed(why));
                }
                let mut data = crate::bufpool::take_filled(len as usize);
                if let Err(e) = r.read_exact(&mut data).await {
                    return handed_back(req, reply, e);
                }
                Ok(BlockResponse::Data(data))
            }
            s @ (BlockResponse::STATUS_NOT_FOUND
            | BlockResponse::STATUS_REFUSED
            | STATUS_NO_ANSWER) => {
                if len != 0 {
                    let why = format!("{len} bytes after answer status {s}");
                    return handed_back(req, reply, malformed(why));
                }
                match s {
                    BlockResponse::STATUS_NOT_FOUND => Ok(BlockResponse::NotFound),
                    BlockResponse::STATUS_REFUSED => Ok(BlockResponse::Refused),
                    _ => Err(Unanswered::NoAnswer),
                }
            }
            other => {
                let why = format!("unknown answer status {other}");
                return handed_back(req, reply, malformed(why));
            }
        };
        traffic
            .inbound
            .fetch_add(ANSWER_HEAD as u64 + u64::from(len), Ordering::Relaxed);
        let _ = reply.send(answer);
    }
}

/// The acceptor's reading half: each request checked and handed to the daemon as a
/// [`NetEvent::BlockRequest`]; its answer goes to [`answer_loop`].
async fn read_requests(
    mut r: ReadHalf<Stream>,
    dev: DeviceId,
    events: &mpsc::Sender<NetEvent>,
    answers: &mpsc::Sender<(u32, oneshot::Receiver<BlockResponse>)>,
    traffic: &Traffic,
) -> io::Result<()> {
    let mut head = [0u8; REQUEST_HEAD];
    let mut body = Vec::new();
    loop {
        if !next_head(&mut r, &mut head).await? {
            return Ok(());
        }
        let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let len = usize::from(u16::from_be_bytes([head[4], head[5]]));
        if len as u64 > MAX_BLOCK_REQUEST {
            return Err(malformed(format!("a {len}-byte block request")));
        }
        body.resize(len, 0);
        r.read_exact(&mut body).await?;
        traffic
            .inbound
            .fetch_add((REQUEST_HEAD + len) as u64, Ordering::Relaxed);
        let req = decode_block_request(&body).map_err(malformed)?;
        let (tx, rx) = oneshot::channel();
        let ev = NetEvent::BlockRequest {
            peer: dev,
            req,
            reply: tx,
        };
        if events.send(ev).await.is_err() || answers.send((id, rx)).await.is_err() {
            return Ok(());
        }
    }
}

/// The acceptor's writing half: answers in the order they are ready, each header and
/// block in one vectored write (no copy of the block), flushed when no other is ready.
async fn answer_loop(
    mut w: WriteHalf<Stream>,
    mut asked: mpsc::Receiver<(u32, oneshot::Receiver<BlockResponse>)>,
    timeout: Duration,
    traffic: Arc<Traffic>,
    served: Arc<AtomicU64>,
    junk: usize,
) {
    let mut waiting = FuturesUnordered::new();
    let mut reading = true;
    loop {
        let (id, answer) = tokio::select! {
            next = asked.recv(), if reading => {
                match next {
                    Some((id, rx)) => {
                        waiting.push(async move {
                            (id, tokio::time::timeout(timeout, rx).await.ok().and_then(Result::ok))
                        });
                    }
                    None => reading = false,
                }
                continue;
            }
            Some(done) = waiting.next(), if !waiting.is_empty() => done,
            else => break,
        };
        let mut ready = Some((id, answer));
        let written: io::Result<()> = async {
            while let Some((id, answer)) = ready.take() {
                served.fetch_add(1, Ordering::Relaxed);
                write_answer(&mut w, id, answer, &traffic, junk).await?;
                ready = waiting.next().now_or_never().flatten();
            }
            w.flush().await
        }
        .await;
        if written.is_err() {
            break;
        }
    }
    let _ = w.close().await;
}

async fn write_answer(
    w: &mut WriteHalf<Stream>,
    id: u32,
    answer: Option<BlockResponse>,
    traffic: &Traffic,
    junk: usize,
) -> io::Result<()> {
    let (status, data) = match answer {
        Some(BlockResponse::Data(d)) if d.len() <= MAX_BLOCK_SIZE as usize => {
            (BlockResponse::STATUS_DATA, Some(d))
        }
        Some(BlockResponse::Data(d)) => {
            tracing::warn!(
                "not sending a {}-byte block (limit {MAX_BLOCK_SIZE})",
                d.len()
            );
            (STATUS_NO_ANSWER, None)
        }
        Some(BlockResponse::NotFound) => (BlockResponse::STATUS_NOT_FOUND, None),
        Some(BlockResponse::Refused) => (BlockResponse::STATUS_REFUSED, None),
        None => (STATUS_NO_ANSWER, None),
    };
    // Tests only (else `junk` is 0): play a device that sends more than was asked.
    let data = data.map(|mut d| {
        d.resize(d.len() + junk, 0xA5);
        d
    });
    let len = data.as_ref().map_or(0, Vec::len);
    let mut head = [0u8; ANSWER_HEAD];
    head[..4].copy_from_slice(&id.to_be_bytes());
    head[4] = status;
    head[5..].copy_from_slice(&(len as u32).to_be_bytes());
    let body: &[u8] = data.as_deref().unwrap_or(&[]);
    WriteTwo {
        w,
        parts: [&head, body],
        done: 0,
    }
    .await?;
    traffic
        .outbound
        .fetch_add((ANSWER_HEAD + len) as u64, Ordering::Relaxed);
    if let Some(d) = data {
        crate::bufpool::give(d);
    }
    Ok(())
}

/// Writes two slices as one (vectored writes, so TLS seals header and block together
/// without first copying them into one buffer).
struct WriteTwo<'a, W> {
    w: &'a mut W,
    parts: [&'a [u8]; 2],
    done: usize,
}

impl<W: AsyncWrite + Unpin> std::future::Future for WriteTwo<'_, W> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let total = this.parts[0].len() + this.parts[1].len();
        while this.done < total {
            let first = this.parts[0].len();
            let bufs: [io::IoSlice<'_>; 2] = if this.done < first {
                [
                    io::IoSlice::new(&this.parts[0][this.done..]),
                    io::IoSlice::new(this.parts[1]),
                ]
            } else {
                [
                    io::IoSlice::new(&this.parts[1][this.done - first..]),
                    io::IoSlice::new(&[]),
                ]
            };
            let n = std::task::ready!(Pin::new(&mut *this.w).poll_write_vectored(cx, &bufs))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            this.done += n;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_tcp_addresses_have_lanes() {
        let ok = |s: &str| tcp_socket_addr(&s.parse().unwrap());
        assert_eq!(
            ok("/ip4/127.0.0.1/tcp/22000"),
            Some("127.0.0.1:22000".parse().unwrap())
        );
        assert_eq!(ok("/ip6/::1/tcp/9"), Some("[::1]:9".parse().unwrap()));
        let id = PeerId::random();
        assert!(ok(&format!("/ip4/127.0.0.1/tcp/5/p2p/{id}")).is_some());
        assert_eq!(ok("/ip4/127.0.0.1/udp/5/quic-v1"), None);
        assert_eq!(ok("/dns4/example.invalid/tcp/5"), None);
        assert_eq!(
            ok(&format!(
                "/ip4/127.0.0.1/tcp/5/p2p/{id}/p2p-circuit/p2p/{id}"
            )),
            None
        );
    }

    #[test]
    fn the_magic_cannot_start_a_libp2p_connection() {
        // multistream-select's header is a varint length (19) then "/multistream/1.0.0\n".
        assert_ne!(MAGIC[0], 0x13);
        assert!(MAGIC.len() < 64);
    }
}
