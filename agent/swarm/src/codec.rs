//! libp2p's request-response codecs for Shoal's two wire protocols. The messages, their
//! encoding and the capped stream reads are `shoal_protocol`'s ([`shoal_protocol::piece`],
//! [`shoal_protocol::tracker`]); this file only plugs them into libp2p.

use std::io;

use libp2p::futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use shoal_protocol::piece::{
    decode_request, encode_request, invalid_data, read_capped, read_response, write_response, PieceRequest,
    PieceResponse, MAX_REQUEST_BYTES,
};
use shoal_protocol::tracker::{
    decode_tracker_request, decode_tracker_response, encode_tracker_request, encode_tracker_response,
    TrackerRequest, TrackerResponse, MAX_TRACKER_MESSAGE_BYTES,
};

/// `/shoal/piece/1.0.0`.
pub(crate) const PIECE_PROTOCOL: StreamProtocol = StreamProtocol::new(shoal_protocol::piece::PROTOCOL);
/// `/shoal/tracker/1.0.0`.
pub(crate) const TRACKER_PROTOCOL: StreamProtocol =
    StreamProtocol::new(shoal_protocol::tracker::TRACKER_PROTOCOL);
/// `/shoal/plan/1.0.0`: the tracker protocol's messages, answered by a digest's coordinator.
pub(crate) const COORDINATOR_PROTOCOL: StreamProtocol =
    StreamProtocol::new(shoal_protocol::tracker::COORDINATOR_PROTOCOL);

/// The request-response codec: whole-stream messages, capped reads (see the module docs).
#[derive(Clone, Debug)]
pub(crate) struct PieceCodec {
    /// Largest response this node reads or writes.
    pub(crate) max_response_bytes: usize,
}

impl libp2p::request_response::Codec for PieceCodec {
    type Protocol = StreamProtocol;
    type Request = PieceRequest;
    type Response = PieceResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<PieceRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_capped(io, MAX_REQUEST_BYTES).await?;
        decode_request(&bytes).map_err(invalid_data)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<PieceResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_response(io, self.max_response_bytes).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: PieceRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes = encode_request(&request).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        io.write_all(&bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: PieceResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let written = write_response(io, &response, self.max_response_bytes).await;
        // The store read the piece into a buffer of the codec's pool; the next read reuses it.
        if let PieceResponse::Piece { data, .. } = response {
            shoal_protocol::piece::recycle(data);
        }
        written
    }
}

/// The request-response codec of the tracker protocol.
#[derive(Clone, Debug, Default)]
pub(crate) struct TrackerCodec {
    /// Counts requests that could not be read (libp2p drops those without an event).
    pub(crate) stats: std::sync::Arc<crate::SwarmStats>,
}

impl libp2p::request_response::Codec for TrackerCodec {
    type Protocol = StreamProtocol;
    type Request = TrackerRequest;
    type Response = TrackerResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<TrackerRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let request = match read_capped(io, MAX_TRACKER_MESSAGE_BYTES).await {
            Ok(bytes) => decode_tracker_request(&bytes).map_err(invalid_data),
            Err(e) => Err(e),
        };
        if let Err(e) = &request {
            self.stats.tracker_requests_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "refused a malformed tracker request");
        }
        request
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<TrackerResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let bytes = read_capped(io, MAX_TRACKER_MESSAGE_BYTES).await?;
        if bytes.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the tracker closed the stream"));
        }
        decode_tracker_response(&bytes).map_err(invalid_data)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: TrackerRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes =
            encode_tracker_request(&request).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        io.write_all(&bytes).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: TrackerResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let bytes =
            encode_tracker_response(&response).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        io.write_all(&bytes).await
    }
}
