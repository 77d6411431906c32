//! One scenario run: start what the scenario needs on every node (a containerd, and for `dht`
//! and `tracker` an agent; a tracker), let every node pull the image at the same moment with
//! `ctr content fetch` through `hosts.toml`, and time each node.
//!
//! Processes that belong to a node run inside its namespace (`ip netns exec`, which execs, so
//! the pid we hold is the process itself and killing it by pid works). containerd itself runs
//! in the root namespace: `ctr content fetch` does the registry traffic in the `ctr` process
//! (which runs in the node's namespace) and only hands the bytes to containerd over its unix
//! socket, so the network path is exactly the node's. Each node gets a fresh containerd per
//! scenario: a shared content store would skip blobs another node already fetched.
//!
//! The controller (this process) stays in the root namespace, which has no route into the
//! benchmark network; where it must ask a node's agent something (`/status`, `/readyz`) it runs
//! `shoal-benches probe` inside that namespace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures_util::future::join_all;
use shoal_tests::{write_hosts_toml, Containerd, Daemon};

use super::net::Host;
use super::report::{Killed, NodeOutcome};

/// What the nodes do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Every node pulls straight from the origin; no agent.
    Direct,
    /// An agent per node, bootstrapped from the first one; no tracker.
    Dht,
    /// An agent per node, all pointed at a tracker.
    Tracker,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Direct => "direct",
            Scenario::Dht => "dht",
            Scenario::Tracker => "tracker",
        }
    }
}

/// Where a node (or the tracker) lives: its own namespace, or loopback with free ports.
#[derive(Debug, Clone)]
pub enum Place {
    Netns(Host),
    Loopback,
}

impl Place {
    /// A command running `program` at this place.
    fn command(&self, program: &Path) -> Command {
        match self {
            Place::Netns(h) => h.command(program),
            Place::Loopback => Command::new(program),
        }
    }

    /// The address other nodes reach this place on (P2P).
    fn ip(&self) -> String {
        match self {
            Place::Netns(h) => h.ip.to_string(),
            Place::Loopback => "127.0.0.1".to_string(),
        }
    }

    /// A port for a service here: the default in a namespace (each has its own), a free one on
    /// shared loopback.
    fn port(&self, default: u16) -> u16 {
        match self {
            Place::Netns(_) => default,
            Place::Loopback => shoal_tests::free_port(),
        }
    }
}

/// Executables the scenarios run.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub agent: PathBuf,
    /// `None` when `shoal-tracker` has not been built (the tracker scenario is skipped then).
    pub tracker: Option<PathBuf>,
    /// This binary, for `probe` inside namespaces.
    pub benches: PathBuf,
    pub ctr: PathBuf,
}

/// Everything a scenario needs to know about the run.
pub struct Setup<'a> {
    pub bins: &'a Binaries,
    pub nodes: &'a [Place],
    pub tracker_place: &'a Place,
    /// `host:port` of the origin as nodes see it (the registry part of the reference).
    pub origin_host: String,
    /// `registry/repo:tag` the nodes pull.
    pub reference: String,
    /// Extra flags for every agent.
    pub agent_args: &'a [String],
    /// Scratch space for this scenario run (logs, caches, hosts dirs).
    pub dir: &'a Path,
    pub timeout: Duration,
    /// What to kill mid-pull (`--kill`), if anything.
    pub kill: Option<Kill>,
}

/// What `--kill` kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KillWhat {
    /// The planner of the largest layer: its coordinator agent (`dht`) or the tracker.
    Coordinator,
    /// This many randomly chosen nodes.
    Nodes(usize),
}

/// `coordinator` or a number of nodes.
pub fn parse_kill(s: &str) -> Result<KillWhat, String> {
    match s {
        "coordinator" => Ok(KillWhat::Coordinator),
        n => match n.parse::<usize>() {
            Ok(k) if k > 0 => Ok(KillWhat::Nodes(k)),
            _ => Err(format!("expected `coordinator` or a number of nodes (1 or more), got {s:?}")),
        },
    }
}

/// `--kill` for one run.
#[derive(Debug, Clone)]
pub struct Kill {
    pub what: KillWhat,
    /// Time into the pull.
    pub after: Duration,
    /// The largest layer (`sha256:<hex>`), whose coordinator `KillWhat::Coordinator` kills.
    pub digest: String,
    /// Run number: random victims differ between runs, and repeat across invocations.
    pub round: usize,
}

/// `k` distinct node indices below `n`, the same for the same `seed` (a partial
/// Fisher-Yates shuffle driven by splitmix64).
fn random_nodes(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + (next() % (n - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(k.min(n));
    idx
}

/// GETs `url` at `place` until it answers 200 (at most `timeout`); returns the body. In a
/// namespace this runs `shoal-benches probe` there, since the controller cannot reach it.
async fn probe(bins: &Binaries, place: &Place, url: &str, timeout: Duration) -> Result<String> {
    let mut cmd = place.command(&bins.benches);
    cmd.args(["probe", url, "--timeout-ms", &timeout.as_millis().to_string()]);
    let out = shoal_tests::process::run_bounded(cmd, timeout + Duration::from_secs(5)).await?;
    if !out.success() {
        bail!("probe {url}: {}", out.stderr.trim());
    }
    Ok(out.stdout)
}

/// A started agent (or tracker) with the addresses others need.
struct Service {
    daemon: Daemon,
    log: PathBuf,
    /// Metrics URL as seen from the service's own place.
    metrics_url: String,
    place: Place,
    /// Registry API URL as the node's own `ctr` reaches it.
    url: String,
    /// `/ip4/<ip>/tcp/<port>/p2p/<id>`.
    p2p_addr: String,
}

impl Service {
    fn log_tail(&self) -> String {
        shoal_tests::util::tail_file(&self.log, 3000)
    }
}

/// Reads `peer_id` from a `/status` JSON body.
fn peer_id(body: &str) -> Result<String> {
    let v: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("/status body {body:?}"))?;
    Ok(v["peer_id"].as_str().context("/status has no peer_id")?.to_string())
}

async fn start_agent(s: &Setup<'_>, i: usize, peers: &[String], flag: &str) -> Result<Service> {
    let place = &s.nodes[i];
    let dir = s.dir.join(format!("agent{i}"));
    std::fs::create_dir_all(&dir)?;
    let (api, metrics, p2p) = (place.port(5000), place.port(9090), place.port(5001));
    let origin_url = format!("http://{}", s.origin_host);
    let mut cmd = place.command(&s.bins.agent);
    cmd.arg("run")
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .args(["--p2p-listen", &format!("/ip4/{}/tcp/{p2p}", place.ip())])
        .args(["--upstream", &format!("{}={origin_url}", s.origin_host)])
        .args(["--default-registry", &s.origin_host])
        // Each node's containerd here is the benchmark's client, not a store to seed from
        // (and the machine's own containerd, if any, must not leak into a node).
        .args(["--containerd-address", "off"]);
    for p in peers {
        cmd.args([flag, p]);
    }
    cmd.args(s.agent_args);
    let log = dir.join("agent.log");
    let daemon = Daemon::spawn(&format!("shoal-agent {i}"), cmd, &log)?;
    let metrics_url = format!("http://127.0.0.1:{metrics}");
    // With peers given, /readyz waits for the first connection.
    let ready = probe(s.bins, place, &format!("{metrics_url}/readyz"), Duration::from_secs(30)).await;
    let status = match ready {
        Ok(_) => probe(s.bins, place, &format!("{metrics_url}/status"), Duration::from_secs(5)).await,
        Err(e) => Err(e),
    };
    let status = status.with_context(|| {
        format!("agent {i} did not become ready; log:\n{}", shoal_tests::util::tail_file(&log, 3000))
    })?;
    let id = peer_id(&status)?;
    Ok(Service {
        daemon,
        log,
        metrics_url,
        place: place.clone(),
        url: format!("http://127.0.0.1:{api}"),
        p2p_addr: format!("/ip4/{}/tcp/{p2p}/p2p/{id}", place.ip()),
    })
}

async fn start_tracker(s: &Setup<'_>, binary: &Path) -> Result<Service> {
    let place = s.tracker_place;
    let dir = s.dir.join("tracker");
    std::fs::create_dir_all(&dir)?;
    let (http, p2p) = (place.port(8080), place.port(5101));
    let http_addr = format!("{}:{http}", place.ip());
    let mut cmd = place.command(binary);
    cmd.args(["--p2p-listen", &format!("/ip4/{}/tcp/{p2p}", place.ip())])
        .args(["--http-listen", &http_addr])
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .args(["--upstream", &format!("{0}=http://{0}", s.origin_host)])
        .args(["--default-registry", &s.origin_host]);
    let log = dir.join("tracker.log");
    let daemon = Daemon::spawn("shoal-tracker", cmd, &log)?;
    let status = probe(s.bins, place, &format!("http://{http_addr}/status"), Duration::from_secs(30))
        .await
        .with_context(|| {
        format!("the tracker did not answer /status; log:\n{}", shoal_tests::util::tail_file(&log, 3000))
    })?;
    let id = peer_id(&status)?;
    Ok(Service {
        daemon,
        log,
        metrics_url: format!("http://{http_addr}"),
        place: place.clone(),
        url: format!("http://{http_addr}"),
        p2p_addr: format!("/ip4/{}/tcp/{p2p}/p2p/{id}", place.ip()),
    })
}

/// What is running for a scenario; dropping it stops everything (agents, tracker,
/// containerds) and removes their files.
pub struct Fleet {
    containerds: Vec<Containerd>,
    agents: Vec<Service>,
    tracker: Option<Service>,
    hosts_dirs: Vec<PathBuf>,
}

impl Fleet {
    /// Starts containerds, the tracker and agents as `scenario` needs, and writes each node's
    /// `hosts.toml`.
    pub async fn start(s: &Setup<'_>, scenario: Scenario) -> Result<Fleet> {
        let n = s.nodes.len();
        let containerds = join_all((0..n).map(|_| Containerd::start())).await;
        let containerds =
            containerds.into_iter().collect::<Result<Vec<_>>>().context("starting containerd")?;
        let mut fleet = Fleet { containerds, agents: Vec::new(), tracker: None, hosts_dirs: Vec::new() };
        match scenario {
            Scenario::Direct => {}
            Scenario::Dht => {
                let first = start_agent(s, 0, &[], "--bootstrap").await?;
                let seed = [first.p2p_addr.clone()];
                fleet.agents.push(first);
                let rest = join_all((1..n).map(|i| start_agent(s, i, &seed, "--bootstrap"))).await;
                for a in rest {
                    fleet.agents.push(a?);
                }
            }
            Scenario::Tracker => {
                let binary = s.bins.tracker.as_deref().context("no shoal-tracker binary")?;
                let tracker = start_tracker(s, binary).await?;
                let addr = [tracker.p2p_addr.clone()];
                fleet.tracker = Some(tracker);
                let all = join_all((0..n).map(|i| start_agent(s, i, &addr, "--tracker"))).await;
                for a in all {
                    fleet.agents.push(a?);
                }
            }
        }
        for i in 0..n {
            let dir = s.dir.join(format!("hosts{i}"));
            match fleet.agents.get(i) {
                // The origin as the fallback `server` would hide a failing agent behind an
                // inflated egress figure; a dead server makes it a failed pull instead.
                Some(agent) => {
                    write_hosts_toml(&dir, &s.origin_host, Some(&agent.url), "http://127.0.0.1:1")?
                }
                // The origin itself as the only host: containerd 1.6 rejects a hosts.toml with
                // no `[host]` table, and a `server` alone would be tried over HTTPS.
                None => {
                    let origin = format!("http://{}", s.origin_host);
                    write_hosts_toml(&dir, &s.origin_host, Some(&origin), &origin)?
                }
            };
            fleet.hosts_dirs.push(dir);
        }
        Ok(fleet)
    }

    /// Every node runs `ctr content fetch` at the same moment; returns how each node's pull
    /// ended (completion time in seconds from that moment, or why it failed) and what
    /// `s.kill` killed on the way.
    pub async fn pull_all(&mut self, s: &Setup<'_>) -> Result<(Vec<NodeOutcome>, Vec<Killed>)> {
        for (i, agent) in self.agents.iter_mut().enumerate() {
            if let Err(e) = agent.daemon.ensure_running() {
                bail!("agent {i} died before the pull: {e:#}");
            }
        }
        let mut children = Vec::new();
        let t0 = Instant::now();
        for (i, place) in s.nodes.iter().enumerate() {
            let mut cmd = place.command(&s.bins.ctr);
            cmd.arg("--address")
                .arg(self.containerds[i].socket())
                .args(["-n", "shoalbench", "content", "fetch", "--hosts-dir"])
                .arg(&self.hosts_dirs[i])
                .args(["--all-platforms", &s.reference]);
            shoal_tests::util::scrub_env(&mut cmd);
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            let mut cmd = tokio::process::Command::from(cmd);
            cmd.kill_on_drop(true);
            children.push(cmd.spawn().with_context(|| format!("spawning ctr for node {i}"))?);
        }
        // Nodes `--kill` chose; a node's wait ends (dropping, so killing, its `ctr`) when
        // its index shows up here.
        let (killed_tx, killed_rx) = tokio::sync::watch::channel(Vec::<usize>::new());
        let killed_so_far = &killed_rx;
        let waits = children.into_iter().enumerate().map(|(i, child)| {
            let mut killed = killed_rx.clone();
            async move {
                let pull = tokio::time::timeout_at((t0 + s.timeout).into(), child.wait_with_output());
                tokio::select! {
                    r = pull => match r {
                        Err(_) => NodeOutcome::Failed(format!("node {i}: not done after {:?}", s.timeout)),
                        Ok(Err(e)) => NodeOutcome::Failed(format!("node {i}: waiting for ctr: {e}")),
                        Ok(Ok(out)) if out.status.success() => NodeOutcome::Done(t0.elapsed().as_secs_f64()),
                        // ctr died of its node's agent being killed a moment earlier.
                        Ok(Ok(_)) if killed_so_far.borrow().contains(&i) => NodeOutcome::Killed,
                        Ok(Ok(out)) => NodeOutcome::Failed(format!(
                            "node {i}: ctr content fetch {}: {}",
                            out.status,
                            String::from_utf8_lossy(&out.stderr).trim()
                        )),
                    },
                    Ok(_) = killed.wait_for(|k| k.contains(&i)) => NodeOutcome::Killed,
                }
            }
        });
        let kill = async {
            let Some(kill) = &s.kill else { return Ok(Vec::new()) };
            tokio::time::sleep_until((t0 + kill.after).into()).await;
            self.kill(kill, t0, &killed_tx)
        };
        let (outcomes, killed) = tokio::join!(join_all(waits), kill);
        Ok((outcomes, killed?))
    }

    /// Kills what `kill` names, now; node indices go to `killed_tx` (which ends their pulls).
    fn kill(
        &mut self,
        kill: &Kill,
        t0: Instant,
        killed_tx: &tokio::sync::watch::Sender<Vec<usize>>,
    ) -> Result<Vec<Killed>> {
        let at_s = t0.elapsed().as_secs_f64();
        let n = self.containerds.len();
        let mut out = Vec::new();
        let nodes = match kill.what {
            KillWhat::Coordinator => {
                if let Some(tracker) = &mut self.tracker {
                    tracker.daemon.kill();
                    out.push(Killed { node: None, what: "the tracker".into(), at_s });
                    return Ok(out);
                }
                let ids = self
                    .agents
                    .iter()
                    .map(|a| {
                        let id = a.p2p_addr.rsplit('/').next().unwrap_or_default();
                        id.parse().with_context(|| format!("peer id {id:?}"))
                    })
                    .collect::<Result<Vec<libp2p::PeerId>>>()?;
                let Some(coordinator) = shoal_tests::util::coordinator_index(&ids, &kill.digest) else {
                    bail!("--kill coordinator: no agents, or the layer digest {} is not hex", kill.digest);
                };
                vec![(coordinator, format!(" (coordinator of {})", kill.digest))]
            }
            KillWhat::Nodes(k) => {
                random_nodes(n, k, kill.round as u64).into_iter().map(|i| (i, String::new())).collect()
            }
        };
        for (i, why) in nodes {
            if let Some(agent) = self.agents.get_mut(i) {
                agent.daemon.kill();
            }
            killed_tx.send_modify(|k| k.push(i));
            let what = if self.agents.is_empty() { "client" } else { "agent and client" };
            out.push(Killed { node: Some(i), what: format!("node {i}: {what}{why}"), at_s });
        }
        Ok(out)
    }

    /// Log tails of every agent and the tracker, for a failed run.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        if let Some(t) = &self.tracker {
            out.push_str(&format!("--- tracker ({}) ---\n{}\n", t.url, t.log_tail()));
        }
        for (i, a) in self.agents.iter().enumerate() {
            out.push_str(&format!("--- agent {i} ---\n{}\n", a.log_tail()));
        }
        out
    }

    /// What the agents say, summed (see [`AgentTotals`]). `None` without agents or if a
    /// scrape failed.
    pub async fn agents_received(&self, s: &Setup<'_>) -> Option<AgentTotals> {
        if self.agents.is_empty() {
            return None;
        }
        // Killed agents (`--kill`) have no metrics left to read.
        let live: Vec<&Service> = self.agents.iter().filter(|a| a.daemon.pid().is_some()).collect();
        let scrapes = join_all(live.iter().map(|a| {
            let url = format!("{}/metrics", a.metrics_url);
            async move { probe(s.bins, &a.place, &url, Duration::from_secs(5)).await }
        }))
        .await;
        let mut t = AgentTotals::default();
        for (text, agent) in scrapes.into_iter().zip(live) {
            let samples = shoal_tests::metrics::parse(&text.ok()?);
            let sum = |name, labels: &[(&str, &str)]| {
                shoal_tests::metrics::sum(&samples, name, labels).unwrap_or(0.0)
            };
            t.from_origin += sum("shoal_received_bytes_total", &[("source", "origin")]);
            t.from_peers += sum("shoal_received_bytes_total", &[("source", "peer")]);
            for name in ["shoal_origin_pieces_taken_over_total", "shoal_origin_pieces_unplanned_total"] {
                t.unowned_pieces += sum(name, &[]);
            }
            t.dht_requests_received += sum("shoal_dht_requests_received_total", &[]);
            t.dht_requests_sent += sum("shoal_dht_requests_sent_total", &[]);
            let plans = sum("shoal_coordinator_plans_total", &[]);
            t.coordinator_plans += plans;
            t.busiest_coordinator_plans = t.busiest_coordinator_plans.max(plans);
            t.cpu_seconds += agent.daemon.pid().and_then(process_cpu_seconds).unwrap_or(0.0);
        }
        Some(t)
    }

    /// How many agents are still running (a crashed agent is a result worth reporting).
    pub fn agents_alive(&mut self) -> usize {
        let mut alive = 0;
        for a in &mut self.agents {
            // A killed agent's daemon holds no process any more.
            alive += usize::from(a.daemon.pid().is_some() && a.daemon.exited().is_none());
        }
        alive
    }
}

/// What the agents of one run say, summed over them (from their `/metrics` and `/proc`).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct AgentTotals {
    /// Content bytes received from the origin and from peers (`shoal_received_bytes_total`).
    pub from_origin: f64,
    pub from_peers: f64,
    /// Origin pieces fetched although another node owned them (takeovers) or outside a
    /// plan: where duplicate origin bytes come from.
    pub unowned_pieces: f64,
    /// Kademlia requests received and sent.
    pub dht_requests_received: f64,
    pub dht_requests_sent: f64,
    /// Plan requests answered as a digest's coordinator (all agents; and the busiest one).
    pub coordinator_plans: f64,
    pub busiest_coordinator_plans: f64,
    /// CPU seconds (user + system) the agent processes used since they started.
    pub cpu_seconds: f64,
}

/// User plus system CPU seconds of process `pid` so far (Linux `/proc/<pid>/stat`).
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf reads a constant of the C library; no memory is touched.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_flag() {
        assert_eq!(parse_kill("coordinator"), Ok(KillWhat::Coordinator));
        assert_eq!(parse_kill("3"), Ok(KillWhat::Nodes(3)));
        assert!(parse_kill("0").is_err());
        assert!(parse_kill("everyone").is_err());
    }

    #[test]
    fn random_victims_are_distinct_in_range_and_repeat() {
        let a = random_nodes(20, 5, 1);
        assert_eq!(a.len(), 5);
        assert!(a.iter().all(|&i| i < 20));
        let mut d = a.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 5, "{a:?}");
        assert_eq!(a, random_nodes(20, 5, 1));
        assert_ne!(a, random_nodes(20, 5, 2));
        assert_eq!(random_nodes(3, 9, 0).len(), 3);
    }
}
