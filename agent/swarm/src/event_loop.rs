//! The task that owns the [`Swarm`]: it reacts to network events and to [`Command`]s from
//! [`super::Client`]s, and keeps every pending reply in a map keyed by the libp2p id of the
//! operation it waits for. It never does disk I/O and never waits on another task: replies are
//! oneshots, inbound requests leave through `try_send`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::core::ConnectedPoint;
use libp2p::futures::stream::FuturesUnordered;
use libp2p::futures::StreamExt;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, GetProvidersOk, ProviderRecord, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundFailure, OutboundRequestId};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{DialError, SwarmEvent};
use libp2p::{identify, Multiaddr, PeerId, Swarm};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;

use super::behaviour::{Behaviour, BehaviourEvent, KAD_PROTOCOL};
use super::client::{
    Command, InboundRequest, InboundTrackerRequest, RequestError, ResponseHandle, TrackerResponseHandle,
};
use super::{is_loopback, Bootstrap, SwarmConfig, SwarmError, SwarmStats};
use crate::codec::TRACKER_PROTOCOL;
use shoal_protocol::piece::{PieceRequest, PieceResponse};
use shoal_protocol::tracker::{TrackerRequest, TrackerResponse};
use shoal_protocol::types::Digest;

/// Every held digest is re-published this often (well within the provider record TTL).
pub(crate) const REPUBLISH_INTERVAL: Duration = Duration::from_secs(10 * 60);
/// Bootstrap peers are redialed, and DNS names re-resolved, this often.
const BOOTSTRAP_INTERVAL: Duration = Duration::from_secs(30);
/// Provider publications in flight at once; the rest wait in a queue.
const MAX_CONCURRENT_PUBLISH: usize = 32;
/// A bootstrap peer (re)connecting triggers a re-publication at most this often.
const BOOTSTRAP_REPUBLISH_THROTTLE: Duration = Duration::from_secs(30);
/// Providers a lookup dials right away (while the query still knows their addresses).
const MAX_EAGER_DIALS: usize = 8;
/// Addresses kept from one DNS resolution.
const MAX_RESOLVED_ADDRS: usize = 256;
/// One DNS resolution gives up after this long.
const DNS_TIMEOUT: Duration = Duration::from_secs(10);

struct PendingFind {
    key: RecordKey,
    providers: HashSet<PeerId>,
    dialed: usize,
    started: Instant,
    reply: oneshot::Sender<Vec<PeerId>>,
}

type Deadline = Pin<Box<dyn Future<Output = QueryId> + Send>>;

/// Runs the swarm; spawn [`EventLoop::run`].
pub struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    inbound: mpsc::Sender<InboundRequest>,
    tracker_inbound: mpsc::Sender<InboundTrackerRequest>,
    stats: Arc<SwarmStats>,
    local_peer_id: PeerId,
    /// What identify told of connected peers: listen addresses, and whether the peer is a
    /// tracker (answers the tracker protocol).
    identified: HashMap<PeerId, (Vec<Multiaddr>, bool)>,
    pending_tracker_requests:
        HashMap<OutboundRequestId, oneshot::Sender<Result<TrackerResponse, RequestError>>>,

    static_bootstrap: Vec<(PeerId, Multiaddr)>,
    dns_bootstrap: Vec<(String, u16)>,
    /// Addresses from the last DNS resolution, with the peer that answered there once known
    /// (ourselves included: a headless Service lists this node too).
    resolved: HashMap<Multiaddr, Option<PeerId>>,

    /// Digests we provide, and the bounded publication pipeline.
    provided: HashSet<Digest>,
    publish_queue: VecDeque<Digest>,
    queued: HashSet<Digest>,
    publishing: HashSet<QueryId>,
    last_bootstrap_republish: Option<Instant>,

    pending_requests: HashMap<OutboundRequestId, oneshot::Sender<Result<PieceResponse, RequestError>>>,
    pending_finds: HashMap<QueryId, PendingFind>,
    /// Closest-peer lookups in flight: the digest and who waits for the answer.
    pending_closest: HashMap<QueryId, (Digest, oneshot::Sender<Vec<PeerId>>)>,
    find_deadlines: FuturesUnordered<Deadline>,
    pending_listen_addrs: Vec<oneshot::Sender<Vec<Multiaddr>>>,
    active_listeners: usize,
}

fn record_key(digest: &Digest) -> RecordKey {
    RecordKey::new(digest.as_bytes())
}

/// `addr` without a trailing `/p2p/<peer>`.
fn without_peer(mut addr: Multiaddr) -> Multiaddr {
    if let Some(Protocol::P2p(_)) = addr.iter().last() {
        addr.pop();
    }
    addr
}

fn request_error(failure: OutboundFailure) -> RequestError {
    match failure {
        OutboundFailure::DialFailure => RequestError::Unreachable,
        OutboundFailure::Timeout => RequestError::Timeout,
        OutboundFailure::ConnectionClosed => RequestError::ConnectionClosed,
        OutboundFailure::UnsupportedProtocols => {
            RequestError::Protocol("the peer does not speak /shoal/piece/1.0.0".to_string())
        }
        // Our codec reports undecodable, oversized or inconsistent answers as InvalidData.
        OutboundFailure::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
            RequestError::Protocol(e.to_string())
        }
        OutboundFailure::Io(_) => RequestError::ConnectionClosed,
    }
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        inbound: mpsc::Sender<InboundRequest>,
        tracker_inbound: mpsc::Sender<InboundTrackerRequest>,
        stats: Arc<SwarmStats>,
        config: &SwarmConfig,
    ) -> Self {
        let mut static_bootstrap = Vec::new();
        let mut dns_bootstrap = Vec::new();
        for entry in &config.bootstrap {
            match entry {
                Bootstrap::Peer { peer, addr } => static_bootstrap.push((*peer, addr.clone())),
                Bootstrap::Dns { host, port } => dns_bootstrap.push((host.clone(), *port)),
            }
        }
        EventLoop {
            local_peer_id: *swarm.local_peer_id(),
            swarm,
            commands,
            inbound,
            tracker_inbound,
            identified: HashMap::new(),
            pending_tracker_requests: HashMap::new(),
            stats,
            static_bootstrap,
            dns_bootstrap,
            resolved: HashMap::new(),
            provided: HashSet::new(),
            publish_queue: VecDeque::new(),
            queued: HashSet::new(),
            publishing: HashSet::new(),
            last_bootstrap_republish: None,
            pending_requests: HashMap::new(),
            pending_finds: HashMap::new(),
            pending_closest: HashMap::new(),
            find_deadlines: FuturesUnordered::new(),
            pending_listen_addrs: Vec::new(),
            active_listeners: config.listen.len(),
        }
    }

    /// Runs until `shutdown` completes or every [`super::Client`] is dropped. Pending calls
    /// then fail with `Stopped`.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let (resolved_tx, mut resolved_rx) = mpsc::channel(1);
        let resolver = (!self.dns_bootstrap.is_empty())
            .then(|| tokio::spawn(resolve_periodically(self.dns_bootstrap.clone(), resolved_tx)));
        let has_resolver = resolver.is_some();

        for (peer, addr) in &self.static_bootstrap {
            self.swarm.behaviour_mut().kad.add_address(peer, addr.clone());
        }
        self.dial_bootstrap();
        let start = tokio::time::Instant::now();
        let mut maintenance = tokio::time::interval_at(start + BOOTSTRAP_INTERVAL, BOOTSTRAP_INTERVAL);
        maintenance.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut republish = tokio::time::interval_at(start + REPUBLISH_INTERVAL, REPUBLISH_INTERVAL);
        republish.set_missed_tick_behavior(MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => {
                        tracing::debug!("every swarm client is gone");
                        break;
                    }
                },
                Some(addrs) = resolved_rx.recv(), if has_resolver => self.on_resolved(addrs),
                Some(id) = self.find_deadlines.next(), if !self.find_deadlines.is_empty() => {
                    self.on_find_deadline(id)
                }
                _ = maintenance.tick() => {
                    self.dial_bootstrap();
                    self.dial_resolved();
                }
                _ = republish.tick() => self.republish_all(),
                () = &mut shutdown => break,
            }
        }
        if let Some(resolver) = resolver {
            resolver.abort();
        }
        tracing::info!("swarm stopped");
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::TrackerRequest { peer, request, reply } => {
                if peer == self.local_peer_id {
                    let _ = reply.send(Err(RequestError::Unreachable));
                    return;
                }
                let id = self.swarm.behaviour_mut().tracker.send_request(&peer, request);
                self.pending_tracker_requests.insert(id, reply);
            }
            Command::RespondTracker { channel, response } => {
                if self.swarm.behaviour_mut().tracker.send_response(channel.0, response).is_err() {
                    tracing::debug!("tracker requester gone before the answer");
                }
            }
            Command::RedialBootstrap => {
                self.dial_bootstrap();
                self.dial_resolved();
            }
            Command::Trackers { reply } => {
                let mut trackers: Vec<PeerId> = self
                    .identified
                    .iter()
                    .filter(|(peer, (_, tracker))| *tracker && self.swarm.is_connected(peer))
                    .map(|(peer, _)| *peer)
                    .collect();
                trackers.sort();
                let _ = reply.send(trackers);
            }
            Command::ListenAddrs { reply } => {
                if self.swarm.listeners().next().is_none() && self.active_listeners > 0 {
                    self.pending_listen_addrs.push(reply);
                } else {
                    let _ = reply.send(self.swarm.listeners().cloned().collect());
                }
            }
            Command::StartProviding { digest, reply } => {
                let _ = reply.send(self.start_providing(digest));
            }
            Command::StopProviding { digest } => {
                self.provided.remove(&digest);
                self.swarm.behaviour_mut().kad.stop_providing(&record_key(&digest));
            }
            Command::FindProviders { digest, timeout, reply } => {
                let key = record_key(&digest);
                let id = self.swarm.behaviour_mut().kad.get_providers(key.clone());
                let find =
                    PendingFind { key, providers: HashSet::new(), dialed: 0, started: Instant::now(), reply };
                self.pending_finds.insert(id, find);
                let deadline = tokio::time::sleep(timeout);
                self.find_deadlines.push(Box::pin(async move {
                    deadline.await;
                    id
                }));
            }
            Command::ClosestPeers { digest, reply } => {
                let id = self.swarm.behaviour_mut().kad.get_closest_peers(record_key(&digest).to_vec());
                self.pending_closest.insert(id, (digest, reply));
            }
            Command::Request { peer, request, reply } => {
                if peer == self.local_peer_id {
                    let _ = reply.send(Err(RequestError::Unreachable));
                    return;
                }
                let id = self.swarm.behaviour_mut().pieces.send_request(&peer, request);
                self.pending_requests.insert(id, reply);
            }
            Command::Respond { channel, response } => {
                if self.swarm.behaviour_mut().pieces.send_response(channel.0, response).is_err() {
                    tracing::debug!("piece requester gone before the answer");
                }
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().count());
            }
            Command::Peers { limit, reply } => {
                let _ = reply.send(self.swarm.connected_peers().take(limit).copied().collect());
            }
            Command::AddAddress { peer, addr } => {
                let addr = without_peer(addr);
                self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                self.swarm.add_peer_address(peer, addr);
            }
            Command::Bootstrap => {
                self.dial_bootstrap();
                self.dial_resolved();
                if self.swarm.behaviour_mut().kad.bootstrap().is_err() {
                    tracing::debug!("DHT bootstrap: no known peers yet");
                }
            }
        }
    }

    /// Stores our provider record locally (so lookups that reach us find it at once) and
    /// queues its publication ahead of re-publications.
    fn start_providing(&mut self, digest: Digest) -> Result<(), SwarmError> {
        let record = ProviderRecord::new(record_key(&digest), self.local_peer_id, Vec::new());
        self.swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .add_provider(record)
            .map_err(|e| SwarmError::Provide { digest, reason: e.to_string() })?;
        // Already provided: the periodic re-publication keeps it fresh.
        if self.provided.insert(digest) && self.queued.insert(digest) {
            self.publish_queue.push_front(digest);
            self.pump_publications();
        }
        Ok(())
    }

    fn republish_all(&mut self) {
        let mut added = 0usize;
        for digest in &self.provided {
            if self.queued.insert(*digest) {
                self.publish_queue.push_back(*digest);
                added += 1;
            }
        }
        if added > 0 {
            tracing::debug!(digests = added, "re-publishing provider records");
        }
        self.pump_publications();
    }

    fn pump_publications(&mut self) {
        while self.publishing.len() < MAX_CONCURRENT_PUBLISH {
            let Some(digest) = self.publish_queue.pop_front() else { break };
            self.queued.remove(&digest);
            if !self.provided.contains(&digest) {
                continue;
            }
            match self.swarm.behaviour_mut().kad.start_providing(record_key(&digest)) {
                Ok(id) => {
                    self.publishing.insert(id);
                }
                Err(e) => tracing::warn!(%digest, error = %e, "cannot publish provider record"),
            }
        }
    }

    fn dial_bootstrap(&mut self) {
        for (peer, addr) in &self.static_bootstrap {
            if self.swarm.is_connected(peer) {
                continue;
            }
            let opts = DialOpts::peer_id(*peer)
                .addresses(vec![addr.clone()])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, %addr, error = %e, "cannot dial bootstrap peer");
            }
        }
    }

    /// Dials the resolved DNS addresses whose peer is not known yet (the handshake tells),
    /// and, when no peer behind the name is connected, the known ones too (except us). Once
    /// the node is in the swarm, the DHT keeps it there: a large cluster is not redialed
    /// every round.
    fn dial_resolved(&mut self) {
        let local = self.local_peer_id;
        let isolated = !self
            .resolved
            .values()
            .any(|peer| peer.is_some_and(|p| p != local && self.swarm.is_connected(&p)));
        let targets: Vec<Multiaddr> = self
            .resolved
            .iter()
            .filter(|(_, peer)| match peer {
                Some(peer) => isolated && *peer != local && !self.swarm.is_connected(peer),
                None => true,
            })
            .map(|(addr, _)| addr.clone())
            .collect();
        for addr in targets {
            if let Err(e) = self.swarm.dial(DialOpts::unknown_peer_id().address(addr.clone()).build()) {
                tracing::debug!(%addr, error = %e, "cannot dial bootstrap address");
            }
        }
    }

    fn on_resolved(&mut self, addrs: Vec<Multiaddr>) {
        let mut known = std::mem::take(&mut self.resolved);
        self.resolved = addrs.into_iter().map(|addr| (addr.clone(), known.remove(&addr).flatten())).collect();
        tracing::debug!(addrs = self.resolved.len(), "bootstrap name resolved");
        self.dial_resolved();
    }

    fn on_find_deadline(&mut self, id: QueryId) {
        if self.pending_finds.contains_key(&id) {
            if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                query.finish();
            }
            self.finish_find(id);
        }
    }

    fn finish_find(&mut self, id: QueryId) {
        let Some(find) = self.pending_finds.remove(&id) else { return };
        let ms = find.started.elapsed().as_millis() as u64;
        self.stats.dht_lookups.fetch_add(1, Ordering::Relaxed);
        self.stats.dht_lookup_ms_total.fetch_add(ms, Ordering::Relaxed);
        tracing::debug!(providers = find.providers.len(), ms, "provider lookup done");
        let _ = find.reply.send(find.providers.into_iter().collect());
    }

    fn on_providers_found(&mut self, id: QueryId, providers: HashSet<PeerId>) {
        let local = self.local_peer_id;
        let Some(find) = self.pending_finds.get_mut(&id) else { return };
        let new: Vec<PeerId> =
            providers.into_iter().filter(|p| *p != local && find.providers.insert(*p)).collect();
        if new.is_empty() {
            return;
        }
        // Providers from our own store come with the addresses they announced.
        let key = find.key.clone();
        let records = self.swarm.behaviour_mut().kad.store_mut().providers(&key);
        for record in records.into_iter().filter(|r| new.contains(&r.provider)) {
            for addr in record.addresses {
                self.swarm.add_peer_address(record.provider, addr);
            }
        }
        // Connect now, while the running query can still tell the swarm their addresses:
        // they are about to be asked for pieces, and the connection puts them in the routing
        // table.
        for peer in new {
            let Some(find) = self.pending_finds.get_mut(&id) else { return };
            if find.dialed >= MAX_EAGER_DIALS || self.swarm.is_connected(&peer) {
                continue;
            }
            find.dialed += 1;
            let opts = DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, error = %e, "cannot dial provider");
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.on_kad_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(event)) => self.on_identify_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Pieces(event)) => self.on_piece_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Tracker(event)) => self.on_tracker_event(event),
            SwarmEvent::Behaviour(BehaviourEvent::Limits(never)) => match never {},
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "swarm listening");
                let addrs: Vec<Multiaddr> = self.swarm.listeners().cloned().collect();
                for reply in self.pending_listen_addrs.drain(..) {
                    let _ = reply.send(addrs.clone());
                }
            }
            SwarmEvent::ListenerClosed { addresses, reason, .. } => {
                tracing::warn!(?addresses, ?reason, "swarm listener closed");
                self.active_listeners = self.active_listeners.saturating_sub(1);
                if self.active_listeners == 0 {
                    for reply in self.pending_listen_addrs.drain(..) {
                        let _ = reply.send(Vec::new());
                    }
                }
            }
            SwarmEvent::ListenerError { error, .. } => tracing::warn!(%error, "swarm listener error"),
            SwarmEvent::ConnectionEstablished { peer_id, endpoint, num_established, .. } => {
                self.update_connected();
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    if let Some(slot) = self.resolved.get_mut(address) {
                        *slot = Some(peer_id);
                    }
                }
                if num_established.get() == 1 && self.is_bootstrap_peer(&peer_id) {
                    self.republish_after_joining();
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, num_established, .. } => {
                self.update_connected();
                if num_established == 0 {
                    self.identified.remove(&peer_id);
                    tracing::debug!(peer = %peer_id, ?cause, "disconnected");
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                if let DialError::LocalPeerId { address } = &error {
                    // One of the bootstrap name's addresses is this node.
                    if let Some(slot) = self.resolved.get_mut(address) {
                        *slot = Some(self.local_peer_id);
                    }
                }
                if matches!(error, DialError::Denied { .. }) {
                    self.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(peer = ?peer_id, error = %error, "dial failed");
            }
            SwarmEvent::IncomingConnectionError { send_back_addr, error, .. } => {
                if matches!(error, libp2p::swarm::ListenError::Denied { .. }) {
                    self.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(from = %send_back_addr, error = %error, "inbound connection failed");
            }
            _ => {}
        }
    }

    fn is_bootstrap_peer(&self, peer: &PeerId) -> bool {
        self.static_bootstrap.iter().any(|(p, _)| p == peer)
            || self.resolved.values().any(|p| p.as_ref() == Some(peer))
    }

    /// Re-publishes everything after (re)joining the swarm: a bootstrap peer connected, or
    /// the routing table got its first peer. Records published while alone reached nobody.
    fn republish_after_joining(&mut self) {
        let due = match self.last_bootstrap_republish {
            Some(last) => last.elapsed() >= BOOTSTRAP_REPUBLISH_THROTTLE,
            None => true,
        };
        if due && !self.provided.is_empty() {
            self.last_bootstrap_republish = Some(Instant::now());
            self.republish_all();
        }
    }

    fn update_connected(&self) {
        self.stats.connected_peers.store(self.swarm.connected_peers().count() as u64, Ordering::Relaxed);
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest { .. } => {
                self.stats.dht_requests_received.fetch_add(1, Ordering::Relaxed);
            }
            kad::Event::OutboundQueryProgressed { id, result, step, stats } => {
                if step.last {
                    self.stats
                        .dht_requests_sent
                        .fetch_add(u64::from(stats.num_requests()), Ordering::Relaxed);
                }
                self.on_query_progressed(id, result, step.last);
            }
            kad::Event::RoutingUpdated { peer, is_new_peer: true, .. } => {
                tracing::debug!(%peer, "DHT routing table: new peer");
                let kad = &mut self.swarm.behaviour_mut().kad;
                if kad.kbuckets().map(|bucket| bucket.num_entries()).sum::<usize>() == 1 {
                    self.republish_after_joining();
                }
            }
            _ => {}
        }
    }

    fn on_query_progressed(&mut self, id: QueryId, result: QueryResult, last: bool) {
        match result {
            QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders { providers, .. })) => {
                self.on_providers_found(id, providers);
                if last {
                    self.finish_find(id);
                }
            }
            QueryResult::GetProviders(Ok(GetProvidersOk::FinishedWithNoAdditionalRecord { .. })) => {
                self.finish_find(id);
            }
            QueryResult::GetProviders(Err(e)) => {
                tracing::debug!(error = %e, "provider lookup ended");
                self.finish_find(id);
            }
            QueryResult::StartProviding(result) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "provider record publication incomplete");
                }
                if last && self.publishing.remove(&id) {
                    self.stats.dht_publications.fetch_add(1, Ordering::Relaxed);
                    self.pump_publications();
                }
            }
            QueryResult::GetClosestPeers(result) => {
                let peers = match result {
                    Ok(ok) => ok.peers,
                    // What the lookup found before its deadline is still the best answer.
                    Err(kad::GetClosestPeersError::Timeout { peers, .. }) => peers,
                };
                self.on_closest_peers(id, peers);
            }
            QueryResult::Bootstrap(result) => tracing::trace!(?result, "DHT bootstrap step"),
            _ => {}
        }
    }

    /// A closest-peer lookup ended: this node joins the list, sorted by XOR distance to the
    /// digest's key; the peers' addresses go to the swarm so a request can reach them.
    fn on_closest_peers(&mut self, id: QueryId, found: Vec<kad::PeerInfo>) {
        let Some((digest, reply)) = self.pending_closest.remove(&id) else { return };
        let target = kad::KBucketKey::new(record_key(&digest).to_vec());
        let mut peers = vec![self.local_peer_id];
        for info in found {
            if info.peer_id == self.local_peer_id || peers.contains(&info.peer_id) {
                continue;
            }
            for addr in info.addrs {
                self.swarm.add_peer_address(info.peer_id, without_peer(addr));
            }
            peers.push(info.peer_id);
        }
        peers.sort_by_cached_key(|p| kad::KBucketKey::from(*p).distance(&target));
        let _ = reply.send(peers);
    }

    fn on_identify_event(&mut self, event: identify::Event) {
        let identify::Event::Received { peer_id, info, .. } = event else { return };
        if !info.protocols.contains(&KAD_PROTOCOL) {
            return;
        }
        let is_tracker = info.protocols.contains(&TRACKER_PROTOCOL);
        if is_tracker && !self.identified.get(&peer_id).is_some_and(|(_, t)| *t) {
            tracing::info!(peer = %peer_id, "connected to a tracker");
        }
        // Loopback addresses are only useful to a peer that reached us over loopback.
        let keep_loopback = is_loopback(&info.observed_addr);
        let mut kept = Vec::new();
        for addr in info.listen_addrs {
            let addr = without_peer(addr);
            if is_loopback(&addr) && !keep_loopback {
                continue;
            }
            if kept.len() < shoal_protocol::tracker::MAX_PEER_ADDRS {
                kept.push(addr.clone());
            }
            self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
        }
        self.identified.insert(peer_id, (kept, is_tracker));
    }

    fn on_piece_event(&mut self, event: request_response::Event<PieceRequest, PieceResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    self.on_inbound_request(peer, request, channel)
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(reply) = self.pending_requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                tracing::debug!(%peer, %error, "piece request failed");
                if let Some(reply) = self.pending_requests.remove(&request_id) {
                    let _ = reply.send(Err(request_error(error)));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "answering a piece request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_inbound_request(
        &mut self,
        peer: PeerId,
        request: PieceRequest,
        channel: request_response::ResponseChannel<PieceResponse>,
    ) {
        self.stats.inbound_requests.fetch_add(1, Ordering::Relaxed);
        let request = InboundRequest { peer, request, channel: ResponseHandle(channel) };
        let (request, answer) = match self.inbound.try_send(request) {
            Ok(()) => return,
            Err(TrySendError::Full(request)) => {
                self.stats.inbound_busy.fetch_add(1, Ordering::Relaxed);
                (request, PieceResponse::Busy)
            }
            Err(TrySendError::Closed(request)) => (request, PieceResponse::NotFound),
        };
        let _ = self.swarm.behaviour_mut().pieces.send_response(request.channel.0, answer);
    }
}

impl EventLoop {
    fn on_tracker_event(&mut self, event: request_response::Event<TrackerRequest, TrackerResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    self.stats.tracker_requests.fetch_add(1, Ordering::Relaxed);
                    let addrs = self.identified.get(&peer).map(|(a, _)| a.clone()).unwrap_or_default();
                    let request = InboundTrackerRequest {
                        peer,
                        addrs,
                        request,
                        channel: TrackerResponseHandle(channel),
                    };
                    if let Err(e) = self.tracker_inbound.try_send(request) {
                        // Dropping the channel resets the stream: the agent sees a failure
                        // and goes on in DHT-only mode until the tracker keeps up.
                        self.stats.tracker_requests_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, error = %e, "tracker request dropped");
                    }
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(reply) = self.pending_tracker_requests.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                tracing::debug!(%peer, %error, "tracker request failed");
                if let Some(reply) = self.pending_tracker_requests.remove(&request_id) {
                    let _ = reply.send(Err(request_error(error)));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                // Timeouts and closed connections; malformed requests never get here (the
                // codec counts them, libp2p drops them silently).
                tracing::debug!(%peer, %error, "a tracker request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

/// Resolves the bootstrap names now and every [`BOOTSTRAP_INTERVAL`], sending each complete
/// result to the loop; ends when the loop is gone.
async fn resolve_periodically(names: Vec<(String, u16)>, results: mpsc::Sender<Vec<Multiaddr>>) {
    let mut tick = tokio::time::interval(BOOTSTRAP_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = results.closed() => return,
        }
        let mut addrs = Vec::new();
        let mut seen = HashSet::new();
        for (host, port) in &names {
            match tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((host.as_str(), *port))).await {
                Ok(Ok(found)) => {
                    for socket in found {
                        let addr =
                            Multiaddr::empty().with(socket.ip().into()).with(Protocol::Tcp(socket.port()));
                        if addrs.len() < MAX_RESOLVED_ADDRS && seen.insert(addr.clone()) {
                            addrs.push(addr);
                        }
                    }
                }
                Ok(Err(e)) => tracing::warn!(%host, error = %e, "cannot resolve bootstrap name"),
                Err(_) => tracing::warn!(%host, "resolving bootstrap name timed out"),
            }
        }
        if results.send(addrs).await.is_err() {
            return;
        }
    }
}
