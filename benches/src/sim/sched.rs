//! One simulated download: the steps the agent's download task takes before its scheduler
//! exists (announce, find providers, ask them `Have`, ask the origin the size), then
//! the agent's own pure scheduler, `shoal_agent::fetch::scheduler::Scheduler`, unchanged.
//!
//! The start-up steps restate `agent/src/fetch/task.rs::download` (they are I/O, so they live
//! in the shell there too): look up the providers and ask each `Have`; if nobody named a
//! size, ask the origin (HEAD). Nobody waits for other starters: the digest's planner splits
//! the origin pieces among whoever asks.
//! Then the scheduler is created with the `Have` answers, and from there every decision is
//! the agent's code: the world ([`super::world`]) executes its actions and feeds it events.

use shoal_agent::fetch::net::{NodeId, PeerError, PeerHave};
use shoal_agent::fetch::scheduler::{Config, Event, Scheduler};
use shoal_agent::pieces::Layout;
use shoal_agent::types::Digest;

use super::flow::Time;

pub type NodeIx = u32;

pub const MS: Time = 1_000_000;

/// A cheap, well-mixed 64-bit hash (splitmix64's finaliser).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the provider lookup.
    Lookup,
    /// Waiting for `pending` `Have` answers.
    Asking {
        pending: usize,
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
    answers: Vec<(NodeId, Result<PeerHave, PeerError>)>,
    asked: Vec<NodeIx>,
    pub sched: Option<Scheduler>,
}

impl Download {
    pub fn new() -> Download {
        Download { phase: Phase::Lookup, answers: Vec::new(), asked: Vec::new(), sched: None }
    }

    /// A provider lookup answered during start-up.
    pub fn providers(&mut self, found: Vec<NodeIx>, out: &mut Vec<Startup>) {
        let Phase::Lookup = self.phase else { return };
        let fresh: Vec<NodeIx> = found.into_iter().filter(|p| !self.asked.contains(p)).collect();
        self.asked.extend(&fresh);
        if fresh.is_empty() {
            self.after_asking(out);
            return;
        }
        self.phase = Phase::Asking { pending: fresh.len() };
        out.extend(fresh.into_iter().map(Startup::AskHave));
    }

    /// A `Have` answer during start-up.
    pub fn have(&mut self, peer: NodeId, result: Result<PeerHave, PeerError>, out: &mut Vec<Startup>) {
        let Phase::Asking { pending } = self.phase else { return };
        self.answers.push((peer, result));
        if pending <= 1 {
            self.after_asking(out);
        } else {
            self.phase = Phase::Asking { pending: pending - 1 };
        }
    }

    fn sized(&self) -> bool {
        self.answers.iter().any(|(_, r)| r.is_ok())
    }

    fn after_asking(&mut self, out: &mut Vec<Startup>) {
        if self.sized() {
            out.push(Startup::Started);
        } else {
            self.phase = Phase::Heading;
            out.push(Startup::Head);
        }
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
