//! The `hub` command: serve, demo, watch, token.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use hub::auth::Role;
use hub::config::Config;
use hub::server::{RunningHub, termination};
use tianwang_transport::Trust;

#[derive(Parser)]
#[command(
    name = "hub",
    version,
    about = "Tianwang hub: real-time video and telemetry relay for a court's command centre"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a hub.
    Serve(ServeArgs),
    /// A hub with embedded defaults and simulated units, for a first look.
    Demo(DemoArgs),
    /// Subscribe to a unit over QUIC, write its video as H.264 Annex-B, report what arrived.
    Watch(WatchArgs),
    /// Issue tokens signed by this hub's key.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Cases and operations on a running hub (gRPC).
    Case(CaseArgs),
    /// Check recordings and the audit log of a data dir, or an export bundle.
    Verify(VerifyArgs),
    /// Export a case: one MP4 per unit, operation and recording, a signed manifest and the
    /// case's audit excerpt.
    Export {
        #[command(flatten)]
        hub: HubOverrides,
        /// The case number.
        #[arg(long)]
        case: String,
        /// A new (or empty) directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the hub's public key (hex), which `hub verify --export` needs.
    Key {
        #[command(flatten)]
        hub: HubOverrides,
    },
    /// The deployment CA that vouches for hubs linking in the court tree.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make a new CA: DIR/ca.crt (give it to every hub and agent) and DIR/ca.key (keep safe).
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "Tianwang deployment CA")]
        name: String,
    },
    /// Issue a hub's certificate for its court: OUT/hub.crt and OUT/hub.key, for the hub's
    /// quic.cert and quic.key.
    Issue {
        /// The CA's directory (from `hub ca init`).
        #[arg(long)]
        ca_dir: PathBuf,
        /// The hub's court code.
        #[arg(long)]
        court: String,
        /// The parent court's code; leave out for the root (the supreme court's hub).
        #[arg(long, default_value = "")]
        parent: String,
        /// A DNS name or IP address the hub is reached by (repeat for each).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Args)]
struct CaseArgs {
    /// The hub's HTTP address (gRPC is served there too).
    #[arg(long, env = "TIANWANG_URL", default_value = "http://127.0.0.1:8080")]
    hub: String,
    /// A commander or official token (auditors may list and show).
    #[arg(long, env = "TIANWANG_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    command: CaseCli,
}

#[derive(Subcommand)]
enum CaseCli {
    /// Open a case.
    Create {
        /// E.g. "(2026)京0113执1234号".
        #[arg(long)]
        number: String,
        /// The court's code; default: the hub's.
        #[arg(long)]
        court: Option<String>,
        /// A party to the case (repeat for each).
        #[arg(long = "party")]
        parties: Vec<String>,
    },
    List,
    Show {
        #[arg(long)]
        number: String,
    },
    /// Close a case (refused while one of its operations is active).
    Close {
        #[arg(long)]
        number: String,
    },
    /// Plan an operation of a case: its units' recordings in the window bind to the case.
    Operation {
        #[arg(long = "case")]
        case_number: String,
        /// Its id; default: generated.
        #[arg(long, default_value = "")]
        id: String,
        #[arg(long, default_value = "")]
        name: String,
        /// Units assigned, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        units: Vec<String>,
        /// Start, RFC 3339 (e.g. 2026-11-29T08:00:00Z); default: now.
        #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
        start: Option<std::time::SystemTime>,
        /// Length of the window.
        #[arg(long, default_value = "4h", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, allow_hyphen_values = true)]
        lat: f64,
        #[arg(long, allow_hyphen_values = true)]
        lon: f64,
        /// Radius of the place, metres.
        #[arg(long, default_value_t = 200.0)]
        radius: f64,
    },
    /// Close an operation.
    CloseOperation {
        #[arg(long)]
        id: String,
    },
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    hub: HubOverrides,
    /// Only this unit's recordings (with --data).
    #[arg(long, conflicts_with = "export")]
    unit: Option<String>,
    /// Only the units recorded for this case (with --data).
    #[arg(long, conflicts_with_all = ["export", "unit"])]
    case: Option<String>,
    /// An export directory to verify instead of a data dir.
    #[arg(long)]
    export: Option<PathBuf>,
    /// The hub's public key (hex, or a file with it; `hub key`). Required with --export;
    /// with --data, default: the data dir's own key.
    #[arg(long)]
    key: Option<String>,
}

#[derive(Args)]
struct HubOverrides {
    /// TOML configuration file (every key: deploy/hub.example.toml).
    #[arg(long, env = "TIANWANG_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (keys, certificates, recordings).
    #[arg(long, env = "TIANWANG_DATA")]
    data: Option<PathBuf>,
    /// This hub's name.
    #[arg(long, env = "TIANWANG_HUB_ID")]
    hub_id: Option<String>,
}

impl HubOverrides {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        if let Some(d) = &self.data {
            config.data_dir = d.clone();
        }
        if let Some(id) = &self.hub_id {
            config.hub_id = id.clone();
        }
        Ok(config)
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    hub: HubOverrides,
    /// QUIC listen address (UDP).
    #[arg(long, env = "TIANWANG_QUIC_LISTEN")]
    quic_listen: Option<SocketAddr>,
    /// HTTP listen address (metrics, health).
    #[arg(long, env = "TIANWANG_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
}

#[derive(Args)]
struct DemoArgs {
    /// 1: one hub. 3: a court tree on loopback (supreme, high, two intermediate courts),
    /// simulated units under each intermediate, one env file per hub.
    #[arg(long, default_value_t = 1)]
    tiers: u8,
    /// Simulated units, named sim-1 .. sim-N (per intermediate court with --tiers 3).
    #[arg(long, default_value_t = 4)]
    units: usize,
    /// Seconds to run; without it, until Ctrl-C.
    #[arg(long)]
    duration: Option<u64>,
    /// Data directory of the demo hub.
    #[arg(long, default_value = "data/demo")]
    data: PathBuf,
    #[arg(long, default_value = "127.0.0.1:4433")]
    quic_listen: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_listen: SocketAddr,
}

#[derive(Args)]
struct TrustArgs {
    /// Certificate (or CA) to trust for the hub; a dev hub's is DATA/tls/hub.crt.
    #[arg(long, env = "TIANWANG_CA")]
    ca: Option<PathBuf>,
    /// Trust any certificate (development only).
    #[arg(long, conflicts_with = "ca")]
    insecure: bool,
}

impl TrustArgs {
    fn trust(&self) -> anyhow::Result<Trust> {
        match (&self.ca, self.insecure) {
            (_, true) => {
                tracing::warn!("--insecure: the hub's certificate is not checked");
                Ok(Trust::Insecure)
            }
            (Some(p), false) => Ok(Trust::from_ca_file(p)?),
            (None, false) => bail!(
                "no certificate to trust the hub with: pass --ca FILE (a dev hub's DATA/tls/hub.crt) or --insecure"
            ),
        }
    }
}

#[derive(Args)]
struct WatchArgs {
    /// The hub's QUIC address, host:port.
    #[arg(long, env = "TIANWANG_HUB")]
    hub: String,
    /// A viewer/commander/official token (`hub token issue`).
    #[arg(long, env = "TIANWANG_TOKEN", hide_env_values = true)]
    token: String,
    #[arg(long)]
    unit: String,
    /// Seconds to watch; without it, until the stream ends or Ctrl-C.
    #[arg(long)]
    duration: Option<f64>,
    /// Write the video here (H.264 Annex-B, plays with ffplay/mpv/VLC).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    trust: TrustArgs,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print one token.
    Issue {
        #[command(flatten)]
        hub: HubOverrides,
        #[arg(long, value_enum)]
        role: Role,
        /// The unit (for a device) or the user.
        #[arg(long)]
        subject: String,
        /// The court the token belongs to (its holder sees that court and those below);
        /// default: the hub's.
        #[arg(long)]
        court: Option<String>,
        /// Lifetime, e.g. 12h, 30days.
        #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Revoke a token (`--jti`) or every token of a unit or user issued until now
    /// (`--subject`; tokens issued later work). Stored in the evidence index; a running hub
    /// refuses them within a second and closes their live sessions.
    Revoke {
        #[command(flatten)]
        hub: HubOverrides,
        /// The unit (device) or user whose tokens are revoked.
        #[arg(long, conflicts_with = "jti", required_unless_present = "jti")]
        subject: Option<String>,
        /// One token's id (its `jti` claim).
        #[arg(long)]
        jti: Option<String>,
        /// Why (kept in the index and the audit trail).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Write device tokens for PREFIX1 .. PREFIXN, one "unit token" line each (for
    /// `field-agent simulate --tokens`).
    Fleet {
        #[command(flatten)]
        hub: HubOverrides,
        #[arg(long, default_value = "sim-")]
        prefix: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long)]
        out: PathBuf,
    },
}

fn init_logging() {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,quinn=warn"));
    // tungstenite prints every WebSocket message at trace: a console's sign-in (its token)
    // and the telemetry pushed to it (officers' positions). Never above debug, whatever
    // RUST_LOG says (tests/tests/log_hygiene.rs asks for trace).
    if let Ok(cap) = "tungstenite=debug".parse() {
        filter = filter.add_directive(cap);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let mut config = args.hub.load()?;
            if let Some(a) = args.quic_listen {
                config.quic.listen = a;
            }
            if let Some(a) = args.http_listen {
                config.http.listen = a;
            }
            let hub = RunningHub::start(config).await?;
            termination().await;
            tracing::info!("shutting down");
            hub.shutdown().await;
            Ok(())
        }
        Command::Demo(args) => {
            hub::demo::run(hub::demo::DemoOptions {
                tiers: args.tiers,
                units: args.units,
                duration: args.duration.map(Duration::from_secs),
                data_dir: args.data,
                quic_listen: args.quic_listen,
                http_listen: args.http_listen,
            })
            .await
        }
        Command::Watch(args) => {
            let report = hub::watch::watch(hub::watch::WatchOptions {
                hub: args.hub,
                token: args.token,
                unit: args.unit,
                duration: args.duration.map(Duration::from_secs_f64),
                out: args.out,
                trust: args.trust.trust()?,
            })
            .await?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
                println!(
                    "unit {}: {} video frames ({} keyframes), {} audio frames, {} bytes\n\
                     first frame after {}, delay p50 {} p99 {}, late frames {}, groups reset {}",
                    report.unit,
                    report.video_frames,
                    report.keyframes,
                    report.audio_frames,
                    report.bytes,
                    ms(report.first_frame_ms),
                    ms(report.delay_p50_ms),
                    ms(report.delay_p99_ms),
                    report.late_frames,
                    report.groups_reset,
                );
            }
            if report.video_frames == 0 {
                bail!("no video frames arrived from {}", report.unit);
            }
            Ok(())
        }
        Command::Case(args) => evidence_command(EvidenceCommand::Case(args)).await,
        Command::Verify(args) => evidence_command(EvidenceCommand::Verify(args)).await,
        Command::Export { hub, case, out } => {
            evidence_command(EvidenceCommand::Export { hub, case, out }).await
        }
        Command::Key { hub } => evidence_command(EvidenceCommand::Key { hub }).await,
        Command::Ca { command } => match command {
            CaCommand::Init { dir, name } => {
                hub::cascade::cli::init(&dir, &name)?;
                println!("{}", dir.join("ca.crt").display());
                Ok(())
            }
            CaCommand::Issue {
                ca_dir,
                court,
                parent,
                names,
                out,
            } => {
                hub::cascade::cli::issue(&ca_dir, &court, &parent, &names, &out)?;
                println!("{}", out.join("hub.crt").display());
                Ok(())
            }
        },
        Command::Token { command } => match command {
            TokenCommand::Issue {
                hub,
                role,
                subject,
                court,
                ttl,
            } => {
                let config = hub.load()?;
                check_ttl(&config, ttl)?;
                let authority = hub::server::load_authority(&config)?;
                // A token always names its court: the hub's own unless told otherwise.
                let court = court.unwrap_or_else(|| config.court.code.clone());
                println!("{}", authority.issue(role, &subject, Some(&court), ttl)?);
                Ok(())
            }
            TokenCommand::Revoke {
                hub,
                subject,
                jti,
                reason,
            } => {
                let config = hub.load()?;
                let (kind, value) = match (subject, jti) {
                    (Some(s), _) => ("subject", s),
                    (None, Some(j)) => ("jti", j),
                    (None, None) => anyhow::bail!("name a --subject or a --jti"),
                };
                print!(
                    "{}",
                    hub::evidence::cli::revoke(&config, kind, &value, &reason).await?
                );
                Ok(())
            }
            TokenCommand::Fleet {
                hub,
                prefix,
                count,
                ttl,
                out,
            } => {
                let config = hub.load()?;
                check_ttl(&config, ttl)?;
                let authority = hub::server::load_authority(&config)?;
                let mut lines = String::new();
                for i in 1..=count {
                    let unit = format!("{prefix}{i}");
                    let token = authority.issue(Role::Device, &unit, None, ttl)?;
                    lines.push_str(&format!("{unit} {token}\n"));
                }
                hub::files::write_private(&out, lines.as_bytes())
                    .with_context(|| format!("writing {}", out.display()))?;
                Ok(())
            }
        },
    }
}

fn micros(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The evidence commands: `case`, `verify`, `export`, `key`.
enum EvidenceCommand {
    Case(CaseArgs),
    Verify(VerifyArgs),
    Export {
        hub: HubOverrides,
        case: String,
        out: PathBuf,
    },
    Key {
        hub: HubOverrides,
    },
}

async fn evidence_command(command: EvidenceCommand) -> anyhow::Result<()> {
    use hub::evidence::cli;
    match command {
        EvidenceCommand::Case(args) => {
            let command = match args.command {
                CaseCli::Create {
                    number,
                    court,
                    parties,
                } => cli::CaseCommand::Create {
                    number,
                    court,
                    parties,
                },
                CaseCli::List => cli::CaseCommand::List,
                CaseCli::Show { number } => cli::CaseCommand::Show { number },
                CaseCli::Close { number } => cli::CaseCommand::Close { number },
                CaseCli::Operation {
                    case_number,
                    id,
                    name,
                    units,
                    start,
                    duration,
                    lat,
                    lon,
                    radius,
                } => {
                    let start = start.unwrap_or_else(std::time::SystemTime::now);
                    cli::CaseCommand::Operation(tianwang_proto::v1::CreateOperationRequest {
                        case_number,
                        id,
                        name,
                        starts_us: micros(start),
                        ends_us: micros(start + duration),
                        latitude: lat,
                        longitude: lon,
                        radius_m: radius,
                        units,
                    })
                }
                CaseCli::CloseOperation { id } => cli::CaseCommand::CloseOperation { id },
            };
            print!("{}", cli::case(&args.hub, &args.token, command).await?);
            Ok(())
        }
        EvidenceCommand::Verify(args) => {
            let ok = match &args.export {
                Some(dir) => {
                    let Some(key) = &args.key else {
                        bail!("--export needs --key: the hub's public key (`hub key` on the hub)");
                    };
                    let report = cli::verify_bundle(dir, key)?;
                    cli::print_report(&report, &format!("export {}", dir.display()))
                }
                None => {
                    let config = args.hub.load()?;
                    let report = cli::verify_dir(
                        &config,
                        args.key.as_deref(),
                        args.unit.as_deref(),
                        args.case.as_deref(),
                    )
                    .await?;
                    cli::print_report(&report, &format!("data {}", config.data_dir.display()))
                }
            };
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        EvidenceCommand::Export { hub, case, out } => {
            let config = hub.load()?;
            print!("{}", cli::export(&config, &case, &out).await?);
            Ok(())
        }
        EvidenceCommand::Key { hub } => {
            println!("{}", cli::public_key(&hub.load()?)?);
            Ok(())
        }
    }
}

fn check_ttl(config: &Config, ttl: Duration) -> anyhow::Result<()> {
    if ttl > config.auth.max_token_ttl {
        bail!(
            "--ttl {} exceeds auth.max_token_ttl ({})",
            humantime::format_duration(ttl),
            humantime::format_duration(config.auth.max_token_ttl)
        );
    }
    Ok(())
}
