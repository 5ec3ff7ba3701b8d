//! The `loadrun` workload against a peer relay, moq-relay (moq-dev/moq): N publishers each
//! replaying one pre-encoded H.264 clip at 30 fps, M subscribers per publisher, all on this
//! machine. It reports delivered Mbit/s per relay CPU-second, comparable with `loadrun`.
//!
//!   peer-moq --bin-dir target/bench-peers/bin --clip /tmp/clip.h264 \
//!            --publishers 10 --subscribers 4 --duration 15
//!
//! The relay and the clients are the installed `moq-relay` and `moq` binaries, driven as
//! subprocesses (`cargo install --root target/bench-peers moq-relay moq-cli`). Each
//! publisher is the clip looped through `ffmpeg -re` (30 fps, remuxed to fMP4 with no
//! re-encoding) into `moq … import fmp4`; each subscriber is `moq … export h264`, and what
//! it writes to stdout is the frames it received, in Annex-B.
//!
//! `--ingest avc3` feeds access units straight into `moq … import avc3` at 30 fps instead;
//! `--transport quic` dials moqt:// (raw QUIC) instead of http:// (WebTransport over
//! HTTP/3, what browsers use); `--logs DIR` keeps every process's log.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tianwang_tests::{cpu_seconds, peak_rss_mib, percentile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::task::JoinSet;

const FPS: u64 = 30;

struct Args {
    bin_dir: PathBuf,
    clip: PathBuf,
    publishers: usize,
    subscribers: usize,
    duration: u64,
    quic: bool,
    avc3: bool,
    logs: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        bin_dir: PathBuf::from("target/bench-peers/bin"),
        clip: PathBuf::new(),
        publishers: 1,
        subscribers: 10,
        duration: 15,
        quic: false,
        avc3: false,
        logs: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<usize>()
                .with_context(|| format!("{flag} {value}"))
        };
        match flag.as_str() {
            "--bin-dir" => a.bin_dir = value.into(),
            "--clip" => a.clip = value.into(),
            "--publishers" => a.publishers = number()?,
            "--subscribers" => a.subscribers = number()?,
            "--duration" => a.duration = number()? as u64,
            "--ingest" if value == "fmp4" || value == "avc3" => a.avc3 = value == "avc3",
            "--transport" if value == "webtransport" || value == "quic" => a.quic = value == "quic",
            "--logs" => a.logs = Some(value.into()),
            _ => bail!(
                "unknown {flag} {value} (--bin-dir DIR, --clip PATH.h264, --publishers N, \
                 --subscribers M, --duration SECS, --transport webtransport|quic, --ingest fmp4|avc3, --logs DIR)"
            ),
        }
    }
    if a.clip.as_os_str().is_empty() || a.publishers == 0 || a.duration == 0 {
        bail!("--clip is required; --publishers and --duration must be at least 1");
    }
    Ok(a)
}

/// Splits an Annex-B stream into access units. A unit starts at a non-VCL NAL (SEI, SPS,
/// PPS, AUD) or at a slice with first_mb_in_slice = 0, once the current one holds a slice;
/// x264's sliced frames (two slices each here) stay whole.
fn access_units(data: &[u8]) -> Vec<Vec<u8>> {
    let mut units = Vec::new();
    let (mut unit_start, mut has_slice) = (0, false);
    let mut i = 0;
    while i + 3 < data.len() {
        if data[i..i + 3] != [0, 0, 1] {
            i += 1;
            continue;
        }
        let start_code = if i > 0 && data[i - 1] == 0 { i - 1 } else { i };
        let kind = data[i + 3] & 0x1f;
        let vcl = kind == 1 || kind == 5;
        // first_mb_in_slice is ue(v): 0 is coded as a single 1 bit.
        let first_slice = vcl && data.get(i + 4).is_some_and(|b| b & 0x80 != 0);
        if has_slice && ((6..=9).contains(&kind) || first_slice) {
            units.push(data[unit_start..start_code].to_vec());
            (unit_start, has_slice) = (start_code, false);
        }
        has_slice |= vcl;
        i += 3;
    }
    if has_slice {
        units.push(data[unit_start..].to_vec());
    }
    units
}

/// A UDP port that is also free on TCP: the relay's HTTP listener shares the QUIC port,
/// because an http:// client fetches the certificate fingerprint from the host:port it dials.
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let port = std::net::UdpSocket::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free on both UDP and TCP")
}

fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    let file = std::fs::File::create(path).with_context(|| format!("creating {path:?}"))?;
    Ok(file.into())
}

/// The last lines of a log, for an error message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
    format!("{} ends:\n  {tail}", path.display())
}

/// A relay HTTP endpoint's body, empty on any failure: the callers poll.
async fn get_text(url: &str) -> String {
    match reqwest::get(url).await {
        Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
        _ => String::new(),
    }
}

/// Polls `ok` every 200 ms until it holds (true) or `deadline` passes (false).
async fn wait_until(deadline: Instant, mut ok: impl AsyncFnMut() -> bool) -> bool {
    loop {
        if ok().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `fut`, failing early if the relay exits or a publisher's task ends (they only end
/// on error: moq exited, so its stdin closed).
async fn guarded<T>(
    relay: &mut Child,
    publishers: &mut JoinSet<anyhow::Result<()>>,
    relay_log: &Path,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        r = fut => r,
        status = relay.wait() => bail!("moq-relay exited ({status:?}); {}", tail(relay_log)),
        Some(r) = publishers.join_next() => match r {
            Ok(Err(e)) => Err(e),
            other => bail!("a publisher task ended: {other:?}"),
        },
    }
}

#[derive(Default)]
struct Tally {
    measuring: AtomicBool,
    offered: AtomicU64,
    /// Subscribers whose moq exited after it had produced bytes.
    exited: AtomicU64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let (moq_relay, moq) = (args.bin_dir.join("moq-relay"), args.bin_dir.join("moq"));
    for b in [&moq_relay, &moq] {
        anyhow::ensure!(b.is_file(), "{} is missing (see --bin-dir)", b.display());
    }
    let clip = std::fs::read(&args.clip).with_context(|| format!("reading {:?}", args.clip))?;
    let units = Arc::new(access_units(&clip));
    anyhow::ensure!(
        units.len() >= 2,
        "{:?}: not an Annex-B H.264 stream",
        args.clip
    );
    let clip_mbit_s = clip.len() as f64 * 8.0 * FPS as f64 / units.len() as f64 / 1e6;
    eprintln!("clip: {} frames, {clip_mbit_s:.2} Mbit/s", units.len());
    let version = Command::new(&moq_relay)
        .arg("--version")
        .output()
        .await
        .ok();
    let version = version
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .last()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into());

    let tmp = tempfile::tempdir()?;
    let logs = match &args.logs {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {dir:?}"))?;
            dir.as_path()
        }
        None => tmp.path(),
    };
    let port = free_port()?;
    let relay_log = logs.join("relay.log");
    let mut relay = Command::new(&moq_relay)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--listen-tls-generate",
            "localhost",
        ])
        .args(["--web-http-listen", &format!("127.0.0.1:{port}")])
        .args(["--auth-public", "anon/**"])
        .env("NO_COLOR", "1") // plain logs, for the error messages that quote them
        .stdin(Stdio::null())
        .stdout(log_file(&relay_log)?)
        .stderr(log_file(&relay_log)?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", moq_relay.display()))?;
    let relay_pid = relay.id().context("relay pid")?;
    let http = format!("http://127.0.0.1:{port}");
    let mut publishers = JoinSet::new();
    let ready = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        let cert = format!("{http}/certificate.sha256");
        let up = wait_until(deadline, async || !get_text(&cert).await.is_empty()).await;
        anyhow::ensure!(up, "moq-relay: no answer on {cert} within 10 s");
        Ok(())
    };
    guarded(&mut relay, &mut publishers, &relay_log, ready).await?;
    eprintln!("moq-relay {version} on 127.0.0.1:{port} (pid {relay_pid})");

    let url = match args.quic {
        true => format!("moqt://127.0.0.1:{port}/anon"),
        false => format!("{http}/anon"),
    };
    let moq_cmd = |broadcast: &str, log: &Path| -> anyhow::Result<Command> {
        let mut c = Command::new(&moq);
        c.args(["--connect", &url])
            // moqt:// has no fingerprint bootstrap; the certificate is self-signed.
            .args(args.quic.then_some("--connect-tls-insecure"))
            // moq races a WebSocket (TCP) dial 200 ms into a slow QUIC handshake, which a
            // busy 2-core machine hits: force QUIC so every session is what we measure.
            .arg("--connect-websocket-enabled=false")
            .args(["--broadcast", broadcast])
            .env("NO_COLOR", "1")
            .env("RUST_LIB_BACKTRACE", "0") // the error line, not a backtrace, ends the log
            .stderr(log_file(log)?)
            .kill_on_drop(true);
        Ok(c)
    };

    // Publishers. fmp4: our task writes the clip into `ffmpeg -re`, which paces it at 30 fps
    // and timestamps it exactly, feeding `moq import fmp4`. avc3: our task writes one access
    // unit per 1/30 s into `moq import avc3`, which stamps frames with their arrival time;
    // lighter, but on a contended machine late frames then raise moq's bitrate estimate,
    // which changes the catalog mid-run (see the primers below). The clip loops either way.
    let tally = Arc::new(Tally::default());
    let (mut children, mut client_pids) = (Vec::new(), Vec::new());
    for u in 1..=args.publishers {
        let log = logs.join(format!("pub{u}.log"));
        let mut import = moq_cmd(&format!("unit{u}.hang"), &log)?;
        import.stdout(Stdio::null());
        let mut stdin = if args.avc3 {
            let child = import
                .args(["import", "avc3"])
                .stdin(Stdio::piped())
                .spawn();
            let mut child = child.context("starting moq import")?;
            client_pids.extend(child.id());
            let stdin = child.stdin.take().context("moq stdin")?;
            children.push(child);
            stdin
        } else {
            // -c copy: remuxed, not re-encoded; one fragment per frame, so nothing waits.
            let ffmpeg_args = "-hide_banner -loglevel error -re -framerate 30 -f h264 -i - \
                -c copy -f mp4 -movflags \
                cmaf+separate_moof+delay_moov+skip_trailer+frag_every_frame -";
            let mut ffmpeg = Command::new("ffmpeg")
                .args(ffmpeg_args.split_whitespace())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(log_file(&logs.join(format!("ffmpeg{u}.log")))?)
                .kill_on_drop(true)
                .spawn()
                .context("starting ffmpeg (or use --ingest avc3)")?;
            let fmp4: Stdio = ffmpeg.stdout.take().context("ffmpeg stdout")?.try_into()?;
            let child = import.args(["import", "fmp4"]).stdin(fmp4).spawn();
            let child = child.context("starting moq import")?;
            client_pids.extend(ffmpeg.id().into_iter().chain(child.id()));
            let stdin = ffmpeg.stdin.take().context("ffmpeg stdin")?;
            children.extend([ffmpeg, child]);
            stdin
        };
        let (units, tally, avc3) = (Arc::clone(&units), Arc::clone(&tally), args.avc3);
        publishers.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / FPS));
            // Burst: a publisher starved for a moment catches up, so the clip's rate holds.
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            // Unit by unit either way (ffmpeg's reads pace fmp4), so offered is exact to a
            // frame plus what the pipe holds.
            for au in units.iter().cycle() {
                if avc3 {
                    tick.tick().await;
                }
                let written = stdin.write_all(au).await;
                written.with_context(|| {
                    format!("publisher unit{u}: moq or ffmpeg exited; {}", tail(&log))
                })?;
                if tally.measuring.load(Ordering::Relaxed) {
                    tally.offered.fetch_add(au.len() as u64, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        });
    }
    // Every broadcast announced at the relay before anyone subscribes.
    let announced = async {
        let missing = |list: &str| -> Vec<usize> {
            let listed = |u: &usize| list.lines().any(|l| l.ends_with(&format!("unit{u}.hang")));
            (1..=args.publishers).filter(|u| !listed(u)).collect()
        };
        let mut list = String::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        wait_until(deadline, async || {
            list = get_text(&format!("{http}/announced/anon")).await;
            missing(&list).is_empty()
        })
        .await;
        match missing(&list).first() {
            None => Ok(()),
            Some(u) => bail!(
                "publishers {:?} not announced at the relay within 15 s (announced: {list:?}); {}",
                missing(&list),
                tail(&logs.join(format!("pub{u}.log")))
            ),
        }
    };
    guarded(&mut relay, &mut publishers, &relay_log, announced).await?;
    eprintln!("{} publishers announced", args.publishers);

    // Let each catalog settle before the measured subscribers join (as loadrun lets units
    // stream first). moq's publisher adds bitrate and framerate estimates to its catalog
    // once the track has a subscriber, and `moq export h264` re-subscribes its track whenever
    // the catalog entry it picked changes: that resends the current group (duplicate bytes)
    // and sometimes kills the subscriber ("frame timestamp is below the live edge"). So one
    // throwaway subscriber per unit primes the estimates, which then stay. Not fatal if a
    // catalog never settles: the report counts resubscriptions.
    let mut primers = Vec::new();
    for u in 1..=args.publishers {
        let mut primer = moq_cmd(
            &format!("unit{u}.hang"),
            &logs.join(format!("primer{u}.log")),
        )?;
        primer
            .args(["export", "h264"])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        primers.push(primer.spawn().context("starting a primer subscriber")?);
    }
    let settled = async {
        let deadline = Instant::now() + Duration::from_secs(15);
        for u in 1..=args.publishers {
            let catalog = format!("{http}/fetch/anon/unit{u}.hang/catalog.json");
            let estimated = async || {
                let text = get_text(&catalog).await;
                text.contains("\"bitrate\"") && text.contains("\"framerate\"")
            };
            if !wait_until(deadline, estimated).await {
                eprintln!("warning: unit{u}'s catalog has no bitrate/framerate after 15 s");
            }
        }
        anyhow::Ok(())
    };
    guarded(&mut relay, &mut publishers, &relay_log, settled).await?;
    drop(primers); // killed

    // Subscribers: one `moq export h264` each; a task counts its stdout bytes and times
    // spawn → first bytes, which includes the process starting, its QUIC (and WebTransport)
    // handshake, the catalog fetch and the subscribe.
    let mut subscribers = JoinSet::new();
    let (mut first, mut per_sub) = (Vec::new(), Vec::new());
    for u in 1..=args.publishers {
        for s in 1..=args.subscribers {
            let log = logs.join(format!("sub{u}-{s}.log"));
            let spawned = Instant::now();
            let mut child = moq_cmd(&format!("unit{u}.hang"), &log)?
                .args(["export", "h264"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .context("starting moq export")?;
            client_pids.extend(child.id());
            let mut stdout = child.stdout.take().context("moq stdout")?;
            let (tx, rx) = tokio::sync::oneshot::channel::<f64>();
            first.push((u, s, log.clone(), rx));
            let bytes = Arc::new(AtomicU64::new(0)); // in the window
            per_sub.push(Arc::clone(&bytes));
            let tally = Arc::clone(&tally);
            subscribers.spawn(async move {
                let _child = child; // killed when the task is aborted
                let (mut buf, mut tx) = (vec![0u8; 64 * 1024], Some(tx));
                loop {
                    let n = stdout.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        // Before any bytes, the first-bytes wait below reports it.
                        if tx.is_none() {
                            tally.exited.fetch_add(1, Ordering::Relaxed);
                            eprintln!("subscriber {s} of unit{u} exited; {}", tail(&log));
                        }
                        return;
                    }
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(spawned.elapsed().as_secs_f64() * 1000.0);
                    }
                    if tally.measuring.load(Ordering::Relaxed) {
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            });
        }
    }
    let all_first = async {
        let mut ms = Vec::new();
        for (u, s, log, rx) in first {
            match tokio::time::timeout(Duration::from_secs(15), rx).await {
                Ok(Ok(v)) => ms.push(v),
                Ok(Err(_)) => {
                    bail!(
                        "subscriber {s} of unit{u}: moq exited before any bytes; {}",
                        tail(&log)
                    )
                }
                Err(_) => bail!(
                    "subscriber {s} of unit{u}: no bytes within 15 s; {}",
                    tail(&log)
                ),
            }
        }
        anyhow::Ok(ms)
    };
    let mut first_ms = guarded(&mut relay, &mut publishers, &relay_log, all_first).await?;
    first_ms.sort_by(f64::total_cmp);
    eprintln!("all {} subscribers receiving; settling 3 s", first_ms.len());

    // The clients share the 2 cores with the relay: their CPU says how busy the machine was.
    let clients_cpu = || -> f64 { client_pids.iter().filter_map(|&p| cpu_seconds(p)).sum() };
    // Settle past the join bursts (each subscriber starts with the cached group), then
    // measure the relay over the window.
    let window = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (cpu0, clients0) = (cpu_seconds(relay_pid).context("relay CPU")?, clients_cpu());
        tally.measuring.store(true, Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.duration)).await;
        tally.measuring.store(false, Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(relay_pid).context("relay CPU")? - cpu0;
        anyhow::Ok((secs, cpu, clients_cpu() - clients0))
    };
    let (secs, cpu, clients) = guarded(&mut relay, &mut publishers, &relay_log, window).await?;
    let rss = peak_rss_mib(relay_pid).unwrap_or(f64::NAN);
    subscribers.abort_all();
    publishers.abort_all();
    let exited = tally.exited.load(Ordering::Relaxed);
    if exited > 0 {
        eprintln!("warning: {exited} subscribers exited during the run");
    }
    // Media subscriptions beyond each subscriber's first, from moq's own logs: each resent
    // a group (see the primers above), so a nonzero count means duplicate bytes.
    let resubscribes: usize = (1..=args.publishers)
        .flat_map(|u| (1..=args.subscribers).map(move |s| format!("sub{u}-{s}.log")))
        .map(|name| {
            let log = std::fs::read_to_string(logs.join(name)).unwrap_or_default();
            let media = |l: &&str| l.contains("subscribe started") && !l.contains("catalog.json");
            log.lines().filter(media).count().saturating_sub(1)
        })
        .sum();

    let mbit_s = |bytes: u64| bytes as f64 * 8.0 / secs / 1e6;
    let mut per_sub: Vec<f64> = per_sub
        .iter()
        .map(|b| mbit_s(b.load(Ordering::Relaxed)))
        .collect();
    per_sub.sort_by(f64::total_cmp);
    let delivered: f64 = per_sub.iter().sum();
    let report = serde_json::json!({
        "peer": "moq-relay",
        "version": version,
        "transport": if args.quic { "quic" } else { "webtransport" },
        "ingest": if args.avc3 { "avc3" } else { "fmp4" },
        "publishers": args.publishers,
        "subscribers": args.publishers * args.subscribers,
        "seconds": secs,
        "relay_cpu_cores": cpu / secs,
        "relay_cpu_seconds": cpu,
        "relay_peak_rss_mib": rss,
        "clients_cpu_cores": clients / secs,
        "clip_mbit_s": clip_mbit_s,
        // Into the relay, and what its subscribers asked for (each stream times its own).
        "ingress_mbit_s": mbit_s(tally.offered.load(Ordering::Relaxed)),
        "offered_mbit_s": mbit_s(tally.offered.load(Ordering::Relaxed)) * args.subscribers as f64,
        "delivered_mbit_s": delivered,
        "mbit_per_cpu_second": delivered * secs / cpu,
        // Far below the clip rate: a subscriber stalled; above it: duplicates or a backlog.
        "per_subscriber_mbit_s_min": per_sub.first(),
        "per_subscriber_mbit_s_max": per_sub.last(),
        "first_frame_ms_p50": percentile(&first_ms, 0.50),
        "first_frame_ms_p95": percentile(&first_ms, 0.95),
        "subscribers_exited": exited,
        "subscriber_resubscribes": resubscribes,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    drop(children);
    Ok(())
}
