//! Fewer, larger writes under the stream muxer.
//!
//! Yamux writes each frame as two writes, a 12-byte header and a body of at most 16 KiB,
//! and flushes after every frame. Over TLS each write became a record of its own and a
//! `writev` of its own: a 1 GiB transfer made about 131,000 of each on the sending side,
//! half of them 12-byte records. [`Coalesce`] sits between the muxer and the encrypted
//! stream. It gathers writes in a buffer and sends them on when the buffer is full or the
//! muxer has nothing more to write for now.
//!
//! Knowing "nothing more for now" is the trick. A flush with fresh data in the buffer
//! answers `Pending` and asks for the task to be polled again at once. The muxer goes on
//! with its next frame, and when it has none it returns. When it is polled again, a flush
//! finds nothing new since the last one and sends the buffer. Data never waits longer than
//! that one extra poll.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures::{AsyncRead, AsyncWrite};

/// Buffered bytes at which writes go on without waiting for a flush.
const LIMIT: usize = 64 * 1024;

pub(crate) struct Coalesce<S> {
    pub(crate) inner: S,
    buf: Vec<u8>,
    /// Bytes at the start of `buf` the inner stream has taken already.
    sent: usize,
    /// Bytes came in since the last flush that was put off.
    fresh: bool,
}

impl<S> Coalesce<S> {
    pub(crate) fn new(inner: S) -> Self {
        Coalesce {
            inner,
            buf: Vec::new(),
            sent: 0,
            fresh: false,
        }
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Hands everything buffered to the inner stream.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() >= LIMIT {
            ready!(this.poll_drain(cx))?;
        }
        if this.buf.is_empty() && data.len() >= LIMIT {
            return Pin::new(&mut this.inner).poll_write(cx, data);
        }
        let n = data.len().min(2 * LIMIT - this.buf.len());
        this.buf.extend_from_slice(&data[..n]);
        this.fresh = true;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.fresh && this.buf.len() < LIMIT {
            // More may follow in this same poll of the writer: send it all together when
            // the writer comes back with nothing new.
            this.fresh = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.fresh = false;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker;

    /// The stream below: records every write it takes. A stingy one takes at most `max`
    /// bytes per write and answers "not now" to every other call.
    struct Recorder {
        writes: Vec<Vec<u8>>,
        flushes: usize,
        closed: bool,
        max: usize,
        stingy: bool,
        calls: usize,
    }

    impl Default for Recorder {
        fn default() -> Self {
            Recorder {
                writes: Vec::new(),
                flushes: 0,
                closed: false,
                max: usize::MAX,
                stingy: false,
                calls: 0,
            }
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.calls += 1;
            if this.stingy && this.calls % 2 == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = data.len().min(this.max);
            this.writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().closed = true;
            Poll::Ready(Ok(()))
        }
    }

    fn write(c: &mut Coalesce<Recorder>, cx: &mut Context<'_>, data: &[u8]) {
        assert!(matches!(Pin::new(c).poll_write(cx, data), Poll::Ready(Ok(n)) if n == data.len()));
    }

    #[test]
    fn frames_written_in_one_poll_go_out_as_one_write_on_the_next() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesce::new(Recorder::default());
        // One poll of a muxer: header, body, flush, for three frames.
        for i in 0..3u8 {
            write(&mut c, &mut cx, &[i; 12]);
            write(&mut c, &mut cx, &[i; 1000]);
            assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        }
        assert!(c.inner.writes.is_empty());
        // Polled again with nothing new: everything goes, in order, in one write.
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        assert_eq!(c.inner.writes.len(), 1);
        let expect: Vec<u8> = (0..3u8)
            .flat_map(|i| [vec![i; 12], vec![i; 1000]].concat())
            .collect();
        assert_eq!(c.inner.writes[0], expect);
        assert_eq!(c.inner.flushes, 1);
    }

    #[test]
    fn a_full_buffer_is_sent_without_a_flush_and_big_writes_pass_through() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesce::new(Recorder::default());
        for _ in 0..5 {
            write(&mut c, &mut cx, &[7; 16 * 1024]);
        }
        // The fifth write found 64 KiB waiting and sent it first.
        assert_eq!(c.inner.writes.len(), 1);
        assert_eq!(c.inner.writes[0].len(), LIMIT);
        // Full buffer: a flush sends at once.
        write(&mut c, &mut cx, &[8; LIMIT]);
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        let total: usize = c.inner.writes.iter().map(Vec::len).sum();
        assert_eq!(total, 5 * 16 * 1024 + LIMIT);
        // Nothing buffered and a large write: straight through.
        let before = c.inner.writes.len();
        write(&mut c, &mut cx, &[9; 2 * LIMIT]);
        assert_eq!(c.inner.writes.len(), before + 1);
        assert_eq!(c.inner.writes[before].len(), 2 * LIMIT);
    }

    #[test]
    fn short_and_refused_writes_below_lose_and_reorder_nothing() {
        use futures::AsyncWriteExt;
        let mut c = Coalesce::new(Recorder {
            max: 1000,
            stingy: true,
            ..Recorder::default()
        });
        // Frames of every size around the limit, each a header and a body and then a
        // flush, as a muxer writes them.
        let mut sent = Vec::new();
        futures::executor::block_on(async {
            for (i, len) in [12, 16 * 1024, 1, LIMIT - 1, LIMIT, 3 * LIMIT, 7]
                .iter()
                .enumerate()
            {
                let header = [i as u8; 12];
                let body: Vec<u8> = (0..*len).map(|j| (i * 31 + j) as u8).collect();
                c.write_all(&header).await.unwrap();
                c.write_all(&body).await.unwrap();
                c.flush().await.unwrap();
                sent.extend_from_slice(&header);
                sent.extend_from_slice(&body);
            }
            c.close().await.unwrap();
        });
        let got = c.inner.writes.concat();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "bytes reordered or changed");
        assert!(c.buf.is_empty());
    }

    #[test]
    fn close_sends_what_is_buffered_first() {
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut c = Coalesce::new(Recorder::default());
        write(&mut c, &mut cx, b"last words");
        assert!(Pin::new(&mut c).poll_close(&mut cx).is_ready());
        assert_eq!(c.inner.writes, vec![b"last words".to_vec()]);
        assert!(c.inner.closed);
    }
}
