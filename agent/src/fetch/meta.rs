//! On-disk forms of piece information:
//!
//! - the piece map of a partial download (`tmp/<hex>.state`), saved as pieces are verified
//!   so a restarted agent resumes them: `SHOALPS1`, size (u64 LE), piece size (u32 LE),
//!   piece count (u32 LE), the verified bitfield, then 32 bytes per piece (zeros where not
//!   verified);
//! - the piece metainfo of a complete blob (`blobs/sha256/<hex>.pieces`), from which peers
//!   are told piece digests: `SHOALPM1`, size, piece size, count, 32 bytes per piece.
//!
//! Decoding checks every length against the layout and returns `None` on anything odd: a
//! damaged file only costs a refetch.

use crate::pieces::{Bitfield, Layout};

const STATE_MAGIC: &[u8; 8] = b"SHOALPS1";
const META_MAGIC: &[u8; 8] = b"SHOALPM1";

/// Verified pieces and their digests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PieceMap {
    pub layout: Layout,
    pub verified: Bitfield,
    pub digests: Vec<[u8; 32]>,
}

impl PieceMap {
    pub fn new(layout: Layout) -> Self {
        let n = layout.pieces();
        PieceMap { layout, verified: Bitfield::new(n), digests: vec![[0; 32]; n as usize] }
    }

    pub fn set(&mut self, index: u32, digest: [u8; 32]) {
        if let Some(slot) = self.digests.get_mut(index as usize) {
            *slot = digest;
            self.verified.set(index);
        }
    }

    /// Marks piece `index` not verified (its digest slot is zeroed).
    pub fn unset(&mut self, index: u32) {
        if let Some(slot) = self.digests.get_mut(index as usize) {
            *slot = [0; 32];
            self.verified.unset(index);
        }
    }

    /// Bytes from 0 that are verified and contiguous.
    pub fn watermark(&self) -> u64 {
        let first_missing = self.verified.first_missing();
        if first_missing >= self.layout.pieces() {
            self.layout.size
        } else {
            self.layout.range(first_missing).0
        }
    }

    pub fn attested(&self) -> Vec<(u32, [u8; 32])> {
        (0..self.layout.pieces())
            .filter(|&i| self.verified.get(i))
            .map(|i| (i, self.digests[i as usize]))
            .collect()
    }

    fn header(&self, magic: &[u8; 8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.digests.len() * 32);
        out.extend_from_slice(magic);
        out.extend_from_slice(&self.layout.size.to_le_bytes());
        out.extend_from_slice(&self.layout.piece_size.to_le_bytes());
        out.extend_from_slice(&self.layout.pieces().to_le_bytes());
        out
    }

    pub fn encode_state(&self) -> Vec<u8> {
        let mut out = self.header(STATE_MAGIC);
        out.extend_from_slice(self.verified.as_bytes());
        self.digests.iter().for_each(|d| out.extend_from_slice(d));
        out
    }

    /// The metainfo of a complete blob (every piece verified).
    pub fn encode_meta(&self) -> Vec<u8> {
        let mut out = self.header(META_MAGIC);
        self.digests.iter().for_each(|d| out.extend_from_slice(d));
        out
    }

    fn decode_header(bytes: &[u8], magic: &[u8; 8], layout: Layout) -> Option<usize> {
        let n = layout.pieces();
        let ok = bytes.len() >= 24
            && &bytes[..8] == magic
            && bytes[8..16] == layout.size.to_le_bytes()
            && bytes[16..20] == layout.piece_size.to_le_bytes()
            && bytes[20..24] == n.to_le_bytes();
        ok.then_some(24)
    }

    pub fn decode_state(bytes: &[u8], layout: Layout) -> Option<PieceMap> {
        let at = Self::decode_header(bytes, STATE_MAGIC, layout)?;
        let n = layout.pieces() as usize;
        let bits_len = n.div_ceil(8);
        if bytes.len() != at + bits_len + n * 32 {
            return None;
        }
        let verified = Bitfield::from_bytes(bytes[at..at + bits_len].to_vec(), n as u32)?;
        let digests =
            bytes[at + bits_len..].chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect();
        Some(PieceMap { layout, verified, digests })
    }

    /// Decodes metainfo; the layout comes from the file itself (the store knows the size).
    pub fn decode_meta(bytes: &[u8], size: u64) -> Option<PieceMap> {
        let layout = Layout { size, piece_size: u32::from_le_bytes(bytes.get(16..20)?.try_into().ok()?) };
        if layout != Layout::for_size(size) {
            return None;
        }
        let at = Self::decode_header(bytes, META_MAGIC, layout)?;
        let n = layout.pieces() as usize;
        if bytes.len() != at + n * 32 {
            return None;
        }
        let mut map = PieceMap::new(layout);
        for (i, c) in bytes[at..].chunks_exact(32).enumerate() {
            map.set(i as u32, c.try_into().expect("32 bytes"));
        }
        Some(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_meta_round_trip() {
        let layout = Layout::for_size((3 << 20) + 5);
        let mut map = PieceMap::new(layout);
        map.set(0, [1; 32]);
        map.set(2, [3; 32]);
        assert_eq!(map.watermark(), 1 << 20);
        let state = map.encode_state();
        assert_eq!(PieceMap::decode_state(&state, layout), Some(map.clone()));
        // Another layout, truncation or a bad magic are refused.
        assert_eq!(PieceMap::decode_state(&state, Layout::for_size(3 << 20)), None);
        assert_eq!(PieceMap::decode_state(&state[..state.len() - 1], layout), None);
        let mut bad = state.clone();
        bad[0] = b'X';
        assert_eq!(PieceMap::decode_state(&bad, layout), None);

        (0..4).for_each(|i| map.set(i, [i as u8; 32]));
        assert_eq!(map.watermark(), layout.size);
        let meta = map.encode_meta();
        assert_eq!(PieceMap::decode_meta(&meta, layout.size), Some(map));
        assert_eq!(PieceMap::decode_meta(&meta, layout.size + 1), None);
        assert_eq!(PieceMap::decode_meta(&meta[..30], layout.size), None);
    }
}
