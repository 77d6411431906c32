//! OCI distribution error responses: `{"errors":[{"code","message","detail"}]}` with the
//! status each code calls for. Every error the registry API returns goes through [`ApiError`].

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::types::ParseError;

/// An OCI error code (distribution spec, "Error Codes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    Denied,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    RangeInvalid,
    Unauthorized,
    TooManyRequests,
    Unsupported,
    Unknown,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::Denied => "DENIED",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::RangeInvalid => "RANGE_INVALID",
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::Unsupported => "UNSUPPORTED",
            Code::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    pub detail: serde_json::Value,
    /// Extra headers (e.g. `Content-Range` on 416).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: serde_json::Value::Null,
            headers: Vec::new(),
        }
    }

    pub fn with_detail(mut self, detail: impl Into<serde_json::Value>) -> Self {
        self.detail = detail.into();
        self
    }

    pub fn unsupported(what: &str) -> Self {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Code::Unsupported,
            format!("{what} is not supported: this is a pull-only mirror"),
        )
    }
}

impl From<ParseError> for ApiError {
    fn from(e: ParseError) -> Self {
        let code = match e {
            ParseError::Digest(_) | ParseError::DigestAlgorithm(_) => Code::DigestInvalid,
            ParseError::Name(_) | ParseError::Tag(_) | ParseError::Registry(_) => Code::NameInvalid,
        };
        ApiError::new(StatusCode::BAD_REQUEST, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "errors": [{ "code": self.code.as_str(), "message": self.message, "detail": self.detail }]
        });
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body.to_string(),
        )
            .into_response();
        for (name, value) in self.headers {
            resp.headers_mut().insert(name, value);
        }
        resp
    }
}
