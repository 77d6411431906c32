//! Property tests of the tracker protocol's codec on arbitrary input (bounded, in the fast
//! tier): decoding never panics, refuses with a message, and whatever it accepts is valid
//! (it encodes again). The piece protocol's are in `protocol.rs`.

use proptest::prelude::*;

use crate::tracker::*;

fn plan_request(size: u64, piece_size: u32, have: Vec<u8>, attest: Vec<(u32, [u8; 32])>) -> TrackerRequest {
    TrackerRequest::Plan(PlanRequest {
        digest: [7; 32],
        size,
        piece_size,
        have,
        attest,
        complete: false,
        fetching: Vec::new(),
        planned: false,
    })
}

fn heartbeat(zone: Option<String>, held: Vec<[u8; 32]>, why: String) -> TrackerRequest {
    TrackerRequest::Heartbeat(Heartbeat {
        zone,
        full: true,
        held_added: held.clone(),
        held_removed: Vec::new(),
        downloading: held,
        counters: NodeCounters { origin_bytes: 1, peer_bytes: 2, sent_bytes: 3, cache_bytes: 4 },
        preheat: vec![PreheatProgress {
            id: 9,
            blobs_done: 1,
            blobs_total: 2,
            bytes_done: 3,
            bytes_total: 4,
            state: PreheatState::Failed(why),
        }],
    })
}

fn request_strategy() -> impl Strategy<Value = TrackerRequest> {
    prop_oneof![
        (
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec((any::<u32>(), proptest::array::uniform32(any::<u8>())), 0..8)
        )
            .prop_map(|(size, piece_size, have, attest)| plan_request(size, piece_size, have, attest)),
        (
            proptest::option::of(".{0,80}"),
            proptest::collection::vec(proptest::array::uniform32(any::<u8>()), 0..8),
            ".{0,300}"
        )
            .prop_map(|(zone, held, why)| heartbeat(zone, held, why)),
    ]
}

fn response_strategy() -> impl Strategy<Value = TrackerResponse> {
    prop_oneof![
        ".{0,300}".prop_map(TrackerResponse::Refused),
        (
            proptest::collection::vec(any::<u32>(), 0..16),
            proptest::collection::vec((any::<u32>(), proptest::array::uniform32(any::<u8>())), 0..8),
            any::<u32>()
        )
            .prop_map(|(assigned, piece_digests, next_ask_ms)| TrackerResponse::Plan(Plan {
                peers: Vec::new(),
                assigned,
                piece_digests,
                next_ask_ms
            })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn garbage_is_refused_with_a_message(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        match decode_tracker_request(&bytes) {
            // Accepted input is valid: it encodes again, and that decodes.
            Ok(request) => {
                let again = encode_tracker_request(&request);
                prop_assert!(again.is_ok_and(|b| decode_tracker_request(&b).is_ok()));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        match decode_tracker_response(&bytes) {
            Ok(response) => {
                let again = encode_tracker_response(&response);
                prop_assert!(again.is_ok_and(|b| decode_tracker_response(&b).is_ok()));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// Arbitrary messages: encoding refuses the invalid ones (too long texts, bitfields that
    /// do not fit) and whatever encodes decodes to the same bytes; every truncation and every
    /// one-byte change of the encoding is decoded without a panic.
    #[test]
    fn messages_round_trip_and_damage_is_caught(
        request in request_strategy(),
        response in response_strategy(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        for bytes in [encode_tracker_request(&request).ok(), encode_tracker_response(&response).ok()]
            .into_iter()
            .flatten()
        {
            let again = decode_tracker_request(&bytes)
                .ok()
                .and_then(|r| encode_tracker_request(&r).ok())
                .or_else(|| decode_tracker_response(&bytes).ok().and_then(|r| encode_tracker_response(&r).ok()));
            prop_assert_eq!(again.as_ref(), Some(&bytes));
            let truncated = &bytes[..cut.index(bytes.len())];
            let _ = decode_tracker_request(truncated);
            let _ = decode_tracker_response(truncated);
            let mut flipped = bytes.clone();
            let i = flip.index(flipped.len());
            flipped[i] ^= xor;
            let _ = decode_tracker_request(&flipped);
            let _ = decode_tracker_response(&flipped);
        }
    }
}
