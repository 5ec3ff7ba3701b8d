//! QUIC sessions: one per connection. The first bidirectional stream carries Hello, then
//! the session is a publisher's (a field unit, `publisher.rs`) or a subscriber's (a program
//! watching, `subscriber.rs`).
//!
//! Bad input from a peer ends that peer's session with a QUIC close code and a reason, is
//! logged and counted, and touches nothing else.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tianwang_proto::v1::{Role as WireRole, Welcome};
use tianwang_proto::wire::{PROTOCOL_VERSION, WireError};
use tianwang_proto::{ControlMessage, ErrorCode, Kind, RedactedHello};
use tianwang_transport::close_code;
use tianwang_transport::control::{Control, ControlError};
use tianwang_transport::group::GroupError;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::auth::{Authority, Role};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::registry::Units;

/// What a session needs of the hub.
pub struct HubContext {
    pub config: Arc<Config>,
    pub authority: Arc<Authority>,
    pub units: Arc<Units>,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// WHEP viewers: resource id → (unit, stop).
    pub whep: dashmap::DashMap<String, (String, CancellationToken)>,
    /// WHIP publishers: resource id → (unit, stop).
    pub whip: dashmap::DashMap<String, crate::whip::WhipSession>,
    /// Control sessions of WHIP units over WebSocket: unit → its outgoing queue.
    pub unit_links: dashmap::DashMap<String, tokio::sync::mpsc::Sender<ControlMessage>>,
    /// Recordings, the index and the audit trail.
    pub evidence: crate::evidence::Evidence,
    /// Telemetry storage and the alarm rules.
    pub field: crate::field::Field,
    /// The court tree: child hubs' catalogs, pulls, jurisdiction.
    pub cascade: Arc<crate::cascade::Cascade>,
    pub directives: crate::directives::Directives,
    next_session: AtomicU64,
    next_console: AtomicU64,
}

impl HubContext {
    // One argument per part of the hub, called once at start.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Arc<Config>,
        authority: Arc<Authority>,
        units: Arc<Units>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
        evidence: crate::evidence::Evidence,
        field: crate::field::Field,
        cascade: Arc<crate::cascade::Cascade>,
    ) -> Self {
        let directives = crate::directives::Directives::new(
            evidence.index.clone(),
            evidence.audit.clone(),
            &config.hub_id,
        );
        Self {
            cascade,
            directives,
            config,
            authority,
            units,
            metrics,
            shutdown,
            evidence,
            field,
            whep: dashmap::DashMap::new(),
            whip: dashmap::DashMap::new(),
            unit_links: dashmap::DashMap::new(),
            next_session: AtomicU64::new(1),
            next_console: AtomicU64::new(1),
        }
    }

    pub fn next_console_id(&self) -> u64 {
        self.next_console.fetch_add(1, Ordering::Relaxed)
    }

    /// The court a token speaks for: its `court` claim, or this hub's court for tokens
    /// without one. Refused when the court is neither this hub's nor one below it.
    pub fn scope_of(&self, claims: &crate::auth::Claims) -> Result<String, String> {
        let scope = claims
            .court
            .clone()
            .unwrap_or_else(|| self.config.court.code.clone());
        if self.cascade.knows_court(&scope) {
            Ok(scope)
        } else {
            Err(format!(
                "the token is for court {scope}, outside this hub's jurisdiction ({})",
                self.config.court.code
            ))
        }
    }

    /// For this hub's own records (recordings, cases, alarms, telemetry): the token's court
    /// must be this hub's. A token for a court below sees that court's hub's records there.
    pub fn check_own_court(&self, claims: &crate::auth::Claims) -> Result<(), String> {
        let scope = self.scope_of(claims)?;
        let own = &self.config.court.code;
        if self.cascade.covers(&scope, own) {
            Ok(())
        } else {
            Err(format!(
                "the token is for court {scope}; the records here are court {own}'s"
            ))
        }
    }
}

/// Why the hub ended a session: sent to the peer as the close code and reason.
#[derive(Debug)]
pub struct SessionError {
    pub code: ErrorCode,
    pub reason: String,
    /// The metric label.
    pub label: &'static str,
}

impl SessionError {
    pub(crate) fn new(code: ErrorCode, label: &'static str, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            label,
        }
    }

    pub(crate) fn protocol(reason: impl Into<String>) -> Self {
        Self::new(ErrorCode::Protocol, "protocol", reason)
    }
}

impl From<ControlError> for SessionError {
    fn from(e: ControlError) -> Self {
        let label = match &e {
            ControlError::Wire(WireError::TooLarge { .. }) => "too_large",
            ControlError::Wire(_) | ControlError::Unexpected { .. } => "malformed",
            ControlError::Timeout(_) => "timeout",
            _ => "control_stream",
        };
        Self::new(e.code(), label, e.to_string())
    }
}

impl From<GroupError> for SessionError {
    fn from(e: GroupError) -> Self {
        match &e {
            GroupError::Wire(WireError::TooLarge { .. }) => {
                Self::new(ErrorCode::TooLarge, "too_large", e.to_string())
            }
            _ => Self::new(ErrorCode::Protocol, "malformed", e.to_string()),
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Accepts connections until shutdown.
pub async fn serve(hub: Arc<HubContext>, endpoint: quinn::Endpoint) {
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let hub = Arc::clone(&hub);
                sessions.spawn(async move { handle(hub, incoming).await });
            }
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            _ = hub.shutdown.cancelled() => break,
        }
    }
    endpoint.close(close_code(ErrorCode::Shutdown), b"hub shutting down");
    while sessions.join_next().await.is_some() {}
}

async fn handle(hub: Arc<HubContext>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    // 0.5-RTT: a resuming client's hello (0-RTT data, single-use tickets) is read and
    // welcomed before its handshake completes; `handshake` says when it has.
    let accepted = match incoming.accept() {
        Ok(connecting) => match connecting.into_0rtt() {
            Ok((conn, handshake)) => Ok((conn, Some(handshake))),
            Err(connecting) => connecting.await.map(|c| (c, None)),
        },
        Err(e) => Err(e),
    };
    let (conn, handshake) = match accepted {
        Ok(c) => c,
        Err(e) => {
            debug!(%remote, error = %e, "handshake failed");
            hub.metrics
                .sessions_closed
                .with_label_values(&["handshake"])
                .inc();
            return;
        }
    };
    let id = hub.next_session.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("session", id, %remote);
    let result = run(&hub, &conn, id, handshake)
        .instrument(span.clone())
        .await;
    let _enter = span.enter();
    match result {
        Ok(()) => debug!("session ended"),
        // Read at 0.5-RTT, a session may see its handshake fail (a certificate from
        // another CA): counted as before the session began.
        Err(e) if handshake_failed(&conn) => {
            debug!(reason = %e.reason, "handshake failed");
            hub.metrics
                .sessions_closed
                .with_label_values(&["handshake"])
                .inc();
        }
        Err(e) => {
            if e.code == ErrorCode::Shutdown || e.label == "link_lost" {
                info!(reason = %e.reason, "session ended");
            } else {
                warn!(code = ?e.code, reason = %e.reason, "closing session");
            }
            hub.metrics
                .sessions_closed
                .with_label_values(&[e.label])
                .inc();
            conn.close(close_code(e.code), e.reason.as_bytes());
        }
    }
}

/// Whether the connection ended on a TLS error (QUIC's crypto error codes).
fn handshake_failed(conn: &quinn::Connection) -> bool {
    let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match conn.close_reason() {
        Some(quinn::ConnectionError::TransportError(e)) => crypto(e.code),
        Some(quinn::ConnectionError::ConnectionClosed(c)) => crypto(c.error_code),
        _ => false,
    }
}

async fn run(
    hub: &Arc<HubContext>,
    conn: &quinn::Connection,
    id: u64,
    handshake: Option<quinn::ZeroRttAccepted>,
) -> Result<(), SessionError> {
    let timeout = hub.config.quic.hello_timeout;
    let mut control = tokio::time::timeout(timeout, Control::accept(conn))
        .await
        .map_err(|_| {
            SessionError::new(ErrorCode::Protocol, "timeout", "no control stream in time")
        })??;
    let first = tokio::time::timeout(timeout, control.recv())
        .await
        .map_err(|_| SessionError::new(ErrorCode::Protocol, "timeout", "no hello in time"))??;
    let Some(Kind::Hello(hello)) = first.kind else {
        return Err(SessionError::protocol(format!(
            "expected hello, got {}",
            first.kind_name()
        )));
    };
    let early = control.is_0rtt();
    debug!(hello = ?RedactedHello(&hello), early, "hello");
    if early {
        hub.metrics.early_hellos.inc();
    }
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(SessionError::protocol(format!(
            "protocol version {} is not supported (this hub speaks {PROTOCOL_VERSION})",
            hello.protocol_version
        )));
    }
    let welcome = ControlMessage::new(Kind::Welcome(Welcome {
        session_id: format!("{id}"),
        hub_time_us: now_us(),
        hub_id: hub.config.hub_id.clone(),
        court: Some(hub.cascade.own().clone()),
    }));
    if hello.role() == WireRole::Hub {
        // A child hub is known by its client certificate, which only a completed
        // handshake proves.
        if let Some(handshake) = handshake {
            handshake.await;
        }
        let court = child_hub(hub, conn, &hello)?;
        hub.metrics.sessions.with_label_values(&["hub"]).inc();
        control.send(welcome).await?;
        let span = tracing::info_span!("child", court = %court.code);
        return crate::cascade::child::run(hub, conn, control, court)
            .instrument(span)
            .await;
    }
    let claims = hub.authority.verify(&hello.token).map_err(|e| {
        hub.evidence.audit.record(
            "?",
            "login.refused",
            &hello.unit_id,
            serde_json::json!({ "via": "quic", "reason": e.to_string() }),
        );
        SessionError::new(ErrorCode::Unauthorized, "unauthorized", e.to_string())
    })?;
    // Every refusal past the token check is audited too, with who asked.
    let refuse = |code: ErrorCode, label: &'static str, reason: String| {
        hub.evidence.audit.record(
            &claims.sub,
            "login.refused",
            "quic",
            serde_json::json!({ "via": "quic", "unit": hello.unit_id, "reason": reason }),
        );
        SessionError::new(code, label, reason)
    };
    hub.evidence.audit.record(
        &claims.sub,
        "login",
        "quic",
        serde_json::json!({ "via": "quic", "role": claims.role, "unit": hello.unit_id }),
    );
    // A revoked token ends the session it opened, not only the next one.
    let watcher = tokio::spawn(crate::revocation::close_when_revoked(
        Arc::clone(hub),
        conn.clone(),
        claims.clone(),
    ));
    let _watcher = AbortOnDrop(watcher);
    match hello.role() {
        WireRole::Publisher => {
            if !valid_unit_id(&hello.unit_id) {
                return Err(SessionError::protocol(format!(
                    "unit id {:?} is not 1 to 64 of A-Z a-z 0-9 - _ . (not starting with .)",
                    hello.unit_id.chars().take(80).collect::<String>()
                )));
            }
            if claims.role != Role::Device {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    "forbidden",
                    format!("a {:?} token cannot publish", claims.role),
                ));
            }
            if claims.sub != hello.unit_id {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    "forbidden",
                    format!(
                        "the token is for unit {:?}, not {:?}",
                        claims.sub, hello.unit_id
                    ),
                ));
            }
            // A device of a court this hub does not serve does not publish here.
            hub.scope_of(&claims)
                .map_err(|reason| refuse(ErrorCode::Forbidden, "forbidden", reason))?;
            hub.metrics.sessions.with_label_values(&["publisher"]).inc();
            control.send(welcome).await?;
            let span = tracing::info_span!("publisher", unit = %hello.unit_id);
            let officer = hello
                .device
                .as_ref()
                .map(|d| d.officer_id.clone())
                .filter(|o| !o.is_empty());
            crate::publisher::run(hub, conn, id, &hello.unit_id, officer, control)
                .instrument(span)
                .await
        }
        WireRole::Subscriber => {
            if !claims.role.can_watch_live() {
                return Err(refuse(
                    ErrorCode::Forbidden,
                    "forbidden",
                    format!("a {:?} token cannot watch live", claims.role),
                ));
            }
            let scope = hub
                .scope_of(&claims)
                .map_err(|reason| refuse(ErrorCode::Forbidden, "forbidden", reason))?;
            hub.metrics
                .sessions
                .with_label_values(&["subscriber"])
                .inc();
            control.send(welcome).await?;
            let span = tracing::info_span!("subscriber", user = %claims.sub);
            crate::subscriber::run(hub, conn, control, scope, claims.sub.clone())
                .instrument(span)
                .await
        }
        WireRole::Hub => Err(SessionError::protocol("hub hello handled above")),
        WireRole::Unspecified => Err(SessionError::protocol("hello without a role")),
    }
}

/// Checks a child hub's hello against its certificate: the CA vouches for its court and
/// places it under this hub's court. Refusals are audited.
fn child_hub(
    hub: &HubContext,
    conn: &quinn::Connection,
    hello: &tianwang_proto::v1::Hello,
) -> Result<tianwang_proto::v1::CourtInfo, SessionError> {
    let claimed = hello.court.clone().unwrap_or_default();
    let refuse = |code: ErrorCode, label: &'static str, reason: String| {
        hub.evidence.audit.record(
            &format!("hub:{}", claimed.code.chars().take(64).collect::<String>()),
            "hub.link.refused",
            "quic",
            serde_json::json!({ "reason": reason }),
        );
        SessionError::new(code, label, reason)
    };
    if hub.config.cascade.ca.is_none() {
        return Err(refuse(
            ErrorCode::Forbidden,
            "forbidden",
            "this hub takes no child hubs (cascade.ca is not set)".into(),
        ));
    }
    let identity = tianwang_transport::ca::peer_identity(conn).map_err(|e| {
        refuse(
            ErrorCode::Unauthorized,
            "unauthorized",
            format!("a child hub needs a certificate from the deployment CA: {e}"),
        )
    })?;
    if identity.court != claimed.code {
        return Err(refuse(
            ErrorCode::Forbidden,
            "forbidden",
            format!(
                "the hello claims court {:?} but the certificate is for {:?}",
                claimed.code, identity.court
            ),
        ));
    }
    let own = &hub.config.court.code;
    if &identity.parent != own || claimed.parent != *own {
        return Err(refuse(
            ErrorCode::Forbidden,
            "forbidden",
            format!(
                "court {:?} is not below court {own:?} (its certificate places it under {:?})",
                identity.court, identity.parent
            ),
        ));
    }
    hub.evidence.audit.record(
        &format!("hub:{}", identity.court),
        "hub.link",
        "quic",
        serde_json::json!({ "court": identity.court, "name": claimed.name }),
    );
    Ok(claimed)
}

/// Aborts a helper task when the session that spawned it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A unit id names directories of recordings: plain characters only, never `..` or `/`.
pub fn valid_unit_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

pub(crate) fn connection_end(e: quinn::ConnectionError) -> Result<(), SessionError> {
    match e {
        quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed => {
            Ok(())
        }
        quinn::ConnectionError::TimedOut => Err(SessionError::new(
            ErrorCode::Unspecified,
            "link_lost",
            "the peer went silent (idle timeout)",
        )),
        other => Err(SessionError::new(
            ErrorCode::Unspecified,
            "link_lost",
            other.to_string(),
        )),
    }
}
