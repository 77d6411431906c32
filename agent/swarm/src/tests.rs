//! Swarm tests: several nodes in one process on 127.0.0.1, real sockets, every wait bounded.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use libp2p::multiaddr::Protocol;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::*;
use shoal_protocol::types::Digest;

const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// Fails the test instead of hanging when `fut` takes longer than `secs`.
async fn within<T>(secs: u64, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(secs), fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: not done within {secs} s"),
    }
}

/// Asks `node` for providers of `digest` until some are found, within `secs` seconds.
async fn first_providers(node: &Node, digest: Digest, secs: u64, what: &str) -> Vec<PeerId> {
    within(secs, what, async {
        loop {
            let found = node.client.find_providers(digest, Duration::from_secs(2)).await.unwrap();
            if !found.is_empty() {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn config(dir: &Path, name: &str) -> SwarmConfig {
    let mut config = SwarmConfig::new(dir.join(format!("{name}.key")));
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.dial_timeout = DIAL_TIMEOUT;
    config.request_timeout = Duration::from_secs(5);
    config
}

struct Node {
    client: Client,
    inbound: Option<mpsc::Receiver<InboundRequest>>,
    peer: PeerId,
    addr: Multiaddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Node {
    async fn start(config: SwarmConfig) -> Node {
        init_tracing();
        let super::Parts { client, inbound, event_loop, .. } = new(config).expect("swarm starts");
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(event_loop.run(async {
            let _ = stop.await;
        }));
        let addrs = within(5, "listen address", client.listen_addrs()).await.unwrap();
        let addr = addrs.first().cloned().expect("a listen address");
        Node { peer: client.local_peer_id(), client, inbound: Some(inbound), addr, shutdown, task }
    }

    fn bootstrap(&self) -> Bootstrap {
        Bootstrap::Peer { peer: self.peer, addr: self.addr.clone() }
    }

    fn port(&self) -> u16 {
        self.addr.iter().find_map(|p| if let Protocol::Tcp(port) = p { Some(port) } else { None }).unwrap()
    }

    /// Answers piece requests from `blobs` (digest → (bytes, piece size)), like the agent's
    /// serving task would from its store.
    fn serve(&mut self, blobs: HashMap<Digest, (Vec<u8>, u32)>) {
        let mut inbound = self.inbound.take().expect("served once");
        let client = self.client.clone();
        tokio::spawn(async move {
            while let Some(InboundRequest { request, channel, .. }) = inbound.recv().await {
                let response = match request.digest().and_then(|d| blobs.get(&d)) {
                    None => PieceResponse::NotFound,
                    Some((data, piece_size)) => answer(&request, data, *piece_size),
                };
                if client.respond(channel, response).await.is_err() {
                    return;
                }
            }
        });
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        within(5, "event loop stops", self.task).await.unwrap();
    }
}

fn answer(request: &PieceRequest, data: &[u8], piece_size: u32) -> PieceResponse {
    let pieces = HaveInfo::piece_count(data.len() as u64, piece_size);
    match request {
        PieceRequest::Have { .. } => {
            let mut have = vec![0u8; pieces.div_ceil(8) as usize];
            for i in 0..pieces as usize {
                have[i / 8] |= 1 << (i % 8);
            }
            let piece_digests = data
                .chunks(piece_size as usize)
                .enumerate()
                .map(|(i, chunk)| (i as u32, *Digest::of(chunk).as_bytes()))
                .collect();
            PieceResponse::Have(HaveInfo {
                size: data.len() as u64,
                piece_size,
                have,
                piece_digests,
                complete: true,
                media_type: None,
            })
        }
        PieceRequest::Piece { index, .. } => match data.chunks(piece_size as usize).nth(*index as usize) {
            Some(chunk) => PieceResponse::Piece { index: *index, data: chunk.to_vec() },
            None => PieceResponse::NotFound,
        },
        PieceRequest::PublicSeen { .. } | PieceRequest::TagSeen { .. } => PieceResponse::NotSeen,
    }
}

fn blob(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_find_and_fetch() {
    let dir = tempfile::tempdir().unwrap();
    const PIECE: u32 = 4 << 20;
    let data = blob(PIECE as usize + 1000);
    let digest = Digest::of(&data);

    let mut a = Node::start(config(dir.path(), "a")).await;
    a.serve(HashMap::from([(digest, (data.clone(), PIECE))]));
    within(5, "provide", a.client.start_providing(digest)).await.unwrap();

    let mut b_config = config(dir.path(), "b");
    b_config.bootstrap = vec![a.bootstrap()];
    let b = Node::start(b_config).await;
    let mut c_config = config(dir.path(), "c");
    c_config.bootstrap = vec![b.bootstrap()];
    let c = Node::start(c_config).await;

    // C knows only B; the DHT leads it to A.
    let started = Instant::now();
    let providers = first_providers(&c, digest, 15, "C finds A").await;
    let found_in = started.elapsed();
    assert_eq!(providers, vec![a.peer]);
    // B does not hold it, and a node never lists itself.
    let from_a =
        within(5, "A looks up", a.client.find_providers(digest, Duration::from_secs(2))).await.unwrap();
    assert!(!from_a.contains(&a.peer));

    let Ok(PieceResponse::Have(info)) =
        within(10, "have", c.client.request(a.peer, PieceRequest::have(&digest))).await
    else {
        panic!("expected a Have answer");
    };
    assert_eq!((info.size, info.piece_size, info.complete), (data.len() as u64, PIECE, true));
    assert!(info.has(0) && info.has(1) && !info.has(2));
    assert_eq!(info.piece_digests[1], (1, *Digest::of(&data[PIECE as usize..]).as_bytes()));

    // The 4 MiB piece, a few times, for a loopback throughput figure.
    let rounds = 8;
    let started = Instant::now();
    for _ in 0..rounds {
        let response = within(20, "piece 0", c.client.request(a.peer, PieceRequest::piece(&digest, 0))).await;
        let Ok(PieceResponse::Piece { index: 0, data: got }) = response else {
            panic!("expected piece 0, got {response:?}");
        };
        assert!(got == data[..PIECE as usize]);
    }
    let per_piece = started.elapsed() / rounds;
    let Ok(PieceResponse::Piece { index: 1, data: last }) =
        within(10, "piece 1", c.client.request(a.peer, PieceRequest::piece(&digest, 1))).await
    else {
        panic!("expected piece 1");
    };
    assert_eq!(last, data[PIECE as usize..]);
    let missing = within(10, "piece 2", c.client.request(a.peer, PieceRequest::piece(&digest, 2))).await;
    assert_eq!(missing, Ok(PieceResponse::NotFound));
    let other =
        within(10, "other digest", c.client.request(a.peer, PieceRequest::have(&Digest::of(b"x")))).await;
    assert_eq!(other, Ok(PieceResponse::NotFound));

    println!(
        "provider found in {found_in:?}; 4 MiB piece round trip {per_piece:?} ({:.0} MiB/s)",
        4.0 / per_piece.as_secs_f64()
    );
    let c_stats = c.client.stats();
    assert!(c_stats.dht_lookups.load(Ordering::Relaxed) >= 1);
    assert!(a.client.stats().inbound_requests.load(Ordering::Relaxed) >= rounds as u64 + 4);
    assert_eq!(b.client.connected_peers().await, 2);

    within(5, "stop providing", a.client.stop_providing(digest)).await.unwrap();

    for node in [c, b, a] {
        node.stop().await;
    }
}

/// A node that provided while alone publishes again once it has peers: its record then
/// outlives it on the node it joined through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_published_alone_reach_later_peers() {
    let dir = tempfile::tempdir().unwrap();
    let digest = Digest::of(b"early");
    let a = Node::start(config(dir.path(), "a")).await;
    within(5, "provide", a.client.start_providing(digest)).await.unwrap();
    let mut b_config = config(dir.path(), "b");
    b_config.bootstrap = vec![a.bootstrap()];
    let b = Node::start(b_config).await;

    // One publication while alone, one after B joined; then A goes away and C, which knows
    // only B, must get A's record from B.
    within(10, "A re-publishes", async {
        while a.client.stats().dht_publications.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let a_peer = a.peer;
    a.stop().await;
    let mut c_config = config(dir.path(), "c");
    c_config.bootstrap = vec![b.bootstrap()];
    let c = Node::start(c_config).await;
    let found = first_providers(&c, digest, 10, "C finds A through B").await;
    assert_eq!(found, vec![a_peer]);
    c.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_key_persists() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "node");
    let first = Node::start(cfg.clone()).await;
    let peer = first.peer;
    first.stop().await;
    let mode = std::fs::metadata(&cfg.key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let second = Node::start(cfg.clone()).await;
    assert_eq!(second.peer, peer, "same key file, same PeerId");
    second.stop().await;

    // Garbage in the key file: a clear error, the file left alone.
    std::fs::write(&cfg.key_path, b"not a key").unwrap();
    let err = new(cfg.clone()).err().expect("garbage key refused");
    assert!(matches!(&err, SwarmError::KeyFile { path, .. } if *path == cfg.key_path), "{err}");
    assert!(err.to_string().contains("not a libp2p private key"), "{err}");
    assert_eq!(std::fs::read(&cfg.key_path).unwrap(), b"not a key");

    // A key path that cannot be read.
    let mut unreadable = cfg.clone();
    unreadable.key_path = dir.path().to_path_buf();
    let err = new(unreadable).err().expect("directory refused");
    assert!(matches!(&err, SwarmError::KeyFile { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_ends_when_clients_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(config(dir.path(), "n")).await;
    let Node { client, inbound, task, shutdown, .. } = node;
    drop((client, inbound));
    within(5, "loop ends", task).await.unwrap();
    drop(shutdown);
}

fn write_swarm_key(dir: &Path, name: &str, byte: u8) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", hex::encode([byte; 32]))).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_key_separates_networks() {
    let dir = tempfile::tempdir().unwrap();
    let key1 = write_swarm_key(dir.path(), "k1", 1);
    let key2 = write_swarm_key(dir.path(), "k2", 2);
    let with_key = |name: &str, key: Option<&std::path::PathBuf>| {
        let mut c = config(dir.path(), name);
        c.swarm_key = key.cloned();
        c
    };
    let mut p = Node::start(with_key("p", Some(&key1))).await;
    p.serve(HashMap::new());
    let q = Node::start(with_key("q", Some(&key1))).await;
    let other_key = Node::start(with_key("r", Some(&key2))).await;
    let no_key = Node::start(with_key("s", None)).await;

    q.client.add_address(p.peer, p.addr.clone()).await.unwrap();
    let digest = Digest::of(b"nothing");
    let answer = within(10, "same key", q.client.request(p.peer, PieceRequest::have(&digest))).await;
    assert_eq!(answer, Ok(PieceResponse::NotFound));

    for outsider in [&other_key, &no_key] {
        outsider.client.add_address(p.peer, p.addr.clone()).await.unwrap();
        let started = Instant::now();
        let answer =
            within(10, "outsider", outsider.client.request(p.peer, PieceRequest::have(&digest))).await;
        assert_eq!(answer, Err(RequestError::Unreachable));
        assert!(started.elapsed() < DIAL_TIMEOUT + Duration::from_secs(1), "took {:?}", started.elapsed());
    }
    assert_eq!(p.client.connected_peers().await, 1, "only the node with the key is connected");

    // A malformed swarm key file is refused at start.
    let bad = dir.path().join("bad");
    std::fs::write(&bad, "/key/swarm/psk/1.0.0/\n/base16/\nxyz\n").unwrap();
    let err = new(with_key("t", Some(&bad))).err().expect("bad swarm key refused");
    assert!(matches!(&err, SwarmError::SwarmKey { .. }), "{err}");
    let missing = dir.path().join("missing");
    assert!(matches!(new(with_key("u", Some(&missing))), Err(SwarmError::SwarmKey { .. })));
    // pnet cannot wrap QUIC: a private node neither listens on nor dials QUIC addresses, so
    // nobody can go around the key that way.
    let mut quic = with_key("v", Some(&key1));
    quic.listen.push("/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap());
    assert!(matches!(new(quic), Err(SwarmError::Config(_))), "QUIC listen with a swarm key refused");
    let mut quic = with_key("w", Some(&key1));
    quic.bootstrap.push(format!("/ip4/127.0.0.1/udp/5001/quic-v1/p2p/{}", p.peer).parse().unwrap());
    assert!(matches!(new(quic), Err(SwarmError::Config(_))), "QUIC bootstrap with a swarm key refused");
    let listening = p.client.listen_addrs().await.unwrap();
    assert!(listening.iter().all(|a| !is_quic(a)), "a private node listens on TCP only: {listening:?}");

    for node in [p, q, other_key, no_key] {
        node.stop().await;
    }
}

/// Nodes offering different lists of TCP security protocols connect over one they share,
/// and not at all when they share none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_protocols_negotiate() {
    let dir = tempfile::tempdir().unwrap();
    let offering = |name: &str, security: &[Security]| {
        let mut c = config(dir.path(), name);
        c.security = security.to_vec();
        c
    };
    let mut tls_only = Node::start(offering("tls", &[Security::Tls])).await;
    tls_only.serve(HashMap::new());
    let mut noise_only = Node::start(offering("noise", &[Security::Noise])).await;
    noise_only.serve(HashMap::new());
    let digest = Digest::of(b"nothing");
    for (name, list) in
        [("both", Security::DEFAULT.to_vec()), ("noise-first", vec![Security::Noise, Security::Tls])]
    {
        let dialer = Node::start(offering(name, &list)).await;
        for target in [&tls_only, &noise_only] {
            dialer.client.add_address(target.peer, target.addr.clone()).await.unwrap();
            let answer =
                within(10, name, dialer.client.request(target.peer, PieceRequest::have(&digest))).await;
            assert_eq!(answer, Ok(PieceResponse::NotFound), "{name} dialing {}", target.addr);
        }
        dialer.stop().await;
    }
    // No protocol in common: no connection.
    tls_only.client.add_address(noise_only.peer, noise_only.addr.clone()).await.unwrap();
    let answer =
        within(10, "disjoint", tls_only.client.request(noise_only.peer, PieceRequest::have(&digest))).await;
    assert_eq!(answer, Err(RequestError::Unreachable));
    assert!(Security::parse_list("tls,quux").is_err());
    assert_eq!(Security::parse_list("noise, tls,noise").unwrap(), vec![Security::Noise, Security::Tls]);
    tls_only.stop().await;
    noise_only.stop().await;
}

/// Pieces move over QUIC between nodes that listen on a `/udp/…/quic-v1` address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_moves_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let data = blob(3 * 1024 * 1024 + 17);
    let digest = Digest::of(&data);
    let mut quic = config(dir.path(), "q");
    quic.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    let mut server = Node::start(quic).await;
    assert!(is_quic(&server.addr), "{}", server.addr);
    server.serve(HashMap::from([(digest, (data.clone(), 1024 * 1024))]));
    let mut dialer = config(dir.path(), "d");
    dialer.bootstrap = vec![server.bootstrap()];
    let client = Node::start(dialer).await;
    let answer =
        within(10, "piece over QUIC", client.client.request(server.peer, PieceRequest::piece(&digest, 3)))
            .await
            .unwrap();
    match answer {
        PieceResponse::Piece { data: got, .. } => assert_eq!(&got[..], &data[3 * 1024 * 1024..]),
        other => panic!("expected a piece, got {other:?}"),
    }
    client.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_peer_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let gone = Node::start(config(dir.path(), "gone")).await;
    let (gone_peer, gone_addr) = (gone.peer, gone.addr.clone());
    gone.stop().await;

    let node = Node::start(config(dir.path(), "n")).await;
    node.client.add_address(gone_peer, gone_addr).await.unwrap();
    let started = Instant::now();
    let answer =
        within(10, "dead peer", node.client.request(gone_peer, PieceRequest::have(&Digest::of(b"x")))).await;
    assert_eq!(answer, Err(RequestError::Unreachable));
    assert!(started.elapsed() < DIAL_TIMEOUT, "took {:?}", started.elapsed());

    // A peer nobody knows an address of.
    let stranger = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
    let answer =
        within(10, "unknown peer", node.client.request(stranger, PieceRequest::have(&Digest::of(b"x"))))
            .await;
    assert_eq!(answer, Err(RequestError::Unreachable));
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_response_is_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = blob(2 << 20);
    let digest = Digest::of(&data);
    // The responder allows full-size messages; the requester only 1 MiB.
    let mut big = Node::start(config(dir.path(), "big")).await;
    big.serve(HashMap::from([(digest, (data, 2 << 20))]));
    let mut small_config = config(dir.path(), "small");
    small_config.max_message_bytes = 1 << 20;
    let small = Node::start(small_config).await;
    small.client.add_address(big.peer, big.addr.clone()).await.unwrap();

    let answer =
        within(10, "oversized", small.client.request(big.peer, PieceRequest::piece(&digest, 0))).await;
    assert!(matches!(&answer, Err(RequestError::Protocol(m)) if m.contains("exceeds")), "{answer:?}");
    // The connection and both loops survive.
    let answer = within(10, "after", small.client.request(big.peer, PieceRequest::have(&digest))).await;
    assert!(matches!(answer, Ok(PieceResponse::Have(_))), "{answer:?}");
    assert_eq!(small.client.connected_peers().await, 1);
    small.stop().await;
    big.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_busy() {
    let dir = tempfile::tempdir().unwrap();
    let mut server_config = config(dir.path(), "server");
    server_config.inbound_queue = 1;
    let mut server = Node::start(server_config).await;
    let client = Node::start(config(dir.path(), "client")).await;
    client.client.add_address(server.peer, server.addr.clone()).await.unwrap();
    let digest = Digest::of(b"x");

    // Nobody reads the server's queue: the first request waits in it, the second is Busy.
    let waiting = tokio::spawn({
        let c = client.client.clone();
        async move { c.request(server.peer, PieceRequest::have(&digest)).await }
    });
    within(5, "queued", async {
        while server.client.stats().inbound_requests.load(Ordering::Relaxed) < 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let answer = within(10, "busy", client.client.request(server.peer, PieceRequest::have(&digest))).await;
    assert_eq!(answer, Ok(PieceResponse::Busy));
    assert_eq!(server.client.stats().inbound_busy.load(Ordering::Relaxed), 1);

    // Dropping the queued request unanswered closes the requester's stream at once.
    drop(server.inbound.take());
    let answer = within(10, "dropped", waiting).await.unwrap();
    assert_eq!(answer, Err(RequestError::ConnectionClosed));
    // With the serving side gone, requests are answered NotFound.
    let answer =
        within(10, "no server", client.client.request(server.peer, PieceRequest::have(&digest))).await;
    assert_eq!(answer, Ok(PieceResponse::NotFound));
    client.stop().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_bootstrap_reaches_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Node::start(config(dir.path(), "a")).await;
    a.serve(HashMap::new());
    let mut b_config = config(dir.path(), "b");
    b_config.bootstrap = vec![format!("dns:localhost:{}", a.port()).parse().unwrap()];
    let b = Node::start(b_config).await;

    within(10, "connected through DNS", async {
        while b.client.connected_peers().await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    // The handshake told B who answered: it can address A by peer id.
    let answer = within(10, "request", b.client.request(a.peer, PieceRequest::have(&Digest::of(b"x")))).await;
    assert_eq!(answer, Ok(PieceResponse::NotFound));
    b.stop().await;
    a.stop().await;
}

#[test]
fn bootstrap_parsing() {
    let peer = libp2p::identity::Keypair::generate_ed25519().public().to_peer_id();
    let parsed: Bootstrap = format!("/ip4/10.0.0.1/tcp/5001/p2p/{peer}").parse().unwrap();
    assert_eq!(parsed, Bootstrap::Peer { peer, addr: "/ip4/10.0.0.1/tcp/5001".parse().unwrap() });
    assert_eq!(parsed.to_string(), format!("/ip4/10.0.0.1/tcp/5001/p2p/{peer}"));

    let dns: Bootstrap = "dns:shoal-agents.shoal.svc.cluster.local".parse().unwrap();
    assert_eq!(
        dns,
        Bootstrap::Dns { host: "shoal-agents.shoal.svc.cluster.local".to_string(), port: DEFAULT_PORT }
    );
    assert_eq!(
        "dns:agents:7000".parse::<Bootstrap>().unwrap(),
        Bootstrap::Dns { host: "agents".into(), port: 7000 }
    );

    let quic: Bootstrap = format!("/ip4/10.0.0.1/udp/5001/quic-v1/p2p/{peer}").parse().unwrap();
    assert_eq!(quic, Bootstrap::Peer { peer, addr: "/ip4/10.0.0.1/udp/5001/quic-v1".parse().unwrap() });

    let err = |s: &str| s.parse::<Bootstrap>().unwrap_err();
    assert!(matches!(err(&format!("/ip4/10.0.0.1/udp/5001/p2p/{peer}")), SwarmError::Bootstrap { .. }));
    assert!(matches!(err("/ip4/10.0.0.1/tcp/5001"), SwarmError::Bootstrap { .. }), "no peer id");
    assert!(matches!(err("not a multiaddr"), SwarmError::Multiaddr { .. }));
    assert!(matches!(err(&format!("/dns4/agents/tcp/5001/p2p/{peer}")), SwarmError::Bootstrap { .. }));
    assert!(matches!(err("dns:agents:http"), SwarmError::Bootstrap { .. }));
    assert!(matches!(err("dns:"), SwarmError::Bootstrap { .. }));
    assert!(matches!(err("dns:a b"), SwarmError::Bootstrap { .. }));
}

#[test]
fn config_validation() {
    let mut config = SwarmConfig::new("node.key".into());
    assert!(config.validate().is_ok());
    assert_eq!(config.listen[0].to_string(), "/ip4/0.0.0.0/tcp/5001");
    config.max_message_bytes = MAX_RESPONSE_BYTES + 1;
    assert!(matches!(config.validate(), Err(SwarmError::Config(_))));
    config.max_message_bytes = MAX_RESPONSE_BYTES;
    config.dial_timeout = Duration::ZERO;
    assert!(matches!(config.validate(), Err(SwarmError::Config(_))));
}
