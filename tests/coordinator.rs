//! One planner without a tracker: each digest's coordinator is the agent XOR-closest to its
//! DHT key, and it plans that digest's origin fetches with the tracker's own planner. Real
//! agent processes on loopback, a real `docker-registry` origin (slowed by a proxy so a pull
//! lasts long enough to interfere with); origin egress from the origin's access log.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use shoal_tests::pull::{pull, url};
use shoal_tests::{
    http_client, poll_until, start_swarm, wait_for_peers, AccessLogExt, Agent, AgentOptions, FaultyProxy,
    ImageKind, ImageSpec, Origin, ProxyConfig,
};

/// Starts `n` agents reaching the origin at `origin_url`; the first is the others'
/// bootstrap peer. Returns once every agent knows a peer.
async fn cluster(origin: &Origin, origin_url: &str, n: usize) -> Vec<Agent> {
    let agents = start_swarm(n, |_| AgentOptions::new().upstream(&origin.host(), origin_url)).await;
    wait_for_peers(&agents).await;
    agents
}

/// Plan requests `agent` answered for peers as a coordinator.
async fn remote_plans(agent: &Agent) -> f64 {
    agent.metric("shoal_coordinator_plans_total", &[("outcome", "remote")]).await
}

/// 1. Without a tracker, agents ask the digest's coordinator for plans: some agent answers
/// its peers' plan requests, the downloads follow its assignments, and the origin sends each
/// blob byte about once. No agent looks up anything but providers and coordinators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloads_follow_the_coordinators_plans() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "coord/plans", "v1").layers(&[24 << 20, 8 << 20]))
        .await
        .unwrap();
    let config = ProxyConfig { total_bytes_per_sec: Some(8 << 20), ..ProxyConfig::default() };
    let proxy = FaultyProxy::in_front_of(&origin, config).await.unwrap();
    let agents = cluster(&origin, &proxy.url(), 6).await;
    let mark = origin.access_log().len();
    let started = Instant::now();
    let results = join_all(agents.iter().map(|a| pull(a, &origin, &image))).await;
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "agent {i}: {r:?}\n{}", agents[i].log_tail());
    }
    let log = origin.access_log_since(mark);
    let ratio = log.blob_get_bytes() as f64 / image.total_blob_bytes() as f64;
    let mut answered = 0.0;
    let mut planned = 0.0;
    for a in &agents {
        answered += remote_plans(a).await;
        planned += a.metric("shoal_plan_requests_total", &[("outcome", "answered")]).await;
    }
    eprintln!(
        "6 agents, no tracker: origin sent {ratio:.3}x the blob bytes in {:.1} s; {planned} plans answered, \
         {answered} of them by a peer coordinator",
        started.elapsed().as_secs_f64()
    );
    assert!(answered > 0.0, "no agent answered a peer's plan request");
    assert!(planned >= answered, "{planned} plans answered, {answered} by peers");
    assert!(ratio <= 1.02, "origin sent {ratio:.3}x the image's blob bytes");
}

/// The index of the agent that coordinates `digest` (`sha256:<hex>`).
async fn coordinator_of(agents: &[Agent], digest: &str) -> usize {
    let mut ids = Vec::new();
    for a in agents {
        ids.push(a.peer_id().await.unwrap().parse().unwrap());
    }
    shoal_tests::util::coordinator_index(&ids, digest).expect("a coordinator among the agents")
}

/// 2. The coordinator of the image's layer is SIGKILLed mid-pull: every other agent asks
/// the next closest, which rebuilds the plan from their requests (each says what it holds
/// and what it is fetching), and every other agent completes with about one copy from the
/// origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_coordinator_is_replaced_and_the_others_complete() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "coord/killed", "v1").layers(&[32 << 20]))
        .await
        .unwrap();
    let config = ProxyConfig { total_bytes_per_sec: Some(4 << 20), ..ProxyConfig::default() };
    let proxy = FaultyProxy::in_front_of(&origin, config).await.unwrap();
    let mut agents = cluster(&origin, &proxy.url(), 6).await;
    let layer = image.largest_layer().digest.clone();
    let mut victim = agents.remove(coordinator_of(&agents, &layer).await);
    let mark = origin.access_log().len();

    // The coordinator downloads the layer too; its request dies with it.
    let victim_url = url(&victim, &origin, &image.repo, "blobs", &layer);
    let victim_pull = tokio::spawn(async move {
        if let Ok(resp) = http_client().get(&victim_url).send().await {
            let _ = resp.bytes().await;
        }
    });
    let kill = async {
        poll_until(
            "the coordinator plans for its peers",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async { Ok((remote_plans(&victim).await >= 20.0).then_some(())) },
        )
        .await
        .expect("the layer's coordinator answered 20 plan requests");
        victim.kill();
        let mut before = 0.0;
        for a in &agents {
            before += remote_plans(a).await;
        }
        (Instant::now(), before)
    };
    let (results, (killed_at, before)) =
        tokio::join!(join_all(agents.iter().map(|a| pull(a, &origin, &image))), kill);
    victim_pull.abort();
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "agent {i} failed after the coordinator died: {r:?}\n{}", agents[i].log_tail());
    }
    let log = origin.access_log_since(mark);
    let ratio = log.blob_get_bytes() as f64 / image.total_blob_bytes() as f64;
    let mut took_over = -before;
    for a in &agents {
        took_over += remote_plans(a).await;
    }
    eprintln!(
        "coordinator killed: the others completed {:.1} s later, origin sent {ratio:.3}x the blob bytes; \
         {took_over} plans answered by the others since",
        killed_at.elapsed().as_secs_f64()
    );
    assert!(took_over > 0.0, "no other agent answered plan requests after the coordinator died");
    // What the origin had sent the coordinator for its own origin pieces in flight died with
    // it: at most a batch of them (the planner's per-node cap), sent again to others. That
    // waste is the node's death, not the handover, which gets issue 25's 5 %.
    let piece = u64::from(shoal_protocol::pieces::piece_size_for(image.total_blob_bytes()));
    let died_in_flight = (shoal_plan::state::BATCH as u64 * piece) as f64 / image.total_blob_bytes() as f64;
    let bound = 1.05 + died_in_flight;
    assert!(ratio <= bound, "origin sent {ratio:.3}x the image's blob bytes (bound {bound:.3})");
}
