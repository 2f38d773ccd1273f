//! A session's outgoing bytes, with backpressure.
//!
//! Replies are appended to one buffer that a writer future (spawned on the session's own
//! context, so no extra task or thread hop) flushes to the socket. When more than
//! [`HIGH_WATERMARK`] bytes are unsent, the session's read stream ([`Paused`]) stops
//! yielding frames until the peer has taken the buffer down to [`LOW_WATERMARK`]: a peer
//! that never reads its replies stalls only its own connection and cannot make the server
//! buffer without bound (at most the requests already in flight can still add their
//! replies). Timers and messages keep working meanwhile, so shutdown can still close it.
//!
//! actix's own `io::Writer`/`FramedWrite` were not used: their backpressure only engages
//! on a `WouldBlock` error, which tokio sockets never return (they return `Pending`), so
//! they buffer without limit.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll, Waker};

use actix::{Actor, ActorFuture};
use bytes::{Buf, BytesMut};
use futures_util::Stream;
use tokio::io::AsyncWrite;

/// Unsent bytes above which reading pauses.
pub const HIGH_WATERMARK: usize = 64 * 1024;
/// Unsent bytes at or below which reading resumes.
pub const LOW_WATERMARK: usize = 16 * 1024;

#[derive(Default)]
struct Inner {
    buf: BytesMut,
    closing: bool,
    writer: Option<Waker>,
    reader: Option<Waker>,
}

/// The shared buffer; cheap to clone (same-thread `Rc`).
#[derive(Clone, Default)]
pub struct Outbox(Rc<RefCell<Inner>>);

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outbox({} bytes unsent)", self.unsent())
    }
}

impl Outbox {
    /// An empty outbox.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues one frame: the 4-byte length, then `body`.
    pub fn push_frame(&self, body: &[u8]) {
        let mut inner = self.0.borrow_mut();
        if inner.closing {
            return;
        }
        inner
            .buf
            .extend_from_slice(&(body.len() as u32).to_be_bytes());
        inner.buf.extend_from_slice(body);
        if let Some(w) = inner.writer.take() {
            w.wake();
        }
    }

    /// Flush what is queued, then shut the write side down; nothing more is queued.
    pub fn close(&self) {
        let mut inner = self.0.borrow_mut();
        inner.closing = true;
        if let Some(w) = inner.writer.take() {
            w.wake();
        }
    }

    /// Bytes queued and not yet written.
    pub fn unsent(&self) -> usize {
        self.0.borrow().buf.len()
    }

    /// The writer future to spawn on the owning actor's context. It calls `on_done` once:
    /// with `Ok` after a close was flushed and the write side shut down, or with the error.
    pub fn writer<A, W, F>(&self, io: W, on_done: F) -> WriteFut<W, F>
    where
        A: Actor,
        W: AsyncWrite + Unpin,
        F: FnMut(&mut A, &mut A::Context, io::Result<()>) + Unpin,
    {
        WriteFut {
            outbox: self.clone(),
            io,
            on_done,
            shutting_down: false,
        }
    }

    /// Wraps a read stream so that it pauses while too much is unsent.
    pub fn pause_reads<S>(&self, inner: S) -> Paused<S> {
        Paused {
            inner,
            outbox: self.clone(),
        }
    }
}

/// Writes the outbox to the socket (see [`Outbox::writer`]).
pub struct WriteFut<W, F> {
    outbox: Outbox,
    io: W,
    on_done: F,
    shutting_down: bool,
}

impl<A, W, F> ActorFuture<A> for WriteFut<W, F>
where
    A: Actor,
    W: AsyncWrite + Unpin,
    F: FnMut(&mut A, &mut A::Context, io::Result<()>) + Unpin,
{
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut A,
        ctx: &mut A::Context,
        cx: &mut TaskContext<'_>,
    ) -> Poll<()> {
        let this = self.get_mut();
        let outbox = this.outbox.clone();
        let mut inner = outbox.0.borrow_mut();
        let result = loop {
            if inner.buf.is_empty() {
                if let Some(r) = inner.reader.take() {
                    r.wake();
                }
                if !inner.closing {
                    inner.writer = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                this.shutting_down = true;
                match Pin::new(&mut this.io).poll_shutdown(cx) {
                    Poll::Pending => return Poll::Pending,
                    // A peer that already left is not an error for a close.
                    Poll::Ready(_) => break Ok(()),
                }
            }
            match Pin::new(&mut this.io).poll_write(cx, &inner.buf) {
                Poll::Ready(Ok(0)) => break Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    // What was sent may be a secret: wipe it before releasing the space.
                    inner.buf[..n].fill(0);
                    inner.buf.advance(n);
                    if inner.buf.len() <= LOW_WATERMARK {
                        if let Some(r) = inner.reader.take() {
                            r.wake();
                        }
                    }
                }
                Poll::Ready(Err(e)) => break Err(e),
                Poll::Pending => return Poll::Pending,
            }
        };
        // Wipe and drop whatever could not be sent.
        let len = inner.buf.len();
        inner.buf[..len].fill(0);
        inner.buf.clear();
        inner.closing = true;
        if let Some(r) = inner.reader.take() {
            r.wake();
        }
        drop(inner);
        (this.on_done)(act, ctx, result);
        Poll::Ready(())
    }
}

/// A read stream that yields nothing while the outbox holds more than
/// [`HIGH_WATERMARK`] unsent bytes.
pub struct Paused<S> {
    inner: S,
    outbox: Outbox,
}

impl<S: Stream + Unpin> Stream for Paused<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<S::Item>> {
        {
            let mut inner = self.outbox.0.borrow_mut();
            if inner.buf.len() > HIGH_WATERMARK && !inner.closing {
                inner.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}
