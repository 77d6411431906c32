//! What one operation of the agent costs in CPU time: the inputs of the simulator's cost model
//! (`benches/src/sim/cost.rs`). Run with `cargo bench -p shoal-benches --bench costs`
//! (an optional argument filters by name).
//!
//! Each case runs the agent's own code for one kind of work and reports CPU microseconds per
//! operation (or per MiB): the thread CPU clock for pure code on this thread, the process CPU
//! clock (every thread: both swarms' event loops, the tokio workers, this thread) for the
//! libp2p cases, which run two or more real swarms in this process over loopback TCP with
//! noise and yamux, as agents talk to each other. A libp2p figure is both ends of the
//! exchange together (requester and answerer): the model splits it.
//!
//! Not reached here (the model takes them from recorded rollouts, `benches/README.md`): the
//! registry API streaming to containerd, the disk, the kernel's share of TCP, and contention
//! between 80 processes on two cores.
//!
//! Each line ends with `cost:<key>=<value>` so a script can read the figures.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::random_bytes;

use shoal_agent::pieces::Layout;
use shoal_agent::types::Digest;
use shoal_protocol::piece::{
    decode_request, decode_response, encode_request, encode_response, HaveInfo, PieceRequest, PieceResponse,
    MAX_RESPONSE_BYTES,
};
use shoal_protocol::tracker::{
    decode_tracker_request, decode_tracker_response, encode_tracker_request, encode_tracker_response, Plan,
    PlanPeer, PlanRequest, TrackerRequest, TrackerResponse,
};
use shoal_swarm::{Bootstrap, InboundRequest, InboundTrackerRequest, Security, SwarmConfig};
use shoal_tracker::state::State;

const MIB: usize = 1 << 20;

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

fn process_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_PROCESS_CPUTIME_ID)
}

struct Out<'a> {
    filter: Option<&'a str>,
}

impl Out<'_> {
    fn wants(&self, name: &str) -> bool {
        self.filter.is_none_or(|p| name.contains(p))
    }

    fn print(&self, name: &str, key: &str, us: f64, unit: &str, note: &str) {
        println!("{name:<52} {us:>10.2} µs CPU {unit:<10} {note}  cost:{key}={us:.3}");
    }
}

/// Median over 11 batches of ~50 ms of the thread CPU µs per call of `f`.
fn per_call(mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < Duration::from_millis(100) || calls < 2 {
        f();
        calls += 1;
    }
    let batch = (Duration::from_millis(50).as_nanos() as u64 * calls
        / start.elapsed().as_nanos().max(1) as u64)
        .clamp(1, 1_000_000);
    let mut v: Vec<f64> = (0..11)
        .map(|_| {
            let c0 = thread_cpu_ns();
            for _ in 0..batch {
                f();
            }
            (thread_cpu_ns() - c0) as f64 / batch as f64 / 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn peer(i: u64) -> libp2p::PeerId {
    let mut secret = [0u8; 32];
    secret[..8].copy_from_slice(&(i + 1).to_le_bytes());
    libp2p::identity::Keypair::ed25519_from_bytes(secret).expect("32 bytes").public().to_peer_id()
}

/// A download's plan request with `have` of `pieces` pieces, the first `held` set.
fn plan_request(digest: [u8; 32], size: u64, piece_size: u32, held: u32) -> PlanRequest {
    let pieces = size.div_ceil(u64::from(piece_size)) as u32;
    let mut have = vec![0u8; pieces.div_ceil(8) as usize];
    for i in 0..held.min(pieces) {
        have[(i / 8) as usize] |= 1 << (i % 8);
    }
    PlanRequest {
        digest,
        size,
        piece_size,
        have,
        attest: Vec::new(),
        complete: held >= pieces,
        fetching: Vec::new(),
        planned: true,
    }
}

/// `State::plan` as a coordinator runs it: `downloaders` nodes of one layer of `size` bytes
/// ask in turn, each reporting a little more progress every round.
fn plan_cost(downloaders: u64, size: u64) -> f64 {
    let layout = Layout::for_size(size);
    let digest = *Digest::of(b"plan bench layer").as_bytes();
    let peers: Vec<_> = (0..downloaders).map(peer).collect();
    let base = Instant::now();
    let mut state = State::new();
    let mut round = 0u64;
    let mut next = 0usize;
    per_call(|| {
        let i = next % peers.len();
        next += 1;
        if i == 0 {
            round += 1;
        }
        let held = (round % u64::from(layout.pieces() + 1)) as u32;
        let req = plan_request(digest, layout.size, layout.piece_size, held);
        let now = base + Duration::from_millis(round * 500 + i as u64);
        black_box(state.plan(peers[i], &[], &req, now));
        if i == 0 && round.is_multiple_of(2) {
            state.tick(now, round * 500);
        }
    })
}

struct Node {
    client: shoal_swarm::Client,
    inbound: Option<tokio::sync::mpsc::Receiver<InboundRequest>>,
    tracker_inbound: Option<tokio::sync::mpsc::Receiver<InboundTrackerRequest>>,
    peer: libp2p::PeerId,
    addr: libp2p::Multiaddr,
}

async fn node(dir: &std::path::Path, name: &str, bootstrap: Option<&Node>) -> Node {
    let mut config = SwarmConfig::new(dir.join(format!("{name}.key")));
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    config.security = vec![Security::Noise];
    config.request_timeout = Duration::from_secs(10);
    if let Some(b) = bootstrap {
        config.bootstrap = vec![Bootstrap::Peer { peer: b.peer, addr: b.addr.clone() }];
    }
    let parts = shoal_swarm::new(config).expect("swarm starts");
    tokio::spawn(parts.event_loop.run(std::future::pending()));
    let addrs = tokio::time::timeout(Duration::from_secs(5), parts.client.listen_addrs())
        .await
        .expect("listen address within 5 s")
        .expect("listen address");
    Node {
        peer: parts.client.local_peer_id(),
        client: parts.client,
        inbound: Some(parts.inbound),
        tracker_inbound: Some(parts.tracker_inbound),
        addr: addrs[0].clone(),
    }
}

/// Answers piece requests: `Have` with a 32-piece map, `Piece` with `piece` (1 MiB).
fn serve(n: &mut Node, piece: Vec<u8>) {
    let mut inbound = n.inbound.take().expect("served once");
    let client = n.client.clone();
    let have = HaveInfo {
        size: 32 * MIB as u64,
        piece_size: MIB as u32,
        have: vec![0xff; 4],
        piece_digests: (0..32u32).map(|i| (i, *Digest::of(&i.to_le_bytes()).as_bytes())).collect(),
        complete: true,
        media_type: None,
    };
    tokio::spawn(async move {
        while let Some(r) = inbound.recv().await {
            let response = match r.request {
                PieceRequest::Have { .. } => PieceResponse::Have(have.clone()),
                PieceRequest::Piece { index, .. } => PieceResponse::Piece { index, data: piece.clone() },
                PieceRequest::PublicSeen { .. } | PieceRequest::TagSeen { .. } => PieceResponse::NotSeen,
            };
            if client.respond(r.channel, response).await.is_err() {
                return;
            }
        }
    });
    let mut tracker = n.tracker_inbound.take().expect("served once");
    let client = n.client.clone();
    tokio::spawn(async move {
        while let Some(r) = tracker.recv().await {
            let plan = Plan {
                peers: (0..20u64)
                    .map(|i| PlanPeer { peer_id: peer(i).to_bytes(), addrs: Vec::new() })
                    .collect(),
                assigned: vec![1, 2],
                piece_digests: Vec::new(),
                next_ask_ms: 500,
            };
            if client.respond_tracker(r.channel, TrackerResponse::Plan(plan)).await.is_err() {
                return;
            }
        }
    });
}

/// Process CPU µs per call of `op`, over `calls` calls run `parallel` at a time (after a
/// warm-up of a tenth of them).
async fn process_cost<F, Fut>(calls: usize, parallel: usize, op: F) -> (f64, f64)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures_util::stream::StreamExt as _;
    let run = |n: usize| futures_util::stream::iter(0..n).for_each_concurrent(parallel, &op);
    tokio::time::timeout(Duration::from_secs(60), run(calls / 10 + 1)).await.expect("warm-up within 60 s");
    let (c0, t0) = (process_cpu_ns(), Instant::now());
    tokio::time::timeout(Duration::from_secs(120), run(calls)).await.expect("timed calls within 120 s");
    let wall = t0.elapsed().as_secs_f64();
    ((process_cpu_ns() - c0) as f64 / calls as f64 / 1e3, wall)
}

fn libp2p_cases(out: &Out) {
    if !["libp2p", "dht"].iter().any(|c| out.wants(c)) {
        return;
    }
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::Builder::new().prefix("shoal-bench-costs-").tempdir().expect("temp dir");
    rt.block_on(async {
        let mut b = node(dir.path(), "b", None).await;
        let a = node(dir.path(), "a", Some(&b)).await;
        serve(&mut b, random_bytes(MIB, 3));
        a.client.add_address(b.peer, b.addr.clone()).await.expect("add address");
        let digest = Digest::of(b"costs");
        let (ac, bp) = (&a.client, b.peer);
        let have = |_: usize| async move {
            let r = ac.request(bp, PieceRequest::have(&digest)).await;
            assert!(matches!(r, Ok(PieceResponse::Have(_))), "{r:?}");
        };
        if out.wants("libp2p: Have") {
            let (us, wall) = process_cost(2000, 1, have).await;
            out.print(
                "libp2p: Have round trip (32-piece map), noise",
                "have_round_trip_us",
                us,
                "per trip",
                &format!("(both ends; {:.0} µs wall)", wall / 2000.0 * 1e6),
            );
        }
        let plan_req = TrackerRequest::Plan(plan_request(*digest.as_bytes(), 32 * MIB as u64, MIB as u32, 5));
        let plan = |_: usize| {
            let req = plan_req.clone();
            async move {
                let r = ac.tracker_request(bp, req).await;
                assert!(matches!(r, Ok(TrackerResponse::Plan(_))), "{r:?}");
            }
        };
        if out.wants("libp2p: plan") {
            let (us, wall) = process_cost(2000, 1, plan).await;
            out.print(
                "libp2p: plan round trip to a coordinator, noise",
                "plan_round_trip_us",
                us,
                "per trip",
                &format!("(both ends, planner not included; {:.0} µs wall)", wall / 2000.0 * 1e6),
            );
        }
        let piece = |i: usize| async move {
            let r = ac.request(bp, PieceRequest::piece(&digest, i as u32 % 32)).await;
            assert!(matches!(&r, Ok(PieceResponse::Piece { data, .. }) if data.len() == MIB), "{r:?}");
        };
        if out.wants("libp2p: 1 MiB") {
            let (us, wall) = process_cost(400, 4, piece).await;
            out.print(
                "libp2p: 1 MiB piece over noise, 4 in flight",
                "piece_mib_us",
                us,
                "per MiB",
                &format!("(both ends; {:.0} MiB/s wall)", 1.0 / (wall / 400.0)),
            );
        }

        if out.wants("dht") {
            // Eight nodes (these two and six more), all bootstrapped through b; provider
            // lookups from each in turn. Cost per Kademlia request = process CPU / requests
            // received by all nodes (each request is sent once and received once).
            let mut nodes = vec![a, b];
            for i in 0..6 {
                let n = node(dir.path(), &format!("n{i}"), Some(&nodes[1])).await;
                nodes.push(n);
            }
            for n in &nodes {
                n.client.bootstrap().await.expect("bootstrap");
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            for (i, n) in nodes.iter().enumerate().take(4) {
                n.client.start_providing(Digest::of(&[i as u8])).await.expect("provide");
            }
            let received = |nodes: &[Node]| -> u64 {
                nodes
                    .iter()
                    .map(|n| {
                        n.client.stats().dht_requests_received.load(std::sync::atomic::Ordering::Relaxed)
                    })
                    .sum()
            };
            let clients: Vec<_> = nodes.iter().map(|n| n.client.clone()).collect();
            let lookup = |i: usize| {
                let c = clients[i % clients.len()].clone();
                async move {
                    let found = c.find_providers(Digest::of(&[(i % 6) as u8]), Duration::from_secs(5)).await;
                    found.expect("lookup");
                }
            };
            let (r0, c0) = (received(&nodes), process_cpu_ns());
            let (_, wall) = process_cost(400, 4, lookup).await;
            let (requests, cpu) = (received(&nodes) - r0, process_cpu_ns() - c0);
            let us = cpu as f64 / requests.max(1) as f64 / 1e3;
            out.print(
                "dht: Kademlia request (8 nodes, provider lookups)",
                "dht_request_us",
                us,
                "per req",
                &format!("(both ends; {requests} requests in {wall:.1} s incl. warm-up)"),
            );
        }
    });
}

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let out = Out { filter: filter.as_deref() };

    let data = random_bytes(MIB, 1);
    if out.wants("sha256") {
        let us = per_call(|| {
            black_box(Digest::of(black_box(&data)));
        });
        out.print("sha256: Digest::of, 1 MiB", "sha256_mib_us", us, "per MiB", "");
    }
    for (n, size) in [(40u64, 8 * MIB as u64), (1000, 64 * MIB as u64)] {
        let name = format!("plan: State::plan, {n} downloaders, {} MiB layer", size >> 20);
        if out.wants(&name) {
            let pieces = Layout::for_size(size).pieces();
            out.print(
                &name,
                &format!("plan_n{n}_us"),
                plan_cost(n, size),
                "per plan",
                &format!("({pieces} pieces)"),
            );
        }
    }
    let digest = *Digest::of(b"codec").as_bytes();
    if out.wants("codec: plan") {
        let req = TrackerRequest::Plan(plan_request(digest, 64 * MIB as u64, MIB as u32, 20));
        let resp = TrackerResponse::Plan(Plan {
            peers: (0..20u64).map(|i| PlanPeer { peer_id: peer(i).to_bytes(), addrs: Vec::new() }).collect(),
            assigned: vec![1, 2],
            piece_digests: (0..8u32).map(|i| (i, digest)).collect(),
            next_ask_ms: 500,
        });
        let us = per_call(|| {
            let b = encode_tracker_request(black_box(&req)).expect("encode");
            black_box(decode_tracker_request(&b).expect("decode"));
            let b = encode_tracker_response(black_box(&resp)).expect("encode");
            black_box(decode_tracker_response(&b).expect("decode"));
        });
        out.print("codec: plan request + plan (20 peers), enc+dec", "plan_codec_us", us, "per plan", "");
    }
    if out.wants("codec: Have") {
        let req = PieceRequest::have(&Digest::from_sha256(digest));
        let have = PieceResponse::Have(HaveInfo {
            size: 32 * MIB as u64,
            piece_size: MIB as u32,
            have: vec![0xff; 4],
            piece_digests: (0..32u32).map(|i| (i, digest)).collect(),
            complete: true,
            media_type: None,
        });
        let us = per_call(|| {
            let b = encode_request(black_box(&req)).expect("encode");
            black_box(decode_request(&b).expect("decode"));
            let b = encode_response(black_box(&have), MAX_RESPONSE_BYTES).expect("encode");
            black_box(decode_response(&b, MAX_RESPONSE_BYTES).expect("decode"));
        });
        out.print("codec: Have request + answer (32 pieces), enc+dec", "have_codec_us", us, "per Have", "");
    }
    libp2p_cases(&out);
}
