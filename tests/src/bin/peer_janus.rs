//! Janus (the peer SFU) on the workload of `loadrun-webrtc`: one H.264 publisher (the clip
//! looped at 30 fps by ffmpeg as RTP into a streaming-plugin mountpoint) and N webrtc-rs
//! viewers counting RTP. Prints one JSON object with Janus's CPU and memory over the measured
//! window, to set the hub's CPU per viewer against. Run in release, as root:
//!
//!   peer-janus --clip clip.h264 --viewers 50 --duration 15 [--keep]
//!
//! `--keep` keeps the working directory (Janus's configuration and log).

use std::fs::File;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCIceGatheringState;
use rtc::shared::marshal::MarshalSize;
use serde_json::{Value, json};
use tianwang_tests::console::peer_connection;
use tianwang_tests::{cpu_seconds, peak_rss_mib, percentile, terminate};
use tokio::sync::watch;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{PeerConnection, PeerConnectionEventHandler};

/// Set in the re-executed process, which runs inside its own network namespace.
const NETNS_ENV: &str = "PEER_JANUS_NETNS";
const IFACE: &str = "tw0";
const ADDR: &str = "10.77.0.1";
const API: &str = "http://127.0.0.1:8088/janus";
const FPS: f64 = 30.0;
const JANUS_LIB: &str = "/usr/lib/x86_64-linux-gnu/janus";

struct Args {
    clip: PathBuf,
    viewers: usize,
    duration: u64,
    keep: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let (mut clip, mut viewers, mut duration, mut keep) = (None, 10, 15, false);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--keep" {
            keep = true;
            continue;
        }
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--clip" => clip = Some(PathBuf::from(value)),
            "--viewers" => viewers = value.parse().context("--viewers")?,
            "--duration" => duration = value.parse().context("--duration")?,
            other => bail!("unknown flag {other} (--clip, --viewers, --duration, --keep)"),
        }
    }
    let clip = clip.context("--clip PATH.h264 is required")?;
    if viewers == 0 || duration == 0 {
        bail!("--viewers and --duration must be at least 1");
    }
    Ok(Args {
        clip,
        viewers,
        duration,
        keep,
    })
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped, on error paths too.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        terminate(&mut self.0);
    }
}

/// Spawned from the main thread under `setpriv --pdeathsig KILL`, so that the child dies
/// with this process even if it is killed outright (no `unsafe` pre_exec needed).
fn spawn(
    program: &str,
    args: &[&str],
    stdin: Stdio,
    out: Stdio,
    err: Stdio,
) -> anyhow::Result<Guard> {
    let child = Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", program])
        .args(args)
        .stdin(stdin)
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    Ok(Guard(child))
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args(args)
        .status()
        .context("running ip")?;
    if !status.success() {
        bail!("`ip {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Janus's ICE skips loopback interfaces, so the namespace gets a veth end with an address
/// (the dummy link type is not available in this kernel) and a default route through it
/// (Janus finds its local IP by a route lookup).
fn netns_up() -> anyhow::Result<()> {
    ip(&["link", "set", "lo", "up"])?;
    ip(&["link", "add", IFACE, "type", "veth", "peer", "name", "tw1"])?;
    ip(&["addr", "add", &format!("{ADDR}/24"), "dev", IFACE])?;
    ip(&["link", "set", IFACE, "up"])?;
    ip(&["link", "set", "tw1", "up"])?;
    ip(&["route", "add", "default", "dev", IFACE])
}

/// The `.so` names in a Janus module folder other than `keep`, for a `disable` list.
fn others(folder: &str, keep: &str) -> anyhow::Result<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(format!("{JANUS_LIB}/{folder}")).context(folder.to_string())? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".so") && name != keep {
            names.push(name);
        }
    }
    Ok(names.join(","))
}

/// Only the streaming plugin and the HTTP transport load; one RTP mountpoint (id 1, H.264).
fn write_config(dir: &Path) -> anyhow::Result<()> {
    let janus = format!(
        r#"general: {{ configs_folder = "{}", plugins_folder = "{JANUS_LIB}/plugins",
    transports_folder = "{JANUS_LIB}/transports", debug_level = 4 }}
nat: {{ ice_enforce_list = "{IFACE}" }}
plugins: {{ disable = "{}" }}
transports: {{ disable = "{}" }}
loggers: {{ disable = "{}" }}
"#,
        dir.display(),
        others("plugins", "libjanus_streaming.so")?,
        others("transports", "libjanus_http.so")?,
        others("loggers", "")?,
    );
    let http = r#"general: { json = "plain", base_path = "/janus", http = true, port = 8088,
    ip = "127.0.0.1", https = false }
admin: { admin_http = false, admin_https = false }
"#;
    let streaming = r#"clip: { type = "rtp", id = 1, description = "clip", media = ({
    type = "video", mid = "v", port = 5004, pt = 96, codec = "h264",
    fmtp = "profile-level-id=42e01f;packetization-mode=1" }) }
"#;
    for (name, text) in [
        ("janus.jcfg", janus.as_str()),
        ("janus.transport.http.jcfg", http),
        ("janus.plugin.streaming.jcfg", streaming),
    ] {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))?;
    }
    Ok(())
}

/// Access units in an Annex-B clip: slices whose first_mb_in_slice is 0 (its ue(v) code
/// is the single bit 1), since x264's sliced threads put several slices in a frame.
fn count_frames(clip: &[u8]) -> usize {
    clip.windows(5)
        .filter(|w| w[..3] == [0, 0, 1] && matches!(w[3] & 0x1f, 1 | 5) && w[4] & 0x80 != 0)
        .count()
}

static TRANSACTION: AtomicU64 = AtomicU64::new(0);

/// Janus's REST API: requests carry a transaction id; plugin events come by long-poll.
async fn post(http: &reqwest::Client, path: &str, mut body: Value) -> anyhow::Result<Value> {
    body["transaction"] = json!(format!("t{}", TRANSACTION.fetch_add(1, Ordering::Relaxed)));
    let response = http
        .post(format!("{API}{path}"))
        .body(body.to_string())
        .timeout(Duration::from_secs(10))
        .send()
        .await?
        .bytes()
        .await?;
    let v: Value = serde_json::from_slice(&response).context("decoding Janus's reply")?;
    if v["janus"] == "error" {
        bail!("Janus: {}", v["error"]);
    }
    Ok(v)
}

/// A new session with a streaming-plugin handle: (session id, the handle's path).
async fn attach(http: &reqwest::Client) -> anyhow::Result<(u64, String)> {
    let id = |v: Value| {
        v["data"]["id"]
            .as_u64()
            .with_context(|| format!("no id in {v}"))
    };
    let session = id(post(http, "", json!({"janus": "create"})).await?)?;
    let body = json!({"janus": "attach", "plugin": "janus.plugin.streaming"});
    let handle = id(post(http, &format!("/{session}"), body).await?)?;
    Ok((session, format!("/{session}/{handle}")))
}

/// Waits (Janus holds the request up to 30 s) for a session's next events.
async fn events(http: &reqwest::Client, session: u64) -> anyhow::Result<Vec<Value>> {
    let response = http
        .get(format!("{API}/{session}?maxev=10"))
        .timeout(Duration::from_secs(40))
        .send()
        .await?
        .bytes()
        .await?;
    Ok(
        match serde_json::from_slice(&response).context("decoding Janus's event")? {
            Value::Array(list) => list,
            one => vec![one],
        },
    )
}

/// What one viewer received.
#[derive(Default)]
struct Counts {
    bytes: u64,
    frames: u64,
    first: Option<Instant>,
}

struct Handler {
    counts: Arc<Mutex<Counts>>,
    gathered: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.send_replace(true);
        }
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let counts = Arc::clone(&self.counts);
        tokio::spawn(async move {
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(p) = event {
                    let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
                    c.bytes += (p.header.marshal_size() + p.payload.len()) as u64;
                    c.frames += u64::from(p.header.marker);
                    c.first.get_or_insert_with(Instant::now);
                }
            }
        });
    }
}

struct Viewer {
    _pc: Arc<dyn PeerConnection>,
    counts: Arc<Mutex<Counts>>,
    watched: Instant,
    _poll: tokio::task::JoinHandle<()>,
}

impl Viewer {
    /// (bytes, frames) so far, and ms from `watch` to the first packet.
    fn counts(&self) -> (u64, u64, Option<f64>) {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let ms = c
            .first
            .map(|t| t.saturating_duration_since(self.watched).as_secs_f64() * 1e3);
        (c.bytes, c.frames, ms)
    }
}

/// One viewer as a browser would do it: session, handle, watch, answer Janus's offer (its
/// candidates are in the SDP; ours go in the answer after gathering), start.
async fn viewer(http: reqwest::Client) -> anyhow::Result<Viewer> {
    let (session, path) = attach(&http).await.context("create and attach")?;

    // The same client as the hub's console viewers, H.264 at the payload type Janus offers.
    let counts = Arc::new(Mutex::new(Counts::default()));
    let (gathered, mut gathered_rx) = watch::channel(false);
    let handler = Arc::new(Handler {
        counts: Arc::clone(&counts),
        gathered,
    });
    let pc = peer_connection(handler, 96, format!("{ADDR}:0")).await?;

    let watched = Instant::now();
    let body = json!({"janus": "message", "body": {"request": "watch", "id": 1}});
    post(&http, &path, body).await.context("watch")?;
    let offer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            for event in events(&http, session).await? {
                if let Some(sdp) = event["jsep"]["sdp"].as_str() {
                    return anyhow::Ok(sdp.to_string());
                }
                if let Some(error) = event["plugindata"]["data"]["error"].as_str() {
                    bail!("Janus refused watch: {error}");
                }
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no offer from Janus within 10 s"))??;
    pc.set_remote_description(RTCSessionDescription::offer(offer)?)
        .await?;
    let answer = pc.create_answer(None).await?;
    pc.set_local_description(answer).await?;
    tokio::time::timeout(Duration::from_secs(5), gathered_rx.wait_for(|done| *done))
        .await
        .map_err(|_| anyhow!("ICE gathering not complete within 5 s"))??;
    let sdp = pc
        .local_description()
        .await
        .context("no local description")?
        .sdp;
    let body = json!({"janus": "message", "body": {"request": "start"},
                      "jsep": {"type": "answer", "sdp": sdp}});
    post(&http, &path, body).await.context("start")?;

    // Janus drops a session after 60 s without requests: keep one long-poll outstanding, as
    // janus.js does, and show any plugin error it reports.
    let poll = tokio::spawn(async move {
        loop {
            match events(&http, session).await {
                Ok(list) => {
                    for e in list
                        .iter()
                        .filter(|e| !e["plugindata"]["data"]["error"].is_null())
                    {
                        eprintln!("session {session}: {e}");
                    }
                }
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    });
    Ok(Viewer {
        _pc: pc,
        counts,
        watched,
        _poll: poll,
    })
}

/// Waits until ffmpeg's RTP reaches the mountpoint, so that the viewers' first-packet times
/// are Janus's, not ffmpeg's start-up (loadrun-webrtc also lets its publishers run first).
async fn wait_feed(http: &reqwest::Client, janus_up: Instant) -> anyhow::Result<()> {
    let (session, path) = attach(http).await?;
    let info = json!({"janus": "message", "body": {"request": "info", "id": 1}});
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = post(http, &path, info.clone()).await?;
        let age = v["plugindata"]["data"]["info"]["media"][0]["age_ms"].as_u64();
        // The age counts from the mountpoint's creation until a packet comes: trust a small
        // one only once Janus has been up for longer than that.
        if janus_up.elapsed() > Duration::from_secs(1) && age.is_some_and(|ms| ms < 100) {
            post(http, &format!("/{session}"), json!({"janus": "destroy"})).await?;
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no RTP from ffmpeg reached Janus's mountpoint within 10 s (age {age:?} ms)");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run(args: &Args, dir: &Path) -> anyhow::Result<Value> {
    let clip =
        std::fs::read(&args.clip).with_context(|| format!("reading {}", args.clip.display()))?;
    let frames = count_frames(&clip);
    if frames == 0 {
        bail!(
            "{} holds no H.264 frames (Annex-B expected)",
            args.clip.display()
        );
    }
    let offered = clip.len() as f64 * 8.0 * FPS / frames as f64 / 1e6;

    write_config(dir)?;
    let log = File::create(dir.join("janus.log")).context("creating janus.log")?;
    let (cfg, conf) = (
        dir.display().to_string(),
        dir.join("janus.jcfg").display().to_string(),
    );
    let mut janus = spawn(
        "janus",
        &["-F", &cfg, "-C", &conf, "-o"],
        Stdio::null(),
        log.try_clone()?.into(),
        log.into(),
    )?;
    let pid = janus.0.id();
    let http = reqwest::Client::new();
    let started = Instant::now();
    let info = loop {
        if let Some(status) = janus.0.try_wait()? {
            bail!("janus exited at start ({status})");
        }
        let get = http
            .get(format!("{API}/info"))
            .timeout(Duration::from_secs(2));
        if let Ok(response) = get.send().await
            && let Ok(body) = response.bytes().await
            && let Ok(info) = serde_json::from_slice::<Value>(&body)
        {
            break info;
        }
        if started.elapsed() > Duration::from_secs(15) {
            bail!("Janus's HTTP API not up within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let janus_up = Instant::now();
    let version = info["version_string"]
        .as_str()
        .unwrap_or("unknown")
        .to_string();

    // ffmpeg's -stream_loop cannot seek a raw H.264 file, so the clip is written to its
    // stdin over and over; its raw demuxer then stamps a continuous 30 fps, -re paces it.
    let url = format!("rtp://{ADDR}:5004?pkt_size=1200");
    let opts = "-hide_banner -loglevel error -re -framerate 30 -f h264 -i pipe:0 -c copy -an \
                -f rtp -payload_type 96";
    let opts: Vec<&str> = opts.split_whitespace().chain([url.as_str()]).collect();
    // Its stdout gets the SDP it prints, and ours is the report's.
    let mut ffmpeg = spawn(
        "ffmpeg",
        &opts,
        Stdio::piped(),
        Stdio::null(),
        Stdio::inherit(),
    )?;
    let mut stdin = ffmpeg.0.stdin.take().context("ffmpeg stdin")?;
    std::thread::spawn(move || while stdin.write_all(&clip).is_ok() {});

    wait_feed(&http, janus_up)
        .await
        .context("waiting for the feed")?;
    eprintln!(
        "janus {version} (pid {pid}) up; connecting {} viewers",
        args.viewers
    );
    let setups = (0..args.viewers).map(|i| {
        let http = http.clone();
        async move { viewer(http).await.with_context(|| format!("viewer {i}")) }
    });
    let viewers = futures::future::try_join_all(setups).await?;

    // Every viewer playing, as loadrun-webrtc waits for every tile.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ttff = loop {
        let firsts: Vec<Option<f64>> = viewers.iter().map(|v| v.counts().2).collect();
        if let Some(ms) = firsts.iter().copied().collect::<Option<Vec<f64>>>() {
            break ms;
        }
        if Instant::now() > deadline {
            let missing: Vec<usize> = (0..firsts.len()).filter(|&i| firsts[i].is_none()).collect();
            bail!("viewers {missing:?} got no RTP within 60 s of their watch");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    ttff.sort_by(f64::total_cmp);
    eprintln!(
        "all viewers playing; 3 s to settle, then {} s measured",
        args.duration
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let snapshot = || -> anyhow::Result<(u64, u64, f64)> {
        let (b, f) = viewers
            .iter()
            .map(|v| v.counts())
            .fold((0, 0), |(b, f), c| (b + c.0, f + c.1));
        Ok((b, f, cpu_seconds(pid).context("Janus's /proc stat")?))
    };
    let (bytes0, frames0, cpu0) = snapshot()?;
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let (bytes1, frames1, cpu1) = snapshot()?;
    let secs = window.elapsed().as_secs_f64();
    let rss = peak_rss_mib(pid).context("Janus's /proc status")?;
    if let Some(status) = ffmpeg.0.try_wait()? {
        bail!("ffmpeg stopped feeding during the run ({status})");
    }
    let cpu = cpu1 - cpu0;
    let n = args.viewers as f64;
    Ok(json!({
        "peer": "janus",
        "version": version,
        "publishers": 1,
        "subscribers": args.viewers,
        "seconds": secs,
        "relay_cpu_cores": cpu / secs,
        "relay_cpu_seconds": cpu,
        "relay_peak_rss_mib": rss,
        "ingress_mbit_s": offered,
        "offered_mbit_s": offered * args.viewers as f64,
        "delivered_mbit_s": (bytes1 - bytes0) as f64 * 8.0 / secs / 1e6,
        "frames_per_s_delivered": (frames1 - frames0) as f64 / secs,
        "first_frame_ms_p50": percentile(&ttff, 0.5),
        "first_frame_ms_p95": percentile(&ttff, 0.95),
        "cpu_ms_per_viewer_second": cpu * 1000.0 / (n * secs),
    }))
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    if std::env::var_os(NETNS_ENV).is_none() {
        // Janus offers no loopback candidates: run everything in a private network
        // namespace (which also keeps ports 8088 and 5004 to ourselves).
        let exe = std::env::current_exe().context("own executable")?;
        let err = Command::new("unshare")
            .args(["--net", "--"])
            .arg(exe)
            .args(std::env::args_os().skip(1))
            .env(NETNS_ENV, "1")
            .exec();
        bail!("re-executing under `unshare --net` (needs root): {err}");
    }
    netns_up().context("setting up the network namespace")?;
    let dir = tempfile::Builder::new().prefix("peer-janus-").tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // block_on runs `run` on this (main) thread, which the children's pdeathsig is tied to.
    let result = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(&args, dir.path()) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow!("terminated")),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    if result.is_err()
        && let Ok(log) = std::fs::read_to_string(dir.path().join("janus.log"))
    {
        let lines: Vec<&str> = log.lines().collect();
        eprintln!("--- last lines of janus.log ---");
        for line in &lines[lines.len().saturating_sub(20)..] {
            eprintln!("{line}");
        }
    }
    if args.keep {
        eprintln!("kept {}", dir.keep().display());
    }
    println!("{}", serde_json::to_string_pretty(&result?)?);
    Ok(())
}
