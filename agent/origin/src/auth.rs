//! Upstream registry authentication: the `WWW-Authenticate` challenge parser, credentials
//! from a Docker `config.json`, and the bearer-token cache.
//!
//! Flow (the Docker token protocol): a request without credentials gets `401` with
//! `WWW-Authenticate: Bearer realm="..",service="..",scope=".."`; we GET the realm with
//! `service` and `scope` (Basic-authenticated when we have credentials for the registry,
//! anonymous otherwise, as Docker Hub allows), cache the token per registry and scope until
//! shortly before it expires, and retry. Registries that answer `Basic realm=..` get the
//! credentials directly.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
    Basic,
}

/// Parses the first challenge we can use (Bearer or Basic) from a `WWW-Authenticate` value.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => {
            let params = parse_params(rest);
            Some(Challenge::Bearer {
                realm: params.get("realm")?.clone(),
                service: params.get("service").cloned(),
                scope: params.get("scope").cloned(),
            })
        }
        _ => None,
    }
}

/// `key="value", key=value` pairs; quoted values may contain commas (scopes do).
fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let value;
        if let Some(stripped) = rest.strip_prefix('"') {
            let mut end = None;
            let mut escaped = false;
            for (i, c) in stripped.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end.unwrap_or(stripped.len());
            value = stripped[..end].replace("\\\"", "\"");
            rest = stripped.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start().trim_start_matches(',').trim_start();
        out.insert(key, value);
    }
    out
}

/// A username and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

impl Credentials {
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    #[error("registry auth file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// Credentials by registry host, read from a Docker `config.json`
/// (`{"auths": {"<registry>": {"auth": base64("user:pass")}}}` or `username`/`password`).
#[derive(Debug, Default, Clone)]
pub struct CredentialStore(HashMap<String, Credentials>);

impl CredentialStore {
    pub fn load(path: &Path) -> Result<Self, AuthFileError> {
        let invalid = |message: String| AuthFileError::Invalid { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        Self::parse(&text).map_err(invalid)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        struct File {
            #[serde(default)]
            auths: HashMap<String, AuthEntry>,
        }
        #[derive(serde::Deserialize)]
        struct AuthEntry {
            auth: Option<String>,
            username: Option<String>,
            password: Option<String>,
        }
        let file: File = serde_json::from_str(text).map_err(|e| format!("not a Docker config.json: {e}"))?;
        let mut out = HashMap::new();
        for (key, entry) in file.auths {
            let creds = if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .map_err(|e| format!("auths[{key:?}].auth is not base64: {e}"))?;
                let decoded =
                    String::from_utf8(decoded).map_err(|_| format!("auths[{key:?}].auth is not UTF-8"))?;
                let (u, p) = decoded
                    .split_once(':')
                    .ok_or_else(|| format!("auths[{key:?}].auth is not base64(user:password)"))?;
                Credentials { username: u.to_string(), password: p.to_string() }
            } else if let (Some(username), Some(password)) = (entry.username, entry.password) {
                Credentials { username, password }
            } else {
                return Err(format!("auths[{key:?}] has neither auth nor username and password"));
            };
            out.insert(normalize_registry_key(&key), creds);
        }
        Ok(CredentialStore(out))
    }

    pub fn get(&self, registry: &str) -> Option<&Credentials> {
        self.0.get(registry)
    }
}

/// `https://index.docker.io/v1/` → `docker.io`, `ghcr.io/` → `ghcr.io`.
fn normalize_registry_key(key: &str) -> String {
    let host = key.trim();
    let host = host.strip_prefix("https://").or_else(|| host.strip_prefix("http://")).unwrap_or(host);
    let host = host.split('/').next().unwrap_or(host).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".to_string(),
        _ => host,
    }
}

/// Bearer tokens by (registry, scope), dropped shortly before they expire.
#[derive(Default)]
pub struct TokenCache(HashMap<(String, String), (String, Instant)>);

/// Tokens are treated as expired this long before the registry says, so a request never
/// starts with a token that dies in flight.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Docker's token spec: when `expires_in` is absent, assume 60 seconds.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Bound on cached tokens (registries × scopes); the cache is cleared when full.
const MAX_TOKENS: usize = 4096;

impl TokenCache {
    pub fn get(&self, registry: &str, scope: &str, now: Instant) -> Option<String> {
        let (token, expires) = self.0.get(&(registry.to_string(), scope.to_string()))?;
        (now + EXPIRY_MARGIN < *expires).then(|| token.clone())
    }

    pub fn put(&mut self, registry: &str, scope: &str, token: String, lifetime: Duration, now: Instant) {
        if self.0.len() >= MAX_TOKENS {
            self.0.retain(|_, (_, exp)| *exp > now);
            if self.0.len() >= MAX_TOKENS {
                self.0.clear();
            }
        }
        self.0.insert((registry.to_string(), scope.to_string()), (token, now + lifetime));
    }
}

/// The body of a token endpoint's answer.
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/nginx:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"bearer realm=https://x/token"#),
            Some(Challenge::Bearer { realm: "https://x/token".into(), service: None, scope: None })
        );
        assert_eq!(parse_challenge(r#"Basic realm="Registry Realm""#), Some(Challenge::Basic));
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge(""), None);
    }

    #[test]
    fn auth_file() {
        let text = r#"{"auths":{
            "https://index.docker.io/v1/":{"auth":"dXNlcjpwYTpzcw=="},
            "ghcr.io":{"username":"me","password":"secret"}}}"#;
        let store = CredentialStore::parse(text).unwrap();
        let d = store.get("docker.io").unwrap();
        assert_eq!((d.username.as_str(), d.password.as_str()), ("user", "pa:ss"));
        assert_eq!(store.get("ghcr.io").unwrap().username, "me");
        assert!(store.get("quay.io").is_none());
        assert!(!format!("{d:?}").contains("pa:ss"), "Debug must not print passwords");
        assert!(CredentialStore::parse("{").is_err());
        assert!(CredentialStore::parse(r#"{"auths":{"x":{"auth":"!!"}}}"#).is_err());
        assert!(CredentialStore::parse(r#"{"auths":{"x":{}}}"#).is_err());
    }

    #[test]
    fn tokens_expire_early() {
        let mut cache = TokenCache::default();
        let now = Instant::now();
        cache.put("r", "s", "t".into(), Duration::from_secs(60), now);
        assert_eq!(cache.get("r", "s", now).as_deref(), Some("t"));
        assert_eq!(cache.get("r", "other", now), None);
        assert_eq!(cache.get("r", "s", now + Duration::from_secs(55)), None);
    }
}
