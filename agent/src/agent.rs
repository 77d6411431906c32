//! Wiring of `shoal-agent run`: bind both listeners (so a port in use is an error before
//! anything else starts), open the store, start the swarm (unless `--no-p2p`), and serve
//! until the shutdown future completes.
//!
//! Every long-running task is spawned through one [`Supervisor`]. Shutdown (SIGTERM): the
//! registry API stops accepting and lets open requests finish, every task is cancelled, and
//! the agent waits for all of them (requests included) for at most `--shutdown-grace`, then
//! names whatever is still running and returns; `main` exits 0 either way.

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
use crate::p2p::{self, ServeOptions, SwarmNetwork};
use crate::ratelimit::RateLimiter;
use crate::registry::{self, Api};
use crate::store::{Store, StoreError};
use crate::supervise::Supervisor;
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
    supervisor: Supervisor,
    max_requests: usize,
    shutdown_grace: std::time::Duration,
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
            give_up_after: config.download_give_up,
            ..FetchConfig::default()
        };
        let access = crate::access::Access::new(
            config.registries.clone(),
            config.auth_decision_ttl,
            config.auth_offline_grace,
        )
        .with_public(config.public.clone());
        let readiness = Readiness::default();
        let supervisor = Supervisor::new();
        supervisor.spawn("cache check", check_cache(store.clone(), readiness.clone(), supervisor.token()));
        let agent = |api, swarm_loop| Agent {
            api,
            registry_listener,
            metrics_listener,
            readiness: readiness.clone(),
            swarm_loop,
            supervisor: supervisor.clone(),
            max_requests: config.max_requests,
            shutdown_grace: config.shutdown_grace,
        };
        let containerd = |announce: crate::containerd::Announce| {
            if let Some(cc) = &config.containerd {
                supervisor.spawn(
                    "containerd content",
                    crate::containerd::run(cc.clone(), store.clone(), announce, supervisor.token()),
                );
            }
        };
        let Some(p2p_config) = &config.p2p else {
            containerd(Arc::new(|_| {}));
            let fetcher = Fetcher::new(
                store,
                origin.clone(),
                Arc::new(Solo::default()),
                fetch_config,
                supervisor.clone(),
            );
            let api = Api::new(fetcher, origin, config.default_registry.clone(), Arc::new(access));
            return Ok(agent(api, None));
        };
        let swarm_config = p2p::agent_config(p2p_config, config.cache_dir.join("node.key"))?;
        crate::metrics::METRICS.max_peers.set(p2p_config.max_peers as i64);
        let crate::swarm::Parts { client, inbound, tracker_inbound, event_loop: swarm_loop } =
            crate::swarm::new(swarm_config)?;
        let network = Arc::new(SwarmNetwork::new(client.clone()));
        let access = if config.trust_attestations {
            tracing::info!(
                window = ?config.public_attestation_window,
                "origin outages: serving what swarm peers attest they saw public"
            );
            let attestors = Arc::new(p2p::PeerAttestors::new(client.clone()));
            access.with_attestations(attestors, config.public_attestation_window)
        } else {
            access
        };
        // Plan requests of peers for the digests this node coordinates (no tracker).
        supervisor.spawn(
            "coordinator",
            network.coordinator().serve(client.clone(), tracker_inbound, supervisor.token()),
        );
        supervisor.spawn("provider records", network.run_provider_queue(supervisor.token()));
        // Provide what the cache already holds (one queue entry per digest, handed to the
        // swarm one at a time); withdraw what it evicts.
        for digest in store.digests() {
            network.announce(digest);
        }
        let withdraw = network.clone();
        store.set_evict_hook(Box::new(move |digest| withdraw.withdraw(*digest)));
        // Serve and seed what containerd holds; its blobs are announced as they are found.
        let announcer = network.clone();
        containerd(Arc::new(move |digest| announcer.announce(digest)));
        let needs_peer = !p2p_config.bootstrap.is_empty() || !p2p_config.trackers.is_empty();
        readiness.set_peer_id(client.local_peer_id().to_string(), needs_peer);
        let fetcher = Fetcher::new(
            store,
            origin.clone(),
            network.clone() as Arc<dyn Network>,
            fetch_config,
            supervisor.clone(),
        );
        let serve = ServeOptions {
            // Few enough that a queue of whole pieces drains well within the request timeout
            // on a slow link (8 MiB at 20 mbit is 3.4 s); more requests are answered `Busy`
            // and go to another holder. With 32, nodes on 20 mbit links timed out requests
            // mid-transfer and none finished a 128 MiB rollout in 400 s. Split fairly among
            // the peers asking (`p2p::shares`).
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
        let api = Api::new(fetcher.clone(), origin, config.default_registry.clone(), Arc::new(access));
        supervisor.spawn(
            "serve peers",
            p2p::serve_peers(
                fetcher.clone(),
                api.clone(),
                client.clone(),
                inbound,
                serve,
                supervisor.clone(),
            ),
        );
        if !p2p_config.trackers.is_empty() {
            let preheater = Arc::new(crate::preheat::Preheater::new(fetcher.clone(), supervisor.clone()));
            supervisor.spawn(
                "heartbeat",
                crate::p2p::heartbeat::run(
                    client.clone(),
                    fetcher.clone(),
                    preheater,
                    p2p_config.zone.clone(),
                    network.tracker_online(),
                    supervisor.token(),
                ),
            );
        }
        supervisor.spawn(
            "stats export",
            p2p::export_stats(client.stats(), std::time::Duration::from_millis(500), supervisor.token()),
        );
        Ok(agent(api, Some(swarm_loop)))
    }

    pub fn registry_addr(&self) -> Option<SocketAddr> {
        self.registry_listener.local_addr().ok()
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.local_addr().ok()
    }

    /// Serves until `shutdown` completes, then stops taking requests, cancels every task and
    /// waits for requests and tasks for at most the shutdown grace period.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), StartError> {
        let sup = self.supervisor.clone();
        tracing::info!(
            registry = ?self.registry_addr(),
            metrics = ?self.metrics_addr(),
            "shoal-agent serving"
        );
        self.readiness.set_registry_serving(true);
        let limit = registry::RequestLimit::new(self.max_requests);
        let registry =
            registry::serve_limited(self.registry_listener, self.api, limit.clone(), sup.cancelled());
        let metrics = metrics::serve(self.metrics_listener, self.readiness.clone(), sup.cancelled());
        if let Some(swarm_loop) = self.swarm_loop {
            sup.spawn("swarm", swarm_loop.run(sup.cancelled()));
        }
        // The servers run in their own tasks so a stuck connection cannot hold shutdown
        // past the grace period.
        let mut registry = tokio::spawn(registry);
        let metrics = tokio::spawn(metrics);
        let (grace, readiness) = (self.shutdown_grace, self.readiness.clone());
        // A registry server that fails (its listener broke) stops the agent too.
        let ended = tokio::select! {
            () = shutdown => None,
            ended = &mut registry => Some(ended),
        };
        let started = std::time::Instant::now();
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: no new requests, waiting for open ones and every task"
        );
        readiness.set_registry_serving(false);
        sup.cancel();
        let deadline = tokio::time::Instant::now() + grace;
        let registry = match ended {
            Some(ended) => Ok(ended),
            None => tokio::time::timeout_at(deadline, registry).await,
        };
        let stuck = sup.wait(deadline.saturating_duration_since(tokio::time::Instant::now())).await.err();
        let open = limit.in_flight();
        if stuck.is_some() || open > 0 || registry.is_err() {
            tracing::warn!(?stuck, open_requests = open, "shutdown grace period over: cutting what is left");
        } else {
            tracing::info!(ms = started.elapsed().as_millis() as u64, "every request and task finished");
        }
        metrics.abort();
        match registry {
            Ok(Ok(Err(source))) => Err(StartError::Serve { what: "registry API", source }),
            _ => Ok(()),
        }
    }

    /// The supervisor of this agent's tasks (for tests and embedding).
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }
}

/// How often the cache directory is checked for being writable.
const CACHE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Reports an unwritable or vanished cache directory on `/readyz` and in the log (once per
/// change), instead of failing every download with it unexplained; recovers when it is back.
async fn check_cache(store: Arc<Store>, readiness: Readiness, cancel: tokio_util::sync::CancellationToken) {
    let mut last: Option<String> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(CACHE_CHECK_INTERVAL) => {}
            () = cancel.cancelled() => return,
        }
        let s = store.clone();
        let now = tokio::task::spawn_blocking(move || s.check().err()).await.unwrap_or(None);
        if now != last {
            match &now {
                Some(problem) => {
                    tracing::error!(%problem, "cache directory unusable: not ready, serving what can be served")
                }
                None => tracing::info!("cache directory usable again"),
            }
            readiness.set_cache_problem(now.clone());
            last = now;
        }
    }
}
