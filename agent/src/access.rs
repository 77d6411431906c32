//! Who may read what: the registry list, and the per-request access check for content of
//! repositories the origin does not serve anonymously.
//!
//! Why: the cache and the swarm hold bytes that some client once had the right to read. A
//! node must not hand them to a process that has no such right, whether the bytes are in the
//! local store, on a peer, or still at the origin. The origin is the only authority on that
//! right, so the agent asks it, with the client's own credentials, and remembers the answer
//! briefly:
//!
//! - A request with no `Authorization` is checked with the agent's own anonymous `HEAD` for
//!   that repository and object (never with the node's credentials). 2xx: the object is
//!   public. 401/403: the client gets 401 with a challenge built from the origin's own
//!   (Bearer realm, service and `repository:<name>:pull`, or Basic), which leads containerd
//!   to fetch a token from the origin's token service (or send Basic) and retry.
//! - A request with `Authorization` (Basic, or a token the origin issued) is checked with a
//!   `HEAD` at the origin carrying exactly that value (Basic is exchanged for a token where
//!   the origin uses tokens). 2xx: allowed. 401/403: 403 `DENIED`. A token for one
//!   repository opens no other: the decision is per repository and object.
//! - Decisions are kept at most `--auth-decision-ttl` (default and upper bound
//!   [`DECISION_TTL`]) and never past a JWT's `exp`, keyed by an
//!   HMAC-SHA256 of the `Authorization` value under a random per-process key, so the cache
//!   holds no credential and a memory dump tells nothing about other processes' keys.
//! - A manifest served to an allowed client grants the same client, for the same time, the
//!   objects it references (child manifests, config, layers): one origin `HEAD` per tag and
//!   client per minute covers a whole image.
//! - Origin unreachable: objects last seen public are served (as the last known tag is);
//!   private ones are refused, unless the same credential was allowed within
//!   `--auth-offline-grace` (default 0: refused). Repositories the operator named public
//!   (`--public`, see [`public`]) are served to any client, marked [`PublicBasis::Configured`],
//!   unless the origin refused this agent's anonymous check for them while it answered.
//!   Objects and tags a swarm peer saw public itself, in the same repository, within
//!   `--public-attestation-window`, are served too when the operator trusts peers' word
//!   (`--public-attestations`, by default only with `--swarm-key`), marked
//!   [`PublicBasis::Attested`] (see [`attest`]).
//!
//! Registries: only the configured ones (`--upstream`, the built-in defaults unless
//! `--no-default-registries`, and `--default-registry`) are mirrored; any other gets 404 before
//! any connection is made, unless `--mirror-any-registry`.

pub mod attest;
pub mod public;

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use lru::LruCache;
use sha2::{Digest as _, Sha256};

use crate::metrics::METRICS;
use crate::origin::auth::Challenge;
use crate::origin::{As, Kind, Origin, OriginError, Resolved};
use crate::types::{Digest, Registry, RepoName, Tag};
pub use attest::{Attest, Attestors};
pub use public::{PublicEntry, PublicList};

/// Longest time a decision (and "this repository needs credentials", which saves the
/// anonymous HEAD) is reused without asking the origin again; `--auth-decision-ttl` may
/// shorten it.
pub const DECISION_TTL: Duration = Duration::from_secs(60);
/// Remembered decisions (also the memory used while the origin is unreachable).
const DECISION_MEMORY: usize = 32_768;
/// Lent credentials outlive a Basic decision this long (a download of a large layer runs
/// longer than one decision); tokens are lent until they expire.
const BASIC_LEND: Duration = Duration::from_secs(600);
/// Attestations remembered (each for at most the decision TTL, and never past its window).
const ATTESTED_MEMORY: usize = 4096;
/// Objects whose peers are being asked at once; more are refused at once while the origin is
/// down (each question is a DHT lookup and a few peer requests).
const MAX_ATTESTATION_QUERIES: usize = 16;

/// Which registries are mirrored.
#[derive(Debug, Clone)]
pub enum RegistryList {
    Any,
    Only(BTreeSet<Registry>),
}

impl RegistryList {
    pub fn allows(&self, registry: &Registry) -> bool {
        match self {
            RegistryList::Any => true,
            RegistryList::Only(set) => set.contains(registry),
        }
    }
}

/// Who a request is from, as far as access goes.
pub struct Identity {
    /// The `Authorization` value, if any.
    authorization: Option<String>,
    /// HMAC of it; all zero for anonymous.
    key: [u8; 32],
    /// A JWT's `exp`, if the value is a Bearer JWT.
    expires: Option<Instant>,
}

impl Identity {
    pub fn is_anonymous(&self) -> bool {
        self.authorization.is_none()
    }
}

/// What a refused request gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 401 with this `WWW-Authenticate` value.
    Challenge(String),
    /// Credentials were presented and the origin refused them for this object.
    Denied,
    /// The origin says there is no such object in this repository.
    NotFound,
    /// The origin could not be asked, and nothing remembered allows it.
    Unreachable,
}

/// An allowed request: until when the decision holds, and, for a tag checked just now, what
/// the origin resolved it to.
pub struct Grant {
    pub until: Instant,
    pub resolved: Option<Resolved>,
    /// Set when the origin could not be asked and the object is served as public on a basis
    /// other than this agent's own check (the response says so).
    pub public: Option<PublicBasis>,
    /// When the origin check this grant rests on was made; `None` when the origin could not
    /// be asked. Only a grant with a check is passed on to the objects a manifest names (a
    /// grant made during an outage is never remembered as a check, so it is never attested).
    pub checked: Option<Instant>,
}

/// Why content is served as public while the origin is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublicBasis {
    /// The repository is named by `--public`.
    Configured,
    /// A swarm peer saw it public at the origin within `--public-attestation-window`.
    Attested,
}

impl PublicBasis {
    /// The value of the `X-Shoal-Public` response header and of the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            PublicBasis::Configured => "configured",
            PublicBasis::Attested => "attested",
        }
    }
}

#[derive(Clone, Hash, PartialEq, Eq)]
struct DecisionKey {
    registry: Registry,
    repo: RepoName,
    /// A tag or a digest (a tag never contains ':').
    reference: String,
    who: [u8; 32],
}

/// A peer's attestation as remembered: until when it is used without asking again, and for a
/// tag the mapping it gave.
type Attested = (Instant, Option<Resolved>);

#[derive(Clone, Copy)]
struct Decision {
    until: Instant,
    checked: Instant,
}

pub struct Access {
    key: [u8; 32],
    registries: RegistryList,
    ttl: Duration,
    offline_grace: Duration,
    /// `--public`: served to anyone while the origin is unreachable.
    public: PublicList,
    decisions: Mutex<LruCache<DecisionKey, Decision>>,
    /// Repositories whose anonymous check failed, with the challenge to send.
    private: Mutex<LruCache<(Registry, RepoName), (String, Instant)>>,
    /// Peers asked during an outage; `None`: attestations are not trusted.
    attestors: Option<Arc<dyn Attestors>>,
    /// `--public-attestation-window`.
    attestation_window: Duration,
    /// Attestations received, until they are to be asked again (or leave the window).
    attested: Mutex<LruCache<(Registry, RepoName, String), Attested>>,
    attestation_queries: Arc<tokio::sync::Semaphore>,
}

impl Access {
    /// `ttl` is capped at [`DECISION_TTL`].
    pub fn new(registries: RegistryList, ttl: Duration, offline_grace: Duration) -> Self {
        let memory = NonZeroUsize::new(DECISION_MEMORY).expect("non-zero");
        Access {
            key: rand::random(),
            registries,
            ttl: ttl.min(DECISION_TTL),
            offline_grace,
            public: PublicList::default(),
            decisions: Mutex::new(LruCache::new(memory)),
            private: Mutex::new(LruCache::new(memory)),
            attestors: None,
            attestation_window: Duration::ZERO,
            attested: Mutex::new(LruCache::new(NonZeroUsize::new(ATTESTED_MEMORY).expect("non-zero"))),
            attestation_queries: Arc::new(tokio::sync::Semaphore::new(MAX_ATTESTATION_QUERIES)),
        }
    }

    /// Trusts what `attestors` (the swarm's peers) saw public within `window` while the origin
    /// is unreachable (see [`attest`]).
    pub fn with_attestations(mut self, attestors: Arc<dyn Attestors>, window: Duration) -> Self {
        self.attestors = Some(attestors);
        self.attestation_window = window;
        self
    }

    /// How long ago this agent's own anonymous check (or a manifest that check allowed) found
    /// `reference` of `repo` public; `None` if it never did, or the origin refused anonymous
    /// access to the repository since. What this agent attests to peers.
    pub fn public_age(&self, registry: &Registry, repo: &RepoName, reference: &str) -> Option<Duration> {
        let k = DecisionKey {
            registry: registry.clone(),
            repo: repo.clone(),
            reference: reference.to_string(),
            who: [0; 32],
        };
        let checked = crate::sync::lock(&self.decisions).peek(&k)?.checked;
        let refused_since = crate::sync::lock(&self.private)
            .peek(&(registry.clone(), repo.clone()))
            .is_some_and(|(_, until)| until.checked_sub(self.ttl).is_none_or(|at| at >= checked));
        (!refused_since).then(|| checked.elapsed())
    }

    /// Repositories public by configuration (`--public`).
    pub fn with_public(mut self, public: PublicList) -> Self {
        self.public = public;
        self
    }

    pub fn allows_registry(&self, registry: &Registry) -> bool {
        self.registries.allows(registry)
    }

    /// The identity of a request with this `Authorization` header value.
    pub fn identity(&self, authorization: Option<&str>) -> Identity {
        let authorization = authorization.map(str::trim).filter(|v| !v.is_empty());
        match authorization {
            None => Identity { authorization: None, key: [0; 32], expires: None },
            Some(value) => Identity {
                key: hmac_sha256(&self.key, value.as_bytes()),
                expires: jwt_expiry(value),
                authorization: Some(value.to_string()),
            },
        }
    }

    /// May `who` read `reference` (a tag or digest) of `repo`? Asks the origin unless a
    /// recent decision answers.
    #[allow(clippy::too_many_arguments)]
    pub async fn check(
        &self,
        origin: &Origin,
        registry: &Registry,
        repo: &RepoName,
        kind: Kind,
        reference: &str,
        accept: &str,
        who: &Identity,
    ) -> Result<Grant, Refusal> {
        let now = Instant::now();
        let key = |who: [u8; 32]| DecisionKey {
            registry: registry.clone(),
            repo: repo.clone(),
            reference: reference.to_string(),
            who,
        };
        let fresh = |k: &DecisionKey| {
            let mut decisions = crate::sync::lock(&self.decisions);
            decisions.get(k).copied().filter(|d| d.until > now)
        };
        // Public, or allowed for this very credential, recently.
        for k in [key([0; 32]), key(who.key)] {
            if let Some(d) = fresh(&k) {
                METRICS.auth_check("cached");
                return Ok(Grant { until: d.until, resolved: None, public: None, checked: Some(d.checked) });
            }
        }
        if who.is_anonymous() {
            let known_private = {
                let mut private = crate::sync::lock(&self.private);
                private.get(&(registry.clone(), repo.clone())).filter(|(_, until)| *until > now).cloned()
            };
            if let Some((challenge, _)) = known_private {
                METRICS.auth_check("denied");
                return Err(Refusal::Challenge(challenge));
            }
        }
        let as_who = match &who.authorization {
            None => As::Anonymous,
            Some(value) => As::Client(value),
        };
        let answer = match origin.check_access(registry, repo, kind, reference, accept, as_who).await {
            Ok(answer) => answer,
            Err(e) => {
                let refused = match self.offline(registry, repo, reference, who, &e) {
                    Ok(grant) => return Ok(grant),
                    Err(refused) => refused,
                };
                return match self.attested(registry, repo, reference, &e).await {
                    Some(grant) => Ok(grant),
                    None => {
                        tracing::warn!(%registry, %repo, reference, error = %e,
                            "origin unreachable: refusing content it has not shown this client may read");
                        Err(refused)
                    }
                };
            }
        };
        let status = answer.status;
        if status.is_success() {
            METRICS.auth_check("allowed");
            let mut until = now + self.ttl;
            for expiry in [who.expires, answer.token_expires].into_iter().flatten() {
                until = until.min(expiry);
            }
            if let Some(authorization) = answer.authorization {
                let lend_until = answer.token_expires.or(who.expires).unwrap_or(now + BASIC_LEND);
                origin.lend(registry, repo, authorization, lend_until);
            }
            let mut grant = Grant { until, resolved: answer.resolved, public: None, checked: Some(now) };
            self.remember(registry, repo, reference, who, &mut grant);
            return Ok(grant);
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            // The origin let us in and has no such object: nothing to serve, whatever the cache
            // holds under that digest for another repository.
            METRICS.auth_check("denied");
            return Err(Refusal::NotFound);
        }
        METRICS.auth_check("denied");
        if !who.is_anonymous() {
            tracing::info!(%registry, %repo, reference, %status, "the origin refused the client's credentials");
            return Err(Refusal::Denied);
        }
        let challenge = client_challenge(answer.challenge.as_ref(), registry, repo);
        self.private
            .lock()
            .expect("private lock")
            .put((registry.clone(), repo.clone()), (challenge.clone(), now + self.ttl));
        Err(Refusal::Challenge(challenge))
    }

    /// Records a decision for `reference` (and, for a resolved tag, its digest).
    fn remember(
        &self,
        registry: &Registry,
        repo: &RepoName,
        reference: &str,
        who: &Identity,
        grant: &mut Grant,
    ) {
        let mut references = vec![reference.to_string()];
        if let Some(resolved) = &grant.resolved {
            references.push(resolved.digest.to_string());
        }
        self.grant(registry, repo, who, references, grant);
    }

    /// Allows `who` to read `references` of `repo` for as long as `grant` holds (the objects a
    /// manifest it may read names). A grant made without the origin (an outage) allows
    /// nothing more.
    pub fn grant(
        &self,
        registry: &Registry,
        repo: &RepoName,
        who: &Identity,
        references: impl IntoIterator<Item = String>,
        grant: &Grant,
    ) {
        let Some(checked) = grant.checked else { return };
        let until = grant.until;
        let mut decisions = crate::sync::lock(&self.decisions);
        for reference in references {
            let k = DecisionKey { registry: registry.clone(), repo: repo.clone(), reference, who: who.key };
            decisions.put(k, Decision { until, checked });
        }
    }

    /// The origin could not be asked: what was last known decides.
    fn offline(
        &self,
        registry: &Registry,
        repo: &RepoName,
        reference: &str,
        who: &Identity,
        e: &OriginError,
    ) -> Result<Grant, Refusal> {
        METRICS.auth_check("origin_unreachable");
        let now = Instant::now();
        let mut decisions = crate::sync::lock(&self.decisions);
        let k = |who: [u8; 32]| DecisionKey {
            registry: registry.clone(),
            repo: repo.clone(),
            reference: reference.to_string(),
            who,
        };
        if decisions.get(&k([0; 32])).is_some() {
            tracing::warn!(%registry, %repo, reference, error = %e,
                "origin unreachable: serving an object last seen public");
            METRICS.outage_served("seen_public");
            return Ok(Grant { until: now, resolved: None, public: None, checked: None });
        }
        if !who.is_anonymous() && !self.offline_grace.is_zero() {
            let expired_token = who.expires.is_some_and(|exp| exp <= now);
            if let Some(d) = decisions.get(&k(who.key)) {
                if !expired_token && now.saturating_duration_since(d.checked) <= self.offline_grace {
                    tracing::warn!(%registry, %repo, reference, error = %e,
                        "origin unreachable: serving private content within --auth-offline-grace");
                    METRICS.outage_served("offline_grace");
                    return Ok(Grant { until: now, resolved: None, public: None, checked: None });
                }
            }
        }
        // The origin's own word beats the configuration: a repository it answered anonymously
        // with 401/403 (while this agent ran) stays refused, whatever --public says.
        let seen_private = crate::sync::lock(&self.private).peek(&(registry.clone(), repo.clone())).is_some();
        if self.public.contains(registry, repo) && !seen_private {
            tracing::warn!(%registry, %repo, reference, error = %e,
                "origin unreachable: serving a repository that --public names");
            let basis = PublicBasis::Configured;
            METRICS.outage_served(basis.as_str());
            return Ok(Grant { until: now, resolved: None, public: Some(basis), checked: None });
        }
        Err(Refusal::Unreachable)
    }

    /// The origin could not be asked and nothing this agent knows allows the request: a swarm
    /// peer's attestation may (see [`attest`]). For a tag, the grant carries the newest mapping
    /// a peer saw within the window.
    async fn attested(
        &self,
        registry: &Registry,
        repo: &RepoName,
        reference: &str,
        e: &OriginError,
    ) -> Option<Grant> {
        let attestors = self.attestors.as_ref()?;
        // The origin's own word beats peers': a repository it refused this agent anonymously
        // stays refused.
        if crate::sync::lock(&self.private).peek(&(registry.clone(), repo.clone())).is_some() {
            return None;
        }
        let key = (registry.clone(), repo.clone(), reference.to_string());
        let now = Instant::now();
        let remembered =
            crate::sync::lock(&self.attested).get(&key).filter(|(until, _)| *until > now).cloned();
        let (resolved, left) = match remembered {
            Some((until, resolved)) => (resolved, until - now),
            None => {
                let Ok(_slot) = self.attestation_queries.clone().try_acquire_owned() else {
                    tracing::warn!(%registry, %repo, reference,
                        "origin unreachable: {MAX_ATTESTATION_QUERIES} attestation queries in flight, not asking");
                    return None;
                };
                let window = self.attestation_window;
                let (resolved, left) = if let Ok(digest) = reference.parse::<Digest>() {
                    let ages = attestors.public_seen(registry, repo, &digest).await;
                    let seen = ages.into_iter().map(|age| ((), age)).collect();
                    attest::newest_within(seen, window).map(|((), left)| (None, left))?
                } else {
                    let tag: Tag = reference.parse().ok()?;
                    let seen = attestors.tag_seen(registry, repo, &tag).await;
                    attest::newest_within(seen, window).map(|(resolved, left)| (Some(resolved), left))?
                };
                let until = now + left.min(self.ttl);
                crate::sync::lock(&self.attested).put(key, (until, resolved.clone()));
                (resolved, left)
            }
        };
        tracing::warn!(%registry, %repo, reference, error = %e, window_left_ms = left.as_millis() as u64,
            "origin unreachable: serving an object a swarm peer saw public");
        let basis = PublicBasis::Attested;
        METRICS.outage_served(basis.as_str());
        Some(Grant { until: now, resolved, public: Some(basis), checked: None })
    }
}

/// The challenge a client gets: the origin's token service for exactly this repository, or
/// Basic where the origin uses Basic.
fn client_challenge(origin: Option<&Challenge>, registry: &Registry, repo: &RepoName) -> String {
    match origin {
        Some(Challenge::Bearer { realm, service, .. }) => {
            let mut out = format!("Bearer realm=\"{}\"", quote(realm));
            if let Some(service) = service {
                out.push_str(&format!(",service=\"{}\"", quote(service)));
            }
            out.push_str(&format!(",scope=\"repository:{repo}:pull\""));
            out
        }
        Some(Challenge::Basic) | None => format!("Basic realm=\"{registry}\""),
    }
}

fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// HMAC-SHA256 (RFC 2104), written out: sha2 is already here, and this is all we need.
fn hmac_sha256(key: &[u8; 32], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// The `exp` of a `Bearer <JWT>` value, as an `Instant` (unverified: the origin verifies the
/// token; this only bounds how long a decision about it is kept).
fn jwt_expiry(authorization: &str) -> Option<Instant> {
    let (scheme, token) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let payload = token.trim().split('.').nth(1)?;
    let bytes =
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Instant::now() + Duration::from_secs(exp.saturating_sub(now_unix)))
}

/// Digests a manifest (or index) references: `manifests[]`, `config`, `layers[]`.
pub fn referenced_digests(manifest: &[u8]) -> Vec<String> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(manifest) else { return Vec::new() };
    let mut out = Vec::new();
    let mut take = |d: &serde_json::Value| {
        if let Some(s) = d.get("digest").and_then(|v| v.as_str()) {
            if s.parse::<crate::types::Digest>().is_ok() {
                out.push(s.to_string());
            }
        }
    };
    for list in ["manifests", "layers"] {
        for item in value.get(list).and_then(|v| v.as_array()).into_iter().flatten() {
            take(item);
        }
    }
    if let Some(config) = value.get("config") {
        take(config);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Origin down: `--public` serves its repositories to anyone, and nothing else; a
    /// repository the origin itself called private stays refused.
    #[test]
    fn origin_down_serves_configured_public_repositories_only() {
        let public = PublicList::new(vec!["reg.test/pub".parse().unwrap()]);
        let a = Access::new(RegistryList::Any, DECISION_TTL, Duration::ZERO).with_public(public);
        let reg: Registry = "reg.test".parse().unwrap();
        let repo = |r: &str| r.parse::<RepoName>().unwrap();
        let down = OriginError::Unreachable("reg.test: connection refused".into());
        let digest = format!("sha256:{}", "a".repeat(64));
        let anonymous = a.identity(None);
        let someone = a.identity(Some("Basic YTpi"));
        for who in [&anonymous, &someone] {
            let grant = a.offline(&reg, &repo("pub/app"), &digest, who, &down).expect("named: served");
            assert_eq!(grant.public, Some(PublicBasis::Configured));
        }
        assert_eq!(
            a.offline(&reg, &repo("public/app"), &digest, &anonymous, &down).err(),
            Some(Refusal::Unreachable)
        );
        let other: Registry = "other.test".parse().unwrap();
        assert_eq!(
            a.offline(&other, &repo("pub/app"), &digest, &anonymous, &down).err(),
            Some(Refusal::Unreachable)
        );
        // The origin answered 401 for pub/secret's anonymous check: expired or not, refused.
        let past = Instant::now();
        crate::sync::lock(&a.private).put((reg.clone(), repo("pub/secret")), ("Basic".into(), past));
        assert_eq!(
            a.offline(&reg, &repo("pub/secret"), &digest, &anonymous, &down).err(),
            Some(Refusal::Unreachable)
        );
        // Without --public: today's rule.
        let plain = Access::new(RegistryList::Any, DECISION_TTL, Duration::ZERO);
        assert_eq!(
            plain.offline(&reg, &repo("pub/app"), &digest, &anonymous, &down).err(),
            Some(Refusal::Unreachable)
        );
    }

    /// Peers' observations, as the swarm would answer them.
    #[derive(Default)]
    struct FakeAttestors {
        objects: Vec<((String, String, Digest), Duration)>,
        tags: Vec<((String, String, String), Resolved, Duration)>,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl Attestors for FakeAttestors {
        fn public_seen(
            &self,
            registry: &Registry,
            repo: &RepoName,
            digest: &Digest,
        ) -> futures_util::future::BoxFuture<'static, Vec<Duration>> {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let key = (registry.to_string(), repo.to_string(), *digest);
            let ages = self.objects.iter().filter(|(k, _)| *k == key).map(|(_, age)| *age).collect();
            Box::pin(async move { ages })
        }

        fn tag_seen(
            &self,
            registry: &Registry,
            repo: &RepoName,
            tag: &Tag,
        ) -> futures_util::future::BoxFuture<'static, Vec<(Resolved, Duration)>> {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let key = (registry.to_string(), repo.to_string(), tag.to_string());
            let seen =
                self.tags.iter().filter(|(k, ..)| *k == key).map(|(_, r, age)| (r.clone(), *age)).collect();
            Box::pin(async move { seen })
        }
    }

    fn resolved(c: char) -> Resolved {
        Resolved {
            digest: format!("sha256:{}", c.to_string().repeat(64)).parse().unwrap(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 10,
        }
    }

    /// Origin down: an object is served on a peer's word only for the same repository and
    /// digest, within the window, when attestations are trusted, and never for a repository
    /// this agent saw refuse anonymous access; a tag gets the newest mapping in the window.
    #[tokio::test]
    async fn attestations_are_per_repository_and_object_within_the_window() {
        let s = Duration::from_secs;
        let digest: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let reg: Registry = "reg.test".parse().unwrap();
        let repo = |r: &str| r.parse::<RepoName>().unwrap();
        let down = OriginError::Unreachable("reg.test: connection refused".into());
        let peers = Arc::new(FakeAttestors {
            objects: vec![
                (("reg.test".into(), "pub/app".into(), digest), s(5)),
                (("reg.test".into(), "pub/old".into(), digest), s(40)),
            ],
            tags: vec![
                (("reg.test".into(), "pub/app".into(), "v1".into()), resolved('b'), s(20)),
                (("reg.test".into(), "pub/app".into(), "v1".into()), resolved('c'), s(3)),
                (("reg.test".into(), "pub/app".into(), "v1".into()), resolved('d'), s(31)),
            ],
            ..Default::default()
        });
        let a = Access::new(RegistryList::Any, DECISION_TTL, Duration::ZERO)
            .with_attestations(peers.clone(), s(30));
        let d = digest.to_string();
        let grant = a.attested(&reg, &repo("pub/app"), &d, &down).await.expect("attested");
        assert_eq!(grant.public, Some(PublicBasis::Attested));
        assert!(grant.checked.is_none(), "never remembered as a check of our own");
        // Asked once: the answer is kept (for the decision TTL at most).
        a.attested(&reg, &repo("pub/app"), &d, &down).await.expect("attested again");
        assert_eq!(peers.asked.load(std::sync::atomic::Ordering::Relaxed), 1);
        // The same digest through another repository: nobody saw it public there.
        assert!(a.attested(&reg, &repo("secret/app"), &d, &down).await.is_none());
        // Seen, but before the window.
        assert!(a.attested(&reg, &repo("pub/old"), &d, &down).await.is_none());
        // The newest mapping within the window wins.
        let tag = a.attested(&reg, &repo("pub/app"), "v1", &down).await.expect("tag attested");
        assert_eq!(tag.resolved.map(|r| r.digest), Some(resolved('c').digest));
        assert!(a.attested(&reg, &repo("pub/app"), "v2", &down).await.is_none());
        // This agent saw the repository refuse anonymous access: peers do not overrule it.
        crate::sync::lock(&a.private).put((reg.clone(), repo("pub/app")), ("Basic".into(), Instant::now()));
        crate::sync::lock(&a.attested).clear();
        assert!(a.attested(&reg, &repo("pub/app"), &d, &down).await.is_none());
        // Not trusted (no swarm key, no opt-in): nothing is asked.
        let plain = Access::new(RegistryList::Any, DECISION_TTL, Duration::ZERO);
        assert!(plain.attested(&reg, &repo("pub/app"), &d, &down).await.is_none());
    }

    /// What this agent attests: its own public checks (and what a manifest they allowed
    /// names), not what it served without the origin, and not past a later refusal.
    #[test]
    fn only_own_checks_are_attested() {
        let a = Access::new(RegistryList::Any, DECISION_TTL, Duration::ZERO);
        let reg: Registry = "reg.test".parse().unwrap();
        let repo: RepoName = "pub/app".parse().unwrap();
        let anonymous = a.identity(None);
        let someone = a.identity(Some("Basic YTpi"));
        let (x, y, z) = ("sha256:x".to_string(), "sha256:y".to_string(), "sha256:z".to_string());
        let checked = Grant {
            until: Instant::now() + DECISION_TTL,
            resolved: None,
            public: None,
            checked: Some(Instant::now()),
        };
        a.grant(&reg, &repo, &anonymous, [x.clone()], &checked);
        a.grant(&reg, &repo, &someone, [y.clone()], &checked);
        let offline = Grant {
            until: Instant::now(),
            resolved: None,
            public: Some(PublicBasis::Attested),
            checked: None,
        };
        a.grant(&reg, &repo, &anonymous, [z.clone()], &offline);
        assert!(a.public_age(&reg, &repo, &x).is_some_and(|age| age < Duration::from_secs(5)));
        assert_eq!(a.public_age(&reg, &repo, &y), None, "a credential's grant says nothing of public");
        assert_eq!(a.public_age(&reg, &repo, &z), None, "served on a peer's word: not attested");
        assert_eq!(a.public_age(&reg, &"pub/other".parse().unwrap(), &x), None);
        // The origin refused anonymous access to the repository since.
        crate::sync::lock(&a.private)
            .put((reg.clone(), repo.clone()), ("Basic".into(), Instant::now() + DECISION_TTL));
        assert_eq!(a.public_age(&reg, &repo, &x), None);
    }

    #[test]
    fn hmac_matches_rfc4231() {
        // RFC 4231 test case 2 uses a 4-byte key: zero-padded to 32 bytes it is the same key.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        let mac = hmac_sha256(&key, b"what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn identities_are_keyed_and_hold_no_secret() {
        let a = Access::new(RegistryList::Any, DECISION_TTL, Duration::ZERO);
        let b = Access::new(RegistryList::Any, DECISION_TTL, Duration::ZERO);
        let (x, y) = (a.identity(Some("Basic dTpw")), a.identity(Some("Basic dTpx")));
        assert_ne!(x.key, y.key);
        assert_eq!(x.key, a.identity(Some("Basic dTpw")).key);
        assert_ne!(x.key, b.identity(Some("Basic dTpw")).key, "the key is per process");
        assert!(a.identity(None).is_anonymous() && a.identity(Some(" ")).is_anonymous());
    }

    #[test]
    fn jwt_expiry_bounds_decisions() {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(r#"{{"exp":{}}}"#, now + 20));
        let exp = jwt_expiry(&format!("Bearer e30.{payload}.sig")).unwrap();
        let left = exp.saturating_duration_since(Instant::now());
        assert!(left <= Duration::from_secs(20) && left >= Duration::from_secs(18), "{left:?}");
        assert!(jwt_expiry("Bearer opaque").is_none());
        assert!(jwt_expiry("Basic dTpw").is_none());
    }

    #[test]
    fn challenges_name_one_repository() {
        let registry: Registry = "reg.test".parse().unwrap();
        let repo: RepoName = "team/app".parse().unwrap();
        let bearer = Challenge::Bearer {
            realm: "https://auth.test/token".into(),
            service: Some("reg".into()),
            scope: Some("repository:other:pull,push".into()),
        };
        assert_eq!(
            client_challenge(Some(&bearer), &registry, &repo),
            r#"Bearer realm="https://auth.test/token",service="reg",scope="repository:team/app:pull""#
        );
        assert_eq!(client_challenge(Some(&Challenge::Basic), &registry, &repo), r#"Basic realm="reg.test""#);
    }

    #[test]
    fn manifests_reference_their_parts() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let m = format!(
            r#"{{"config":{{"digest":"{}"}},"layers":[{{"digest":"{}"}},{{"digest":"bad"}}]}}"#,
            d('a'),
            d('b')
        );
        assert_eq!(referenced_digests(m.as_bytes()), vec![d('b'), d('a')]);
        let index = format!(r#"{{"manifests":[{{"digest":"{}"}}]}}"#, d('c'));
        assert_eq!(referenced_digests(index.as_bytes()), vec![d('c')]);
        assert!(referenced_digests(b"not json").is_empty());
    }

    #[test]
    fn registry_list() {
        let only = RegistryList::Only(["a.test".parse().unwrap()].into_iter().collect());
        assert!(only.allows(&"a.test".parse().unwrap()));
        assert!(!only.allows(&"169.254.169.254".parse().unwrap()));
        assert!(RegistryList::Any.allows(&"b.test".parse().unwrap()));
    }
}
