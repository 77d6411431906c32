//! Wiring: the swarm, the request-serving task, the housekeeping tick and the HTTP server,
//! all stopped by one shutdown future.
//!
//! [`Tracker::start`] does everything that can fail on bad input or a busy port (the cache
//! dir, the node key, the HTTP listener, the P2P listeners) before anything runs, so `main`
//! exits at once with a clear message. [`Tracker::run`] then serves until `shutdown`
//! completes (the STYLE.md shape: bound listeners in, shutdown future in).
//!
//! Tracker requests are answered in arrival order by one task holding the state lock for
//! one decision each: a decision is microseconds, and a single writer keeps assignments
//! trivially exactly-once. The swarm loop queues requests with `try_send` and counts those it
//! has to drop, so a flood never blocks it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shoal_origin::auth::CredentialStore;
use shoal_origin::Origin;
use shoal_protocol::tracker::TrackerRequest;
use shoal_protocol::types::Registry;
use shoal_swarm::{Client, EventLoop, InboundRequest, InboundTrackerRequest, PeerId};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::State;

/// Why the tracker could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("cache directory {path}: {source}")]
    CacheDir { path: String, source: std::io::Error },
    #[error("cannot listen on {addr} (--http-listen): {source}")]
    HttpListen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot listen on {addr} (--p2p-listen): {reason}")]
    P2pListen { addr: String, reason: String },
    #[error("{0}")]
    Swarm(#[from] shoal_swarm::SwarmError),
    #[error("--registry-auth-file: {0}")]
    AuthFile(String),
    #[error("origin client: {0}")]
    Origin(String),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

/// What the HTTP handlers and the request task share.
pub struct Shared {
    state: Mutex<State>,
    pub metrics: Metrics,
    pub client: Client,
    pub origin: Origin,
    pub default_registry: Registry,
}

impl Shared {
    /// The state, for one short decision or view. A poisoned lock is taken over rather than
    /// propagated: a panic inside a decision leaves at worst one node's or one digest's soft
    /// state partly updated, which the next announcements correct; refusing every later
    /// request would be worse.
    pub fn state(&self) -> MutexGuard<'_, State> {
        shoal_protocol::sync::lock(&self.state)
    }

    /// `/metrics` text, synced with the state and the swarm counters.
    pub fn metrics_text(&self) -> String {
        {
            let state = self.state();
            self.metrics.sync(&state, &self.client.stats(), Instant::now());
        }
        self.metrics.encode()
    }
}

/// A tracker that has bound its listeners and is ready to [`run`](Tracker::run).
pub struct Tracker {
    shared: Arc<Shared>,
    http: TcpListener,
    event_loop: EventLoop,
    inbound: mpsc::Receiver<InboundRequest>,
    tracker_inbound: mpsc::Receiver<InboundTrackerRequest>,
}

impl Tracker {
    /// Creates the cache dir, loads (or creates) the node key, binds the HTTP and P2P
    /// listeners. Call inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Tracker, TrackerError> {
        std::fs::create_dir_all(&config.cache_dir).map_err(|source| TrackerError::CacheDir {
            path: config.cache_dir.display().to_string(),
            source,
        })?;
        let http = TcpListener::bind(config.http_listen)
            .await
            .map_err(|source| TrackerError::HttpListen { addr: config.http_listen, source })?;
        let credentials = match &config.registry_auth_file {
            Some(path) => CredentialStore::load(path).map_err(|e| TrackerError::AuthFile(e.to_string()))?,
            None => CredentialStore::default(),
        };
        let origin = Origin::new(config.upstreams.clone(), credentials)
            .map_err(|e| TrackerError::Origin(e.to_string()))?;
        // swarm::new refuses a P2P port another process holds; name the flag.
        let shoal_swarm::Parts { client, inbound, tracker_inbound, event_loop } =
            shoal_swarm::new(config.swarm.clone()).map_err(|e| match e {
                shoal_swarm::SwarmError::Listen { addr, reason } => {
                    TrackerError::P2pListen { addr: addr.to_string(), reason }
                }
                other => other.into(),
            })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new()),
            metrics: Metrics::new(),
            client,
            origin,
            default_registry: config.default_registry.clone(),
        });
        Ok(Tracker { shared, http, event_loop, inbound, tracker_inbound })
    }

    pub fn peer_id(&self) -> PeerId {
        self.shared.client.local_peer_id()
    }

    /// The bound HTTP address (useful with port 0).
    pub fn http_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), TrackerError> {
        let Tracker { shared, http, event_loop, mut inbound, tracker_inbound } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = move |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let swarm_task = tokio::spawn(event_loop.run(stopped(stop_rx.clone())));
        // A tracker serves no pieces (the protocol is outbound-only for it); anything that
        // arrives anyway is dropped, which closes the requester's stream.
        let drain_task = tokio::spawn(async move { while inbound.recv().await.is_some() {} });
        let serve_task =
            tokio::spawn(serve_requests(shared.clone(), tracker_inbound, stopped(stop_rx.clone())));
        let tick_task = tokio::spawn(tick(shared.clone(), stopped(stop_rx.clone())));
        tracing::info!(
            peer_id = %shared.client.local_peer_id(),
            http = %http.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            "tracker running"
        );
        let router = crate::http::router(shared.clone());
        let http_task =
            tokio::spawn(
                async move { axum::serve(http, router).with_graceful_shutdown(stopped(stop_rx)).await },
            );

        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        let http_result = http_task.await;
        for task in [serve_task, tick_task] {
            let _ = task.await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), swarm_task).await;
        drain_task.abort();
        match http_result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TrackerError::Http(e)),
            Err(e) => Err(TrackerError::Http(std::io::Error::other(e))),
        }
    }
}

/// Answers tracker requests, one decision at a time.
async fn serve_requests(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<InboundTrackerRequest>,
    stopped: impl Future<Output = ()>,
) {
    tokio::pin!(stopped);
    loop {
        let request = tokio::select! {
            _ = &mut stopped => return,
            request = requests.recv() => match request {
                Some(request) => request,
                None => return,
            },
        };
        let InboundTrackerRequest { peer, addrs, request, channel } = request;
        let now = Instant::now();
        let response = {
            let mut state = shared.state();
            match &request {
                TrackerRequest::Heartbeat(beat) => state.heartbeat(peer, &addrs, beat, now),
                TrackerRequest::Plan(plan) => state.plan(peer, &addrs, plan, now),
            }
        };
        if shared.client.respond_tracker(channel, response).await.is_err() {
            return; // the swarm stopped
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Housekeeping and history samples, once a second.
async fn tick(shared: Arc<Shared>, stopped: impl Future<Output = ()>) {
    tokio::pin!(stopped);
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = interval.tick() => shared.state().tick(Instant::now(), unix_ms()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::config::TrackerArgs;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: tracker\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
    }

    /// Bound listeners in, shutdown future in: serves on port 0, stops when told, and a second
    /// start on the same fixed P2P port is refused instead of sharing it.
    #[tokio::test]
    async fn serves_until_shutdown_and_refuses_a_taken_p2p_port() {
        use clap::Parser as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let p2p_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let args = |cache: &std::path::Path| {
            TrackerArgs::try_parse_from([
                "shoal-tracker".to_string(),
                "--http-listen=127.0.0.1:0".to_string(),
                format!("--p2p-listen=/ip4/127.0.0.1/tcp/{p2p_port}"),
                format!("--cache-dir={}", cache.display()),
            ])
            .unwrap()
            .into_config()
            .unwrap()
        };
        let tracker = Tracker::start(args(dir.path())).await.expect("start");
        let addr = tracker.http_addr().unwrap();
        let peer_id = tracker.peer_id().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(tracker.run(async move {
            let _ = stopped.await;
        }));

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let status = get(addr, "/status").await;
        assert!(status.contains(&format!("\"peer_id\":\"{peer_id}\"")), "{status}");
        let summary = get(addr, "/api/v1/summary").await;
        assert!(summary.contains("\"alive_nodes\":0"), "{summary}");
        let missing = get(addr, "/api/v1/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404") && missing.contains("\"error\""), "{missing}");

        let other = tempfile::tempdir().expect("tempdir");
        match Tracker::start(args(other.path())).await {
            Err(TrackerError::P2pListen { .. }) => {}
            Err(e) => panic!("wrong error for a taken P2P port: {e}"),
            Ok(_) => panic!("a second tracker started on a taken P2P port"),
        }

        stop.send(()).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), running).await.expect("stops in time");
        assert!(result.expect("no panic").is_ok());
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still listening after shutdown");
    }
}
