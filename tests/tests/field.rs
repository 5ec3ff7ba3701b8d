//! Telemetry and deviation alarms through a real hub: a scripted unit in an operation walks
//! out of its geofence, presses SOS and goes offline; bad telemetry is refused and counted
//! without cutting the unit off; alarms are acknowledged and resolved once, by the right
//! roles, and every step is stored.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use serde_json::Value;
use tianwang_proto::v1::session_event::Kind as Event;
use tianwang_proto::v1::{Position, Telemetry};
use tianwang_tests::console::Console;
use tianwang_tests::unit::FakeUnit;
use tianwang_tests::*;

const CASE: &str = "(2026)京0113执7号";
const CENTRE: (f64, f64) = (39.9087, 116.3975);

fn point(lat: f64, lon: f64) -> Telemetry {
    Telemetry {
        timestamp_us: unix_now_us(),
        position: Some(Position {
            latitude: lat,
            longitude: lon,
            accuracy_m: 5.0,
            ..Default::default()
        }),
        battery_percent: 80.0,
        storage_free_bytes: 10 << 30,
        recording: true,
        ..Default::default()
    }
}

async fn api(hub: &Hub, token: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let client = reqwest::Client::new();
    let url = format!("http://{}{path}", hub.http);
    let req = match method {
        "POST" => client.post(url).body(body.to_string()),
        _ => client.get(url),
    };
    let r = req
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn alarms(hub: &Hub, token: &str) -> Vec<Value> {
    let (status, v) = api(hub, token, "GET", "/api/alarms", "").await;
    assert_eq!(status, 200, "{v}");
    v["alarms"].as_array().cloned().unwrap_or_default()
}

async fn wait_alarm(hub: &Hub, token: &str, rule: &str, timeout: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(a) = alarms(hub, token)
            .await
            .into_iter()
            .find(|a| a["rule"] == rule)
        {
            return a;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {rule} alarm within {timeout:?}: {:?}\n{}",
            alarms(hub, token).await,
            hub.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_leaving_its_fence_pressing_sos_and_going_offline_raises_each_alarm()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), Some("[alarms]\noffline_grace = \"2s\"\n")).await?;
    let commander = hub.token("commander", "cmdr-1");
    let viewer = hub.token("viewer", "v-1");
    let url = format!("http://{}", hub.http);
    let case = |args: &[&str]| {
        let mut all = vec!["case", "--hub", &url, "--token", &commander];
        all.extend_from_slice(args);
        let o = std::process::Command::new(bin("hub"))
            .args(&all)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    case(&["create", "--number", CASE]);
    case(&[
        "operation",
        "--case",
        CASE,
        "--id",
        "op-f",
        "--units",
        "bwc-f1",
        "--lat",
        "39.9087",
        "--lon",
        "116.3975",
        "--radius",
        "200",
    ]);
    let unit = FakeUnit::start(
        hub.quic,
        &hub.trust(),
        "bwc-f1",
        &hub.token("device", "bwc-f1"),
    )
    .await?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(10), |v| {
        v == 1.0
    })
    .await?;

    // Inside the fence for a few seconds (the hub reads operations every 2 s): no alarm.
    for _ in 0..10 {
        unit.telemetry(point(CENTRE.0, CENTRE.1));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(alarms(&hub, &commander).await.is_empty());

    // Out of the fence: 0.01° north is 1.1 km.
    let walk = async {
        loop {
            unit.telemetry(point(CENTRE.0 + 0.01, CENTRE.1));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let alarm = tokio::select! {
        a = wait_alarm(&hub, &commander, "left_geofence", Duration::from_secs(5)) => a,
        _ = walk => unreachable!(),
    };
    // Raised on the first point outside, not some later one: of the points stored outside
    // the fence, only one reached the hub before the alarm.
    // (Points are stored in batches every 500 ms: wait for the first outside one.)
    let outside = |v: &Value| {
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["latitude"].as_f64().unwrap() > CENTRE.0 + 0.005)
    };
    let mut v = Value::Null;
    for _ in 0..30 {
        v = api(&hub, &commander, "GET", "/api/telemetry?unit=bwc-f1", "")
            .await
            .1;
        if outside(&v) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["latitude"].as_f64().unwrap() > CENTRE.0 + 0.005)
        .filter(|p| p["received_us"].as_i64() < alarm["raised_us"].as_i64())
        .count();
    assert_eq!(before, 1, "{v}");
    assert_eq!(alarm["unit"], "bwc-f1");
    assert_eq!(alarm["case_number"], CASE);
    assert_eq!(alarm["operation_id"], "op-f");
    assert_eq!(alarm["severity"], "warning");
    assert!(
        alarm["evidence"]
            .as_str()
            .unwrap()
            .contains("m from the centre")
    );

    // Bad telemetry: refused and counted, the unit stays on. (A fresh second first: the
    // rate limit counts every message, good or bad.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    unit.telemetry(point(200.0, 0.0));
    unit.telemetry(point(f64::NAN, 0.0));
    let mut future = point(CENTRE.0, CENTRE.1);
    future.timestamp_us += 3_600_000_000;
    unit.telemetry(future);
    let mut empty = point(CENTRE.0, CENTRE.1);
    empty.battery_percent = 250.0;
    unit.telemetry(empty);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..20 {
        unit.telemetry(point(CENTRE.0, CENTRE.1));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let m = hub.metrics().await?;
    for (reason, at_least) in [
        ("position", 2.0),
        ("future", 1.0),
        ("battery", 1.0),
        ("rate", 10.0),
    ] {
        let got = m.get(&format!(
            "tianwang_telemetry_rejected_total{{reason=\"{reason}\"}}"
        ));
        assert!(got >= at_least, "{reason}: {got}");
    }
    assert_eq!(
        m.get("tianwang_units_online"),
        1.0,
        "bad telemetry does not cut the unit off"
    );

    // SOS: critical, at once.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut sos = point(CENTRE.0, CENTRE.1);
    sos.sos = true;
    unit.telemetry(sos);
    let a = wait_alarm(&hub, &commander, "sos", Duration::from_secs(2)).await;
    assert_eq!(a["severity"], "critical");

    // Acknowledge and resolve: by a commander, once each; a viewer may not.
    let id = alarm["id"].as_str().unwrap();
    let (status, _) = api(&hub, &viewer, "POST", &format!("/api/alarms/{id}/ack"), "").await;
    assert_eq!(status, 403);
    let (status, v) = api(
        &hub,
        &commander,
        "POST",
        &format!("/api/alarms/{id}/ack"),
        r#"{"comment":"calling him back"}"#,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "acknowledged");
    assert_eq!(v["acked_by"], "cmdr-1");
    let (status, v) = api(
        &hub,
        &commander,
        "POST",
        &format!("/api/alarms/{id}/ack"),
        "",
    )
    .await;
    assert_eq!(status, 409, "{v}");
    let (status, v) = api(
        &hub,
        &commander,
        "POST",
        &format!("/api/alarms/{id}/resolve"),
        r#"{"comment":"back inside"}"#,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["state"], "resolved");
    let (status, _) = api(&hub, &commander, "POST", "/api/alarms/nope/ack", "").await;
    assert_eq!(status, 404);

    // The stored track of the unit, bound to the case.
    let (status, v) = api(&hub, &commander, "GET", "/api/telemetry?unit=bwc-f1", "").await;
    assert_eq!(status, 200);
    let points = v["points"].as_array().unwrap();
    assert!(points.len() >= 10, "{}", points.len());
    assert!(points.iter().all(|p| p["case_number"] == CASE), "{v}");
    assert!(
        points
            .iter()
            .all(|p| p["latitude"].as_f64().unwrap() <= 90.0)
    );

    // Offline during the operation: after the 2 s grace.
    drop(unit);
    wait_alarm(&hub, &commander, "unit_offline", Duration::from_secs(20)).await;
    let m = hub.metrics().await?;
    for rule in ["left_geofence", "sos", "unit_offline"] {
        assert!(m.get(&format!("tianwang_alarms_raised_total{{rule=\"{rule}\"}}")) >= 1.0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sos_button_of_a_simulated_unit_raises_a_critical_alarm() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), None).await?;
    let commander = hub.token("commander", "cmdr-1");
    let tokens = hub.fleet("sim-", 2);
    let sim = Simulator::start(&hub, 2, &tokens, &[])?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 2.0
    })
    .await?;
    // Two consoles of the court, signed in before the button is pressed.
    let mut consoles = Vec::new();
    for token in [commander.clone(), hub.token("viewer", "v-1")] {
        let mut c = Console::connect(hub.http).await?;
        c.auth(&token).await?;
        consoles.push(c);
    }
    // SIGUSR1 is the button; the simulator wires it to its first unit.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(sim.pid())?),
        nix::sys::signal::Signal::SIGUSR1,
    )?;
    let a = wait_alarm(&hub, &commander, "sos", Duration::from_secs(10)).await;
    assert_eq!(a["unit"], "sim-1");
    assert_eq!(a["severity"], "critical");
    assert!(
        alarms(&hub, &commander)
            .await
            .iter()
            .all(|a| a["unit"] != "sim-2" || a["rule"] != "sos")
    );
    // Every console of the court was told at once, over its session: the alarm, and the
    // unit's telemetry with the button held.
    for c in &mut consoles {
        let pushed = c
            .until(Duration::from_secs(5), |e| match &e.kind {
                Some(Event::Alarm(a)) => a.alarm.clone().filter(|a| a.rule == "sos"),
                _ => None,
            })
            .await?;
        assert_eq!(pushed.unit_id, "sim-1");
        assert_eq!(pushed.severity, "critical");
        assert_eq!(pushed.state, "raised");
        c.until(Duration::from_secs(5), |e| match &e.kind {
            Some(Event::Telemetry(b)) => b
                .points
                .iter()
                .find(|p| p.unit_id == "sim-1" && p.telemetry.as_ref().is_some_and(|t| t.sos))
                .cloned(),
            _ => None,
        })
        .await?;
    }
    for c in consoles {
        c.close().await;
    }
    Ok(())
}

/// An NMEA log around the demo's fence: RMC (valid fixes, 3.5 knots east) and GGA (HDOP
/// 0.9) each second, latitude rising 0.01' a second from 39°54.522'.
fn nmea_log(seconds: u32) -> String {
    let sentence = |body: String| {
        let sum = body.bytes().fold(0u8, |a, b| a ^ b);
        format!("${body}*{sum:02X}\r\n")
    };
    let mut out = String::new();
    for i in 0..seconds {
        let lat = 3954.522 + f64::from(i) * 0.01;
        let t = format!("1200{i:02}.00");
        out += &sentence(format!(
            "GPGGA,{t},{lat:09.4},N,11623.850,E,1,08,0.9,50.0,M,0.0,M,,"
        ));
        out += &sentence(format!(
            "GPRMC,{t},A,{lat:09.4},N,11623.850,E,3.5,90.0,291126,,,A"
        ));
    }
    out
}

/// Positions the hub stored for a unit, once it has `n`.
async fn positions(hub: &Hub, token: &str, unit: &str, n: usize) -> Vec<Value> {
    for _ in 0..150 {
        let (_, v) = api(
            hub,
            token,
            "GET",
            &format!("/api/telemetry?unit={unit}"),
            "",
        )
        .await;
        let points: Vec<Value> = v["points"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| p["latitude"].is_f64())
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        if points.len() >= n {
            return points;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {n} positions of {unit} stored");
}

/// A GPS receiver as the agent meets it: an NMEA file replayed, and gpsd (the real daemon,
/// fed the same log through a pseudo-terminal by gpsfake). The hub stores the receiver's
/// positions, accuracy and speed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_come_from_nmea_and_from_gpsd() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), None).await?;
    let commander = hub.token("commander", "cmdr-1");
    let log = tmp.path().join("track.nmea");
    std::fs::write(&log, nmea_log(20))?;

    let log_arg = log.display().to_string();
    let _nmea = Agent::start(
        &hub.quic.to_string(),
        &hub.ca(),
        "gps-nmea",
        &hub.token("device", "gps-nmea"),
        tmp.path(),
        &["--nmea", &log_arg],
    )?;
    let points = positions(&hub, &commander, "gps-nmea", 3).await;
    let first = &points[0];
    let lat = first["latitude"].as_f64().unwrap_or_default();
    // 39°54.522' (or a later second of the log), 116°23.850'.
    assert!((39.908_7..39.912).contains(&lat), "{first}");
    assert!((first["longitude"].as_f64().unwrap_or_default() - 116.3975).abs() < 1e-6);
    assert!((first["accuracy_m"].as_f64().unwrap_or_default() - 4.5).abs() < 1e-3);
    assert!((first["speed_mps"].as_f64().unwrap_or_default() - 1.8).abs() < 0.01);
    assert!(
        points
            .windows(2)
            .all(|w| w[1]["latitude"].as_f64() >= w[0]["latitude"].as_f64()),
        "the replay moves north: {points:?}"
    );

    // gpsd, through gpsfake: a daemon on a free port, the log on a pseudo-terminal.
    let port = free_tcp_addr().port().to_string();
    let mut gpsfake = std::process::Command::new("gpsfake")
        .args(["-1", "-c", "0.5", "-P", &port, "-q", &log_arg])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let gpsd_addr = format!("127.0.0.1:{port}");
    let _gpsd = Agent::start(
        &hub.quic.to_string(),
        &hub.ca(),
        "gps-gpsd",
        &hub.token("device", "gps-gpsd"),
        tmp.path(),
        &["--gpsd", &gpsd_addr],
    )?;
    let points = positions(&hub, &commander, "gps-gpsd", 4).await;
    let _ = gpsfake.kill();
    let _ = gpsfake.wait();
    let p = &points[0];
    let lat = p["latitude"].as_f64().unwrap_or_default();
    assert!((39.908_7..39.912).contains(&lat), "{p}");
    assert!((p["longitude"].as_f64().unwrap_or_default() - 116.3975).abs() < 1e-6);
    // gpsd's own error estimate (eph), not a made-up one (its first report may have none).
    assert!(
        points
            .iter()
            .any(|p| p["accuracy_m"].as_f64().unwrap_or_default() > 0.0),
        "{points:?}"
    );
    Ok(())
}

/// The rules the other scenarios do not reach, each through a running hub with short
/// thresholds: a unit in an operation that stops recording, runs low on battery and
/// storage and whose camera freezes; a second unit that never connects; an operation that
/// runs past its end and is then closed with evidence missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_stopped_stream_stalled_low_battery_and_storage_overrun_and_missing_evidence()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(
        tmp.path(),
        Some(
            "[alarms]\noffline_grace = \"2s\"\nstall = \"2s\"\nrecording_grace = \"2s\"\n\
             overrun_grace = \"1s\"\nevidence_tolerance = \"1s\"\n\
             battery_low_percent = 15.0\nstorage_low_bytes = 1000000\n",
        ),
    )
    .await?;
    let commander = hub.token("commander", "cmdr-1");
    let url = format!("http://{}", hub.http);
    let case = |args: &[&str]| -> anyhow::Result<()> {
        let mut all = vec!["case", "--hub", &url, "--token", &commander];
        all.extend_from_slice(args);
        let o = std::process::Command::new(bin("hub")).args(&all).output()?;
        anyhow::ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        Ok(())
    };
    case(&["create", "--number", CASE])?;
    case(&[
        "operation",
        "--case",
        CASE,
        "--id",
        "op-r",
        "--units",
        "bwc-r1,bwc-r2",
        "--duration",
        "4s",
        "--lat",
        "39.9087",
        "--lon",
        "116.3975",
        "--radius",
        "200",
    ])?;
    let unit = FakeUnit::start(
        hub.quic,
        &hub.trust(),
        "bwc-r1",
        &hub.token("device", "bwc-r1"),
    )
    .await?;
    // Inside the fence, but not recording, 5 % battery, 500 kB free; then the camera freezes.
    let report = |u: &FakeUnit| {
        let mut t = point(CENTRE.0, CENTRE.1);
        t.recording = false;
        t.battery_percent = 5.0;
        t.storage_free_bytes = 500_000;
        u.telemetry(t);
    };
    report(&unit);
    unit.pause_media(true);
    let feeding = async {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            report(&unit);
        }
    };
    let expect = async {
        for (rule, severity) in [
            ("battery_low", "info"),
            ("storage_low", "info"),
            ("recording_stopped", "critical"),
            ("stream_stalled", "warning"),
            ("unit_offline", "critical"),
            ("operation_overrun", "warning"),
        ] {
            let a = wait_alarm(&hub, &commander, rule, Duration::from_secs(15)).await;
            let who = if rule == "unit_offline" {
                "bwc-r2"
            } else {
                "bwc-r1"
            };
            if rule != "operation_overrun" {
                assert_eq!(a["unit"], who, "{rule}: {a}");
            }
            assert_eq!(a["severity"], severity, "{rule}: {a}");
            assert_eq!(a["case_number"], CASE, "{rule}: {a}");
        }
    };
    tokio::select! {
        _ = feeding => unreachable!("feeding never ends"),
        _ = expect => {}
    }
    // Closed: bwc-r2 recorded nothing of the window, bwc-r1 only a frozen stream.
    case(&["close-operation", "--id", "op-r"])?;
    let a = wait_alarm(
        &hub,
        &commander,
        "missing_evidence",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(a["case_number"], CASE, "{a}");
    let m = hub.metrics().await?;
    for rule in [
        "battery_low",
        "storage_low",
        "recording_stopped",
        "stream_stalled",
        "unit_offline",
        "operation_overrun",
        "missing_evidence",
    ] {
        assert!(
            m.get(&format!("tianwang_alarms_raised_total{{rule=\"{rule}\"}}")) >= 1.0,
            "{rule} not counted"
        );
    }
    Ok(())
}
