//! Nothing lost: a unit's link goes dark for 30 s while it records on; when the link
//! returns, the hub asks the device's spool for what its recording lacks and the recording
//! ends up whole (`hub verify` passes), while the live viewer jumps to the newest picture.
//! The spool survives the agent being killed in the dark; a spool too small for the outage
//! raises its alarm and never passes off undelivered groups as delivered.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::Path;
use std::time::{Duration, Instant};

use tianwang_proto::v1::TrackKind;
use tianwang_tests::relay::UdpRelay;
use tianwang_tests::*;
use tianwang_transport::Limits;

const CONFIG: &str = "[quic]\nidle_timeout = \"3s\"\n[evidence]\nsegment_target = \"2s\"\n";

/// The unit's media rows as (start, end) capture µs, and how many backfill recordings.
async fn media_rows(hub: &Hub, unit: &str) -> anyhow::Result<Vec<(i64, i64, String)>> {
    sqlx::any::install_default_drivers();
    let db = format!("sqlite://{}", hub.dir.join("data/index.sqlite").display());
    let pool = sqlx::AnyPool::connect(&db).await?;
    let rows: Vec<(i64, i64, String)> = sqlx::query_as(
        "SELECT start_us, end_us, recording FROM segments WHERE unit = $1 AND kind = 'media' ORDER BY start_us",
    )
    .bind(unit)
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    Ok(rows)
}

/// Holes longer than 100 ms in what `rows` cover within [from, to].
fn holes(rows: &[(i64, i64, String)], from: i64, to: i64) -> Vec<(i64, i64)> {
    let mut holes = Vec::new();
    let mut at = from;
    for (s, e, _) in rows {
        if *e <= at {
            continue;
        }
        // Clipped to the span asked about: a row far after it leaves only the rest.
        if (*s).min(to) > at + 100_000 {
            holes.push((at, (*s).min(to)));
        }
        at = at.max(*e);
        if at >= to {
            break;
        }
    }
    if to > at + 100_000 {
        holes.push((at, to));
    }
    holes
}

fn verify(hub: &Hub, unit: &str) -> String {
    let out = std::process::Command::new(bin("hub"))
        .args(["verify", "--data"])
        .arg(hub.dir.join("data"))
        .args(["--unit", unit])
        .output()
        .expect("hub verify runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "hub verify failed:\n{text}");
    text
}

/// Waits until the recording covers [from, to] without a hole, or fails with what is missing.
async fn wait_complete(
    hub: &Hub,
    unit: &str,
    from: i64,
    to: i64,
    agent_log: &dyn Fn() -> String,
) -> anyhow::Result<Vec<(i64, i64, String)>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows = media_rows(hub, unit).await?;
        let h = holes(&rows, from, to);
        if h.is_empty() {
            return Ok(rows);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the recording still lacks {:?} (s relative to the start); it has {:?}\nhub:\n{}\nagent:\n{}",
                h.iter()
                    .map(|(a, b)| ((a - from) as f64 / 1e6, (b - from) as f64 / 1e6))
                    .collect::<Vec<_>>(),
                rows.iter()
                    .map(|(a, b, r)| ((a - from) as f64 / 1e6, (b - from) as f64 / 1e6, r.clone()))
                    .collect::<Vec<_>>(),
                hub.log(),
                agent_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn spool_dir(tmp: &Path, unit: &str) -> std::path::PathBuf {
    tmp.join(format!("agent-{unit}")).join("spool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_s_blackout_leaves_no_hole_in_the_recording() -> anyhow::Result<()> {
    const UNIT: &str = "bwc-030";
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), Some(CONFIG)).await?;
    let relay = UdpRelay::start(hub.quic).await?;
    let agent = Agent::start(
        &relay.addr.to_string(),
        &hub.ca(),
        UNIT,
        &hub.token("device", UNIT),
        tmp.path(),
        &["--keyframe-interval", "1"],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await?;
    let viewer = hub.token("viewer", "alice");
    let mut s = Subscriber::connect(hub.quic, &hub.trust(), &viewer, &Limits::default()).await?;
    let (sub, mut rx) = s.subscribe(UNIT, 1024).await?;
    let video = track_id(&sub, TrackKind::Video);
    let first = collect(&mut rx, video, 60, Duration::from_secs(15)).await?;
    let start = first[0].frame.header.timestamp_us as i64;

    relay.set_blackout(true);
    let dark = Instant::now();
    let dark_us = unix_now_us() as i64;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 0.0
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(dark.elapsed())).await;
    relay.set_blackout(false);
    let back = Instant::now();
    let back_us = unix_now_us() as i64;
    // The live viewer resumes at a fresh picture (a group's keyframe), never the missed
    // ones: what it still had queued is from before the dark.
    let resumed = loop {
        let f = collect(&mut rx, video, 1, Duration::from_secs(30))
            .await?
            .remove(0);
        let ts = f.frame.header.timestamp_us as i64;
        if ts >= dark_us - 1_000_000 {
            assert!(
                ts > back_us - 1_000_000,
                "the viewer got a frame from the dark"
            );
            break f;
        }
    };
    assert_eq!(resumed.index, 0, "live resumes at a keyframe");
    let resume = back.elapsed();
    println!(
        "live resumed {:.2} s after the link returned",
        resume.as_secs_f64()
    );

    // Six seconds of live after the return, then the whole span must be recorded.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let end = unix_now_us() as i64 - 3_000_000;
    let rows = wait_complete(&hub, UNIT, start, end, &|| agent.log()).await?;
    let recordings: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    assert!(
        recordings.len() >= 2,
        "a backfill recording beside the live ones: {recordings:?}"
    );
    let m = hub.metrics().await?;
    assert!(
        m.get("tianwang_backfill_groups_total") >= 25.0,
        "{}",
        m.get("tianwang_backfill_groups_total")
    );
    assert!(m.get("tianwang_backfill_segments_total") >= 10.0);
    println!(
        "blackout of {:.0} s: recording complete from {:.1} s before to {:.1} s after it, {} segments in {} recordings",
        (back_us - dark_us) as f64 / 1e6,
        (dark_us - start) as f64 / 1e6,
        (end - back_us) as f64 / 1e6,
        rows.len(),
        recordings.len()
    );
    let report = verify(&hub, UNIT);
    assert!(report.contains("OK"), "{report}");
    // And the spool let go of what the hub confirmed: no picture undelivered older than the
    // return.
    let undelivered = || -> std::io::Result<Vec<String>> {
        Ok(std::fs::read_dir(spool_dir(tmp.path(), UNIT))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".grp") && n.split('-').nth(2) == Some("0"))
            .filter(|n| {
                n.split('-')
                    .next()
                    .and_then(|s| s.parse::<i64>().ok())
                    .is_some_and(|s| s < back_us - 5_000_000)
            })
            .collect())
    };
    // Confirmations follow the segments' rows; give the last ones a moment.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !undelivered()?.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let left = undelivered()?;
    assert!(left.is_empty(), "still undelivered: {left:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_survives_the_agent_killed_in_the_dark() -> anyhow::Result<()> {
    const UNIT: &str = "bwc-031";
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), Some(CONFIG)).await?;
    let relay = UdpRelay::start(hub.quic).await?;
    let token = hub.token("device", UNIT);
    let args = ["--keyframe-interval", "1"];
    let mut agent = Agent::start(
        &relay.addr.to_string(),
        &hub.ca(),
        UNIT,
        &token,
        tmp.path(),
        &args,
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    relay.set_blackout(true);
    let dark_us = unix_now_us() as i64;
    tokio::time::sleep(Duration::from_secs(10)).await;
    // Power lost: nothing is finished, the group being written is torn.
    agent.kill();
    let killed_us = unix_now_us() as i64;
    let agent = Agent::start(
        &relay.addr.to_string(),
        &hub.ca(),
        UNIT,
        &token,
        tmp.path(),
        &args,
    )?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    relay.set_blackout(false);
    hub.wait_metric("tianwang_units_online", Duration::from_secs(30), |v| {
        v == 1.0
    })
    .await?;
    // What the first agent spooled in the dark (up to its last whole group) is recorded.
    wait_complete(
        &hub,
        UNIT,
        dark_us - 2_000_000,
        killed_us - 1_500_000,
        &|| agent.log(),
    )
    .await?;
    assert!(agent.log().contains("spool opened"), "{}", agent.log());
    verify(&hub, UNIT);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_raises_its_alarm_and_reports_only_what_was_delivered() -> anyhow::Result<()> {
    const UNIT: &str = "bwc-032";
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), Some(CONFIG)).await?;
    let relay = UdpRelay::start(hub.quic).await?;
    let agent = Agent::start(
        &relay.addr.to_string(),
        &hub.ca(),
        UNIT,
        &hub.token("device", UNIT),
        tmp.path(),
        &["--keyframe-interval", "1", "--spool-mib", "1"],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.set_blackout(true);
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 0.0
    })
    .await?;
    // The spool fills (the test pattern at its bitrate) and refuses a few groups more.
    let spool = spool_dir(tmp.path(), UNIT);
    let deadline = Instant::now() + Duration::from_secs(60);
    while dir_bytes(&spool) < 1 << 20 {
        assert!(
            Instant::now() < deadline,
            "the spool holds only {} bytes",
            dir_bytes(&spool)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    relay.set_blackout(false);
    hub.wait_metric(
        "tianwang_spool_refused_groups_total",
        Duration::from_secs(30),
        |v| v > 0.0,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nagent:\n{}", agent.log()))?;
    assert!(agent.log().contains("spool full"), "{}", agent.log());
    // The command centre is warned: a critical alarm, listed with what the rule saw.
    hub.wait_metric(
        "tianwang_alarms_raised_total{rule=\"spool_full\"}",
        Duration::from_secs(10),
        |v| v == 1.0,
    )
    .await?;
    let alarms = hub
        .get_json("/api/alarms?state=raised", &hub.token("commander", "zhou"))
        .await?;
    let alarm = alarms["alarms"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["rule"] == "spool_full"))
        .ok_or_else(|| anyhow::anyhow!("no spool_full alarm listed: {alarms}"))?;
    assert_eq!(alarm["severity"], "critical");
    assert_eq!(alarm["unit"], UNIT);
    assert!(
        alarm["evidence"]
            .as_str()
            .is_some_and(|e| e.contains("groups not kept")),
        "{alarm}"
    );
    tokio::time::sleep(Duration::from_secs(8)).await;
    // Every group the spool let go as delivered lies within the hub's recording.
    let rows = media_rows(&hub, UNIT).await?;
    let mut checked = 0;
    for name in std::fs::read_dir(spool_dir(tmp.path(), UNIT))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sent"))
    {
        let parts: Vec<i64> = name
            .split(['-', '.'])
            .take(2)
            .filter_map(|p| p.parse().ok())
            .collect();
        let (s, e) = (parts[0], parts[1]);
        assert!(
            holes(&rows, s, e).is_empty(),
            "{name} is marked delivered but the hub lacks it"
        );
        checked += 1;
    }
    assert!(checked > 0, "no group was confirmed at all");
    verify(&hub, UNIT);
    Ok(())
}
