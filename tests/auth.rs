//! Private images stay private, against real origins and real containerd:
//!
//! - distribution with htpasswd (HTTP Basic: every repository private; the open registry on
//!   the same storage is the public view), and distribution with token auth from the tests'
//!   token service (a private and a public repository);
//! - `ctr content fetch --user` through agent A with no node credentials, then through agent
//!   B, which gets the bytes from A (the origin sees only the access checks' HEADs);
//! - no credentials, wrong credentials, a token for another repository: no content, from a
//!   node that holds the blob; a public image needs nothing;
//! - registries that are not configured: 404, and no connection is made;
//! - client-facing errors name no internal address; credentials and tokens are never logged.

use std::time::Duration;

use base64::Engine as _;
use shoal_tests::token::{Grants, TokenServer, SERVICE};
use shoal_tests::{
    dead_url, digest_of, free_port, http_client, write_hosts_toml, AccessLogExt, Agent, AgentOptions,
    Containerd, Image, ImageKind, ImageSpec, Origin,
};

const USER: &str = "alice";
const PASSWORD: &str = "s3cret pass";

/// Agents A and B, peers, both mirroring `origin` with no node credentials, logging at debug.
async fn two_agents(origin: &Origin) -> (Agent, Agent) {
    let opts = || AgentOptions::new().upstream(&origin.host(), &origin.url()).env("SHOAL_LOG", "debug");
    let a = Agent::start(opts()).await.expect("start agent A");
    let seed = a.p2p_addr().await.expect("A's p2p address");
    let b = Agent::start(opts().arg("--bootstrap").arg(&seed)).await.expect("start agent B");
    (a, b)
}

/// `ctr content fetch` of `reference` through `agent` only (the origin in hosts.toml is dead).
async fn fetch_through(
    agent: &Agent,
    registry: &str,
    reference: &str,
    user: Option<&str>,
) -> anyhow::Result<Containerd> {
    let ctd = Containerd::start().await?;
    let hosts = ctd.scratch_dir("hosts")?;
    write_hosts_toml(&hosts, registry, Some(&agent.url()), &dead_url())?;
    let args: Vec<&str> = match user {
        Some(u) => vec!["--user", u],
        None => vec![],
    };
    ctd.fetch(reference, &hosts, &args).await?;
    Ok(ctd)
}

fn blob_url(agent: &Agent, origin: &Origin, repo: &str, digest: &str) -> String {
    format!("{}/v2/{repo}/blobs/{digest}?ns={}", agent.url(), origin.host().replace(':', "%3A"))
}

async fn get(url: &str, authorization: Option<&str>) -> reqwest::Response {
    let mut req = http_client().get(url).timeout(Duration::from_secs(30));
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    req.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

async fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    agent.metric_value(name, labels).await.expect("scrape /metrics").unwrap_or(0.0)
}

/// Neither the password (plain or in a Basic header) nor any JWT appears in the log.
fn assert_no_secret_logged(agent: &Agent, extra: &[&str]) {
    let log = agent.log();
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for secret in [PASSWORD, encoded.as_str(), "eyJ"].iter().chain(extra) {
        assert!(!log.contains(secret), "the agent logged a secret ({secret:.12}...):\n{log}");
    }
    assert!(!log.to_ascii_lowercase().contains("authorization:"), "an Authorization header was logged");
}

/// Through A, then B (from A's bytes), with `--user`; without credentials neither works.
async fn private_image_through_two_agents(origin: &Origin, image: &Image, reference: &str) -> (Agent, Agent) {
    let (a, b) = two_agents(origin).await;
    let user = format!("{USER}:{PASSWORD}");
    let ctd = fetch_through(&a, &origin.host(), reference, Some(&user)).await.expect("ctr --user through A");
    ctd.verify_image(image).await.expect("content through A");

    let mark = origin.access_log().len();
    let ctd = fetch_through(&b, &origin.host(), reference, Some(&user)).await.expect("ctr --user through B");
    ctd.verify_image(image).await.expect("content through B");
    let log = origin.access_log_since(mark);
    assert_eq!(log.blob_gets(), 0, "B's pull fetched blobs from the origin: {log:#?}");
    assert!(log.iter().any(|e| e.method == "HEAD"), "B checked nothing at the origin: {log:#?}");
    assert!(metric(&b, "shoal_received_bytes_total", &[("source", "peer")]).await > 0.0);

    let err = fetch_through(&b, &origin.host(), reference, None).await;
    assert!(err.is_err(), "B served the private image to containerd without credentials");
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_origin_serves_private_content_only_to_clients_the_origin_accepts() {
    let open = Origin::start().await.expect("start origin");
    let image = open.push(&ImageSpec::new(ImageKind::OciManifest, "private/app", "v1")).await.expect("push");
    let locked = open.locked_view(USER, PASSWORD).await.expect("start the htpasswd registry");
    let reference = image.reference().replace(&open.host(), &locked.host());
    let (_a, b) = private_image_through_two_agents(&locked, &image, &reference).await;

    // B holds the layer now; it still asks for credentials the origin accepts.
    let layer = image.largest_layer();
    let url = blob_url(&b, &locked, "private/app", &layer.digest);
    let resp = get(&url, None).await;
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert!(challenge.starts_with("Basic "), "{challenge}");
    assert_eq!(get(&url, Some(&basic(USER, "wrong"))).await.status(), 403, "wrong password");
    assert_eq!(get(&url, Some(&basic("mallory", PASSWORD))).await.status(), 403, "wrong user");
    let resp = get(&url, Some(&basic(USER, PASSWORD))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(digest_of(&resp.bytes().await.unwrap()), layer.digest);
    // The right credentials name another repository: the origin has no such blob there.
    let other = blob_url(&b, &locked, "other/app", &layer.digest);
    assert_eq!(get(&other, Some(&basic(USER, PASSWORD))).await.status(), 404);

    // The public view of the same storage needs nothing.
    let public = Agent::start(AgentOptions::new().upstream(&open.host(), &open.url())).await.unwrap();
    let ctd = fetch_through(&public, &open.host(), &image.reference(), None).await.expect("public pull");
    ctd.verify_image(&image).await.unwrap();

    for outcome in ["allowed", "denied", "cached"] {
        let n = metric(&b, "shoal_auth_checks_total", &[("outcome", outcome)]).await;
        assert!(n > 0.0, "shoal_auth_checks_total{{outcome={outcome}}} is {n}");
    }

    // Origin down: credentials not checked before get nothing (no grace configured).
    let mut locked = locked;
    locked.stop();
    let resp = get(&url, Some(&format!("basic {}", &basic(USER, PASSWORD)[6..]))).await;
    assert!(!resp.status().is_success(), "private content served unchecked with the origin down");
    let text = resp.text().await.unwrap();
    assert!(!text.contains("127.0.0.1") && !text.contains("refused"), "internal details: {text}");
    assert!(metric(&b, "shoal_auth_checks_total", &[("outcome", "origin_unreachable")]).await > 0.0);
    assert_no_secret_logged(&b, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_origin_serves_private_content_only_with_a_token_for_that_repository() {
    let tokens =
        TokenServer::start(Grants::default().public("public/app").user(USER, PASSWORD, &["private/app"]))
            .await
            .expect("start the token service");
    let open = Origin::start().await.expect("start origin");
    let image = open.push(&ImageSpec::new(ImageKind::DockerList, "private/app", "v1")).await.expect("push");
    let public = open.push(&ImageSpec::new(ImageKind::OciManifest, "public/app", "v1")).await.expect("push");
    let view = open.token_view(&tokens).await.expect("start the token-auth registry");
    let reference = image.reference().replace(&open.host(), &view.host());
    let (a, b) = private_image_through_two_agents(&view, &image, &reference).await;

    // A public image needs nothing.
    let public_ref = public.reference().replace(&open.host(), &view.host());
    let ctd = fetch_through(&b, &view.host(), &public_ref, None).await.expect("public pull through B");
    ctd.verify_image(&public).await.unwrap();

    // From B, which holds the layer: the challenge leads to the origin's token service for
    // exactly this repository.
    let layer = image.largest_layer();
    let url = blob_url(&b, &view, "private/app", &layer.digest);
    let resp = get(&url, None).await;
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"].to_str().unwrap().to_string();
    assert_eq!(
        challenge,
        format!(
            r#"Bearer realm="{}",service="{SERVICE}",scope="repository:private/app:pull""#,
            tokens.realm()
        )
    );
    assert_eq!(get(&url, Some(&basic(USER, "wrong"))).await.status(), 403, "wrong password");
    let other = tokens.token(Some((USER, PASSWORD)), "repository:public/app:pull").await.unwrap();
    assert_eq!(
        get(&url, Some(&format!("Bearer {other}"))).await.status(),
        403,
        "token for another repository"
    );
    let anonymous = tokens.token(None, "repository:private/app:pull").await.unwrap();
    assert_eq!(get(&url, Some(&format!("Bearer {anonymous}"))).await.status(), 403, "token without access");
    let right = tokens.token(Some((USER, PASSWORD)), "repository:private/app:pull").await.unwrap();
    let resp = get(&url, Some(&format!("Bearer {right}"))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(digest_of(&resp.bytes().await.unwrap()), layer.digest);
    // That token opens no other repository, even for a blob B holds.
    let elsewhere = blob_url(&b, &view, "public/app", &layer.digest);
    assert!(!get(&elsewhere, Some(&format!("Bearer {right}"))).await.status().is_success());
    // Basic credentials are exchanged for a token at the origin's realm.
    let resp = get(&url, Some(&basic(USER, PASSWORD))).await;
    assert_eq!(resp.status(), 200);

    for agent in [&a, &b] {
        assert_no_secret_logged(agent, &[&other, &anonymous, &right]);
    }
}

/// The kubelet's way is not through `ctr` but the node's own credentials: a node that has
/// them still asks every client for its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_credentials_do_not_open_private_content_to_clients() {
    let open = Origin::start().await.expect("start origin");
    let image = open.push(&ImageSpec::new(ImageKind::OciManifest, "auth/app", "v1")).await.expect("push");
    let locked = open.locked_view(USER, PASSWORD).await.expect("start the htpasswd registry");
    let dir = tempfile::tempdir().unwrap();
    let auth_file = dir.path().join("config.json");
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    std::fs::write(&auth_file, format!(r#"{{"auths":{{"{}":{{"auth":"{encoded}"}}}}}}"#, locked.host()))
        .unwrap();
    let agent = Agent::start(
        AgentOptions::new().upstream(&locked.host(), &locked.url()).registry_auth_file(&auth_file),
    )
    .await
    .unwrap();
    let reference = image.reference().replace(&open.host(), &locked.host());
    assert!(
        fetch_through(&agent, &locked.host(), &reference, None).await.is_err(),
        "served without credentials"
    );
    let user = format!("{USER}:{PASSWORD}");
    let ctd = fetch_through(&agent, &locked.host(), &reference, Some(&user)).await.expect("ctr --user");
    ctd.verify_image(&image).await.expect("fetched content");
    let url = blob_url(&agent, &locked, "auth/app", &image.largest_layer().digest);
    assert_eq!(get(&url, None).await.status(), 401, "the node's credentials opened content to anyone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unconfigured_registries_get_404_and_no_connection() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap().to_string();
    let dead = format!("127.0.0.1:{}", free_port());
    let agent =
        Agent::start(AgentOptions::new().upstream("dead.test", &format!("http://{dead}"))).await.unwrap();
    let unknown = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let urls = [
        format!("{}/v2/app/manifests/v1?ns={}", agent.url(), target.replace(':', "%3A")),
        format!("{}/v2/app/blobs/{unknown}?ns={target}", agent.url()),
        format!("{}/v2/{target}/app/manifests/v1", agent.url()),
        format!("{}/v2/app/manifests/v1?ns=169.254.169.254", agent.url()),
        format!("{}/v2/app/manifests/v1?ns=evil.example", agent.url()),
    ];
    for url in &urls {
        let start = std::time::Instant::now();
        let resp = get(url, None).await;
        assert_eq!(resp.status(), 404, "{url}");
        let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
        assert_eq!(body["errors"][0]["code"], "NAME_UNKNOWN", "{url}");
        assert!(start.elapsed() < Duration::from_secs(2), "{url} took {:?}", start.elapsed());
    }
    let accepted = tokio::time::timeout(Duration::from_millis(500), listener.accept()).await;
    assert!(accepted.is_err(), "the agent connected to a registry it does not mirror");

    // A configured origin that is down: the client learns that, not the address or the cause.
    for url in [
        format!("{}/v2/app/manifests/v1?ns=dead.test", agent.url()),
        format!("{}/v2/app/blobs/{unknown}?ns=dead.test", agent.url()),
    ] {
        let resp = get(&url, None).await;
        assert_eq!(resp.status(), 404, "{url}");
        let text = resp.text().await.unwrap();
        for detail in [dead.as_str(), "127.0.0.1", "refused", "error sending", "tcp"] {
            assert!(!text.contains(detail), "{url}: the error names {detail:?}: {text}");
        }
    }
    assert!(agent.log().contains(&dead), "the log keeps the details");

    // The control: with --mirror-any-registry the same request does reach the socket.
    let any = Agent::start(AgentOptions::new().arg("--mirror-any-registry")).await.unwrap();
    let url = format!("{}/v2/app/manifests/v1?ns={target}", any.url());
    let request =
        tokio::spawn(async move { http_client().get(&url).timeout(Duration::from_secs(5)).send().await });
    let accepted = tokio::time::timeout(Duration::from_secs(5), listener.accept()).await;
    assert!(matches!(accepted, Ok(Ok(_))), "--mirror-any-registry did not connect");
    request.abort();
}
