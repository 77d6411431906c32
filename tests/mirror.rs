//! The agent as a registry mirror for containerd (and skopeo), end to end.
//!
//! Each test starts its own origin (`docker-registry`), its own agent process and, where
//! needed, its own containerd, all on 127.0.0.1, and asserts on what really happened:
//! bytes in containerd's content store, the origin's access log, the agent's metrics,
//! HTTP status codes and headers. Build the agent first: `cargo build --bins`.
//!
//! containerd is always given a *dead* `server` in hosts.toml: if the agent fails,
//! containerd cannot silently fall back to the origin and make the test pass.

use std::time::{Duration, Instant};

use reqwest::{Client, Response, StatusCode};
use serde_json::Value;
use shoal_tests::agent::run_agent_expecting_exit;
use shoal_tests::pull::ns_url as agent_url;
use shoal_tests::skopeo::{copy_to_dir, read_dir_image, write_registries_conf};
use shoal_tests::util::{digest_hex, files_identical};
use shoal_tests::{
    dead_url, digest_of, http_client, poll_until, write_hosts_toml, AccessLogExt, Agent, AgentOptions,
    Containerd, FaultyProxy, Image, ImageKind, ImageSpec, Origin, ProxyConfig, MANIFEST_ACCEPT,
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// An origin and an agent that knows it as `--upstream <origin host>=<origin url>`.
struct Env {
    origin: Origin,
    agent: Agent,
    client: Client,
}

impl Env {
    async fn start() -> Env {
        Env::start_with(|o| o).await
    }

    async fn start_with(f: impl FnOnce(AgentOptions) -> AgentOptions) -> Env {
        let origin = Origin::start().await.expect("start origin");
        let opts = f(AgentOptions::new().upstream(&origin.host(), &origin.url()));
        let agent = Agent::start(opts).await.expect("start agent");
        Env { origin, agent, client: http_client() }
    }

    /// Agent URL for `path` (starting with `/v2/`), with containerd's `?ns=<origin>`.
    fn url(&self, path: &str) -> String {
        agent_url(&self.agent, &self.origin.host(), path)
    }

    async fn push(&self, kind: ImageKind, repo: &str, layers: Option<&[u64]>) -> Image {
        let mut spec = ImageSpec::new(kind, repo, "v1");
        if let Some(l) = layers {
            spec = spec.layers(l);
        }
        self.origin.push(&spec).await.expect("push image to origin")
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.agent.metric(name, labels).await
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent log (tail) ---\n{}", self.agent.log_tail());
        }
    }
}

fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers().get(name).map(|v| v.to_str().unwrap_or("<non-ascii>").to_string())
}

/// How a response body ended.
enum Body {
    Complete(Vec<u8>),
    Cut { received: usize, error: String },
}

async fn read_body(mut resp: Response) -> Body {
    let mut data = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => data.extend_from_slice(&chunk),
            Ok(None) => return Body::Complete(data),
            Err(e) => return Body::Cut { received: data.len(), error: format!("{e:?}") },
        }
    }
}

/// GET a blob through the agent and require exactly the expected bytes.
async fn get_blob_ok(env_client: &Client, url: &str, expected: &[u8], digest: &str) {
    let resp = env_client.get(url).send().await.expect("GET blob");
    assert_eq!(resp.status(), 200, "GET {url}");
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(digest));
    let body = resp.bytes().await.expect("blob body");
    assert_eq!(body.len(), expected.len(), "length of {digest}");
    assert!(body.as_ref() == expected, "bytes of {digest} differ");
}

/// A syntactically valid digest nobody has.
fn unknown_digest() -> String {
    digest_of(format!("nobody has this {}", rand::random::<u64>()).as_bytes())
}

// ---------------------------------------------------------------------------------------
// 1. containerd pulls every image kind through the agent
// ---------------------------------------------------------------------------------------

async fn pull_through_agent(kind: ImageKind) {
    let env = Env::start().await;
    let image = env.push(kind, "mirror/pull", None).await;
    let ctd = Containerd::start().await.expect("start containerd");
    let hosts = ctd.scratch_dir("hosts").unwrap();
    write_hosts_toml(&hosts, &env.origin.host(), Some(&env.agent.url()), &dead_url()).unwrap();
    let mark = env.origin.access_log().len();

    ctd.fetch(&image.reference(), &hosts, &[]).await.expect("ctr content fetch through the agent");

    // containerd holds exactly what was pushed.
    ctd.verify_image(&image).await.expect("fetched content");

    // The agent served the requests (containerd could not have reached the dead server).
    let manifests = image.manifests().count() as f64;
    let manifest_ok =
        env.metric("shoal_registry_requests_total", &[("route", "manifest"), ("status", "200")]).await;
    // One tag resolution (HEAD) plus one GET per manifest digest.
    assert!(
        manifest_ok >= 1.0 + manifests,
        "manifest requests with status 200: {manifest_ok}, expected >= {}",
        1.0 + manifests
    );
    let blob_ok = env.metric("shoal_registry_requests_total", &[("route", "blob"), ("status", "200")]).await;
    assert!(
        blob_ok >= image.blobs.len() as f64,
        "blob requests with status 200: {blob_ok}, expected >= {}",
        image.blobs.len()
    );
    let served = env.metric("shoal_served_bytes_total", &[]).await;
    assert!(
        served >= image.total_blob_bytes() as f64,
        "served bytes {served} < image blob bytes {}",
        image.total_blob_bytes()
    );

    // The origin saw the agent: the tag resolved with HEAD, each blob fetched once.
    let log = env.origin.access_log_since(mark);
    assert!(
        log.iter().any(|e| e.method == "HEAD" && e.is_manifest() && e.reference() == image.tag),
        "origin never saw a HEAD for the tag: {log:#?}"
    );
    assert!(
        !log.iter().any(|e| e.method == "GET" && e.is_manifest() && e.reference() == image.tag),
        "the agent must resolve tags with HEAD, not GET: {log:#?}"
    );
    for blob in &image.blobs {
        assert_eq!(
            log.blob_get_bytes_for(&blob.digest),
            blob.size,
            "bytes the origin sent for {} (each byte exactly once): {log:#?}",
            blob.digest
        );
    }
    assert_no_direct_containerd_requests(&log);
}

/// containerd must never have reached the origin itself (its User-Agent is
/// `containerd/<version>`; the agent's requests carry its own).
fn assert_no_direct_containerd_requests(log: &[shoal_tests::AccessEntry]) {
    for e in log {
        assert!(
            !e.user_agent.starts_with("containerd/"),
            "containerd bypassed the agent and reached the origin: {e:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_oci_manifest_through_agent() {
    pull_through_agent(ImageKind::OciManifest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_oci_index_through_agent() {
    pull_through_agent(ImageKind::OciIndex).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_docker_manifest_through_agent() {
    pull_through_agent(ImageKind::DockerManifest).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_docker_list_through_agent() {
    pull_through_agent(ImageKind::DockerList).await;
}

// ---------------------------------------------------------------------------------------
// 2. A second pull by a fresh containerd only costs the origin tag HEADs
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_pull_costs_origin_only_tag_heads() {
    let env = Env::start().await;
    let image = env.push(ImageKind::OciIndex, "mirror/second", None).await;

    // The hosts dir outlives both containerds (without it containerd would go straight
    // to the origin).
    let hosts_tmp = tempfile::tempdir().unwrap();
    let hosts = hosts_tmp.path().to_path_buf();
    let first = Containerd::start().await.unwrap();
    write_hosts_toml(&hosts, &env.origin.host(), Some(&env.agent.url()), &dead_url()).unwrap();
    first.fetch(&image.reference(), &hosts, &[]).await.unwrap();
    first.verify_image(&image).await.unwrap();
    drop(first);

    let mark = env.origin.access_log().len();
    let from_cache_before = env.metric("shoal_served_bytes_total", &[("source", "cache")]).await;

    let second = Containerd::start().await.unwrap();
    second.fetch(&image.reference(), &hosts, &[]).await.unwrap();
    second.verify_image(&image).await.unwrap();

    let log = env.origin.access_log_since(mark);
    assert_no_direct_containerd_requests(&log);
    assert_eq!(log.blob_gets(), 0, "origin blob GETs on the second pull: {log:#?}");
    assert_eq!(log.manifest_gets(), 0, "origin manifest GETs on the second pull: {log:#?}");
    assert!(log.manifest_heads() >= 1, "the tag must be resolved at the origin: {log:#?}");
    for e in &log {
        assert!(
            e.method == "HEAD" && e.is_manifest() && e.reference() == image.tag,
            "unexpected origin request on the second pull: {e:?}"
        );
    }
    let from_cache = env.metric("shoal_served_bytes_total", &[("source", "cache")]).await - from_cache_before;
    assert!(
        from_cache >= image.total_blob_bytes() as f64,
        "second pull served {from_cache} bytes from cache, image has {}",
        image.total_blob_bytes()
    );
}

// ---------------------------------------------------------------------------------------
// 3. skopeo through a registries.conf mirror in path-prefix form
// ---------------------------------------------------------------------------------------

/// The mirror location is `127.0.0.1:AGENT/origin.shoal.test`: the registry name travels in
/// the path (`/v2/origin.shoal.test/<repo>/...`) and the agent maps it with `--upstream`.
/// (A `host:port` cannot be a path component of an image reference, so the name has no
/// port.) The primary location is dead, so only the agent can have served the image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_pulls_through_path_prefix_mirror() {
    const NAME: &str = "origin.shoal.test";
    let origin = Origin::start().await.unwrap();
    let agent = Agent::start(
        AgentOptions::new().upstream(NAME, &origin.url()).upstream(&origin.host(), &origin.url()),
    )
    .await
    .unwrap();
    let image = origin.push(&ImageSpec::new(ImageKind::DockerList, "skopeo/app", "v1")).await.unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("registries.conf");
    let dead = dead_url();
    write_registries_conf(
        &conf,
        NAME,
        dead.trim_start_matches("http://"),
        &format!("{}/{NAME}", agent.host()),
    )
    .unwrap();
    let dest = tmp.path().join("out");
    let out = copy_to_dir(&conf, &format!("{NAME}/skopeo/app:v1"), &dest).await.unwrap();
    assert!(
        out.success(),
        "skopeo copy through the agent failed:\n{out}\n--- agent log ---\n{}",
        agent.log_tail()
    );

    let copied = read_dir_image(&dest).unwrap();
    assert_eq!(copied.manifest, image.manifest.bytes, "top-level manifest bytes");
    for child in &image.children {
        let name = format!("{}.manifest.json", digest_hex(&child.digest));
        let path = copied.files.get(&name).unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(std::fs::read(path).unwrap(), child.bytes, "{name}");
    }
    for blob in &image.blobs {
        let path = copied
            .files
            .get(digest_hex(&blob.digest))
            .unwrap_or_else(|| panic!("skopeo did not copy {}", blob.digest));
        assert!(files_identical(path, &blob.path).unwrap(), "{} differs", blob.digest);
    }

    let blob_ok =
        agent.metric("shoal_registry_requests_total", &[("route", "blob"), ("status", "200")]).await;
    assert!(blob_ok >= image.blobs.len() as f64, "agent blob requests: {blob_ok}");
    let manifest_ok =
        agent.metric("shoal_registry_requests_total", &[("route", "manifest"), ("status", "200")]).await;
    assert!(manifest_ok >= image.manifests().count() as f64, "agent manifest requests: {manifest_ok}");
    let log = origin.access_log();
    for blob in &image.blobs {
        assert_eq!(
            log.blob_get_bytes_for(&blob.digest),
            blob.size,
            "bytes the origin sent for {} (each byte exactly once)",
            blob.digest
        );
    }
}

// ---------------------------------------------------------------------------------------
// 4. Range requests, on a cached blob and on a blob still downloading
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// 206 with these inclusive byte positions.
    Partial(u64, u64),
    /// 416.
    Unsatisfiable,
}

/// The range cases for a blob of `size` bytes.
fn range_cases(size: u64) -> Vec<(String, Expect)> {
    let mid = size / 2;
    vec![
        ("bytes=0-99".to_string(), Expect::Partial(0, 99)),
        (format!("bytes={mid}-{}", mid + 999), Expect::Partial(mid, mid + 999)),
        ("bytes=-100".to_string(), Expect::Partial(size - 100, size - 1)),
        (format!("bytes={}-", size - 5000), Expect::Partial(size - 5000, size - 1)),
        (format!("bytes={}-{}", size - 1, size - 1), Expect::Partial(size - 1, size - 1)),
        (format!("bytes={size}-"), Expect::Unsatisfiable),
        (format!("bytes={}-{}", size + 10, size + 20), Expect::Unsatisfiable),
    ]
}

async fn check_range(client: Client, url: String, range: String, expect: Expect, data: &[u8]) {
    let size = data.len() as u64;
    let resp =
        client.get(&url).header("Range", &range).send().await.unwrap_or_else(|e| panic!("GET {range}: {e}"));
    match expect {
        Expect::Partial(a, b) => {
            assert_eq!(resp.status(), 206, "{range}");
            assert_eq!(
                header(&resp, "content-range").as_deref(),
                Some(format!("bytes {a}-{b}/{size}").as_str()),
                "{range}"
            );
            assert_eq!(
                header(&resp, "content-length").as_deref(),
                Some((b - a + 1).to_string().as_str()),
                "{range}"
            );
            let body = resp.bytes().await.unwrap_or_else(|e| panic!("{range} body: {e}"));
            assert!(
                body.as_ref() == &data[a as usize..=b as usize],
                "{range}: wrong bytes ({} received)",
                body.len()
            );
        }
        Expect::Unsatisfiable => {
            assert_eq!(resp.status(), 416, "{range}");
            assert_eq!(
                header(&resp, "content-range").as_deref(),
                Some(format!("bytes */{size}").as_str()),
                "{range}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_on_cached_blob() {
    let env = Env::start().await;
    let image = env.push(ImageKind::OciManifest, "mirror/range", Some(&[1_500_007])).await;
    let layer = image.largest_layer().clone();
    let data = layer.read().unwrap();
    let url = env.url(&format!("/v2/mirror/range/blobs/{}", layer.digest));

    // Full GET (fills the cache), with the registry headers.
    let resp = env.client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(layer.digest.as_str()));
    assert_eq!(header(&resp, "content-length"), Some(data.len().to_string()));
    assert_eq!(header(&resp, "accept-ranges").as_deref(), Some("bytes"));
    assert!(resp.bytes().await.unwrap().as_ref() == data.as_slice());

    let mark = env.origin.access_log().len();

    // HEAD: same headers, no body.
    let resp = env.client.head(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(layer.digest.as_str()));
    assert_eq!(header(&resp, "content-length"), Some(data.len().to_string()));
    assert_eq!(header(&resp, "accept-ranges").as_deref(), Some("bytes"));

    for (range, expect) in range_cases(layer.size) {
        check_range(env.client.clone(), url.clone(), range, expect, &data).await;
    }
    let log = env.origin.access_log_since(mark);
    assert_eq!(log.blob_gets(), 0, "ranges on a cached blob must not reach the origin: {log:#?}");
    assert_eq!(env.origin.access_log().blob_get_bytes_for(&layer.digest), layer.size);
}

/// An origin whose blobs come through a proxy at 2 MiB/s, and an agent in front of it: a
/// download stays in flight long enough for concurrent requests to join it.
async fn slow_blob_origin() -> (Origin, FaultyProxy, Agent) {
    let origin = Origin::start().await.unwrap();
    let proxy = FaultyProxy::in_front_of(
        &origin,
        ProxyConfig {
            total_bytes_per_sec: Some(2 << 20),
            path_contains: Some("/blobs/".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let agent = Agent::start(AgentOptions::new().upstream(&origin.host(), &proxy.url())).await.unwrap();
    (origin, proxy, agent)
}

/// The origin sits behind a proxy that paces all blob bodies together at 2 MiB/s, so a
/// 6 MiB blob takes ~3 s however the agent splits it into Range requests. While that one
/// download is in flight, a second full GET and every range case run concurrently; all get
/// the right bytes, every request is sent before the download ends, and the origin sends
/// each byte of the blob once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_requests_while_downloading() {
    let (origin, proxy, agent) = slow_blob_origin().await;
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "mirror/inflight", "v1").layers(&[(6 << 20) + 3]))
        .await
        .unwrap();
    let layer = image.largest_layer().clone();
    let data = std::sync::Arc::new(layer.read().unwrap());
    let url = agent_url(&agent, &origin.host(), &format!("/v2/mirror/inflight/blobs/{}", layer.digest));
    let client = http_client();
    let blob_path = format!("/blobs/{}", layer.digest);
    let blob_gets = || proxy.gets(&blob_path);

    // First client: full GET, which starts the download.
    let full = {
        let (client, url, data, digest) = (client.clone(), url.clone(), data.clone(), layer.digest.clone());
        tokio::spawn(async move { get_blob_ok(&client, &url, &data, &digest).await })
    };

    // Wait until the agent's origin download for the blob has started.
    poll_until(
        "the agent's origin GET for the blob",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let seen = !blob_gets().is_empty();
            async move { Ok(seen.then_some(())) }
        },
    )
    .await
    .unwrap();

    // Everyone else, concurrently, while the download is in flight. Each task returns
    // the instant it sent its request.
    let mut tasks = tokio::task::JoinSet::new();
    for (range, expect) in range_cases(layer.size) {
        let (client, url, data) = (client.clone(), url.clone(), data.clone());
        tasks.spawn(async move {
            let sent = Instant::now();
            check_range(client, url, range, expect, &data).await;
            sent
        });
    }
    {
        let (client, url, data, digest) = (client.clone(), url.clone(), data.clone(), layer.digest.clone());
        tasks.spawn(async move {
            let sent = Instant::now();
            get_blob_ok(&client, &url, &data, &digest).await;
            sent
        });
    }
    let mut sent_times = Vec::new();
    while let Some(res) = tasks.join_next().await {
        match res {
            Ok(sent) => sent_times.push(sent),
            Err(e) => {
                eprintln!("--- agent log ---\n{}", agent.log_tail());
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    full.await.unwrap();

    // Every request was sent while the origin download was still running.
    let gets = proxy.finished_gets(&blob_path, Duration::from_secs(10)).await.unwrap();
    let download_end = gets
        .iter()
        .map(|r| r.finished.expect("all origin requests finished once the clients have their bytes"))
        .max()
        .unwrap();
    for sent in &sent_times {
        assert!(
            *sent < download_end,
            "a request was sent {:?} after the origin download ended; not an in-flight test",
            sent.duration_since(download_end)
        );
    }
    // One download: each byte left the origin once.
    poll_until("origin access log entries", Duration::from_secs(5), Duration::from_millis(50), || {
        let done = origin.access_log().blob_gets_for(&layer.digest) >= gets.len();
        async move { Ok(done.then_some(())) }
    })
    .await
    .unwrap();
    assert_eq!(
        origin.access_log().blob_get_bytes_for(&layer.digest),
        layer.size,
        "bytes the origin sent for the blob ({} GETs): concurrent requests must share one download",
        gets.len()
    );
}

/// Many concurrent requests for one cold digest make one origin GET. The origin is slowed
/// (2 MiB/s through a proxy, 1.5 s for the blob) and every request must have been sent
/// before the agent's origin download ended: requests served one after another (the later
/// ones from the cache) would pass the byte count without single flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_make_one_origin_get() {
    let (origin, proxy, agent) = slow_blob_origin().await;
    let image = origin
        .push(&ImageSpec::new(ImageKind::DockerManifest, "mirror/herd", "v1").layers(&[3 << 20]))
        .await
        .unwrap();
    let layer = image.largest_layer().clone();
    let data = std::sync::Arc::new(layer.read().unwrap());
    let url = agent_url(&agent, &origin.host(), &format!("/v2/mirror/herd/blobs/{}", layer.digest));
    let client = http_client();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (client, url, data, digest) = (client.clone(), url.clone(), data.clone(), layer.digest.clone());
        tasks.spawn(async move {
            let sent = Instant::now();
            get_blob_ok(&client, &url, &data, &digest).await;
            sent
        });
    }
    let mut sent_times = Vec::new();
    while let Some(res) = tasks.join_next().await {
        sent_times.push(res.unwrap());
    }
    let blob_path = format!("/blobs/{}", layer.digest);
    let gets = proxy.finished_gets(&blob_path, Duration::from_secs(10)).await.unwrap();
    let download_end = gets.iter().filter_map(|r| r.finished).max().expect("an origin GET for the blob");
    for sent in &sent_times {
        assert!(
            *sent < download_end,
            "a request was sent {:?} after the origin download ended: not concurrent",
            sent.duration_since(download_end)
        );
    }
    poll_until("origin access log entries", Duration::from_secs(5), Duration::from_millis(50), || {
        let done = origin.access_log().blob_gets_for(&layer.digest) >= gets.len();
        async move { Ok(done.then_some(())) }
    })
    .await
    .unwrap();
    assert_eq!(
        origin.access_log().blob_get_bytes_for(&layer.digest),
        layer.size,
        "bytes the origin sent for the blob: 8 concurrent requests must share one download"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Error codes
// ---------------------------------------------------------------------------------------

/// Checks status and, for non-HEAD requests, the OCI error body shape and code.
async fn expect_error(client: &Client, method: &str, url: &str, status: u16, codes: &[&str]) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = client.request(m, url);
    if method == "PUT" || method == "POST" || method == "PATCH" {
        req = req.header("Content-Type", "application/octet-stream").body(b"{}".to_vec());
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let got = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body);
    assert_eq!(got, StatusCode::from_u16(status).unwrap(), "{method} {url}: body {text}");
    if method == "HEAD" {
        return;
    }
    let json: Value = serde_json::from_slice(&body)
        .unwrap_or_else(|e| panic!("{method} {url}: error body is not JSON ({e}): {text}"));
    let errors =
        json["errors"].as_array().unwrap_or_else(|| panic!("{method} {url}: no `errors` array: {text}"));
    assert!(!errors.is_empty(), "{method} {url}: empty `errors`");
    let first = &errors[0];
    let code = first["code"].as_str().unwrap_or_else(|| panic!("{method} {url}: no code: {text}"));
    assert!(codes.contains(&code), "{method} {url}: code {code}, expected one of {codes:?}");
    assert!(first["message"].is_string(), "{method} {url}: `message` must be a string: {text}");
    assert!(first.get("detail").is_some(), "{method} {url}: `detail` missing: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_codes() {
    let env = Env::start().await;
    let image = env.push(ImageKind::OciManifest, "errors/app", None).await;
    let mark = env.origin.access_log().len();
    let layer = image.largest_layer().digest.clone();
    let manifest = image.manifest.digest.clone();
    let unknown = unknown_digest();
    let c = &env.client;

    // Base endpoint.
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let resp = c.request(method.clone(), env.url("/v2/")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{method} /v2/");
        assert_eq!(
            header(&resp, "docker-distribution-api-version").as_deref(),
            Some("registry/2.0"),
            "{method} /v2/"
        );
    }

    let long_tag = "t".repeat(129);
    let hex63 = &digest_hex(&unknown)[..63];
    let upper = digest_hex(&unknown).to_uppercase();
    #[rustfmt::skip]
    let cases: Vec<(&str, String, u16, &[&str])> = vec![
        // Push, delete, uploads: a pull-only mirror.
        ("POST", "/v2/errors/app/blobs/uploads/".into(), 405, &["UNSUPPORTED"]),
        ("PATCH", "/v2/errors/app/blobs/uploads/3f1c".into(), 405, &["UNSUPPORTED"]),
        ("PUT", format!("/v2/errors/app/blobs/uploads/3f1c?digest={layer}"), 405, &["UNSUPPORTED"]),
        ("PUT", "/v2/errors/app/manifests/v2".into(), 405, &["UNSUPPORTED"]),
        ("DELETE", format!("/v2/errors/app/manifests/{manifest}"), 405, &["UNSUPPORTED"]),
        ("DELETE", format!("/v2/errors/app/blobs/{layer}"), 405, &["UNSUPPORTED"]),
        ("POST", "/v2/".into(), 405, &["UNSUPPORTED"]),
        // Invalid repository names.
        ("GET", "/v2/UPPER/manifests/x".into(), 400, &["NAME_INVALID"]),
        ("GET", "/v2/errors/App/manifests/v1".into(), 400, &["NAME_INVALID"]),
        ("GET", "/v2/errors/-app/manifests/v1".into(), 400, &["NAME_INVALID"]),
        ("GET", format!("/v2/errors/APP/blobs/{layer}"), 400, &["NAME_INVALID"]),
        ("HEAD", "/v2/UPPER/manifests/x".into(), 400, &[]),
        // References that cannot be tags name manifests that cannot exist: 404, as the OCI
        // conformance suite (`.INVALID_MANIFEST_NAME`) and docker-registry answer.
        ("GET", "/v2/errors/app/manifests/.INVALID_MANIFEST_NAME".into(), 404, &["MANIFEST_UNKNOWN"]),
        ("HEAD", "/v2/errors/app/manifests/.INVALID_MANIFEST_NAME".into(), 404, &[]),
        ("GET", "/v2/errors/app/manifests/-v1".into(), 404, &["MANIFEST_UNKNOWN"]),
        ("GET", "/v2/errors/app/manifests/.v1".into(), 404, &["MANIFEST_UNKNOWN"]),
        ("GET", format!("/v2/errors/app/manifests/{long_tag}"), 404, &["MANIFEST_UNKNOWN"]),
        // Malformed digests.
        ("GET", "/v2/errors/app/blobs/sha256:zz".into(), 400, &["DIGEST_INVALID"]),
        ("GET", "/v2/errors/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e".into(), 400, &["DIGEST_INVALID"]),
        ("GET", format!("/v2/errors/app/blobs/sha256:{hex63}"), 400, &["DIGEST_INVALID"]),
        ("GET", format!("/v2/errors/app/blobs/sha256:{upper}"), 400, &["DIGEST_INVALID"]),
        ("GET", "/v2/errors/app/blobs/latest".into(), 400, &["DIGEST_INVALID"]),
        ("GET", "/v2/errors/app/manifests/sha256:zz".into(), 400, &["DIGEST_INVALID"]),
        ("HEAD", "/v2/errors/app/manifests/sha256:zz".into(), 400, &[]),
        ("HEAD", "/v2/errors/app/blobs/sha256:zz".into(), 400, &[]),
        // Unknown content.
        ("GET", format!("/v2/errors/app/blobs/{unknown}"), 404, &["BLOB_UNKNOWN"]),
        ("HEAD", format!("/v2/errors/app/blobs/{unknown}"), 404, &[]),
        ("GET", "/v2/errors/app/manifests/no-such-tag".into(), 404, &["MANIFEST_UNKNOWN"]),
        ("HEAD", "/v2/errors/app/manifests/no-such-tag".into(), 404, &[]),
        ("GET", format!("/v2/errors/app/manifests/{unknown}"), 404, &["MANIFEST_UNKNOWN"]),
        ("GET", "/v2/errors/nosuchrepo/manifests/v1".into(), 404, &["MANIFEST_UNKNOWN", "NAME_UNKNOWN"]),
    ];
    for (method, path, status, codes) in &cases {
        expect_error(c, method, &env.url(path), *status, codes).await;
    }

    // Requests the agent rejects never reach the origin.
    let log = env.origin.access_log_since(mark);
    for e in &log {
        assert!(e.method == "GET" || e.method == "HEAD", "a {} reached the origin: {e:?}", e.method);
        for bad in [
            "UPPER",
            "App",
            "-app",
            "APP",
            "sha256:zz",
            "md5:",
            "-v1",
            ".v1",
            ".INVALID_MANIFEST_NAME",
            hex63,
        ] {
            assert!(
                !e.path.ends_with(bad) && !e.path.contains(&format!("/{bad}/")),
                "an invalid request reached the origin: {e:?}"
            );
        }
        assert!(!e.path.contains(&long_tag) && !e.path.contains(&upper), "{e:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 6. An origin that lies
// ---------------------------------------------------------------------------------------

/// The proxy flips one byte in the middle of blob bodies. The client's download must not
/// complete with those bytes, nothing is cached, and once the origin is honest again the
/// blob is fetched again from it and served correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_origin_is_not_trusted() {
    let origin = Origin::start().await.unwrap();
    let lie = ProxyConfig {
        // Early in every blob response, so Range pieces of any size >= 100 KB are hit too.
        corrupt_body_offset: Some(100_005),
        path_contains: Some("/blobs/".into()),
        method: Some("GET".into()),
        ..Default::default()
    };
    let proxy = FaultyProxy::in_front_of(&origin, lie).await.unwrap();
    let agent = Agent::start(AgentOptions::new().upstream(&origin.host(), &proxy.url())).await.unwrap();
    let image = origin
        .push(&ImageSpec::new(ImageKind::OciManifest, "mirror/liar", "v1").layers(&[3 << 20]))
        .await
        .unwrap();
    let layer = image.largest_layer().clone();
    let data = layer.read().unwrap();
    let url = agent_url(&agent, &origin.host(), &format!("/v2/mirror/liar/blobs/{}", layer.digest));
    let client = http_client();

    match client.get(&url).send().await {
        Err(e) => eprintln!("lying origin: request failed before a response: {e}"),
        Ok(resp) if !resp.status().is_success() => {
            eprintln!("lying origin: agent answered {}", resp.status())
        }
        Ok(resp) => match read_body(resp).await {
            Body::Cut { received, error } => {
                eprintln!("lying origin: body cut after {received} bytes: {error}")
            }
            Body::Complete(body) => {
                let served = digest_of(&body);
                assert!(
                    body.len() < data.len() || served == layer.digest,
                    "the agent served {} bytes as a complete response for {} although the \
                     origin's bytes do not match the digest (served digest {served})",
                    body.len(),
                    layer.digest,
                );
                eprintln!("lying origin: complete response of {} bytes, digest {served}", body.len());
            }
        },
    }
    assert!(
        proxy.requests().iter().any(|r| r.corrupted),
        "the proxy never corrupted a response; the test did not test anything"
    );
    let lies_seen = origin.access_log().blob_gets_for(&layer.digest);
    assert!(lies_seen >= 1);

    // The origin turns honest: the blob is fetched again (nothing was cached) and correct.
    proxy.set_config(ProxyConfig::default());
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.expect("honest body");
    assert_eq!(body.len(), data.len());
    assert!(body.as_ref() == data.as_slice(), "bytes differ after the origin turned honest");
    let after = origin.access_log().blob_gets_for(&layer.digest);
    assert!(
        after > lies_seen,
        "no new origin GET after the lie: the agent kept something from the corrupt download"
    );
    assert!(
        proxy.requests().iter().any(|r| r.path.contains(&layer.digest) && r.method == "GET" && !r.faulty),
        "the correct bytes did not come from an honest origin fetch"
    );

    // Now it is cached: no further origin GET.
    get_blob_ok(&client, &url, &data, &layer.digest).await;
    assert_eq!(origin.access_log().blob_gets_for(&layer.digest), after);
}

// ---------------------------------------------------------------------------------------
// 7. The origin goes away
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_down_serves_last_known_tag_and_cached_content() {
    let mut env = Env::start().await;
    let image = env.push(ImageKind::OciManifest, "mirror/stale", None).await;
    let layer = image.largest_layer().clone();
    let data = layer.read().unwrap();
    let tag_url = env.url("/v2/mirror/stale/manifests/v1");
    let blob_url = env.url(&format!("/v2/mirror/stale/blobs/{}", layer.digest));
    let c = env.client.clone();

    // While the origin is up: the tag resolves fresh, content gets cached.
    let resp = c.get(&tag_url).header("Accept", MANIFEST_ACCEPT).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-shoal-stale"), None);
    assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(image.manifest.digest.as_str()));
    assert_eq!(resp.bytes().await.unwrap().as_ref(), image.manifest.bytes.as_slice());
    get_blob_ok(&c, &blob_url, &data, &layer.digest).await;

    env.origin.stop();

    for method in [reqwest::Method::HEAD, reqwest::Method::GET] {
        let resp =
            c.request(method.clone(), &tag_url).header("Accept", MANIFEST_ACCEPT).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{method} tag with the origin down");
        assert_eq!(
            header(&resp, "x-shoal-stale").as_deref(),
            Some("origin unreachable"),
            "{method} tag with the origin down"
        );
        assert_eq!(header(&resp, "docker-content-digest").as_deref(), Some(image.manifest.digest.as_str()));
        assert_eq!(header(&resp, "content-type").as_deref(), Some(image.manifest.media_type.as_str()));
        if method == reqwest::Method::GET {
            assert_eq!(resp.bytes().await.unwrap().as_ref(), image.manifest.bytes.as_slice());
        }
    }
    // Cached content by digest.
    let resp = c
        .get(env.url(&format!("/v2/mirror/stale/manifests/{}", image.manifest.digest)))
        .header("Accept", MANIFEST_ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().as_ref(), image.manifest.bytes.as_slice());
    get_blob_ok(&c, &blob_url, &data, &layer.digest).await;

    // Unknown things fail, promptly.
    for (method, path) in [
        ("GET", format!("/v2/mirror/stale/blobs/{}", unknown_digest())),
        ("HEAD", "/v2/mirror/stale/manifests/never-pushed".to_string()),
    ] {
        let start = Instant::now();
        let resp = c
            .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), env.url(&path))
            .timeout(Duration::from_secs(20))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path} with the origin down: {e}"));
        assert!(!resp.status().is_success(), "{method} {path} with the origin down: {}", resp.status());
        let took = start.elapsed();
        assert!(took < Duration::from_secs(15), "{method} {path} took {took:?}");
    }

    // Back up: fresh again.
    env.origin.restart().await.unwrap();
    let resp = c.head(&tag_url).header("Accept", MANIFEST_ACCEPT).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-shoal-stale"), None, "stale header with the origin back");
}

// ---------------------------------------------------------------------------------------
// 8. Eviction
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_evicts_least_recently_used() {
    const MAX: u64 = 3 << 20;
    let env = Env::start_with(|o| o.cache_max_bytes("3MiB")).await;
    let image = env.push(ImageKind::OciManifest, "mirror/evict", Some(&[1 << 20; 6])).await;
    let layers: Vec<_> = image.layers().cloned().collect();
    for layer in &layers {
        let url = env.url(&format!("/v2/mirror/evict/blobs/{}", layer.digest));
        get_blob_ok(&env.client, &url, &layer.read().unwrap(), &layer.digest).await;
    }

    let env_ref = &env;
    let polled = poll_until(
        "evictions > 0 and shoal_cache_bytes <= 3 MiB",
        Duration::from_secs(10),
        Duration::from_millis(100),
        move || async move {
            let samples = env_ref.agent.metrics().await?;
            let ev = shoal_tests::metrics::sum(&samples, "shoal_cache_evictions_total", &[]);
            let bytes = shoal_tests::metrics::sum(&samples, "shoal_cache_bytes", &[]);
            Ok(match (ev, bytes) {
                (Some(e), Some(b)) if e > 0.0 && b <= MAX as f64 => Some((e, b)),
                _ => None,
            })
        },
    )
    .await;
    let (evictions, cache_bytes) = match polled {
        Ok(v) => v,
        Err(e) => {
            let text = env.agent.metrics_text().await.unwrap_or_default();
            panic!("{e:#}\n--- /metrics ---\n{text}")
        }
    };
    eprintln!("evictions {evictions}, cache bytes {cache_bytes}");

    // The first (least recently used) layer was evicted: fetched again, correctly.
    let first = &layers[0];
    assert_eq!(env.origin.access_log().blob_get_bytes_for(&first.digest), first.size);
    let url = env.url(&format!("/v2/mirror/evict/blobs/{}", first.digest));
    get_blob_ok(&env.client, &url, &first.read().unwrap(), &first.digest).await;
    assert_eq!(
        env.origin.access_log().blob_get_bytes_for(&first.digest),
        2 * first.size,
        "the least recently used blob should have been evicted and fetched again (once)"
    );
    let bytes = env.metric("shoal_cache_bytes", &[]).await;
    assert!(bytes <= MAX as f64, "shoal_cache_bytes {bytes} > {MAX}");
}

// ---------------------------------------------------------------------------------------
// 9. Command line failures
// ---------------------------------------------------------------------------------------

fn run_args(listen: &str, metrics: &str, cache: &std::path::Path) -> Vec<String> {
    vec![
        "run".into(),
        "--listen".into(),
        listen.into(),
        "--metrics-listen".into(),
        metrics.into(),
        "--cache-dir".into(),
        cache.display().to_string(),
        "--upstream".into(),
        format!("127.0.0.1:{0}=http://127.0.0.1:{0}", shoal_tests::free_port()),
    ]
}

fn free_addr() -> String {
    format!("127.0.0.1:{}", shoal_tests::free_port())
}

/// Runs the agent with `args`; it must exit non-zero within 10 s, and its stderr must
/// contain, for each group in `mentions`, at least one of the group's strings.
async fn expect_cli_failure(args: Vec<String>, what: &str, mentions: &[&[&str]]) {
    let out = run_agent_expecting_exit(&args, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert!(!out.success(), "{what}: the agent exited successfully\n{out}");
    let lower = out.stderr.to_lowercase();
    for group in mentions {
        assert!(
            group.iter().any(|m| lower.contains(&m.to_lowercase())),
            "{what}: stderr should mention one of {group:?}\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rejects_bad_configuration() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");

    // Unparsable byte size.
    let mut args = run_args(&free_addr(), &free_addr(), &cache);
    args.extend(["--cache-max-bytes".into(), "lots".into()]);
    expect_cli_failure(args, "--cache-max-bytes lots", &[&["lots"], &["cache-max-bytes", "cache max bytes"]])
        .await;

    // Cache dir below a regular file.
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let bad_cache = file.join("cache");
    expect_cli_failure(
        run_args(&free_addr(), &free_addr(), &bad_cache),
        "cache dir under a regular file",
        &[&[&file.display().to_string()]],
    )
    .await;

    // Registry port already in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let port = taken.local_addr().unwrap().port().to_string();
    expect_cli_failure(
        run_args(&taken_addr, &free_addr(), &tmp.path().join("c2")),
        "--listen on a port in use",
        &[&[&port], &["in use", "listen", "bind"]],
    )
    .await;

    // Metrics port already in use.
    expect_cli_failure(
        run_args(&free_addr(), &taken_addr, &tmp.path().join("c3")),
        "--metrics-listen on a port in use",
        &[&[&port], &["in use", "listen", "bind"]],
    )
    .await;

    // P2P port already in use (libp2p alone would share it through SO_REUSEPORT).
    let mut args = run_args(&free_addr(), &free_addr(), &tmp.path().join("c4"));
    args.extend(["--p2p-listen".into(), format!("/ip4/127.0.0.1/tcp/{port}")]);
    expect_cli_failure(args, "--p2p-listen on a port in use", &[&[&port], &["in use", "listen"]]).await;
    drop(taken);
}

// ---------------------------------------------------------------------------------------
// 10. Restart keeps the cache
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_cached_blobs_without_origin() {
    let cache = tempfile::tempdir().unwrap();
    let mut env = Env::start_with(|o| o.cache_dir(cache.path())).await;
    let image = env.push(ImageKind::OciIndex, "mirror/restart", None).await;

    let hosts_tmp = tempfile::tempdir().unwrap();
    let hosts = hosts_tmp.path().to_path_buf();
    let ctd = Containerd::start().await.unwrap();
    write_hosts_toml(&hosts, &env.origin.host(), Some(&env.agent.url()), &dead_url()).unwrap();
    ctd.fetch(&image.reference(), &hosts, &[]).await.unwrap();
    drop(ctd);

    env.agent.restart().await.expect("restart agent with the same cache dir");
    let mark = env.origin.access_log().len();

    // The index was rebuilt from disk before any request.
    let cached = env.metric("shoal_cache_bytes", &[]).await;
    assert!(
        cached >= image.total_blob_bytes() as f64,
        "after restart shoal_cache_bytes = {cached}, image blobs = {}",
        image.total_blob_bytes()
    );

    // Every digest is served from the cache.
    for digest in image.all_digests() {
        let route = if image.manifests().any(|m| m.digest == digest) { "manifests" } else { "blobs" };
        let resp = env
            .client
            .get(env.url(&format!("/v2/mirror/restart/{route}/{digest}")))
            .header("Accept", MANIFEST_ACCEPT)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{digest}");
        let body = resp.bytes().await.unwrap();
        assert!(
            body.as_ref() == image.content_of(&digest).unwrap().as_slice(),
            "{digest} differs after restart"
        );
    }
    // And a fresh containerd pulls the image through the restarted agent.
    let ctd = Containerd::start().await.unwrap();
    ctd.fetch(&image.reference(), &hosts, &[]).await.unwrap();
    ctd.verify_image(&image).await.unwrap();

    let log = env.origin.access_log_since(mark);
    assert_no_direct_containerd_requests(&log);
    assert_eq!(log.blob_gets(), 0, "origin blob GETs after restart: {log:#?}");
    assert_eq!(log.manifest_gets(), 0, "origin manifest GETs after restart: {log:#?}");
}

// ---------------------------------------------------------------------------------------
// Metrics and health endpoints
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_endpoints() {
    let env = Env::start().await;
    let image = env.push(ImageKind::DockerManifest, "mirror/metrics", Some(&[700_001])).await;
    let layer = image.largest_layer().clone();
    let c = &env.client;
    for path in ["/healthz", "/readyz"] {
        let resp = c.get(format!("{}{path}", env.agent.metrics_url())).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    let resp = c.get(env.url("/v2/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let url = env.url(&format!("/v2/mirror/metrics/blobs/{}", layer.digest));
    get_blob_ok(c, &url, &layer.read().unwrap(), &layer.digest).await;
    get_blob_ok(c, &url, &layer.read().unwrap(), &layer.digest).await;

    let text = env.agent.metrics_text().await.unwrap();
    for name in [
        "shoal_registry_requests_total",
        "shoal_served_bytes_total",
        "shoal_origin_requests_total",
        "shoal_origin_bytes_total",
        "shoal_cache_bytes",
        "shoal_cache_evictions_total",
        "shoal_corrupt_blobs_total",
    ] {
        assert!(text.lines().any(|l| l.starts_with(name)), "/metrics has no sample for {name}:\n{text}");
    }
    let base = env.metric("shoal_registry_requests_total", &[("route", "base"), ("method", "GET")]).await;
    assert!(base >= 1.0, "base route requests: {base}");
    let blob_gets = env
        .metric("shoal_registry_requests_total", &[("route", "blob"), ("method", "GET"), ("status", "200")])
        .await;
    assert!(blob_gets >= 2.0, "blob GETs: {blob_gets}");
    let size = layer.size as f64;
    let from_origin = env.metric("shoal_served_bytes_total", &[("source", "origin")]).await;
    let from_cache = env.metric("shoal_served_bytes_total", &[("source", "cache")]).await;
    assert!(
        from_origin + from_cache >= 2.0 * size,
        "served origin {from_origin} + cache {from_cache} < 2 x {size}"
    );
    assert!(from_cache >= size, "the second GET must be served from cache: {from_cache}");
    let origin_bytes = env.metric("shoal_origin_bytes_total", &[]).await;
    assert!(origin_bytes >= size, "origin bytes {origin_bytes} < {size}");
    assert!(origin_bytes < 2.0 * size, "origin bytes {origin_bytes}: the blob came from the origin twice");
    let origin_reqs = env.metric("shoal_origin_requests_total", &[]).await;
    assert!(origin_reqs >= 1.0, "origin requests {origin_reqs}");
    let cache_bytes = env.metric("shoal_cache_bytes", &[]).await;
    assert!(cache_bytes >= size, "cache bytes {cache_bytes} < {size}");
}

/// A digest that no peer and not the origin has is a 404 at once: the origin's HEAD runs
/// while the agent waits for the provider records of nodes that started at the same moment
/// (the settle delay, 500 ms), not after. Five sequential requests that each waited would
/// take at least 2.5 s; each answered at once takes a few milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_nobody_has_is_a_404_without_the_settle_wait() {
    let env = Env::start().await;
    env.push(ImageKind::OciManifest, "errors/fast404", None).await;
    let settle = Duration::from_millis(500);
    let started = Instant::now();
    for _ in 0..5 {
        let resp = env
            .client
            .get(env.url(&format!("/v2/errors/fast404/blobs/{}", unknown_digest())))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
    }
    let took = started.elapsed();
    assert!(
        took < 5 * settle,
        "5 unknown digests took {took:?}: each waited the settle delay before its 404"
    );
    eprintln!("5 unknown digests: {took:?}");
}
