//! The upstream (origin) registry client: tag resolution with HEAD, content GETs by digest
//! with `Range` for resuming, and authentication ([`auth`]).
//!
//! A crate of its own so the tracker uses the same client without linking the agent.
//!
//! Every request is counted in `shoal_origin_requests_total{kind,status}` ([`metrics`]). Errors are split
//! by what the caller does next: [`OriginError::NotFound`] is final (answer 404),
//! [`OriginError::Unreachable`] allows the last known tag and a retry, the rest are reported.

pub mod auth;
mod client_auth;
pub mod metrics;
mod upstreams;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::{
    HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, RANGE, WWW_AUTHENTICATE,
};
use reqwest::{RequestBuilder, Response, StatusCode};

use crate::metrics::METRICS;
use auth::{Challenge, CredentialStore, TokenCache, TokenResponse};
pub use client_auth::{AccessAnswer, As};
use shoal_protocol::types::{Digest, Registry, RepoName, Tag};
pub use upstreams::{default_upstreams, UpstreamError, Upstreams};

/// Manifests larger than this are refused (the OCI spec lets registries refuse over 4 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// How long to wait for a TCP connection to an origin.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on a whole small request (HEAD, manifest GET, token).
const SMALL_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on waiting for the next bytes of a body.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Manifest media types every request for a manifest accepts, so registries that negotiate
/// strictly (distribution returns 404 for an OCI manifest when OCI is not accepted) answer.
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("not found at the origin ({0})")]
    NotFound(String),
    #[error("the origin refused access ({0})")]
    Denied(String),
    #[error("the origin is unreachable ({0})")]
    Unreachable(String),
    #[error("the origin answered unexpectedly ({0})")]
    Protocol(String),
}

/// Which object a content request is for: the origin URL differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Blob,
}

impl Kind {
    fn path(self) -> &'static str {
        match self {
            Kind::Manifest => "manifests",
            Kind::Blob => "blobs",
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
        }
    }
}

/// What the origin says a tag points to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// An open content response: `body` starts at byte `offset` of an object of `total` bytes.
pub struct Content {
    pub total: u64,
    pub offset: u64,
    pub media_type: Option<String>,
    pub body: Response,
}

pub struct Origin {
    http: reqwest::Client,
    upstreams: Upstreams,
    credentials: CredentialStore,
    tokens: Mutex<TokenCache>,
    /// Registries that asked for Basic auth; we send credentials up front from then on.
    basic: Mutex<HashSet<Registry>>,
    /// Anonymous tokens for access checks, apart from the node's own tokens.
    anonymous_tokens: Mutex<TokenCache>,
    /// Client credentials the origin accepted, lent to downloads ([`Origin::lend`]).
    lent: Mutex<HashMap<(Registry, RepoName), (String, Instant)>>,
}

impl Origin {
    pub fn new(upstreams: Upstreams, credentials: CredentialStore) -> Result<Self, OriginError> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("shoal-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OriginError::Protocol(format!("building the HTTP client: {e}")))?;
        Ok(Origin {
            http,
            upstreams,
            credentials,
            tokens: Mutex::default(),
            basic: Mutex::default(),
            anonymous_tokens: Mutex::default(),
            lent: Mutex::default(),
        })
    }

    fn url(&self, registry: &Registry, repo: &RepoName, kind: Kind, reference: &str) -> String {
        format!("{}/v2/{repo}/{}/{reference}", self.upstreams.url(registry), kind.path())
    }

    /// Resolves a tag with HEAD (which registries do not count against pull rate limits),
    /// forwarding the client's `Accept` values. Falls back to GET when the HEAD answer has no
    /// digest; then the digest is computed from the body, which is returned too.
    pub async fn resolve_tag(
        &self,
        registry: &Registry,
        repo: &RepoName,
        tag: &Tag,
        accept: &str,
    ) -> Result<(Resolved, Option<bytes::Bytes>), OriginError> {
        let url = self.url(registry, repo, Kind::Manifest, tag.as_str());
        let resp = self
            .send(registry, repo, "manifest_head", |http| {
                http.head(&url).header(ACCEPT, accept).timeout(SMALL_REQUEST_TIMEOUT)
            })
            .await?;
        let resp = check_status(resp, &format!("{repo}:{tag}"))?;
        let headers = resp.headers();
        let media_type = header_str(headers, CONTENT_TYPE.as_str());
        let digest = header_str(headers, "docker-content-digest").and_then(|d| d.parse::<Digest>().ok());
        let size = header_str(headers, CONTENT_LENGTH.as_str()).and_then(|s| s.parse::<u64>().ok());
        if let (Some(digest), Some(media_type), Some(size)) = (digest, media_type.clone(), size) {
            return Ok((Resolved { digest, media_type, size }, None));
        }
        tracing::debug!(%registry, %repo, %tag, "origin HEAD lacks digest, type or size; falling back to GET");
        let resp = self
            .send(registry, repo, "manifest", |http| {
                http.get(&url).header(ACCEPT, accept).timeout(SMALL_REQUEST_TIMEOUT)
            })
            .await?;
        let resp = check_status(resp, &format!("{repo}:{tag}"))?;
        let media_type = header_str(resp.headers(), CONTENT_TYPE.as_str())
            .ok_or_else(|| OriginError::Protocol(format!("manifest {repo}:{tag} has no Content-Type")))?;
        let body = read_limited(resp, MAX_MANIFEST_BYTES).await?;
        METRICS.bytes.inc_by(body.len() as u64);
        let resolved = Resolved { digest: Digest::of(&body), media_type, size: body.len() as u64 };
        Ok((resolved, Some(body)))
    }

    /// The size and media type of `digest` at the origin (a HEAD: no content moves).
    pub async fn content_info(
        &self,
        registry: &Registry,
        repo: &RepoName,
        kind: Kind,
        digest: &Digest,
        accept: &str,
    ) -> Result<(u64, Option<String>), OriginError> {
        let url = self.url(registry, repo, kind, &digest.to_string());
        let metric = match kind {
            Kind::Manifest => "manifest_head",
            Kind::Blob => "blob_head",
        };
        let resp = self
            .send(registry, repo, metric, |http| {
                http.head(&url).header(ACCEPT, accept).timeout(SMALL_REQUEST_TIMEOUT)
            })
            .await?;
        let what = format!("{repo}@{digest}");
        let resp = check_status(resp, &what)?;
        let size = header_str(resp.headers(), CONTENT_LENGTH.as_str())
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| OriginError::Protocol(format!("{what}: HEAD without Content-Length")))?;
        if kind == Kind::Manifest && size > MAX_MANIFEST_BYTES {
            return Err(OriginError::Protocol(format!(
                "{what}: manifest of {size} bytes exceeds the 4 MiB limit"
            )));
        }
        Ok((size, header_str(resp.headers(), CONTENT_TYPE.as_str())))
    }

    /// Opens bytes `start..end` of `digest` (`end: None` for the rest); a `Range` request
    /// unless that is the whole object. An origin that ignores `Range` answers from 0, and
    /// `Content::offset` says so.
    pub async fn open_content(
        &self,
        registry: &Registry,
        repo: &RepoName,
        kind: Kind,
        digest: &Digest,
        (start, end): (u64, Option<u64>),
        accept: &str,
    ) -> Result<Content, OriginError> {
        let url = self.url(registry, repo, kind, &digest.to_string());
        let resp = self
            .send(registry, repo, kind.metric(), |http| {
                let mut req = http.get(&url);
                if kind == Kind::Manifest {
                    req = req.header(ACCEPT, accept).timeout(SMALL_REQUEST_TIMEOUT);
                }
                match end {
                    Some(end) => req = req.header(RANGE, format!("bytes={start}-{}", end.saturating_sub(1))),
                    None if start > 0 => req = req.header(RANGE, format!("bytes={start}-")),
                    None => {}
                }
                req
            })
            .await?;
        let what = format!("{repo}@{digest}");
        let resp = check_status(resp, &what)?;
        let headers = resp.headers();
        let media_type = header_str(headers, CONTENT_TYPE.as_str());
        let (start, total) = if resp.status() == StatusCode::PARTIAL_CONTENT {
            header_str(headers, CONTENT_RANGE.as_str())
                .and_then(|v| parse_content_range(&v))
                .ok_or_else(|| OriginError::Protocol(format!("{what}: 206 without a usable Content-Range")))?
        } else {
            let len = resp
                .content_length()
                .ok_or_else(|| OriginError::Protocol(format!("{what}: no Content-Length")))?;
            (0, len)
        };
        if kind == Kind::Manifest && total > MAX_MANIFEST_BYTES {
            return Err(OriginError::Protocol(format!(
                "{what}: manifest of {total} bytes exceeds the 4 MiB limit"
            )));
        }
        Ok(Content { total, offset: start, media_type, body: resp })
    }

    /// Sends a request built by `build`, authenticating once on a 401 challenge.
    async fn send(
        &self,
        registry: &Registry,
        repo: &RepoName,
        kind: &'static str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, OriginError> {
        let scope = format!("repository:{repo}:pull");
        // Without node credentials for the registry, a client's lent credential for the
        // repository goes first (an anonymous token would not open a private repository).
        let lent = match self.credentials.get(registry.as_str()) {
            None => self.lent_authorization(registry, repo),
            Some(_) => None,
        };
        let mut authorization = lent.or_else(|| self.cached_authorization(registry, &scope));
        for attempt in 0..2 {
            let mut req = build(&self.http);
            if let Some(value) = &authorization {
                req = req.header(AUTHORIZATION, value);
            }
            let resp = match req.send().await {
                Ok(resp) => resp,
                Err(e) => {
                    METRICS.request(kind, 0);
                    return Err(OriginError::Unreachable(format!("{registry}: {}", error_chain(&e))));
                }
            };
            METRICS.request(kind, resp.status().as_u16());
            if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                return Ok(resp);
            }
            let challenge = header_str(resp.headers(), WWW_AUTHENTICATE.as_str())
                .and_then(|h| auth::parse_challenge(&h))
                .ok_or_else(|| {
                    OriginError::Denied(format!("{registry}: 401 without a usable WWW-Authenticate"))
                })?;
            authorization = Some(self.authorize(registry, challenge, &scope).await?);
        }
        unreachable!("the loop returns on its second attempt")
    }

    fn cached_authorization(&self, registry: &Registry, scope: &str) -> Option<String> {
        if let Some(token) =
            shoal_protocol::sync::lock(&self.tokens).get(registry.as_str(), scope, Instant::now())
        {
            return Some(format!("Bearer {token}"));
        }
        if shoal_protocol::sync::lock(&self.basic).contains(registry) {
            return self.credentials.get(registry.as_str()).map(|c| c.basic_header());
        }
        None
    }

    async fn authorize(
        &self,
        registry: &Registry,
        challenge: Challenge,
        scope: &str,
    ) -> Result<String, OriginError> {
        let credentials = self.credentials.get(registry.as_str());
        match challenge {
            Challenge::Basic => {
                let creds = credentials.ok_or_else(|| {
                    OriginError::Denied(format!(
                        "{registry} asks for Basic auth and --registry-auth-file has no entry for it"
                    ))
                })?;
                shoal_protocol::sync::lock(&self.basic).insert(registry.clone());
                Ok(creds.basic_header())
            }
            Challenge::Bearer { realm, service, scope: challenge_scope } => {
                let token_scope = challenge_scope.unwrap_or_else(|| scope.to_string());
                let mut query: Vec<(&str, &str)> = vec![("scope", &token_scope)];
                if let Some(service) = &service {
                    query.push(("service", service));
                }
                let mut req = self.http.get(&realm).query(&query).timeout(SMALL_REQUEST_TIMEOUT);
                if let Some(creds) = credentials {
                    req = req.header(AUTHORIZATION, creds.basic_header());
                }
                let resp = req.send().await.map_err(|e| {
                    METRICS.request("token", 0);
                    OriginError::Unreachable(format!("token endpoint {realm}: {}", error_chain(&e)))
                })?;
                METRICS.request("token", resp.status().as_u16());
                if !resp.status().is_success() {
                    return Err(OriginError::Denied(format!(
                        "token endpoint {realm} answered {}",
                        resp.status()
                    )));
                }
                let body = read_limited(resp, 1 << 20).await?;
                let parsed: TokenResponse = serde_json::from_slice(&body)
                    .map_err(|e| OriginError::Protocol(format!("token endpoint {realm}: {e}")))?;
                let token =
                    parsed.token.or(parsed.access_token).filter(|t| !t.is_empty()).ok_or_else(|| {
                        OriginError::Protocol(format!("token endpoint {realm} returned no token"))
                    })?;
                let lifetime =
                    parsed.expires_in.map(Duration::from_secs).unwrap_or(auth::DEFAULT_TOKEN_LIFETIME);
                shoal_protocol::sync::lock(&self.tokens).put(
                    registry.as_str(),
                    scope,
                    token.clone(),
                    lifetime,
                    Instant::now(),
                );
                Ok(format!("Bearer {token}"))
            }
        }
    }
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name)?.to_str().ok().map(|s| s.trim().to_string())
}

/// Maps an origin status to the caller's next step.
fn check_status(resp: Response, what: &str) -> Result<Response, OriginError> {
    let status = resp.status();
    match status {
        s if s.is_success() => Ok(resp),
        StatusCode::NOT_FOUND => Err(OriginError::NotFound(what.to_string())),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            Err(OriginError::Denied(format!("{what}: {status}")))
        }
        s if s.is_server_error()
            || s == StatusCode::TOO_MANY_REQUESTS
            || s == StatusCode::REQUEST_TIMEOUT =>
        {
            Err(OriginError::Unreachable(format!("{what}: {status}")))
        }
        _ => Err(OriginError::Protocol(format!("{what}: {status}"))),
    }
}

/// Reads a whole body of at most `limit` bytes.
async fn read_limited(mut resp: Response, limit: u64) -> Result<bytes::Bytes, OriginError> {
    if resp.content_length().is_some_and(|n| n > limit) {
        return Err(OriginError::Protocol(format!("body over the {limit}-byte limit")));
    }
    let mut out = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| OriginError::Unreachable(error_chain(&e)))? {
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(OriginError::Protocol(format!("body over the {limit}-byte limit")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// `bytes 100-199/1000` → (100, 1000).
fn parse_content_range(v: &str) -> Option<(u64, u64)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()?))
}

/// An error with its sources, for logs and error details (reqwest hides the cause otherwise).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use axum::extract::State;
    use axum::http::HeaderMap as AxumHeaders;
    use axum::response::IntoResponse;

    struct Fake {
        addr: std::net::SocketAddr,
        token_requests: AtomicUsize,
        /// The Basic credentials the token endpoint demands, if any.
        token_basic: Option<String>,
    }

    const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    async fn token(State(fake): State<Arc<Fake>>, headers: AxumHeaders) -> axum::response::Response {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
        if fake.token_basic.is_some() && auth != fake.token_basic {
            return axum::http::StatusCode::UNAUTHORIZED.into_response();
        }
        let n = fake.token_requests.fetch_add(1, Ordering::SeqCst) + 1;
        format!(r#"{{"token":"tok-{n}","expires_in":300}}"#).into_response()
    }

    async fn manifest(State(fake): State<Arc<Fake>>, headers: AxumHeaders) -> axum::response::Response {
        let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        if !auth.starts_with("Bearer tok-") {
            let challenge = format!(
                r#"Bearer realm="http://{}/token",service="fake",scope="repository:lib/app:pull""#,
                fake.addr
            );
            return (axum::http::StatusCode::UNAUTHORIZED, [("www-authenticate", challenge)]).into_response();
        }
        (
            [
                ("docker-content-digest", DIGEST),
                ("content-type", "application/vnd.oci.image.manifest.v1+json"),
                ("content-length", "0"),
            ],
            "",
        )
            .into_response()
    }

    async fn start_fake(token_basic: Option<String>) -> Arc<Fake> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake =
            Arc::new(Fake { addr: listener.local_addr().unwrap(), token_requests: 0.into(), token_basic });
        let app = axum::Router::new()
            .route("/token", axum::routing::get(token))
            .route("/v2/lib/app/manifests/v1", axum::routing::get(manifest).head(manifest))
            .with_state(fake.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        fake
    }

    fn origin_for(fake: &Fake, credentials: CredentialStore) -> (Origin, Registry) {
        let mut upstreams = Upstreams::default();
        upstreams.insert_spec(&format!("reg.test=http://{}", fake.addr)).unwrap();
        (Origin::new(upstreams, credentials).unwrap(), "reg.test".parse().unwrap())
    }

    #[tokio::test]
    async fn anonymous_bearer_token_is_fetched_once_and_reused() {
        let fake = start_fake(None).await;
        let (origin, registry) = origin_for(&fake, CredentialStore::default());
        let (repo, tag) = ("lib/app".parse().unwrap(), "v1".parse().unwrap());
        for _ in 0..3 {
            let (resolved, body) = origin.resolve_tag(&registry, &repo, &tag, "*/*").await.unwrap();
            assert_eq!(resolved.digest.to_string(), DIGEST);
            assert!(body.is_none());
        }
        assert_eq!(fake.token_requests.load(Ordering::SeqCst), 1, "token cached across requests");
    }

    #[tokio::test]
    async fn token_endpoint_gets_the_configured_credentials() {
        let creds =
            CredentialStore::parse(r#"{"auths":{"reg.test":{"username":"u","password":"p"}}}"#).unwrap();
        let fake = start_fake(Some(creds.get("reg.test").unwrap().basic_header())).await;
        let (origin, registry) = origin_for(&fake, creds);
        let (repo, tag) = ("lib/app".parse().unwrap(), "v1".parse().unwrap());
        origin.resolve_tag(&registry, &repo, &tag, "*/*").await.unwrap();
        assert_eq!(fake.token_requests.load(Ordering::SeqCst), 1);

        // Without credentials the token endpoint refuses: a clear Denied, not a hang or panic.
        let (origin, registry) = origin_for(&fake, CredentialStore::default());
        let err = origin.resolve_tag(&registry, &repo, &tag, "*/*").await.unwrap_err();
        assert!(matches!(err, OriginError::Denied(_)), "{err}");
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("bytes 100-199/1000"), Some((100, 1000)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }
}
