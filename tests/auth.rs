//! Private images stay private, against real origins and real containerd:
//!
//! - distribution with htpasswd (HTTP Basic: every repository private; the open registry on
//!   the same storage is the public view), and distribution with token auth from the tests'
//!   token service (a private and a public repository);
//! - `ctr content fetch --user` through agent A with no node credentials, then through agent
//!   B, which gets the bytes from A (the origin sees only the access checks' HEADs);
//! - the kubelet path: the CRI plugin's `PullImage` over containerd's gRPC socket with an
//!   `AuthConfig` (a pull secret, no server address), hosts dir from `containerd-config`;
//! - no credentials, wrong credentials, a token for another repository: no content, from a
//!   node that holds the blob; a public image needs nothing;
//! - origin down: cached private content only for credentials accepted within
//!   `--auth-offline-grace`;
//! - registries that are not configured: 404, and no connection is made;
//! - client-facing errors name no internal address; credentials and tokens are never logged.

use std::time::Duration;

use base64::Engine as _;
use shoal_tests::token::{Grants, TokenServer, SERVICE};
use shoal_tests::{
    dead_url, digest_of, free_port, http_client, run_agent_expecting_exit, write_hosts_toml, AccessLogExt,
    Agent, AgentOptions, Containerd, Image, ImageKind, ImageSpec, Origin,
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

/// kubelet's side of the CRI API on containerd's socket.
mod cri {
    use std::path::Path;
    use std::time::Duration;

    use hyper_util::rt::TokioIo;
    pub use k8s_cri::v1::AuthConfig;
    use k8s_cri::v1::{
        image_service_client::ImageServiceClient, ImageSpec, ImageStatusRequest, PullImageRequest,
    };
    use tonic::transport::{Channel, Endpoint, Uri};

    pub struct Images(ImageServiceClient<Channel>);

    impl Images {
        pub async fn connect(socket: &Path) -> anyhow::Result<Images> {
            let path = socket.to_path_buf();
            // The URI is not used: every connection goes to the socket.
            let channel = Endpoint::try_from("http://[::]:50051")?
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                    }
                }))
                .await?;
            Ok(Images(ImageServiceClient::new(channel)))
        }

        /// `PullImage` as kubelet sends it: the image, and the pull secret's entry (if any).
        /// Ok: the image ref containerd reports; Err: the gRPC status message.
        pub async fn pull(&mut self, image: &str, auth: Option<AuthConfig>) -> Result<String, String> {
            let spec = ImageSpec { image: image.to_string(), ..Default::default() };
            let mut req =
                tonic::Request::new(PullImageRequest { image: Some(spec), auth, sandbox_config: None });
            req.set_timeout(Duration::from_secs(120));
            match tokio::time::timeout(Duration::from_secs(130), self.0.pull_image(req)).await {
                Ok(Ok(resp)) => Ok(resp.into_inner().image_ref),
                Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
                Err(_) => Err("PullImage did not answer in 130 s".to_string()),
            }
        }

        /// The image's id if the CRI plugin has it (`ImageStatus`).
        pub async fn status(&mut self, image: &str) -> anyhow::Result<Option<String>> {
            let spec = ImageSpec { image: image.to_string(), ..Default::default() };
            let req = ImageStatusRequest { image: Some(spec), verbose: false };
            let resp = tokio::time::timeout(Duration::from_secs(30), self.0.image_status(req)).await??;
            Ok(resp.into_inner().image.map(|i| i.id))
        }
    }

    /// A pull secret's entry as kubelet passes it: user and password, no server address.
    pub fn auth(user: &str, password: &str) -> AuthConfig {
        AuthConfig { username: user.to_string(), password: password.to_string(), ..Default::default() }
    }
}

/// The kubelet path: containerd's CRI plugin `PullImage` with the pod's pull secret as
/// `AuthConfig`, with the hosts directory `shoal-agent containerd-config` writes, pulls a
/// private image through the agent (token origin: containerd takes the agent's challenge to
/// the origin's token service). Without credentials, or with a wrong password, the same call
/// gets nothing from the agent, which holds the image by then; a public image needs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_image_with_auth_config_through_the_agent() {
    cri_pull_through_the_agent(false).await;
}

/// The same with the htpasswd origin: containerd answers the agent's Basic challenge with the
/// pull secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_pull_image_with_auth_config_through_the_agent_basic_origin() {
    cri_pull_through_the_agent(true).await;
}

/// `basic`: the htpasswd origin (no public repository: the public control is skipped); else
/// the token-auth origin.
async fn cri_pull_through_the_agent(basic: bool) {
    let tokens =
        TokenServer::start(Grants::default().public("public/app").user(USER, PASSWORD, &["private/app"]))
            .await
            .expect("start the token service");
    let open = Origin::start().await.expect("start origin");
    let private_spec = ImageSpec::new(ImageKind::OciManifest, "private/app", "v1").unpackable();
    let image = open.push(&private_spec).await.expect("push");
    let public_spec = ImageSpec::new(ImageKind::OciManifest, "public/app", "v1").unpackable();
    let public = open.push(&public_spec).await.expect("push");
    let view = if basic {
        open.locked_view(USER, PASSWORD).await.expect("start the htpasswd registry")
    } else {
        open.token_view(&tokens).await.expect("start the token-auth registry")
    };
    let agent = Agent::start(AgentOptions::new().upstream(&view.host(), &view.url())).await.unwrap();

    // The node's hosts directory, as the DaemonSet's init container writes it. Its `server`
    // is https://<origin>, which this plain-HTTP origin cannot answer: whatever containerd
    // gets, it got from the agent.
    let hosts_parent = tempfile::tempdir().unwrap();
    let hosts = hosts_parent.path().join("certs.d");
    let args: Vec<String> = vec![
        "containerd-config".into(),
        "--hosts-dir".into(),
        hosts.display().to_string(),
        "--registries".into(),
        view.host(),
        "--mirror".into(),
        agent.url(),
    ];
    let out = run_agent_expecting_exit(&args, Duration::from_secs(10)).await.expect("containerd-config");
    assert!(out.status.success(), "{}", out.stderr);

    let reference = image.reference().replace(&open.host(), &view.host());
    let ctd = Containerd::start_cri(&hosts).await.expect("start containerd with CRI");
    let mut images = cri::Images::connect(ctd.socket()).await.expect("connect to the CRI socket");
    let image_ref = images
        .pull(&reference, Some(cri::auth(USER, PASSWORD)))
        .await
        .unwrap_or_else(|e| panic!("PullImage with the pull secret: {e}\n--- containerd ---\n{}", ctd.log()));
    let config = image.blobs.iter().find(|b| !b.is_layer()).expect("config blob");
    assert_eq!(image_ref, config.digest, "CRI reports the image id (its config digest)");
    assert_eq!(images.status(&reference).await.unwrap().as_deref(), Some(config.digest.as_str()));
    ctd.verify_image(&image).await.expect("the CRI plugin's content is the pushed image");
    let served = metric(&agent, "shoal_served_bytes_total", &[]).await;
    assert!(served >= image.total_blob_bytes() as f64, "the agent served {served} bytes");
    assert!(basic || tokens.requests() > 0, "containerd never went to the token service");

    // A node whose containerd has nothing yet, served by the same agent, which holds the
    // image: no credentials, and a wrong password, get nothing.
    let fresh = Containerd::start_cri(&hosts).await.expect("start containerd with CRI");
    let mut images = cri::Images::connect(fresh.socket()).await.expect("connect to the CRI socket");
    let denied_before = metric(&agent, "shoal_auth_checks_total", &[("outcome", "denied")]).await;
    for (what, auth) in [("no credentials", None), ("a wrong password", Some(cri::auth(USER, "wrong")))] {
        let got = images.pull(&reference, auth).await;
        assert!(got.is_err(), "PullImage with {what} succeeded: {got:?}");
        assert_eq!(images.status(&reference).await.unwrap(), None, "{what}: the image is there");
        let held = fresh.content_digests().await.unwrap();
        for digest in image.all_digests() {
            assert!(!held.contains(&digest), "{what}: containerd got {digest}");
        }
    }
    assert_eq!(metric(&agent, "shoal_served_bytes_total", &[]).await, served, "bytes served without access");
    let denied = metric(&agent, "shoal_auth_checks_total", &[("outcome", "denied")]).await;
    assert!(denied > denied_before, "the agent was not asked (denied {denied_before} -> {denied})");

    // The control: a public image through the same path needs no pull secret.
    if basic {
        assert_no_secret_logged(&agent, &[]);
        return;
    }
    let public_ref = public.reference().replace(&open.host(), &view.host());
    images.pull(&public_ref, None).await.unwrap_or_else(|e| panic!("public PullImage: {e}"));
    fresh.verify_image(&public).await.expect("public image content");
    assert_no_secret_logged(&agent, &[]);
}

/// Origin down: a client whose credential the origin accepted within `--auth-offline-grace`
/// is still served cached private content; an unknown client (no, wrong, or another
/// credential never checked) is not, nor is anyone once the window has passed. Without a grace
/// the same client is refused once its decision (`--auth-decision-ttl`) has expired; within
/// the decision's lifetime it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_down_serves_private_content_only_within_the_offline_grace() {
    const GRACE: Duration = Duration::from_secs(8);
    let open = Origin::start().await.expect("start origin");
    let image = open.push(&ImageSpec::new(ImageKind::OciManifest, "grace/app", "v1")).await.expect("push");
    let mut locked = open.locked_view(USER, PASSWORD).await.expect("start the htpasswd registry");
    let opts = |ttl: &str, grace: &str| {
        AgentOptions::new()
            .upstream(&locked.host(), &locked.url())
            .arg("--auth-decision-ttl")
            .arg(ttl)
            .arg("--auth-offline-grace")
            .arg(grace)
    };
    let graced = Agent::start(opts("1s", &format!("{}s", GRACE.as_secs()))).await.unwrap();
    let strict = Agent::start(opts("1s", "0")).await.unwrap();
    let fresh = Agent::start(opts("60s", "0")).await.unwrap();
    let layer = image.largest_layer();
    let alice = basic(USER, PASSWORD);
    // The same credential spelt differently: the origin would accept it, the agent never
    // checked it.
    let unchecked = format!("basic {}", &alice[6..]);
    let [graced_url, strict_url, fresh_url] =
        [&graced, &strict, &fresh].map(|agent| blob_url(agent, &locked, "grace/app", &layer.digest));
    let checked_at = std::time::Instant::now();
    for url in [&graced_url, &strict_url, &fresh_url] {
        let resp = get(url, Some(&alice)).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(digest_of(&resp.bytes().await.unwrap()), layer.digest);
    }
    // Every 1 s decision has expired; the 60 s one has not.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    locked.stop();

    let resp = get(&graced_url, Some(&alice)).await;
    assert_eq!(resp.status(), 200, "within the grace the checked client is refused");
    assert_eq!(digest_of(&resp.bytes().await.unwrap()), layer.digest);
    assert!(
        checked_at.elapsed() < GRACE,
        "the machine is too slow for this test: {:?} passed",
        checked_at.elapsed()
    );
    assert!(metric(&graced, "shoal_auth_checks_total", &[("outcome", "origin_unreachable")]).await > 0.0);
    for (what, authorization) in [
        ("no credentials", None),
        ("a wrong password", Some(basic(USER, "wrong"))),
        ("an unchecked credential", Some(unchecked)),
    ] {
        let status = get(&graced_url, authorization.as_deref()).await.status();
        assert!(!status.is_success(), "{what} was served with the origin down ({status})");
    }
    let status = get(&strict_url, Some(&alice)).await.status();
    assert_eq!(status, 404, "no grace: an expired decision must not serve with the origin down");
    let resp = get(&fresh_url, Some(&alice)).await;
    assert_eq!(resp.status(), 200, "a decision younger than its TTL holds while the origin is down");

    // Past the grace: refused.
    tokio::time::sleep((GRACE + Duration::from_secs(1)).saturating_sub(checked_at.elapsed())).await;
    let status = get(&graced_url, Some(&alice)).await.status();
    assert_eq!(status, 404, "served past --auth-offline-grace");
}

/// GET of `url` to the end, asserting 200; how long it took.
async fn timed_get(url: &str, authorization: Option<&str>) -> Duration {
    let start = std::time::Instant::now();
    let resp = get(url, authorization).await;
    assert_eq!(resp.status(), 200, "{url}");
    resp.bytes().await.unwrap();
    start.elapsed()
}

/// `rounds` timed GETs, each after `pause`.
async fn series(url: &str, authorization: Option<&str>, rounds: usize, pause: Duration) -> Vec<Duration> {
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        tokio::time::sleep(pause).await;
        out.push(timed_get(url, authorization).await);
    }
    out
}

/// What the access check costs: latency of a GET of a blob the agent holds (64 KiB), per
/// kind of decision. Prints medians and p90s; a benchmark, not a pass/fail test:
///
/// `cargo test -p shoal-tests --test auth -- --ignored --nocapture access_check_cost`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: prints figures"]
async fn access_check_cost() {
    const ROUNDS: usize = 40;
    const COLD_ROUNDS: usize = 12;
    // A 1 s decision lifetime makes every request after a 1.1 s pause a cold one.
    const PAUSE: Duration = Duration::from_millis(1100);
    let tokens =
        TokenServer::start(Grants::default().public("public/app").user(USER, PASSWORD, &["private/app"]))
            .await
            .expect("start the token service");
    let open = Origin::start().await.expect("start origin");
    let spec = |repo: &str| ImageSpec::new(ImageKind::OciManifest, repo, "v1").layers(&[64 * 1024]);
    let private = open.push(&spec("private/app")).await.expect("push");
    let public = open.push(&spec("public/app")).await.expect("push");
    let view = open.token_view(&tokens).await.expect("start the token-auth registry");
    let locked = open.locked_view(USER, PASSWORD).await.expect("start the htpasswd registry");
    let agent = |origin: &Origin, ttl: &str| {
        let opts = AgentOptions::new().upstream(&origin.host(), &origin.url());
        Agent::start(opts.arg("--auth-decision-ttl").arg(ttl))
    };
    let warm_agent = agent(&view, "60s").await.unwrap();
    let cold_agent = agent(&view, "1s").await.unwrap();
    let basic_agent = agent(&locked, "1s").await.unwrap();
    let alice = basic(USER, PASSWORD);
    let scope = "repository:private/app:pull";
    let token = format!("Bearer {}", tokens.token(Some((USER, PASSWORD)), scope).await.unwrap());
    let (private_layer, public_layer) = (&private.largest_layer().digest, &public.largest_layer().digest);
    let warm_public = blob_url(&warm_agent, &view, "public/app", public_layer);
    let warm_private = blob_url(&warm_agent, &view, "private/app", private_layer);
    let cold_public = blob_url(&cold_agent, &view, "public/app", public_layer);
    let basic_private = blob_url(&basic_agent, &locked, "private/app", private_layer);
    // Fill each agent's cache first: every measured GET is of a cached blob.
    timed_get(&warm_public, None).await;
    timed_get(&warm_private, Some(&token)).await;
    timed_get(&cold_public, None).await;
    timed_get(&basic_private, Some(&alice)).await;

    let mut rows: Vec<(&str, Vec<Duration>)> = Vec::new();
    rows.push(("public, decision cached", series(&warm_public, None, ROUNDS, Duration::ZERO).await));
    let v = series(&warm_private, Some(&token), ROUNDS, Duration::ZERO).await;
    rows.push(("private, token, decision cached", v));
    // A new token per request (fetched before the clock starts): a decision not seen before.
    let mut v = Vec::new();
    for _ in 0..ROUNDS {
        let fresh = format!("Bearer {}", tokens.token(Some((USER, PASSWORD)), scope).await.unwrap());
        v.push(timed_get(&warm_private, Some(&fresh)).await);
    }
    rows.push(("private, new token: origin HEAD", v));
    let v = series(&cold_public, None, COLD_ROUNDS, PAUSE).await;
    rows.push(("public, decision expired: anonymous origin HEAD", v));
    let v = series(&basic_private, Some(&alice), COLD_ROUNDS, PAUSE).await;
    rows.push(("private, Basic, decision expired: origin HEAD (bcrypt)", v));
    let v = series(&basic_private, Some(&alice), ROUNDS, Duration::ZERO).await;
    rows.push(("private, Basic, decision cached", v));

    let quantile = |v: &[Duration], q: f64| {
        let mut v = v.to_vec();
        v.sort();
        v[((v.len() - 1) as f64 * q).round() as usize]
    };
    let base = quantile(&rows[0].1, 0.5).as_secs_f64();
    println!("GET of a cached 64 KiB blob through the agent, by access decision (loopback):");
    println!("{:<56} {:>4} {:>10} {:>10} {:>8}", "case", "n", "median", "p90", "/public");
    for (case, v) in &rows {
        let median = quantile(v, 0.5);
        println!(
            "{case:<56} {:>4} {:>8.2}ms {:>8.2}ms {:>7.1}x",
            v.len(),
            median.as_secs_f64() * 1e3,
            quantile(v, 0.9).as_secs_f64() * 1e3,
            median.as_secs_f64() / base
        );
    }
}
