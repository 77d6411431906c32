//! Configuration of `shoal-agent run`: command-line flags (each also read from a
//! `SHOAL_<FLAG>` environment variable), their defaults, and validation.
//!
//! Every default is written once, in the `#[arg(default_value ...)]` of [`RunArgs`] or in
//! [`default_upstreams`]. [`RunArgs::into_config`] turns the flags into a validated [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::types::Registry;
pub use shoal_origin::{default_upstreams, UpstreamError, Upstreams};

/// Why the configuration was refused. Each message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("--{flag}: {source}")]
    Registry { flag: &'static str, source: crate::types::ParseError },
    #[error("--cache-max-bytes must be at least 1 MiB, got {0} bytes")]
    CacheTooSmall(u64),
    #[error("--{flag} must be at least {min}")]
    Bound { flag: &'static str, min: usize },
    #[error("--peer-concurrency must be at least 1")]
    PeerConcurrency,
    #[error("--zone {0:?}: use 1 to 63 letters, digits, '-', '_' or '.'")]
    Zone(String),
    #[error("--auth-decision-ttl must be between 1s and 60s, got {0:?}")]
    DecisionTtl(std::time::Duration),
    #[error("--public {spec:?}: expected REGISTRY or REGISTRY/REPO-PREFIX, e.g. docker.io/library: {why}")]
    Public { spec: String, why: String },
}

/// `--public-attestations`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Attestations {
    /// On with `--swarm-key`, off without.
    Auto,
    On,
    Off,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `shoal-agent run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Address of the OCI registry API (the mirror containerd talks to).
    #[arg(long, env = "SHOAL_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,

    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "SHOAL_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: SocketAddr,

    /// Directory of the content cache (created if missing).
    #[arg(long, env = "SHOAL_CACHE_DIR", default_value = "/var/lib/shoal")]
    pub cache_dir: PathBuf,

    /// Byte quota of the cache, e.g. 20GiB, 500MB, 1073741824.
    #[arg(long, env = "SHOAL_CACHE_MAX_BYTES", default_value = "20GiB", value_parser = parse_bytes)]
    pub cache_max_bytes: u64,

    /// Origin URL of a registry: REGISTRY=URL (repeatable; comma-separated in the
    /// environment variable). Overrides the built-in defaults; registries with no mapping
    /// use https://REGISTRY.
    #[arg(long = "upstream", env = "SHOAL_UPSTREAM", value_delimiter = ',')]
    pub upstreams: Vec<String>,

    /// Registry for requests that name none (no ?ns= and no host path prefix).
    #[arg(long, env = "SHOAL_DEFAULT_REGISTRY", default_value = "docker.io")]
    pub default_registry: String,

    /// Docker config.json with credentials for origin registries (the format of a
    /// Kubernetes dockerconfigjson Secret).
    #[arg(long, env = "SHOAL_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,

    /// Do not mirror the built-in registries (docker.io, ghcr.io, quay.io, registry.k8s.io)
    /// unless `--upstream` names them.
    #[arg(long, env = "SHOAL_NO_DEFAULT_REGISTRIES")]
    pub no_default_registries: bool,

    /// Mirror any registry a client names (`?ns=` or a host path prefix), not only the
    /// configured ones. The agent then connects to hosts clients choose.
    #[arg(long, env = "SHOAL_MIRROR_ANY_REGISTRY")]
    pub mirror_any_registry: bool,

    /// While the origin is unreachable, serve cached private content to a client whose
    /// credentials the origin accepted for it within this window, e.g. 10m (0: refuse).
    #[arg(long, env = "SHOAL_AUTH_OFFLINE_GRACE", default_value = "0", value_parser = parse_duration)]
    pub auth_offline_grace: std::time::Duration,

    /// Registries or repositories that are public by configuration: REGISTRY or
    /// REGISTRY/REPO-PREFIX (whole path components), repeatable (comma-separated in the
    /// environment variable). While the origin is unreachable, content of these is served to
    /// any client without a check (header `X-Shoal-Public: configured`); while it answers,
    /// nothing changes.
    #[arg(long = "public", env = "SHOAL_PUBLIC", value_delimiter = ',')]
    pub public: Vec<String>,

    /// Whether, while the origin is unreachable, content and tags a swarm peer attests it saw
    /// public at the origin are served (header `X-Shoal-Public: attested`): `auto` (on with
    /// `--swarm-key`, whose peers are members; off without), `on`, `off`. See the README on
    /// what a peer could lie about.
    #[arg(long, env = "SHOAL_PUBLIC_ATTESTATIONS", value_enum, default_value = "auto")]
    pub public_attestations: Attestations,

    /// How recently a peer's own anonymous check must have found an object or tag public for
    /// its attestation to count, e.g. 1h. `unlimited`: any age, as for this agent's own memory
    /// of public objects and last known tags, which keeps them while it runs.
    #[arg(long, env = "SHOAL_PUBLIC_ATTESTATION_WINDOW", default_value = "unlimited", value_parser = parse_window)]
    pub public_attestation_window: std::time::Duration,

    /// How long an access decision (allowed, or "this repository needs credentials") is
    /// reused before the origin is asked again, 1s to 60s. Shorter: a revoked credential
    /// stops working sooner, at one more origin `HEAD` per tag and client per period.
    #[arg(long, env = "SHOAL_AUTH_DECISION_TTL", default_value = "60s", value_parser = parse_duration)]
    pub auth_decision_ttl: std::time::Duration,

    /// Log format.
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// libp2p listen multiaddrs for the swarm (comma-separated in the environment variable).
    #[arg(long, env = "SHOAL_P2P_LISTEN", value_delimiter = ',', default_value = "/ip4/0.0.0.0/tcp/5001")]
    pub p2p_listen: Vec<String>,

    /// Peers to join the swarm through: a multiaddr ending in /p2p/<peer id>, or
    /// dns:<name>[:port] resolving to agents (e.g. a headless Service). Repeatable.
    #[arg(long, env = "SHOAL_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,

    /// Trackers to join and report to: a multiaddr ending in /p2p/<peer id>, or
    /// dns:<name>[:port] (port 5101 by default). Repeatable; several trackers split digests
    /// by rendezvous hashing. Pulls go on peer to peer while no tracker answers.
    #[arg(long = "tracker", env = "SHOAL_TRACKER", value_delimiter = ',')]
    pub trackers: Vec<String>,

    /// Topology zone of this node (e.g. its Kubernetes zone label): trackers prefer peers
    /// in the same zone.
    #[arg(long, env = "SHOAL_ZONE")]
    pub zone: Option<String>,

    /// libp2p pre-shared key file (private network): only processes with the same key can
    /// connect. Format: `/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex characters.
    #[arg(long, env = "SHOAL_SWARM_KEY")]
    pub swarm_key: Option<PathBuf>,

    /// Security protocols of TCP peer connections, preferred first: `tls` (TLS 1.3), `noise`.
    /// A node accepts any protocol of its list and dials with the first the other side
    /// accepts, so nodes with different lists interoperate while they share one.
    #[arg(long, env = "SHOAL_P2P_SECURITY", default_value = "noise,tls")]
    pub p2p_security: String,

    /// Piece requests to peers in flight at once, per download.
    #[arg(long, env = "SHOAL_PEER_CONCURRENCY", default_value = "16")]
    pub peer_concurrency: usize,

    /// Limit on bytes sent to peers, e.g. 100MiB/s (default: none).
    #[arg(long, env = "SHOAL_MAX_UPLOAD_RATE", value_parser = crate::ratelimit::parse_rate)]
    pub max_upload_rate: Option<u64>,

    /// Limit on bytes received from peers and the origin, e.g. 100MiB/s (default: none).
    #[arg(long, env = "SHOAL_MAX_DOWNLOAD_RATE", value_parser = crate::ratelimit::parse_rate)]
    pub max_download_rate: Option<u64>,

    /// containerd's gRPC socket. The agent serves (and seeds) the blobs containerd holds in
    /// `--containerd-namespace` from containerd's own content store, and drops its own copy
    /// of a blob once containerd keeps it. Socket missing or refused: a warning, and the
    /// agent runs without it (retrying in the background). `off` (or empty): not used.
    #[arg(long, env = "SHOAL_CONTAINERD_ADDRESS", default_value = "/run/containerd/containerd.sock")]
    pub containerd_address: String,

    /// containerd namespace whose content is served (Kubernetes' CRI plugin uses k8s.io).
    #[arg(long, env = "SHOAL_CONTAINERD_NAMESPACE", default_value = "k8s.io")]
    pub containerd_namespace: String,

    /// containerd's root directory (`root` in its config.toml): blob bytes are read from
    /// `<root>/io.containerd.content.v1.content/blobs/sha256/`, read-only.
    #[arg(long, env = "SHOAL_CONTAINERD_ROOT", default_value = "/var/lib/containerd")]
    pub containerd_root: PathBuf,

    /// Run as a plain pull-through cache, without the swarm.
    #[arg(long, env = "SHOAL_NO_P2P")]
    pub no_p2p: bool,

    /// Peers this agent keeps connections to at once (a quarter is kept for its own dials);
    /// more are refused. Bounds sockets and the neighbour (ARP) entries a node needs.
    #[arg(long, env = "SHOAL_MAX_PEERS", default_value = "256")]
    pub max_peers: usize,

    /// Registry API requests served at once; more are answered 429 `TOOMANYREQUESTS`
    /// (containerd then tries its next host).
    #[arg(long, env = "SHOAL_MAX_REQUESTS", default_value = "512")]
    pub max_requests: usize,

    /// On SIGTERM, how long open requests and downloads may take to finish before they are
    /// cut, e.g. 20s, 500ms.
    #[arg(long, env = "SHOAL_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: std::time::Duration,

    /// While the origin fails (errors, timeouts), a download retries with back-off and gives
    /// up only after this long without a verified piece from anywhere, e.g. 5m. "Not found"
    /// and "access refused" fail at once.
    #[arg(long, env = "SHOAL_DOWNLOAD_GIVE_UP", default_value = "5m", value_parser = parse_duration)]
    pub download_give_up: std::time::Duration,

    /// Test-only fault injection: corrupt every piece sent to peers (the attested digests
    /// stay right, so receivers must catch it).
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_corrupt_uploads: bool,

    /// Test-only fault injection: `Have` answers claim every blob is 1 MiB longer than it is
    /// (a consistent answer, complete, with honest digests for the real pieces).
    #[cfg(feature = "fault-injection")]
    #[arg(long, hide = true)]
    pub fault_lie_about_size: bool,
}

/// Settings of the swarm and the piece exchange.
#[derive(Debug, Clone)]
pub struct P2pConfig {
    pub listen: Vec<String>,
    pub bootstrap: Vec<String>,
    /// `--tracker` entries (also dialed as bootstrap peers).
    pub trackers: Vec<String>,
    pub zone: Option<String>,
    pub swarm_key: Option<PathBuf>,
    /// `--p2p-security`, parsed by the swarm.
    pub security: String,
    pub peer_concurrency: usize,
    pub max_upload_rate: Option<u64>,
    pub corrupt_uploads: bool,
    pub lie_about_size: bool,
    /// Peers with open connections at most (`--max-peers`).
    pub max_peers: usize,
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    pub cache_dir: PathBuf,
    pub cache_max_bytes: u64,
    pub upstreams: Upstreams,
    pub default_registry: Registry,
    pub registry_auth_file: Option<PathBuf>,
    /// The registries mirrored (`--upstream`, the built-in defaults, `--mirror-any-registry`).
    pub registries: crate::access::RegistryList,
    pub auth_offline_grace: std::time::Duration,
    pub auth_decision_ttl: std::time::Duration,
    /// `--public`.
    pub public: crate::access::PublicList,
    /// Peers' attestations of public objects and tags are honoured during an outage
    /// (`--public-attestations`, resolved against `--swarm-key`; false with `--no-p2p`).
    pub trust_attestations: bool,
    /// `--public-attestation-window` (`Duration::MAX`: unlimited).
    pub public_attestation_window: std::time::Duration,
    /// `None` with `--no-p2p`.
    pub p2p: Option<P2pConfig>,
    pub max_download_rate: Option<u64>,
    /// Registry API requests served at once.
    pub max_requests: usize,
    /// How long shutdown waits for requests and downloads.
    pub shutdown_grace: std::time::Duration,
    /// `--download-give-up`.
    pub download_give_up: std::time::Duration,
    /// containerd's content store as a source; `None` when `--containerd-address` is empty.
    pub containerd: Option<ContainerdConfig>,
}

/// Where containerd's content is (`--containerd-*`).
#[derive(Debug, Clone)]
pub struct ContainerdConfig {
    pub address: PathBuf,
    pub namespace: String,
    /// `<root>/io.containerd.content.v1.content`.
    pub content_dir: PathBuf,
}

impl RunArgs {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        if self.cache_max_bytes < 1 << 20 {
            return Err(ConfigError::CacheTooSmall(self.cache_max_bytes));
        }
        let mut upstreams = Upstreams::default();
        let mut listed: std::collections::BTreeSet<Registry> = if self.no_default_registries {
            Default::default()
        } else {
            upstreams.registries().cloned().collect()
        };
        for spec in &self.upstreams {
            listed.insert(upstreams.insert_spec(spec)?);
        }
        let registries = if self.mirror_any_registry {
            crate::access::RegistryList::Any
        } else {
            crate::access::RegistryList::Only(listed)
        };
        let default_registry = self
            .default_registry
            .parse()
            .map_err(|source| ConfigError::Registry { flag: "default-registry", source })?;
        if self.peer_concurrency == 0 {
            return Err(ConfigError::PeerConcurrency);
        }
        if self.max_peers < 4 {
            return Err(ConfigError::Bound { flag: "max-peers", min: 4 });
        }
        if self.max_requests == 0 {
            return Err(ConfigError::Bound { flag: "max-requests", min: 1 });
        }
        let ttl = self.auth_decision_ttl;
        if ttl < std::time::Duration::from_secs(1) || ttl > crate::access::DECISION_TTL {
            return Err(ConfigError::DecisionTtl(ttl));
        }
        let public = self
            .public
            .iter()
            .filter(|spec| !spec.trim().is_empty())
            .map(|spec| spec.parse().map_err(|why| ConfigError::Public { spec: spec.clone(), why }))
            .collect::<Result<Vec<_>, _>>()?;
        let public = crate::access::PublicList::new(public);
        if let Some(zone) = &self.zone {
            let ok = !zone.is_empty()
                && zone.len() <= 63
                && zone.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !ok {
                return Err(ConfigError::Zone(zone.clone()));
            }
        }
        #[cfg(feature = "fault-injection")]
        let (corrupt_uploads, lie_about_size) = (self.fault_corrupt_uploads, self.fault_lie_about_size);
        #[cfg(not(feature = "fault-injection"))]
        let (corrupt_uploads, lie_about_size) = (false, false);
        let p2p = (!self.no_p2p).then(|| P2pConfig {
            listen: self.p2p_listen.clone(),
            bootstrap: self.bootstrap.clone(),
            trackers: self.trackers.clone(),
            zone: self.zone.clone(),
            swarm_key: self.swarm_key.clone(),
            security: self.p2p_security.clone(),
            peer_concurrency: self.peer_concurrency,
            max_upload_rate: self.max_upload_rate,
            corrupt_uploads,
            lie_about_size,
            max_peers: self.max_peers,
        });
        let trust_attestations = !self.no_p2p
            && match self.public_attestations {
                Attestations::Auto => self.swarm_key.is_some(),
                Attestations::On => true,
                Attestations::Off => false,
            };
        let address = self.containerd_address.trim();
        let containerd = (!address.is_empty() && address != "off").then(|| ContainerdConfig {
            address: PathBuf::from(address),
            namespace: self.containerd_namespace.clone(),
            content_dir: self.containerd_root.join("io.containerd.content.v1.content"),
        });
        if self.containerd_namespace.is_empty() {
            return Err(ConfigError::Bound { flag: "containerd-namespace", min: 1 });
        }
        Ok(Config {
            containerd,
            p2p,
            max_download_rate: self.max_download_rate,
            max_requests: self.max_requests,
            shutdown_grace: self.shutdown_grace,
            download_give_up: self.download_give_up,
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            cache_dir: self.cache_dir,
            cache_max_bytes: self.cache_max_bytes,
            upstreams,
            default_registry,
            registry_auth_file: self.registry_auth_file,
            registries,
            auth_offline_grace: self.auth_offline_grace,
            auth_decision_ttl: self.auth_decision_ttl,
            public,
            trust_attestations,
            public_attestation_window: self.public_attestation_window,
        })
    }
}

/// Parses `--public-attestation-window`: a duration, or `unlimited` (`Duration::MAX`).
pub fn parse_window(s: &str) -> Result<std::time::Duration, String> {
    match s.trim() {
        "unlimited" => Ok(std::time::Duration::MAX),
        other => parse_duration(other),
    }
}

/// Parses a duration: a number with `ms`, `s`, `m` or `h` (`500ms`, `20s`, `10m`, `1h`); a bare
/// number is seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{s:?} is not a duration like 500ms, 20s, 10m or 1h"))?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    Ok(std::time::Duration::from_millis(ms))
}

/// Parses a byte size: a number with an optional unit (B, KB, MB, GB, TB in powers of 1000;
/// KiB, MiB, GiB, TiB in powers of 1024; K, M, G, T as the binary ones). Fractions are
/// allowed (`1.5GiB`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1000,
        "mb" => 1000u64.pow(2),
        "gb" => 1000u64.pow(3),
        "tb" => 1000u64.pow(4),
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {s:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ))
        }
    };
    let value = f64::from_str(number).map_err(|_| format!("{s:?} is not a size like 20GiB"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("20GiB"), Ok(20 << 30));
        assert_eq!(parse_bytes("1.5KiB"), Ok(1536));
        assert_eq!(parse_bytes("500MB"), Ok(500_000_000));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
        assert!(parse_bytes("").is_err());
    }

    #[test]
    fn public_entries() {
        let cfg = Cli::try_parse_from(["x", "--public", "quay.io", "--public", "127.0.0.1:5000/d/app"])
            .unwrap()
            .run
            .into_config()
            .unwrap();
        let has = |r: &str, n: &str| cfg.public.contains(&r.parse().unwrap(), &n.parse().unwrap());
        assert!(has("quay.io", "any/thing"));
        assert!(has("127.0.0.1:5000", "d/app/x"));
        assert!(!has("127.0.0.1:5000", "d/other"));
        assert!(Cli::try_parse_from(["x"]).unwrap().run.into_config().unwrap().public.is_empty());
        let args = Cli::try_parse_from(["x", "--public", "quay.io/Upper"]).unwrap().run;
        assert!(matches!(args.into_config(), Err(ConfigError::Public { .. })));
    }

    /// Attestations are trusted by default only in a private swarm; the window is unlimited
    /// unless set.
    #[test]
    fn attestation_trust_and_window() {
        use std::time::Duration;
        let on = |args: &[&str]| {
            let mut all = vec!["x"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap().run.into_config().unwrap()
        };
        let open = on(&[]);
        assert!(!open.trust_attestations, "no swarm key: off by default");
        assert_eq!(open.public_attestation_window, Duration::MAX);
        assert!(on(&["--swarm-key", "/k"]).trust_attestations);
        assert!(!on(&["--swarm-key", "/k", "--public-attestations", "off"]).trust_attestations);
        assert!(on(&["--public-attestations", "on"]).trust_attestations);
        assert!(!on(&["--public-attestations", "on", "--no-p2p"]).trust_attestations);
        let w = on(&["--public-attestation-window", "90s"]).public_attestation_window;
        assert_eq!(w, Duration::from_secs(90));
        assert!(Cli::try_parse_from(["x", "--public-attestation-window", "soon"]).is_err());
        assert!(Cli::try_parse_from(["x", "--public-attestations", "maybe"]).is_err());
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "1d", "-1s", "1.5s", "ten"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        let cfg = Cli::try_parse_from(["x"]).unwrap().run.into_config().unwrap();
        assert_eq!(cfg.shutdown_grace, Duration::from_secs(20));
        assert_eq!(cfg.download_give_up, Duration::from_secs(300));
        let ctrd = cfg.containerd.as_ref().expect("containerd on by default");
        assert_eq!(ctrd.address, PathBuf::from("/run/containerd/containerd.sock"));
        assert_eq!(ctrd.namespace, "k8s.io");
        assert_eq!(ctrd.content_dir, PathBuf::from("/var/lib/containerd/io.containerd.content.v1.content"));
        let off =
            Cli::try_parse_from(["x", "--containerd-address", "off"]).unwrap().run.into_config().unwrap();
        assert!(off.containerd.is_none());
        assert_eq!(cfg.p2p.map(|p| p.max_peers), Some(256));
        let args = Cli::try_parse_from(["x", "--max-peers", "1"]).unwrap().run;
        assert!(matches!(args.into_config(), Err(ConfigError::Bound { flag: "max-peers", .. })));
        assert_eq!(cfg.auth_decision_ttl, Duration::from_secs(60));
        for bad in ["500ms", "61s", "2m"] {
            let args = Cli::try_parse_from(["x", "--auth-decision-ttl", bad]).unwrap().run;
            assert!(matches!(args.into_config(), Err(ConfigError::DecisionTtl(_))), "{bad}");
        }
        let args = Cli::try_parse_from(["x", "--auth-decision-ttl", "1s"]).unwrap().run;
        assert_eq!(args.into_config().unwrap().auth_decision_ttl, Duration::from_secs(1));
    }

    #[test]
    fn defaults_and_overrides() {
        let cfg = Cli::try_parse_from(["x"]).unwrap().run.into_config().unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(cfg.metrics_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(cfg.cache_max_bytes, 20 << 30);
        assert_eq!(cfg.default_registry.as_str(), "docker.io");
        let docker: Registry = "docker.io".parse().unwrap();
        assert_eq!(cfg.upstreams.url(&docker), "https://registry-1.docker.io");
        let other: Registry = "example.com:5000".parse().unwrap();
        assert_eq!(cfg.upstreams.url(&other), "https://example.com:5000");

        let cfg = Cli::try_parse_from([
            "x",
            "--upstream",
            "docker.io=http://127.0.0.1:1/",
            "--upstream",
            "a.b=https://c.d",
        ])
        .unwrap()
        .run
        .into_config()
        .unwrap();
        assert_eq!(cfg.upstreams.url(&docker), "http://127.0.0.1:1");
        assert_eq!(cfg.upstreams.url(&"a.b".parse().unwrap()), "https://c.d");
    }

    #[test]
    fn registry_list() {
        let on = |args: &[&str]| {
            let mut all = vec!["x"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all).unwrap().run.into_config().unwrap().registries
        };
        let (docker, mine): (Registry, Registry) =
            ("docker.io".parse().unwrap(), "r.test:5000".parse().unwrap());
        let cfg = on(&["--upstream", "r.test:5000=http://127.0.0.1:1"]);
        assert!(cfg.allows(&docker) && cfg.allows(&mine));
        assert!(!cfg.allows(&"169.254.169.254".parse().unwrap()));
        let cfg = on(&["--upstream", "r.test:5000=http://127.0.0.1:1", "--no-default-registries"]);
        assert!(!cfg.allows(&docker) && cfg.allows(&mine));
        assert!(on(&["--mirror-any-registry"]).allows(&"evil.example".parse().unwrap()));
        assert_eq!(parse_duration("10m"), Ok(std::time::Duration::from_secs(600)));
        assert_eq!(parse_duration("0"), Ok(std::time::Duration::ZERO));
        assert!(parse_duration("soon").is_err() && parse_duration("5d").is_err());
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(Cli::try_parse_from(["x", "--cache-max-bytes", "lots"]).is_err());
        assert!(Cli::try_parse_from(["x", "--listen", "nowhere"]).is_err());
        for bad in ["docker.io", "docker.io=ftp://x", "docker.io=http://", "a/b=http://x"] {
            let args = Cli::try_parse_from(["x", "--upstream", bad]).unwrap().run;
            assert!(args.into_config().is_err(), "{bad}");
        }
        let args = Cli::try_parse_from(["x", "--cache-max-bytes", "10"]).unwrap().run;
        assert!(matches!(args.into_config(), Err(ConfigError::CacheTooSmall(10))));
    }
}
