//! The hub's HTTP side: Prometheus metrics and health (the console joins it later).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::session::HubContext;

pub fn router(hub: Arc<HubContext>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(hub)
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
