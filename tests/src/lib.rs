//! Integration-test harness for Shoal: real origin registry, real pull clients, the real
//! agent binary, all on 127.0.0.1.
//!
//! Every process a test starts is owned by a value that kills it (by pid) and removes its
//! temp dir on drop, also when the test panics. Every wait is bounded in time and rounds.
//! Nothing is shared between tests: each builds its own origin, agent, containerd.
//!
//! # Layout
//!
//! - [`origin`]: `docker-registry` (distribution 2.8) on a free port; access-log parsing,
//!   stop/restart on the same port and storage.
//! - [`image`]: builds OCI / Docker, single / multi-platform images with random layers and
//!   exact manifest bytes, pushes them with skopeo keeping digests.
//! - [`containerd`]: a private containerd, `ctr content fetch --hosts-dir`, `hosts.toml`,
//!   byte comparison of fetched content.
//! - [`agent`]: the `shoal-agent` binary as a process; readiness, metrics, restart.
//! - [`metrics`]: Prometheus text parsing.
//! - [`pull`]: a client's pull over HTTP (every blob at once, digests checked), origin content GETs.
//! - [`proxy`]: throttling / corrupting TCP proxy for slow and lying origins.
//! - [`skopeo`]: skopeo as a pull client through a `registries.conf` mirror.
//! - [`tracker`]: the `shoal-tracker` binary as a process (API, metrics, restart with the same
//!   peer id), and a raw tracker-protocol client with its own libp2p identity.
//! - [`token`]: a Docker token service (ES256 JWTs distribution's `auth: token` accepts) for
//!   token-auth origins with public and private repositories.
//! - [`process`]: kill-on-drop daemons and bounded one-shot commands.
//! - [`util`]: ports, binaries, hashing, bounded polling, the HTTP client.

pub mod agent;
pub mod containerd;
pub mod image;
pub mod metrics;
pub mod origin;
pub mod process;
pub mod proxy;
pub mod pull;
pub mod skopeo;
pub mod token;
pub mod tracker;
pub mod util;

pub use agent::{agent_binary, run_agent_expecting_exit, start_swarm, wait_for_peers, Agent, AgentOptions};
pub use containerd::{write_hosts_toml, Containerd};
pub use image::{Blob, Image, ImageKind, ImageSpec, ManifestInfo};
pub use origin::{AccessEntry, AccessLogExt, Origin};
pub use process::{CmdOutput, Daemon};
pub use proxy::{FaultyProxy, ProxyConfig};
pub use tracker::{run_tracker_expecting_exit, tracker_binary, Tracker, TrackerClient, TrackerOptions};
pub use util::{dead_url, digest_of, free_port, http_client, poll_until, MANIFEST_ACCEPT};
