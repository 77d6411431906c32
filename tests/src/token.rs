//! A Docker token service for distribution's `auth: token`, on loopback.
//!
//! distribution verifies each token's ES256 signature with the certificate in the token's
//! `x5c` header, which must chain to its `rootcertbundle`: here one self-signed certificate
//! (rcgen) is both. Tokens are signed with ring, which rcgen already uses.
//!
//! `GET /token?service=..&scope=repository:<name>:pull` with optional Basic credentials, as
//! containerd and the agent ask: wrong credentials get 401; anyone (also anonymous) gets pull
//! on the public repositories; a user gets pull on the repositories granted to them. Other
//! scopes and actions are left out of the token, as real token services do. `POST` (OAuth2)
//! answers 404, so containerd falls back to `GET`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

/// `service` and `issuer` of the test token service.
pub const SERVICE: &str = "shoal-test-registry";
pub const ISSUER: &str = "shoal-test-token-issuer";

/// Who may pull what.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    /// Repositories anyone may pull.
    pub public: HashSet<String>,
    /// user → (password, repositories they may pull).
    pub users: HashMap<String, (String, HashSet<String>)>,
}

impl Grants {
    pub fn public(mut self, repo: &str) -> Self {
        self.public.insert(repo.to_string());
        self
    }

    pub fn user(mut self, user: &str, password: &str, repos: &[&str]) -> Self {
        self.users
            .insert(user.to_string(), (password.to_string(), repos.iter().map(|r| r.to_string()).collect()));
        self
    }
}

struct Inner {
    grants: Grants,
    key: EcdsaKeyPair,
    cert_der: Vec<u8>,
    requests: AtomicUsize,
}

/// A running token service; stopped when dropped.
pub struct TokenServer {
    addr: SocketAddr,
    cert_pem: String,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenServer {
    pub async fn start(grants: Grants) -> Result<TokenServer> {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = rcgen::CertificateParams::new(vec!["shoal-test-token".to_string()])?;
        params.distinguished_name.push(rcgen::DnType::CommonName, "shoal-test-token");
        let cert = params.self_signed(&key_pair)?;
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key_pair.serialize_der(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| anyhow::anyhow!("loading the signing key: {e}"))?;
        let inner = Arc::new(Inner { grants, key, cert_der: cert.der().to_vec(), requests: 0.into() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .route("/token", axum::routing::get(token).post(|| async { StatusCode::NOT_FOUND }))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(TokenServer { addr, cert_pem: cert.pem(), inner, task })
    }

    /// The realm URL.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Token requests answered so far (any outcome).
    pub fn requests(&self) -> usize {
        self.inner.requests.load(Ordering::SeqCst)
    }

    /// distribution's `auth:` section for this service (`{dir}` is the registry's temp dir,
    /// where [`crate::Origin::token_view`] writes the certificate as `token.pem`).
    pub fn registry_auth_config(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    \
             rootcertbundle: {{dir}}/token.pem\n",
            self.realm()
        )
    }

    /// A token as `user` (or anonymous) for `scope`, straight from the service.
    pub async fn token(&self, basic: Option<(&str, &str)>, scope: &str) -> Result<String> {
        let mut req = crate::http_client().get(self.realm()).query(&[("service", SERVICE), ("scope", scope)]);
        if let Some((u, p)) = basic {
            req = req.basic_auth(u, Some(p));
        }
        let resp = req.send().await?.error_for_status()?;
        let body: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
        body["token"].as_str().map(str::to_string).context("no token in the answer")
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn token(
    State(inner): State<Arc<Inner>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    inner.requests.fetch_add(1, Ordering::SeqCst);
    let user = match basic_user(&headers) {
        None => None,
        Some((user, password)) => match inner.grants.users.get(&user) {
            Some((expected, repos)) if *expected == password => Some((user, repos.clone())),
            _ => return (StatusCode::UNAUTHORIZED, "bad credentials").into_response(),
        },
    };
    let mut access = Vec::new();
    for (k, scope) in &query {
        if k != "scope" {
            continue;
        }
        let mut parts = scope.split(':');
        let (Some("repository"), Some(name), Some(actions)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let allowed = inner.grants.public.contains(name)
            || user.as_ref().is_some_and(|(_, repos)| repos.contains(name));
        if allowed && actions.split(',').any(|a| a == "pull") {
            access.push(serde_json::json!({"type": "repository", "name": name, "actions": ["pull"]}));
        }
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
    let claims = serde_json::json!({
        "iss": ISSUER,
        "sub": user.as_ref().map(|(u, _)| u.as_str()).unwrap_or(""),
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("{now}-{}", inner.requests.load(Ordering::SeqCst)),
        "access": access,
    });
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header = serde_json::json!({
        "typ": "JWT",
        "alg": "ES256",
        "x5c": [base64::engine::general_purpose::STANDARD.encode(&inner.cert_der)],
    });
    let signing_input =
        format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let Ok(signature) = inner.key.sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes()) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let jwt = format!("{signing_input}.{}", b64(signature.as_ref()));
    let body = serde_json::json!({"token": jwt, "access_token": jwt, "expires_in": 300});
    ([("content-type", "application/json")], body.to_string()).into_response()
}

fn basic_user(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok()?;
    let (u, p) =
        String::from_utf8(decoded).ok()?.split_once(':').map(|(u, p)| (u.to_string(), p.to_string()))?;
    Some((u, p))
}
