//! The download task of one digest: the I/O shell around its [`Scheduler`].
//!
//! ## What the shell does
//!
//! 1. Announce the digest at once, so nodes that start at the same moment see each other;
//!    then ask the network who provides the digest and what each provider holds.
//! 2. Size: from the providers when they agree, else a HEAD at the origin (no bytes move),
//!    which also bans every provider that named another size. A download that fails on a
//!    size only peers named asks the origin too, and bans them if it disagrees. Nobody waits
//!    for other starters: the digest's planner (a tracker, or its coordinator in the DHT, see
//!    `p2p::coordinator`) splits the origin pieces among whoever asks, from the first plan on.
//! 3. Re-verify the pieces an earlier run saved, build the [`Scheduler`] (see its module docs
//!    for every decision from here on), hand it the `Have` answers, and put it where readers
//!    and peers find it (`Download::shared`): its piece map is the one `Have` answers report
//!    and pieces are served from.
//! 4. Execute its actions (piece requests, origin spans, polls, plans, bans, saves, the
//!    whole-digest check), each as a job that reports an event back, and feed it the events
//!    and the time. Publish the watermark to readers. On [`Action::Done`] commit.
//!
//! Verification happens here, before anything is written: a peer's piece is hashed and
//! compared with the digest the scheduler named; an origin piece is hashed and the digest
//! reported (we attest it).

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::net::{NodeId, PeerError, PeerHave, PlanReport};
use super::scheduler::{self, Action, BanReason, Event, Failure, OriginFailure, Scheduler};
use super::{Download, FetchError, Fetcher, PieceMap, Progress, Shared, Source};
use crate::metrics::METRICS;
use crate::origin::{self, Kind, OriginError};
use crate::pieces::Layout;
use crate::store::Partial;
use crate::types::Digest;

/// What the jobs of a download report to its loop.
enum Msg {
    /// An event for the scheduler.
    Sched(Event),
    /// An origin span ended with this error (the scheduler gets the `OriginDone` after it).
    OriginError(OriginError),
    /// The whole sha256 of the blob, for [`Action::CheckWhole`].
    Whole(Digest),
    /// Something the download cannot go on after (a local write failed, hashing failed).
    Fatal(FetchError),
}

/// What the peers that answered a `Have` say about a blob's size. Only answers whose piece
/// size fits their size under our layout policy count.
#[derive(Debug)]
enum SizeClaim {
    /// Nobody named a size: the origin tells it.
    Unknown,
    /// Every answer that names a size names this one.
    Agreed(PeerHave),
    /// Answers disagree: the origin decides; without it, the size most peers name (ties go to
    /// a peer that holds the whole blob).
    Disputed { majority: PeerHave },
}

impl SizeClaim {
    fn of(answers: &[(NodeId, Result<PeerHave, PeerError>)]) -> SizeClaim {
        let valid: Vec<&PeerHave> = answers
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .filter(|h| Layout::for_size(h.size).piece_size == h.piece_size)
            .collect();
        let Some(first) = valid.first() else { return SizeClaim::Unknown };
        if valid.iter().all(|h| h.size == first.size) {
            return SizeClaim::Agreed((*first).clone());
        }
        let votes = |size: u64| valid.iter().filter(|h| h.size == size).count();
        let majority = valid.iter().max_by_key(|h| (votes(h.size), h.complete)).expect("not empty");
        SizeClaim::Disputed { majority: (*majority).clone() }
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl Fetcher {
    pub(super) async fn run(self: Arc<Self>, dl: Arc<Download>, source: Source) {
        METRICS.downloads_in_flight.inc();
        let digest = dl.digest;
        let result = self.download(&dl, &source).await;
        match result {
            Ok(()) => tracing::info!(%digest, "download verified and stored"),
            Err(FetchError::ShuttingDown) => {
                tracing::info!(%digest, "download stopped for shutdown; verified pieces saved");
                dl.progress.send_replace(Progress::Failed(Arc::new(FetchError::ShuttingDown)));
            }
            Err(e) => {
                if matches!(e, FetchError::DigestMismatch { .. }) {
                    METRICS.origin_digest_mismatches.inc();
                }
                tracing::warn!(%digest, error = %origin::error_chain(&e), "download failed; nothing kept as complete");
                self.net.withdraw(digest);
                dl.progress.send_replace(Progress::Failed(Arc::new(e)));
            }
        }
        crate::sync::lock(&self.in_flight).remove(&digest);
        METRICS.downloads_in_flight.dec();
    }

    async fn download(self: &Arc<Self>, dl: &Arc<Download>, source: &Source) -> Result<(), FetchError> {
        let digest = dl.digest;
        self.net.announce(digest);

        // Who has it, and how big is it?
        let providers = self.live_providers(digest).await;
        let mut answers = self.ask_have(providers, digest).await;
        let claim = SizeClaim::of(&answers);
        let head =
            || self.origin.content_info(&source.registry, &source.repo, source.kind, &digest, &source.accept);
        // The peers whose word the size is, when it is only their word: if the download then
        // fails, the origin is asked whether they lied.
        let named = |size: u64| -> Vec<NodeId> {
            answers
                .iter()
                .filter(|(_, a)| a.as_ref().is_ok_and(|h| h.size == size))
                .map(|(p, _)| p.clone())
                .collect()
        };
        let (total, mut media_type, claimed_size) = match claim {
            SizeClaim::Agreed(h) => (h.size, h.media_type, named(h.size)),
            SizeClaim::Unknown => {
                // Nobody else knows the size: the origin's HEAD, retried with back-off while
                // the origin is only slow or unreachable (a starved node's requests time
                // out), for as long as a download may go without progress.
                let started = Instant::now();
                let mut failures = 0;
                let (size, media_type) = loop {
                    match head().await {
                        Ok(info) => break info,
                        Err(e @ OriginError::Unreachable(_))
                            if started.elapsed() + scheduler::origin_backoff(failures + 1)
                                < self.config.give_up_after =>
                        {
                            failures += 1;
                            tracing::info!(%digest, error = %e, failures, "origin HEAD failed; retrying");
                            tokio::select! {
                                () = tokio::time::sleep(scheduler::origin_backoff(failures)) => {}
                                () = self.supervisor.cancelled() => return Err(FetchError::ShuttingDown),
                            }
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                (size, media_type, Vec::new())
            }
            // A digest has one size: someone lies (or is broken). The origin settles it
            // without sending a byte, and whoever contradicts it is banned.
            SizeClaim::Disputed { majority } => match head().await {
                Ok((size, media_type)) => {
                    for (peer, answer) in &answers {
                        if answer.as_ref().is_ok_and(|h| h.size != size) {
                            self.ban(peer, "claimed a size the origin contradicts");
                        }
                    }
                    (size, media_type, Vec::new())
                }
                Err(e) => {
                    tracing::warn!(%digest, error = %e, size = majority.size,
                            "peers disagree on the size and the origin cannot settle it: taking the size most name");
                    (majority.size, majority.media_type, named(majority.size))
                }
            },
        };
        if source.kind == Kind::Blob {
            media_type = None;
        }
        let layout = Layout::for_size(total);

        // Resume what an earlier run verified, after checking it again.
        let (partial, saved) = self.store.open_partial(&digest).await?;
        // The whole size up front: a full disk fails here, cleanly, not midway.
        self.store.reserve(&partial, total).await?;
        let mut resumed = Vec::new();
        if let Some(saved) = saved.and_then(|b| PieceMap::decode_state(&b, layout)) {
            for i in (0..layout.pieces()).filter(|&i| saved.verified.get(i)) {
                let (s, e) = layout.range(i);
                if let Ok(data) = partial.read_at(s, (e - s) as usize).await {
                    if sha256(&data) == saved.digests[i as usize] {
                        resumed.push((i, saved.digests[i as usize]));
                    }
                }
            }
            tracing::info!(%digest, pieces = resumed.len(), of = layout.pieces(), "resuming verified pieces");
            METRICS.pieces_resumed.inc_by(resumed.len() as u64);
        }

        let me = self.net.local_id();
        let config = scheduler::Config {
            peer_concurrency: self.config.peer_concurrency,
            per_peer_concurrency: self.config.per_peer_concurrency,
            origin_concurrency: self.config.origin_concurrency,
            owner_stall: self.config.owner_stall,
            tracker: self.net.has_coordinator(),
            give_up_after: self.config.give_up_after,
        };
        let now = Instant::now();
        let mut sched = Scheduler::new(config, digest, layout, me.clone(), &resumed, now);
        for (peer, result) in answers.drain(..) {
            sched.handle(Event::Have { peer, result }, now);
        }
        let watermark = sched.watermark();
        *dl.shared.lock().await =
            Some(Shared { partial: partial.clone(), sched, media_type: media_type.clone() });
        dl.progress.send_replace(Progress::Running {
            total,
            media_type: media_type.clone(),
            available: watermark,
        });

        let outcome = self.drive(dl, source, &partial, total).await;

        let mut shared = dl.shared.lock().await;
        let map = shared.take().map(|s| s.sched.map().clone()).unwrap_or_else(|| PieceMap::new(layout));
        match outcome {
            Ok(()) => {
                if source.kind == Kind::Manifest && media_type.is_none() {
                    media_type = sniff_media_type(&partial, total).await;
                }
                self.store.commit(partial, media_type.as_deref(), Some(map.encode_meta())).await?;
                dl.progress.send_replace(Progress::Complete { total, media_type });
                if self.net.has_coordinator() {
                    // Tell the tracker the whole blob verified: its metainfo is complete.
                    let report = PlanReport {
                        size: layout.size,
                        piece_size: layout.piece_size,
                        have: map.verified.clone(),
                        attest: Vec::new(),
                        complete: true,
                        fetching: Vec::new(),
                        planned: true,
                    };
                    tokio::spawn(self.net.plan(digest, report));
                }
                Ok(())
            }
            Err(e) => {
                // A lie about the size that every piece survives (a blob a whole number of
                // pieces long, claimed longer) shows only as a failure: check it, so the next
                // attempt does not believe the same peers.
                if !claimed_size.is_empty() && !matches!(e, FetchError::ShuttingDown) {
                    if let Ok((size, _)) = head().await {
                        if size != total {
                            for peer in &claimed_size {
                                self.ban(peer, "claimed a size the origin contradicts");
                            }
                        }
                    }
                }
                if matches!(e, FetchError::DigestMismatch { .. })
                    || matches!(&e, FetchError::Store(s) if s.is_no_space())
                {
                    // A full disk gets back what this download wrote.
                    partial.discard().await;
                } else {
                    // Keep verified pieces for the next attempt.
                    let _ = partial.save_state(map.encode_state()).await;
                }
                Err(e)
            }
        }
    }

    /// Asks each of `peers` (16 at a time) what it holds of `digest`.
    async fn ask_have(
        &self,
        peers: Vec<NodeId>,
        digest: Digest,
    ) -> Vec<(NodeId, Result<PeerHave, PeerError>)> {
        futures_util::stream::iter(peers)
            .map(|p| {
                let net = self.net.clone();
                async move { (p.clone(), net.have(p, digest).await) }
            })
            .buffer_unordered(16)
            .collect()
            .await
    }

    /// Providers of `digest` we may ask: not us, not banned.
    async fn live_providers(&self, digest: Digest) -> Vec<NodeId> {
        let me = self.net.local_id();
        let found = self.net.find_providers(digest).await;
        found.into_iter().filter(|p| *p != me && !self.is_banned(p)).collect()
    }

    /// Runs the scheduler until it says done or failed: executes its actions, feeds it their
    /// results and the time, publishes the watermark.
    async fn drive(
        self: &Arc<Self>,
        dl: &Arc<Download>,
        source: &Source,
        partial: &Partial,
        total: u64,
    ) -> Result<(), FetchError> {
        let digest = dl.digest;
        let me = self.net.local_id();
        let (tx, mut rx) = mpsc::channel::<Msg>(1024);
        let mut jobs = JoinSet::new();
        // The whole sha256 follows the watermark from the start.
        let mut hasher = Some(tokio::spawn(whole_sha256(dl.clone(), total)));
        let mut last_origin_error: Option<OriginError> = None;
        let mut last_whole: Option<Digest> = None;
        let mut next: Option<Event> = None;
        loop {
            let now = Instant::now();
            let (actions, wake, watermark, layout, state) = {
                let mut shared = dl.shared.lock().await;
                let s = &mut shared.as_mut().expect("the download owns its state").sched;
                s.set_tracker(self.net.has_coordinator(), now);
                let askers: Vec<NodeId> = crate::sync::lock(&dl.askers).drain().collect();
                for p in askers {
                    if p != me && !self.is_banned(&p) {
                        s.handle(Event::Asker(p), now);
                    }
                }
                match next.take() {
                    Some(event) => s.handle(event, now),
                    None => s.handle_timeout(now),
                }
                let actions: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
                let state = actions.contains(&Action::SaveState).then(|| s.map().encode_state());
                (actions, s.poll_timeout(), s.watermark(), s.layout(), state)
            };
            dl.progress.send_if_modified(|p| match p {
                Progress::Running { available, .. } if *available != watermark => {
                    *available = watermark;
                    true
                }
                _ => false,
            });
            for action in actions {
                match action {
                    Action::RequestPiece { peer, index, expected } => {
                        jobs.spawn(peer_piece(
                            self.clone(),
                            peer,
                            digest,
                            index,
                            expected,
                            layout,
                            partial.clone(),
                            tx.clone(),
                        ));
                    }
                    Action::FetchOrigin { first, end, taken_over, unplanned, repair } => {
                        let pieces = u64::from(end - first);
                        if taken_over {
                            METRICS.origin_pieces_taken_over.inc_by(pieces);
                            tracing::debug!(%digest, pieces = ?(first..end), "taking over stalled pieces from the origin");
                        }
                        if unplanned {
                            METRICS.origin_pieces_unplanned.inc_by(pieces);
                            tracing::info!(%digest, pieces = ?(first..end), "origin fetch outside the tracker's plan");
                        }
                        if repair {
                            tracing::debug!(%digest, pieces = ?(first..end), "refetching peer pieces from the origin");
                        }
                        jobs.spawn(origin_span(
                            self.clone(),
                            source.clone(),
                            digest,
                            layout,
                            (first, end),
                            partial.clone(),
                            tx.clone(),
                        ));
                    }
                    Action::AskHave(peer) => {
                        let (net, tx) = (self.net.clone(), tx.clone());
                        jobs.spawn(async move {
                            let result = net.have(peer.clone(), digest).await;
                            let _ = tx.send(Msg::Sched(Event::Have { peer, result })).await;
                        });
                    }
                    Action::FindProviders => {
                        let (this, tx) = (self.clone(), tx.clone());
                        jobs.spawn(async move {
                            let found = this.live_providers(digest).await;
                            let _ = tx.send(Msg::Sched(Event::Providers(found))).await;
                        });
                    }
                    Action::AskPlan(report) => {
                        // Detached: the last report (the final attestations) must arrive even
                        // when the download ends right after.
                        let (net, tx) = (self.net.clone(), tx.clone());
                        tokio::spawn(async move {
                            let plan =
                                if net.has_coordinator() { net.plan(digest, report).await } else { None };
                            let _ = tx.send(Msg::Sched(Event::Plan(plan))).await;
                        });
                    }
                    Action::Ban { peer, reason } => {
                        if reason == BanReason::Contradicted {
                            METRICS.pieces_rejected.inc();
                        }
                        self.ban(&peer, reason.as_str());
                    }
                    Action::SaveState => {
                        if let Some(state) = &state {
                            partial.save_state(state.clone()).await?;
                        }
                    }
                    Action::CheckWhole => {
                        let hashing = hasher.take();
                        let (dl, tx) = (dl.clone(), tx.clone());
                        jobs.spawn(async move {
                            let whole = match hashing {
                                Some(h) => h
                                    .await
                                    .map_err(|e| FetchError::Read(std::io::Error::other(e)))
                                    .and_then(|r| r),
                                None => whole_sha256(dl, total).await,
                            };
                            let _ = tx.send(whole.map_or_else(Msg::Fatal, Msg::Whole)).await;
                        });
                    }
                    Action::Done => return Ok(()),
                    Action::Failed(Failure::OriginNotFound) => {
                        return Err(last_origin_error
                            .take()
                            .unwrap_or_else(|| OriginError::NotFound(digest.to_string()))
                            .into())
                    }
                    Action::Failed(Failure::OriginFailed(why)) => {
                        return Err(FetchError::NoSource(digest, why))
                    }
                    Action::Failed(Failure::DigestMismatch) => {
                        let actual = last_whole.unwrap_or_else(|| Digest::from_sha256([0; 32]));
                        return Err(FetchError::DigestMismatch { expected: digest, actual });
                    }
                }
            }

            // Wait for a result, or the scheduler's next timer (and look at new askers and the
            // tracker's presence at least every HAVE_POLL).
            let wake = wake.unwrap_or(now + scheduler::HAVE_POLL).min(now + scheduler::HAVE_POLL);
            let msg = tokio::select! {
                msg = rx.recv() => msg,
                _ = tokio::time::sleep_until(wake.into()) => None,
                () = self.supervisor.cancelled() => {
                    // Shutdown: stop the jobs, keep what they verified before they stopped
                    // (the caller saves the map), and end.
                    jobs.abort_all();
                    let mut shared = dl.shared.lock().await;
                    let s = &mut shared.as_mut().expect("the download owns its state").sched;
                    while let Ok(msg) = rx.try_recv() {
                        if let Msg::Sched(event @ Event::Verified { .. }) = msg {
                            s.handle(event, Instant::now());
                        }
                    }
                    return Err(FetchError::ShuttingDown);
                }
            };
            next = match msg {
                None => None,
                Some(Msg::Sched(event)) => {
                    match &event {
                        Event::Verified { index, from, .. } => {
                            METRICS.pieces_verified.inc();
                            let bytes = layout.len(*index);
                            if from.is_some() {
                                METRICS.received(bytes, "peer");
                            } else {
                                METRICS.received(bytes, "origin");
                                METRICS.origin_pieces.inc();
                            }
                        }
                        Event::BadPiece { .. } => {
                            METRICS.pieces_rejected.inc();
                        }
                        Event::PeerFailed { index, peer, error } => {
                            tracing::debug!(%digest, piece = index, %peer, %error, "piece request failed");
                        }
                        _ => {}
                    }
                    Some(event)
                }
                Some(Msg::OriginError(error)) => {
                    tracing::warn!(%digest, error = %error, "origin range request failed");
                    last_origin_error = Some(error);
                    None
                }
                Some(Msg::Whole(actual)) => {
                    last_whole = Some(actual);
                    let matched = actual == digest;
                    if matched {
                        let shared = dl.shared.lock().await;
                        if let Some(s) = shared.as_ref() {
                            let stats = s.sched.stats();
                            tracing::info!(
                                %digest,
                                pieces = layout.pieces(),
                                from_origin = stats.from_origin,
                                from_peers = stats.from_peers,
                                downloaders = s.sched.downloaders(),
                                "all pieces verified"
                            );
                        }
                    } else {
                        tracing::warn!(%digest, %actual, "whole digest failed");
                    }
                    Some(Event::WholeDigest { matched })
                }
                Some(Msg::Fatal(e)) => return Err(e),
            };
        }
    }
}

/// The body of an origin response as chunks starting at byte `start` of the object: what an
/// origin that ignored `Range` sends before `start` is skipped, the rate limit applied.
fn body_from(
    fetcher: &Fetcher,
    content: origin::Content,
    start: u64,
) -> Result<impl futures_util::Stream<Item = Result<Bytes, FetchError>> + '_, FetchError> {
    if content.offset > start {
        let why = format!("asked for bytes from {start}, got from {}", content.offset);
        return Err(OriginError::Protocol(why).into());
    }
    let mut skip = start - content.offset;
    let positioned = content.body.bytes_stream().map(move |chunk| {
        let mut chunk = chunk.map_err(|e| OriginError::Unreachable(origin::error_chain(&e)))?;
        if skip > 0 {
            let k = skip.min(chunk.len() as u64) as usize;
            let _ = chunk.split_to(k);
            skip -= k as u64;
        }
        Ok::<_, FetchError>(chunk)
    });
    Ok(positioned.then(move |chunk| async move {
        if let Ok(c) = &chunk {
            fetcher.download_limit.acquire(c.len() as u64).await;
        }
        chunk
    }))
}

/// Reads bytes `start..end` from an origin response (what `origin_span` does piece by piece;
/// the test of an origin that ignores `Range` reads through it).
#[cfg(test)]
async fn read_span(
    fetcher: &Fetcher,
    content: origin::Content,
    start: u64,
    end: u64,
) -> Result<Bytes, FetchError> {
    let mut out = BytesMut::with_capacity((end - start) as usize);
    let mut body = std::pin::pin!(body_from(fetcher, content, start)?);
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        let room = (end - start) as usize - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() as u64 == end - start {
            return Ok(out.freeze());
        }
    }
    Err(OriginError::Unreachable("body ended early".into()).into())
}

/// One piece from a peer, checked against the digest the peer attested, then written.
#[allow(clippy::too_many_arguments)]
async fn peer_piece(
    fetcher: Arc<Fetcher>,
    peer: NodeId,
    digest: Digest,
    index: u32,
    expected: [u8; 32],
    layout: Layout,
    partial: Partial,
    tx: mpsc::Sender<Msg>,
) {
    let result = fetcher.net.piece(peer.clone(), digest, index).await;
    if let Ok(data) = &result {
        fetcher.download_limit.acquire(data.len() as u64).await;
    }
    let event = match result {
        Ok(data) if data.len() as u64 == layout.len(index) && sha256(&data) == expected => {
            match partial.write_at(layout.range(index).0, data).await {
                Ok(()) => Msg::Sched(Event::Verified { index, digest: expected, from: Some(peer) }),
                Err(e) => Msg::Fatal(e.into()),
            }
        }
        Ok(_) => Msg::Sched(Event::BadPiece { index, peer }),
        Err(error) => Msg::Sched(Event::PeerFailed { index, peer, error }),
    };
    let _ = tx.send(event).await;
}

/// Pieces `first..end` from the origin in one `Range` request, each hashed (we attest it)
/// and written as soon as it is whole.
async fn origin_span(
    fetcher: Arc<Fetcher>,
    source: Source,
    digest: Digest,
    layout: Layout,
    (first, end): (u32, u32),
    partial: Partial,
    tx: mpsc::Sender<Msg>,
) {
    let (start, stop) = (layout.range(first).0, layout.range(end - 1).1);
    let mut next = first;
    let result: Result<(), FetchError> = async {
        let content = fetcher
            .origin
            .open_content(
                &source.registry,
                &source.repo,
                source.kind,
                &digest,
                (start, Some(stop)),
                &source.accept,
            )
            .await?;
        let mut body = std::pin::pin!(body_from(&fetcher, content, start)?);
        let mut piece = BytesMut::with_capacity(layout.len(next) as usize);
        while next < end {
            let Some(chunk) = body.next().await else {
                return Err(OriginError::Unreachable("body ended early".into()).into());
            };
            let mut chunk = chunk?;
            while !chunk.is_empty() && next < end {
                let want = layout.len(next) as usize - piece.len();
                let take = want.min(chunk.len());
                piece.extend_from_slice(&chunk.split_to(take));
                if piece.len() as u64 == layout.len(next) {
                    let data = piece.split().freeze();
                    let piece_digest = sha256(&data);
                    partial.write_at(layout.range(next).0, data).await?;
                    let _ = tx
                        .send(Msg::Sched(Event::Verified { index: next, digest: piece_digest, from: None }))
                        .await;
                    next += 1;
                    if next < end {
                        piece.reserve(layout.len(next) as usize);
                    }
                }
            }
        }
        Ok(())
    }
    .await;
    let error = match result {
        Ok(()) => None,
        Err(FetchError::Origin(e)) => Some(e),
        Err(FetchError::Store(e)) => {
            let _ = tx.send(Msg::Fatal(e.into())).await;
            Some(OriginError::Unreachable("local write failed".into()))
        }
        Err(other) => Some(OriginError::Protocol(other.to_string())),
    };
    let failure = error.as_ref().map(|e| match e {
        OriginError::NotFound(_) => OriginFailure::NotFound,
        OriginError::Denied(why) | OriginError::Protocol(why) => OriginFailure::Final(why.clone()),
        other => OriginFailure::Failed(other.to_string()),
    });
    if let Some(e) = error {
        let _ = tx.send(Msg::OriginError(e)).await;
    }
    let unfinished = (next..end).collect();
    let _ = tx.send(Msg::Sched(Event::OriginDone { first, end, unfinished, error: failure })).await;
}

/// The sha256 of the whole blob, computed by following the watermark.
async fn whole_sha256(dl: Arc<Download>, total: u64) -> Result<Digest, FetchError> {
    let Some(stream) = dl.follow(0, total, false).await? else {
        return Err(FetchError::Read(std::io::Error::other("download finished before hashing")));
    };
    let mut hasher = Sha256::new();
    let mut chunks = std::pin::pin!(stream.into_stream());
    while let Some(chunk) = chunks.next().await {
        match chunk {
            Ok(bytes) => hasher.update(&bytes),
            Err(e) => return Err(FetchError::Read(std::io::Error::other(e.to_string()))),
        }
    }
    Ok(Digest::from_sha256(hasher.finalize().into()))
}

/// The `mediaType` field of a manifest, when no source told us its type.
async fn sniff_media_type(partial: &Partial, total: u64) -> Option<String> {
    if total > crate::origin::MAX_MANIFEST_BYTES {
        return None;
    }
    let bytes = partial.read_at(0, total as usize).await.ok()?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("mediaType")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pieces::Bitfield;

    fn answer(peer: u8, size: u64, complete: bool) -> (NodeId, Result<PeerHave, PeerError>) {
        let layout = Layout::for_size(size);
        let mut have = Bitfield::new(layout.pieces());
        if complete {
            (0..layout.pieces()).for_each(|i| have.set(i));
        }
        let info = PeerHave {
            size,
            piece_size: layout.piece_size,
            have,
            piece_digests: Vec::new(),
            complete,
            media_type: None,
        };
        (NodeId::new(&[peer]), Ok(info))
    }

    #[test]
    fn size_claims_agree_or_are_disputed() {
        let size = |c: SizeClaim| match c {
            SizeClaim::Unknown => None,
            SizeClaim::Agreed(h) => Some(("agreed", h.size)),
            SizeClaim::Disputed { majority } => Some(("disputed", majority.size)),
        };
        assert_eq!(size(SizeClaim::of(&[])), None);
        let lacks = (NodeId::new(&[9]), Err(PeerError::Lacks));
        assert_eq!(size(SizeClaim::of(std::slice::from_ref(&lacks))), None);
        let agreed = [answer(1, 5 << 20, true), lacks.clone(), answer(2, 5 << 20, false)];
        assert_eq!(size(SizeClaim::of(&agreed)), Some(("agreed", 5 << 20)));
        // A piece size our policy would not pick for that size does not count.
        let mut odd = answer(3, 1 << 30, true);
        if let Ok(h) = &mut odd.1 {
            h.piece_size = 4096;
        }
        assert_eq!(size(SizeClaim::of(&[odd.clone(), answer(1, 7, true)])), Some(("agreed", 7)));
        let two_to_one = [answer(1, 100, true), answer(2, 999, true), answer(3, 999, false)];
        assert_eq!(size(SizeClaim::of(&two_to_one)), Some(("disputed", 999)));
        // A tie goes to the peer holding the whole blob.
        let tie = [answer(1, 100, false), answer(2, 999, true)];
        assert_eq!(size(SizeClaim::of(&tie)), Some(("disputed", 999)));
        let tie = [answer(1, 100, true), answer(2, 999, false)];
        assert_eq!(size(SizeClaim::of(&tie)), Some(("disputed", 100)));
    }

    /// An origin that ignores `Range` answers from byte 0 in several chunks: the reader skips
    /// exactly the bytes before `start`, across chunk boundaries.
    #[tokio::test]
    async fn span_from_an_origin_that_ignores_range() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path(), 1 << 30).unwrap();
        let origin = Arc::new(crate::origin::Origin::new(Default::default(), Default::default()).unwrap());
        let fetcher = Fetcher::new(
            store,
            origin,
            Arc::new(super::super::net::Solo::default()),
            Default::default(),
            Default::default(),
        );
        let data: Vec<u8> = (0..100u8).collect();
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = data.chunks(7).map(|c| Ok(c.to_vec())).collect();
        let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        let resp = reqwest::Response::from(axum::http::Response::new(body));
        let content = origin::Content { total: 100, offset: 0, media_type: None, body: resp };
        let got = read_span(&fetcher, content, 20, 60).await.unwrap();
        assert_eq!(&got[..], &data[20..60]);
    }
}
