//! The tracker as a process: bad input of every kind gets a clear answer and the tracker keeps
//! serving; the dashboard, loaded in headless Chromium during a rollout, shows the nodes and
//! their progress (a screenshot is kept under `target/test-artifacts/`).
//!
//! Tracker-protocol traffic comes from [`TrackerClient`]s (each its own libp2p identity, so
//! each looks like a node) and, for the dashboard, also from real agents started with
//! `--tracker`.

use std::path::PathBuf;
use std::time::Duration;

use shoal_protocol::tracker::{
    encode_tracker_request, Heartbeat, NodeCounters, PlanRequest, PreheatJob, TrackerRequest,
    TrackerResponse, MAX_HELD_PER_HEARTBEAT, MAX_TRACKER_MESSAGE_BYTES,
};
use shoal_tests::pull::pull;
use shoal_tests::util::{find_binary, workspace_dir};
use shoal_tests::{
    free_port, http_client, poll_until, run_tracker_expecting_exit, Agent, AgentOptions, ImageKind,
    ImageSpec, Origin, Tracker, TrackerClient, TrackerOptions,
};
use tokio::sync::oneshot;

const MIB: u64 = 1 << 20;

fn tracker_for(origin: &Origin) -> TrackerOptions {
    TrackerOptions::new().upstream(&origin.host(), &origin.url()).default_registry(&origin.host())
}

/// A plan request for `pieces` pieces of 1 MiB holding the first `held` of them.
fn plan_request(digest: [u8; 32], pieces: u32, held: u32) -> PlanRequest {
    let mut have = vec![0u8; pieces.div_ceil(8) as usize];
    for i in 0..held {
        have[(i / 8) as usize] |= 1 << (i % 8);
    }
    PlanRequest {
        digest,
        size: u64::from(pieces) * MIB,
        piece_size: MIB as u32,
        have,
        attest: Vec::new(),
        complete: held == pieces,
        fetching: Vec::new(),
        planned: false,
    }
}

fn heartbeat(zone: &str, full: bool, counters: NodeCounters) -> TrackerRequest {
    TrackerRequest::Heartbeat(Heartbeat {
        zone: Some(zone.to_string()),
        full,
        counters,
        ..Heartbeat::default()
    })
}

/// bincode as the agent writes it, but without the agent's validation.
fn encode_unchecked(request: &TrackerRequest) -> Vec<u8> {
    bincode::serde::encode_to_vec(request, bincode::config::standard()).expect("encode")
}

fn error_text(body: &serde_json::Value) -> &str {
    body["error"].as_str().unwrap_or_else(|| panic!("no JSON error in {body}"))
}

/// 6. Malformed and oversized protocol messages, a layout that disagrees, unknown digests,
/// bad preheat requests: each gets a clear error, and the tracker keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_tracker_keeps_serving() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciIndex, "tracker/present", "v1").layers(&[300_000]))
        .await
        .unwrap();
    let mut tracker = Tracker::start(tracker_for(&origin)).await.unwrap();
    let mut a = TrackerClient::connect(&tracker.p2p_addr()).await.unwrap();
    let answer = a.request(&heartbeat("z1", true, NodeCounters::default())).await.unwrap();
    assert_eq!(answer, TrackerResponse::Heartbeat { resync: false, preheat: vec![] });

    // Malformed or oversized: the stream is reset, nothing reaches the state.
    let valid = encode_tracker_request(&heartbeat("z1", false, NodeCounters::default())).unwrap();
    let mut trailing = valid.clone();
    trailing.push(0);
    let too_many = TrackerRequest::Heartbeat(Heartbeat {
        held_added: vec![[1; 32]; MAX_HELD_PER_HEARTBEAT + 1],
        ..Heartbeat::default()
    });
    let mut bits_past_the_end = plan_request([9; 32], 3, 0);
    bits_past_the_end.have = vec![0b1000];
    let mut zero_pieces = plan_request([9; 32], 3, 0);
    zero_pieces.piece_size = 0;
    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff, 0xff, 0xff]),
        ("empty", Vec::new()),
        ("oversized", vec![0; MAX_TRACKER_MESSAGE_BYTES + 1]),
        ("trailing bytes", trailing),
        ("too many held digests", encode_unchecked(&too_many)),
        ("bits past the last piece", encode_unchecked(&TrackerRequest::Plan(bits_past_the_end))),
        ("zero piece size", encode_unchecked(&TrackerRequest::Plan(zero_pieces))),
    ];
    for (what, bytes) in &bad {
        let result = a.send_raw(bytes.clone()).await;
        assert!(result.is_err(), "{what}: the tracker answered {result:?}");
    }
    // A digest nobody knows: the first plan fixes its layout and gets origin pieces; a plan
    // with another size is refused, with the reason.
    let digest = [42; 32];
    let mut b = TrackerClient::connect(&tracker.p2p_addr()).await.unwrap();
    match b.request(&TrackerRequest::Plan(plan_request(digest, 3, 0))).await.unwrap() {
        TrackerResponse::Plan(plan) => assert_eq!(plan.assigned, vec![0, 1, 2]),
        other => panic!("expected a plan, got {other:?}"),
    }
    let mut c = TrackerClient::connect(&tracker.p2p_addr()).await.unwrap();
    match c.request(&TrackerRequest::Plan(plan_request(digest, 5, 0))).await.unwrap() {
        TrackerResponse::Refused(why) => assert!(why.contains("size disagrees"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Unknown digests in a heartbeat are simply recorded or ignored.
    let unknown = TrackerRequest::Heartbeat(Heartbeat {
        held_removed: vec![[77; 32]],
        downloading: vec![[78; 32]],
        ..Heartbeat::default()
    });
    assert!(matches!(c.request(&unknown).await.unwrap(), TrackerResponse::Heartbeat { resync: true, .. }));
    let digests = tracker.get_json("/api/v1/digests").await.unwrap();
    let listed = &digests["digests"][0];
    assert_eq!(listed["digest"], format!("sha256:{}", "2a".repeat(32)), "{digests}");
    assert_eq!((listed["pieces"].as_u64(), listed["assigned"].as_u64()), (Some(3), Some(3)), "{digests}");
    assert!(tracker.metric("shoal_tracker_requests_refused_total").await.unwrap() >= 1.0);

    // Preheat: a missing image, bad bodies, an unreachable origin, unknown job ids.
    let (status, body) =
        tracker.preheat(&format!("{}/tracker/absent:v1", origin.host()), "all".into()).await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(error_text(&body).contains("tracker/absent"), "{body}");
    let absent_digest = format!("{}/tracker/present@sha256:{}", origin.host(), "0".repeat(64));
    let (status, body) = tracker.preheat(&absent_digest, 1.into()).await.unwrap();
    assert_eq!(status, 404, "{body}");
    for (body, expect) in [
        ("not json", "must be JSON"),
        ("{\"image\": 5}", "must be JSON"),
        ("{\"nodes\": \"all\"}", "must be JSON"),
        ("{\"image\": \"x:1\", \"nodes\": \"all\", \"extra\": 1}", "must be JSON"),
        ("{\"image\": \"x:1\", \"nodes\": 0}", "at least one node"),
        ("{\"image\": \"x:1\", \"nodes\": \"some\"}", "\"nodes\" must be"),
        ("{\"image\": \"x:1\", \"nodes\": -2}", "\"nodes\" must be"),
        ("{\"image\": \"Upper/Case:1\"}", "invalid image reference"),
        ("{\"image\": \"app@sha256:zz\"}", "invalid image reference"),
    ] {
        let (status, answer) = tracker.post("/api/v1/preheat", body).await.unwrap();
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(error_text(&answer).contains(expect), "{body} -> {answer}");
    }
    let nowhere = format!("127.0.0.1:{}/x/y:1", free_port());
    let (status, body) = tracker.preheat(&nowhere, "all".into()).await.unwrap();
    assert_eq!(status, 502, "{body}");
    assert!(error_text(&body).contains("unreachable"), "{body}");
    for id in ["999", "abc"] {
        let resp = http_client().get(format!("{}/api/v1/preheat/{id}", tracker.url())).send().await.unwrap();
        assert_eq!(resp.status(), 404);
        let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert!(error_text(&body).contains("no preheat job"), "{body}");
    }

    // A good preheat still works, and reaches the chosen node in its heartbeat answer.
    let (status, job) = tracker.preheat(&image.reference(), 1.into()).await.unwrap();
    assert_eq!(status, 202, "{job}");
    assert_eq!(job["manifest"], image.manifest.digest, "{job}");
    let chosen = job["nodes"][0].as_str().unwrap().to_string();
    let id = job["id"].as_u64().unwrap();
    let mut delivered: Vec<PreheatJob> = Vec::new();
    for client in [&mut a, &mut b, &mut c] {
        let beat = heartbeat("z1", true, NodeCounters::default());
        if let TrackerResponse::Heartbeat { preheat, .. } = client.request(&beat).await.unwrap() {
            assert_eq!(!preheat.is_empty(), client.peer_id().to_string() == chosen, "{preheat:?}");
            delivered.extend(preheat);
        }
    }
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    assert_eq!((delivered[0].id, delivered[0].registry.as_str()), (id, origin.host().as_str()));
    assert_eq!(delivered[0].repository, "tracker/present");
    let status = tracker.get_json(&format!("/api/v1/preheat/{id}")).await.unwrap();
    assert_eq!(status["state"], "running", "{status}");

    // After all that: still healthy, still answering.
    assert!(tracker.is_running(), "{}", tracker.log_tail());
    let health = http_client().get(format!("{}/healthz", tracker.url())).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let answer = a.request(&heartbeat("z1", false, NodeCounters::default())).await.unwrap();
    assert!(matches!(answer, TrackerResponse::Heartbeat { resync: false, .. }), "{answer:?}");
}

/// Malformed and oversized requests are counted in `shoal_tracker_malformed_requests_total`
/// (the swarm's `tracker_requests_failed`), so an operator sees a misbehaving client.
///
/// libp2p-request-response 0.30 emits no `InboundFailure` when `read_request` fails (it only
/// logs at debug level), so the count comes from the `TrackerCodec` itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_counted() {
    let tracker = Tracker::start(TrackerOptions::new()).await.unwrap();
    let mut client = TrackerClient::connect(&tracker.p2p_addr()).await.unwrap();
    let bad = [vec![0xff, 0xff, 0xff], Vec::new(), vec![0; MAX_TRACKER_MESSAGE_BYTES + 1]];
    for bytes in &bad {
        assert!(client.send_raw(bytes.clone()).await.is_err());
    }
    let count = bad.len() as f64;
    let counted = poll_until(
        "the tracker to count every malformed request",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let tracker = &tracker;
            async move {
                let n = tracker.metric("shoal_tracker_malformed_requests_total").await?;
                Ok((n >= count).then_some(n))
            }
        },
    )
    .await;
    assert!(counted.is_ok(), "{counted:?}\n{}", tracker.metrics_text().await.unwrap());
    // A well-formed request afterwards is answered as usual.
    let answer = client.request(&heartbeat("z1", true, NodeCounters::default())).await.unwrap();
    assert_eq!(answer, TrackerResponse::Heartbeat { resync: false, preheat: vec![] });
}

/// Bad flags and busy ports stop the tracker at once, with the flag named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_and_busy_ports_exit_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().display().to_string();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let free_http = format!("127.0.0.1:{}", free_port());
    let free_p2p = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--p2p-listen".into(), "nonsense".into()], "nonsense"),
        (vec!["--http-listen".into(), "nowhere".into()], "--http-listen"),
        (vec!["--bootstrap".into(), "/ip4/127.0.0.1/tcp/1".into()], "bootstrap"),
        (vec!["--upstream".into(), "docker.io".into()], "--upstream"),
        (
            vec!["--http-listen".into(), format!("127.0.0.1:{busy_port}"), "--p2p-listen".into(), free_p2p],
            "--http-listen",
        ),
        (
            vec![
                "--http-listen".into(),
                free_http,
                "--p2p-listen".into(),
                format!("/ip4/127.0.0.1/tcp/{busy_port}"),
            ],
            "--p2p-listen",
        ),
    ];
    for (args, expect) in cases {
        let mut argv = vec!["--cache-dir".to_string(), cache.clone()];
        argv.extend(args);
        let out = run_tracker_expecting_exit(&argv, Duration::from_secs(20)).await.unwrap();
        assert!(!out.success(), "{argv:?} should fail:\n{out}");
        assert!(out.stderr.contains(expect), "{argv:?}: stderr should name {expect:?}:\n{out}");
    }
    drop(busy);
}

/// Keeps simulated nodes alive with a heartbeat and a plan every second until `stop` fires.
fn keep_alive(
    mut nodes: Vec<(TrackerClient, TrackerRequest, TrackerRequest)>,
    mut stop: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            for (client, beat, plan) in nodes.iter_mut() {
                let _ = client.request(beat).await;
                let _ = client.request(plan).await;
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    })
}

async fn chromium(args: &[String]) -> shoal_tests::CmdOutput {
    let binary = find_binary("chromium", "chromium").unwrap();
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(binary);
    cmd.args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args);
    let out = shoal_tests::process::run_bounded(cmd, Duration::from_secs(90)).await.unwrap();
    assert!(out.success(), "chromium {args:?} failed:\n{out}");
    out
}

/// `<element …attr="value"…>` tags in `dom` whose opening tag contains every one of `parts`.
fn tags_with<'a>(dom: &'a str, parts: &[&str]) -> Vec<&'a str> {
    dom.split('<')
        .filter(|tag| parts.iter().all(|p| tag.split('>').next().unwrap_or("").contains(p)))
        .collect()
}

/// 5. The dashboard in headless Chromium during a rollout: real agents and simulated nodes
/// are listed, the rollout in flight shows each node's progress, and a screenshot is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_nodes_and_rollout_progress() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(
            &ImageSpec::new(ImageKind::OciManifest, "tracker/dashboard", "v1").layers(&[3 * MIB, 1_000_001]),
        )
        .await
        .unwrap();
    let tracker = Tracker::start(tracker_for(&origin)).await.unwrap();

    // Two real agents in zone "east" pull the image through the tracker.
    let agent_opts = |zone: &str| {
        AgentOptions::new()
            .upstream(&origin.host(), &origin.url())
            .arg("--tracker")
            .arg(&tracker.p2p_addr())
            .arg("--zone")
            .arg(zone)
    };
    let agents = vec![
        Agent::start(agent_opts("east")).await.unwrap(),
        Agent::start(agent_opts("east")).await.unwrap(),
    ];
    let mut agent_ids = Vec::new();
    for agent in &agents {
        let addr = agent.p2p_addr().await.unwrap();
        agent_ids.push(addr.rsplit('/').next().unwrap().to_string());
    }
    // Pull once both agents announced themselves (before that they run DHT-only).
    let listed =
        poll_until("the agents to heartbeat", Duration::from_secs(30), Duration::from_millis(200), || {
            let tracker = &tracker;
            let agent_ids = &agent_ids;
            async move {
                let ids = tracker.node_ids().await?;
                Ok(agent_ids.iter().all(|id| ids.contains(id)).then_some(()))
            }
        })
        .await;
    listed.unwrap_or_else(|e| panic!("{e:#}\ntracker log:\n{}", tracker.log_tail()));
    for agent in &agents {
        pull(agent, &origin, &image).await.expect("pull through an agent");
    }

    // A rollout in flight: three simulated nodes in zone "west" at 100 %, 50 % and 25 % of a
    // 16-piece blob, kept alive while the browser looks.
    let digest = [0xab; 32];
    let mut simulated = Vec::new();
    let mut fake_ids = Vec::new();
    for (i, held) in [16u32, 8, 4].into_iter().enumerate() {
        let mut client = TrackerClient::connect(&tracker.p2p_addr()).await.unwrap();
        fake_ids.push(client.peer_id().to_string());
        let counters = NodeCounters {
            origin_bytes: u64::from(held) * MIB / 4,
            peer_bytes: u64::from(held) * MIB * 3 / 4,
            sent_bytes: (i as u64) * MIB,
            cache_bytes: 100 * MIB,
        };
        let beat = heartbeat("west", true, counters);
        let plan = TrackerRequest::Plan(plan_request(digest, 16, held));
        client.request(&beat).await.unwrap();
        client.request(&plan).await.unwrap();
        simulated.push((client, beat, plan));
    }
    let (stop, stopped) = oneshot::channel();
    let keeper = keep_alive(simulated, stopped);

    // Every node is listed by the API before the browser looks.
    let expected: Vec<String> = agent_ids.iter().chain(&fake_ids).cloned().collect();
    let listed = poll_until(
        "the tracker to list every node",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let tracker = &tracker;
            let expected = &expected;
            async move {
                let ids = tracker.node_ids().await?;
                Ok(expected.iter().all(|id| ids.contains(id)).then_some(()))
            }
        },
    )
    .await;
    if let Err(e) = listed {
        panic!("{e:#}\nnodes: {}", tracker.get_json("/api/v1/nodes").await.unwrap());
    }

    let url = format!("{}/", tracker.url());
    let out =
        chromium(&["--virtual-time-budget=5000".to_string(), "--dump-dom".to_string(), url.clone()]).await;
    let dom = out.stdout;
    assert!(dom.contains("data-loaded=\"true\""), "the page never loaded the API:\n{dom}");
    for id in &expected {
        let rows = tags_with(&dom, &["tr class=\"node\"", &format!("data-peer-id=\"{id}\"")]);
        assert_eq!(rows.len(), 1, "node {id} not listed once in the nodes table:\n{dom}");
        assert!(rows[0].contains("data-alive=\"true\""), "node {id} not alive: {}", rows[0]);
    }
    for id in &agent_ids {
        assert!(tags_with(&dom, &["tr class=\"node\"", id, "data-zone=\"east\""]).len() == 1, "{id} zone");
    }
    // The rollout in flight, with each simulated node's progress bar.
    let rollout = format!("data-digest=\"sha256:{}\"", "ab".repeat(32));
    assert_eq!(tags_with(&dom, &["class=\"rollout\"", &rollout]).len(), 1, "rollout missing:\n{dom}");
    for (id, percent) in fake_ids.iter().zip(["100", "50", "25"]) {
        let bars = tags_with(&dom, &["class=\"progress", &format!("data-peer-id=\"{id}\"")]);
        assert_eq!(bars.len(), 1, "progress of {id}:\n{dom}");
        assert!(bars[0].contains(&format!("data-percent=\"{percent}\"")), "{id}: {}", bars[0]);
        assert!(bars[0].contains("data-total=\"16\""), "{}", bars[0]);
    }
    assert!(dom.contains("class=\"progress-bar\""), "no progress bars drawn");
    // The real agents' downloads show up as (finished) rollouts with their progress too.
    for id in &agent_ids {
        assert!(
            !tags_with(&dom, &["class=\"progress", &format!("data-peer-id=\"{id}\"")]).is_empty(),
            "agent {id} has no progress bar:\n{dom}"
        );
    }
    assert!(tags_with(&dom, &["path id=\"line-origin\"", "d=\"M"]).len() == 1, "origin line not drawn");
    assert!(tags_with(&dom, &["path id=\"line-peer\"", "d=\"M"]).len() == 1, "peer line not drawn");
    let savings = dom.split("id=\"savings\">").nth(1).and_then(|s| s.split('<').next()).unwrap_or("");
    assert!(savings.ends_with('%'), "savings shown as {savings:?}");

    // The screenshot, kept as a test artifact.
    let artifacts = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| workspace_dir().join("target"))
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("tracker-dashboard.png");
    let _ = std::fs::remove_file(&png);
    chromium(&[
        "--virtual-time-budget=5000".to_string(),
        "--window-size=1280,900".to_string(),
        format!("--screenshot={}", png.display()),
        url,
    ])
    .await;
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(bytes.len() > 20_000, "a {}-byte screenshot is too small to show anything", bytes.len());

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), keeper).await;
}
