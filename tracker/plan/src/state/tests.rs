//! Timelines through [`State`]: every decision the agents rely on, at exact instants.

use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use shoal_protocol::tracker::{
    Heartbeat, NodeCounters, Plan, PlanRequest, PreheatProgress, PreheatState, TrackerResponse,
};

use super::*;

const DIGEST: [u8; 32] = [7; 32];
const PIECE: u32 = 1 << 20;

fn peer() -> PeerId {
    Keypair::generate_ed25519().public().to_peer_id()
}

fn addr(port: u16) -> Vec<Multiaddr> {
    vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()]
}

/// A plan request for a `pieces`-piece blob holding `have`.
fn request(pieces: u32, have: &[u32]) -> PlanRequest {
    let mut bits = vec![0u8; pieces.div_ceil(8) as usize];
    for &i in have {
        bits[(i / 8) as usize] |= 1 << (i % 8);
    }
    PlanRequest {
        digest: DIGEST,
        size: u64::from(pieces) * u64::from(PIECE),
        piece_size: PIECE,
        have: bits,
        attest: Vec::new(),
        complete: have.len() as u32 == pieces,
        fetching: Vec::new(),
        planned: false,
    }
}

fn plan(state: &mut State, who: PeerId, req: &PlanRequest, now: Instant) -> Plan {
    match state.plan(who, &addr(1), req, now) {
        TrackerResponse::Plan(plan) => plan,
        other => panic!("expected a plan, got {other:?}"),
    }
}

fn beat(state: &mut State, who: PeerId, beat: Heartbeat, now: Instant) -> (bool, Vec<u64>) {
    match state.heartbeat(who, &addr(2), &beat, now) {
        TrackerResponse::Heartbeat { resync, preheat } => (resync, preheat.iter().map(|j| j.id).collect()),
        other => panic!("expected a heartbeat answer, got {other:?}"),
    }
}

fn zone(name: &str) -> Heartbeat {
    Heartbeat { zone: Some(name.to_string()), full: true, ..Heartbeat::default() }
}

fn peer_ids(plan: &Plan) -> Vec<PeerId> {
    plan.peers.iter().map(|p| PeerId::from_bytes(&p.peer_id).unwrap()).collect()
}

#[test]
fn simultaneous_starters_split_the_origin_pieces() {
    let t = Instant::now();
    let mut state = State::new();
    let (a, b, c) = (peer(), peer(), peer());
    assert_eq!(plan(&mut state, a, &request(10, &[]), t).assigned, vec![0, 1, 2, 3]);
    assert_eq!(plan(&mut state, b, &request(10, &[]), t).assigned, vec![4, 5, 6, 7]);
    assert_eq!(plan(&mut state, c, &request(10, &[]), t).assigned, vec![8, 9]);
    // Asking again changes nothing: the list is authoritative and stable.
    assert_eq!(plan(&mut state, a, &request(10, &[]), t).assigned, vec![0, 1, 2, 3]);
    assert_eq!(state.totals.assignments, 10);
}

/// Many nodes, each fetching its assigned pieces from the origin and one missing piece from
/// a peer per round: every piece leaves the origin exactly once and everyone completes.
#[test]
fn each_piece_leaves_the_origin_once() {
    let pieces = 37;
    let start = Instant::now();
    let mut state = State::new();
    let nodes: Vec<PeerId> = (0..12).map(|_| peer()).collect();
    let mut have: Vec<Vec<u32>> = vec![Vec::new(); nodes.len()];
    let mut origin_fetches = vec![0u32; pieces as usize];
    for round in 0..200u64 {
        let now = start + Duration::from_millis(500 * round);
        let mut done = true;
        for (n, id) in nodes.iter().enumerate() {
            let complete = have[n].len() as u32 == pieces;
            let mut req = request(pieces, &have[n]);
            req.complete = complete;
            let plan = plan(&mut state, *id, &req, now);
            if complete {
                continue;
            }
            done = false;
            for &piece in &plan.assigned {
                assert!(!have[n].contains(&piece), "assigned a piece it has");
                origin_fetches[piece as usize] += 1;
                have[n].push(piece);
            }
            // One piece from the best peer.
            if let Some(best) = peer_ids(&plan).first() {
                let m = nodes.iter().position(|x| x == best).unwrap();
                if let Some(p) = have[m].clone().into_iter().find(|p| !have[n].contains(p)) {
                    have[n].push(p);
                }
            }
        }
        if done {
            assert!(origin_fetches.iter().all(|&f| f == 1), "{origin_fetches:?}");
            assert_eq!(state.totals.assignments, u64::from(pieces));
            assert_eq!(state.totals.reassignments, 0);
            return;
        }
    }
    panic!("not every node completed: {have:?}");
}

#[test]
fn top_up_refills_to_the_batch_with_the_lowest_free_pieces() {
    let t = Instant::now();
    let mut state = State::new();
    let (a, b) = (peer(), peer());
    assert_eq!(plan(&mut state, a, &request(12, &[]), t).assigned, vec![0, 1, 2, 3]);
    assert_eq!(plan(&mut state, b, &request(12, &[]), t).assigned, vec![4, 5, 6, 7]);
    // A fetched 0 and 2: it keeps 1 and 3 and gets the two lowest free pieces.
    assert_eq!(plan(&mut state, a, &request(12, &[0, 2]), t).assigned, vec![1, 3, 8, 9]);
    // B holds 8 (from somewhere): A's assignment of 8 is dropped, not counted as a release.
    let got = plan(&mut state, b, &request(12, &[8]), t).assigned;
    assert_eq!(got, vec![4, 5, 6, 7]);
    assert_eq!(plan(&mut state, a, &request(12, &[0, 2]), t).assigned, vec![1, 3, 9, 10]);
    assert_eq!(state.totals.reassignments, 0);
}

#[test]
fn a_dead_assignees_pieces_are_reassigned() {
    let t = Instant::now();
    let mut state = State::new();
    let (a, b) = (peer(), peer());
    assert_eq!(plan(&mut state, a, &request(8, &[]), t).assigned, vec![0, 1, 2, 3]);
    assert_eq!(plan(&mut state, b, &request(8, &[]), t).assigned, vec![4, 5, 6, 7]);
    // Just inside NODE_DEAD: A still owns its pieces.
    let later = t + NODE_DEAD;
    beat(&mut state, b, Heartbeat::default(), later);
    assert_eq!(plan(&mut state, b, &request(8, &[4, 5, 6, 7]), later).assigned, Vec::<u32>::new());
    // A is dead: B takes them over.
    let later = t + NODE_DEAD + Duration::from_millis(1);
    assert_eq!(plan(&mut state, b, &request(8, &[4, 5, 6, 7]), later).assigned, vec![0, 1, 2, 3]);
    assert_eq!(state.totals.reassignments, 4);
    // Dead nodes are not handed out as peers either.
    assert!(plan(&mut state, b, &request(8, &[4, 5, 6, 7]), later).peers.is_empty());
}

#[test]
fn a_stalled_assignee_loses_its_pieces_but_a_progressing_one_keeps_them() {
    let t = Instant::now();
    let mut state = State::new();
    let (a, b) = (peer(), peer());
    assert_eq!(plan(&mut state, a, &request(16, &[]), t).assigned, vec![0, 1, 2, 3]);
    // A stays alive (heartbeats) but gains nothing.
    for s in 1..=11 {
        beat(&mut state, a, Heartbeat::default(), t + Duration::from_secs(s));
    }
    let at = t + STALL;
    assert_eq!(plan(&mut state, b, &request(16, &[]), at).assigned, vec![4, 5, 6, 7], "not stalled yet");
    let at = t + STALL + Duration::from_millis(1);
    assert_eq!(plan(&mut state, b, &request(16, &[]), at).assigned, vec![4, 5, 6, 7], "B is full");
    // B's batch is full, so the released pieces wait for the next planner: a third node.
    let c = peer();
    assert_eq!(plan(&mut state, c, &request(16, &[]), at).assigned, vec![0, 1, 2, 3]);
    assert_eq!(state.totals.reassignments, 4);

    // A node that keeps gaining pieces (from peers) keeps its origin assignment.
    let mut state = State::new();
    assert_eq!(plan(&mut state, a, &request(16, &[]), t).assigned, vec![0, 1, 2, 3]);
    let mut have = Vec::new();
    for s in 1..=12u32 {
        have.push(16 - s);
        plan(&mut state, a, &request(16, &have), t + Duration::from_secs(u64::from(s)));
    }
    let got = plan(&mut state, b, &request(16, &[]), t + Duration::from_secs(12)).assigned;
    assert!(got.is_empty(), "A keeps 0..4 and holds the rest: {got:?}");
    assert_eq!(state.totals.reassignments, 0);
}

#[test]
fn a_plan_with_another_layout_is_refused() {
    let t = Instant::now();
    let mut state = State::new();
    plan(&mut state, peer(), &request(4, &[]), t);
    let mut bigger = request(5, &[]);
    bigger.digest = DIGEST;
    match state.plan(peer(), &[], &bigger, t) {
        TrackerResponse::Refused(why) => assert!(why.contains("size disagrees"), "{why}"),
        other => panic!("{other:?}"),
    }
    let mut other_pieces = request(4, &[]);
    other_pieces.piece_size = PIECE / 2;
    other_pieces.have = vec![0];
    assert!(matches!(state.plan(peer(), &[], &other_pieces, t), TrackerResponse::Refused(_)));
    assert_eq!(state.totals.refused, 2);
    // An inconsistent bitfield (the codec catches it first) is refused, not a panic.
    let mut broken = request(4, &[]);
    broken.have = vec![0; 9];
    assert!(matches!(state.plan(peer(), &[], &broken, t), TrackerResponse::Refused(_)));
}

#[test]
fn peers_come_same_zone_first_then_most_useful_then_least_loaded() {
    let t = Instant::now();
    let mut state = State::new();
    let (p, rich_far, poor_near, none) = (peer(), peer(), peer(), peer());
    beat(&mut state, p, zone("a"), t);
    beat(&mut state, rich_far, zone("b"), t);
    beat(&mut state, poor_near, zone("a"), t);
    beat(&mut state, none, zone("a"), t);
    plan(&mut state, rich_far, &request(8, &[0, 1, 2, 3, 4]), t);
    plan(&mut state, poor_near, &request(8, &[0]), t);
    plan(&mut state, none, &request(8, &[]), t);
    let got = plan(&mut state, p, &request(8, &[]), t);
    assert_eq!(
        peer_ids(&got),
        vec![poor_near, rich_far],
        "same zone first; nodes with nothing useful left out"
    );
    assert_eq!(got.peers[0].addrs.len(), 1);

    // Without a zone on the requester, the most useful peer comes first.
    let q = peer();
    let got = plan(&mut state, q, &request(8, &[]), t);
    assert_eq!(peer_ids(&got), vec![rich_far, poor_near]);

    // Equal usefulness: the peer handed out less in the last 2 s comes first.
    let mut state = State::new();
    let (x, y) = (peer(), peer());
    plan(&mut state, x, &request(5, &[0, 1, 2, 3]), t);
    plan(&mut state, y, &request(5, &[0, 1, 2, 3, 4]), t);
    // Only y has piece 4: a node lacking just that is sent to y alone, loading it.
    assert_eq!(peer_ids(&plan(&mut state, peer(), &request(5, &[0, 1, 2, 3]), t)), vec![y]);
    // For a node lacking 0..4 both are equally useful: the less loaded x comes first.
    // (The first requester holds 0..4 now too and was never handed out either.)
    let got = peer_ids(&plan(&mut state, peer(), &request(5, &[4]), t));
    assert_eq!(got.len(), 3);
    assert!(got[..2].contains(&x), "{got:?}");
    assert_eq!(got[2], y, "the loaded peer comes last");
    // After the load window both are fresh again (and the earlier requesters are dead): the
    // tie goes to peer-id order.
    let later = t + NODE_DEAD.max(LOAD_WINDOW) + Duration::from_secs(1);
    beat(&mut state, x, Heartbeat::default(), later);
    beat(&mut state, y, Heartbeat::default(), later);
    plan(&mut state, x, &request(5, &[0, 1, 2, 3]), later); // hands out y once more
    plan(&mut state, y, &request(5, &[0, 1, 2, 3, 4]), later);
    let later = later + LOAD_WINDOW + Duration::from_secs(1);
    beat(&mut state, x, Heartbeat::default(), later);
    beat(&mut state, y, Heartbeat::default(), later);
    assert_eq!(peer_ids(&plan(&mut state, peer(), &request(5, &[4]), later)), vec![x.min(y), x.max(y)]);
}

#[test]
fn heartbeats_resync_unknown_nodes_then_apply_deltas() {
    let t = Instant::now();
    let mut state = State::new();
    let n = peer();
    let delta = Heartbeat {
        held_added: vec![DIGEST],
        counters: NodeCounters { origin_bytes: 10, peer_bytes: 30, ..NodeCounters::default() },
        zone: Some("z1".into()),
        ..Heartbeat::default()
    };
    assert_eq!(beat(&mut state, n, delta.clone(), t), (true, vec![]), "unknown node: resync");
    let view = &state.nodes_view(t)[0];
    assert_eq!((view.held_digests, view.origin_bytes, view.zone.as_deref()), (0, 10, Some("z1")));
    let full = Heartbeat { full: true, held_added: vec![[1; 32], [2; 32]], ..delta.clone() };
    assert!(!beat(&mut state, n, full, t).0);
    assert_eq!(state.nodes_view(t)[0].held_digests, 2);
    let delta = Heartbeat { held_added: vec![[3; 32]], held_removed: vec![[1; 32]], ..delta };
    assert!(!beat(&mut state, n, delta, t).0);
    assert_eq!(state.nodes_view(t)[0].held_digests, 2);
    assert_eq!(state.summary(t).savings, 0.75);
}

#[test]
fn holders_from_heartbeats_are_peers_and_block_assignment() {
    let t = Instant::now();
    let mut state = State::new();
    let (h, p) = (peer(), peer());
    beat(&mut state, h, Heartbeat { full: true, held_added: vec![DIGEST], ..Heartbeat::default() }, t);
    let got = plan(&mut state, p, &request(6, &[]), t);
    assert!(got.assigned.is_empty(), "a live node holds it all");
    assert_eq!(peer_ids(&got), vec![h]);
    // The holder dies: the origin is the only source left.
    let later = t + NODE_DEAD + Duration::from_secs(1);
    let got = plan(&mut state, p, &request(6, &[]), later);
    assert_eq!(got.assigned, vec![0, 1, 2, 3]);
    assert!(got.peers.is_empty());
}

#[test]
fn first_attestations_win_and_complete_metainfo_is_kept() {
    let t = Instant::now();
    let mut state = State::new();
    let (a, b, c) = (peer(), peer(), peer());
    let mut req = request(3, &[0, 1]);
    req.attest = vec![(0, [10; 32]), (1, [11; 32])];
    plan(&mut state, a, &req, t);
    let mut req = request(3, &[2]);
    req.attest = vec![(2, [12; 32]), (0, [99; 32])];
    plan(&mut state, b, &req, t);
    assert_eq!(state.totals.attestation_conflicts, 1);
    // C lacks 1 and 2 only: it gets those digests, the first ones attested.
    let got = plan(&mut state, c, &request(3, &[0]), t);
    assert_eq!(got.piece_digests, vec![(1, [11; 32]), (2, [12; 32])]);
    assert!(!state.digests_view(t)[0].metainfo_complete);
    plan(&mut state, a, &request(3, &[0, 1, 2]), t);
    let view = &state.digests_view(t)[0];
    assert!(view.metainfo_complete);
    assert_eq!((view.attested, view.pieces), (3, 3));

    // The last attestation may arrive after the first node completed.
    let mut state = State::new();
    let mut req = request(2, &[0]);
    req.attest = vec![(0, [1; 32])];
    plan(&mut state, a, &req, t);
    plan(&mut state, b, &request(2, &[0, 1]), t);
    assert!(!state.digests_view(t)[0].metainfo_complete, "piece 1 not attested yet");
    let mut req = request(2, &[0, 1]);
    req.attest = vec![(1, [2; 32])];
    plan(&mut state, a, &req, t);
    assert!(state.digests_view(t)[0].metainfo_complete);
}

#[test]
fn preheat_jobs_go_out_until_reported_finished() {
    let t = Instant::now();
    let mut state = State::new();
    assert_eq!(
        state.start_preheat("r/x:1", "r", "x", [1; 32], NodeCount::All, t).unwrap_err(),
        PreheatError::NoAliveNodes
    );
    let nodes: Vec<PeerId> = (0..4).map(|_| peer()).collect();
    for (i, n) in nodes.iter().enumerate() {
        beat(&mut state, *n, zone(if i % 2 == 0 { "a" } else { "b" }), t);
    }
    assert_eq!(
        state.start_preheat("r/x:1", "r", "x", [1; 32], NodeCount::Count(0), t).unwrap_err(),
        PreheatError::ZeroNodes
    );
    // Two nodes: one per zone.
    let two = state.start_preheat("r/x:1", "r", "x", [1; 32], NodeCount::Count(2), t).unwrap();
    let zones: Vec<Option<String>> = two
        .nodes
        .iter()
        .map(|n| state.nodes_view(t).into_iter().find(|v| v.peer_id == n.peer_id).unwrap().zone)
        .collect();
    assert_eq!(zones.iter().filter(|z| z.as_deref() == Some("a")).count(), 1, "{zones:?}");
    let all = state.start_preheat("r/x:1", "r", "x", [1; 32], NodeCount::All, t).unwrap();
    assert_eq!(all.nodes.len(), 4);
    assert_eq!(all.state, "running");

    let n = nodes[0];
    let (_, jobs) = beat(&mut state, n, Heartbeat::default(), t);
    assert!(jobs.contains(&all.id));
    let report = |state: PreheatState| PreheatProgress {
        id: all.id,
        blobs_done: 1,
        blobs_total: 2,
        bytes_done: 5,
        bytes_total: 9,
        state,
    };
    let running = Heartbeat { preheat: vec![report(PreheatState::Running)], ..Heartbeat::default() };
    let (_, jobs) = beat(&mut state, n, running, t);
    assert!(jobs.contains(&all.id), "running jobs are still delivered");
    let done = Heartbeat { preheat: vec![report(PreheatState::Done)], ..Heartbeat::default() };
    let (_, jobs) = beat(&mut state, n, done, t);
    assert!(!jobs.contains(&all.id));
    // A late "running" cannot reopen a finished part.
    let running = Heartbeat { preheat: vec![report(PreheatState::Running)], ..Heartbeat::default() };
    beat(&mut state, n, running, t);
    let view = state.preheat_view(all.id).unwrap();
    let mine = view.nodes.iter().find(|v| v.peer_id == n.to_string()).unwrap();
    assert_eq!((mine.state, mine.bytes_done), ("done", 5));

    // The others fail or disappear: the job ends failed.
    let failed = Heartbeat {
        preheat: vec![PreheatProgress {
            state: PreheatState::Failed("manifest unknown".into()),
            ..report(PreheatState::Running)
        }],
        ..Heartbeat::default()
    };
    beat(&mut state, nodes[1], failed, t);
    let gone = t + NODE_DEAD + NODE_FORGET + Duration::from_secs(1);
    beat(&mut state, n, Heartbeat::default(), gone);
    state.tick(gone, 0);
    let view = state.preheat_view(all.id).unwrap();
    assert_eq!(view.state, "failed");
    assert!(view.nodes.iter().any(|v| v.error.as_deref() == Some("the node left the cluster")));
    assert_eq!(state.totals.preheat_jobs, 2);
}

#[test]
fn tick_forgets_old_nodes_and_digests_and_keeps_totals_monotonic() {
    let t = Instant::now();
    let mut state = State::new();
    let (a, b) = (peer(), peer());
    let counters = |origin, peer| Heartbeat {
        counters: NodeCounters { origin_bytes: origin, peer_bytes: peer, ..NodeCounters::default() },
        ..Heartbeat::default()
    };
    beat(&mut state, a, counters(100, 0), t);
    beat(&mut state, b, counters(0, 50), t);
    plan(&mut state, a, &request(4, &[]), t);
    state.tick(t, 1_000);
    assert_eq!(state.bytes(), (100, 50));
    // A restarts: its counters begin again, the cluster total does not go back.
    beat(&mut state, a, counters(7, 0), t);
    assert_eq!(state.bytes(), (107, 50));

    let dead = t + NODE_DEAD + Duration::from_secs(1);
    beat(&mut state, b, Heartbeat::default(), dead);
    let view = state.nodes_view(dead);
    assert!(!view.iter().find(|v| v.peer_id == a.to_string()).unwrap().alive, "listed, not alive");
    let forget = t + NODE_DEAD + NODE_FORGET + Duration::from_secs(1);
    beat(&mut state, b, Heartbeat::default(), forget);
    state.tick(forget, 2_000);
    assert_eq!(state.nodes_view(forget).len(), 1);
    assert_eq!(state.bytes(), (107, 50), "bytes of restarted and forgotten nodes stay counted");
    assert_eq!(state.digests_view(forget).len(), 1);
    state.tick(t + DIGEST_FORGET + Duration::from_secs(1), 3_000);
    assert!(state.digests_view(t).is_empty());
    let history = state.history();
    assert_eq!(history.len(), 3);
    assert_eq!(history[0], HistorySample { unix_ms: 1_000, origin_bytes: 100, peer_bytes: 50 });
}

/// CPU per plan request with N nodes downloading one 1 GiB digest (1024 pieces), each holding a
/// different third of it, all alive. Prints the median ns per plan of 5 rounds. Run with
/// `cargo test -p shoal-tracker --lib plan_cost -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement: prints ns per plan"]
fn plan_cost() {
    const PIECES: u32 = 1024;
    for n in [100usize, 1_000, 10_000] {
        let mut state = State::new();
        let t0 = Instant::now();
        let peers: Vec<PeerId> = (0..n).map(|_| peer()).collect();
        let reqs: Vec<PlanRequest> = (0..n)
            .map(|k| {
                let have: Vec<u32> = (0..PIECES).filter(|i| (*i as usize + k).is_multiple_of(3)).collect();
                request(PIECES, &have)
            })
            .collect();
        for (k, p) in peers.iter().enumerate() {
            plan(&mut state, *p, &reqs[k], t0);
        }
        let per_round = 200usize;
        let mut rounds = Vec::new();
        for round in 0..5u32 {
            let now = t0 + Duration::from_millis(100 * u64::from(round + 1));
            let start = Instant::now();
            for j in 0..per_round {
                let k = (j * 7919 + round as usize * 31) % n;
                std::hint::black_box(state.plan(peers[k], &addr(1), &reqs[k], now));
            }
            rounds.push(start.elapsed().as_nanos() / per_round as u128);
        }
        rounds.sort_unstable();
        println!(
            "plan_cost: nodes {n:>6}: {:>10} ns per plan (median of 5 rounds of {per_round})",
            rounds[2]
        );
    }
}

/// A planner that takes a digest over mid-download (the next coordinator after one died, a
/// restarted tracker) learns what its predecessor assigned from the `fetching` lists, gives
/// those pieces to nobody else, and assigns nothing new until every live downloader had
/// time to report ([`ADOPT_GRACE`]); then it tops everyone up as usual.
#[test]
fn a_planner_taking_over_learns_assignments_before_giving_any() {
    let mut s = State::new();
    let t0 = Instant::now();
    let (a, b) = (peer(), peer());
    // A holds piece 0 and is fetching 1 and 2 (its old coordinator's assignment).
    let mut req_a = request(16, &[0]);
    req_a.fetching = vec![1, 2];
    let p = plan(&mut s, a, &req_a, t0);
    assert_eq!(p.assigned, vec![1, 2], "its own fetches stay its own, and nothing new yet");
    // B, fresh, asks within the grace: nothing yet.
    let p = plan(&mut s, b, &request(16, &[]), t0 + Duration::from_millis(500));
    assert!(p.assigned.is_empty(), "{:?}", p.assigned);
    // After the grace, B gets pieces nobody holds and nobody fetches.
    let p = plan(&mut s, b, &request(16, &[]), t0 + ADOPT_GRACE);
    assert_eq!(p.assigned, vec![3, 4, 5, 6]);
    let p = plan(&mut s, a, &req_a, t0 + ADOPT_GRACE);
    assert_eq!(p.assigned, vec![1, 2, 7, 8]);

    // A cold start (nothing held anywhere) is not a takeover: assignments at once.
    let mut s = State::new();
    let p = plan(&mut s, a, &request(16, &[]), t0);
    assert_eq!(p.assigned, vec![0, 1, 2, 3]);
    // A piece somebody else already fetches is not learned as the requester's.
    let mut req_b = request(16, &[]);
    req_b.fetching = vec![0];
    let p = plan(&mut s, b, &req_b, t0);
    assert_eq!(p.assigned, vec![4, 5, 6, 7]);
}

/// A node that completed a digest and later downloads it again (its copy was evicted or
/// found damaged) is no holder of it any more: the pieces nobody else holds are assigned,
/// to it too.
#[test]
fn a_node_that_lost_its_copy_is_no_holder() {
    let mut s = State::new();
    let t0 = Instant::now();
    let a = peer();
    let all: Vec<u32> = (0..8).collect();
    plan(&mut s, a, &request(8, &all), t0);
    // (Past ADOPT_GRACE: the digest's first request came from a holder.)
    let later = t0 + ADOPT_GRACE + Duration::from_secs(1);
    let p = plan(&mut s, a, &request(8, &[]), later);
    assert_eq!(p.assigned, vec![0, 1, 2, 3], "its own old copy does not count");
    let b = peer();
    let p = plan(&mut s, b, &request(8, &[]), later);
    assert_eq!(p.assigned, vec![4, 5, 6, 7], "nor for others");
}

/// Downloaders with origin work ask every PLAN_POLL; once every piece is held or assigned,
/// the others are paced by how many download the digest, up to PLAN_POLL_MAX, and an
/// assignee keeps the short poll.
#[test]
fn downloaders_without_origin_work_are_paced_by_their_number() {
    let t = Instant::now();
    let ms = |d: Duration| d.as_millis() as u32;
    assert_eq!(pace(1), PLAN_POLL);
    assert_eq!(pace(40), PLAN_POLL);
    assert_eq!(pace(PLAN_RATE as usize), Duration::from_secs(1));
    assert_eq!(pace(10_000), PLAN_POLL_MAX);

    let pieces = 8;
    let mut state = State::new();
    let (a, b) = (peer(), peer());
    // a and b take every origin piece between them: both have origin work.
    let pa = plan(&mut state, a, &request(pieces, &[]), t);
    let pb = plan(&mut state, b, &request(pieces, &[]), t);
    assert_eq!((pa.assigned.len(), pb.assigned.len()), (4, 4));
    assert_eq!((pa.next_ask_ms, pb.next_ask_ms), (ms(PLAN_POLL), ms(PLAN_POLL)));
    // 2,000 more downloaders: nothing is left to assign, so they wait longer, the more of
    // them there are.
    let crowd: Vec<PeerId> = (0..2000).map(|_| peer()).collect();
    let mut paces = Vec::new();
    for (k, who) in crowd.iter().enumerate() {
        let p = plan(&mut state, *who, &request(pieces, &[]), t);
        assert!(p.assigned.is_empty());
        if k == 0 || k == 399 || k == 1999 {
            paces.push(p.next_ask_ms);
        }
    }
    assert_eq!(paces, vec![ms(PLAN_POLL), ms(Duration::from_millis(1005)), ms(PLAN_POLL_MAX)]);
    // The assignees still poll fast: their reports decide stalls and takeovers.
    assert_eq!(plan(&mut state, a, &request(pieces, &[]), t).next_ask_ms, ms(PLAN_POLL));
    // A piece released by a dead assignee is origin work again for whoever asks next.
    let later = t + NODE_DEAD + Duration::from_secs(1);
    let p = plan(&mut state, crowd[0], &request(pieces, &[]), later);
    assert_eq!(p.assigned.len(), 4);
    assert_eq!(p.next_ask_ms, ms(PLAN_POLL));
}

/// The takeover seen in `tests/tracker_rollout.rs` (2026-12-08: a 6-piece layer fetched twice
/// after the tracker died): the first request the next planner saw came from a download that
/// held and fetched nothing, but had followed the dead tracker's plans. It now counts as a
/// takeover: nothing is assigned before the fetchers reported, so the pieces they fetch stay
/// theirs.
#[test]
fn a_planned_download_holding_nothing_still_starts_a_takeover() {
    let t0 = Instant::now();
    let (idle, fetcher) = (peer(), peer());
    let mut s = State::new();
    let mut first = request(6, &[]);
    first.planned = true;
    let p = plan(&mut s, idle, &first, t0);
    assert!(p.assigned.is_empty(), "a takeover: nothing new yet, {:?}", p.assigned);
    assert_eq!(p.next_ask_ms, PLAN_POLL.as_millis() as u32, "and ask again soon");
    let mut report = request(6, &[]);
    report.planned = true;
    report.fetching = vec![0, 1, 2, 3];
    let p = plan(&mut s, fetcher, &report, t0 + Duration::from_millis(500));
    assert_eq!(p.assigned, vec![0, 1, 2, 3], "what it fetches stays its own");
    let p = plan(&mut s, idle, &first, t0 + ADOPT_GRACE);
    assert_eq!(p.assigned, vec![4, 5], "only what nobody fetches");
    // Before the change the same first request assigned at once what the fetcher fetched.
    let mut cold = State::new();
    let p = plan(&mut cold, idle, &request(6, &[]), t0);
    assert_eq!(p.assigned, vec![0, 1, 2, 3], "an unplanned first request is a cold start");
}
