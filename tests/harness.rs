//! Smoke tests of the harness itself: origin, image push, containerd, skopeo, proxy.
//! None of them needs the agent.

use std::time::{Duration, Instant};

use shoal_tests::containerd::write_hosts_toml;
use shoal_tests::skopeo::{copy_to_dir, read_dir_image, write_registries_conf};
use shoal_tests::util::{digest_hex, files_identical};
use shoal_tests::{
    dead_url, digest_of, http_client, AccessLogExt, Containerd, FaultyProxy, Image, ImageKind, ImageSpec,
    Origin, ProxyConfig,
};

/// Every image kind pushes with its exact manifest bytes, and containerd fetches it from
/// the origin through a hosts.toml `[host."http://..."]` entry (plain HTTP) with the
/// `server` dead, byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_all_kinds_and_fetch_with_containerd() {
    let origin = Origin::start().await.unwrap();
    let ctd = Containerd::start().await.unwrap();
    let hosts = ctd.scratch_dir("hosts").unwrap();
    write_hosts_toml(&hosts, &origin.host(), Some(&origin.url()), &dead_url()).unwrap();

    for (i, kind) in ImageKind::ALL.into_iter().enumerate() {
        let spec = ImageSpec::new(kind, &format!("smoke/kind{i}"), "v1");
        let image = origin.push(&spec).await.unwrap();
        assert_eq!(image.reference(), format!("{}/smoke/kind{i}:v1", origin.host()));
        assert_eq!(image.manifest.media_type, kind.top_media_type());
        assert_eq!(image.children.len(), if kind.is_list() { 2 } else { 0 });
        assert_eq!(image.blobs.len(), if kind.is_list() { 6 } else { 3 });

        // The registry serves our exact bytes under the tag.
        let resp = http_client()
            .get(format!("{}/v2/smoke/kind{i}/manifests/v1", origin.url()))
            .header("Accept", kind.top_media_type())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"].to_str().unwrap(), kind.top_media_type());
        assert_eq!(resp.bytes().await.unwrap().as_ref(), image.manifest.bytes.as_slice());

        let mark = origin.access_log().len();
        let out = ctd.fetch(&image.reference(), &hosts, &[]).await.unwrap();
        assert!(out.success());
        ctd.verify_image(&image).await.unwrap();

        let log = origin.access_log_since(mark);
        assert_eq!(log.blob_gets(), image.blobs.len(), "{log:#?}");
        assert_eq!(log.blob_get_bytes(), image.total_blob_bytes());
        assert_eq!(log.manifest_heads(), 1, "{log:#?}");
        assert_eq!(log.manifest_gets(), image.manifests().count(), "{log:#?}");
        for e in &log {
            assert!(e.user_agent.starts_with("containerd/"), "{e:?}");
        }
    }
}

/// stop() makes the origin unreachable, restart() brings it back with the same content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_stop_and_restart_keep_storage() {
    let mut origin = Origin::start().await.unwrap();
    let image = origin.push(&ImageSpec::new(ImageKind::OciManifest, "smoke/restart", "v1")).await.unwrap();
    let layer = image.largest_layer().clone();
    let url = format!("{}/v2/smoke/restart/blobs/{}", origin.url(), layer.digest);
    let client = http_client();

    origin.stop();
    let err = client.get(&url).send().await;
    assert!(err.is_err(), "origin still answers after stop: {err:?}");

    origin.restart().await.unwrap();
    let body = client.get(&url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(digest_of(&body), layer.digest);
    assert_eq!(origin.blob_gets(), 1);
}

/// Layers of tens of MiB build and push quickly (random data streamed to disk).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn larger_image_builds_and_pushes_fast() {
    let origin = Origin::start().await.unwrap();
    let start = Instant::now();
    let spec = ImageSpec::new(ImageKind::DockerManifest, "smoke/big", "v1").layers(&[48 << 20, 16 << 20]);
    let built = Image::build(&spec).unwrap();
    let build_time = start.elapsed();
    drop(built);
    let image = origin.push(&spec).await.unwrap();
    let total = start.elapsed();
    eprintln!("64 MiB image: build {build_time:?}, build twice + push {total:?}");
    assert_eq!(image.total_blob_bytes(), (64 << 20) + image.blobs[0].size);
    assert!(total < Duration::from_secs(60), "too slow: {total:?}");
}

/// skopeo reads our registries.conf via --registries-conf: it tries the (dead) mirror,
/// then falls back to the primary location and copies every blob unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_registries_conf_fallback_to_primary() {
    let origin = Origin::start().await.unwrap();
    let image = origin.push(&ImageSpec::new(ImageKind::OciIndex, "smoke/skopeo", "v1")).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("registries.conf");
    let dead = dead_url();
    let dead_host = dead.trim_start_matches("http://");
    write_registries_conf(
        &conf,
        "origin.shoal.test",
        &origin.host(),
        &format!("{dead_host}/origin.shoal.test"),
    )
    .unwrap();
    let dest = tmp.path().join("out");
    let out = copy_to_dir(&conf, "origin.shoal.test/smoke/skopeo:v1", &dest).await.unwrap();
    assert!(out.success(), "{out}");
    assert!(
        out.stderr.contains(&format!("{dead_host}/origin.shoal.test/smoke/skopeo")),
        "skopeo did not try the mirror first:\n{out}"
    );
    let copied = read_dir_image(&dest).unwrap();
    assert_eq!(copied.manifest, image.manifest.bytes);
    for child in &image.children {
        let p = &copied.files[&format!("{}.manifest.json", digest_hex(&child.digest))];
        assert_eq!(&std::fs::read(p).unwrap(), &child.bytes);
    }
    for blob in &image.blobs {
        let p = &copied.files[digest_hex(&blob.digest)];
        assert!(files_identical(p, &blob.path).unwrap(), "{}", blob.digest);
    }
}

/// The proxy paces matching responses and flips exactly the configured body byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_throttles_and_corrupts() {
    let origin = Origin::start().await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "smoke/proxy", "v1").layers(&[2 << 20]))
        .await
        .unwrap();
    let layer = image.largest_layer().clone();
    let original = layer.read().unwrap();
    let proxy = FaultyProxy::in_front_of(
        &origin,
        ProxyConfig {
            bytes_per_sec: Some(2 << 20),
            path_contains: Some("/blobs/".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let client = http_client();
    let blob_url = format!("{}/v2/smoke/proxy/blobs/{}", proxy.url(), layer.digest);

    // Manifests are not throttled.
    let start = Instant::now();
    let resp = client
        .head(format!("{}/v2/smoke/proxy/manifests/v1", proxy.url()))
        .header("Accept", ImageKind::OciManifest.top_media_type())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(start.elapsed() < Duration::from_millis(500));

    let start = Instant::now();
    let body = client.get(&blob_url).send().await.unwrap().bytes().await.unwrap();
    let took = start.elapsed();
    assert_eq!(body.as_ref(), original.as_slice());
    assert!(took >= Duration::from_millis(800), "not throttled: {took:?}");
    assert!(took < Duration::from_secs(5), "too slow: {took:?}");

    proxy.set_config(ProxyConfig {
        corrupt_body_offset: Some(1_000_001),
        path_contains: Some("/blobs/".into()),
        method: Some("GET".into()),
        ..Default::default()
    });
    let body = client.get(&blob_url).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(body.len(), original.len());
    let diffs: Vec<usize> = (0..body.len()).filter(|&i| body[i] != original[i]).collect();
    assert_eq!(diffs, vec![1_000_001]);
    assert_eq!(body[1_000_001], original[1_000_001] ^ 0xff);

    let reqs = proxy.requests();
    assert_eq!(reqs.len(), 3);
    assert!(reqs[2].corrupted && !reqs[1].corrupted);
    assert_eq!(origin.access_log().blob_gets_for(&layer.digest), 2);
}
