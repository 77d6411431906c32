//! Property tests (bounded, in the fast tier) of what the registry parses from a client:
//! the route, the references and digests in it, and `Range`. On arbitrary input nothing
//! panics, every refusal is a 4xx with an OCI code, and what is accepted is consistent.

use proptest::prelude::*;

use super::range::{self, RangeSpec};
use super::*;

/// Paths that look like registry paths often enough to reach every branch.
fn path_strategy() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        Just("v2".to_string()),
        Just("manifests".to_string()),
        Just("blobs".to_string()),
        Just("uploads".to_string()),
        Just(String::new()),
        "[a-z0-9._-]{1,12}",
        "sha256:[0-9a-f]{0,66}",
        "%[0-9A-Fa-f]{0,2}",
        ".{0,12}",
    ];
    proptest::collection::vec(part, 0..8).prop_map(|parts| format!("/{}", parts.join("/")))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn routes_of_any_path_are_consistent(path in prop_oneof![path_strategy(), ".{0,64}"]) {
        let decoded = percent_decode(&path);
        match parse_route(&decoded) {
            Route::Manifest { name, reference } => {
                prop_assert_eq!(format!("/v2/{name}/manifests/{reference}"), decoded.clone());
                // Every reference is answered: a tag, a digest, 400 or 404, never a panic.
                if let Err(e) = parse_reference(reference) {
                    prop_assert!(e.status == StatusCode::BAD_REQUEST || e.status == StatusCode::NOT_FOUND);
                    prop_assert!(!e.message.is_empty());
                    if reference.contains(':') {
                        prop_assert_eq!(e.code, Code::DigestInvalid);
                    } else {
                        prop_assert_eq!(e.code, Code::ManifestUnknown);
                    }
                }
                let _ = name.parse::<RepoName>();
            }
            Route::Blob { name, digest } => {
                prop_assert_eq!(format!("/v2/{name}/blobs/{digest}"), decoded.clone());
                if let Err(e) = digest.parse::<Digest>() {
                    let e = ApiError::from(e);
                    prop_assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, Code::DigestInvalid));
                }
            }
            Route::Base => prop_assert!(decoded == "/v2" || decoded == "/v2/"),
            Route::Other => {}
        }
    }

    #[test]
    fn any_range_header_is_answered_consistently(
        header in prop_oneof![
            "bytes=[0-9]{0,21}-[0-9]{0,21}",
            "bytes= ?-?[0-9]{0,5} ?(,[0-9-]{0,6})?",
            ".{0,40}",
        ],
        size in prop_oneof![Just(0u64), Just(1), 0u64..10_000, Just(u64::MAX)],
    ) {
        match range::parse(Some(&header), size) {
            RangeSpec::Partial { start, end } => prop_assert!(start < end && end <= size, "{start}..{end} of {size}"),
            RangeSpec::Full | RangeSpec::Unsatisfiable | RangeSpec::Invalid => {}
        }
        match range::resolve(Some(&header), size) {
            Ok((status, start, end, content_range)) => {
                prop_assert!(start <= end && end <= size);
                match content_range {
                    Some(cr) => {
                        prop_assert_eq!(status, StatusCode::PARTIAL_CONTENT);
                        prop_assert_eq!(cr, format!("bytes {start}-{}/{size}", end - 1));
                    }
                    None => prop_assert_eq!((status, start, end), (StatusCode::OK, 0, size)),
                }
            }
            Err(e) => {
                prop_assert!(e.status == StatusCode::BAD_REQUEST || e.status == StatusCode::RANGE_NOT_SATISFIABLE);
                prop_assert_eq!(e.code, Code::RangeInvalid);
            }
        }
    }
}
