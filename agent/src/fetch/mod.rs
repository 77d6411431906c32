//! Download tasks: one per digest per node, joined by every local request for that digest
//! (single flight), streamed to every client as bytes arrive, committed to the store only
//! after the whole sha256 matched.
//!
//! A download writes to a partial file in the store and publishes a contiguous watermark
//! (`available`) on a `watch` channel. Readers ([`BlobStream`]) open the partial file and read
//! up to the watermark, waiting for more; they never hold the blob in memory. When the
//! download ends, the partial file is renamed into the store (readers keep their open file)
//! or, on a digest mismatch, deleted, and every reader's stream ends with an error, so a
//! client never sees a complete response with wrong bytes.
//!
//! Today the only source is the origin (sequential, resumed with `Range` after a broken
//! connection). The swarm will add pieces from peers: the watermark stays the contract with
//! readers, pieces fill the partial file at their offsets.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::watch;

use crate::metrics::METRICS;
use crate::origin::{self, Kind, Origin, OriginError};
use crate::store::{Entry, ReadGuard, Store, StoreError};
use crate::types::{Digest, Registry, RepoName};

/// How often a download retries after the origin connection broke mid-body.
const MAX_ATTEMPTS: u32 = 5;
/// Bytes gathered from the origin before they are written and published to readers (a
/// smaller write happens whenever no more bytes are ready right away).
const WRITE_BATCH: usize = 256 << 10;
/// Largest chunk a reader sends to its client at once.
const READ_CHUNK: usize = 256 << 10;

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
}

/// Where a download gets its bytes, from the first request that started it.
#[derive(Clone, Debug)]
pub struct Source {
    pub registry: Registry,
    pub repo: RepoName,
    pub kind: Kind,
    /// `Accept` for manifest GETs.
    pub accept: String,
}

/// The state of one download, as readers see it.
#[derive(Clone, Debug)]
pub enum Progress {
    /// Waiting for the origin's first answer.
    Starting,
    /// `available` contiguous bytes from 0 are written and readable.
    Running {
        total: u64,
        media_type: Option<String>,
        available: u64,
    },
    /// Verified and in the store.
    Complete {
        total: u64,
        media_type: Option<String>,
    },
    Failed(Arc<FetchError>),
}

pub struct Download {
    digest: Digest,
    progress: watch::Sender<Progress>,
    /// The partial file while the download runs; `None` once it was committed or discarded.
    /// Opening it and renaming it both hold this lock, so a reader never races the rename.
    partial_path: tokio::sync::Mutex<Option<PathBuf>>,
}

/// How a request for a digest is served.
pub enum Lookup {
    Cached(Entry, ReadGuard),
    Downloading(Arc<Download>),
}

pub struct Fetcher {
    store: Arc<Store>,
    origin: Arc<Origin>,
    in_flight: Mutex<HashMap<Digest, Arc<Download>>>,
}

impl Fetcher {
    pub fn new(store: Arc<Store>, origin: Arc<Origin>) -> Arc<Self> {
        Arc::new(Fetcher { store, origin, in_flight: Mutex::default() })
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The stored blob, or the download of it (joining one in flight, else starting one).
    pub fn lookup(self: &Arc<Self>, digest: &Digest, source: &Source) -> Lookup {
        if let Some((entry, guard)) = self.store.get(digest) {
            return Lookup::Cached(entry, guard);
        }
        let mut in_flight = self.in_flight.lock().expect("in-flight lock poisoned");
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
            partial_path: tokio::sync::Mutex::new(None),
        });
        in_flight.insert(*digest, dl.clone());
        drop(in_flight);
        tracing::info!(%digest, registry = %source.registry, repo = %source.repo, "downloading from origin");
        tokio::spawn(self.clone().run(dl.clone(), source.clone()));
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
        if self.store.contains(digest) {
            return Ok(());
        }
        let mut partial = self.store.create_partial(digest).await?;
        if let Err(e) = partial.append(data).await {
            partial.discard().await;
            return Err(e);
        }
        self.store.commit(partial, Some(media_type)).await
    }

    async fn run(self: Arc<Self>, dl: Arc<Download>, source: Source) {
        METRICS.downloads_in_flight.inc();
        let digest = dl.digest;
        match self.download(&dl, &source).await {
            Ok(()) => tracing::info!(%digest, "download verified and stored"),
            Err(e) => {
                if matches!(e, FetchError::DigestMismatch { .. }) {
                    METRICS.origin_digest_mismatches.inc();
                }
                tracing::warn!(%digest, error = %origin::error_chain(&e), "download failed; nothing kept");
                dl.progress.send_replace(Progress::Failed(Arc::new(e)));
            }
        }
        self.in_flight.lock().expect("in-flight lock poisoned").remove(&digest);
        METRICS.downloads_in_flight.dec();
    }

    async fn download(&self, dl: &Download, source: &Source) -> Result<(), FetchError> {
        let mut partial = self.store.create_partial(&dl.digest).await?;
        *dl.partial_path.lock().await = Some(partial.path().to_path_buf());
        let filled = self.fill(dl, source, &mut partial).await;
        let mut path = dl.partial_path.lock().await;
        *path = None;
        match filled {
            Ok((total, media_type)) => {
                self.store.commit(partial, media_type.as_deref()).await?;
                dl.progress.send_replace(Progress::Complete { total, media_type });
                Ok(())
            }
            Err(e) => {
                partial.discard().await;
                Err(e)
            }
        }
    }

    /// Writes the whole object into `partial`, resuming with `Range` after broken
    /// connections, and checks its sha256. Returns its size and media type.
    async fn fill(
        &self,
        dl: &Download,
        source: &Source,
        partial: &mut crate::store::Partial,
    ) -> Result<(u64, Option<String>), FetchError> {
        let mut hasher = Sha256::new();
        let mut known: Option<(u64, Option<String>)> = None;
        let mut attempt = 0;
        loop {
            let written = partial.written();
            if let Some((total, media_type)) = &known {
                if written == *total {
                    let actual = Digest::from_sha256(hasher.finalize().into());
                    if actual != dl.digest {
                        return Err(FetchError::DigestMismatch { expected: dl.digest, actual });
                    }
                    return Ok((*total, media_type.clone()));
                }
            }
            attempt += 1;
            let opened = self
                .origin
                .open_content(
                    &source.registry,
                    &source.repo,
                    source.kind,
                    &dl.digest,
                    written,
                    &source.accept,
                )
                .await;
            let content = match opened {
                Ok(c) => c,
                Err(OriginError::Unreachable(why)) if attempt < MAX_ATTEMPTS && known.is_some() => {
                    tracing::warn!(digest = %dl.digest, attempt, %why, "origin unreachable mid-download; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let total = match &known {
                None => {
                    if source.kind == Kind::Manifest && content.media_type.is_none() {
                        return Err(OriginError::Protocol(format!(
                            "manifest {} has no Content-Type",
                            dl.digest
                        ))
                        .into());
                    }
                    let media_type =
                        (source.kind == Kind::Manifest).then(|| content.media_type.clone()).flatten();
                    dl.progress.send_replace(Progress::Running {
                        total: content.total,
                        media_type: media_type.clone(),
                        available: 0,
                    });
                    known = Some((content.total, media_type));
                    content.total
                }
                Some((total, _)) if *total != content.total => {
                    return Err(OriginError::Protocol(format!(
                        "{}: size changed from {total} to {} between requests",
                        dl.digest, content.total
                    ))
                    .into());
                }
                Some((total, _)) => *total,
            };
            if content.offset > written {
                return Err(OriginError::Protocol(format!(
                    "{}: asked for bytes from {written}, got from {}",
                    dl.digest, content.offset
                ))
                .into());
            }
            // An origin that ignored our Range resends bytes we already have: skip them.
            let mut skip = written - content.offset;
            let mut body = content.body.bytes_stream();
            let mut batch = BytesMut::with_capacity(WRITE_BATCH);
            loop {
                // Write what we have whenever the origin has nothing more ready right now, so
                // slow origins still stream with low latency.
                let next = match body.next().now_or_never() {
                    Some(next) => next,
                    None => {
                        publish(dl, partial, &mut hasher, &mut batch).await?;
                        body.next().await
                    }
                };
                match next {
                    Some(Ok(mut chunk)) => {
                        if skip > 0 {
                            let n = skip.min(chunk.len() as u64) as usize;
                            let _ = chunk.split_to(n);
                            skip -= n as u64;
                        }
                        if partial.written() + (batch.len() + chunk.len()) as u64 > total {
                            return Err(OriginError::Protocol(format!(
                                "{}: origin sent more than {total} bytes",
                                dl.digest
                            ))
                            .into());
                        }
                        batch.extend_from_slice(&chunk);
                        if batch.len() >= WRITE_BATCH {
                            publish(dl, partial, &mut hasher, &mut batch).await?;
                        }
                    }
                    Some(Err(e)) => {
                        publish(dl, partial, &mut hasher, &mut batch).await?;
                        if attempt >= MAX_ATTEMPTS {
                            return Err(OriginError::Unreachable(origin::error_chain(&e)).into());
                        }
                        tracing::warn!(digest = %dl.digest, attempt, error = %origin::error_chain(&e), "origin body broke off; resuming");
                        break;
                    }
                    None => {
                        publish(dl, partial, &mut hasher, &mut batch).await?;
                        if partial.written() < total && attempt >= MAX_ATTEMPTS {
                            return Err(
                                OriginError::Unreachable(format!("{}: body ended early", dl.digest)).into()
                            );
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// Writes a batch to the partial file, hashes it and tells readers.
async fn publish(
    dl: &Download,
    partial: &mut crate::store::Partial,
    hasher: &mut Sha256,
    batch: &mut BytesMut,
) -> Result<(), FetchError> {
    if batch.is_empty() {
        return Ok(());
    }
    partial.append(batch).await?;
    hasher.update(&batch[..]);
    METRICS.origin_bytes.inc_by(batch.len() as u64);
    batch.clear();
    let available = partial.written();
    dl.progress.send_modify(|p| {
        if let Progress::Running { available: a, .. } = p {
            *a = available;
        }
    });
    Ok(())
}

impl Download {
    /// Waits for the size and media type (the origin's first answer), or the failure.
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

    /// Opens a reader of bytes `start..end` that follows the download. `None` when the
    /// download already finished (committed: read the store instead).
    pub async fn stream(&self, start: u64, end: u64) -> Result<Option<BlobStream>, FetchError> {
        let path = self.partial_path.lock().await;
        let Some(path) = path.as_ref() else { return Ok(None) };
        let mut file = tokio::fs::File::open(path).await.map_err(FetchError::Read)?;
        file.seek(SeekFrom::Start(start)).await.map_err(FetchError::Read)?;
        Ok(Some(BlobStream { file, pos: start, end, follow: Some(self.progress.subscribe()), _guard: None }))
    }
}

/// The bytes `pos..end` of a blob, read from a file in chunks: a complete blob in the store
/// (pinned by its guard), or a download in flight (following its watermark).
pub struct BlobStream {
    file: tokio::fs::File,
    pos: u64,
    end: u64,
    follow: Option<watch::Receiver<Progress>>,
    _guard: Option<ReadGuard>,
}

/// Why a client's body stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("download failed: {0}")]
    Download(Arc<FetchError>),
    #[error("reading blob: {0}")]
    Io(#[from] std::io::Error),
}

impl BlobStream {
    /// A range of a complete blob in the store.
    pub async fn cached(
        store: &Store,
        guard: ReadGuard,
        start: u64,
        end: u64,
    ) -> std::io::Result<BlobStream> {
        let mut file = store.open_blob(&guard).await?;
        file.seek(SeekFrom::Start(start)).await?;
        Ok(BlobStream { file, pos: start, end, follow: None, _guard: Some(guard) })
    }

    /// Whether the bytes come from a download in flight (metrics: `origin`) or the cache.
    pub fn is_live(&self) -> bool {
        self.follow.is_some()
    }

    async fn next_chunk(&mut self) -> Option<Result<Bytes, StreamError>> {
        if self.pos >= self.end {
            return None;
        }
        let mut readable = self.end;
        if let Some(rx) = &mut self.follow {
            let pos = self.pos;
            let state = rx
                .wait_for(|p| match p {
                    Progress::Running { available, .. } => *available > pos,
                    _ => true,
                })
                .await;
            match state.as_deref() {
                Ok(Progress::Running { available, .. }) => readable = readable.min(*available),
                Ok(Progress::Complete { .. }) => {}
                Ok(Progress::Failed(e)) => return Some(Err(StreamError::Download(e.clone()))),
                Ok(Progress::Starting) | Err(_) => {
                    return Some(Err(StreamError::Io(std::io::Error::other("download vanished"))))
                }
            }
        }
        let want = (readable - self.pos).min(READ_CHUNK as u64) as usize;
        let mut buf = vec![0u8; want];
        if let Err(e) = self.file.read_exact(&mut buf).await {
            return Some(Err(e.into()));
        }
        self.pos += want as u64;
        Some(Ok(Bytes::from(buf)))
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
