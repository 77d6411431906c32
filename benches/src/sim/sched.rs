//! One simulated download: the steps the agent's download task takes before its scheduler
//! exists (announce, find providers, ask them `Have`, settle, ask the origin the size), then
//! the agent's own pure scheduler, `shoal_agent::fetch::scheduler::Scheduler`, unchanged.
//!
//! The start-up steps restate `agent/src/fetch/task.rs::download` (they are I/O, so they live
//! in the shell there too): look up the providers and ask each `Have`; if nobody named a
//! size and there is no tracker, wait [`SETTLE`] for nodes that started at the same moment,
//! look up again and ask the new ones; if still nobody named a size, ask the origin (HEAD).
//! Then the scheduler is created with the `Have` answers, and from there every decision is
//! the agent's code: the world ([`super::world`]) executes its actions and feeds it events.

use shoal_agent::fetch::net::{NodeId, PeerError, PeerHave};
use shoal_agent::fetch::scheduler::{Config, Event, Scheduler};
use shoal_agent::pieces::Layout;
use shoal_agent::types::Digest;

use super::flow::Time;

pub type NodeIx = u32;

pub const MS: Time = 1_000_000;
/// The agent's settle delay (`agent/src/p2p/mod.rs::SETTLE_DELAY`).
pub const SETTLE: Time = 500 * MS;

/// A cheap, well-mixed 64-bit hash (splitmix64's finaliser).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a provider lookup (`second`: the one after the settle delay).
    Lookup {
        second: bool,
    },
    /// Waiting for `pending` `Have` answers.
    Asking {
        second: bool,
        pending: usize,
    },
    Settling {
        until: Time,
    },
    Heading,
    /// The scheduler runs.
    Running,
    Ended,
}

/// What the start-up steps want done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    FindProviders,
    AskHave(NodeIx),
    Head,
    /// The scheduler exists now: drain its actions.
    Started,
}

pub struct Download {
    pub phase: Phase,
    tracker: bool,
    answers: Vec<(NodeId, Result<PeerHave, PeerError>)>,
    asked: Vec<NodeIx>,
    pub sched: Option<Scheduler>,
}

impl Download {
    pub fn new(tracker: bool) -> Download {
        Download {
            phase: Phase::Lookup { second: false },
            tracker,
            answers: Vec::new(),
            asked: Vec::new(),
            sched: None,
        }
    }

    pub fn settle_until(&self) -> Option<Time> {
        match self.phase {
            Phase::Settling { until } => Some(until),
            _ => None,
        }
    }

    /// A provider lookup answered during start-up.
    pub fn providers(&mut self, found: Vec<NodeIx>, now: Time, out: &mut Vec<Startup>) {
        let Phase::Lookup { second } = self.phase else { return };
        let fresh: Vec<NodeIx> = found.into_iter().filter(|p| !self.asked.contains(p)).collect();
        self.asked.extend(&fresh);
        if fresh.is_empty() {
            self.after_asking(second, now, out);
            return;
        }
        self.phase = Phase::Asking { second, pending: fresh.len() };
        out.extend(fresh.into_iter().map(Startup::AskHave));
    }

    /// A `Have` answer during start-up.
    pub fn have(
        &mut self,
        peer: NodeId,
        result: Result<PeerHave, PeerError>,
        now: Time,
        out: &mut Vec<Startup>,
    ) {
        let Phase::Asking { second, pending } = self.phase else { return };
        self.answers.push((peer, result));
        if pending <= 1 {
            self.after_asking(second, now, out);
        } else {
            self.phase = Phase::Asking { second, pending: pending - 1 };
        }
    }

    fn sized(&self) -> bool {
        self.answers.iter().any(|(_, r)| r.is_ok())
    }

    fn after_asking(&mut self, second: bool, now: Time, out: &mut Vec<Startup>) {
        if self.sized() {
            out.push(Startup::Started);
        } else if !second && !self.tracker {
            // The world wakes us at `until` and we look again.
            self.phase = Phase::Settling { until: now + SETTLE };
        } else {
            self.phase = Phase::Heading;
            out.push(Startup::Head);
        }
    }

    /// The settle delay passed.
    pub fn settled(&mut self, out: &mut Vec<Startup>) {
        self.phase = Phase::Lookup { second: true };
        out.push(Startup::FindProviders);
    }

    /// Creates the agent's scheduler and hands it the start-up `Have` answers.
    pub fn start(
        &mut self,
        cfg: Config,
        digest: Digest,
        layout: Layout,
        me: NodeId,
        now: std::time::Instant,
    ) -> &mut Scheduler {
        self.phase = Phase::Running;
        let mut s = Scheduler::new(cfg, digest, layout, me, &[], now);
        for (peer, result) in self.answers.drain(..) {
            s.handle(Event::Have { peer, result }, now);
        }
        self.asked = Vec::new();
        self.sched.insert(s)
    }
}
