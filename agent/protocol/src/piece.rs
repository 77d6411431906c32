//! Shoal's piece protocol, `/shoal/piece/1.0.0`: the messages, their bincode encoding, and the
//! request-response codec that reads them off libp2p streams.
//!
//! ## Shape
//!
//! One request and one response per stream (libp2p request-response opens a yamux stream per
//! request). A peer asks [`PieceRequest::Have`] to learn which pieces of a digest another peer
//! holds and what their sha256 digests are, then [`PieceRequest::Piece`] for each piece it
//! wants. The responder answers only from its local store: it never forwards a request, so no
//! loop can form, and a miss is [`PieceResponse::NotFound`], not a wait.
//!
//! Two more requests carry no bytes of content but what a node saw at the origin, for an origin
//! outage (see the agent's `access::attest`): [`PieceRequest::PublicSeen`] asks how long ago the
//! responder's own anonymous check found one object of one repository public, and
//! [`PieceRequest::TagSeen`] asks for the last tag→digest mapping the responder saw at the
//! origin for a tag it saw public. They were added after the first release as new variants at
//! the end of each enum, so every older message keeps its bytes (an older node cannot decode
//! them and closes the stream, which the asker takes as "not seen").
//!
//! ## Encoding
//!
//! bincode 2 (`config::standard()`: little-endian, variable-length integers) over serde. A
//! message is the whole stream: the writer closes its side after the message, the reader
//! reads to end of stream. There is no length prefix of ours to trust; instead every read is
//! capped (at most `limit + 1` bytes are read, more is an error), and bincode runs with a
//! compile-time byte limit so a forged length inside a message can never make the decoder
//! allocate more than the cap. Trailing bytes after a message are an error too, so each
//! message has exactly one encoding (pinned by the hexdump tests below).
//!
//! Byte strings (`data`, `have`) are serialized as serde byte buffers: the same bytes on the
//! wire as a sequence of `u8`, but decoded with one copy instead of one visitor call per byte.
//!
//! ## Limits
//!
//! - A request is at most [`MAX_REQUEST_BYTES`] (a `Piece` request is 36 bytes or so).
//! - A response is at most the node's `max_message_bytes`, itself at most
//!   [`MAX_RESPONSE_BYTES`]: one piece of up to [`MAX_PIECE_BYTES`] plus room for framing, or a
//!   `Have` answer for a blob of up to several hundred thousand pieces.
//! - Decoded responses are checked for internal consistency ([`PieceResponse::validate`]), so a
//!   bitfield that does not match the blob's piece count or a piece digest for a piece that
//!   cannot exist is a protocol error at the edge, not a panic in the scheduler.

use std::io;

use futures_util::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::types::Digest;

/// The protocol name negotiated on each stream.
pub const PROTOCOL: &str = "/shoal/piece/1.0.0";

/// Largest piece a peer sends (and the largest piece size a `Have` answer may announce).
pub const MAX_PIECE_BYTES: usize = 16 << 20;
/// Largest encoded request.
pub const MAX_REQUEST_BYTES: usize = 1024;
/// Largest encoded response any node accepts: a full piece plus 1 MiB for framing or for a
/// large `Have` answer. A node's own limit (`SwarmConfig::max_message_bytes`) may be lower.
pub const MAX_RESPONSE_BYTES: usize = MAX_PIECE_BYTES + (1 << 20);
/// Largest media type string in a `Have` answer (OCI media types are well under 100 bytes).
pub const MAX_MEDIA_TYPE_BYTES: usize = 255;
/// Largest reason in a [`PieceResponse::BadRequest`].
pub const MAX_REASON_BYTES: usize = 255;

/// What one peer asks another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceRequest {
    /// Which pieces of this digest do you hold, and what are their digests?
    Have { digest: [u8; 32] },
    /// Send me piece `index` of this digest.
    Piece { digest: [u8; 32], index: u32 },
    /// When did your own anonymous check at the origin last find this object of exactly this
    /// repository public? Answered [`PieceResponse::PublicSeen`] or [`PieceResponse::NotSeen`].
    /// The names are checked by the responder (a bad one is [`PieceResponse::BadRequest`]); the
    /// whole request is at most [`MAX_REQUEST_BYTES`].
    PublicSeen { registry: String, repo: String, digest: [u8; 32] },
    /// What did the origin last resolve this tag of this repository to, among the tags your own
    /// anonymous check found public? Answered [`PieceResponse::TagSeen`] or
    /// [`PieceResponse::NotSeen`].
    TagSeen { registry: String, repo: String, tag: String },
}

impl PieceRequest {
    pub fn have(digest: &Digest) -> Self {
        PieceRequest::Have { digest: *digest.as_bytes() }
    }

    pub fn piece(digest: &Digest, index: u32) -> Self {
        PieceRequest::Piece { digest: *digest.as_bytes(), index }
    }

    /// The content digest the request is about (none for a tag).
    pub fn digest(&self) -> Option<Digest> {
        match self {
            PieceRequest::Have { digest }
            | PieceRequest::Piece { digest, .. }
            | PieceRequest::PublicSeen { digest, .. } => Some(Digest::from_sha256(*digest)),
            PieceRequest::TagSeen { .. } => None,
        }
    }
}

/// The last tag→digest mapping a node saw at the origin ([`PieceResponse::TagSeen`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagSeenInfo {
    pub digest: [u8; 32],
    /// The manifest's media type, at most [`MAX_MEDIA_TYPE_BYTES`].
    pub media_type: String,
    pub size: u64,
    /// Milliseconds since the responder saw the mapping at the origin.
    pub age_ms: u64,
}

/// What a peer answers.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PieceResponse {
    Have(HaveInfo),
    /// `data` is at most [`MAX_PIECE_BYTES`].
    Piece {
        index: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The peer holds nothing of this digest / not this piece.
    NotFound,
    /// The peer is at its upload concurrency limit; try later or elsewhere.
    Busy,
    /// Answer to [`PieceRequest::PublicSeen`]: the responder's own anonymous check found the
    /// object public this many milliseconds ago.
    PublicSeen {
        age_ms: u64,
    },
    /// Answer to [`PieceRequest::TagSeen`].
    TagSeen(TagSeenInfo),
    /// The responder saw no such thing (or does not attest to peers).
    NotSeen,
    /// The request names something that cannot exist (a bad registry, repository or tag); the
    /// reason is at most [`MAX_REASON_BYTES`].
    BadRequest(String),
}

impl std::fmt::Debug for PieceResponse {
    /// Pieces are shown by length: a 16 MiB byte dump in a log line helps no one.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PieceResponse::Have(info) => f.debug_tuple("Have").field(info).finish(),
            PieceResponse::Piece { index, data } => {
                f.debug_struct("Piece").field("index", index).field("len", &data.len()).finish()
            }
            PieceResponse::NotFound => f.write_str("NotFound"),
            PieceResponse::Busy => f.write_str("Busy"),
            PieceResponse::PublicSeen { age_ms } => {
                f.debug_struct("PublicSeen").field("age_ms", age_ms).finish()
            }
            PieceResponse::TagSeen(info) => f.debug_tuple("TagSeen").field(info).finish(),
            PieceResponse::NotSeen => f.write_str("NotSeen"),
            PieceResponse::BadRequest(why) => f.debug_tuple("BadRequest").field(why).finish(),
        }
    }
}

/// What a peer holds of one blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveInfo {
    pub size: u64,
    pub piece_size: u32,
    /// Bitfield, one bit per piece, LSB-first in each byte; spare bits in the last byte are 0.
    #[serde(with = "serde_bytes")]
    pub have: Vec<u8>,
    /// sha256 of pieces the responder can attest (pieces it verified), as (index, digest).
    pub piece_digests: Vec<(u32, [u8; 32])>,
    /// The whole blob is verified against its content digest.
    pub complete: bool,
    /// The media type the origin gave, when the responder knows it (manifests are served
    /// with it). At most [`MAX_MEDIA_TYPE_BYTES`].
    pub media_type: Option<String>,
}

impl HaveInfo {
    /// Number of pieces of a blob: `ceil(size / piece_size)`, and one (empty) piece for an
    /// empty blob, the convention of `pieces::Layout`.
    pub fn piece_count(size: u64, piece_size: u32) -> u64 {
        if piece_size == 0 {
            return 0;
        }
        size.div_ceil(u64::from(piece_size)).max(1)
    }

    /// Whether the responder holds piece `index`.
    pub fn has(&self, index: u32) -> bool {
        self.have.get((index / 8) as usize).is_some_and(|b| b & (1 << (index % 8)) != 0)
    }

    fn validate(&self) -> Result<(), ProtocolError> {
        let invalid = |what: String| Err(ProtocolError::Invalid(what));
        if self.piece_size == 0 || self.piece_size as usize > MAX_PIECE_BYTES {
            return invalid(format!("piece size {} outside 1..={MAX_PIECE_BYTES}", self.piece_size));
        }
        let pieces = Self::piece_count(self.size, self.piece_size);
        // Indices are u32 and so is `pieces::Bitfield`'s length.
        if pieces > u64::from(u32::MAX) {
            return invalid(format!("{pieces} pieces is more than u32 indices can number"));
        }
        if self.have.len() as u64 != pieces.div_ceil(8) {
            return invalid(format!("bitfield of {} bytes for {pieces} pieces", self.have.len()));
        }
        let spare = (8 - pieces % 8) % 8;
        if spare > 0 && self.have.last().is_some_and(|b| b >> (8 - spare) != 0) {
            return invalid("bits set past the last piece".to_string());
        }
        if let Some((index, _)) = self.piece_digests.iter().find(|(i, _)| u64::from(*i) >= pieces) {
            return invalid(format!("digest for piece {index} of {pieces}"));
        }
        if self.complete && self.have.iter().map(|b| u64::from(b.count_ones())).sum::<u64>() != pieces {
            return invalid("complete, but not every piece is in the bitfield".to_string());
        }
        if self.media_type.as_ref().is_some_and(|m| m.len() > MAX_MEDIA_TYPE_BYTES) {
            return invalid("media type too long".to_string());
        }
        Ok(())
    }
}

impl PieceResponse {
    /// Checks what the type cannot: sizes and the consistency of a `Have` answer.
    pub fn validate(&self) -> Result<(), ProtocolError> {
        match self {
            PieceResponse::Have(info) => info.validate(),
            PieceResponse::Piece { data, .. } if data.len() > MAX_PIECE_BYTES => {
                Err(ProtocolError::TooLarge { len: data.len(), limit: MAX_PIECE_BYTES })
            }
            PieceResponse::TagSeen(info) if info.media_type.len() > MAX_MEDIA_TYPE_BYTES => {
                Err(ProtocolError::Invalid("media type too long".to_string()))
            }
            PieceResponse::BadRequest(why) if why.len() > MAX_REASON_BYTES => {
                Err(ProtocolError::TooLarge { len: why.len(), limit: MAX_REASON_BYTES })
            }
            _ => Ok(()),
        }
    }
}

/// Why bytes are not a valid message (or a message cannot be sent).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message of {len} bytes or more exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("undecodable message: {0}")]
    Decode(String),
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// bincode's standard configuration with a hard decode limit: no length inside a message can
/// make the decoder claim more than this many bytes.
const CONFIG: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_RESPONSE_BYTES>,
> = bincode::config::standard().with_limit::<MAX_RESPONSE_BYTES>();

pub fn encode_capped<T: Serialize>(message: &T, limit: usize) -> Result<Vec<u8>, ProtocolError> {
    let bytes =
        bincode::serde::encode_to_vec(message, CONFIG).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    if bytes.len() > limit {
        return Err(ProtocolError::TooLarge { len: bytes.len(), limit });
    }
    Ok(bytes)
}

pub fn decode_capped<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, ProtocolError> {
    if bytes.len() > limit {
        return Err(ProtocolError::TooLarge { len: bytes.len(), limit });
    }
    let (message, read) =
        bincode::serde::decode_from_slice(bytes, CONFIG).map_err(|e| ProtocolError::Decode(e.to_string()))?;
    if read != bytes.len() {
        return Err(ProtocolError::TrailingBytes(bytes.len() - read));
    }
    Ok(message)
}

pub fn encode_request(request: &PieceRequest) -> Result<Vec<u8>, ProtocolError> {
    encode_capped(request, MAX_REQUEST_BYTES)
}

pub fn decode_request(bytes: &[u8]) -> Result<PieceRequest, ProtocolError> {
    decode_capped(bytes, MAX_REQUEST_BYTES)
}

/// Encodes a response of at most `limit` bytes (clamped to [`MAX_RESPONSE_BYTES`]).
pub fn encode_response(response: &PieceResponse, limit: usize) -> Result<Vec<u8>, ProtocolError> {
    response.validate()?;
    encode_capped(response, limit.min(MAX_RESPONSE_BYTES))
}

/// Decodes and validates a response of at most `limit` bytes (clamped to
/// [`MAX_RESPONSE_BYTES`]).
pub fn decode_response(bytes: &[u8], limit: usize) -> Result<PieceResponse, ProtocolError> {
    let response: PieceResponse = decode_capped(bytes, limit.min(MAX_RESPONSE_BYTES))?;
    response.validate()?;
    Ok(response)
}

/// Reads to end of stream, at most `limit` bytes: one byte more is an error, so a peer cannot
/// make us buffer more than `limit + 1` bytes whatever it sends.
pub async fn read_capped<T: AsyncRead + Unpin + Send>(io: &mut T, limit: usize) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    read_rest_capped(io, &mut buf, limit).await?;
    Ok(buf)
}

/// [`read_capped`] after the first `buf.len()` bytes were already read into `buf`.
async fn read_rest_capped<T: AsyncRead + Unpin>(
    io: &mut T,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<()> {
    let room = limit.saturating_sub(buf.len()) as u64 + 1;
    io.take(room).read_to_end(buf).await?;
    if buf.len() > limit {
        return Err(invalid_data(ProtocolError::TooLarge { len: buf.len(), limit }));
    }
    Ok(())
}

pub fn invalid_data(e: ProtocolError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Longest `Piece` header: the variant (a one-byte varint), the index (a `u32` varint, at most
/// 5 bytes) and the data length (a `u64` varint, at most 9 bytes).
const PIECE_HEADER_MAX: usize = 15;

/// The bytes bincode writes before a `Piece`'s data: `encode_response(Piece { index, data })`
/// is exactly `piece_header(index, data.len()) ++ data` (pinned by a test).
fn piece_header(index: u32, len: usize) -> Result<Vec<u8>, ProtocolError> {
    encode_capped(&(PIECE_VARIANT, index, len as u64), PIECE_HEADER_MAX)
}

/// `PieceResponse::Piece`'s variant index in bincode's encoding (declaration order).
const PIECE_VARIANT: u32 = 1;

/// Writes a response; a piece's data goes to the stream as it is, without first being copied
/// into an encoding buffer (the bytes on the wire are those of [`encode_response`]).
pub async fn write_response<T: AsyncWrite + Unpin>(
    io: &mut T,
    response: &PieceResponse,
    limit: usize,
) -> io::Result<()> {
    let invalid_input = |e| io::Error::new(io::ErrorKind::InvalidInput, e);
    let PieceResponse::Piece { index, data } = response else {
        return io.write_all(&encode_response(response, limit).map_err(invalid_input)?).await;
    };
    response.validate().map_err(invalid_input)?;
    let header = piece_header(*index, data.len()).map_err(invalid_input)?;
    let limit = limit.min(MAX_RESPONSE_BYTES);
    if header.len() + data.len() > limit {
        return Err(invalid_input(ProtocolError::TooLarge { len: header.len() + data.len(), limit }));
    }
    io.write_all(&header).await?;
    io.write_all(data).await
}

/// Piece buffers given back by [`recycle`], reused by [`read_response`] (newest first, while
/// still in cache). A fresh buffer costs a zero-fill of the whole piece and, on this path's
/// usual 1 MiB pieces, a page fault per 4 KiB: measured at ~2 % of a downloading agent's CPU
/// (`memset` and `exc_page_fault` under `read_response`), more than yamux's own frame
/// handling. A reused one is overwritten by the read and needs neither.
static PIECE_BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// Buffers kept at most: enough for the requests in flight of a download from 4 peers (4
/// each), at most 16 MiB idle with 1 MiB pieces.
const PIECE_BUFFERS_KEPT: usize = 16;
/// Larger buffers (pieces of very large blobs) are freed rather than kept.
const PIECE_BUFFER_KEPT_MAX: usize = 4 << 20;

/// A buffer of `len` bytes for a piece: a recycled one if any, else a new zeroed one. Its
/// contents are stale bytes of an earlier piece or zeros: a caller overwrites every byte
/// (a `read_exact`) before the buffer is used, or drops it. [`read_response`] takes its
/// buffers here, and so does the store when it reads a piece to serve.
pub fn piece_buffer(len: usize) -> Vec<u8> {
    let recycled = PIECE_BUFFERS.lock().unwrap_or_else(|e| e.into_inner()).pop();
    match recycled {
        Some(mut buf) => {
            // A shorter one (a blob's last piece) grows, zero-filling only the difference.
            buf.resize(len, 0);
            buf
        }
        None => vec![0u8; len],
    }
}

/// Gives a piece's buffer back for the next [`piece_buffer`]: a received piece's once its
/// bytes are written to the store, a served piece's once it is sent.
pub fn recycle(buf: Vec<u8>) {
    if buf.capacity() > PIECE_BUFFER_KEPT_MAX || buf.capacity() == 0 {
        return;
    }
    let mut pool = PIECE_BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < PIECE_BUFFERS_KEPT {
        pool.push(buf);
    }
}

/// Reads and validates one response, the whole stream, at most `limit` bytes (clamped to
/// [`MAX_RESPONSE_BYTES`]); accepts exactly what [`decode_response`] accepts.
///
/// A piece, the message that carries nearly all the bytes, is read straight into a buffer of
/// its announced length (once the length is checked against the limit), which becomes the
/// message's `data`: no growing buffer, no second copy while decoding, and no zero-filling
/// when a buffer given back through [`recycle`] is at hand. Every other message is read
/// whole and decoded by [`decode_response`].
pub async fn read_response<T: AsyncRead + Unpin>(io: &mut T, limit: usize) -> io::Result<PieceResponse> {
    let limit = limit.min(MAX_RESPONSE_BYTES);
    let mut head = [0u8; PIECE_HEADER_MAX];
    let mut got = 0;
    while got < head.len() {
        match io.read(&mut head[got..]).await? {
            0 => break,
            n => got += n,
        }
    }
    if got == 0 {
        // The responder closed the stream without answering (its handler dropped the
        // request); not a malformed message.
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the stream without answering",
        ));
    }
    let piece = bincode::serde::decode_from_slice::<(u32, u32, u64), _>(&head[..got], CONFIG);
    let Ok(((PIECE_VARIANT, index, len), header_len)) = piece else {
        // Not a piece (or not even a header): read the rest and decode the whole.
        let mut bytes = head[..got].to_vec();
        if got == head.len() {
            read_rest_capped(io, &mut bytes, limit).await?;
        }
        return decode_response(&bytes, limit).map_err(invalid_data);
    };
    let total = (header_len as u64).saturating_add(len);
    if total > limit as u64 {
        return Err(invalid_data(ProtocolError::TooLarge {
            len: total.min(usize::MAX as u64) as usize,
            limit,
        }));
    }
    if len > MAX_PIECE_BYTES as u64 {
        return Err(invalid_data(ProtocolError::TooLarge { len: len as usize, limit: MAX_PIECE_BYTES }));
    }
    let len = len as usize;
    let already = got - header_len;
    if already > len {
        return Err(invalid_data(ProtocolError::TrailingBytes(already - len)));
    }
    let mut data = piece_buffer(len);
    data[..already].copy_from_slice(&head[header_len..got]);
    io.read_exact(&mut data[already..]).await.map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            invalid_data(ProtocolError::Decode(format!("piece of {len} bytes cut short")))
        }
        _ => e,
    })?;
    let mut extra = [0u8; 1];
    if io.read(&mut extra).await? != 0 {
        return Err(invalid_data(ProtocolError::Invalid(format!("bytes after a piece of {len} bytes"))));
    }
    let response = PieceResponse::Piece { index, data };
    response.validate().map_err(invalid_data)?;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn digest_strategy() -> impl Strategy<Value = [u8; 32]> {
        proptest::array::uniform32(any::<u8>())
    }

    fn request_strategy() -> impl Strategy<Value = PieceRequest> {
        prop_oneof![
            digest_strategy().prop_map(|digest| PieceRequest::Have { digest }),
            (digest_strategy(), any::<u32>())
                .prop_map(|(digest, index)| PieceRequest::Piece { digest, index }),
            ("[a-z0-9.:-]{1,64}", "[a-z0-9/._-]{1,128}", digest_strategy())
                .prop_map(|(registry, repo, digest)| PieceRequest::PublicSeen { registry, repo, digest }),
            ("[a-z0-9.:-]{1,64}", "[a-z0-9/._-]{1,128}", "[A-Za-z0-9_.-]{1,128}")
                .prop_map(|(registry, repo, tag)| PieceRequest::TagSeen { registry, repo, tag }),
        ]
    }

    /// Valid `Have` answers: a consistent bitfield and digests for existing pieces.
    fn have_strategy() -> impl Strategy<Value = HaveInfo> {
        (0u64..1 << 40, 1u32..=MAX_PIECE_BYTES as u32)
            .prop_filter("at most 4096 pieces keeps cases small", |(size, piece)| {
                HaveInfo::piece_count(*size, *piece) <= 4096
            })
            .prop_flat_map(|(size, piece_size)| {
                let pieces = HaveInfo::piece_count(size, piece_size) as u32;
                (
                    Just((size, piece_size, pieces)),
                    proptest::collection::vec(any::<bool>(), pieces as usize),
                    proptest::collection::vec((0..pieces, digest_strategy()), 0..8),
                    proptest::option::of("[a-z0-9./+-]{0,64}"),
                )
            })
            .prop_map(|((size, piece_size, pieces), bits, piece_digests, media_type)| {
                let mut have = vec![0u8; (pieces as usize).div_ceil(8)];
                for (i, _) in bits.iter().enumerate().filter(|(_, b)| **b) {
                    have[i / 8] |= 1 << (i % 8);
                }
                let complete = bits.iter().all(|b| *b);
                HaveInfo { size, piece_size, have, piece_digests, complete, media_type }
            })
    }

    fn response_strategy() -> impl Strategy<Value = PieceResponse> {
        prop_oneof![
            have_strategy().prop_map(PieceResponse::Have),
            (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..4096))
                .prop_map(|(index, data)| PieceResponse::Piece { index, data }),
            Just(PieceResponse::NotFound),
            Just(PieceResponse::Busy),
            any::<u64>().prop_map(|age_ms| PieceResponse::PublicSeen { age_ms }),
            (digest_strategy(), "[a-z0-9./+-]{0,64}", any::<u64>(), any::<u64>()).prop_map(
                |(digest, media_type, size, age_ms)| PieceResponse::TagSeen(TagSeenInfo {
                    digest,
                    media_type,
                    size,
                    age_ms
                })
            ),
            Just(PieceResponse::NotSeen),
            "[ -~]{0,255}".prop_map(PieceResponse::BadRequest),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(request in request_strategy()) {
            let bytes = encode_request(&request).unwrap();
            prop_assert!(bytes.len() <= 400);
            prop_assert_eq!(decode_request(&bytes).unwrap(), request);
        }

        #[test]
        fn responses_round_trip(response in response_strategy()) {
            let bytes = encode_response(&response, MAX_RESPONSE_BYTES).unwrap();
            prop_assert_eq!(decode_response(&bytes, MAX_RESPONSE_BYTES).unwrap(), response);
        }

        /// Every strict prefix of a valid message is an error, never a panic or a shorter
        /// valid message.
        #[test]
        fn truncated_responses_are_errors(response in response_strategy(), cut in any::<prop::sample::Index>()) {
            let bytes = encode_response(&response, MAX_RESPONSE_BYTES).unwrap();
            let cut = cut.index(bytes.len());
            prop_assert!(decode_response(&bytes[..cut], MAX_RESPONSE_BYTES).is_err());
        }

        /// The streaming reader accepts exactly what the slice decoder accepts, with the same
        /// result, whatever the bytes: valid, cut short, with bytes after, or garbage; and
        /// however the stream splits them into reads.
        #[test]
        fn stream_reader_agrees_with_decoder(
            response in response_strategy(),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
            cut in any::<prop::sample::Index>(),
            step in 1usize..32,
        ) {
            let valid = encode_response(&response, MAX_RESPONSE_BYTES).unwrap();
            let cases = [
                valid.clone(),
                valid[..cut.index(valid.len())].to_vec(),
                [valid.as_slice(), &[0], &garbage[..garbage.len().min(3)]].concat(),
                garbage.clone(),
                [&valid[..valid.len().min(4)], garbage.as_slice()].concat(),
            ];
            for bytes in cases {
                let streamed = block_on(read_response(&mut Trickle { bytes: &bytes, step }, MAX_RESPONSE_BYTES));
                match decode_response(&bytes, MAX_RESPONSE_BYTES) {
                    Ok(decoded) => prop_assert_eq!(streamed.unwrap(), decoded),
                    Err(_) => prop_assert!(streamed.is_err(), "streamed {:?} from {}", streamed, hex(&bytes)),
                }
            }
        }

        /// The writer puts on the wire exactly the bytes of `encode_response`.
        #[test]
        fn stream_writer_matches_encoder(response in response_strategy()) {
            let mut out = Vec::new();
            block_on(write_response(&mut out, &response, MAX_RESPONSE_BYTES)).unwrap();
            prop_assert_eq!(out, encode_response(&response, MAX_RESPONSE_BYTES).unwrap());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes, MAX_RESPONSE_BYTES);
        }
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(future)
    }

    /// A stream that hands out at most `step` bytes per read.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = self.step.min(buf.len()).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            std::task::Poll::Ready(Ok(n))
        }
    }

    /// The streaming reader's own checks: limits before allocation, truncation, trailing
    /// bytes, and a closed stream.
    #[test]
    fn stream_reader_bad_input() {
        let read = |bytes: &[u8], limit| block_on(read_response(&mut Trickle { bytes, step: 7 }, limit));
        let invalid = |r: io::Result<PieceResponse>| r.unwrap_err().kind() == io::ErrorKind::InvalidData;
        let ok = encode_response(&PieceResponse::Piece { index: 0, data: vec![7; 100] }, 1000).unwrap();
        assert!(read(&ok, 1000).is_ok());
        assert!(invalid(read(&ok, 50)), "over the reader's limit");
        assert!(invalid(read(&ok[..ok.len() - 1], 1000)), "cut short");
        assert!(invalid(read(&[ok.as_slice(), &[0]].concat(), 1000)), "a byte after the piece");
        // A piece claiming 17 MiB, more than any piece may be: refused from its header.
        let forged = [[1u8, 0, 252].as_slice(), &(17u32 << 20).to_le_bytes()].concat();
        assert!(invalid(read(&forged, MAX_RESPONSE_BYTES)));
        // u64::MAX bytes.
        let forged = [[1u8, 0, 253].as_slice(), &[0xff; 8]].concat();
        assert!(invalid(read(&forged, MAX_RESPONSE_BYTES)));
        // Nothing at all: the responder dropped the request.
        assert_eq!(read(&[], 1000).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        // A large non-piece answer past the limit.
        assert!(invalid(read(&[0; 2000], 1000)));
    }

    /// A recycled buffer is reused for the next piece, whatever its size, and none of its
    /// stale bytes show through: the piece read is exactly what was sent.
    #[test]
    fn recycled_buffers_carry_no_stale_bytes() {
        let read =
            |bytes: &[u8]| block_on(read_response(&mut Trickle { bytes, step: 4096 }, MAX_RESPONSE_BYTES));
        for (stale, len) in [(1 << 20, 1 << 20), (1 << 20, 1000), (1000, 1 << 20), (10, 0)] {
            recycle(vec![0xee; stale]);
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sent = PieceResponse::Piece { index: 3, data };
            let bytes = encode_response(&sent, MAX_RESPONSE_BYTES).unwrap();
            assert_eq!(read(&bytes).unwrap(), sent);
            // Cut short: an error, never a piece padded with stale bytes.
            recycle(vec![0xee; stale]);
            assert!(read(&bytes[..bytes.len() - 1]).is_err() || len == 0);
        }
        // Oversized buffers are not kept.
        recycle(vec![0; PIECE_BUFFER_KEPT_MAX + 1]);
        assert!(PIECE_BUFFERS.lock().unwrap().iter().all(|b| b.capacity() <= PIECE_BUFFER_KEPT_MAX));
    }

    fn hex(bytes: &[u8]) -> String {
        hex::encode(bytes)
    }

    /// The wire bytes of one small message of each variant. A change here is a protocol
    /// change: bump the protocol name instead.
    #[test]
    fn fixed_encodings() {
        // Have { digest }:
        //   00          variant 0 (Have), varint u32
        //   11 × 32     digest, a fixed array: no length
        let have = PieceRequest::Have { digest: [0x11; 32] };
        assert_eq!(hex(&encode_request(&have).unwrap()), format!("00{}", "11".repeat(32)));

        // Piece { digest, index: 300 }:
        //   01          variant 1 (Piece)
        //   22 × 32     digest
        //   fb 2c 01    index 300: varint marker 251 (u16 follows), then 300 little-endian
        let piece = PieceRequest::Piece { digest: [0x22; 32], index: 300 };
        assert_eq!(hex(&encode_request(&piece).unwrap()), format!("01{}fb2c01", "22".repeat(32)));

        // Have(HaveInfo { size 10, piece_size 4 → 3 pieces, holds 0 and 2, attests piece 0,
        //                 not complete, media type "a/b" }):
        //   00          variant 0 (Have)
        //   0a          size 10
        //   04          piece_size 4
        //   01 05       bitfield: length 1, bits 0b101
        //   01          one piece digest:
        //   00 aa × 32    (index 0, digest)
        //   00          complete = false
        //   01 03 612f62  media_type: Some, length 3, "a/b"
        let info = HaveInfo {
            size: 10,
            piece_size: 4,
            have: vec![0b101],
            piece_digests: vec![(0, [0xaa; 32])],
            complete: false,
            media_type: Some("a/b".to_string()),
        };
        let bytes = encode_response(&PieceResponse::Have(info), MAX_RESPONSE_BYTES).unwrap();
        assert_eq!(hex(&bytes), format!("000a0401050100{}000103612f62", "aa".repeat(32)));

        // Piece { index 2, data "abc" }:
        //   01          variant 1 (Piece)
        //   02          index 2
        //   03 616263   data: length 3, bytes
        let piece = PieceResponse::Piece { index: 2, data: b"abc".to_vec() };
        assert_eq!(hex(&encode_response(&piece, MAX_RESPONSE_BYTES).unwrap()), "010203616263");

        // NotFound and Busy: the variant alone.
        assert_eq!(hex(&encode_response(&PieceResponse::NotFound, 16).unwrap()), "02");
        assert_eq!(hex(&encode_response(&PieceResponse::Busy, 16).unwrap()), "03");

        // PublicSeen { registry "r", repo "a/b", digest }:
        //   02          variant 2 (PublicSeen), after the two of the first release
        //   01 72       registry: length 1, "r"
        //   03 612f62   repo: length 3, "a/b"
        //   33 × 32     digest
        let seen = PieceRequest::PublicSeen { registry: "r".into(), repo: "a/b".into(), digest: [0x33; 32] };
        assert_eq!(hex(&encode_request(&seen).unwrap()), format!("02017203612f62{}", "33".repeat(32)));
        // TagSeen { registry "r", repo "a", tag "v1" }: 03, then three strings.
        let tag = PieceRequest::TagSeen { registry: "r".into(), repo: "a".into(), tag: "v1".into() };
        assert_eq!(hex(&encode_request(&tag).unwrap()), "0301720161027631");

        // PublicSeen { age_ms 300 }: 04, then the varint fb 2c 01.
        let age = PieceResponse::PublicSeen { age_ms: 300 };
        assert_eq!(hex(&encode_response(&age, 16).unwrap()), "04fb2c01");
        // TagSeen { digest, media type "a/b", size 10, age 5 }:
        //   05  44 × 32  03 612f62  0a  05
        let info = TagSeenInfo { digest: [0x44; 32], media_type: "a/b".into(), size: 10, age_ms: 5 };
        let bytes = encode_response(&PieceResponse::TagSeen(info), 100).unwrap();
        assert_eq!(hex(&bytes), format!("05{}03612f620a05", "44".repeat(32)));
        // NotSeen: the variant alone; BadRequest: 07 and a string.
        assert_eq!(hex(&encode_response(&PieceResponse::NotSeen, 16).unwrap()), "06");
        let bad = PieceResponse::BadRequest("x".into());
        assert_eq!(hex(&encode_response(&bad, 16).unwrap()), "070178");
    }

    /// Attestation messages that are too large are refused on both sides, before any work.
    #[test]
    fn oversized_attestation_messages_are_refused() {
        let huge = PieceRequest::PublicSeen { registry: "r".into(), repo: "a".repeat(2000), digest: [0; 32] };
        assert!(matches!(encode_request(&huge), Err(ProtocolError::TooLarge { .. })));
        let bytes = bincode::serde::encode_to_vec(&huge, CONFIG).unwrap();
        assert!(matches!(decode_request(&bytes), Err(ProtocolError::TooLarge { .. })));
        let why = PieceResponse::BadRequest("y".repeat(MAX_REASON_BYTES + 1));
        assert!(encode_response(&why, MAX_RESPONSE_BYTES).is_err());
        let bytes = bincode::serde::encode_to_vec(&why, CONFIG).unwrap();
        assert!(decode_response(&bytes, MAX_RESPONSE_BYTES).is_err());
        let info = TagSeenInfo { digest: [0; 32], media_type: "m".repeat(256), size: 1, age_ms: 1 };
        let bytes = bincode::serde::encode_to_vec(PieceResponse::TagSeen(info), CONFIG).unwrap();
        assert!(matches!(decode_response(&bytes, MAX_RESPONSE_BYTES), Err(ProtocolError::Invalid(_))));
    }

    #[test]
    fn bad_input_is_an_error() {
        let ok = encode_response(&PieceResponse::Piece { index: 0, data: vec![7; 100] }, 1000).unwrap();
        // Over the reader's limit.
        assert!(matches!(decode_response(&ok, 50), Err(ProtocolError::TooLarge { .. })));
        // Trailing byte.
        let mut long = ok.clone();
        long.push(0);
        assert_eq!(decode_response(&long, 1000), Err(ProtocolError::TrailingBytes(1)));
        // Unknown variant.
        assert!(matches!(decode_response(&[9], 1000), Err(ProtocolError::Decode(_))));
        assert!(matches!(decode_request(&[2],), Err(ProtocolError::Decode(_))), "cut short");
        assert!(matches!(decode_request(&[4],), Err(ProtocolError::Decode(_))));
        // Empty input.
        assert!(decode_request(&[]).is_err());
        assert!(decode_response(&[], 1000).is_err());
        // A forged length: Piece, index 0, data length u64::MAX (varint marker 253 + 8 bytes),
        // nothing after it. Must fail on the limit without allocating.
        let forged = [[1u8, 0, 253].as_slice(), &[0xff; 8]].concat();
        assert!(matches!(decode_response(&forged, MAX_RESPONSE_BYTES), Err(ProtocolError::Decode(_))));
        // A length just over the slice: claims 17 MiB.
        let forged = [[1u8, 0, 252].as_slice(), &(17u32 << 20).to_le_bytes()].concat();
        assert!(decode_response(&forged, MAX_RESPONSE_BYTES).is_err());
        // A request longer than the request limit.
        assert!(matches!(decode_request(&[0; MAX_REQUEST_BYTES + 1]), Err(ProtocolError::TooLarge { .. })));
    }

    #[test]
    fn inconsistent_have_answers_are_invalid() {
        let good = HaveInfo {
            size: 10,
            piece_size: 4,
            have: vec![0b111],
            piece_digests: vec![(2, [0; 32])],
            complete: true,
            media_type: None,
        };
        let check = |f: &dyn Fn(&mut HaveInfo)| {
            let mut info = good.clone();
            f(&mut info);
            let bytes = bincode::serde::encode_to_vec(PieceResponse::Have(info), CONFIG).unwrap();
            decode_response(&bytes, MAX_RESPONSE_BYTES)
        };
        assert!(check(&|_| ()).is_ok());
        assert!(matches!(check(&|i| i.piece_size = 0), Err(ProtocolError::Invalid(_))));
        assert!(matches!(
            check(&|i| i.piece_size = MAX_PIECE_BYTES as u32 + 1),
            Err(ProtocolError::Invalid(_))
        ));
        assert!(matches!(check(&|i| i.have = vec![0b111, 0]), Err(ProtocolError::Invalid(_))));
        assert!(matches!(check(&|i| i.have = vec![0b1111]), Err(ProtocolError::Invalid(_))), "spare bit");
        assert!(matches!(check(&|i| i.piece_digests = vec![(3, [0; 32])]), Err(ProtocolError::Invalid(_))));
        assert!(matches!(check(&|i| i.have = vec![0b011]), Err(ProtocolError::Invalid(_))), "complete");
        assert!(matches!(check(&|i| i.media_type = Some("x".repeat(256))), Err(ProtocolError::Invalid(_))));
        // An empty blob has one empty piece.
        assert!(check(&|i| {
            i.size = 0;
            i.have = vec![1];
            i.piece_digests = vec![(0, [0; 32])];
        })
        .is_ok());
        // Oversized pieces are refused on both sides.
        let big = PieceResponse::Piece { index: 0, data: vec![0; MAX_PIECE_BYTES + 1] };
        assert!(matches!(encode_response(&big, MAX_RESPONSE_BYTES), Err(ProtocolError::TooLarge { .. })));
        let bytes = bincode::serde::encode_to_vec(&big, CONFIG).unwrap();
        assert!(decode_response(&bytes, MAX_RESPONSE_BYTES).is_err());
    }

    #[test]
    fn have_bits() {
        let info = HaveInfo {
            size: 20,
            piece_size: 2,
            have: vec![0b0000_0101, 0b10],
            piece_digests: vec![],
            complete: false,
            media_type: None,
        };
        let held: Vec<u32> = (0..12).filter(|i| info.has(*i)).collect();
        assert_eq!(held, vec![0, 2, 9]);
        assert_eq!(HaveInfo::piece_count(0, 4), 1);
        assert_eq!(HaveInfo::piece_count(8, 4), 2);
        assert_eq!(HaveInfo::piece_count(9, 4), 3);
    }
}
