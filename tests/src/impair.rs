//! The impairment matrix: one real unit (`field-agent run`, a 2 Mbit/s noise picture, its
//! spool on) reaches a real hub through the impairing relay; a viewer watches on the hub
//! directly. Per condition it reports the live glass-to-viewer delay, the share of the
//! encoded frames the viewer got live, the time the live picture stood still, and the
//! recording's completeness after backfill: the frames the device encoded (read from its
//! spool, which keeps every encoded group) found in the hub's recording (read back from
//! the recorded files by ffprobe), by capture time.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tianwang_proto::v1::TrackKind;
use tianwang_transport::Limits;

use crate::relay::{Impairment, UdpRelay};
use crate::{Agent, Hub, Subscriber, track_id, unix_now_us};

/// One row of the matrix.
#[derive(Clone, Debug)]
pub struct Condition {
    pub name: &'static str,
    pub impairment: Impairment,
    /// A blackout of this long, 3 s into the window.
    pub blackout: Option<Duration>,
    /// The measured window (the blackout included).
    pub window: Duration,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Figures {
    pub condition: String,
    pub frames_encoded: usize,
    pub live_delay_p50_ms: f64,
    pub live_delay_p95_ms: f64,
    /// Frames the viewer got live ÷ frames encoded, %.
    pub live_delivered_pct: f64,
    /// Seconds the live picture stood still (gaps over 200 ms between frames).
    pub stall_s: f64,
    /// Encoded frames in the hub's recording after backfill ÷ frames encoded, %.
    pub completeness_pct: f64,
}

const UNIT: &str = "imp-1";
const CONFIG: &str = "[quic]\nidle_timeout = \"3s\"\n[evidence]\nsegment_target = \"2s\"\n";

/// The matrix of issue "Nothing lost"; `quick` is the CI's short version.
pub fn matrix(quick: bool) -> Vec<Condition> {
    let ms = Duration::from_millis;
    let window = if quick { ms(12_000) } else { ms(30_000) };
    let c = |name, impairment, blackout: Option<u64>| Condition {
        name,
        impairment,
        blackout: blackout.map(Duration::from_secs),
        window: blackout.map_or(window, |b| window + Duration::from_secs(b)),
    };
    let loss = |p| Impairment {
        loss: p,
        ..Default::default()
    };
    if quick {
        return vec![
            c("clean", Impairment::default(), None),
            c("2 % loss", loss(0.02), None),
            c("5 s blackout", Impairment::default(), Some(5)),
        ];
    }
    vec![
        c("clean", Impairment::default(), None),
        c("2 % loss", loss(0.02), None),
        c("10 % loss", loss(0.10), None),
        c(
            "200 ms RTT, 50 ms jitter",
            Impairment {
                delay: ms(100),
                jitter: ms(25),
                ..Default::default()
            },
            None,
        ),
        c(
            "1 Mbit/s cap on 2 Mbit/s",
            Impairment {
                rate_bps: 1_000_000,
                ..Default::default()
            },
            None,
        ),
        c("5 s blackout", Impairment::default(), Some(5)),
        c("30 s blackout", Impairment::default(), Some(30)),
        c("120 s blackout", Impairment::default(), Some(120)),
    ]
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs one condition from a fresh hub and agent in `dir`.
pub async fn run(dir: &Path, cond: &Condition) -> anyhow::Result<Figures> {
    let hub = Hub::start(dir, Some(CONFIG)).await?;
    let relay = UdpRelay::start(hub.quic).await?;
    let agent = Agent::start(
        &relay.addr.to_string(),
        &hub.ca(),
        UNIT,
        &hub.token("device", UNIT),
        dir,
        &[
            "--source",
            "noise",
            "--bitrate",
            "2000",
            "--keyframe-interval",
            "1",
        ],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(30), |v| {
        v == 1.0
    })
    .await?;
    let viewer = hub.token("viewer", "imp");
    let mut s = Subscriber::connect(hub.quic, &hub.trust(), &viewer, &Limits::default()).await?;
    let (sub, mut rx) = s.subscribe(UNIT, 4096).await?;
    let video = track_id(&sub, TrackKind::Video);
    // (capture µs, arrival µs) of every live video frame.
    let live: Arc<Mutex<Vec<(u64, u64)>>> = Arc::default();
    let seen = Arc::clone(&live);
    let watcher = tokio::spawn(async move {
        while let Some(f) = rx.next().await {
            if f.track_id == video {
                seen.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((f.frame.header.timestamp_us, unix_now_us()));
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;

    relay.set_impairment(cond.impairment);
    let from = unix_now_us();
    let started = Instant::now();
    if let Some(b) = cond.blackout {
        tokio::time::sleep(Duration::from_secs(3)).await;
        relay.set_blackout(true);
        tokio::time::sleep(b).await;
        relay.set_blackout(false);
    }
    tokio::time::sleep(cond.window.saturating_sub(started.elapsed())).await;
    let to = unix_now_us();
    relay.set_impairment(Impairment::default());

    // Backfill: until the spool has nothing unconfirmed from the window (bounded).
    let spool = dir.join(format!("agent-{UNIT}")).join("spool");
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline && undelivered_before(&spool, to)? > 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // SIGTERM: the agent completes the groups it is writing into its spool.
    drop(agent);
    watcher.abort();
    drop(s);
    let mut hub = hub;
    hub.stop();

    let encoded: Vec<u64> = spooled_video(&spool)?
        .into_iter()
        .filter(|t| (from..to).contains(t))
        .collect();
    let recorded = recorded_times(&hub, dir).await?;
    let live = live.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut in_window: Vec<(u64, u64)> = live
        .into_iter()
        .filter(|(ts, _)| (from..to).contains(ts))
        .collect();
    in_window.sort_by_key(|(_, arrived)| *arrived);
    let mut delays: Vec<f64> = in_window
        .iter()
        .map(|(ts, at)| at.saturating_sub(*ts) as f64 / 1000.0)
        .collect();
    delays.sort_by(f64::total_cmp);
    let mut stall = 0.0;
    let mut last = from;
    for (_, at) in &in_window {
        let gap = at.saturating_sub(last);
        if gap > 200_000 {
            stall += (gap - 33_333) as f64 / 1e6;
        }
        last = *at;
    }
    if to.saturating_sub(last) > 200_000 {
        stall += (to - last) as f64 / 1e6;
    }
    let missing: Vec<u64> = encoded
        .iter()
        .filter(|t| !near(&recorded, **t))
        .map(|t| (t - from) / 1000)
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "{}: {} encoded frames not recorded, at ms {:?}…",
            cond.name,
            missing.len(),
            &missing[..missing.len().min(40)]
        );
    }
    let share = |found: usize| 100.0 * found as f64 / encoded.len().max(1) as f64;
    let found = |set: &BTreeSet<u64>| encoded.iter().filter(|t| near(set, **t)).count();
    let live_set: BTreeSet<u64> = in_window.iter().map(|(ts, _)| *ts).collect();
    Ok(Figures {
        condition: cond.name.to_string(),
        frames_encoded: encoded.len(),
        live_delay_p50_ms: percentile(&delays, 0.5),
        live_delay_p95_ms: percentile(&delays, 0.95),
        live_delivered_pct: share(found(&live_set)),
        stall_s: stall,
        completeness_pct: share(found(&recorded)),
    })
}

/// Whether a capture time is in `set`, within 5 ms (recorded times are rebuilt from media
/// time, in 90 kHz ticks).
fn near(set: &BTreeSet<u64>, t: u64) -> bool {
    set.range(t.saturating_sub(5_000)..=t + 5_000)
        .next()
        .is_some()
}

/// Capture times (µs) of every video frame the spool holds, whatever its state.
pub fn spooled_video(spool: &Path) -> anyhow::Result<Vec<u64>> {
    crate::recorded::spooled_frames(spool, 0)
}

/// Spooled video groups not yet confirmed that begin before `before` (µs): the window's
/// last group too, or a frame of it missing from the recording would be the run ending
/// early rather than a frame lost. (Sound from before a recording's first picture is never
/// confirmed: see docs/evidence.md.)
fn undelivered_before(spool: &Path, before: u64) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(spool)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".grp") && n.split('-').nth(2) == Some("0"))
        .filter(|n| {
            n.split('-')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|s| s < before)
        })
        .count())
}

/// Capture times of every video frame in the hub's recordings of the unit: each recording's
/// files concatenated and read by ffprobe, its media time added to its start.
async fn recorded_times(hub: &Hub, dir: &Path) -> anyhow::Result<BTreeSet<u64>> {
    sqlx::any::install_default_drivers();
    let db = format!(
        "sqlite://{}?mode=ro",
        hub.dir.join("data/index.sqlite").display()
    );
    let pool = sqlx::AnyPool::connect(&db).await?;
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT recording, kind, path, start_us FROM segments WHERE unit = $1 AND kind != 'gap' ORDER BY seq",
    )
    .bind(UNIT)
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    let root = hub.dir.join("data/recordings");
    let mut by_recording: std::collections::BTreeMap<String, (i64, Vec<String>)> =
        Default::default();
    for (rec, kind, path, start) in rows {
        let e = by_recording.entry(rec).or_insert((start, Vec::new()));
        if kind == "init" {
            e.0 = start;
            e.1.insert(0, path);
        } else {
            e.1.push(path);
        }
    }
    let mut times = BTreeSet::new();
    for (rec, (start, paths)) in by_recording {
        let mut bytes = Vec::new();
        for p in &paths {
            bytes.extend(std::fs::read(root.join(p)).with_context(|| format!("reading {p}"))?);
        }
        let file = dir.join(format!("{rec}.mp4"));
        std::fs::write(&file, &bytes)?;
        let out = tokio::process::Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-select_streams",
                "v",
                "-show_entries",
                "packet=pts_time",
                "-of",
                "csv=p=0",
            ])
            .arg(&file)
            .output()
            .await
            .context("running ffprobe")?;
        let _ = std::fs::remove_file(&file);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Ok(pts) = line.trim().trim_end_matches(',').parse::<f64>() {
                times.insert((start as f64 + pts * 1e6).round() as u64);
            }
        }
    }
    Ok(times)
}

/// The matrix as a Markdown table.
pub fn table(rows: &[Figures]) -> String {
    let mut s = String::from(
        "| condition | frames encoded | live delay p50 / p95 (ms) | live frames delivered | stall (s) | recording complete after backfill |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {:.0} / {:.0} | {:.1} % | {:.1} | {:.2} % |\n",
            r.condition,
            r.frames_encoded,
            r.live_delay_p50_ms,
            r.live_delay_p95_ms,
            r.live_delivered_pct,
            r.stall_s,
            r.completeness_pct
        );
    }
    s
}
