//! Verify on read: every piece of a complete blob is checked against its sha256 before any
//! of its bytes leave the node, for peers ([`Store::read_piece`]) and for clients
//! ([`VerifiedRead`]).
//!
//! Why: a disk (or a person, or a bit flip in the page cache) can change a stored blob after
//! its whole digest matched. A peer would catch a bad piece and ban us; the node's own
//! containerd would fail the digest on every retry, with no way out but deleting the cache.
//! Now the first read that sees a changed piece cuts that response and quarantines the blob
//! ([`Store::quarantine`]), and the next request downloads it again.
//!
//! The piece digests come from the blob's `.pieces` metainfo, written at commit from the
//! pieces that made up the verified whole. A blob without one (or with one that does not
//! decode) is hashed whole once: if the whole digest matches, the metainfo is rebuilt from
//! those bytes; if not, the blob is quarantined.
//!
//! Cost: sha256 runs at about 1.7 GB/s on one core here, about the rate a client reads a
//! cached blob. A [`VerifiedRead`] therefore reads and hashes up to [`READ_AHEAD`] pieces
//! ahead on the blocking pool, on other cores, while the current piece is being sent, so a
//! client sees the slower of hashing and sending, not their sum.

use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use sha2::{Digest as _, Sha256};
use tokio::task::JoinHandle;

use super::{flatten, write_atomic, ReadGuard, Store};
use crate::fetch::PieceMap;
use crate::pieces::Layout;
use crate::types::Digest;

/// Pieces a client read reads and verifies ahead of the one it sends.
pub const READ_AHEAD: usize = 2;
/// Largest chunk handed to a client's body at once (slices of a verified piece, no copy).
const CHUNK: usize = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{digest} changed on disk ({what}): quarantined, it will be downloaded again")]
    Corrupt { digest: Digest, what: String },
    #[error("{digest} vanished from the cache: it will be downloaded again")]
    Vanished { digest: Digest },
    #[error("reading {digest}: {source}")]
    Io { digest: Digest, source: io::Error },
    #[error("piece {index} is past the end of {digest}")]
    NoSuchPiece { digest: Digest, index: u32 },
}

/// Reads piece `index` of `file` and whether its sha256 is `expected`.
fn read_and_check(
    file: &std::fs::File,
    layout: Layout,
    index: u32,
    expected: &[u8; 32],
) -> io::Result<(Vec<u8>, bool)> {
    let (start, end) = layout.range(index);
    // Served pieces go back to the pool once sent (see `shoal_protocol::piece::recycle`).
    let mut buf = shoal_protocol::piece::piece_buffer((end - start) as usize);
    file.read_exact_at(&mut buf, start)?;
    let ok = <[u8; 32]>::from(Sha256::digest(&buf)) == *expected;
    Ok((buf, ok))
}

/// Hashes the file at `path`, `size` bytes long, in pieces: its piece digests and whole
/// digest, or `None` when it is longer than `size` (shorter is an `UnexpectedEof` error).
pub(super) fn hash_file(path: &std::path::Path, size: u64) -> io::Result<Option<(PieceMap, Digest)>> {
    let layout = Layout::for_size(size);
    let file = std::fs::File::open(path)?;
    let mut map = PieceMap::new(layout);
    let mut whole = Sha256::new();
    let mut buf = vec![0u8; layout.piece_size as usize];
    for i in 0..layout.pieces() {
        let piece = &mut buf[..layout.len(i) as usize];
        file.read_exact_at(piece, layout.range(i).0)?;
        whole.update(&*piece);
        map.set(i, Sha256::digest(&*piece).into());
    }
    // Longer than indexed is as wrong as shorter.
    let mut extra = [0u8; 1];
    if file.read_at(&mut extra, size)? != 0 {
        return Ok(None);
    }
    Ok(Some((map, Digest::from_sha256(whole.finalize().into()))))
}

impl Store {
    /// Turns a failed read of a complete blob into a [`ReadError`], forgetting a blob whose
    /// file is gone.
    fn read_failed(&self, guard: &ReadGuard, source: io::Error) -> ReadError {
        let digest = guard.digest;
        if source.kind() == io::ErrorKind::NotFound || source.kind() == io::ErrorKind::UnexpectedEof {
            // Gone, or shorter than indexed: either way not the blob that was verified.
            if source.kind() == io::ErrorKind::UnexpectedEof {
                self.quarantine(guard, "shorter than when it was stored");
                return ReadError::Corrupt { digest, what: "shorter than when it was stored".into() };
            }
            self.forget_vanished(guard);
            return ReadError::Vanished { digest };
        }
        ReadError::Io { digest, source }
    }

    /// The piece digests of a complete blob: its `.pieces` metainfo, or, when that is missing
    /// or damaged, rebuilt by hashing the whole blob against its digest (quarantined if that
    /// fails). Cached in memory for recently read blobs.
    pub async fn piece_hashes(&self, guard: &ReadGuard) -> Result<Arc<PieceMap>, ReadError> {
        if let Some((gen, map)) = crate::sync::lock(&self.inner).hashes.get(&guard.digest) {
            if *gen == guard.gen {
                return Ok(map.clone());
            }
        }
        let size = {
            let inner = crate::sync::lock(&self.inner);
            match inner.index.peek(&guard.digest) {
                Some(slot) if slot.gen == guard.gen => slot.entry.size,
                // Quarantined or replaced since the guard was taken.
                _ => return Err(ReadError::Vanished { digest: guard.digest }),
            }
        };
        let meta = tokio::fs::read(&guard.meta).await.ok();
        let map = match meta.and_then(|m| PieceMap::decode_meta(&m, size)) {
            Some(map) => map,
            None => self.rebuild_piece_hashes(guard, size).await?,
        };
        let map = Arc::new(map);
        crate::sync::lock(&self.inner).hashes.put(guard.digest, (guard.gen, map.clone()));
        Ok(map)
    }

    /// Hashes a whole blob: its piece digests if the whole matches its digest (and saves them
    /// as its `.pieces`), else quarantines it.
    async fn rebuild_piece_hashes(&self, guard: &ReadGuard, size: u64) -> Result<PieceMap, ReadError> {
        let path = guard.path.clone();
        let hashed = flatten(tokio::task::spawn_blocking(move || hash_file(&path, size)).await)
            .map_err(|e| self.read_failed(guard, e))?;
        let digest = guard.digest;
        match hashed {
            Some((map, actual)) if actual == digest => {
                let (target, meta) = (guard.meta.clone(), map.encode_meta());
                let saved = flatten(tokio::task::spawn_blocking(move || write_atomic(&target, &meta)).await);
                if let Err(e) = saved {
                    tracing::warn!(%digest, error = %e, "could not save rebuilt piece metainfo");
                }
                tracing::info!(%digest, "piece metainfo rebuilt from the verified whole blob");
                Ok(map)
            }
            other => {
                let what = match other {
                    Some((_, actual)) => format!("whole sha256 is {actual}"),
                    None => "longer than when it was stored".to_string(),
                };
                self.quarantine(guard, &what);
                Err(ReadError::Corrupt { digest, what })
            }
        }
    }

    /// The first `len` bytes of a complete blob (a manifest read whole), every piece verified.
    pub async fn read_verified(&self, guard: ReadGuard, len: u64) -> Result<Vec<u8>, ReadError> {
        let mut read = VerifiedRead::open(guard, 0, len).await?;
        let mut out = Vec::with_capacity(len as usize);
        while let Some(chunk) = read.next_chunk().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// Piece `index` of a complete blob, verified against its digest (for a peer). A mismatch
    /// quarantines the blob.
    pub async fn read_piece(&self, guard: &ReadGuard, index: u32) -> Result<Bytes, ReadError> {
        let map = self.piece_hashes(guard).await?;
        let digest = guard.digest;
        if index >= map.layout.pieces() {
            return Err(ReadError::NoSuchPiece { digest, index });
        }
        let (path, layout, expected) = (guard.path.clone(), map.layout, map.digests[index as usize]);
        let read = flatten(
            tokio::task::spawn_blocking(move || {
                read_and_check(&std::fs::File::open(path)?, layout, index, &expected)
            })
            .await,
        );
        match read {
            Ok((buf, true)) => Ok(Bytes::from(buf)),
            Ok((_, false)) => {
                let what = format!("piece {index} does not match its sha256");
                self.quarantine(guard, &what);
                Err(ReadError::Corrupt { digest, what })
            }
            Err(e) => Err(self.read_failed(guard, e)),
        }
    }
}

/// A piece being read and hashed on the blocking pool: its verified bytes, or why not.
/// Shared, so that readers of the same blob at the same time (several pods of a node
/// starting one image) read and hash each piece once between them.
pub(super) type PieceJob = Shared<BoxFuture<'static, Result<Bytes, PieceFailure>>>;

#[derive(Clone, Debug)]
pub(super) enum PieceFailure {
    Mismatch,
    Io(Arc<io::Error>),
}

/// How many recently verified pieces are kept for concurrent readers, at most
/// [`SHARED_PIECE_MAX`] bytes each (so at most 32 MiB).
pub(super) const SHARED_PIECES: usize = 16;
const SHARED_PIECE_MAX: u32 = 2 << 20;

impl Store {
    /// The read-and-check job of piece `index` of the copy `guard` reads: joined if one
    /// is in flight or just finished, else started on the blocking pool.
    fn piece_job(
        &self,
        guard: &ReadGuard,
        file: &Arc<std::fs::File>,
        layout: Layout,
        index: u32,
        expected: [u8; 32],
    ) -> PieceJob {
        let key = (guard.digest, guard.gen, index);
        let share = layout.piece_size <= SHARED_PIECE_MAX;
        if share {
            if let Some(job) = crate::sync::lock(&self.pieces).get(&key) {
                return job.clone();
            }
        }
        let file = file.clone();
        let handle: JoinHandle<io::Result<(Vec<u8>, bool)>> =
            tokio::task::spawn_blocking(move || read_and_check(&file, layout, index, &expected));
        let job: BoxFuture<'static, Result<Bytes, PieceFailure>> = Box::pin(async move {
            match flatten(handle.await) {
                Ok((buf, true)) => Ok(Bytes::from(buf)),
                Ok((_, false)) => Err(PieceFailure::Mismatch),
                Err(e) => Err(PieceFailure::Io(Arc::new(e))),
            }
        });
        let job = job.shared();
        if share {
            crate::sync::lock(&self.pieces).put(key, job.clone());
        }
        job
    }
}

/// Bytes `start..end` of a complete blob, read in whole pieces, each verified before any of
/// it is returned; pinned against eviction by its guard. See the module docs.
pub struct VerifiedRead {
    guard: ReadGuard,
    file: Arc<std::fs::File>,
    map: Arc<PieceMap>,
    pos: u64,
    end: u64,
    /// The next piece to start reading.
    next_piece: u32,
    /// Reads (with their check) in flight, in piece order.
    ahead: VecDeque<(u32, PieceJob)>,
    /// The verified piece being sent: its first byte's offset and its bytes.
    current: Option<(u64, Bytes)>,
}

impl VerifiedRead {
    pub async fn open(guard: ReadGuard, start: u64, end: u64) -> Result<VerifiedRead, ReadError> {
        let store = guard.store.clone();
        let map = store.piece_hashes(&guard).await?;
        let file = match tokio::fs::File::open(&guard.path).await {
            Ok(f) => Arc::new(f.into_std().await),
            Err(e) => return Err(store.read_failed(&guard, e)),
        };
        let end = end.min(map.layout.size);
        let next_piece = (start / u64::from(map.layout.piece_size)) as u32;
        let mut read = VerifiedRead {
            guard,
            file,
            map,
            pos: start.min(end),
            end,
            next_piece,
            ahead: VecDeque::new(),
            current: None,
        };
        // The first piece is checked before the response starts: a damaged one is reported
        // here, when the caller can still fetch the blob again instead of cutting a response.
        if read.pos < read.end {
            read.load_next().await?;
        }
        Ok(read)
    }

    /// Waits for the next piece read, checks it, and makes it the current piece.
    async fn load_next(&mut self) -> Result<(), ReadError> {
        self.fill();
        let Some((index, job)) = self.ahead.pop_front() else {
            return Err(ReadError::NoSuchPiece { digest: self.guard.digest, index: self.next_piece });
        };
        let store = self.guard.store.clone();
        let result = match job.await {
            Ok(bytes) => {
                let at = u64::from(index) * u64::from(self.map.layout.piece_size);
                self.current = Some((at, bytes));
                Ok(())
            }
            Err(PieceFailure::Mismatch) => {
                let what = format!("piece {index} does not match its sha256");
                store.quarantine(&self.guard, &what);
                Err(ReadError::Corrupt { digest: self.guard.digest, what })
            }
            Err(PieceFailure::Io(e)) => {
                Err(store.read_failed(&self.guard, io::Error::new(e.kind(), e.to_string())))
            }
        };
        if result.is_ok() {
            self.fill();
        } else {
            self.pos = self.end;
        }
        result
    }

    fn last_piece(&self) -> u32 {
        ((self.end.max(1) - 1) / u64::from(self.map.layout.piece_size)) as u32
    }

    /// Keeps up to [`READ_AHEAD`] + 1 piece reads in flight.
    fn fill(&mut self) {
        while self.ahead.len() <= READ_AHEAD && self.end > 0 && self.next_piece <= self.last_piece() {
            let index = self.next_piece;
            let job = self.guard.store.piece_job(
                &self.guard,
                &self.file,
                self.map.layout,
                index,
                self.map.digests[index as usize],
            );
            self.ahead.push_back((index, job));
            self.next_piece += 1;
        }
    }

    /// The next verified chunk; `None` at the end. After an error the read is over.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, ReadError>> {
        if self.pos >= self.end {
            return None;
        }
        let have = self.current.as_ref().is_some_and(|(at, b)| self.pos < at + b.len() as u64);
        if !have {
            if let Err(e) = self.load_next().await {
                return Some(Err(e));
            }
        }
        let (at, bytes) = self.current.as_ref().expect("a verified piece covers pos");
        let from = (self.pos - at) as usize;
        let to = (bytes.len()).min((self.end - at) as usize).min(from + CHUNK);
        let chunk = bytes.slice(from..to);
        self.pos += chunk.len() as u64;
        Some(Ok(chunk))
    }

    /// The digest being read.
    pub fn digest(&self) -> &Digest {
        &self.guard.digest
    }
}
