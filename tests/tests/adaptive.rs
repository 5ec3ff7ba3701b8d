//! Adaptive bitrate: a unit's uplink narrows to 1 Mbit/s under its 2 Mbit/s stream; the
//! agent's encoder target comes under the cap within 10 s, and climbs back once the path
//! is wide again. A path narrower than the bitrate floor shrinks the picture, then its
//! frame rate, and a wide one restores both.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use tianwang_tests::relay::UdpRelay;
use tianwang_tests::*;

const UNIT: &str = "bwc-040";

/// The encoder targets the agent logged, in order.
fn targets(log: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| l.split("adaptive bitrate: ").nth(1))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect()
}

async fn wait_target(
    agent: &Agent,
    within: Duration,
    ok: impl Fn(u32) -> bool,
) -> anyhow::Result<(u32, Duration)> {
    let start = Instant::now();
    let seen = targets(&agent.log()).len();
    loop {
        let all = targets(&agent.log());
        if let Some(&last) = all.get(seen..).and_then(|t| t.last())
            && ok(last)
        {
            return Ok((last, start.elapsed()));
        }
        if start.elapsed() > within {
            anyhow::bail!(
                "encoder targets since: {:?}\n{}",
                &all[seen.min(all.len())..],
                agent.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_encoder_follows_a_narrowing_and_widening_path() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), None).await?;
    let relay = UdpRelay::start(hub.quic).await?;
    let agent = Agent::start(
        &relay.addr.to_string(),
        &hub.ca(),
        UNIT,
        &hub.token("device", UNIT),
        tmp.path(),
        // Noise fills the 2 Mbit/s (the ball pattern would need a few hundred kbit/s).
        &[
            "--source",
            "noise",
            "--keyframe-interval",
            "1",
            "--bitrate",
            "2000",
        ],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(4)).await;

    relay.set_rate(Some(1_000_000));
    let (under, took) = wait_target(&agent, Duration::from_secs(10), |t| t < 1000).await?;
    println!(
        "1 Mbit/s cap: encoder at {under} kbit/s after {:.1} s",
        took.as_secs_f64()
    );
    // It stays under the cap while the cap lasts (no climb back into it).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let held = *targets(&agent.log()).last().unwrap();
    assert!(
        held < 1100,
        "climbed back to {held} kbit/s under a 1 Mbit/s cap"
    );

    relay.set_rate(None);
    let (back, took) = wait_target(&agent, Duration::from_secs(40), |t| t >= 1800).await?;
    println!(
        "cap lifted: encoder back at {back} kbit/s after {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(hub.metrics().await?.get("tianwang_units_online"), 1.0);
    Ok(())
}

/// The pictures the agent stepped to, in order: (% of the height, 1 frame in N).
fn pictures(log: &str) -> Vec<(u32, u32)> {
    log.lines()
        .filter_map(|l| l.split("picture at ").nth(1))
        .filter_map(|rest| {
            let height = rest.split(' ').next()?.parse().ok()?;
            let frames = rest.split("1 frame in ").nth(1)?;
            let frames = frames.split(|c: char| !c.is_ascii_digit()).next()?;
            Some((height, frames.parse().ok()?))
        })
        .collect()
}

/// Width and height of an H.264 elementary stream, by ffprobe.
fn probe_size(annexb: &[u8], dir: &std::path::Path) -> anyhow::Result<(u64, u64)> {
    let file = dir.join("picture.h264");
    std::fs::write(&file, annexb)?;
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=width,height", "-of", "json"])
        .arg(&file)
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let s = &v["streams"][0];
    Ok((
        s["width"].as_u64().unwrap_or(0),
        s["height"].as_u64().unwrap_or(0),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_narrower_than_the_floor_shrinks_the_picture_and_a_wide_one_restores_it()
-> anyhow::Result<()> {
    const UNIT: &str = "bwc-041";
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), None).await?;
    let relay = UdpRelay::start(hub.quic).await?;
    let agent = Agent::start(
        &relay.addr.to_string(),
        &hub.ca(),
        UNIT,
        &hub.token("device", UNIT),
        tmp.path(),
        &["--keyframe-interval", "1", "--bitrate", "1000"],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await?;
    let viewer = hub.token("viewer", "alice");
    let mut s = Subscriber::connect(hub.quic, &hub.trust(), &viewer, &Default::default()).await?;
    let (sub, mut rx) = s.subscribe(UNIT, 4096).await?;
    let video = track_id(&sub, tianwang_proto::v1::TrackKind::Video);

    // 50 kbit/s: a third of the full picture's floor (150 kbit/s), and the sound takes
    // 32 of it: the picture gets smaller, then the frame rate lower.
    relay.set_rate(Some(50_000));
    let start = Instant::now();
    loop {
        let steps = pictures(&agent.log());
        if steps.last().is_some_and(|&(_, frames)| frames >= 2) {
            println!(
                "50 kbit/s: picture steps {steps:?} in {:.1} s",
                start.elapsed().as_secs_f64()
            );
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(75),
            "picture steps {steps:?}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The hub relays the smaller picture: a group from a keyframe on, as ffprobe sees it,
    // at the lower frame rate (capture times 2 or 3 frames apart, 30 fps captured).
    // (What the viewer's queue held from before is passed over.)
    let shrunk_at = std::time::Instant::now();
    let mut annexb = Vec::new();
    let mut capture_us = Vec::new();
    while capture_us.len() < 15 {
        let f = collect(&mut rx, video, 1, Duration::from_secs(20))
            .await?
            .remove(0);
        if f.received_at > shrunk_at && (!capture_us.is_empty() || f.index == 0) {
            annexb.extend_from_slice(f.frame.payload());
            capture_us.push(f.frame.header.timestamp_us);
        }
    }
    let mut spacing: Vec<u64> = capture_us.windows(2).map(|w| w[1] - w[0]).collect();
    spacing.sort_unstable();
    let median = spacing[spacing.len() / 2];
    assert!(
        (60_000..=110_000).contains(&median),
        "frames {median} µs apart: {spacing:?}"
    );
    let (w, h) = probe_size(&annexb, tmp.path())?;
    assert!(h > 0 && h <= 240, "the viewer's picture is {w}x{h}");

    relay.set_rate(None);
    let start = Instant::now();
    loop {
        if pictures(&agent.log()).last() == Some(&(100, 1)) {
            println!(
                "cap lifted: full picture again after {:.1} s",
                start.elapsed().as_secs_f64()
            );
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "picture steps {:?}\n{}",
            pictures(&agent.log()),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(hub.metrics().await?.get("tianwang_units_online"), 1.0);
    Ok(())
}
