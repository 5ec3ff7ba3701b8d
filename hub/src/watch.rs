//! `hub watch`: subscribe to a unit over QUIC, write its video as an H.264 Annex-B file and
//! report what arrived (frames, keyframes, first-frame delay, end-to-end delay).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Serialize;
use tianwang_proto::v1::{Hello, Role as WireRole, TrackKind};
use tianwang_transport::client::{self, LiveOrder, TrackReceiver};
use tianwang_transport::{Limits, Trust};
use tokio::io::AsyncWriteExt;

pub struct WatchOptions {
    pub hub: String,
    pub token: String,
    pub unit: String,
    /// Stop after this long; `None`: until the stream ends or Ctrl-C.
    pub duration: Option<Duration>,
    pub out: Option<PathBuf>,
    pub trust: Trust,
}

#[derive(Debug, Default, Serialize)]
pub struct WatchReport {
    pub unit: String,
    pub video_frames: u64,
    pub keyframes: u64,
    pub audio_frames: u64,
    pub groups: u64,
    pub bytes: u64,
    /// From sending Subscribe to the first video frame.
    pub first_frame_ms: Option<f64>,
    /// Capture (device clock) to arrival (this clock); meaningful when both clocks agree.
    pub delay_p50_ms: Option<f64>,
    pub delay_p99_ms: Option<f64>,
    /// Frames that arrived after a newer group had started (not written).
    pub late_frames: u64,
    pub groups_reset: u64,
}

fn unix_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

pub async fn watch(opts: WatchOptions) -> anyhow::Result<WatchReport> {
    let target = tianwang_transport::endpoint::resolve(&opts.hub).await?;
    let endpoint =
        tianwang_transport::client_endpoint(&opts.trust, &Limits::default(), target.is_ipv6())?;
    let conn = tianwang_transport::connect(&endpoint, &opts.hub).await?;
    let hello = Hello {
        role: WireRole::Subscriber as i32,
        token: opts.token.clone(),
        ..Default::default()
    };
    let timeout = Duration::from_secs(10);
    let (mut control, _welcome) = client::hello(&conn, hello, timeout)
        .await
        .with_context(|| format!("joining hub {}", opts.hub))?;
    let asked = Instant::now();
    let subscribed = client::subscribe(&mut control, 1, &opts.unit, &[], timeout)
        .await
        .with_context(|| format!("subscribing to {}", opts.unit))?;
    let video = subscribed
        .tracks
        .iter()
        .find(|t| t.kind() == TrackKind::Video)
        .map(|t| t.id);
    let audio = subscribed
        .tracks
        .iter()
        .find(|t| t.kind() == TrackKind::Audio)
        .map(|t| t.id);
    if video.is_none() && opts.out.is_some() {
        bail!("unit {} has no video track", opts.unit);
    }
    let mut file = match &opts.out {
        Some(p) => Some(tokio::io::BufWriter::new(
            tokio::fs::File::create(p)
                .await
                .with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };

    let mut receiver = TrackReceiver::spawn(
        conn.clone(),
        tianwang_proto::wire::DEFAULT_MAX_FRAME,
        256,
        Some(0),
    );
    let mut order = LiveOrder::default();
    let mut report = WatchReport {
        unit: opts.unit.clone(),
        ..Default::default()
    };
    let mut delays = Vec::new();
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let sleep = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep);
    loop {
        let frame = tokio::select! {
            f = receiver.next() => match f {
                Some(f) => f,
                None => break,
            },
            _ = &mut sleep => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        if !order.accept(&frame) {
            report.late_frames += 1;
            continue;
        }
        if Some(frame.track_id) == video {
            if report.first_frame_ms.is_none() {
                report.first_frame_ms = Some(asked.elapsed().as_secs_f64() * 1000.0);
            }
            report.video_frames += 1;
            if frame.index == 0 {
                report.keyframes += 1;
                report.groups += 1;
            }
            let payload = frame.frame.payload();
            report.bytes += payload.len() as u64;
            if let Some(f) = file.as_mut() {
                f.write_all(payload)
                    .await
                    .context("writing the output file")?;
            }
            let delay_us = unix_us() - frame.frame.header.timestamp_us as i64;
            delays.push(delay_us as f64 / 1000.0);
        } else if Some(frame.track_id) == audio {
            report.audio_frames += 1;
        }
    }
    if let Some(mut f) = file {
        f.flush().await.context("writing the output file")?;
    }
    report.groups_reset = receiver
        .stats()
        .groups_reset
        .load(std::sync::atomic::Ordering::Relaxed);
    delays.sort_by(|a, b| a.total_cmp(b));
    report.delay_p50_ms = percentile(&delays, 0.50);
    report.delay_p99_ms = percentile(&delays, 0.99);
    client::close(&conn, Some(&mut control), "done watching").await;
    endpoint.wait_idle().await;
    Ok(report)
}
