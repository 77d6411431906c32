//! The tracker under test, run as a process exactly as a cluster would run it, and a raw
//! tracker-protocol client for driving it (or abusing it) without an agent.
//!
//! Binary: `$SHOAL_TRACKER_BIN`, else `$CARGO_TARGET_DIR/debug/shoal-tracker` (if that
//! variable is an absolute path), else `<workspace>/target/debug/shoal-tracker`. Build it
//! first with `cargo build --bins`; the harness does not build it.
//!
//! [`TrackerClient`] is a minimal libp2p node (TCP, noise, yamux, no pnet) with its own
//! identity that speaks `/shoal/tracker/1.0.0` with raw bytes: [`TrackerClient::request`]
//! encodes real protocol messages with the agent's encoder, [`TrackerClient::send_raw`] sends
//! whatever bytes a test wants (garbage, oversized, trailing bytes) and reports how the
//! tracker reacted. Each client is a distinct peer, so several of them look like several
//! nodes to the tracker.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use libp2p::futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};
use shoal_protocol::tracker::{
    decode_tracker_response, encode_tracker_request, TrackerRequest, TrackerResponse, TRACKER_PROTOCOL,
};
use tempfile::TempDir;

use crate::metrics;
use crate::process::{run_bounded, CmdOutput, Daemon};
use crate::util::{free_port, http_client, poll_until, tail_file, workspace_binary};

/// Path of the tracker binary (see module docs); an error telling how to build it if missing.
pub fn tracker_binary() -> Result<PathBuf> {
    workspace_binary("shoal-tracker", "SHOAL_TRACKER_BIN")
}

/// How to start a tracker. Start from [`TrackerOptions::new`] and chain.
#[derive(Debug, Clone)]
pub struct TrackerOptions {
    /// `--upstream REGISTRY=URL`, repeatable.
    pub upstreams: Vec<(String, String)>,
    /// `--default-registry`; `None` leaves the flag out.
    pub default_registry: Option<String>,
    /// Reuse this cache dir (node key) instead of a fresh one inside the tracker's temp dir.
    pub cache_dir: Option<PathBuf>,
    /// Appended after the standard flags.
    pub extra_args: Vec<String>,
    /// Extra environment for the process (e.g. `SHOAL_LOG=debug`).
    pub env: Vec<(String, String)>,
    pub startup_timeout: Duration,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions {
            upstreams: Vec::new(),
            default_registry: None,
            cache_dir: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            startup_timeout: Duration::from_secs(20),
        }
    }
}

impl TrackerOptions {
    pub fn new() -> TrackerOptions {
        TrackerOptions::default()
    }

    /// `--upstream registry=url`, e.g. `("127.0.0.1:5555", "http://127.0.0.1:5555")`.
    pub fn upstream(mut self, registry: &str, url: &str) -> TrackerOptions {
        self.upstreams.push((registry.to_string(), url.to_string()));
        self
    }

    pub fn default_registry(mut self, registry: &str) -> TrackerOptions {
        self.default_registry = Some(registry.to_string());
        self
    }

    pub fn cache_dir(mut self, dir: &Path) -> TrackerOptions {
        self.cache_dir = Some(dir.to_path_buf());
        self
    }

    pub fn arg(mut self, a: &str) -> TrackerOptions {
        self.extra_args.push(a.to_string());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> TrackerOptions {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
}

/// A running `shoal-tracker`, killed on drop. Restarts keep its ports and node key.
pub struct Tracker {
    daemon: Option<Daemon>,
    http: SocketAddr,
    p2p_port: u16,
    cache_dir: PathBuf,
    log_path: PathBuf,
    peer_id: String,
    opts: TrackerOptions,
    binary: PathBuf,
    dir: TempDir,
}

impl Tracker {
    /// Starts the tracker on free loopback ports and waits until `/healthz` answers 200 and
    /// `/status` names its peer id.
    pub async fn start(opts: TrackerOptions) -> Result<Tracker> {
        let binary = tracker_binary()?;
        let dir = tempfile::Builder::new().prefix("shoal-tracker-").tempdir()?;
        let cache_dir = match &opts.cache_dir {
            Some(d) => d.clone(),
            None => dir.path().join("cache"),
        };
        let mut tracker = Tracker {
            daemon: None,
            http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            p2p_port: free_port(),
            cache_dir,
            log_path: dir.path().join("tracker.log"),
            peer_id: String::new(),
            opts,
            binary,
            dir,
        };
        tracker.launch().await?;
        Ok(tracker)
    }

    /// The full argument list the tracker is started with.
    pub fn args(&self) -> Vec<String> {
        let o = &self.opts;
        let mut a = vec![
            "--http-listen".to_string(),
            self.http.to_string(),
            "--p2p-listen".to_string(),
            format!("/ip4/127.0.0.1/tcp/{}", self.p2p_port),
            "--cache-dir".to_string(),
            self.cache_dir.display().to_string(),
        ];
        for (reg, url) in &o.upstreams {
            a.push("--upstream".to_string());
            a.push(format!("{reg}={url}"));
        }
        if let Some(d) = &o.default_registry {
            a.push("--default-registry".to_string());
            a.push(d.clone());
        }
        a.extend(o.extra_args.iter().cloned());
        a
    }

    async fn launch(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(self.args());
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        let mut daemon = Daemon::spawn("shoal-tracker", cmd, &self.log_path)?;
        let client = http_client();
        let health = format!("{}/healthz", self.url());
        let status = format!("{}/status", self.url());
        let res = poll_until(
            "shoal-tracker to answer /healthz and /status",
            self.opts.startup_timeout,
            Duration::from_millis(50),
            || {
                let alive = daemon.ensure_running();
                let health = client.get(&health).timeout(Duration::from_secs(2)).send();
                let status = client.get(&status).timeout(Duration::from_secs(2)).send();
                async move {
                    alive?;
                    match (health.await, status.await) {
                        (Ok(h), Ok(s)) if h.status() == 200 && s.status() == 200 => {
                            let body: serde_json::Value = serde_json::from_slice(&s.bytes().await?)?;
                            Ok(body["peer_id"].as_str().map(str::to_string))
                        }
                        _ => Ok(None),
                    }
                }
            },
        )
        .await;
        match res {
            Ok(peer_id) => {
                self.peer_id = peer_id;
                self.daemon = Some(daemon);
                Ok(())
            }
            Err(e) => {
                let tail = daemon.log_tail();
                drop(daemon);
                Err(e).with_context(|| {
                    format!(
                        "tracker {} {:?} did not become ready; log:\n{tail}",
                        self.binary.display(),
                        self.args()
                    )
                })
            }
        }
    }

    /// `http://127.0.0.1:PORT` (dashboard, API, metrics).
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// `/ip4/127.0.0.1/tcp/PORT/p2p/ID`, for agents' `--tracker` and [`TrackerClient::connect`].
    pub fn p2p_addr(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", self.p2p_port, self.peer_id)
    }

    pub fn p2p_port(&self) -> u16 {
        self.p2p_port
    }

    /// `GET path`, expecting 200 and JSON.
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value> {
        let url = format!("{}{path}", self.url());
        let resp = http_client().get(&url).send().await.with_context(|| format!("GET {url}"))?;
        let status = resp.status();
        let body = resp.bytes().await?;
        if status != 200 {
            bail!("GET {url}: {status}: {}", String::from_utf8_lossy(&body));
        }
        serde_json::from_slice(&body).with_context(|| format!("GET {url}: not JSON"))
    }

    /// `POST path` with `body` (sent as is); returns the status and the body parsed as JSON
    /// (`Value::Null` if it is not JSON).
    pub async fn post(&self, path: &str, body: &str) -> Result<(u16, serde_json::Value)> {
        let url = format!("{}{path}", self.url());
        let resp = http_client()
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await?;
        Ok((status, serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null)))
    }

    /// `POST /api/v1/preheat {"image": image, "nodes": nodes}`.
    pub async fn preheat(&self, image: &str, nodes: serde_json::Value) -> Result<(u16, serde_json::Value)> {
        let body = serde_json::json!({ "image": image, "nodes": nodes });
        self.post("/api/v1/preheat", &body.to_string()).await
    }

    /// Peer ids of the nodes the tracker lists (alive or not).
    pub async fn node_ids(&self) -> Result<Vec<String>> {
        let nodes = self.get_json("/api/v1/nodes").await?;
        Ok(nodes["nodes"]
            .as_array()
            .context("no nodes array")?
            .iter()
            .filter_map(|n| n["peer_id"].as_str().map(str::to_string))
            .collect())
    }

    /// `GET /metrics`.
    pub async fn metrics_text(&self) -> Result<String> {
        let url = format!("{}/metrics", self.url());
        let resp = http_client().get(&url).send().await?;
        if resp.status() != 200 {
            bail!("GET {url}: {}", resp.status());
        }
        Ok(resp.text().await?)
    }

    /// Sum of the samples named `name` (0 if none).
    pub async fn metric(&self, name: &str) -> Result<f64> {
        Ok(metrics::sum(&metrics::parse(&self.metrics_text().await?), name, &[]).unwrap_or(0.0))
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The tracker's temp dir (log, default cache dir).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        tail_file(&self.log_path, 8192)
    }

    pub fn is_running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|d| d.exited().is_none())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// SIGTERM, up to 10 s grace, then SIGKILL. True if it exited by itself.
    pub fn terminate(&mut self) -> bool {
        match self.daemon.take() {
            Some(mut d) => d.terminate(Duration::from_secs(10)).is_some(),
            None => false,
        }
    }

    /// Starts the tracker again (after [`Tracker::kill`] or [`Tracker::terminate`], or
    /// stopping it first) on the same ports with the same node key, so its peer id is the
    /// same. Retries a few times if a port is briefly still taken.
    pub async fn restart(&mut self) -> Result<()> {
        self.terminate();
        let mut last = None;
        for _ in 0..5 {
            match self.launch().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = Some(e);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the tracker binary with `args` and waits (bounded) for it to exit. Err if it is
/// still running after `timeout` (it is killed then). For CLI failure tests.
pub async fn run_tracker_expecting_exit(args: &[String], timeout: Duration) -> Result<CmdOutput> {
    let mut cmd = Command::new(tracker_binary()?);
    cmd.args(args);
    run_bounded(cmd, timeout)
        .await
        .with_context(|| format!("shoal-tracker {args:?} should have exited on its own within {timeout:?}"))
}

/// Largest response the raw client reads.
const MAX_RAW_RESPONSE: u64 = 1 << 20;
/// Bound on one request (dial included).
const RAW_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

/// Request-response over raw bytes: writes the request bytes as given, reads the response
/// to the end of the stream.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T>(&mut self, _: &StreamProtocol, _: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        Err(io::Error::other("the test client accepts no requests"))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Vec<u8>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let mut buf = Vec::new();
        io.take(MAX_RAW_RESPONSE).read_to_end(&mut buf).await?;
        if buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "empty response (stream closed)"));
        }
        Ok(buf)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, request: Vec<u8>) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&request).await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, _: &mut T, _: Vec<u8>) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        Err(io::Error::other("the test client answers no requests"))
    }
}

/// A raw tracker-protocol client with its own libp2p identity (see module docs). The swarm
/// is driven only inside its methods: between calls it sits idle.
pub struct TrackerClient {
    swarm: Swarm<request_response::Behaviour<RawCodec>>,
    tracker: PeerId,
    addr: Multiaddr,
}

impl TrackerClient {
    /// A new identity, connected to the tracker at `p2p_addr` (`/ip4/…/tcp/…/p2p/<id>`).
    pub async fn connect(p2p_addr: &str) -> Result<TrackerClient> {
        let addr: Multiaddr = p2p_addr.parse().with_context(|| format!("multiaddr {p2p_addr}"))?;
        let tracker = match addr.iter().last() {
            Some(libp2p::multiaddr::Protocol::P2p(peer)) => peer,
            _ => bail!("{p2p_addr} does not end in /p2p/<peer id>"),
        };
        let behaviour = request_response::Behaviour::with_codec(
            RawCodec,
            [(libp2p::StreamProtocol::new(TRACKER_PROTOCOL), ProtocolSupport::Outbound)],
            request_response::Config::default().with_request_timeout(Duration::from_secs(15)),
        );
        let swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                libp2p::tcp::Config::default(),
                libp2p::noise::Config::new,
                libp2p::yamux::Config::default,
            )
            .map_err(|e| anyhow!("building the test client's transport: {e}"))?
            .with_behaviour(|_| behaviour)
            .map_err(|e| anyhow!("building the test client's behaviour: {e}"))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
            .build();
        let mut client = TrackerClient { swarm, tracker, addr };
        client.ensure_connected().await?;
        Ok(client)
    }

    pub fn peer_id(&self) -> PeerId {
        *self.swarm.local_peer_id()
    }

    async fn ensure_connected(&mut self) -> Result<()> {
        if self.swarm.is_connected(&self.tracker) {
            return Ok(());
        }
        self.swarm.dial(self.addr.clone()).with_context(|| format!("dial {}", self.addr))?;
        let tracker = self.tracker;
        let wait = async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == tracker => return Ok(()),
                    SwarmEvent::OutgoingConnectionError { error, .. } => {
                        return Err(anyhow!("connecting to the tracker: {error}"))
                    }
                    _ => {}
                }
            }
        };
        tokio::time::timeout(RAW_REQUEST_TIMEOUT, wait)
            .await
            .map_err(|_| anyhow!("no connection to the tracker within {RAW_REQUEST_TIMEOUT:?}"))?
    }

    /// Sends `bytes` as one request. `Ok(response bytes)` if the tracker answered,
    /// `Err(why)` if it reset the stream, closed it, or did not answer in time.
    pub async fn send_raw(&mut self, bytes: Vec<u8>) -> Result<Vec<u8>, String> {
        self.ensure_connected().await.map_err(|e| e.to_string())?;
        let id = self.swarm.behaviour_mut().send_request(&self.tracker, bytes);
        let wait = async {
            loop {
                match self.swarm.select_next_some().await {
                    SwarmEvent::Behaviour(request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    }) if request_id == id => return Ok(response),
                    SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                        request_id,
                        error,
                        ..
                    }) if request_id == id => return Err(error.to_string()),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(RAW_REQUEST_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {RAW_REQUEST_TIMEOUT:?}")))
    }

    /// Sends a well-formed request (encoded and validated by the agent's encoder) and decodes
    /// the answer.
    pub async fn request(&mut self, request: &TrackerRequest) -> Result<TrackerResponse> {
        let bytes = encode_tracker_request(request).context("encoding the request")?;
        let answer = self.send_raw(bytes).await.map_err(|e| anyhow!("tracker request failed: {e}"))?;
        decode_tracker_response(&answer).context("decoding the tracker's answer")
    }
}
