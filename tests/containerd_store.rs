//! containerd's content store as a source, one copy on disk: agent processes on loopback
//! reading a real containerd's store (its gRPC API and content directory), a real
//! `docker-registry` origin, and a second containerd as the client.

use std::path::Path;
use std::time::Duration;

use shoal_tests::pull::{get_blob, url};
use shoal_tests::util::{bytes_under, flip_bit};
use shoal_tests::{
    dead_url, http_client, poll_until, write_hosts_toml, Agent, AgentOptions, Containerd, Image, ImageKind,
    ImageSpec, Origin,
};

fn opts(origin: &Origin) -> AgentOptions {
    AgentOptions::new().upstream(&origin.host(), &origin.url())
}

/// Starts B bootstrapped from `a` and waits until they are connected.
async fn peer_of(a: &Agent, origin: &Origin) -> Agent {
    let seed = a.p2p_addr().await.expect("A's address");
    let b = Agent::start(opts(origin).arg("--bootstrap").arg(&seed)).await.expect("start B");
    poll_until("B connected to A", Duration::from_secs(20), Duration::from_millis(100), || async {
        Ok((b.metric("shoal_connected_peers", &[]).await >= 1.0).then_some(()))
    })
    .await
    .unwrap();
    b
}

/// `ctr content fetch` of the image straight from the origin (no agent anywhere).
async fn fetch_direct(ctd: &Containerd, origin: &Origin, image: &Image) {
    let hosts = ctd.scratch_dir("direct-hosts").unwrap();
    write_hosts_toml(&hosts, &origin.host(), None, &origin.url()).unwrap();
    ctd.fetch(&image.reference(), &hosts, &[]).await.expect("containerd fetches from the origin");
}

/// Every digest of the image (manifests, config, layers).
fn all_digests(image: &Image) -> Vec<String> {
    image.manifests().map(|m| m.digest.clone()).chain(image.blobs.iter().map(|b| b.digest.clone())).collect()
}

/// `agent` sees the image's tag public at the origin (one anonymous tag check, no content):
/// with the origin down, content never shown public is refused, as it may be private.
async fn seen_public(agent: &Agent, origin: &Origin, image: &Image) {
    let tag = url(agent, origin, &image.repo, "manifests", &image.tag);
    let resp = http_client().head(&tag).header("accept", shoal_tests::MANIFEST_ACCEPT).send().await.unwrap();
    assert_eq!(resp.status(), 200, "tag check");
}

/// Waits until `agent` serves `n` blobs from containerd's store and holds `own` bytes itself.
async fn wait_for_store(agent: &Agent, n: usize, own: f64) {
    let res = poll_until(
        "the agent to serve containerd's blobs",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let ext = agent.metric("shoal_containerd_blobs", &[]).await;
            let bytes = agent.metric("shoal_cache_bytes", &[]).await;
            Ok((ext == n as f64 && bytes == own).then_some(()))
        },
    )
    .await;
    if let Err(e) = res {
        panic!(
            "{e}: containerd_blobs {} cache_bytes {}\n{}",
            agent.metric("shoal_containerd_blobs", &[]).await,
            agent.metric("shoal_cache_bytes", &[]).await,
            agent.log_tail()
        );
    }
}

/// A second, empty containerd fetches `image` by digest through `agent` only (its
/// `hosts.toml` names no reachable origin) and must end up holding the whole image.
async fn fetch_through(agent: &Agent, origin: &Origin, image: &Image) {
    let client = Containerd::start().await.unwrap();
    let hosts = client.scratch_dir("hosts").unwrap();
    write_hosts_toml(&hosts, &origin.host(), Some(&agent.url()), &dead_url()).unwrap();
    client
        .fetch(&image.digest_reference(), &hosts, &[])
        .await
        .expect("fetch through the agent with the origin stopped");
    client.verify_image(image).await.expect("the client holds the whole image");
}

/// An image containerd pulled from the origin before any agent ran: agent A, started
/// afterwards with `--containerd-address`, serves it to agent B with the origin stopped, and
/// A's cache directory holds none of its bytes; a second containerd fetches it through B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_containerd_pulled_alone_is_seeded_from_its_store() {
    let mut origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "cstore/seed", "v1").layers(&[3 << 20, (1 << 20) + 5]))
        .await
        .unwrap();
    let ctd = Containerd::start().await.unwrap();
    fetch_direct(&ctd, &origin, &image).await;

    let a = Agent::start(opts(&origin).containerd(&ctd)).await.expect("start A");
    wait_for_store(&a, all_digests(&image).len(), 0.0).await;
    assert!(a.log().contains("serving containerd's content store"), "{}", a.log_tail());
    let b = peer_of(&a, &origin).await;
    seen_public(&b, &origin, &image).await;
    origin.stop();

    fetch_through(&b, &origin, &image).await;

    assert_eq!(b.metric("shoal_pieces_rejected_total", &[]).await, 0.0);
    assert!(b.metric("shoal_received_bytes_total", &[("source", "peer")]).await >= (4 << 20) as f64);
    assert_eq!(bytes_under(&a.cache_dir().join("blobs")), 0, "A stored a copy of its own");
    assert_eq!(a.metric("shoal_cache_bytes", &[]).await, 0.0);
}

/// A pull through agent A: once containerd holds (and keeps) the blobs, A's own copies are
/// gone (its cache bytes metric drops to 0), and B still fetches the image from A with the
/// origin stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_through_the_agent_leaves_one_copy() {
    let mut origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "cstore/one", "v1").layers(&[2 << 20, (3 << 20) + 1]))
        .await
        .unwrap();
    let ctd = Containerd::start().await.unwrap();
    let a = Agent::start(opts(&origin).containerd(&ctd)).await.expect("start A");
    let b = peer_of(&a, &origin).await;
    let hosts = ctd.scratch_dir("hosts").unwrap();
    write_hosts_toml(&hosts, &origin.host(), Some(&a.url()), &dead_url()).unwrap();
    ctd.fetch(&image.reference(), &hosts, &[]).await.expect("pull through A");
    assert!(a.metric("shoal_served_bytes_total", &[("source", "origin")]).await > 0.0, "A fetched it itself");

    // One copy: containerd's. A drops its own once containerd keeps the blobs.
    let n = all_digests(&image).len();
    wait_for_store(&a, n, 0.0).await;
    for d in all_digests(&image) {
        assert!(!a.cached_blob_path(&d).exists(), "A still holds {d}");
    }
    assert!(a.log().contains("dropped the agent's copy"), "{}", a.log_tail());

    // Still served to peers, from containerd's store: a second containerd through B, with the
    // origin stopped.
    seen_public(&b, &origin, &image).await;
    origin.stop();
    fetch_through(&b, &origin, &image).await;
    assert_eq!(b.metric("shoal_pieces_rejected_total", &[]).await, 0.0);
    assert!(b.metric("shoal_received_bytes_total", &[("source", "peer")]).await >= (5 << 20) as f64);
    assert_eq!(a.metric("shoal_cache_bytes", &[]).await, 0.0);
}

/// A byte flipped in containerd's copy: B (A's peer) never receives a bad piece, A stops
/// serving containerd's copy, and A's own client gets the right bytes within two requests
/// while the origin is up (A downloads its own copy; containerd's file is left as it is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_in_containerds_copy_is_never_served() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "cstore/flip", "v1").layers(&[6 << 20, (5 << 20) + 3]))
        .await
        .unwrap();
    let ctd = Containerd::start().await.unwrap();
    fetch_direct(&ctd, &origin, &image).await;
    let a = Agent::start(opts(&origin).containerd(&ctd)).await.expect("start A");
    wait_for_store(&a, all_digests(&image).len(), 0.0).await;
    let b = peer_of(&a, &origin).await;
    let layers: Vec<_> = image.layers().collect();
    let (for_peer, for_client) = (layers[0], layers[1]);
    flip_bit(&ctd.blob_path(&for_peer.digest), (5 << 20) + 12345);
    flip_bit(&ctd.blob_path(&for_client.digest), (2 << 20) + 7);

    assert!(get_blob(&b, &origin, &image, &for_peer.digest).await.unwrap(), "B's client got the right bytes");
    assert_eq!(b.metric("shoal_pieces_rejected_total", &[]).await, 0.0, "B received a bad piece");
    assert_eq!(b.metric("shoal_peer_bans_total", &[]).await, 0.0, "B banned A");
    assert_eq!(a.metric("shoal_corrupt_blobs_total", &[]).await, 1.0, "A quarantined containerd's copy");
    assert!(a.log().contains("containerd's"), "{}", a.log_tail());

    let mut good = None;
    for attempt in 1..=2 {
        if get_blob(&a, &origin, &image, &for_client.digest).await.expect("A answers 200") {
            good = Some(attempt);
            break;
        }
    }
    let attempt = good.expect("A's client got the right bytes within two requests");
    eprintln!("A's client got the right bytes on request {attempt}");
    assert_eq!(a.metric("shoal_corrupt_blobs_total", &[]).await, 2.0);
    // A holds its own, right copy now; containerd's damaged file is containerd's business.
    let own = std::fs::read(a.cached_blob_path(&for_client.digest)).expect("A stored its own copy");
    assert_eq!(shoal_tests::digest_of(&own), for_client.digest);
    assert_ne!(shoal_tests::digest_of(&ctd.read_blob(&for_client.digest).unwrap()), for_client.digest);
    // And serves that copy from then on (containerd's is not taken back).
    assert!(get_blob(&a, &origin, &image, &for_client.digest).await.unwrap());
}

/// No containerd at the address: the agent warns and runs as a plain cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_containerd_is_a_warning_not_a_failure() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "cstore/none", "v1").layers(&[1 << 20]))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(&origin);
    o.containerd = Some((dir.path().join("absent.sock"), "k8s.io".into(), dir.path().to_path_buf()));
    let a = Agent::start(o).await.expect("the agent starts without containerd");
    let layer = image.layers().next().unwrap();
    assert!(get_blob(&a, &origin, &image, &layer.digest).await.unwrap());
    poll_until("the warning", Duration::from_secs(10), Duration::from_millis(100), || async {
        Ok(a.log().contains("containerd's content store is not used").then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", a.log_tail()));
}

/// `PullImage` on containerd's CRI socket, as kubelet sends it (no pull secret).
async fn cri_pull(socket: &Path, image: &str) -> Result<String, String> {
    use hyper_util::rt::TokioIo;
    use k8s_cri::v1::{image_service_client::ImageServiceClient, ImageSpec, PullImageRequest};
    use tonic::transport::{Endpoint, Uri};
    let path = socket.to_path_buf();
    // The URI is not used: every connection goes to the socket.
    let channel = Endpoint::try_from("http://[::]:50051")
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| e.to_string())?;
    let spec = ImageSpec { image: image.to_string(), ..Default::default() };
    let mut req =
        tonic::Request::new(PullImageRequest { image: Some(spec), auth: None, sandbox_config: None });
    req.set_timeout(Duration::from_secs(120));
    match tokio::time::timeout(Duration::from_secs(130), ImageServiceClient::new(channel).pull_image(req))
        .await
    {
        Ok(Ok(resp)) => Ok(resp.into_inner().image_ref),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err("PullImage did not answer in 130 s".to_string()),
    }
}

/// `discard_unpacked_layers = true`: the CRI plugin unpacks the layers and containerd's GC
/// removes them. The agent (which fetched them) keeps its own copy of every layer and drops
/// only the manifest and config, which containerd keeps; the node still seeds the layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarded_layers_stay_in_the_agents_cache() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(
            &ImageSpec::new(ImageKind::OciManifest, "cstore/discard", "v1")
                .layers(&[1 << 20, 2 << 20])
                .unpackable(),
        )
        .await
        .unwrap();
    let hosts_parent = tempfile::tempdir().unwrap();
    let hosts = hosts_parent.path().join("certs.d");
    std::fs::create_dir_all(&hosts).unwrap();
    let ctd = Containerd::start_cri_discarding_layers(&hosts).await.expect("start containerd with CRI");
    let a = Agent::start(opts(&origin).containerd(&ctd)).await.expect("start A");
    write_hosts_toml(&hosts, &origin.host(), Some(&a.url()), &dead_url()).unwrap();
    cri_pull(ctd.socket(), &image.reference())
        .await
        .unwrap_or_else(|e| panic!("PullImage: {e}\n--- containerd ---\n{}", ctd.log()));

    let layers: Vec<String> = image.layers().map(|l| l.digest.clone()).collect();
    let layer_bytes: u64 = image.layers().map(|l| l.size).sum();
    let kept: Vec<String> = all_digests(&image).into_iter().filter(|d| !layers.contains(d)).collect();
    let res = poll_until(
        "containerd to discard the layers and A to settle",
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            let listed = ctd.content_digests().await?;
            let discarded = layers.iter().all(|l| !listed.contains(l));
            let own = a.metric("shoal_cache_bytes", &[]).await;
            let ext = a.metric("shoal_containerd_blobs", &[]).await;
            Ok((discarded && own == layer_bytes as f64 && ext == kept.len() as f64).then_some(()))
        },
    )
    .await;
    if let Err(e) = res {
        panic!(
            "{e}: containerd lists {:?}; A: cache_bytes {} containerd_blobs {}\n{}",
            ctd.content_digests().await,
            a.metric("shoal_cache_bytes", &[]).await,
            a.metric("shoal_containerd_blobs", &[]).await,
            a.log_tail()
        );
    }
    for l in &layers {
        let stored = std::fs::read(a.cached_blob_path(l)).expect("A kept the layer");
        assert_eq!(&shoal_tests::digest_of(&stored), l);
        assert!(get_blob(&a, &origin, &image, l).await.unwrap(), "A serves {l}");
    }
    for d in &kept {
        assert!(!a.cached_blob_path(d).exists(), "A kept a second copy of {d}");
    }
    // (The log line "no image keeps it" appears only when a sync falls between the commit of a
    // layer and its removal; here containerd's GC usually wins that race, and the agent never
    // sees the layers at all.)
}
