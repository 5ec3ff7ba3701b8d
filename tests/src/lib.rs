//! Harness for end-to-end tests: real `hub` and `field-agent` processes on loopback, real
//! QUIC, real GStreamer; in-process subscribers through the transport crate where a test
//! needs to steer one (stop reading, send bad input).
//!
//! Every wait is bounded in time; nothing here asserts on timing.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tianwang_proto::v1::{Hello, Role, Subscribed, TrackKind};
use tianwang_transport::client::{self, ReceivedFrame, TrackReceiver};
use tianwang_transport::{Control, Limits, Trust};

pub mod console;
pub mod impair;
pub mod postgres;
pub mod recorded;
pub mod relay;
pub mod unit;
pub mod whip;

/// A binary of this workspace, built by `cargo build --bins` (scripts/test does it first).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests live in target/<profile>/deps, binaries (loadrun) in target/<profile>.
    let mut dir = exe.parent().expect("executable has a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("deps has a parent");
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (cargo build --bins, or scripts/test)",
        path.display()
    );
    path
}

pub fn free_udp_addr() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    s.local_addr().expect("local addr")
}

pub fn free_tcp_addr() -> SocketAddr {
    let s = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    s.local_addr().expect("local addr")
}

fn log_file(path: &Path) -> anyhow::Result<Stdio> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .into())
}

/// Sends SIGTERM, then waits (bounded) and kills if needed.
pub fn terminate(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A `hub serve` process.
pub struct Hub {
    child: Option<Child>,
    pub dir: PathBuf,
    pub quic: SocketAddr,
    pub http: SocketAddr,
    config: Option<PathBuf>,
    /// Extra environment of the process (e.g. libfaketime's), kept across restarts.
    env: Vec<(String, String)>,
}

impl Hub {
    /// Starts a hub in `dir` on free ports; `config` is extra TOML for `--config`.
    pub async fn start(dir: &Path, config: Option<&str>) -> anyhow::Result<Self> {
        Self::start_with_env(dir, config, &[]).await
    }

    /// As [`Hub::start`], with extra environment variables for the hub process.
    pub async fn start_with_env(
        dir: &Path,
        config: Option<&str>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let config_path = match config {
            Some(text) => {
                let p = dir.join("hub.toml");
                std::fs::create_dir_all(dir)?;
                std::fs::write(&p, text)?;
                Some(p)
            }
            None => None,
        };
        let mut hub = Self {
            child: None,
            dir: dir.to_path_buf(),
            quic: free_udp_addr(),
            http: free_tcp_addr(),
            config: config_path,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        hub.spawn().await?;
        Ok(hub)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        let mut cmd = Command::new(bin("hub"));
        cmd.arg("serve")
            .arg("--data")
            .arg(&data)
            .arg("--quic-listen")
            .arg(self.quic.to_string())
            .arg("--http-listen")
            .arg(self.http.to_string());
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        // The caller's environment last, so that its RUST_LOG (if any) wins.
        cmd.env("RUST_LOG", "info,hub=debug,quinn=warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log_file(&self.dir.join("hub.log"))?)
            .stderr(log_file(&self.dir.join("hub.log"))?);
        self.child = Some(cmd.spawn().context("starting hub")?);
        self.wait_healthy().await
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let url = format!("http://{}/healthz", self.http);
        for _ in 0..200 {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!("hub exited early ({status}); log: {}", self.log());
            }
            if let Ok(r) = reqwest::get(&url).await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("hub did not become healthy; log: {}", self.log())
    }

    /// Stops the hub (SIGTERM) and starts it again on the same ports and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c);
        }
    }

    /// Kills the hub outright (SIGKILL): nothing is flushed or closed.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the hub again after `stop` or `kill`, on the same ports and data.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.spawn().await
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hub.log")).unwrap_or_default()
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("data").join("tls").join("hub.crt")
    }

    pub fn trust(&self) -> Trust {
        Trust::from_ca_file(&self.ca()).expect("hub certificate")
    }

    /// Issues a token with `hub token issue` (for the hub's own court).
    pub fn token(&self, role: &str, subject: &str) -> String {
        self.token_with(role, subject, &[])
    }

    /// Issues a token with `hub token issue` and extra arguments (`--court`, `--ttl`).
    pub fn token_with(&self, role: &str, subject: &str, extra: &[&str]) -> String {
        let mut cmd = Command::new(bin("hub"));
        cmd.args(["token", "issue", "--role", role, "--subject", subject]);
        if !extra.contains(&"--ttl") {
            cmd.args(["--ttl", "1h"]);
        }
        cmd.args(extra).arg("--data").arg(self.dir.join("data"));
        if let Some(c) = &self.config {
            cmd.arg("--config").arg(c);
        }
        let out = cmd.output().expect("hub token issue");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub async fn metrics(&self) -> anyhow::Result<Metrics> {
        let text = reqwest::get(format!("http://{}/metrics", self.http))
            .await?
            .text()
            .await?;
        Ok(Metrics::parse(&text))
    }

    /// Polls a metric until `pred` holds (bounded).
    pub async fn wait_metric(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> anyhow::Result<f64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.metrics().await?.get(name);
            if pred(v) {
                return Ok(v);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{name} = {v} did not reach the expected value in {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET `path` of the hub's HTTP API with a bearer token: the JSON of a 200.
    pub async fn get_json(&self, path: &str, token: &str) -> anyhow::Result<serde_json::Value> {
        let r = reqwest::Client::new()
            .get(format!("http://{}{path}", self.http))
            .bearer_auth(token)
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop();
    }
}

pub mod tree;

/// Prometheus text, as name{labels} → value.
#[derive(Debug, Default)]
pub struct Metrics(HashMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (k, v) = l.rsplit_once(' ')?;
                    Some((k.to_string(), v.parse().ok()?))
                })
                .collect(),
        )
    }

    /// A series' value, 0 when absent.
    pub fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// Every label set of a metric with its value.
    pub fn series(&self, name: &str) -> Vec<(String, f64)> {
        let mut out: Vec<_> = self
            .0
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{name}{{")))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The sum over all label sets of a metric.
    /// A quantile (in ms) of a histogram over the interval since `before`, read from the
    /// cumulative buckets: the upper bound of the bucket the quantile falls in.
    pub fn histogram_quantile_ms(&self, before: &Metrics, name: &str, q: f64) -> f64 {
        let bounds = [
            "0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025",
            "0.05", "0.1", "0.25", "0.5", "1", "+Inf",
        ];
        let count = |b: &str| {
            let key = format!("{name}_bucket{{le=\"{b}\"}}");
            self.get(&key) - before.get(&key)
        };
        let total = count("+Inf");
        bounds
            .iter()
            .find(|b| total > 0.0 && count(b) >= q * total)
            .map(|b| {
                b.parse::<f64>()
                    .map(|s| s * 1000.0)
                    .unwrap_or(f64::INFINITY)
            })
            .unwrap_or(f64::NAN)
    }

    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.as_str() == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }
}

/// A `field-agent run` process (the test pattern unless `extra` names a `--source`).
pub struct Agent {
    child: Child,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(
        hub: &str,
        ca: &Path,
        unit: &str,
        token: &str,
        dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("agent-{unit}.log"));
        // The test pattern unless the caller names a source.
        let source: &[&str] = if extra.contains(&"--source") {
            &[]
        } else {
            &["--source", "test"]
        };
        let child = Command::new(bin("field-agent"))
            .args([
                "run", "--hub", hub, "--unit", unit, "--token", token, "--ca",
            ])
            .arg(ca)
            .args(source)
            .arg("--data-dir")
            .arg(dir.join(format!("agent-{unit}")))
            .args(extra)
            .env("RUST_LOG", "info,field_agent=debug,quinn=warn")
            .stdout(log_file(&log)?)
            .stderr(log_file(&log)?)
            .spawn()
            .context("starting field-agent")?;
        Ok(Self { child, log })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to finish anything (a device losing power).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (bounded) for the agent to exit on its own.
    pub async fn exited(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// An in-process QUIC subscriber.
pub struct Subscriber {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub control: Control,
}

impl Subscriber {
    pub async fn connect(
        hub: SocketAddr,
        trust: &Trust,
        token: &str,
        limits: &Limits,
    ) -> anyhow::Result<Self> {
        let endpoint = tianwang_transport::client_endpoint(trust, limits, false)?;
        let conn = tianwang_transport::connect(&endpoint, &hub.to_string()).await?;
        let hello = Hello {
            role: Role::Subscriber as i32,
            token: token.to_string(),
            ..Default::default()
        };
        let (control, _) = client::hello(&conn, hello, Duration::from_secs(10)).await?;
        Ok(Self {
            endpoint,
            conn,
            control,
        })
    }

    /// Subscribes to all of a unit's tracks; frames arrive on the returned receiver.
    pub async fn subscribe(
        &mut self,
        unit: &str,
        queue: usize,
    ) -> anyhow::Result<(Subscribed, TrackReceiver)> {
        let receiver = TrackReceiver::spawn(
            self.conn.clone(),
            tianwang_proto::wire::DEFAULT_MAX_FRAME,
            queue,
            Some(0),
        );
        let s = client::subscribe(&mut self.control, 1, unit, &[], Duration::from_secs(10)).await?;
        Ok((s, receiver))
    }
}

pub fn track_id(s: &Subscribed, kind: TrackKind) -> u32 {
    s.tracks
        .iter()
        .find(|t| t.kind() == kind)
        .map(|t| t.id)
        .expect("track of that kind")
}

/// Receives frames of one track until `n` have arrived (bounded by `timeout`).
pub async fn collect(
    rx: &mut TrackReceiver,
    track: u32,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<ReceivedFrame>> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while out.len() < n {
        let f = tokio::time::timeout_at(deadline, rx.next())
            .await
            .map_err(|_| anyhow!("only {} of {n} frames in {timeout:?}", out.len()))?
            .ok_or_else(|| anyhow!("connection ended after {} of {n} frames", out.len()))?;
        if f.track_id == track {
            out.push(f);
        }
    }
    Ok(out)
}

/// NAL unit types in an H.264 Annex-B access unit.
pub fn nal_types(au: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut i = 0;
    while i + 3 <= au.len() {
        if au[i] == 0 && au[i + 1] == 0 && au[i + 2] == 1 {
            if let Some(b) = au.get(i + 3) {
                types.push(b & 0x1f);
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    types
}

/// An IDR access unit carrying its parameter sets.
pub fn is_idr_with_parameter_sets(au: &[u8]) -> bool {
    let t = nal_types(au);
    t.contains(&5) && t.contains(&7) && t.contains(&8)
}

pub fn unix_now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Checks that frames of one track come as whole groups in order: each group entered at
/// index 0, indices contiguous, group sequence only increasing.
pub fn assert_whole_groups(frames: &[ReceivedFrame]) {
    let mut last: Option<(u64, u32)> = None;
    for f in frames {
        match last {
            Some((g, i)) if g == f.group => assert_eq!(f.index, i + 1, "hole in group {g}"),
            Some((g, _)) => {
                assert!(f.group > g, "group {} after {g}", f.group);
                assert_eq!(f.index, 0, "group {} entered at {}", f.group, f.index);
            }
            None => assert_eq!(f.index, 0, "first frame is not a keyframe"),
        }
        last = Some((f.group, f.index));
    }
}

impl Hub {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Device tokens for PREFIX1..PREFIXN in a file (`hub token fleet`).
    pub fn fleet(&self, prefix: &str, count: usize) -> PathBuf {
        let out = self.dir.join("fleet.tokens");
        let status = Command::new(bin("hub"))
            .args([
                "token",
                "fleet",
                "--prefix",
                prefix,
                "--count",
                &count.to_string(),
                "--data",
            ])
            .arg(self.dir.join("data"))
            .arg("--out")
            .arg(&out)
            .status()
            .expect("hub token fleet");
        assert!(status.success());
        out
    }
}

/// A `field-agent simulate` process.
pub struct Simulator {
    child: Child,
}

impl Simulator {
    pub fn start(hub: &Hub, units: usize, tokens: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(hub, units, tokens, extra, &[])
    }

    /// As [`Simulator::start`], with extra environment variables for the process.
    pub fn start_with_env(
        hub: &Hub,
        units: usize,
        tokens: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let log = hub.dir.join("simulate.log");
        let child = Command::new(bin("field-agent"))
            .envs(env.iter().copied())
            .args([
                "simulate",
                "--hub",
                &hub.quic.to_string(),
                "--units",
                &units.to_string(),
                "--tokens",
            ])
            .arg(tokens)
            .arg("--ca")
            .arg(hub.ca())
            .arg("--data-dir")
            .arg(hub.dir.join("agents"))
            .args(extra)
            .stdout(log_file(&log)?)
            .stderr(log_file(&log)?)
            .spawn()
            .context("starting field-agent simulate")?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    Some((utime + stime) / ticks as f64)
}

/// Peak resident memory of a process in MiB (VmHWM), from /proc.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The `p` quantile (0–1, nearest rank) of sorted figures; NaN when there are none (a load
/// report shows it as missing, not as zero).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Microseconds, sorted, as milliseconds (for [`percentile`]).
pub fn sorted_ms(mut us: Vec<u64>) -> Vec<f64> {
    us.sort_unstable();
    us.into_iter().map(|u| u as f64 / 1000.0).collect()
}

/// How the hub ended a connection: its close code and reason.
pub async fn closed_with(conn: &quinn::Connection) -> (tianwang_proto::ErrorCode, String) {
    let e = tokio::time::timeout(Duration::from_secs(10), conn.closed())
        .await
        .expect("the hub closes the connection");
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => (
            tianwang_proto::ErrorCode::try_from(c.error_code.into_inner() as i32)
                .unwrap_or(tianwang_proto::ErrorCode::Unspecified),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("closed without a reason: {other}"),
    }
}

/// A Hello as a client of this protocol version sends it.
pub fn hello(role: tianwang_proto::v1::Role, unit: &str, token: &str) -> tianwang_proto::v1::Hello {
    tianwang_proto::v1::Hello {
        protocol_version: tianwang_proto::wire::PROTOCOL_VERSION,
        role: role as i32,
        unit_id: unit.into(),
        token: token.into(),
        ..Default::default()
    }
}

/// A value for a URL query, percent-encoded (case numbers carry `/` and CJK).
pub fn query_value(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
