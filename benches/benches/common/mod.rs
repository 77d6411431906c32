//! What the micro benchmarks share (a module, not a bench target: Cargo only discovers
//! `benches/*.rs` and `benches/*/main.rs`).

/// `len` pseudo-random bytes (xorshift): incompressible enough for hashing and codec
/// benchmarks, no rand dependency.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
