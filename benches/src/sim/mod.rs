//! `sim`: the rollout of `rollout`, simulated: N nodes in virtual time, a flow-level network,
//! a model of libp2p's DHT with its real limits, and the tracker's real, pure `State`.
//!
//! The netns benchmark (`rollout`) runs real agents but stops at ~80 nodes on one machine;
//! Shoal is for clusters of thousands. This simulator answers "what happens at 1,000-10,000
//! nodes" for the decisions that matter at that scale (who fetches what from the origin,
//! whom a node asks, how many messages that costs, what they cost in CPU), and is compared
//! with recorded `rollout` figures at 10-80 nodes (`benches/README.md`, "Costs charged, and
//! calibration").
//!
//! Parts ([`world`] wires them):
//! - [`flow`]: the network: per-host up and down capacity, the origin's uplink, fair sharing
//!   of each link among its flows (a documented approximation of max-min), RTT.
//! - [`dht`]: provider records on the K = 20 closest nodes, 20 providers per key kept first
//!   come first kept (libp2p-kad's `MemoryStore`), lookups of ⌈log2 N⌉ round trips.
//! - the planner: `shoal_plan::State` itself (the tracker's and every coordinating agent's),
//!   fed the plan requests (and, with a tracker, the heartbeats) the agents send, its CPU
//!   time per plan measured with the thread CPU clock. With a tracker one `State` plans every
//!   layer; in DHT mode each layer's coordinator (the alive node closest to the layer's key,
//!   found with one lookup per download, the next closest when it is gone) runs its own.
//! - [`sched`]: each download: the start-up steps of the agent's download task (lookup,
//!   `Have`, HEAD), then the agent's own pure scheduler
//!   (`shoal_agent::fetch::scheduler::Scheduler`), unchanged: every decision of a simulated
//!   node is the agent's code.
//!
//! - [`cost`]: what each action of an agent costs in CPU time (measured: the `costs` micro
//!   benchmark), and each node's CPU as a queue of `--cores-per-node`: a busy node answers
//!   late, and late past the request timeout is a timeout.
//!
//! Not modelled (written next to every figure): disk, the kernel (TCP slow start and loss,
//! tbf queueing, neighbour tables), containerd and `ctr` (their CPU: in the netns runs they
//! took ~36 % of the machine, the agents ~58 %), and the manifest/config round trips before
//! the layers (microseconds of bytes).
//!
//! Determinism: the same flags and `--seed` give byte-identical JSON apart from `date`,
//! `command`, `machine` and every `measured` object (wall-clock and CPU time).

pub mod cost;
pub mod dht;
pub mod flow;
pub mod sched;
pub mod world;

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::rollout::links::Spread;
use crate::rollout::net::{parse_rate, Rate};
use crate::rollout::report::{Machine, Report, RunResult, ScenarioResult};
use crate::rollout::scenario::Scenario;
use flow::NS;
use sched::MS;
use world::{Config, Outcome, World};

/// Which scheduler every simulated node runs (reported in the JSON and the table).
pub const SCHEDULER: &str = "shoal_agent::fetch::scheduler::Scheduler (the agent's own)";

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Number of simulated nodes.
    #[arg(long, default_value_t = 20)]
    pub nodes: usize,
    /// Total size of the image's layers, e.g. 1GiB.
    #[arg(long, default_value = "128MiB", value_parser = crate::parse_size)]
    pub image: u64,
    /// Number of layers (equal parts; the remainder on the first, as `rollout` does).
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
    /// The origin's uplink rate, e.g. 1gbit.
    #[arg(long, default_value = "200mbit", value_parser = parse_rate)]
    pub origin_rate: Rate,
    /// Each node's link rate, both directions, e.g. 10gbit.
    #[arg(long, default_value = "1gbit", value_parser = parse_rate)]
    pub node_rate: Rate,
    /// Scenarios to simulate, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "direct,dht,tracker")]
    pub scenario: Vec<Scenario>,
    /// Seed of every random choice (node identities, start times, latencies, churn).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Round-trip time between any two hosts, in milliseconds.
    #[arg(long, default_value_t = 1.0)]
    pub rtt_ms: f64,
    /// Round trips per DHT lookup or announcement [default: ⌈log2 nodes⌉].
    #[arg(long)]
    pub dht_hops: Option<u32>,
    /// Nodes start pulling at uniformly random times within this many milliseconds.
    #[arg(long, default_value_t = 100)]
    pub start_spread_ms: u64,
    /// Kill this percentage of the nodes at random times between 10 % and 70 % of T_min.
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Piece uploads a node serves at once; more requests are answered `Busy` (the agent's
    /// limit).
    #[arg(long, default_value_t = 8)]
    pub max_uploads: u32,
    /// Utilisation sampling interval, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub sample_ms: u64,
    /// CPU cores of each node (and of the tracker) for the agent's work; the netns
    /// benchmark's share is 2 cores / N agents (e.g. 0.05 at 40 nodes).
    #[arg(long, default_value_t = 1.0)]
    pub cores_per_node: f64,
    /// What the agent's actions cost: `micro` (the `costs` micro benchmark), `recorded`
    /// (that plus the recorded rollouts' CPU per MiB it does not explain), `none`.
    #[arg(long, value_enum, default_value = "micro")]
    pub costs: cost::CostModel,
    /// Virtual seconds after which nodes still pulling count as failed.
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
    /// Output path without extension: writes `<out>.json` [default: target/sim/sim-<UTC time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn layer_sizes(total: u64, layers: usize) -> Vec<u64> {
    let each = total / layers as u64;
    let mut v = vec![each; layers];
    v[0] += total - each * layers as u64;
    v
}

/// The modelled CPU: busy share (of the rollout) of the busiest and the median node, the
/// tracker's, waits and timeouts.
fn cpu_busy(o: &Outcome) -> Value {
    let mut v = o.cpu_busy.clone();
    v.sort_by(f64::total_cmp);
    let median = if v.is_empty() { 0.0 } else { v[(v.len() - 1) / 2] };
    json!({
        "busiest": v.last().copied().unwrap_or(0.0),
        "median": median,
        "mean": v.iter().sum::<f64>() / v.len().max(1) as f64,
        "tracker": o.tracker_busy,
        "wait_mean_s": o.cpu_wait_mean_s,
        "wait_max_s": o.cpu_wait_max_s,
        "timeouts": o.timeouts,
    })
}

/// Per-node message rates: mean and max over the nodes.
fn messages(o: &Outcome) -> Value {
    let d = o.end_s;
    let rate = |f: &dyn Fn(&world::Msgs) -> u64| {
        let v: Vec<f64> = o.msgs.iter().map(|m| f(m) as f64 / d).collect();
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        json!({ "mean": mean, "max": v.iter().copied().fold(0.0, f64::max) })
    };
    let plans: u64 = o.msgs.iter().map(|m| m.plan_requests).sum();
    json!({
        "per_node_per_s": {
            "dht_sent": rate(&|m| m.dht_sent),
            "dht_received": rate(&|m| m.dht_received),
            "have_sent": rate(&|m| m.have_sent),
            "have_received": rate(&|m| m.have_received),
            "piece_requests_received": rate(&|m| m.piece_requests_received),
            "plan_requests": rate(&|m| m.plan_requests),
            // Plan requests answered as a layer's coordinator (DHT mode; 0 with a tracker).
            "plans_received": rate(&|m| m.plans_received),
        },
        // Every plan request (to the tracker, or to coordinators) per second.
        "tracker_plan_requests_per_s": plans as f64 / d,
        "over_s": d,
    })
}

pub fn run(args: Args) -> Result<()> {
    let (json, table) = simulate(&args)?;
    let out = match &args.out {
        Some(p) => p.clone(),
        None => shoal_tests::util::workspace_dir()
            .join("target/sim")
            .join(format!("sim-{}", json["date"].as_str().unwrap_or("now").replace(':', ""))),
    };
    write_json(&json, &out)?;
    println!("{table}");
    println!("wrote {}", out.with_extension("json").display());
    Ok(())
}

fn write_json(v: &Value, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let path = out.with_extension("json");
    std::fs::write(&path, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Runs every scenario; returns the JSON report and the printed table.
pub fn simulate(args: &Args) -> Result<(Value, String)> {
    if args.nodes == 0 || args.nodes > 100_000 {
        bail!("--nodes must be 1..=100000");
    }
    if args.layers == 0 || args.image < args.layers as u64 {
        bail!("--layers must be at least 1 and at most the image size in bytes");
    }
    if !(0.0..100.0).contains(&args.churn) {
        bail!("--churn must be a percentage below 100");
    }
    if args.rtt_ms.is_nan() || args.rtt_ms < 0.0 || args.sample_ms == 0 {
        bail!("--rtt-ms must be >= 0 and --sample-ms > 0");
    }
    if !(args.cores_per_node > 0.0 && args.cores_per_node.is_finite()) {
        bail!("--cores-per-node must be a positive number");
    }
    let started_wall = Instant::now();
    let started = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let sizes = layer_sizes(args.image, args.layers);
    let image_bytes: u64 = sizes.iter().sum();
    let t_min = image_bytes as f64 / args.origin_rate.bytes_per_sec().min(args.node_rate.bytes_per_sec());
    let hops = args.dht_hops.unwrap_or_else(|| dht::default_hops(args.nodes));
    let mut scenarios: Vec<Scenario> = args.scenario.clone();
    scenarios.dedup();

    let mut results = Vec::new();
    let mut extras = Vec::new();
    for &scenario in &scenarios {
        let cfg = Config {
            scenario,
            nodes: args.nodes,
            layer_sizes: sizes.clone(),
            origin_rate: args.origin_rate.0 as f64,
            node_rate: args.node_rate.0 as f64,
            rtt: (args.rtt_ms * MS as f64).round() as u64,
            dht_hops: hops,
            start_spread: args.start_spread_ms * MS,
            churn_pct: args.churn,
            seed: args.seed,
            sample: args.sample_ms * MS,
            max_time: args.timeout_secs * 1000 * MS,
            sched: shoal_agent::fetch::scheduler::Config::default(),
            max_uploads: args.max_uploads.max(1),
            costs: args.costs.costs().for_nodes(args.nodes),
            cores: args.cores_per_node,
        };
        eprintln!("sim: {}: {} nodes", scenario.name(), args.nodes);
        let wall = Instant::now();
        let cpu0 = world::thread_cpu_ns();
        let o = World::new(cfg).run();
        let wall_s = wall.elapsed().as_secs_f64();
        // This thread's CPU time: what the run cost, whatever else shares the machine.
        let cpu_s = world::thread_cpu_ns().saturating_sub(cpu0) as f64 / 1e9;
        let run = RunResult::new(
            o.nodes.iter().cloned().map(Into::into).collect(),
            None,
            o.origin_bytes.round() as u64,
        );
        for f in o.failures.iter().take(10) {
            eprintln!("sim: {}: download failed: {f}", scenario.name());
        }
        eprintln!("sim: {}: origin piece requests: {:?}", scenario.name(), o.origin_why);
        eprintln!(
            "sim: {}: {}/{} done, p99 {:.1} s, origin egress {:.3}× image, {} events, {:.1} s wall, {:.1} s CPU",
            scenario.name(),
            run.completed(),
            args.nodes,
            run.p99_s.unwrap_or(f64::NAN),
            o.origin_bytes / image_bytes as f64,
            o.events,
            wall_s,
            cpu_s
        );
        let busy = cpu_busy(&o);
        let m = messages(&o);
        let rates = &m["per_node_per_s"];
        eprintln!(
            "sim: {}: per node per s (mean, max): DHT received {:.1}, {:.1}; Have received {:.1}, {:.1}; plans answered {:.1}, {:.1}; \
             CPU busy share busiest {:.3}, median {:.3}{}; CPU wait mean {:.3} s, max {:.1} s; timeouts {:?}",
            scenario.name(),
            rates["dht_received"]["mean"].as_f64().unwrap_or(0.0),
            rates["dht_received"]["max"].as_f64().unwrap_or(0.0),
            rates["have_received"]["mean"].as_f64().unwrap_or(0.0),
            rates["have_received"]["max"].as_f64().unwrap_or(0.0),
            rates["plans_received"]["mean"].as_f64().unwrap_or(0.0),
            rates["plans_received"]["max"].as_f64().unwrap_or(0.0),
            busy["busiest"].as_f64().unwrap_or(0.0),
            busy["median"].as_f64().unwrap_or(0.0),
            o.tracker_busy.map_or(String::new(), |t| format!(", tracker {t:.3}")),
            o.cpu_wait_mean_s,
            o.cpu_wait_max_s,
            o.timeouts,
        );
        let cpu = o.tracker_cpu.map(|c| {
            json!({
                "plans": c.plans,
                "cpu_s_total": c.plan_cpu_ns as f64 / 1e9,
                "cpu_us_per_plan_mean": if c.plans > 0 { c.plan_cpu_ns as f64 / c.plans as f64 / 1e3 } else { 0.0 },
                "cpu_us_per_plan_max": c.max_plan_cpu_ns as f64 / 1e3,
                "cores_needed_at_this_plan_rate": c.plan_cpu_ns as f64 / 1e9 / o.end_s,
                "heartbeats": c.heartbeats,
                "heartbeat_cpu_s_total": c.heartbeat_cpu_ns as f64 / 1e9,
                "tick_cpu_s_total": c.tick_cpu_ns as f64 / 1e9,
            })
        });
        extras.push(json!({
            "scheduler": if scenario == Scenario::Direct { "none (direct)" } else { SCHEDULER },
            "killed": o.killed,
            "survivors_completed": run.completed(),
            "events": o.events,
            "rollout_end_s": o.end_s,
            "peer_piece_bytes": o.peer_piece_bytes,
            "origin_requests": o.origin_why,
            "tracker_refused": o.tracker_refused,
            "download_failures": o.failures,
            "messages": m,
            "cpu": busy,
            "utilisation": {
                "up_busy_share_per_node": Spread::of(&o.up_util),
                "down_busy_share_per_completed_node": Spread::of(&o.down_util),
                "samples": o.samples,
            },
            "measured": {
                "wall_s": wall_s,
                "cpu_s": cpu_s,
                "tracker_cpu": cpu,
            },
        }));
        results.push(ScenarioResult::from_runs(scenario, vec![run], image_bytes, Some(t_min)));
    }

    let mut report = Report {
        date: crate::rollout::report::utc_timestamp(started),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: Machine::probe(),
        mode: "sim",
        nodes: args.nodes,
        image_bytes,
        layers: args.layers,
        origin_rate_bps: Some(args.origin_rate.0),
        node_rate_bps: Some(args.node_rate.0),
        t_min_s: Some(t_min),
        client: "simulated: every layer requested at the node's start time",
        runs_per_scenario: 1,
        scenarios: results,
    };
    report.finish();
    let mut table = report.table();
    table.push_str(&format!(
        "\nsimulated (seed {}, RTT {} ms, DHT {hops} hops, start spread {} ms, churn {} %); scheduler: {SCHEDULER}\n\
         CPU: {} cores per node, costs `{}` (benches/src/sim/cost.rs); not modelled: disk, kernel (TCP dynamics, tbf queues, ARP), containerd\n\n",
        args.seed, args.rtt_ms, args.start_spread_ms, args.churn, args.cores_per_node, args.costs.name()
    ));
    table.push_str(
        "| scenario | killed | DHT req recv /node/s (mean, max) | Have recv /node/s (mean, max) | plan req /s (all) | plans /s of the busiest coordinator | planner CPU µs/plan | planner cores | up busy p50 | CPU busy (busiest, median) | timeouts | wall s | sim CPU s |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for (s, x) in scenarios.iter().zip(&extras) {
        let m = &x["messages"]["per_node_per_s"];
        let f = |v: &Value| v.as_f64().map_or("–".to_string(), |v| format!("{v:.1}"));
        let cpu = &x["measured"]["tracker_cpu"];
        table.push_str(&format!(
            "| {} | {} | {}, {} | {}, {} | {} | {} | {} | {} | {} | {:.3}, {:.3} | {} | {} | {} |\n",
            s.name(),
            x["killed"],
            f(&m["dht_received"]["mean"]),
            f(&m["dht_received"]["max"]),
            f(&m["have_received"]["mean"]),
            f(&m["have_received"]["max"]),
            f(&x["messages"]["tracker_plan_requests_per_s"]),
            f(&m["plans_received"]["max"]),
            f(&cpu["cpu_us_per_plan_mean"]),
            cpu["cores_needed_at_this_plan_rate"].as_f64().map_or("–".into(), |v| format!("{v:.3}")),
            x["utilisation"]["up_busy_share_per_node"]["p50"]
                .as_f64()
                .map_or("–".into(), |v| format!("{v:.2}")),
            x["cpu"]["busiest"].as_f64().unwrap_or(0.0),
            x["cpu"]["median"].as_f64().unwrap_or(0.0),
            {
                let t = &x["cpu"]["timeouts"];
                ["have", "piece", "plan", "dht"].iter().map(|k| t[k].as_u64().unwrap_or(0)).sum::<u64>()
            },
            f(&x["measured"]["wall_s"]),
            f(&x["measured"]["cpu_s"]),
        ));
    }

    let mut json = serde_json::to_value(&report)?;
    if let Some(list) = json["scenarios"].as_array_mut() {
        for (s, x) in list.iter_mut().zip(extras) {
            if let (Some(obj), Value::Object(extra)) = (s.as_object_mut(), x) {
                obj.extend(extra);
            }
        }
    }
    json["simulator"] = json!({
        "seed": args.seed,
        "rtt_ms": args.rtt_ms,
        "dht_hops": hops,
        "dht_replication": dht::REPLICATION,
        "dht_max_providers_per_key": dht::MAX_PROVIDERS_PER_KEY,
        "start_spread_ms": args.start_spread_ms,
        "churn_pct": args.churn,
        "sample_ms": args.sample_ms,
        "scheduler": SCHEDULER,
        "sharing": "each link split equally among its flows; a flow runs at the smaller of its two shares",
        "cores_per_node": args.cores_per_node,
        "costs": args.costs.name(),
        "cost_ns": args.costs.costs().for_nodes(args.nodes),
        "not_modelled": ["disk", "kernel (TCP dynamics, tbf queueing, neighbour tables)", "containerd", "manifest and config requests"],
    });
    json["measured"] = json!({ "wall_s": started_wall.elapsed().as_secs_f64() });
    let _ = NS;
    Ok((json, table))
}
