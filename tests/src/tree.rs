//! A court tree of real hub processes on loopback: a deployment CA made with `hub ca init`,
//! one certificate per hub from `hub ca issue`, each child linked to its parent.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use tianwang_proto::v1::console_client::ConsoleClient;
use tianwang_proto::v1::{ListUnitsRequest, UnitSummary};
use tianwang_transport::Trust;

use crate::{Hub, bin};

pub const SUPREME: &str = "最高法";
pub const HIGH: &str = "京";
pub const INTERMEDIATE_1: &str = "京01";
pub const INTERMEDIATE_2: &str = "京02";

/// Runs `hub` with arguments; its stdout.
pub fn hub_cli(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin("hub")).args(args).output()?;
    if !out.status.success() {
        bail!(
            "hub {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Makes a CA in `dir/ca`.
pub fn make_ca(dir: &Path) -> anyhow::Result<PathBuf> {
    let ca = dir.join("ca");
    hub_cli(&["ca", "init", "--dir", &ca.to_string_lossy()])?;
    Ok(ca)
}

/// Issues a hub certificate into `out` for `court` under `parent`.
pub fn issue(ca: &Path, court: &str, parent: &str, out: &Path) -> anyhow::Result<()> {
    hub_cli(&[
        "ca",
        "issue",
        "--ca-dir",
        &ca.to_string_lossy(),
        "--court",
        court,
        "--parent",
        parent,
        "--name",
        "localhost",
        "--name",
        "127.0.0.1",
        "--out",
        &out.to_string_lossy(),
    ])?;
    Ok(())
}

/// The TOML of a tree hub. `tls` holds hub.crt and hub.key.
pub fn config(
    court: &str,
    tier: &str,
    tls: &Path,
    ca: &Path,
    parent: Option<&Hub>,
    extra: &str,
) -> String {
    let parent = parent
        .map(|p| format!("parent = \"localhost:{}\"\n", p.quic.port()))
        .unwrap_or_default();
    format!(
        "hub_id = \"hub-{court}\"\n\
         [quic]\ncert = \"{}\"\nkey = \"{}\"\n\
         [court]\ncode = \"{court}\"\nname = \"{court}\"\ntier = \"{tier}\"\n\
         [cascade]\nca = \"{}\"\n{parent}release_grace = \"1s\"\nmax_backoff = \"1s\"\n{extra}",
        tls.join("hub.crt").display(),
        tls.join("hub.key").display(),
        ca.join("ca.crt").display(),
    )
}

/// Supreme → high → two intermediates.
pub struct Tree {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub supreme: Hub,
    pub high: Hub,
    pub intermediate: [Hub; 2],
}

impl Tree {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let ca = make_ca(dir)?;
        let start = |court: &'static str,
                     parent_court: &'static str,
                     tier: &'static str,
                     name: &'static str| {
            let hub_dir = dir.join(name);
            let tls = hub_dir.join("tls");
            let ca = ca.clone();
            async move {
                issue(&ca, court, parent_court, &tls)?;
                anyhow::Ok((hub_dir, tls, tier))
            }
        };
        let (d, tls, tier) = start(SUPREME, "", "supreme", "supreme").await?;
        let supreme = Hub::start(&d, Some(&config(SUPREME, tier, &tls, &ca, None, ""))).await?;
        let (d, tls, tier) = start(HIGH, SUPREME, "high", "high").await?;
        let high = Hub::start(&d, Some(&config(HIGH, tier, &tls, &ca, Some(&supreme), ""))).await?;
        let (d, tls, tier) = start(INTERMEDIATE_1, HIGH, "intermediate", "intermediate-1").await?;
        let i1 = Hub::start(
            &d,
            Some(&config(INTERMEDIATE_1, tier, &tls, &ca, Some(&high), "")),
        )
        .await?;
        let (d, tls, tier) = start(INTERMEDIATE_2, HIGH, "intermediate", "intermediate-2").await?;
        let i2 = Hub::start(
            &d,
            Some(&config(INTERMEDIATE_2, tier, &tls, &ca, Some(&high), "")),
        )
        .await?;
        Ok(Self {
            dir: dir.to_path_buf(),
            ca: ca.clone(),
            supreme,
            high,
            intermediate: [i1, i2],
        })
    }

    /// Agents trust the hubs through the deployment CA.
    pub fn ca_cert(&self) -> PathBuf {
        self.ca.join("ca.crt")
    }

    pub fn trust(&self) -> Trust {
        Trust::from_ca_file(&self.ca_cert()).expect("CA certificate")
    }
}

/// A gRPC console client of a hub, with a bearer token.
pub async fn console(hub: &Hub) -> anyhow::Result<ConsoleClient<tonic::transport::Channel>> {
    Ok(ConsoleClient::connect(format!("http://{}", hub.http)).await?)
}

pub fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        req.metadata_mut().insert("authorization", v);
    }
    req
}

pub async fn list_units(hub: &Hub, token: &str) -> anyhow::Result<Vec<UnitSummary>> {
    let mut c = console(hub).await?;
    Ok(c.list_units(authed(token, ListUnitsRequest {}))
        .await
        .context("ListUnits")?
        .into_inner()
        .units)
}

/// Waits (bounded) until `hub` lists every one of `units` online for `token`.
pub async fn wait_units_online(
    hub: &Hub,
    token: &str,
    units: &[&str],
    timeout: Duration,
) -> anyhow::Result<Vec<UnitSummary>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let listed = list_units(hub, token).await.unwrap_or_default();
        if units
            .iter()
            .all(|u| listed.iter().any(|s| s.unit_id == *u && s.online))
        {
            return Ok(listed);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "units {units:?} not all online in {timeout:?}; listed: {:?}",
                listed
                    .iter()
                    .map(|s| (&s.unit_id, s.online, &s.court))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
