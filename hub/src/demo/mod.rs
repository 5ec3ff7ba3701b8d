//! `hub demo`: a hub with embedded defaults and N simulated units (`field-agent simulate`
//! as a child process), with tokens and addresses written to `demo.env`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use tracing::{info, warn};

use crate::auth::Role;
use crate::config::Config;
use crate::server::{RunningHub, termination};

pub mod tiers;

pub struct DemoOptions {
    /// 1: one hub; 3: a court tree (see `tiers`).
    pub tiers: u8,
    pub units: usize,
    pub duration: Option<Duration>,
    pub data_dir: PathBuf,
    pub quic_listen: SocketAddr,
    pub http_listen: SocketAddr,
}

/// The `field-agent` binary: beside this one (a cargo build puts them together) or on PATH.
pub fn find_field_agent() -> anyhow::Result<PathBuf> {
    let name = format!("field-agent{}", std::env::consts::EXE_SUFFIX);
    if let Ok(exe) = std::env::current_exe() {
        let beside = exe.with_file_name(&name);
        if beside.is_file() {
            return Ok(beside);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(&name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("the field-agent binary is neither beside hub nor on PATH: build it (cargo build --bins)")
}

pub(crate) fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    if opts.units == 0 || opts.units > 1000 {
        bail!("--units must be within 1 ..= 1000");
    }
    match opts.tiers {
        1 => {}
        3 => return tiers::run(opts).await,
        n => bail!("--tiers {n}: 1 (one hub) or 3 (supreme, high, two intermediates)"),
    }
    let agent = find_field_agent()?;
    let config = Config {
        hub_id: "demo".into(),
        data_dir: opts.data_dir.clone(),
        quic: crate::config::QuicConfig {
            listen: opts.quic_listen,
            ..Default::default()
        },
        http: crate::config::HttpConfig {
            listen: opts.http_listen,
        },
        ..Config::default()
    };
    let hub = RunningHub::start(config.clone()).await?;
    let authority = &hub.context.authority;
    let day = Duration::from_secs(24 * 3600);
    let console_token = authority.issue(Role::Commander, "demo-console", None, day)?;
    // Officials also talk to officers (push-to-talk).
    let official_token = authority.issue(Role::Official, "demo-official", None, day)?;
    // A phone joins as unit officer-1 through the officer app (/officer).
    let officer_token = authority.issue(Role::Device, "officer-1", None, day)?;
    let mut tokens = String::new();
    for i in 1..=opts.units {
        let unit = format!("sim-{i}");
        let token = authority.issue(Role::Device, &unit, None, day)?;
        let _ = writeln!(tokens, "{unit} {token}");
    }
    let case = demo_case(&hub, opts.units).await;
    let tokens_path = absolute(&config.data_dir.join("devices.tokens"));
    crate::files::write_private(&tokens_path, tokens.as_bytes())
        .with_context(|| format!("writing {}", tokens_path.display()))?;
    let ca = absolute(&config.cert_paths().0);
    let env_path = absolute(&config.data_dir.join("demo.env"));
    let env = format!(
        "TIANWANG_HUB={}\nTIANWANG_HTTP=http://{}\nTIANWANG_TOKEN={}\nTIANWANG_CA={}\n\
         TIANWANG_OFFICIAL_TOKEN={}\nTIANWANG_OFFICER_TOKEN={}\n",
        hub.quic_addr,
        hub.http_addr,
        console_token,
        ca.display(),
        official_token,
        officer_token
    );
    crate::files::write_private(&env_path, env.as_bytes())
        .with_context(|| format!("writing {}", env_path.display()))?;

    let routes = absolute(&config.data_dir.join("routes"));
    write_routes(&routes).with_context(|| format!("writing {}", routes.display()))?;
    let mut child = tokio::process::Command::new(&agent)
        .arg("simulate")
        .arg("--routes")
        .arg(&routes)
        .arg("--hub")
        .arg(hub.quic_addr.to_string())
        .arg("--units")
        .arg(opts.units.to_string())
        .arg("--tokens")
        .arg(&tokens_path)
        .arg("--ca")
        .arg(&ca)
        .arg("--data-dir")
        .arg(absolute(&config.data_dir.join("agents")))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", agent.display()))?;

    println!(
        "\nTianwang demo: a hub with {n} simulated units (sim-1 .. sim-{n}).\n\
         \n  console   http://{http}/   (sign in with the commander token below)\n\
         \n  metrics   http://{http}/metrics\n  health    http://{http}/healthz\n  QUIC      {quic}\n\
         \n  Watch a unit and save its video:\n    source {env}\n    \
         {hub} watch --hub \"$TIANWANG_HUB\" --token \"$TIANWANG_TOKEN\" --ca \"$TIANWANG_CA\" --unit sim-1 --duration 10 --out sim-1.h264\n\
         \n  Case {case}: an operation with sim-1 and sim-2 for the next 24 h; whatever\n  \
         they record is bound to it. sim-1 walks out of the operation's 300 m fence within\n  \
         30 s: alarm left_geofence (GET /api/alarms). Play it back in the console's Cases view, then:\n    \
         {hub} export --data {data} --case '{case}' --out export-1\n    \
         {hub} verify --export export-1 --key $({hub} key --data {data})\n\
         \n  Console token (commander, 24 h; also in {env}):\n\n{token}\n\
         \n  An official's token (also talks to the officers: hold to talk in a unit's\n  \
         directives panel; TIANWANG_OFFICIAL_TOKEN in {env}):\n\n{official}\n\
         \n  A phone as unit officer-1: open http://{http}/officer and sign in with this device\n  \
         token (TIANWANG_OFFICER_TOKEN in {env}; a phone needs the hub on an address it\n  \
         reaches, and https or localhost for its camera):\n\n{officer}\n",
        n = opts.units,
        http = hub.http_addr,
        quic = hub.quic_addr,
        env = env_path.display(),
        token = console_token,
        official = official_token,
        officer = officer_token,
        case = case,
        data = config.data_dir.display(),
        hub = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "hub".into()),
    );

    let sleep = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        _ = sleep => Ok(()),
        _ = termination() => Ok(()),
        status = child.wait() => match status {
            Ok(s) => Err(anyhow::anyhow!("the simulated units stopped ({s})")),
            Err(e) => Err(anyhow::anyhow!("waiting for the simulated units: {e}")),
        },
    };
    info!("demo ending");
    stop_child(&mut child).await;
    hub.shutdown().await;
    outcome
}

/// Routes for the simulated units around the demo operation's place: sim-1 walks out of
/// the 300 m fence within 30 s (and back, and out again), sim-2 patrols inside it, sim-3
/// and sim-4 walk elsewhere in the city.
pub(crate) fn write_routes(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let (lat, lon) = (39.9087, 116.3975);
    let routes = [
        (
            "sim-1",
            format!(
                "speed 15\nloop\n{lat},{lon}\n{},{lon}\n{lat},{lon}\n",
                lat + 0.004
            ),
        ),
        (
            "sim-2",
            format!(
                "speed 1.4\nloop\n{lat},{lon}\n{},{lon}\n{},{}\n{lat},{}\n{lat},{lon}\n",
                lat + 0.0008,
                lat + 0.0008,
                lon + 0.001,
                lon + 0.001
            ),
        ),
        (
            "sim-3",
            format!(
                "speed 8\nloop\n{},{}\n{},{}\n",
                lat - 0.01,
                lon + 0.02,
                lat - 0.012,
                lon + 0.025
            ),
        ),
        (
            "sim-4",
            format!(
                "speed 5\nloop\n{},{}\n{},{}\n",
                lat + 0.015,
                lon - 0.01,
                lat + 0.016,
                lon - 0.014
            ),
        ),
    ];
    for (unit, text) in routes {
        std::fs::write(dir.join(format!("{unit}.route")), text)?;
    }
    Ok(())
}

/// The demo's case number.
pub const DEMO_CASE: &str = "(2026)京0113执1234号";

/// Opens the demo case (once per data dir) with an operation of the first two units for
/// the next 24 hours, so the demo records case-bound evidence from its first second.
async fn demo_case(hub: &RunningHub, units: usize) -> String {
    use tianwang_proto::v1::{CreateCaseRequest, CreateOperationRequest};
    let evidence = &hub.context.evidence;
    let court = hub.context.config.court.code.clone();
    if evidence.get_case(DEMO_CASE).await.is_err() {
        let created = evidence
            .create_case(
                "demo",
                &court,
                CreateCaseRequest {
                    number: DEMO_CASE.into(),
                    court: String::new(),
                    parties: vec!["申请执行人 张三".into(), "被执行人 李四".into()],
                },
            )
            .await;
        if let Err(e) = created {
            warn!(error = %e, "opening the demo case");
            return DEMO_CASE.into();
        }
    }
    let now = crate::evidence::audit::unix_us().max(0) as u64;
    let op = CreateOperationRequest {
        case_number: DEMO_CASE.into(),
        id: format!("demo-{}", now / 1_000_000),
        name: "现场执行 (demo)".into(),
        starts_us: now.saturating_sub(60_000_000),
        ends_us: now + 24 * 3600 * 1_000_000,
        latitude: 39.9087,
        longitude: 116.3975,
        radius_m: 300.0,
        units: (1..=units.min(2)).map(|i| format!("sim-{i}")).collect(),
    };
    if let Err(e) = evidence.create_operation("demo", op).await {
        // A previous demo's operation may still cover these units: it binds them already.
        info!(reason = %e, "no new demo operation");
    }
    DEMO_CASE.into()
}

/// Asks the child to stop (SIGTERM), then kills it if it has not after a few seconds.
pub(crate) async fn stop_child(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let pid = nix::unistd::Pid::from_raw(pid);
        if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_ok()
            && tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .is_ok()
        {
            return;
        }
    }
    if let Err(e) = child.kill().await {
        warn!(error = %e, "stopping the simulated units");
    }
}
