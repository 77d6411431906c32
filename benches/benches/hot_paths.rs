//! Micro benchmarks of the agent's hot paths: piece hashing, piece message encode/decode, store
//! writes. Run with `cargo bench -p shoal-benches` (an optional argument filters by name).
//!
//! A plain `harness = false` loop rather than criterion: each case is a throughput over
//! megabyte-sized inputs where the median of a few dozen timed batches is stable to a few
//! percent, and CI compiles every bench target (`clippy --all-targets`), so a statistics
//! framework and its dependency tree would cost every CI run for precision we do not use.
//! Each case warms up, sizes its batch to ~50 ms, times 21 batches and prints the median and
//! the spread (min–max) as MiB/s.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::random_bytes;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use shoal_agent::store::Store;
use shoal_agent::types::Digest;
use shoal_protocol::piece::{
    decode_request, decode_response, encode_request, encode_response, HaveInfo, PieceRequest, PieceResponse,
    MAX_RESPONSE_BYTES,
};

const MIB: usize = 1 << 20;
const SAMPLES: usize = 21;

/// Times `f` (which processes `bytes` bytes per call); prints median and spread in MiB/s.
fn bench(filter: Option<&str>, name: &str, bytes: usize, mut f: impl FnMut()) {
    if filter.is_some_and(|p| !name.contains(p)) {
        return;
    }
    // Warm up, and find a batch size of about 50 ms.
    let start = Instant::now();
    let mut calls = 0u32;
    while start.elapsed() < Duration::from_millis(200) || calls < 2 {
        f();
        calls += 1;
    }
    let per_call = start.elapsed() / calls;
    let batch = (Duration::from_millis(50).as_nanos() / per_call.as_nanos().max(1)).clamp(1, 100_000) as u32;
    let mut rates: Vec<f64> = (0..SAMPLES)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..batch {
                f();
            }
            (bytes as f64 * f64::from(batch)) / t.elapsed().as_secs_f64() / MIB as f64
        })
        .collect();
    rates.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name:<44} {:>10.1} MiB/s  (min {:.1}, max {:.1}; {batch} per batch)",
        rates[SAMPLES / 2],
        rates[0],
        rates[SAMPLES - 1]
    );
}

fn main() {
    // `cargo bench` passes `--bench`; anything else not starting with `-` is a name filter.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let filter = filter.as_deref();
    let piece = random_bytes(MIB, 1);

    bench(filter, "hash: sha256 of a 1 MiB piece", MIB, || {
        black_box(Sha256::digest(black_box(&piece)));
    });
    bench(filter, "hash: Digest::of (agent) 1 MiB", MIB, || {
        black_box(Digest::of(black_box(&piece)));
    });

    let digest = Digest::of(&piece);
    let response = PieceResponse::Piece { index: 7, data: piece.clone() };
    let encoded = encode_response(&response, MAX_RESPONSE_BYTES).expect("encode a piece");
    bench(filter, "codec: encode Piece response (1 MiB)", MIB, || {
        black_box(encode_response(black_box(&response), MAX_RESPONSE_BYTES).expect("encode"));
    });
    bench(filter, "codec: decode Piece response (1 MiB)", MIB, || {
        black_box(decode_response(black_box(&encoded), MAX_RESPONSE_BYTES).expect("decode"));
    });
    // A `Have` answer for a 2 GiB blob of 1 MiB pieces: the largest one a peer sends per blob.
    let pieces = 2048u32;
    let have = PieceResponse::Have(HaveInfo {
        size: u64::from(pieces) * MIB as u64,
        piece_size: MIB as u32,
        have: vec![0xff; pieces as usize / 8],
        piece_digests: (0..pieces).map(|i| (i, *Digest::of(&i.to_le_bytes()).as_bytes())).collect(),
        complete: true,
        media_type: None,
    });
    let have_bytes = encode_response(&have, MAX_RESPONSE_BYTES).expect("encode have");
    bench(filter, "codec: encode Have (2048 pieces)", have_bytes.len(), || {
        black_box(encode_response(black_box(&have), MAX_RESPONSE_BYTES).expect("encode"));
    });
    bench(filter, "codec: decode Have (2048 pieces)", have_bytes.len(), || {
        black_box(decode_response(black_box(&have_bytes), MAX_RESPONSE_BYTES).expect("decode"));
    });
    let request = PieceRequest::piece(&digest, 42);
    let request_bytes = encode_request(&request).expect("encode request");
    bench(filter, "codec: encode+decode Piece request", request_bytes.len(), || {
        let b = encode_request(black_box(&request)).expect("encode");
        black_box(decode_request(&b).expect("decode"));
    });

    // Store: what a download does per piece (positioned write into the partial file), and a
    // whole 16 MiB blob from open to commit (fsync + rename + index).
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let dir = tempfile::Builder::new().prefix("shoal-bench-store-").tempdir().expect("temp dir");
    let store = Store::open(dir.path(), u64::MAX).expect("open store");
    let piece_bytes = Bytes::from(piece.clone());
    let (partial, _) = rt.block_on(store.open_partial(&digest)).expect("open partial");
    let mut offset = 0u64;
    bench(filter, "store: write_at 1 MiB piece (partial file)", MIB, || {
        // Cycle over a 64 MiB file so the page cache, not the file size, is what is measured.
        rt.block_on(partial.write_at(offset, piece_bytes.clone())).expect("write_at");
        offset = (offset + MIB as u64) % (64 * MIB as u64);
    });
    rt.block_on(partial.discard());
    let blob_pieces = 16;
    let mut n = 0u64;
    bench(filter, "store: 16 MiB blob, 16 writes + commit", blob_pieces * MIB, || {
        n += 1;
        let digest = Digest::of(&n.to_le_bytes());
        rt.block_on(async {
            let (partial, _) = store.open_partial(&digest).await.expect("open partial");
            for i in 0..blob_pieces {
                partial.write_at((i * MIB) as u64, piece_bytes.clone()).await.expect("write_at");
            }
            store.commit(partial, None, None).await.expect("commit");
        });
    });
}
