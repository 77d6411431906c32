//! `rollout`: N nodes pull one image at the same moment, and we measure what it cost the origin
//! and how long each node took, against the physical limit.
//!
//! Shoal's claim is that the origin sends each byte about once however many nodes pull, and
//! that a rollout then finishes close to the time one copy takes to cross the slowest link.
//! This runner checks the claim with real parts only: Debian's `docker-registry` as the origin,
//! containerd's `ctr content fetch` through `hosts.toml` as the client on every node, the
//! `shoal-agent` (and `shoal-tracker`) binaries as processes.
//!
//! Two modes:
//! - namespaces (default, root): each node, the origin and the tracker in their own network
//!   namespace behind `tc tbf`-shaped veths ([`net`]); origin egress is the origin interface's
//!   `tx_bytes`, so it counts everything that left the origin, whoever asked.
//! - `--loopback` (no root): everything on 127.0.0.1, no shaping, egress from the origin's
//!   access log. It checks that the harness and the scenarios work (CI runs it with tiny sizes),
//!   not bandwidth: with no link limits there is no `T_min`.
//!
//! Scenarios ([`scenario::Scenario`]): `direct` (no agent), `dht` (agents, no tracker),
//! `tracker` (agents and a tracker; skipped with a note while `shoal-tracker` is not built).
//! Each scenario starts from empty caches and empty containerd stores; with `--runs k` the
//! scenarios alternate k times and the medians are reported.
//!
//! Everything the run creates is owned by values that remove it on drop: processes (killed by
//! pid), temp dirs, the namespaces ([`net::Net`]), and the raised neighbour table limits
//! ([`neigh::NeighLimits`], dropped last). A Ctrl-C or SIGTERM drops
//! the run future, so the same cleanup runs; a panic unwinds through the same drops.

pub mod links;
pub mod neigh;
pub mod net;
pub mod report;
pub mod scenario;
pub mod svg;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use shoal_tests::origin::parse_access_line;
use shoal_tests::{AccessEntry, Daemon, ImageKind, ImageSpec, Origin};
use tempfile::TempDir;

use net::{parse_rate, Net, Rate};
use report::{Machine, Report, RunResult, ScenarioResult};
use scenario::{Binaries, Fleet, Place, Scenario, Setup};

/// Repository and tag of the benchmark image.
const REPO: &str = "bench/rollout";
const TAG: &str = "v1";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of nodes (each its own namespace with a containerd, and an agent where the
    /// scenario has one).
    #[arg(long, default_value_t = 20)]
    pub nodes: usize,
    /// Total size of the image's layers, e.g. 256MiB (random, incompressible bytes).
    #[arg(long, default_value = "128MiB", value_parser = crate::parse_size)]
    pub image: u64,
    /// Number of layers the image is split into.
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// The origin's uplink rate (`tc tbf`), e.g. 200mbit.
    #[arg(long, default_value = "200mbit", value_parser = parse_rate)]
    pub origin_rate: Rate,
    /// Each node's link rate, both directions, e.g. 1gbit.
    #[arg(long, default_value = "1gbit", value_parser = parse_rate)]
    pub node_rate: Rate,
    /// Scenarios to run, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "direct,dht,tracker")]
    pub scenario: Vec<Scenario>,
    /// Runs per scenario (scenarios alternate; medians are reported).
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Everything on 127.0.0.1: no namespaces, no shaping, no root needed.
    #[arg(long)]
    pub loopback: bool,
    /// Output path without extension: writes `<out>.json` and `<out>.svg`
    /// [default: target/rollout/rollout-<UTC time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Longest a scenario's pull may take before the nodes still pulling count as failed.
    #[arg(long, default_value_t = 900)]
    pub timeout_secs: u64,
    /// Extra flags for every agent, space-separated, e.g. "--peer-concurrency 8".
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub agent_args: String,
    /// Kill part of the fleet mid-pull (SIGKILL, `--kill-after` seconds into it):
    /// `coordinator` kills the planner of the image's largest layer (in `dht` the agent
    /// XOR-closest to the layer's DHT key, as the agents elect it; in `tracker` the tracker);
    /// a number N kills N randomly chosen nodes (agent and client; the same nodes for the
    /// same run number). Killed nodes are reported apart and left out of the percentiles.
    #[arg(long, value_parser = scenario::parse_kill)]
    pub kill: Option<scenario::KillWhat>,
    /// Seconds into the pull at which `--kill` strikes.
    #[arg(long, default_value_t = 5.0)]
    pub kill_after: f64,
}

/// Runs the benchmark; on Ctrl-C or SIGTERM stops early and cleans up (by dropping it all).
pub async fn main(args: Args) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let res = tokio::select! {
        res = run(args) => res,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted (Ctrl-C)")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated (SIGTERM)")),
        _ = hup.recv() => Err(anyhow::anyhow!("hung up (SIGHUP)")),
    };
    // Whatever the run had started has been dropped (and removed) by now.
    res
}

/// A binary next to this one (the same profile), if it is there.
fn sibling(name: &str) -> Option<PathBuf> {
    let p = std::env::current_exe().ok()?.parent()?.join(name);
    p.is_file().then_some(p)
}

fn binaries() -> Result<Binaries> {
    let agent = match std::env::var_os("SHOAL_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => match sibling("shoal-agent") {
            Some(p) => p,
            None => shoal_tests::agent_binary()?,
        },
    };
    if !agent.is_file() {
        bail!("agent binary {} not found: `cargo build --bins` first", agent.display());
    }
    let target = shoal_tests::util::workspace_dir().join("target");
    let tracker = match std::env::var_os("SHOAL_TRACKER_BIN") {
        Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
        None => sibling("shoal-tracker").or_else(|| {
            ["release", "debug"].iter().map(|p| target.join(p).join("shoal-tracker")).find(|p| p.is_file())
        }),
    };
    Ok(Binaries {
        agent,
        tracker,
        benches: std::env::current_exe().context("locating this binary")?,
        ctr: shoal_tests::util::find_binary("ctr", "containerd")?,
    })
}

/// The origin registry, and how to read what it sent.
enum OriginSide {
    /// `shoal_tests::Origin` on a free loopback port.
    Loopback(Origin),
    /// A `docker-registry` in the origin namespace serving the storage `_pushed` was pushed to
    /// (skopeo runs in the root namespace, which cannot reach the benchmark network, so the
    /// image is pushed to a loopback registry first and the same storage is then served from
    /// the namespace).
    Netns { _pushed: Origin, daemon: Daemon, log: PathBuf, _dir: TempDir },
}

impl OriginSide {
    fn access_log(&self) -> Vec<AccessEntry> {
        match self {
            OriginSide::Loopback(o) => o.access_log(),
            OriginSide::Netns { log, .. } => std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .filter_map(parse_access_line)
                .collect(),
        }
    }

    fn ensure_running(&mut self) -> Result<()> {
        match self {
            OriginSide::Loopback(o) if !o.is_running() => bail!("the origin stopped"),
            OriginSide::Loopback(_) => Ok(()),
            OriginSide::Netns { daemon, .. } => daemon.ensure_running(),
        }
    }
}

/// Bytes of GET responses for content (manifests and blobs) in `entries`.
fn payload_bytes(entries: &[AccessEntry]) -> u64 {
    entries.iter().filter(|e| e.method == "GET" && (e.is_blob() || e.is_manifest())).map(|e| e.bytes).sum()
}

async fn start_netns_origin(net: &Net, pushed: Origin, bins: &Binaries) -> Result<OriginSide> {
    let registry = shoal_tests::util::find_binary("docker-registry", "docker-registry")?;
    let mut pushed = pushed;
    pushed.stop();
    let dir = tempfile::Builder::new().prefix("shoal-rollout-origin-").tempdir()?;
    let config = dir.path().join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 0.0.0.0:5000\n  secret: shoal-bench-secret\n",
            pushed.storage_dir().display()
        ),
    )?;
    let log = dir.path().join("registry.log");
    let mut cmd = net.origin.command(&registry);
    cmd.arg("serve").arg(&config);
    let daemon = Daemon::spawn("docker-registry", cmd, &log)?;
    let side = OriginSide::Netns { _pushed: pushed, daemon, log: log.clone(), _dir: dir };
    // Reachable from a node over the bridge, not just inside its own namespace.
    let url = format!("http://{}:5000/v2/", net::ORIGIN_IP);
    let node0 = net.nodes.first().context("no nodes")?;
    let mut cmd = node0.command(&bins.benches);
    cmd.args(["probe", &url, "--timeout-ms", "20000"]);
    let out = shoal_tests::process::run_bounded(cmd, Duration::from_secs(25)).await?;
    if !out.success() {
        bail!(
            "the origin is not reachable from node 0 at {url}: {}\norigin log:\n{}",
            out.stderr.trim(),
            shoal_tests::util::tail_file(&log, 3000)
        );
    }
    Ok(side)
}

/// Origin egress so far: (interface tx bytes where measured, access log entries).
fn egress_mark(net: Option<&Net>, origin: &OriginSide) -> Result<(Option<u64>, usize)> {
    Ok((net.map(Net::origin_tx_bytes).transpose()?, origin.access_log().len()))
}

/// Waits until the origin has stopped sending (tx counter and access log unchanged for
/// 500 ms, at most 10 s: the last access-log line trails the last byte), then returns the
/// egress since `mark` as (wire bytes, payload bytes).
async fn egress_since(
    net: Option<&Net>,
    origin: &OriginSide,
    mark: (Option<u64>, usize),
) -> Result<(Option<u64>, u64)> {
    let mut last = egress_mark(net, origin)?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = egress_mark(net, origin)?;
        if now == last {
            break;
        }
        last = now;
    }
    let wire = last.0.zip(mark.0).map(|(a, b)| a - b);
    let entries = origin.access_log();
    Ok((wire, payload_bytes(entries.get(mark.1..).unwrap_or(&[]))))
}

/// Layer sizes summing to `total`: equal parts, the remainder on the first.
fn layer_sizes(total: u64, layers: usize) -> Vec<u64> {
    let each = total / layers as u64;
    let mut v = vec![each; layers];
    v[0] += total - each * layers as u64;
    v
}

pub async fn run(args: Args) -> Result<()> {
    if args.nodes == 0 || args.nodes > 1000 {
        bail!("--nodes must be 1..=1000");
    }
    if args.layers == 0 || args.image < args.layers as u64 {
        bail!("--layers must be at least 1 and at most the image size in bytes");
    }
    if !(args.kill_after.is_finite() && args.kill_after >= 0.0) {
        bail!("--kill-after must be a number of seconds, 0 or more");
    }
    match args.kill {
        Some(scenario::KillWhat::Nodes(k)) if k >= args.nodes => {
            bail!("--kill {k}: at least one of the {} nodes must survive", args.nodes)
        }
        Some(scenario::KillWhat::Coordinator) if args.scenario.contains(&Scenario::Direct) => {
            bail!("--kill coordinator: the direct scenario has no coordinator (choose dht and/or tracker)")
        }
        _ => {}
    }
    let bins = binaries()?;
    let scenarios: Vec<Scenario> = {
        let mut v = args.scenario.clone();
        v.dedup();
        v
    };
    let agent_args: Vec<String> = args.agent_args.split_whitespace().map(str::to_string).collect();
    let started = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let date = report::utc_timestamp(started);

    // Raised before the namespaces exist and restored after they are gone (declared first,
    // dropped last): 40+ meshed agents overflow the kernel's default ARP table ([`neigh`]).
    let _neigh = if args.loopback {
        None
    } else {
        match neigh::restore_stale() {
            Ok(Some(v)) => eprintln!("restored neighbour table limits an earlier run left raised: {v}"),
            Ok(None) => {}
            Err(e) => eprintln!("could not check for neighbour table limits left raised: {e:#}"),
        }
        let guard = neigh::NeighLimits::raise().context("raising the kernel's neighbour table limits")?;
        match &guard {
            Some(g) => eprintln!("{}", g.describe()),
            None => eprintln!(
                "neighbour table limits (net.ipv4.neigh.default.gc_thresh1/2/3) already at or above {:?}: unchanged",
                neigh::TARGET
            ),
        }
        guard
    };
    // Declared before the processes so it is dropped after them: every process in a
    // namespace is gone by then.
    let net = if args.loopback {
        None
    } else {
        match net::remove_stale() {
            Ok(stale) if !stale.is_empty() => eprintln!("removed namespaces of an earlier run: {stale:?}"),
            Ok(_) => {}
            Err(e) => eprintln!("could not list namespaces: {e:#}"),
        }
        eprintln!(
            "creating {} node namespaces (origin {}, node {})",
            args.nodes, args.origin_rate, args.node_rate
        );
        let net = Net::create(args.nodes, args.origin_rate, args.node_rate)?;
        eprintln!("namespaces and interfaces are named {}*", net.prefix());
        Some(net)
    };

    eprintln!("building and pushing a {} byte image in {} layers", args.image, args.layers);
    let pushed = Origin::start().await?;
    let spec =
        ImageSpec::new(ImageKind::OciManifest, REPO, TAG).layers(&layer_sizes(args.image, args.layers));
    let image = pushed.push(&spec).await.context("pushing the benchmark image")?;
    let image_bytes = image.total_blob_bytes() + image.manifest.bytes.len() as u64;
    let (mut origin, origin_host, places, tracker_place) = match &net {
        None => {
            let host = pushed.host();
            (OriginSide::Loopback(pushed), host, vec![Place::Loopback; args.nodes], Place::Loopback)
        }
        Some(net) => (
            start_netns_origin(net, pushed, &bins).await?,
            format!("{}:5000", net::ORIGIN_IP),
            net.nodes.iter().cloned().map(Place::Netns).collect(),
            Place::Netns(net.tracker.clone()),
        ),
    };
    let reference = format!("{origin_host}/{REPO}:{TAG}");
    let largest_layer = image.largest_layer().digest.clone();
    let t_min = (!args.loopback).then(|| {
        let rate = args.origin_rate.bytes_per_sec().min(args.node_rate.bytes_per_sec());
        image_bytes as f64 / rate
    });

    let mut runs: Vec<(Scenario, Vec<RunResult>)> = scenarios.iter().map(|s| (*s, Vec::new())).collect();
    let mut skipped: Vec<(Scenario, String)> = Vec::new();
    if scenarios.contains(&Scenario::Tracker) && bins.tracker.is_none() {
        let why = "no shoal-tracker binary (set SHOAL_TRACKER_BIN or build it)".to_string();
        eprintln!("note: skipping the tracker scenario: {why}");
        skipped.push((Scenario::Tracker, why));
    }
    for round in 0..args.runs.max(1) {
        for (scenario, results) in runs.iter_mut() {
            if skipped.iter().any(|(s, _)| s == scenario) {
                continue;
            }
            origin.ensure_running()?;
            let scratch = tempfile::Builder::new().prefix("shoal-rollout-").tempdir()?;
            let setup = Setup {
                bins: &bins,
                nodes: &places,
                tracker_place: &tracker_place,
                origin_host: origin_host.clone(),
                reference: reference.clone(),
                agent_args: &agent_args,
                dir: scratch.path(),
                timeout: Duration::from_secs(args.timeout_secs),
                kill: args.kill.map(|what| scenario::Kill {
                    what,
                    after: Duration::from_secs_f64(args.kill_after),
                    digest: largest_layer.clone(),
                    round,
                }),
            };
            eprintln!("run {}: {}: starting {} node(s)", round + 1, scenario.name(), args.nodes);
            let mut fleet = Fleet::start(&setup, *scenario).await?;
            let mark = egress_mark(net.as_ref(), &origin)?;
            eprintln!("run {}: {}: pulling", round + 1, scenario.name());
            let cpu_before = report::cpu_ticks();
            let sampler = net.as_ref().map(links::LinkSampler::start);
            let (nodes, killed) = fleet.pull_all(&setup).await?;
            for k in &killed {
                eprintln!("run {}: {}: killed {} at {:.1} s", round + 1, scenario.name(), k.what, k.at_s);
            }
            let cpu = cpu_before.zip(report::cpu_ticks()).and_then(|(a, b)| report::cpu_shares(a, b));
            let (wire, payload) = egress_since(net.as_ref(), &origin, mark).await?;
            let mut result = RunResult::new(nodes, wire, payload);
            result.killed = killed;
            result.cpu_busy = cpu.map(|c| c.0);
            result.cpu_iowait = cpu.map(|c| c.1);
            result.utilisation = sampler.and_then(|s| {
                s.finish(&result.node_seconds, args.node_rate.0 as f64, args.origin_rate.0 as f64)
            });
            if let Some(t) = fleet.agents_received(&setup).await {
                result.agents_received_from_origin = Some(t.from_origin);
                result.agents_received_from_peers = Some(t.from_peers);
                result.agents_unowned_origin_pieces = Some(t.unowned_pieces);
                let delivered_mib = (result.completed() * image_bytes as usize) as f64 / (1 << 20) as f64;
                let seconds = result.max_s.unwrap_or(0.0);
                result.agent_costs =
                    Some(report::AgentCosts::of(&t, result.survivors(), seconds, delivered_mib));
            }
            eprintln!(
                "run {}: {}: {}/{} done{}, max {:.1} s, origin egress {:.3}× image, CPU busy {:.0}% \
                 (iowait {:.0}%), {} agents alive, {} origin pieces taken over or unplanned",
                round + 1,
                scenario.name(),
                result.completed(),
                result.survivors(),
                match result.killed_nodes() {
                    0 => String::new(),
                    k => format!(" ({k} killed)"),
                },
                result.max_s.unwrap_or(f64::NAN),
                result.origin_egress_bytes as f64 / image_bytes as f64,
                result.cpu_busy.unwrap_or(f64::NAN) * 100.0,
                result.cpu_iowait.unwrap_or(f64::NAN) * 100.0,
                fleet.agents_alive(),
                result.agents_unowned_origin_pieces.map_or("no".to_string(), |n| n.to_string()),
            );
            if let Some(c) = &result.agent_costs {
                eprintln!(
                    "run {}: {}: per node per s: DHT requests received {:.1}, sent {:.1}; busiest \
                     coordinator {:.1} plans/s; agent CPU {:.3} s per MiB delivered",
                    round + 1,
                    scenario.name(),
                    c.dht_requests_received_per_node_per_s,
                    c.dht_requests_sent_per_node_per_s,
                    c.plans_of_busiest_coordinator_per_s,
                    c.cpu_seconds_per_mib,
                );
            }
            if let Some(u) = &result.utilisation {
                let p = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{:.0}%", v * 100.0));
                eprintln!(
                    "run {}: {}: links busy (of the node rate), median node: upload {}, download {}",
                    round + 1,
                    scenario.name(),
                    p(u.up_busy_share_per_node.p50),
                    p(u.down_busy_share_per_completed_node.p50),
                );
            }
            if !result.errors.is_empty() {
                eprintln!("failures:\n  {}\n{}", result.errors.join("\n  "), fleet.diagnostics());
            }
            results.push(result);
        }
    }
    drop(origin);

    let mut report = Report {
        date,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::probe(),
        mode: if args.loopback { "loopback" } else { "netns" },
        nodes: args.nodes,
        image_bytes,
        layers: args.layers,
        origin_rate_bps: (!args.loopback).then_some(args.origin_rate.0),
        node_rate_bps: (!args.loopback).then_some(args.node_rate.0),
        t_min_s: t_min,
        client: "ctr content fetch (hosts.toml)",
        runs_per_scenario: args.runs.max(1),
        scenarios: runs
            .into_iter()
            .map(|(s, r)| match skipped.iter().find(|(k, _)| *k == s) {
                Some((_, why)) => ScenarioResult::skipped(s, why.clone()),
                None => ScenarioResult::from_runs(s, r, image_bytes, t_min),
            })
            .collect(),
    };
    report.finish();
    let out = match &args.out {
        Some(p) => p.clone(),
        None => shoal_tests::util::workspace_dir()
            .join("target/rollout")
            .join(format!("rollout-{}", report.date.replace(':', ""))),
    };
    write_outputs(&report, &out)?;
    println!("{}", report.table());
    println!("wrote {} and {}", out.with_extension("json").display(), out.with_extension("svg").display());
    Ok(())
}

fn write_outputs(report: &Report, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let json = out.with_extension("json");
    std::fs::write(&json, serde_json::to_vec_pretty(report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let svg = out.with_extension("svg");
    std::fs::write(&svg, svg::render(report)).with_context(|| format!("writing {}", svg.display()))?;
    Ok(())
}

/// `probe URL`: GET until 200 (bounded), print the body. Runs inside a namespace for the
/// controller, which cannot reach the benchmark network from the root namespace.
pub async fn probe(url: &str, timeout: Duration) -> Result<()> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(5))
        .build()?;
    let body = shoal_tests::poll_until(
        &format!("GET {url} to answer 200"),
        timeout,
        Duration::from_millis(100),
        || {
            let req = client.get(url).send();
            async move {
                Ok(match req.await {
                    Ok(resp) if resp.status() == 200 => resp.text().await.ok(),
                    _ => None,
                })
            }
        },
    )
    .await?;
    print!("{body}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_sum_to_the_image() {
        assert_eq!(layer_sizes(10, 3), vec![4, 3, 3]);
        assert_eq!(layer_sizes(8 << 20, 2).iter().sum::<u64>(), 8 << 20);
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("200mbit"), Ok(Rate(200_000_000)));
        assert_eq!(parse_rate("1gbit"), Ok(Rate(1_000_000_000)));
        assert_eq!(parse_rate("1.5Gbit"), Ok(Rate(1_500_000_000)));
        assert!(parse_rate("0mbit").is_err());
        assert!(parse_rate("fast").is_err());
        assert_eq!(Rate(200_000_000).to_string(), "200mbit");
        assert_eq!(node_ip_s(0), "198.18.1.1");
        assert_eq!(node_ip_s(250), "198.18.2.1");
    }

    fn node_ip_s(i: usize) -> String {
        net::node_ip(i).to_string()
    }
}
