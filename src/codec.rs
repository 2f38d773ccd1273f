//! Length-prefixed frames (PROTOCOL.md §3): a 4-byte big-endian length `N`, then `N` bytes.
//!
//! The decoder checks `N` as soon as the 4 header bytes are there, before reserving
//! anything for the body, and reports [`FrameEvent::Started`] once per frame when the first
//! byte of a frame has arrived but the frame is not complete yet. The session arms the
//! partial-frame deadline on that event (one timer per frame: later bytes do not extend it)
//! and disarms it on [`FrameEvent::Frame`]. An idle connection between frames produces no
//! event and so arms no timer.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// The largest frame body either side may send before the handshake and on version-1
/// connections (PROTOCOL.md §3).
pub const MAX_FRAME_LEN: usize = 65_536;

/// The largest frame body either side may send on a version-2 connection (PROTOCOL.md
/// §13): 4 MiB.
pub const MAX_FRAME_LEN_V2: usize = 4 * 1024 * 1024;

/// The frame limit of a connection that negotiated `version` (65 536 bytes for version
/// 1, 4 MiB for version 2).
pub fn frame_limit(version: i64) -> usize {
    if version >= 2 {
        MAX_FRAME_LEN_V2
    } else {
        MAX_FRAME_LEN
    }
}

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// What the decoder yields. `Debug` shows a frame's length, never its bytes.
#[derive(PartialEq, Eq)]
pub enum FrameEvent {
    /// The first byte of a new frame arrived; the frame is not complete yet.
    Started,
    /// A complete frame body.
    Frame(Bytes),
}

impl std::fmt::Debug for FrameEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameEvent::Started => f.write_str("Started"),
            FrameEvent::Frame(body) => write!(f, "Frame({} bytes)", body.len()),
        }
    }
}

/// A framing failure; the stream cannot be resynchronised after one.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The header announced a body longer than the connection's limit.
    #[error("frame length {0} exceeds the connection's frame limit")]
    Oversize(u32),
    /// The peer closed the stream in the middle of a frame.
    #[error("connection closed in the middle of a frame")]
    Truncated,
    /// An I/O error on the socket.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// The frame codec shared by the server and the client.
#[derive(Debug, Default)]
pub struct FrameCodec {
    /// True once `Started` has been reported for the frame now arriving.
    started_reported: bool,
}

impl FrameCodec {
    /// A codec at a frame boundary.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Decoder for FrameCodec {
    type Item = FrameEvent;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<FrameEvent>, CodecError> {
        if src.len() >= HEADER_LEN {
            let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]);
            if len as usize > MAX_FRAME_LEN {
                return Err(CodecError::Oversize(len));
            }
            let total = HEADER_LEN + len as usize;
            if src.len() >= total {
                src.advance(HEADER_LEN);
                let body = src.split_to(len as usize).freeze();
                self.started_reported = false;
                return Ok(Some(FrameEvent::Frame(body)));
            }
            // Reserve only what the (checked) length needs, so the next read can fill it.
            src.reserve(total - src.len());
        }
        if !src.is_empty() && !self.started_reported {
            self.started_reported = true;
            return Ok(Some(FrameEvent::Started));
        }
        Ok(None)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<FrameEvent>, CodecError> {
        match self.decode(src)? {
            Some(FrameEvent::Started) | None if !src.is_empty() => Err(CodecError::Truncated),
            other => Ok(other),
        }
    }
}

/// Encodes a frame body. Callers check the size first ([`MAX_FRAME_LEN`]); an oversize
/// body is refused here too, so nothing larger ever reaches the socket. The body may hold
/// a secret, so it is wiped once copied into the write buffer.
impl Encoder<Vec<u8>> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, mut body: Vec<u8>, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        if body.len() > MAX_FRAME_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "frame body over the limit",
            ));
        }
        dst.reserve(HEADER_LEN + body.len());
        dst.put_u32(body.len() as u32);
        dst.put_slice(&body);
        zeroize::Zeroize::zeroize(&mut body);
        Ok(())
    }
}

/// Prepends the 4-byte header to `body` (for raw writers such as the client and tests).
pub fn encode_frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(codec: &mut FrameCodec, buf: &mut BytesMut, bytes: &[u8]) -> Vec<FrameEvent> {
        buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(ev) = codec.decode(buf).expect("decode") {
            out.push(ev);
        }
        out
    }

    #[test]
    fn byte_by_byte_reports_start_once() {
        let mut c = FrameCodec::new();
        let mut buf = BytesMut::new();
        let frame = encode_frame(b"{}");
        let mut events = Vec::new();
        for b in &frame {
            events.extend(feed(&mut c, &mut buf, &[*b]));
        }
        assert_eq!(
            events,
            vec![
                FrameEvent::Started,
                FrameEvent::Frame(Bytes::from_static(b"{}"))
            ]
        );
    }

    #[test]
    fn many_frames_in_one_read() {
        let mut c = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut bytes = encode_frame(b"a");
        bytes.extend(encode_frame(b"bb"));
        bytes.extend(&encode_frame(b"ccc")[..3]);
        let ev = feed(&mut c, &mut buf, &bytes);
        assert_eq!(
            ev,
            vec![
                FrameEvent::Frame(Bytes::from_static(b"a")),
                FrameEvent::Frame(Bytes::from_static(b"bb")),
                FrameEvent::Started
            ]
        );
    }

    #[test]
    fn limits() {
        let mut c = FrameCodec::new();
        let mut buf = BytesMut::new();
        let ok = vec![b'x'; MAX_FRAME_LEN];
        assert_eq!(feed(&mut c, &mut buf, &encode_frame(&ok)).len(), 1);
        let mut buf = BytesMut::from(&65_537u32.to_be_bytes()[..]);
        assert!(matches!(
            c.decode(&mut buf),
            Err(CodecError::Oversize(65_537))
        ));
        assert!(buf.capacity() < 65_537);
    }

    #[test]
    fn eof_mid_frame_is_truncated() {
        let mut c = FrameCodec::new();
        let mut buf = BytesMut::from(&[0u8, 0, 0][..]);
        assert!(matches!(c.decode_eof(&mut buf), Err(CodecError::Truncated)));
        let mut c = FrameCodec::new();
        let mut buf = BytesMut::new();
        assert!(c.decode_eof(&mut buf).expect("clean eof").is_none());
    }
}
