//! The README's first command: `hub demo` starts a hub and simulated units, writes
//! demo.env, and `hub watch` with what demo.env says gets live video.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use tianwang_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_simulated_units_that_hub_watch_can_see() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let data = tmp.path().join("demo");
    let (quic, http) = (free_udp_addr(), free_tcp_addr());
    let log = std::fs::File::create(tmp.path().join("demo.log"))?;
    let mut demo = Command::new(bin("hub"))
        .args([
            "demo",
            "--units",
            "3",
            "--quic-listen",
            &quic.to_string(),
            "--http-listen",
            &http.to_string(),
            "--data",
        ])
        .arg(&data)
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .spawn()?;
    let log = || std::fs::read_to_string(tmp.path().join("demo.log")).unwrap_or_default();

    // demo.env appears once the hub is up.
    let env_path = data.join("demo.env");
    let mut env = HashMap::new();
    for _ in 0..200 {
        if let Ok(text) = std::fs::read_to_string(&env_path) {
            env = text
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        env.get("TIANWANG_HUB"),
        Some(&quic.to_string()),
        "demo.env: {env:?}\n{}",
        log()
    );
    let metrics_url = format!("{}/metrics", env["TIANWANG_HTTP"]);

    // All three units come online and frames flow.
    let mut online = 0.0;
    for _ in 0..200 {
        if let Ok(r) = reqwest::get(&metrics_url).await {
            let m = Metrics::parse(&r.text().await?);
            online = m.get("tianwang_units_online");
            if online == 3.0 && m.get("tianwang_frames_in_total") > 100.0 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(online, 3.0, "{}", log());

    let watch = Command::new(bin("hub"))
        .args(["watch", "--unit", "sim-2", "--duration", "2", "--json"])
        .env("TIANWANG_HUB", &env["TIANWANG_HUB"])
        .env("TIANWANG_TOKEN", &env["TIANWANG_TOKEN"])
        .env("TIANWANG_CA", &env["TIANWANG_CA"])
        .output()?;
    assert!(
        watch.status.success(),
        "{}",
        String::from_utf8_lossy(&watch.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&watch.stdout)?;
    assert!(
        report["video_frames"].as_u64().unwrap_or(0) >= 30,
        "{report}"
    );
    assert!(
        report["audio_frames"].as_u64().unwrap_or(0) >= 50,
        "{report}"
    );

    // sim-1 walks out of the demo operation's fence within its first 30 s: the alarm shows.
    let alarms_url = format!("{}/api/alarms", env["TIANWANG_HTTP"]);
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    let mut seen = serde_json::Value::Null;
    while std::time::Instant::now() < deadline {
        let r = client
            .get(&alarms_url)
            .header("authorization", format!("Bearer {}", env["TIANWANG_TOKEN"]))
            .send()
            .await?;
        seen = serde_json::from_str(&r.text().await?)?;
        let fence = seen["alarms"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["rule"] == "left_geofence" && a["unit"] == "sim-1");
        if fence {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        seen["alarms"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| a["rule"] == "left_geofence" && a["unit"] == "sim-1"),
        "{seen}\n{}",
        log()
    );

    // Ctrl-C (SIGTERM here) ends the demo cleanly.
    terminate(&mut demo);
    let status = demo.wait()?;
    assert!(status.success(), "demo exited with {status}\n{}", log());
    Ok(())
}
