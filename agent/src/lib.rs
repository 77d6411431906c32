//! # shoal-agent
//!
//! The node agent of Shoal: an OCI registry mirror (pull side) that containerd on the same
//! node uses through `hosts.toml`, a pull-through cache in front of any origin registry.
//! Peer-to-peer piece sharing between agents builds on the download tasks in [`fetch`].
//!
//! ## Layout
//!
//! - [`config`]: the `run` flags (each also `SHOAL_<FLAG>`), defaults, validation.
//! - [`registry`]: the `/v2/` HTTP API: routing, registry selection, tags, `Range`, OCI errors.
//! - [`access`]: the registry list, and the origin-backed check of each client's right to read
//!   private content, with its short-lived decision cache, `--public` (repositories public
//!   by configuration, served during an origin outage), and `attest`: what this node and its
//!   swarm peers saw public at the origin, which serves public objects and tags during an
//!   outage to nodes that never saw them.
//! - [`origin`]: the upstream registry client: tag HEADs, content GETs, token and Basic auth.
//! - [`fetch`]: one download per digest, shared by every request, streamed as it arrives,
//!   committed after the sha256 matched.
//! - [`preheat`]: fetching an image a tracker asked for, before anyone pulls it.
//! - [`ratelimit`]: the token bucket behind the upload and download rate limits.
//! - [`store`]: content-addressed files, atomic commits, the LRU byte quota. The only module
//!   that touches `std::fs` for content.
//! - [`containerd`]: containerd's content store as a source: which blobs containerd holds and
//!   keeps (its gRPC API and events), served from its content directory, one copy per node.
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` server.
//! - [`containerd_config`]: the `containerd-config` subcommand writing `hosts.toml` files.
//! - [`p2p`]: the P2P adapter, the one module that knows both the swarm and the downloads:
//!   the download's `Network` over the swarm client, serving peers (pieces, and what this
//!   node saw public), asking peers for attestations during an outage, heartbeats to trackers,
//!   and the coordinator: the planner of the digests this node is XOR-closest to when there
//!   is no tracker (`shoal-plan`, the tracker's own planner).
//! - [`supervise`]: the supervisor every long-running task is spawned through, so SIGTERM
//!   waits for all of them within a grace period.
//! - [`agent`]: wiring: open the store, bind the listeners, run until shutdown.
//!
//! From the crates beside it (re-exported under the same paths):
//!
//! - [`types`], [`pieces`], [`sync`]: `shoal-protocol`, the wire contract shared with the
//!   tracker (with both wire protocols and the timing contract).
//! - [`swarm`]: `shoal-swarm`, every libp2p type: the DHT, the two protocols on libp2p
//!   streams.

pub mod access;
pub mod agent;
pub mod config;
pub mod containerd;
pub mod containerd_config;
pub mod fetch;
pub mod metrics;
pub mod p2p;
pub mod preheat;
pub mod ratelimit;
pub mod registry;
pub mod store;
pub mod supervise;

// The wire contract and the network, shared with the tracker, under the paths the agent's
// modules use.
/// The origin registry client, a crate of its own (the tracker uses it too).
pub use shoal_origin as origin;
pub use shoal_protocol::{pieces, sync, types};
pub use shoal_swarm as swarm;
