//! Wiring of `shoal-agent run`: bind both listeners (so a port in use is an error before
//! anything else starts), open the store, start the swarm (unless `--no-p2p`), and serve
//! until the shutdown future completes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::Config;
use crate::fetch::net::{Network, Solo};
use crate::fetch::{FetchConfig, Fetcher};
use crate::metrics::{self, Readiness};
use crate::origin::auth::{AuthFileError, CredentialStore};
use crate::origin::{Origin, OriginError};
use crate::ratelimit::RateLimiter;
use crate::registry::{self, Api};
use crate::store::{Store, StoreError};
use crate::swarm::network::{self as p2p, ServeOptions, SwarmNetwork};
use crate::swarm::SwarmError;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    AuthFile(#[from] AuthFileError),
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error(transparent)]
    Swarm(#[from] SwarmError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { addr: SocketAddr, what: &'static str, source: std::io::Error },
    #[error("{what} server failed: {source}")]
    Serve { what: &'static str, source: std::io::Error },
}

/// A started agent: bound listeners and ready state, not yet serving.
pub struct Agent {
    api: Arc<Api>,
    registry_listener: TcpListener,
    metrics_listener: TcpListener,
    readiness: Readiness,
    /// The swarm's event loop, to run beside the servers.
    swarm_loop: Option<crate::swarm::EventLoop>,
}

impl Agent {
    pub async fn start(config: Config) -> Result<Agent, StartError> {
        // Bind first: a port in use is reported before anything touches the disk.
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, what, source })
        };
        let registry_listener = bind(config.listen, "registry API").await?;
        let metrics_listener = bind(config.metrics_listen, "metrics").await?;
        let credentials = match &config.registry_auth_file {
            Some(path) => CredentialStore::load(path)?,
            None => CredentialStore::default(),
        };
        let store = Store::open(&config.cache_dir, config.cache_max_bytes)?;
        let origin = Arc::new(Origin::new(config.upstreams.clone(), credentials)?);
        let fetch_config = FetchConfig {
            peer_concurrency: config.p2p.as_ref().map_or(16, |p| p.peer_concurrency),
            max_download_rate: config.max_download_rate,
            ..FetchConfig::default()
        };
        let access =
            Arc::new(crate::access::Access::new(config.registries.clone(), config.auth_offline_grace));
        let readiness = Readiness::default();
        let Some(p2p_config) = &config.p2p else {
            let fetcher = Fetcher::new(store, origin.clone(), Arc::new(Solo::default()), fetch_config);
            let api = Api::new(fetcher, origin, config.default_registry.clone(), access);
            return Ok(Agent { api, registry_listener, metrics_listener, readiness, swarm_loop: None });
        };
        let swarm_config = p2p::config_from_flags(
            &p2p_config.listen,
            &p2p_config.bootstrap,
            &p2p_config.trackers,
            config.cache_dir.join("node.key"),
            p2p_config.swarm_key.clone(),
        )?;
        let crate::swarm::Parts { client, inbound, event_loop: swarm_loop, .. } =
            crate::swarm::new(swarm_config)?;
        let network = Arc::new(SwarmNetwork::new(client.clone()));
        // Provide what the cache already holds; withdraw what it evicts.
        for digest in store.digests() {
            network.announce(digest);
        }
        let withdraw = network.clone();
        store.set_evict_hook(Box::new(move |digest| withdraw.withdraw(*digest)));
        let needs_peer = !p2p_config.bootstrap.is_empty() || !p2p_config.trackers.is_empty();
        readiness.set_peer_id(client.local_peer_id().to_string(), needs_peer);
        let fetcher = Fetcher::new(store, origin.clone(), network.clone() as Arc<dyn Network>, fetch_config);
        let serve = ServeOptions {
            // Few enough that a queue of whole pieces drains well within the request timeout
            // on a slow link (8 MiB at 20 mbit is 3.4 s); more requests are answered `Busy`
            // and go to another holder. With 32, nodes on 20 mbit links timed out requests
            // mid-transfer and none finished a 128 MiB rollout in 400 s.
            max_uploads: 8,
            upload_limit: Arc::new(RateLimiter::new(p2p_config.max_upload_rate)),
            corrupt_uploads: p2p_config.corrupt_uploads,
            lie_about_size: p2p_config.lie_about_size,
        };
        if p2p_config.corrupt_uploads {
            tracing::warn!("fault injection: every piece sent to peers is corrupted");
        }
        if p2p_config.lie_about_size {
            tracing::warn!("fault injection: every size told to peers is 1 MiB too long");
        }
        tokio::spawn(p2p::serve_peers(fetcher.clone(), client.clone(), inbound, serve));
        if !p2p_config.trackers.is_empty() {
            let preheater = Arc::new(crate::preheat::Preheater::new(fetcher.clone()));
            tokio::spawn(crate::swarm::heartbeat::run(
                client.clone(),
                fetcher.clone(),
                preheater,
                p2p_config.zone.clone(),
                network.tracker_online(),
            ));
        }
        p2p::export_stats(client.stats(), std::time::Duration::from_millis(500));
        let api = Api::new(fetcher, origin, config.default_registry.clone(), access);
        Ok(Agent { api, registry_listener, metrics_listener, readiness, swarm_loop: Some(swarm_loop) })
    }

    pub fn registry_addr(&self) -> Option<SocketAddr> {
        self.registry_listener.local_addr().ok()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.local_addr().ok()
    }

    /// Serves until `shutdown` completes, then drains open requests.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), StartError> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        };
        tracing::info!(
            registry = ?self.registry_addr(),
            metrics = ?self.metrics_addr(),
            "shoal-agent serving"
        );
        self.readiness.set_registry_serving(true);
        let registry = registry::serve(self.registry_listener, self.api, stopped());
        let metrics = metrics::serve(self.metrics_listener, self.readiness.clone(), stopped());
        if let Some(swarm_loop) = self.swarm_loop {
            tokio::spawn(swarm_loop.run(stopped()));
        }
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down");
            let _ = tx.send(true);
        };
        let (registry, metrics, ()) = tokio::join!(registry, metrics, signal);
        registry.map_err(|source| StartError::Serve { what: "registry API", source })?;
        metrics.map_err(|source| StartError::Serve { what: "metrics", source })?;
        Ok(())
    }
}
