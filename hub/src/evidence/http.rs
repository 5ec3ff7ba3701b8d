//! Cases and recordings over HTTP for the browser console: the `Evidence` messages in the
//! protobuf JSON mapping, and the recorded files themselves for playback through Media
//! Source Extensions. Every file is checked against its signed hash before it is served (a
//! damaged file is refused, never played), and the start of each playback is audited.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tianwang_proto::v1::{ListCasesResponse, ListRecordingsRequest};

use super::FileError;
use super::cases::CaseError;
use crate::auth::Claims;
use crate::session::HubContext;

pub fn routes() -> Router<Arc<HubContext>> {
    Router::new()
        .route("/api/cases", get(cases))
        .route("/api/cases/{number}", get(case))
        .route("/api/recordings", get(recordings))
        .route("/recordings/{*path}", get(file))
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(serde_json::json!({ "error": message.into() })),
    )
        .into_response()
}

/// A console token from `Authorization: Bearer`, allowed to see recordings. (The refusal is
/// a whole response, built once per refused request: its size does not matter.)
#[allow(clippy::result_large_err)]
fn authorize(hub: &HubContext, headers: &HeaderMap) -> Result<Claims, Response> {
    let token = crate::console::whep::bearer(headers).ok_or_else(|| {
        refuse(
            StatusCode::UNAUTHORIZED,
            "Authorization: Bearer <token> required",
        )
    })?;
    let claims = hub.authority.verify(token).map_err(|e| {
        hub.evidence.audit.record(
            "?",
            "denied",
            "recordings",
            serde_json::json!({ "via": "recordings", "reason": e.to_string() }),
        );
        refuse(StatusCode::UNAUTHORIZED, e.to_string())
    })?;
    if !claims.role.can_see_recordings() {
        hub.evidence.audit.record(
            &claims.sub,
            "denied",
            "recordings",
            serde_json::json!({ "via": "recordings", "role": claims.role }),
        );
        return Err(refuse(
            StatusCode::FORBIDDEN,
            format!("a {:?} token cannot see recordings", claims.role),
        ));
    }
    if let Err(reason) = hub.check_own_court(&claims) {
        hub.evidence.audit.record(
            &claims.sub,
            "denied",
            "recordings",
            serde_json::json!({ "via": "recordings", "reason": reason }),
        );
        return Err(refuse(StatusCode::FORBIDDEN, reason));
    }
    Ok(claims)
}

fn case_error(e: CaseError) -> Response {
    match e {
        CaseError::Invalid(m) => refuse(StatusCode::BAD_REQUEST, m),
        CaseError::NotFound(m) => refuse(StatusCode::NOT_FOUND, m),
        CaseError::Exists(m) | CaseError::Refused(m) => refuse(StatusCode::CONFLICT, m),
        CaseError::Index(e) => {
            tracing::error!(error = %e, "evidence index");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the evidence index is unavailable",
            )
        }
    }
}

async fn cases(State(hub): State<Arc<HubContext>>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&hub, &headers) {
        return r;
    }
    match hub.evidence.list_cases().await {
        Ok(cases) => axum::Json(ListCasesResponse { cases }).into_response(),
        Err(e) => case_error(e),
    }
}

async fn case(
    State(hub): State<Arc<HubContext>>,
    headers: HeaderMap,
    Path(number): Path<String>,
) -> Response {
    if let Err(r) = authorize(&hub, &headers) {
        return r;
    }
    match hub.evidence.get_case(&number).await {
        Ok(case) => axum::Json(case).into_response(),
        Err(e) => case_error(e),
    }
}

#[derive(Debug, Deserialize)]
struct RecordingsQuery {
    #[serde(default)]
    case: String,
    #[serde(default)]
    unit: String,
    #[serde(default)]
    from_us: u64,
    #[serde(default)]
    to_us: u64,
}

async fn recordings(
    State(hub): State<Arc<HubContext>>,
    headers: HeaderMap,
    Query(q): Query<RecordingsQuery>,
) -> Response {
    if let Err(r) = authorize(&hub, &headers) {
        return r;
    }
    let req = ListRecordingsRequest {
        case_number: q.case,
        unit: q.unit,
        from_us: q.from_us,
        to_us: q.to_us,
    };
    match hub.evidence.list_recordings(&req).await {
        Ok(list) => axum::Json(list).into_response(),
        Err(e) => case_error(e),
    }
}

async fn file(
    State(hub): State<Arc<HubContext>>,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Response {
    let who = match authorize(&hub, &headers) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let (row, data) = match hub.evidence.read_recorded(&path).await {
        Ok(r) => r,
        Err(e) => {
            let status = match e {
                FileError::Deleted => StatusCode::GONE,
                FileError::Unknown => StatusCode::NOT_FOUND,
                FileError::Damaged => StatusCode::CONFLICT,
                FileError::Unreadable | FileError::Index(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            return refuse(status, e.to_string());
        }
    };
    hub.evidence.audit_playback(&who.sub, &row, "http");
    let mime = if row.kind == "init" {
        "video/mp4"
    } else {
        "video/iso.segment"
    };
    (
        [
            (header::CONTENT_TYPE, mime.to_string()),
            (header::CACHE_CONTROL, "private, max-age=3600".to_string()),
            (
                header::HeaderName::from_static("x-content-sha256"),
                row.sha256,
            ),
        ],
        data,
    )
        .into_response()
}
