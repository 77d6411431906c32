//! Download tasks: one per digest per node, joined by every local request for that digest
//! (single flight), fed by verified pieces from peers and from the origin, streamed to every
//! client as bytes become contiguous, committed to the store only after the whole sha256
//! matched.
//!
//! A download writes pieces into a partial file at their offsets and publishes a contiguous
//! watermark (`available`) on a `watch` channel. Readers ([`BlobStream`]) read the partial
//! file up to the watermark, waiting for more; they never hold the blob in memory, and the
//! last byte of a blob is released only once the whole digest matched, so a client never sees
//! a complete response with wrong bytes. When the download ends, the partial file is renamed
//! into the store (readers keep their open file) or deleted, and every reader's stream ends
//! with an error.
//!
//! The decisions of a download (who to ask for which piece, origin ownership, takeover,
//! repair) are the pure [`scheduler`], following the plans of the digest's planner (a
//! tracker, or the digest's coordinator: `p2p::coordinator`); [`task`] is the I/O shell that
//! runs a scheduler; the network it asks is behind [`net::Network`].

mod meta;
pub mod net;
pub mod scheduler;
mod task;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use crate::origin::{Kind, Origin, OriginError};
use crate::ratelimit::RateLimiter;
use crate::store::{Entry, Partial, ReadGuard, Store, StoreError};
use crate::supervise::Supervisor;
use crate::types::{Digest, Registry, RepoName};
pub use meta::PieceMap;
use net::{Network, NodeId, PeerHave};

/// Largest chunk a reader sends to its client at once.
const READ_CHUNK: usize = 256 << 10;
/// How long a peer that sent bad data is not asked again.
const BAN_DURATION: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Origin(#[from] OriginError),
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading the partial download: {0}")]
    Read(std::io::Error),
    #[error("no peer holds {0} and the origin cannot be asked for it ({1})")]
    NoSource(Digest, String),
    /// The agent is shutting down: the verified pieces were saved for the next run.
    #[error("the agent is shutting down; verified pieces are kept for the next start")]
    ShuttingDown,
}

/// Where a download gets its bytes from the origin, from the first request that started it.
#[derive(Clone, Debug)]
pub struct Source {
    pub registry: Registry,
    pub repo: RepoName,
    pub kind: Kind,
    /// `Accept` for manifest requests.
    pub accept: String,
}

/// The state of one download, as readers see it.
#[derive(Clone, Debug)]
pub enum Progress {
    /// Looking for peers and the size.
    Starting,
    /// `available` contiguous bytes from 0 are verified piece by piece and readable.
    Running {
        total: u64,
        media_type: Option<String>,
        available: u64,
    },
    /// The whole digest matched; the blob is in the store.
    Complete {
        total: u64,
        media_type: Option<String>,
    },
    Failed(Arc<FetchError>),
}

/// Tuning of downloads; defaults suit a node on a 1–10 Gbit/s cluster network.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Piece requests to peers in flight at once, per download.
    pub peer_concurrency: usize,
    /// Piece requests to one peer in flight at once, per download.
    pub per_peer_concurrency: usize,
    /// Origin range requests in flight at once, per download.
    pub origin_concurrency: usize,
    /// How long a piece owned by another node may stay unavailable before we take it from the
    /// origin ourselves.
    pub owner_stall: Duration,
    /// Bytes per second received from peers and the origin together (`None`: no limit).
    pub max_download_rate: Option<u64>,
    /// With the origin failing, a download gives up after this long without a verified
    /// piece (`--download-give-up`).
    pub give_up_after: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            peer_concurrency: 16,
            per_peer_concurrency: 4,
            origin_concurrency: 4,
            owner_stall: Duration::from_secs(30),
            max_download_rate: None,
            give_up_after: scheduler::GIVE_UP_AFTER,
        }
    }
}

/// What the task shares with readers and with peers asking for pieces. The scheduler owns
/// the piece map: `Have` answers and piece serving read it, so peers are served exactly what
/// they are told.
struct Shared {
    partial: Partial,
    sched: scheduler::Scheduler,
    media_type: Option<String>,
}

pub struct Download {
    digest: Digest,
    progress: watch::Sender<Progress>,
    /// The partial file and piece map while the download runs; `None` before the size is
    /// known and once it was committed or discarded. Opening the file and renaming it both
    /// hold this lock, so a reader never races the rename.
    shared: tokio::sync::Mutex<Option<Shared>>,
    /// Peers that asked us about this digest while it downloads (see [`Fetcher::have`]).
    askers: Mutex<HashSet<NodeId>>,
}

/// Bound on remembered askers per download.
const MAX_ASKERS: usize = 1024;

/// How a request for a digest is served.
pub enum Lookup {
    Cached(Entry, ReadGuard),
    Downloading(Arc<Download>),
}

pub struct Fetcher {
    store: Arc<Store>,
    origin: Arc<Origin>,
    net: Arc<dyn Network>,
    config: FetchConfig,
    download_limit: RateLimiter,
    in_flight: Mutex<HashMap<Digest, Arc<Download>>>,
    /// Peers that sent bad data, until when.
    bans: Mutex<HashMap<NodeId, Instant>>,
    /// Every download runs under it, so SIGTERM stops them, saves their piece maps and
    /// waits for them (see [`crate::supervise`]).
    supervisor: Supervisor,
}

impl Fetcher {
    pub fn new(
        store: Arc<Store>,
        origin: Arc<Origin>,
        net: Arc<dyn Network>,
        config: FetchConfig,
        supervisor: Supervisor,
    ) -> Arc<Self> {
        let download_limit = RateLimiter::new(config.max_download_rate);
        Arc::new(Fetcher {
            store,
            origin,
            net,
            config,
            download_limit,
            in_flight: Mutex::default(),
            bans: Mutex::default(),
            supervisor,
        })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Digests being downloaded now.
    pub fn in_flight_digests(&self) -> Vec<Digest> {
        crate::sync::lock(&self.in_flight).keys().copied().collect()
    }

    /// The stored blob, or the download of it (joining one in flight, else starting one).
    pub fn lookup(self: &Arc<Self>, digest: &Digest, source: &Source) -> Lookup {
        if let Some((entry, guard)) = self.store.get(digest) {
            return Lookup::Cached(entry, guard);
        }
        let mut in_flight = crate::sync::lock(&self.in_flight);
        if let Some(dl) = in_flight.get(digest) {
            return Lookup::Downloading(dl.clone());
        }
        // A download may have committed between the store check and taking the lock.
        if let Some((entry, guard)) = self.store.get(digest) {
            return Lookup::Cached(entry, guard);
        }
        let dl = Arc::new(Download {
            digest: *digest,
            progress: watch::channel(Progress::Starting).0,
            shared: tokio::sync::Mutex::new(None),
            askers: Mutex::default(),
        });
        in_flight.insert(*digest, dl.clone());
        drop(in_flight);
        tracing::info!(%digest, registry = %source.registry, repo = %source.repo, "download started");
        self.supervisor.spawn("download", self.clone().run(dl.clone(), source.clone()));
        Lookup::Downloading(dl)
    }

    /// Stores content whose digest was computed from the bytes themselves (a manifest read
    /// whole while resolving a tag).
    pub async fn store_verified(
        &self,
        digest: &Digest,
        data: &[u8],
        media_type: &str,
    ) -> Result<(), StoreError> {
        if self.store.contains(digest) || crate::sync::lock(&self.in_flight).contains_key(digest) {
            return Ok(());
        }
        let (partial, _) = self.store.open_partial(digest).await?;
        let mut map = PieceMap::new(crate::pieces::Layout::for_size(data.len() as u64));
        for i in 0..map.layout.pieces() {
            let (s, e) = map.layout.range(i);
            map.set(i, *Digest::of(&data[s as usize..e as usize]).as_bytes());
        }
        if let Err(e) = partial.write_at(0, Bytes::copy_from_slice(data)).await {
            partial.discard().await;
            return Err(e);
        }
        self.store.commit(partial, Some(media_type), Some(map.encode_meta())).await?;
        self.net.announce(*digest);
        Ok(())
    }

    fn is_banned(&self, peer: &NodeId) -> bool {
        let mut bans = crate::sync::lock(&self.bans);
        match bans.get(peer) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                bans.remove(peer);
                false
            }
            None => false,
        }
    }

    fn ban(&self, peer: &NodeId, why: &str) {
        tracing::warn!(%peer, why, "banning peer for sending bad data");
        crate::metrics::METRICS.peer_bans.inc();
        crate::sync::lock(&self.bans).insert(peer.clone(), Instant::now() + BAN_DURATION);
    }

    /// What this node holds of `digest`, for a `Have` request from peer `from`. A peer that
    /// asks while we download the digest is downloading it too: the download task counts it
    /// among the nodes that share the origin fetches, even before the DHT says so.
    pub async fn have(&self, digest: &Digest, from: Option<NodeId>) -> Option<PeerHave> {
        let dl = crate::sync::lock(&self.in_flight).get(digest).cloned();
        if let Some(dl) = dl {
            if let Some(from) = from {
                let mut askers = crate::sync::lock(&dl.askers);
                if askers.len() < MAX_ASKERS {
                    askers.insert(from);
                }
            }
            let shared = dl.shared.lock().await;
            if let Some(s) = shared.as_ref() {
                let map = s.sched.map();
                return Some(PeerHave {
                    size: map.layout.size,
                    piece_size: map.layout.piece_size,
                    have: map.verified.clone(),
                    piece_digests: map.attested(),
                    complete: false,
                    media_type: s.media_type.clone(),
                });
            }
        }
        let (entry, guard) = self.store.get(digest)?;
        let map = PieceMap::decode_meta(&self.store.piece_meta(&guard).await?, entry.size)?;
        Some(PeerHave {
            size: entry.size,
            piece_size: map.layout.piece_size,
            have: map.verified.clone(),
            piece_digests: map.attested(),
            complete: true,
            media_type: entry.media_type,
        })
    }

    /// A verified piece of `digest`, for a peer's `Piece` request. Only local pieces are
    /// served: nothing is ever forwarded, so request loops cannot form.
    pub async fn piece(&self, digest: &Digest, index: u32) -> Option<Bytes> {
        let dl = crate::sync::lock(&self.in_flight).get(digest).cloned();
        if let Some(dl) = dl {
            let shared = dl.shared.lock().await;
            if let Some(s) = shared.as_ref() {
                let map = s.sched.map();
                if !map.verified.get(index) {
                    return None;
                }
                let told = map.digests[index as usize];
                let (start, end) = map.layout.range(index);
                let partial = s.partial.clone();
                drop(shared);
                let data = partial.read_at(start, (end - start) as usize).await.ok().map(Bytes::from)?;
                // A repair may have unmarked the piece and rewritten it while we read: serve
                // only bytes that are still what `Have` says.
                let shared = dl.shared.lock().await;
                let still = shared.as_ref().is_some_and(|s| {
                    let map = s.sched.map();
                    map.verified.get(index) && map.digests[index as usize] == told
                });
                return still.then_some(data);
            }
        }
        // Verified against its digest on the way out; a damaged blob is quarantined by the
        // store and the peer is told NotFound (it takes the piece elsewhere).
        let (_, guard) = self.store.get(digest)?;
        match self.store.read_piece(&guard, index).await {
            Ok(data) => Some(data),
            Err(e) => {
                tracing::warn!(%digest, piece = index, error = %e, "not serving a piece to a peer");
                None
            }
        }
    }
}

impl Download {
    /// Waits for the size and media type, or the failure.
    pub async fn started(&self) -> Result<(u64, Option<String>), Arc<FetchError>> {
        let mut rx = self.progress.subscribe();
        let p = rx
            .wait_for(|p| !matches!(p, Progress::Starting))
            .await
            .expect("the sender lives in self")
            .clone();
        match p {
            Progress::Running { total, media_type, .. } | Progress::Complete { total, media_type } => {
                Ok((total, media_type))
            }
            Progress::Failed(e) => Err(e),
            Progress::Starting => unreachable!("waited for a state other than Starting"),
        }
    }

    /// Waits until the download is committed or failed.
    pub async fn finished(&self) -> Result<(), Arc<FetchError>> {
        let mut rx = self.progress.subscribe();
        let p = rx
            .wait_for(|p| matches!(p, Progress::Complete { .. } | Progress::Failed(_)))
            .await
            .expect("the sender lives in self")
            .clone();
        match p {
            Progress::Failed(e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Opens a reader of bytes `start..end` that follows the download. `None` when the
    /// download already finished (committed: read the store instead).
    pub async fn stream(&self, start: u64, end: u64) -> Result<Option<BlobStream>, FetchError> {
        self.follow(start, end, true).await
    }

    async fn follow(&self, start: u64, end: u64, hold_last: bool) -> Result<Option<BlobStream>, FetchError> {
        let shared = self.shared.lock().await;
        let Some(shared) = shared.as_ref() else { return Ok(None) };
        let file = tokio::fs::File::open(shared.partial.path()).await.map_err(FetchError::Read)?;
        Ok(Some(BlobStream {
            file: Arc::new(file.into_std().await),
            pos: start,
            end,
            follow: Some(self.progress.subscribe()),
            hold_last,
            verified: None,
        }))
    }
}

/// The bytes `pos..end` of a blob, read from a file in chunks: a complete blob in the store
/// (pinned by its guard), or a download in flight (following its watermark).
pub struct BlobStream {
    /// Read with `pread` on the blocking pool, straight into the chunk's buffer (a
    /// `tokio::fs::File` would read into its own buffer and copy).
    file: Arc<std::fs::File>,
    pos: u64,
    end: u64,
    follow: Option<watch::Receiver<Progress>>,
    /// Release the blob's last byte only once the whole digest matched.
    hold_last: bool,
    /// A complete blob: verified pieces from the store (then `file` is not read).
    verified: Option<crate::store::VerifiedRead>,
}

/// Why a client's body stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("download failed: {0}")]
    Download(Arc<FetchError>),
    #[error("reading blob: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] crate::store::ReadError),
}

impl BlobStream {
    /// A range of a complete blob in the store, every piece verified before it is sent.
    pub async fn cached(
        store: &Store,
        guard: ReadGuard,
        start: u64,
        end: u64,
    ) -> Result<BlobStream, crate::store::ReadError> {
        let digest = *guard.digest();
        let verified = crate::store::VerifiedRead::open(guard, start, end).await?;
        let file = Arc::new(
            store
                .open_blob_path(&digest)
                .await
                .map_err(|source| crate::store::ReadError::Io { digest, source })?,
        );
        Ok(BlobStream { file, pos: start, end, follow: None, hold_last: false, verified: Some(verified) })
    }

    /// Whether the bytes come from a download in flight (metrics: `origin`) or the cache.
    pub fn is_live(&self) -> bool {
        self.follow.is_some()
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes, StreamError>> {
        if let Some(v) = &mut self.verified {
            return v.next_chunk().await.map(|r| r.map_err(StreamError::from));
        }
        if self.pos >= self.end {
            return None;
        }
        let mut readable = self.end;
        if let Some(rx) = &mut self.follow {
            let (pos, hold_last) = (self.pos, self.hold_last);
            let state = rx
                .wait_for(|p| match p {
                    Progress::Running { available, total, .. } => {
                        let limit =
                            if hold_last { (*available).min(total.saturating_sub(1)) } else { *available };
                        limit > pos
                    }
                    _ => true,
                })
                .await;
            match state.as_deref() {
                Ok(Progress::Running { available, total, .. }) => {
                    let limit =
                        if hold_last { (*available).min(total.saturating_sub(1)) } else { *available };
                    readable = readable.min(limit);
                }
                Ok(Progress::Complete { .. }) => {}
                Ok(Progress::Failed(e)) => return Some(Err(StreamError::Download(e.clone()))),
                Ok(Progress::Starting) | Err(_) => {
                    return Some(Err(StreamError::Io(std::io::Error::other("download vanished"))))
                }
            }
        }
        let want = (readable - self.pos).min(READ_CHUNK as u64) as usize;
        let (file, pos) = (self.file.clone(), self.pos);
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; want];
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, pos).map(|_| buf)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match read {
            Ok(buf) => {
                self.pos += want as u64;
                Some(Ok(Bytes::from(buf)))
            }
            Err(e) => Some(Err(e.into())),
        }
    }

    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, StreamError>> + Send + 'static {
        futures_util::stream::unfold(self, |mut s| async move {
            let item = s.next_chunk().await?;
            if item.is_err() {
                s.pos = s.end; // end the stream after its error
            }
            Some((item, s))
        })
    }
}
