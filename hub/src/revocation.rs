//! Revoked tokens: the index's `revocations` table (written by `hub token revoke`, another
//! process) re-read once a second into the `Authority`, which every token check consults;
//! live QUIC sessions, console sessions (gRPC, WebSocket) and WHIP publishers whose token
//! is revoked are closed at once.

use std::sync::Arc;
use std::time::Duration;

use tianwang_proto::ErrorCode;
use tracing::{info, warn};

use crate::auth::{Claims, Revoked};
use crate::evidence::index::{Index, RevocationRow};
use crate::session::HubContext;

/// How often the table is re-read: a revoked device is cut off within this.
pub const POLL: Duration = Duration::from_secs(1);

/// The revocation list as stored.
pub async fn load(index: &Index) -> Result<Revoked, crate::evidence::index::IndexError> {
    Ok(RevocationRow::to_revoked(&index.revocations().await?))
}

/// Keeps the hub's list current and ends WHIP sessions of revoked units (QUIC sessions
/// watch the list themselves, see [`close_when_revoked`]).
pub async fn run(hub: Arc<HubContext>) {
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The table's size and newest moment: when neither moved, nothing was revoked (rows
    // are only added, or moved forward), and the second's check is one small query.
    let mut seen = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = hub.shutdown.cancelled() => return,
        }
        let version = match hub.evidence.index.revocations_version().await {
            Ok(v) if seen == Some(v) => continue,
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "reading revoked tokens; keeping the current list");
                continue;
            }
        };
        let revoked = match load(&hub.evidence.index).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "reading revoked tokens; keeping the current list");
                continue;
            }
        };
        seen = Some(version);
        hub.authority.set_revoked(revoked.clone());
        hub.whip.retain(|_, s| {
            if !revoked.covers_parts(&s.unit, &s.jti, s.iat) {
                return true;
            }
            info!(unit = %s.unit, "WHIP session ended: its token was revoked");
            hub.evidence.audit.record(
                &s.unit,
                "session.revoked",
                &s.unit,
                serde_json::json!({ "via": "whip" }),
            );
            s.stop.cancel();
            false
        });
    }
}

/// Closes a QUIC connection (UNAUTHORIZED, "token revoked") once its token is revoked,
/// audited; runs until then or until the connection ends.
pub async fn close_when_revoked(hub: Arc<HubContext>, conn: quinn::Connection, claims: Claims) {
    let mut list = hub.authority.revocations();
    loop {
        if list.borrow_and_update().covers(&claims) {
            break;
        }
        tokio::select! {
            changed = list.changed() => if changed.is_err() { return },
            _ = conn.closed() => return,
        }
    }
    info!(subject = %claims.sub, "session closed: its token was revoked");
    hub.evidence.audit.record(
        &claims.sub,
        "session.revoked",
        "quic",
        serde_json::json!({ "via": "quic", "jti": claims.jti }),
    );
    hub.metrics
        .sessions_closed
        .with_label_values(&["unauthorized"])
        .inc();
    conn.close(
        tianwang_transport::close_code(ErrorCode::Unauthorized),
        b"token revoked",
    );
}
