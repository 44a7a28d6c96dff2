//! The protobuf codec of every `chat.v1` call: prost's, except that a
//! message that does not decode is the caller's fault, not the server's.
//!
//! tonic's stock codec answers undecodable bytes with `INTERNAL`, which a
//! client reads as "the server broke". A request that is not valid protobuf
//! for its type is a malformed request, so it gets `INVALID_ARGUMENT` with
//! the chat code `malformed`, as a bad frame does on the socket transport.

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use chat_core::ErrorCode;

use crate::status::to_status;

/// [`ProstCodec`] with decode failures mapped to `malformed`; named by the
/// generated code (`codec_path` in `build.rs`).
#[derive(Debug, Default)]
pub struct ChatCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Codec for ChatCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ChatDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ChatDecoder(self.0.decoder())
    }
}

/// Decodes with prost; a failure is `INVALID_ARGUMENT`, chat code
/// `malformed`.
#[derive(Debug)]
pub struct ChatDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for ChatDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            to_status(
                ErrorCode::Malformed,
                format!("the message does not decode: {}", status.message()),
            )
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
