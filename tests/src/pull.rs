//! Pulls over HTTP the way a registry client does, and what they cost the origin.

use std::time::Duration;

use futures_util::future::join_all;
use sha2::{Digest as _, Sha256};

use crate::{http_client, Agent, Image, Origin, MANIFEST_ACCEPT};

/// `<agent>/v2/<repo>/<kind>/<reference>?ns=<origin>`
pub fn url(agent: &Agent, origin: &Origin, repo: &str, kind: &str, reference: &str) -> String {
    ns_url(agent, &origin.host(), &format!("/v2/{repo}/{kind}/{reference}"))
}

/// `<agent><path>?ns=<registry>` (`&ns=` if `path` has a query), URL-encoded like
/// containerd does (`127.0.0.1%3A5555`).
pub fn ns_url(agent: &Agent, registry: &str, path: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{}{path}{sep}ns={}", agent.url(), registry.replace(':', "%3A"))
}

/// Pulls `image` through `agent` over HTTP like a client would: resolve the tag, then every
/// manifest and blob by digest (of every platform), all blobs at once. Checks every body's
/// sha256.
pub async fn pull(agent: &Agent, origin: &Origin, image: &Image) -> Result<(), String> {
    let mut wanted: Vec<(&str, String)> =
        image.manifests().map(|m| ("manifests", m.digest.clone())).collect();
    wanted.extend(image.blobs.iter().map(|b| ("blobs", b.digest.clone())));
    get_all(agent, origin, image, wanted).await
}

/// Pulls what a node of `platform` (e.g. `linux/amd64`) pulls: the tag, the top manifest,
/// the platform's manifest when the image is an index, and that manifest's config and layers.
pub async fn pull_platform(
    agent: &Agent,
    origin: &Origin,
    image: &Image,
    platform: &str,
) -> Result<(), String> {
    let mut wanted: Vec<(&str, String)> = Vec::new();
    let mut manifest = None;
    for m in image.manifests() {
        if m.platform.is_none() || m.platform.as_deref() == Some(platform) {
            wanted.push(("manifests", m.digest.clone()));
        }
        if m.platform.as_deref() == Some(platform) || (m.platform.is_none() && !image.kind.is_list()) {
            manifest = Some(m);
        }
    }
    let manifest = manifest.ok_or_else(|| format!("the image has no manifest for {platform}"))?;
    let doc: serde_json::Value = serde_json::from_slice(&manifest.bytes).map_err(|e| e.to_string())?;
    let descriptors = doc["layers"].as_array().into_iter().flatten().chain(std::iter::once(&doc["config"]));
    for d in descriptors {
        let digest = d["digest"].as_str().ok_or("a descriptor without a digest")?;
        wanted.push(("blobs", digest.to_string()));
    }
    get_all(agent, origin, image, wanted).await
}

/// HEADs the tag, then GETs every `(kind, digest)` at once and checks each body's sha256.
async fn get_all(
    agent: &Agent,
    origin: &Origin,
    image: &Image,
    wanted: Vec<(&str, String)>,
) -> Result<(), String> {
    let client = http_client();
    let tag = url(agent, origin, &image.repo, "manifests", &image.tag);
    let resp = client.head(&tag).header("accept", MANIFEST_ACCEPT).send().await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("HEAD {tag}: {}", resp.status()));
    }
    let urls =
        wanted.into_iter().map(|(kind, digest)| (url(agent, origin, &image.repo, kind, &digest), digest));
    let results = join_all(urls.map(|(u, digest)| {
        let client = client.clone();
        async move {
            let mut resp = client
                .get(&u)
                .header("accept", MANIFEST_ACCEPT)
                .timeout(Duration::from_secs(240))
                .send()
                .await
                .map_err(|e| format!("GET {u}: {e}"))?;
            if resp.status() != 200 {
                return Err(format!("GET {u}: {}", resp.status()));
            }
            let mut hasher = Sha256::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| format!("GET {u}: body: {e}"))? {
                hasher.update(&chunk);
            }
            let got = format!("sha256:{}", hex::encode(hasher.finalize()));
            if got != digest {
                return Err(format!("GET {u}: body digest {got}"));
            }
            Ok(())
        }
    }))
    .await;
    results.into_iter().collect()
}

/// Content GETs (blobs, manifests by digest) in the origin's access log since `mark`.
pub fn content_gets(origin: &Origin, mark: usize) -> Vec<String> {
    origin
        .access_log_since(mark)
        .into_iter()
        .filter(|e| {
            e.method == "GET" && (e.is_blob() || (e.is_manifest() && e.reference().starts_with("sha256:")))
        })
        .map(|e| format!("{} {} {}", e.method, e.path, e.bytes))
        .collect()
}

/// One GET of a blob through `agent`: `Ok(true)` if the body was complete with the right
/// digest, `Ok(false)` if it was cut or wrong, `Err` for a status other than 200.
pub async fn get_blob(agent: &Agent, origin: &Origin, image: &Image, digest: &str) -> Result<bool, String> {
    let u = url(agent, origin, &image.repo, "blobs", digest);
    let mut resp = http_client()
        .get(&u)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| format!("GET {u}: {e}"))?;
    if resp.status() != 200 {
        return Err(format!("GET {u}: {}", resp.status()));
    }
    let mut hasher = Sha256::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => hasher.update(&c),
            Ok(None) => break,
            Err(_) => return Ok(false),
        }
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())) == digest)
}
