//! The soak behind `scripts/soak`: a real hub (`hub serve`, recording on, its defaults)
//! under churn — `field-agent simulate` units connecting, publishing and leaving (every
//! other cycle killed outright while watched), consoles over WebSocket (with a WebRTC
//! PeerConnection) and gRPC opening sessions and tiles and leaving (half of them without a
//! goodbye), QUIC subscribers in this process and `hub watch` processes (some killed) —
//! while the hub's resident memory, open file descriptors, threads and live tokio tasks
//! (`tianwang_tasks_alive`) are sampled from /proc and /metrics. Prints a Markdown section
//! on stdout (progress on stderr).
//!
//!   target/release/soak [--minutes M] [--short] [--units N] [--consoles N] [--grpc N]
//!                       [--subscribers N]
//!
//! The baseline is taken after one warm-up cycle, once the hub has settled (no session, unit
//! or subscription left, tasks and fds steady); the end figures after the churn has stopped
//! and the hub has settled again (bounded). Exits non-zero when fds or tasks do not come
//! back to the baseline (see the tolerances below), when resident memory stays more than
//! [`RSS_GROWTH_MIB`] above it, or when the churn exercised nothing (no live tile, no
//! frame): `--short` (60 s of churn) is the check CI runs.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tianwang_proto::v1::console_client::ConsoleClient;
use tianwang_proto::v1::session_event::Kind as Event;
use tianwang_proto::v1::session_request::Kind as Request;
use tianwang_proto::v1::tile_state::State;
use tianwang_proto::v1::{AddTile, ListUnitsRequest, Ping, RemoveTile, SessionRequest};
use tianwang_tests::console::Console;
use tianwang_tests::tree::authed;
use tianwang_tests::{Hub, Metrics, Simulator, Subscriber, bin, peak_rss_mib};
use tianwang_transport::{Limits, Trust};

/// Open fds may differ from the baseline by this much. The hub's SQLite pool is one
/// connection and every socket, recording file and peer belongs to a session, so after the
/// sessions are gone the count is exact; 2 leaves room for one connection being accepted
/// or closed at the moment of sampling (the sampler's own /metrics request, a late QUIC
/// close), never for a leak that grows with the churn.
const FD_TOLERANCE: i64 = 2;
/// Live tasks may exceed the baseline by this much: the /metrics request that reads the
/// count is itself served by a task, and the previous scrape's connection task may not have
/// ended yet. Every per-session task (pumps, send_track, recorders, drivers) is gone once
/// its session is, so anything above this grows with the churn.
const TASK_TOLERANCE: i64 = 3;
/// Resident memory may end this far above the baseline. glibc's malloc keeps freed memory
/// in per-thread arenas (up to 8 per core) and returns it lazily, so the first sessions
/// raise RSS by an amount that then stops growing: 10–11 MiB after the short run here,
/// 14 MiB after 10 minutes (release and debug builds, 2 cores). 32 MiB is three times the
/// short run's: over its ~110 sessions it trips at ~200 KiB kept per session; smaller
/// leaks show as the long run's second-half slope.
const RSS_GROWTH_MIB: f64 = 32.0;
/// How long the hub may take to settle: a killed agent is noticed after the QUIC idle
/// timeout (10 s), then its recorder closes its segments.
const SETTLE: Duration = Duration::from_secs(90);

struct Args {
    seconds: u64,
    short: bool,
    units: usize,
    consoles: usize,
    grpc: usize,
    subscribers: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        seconds: 30 * 60,
        short: false,
        units: 3,
        consoles: 2,
        grpc: 2,
        subscribers: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--short" {
            a.short = true;
            a.seconds = 60;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let count = || {
            value
                .parse::<usize>()
                .with_context(|| format!("{flag} {value}"))
        };
        match flag.as_str() {
            "--minutes" => {
                let m: f64 = value
                    .parse()
                    .with_context(|| format!("--minutes {value}"))?;
                a.seconds = (m * 60.0).round() as u64;
            }
            "--units" => a.units = count()?.max(1),
            "--consoles" => a.consoles = count()?,
            "--grpc" => a.grpc = count()?,
            "--subscribers" => a.subscribers = count()?,
            other => bail!(
                "unknown flag {other} (--minutes, --short, --units, --consoles, --grpc, --subscribers)"
            ),
        }
    }
    Ok(a)
}

/// What the churn did, counted by the clients.
#[derive(Default)]
struct Tally {
    cycles: AtomicU64,
    agent_runs: AtomicU64,
    agents_killed: AtomicU64,
    ws_sessions: AtomicU64,
    ws_live_tiles: AtomicU64,
    ws_abandoned: AtomicU64,
    grpc_sessions: AtomicU64,
    grpc_offers: AtomicU64,
    quic_subscribers: AtomicU64,
    quic_frames: AtomicU64,
    watch_runs: AtomicU64,
    watch_killed: AtomicU64,
    failures: AtomicU64,
    first_failures: Mutex<Vec<String>>,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Tally {
    /// A client that failed is reported, not fatal: an agent killed under a viewer makes
    /// some fail by design. The checks are about what the hub keeps afterwards.
    fn failed(&self, what: &str, e: &anyhow::Error) {
        inc(&self.failures);
        let mut first = self
            .first_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if first.len() < 5 {
            first.push(format!("{what}: {e:#}"));
        }
        eprintln!("soak: {what}: {e:#}");
    }
}

struct Ctx {
    http: SocketAddr,
    quic: SocketAddr,
    ca: PathBuf,
    trust: Trust,
    commander: String,
    viewer: String,
    hub_bin: PathBuf,
    hold: Duration,
    tally: Tally,
}

/// One reading of the hub process.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    /// Seconds since the churn began (negative before).
    at: f64,
    rss_mib: f64,
    /// The anonymous part of it (heap, stacks): what a leak grows. The rest is file pages
    /// (the binary's code as it is touched, SQLite's mapped WAL index).
    anon_mib: f64,
    fds: i64,
    threads: i64,
    tasks: i64,
}

fn status_field(status: &str, name: &str) -> Option<i64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

async fn metrics(http: SocketAddr) -> anyhow::Result<Metrics> {
    let text = reqwest::get(format!("http://{http}/metrics"))
        .await
        .context("GET /metrics")?
        .text()
        .await
        .context("reading /metrics")?;
    Ok(Metrics::parse(&text))
}

async fn sample(http: SocketAddr, pid: u32, t0: Instant) -> anyhow::Result<(Sample, Metrics)> {
    let m = metrics(http).await?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (has the hub exited?)"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("listing /proc/{pid}/fd"))?
        .count();
    let s = Sample {
        at: t0.elapsed().as_secs_f64(),
        rss_mib: status_field(&status, "VmRSS:").unwrap_or(0) as f64 / 1024.0,
        anon_mib: status_field(&status, "RssAnon:").unwrap_or(0) as f64 / 1024.0,
        fds: fds as i64,
        threads: status_field(&status, "Threads:").unwrap_or(0),
        tasks: m.get("tianwang_tasks_alive") as i64,
    };
    Ok((s, m))
}

/// Sessions, units and subscriptions the hub still holds.
fn leftovers(m: &Metrics) -> f64 {
    [
        "tianwang_units_online",
        "tianwang_console_sessions",
        "tianwang_webrtc_peers",
        "tianwang_webrtc_tiles",
        "tianwang_subscribers",
        "tianwang_recordings_active",
    ]
    .iter()
    .map(|n| m.get(n))
    .sum()
}

struct Settled {
    sample: Sample,
    seconds: f64,
    /// No session, unit or subscription left.
    quiet: bool,
}

/// Waits (bounded) until the hub holds nothing of the churn: without a baseline, until
/// tasks and fds have been steady for three readings a second apart; with one, until they
/// are back within the tolerances (or the time is up: the caller judges the last reading).
async fn settle(
    http: SocketAddr,
    pid: u32,
    t0: Instant,
    baseline: Option<&Sample>,
) -> anyhow::Result<Settled> {
    let started = Instant::now();
    let mut steady = 0;
    let mut last: Option<Sample> = None;
    loop {
        let (s, m) = sample(http, pid, t0).await?;
        let quiet = leftovers(&m) == 0.0;
        let done = quiet
            && match baseline {
                Some(b) => s.fds - b.fds <= FD_TOLERANCE && s.tasks - b.tasks <= TASK_TOLERANCE,
                None => {
                    steady = match last {
                        Some(l) if l.fds == s.fds && l.tasks == s.tasks => steady + 1,
                        _ => 0,
                    };
                    steady >= 2
                }
            };
        if done || started.elapsed() > SETTLE {
            return Ok(Settled {
                sample: s,
                seconds: started.elapsed().as_secs_f64(),
                quiet,
            });
        }
        last = Some(s);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Reads a console's events (answering offers, passing candidates) until `until`.
async fn pump(console: &mut Console, until: tokio::time::Instant) -> anyhow::Result<()> {
    loop {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        match console.next(left).await {
            Ok(Some(_)) => {}
            Ok(None) => bail!("the hub closed the console session"),
            // `next` fails with a timeout at the deadline: the hold is over.
            Err(_) if tokio::time::Instant::now() >= until => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

async fn ws_console(ctx: Arc<Ctx>, unit: String, abrupt: bool) -> anyhow::Result<()> {
    let mut c = Console::connect(ctx.http).await?;
    c.with_media().await?;
    c.auth(&ctx.commander).await?;
    inc(&ctx.tally.ws_sessions);
    let until = tokio::time::Instant::now() + ctx.hold;
    c.add_tile("t1", &unit).await?;
    // A tile whose unit was killed a moment ago may never come live: counted, not failed.
    if c.tile("t1", State::Live, ctx.hold).await.is_ok() {
        inc(&ctx.tally.ws_live_tiles);
    }
    pump(&mut c, until).await?;
    if abrupt {
        inc(&ctx.tally.ws_abandoned);
        c.abandon().await;
    } else {
        c.send(serde_json::json!({"removeTile": {"tileId": "t1"}}))
            .await?;
        pump(
            &mut c,
            tokio::time::Instant::now() + Duration::from_millis(300),
        )
        .await?;
        c.close().await;
    }
    Ok(())
}

/// A gRPC console: lists units, opens a session, adds a tile and takes the hub's offer. It
/// has no WebRTC, so it never answers; it leaves by ending its request stream (or, abrupt,
/// by dropping the call: an HTTP/2 reset).
async fn grpc_console(ctx: Arc<Ctx>, unit: String, abrupt: bool) -> anyhow::Result<()> {
    let mut client = ConsoleClient::connect(format!("http://{}", ctx.http))
        .await
        .context("gRPC connect")?;
    client
        .list_units(authed(&ctx.commander, ListUnitsRequest {}))
        .await
        .context("ListUnits")?;
    let (tx, rx) = tokio::sync::mpsc::channel::<SessionRequest>(8);
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let request = |kind| SessionRequest { kind: Some(kind) };
    tx.send(request(Request::Ping(Ping { nonce: 1 }))).await?;
    tx.send(request(Request::AddTile(AddTile {
        tile_id: "g1".into(),
        unit_id: unit,
    })))
    .await?;
    let mut events = client
        .session(authed(&ctx.commander, requests))
        .await
        .context("Session")?
        .into_inner();
    inc(&ctx.tally.grpc_sessions);
    let until = tokio::time::Instant::now() + ctx.hold;
    let mut offered = false;
    while let Ok(event) = tokio::time::timeout_at(until, events.message()).await {
        match event.context("gRPC session")? {
            Some(e) if matches!(e.kind, Some(Event::Offer(_))) && !offered => {
                offered = true;
                inc(&ctx.tally.grpc_offers);
            }
            Some(_) => {}
            None => bail!("the hub ended the gRPC session"),
        }
    }
    if !abrupt {
        tx.send(request(Request::RemoveTile(RemoveTile {
            tile_id: "g1".into(),
        })))
        .await?;
        drop(tx);
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Ok(Some(_))) = tokio::time::timeout_at(until, events.message()).await {}
    }
    Ok(())
}

async fn quic_subscriber(ctx: Arc<Ctx>, unit: String, abrupt: bool) -> anyhow::Result<()> {
    let mut s = Subscriber::connect(ctx.quic, &ctx.trust, &ctx.viewer, &Limits::default()).await?;
    inc(&ctx.tally.quic_subscribers);
    let (_, mut rx) = s.subscribe(&unit, 64).await?;
    let until = tokio::time::Instant::now() + ctx.hold;
    while let Ok(Some(_)) = tokio::time::timeout_at(until, rx.next()).await {
        inc(&ctx.tally.quic_frames);
    }
    if !abrupt {
        s.conn.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), s.endpoint.wait_idle()).await;
    }
    Ok(())
}

/// A `hub watch` process; `kill`: SIGKILL half-way (its connection just stops).
async fn watch(ctx: Arc<Ctx>, unit: String, kill: bool) -> anyhow::Result<()> {
    let mut child = tokio::process::Command::new(&ctx.hub_bin)
        .args([
            "watch",
            "--json",
            "--unit",
            &unit,
            "--hub",
            &ctx.quic.to_string(),
        ])
        .arg("--ca")
        .arg(&ctx.ca)
        .arg("--duration")
        .arg(ctx.hold.as_secs_f64().to_string())
        // Not in argv, where any process on the machine could read it.
        .env("TIANWANG_TOKEN", &ctx.viewer)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting hub watch")?;
    if kill {
        tokio::time::sleep(ctx.hold / 2).await;
        child.start_kill().context("killing hub watch")?;
        child.wait().await.context("reaping hub watch")?;
        inc(&ctx.tally.watch_killed);
        return Ok(());
    }
    let out = tokio::time::timeout(ctx.hold + Duration::from_secs(20), child.wait_with_output())
        .await
        .context("hub watch did not end")?
        .context("hub watch")?;
    if !out.status.success() {
        bail!(
            "hub watch exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    inc(&ctx.tally.watch_runs);
    Ok(())
}

/// One cycle: the units come online, every kind of client arrives, watches for `hold` and
/// leaves (half abruptly); in odd cycles the agent is killed (SIGKILL) half-way through,
/// under its viewers, in even ones it is stopped (SIGTERM) after they left.
async fn cycle(ctx: &Arc<Ctx>, hub: &Hub, args: &Args, tokens: &std::path::Path, i: u64) {
    let tally = &ctx.tally;
    inc(&tally.cycles);
    let sim = match Simulator::start(
        hub,
        args.units,
        tokens,
        // Low bitrate: the recorder writes every unit; a spool, so a killed unit backfills.
        &["--bitrate", "300", "--spool-mib", "8"],
    ) {
        Ok(s) => s,
        Err(e) => return tally.failed("field-agent simulate", &e),
    };
    inc(&tally.agent_runs);
    if let Err(e) = hub
        .wait_metric("tianwang_units_online", Duration::from_secs(30), |v| {
            v >= args.units as f64
        })
        .await
    {
        tally.failed("units online", &e);
    }
    let unit = |n: usize| format!("sim-{}", 1 + n % args.units);
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..args.consoles {
        let abrupt = (i as usize + c) % 2 == 1;
        let run = ws_console(Arc::clone(ctx), unit(c), abrupt);
        clients.spawn(async move { ("WebSocket console", run.await) });
    }
    for c in 0..args.grpc {
        let abrupt = (i as usize + c).is_multiple_of(2);
        let run = grpc_console(Arc::clone(ctx), unit(c + 1), abrupt);
        clients.spawn(async move { ("gRPC console", run.await) });
    }
    for c in 0..args.subscribers {
        let abrupt = (i as usize + c).is_multiple_of(2);
        let run = quic_subscriber(Arc::clone(ctx), unit(c + 2), abrupt);
        clients.spawn(async move { ("QUIC subscriber", run.await) });
    }
    let run = watch(Arc::clone(ctx), unit(0), i % 4 == 3);
    clients.spawn(async move { ("hub watch", run.await) });

    if i % 2 == 1 {
        tokio::time::sleep(ctx.hold / 2).await;
        if let Ok(pid) = i32::try_from(sim.pid()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            inc(&tally.agents_killed);
        }
    }
    let deadline = tokio::time::Instant::now() + ctx.hold + Duration::from_secs(40);
    loop {
        match tokio::time::timeout_at(deadline, clients.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok((_, Ok(()))))) => {}
            Ok(Some(Ok((what, Err(e))))) => tally.failed(what, &e),
            Ok(Some(Err(e))) => tally.failed("client task", &e.into()),
            Err(_) => {
                tally.failed("clients", &anyhow::anyhow!("still running after the cycle"));
                clients.abort_all();
                break;
            }
        }
    }
    // SIGTERM, or reaping the killed one.
    drop(sim);
}

/// Least-squares slope of a memory figure over time, in MiB per hour.
fn slope_per_hour(samples: &[Sample], mib: fn(&Sample) -> f64) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let mt = samples.iter().map(|s| s.at).sum::<f64>() / n;
    let my = samples.iter().map(mib).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for s in samples {
        num += (s.at - mt) * (mib(s) - my);
        den += (s.at - mt) * (s.at - mt);
    }
    if den == 0.0 {
        return f64::NAN;
    }
    num / den * 3600.0
}

fn profile() -> &'static str {
    let exe = std::env::current_exe().unwrap_or_default();
    if exe.components().any(|c| c.as_os_str() == "release") {
        "release"
    } else {
        "debug"
    }
}

fn date() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let dir = tempfile::Builder::new()
        .prefix("tianwang-soak-")
        .tempdir()
        .context("making the soak's directory")?;
    let mut hub = Hub::start(dir.path(), None).await?;
    let pid = hub.pid().context("hub pid")?;
    let tokens = hub.fleet("sim-", args.units);
    let ctx = Arc::new(Ctx {
        http: hub.http,
        quic: hub.quic,
        ca: hub.ca(),
        trust: hub.trust(),
        commander: hub.token("commander", "soak-console"),
        viewer: hub.token("viewer", "soak-viewer"),
        hub_bin: bin("hub"),
        hold: Duration::from_secs(4),
        tally: Tally::default(),
    });
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().next().unwrap_or("?").to_string();

    // Warm-up: every path once (an odd cycle kills its agent), so what is made once per
    // process (pools, caches, the runtime's threads) is in the baseline.
    eprintln!("soak: warm-up cycle");
    let warm = Instant::now();
    cycle(&ctx, &hub, &args, &tokens, 1).await;
    let base = settle(ctx.http, pid, warm, None).await?;
    let baseline = base.sample;
    eprintln!(
        "soak: baseline after {:.0} s to settle: {baseline:?}",
        base.seconds
    );

    let t0 = Instant::now();
    let samples = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_secs(if args.short { 2 } else { 5 });
    let sampler = {
        let (samples, stop, http) = (Arc::clone(&samples), Arc::clone(&stop), ctx.http);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match sample(http, pid, t0).await {
                    Ok((s, _)) => samples.lock().unwrap_or_else(|e| e.into_inner()).push(s),
                    Err(e) => eprintln!("soak: sample: {e:#}"),
                }
                tokio::time::sleep(every).await;
            }
        })
    };
    let mut i = 2;
    while t0.elapsed() < Duration::from_secs(args.seconds) {
        cycle(&ctx, &hub, &args, &tokens, i).await;
        if i % 10 == 0 {
            eprintln!("soak: {i} cycles, {:.0} s", t0.elapsed().as_secs_f64());
        }
        i += 1;
    }
    let churn = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let end = settle(ctx.http, pid, t0, Some(&baseline)).await?;
    let peak = peak_rss_mib(pid).unwrap_or(f64::NAN);
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|e| e.into_inner()));
    let slope = slope_per_hour(&samples, |s| s.rss_mib);
    // The first minutes hold the allocator's and caches' ramp; a leak keeps its slope in
    // the second half too.
    let second_half = &samples[samples.len() / 2..];
    let late = slope_per_hour(second_half, |s| s.rss_mib);
    let late_anon = slope_per_hour(second_half, |s| s.anon_mib);
    let running = hub.is_running();
    hub.stop();

    let e = end.sample;
    let t = &ctx.tally;
    let mut failed = Vec::new();
    if !running {
        failed.push("the hub exited during the soak".to_string());
    }
    if !end.quiet {
        failed.push(format!(
            "sessions, units or subscriptions still held {:.0} s after the churn",
            end.seconds
        ));
    }
    if (e.fds - baseline.fds).abs() > FD_TOLERANCE {
        failed.push(format!(
            "open fds {} → {} (±{FD_TOLERANCE} allowed)",
            baseline.fds, e.fds
        ));
    }
    if e.tasks - baseline.tasks > TASK_TOLERANCE {
        failed.push(format!(
            "tasks {} → {} (+{TASK_TOLERANCE} allowed)",
            baseline.tasks, e.tasks
        ));
    }
    if e.rss_mib - baseline.rss_mib > RSS_GROWTH_MIB {
        failed.push(format!(
            "resident memory {:.1} → {:.1} MiB (+{RSS_GROWTH_MIB} allowed)",
            baseline.rss_mib, e.rss_mib
        ));
    }
    if get(&t.ws_live_tiles) == 0 || get(&t.quic_frames) == 0 || get(&t.grpc_offers) == 0 {
        failed.push("the churn exercised nothing: no live tile, frame or gRPC offer".into());
    }

    let mut md = String::new();
    let run = if args.short {
        "scripts/soak --short".to_string()
    } else {
        format!("scripts/soak --minutes {}", args.seconds as f64 / 60.0)
    };
    writeln!(
        md,
        "## Soak: sessions come and go, the hub keeps nothing\n\n\
         `{run}`, {}, {} build, {} cores (load average {load} at the start, shared with \
         other work). {:.0} s of churn in {} cycles of {:.0} s: each cycle starts `field-agent \
         simulate` with {} units (recording on, spool on), then {} WebSocket consoles with a \
         WebRTC peer open a tile, {} gRPC consoles open a session with a tile (and never \
         answer the offer), {} QUIC subscribers and one `hub watch` process watch a unit for \
         {:.0} s; half of the clients leave without a goodbye (WebSocket dropped, HTTP/2 \
         reset, `hub watch` killed every fourth cycle), and every other cycle the agent is \
         killed (SIGKILL) half-way, under its viewers.\n",
        date(),
        profile(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        churn,
        get(&t.cycles) - 1,
        churn / (get(&t.cycles) - 1).max(1) as f64,
        args.units,
        args.consoles,
        args.grpc,
        args.subscribers,
        ctx.hold.as_secs_f64(),
    )?;
    writeln!(
        md,
        "| hub process | baseline (after a warm-up cycle) | after the churn (settled in {:.0} s) | allowed |\n\
         |---|---:|---:|---|\n\
         | resident memory (VmRSS) | {:.1} MiB | {:.1} MiB | +{RSS_GROWTH_MIB:.0} MiB |\n\
         | of which anonymous (RssAnon) | {:.1} MiB | {:.1} MiB | (reported) |\n\
         | open file descriptors | {} | {} | ±{FD_TOLERANCE} |\n\
         | live tokio tasks (`tianwang_tasks_alive`) | {} | {} | +{TASK_TOLERANCE} |\n\
         | OS threads | {} | {} | (reported) |\n",
        end.seconds,
        baseline.rss_mib,
        e.rss_mib,
        baseline.anon_mib,
        e.anon_mib,
        baseline.fds,
        e.fds,
        baseline.tasks,
        e.tasks,
        baseline.threads,
        e.threads,
    )?;
    let max = |f: fn(&Sample) -> i64| samples.iter().map(f).max().unwrap_or(0);
    writeln!(
        md,
        "Resident memory during the churn: slope {slope:+.1} MiB/hour (least squares over {} \
         samples, {:.0} s apart), {late:+.1} MiB/hour over its second half ({late_anon:+.1} \
         MiB/hour anonymous); peak {peak:.1} MiB (VmHWM). Most during the churn: {} fds, {} tasks, {} threads.\n",
        samples.len(),
        every.as_secs_f64(),
        max(|s| s.fds),
        max(|s| s.tasks),
        max(|s| s.threads),
    )?;
    writeln!(
        md,
        "The churn: {} agent runs ({} killed), {} WebSocket console sessions ({} tiles \
         live, {} dropped without a close), {} gRPC sessions ({} offers), {} QUIC \
         subscribers ({} frames), {} `hub watch` runs to the end and {} killed; {} client \
         failures.\n",
        get(&t.agent_runs),
        get(&t.agents_killed),
        get(&t.ws_sessions),
        get(&t.ws_live_tiles),
        get(&t.ws_abandoned),
        get(&t.grpc_sessions),
        get(&t.grpc_offers),
        get(&t.quic_subscribers),
        get(&t.quic_frames),
        get(&t.watch_runs),
        get(&t.watch_killed),
        get(&t.failures),
    )?;
    for f in t
        .first_failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
    {
        writeln!(md, "- a client failure: `{f}`")?;
    }
    if get(&t.failures) > 0 {
        writeln!(md)?;
    }
    if failed.is_empty() {
        writeln!(md, "Result: **pass** — fds and tasks back to the baseline.")?;
    } else {
        writeln!(md, "Result: **FAIL** — {}.", failed.join("; "))?;
    }
    print!("{md}");
    if !failed.is_empty() {
        let kept = dir.keep();
        bail!(
            "soak failed: {}; hub log and data kept in {}",
            failed.join("; "),
            kept.display()
        );
    }
    Ok(())
}
