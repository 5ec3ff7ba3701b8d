//! The hub's HTTP side, one port: the browser console (`/`), its WebSocket API
//! (`/api/session`), the console API over gRPC (HTTP/2, with reflection), WHEP, Prometheus
//! metrics and health.

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rust_embed::RustEmbed;

use crate::console::{grpc, whep, ws};
use crate::session::HubContext;

/// The browser console, built into the binary.
#[derive(RustEmbed)]
#[folder = "../web-console/"]
#[exclude = "README.md"]
struct Console;

pub fn router(hub: Arc<HubContext>) -> anyhow::Result<Router> {
    let grpc = grpc::routes(Arc::clone(&hub))?;
    let http = Router::new()
        .route("/", get(index))
        .route("/{file}", get(asset))
        .route("/api/session", get(ws::upgrade))
        .route("/api/unit", get(crate::unit_ws::upgrade))
        .route("/officer", get(officer))
        .route(
            "/whep/{unit}",
            post(whep::start).layer(DefaultBodyLimit::max(whep::MAX_OFFER)),
        )
        .route(
            "/whep/{unit}/{id}",
            axum::routing::delete(whep::stop).patch(whep::patch),
        )
        .route(
            "/whip/{unit}",
            post(crate::whip::start).layer(DefaultBodyLimit::max(crate::whip::MAX_OFFER)),
        )
        .route(
            "/whip/{unit}/{id}",
            axum::routing::delete(crate::whip::stop)
                .patch(crate::whip::patch::patch)
                .layer(DefaultBodyLimit::max(crate::whip::patch::MAX_FRAG)),
        )
        .merge(crate::evidence::http::routes())
        .merge(crate::field::http::routes())
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(Arc::clone(&hub));
    Ok(http
        .merge(grpc)
        .layer(axum::middleware::from_fn_with_state(hub, no_token_in_url)))
}

/// Query parameters that would carry a token: refused on every route.
const TOKEN_PARAMS: [&str; 3] = ["token", "access_token", "jwt"];

/// Refuses a request with a token in its URL (400, audited without the token): URLs end up
/// in proxy logs, browser history and Referer headers, so a token there is as good as
/// leaked. Tokens go in `Authorization: Bearer`, gRPC metadata, or the WebSocket's first
/// message.
async fn no_token_in_url(
    State(hub): State<Arc<HubContext>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let query = request.uri().query().unwrap_or("");
    let carried = query.split('&').find_map(|pair| {
        let name = pair.split('=').next().unwrap_or("");
        TOKEN_PARAMS
            .iter()
            .find(|p| name.eq_ignore_ascii_case(p))
            .copied()
    });
    let Some(param) = carried else {
        return next.run(request).await;
    };
    let path: String = request.uri().path().chars().take(128).collect();
    let reason = format!(
        "a token in the URL (?{param}=) is refused: URLs leak into logs and history; \
         send it as Authorization: Bearer"
    );
    hub.evidence.audit.record(
        "?",
        "login.refused",
        &path,
        serde_json::json!({ "via": "url", "reason": reason }),
    );
    (
        StatusCode::BAD_REQUEST,
        axum::Json(serde_json::json!({ "error": reason })),
    )
        .into_response()
}

/// The officer app: a phone becomes a unit (WHIP, telemetry, directives).
async fn officer(state: State<Arc<HubContext>>) -> Response {
    asset(state, Path("officer.html".to_string())).await
}

async fn index(state: State<Arc<HubContext>>) -> Response {
    asset(state, Path("index.html".to_string())).await
}

async fn asset(State(hub): State<Arc<HubContext>>, Path(file): Path<String>) -> Response {
    // Only plain file names: nothing can climb out of the console's directory.
    if file.contains('/') || file.contains('\\') || file.starts_with('.') {
        return StatusCode::NOT_FOUND.into_response();
    }
    let body = match &hub.config.console.assets_dir {
        Some(dir) => tokio::fs::read(dir.join(&file)).await.ok(),
        None => Console::get(&file).map(|f| f.data.into_owned()),
    };
    let Some(body) = body else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mime = mime_guess::from_path(&file).first_or_octet_stream();
    (
        [
            (header::CONTENT_TYPE, mime.to_string()),
            (header::CACHE_CONTROL, "no-cache".to_string()),
        ],
        body,
    )
        .into_response()
}

async fn metrics(State(hub): State<Arc<HubContext>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        hub.metrics.render(),
    )
}

async fn healthz(State(hub): State<Arc<HubContext>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({
        "status": "ok",
        "hub_id": hub.config.hub_id,
        "units_online": hub.units.online_count(),
    }))
}
