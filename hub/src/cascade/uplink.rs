//! The child's side of the link to its parent hub: connect with this hub's CA-issued
//! certificate, push the catalog and its changes, serve the parent's pulls like any
//! subscriber's, take directives for units below and send their states back up. The link
//! is re-made with backoff and jitter for as long as the hub runs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tianwang_proto::v1::{Catalog, CatalogUnit, CourtInfo, Hello, Role as WireRole};
use tianwang_proto::{ControlMessage, ErrorCode, Kind};
use tianwang_transport::control::{self, ControlError};
use tianwang_transport::{Limits, Trust, tls};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::TreeChange;
use crate::directives;
use crate::session::HubContext;
use crate::subscriber::Session;

/// Links to the parent until shutdown.
pub async fn run(hub: Arc<HubContext>, parent: String) {
    let min = Duration::from_millis(200);
    let mut backoff = min;
    loop {
        let linked_at = tokio::time::Instant::now();
        match link(&hub, &parent).await {
            Ok(()) => info!(%parent, "link to the parent hub ended"),
            Err(e) => warn!(%parent, error = %format!("{e:#}"), "link to the parent hub failed"),
        }
        hub.metrics.cascade_uplink.set(0);
        if hub.shutdown.is_cancelled() {
            return;
        }
        if linked_at.elapsed() > Duration::from_secs(10) {
            backoff = min;
        }
        // Full jitter: children of a restarted parent do not all come back at once.
        let wait = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
        backoff = (backoff * 2).min(hub.config.cascade.max_backoff.max(min));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = hub.shutdown.cancelled() => return,
        }
    }
}

async fn link(hub: &Arc<HubContext>, parent: &str) -> anyhow::Result<()> {
    let config = &hub.config;
    let ca = config
        .cascade
        .ca
        .as_ref()
        .context("cascade.parent needs cascade.ca")?;
    let (cert_path, key_path) = config.cert_paths();
    let identity = (tls::load_certs(&cert_path)?, tls::load_key(&key_path)?);
    let trust = Trust::from_ca_file(ca)?;
    let target = tianwang_transport::endpoint::resolve(parent).await?;
    let endpoint = tianwang_transport::client_endpoint_with_identity(
        &trust,
        Some(identity),
        &Limits {
            idle_timeout: config.quic.idle_timeout,
            ..Limits::default()
        },
        target.is_ipv6(),
    )?;
    let conn = tianwang_transport::connect(&endpoint, parent).await?;
    let own = hub.cascade.own().clone();
    let hello = Hello {
        role: WireRole::Hub as i32,
        court: Some(own.clone()),
        ..Default::default()
    };
    let (control, welcome) =
        tianwang_transport::client::hello(&conn, hello, config.quic.hello_timeout).await?;
    let parent_court = welcome.court.unwrap_or_default();
    if parent_court.code != own.parent {
        tianwang_transport::client::close(&conn, None, "wrong parent").await;
        bail!(
            "{parent} serves court {:?}, but this hub's certificate places it under {:?}",
            parent_court.code,
            own.parent
        );
    }
    info!(parent = %parent_court.code, hub = %welcome.hub_id, "linked to the parent hub");
    hub.metrics.cascade_uplink.set(1);
    let result = serve(hub, &conn, control).await;
    conn.close(
        tianwang_transport::close_code(ErrorCode::Shutdown),
        b"link ends",
    );
    endpoint.wait_idle().await;
    result
}

async fn serve(
    hub: &Arc<HubContext>,
    conn: &quinn::Connection,
    control: tianwang_transport::Control,
) -> anyhow::Result<()> {
    let (tx, mut rx) = control.split();
    let (out, outgoing) = mpsc::channel(1024);
    let mut writer = JoinSet::new();
    writer.spawn(control::pump(tx, outgoing));
    // Subscribe to changes before the snapshot, so none falls between the two.
    let mut local = hub.units.changes();
    let mut tree = hub.cascade.changes();
    let mut states = hub.directives.changes();
    let mut alarms = hub.field.alarm_changes();
    let mut operations = hub.evidence.operations_version.subscribe();
    send_full(hub, &out).await?;
    let mut session = Session::new(hub, conn, None);
    let own = hub.cascade.own().code.clone();
    let result = loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => break Ok(()),
            change = local.recv() => match change {
                Ok(c) => send(&out, Kind::Catalog(Catalog {
                    units: vec![CatalogUnit {
                        unit_id: c.unit_id,
                        online: c.online,
                        tracks: c.tracks,
                        court: own.clone(),
                        removed: false,
                    }],
                    ..Default::default()
                }))?,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    send_full(hub, &out).await?;
                }
                Err(broadcast::error::RecvError::Closed) => break Ok(()),
            },
            changed = operations.changed() => {
                if changed.is_err() {
                    break Ok(());
                }
                if let Some(c) = all_operations(hub).await {
                    send(&out, Kind::Catalog(c))?;
                }
            }
            change = alarms.recv() => match change {
                Ok(a) => send(&out, Kind::Catalog(Catalog {
                    alarms: vec![a.catalog(&own)],
                    ..Default::default()
                }))?,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    send_full(hub, &out).await?;
                }
                Err(broadcast::error::RecvError::Closed) => break Ok(()),
            },
            change = tree.recv() => match change {
                Ok(TreeChange::Unit(c)) => send(&out, Kind::Catalog(Catalog {
                    units: vec![CatalogUnit {
                        unit_id: c.unit_id,
                        online: c.online,
                        tracks: c.tracks,
                        court: c.court,
                        removed: false,
                    }],
                    ..Default::default()
                }))?,
                Ok(TreeChange::Operations) => {
                    if let Some(c) = all_operations(hub).await {
                        send(&out, Kind::Catalog(c))?;
                    }
                }
                Ok(TreeChange::Alarm(a)) => send(&out, Kind::Catalog(Catalog {
                    alarms: vec![*a],
                    ..Default::default()
                }))?,
                // Courts below changed, or we missed news: the whole catalog again.
                Ok(TreeChange::Courts) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    send_full(hub, &out).await?;
                }
                Err(broadcast::error::RecvError::Closed) => break Ok(()),
            },
            change = states.recv() => match change {
                Ok(c) if c.from_parent => {
                    send(&out, Kind::Ack(directives::ack_for(&c.update)))?;
                }
                Ok(_) => {}
                // Missed states go up when the parent sends those directives again.
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break Ok(()),
            },
            msg = control::recv(&mut rx) => {
                let msg = match msg {
                    Ok(m) => m,
                    Err(ControlError::Closed) => break Ok(()),
                    Err(e) => break Err(anyhow::Error::new(e).context("the parent's control stream")),
                };
                match msg.kind {
                    Some(Kind::Directive(d)) => directive_from_parent(hub, &out, d),
                    Some(Kind::AlarmAction(a)) => alarm_action(hub, a),
                    kind => match session.handle(ControlMessage { kind }) {
                        Ok(Some(reply)) => send(&out, reply.kind.context("empty reply")?)?,
                        Ok(None) => {}
                        Err(e) => break Err(anyhow::anyhow!("{}", e.reason)),
                    },
                }
            }
            Some(_) = session.senders.join_next(), if !session.senders.is_empty() => {}
            Some(written) = writer.join_next() => {
                break match written {
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context("writing to the parent")),
                    _ => Ok(()),
                };
            }
        }
    };
    session.finish().await;
    result
}

/// Sends the whole catalog, in parts that each fit a control message.
async fn send_full(hub: &HubContext, out: &mpsc::Sender<ControlMessage>) -> anyhow::Result<()> {
    for part in split(full_catalog(hub).await, PART_BYTES) {
        send(out, Kind::Catalog(part))?;
    }
    Ok(())
}

/// Well under the 64 KiB control message limit.
const PART_BYTES: usize = 48 * 1024;

/// Splits a full catalog into parts of at most about `limit` encoded bytes: the first
/// carries the courts and `full`, all but the last `more`.
fn split(c: Catalog, limit: usize) -> Vec<Catalog> {
    use prost::Message;
    let mut parts = vec![Catalog {
        full: true,
        courts: c.courts,
        operations: c.operations,
        operations_complete: c.operations_complete,
        ..Default::default()
    }];
    let mut size = parts[0].encoded_len();
    let start_new = |parts: &mut Vec<Catalog>, size: &mut usize, item: usize| {
        if *size + item > limit {
            parts.push(Catalog::default());
            *size = 0;
        }
        *size += item;
    };
    for u in c.units {
        start_new(&mut parts, &mut size, u.encoded_len() + 4);
        if let Some(p) = parts.last_mut() {
            p.units.push(u);
        }
    }
    for a in c.alarms {
        start_new(&mut parts, &mut size, a.encoded_len() + 4);
        if let Some(p) = parts.last_mut() {
            p.alarms.push(a);
        }
    }
    let n = parts.len();
    for p in &mut parts[..n - 1] {
        p.more = true;
    }
    parts
}

/// Every open operation of this hub and below, replacing what the parent had. Nothing
/// when the index cannot be read: the parent keeps what it knew.
async fn all_operations(hub: &HubContext) -> Option<Catalog> {
    let own = &hub.cascade.own().code;
    let mut ops = match crate::field::open_operations(&hub.evidence.index, own).await {
        Ok(ops) => ops,
        Err(e) => {
            warn!(error = %e, "reading operations for the parent");
            return None;
        }
    };
    ops.extend(hub.cascade.operations_under(own));
    Some(Catalog {
        operations: ops,
        operations_complete: true,
        ..Default::default()
    })
}

/// The whole catalog: units, courts, alarms not yet resolved and open operations (this
/// hub's and below).
async fn full_catalog(hub: &HubContext) -> Catalog {
    let mut c = hub.cascade.catalog(&hub.units);
    let own = hub.cascade.own().code.clone();
    match crate::field::open_operations(&hub.evidence.index, &own).await {
        Ok(ops) => c.operations.extend(ops),
        Err(e) => {
            // Not the complete list then: the parent keeps what it knew.
            warn!(error = %e, "reading operations for the parent");
            c.operations_complete = false;
        }
    }
    match crate::field::open_alarms(&hub.evidence.index).await {
        Ok(rows) => {
            let own = &hub.cascade.own().code;
            c.alarms.extend(rows.iter().map(|a| a.catalog(own)));
        }
        // The units and courts still go up; the alarms with their next change.
        Err(e) => warn!(error = %e, "reading alarms for the parent"),
    }
    c
}

/// A user above acknowledges or resolves an alarm: settled here if it is this hub's,
/// else passed down towards its court.
pub(crate) fn alarm_action(hub: &Arc<HubContext>, a: tianwang_proto::v1::AlarmAction) {
    if a.court != hub.cascade.own().code {
        if !hub
            .cascade
            .send_to_court(&a.court, ControlMessage::new(Kind::AlarmAction(a.clone())))
        {
            warn!(court = %a.court, alarm = %a.alarm_id, "no link towards the alarm's court");
        }
        return;
    }
    let hub = Arc::clone(hub);
    tokio::spawn(async move {
        let settled = crate::field::settle(
            &hub.evidence.index,
            &hub.evidence.audit,
            &a.alarm_id,
            &a.by,
            a.resolve,
            &a.comment,
        )
        .await;
        match settled {
            Ok(row) => hub.field.alarm_changed(&row),
            Err(e) => debug!(error = %e, alarm = %a.alarm_id, "an alarm action from above"),
        }
    });
}

/// A control message to the parent, without waiting: a parent that does not read is cut.
fn send(out: &mpsc::Sender<ControlMessage>, kind: Kind) -> anyhow::Result<()> {
    out.try_send(ControlMessage::new(kind))
        .map_err(|_| anyhow::anyhow!("the parent does not read its control stream"))
}

/// A directive for a unit below: stored, then passed down; a repeat is answered with its
/// state (and passed down again if the unit has not confirmed it).
fn directive_from_parent(
    hub: &Arc<HubContext>,
    out: &mpsc::Sender<ControlMessage>,
    d: tianwang_proto::v1::Directive,
) {
    let hub = Arc::clone(hub);
    let out = out.clone();
    tokio::spawn(async move {
        match hub.directives.from_parent(&d).await {
            Ok(None) => {
                directives::deliver(&hub, &d);
            }
            Ok(Some((state, undelivered))) => {
                let _ = out.try_send(ControlMessage::new(Kind::Ack(state)));
                if undelivered {
                    directives::deliver(&hub, &d);
                }
            }
            Err(e @ directives::DirectiveError::Index(_)) => {
                // Not the directive's fault: the parent sends it again later.
                warn!(error = %e, directive = %d.id, "storing a directive from the parent");
            }
            Err(e) => {
                debug!(error = %e, directive = %d.id, "a directive from the parent refused");
                let _ = out.try_send(ControlMessage::new(Kind::Ack(tianwang_proto::v1::Ack {
                    directive_id: d.id.clone(),
                    ok: false,
                    message: e.to_string(),
                    state: tianwang_proto::v1::DirectiveState::Failed as i32,
                    unit_id: d.unit_id.clone(),
                })));
            }
        }
    });
}

/// This hub's court as the tree knows it.
pub fn court_info(config: &crate::config::Config, parent: &str) -> CourtInfo {
    CourtInfo {
        code: config.court.code.clone(),
        name: config.court.name.clone(),
        tier: config.court.tier.wire() as i32,
        parent: parent.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use tianwang_proto::v1::TrackInfo;

    #[test]
    fn a_large_catalog_goes_in_parts_that_fit_a_control_message() {
        let unit = |i: usize| CatalogUnit {
            unit_id: format!("bwc-{i:05}"),
            online: true,
            tracks: vec![TrackInfo {
                name: "video".into(),
                codec: "h264".into(),
                ..Default::default()
            }],
            court: "京01".into(),
            removed: false,
        };
        let c = Catalog {
            full: true,
            units: (0..5000).map(unit).collect(),
            courts: vec![CourtInfo::default()],
            ..Default::default()
        };
        let parts = split(c, PART_BYTES);
        assert!(parts.len() > 2);
        assert!(parts[0].full && parts[1..].iter().all(|p| !p.full));
        assert!(parts[..parts.len() - 1].iter().all(|p| p.more));
        assert!(!parts[parts.len() - 1].more);
        assert_eq!(parts.iter().map(|p| p.units.len()).sum::<usize>(), 5000);
        for p in &parts {
            let len = ControlMessage::new(Kind::Catalog(p.clone())).encoded_len();
            assert!(len < tianwang_proto::wire::MAX_CONTROL_MESSAGE, "{len}");
        }
        // A small one stays whole.
        assert_eq!(split(Catalog::default(), PART_BYTES).len(), 1);
    }
}
