//! The network: one libp2p event loop that owns the `Swarm`, and a cheap cloneable
//! [`NetHandle`] everyone else uses to talk to it.
//!
//! What it does: listens on the configured multiaddrs (TCP with TLS or Noise and Yamux, and/or
//! QUIC), keeps a connection to every paired device (dialing configured addresses plus
//! those learned from identify and mDNS, with jittered exponential backoff), carries the
//! three Ferry protocols of [`crate::protocol`] and reports what peers ask for as
//! [`NetEvent`]s carrying a oneshot to answer on.
//!
//! Devices behind NAT: a listen address `/…/p2p/RELAY/p2p-circuit` makes the device
//! reachable through a circuit-relay-v2 server ([`start_relay`] runs one, for `ferry
//! relay`), and a paired device's address of that form is dialed through it; DCUtR then
//! tries to replace the relayed connection with a direct one. Relays are kept connected
//! but are never reported as devices and never served. (AutoNAT is not wired yet: relay
//! use is decided by configuration, not by probing reachability.)
//!
//! What it is not: it knows nothing of folders, the index or the disk. It moves typed
//! messages between devices and enforces who may send which.
//!
//! Trust: a PeerId is derived from the device's ed25519 key, so the TLS or Noise handshake
//! proves the remote's [`DeviceId`]. Only paired devices ([`NetHandle::set_peers`]) may
//! use the index and block protocols. A connection from anyone else is reported once as
//! [`NetEvent::UnknownPeer`] and closed at once, unless a join window is open
//! ([`NetHandle::set_join_open`]), in which case it may stay up to [`JOIN_GRACE`] and is
//! served the join protocol only. A peer that sends an oversized or undecodable message
//! has all its connections closed (with a warning saying why); nothing else is affected.
//!
//! Usage:
//! ```no_run
//! # async fn demo(cfg: ferry::net::NetConfig) -> ferry::Result<()> {
//! let (net, mut events) = ferry::net::start(cfg).await?;
//! net.set_peers(vec![/* PeerEntry { id, addrs } */]).await?;
//! while let Some(ev) = events.recv().await {
//!     // Connected / Disconnected / UnknownPeer / IndexRequest / BlockRequest / JoinRequest
//!     # let _ = ev;
//! }
//! # Ok(()) }
//! ```

mod coalesce;
mod codec;
mod counting;
mod lane;
mod relay_server;
mod secure;
#[cfg(test)]
mod tests;

pub use relay_server::{start_relay, RelayHandle};

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use futures::{future::BoxFuture, stream::FuturesUnordered, FutureExt, StreamExt};
use libp2p::{
    core::{
        muxing::StreamMuxerBox,
        transport::{Boxed, ListenerId},
        upgrade, ConnectedPoint,
    },
    dcutr, identify, identity, mdns,
    multiaddr::Protocol,
    ping, quic, relay,
    request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel},
    swarm::{
        behaviour::toggle::Toggle,
        dial_opts::{DialOpts, PeerCondition},
        ConnectionId, DialError, NetworkBehaviour, SwarmEvent,
    },
    tcp, yamux, Multiaddr, PeerId, StreamProtocol, Swarm, Transport,
};
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use crate::{
    error::{Error, Result},
    protocol::{
        BlockRequest, BlockResponse, IndexRequest, IndexResponse, JoinRequest, JoinResponse,
        BLOCKS_PROTOCOL, BLOCK_PROTOCOL, INDEX_PROTOCOL, JOIN_PROTOCOL, MAX_BATCHED_BLOCK,
        MAX_BATCH_BLOCKS, MAX_BATCH_DATA, MAX_INDEX_MESSAGE, MAX_JOIN_MESSAGE,
    },
    types::DeviceId,
};
use codec::{malformed_reason, BatchCodec, BlockCodec, CborCodec, Msg};
use counting::{CountingMuxer, TrafficTable};
use secure::Secure;

/// How long an inbound index request may take end to end, and how long we wait for an
/// index answer. Applying a 1000-record batch can take the index a while on a slow disk.
const INDEX_TIMEOUT: Duration = Duration::from_secs(60);
/// Block requests: a 1 MiB read plus hash check on the far side, then the transfer.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(30);
/// Join requests wait on the inviter's daemon, which answers at once.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Concurrent block streams per connection (inbound + outbound). The puller keeps 16-64
/// requests in flight per peer; twice that leaves room for the peer pulling from us.
const BLOCK_STREAMS: usize = 256;
/// Batch requests (`/ferry/blocks/1`) in flight per peer. Small blocks asked for while
/// these are out wait and leave together in the next batch: one request alone goes out
/// at once, a burst is carried in a few streams instead of one stream per block.
const BATCHES_IN_FLIGHT: usize = 4;
/// Index batches are sent one at a time per folder; a few folders at once is plenty.
const INDEX_STREAMS: usize = 32;
const JOIN_STREAMS: usize = 4;
/// Index answers are `Ok` or a short refusal.
const MAX_INDEX_RESPONSE: u64 = 64 * 1024;
/// How long an unknown device may stay connected while a join window is open.
pub const JOIN_GRACE: Duration = Duration::from_secs(30);
/// After our own join request is answered, the connection to the (not yet paired)
/// inviter stays this long so the daemon can pair it without a reconnect.
const AFTER_JOIN_GRACE: Duration = Duration::from_secs(5);
/// Redial backoff: first retry after about this long, doubling per failure...
const BACKOFF_START: Duration = Duration::from_millis(500);
/// ...up to this. A connection that lasted [`STABLE_CONNECTION`] resets it.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection must live this long to count as a success for the backoff; otherwise a
/// peer that accepts and drops us at once would be redialed twice a second forever.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// A peer that sent a malformed message is not redialed for this long.
const MISBEHAVIOUR_PENALTY: Duration = Duration::from_secs(10);
/// Addresses learned per peer from identify and mDNS (configured ones are not capped).
const MAX_LEARNED_ADDRS: usize = 8;
/// Peers whose mDNS addresses we remember, paired or not (a LAN can be busy).
const MAX_MDNS_PEERS: usize = 256;
/// Commands queued from handles to the loop.
const COMMAND_QUEUE: usize = 256;
/// Events queued from the loop to the daemon before the loop's own backlog is used.
const EVENT_QUEUE: usize = 1024;
/// The loop never blocks on a slow daemon (that could deadlock with a handle call); it
/// keeps a backlog instead. Past this many, requests and unknown-peer notices are
/// dropped (the remote sees a failed request); connect/disconnect notices are kept.
const EVENT_BACKLOG: usize = 4096;
/// How often the loop dials due peers and expires guest connections.
const TICK: Duration = Duration::from_millis(200);
/// How long a relayed connection stays open beside a new direct one. Closed at once, it
/// could go before the other side had registered the direct connection, which then saw
/// its last connection close: a "disconnected" and "connected" blip, and the requests on
/// the relayed connection failed.
const RELAY_GRACE: Duration = Duration::from_secs(1);
/// How long `start` waits for the listeners to report their addresses.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for connections to close cleanly.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// What [`start`] needs.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// This device's identity; must be ed25519 (the DeviceId is its public key).
    pub keypair: identity::Keypair,
    /// Where to listen: `/ip4/…/tcp/PORT` and/or `/ip4/…/udp/PORT/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Discover and announce on the LAN with mDNS.
    pub mdns: bool,
    /// Dial and accept block lanes (a TCP + TLS connection per device for blocks over
    /// 64 KiB, beside libp2p); false: every block through libp2p.
    pub lanes: bool,
}

/// A paired device and the addresses configured for it (may be empty: then only
/// identify, mDNS or its own dialing bring it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEntry {
    pub id: DeviceId,
    pub addrs: Vec<Multiaddr>,
}

/// What the network reports. Request events carry the oneshot to answer on; dropping it
/// leaves the request unanswered (the remote gets a failure).
#[derive(Debug)]
pub enum NetEvent {
    /// A paired device connected (its first connection).
    Connected { peer: DeviceId, addr: Multiaddr },
    /// A paired (or just unpaired) device's last connection closed.
    Disconnected { peer: DeviceId },
    /// A device that is not paired connected; once per connection. Shown as pending.
    UnknownPeer { peer: DeviceId, addr: Multiaddr },
    IndexRequest {
        peer: DeviceId,
        req: IndexRequest,
        reply: oneshot::Sender<IndexResponse>,
    },
    BlockRequest {
        peer: DeviceId,
        req: BlockRequest,
        reply: oneshot::Sender<BlockResponse>,
    },
    /// Several small blocks at once (`/ferry/blocks/1`): one answer per request, in
    /// order. A missing or short answer counts as `NotFound` for the blocks left out.
    BlockBatch {
        peer: DeviceId,
        reqs: Vec<BlockRequest>,
        reply: oneshot::Sender<Vec<BlockResponse>>,
    },
    /// A join request (invite pairing) from `peer`, paired or not, while joins are open.
    JoinRequest {
        peer: DeviceId,
        addr: Multiaddr,
        req: JoinRequest,
        reply: oneshot::Sender<JoinResponse>,
    },
}

/// Per-device network figures for `ferry status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStat {
    pub id: DeviceId,
    pub connected: bool,
    pub address: Option<String>,
    /// Substream payload bytes received from / sent to this device since start.
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// "tcp", "quic" or "relay".
    pub connection_type: Option<String>,
    /// This device asks that one for large blocks on a block lane (see `net::lane`).
    pub block_lane: bool,
}

/// The cloneable front of the event loop. Every call is a command over a bounded channel
/// and a oneshot reply; once the loop has stopped, calls return [`Error::Stopped`].
#[derive(Clone, Debug)]
pub struct NetHandle {
    tx: mpsc::Sender<Command>,
    local: DeviceId,
    /// Large blocks go through a device's lane when it has one (see [`lane`]).
    lanes: std::sync::Arc<lane::Lanes>,
}

#[derive(Debug)]
enum Command {
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    SetPeers(Vec<PeerEntry>, oneshot::Sender<()>),
    SendIndex {
        peer: DeviceId,
        req: Msg<IndexRequest>,
        reply: oneshot::Sender<Result<IndexResponse>>,
    },
    RequestBlock {
        peer: DeviceId,
        req: Msg<BlockRequest>,
        reply: oneshot::Sender<Result<BlockResponse>>,
    },
    Join {
        peer: DeviceId,
        addrs: Vec<Multiaddr>,
        req: JoinRequest,
        reply: oneshot::Sender<Result<JoinResponse>>,
    },
    SetJoinOpen(bool, oneshot::Sender<()>),
    PeerStats(oneshot::Sender<Vec<PeerStat>>),
    Shutdown(oneshot::Sender<()>),
    /// Tests only: dial these addresses of `peer` now, connected or not.
    #[cfg(test)]
    DialNow(DeviceId, Vec<Multiaddr>, oneshot::Sender<()>),
    /// Tests only: the connection types of `peer`'s established connections.
    #[cfg(test)]
    ConnTypes(DeviceId, oneshot::Sender<Vec<&'static str>>),
    /// Tests only: how many block batches this node has sent.
    #[cfg(test)]
    BatchesSent(oneshot::Sender<u64>),
}

impl NetHandle {
    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// This device's ID (from the keypair it was started with).
    pub fn local_id(&self) -> DeviceId {
        self.local
    }

    /// The addresses actually bound (port 0 resolved), e.g. for `ferry status`.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        self.call(Command::ListenAddrs).await
    }

    /// Replaces the paired set: new devices are dialed, removed ones disconnected (and
    /// from then on treated as unknown). A device already connected (say, through a join)
    /// becomes paired in place and is reported as `Connected`.
    pub async fn set_peers(&self, peers: Vec<PeerEntry>) -> Result<()> {
        self.call(|tx| Command::SetPeers(peers, tx)).await
    }

    /// Sends an index message to a connected paired device and waits for its answer.
    pub async fn send_index(&self, peer: DeviceId, req: IndexRequest) -> Result<IndexResponse> {
        self.call(|reply| Command::SendIndex {
            peer,
            req: Msg::Valid(req),
            reply,
        })
        .await?
    }

    /// Asks a connected paired device for one block. The data is not verified here:
    /// the caller checks its hash. A large block goes through the device's lane when it
    /// has one, and through libp2p when it has none or the lane closes first.
    pub async fn request_block(&self, peer: DeviceId, req: BlockRequest) -> Result<BlockResponse> {
        let req = if req.size > MAX_BATCHED_BLOCK {
            match self.lanes.asker(&peer_id_of(&peer)) {
                Some(lane) => match tokio::time::timeout(BLOCK_TIMEOUT, lane.ask(req)).await {
                    Ok(Ok(answer)) => return Ok(answer),
                    Ok(Err(lane::Unanswered::NotCarried(req))) => req,
                    Ok(Err(lane::Unanswered::NoAnswer)) => {
                        return Err(Error::Net(format!(
                            "{peer}: the block request was not answered"
                        )))
                    }
                    Err(_) => {
                        return Err(Error::Net(format!("{peer}: the block request timed out")))
                    }
                },
                None => req,
            }
        } else {
            req
        };
        self.call(|reply| Command::RequestBlock {
            peer,
            req: Msg::Valid(req),
            reply,
        })
        .await?
    }

    /// Dials `addrs` of a device that is not (yet) paired and sends it a join request
    /// (invite pairing). The connection stays up briefly afterwards, so that pairing the
    /// device with `set_peers` right after an `Accepted` keeps it.
    pub async fn join(
        &self,
        peer: DeviceId,
        addrs: Vec<Multiaddr>,
        req: JoinRequest,
    ) -> Result<JoinResponse> {
        self.call(|reply| Command::Join {
            peer,
            addrs,
            req,
            reply,
        })
        .await?
    }

    /// Whether joins are open (`true` while any invite is outstanding). A flag, not a
    /// counter: the daemon sets it from its own set of open invites, as often as it
    /// likes. While open, unknown devices may stay connected for up to [`JOIN_GRACE`] to
    /// send a join request; closing it does not cut connections already admitted (they
    /// keep their grace period, so a join in progress can finish).
    pub async fn set_join_open(&self, open: bool) -> Result<()> {
        self.call(|tx| Command::SetJoinOpen(open, tx)).await
    }

    /// One entry per paired device, sorted by device ID.
    pub async fn peer_stats(&self) -> Result<Vec<PeerStat>> {
        self.call(Command::PeerStats).await
    }

    /// Closes every connection and listener and stops the loop; returns once it has.
    /// Outstanding requests fail with [`Error::Stopped`].
    pub async fn shutdown(&self) -> Result<()> {
        self.call(Command::Shutdown).await
    }
}

/// The device ID behind a PeerId: its ed25519 public key, when the PeerId inlines one
/// (identity multihash), as every Ferry device's does.
pub fn device_id_of(peer: &PeerId) -> Option<DeviceId> {
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    let key = identity::PublicKey::try_decode_protobuf(mh.digest()).ok()?;
    let ed = key.try_into_ed25519().ok()?;
    Some(DeviceId(ed.to_bytes()))
}

/// The PeerId of a device: the identity multihash of its protobuf-encoded ed25519 key.
/// Built from the bytes directly so that it never fails, even for 32 bytes that are not
/// a valid curve point (no one can prove such an identity, so no one will match it).
pub fn peer_id_of(id: &DeviceId) -> PeerId {
    // multihash: code 0x00 (identity), length 36; protobuf: field 1 (KeyType) = 1
    // (Ed25519), field 2 (Data) = 32 bytes.
    let mut bytes = Vec::with_capacity(38);
    bytes.extend_from_slice(&[0x00, 36, 0x08, 0x01, 0x12, 32]);
    bytes.extend_from_slice(&id.0);
    match PeerId::from_bytes(&bytes) {
        Ok(p) => p,
        // Unreachable (the bytes above are always a valid identity multihash); a random
        // PeerId matches no device, which is the safe failure.
        Err(_) => PeerId::random(),
    }
}

/// How a connection is carried, from its remote address.
fn connection_type(addr: &Multiaddr) -> &'static str {
    if addr.iter().any(|p| matches!(p, Protocol::P2pCircuit)) {
        "relay"
    } else if addr
        .iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
    {
        "quic"
    } else {
        "tcp"
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::thread_rng().gen_range(0.75..1.25))
}

fn label(peer: &PeerId) -> String {
    device_id_of(peer).map_or_else(|| peer.to_string(), |d| d.to_string())
}

/// What a [`peer_error`] says, without the peer (to make the same error again).
fn peer_msg(e: &Error) -> String {
    match e {
        Error::Peer { msg, .. } => msg.clone(),
        other => other.to_string(),
    }
}

fn peer_error(peer: &PeerId, msg: impl Into<String>) -> Error {
    Error::Peer {
        peer: label(peer),
        msg: msg.into(),
    }
}

#[derive(NetworkBehaviour)]
struct Behaviour {
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    index: request_response::Behaviour<CborCodec<IndexRequest, IndexResponse>>,
    block: request_response::Behaviour<BlockCodec>,
    blocks: request_response::Behaviour<BatchCodec>,
    join: request_response::Behaviour<CborCodec<JoinRequest, JoinResponse>>,
    /// Dialing and listening through circuit-relay-v2 servers (`…/p2p/RELAY/p2p-circuit`).
    relay_client: relay::client::Behaviour,
    /// Upgrades relayed connections to direct ones by hole punching, when it can.
    dcutr: dcutr::Behaviour,
}

/// Knobs the tests turn to play misbehaving peers; [`start`] uses the defaults.
#[derive(Clone, Default)]
pub(crate) struct Tuning {
    /// Junk bytes appended to every block data response.
    #[cfg(test)]
    pub(crate) junk_after_block_data: usize,
    /// Play an older peer: do not accept `/ferry/blocks/1` (asking with it still works).
    #[cfg(test)]
    pub(crate) no_inbound_batches: bool,
    /// Play a Ferry from before TLS: secure connections with Noise only (and no lanes).
    #[cfg(test)]
    pub(crate) noise_only: bool,
    /// Play a Ferry from before the block lanes: dial none, take none.
    #[cfg(test)]
    pub(crate) no_lanes: bool,
    /// Junk bytes appended to every block answered on a lane (libp2p's answers are left
    /// alone unless `junk_after_block_data` is set).
    #[cfg(test)]
    pub(crate) lane_junk: usize,
}

fn build_behaviour(
    cfg: &NetConfig,
    local: PeerId,
    relay_client: relay::client::Behaviour,
    tuning: &Tuning,
) -> Result<Behaviour> {
    let identify = identify::Behaviour::new(
        identify::Config::new("/ferry/1".into(), cfg.keypair.public())
            .with_agent_version(format!("ferry/{}", env!("CARGO_PKG_VERSION"))),
    );
    let mdns = if cfg.mdns {
        let m = mdns::tokio::Behaviour::new(mdns::Config::default(), local)
            .map_err(|e| Error::Net(format!("cannot start mDNS: {e}")))?;
        Some(m)
    } else {
        None
    };
    let index = request_response::Behaviour::with_codec(
        CborCodec::new(MAX_INDEX_MESSAGE, MAX_INDEX_RESPONSE),
        [(StreamProtocol::new(INDEX_PROTOCOL), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(INDEX_TIMEOUT)
            .with_max_concurrent_streams(INDEX_STREAMS),
    );
    #[allow(unused_mut)]
    let mut block_codec = BlockCodec::default();
    #[cfg(test)]
    {
        block_codec.junk_after_data = tuning.junk_after_block_data;
    }
    #[allow(unused_mut)]
    let mut batch_support = ProtocolSupport::Full;
    #[cfg(test)]
    if tuning.no_inbound_batches {
        batch_support = ProtocolSupport::Outbound;
    }
    let _ = tuning;
    let block = request_response::Behaviour::with_codec(
        block_codec,
        [(StreamProtocol::new(BLOCK_PROTOCOL), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(BLOCK_TIMEOUT)
            .with_max_concurrent_streams(BLOCK_STREAMS),
    );
    let blocks = request_response::Behaviour::with_codec(
        BatchCodec::default(),
        [(StreamProtocol::new(BLOCKS_PROTOCOL), batch_support)],
        request_response::Config::default()
            .with_request_timeout(BLOCK_TIMEOUT)
            .with_max_concurrent_streams(BLOCK_STREAMS),
    );
    let join = request_response::Behaviour::with_codec(
        CborCodec::new(MAX_JOIN_MESSAGE, MAX_JOIN_MESSAGE),
        [(StreamProtocol::new(JOIN_PROTOCOL), ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(JOIN_TIMEOUT)
            .with_max_concurrent_streams(JOIN_STREAMS),
    );
    Ok(Behaviour {
        identify,
        ping: ping::Behaviour::new(ping::Config::new()),
        mdns: Toggle::from(mdns),
        index,
        block,
        blocks,
        join,
        relay_client,
        dcutr: dcutr::Behaviour::new(local),
    })
}

/// TCP+TLS (or Noise)+Yamux or QUIC (whichever the address names), with DNS resolution when the
/// system has a resolver, plus circuits through relays; every connection's muxer is
/// wrapped to count bytes.
fn build_transport(
    keypair: &identity::Keypair,
    traffic: &TrafficTable,
    lanes: &std::sync::Arc<lane::Lanes>,
    relay_transport: relay::client::Transport,
    #[cfg(test)] noise_only: bool,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>> {
    #[cfg(test)]
    let secure = || {
        if noise_only {
            Secure::noise_only(keypair).map_err(Error::Net)
        } else {
            Secure::new(keypair).map_err(Error::Net)
        }
    };
    #[cfg(not(test))]
    let secure = || Secure::new(keypair).map_err(Error::Net);
    let direct = || -> Result<_> {
        let t = traffic.clone();
        let lanes = lanes.clone();
        let tcp = tcp::tokio::Transport::new(tcp::Config::new().nodelay(true))
            .and_then(move |stream, endpoint| lane::divert(lanes, stream, endpoint))
            .upgrade(upgrade::Version::V1)
            .authenticate(secure()?)
            .multiplex(yamux::Config::default())
            .map(move |(peer, muxer), _| {
                let counted = CountingMuxer::boxed(StreamMuxerBox::new(muxer), t.entry(peer));
                (peer, counted)
            });
        let t = traffic.clone();
        let quic =
            quic::tokio::Transport::new(quic::Config::new(keypair)).map(move |(peer, conn), _| {
                let counted = CountingMuxer::boxed(StreamMuxerBox::new(conn), t.entry(peer));
                (peer, counted)
            });
        Ok(tcp.or_transport(quic).map(|either, _| either.into_inner()))
    };
    let direct: Boxed<(PeerId, StreamMuxerBox)> =
        match libp2p::dns::tokio::Transport::system(direct()?) {
            Ok(dns) => dns.boxed(),
            Err(e) => {
                tracing::debug!("no system DNS resolver ({e}); /dns addresses will not resolve");
                direct()?.boxed()
            }
        };
    // Relayed connections get the same TLS (or Noise) + Yamux upgrade, end to end: the relay sees
    // only ciphertext. (The relay itself is reached through `direct`, via the swarm.)
    let t = traffic.clone();
    let relayed = relay_transport
        .upgrade(upgrade::Version::V1)
        .authenticate(secure()?)
        .multiplex(yamux::Config::default())
        .map(move |(peer, muxer), _| {
            let counted = CountingMuxer::boxed(StreamMuxerBox::new(muxer), t.entry(peer));
            (peer, counted)
        });
    Ok(relayed
        .or_transport(direct)
        .map(|either, _| either.into_inner())
        .boxed())
}

/// Starts listening and spawns the event loop on the current tokio runtime. Returns once
/// every listener has its address (so [`NetHandle::listen_addrs`] resolves port 0).
pub async fn start(cfg: NetConfig) -> Result<(NetHandle, mpsc::Receiver<NetEvent>)> {
    start_with(cfg, Tuning::default()).await
}

pub(crate) async fn start_with(
    cfg: NetConfig,
    tuning: Tuning,
) -> Result<(NetHandle, mpsc::Receiver<NetEvent>)> {
    let local_peer = cfg.keypair.public().to_peer_id();
    let local = device_id_of(&local_peer)
        .ok_or_else(|| Error::Net("the device key must be ed25519".into()))?;
    let traffic = TrafficTable::default();
    let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
    #[cfg(test)]
    let no_lanes = !cfg.lanes || tuning.no_lanes || tuning.noise_only;
    #[cfg(not(test))]
    let no_lanes = !cfg.lanes;
    let lane_tls = if no_lanes {
        None
    } else {
        Some(secure::LaneTls::new(&cfg.keypair).map_err(Error::Net)?)
    };
    #[allow(unused_mut)] // set in tests
    let mut lanes = lane::Lanes::new(lane_tls, ev_tx.clone(), traffic.clone(), BLOCK_TIMEOUT);
    #[cfg(test)]
    {
        lanes.junk = tuning.junk_after_block_data.max(tuning.lane_junk);
    }
    let lanes = std::sync::Arc::new(lanes);
    let (relay_transport, relay_client) = relay::client::new(local_peer);
    let transport = build_transport(
        &cfg.keypair,
        &traffic,
        &lanes,
        relay_transport,
        #[cfg(test)]
        tuning.noise_only,
    )?;
    let behaviour = build_behaviour(&cfg, local_peer, relay_client, &tuning)?;
    // Connections to paired devices stay up however quiet they are; connections to
    // anyone else are closed by the loop itself (at once, or after JOIN_GRACE).
    let swarm_cfg = libp2p::swarm::Config::with_tokio_executor()
        .with_idle_connection_timeout(Duration::from_secs(u64::MAX));
    let mut swarm = Swarm::new(transport, behaviour, local_peer, swarm_cfg);

    let mut listeners = Vec::new();
    let mut relay_listens = Vec::new();
    let now = Instant::now();
    for addr in &cfg.listen {
        if relay_of(addr).is_some() {
            relay_listens.push(RelayListen {
                addr: addr.clone(),
                listener: None,
                backoff: BACKOFF_START,
                next_try: now,
            });
            continue;
        }
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| Error::Net(format!("cannot listen on {addr}: {}", error_chain(&e))))?;
        listeners.push((id, addr.clone()));
    }

    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let mut el = EventLoop {
        swarm,
        local: local_peer,
        cmd_rx,
        events: ev_tx,
        events_closed: false,
        backlog: VecDeque::new(),
        listeners: listeners.iter().map(|(id, _)| *id).collect(),
        relays: relay_listens
            .iter()
            .filter_map(|r| relay_of(&r.addr))
            .collect(),
        relay_listens,
        paired: HashMap::new(),
        conns: HashMap::new(),
        peer_conns: HashMap::new(),
        reported: HashSet::new(),
        mdns_addrs: HashMap::new(),
        join_open: false,
        join_targets: HashMap::new(),
        pending_index: HashMap::new(),
        pending_block: HashMap::new(),
        block_queues: HashMap::new(),
        pending_batches: HashMap::new(),
        no_batch: HashSet::new(),
        batches_sent: 0,
        pending_join: HashMap::new(),
        answers: FuturesUnordered::new(),
        traffic,
        lanes: lanes.clone(),
    };
    el.wait_for_listeners(listeners).await?;
    el.listen_via_relays();
    tokio::spawn(el.run());
    Ok((
        NetHandle {
            tx: cmd_tx,
            local,
            lanes,
        },
        ev_rx,
    ))
}

/// What we keep per paired device.
struct Paired {
    id: DeviceId,
    configured: Vec<Multiaddr>,
    /// From identify (the peer's own listen addresses), newest last, capped.
    learned: Vec<Multiaddr>,
    backoff: Duration,
    next_dial: Instant,
    dialing: bool,
    /// When its current run of connections began (None while disconnected).
    connected_since: Option<Instant>,
}

impl Paired {
    fn new(id: DeviceId, now: Instant) -> Self {
        Self {
            id,
            configured: Vec::new(),
            learned: Vec::new(),
            backoff: BACKOFF_START,
            next_dial: now,
            dialing: false,
            connected_since: None,
        }
    }

    /// A failed attempt (or a connection that did not last): wait, then wait longer.
    fn failed(&mut self, now: Instant) {
        self.next_dial = now + jitter(self.backoff);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }
}

struct RelayListen {
    addr: Multiaddr,
    listener: Option<ListenerId>,
    backoff: Duration,
    next_try: Instant,
}

/// The relay named in a circuit address: the `/p2p/ID` right before `/p2p-circuit`.
fn relay_of(addr: &Multiaddr) -> Option<PeerId> {
    let mut last = None;
    for p in addr.iter() {
        match p {
            Protocol::P2p(id) => last = Some(id),
            Protocol::P2pCircuit => return last,
            _ => {}
        }
    }
    None
}

struct Conn {
    peer: PeerId,
    addr: Multiaddr,
    /// Set for connections of unpaired devices allowed to stay a while (join); the loop
    /// closes them at this instant unless the device gets paired first.
    guest_until: Option<Instant>,
    /// Set for a relayed connection once a direct one to the same device exists: the loop
    /// closes it at this instant (see [`RELAY_GRACE`]).
    close_at: Option<Instant>,
}

/// An answer from the daemon to an inbound request, or `None` when it dropped the
/// oneshot or did not answer in time.
enum Answer {
    Index(ResponseChannel<IndexResponse>, Option<IndexResponse>),
    Block(ResponseChannel<BlockResponse>, Option<BlockResponse>),
    Blocks(
        ResponseChannel<Vec<BlockResponse>>,
        Option<Vec<BlockResponse>>,
    ),
    Join(ResponseChannel<JoinResponse>, Option<JoinResponse>),
}

/// The daemon's answer to one inbound batch, made exactly as long as the request: blocks
/// it left out are `NotFound` (the requester looks elsewhere or retries later), extra
/// answers are dropped.
fn await_batch_answer(
    rx: oneshot::Receiver<Vec<BlockResponse>>,
    n: usize,
    channel: ResponseChannel<Vec<BlockResponse>>,
) -> BoxFuture<'static, Answer> {
    async move {
        let got = tokio::time::timeout(BLOCK_TIMEOUT, rx)
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|mut v| {
                v.resize(n, BlockResponse::NotFound);
                v
            });
        Answer::Blocks(channel, got)
    }
    .boxed()
}

/// A small block request waiting for a batch, with who to answer.
type Queued = (BlockRequest, oneshot::Sender<Result<BlockResponse>>);

/// Small block requests to one peer: those waiting, and how many batches are out.
#[derive(Default)]
struct BlockQueue {
    waiting: VecDeque<Queued>,
    in_flight: usize,
}

fn await_answer<T: Send + 'static>(
    rx: oneshot::Receiver<T>,
    limit: Duration,
    wrap: impl FnOnce(Option<T>) -> Answer + Send + 'static,
) -> BoxFuture<'static, Answer> {
    async move {
        let got = tokio::time::timeout(limit, rx)
            .await
            .ok()
            .and_then(|r| r.ok());
        wrap(got)
    }
    .boxed()
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    /// Every lane of this device (see [`lane`]): told who is paired and connected.
    lanes: std::sync::Arc<lane::Lanes>,
    local: PeerId,
    cmd_rx: mpsc::Receiver<Command>,
    events: mpsc::Sender<NetEvent>,
    /// The daemon dropped its receiver: events are discarded from then on.
    events_closed: bool,
    /// Events waiting for room in `events` (see [`EVENT_BACKLOG`]).
    backlog: VecDeque<NetEvent>,
    listeners: Vec<ListenerId>,
    /// Listen addresses through relays (`…/p2p/RELAY/p2p-circuit`): best effort, retried
    /// with backoff whenever the reservation is lost, never a reason not to start.
    relay_listens: Vec<RelayListen>,
    /// Relays we listen or dial through (from our listen addresses and the configured
    /// addresses of paired devices and join targets): their connections are kept, not
    /// reported as unknown devices, and served nothing of ours.
    relays: HashSet<PeerId>,
    paired: HashMap<PeerId, Paired>,
    conns: HashMap<ConnectionId, Conn>,
    /// Established connections per peer, oldest first.
    peer_conns: HashMap<PeerId, Vec<ConnectionId>>,
    /// Paired peers we reported `Connected` and not yet `Disconnected`.
    reported: HashSet<PeerId>,
    mdns_addrs: HashMap<PeerId, Vec<Multiaddr>>,
    /// Joins are open (see [`NetHandle::set_join_open`]).
    join_open: bool,
    /// Unpaired peers we are sending join requests to, with how many are in flight.
    join_targets: HashMap<PeerId, u32>,
    pending_index: HashMap<OutboundRequestId, oneshot::Sender<Result<IndexResponse>>>,
    pending_block: HashMap<OutboundRequestId, oneshot::Sender<Result<BlockResponse>>>,
    /// Small block requests per peer, sent in batches (see [`BATCHES_IN_FLIGHT`]).
    block_queues: HashMap<PeerId, BlockQueue>,
    /// Batches sent, with the requests they carry (re-sent one by one if the peer turns
    /// out not to speak the batch protocol).
    pending_batches: HashMap<OutboundRequestId, (PeerId, Vec<Queued>)>,
    /// Peers that do not speak `/ferry/blocks/1`: asked block by block.
    no_batch: HashSet<PeerId>,
    /// Batches sent since start (tests look at it).
    batches_sent: u64,
    pending_join: HashMap<OutboundRequestId, (PeerId, oneshot::Sender<Result<JoinResponse>>)>,
    /// The daemon's answers to inbound requests, awaited without blocking the loop.
    /// Bounded by the concurrent-stream limits of the protocols.
    answers: FuturesUnordered<BoxFuture<'static, Answer>>,
    traffic: TrafficTable,
}

/// An error with its sources ("a: b: c"): libp2p's transport errors often display as
/// nothing and keep the reason (e.g. "Address already in use") in a source.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.retain(|p| !p.is_empty());
    parts.dedup();
    if parts.is_empty() {
        format!("{e:?}")
    } else {
        parts.join(": ")
    }
}

impl EventLoop {
    async fn wait_for_listeners(&mut self, listeners: Vec<(ListenerId, Multiaddr)>) -> Result<()> {
        let mut waiting: HashMap<ListenerId, Multiaddr> = listeners.into_iter().collect();
        let deadline = tokio::time::sleep(LISTEN_TIMEOUT);
        tokio::pin!(deadline);
        while !waiting.is_empty() {
            tokio::select! {
                ev = self.swarm.select_next_some() => match ev {
                    SwarmEvent::NewListenAddr { listener_id, address } => {
                        tracing::info!("listening on {address}");
                        waiting.remove(&listener_id);
                    }
                    SwarmEvent::ListenerClosed { listener_id, reason, .. }
                        if waiting.contains_key(&listener_id) =>
                    {
                        let addr = waiting.remove(&listener_id).map(|a| a.to_string()).unwrap_or_default();
                        let why = reason.err().map_or_else(|| "closed".to_string(), |e| error_chain(&e));
                        return Err(Error::Net(format!("cannot listen on {addr}: {why}")));
                    }
                    SwarmEvent::ListenerError { listener_id, error } if waiting.contains_key(&listener_id) => {
                        let addr = waiting.remove(&listener_id).map(|a| a.to_string()).unwrap_or_default();
                        return Err(Error::Net(format!("cannot listen on {addr}: {}", error_chain(&error))));
                    }
                    other => self.on_swarm_event(other),
                },
                _ = &mut deadline => {
                    let addrs: Vec<String> = waiting.values().map(|a| a.to_string()).collect();
                    return Err(Error::Net(format!("listeners did not come up: {}", addrs.join(", "))));
                }
            }
        }
        Ok(())
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shutdown_reply = loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = self.cmd_rx.recv() => match cmd {
                    Some(Command::Shutdown(reply)) => break Some(reply),
                    Some(cmd) => self.on_command(cmd),
                    // Every handle is gone: nobody can use the network any more.
                    None => break None,
                },
                Some(answer) = self.answers.next(), if !self.answers.is_empty() => self.on_answer(answer),
                // An owned permit (from a cloned sender) so the branch borrows nothing of self.
                permit = self.events.clone().reserve_owned(), if !self.backlog.is_empty() && !self.events_closed => {
                    match permit {
                        Ok(permit) => {
                            if let Some(ev) = self.backlog.pop_front() {
                                permit.send(ev);
                            }
                        }
                        Err(_) => {
                            self.events_closed = true;
                            self.backlog.clear();
                        }
                    }
                }
                _ = tick.tick() => self.on_tick(),
            }
        };
        self.close_down().await;
        if let Some(reply) = shutdown_reply {
            let _ = reply.send(());
        }
    }

    /// Written order: stop listening, close every connection, give them a moment to
    /// close cleanly (so the remote sees a disconnect rather than a timeout), then drop
    /// the swarm, which fails every outstanding request.
    async fn close_down(&mut self) {
        self.lanes.shutdown();
        let relayed = self
            .relay_listens
            .iter_mut()
            .filter_map(|r| r.listener.take());
        for id in std::mem::take(&mut self.listeners)
            .into_iter()
            .chain(relayed.collect::<Vec<_>>())
        {
            self.swarm.remove_listener(id);
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for p in peers {
            let _ = self.swarm.disconnect_peer_id(p);
        }
        let deadline = tokio::time::sleep(SHUTDOWN_GRACE);
        tokio::pin!(deadline);
        while self.swarm.connected_peers().next().is_some() {
            tokio::select! {
                ev = self.swarm.select_next_some() => {
                    if let SwarmEvent::ConnectionClosed { .. } = ev {
                        tracing::trace!("connection closed during shutdown");
                    }
                }
                _ = &mut deadline => break,
            }
        }
        tracing::debug!("network loop stopped");
    }

    /// Queues an event for the daemon without ever blocking the loop. Returns false when
    /// the event was dropped (no receiver, or the backlog is full).
    fn emit(&mut self, ev: NetEvent) -> bool {
        if self.events_closed {
            return false;
        }
        let ev = if self.backlog.is_empty() {
            match self.events.try_send(ev) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.events_closed = true;
                    return false;
                }
                Err(mpsc::error::TrySendError::Full(ev)) => ev,
            }
        } else {
            ev
        };
        let essential = matches!(
            ev,
            NetEvent::Connected { .. } | NetEvent::Disconnected { .. }
        );
        if self.backlog.len() >= EVENT_BACKLOG && !essential {
            tracing::warn!("event backlog full; dropping {}", event_name(&ev));
            return false;
        }
        self.backlog.push_back(ev);
        true
    }

    /// (Re)starts listening through every relay whose reservation is not up and due.
    fn listen_via_relays(&mut self) {
        let now = Instant::now();
        for r in self.relay_listens.iter_mut() {
            if r.listener.is_some() || now < r.next_try {
                continue;
            }
            match self.swarm.listen_on(r.addr.clone()) {
                Ok(id) => r.listener = Some(id),
                Err(e) => {
                    tracing::warn!("cannot listen via relay {}: {e}", r.addr);
                    r.next_try = now + jitter(r.backoff);
                    r.backoff = (r.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// A relay listener ended (reservation refused or its connection lost): retry later.
    fn relay_listener_closed(&mut self, id: ListenerId, why: &str) -> bool {
        let now = Instant::now();
        let Some(r) = self
            .relay_listens
            .iter_mut()
            .find(|r| r.listener == Some(id))
        else {
            return false;
        };
        tracing::warn!("listening via relay {} stopped: {why}", r.addr);
        r.listener = None;
        r.next_try = now + jitter(r.backoff);
        r.backoff = (r.backoff * 2).min(BACKOFF_MAX);
        true
    }

    fn on_tick(&mut self) {
        self.listen_via_relays();
        // Small block requests still waiting (a batch slot is normally freed by an answer
        // or a failure; this is the backstop).
        let waiting: Vec<PeerId> = self.block_queues.keys().copied().collect();
        for pid in waiting {
            self.send_batches(pid);
        }
        let now = Instant::now();
        // Guests whose time is up, and relayed connections replaced by direct ones.
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        let closing: Vec<ConnectionId> = self
            .conns
            .iter()
            .filter(|(_, c)| due(c.guest_until) || due(c.close_at))
            .map(|(id, _)| *id)
            .collect();
        for id in closing {
            if let Some(c) = self.conns.get_mut(&id) {
                if due(c.guest_until) {
                    tracing::debug!(peer = %label(&c.peer), "closing unpaired connection (join window over)");
                }
                (c.guest_until, c.close_at) = (None, None);
            }
            self.swarm.close_connection(id);
        }
        // Paired devices that are due a dial.
        for (peer, p) in self.paired.iter_mut() {
            if p.dialing || self.peer_conns.contains_key(peer) || now < p.next_dial {
                continue;
            }
            let mut addrs: Vec<Multiaddr> = p.configured.clone();
            for a in p
                .learned
                .iter()
                .chain(self.mdns_addrs.get(peer).into_iter().flatten())
            {
                if !addrs.contains(a) {
                    addrs.push(a.clone());
                }
            }
            if addrs.is_empty() {
                // Nothing to dial; identify (if it dials us) or mDNS may bring addresses.
                p.next_dial = now + BACKOFF_MAX;
                continue;
            }
            let opts = DialOpts::peer_id(*peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            match self.swarm.dial(opts) {
                Ok(()) => p.dialing = true,
                Err(DialError::DialPeerConditionFalse(_)) => {}
                Err(e) => {
                    tracing::debug!(peer = %p.id, "cannot dial: {e}");
                    p.failed(now);
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::ListenAddrs(reply) => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::SetPeers(peers, reply) => {
                self.set_peers(peers);
                let _ = reply.send(());
            }
            Command::SendIndex { peer, req, reply } => {
                let pid = peer_id_of(&peer);
                match self.check_sendable(&pid) {
                    Ok(()) => {
                        let id = self.swarm.behaviour_mut().index.send_request(&pid, req);
                        self.pending_index.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::RequestBlock { peer, req, reply } => {
                let pid = peer_id_of(&peer);
                if let Msg::Valid(r) = &req {
                    if r.size <= MAX_BATCHED_BLOCK && !self.no_batch.contains(&pid) {
                        let Msg::Valid(r) = req else { return };
                        let q = self.block_queues.entry(pid).or_default();
                        q.waiting.push_back((r, reply));
                        self.send_batches(pid);
                        return;
                    }
                }
                match self.check_sendable(&pid) {
                    Ok(()) => {
                        let id = self.swarm.behaviour_mut().block.send_request(&pid, req);
                        self.pending_block.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Join {
                peer,
                addrs,
                req,
                reply,
            } => {
                let pid = peer_id_of(&peer);
                if pid == self.local {
                    let _ = reply.send(Err(peer_error(&pid, "cannot join this device itself")));
                    return;
                }
                self.relays.extend(addrs.iter().filter_map(relay_of));
                *self.join_targets.entry(pid).or_default() += 1;
                let id = self.swarm.behaviour_mut().join.send_request_with_addresses(
                    &pid,
                    Msg::Valid(req),
                    addrs,
                );
                self.pending_join.insert(id, (pid, reply));
            }
            Command::SetJoinOpen(open, reply) => {
                if open != self.join_open {
                    tracing::info!("joins {}", if open { "open" } else { "closed" });
                }
                self.join_open = open;
                let _ = reply.send(());
            }
            Command::PeerStats(reply) => {
                let _ = reply.send(self.peer_stats());
            }
            // Handled by `run`.
            Command::Shutdown(reply) => {
                let _ = reply.send(());
            }
            #[cfg(test)]
            Command::DialNow(peer, addrs, reply) => {
                let opts = DialOpts::peer_id(peer_id_of(&peer))
                    .addresses(addrs)
                    .condition(PeerCondition::Always)
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::warn!("test dial failed: {e}");
                }
                let _ = reply.send(());
            }
            #[cfg(test)]
            Command::BatchesSent(reply) => {
                let _ = reply.send(self.batches_sent);
            }
            #[cfg(test)]
            Command::ConnTypes(peer, reply) => {
                let types = self
                    .peer_conns
                    .get(&peer_id_of(&peer))
                    .into_iter()
                    .flatten()
                    .filter_map(|c| self.conns.get(c))
                    .map(|c| connection_type(&c.addr))
                    .collect();
                let _ = reply.send(types);
            }
        }
    }

    fn check_sendable(&self, pid: &PeerId) -> Result<()> {
        if !self.paired.contains_key(pid) {
            return Err(peer_error(pid, "not a paired device"));
        }
        if !self.peer_conns.contains_key(pid) {
            return Err(peer_error(pid, "not connected"));
        }
        Ok(())
    }

    fn set_peers(&mut self, peers: Vec<PeerEntry>) {
        let now = Instant::now();
        let mut old = std::mem::take(&mut self.paired);
        let mut added = Vec::new();
        for e in peers {
            let pid = peer_id_of(&e.id);
            if pid == self.local {
                continue;
            }
            let entry = match old.remove(&pid) {
                Some(p) => p,
                None => {
                    added.push(pid);
                    Paired::new(e.id, now)
                }
            };
            let p = self.paired.entry(pid).or_insert(entry);
            // The configured list is replaced, not merged: an address removed from the
            // config is no longer dialed.
            p.configured.clear();
            for a in e.addrs {
                if !p.configured.contains(&a) {
                    p.configured.push(a);
                }
            }
        }
        self.lanes
            .set_paired(self.paired.iter().map(|(pid, p)| (*pid, p.id)).collect());
        self.relays = self
            .relay_listens
            .iter()
            .map(|r| &r.addr)
            .chain(self.paired.values().flat_map(|p| p.configured.iter()))
            .filter_map(relay_of)
            .collect();
        // No longer paired: close; from now on they are strangers.
        for (pid, p) in old {
            if self.peer_conns.contains_key(&pid) {
                tracing::info!(peer = %p.id, "device unpaired; disconnecting");
                let _ = self.swarm.disconnect_peer_id(pid);
            }
        }
        // Newly paired and already connected (e.g. through a join): paired in place.
        for pid in added {
            let Some(conns) = self.peer_conns.get(&pid) else {
                continue;
            };
            let mut first_addr = None;
            for c in conns {
                if let Some(conn) = self.conns.get_mut(c) {
                    conn.guest_until = None;
                    first_addr.get_or_insert_with(|| conn.addr.clone());
                }
            }
            if let (Some(p), Some(addr)) = (self.paired.get_mut(&pid), first_addr) {
                let lane_addrs: Vec<Multiaddr> =
                    p.configured.iter().chain(&p.learned).cloned().collect();
                self.lanes.connected(pid, &lane_addrs);
                p.connected_since = Some(now);
                if self.reported.insert(pid) {
                    let id = p.id;
                    self.emit(NetEvent::Connected { peer: id, addr });
                }
            }
        }
    }

    fn peer_stats(&self) -> Vec<PeerStat> {
        let mut out: Vec<PeerStat> = self
            .paired
            .iter()
            .map(|(pid, p)| {
                // The oldest direct connection, else the oldest relayed one.
                let conns: Vec<&Conn> = self
                    .peer_conns
                    .get(pid)
                    .into_iter()
                    .flatten()
                    .filter_map(|c| self.conns.get(c))
                    .collect();
                let first = conns
                    .iter()
                    .find(|c| connection_type(&c.addr) != "relay")
                    .or(conns.first())
                    .copied();
                let (bytes_in, bytes_out) = self.traffic.get(pid);
                PeerStat {
                    id: p.id,
                    connected: first.is_some(),
                    address: first.map(|c| c.addr.to_string()),
                    bytes_in,
                    bytes_out,
                    connection_type: first.map(|c| connection_type(&c.addr).to_string()),
                    block_lane: self.lanes.has_lane_to(pid),
                }
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Closes every connection of a peer that broke the protocol, and holds off
    /// redialing it for a while.
    fn misbehaved(&mut self, peer: PeerId, why: &str) {
        tracing::warn!(peer = %label(&peer), "closing connections: {why}");
        let _ = self.swarm.disconnect_peer_id(peer);
        if let Some(p) = self.paired.get_mut(&peer) {
            p.backoff = MISBEHAVIOUR_PENALTY;
            p.connected_since = None;
        }
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                ..
            } => self.on_connected(peer_id, connection_id, &endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                cause,
                ..
            } => {
                tracing::debug!(peer = %label(&peer_id), "connection closed: {cause:?}");
                self.on_closed(peer_id, connection_id);
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                let Some(peer) = peer_id else { return };
                let connected = self.peer_conns.contains_key(&peer);
                if let Some(p) = self.paired.get_mut(&peer) {
                    tracing::debug!(peer = %p.id, "dial failed: {error}");
                    p.dialing = false;
                    if !connected {
                        p.failed(Instant::now());
                    }
                }
            }
            SwarmEvent::IncomingConnectionError {
                error,
                send_back_addr,
                ..
            } => {
                tracing::debug!("incoming connection from {send_back_addr} failed: {error}");
            }
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::info!("listening on {address}");
                if let Some(r) = self
                    .relay_listens
                    .iter_mut()
                    .find(|r| r.listener == Some(listener_id))
                {
                    r.backoff = BACKOFF_START;
                }
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                let why = format!("{reason:?}");
                if !self.relay_listener_closed(listener_id, &why) {
                    tracing::warn!("listener on {addresses:?} closed: {why}");
                }
            }
            SwarmEvent::ListenerError { error, .. } => tracing::warn!("listener error: {error}"),
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    fn on_connected(&mut self, peer: PeerId, id: ConnectionId, endpoint: &ConnectedPoint) {
        let now = Instant::now();
        let addr = endpoint.get_remote_address().clone();
        self.peer_conns.entry(peer).or_default().push(id);
        let mut conn = Conn {
            peer,
            addr: addr.clone(),
            guest_until: None,
            close_at: None,
        };
        if let Some(p) = self.paired.get_mut(&peer) {
            // Its lane is dialed where we reached it, else where it said it listens.
            let direct = connection_type(&addr) == "tcp";
            let reached = (endpoint.is_dialer() && direct).then(|| addr.clone());
            let lane_addrs: Vec<Multiaddr> = reached
                .into_iter()
                .chain(p.configured.iter().cloned())
                .chain(p.learned.iter().cloned())
                .collect();
            self.lanes.connected(peer, &lane_addrs);
            p.dialing = false;
            p.connected_since.get_or_insert(now);
            if self.reported.insert(peer) {
                tracing::info!(peer = %p.id, "connected via {addr}");
                let dev = p.id;
                self.emit(NetEvent::Connected { peer: dev, addr });
            }
        } else if self.relays.contains(&peer) {
            tracing::debug!(peer = %peer, "connected to relay via {addr}");
        } else if self.join_targets.contains_key(&peer) {
            conn.guest_until = Some(now + JOIN_GRACE);
        } else {
            match device_id_of(&peer) {
                Some(dev) => {
                    tracing::info!(peer = %dev, "unknown device connected from {addr}");
                    self.emit(NetEvent::UnknownPeer { peer: dev, addr });
                    if self.join_open {
                        conn.guest_until = Some(now + JOIN_GRACE);
                    } else {
                        self.swarm.close_connection(id);
                    }
                }
                None => {
                    tracing::debug!(%peer, "closing connection from a non-ed25519 peer");
                    self.swarm.close_connection(id);
                }
            }
        }
        self.conns.insert(id, conn);
        self.prefer_direct(peer, id);
    }

    /// Requests are spread over all of a peer's connections, so a relayed connection
    /// (slow, capped) is closed shortly after a direct one exists, e.g. after DCUtR punched
    /// a hole, and a new relayed one is not kept beside a direct one.
    fn prefer_direct(&mut self, peer: PeerId, new: ConnectionId) {
        let relayed = |c: &Conn| connection_type(&c.addr) == "relay";
        let Some(list) = self.peer_conns.get(&peer) else {
            return;
        };
        let Some(new_conn) = self.conns.get(&new) else {
            return;
        };
        let mut to_close = Vec::new();
        if relayed(new_conn) {
            let direct_exists = list
                .iter()
                .any(|c| *c != new && self.conns.get(c).is_some_and(|c| !relayed(c)));
            if direct_exists {
                to_close.push(new);
            }
        } else {
            to_close.extend(
                list.iter()
                    .filter(|c| self.conns.get(c).is_some_and(&relayed))
                    .copied(),
            );
        }
        let at = Instant::now() + RELAY_GRACE;
        for c in to_close {
            if let Some(conn) = self.conns.get_mut(&c) {
                if conn.close_at.is_none() {
                    tracing::debug!(peer = %label(&peer), "closing relayed connection soon: a direct one exists");
                    conn.close_at = Some(at);
                }
            }
        }
    }

    fn on_closed(&mut self, peer: PeerId, id: ConnectionId) {
        self.conns.remove(&id);
        let last = match self.peer_conns.get_mut(&peer) {
            Some(list) => {
                list.retain(|c| *c != id);
                list.is_empty()
            }
            None => false,
        };
        if !last {
            return;
        }
        self.peer_conns.remove(&peer);
        self.lanes.disconnected(&peer);
        if self.reported.remove(&peer) {
            if let Some(dev) = device_id_of(&peer) {
                tracing::info!(peer = %dev, "disconnected");
                self.emit(NetEvent::Disconnected { peer: dev });
            }
        }
        let now = Instant::now();
        match self.paired.get_mut(&peer) {
            Some(p) => {
                let lasted = p
                    .connected_since
                    .take()
                    .is_some_and(|since| now.duration_since(since) >= STABLE_CONNECTION);
                if lasted {
                    p.backoff = BACKOFF_START;
                }
                p.failed(now);
            }
            None => self.traffic.forget(&peer),
        }
    }

    fn on_behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if let Some(p) = self.paired.get_mut(&peer_id) {
                    // Accept what the peer reports as its listen addresses, newest last.
                    let mut learned: Vec<Multiaddr> = info
                        .listen_addrs
                        .into_iter()
                        .filter(|a| !p.configured.contains(a))
                        .collect();
                    learned.dedup();
                    let skip = learned.len().saturating_sub(MAX_LEARNED_ADDRS);
                    p.learned = learned.split_off(skip);
                    if self.peer_conns.contains_key(&peer_id) {
                        self.lanes.connected(peer_id, &p.learned);
                    }
                }
            }
            BehaviourEvent::Identify(_) => {}
            BehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(e),
            }) => {
                if !matches!(e, ping::Failure::Unsupported) {
                    tracing::debug!(peer = %label(&peer), "ping failed ({e}); closing connection");
                    self.swarm.close_connection(connection);
                }
            }
            BehaviourEvent::Ping(_) => {}
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                let now = Instant::now();
                for (peer, addr) in found {
                    if peer == self.local {
                        continue;
                    }
                    if !self.mdns_addrs.contains_key(&peer)
                        && self.mdns_addrs.len() >= MAX_MDNS_PEERS
                    {
                        continue;
                    }
                    let list = self.mdns_addrs.entry(peer).or_default();
                    if !list.contains(&addr) {
                        list.push(addr);
                        let skip = list.len().saturating_sub(MAX_LEARNED_ADDRS);
                        list.drain(..skip);
                    }
                    if let Some(p) = self.paired.get_mut(&peer) {
                        if !self.peer_conns.contains_key(&peer) && !p.dialing {
                            // A fresh sighting on the LAN: try now rather than at backoff.
                            p.next_dial = now;
                        }
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => {
                for (peer, addr) in gone {
                    if let Some(list) = self.mdns_addrs.get_mut(&peer) {
                        list.retain(|a| *a != addr);
                        if list.is_empty() {
                            self.mdns_addrs.remove(&peer);
                        }
                    }
                }
            }
            BehaviourEvent::RelayClient(ev) => match ev {
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal: false,
                    ..
                } => tracing::info!(relay = %relay_peer_id, "reservation accepted by relay"),
                other => tracing::debug!("relay client: {other:?}"),
            },
            BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => match result {
                Ok(_) => {
                    tracing::info!(peer = %label(&remote_peer_id), "hole punch succeeded: direct connection")
                }
                Err(e) => tracing::debug!(peer = %label(&remote_peer_id), "hole punch failed: {e}"),
            },
            BehaviourEvent::Index(ev) => self.on_index_event(ev),
            BehaviourEvent::Block(ev) => self.on_block_event(ev),
            BehaviourEvent::Blocks(ev) => self.on_blocks_event(ev),
            BehaviourEvent::Join(ev) => self.on_join_event(ev),
        }
    }

    /// A paired peer's device ID, or None (and the request is dropped) for anyone else.
    fn paired_sender(&self, peer: &PeerId, what: &str) -> Option<DeviceId> {
        let id = self.paired.get(peer).map(|p| p.id);
        if id.is_none() {
            tracing::debug!(peer = %label(peer), "dropping {what} from an unpaired device");
        }
        id
    }

    fn on_outbound_failure(
        &mut self,
        peer: PeerId,
        error: &request_response::OutboundFailure,
    ) -> Error {
        if let request_response::OutboundFailure::Io(e) = error {
            if let Some(why) = malformed_reason(e) {
                let why = why.to_string();
                self.misbehaved(peer, &why);
                return peer_error(&peer, format!("sent a malformed response: {why}"));
            }
        }
        peer_error(&peer, error.to_string())
    }

    fn on_index_event(&mut self, ev: request_response::Event<Msg<IndexRequest>, IndexResponse>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => match request {
                Msg::Invalid(why) => self.misbehaved(peer, &why),
                Msg::Valid(req) => {
                    let Some(dev) = self.paired_sender(&peer, "index request") else {
                        return;
                    };
                    let (tx, rx) = oneshot::channel();
                    if self.emit(NetEvent::IndexRequest {
                        peer: dev,
                        req,
                        reply: tx,
                    }) {
                        self.answers.push(await_answer(rx, INDEX_TIMEOUT, move |a| {
                            Answer::Index(channel, a)
                        }));
                    }
                }
            },
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending_index.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let err = self.on_outbound_failure(peer, &error);
                if let Some(reply) = self.pending_index.remove(&request_id) {
                    let _ = reply.send(Err(err));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(peer = %label(&peer), "inbound index request failed: {error}");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn on_block_event(&mut self, ev: request_response::Event<Msg<BlockRequest>, BlockResponse>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => match request {
                Msg::Invalid(why) => self.misbehaved(peer, &why),
                Msg::Valid(req) => {
                    let Some(dev) = self.paired_sender(&peer, "block request") else {
                        return;
                    };
                    let (tx, rx) = oneshot::channel();
                    if self.emit(NetEvent::BlockRequest {
                        peer: dev,
                        req,
                        reply: tx,
                    }) {
                        self.answers.push(await_answer(rx, BLOCK_TIMEOUT, move |a| {
                            Answer::Block(channel, a)
                        }));
                    }
                }
            },
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some(reply) = self.pending_block.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let err = self.on_outbound_failure(peer, &error);
                if let Some(reply) = self.pending_block.remove(&request_id) {
                    let _ = reply.send(Err(err));
                }
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(peer = %label(&peer), "inbound block request failed: {error}");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    /// Sends what waits for `pid` in batches, while fewer than [`BATCHES_IN_FLIGHT`] are
    /// out; fails it all if the peer cannot be sent to.
    fn send_batches(&mut self, pid: PeerId) {
        let sendable = self.check_sendable(&pid);
        let Some(q) = self.block_queues.get_mut(&pid) else {
            return;
        };
        if let Err(e) = sendable {
            let why = peer_msg(&e);
            for (_, reply) in q.waiting.drain(..) {
                let _ = reply.send(Err(peer_error(&pid, why.clone())));
            }
        }
        if self.no_batch.contains(&pid) {
            // Found out meanwhile that the peer is older: what still waits goes one by one.
            let waiting: Vec<Queued> = q.waiting.drain(..).collect();
            self.ask_one_by_one(pid, waiting);
        }
        let Some(q) = self.block_queues.get_mut(&pid) else {
            return;
        };
        while q.in_flight < BATCHES_IN_FLIGHT && !q.waiting.is_empty() {
            let mut batch = Vec::new();
            let mut bytes = 0u64;
            while let Some((r, _)) = q.waiting.front() {
                if batch.len() == MAX_BATCH_BLOCKS || bytes + u64::from(r.size) > MAX_BATCH_DATA {
                    break;
                }
                bytes += u64::from(r.size);
                batch.extend(q.waiting.pop_front());
            }
            let reqs = batch.iter().map(|(r, _)| r.clone()).collect();
            let id = self
                .swarm
                .behaviour_mut()
                .blocks
                .send_request(&pid, Msg::Valid(reqs));
            q.in_flight += 1;
            self.batches_sent += 1;
            self.pending_batches.insert(id, (pid, batch));
        }
        if q.waiting.is_empty() && q.in_flight == 0 {
            self.block_queues.remove(&pid);
        }
    }

    /// Sends each request on its own (`/ferry/block/1`), for a peer without batches.
    fn ask_one_by_one(&mut self, pid: PeerId, reqs: Vec<Queued>) {
        for (req, reply) in reqs {
            let id = self
                .swarm
                .behaviour_mut()
                .block
                .send_request(&pid, Msg::Valid(req));
            self.pending_block.insert(id, reply);
        }
    }

    /// A batch is answered or failed: one fewer out for its peer, so send what waits.
    fn batch_done(&mut self, pid: PeerId) {
        if let Some(q) = self.block_queues.get_mut(&pid) {
            q.in_flight = q.in_flight.saturating_sub(1);
        }
        self.send_batches(pid);
    }

    fn on_blocks_event(
        &mut self,
        ev: request_response::Event<Msg<Vec<BlockRequest>>, Vec<BlockResponse>>,
    ) {
        use request_response::{Event, Message, OutboundFailure};
        match ev {
            Event::Message {
                peer,
                message:
                    Message::Request {
                        request, channel, ..
                    },
                ..
            } => match request {
                Msg::Invalid(why) => self.misbehaved(peer, &why),
                Msg::Valid(reqs) => {
                    let Some(dev) = self.paired_sender(&peer, "block batch") else {
                        return;
                    };
                    let (tx, rx) = oneshot::channel();
                    let n = reqs.len();
                    if self.emit(NetEvent::BlockBatch {
                        peer: dev,
                        reqs,
                        reply: tx,
                    }) {
                        self.answers.push(await_batch_answer(rx, n, channel));
                    }
                }
            },
            Event::Message {
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((pid, batch)) = self.pending_batches.remove(&request_id) {
                    // The codec read exactly one answer per request.
                    for ((_, reply), resp) in batch.into_iter().zip(response) {
                        let _ = reply.send(Ok(resp));
                    }
                    self.batch_done(pid);
                }
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let unsupported = matches!(error, OutboundFailure::UnsupportedProtocols);
                let err = self.on_outbound_failure(peer, &error);
                let Some((pid, batch)) = self.pending_batches.remove(&request_id) else {
                    return;
                };
                if unsupported {
                    // An older peer: ask it block by block from now on.
                    if self.no_batch.insert(pid) {
                        tracing::debug!(peer = %label(&pid), "peer does not speak {BLOCKS_PROTOCOL}; asking block by block");
                    }
                    self.ask_one_by_one(pid, batch);
                } else {
                    let why = peer_msg(&err);
                    for (_, reply) in batch {
                        let _ = reply.send(Err(peer_error(&pid, why.clone())));
                    }
                }
                self.batch_done(pid);
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(peer = %label(&peer), "inbound block batch failed: {error}");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    fn on_join_event(&mut self, ev: request_response::Event<Msg<JoinRequest>, JoinResponse>) {
        use request_response::{Event, Message};
        match ev {
            Event::Message {
                peer,
                connection_id,
                message:
                    Message::Request {
                        request, channel, ..
                    },
            } => match request {
                Msg::Invalid(why) => self.misbehaved(peer, &why),
                Msg::Valid(req) => {
                    if !self.paired.contains_key(&peer) && !self.join_open {
                        let refusal = JoinResponse::Refused(
                            "this device has no open invite right now".into(),
                        );
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .join
                            .send_response(channel, refusal);
                        return;
                    }
                    let (Some(dev), Some(addr)) = (
                        device_id_of(&peer),
                        self.conns.get(&connection_id).map(|c| c.addr.clone()),
                    ) else {
                        return;
                    };
                    let (tx, rx) = oneshot::channel();
                    if self.emit(NetEvent::JoinRequest {
                        peer: dev,
                        addr,
                        req,
                        reply: tx,
                    }) {
                        self.answers.push(await_answer(rx, JOIN_TIMEOUT, move |a| {
                            Answer::Join(channel, a)
                        }));
                    }
                }
            },
            Event::Message {
                peer,
                message:
                    Message::Response {
                        request_id,
                        response,
                    },
                ..
            } => {
                if let Some((_, reply)) = self.pending_join.remove(&request_id) {
                    let _ = reply.send(Ok(response));
                }
                self.join_finished(peer);
            }
            Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                let err = self.on_outbound_failure(peer, &error);
                if let Some((_, reply)) = self.pending_join.remove(&request_id) {
                    let _ = reply.send(Err(err));
                }
                self.join_finished(peer);
            }
            Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(peer = %label(&peer), "inbound join request failed: {error}");
            }
            Event::ResponseSent { .. } => {}
        }
    }

    /// One of our join requests to `peer` is over; when it was the last and the peer is
    /// still not paired, its connections get a short grace and then close.
    fn join_finished(&mut self, peer: PeerId) {
        if let Some(n) = self.join_targets.get_mut(&peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.join_targets.remove(&peer);
            }
        }
        if self.join_targets.contains_key(&peer) || self.paired.contains_key(&peer) {
            return;
        }
        let until = Instant::now() + AFTER_JOIN_GRACE;
        for c in self.peer_conns.get(&peer).into_iter().flatten() {
            if let Some(conn) = self.conns.get_mut(c) {
                conn.guest_until = Some(conn.guest_until.map_or(until, |t| t.min(until)));
            }
        }
    }

    fn on_answer(&mut self, answer: Answer) {
        let b = self.swarm.behaviour_mut();
        // A failed send means the request already timed out or its connection closed.
        match answer {
            Answer::Index(ch, Some(resp)) => {
                let _ = b.index.send_response(ch, resp);
            }
            Answer::Block(ch, Some(resp)) => {
                let _ = b.block.send_response(ch, resp);
            }
            Answer::Blocks(ch, Some(resps)) => {
                let _ = b.blocks.send_response(ch, resps);
            }
            Answer::Join(ch, Some(resp)) => {
                let _ = b.join.send_response(ch, resp);
            }
            // The daemon dropped the request (or sat on it past the timeout): the remote
            // sees its stream close without an answer.
            Answer::Index(_, None)
            | Answer::Block(_, None)
            | Answer::Blocks(_, None)
            | Answer::Join(_, None) => {}
        }
    }
}

fn event_name(ev: &NetEvent) -> &'static str {
    match ev {
        NetEvent::Connected { .. } => "Connected",
        NetEvent::Disconnected { .. } => "Disconnected",
        NetEvent::UnknownPeer { .. } => "UnknownPeer",
        NetEvent::IndexRequest { .. } => "IndexRequest",
        NetEvent::BlockRequest { .. } => "BlockRequest",
        NetEvent::BlockBatch { .. } => "BlockBatch",
        NetEvent::JoinRequest { .. } => "JoinRequest",
    }
}
