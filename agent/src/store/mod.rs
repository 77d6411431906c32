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
//!
//! Nothing leaves a complete blob unverified: [`verify`] reads whole pieces, checks each
//! against its sha256 from the `.pieces` metainfo (rebuilt from the whole digest when it is
//! missing) before a byte of it is handed out, and quarantines a blob whose bytes changed on
//! disk: removed from the index and the disk, withdrawn from the swarm, counted, so the next
//! request downloads it again.

pub mod external;
mod verify;

pub use verify::{ReadError, VerifiedRead};

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
    #[error(
        "no space for {size} bytes in the cache directory {path} ({free} bytes free, {evictable} more \
         could be evicted): {source}"
    )]
    NoSpace { path: PathBuf, size: u64, free: u64, evictable: u64, source: io::Error },
}

impl StoreError {
    /// Whether the disk (not the quota) is full: what was written must be given back.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace { .. } => true,
            StoreError::Write { source, .. } | StoreError::Unusable { source, .. } => is_enospc(source),
        }
    }
}

fn is_enospc(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == io::ErrorKind::StorageFull
}

/// Free bytes for an unprivileged writer on the filesystem holding `path`.
fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Allocates `len` bytes of `file` from 0 (`posix_fallocate`): later writes there cannot fail
/// for lack of space. `Ok(false)` where the filesystem cannot preallocate.
fn preallocate(file: &std::fs::File, len: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(true);
    }
    // SAFETY: a valid open file descriptor; posix_fallocate returns an errno, it sets none.
    match unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) } {
        0 => Ok(true),
        libc::EOPNOTSUPP | libc::EINVAL => Ok(false),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
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
    /// Piece reads shared by concurrent readers, by (digest, generation, piece).
    pieces: Mutex<LruCache<(Digest, u64, u32), verify::PieceJob>>,
}

/// An indexed blob. `gen` tells one stored copy of a digest from a later one (after a
/// quarantine and a fresh download), so a reader of the old copy cannot remove the new one.
struct Slot {
    entry: Entry,
    gen: u64,
    /// `Some(path)`: the bytes are containerd's (its content directory, read-only to us), not
    /// the agent's; they do not count against the quota and are never evicted or deleted by
    /// the agent. See [`external`].
    external: Option<PathBuf>,
}

impl Slot {
    fn own_bytes(&self) -> u64 {
        if self.external.is_some() {
            0
        } else {
            self.entry.size
        }
    }
}

struct Inner {
    /// Complete blobs, least recently used first out.
    index: LruCache<Digest, Slot>,
    /// How many responses are reading each blob now; those are never evicted.
    readers: HashMap<Digest, usize>,
    total_bytes: u64,
    next_gen: u64,
    /// Decoded piece digests of recently read blobs, by generation.
    hashes: LruCache<Digest, (u64, Arc<crate::fetch::PieceMap>)>,
    /// containerd's copies found damaged: not indexed again while containerd still lists them.
    bad_external: std::collections::HashSet<Digest>,
}

/// How many blobs' piece digests are kept decoded in memory (32 bytes per MiB of blob).
const HASH_CACHE: usize = 64;

impl Inner {
    fn publish_gauges(&self) {
        let (mut ext_blobs, mut ext_bytes) = (0i64, 0i64);
        for (_, slot) in self.index.iter().filter(|(_, s)| s.external.is_some()) {
            ext_blobs += 1;
            ext_bytes += slot.entry.size as i64;
        }
        METRICS.cache_bytes.set(self.total_bytes as i64);
        METRICS.cache_blobs.set(self.index.len() as i64 - ext_blobs);
        METRICS.containerd_blobs.set(ext_blobs);
        METRICS.containerd_bytes.set(ext_bytes);
    }

    fn insert(&mut self, digest: Digest, entry: Entry) {
        self.insert_slot(digest, entry, None);
    }

    fn insert_slot(&mut self, digest: Digest, entry: Entry, external: Option<PathBuf>) {
        self.next_gen += 1;
        let slot = Slot { entry, gen: self.next_gen, external };
        let added = slot.own_bytes();
        if let Some(old) = self.index.put(digest, slot) {
            self.total_bytes -= old.own_bytes();
        }
        self.hashes.pop(&digest);
        self.total_bytes += added;
    }

    /// Drops `digest` from the index if it is still generation `gen`; its size if it was.
    fn remove_gen(&mut self, digest: &Digest, gen: u64) -> Option<u64> {
        if self.index.peek(digest).is_none_or(|s| s.gen != gen) {
            return None;
        }
        let slot = self.index.pop(digest)?;
        self.hashes.pop(digest);
        self.total_bytes -= slot.own_bytes();
        self.publish_gauges();
        Some(slot.entry.size)
    }
}

/// Pins a complete blob against eviction while a response reads it.
pub struct ReadGuard {
    store: Arc<Store>,
    digest: Digest,
    gen: u64,
    /// The blob's file: the agent's own, or containerd's.
    path: PathBuf,
    /// Its piece metainfo sidecar (always under the agent's cache directory).
    meta: PathBuf,
    external: bool,
}

impl ReadGuard {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Whether the bytes are containerd's copy (not the agent's own).
    pub fn is_external(&self) -> bool {
        self.external
    }
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
                let mut buf = shoal_protocol::piece::piece_buffer(len);
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
        let ext_meta = root.join("containerd").join("sha256");
        std::fs::create_dir_all(&blobs).map_err(|e| unusable(&blobs, e))?;
        std::fs::create_dir_all(&tmp).map_err(|e| unusable(&tmp, e))?;
        std::fs::create_dir_all(&ext_meta).map_err(|e| unusable(&ext_meta, e))?;

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
        let mut inner = Inner {
            index: LruCache::unbounded(),
            readers: HashMap::new(),
            total_bytes: 0,
            next_gen: 0,
            hashes: LruCache::new(std::num::NonZeroUsize::new(HASH_CACHE).expect("non-zero")),
            bad_external: Default::default(),
        };
        for (_, digest, entry) in found {
            inner.insert(digest, entry);
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
            pieces: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(verify::SHARED_PIECES).expect("non-zero"),
            )),
        });
        let victims = store.pick_victims(None);
        store.remove_files(&victims);
        crate::sync::lock(&store.inner).publish_gauges();
        Ok(store)
    }

    /// Checks that the cache directory can still be written (it may have been removed,
    /// remounted read-only or had its permissions changed while the agent runs): recreates
    /// `blobs/` and `tmp/` if they vanished and writes a probe file. `Err` says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let blobs = self.root.join("blobs").join("sha256");
        let tmp = self.root.join("tmp");
        let vanished = !blobs.is_dir() || !tmp.is_dir();
        for dir in [&blobs, &tmp] {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        if vanished {
            // Whatever was indexed went with the directory.
            let gone: Vec<(Digest, u64)> = {
                let inner = crate::sync::lock(&self.inner);
                inner
                    .index
                    .iter()
                    .filter(|(d, s)| s.external.is_none() && !self.blob_path(d).exists())
                    .map(|(d, s)| (*d, s.gen))
                    .collect()
            };
            for (digest, gen) in &gone {
                crate::sync::lock(&self.inner).remove_gen(digest, *gen);
                if let Some(hook) = self.on_evict.get() {
                    hook(digest);
                }
            }
            tracing::warn!(root = %self.root.display(), forgotten = gone.len(), "cache directory had vanished: recreated");
        }
        // An empty file: a full disk still passes (it is not unwritable, and eviction and
        // `reserve` deal with it), a read-only or forbidden directory does not.
        let probe = tmp.join(".write-probe");
        std::fs::File::create(&probe)
            .and_then(|_| std::fs::remove_file(&probe))
            .map_err(|e| format!("{}: {e}", probe.display()))
    }

    /// Sets what to call when a blob is evicted (once; later calls are ignored).
    pub fn set_evict_hook(&self, hook: EvictHook) {
        let _ = self.on_evict.set(hook);
    }

    /// Every complete blob (the agent's own and containerd's), most recently used first.
    pub fn digests(&self) -> Vec<Digest> {
        crate::sync::lock(&self.inner).index.iter().map(|(d, _)| *d).collect()
    }

    fn ext_meta_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("containerd").join("sha256").join(format!("{}.pieces", digest.hex()))
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
        let slot = inner.index.get(digest)?;
        let (entry, gen) = (slot.entry.clone(), slot.gen);
        let (path, meta, external) = match &slot.external {
            Some(path) => (path.clone(), self.ext_meta_path(digest), true),
            None => (self.blob_path(digest), self.pieces_path(digest), false),
        };
        *inner.readers.entry(*digest).or_insert(0) += 1;
        Some((entry, ReadGuard { store: self.clone(), digest: *digest, gen, path, meta, external }))
    }

    /// Opens a complete blob for reading; hold its [`ReadGuard`] while reading. The bytes are
    /// not verified: what is sent anywhere goes through [`VerifiedRead`] or
    /// [`Store::read_piece`].
    pub async fn open_blob(&self, guard: &ReadGuard) -> io::Result<std::fs::File> {
        Ok(tokio::fs::File::open(&guard.path).await?.into_std().await)
    }

    /// [`Store::open_blob`] by digest, for a caller that handed its guard on.
    pub async fn open_blob_path(&self, digest: &Digest) -> io::Result<std::fs::File> {
        let path = {
            let inner = crate::sync::lock(&self.inner);
            inner.index.peek(digest).and_then(|s| s.external.clone())
        };
        let path = path.unwrap_or_else(|| self.blob_path(digest));
        Ok(tokio::fs::File::open(path).await?.into_std().await)
    }

    fn pieces_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(format!("{}.pieces", digest.hex()))
    }

    /// Reserves the disk space a download of `size` bytes needs, before anything is fetched,
    /// so a full disk ends it at once with a clear error instead of midway. When the disk is
    /// full and evicting least recently used blobs (none being read) would make room, and the
    /// blob fits the quota at all, those are evicted first. On failure the partial download is
    /// removed: a failed download leaves nothing behind.
    pub async fn reserve(self: &Arc<Self>, partial: &Partial, size: u64) -> Result<(), StoreError> {
        let file = partial.file.clone();
        let attempt = move || {
            let file = file.clone();
            async move { flatten(tokio::task::spawn_blocking(move || preallocate(&file, size)).await) }
        };
        let first = attempt().await;
        let source = match first {
            Ok(true) => return Ok(()),
            Ok(false) => {
                tracing::debug!(path = %partial.path.display(), "filesystem cannot preallocate; writes may still find it full");
                return Ok(());
            }
            Err(e) if !is_enospc(&e) => {
                partial.clone().discard().await;
                return Err(StoreError::Write { path: partial.path.clone(), source: e });
            }
            Err(e) => e,
        };
        let free = free_bytes(&self.root).unwrap_or(0);
        let allocated =
            partial.file.metadata().map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap_or(0);
        // Leave a little for metadata and sidecar files.
        let shortfall = size.saturating_sub(allocated).saturating_add(1 << 20).saturating_sub(free);
        let victims = if size <= self.max_bytes { self.pick_space_victims(shortfall) } else { None };
        let evictable = self.evictable_bytes();
        let retried = match victims {
            Some(victims) => {
                tracing::info!(
                    digest = %partial.digest,
                    size,
                    free,
                    blobs = victims.len(),
                    "disk full: evicting least recently used blobs to make room"
                );
                let store = self.clone();
                let _ = tokio::task::spawn_blocking(move || store.remove_files(&victims)).await;
                attempt().await
            }
            None => Err(source),
        };
        match retried {
            Ok(_) => Ok(()),
            Err(source) => {
                partial.clone().discard().await;
                let err = StoreError::NoSpace { path: self.root.clone(), size, free, evictable, source };
                tracing::warn!(digest = %partial.digest, error = %err, "cannot store the download");
                Err(err)
            }
        }
    }

    /// Bytes of complete blobs no request is reading.
    fn evictable_bytes(&self) -> u64 {
        let inner = crate::sync::lock(&self.inner);
        inner.index.iter().filter(|(d, _)| !inner.readers.contains_key(d)).map(|(_, s)| s.own_bytes()).sum()
    }

    /// Takes least recently used unread blobs out of the index until they add up to `bytes`;
    /// `None` (and nothing taken) if all of them together would not.
    fn pick_space_victims(&self, bytes: u64) -> Option<Vec<Digest>> {
        let mut inner = crate::sync::lock(&self.inner);
        let mut picked = Vec::new();
        let mut freed = 0u64;
        for (digest, slot) in inner.index.iter().rev() {
            if freed >= bytes {
                break;
            }
            if inner.readers.contains_key(digest) || slot.external.is_some() {
                continue;
            }
            picked.push(*digest);
            freed += slot.entry.size;
        }
        if freed < bytes || picked.is_empty() {
            return None;
        }
        for digest in &picked {
            if let Some(slot) = inner.index.pop(digest) {
                inner.total_bytes -= slot.own_bytes();
            }
            inner.hashes.pop(digest);
        }
        inner.publish_gauges();
        Some(picked)
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
        tokio::fs::read(&guard.meta).await.ok()
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
            inner.insert(digest, entry);
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
        let candidates: Vec<(Digest, u64)> = inner
            .index
            .iter()
            .rev()
            .filter(|(_, s)| s.external.is_none())
            .map(|(d, s)| (*d, s.entry.size))
            .collect();
        for (digest, size) in candidates {
            if inner.total_bytes <= self.max_bytes {
                break;
            }
            if Some(&digest) == keep || inner.readers.contains_key(&digest) {
                continue;
            }
            inner.index.pop(&digest);
            inner.hashes.pop(&digest);
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
            self.unlink(digest);
        }
    }

    /// Removes a blob's files (the caller dropped it from the index).
    fn unlink(&self, digest: &Digest) {
        for path in [self.blob_path(digest), self.type_path(digest), self.pieces_path(digest)] {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove a blob's file");
                }
            }
        }
    }

    /// Takes a complete blob whose bytes on disk are not what was verified out of service:
    /// out of the index, off the disk, withdrawn from the swarm, counted. Only the copy the
    /// guard reads is affected (a later download of the same digest is left alone). The next
    /// request for the digest downloads it again.
    pub fn quarantine(&self, guard: &ReadGuard, why: &str) {
        let removed = {
            let mut inner = crate::sync::lock(&self.inner);
            let removed = inner.remove_gen(&guard.digest, guard.gen);
            // Under the lock: no new download of this digest can start (and commit a new
            // file) before the old files are gone. containerd's file is containerd's (and
            // mounted read-only): it is only never indexed again while containerd lists it.
            if removed.is_some() {
                if guard.external {
                    let _ = std::fs::remove_file(&guard.meta);
                    inner.bad_external.insert(guard.digest);
                } else {
                    self.unlink(&guard.digest);
                }
            }
            removed
        };
        let Some(size) = removed else { return };
        tracing::error!(
            digest = %guard.digest,
            size,
            why,
            copy = if guard.external { "containerd's" } else { "the agent's" },
            "blob damaged on disk: quarantined (removed, withdrawn from the swarm); the next request downloads it again"
        );
        METRICS.corrupt_blobs.inc();
        if let Some(hook) = self.on_evict.get() {
            hook(&guard.digest);
        }
    }

    /// Drops a blob whose file disappeared from under the store (removed by hand, cache
    /// directory gone) from the index, so the next request downloads it again.
    fn forget_vanished(&self, guard: &ReadGuard) {
        let removed = crate::sync::lock(&self.inner).remove_gen(&guard.digest, guard.gen);
        if removed.is_some() {
            tracing::warn!(digest = %guard.digest, "blob file vanished from the cache: forgotten");
            if let Some(hook) = self.on_evict.get() {
                hook(&guard.digest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stores `data` as a complete blob (also used by `external`'s tests).
    pub(super) async fn put(store: &Arc<Store>, data: &[u8], media_type: Option<&str>) -> Digest {
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

    async fn read_all(store: &Arc<Store>, d: &Digest, start: u64, end: u64) -> Result<Vec<u8>, ReadError> {
        let (_, guard) = store.get(d).expect("stored");
        let mut r = VerifiedRead::open(guard, start, end).await?;
        let mut out = Vec::new();
        while let Some(chunk) = r.next_chunk().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn reads_are_verified_and_a_changed_blob_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        let evicted = Arc::new(Mutex::new(Vec::new()));
        let seen = evicted.clone();
        store.set_evict_hook(Box::new(move |d| seen.lock().unwrap().push(*d)));
        // Three and a bit pieces, no `.pieces` file: rebuilt from the whole digest.
        let data: Vec<u8> = (0..(3u32 << 20) + 77).map(|i| (i * 7 + i / 4096) as u8).collect();
        let d = put(&store, &data, None).await;
        let pieces = dir.path().join("blobs/sha256").join(format!("{}.pieces", d.hex()));
        assert!(!pieces.exists());
        assert_eq!(read_all(&store, &d, 0, data.len() as u64).await.unwrap(), data);
        assert!(pieces.exists(), "metainfo rebuilt from the verified whole");
        // Ranges inside a piece, across pieces, the last byte, empty.
        let n = data.len() as u64;
        for (s, e) in [(5, 17), ((1 << 20) - 3, (2 << 20) + 9), (n - 1, n), (10, 10), (0, n)] {
            assert_eq!(read_all(&store, &d, s, e).await.unwrap(), &data[s as usize..e as usize], "{s}..{e}");
        }
        let (_, guard) = store.get(&d).unwrap();
        assert_eq!(store.read_piece(&guard, 3).await.unwrap(), &data[3 << 20..]);
        assert!(matches!(store.read_piece(&guard, 4).await, Err(ReadError::NoSuchPiece { .. })));
        drop(guard);

        // One byte flipped in piece 2: pieces 0 and 1 still read, piece 2 does not, and the
        // blob is out of service for good.
        let path = dir.path().join("blobs/sha256").join(d.hex());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(2 << 20) + 5] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let before = METRICS.corrupt_blobs.get();
        assert_eq!(read_all(&store, &d, 0, 1 << 20).await.unwrap(), &data[..1 << 20]);
        let (_, guard) = store.get(&d).unwrap();
        let err = store.read_piece(&guard, 2).await.unwrap_err();
        assert!(matches!(err, ReadError::Corrupt { .. }), "{err}");
        assert!(!store.contains(&d) && !path.exists() && !pieces.exists());
        assert_eq!(*evicted.lock().unwrap(), vec![d], "withdrawn from the swarm");
        assert!(METRICS.corrupt_blobs.get() > before);
        // A reader of the old copy cannot touch a new copy of the same digest.
        let d2 = put(&store, &data, None).await;
        assert_eq!(d2, d);
        store.quarantine(&guard, "stale guard");
        assert!(store.contains(&d) && path.exists());

        // A client read stops before the damaged piece's bytes: what it got is all correct.
        // (Read once first: that rebuilds its metainfo, which a damaged whole would fail.)
        read_all(&store, &d, 0, 1).await.unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[(1 << 20) + 1] ^= 0x80;
        std::fs::write(&path, &bytes).unwrap();
        let (_, guard) = store.get(&d).unwrap();
        let mut r = VerifiedRead::open(guard, 0, n).await.unwrap();
        let mut got = Vec::new();
        let err = loop {
            match r.next_chunk().await {
                Some(Ok(c)) => got.extend_from_slice(&c),
                Some(Err(e)) => break e,
                None => panic!("a damaged blob read to the end"),
            }
        };
        assert!(matches!(err, ReadError::Corrupt { .. }), "{err}");
        assert_eq!(got, &data[..1 << 20]);
        assert!(r.next_chunk().await.is_none());
        assert!(!store.contains(&d));

        // Damaged in its first piece: opening the read says so (the registry then downloads).
        let d3 = put(&store, &data, None).await;
        read_all(&store, &d3, 0, 1).await.unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        // Concurrent readers share a just-verified piece from memory (correct bytes); a read
        // after it left that small cache goes to the disk again.
        let (_, guard) = store.get(&d3).unwrap();
        let mut r = VerifiedRead::open(guard, 0, n).await.expect("piece 0 shared from memory");
        assert_eq!(r.next_chunk().await.unwrap().unwrap(), &data[..256 << 10]);
        drop(r);
        store.pieces.lock().unwrap().clear();
        let (_, guard) = store.get(&d3).unwrap();
        assert!(matches!(VerifiedRead::open(guard, 0, n).await, Err(ReadError::Corrupt { .. })));
        // Vanished files are forgotten, not an error forever.
        let d4 = put(&store, b"short", None).await;
        std::fs::remove_file(dir.path().join("blobs/sha256").join(d4.hex())).unwrap();
        let (_, guard) = store.get(&d4).unwrap();
        assert!(matches!(VerifiedRead::open(guard, 0, 5).await, Err(ReadError::Vanished { .. })));
        assert!(!store.contains(&d4));
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
