//! One planner without a tracker: each digest's *coordinator* is the agent whose peer id is
//! XOR-closest to the digest's DHT key, and it plans that digest with the tracker's own pure
//! planner ([`shoal_plan::State`]).
//!
//! ## Why
//!
//! Who fetches which piece from the origin has one answer in both modes: the planner's.
//! With a tracker, the tracker runs it for every digest. Without one, the work is spread by
//! the DHT itself: the node closest to a digest's key (one `get_closest_peers` lookup, the
//! same walk that finds where the digest's provider records live) answers that digest's
//! plan requests, exactly as a tracker would. A download costs one DHT lookup to find its
//! coordinator, then a plan request every [`PLAN_POLL`](shoal_protocol::timing::PLAN_POLL)
//! that goes straight to it over a connection kept open: no per-poll DHT walks.
//!
//! ## Which node, and when it changes
//!
//! [`Coordinators`] remembers, per digest, the lookup's answer (closest first, this node
//! included) and which of them is asked now. A request that fails (the node is gone, refuses
//! or does not answer within the request timeout) moves to the next closest; past the last,
//! the next request looks up again. An answer unused for [`FORGET_AFTER`] is forgotten, so a
//! later download of the digest looks up again and finds nodes that joined since.
//!
//! The planner holds soft state only: a node that becomes coordinator (the previous one
//! died) starts empty and rebuilds the digest's picture from the plan requests that arrive,
//! each of which carries the requester's whole bitfield.
//!
//! ## What a coordinator learns
//!
//! Digests, piece bitfields and the sha256 of pieces, the same as any peer asking `Have`:
//! never content, never a client's credentials. It cannot read a private image through what
//! it coordinates; its piece requests are access-checked like anyone's.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use shoal_plan::State;
use shoal_protocol::tracker::{PlanRequest, TrackerRequest, TrackerResponse};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::{OutcomeLabels, METRICS};
use crate::swarm::{Client, InboundTrackerRequest, Multiaddr, PeerId};
use crate::types::Digest;

/// Digests whose coordinator is remembered at once (each entry is a short list of peer ids).
const MAX_REMEMBERED: usize = 4096;
/// A remembered coordinator not asked for this long is forgotten: the next download of the
/// digest looks it up again.
pub const FORGET_AFTER: Duration = Duration::from_secs(30);
/// How often the planner forgets dead nodes and idle digests.
const TICK: Duration = Duration::from_secs(1);

/// Whom to ask for a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// This node coordinates the digest: plan locally.
    Me,
    Peer(PeerId),
    /// Not known yet and a lookup is already under way: ask again later.
    LookingUp,
    /// Not known: look it up ([`Coordinators::found`] takes the answer).
    LookUp,
}

struct Known {
    /// The lookup's answer, closest first (this node among them).
    closest: Vec<PeerId>,
    /// Index into `closest` of the node asked now.
    at: usize,
    used: Instant,
    /// Its answers that failed in a row (see [`Coordinators::failed`]).
    failures: u32,
}

/// Failures in a row (closed streams, refusals) after which a coordinator that is still
/// reachable is given up on: one such failure may be a dropped request under load, and
/// moving on too eagerly splits a digest between two planners.
pub const MAX_SOFT_FAILURES: u32 = 3;

/// Who coordinates which digest, as far as this node knows (see the module docs). Pure:
/// `now` comes in with every call.
pub struct Coordinators {
    me: PeerId,
    known: LruCache<Digest, Known>,
    looking: HashSet<Digest>,
}

impl Coordinators {
    pub fn new(me: PeerId) -> Self {
        Coordinators {
            me,
            known: LruCache::new(NonZeroUsize::new(MAX_REMEMBERED).expect("non-zero")),
            looking: HashSet::new(),
        }
    }

    /// Whom to ask about `digest` now. [`Target::LookUp`] marks a lookup under way until
    /// [`Coordinators::found`].
    pub fn target(&mut self, digest: &Digest, now: Instant) -> Target {
        if let Some(k) = self.known.get_mut(digest) {
            if now.saturating_duration_since(k.used) < FORGET_AFTER {
                k.used = now;
                let peer = k.closest[k.at];
                return if peer == self.me { Target::Me } else { Target::Peer(peer) };
            }
            self.known.pop(digest);
        }
        if self.looking.len() < MAX_REMEMBERED && self.looking.insert(*digest) {
            Target::LookUp
        } else {
            Target::LookingUp
        }
    }

    /// A lookup's answer: the nodes closest to the digest's key, closest first. An empty
    /// answer (the swarm stopped) makes this node the coordinator.
    pub fn found(&mut self, digest: &Digest, mut closest: Vec<PeerId>, now: Instant) -> Target {
        self.looking.remove(digest);
        if !closest.contains(&self.me) {
            closest.push(self.me);
        }
        let first = closest[0];
        self.known.put(*digest, Known { closest, at: 0, used: now, failures: 0 });
        if first == self.me {
            Target::Me
        } else {
            Target::Peer(first)
        }
    }

    /// `peer` answered a plan request for `digest`.
    pub fn answered(&mut self, digest: &Digest, peer: PeerId) {
        if let Some(k) = self.known.peek_mut(digest) {
            if k.closest[k.at] == peer {
                k.failures = 0;
            }
        }
    }

    /// `peer` did not answer a plan request for `digest`. `gone`: it cannot be reached (no
    /// connection, or no answer within the request timeout): ask the next closest from now
    /// on. Otherwise (the stream closed, a refusal) only after [`MAX_SOFT_FAILURES`] in a
    /// row. Past the last of them, the next request looks up again.
    pub fn failed(&mut self, digest: &Digest, peer: PeerId, gone: bool) {
        let Some(k) = self.known.get_mut(digest) else { return };
        if k.closest[k.at] != peer {
            return; // another request moved on already
        }
        k.failures += 1;
        if !gone && k.failures < MAX_SOFT_FAILURES {
            return;
        }
        k.at += 1;
        k.failures = 0;
        if k.at >= k.closest.len() {
            self.known.pop(digest);
        }
    }
}

/// The planner of the digests this node coordinates, and the record of who coordinates the
/// digests it downloads.
pub struct Coordinator {
    me: PeerId,
    state: Mutex<State>,
    /// This node's listen addresses, handed out with it as a peer in the plans it makes.
    addrs: Mutex<Vec<Multiaddr>>,
    pub(crate) coordinators: Mutex<Coordinators>,
}

impl Coordinator {
    pub fn new(me: PeerId) -> Self {
        Coordinator {
            me,
            state: Mutex::new(State::new()),
            addrs: Mutex::new(Vec::new()),
            coordinators: Mutex::new(Coordinators::new(me)),
        }
    }

    /// Plans `req` for this node's own download.
    pub fn plan_local(&self, req: &PlanRequest) -> TrackerResponse {
        let addrs = crate::sync::lock(&self.addrs).clone();
        self.plan(self.me, &addrs, req, "local")
    }

    fn plan(
        &self,
        peer: PeerId,
        addrs: &[Multiaddr],
        req: &PlanRequest,
        label: &'static str,
    ) -> TrackerResponse {
        let answer = crate::sync::lock(&self.state).plan(peer, addrs, req, Instant::now());
        let outcome = if matches!(answer, TrackerResponse::Refused(_)) { "refused" } else { label };
        METRICS.coordinator_plans.get_or_create(&OutcomeLabels { outcome }).inc();
        answer
    }

    /// Answers peers' plan requests for the digests this node coordinates, and keeps the
    /// planner's soft state tidy, until `cancel`.
    pub async fn serve(
        self: Arc<Self>,
        client: Client,
        mut inbound: mpsc::Receiver<InboundTrackerRequest>,
        cancel: CancellationToken,
    ) {
        if let Ok(addrs) = client.listen_addrs().await {
            *crate::sync::lock(&self.addrs) = addrs;
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                request = inbound.recv() => {
                    let Some(InboundTrackerRequest { peer, addrs, request, channel }) = request else { return };
                    let answer = match &request {
                        TrackerRequest::Plan(req) => self.plan(peer, &addrs, req, "remote"),
                        TrackerRequest::Heartbeat(_) => {
                            TrackerResponse::Refused("an agent answers plan requests only".into())
                        }
                    };
                    // The answer is computed in microseconds; only sending it waits.
                    if client.respond_tracker(channel, answer).await.is_err() {
                        return;
                    }
                }
                _ = tick.tick() => {
                    let unix_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64);
                    crate::sync::lock(&self.state).tick(Instant::now(), unix_ms);
                }
                () = cancel.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn one_lookup_then_the_closest_until_it_fails() {
        let me = peer();
        let (a, b) = (peer(), peer());
        let d = Digest::of(b"layer");
        let t0 = Instant::now();
        let mut c = Coordinators::new(me);
        assert_eq!(c.target(&d, t0), Target::LookUp);
        assert_eq!(c.target(&d, t0), Target::LookingUp, "one lookup at a time");
        assert_eq!(c.found(&d, vec![a, me, b], t0), Target::Peer(a));
        for s in 1..100 {
            assert_eq!(c.target(&d, t0 + Duration::from_millis(500 * s)), Target::Peer(a));
        }
        let t1 = t0 + Duration::from_secs(50);
        c.failed(&d, b, true); // not the one asked: nothing changes
        assert_eq!(c.target(&d, t1), Target::Peer(a));
        // Closed streams: given up on only after MAX_SOFT_FAILURES in a row.
        for _ in 1..MAX_SOFT_FAILURES {
            c.failed(&d, a, false);
            assert_eq!(c.target(&d, t1), Target::Peer(a));
        }
        c.answered(&d, a);
        for _ in 1..MAX_SOFT_FAILURES {
            c.failed(&d, a, false);
        }
        assert_eq!(c.target(&d, t1), Target::Peer(a), "an answer resets the count");
        c.failed(&d, a, false);
        assert_eq!(c.target(&d, t1), Target::Me, "the next closest is this node");
        c.failed(&d, me, true);
        assert_eq!(c.target(&d, t1), Target::Peer(b));
        c.failed(&d, b, true);
        assert_eq!(c.target(&d, t1), Target::LookUp, "every one failed: look up again");
    }

    #[test]
    fn alone_this_node_coordinates_and_an_idle_answer_is_forgotten() {
        let me = peer();
        let d = Digest::of(b"config");
        let t0 = Instant::now();
        let mut c = Coordinators::new(me);
        assert_eq!(c.target(&d, t0), Target::LookUp);
        assert_eq!(c.found(&d, Vec::new(), t0), Target::Me);
        assert_eq!(c.target(&d, t0 + FORGET_AFTER / 2), Target::Me);
        assert_eq!(c.target(&d, t0 + FORGET_AFTER / 2 + FORGET_AFTER), Target::LookUp);
    }
}
