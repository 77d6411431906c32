//! Prometheus metrics of the tracker (`shoal_tracker_` prefix).
//!
//! The numbers live where the decisions are made: [`crate::state::Totals`] counts decisions,
//! the swarm's [`SwarmStats`] counts requests at the protocol level (including malformed ones
//! that never reach the state). [`Metrics::sync`] copies both into the registry right before
//! each scrape, so no code path has to remember to bump a metric. Every metric is registered
//! in [`Metrics::new`] next to its definition, and a test scrapes every name.

use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shoal_swarm::SwarmStats;

use crate::state::State;

pub struct Metrics {
    registry: Registry,
    /// Serialises [`Metrics::sync`]: counters advance by the difference to their source.
    sync_lock: Mutex<()>,
    pub nodes: Gauge,
    pub alive_nodes: Gauge,
    pub digests: Gauge,
    pub connected_peers: Gauge,
    pub tracker_requests: Counter,
    pub malformed_requests: Counter,
    pub heartbeats: Counter,
    pub plans: Counter,
    pub requests_refused: Counter,
    pub assignments: Counter,
    pub reassignments: Counter,
    pub attestation_conflicts: Counter,
    pub preheat_jobs: Counter,
    pub origin_bytes: Counter,
    pub peer_bytes: Counter,
}

/// Every metric name as scraped, for tests and dashboards.
pub const METRIC_NAMES: [&str; 15] = [
    "shoal_tracker_nodes",
    "shoal_tracker_alive_nodes",
    "shoal_tracker_digests",
    "shoal_tracker_connected_peers",
    "shoal_tracker_requests_total",
    "shoal_tracker_malformed_requests_total",
    "shoal_tracker_heartbeats_total",
    "shoal_tracker_plans_total",
    "shoal_tracker_requests_refused_total",
    "shoal_tracker_assignments_total",
    "shoal_tracker_reassignments_total",
    "shoal_tracker_attestation_conflicts_total",
    "shoal_tracker_preheat_jobs_total",
    "shoal_tracker_origin_bytes_total",
    "shoal_tracker_peer_bytes_total",
];

fn advance(counter: &Counter, to: u64) {
    let now = counter.get();
    if to > now {
        counter.inc_by(to - now);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("shoal_tracker");
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        Metrics {
            nodes: gauge(&mut registry, "nodes", "Nodes the tracker lists (alive or recently dead)"),
            alive_nodes: gauge(&mut registry, "alive_nodes", "Nodes seen within the last 10 s"),
            digests: gauge(&mut registry, "digests", "Digests with download state on the tracker"),
            connected_peers: gauge(&mut registry, "connected_peers", "Peers with an open swarm connection"),
            tracker_requests: counter(&mut registry, "requests", "Tracker-protocol requests received"),
            malformed_requests: counter(
                &mut registry,
                "malformed_requests",
                "Tracker-protocol requests dropped as malformed or oversized (or while overloaded)",
            ),
            heartbeats: counter(&mut registry, "heartbeats", "Heartbeats answered"),
            plans: counter(&mut registry, "plans", "Plan requests answered"),
            requests_refused: counter(
                &mut registry,
                "requests_refused",
                "Requests answered Refused (layout disagreement, limits)",
            ),
            assignments: counter(&mut registry, "assignments", "Origin pieces assigned"),
            reassignments: counter(
                &mut registry,
                "reassignments",
                "Origin piece assignments released because the assignee died or stalled",
            ),
            attestation_conflicts: counter(
                &mut registry,
                "attestation_conflicts",
                "Piece digests attested differently from the first attestation (ignored)",
            ),
            preheat_jobs: counter(&mut registry, "preheat_jobs", "Preheat jobs started"),
            origin_bytes: counter(
                &mut registry,
                "origin_bytes",
                "Content bytes the nodes received from origins, as reported in heartbeats",
            ),
            peer_bytes: counter(
                &mut registry,
                "peer_bytes",
                "Content bytes the nodes received from peers, as reported in heartbeats",
            ),
            registry,
            sync_lock: Mutex::new(()),
        }
    }

    /// Copies the state's and the swarm's numbers into the metrics.
    pub fn sync(&self, state: &State, stats: &SwarmStats, now: Instant) {
        let _serial = shoal_protocol::sync::lock(&self.sync_lock);
        let (nodes, alive, digests) = state.gauges(now);
        self.nodes.set(nodes as i64);
        self.alive_nodes.set(alive as i64);
        self.digests.set(digests as i64);
        self.connected_peers.set(stats.connected_peers.load(Ordering::Relaxed) as i64);
        advance(&self.tracker_requests, stats.tracker_requests.load(Ordering::Relaxed));
        advance(&self.malformed_requests, stats.tracker_requests_failed.load(Ordering::Relaxed));
        let totals = &state.totals;
        advance(&self.heartbeats, totals.heartbeats);
        advance(&self.plans, totals.plans);
        advance(&self.requests_refused, totals.refused);
        advance(&self.assignments, totals.assignments);
        advance(&self.reassignments, totals.reassignments);
        advance(&self.attestation_conflicts, totals.attestation_conflicts);
        advance(&self.preheat_jobs, totals.preheat_jobs);
        let (origin, peer) = state.bytes();
        advance(&self.origin_bytes, origin);
        advance(&self.peer_bytes, peer);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exported() {
        let metrics = Metrics::new();
        let mut state = State::new();
        state.totals.assignments = 3;
        metrics.sync(&state, &SwarmStats::default(), Instant::now());
        let text = metrics.encode();
        for name in METRIC_NAMES {
            assert!(text.lines().any(|l| l.starts_with(&format!("{name} "))), "{name} missing:\n{text}");
        }
        assert!(text.contains("shoal_tracker_assignments_total 3"), "{text}");
        // A second sync with the same numbers does not double count.
        metrics.sync(&state, &SwarmStats::default(), Instant::now());
        assert!(metrics.encode().contains("shoal_tracker_assignments_total 3"));
    }
}
