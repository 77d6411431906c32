//! Upstream authentication against a real registry: distribution with htpasswd (HTTP Basic).
//! The bearer-token flow is covered by the agent's `origin` unit tests against an in-process
//! token server (distribution's token auth needs a signing CA and a token service).

use std::time::Duration;

use base64::Engine as _;
use shoal_tests::{
    dead_url, http_client, write_hosts_toml, Agent, AgentOptions, Containerd, ImageKind, ImageSpec, Origin,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_origin_needs_the_credentials_file() {
    let open = Origin::start().await.expect("start origin");
    let image = open.push(&ImageSpec::new(ImageKind::OciManifest, "auth/app", "v1")).await.expect("push");
    let locked = open.locked_view("shoal", "s3cret pass").await.expect("start locked registry");

    // Without credentials the agent is refused, and says so with a 404 (containerd then falls
    // back to the origin with its own credentials).
    let anonymous = Agent::start(AgentOptions::new().upstream(&locked.host(), &locked.url())).await.unwrap();
    let url = format!("{}/v2/auth/app/manifests/v1?ns={}", anonymous.url(), locked.host());
    let resp = http_client().get(&url).timeout(Duration::from_secs(20)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("Basic") || message.contains("refused"), "{message}");

    // With a Docker config.json holding the credentials, containerd pulls through the agent.
    let dir = tempfile::tempdir().unwrap();
    let auth_file = dir.path().join("config.json");
    let encoded = base64::engine::general_purpose::STANDARD.encode("shoal:s3cret pass");
    std::fs::write(&auth_file, format!(r#"{{"auths":{{"{}":{{"auth":"{encoded}"}}}}}}"#, locked.host()))
        .unwrap();
    let agent = Agent::start(
        AgentOptions::new().upstream(&locked.host(), &locked.url()).registry_auth_file(&auth_file),
    )
    .await
    .unwrap();
    let ctd = Containerd::start().await.expect("start containerd");
    let hosts = ctd.scratch_dir("hosts").unwrap();
    // The image's registry is the locked one; its own server is dead, so only the agent can serve.
    let reference = image.reference().replace(&open.host(), &locked.host());
    write_hosts_toml(&hosts, &locked.host(), Some(&agent.url()), &dead_url()).unwrap();
    ctd.fetch(&reference, &hosts, &[]).await.expect("ctr content fetch through the agent");
    ctd.verify_image(&image).await.expect("fetched content");

    // The locked registry saw the challenge and then authorised requests.
    let log = locked.access_log();
    assert!(log.iter().any(|e| e.status == 401), "no 401 challenge: {log:#?}");
    assert!(log.iter().any(|e| e.status == 200 && e.path.contains("/blobs/")), "{log:#?}");
}
