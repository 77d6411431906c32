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
//!
//! Swarm attestation (agents with a swarm key, so peers are members):
//!
//! - an origin with a public and a private repository (distribution's token auth, per
//!   repository): D serves the public blob and manifest from C on C's word, marked
//!   `X-Shoal-Public: attested`, within `--public-attestation-window` and not after it; the
//!   private image is refused without credentials, with credentials D never saw accepted, and
//!   through the public repository's name (an attestation names repository and digest);
//! - `ctr content fetch` by tag through D, whose hosts.toml server is dead, gets the whole public
//!   image, the tag answered from the mapping C saw (marked stale).

use std::time::{Duration, Instant};

use base64::Engine as _;
use shoal_tests::token::{Grants, TokenServer};
use shoal_tests::{
    dead_url, digest_of, http_client, write_hosts_toml, Agent, AgentOptions, Containerd, ImageKind,
    ImageSpec, Origin, MANIFEST_ACCEPT,
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

/// A swarm key file in `dir` (every agent of these tests shares it).
/// An agent of the test's private swarm (`--swarm-key key`) in front of `origin`.
fn swarm_member(origin: &Origin, key: &str) -> AgentOptions {
    AgentOptions::new()
        .upstream(&origin.host(), &origin.url())
        .env("SHOAL_LOG", "debug")
        .arg("--swarm-key")
        .arg(key)
}

fn swarm_key(dir: &std::path::Path) -> String {
    let path = dir.join("swarm.key");
    std::fs::write(&path, format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", hex::encode([7u8; 32]))).unwrap();
    path.display().to_string()
}

async fn get_as(url: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut req = http_client().get(url).header("accept", MANIFEST_ACCEPT).timeout(Duration::from_secs(60));
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

fn public_header(resp: &reqwest::Response) -> Option<&str> {
    resp.headers().get("x-shoal-public").map(|v| v.to_str().unwrap())
}

const USER: &str = "alice";
const PASSWORD: &str = "s3cret pass";
/// `--public-attestation-window` of D in the window test: long enough for the steps before it
/// expires on a loaded machine, short enough to wait out.
const WINDOW: Duration = Duration::from_secs(25);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_down_serves_what_a_swarm_peer_attests_public_within_the_window() {
    let tokens =
        TokenServer::start(Grants::default().public("outage/app").user(USER, PASSWORD, &["outage/private"]))
            .await
            .expect("start the token service");
    let storage = Origin::start().await.expect("start the storage origin");
    let public = storage
        .push(&ImageSpec::new(ImageKind::OciManifest, "outage/app", "v1").layers(&[3 << 20]))
        .await
        .expect("push outage/app");
    let private = storage
        .push(&ImageSpec::new(ImageKind::OciManifest, "outage/private", "v1").layers(&[1 << 20]))
        .await
        .expect("push outage/private");
    let mut origin = storage.token_view(&tokens).await.expect("start the token-auth origin");
    let dir = tempfile::tempdir().unwrap();
    let key = swarm_key(dir.path());
    let opts = || swarm_member(&origin, &key);
    let c = Agent::start(opts()).await.expect("start agent C");
    let seed = c.p2p_addr().await.expect("C's p2p address");
    let window = format!("{}s", WINDOW.as_secs());
    let d =
        Agent::start(opts().arg("--bootstrap").arg(&seed).env("SHOAL_PUBLIC_ATTESTATION_WINDOW", &window))
            .await
            .expect("start agent D");
    let ns = origin.host().replace(':', "%3A");
    let url = |agent: &Agent, repo: &str, what: &str| format!("{}/v2/{repo}/{what}?ns={ns}", agent.url());
    let basic =
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")));
    let layer = public.largest_layer().clone();
    let secret = private.largest_layer().clone();
    let layer_url = |agent: &Agent| url(agent, "outage/app", &format!("blobs/{}", layer.digest));
    let manifest_url =
        |agent: &Agent| url(agent, "outage/app", &format!("manifests/{}", public.manifest.digest));

    // While the origin answers, C checks the public objects anonymously (and serves them), and
    // fetches the private layer for a client with credentials.
    let checked_after = Instant::now();
    let resp = get_as(&layer_url(&c), None).await;
    assert_eq!(resp.status(), 200, "C:\n{}", c.log_tail());
    let from_c = resp.bytes().await.unwrap();
    assert_eq!(digest_of(&from_c), layer.digest);
    let resp = get_as(&manifest_url(&c), None).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), public.manifest.bytes.as_slice());
    let secret_url = |agent: &Agent, repo: &str| url(agent, repo, &format!("blobs/{}", secret.digest));
    assert_eq!(
        get_as(&secret_url(&c, "outage/private"), None).await.status(),
        401,
        "private needs credentials"
    );
    let resp = get_as(&secret_url(&c, "outage/private"), Some(&basic)).await;
    assert_eq!(resp.status(), 200, "C refused the private layer to its owner:\n{}", c.log_tail());
    assert_eq!(digest_of(&resp.bytes().await.unwrap()), secret.digest);
    let checked_before = Instant::now();

    origin.stop();

    // D never asked the origin anything: C's word opens the public blob and manifest, from C.
    let resp = get_as(&layer_url(&d), None).await;
    assert_eq!(resp.status(), 200, "D refused the attested blob:\n{}", d.log_tail());
    assert_eq!(public_header(&resp), Some("attested"));
    let from_d = resp.bytes().await.unwrap();
    assert!(from_d == from_c, "D's bytes differ from C's");
    assert!(metric(&d, "shoal_received_bytes_total", &[("source", "peer")]).await >= layer.size as f64);
    let resp = get_as(&manifest_url(&d), None).await;
    assert_eq!(resp.status(), 200, "D refused the attested manifest:\n{}", d.log_tail());
    assert_eq!(public_header(&resp), Some("attested"));
    assert_eq!(resp.headers()["content-type"].to_str().unwrap(), public.manifest.media_type);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), public.manifest.bytes.as_slice());
    assert!(metric(&d, "shoal_outage_served_total", &[("basis", "attested")]).await >= 2.0);
    assert!(
        checked_after.elapsed() < WINDOW,
        "the machine is too slow for this window: the steps above took {:?}",
        checked_after.elapsed()
    );

    // The private layer, which C holds: no credentials, credentials D never saw accepted, and
    // the public repository's name with the private digest all get nothing.
    let received = metric(&d, "shoal_received_bytes_total", &[("source", "peer")]).await;
    for (repo, authorization, what) in [
        ("outage/private", None, "no credentials"),
        ("outage/private", Some(basic.as_str()), "credentials D never saw accepted"),
        ("outage/app", None, "the private digest through the public repository"),
    ] {
        let resp = get_as(&secret_url(&d, repo), authorization).await;
        assert_eq!(resp.status(), 404, "D served the private layer ({what})");
        assert!(public_header(&resp).is_none());
    }
    assert_eq!(metric(&d, "shoal_received_bytes_total", &[("source", "peer")]).await, received);

    // Past the window (counted from C's check): refused, though D now holds the bytes.
    let expired = checked_before + WINDOW + Duration::from_secs(2);
    tokio::time::sleep(expired.saturating_duration_since(Instant::now())).await;
    let resp = get_as(&layer_url(&d), None).await;
    assert_eq!(resp.status(), 404, "D served on an attestation older than its window");
    assert!(public_header(&resp).is_none());
    assert!(d.log().contains("refusing content it has not shown this client may read"));
}

/// `ctr content fetch` by tag through `agent` only (hosts.toml's server is dead).
async fn ctr_fetch_through(agent: &Agent, registry: &str, reference: &str) -> anyhow::Result<Containerd> {
    let ctd = Containerd::start().await?;
    let hosts = ctd.scratch_dir("hosts")?;
    write_hosts_toml(&hosts, registry, Some(&agent.url()), &dead_url())?;
    ctd.fetch(reference, &hosts, &[]).await?;
    Ok(ctd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_fetches_a_public_image_by_tag_through_a_new_node_during_an_outage() {
    let mut origin = Origin::start().await.expect("start origin");
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "outage/tagged", "v1").layers(&[2 << 20, 1 << 20]))
        .await
        .expect("push outage/tagged");
    let dir = tempfile::tempdir().unwrap();
    let key = swarm_key(dir.path());
    let opts = || swarm_member(&origin, &key);
    let c = Agent::start(opts()).await.expect("start agent C");
    let seed = c.p2p_addr().await.expect("C's p2p address");
    let d = Agent::start(opts().arg("--bootstrap").arg(&seed)).await.expect("start agent D");
    ctr_fetch_through(&c, &origin.host(), &image.reference()).await.expect("ctr fetch through C");

    origin.stop();

    let ctd = ctr_fetch_through(&d, &origin.host(), &image.reference())
        .await
        .unwrap_or_else(|e| panic!("ctr fetch by tag through D: {e}\nD:\n{}", d.log_tail()));
    ctd.verify_image(&image).await.expect("the whole image");
    assert!(d.log().contains("answering the tag with the newest digest a swarm peer saw"));
    let tag_url =
        format!("{}/v2/outage/tagged/manifests/v1?ns={}", d.url(), origin.host().replace(':', "%3A"));
    let resp = http_client().head(&tag_url).header("accept", MANIFEST_ACCEPT).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["docker-content-digest"].to_str().unwrap(), image.manifest.digest);
    assert_eq!(resp.headers()["x-shoal-stale"].to_str().unwrap(), "origin unreachable");
    assert_eq!(public_header(&resp), Some("attested"));
    assert!(metric(&d, "shoal_stale_tags_served_total", &[]).await >= 1.0);
    // A tag nobody saw: unknown, as before.
    let other = tag_url.replace("/manifests/v1", "/manifests/v2");
    assert_eq!(http_client().head(&other).send().await.unwrap().status(), 404);
}
