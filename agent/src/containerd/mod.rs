//! containerd's content store as a source: one copy of each blob on a node.
//!
//! The agent learns through containerd's gRPC API which blobs containerd holds in one
//! namespace (`--containerd-namespace`, `k8s.io` for Kubernetes), indexes them in the store
//! as containerd's copies (served to the local client and to peers, verified on read like the
//! agent's own, see `store::external`), announces them to the swarm, and drops its own copy
//! of a blob once containerd *keeps* it.
//!
//! ## What containerd holds, and when it changes
//!
//! A sync reads content `List` (every committed blob, with its labels) and images `List` (the
//! image roots). It runs at start, after each burst of events of the namespace whose topic
//! is under `/images/` or `/content/` (subscribed to *before* the first list, so nothing
//! falls between the two), and every [`RESYNC`] in any case. Listing rather than applying
//! each event is deliberate: containerd 1.6/1.7 publish `/content/delete` for an explicit
//! delete but nothing when content is committed by a pull or removed by its garbage
//! collector, so no event stream alone is complete; a re-list after an image event (a pull
//! ends with `/images/create` or `/images/update`) catches the content it brought, and the
//! periodic re-list catches garbage collection. A blob that vanishes between two syncs is
//! found missing when read: that response fails cleanly (or goes on from its open file,
//! still verified piece by piece) and the next request downloads it.
//!
//! ## Held versus kept (`discard_unpacked_layers`)
//!
//! containerd holds a blob while it is in its content store; it *keeps* it when its garbage
//! collector would not remove it: reachable from an image's target (or content labelled
//! `containerd.io/gc.root`) through `containerd.io/gc.ref.content.*` labels, the references
//! containerd's own GC follows. With `discard_unpacked_layers = true` (the default on EKS and
//! GKE) the CRI plugin labels no layer from its manifest, so layers are held during a pull and
//! removed after unpacking. The agent drops its own copy only of a blob containerd keeps;
//! for a held-but-not-kept blob it keeps its copy and says so once in the log.
//!
//! ## Reading the bytes
//!
//! Bytes are read from containerd's content directory
//! (`<root>/io.containerd.content.v1.content/blobs/sha256/<hex>`, read-only), not through the
//! content API's `Read`: `pread` of whole pieces at any offset, no gRPC framing, no second
//! copy through containerd's process, and the same code path as the agent's own files. The
//! README gives the figures (`ctr content get` against reading the file).

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use containerd_client::services::v1::{
    content_client::ContentClient, events_client::EventsClient, images_client::ImagesClient,
    ListContentRequest, ListImagesRequest, SubscribeRequest,
};
use containerd_client::tonic::{transport::Channel, Request};
use tokio_util::sync::CancellationToken;

use crate::config::ContainerdConfig;
use crate::store::external::Adopted;
use crate::store::Store;
use crate::types::Digest;

/// A full re-list at least this often (catches garbage collection, which sends no event).
pub const RESYNC: Duration = Duration::from_secs(10);
/// Events closer together than this are one burst: one re-list after the last.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Longest wait between attempts to reach containerd.
const MAX_RETRY: Duration = Duration::from_secs(30);

/// Called with each blob newly served from containerd's store (the swarm announces it).
pub type Announce = Arc<dyn Fn(Digest) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("connecting to {0}: {1}")]
    Connect(PathBuf, containerd_client::tonic::transport::Error),
    #[error("containerd API: {0}")]
    Api(#[from] containerd_client::tonic::Status),
    #[error("containerd's content directory {0} is not readable: {1} (set --containerd-root)")]
    ContentDir(PathBuf, std::io::Error),
    #[error("containerd closed the event stream")]
    EventsClosed,
}

/// Keeps the store in step with containerd until `shutdown`; reconnects (with backoff) when
/// containerd is missing or restarts, serving without it meanwhile.
pub async fn run(
    config: ContainerdConfig,
    store: Arc<Store>,
    announce: Announce,
    shutdown: CancellationToken,
) {
    let mut sync = Syncer { config, store, announce, told_kept: HashSet::new() };
    let mut delay = Duration::from_secs(1);
    let mut failures = 0u32;
    loop {
        let result = tokio::select! {
            r = sync.session(&mut failures) => r,
            _ = shutdown.cancelled() => return,
        };
        if let Err(e) = result {
            if failures == 0 {
                tracing::warn!(
                    address = %sync.config.address.display(),
                    error = %e,
                    "containerd's content store is not used (serving only the agent's cache); retrying in the background"
                );
            } else {
                tracing::debug!(error = %e, "containerd still not usable");
            }
            failures += 1;
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return,
        }
        delay = (delay * 2).min(MAX_RETRY);
    }
}

struct Syncer {
    config: ContainerdConfig,
    store: Arc<Store>,
    announce: Announce,
    /// Digests already logged as held-but-not-kept (once each).
    told_kept: HashSet<Digest>,
}

/// Ends the event reader with its session.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn in_namespace<T>(msg: T, namespace: &str) -> Request<T> {
    let mut req = Request::new(msg);
    if let Ok(ns) = namespace.parse() {
        req.metadata_mut().insert("containerd-namespace", ns);
    }
    req
}

impl Syncer {
    fn blobs_dir(&self) -> PathBuf {
        self.config.content_dir.join("blobs").join("sha256")
    }

    /// One connection: subscribe, list, then re-list on events and on the timer. Returns
    /// only with an error (the caller reconnects).
    async fn session(&mut self, failures: &mut u32) -> Result<(), ContainerdError> {
        let channel = containerd_client::connect(&self.config.address)
            .await
            .map_err(|e| ContainerdError::Connect(self.config.address.clone(), e))?;
        // containerd answers a subscription only with its first event (tonic waits for the
        // response headers), so the stream is read on a task of its own; each relevant event
        // is a nudge on `nudges` (dropped when one is already waiting: any nudge re-lists).
        let (nudge, mut nudges) = tokio::sync::mpsc::channel::<Result<(), ContainerdError>>(1);
        let mut events = EventsClient::new(channel.clone());
        let filter = format!("namespace=={}", self.config.namespace);
        let reader = tokio::spawn(async move {
            let result = async {
                let mut stream =
                    events.subscribe(SubscribeRequest { filters: vec![filter] }).await?.into_inner();
                while let Some(ev) = stream.message().await? {
                    if ev.topic.starts_with("/images/") || ev.topic.starts_with("/content/") {
                        tracing::debug!(topic = %ev.topic, "containerd event");
                        let _ = nudge.try_send(Ok(()));
                    }
                }
                Err(ContainerdError::EventsClosed)
            }
            .await;
            let _ = nudge.send(result).await;
        });
        let _abort = AbortOnDrop(reader);
        // Let the subscription reach containerd before the first list (an event between the
        // two would otherwise be missed until the periodic re-list).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (served, adopted) = self.resync(&channel).await?;
        tracing::info!(
            address = %self.config.address.display(),
            namespace = %self.config.namespace,
            content_dir = %self.config.content_dir.display(),
            served,
            adopted,
            "serving containerd's content store"
        );
        *failures = 0;
        let mut pending: Option<tokio::time::Instant> = None;
        let mut timer = tokio::time::interval(RESYNC);
        timer.tick().await;
        loop {
            let debounce = async {
                match pending {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                nudged = nudges.recv() => {
                    nudged.unwrap_or(Err(ContainerdError::EventsClosed))?;
                    pending = Some(tokio::time::Instant::now() + DEBOUNCE);
                }
                _ = debounce => {
                    pending = None;
                    self.resync(&channel).await?;
                }
                _ = timer.tick() => {
                    self.resync(&channel).await?;
                }
            }
        }
    }

    /// Brings the store in line with what containerd holds and keeps now. Returns how many
    /// blobs were newly served and how many of the agent's copies were dropped.
    async fn resync(&mut self, channel: &Channel) -> Result<(usize, usize), ContainerdError> {
        let ns = self.config.namespace.clone();
        let mut held: HashMap<Digest, u64> = HashMap::new();
        let mut refs: HashMap<Digest, Vec<Digest>> = HashMap::new();
        let mut roots: Vec<Digest> = Vec::new();
        let mut stream = ContentClient::new(channel.clone())
            .list(in_namespace(ListContentRequest { filters: vec![] }, &ns))
            .await?
            .into_inner();
        while let Some(page) = stream.message().await? {
            for info in page.info {
                let Ok(digest) = info.digest.parse::<Digest>() else { continue };
                held.insert(digest, info.size.max(0) as u64);
                for (key, value) in &info.labels {
                    if key == "containerd.io/gc.root" {
                        roots.push(digest);
                    } else if key.starts_with("containerd.io/gc.ref.content") {
                        if let Ok(child) = value.parse::<Digest>() {
                            refs.entry(digest).or_default().push(child);
                        }
                    }
                }
            }
        }
        let images = ImagesClient::new(channel.clone())
            .list(in_namespace(ListImagesRequest { filters: vec![] }, &ns))
            .await?
            .into_inner();
        let mut types: HashMap<Digest, String> = HashMap::new();
        for image in images.images {
            let Some(target) = image.target else { continue };
            if let Ok(d) = target.digest.parse::<Digest>() {
                roots.push(d);
                if !target.media_type.is_empty() {
                    types.insert(d, target.media_type);
                }
            }
        }
        // What containerd's garbage collector keeps: reachable from the roots.
        let mut kept: HashSet<Digest> = HashSet::new();
        let mut queue: VecDeque<Digest> = roots.into();
        while let Some(d) = queue.pop_front() {
            if kept.insert(d) {
                queue.extend(refs.get(&d).into_iter().flatten().copied());
            }
        }

        // containerd creates the directory with its first blob: only content listed but not
        // readable means a wrong `--containerd-root` (or a missing mount).
        if !held.is_empty() {
            crate::store::external::readable_dir(&self.blobs_dir())
                .map_err(|e| ContainerdError::ContentDir(self.blobs_dir(), e))?;
        }
        for d in self.store.external_digests() {
            if !held.contains_key(&d) && self.store.remove_external(&d) {
                tracing::info!(digest = %d, "containerd no longer holds the blob: no longer served from its store");
            }
        }
        let listed: HashSet<Digest> = held.keys().copied().collect();
        self.store.retain_bad_external(&listed);
        self.told_kept.retain(|d| listed.contains(d));

        let (mut served, mut adopted) = (0, 0);
        for (digest, size) in held {
            let path = self.blobs_dir().join(digest.hex());
            if self.store.holds_own(&digest) {
                if !kept.contains(&digest) {
                    if self.told_kept.insert(digest) {
                        tracing::info!(
                            %digest,
                            "containerd holds the blob but no image keeps it (a pull in progress, or \
                             discard_unpacked_layers): keeping the agent's copy"
                        );
                    }
                    continue;
                }
                match self.store.adopt_external(&digest, path).await {
                    Ok(Adopted::Yes) => {
                        adopted += 1;
                        tracing::info!(%digest, size, "containerd keeps the blob: dropped the agent's copy, serving containerd's");
                    }
                    Ok(other) => tracing::debug!(%digest, ?other, "agent's copy kept for now"),
                    Err(e) => tracing::warn!(%digest, error = %e, "reading containerd's copy"),
                }
                continue;
            }
            if self.store.contains(&digest) {
                continue;
            }
            match self.store.add_external(digest, size, path, types.get(&digest).cloned()).await {
                Ok(true) => {
                    served += 1;
                    (self.announce)(digest);
                }
                Ok(false) => {}
                // Removed between the list and the read (or not readable): the next sync sees.
                Err(e) => tracing::debug!(%digest, error = %e, "containerd's copy not readable"),
            }
        }
        Ok((served, adopted))
    }
}
