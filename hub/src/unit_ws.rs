//! A unit's control session over WebSocket (`/api/unit`), for units that publish over WHIP
//! (the officer app): the same control messages a QUIC agent exchanges on its control
//! stream, in the protobuf JSON mapping. First `{"hello":{"unitId":…,"token":…}}` with the
//! unit's device token; then telemetry and directive acks go up, directives come down.
//! Bad input ends this session only.

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tianwang_proto::v1::{Close, Welcome};
use tianwang_proto::{ControlMessage, Kind};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::{debug, info};

use crate::auth::Role;
use crate::console::ws::Upgraded;
use crate::session::HubContext;

/// Control messages are small; this is generous.
const MAX_MESSAGE: usize = 16 * 1024;

/// GET /api/unit
pub async fn upgrade(
    axum::extract::State(hub): axum::extract::State<Arc<HubContext>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    crate::console::ws::accept(hub, req, MAX_MESSAGE, serve)
}

fn text(msg: &ControlMessage) -> Option<Message> {
    serde_json::to_string(msg).ok().map(Message::text)
}

async fn close(ws: &mut futures::stream::SplitSink<Upgraded, Message>, reason: &str) {
    let _ = ws
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Policy,
            reason: reason.to_string().into(),
        })))
        .await;
}

async fn serve(hub: Arc<HubContext>, ws: Upgraded) {
    let (mut sink, mut stream) = ws.split();
    let first = match tokio::time::timeout(hub.config.quic.hello_timeout, stream.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<ControlMessage>(t.as_str()),
        _ => {
            close(&mut sink, "expected a hello").await;
            return;
        }
    };
    let Ok(ControlMessage {
        kind: Some(Kind::Hello(hello)),
    }) = first
    else {
        close(&mut sink, "the first message must be a hello").await;
        return;
    };
    let unit = hello.unit_id.clone();
    let refused = match hub.authority.verify(&hello.token) {
        Err(e) => Some(e.to_string()),
        Ok(c) if c.role != Role::Device => Some(format!("a {:?} token cannot be a unit", c.role)),
        Ok(c) if c.sub != unit => Some(format!("the token is for unit {:?}, not {unit:?}", c.sub)),
        Ok(_) if !crate::session::valid_unit_id(&unit) => Some("bad unit id".to_string()),
        Ok(_) => None,
    };
    if let Some(reason) = refused {
        hub.evidence.audit.record(
            "?",
            "login.refused",
            &unit.chars().take(64).collect::<String>(),
            serde_json::json!({ "via": "unit websocket", "reason": reason }),
        );
        close(&mut sink, &reason).await;
        return;
    }
    hub.evidence.audit.record(
        &unit,
        "login",
        "unit websocket",
        serde_json::json!({ "via": "unit websocket" }),
    );
    let welcome = ControlMessage::new(Kind::Welcome(Welcome {
        session_id: String::new(),
        hub_time_us: crate::evidence::audit::unix_us().max(0) as u64,
        hub_id: hub.config.hub_id.clone(),
        court: Some(hub.cascade.own().clone()),
    }));
    if let Some(m) = text(&welcome)
        && sink.send(m).await.is_err()
    {
        return;
    }
    // Directives for the unit reach this session through the WHIP unit's control queue.
    let (tx, mut rx) = mpsc::channel(64);
    hub.unit_links.insert(unit.clone(), tx.clone());
    crate::directives::resend_open(&hub, &unit);
    info!(%unit, "unit control session");
    let mut limit = crate::field::RateLimit::default();
    loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => break,
            msg = stream.next() => {
                let parsed = match msg {
                    Some(Ok(Message::Text(t))) => serde_json::from_str::<ControlMessage>(t.as_str())
                        .map_err(|e| e.to_string()),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                match parsed {
                    Ok(m) => {
                        if let Err(reason) = unit_message(&hub, &unit, &mut limit, m) {
                            close(&mut sink, &reason).await;
                            break;
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "an undecodable unit message");
                        close(&mut sink, &format!("not a control message: {e}")).await;
                        break;
                    }
                }
            }
            out = rx.recv() => match out {
                Some(m) => {
                    if let Some(t) = text(&m)
                        && sink.send(t).await.is_err()
                    {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    hub.unit_links
        .remove_if(&unit, |_, current| current.same_channel(&tx));
    info!(%unit, "unit control session ended");
}

fn unit_message(
    hub: &Arc<HubContext>,
    unit: &str,
    limit: &mut crate::field::RateLimit,
    msg: ControlMessage,
) -> Result<(), String> {
    match msg.kind {
        Some(Kind::Telemetry(t)) => {
            crate::field::accept(hub, unit, limit, t);
            Ok(())
        }
        Some(Kind::Ack(ack)) => {
            crate::directives::report(hub, unit, ack);
            Ok(())
        }
        Some(Kind::Close(Close { .. })) => Err("closed by the unit".into()),
        other => Err(format!(
            "unexpected {} from a unit",
            ControlMessage { kind: other }.kind_name()
        )),
    }
}

/// The WHIP unit's control queue hands messages for the device here (keyframe requests
/// stay with the WHIP session). False if the unit has no control session now.
pub fn forward(hub: &HubContext, unit: &str, msg: ControlMessage) -> bool {
    hub.unit_links
        .get(unit)
        .is_some_and(|tx| tx.try_send(msg).is_ok())
}
