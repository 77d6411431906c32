//! Timelines of one download's scheduler: every event and every instant chosen by the test,
//! no tasks, no sockets, no clock.

use super::*;
use crate::pieces::origin_owner;

const MIB: u64 = 1 << 20;

/// A download with a planner to ask (a tracker or its digest's coordinator): nothing from
/// the origin before the first answer.
const PLANNED: Config = Config {
    peer_concurrency: 16,
    per_peer_concurrency: 4,
    origin_concurrency: 4,
    owner_stall: Duration::from_secs(30),
    tracker: true,
    give_up_after: GIVE_UP_AFTER,
};

fn node(b: u8) -> NodeId {
    NodeId::new(&[b; 8])
}

/// The digest of piece `i` as the honest world knows it.
fn good(i: u32) -> [u8; 32] {
    let mut d = [0u8; 32];
    d[..4].copy_from_slice(&i.to_le_bytes());
    d[31] = 1;
    d
}

fn bad(i: u32) -> [u8; 32] {
    let mut d = good(i);
    d[30] = 0xff;
    d
}

fn have(layout: Layout, pieces: impl IntoIterator<Item = u32>, digest: impl Fn(u32) -> [u8; 32]) -> PeerHave {
    let mut bits = Bitfield::new(layout.pieces());
    let mut piece_digests = Vec::new();
    for i in pieces {
        bits.set(i);
        piece_digests.push((i, digest(i)));
    }
    PeerHave {
        size: layout.size,
        piece_size: layout.piece_size,
        complete: bits.is_full(),
        have: bits,
        piece_digests,
        media_type: None,
    }
}

struct Timeline {
    s: Scheduler,
    t0: Instant,
    now: Instant,
    layout: Layout,
}

impl Timeline {
    fn new(size: u64, config: Config, me: NodeId, resumed: &[(u32, [u8; 32])]) -> Self {
        let t0 = Instant::now();
        let layout = Layout::for_size(size);
        let s = Scheduler::new(config, Digest::of(b"blob"), layout, me, resumed, t0);
        Timeline { s, t0, now: t0, layout }
    }

    fn actions(&mut self) -> Vec<Action> {
        std::iter::from_fn(|| self.s.poll_action()).collect()
    }

    fn event(&mut self, e: Event) -> Vec<Action> {
        self.s.handle(e, self.now);
        self.actions()
    }

    /// Advances to `at` (from the start), firing every timeout on the way, and returns the
    /// actions.
    fn until(&mut self, at: Duration) -> Vec<Action> {
        let end = self.t0 + at;
        let mut out = Vec::new();
        for _ in 0..100_000 {
            match self.s.poll_timeout() {
                Some(t) if t <= end => {
                    self.now = t.max(self.now);
                    self.s.handle_timeout(self.now);
                    out.extend(self.actions());
                }
                _ => break,
            }
        }
        self.now = end;
        self.s.handle_timeout(end);
        out.extend(self.actions());
        out
    }
}

fn requests(actions: &[Action]) -> Vec<(NodeId, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::RequestPiece { peer, index, .. } => Some((peer.clone(), *index)),
            _ => None,
        })
        .collect()
}

fn origin(actions: &[Action]) -> Vec<(u32, u32)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::FetchOrigin { first, end, .. } => Some((*first, *end)),
            _ => None,
        })
        .collect()
}

fn origin_pieces(actions: &[Action]) -> Vec<u32> {
    origin(actions).into_iter().flat_map(|(a, b)| a..b).collect()
}

/// Delivers origin pieces `first..end` (honest bytes) and ends the span.
fn deliver_origin(t: &mut Timeline, first: u32, end: u32) -> Vec<Action> {
    let mut out = Vec::new();
    for i in first..end {
        out.extend(t.event(Event::Verified { index: i, digest: good(i), from: None }));
    }
    out.extend(t.event(Event::OriginDone { first, end, unfinished: Vec::new(), error: None }));
    out
}

/// Delivers every origin span in `acts`, and those that follow, honestly.
fn drain_origin(t: &mut Timeline, acts: &[Action]) -> Vec<Action> {
    let mut out = Vec::new();
    let mut pending = origin(acts);
    while let Some((a, b)) = pending.pop() {
        let more = deliver_origin(t, a, b);
        pending.extend(origin(&more));
        out.extend(more);
    }
    out
}

/// A node alone fetches everything from the origin in spans, asks for the whole digest, and
/// is done when it matched.
#[test]
fn alone_everything_from_the_origin_then_done() {
    let me = node(1);
    let mut t = Timeline::new(40 * MIB, Config::default(), me, &[]);
    let first = t.actions();
    let spans = origin(&first);
    assert_eq!(spans.len(), 3, "three spans of MAX_SPAN (origin_concurrency 4): {spans:?}");
    assert!(spans.iter().all(|(a, b)| b - a <= MAX_SPAN));
    let mut pending: Vec<(u32, u32)> = spans;
    let mut all = Vec::new();
    while let Some((a, b)) = pending.pop() {
        let acts = deliver_origin(&mut t, a, b);
        pending.extend(origin(&acts));
        all.extend(acts);
    }
    assert!(all.contains(&Action::CheckWhole));
    assert!(all.contains(&Action::SaveState));
    assert_eq!(t.s.stats().from_origin, 40);
    assert_eq!(t.event(Event::WholeDigest { matched: true }), vec![Action::Done]);
    assert!(t.s.is_done());
}

/// A piece peers hold is requested from a peer, with the digest the peer attested.
#[test]
fn pieces_peers_hold_come_from_peers() {
    let mut t = Timeline::new(4 * MIB, PLANNED, node(1), &[]);
    t.actions();
    let layout = t.layout;
    let acts = t.event(Event::Have { peer: node(2), result: Ok(have(layout, 0..4, good)) });
    let req = requests(&acts);
    assert_eq!(req.len(), 4);
    assert!(acts
        .iter()
        .any(|a| matches!(a, Action::RequestPiece { index: 0, expected, .. } if *expected == good(0))));
    assert!(origin(&acts).is_empty());
}

/// A busy peer is left alone for BUSY_BACKOFF, then asked again.
#[test]
fn busy_peer_backs_off() {
    let cfg = Config { per_peer_concurrency: 1, ..PLANNED };
    let mut t = Timeline::new(MIB, cfg, node(1), &[]);
    t.actions();
    let h = have(t.layout, [0], good);
    let acts = t.event(Event::Have { peer: node(2), result: Ok(h) });
    assert_eq!(requests(&acts), vec![(node(2), 0)]);
    t.now += Duration::from_millis(10);
    let acts = t.event(Event::PeerFailed { index: 0, peer: node(2), error: PeerError::Busy });
    assert!(requests(&acts).is_empty(), "not asked again at once");
    // The scheduler wakes itself when the backoff ends.
    assert!(t.s.poll_timeout().unwrap() <= t.now + BUSY_BACKOFF);
    let acts = t.until(Duration::from_millis(10) + BUSY_BACKOFF - Duration::from_millis(1));
    assert!(requests(&acts).is_empty(), "still backing off: {acts:?}");
    let acts = t.until(Duration::from_millis(10) + BUSY_BACKOFF);
    assert_eq!(requests(&acts), vec![(node(2), 0)]);
}

/// Lacks: the peer's bit is cleared and the piece goes elsewhere.
#[test]
fn a_peer_that_lacks_a_piece_is_not_asked_for_it_again() {
    let mut t = Timeline::new(MIB, Config::default(), node(1), &[]);
    t.actions();
    let h = have(t.layout, [0], good);
    t.event(Event::Have { peer: node(2), result: Ok(h.clone()) });
    let acts = t.event(Event::Have { peer: node(3), result: Ok(h) });
    assert!(requests(&acts).is_empty(), "one request for the piece is enough");
    let acts = t.event(Event::PeerFailed { index: 0, peer: node(2), error: PeerError::Lacks });
    assert_eq!(requests(&acts), vec![(node(3), 0)]);
}

/// A piece that does not match its attested digest bans the peer; the piece is taken from
/// another peer, and the banned peer is never asked or added again.
#[test]
fn bad_piece_bans_the_peer() {
    let mut t = Timeline::new(MIB, PLANNED, node(1), &[]);
    t.actions();
    let layout = t.layout;
    let acts = t.event(Event::Have { peer: node(2), result: Ok(have(layout, [0], good)) });
    assert_eq!(requests(&acts), vec![(node(2), 0)]);
    t.event(Event::Have { peer: node(3), result: Ok(have(layout, [0], good)) });
    let acts = t.event(Event::BadPiece { index: 0, peer: node(2) });
    assert!(acts.contains(&Action::Ban { peer: node(2), reason: BanReason::BadPiece }));
    assert_eq!(requests(&acts), vec![(node(3), 0)]);
    let acts =
        t.event(Event::PeerFailed { index: 0, peer: node(3), error: PeerError::Unreachable("x".into()) });
    assert!(requests(&acts).is_empty());
    let acts = t.event(Event::Have { peer: node(2), result: Ok(have(layout, [0], good)) });
    assert!(requests(&acts).is_empty(), "a banned peer is not taken back: {acts:?}");
    let acts = t.event(Event::Providers(vec![node(2)]));
    assert!(requests(&acts).is_empty());
    assert_eq!(t.s.stats().bans, 1);
}

/// Resumed pieces are neither fetched nor requested, and the watermark starts past them.
#[test]
fn resumed_pieces_are_kept() {
    let resumed: Vec<(u32, [u8; 32])> = (0..3).map(|i| (i, good(i))).collect();
    let mut t = Timeline::new(5 * MIB, Config::default(), node(1), &resumed);
    assert_eq!(t.s.watermark(), 3 * MIB);
    assert_eq!(t.s.map().digests[1], good(1));
    let acts = t.actions();
    assert_eq!(origin_pieces(&acts), vec![3, 4]);
    // A resumed blob that is whole goes straight to the digest check.
    let resumed: Vec<(u32, [u8; 32])> = (0..5).map(|i| (i, good(i))).collect();
    let mut t = Timeline::new(5 * MIB, Config::default(), node(1), &resumed);
    let acts = t.actions();
    assert!(acts.contains(&Action::CheckWhole));
    assert!(origin(&acts).is_empty());
}

/// Two nodes download a blob nobody holds: each fetches its rendezvous share from the origin
/// and waits for the other's. When the other stalls, its pieces are taken over after
/// `owner_stall` (not before), and counted as taken over.
#[test]
fn stalled_owner_is_taken_over() {
    let stall = Duration::from_secs(30);
    let cfg = Config { owner_stall: stall, origin_concurrency: 8, ..PLANNED };
    let (me, other) = (node(1), node(2));
    let mut t = Timeline::new(8 * MIB, cfg, me.clone(), &[]);
    t.actions();
    t.event(Event::Have { peer: other.clone(), result: Err(PeerError::Lacks) });
    // No planner answers: after PLAN_STALE the download schedules by itself.
    assert!(origin(&t.event(Event::Plan(None))).is_empty(), "a failed request is no answer");
    let acts = t.until(PLAN_STALE);
    let digest = Digest::of(b"blob");
    let owners = [me.clone(), other.clone()];
    let mine: Vec<u32> = (0..8).filter(|&i| origin_owner(&digest, i, &owners) == Some(&me)).collect();
    let theirs: Vec<u32> = (0..8).filter(|i| !mine.contains(i)).collect();
    assert!(!mine.is_empty() && !theirs.is_empty());
    let mut fetched = origin_pieces(&acts);
    fetched.sort_unstable();
    assert_eq!(fetched, mine, "only our share, at once");
    assert!(origin(&acts).iter().all(|(a, b)| b - a <= SHARED_SPAN));
    drain_origin(&mut t, &acts);
    let acts = t.until(stall - Duration::from_millis(10));
    assert!(origin(&acts).is_empty(), "no takeover before owner_stall: {acts:?}");
    let acts = t.until(stall + Duration::from_millis(600));
    let mut taken = origin_pieces(&acts);
    taken.sort_unstable();
    assert_eq!(taken, theirs, "the stalled owner's pieces");
    assert!(acts.iter().all(|a| !matches!(a, Action::FetchOrigin { taken_over: false, .. })));
    assert_eq!(t.s.stats().taken_over as usize, theirs.len());
}

/// An owner that makes progress is not taken over at owner_stall, only by the safety valve
/// at four times that.
#[test]
fn a_progressing_owner_is_waited_for() {
    let stall = Duration::from_secs(30);
    let cfg = Config { owner_stall: stall, ..PLANNED };
    let (me, other) = (node(1), node(2));
    let mut t = Timeline::new(64 * MIB, cfg, me.clone(), &[]);
    t.actions();
    t.event(Event::Have { peer: other.clone(), result: Err(PeerError::Lacks) });
    t.event(Event::Plan(None));
    let first = t.until(PLAN_STALE);
    drain_origin(&mut t, &first);
    let digest = Digest::of(b"blob");
    let owners = [me.clone(), other.clone()];
    let theirs: Vec<u32> = (0..64).filter(|&i| origin_owner(&digest, i, &owners) == Some(&other)).collect();
    let mine: Vec<u32> = (0..64).filter(|i| !theirs.contains(i)).collect();
    assert!(mine.len() > 12);
    let layout = t.layout;
    // Every 10 s the other gains a piece (one we hold already), so it is not stalled, while
    // the pieces it owns stay missing.
    let mut gained = Vec::new();
    let mut taken = Vec::new();
    for step in 1..=11u32 {
        let at = Duration::from_secs(10 * u64::from(step));
        let acts = t.until(at);
        taken.extend(origin(&acts).into_iter().filter(|(a, _)| theirs.contains(a)));
        drain_origin(&mut t, &acts);
        // A gain that is a piece we already hold (one of ours) keeps it "progressing".
        gained.push(mine[gained.len()]);
        t.event(Event::Have { peer: other.clone(), result: Ok(have(layout, gained.clone(), good)) });
    }
    assert!(taken.is_empty(), "taken over a progressing owner before 4x owner_stall: {taken:?}");
    let acts = t.until(stall * 4 + Duration::from_secs(30));
    assert!(!origin(&acts).is_empty(), "the safety valve takes over after 4x owner_stall");
}

/// With a tracker: nothing from the origin before its first answer; then exactly the
/// assigned pieces; a plan older than PLAN_STALE falls back to rendezvous owners, which for
/// a node alone is every piece.
#[test]
fn plan_stale_falls_back_to_dht_rules() {
    let cfg = Config { tracker: true, ..Config::default() };
    let mut t = Timeline::new(8 * MIB, cfg, node(1), &[]);
    let acts = t.actions();
    assert!(matches!(acts.first(), Some(Action::AskPlan(_))));
    assert!(origin(&acts).is_empty(), "waits for the first plan");
    let plan = Plan { peers: vec![], assigned: vec![0, 1], ..Plan::default() };
    let acts = t.event(Event::Plan(Some(plan)));
    assert_eq!(origin_pieces(&acts), vec![0, 1]);
    assert!(acts.iter().all(|a| !matches!(a, Action::FetchOrigin { unplanned: true, .. })));
    let acts = deliver_origin(&mut t, 0, 2);
    assert!(origin(&acts).is_empty());
    // The origin digests are reported with the next plan request.
    let acts = t.until(PLAN_POLL);
    let report = acts.iter().find_map(|a| match a {
        Action::AskPlan(r) => Some(r.clone()),
        _ => None,
    });
    let report = report.expect("a plan request after PLAN_POLL");
    assert_eq!(report.attest, vec![(0, good(0)), (1, good(1))]);
    assert_eq!(report.have.count(), 2);
    // The tracker stops answering: every further request gets None.
    let mut fetched = Vec::new();
    let mut at = PLAN_POLL;
    while at < PLAN_STALE + Duration::from_secs(1) {
        at += Duration::from_millis(100);
        let acts = t.until(at);
        if acts.iter().any(|a| matches!(a, Action::AskPlan(_))) {
            fetched.extend(origin(&t.event(Event::Plan(None))));
        }
        fetched.extend(origin(&acts));
        if !fetched.is_empty() {
            break;
        }
    }
    assert!(!fetched.is_empty(), "falls back after PLAN_STALE");
    // The plan arrived at t0; PLAN_STALE after that and not before.
    assert!(t.now >= t.t0 + PLAN_STALE && t.now <= t.t0 + PLAN_STALE + Duration::from_millis(200));
    assert!(t.s.stats().unplanned > 0, "counted as outside the plan");
}

/// The repair: the whole digest fails after a peer supplied a lying piece. From the moment the
/// repair starts, the map (what `Have` answers tell peers and what pieces are served from)
/// no longer lists the peer-supplied pieces: a peer is never told the bad digest while the
/// origin's good bytes are written under it. The liar is banned, the honest supplier is not.
#[test]
fn repair_unmarks_peer_pieces_and_bans_the_liar() {
    let mut t = Timeline::new(4 * MIB, Config::default(), node(1), &[]);
    t.actions();
    let layout = t.layout;
    // node 2 holds pieces 0 and 1 and lies about 1; node 3 holds 2 and 3 honestly.
    let liar = have(layout, [0, 1], |i| if i == 1 { bad(i) } else { good(i) });
    t.event(Event::Have { peer: node(2), result: Ok(liar) });
    t.event(Event::Have { peer: node(3), result: Ok(have(layout, [2, 3], good)) });
    // Requests went out; deliver them as the peers' (the driver checked against expected).
    t.event(Event::Verified { index: 0, digest: good(0), from: Some(node(2)) });
    t.event(Event::Verified { index: 1, digest: bad(1), from: Some(node(2)) });
    t.event(Event::Verified { index: 2, digest: good(2), from: Some(node(3)) });
    let acts = t.event(Event::Verified { index: 3, digest: good(3), from: Some(node(3)) });
    assert!(t.s.map().verified.is_full(), "{:?}", t.s.map().verified);
    assert!(acts.contains(&Action::CheckWhole));
    let acts = t.event(Event::WholeDigest { matched: false });
    let refetch = origin_pieces(&acts);
    assert_eq!(refetch, vec![0, 1, 2, 3], "every peer-supplied piece, from the origin");
    assert!(acts.iter().all(|a| matches!(a, Action::FetchOrigin { repair: true, .. } | Action::SaveState)));
    // The map peers read: the peer pieces are no longer there, the origin's piece is.
    let map = t.s.map();
    for i in 0..4 {
        assert!(!map.verified.get(i), "piece {i} still advertised during the repair");
        assert!(!map.attested().iter().any(|(p, _)| *p == i));
    }
    // The origin's bytes arrive: piece 1 differs from what node 2 attested.
    let acts = deliver_origin(&mut t, 0, 4);
    assert!(acts.contains(&Action::Ban { peer: node(2), reason: BanReason::Contradicted }));
    assert!(!acts.iter().any(|a| matches!(a, Action::Ban { peer, .. } if *peer == node(3))));
    assert_eq!(t.s.map().digests[1], good(1));
    assert!(acts.contains(&Action::CheckWhole));
    assert_eq!(t.event(Event::WholeDigest { matched: true }), vec![Action::Done]);
    assert_eq!(t.s.stats().repaired, 4);
}

/// A second whole-digest failure (or a first one with no peer pieces) fails the download.
#[test]
fn digest_mismatch_without_peer_pieces_fails() {
    let mut t = Timeline::new(MIB, Config::default(), node(1), &[]);
    let acts = t.actions();
    assert_eq!(origin(&acts), vec![(0, 1)]);
    deliver_origin(&mut t, 0, 1);
    let acts = t.event(Event::WholeDigest { matched: false });
    assert_eq!(acts, vec![Action::Failed(Failure::DigestMismatch)]);
    assert!(t.s.is_done());
}

/// Origin failures back off, doubling up to ORIGIN_BACKOFF_MAX, and give up only after
/// give_up_after without a verified piece; "not found" and "access refused"
/// gives up at once.
#[test]
fn origin_failures_back_off_then_fail() {
    let cfg = Config { give_up_after: Duration::from_secs(60), ..Config::default() };
    let mut t = Timeline::new(MIB, cfg.clone(), node(1), &[]);
    let mut acts = t.actions();
    let failed = || Event::OriginDone {
        first: 0,
        end: 1,
        unfinished: vec![0],
        error: Some(OriginFailure::Failed("timed out".into())),
    };
    let mut gaps = Vec::new();
    for k in 1..=40u32 {
        assert_eq!(origin(&acts), vec![(0, 1)], "attempt {k}");
        let tried = t.now;
        let now_acts = t.event(failed());
        if t.now - t.t0 >= Duration::from_secs(60) {
            assert_eq!(now_acts, vec![Action::Failed(Failure::OriginFailed("timed out".into()))]);
            assert!(gaps.len() >= 8, "retried for the whole minute: {gaps:?}");
            assert!(gaps.iter().all(|g| *g <= ORIGIN_BACKOFF_MAX + Duration::from_millis(1)));
            assert_eq!(gaps[..4], [250, 500, 1000, 2000].map(Duration::from_millis));
            break;
        }
        assert!(origin(&now_acts).is_empty(), "backs off");
        let at = t.now - t.t0 + origin_backoff(k);
        acts = t.until(at);
        gaps.push(t.now - tried);
        assert!(k < 40, "gave up within 40 attempts");
    }

    // Definitive answers fail at once.
    for (error, failure) in [
        (OriginFailure::NotFound, Failure::OriginNotFound),
        (OriginFailure::Final("403".into()), Failure::OriginFailed("403".into())),
    ] {
        let mut t = Timeline::new(MIB, cfg.clone(), node(1), &[]);
        t.actions();
        let acts = t.event(Event::OriginDone { first: 0, end: 1, unfinished: vec![0], error: Some(error) });
        assert_eq!(acts, vec![Action::Failed(failure)]);
    }
}

/// While peers still deliver pieces, a failing origin never fails the download.
#[test]
fn a_failing_origin_does_not_fail_a_download_peers_feed() {
    let cfg = Config { give_up_after: Duration::from_secs(5), origin_concurrency: 1, ..Config::default() };
    let mut t = Timeline::new(16 * MIB, cfg, node(1), &[]);
    t.actions();
    for k in 0..12u32 {
        let acts = t.until(Duration::from_secs(u64::from(k) + 1));
        for (first, end) in origin(&acts) {
            let unfinished: Vec<u32> = (first..end).collect();
            let error = Some(OriginFailure::Failed("slow".into()));
            let after = t.event(Event::OriginDone { first, end, unfinished, error });
            assert!(!after.iter().any(|a| matches!(a, Action::Failed(_))), "second {k}: {after:?}");
        }
        // A peer's piece arrives every second (as if from a peer met earlier).
        t.event(Event::Verified { index: 15 - k, digest: good(15 - k), from: None });
    }
    assert!(!t.s.is_done());
}

/// A verified origin piece resets the failure count.
#[test]
fn a_verified_piece_resets_origin_failures() {
    let mut t = Timeline::new(2 * MIB, Config { origin_concurrency: 1, ..Config::default() }, node(1), &[]);
    let acts = t.actions();
    assert_eq!(origin(&acts), vec![(0, 2)]);
    let fail = |first| Event::OriginDone {
        first,
        end: 2,
        unfinished: (first..2).collect(),
        error: Some(OriginFailure::Failed("x".into())),
    };
    // Two failures in a row: the next try waits 500 ms.
    t.event(fail(0));
    let acts = t.until(Duration::from_millis(251));
    assert_eq!(origin(&acts), vec![(0, 2)]);
    t.event(fail(0));
    let at = t.now - t.t0;
    assert!(origin(&t.until(at + Duration::from_millis(499))).is_empty());
    let acts = t.until(at + Duration::from_millis(501));
    assert_eq!(origin(&acts), vec![(0, 2)]);
    // Piece 0 arrives, then the span fails: back to 250 ms.
    t.event(Event::Verified { index: 0, digest: good(0), from: None });
    t.event(fail(1));
    let at = t.now - t.t0;
    let acts = t.until(at + Duration::from_millis(251));
    assert_eq!(origin(&acts), vec![(1, 2)]);
}

/// Polls: Have of known peers every HAVE_POLL, providers every PROVIDER_POLL, and
/// poll_timeout names the next one exactly.
#[test]
fn polls_follow_their_intervals() {
    let mut t = Timeline::new(4 * MIB, Config::default(), node(1), &[]);
    t.actions();
    let layout = t.layout;
    t.event(Event::Have { peer: node(2), result: Ok(have(layout, [0], good)) });
    assert_eq!(t.s.poll_timeout(), Some(t.t0 + FIRST_PROVIDER_POLL));
    let acts = t.until(FIRST_PROVIDER_POLL);
    assert_eq!(acts.iter().filter(|a| **a == Action::FindProviders).count(), 1);
    let acts = t.until(HAVE_POLL);
    assert_eq!(acts.iter().filter(|a| matches!(a, Action::AskHave(p) if *p == node(2))).count(), 1);
    // Not asked again while the answer is outstanding.
    let acts = t.until(HAVE_POLL * 2);
    assert!(!acts.iter().any(|a| matches!(a, Action::AskHave(_))));
    t.event(Event::Have { peer: node(2), result: Ok(have(layout, [0, 1], good)) });
    let acts = t.until(HAVE_POLL * 3);
    assert_eq!(acts.iter().filter(|a| matches!(a, Action::AskHave(_))).count(), 1);
}

/// While a plan is live the providers are looked up only every PROVIDER_POLL_PLANNED (the
/// plan names the peers); once plans stop, every PROVIDER_POLL again.
#[test]
fn a_live_plan_spares_provider_lookups() {
    let mut t = Timeline::new(64 * MIB, PLANNED, node(1), &[]);
    let plan = || Event::Plan(Some(Plan { peers: vec![node(2)], ..Plan::default() }));
    let first = t.actions();
    assert!(first.iter().any(|a| matches!(a, Action::AskPlan(_))));
    t.event(plan());
    let lookups = |acts: &[Action]| acts.iter().filter(|a| **a == Action::FindProviders).count();
    let mut found = 0;
    let mut at = Duration::ZERO;
    while at < PROVIDER_POLL_PLANNED * 2 - Duration::from_millis(100) {
        at += Duration::from_millis(100);
        let acts = t.until(at);
        if acts.iter().any(|a| matches!(a, Action::AskPlan(_))) {
            t.event(plan());
        }
        if lookups(&acts) > 0 {
            found += lookups(&acts);
            t.event(Event::Providers(vec![]));
        }
    }
    assert_eq!(found, 1, "one lookup in 2 x PROVIDER_POLL_PLANNED of live plans (at PROVIDER_POLL_PLANNED)");
    // The planner goes silent: after PLAN_STALE the lookups are every PROVIDER_POLL again.
    let mut after = 0;
    let end = at + PLAN_STALE + PROVIDER_POLL * 5;
    while at < end {
        at += Duration::from_millis(100);
        let acts = t.until(at);
        if acts.iter().any(|a| matches!(a, Action::AskPlan(_))) {
            t.event(Event::Plan(None));
        }
        if lookups(&acts) > 0 {
            after += lookups(&acts);
            t.event(Event::Providers(vec![]));
        }
    }
    assert!(after >= 4, "{after} lookups once plans stopped");
}

/// An asker (a peer that asked us Have) becomes a downloader: in a small swarm it takes a
/// rendezvous share of the origin pieces from the next step on.
#[test]
fn askers_share_the_origin_pieces() {
    let mut t = Timeline::new(16 * MIB, Config { origin_concurrency: 1, ..Config::default() }, node(1), &[]);
    let acts = t.actions();
    assert_eq!(origin(&acts), vec![(0, 16)], "alone: one long span");
    deliver_origin(&mut t, 0, 16);
    let mut t = Timeline::new(16 * MIB, Config { origin_concurrency: 1, ..Config::default() }, node(1), &[]);
    t.s.handle(Event::Asker(node(2)), t.t0);
    let _ = t.actions();
    assert_eq!(t.s.downloaders(), 1);
}

/// The peer set is bounded: beyond MAX_PEERS peers wait as spares, and a spare takes the
/// place of a peer that fails.
#[test]
fn peers_are_bounded_and_spares_replace_failed_ones() {
    let mut t = Timeline::new(4 * MIB, Config::default(), node(0), &[]);
    t.actions();
    let many: Vec<NodeId> =
        (0..MAX_PEERS as u32 + 5).map(|i| NodeId::new(&(1000 + i).to_le_bytes())).collect();
    t.event(Event::Providers(many.clone()));
    assert_eq!(t.s.active_peers(), MAX_PEERS);
    assert_eq!(t.s.downloaders(), MAX_PEERS + 5);
    let acts = t.until(HAVE_POLL);
    let asked: Vec<NodeId> = acts
        .iter()
        .filter_map(|a| match a {
            Action::AskHave(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(asked.len(), MAX_PEERS, "only the active peers are polled");
    let gone = asked[0].clone();
    t.event(Event::Have { peer: gone.clone(), result: Err(PeerError::Unreachable("reset".into())) });
    assert_eq!(t.s.active_peers(), MAX_PEERS, "a spare took its place");
    let later = t.until(HAVE_POLL * 3);
    assert!(!later.iter().any(|a| *a == Action::AskHave(gone.clone())), "the failed peer is not polled");
    assert!(
        later.iter().any(|a| matches!(a, Action::AskHave(p) if !asked.contains(p))),
        "the spare is polled: {later:?}"
    );
}

/// A peer whose answers bring nothing we lack is polled ever less often (up to
/// HAVE_POLL_MAX), and at HAVE_POLL again once it gains a piece we lack.
#[test]
fn a_peer_with_nothing_new_is_polled_less_often() {
    let mut t = Timeline::new(4 * MIB, Config::default(), node(1), &[]);
    t.actions();
    let layout = t.layout;
    let empty = have(layout, [], good);
    t.event(Event::Have { peer: node(2), result: Ok(empty.clone()) });
    let mut polls = Vec::new();
    for step in 1..=200u32 {
        let acts = t.until(Duration::from_millis(100) * step);
        if acts.contains(&Action::AskHave(node(2))) {
            polls.push(t.now - t.t0);
            t.event(Event::Have { peer: node(2), result: Ok(empty.clone()) });
        }
    }
    // 20 s: 0.5 s each would be 40 polls; doubling to 4 s gives far fewer.
    assert!(polls.len() <= 10, "polled {} times: {polls:?}", polls.len());
    let gaps: Vec<Duration> = polls.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g <= HAVE_POLL_MAX + Duration::from_millis(600)), "{gaps:?}");
    // It gains a piece we lack: the next gap is HAVE_POLL again.
    t.event(Event::Have { peer: node(2), result: Ok(have(layout, [0], good)) });
    let at = t.now - t.t0;
    let acts = t.until(at + HAVE_POLL + Duration::from_millis(1));
    assert!(acts.contains(&Action::AskHave(node(2))), "{acts:?}");
}

/// The planner's pace decides when the next plan request goes out: its `next_ask` (zero
/// meaning PLAN_POLL), clamped to PLAN_POLL..=PLAN_POLL_MAX, counted from the request.
#[test]
fn plan_requests_follow_the_planners_pace() {
    // The instants (from the start, in 100 ms steps) of the plan requests in `window` when
    // every answer says `pace`.
    let asks = |pace: Duration, window: Duration| -> Vec<u128> {
        let mut t = Timeline::new(64 * MIB, PLANNED, node(1), &[]);
        let plan = || Event::Plan(Some(Plan { peers: vec![node(2)], next_ask: pace, ..Plan::default() }));
        let mut at = Duration::ZERO;
        let mut asked = Vec::new();
        let mut acts = t.actions();
        loop {
            if acts.iter().any(|a| matches!(a, Action::AskPlan(_))) {
                asked.push(at.as_millis());
                t.event(plan());
            }
            if acts.contains(&Action::FindProviders) {
                t.event(Event::Providers(vec![]));
            }
            if at >= window {
                return asked;
            }
            at += Duration::from_millis(100);
            acts = t.until(at);
        }
    };
    let window = Duration::from_millis(6_000);
    assert_eq!(asks(Duration::ZERO, window).len(), 13, "every PLAN_POLL: 0, 0.5, ..., 6.0 s");
    assert_eq!(asks(PLAN_POLL, window).len(), 13);
    assert_eq!(asks(Duration::from_millis(2_000), window), vec![0, 2_000, 4_000, 6_000]);
    assert_eq!(asks(Duration::from_secs(60), window), vec![0, 3_000, 6_000], "at most PLAN_POLL_MAX");
    assert_eq!(asks(Duration::from_millis(1), window).len(), 13, "never faster than PLAN_POLL");
}
