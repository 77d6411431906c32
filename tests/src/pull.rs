//! Pulls over HTTP the way a registry client does, and what they cost the origin.

use std::time::Duration;

use futures_util::future::join_all;
use sha2::{Digest as _, Sha256};

use crate::{http_client, Agent, Image, Origin, MANIFEST_ACCEPT};

/// `<agent>/v2/<repo>/<kind>/<reference>?ns=<origin>`
pub fn url(agent: &Agent, origin: &Origin, repo: &str, kind: &str, reference: &str) -> String {
    format!("{}/v2/{repo}/{kind}/{reference}?ns={}", agent.url(), origin.host().replace(':', "%3A"))
}

/// Pulls `image` through `agent` over HTTP like a client would: resolve the tag, then every
/// manifest and blob by digest, all blobs at once. Checks every body's sha256.
pub async fn pull(agent: &Agent, origin: &Origin, image: &Image) -> Result<(), String> {
    let client = http_client();
    let tag = url(agent, origin, &image.repo, "manifests", &image.tag);
    let resp = client.head(&tag).header("accept", MANIFEST_ACCEPT).send().await.map_err(|e| e.to_string())?;
    if resp.status() != 200 {
        return Err(format!("HEAD {tag}: {}", resp.status()));
    }
    let mut urls: Vec<(String, String)> = image
        .manifests()
        .map(|m| (url(agent, origin, &image.repo, "manifests", &m.digest), m.digest.clone()))
        .collect();
    urls.extend(
        image.blobs.iter().map(|b| (url(agent, origin, &image.repo, "blobs", &b.digest), b.digest.clone())),
    );
    let results = join_all(urls.into_iter().map(|(u, digest)| {
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

