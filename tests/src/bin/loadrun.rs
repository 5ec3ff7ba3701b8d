//! A load run: `hub serve` + `field-agent simulate` (N units) + M in-process QUIC subscribers
//! per unit, all on this machine. Reports what docs/benchmarks.md records: units,
//! subscribers, hub CPU, forwarded Mbit/s, drops, end-to-end delay percentiles, time to first
//! frame, hub peak RSS. Build and run in release:
//!
//!   cargo run --release -p tianwang-tests --bin loadrun -- --units 10 --subscribers 4 --duration 20
//!
//! The hub's recorder is off unless `--record 1`: then the report adds what recording
//! cost (segments and bytes written per second, write errors, the hub's disk writes).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tianwang_tests::*;
use tianwang_transport::Limits;
use tokio::sync::Mutex;

struct Args {
    units: usize,
    subscribers: usize,
    duration: u64,
    bitrate: u32,
    record: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        units: 10,
        subscribers: 4,
        duration: 20,
        bitrate: 1500,
        record: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--units" => a.units = value.parse()?,
            "--subscribers" => a.subscribers = value.parse()?,
            "--duration" => a.duration = value.parse()?,
            "--bitrate" => a.bitrate = value.parse()?,
            "--record" => a.record = value == "1" || value == "true",
            other => bail!(
                "unknown flag {other} (--units, --subscribers, --duration, --bitrate, --record)"
            ),
        }
    }
    Ok(a)
}

#[derive(Default)]
struct Tally {
    frames: AtomicU64,
    bytes: AtomicU64,
    delays_us: Mutex<Vec<u64>>,
    first_frame_us: Mutex<Vec<u64>>,
}

/// Bytes a process caused to be written to storage, from /proc (`write_bytes`).
fn disk_write_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let tmp = tempfile::tempdir()?;
    let config = format!(
        "[relay]\nsubscriber_queue_frames = 512\n[evidence]\nrecord = {}\n",
        args.record
    );
    let hub = Hub::start(tmp.path(), Some(&config)).await?;
    let tokens = hub.fleet("sim-", args.units);
    let _sim = Simulator::start(
        &hub,
        args.units,
        &tokens,
        &["--bitrate", &args.bitrate.to_string()],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(60), |v| {
        v == args.units as f64
    })
    .await?;
    // Simulated units start staggered over one group (2 s): let every one begin streaming
    // before timing anyone's first frame.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let viewer = hub.token("viewer", "loadrun");
    let tally = Arc::new(Tally::default());
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for u in 1..=args.units {
        for _ in 0..args.subscribers {
            let (hub_addr, trust, viewer) = (hub.quic, hub.trust(), viewer.clone());
            let (tally, measuring) = (Arc::clone(&tally), Arc::clone(&measuring));
            tasks.spawn(async move {
                let run = async {
                    let mut s =
                        Subscriber::connect(hub_addr, &trust, &viewer, &Limits::default()).await?;
                    let asked = Instant::now();
                    let (_, mut rx) = s.subscribe(&format!("sim-{u}"), 256).await?;
                    let mut first = true;
                    while let Some(f) = rx.next().await {
                        if first {
                            tally
                                .first_frame_us
                                .lock()
                                .await
                                .push(asked.elapsed().as_micros() as u64);
                            first = false;
                        }
                        if measuring.load(Ordering::Relaxed) {
                            tally.frames.fetch_add(1, Ordering::Relaxed);
                            tally
                                .bytes
                                .fetch_add(f.frame.encoded.len() as u64, Ordering::Relaxed);
                            let delay = unix_now_us().saturating_sub(f.frame.header.timestamp_us);
                            tally.delays_us.lock().await.push(delay);
                        }
                    }
                    anyhow::Ok(())
                };
                if let Err(e) = run.await {
                    eprintln!("subscriber to sim-{u}: {e:#}");
                }
            });
        }
    }
    let pid = hub.pid().context("hub pid")?;
    // Settle: every subscriber past its join burst.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m0 = hub.metrics().await?;
    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let disk0 = disk_write_bytes(pid).unwrap_or(0);
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    measuring.store(false, Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    let disk = disk_write_bytes(pid).unwrap_or(0).saturating_sub(disk0);
    let m1 = hub.metrics().await?;
    let rss = peak_rss_mib(pid).unwrap_or(f64::NAN);
    tasks.abort_all();

    let delays = sorted_ms(std::mem::take(&mut *tally.delays_us.lock().await));
    let ttff = sorted_ms(std::mem::take(&mut *tally.first_frame_us.lock().await));
    let frames_in = m1.get("tianwang_frames_in_total") - m0.get("tianwang_frames_in_total");
    let frames_out = m1.get("tianwang_frames_out_total") - m0.get("tianwang_frames_out_total");
    let dropped = m1.sum("tianwang_frames_dropped_total") - m0.sum("tianwang_frames_dropped_total");
    let bytes_out = m1.get("tianwang_bytes_out_total") - m0.get("tianwang_bytes_out_total");
    let bytes_in = m1.get("tianwang_bytes_in_total") - m0.get("tianwang_bytes_in_total");
    // What the subscribers received: the figure compared with the peers.
    let delivered = tally.bytes.load(Ordering::Relaxed) as f64 * 8.0 / secs / 1e6;
    let report = serde_json::json!({
        "units": args.units,
        "subscribers": args.units * args.subscribers,
        "seconds": secs,
        "bitrate_kbps": args.bitrate,
        "relay_cpu_cores": cpu / secs,
        "relay_cpu_seconds": cpu,
        "relay_peak_rss_mib": rss,
        "frames_in_per_s": frames_in / secs,
        "frames_out_per_s": frames_out / secs,
        "ingress_mbit_s": bytes_in * 8.0 / secs / 1e6,
        // What the subscribers asked for: every unit's stream to each of its subscribers.
        "offered_mbit_s": bytes_in * args.subscribers as f64 * 8.0 / secs / 1e6,
        "forwarded_mbit_s": bytes_out * 8.0 / secs / 1e6,
        "delivered_mbit_s": delivered,
        "mbit_per_cpu_second": delivered * secs / cpu,
        "frames_dropped": dropped,
        "delay_ms_p50": percentile(&delays, 0.50),
        "delay_ms_p95": percentile(&delays, 0.95),
        "delay_ms_p99": percentile(&delays, 0.99),
        "first_frame_ms_p50": percentile(&ttff, 0.50),
        "first_frame_ms_p95": percentile(&ttff, 0.95),
        "forward_latency_ms_p50_bucket": m1.histogram_quantile_ms(&m0, "tianwang_forward_latency_seconds", 0.5),
        "forward_latency_ms_p99_bucket": m1.histogram_quantile_ms(&m0, "tianwang_forward_latency_seconds", 0.99),
        "recording": args.record,
        "recordings_active": m1.get("tianwang_recordings_active"),
        "recorded_segments_per_s": (m1.get("tianwang_recorded_segments_total")
            - m0.get("tianwang_recorded_segments_total")) / secs,
        "recorded_mbit_s": (m1.get("tianwang_recorded_bytes_total")
            - m0.get("tianwang_recorded_bytes_total")) * 8.0 / secs / 1e6,
        "recording_errors": m1.get("tianwang_recording_errors_total")
            - m0.get("tianwang_recording_errors_total"),
        "hub_disk_write_mbyte_s": disk as f64 / secs / 1e6,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
