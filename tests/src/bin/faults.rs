//! `faults`: fault injection with figures. Each scenario runs real processes (`hub serve`,
//! `field-agent simulate` or `run` with its spool, PostgreSQL, a court tree, a console) on
//! loopback, injects one fault and measures what it cost: segments that verify
//! (`hub verify`), frames the unit captured against frames the recording holds before and
//! after backfill, and time to recover. Prints a Markdown section for `scripts/section`.
//!
//! Frames captured are read back from the unit's spool, which keeps every group it encoded
//! (256 MiB, far more than a run writes); a frame is recorded when a media row's capture
//! span holds it. Backfill comes as recordings of its own, every row written a second or more
//! after its capture: a recording with a row written within a second of its capture is live.
//!
//! Usage: faults [--runs N] [--seed S] [--only NAME[,NAME…]]
//!   scenarios: kill9 sigterm disk-full slow-disk database parent clock signalling

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tianwang_proto::v1::TrackKind;
use tianwang_proto::v1::session_event::Kind as Event;
use tianwang_proto::v1::tile_state::State;
use tianwang_tests::console::Console;
use tianwang_tests::recorded::{self, Row, Verified};
use tianwang_tests::*;
use tianwang_transport::Limits;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const UNIT: &str = "sim-1";
/// Short segments and a quick idle timeout, so a run is seconds, not minutes.
const FAST: &str = "[quic]\nidle_timeout = \"3s\"\n[evidence]\nsegment_target = \"1s\"\n";
/// A spool big enough to keep every group of a run; a group a second.
const SIM_ARGS: &[&str] = &["--spool-mib", "256", "--keyframe-interval", "1"];
const VIDEO: u32 = 0;
const SCENARIOS: &[&str] = &[
    "kill9",
    "sigterm",
    "disk-full",
    "slow-disk",
    "database",
    "parent",
    "clock",
    "signalling",
];

struct Options {
    runs: usize,
    seed: u64,
    only: Option<Vec<String>>,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        runs: 20,
        seed: unix_now_us(),
        only: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--runs" => o.runs = value()?.parse().context("--runs")?,
            "--seed" => o.seed = value()?.parse().context("--seed")?,
            "--only" => {
                let names: Vec<String> = value()?.split(',').map(str::to_string).collect();
                if let Some(bad) = names.iter().find(|n| !SCENARIOS.contains(&n.as_str())) {
                    bail!("unknown scenario {bad}; scenarios: {}", SCENARIOS.join(" "));
                }
                o.only = Some(names);
            }
            "-h" | "--help" => {
                println!(
                    "faults [--runs N] [--seed S] [--only NAME[,NAME…]]\nscenarios: {}",
                    SCENARIOS.join(" ")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(o)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let root = tempfile::Builder::new()
        .prefix("tianwang-faults-")
        .tempdir()
        .context("creating the work dir")?;
    let started = Instant::now();
    let mut body = String::new();
    for &name in SCENARIOS {
        if o.only
            .as_ref()
            .is_some_and(|only| !only.iter().any(|n| n == name))
        {
            continue;
        }
        eprintln!("faults: {name} …");
        let t = Instant::now();
        let dir = root.path().join(name);
        std::fs::create_dir_all(&dir).context("creating a scenario dir")?;
        let result = match name {
            "kill9" => kill9(&dir, o.runs, o.seed).await,
            "sigterm" => sigterm(&dir).await,
            "disk-full" => disk_full(&dir).await,
            "slow-disk" => slow_disk(&dir).await,
            "database" => database(&dir).await,
            "parent" => parent(&dir).await,
            "clock" => clock(&dir).await,
            _ => signalling(&dir).await,
        };
        let section = result.unwrap_or_else(|e| {
            format!(
                "### {name}\n\nNot measured: {}\n",
                first_chars(&format!("{e:#}"), 600)
            )
        });
        eprintln!("faults: {name} done in {:.0} s", t.elapsed().as_secs_f64());
        body.push_str(&section);
        body.push('\n');
    }
    let mut out = String::new();
    writeln!(out, "## Fault injection (`scripts/faults`)\n")?;
    writeln!(
        out,
        "Written by `scripts/faults` ({}; {} CPU(s), debug build, {:.0} s in all; kill -9 seed \
         {}, `--seed {}` repeats its moments). Real processes on loopback; the unit is \
         `field-agent simulate` (640x360, 30 fps, a keyframe a second, a 256 MiB spool) unless \
         said otherwise; the hub writes 1 s segments. **Captured** counts the video frames the \
         unit encoded in the scenario's window, read back from its spool; **recorded** those a \
         media row of the hub's index holds; *live* is before backfill (the live recordings \
         only: backfill comes as recordings of their own, each row written a second or more \
         after its capture), *after backfill* once the spool's groups came in.\n",
        date(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        started.elapsed().as_secs_f64(),
        o.seed,
        o.seed,
    )?;
    out.push_str(&body);
    print!("{out}");
    Ok(())
}

fn first_chars(s: &str, n: usize) -> String {
    let one_line = s.replace('\n', " ");
    match one_line.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &one_line[..i]),
        None => one_line,
    }
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn secs(us: i64) -> String {
    format!("{:.2} s", us as f64 / 1e6)
}

fn verdict(v: &Verified) -> String {
    if v.ok {
        format!("OK, {} segments", v.segments)
    } else {
        format!(
            "**FAIL** ({} problems of {} segments: {})",
            v.problems.len(),
            v.segments,
            first_chars(&v.problems.join("; "), 300)
        )
    }
}

/// A hub recording `units` simulated units (names `sim-N`), each with a spool.
async fn recording_hub(
    dir: &Path,
    config: &str,
    hub_env: &[(&str, &str)],
    sim_env: &[(&str, &str)],
) -> anyhow::Result<(Hub, Simulator)> {
    let hub = Hub::start_with_env(dir, Some(config), hub_env).await?;
    let tokens = hub.fleet("sim-", 1);
    let sim = Simulator::start_with_env(&hub, 1, &tokens, SIM_ARGS, sim_env)?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(60), |v| {
        v == 1.0
    })
    .await?;
    hub.wait_metric(
        "tianwang_recorded_segments_total",
        Duration::from_secs(60),
        |v| v >= 2.0,
    )
    .await?;
    Ok((hub, sim))
}

fn sim_spool(hub: &Hub) -> PathBuf {
    hub.dir.join("agents").join(UNIT).join("spool")
}

fn now_us() -> i64 {
    unix_now_us() as i64
}

async fn metric(hub: &Hub, name: &str) -> f64 {
    hub.metrics().await.map(|m| m.sum(name)).unwrap_or(f64::NAN)
}

/// The rows that are not backfill. Backfill is written as recordings of its own, each row
/// held at least a second after its capture; a live recording has rows written as they were
/// captured: a recording any of whose rows was written within `LIVE_LAG` of its capture is
/// live.
fn live_rows(rows: &[Row]) -> Vec<&Row> {
    let live: HashSet<&str> = rows
        .iter()
        .filter(|r| r.lag_us() < LIVE_LAG_US)
        .map(|r| r.recording.as_str())
        .collect();
    rows.iter()
        .filter(|r| live.contains(r.recording.as_str()))
        .collect()
}

/// See [`live_rows`].
const LIVE_LAG_US: i64 = 1_000_000;

/// Reads the unit's media rows every 250 ms until `done` says so or `limit` has passed: the
/// last rows read, and how long it took (none: not within the limit). A failed read (the
/// database coming back) is tried again.
async fn poll_rows(
    index: &str,
    unit: &str,
    limit: Duration,
    mut done: impl FnMut(&[Row]) -> bool,
) -> (Vec<Row>, Option<Duration>) {
    let t = Instant::now();
    let mut rows = Vec::new();
    loop {
        if let Ok(r) = recorded::media_rows(index, unit).await {
            rows = r;
            if done(&rows) {
                return (rows, Some(t.elapsed()));
            }
        }
        if t.elapsed() > limit {
            return (rows, None);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What an outage cost, over a window of capture time.
#[derive(Debug, Default, Clone, Copy)]
struct Loss {
    captured: usize,
    live: usize,
    after: usize,
    /// From the fault to the first live row written after it (µs), if any.
    recovered_us: Option<i64>,
}

impl Loss {
    fn lost_live(&self) -> usize {
        self.captured - self.live
    }
    fn lost_after(&self) -> usize {
        self.captured - self.after
    }
}

/// Waits until the window `[from, to)` lies 4 s in the past (its live segments closed) and
/// the recording holds every frame of it the spool has, or `timeout`; then accounts for it.
/// `since_us`: when recording could resume (rows written later tell the time to recover).
async fn settle(
    index: &str,
    spool: &Path,
    unit: &str,
    (from, to): (i64, i64),
    since_us: i64,
    timeout: Duration,
) -> anyhow::Result<Loss> {
    let wait = to + 4_000_000 - now_us();
    if wait > 0 {
        tokio::time::sleep(Duration::from_micros(wait as u64)).await;
    }
    let deadline = Instant::now() + timeout;
    loop {
        let frames = recorded::spooled_frames(spool, VIDEO)?;
        let rows = recorded::media_rows(index, unit).await?;
        let (captured, after) = recorded::covered(&frames, &rows, from, to);
        if after == captured || Instant::now() > deadline {
            let live = live_rows(&rows);
            let (_, live_held) = recorded::covered(&frames, live.iter().copied(), from, to);
            let recovered_us = live
                .iter()
                .filter(|r| r.recorded_us > since_us && r.end_us > since_us)
                .map(|r| r.recorded_us - since_us)
                .min();
            return Ok(Loss {
                captured,
                live: live_held,
                after,
                recovered_us,
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn loss_line(l: &Loss) -> String {
    format!(
        "{} frames captured; lost before backfill {}, after backfill {}",
        l.captured,
        l.lost_live(),
        l.lost_after()
    )
}

// ---------------------------------------------------------------------------------------
// kill -9

struct KillRun {
    wait_ms: u64,
    healthy_us: i64,
    loss: Loss,
    verified: Verified,
}

async fn kill9(dir: &Path, runs: usize, seed: u64) -> anyhow::Result<String> {
    let (mut hub, _sim) = recording_hub(dir, FAST, &[], &[]).await?;
    let index = recorded::sqlite_url(&hub.dir.join("data"));
    let spool = sim_spool(&hub);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for run in 1..=runs {
        // A random moment of recording: anywhere within a few segments.
        let wait_ms = rng.random_range(1_000..5_000);
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        let killed = now_us();
        hub.kill();
        let t = Instant::now();
        hub.start_again().await?;
        let healthy_us = t.elapsed().as_micros() as i64;
        let back = now_us();
        let loss = settle(
            &index,
            &spool,
            UNIT,
            (killed - 3_000_000, back + 2_000_000),
            killed,
            Duration::from_secs(20),
        )
        .await?;
        let verified = recorded::verify(&hub.dir.join("data"), &[])?;
        eprintln!(
            "faults: kill9 run {run}/{runs}: {}; verify {}",
            loss_line(&loss),
            verified.ok
        );
        out.push(KillRun {
            wait_ms,
            healthy_us,
            loss,
            verified,
        });
    }
    let rows = recorded::media_rows(&index, UNIT).await?;
    let last = out.last().map(|r| r.verified.clone());
    let mut s = String::new();
    writeln!(s, "### kill -9 of the hub while it records\n")?;
    writeln!(
        s,
        "{runs} runs on one hub and one unit: the hub is killed with SIGKILL at a random moment \
         (1–5 s after the previous run settled, seed {seed}), started again at once on the \
         same data, and the unit (never restarted) reconnects by itself. Window per run: 3 s \
         before the kill to 2 s after the restart.\n"
    )?;
    writeln!(
        s,
        "| run | moment | restart → healthy | kill → live row | captured | lost live | lost after backfill | hub verify |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|---|---|")?;
    for (i, r) in out.iter().enumerate() {
        writeln!(
            s,
            "| {} | {} ms | {} | {} | {} | {} | {} | {} |",
            i + 1,
            r.wait_ms,
            secs(r.healthy_us),
            r.loss.recovered_us.map_or("–".into(), secs),
            r.loss.captured,
            r.loss.lost_live(),
            r.loss.lost_after(),
            if r.verified.ok { "OK" } else { "FAIL" }
        )?;
    }
    let captured: usize = out.iter().map(|r| r.loss.captured).sum();
    let lost_live: usize = out.iter().map(|r| r.loss.lost_live()).sum();
    let lost_after: usize = out.iter().map(|r| r.loss.lost_after()).sum();
    let mut rec: Vec<f64> = out
        .iter()
        .filter_map(|r| r.loss.recovered_us)
        .map(|u| u as f64 / 1e6)
        .collect();
    rec.sort_by(f64::total_cmp);
    let failed = out.iter().filter(|r| !r.verified.ok).count();
    writeln!(
        s,
        "\n**Figure:** {runs} kills, {} media segments written in all; `hub verify` after each \
         restart: {} of {runs} OK{}; at the end: {}. Frames captured in the kill windows \
         {captured}: lost before backfill {lost_live} ({:.1} %), after backfill {lost_after}. \
         Kill → recording live again: median {:.2} s, max {:.2} s.\n",
        rows.len(),
        runs - failed,
        if failed > 0 {
            format!(" (**{failed} failed**)")
        } else {
            String::new()
        },
        last.as_ref().map_or("not run".into(), verdict),
        100.0 * lost_live as f64 / captured.max(1) as f64,
        percentile(&rec, 0.5),
        percentile(&rec, 1.0),
    )?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// SIGTERM

async fn sigterm(dir: &Path) -> anyhow::Result<String> {
    let (mut hub, _sim) = recording_hub(dir, FAST, &[], &[]).await?;
    let index = recorded::sqlite_url(&hub.dir.join("data"));
    let spool = sim_spool(&hub);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let pid = hub.pid().context("the hub has no process")?;
    let termed = now_us();
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).context("pid")?),
        nix::sys::signal::Signal::SIGTERM,
    )
    .context("sending SIGTERM")?;
    while hub.is_running() && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let drain = t.elapsed();
    let exited = !hub.is_running();
    hub.kill();
    let stopped = recorded::verify(&hub.dir.join("data"), &[])?;
    let rows = recorded::media_rows(&index, UNIT).await?;
    let last = rows.last().context("no media row")?.clone();
    // Started again: the unit's spool brings what the stop cut off.
    let t = Instant::now();
    hub.start_again().await?;
    let healthy = t.elapsed();
    let back = now_us();
    let loss = settle(
        &index,
        &spool,
        UNIT,
        (termed - 3_000_000, back + 2_000_000),
        // The rows the drain wrote are live; the new process counts its backfill anew.
        back,
        Duration::from_secs(30),
    )
    .await?;
    let after = recorded::verify(&hub.dir.join("data"), &[])?;
    let mut s = String::new();
    writeln!(s, "### SIGTERM: the hub drains\n")?;
    writeln!(
        s,
        "The hub gets SIGTERM mid-recording; then it is started again. Window: 3 s before the \
         signal to 2 s after the restart.\n"
    )?;
    writeln!(
        s,
        "- Drain: SIGTERM → exit {:.2} s{}.",
        drain.as_secs_f64(),
        if exited {
            ""
        } else {
            " (**still running after 30 s: killed**)"
        }
    )?;
    writeln!(
        s,
        "- Last segment: written {} after the signal, ending with a frame captured {} after \
         it (the drain records what arrived); `hub verify` on the stopped hub: {}.",
        secs(last.recorded_us - termed),
        secs(last.end_us - termed),
        verdict(&stopped),
    )?;
    writeln!(
        s,
        "- Restart → healthy {:.2} s; restart → a live segment recorded again {}.",
        healthy.as_secs_f64(),
        loss.recovered_us.map_or("–".into(), secs)
    )?;
    writeln!(
        s,
        "- {}; `hub verify` after: {}.\n",
        loss_line(&loss),
        verdict(&after)
    )?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// A live QUIC viewer, counting video frames.

struct Viewer {
    frames: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Viewer {
    async fn start(hub: &Hub) -> anyhow::Result<Self> {
        let token = hub.token("viewer", "faults");
        let mut s = Subscriber::connect(hub.quic, &hub.trust(), &token, &Limits::default()).await?;
        let (sub, mut rx) = s.subscribe(UNIT, 1024).await?;
        let video = track_id(&sub, TrackKind::Video);
        let frames = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&frames);
        let task = tokio::spawn(async move {
            let _keep = s;
            while let Some(f) = rx.next().await {
                if f.track_id == video {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Self { frames, task })
    }

    fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// Disk full

/// A tmpfs this program mounted; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)?;
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tianwang-faults",
            ])
            .arg(path))
        .context("mounting a tmpfs (needs root)")?;
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn config_args(hub: &Hub) -> [String; 2] {
    [
        "--config".into(),
        hub.dir.join("hub.toml").display().to_string(),
    ]
}

async fn disk_full(dir: &Path) -> anyhow::Result<String> {
    let disk = dir.join("disk");
    let mount = Tmpfs::mount(&disk, "32m")?;
    let config = format!("{FAST}dir = \"{}\"\n", disk.display());
    let (mut hub, sim) = recording_hub(dir, &config, &[], &[]).await?;
    let cfg = config_args(&hub);
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let index = recorded::sqlite_url(&hub.dir.join("data"));
    let spool = sim_spool(&hub);
    let viewer = Viewer::start(&hub).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let errors0 = metric(&hub, "tianwang_recording_errors_total").await;
    let alarms0 = metric(&hub, "tianwang_alarms_raised_total").await;
    let full = now_us();
    let filler = disk.join("filler");
    // dd stops at ENOSPC (and says so): the disk is full.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output();
    let t = Instant::now();
    hub.wait_metric(
        "tianwang_recording_errors_total",
        Duration::from_secs(30),
        |v| v > errors0,
    )
    .await?;
    let detected = t.elapsed();
    let seen0 = viewer.frames();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let live_frames = viewer.frames() - seen0;
    let held = t.elapsed();
    let during = recorded::verify(&hub.dir.join("data"), &cfg)?;
    let alive = hub.is_running();
    let errors = metric(&hub, "tianwang_recording_errors_total").await - errors0;
    let alarms = metric(&hub, "tianwang_alarms_raised_total").await - alarms0;
    let log = hub.log();
    let said = log.contains("No space left on device");
    // Space returns.
    let written = metric(&hub, "tianwang_recorded_segments_total").await;
    std::fs::remove_file(&filler).context("removing the filler")?;
    let freed = now_us();
    let t = Instant::now();
    hub.wait_metric(
        "tianwang_recorded_segments_total",
        Duration::from_secs(30),
        |v| v > written,
    )
    .await?;
    let resumed = t.elapsed();
    let loss = settle(
        &index,
        &spool,
        UNIT,
        (full - 2_000_000, freed + 2_000_000),
        full,
        Duration::from_secs(40),
    )
    .await?;
    let after = recorded::verify(&hub.dir.join("data"), &cfg)?;
    let resumed_logged = hub.log().contains("recording resumed");
    drop(viewer);
    drop(sim);
    hub.stop();
    drop(mount);
    let mut s = String::new();
    writeln!(s, "### Disk full\n")?;
    writeln!(
        s,
        "The recordings live on a 32 MiB tmpfs mounted for the run; `dd` fills it while the \
         unit records, it stays full for {:.0} s, then the filler is removed. Window: 2 s \
         before the disk filled to 2 s after space returned.\n",
        held.as_secs_f64()
    )?;
    writeln!(
        s,
        "- While full: the first failed segment {:.2} s after the disk filled; {errors:.0} \
         segments failed (`tianwang_recording_errors_total`{}), {alarms:.0} alarms raised \
         (no operation is active, so no `recording_stopped`); the hub {} running; the live \
         viewer got {live_frames} video frames in the {:.0} s full (30 fps sent); `hub verify` \
         while full: {}.",
        detected.as_secs_f64(),
        if said {
            ", the log says \"No space left on device\""
        } else {
            ""
        },
        if alive { "kept" } else { "**stopped**" },
        8.0,
        verdict(&during)
    )?;
    writeln!(
        s,
        "- Space back → a segment recorded again {:.2} s{}.",
        resumed.as_secs_f64(),
        if resumed_logged {
            " (`recording resumed` logged)"
        } else {
            ""
        }
    )?;
    writeln!(
        s,
        "- {}; `hub verify` after: {}.\n",
        loss_line(&loss),
        verdict(&after)
    )?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// Slow disk

/// An ext4 file system on a loop device, mounted, and a blkio cgroup (v1) throttling writes
/// to it for the processes put in it. All undone on drop.
struct SlowDisk {
    dev: String,
    mnt: PathBuf,
    cgroup: PathBuf,
}

const BLKIO: &str = "/sys/fs/cgroup/blkio";

impl SlowDisk {
    fn make(dir: &Path, bytes_per_s: u64) -> anyhow::Result<Self> {
        if !Path::new(BLKIO)
            .join("blkio.throttle.write_bps_device")
            .exists()
        {
            bail!("no blkio cgroup (v1) with write throttling at {BLKIO}");
        }
        let img = dir.join("disk.img");
        run(Command::new("truncate").args(["-s", "256M"]).arg(&img))?;
        run(Command::new("mkfs.ext4").arg("-q").arg(&img))?;
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&img))?;
        let mnt = dir.join("disk");
        let cgroup = Path::new(BLKIO).join(format!("tianwang-faults-{}", std::process::id()));
        let mut me = Self {
            dev: dev.clone(),
            mnt: mnt.clone(),
            cgroup: PathBuf::new(),
        };
        std::fs::create_dir_all(&mnt)?;
        run(Command::new("mount").arg(&dev).arg(&mnt))?;
        let majmin = run(Command::new("lsblk").args(["-dno", "MAJ:MIN", &dev]))?;
        std::fs::create_dir(&cgroup).context("creating a blkio cgroup")?;
        me.cgroup = cgroup.clone();
        std::fs::write(
            cgroup.join("blkio.throttle.write_bps_device"),
            format!("{} {bytes_per_s}", majmin.trim()),
        )
        .context("setting the write throttle")?;
        Ok(me)
    }

    fn slow(&self, pid: u32) -> anyhow::Result<()> {
        std::fs::write(self.cgroup.join("cgroup.procs"), pid.to_string())
            .context("moving the hub into the throttled cgroup")
    }

    /// Moves every process back to the root group.
    fn fast(&self) -> anyhow::Result<()> {
        let procs = std::fs::read_to_string(self.cgroup.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            std::fs::write(Path::new(BLKIO).join("cgroup.procs"), pid)
                .context("moving a process back to the root blkio group")?;
        }
        Ok(())
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        if !self.cgroup.as_os_str().is_empty() {
            let _ = self.fast();
            let _ = std::fs::remove_dir(&self.cgroup);
        }
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

async fn slow_disk(dir: &Path) -> anyhow::Result<String> {
    // A third of what the unit sends (1.5 Mbit/s ≈ 190 kB/s).
    const RATE: u64 = 64 * 1024;
    const SLOW: Duration = Duration::from_secs(20);
    let disk = SlowDisk::make(dir, RATE)?;
    let config = format!("{FAST}dir = \"{}\"\n", disk.mnt.display());
    let (mut hub, sim) = recording_hub(dir, &config, &[], &[]).await?;
    let cfg = config_args(&hub);
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let index = recorded::sqlite_url(&hub.dir.join("data"));
    let spool = sim_spool(&hub);
    let viewer = Viewer::start(&hub).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let dropped0 = metric(&hub, "tianwang_frames_dropped_total").await;
    let errors0 = metric(&hub, "tianwang_recording_errors_total").await;
    let pid = hub.pid().context("the hub has no process")?;
    let slow_from = now_us();
    disk.slow(pid)?;
    let seen0 = viewer.frames();
    tokio::time::sleep(SLOW).await;
    let live_frames = viewer.frames() - seen0;
    let rows_during = recorded::media_rows(&index, UNIT)
        .await?
        .iter()
        .filter(|r| r.recorded_us >= slow_from)
        .count();
    disk.fast()?;
    let slow_to = now_us();
    // Caught up: a row written within 2 s of its capture again.
    let mut max_lag = 0i64;
    let (_, caught_up) = poll_rows(&index, UNIT, Duration::from_secs(90), |rows| {
        max_lag = rows
            .iter()
            .filter(|r| r.recorded_us >= slow_from)
            .map(Row::lag_us)
            .max()
            .unwrap_or(0)
            .max(max_lag);
        rows.last()
            .is_some_and(|r| r.recorded_us > slow_to && r.lag_us() < 2_000_000)
    })
    .await;
    let loss = settle(
        &index,
        &spool,
        UNIT,
        (slow_from - 2_000_000, slow_to + 2_000_000),
        slow_from,
        Duration::from_secs(40),
    )
    .await?;
    let rows = recorded::media_rows(&index, UNIT).await?;
    max_lag = rows
        .iter()
        .filter(|r| r.recorded_us >= slow_from)
        .map(Row::lag_us)
        .max()
        .unwrap_or(0)
        .max(max_lag);
    let dropped = metric(&hub, "tianwang_frames_dropped_total").await - dropped0;
    let errors = metric(&hub, "tianwang_recording_errors_total").await - errors0;
    let after = recorded::verify(&hub.dir.join("data"), &cfg)?;
    drop(viewer);
    drop(sim);
    hub.stop();
    drop(disk);
    let mut s = String::new();
    writeln!(s, "### Slow disk\n")?;
    writeln!(
        s,
        "The recordings live on ext4 on a loop device; for {:.0} s the hub's writes to it are \
         throttled to {} KiB/s (a blkio cgroup's `write_bps_device`, about a third of the \
         unit's bitrate; every segment is fsynced, so its writes are the hub's own), then \
         released. Window: 2 s before the throttle to 2 s after its release.\n",
        SLOW.as_secs_f64(),
        RATE / 1024
    )?;
    writeln!(
        s,
        "- While slow: {rows_during} segment rows written, recording lag (last frame → row) up \
         to {}; the live viewer got {live_frames} video frames in {:.0} s (30 fps sent); \
         {dropped:.0} frames dropped by the relay, {errors:.0} recording errors.",
        secs(max_lag),
        SLOW.as_secs_f64()
    )?;
    writeln!(
        s,
        "- Released → caught up (a row within 2 s of its capture) {}.",
        caught_up.map_or("**not within 90 s**".into(), |d| format!(
            "{:.2} s",
            d.as_secs_f64()
        ))
    )?;
    writeln!(
        s,
        "- {}; `hub verify` after: {}.\n",
        loss_line(&loss),
        verdict(&after)
    )?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// The database unavailable

async fn database(dir: &Path) -> anyhow::Result<String> {
    const DOWN: Duration = Duration::from_secs(10);
    let mut pg = postgres::Postgres::start().await?;
    let url = pg.url();
    let config = format!("{FAST}index_url = \"{url}\"\n");
    let (hub, sim) = recording_hub(dir, &config, &[], &[]).await?;
    let cfg = config_args(&hub);
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let spool = sim_spool(&hub);
    let viewer = Viewer::start(&hub).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let errors0 = metric(&hub, "tianwang_recording_errors_total").await;
    let down = now_us();
    pg.stop();
    let seen0 = viewer.frames();
    tokio::time::sleep(DOWN).await;
    let live_frames = viewer.frames() - seen0;
    let alive = hub.is_running_ref();
    let online = metric(&hub, "tianwang_units_online").await;
    let errors_down = metric(&hub, "tianwang_recording_errors_total").await - errors0;
    pg.start_again().await?;
    let up = now_us();
    // Recovered: a row written after the database returned.
    let (_, recovered) = poll_rows(&url, UNIT, Duration::from_secs(60), |rows| {
        rows.iter().any(|r| r.recorded_us > up)
    })
    .await;
    let loss = settle(
        &url,
        &spool,
        UNIT,
        (down - 2_000_000, up + 2_000_000),
        down,
        Duration::from_secs(40),
    )
    .await?;
    let errors = metric(&hub, "tianwang_recording_errors_total").await - errors0;
    let max_lag = recorded::media_rows(&url, UNIT)
        .await?
        .iter()
        .filter(|r| r.end_us >= down - 2_000_000)
        .map(Row::lag_us)
        .max()
        .unwrap_or(0);
    let after = recorded::verify(&hub.dir.join("data"), &cfg)?;
    drop(viewer);
    drop(sim);
    drop(hub);
    drop(pg);
    let mut s = String::new();
    writeln!(s, "### The database unavailable\n")?;
    writeln!(
        s,
        "The index is a real PostgreSQL server (the tests' harness); it is stopped (fast \
         shutdown, sessions cut) for {:.0} s mid-recording and started again on the same data \
         and port. Window: 2 s before the stop to 2 s after the return.\n",
        DOWN.as_secs_f64()
    )?;
    writeln!(
        s,
        "- While down: the hub {}, the unit {} online, the live viewer got {live_frames} \
         video frames in {:.0} s; {errors_down:.0} segments failed to be indexed ({errors:.0} \
         in all).",
        if alive { "kept running" } else { "**stopped**" },
        if online == 1.0 {
            "stayed"
        } else {
            "was **not**"
        },
        DOWN.as_secs_f64()
    )?;
    writeln!(
        s,
        "- Database back → a row written {}; the longest a segment of the window waited \
         for its row: {}.",
        recovered.map_or("**not within 60 s**".into(), |d| format!(
            "{:.2} s later",
            d.as_secs_f64()
        )),
        secs(max_lag)
    )?;
    writeln!(
        s,
        "- {}; `hub verify` after: {}.\n",
        loss_line(&loss),
        verdict(&after)
    )?;
    Ok(s)
}

trait Running {
    fn is_running_ref(&self) -> bool;
}

impl Running for Hub {
    /// Whether the process is alive, without reaping it (signal 0).
    fn is_running_ref(&self) -> bool {
        self.pid()
            .and_then(|p| i32::try_from(p).ok())
            .is_some_and(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok())
    }
}

// ---------------------------------------------------------------------------------------
// Loss of the parent hub

async fn parent(dir: &Path) -> anyhow::Result<String> {
    const DOWN: Duration = Duration::from_secs(10);
    const AGENT_UNIT: &str = "bwc-1";
    let ca = tree::make_ca(dir)?;
    let (top_dir, mid_dir) = (dir.join("supreme"), dir.join("high"));
    tree::issue(&ca, tree::SUPREME, "", &top_dir.join("tls"))?;
    tree::issue(&ca, tree::HIGH, tree::SUPREME, &mid_dir.join("tls"))?;
    let mut top = Hub::start(
        &top_dir,
        Some(&tree::config(
            tree::SUPREME,
            "supreme",
            &top_dir.join("tls"),
            &ca,
            None,
            "",
        )),
    )
    .await?;
    let child = Hub::start(
        &mid_dir,
        Some(&tree::config(
            tree::HIGH,
            "high",
            &mid_dir.join("tls"),
            &ca,
            Some(&top),
            "[evidence]\nsegment_target = \"1s\"\n",
        )),
    )
    .await?;
    let agent = Agent::start(
        &format!("localhost:{}", child.quic.port()),
        &ca.join("ca.crt"),
        AGENT_UNIT,
        &child.token("device", AGENT_UNIT),
        dir,
        &["--keyframe-interval", "1", "--spool-mib", "256"],
    )?;
    let president = top.token("commander", "president");
    tree::wait_units_online(&top, &president, &[AGENT_UNIT], Duration::from_secs(60)).await?;
    child
        .wait_metric(
            "tianwang_recorded_segments_total",
            Duration::from_secs(60),
            |v| v >= 2.0,
        )
        .await?;
    let index = recorded::sqlite_url(&child.dir.join("data"));
    let spool = dir.join(format!("agent-{AGENT_UNIT}")).join("spool");
    let segs0 = metric(&child, "tianwang_recorded_segments_total").await;
    let killed = now_us();
    top.kill();
    tokio::time::sleep(DOWN).await;
    let during = metric(&child, "tianwang_recorded_segments_total").await - segs0;
    let online = metric(&child, "tianwang_units_online").await;
    let t = Instant::now();
    top.start_again().await?;
    let healthy = t.elapsed();
    // The unit listed online at the top again: the child re-linked and sent its catalog.
    tree::wait_units_online(&top, &president, &[AGENT_UNIT], Duration::from_secs(60)).await?;
    let relinked = t.elapsed();
    let back = now_us();
    let loss = settle(
        &index,
        &spool,
        AGENT_UNIT,
        (killed - 2_000_000, back + 2_000_000),
        killed,
        Duration::from_secs(40),
    )
    .await?;
    let after = recorded::verify(&child.dir.join("data"), &[])?;
    drop(agent);
    let mut s = String::new();
    writeln!(s, "### Loss of the parent hub\n")?;
    writeln!(
        s,
        "A court tree of two hubs (supreme ← high, CA-issued certificates); a unit \
         (`field-agent run`, the test pattern, a 256 MiB spool) records at the child. The \
         parent is killed (SIGKILL) for {:.0} s, then started again. Window: 2 s before the \
         kill to 2 s after the re-link.\n",
        DOWN.as_secs_f64()
    )?;
    writeln!(
        s,
        "- While the parent is away: the child recorded {during:.0} segments in {:.0} s, its \
         unit {} online.",
        DOWN.as_secs_f64(),
        if online == 1.0 {
            "stayed"
        } else {
            "was **not**"
        }
    )?;
    writeln!(
        s,
        "- Parent restart → healthy {:.2} s; → the unit listed online at the parent again \
         (child re-linked, catalog sent) {:.2} s (the child's `cascade.max_backoff` is 1 s).",
        healthy.as_secs_f64(),
        relinked.as_secs_f64()
    )?;
    writeln!(
        s,
        "- At the child: {}; `hub verify`: {}.\n",
        loss_line(&loss),
        verdict(&after)
    )?;
    Ok(s)
}

// ---------------------------------------------------------------------------------------
// A wall clock stepped by an hour

/// libfaketime's preload library, from Debian's `faketime` package.
fn libfaketime() -> anyhow::Result<PathBuf> {
    for dir in std::fs::read_dir("/usr/lib")?.flatten() {
        let p = dir.path().join("faketime").join("libfaketimeMT.so.1");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("libfaketime is not installed (apt-get install faketime; scripts/faults does it)")
}

/// A clock that libfaketime steps: an offset read from `file` (at most once a second); the
/// monotonic clock is left alone, so timers and timeouts are not disturbed.
struct FakeClock {
    file: PathBuf,
    env: Vec<(String, String)>,
}

impl FakeClock {
    fn new(file: PathBuf, lib: &Path) -> anyhow::Result<Self> {
        std::fs::write(&file, "+0\n")?;
        let env = vec![
            ("LD_PRELOAD".into(), lib.display().to_string()),
            ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
            ("FAKETIME_CACHE_DURATION".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ];
        Ok(Self { file, env })
    }

    fn env(&self) -> Vec<(&str, &str)> {
        self.env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// Steps the clock to `offset` (`+1h`, `+0`); effective within a second and a bit.
    async fn set(&self, offset: &str) -> anyhow::Result<()> {
        std::fs::write(&self.file, format!("{offset}\n"))?;
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        Ok(())
    }
}

async fn clock(dir: &Path) -> anyhow::Result<String> {
    const HOLD: Duration = Duration::from_secs(8);
    const HOUR: i64 = 3_600_000_000;
    let lib = libfaketime()?;
    let hub_clock = FakeClock::new(dir.join("hub-clock"), &lib)?;
    let unit_clock = FakeClock::new(dir.join("unit-clock"), &lib)?;
    let (hub, sim) = recording_hub(dir, FAST, &hub_clock.env(), &unit_clock.env()).await?;
    let index = recorded::sqlite_url(&hub.dir.join("data"));
    let spool = sim_spool(&hub);
    let rejected0 = metric(&hub, "tianwang_telemetry_rejected_total").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The hub's clock: an hour ahead, then back.
    let mut phases: Vec<(&str, i64, i64)> = Vec::new();
    for (what, clock, offset) in [
        ("hub +1 h", &hub_clock, "+1h"),
        ("hub back", &hub_clock, "+0"),
        ("unit +1 h", &unit_clock, "+1h"),
        ("unit back", &unit_clock, "+0"),
    ] {
        let from = now_us();
        clock.set(offset).await?;
        tokio::time::sleep(HOLD).await;
        phases.push((what, from, now_us()));
    }
    // The frames captured until now, then the rows once their segments closed.
    let frames = recorded::spooled_frames(&spool, VIDEO)?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let rows_live = recorded::media_rows(&index, UNIT).await?;
    // Then backfill (bounded): the spool holds what the recording lacks.
    let t = Instant::now();
    let (rows, _) = poll_rows(&index, UNIT, Duration::from_secs(30), |rows| {
        let (n, held) = recorded::covered(&frames, rows, i64::MIN, i64::MAX);
        held == n
    })
    .await;
    let backfilled_in = t.elapsed();
    let rejected = metric(&hub, "tianwang_telemetry_rejected_total").await - rejected0;
    let alive = hub.is_running_ref();
    drop(sim);
    drop(hub);
    let verified = recorded::verify(&dir.join("data"), &[])?;
    // Per phase: rows written, and how far their hub time and capture time sat from the
    // real time they were written (the offsets the hub and the unit lived with).
    let mut s = String::new();
    writeln!(s, "### A wall clock stepped by an hour\n")?;
    writeln!(
        s,
        "The hub and the unit run under libfaketime (Debian's `faketime`, the machine's clock \
         untouched; the monotonic clock is not faked). Each step holds {:.0} s: the hub's clock \
         jumps an hour ahead and back, then the unit's. Rows are the unit's media rows written \
         in each phase; offsets are their hub time and capture time against the real time.\n",
        HOLD.as_secs_f64()
    )?;
    writeln!(
        s,
        "| phase | rows | hub clock offset | capture clock offset |"
    )?;
    writeln!(s, "|---|---|---|---|")?;
    // A row's phase is by the real time it was written (see `real_time`); offsets are
    // medians, as a step takes effect within a second or so of the phase's start.
    for (what, from, to) in &phases {
        let in_phase: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                let real = real_time(r, HOUR);
                real >= *from && real < *to
            })
            .collect();
        let median = |f: &dyn Fn(&Row) -> i64| {
            let mut v: Vec<i64> = in_phase.iter().map(|r| f(r)).collect();
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0)
        };
        let hub_off = median(&|r: &Row| r.recorded_us - real_time(r, HOUR));
        let cap_off = median(&|r: &Row| r.end_us - real_time(r, HOUR));
        writeln!(
            s,
            "| {what} | {} | {:+.0} s | {:+.0} s |",
            in_phase.len(),
            hub_off as f64 / 1e6,
            cap_off as f64 / 1e6
        )?;
    }
    // Ordering: rows in chain order, capture time only increasing within each recording.
    let mut out_of_order = 0;
    let mut recordings = 0;
    let mut last: Option<&Row> = None;
    for r in &rows {
        match last {
            Some(l) if l.recording == r.recording => {
                if r.start_us < l.end_us - 1_000 {
                    out_of_order += 1;
                }
            }
            _ => recordings += 1,
        }
        last = Some(r);
    }
    let (captured, held) = recorded::covered(&frames, &rows, i64::MIN, i64::MAX);
    let (_, held_live) = recorded::covered(&frames, &rows_live, i64::MIN, i64::MAX);
    // Which frames the rows lack, by capture time (on stderr: for whoever reads the run).
    let missing: Vec<u64> = frames
        .iter()
        .copied()
        .filter(|&f| recorded::covered(&[f], &rows, i64::MIN, i64::MAX).1 == 0)
        .collect();
    if let Some(first) = frames.first() {
        eprintln!(
            "faults: clock: frames not recorded, ms after the first: {:?}; phases (real µs): {phases:?}, first frame {first}",
            missing
                .iter()
                .map(|f| (f - first) / 1000)
                .collect::<Vec<_>>()
        );
    }
    writeln!(
        s,
        "\n- `hub verify`: {}; {recordings} recordings, {out_of_order} rows out of capture \
         order within a recording; the hub {}; {rejected:.0} telemetry points refused \
         (`future`: the unit an hour ahead).",
        verdict(&verified),
        if alive { "kept running" } else { "**stopped**" },
    )?;
    writeln!(
        s,
        "- Frames: {captured} captured in the whole run; 4 s after it, {} not recorded; \
         after backfill ({:.0} s later{}) {} not.\n",
        captured - held_live,
        backfilled_in.as_secs_f64(),
        if held == captured {
            ""
        } else {
            ", waited at most 30 s"
        },
        captured - held
    )?;
    Ok(s)
}

/// Reconstructs when a row was really written: its hub time less the hub's offset, which is
/// an hour or nothing; an hour off when the row's capture (device time, whose offset is also
/// an hour or nothing) says the hub was ahead.
fn real_time(r: &Row, hour: i64) -> i64 {
    // A segment is written within seconds of its capture in real time; the hub and unit
    // offsets are each 0 or +1 h, so the difference tells which held.
    let diff = r.recorded_us - r.end_us;
    if diff > hour / 2 {
        r.recorded_us - hour
    } else {
        r.recorded_us
    }
}

// ---------------------------------------------------------------------------------------
// Signalling cut while media continues

/// A TCP proxy in front of the hub's HTTP port whose connections can be held (bytes stop,
/// sockets stay open: a signalling path gone dark) or reset (closed).
struct TcpCut {
    addr: std::net::SocketAddr,
    /// 0 passes, 1 holds, 2 closes.
    state: Arc<AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpCut {
    async fn start(target: std::net::SocketAddr) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(AtomicU8::new(0));
        let st = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, Arc::clone(&st)));
                tokio::spawn(pipe(sr, cw, Arc::clone(&st)));
            }
        });
        Ok(Self { addr, state, task })
    }

    fn set(&self, state: u8) {
        self.state.store(state, Ordering::Relaxed);
    }
}

impl Drop for TcpCut {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<AtomicU8>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match state.load(Ordering::Relaxed) {
            2 => return,
            1 => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            _ => {}
        }
        // Short reads, so a hold or a reset takes effect within 50 ms.
        match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Packets of a tile over `d`, sampled.
async fn packets_over(c: &Console, tile: &str, d: Duration) -> u64 {
    let before = c.media_of(tile).packets;
    tokio::time::sleep(d).await;
    c.media_of(tile).packets - before
}

async fn ping(c: &mut Console, nonce: u64, timeout: Duration) -> bool {
    c.send(serde_json::json!({"ping": {"nonce": nonce.to_string()}}))
        .await
        .is_ok()
        && c.until(timeout, |e| match &e.kind {
            Some(Event::Pong(p)) if p.nonce == nonce => Some(()),
            _ => None,
        })
        .await
        .is_ok()
}

/// A console session over the cut proxy, by WebSocket or gRPC.
async fn console_via(
    addr: std::net::SocketAddr,
    token: &str,
    grpc: bool,
) -> anyhow::Result<Console> {
    if grpc {
        Console::connect_grpc(addr, token).await
    } else {
        let mut c = Console::connect(addr).await?;
        c.auth(token).await?;
        Ok(c)
    }
}

/// What one signalling path went through.
struct Cut {
    before: u64,
    held: u64,
    peers_held: f64,
    sessions_held: f64,
    resumed_in: Option<Duration>,
    after_heal: u64,
    media_after_reset: Duration,
    peers_reset: f64,
    again: Option<Duration>,
}

async fn signalling(dir: &Path) -> anyhow::Result<String> {
    let hub = Hub::start(dir, None).await?;
    let tokens = hub.fleet("sim-", 1);
    let _sim = Simulator::start(&hub, 1, &tokens, &[])?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(60), |v| {
        v == 1.0
    })
    .await?;
    let token = hub.token("commander", "faults");
    let cut = TcpCut::start(hub.http).await?;
    let mut s = String::new();
    writeln!(s, "### Signalling cut while media continues\n")?;
    writeln!(
        s,
        "A console (Rust: a WebSocket or gRPC session + a webrtc-rs PeerConnection) watches a \
         unit; its signalling goes through a TCP proxy, its WebRTC media straight to the hub \
         over UDP. First the proxy holds the signalling for {:.0} s (bytes stop, sockets stay \
         open: a path gone dark), then lets it through again; then it closes the connection \
         (a reset), and a new session is opened.\n",
        SIGNAL_HOLD.as_secs_f64()
    )?;
    for (name, grpc) in [("WebSocket", false), ("gRPC", true)] {
        let c = cut_once(&hub, &cut, &token, grpc).await?;
        let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
        writeln!(
            s,
            "- {name}, before: {:.0} RTP packets/s on the tile. Signalling held {:.0} s: media \
             went on at {:.0} packets/s; the hub kept {:.0} WebRTC peer(s) and {:.0} console \
             session(s) open. Healed: the same session answered a ping {}; {:.0} packets/s \
             after.",
            rate(c.before, Duration::from_secs(3)),
            SIGNAL_HOLD.as_secs_f64(),
            rate(c.held, SIGNAL_HOLD),
            c.peers_held,
            c.sessions_held,
            c.resumed_in
                .map_or("**not within 10 s**".into(), |d| format!(
                    "in {:.2} s",
                    d.as_secs_f64()
                )),
            rate(c.after_heal, Duration::from_secs(2)),
        )?;
        writeln!(
            s,
            "- {name}, reset: {}, so media stopped {:.2} s after the reset ({:.0} peers \
             left). A new session (sign-in, offer/answer, tile) had media again in {}.",
            if c.peers_reset == 0.0 {
                "the hub ended the session and closed its PeerConnection with it"
            } else {
                "**the hub kept the PeerConnection of the session it lost**"
            },
            c.media_after_reset.as_secs_f64(),
            c.peers_reset,
            c.again.map_or("**not within 20 s**".into(), |d| format!(
                "{:.2} s",
                d.as_secs_f64()
            ))
        )?;
    }
    writeln!(s)?;
    Ok(s)
}

const SIGNAL_HOLD: Duration = Duration::from_secs(15);

async fn cut_once(hub: &Hub, cut: &TcpCut, token: &str, grpc: bool) -> anyhow::Result<Cut> {
    let mut c = console_via(cut.addr, token, grpc).await?;
    c.with_media().await?;
    c.add_tile("t1", UNIT).await?;
    c.tile("t1", State::Live, Duration::from_secs(20)).await?;
    let t = Instant::now();
    while c.media_of("t1").packets == 0 && t.elapsed() < Duration::from_secs(10) {
        // Reading the session answers offers and passes candidates on.
        let _ = c.next(Duration::from_millis(100)).await;
    }
    let before = packets_over(&c, "t1", Duration::from_secs(3)).await;

    // Held: signalling dark, sockets open.
    cut.set(1);
    let held = packets_over(&c, "t1", SIGNAL_HOLD).await;
    let peers_held = metric(hub, "tianwang_webrtc_peers").await;
    let sessions_held = metric(hub, "tianwang_console_sessions").await;
    cut.set(0);
    let t = Instant::now();
    let resumed = ping(&mut c, 7, Duration::from_secs(10)).await;
    let resumed_in = resumed.then(|| t.elapsed());
    let after_heal = packets_over(&c, "t1", Duration::from_secs(2)).await;

    // Reset: the signalling connection closes; media has only its own path left.
    cut.set(2);
    let t = Instant::now();
    let mut last_packet = t;
    let mut last = c.media_of("t1").packets;
    while t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = c.media_of("t1").packets;
        if now != last {
            last = now;
            last_packet = Instant::now();
        }
    }
    let media_after_reset = last_packet.saturating_duration_since(t);
    let peers_reset = metric(hub, "tianwang_webrtc_peers").await;
    c.abandon().await;
    // A new session: sign in, media, the same tile.
    cut.set(0);
    let t = Instant::now();
    let mut c = console_via(cut.addr, token, grpc).await?;
    c.with_media().await?;
    c.add_tile("t1", UNIT).await?;
    while c.media_of("t1").packets == 0 && t.elapsed() < Duration::from_secs(20) {
        let _ = c.next(Duration::from_millis(50)).await;
    }
    let again = (c.media_of("t1").packets > 0).then(|| t.elapsed());
    c.close().await;
    // The hub has let the session and its peer go before the next path is tried.
    let t = Instant::now();
    while metric(hub, "tianwang_webrtc_peers").await > 0.0 && t.elapsed() < Duration::from_secs(10)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Cut {
        before,
        held,
        peers_held,
        sessions_held,
        resumed_in,
        after_heal,
        media_after_reset,
        peers_reset,
        again,
    })
}
