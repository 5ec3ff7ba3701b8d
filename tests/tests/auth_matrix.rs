//! The auth matrix: every way a token can be wrong, tried on every interface of a real hub
//! (a parent of a real child hub, so a court below exists), each refused and each refusal
//! found in the audit trail. Writes the matrix to `$TIANWANG_REPORT_DIR/auth-matrix.md`
//! when that is set (`scripts/auth-matrix` puts it into docs/reliability.md).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use bytes::BytesMut;
use futures::StreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tianwang_proto::v1::session_event::Kind as Event;
use tianwang_proto::v1::session_request::Kind as Request;
use tianwang_proto::v1::{AddTile, ListCourtsRequest, Role, SessionRequest};
use tianwang_proto::wire;
use tianwang_proto::{ControlMessage, ErrorCode, Kind};
use tianwang_tests::console::Console;
use tianwang_tests::tree::{self, HIGH, SUPREME, authed, hub_cli};
use tianwang_tests::whip::WhipPublisher;
use tianwang_tests::*;
use tianwang_transport::{ControlError, Limits, Trust, client};

/// The unit publishing at the top hub: watched out of scope, impersonated.
const UNIT: &str = "bwc-a";
/// A unit whose token is revoked while it is live.
const REVOKED_UNIT: &str = "bwc-r";
/// A console user whose tokens are revoked.
const REVOKED_USER: &str = "am-revoked";
/// A court this hub does not serve.
const FOREIGN_COURT: &str = "沪";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Iface {
    QuicPublish,
    QuicSubscribe,
    GrpcSession,
    WebSocket,
    Whip,
    Whep,
    Recordings,
}

const IFACES: [Iface; 7] = [
    Iface::QuicPublish,
    Iface::QuicSubscribe,
    Iface::GrpcSession,
    Iface::WebSocket,
    Iface::Whip,
    Iface::Whep,
    Iface::Recordings,
];

impl Iface {
    fn title(self) -> &'static str {
        match self {
            Iface::QuicPublish => "QUIC publish",
            Iface::QuicSubscribe => "QUIC subscribe",
            Iface::GrpcSession => "gRPC Session",
            Iface::WebSocket => "console WebSocket",
            Iface::Whip => "WHIP",
            Iface::Whep => "WHEP",
            Iface::Recordings => "recordings HTTP",
        }
    }

    /// The `via` the hub's audit entries name for this interface.
    fn via(self) -> &'static str {
        match self {
            Iface::QuicPublish | Iface::QuicSubscribe => "quic",
            Iface::GrpcSession => "grpc",
            Iface::WebSocket => "websocket",
            Iface::Whip => "whip",
            Iface::Whep => "whep",
            Iface::Recordings => "recordings",
        }
    }
}

/// What a token carries, for the case at hand.
enum Attempt {
    /// These tokens, used the ordinary way on each interface (`device` publishes `unit`).
    Token {
        console: String,
        device: String,
        unit: &'static str,
    },
    /// Device A's token publishing as unit B.
    OtherUnit { device_a: String },
    /// A console of a court below asking for a unit of this court.
    OutOfSubtree { console: String },
    /// A valid token, put in the URL's query.
    InUrl { console: String, device: String },
}

struct Case {
    name: &'static str,
    attempt: Attempt,
    /// Interfaces the case does not apply to, and why.
    na: Vec<(Iface, &'static str)>,
}

/// The outcome of one attempt: refused (with what the client saw) or let in.
type Outcome = Result<String, String>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_and_audited_on_every_interface() -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(240), matrix()).await?
}

async fn matrix() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    // The hub under test (the top court) and a child hub, so a court below exists.
    let ca = tree::make_ca(tmp.path())?;
    let top_dir = tmp.path().join("top");
    tree::issue(&ca, SUPREME, "", &top_dir.join("tls"))?;
    let top_config = tree::config(SUPREME, "supreme", &top_dir.join("tls"), &ca, None, "");
    let hub = Hub::start(&top_dir, Some(&top_config)).await?;
    let child_dir = tmp.path().join("child");
    tree::issue(&ca, HIGH, SUPREME, &child_dir.join("tls"))?;
    let child_config = tree::config(HIGH, "high", &child_dir.join("tls"), &ca, Some(&hub), "");
    let _child = Hub::start(&child_dir, Some(&child_config)).await?;
    // Tree hubs' certificates come from the deployment CA.
    let trust = Trust::from_ca_file(&ca.join("ca.crt"))?;
    let commander = hub.token("commander", "am-duty");
    wait_for_court(&hub, &commander, HIGH).await?;

    // A live unit at the top court.
    let device_a = hub.token("device", UNIT);
    let _unit = unit::FakeUnit::start(hub.quic, &trust, UNIT, &device_a).await?;
    tree::wait_units_online(&hub, &commander, &[UNIT], Duration::from_secs(10)).await?;

    let audit = AuditLog::open(&hub).await?;
    let key = std::fs::read_to_string(hub.dir.join("data/keys/token-signing.pem"))?;
    let public_hex = hub_cli(&[
        "key",
        "--data",
        &hub.dir.join("data").to_string_lossy(),
        "--config",
        &hub.dir.join("hub.toml").to_string_lossy(),
    ])?;
    let forge = Forger {
        key: EncodingKey::from_ed_pem(key.as_bytes())?,
        issuer: format!("hub-{SUPREME}"),
    };
    let now = unix_now();
    let forged = |f: &dyn Fn(&mut serde_json::Value)| -> Attempt {
        Attempt::Token {
            console: forge.sign("commander", "am-forged", f),
            device: forge.sign("device", UNIT, f),
            unit: UNIT,
        }
    };

    // Revoked: a console user and a live unit, revoked with `hub token revoke`; the unit's
    // live session is closed by the hub.
    let revoked_console = hub.token("commander", REVOKED_USER);
    let revoked_device = hub.token("device", REVOKED_UNIT);
    let (_ep, live) = dial(&hub, &trust).await;
    let (_control, _) = client::hello(
        &live,
        hello(Role::Publisher, REVOKED_UNIT, &revoked_device),
        Duration::from_secs(5),
    )
    .await?;
    // And the revoked user's console sessions, one over each signalling path.
    let mut ws_console = Console::connect(hub.http).await?;
    ws_console.auth(&revoked_console).await?;
    let mut grpc_console = Console::connect_grpc(hub.http, &revoked_console).await?;
    revoke(&hub, REVOKED_USER)?;
    revoke(&hub, REVOKED_UNIT)?;
    for (via, console) in [("websocket", &mut ws_console), ("grpc", &mut grpc_console)] {
        let said = console
            .error(Duration::from_secs(5))
            .await
            .with_context(|| format!("the {via} console session of a revoked user"))?;
        assert_eq!(said, "token revoked", "{via}");
        audit
            .wait_for(Duration::from_secs(5), |r| {
                r.action == "session.revoked"
                    && r.actor == REVOKED_USER
                    && r.detail.contains(&format!("\"{via}\""))
            })
            .await
            .with_context(|| format!("the ended {via} console session is audited"))?;
    }
    let (code, reason) = closed_with(&live).await;
    assert_eq!(
        (code, reason.as_str()),
        (ErrorCode::Unauthorized, "token revoked")
    );
    audit
        .wait_for(Duration::from_secs(5), |r| {
            r.action == "session.revoked" && r.actor == REVOKED_UNIT
        })
        .await
        .context("the closed session is audited")?;

    let no_unit_claim = "n/a: watching and recordings name no unit in the token; a device token cannot watch at all";
    let cases = vec![
        Case {
            name: "expired token",
            attempt: forged(&|c| {
                c["nbf"] = (now - 7200).into();
                c["exp"] = (now - 3600).into();
            }),
            na: vec![],
        },
        Case {
            name: "not yet valid",
            attempt: forged(&|c| {
                c["nbf"] = (now + 3600).into();
                c["exp"] = (now + 7200).into();
            }),
            na: vec![],
        },
        Case {
            name: "`alg=none`",
            attempt: Attempt::Token {
                console: unsigned("commander", "am-none"),
                device: unsigned("device", UNIT),
                unit: UNIT,
            },
            na: vec![],
        },
        Case {
            name: "HS256 keyed with the hub's public key",
            attempt: Attempt::Token {
                console: forge.hs256(&public_hex, "commander", "am-hs256"),
                device: forge.hs256(&public_hex, "device", UNIT),
                unit: UNIT,
            },
            na: vec![],
        },
        Case {
            name: "wrong audience",
            attempt: forged(&|c| c["aud"] = "another-system".into()),
            na: vec![],
        },
        Case {
            name: "another court's token",
            attempt: Attempt::Token {
                console: hub.token_with("commander", "am-foreign", &["--court", FOREIGN_COURT]),
                device: hub.token_with("device", UNIT, &["--court", FOREIGN_COURT]),
                unit: UNIT,
            },
            na: vec![],
        },
        Case {
            name: "unit A's token publishing as unit B",
            attempt: Attempt::OtherUnit {
                device_a: device_a.clone(),
            },
            na: vec![
                (Iface::QuicSubscribe, no_unit_claim),
                (Iface::GrpcSession, no_unit_claim),
                (Iface::WebSocket, no_unit_claim),
                (Iface::Whep, no_unit_claim),
                (Iface::Recordings, no_unit_claim),
            ],
        },
        Case {
            name: "console asking for a unit outside its court's subtree",
            attempt: Attempt::OutOfSubtree {
                console: hub.token_with("commander", "am-below", &["--court", HIGH]),
            },
            na: vec![
                (
                    Iface::QuicPublish,
                    "n/a: publishing asks for no one else's unit",
                ),
                (Iface::Whip, "n/a: publishing asks for no one else's unit"),
            ],
        },
        Case {
            name: "revoked (device; console user)",
            attempt: Attempt::Token {
                console: revoked_console,
                device: revoked_device,
                unit: REVOKED_UNIT,
            },
            na: vec![],
        },
        Case {
            name: "token in the URL query",
            attempt: Attempt::InUrl {
                console: commander.clone(),
                device: hub.token("device", "bwc-url"),
            },
            na: vec![
                (
                    Iface::QuicPublish,
                    "n/a: QUIC has no URL; the token is in the hello",
                ),
                (
                    Iface::QuicSubscribe,
                    "n/a: QUIC has no URL; the token is in the hello",
                ),
                (
                    Iface::GrpcSession,
                    "n/a: gRPC method paths carry no query; the token is metadata",
                ),
            ],
        },
    ];

    let mut table = String::new();
    write!(table, "| case |")?;
    for i in IFACES {
        write!(table, " {} |", i.title())?;
    }
    writeln!(table, " the hub's reason (first refusal) |")?;
    writeln!(table, "|---|{}", "---|".repeat(IFACES.len() + 1))?;
    for case in &cases {
        write!(table, "| {} |", case.name)?;
        let mut first_reason = None;
        for iface in IFACES {
            if let Some((_, why)) = case.na.iter().find(|(i, _)| *i == iface) {
                write!(table, " {why} |")?;
                continue;
            }
            let before = audit.max_seq().await?;
            let outcome = attempt(&hub, &trust, &case.attempt, iface).await?;
            let refusal = match outcome {
                Ok(r) => r,
                Err(what) => panic!("{} on {}: let in: {what}", case.name, iface.title()),
            };
            let entry = audit
                .refusal_since(before, iface, Duration::from_secs(5))
                .await
                .map_err(|e| {
                    anyhow::anyhow!("{} on {}: {refusal}: {e}", case.name, iface.title())
                })?;
            eprintln!(
                "{:55} {:18} refused ({refusal}); audited {} {}",
                case.name,
                iface.title(),
                entry.action,
                entry.detail
            );
            let (code, reason) = split_refusal(&refusal);
            first_reason.get_or_insert(reason);
            write!(table, " refused ({code}), audited |")?;
        }
        writeln!(table, " {} |", first_reason.unwrap_or_default())?;
    }
    // The unit that was impersonated and watched throughout is still live.
    tree::wait_units_online(&hub, &commander, &[UNIT], Duration::from_secs(5)).await?;

    // A WHIP session's resource (DELETE ends it, PATCH steers its ICE) answers only its
    // unit's token; another unit's is refused and audited, and the session lives on.
    let whip_unit = "bwc-w";
    let publisher =
        WhipPublisher::publish(hub.http, whip_unit, &hub.token("device", whip_unit), |o| o).await?;
    let resource = format!("http://{}{}", hub.http, publisher.location);
    let client = reqwest::Client::new();
    for (method, req) in [
        ("DELETE", client.delete(&resource)),
        (
            "PATCH",
            client
                .patch(&resource)
                .header("content-type", "application/trickle-ice-sdpfrag")
                .body("a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"),
        ),
    ] {
        let before = audit.max_seq().await?;
        let status = req.bearer_auth(&device_a).send().await?.status().as_u16();
        assert_eq!(status, 403, "WHIP {method} with another unit's token");
        audit
            .refusal_since(before, Iface::Whip, Duration::from_secs(5))
            .await
            .with_context(|| format!("WHIP {method} refused but not audited"))?;
    }
    let status = client
        .delete(&resource)
        .bearer_auth(hub.token("device", whip_unit))
        .send()
        .await?
        .status()
        .as_u16();
    assert_eq!(status, 200, "the unit's own token ends its session");
    publisher.close().await;

    let report = format!(
        "## Auth matrix\n\n\
         Written by `scripts/auth-matrix` (tests/tests/auth_matrix.rs) against a real hub with \
         a child hub below it. Each cell is one attempt on that interface: refused (what the \
         client saw: QUIC close code, HTTP status, or the console session's error) and a \
         refusal entry found in the hub's audit trail for that interface. Forged tokens are \
         signed with the hub's own Ed25519 key unless the case is about the signature. The \
         revoked unit was live when `hub token revoke` ran: the hub closed its QUIC session \
         (UNAUTHORIZED, \"token revoked\", audited `session.revoked`), as it ended the revoked \
         user's console sessions (WebSocket and gRPC: an error, \"token revoked\", audited), \
         before the row was tried. \
         Recordings HTTP is `/api/recordings` (listing); playback (`/recordings/…`) and the \
         cases API go through the same check; export is the offline `hub export`. A WHIP \
         session's resource (DELETE, PATCH) refuses another unit's token (403), audited.\n\n{table}"
    );
    print!("{report}");
    if let Some(dir) = std::env::var_os("TIANWANG_REPORT_DIR") {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(std::path::Path::new(&dir).join("auth-matrix.md"), report)?;
    }
    Ok(())
}

/// One attempt of a case on an interface: `Ok(what the client saw)` when refused.
async fn attempt(hub: &Hub, trust: &Trust, a: &Attempt, iface: Iface) -> anyhow::Result<Outcome> {
    Ok(match (a, iface) {
        (Attempt::Token { device, unit, .. }, Iface::QuicPublish) => {
            quic_refused(hub, trust, Role::Publisher, unit, device).await
        }
        (Attempt::OtherUnit { device_a }, Iface::QuicPublish) => {
            quic_refused(hub, trust, Role::Publisher, "bwc-b", device_a).await
        }
        (Attempt::Token { console, .. }, Iface::QuicSubscribe) => {
            quic_refused(hub, trust, Role::Subscriber, "", console).await
        }
        (Attempt::OutOfSubtree { console }, Iface::QuicSubscribe) => {
            let mut s = Subscriber::connect(hub.quic, trust, console, &Limits::default()).await?;
            match client::subscribe(&mut s.control, 1, UNIT, &[], Duration::from_secs(5)).await {
                Err(ControlError::Refused { code, reason }) => Ok(format!("{code:?}: {reason}")),
                other => Err(format!("{other:?}")),
            }
        }
        (
            Attempt::Token { console, .. } | Attempt::OutOfSubtree { console },
            Iface::GrpcSession,
        ) => grpc_refused(hub, console).await?,
        (Attempt::Token { console, .. } | Attempt::OutOfSubtree { console }, Iface::WebSocket) => {
            ws_refused(hub, console).await?
        }
        (Attempt::InUrl { console, .. }, Iface::WebSocket) => {
            let url = format!("ws://{}/api/session?access_token={console}", hub.http);
            match tokio_tungstenite::connect_async(url).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                    let body = r.body().as_deref().unwrap_or_default();
                    let error = serde_json::from_slice::<serde_json::Value>(body)
                        .ok()
                        .and_then(|v| v["error"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    Ok(format!("HTTP {}: {error}", r.status().as_u16()))
                }
                other => Err(format!("{:?}", other.map(|_| "upgraded"))),
            }
        }
        (Attempt::Token { device, unit, .. }, Iface::Whip) => {
            whip_refused(hub, unit, device).await?
        }
        (Attempt::OtherUnit { device_a }, Iface::Whip) => {
            whip_refused(hub, "bwc-b", device_a).await?
        }
        (Attempt::InUrl { device, .. }, Iface::Whip) => {
            http_refused(hub, "POST", &format!("/whip/bwc-url?token={device}"), None).await?
        }
        (Attempt::Token { console, .. } | Attempt::OutOfSubtree { console }, Iface::Whep) => {
            http_refused(hub, "POST", &format!("/whep/{UNIT}"), Some(console)).await?
        }
        (Attempt::InUrl { console, .. }, Iface::Whep) => {
            http_refused(
                hub,
                "POST",
                &format!("/whep/{UNIT}?access_token={console}"),
                None,
            )
            .await?
        }
        (Attempt::Token { console, .. } | Attempt::OutOfSubtree { console }, Iface::Recordings) => {
            let path = format!("/api/recordings?unit={UNIT}");
            http_refused(hub, "GET", &path, Some(console)).await?
        }
        (Attempt::InUrl { console, .. }, Iface::Recordings) => {
            let path = format!("/api/recordings?unit={UNIT}&token={console}");
            http_refused(hub, "GET", &path, None).await?
        }
        (_, iface) => panic!("no attempt defined for {iface:?}"),
    })
}

/// "Forbidden: why" or "HTTP 403: why" → ("Forbidden", "why").
fn split_refusal(refusal: &str) -> (String, String) {
    let (code, reason) = match refusal.strip_prefix("HTTP ") {
        Some(rest) => {
            let status: String = rest.chars().take(3).collect();
            let reason = rest.get(3..).unwrap_or("");
            (format!("HTTP {status}"), reason)
        }
        None => {
            let (code, reason) = refusal.split_once(':').unwrap_or((refusal, ""));
            (code.to_string(), reason)
        }
    };
    let reason = reason.trim_start_matches([':', ' ']).replace('|', "/");
    (code, reason)
}

/// The audit row a refusal on `iface` writes: the URL check's for a token in a URL.
fn is_refusal(row: &AuditRow, iface: Iface) -> bool {
    let refused = matches!(
        row.action.as_str(),
        "login.refused" | "denied" | "view.refused"
    );
    let via = serde_json::from_str::<serde_json::Value>(&row.detail)
        .ok()
        .and_then(|d| d["via"].as_str().map(str::to_string))
        .unwrap_or_default();
    refused && (via == iface.via() || via == "url")
}

async fn quic_refused(hub: &Hub, trust: &Trust, role: Role, unit: &str, token: &str) -> Outcome {
    let (_ep, conn) = dial(hub, trust).await;
    let (mut send, _recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut b = BytesMut::new();
    wire::encode_delimited(
        &ControlMessage::new(Kind::Hello(hello(role, unit, token))),
        &mut b,
    );
    send.write_all(&b).await.map_err(|e| e.to_string())?;
    let (code, reason) = closed_with(&conn).await;
    if matches!(code, ErrorCode::Unauthorized | ErrorCode::Forbidden) {
        Ok(format!("{code:?}: {reason}"))
    } else {
        Err(format!("closed with {code:?}: {reason}"))
    }
}

async fn grpc_refused(hub: &Hub, token: &str) -> anyhow::Result<Outcome> {
    let mut client = tree::console(hub).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<SessionRequest>(4);
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut events = match client.session(authed(token, requests)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(Ok(format!("{:?}: {}", status.code(), status.message()))),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => return Ok(Err("no refusal in 10 s".into())),
            Ok(None) => return Ok(Err("the stream ended without an error".into())),
            Ok(Some(Err(status))) => {
                return Ok(Ok(format!("{:?}: {}", status.code(), status.message())));
            }
            Ok(Some(Ok(e))) => e,
        };
        match event.kind {
            Some(Event::Error(e)) => return Ok(Ok(format!("{:?}: {}", e.code(), e.message))),
            // Signed in: ask for the unit (the subtree case).
            Some(Event::Ready(_)) => {
                tx.send(SessionRequest {
                    kind: Some(Request::AddTile(AddTile {
                        tile_id: "t1".into(),
                        unit_id: UNIT.into(),
                    })),
                })
                .await?;
            }
            _ => {}
        }
    }
}

async fn ws_refused(hub: &Hub, token: &str) -> anyhow::Result<Outcome> {
    let mut c = Console::connect(hub.http).await?;
    c.send(serde_json::json!({"auth": {"token": token}}))
        .await?;
    let seen = c
        .until(Duration::from_secs(10), |e| match &e.kind {
            Some(Event::Error(err)) => Some(Ok(format!("{:?}: {}", err.code(), err.message))),
            Some(Event::Ready(_)) => Some(Err(())),
            _ => None,
        })
        .await;
    let seen = match seen {
        Ok(Err(())) => {
            // Signed in: ask for the unit (the subtree case).
            c.add_tile("t1", UNIT).await?;
            c.error(Duration::from_secs(10))
                .await
                .map(|m| format!("Forbidden: {m}"))
        }
        Ok(Ok(refused)) => Ok(refused),
        Err(e) => Err(e),
    };
    c.close().await;
    Ok(seen.map_err(|e| e.to_string()))
}

async fn whip_refused(hub: &Hub, unit: &str, token: &str) -> anyhow::Result<Outcome> {
    match WhipPublisher::publish(hub.http, unit, token, |o| o).await {
        Ok(p) => {
            p.close().await;
            Ok(Err("published".into()))
        }
        Err(e) => Ok(Ok(e.to_string().replace("WHIP refused: ", "HTTP "))),
    }
}

async fn http_refused(
    hub: &Hub,
    method: &str,
    path: &str,
    bearer: Option<&str>,
) -> anyhow::Result<Outcome> {
    let client = reqwest::Client::new();
    let url = format!("http://{}{path}", hub.http);
    let mut req = match method {
        "POST" => client
            .post(url)
            .header("content-type", "application/sdp")
            .body("v=0\r\n"),
        _ => client.get(url),
    };
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let r = req.send().await?;
    let status = r.status().as_u16();
    let body = r.text().await?;
    let body = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or(body);
    Ok(if (400..500).contains(&status) {
        Ok(format!("HTTP {status}: {body}"))
    } else {
        Err(format!("HTTP {status}: {body}"))
    })
}

/// Tokens the hub would never issue, signed with its own key.
struct Forger {
    key: EncodingKey,
    issuer: String,
}

fn claims(issuer: &str, role: &str, sub: &str) -> serde_json::Value {
    let now = unix_now();
    serde_json::json!({
        "iss": issuer, "sub": sub, "aud": "tianwang", "role": role, "court": SUPREME,
        "iat": now, "nbf": now, "exp": now + 600, "jti": format!("{:016x}", rand::random::<u64>()),
    })
}

impl Forger {
    fn sign(&self, role: &str, sub: &str, edit: &dyn Fn(&mut serde_json::Value)) -> String {
        let mut c = claims(&self.issuer, role, sub);
        edit(&mut c);
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &c, &self.key).unwrap()
    }

    /// Algorithm confusion: HMAC keyed with the public key as `hub key` prints it.
    fn hs256(&self, public_hex: &str, role: &str, sub: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(&self.issuer, role, sub),
            &EncodingKey::from_secret(public_hex.as_bytes()),
        )
        .unwrap()
    }
}

/// `alg=none`: a header and claims, no signature.
fn unsigned(role: &str, sub: &str) -> String {
    let b64 = |v: &serde_json::Value| base64url(v.to_string().as_bytes());
    format!(
        "{}.{}.",
        b64(&serde_json::json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(&format!("hub-{SUPREME}"), role, sub))
    )
}

fn base64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

fn unix_now() -> i64 {
    (unix_now_us() / 1_000_000) as i64
}

fn revoke(hub: &Hub, subject: &str) -> anyhow::Result<()> {
    hub_cli(&[
        "token",
        "revoke",
        "--subject",
        subject,
        "--reason",
        "auth matrix",
        "--data",
        &hub.dir.join("data").to_string_lossy(),
        "--config",
        &hub.dir.join("hub.toml").to_string_lossy(),
    ])?;
    Ok(())
}

async fn wait_for_court(hub: &Hub, token: &str, court: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut c = tree::console(hub).await?;
        if let Ok(r) = c.list_courts(authed(token, ListCourtsRequest {})).await
            && r.into_inner().courts.iter().any(|c| c.code == court)
        {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "court {court} did not link in 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn dial(hub: &Hub, trust: &Trust) -> (quinn::Endpoint, quinn::Connection) {
    let ep = tianwang_transport::client_endpoint(trust, &Limits::default(), false).unwrap();
    let conn = tianwang_transport::connect(&ep, &hub.quic.to_string())
        .await
        .unwrap();
    (ep, conn)
}

#[derive(Debug, sqlx::FromRow)]
struct AuditRow {
    actor: String,
    action: String,
    detail: String,
}

/// The hub's audit trail, read from its index while it runs (SQLite in WAL mode).
struct AuditLog {
    pool: sqlx::AnyPool,
}

impl AuditLog {
    async fn open(hub: &Hub) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let db = format!(
            "sqlite://{}?mode=ro",
            hub.dir.join("data/index.sqlite").display()
        );
        Ok(Self {
            pool: sqlx::AnyPool::connect(&db).await?,
        })
    }

    async fn max_seq(&self) -> anyhow::Result<i64> {
        let (seq,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM audit")
            .fetch_one(&self.pool)
            .await?;
        Ok(seq)
    }

    async fn rows_since(&self, seq: i64) -> anyhow::Result<Vec<AuditRow>> {
        Ok(
            sqlx::query_as("SELECT actor, action, detail FROM audit WHERE seq > $1 ORDER BY seq")
                .bind(seq)
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Waits (bounded: the trail is written by a queue) for a refusal on `iface` after `seq`.
    async fn refusal_since(
        &self,
        seq: i64,
        iface: Iface,
        timeout: Duration,
    ) -> anyhow::Result<AuditRow> {
        self.wait_since(seq, timeout, |r| is_refusal(r, iface))
            .await
    }

    async fn wait_for(
        &self,
        timeout: Duration,
        pick: impl Fn(&AuditRow) -> bool,
    ) -> anyhow::Result<AuditRow> {
        self.wait_since(0, timeout, pick).await
    }

    async fn wait_since(
        &self,
        seq: i64,
        timeout: Duration,
        pick: impl Fn(&AuditRow) -> bool,
    ) -> anyhow::Result<AuditRow> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut rows = self.rows_since(seq).await?;
            if let Some(i) = rows.iter().position(&pick) {
                return Ok(rows.swap_remove(i));
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("no such audit entry in {timeout:?}; entries since: {rows:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
