//! Adaptive bitrate: a unit's uplink narrows to 1 Mbit/s under its 2 Mbit/s stream; the
//! agent's encoder target comes under the cap within 10 s, and climbs back once the path
//! is wide again.
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
