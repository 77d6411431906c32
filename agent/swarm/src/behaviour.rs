//! The composed libp2p behaviour: Kademlia for provider records, identify for addresses, and
//! the piece protocol.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::{connection_limits, identify, kad, StreamProtocol};

use super::{Role, SwarmConfig, SwarmStats};
use crate::codec::{PieceCodec, PIECE_PROTOCOL as PROTOCOL};
use crate::codec::{TrackerCodec, COORDINATOR_PROTOCOL, TRACKER_PROTOCOL};

/// Kademlia under a private name, so a Shoal node never answers or joins a public DHT.
pub(crate) const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/kad/1.0.0");
pub(crate) const IDENTIFY_PROTOCOL: &str = "/shoal/id/1.0.0";

/// Digests one node may provide at once: one provider record per blob (not per piece), so
/// this is the number of blobs in a large cache. kad's default of 1024 is too low.
pub(crate) const MAX_PROVIDED_KEYS: usize = 100_000;
/// Shoal stores no value records; a few are allowed so a stray `PUT_VALUE` costs little.
const MAX_RECORDS: usize = 256;
const MAX_RECORD_VALUE_BYTES: usize = 1024;
/// Provider records of others expire after this long unless re-published. We re-publish
/// our own every [`super::event_loop::REPUBLISH_INTERVAL`]; a record of a node that left or
/// evicted the blob disappears within the TTL.
pub(crate) const PROVIDER_RECORD_TTL: Duration = Duration::from_secs(60 * 60);
/// One DHT query (lookup or publication) gives up after this long.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection limits of a node with at most `max_peers` connections: a quarter of them
/// is kept for its own dials (providers, the tracker, pieces it wants), so a flood of inbound
/// peers cannot stop it from fetching. One peer may hold two connections (both sides dialed
/// at once), never more.
pub(crate) fn connection_limits(max_peers: Option<usize>) -> connection_limits::ConnectionLimits {
    let limits = connection_limits::ConnectionLimits::default().with_max_established_per_peer(Some(2));
    match max_peers {
        None => limits,
        Some(max) => {
            let max = max as u32;
            limits
                .with_max_established(Some(max))
                .with_max_established_incoming(Some(max - max / 4))
                .with_max_pending_incoming(Some(max / 4))
                .with_max_pending_outgoing(Some(max / 4))
        }
    }
}

/// `limits` comes first: it refuses a connection before the other behaviours hear of it.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) kad: kad::Behaviour<MemoryStore>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) pieces: request_response::Behaviour<PieceCodec>,
    pub(crate) tracker: request_response::Behaviour<TrackerCodec>,
}

impl Behaviour {
    pub(crate) fn new(keypair: &Keypair, config: &SwarmConfig, stats: std::sync::Arc<SwarmStats>) -> Self {
        let local_peer_id = keypair.public().to_peer_id();

        let store_config = MemoryStoreConfig {
            max_records: MAX_RECORDS,
            max_value_bytes: MAX_RECORD_VALUE_BYTES,
            max_provided_keys: MAX_PROVIDED_KEYS,
            ..MemoryStoreConfig::default()
        };
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            .set_query_timeout(QUERY_TIMEOUT)
            .set_provider_record_ttl(Some(PROVIDER_RECORD_TTL))
            // The event loop re-publishes at its own pace (bounded concurrency, and right after
            // connecting to a bootstrap peer), so kad's all-at-once job is off.
            .set_provider_publication_interval(None);
        let mut kad = kad::Behaviour::with_config(
            local_peer_id,
            MemoryStore::with_config(local_peer_id, store_config),
            kad_config,
        );
        // Every agent is reachable by its peers (a cluster network, not the internet), so all
        // serve the DHT from the start instead of waiting for a confirmed external address.
        kad.set_mode(Some(kad::Mode::Server));

        let name = match config.role {
            Role::Agent => "shoal-agent",
            Role::Tracker => "shoal-tracker",
        };
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_string(), keypair.public())
                .with_agent_version(format!("{name}/{}", env!("CARGO_PKG_VERSION"))),
        );

        // Agents serve and fetch pieces, ask trackers, and ask and answer plan requests as
        // coordinators; a tracker answers plan requests under both names (the messages are
        // the same). identify lists the inbound protocols, and the tracker protocol's name
        // among them is how agents recognise a tracker among their peers. A request offers the
        // coordinator's name first, which agents and trackers both take at once; a tracker
        // older than that refuses it and takes the second (one more negotiation round trip).
        let (piece_support, planning) = match config.role {
            Role::Agent => (
                ProtocolSupport::Full,
                vec![
                    (COORDINATOR_PROTOCOL, ProtocolSupport::Full),
                    (TRACKER_PROTOCOL, ProtocolSupport::Outbound),
                ],
            ),
            Role::Tracker => (
                ProtocolSupport::Outbound,
                vec![
                    (TRACKER_PROTOCOL, ProtocolSupport::Inbound),
                    (COORDINATOR_PROTOCOL, ProtocolSupport::Inbound),
                ],
            ),
        };
        let pieces = request_response::Behaviour::with_codec(
            PieceCodec { max_response_bytes: config.max_message_bytes },
            [(PROTOCOL, piece_support)],
            request_response::Config::default().with_request_timeout(config.request_timeout),
        );
        let tracker = request_response::Behaviour::with_codec(
            TrackerCodec { stats },
            planning,
            request_response::Config::default().with_request_timeout(config.request_timeout),
        );

        let limits = connection_limits::Behaviour::new(connection_limits(config.max_peers));
        Behaviour { limits, kad, identify, pieces, tracker }
    }
}
