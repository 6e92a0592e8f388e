//! A write deadline on a connection: a client that stops reading its response (or reads it
//! a few bytes a minute) has the connection closed once a write has made no progress for
//! the timeout, instead of holding a connection slot and the response's buffer until the
//! connection's maximum age. hyper has a header read timeout but none for writes.
//!
//! It also makes a connection that writes much give way: after [`YIELD_EVERY`] bytes it
//! answers one write with Pending and wakes itself at once, so its task goes to the back of
//! the worker's queue. A loopback socket takes megabytes per poll, and in a storm of a
//! thousand scrapes each task copied a whole body before the worker looked at anything
//! else; a /healthz probe (its accept, then its request) waited behind all of them.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// Bytes written between two voluntary yields.
pub const YIELD_EVERY: usize = 256 * 1024;

pub struct WriteTimeout<T> {
    inner: T,
    timeout: Duration,
    /// Armed while a write is pending; reset whenever one makes progress.
    deadline: Pin<Box<Sleep>>,
    armed: bool,
    /// Written since the last voluntary yield.
    since_yield: usize,
}

impl<T> WriteTimeout<T> {
    pub fn new(inner: T, timeout: Duration) -> Self {
        WriteTimeout {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
            since_yield: 0,
        }
    }

    /// Pending (woken at once) when this connection has written [`YIELD_EVERY`] bytes
    /// since it last gave way. Not a stall: the write deadline is not armed.
    fn give_way(&mut self, cx: &mut Context<'_>) -> bool {
        if self.since_yield < YIELD_EVERY {
            return false;
        }
        self.since_yield = 0;
        cx.waker().wake_by_ref();
        true
    }

    fn wrote(&mut self, r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r {
            self.since_yield += n;
        }
    }

    /// After the inner write returned `r`: progress disarms, pending arms the deadline (once)
    /// and fails the write when it has passed.
    fn check<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => {
                if !self.armed {
                    self.armed = true;
                    let at = Instant::now() + self.timeout;
                    self.deadline.as_mut().reset(at);
                }
                match self.deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the client read nothing for {:?}", self.timeout),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
            done => {
                self.armed = false;
                done
            }
        }
    }
}

use std::future::Future as _;

impl<T: AsyncRead + Unpin> AsyncRead for WriteTimeout<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.give_way(cx) {
            return Poll::Pending;
        }
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&r);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.give_way(cx) {
            return Poll::Pending;
        }
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.check(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    use std::task::Wake;

    use super::*;

    /// Takes every write whole, at once.
    struct Sink(usize);

    impl AsyncWrite for Sink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0 += buf.len();
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A writer whose socket takes everything gives way once every YIELD_EVERY bytes, woken
    /// at once, and that is no stall: with a 1 ms deadline long past, the writes go on.
    #[tokio::test]
    async fn a_big_writer_gives_way_without_timing_out() {
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut w = WriteTimeout::new(Sink(0), Duration::from_millis(1));
        let chunk = vec![0u8; 64 * 1024];
        let mut pendings = 0;
        let total = 4 * YIELD_EVERY;
        let mut written = 0;
        while written < total {
            match Pin::new(&mut w).poll_write(&mut cx, &chunk) {
                Poll::Ready(Ok(n)) => written += n,
                Poll::Pending => {
                    pendings += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Poll::Ready(Err(e)) => panic!("{e}"),
            }
        }
        assert_eq!(w.inner.0, total);
        // One give-way per YIELD_EVERY bytes but the last (nothing written after it yet).
        assert_eq!(pendings, total / YIELD_EVERY - 1);
        assert_eq!(wakes.0.load(Ordering::SeqCst), pendings);
        // Vectored writes give way and count too (Sink takes the first slice of each).
        let slices = [io::IoSlice::new(&chunk); 2];
        let mut vectored = || Pin::new(&mut w).poll_write_vectored(&mut cx, &slices);
        assert!(vectored().is_pending());
        for _ in 0..YIELD_EVERY / chunk.len() {
            assert!(matches!(vectored(), Poll::Ready(Ok(n)) if n == chunk.len()));
        }
        assert!(vectored().is_pending());
    }
}
