//! # shoal-agent
//!
//! The node agent of Shoal: an OCI registry mirror (pull side) that containerd on the same
//! node uses through `hosts.toml`, a pull-through cache in front of any origin registry.
//! Peer-to-peer piece sharing between agents builds on the download tasks in [`fetch`].
//!
//! ## Layout
//!
//! - [`config`]: the `run` flags (each also `SHOAL_<FLAG>`), defaults, validation.
//! - [`types`]: validated digests, repository names, tags and registry hosts.
//! - [`registry`]: the `/v2/` HTTP API: routing, registry selection, tags, `Range`, OCI errors.
//! - [`access`]: the registry list, and the origin-backed check of each client's right to read
//!   private content, with its short-lived decision cache.
//! - [`origin`]: the upstream registry client: tag HEADs, content GETs, token and Basic auth.
//! - [`fetch`]: one download per digest, shared by every request, streamed as it arrives,
//!   committed after the sha256 matched.
//! - [`pieces`]: piece size policy, bitfields, rendezvous origin owners.
//! - [`preheat`]: fetching an image a tracker asked for, before anyone pulls it.
//! - [`ratelimit`]: the token bucket behind the upload and download rate limits.
//! - [`store`]: content-addressed files, atomic commits, the LRU byte quota. The only module
//!   that touches `std::fs` for content.
//! - [`metrics`]: Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` server.
//! - [`containerd_config`]: the `containerd-config` subcommand writing `hosts.toml` files.
//! - [`swarm`]: every libp2p type: the DHT, the piece and tracker protocols, serving peers,
//!   heartbeats to trackers.
//! - [`supervise`]: the supervisor every long-running task is spawned through, so SIGTERM
//!   waits for all of them within a grace period.
//! - [`sync`]: the one policy for a poisoned mutex (recover the guard), and UTF-8-safe
//!   clipping of texts.
//! - [`agent`]: wiring: open the store, bind the listeners, run until shutdown.

pub mod access;
pub mod agent;
pub mod config;
pub mod containerd_config;
pub mod fetch;
pub mod metrics;
pub mod origin;
pub mod pieces;
pub mod preheat;
pub mod ratelimit;
pub mod registry;
pub mod store;
pub mod supervise;
pub mod swarm;
pub mod sync;
pub mod types;
