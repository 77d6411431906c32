//! Agents share verified pieces over the libp2p swarm: several agent processes on loopback,
//! a real `docker-registry` origin, images made by the test. Origin egress is read from the
//! origin's access log, never from the agents' own counters.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use shoal_tests::pull::{content_gets, pull, url};
use shoal_tests::{
    dead_url, digest_of, http_client, poll_until, start_swarm, wait_for_peers, write_hosts_toml,
    AccessLogExt, Agent, AgentOptions, Containerd, FaultyProxy, Image, ImageKind, ImageSpec, Origin,
    ProxyConfig, MANIFEST_ACCEPT,
};

/// Starts `n` agents mirroring `origin`, agent `i` with the extra arguments `extra(i)`; the
/// first is the others' bootstrap peer.
async fn cluster(origin: &Origin, n: usize, extra: impl Fn(usize) -> Vec<String>) -> Vec<Agent> {
    start_swarm(n, |i| {
        extra(i).iter().fold(AgentOptions::new().upstream(&origin.host(), &origin.url()), |o, a| o.arg(a))
    })
    .await
}

/// Every blob of `image` is complete in `agent`'s cache, with the origin's bytes.
fn assert_cache_holds_image(agent: &Agent, image: &Image) {
    for blob in &image.blobs {
        let stored = agent.cache_dir().join("blobs/sha256").join(blob.digest.trim_start_matches("sha256:"));
        let data = std::fs::read(&stored).expect("blob in the cache");
        assert_eq!(digest_of(&data), blob.digest);
    }
}

/// 1. Pull on A, then on B: B's bytes come from A; the origin sees only B's tag HEAD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_node_pulls_from_the_first() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciIndex, "swarm/two", "v1").layers(&[3 << 20, 700_001]))
        .await
        .unwrap();
    let agents = cluster(&origin, 2, |_| vec![]).await;
    pull(&agents[0], &origin, &image).await.expect("pull on A");
    let mark = origin.access_log().len();
    pull(&agents[1], &origin, &image).await.expect("pull on B");
    let gets = content_gets(&origin, mark);
    assert!(gets.is_empty(), "B's pull reached the origin for content: {gets:#?}");
    let from_peers = agents[1].metric("shoal_received_bytes_total", &[("source", "peer")]).await;
    assert!(from_peers >= image.total_blob_bytes() as f64, "B received {from_peers} bytes from peers");
    assert!(agents[0].metric("shoal_peer_sent_bytes_total", &[]).await >= image.total_blob_bytes() as f64);
}

/// 2. Ten agents pull a 256 MiB image at the same moment: the origin sends about one copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_agents_at_once_cost_the_origin_one_copy() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "swarm/ten", "v1").layers(&[64 << 20; 4]))
        .await
        .unwrap();
    let agents = cluster(&origin, 10, |_| vec![]).await;
    // Let the DHT settle: every agent knows at least one peer.
    wait_for_peers(&agents).await;
    let mark = origin.access_log().len();
    let started = Instant::now();
    let results = join_all(agents.iter().map(|a| pull(a, &origin, &image))).await;
    let took = started.elapsed();
    for (i, r) in results.iter().enumerate() {
        r.as_ref().unwrap_or_else(|e| panic!("agent {i}: {e}"));
    }
    for (i, a) in agents.iter().enumerate() {
        eprintln!(
            "agent {i}: origin pieces {}, peer bytes {}, peers {}",
            a.metric("shoal_origin_pieces_total", &[]).await,
            a.metric("shoal_received_bytes_total", &[("source", "peer")]).await,
            a.metric("shoal_connected_peers", &[]).await
        );
        for line in a.log().lines().filter(|l| l.contains("all pieces verified")) {
            eprintln!("  {line}");
        }
    }
    let log = origin.access_log_since(mark);
    let origin_bytes = log.blob_get_bytes() as f64;
    let image_bytes = image.total_blob_bytes() as f64;
    eprintln!(
        "ten agents: {:.1} MiB image, origin sent {:.1} MiB ({:.3}x) in {:.1} s",
        image_bytes / 1048576.0,
        origin_bytes / 1048576.0,
        origin_bytes / image_bytes,
        took.as_secs_f64()
    );
    assert!(
        origin_bytes <= 1.10 * image_bytes,
        "origin sent {origin_bytes} bytes for a {image_bytes}-byte image"
    );
    assert!(log.manifest_gets() <= 2, "manifest GETs: {}", log.manifest_gets());
}

/// 3. A peer that corrupts what it sends is caught, banned, and nothing corrupt is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupting_peer_is_banned_and_others_complete() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "swarm/liar", "v1").layers(&[6 << 20]))
        .await
        .unwrap();
    // Agent 0 corrupts every piece it uploads (its attestations stay honest).
    let agents =
        cluster(&origin, 3, |i| if i == 0 { vec!["--fault-corrupt-uploads".into()] } else { vec![] }).await;
    pull(&agents[0], &origin, &image).await.expect("pull on the corrupting agent");
    let results = join_all(agents[1..].iter().map(|a| pull(a, &origin, &image))).await;
    for r in results {
        r.expect("honest agents complete with correct data");
    }
    let mut rejected = 0.0;
    let mut bans = 0.0;
    for a in &agents[1..] {
        rejected += a.metric("shoal_pieces_rejected_total", &[]).await;
        bans += a.metric("shoal_peer_bans_total", &[]).await;
    }
    assert!(rejected >= 1.0 && bans >= 1.0, "rejected {rejected}, bans {bans}");
    // Everything the honest agents stored is what the origin has.
    for a in &agents[1..] {
        assert_cache_holds_image(a, &image);
    }
}

/// A peer that lies about a blob's size (a consistent `Have` answer for a blob 1 MiB longer)
/// cannot make another node fetch the wrong length: providers that disagree are settled by a
/// HEAD at the origin, the liar is banned, and the pull completes from the honest peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_lying_about_size_is_settled_by_the_origin_and_banned() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "swarm/size", "v1").layers(&[3 << 20, 200_000]))
        .await
        .unwrap();
    // Agent 0 is honest, agent 1 lies about every size, agent 2 pulls last.
    let agents =
        cluster(&origin, 3, |i| if i == 1 { vec!["--fault-lie-about-size".into()] } else { vec![] }).await;
    pull(&agents[0], &origin, &image).await.expect("pull on the honest agent");
    // The liar learns the true sizes from agent 0 (its own answers are the only lie).
    pull(&agents[1], &origin, &image).await.expect("pull on the lying agent");
    let mark = origin.access_log().len();
    pull(&agents[2], &origin, &image).await.expect("the third agent completes with correct data");
    let gets = content_gets(&origin, mark);
    assert!(gets.is_empty(), "the dispute cost the origin content GETs: {gets:#?}");
    let bans = agents[2].metric("shoal_peer_bans_total", &[]).await;
    assert!(bans >= 1.0, "the liar was not banned (bans {bans})");
    assert_eq!(agents[0].metric("shoal_peer_bans_total", &[]).await, 0.0);
    assert_cache_holds_image(&agents[2], &image);
}

/// The only holder lies about a blob that is a whole number of pieces long (claims one
/// piece more): every real piece checks out, so the lie shows only when the origin cannot
/// supply the extra piece. That attempt fails; the origin then contradicts the size, the liar
/// is banned, and the client's retry completes from the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lone_peer_lying_about_size_is_found_out_when_the_pull_fails() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "swarm/lone-liar", "v1").layers(&[2 << 20]))
        .await
        .unwrap();
    let agents =
        cluster(&origin, 2, |i| if i == 0 { vec!["--fault-lie-about-size".into()] } else { vec![] }).await;
    pull(&agents[0], &origin, &image).await.expect("pull on the lying agent");
    let layer = image.largest_layer();
    let blob_url = url(&agents[1], &origin, &image.repo, "blobs", &layer.digest);
    let client = http_client();
    let mut attempts = Vec::new();
    let mut body = None;
    for _ in 0..4 {
        let result = async {
            let resp = client.get(&blob_url).send().await.map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("status {}", resp.status()));
            }
            resp.bytes().await.map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(bytes) => {
                body = Some(bytes);
                break;
            }
            Err(e) => attempts.push(e),
        }
    }
    let body = body.unwrap_or_else(|| panic!("no attempt completed: {attempts:?}"));
    assert_eq!(digest_of(&body), layer.digest);
    let bans = agents[1].metric("shoal_peer_bans_total", &[]).await;
    assert!(bans >= 1.0, "the liar was not banned (bans {bans}; failed attempts {attempts:?})");
}

/// 4. The only peer holding an image dies mid-transfer: every other node completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_killed_mid_transfer_costs_only_a_retry() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "swarm/dies", "v1").layers(&[24 << 20]))
        .await
        .unwrap();
    // Agent 0 uploads slowly, so the others are mid-transfer when it dies.
    let mut agents =
        cluster(
            &origin,
            3,
            |i| if i == 0 { vec!["--max-upload-rate".into(), "8MiB/s".into()] } else { vec![] },
        )
        .await;
    pull(&agents[0], &origin, &image).await.expect("pull on agent 0");
    let layer = image.largest_layer().clone();
    let before = origin.access_log().blob_get_bytes_for(&layer.digest);
    let (first, rest) = agents.split_at_mut(1);
    let pulls = join_all(rest.iter().map(|a| pull(a, &origin, &image)));
    let killer = async {
        poll_until(
            "a peer transfer under way",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || async {
                Ok((first[0].metric("shoal_peer_sent_bytes_total", &[]).await >= (2 << 20) as f64)
                    .then_some(()))
            },
        )
        .await
        .unwrap();
        first[0].kill();
    };
    let (results, ()) = tokio::join!(pulls, killer);
    for r in results {
        r.expect("no client sees an error");
    }
    // What agent 0 had not sent yet comes from the origin, each piece about once (the two
    // survivors share it), never the whole blob again for each of them (2x the layer).
    let after = origin.access_log().blob_get_bytes_for(&layer.digest) - before;
    eprintln!("origin bytes for the {}-byte layer after the kill: {after}", layer.size);
    assert!(
        after < layer.size + layer.size / 2,
        "the origin sent {after} bytes for a {}-byte layer after the peer died: the survivors did not share",
        layer.size
    );
}

/// 5. An agent restarted mid-download resumes from its verified pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_verified_pieces() {
    let origin = Origin::start().await.unwrap();
    let size: u64 = 32 << 20;
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "swarm/resume", "v1").layers(&[size]))
        .await
        .unwrap();
    let slow = ProxyConfig { total_bytes_per_sec: Some(8 << 20), ..Default::default() };
    let proxy = FaultyProxy::in_front_of(&origin, slow).await.unwrap();
    let mut agent = Agent::start(AgentOptions::new().upstream(&origin.host(), &proxy.url())).await.unwrap();
    let layer = image.largest_layer().clone();
    let blob_url = url(&agent, &origin, &image.repo, "blobs", &layer.digest);
    let client = http_client();
    let request = tokio::spawn({
        let (client, blob_url) = (client.clone(), blob_url.clone());
        async move { client.get(&blob_url).send().await.map(|r| r.status()) }
    });
    poll_until("half the pieces verified", Duration::from_secs(30), Duration::from_millis(50), || async {
        Ok((agent.metric("shoal_pieces_verified_total", &[]).await >= 17.0).then_some(()))
    })
    .await
    .unwrap();
    agent.kill();
    let _ = request.await;
    agent.restart().await.unwrap();
    let resp = client.get(&blob_url).timeout(Duration::from_secs(60)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert_eq!(digest_of(&body), layer.digest);
    let resumed = agent.metric("shoal_pieces_resumed_total", &[]).await;
    assert!(resumed >= 8.0, "resumed {resumed} pieces");
    let sent = origin.access_log().blob_get_bytes_for(&layer.digest);
    assert!(sent < size + size / 2, "the origin sent {sent} bytes for a {size}-byte blob: no resume");
}

/// 6. A process with another swarm key cannot connect or fetch pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_swarm_key_cannot_join() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "swarm/keys", "v1").layers(&[2 << 20]))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let key = |name: &str, byte: u8| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", hex::encode([byte; 32])))
            .unwrap();
        path.display().to_string()
    };
    let (k1, k2) = (key("k1", 1), key("k2", 2));
    let a =
        Agent::start(AgentOptions::new().upstream(&origin.host(), &origin.url()).arg("--swarm-key").arg(&k1))
            .await
            .unwrap();
    let seed = a.p2p_addr().await.unwrap();
    pull(&a, &origin, &image).await.unwrap();
    let start = |k: &str| {
        AgentOptions::new()
            .upstream(&origin.host(), &origin.url())
            .arg("--swarm-key")
            .arg(k)
            .arg("--bootstrap")
            .arg(&seed)
    };
    let outsider = Agent::start(start(&k2)).await.unwrap();
    let insider = Agent::start(start(&k1)).await.unwrap();
    pull(&outsider, &origin, &image).await.expect("the outsider still pulls, from the origin");
    pull(&insider, &origin, &image).await.unwrap();
    assert_eq!(outsider.metric("shoal_received_bytes_total", &[("source", "peer")]).await, 0.0);
    assert_eq!(outsider.metric("shoal_connected_peers", &[]).await, 0.0);
    assert!(insider.metric("shoal_received_bytes_total", &[("source", "peer")]).await > 0.0);
}

/// 7. containerd through agent B gets an image only agent A had, with the origin stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_from_a_peer_while_the_origin_is_down() {
    let mut origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::DockerList, "swarm/offline", "v1").layers(&[1 << 20]))
        .await
        .unwrap();
    let agents = cluster(&origin, 2, |_| vec![]).await;
    pull(&agents[0], &origin, &image).await.expect("pull on A");
    // B must have seen the image public at the origin (one anonymous tag check, no content):
    // with the origin down, content never shown public is refused, as it may be private.
    let tag = url(&agents[1], &origin, &image.repo, "manifests", &image.tag);
    let resp = http_client().head(&tag).header("accept", MANIFEST_ACCEPT).send().await.unwrap();
    assert_eq!(resp.status(), 200, "B's tag check");
    origin.stop();
    let ctd = Containerd::start().await.unwrap();
    let hosts = ctd.scratch_dir("hosts").unwrap();
    write_hosts_toml(&hosts, &origin.host(), Some(&agents[1].url()), &dead_url()).unwrap();
    ctd.fetch(&image.digest_reference(), &hosts, &[]).await.expect("ctr content fetch through B");
    ctd.verify_image(&image).await.expect("fetched content");
    assert!(agents[1].metric("shoal_received_bytes_total", &[("source", "peer")]).await > 0.0);
}
