//! The agent's P2P adapter, the one module that knows both the swarm (`shoal-swarm`) and the
//! agent's downloads: [`SwarmNetwork`] implements the download task's [`Network`] trait over
//! a [`Client`], [`serve_peers`] answers peers' piece requests from this node's store and
//! downloads (and what this node saw public at the origin, [`Attest`]), [`PeerAttestors`]
//! asks peers what they saw public during an origin outage, [`coordinator`] plans the digests
//! this node coordinates when there is no tracker, and [`heartbeat`] keeps the trackers
//! informed. Peer ids become [`NodeId`]s here, so no libp2p type reaches `fetch`.

pub mod coordinator;
pub mod heartbeat;
pub mod shares;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::swarm::{Multiaddr, PeerId};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, Notify, Semaphore};

use crate::access::{Attest, Attestors};
use crate::fetch::net::{Network, NodeId, PeerError, PeerHave, Plan, PlanReport};
use crate::fetch::Fetcher;
use crate::metrics::{OutcomeLabels, METRICS};
use crate::origin::Resolved;
use crate::pieces::Bitfield;
use crate::ratelimit::RateLimiter;
use crate::supervise::{CancellationToken, Supervisor};
use crate::swarm::{Client, InboundRequest, RequestError};
use crate::swarm::{SwarmConfig, SwarmError, SwarmStats};
use crate::types::Digest;
use crate::types::{Registry, RepoName, Tag};
use shoal_protocol::piece::{HaveInfo, PieceRequest, PieceResponse, TagSeenInfo, MAX_REASON_BYTES};
use shoal_protocol::tracker::{
    Plan as TrackerPlan, PlanRequest, TrackerRequest, TrackerResponse, MAX_PLAN_DIGESTS,
};

use coordinator::{Coordinator, Target};

/// How long a provider lookup may take before the download goes on with what it found.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

pub use crate::swarm::config_from_flags;

/// An agent's [`SwarmConfig`]: [`config_from_flags`] plus its bound on peers.
pub fn agent_config(
    p2p: &crate::config::P2pConfig,
    key_path: std::path::PathBuf,
) -> Result<SwarmConfig, SwarmError> {
    let mut config =
        config_from_flags(&p2p.listen, &p2p.bootstrap, &p2p.trackers, key_path, p2p.swarm_key.clone())?;
    config.max_peers = Some(p2p.max_peers);
    config.security = crate::swarm::Security::parse_list(&p2p.security)?;
    config.validate()?;
    Ok(config)
}

pub struct SwarmNetwork {
    client: Client,
    me: NodeId,
    /// A tracker answered a heartbeat lately (set by [`heartbeat`]).
    tracker_online: Arc<AtomicBool>,
    /// Peers whose plan addresses were handed to the swarm already.
    addressed: Arc<Mutex<HashSet<PeerId>>>,
    /// Announcements and withdrawals not yet handed to the swarm (see [`ProviderQueue`]).
    providers: Arc<ProviderQueue>,
    /// Plan requests in flight; more are not sent (the download counts them unanswered).
    plans: Arc<Semaphore>,
    /// The planner of the digests this node coordinates, and who coordinates the others.
    coordinator: Arc<Coordinator>,
}

/// Peers remembered in [`SwarmNetwork::addressed`] before the set starts over.
const MAX_ADDRESSED: usize = 4096;
/// Plan requests to trackers in flight at once, over all downloads. A download asks about
/// every 0.5 s without waiting for the last answer; against a tracker that stopped answering
/// (30 s request timeout) this is what keeps those requests from piling up.
const MAX_PLANS_IN_FLIGHT: usize = 64;
/// `Have` requests from peers answered at once; more are answered `Busy` (they are cheap,
/// but each is a task and a store lookup, and a peer can send thousands).
const MAX_HAVES_IN_FLIGHT: usize = 64;

/// Announcements (`true`) and withdrawals (`false`) of provider records, coalesced per
/// digest: the last word about a digest wins and it is queued once. One task hands them to
/// the swarm in order, so start-up (every cached digest at once) or a burst of evictions is
/// one queue entry per digest, never one task each. Its size is bounded by the digests this
/// node holds or downloads.
#[derive(Default)]
pub struct ProviderQueue {
    pending: Mutex<(VecDeque<Digest>, HashMap<Digest, bool>)>,
    ready: Notify,
}

impl ProviderQueue {
    fn push(&self, digest: Digest, provide: bool) {
        {
            let mut guard = crate::sync::lock(&self.pending);
            let (order, last_word) = &mut *guard;
            if last_word.insert(digest, provide).is_none() {
                order.push_back(digest);
            }
        }
        self.ready.notify_one();
    }

    fn pop(&self) -> Option<(Digest, bool)> {
        let mut guard = crate::sync::lock(&self.pending);
        let (order, last_word) = &mut *guard;
        let digest = order.pop_front()?;
        last_word.remove(&digest).map(|provide| (digest, provide))
    }

    /// Entries waiting.
    pub fn len(&self) -> usize {
        crate::sync::lock(&self.pending).0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl SwarmNetwork {
    pub fn new(client: Client) -> Self {
        let me_peer = client.local_peer_id();
        let me = NodeId::new(&me_peer.to_bytes());
        SwarmNetwork {
            client,
            me,
            tracker_online: Arc::new(AtomicBool::new(false)),
            addressed: Arc::default(),
            providers: Arc::default(),
            plans: Arc::new(Semaphore::new(MAX_PLANS_IN_FLIGHT)),
            coordinator: Arc::new(Coordinator::new(me_peer)),
        }
    }

    /// The planner this node runs as the coordinator of digests (serve it with
    /// [`Coordinator::serve`]).
    pub fn coordinator(&self) -> Arc<Coordinator> {
        self.coordinator.clone()
    }

    /// The flag the heartbeat loop sets while a tracker answers.
    pub fn tracker_online(&self) -> Arc<AtomicBool> {
        self.tracker_online.clone()
    }

    /// Hands queued announcements and withdrawals to the swarm, one at a time, until
    /// `cancel`. Spawn it once.
    pub fn run_provider_queue(
        &self,
        cancel: CancellationToken,
    ) -> impl std::future::Future<Output = ()> + Send {
        let (queue, client) = (self.providers.clone(), self.client.clone());
        async move {
            loop {
                while let Some((digest, provide)) = queue.pop() {
                    if cancel.is_cancelled() {
                        return;
                    }
                    if provide {
                        if let Err(e) = client.start_providing(digest).await {
                            tracing::debug!(%digest, error = %e, "could not announce");
                        }
                    } else {
                        let _ = client.stop_providing(digest).await;
                    }
                }
                tokio::select! {
                    () = queue.ready.notified() => {}
                    () = cancel.cancelled() => return,
                }
            }
        }
    }

    /// Announcements and withdrawals waiting for the swarm.
    pub fn provider_queue(&self) -> Arc<ProviderQueue> {
        self.providers.clone()
    }
}

/// The tracker responsible for `digest`: rendezvous hashing over the connected trackers, so
/// replicas split the digests and agents agree without talking.
pub fn tracker_for(digest: &Digest, trackers: &[PeerId]) -> Option<PeerId> {
    use sha2::Digest as _;
    trackers
        .iter()
        .max_by_key(|t| {
            sha2::Sha256::new().chain_update(digest.as_bytes()).chain_update(t.to_bytes()).finalize()
        })
        .copied()
}

fn peer_id(node: &NodeId) -> Result<PeerId, PeerError> {
    PeerId::from_bytes(node.as_bytes()).map_err(|e| PeerError::Protocol(format!("bad peer id: {e}")))
}

fn request_error(e: RequestError) -> PeerError {
    match e {
        RequestError::Protocol(why) => PeerError::Protocol(why),
        other => PeerError::Unreachable(other.to_string()),
    }
}

impl Network for SwarmNetwork {
    fn local_id(&self) -> NodeId {
        self.me.clone()
    }

    /// Always: a tracker when one answers, else the digest's coordinator in the DHT (maybe
    /// this node).
    fn has_coordinator(&self) -> bool {
        true
    }

    fn plan(&self, digest: Digest, report: PlanReport) -> BoxFuture<'static, Option<Plan>> {
        let client = self.client.clone();
        let me = self.client.local_peer_id();
        let mut attest = report.attest;
        if attest.len() > MAX_PLAN_DIGESTS {
            // Only ever this many are unreported at once in practice (a plan goes out every
            // half second); the tracker learns the rest from the complete report.
            attest.truncate(MAX_PLAN_DIGESTS);
        }
        let request = PlanRequest {
            digest: *digest.as_bytes(),
            size: report.size,
            piece_size: report.piece_size,
            have: report.have.as_bytes().to_vec(),
            attest,
            complete: report.complete,
            fetching: report.fetching,
            planned: report.planned,
        };
        let addressed = self.addressed.clone();
        let slot = self.plans.clone().try_acquire_owned();
        let tracker = self.tracker_online.load(Ordering::Relaxed);
        let coordinator = self.coordinator.clone();
        Box::pin(async move {
            let plan = match slot {
                Ok(_slot) => {
                    // While a tracker is connected it plans. With none connected the digest's
                    // coordinator does at once, without waiting for the heartbeat to call the
                    // tracker offline (TRACKER_OFFLINE_AFTER): a killed tracker's connections
                    // close together, so every download moves within one plan poll and the
                    // coordinator adopts their work under way together (ADOPT_GRACE) instead
                    // of hearing from them over seconds (measured: 1.4-1.7x origin egress).
                    let trackers = if tracker { client.trackers().await } else { Vec::new() };
                    let answer = match tracker_for(&digest, &trackers) {
                        Some(t) => ask_tracker(&client, t, digest, request).await,
                        None => ask_coordinator(&client, &coordinator, digest, request).await,
                    };
                    match answer {
                        Some(plan) => Some(plan_from(&client, &addressed, me, plan).await),
                        None => None,
                    }
                }
                Err(_) => {
                    tracing::debug!(%digest, "{MAX_PLANS_IN_FLIGHT} plan requests in flight: not asking");
                    None
                }
            };
            let outcome = if plan.is_some() { "answered" } else { "unanswered" };
            METRICS.tracker_plans.get_or_create(&OutcomeLabels { outcome }).inc();
            plan
        })
    }

    fn announce(&self, digest: Digest) {
        self.providers.push(digest, true);
    }

    fn withdraw(&self, digest: Digest) {
        self.providers.push(digest, false);
    }

    fn find_providers(&self, digest: Digest) -> BoxFuture<'static, Vec<NodeId>> {
        let client = self.client.clone();
        Box::pin(async move {
            match client.find_providers(digest, LOOKUP_TIMEOUT).await {
                Ok(peers) => peers.iter().map(|p| NodeId::new(&p.to_bytes())).collect(),
                Err(e) => {
                    tracing::debug!(%digest, error = %e, "provider lookup failed");
                    Vec::new()
                }
            }
        })
    }

    fn have(&self, peer: NodeId, digest: Digest) -> BoxFuture<'static, Result<PeerHave, PeerError>> {
        let client = self.client.clone();
        Box::pin(async move {
            match client.request(peer_id(&peer)?, PieceRequest::have(&digest)).await.map_err(request_error)? {
                PieceResponse::Have(info) => {
                    let pieces = HaveInfo::piece_count(info.size, info.piece_size) as u32;
                    let have = Bitfield::from_bytes(info.have, pieces)
                        .ok_or_else(|| PeerError::Protocol("bitfield does not fit the blob".into()))?;
                    Ok(PeerHave {
                        size: info.size,
                        piece_size: info.piece_size,
                        have,
                        piece_digests: info.piece_digests,
                        complete: info.complete,
                        media_type: info.media_type,
                    })
                }
                PieceResponse::NotFound => Err(PeerError::Lacks),
                PieceResponse::Busy => Err(PeerError::Busy),
                PieceResponse::Piece { .. } => Err(PeerError::Protocol("a piece in answer to Have".into())),
                other => Err(PeerError::Protocol(format!("{other:?} in answer to Have"))),
            }
        })
    }

    fn piece(
        &self,
        peer: NodeId,
        digest: Digest,
        index: u32,
    ) -> BoxFuture<'static, Result<Bytes, PeerError>> {
        let client = self.client.clone();
        Box::pin(async move {
            match client
                .request(peer_id(&peer)?, PieceRequest::piece(&digest, index))
                .await
                .map_err(request_error)?
            {
                PieceResponse::Piece { index: got, data } if got == index => {
                    Ok(Bytes::from_owner(Recycled(data)))
                }
                PieceResponse::Piece { index: got, .. } => {
                    Err(PeerError::Protocol(format!("asked for piece {index}, got {got}")))
                }
                PieceResponse::NotFound => Err(PeerError::Lacks),
                PieceResponse::Busy => Err(PeerError::Busy),
                PieceResponse::Have(_) => {
                    Err(PeerError::Protocol("Have in answer to a piece request".into()))
                }
                other => Err(PeerError::Protocol(format!("{other:?} in answer to a piece request"))),
            }
        })
    }
}

/// A received piece's buffer, given back to the codec for the next piece
/// ([`shoal_protocol::piece::recycle`]) once the download has written and dropped the bytes.
struct Recycled(Vec<u8>);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        shoal_protocol::piece::recycle(std::mem::take(&mut self.0));
    }
}

/// Sends a plan request for `digest` to `tracker` (the digest's, of those connected); `None`
/// without an answer.
async fn ask_tracker(
    client: &Client,
    tracker: PeerId,
    digest: Digest,
    request: PlanRequest,
) -> Option<TrackerPlan> {
    match client.tracker_request(tracker, TrackerRequest::Plan(request)).await {
        Ok(TrackerResponse::Plan(plan)) => Some(plan),
        Ok(TrackerResponse::Refused(why)) => {
            tracing::warn!(%digest, %why, "the tracker refused a plan request");
            None
        }
        Ok(other) => {
            tracing::debug!(%digest, ?other, "unexpected tracker answer to a plan request");
            None
        }
        Err(e) => {
            tracing::debug!(%digest, error = %e, "plan request failed");
            None
        }
    }
}

/// Asks the coordinator of `digest` (see [`coordinator`]): this node's own planner, or the
/// closest node the DHT knows, found with one lookup per download. `None` without an answer;
/// a coordinator that failed to answer is replaced by the next closest.
async fn ask_coordinator(
    client: &Client,
    coordinator: &Coordinator,
    digest: Digest,
    request: PlanRequest,
) -> Option<TrackerPlan> {
    let now = std::time::Instant::now();
    let mut target = crate::sync::lock(&coordinator.coordinators).target(&digest, now);
    if target == Target::LookUp {
        let closest = client.closest_peers(digest).await.unwrap_or_default();
        target = crate::sync::lock(&coordinator.coordinators).found(&digest, closest, now);
        tracing::debug!(%digest, ?target, "coordinator found");
    }
    let answer = match target {
        Target::LookingUp | Target::LookUp => return None,
        Target::Me => coordinator.plan_local(&request),
        Target::Peer(peer) => match client.tracker_request(peer, TrackerRequest::Plan(request)).await {
            Ok(answer) => answer,
            Err(e) => {
                let gone = matches!(e, RequestError::Unreachable | RequestError::Timeout);
                tracing::debug!(%digest, %peer, error = %e, gone, "the coordinator did not answer");
                crate::sync::lock(&coordinator.coordinators).failed(&digest, peer, gone);
                return None;
            }
        },
    };
    match (answer, target) {
        (TrackerResponse::Plan(plan), target) => {
            if let Target::Peer(peer) = target {
                crate::sync::lock(&coordinator.coordinators).answered(&digest, peer);
            }
            Some(plan)
        }
        (other, target) => {
            tracing::warn!(%digest, ?target, ?other, "the coordinator refused a plan request");
            if let Target::Peer(peer) = target {
                crate::sync::lock(&coordinator.coordinators).failed(&digest, peer, false);
            }
            None
        }
    }
}

/// A planner's answer as a download takes it: peers as [`NodeId`]s (their addresses handed to
/// the swarm once), ourselves left out.
async fn plan_from(
    client: &Client,
    addressed: &Mutex<HashSet<PeerId>>,
    me: PeerId,
    plan: TrackerPlan,
) -> Plan {
    let mut peers = Vec::with_capacity(plan.peers.len());
    for p in plan.peers {
        let Ok(peer) = PeerId::from_bytes(&p.peer_id) else { continue };
        if peer == me {
            continue;
        }
        let fresh = {
            let mut seen = crate::sync::lock(addressed);
            if seen.len() >= MAX_ADDRESSED {
                seen.clear();
            }
            seen.insert(peer)
        };
        if fresh {
            for addr in p.addrs.iter().filter_map(|a| Multiaddr::try_from(a.to_vec()).ok()) {
                let _ = client.add_address(peer, addr).await;
            }
        }
        peers.push(NodeId::new(&peer.to_bytes()));
    }
    Plan {
        peers,
        assigned: plan.assigned,
        piece_digests: plan.piece_digests,
        next_ask: Duration::from_millis(plan.next_ask_ms.into()),
    }
}

/// How this node answers peers.
#[derive(Clone)]
pub struct ServeOptions {
    /// Piece uploads in flight at once, split fairly among the peers asking
    /// ([`shares`]); more are answered `Busy`.
    pub max_uploads: usize,
    pub upload_limit: Arc<RateLimiter>,
    /// Test-only fault injection: flip a byte of every piece sent.
    pub corrupt_uploads: bool,
    /// Test-only fault injection: claim every blob is 1 MiB longer than it is.
    pub lie_about_size: bool,
}

/// Answers inbound piece requests until the swarm stops or shutdown starts. Only local,
/// verified pieces are served; nothing is ever forwarded. Every answer is a task of
/// `supervisor`, at most [`ServeOptions::max_uploads`] pieces (each asking peer its fair
/// share of them, see [`shares`]) and [`MAX_HAVES_IN_FLIGHT`] `Have`s at once; beyond that
/// the peer is told `Busy` and asks another holder.
pub async fn serve_peers(
    fetcher: Arc<Fetcher>,
    attest: Arc<dyn Attest>,
    client: Client,
    mut inbound: mpsc::Receiver<InboundRequest>,
    options: ServeOptions,
    supervisor: Supervisor,
) {
    let shares = Arc::new(Mutex::new(shares::Shares::new(options.max_uploads)));
    let haves = Arc::new(Semaphore::new(MAX_HAVES_IN_FLIGHT));
    let cancel = supervisor.token();
    loop {
        let next = tokio::select! {
            next = inbound.recv() => next,
            () = cancel.cancelled() => None,
        };
        let Some(InboundRequest { peer, request, channel }) = next else { break };
        let (fetcher, client, options, cancel) =
            (fetcher.clone(), client.clone(), options.clone(), cancel.clone());
        match request {
            PieceRequest::Have { digest } => {
                let Ok(slot) = haves.clone().try_acquire_owned() else {
                    let _ = client.respond(channel, PieceResponse::Busy).await;
                    continue;
                };
                supervisor.spawn("peer have", async move {
                    let _slot = slot;
                    let asker = NodeId::new(&peer.to_bytes());
                    let mut have = fetcher.have(&Digest::from_sha256(digest), Some(asker)).await;
                    if options.lie_about_size {
                        have = have.map(lie_about_size);
                    }
                    let response = match have {
                        Some(h) => PieceResponse::Have(HaveInfo {
                            size: h.size,
                            piece_size: h.piece_size,
                            have: h.have.as_bytes().to_vec(),
                            piece_digests: h.piece_digests,
                            complete: h.complete,
                            media_type: h.media_type,
                        }),
                        None => PieceResponse::NotFound,
                    };
                    let _ = client.respond(channel, response).await;
                });
            }
            // A lock and a lookup in a bounded map each: answered here, no task.
            PieceRequest::PublicSeen { .. } | PieceRequest::TagSeen { .. } => {
                let response = answer_attestation(attest.as_ref(), &request);
                tracing::debug!(%peer, ?request, ?response, "attestation asked");
                let _ = client.respond(channel, response).await;
            }
            PieceRequest::Piece { digest, index } => {
                if !crate::sync::lock(&shares).try_take(&peer, std::time::Instant::now()) {
                    let _ = client.respond(channel, PieceResponse::Busy).await;
                    continue;
                }
                let slot = UploadSlot { shares: shares.clone(), peer };
                supervisor.spawn("peer upload", async move {
                    let _slot = slot;
                    let response = match fetcher.piece(&Digest::from_sha256(digest), index).await {
                        Some(data) => {
                            // A rate-limited upload waits; shutdown does not wait for it.
                            tokio::select! {
                                () = options.upload_limit.acquire(data.len() as u64) => {}
                                () = cancel.cancelled() => return,
                            }
                            // The store read the piece into a Vec: this takes it back without a copy.
                            let mut data = Vec::from(data);
                            if options.corrupt_uploads && !data.is_empty() {
                                let mid = data.len() / 2;
                                data[mid] ^= 0xff;
                            }
                            METRICS.peer_sent_bytes.inc_by(data.len() as u64);
                            tracing::debug!(%peer, piece = index, "serving a piece");
                            PieceResponse::Piece { index, data }
                        }
                        None => PieceResponse::NotFound,
                    };
                    let _ = client.respond(channel, response).await;
                });
            }
        }
    }
}

/// The answer to a `PublicSeen` or `TagSeen` request: what this node saw itself, `NotSeen`, or
/// `BadRequest` for names that cannot exist (the request's size is bounded by the codec).
fn answer_attestation(attest: &dyn Attest, request: &PieceRequest) -> PieceResponse {
    match request {
        PieceRequest::PublicSeen { registry, repo, digest } => match names(registry, repo) {
            Err(why) => bad_request(why),
            Ok((registry, repo)) => match attest.public_seen(&registry, &repo, &Digest::from_sha256(*digest))
            {
                Some(age) => PieceResponse::PublicSeen { age_ms: millis(age) },
                None => PieceResponse::NotSeen,
            },
        },
        PieceRequest::TagSeen { registry, repo, tag } => {
            let parsed = names(registry, repo)
                .and_then(|(r, n)| Ok((r, n, tag.parse::<Tag>().map_err(|e| format!("tag: {e}"))?)));
            match parsed {
                Err(why) => bad_request(why),
                Ok((registry, repo, tag)) => match attest.tag_seen(&registry, &repo, &tag) {
                    Some((resolved, age))
                        if resolved.media_type.len() <= shoal_protocol::piece::MAX_MEDIA_TYPE_BYTES =>
                    {
                        PieceResponse::TagSeen(TagSeenInfo {
                            digest: *resolved.digest.as_bytes(),
                            media_type: resolved.media_type,
                            size: resolved.size,
                            age_ms: millis(age),
                        })
                    }
                    _ => PieceResponse::NotSeen,
                },
            }
        }
        PieceRequest::Have { .. } | PieceRequest::Piece { .. } => {
            bad_request("not an attestation request".to_string())
        }
    }
}

/// A registry and repository named in a peer's request, validated as a client's would be.
fn names(registry: &str, repo: &str) -> Result<(Registry, RepoName), String> {
    let registry = registry.parse::<Registry>().map_err(|e| format!("registry: {e}"))?;
    let repo = repo.parse::<RepoName>().map_err(|e| format!("repository: {e}"))?;
    Ok((registry, repo))
}

fn bad_request(why: String) -> PieceResponse {
    PieceResponse::BadRequest(crate::sync::clip(why, MAX_REASON_BYTES))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Peers asked at most about one object or tag.
const MAX_ATTESTORS: usize = 16;
/// How long a peer has to answer an attestation question.
const ATTESTATION_TIMEOUT: Duration = Duration::from_secs(3);

/// The swarm's [`Attestors`]: the connected peers, then (for a digest, if none of them saw
/// it public) the providers the DHT names, at most [`MAX_ATTESTORS`] in all, asked at once.
pub struct PeerAttestors {
    client: Client,
}

impl PeerAttestors {
    pub fn new(client: Client) -> Self {
        PeerAttestors { client }
    }
}

/// Asks each of `peers` `request` at once, each within [`ATTESTATION_TIMEOUT`]; the answers
/// that came.
async fn ask_all(client: &Client, peers: Vec<PeerId>, request: PieceRequest) -> Vec<(PeerId, PieceResponse)> {
    let asks = peers.into_iter().map(|peer| {
        let (client, request) = (client.clone(), request.clone());
        async move {
            match tokio::time::timeout(ATTESTATION_TIMEOUT, client.request(peer, request)).await {
                Ok(Ok(response)) => Some((peer, response)),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "no attestation answer");
                    None
                }
                Err(_) => None,
            }
        }
    });
    futures_util::future::join_all(asks).await.into_iter().flatten().collect()
}

impl Attestors for PeerAttestors {
    fn public_seen(
        &self,
        registry: &Registry,
        repo: &RepoName,
        digest: &Digest,
    ) -> BoxFuture<'static, Vec<Duration>> {
        let client = self.client.clone();
        let request = PieceRequest::PublicSeen {
            registry: registry.to_string(),
            repo: repo.to_string(),
            digest: *digest.as_bytes(),
        };
        let digest = *digest;
        Box::pin(async move {
            let ages = |answers: Vec<(PeerId, PieceResponse)>| -> Vec<Duration> {
                answers
                    .into_iter()
                    .filter_map(|(_, r)| match r {
                        PieceResponse::PublicSeen { age_ms } => Some(Duration::from_millis(age_ms)),
                        _ => None,
                    })
                    .collect()
            };
            let connected = client.peers(MAX_ATTESTORS).await;
            let seen = ages(ask_all(&client, connected.clone(), request.clone()).await);
            if !seen.is_empty() {
                return seen;
            }
            let providers = client.find_providers(digest, LOOKUP_TIMEOUT).await.unwrap_or_default();
            let others: Vec<PeerId> =
                providers.into_iter().filter(|p| !connected.contains(p)).take(MAX_ATTESTORS).collect();
            ages(ask_all(&client, others, request).await)
        })
    }

    fn tag_seen(
        &self,
        registry: &Registry,
        repo: &RepoName,
        tag: &Tag,
    ) -> BoxFuture<'static, Vec<(Resolved, Duration)>> {
        let client = self.client.clone();
        let request = PieceRequest::TagSeen {
            registry: registry.to_string(),
            repo: repo.to_string(),
            tag: tag.to_string(),
        };
        Box::pin(async move {
            let connected = client.peers(MAX_ATTESTORS).await;
            ask_all(&client, connected, request)
                .await
                .into_iter()
                .filter_map(|(_, r)| match r {
                    PieceResponse::TagSeen(info) => Some((
                        Resolved {
                            digest: Digest::from_sha256(info.digest),
                            media_type: info.media_type,
                            size: info.size,
                        },
                        Duration::from_millis(info.age_ms),
                    )),
                    _ => None,
                })
                .collect()
        })
    }
}

/// One upload slot of `peer`, given back when the upload ends (or its task is dropped).
struct UploadSlot {
    shares: Arc<Mutex<shares::Shares<PeerId>>>,
    peer: PeerId,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        crate::sync::lock(&self.shares).release(&self.peer);
    }
}

/// The fault `--fault-lie-about-size` injects: a consistent, complete answer for a blob 1 MiB
/// longer than it is, attesting the real pieces honestly.
fn lie_about_size(mut have: PeerHave) -> PeerHave {
    let layout = crate::pieces::Layout::for_size(have.size + (1 << 20));
    have.size = layout.size;
    have.piece_size = layout.piece_size;
    have.have = crate::pieces::Bitfield::new(layout.pieces());
    (0..layout.pieces()).for_each(|i| have.have.set(i));
    have.piece_digests.retain(|(i, _)| *i < layout.pieces());
    have.complete = true;
    have
}

/// Copies the swarm's counters into the Prometheus metrics every `period`, until `cancel`.
pub async fn export_stats(stats: Arc<SwarmStats>, period: Duration, cancel: CancellationToken) {
    {
        let mut tick = tokio::time::interval(period);
        let (mut lookups_seen, mut ms_seen, mut refused_seen) = (0, 0, 0);
        let (mut received_seen, mut sent_seen) = (0, 0);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = cancel.cancelled() => return,
            }
            METRICS.connected_peers.set(stats.connected_peers.load(Ordering::Relaxed) as i64);
            let refused = stats.connections_refused.load(Ordering::Relaxed);
            METRICS.peer_connections_refused.inc_by(refused.saturating_sub(refused_seen));
            refused_seen = refused;
            let lookups = stats.dht_lookups.load(Ordering::Relaxed);
            let ms = stats.dht_lookup_ms_total.load(Ordering::Relaxed);
            METRICS.dht_lookups.inc_by(lookups.saturating_sub(lookups_seen));
            METRICS.dht_lookup_seconds.inc_by(ms.saturating_sub(ms_seen) as f64 / 1000.0);
            (lookups_seen, ms_seen) = (lookups, ms);
            let received = stats.dht_requests_received.load(Ordering::Relaxed);
            let sent = stats.dht_requests_sent.load(Ordering::Relaxed);
            METRICS.dht_requests_received.inc_by(received.saturating_sub(received_seen));
            METRICS.dht_requests_sent.inc_by(sent.saturating_sub(sent_seen));
            (received_seen, sent_seen) = (received, sent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Saw `reg.test/pub/app` public: one digest, and tag `v1`.
    struct Seen;

    impl Attest for Seen {
        fn public_seen(&self, registry: &Registry, repo: &RepoName, digest: &Digest) -> Option<Duration> {
            (registry.as_str() == "reg.test" && repo.as_str() == "pub/app" && *digest == Digest::of(b"x"))
                .then_some(Duration::from_millis(1500))
        }

        fn tag_seen(&self, registry: &Registry, repo: &RepoName, tag: &Tag) -> Option<(Resolved, Duration)> {
            let seen = registry.as_str() == "reg.test" && repo.as_str() == "pub/app" && tag.as_str() == "v1";
            let resolved = Resolved { digest: Digest::of(b"m"), media_type: "a/b".into(), size: 3 };
            seen.then_some((resolved, Duration::from_secs(2)))
        }
    }

    fn seen(registry: &str, repo: &str, digest: Digest) -> PieceResponse {
        let request = PieceRequest::PublicSeen {
            registry: registry.into(),
            repo: repo.into(),
            digest: *digest.as_bytes(),
        };
        answer_attestation(&Seen, &request)
    }

    fn tag(registry: &str, repo: &str, tag: &str) -> PieceResponse {
        let request = PieceRequest::TagSeen { registry: registry.into(), repo: repo.into(), tag: tag.into() };
        answer_attestation(&Seen, &request)
    }

    #[test]
    fn attestations_answer_exactly_what_was_seen() {
        assert_eq!(seen("reg.test", "pub/app", Digest::of(b"x")), PieceResponse::PublicSeen { age_ms: 1500 });
        assert_eq!(seen("reg.test", "pub/other", Digest::of(b"x")), PieceResponse::NotSeen);
        assert_eq!(seen("reg.test", "pub/app", Digest::of(b"y")), PieceResponse::NotSeen);
        let info = TagSeenInfo {
            digest: *Digest::of(b"m").as_bytes(),
            media_type: "a/b".into(),
            size: 3,
            age_ms: 2000,
        };
        assert_eq!(tag("reg.test", "pub/app", "v1"), PieceResponse::TagSeen(info));
        assert_eq!(tag("reg.test", "pub/app", "v2"), PieceResponse::NotSeen);
    }

    /// Names no client could send get a reason, bounded, and touch nothing.
    #[test]
    fn malformed_attestation_requests_get_a_clear_error() {
        let bad = |r: PieceResponse| match r {
            PieceResponse::BadRequest(why) => {
                assert!(why.len() <= MAX_REASON_BYTES, "{why}");
                why
            }
            other => panic!("answered {other:?}"),
        };
        assert!(bad(seen("reg test", "pub/app", Digest::of(b"x"))).starts_with("registry"));
        assert!(bad(seen("reg.test", "Pub//app", Digest::of(b"x"))).starts_with("repository"));
        assert!(bad(seen("", "", Digest::of(b"x"))).starts_with("registry"));
        assert!(bad(tag("reg.test", "pub/app", "bad tag!")).starts_with("tag"));
        assert!(bad(tag("reg.test", "pub/app", &"t".repeat(900))).starts_with("tag"));
        let long = "a".repeat(900);
        bad(seen("reg.test", &long, Digest::of(b"x")));
        bad(answer_attestation(&Seen, &PieceRequest::Have { digest: [0; 32] }));
    }
}
