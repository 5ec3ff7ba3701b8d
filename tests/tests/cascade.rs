//! Three tiers of real hub processes on loopback (supreme → high → two intermediates) with
//! real agents under the intermediates: watching across the tree, one upstream copy per hop,
//! jurisdiction, directives down and their states back up, a child hub refused, and the
//! middle hub killed and restarted.

use std::time::Duration;

use tianwang_proto::v1::{
    DirectiveKind, DirectiveRequest, DirectiveState, ListCourtsRequest, ListDirectivesRequest,
    TrackKind,
};
use tianwang_tests::tree::{self, Tree, authed, console, wait_units_online};
use tianwang_tests::{Agent, Hub, Subscriber, assert_whole_groups, collect, track_id};
use tianwang_transport::Limits;

const SETTLE: Duration = Duration::from_secs(30);

/// Issues a directive over gRPC with `token`.
async fn direct(
    hub: &Hub,
    token: &str,
    req: DirectiveRequest,
) -> Result<tianwang_proto::v1::DirectiveUpdate, tonic::Status> {
    let mut c = console(hub)
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    c.direct(authed(token, req)).await.map(|r| r.into_inner())
}

fn keyframe(unit: &str) -> DirectiveRequest {
    DirectiveRequest {
        unit_id: unit.into(),
        kind: DirectiveKind::Keyframe as i32,
        ..Default::default()
    }
}

async fn directive_state(
    hub: &Hub,
    token: &str,
    id: &str,
) -> anyhow::Result<Option<tianwang_proto::v1::DirectiveUpdate>> {
    let mut c = console(hub).await?;
    let list = c
        .list_directives(authed(
            token,
            ListDirectivesRequest {
                unit_id: String::new(),
                limit: 100,
            },
        ))
        .await?
        .into_inner();
    Ok(list.directives.into_iter().find(|d| d.directive_id == id))
}

async fn wait_state(
    hub: &Hub,
    token: &str,
    id: &str,
    state: DirectiveState,
) -> tianwang_proto::v1::DirectiveUpdate {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let seen = directive_state(hub, token, id).await.ok().flatten();
        if let Some(d) = &seen
            && d.state == state as i32
        {
            return d.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "directive {id} at {} did not reach {state:?}: {seen:?}",
            hub.http
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The unit's bitrate as its own hub measures it, averaged over a few samples.
async fn bitrate(hub: &Hub, token: &str, unit: &str) -> f64 {
    let mut sum = 0.0;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let units = tree::list_units(hub, token).await.expect("ListUnits");
        let s = units
            .iter()
            .find(|u| u.unit_id == unit)
            .expect("unit listed");
        sum += s.stats.as_ref().map_or(0, |s| s.bitrate_bps) as f64;
    }
    sum / 4.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_supreme_console_watches_and_directs_units_two_levels_down() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tree::start(dir.path()).await.unwrap();
    let [i1, i2] = &t.intermediate;
    let ca = t.ca_cert();
    let _a1 = Agent::start(
        &format!("localhost:{}", i1.quic.port()),
        &ca,
        "bwc-1",
        &i1.token("device", "bwc-1"),
        dir.path(),
        &["--bitrate", "2000"],
    )
    .unwrap();
    let _a2 = Agent::start(
        &format!("localhost:{}", i2.quic.port()),
        &ca,
        "bwc-2",
        &i2.token("device", "bwc-2"),
        dir.path(),
        &[],
    )
    .unwrap();
    let top = t.supreme.token("commander", "president");
    let listed = wait_units_online(&t.supreme, &top, &["bwc-1", "bwc-2"], SETTLE)
        .await
        .unwrap();
    let court = |u: &str| {
        listed
            .iter()
            .find(|s| s.unit_id == u)
            .unwrap()
            .court
            .clone()
    };
    assert_eq!(court("bwc-1"), tree::INTERMEDIATE_1);
    assert_eq!(court("bwc-2"), tree::INTERMEDIATE_2);

    // The court tree as the top sees it.
    let courts = console(&t.supreme)
        .await
        .unwrap()
        .list_courts(authed(&top, ListCourtsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .courts;
    let codes: Vec<&str> = courts.iter().map(|c| c.code.as_str()).collect();
    for c in [
        tree::SUPREME,
        tree::HIGH,
        tree::INTERMEDIATE_1,
        tree::INTERMEDIATE_2,
    ] {
        assert!(codes.contains(&c), "{c} missing from {codes:?}");
    }

    // A unit of each intermediate, watched from the top: whole groups, in order.
    for unit in ["bwc-1", "bwc-2"] {
        let mut sub = Subscriber::connect(t.supreme.quic, &t.trust(), &top, &Limits::default())
            .await
            .unwrap();
        let (s, mut rx) = sub.subscribe(unit, 256).await.unwrap();
        let video = track_id(&s, TrackKind::Video);
        let frames = collect(&mut rx, video, 60, SETTLE).await.unwrap();
        assert_whole_groups(&frames);
        assert!(
            frames
                .windows(2)
                .all(|w| (w[0].group, w[0].index) < (w[1].group, w[1].index)),
            "{unit}: frames out of order"
        );
    }

    // Fan-in: ten viewers at the top, one upstream stream on each hop.
    for hub in [&t.supreme, &t.high] {
        hub.wait_metric("tianwang_cascade_pulls", SETTLE, |v| v == 0.0)
            .await
            .unwrap();
    }
    let started = t
        .supreme
        .metrics()
        .await
        .unwrap()
        .get("tianwang_cascade_pulls_total");
    let mut viewers = Vec::new();
    for _ in 0..10 {
        let mut sub = Subscriber::connect(t.supreme.quic, &t.trust(), &top, &Limits::default())
            .await
            .unwrap();
        let (s, mut rx) = sub.subscribe("bwc-1", 256).await.unwrap();
        let video = track_id(&s, TrackKind::Video);
        collect(&mut rx, video, 5, SETTLE).await.unwrap();
        viewers.push((sub, rx));
    }
    let m = t.supreme.metrics().await.unwrap();
    assert_eq!(m.get("tianwang_cascade_pulls"), 1.0, "one pull at the top");
    assert_eq!(
        m.get("tianwang_cascade_pulls_total") - started,
        1.0,
        "pulled once"
    );
    let m = t.high.metrics().await.unwrap();
    assert_eq!(
        m.get("tianwang_cascade_pulls"),
        1.0,
        "one pull at the high court"
    );
    assert_eq!(
        m.get("tianwang_cascade_served"),
        1.0,
        "one stream served up by the high court"
    );
    let m = i1.metrics().await.unwrap();
    assert_eq!(
        m.get("tianwang_cascade_served"),
        1.0,
        "one stream served up by the intermediate"
    );

    // Released a grace period after the last viewer leaves, on every hop.
    drop(viewers);
    t.supreme
        .wait_metric("tianwang_cascade_pulls", SETTLE, |v| v == 0.0)
        .await
        .unwrap();
    t.high
        .wait_metric("tianwang_cascade_pulls", SETTLE, |v| v == 0.0)
        .await
        .unwrap();
    i1.wait_metric("tianwang_cascade_served", SETTLE, |v| v == 0.0)
        .await
        .unwrap();

    // Jurisdiction: an intermediate console sees its own units only.
    let local = i1.token("commander", "officer-in-charge");
    let seen = tree::list_units(i1, &local).await.unwrap();
    assert!(seen.iter().any(|u| u.unit_id == "bwc-1"));
    assert!(!seen.iter().any(|u| u.unit_id == "bwc-2"));
    // A high-court token for one intermediate court: that court's units, nothing else.
    let narrow = t.high.token_with(
        "commander",
        "district-desk",
        &["--court", tree::INTERMEDIATE_1],
    );
    let seen = tree::list_units(&t.high, &narrow).await.unwrap();
    assert!(seen.iter().any(|u| u.unit_id == "bwc-1"));
    assert!(!seen.iter().any(|u| u.unit_id == "bwc-2"), "{seen:?}");
    let mut sub = Subscriber::connect(t.high.quic, &t.trust(), &narrow, &Limits::default())
        .await
        .unwrap();
    let refused = match sub.subscribe("bwc-2", 16).await {
        Ok(_) => panic!("a unit of another court was granted"),
        Err(e) => e.to_string(),
    };
    assert!(refused.contains("outside"), "{refused}");
    let refused = direct(&t.high, &narrow, keyframe("bwc-2"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");

    // A directive from the top: quality down, acted on by the agent, its states visible at
    // every tier, and the encoder's bitrate really falls.
    let before = bitrate(i1, &local, "bwc-1").await;
    let sent = direct(
        &t.supreme,
        &top,
        DirectiveRequest {
            unit_id: "bwc-1".into(),
            kind: DirectiveKind::Quality as i32,
            // Below what the test pattern needs, and a smaller picture.
            bitrate: 100,
            height: 144,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(sent.state, DirectiveState::Sent as i32);
    let done = wait_state(&t.supreme, &top, &sent.directive_id, DirectiveState::Done).await;
    assert_eq!(done.issued_by, "president");
    // Both times are the top hub's clock: issued, and the DONE state recorded there.
    eprintln!(
        "directive round trip, supreme → agent three hops down → DONE at the supreme: {:.1} ms",
        (done.updated_at_us - done.issued_at_us) as f64 / 1000.0
    );
    let high_token = t.high.token("viewer", "watch-officer");
    wait_state(
        &t.high,
        &high_token,
        &sent.directive_id,
        DirectiveState::Done,
    )
    .await;
    wait_state(i1, &local, &sent.directive_id, DirectiveState::Done).await;
    let after = bitrate(i1, &local, "bwc-1").await;
    assert!(
        after < before * 0.7,
        "bitrate {before:.0} → {after:.0} b/s after a 100 kbit/s directive ({})",
        done.reason
    );
    // A viewer may not direct.
    let refused = direct(&t.high, &high_token, keyframe("bwc-1"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_and_child_hubs_outside_the_tree_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = tree::make_ca(dir.path()).unwrap();
    let tls = dir.path().join("high-tls");
    tree::issue(&ca, tree::HIGH, "", &tls).unwrap();
    let high = Hub::start(
        &dir.path().join("high"),
        Some(&tree::config(
            tree::HIGH,
            "high",
            &tls,
            &ca,
            None,
            "[auth]\nclock_leeway = \"0s\"\n",
        )),
    )
    .await
    .unwrap();

    // A child whose certificate comes from another CA: the TLS handshake refuses it.
    let other = tree::make_ca(&dir.path().join("other")).unwrap();
    let tls = dir.path().join("rogue-tls");
    tree::issue(&other, tree::INTERMEDIATE_1, tree::HIGH, &tls).unwrap();
    let rogue = Hub::start(
        &dir.path().join("rogue"),
        Some(&tree::config(
            tree::INTERMEDIATE_1,
            "intermediate",
            &tls,
            &other,
            Some(&high),
            "",
        )),
    )
    .await
    .unwrap();
    // A child the CA placed under another court.
    let tls = dir.path().join("stray-tls");
    tree::issue(&ca, "沪01", "沪", &tls).unwrap();
    let stray = Hub::start(
        &dir.path().join("stray"),
        Some(&tree::config(
            "沪01",
            "intermediate",
            &tls,
            &ca,
            Some(&high),
            "",
        )),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let log = stray.log();
        if log.contains("not below court") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stray child not refused: {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = high.metrics().await.unwrap();
    assert_eq!(m.get("tianwang_cascade_children"), 0.0);
    assert!(m.get("tianwang_sessions_closed_total{reason=\"forbidden\"}") >= 1.0);
    assert!(m.get("tianwang_sessions_closed_total{reason=\"handshake\"}") >= 1.0);
    assert_eq!(
        rogue
            .metrics()
            .await
            .unwrap()
            .get("tianwang_cascade_uplink"),
        0.0
    );

    // Tokens: another court, expired, forged. Each refused with its reason.
    let other_court = high.token_with("commander", "x", &["--court", "沪"]);
    let err = tree::list_units(&high, &other_court).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("outside this hub's jurisdiction"),
        "{err:?}"
    );
    let forged = stray.token("commander", "x");
    let err = tree::list_units(&high, &forged).await.unwrap_err();
    assert!(format!("{err:?}").contains("bad signature"), "{err:?}");
    let expired = high.token_with("commander", "x", &["--ttl", "1s"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let err = tree::list_units(&high, &expired).await.unwrap_err();
    assert!(format!("{err:?}").contains("expired"), "{err:?}");
    let log = high.log();
    assert!(log.contains("not below court"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_middle_hub_killed_and_restarted_the_chain_reforms() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tree::start(dir.path()).await.unwrap();
    let i1 = &t.intermediate[0];
    let ca = t.ca_cert();
    let _a1 = Agent::start(
        &format!("localhost:{}", i1.quic.port()),
        &ca,
        "bwc-1",
        &i1.token("device", "bwc-1"),
        dir.path(),
        &[],
    )
    .unwrap();
    let top = t.supreme.token("commander", "president");
    wait_units_online(&t.supreme, &top, &["bwc-1"], SETTLE)
        .await
        .unwrap();
    let mut sub = Subscriber::connect(t.supreme.quic, &t.trust(), &top, &Limits::default())
        .await
        .unwrap();
    let (s, mut rx) = sub.subscribe("bwc-1", 512).await.unwrap();
    let video = track_id(&s, TrackKind::Video);
    collect(&mut rx, video, 30, SETTLE).await.unwrap();

    t.high.kill();
    // Issued while the middle hub is down: kept at the top, delivered when it returns.
    let sent = direct(
        &t.supreme,
        &top,
        DirectiveRequest {
            unit_id: "bwc-1".into(),
            kind: DirectiveKind::Message as i32,
            text: "hold position".into(),
            ..Default::default()
        },
    )
    .await;
    // The unit stays known at the top (offline): the directive waits there.
    let id = sent.unwrap().directive_id;
    t.high.start_again().await.unwrap();
    wait_units_online(&t.supreme, &top, &["bwc-1"], SETTLE)
        .await
        .unwrap();
    // The viewer resumes without subscribing again.
    let resumed = collect(&mut rx, video, 30, SETTLE).await.unwrap();
    assert_whole_groups(&resumed[resumed.iter().position(|f| f.index == 0).unwrap()..]);

    wait_state(&t.supreme, &top, &id, DirectiveState::Done).await;
    let local = i1.token("commander", "desk");
    wait_state(i1, &local, &id, DirectiveState::Done).await;
    // Executed once: the agent shows the instruction once, however often it was sent.
    let shown = _a1.log().matches("hold position").count();
    assert_eq!(shown, 1, "instruction shown {shown} times:\n{}", _a1.log());
}

async fn alarms_at(hub: &Hub, token: &str) -> Vec<serde_json::Value> {
    let r = reqwest::Client::new()
        .get(format!("http://{}/api/alarms", hub.http))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .expect("GET /api/alarms");
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.expect("the alarm list");
    let v: serde_json::Value = serde_json::from_str(&text).expect("the alarm list is JSON");
    v["alarms"].as_array().cloned().unwrap_or_default()
}

async fn wait_alarm_where(
    hub: &Hub,
    token: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let list = alarms_at(hub, token).await;
        if let Some(a) = list.iter().find(|a| pred(a)) {
            return a.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not in {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alarms_escalate_and_are_settled_from_above_and_operations_go_up() {
    let dir = tempfile::tempdir().unwrap();
    let ca = tree::make_ca(dir.path()).unwrap();
    let tls = dir.path().join("high-tls");
    tree::issue(&ca, tree::HIGH, "", &tls).unwrap();
    let high = Hub::start(
        &dir.path().join("high"),
        Some(&tree::config(tree::HIGH, "high", &tls, &ca, None, "")),
    )
    .await
    .unwrap();
    let tls = dir.path().join("i1-tls");
    tree::issue(&ca, tree::INTERMEDIATE_1, tree::HIGH, &tls).unwrap();
    let i1 = Hub::start(
        &dir.path().join("i1"),
        Some(&tree::config(
            tree::INTERMEDIATE_1,
            "intermediate",
            &tls,
            &ca,
            Some(&high),
            "[alarms]\nescalate_after = \"2s\"\n",
        )),
    )
    .await
    .unwrap();
    let trust = tianwang_transport::Trust::from_ca_file(&ca.join("ca.crt")).unwrap();
    let unit = tianwang_tests::unit::FakeUnit::start(
        i1.quic,
        &trust,
        "bwc-9",
        &i1.token("device", "bwc-9"),
    )
    .await
    .unwrap();
    let above = high.token("commander", "duty-officer");
    wait_units_online(&high, &above, &["bwc-9"], SETTLE)
        .await
        .unwrap();
    unit.telemetry(tianwang_proto::v1::Telemetry {
        timestamp_us: tianwang_tests::unix_now_us(),
        sos: true,
        battery_percent: 80.0,
        storage_free_bytes: 10 << 30,
        recording: true,
        ..Default::default()
    });
    // Seen above at once (the catalog carries it), escalated once nobody acknowledged it.
    let below = wait_alarm_where(&high, &above, "the sos alarm from below", |a| {
        a["rule"] == "sos" && a["below"] == true
    })
    .await;
    assert_eq!(below["court"], tree::INTERMEDIATE_1);
    let escalated = wait_alarm_where(&high, &above, "the sos alarm escalated", |a| {
        a["rule"] == "sos" && a["escalated"] == true
    })
    .await;
    let id = escalated["id"].as_str().unwrap().to_string();
    assert_eq!(
        i1.metrics()
            .await
            .unwrap()
            .get("tianwang_alarms_escalated_total{rule=\"sos\"}"),
        1.0
    );

    // Acknowledged from above: settled by the intermediate hub, the new state comes back up.
    let court = tree::INTERMEDIATE_1;
    let r = reqwest::Client::new()
        .post(format!(
            "http://{}/api/alarms/{id}/ack?court={court}",
            high.http
        ))
        .header("authorization", format!("Bearer {above}"))
        .body(r#"{"comment":"team sent"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let local = i1.token("commander", "desk");
    let settled = wait_alarm_where(&i1, &local, "acknowledged at its own hub", |a| {
        a["id"] == id.as_str() && a["state"] == "acknowledged"
    })
    .await;
    assert!(
        settled["acked_by"]
            .as_str()
            .is_some_and(|b| b.starts_with("duty-officer")),
        "{settled}"
    );
    wait_alarm_where(&high, &above, "acknowledged, seen above", |a| {
        a["id"] == id.as_str() && a["state"] == "acknowledged"
    })
    .await;
    // The intermediate court's operations go up too: the high court's map shows its fence.
    let hub_url = format!("http://{}", i1.http);
    let case = "(2026)京01执9号";
    tree::hub_cli(&[
        "case", "--hub", &hub_url, "--token", &local, "create", "--number", case,
    ])
    .unwrap();
    tree::hub_cli(&[
        "case",
        "--hub",
        &hub_url,
        "--token",
        &local,
        "operation",
        "--case",
        case,
        "--id",
        "op-9",
        "--units",
        "bwc-9",
        "--lat",
        "39.9",
        "--lon",
        "116.4",
        "--radius",
        "250",
    ])
    .unwrap();
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let r = reqwest::Client::new()
            .get(format!("http://{}/api/operations", high.http))
            .header("authorization", format!("Bearer {above}"))
            .send()
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        let found = v["operations"]
            .as_array()
            .and_then(|ops| ops.iter().find(|o| o["id"] == "op-9").cloned());
        if let Some(op) = found {
            assert_eq!(op["court"], tree::INTERMEDIATE_1);
            assert_eq!(op["case_number"], case);
            assert_eq!(op["units"][0], "bwc-9");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "operation not seen above: {v}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An intermediate court's token cannot settle alarms through the high court's hub for
    // another court.
    let narrow = high.token_with("commander", "x", &["--court", tree::INTERMEDIATE_1]);
    let r = reqwest::Client::new()
        .post(format!(
            "http://{}/api/alarms/{id}/resolve?court=沪01",
            high.http
        ))
        .header("authorization", format!("Bearer {narrow}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
}

/// A WebRTC unit is a unit like any other up the tree: a WHIP publisher at an intermediate
/// court is listed at the supreme court with its court, and watched from there in whole
/// groups that start at keyframes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whip_unit_below_is_watched_from_the_top() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = Tree::start(dir.path()).await?;
    let [i1, _] = &t.intermediate;
    let clip = tianwang_tests::whip::h264_clip(dir.path(), 60)?;
    let mut phone = tianwang_tests::whip::WhipPublisher::publish(
        i1.http,
        "phone-1",
        &i1.token("device", "phone-1"),
        |o| o,
    )
    .await?;
    phone.wait_connected(Duration::from_secs(10)).await?;
    // The phone keeps filming (the clip again and again) while the top watches.
    let filming = tokio::spawn(async move {
        let mut ts: u32 = 0;
        loop {
            for au in &clip {
                ts = ts.wrapping_add(3000);
                if phone.send_access_unit(au, ts).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(33)).await;
            }
        }
    });
    let top = t.supreme.token("commander", "president");
    let listed = wait_units_online(&t.supreme, &top, &["phone-1"], SETTLE).await?;
    let phone_court = listed
        .iter()
        .find(|s| s.unit_id == "phone-1")
        .map(|s| s.court.clone());
    assert_eq!(phone_court.as_deref(), Some(tree::INTERMEDIATE_1));
    let mut sub = Subscriber::connect(t.supreme.quic, &t.trust(), &top, &Limits::default()).await?;
    let (s, mut rx) = sub.subscribe("phone-1", 256).await?;
    let video = track_id(&s, TrackKind::Video);
    let frames = collect(&mut rx, video, 45, SETTLE).await?;
    assert_whole_groups(&frames);
    assert!(tianwang_tests::is_idr_with_parameter_sets(
        frames[0].frame.payload()
    ));
    filming.abort();
    Ok(())
}
