//! Bytes to frames and back, for `tokio_util::codec::Framed`.
//!
//! The length prefix is checked against the limit before anything is
//! reserved or copied, so a peer announcing a 4 GiB frame costs nothing.
//! "Need more bytes" is `Ok(None)`; a bad frame is an error, after which the
//! connection is closed (framing is lost, there is no resynchronising).

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::frame::{ClientFrame, FrameError, LENGTH_PREFIX, ServerFrame};

/// Largest client-to-server payload a server accepts by default. The
/// largest legal request (CHANGE PASSWORD with two passwords of 256
/// four-byte characters) is under 2.1 KiB.
pub const DEFAULT_MAX_REQUEST: usize = 8 * 1024;
/// Largest server-to-client payload a client accepts by default: room for a
/// full list (1,000 names) or fetch (256 messages) response.
pub const DEFAULT_MAX_RESPONSE: usize = 1024 * 1024;

/// A frame type with a payload encoding.
pub trait Payload: Sized {
    /// Appends the payload (tag and fields) to `dst`.
    fn encode_payload(&self, dst: &mut BytesMut) -> Result<(), FrameError>;
    /// Parses one payload.
    fn decode_payload(payload: &[u8]) -> Result<Self, FrameError>;
}

impl Payload for ClientFrame {
    fn encode_payload(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode(dst)
    }
    fn decode_payload(payload: &[u8]) -> Result<Self, FrameError> {
        Self::decode(payload)
    }
}

impl Payload for ServerFrame {
    fn encode_payload(&self, dst: &mut BytesMut) -> Result<(), FrameError> {
        self.encode(dst)
    }
    fn decode_payload(payload: &[u8]) -> Result<Self, FrameError> {
        Self::decode(payload)
    }
}

/// Decodes `In` frames and encodes `Out` frames, refusing incoming payloads
/// over `max_frame` bytes.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max_frame: usize,
    _frames: PhantomData<fn(Out) -> In>,
}

/// The server's side: reads requests, writes responses and pushes.
pub type ServerCodec = FrameCodec<ClientFrame, ServerFrame>;
/// The client's side: reads responses and pushes, writes requests.
pub type ClientCodec = FrameCodec<ServerFrame, ClientFrame>;

impl<In, Out> FrameCodec<In, Out> {
    /// A codec accepting incoming payloads of at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            _frames: PhantomData,
        }
    }

    /// The incoming payload limit.
    pub fn max_frame(&self) -> usize {
        self.max_frame
    }
}

impl<In: Payload, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        if src.len() < LENGTH_PREFIX {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_frame,
            });
        }
        if len == 0 {
            return Err(FrameError::Malformed("empty frame (no tag)".into()));
        }
        if src.len() < LENGTH_PREFIX + len {
            src.reserve(LENGTH_PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX);
        let payload = src.split_to(len);
        In::decode_payload(&payload).map(Some)
    }
}

impl<In, Out: Payload> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, frame: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let start = dst.len();
        dst.put_u32(0);
        if let Err(err) = frame.encode_payload(dst) {
            dst.truncate(start);
            return Err(err);
        }
        let len = dst.len() - start - LENGTH_PREFIX;
        let Ok(len) = u32::try_from(len) else {
            dst.truncate(start);
            return Err(FrameError::TooLarge {
                len,
                max: u32::MAX as usize,
            });
        };
        dst[start..start + LENGTH_PREFIX].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}
