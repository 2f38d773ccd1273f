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
//! Across sessions, every outbox of a server draws on one [`UnsentBudget`]
//! ([`crate::Limits::max_unsent_total`]): while the server as a whole holds more unsent
//! bytes than the budget, every session stops reading new requests until the total is
//! back to half of it; and a session that itself holds more than [`LOW_WATERMARK`]
//! unsent after queuing a reply while the total is over the budget is aborted at once (its
//! buffer wiped and dropped, its connection closed). Bytes stay in an outbox only while
//! the kernel's socket buffer is full, that is while the peer is not reading, so a client
//! that reads its replies is never aborted. The per-session bound alone lets a peer
//! pipeline a whole in-flight window of large replies on every connection it can open
//! (measured by the review: 1,000 such connections took the server to 929 MiB); with the
//! budget, what the server holds stays within the budget plus, per connection, the low
//! watermark and one reply.
//!
//! actix's own `io::Writer`/`FramedWrite` were not used: their backpressure only engages
//! on a `WouldBlock` error, which tokio sockets never return (they return `Pending`), so
//! they buffer without limit.

use std::cell::{Cell, RefCell};
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::{Duration, Instant};

use actix::{Actor, ActorFuture};
use bytes::{Buf, BytesMut};
use futures_util::Stream;
use tokio::io::AsyncWrite;

/// Unsent bytes above which reading pauses.
pub const HIGH_WATERMARK: usize = 64 * 1024;
/// Unsent bytes at or below which reading resumes.
pub const LOW_WATERMARK: usize = 16 * 1024;

/// At most one warning about aborted sessions per this interval (with a count).
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The unsent bytes of every session of one server. All sessions run on the server's one
/// arbiter thread, so plain cells suffice.
#[derive(Debug)]
pub struct UnsentBudget {
    /// Bytes queued in every outbox and not yet written.
    total: Cell<usize>,
    /// The budget; 0: no global bound.
    limit: usize,
    /// Paused readers waiting for the total to come down.
    waiters: RefCell<Vec<Waker>>,
    /// Sessions aborted since the last warning, and when that warning was.
    aborted: Cell<u64>,
    last_warn: Cell<Option<Instant>>,
}

impl UnsentBudget {
    /// A budget of `limit` bytes (0: unbounded).
    pub fn new(limit: usize) -> Rc<UnsentBudget> {
        Rc::new(UnsentBudget {
            total: Cell::new(0),
            limit,
            waiters: RefCell::new(Vec::new()),
            aborted: Cell::new(0),
            last_warn: Cell::new(None),
        })
    }

    /// Bytes unsent across every session now.
    pub fn total(&self) -> usize {
        self.total.get()
    }

    /// True while the total is over the budget.
    pub fn over(&self) -> bool {
        self.limit != 0 && self.total.get() > self.limit
    }

    fn add(&self, n: usize) {
        self.total.set(self.total.get() + n);
    }

    fn sub(&self, n: usize) {
        let total = self.total.get().saturating_sub(n);
        self.total.set(total);
        if total <= self.limit / 2 && !self.waiters.borrow().is_empty() {
            for w in self.waiters.borrow_mut().drain(..) {
                w.wake();
            }
        }
    }

    fn wait(&self, waker: &Waker) {
        let mut waiters = self.waiters.borrow_mut();
        if !waiters.iter().any(|w| w.will_wake(waker)) {
            waiters.push(waker.clone());
        }
    }

    /// Counts an aborted session and logs at most one warning per burst.
    fn note_abort(&self, unsent: usize) {
        self.aborted.set(self.aborted.get() + 1);
        let due = self
            .last_warn
            .get()
            .is_none_or(|t| t.elapsed() >= WARN_INTERVAL);
        if due {
            tracing::warn!(
                aborted = self.aborted.get(),
                session_unsent = unsent,
                total_unsent = self.total.get(),
                budget = self.limit,
                "connections that do not read their replies closed: the server's unsent bytes are over budget"
            );
            self.aborted.set(0);
            self.last_warn.set(Some(Instant::now()));
        }
    }
}

struct Inner {
    buf: BytesMut,
    closing: bool,
    /// Over the global budget with too much of our own unsent: drop it and end.
    aborted: bool,
    writer: Option<Waker>,
    reader: Option<Waker>,
    budget: Rc<UnsentBudget>,
}

impl Inner {
    /// Wipes and drops every unsent byte, returning them to the budget.
    fn discard(&mut self) {
        let len = self.buf.len();
        self.buf[..len].fill(0);
        self.buf.clear();
        self.budget.sub(len);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.discard();
    }
}

/// The shared buffer; cheap to clone (same-thread `Rc`).
#[derive(Clone)]
pub struct Outbox(Rc<RefCell<Inner>>);

impl Default for Outbox {
    fn default() -> Self {
        Outbox::new(UnsentBudget::new(0))
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Outbox({} bytes unsent)", self.unsent())
    }
}

impl Outbox {
    /// An empty outbox drawing on `budget`.
    pub fn new(budget: Rc<UnsentBudget>) -> Self {
        Outbox(Rc::new(RefCell::new(Inner {
            buf: BytesMut::new(),
            closing: false,
            aborted: false,
            writer: None,
            reader: None,
            budget,
        })))
    }

    /// Queues one frame: the 4-byte length, then `body`. When the server is over its
    /// unsent budget and this outbox then holds more than [`LOW_WATERMARK`] (bytes stay
    /// here only while the kernel's socket buffer is full: its peer is not reading), the
    /// outbox is aborted instead: everything unsent is wiped and dropped and the writer
    /// ends with an error, which closes the session.
    pub fn push_frame(&self, body: &[u8]) {
        let mut inner = self.0.borrow_mut();
        if inner.closing {
            return;
        }
        inner
            .buf
            .extend_from_slice(&(body.len() as u32).to_be_bytes());
        inner.buf.extend_from_slice(body);
        inner.budget.add(4 + body.len());
        if inner.budget.over() && inner.buf.len() > LOW_WATERMARK {
            let unsent = inner.buf.len();
            inner.discard();
            inner.closing = true;
            inner.aborted = true;
            inner.budget.note_abort(unsent);
        }
        if let Some(w) = inner.writer.take() {
            w.wake();
        }
    }

    /// True when the outbox was aborted for the server's unsent budget.
    pub fn aborted(&self) -> bool {
        self.0.borrow().aborted
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
            if inner.aborted {
                break Err(io::Error::other("unsent budget exceeded"));
            }
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
                    inner.budget.sub(n);
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
        inner.discard();
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
/// [`HIGH_WATERMARK`] unsent bytes, or the server as a whole is over its unsent budget.
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
            if inner.budget.over() && !inner.closing {
                inner.budget.wait(cx.waker());
                return Poll::Pending;
            }
        }
        Pin::new(&mut self.inner).poll_next(cx)
    }
}
