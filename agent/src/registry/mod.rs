//! The OCI distribution API, pull side: `/v2/`, manifests by tag or digest, blobs by digest,
//! with `Range`. Everything else answers 405 `UNSUPPORTED`.
//!
//! Repository names contain slashes, so routing is done by hand in [`parse_route`] rather
//! than with path patterns. Which registry a request is for comes from containerd's
//! `?ns=<registry>`, else a host as the first path component (`/v2/ghcr.io/org/app/...`, how
//! CRI-O and podman address a mirror with a path), else `--default-registry`.
//!
//! Tags are resolved at the origin on every request ([`Origin::resolve_tag`]); the last known
//! answer is used only while the origin is unreachable, marked by the [`STALE_HEADER`]. A tag
//! this agent never resolved is then answered from the newest mapping a swarm peer saw at the
//! origin within `--public-attestation-window` (see `access::attest`), marked the same way and
//! with [`PUBLIC_HEADER`] `attested`. [`Api`] is also what this agent attests to peers
//! ([`Attest`]).
//! Digests are served by [`Fetcher`]: the store, or the one download in flight.
//!
//! Before any content is served, [`Access`] decides whether this client may read it (see
//! `access`): registries not on the list get 404 at once, private content needs credentials
//! the origin accepts. Client-facing error messages name no internal address and carry no
//! error chain; the log has the details.

pub mod error;
mod limit;
#[cfg(test)]
mod proptests;
mod range;

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::StreamExt;
use lru::LruCache;
use tokio::net::TcpListener;

use crate::access::{Access, Attest, Grant, Identity, PublicBasis, Refusal};
use crate::fetch::{BlobStream, FetchError, Fetcher, Lookup, Source};
use crate::metrics::{RequestLabels, METRICS};
use crate::origin::{Kind, Origin, OriginError, Resolved, MANIFEST_MEDIA_TYPES};
use crate::store::ReadError;
use crate::types::{Digest, ParseError, Reference, Registry, RepoName, Tag};
use error::{ApiError, Code};
pub use limit::RequestLimit;

/// Response header on a tag answered from the last known digest (origin unreachable).
pub const STALE_HEADER: &str = "x-shoal-stale";
/// Response header on content served, while the origin is unreachable, as public on a basis
/// other than the agent's own check: `configured` (`--public`) or `attested` (a swarm peer saw
/// it public).
pub const PUBLIC_HEADER: &str = "x-shoal-public";
/// How many tag→digest answers are remembered for when the origin is unreachable.
const TAG_MEMORY: usize = 16_384;

/// A tag of a repository of a registry.
type TagKey = (Registry, RepoName, Tag);

/// Shared state of the registry API.
pub struct Api {
    fetcher: Arc<Fetcher>,
    origin: Arc<Origin>,
    default_registry: Registry,
    access: Arc<Access>,
    /// The origin's last answer for each tag, and when it was given.
    last_known_tags: Mutex<LruCache<TagKey, (Resolved, std::time::Instant)>>,
}

impl Attest for Api {
    fn public_seen(
        &self,
        registry: &Registry,
        repo: &RepoName,
        digest: &Digest,
    ) -> Option<std::time::Duration> {
        self.access.public_age(registry, repo, &digest.to_string())
    }

    fn tag_seen(
        &self,
        registry: &Registry,
        repo: &RepoName,
        tag: &Tag,
    ) -> Option<(Resolved, std::time::Duration)> {
        self.access.public_age(registry, repo, tag.as_str())?;
        let key = (registry.clone(), repo.clone(), tag.clone());
        let (resolved, at) = crate::sync::lock(&self.last_known_tags).peek(&key).cloned()?;
        Some((resolved, at.elapsed()))
    }
}

impl Api {
    pub fn new(
        fetcher: Arc<Fetcher>,
        origin: Arc<Origin>,
        default_registry: Registry,
        access: Arc<Access>,
    ) -> Arc<Self> {
        Arc::new(Api {
            fetcher,
            origin,
            default_registry,
            access,
            last_known_tags: Mutex::new(LruCache::new(NonZeroUsize::new(TAG_MEMORY).expect("non-zero"))),
        })
    }
}

/// Serves the registry API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    api: Arc<Api>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(api)).with_graceful_shutdown(shutdown).await
}

/// Serves the registry API with at most `limit` requests in flight (see [`limit`]).
pub async fn serve_limited(
    listener: TcpListener,
    api: Arc<Api>,
    limit: Arc<RequestLimit>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(api).layer(axum::middleware::from_fn_with_state(limit, limit::limit));
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new().fallback(handle).with_state(api)
}

/// What a path addresses.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Base,
    Manifest {
        name: &'a str,
        reference: &'a str,
    },
    Blob {
        name: &'a str,
        digest: &'a str,
    },
    /// Uploads, tags list, catalog, referrers, anything else.
    Other,
}

fn parse_route(path: &str) -> Route<'_> {
    let Some(rest) = path.strip_prefix("/v2") else { return Route::Other };
    if rest.is_empty() || rest == "/" {
        return Route::Base;
    }
    let Some(rest) = rest.strip_prefix('/') else { return Route::Other };
    if rest.contains("/blobs/uploads") {
        return Route::Other;
    }
    if let Some(i) = rest.rfind("/manifests/") {
        return Route::Manifest { name: &rest[..i], reference: &rest[i + "/manifests/".len()..] };
    }
    if let Some(i) = rest.rfind("/blobs/") {
        return Route::Blob { name: &rest[..i], digest: &rest[i + "/blobs/".len()..] };
    }
    Route::Other
}

fn route_label(route: &Route<'_>) -> &'static str {
    match route {
        Route::Base => "base",
        Route::Manifest { .. } => "manifest",
        Route::Blob { .. } => "blob",
        Route::Other => "other",
    }
}

async fn handle(State(api): State<Arc<Api>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = percent_decode(uri.path());
    let route = parse_route(&path);
    let label = route_label(&route);
    let mut resp = match dispatch(&api, &method, &uri, &headers, route).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    };
    resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    let status = resp.status().as_u16();
    METRICS
        .registry_requests
        .get_or_create(&RequestLabels { route: label, method: method.as_str().to_string(), status })
        .inc();
    tracing::debug!(%method, path = %uri.path(), status, "registry request");
    resp
}

async fn dispatch(
    api: &Arc<Api>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    route: Route<'_>,
) -> Result<Response, ApiError> {
    let readonly = method == Method::GET || method == Method::HEAD;
    let who = api.access.identity(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
    match route {
        Route::Base if readonly => {
            Ok((StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], "{}").into_response())
        }
        Route::Manifest { name, reference } if readonly => {
            let (registry, repo) = api.select(name, query_param(uri, "ns").as_deref())?;
            let reference = parse_reference(reference)?;
            api.manifest(method, headers, registry, repo, reference, &who).await
        }
        Route::Blob { name, digest } if readonly => {
            let (registry, repo) = api.select(name, query_param(uri, "ns").as_deref())?;
            let digest: Digest = digest.parse()?;
            let grant = api.authorize(&registry, &repo, Kind::Blob, &digest.to_string(), "", &who).await?;
            let source = Source { registry, repo, kind: Kind::Blob, accept: String::new() };
            let resp = api.content(method, headers, digest, source, None).await?;
            Ok(mark_public(resp, grant.public))
        }
        Route::Base | Route::Manifest { .. } | Route::Blob { .. } => {
            Err(ApiError::unsupported(&format!("{method} {}", uri.path())))
        }
        Route::Other => Err(ApiError::unsupported(&format!("{method} {}", uri.path()))),
    }
}

/// Adds [`PUBLIC_HEADER`] to a response whose grant says why it is served as public.
fn mark_public(mut resp: Response, public: Option<PublicBasis>) -> Response {
    if let Some(basis) = public {
        resp.headers_mut().insert(PUBLIC_HEADER, HeaderValue::from_static(basis.as_str()));
    }
    resp
}

/// A manifest reference. A malformed digest is the client's mistake (400 `DIGEST_INVALID`), but
/// a string that cannot be a tag names a manifest that cannot exist: the distribution spec's
/// conformance suite (`.INVALID_MANIFEST_NAME`) and docker-registry answer 404, so we answer
/// 404 `MANIFEST_UNKNOWN` without asking the origin.
fn parse_reference(reference: &str) -> Result<Reference, ApiError> {
    reference.parse().map_err(|e| match e {
        ParseError::Tag(_) => ApiError::new(StatusCode::NOT_FOUND, Code::ManifestUnknown, e.to_string())
            .with_detail(serde_json::json!({ "Tag": reference })),
        other => other.into(),
    })
}

impl Api {
    /// Which registry and repository a request is for.
    fn select(&self, name: &str, ns: Option<&str>) -> Result<(Registry, RepoName), ApiError> {
        let (registry, repo) = match ns {
            Some(ns) => (ns.parse::<Registry>()?, name),
            None => match name.split_once('/') {
                Some((first, rest)) if Registry::looks_like_host(first) => (first.parse::<Registry>()?, rest),
                _ => (self.default_registry.clone(), name),
            },
        };
        if !self.access.allows_registry(&registry) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                Code::NameUnknown,
                format!("registry {registry} is not mirrored here"),
            ));
        }
        let mut repo: RepoName = repo.parse()?;
        // Docker Hub's official images live under library/.
        if registry.as_str() == "docker.io" && !repo.as_str().contains('/') {
            repo = format!("library/{repo}").parse()?;
        }
        Ok((registry, repo))
    }

    async fn manifest(
        &self,
        method: &Method,
        headers: &HeaderMap,
        registry: Registry,
        repo: RepoName,
        reference: Reference,
        who: &Identity,
    ) -> Result<Response, ApiError> {
        let accept = accept_union(headers);
        let tag = match reference {
            Reference::Digest(digest) => {
                let all = with_manifest_types(&accept);
                let grant =
                    self.authorize(&registry, &repo, Kind::Manifest, &digest.to_string(), &all, who).await?;
                let source = Source { registry, repo, kind: Kind::Manifest, accept: all };
                if method == Method::GET {
                    self.grant_references(&digest, &source, who, &grant).await;
                }
                let resp = self.content(method, headers, digest, source, None).await?;
                return Ok(mark_public(resp, grant.public));
            }
            Reference::Tag(tag) => tag,
        };
        // A client that names no type, or accepts anything, gets whatever the tag is.
        let forward_accept = if accept.is_empty() || accept.split(", ").any(|t| t == "*/*") {
            with_manifest_types(&accept)
        } else {
            accept.clone()
        };
        let key = (registry.clone(), repo.clone(), tag.clone());
        let grant =
            self.authorize(&registry, &repo, Kind::Manifest, tag.as_str(), &forward_accept, who).await?;
        // The access check's HEAD usually resolved the tag already; during an outage, a swarm
        // peer's last observation may have (never remembered here as the origin's answer).
        let (resolved, stale) = match (grant.resolved.clone(), grant.public) {
            (Some(resolved), Some(PublicBasis::Attested)) => {
                tracing::warn!(%registry, %repo, %tag, digest = %resolved.digest,
                    "origin unreachable: answering the tag with the newest digest a swarm peer saw");
                METRICS.stale_tags_served.inc();
                (resolved, true)
            }
            (resolved, _) => self.resolve_tag(&key, resolved, &forward_accept).await?,
        };
        let mut resp = if method == Method::HEAD {
            content_headers(
                StatusCode::OK,
                &resolved.digest,
                &resolved.media_type,
                resolved.size,
                None,
                Body::empty(),
            )
        } else {
            let source =
                Source { registry, repo, kind: Kind::Manifest, accept: with_manifest_types(&accept) };
            self.access.grant(&source.registry, &source.repo, who, [resolved.digest.to_string()], &grant);
            self.grant_references(&resolved.digest, &source, who, &grant).await;
            self.content(method, headers, resolved.digest, source, Some(&resolved.media_type)).await?
        };
        if stale {
            resp.headers_mut().insert(STALE_HEADER, HeaderValue::from_static("origin unreachable"));
        }
        Ok(mark_public(resp, grant.public))
    }

    /// A tag's digest: what the access check resolved, else the origin's answer now, else
    /// (origin unreachable) the last known one, marked stale (`true`).
    async fn resolve_tag(
        &self,
        key: &TagKey,
        resolved: Option<Resolved>,
        accept: &str,
    ) -> Result<(Resolved, bool), ApiError> {
        let (registry, repo, tag) = key;
        let checked = match resolved {
            Some(resolved) => Ok((resolved, None)),
            None => self.origin.resolve_tag(registry, repo, tag, accept).await,
        };
        match checked {
            Ok((resolved, body)) => {
                if let Some(body) = body {
                    if let Err(e) =
                        self.fetcher.store_verified(&resolved.digest, &body, &resolved.media_type).await
                    {
                        tracing::warn!(digest = %resolved.digest, error = %e, "could not store manifest");
                    }
                }
                let now = std::time::Instant::now();
                crate::sync::lock(&self.last_known_tags).put(key.clone(), (resolved.clone(), now));
                Ok((resolved, false))
            }
            Err(OriginError::Unreachable(why)) => {
                let known = crate::sync::lock(&self.last_known_tags).get(key).cloned();
                match known {
                    Some((resolved, _)) => {
                        tracing::warn!(%registry, %repo, %tag, digest = %resolved.digest, %why,
                            "origin unreachable: answering the tag with its last known digest");
                        METRICS.stale_tags_served.inc();
                        Ok((resolved, true))
                    }
                    None => Err(origin_error(Code::ManifestUnknown, &OriginError::Unreachable(why))),
                }
            }
            Err(e) => Err(origin_error(Code::ManifestUnknown, &e)),
        }
    }

    /// Whether `who` may read `reference` of `repo` (see `access`), as an API error if not.
    async fn authorize(
        &self,
        registry: &Registry,
        repo: &RepoName,
        kind: Kind,
        reference: &str,
        accept: &str,
        who: &Identity,
    ) -> Result<Grant, ApiError> {
        let unknown = if kind == Kind::Manifest { Code::ManifestUnknown } else { Code::BlobUnknown };
        self.access.check(&self.origin, registry, repo, kind, reference, accept, who).await.map_err(
            |refusal| match refusal {
                Refusal::Challenge(challenge) => {
                    let mut e = ApiError::new(
                        StatusCode::UNAUTHORIZED,
                        Code::Unauthorized,
                        "authentication required: the origin does not serve this repository anonymously",
                    );
                    if let Ok(value) = HeaderValue::from_str(&challenge) {
                        e.headers.push((header::WWW_AUTHENTICATE, value));
                    }
                    e
                }
                Refusal::Denied => ApiError::new(
                    StatusCode::FORBIDDEN,
                    Code::Denied,
                    "the origin does not accept these credentials for this repository",
                ),
                Refusal::NotFound => ApiError::new(StatusCode::NOT_FOUND, unknown, "not found at the origin"),
                Refusal::Unreachable => ApiError::new(
                    StatusCode::NOT_FOUND,
                    unknown,
                    "the origin is unreachable, and this content is not known to be public",
                ),
            },
        )
    }

    /// Lets `who` read what the manifest `digest` references, for as long as it may read the
    /// manifest. Waits for the manifest (small) to be stored; failures are left to serving.
    async fn grant_references(&self, digest: &Digest, source: &Source, who: &Identity, grant: &Grant) {
        if grant.checked.is_none() {
            return;
        }
        for _ in 0..2 {
            match self.fetcher.lookup(digest, source) {
                Lookup::Cached(entry, guard) => {
                    let size = entry.size.min(crate::origin::MAX_MANIFEST_BYTES);
                    if let Ok(bytes) = self.fetcher.store().read_verified(guard, size).await {
                        let refs = crate::access::referenced_digests(&bytes);
                        self.access.grant(&source.registry, &source.repo, who, refs, grant);
                    }
                    return;
                }
                Lookup::Downloading(dl) => {
                    if dl.finished().await.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Serves content by digest: from the store, or by joining (or starting) its download.
    async fn content(
        &self,
        method: &Method,
        headers: &HeaderMap,
        digest: Digest,
        source: Source,
        media_type_hint: Option<&str>,
    ) -> Result<Response, ApiError> {
        let unknown = if source.kind == Kind::Manifest { Code::ManifestUnknown } else { Code::BlobUnknown };
        let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
        // A few rounds: a download that completes between the lookup and opening its
        // partial file is then read from the store; a cached copy found damaged when opened
        // is downloaded again.
        for _ in 0..3 {
            let (size, stored_type, opened) = match self.fetcher.lookup(&digest, &source) {
                Lookup::Cached(entry, guard) => (entry.size, entry.media_type, Opened::Cached(guard)),
                Lookup::Downloading(dl) => {
                    let (total, stored_type) = dl.started().await.map_err(|e| fetch_error(unknown, &e))?;
                    if source.kind == Kind::Manifest && stored_type.is_none() && media_type_hint.is_none() {
                        // Only the finished manifest tells its type: wait (manifests are small).
                        dl.finished().await.map_err(|e| fetch_error(unknown, &e))?;
                        continue;
                    }
                    (total, stored_type, Opened::Downloading(dl))
                }
            };
            let media_type = media_type_for(source.kind, stored_type.as_deref(), media_type_hint);
            let (status, start, end, content_range) = range::resolve(range_header, size)?;
            let respond =
                |body| content_headers(status, &digest, &media_type, end - start, content_range, body);
            if method == Method::HEAD {
                return Ok(respond(Body::empty()));
            }
            let stream = match opened {
                Opened::Cached(guard) => {
                    match BlobStream::cached(self.fetcher.store(), guard, start, end).await {
                        Ok(stream) => stream,
                        // Its first piece was damaged (now quarantined) or the file is gone: the
                        // next lookup downloads it again, for this request already.
                        Err(e @ (ReadError::Corrupt { .. } | ReadError::Vanished { .. })) => {
                            tracing::warn!(%digest, error = %e, "cached copy unusable: downloading it again");
                            continue;
                        }
                        Err(e) => return Err(internal(format!("opening {digest}: {e}"))),
                    }
                }
                Opened::Downloading(dl) => {
                    match dl.stream(start, end).await.map_err(|e| fetch_error(unknown, &e))? {
                        Some(stream) => stream,
                        // Committed in the meantime: read it from the store.
                        None => continue,
                    }
                }
            };
            return Ok(respond(body(stream, digest)));
        }
        Err(internal(format!("{digest} vanished while being opened")))
    }
}

/// What a content request reads from.
enum Opened {
    Cached(crate::store::ReadGuard),
    Downloading(Arc<crate::fetch::Download>),
}

fn media_type_for(kind: Kind, stored: Option<&str>, hint: Option<&str>) -> String {
    match kind {
        Kind::Blob => "application/octet-stream".to_string(),
        Kind::Manifest => stored.or(hint).unwrap_or("application/vnd.oci.image.manifest.v1+json").to_string(),
    }
}

fn content_headers(
    status: StatusCode,
    digest: &Digest,
    media_type: &str,
    length: u64,
    content_range: Option<String>,
    body: Body,
) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert("docker-content-digest", HeaderValue::from_str(&digest.to_string()).expect("digest is ASCII"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(media_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, HeaderValue::from_str(&format!("\"{digest}\"")).expect("digest is ASCII"));
    if let Some(cr) = content_range {
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&cr).expect("content range is ASCII"));
    }
    resp
}

/// A response body from a blob stream, counted by source; an error cuts the response.
fn body(stream: BlobStream, digest: Digest) -> Body {
    let source = if stream.is_live() { "origin" } else { "cache" };
    Body::from_stream(stream.into_stream().inspect(move |item| match item {
        Ok(bytes) => METRICS.served(source, bytes.len() as u64),
        Err(e) => tracing::warn!(%digest, error = %e, "cutting the response off"),
    }))
}

fn origin_error(code: Code, e: &OriginError) -> ApiError {
    // 404 (not 5xx) so that containerd falls back to the next host, which is right for
    // every origin-side failure: the origin itself, with containerd's own credentials, may work.
    // The details (addresses, resolver and TLS errors) go to the log, not to the client.
    let message = match e {
        OriginError::NotFound(_) => "not found at the origin",
        OriginError::Denied(_) => "the origin refused access",
        OriginError::Unreachable(_) => "the origin is unreachable",
        OriginError::Protocol(_) => "the origin answered unexpectedly",
    };
    if !matches!(e, OriginError::NotFound(_)) {
        tracing::warn!(error = %e, "origin request failed");
    }
    ApiError::new(StatusCode::NOT_FOUND, code, message)
}

fn fetch_error(code: Code, e: &FetchError) -> ApiError {
    match e {
        FetchError::Origin(o) => origin_error(code, o),
        FetchError::DigestMismatch { .. } => ApiError::new(StatusCode::NOT_FOUND, code, e.to_string()),
        FetchError::NoSource(..) => {
            tracing::warn!(error = %e, "no source for a download");
            ApiError::new(
                StatusCode::NOT_FOUND,
                code,
                "no peer holds it and the origin cannot be asked for it",
            )
        }
        FetchError::Store(s) if s.is_no_space() => {
            // Said plainly to the client; containerd then tries its next host.
            ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                code,
                "the agent's cache directory is full: this blob does not fit",
            )
        }
        FetchError::Store(_) | FetchError::Read(_) => internal(e.to_string()),
        // containerd retries on 503 (another agent, or this one after its restart).
        FetchError::ShuttingDown => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, Code::Unknown, "the agent is shutting down")
        }
    }
}

fn internal(message: String) -> ApiError {
    tracing::error!(%message, "internal error");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, Code::Unknown, "internal error (see the agent's log)")
}

/// Every media type in every `Accept` header the client sent (clients send several lines),
/// deduplicated, in order.
fn accept_union(headers: &HeaderMap) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for value in headers.get_all(header::ACCEPT) {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if !seen.contains(&item) {
                seen.push(item);
            }
        }
    }
    seen.join(", ")
}

/// `accept` plus every manifest type: a GET by digest must return whatever the digest is.
fn with_manifest_types(accept: &str) -> String {
    let mut out = accept.to_string();
    for t in MANIFEST_MEDIA_TYPES {
        if !accept.contains(t) {
            if !out.is_empty() {
                out.push_str(", ");
            }
            out.push_str(t);
        }
    }
    out
}

fn query_param(uri: &Uri, name: &str) -> Option<String> {
    uri.query()?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(&v.replace('+', " ")))
}

/// Decodes `%XX` escapes; invalid escapes are kept as they are (and then fail validation).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(parse_route("/v2/"), Route::Base);
        assert_eq!(parse_route("/v2"), Route::Base);
        assert_eq!(
            parse_route("/v2/library/nginx/manifests/latest"),
            Route::Manifest { name: "library/nginx", reference: "latest" }
        );
        assert_eq!(
            parse_route("/v2/ghcr.io/a/b/blobs/sha256:00"),
            Route::Blob { name: "ghcr.io/a/b", digest: "sha256:00" }
        );
        // A repository may itself be called "manifests": the last one wins.
        assert_eq!(
            parse_route("/v2/x/manifests/manifests/v1"),
            Route::Manifest { name: "x/manifests", reference: "v1" }
        );
        assert_eq!(parse_route("/v2/x/blobs/uploads/"), Route::Other);
        assert_eq!(parse_route("/v2/_catalog"), Route::Other);
        assert_eq!(parse_route("/v2/x/tags/list"), Route::Other);
        assert_eq!(parse_route("/other"), Route::Other);
    }

    #[test]
    fn accept_headers_are_merged() {
        let mut h = HeaderMap::new();
        h.append(header::ACCEPT, HeaderValue::from_static("a/b, c/d"));
        h.append(header::ACCEPT, HeaderValue::from_static("c/d"));
        h.append(header::ACCEPT, HeaderValue::from_static("e/f"));
        assert_eq!(accept_union(&h), "a/b, c/d, e/f");
        let all = with_manifest_types("a/b");
        assert!(all.starts_with("a/b, ") && MANIFEST_MEDIA_TYPES.iter().all(|t| all.contains(t)));
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("sha256%3Aab"), "sha256:ab");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
