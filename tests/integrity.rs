//! A disk that lies is caught, and a full disk is survived: agent processes on loopback, a
//! real `docker-registry` origin, blobs damaged or space taken away by the test.

use std::time::Duration;

use shoal_tests::pull::{get_blob, pull};
use shoal_tests::util::{bytes_under, flip_bit};
use shoal_tests::{digest_of, http_client, poll_until, Agent, AgentOptions, ImageKind, ImageSpec, Origin};

/// Starts agent A, and B bootstrapped from A.
async fn pair(origin: &Origin) -> (Agent, Agent) {
    let opts = || AgentOptions::new().upstream(&origin.host(), &origin.url());
    let a = Agent::start(opts()).await.expect("start A");
    let seed = a.p2p_addr().await.expect("A's address");
    let b = Agent::start(opts().arg("--bootstrap").arg(&seed)).await.expect("start B");
    poll_until("B connected to A", Duration::from_secs(20), Duration::from_millis(100), || async {
        Ok((b.metric("shoal_connected_peers", &[]).await >= 1.0).then_some(()))
    })
    .await
    .unwrap();
    (a, b)
}

/// A byte flipped in A's cached blob: B (A's peer) never receives a bad piece, A quarantines
/// the blob, and A's own client gets the right bytes within two requests while the origin is
/// up (the blob is downloaded again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_byte_is_never_served() {
    let origin = Origin::start().await.unwrap();
    // Two layers: one damaged and asked for by the peer, one damaged and asked for by A's client.
    let image = origin
        .push(
            &ImageSpec::new(ImageKind::OciManifest, "integrity/flip", "v1").layers(&[6 << 20, (5 << 20) + 3]),
        )
        .await
        .unwrap();
    let (a, b) = pair(&origin).await;
    pull(&a, &origin, &image).await.expect("pull on A");
    let layers: Vec<_> = image.layers().collect();
    let (for_peer, for_client) = (layers[0], layers[1]);
    // In the last piece, so A has sent good pieces before it meets the damage.
    flip_bit(&a.cached_blob_path(&for_peer.digest), (5 << 20) + 12345);
    flip_bit(&a.cached_blob_path(&for_client.digest), (2 << 20) + 7);

    // The peer: B's client asks B for the layer with the origin up. A sends good pieces and
    // refuses the damaged one; B takes what A no longer has from the origin. B rejects
    // nothing and bans nobody.
    let t = std::time::Instant::now();
    assert!(get_blob(&b, &origin, &image, &for_peer.digest).await.unwrap(), "B's client got the right bytes");
    // A holder that lost the blob is no origin owner to wait for (30 s owner stall). The
    // digest's planner still counts A, which reported the blob complete moments ago, as a
    // holder until it is silent for NODE_DEAD (10 s): only then is the piece assigned to B.
    // (A lost-blob report to the planner would cut this wait; not built yet.)
    assert!(t.elapsed() < Duration::from_secs(16), "B's GET took {:?}:\n{}", t.elapsed(), b.log_tail());
    assert_eq!(b.metric("shoal_pieces_rejected_total", &[]).await, 0.0, "B received a bad piece");
    assert_eq!(b.metric("shoal_peer_bans_total", &[]).await, 0.0, "B banned A");
    eprintln!(
        "B received {} bytes from A and {} from the origin",
        b.metric("shoal_received_bytes_total", &[("source", "peer")]).await,
        b.metric("shoal_received_bytes_total", &[("source", "origin")]).await
    );
    let stored = std::fs::read(b.cached_blob_path(&for_peer.digest)).expect("B stored the layer");
    assert_eq!(digest_of(&stored), for_peer.digest);
    assert_eq!(a.metric("shoal_corrupt_blobs_total", &[]).await, 1.0, "A quarantined the damaged blob");
    assert!(a.log().contains("quarantined"), "A's log says so:\n{}", a.log_tail());

    // A's own client: the first request is cut at the damaged piece, the second one is whole.
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
    // A downloaded it again and holds the right bytes now; both damaged copies are gone.
    let refetched = std::fs::read(a.cached_blob_path(&for_client.digest)).expect("A stored it again");
    assert_eq!(digest_of(&refetched), for_client.digest);
    // Damage in the very first piece is caught before the response starts: one request.
    flip_bit(&a.cached_blob_path(&for_client.digest), 100);
    assert!(
        get_blob(&a, &origin, &image, &for_client.digest).await.unwrap(),
        "a damaged first piece is downloaded again within the same request"
    );
    assert_eq!(a.metric("shoal_corrupt_blobs_total", &[]).await, 3.0);
    // And serves it again, from the cache, verified.
    assert!(get_blob(&a, &origin, &image, &for_client.digest).await.unwrap());
}

/// A tmpfs of `size` mounted by the test (needs root), unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> SmallFs {
        let dir = tempfile::Builder::new().prefix("shoal-smallfs-").tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "shoal-smallfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    fn remount(&self, mode: &str) {
        let out = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{mode}")])
            .arg(self.path())
            .output()
            .expect("run mount");
        assert!(out.status.success(), "remount {mode}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The cache on a 16 MiB filesystem holding a 2 MiB blob: a 24 MiB blob fails at once with a
/// clear error and leaves nothing behind; the 2 MiB blob is still served; a 4 MiB blob is
/// fetched; a 10 MiB blob that fits only without the least recently used blob evicts it; a
/// read-only cache directory is reported on /readyz, and the agent keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_cleanly_and_what_fits_is_fetched() {
    let fs = SmallFs::mount("16m");
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "integrity/full", "v1").layers(&[
            2 << 20,
            24 << 20,
            4 << 20,
            10 << 20,
        ]))
        .await
        .unwrap();
    let layers: Vec<_> = image.layers().map(|b| b.digest.clone()).collect();
    let (small, huge, fits, needs_room) = (&layers[0], &layers[1], &layers[2], &layers[3]);
    let cache = fs.path().join("cache");
    let mut a = Agent::start(AgentOptions::new().upstream(&origin.host(), &origin.url()).cache_dir(&cache))
        .await
        .unwrap();
    assert!(get_blob(&a, &origin, &image, small).await.unwrap(), "the 2 MiB blob");

    let err = get_blob(&a, &origin, &image, huge).await.expect_err("a 24 MiB blob cannot fit in 16 MiB");
    assert!(err.contains("507"), "a clear status (507 Insufficient Storage), not a cut 200: {err}");
    assert!(a.log().contains("no space for"), "the log says why:\n{}", a.log_tail());
    let tmp = bytes_under(&cache.join("tmp"));
    assert_eq!(tmp, 0, "the failed download left {tmp} bytes in tmp/");
    assert!(a.cached_blob_path(small).exists(), "the 2 MiB blob was not evicted for a blob that cannot fit");

    let served = a.metric("shoal_served_bytes_total", &[("source", "cache")]).await;
    assert!(get_blob(&a, &origin, &image, small).await.unwrap(), "the cached blob is still served");
    assert!(a.metric("shoal_served_bytes_total", &[("source", "cache")]).await >= served + (2 << 20) as f64);
    assert!(get_blob(&a, &origin, &image, fits).await.unwrap(), "the 4 MiB blob fits and is fetched");

    // 10 MiB with 2 + 4 MiB stored: fits once the least recently used blob (2 MiB) is gone.
    assert!(get_blob(&a, &origin, &image, needs_room).await.unwrap(), "eviction made room for 10 MiB");
    assert!(a.metric("shoal_cache_evictions_total", &[]).await >= 1.0);
    assert!(!a.cached_blob_path(small).exists() && a.cached_blob_path(fits).exists());

    // Read-only at run time: reported on /readyz (and the log), not a crash; back when writable.
    let readyz = format!("{}/readyz", a.metrics_url());
    let status = |url: String| async move {
        let r = http_client().get(&url).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(status(readyz.clone()).await.0, 200);
    fs.remount("ro");
    let why = poll_until(
        "/readyz to report the cache",
        Duration::from_secs(15),
        Duration::from_millis(200),
        || {
            let s = status(readyz.clone());
            async move {
                let (code, body) = s.await;
                Ok((code == 503).then_some(body))
            }
        },
    )
    .await;
    fs.remount("rw");
    let why = why.unwrap();
    assert!(why.contains("cache directory"), "/readyz: {why}");
    assert!(a.log().contains("cache directory unusable"), "{}", a.log_tail());
    assert!(get_blob(&a, &origin, &image, fits).await.unwrap(), "still serving");
    poll_until("/readyz back to 200", Duration::from_secs(15), Duration::from_millis(200), || {
        let s = status(readyz.clone());
        async move { Ok((s.await.0 == 200).then_some(())) }
    })
    .await
    .unwrap();
    assert!(a.is_running(), "the agent exited:\n{}", a.log_tail());
    a.kill();
}
