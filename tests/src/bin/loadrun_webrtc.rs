//! A WebRTC load run: `hub serve` + `field-agent simulate` (U units) + C consoles in Rust
//! (WebSocket session, webrtc-rs PeerConnection), each showing T tiles. Reports hub CPU and
//! peak RSS, forwarded Mbit/s, received Mbit/s, time to first RTP packet of a new tile, the
//! hub's forwarding latency, and capture → viewer delay (the units stamp each frame's capture
//! time into the bitstream, `field-agent simulate --stamp`). Run in release:
//!
//!   cargo run --release -p tianwang-tests --bin loadrun-webrtc -- --units 16 --consoles 4 --tiles 16

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tianwang_tests::console::Console;
use tianwang_tests::*;

struct Args {
    units: usize,
    consoles: usize,
    tiles: usize,
    duration: u64,
    late: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        units: 1,
        consoles: 10,
        tiles: 1,
        duration: 15,
        late: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--units" => a.units = value.parse()?,
            "--consoles" => a.consoles = value.parse()?,
            "--tiles" => a.tiles = value.parse()?,
            "--duration" => a.duration = value.parse()?,
            "--late" => a.late = value == "1" || value == "true",
            other => {
                bail!("unknown flag {other} (--units, --consoles, --tiles, --duration, --late 0|1)")
            }
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(
        tmp.path(),
        Some(&format!("[console]\nmax_tiles = {}\n", args.tiles + 1)),
    )
    .await?;
    let tokens = hub.fleet("sim-", args.units);
    let _sim = Simulator::start(&hub, args.units, &tokens, &["--stamp"])?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(60), |v| {
        v == args.units as f64
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let token = hub.token("commander", "loadrun");
    let pid = hub.pid().context("hub pid")?;

    // Open every console and its tiles; each session is driven by its own task, which
    // reports how long each tile took from AddTile to its first RTP packet.
    // (late, ms): `late` for the tile each console adds once its connection is up.
    let (ttff_tx, mut ttff_rx) = tokio::sync::mpsc::unbounded_channel::<(bool, u64)>();
    let mut tasks = tokio::task::JoinSet::new();
    let mut media = Vec::new();
    let mut delays = Vec::new();
    for c in 0..args.consoles {
        let mut console = Console::connect(hub.http).await?;
        console.with_media().await?;
        console.auth(&token).await?;
        media.push(console.media.clone());
        delays.push(console.delays.clone());
        let (units, tiles, ttff_tx) = (args.units, args.tiles, ttff_tx.clone());
        let mut late_added = !args.late;
        tasks.spawn(async move {
            let mut added = Vec::new();
            for t in 0..tiles {
                let unit = format!("sim-{}", (c * tiles + t) % units + 1);
                let tile = format!("t{t}");
                console.add_tile(&tile, &unit).await?;
                added.push((tile, Instant::now()));
            }
            // Read events (offers, candidates, stats) until every tile has media, then on,
            // so the session is never closed as unread.
            let stop = Instant::now() + Duration::from_secs(600);
            while Instant::now() < stop {
                let _ = console.next(Duration::from_millis(50)).await;
                added.retain(|(tile, at)| match console.media_of(tile).first_packet {
                    Some(first) => {
                        let us = first.saturating_duration_since(*at).as_micros() as u64;
                        let _ = ttff_tx.send((tile == "late", us));
                        false
                    }
                    None => true,
                });
                // Once the first tiles play, one more on the live connection: only a
                // renegotiation between it and its first frame.
                if added.is_empty() && !late_added {
                    late_added = true;
                    console
                        .add_tile("late", &format!("sim-{}", c % units + 1))
                        .await?;
                    added.push(("late".to_string(), Instant::now()));
                }
            }
            anyhow::Ok(())
        });
    }
    drop(ttff_tx);
    let (mut ttff, mut late) = (Vec::new(), Vec::new());
    let all = args.consoles * args.tiles;
    let late_tiles = if args.late { args.consoles } else { 0 };
    let collected = tokio::time::timeout(Duration::from_secs(90), async {
        while ttff.len() < all || late.len() < late_tiles {
            match ttff_rx.recv().await {
                Some((true, ms)) => late.push(ms),
                Some((false, ms)) => ttff.push(ms),
                None => break,
            }
        }
    })
    .await;
    if collected.is_err() || ttff.len() < all || late.len() < late_tiles {
        bail!(
            "only {} of {all} tiles (and {} late ones) got media",
            ttff.len(),
            late.len()
        );
    }
    let (ttff, late) = (sorted_ms(ttff), sorted_ms(late));
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Bytes of RTP the consoles received, over every tile.
    let received = || -> u64 {
        media
            .iter()
            .filter_map(|m| {
                m.lock()
                    .ok()
                    .map(|m| m.values().map(|t| t.bytes).sum::<u64>())
            })
            .sum()
    };
    let m0 = hub.metrics().await?;
    let cpu0 = cpu_seconds(pid).unwrap_or(0.0);
    let received0 = received();
    for d in &delays {
        d.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    let received_bytes = received() - received0;
    let m1 = hub.metrics().await?;
    let rss = peak_rss_mib(pid).unwrap_or(f64::NAN);
    tasks.abort_all();
    let delays = sorted_ms(
        delays
            .iter()
            .flat_map(|d| std::mem::take(&mut *d.lock().unwrap_or_else(|e| e.into_inner())))
            .collect(),
    );

    let tiles = args.consoles * (args.tiles + usize::from(args.late));
    let bytes_out = m1.get("tianwang_bytes_out_total") - m0.get("tianwang_bytes_out_total");
    let frames_out = m1.get("tianwang_frames_out_total") - m0.get("tianwang_frames_out_total");
    let bytes_in = m1.get("tianwang_bytes_in_total") - m0.get("tianwang_bytes_in_total");
    let report = serde_json::json!({
        "units": args.units,
        "consoles": args.consoles,
        "tiles_per_console": args.tiles,
        "subscribers": tiles,
        "seconds": secs,
        "relay_cpu_cores": cpu / secs,
        "relay_cpu_seconds": cpu,
        "cpu_ms_per_viewer_second": cpu * 1000.0 / (tiles as f64 * secs),
        "ingress_mbit_s": bytes_in * 8.0 / secs / 1e6,
        // Each tile asks for one unit's whole stream: tiles × the mean unit's rate.
        "offered_mbit_s": bytes_in / args.units as f64 * tiles as f64 * 8.0 / secs / 1e6,
        "delivered_mbit_s": received_bytes as f64 * 8.0 / secs / 1e6,
        "relay_peak_rss_mib": rss,
        "forwarded_mbit_s": bytes_out * 8.0 / secs / 1e6,
        "frames_out_per_s": frames_out / secs,
        "frames_dropped": m1.sum("tianwang_frames_dropped_total") - m0.sum("tianwang_frames_dropped_total"),
        "delay_ms_p50": percentile(&delays, 0.50),
        "delay_ms_p95": percentile(&delays, 0.95),
        "delay_ms_p99": percentile(&delays, 0.99),
        "delay_samples": delays.len(),
        "first_frame_ms_p50": percentile(&ttff, 0.5),
        "first_frame_ms_p95": percentile(&ttff, 0.95),
        "late_tile_first_frame_ms_p50": percentile(&late, 0.5),
        "late_tile_first_frame_ms_p95": percentile(&late, 0.95),
        "forward_latency_ms_p50_bucket": m1.histogram_quantile_ms(&m0, "tianwang_forward_latency_seconds", 0.5),
        "forward_latency_ms_p99_bucket": m1.histogram_quantile_ms(&m0, "tianwang_forward_latency_seconds", 0.99),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
