//! Telemetry ingest and alarm evaluation at scale: `hub serve` with N units (default 2,000)
//! connected over QUIC, all in one operation's fence, each sending telemetry once a second
//! (spread over the second); a console session signed in. After a warm-up the run measures
//! the hub's CPU over the window, then sends ten units out of the fence and times each
//! `left_geofence` from the telemetry that crossed to the alarm arriving on the console
//! session. Build and run in release:
//!
//!   cargo run --release -p tianwang-tests --bin telemetry_load -- --units 2000 --duration 20
//!
//! It prints one JSON line (docs/benchmarks.md, "Telemetry and alarms").

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tianwang_proto::v1::session_event::Kind as Event;
use tianwang_proto::v1::{Announce, Hello, Position, Role, Telemetry, TrackInfo, TrackKind};
use tianwang_proto::{ControlMessage, Kind};
use tianwang_tests::console::Console;
use tianwang_tests::*;
use tianwang_transport::{Limits, client};
use tokio::sync::Mutex;

const CENTRE: (f64, f64) = (39.9087, 116.3975);
/// Units sent out of the fence to time the alarm.
const CROSSERS: usize = 10;

struct Args {
    units: usize,
    duration: u64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        units: 2000,
        duration: 20,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--units" => a.units = value.parse()?,
            "--duration" => a.duration = value.parse()?,
            other => bail!("unknown flag {other} (--units, --duration)"),
        }
    }
    Ok(a)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Where unit `i` stands: a small circle inside the fence, or 2 km east once it left.
fn position(i: usize, out: bool) -> Position {
    let a = i as f64 * 0.0007;
    let (lat, lon) = if out {
        (CENTRE.0, CENTRE.1 + 0.025)
    } else {
        (CENTRE.0 + 0.001 * a.sin(), CENTRE.1 + 0.001 * a.cos())
    };
    Position {
        latitude: lat,
        longitude: lon,
        accuracy_m: 5.0,
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), Some("[evidence]\nrecord = false\n")).await?;
    let pid = hub.pid().context("hub pid")?;
    let commander = hub.token("commander", "telemetry-load");
    let units: Vec<String> = (1..=args.units).map(|i| format!("tel-{i}")).collect();
    let url = format!("http://{}", hub.http);
    for cmd in [
        vec!["create", "--number", "LOAD-1"],
        vec![
            "operation",
            "--case",
            "LOAD-1",
            "--id",
            "op-load",
            "--lat",
            "39.9087",
            "--lon",
            "116.3975",
            "--radius",
            "500",
            "--units",
        ],
    ] {
        let mut all = vec!["case", "--hub", &url, "--token", &commander];
        all.extend_from_slice(&cmd);
        let joined = units.join(",");
        if cmd[0] == "operation" {
            all.push(&joined);
        }
        let out = std::process::Command::new(bin("hub")).args(&all).output()?;
        if !out.status.success() {
            bail!("hub case: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    let tokens: HashMap<String, String> = std::fs::read_to_string(hub.fleet("tel-", args.units))?
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(u, t)| (u.to_string(), t.to_string()))
        .collect();

    // The console reads all along, as a browser does (one that stops reading is closed):
    // batches counted, left_geofence alarms timed on arrival.
    let mut console = Console::connect(hub.http).await?;
    console.auth(&commander).await?;
    let batches = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pushed_points = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (alarm_tx, mut alarm_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let reader = {
        let (batches, pushed_points) = (Arc::clone(&batches), Arc::clone(&pushed_points));
        tokio::spawn(async move {
            loop {
                match console.next(Duration::from_secs(1)).await {
                    Ok(Some(e)) => match e.kind {
                        Some(Event::Telemetry(b)) => {
                            batches.fetch_add(1, Ordering::Relaxed);
                            pushed_points.fetch_add(b.points.len() as u64, Ordering::Relaxed);
                        }
                        Some(Event::Alarm(a)) => {
                            if let Some(a) = a.alarm
                                && a.rule == "left_geofence"
                                && a.state == "raised"
                            {
                                let _ = alarm_tx.send((a.unit_id.clone(), Instant::now()));
                            }
                        }
                        _ => {}
                    },
                    Ok(None) => return "the hub closed the console session",
                    // Quiet for a second: keep reading.
                    Err(_) => {}
                }
            }
        })
    };

    // One client endpoint, a connection per unit; each sends telemetry once a second,
    // started at its own offset in the second.
    let endpoint = tianwang_transport::client_endpoint(&hub.trust(), &Limits::default(), false)?;
    let crossed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let leave = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    let connect_started = Instant::now();
    for (i, unit) in units.iter().enumerate() {
        let token = tokens.get(unit).context("fleet token")?.clone();
        let (endpoint, hub_addr, unit) = (endpoint.clone(), hub.quic, unit.clone());
        let (crossed, leave) = (Arc::clone(&crossed), Arc::clone(&leave));
        let offset = Duration::from_micros((i as u64 * 1_000_000) / args.units as u64);
        let conn = tianwang_transport::connect(&endpoint, &hub_addr.to_string()).await?;
        let hello = Hello {
            role: Role::Publisher as i32,
            unit_id: unit.clone(),
            token,
            ..Default::default()
        };
        let (mut ctl, _) = client::hello(&conn, hello, Duration::from_secs(30)).await?;
        ctl.send(ControlMessage::new(Kind::Announce(Announce {
            tracks: vec![TrackInfo {
                id: 0,
                name: "video".into(),
                kind: TrackKind::Video as i32,
                codec: "h264".into(),
                ..Default::default()
            }],
        })))
        .await?;
        tasks.spawn(async move {
            let _conn = conn;
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let out = i < CROSSERS && leave.load(Ordering::Relaxed);
                let t = Telemetry {
                    timestamp_us: unix_now_us(),
                    position: Some(position(i, out)),
                    battery_percent: 80.0,
                    storage_free_bytes: 10 << 30,
                    recording: true,
                    ..Default::default()
                };
                let sent = Instant::now();
                if ctl
                    .send(ControlMessage::new(Kind::Telemetry(t)))
                    .await
                    .is_err()
                {
                    return;
                }
                if out {
                    crossed.lock().await.entry(unit.clone()).or_insert(sent);
                }
            }
        });
    }
    let connect_s = connect_started.elapsed().as_secs_f64();
    hub.wait_metric("tianwang_units_online", Duration::from_secs(60), |v| {
        v >= args.units as f64
    })
    .await?;

    // Warm-up, then the window: CPU and points taken.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m0 = hub.metrics().await?;
    let cpu0 = cpu_seconds(pid).context("hub cpu")?;
    let (b0, p0) = (
        batches.load(Ordering::Relaxed),
        pushed_points.load(Ordering::Relaxed),
    );
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    if reader.is_finished() {
        bail!("{}", reader.await.unwrap_or("the console reader failed"));
    }
    let batches = batches.load(Ordering::Relaxed) - b0;
    let pushed_points = pushed_points.load(Ordering::Relaxed) - p0;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid).context("hub cpu")? - cpu0;
    let m1 = hub.metrics().await?;
    let taken = m1.get("tianwang_telemetry_total") - m0.get("tianwang_telemetry_total");
    let rejected =
        m1.sum("tianwang_telemetry_rejected_total") - m0.sum("tianwang_telemetry_rejected_total");

    // Ten units leave the fence: telemetry sent → the alarm on the console session.
    leave.store(true, Ordering::Relaxed);
    let mut delays = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while delays.len() < CROSSERS {
        let Ok(Some((unit, at))) = tokio::time::timeout_at(deadline, alarm_rx.recv()).await else {
            break;
        };
        if let Some(sent) = crossed.lock().await.get(&unit) {
            delays.push(at.duration_since(*sent).as_secs_f64() * 1000.0);
        }
    }
    delays.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "units": args.units,
        "window_s": elapsed,
        "connect_s": connect_s,
        "points_per_s": taken / elapsed,
        "rejected": rejected,
        "rejected_by_reason": m1.series("tianwang_telemetry_rejected_total"),
        "hub_cpu_s_per_s": cpu / elapsed,
        "hub_cpu_us_per_point": cpu * 1e6 / taken.max(1.0),
        "console_batches_per_s": batches as f64 / elapsed,
        "console_points_per_s": pushed_points as f64 / elapsed,
        "alarms_timed": delays.len(),
        "alarm_delay_ms_p50": percentile(&delays, 0.5),
        "alarm_delay_ms_max": delays.last().copied().unwrap_or(f64::NAN),
        "hub_peak_rss_mib": peak_rss_mib(pid),
    });
    println!("{report}");
    tasks.shutdown().await;
    reader.abort();
    Ok(())
}
