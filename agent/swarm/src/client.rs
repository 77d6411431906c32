//! The handle other tasks use to drive the swarm: each method sends a [`Command`] to the
//! event loop over a bounded channel and waits for its oneshot reply.

use std::sync::Arc;
use std::time::Duration;

use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};

use super::{SwarmError, SwarmStats};
use shoal_protocol::piece::{PieceRequest, PieceResponse};
use shoal_protocol::tracker::{TrackerRequest, TrackerResponse};
use shoal_protocol::types::Digest;

/// Why a piece request got no answer. The caller branches on it: `Protocol` means the peer
/// misbehaved (penalise it); the others say nothing about the peer's honesty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the peer did not answer within the request timeout")]
    Timeout,
    #[error("the peer could not be reached (dial failed or timed out, or no known address)")]
    Unreachable,
    #[error("the connection closed before the peer answered")]
    ConnectionClosed,
    #[error("the peer broke the piece protocol: {0}")]
    Protocol(String),
    #[error("the swarm event loop has stopped")]
    Stopped,
}

/// A piece request from a peer, to be answered through [`Client::respond`]. Dropping it
/// without answering closes the peer's stream (it sees `ConnectionClosed`).
#[derive(Debug)]
pub struct InboundRequest {
    pub peer: PeerId,
    pub request: PieceRequest,
    pub channel: ResponseHandle,
}

/// Where the answer to an [`InboundRequest`] goes.
#[derive(Debug)]
pub struct ResponseHandle(pub(crate) ResponseChannel<PieceResponse>);

impl ResponseHandle {
    /// False once the requester is gone (timed out, disconnected): answering is then wasted.
    pub fn is_open(&self) -> bool {
        self.0.is_open()
    }
}

/// A tracker request from an agent, to be answered through [`Client::respond_tracker`].
#[derive(Debug)]
pub struct InboundTrackerRequest {
    pub peer: PeerId,
    /// The listen addresses the peer told us through identify (empty until it did).
    pub addrs: Vec<Multiaddr>,
    pub request: TrackerRequest,
    pub channel: TrackerResponseHandle,
}

/// Where the answer to an [`InboundTrackerRequest`] goes.
#[derive(Debug)]
pub struct TrackerResponseHandle(pub(crate) ResponseChannel<TrackerResponse>);

pub(crate) enum Command {
    TrackerRequest {
        peer: PeerId,
        request: TrackerRequest,
        reply: oneshot::Sender<Result<TrackerResponse, RequestError>>,
    },
    RespondTracker {
        channel: TrackerResponseHandle,
        response: TrackerResponse,
    },
    Trackers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    RedialBootstrap,
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    StartProviding {
        digest: Digest,
        reply: oneshot::Sender<Result<(), SwarmError>>,
    },
    StopProviding {
        digest: Digest,
    },
    FindProviders {
        digest: Digest,
        timeout: Duration,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    ClosestPeers {
        digest: Digest,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Request {
        peer: PeerId,
        request: PieceRequest,
        reply: oneshot::Sender<Result<PieceResponse, RequestError>>,
    },
    Respond {
        channel: ResponseHandle,
        response: PieceResponse,
    },
    ConnectedPeers {
        reply: oneshot::Sender<usize>,
    },
    /// Up to `limit` connected peers.
    Peers {
        limit: usize,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    AddAddress {
        peer: PeerId,
        addr: Multiaddr,
    },
    Bootstrap,
}

/// A cheap, cloneable handle to the swarm. When every `Client` is dropped, the event loop
/// ends.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    stats: Arc<SwarmStats>,
}

impl Client {
    pub(crate) fn new(
        commands: mpsc::Sender<Command>,
        local_peer_id: PeerId,
        stats: Arc<SwarmStats>,
    ) -> Self {
        Client { commands, local_peer_id, stats }
    }

    async fn send(&self, command: Command) -> Result<(), SwarmError> {
        self.commands.send(command).await.map_err(|_| SwarmError::Stopped)
    }

    async fn call<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, SwarmError> {
        let (reply, answer) = oneshot::channel();
        self.send(command(reply)).await?;
        answer.await.map_err(|_| SwarmError::Stopped)
    }

    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// The loop's counters.
    pub fn stats(&self) -> Arc<SwarmStats> {
        self.stats.clone()
    }

    /// The addresses the node listens on (after the listeners reported them: waits for the
    /// first one right after start).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, SwarmError> {
        self.call(|reply| Command::ListenAddrs { reply }).await
    }

    /// Advertises `digest` in the DHT. Returns once the record is stored locally (peers that
    /// ask us find it at once); the publication to the closest peers runs in the background
    /// and is repeated periodically until [`Client::stop_providing`].
    pub async fn start_providing(&self, digest: Digest) -> Result<(), SwarmError> {
        self.call(|reply| Command::StartProviding { digest, reply }).await?
    }

    /// Stops advertising `digest` (records held by others expire within the provider TTL).
    pub async fn stop_providing(&self, digest: Digest) -> Result<(), SwarmError> {
        self.send(Command::StopProviding { digest }).await
    }

    /// Peers advertising `digest`, excluding this node: those found when the DHT query ends,
    /// or within `timeout` if it runs longer (the query is then stopped).
    pub async fn find_providers(&self, digest: Digest, timeout: Duration) -> Result<Vec<PeerId>, SwarmError> {
        self.call(|reply| Command::FindProviders { digest, timeout, reply }).await
    }

    /// The nodes XOR-closest to `digest`'s DHT key (the key its provider records live
    /// under), this node included, closest first: at most the DHT's replication factor (20)
    /// from one iterative lookup, plus us. Only this node when it knows no peer.
    pub async fn closest_peers(&self, digest: Digest) -> Result<Vec<PeerId>, SwarmError> {
        self.call(|reply| Command::ClosestPeers { digest, reply }).await
    }

    /// Sends a piece request, connecting first if needed (with addresses from the DHT,
    /// identify, or [`Client::add_address`]).
    pub async fn request(&self, peer: PeerId, request: PieceRequest) -> Result<PieceResponse, RequestError> {
        match self.call(|reply| Command::Request { peer, request, reply }).await {
            Ok(result) => result,
            Err(_) => Err(RequestError::Stopped),
        }
    }

    /// Answers an inbound request. A requester that is gone is not an error here.
    pub async fn respond(&self, channel: ResponseHandle, response: PieceResponse) -> Result<(), SwarmError> {
        self.send(Command::Respond { channel, response }).await
    }

    /// Peers with an open connection; 0 once the loop has stopped.
    pub async fn connected_peers(&self) -> usize {
        self.call(|reply| Command::ConnectedPeers { reply }).await.unwrap_or(0)
    }

    /// Up to `limit` of the peers with an open connection (trackers included); none once the
    /// loop has stopped.
    pub async fn peers(&self, limit: usize) -> Vec<PeerId> {
        self.call(|reply| Command::Peers { limit, reply }).await.unwrap_or_default()
    }

    /// Records an address of a peer (for the DHT routing table and for dialing it).
    pub async fn add_address(&self, peer: PeerId, addr: Multiaddr) -> Result<(), SwarmError> {
        self.send(Command::AddAddress { peer, addr }).await
    }

    /// Redials the bootstrap peers that are not connected and runs a DHT bootstrap.
    pub async fn bootstrap(&self) -> Result<(), SwarmError> {
        self.send(Command::Bootstrap).await
    }

    /// Sends a tracker request (agents).
    pub async fn tracker_request(
        &self,
        peer: PeerId,
        request: TrackerRequest,
    ) -> Result<TrackerResponse, RequestError> {
        match self.call(|reply| Command::TrackerRequest { peer, request, reply }).await {
            Ok(result) => result,
            Err(_) => Err(RequestError::Stopped),
        }
    }

    /// Answers a tracker request (trackers).
    pub async fn respond_tracker(
        &self,
        channel: TrackerResponseHandle,
        response: TrackerResponse,
    ) -> Result<(), SwarmError> {
        self.send(Command::RespondTracker { channel, response }).await
    }

    /// Dials the bootstrap peers and names that are not connected (no DHT query).
    pub async fn redial_bootstrap(&self) -> Result<(), SwarmError> {
        self.send(Command::RedialBootstrap).await
    }

    /// Connected peers that serve the tracker protocol (as identify told), sorted.
    pub async fn trackers(&self) -> Vec<PeerId> {
        self.call(|reply| Command::Trackers { reply }).await.unwrap_or_default()
    }
}
