//! The `field-agent` command: run one unit, or simulate many.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use field_agent::broadcast::{LocalBroadcast, audio_info, video_info};
use field_agent::capture::{
    Audio, Capture, EncodeSettings, Source, pipeline_description, track_kinds,
};
use field_agent::directives::{Directives, Executor};
use field_agent::position::PositionSource;
use field_agent::simulate;
use field_agent::uplink::{self, UplinkConfig, UplinkStats};
use tianwang_transport::Trust;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "field-agent",
    version,
    about = "Tianwang field agent: capture, encode and stream a unit to its hub over QUIC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Capture, encode and stream one unit.
    Run(RunArgs),
    /// Stream N virtual units from one clip encoded once (demos, load).
    Simulate(SimulateArgs),
    /// Write the clip `simulate` replays, as an H.264 Annex-B file (peers in the benchmarks
    /// are fed the same bytes).
    Clip(ClipArgs),
}

#[derive(Args)]
struct Link {
    /// The hub's QUIC address, host:port.
    #[arg(long, env = "TIANWANG_HUB")]
    hub: String,
    /// Certificate (or CA) to trust for the hub; a dev hub's is DATA/tls/hub.crt.
    #[arg(long, env = "TIANWANG_CA")]
    ca: Option<PathBuf>,
    /// Trust any certificate (development only).
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
}

impl Link {
    fn trust(&self) -> anyhow::Result<Trust> {
        match (&self.ca, self.insecure) {
            (_, true) => Ok(Trust::Insecure),
            (Some(p), false) => Ok(Trust::from_ca_file(p)?),
            (None, false) => {
                bail!("no certificate to trust the hub with: pass --ca FILE or --insecure")
            }
        }
    }
}

#[derive(Args)]
struct Encode {
    #[arg(long, default_value_t = 640)]
    width: u32,
    #[arg(long, default_value_t = 360)]
    height: u32,
    #[arg(long, default_value_t = 30)]
    fps: u32,
    /// Video bitrate, kbit/s.
    #[arg(long, default_value_t = 1500)]
    bitrate: u32,
    /// Seconds between keyframes (the group length).
    #[arg(long, default_value_t = 2.0)]
    keyframe_interval: f64,
}

impl Encode {
    fn settings(&self) -> anyhow::Result<EncodeSettings> {
        if !(1..=120).contains(&self.fps) || self.width < 16 || self.height < 16 {
            bail!(
                "unreasonable picture: {}x{} at {} fps",
                self.width,
                self.height,
                self.fps
            );
        }
        if !(0.1..=60.0).contains(&self.keyframe_interval) {
            bail!("--keyframe-interval must be within 0.1 ..= 60 seconds");
        }
        Ok(EncodeSettings {
            width: self.width,
            height: self.height,
            framerate: self.fps,
            bitrate: self.bitrate,
            keyframe_interval: ((self.keyframe_interval * f64::from(self.fps)).round() as u32)
                .max(1),
        })
    }
}

/// The default data dir, relative to where the agent starts.
const DATA_DIR: &str = "field-agent-data";

/// Creates the data dir if needed: the directive log, marks, instructions, snapshots and
/// talkback live there.
fn data_dir(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(path)
        .with_context(|| format!("creating the data dir {}", path.display()))?;
    Ok(path.to_path_buf())
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    link: Link,
    /// This unit's id.
    #[arg(long, env = "TIANWANG_UNIT")]
    unit: String,
    /// Device token from the hub (`hub token issue --role device --subject UNIT`).
    #[arg(long, env = "TIANWANG_DEVICE_TOKEN", hide_env_values = true)]
    token: String,
    /// test | noise | v4l2:/dev/videoN | file:PATH
    #[arg(long, default_value = "test")]
    source: Source,
    /// Sound: test tone, the default microphone, the file's own, or none.
    /// Default: test for the test source, file for files, none for cameras.
    #[arg(long, value_enum)]
    audio: Option<Audio>,
    /// Frames the uplink may trail the encoder before it skips to the newest group.
    #[arg(long, default_value_t = 256)]
    queue_frames: usize,
    /// A simulated route for the GPS position (`lat,lon` lines, `speed N`, `loop`).
    #[arg(long, conflicts_with_all = ["nmea", "gpsd"])]
    route: Option<PathBuf>,
    /// NMEA 0183 for the position: a GPS receiver's serial device, or a recorded file
    /// (replayed an RMC a second; its last fix stands at the end).
    #[arg(long, conflicts_with = "gpsd")]
    nmea: Option<PathBuf>,
    /// gpsd for the position (HOST:PORT, usually 127.0.0.1:2947).
    #[arg(long)]
    gpsd: Option<String>,
    /// Where the unit keeps directive state, marks, instructions, snapshots and talkback
    /// (`talkback/<talk>.ogg`, `talkback.jsonl`).
    #[arg(long, env = "TIANWANG_AGENT_DATA", default_value = DATA_DIR)]
    data_dir: PathBuf,
    /// Keep talkback and video links from the command centre in files only; do not play
    /// or show them.
    #[arg(long)]
    no_speaker: bool,
    /// The spool (`DATA/spool`): every encoded group kept until the hub has recorded it,
    /// so a dropped link loses no evidence; at most this many MiB (0: no spool).
    #[arg(long, default_value_t = 2048)]
    spool_mib: u64,
    #[command(flatten)]
    encode: Encode,
}

#[derive(Args)]
struct SimulateArgs {
    #[command(flatten)]
    link: Link,
    /// Number of virtual units: PREFIX1 .. PREFIXN.
    #[arg(long, default_value_t = 4)]
    units: usize,
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// `unit token` lines (`hub token fleet`).
    #[arg(long, env = "TIANWANG_DEVICE_TOKENS")]
    tokens: PathBuf,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<u64>,
    /// A directory of routes: unit UNIT walks UNIT.route if there is one.
    #[arg(long)]
    routes: Option<PathBuf>,
    /// Where the units keep their files: one subdirectory per unit id (talkback is kept
    /// there, never played).
    #[arg(long, env = "TIANWANG_AGENT_DATA", default_value = DATA_DIR)]
    data_dir: PathBuf,
    /// A spool per unit (`DATA/<unit>/spool`) of at most this many MiB; 0 (the default:
    /// load runs measure the hub, not the disk) for none.
    #[arg(long, default_value_t = 0)]
    spool_mib: u64,
    /// Begin each video frame with its capture time in an SEI message, so viewers that see
    /// only the bitstream (WebRTC) can measure delay.
    #[arg(long)]
    stamp: bool,
    #[command(flatten)]
    encode: Encode,
}

#[derive(Args)]
struct ClipArgs {
    /// The file to write.
    #[arg(long)]
    out: PathBuf,
    /// Groups (keyframe intervals) to encode: the file loops seamlessly.
    #[arg(long, default_value_t = 2)]
    groups: u32,
    #[command(flatten)]
    encode: Encode,
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Cancels `token` on SIGINT or SIGTERM.
fn stop_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        info!("stopping");
        token.cancel();
    });
}

/// How long one press of the SOS button (SIGUSR1) keeps SOS set in the telemetry.
const SOS_HOLD: Duration = Duration::from_secs(30);

/// SIGUSR1 is the SOS button (`kill -USR1 <pid>`, or a key daemon on the device).
fn sos_on_signal(presses: Vec<Arc<std::sync::Mutex<Option<std::time::Instant>>>>) {
    tokio::spawn(async move {
        let Ok(mut usr1) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        else {
            return;
        };
        while usr1.recv().await.is_some() {
            tracing::warn!("SOS pressed");
            let until = std::time::Instant::now() + SOS_HOLD;
            for p in &presses {
                if let Ok(mut p) = p.lock() {
                    *p = Some(until);
                }
            }
        }
    });
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Simulate(args) => simulate(args).await,
        Command::Clip(args) => write_clip(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = args.encode.settings()?;
    let dir = data_dir(&args.data_dir)?;
    let audio = args.audio.unwrap_or(match args.source {
        Source::Test | Source::Noise => Audio::Test,
        Source::File(_) => Audio::File,
        Source::V4l2(_) => Audio::None,
    });
    let (_, has_audio) = track_kinds(&args.source, audio);
    let mut infos = vec![video_info(
        0,
        settings.width,
        settings.height,
        settings.framerate,
        settings.bitrate * 1000,
    )];
    if has_audio {
        infos.push(audio_info(1));
    }
    let broadcast = LocalBroadcast::new(&args.unit, infos, args.queue_frames);
    let spool = open_spool(&broadcast, &dir, args.spool_mib)?;
    let description = pipeline_description(&args.unit, &args.source, audio, &settings);
    let capture = Capture::start(&description, &broadcast, &settings)?;
    info!(unit = %args.unit, source = ?args.source, data = %dir.display(), "capturing");
    let executor = Executor::open(&dir, Arc::clone(&broadcast), capture.encoder())
        .with_context(|| format!("opening the directive log in {}", dir.display()))?;
    let directives = Directives::start(executor);

    let shutdown = CancellationToken::new();
    stop_on_signal(shutdown.clone());
    let mut config = UplinkConfig::new(
        args.link.hub.clone(),
        args.token.clone(),
        args.link.trust()?,
    );
    config.data_dir = dir.clone();
    config.speaker = !args.no_speaker;
    if let Some(path) = &args.route {
        let route = field_agent::route::Route::load(path)?;
        config.position = Some(PositionSource::Route(
            Arc::new(route),
            std::time::Instant::now(),
        ));
    } else if let Some(path) = &args.nmea {
        let latest = field_agent::position::nmea(path.clone(), shutdown.clone());
        config.position = Some(PositionSource::Live(latest));
    } else if let Some(addr) = &args.gpsd {
        let latest = field_agent::position::gpsd(addr.clone(), shutdown.clone());
        config.position = Some(PositionSource::Live(latest));
    }
    sos_on_signal(vec![Arc::clone(&config.sos)]);
    let stats = Arc::new(UplinkStats::default());
    let mut uplink = tokio::spawn(uplink::run(
        config,
        Arc::clone(&broadcast),
        directives,
        Arc::clone(&stats),
        shutdown.clone(),
    ));
    tokio::select! {
        r = capture.wait() => {
            shutdown.cancel();
            r?;
            info!("end of input");
        }
        // The uplink ends by itself only when the hub refuses this unit.
        r = &mut uplink => return Ok(r.context("uplink task")??),
        _ = shutdown.cancelled() => {}
    }
    uplink.await.context("uplink task")??;
    close_spool(spool).await;
    Ok(())
}

/// The unit's spool in `dir/spool`, attached to its broadcast; none for 0 MiB.
fn open_spool(
    broadcast: &LocalBroadcast,
    dir: &std::path::Path,
    mib: u64,
) -> anyhow::Result<Option<Arc<field_agent::spool::Spool>>> {
    if mib == 0 {
        return Ok(None);
    }
    let spool = field_agent::spool::Spool::open(&dir.join("spool"), mib << 20)
        .with_context(|| format!("opening the spool in {}", dir.display()))?;
    broadcast.set_spool(Arc::clone(&spool));
    Ok(Some(spool))
}

/// Completes the groups being written (synced) before the agent exits.
async fn close_spool(spool: Option<Arc<field_agent::spool::Spool>>) {
    if let Some(spool) = spool {
        let _ = tokio::task::spawn_blocking(move || spool.close()).await;
    }
}

async fn write_clip(args: ClipArgs) -> anyhow::Result<()> {
    let settings = args.encode.settings()?;
    let groups = args.groups.max(1);
    let clip = tokio::task::spawn_blocking(move || simulate::encode_clip(&settings, groups))
        .await
        .context("clip encoder")??;
    // The encoder's access units are Annex-B with parameter sets before each keyframe, so
    // the file is their concatenation.
    let bytes = clip
        .video
        .iter()
        .map(|f| &f.payload[..])
        .collect::<Vec<_>>()
        .concat();
    std::fs::write(&args.out, &bytes)
        .with_context(|| format!("writing the clip to {}", args.out.display()))?;
    info!(
        frames = clip.video.len(),
        kbps = clip.video_bitrate_kbps() as u64,
        path = %args.out.display(),
        "clip written"
    );
    Ok(())
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    if args.units == 0 {
        bail!("--units must be at least 1");
    }
    let settings = args.encode.settings()?;
    let tokens = simulate::read_tokens(&args.tokens)?;
    let trust = args.link.trust()?;
    let dir = data_dir(&args.data_dir)?;
    let units: Vec<(String, String)> = (1..=args.units)
        .map(|i| {
            let unit = format!("{}{i}", args.prefix);
            match tokens.get(&unit) {
                Some(t) => Ok((unit, t.clone())),
                None => bail!("no token for {unit} in {}", args.tokens.display()),
            }
        })
        .collect::<anyhow::Result<_>>()?;

    // Renditions for QUALITY directives are encoded later, only when one asks.
    const GROUPS: u32 = 2;
    let clip = tokio::task::spawn_blocking(move || simulate::encode_clip(&settings, GROUPS))
        .await
        .context("clip encoder")??;
    info!(
        frames = clip.video.len(),
        kbps = clip.video_bitrate_kbps() as u64,
        units = units.len(),
        "clip encoded once; starting units"
    );
    let renditions = simulate::Renditions::new(clip, GROUPS);
    let clip = Arc::clone(renditions.base());
    let shutdown = CancellationToken::new();
    stop_on_signal(shutdown.clone());
    if let Some(secs) = args.duration {
        let s = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            s.cancel();
        });
    }
    // Spread the units' keyframes over one group so they do not all burst at once.
    let group = Duration::from_micros(clip.duration_us / 2);
    let mut tasks = tokio::task::JoinSet::new();
    let mut spools = Vec::new();
    let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let n = units.len() as u32;
    for (i, (unit, token)) in units.into_iter().enumerate() {
        let infos = vec![
            video_info(
                0,
                clip.settings.width,
                clip.settings.height,
                clip.settings.framerate,
                clip.settings.bitrate * 1000,
            ),
            audio_info(1),
        ];
        let broadcast = LocalBroadcast::new(&unit, infos, 256);
        let offset = group * i as u32 / n;
        let video = simulate::UnitVideo::new(Arc::clone(&renditions));
        let unit_dir = data_dir(&dir.join(field_agent::file_name_for(&unit)))?;
        spools.extend(open_spool(&broadcast, &unit_dir, args.spool_mib)?);
        let executor = Executor::open(&unit_dir, Arc::clone(&broadcast), video.clone())
            .with_context(|| format!("opening the directive log in {}", unit_dir.display()))?;
        let directives = Directives::start(executor);
        tasks.spawn(simulate::play(
            video,
            Arc::clone(&broadcast),
            offset,
            args.stamp,
            shutdown.clone(),
        ));
        let mut config = UplinkConfig::new(args.link.hub.clone(), token, trust.clone());
        config.data_dir = unit_dir;
        if let Some(dir) = &args.routes {
            let path = dir.join(format!("{unit}.route"));
            if path.exists() {
                let route = field_agent::route::Route::load(&path)?;
                config.position = Some(PositionSource::Route(
                    Arc::new(route),
                    std::time::Instant::now(),
                ));
            }
        }
        // SIGUSR1 presses the first unit's SOS button.
        if i == 0 {
            sos_on_signal(vec![Arc::clone(&config.sos)]);
        }
        let stats = Arc::new(UplinkStats::default());
        let stop = shutdown.clone();
        let refused = Arc::clone(&refused);
        tasks.spawn(async move {
            if let Err(e) = uplink::run(config, broadcast, directives, stats, stop.clone()).await {
                tracing::error!(unit = %unit, error = %e, "unit gave up");
                refused.store(true, std::sync::atomic::Ordering::Relaxed);
                stop.cancel();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    for spool in spools {
        close_spool(Some(spool)).await;
    }
    if refused.load(std::sync::atomic::Ordering::Relaxed) {
        bail!("the hub refused a simulated unit (see the log above)");
    }
    Ok(())
}
