//! Pieces: how a blob is cut for sharing between agents, which pieces a node holds, and who
//! fetches which piece from the origin.
//!
//! ## Size policy
//!
//! A blob of `size` bytes is cut into pieces of [`piece_size_for`]`(size)` bytes (the last
//! one shorter): 1 MiB up to 2 GiB, then doubling so a blob never has more than
//! [`TARGET_MAX_PIECES`] pieces, up to 16 MiB. Small pieces let a node share a piece sooner
//! (in-flight sharing starts after the first verified piece) and spread one blob over many
//! peers; large pieces cost fewer requests and hashes. 1 MiB caps a blob's metainfo at
//! 64 KiB (2048 × 32-byte digests); the per-piece cost (one request, one sha256
//! finalisation) is to be measured against larger sizes by the peer-path benchmark in
//! `benches/` before this policy is final. Objects of one piece (manifests, configs, small
//! layers) are shared the same way.
//!
//! ## Origin owners
//!
//! When several nodes download a digest nobody holds, each piece gets one origin owner by
//! rendezvous (highest random weight) hashing over the nodes downloading it:
//! every node computes the same owner from the same set, a node joining or leaving moves
//! only its own share of pieces, and no coordinator is needed. Non-owners take the piece
//! from the owner (or anyone holding it); a piece whose owner stalls is taken over.

use sha2::{Digest as _, Sha256};

use crate::types::Digest;

/// Smallest piece size.
pub const MIN_PIECE_SIZE: u32 = 1 << 20;
/// Largest piece size (and so the largest piece message on the wire).
pub const MAX_PIECE_SIZE: u32 = 16 << 20;
/// Piece count above which the piece size doubles.
pub const TARGET_MAX_PIECES: u64 = 2048;

/// Benchmark-only override of the smallest piece size (`SHOAL_BENCH_MIN_PIECE_SIZE`, bytes,
/// a power of two between 64 KiB and 16 MiB), so the peer-path benchmark can compare
/// policies. Every node of a swarm must use the same value.
fn min_piece_size() -> u64 {
    static MIN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("SHOAL_BENCH_MIN_PIECE_SIZE")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|v| v.is_power_of_two() && (64 << 10..=u64::from(MAX_PIECE_SIZE)).contains(v))
            .unwrap_or(u64::from(MIN_PIECE_SIZE))
    })
}

/// The piece size for a blob of `size` bytes.
pub fn piece_size_for(size: u64) -> u32 {
    let mut piece = min_piece_size();
    while size.div_ceil(piece) > TARGET_MAX_PIECES && piece < u64::from(MAX_PIECE_SIZE) {
        piece *= 2;
    }
    piece as u32
}

/// The geometry of a blob: its size and piece size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub size: u64,
    pub piece_size: u32,
}

impl Layout {
    pub fn for_size(size: u64) -> Self {
        Layout { size, piece_size: piece_size_for(size) }
    }

    /// Number of pieces (an empty blob has one empty piece, so it can be shared the same way).
    pub fn pieces(&self) -> u32 {
        (self.size.div_ceil(u64::from(self.piece_size))).max(1) as u32
    }

    /// Byte range `start..end` of piece `index`.
    pub fn range(&self, index: u32) -> (u64, u64) {
        let start = u64::from(index) * u64::from(self.piece_size);
        (start.min(self.size), (start + u64::from(self.piece_size)).min(self.size))
    }

    pub fn len(&self, index: u32) -> u64 {
        let (s, e) = self.range(index);
        e - s
    }
}

/// One bit per piece, LSB first in each byte (the wire form of `HaveInfo::have`).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Bitfield {
    bits: Vec<u8>,
    len: u32,
}

impl Bitfield {
    pub fn new(len: u32) -> Self {
        Bitfield { bits: vec![0; (len as usize).div_ceil(8)], len }
    }

    /// From wire bytes; `None` if the byte count does not fit `len` or spare bits are set.
    pub fn from_bytes(bytes: Vec<u8>, len: u32) -> Option<Self> {
        if bytes.len() != (len as usize).div_ceil(8) {
            return None;
        }
        let spare = (8 - len % 8) % 8;
        if spare > 0 && bytes.last().is_some_and(|b| b >> (8 - spare) != 0) {
            return None;
        }
        Some(Bitfield { bits: bytes, len })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    pub fn set(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    pub fn unset(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] &= !(1 << (i % 8));
        }
    }

    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| b.count_ones()).sum()
    }

    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    /// The first index not set, or `len` when all are.
    pub fn first_missing(&self) -> u32 {
        (0..self.len).find(|&i| !self.get(i)).unwrap_or(self.len)
    }
}

/// Rendezvous weight of `node` for piece `index` of `digest` (the owner is the node with the
/// highest; exposed so a caller can keep the best weight and compare only a new node's).
pub fn weight(digest: &Digest, index: u32, node: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(digest.as_bytes());
    h.update(index.to_be_bytes());
    h.update(node);
    h.finalize().into()
}

/// The origin owner of piece `index` among `nodes` (each node's stable id bytes): the node
/// with the highest rendezvous weight. `None` for an empty set.
pub fn origin_owner<'a, N: AsRef<[u8]>>(digest: &Digest, index: u32, nodes: &'a [N]) -> Option<&'a N> {
    nodes.iter().max_by_key(|n| weight(digest, index, n.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Boundary sizes around the piece size and the piece-count threshold.
    const INTERESTING_SIZES: [u64; 9] = [
        0,
        1,
        (1 << 20) - 1, // one byte short of a piece
        1 << 20,       // exactly one piece
        (1 << 20) + 1, // a second piece of one byte
        2048 << 20,    // the largest blob with 1 MiB pieces
        (2048 << 20) + 1,
        64 << 30,
        1 << 50,
    ];

    #[test]
    fn piece_sizes() {
        let sizes: Vec<u32> = INTERESTING_SIZES.iter().map(|&s| piece_size_for(s)).collect();
        assert_eq!(&sizes[..6], &[1 << 20; 6]);
        assert_eq!(sizes[6], 2 << 20);
        assert_eq!(sizes[7], 16 << 20);
        assert_eq!(sizes[8], MAX_PIECE_SIZE);
        for &size in &INTERESTING_SIZES[..8] {
            let layout = Layout::for_size(size);
            assert!(
                u64::from(layout.pieces()) <= TARGET_MAX_PIECES.max(1) || layout.piece_size == MAX_PIECE_SIZE
            );
            // The pieces tile the blob exactly.
            let last = layout.pieces() - 1;
            assert_eq!(layout.range(0).0, 0);
            assert_eq!(layout.range(last).1, size);
            assert!(layout.len(last) > 0 || size == 0);
        }
        let l = Layout::for_size((1 << 20) + 1);
        assert_eq!((l.pieces(), l.range(1), l.len(1)), (2, (1 << 20, (1 << 20) + 1), 1));
        assert_eq!(Layout::for_size(0).pieces(), 1);
    }

    #[test]
    fn bitfields() {
        let mut b = Bitfield::new(10);
        assert_eq!(b.as_bytes().len(), 2);
        b.set(0);
        b.set(9);
        b.set(10); // out of range: ignored
        assert!(b.get(0) && b.get(9) && !b.get(1) && !b.get(10));
        assert_eq!((b.count(), b.first_missing()), (2, 1));
        assert_eq!(Bitfield::from_bytes(b.as_bytes().to_vec(), 10), Some(b.clone()));
        assert_eq!(Bitfield::from_bytes(vec![0xff, 0xff], 10), None, "spare bits set");
        assert_eq!(Bitfield::from_bytes(vec![0], 10), None, "too short");
        let mut full = Bitfield::new(3);
        (0..3).for_each(|i| full.set(i));
        assert!(full.is_full());
        assert_eq!(full.first_missing(), 3);
    }

    #[test]
    fn rendezvous_owners_are_stable_and_spread() {
        let d = Digest::of(b"blob");
        let nodes: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 8]).collect();
        let mut counts = [0u32; 10];
        for i in 0..1000 {
            let owner = origin_owner(&d, i, &nodes).unwrap();
            counts[owner[0] as usize] += 1;
        }
        // Every node owns a fair share (expected 100 each).
        assert!(counts.iter().all(|&c| (50..=150).contains(&c)), "{counts:?}");
        // Removing one node moves only that node's pieces.
        let fewer: Vec<Vec<u8>> = nodes.iter().filter(|n| n[0] != 3).cloned().collect();
        for i in 0..1000 {
            let before = origin_owner(&d, i, &nodes).unwrap();
            let after = origin_owner(&d, i, &fewer).unwrap();
            if before[0] != 3 {
                assert_eq!(before, after);
            }
        }
        assert!(origin_owner::<Vec<u8>>(&d, 0, &[]).is_none());
    }
}
