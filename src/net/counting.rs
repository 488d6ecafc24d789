//! Bytes on the wire per peer: a stream-muxer wrapper that counts what every substream
//! of a connection reads and writes.
//!
//! It counts substream payload (protocol negotiation included, the transport's own
//! framing and encryption overhead not), which is what a person means by "bytes to and
//! from that device". Counters live in a [`TrafficTable`] keyed by PeerId, shared between
//! the transport (which creates connections) and the event loop (which reports them).

use std::{
    collections::HashMap,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    task::{Context, Poll},
};

use futures::{AsyncRead, AsyncWrite};
use libp2p::{
    core::muxing::{StreamMuxer, StreamMuxerBox, StreamMuxerEvent, StreamMuxerExt, SubstreamBox},
    PeerId,
};

/// Bytes received from and sent to one peer since this process started.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    pub(crate) inbound: AtomicU64,
    pub(crate) outbound: AtomicU64,
}

/// PeerId → its counters. Entries of unpaired peers are forgotten when they disconnect,
/// so strangers cannot grow the table without bound.
#[derive(Debug, Clone, Default)]
pub(crate) struct TrafficTable(Arc<Mutex<HashMap<PeerId, Arc<Traffic>>>>);

impl TrafficTable {
    pub(crate) fn entry(&self, peer: PeerId) -> Arc<Traffic> {
        // A poisoned lock only means another thread panicked mid-insert; the map is fine.
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(peer).or_default().clone()
    }

    /// (bytes in, bytes out) for `peer`, zero when never connected.
    pub(crate) fn get(&self, peer: &PeerId) -> (u64, u64) {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(peer).map_or((0, 0), |t| {
            (
                t.inbound.load(Ordering::Relaxed),
                t.outbound.load(Ordering::Relaxed),
            )
        })
    }

    pub(crate) fn forget(&self, peer: &PeerId) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(peer);
    }
}

/// A muxer whose substreams add to a peer's [`Traffic`].
pub(crate) struct CountingMuxer {
    inner: StreamMuxerBox,
    traffic: Arc<Traffic>,
}

impl CountingMuxer {
    pub(crate) fn boxed(inner: StreamMuxerBox, traffic: Arc<Traffic>) -> StreamMuxerBox {
        StreamMuxerBox::new(CountingMuxer { inner, traffic })
    }
}

impl StreamMuxer for CountingMuxer {
    type Substream = CountingStream;
    type Error = io::Error;

    fn poll_inbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<CountingStream>> {
        let this = self.get_mut();
        let traffic = &this.traffic;
        this.inner
            .poll_inbound_unpin(cx)
            .map_ok(|inner| CountingStream {
                inner,
                traffic: traffic.clone(),
            })
    }

    fn poll_outbound(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<CountingStream>> {
        let this = self.get_mut();
        let traffic = &this.traffic;
        this.inner
            .poll_outbound_unpin(cx)
            .map_ok(|inner| CountingStream {
                inner,
                traffic: traffic.clone(),
            })
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().inner.poll_close_unpin(cx)
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<StreamMuxerEvent>> {
        self.get_mut().inner.poll_unpin(cx)
    }
}

pub(crate) struct CountingStream {
    inner: SubstreamBox,
    traffic: Arc<Traffic>,
}

impl AsyncRead for CountingStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.traffic.inbound.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [io::IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            this.traffic.inbound.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for CountingStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.traffic
                .outbound
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            this.traffic
                .outbound
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}
