//! The parent's side of a link with a child hub: the child's catalog comes in and is kept
//! in the [`Cascade`](super::Cascade); pulls go out as Subscribes and their groups come
//! back on the child's unidirectional streams; directives go down, their states come up.

use std::sync::Arc;
use std::time::Duration;

use tianwang_proto::v1::CourtInfo;
use tianwang_proto::{ControlMessage, ErrorCode, Kind};
use tianwang_transport::control::{self, Control, ControlError};
use tianwang_transport::group::{GroupError, GroupReader};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::ChildLink;
use crate::session::{HubContext, SessionError, connection_end};

pub(crate) async fn run(
    hub: &Arc<HubContext>,
    conn: &quinn::Connection,
    control: Control,
    court: CourtInfo,
) -> Result<(), SessionError> {
    let (tx, mut rx) = control.split();
    let (to_child, outgoing) = mpsc::channel(1024);
    let mut writer = JoinSet::new();
    writer.spawn(control::pump(tx, outgoing));
    let link = hub.cascade.add_link(court, to_child);
    info!(court = %link.court.code, "child hub linked");
    let result = serve(hub, conn, &link, &mut rx, &mut writer).await;
    hub.cascade.remove_link(&link, &hub.units);
    info!(court = %link.court.code, "child hub link ended");
    result
}

async fn serve(
    hub: &Arc<HubContext>,
    conn: &quinn::Connection,
    link: &Arc<ChildLink>,
    rx: &mut control::ControlReceiver,
    writer: &mut JoinSet<Result<(), ControlError>>,
) -> Result<(), SessionError> {
    let mut groups: JoinSet<()> = JoinSet::new();
    let max_frame = hub.config.quic.max_frame_bytes;
    let header_timeout = hub.config.quic.hello_timeout;
    loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => {
                return Err(SessionError::new(ErrorCode::Shutdown, "shutdown", "hub shutting down"));
            }
            _ = link.closed.cancelled() => {
                return Err(SessionError::new(ErrorCode::Replaced, "replaced", "a newer link of this court took over"));
            }
            msg = control::recv(rx) => match msg {
                Ok(m) => message(hub, link, m)?,
                Err(ControlError::Closed) | Err(ControlError::Refused { .. }) => return Ok(()),
                Err(ControlError::Connection(e)) => return connection_end(e),
                Err(e) => return Err(e.into()),
            },
            Some(written) = writer.join_next(), if !writer.is_empty() => {
                if let Ok(Err(e)) = written {
                    return Err(e.into());
                }
                return Ok(());
            }
            stream = conn.accept_uni() => match stream {
                Ok(recv) => {
                    let link = Arc::clone(link);
                    groups.spawn(async move {
                        if let Err(e) = ingest(recv, &link, max_frame, header_timeout).await {
                            debug!(error = %e.reason, "a group from the child hub ended");
                        }
                    });
                }
                Err(e) => return connection_end(e),
            },
            Some(_) = groups.join_next(), if !groups.is_empty() => {}
        }
    }
}

fn message(
    hub: &Arc<HubContext>,
    link: &Arc<ChildLink>,
    msg: ControlMessage,
) -> Result<(), SessionError> {
    match msg.kind {
        Some(Kind::Catalog(c)) => {
            let online = hub.cascade.apply_catalog(link, &hub.units, c);
            for unit in online {
                crate::directives::resend_open(hub, &unit);
            }
        }
        Some(Kind::Subscribed(s)) => link.subscribed(&s),
        Some(Kind::SubscribeError(e)) => {
            debug!(request = e.request_id, reason = %e.reason, "the child hub refused a pull");
            link.end_pull(e.request_id, &hub.units, &hub.metrics, false);
        }
        Some(Kind::Ack(ack)) => {
            // Only for units the child reported: a child cannot speak for another subtree.
            let below = hub
                .cascade
                .remote
                .get(&ack.unit_id)
                .is_some_and(|r| r.link == link.id);
            if below {
                let unit = ack.unit_id.clone();
                crate::directives::report(hub, &unit, ack);
            } else {
                warn!(unit = %ack.unit_id.chars().take(64).collect::<String>(),
                    "directive state for a unit not below this child: ignored");
            }
        }
        Some(Kind::UnitState(_)) => {}
        other => {
            return Err(SessionError::protocol(format!(
                "unexpected {} from a child hub",
                ControlMessage { kind: other }.kind_name()
            )));
        }
    }
    Ok(())
}

/// One group stream of a pulled unit.
async fn ingest(
    recv: quinn::RecvStream,
    link: &ChildLink,
    max_frame: usize,
    header_timeout: Duration,
) -> Result<(), SessionError> {
    let (header, reader) =
        match tokio::time::timeout(header_timeout, GroupReader::open(recv, max_frame)).await {
            Ok(Ok(r)) => r,
            Err(_) => return Err(SessionError::protocol("a group without its header in time")),
            Ok(Err(e)) if e.is_reset() => return Ok(()),
            Ok(Err(GroupError::Read(_) | GroupError::Io(_))) => return Ok(()),
            Ok(Err(e)) => return Err(e.into()),
        };
    let Some((entry, broadcast)) = link.track_for(header.track_id, header.sequence).await else {
        // A group of a pull that just ended, or one overtaken by a newer group.
        reader.stop(tianwang_transport::STREAM_STALE);
        return Ok(());
    };
    crate::publisher::relay_group(reader, &entry, &broadcast).await
}
