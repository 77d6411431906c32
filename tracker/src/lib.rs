//! # shoal-tracker
//!
//! The optional coordinator of a Shoal cluster. Agents work without it (DHT only); with it,
//! each piece leaves the origin exactly once, nodes ask the best peers first, operators can
//! preheat images, and the cluster's state is visible on one page.
//!
//! It is never a single point of failure: it holds soft state only, rebuilt from what agents
//! announce, and agents keep pulling in DHT-only mode while no tracker answers. Several
//! replicas can run side by side; agents split digests between them by rendezvous hashing,
//! so each replica sees every request about the digests it owns.
//!
//! ## Layout
//!
//! - [`config`]: the flags (each also `SHOAL_<FLAG>`), defaults, validation.
//! - [`state`]: everything the tracker knows and every decision it makes (assignments,
//!   peer ranking, reassignment, preheat bookkeeping), pure and driven by `now`: the
//!   `shoal-plan` crate, which agents also run as the coordinators of digests.
//! - [`server`]: wiring: swarm, request task, housekeeping tick, HTTP server, shutdown.
//! - [`http`]: the dashboard, the JSON API, preheat, `/metrics`, `/healthz`, `/status`.
//! - [`preheat`]: image references and their resolution at the origin.
//! - [`metrics`]: Prometheus metrics (`shoal_tracker_`).
//!
//! The tracker protocol and the timing contract are `shoal_protocol`'s, the swarm is
//! `shoal_swarm`'s and the origin client `shoal_origin`'s (the same crates the agent builds on;
//! the tracker does not link the agent). One implementation of each side of the wire.

pub mod config;
pub mod http;
pub mod metrics;
pub mod preheat;
pub mod server;
/// The planner's state: `shoal_plan`'s, the same code an agent runs for the digests it
/// coordinates.
pub use shoal_plan::state;

pub use config::{Config, TrackerArgs};
pub use server::{Tracker, TrackerError};
