//! Origin outage (issue 27): public images keep flowing to nodes that never saw them public.
//!
//! A real `docker-registry` origin and real agents on loopback. Agent C fetches a public blob
//! while the origin is up; then the origin is stopped, and agents D (bootstrapped from C, never
//! having asked the origin anything) are asked for it by an anonymous client:
//!
//! - D with `--public` naming the repository serves it (and its manifest by digest) from C, marked
//!   `X-Shoal-Public: configured` and counted in `shoal_outage_served_total{basis="configured"}`;
//! - D without it, and D for a repository `--public` does not name, refuse it as before: they
//!   cannot tell the content is public.

use std::time::Duration;

use shoal_tests::{
    digest_of, http_client, Agent, AgentOptions, ImageKind, ImageSpec, Origin, MANIFEST_ACCEPT,
};

fn blob_url(agent: &Agent, origin: &Origin, repo: &str, digest: &str) -> String {
    format!("{}/v2/{repo}/blobs/{digest}?ns={}", agent.url(), origin.host().replace(':', "%3A"))
}

async fn get(url: &str) -> reqwest::Response {
    let req = http_client().get(url).header("accept", MANIFEST_ACCEPT).timeout(Duration::from_secs(60));
    req.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

async fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    agent.metric_value(name, labels).await.expect("scrape /metrics").unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_down_serves_configured_public_repositories_from_a_peer() {
    let mut origin = Origin::start().await.expect("start origin");
    let named = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "outage/app", "v1").layers(&[3 << 20]))
        .await
        .expect("push outage/app");
    let unnamed = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "outage/other", "v1").layers(&[1 << 20]))
        .await
        .expect("push outage/other");
    let opts = || AgentOptions::new().upstream(&origin.host(), &origin.url()).env("SHOAL_LOG", "debug");
    let c = Agent::start(opts()).await.expect("start agent C");
    let seed = c.p2p_addr().await.expect("C's p2p address");
    // The flag through its environment variable, with an unrelated entry beside it.
    let public = format!("unrelated.example,{}/outage/app", origin.host());
    let d_public = Agent::start(opts().arg("--bootstrap").arg(&seed).env("SHOAL_PUBLIC", &public))
        .await
        .expect("start agent D with --public");
    let d_plain = Agent::start(opts().arg("--bootstrap").arg(&seed)).await.expect("start agent D");

    // C fetches both public blobs while the origin is up.
    let layer = named.largest_layer().clone();
    let other = unnamed.largest_layer().clone();
    let resp = get(&blob_url(&c, &origin, "outage/app", &layer.digest)).await;
    assert_eq!(resp.status(), 200);
    let from_c = resp.bytes().await.unwrap();
    assert_eq!(digest_of(&from_c), layer.digest);
    let resp = get(&blob_url(&c, &origin, "outage/other", &other.digest)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(digest_of(&resp.bytes().await.unwrap()), other.digest);
    let host = origin.host().replace(':', "%3A");
    let manifest_url = |agent: &Agent| {
        format!("{}/v2/outage/app/manifests/{}?ns={host}", agent.url(), named.manifest.digest)
    };
    let resp = get(&manifest_url(&c)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), named.manifest.bytes.as_slice());

    origin.stop();

    // D with --public naming the repository: served, from C, and says why.
    let resp = get(&blob_url(&d_public, &origin, "outage/app", &layer.digest)).await;
    assert_eq!(resp.status(), 200, "D with --public refused the blob:\n{}", d_public.log_tail());
    assert_eq!(resp.headers().get("x-shoal-public").map(|v| v.to_str().unwrap()), Some("configured"));
    let from_d = resp.bytes().await.unwrap();
    assert_eq!(digest_of(&from_d), layer.digest);
    assert!(from_d == from_c, "D's bytes differ from C's");
    assert!(
        metric(&d_public, "shoal_received_bytes_total", &[("source", "peer")]).await >= layer.size as f64
    );
    assert!(metric(&d_public, "shoal_outage_served_total", &[("basis", "configured")]).await >= 1.0);
    // The manifest by digest too, with its type.
    let resp = get(&manifest_url(&d_public)).await;
    assert_eq!(resp.status(), 200, "D with --public refused the manifest:\n{}", d_public.log_tail());
    assert_eq!(resp.headers().get("x-shoal-public").map(|v| v.to_str().unwrap()), Some("configured"));
    assert_eq!(resp.headers()["content-type"].to_str().unwrap(), named.manifest.media_type);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), named.manifest.bytes.as_slice());
    assert_eq!(get(&manifest_url(&d_plain)).await.status(), 404, "D without --public served the manifest");

    // A repository --public does not name: today's rule, refused.
    let resp = get(&blob_url(&d_public, &origin, "outage/other", &other.digest)).await;
    assert_eq!(resp.status(), 404, "D served a repository --public does not name");
    assert!(resp.headers().get("x-shoal-public").is_none());

    // D without --public: refused, as before.
    let resp = get(&blob_url(&d_plain, &origin, "outage/app", &layer.digest)).await;
    assert_eq!(resp.status(), 404, "D without --public served content it never saw public");
    assert!(resp.headers().get("x-shoal-public").is_none());
    assert!(d_plain.log().contains("refusing content it has not shown this client may read"));
    assert_eq!(metric(&d_plain, "shoal_outage_served_total", &[("basis", "configured")]).await, 0.0);
    assert_eq!(metric(&d_plain, "shoal_received_bytes_total", &[("source", "peer")]).await, 0.0);
}
