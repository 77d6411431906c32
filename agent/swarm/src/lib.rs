//! # shoal-swarm
//!
//! The peer-to-peer network of Shoal's agents and trackers: every libp2p type lives in this
//! crate. It knows the wire protocols ([`shoal_protocol`]) but not what a node does with a
//! request: the agent's P2P adapter (`shoal_agent::p2p`) and the tracker answer them.
//!
//! ## Why it looks like this
//!
//! Agents find each other through a Kademlia DHT and move verified pieces between each other
//! with a small request-response protocol ([`shoal_protocol::piece`]). libp2p gives both, plus authenticated
//! encrypted connections (noise or TLS 1.3 over TCP, see [`security`]; QUIC for
//! `/udp/…/quic-v1` addresses; a peer *is* its key) and, with a cluster pre-shared key
//! (pnet, TCP only), a swarm that a process without the key cannot even finish a handshake
//! with.
//!
//! - **One task owns the [`libp2p::Swarm`].** [`new`] returns a cloneable [`Client`] (a bounded
//!   channel of commands, each with a oneshot reply), a receiver of [`InboundRequest`]s, and an
//!   [`EventLoop`] to spawn. The loop never touches the disk and never waits on a slow
//!   consumer: inbound piece requests go out through a bounded channel with `try_send`, and a
//!   full channel is answered [`PieceResponse::Busy`] right away. Another task reads the
//!   store and answers through [`Client::respond`].
//! - **Kademlia in server mode under `/shoal/kad/1.0.0`.** Every agent serves the DHT from the
//!   start (cluster networks are reachable both ways), and the private protocol name keeps it
//!   apart from any public DHT. Provider records are keyed by the 32 digest bytes, one per
//!   blob. The loop re-publishes held digests itself, at most a few queries at a time, every
//!   10 minutes and whenever a bootstrap peer (re)connects, so a node that restarts or joins
//!   is findable at once rather than after kad's 12 h default.
//! - **identify** tells each side the other's listen addresses; they go into the routing
//!   table, so inbound-only peers become routable.
//! - **Bootstrap** from static `/…/p2p/<id>` addresses or a DNS name (a headless Service):
//!   resolved at start and every 30 s, every new address dialed without a peer id (the
//!   handshake tells who answered; our own address is recognised and skipped). Known
//!   addresses are redialed only while no peer behind the name is connected: once in, the
//!   DHT keeps the node in, and a 500-node cluster is not redialed every round. Resolution
//!   runs in its own task; the loop only dials.
//! - **Bounds.** Dials give up after `dial_timeout`, requests after `request_timeout`, reads
//!   after `max_message_bytes`, idle connections after 60 s; every channel is bounded.
//!
//! ## Use
//!
//! ```no_run
//! # async fn demo(config: shoal_swarm::SwarmConfig) -> Result<(), Box<dyn std::error::Error>> {
//! let shoal_swarm::Parts { client, mut inbound, event_loop, .. } = shoal_swarm::new(config)?;
//! tokio::spawn(event_loop.run(std::future::pending()));
//! // A serving task answers from the store:
//! let server = client.clone();
//! tokio::spawn(async move {
//!     while let Some(request) = inbound.recv().await {
//!         let _ = server.respond(request.channel, shoal_swarm::PieceResponse::NotFound).await;
//!     }
//! });
//! # Ok(()) }
//! ```

mod behaviour;
mod client;
mod codec;
mod event_loop;
mod identity;
mod security;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport as _};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{quic, tcp, yamux, Swarm};
use tokio::sync::mpsc;

pub use client::{
    Client, InboundRequest, InboundTrackerRequest, RequestError, ResponseHandle, TrackerResponseHandle,
};
pub use event_loop::EventLoop;
pub use libp2p::{Multiaddr, PeerId};
pub use security::Security;
pub use shoal_protocol::piece::{HaveInfo, PieceRequest, PieceResponse, MAX_PIECE_BYTES, MAX_RESPONSE_BYTES};

/// The agent's default P2P port.
pub const DEFAULT_PORT: u16 = 5001;
/// The tracker's default P2P port (for `--tracker dns:<name>` without a port).
pub const TRACKER_PORT: u16 = 5101;
/// Peers an agent keeps connections to by default (`--max-peers`). In a 10,000-node cluster
/// an agent talks to its Kademlia neighbourhood (k = 20 per bucket, about 14 buckets at that
/// size, but connections only while queried), the ≤ 16 peers of each download and a tracker;
/// idle connections close after a minute. 256 leaves room for that and stays far below the
/// kernel's default neighbour table (1,024 entries, shared by everything on the node).
pub const DEFAULT_MAX_PEERS: usize = 256;
/// Connections with no stream open for this long are closed.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// Commands waiting for the event loop.
const COMMAND_QUEUE: usize = 256;
/// Smallest allowed `max_message_bytes`: room for `Have` answers of small blobs.
const MIN_MESSAGE_BYTES: usize = 4096;

/// What this node is in the swarm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// Serves and fetches pieces; asks trackers.
    #[default]
    Agent,
    /// Answers the tracker protocol; holds no pieces.
    Tracker,
}

/// Settings of the swarm. [`SwarmConfig::new`] holds every default.
#[derive(Clone, Debug)]
pub struct SwarmConfig {
    pub role: Role,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers or DNS names to join the swarm through.
    pub bootstrap: Vec<Bootstrap>,
    /// The node's ed25519 key (libp2p protobuf encoding), created with mode 0600 if missing.
    pub key_path: PathBuf,
    /// A libp2p pnet pre-shared key file; with it, only holders of the same key can connect.
    /// pnet wraps a TCP byte stream, so a private swarm runs over TCP only: QUIC addresses
    /// are refused by [`SwarmConfig::validate`] and no QUIC transport is built.
    pub swarm_key: Option<PathBuf>,
    /// The security protocols offered on TCP connections, the first preferred when dialing;
    /// inbound connections may use any of them (see [`security`]).
    pub security: Vec<Security>,
    /// How long a connection attempt (TCP, pnet, noise, yamux) may take.
    pub dial_timeout: Duration,
    /// How long a peer has to answer a piece request once the stream is open.
    pub request_timeout: Duration,
    /// Largest piece-protocol response this node reads or writes, at most
    /// [`MAX_RESPONSE_BYTES`].
    pub max_message_bytes: usize,
    /// Inbound piece requests waiting for the serving task; more are answered `Busy`.
    pub inbound_queue: usize,
    /// Established connections at most (`None`: unbounded, for trackers, which talk to
    /// every agent); see [`behaviour::connection_limits`].
    pub max_peers: Option<usize>,
}

impl SwarmConfig {
    /// Defaults, with the node key at `key_path` (by convention `<cache dir>/node.key`).
    pub fn new(key_path: PathBuf) -> Self {
        SwarmConfig {
            role: Role::Agent,
            listen: vec![Multiaddr::empty()
                .with(Protocol::Ip4([0, 0, 0, 0].into()))
                .with(Protocol::Tcp(DEFAULT_PORT))],
            bootstrap: Vec::new(),
            key_path,
            swarm_key: None,
            security: Security::DEFAULT.to_vec(),
            dial_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_message_bytes: MAX_RESPONSE_BYTES,
            inbound_queue: 64,
            // Trackers talk to every agent; agents pass `--max-peers`.
            max_peers: None,
        }
    }

    pub fn validate(&self) -> Result<(), SwarmError> {
        let invalid = |what: String| Err(SwarmError::Config(what));
        if self.dial_timeout.is_zero() || self.request_timeout.is_zero() {
            return invalid("dial and request timeouts must be positive".to_string());
        }
        if !(MIN_MESSAGE_BYTES..=MAX_RESPONSE_BYTES).contains(&self.max_message_bytes) {
            return invalid(format!(
                "max message size {} outside {MIN_MESSAGE_BYTES}..={MAX_RESPONSE_BYTES}",
                self.max_message_bytes
            ));
        }
        if self.max_peers.is_some_and(|n| n < 4) {
            return invalid("max peers must be at least 4".to_string());
        }
        if self.security.is_empty() {
            return invalid("at least one security protocol (tls, noise) is needed".to_string());
        }
        if self.swarm_key.is_some() {
            let quic = self.listen.iter().chain(self.bootstrap.iter().filter_map(|b| match b {
                Bootstrap::Peer { addr, .. } => Some(addr),
                Bootstrap::Dns { .. } => None,
            }));
            if let Some(addr) = quic.into_iter().find(|a| is_quic(a)) {
                return invalid(format!(
                    "{addr}: a swarm key (pnet) protects TCP connections only; QUIC cannot carry it, so a private swarm listens and dials on TCP"
                ));
            }
        }
        if self.inbound_queue == 0 {
            return invalid("the inbound request queue must hold at least one request".to_string());
        }
        Ok(())
    }
}

/// Where to join the swarm.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// A known peer, parsed from a multiaddr ending in `/p2p/<peer id>` (`addr` is without it).
    Peer { peer: PeerId, addr: Multiaddr },
    /// `dns:<name>[:port]`: every address the name resolves to is dialed, re-resolved
    /// periodically. The port defaults to [`DEFAULT_PORT`].
    Dns { host: String, port: u16 },
}

impl FromStr for Bootstrap {
    type Err = SwarmError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Bootstrap::parse(s, DEFAULT_PORT)
    }
}

impl Bootstrap {
    /// Parses a multiaddr with `/p2p/<id>` or `dns:<name>[:port]`, the port defaulting to
    /// `default_port`.
    pub fn parse(s: &str, default_port: u16) -> Result<Self, SwarmError> {
        let bad = |reason: &str| SwarmError::Bootstrap { input: s.to_string(), reason: reason.to_string() };
        if let Some(rest) = s.strip_prefix("dns:") {
            let (host, port) = match rest.rsplit_once(':') {
                Some((host, port)) => {
                    (host, port.parse::<u16>().map_err(|_| bad("the port is not a number"))?)
                }
                None => (rest, default_port),
            };
            let host_ok = !host.is_empty()
                && host.len() <= 253
                && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if !host_ok {
                return Err(bad("not a DNS name"));
            }
            return Ok(Bootstrap::Dns { host: host.to_string(), port });
        }
        let mut addr: Multiaddr = s.parse().map_err(|e: libp2p::multiaddr::Error| SwarmError::Multiaddr {
            addr: s.to_string(),
            reason: e.to_string(),
        })?;
        let Some(Protocol::P2p(peer)) = addr.pop() else {
            return Err(bad("a multiaddr must end in /p2p/<peer id>; use dns:<name>[:port] for a name"));
        };
        let mut parts = addr.iter();
        let routable = matches!(parts.next(), Some(Protocol::Ip4(_) | Protocol::Ip6(_)))
            && match parts.next() {
                Some(Protocol::Tcp(_)) => true,
                Some(Protocol::Udp(_)) => matches!(parts.next(), Some(Protocol::QuicV1)),
                _ => false,
            }
            && parts.next().is_none();
        if !routable {
            return Err(bad("only /ip4|ip6/…/tcp/… and /ip4|ip6/…/udp/…/quic-v1 addresses are supported"));
        }
        Ok(Bootstrap::Peer { peer, addr })
    }
}

impl fmt::Display for Bootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bootstrap::Peer { peer, addr } => write!(f, "{addr}/p2p/{peer}"),
            Bootstrap::Dns { host, port } => write!(f, "dns:{host}:{port}"),
        }
    }
}

/// Why the swarm could not start (or a call could not be made).
#[derive(Debug, Clone, thiserror::Error)]
pub enum SwarmError {
    #[error("node key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("swarm key file {path}: {reason}")]
    SwarmKey { path: PathBuf, reason: String },
    #[error("invalid multiaddr {addr:?}: {reason}")]
    Multiaddr { addr: String, reason: String },
    #[error("invalid bootstrap {input:?}: {reason}")]
    Bootstrap { input: String, reason: String },
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("invalid swarm configuration: {0}")]
    Config(String),
    #[error("cannot provide {digest}: {reason}")]
    Provide { digest: shoal_protocol::types::Digest, reason: String },
    #[error("the swarm event loop has stopped")]
    Stopped,
}

/// Counters kept by the event loop, read through [`Client::stats`].
#[derive(Debug, Default)]
pub struct SwarmStats {
    /// Peers with at least one open connection (a gauge).
    pub connected_peers: AtomicU64,
    /// Provider lookups finished ([`Client::find_providers`]).
    pub dht_lookups: AtomicU64,
    /// Total wall time of those lookups, in milliseconds.
    pub dht_lookup_ms_total: AtomicU64,
    /// Provider record publications finished (first ones and re-publications).
    pub dht_publications: AtomicU64,
    /// Kademlia requests this node received (find node, get/add providers, ...), and those
    /// its own queries sent (counted when each query ends): what the DHT costs this node.
    pub dht_requests_received: AtomicU64,
    pub dht_requests_sent: AtomicU64,
    /// Piece requests received from peers.
    pub inbound_requests: AtomicU64,
    /// Tracker requests received (trackers only), and those refused as malformed or too many.
    pub tracker_requests: AtomicU64,
    pub tracker_requests_failed: AtomicU64,
    /// Of those, answered `Busy` by the loop because the serving queue was full.
    pub inbound_busy: AtomicU64,
    /// Connections refused (inbound) or not dialed (outbound) because of `max_peers`.
    pub connections_refused: AtomicU64,
}

/// What [`new`] returns.
pub struct Parts {
    /// The handle to the swarm.
    pub client: Client,
    /// Piece requests from peers (agents), to answer through [`Client::respond`].
    pub inbound: mpsc::Receiver<InboundRequest>,
    /// Tracker requests from agents (trackers), to answer through [`Client::respond_tracker`].
    pub tracker_inbound: mpsc::Receiver<InboundTrackerRequest>,
    /// The task to spawn.
    pub event_loop: EventLoop,
}

/// Builds the swarm and starts listening. Call inside a tokio runtime, then spawn
/// [`EventLoop::run`]; the [`Client`] works once the loop runs.
pub fn new(config: SwarmConfig) -> Result<Parts, SwarmError> {
    config.validate()?;
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(SwarmError::Config("swarm::new must be called inside a tokio runtime".to_string()));
    }
    let keypair = identity::load_or_create_keypair(&config.key_path)?;
    let psk = config.swarm_key.as_deref().map(identity::load_swarm_key).transpose()?;
    let local_peer_id = keypair.public().to_peer_id();

    let transport = build_transport(&keypair, psk, &config.security, config.dial_timeout)?;
    let stats = Arc::new(SwarmStats::default());
    let behaviour = behaviour::Behaviour::new(&keypair, &config, stats.clone());
    let swarm_config =
        libp2p::swarm::Config::with_tokio_executor().with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT);
    let mut swarm = Swarm::new(transport, behaviour, local_peer_id, swarm_config);
    for addr in &config.listen {
        check_port_free(addr)?;
    }
    for addr in &config.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| SwarmError::Listen { addr: addr.clone(), reason: transport_error(e) })?;
    }

    let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE);
    let (inbound_tx, inbound) = mpsc::channel(config.inbound_queue);
    let (tracker_tx, tracker_inbound) = mpsc::channel(config.inbound_queue);
    tracing::info!(peer_id = %local_peer_id, listen = ?config.listen, private = config.swarm_key.is_some(), role = ?config.role, "swarm ready");
    let client = Client::new(command_tx, local_peer_id, stats.clone());
    let event_loop = EventLoop::new(swarm, command_rx, inbound_tx, tracker_tx, stats, &config);
    Ok(Parts { client, inbound, tracker_inbound, event_loop })
}

/// Fails if a fixed TCP port of `addr` is taken. libp2p binds with `SO_REUSEPORT`, so a second
/// process on the same port would start "fine" and share the first one's connections; a
/// plain bind without that option tells the truth (and is closed at once).
fn check_port_free(addr: &Multiaddr) -> Result<(), SwarmError> {
    let mut parts = addr.iter();
    let ip: std::net::IpAddr = match parts.next() {
        Some(Protocol::Ip4(ip)) => ip.into(),
        Some(Protocol::Ip6(ip)) => ip.into(),
        _ => return Ok(()),
    };
    match parts.next() {
        Some(Protocol::Tcp(port)) if port != 0 => std::net::TcpListener::bind((ip, port))
            .map(drop)
            .map_err(|e| SwarmError::Listen { addr: addr.clone(), reason: e.to_string() }),
        _ => Ok(()),
    }
}

fn transport_error(e: libp2p::TransportError<std::io::Error>) -> String {
    match e {
        libp2p::TransportError::MultiaddrNotSupported(addr) => format!("unsupported address {addr}"),
        libp2p::TransportError::Other(e) => e.to_string(),
    }
}

/// TCP, then (in a private swarm) pnet, then the security protocols of `security` and yamux,
/// all within `dial_timeout`; outside a private swarm also QUIC (TLS 1.3 and streams built
/// in), used for `/udp/…/quic-v1` addresses.
fn build_transport(
    keypair: &Keypair,
    psk: Option<PreSharedKey>,
    security: &[Security],
    dial_timeout: Duration,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, SwarmError> {
    let upgrade = security::Upgrade::new(keypair, security)?;
    let tcp = tcp::tokio::Transport::new(tcp::Config::new().nodelay(true));
    Ok(match psk {
        None => {
            let tcp = tcp
                .upgrade(Version::V1Lazy)
                .authenticate(upgrade)
                .multiplex(yamux::Config::default())
                .timeout(dial_timeout)
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
            let mut quic_config = quic::Config::new(keypair);
            quic_config.handshake_timeout = dial_timeout;
            let quic = quic::tokio::Transport::new(quic_config)
                .map(|(peer, connection), _| (peer, StreamMuxerBox::new(connection)));
            quic.or_transport(tcp)
                .map(|either, _| match either {
                    libp2p::futures::future::Either::Left(out)
                    | libp2p::futures::future::Either::Right(out) => out,
                })
                .boxed()
        }
        Some(psk) => tcp
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(upgrade)
            .multiplex(yamux::Config::default())
            .timeout(dial_timeout)
            .boxed(),
    })
}

/// Whether `addr` is a QUIC address (`…/udp/…/quic-v1`).
fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::QuicV1))
}

/// Whether `addr` is on a loopback interface.
fn is_loopback(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => ip.is_loopback(),
        Some(Protocol::Ip6(ip)) => ip.is_loopback(),
        _ => false,
    }
}

/// A [`SwarmConfig`] from the agent's flags (strings, so `config` stays free of libp2p).
pub fn config_from_flags(
    listen: &[String],
    bootstrap: &[String],
    trackers: &[String],
    key_path: std::path::PathBuf,
    swarm_key: Option<std::path::PathBuf>,
) -> Result<SwarmConfig, SwarmError> {
    let mut config = SwarmConfig::new(key_path);
    config.listen = listen
        .iter()
        .map(|a| {
            Multiaddr::from_str(a)
                .map_err(|e| SwarmError::Multiaddr { addr: a.clone(), reason: e.to_string() })
        })
        .collect::<Result<_, _>>()?;
    config.bootstrap = bootstrap.iter().map(|b| b.parse::<Bootstrap>()).collect::<Result<_, _>>()?;
    // A tracker is a bootstrap peer too; agents recognise it through identify.
    for tracker in trackers {
        config.bootstrap.push(Bootstrap::parse(tracker, TRACKER_PORT)?);
    }
    config.swarm_key = swarm_key;
    Ok(config)
}
