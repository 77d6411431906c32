//! The agent under test, run as a process exactly as a node would run it.
//!
//! Binary: `$SHOAL_AGENT_BIN`, else `$CARGO_TARGET_DIR/debug/shoal-agent` (if that
//! variable is an absolute path), else `<workspace>/target/debug/shoal-agent`. Build it
//! first with `cargo build --bins`; the harness does not build it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::metrics;
use crate::process::{run_bounded, CmdOutput, Daemon};
use crate::util::{free_port, http_client, poll_until, tail_file, workspace_binary};

/// Path of the agent binary (see module docs); an error telling how to build it if missing.
pub fn agent_binary() -> Result<PathBuf> {
    workspace_binary("shoal-agent", "SHOAL_AGENT_BIN")
}

/// How to start an agent. Start from [`AgentOptions::new`] and chain.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `--upstream REGISTRY=URL`, repeatable.
    pub upstreams: Vec<(String, String)>,
    /// `--default-registry` (default `docker.io`).
    pub default_registry: Option<String>,
    /// Reuse this cache dir instead of a fresh one inside the agent's temp dir.
    pub cache_dir: Option<PathBuf>,
    /// `--cache-max-bytes` (default `20GiB`).
    pub cache_max_bytes: String,
    pub registry_auth_file: Option<PathBuf>,
    /// `--log-format` (default `text`).
    pub log_format: String,
    /// `--containerd-address`, `--containerd-namespace`, `--containerd-root` of a test
    /// containerd ([`AgentOptions::containerd`]); `None`: `--containerd-address off`, so no
    /// test agent ever reads a containerd of the machine.
    pub containerd: Option<(PathBuf, String, PathBuf)>,
    /// Appended after the standard flags.
    pub extra_args: Vec<String>,
    /// Extra environment for the process (e.g. `RUST_LOG`).
    pub env: Vec<(String, String)>,
    pub startup_timeout: Duration,
    /// Also listen for QUIC on the P2P port (`/ip4/127.0.0.1/udp/PORT/quic-v1`).
    pub quic: bool,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            upstreams: Vec::new(),
            default_registry: Some("docker.io".to_string()),
            cache_dir: None,
            cache_max_bytes: "20GiB".to_string(),
            registry_auth_file: None,
            log_format: "text".to_string(),
            containerd: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            startup_timeout: Duration::from_secs(20),
            quic: false,
        }
    }
}

impl AgentOptions {
    pub fn new() -> AgentOptions {
        AgentOptions::default()
    }

    /// `--upstream registry=url`, e.g. `("127.0.0.1:5555", "http://127.0.0.1:5555")`.
    pub fn upstream(mut self, registry: &str, url: &str) -> AgentOptions {
        self.upstreams.push((registry.to_string(), url.to_string()));
        self
    }

    pub fn cache_dir(mut self, dir: &Path) -> AgentOptions {
        self.cache_dir = Some(dir.to_path_buf());
        self
    }

    pub fn cache_max_bytes(mut self, v: &str) -> AgentOptions {
        self.cache_max_bytes = v.to_string();
        self
    }

    /// `--default-registry`; `None` leaves the flag out (the agent's own default).
    pub fn default_registry(mut self, registry: Option<&str>) -> AgentOptions {
        self.default_registry = registry.map(str::to_string);
        self
    }

    pub fn registry_auth_file(mut self, path: &Path) -> AgentOptions {
        self.registry_auth_file = Some(path.to_path_buf());
        self
    }

    /// Also listen for QUIC on the P2P port number (UDP); see [`Agent::quic_addr`].
    pub fn quic(mut self) -> AgentOptions {
        self.quic = true;
        self
    }

    pub fn log_format(mut self, format: &str) -> AgentOptions {
        self.log_format = format.to_string();
        self
    }

    /// Serve containerd `ctd`'s content store (its socket, namespace and root).
    pub fn containerd(mut self, ctd: &crate::Containerd) -> AgentOptions {
        self.containerd =
            Some((ctd.socket().to_path_buf(), ctd.namespace().to_string(), ctd.root().to_path_buf()));
        self
    }

    pub fn arg(mut self, a: &str) -> AgentOptions {
        self.extra_args.push(a.to_string());
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> AgentOptions {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
}

/// A running agent, killed on drop. Its temp dir holds the log and (unless
/// [`AgentOptions::cache_dir`] was given) the cache.
pub struct Agent {
    daemon: Option<Daemon>,
    listen: SocketAddr,
    metrics_listen: SocketAddr,
    /// The P2P port (`--p2p-listen /ip4/127.0.0.1/tcp/PORT`).
    p2p_port: u16,
    cache_dir: PathBuf,
    log_path: PathBuf,
    opts: AgentOptions,
    binary: PathBuf,
    dir: TempDir,
}

impl Agent {
    /// Starts the agent on free loopback ports and waits until `GET /v2/` and the
    /// metrics listener's `/healthz` both answer 200.
    pub async fn start(opts: AgentOptions) -> Result<Agent> {
        let binary = agent_binary()?;
        let dir = tempfile::Builder::new().prefix("shoal-agent-").tempdir()?;
        let cache_dir = match &opts.cache_dir {
            Some(d) => d.clone(),
            None => dir.path().join("cache"),
        };
        let mut agent = Agent {
            daemon: None,
            listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], free_port())),
            p2p_port: free_port(),
            cache_dir,
            log_path: dir.path().join("agent.log"),
            opts,
            binary,
            dir,
        };
        agent.launch().await?;
        Ok(agent)
    }

    /// The full argument list the agent is started with.
    pub fn args(&self) -> Vec<String> {
        let o = &self.opts;
        let mut a = vec![
            "run".to_string(),
            "--listen".to_string(),
            self.listen.to_string(),
            "--metrics-listen".to_string(),
            self.metrics_listen.to_string(),
            "--cache-dir".to_string(),
            self.cache_dir.display().to_string(),
            "--cache-max-bytes".to_string(),
            o.cache_max_bytes.clone(),
            "--log-format".to_string(),
            o.log_format.clone(),
            "--p2p-listen".to_string(),
            format!("/ip4/127.0.0.1/tcp/{}", self.p2p_port),
        ];
        if o.quic {
            a.push("--p2p-listen".to_string());
            a.push(format!("/ip4/127.0.0.1/udp/{}/quic-v1", self.p2p_port));
        }
        for (reg, url) in &o.upstreams {
            a.push("--upstream".to_string());
            a.push(format!("{reg}={url}"));
        }
        if let Some(d) = &o.default_registry {
            a.push("--default-registry".to_string());
            a.push(d.clone());
        }
        if let Some(f) = &o.registry_auth_file {
            a.push("--registry-auth-file".to_string());
            a.push(f.display().to_string());
        }
        match &o.containerd {
            Some((socket, namespace, root)) => a.extend([
                "--containerd-address".to_string(),
                socket.display().to_string(),
                "--containerd-namespace".to_string(),
                namespace.clone(),
                "--containerd-root".to_string(),
                root.display().to_string(),
            ]),
            None => a.extend(["--containerd-address".to_string(), "off".to_string()]),
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
        let mut daemon = Daemon::spawn("shoal-agent", cmd, &self.log_path)?;
        let client = http_client();
        let base = format!("{}/v2/", self.url());
        let health = format!("{}/healthz", self.metrics_url());
        let res = poll_until(
            "shoal-agent to answer GET /v2/ and /healthz with 200",
            self.opts.startup_timeout,
            Duration::from_millis(50),
            || {
                let alive = daemon.ensure_running();
                let a = client.get(&base).timeout(Duration::from_secs(2)).send();
                let b = client.get(&health).timeout(Duration::from_secs(2)).send();
                async move {
                    alive?;
                    let ok =
                        |r: reqwest::Result<reqwest::Response>| matches!(r, Ok(resp) if resp.status() == 200);
                    Ok((ok(a.await) && ok(b.await)).then_some(()))
                }
            },
        )
        .await;
        if let Err(e) = res {
            let tail = daemon.log_tail();
            drop(daemon);
            return Err(e).with_context(|| {
                format!(
                    "agent {} {:?} did not become ready; log:\n{tail}",
                    self.binary.display(),
                    self.args()
                )
            });
        }
        self.daemon = Some(daemon);
        Ok(())
    }

    /// `http://127.0.0.1:PORT` (the registry API).
    pub fn url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// `127.0.0.1:PORT` (the registry API).
    pub fn host(&self) -> String {
        self.listen.to_string()
    }

    /// `http://127.0.0.1:PORT2` (metrics and health).
    pub fn metrics_url(&self) -> String {
        format!("http://{}", self.metrics_listen)
    }

    /// The agent's P2P address with its peer id (`/ip4/127.0.0.1/tcp/PORT/p2p/ID`), for
    /// other agents' `--bootstrap`; read from the agent's `/status`.
    pub async fn p2p_addr(&self) -> Result<String> {
        Ok(format!("/ip4/127.0.0.1/tcp/{}/p2p/{}", self.p2p_port, self.peer_id().await?))
    }

    /// The agent's QUIC multiaddr with its peer id (started with [`AgentOptions::quic`]).
    pub async fn quic_addr(&self) -> Result<String> {
        if !self.opts.quic {
            bail!("the agent was not started with AgentOptions::quic");
        }
        Ok(format!("/ip4/127.0.0.1/udp/{}/quic-v1/p2p/{}", self.p2p_port, self.peer_id().await?))
    }

    /// The agent's libp2p peer id, from its `/status`.
    pub async fn peer_id(&self) -> Result<String> {
        let url = format!("{}/status", self.metrics_url());
        let resp = http_client().get(&url).send().await?;
        if resp.status() != 200 {
            bail!("GET {url}: {}", resp.status());
        }
        let status: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
        Ok(status["peer_id"].as_str().context("status has no peer_id")?.to_string())
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Where the agent keeps its own complete copy of `digest` (`sha256:<hex>`).
    pub fn cached_blob_path(&self, digest: &str) -> PathBuf {
        self.cache_dir.join("blobs/sha256").join(crate::util::digest_hex(digest))
    }

    pub fn options(&self) -> &AgentOptions {
        &self.opts
    }

    /// The agent's whole log (stdout + stderr, across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        tail_file(&self.log_path, 8192)
    }

    pub fn is_running(&mut self) -> bool {
        match self.daemon.as_mut() {
            Some(d) => d.exited().is_none(),
            None => false,
        }
    }

    /// `GET /metrics` on the metrics listener.
    pub async fn metrics_text(&self) -> Result<String> {
        let url = format!("{}/metrics", self.metrics_url());
        let resp = http_client().get(&url).send().await?;
        if resp.status() != 200 {
            bail!("GET {url}: {}", resp.status());
        }
        Ok(resp.text().await?)
    }

    /// All samples from `/metrics`.
    pub async fn metrics(&self) -> Result<Vec<metrics::Sample>> {
        Ok(metrics::parse(&self.metrics_text().await?))
    }

    /// Sum of the samples named `name` whose labels include `labels`; `None` if no sample
    /// matches (e.g. a labelled counter never incremented).
    pub async fn metric_value(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        Ok(metrics::sum(&self.metrics().await?, name, labels))
    }

    /// SIGKILL (no chance to clean up).
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    /// SIGTERM, then SIGKILL after `grace`: the exit status if it exited by itself. The
    /// agent can be started again with [`Agent::restart`].
    pub fn terminate_within(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.daemon.take().and_then(|mut d| d.terminate(grace))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.daemon.as_ref().and_then(|d| d.pid())
    }

    /// A metric's value summed over the samples matching `labels`, 0 if absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.metric_value(name, labels).await.expect("scrape /metrics").unwrap_or(0.0)
    }

    /// SIGTERM, up to 10 s grace, then SIGKILL. Returns true if it exited by itself.
    pub fn terminate(&mut self) -> bool {
        match self.daemon.take() {
            Some(mut d) => d.terminate(Duration::from_secs(10)).is_some(),
            None => false,
        }
    }

    /// Stops the agent (SIGTERM, then SIGKILL) and starts it again with the same ports,
    /// cache dir and options. Retries a few times if a port is briefly still taken.
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

    /// The agent's temp dir (log, default cache).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the agent binary with `args` and waits (bounded) for it to exit. Err if it is
/// still running after `timeout` (it is killed then). For CLI failure tests.
pub async fn run_agent_expecting_exit(args: &[String], timeout: Duration) -> Result<CmdOutput> {
    let mut cmd = Command::new(agent_binary()?);
    cmd.args(args);
    run_bounded(cmd, timeout)
        .await
        .with_context(|| format!("shoal-agent {args:?} should have exited on its own within {timeout:?}"))
}

/// Starts `n` agents, agent `i` with `options(i)`; agent 0 is the others' bootstrap peer.
pub async fn start_swarm(n: usize, options: impl Fn(usize) -> AgentOptions) -> Vec<Agent> {
    let first = Agent::start(options(0)).await.expect("start agent 0");
    let seed = first.p2p_addr().await.expect("agent 0 p2p address");
    let mut rest = futures_util::future::join_all((1..n).map(|i| {
        let o = options(i).arg("--bootstrap").arg(&seed);
        async move { Agent::start(o).await.unwrap_or_else(|e| panic!("start agent {i}: {e:#}")) }
    }))
    .await;
    rest.insert(0, first);
    rest
}

/// Waits until every agent has a connected peer (at most 20 s each).
pub async fn wait_for_peers(agents: &[Agent]) {
    for a in agents {
        poll_until("a peer", Duration::from_secs(20), Duration::from_millis(100), || async {
            Ok((a.metric("shoal_connected_peers", &[]).await >= 1.0).then_some(()))
        })
        .await
        .unwrap();
    }
}
