//! `ferry relay`: a circuit-relay-v2 server for devices that cannot reach each other
//! directly (both behind NAT). libp2p's own relay protocol, nothing home-made.
//!
//! The relay never sees folder data in the clear: each relayed connection carries its
//! own TLS (or Noise) session end to end between the two devices. It serves anyone (that is
//! what a relay is for) within the limits below, and it takes part in no Ferry
//! protocol. Devices use it by listening on `/…/p2p/RELAY_ID/p2p-circuit` and by
//! having peers' addresses of the form `/…/p2p/RELAY_ID/p2p-circuit`.

use std::time::Duration;

use futures::StreamExt;
use libp2p::{
    core::{muxing::StreamMuxerBox, upgrade},
    identify, identity, ping, quic, relay,
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, yamux, Multiaddr, PeerId, Swarm, Transport,
};
use tokio::sync::oneshot;

use super::secure::Secure;
use crate::error::{Error, Result};

/// Unlike libp2p's defaults (2 minutes and 128 KiB per circuit, enough only to
/// coordinate a hole punch), Ferry's relay carries data when hole punching fails, so
/// circuits are long and large; a circuit that runs out is simply redialed.
const MAX_CIRCUIT_DURATION: Duration = Duration::from_secs(60 * 60);
const MAX_CIRCUIT_BYTES: u64 = 1 << 30;
const MAX_CIRCUITS: usize = 64;
const MAX_CIRCUITS_PER_PEER: usize = 8;
/// How long `start_relay` waits for its listeners.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(NetworkBehaviour)]
struct RelayBehaviour {
    relay: relay::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// A running relay; dropping it (or [`RelayHandle::shutdown`]) stops it.
#[derive(Debug)]
pub struct RelayHandle {
    peer_id: PeerId,
    listen: Vec<Multiaddr>,
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

impl RelayHandle {
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The bound addresses (port 0 resolved), without the `/p2p/ID` suffix.
    pub fn listen_addrs(&self) -> &[Multiaddr] {
        &self.listen
    }

    /// Stops the relay and waits until its listeners are closed.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let (tx, rx) = oneshot::channel();
            if stop.send(tx).is_ok() {
                let _ = rx.await;
            }
        }
    }
}

/// Starts a relay server listening on `listen` (TCP and/or QUIC) and spawns its loop on
/// the current tokio runtime. Its listen addresses are announced as its external
/// addresses, which is what makes libp2p's relay accept reservations.
pub async fn start_relay(
    keypair: identity::Keypair,
    listen: Vec<Multiaddr>,
) -> Result<RelayHandle> {
    let peer_id = keypair.public().to_peer_id();
    let secure = Secure::new(&keypair).map_err(Error::Net)?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::new().nodelay(true))
        .upgrade(upgrade::Version::V1)
        .authenticate(secure)
        .multiplex(yamux::Config::default())
        .map(|(p, m), _| (p, StreamMuxerBox::new(m)));
    let quic = quic::tokio::Transport::new(quic::Config::new(&keypair))
        .map(|(p, c), _| (p, StreamMuxerBox::new(c)));
    let transport = tcp
        .or_transport(quic)
        .map(|either, _| either.into_inner())
        .boxed();
    let relay_cfg = relay::Config {
        max_circuits: MAX_CIRCUITS,
        max_circuits_per_peer: MAX_CIRCUITS_PER_PEER,
        max_circuit_duration: MAX_CIRCUIT_DURATION,
        max_circuit_bytes: MAX_CIRCUIT_BYTES,
        ..relay::Config::default()
    };
    let behaviour = RelayBehaviour {
        relay: relay::Behaviour::new(peer_id, relay_cfg),
        identify: identify::Behaviour::new(identify::Config::new(
            "/ferry/1".into(),
            keypair.public(),
        )),
        ping: ping::Behaviour::new(ping::Config::new()),
    };
    let mut swarm = Swarm::new(
        transport,
        behaviour,
        peer_id,
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(Duration::from_secs(60)),
    );
    let mut waiting = std::collections::HashSet::new();
    for addr in &listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| Error::Net(format!("relay cannot listen on {addr}: {e}")))?;
        waiting.insert(id);
    }
    let mut bound = Vec::new();
    let deadline = tokio::time::sleep(LISTEN_TIMEOUT);
    tokio::pin!(deadline);
    while !waiting.is_empty() {
        tokio::select! {
            ev = swarm.select_next_some() => match ev {
                SwarmEvent::NewListenAddr { listener_id, address } => {
                    waiting.remove(&listener_id);
                    swarm.add_external_address(address.clone());
                    bound.push(address);
                }
                SwarmEvent::ListenerClosed { reason, .. } => {
                    return Err(Error::Net(format!("relay listener closed: {reason:?}")));
                }
                SwarmEvent::ListenerError { error, .. } => {
                    return Err(Error::Net(format!("relay listener failed: {error}")));
                }
                _ => {}
            },
            _ = &mut deadline => return Err(Error::Net("relay listeners did not come up".into())),
        }
    }
    let (stop_tx, mut stop_rx) = oneshot::channel::<oneshot::Sender<()>>();
    tokio::spawn(async move {
        let done = loop {
            tokio::select! {
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::NewListenAddr { address, .. } => {
                        swarm.add_external_address(address);
                    }
                    SwarmEvent::Behaviour(RelayBehaviourEvent::Relay(ev)) => {
                        tracing::debug!("relay: {ev:?}");
                    }
                    _ => {}
                },
                stop = &mut stop_rx => break stop.ok(),
            }
        };
        drop(swarm);
        if let Some(done) = done {
            let _ = done.send(());
        }
    });
    tracing::info!(%peer_id, "relay listening on {bound:?}");
    Ok(RelayHandle {
        peer_id,
        listen: bound,
        stop: Some(stop_tx),
    })
}
