//! The content store: complete blobs by digest under the cache directory, partial downloads,
//! and the byte quota.
//!
//! Layout under `--cache-dir`:
//!
//! ```text
//! blobs/sha256/<hex>        complete, verified content (renamed into place only after the
//!                           whole sha256 matched)
//! blobs/sha256/<hex>.type   media type of a manifest (absent for layers and configs)
//! tmp/<hex>.<n>.partial     a download in progress; never served from the store
//! ```
//!
//! Writes are atomic: data goes to `tmp/`, is fsynced, and is renamed into `blobs/`. At start
//! the index is rebuilt from `blobs/` and everything in `tmp/` is discarded, so a crash can
//! leave nothing half-written that looks complete. (Resuming verified pieces of a partial
//! download comes with the piece map of the swarm.)
//!
//! The quota is enforced by evicting the least recently used complete blobs that no request is
//! reading ([`ReadGuard`] pins a blob while a response streams it). All `std::fs` use of the
//! agent lives here.

use std::collections::HashMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use lru::LruCache;
use tokio::io::AsyncWriteExt;

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

pub struct Store {
    root: PathBuf,
    max_bytes: u64,
    next_partial: AtomicU64,
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
        let mut inner = self.store.inner.lock().expect("store lock poisoned");
        if let Some(n) = inner.readers.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                inner.readers.remove(&self.digest);
            }
        }
    }
}

/// A download being written to `tmp/`. Dropping it without [`Store::commit`] leaves the
/// file for [`Partial::discard`] or the next start to remove.
pub struct Partial {
    digest: Digest,
    path: PathBuf,
    file: tokio::fs::File,
    written: u64,
}

impl Partial {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `data`, and makes it visible to readers of [`Partial::path`] before returning.
    pub async fn append(&mut self, data: &[u8]) -> Result<(), StoreError> {
        let res = async {
            self.file.write_all(data).await?;
            self.file.flush().await
        }
        .await;
        res.map_err(|source| StoreError::Write { path: self.path.clone(), source })?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Removes the partial file.
    pub async fn discard(self) {
        drop(self.file);
        if let Err(e) = tokio::fs::remove_file(&self.path).await {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove partial download");
        }
    }
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

        // Discard what a previous process left half-written, and prove we can write.
        for entry in std::fs::read_dir(&tmp).map_err(|e| unusable(&tmp, e))? {
            let path = entry.map_err(|e| unusable(&tmp, e))?.path();
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
            if let Some(hex) = name.strip_suffix(".type") {
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
            next_partial: AtomicU64::new(0),
            inner: Mutex::new(inner),
        });
        let victims = store.pick_victims(None);
        store.remove_files(&victims);
        store.inner.lock().expect("store lock poisoned").publish_gauges();
        Ok(store)
    }

    fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    fn type_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(format!("{}.type", digest.hex()))
    }

    /// Whether a complete blob is stored (does not count as a use).
    pub fn contains(&self, digest: &Digest) -> bool {
        self.inner.lock().expect("store lock poisoned").index.contains(digest)
    }

    /// Looks a complete blob up, marks it used, and pins it until the guard is dropped.
    pub fn get(self: &Arc<Self>, digest: &Digest) -> Option<(Entry, ReadGuard)> {
        let mut inner = self.inner.lock().expect("store lock poisoned");
        let entry = inner.index.get(digest)?.clone();
        *inner.readers.entry(*digest).or_insert(0) += 1;
        Some((entry, ReadGuard { store: self.clone(), digest: *digest }))
    }

    /// Opens a complete blob for reading; hold its [`ReadGuard`] while reading.
    pub async fn open_blob(&self, _guard: &ReadGuard) -> io::Result<tokio::fs::File> {
        tokio::fs::File::open(self.blob_path(&_guard.digest)).await
    }

    /// Starts writing a download of `digest` into `tmp/`.
    pub async fn create_partial(&self, digest: &Digest) -> Result<Partial, StoreError> {
        let n = self.next_partial.fetch_add(1, Ordering::Relaxed);
        let path = self.root.join("tmp").join(format!("{}.{n}.partial", digest.hex()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|source| StoreError::Write { path: path.clone(), source })?;
        Ok(Partial { digest: *digest, path, file, written: 0 })
    }

    /// Makes a verified download a complete blob: fsync, rename into `blobs/`, index it, and
    /// evict older blobs if the quota is exceeded. The caller has checked the whole digest.
    pub async fn commit(
        self: &Arc<Self>,
        partial: Partial,
        media_type: Option<&str>,
    ) -> Result<(), StoreError> {
        let Partial { digest, path, file, written } = partial;
        let write_err = |path: &Path, source| StoreError::Write { path: path.to_path_buf(), source };
        file.sync_all().await.map_err(|e| write_err(&path, e))?;
        drop(file);
        if let Some(media_type) = media_type {
            let type_tmp = path.with_extension("type");
            let type_path = self.type_path(&digest);
            let res = async {
                let mut f = tokio::fs::File::create(&type_tmp).await?;
                f.write_all(media_type.as_bytes()).await?;
                f.sync_all().await?;
                tokio::fs::rename(&type_tmp, &type_path).await
            }
            .await;
            res.map_err(|e| write_err(&type_path, e))?;
        }
        let final_path = self.blob_path(&digest);
        tokio::fs::rename(&path, &final_path).await.map_err(|e| write_err(&final_path, e))?;
        // Make the rename itself durable.
        if let Ok(dir) = tokio::fs::File::open(final_path.parent().expect("blob path has a parent")).await {
            let _ = dir.sync_all().await;
        }
        {
            let mut inner = self.inner.lock().expect("store lock poisoned");
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
        let mut inner = self.inner.lock().expect("store lock poisoned");
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
            for path in [self.blob_path(digest), self.type_path(digest)] {
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
        let mut p = store.create_partial(&digest).await.unwrap();
        p.append(data).await.unwrap();
        store.commit(p, media_type).await.unwrap();
        digest
    }

    #[tokio::test]
    async fn commit_reopen_and_discard_partials() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        let d = put(&store, b"hello", Some("application/vnd.oci.image.manifest.v1+json")).await;
        // A partial left behind, as by a crash.
        let mut p = store.create_partial(&Digest::of(b"other")).await.unwrap();
        p.append(b"oth").await.unwrap();
        drop(p);
        drop(store);

        let store = Store::open(dir.path(), 1 << 30).unwrap();
        let (entry, guard) = store.get(&d).unwrap();
        assert_eq!(entry.size, 5);
        assert_eq!(entry.media_type.as_deref(), Some("application/vnd.oci.image.manifest.v1+json"));
        let mut f = store.open_blob(&guard).await.unwrap();
        let mut s = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut f, &mut s).await.unwrap();
        assert_eq!(s, "hello");
        assert!(!store.contains(&Digest::of(b"other")));
        assert_eq!(std::fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
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
