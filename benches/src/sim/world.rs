//! The simulated cluster: nodes, the origin, the DHT and the tracker, driven by one event
//! queue in virtual time. This is the shell around each download's scheduler: it turns the
//! scheduler's actions into messages (delivered after their latency) and flows (delivered
//! when the flow network says the bytes are through), and their results back into inputs.
//!
//! Message latencies: a request reaches its peer after RTT/2 and its answer arrives after
//! another RTT/2; a `Have` answer reflects the peer's map when the answer arrives; a
//! piece flow starts when the request reached the server and is verified when its last byte
//! is through (the final RTT/2 of propagation is not added). A DHT lookup or announcement
//! takes `hops` RTTs ([`super::dht`]). On top of the latencies, each step waits for the CPU
//! of the node that does it ([`super::cost`]): a request is answered when the answering
//! node's CPU got to it, a piece flows once its sender read and encrypted it and counts as
//! verified once its receiver decrypted and hashed it. Upload slots are not modelled: the agent's slot covers
//! reading a piece from disk, not sending it (the response is queued on the connection), and
//! the model has no disk.
//!
//! Determinism: one seeded generator, ordered maps, events ordered by (time, sequence
//! number); wall-clock and CPU readings are only reported, never used in a decision.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use sha2::{Digest as _, Sha256};
use shoal_protocol::tracker::{Heartbeat, NodeCounters, PlanRequest, TrackerResponse};
use shoal_tracker::state::State;

use shoal_agent::fetch::net::{NodeId, PeerError, PeerHave, Plan, PlanReport};
use shoal_agent::fetch::scheduler::{self, Action, Event};
use shoal_agent::p2p::shares::Shares;
use shoal_agent::pieces::Layout;
use shoal_agent::types::Digest;

use super::cost::{Costs, Cpus, DHT_TIMEOUT, REQUEST_TIMEOUT};
use super::dht::{KeyRecords, ALPHA, REPLICATION};
use super::flow::{Network, Time, NS};
use super::sched::{mix, Download, Phase, Startup, MS};
use crate::rollout::scenario::Scenario;

/// What the world is asked to simulate.
#[derive(Clone, Debug)]
pub struct Config {
    pub scenario: Scenario,
    pub nodes: usize,
    pub layer_sizes: Vec<u64>,
    pub origin_rate: f64,
    pub node_rate: f64,
    pub rtt: Time,
    pub dht_hops: u32,
    pub start_spread: Time,
    pub churn_pct: f64,
    pub seed: u64,
    pub sample: Time,
    pub max_time: Time,
    /// The agent's download tuning (its `FetchConfig` defaults).
    pub sched: scheduler::Config,
    /// Piece uploads a node serves at once (the agent's `ServeOptions::max_uploads`).
    pub max_uploads: u32,
    /// What each action costs ([`super::cost`]).
    pub costs: Costs,
    /// Cores of each node (and of the tracker).
    pub cores: f64,
}

/// Deterministic generator (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(mix(seed ^ 0x5348_4f41_4c53_494d))
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n.max(1))) >> 64) as u64
    }
}

#[derive(Debug)]
enum Ev {
    Start {
        node: u32,
    },
    Wake {
        dl: u32,
    },
    Lookup {
        dl: u32,
    },
    /// A piece verified after the receiver's CPU got to it (`from`: the sending node, or
    /// none for the origin).
    Verified {
        dl: u32,
        piece: u32,
        from: Option<u32>,
    },
    /// An origin span's last piece verified.
    OriginDone {
        dl: u32,
        first: u32,
        end: u32,
    },
    /// A server's CPU has read and encrypted a piece: its bytes start to flow.
    Serve {
        dl: u32,
        peer: u32,
        piece: u32,
    },
    Whole {
        dl: u32,
    },
    AddProvider {
        layer: u32,
        k: u32,
        provider: u32,
    },
    /// `late`: the answer came after the request timeout (a busy peer): a timeout.
    Have {
        dl: u32,
        peer: u32,
        late: bool,
    },
    Head {
        dl: u32,
    },
    PieceReq {
        dl: u32,
        peer: u32,
        piece: u32,
    },
    Failed {
        dl: u32,
        peer: u32,
        piece: u32,
        why: Refused,
    },
    OriginReq {
        dl: u32,
        first: u32,
        end: u32,
    },
    PlanReq {
        dl: u32,
        report: Box<PlanReport>,
        sent: Time,
    },
    /// The planner's CPU got to a plan request (sent at `sent`).
    PlanServe {
        dl: u32,
        report: Box<PlanReport>,
        sent: Time,
    },
    PlanReply {
        dl: u32,
        plan: Option<Box<Plan>>,
    },
    Heartbeat {
        node: u32,
    },
    TrackerTick,
    Kill {
        node: u32,
    },
    Sample,
}

struct Queued {
    at: Time,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Why a piece request got no piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// The connection reset (the peer was killed, or is unknown).
    Unreachable,
    /// The peer answered after the request timeout (its CPU was busy).
    TimedOut,
    /// The peer does not hold the piece.
    Lacks,
    /// Every upload slot of the peer is taken (the agent answers `Busy`).
    Busy,
}

#[derive(Clone, Copy)]
enum Job {
    None,
    Piece { dl: u32, piece: u32, peer: u32 },
    Origin { dl: u32, first: u32, next: u32, end: u32 },
    Direct { dl: u32 },
}

struct Dl {
    sched: Option<Download>,
    wake_at: Time,
    done_at: Option<Time>,
}

/// Messages one node sent and received, by kind.
#[derive(Clone, Copy, Default, Debug)]
pub struct Msgs {
    pub dht_sent: u64,
    pub dht_received: u64,
    pub have_sent: u64,
    pub have_received: u64,
    pub piece_requests_received: u64,
    pub plan_requests: u64,
    /// Plan requests this node answered as a coordinator (its own included).
    pub plans_received: u64,
}

/// Origin piece requests by the requester's reason, and how many pieces left the origin more
/// than once: what explains an egress above 1×.
#[derive(Clone, Copy, Default, Debug, serde::Serialize)]
pub struct OriginWhy {
    /// Pieces requested from the origin (every request counts).
    pub pieces: u64,
    /// Pieces of a layer requested more than once (the excess over one each).
    pub duplicates: u64,
    /// Requested as the planner's assignee (the tracker's, or the layer's coordinator's).
    pub assigned: u64,
    /// Taken over from a stalled owner.
    pub taken_over: u64,
    /// Requested outside a plan (no live plan: the planner was gone or late).
    pub unplanned: u64,
    /// Refetched by a repair.
    pub repair: u64,
}

/// Requests answered after the request timeout, by kind: what a busy CPU did to its peers.
#[derive(Clone, Copy, Default, Debug, serde::Serialize)]
pub struct Timeouts {
    pub have: u64,
    pub piece: u64,
    pub plan: u64,
    /// DHT walks that ended without a slow node's answer.
    pub dht: u64,
}

/// Tracker CPU actually spent (thread CPU clock), reported, never used in a decision.
#[derive(Clone, Copy, Default, Debug)]
pub struct TrackerCpu {
    pub plans: u64,
    pub plan_cpu_ns: u64,
    pub max_plan_cpu_ns: u64,
    pub heartbeats: u64,
    pub heartbeat_cpu_ns: u64,
    pub tick_cpu_ns: u64,
}

/// One utilisation sample over the last interval: the netns benchmark's shape, so the two
/// read side by side.
pub use crate::rollout::links::Sample;

pub struct Outcome {
    /// Per node: completion time, or why not.
    pub nodes: Vec<Result<f64, String>>,
    pub origin_bytes: f64,
    pub killed: usize,
    pub msgs: Vec<Msgs>,
    pub tracker_cpu: Option<TrackerCpu>,
    pub tracker_refused: u64,
    pub samples: Vec<Sample>,
    /// Per node: bytes sent / (uplink × rollout duration); bytes received / (downlink × own time).
    pub up_util: Vec<f64>,
    pub down_util: Vec<f64>,
    pub events: u64,
    pub end_s: f64,
    pub peer_piece_bytes: f64,
    /// Why pieces left the origin (see [`OriginWhy`]).
    pub origin_why: OriginWhy,
    /// Downloads the scheduler gave up on (`Action::Failed`).
    pub failures: Vec<String>,
    /// Per node: the share of the rollout its CPU was busy (modelled costs).
    pub cpu_busy: Vec<f64>,
    /// The tracker's busy share (tracker mode).
    pub tracker_busy: Option<f64>,
    /// Mean and largest wait of a job for its CPU, seconds.
    pub cpu_wait_mean_s: f64,
    pub cpu_wait_max_s: f64,
    pub timeouts: Timeouts,
}

pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

struct Layer {
    digest: [u8; 32],
    agent_digest: Digest,
    layout: Layout,
    size: u64,
    piece_size: u64,
    records: KeyRecords,
    /// Stand-ins for the pieces' sha256 (the simulator moves no bytes): unique per piece.
    piece_digests: Vec<[u8; 32]>,
}

impl Layer {
    fn piece_len(&self, i: u32) -> u64 {
        let start = u64::from(i) * self.piece_size;
        (start + self.piece_size).min(self.size) - start.min(self.size)
    }
    fn range_bytes(&self, first: u32, end: u32) -> u64 {
        (u64::from(end) * self.piece_size).min(self.size)
            - (u64::from(first) * self.piece_size).min(self.size)
    }
}

pub struct World {
    cfg: Config,
    /// Per node: its upload slots, held per receiving node.
    uploads: Vec<Shares<u32>>,
    now: Time,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    rng: Rng,
    net: Network,
    jobs: Vec<Job>,
    layers: Vec<Layer>,
    dls: Vec<Dl>,
    alive: Vec<bool>,
    node_done: Vec<Option<Time>>,
    layers_left: Vec<u32>,
    peer_ids: Vec<PeerId>,
    node_ids: Vec<NodeId>,
    by_id: HashMap<NodeId, u32>,
    tracker: Option<State>,
    /// DHT mode: the planner of each node that coordinates a layer (the node closest to
    /// the layer's key that a download's lookup found alive), created on first use.
    planners: HashMap<u32, State>,
    /// Per download (DHT mode): index into its layer's closest nodes of the coordinator it
    /// asks, once its one lookup found it.
    coordinator: Vec<Option<u8>>,
    base: Instant,
    cpu: TrackerCpu,
    msgs: Vec<Msgs>,
    origin: u32,
    samples: Vec<Sample>,
    last_sent: Vec<f64>,
    last_received: Vec<f64>,
    events: u64,
    remaining: usize,
    killed: usize,
    failures: Vec<String>,
    peer_piece_bytes: f64,
    origin_why: OriginWhy,
    /// Per layer, per piece: origin requests so far.
    origin_count: Vec<Vec<u32>>,
    kinds: std::collections::BTreeMap<String, u64>,
    /// Every host's CPU: nodes `0..n`, the origin (never charged), the tracker.
    cpus: Cpus,
    timeouts: Timeouts,
}

impl World {
    pub fn new(cfg: Config) -> World {
        let n = cfg.nodes;
        let mut rng = Rng::new(cfg.seed);
        let peer_ids: Vec<PeerId> = (0..n)
            .map(|_| {
                let mut secret = [0u8; 32];
                for c in secret.chunks_mut(8) {
                    c.copy_from_slice(&rng.next().to_le_bytes());
                }
                let kp = libp2p::identity::Keypair::ed25519_from_bytes(secret).expect("32 bytes");
                kp.public().to_peer_id()
            })
            .collect();
        let node_keys: Vec<[u8; 32]> = peer_ids.iter().map(|p| Sha256::digest(p.to_bytes()).into()).collect();
        let layers: Vec<Layer> = cfg
            .layer_sizes
            .iter()
            .enumerate()
            .map(|(k, &size)| {
                let digest: [u8; 32] = Sha256::new()
                    .chain_update(cfg.seed.to_le_bytes())
                    .chain_update((k as u64).to_le_bytes())
                    .finalize()
                    .into();
                let layout = Layout::for_size(size);
                let agent_digest = Digest::from_sha256(digest);
                Layer {
                    digest,
                    agent_digest,
                    layout,
                    size,
                    piece_size: u64::from(layout.piece_size),
                    records: KeyRecords::new(&digest, &node_keys),
                    piece_digests: (0..layout.pieces())
                        .map(|i| {
                            Sha256::new().chain_update(digest).chain_update(i.to_le_bytes()).finalize().into()
                        })
                        .collect(),
                }
            })
            .collect();
        let mut up = vec![cfg.node_rate / 8.0; n];
        let mut down = up.clone();
        up.push(cfg.origin_rate / 8.0);
        down.push(f64::MAX / 4.0);
        let node_ids: Vec<NodeId> = peer_ids.iter().map(|p| NodeId::new(&p.to_bytes())).collect();
        let by_id = node_ids.iter().enumerate().map(|(i, p)| (p.clone(), i as u32)).collect();
        let l = layers.len();
        World {
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            net: Network::new(&up, &down),
            jobs: Vec::new(),
            layers,
            dls: (0..n * l).map(|_| Dl { sched: None, wake_at: Time::MAX, done_at: None }).collect(),
            alive: vec![true; n],
            node_done: vec![None; n],
            layers_left: vec![l as u32; n],
            peer_ids,
            node_ids,
            by_id,
            tracker: (cfg.scenario == Scenario::Tracker).then(State::new),
            planners: HashMap::new(),
            coordinator: vec![None; n * l],
            base: Instant::now(),
            cpu: TrackerCpu::default(),
            msgs: vec![Msgs::default(); n],
            origin: n as u32,
            samples: Vec::new(),
            last_sent: vec![0.0; n + 1],
            uploads: (0..=n).map(|_| Shares::new(cfg.max_uploads as usize)).collect(),
            last_received: vec![0.0; n + 1],
            events: 0,
            remaining: n,
            killed: 0,
            failures: Vec::new(),
            peer_piece_bytes: 0.0,
            origin_why: OriginWhy::default(),
            kinds: Default::default(),
            cpus: Cpus::new(n + 2, cfg.cores),
            timeouts: Timeouts::default(),
            origin_count: cfg
                .layer_sizes
                .iter()
                .map(|&z| vec![0; Layout::for_size(z).pieces() as usize])
                .collect(),
            rng,
            cfg,
        }
    }

    fn push(&mut self, at: Time, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse(Queued { at, seq: self.seq, ev }));
    }

    fn instant(&self, t: Time) -> Instant {
        self.base + Duration::from_nanos(t)
    }

    fn nl(&self) -> usize {
        self.layers.len()
    }

    fn node_of(&self, dl: u32) -> u32 {
        dl / self.nl() as u32
    }

    fn layer_of(&self, dl: u32) -> u32 {
        dl % self.nl() as u32
    }

    pub fn run(mut self) -> Outcome {
        let n = self.cfg.nodes;
        let t_spread = self.cfg.start_spread.max(1);
        for node in 0..n as u32 {
            let at = self.rng.below(t_spread);
            self.push(at, Ev::Start { node });
        }
        if self.tracker.is_some() {
            for node in 0..n as u32 {
                let at = self.rng.below(2000 * MS);
                self.push(at, Ev::Heartbeat { node });
            }
        }
        if self.cfg.scenario != Scenario::Direct {
            self.push(0, Ev::TrackerTick);
        }
        let kills = ((self.cfg.churn_pct / 100.0) * n as f64).round() as usize;
        if kills > 0 {
            // Mid-rollout: uniformly between 10 % and 70 % of T_min, distinct nodes.
            let total: u64 = self.cfg.layer_sizes.iter().sum();
            let t_min = total as f64 * 8.0 / self.cfg.origin_rate.min(self.cfg.node_rate);
            let (lo, hi) = ((0.1 * t_min * NS) as u64, (0.7 * t_min * NS) as u64);
            let mut order: Vec<u32> = (0..n as u32).collect();
            for k in 0..kills.min(n) {
                let j = k + self.rng.below((n - k) as u64) as usize;
                order.swap(k, j);
                let at = lo + self.rng.below(hi - lo + 1);
                self.push(at, Ev::Kill { node: order[k] });
            }
        }
        self.push(self.cfg.sample, Ev::Sample);
        // Diagnostics: events by kind on stderr.
        let count_kinds = std::env::var_os("SHOAL_SIM_EVENT_KINDS").is_some();
        loop {
            // The network's milestones (its own indexed heap) and the other events, in time
            // order; a milestone goes first on a tie.
            let queued = self.queue.peek().map(|Reverse(q)| q.at);
            let flow = self.net.next_at();
            let at = match (flow, queued) {
                (None, None) => break,
                (Some(f), Some(q)) => f.min(q),
                (Some(t), None) | (None, Some(t)) => t,
            };
            if at > self.cfg.max_time || self.remaining == 0 {
                break;
            }
            self.now = at;
            self.events += 1;
            if flow == Some(at) {
                if count_kinds {
                    *self.kinds.entry("Flow".to_string()).or_insert(0) += 1;
                }
                if let Some((id, done)) = self.net.pop(at) {
                    self.milestone(id, done);
                }
                continue;
            }
            let Some(Reverse(q)) = self.queue.pop() else { break };
            if count_kinds {
                let name = format!("{:?}", q.ev);
                let name = name.split([' ', '{', '(']).next().unwrap_or("").to_string();
                *self.kinds.entry(name).or_insert(0) += 1;
            }
            self.event(q.ev);
        }
        self.finish()
    }

    fn finish(mut self) -> Outcome {
        if !self.kinds.is_empty() {
            eprintln!(
                "sim: events by kind: {:?}; flow milestones early/reached {:?}",
                self.kinds, self.net.counts
            );
        }
        let n = self.cfg.nodes;
        let end = self.node_done.iter().flatten().copied().max().unwrap_or(self.now);
        for h in 0..=n as u32 {
            self.net.settle_host(h, self.now);
        }
        let total: u64 = self.cfg.layer_sizes.iter().sum();
        let nodes = (0..n)
            .map(|i| match self.node_done[i] {
                Some(t) => Ok(t as f64 / NS),
                None if !self.alive[i] => Err(format!("node {i}: killed (churn)")),
                None => Err(format!(
                    "node {i}: not done after {:.0} s of virtual time",
                    self.cfg.max_time as f64 / NS
                )),
            })
            .collect();
        let end_s = (end as f64 / NS).max(1e-9);
        let up_cap = self.cfg.node_rate / 8.0;
        let up_util = (0..n).map(|i| self.net.sent[i] / (up_cap * end_s)).collect();
        let down_util = (0..n)
            .filter_map(|i| self.node_done[i].map(|t| total as f64 / (up_cap * (t as f64 / NS).max(1e-9))))
            .collect();
        Outcome {
            nodes,
            origin_bytes: self.net.sent[self.origin as usize],
            killed: self.killed,
            msgs: self.msgs,
            tracker_cpu: (self.cfg.scenario != Scenario::Direct).then_some(self.cpu),
            tracker_refused: self
                .tracker
                .iter()
                .chain(self.planners.values())
                .map(|s| s.totals.refused)
                .sum(),
            samples: self.samples,
            up_util,
            down_util,
            events: self.events,
            end_s,
            peer_piece_bytes: self.peer_piece_bytes,
            origin_why: self.origin_why,
            failures: self.failures,
            cpu_busy: (0..n).map(|i| self.cpus.busy[i] as f64 / NS / end_s).collect(),
            tracker_busy: self.tracker.is_some().then(|| self.cpus.busy[n + 1] as f64 / NS / end_s),
            cpu_wait_mean_s: self.cpus.wait_total as f64 / NS / self.cpus.jobs.max(1) as f64,
            cpu_wait_max_s: self.cpus.wait_max as f64 / NS,
            timeouts: self.timeouts,
        }
    }

    /// The tracker's CPU (a host of its own after the nodes and the origin).
    fn tracker_host(&self) -> u32 {
        self.cfg.nodes as u32 + 1
    }

    /// When an answer to a request sent at `sent` and finished by the answering CPU at
    /// `done` arrives, and whether it came too late (then it is a timeout at `sent` plus the
    /// request timeout).
    fn answer_at(&self, sent: Time, done: Time) -> (Time, bool) {
        let at = done + self.cfg.rtt / 2;
        if at.saturating_sub(sent) > REQUEST_TIMEOUT {
            (sent + REQUEST_TIMEOUT, true)
        } else {
            (at, false)
        }
    }

    /// A DHT walk by `node` towards `layer`'s key: its requests cost `node` CPU, and each
    /// alive node of the key's closest receives the last step's request; returns when the
    /// answers are in (the slowest alive closest node's, or [`DHT_TIMEOUT`] after the last
    /// step without it), at least `hops` RTTs after now.
    fn walk(&mut self, node: u32, layer: usize) -> Time {
        let (rtt, hops) = (self.cfg.rtt, u64::from(self.cfg.dht_hops));
        let sent = ALPHA * hops + REPLICATION as u64;
        self.msgs[node as usize].dht_sent += sent;
        let mine = self.cpus.charge(node, self.now, sent * self.cfg.costs.dht_sent);
        let last = self.now + (hops * rtt).saturating_sub(rtt / 2);
        let mut done = mine.max(self.now + hops * rtt);
        let closest = std::mem::take(&mut self.layers[layer].records.closest);
        for &c in &closest {
            if self.alive[c as usize] {
                self.msgs[c as usize].dht_received += 1;
                let answered = self.cpus.charge(c, last, self.cfg.costs.dht_received);
                if answered - last > DHT_TIMEOUT {
                    self.timeouts.dht += 1;
                    done = done.max(last + DHT_TIMEOUT);
                } else {
                    done = done.max(answered + rtt / 2);
                }
            }
        }
        self.layers[layer].records.closest = closest;
        done
    }

    /// Sends `Have` from download `dl` to `peer`: CPU on both ends, the answer when the
    /// peer's CPU got to it.
    fn ask_have(&mut self, dl: u32, peer: u32) {
        let node = self.node_of(dl);
        self.msgs[node as usize].have_sent += 1;
        let c = self.cfg.costs;
        // The asker's own work (request out, answer read) delays when it takes the answer in,
        // not when the request leaves: charging the peer at a far arrival time would hold
        // its queue idle until then (see `cost`'s approximation).
        let mine = self.cpus.charge(node, self.now, c.have_sent);
        let rtt = self.cfg.rtt;
        let (at, late) = if self.alive[peer as usize] {
            let done = self.cpus.charge(peer, self.now + rtt / 2, c.have_served);
            self.answer_at(self.now, done)
        } else {
            (self.now + rtt, false)
        };
        self.push(at.max(mine), Ev::Have { dl, peer, late });
    }

    fn dl_alive(&self, dl: u32) -> bool {
        self.alive[self.node_of(dl) as usize] && self.dls[dl as usize].sched.is_some()
    }

    fn running(&self, dl: u32) -> bool {
        self.dl_alive(dl) && self.dls[dl as usize].sched.as_ref().is_some_and(|d| d.phase == Phase::Running)
    }

    fn at(&self, i: Instant) -> Time {
        i.saturating_duration_since(self.base).as_nanos() as Time
    }

    fn set_wake(&mut self, dl: u32, t: Time) {
        let t = t.max(self.now + MS);
        let d = &mut self.dls[dl as usize];
        if t < d.wake_at || d.wake_at <= self.now {
            d.wake_at = t;
            self.push(t, Ev::Wake { dl });
        }
    }

    /// Publishes `node` as a provider of the layer: a walk, then an `ADD_PROVIDER` to each
    /// closest node, stored when that node's CPU got to it.
    fn announce(&mut self, node: u32, layer: u32) {
        let (rtt, hops) = (self.cfg.rtt, u64::from(self.cfg.dht_hops));
        let sent = ALPHA * hops + REPLICATION as u64;
        self.msgs[node as usize].dht_sent += sent;
        self.cpus.charge(node, self.now, sent * self.cfg.costs.dht_sent);
        let k_count = self.layers[layer as usize].records.closest.len();
        for k in 0..k_count {
            let arrive = self.now + hops * rtt + rtt / 2 + self.rng.below(rtt.max(1));
            let store = self.layers[layer as usize].records.closest[k];
            let at = if self.alive[store as usize] {
                self.cpus.charge(store, arrive, self.cfg.costs.dht_received)
            } else {
                arrive
            };
            self.push(at, Ev::AddProvider { layer, k: k as u32, provider: node });
        }
    }

    /// Carries out start-up steps.
    fn startup(&mut self, dl: u32, steps: Vec<Startup>) {
        let (node, layer) = (self.node_of(dl), self.layer_of(dl));
        let rtt = self.cfg.rtt;
        for step in steps {
            match step {
                Startup::FindProviders => {
                    let at = self.walk(node, layer as usize);
                    self.push(at, Ev::Lookup { dl });
                }
                Startup::AskHave(peer) => self.ask_have(dl, peer),
                Startup::Head => self.push(self.now + rtt, Ev::Head { dl }),
                Startup::Started => {
                    let l = &self.layers[layer as usize];
                    let (digest, layout) = (l.agent_digest, l.layout);
                    let me = self.node_ids[node as usize].clone();
                    let mut cfg = self.cfg.sched.clone();
                    // A planner answers in both modes: the tracker, or the layer's coordinator.
                    cfg.tracker = true;
                    let now = self.instant(self.now);
                    if let Some(d) = self.dls[dl as usize].sched.as_mut() {
                        d.start(cfg, digest, layout, me, now);
                    }
                    self.drive(dl, None);
                }
            }
        }
    }

    /// Hands an event (or the time) to download `dl`'s scheduler and carries out its actions.
    fn drive(&mut self, dl: u32, event: Option<Event>) {
        if !self.running(dl) {
            return;
        }
        let now_i = self.instant(self.now);
        let Some(s) = self.dls[dl as usize].sched.as_mut().and_then(|d| d.sched.as_mut()) else { return };
        match event {
            Some(e) => s.handle(e, now_i),
            None => s.handle_timeout(now_i),
        }
        let actions: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
        // Like task.rs, look at least every HAVE_POLL.
        let wake = s.poll_timeout().unwrap_or(now_i + scheduler::HAVE_POLL).min(now_i + scheduler::HAVE_POLL);
        let done = s.is_done();
        for a in actions {
            self.act(dl, a);
        }
        if done {
            if let Some(d) = self.dls[dl as usize].sched.as_mut() {
                d.phase = Phase::Ended;
            }
        } else {
            let t = self.at(wake);
            self.set_wake(dl, t);
        }
    }

    fn act(&mut self, dl: u32, a: Action) {
        let node = self.node_of(dl);
        let layer = self.layer_of(dl);
        let rtt = self.cfg.rtt;
        let now = self.now;
        let peer_ix = |w: &World, p: &NodeId| w.by_id.get(p).copied();
        match a {
            Action::FindProviders => {
                let at = self.walk(node, layer as usize);
                self.push(at, Ev::Lookup { dl });
            }
            Action::AskHave(peer) => {
                if let Some(peer) = peer_ix(self, &peer) {
                    self.ask_have(dl, peer);
                }
            }
            Action::RequestPiece { peer, index, expected: _ } => match peer_ix(self, &peer) {
                Some(peer) => {
                    self.cpus.charge(node, now, self.cfg.costs.piece_request);
                    self.push(now + rtt / 2, Ev::PieceReq { dl, peer, piece: index });
                }
                None => self.push(
                    now + rtt,
                    Ev::Failed { dl, peer: u32::MAX, piece: index, why: Refused::Unreachable },
                ),
            },
            Action::FetchOrigin { first, end, taken_over, unplanned, repair } => {
                let k = u64::from(end - first);
                let w = &mut self.origin_why;
                w.pieces += k;
                if repair {
                    w.repair += k;
                } else if taken_over {
                    w.taken_over += k;
                } else if unplanned {
                    w.unplanned += k;
                } else {
                    w.assigned += k;
                }
                for i in first..end {
                    let c = &mut self.origin_count[layer as usize][i as usize];
                    if *c > 0 {
                        self.origin_why.duplicates += 1;
                    }
                    *c += 1;
                }
                self.push(now + rtt / 2, Ev::OriginReq { dl, first, end });
            }
            Action::AskPlan(report) => self.ask_plan(dl, report),
            Action::CheckWhole => self.push(now, Ev::Whole { dl }),
            Action::Ban { .. } | Action::SaveState => {}
            Action::Done => {
                self.dls[dl as usize].done_at = Some(now);
                self.layer_done(node);
                {
                    // Tell the planner the whole blob verified (task.rs does the same).
                    let report =
                        self.dls[dl as usize].sched.as_ref().and_then(|d| d.sched.as_ref()).map(|s| {
                            let map = s.map();
                            PlanReport {
                                size: map.layout.size,
                                piece_size: map.layout.piece_size,
                                have: map.verified.clone(),
                                attest: Vec::new(),
                                complete: true,
                                fetching: Vec::new(),
                                planned: true,
                            }
                        });
                    if let Some(report) = report {
                        self.ask_plan(dl, report);
                    }
                }
                let _ = layer;
            }
            Action::Failed(f) => {
                self.failures.push(format!("node {node} layer {layer}: {f:?}"));
            }
        }
    }

    /// What peer download `pdl` answers to `Have` from download `dl`.
    fn have_answer(&self, pdl: u32, dl: u32) -> Result<PeerHave, PeerError> {
        let Some(s) = self.dls[pdl as usize].sched.as_ref().and_then(|d| d.sched.as_ref()) else {
            return Err(PeerError::Lacks);
        };
        let map = s.map();
        let theirs =
            self.dls[dl as usize].sched.as_ref().and_then(|d| d.sched.as_ref()).map(|s| &s.map().verified);
        // Digests of what the asker lacks (the agent sends all it verified; the asker keeps
        // what it learns, so the rest would change nothing).
        let piece_digests = (0..map.layout.pieces())
            .filter(|&i| map.verified.get(i) && !theirs.is_some_and(|t| t.get(i)))
            .map(|i| (i, map.digests[i as usize]))
            .collect();
        Ok(PeerHave {
            size: map.layout.size,
            piece_size: map.layout.piece_size,
            have: map.verified.clone(),
            piece_digests,
            complete: s.is_done(),
            media_type: None,
        })
    }

    fn layer_done(&mut self, node: u32) {
        let left = &mut self.layers_left[node as usize];
        *left -= 1;
        if *left == 0 {
            self.node_done[node as usize] = Some(self.now);
            self.remaining -= 1;
        }
    }

    fn start_flow(&mut self, src: u32, dst: u32, total: u64, first_milestone: u64, job: Job) {
        let id = self.net.start(src, dst, total as f64, first_milestone as f64, self.now);
        if self.jobs.len() <= id as usize {
            self.jobs.resize(id as usize + 1, Job::None);
        }
        self.jobs[id as usize] = job;
    }

    /// Flow `id` reached its milestone (`done` bytes through).
    fn milestone(&mut self, id: u32, done: f64) {
        let now = self.now;
        let job = self.jobs[id as usize];
        match job {
            Job::None => self.net.stop(id, now),
            Job::Direct { dl } => {
                self.net.stop(id, now);
                self.jobs[id as usize] = Job::None;
                let node = self.node_of(dl);
                if self.alive[node as usize] {
                    self.dls[dl as usize].done_at = Some(now);
                    self.layer_done(node);
                }
            }
            Job::Piece { dl, piece, peer } => {
                self.net.stop(id, now);
                self.jobs[id as usize] = Job::None;
                let me = self.node_of(dl);
                self.upload_done(peer, me);
                self.peer_piece_bytes += done;
                // The receiver decrypts, hashes and writes it: verified when its CPU is done.
                let at = self.cpus.charge(me, now, self.cfg.costs.recv(done as u64));
                if at == now {
                    self.verified(dl, piece, Some(peer));
                } else {
                    self.push(at, Ev::Verified { dl, piece, from: Some(peer) });
                }
            }
            Job::Origin { dl, first, mut next, end } => {
                // Every piece boundary the flow has passed (a late milestone may have
                // passed several).
                let layer = self.layer_of(dl) as usize;
                let mut through = Vec::new();
                while next < end && self.layers[layer].range_bytes(first, next + 1) as f64 <= done + 0.5 {
                    through.push(next);
                    next += 1;
                }
                if next < end {
                    let milestone = self.layers[layer].range_bytes(first, next + 1) as f64;
                    self.net.next_milestone(id, milestone, now);
                    self.jobs[id as usize] = Job::Origin { dl, first, next, end };
                } else {
                    self.net.stop(id, now);
                    self.jobs[id as usize] = Job::None;
                }
                let me = self.node_of(dl);
                let mut later = None;
                for piece in through {
                    let len = self.layers[layer].piece_len(piece);
                    let at = self.cpus.charge(me, now, self.cfg.costs.recv(len));
                    if at == now && later.is_none() {
                        self.verified(dl, piece, None);
                    } else {
                        self.push(at, Ev::Verified { dl, piece, from: None });
                        later = Some(at);
                    }
                }
                if next >= end {
                    match later {
                        None => self.origin_done(dl, first, end),
                        Some(at) => self.push(at, Ev::OriginDone { dl, first, end }),
                    }
                }
            }
        }
    }

    fn verified(&mut self, dl: u32, piece: u32, from: Option<u32>) {
        let digest = self.layers[self.layer_of(dl) as usize].piece_digests[piece as usize];
        let from = from.map(|p| self.node_ids[p as usize].clone());
        self.drive(dl, Some(Event::Verified { index: piece, digest, from }));
    }

    fn origin_done(&mut self, dl: u32, first: u32, end: u32) {
        self.drive(dl, Some(Event::OriginDone { first, end, unfinished: Vec::new(), error: None }));
    }

    fn event(&mut self, ev: Ev) {
        let now = self.now;
        let rtt = self.cfg.rtt;
        let nl = self.nl() as u32;
        match ev {
            Ev::Start { node } => {
                if !self.alive[node as usize] {
                    return;
                }
                for layer in 0..nl {
                    let dl = node * nl + layer;
                    if self.cfg.scenario == Scenario::Direct {
                        let size = self.layers[layer as usize].size;
                        let origin = self.origin;
                        self.start_flow(origin, node, size, size, Job::Direct { dl });
                        continue;
                    }
                    self.dls[dl as usize].sched = Some(Download::new());
                    // task.rs: announce the digest, then look the providers up.
                    self.announce(node, layer);
                    self.startup(dl, vec![Startup::FindProviders]);
                }
            }
            Ev::Wake { dl } => {
                if self.dls[dl as usize].wake_at != now {
                    return;
                }
                self.dls[dl as usize].wake_at = Time::MAX;
                if !self.dl_alive(dl) {
                    return;
                }
                self.drive(dl, None);
            }
            Ev::Lookup { dl } => {
                if !self.dl_alive(dl) {
                    return;
                }
                let layer = self.layer_of(dl) as usize;
                let me = self.node_of(dl);
                let found = self.lookup(layer, me);
                let phase = self.dls[dl as usize].sched.as_ref().map(|d| d.phase);
                match phase {
                    Some(Phase::Lookup) => {
                        let mut out = Vec::new();
                        if let Some(d) = self.dls[dl as usize].sched.as_mut() {
                            d.providers(found, &mut out);
                        }
                        self.startup(dl, out);
                    }
                    Some(Phase::Running) => {
                        let ids = found.iter().map(|&p| self.node_ids[p as usize].clone()).collect();
                        self.drive(dl, Some(Event::Providers(ids)));
                    }
                    _ => {}
                }
            }
            Ev::AddProvider { layer, k, provider } => {
                let records = &mut self.layers[layer as usize].records;
                let store = records.closest[k as usize];
                if self.alive[store as usize] {
                    self.msgs[store as usize].dht_received += 1;
                    records.add(k as usize, provider);
                }
            }
            Ev::Head { dl } => {
                if self.dl_alive(dl) {
                    self.startup(dl, vec![Startup::Started]);
                }
            }
            Ev::Whole { dl } => self.drive(dl, Some(Event::WholeDigest { matched: true })),
            Ev::Verified { dl, piece, from } => {
                if self.dl_alive(dl) {
                    self.verified(dl, piece, from);
                }
            }
            Ev::OriginDone { dl, first, end } => {
                if self.dl_alive(dl) {
                    self.origin_done(dl, first, end);
                }
            }
            Ev::Serve { dl, peer, piece } => {
                if !self.alive[peer as usize] {
                    self.push(now + rtt / 2, Ev::Failed { dl, peer, piece, why: Refused::Unreachable });
                    return;
                }
                let me = self.node_of(dl);
                if !self.dl_alive(dl) {
                    self.upload_done(peer, me);
                    return;
                }
                let len = self.layers[self.layer_of(dl) as usize].piece_len(piece);
                self.start_flow(peer, me, len, len, Job::Piece { dl, piece, peer });
            }
            Ev::Have { dl, peer, late } => {
                if !self.dl_alive(dl) {
                    return;
                }
                let layer = self.layer_of(dl);
                let me = self.node_of(dl);
                let pdl = peer * nl + layer;
                let result = if !self.alive[peer as usize] {
                    Err(PeerError::Unreachable("the node is gone".into()))
                } else if late {
                    self.msgs[peer as usize].have_received += 1;
                    self.timeouts.have += 1;
                    Err(PeerError::Unreachable("request timed out".into()))
                } else {
                    self.msgs[peer as usize].have_received += 1;
                    // The asker downloads the digest too: the peer counts it among the
                    // downloaders (task.rs: `Fetcher::have` records askers).
                    let me_id = self.node_ids[me as usize].clone();
                    self.drive(pdl, Some(Event::Asker(me_id)));
                    self.have_answer(pdl, dl)
                };
                let peer_id = self.node_ids[peer as usize].clone();
                if self.running(dl) {
                    self.drive(dl, Some(Event::Have { peer: peer_id, result }));
                } else {
                    let mut out = Vec::new();
                    if let Some(d) = self.dls[dl as usize].sched.as_mut() {
                        d.have(peer_id, result, &mut out);
                    }
                    self.startup(dl, out);
                }
            }
            Ev::PieceReq { dl, peer, piece } => {
                if !self.dl_alive(dl) {
                    return;
                }
                let layer = self.layer_of(dl);
                let me = self.node_of(dl);
                if !self.alive[peer as usize] {
                    self.push(now + rtt / 2, Ev::Failed { dl, peer, piece, why: Refused::Unreachable });
                    return;
                }
                self.msgs[peer as usize].piece_requests_received += 1;
                let sent = now.saturating_sub(rtt / 2);
                let c = self.cfg.costs;
                let looked = self.cpus.charge(peer, now, c.piece_request);
                let (answer, late) = self.answer_at(sent, looked);
                if late {
                    self.timeouts.piece += 1;
                    self.push(answer, Ev::Failed { dl, peer, piece, why: Refused::TimedOut });
                    return;
                }
                let pdl = peer * nl + layer;
                // Served only from the scheduler's map: what peers are told is what they get.
                let has = self.dls[pdl as usize]
                    .sched
                    .as_ref()
                    .and_then(|d| d.sched.as_ref())
                    .is_some_and(|s| s.map().verified.get(piece));
                if !has {
                    self.push(answer, Ev::Failed { dl, peer, piece, why: Refused::Lacks });
                    return;
                }
                // The agent serves at most `max_uploads` pieces at once, each asking peer its
                // fair share of them, and answers `Busy` beyond that (the agent's own rule).
                let at = self.instant(now);
                if !self.uploads[peer as usize].try_take(&me, at) {
                    self.push(answer, Ev::Failed { dl, peer, piece, why: Refused::Busy });
                    return;
                }
                let len = self.layers[layer as usize].piece_len(piece);
                // The server reads, verifies and encrypts the piece before its bytes flow.
                let ready = self.cpus.charge(peer, looked, c.send(len));
                if self.answer_at(sent, ready).1 {
                    self.timeouts.piece += 1;
                    self.upload_done(peer, me);
                    let at = sent + REQUEST_TIMEOUT;
                    self.push(at, Ev::Failed { dl, peer, piece, why: Refused::TimedOut });
                } else if ready == now {
                    self.start_flow(peer, me, len, len, Job::Piece { dl, piece, peer });
                } else {
                    self.push(ready, Ev::Serve { dl, peer, piece });
                }
            }
            Ev::Failed { dl, peer, piece, why } => {
                let error = match why {
                    Refused::Unreachable => PeerError::Unreachable("connection reset".into()),
                    Refused::TimedOut => PeerError::Unreachable("request timed out".into()),
                    Refused::Lacks => PeerError::Lacks,
                    Refused::Busy => PeerError::Busy,
                };
                let peer = match self.node_ids.get(peer as usize) {
                    Some(p) => p.clone(),
                    None => NodeId::new(b"unknown"),
                };
                self.drive(dl, Some(Event::PeerFailed { index: piece, peer, error }));
            }
            Ev::OriginReq { dl, first, end } => {
                if !self.dl_alive(dl) {
                    return;
                }
                let layer = &self.layers[self.layer_of(dl) as usize];
                let total = layer.range_bytes(first, end);
                let first_len = layer.piece_len(first);
                let me = self.node_of(dl);
                let origin = self.origin;
                self.start_flow(origin, me, total, first_len, Job::Origin { dl, first, next: first, end });
            }
            Ev::PlanReq { dl, report, sent } => {
                let node = self.node_of(dl);
                if !self.alive[node as usize] {
                    return;
                }
                let host = match self.tracker {
                    Some(_) => Some(self.tracker_host()),
                    None => self.coordinator_of(dl).filter(|&c| self.alive[c as usize]),
                };
                let Some(host) = host else {
                    // A coordinator that is gone answers nothing: the connection resets, as fast.
                    let plan = self.plan(dl, &report);
                    self.push(now + rtt / 2, Ev::PlanReply { dl, plan });
                    return;
                };
                let c = self.cfg.costs;
                let work = c.planner + if host == node { 0 } else { c.plan_served };
                let done = self.cpus.charge(host, now, work);
                if done == now {
                    self.plan_serve(dl, &report, sent);
                } else {
                    self.push(done, Ev::PlanServe { dl, report, sent });
                }
            }
            Ev::PlanServe { dl, report, sent } => {
                if self.alive[self.node_of(dl) as usize] {
                    self.plan_serve(dl, &report, sent);
                }
            }
            Ev::PlanReply { dl, plan } => {
                self.drive(dl, Some(Event::Plan(plan.map(|p| *p))));
            }
            Ev::Heartbeat { node } => {
                if !self.alive[node as usize] || self.remaining == 0 {
                    return;
                }
                self.heartbeat(node);
                self.push(now + 2000 * MS, Ev::Heartbeat { node });
            }
            Ev::TrackerTick => {
                let at = self.base + Duration::from_nanos(now);
                let c0 = thread_cpu_ns();
                for state in self.tracker.iter_mut().chain(self.planners.values_mut()) {
                    state.tick(at, now / MS);
                }
                self.cpu.tick_cpu_ns += thread_cpu_ns().saturating_sub(c0);
                if self.remaining == 0 {
                    return;
                }
                self.push(now + 1000 * MS, Ev::TrackerTick);
            }
            Ev::Kill { node } => self.kill(node),
            Ev::Sample => {
                self.sample();
                if now % (10_000 * MS) < self.cfg.sample {
                    // Progress of a long run (stderr only; the wall clock decides nothing).
                    eprintln!(
                        "sim: {:.0} s virtual: {}/{} nodes done, {} events, {:.0} s wall",
                        now as f64 / NS,
                        self.cfg.nodes - self.remaining - self.killed,
                        self.cfg.nodes,
                        self.events,
                        self.base.elapsed().as_secs_f64()
                    );
                }
                self.push(now + self.cfg.sample, Ev::Sample);
            }
        }
    }

    /// A provider lookup of a layer's key by node `me` (its walk, [`World::walk`], counted
    /// and charged when it was sent): the union of the alive closest nodes' lists, without
    /// `me`.
    fn lookup(&mut self, layer: usize, me: u32) -> Vec<u32> {
        let alive = &self.alive;
        self.layers[layer].records.lookup(|c| alive[c as usize]).into_iter().filter(|p| *p != me).collect()
    }

    /// The planner answers a plan request sent at `sent`, now that its CPU got to it.
    fn plan_serve(&mut self, dl: u32, report: &PlanReport, sent: Time) {
        let local = self.tracker.is_none() && self.coordinator_of(dl) == Some(self.node_of(dl));
        let plan = self.plan(dl, report);
        let (at, late) = if local { (self.now, false) } else { self.answer_at(sent, self.now) };
        if late {
            self.timeouts.plan += 1;
            self.push(at, Ev::PlanReply { dl, plan: None });
        } else {
            self.push(at, Ev::PlanReply { dl, plan });
        }
    }

    /// Sends a download's plan request: to the tracker, or (DHT mode) to the layer's
    /// coordinator, found with one closest-peers lookup the first time (`p2p::coordinator`).
    fn ask_plan(&mut self, dl: u32, report: PlanReport) {
        let node = self.node_of(dl);
        let rtt = self.cfg.rtt;
        let mut at = self.now;
        if self.tracker.is_none() && self.coordinator[dl as usize].is_none() {
            // One lookup: the closest nodes answer it; the first alive one coordinates.
            let layer = self.layer_of(dl) as usize;
            at = self.walk(node, layer);
            let closest = &self.layers[layer].records.closest;
            let first = closest.iter().position(|&c| self.alive[c as usize]).unwrap_or(0);
            self.coordinator[dl as usize] = Some(first as u8);
        }
        let coordinator = self.coordinator_of(dl);
        if self.tracker.is_some() || coordinator != Some(node) {
            self.msgs[node as usize].plan_requests += 1;
            let mine = self.cpus.charge(node, self.now, self.cfg.costs.plan_sent);
            at = at.max(mine);
        }
        at += rtt / 2;
        self.push(at, Ev::PlanReq { dl, report: Box::new(report), sent: self.now });
    }

    /// The node download `dl` asks for plans in DHT mode.
    fn coordinator_of(&self, dl: u32) -> Option<u32> {
        let at = self.coordinator[dl as usize]?;
        self.layers[self.layer_of(dl) as usize].records.closest.get(usize::from(at)).copied()
    }

    fn plan(&mut self, dl: u32, report: &PlanReport) -> Option<Box<Plan>> {
        let node = self.node_of(dl);
        let l = &self.layers[self.layer_of(dl) as usize];
        let req = PlanRequest {
            digest: l.digest,
            size: report.size,
            piece_size: report.piece_size,
            have: report.have.as_bytes().to_vec(),
            attest: report.attest.clone(),
            complete: report.complete,
            fetching: report.fetching.clone(),
            planned: report.planned,
        };
        let peer = self.peer_ids[node as usize];
        let at = self.instant(self.now);
        let state = match self.tracker.as_mut() {
            Some(state) => state,
            None => {
                let c = self.coordinator_of(dl)?;
                if !self.alive[c as usize] {
                    // Gone: the request fails; the next goes to the next closest, or (past
                    // the last) to a new lookup.
                    let at = self.coordinator[dl as usize].unwrap_or(0) + 1;
                    let len = self.layers[self.layer_of(dl) as usize].records.closest.len();
                    self.coordinator[dl as usize] = (usize::from(at) < len).then_some(at);
                    return None;
                }
                self.msgs[c as usize].plans_received += 1;
                self.planners.entry(c).or_default()
            }
        };
        let c0 = thread_cpu_ns();
        let resp = state.plan(peer, &[], &req, at);
        let spent = thread_cpu_ns().saturating_sub(c0);
        self.cpu.plans += 1;
        self.cpu.plan_cpu_ns += spent;
        self.cpu.max_plan_cpu_ns = self.cpu.max_plan_cpu_ns.max(spent);
        match resp {
            TrackerResponse::Plan(plan) => Some(Box::new(Plan {
                peers: plan.peers.iter().map(|p| NodeId::new(&p.peer_id)).collect(),
                assigned: plan.assigned,
                piece_digests: plan.piece_digests,
                next_ask: Duration::from_millis(plan.next_ask_ms.into()),
            })),
            _ => None,
        }
    }

    fn heartbeat(&mut self, node: u32) {
        let nl = self.nl() as u32;
        let mut held_added = Vec::new();
        let mut downloading = Vec::new();
        for layer in 0..nl {
            let d = &self.dls[(node * nl + layer) as usize];
            if d.done_at.is_some() {
                held_added.push(self.layers[layer as usize].digest);
            } else if d.sched.is_some() {
                downloading.push(self.layers[layer as usize].digest);
            }
        }
        let beat = Heartbeat {
            zone: None,
            full: true,
            held_added,
            held_removed: Vec::new(),
            downloading,
            counters: NodeCounters::default(),
            preheat: Vec::new(),
        };
        let peer = self.peer_ids[node as usize];
        let at = self.instant(self.now);
        let c = self.cfg.costs;
        self.cpus.charge(node, self.now, c.plan_sent);
        let tracker = self.tracker_host();
        self.cpus.charge(tracker, self.now + self.cfg.rtt / 2, c.plan_served + c.planner);
        if let Some(state) = self.tracker.as_mut() {
            let c0 = thread_cpu_ns();
            let _ = state.heartbeat(peer, &[], &beat, at);
            self.cpu.heartbeat_cpu_ns += thread_cpu_ns().saturating_sub(c0);
            self.cpu.heartbeats += 1;
        }
    }

    fn kill(&mut self, node: u32) {
        if !self.alive[node as usize] || self.node_done[node as usize].is_some() {
            return;
        }
        self.alive[node as usize] = false;
        self.killed += 1;
        self.remaining -= 1;
        let nl = self.nl() as u32;
        for layer in 0..nl {
            self.dls[(node * nl + layer) as usize].sched = None;
        }
        // Its connections reset: whoever was receiving from it learns after RTT/2.
        for id in self.net.flows_of(node) {
            let job = self.jobs[id as usize];
            let f = self.net.flow(id);
            let src = f.src;
            self.net.stop(id, self.now);
            self.jobs[id as usize] = Job::None;
            if let Job::Piece { dl, piece, peer } = job {
                self.upload_done(peer, self.node_of(dl));
                if src == node {
                    self.push(
                        self.now + self.cfg.rtt / 2,
                        Ev::Failed { dl, peer, piece, why: Refused::Unreachable },
                    );
                }
            }
        }
    }

    fn upload_done(&mut self, sender: u32, receiver: u32) {
        self.uploads[sender as usize].release(&receiver);
    }

    fn sample(&mut self) {
        let n = self.cfg.nodes;
        for h in 0..=n as u32 {
            self.net.settle_host(h, self.now);
        }
        let dt = self.cfg.sample as f64 / NS;
        let cap = self.cfg.node_rate / 8.0 * dt;
        let o = self.origin as usize;
        let origin_up = (self.net.sent[o] - self.last_sent[o]) / (self.cfg.origin_rate / 8.0 * dt);
        let (mut up_sum, mut live, mut saturated, mut down_sum, mut downloading) =
            (0.0, 0usize, 0usize, 0.0, 0usize);
        for i in 0..n {
            if !self.alive[i] {
                continue;
            }
            let up = (self.net.sent[i] - self.last_sent[i]) / cap;
            live += 1;
            up_sum += up;
            if up > 0.9 {
                saturated += 1;
            }
            if self.node_done[i].is_none() {
                downloading += 1;
                down_sum += (self.net.received[i] - self.last_received[i]) / cap;
            }
        }
        self.last_sent.copy_from_slice(&self.net.sent);
        self.last_received.copy_from_slice(&self.net.received);
        self.samples.push(Sample {
            t_s: self.now as f64 / NS,
            origin_up,
            down_mean_downloading: if downloading > 0 { down_sum / downloading as f64 } else { 0.0 },
            up_mean: if live > 0 { up_sum / live as f64 } else { 0.0 },
            up_saturated_share: if live > 0 { saturated as f64 / live as f64 } else { 0.0 },
            downloading,
        });
    }
}
