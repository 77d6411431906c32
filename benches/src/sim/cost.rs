//! What the agent's work costs in CPU time, and each node's CPU as a queue.
//!
//! ## Costs
//!
//! Every action a simulated agent takes costs CPU time on its node: a DHT request sent or
//! received, a `Have` asked or answered, a piece request, a plan request sent or answered
//! (the planner's own work included), and each MiB received (decrypt, hash, write) or sent
//! (read, verify, encrypt). The figures are measured, not guessed: [`Costs::MICRO`] comes from
//! `cargo bench -p shoal-benches --bench costs` (the agent's own code paths: its codecs, its
//! hashing, the planner's `State::plan`, and real libp2p swarms over loopback with noise);
//! see each field. A libp2p round trip is measured for both ends together; the model charges
//! half to each end.
//!
//! [`Costs::RECORDED`] adds what the micro benchmark cannot reach, from the recorded real
//! rollouts instead: `agent CPU s per MiB delivered` was 0.036-0.039 in the 40-node netns
//! runs of 2026-12-07 (`42da1a2`, benches/README.md), against the few milliseconds per MiB
//! the micro benchmark accounts for. The difference (the registry API streaming each blob to
//! containerd, the disk, the kernel's TCP work booked to the agent, scheduling overhead of 40
//! agents on two cores) is charged per MiB received, as [`Costs::RECORDED_EXTRA_PER_MIB_NS`].
//!
//! ## The CPU queue
//!
//! Each node (and the tracker) has `cores` of CPU (`--cores-per-node`; the netns benchmark's
//! share is 2 cores / N agents). Work is served first come first served, one job at a time,
//! at `cores` times real speed: a job that arrives at `t` starts at `max(t, free_at)` and ends
//! `work / cores` later; whatever the job produces (an answer, a verified piece, a flow's
//! first byte) happens then. So a busy node answers late, and answers later than a timeout
//! ([`REQUEST_TIMEOUT`]) become timeouts, as on a starved real process.
//!
//! Approximation: a job is charged when the simulator schedules it, with its arrival time at
//! most a message's latency ahead (a DHT walk's last step: a few milliseconds); a job charged
//! earlier with a later arrival may thus delay one charged later with an earlier arrival by
//! that much. (Charging at arrivals further ahead, e.g. after the sender's own backlog,
//! would hold a queue idle until then: a sender's backlog delays when it takes the answer
//! in, not when its request leaves.) Pipelining inside a job is not modelled: a piece's send
//! cost is paid before its first byte leaves, its receive cost after the last arrives.

use super::flow::Time;

/// The swarm's request timeout (`SwarmConfig::request_timeout`, default 30 s): a piece,
/// `Have` or plan request not answered within it fails.
pub const REQUEST_TIMEOUT: Time = 30_000_000_000;

/// How long a DHT walk waits for a slow answer before it ends without it (the agent's
/// provider lookups are bounded; libp2p-kad's per-request timeout is 10 s).
pub const DHT_TIMEOUT: Time = 10_000_000_000;

/// CPU nanoseconds of one core per operation.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Costs {
    /// One Kademlia request sent (and its answer read).
    pub dht_sent: u64,
    /// One Kademlia request received and answered.
    pub dht_received: u64,
    /// A `Have` asked (request out, answer decoded).
    pub have_sent: u64,
    /// A `Have` answered.
    pub have_served: u64,
    /// A piece request sent, or received (before the piece's bytes).
    pub piece_request: u64,
    /// A plan request sent and its plan read (per end of the libp2p exchange).
    pub plan_sent: u64,
    /// A plan request received and answered, the planner's own work excluded.
    pub plan_served: u64,
    /// The planner's `State::plan` per request.
    pub planner: u64,
    /// Per MiB received from a peer or the origin: decrypt, sha256, write.
    pub recv_per_mib: u64,
    /// Per MiB sent to a peer: read, verify (sha256), encrypt.
    pub send_per_mib: u64,
}

impl Costs {
    /// Nothing costs anything: the simulator before the cost model.
    pub const NONE: Costs = Costs {
        dht_sent: 0,
        dht_received: 0,
        have_sent: 0,
        have_served: 0,
        piece_request: 0,
        plan_sent: 0,
        plan_served: 0,
        planner: 0,
        recv_per_mib: 0,
        send_per_mib: 0,
    };

    /// `cargo bench -p shoal-benches --bench costs`, 2026-12-07, this 2-core machine, release
    /// (bench) profile, medians (see benches/README.md, "Costs"):
    /// - `dht request` (both ends): split half and half;
    /// - `Have round trip` (both ends, libp2p + codec): half each;
    /// - `plan round trip` (both ends, libp2p + codec): half each; `planner` is
    ///   `State::plan` with 40 downloaders;
    /// - `1 MiB piece over noise` (both ends: encrypt, yamux, decrypt, copies): half each
    ///   way, plus one sha256 per MiB on each side (the receiver verifies; the sender
    ///   verifies what it read from disk) — the store's write and read are page-cache copies
    ///   an order of magnitude below (hot_paths: `write_at` 6.6 GB/s);
    /// - `piece_request`: a piece request's share of the round trip, as a `Have`'s half.
    pub const MICRO: Costs = Costs {
        dht_sent: half(DHT_US),
        dht_received: half(DHT_US),
        have_sent: half(HAVE_US),
        have_served: half(HAVE_US),
        piece_request: half(HAVE_US),
        plan_sent: half(PLAN_RT_US),
        plan_served: half(PLAN_RT_US),
        planner: whole(PLANNER_US),
        recv_per_mib: half(PIECE_MIB_US) + whole(SHA256_MIB_US),
        send_per_mib: half(PIECE_MIB_US) + whole(SHA256_MIB_US),
    };

    /// The planner's cost for a digest with `nodes` downloaders: the measured cost at 40
    /// and at 1,000 downloaders (8 and 64 pieces), linear between and beyond (never below
    /// the 40-downloader figure).
    pub fn for_nodes(mut self, nodes: usize) -> Costs {
        if self.planner > 0 {
            let slope = (PLANNER_1000_US - PLANNER_US) / 960.0;
            self.planner = whole(PLANNER_US + slope * (nodes as f64 - 40.0).max(0.0));
        }
        self
    }

    /// The part of the recorded `agent CPU s per MiB delivered` (0.036-0.039, 40-node netns
    /// rollouts, 2026-12-07 at `42da1a2`; 0.037 taken) that [`Costs::MICRO`] does not
    /// account for: 37 ms less one MiB received and one sent.
    pub const RECORDED_EXTRA_PER_MIB_NS: u64 =
        37_000_000 - (Costs::MICRO.recv_per_mib + Costs::MICRO.send_per_mib);

    /// [`Costs::MICRO`] plus [`Costs::RECORDED_EXTRA_PER_MIB_NS`] per MiB received.
    pub const RECORDED: Costs =
        Costs { recv_per_mib: Costs::MICRO.recv_per_mib + Costs::RECORDED_EXTRA_PER_MIB_NS, ..Costs::MICRO };

    /// The receive cost of `bytes`.
    pub fn recv(&self, bytes: u64) -> u64 {
        ((u128::from(self.recv_per_mib) * u128::from(bytes)) >> 20) as u64
    }

    /// The send cost of `bytes`.
    pub fn send(&self, bytes: u64) -> u64 {
        ((u128::from(self.send_per_mib) * u128::from(bytes)) >> 20) as u64
    }
}

// The measured figures, µs of CPU (`cost:<key>=` in the bench's output), from
// `nice -n 19 cargo bench -p shoal-benches --bench costs`, 2026-12-07 22:37 UTC, this 2-core
// machine (shared with another engineer's rollouts: CPU times, not wall times, are used).
/// `cost:dht_request_us` (both ends of one Kademlia request, 8 nodes)
const DHT_US: f64 = 200.2;
/// `cost:have_round_trip_us` (both ends)
const HAVE_US: f64 = 136.0;
/// `cost:plan_round_trip_us` (both ends; includes the refused tracker protocol name every
/// plan stream to an agent first offers)
const PLAN_RT_US: f64 = 441.5;
/// `cost:plan_n40_us`
const PLANNER_US: f64 = 2.93;
/// `cost:plan_n1000_us`
const PLANNER_1000_US: f64 = 24.59;
/// `cost:piece_mib_us` (both ends: encrypt, yamux, decrypt, copies)
const PIECE_MIB_US: f64 = 3174.1;
/// `cost:sha256_mib_us`
const SHA256_MIB_US: f64 = 607.8;

/// Half of a two-ended figure, in ns.
const fn half(us: f64) -> u64 {
    (us * 500.0) as u64
}

/// A one-ended figure, in ns.
const fn whole(us: f64) -> u64 {
    (us * 1000.0) as u64
}

/// Which costs a run charges (`--costs`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CostModel {
    /// Nothing costs CPU (the simulator before the cost model).
    None,
    /// The micro benchmark's figures ([`Costs::MICRO`]).
    Micro,
    /// The micro benchmark's, plus the recorded rollouts' unexplained CPU per MiB
    /// ([`Costs::RECORDED`]).
    Recorded,
}

impl CostModel {
    pub fn costs(self) -> Costs {
        match self {
            CostModel::None => Costs::NONE,
            CostModel::Micro => Costs::MICRO,
            CostModel::Recorded => Costs::RECORDED,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CostModel::None => "none",
            CostModel::Micro => "micro",
            CostModel::Recorded => "recorded",
        }
    }
}

/// Every host's CPU as a first-come-first-served queue (see the module docs).
pub struct Cpus {
    /// Cores per host.
    cores: f64,
    free_at: Vec<Time>,
    /// Per host: virtual nanoseconds busy.
    pub busy: Vec<u64>,
    /// Jobs charged, and their total and largest wait for the CPU.
    pub jobs: u64,
    pub wait_total: u64,
    pub wait_max: u64,
}

impl Cpus {
    pub fn new(hosts: usize, cores: f64) -> Cpus {
        Cpus { cores, free_at: vec![0; hosts], busy: vec![0; hosts], jobs: 0, wait_total: 0, wait_max: 0 }
    }

    /// Charges `work` (CPU ns of one core) on `host`, arriving at `at`; returns when it is
    /// done. Free work is done on arrival and does not queue.
    pub fn charge(&mut self, host: u32, at: Time, work: u64) -> Time {
        if work == 0 {
            return at;
        }
        let h = host as usize;
        let start = at.max(self.free_at[h]);
        let took = (work as f64 / self.cores).round() as Time;
        self.free_at[h] = start + took;
        self.busy[h] += took;
        let wait = start - at;
        self.jobs += 1;
        self.wait_total += wait;
        self.wait_max = self.wait_max.max(wait);
        start + took
    }
}
