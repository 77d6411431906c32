//! The origin client's counters. They live here, with the code that counts, and whoever
//! serves metrics registers them (the agent does, as `shoal_origin_requests_total` and
//! `shoal_origin_bytes_total`).

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OriginLabels {
    /// `manifest_head`, `manifest`, `blob` or `token`.
    pub kind: &'static str,
    /// HTTP status, or 0 when no response arrived (connection refused, timeout).
    pub status: u16,
}

/// Requests and content bytes, as counted by [`crate::Origin`] and its callers.
#[derive(Clone, Debug, Default)]
pub struct OriginMetrics {
    pub requests: Family<OriginLabels, Counter>,
    /// Content bytes received from origins: manifests counted here, blob bytes by the
    /// caller that reads the body.
    pub bytes: Counter,
}

impl OriginMetrics {
    pub fn request(&self, kind: &'static str, status: u16) {
        self.requests.get_or_create(&OriginLabels { kind, status }).inc();
    }

    /// Adds the counters to `registry` (names without the registry's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "origin_requests",
            "Requests made to origin registries, by kind and status (0: no response)",
            self.requests.clone(),
        );
        registry.register(
            "origin_bytes",
            "Content bytes received from origin registries",
            self.bytes.clone(),
        );
    }
}

/// The process's origin counters.
pub static METRICS: LazyLock<OriginMetrics> = LazyLock::new(OriginMetrics::default);
