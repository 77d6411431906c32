//! containerd's copies: blobs served from containerd's content store, not stored twice.
//!
//! The `containerd` module tells the store which blobs containerd holds; the store indexes
//! each one beside the agent's own blobs, with the path of containerd's file, so every read
//! path (clients, peers, `Have`) works on both alike and verifies every piece on the way out
//! (see `verify`). What differs for containerd's copy:
//!
//! - It is indexed only after its whole sha256 matched (hashed once when found); its piece
//!   metainfo is kept under `<cache>/containerd/sha256/<hex>.pieces`.
//! - It does not count against the quota or `shoal_cache_bytes`, is never evicted, and is
//!   never written or deleted by the agent (the content directory is mounted read-only). A
//!   damaged one is dropped from the index and not taken again while containerd lists it;
//!   the next request downloads the blob into the agent's own cache.
//! - [`Store::adopt_external`]: when containerd keeps a blob the agent downloaded itself, the
//!   agent's copy is deleted and containerd's is served instead (after checking containerd's
//!   whole sha256). The digest stays indexed and announced throughout.

use std::collections::HashSet;
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Arc;

use super::verify::hash_file;
use super::{flatten, write_atomic, Entry, Store};
use crate::types::Digest;

/// Largest blob whose media type is sniffed from its bytes (manifests are small).
const SNIFF_MAX: u64 = 4 << 20;

/// What [`Store::adopt_external`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Adopted {
    /// The agent's copy is gone; containerd's is served.
    Yes,
    /// The agent's copy is being read now: try again later.
    Busy,
    /// containerd's copy does not match the digest: the agent keeps its own.
    Mismatch,
    /// The agent holds no copy of its own (any more).
    NotOwn,
}

/// The media type of a manifest or index, from its JSON; `None` for anything else.
fn sniff_media_type(data: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(data).ok()?;
    if probe.schema_version != Some(2) {
        return None;
    }
    probe.media_type.or_else(|| {
        if probe.manifests.is_some() {
            Some("application/vnd.oci.image.index.v1+json".into())
        } else if probe.layers.is_some() {
            Some("application/vnd.oci.image.manifest.v1+json".into())
        } else {
            None
        }
    })
}

/// Whether `dir` (containerd's blob directory) can be listed.
pub fn readable_dir(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::read_dir(dir).map(drop)
}

impl Store {
    /// Indexes containerd's copy of `digest` at `path`, after hashing it whole: `Ok(true)`
    /// when it is newly served (announce it), `Ok(false)` when the digest was already indexed
    /// (the agent's copy or containerd's), is known damaged, or does not match (then it is
    /// counted and logged, and not taken again while containerd lists it).
    pub async fn add_external(
        &self,
        digest: Digest,
        size: u64,
        path: PathBuf,
        media_type: Option<String>,
    ) -> std::io::Result<bool> {
        {
            let inner = crate::sync::lock(&self.inner);
            if inner.index.contains(&digest) || inner.bad_external.contains(&digest) {
                return Ok(false);
            }
        }
        let hashed = {
            let path = path.clone();
            flatten(
                tokio::task::spawn_blocking(move || {
                    let hashed = hash_file(&path, size)?;
                    let sniffed = if size <= SNIFF_MAX {
                        let mut data = Vec::with_capacity(size as usize);
                        std::fs::File::open(&path)?.take(size).read_to_end(&mut data)?;
                        sniff_media_type(&data)
                    } else {
                        None
                    };
                    Ok(hashed.map(|h| (h, sniffed)))
                })
                .await,
            )?
        };
        let ((map, media_type), ok) = match hashed {
            Some(((map, actual), sniffed)) => ((map, media_type.or(sniffed)), actual == digest),
            None => ((crate::fetch::PieceMap::new(crate::pieces::Layout::for_size(size)), None), false),
        };
        if !ok {
            tracing::error!(%digest, path = %path.display(), "containerd's copy does not match its digest: not served");
            crate::metrics::METRICS.corrupt_blobs.inc();
            crate::sync::lock(&self.inner).bad_external.insert(digest);
            return Ok(false);
        }
        let (target, meta) = (self.ext_meta_path(&digest), map.encode_meta());
        flatten(tokio::task::spawn_blocking(move || write_atomic(&target, &meta)).await)?;
        let mut inner = crate::sync::lock(&self.inner);
        if inner.index.contains(&digest) {
            return Ok(false);
        }
        inner.insert_slot(digest, Entry { size, media_type }, Some(path));
        let gen = inner.next_gen;
        inner.hashes.put(digest, (gen, Arc::new(map)));
        inner.publish_gauges();
        Ok(true)
    }

    /// Drops containerd's copy of `digest` (containerd no longer lists it) and withdraws it
    /// from the swarm. A response reading it keeps its open file (the bytes are still
    /// verified piece by piece); a response not yet opened finds it gone and downloads it.
    /// The agent's own copy, if that is what is indexed, is left alone.
    pub fn remove_external(&self, digest: &Digest) -> bool {
        let removed = {
            let mut inner = crate::sync::lock(&self.inner);
            match inner.index.peek(digest) {
                Some(slot) if slot.external.is_some() => {
                    let gen = slot.gen;
                    inner.remove_gen(digest, gen).is_some()
                }
                _ => false,
            }
        };
        if removed {
            let _ = std::fs::remove_file(self.ext_meta_path(digest));
            if let Some(hook) = self.on_evict.get() {
                hook(digest);
            }
        }
        removed
    }

    /// Forgets containerd's damaged copies that containerd no longer lists (`listed`), so a
    /// new copy is considered again.
    pub fn retain_bad_external(&self, listed: &HashSet<Digest>) {
        crate::sync::lock(&self.inner).bad_external.retain(|d| listed.contains(d));
    }

    /// Digests served from containerd's copy.
    pub fn external_digests(&self) -> Vec<Digest> {
        let inner = crate::sync::lock(&self.inner);
        inner.index.iter().filter(|(_, s)| s.external.is_some()).map(|(d, _)| *d).collect()
    }

    /// Whether the agent holds its own copy of `digest`.
    pub fn holds_own(&self, digest: &Digest) -> bool {
        crate::sync::lock(&self.inner).index.peek(digest).is_some_and(|s| s.external.is_none())
    }

    /// Replaces the agent's own copy of `digest` by containerd's at `path` (see the module
    /// docs): containerd's whole sha256 is checked first, and the swap is made only while no
    /// response reads the agent's copy.
    pub async fn adopt_external(&self, digest: &Digest, path: PathBuf) -> std::io::Result<Adopted> {
        let (size, gen) = {
            let inner = crate::sync::lock(&self.inner);
            if inner.bad_external.contains(digest) {
                return Ok(Adopted::Mismatch);
            }
            match inner.index.peek(digest) {
                Some(slot) if slot.external.is_none() => (slot.entry.size, slot.gen),
                _ => return Ok(Adopted::NotOwn),
            }
        };
        let hashed = {
            let path = path.clone();
            flatten(tokio::task::spawn_blocking(move || hash_file(&path, size)).await)?
        };
        let Some((map, actual)) = hashed.filter(|(_, actual)| actual == digest) else {
            tracing::warn!(%digest, path = %path.display(), "containerd's copy does not match its digest: keeping the agent's copy");
            crate::sync::lock(&self.inner).bad_external.insert(*digest);
            return Ok(Adopted::Mismatch);
        };
        debug_assert_eq!(actual, *digest);
        let (target, meta) = (self.ext_meta_path(digest), map.encode_meta());
        flatten(tokio::task::spawn_blocking(move || write_atomic(&target, &meta)).await)?;
        {
            let mut inner = crate::sync::lock(&self.inner);
            let entry = match inner.index.peek(digest) {
                Some(slot) if slot.gen == gen && slot.external.is_none() => slot.entry.clone(),
                _ => return Ok(Adopted::NotOwn),
            };
            if inner.readers.contains_key(digest) {
                return Ok(Adopted::Busy);
            }
            // Keep its place in the LRU order: a later own copy would start from here.
            inner.insert_slot(*digest, entry, Some(path));
            let gen = inner.next_gen;
            inner.hashes.put(*digest, (gen, Arc::new(map)));
            inner.publish_gauges();
            // Under the lock: no reader can have taken the agent's path since the check.
            self.unlink(digest);
        }
        Ok(Adopted::Yes)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::put;
    use super::*;

    #[tokio::test]
    async fn containerd_copies_are_served_not_counted_and_replace_the_agents() {
        let dir = tempfile::tempdir().unwrap();
        let ctrd = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        let data: Vec<u8> = (0..(2u32 << 20) + 5).map(|i| (i % 251) as u8).collect();
        let d = Digest::of(&data);
        let path = ctrd.path().join(d.hex());
        std::fs::write(&path, &data).unwrap();

        // Found in containerd: served, verified, counted apart.
        assert!(store.add_external(d, data.len() as u64, path.clone(), None).await.unwrap());
        assert!(!store.add_external(d, data.len() as u64, path.clone(), None).await.unwrap());
        assert_eq!(crate::sync::lock(&store.inner).total_bytes, 0);
        let (_, guard) = store.get(&d).unwrap();
        assert!(guard.is_external());
        assert_eq!(store.read_verified(guard, data.len() as u64).await.unwrap(), data);

        // A manifest's type is sniffed from its bytes.
        let manifest = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","layers":[]}"#;
        let m = Digest::of(manifest);
        std::fs::write(ctrd.path().join(m.hex()), manifest).unwrap();
        assert!(store.add_external(m, manifest.len() as u64, ctrd.path().join(m.hex()), None).await.unwrap());
        assert_eq!(
            store.get(&m).unwrap().0.media_type.as_deref(),
            Some("application/vnd.docker.distribution.manifest.v2+json")
        );

        // Gone from containerd: gone from the index, never from containerd's directory.
        assert!(store.remove_external(&d));
        assert!(!store.contains(&d) && path.exists());

        // The agent's own copy, then containerd keeps it too: one copy, containerd's.
        let own = put(&store, &data, None).await;
        assert_eq!(own, d);
        assert_eq!(crate::sync::lock(&store.inner).total_bytes, data.len() as u64);
        let pinned = store.get(&d).unwrap().1;
        assert_eq!(store.adopt_external(&d, path.clone()).await.unwrap(), Adopted::Busy);
        drop(pinned);
        assert_eq!(store.adopt_external(&d, path.clone()).await.unwrap(), Adopted::Yes);
        assert_eq!(crate::sync::lock(&store.inner).total_bytes, 0);
        assert!(!dir.path().join("blobs/sha256").join(d.hex()).exists());
        let (_, guard) = store.get(&d).unwrap();
        assert!(guard.is_external());
        assert_eq!(store.read_piece(&guard, 2).await.unwrap(), &data[2 << 20..]);
        drop(guard);

        // containerd's copy damaged: quarantined, its file left alone, not taken again.
        let mut bytes = data.clone();
        bytes[(1 << 20) + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let (_, guard) = store.get(&d).unwrap();
        assert!(store.read_piece(&guard, 1).await.is_err());
        assert!(!store.contains(&d) && path.exists());
        assert!(!store.add_external(d, data.len() as u64, path.clone(), None).await.unwrap());
        // A fresh own copy is kept: containerd's does not match.
        put(&store, &data, None).await;
        store.retain_bad_external(&HashSet::new());
        assert_eq!(store.adopt_external(&d, path.clone()).await.unwrap(), Adopted::Mismatch);
        assert!(store.holds_own(&d));
    }
}
