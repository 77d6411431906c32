//! The HTTP side: the dashboard page, the JSON API, preheat, `/metrics`, `/healthz`,
//! `/status`.
//!
//! Every error is JSON `{"error": "…"}` with a status a script can branch on: 400 for input
//! the caller must fix, 404 for unknown things (routes, preheat ids, images at the origin),
//! 403/502 for origin trouble. Handlers take the state lock only to copy a view out; the
//! origin is asked with no lock held.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State as AxumState};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::preheat::{ImageRef, ResolveError};
use crate::server::Shared;
use crate::state::{NodeCount, PreheatError};

/// The dashboard: one self-contained page, no build step, no external assets.
const DASHBOARD: &str = include_str!("dashboard.html");
/// Largest preheat request body.
const MAX_BODY_BYTES: usize = 16 << 10;

type App = AxumState<Arc<Shared>>;

/// A JSON answer. (axum's `Json` needs a feature the workspace does not enable; this is all
/// of it the tracker needs.)
struct Json<T>(T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        match serde_json::to_vec(&self.0) {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding JSON: {e}")).into_response(),
        }
    }
}

/// A JSON error answer.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad_request(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, why.into())
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], DASHBOARD) }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route(
            "/metrics",
            get(|AxumState(shared): App| async move {
                ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], shared.metrics_text())
            }),
        )
        .route(
            "/api/v1/nodes",
            get(|AxumState(shared): App| async move {
                Json(json!({ "nodes": shared.state().nodes_view(Instant::now()) }))
            }),
        )
        .route(
            "/api/v1/digests",
            get(|AxumState(shared): App| async move {
                Json(json!({ "digests": shared.state().digests_view(Instant::now()) }))
            }),
        )
        .route(
            "/api/v1/summary",
            get(|AxumState(shared): App| async move { Json(shared.state().summary(Instant::now())) }),
        )
        .route(
            "/api/v1/history",
            get(|AxumState(shared): App| async move { Json(json!({ "samples": shared.state().history() })) }),
        )
        .route(
            "/api/v1/preheat",
            get(|AxumState(shared): App| async move { Json(json!({ "jobs": shared.state().preheats_view() })) })
                .post(start_preheat),
        )
        .route("/api/v1/preheat/{id}", get(preheat_status))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".to_string()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

async fn status(AxumState(shared): App) -> Response {
    let listen_addrs = tokio::time::timeout(Duration::from_secs(2), shared.client.listen_addrs())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    Json(json!({
        "peer_id": shared.client.local_peer_id().to_string(),
        "listen_addrs": listen_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PreheatBody {
    image: String,
    /// A positive number, or `"all"` (the default).
    #[serde(default)]
    nodes: Option<serde_json::Value>,
}

fn node_count(value: Option<&serde_json::Value>) -> Result<NodeCount, ApiError> {
    let bad = || bad_request("\"nodes\" must be a positive whole number or \"all\"");
    match value {
        None => Ok(NodeCount::All),
        Some(serde_json::Value::String(s)) if s == "all" => Ok(NodeCount::All),
        Some(serde_json::Value::Number(n)) => match n.as_u64() {
            Some(0) => Err(bad_request("a preheat needs at least one node (\"nodes\": 0)")),
            Some(n) => Ok(NodeCount::Count(usize::try_from(n).unwrap_or(usize::MAX))),
            None => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

async fn start_preheat(AxumState(shared): App, body: Bytes) -> Result<Response, ApiError> {
    let body: PreheatBody = serde_json::from_slice(&body).map_err(|e| {
        bad_request(format!(
            "the body must be JSON like {{\"image\": \"registry/repo:tag\", \"nodes\": 3 | \"all\"}}: {e}"
        ))
    })?;
    let count = node_count(body.nodes.as_ref())?;
    let image = ImageRef::parse(&body.image, &shared.default_registry).map_err(resolve_error)?;
    let manifest = image.resolve(&shared.origin).await.map_err(resolve_error)?;
    let started = shared.state().start_preheat(
        &image.to_string(),
        image.registry.as_str(),
        image.repository.as_str(),
        *manifest.as_bytes(),
        count,
        Instant::now(),
    );
    let job = started.map_err(|e| match e {
        PreheatError::NoAliveNodes | PreheatError::ZeroNodes | PreheatError::TooLong { .. } => {
            bad_request(e.to_string())
        }
    })?;
    tracing::info!(id = job.id, image = %job.image, manifest = %job.manifest, nodes = job.nodes.len(), "preheat started");
    let nodes: Vec<&str> = job.nodes.iter().map(|n| n.peer_id.as_str()).collect();
    let answer = json!({ "id": job.id, "image": job.image, "manifest": job.manifest, "nodes": nodes });
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

fn resolve_error(e: ResolveError) -> ApiError {
    let status = match &e {
        ResolveError::Reference { .. } => StatusCode::BAD_REQUEST,
        ResolveError::NotFound { .. } => StatusCode::NOT_FOUND,
        ResolveError::Denied { .. } => StatusCode::FORBIDDEN,
        ResolveError::Unreachable { .. } | ResolveError::Origin { .. } => StatusCode::BAD_GATEWAY,
    };
    ApiError(status, e.to_string())
}

async fn preheat_status(AxumState(shared): App, Path(id): Path<String>) -> Result<Response, ApiError> {
    let unknown = || ApiError(StatusCode::NOT_FOUND, format!("no preheat job {id:?}"));
    let number: u64 = id.parse().map_err(|_| unknown())?;
    let view = shared.state().preheat_view(number).ok_or_else(unknown)?;
    Ok(Json(view).into_response())
}
