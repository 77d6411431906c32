//! Asking the origin on behalf of a client: "may this client (or anyone) read this object?"
//!
//! [`Origin::check_access`] sends a `HEAD` for one object of one repository, either with no
//! credentials at all (never the node's: the question is whether the origin serves it
//! anonymously) or with the `Authorization` value the client sent us. It follows one
//! challenge the way containerd does: for a Bearer challenge it fetches a token from the
//! realm (anonymously, or with the client's Basic credentials) and retries. The answer keeps
//! the origin's first challenge, so the registry API can pass it on to the client.
//!
//! A client credential the origin accepted for a repository can be lent to the origin client
//! ([`Origin::lend`]) for a bounded time: when the node has no credentials of its own for
//! that registry, downloads for that repository use it. Only content that is then served
//! after the same check is fetched with it.

use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use reqwest::StatusCode;

use super::auth::{self, Challenge, TokenResponse};
use super::{
    error_chain, header_str, read_limited, Kind, Origin, OriginError, Resolved, SMALL_REQUEST_TIMEOUT,
};
use crate::metrics::METRICS;
use shoal_protocol::types::{Digest, Registry, RepoName};

/// Whose request an access check is.
#[derive(Clone, Copy, Debug)]
pub enum As<'a> {
    /// Nobody: no credentials (anonymous tokens only).
    Anonymous,
    /// The client's own `Authorization` header value.
    Client(&'a str),
}

/// What the origin said.
#[derive(Debug)]
pub struct AccessAnswer {
    /// The final status (after one challenge was followed).
    pub status: StatusCode,
    /// The origin's first `WWW-Authenticate` challenge, if it sent one.
    pub challenge: Option<Challenge>,
    /// Digest, type and size when a 2xx answer carried them (a tag resolves with this).
    pub resolved: Option<Resolved>,
    /// The `Authorization` value that was accepted (the client's, or the token its Basic
    /// credentials were exchanged for).
    pub authorization: Option<String>,
    /// When that token expires, if the token endpoint said so.
    pub token_expires: Option<Instant>,
}

/// Bound on lent credentials (registries × repositories); the map is cleared when full.
const MAX_LENT: usize = 4096;

impl Origin {
    /// A `HEAD` for `reference` (a tag or digest) in `repo`, as `who`.
    pub async fn check_access(
        &self,
        registry: &Registry,
        repo: &RepoName,
        kind: Kind,
        reference: &str,
        accept: &str,
        who: As<'_>,
    ) -> Result<AccessAnswer, OriginError> {
        let url = self.url(registry, repo, kind, reference);
        let scope = format!("repository:{repo}:pull");
        let metric = match kind {
            Kind::Manifest => "manifest_head",
            Kind::Blob => "blob_head",
        };
        let mut authorization = match who {
            As::Anonymous => {
                shoal_protocol::sync::lock(&self.anonymous_tokens).get(
                    registry.as_str(),
                    &scope,
                    Instant::now(),
                )
            }
            .map(|t| format!("Bearer {t}")),
            As::Client(value) => Some(value.to_string()),
        };
        let mut first_challenge = None;
        let mut token_expires = None;
        for attempt in 0..2 {
            let mut req = self.http.head(&url).header(ACCEPT, accept).timeout(SMALL_REQUEST_TIMEOUT);
            if let Some(value) = &authorization {
                req = req.header(AUTHORIZATION, value);
            }
            let resp = req.send().await.map_err(|e| {
                METRICS.request(metric, 0);
                OriginError::Unreachable(format!("{registry}: {}", error_chain(&e)))
            })?;
            let status = resp.status();
            METRICS.request(metric, status.as_u16());
            if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                return Err(OriginError::Unreachable(format!("{registry}: {repo}@{reference}: {status}")));
            }
            let challenge =
                header_str(resp.headers(), WWW_AUTHENTICATE.as_str()).and_then(|h| auth::parse_challenge(&h));
            if first_challenge.is_none() {
                first_challenge = challenge.clone();
            }
            let answer = |status| AccessAnswer {
                status,
                challenge: first_challenge.clone(),
                resolved: None,
                authorization: None,
                token_expires: None,
            };
            if status.is_success() {
                let h = resp.headers();
                let digest = header_str(h, "docker-content-digest").and_then(|d| d.parse::<Digest>().ok());
                let media_type = header_str(h, CONTENT_TYPE.as_str());
                let size = header_str(h, CONTENT_LENGTH.as_str()).and_then(|s| s.parse::<u64>().ok());
                let resolved = match (digest, media_type, size) {
                    (Some(digest), Some(media_type), Some(size)) => {
                        Some(Resolved { digest, media_type, size })
                    }
                    _ => None,
                };
                let authorization = match who {
                    As::Anonymous => None,
                    As::Client(_) => authorization,
                };
                return Ok(AccessAnswer { resolved, authorization, token_expires, ..answer(status) });
            }
            if status != StatusCode::UNAUTHORIZED || attempt == 1 {
                return Ok(answer(status));
            }
            // One challenge is followed, as containerd would: a Bearer realm is asked for a
            // token (anonymously, or with the client's Basic credentials). A client that sent a
            // token, or Basic to a Basic origin, has had its answer.
            let Some(Challenge::Bearer { realm, service, .. }) = challenge else { return Ok(answer(status)) };
            let basic = match who {
                As::Anonymous => None,
                As::Client(value) if value.len() > 6 && value[..6].eq_ignore_ascii_case("basic ") => {
                    Some(value)
                }
                As::Client(_) => return Ok(answer(status)),
            };
            let Some((token, expires)) = self.client_token(&realm, service.as_deref(), &scope, basic).await?
            else {
                return Ok(answer(status));
            };
            if basic.is_none() {
                let lifetime = expires.saturating_duration_since(Instant::now());
                shoal_protocol::sync::lock(&self.anonymous_tokens).put(
                    registry.as_str(),
                    &scope,
                    token.clone(),
                    lifetime,
                    Instant::now(),
                );
            }
            token_expires = Some(expires);
            authorization = Some(format!("Bearer {token}"));
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// A token from `realm` for `scope`; `None` when the endpoint refuses the credentials.
    async fn client_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        basic: Option<&str>,
    ) -> Result<Option<(String, Instant)>, OriginError> {
        let mut query: Vec<(&str, &str)> = vec![("scope", scope)];
        if let Some(service) = service {
            query.push(("service", service));
        }
        let mut req = self.http.get(realm).query(&query).timeout(SMALL_REQUEST_TIMEOUT);
        if let Some(basic) = basic {
            req = req.header(AUTHORIZATION, basic);
        }
        let resp = req.send().await.map_err(|e| {
            METRICS.request("token", 0);
            OriginError::Unreachable(format!("token endpoint {realm}: {}", error_chain(&e)))
        })?;
        let status = resp.status();
        METRICS.request("token", status.as_u16());
        if status.is_server_error() {
            return Err(OriginError::Unreachable(format!("token endpoint {realm} answered {status}")));
        }
        if !status.is_success() {
            return Ok(None);
        }
        let body = read_limited(resp, 1 << 20).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| OriginError::Protocol(format!("token endpoint {realm}: {e}")))?;
        let Some(token) = parsed.token.or(parsed.access_token).filter(|t| !t.is_empty()) else {
            return Err(OriginError::Protocol(format!("token endpoint {realm} returned no token")));
        };
        let lifetime = parsed.expires_in.map(Duration::from_secs).unwrap_or(auth::DEFAULT_TOKEN_LIFETIME);
        Ok(Some((token, Instant::now() + lifetime)))
    }

    /// Lets downloads for `repo` use `authorization` until `until`, when the node has no
    /// credentials of its own for `registry`.
    pub fn lend(&self, registry: &Registry, repo: &RepoName, authorization: String, until: Instant) {
        if self.credentials.get(registry.as_str()).is_some() {
            return;
        }
        let mut lent = shoal_protocol::sync::lock(&self.lent);
        if lent.len() >= MAX_LENT {
            let now = Instant::now();
            lent.retain(|_, (_, until)| *until > now);
            if lent.len() >= MAX_LENT {
                lent.clear();
            }
        }
        lent.insert((registry.clone(), repo.clone()), (authorization, until));
    }

    /// A lent client credential for `repo`, while it is valid.
    pub(super) fn lent_authorization(&self, registry: &Registry, repo: &RepoName) -> Option<String> {
        let lent = shoal_protocol::sync::lock(&self.lent);
        let (value, until) = lent.get(&(registry.clone(), repo.clone()))?;
        (*until > Instant::now()).then(|| value.clone())
    }
}
