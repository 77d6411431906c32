//! Results: per-node completion times, percentiles, the physical lower bound, the ratios the
//! issue asks for, the JSON file and the printed table.
//!
//! Definitions (also in `benches/README.md`):
//! - percentiles are nearest-rank over the nodes' completion times (with 20 nodes p99 is the
//!   slowest node, the honest reading of "p99" for a fleet that small);
//! - `T_min` = image bytes / min(origin rate, node rate): no node can finish sooner, since every
//!   byte must cross the origin's uplink once and every node's link once;
//! - egress ratio = bytes the origin's interface sent during the scenario / image bytes;
//! - speed-up vs `direct` = direct's rollout time (slowest node) / this scenario's.

use serde::Serialize;

use super::scenario::Scenario;

/// Nearest-rank percentile of sorted `v` (`p` in 0..=100); `None` for an empty slice.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    percentile(&s, 50.0)
}

/// How one node's pull ended.
#[derive(Debug, Clone, PartialEq)]
pub enum NodeOutcome {
    /// Completed, this many seconds after the common start.
    Done(f64),
    /// Failed, and why.
    Failed(String),
    /// `--kill` killed the node mid-pull: neither a completion nor a failure.
    Killed,
}

impl From<Result<f64, String>> for NodeOutcome {
    fn from(r: Result<f64, String>) -> NodeOutcome {
        r.map_or_else(NodeOutcome::Failed, NodeOutcome::Done)
    }
}

/// Something `--kill` killed: a node (its agent and its client) or the tracker.
#[derive(Debug, Clone, Serialize)]
pub struct Killed {
    /// The node's index; `None` for the tracker.
    pub node: Option<usize>,
    /// What it was, e.g. "agent 7 (coordinator of sha256:…)".
    pub what: String,
    /// Seconds after the common start.
    pub at_s: f64,
}

/// One pull of the image by every node.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Completion time of each node in seconds from the common start; `None` if it failed
    /// or was killed.
    pub node_seconds: Vec<Option<f64>>,
    /// Why nodes failed (empty when all completed; killed nodes are not failures).
    pub errors: Vec<String>,
    /// What `--kill` killed during the pull.
    pub killed: Vec<Killed>,
    pub p50_s: Option<f64>,
    pub p90_s: Option<f64>,
    pub p99_s: Option<f64>,
    pub max_s: Option<f64>,
    /// Bytes the origin's interface sent during the run (frames, headers included); `None` in
    /// loopback mode, where the interface is shared with everything else.
    pub origin_wire_bytes: Option<u64>,
    /// Response bytes the origin wrote for manifest and blob GETs, from its own access log.
    pub origin_payload_bytes: u64,
    /// The egress figure the ratio uses: wire bytes where measured, else payload bytes.
    pub origin_egress_bytes: u64,
    /// Share of the machine's CPU time that was busy (not idle, not I/O wait) during the pull.
    pub cpu_busy: Option<f64>,
    /// Share spent waiting for I/O.
    pub cpu_iowait: Option<f64>,
    /// What the agents say they received, summed (`shoal_received_bytes_total` by source): a
    /// diagnostic next to the origin-side figure, never a substitute for it.
    pub agents_received_from_origin: Option<f64>,
    pub agents_received_from_peers: Option<f64>,
    /// Origin pieces the agents fetched although another node owned them (takeovers) or
    /// outside a tracker plan: where duplicate origin bytes come from.
    pub agents_unowned_origin_pieces: Option<f64>,
    /// The agents' message costs over the pull: DHT requests received and sent per node per
    /// second, plan requests the busiest coordinator answered per second, agent CPU seconds
    /// per MiB delivered to the nodes (the pull's duration is the slowest node's).
    pub agent_costs: Option<AgentCosts>,
    /// Per-node link use over the pull, sampled from the bridge ports (namespaces only).
    pub utilisation: Option<super::links::Utilisation>,
}

/// What the agents' work cost during one run (see [`RunResult::agent_costs`]). Counters
/// run from each agent's start, so start-up (bootstrap, the first DHT walks) is included.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct AgentCosts {
    pub dht_requests_received_per_node_per_s: f64,
    pub dht_requests_sent_per_node_per_s: f64,
    pub plans_of_busiest_coordinator_per_s: f64,
    pub cpu_seconds_per_mib: f64,
}

impl AgentCosts {
    /// From the agents' totals, over `seconds` of pull, `nodes` agents, `mib` delivered.
    pub fn of(t: &super::scenario::AgentTotals, nodes: usize, seconds: f64, mib: f64) -> AgentCosts {
        let per_node_s = (nodes as f64 * seconds).max(1e-9);
        AgentCosts {
            dht_requests_received_per_node_per_s: t.dht_requests_received / per_node_s,
            dht_requests_sent_per_node_per_s: t.dht_requests_sent / per_node_s,
            plans_of_busiest_coordinator_per_s: t.busiest_coordinator_plans / seconds.max(1e-9),
            cpu_seconds_per_mib: t.cpu_seconds / mib.max(1e-9),
        }
    }
}

impl RunResult {
    pub fn new(
        node_results: Vec<NodeOutcome>,
        origin_wire_bytes: Option<u64>,
        origin_payload_bytes: u64,
    ) -> RunResult {
        let node_seconds: Vec<Option<f64>> = node_results
            .iter()
            .map(|r| match r {
                NodeOutcome::Done(s) => Some(*s),
                _ => None,
            })
            .collect();
        let errors = node_results
            .into_iter()
            .filter_map(|r| match r {
                NodeOutcome::Failed(e) => Some(e),
                _ => None,
            })
            .collect();
        let mut done: Vec<f64> = node_seconds.iter().flatten().copied().collect();
        done.sort_by(|a, b| a.total_cmp(b));
        // A failed node never finished: the percentiles cover completed nodes only and the
        // failure count is reported next to them.
        RunResult {
            p50_s: percentile(&done, 50.0),
            p90_s: percentile(&done, 90.0),
            p99_s: percentile(&done, 99.0),
            max_s: done.last().copied(),
            node_seconds,
            errors,
            killed: Vec::new(),
            origin_egress_bytes: origin_wire_bytes.unwrap_or(origin_payload_bytes),
            origin_wire_bytes,
            origin_payload_bytes,
            cpu_busy: None,
            cpu_iowait: None,
            agents_received_from_origin: None,
            agents_received_from_peers: None,
            agents_unowned_origin_pieces: None,
            agent_costs: None,
            utilisation: None,
        }
    }

    pub fn completed(&self) -> usize {
        self.node_seconds.iter().flatten().count()
    }

    /// Nodes `--kill` killed (the tracker is not a node).
    pub fn killed_nodes(&self) -> usize {
        self.killed.iter().filter(|k| k.node.is_some()).count()
    }

    /// Nodes expected to complete: all but the killed ones.
    pub fn survivors(&self) -> usize {
        self.node_seconds.len() - self.killed_nodes()
    }
}

/// A scenario's runs and their medians.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    /// Set when the scenario was not run (e.g. no tracker binary); `runs` is empty then.
    pub skipped: Option<String>,
    pub runs: Vec<RunResult>,
    /// Medians over runs.
    pub p50_s: Option<f64>,
    pub p90_s: Option<f64>,
    pub p99_s: Option<f64>,
    pub max_s: Option<f64>,
    pub origin_egress_bytes: Option<u64>,
    pub egress_ratio: Option<f64>,
    pub payload_ratio: Option<f64>,
    pub p99_over_t_min: Option<f64>,
    pub speedup_vs_direct: Option<f64>,
    pub cpu_busy: Option<f64>,
    /// Nodes that completed, summed over runs, and how many pulls there were (killed
    /// nodes' pulls not counted; they are in `killed`).
    pub completed: usize,
    pub pulls: usize,
    pub killed: usize,
}

impl ScenarioResult {
    pub fn skipped(scenario: Scenario, why: String) -> ScenarioResult {
        ScenarioResult {
            scenario,
            skipped: Some(why),
            runs: Vec::new(),
            p50_s: None,
            p90_s: None,
            p99_s: None,
            max_s: None,
            origin_egress_bytes: None,
            egress_ratio: None,
            payload_ratio: None,
            p99_over_t_min: None,
            speedup_vs_direct: None,
            cpu_busy: None,
            completed: 0,
            pulls: 0,
            killed: 0,
        }
    }

    pub fn from_runs(scenario: Scenario, runs: Vec<RunResult>, image_bytes: u64, t_min: Option<f64>) -> Self {
        let med =
            |f: &dyn Fn(&RunResult) -> Option<f64>| median(&runs.iter().filter_map(f).collect::<Vec<_>>());
        let egress = med(&|r| Some(r.origin_egress_bytes as f64));
        let payload = med(&|r| Some(r.origin_payload_bytes as f64));
        let p99 = med(&|r| r.p99_s);
        ScenarioResult {
            scenario,
            skipped: None,
            p50_s: med(&|r| r.p50_s),
            p90_s: med(&|r| r.p90_s),
            p99_s: p99,
            max_s: med(&|r| r.max_s),
            origin_egress_bytes: egress.map(|e| e.round() as u64),
            egress_ratio: egress.map(|e| e / image_bytes as f64),
            payload_ratio: payload.map(|p| p / image_bytes as f64),
            p99_over_t_min: p99.zip(t_min).map(|(p, t)| p / t),
            speedup_vs_direct: None,
            cpu_busy: med(&|r| r.cpu_busy),
            completed: runs.iter().map(RunResult::completed).sum(),
            pulls: runs.iter().map(RunResult::survivors).sum(),
            killed: runs.iter().map(RunResult::killed_nodes).sum(),
            runs,
        }
    }
}

/// The whole benchmark result, as written to JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// UTC, `YYYY-MM-DDTHH:MM:SSZ`.
    pub date: String,
    /// The command line that produced it.
    pub command: String,
    pub machine: Machine,
    pub mode: &'static str,
    pub nodes: usize,
    pub image_bytes: u64,
    pub layers: usize,
    /// Bits per second; `None` in loopback mode.
    pub origin_rate_bps: Option<u64>,
    pub node_rate_bps: Option<u64>,
    /// Seconds; `None` in loopback mode (no rates).
    pub t_min_s: Option<f64>,
    pub client: &'static str,
    pub runs_per_scenario: usize,
    pub scenarios: Vec<ScenarioResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub kernel: String,
    pub memory_gib: Option<f64>,
}

impl Machine {
    pub fn probe() -> Machine {
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let memory_gib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some((kib / 1048576.0 * 10.0).round() / 10.0)
        });
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Machine { cores, kernel, memory_gib }
    }
}

impl Report {
    /// Fills in the speed-up of each scenario against `direct` (when direct was run).
    pub fn finish(&mut self) {
        let direct = self.scenarios.iter().find(|s| s.scenario == Scenario::Direct).and_then(|s| s.max_s);
        for s in &mut self.scenarios {
            s.speedup_vs_direct = direct.zip(s.max_s).map(|(d, m)| d / m);
        }
    }

    /// The results table (plain text, also valid Markdown).
    pub fn table(&self) -> String {
        let mib = |b: f64| b / 1048576.0;
        let f = |v: Option<f64>, prec: usize| v.map_or("–".to_string(), |v| format!("{v:.prec$}"));
        let mut out = String::new();
        let t_min = self.t_min_s.map_or("n/a (loopback: no rates)".to_string(), |t| format!("{t:.1} s"));
        out.push_str(&format!(
            "{} nodes, image {:.0} MiB in {} layers, origin {}, node {}, T_min {t_min}, {} run(s) each (medians)\n\n",
            self.nodes,
            mib(self.image_bytes as f64),
            self.layers,
            self.origin_rate_bps.map_or("unshaped".into(), |r| super::net::Rate(r).to_string()),
            self.node_rate_bps.map_or("unshaped".into(), |r| super::net::Rate(r).to_string()),
            self.runs_per_scenario,
        ));
        out.push_str(
            "| scenario | nodes done | p50 s | p90 s | p99 s | max s | p99 / T_min | origin egress MiB | egress / image | speed-up vs direct | CPU busy |\n",
        );
        out.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for s in &self.scenarios {
            if let Some(why) = &s.skipped {
                out.push_str(&format!("| {} | skipped: {why} | | | | | | | | | |\n", s.scenario.name()));
                continue;
            }
            let killed = match s.killed {
                0 => String::new(),
                k => format!(" (+{k} killed)"),
            };
            out.push_str(&format!(
                "| {} | {}/{}{killed} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                s.scenario.name(),
                s.completed,
                s.pulls,
                f(s.p50_s, 1),
                f(s.p90_s, 1),
                f(s.p99_s, 1),
                f(s.max_s, 1),
                f(s.p99_over_t_min, 2),
                f(s.origin_egress_bytes.map(|b| mib(b as f64)), 1),
                f(s.egress_ratio, 3),
                f(s.speedup_vs_direct, 2),
                s.cpu_busy.map_or("–".to_string(), |c| format!("{:.0}%", c * 100.0)),
            ));
        }
        out
    }
}

/// Cumulative CPU time from `/proc/stat` (all cores, in ticks): (total, idle, iowait).
pub fn cpu_ticks() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total = v.iter().take(8).sum();
    Some((total, *v.get(3)?, *v.get(4)?))
}

/// (busy share, iowait share) between two [`cpu_ticks`] readings.
pub fn cpu_shares(before: (u64, u64, u64), after: (u64, u64, u64)) -> Option<(f64, f64)> {
    let total = after.0.checked_sub(before.0).filter(|t| *t > 0)? as f64;
    let idle = after.1.saturating_sub(before.1) as f64;
    let iowait = after.2.saturating_sub(before.2) as f64;
    Some(((total - idle - iowait) / total, iowait / total))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (proleptic Gregorian, UTC).
pub fn utc_timestamp(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(10.0));
        assert_eq!(percentile(&v, 90.0), Some(18.0));
        assert_eq!(percentile(&v, 99.0), Some(20.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    }

    #[test]
    fn failed_nodes_are_counted_not_timed() {
        let r = RunResult::new(
            vec![NodeOutcome::Done(2.0), NodeOutcome::Failed("boom".into()), NodeOutcome::Done(1.0)],
            Some(110),
            100,
        );
        assert_eq!(r.completed(), 2);
        assert_eq!(r.max_s, Some(2.0));
        assert_eq!(r.errors, vec!["boom".to_string()]);
        assert_eq!(r.origin_egress_bytes, 110);
        let s = ScenarioResult::from_runs(Scenario::Dht, vec![r], 100, Some(0.5));
        assert_eq!(s.egress_ratio, Some(1.1));
        assert_eq!(s.p99_over_t_min, Some(4.0));
        assert_eq!((s.completed, s.pulls), (2, 3));
    }

    #[test]
    fn killed_nodes_are_neither_completions_nor_failures() {
        let mut r = RunResult::new(vec![NodeOutcome::Done(3.0), NodeOutcome::Killed], None, 100);
        r.killed = vec![Killed { node: Some(1), what: "agent 1".into(), at_s: 1.0 }];
        assert!(r.errors.is_empty());
        assert_eq!((r.completed(), r.survivors(), r.killed_nodes()), (1, 1, 1));
        let s = ScenarioResult::from_runs(Scenario::Dht, vec![r], 100, None);
        assert_eq!((s.completed, s.pulls, s.killed), (1, 1, 1));
    }

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_795_435_200), "2026-11-23T12:00:00Z");
    }
}
