//! A bound on registry API requests in flight (`--max-requests`).
//!
//! A request holds its slot until its response body has been sent or dropped (a blob streams
//! for as long as its download runs), so the bound covers the tasks, file handles and
//! buffers each open request costs. Beyond it the answer is 429 `TOOMANYREQUESTS` at once,
//! without queueing: containerd then tries its next host, and nothing piles up in the agent.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{ApiError, Code};

/// Registry requests in flight, at most `max`.
pub struct RequestLimit {
    slots: Arc<Semaphore>,
    max: usize,
}

impl RequestLimit {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(RequestLimit { slots: Arc::new(Semaphore::new(max)), max })
    }

    /// Requests whose responses are not finished yet.
    pub fn in_flight(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// The middleware: a slot per request, carried by the response body.
pub(super) async fn limit(State(limit): State<Arc<RequestLimit>>, request: Request, next: Next) -> Response {
    let Ok(slot) = limit.slots.clone().try_acquire_owned() else {
        let mut resp = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            Code::TooManyRequests,
            format!("more than {} requests in flight; try again", limit.max),
        )
        .into_response();
        resp.headers_mut().insert("retry-after", HeaderValue::from_static("1"));
        return resp;
    };
    let resp = next.run(request).await;
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, Body::new(Held { body, _slot: slot }))
}

/// A response body that keeps its request's slot until it is finished or dropped.
struct Held {
    body: Body,
    _slot: OwnedSemaphorePermit,
}

impl HttpBody for Held {
    type Data = <Body as HttpBody>::Data;
    type Error = <Body as HttpBody>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
