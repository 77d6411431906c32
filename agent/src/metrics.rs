//! Prometheus metrics of the agent, and the `/metrics`, `/healthz`, `/readyz` server.
//!
//! Every metric is a field of [`Metrics`], registered in [`Metrics::new`] right where it is
//! defined, so nothing can be defined and forgotten. Names carry the `shoal_` prefix; counters
//! get `_total` from the encoder.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `base`, `manifest`, `blob` or `other`.
    pub route: &'static str,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Served: `cache` (complete in the local store) or `origin` (streamed from a download in
    /// flight). Received: `origin` or `peer`.
    pub source: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub registry_requests: Family<RequestLabels, Counter>,
    pub served_bytes: Family<SourceLabels, Counter>,
    /// The origin client's counters (`shoal_origin`'s, registered here).
    pub origin_bytes: Counter,
    pub origin_digest_mismatches: Counter,
    pub stale_tags_served: Counter,
    pub downloads_in_flight: Gauge,
    pub cache_bytes: Gauge,
    pub cache_blobs: Gauge,
    pub containerd_blobs: Gauge,
    pub containerd_bytes: Gauge,
    pub cache_evictions: Counter,
    pub corrupt_blobs: Counter,
    pub received_bytes: Family<SourceLabels, Counter>,
    pub origin_pieces: Counter,
    pub pieces_verified: Counter,
    pub pieces_rejected: Counter,
    pub pieces_resumed: Counter,
    pub peer_bans: Counter,
    pub peer_sent_bytes: Counter,
    pub connected_peers: Gauge,
    pub dht_lookups: Counter,
    pub dht_lookup_seconds: Counter<f64, AtomicU64>,
    pub dht_requests_received: Counter,
    pub dht_requests_sent: Counter,
    pub coordinator_plans: Family<OutcomeLabels, Counter>,
    pub tracker_plans: Family<OutcomeLabels, Counter>,
    pub origin_pieces_unplanned: Counter,
    pub origin_pieces_taken_over: Counter,
    pub auth_checks: Family<OutcomeLabels, Counter>,
    pub outage_served: Family<BasisLabels, Counter>,
    pub max_peers: Gauge,
    pub peer_connections_refused: Counter,
    pub tasks: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `answered` or `unanswered`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BasisLabels {
    /// `seen_public`, `offline_grace`, `configured` or `attested` (see [`Metrics::outage_served`]).
    pub basis: &'static str,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("shoal");
        let registry_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "registry_requests",
            "Registry API requests by route, method and status",
            registry_requests.clone(),
        );
        let served_bytes = Family::<SourceLabels, Counter>::default();
        registry.register(
            "served_bytes",
            "Content bytes sent to registry clients, by where they came from",
            served_bytes.clone(),
        );
        shoal_origin::metrics::METRICS.register(&mut registry);
        let origin_bytes = shoal_origin::metrics::METRICS.bytes.clone();
        let origin_digest_mismatches = Counter::default();
        registry.register(
            "origin_digest_mismatches",
            "Downloads discarded because the origin's bytes did not match the digest",
            origin_digest_mismatches.clone(),
        );
        let stale_tags_served = Counter::default();
        registry.register(
            "stale_tags_served",
            "Tag requests answered from the last known digest while the origin was unreachable",
            stale_tags_served.clone(),
        );
        let downloads_in_flight = Gauge::default();
        registry.register("downloads_in_flight", "Digests being downloaded now", downloads_in_flight.clone());
        let cache_bytes = Gauge::default();
        registry.register("cache_bytes", "Bytes of complete blobs in the cache", cache_bytes.clone());
        let cache_blobs = Gauge::default();
        registry.register("cache_blobs", "Complete blobs in the cache", cache_blobs.clone());
        let containerd_blobs = Gauge::default();
        registry.register(
            "containerd_blobs",
            "Blobs served from containerd's content store (not in the cache, not counted in cache_bytes)",
            containerd_blobs.clone(),
        );
        let containerd_bytes = Gauge::default();
        registry.register(
            "containerd_bytes",
            "Bytes of the blobs served from containerd's content store",
            containerd_bytes.clone(),
        );
        let cache_evictions = Counter::default();
        registry.register(
            "cache_evictions",
            "Blobs evicted to keep the cache under its byte quota",
            cache_evictions.clone(),
        );
        let corrupt_blobs = Counter::default();
        registry.register(
            "corrupt_blobs",
            "Complete blobs found changed on disk when read (a piece or the whole did not match \
             its sha256) and quarantined: removed, withdrawn, downloaded again on the next request",
            corrupt_blobs.clone(),
        );
        let received_bytes = Family::<SourceLabels, Counter>::default();
        registry.register(
            "received_bytes",
            "Verified content bytes received by downloads, by source (origin, peer)",
            received_bytes.clone(),
        );
        let origin_pieces = Counter::default();
        registry.register("origin_pieces", "Pieces this node fetched from the origin", origin_pieces.clone());
        let pieces_verified = Counter::default();
        registry.register(
            "pieces_verified",
            "Pieces verified against their digest and stored",
            pieces_verified.clone(),
        );
        let pieces_rejected = Counter::default();
        registry.register(
            "pieces_rejected",
            "Pieces from peers that did not match their attested digest",
            pieces_rejected.clone(),
        );
        let pieces_resumed = Counter::default();
        registry.register(
            "pieces_resumed",
            "Verified pieces of partial downloads taken over from an earlier run",
            pieces_resumed.clone(),
        );
        let peer_bans = Counter::default();
        registry.register("peer_bans", "Peers banned for sending bad data", peer_bans.clone());
        let peer_sent_bytes = Counter::default();
        registry.register("peer_sent_bytes", "Piece bytes sent to peers", peer_sent_bytes.clone());
        let connected_peers = Gauge::default();
        registry.register("connected_peers", "Peers with an open swarm connection", connected_peers.clone());
        let dht_lookups = Counter::default();
        registry.register("dht_lookups", "DHT provider lookups finished", dht_lookups.clone());
        let dht_lookup_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "dht_lookup_seconds",
            "Total time of DHT provider lookups (divide by shoal_dht_lookups_total for the mean)",
            dht_lookup_seconds.clone(),
        );
        let dht_requests_received = Counter::default();
        registry.register(
            "dht_requests_received",
            "Kademlia requests received from peers (find node, get and add providers, ...)",
            dht_requests_received.clone(),
        );
        let dht_requests_sent = Counter::default();
        registry.register(
            "dht_requests_sent",
            "Kademlia requests this node's own queries sent (counted when each query ends)",
            dht_requests_sent.clone(),
        );
        let coordinator_plans = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "coordinator_plans",
            "Plan requests this agent answered as the coordinator of a digest (no tracker), by \
             outcome: remote (a peer's download), local (its own), refused",
            coordinator_plans.clone(),
        );
        let auth_checks = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "auth_checks",
            "Access checks of registry requests, by outcome: allowed or denied by the origin, \
             cached (a recent decision), origin_unreachable",
            auth_checks.clone(),
        );
        let outage_served = Family::<BasisLabels, Counter>::default();
        registry.register(
            "outage_served",
            "Requests allowed while the origin was unreachable, by basis: seen_public (this \
             agent saw the object public), offline_grace (the credential was accepted within \
             --auth-offline-grace), configured (the repository is named by --public), attested \
             (a peer of the swarm saw it public at the origin within --public-attestation-window)",
            outage_served.clone(),
        );
        let tracker_plans = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "plan_requests",
            "Plan requests of downloads to their planner (the tracker, or the digest's coordinator), by \
             outcome (answered, unanswered)",
            tracker_plans.clone(),
        );
        let origin_pieces_unplanned = Counter::default();
        registry.register(
            "origin_pieces_unplanned",
            "Origin pieces fetched while a tracker was online but no fresh plan assigned them \
             (its answers were late, or a piece blocked the stream too long)",
            origin_pieces_unplanned.clone(),
        );
        let origin_pieces_taken_over = Counter::default();
        registry.register(
            "origin_pieces_taken_over",
            "Origin pieces fetched although another node owned them (it stalled, or it blocked \
             the stream too long), without a tracker",
            origin_pieces_taken_over.clone(),
        );
        let max_peers = Gauge::default();
        registry.register(
            "max_peers",
            "Peers this agent keeps swarm connections to at most (--max-peers)",
            max_peers.clone(),
        );
        let peer_connections_refused = Counter::default();
        registry.register(
            "peer_connections_refused",
            "Swarm connections refused or not dialed because --max-peers were connected",
            peer_connections_refused.clone(),
        );
        let tasks = Gauge::default();
        registry.register("tasks", "Tokio tasks alive in the agent process", tasks.clone());
        Metrics {
            outage_served,
            max_peers,
            peer_connections_refused,
            tasks,
            origin_pieces_taken_over,
            tracker_plans,
            auth_checks,
            origin_pieces_unplanned,
            registry,
            peer_sent_bytes,
            connected_peers,
            dht_lookups,
            dht_lookup_seconds,
            dht_requests_received,
            dht_requests_sent,
            coordinator_plans,
            received_bytes,
            origin_pieces,
            pieces_verified,
            pieces_rejected,
            pieces_resumed,
            peer_bans,
            registry_requests,
            served_bytes,
            origin_bytes,
            origin_digest_mismatches,
            stale_tags_served,
            downloads_in_flight,
            cache_bytes,
            cache_blobs,
            containerd_blobs,
            containerd_bytes,
            cache_evictions,
            corrupt_blobs,
        }
    }

    pub fn received(&self, bytes: u64, source: &'static str) {
        self.received_bytes.get_or_create(&SourceLabels { source }).inc_by(bytes);
        if source == "origin" {
            self.origin_bytes.inc_by(bytes);
        }
    }

    /// Content bytes received from `source` (`origin` or `peer`) since start.
    pub fn received_from(&self, source: &'static str) -> u64 {
        self.received_bytes.get_or_create(&SourceLabels { source }).get()
    }

    /// One access check (see `access`): `allowed`, `denied`, `cached`, `origin_unreachable`.
    pub fn auth_check(&self, outcome: &'static str) {
        self.auth_checks.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// A request allowed while the origin was unreachable, on `basis`.
    pub fn outage_served(&self, basis: &'static str) {
        self.outage_served.get_or_create(&BasisLabels { basis }).inc();
    }

    pub fn served(&self, source: &'static str, bytes: u64) {
        self.served_bytes.get_or_create(&SourceLabels { source }).inc_by(bytes);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tasks.set(runtime.metrics().num_alive_tasks() as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// What `/readyz` and `/status` report: ready once the registry API listens and, when the
/// node was told to join a swarm, it has at least one peer.
#[derive(Clone, Default)]
pub struct Readiness {
    registry_serving: Arc<AtomicBool>,
    peer: Arc<std::sync::OnceLock<(String, bool)>>,
    /// Why the cache directory cannot be written now, if it cannot (see `store::Store::check`).
    cache_problem: Arc<std::sync::Mutex<Option<String>>>,
}

impl Readiness {
    pub fn set_registry_serving(&self, serving: bool) {
        self.registry_serving.store(serving, Ordering::SeqCst);
    }

    /// This node's peer id, and whether readiness waits for a first peer (bootstrap given).
    pub fn set_peer_id(&self, peer_id: String, needs_peer: bool) {
        let _ = self.peer.set((peer_id, needs_peer));
    }

    /// Records whether the cache directory can be written (`None`: it can).
    pub fn set_cache_problem(&self, problem: Option<String>) {
        *crate::sync::lock(&self.cache_problem) = problem;
    }

    /// `None` when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
        if !self.registry_serving.load(Ordering::SeqCst) {
            return Some("registry API not serving yet".into());
        }
        if self.peer.get().is_some_and(|(_, needs)| *needs) && METRICS.connected_peers.get() < 1 {
            return Some("no swarm peer connected yet".into());
        }
        if let Some(problem) = crate::sync::lock(&self.cache_problem).as_ref() {
            return Some(format!("cache directory unusable: {problem}"));
        }
        None
    }

    fn status(&self) -> String {
        serde_json::json!({
            "ready": self.not_ready().is_none(),
            "peer_id": self.peer.get().map(|(id, _)| id.clone()),
            "connected_peers": METRICS.connected_peers.get(),
        })
        .to_string()
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(|| async {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], METRICS.encode())
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get({
                let readiness = readiness.clone();
                move || {
                    let not_ready = readiness.not_ready();
                    async move {
                        match not_ready {
                            None => (StatusCode::OK, "ready\n").into_response(),
                            Some(why) => {
                                (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response()
                            }
                        }
                    }
                }
            }),
        )
        .route(
            "/status",
            get(move || {
                let body = readiness.status();
                async move { ([(header::CONTENT_TYPE, "application/json")], body) }
            }),
        );
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
