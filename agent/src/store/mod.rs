//! The content store: complete blobs by digest under the cache directory, partial downloads,
//! and the byte quota.
//!
//! Layout under `--cache-dir`:
//!
//! ```text
//! blobs/sha256/<hex>          complete, verified content (renamed into place only after the
//!                             whole sha256 matched)
//! blobs/sha256/<hex>.type     media type of a manifest (absent for layers and configs)
//! blobs/sha256/<hex>.pieces   piece metainfo (piece size + each piece's sha256), for peers
//! tmp/<hex>.partial           a download in progress, written at piece offsets
//! tmp/<hex>.state             its piece map: which pieces are verified, and their digests
//! ```
//!
//! Writes are atomic: data goes to `tmp/`, is fsynced, and is renamed into `blobs/`. At start
//! the index is rebuilt from `blobs/`; a partial download with a piece map is kept so its
//! verified pieces can be resumed (the download re-hashes them before trusting them), and
//! anything else in `tmp/` is discarded. Nothing in `tmp/` is ever served as complete.
//!
//! The quota is enforced by evicting the least recently used complete blobs that no request is
//! reading ([`ReadGuard`] pins a blob while a response streams it). All `std::fs` use of the
//! agent lives here.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use lru::LruCache;

use crate::metrics::METRICS;
use crate::types::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache directory {path}: {source}")]
    Unusable { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// What the store knows about a complete blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub size: u64,
    /// Media type for manifests; `None` for layers and configs.
    pub media_type: Option<String>,
}

/// Called with each evicted digest (the swarm withdraws its provider record).
pub type EvictHook = Box<dyn Fn(&Digest) + Send + Sync>;

pub struct Store {
    root: PathBuf,
    max_bytes: u64,
    on_evict: std::sync::OnceLock<EvictHook>,
    inner: Mutex<Inner>,
}

struct Inner {
    /// Complete blobs, least recently used first out.
    index: LruCache<Digest, Entry>,
    /// How many responses are reading each blob now; those are never evicted.
    readers: HashMap<Digest, usize>,
    total_bytes: u64,
}

impl Inner {
    fn publish_gauges(&self) {
        METRICS.cache_bytes.set(self.total_bytes as i64);
        METRICS.cache_blobs.set(self.index.len() as i64);
    }
}

/// Pins a complete blob against eviction while a response reads it.
pub struct ReadGuard {
    store: Arc<Store>,
    digest: Digest,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut inner = crate::sync::lock(&self.store.inner);
        if let Some(n) = inner.readers.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                inner.readers.remove(&self.digest);
            }
        }
    }
}

/// A download being written to `tmp/<hex>.partial` at piece offsets, with its piece map
/// saved beside it. Clones share the open file.
#[derive(Clone)]
pub struct Partial {
    digest: Digest,
    path: PathBuf,
    state_path: PathBuf,
    file: Arc<std::fs::File>,
    /// One write at a time per file. A buffered write holds the inode's lock for its whole
    /// copy, and concurrent writers spin on it: on 2 cores, up to 11% of the agent's CPU went
    /// to that spinning. Waiting here costs nothing.
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Partial {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `data` at `offset`; readers of [`Partial::path`] see it when this returns.
    pub async fn write_at(&self, offset: u64, data: Bytes) -> Result<(), StoreError> {
        let _turn = self.write_lock.lock().await;
        let file = self.file.clone();
        let res = tokio::task::spawn_blocking(move || file.write_all_at(&data, offset)).await;
        flatten(res).map_err(|source| StoreError::Write { path: self.path.clone(), source })
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let file = self.file.clone();
        flatten(
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset).map(|_| buf)
            })
            .await,
        )
    }

    /// Atomically replaces the saved piece map.
    pub async fn save_state(&self, state: Vec<u8>) -> Result<(), StoreError> {
        let path = self.state_path.clone();
        let res = tokio::task::spawn_blocking(move || write_atomic(&path, &state)).await;
        flatten(res).map_err(|source| StoreError::Write { path: self.state_path.clone(), source })
    }

    /// Removes the partial file and its piece map.
    pub async fn discard(self) {
        for path in [&self.path, &self.state_path] {
            if let Err(e) = tokio::fs::remove_file(path).await {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove partial download");
                }
            }
        }
    }
}

fn flatten<T>(res: Result<io::Result<T>, tokio::task::JoinError>) -> io::Result<T> {
    res.map_err(io::Error::other).and_then(|r| r)
}

/// Writes `data` to `path` through a temporary file, fsync and rename.
fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp-write");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Store {
    /// Opens (creating if needed) the store under `root`, checks that it is writable, discards
    /// partial downloads and rebuilds the index from the complete blobs on disk.
    pub fn open(root: &Path, max_bytes: u64) -> Result<Arc<Store>, StoreError> {
        let unusable = |path: &Path, source| StoreError::Unusable { path: path.to_path_buf(), source };
        let blobs = root.join("blobs").join("sha256");
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&blobs).map_err(|e| unusable(&blobs, e))?;
        std::fs::create_dir_all(&tmp).map_err(|e| unusable(&tmp, e))?;

        // Keep partial downloads that have a piece map (their verified pieces resume); discard
        // everything else a previous process left half-written. Then prove we can write.
        for entry in std::fs::read_dir(&tmp).map_err(|e| unusable(&tmp, e))? {
            let path = entry.map_err(|e| unusable(&tmp, e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let resumable = match name.split_once('.') {
                Some((hex, "partial")) => tmp.join(format!("{hex}.state")).exists(),
                Some((hex, "state")) => tmp.join(format!("{hex}.partial")).exists(),
                _ => false,
            };
            if resumable {
                continue;
            }
            tracing::info!(path = %path.display(), "discarding partial download left by an earlier run");
            std::fs::remove_file(&path).map_err(|e| unusable(&path, e))?;
        }
        let probe = tmp.join(".write-probe");
        std::fs::File::create(&probe)
            .and_then(|mut f| f.write_all(b"probe"))
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| unusable(&probe, e))?;

        // Rebuild the index, oldest first so the LRU order approximates last use.
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&blobs).map_err(|e| unusable(&blobs, e))? {
            let entry = entry.map_err(|e| unusable(&blobs, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(hex) = name.strip_suffix(".type").or_else(|| name.strip_suffix(".pieces")) {
                if Digest::from_hex(hex).is_none() || !blobs.join(hex).exists() {
                    let _ = std::fs::remove_file(entry.path());
                }
                continue;
            }
            let Some(digest) = Digest::from_hex(name) else {
                tracing::warn!(file = name, "ignoring unexpected file in the blob store");
                continue;
            };
            let meta = entry.metadata().map_err(|e| unusable(&entry.path(), e))?;
            let media_type = std::fs::read_to_string(blobs.join(format!("{name}.type")))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty());
            let used = meta.accessed().or_else(|_| meta.modified()).ok();
            found.push((used, digest, Entry { size: meta.len(), media_type }));
        }
        found.sort_by_key(|(used, _, _)| *used);
        let mut inner = Inner { index: LruCache::unbounded(), readers: HashMap::new(), total_bytes: 0 };
        for (_, digest, entry) in found {
            inner.total_bytes += entry.size;
            inner.index.put(digest, entry);
        }
        tracing::info!(
            blobs = inner.index.len(),
            bytes = inner.total_bytes,
            root = %root.display(),
            "content store opened"
        );
        let store = Arc::new(Store {
            root: root.to_path_buf(),
            max_bytes,
            on_evict: std::sync::OnceLock::new(),
            inner: Mutex::new(inner),
        });
        let victims = store.pick_victims(None);
        store.remove_files(&victims);
        crate::sync::lock(&store.inner).publish_gauges();
        Ok(store)
    }

    /// Sets what to call when a blob is evicted (once; later calls are ignored).
    pub fn set_evict_hook(&self, hook: EvictHook) {
        let _ = self.on_evict.set(hook);
    }

    /// Every complete blob, most recently used first.
    pub fn digests(&self) -> Vec<Digest> {
        crate::sync::lock(&self.inner).index.iter().map(|(d, _)| *d).collect()
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    fn type_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(format!("{}.type", digest.hex()))
    }

    /// Whether a complete blob is stored (does not count as a use).
    pub fn contains(&self, digest: &Digest) -> bool {
        crate::sync::lock(&self.inner).index.contains(digest)
    }

    /// Looks a complete blob up, marks it used, and pins it until the guard is dropped.
    pub fn get(self: &Arc<Self>, digest: &Digest) -> Option<(Entry, ReadGuard)> {
        let mut inner = crate::sync::lock(&self.inner);
        let entry = inner.index.get(digest)?.clone();
        *inner.readers.entry(*digest).or_insert(0) += 1;
        Some((entry, ReadGuard { store: self.clone(), digest: *digest }))
    }

    /// Opens a complete blob for reading; hold its [`ReadGuard`] while reading.
    pub async fn open_blob(&self, _guard: &ReadGuard) -> io::Result<std::fs::File> {
        Ok(tokio::fs::File::open(self.blob_path(&_guard.digest)).await?.into_std().await)
    }

    fn pieces_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(format!("{}.pieces", digest.hex()))
    }

    /// Opens the partial download of `digest` (creating it if needed), with the piece map an
    /// earlier run saved, if any. One download per digest runs at a time (see `fetch`).
    pub async fn open_partial(&self, digest: &Digest) -> Result<(Partial, Option<Vec<u8>>), StoreError> {
        let tmp = self.root.join("tmp");
        let path = tmp.join(format!("{}.partial", digest.hex()));
        let state_path = tmp.join(format!("{}.state", digest.hex()));
        let (p, sp) = (path.clone(), state_path.clone());
        let res = tokio::task::spawn_blocking(move || {
            let file =
                std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&p)?;
            let state = match std::fs::read(&sp) {
                Ok(bytes) => Some(bytes),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            };
            Ok((file, state))
        })
        .await;
        let (file, state) =
            flatten(res).map_err(|source| StoreError::Write { path: path.clone(), source })?;
        let partial = Partial {
            digest: *digest,
            path,
            state_path,
            file: Arc::new(file),
            write_lock: Default::default(),
        };
        Ok((partial, state))
    }

    /// The saved piece metainfo of a complete blob.
    pub async fn piece_meta(&self, guard: &ReadGuard) -> Option<Vec<u8>> {
        tokio::fs::read(self.pieces_path(&guard.digest)).await.ok()
    }

    /// Reads `len` bytes at `offset` of a complete blob.
    pub async fn read_blob_at(&self, guard: &ReadGuard, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let path = self.blob_path(&guard.digest);
        flatten(
            tokio::task::spawn_blocking(move || {
                let file = std::fs::File::open(path)?;
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset).map(|_| buf)
            })
            .await,
        )
    }

    /// Makes a verified download a complete blob: fsync, rename into `blobs/`, index it, and
    /// evict older blobs if the quota is exceeded. The caller has checked the whole digest.
    pub async fn commit(
        self: &Arc<Self>,
        partial: Partial,
        media_type: Option<&str>,
        piece_meta: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let Partial { digest, path, state_path, file, .. } = partial;
        let write_err = |path: &Path, source| StoreError::Write { path: path.to_path_buf(), source };
        let written = {
            let file = file.clone();
            flatten(tokio::task::spawn_blocking(move || file.sync_all().and_then(|_| file.metadata())).await)
                .map_err(|e| write_err(&path, e))?
                .len()
        };
        drop(file);
        let mut sidecars: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        if let Some(media_type) = media_type {
            sidecars.push((self.type_path(&digest), media_type.as_bytes().to_vec()));
        }
        if let Some(meta) = piece_meta {
            sidecars.push((self.pieces_path(&digest), meta));
        }
        for (sidecar, data) in sidecars {
            let target = sidecar.clone();
            flatten(tokio::task::spawn_blocking(move || write_atomic(&target, &data)).await)
                .map_err(|e| write_err(&sidecar, e))?;
        }
        let final_path = self.blob_path(&digest);
        tokio::fs::rename(&path, &final_path).await.map_err(|e| write_err(&final_path, e))?;
        let _ = tokio::fs::remove_file(&state_path).await;
        // Make the rename itself durable.
        if let Ok(dir) = tokio::fs::File::open(final_path.parent().expect("blob path has a parent")).await {
            let _ = dir.sync_all().await;
        }
        {
            let mut inner = crate::sync::lock(&self.inner);
            let entry = Entry { size: written, media_type: media_type.map(str::to_string) };
            if let Some(old) = inner.index.put(digest, entry) {
                inner.total_bytes -= old.size;
            }
            inner.total_bytes += written;
            inner.publish_gauges();
        }
        let victims = self.pick_victims(Some(&digest));
        if !victims.is_empty() {
            let store = self.clone();
            let _ = tokio::task::spawn_blocking(move || store.remove_files(&victims)).await;
        }
        Ok(())
    }

    /// Removes least recently used blobs from the index until the quota holds, skipping blobs
    /// being read and `keep`. Returns what to delete from disk.
    fn pick_victims(&self, keep: Option<&Digest>) -> Vec<Digest> {
        let mut inner = crate::sync::lock(&self.inner);
        let mut victims = Vec::new();
        if inner.total_bytes <= self.max_bytes {
            return victims;
        }
        // Oldest first: `iter()` yields most recent first.
        let candidates: Vec<(Digest, u64)> = inner.index.iter().rev().map(|(d, e)| (*d, e.size)).collect();
        for (digest, size) in candidates {
            if inner.total_bytes <= self.max_bytes {
                break;
            }
            if Some(&digest) == keep || inner.readers.contains_key(&digest) {
                continue;
            }
            inner.index.pop(&digest);
            inner.total_bytes -= size;
            victims.push(digest);
        }
        if inner.total_bytes > self.max_bytes {
            tracing::warn!(
                bytes = inner.total_bytes,
                max_bytes = self.max_bytes,
                "cache over quota: the remaining blobs are being read"
            );
        }
        inner.publish_gauges();
        victims
    }

    fn remove_files(&self, victims: &[Digest]) {
        for digest in victims {
            tracing::info!(%digest, "evicting blob from the cache");
            METRICS.cache_evictions.inc();
            if let Some(hook) = self.on_evict.get() {
                hook(digest);
            }
            for path in [self.blob_path(digest), self.type_path(digest), self.pieces_path(digest)] {
                if let Err(e) = std::fs::remove_file(&path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!(path = %path.display(), error = %e, "could not remove evicted blob");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn put(store: &Arc<Store>, data: &[u8], media_type: Option<&str>) -> Digest {
        let digest = Digest::of(data);
        let (p, _) = store.open_partial(&digest).await.unwrap();
        p.write_at(0, Bytes::copy_from_slice(data)).await.unwrap();
        store.commit(p, media_type, None).await.unwrap();
        digest
    }

    #[tokio::test]
    async fn commit_reopen_and_discard_partials() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        let d = put(&store, b"hello", Some("application/vnd.oci.image.manifest.v1+json")).await;
        // Partials left behind, as by a crash: one with a piece map (kept), one without.
        let (p, _) = store.open_partial(&Digest::of(b"other")).await.unwrap();
        p.write_at(0, Bytes::from_static(b"oth")).await.unwrap();
        p.save_state(b"map".to_vec()).await.unwrap();
        let (p2, _) = store.open_partial(&Digest::of(b"third")).await.unwrap();
        p2.write_at(0, Bytes::from_static(b"thi")).await.unwrap();
        drop((p, p2));
        drop(store);

        let store = Store::open(dir.path(), 1 << 30).unwrap();
        let (entry, guard) = store.get(&d).unwrap();
        assert_eq!(entry.size, 5);
        assert_eq!(entry.media_type.as_deref(), Some("application/vnd.oci.image.manifest.v1+json"));
        let mut f = store.open_blob(&guard).await.unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!(s, "hello");
        assert!(!store.contains(&Digest::of(b"other")));
        let (p, state) = store.open_partial(&Digest::of(b"other")).await.unwrap();
        assert_eq!(state.as_deref(), Some(&b"map"[..]));
        assert_eq!(p.read_at(0, 3).await.unwrap(), b"oth");
        assert!(!dir.path().join("tmp").join(format!("{}.partial", Digest::of(b"third").hex())).exists());
    }

    #[tokio::test]
    async fn evicts_least_recently_used_but_not_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 2500).unwrap();
        let a = put(&store, &[1u8; 1000], None).await;
        let b = put(&store, &[2u8; 1000], None).await;
        let pinned = store.get(&a).unwrap().1; // a is now most recent, and pinned
        let c = put(&store, &[3u8; 1000], None).await; // over quota: b goes
        assert!(store.contains(&a) && !store.contains(&b) && store.contains(&c));
        assert!(!dir.path().join("blobs/sha256").join(b.hex()).exists());
        let d = put(&store, &[4u8; 1000], None).await; // a pinned, so c goes even though a is older
        assert!(store.contains(&a) && !store.contains(&c) && store.contains(&d));
        drop(pinned);
        let e = put(&store, &[5u8; 1000], None).await;
        assert!(!store.contains(&a) && store.contains(&d) && store.contains(&e));
    }

    #[test]
    fn unwritable_root_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = Store::open(&file.join("cache"), 1 << 30).err().unwrap();
        assert!(err.to_string().contains("cache directory"), "{err}");
    }
}
