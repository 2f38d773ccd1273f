//! The read side of a connection: frames (PROTOCOL.md §3) at the connection's limit, with
//! large frames held within one server-wide budget.
//!
//! Frames up to 65 536 bytes (every frame before the handshake and on version-1
//! connections) are decoded from one small read buffer that grows to the announced length
//! at most, exactly as [`crate::codec::FrameCodec`] does. A version-2 connection may send
//! frames up to 4 MiB (§13). Such a *large* frame is not read into the shared buffer:
//!
//! 1. its length is checked at the header against the connection's limit (over it: the
//!    stream ends with [`CodecError::Oversize`], before anything is reserved);
//! 2. it must then take its length from the server's [`InboundBudget`]
//!    ([`Limits::max_large_frames_total`](crate::Limits::max_large_frames_total)). While
//!    the budget is spent, the connection reads nothing more (the bytes wait in the
//!    kernel's socket buffer); the partial-frame deadline, armed at the frame's first
//!    byte, keeps running, so a connection waits at most that long and is then closed;
//! 3. only then is a buffer of exactly that length allocated (zero-filled, so the kernel
//!    commits its pages only as they are written) and filled by reads that never take a
//!    byte of the next frame.
//!
//! The budget's [`InboundPermit`] travels with the frame and then with its request, and is
//! released when the request is answered or cancelled. So what all sessions hold of large
//! frames, being read or waiting for their request, stays within the budget whatever a few
//! hundred connections do; each connection's own buffer stays within one small frame.
//! The parsed request (a token of a `save_token`) is a copy the size of the frame at
//! most, held under the same permit.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use futures_util::Stream;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::unix::OwnedReadHalf;

use crate::codec::{CodecError, HEADER_LEN, MAX_FRAME_LEN};

/// Bytes a new connection's read buffer starts with, and the least it reads at a time.
pub const INITIAL_READ_BUFFER: usize = 1024;

/// The bytes of large frames held by every session of one server. All sessions run on
/// the server's one arbiter thread, so plain cells suffice.
#[derive(Debug)]
pub struct InboundBudget {
    /// Bytes held now.
    held: Cell<usize>,
    /// The budget; 0: no bound.
    limit: usize,
    /// Readers waiting for bytes to be released.
    waiters: RefCell<Vec<Waker>>,
    /// The most ever held at once, for tests and measurements.
    peak: Cell<usize>,
}

impl InboundBudget {
    /// A budget of `limit` bytes (0: unbounded).
    pub fn new(limit: usize) -> Rc<InboundBudget> {
        Rc::new(InboundBudget {
            held: Cell::new(0),
            limit,
            waiters: RefCell::new(Vec::new()),
            peak: Cell::new(0),
        })
    }

    /// Bytes of large frames held now.
    pub fn held(&self) -> usize {
        self.held.get()
    }

    /// The most bytes held at once since the server started.
    pub fn peak(&self) -> usize {
        self.peak.get()
    }

    /// True when a frame of `len` bytes can never fit (it is larger than the budget).
    fn never_fits(&self, len: usize) -> bool {
        self.limit != 0 && len > self.limit
    }

    /// Takes `len` bytes, or registers `waker` to be woken when bytes are released.
    fn try_take(self: &Rc<Self>, len: usize, waker: &Waker) -> Option<InboundPermit> {
        let held = self.held.get();
        if self.limit != 0 && held + len > self.limit {
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(waker)) {
                waiters.push(waker.clone());
            }
            return None;
        }
        self.held.set(held + len);
        self.peak.set(self.peak.get().max(held + len));
        Some(InboundPermit {
            budget: Rc::clone(self),
            len,
        })
    }
}

/// A large frame's share of the [`InboundBudget`], given back on drop.
#[derive(Debug)]
pub struct InboundPermit {
    budget: Rc<InboundBudget>,
    len: usize,
}

impl Drop for InboundPermit {
    fn drop(&mut self) {
        let held = self.budget.held.get();
        self.budget.held.set(held.saturating_sub(self.len));
        for waker in self.budget.waiters.borrow_mut().drain(..) {
            waker.wake();
        }
    }
}

/// A frame body as read. The session wipes either kind once the frame is parsed (a
/// handshake carries the capability token, a `save_token` an access token).
pub enum Body {
    /// A frame of at most 65 536 bytes, cut from the read buffer (its own region of it).
    Small(BytesMut),
    /// A large frame (version 2 only), in its own buffer, with its share of the budget.
    /// The session wipes the buffer once the frame is parsed.
    Large(Vec<u8>, InboundPermit),
}

impl Body {
    /// The body's bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Body::Small(b) => b,
            Body::Large(v, _) => v,
        }
    }
}

/// What the reader yields. `Debug` shows a frame's length, never its bytes.
pub enum Inbound {
    /// The first byte of a new frame arrived; the frame is not complete yet.
    Started,
    /// A complete frame body.
    Frame(Body),
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Inbound::Started => f.write_str("Started"),
            Inbound::Frame(body) => write!(f, "Frame({} bytes)", body.bytes().len()),
        }
    }
}

/// A large frame being read.
struct Large {
    /// The announced length.
    len: usize,
    /// The body buffer and its permit, once the budget gave it.
    body: Option<(Vec<u8>, InboundPermit)>,
    /// Bytes of the body received.
    filled: usize,
}

/// The frame stream of one connection (see the module documentation).
pub struct FrameReader {
    read: OwnedReadHalf,
    buf: BytesMut,
    /// The connection's frame limit: [`MAX_FRAME_LEN`] until the session raises it after
    /// a version-2 handshake.
    limit: Rc<Cell<usize>>,
    budget: Rc<InboundBudget>,
    large: Option<Large>,
    /// True once `Started` was reported for the frame now arriving.
    started: bool,
    /// True after the stream ended (an error or EOF): it yields nothing more.
    done: bool,
}

impl FrameReader {
    /// A reader for `read`, at the limit in `limit`, drawing large frames from `budget`.
    pub fn new(
        read: OwnedReadHalf,
        limit: Rc<Cell<usize>>,
        budget: Rc<InboundBudget>,
    ) -> FrameReader {
        FrameReader {
            read,
            buf: BytesMut::with_capacity(INITIAL_READ_BUFFER),
            limit,
            budget,
            large: None,
            started: false,
            done: false,
        }
    }

    fn end(
        &mut self,
        result: Result<Inbound, CodecError>,
    ) -> Poll<Option<Result<Inbound, CodecError>>> {
        if result.is_err() {
            self.done = true;
        }
        Poll::Ready(Some(result))
    }

    /// One step of a large frame: take the budget, fill the body. `Ready(None)` never.
    fn poll_large(&mut self, cx: &mut Context<'_>) -> Poll<Result<Inbound, CodecError>> {
        let Some(large) = self.large.as_mut() else {
            return Poll::Pending;
        };
        if large.body.is_none() {
            let Some(permit) = self.budget.try_take(large.len, cx.waker()) else {
                return Poll::Pending;
            };
            let mut body = vec![0u8; large.len];
            // Bytes of the body that came with the header's read.
            let prefix = self.buf.len().min(large.len);
            body[..prefix].copy_from_slice(&self.buf[..prefix]);
            self.buf.advance(prefix);
            large.filled = prefix;
            large.body = Some((body, permit));
        }
        loop {
            let Some((body, _)) = large.body.as_mut() else {
                return Poll::Pending;
            };
            if large.filled == large.len {
                let (body, permit) = large.body.take().expect("checked above");
                self.large = None;
                self.started = false;
                return Poll::Ready(Ok(Inbound::Frame(Body::Large(body, permit))));
            }
            let mut rb = ReadBuf::new(&mut body[large.filled..]);
            match Pin::new(&mut self.read).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(CodecError::Io(e))),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    return Poll::Ready(Err(CodecError::Truncated))
                }
                Poll::Ready(Ok(())) => large.filled += rb.filled().len(),
            }
        }
    }
}

impl Stream for FrameReader {
    type Item = Result<Inbound, CodecError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if this.large.is_some() {
                return match this.poll_large(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(result) => this.end(result),
                };
            }
            if this.buf.len() >= HEADER_LEN {
                let b = &this.buf;
                let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                let n = len as usize;
                if n > this.limit.get() || (n > MAX_FRAME_LEN && this.budget.never_fits(n)) {
                    return this.end(Err(CodecError::Oversize(len)));
                }
                if n > MAX_FRAME_LEN {
                    this.buf.advance(HEADER_LEN);
                    this.large = Some(Large {
                        len: n,
                        body: None,
                        filled: 0,
                    });
                    if !this.started {
                        this.started = true;
                        return Poll::Ready(Some(Ok(Inbound::Started)));
                    }
                    continue;
                }
                let total = HEADER_LEN + n;
                if this.buf.len() >= total {
                    this.buf.advance(HEADER_LEN);
                    let body = this.buf.split_to(n);
                    this.started = false;
                    return Poll::Ready(Some(Ok(Inbound::Frame(Body::Small(body)))));
                }
                // Reserve only what the (checked) length needs, so the next read fills it.
                this.buf.reserve(total - this.buf.len());
            }
            if !this.buf.is_empty() && !this.started {
                this.started = true;
                return Poll::Ready(Some(Ok(Inbound::Started)));
            }
            if this.buf.capacity() == this.buf.len() {
                this.buf.reserve(INITIAL_READ_BUFFER);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.read), cx, &mut this.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.end(Err(CodecError::Io(e))),
                Poll::Ready(Ok(0)) => {
                    this.done = true;
                    return if this.buf.is_empty() {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Err(CodecError::Truncated)))
                    };
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }
}
