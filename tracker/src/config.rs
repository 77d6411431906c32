//! Flags of `shoal-tracker` (each also a `SHOAL_<FLAG>` environment variable), their
//! defaults, and their validation into a [`Config`].
//!
//! Every default is written once, in the `#[arg(default_value ...)]` of [`TrackerArgs`]. The
//! origin flags (`--upstream`, `--default-registry`, `--registry-auth-file`) mean exactly what
//! they mean for the agent, and are parsed by the same code (`shoal_origin`), so a preheat
//! resolves an image at the same origin the agents will fetch it from.

use std::net::SocketAddr;
use std::path::PathBuf;

use shoal_origin::{UpstreamError, Upstreams};
use shoal_protocol::types::{ParseError, Registry};
use shoal_swarm::SwarmConfig;

/// Why the configuration was refused. Each message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--p2p-listen needs at least one address")]
    NoListen,
    #[error("{0}")]
    Swarm(#[from] shoal_swarm::SwarmError),
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("--default-registry: {0}")]
    DefaultRegistry(ParseError),
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of `shoal-tracker`.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "shoal-tracker",
    version,
    about = "Shoal tracker: bootstrap peer, origin-fetch coordination, preheat and a live dashboard"
)]
pub struct TrackerArgs {
    /// libp2p listen multiaddrs (repeatable; comma-separated in the environment variable).
    #[arg(long, env = "SHOAL_P2P_LISTEN", value_delimiter = ',', default_value = "/ip4/0.0.0.0/tcp/5101")]
    pub p2p_listen: Vec<String>,

    /// Address of the dashboard, the JSON API, /metrics and /healthz.
    #[arg(long, env = "SHOAL_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    pub http_listen: SocketAddr,

    /// Directory of the persistent node key (`node.key`), created if missing.
    #[arg(long, env = "SHOAL_CACHE_DIR", default_value = "/var/lib/shoal-tracker")]
    pub cache_dir: PathBuf,

    /// libp2p pre-shared key file: only agents with the same key can connect.
    #[arg(long, env = "SHOAL_SWARM_KEY")]
    pub swarm_key: Option<PathBuf>,

    /// Peers to join the swarm through (other trackers or agents): a multiaddr ending in
    /// /p2p/<peer id>, or dns:<name>[:port]. Repeatable.
    #[arg(long, env = "SHOAL_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,

    /// Origin URL of a registry, REGISTRY=URL, for resolving preheat images (repeatable;
    /// comma-separated in the environment variable). Give the agents the same mapping.
    #[arg(long = "upstream", env = "SHOAL_UPSTREAM", value_delimiter = ',')]
    pub upstreams: Vec<String>,

    /// Registry of preheat images that name none.
    #[arg(long, env = "SHOAL_DEFAULT_REGISTRY", default_value = "docker.io")]
    pub default_registry: String,

    /// Docker config.json with credentials for origin registries.
    #[arg(long, env = "SHOAL_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,

    /// Log format; the level comes from `SHOAL_LOG` (e.g. `debug`).
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The validated configuration the tracker runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub http_listen: SocketAddr,
    pub cache_dir: PathBuf,
    /// The swarm, with `role` already [`shoal_swarm::Role::Tracker`].
    pub swarm: SwarmConfig,
    pub upstreams: Upstreams,
    pub default_registry: Registry,
    pub registry_auth_file: Option<PathBuf>,
}

impl TrackerArgs {
    pub fn into_config(self) -> Result<Config, ConfigError> {
        if self.p2p_listen.is_empty() {
            return Err(ConfigError::NoListen);
        }
        let mut swarm = shoal_swarm::config_from_flags(
            &self.p2p_listen,
            &self.bootstrap,
            &[],
            self.cache_dir.join("node.key"),
            self.swarm_key.clone(),
        )?;
        swarm.role = shoal_swarm::Role::Tracker;
        swarm.validate()?;
        let (upstreams, default_registry) = origin_settings(&self.upstreams, &self.default_registry)?;
        Ok(Config {
            http_listen: self.http_listen,
            cache_dir: self.cache_dir,
            swarm,
            upstreams,
            default_registry,
            registry_auth_file: self.registry_auth_file,
        })
    }
}

/// `--upstream` and `--default-registry`, parsed as the agent parses them.
fn origin_settings(
    upstreams: &[String],
    default_registry: &str,
) -> Result<(Upstreams, Registry), ConfigError> {
    let mut parsed = Upstreams::default();
    for spec in upstreams {
        parsed.insert_spec(spec)?;
    }
    let registry = default_registry.parse().map_err(ConfigError::DefaultRegistry)?;
    Ok((parsed, registry))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["shoal-tracker"];
        argv.extend_from_slice(args);
        TrackerArgs::try_parse_from(argv).map_err(|e| e.to_string())?.into_config().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.http_listen.to_string(), "0.0.0.0:8080");
        assert_eq!(config.swarm.listen[0].to_string(), "/ip4/0.0.0.0/tcp/5101");
        assert_eq!(config.swarm.key_path, PathBuf::from("/var/lib/shoal-tracker/node.key"));
        assert_eq!(config.swarm.role, shoal_swarm::Role::Tracker);
        assert_eq!(config.default_registry.as_str(), "docker.io");
        assert_eq!(config.upstreams.url(&"docker.io".parse().unwrap()), "https://registry-1.docker.io");
    }

    #[test]
    fn overrides() {
        let config = parse(&[
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/1",
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/2",
            "--upstream",
            "127.0.0.1:5555=http://127.0.0.1:5555",
            "--default-registry",
            "127.0.0.1:5555",
            "--http-listen",
            "127.0.0.1:9",
        ])
        .unwrap();
        assert_eq!(config.swarm.listen.len(), 2);
        let local: Registry = "127.0.0.1:5555".parse().unwrap();
        assert_eq!(config.upstreams.url(&local), "http://127.0.0.1:5555");
        assert_eq!(config.default_registry, local);
        assert_eq!(config.upstreams.url(&"docker.io".parse().unwrap()), "https://registry-1.docker.io");
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        assert!(parse(&["--http-listen", "nowhere"]).unwrap_err().contains("--http-listen"));
        assert!(parse(&["--p2p-listen", "not-a-multiaddr"]).unwrap_err().contains("not-a-multiaddr"));
        assert!(parse(&["--bootstrap", "/ip4/1.2.3.4/tcp/1"]).unwrap_err().contains("bootstrap"));
        assert!(parse(&["--upstream", "docker.io"]).unwrap_err().contains("--upstream"));
        assert!(parse(&["--upstream", "x=ftp://y"]).unwrap_err().contains("--upstream"));
        assert!(parse(&["--default-registry", "bad/registry"]).unwrap_err().contains("default-registry"));
        assert!(parse(&["--log-format", "xml"]).is_err());
    }
}
