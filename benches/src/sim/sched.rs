//! The interface between the simulator's shell and a download's scheduler: inputs (what
//! happened) in, actions (what to do) out, virtual time passed in, no I/O.
//!
//! The shell ([`super::world`]) is the simulator's stand-in for the agent's I/O: it turns
//! actions into messages and flows, and results back into inputs. [`StandIn`] is a compact
//! re-statement of the agent's schedule (`agent/src/fetch/task.rs` as of 2026-12-01), used
//! until the agent's own pure scheduler is available to plug in behind [`Scheduler`].

use std::collections::{BTreeMap, BTreeSet};

use super::bits::Bits;
use super::flow::Time;

pub type NodeIx = u32;

pub const MS: Time = 1_000_000;

/// What a peer answered to a `Have`.
pub enum HaveAnswer<'a> {
    /// Its verified pieces (`complete`: the whole blob verified and stored).
    Map { have: &'a Bits, complete: bool },
    /// It does not hold the digest (or does not know its size yet).
    Lacks,
    /// Nobody answered (the node is gone).
    Unreachable,
}

/// A tracker's plan, translated to node indices.
#[derive(Debug)]
pub struct PlanIn {
    pub peers: Vec<NodeIx>,
    pub assigned: Vec<u32>,
}

pub enum Input<'a> {
    /// The client asked for the blob: the download starts.
    Start,
    Providers(Vec<NodeIx>),
    Have {
        peer: NodeIx,
        answer: HaveAnswer<'a>,
    },
    /// The origin's HEAD answered (the size is known).
    Head,
    /// A piece arrived verified, from a peer or (None) from the origin.
    Verified {
        piece: u32,
        from: Option<NodeIx>,
    },
    /// A piece request failed: the peer lacks it (`unreachable` false) or is gone.
    PeerFailed {
        piece: u32,
        peer: NodeIx,
        unreachable: bool,
    },
    /// An origin span ended; `unfinished` pieces were not delivered.
    OriginDone {
        unfinished: Vec<u32>,
    },
    /// The tracker's answer (`None`: refused or unanswered).
    Plan(Option<PlanIn>),
    /// A peer asked us about this digest: it downloads it too.
    Asker(NodeIx),
    /// The time asked for by [`Scheduler::next_wake`] came.
    Timer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Announce,
    FindProviders,
    Head,
    AskHave(NodeIx),
    RequestPiece {
        peer: NodeIx,
        piece: u32,
    },
    /// Fetch pieces `first..end` from the origin in one Range request.
    FetchOrigin {
        first: u32,
        end: u32,
    },
    /// Report progress to the tracker and ask for a plan; `attest` are the origin pieces not
    /// reported before.
    AskPlan {
        attest: Vec<u32>,
        complete: bool,
    },
    /// Every piece is verified.
    Done,
}

/// One download's decisions.
pub trait Scheduler {
    fn handle(&mut self, now: Time, input: Input<'_>, out: &mut Vec<Action>);
    /// When to deliver [`Input::Timer`] next.
    fn next_wake(&self) -> Option<Time>;
    /// Verified pieces (what peers are told and served from), once the size is known.
    fn have(&self) -> Option<&Bits>;
    fn complete(&self) -> bool;
}

/// The agent's tuning (`FetchConfig` defaults and task.rs constants).
#[derive(Clone, Debug)]
pub struct Params {
    pub peer_concurrency: usize,
    pub per_peer_concurrency: usize,
    pub origin_concurrency: usize,
    pub owner_stall: Time,
    pub have_poll: Time,
    pub provider_poll: Time,
    pub plan_poll: Time,
    pub plan_min_gap: Time,
    pub plan_stale: Time,
    pub settle: Time,
    pub window: u32,
    pub max_span: u32,
    pub shared_span: u32,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            peer_concurrency: 16,
            per_peer_concurrency: 4,
            origin_concurrency: 4,
            owner_stall: 30_000 * MS,
            have_poll: 500 * MS,
            provider_poll: 2000 * MS,
            plan_poll: 500 * MS,
            plan_min_gap: 50 * MS,
            plan_stale: 10_000 * MS,
            settle: 500 * MS,
            window: 32,
            max_span: 16,
            shared_span: 2,
        }
    }
}

/// A cheap, well-mixed 64-bit hash (splitmix64's finaliser).
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

struct Peer {
    have: Bits,
    in_flight: u8,
    last_gain: Time,
    polling: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    /// First provider lookup and its `Have` round (`second`: after the settle delay).
    Lookup {
        second: bool,
    },
    Asking {
        second: bool,
        pending: usize,
    },
    Settling {
        until: Time,
    },
    Heading,
    /// Waiting for the first plan before scheduling.
    FirstPlan,
    Running,
    Done,
}

/// The stand-in scheduler: the agent's rules, restated compactly (see the module docs).
pub struct StandIn {
    p: Params,
    me: NodeIx,
    /// Rendezvous seed of this digest.
    key: u64,
    tracker: bool,
    n: u32,
    have: Bits,
    in_flight: Bits,
    waiting_since: Vec<Time>,
    peers: BTreeMap<NodeIx, Peer>,
    downloaders: BTreeSet<NodeIx>,
    /// Holders per piece among `peers`.
    avail: Vec<u16>,
    owners: Vec<NodeIx>,
    owners_dirty: bool,
    phase: Phase,
    /// Node indices are below this (where holder walks start).
    peer_span: u32,
    sized_by_peer: bool,
    peer_jobs: usize,
    /// Peers with `per_peer_concurrency` requests in flight.
    saturated: usize,
    origin_jobs: usize,
    next_have_poll: Time,
    next_provider_poll: Time,
    providers_polling: bool,
    rotate: u32,
    // Tracker coordination.
    assigned: BTreeSet<u32>,
    planned_at: Option<Time>,
    asking: bool,
    next_ask: Option<Time>,
    unreported: Vec<u32>,
}

impl StandIn {
    pub fn new(p: Params, me: NodeIx, nodes: u32, key: u64, pieces: u32, tracker: bool) -> StandIn {
        StandIn {
            me,
            key,
            tracker,
            n: pieces,
            have: Bits::new(pieces),
            in_flight: Bits::new(pieces),
            waiting_since: vec![Time::MAX; pieces as usize],
            peers: BTreeMap::new(),
            downloaders: BTreeSet::new(),
            avail: vec![0; pieces as usize],
            owners: vec![me; pieces as usize],
            owners_dirty: false,
            phase: Phase::Idle,
            peer_span: nodes.max(1),
            sized_by_peer: false,
            peer_jobs: 0,
            saturated: 0,
            origin_jobs: 0,
            next_have_poll: 0,
            next_provider_poll: 0,
            providers_polling: false,
            rotate: (mix(u64::from(me)) % u64::from(p.window)) as u32,
            assigned: BTreeSet::new(),
            planned_at: None,
            asking: false,
            next_ask: None,
            unreported: Vec::new(),
            p,
        }
    }

    fn add_peer(&mut self, peer: NodeIx, now: Time) {
        if peer == self.me {
            return;
        }
        if !self.peers.contains_key(&peer) {
            self.peers
                .insert(peer, Peer { have: Bits::new(self.n), in_flight: 0, last_gain: now, polling: false });
        }
        if self.downloaders.insert(peer) {
            self.owners_dirty = true;
        }
    }

    fn peer_room(&self) -> bool {
        self.peer_jobs < self.p.peer_concurrency && self.saturated < self.peers.len()
    }

    /// A request to `peer` ended (answered, failed, or the peer dropped).
    fn release(&mut self, peer: NodeIx) {
        if let Some(s) = self.peers.get_mut(&peer) {
            if s.in_flight as usize == self.p.per_peer_concurrency {
                self.saturated = self.saturated.saturating_sub(1);
            }
            s.in_flight = s.in_flight.saturating_sub(1);
        }
    }

    fn drop_peer(&mut self, peer: NodeIx) {
        if let Some(p) = self.peers.remove(&peer) {
            if p.in_flight as usize >= self.p.per_peer_concurrency {
                self.saturated = self.saturated.saturating_sub(1);
            }
            for i in p.have.ones() {
                self.avail[i as usize] -= 1;
            }
        }
        if self.downloaders.remove(&peer) {
            self.owners_dirty = true;
        }
    }

    fn update_have(&mut self, peer: NodeIx, have: &Bits, now: Time) {
        let Some(p) = self.peers.get_mut(&peer) else { return };
        p.polling = false;
        if have.len() != self.n {
            return;
        }
        let mut gained = false;
        for i in have.diff_ones(&p.have) {
            self.avail[i as usize] += 1;
            gained = true;
        }
        for i in p.have.diff_ones(have) {
            self.avail[i as usize] -= 1;
        }
        if gained {
            p.last_gain = now;
        }
        p.have.copy_from(have);
    }

    fn owner(&mut self, i: u32) -> NodeIx {
        if self.owners_dirty {
            self.owners_dirty = false;
            let me = self.me;
            for k in 0..self.n {
                let w = |node: NodeIx| mix(self.key ^ mix(u64::from(k) << 32 | u64::from(node)));
                let mut best = (w(me), me);
                for &d in &self.downloaders {
                    let c = (w(d), d);
                    if c > best {
                        best = c;
                    }
                }
                self.owners[k as usize] = best.1;
            }
        }
        self.owners[i as usize]
    }

    fn coordinated(&self, now: Time) -> bool {
        self.tracker && self.planned_at.is_some_and(|t| now.saturating_sub(t) < self.p.plan_stale)
    }

    fn mine(&mut self, i: u32, now: Time) -> bool {
        if self.coordinated(now) {
            self.assigned.contains(&i)
        } else {
            self.owner(i) == self.me
        }
    }

    fn start_running(&mut self, now: Time, out: &mut Vec<Action>) {
        self.next_have_poll = now + self.p.have_poll;
        self.next_provider_poll = now + 300 * MS;
        if self.tracker {
            self.phase = Phase::FirstPlan;
            self.asking = true;
            self.next_ask = Some(now + self.p.plan_poll);
            out.push(Action::AskPlan { attest: Vec::new(), complete: false });
        } else {
            self.phase = Phase::Running;
            self.schedule(now, out);
        }
    }

    /// After the startup `Have` round: settle and look again, ask the origin the size, or run.
    fn after_asking(&mut self, second: bool, now: Time, out: &mut Vec<Action>) {
        if !self.sized_by_peer && !second && !self.tracker {
            self.phase = Phase::Settling { until: now + self.p.settle };
        } else if !self.sized_by_peer {
            self.phase = Phase::Heading;
            out.push(Action::Head);
        } else {
            self.start_running(now, out);
        }
    }

    fn schedule(&mut self, now: Time, out: &mut Vec<Action>) {
        if self.phase != Phase::Running {
            return;
        }
        let n = self.n;
        let first = self.have.first_missing();
        if first >= n {
            return;
        }
        let window_end = (first + self.p.window).min(n);
        let span = window_end - first;
        let mut nobody_holds: Vec<u32> = Vec::new();
        let want_origin = self.origin_jobs < self.p.origin_concurrency;
        let mut peer_room = self.peer_room();
        if !peer_room && !want_origin {
            return;
        }
        let rotate = self.rotate % span.max(1);
        let order = (0..span).map(|k| first + (k + rotate) % span).chain(window_end..n);
        for i in order {
            if self.have.get(i) || self.in_flight.get(i) {
                continue;
            }
            if self.avail[i as usize] == 0 {
                if want_origin {
                    nobody_holds.push(i);
                }
                continue;
            }
            if !peer_room {
                if want_origin {
                    continue;
                }
                break;
            }
            // The least loaded holder, starting the walk at a point that depends on the piece
            // and on us (so that nodes do not all pick the same holder), stopping at the first
            // idle one.
            let start = (mix(u64::from(i) << 32 ^ u64::from(self.me)) % u64::from(self.peer_span)) as NodeIx;
            let cap = self.p.per_peer_concurrency;
            let mut best: Option<(u8, NodeIx)> = None;
            for (p, s) in self.peers.range(start..).chain(self.peers.range(..start)) {
                if s.have.get(i) && (s.in_flight as usize) < cap && best.is_none_or(|b| s.in_flight < b.0) {
                    best = Some((s.in_flight, *p));
                    if s.in_flight == 0 {
                        break;
                    }
                }
            }
            let best = best.map(|b| b.1);
            let Some(peer) = best else { continue };
            let s = self.peers.get_mut(&peer).expect("a peer");
            s.in_flight += 1;
            if s.in_flight as usize == self.p.per_peer_concurrency {
                self.saturated += 1;
            }
            self.peer_jobs += 1;
            self.in_flight.set(i);
            out.push(Action::RequestPiece { peer, piece: i });
            peer_room = self.peer_room();
        }
        nobody_holds.sort_unstable();
        let coordinated = self.coordinated(now);
        for i in nobody_holds {
            if self.origin_jobs >= self.p.origin_concurrency {
                break;
            }
            if self.in_flight.get(i) {
                continue;
            }
            let waited = if i < window_end {
                let since = &mut self.waiting_since[i as usize];
                if *since == Time::MAX {
                    *since = now;
                }
                now - *since
            } else {
                0
            };
            let take = if self.mine(i, now) {
                true
            } else if coordinated {
                false
            } else {
                let owner = self.owner(i);
                let stall = self.p.owner_stall;
                let owner_stalled =
                    self.peers.get(&owner).is_none_or(|s| now.saturating_sub(s.last_gain) > stall);
                (waited > stall && owner_stalled) || waited > stall * 4
            };
            if !take {
                continue;
            }
            let max_span =
                if self.downloaders.is_empty() || coordinated { self.p.max_span } else { self.p.shared_span };
            let mut end = i + 1;
            while end < n
                && end - i < max_span
                && !self.have.get(end)
                && !self.in_flight.get(end)
                && self.mine(end, now)
                && self.avail[end as usize] == 0
            {
                end += 1;
            }
            for k in i..end {
                self.in_flight.set(k);
            }
            self.origin_jobs += 1;
            out.push(Action::FetchOrigin { first: i, end });
        }
    }

    fn polls(&mut self, now: Time, out: &mut Vec<Action>) {
        if !matches!(self.phase, Phase::Running) {
            return;
        }
        if self.tracker && !self.asking {
            let drained = !self.assigned.is_empty()
                && self.assigned.iter().all(|&k| self.have.get(k) || self.in_flight.get(k));
            let due = self.next_ask.is_none_or(|t| now >= t);
            if due
                || (drained
                    && self.next_ask.is_some_and(|t| now + self.p.plan_poll - self.p.plan_min_gap >= t))
            {
                self.asking = true;
                self.next_ask = Some(now + self.p.plan_poll);
                out.push(Action::AskPlan { attest: std::mem::take(&mut self.unreported), complete: false });
            }
        }
        if now >= self.next_have_poll {
            self.next_have_poll = now + self.p.have_poll;
            for (peer, s) in self.peers.iter_mut() {
                if !s.polling && !s.have.is_full() {
                    s.polling = true;
                    out.push(Action::AskHave(*peer));
                }
            }
        }
        if now >= self.next_provider_poll && !self.providers_polling {
            self.next_provider_poll = now + self.p.provider_poll;
            self.providers_polling = true;
            out.push(Action::FindProviders);
        }
    }
}

impl Scheduler for StandIn {
    fn handle(&mut self, now: Time, input: Input<'_>, out: &mut Vec<Action>) {
        if self.phase == Phase::Done {
            return;
        }
        match input {
            Input::Start => {
                self.phase = Phase::Lookup { second: false };
                out.push(Action::Announce);
                out.push(Action::FindProviders);
                return;
            }
            Input::Providers(found) => {
                self.providers_polling = false;
                match self.phase {
                    Phase::Lookup { second } => {
                        let fresh: Vec<NodeIx> = found
                            .into_iter()
                            .filter(|p| *p != self.me && !self.peers.contains_key(p))
                            .collect();
                        for &p in &fresh {
                            self.peers.insert(
                                p,
                                Peer { have: Bits::new(self.n), in_flight: 0, last_gain: now, polling: true },
                            );
                            out.push(Action::AskHave(p));
                        }
                        if fresh.is_empty() {
                            self.after_asking(second, now, out);
                        } else {
                            self.phase = Phase::Asking { second, pending: fresh.len() };
                        }
                        return;
                    }
                    _ => {
                        for p in found {
                            if !self.peers.contains_key(&p) {
                                self.add_peer(p, now);
                            }
                        }
                    }
                }
            }
            Input::Have { peer, answer } => {
                if let Phase::Asking { second, pending } = self.phase {
                    match answer {
                        HaveAnswer::Map { have, complete } => {
                            debug_assert!(!complete || have.is_full());
                            self.sized_by_peer = true;
                            self.add_peer(peer, now);
                            self.update_have(peer, have, now);
                        }
                        HaveAnswer::Lacks => self.add_peer(peer, now),
                        HaveAnswer::Unreachable => {
                            self.peers.remove(&peer);
                        }
                    }
                    if let Some(p) = self.peers.get_mut(&peer) {
                        p.polling = false;
                    }
                    if pending <= 1 {
                        self.after_asking(second, now, out);
                    } else {
                        self.phase = Phase::Asking { second, pending: pending - 1 };
                    }
                    return;
                }
                match answer {
                    HaveAnswer::Map { have, .. } => self.update_have(peer, have, now),
                    HaveAnswer::Lacks => {
                        if let Some(p) = self.peers.get_mut(&peer) {
                            p.polling = false;
                        }
                    }
                    HaveAnswer::Unreachable => self.drop_peer(peer),
                }
            }
            Input::Head => {
                if self.phase == Phase::Heading {
                    self.start_running(now, out);
                    return;
                }
            }
            Input::Verified { piece, from } => {
                self.in_flight.unset(piece);
                match from {
                    Some(peer) => {
                        self.release(peer);
                        self.peer_jobs -= 1;
                    }
                    None => {
                        if self.tracker {
                            self.unreported.push(piece);
                        }
                    }
                }
                self.have.set(piece);
                if self.have.is_full() {
                    self.phase = Phase::Done;
                    if self.tracker {
                        out.push(Action::AskPlan {
                            attest: std::mem::take(&mut self.unreported),
                            complete: true,
                        });
                    }
                    out.push(Action::Done);
                    return;
                }
            }
            Input::PeerFailed { piece, peer, unreachable } => {
                self.in_flight.unset(piece);
                self.peer_jobs -= 1;
                if unreachable {
                    self.drop_peer(peer);
                } else if self.peers.contains_key(&peer) {
                    self.release(peer);
                    let s = self.peers.get_mut(&peer).expect("checked");
                    if s.have.get(piece) {
                        s.have.unset(piece);
                        self.avail[piece as usize] -= 1;
                    }
                }
            }
            Input::OriginDone { unfinished } => {
                self.origin_jobs -= 1;
                for i in unfinished {
                    self.in_flight.unset(i);
                }
            }
            Input::Plan(plan) => {
                self.asking = false;
                if let Some(plan) = plan {
                    self.planned_at = Some(now);
                    self.assigned = plan.assigned.into_iter().filter(|&i| i < self.n).collect();
                    for p in plan.peers {
                        self.add_peer(p, now);
                    }
                }
                if self.phase == Phase::FirstPlan {
                    self.phase = Phase::Running;
                }
            }
            Input::Asker(peer) => {
                if matches!(self.phase, Phase::Running | Phase::FirstPlan) && !self.peers.contains_key(&peer)
                {
                    self.add_peer(peer, now);
                }
            }
            Input::Timer => {
                if let Phase::Settling { until } = self.phase {
                    if now >= until {
                        self.phase = Phase::Lookup { second: true };
                        out.push(Action::FindProviders);
                    }
                    return;
                }
            }
        }
        self.schedule(now, out);
        self.polls(now, out);
    }

    fn next_wake(&self) -> Option<Time> {
        match self.phase {
            Phase::Settling { until } => Some(until),
            Phase::Running => {
                let mut wake = self.next_have_poll.min(self.next_provider_poll);
                if let Some(t) = self.next_ask.filter(|_| self.tracker && !self.asking) {
                    wake = wake.min(t);
                }
                Some(wake)
            }
            _ => None,
        }
    }

    fn have(&self) -> Option<&Bits> {
        matches!(self.phase, Phase::FirstPlan | Phase::Running | Phase::Done).then_some(&self.have)
    }

    fn complete(&self) -> bool {
        self.phase == Phase::Done
    }
}
