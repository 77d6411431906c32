//! Link utilisation over a pull: every node's upload and download and the origin's upload,
//! sampled once a second from the bridge ports in the hub namespace, in the same shape as the
//! simulator's `utilisation` object, so the two can be read side by side.
//!
//! A bridge port's counters are the node's link seen from the other end: the port *sends*
//! what the node downloads and *receives* what the node uploads (frames, headers included).
//! One `ip -s -j link show` in the hub namespace reads every port at once, so sampling costs
//! one short process a second whatever the node count.
//!
//! What it shows is where a link idles: an uplink with nothing others lack, a downlink waiting
//! for a slow holder, the origin idle while nodes still pull.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use super::net::Net;
use super::report::percentile;

/// How often the counters are read.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// Readings kept at most (a bound on a runaway pull: one hour at one a second).
const MAX_READINGS: usize = 3600;

/// Counters of every port at one moment.
struct Reading {
    t_s: f64,
    /// Port name → (tx bytes, rx bytes).
    ports: HashMap<String, (u64, u64)>,
}

/// Samples the hub's ports in a background thread until [`LinkSampler::finish`].
pub struct LinkSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Reading>>>,
    origin_port: String,
    node_ports: Vec<String>,
}

/// One interval (shares of the link rate); the simulator reports the same.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    /// End of the interval, seconds since sampling started.
    pub t_s: f64,
    /// Origin uplink busy share.
    pub origin_up: f64,
    /// Mean downlink busy share of the nodes still pulling at the interval's end.
    pub down_mean_downloading: f64,
    /// Mean uplink busy share of all nodes (the live ones, in the simulator).
    pub up_mean: f64,
    /// Share of those nodes whose uplink was more than 90 % busy.
    pub up_saturated_share: f64,
    /// Nodes still pulling at the interval's end.
    pub downloading: usize,
}

/// p10 / p50 / p90 / max of a per-node figure.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spread {
    pub p10: Option<f64>,
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub max: Option<f64>,
}

impl Spread {
    pub fn of(v: &[f64]) -> Spread {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        Spread {
            p10: percentile(&s, 10.0),
            p50: percentile(&s, 50.0),
            p90: percentile(&s, 90.0),
            max: s.last().copied(),
        }
    }
}

/// What a pull did to the links.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Utilisation {
    /// Per node: bytes uploaded / (node rate × the pull's duration).
    pub up_busy_share_per_node: Spread,
    /// Per completed node: bytes downloaded / (node rate × its own completion time).
    pub down_busy_share_per_completed_node: Spread,
    pub samples: Vec<Sample>,
}

fn read_ports(hub: &str) -> Result<HashMap<String, (u64, u64)>> {
    let out = std::process::Command::new("ip")
        .args(["-n", hub, "-s", "-j", "link", "show"])
        .output()
        .context("running ip -s -j link show")?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parsing `ip -s -j link show`")?;
    let mut ports = HashMap::new();
    for link in v.as_array().into_iter().flatten() {
        let (Some(name), Some(tx), Some(rx)) = (
            link["ifname"].as_str(),
            link["stats64"]["tx"]["bytes"].as_u64(),
            link["stats64"]["rx"]["bytes"].as_u64(),
        ) else {
            continue;
        };
        ports.insert(name.to_string(), (tx, rx));
    }
    Ok(ports)
}

impl LinkSampler {
    /// Starts sampling now (t = 0 is this call).
    pub fn start(net: &Net) -> LinkSampler {
        let hub = net.hub();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut readings = Vec::new();
            while readings.len() < MAX_READINGS {
                let t_s = started.elapsed().as_secs_f64();
                match read_ports(&hub) {
                    Ok(ports) => readings.push(Reading { t_s, ports }),
                    Err(e) => eprintln!("link sampling: {e:#}"),
                }
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                // Sleep to the next whole interval, waking early to stop.
                let next = INTERVAL.mul_f64((t_s / INTERVAL.as_secs_f64()).floor() + 1.0);
                while !flag.load(Ordering::Relaxed) && started.elapsed() < next {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            readings
        });
        LinkSampler {
            stop,
            thread: Some(thread),
            origin_port: net.origin.hub_ifname.clone(),
            node_ports: net.nodes.iter().map(|h| h.hub_ifname.clone()).collect(),
        }
    }

    /// Stops sampling (one last reading) and turns the readings into shares of the link
    /// rates. `done_s`: each node's completion time in seconds from the same start, `None`
    /// for a node that did not complete.
    pub fn finish(
        mut self,
        done_s: &[Option<f64>],
        node_rate_bps: f64,
        origin_rate_bps: f64,
    ) -> Option<Utilisation> {
        self.stop.store(true, Ordering::Relaxed);
        let readings = self.thread.take()?.join().ok()?;
        Some(utilisation(
            &readings,
            &self.origin_port,
            &self.node_ports,
            done_s,
            node_rate_bps,
            origin_rate_bps,
        ))
    }
}

impl Drop for LinkSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn utilisation(
    readings: &[Reading],
    origin_port: &str,
    node_ports: &[String],
    done_s: &[Option<f64>],
    node_rate_bps: f64,
    origin_rate_bps: f64,
) -> Utilisation {
    let node_cap = node_rate_bps / 8.0;
    let origin_cap = origin_rate_bps / 8.0;
    let counter = |r: &Reading, port: &str| r.ports.get(port).copied().unwrap_or((0, 0));
    let mut samples = Vec::new();
    for w in readings.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let dt = b.t_s - a.t_s;
        if dt <= 0.0 {
            continue;
        }
        // The bridge port *receives* what its host sends.
        let origin_up =
            (counter(b, origin_port).1.saturating_sub(counter(a, origin_port).1)) as f64 / (origin_cap * dt);
        let (mut up_sum, mut saturated, mut down_sum, mut downloading) = (0.0, 0usize, 0.0, 0usize);
        for (i, port) in node_ports.iter().enumerate() {
            let (tx0, rx0) = counter(a, port);
            let (tx1, rx1) = counter(b, port);
            let up = rx1.saturating_sub(rx0) as f64 / (node_cap * dt);
            up_sum += up;
            if up > 0.9 {
                saturated += 1;
            }
            if done_s.get(i).copied().flatten().is_none_or(|d| d > b.t_s) {
                downloading += 1;
                down_sum += tx1.saturating_sub(tx0) as f64 / (node_cap * dt);
            }
        }
        let n = node_ports.len().max(1) as f64;
        samples.push(Sample {
            t_s: b.t_s,
            origin_up,
            down_mean_downloading: if downloading > 0 { down_sum / downloading as f64 } else { 0.0 },
            up_mean: up_sum / n,
            up_saturated_share: saturated as f64 / n,
            downloading,
        });
    }
    let (first, last) = (readings.first(), readings.last());
    let span = first.zip(last).map_or(0.0, |(a, b)| b.t_s - a.t_s);
    let mut up = Vec::new();
    let mut down = Vec::new();
    for (i, port) in node_ports.iter().enumerate() {
        let (Some(a), Some(b)) = (first, last) else { break };
        let (tx0, rx0) = counter(a, port);
        let (tx1, rx1) = counter(b, port);
        if span > 0.0 {
            up.push(rx1.saturating_sub(rx0) as f64 / (node_cap * span));
        }
        if let Some(d) = done_s.get(i).copied().flatten().filter(|d| *d > 0.0) {
            down.push(tx1.saturating_sub(tx0) as f64 / (node_cap * d));
        }
    }
    Utilisation {
        up_busy_share_per_node: Spread::of(&up),
        down_busy_share_per_completed_node: Spread::of(&down),
        samples,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(t_s: f64, ports: &[(&str, u64, u64)]) -> Reading {
        Reading { t_s, ports: ports.iter().map(|(n, tx, rx)| (n.to_string(), (*tx, *rx))).collect() }
    }

    #[test]
    fn shares_come_from_the_port_counters_seen_from_the_bridge() {
        // Node rate 8 bit/s = 1 byte/s; origin 16 bit/s = 2 bytes/s.
        let r = [
            reading(0.0, &[("O", 0, 0), ("N0", 0, 0), ("N1", 0, 0)]),
            // Origin sent 2 bytes (port rx); node 0 downloaded 1 (port tx), node 1 uploaded 1.
            reading(1.0, &[("O", 0, 2), ("N0", 1, 0), ("N1", 0, 1)]),
            reading(2.0, &[("O", 0, 2), ("N0", 1, 1), ("N1", 1, 1)]),
        ];
        let ports = vec!["N0".to_string(), "N1".to_string()];
        let u = utilisation(&r, "O", &ports, &[Some(1.0), Some(2.0)], 8.0, 16.0);
        assert_eq!(u.samples.len(), 2);
        let s = &u.samples[0];
        assert_eq!((s.origin_up, s.up_mean, s.up_saturated_share, s.downloading), (1.0, 0.5, 0.5, 1));
        // Node 0 finished at 1.0 s, so only node 1 (which downloaded nothing yet) counts.
        assert_eq!(s.down_mean_downloading, 0.0);
        let s = &u.samples[1];
        assert_eq!((s.origin_up, s.downloading, s.down_mean_downloading), (0.0, 0, 0.0));
        // Node 0 downloaded 1 byte in its 1 s; node 1 1 byte in 2 s.
        assert_eq!(u.down_busy_share_per_completed_node.max, Some(1.0));
        assert_eq!(u.down_busy_share_per_completed_node.p10, Some(0.5));
    }
}
