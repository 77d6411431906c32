//! HTTP `Range` for blob responses (RFC 9110 §14): one byte range, `bytes=a-b`, `bytes=a-`
//! or `bytes=-n`. Several ranges or another unit are ignored (the whole body is sent, which
//! the RFC allows); a malformed byte range is a 400; a range that starts past the end is 416.

use axum::http::{header, HeaderValue, StatusCode};

use super::error::{ApiError, Code};

/// A parsed `Range` header against an object of known size.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeSpec {
    Full,
    /// Bytes `start..end` (end exclusive).
    Partial {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
    Invalid,
}

pub fn parse(header: Option<&str>, size: u64) -> RangeSpec {
    let Some(header) = header else { return RangeSpec::Full };
    let Some(spec) = header.trim().strip_prefix("bytes=") else { return RangeSpec::Full };
    if spec.contains(',') {
        return RangeSpec::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else { return RangeSpec::Invalid };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => match num(suffix) {
            None => RangeSpec::Invalid,
            Some(0) => RangeSpec::Unsatisfiable,
            Some(_) if size == 0 => RangeSpec::Unsatisfiable,
            Some(n) => RangeSpec::Partial { start: size.saturating_sub(n), end: size },
        },
        (start, "") => match num(start) {
            None => RangeSpec::Invalid,
            Some(s) if s >= size => RangeSpec::Unsatisfiable,
            Some(s) => RangeSpec::Partial { start: s, end: size },
        },
        (start, last) => match (num(start), num(last)) {
            (Some(s), Some(l)) if s <= l => {
                if s >= size {
                    RangeSpec::Unsatisfiable
                } else {
                    RangeSpec::Partial { start: s, end: l.saturating_add(1).min(size) }
                }
            }
            _ => RangeSpec::Invalid,
        },
    }
}

/// The status, byte span and `Content-Range` to answer with, or the error response.
pub fn resolve(header: Option<&str>, size: u64) -> Result<(StatusCode, u64, u64, Option<String>), ApiError> {
    match parse(header, size) {
        RangeSpec::Full => Ok((StatusCode::OK, 0, size, None)),
        RangeSpec::Partial { start, end } => {
            Ok((StatusCode::PARTIAL_CONTENT, start, end, Some(format!("bytes {start}-{}/{size}", end - 1))))
        }
        RangeSpec::Unsatisfiable => {
            let mut e = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                Code::RangeInvalid,
                format!("range {:?} is outside the {size}-byte object", header.unwrap_or_default()),
            );
            e.headers.push((
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ASCII"),
            ));
            Err(e)
        }
        RangeSpec::Invalid => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            Code::RangeInvalid,
            format!(
                "malformed Range header {:?}: expected bytes=START-END, bytes=START- or bytes=-SUFFIX",
                header.unwrap_or_default()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeSpec::*;

    #[test]
    fn ranges() {
        let p = |h: &str, size| parse(Some(h), size);
        assert_eq!(parse(None, 10), Full);
        assert_eq!(p("bytes=0-3", 10), Partial { start: 0, end: 4 });
        assert_eq!(p("bytes=4-100", 10), Partial { start: 4, end: 10 });
        assert_eq!(p("bytes=9-9", 10), Partial { start: 9, end: 10 });
        assert_eq!(p("bytes=10-12", 10), Unsatisfiable);
        assert_eq!(p("bytes=3-", 10), Partial { start: 3, end: 10 });
        assert_eq!(p("bytes=10-", 10), Unsatisfiable);
        assert_eq!(p("bytes=-3", 10), Partial { start: 7, end: 10 });
        assert_eq!(p("bytes=-30", 10), Partial { start: 0, end: 10 });
        assert_eq!(p("bytes=-0", 10), Unsatisfiable);
        assert_eq!(p("bytes=0-", 0), Unsatisfiable);
        assert_eq!(p("bytes=5-3", 10), Invalid);
        assert_eq!(p("bytes=a-b", 10), Invalid);
        assert_eq!(p("bytes=-", 10), Invalid);
        assert_eq!(p("bytes=+1-2", 10), Invalid);
        assert_eq!(p("bytes=0-1,4-5", 10), Full);
        assert_eq!(p("items=0-1", 10), Full);
    }

    #[test]
    fn responses() {
        assert_eq!(
            resolve(Some("bytes=2-4"), 10).unwrap(),
            (StatusCode::PARTIAL_CONTENT, 2, 5, Some("bytes 2-4/10".into()))
        );
        let e = resolve(Some("bytes=20-"), 10).unwrap_err();
        assert_eq!(e.status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(e.headers[0].1, "bytes */10");
        assert_eq!(resolve(Some("bytes=x"), 10).unwrap_err().status, StatusCode::BAD_REQUEST);
    }
}
