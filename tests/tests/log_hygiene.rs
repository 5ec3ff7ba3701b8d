//! Log hygiene: a real hub and a real `field-agent simulate` run with our crates at trace,
//! the libraries that carry tokens and telemetry on the HTTP port (hyper, h2, tonic,
//! tungstenite) at trace too, and every other dependency at debug (quinn's, webrtc's and
//! rustls's trace is a line per packet: unreadable, and no secret passes through them in
//! the clear). Everything that carries a token, a key, a party name or an officer's
//! position is exercised — QUIC hello, a WebSocket console with a WebRTC tile, a gRPC
//! console session, gRPC cases and directives, HTTP playback, a geofence alarm — and then
//! none of those values may be found in the hub's or the agent's log.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use tianwang_proto::v1::evidence_client::EvidenceClient;
use tianwang_proto::v1::session_event::Kind as Event;
use tianwang_proto::v1::tile_state::State;
use tianwang_proto::v1::{
    Auth, CreateCaseRequest, CreateOperationRequest, DirectiveKind, DirectiveRequest,
    DirectiveState, GetCaseRequest, ListDirectivesRequest, ListUnitsRequest, SessionRequest,
    TelemetryBatch, session_request,
};
use tianwang_tests::console::Console;
use tianwang_tests::tree::{authed, console};
use tianwang_tests::{Hub, Simulator, unix_now_us};

const LOG: &str = "debug,hub=trace,field_agent=trace,tianwang_core=trace,\
                   tianwang_transport=trace,tianwang_proto=trace,hyper=trace,h2=trace,\
                   tonic=trace,tungstenite=trace,tokio_tungstenite=trace";
const CASE: &str = "(2026)沪0101执778号";
/// Party names as a court writes them, one with Latin letters too.
const PARTIES: [&str; 2] = ["欧阳晓岚", "Ximena Quartermain-Ybarra"];
const SECS: Duration = Duration::from_secs(10);

/// Telemetry positions `sim-1` reported, as consoles received them.
fn positions(batch: &TelemetryBatch) -> Vec<(f64, f64)> {
    batch
        .points
        .iter()
        .filter(|p| p.unit_id == "sim-1")
        .filter_map(|p| p.telemetry.as_ref()?.position.as_ref())
        .map(|p| (p.latitude, p.longitude))
        .collect()
}

/// Every way a coordinate is likely printed: `{}` and 4 to 8 decimals.
fn coordinate_forms(v: f64) -> Vec<String> {
    let mut forms: Vec<String> = (4..=8).map(|d| format!("{v:.d$}")).collect();
    forms.push(v.to_string());
    forms
}

/// Where `needle` occurs in `log` as a number of its own (not the tail of a longer one).
fn find_number(log: &str, needle: &str) -> Option<usize> {
    log.match_indices(needle)
        .map(|(i, _)| i)
        .find(|&i| !log[..i].ends_with(|c: char| c.is_ascii_digit() || c == '.'))
}

/// The base64 body lines of a PEM file (the key material itself).
fn pem_body(path: &Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let lines: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("-----"))
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        bail!("{} holds no PEM body", path.display());
    }
    Ok(lines)
}

/// The `unit token` lines of a `hub token fleet` file.
fn fleet_tokens(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(str::to_string)
        .collect())
}

async fn get(hub: &Hub, token: &str, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let r = reqwest::Client::new()
        .get(format!("http://{}{path}", hub.http))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await?;
    let status = r.status().as_u16();
    Ok((status, r.bytes().await?.to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_key_party_or_position_reaches_the_logs_at_trace() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start_with_env(
        tmp.path(),
        Some("[evidence]\nsegment_target = \"1s\"\n"),
        &[("RUST_LOG", LOG)],
    )
    .await?;
    let commander = hub.token("commander", "cmdr-1");
    let viewer = hub.token("viewer", "v-1");
    let fleet = hub.fleet("sim-", 1);
    let device = fleet_tokens(&fleet)?;
    assert_eq!(device.len(), 1, "one device token in {}", fleet.display());

    // A case with its parties and an operation of sim-1, over gRPC with bearer metadata.
    // Its fence is far from the route, so the first point raises `left_geofence`, whose
    // evidence states where the officer is.
    let mut evidence = EvidenceClient::connect(format!("http://{}", hub.http)).await?;
    evidence
        .create_case(authed(
            &commander,
            CreateCaseRequest {
                number: CASE.into(),
                court: String::new(),
                parties: PARTIES.iter().map(|p| p.to_string()).collect(),
            },
        ))
        .await
        .context("CreateCase")?;
    let now = unix_now_us();
    evidence
        .create_operation(authed(
            &commander,
            CreateOperationRequest {
                case_number: CASE.into(),
                id: "op-hygiene".into(),
                name: "search".into(),
                starts_us: now,
                ends_us: now + 3_600_000_000,
                latitude: 31.2,
                longitude: 121.4,
                radius_m: 100.0,
                units: vec!["sim-1".into()],
            },
        ))
        .await
        .context("CreateOperation")?;

    // The unit walks a route ~3 km from the fence at 10 m/s: a new position every second.
    let routes = tmp.path().join("routes");
    std::fs::create_dir_all(&routes)?;
    std::fs::write(
        routes.join("sim-1.route"),
        "speed 10\n31.2270513,121.4280371\n31.2391757,121.4413229\n",
    )?;
    let routes_arg = routes.to_string_lossy().to_string();
    let sim = Simulator::start_with_env(
        &hub,
        1,
        &fleet,
        &["--routes", &routes_arg],
        &[("RUST_LOG", LOG)],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(30), |v| {
        v == 1.0
    })
    .await?;

    // A WebSocket console: signs in (the token in an Auth message), watches sim-1 over
    // WebRTC, receives telemetry batches.
    let mut ws = Console::connect(hub.http).await?;
    ws.with_media().await?;
    ws.auth(&commander).await?;
    ws.add_tile("t1", "sim-1").await?;
    ws.tile("t1", State::Live, SECS).await?;
    let mut sent: Vec<(f64, f64)> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while sent.len() < 4 {
        if tokio::time::Instant::now() > deadline {
            bail!("only {} positions of sim-1 reached the console", sent.len());
        }
        if let Some(e) = ws.next(Duration::from_secs(2)).await?
            && let Some(Event::Telemetry(b)) = &e.kind
        {
            sent.extend(positions(b));
        }
    }

    // A gRPC console: units listed with metadata, a session signed in with an Auth
    // message, telemetry batches on it.
    let mut grpc = console(&hub).await?;
    let units = grpc
        .list_units(authed(&viewer, ListUnitsRequest {}))
        .await?
        .into_inner()
        .units;
    assert!(units.iter().any(|u| u.unit_id == "sim-1" && u.online));
    let (tx, rx) = futures::channel::mpsc::unbounded();
    tx.unbounded_send(SessionRequest {
        kind: Some(session_request::Kind::Auth(Auth {
            token: viewer.clone(),
        })),
    })?;
    let mut events = grpc.session(rx).await?.into_inner();
    let mut ready = false;
    let mut grpc_points = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !ready || grpc_points < 2 {
        let e = tokio::time::timeout_at(deadline, events.next())
            .await
            .context("gRPC session: no Ready and telemetry in time")?
            .context("gRPC session ended")??;
        match &e.kind {
            Some(Event::Ready(_)) => ready = true,
            Some(Event::Telemetry(b)) => {
                let p = positions(b);
                grpc_points += p.len();
                sent.extend(p);
            }
            _ => {}
        }
    }

    // A directive over gRPC, carried out by the unit.
    let issued = grpc
        .direct(authed(
            &commander,
            DirectiveRequest {
                unit_id: "sim-1".into(),
                kind: DirectiveKind::Mark as i32,
                text: "start hygiene".into(),
                ..Default::default()
            },
        ))
        .await?
        .into_inner();
    let deadline = tokio::time::Instant::now() + SECS;
    loop {
        let listed = grpc
            .list_directives(authed(
                &commander,
                ListDirectivesRequest {
                    unit_id: "sim-1".into(),
                    ..Default::default()
                },
            ))
            .await?
            .into_inner()
            .directives;
        let state = listed
            .iter()
            .find(|d| d.directive_id == issued.directive_id)
            .map(|d| d.state());
        if state == Some(DirectiveState::Done) {
            break;
        }
        if state == Some(DirectiveState::Failed) || tokio::time::Instant::now() > deadline {
            bail!("the directive was not done in time: {listed:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The geofence alarm, its evidence naming where the officer was.
    let deadline = tokio::time::Instant::now() + SECS;
    let alarm = loop {
        let v = hub.get_json("/api/alarms", &commander).await?;
        if let Some(a) = v["alarms"]
            .as_array()
            .and_then(|a| a.iter().find(|a| a["rule"] == "left_geofence"))
        {
            break a.clone();
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no left_geofence alarm: {v}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let alarm_evidence = alarm["evidence"].as_str().unwrap_or_default().to_string();
    assert!(
        alarm_evidence.contains("at 31.2"),
        "the alarm states a position: {alarm}"
    );

    // The case as the consoles see it (the parties are really there), then playback of a
    // recorded segment over HTTP.
    let case = evidence
        .get_case(authed(
            &commander,
            GetCaseRequest {
                number: CASE.into(),
            },
        ))
        .await?
        .into_inner();
    assert_eq!(case.parties, PARTIES);
    let cases = hub.get_json("/api/cases", &commander).await?;
    assert!(cases.to_string().contains(PARTIES[1]), "{cases}");
    let query = format!("/api/recordings?case={}", tianwang_tests::query_value(CASE));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let url = loop {
        let list = hub.get_json(&query, &commander).await?;
        let first = list["recordings"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["segments"].as_array().cloned().unwrap_or_default())
            .find_map(|s| s["url"].as_str().map(str::to_string));
        if let Some(url) = first {
            break url;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("nothing recorded for the case: {list}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let (status, body) = get(&hub, &commander, &url).await?;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(!body.is_empty());
    assert!(ws.media_of("t1").packets > 0, "the tile received RTP");
    // Every point the hub stored, exactly as the agent sent it: also those from before the
    // consoles signed in (the one that raised the alarm among them).
    let stored = hub
        .get_json("/api/telemetry?unit=sim-1", &commander)
        .await?;
    let before = sent.len();
    sent.extend(
        stored["points"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| Some((p["latitude"].as_f64()?, p["longitude"].as_f64()?))),
    );
    assert!(sent.len() > before, "positions stored: {stored}");

    // Everything stops, so the logs are complete.
    drop(tx);
    drop(events);
    ws.close().await;
    drop(sim);
    let mut hub = hub;
    hub.stop();
    let hub_log = hub.log();
    let agent_log = std::fs::read_to_string(hub.dir.join("simulate.log"))?;

    // The filter really was trace for us and debug (or more) for dependencies, and the
    // scenario ran: without this, an empty log would pass.
    // A line's target follows its level and spans: `… DEBUG span{…}: h2::codec: …`.
    let has = |log: &str, level: &str, target: &str| {
        let (level, path, root) = (
            format!(" {level} "),
            format!(" {target}::"),
            format!(" {target}: "),
        );
        log.lines()
            .any(|l| l.contains(&level) && (l.contains(&path) || l.contains(&root)))
    };
    for (level, target) in [
        ("DEBUG", "hub"),
        ("TRACE", "h2"),
        ("DEBUG", "rtc"),
        ("DEBUG", "sqlx"),
    ] {
        assert!(
            has(&hub_log, level, target),
            "no {level} {target} lines in the hub's log"
        );
    }
    assert!(
        has(&agent_log, "DEBUG", "field_agent"),
        "no DEBUG field_agent lines in the agent's log"
    );
    assert!(
        hub_log.contains("directive"),
        "the hub logged the directive"
    );
    assert!(
        hub_log.contains("left_geofence"),
        "the hub logged the alarm (not its evidence)"
    );

    // The values that must not be there.
    let mut secrets: Vec<(String, String)> = Vec::new();
    for (what, token) in [("commander", &commander), ("viewer", &viewer)]
        .into_iter()
        .chain(device.iter().map(|t| ("device", t)))
    {
        secrets.push((format!("{what} token"), token.clone()));
        let signature = token.rsplit('.').next().unwrap_or_default();
        assert!(signature.len() > 40, "a JWT has a signature: {token}");
        secrets.push((format!("{what} token's signature"), signature.to_string()));
    }
    let data = hub.dir.join("data");
    for key in [
        data.join("keys").join("token-signing.pem"),
        data.join("tls").join("hub.key"),
    ] {
        for line in pem_body(&key)? {
            // A whole line, and its tail (the head of a PKCS#8 body is the same for every
            // key of a kind).
            let tail = line[line.len().saturating_sub(24)..].to_string();
            secrets.push((format!("key {}", key.display()), line));
            secrets.push((format!("key {} (tail)", key.display()), tail));
        }
    }
    for party in PARTIES {
        secrets.push(("party".into(), party.to_string()));
    }
    for (name, log) in [("hub", &hub_log), ("agent", &agent_log)] {
        for (what, value) in &secrets {
            if let Some(at) = log.find(value.as_str()) {
                let line = log[..at].rsplit('\n').next().unwrap_or_default();
                panic!("{what} in the {name} log: {line}…");
            }
        }
        for &(lat, lon) in &sent {
            for form in coordinate_forms(lat)
                .into_iter()
                .chain(coordinate_forms(lon))
            {
                if let Some(at) = find_number(log, &form) {
                    let line = log[..at].rsplit('\n').next().unwrap_or_default();
                    panic!("position {form} ({lat},{lon}) in the {name} log: {line}…");
                }
            }
        }
    }
    assert!(
        sent.len() >= 6,
        "positions went to both consoles: {}",
        sent.len()
    );
    Ok(())
}

/// The checker finds what it must: a coordinate printed among other text, and not a
/// longer number that merely ends the same.
#[test]
fn the_position_check_finds_printed_coordinates() {
    let forms = coordinate_forms(31.227_051_3);
    assert!(forms.contains(&"31.2271".to_string()));
    assert!(forms.contains(&"31.22705".to_string()));
    assert_eq!(find_number("at 31.22705,121.4", "31.22705"), Some(3));
    assert_eq!(find_number("x=131.22705", "31.22705"), None);
    assert_eq!(find_number("0.31.22705", "31.22705"), None);
}
