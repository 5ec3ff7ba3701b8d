//! The hub's configuration: one typed struct, read from TOML (unknown keys rejected), then
//! overridden by environment variables and flags (see `main.rs`), validated before start.
//! Every key and its default is in `deploy/hub.example.toml`; a test keeps the two equal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This hub's name: the issuer of its tokens and its name in logs.
    pub hub_id: String,
    /// Where the hub keeps its keys, certificates and (later) recordings and index.
    pub data_dir: PathBuf,
    pub quic: QuicConfig,
    pub http: HttpConfig,
    pub relay: RelayConfig,
    pub auth: AuthConfig,
    pub console: ConsoleConfig,
    pub evidence: EvidenceConfig,
    pub alarms: AlarmsConfig,
    pub court: CourtConfig,
    pub cascade: CascadeConfig,
}

/// The court this hub serves, and its place in the tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CourtConfig {
    /// Unique in the deployment (e.g. "京0113"): recorded with every segment, the court of
    /// this hub's units, the jurisdiction of its tokens.
    pub code: String,
    pub name: String,
    pub tier: Tier,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    Supreme,
    High,
    Intermediate,
}

impl Tier {
    pub fn wire(self) -> tianwang_proto::v1::Tier {
        match self {
            Tier::Supreme => tianwang_proto::v1::Tier::Supreme,
            Tier::High => tianwang_proto::v1::Tier::High,
            Tier::Intermediate => tianwang_proto::v1::Tier::Intermediate,
        }
    }
}

impl Default for CourtConfig {
    fn default() -> Self {
        Self {
            code: "local".into(),
            name: String::new(),
            tier: Tier::Intermediate,
        }
    }
}

/// Linking hubs into the court tree (see `docs/cascade.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CascadeConfig {
    /// The deployment CA's certificate (`hub ca init`). Set: child hubs may link here with a
    /// certificate it issued, and this hub's `quic.cert` must be one it issued too.
    pub ca: Option<PathBuf>,
    /// The parent hub's QUIC address, host:port (the host is checked against its
    /// certificate). Unset: this hub is the root of its tree.
    pub parent: Option<String>,
    /// A unit pulled from a child hub is released this long after its last viewer here left.
    #[serde(with = "humantime_serde")]
    pub release_grace: Duration,
    /// Longest wait between attempts to reach the parent.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for CascadeConfig {
    fn default() -> Self {
        Self {
            ca: None,
            parent: None,
            release_grace: Duration::from_secs(5),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// The deviation rules' thresholds (see `docs/evidence.md`, alarms).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlarmsConfig {
    /// Rules switched off, by name (e.g. "battery_low").
    pub disabled: Vec<String>,
    /// `unit_offline`: a unit of an active operation offline this long.
    #[serde(with = "humantime_serde")]
    pub offline_grace: Duration,
    /// `stream_stalled`: an online unit whose media stopped this long.
    #[serde(with = "humantime_serde")]
    pub stall: Duration,
    /// `recording_stopped`: a unit of an active operation not recording this long.
    #[serde(with = "humantime_serde")]
    pub recording_grace: Duration,
    /// `left_geofence`: outside the fence by more than this (plus the fix's accuracy), m.
    pub geofence_margin_m: f64,
    /// `operation_overrun`: an operation still open this long after its planned end.
    #[serde(with = "humantime_serde")]
    pub overrun_grace: Duration,
    pub battery_low_percent: f32,
    pub storage_low_bytes: u64,
    /// `missing_evidence`: unrecorded time in an operation's window beyond this.
    #[serde(with = "humantime_serde")]
    pub evidence_tolerance: Duration,
    /// An alarm not acknowledged this long escalates to the parent court's hub (when
    /// `cascade.parent` is set).
    #[serde(with = "humantime_serde")]
    pub escalate_after: Duration,
}

impl Default for AlarmsConfig {
    fn default() -> Self {
        let d = tianwang_core::alarms::AlarmConfig::default();
        Self {
            disabled: Vec::new(),
            offline_grace: Duration::from_micros(d.offline_grace_us),
            stall: Duration::from_micros(d.stall_us),
            recording_grace: Duration::from_micros(d.recording_grace_us),
            geofence_margin_m: d.geofence_margin_m,
            overrun_grace: Duration::from_micros(d.overrun_grace_us),
            battery_low_percent: d.battery_low_percent,
            storage_low_bytes: d.storage_low_bytes,
            evidence_tolerance: Duration::from_micros(d.evidence_tolerance_us),
            escalate_after: Duration::from_secs(120),
        }
    }
}

impl AlarmsConfig {
    pub fn engine(&self) -> tianwang_core::alarms::AlarmConfig {
        use tianwang_core::alarms::Rule;
        let us = |d: Duration| d.as_micros().min(u128::from(u64::MAX)) as u64;
        tianwang_core::alarms::AlarmConfig {
            enabled: Rule::ALL
                .into_iter()
                .filter(|r| !self.disabled.iter().any(|d| d == r.name()))
                .collect(),
            offline_grace_us: us(self.offline_grace),
            stall_us: us(self.stall),
            recording_grace_us: us(self.recording_grace),
            geofence_margin_m: self.geofence_margin_m,
            overrun_grace_us: us(self.overrun_grace),
            battery_low_percent: self.battery_low_percent,
            storage_low_bytes: self.storage_low_bytes,
            evidence_tolerance_us: us(self.evidence_tolerance),
        }
    }
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvidenceConfig {
    /// Record every online unit, watched or not.
    pub record: bool,
    /// The index database: `sqlite://…` or `postgres://…`. Empty: SQLite in the data dir.
    pub index_url: Option<String>,
    /// Where recordings are written. Empty: `data_dir/recordings`.
    pub dir: Option<PathBuf>,
    /// A segment closes at the first keyframe after this much media.
    #[serde(with = "humantime_serde")]
    pub segment_target: Duration,
    pub retention: RetentionConfig,
}

// By hand: the index URL may carry the database's password.
impl std::fmt::Debug for EvidenceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EvidenceConfig")
            .field("record", &self.record)
            .field("index_url", &self.index_url.as_deref().map(redact_password))
            .field("dir", &self.dir)
            .field("segment_target", &self.segment_target)
            .field("retention", &self.retention)
            .finish()
    }
}

/// A database URL with its password hidden, in the authority (`user:***@`) or the query
/// (`password=***`).
pub fn redact_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_string(),
        },
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// How long recordings are kept. Recordings of an open case are never deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// How often retention runs (and once at start-up).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The default rule, for courts without their own.
    #[serde(flatten)]
    pub default: RetentionRule,
    /// Rules per court code, for recordings made for that court.
    pub courts: std::collections::BTreeMap<String, RetentionRule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// Recordings bound to no case: kept this long after they were made.
    #[serde(with = "humantime_serde")]
    pub unbound: Duration,
    /// Recordings of a closed case: kept this long after they were made.
    #[serde(with = "humantime_serde")]
    pub closed_case: Duration,
}

impl Default for EvidenceConfig {
    fn default() -> Self {
        Self {
            record: true,
            index_url: None,
            dir: None,
            segment_target: Duration::from_secs(4),
            retention: RetentionConfig::default(),
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(3600),
            default: RetentionRule {
                unbound: Duration::from_secs(90 * 24 * 3600),
                closed_case: Duration::from_secs(10 * 366 * 24 * 3600),
            },
            courts: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuicConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain and key. Empty: a self-signed pair in `data_dir/tls`, made on
    /// first start (development only: clients must be given it with `--ca`).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Names the self-signed certificate is valid for.
    pub self_signed_names: Vec<String>,
    /// Largest frame payload accepted from a publisher.
    pub max_frame_bytes: usize,
    /// A peer silent this long is gone.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A new connection must say hello (and announce, for a publisher) within this.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Metrics, health and (later) the console.
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Bound of each subscriber's queue per track, in frames.
    pub subscriber_queue_frames: usize,
    /// Frames of each track's current group kept for late joiners...
    pub group_cache_frames: usize,
    /// ... and at most this many bytes of them.
    pub group_cache_bytes: usize,
    /// Groups a subscriber may trail the newest before it skips ahead.
    pub max_group_lag: u64,
    /// At most one keyframe request per track goes to a device in this interval.
    #[serde(with = "humantime_serde")]
    pub keyframe_request_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Addresses WebRTC binds its UDP sockets on (one per PeerConnection): its host
    /// candidates. Loopback by default, like every listener; a hub serving consoles on a
    /// network lists that network's address here.
    pub webrtc_ips: Vec<std::net::IpAddr>,
    /// Tiles one console may show at once.
    pub max_tiles: usize,
    /// A console must authenticate within this...
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    /// ... and answer each offer within this.
    #[serde(with = "humantime_serde")]
    pub answer_timeout: Duration,
    /// Directory with the console's files to serve instead of the ones built into the
    /// binary (for working on the console without rebuilding).
    pub assets_dir: Option<PathBuf>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        let core = tianwang_core::console::ConsoleConfig::default();
        Self {
            webrtc_ips: vec![std::net::IpAddr::from([127, 0, 0, 1])],
            max_tiles: core.max_tiles,
            auth_timeout: core.auth_timeout,
            answer_timeout: core.answer_timeout,
            assets_dir: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Token signing key (Ed25519, PKCS#8 PEM). Empty: `data_dir/keys/token-signing.pem`,
    /// made on first start.
    pub signing_key: Option<PathBuf>,
    /// Tolerated clock difference when checking token times.
    #[serde(with = "humantime_serde")]
    pub clock_leeway: Duration,
    /// Longest lifetime `hub token issue` grants.
    #[serde(with = "humantime_serde")]
    pub max_token_ttl: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hub_id: "local".into(),
            data_dir: PathBuf::from("data"),
            quic: QuicConfig::default(),
            http: HttpConfig::default(),
            relay: RelayConfig::default(),
            auth: AuthConfig::default(),
            console: ConsoleConfig::default(),
            evidence: EvidenceConfig::default(),
            alarms: AlarmsConfig::default(),
            court: CourtConfig::default(),
            cascade: CascadeConfig::default(),
        }
    }
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            cert: None,
            key: None,
            self_signed_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            max_frame_bytes: tianwang_proto::wire::DEFAULT_MAX_FRAME,
            idle_timeout: Duration::from_secs(10),
            hello_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
        }
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        let core = tianwang_core::TrackConfig::default();
        Self {
            subscriber_queue_frames: core.queue_frames,
            group_cache_frames: core.group_cache_frames,
            group_cache_bytes: core.group_cache_bytes,
            max_group_lag: core.max_group_lag,
            keyframe_request_interval: Duration::from_millis(500),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            signing_key: None,
            clock_leeway: Duration::from_secs(30),
            max_token_ttl: Duration::from_secs(366 * 24 * 3600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file; keys it leaves out keep their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.hub_id.trim().is_empty() {
            return bad("hub_id is empty".into());
        }
        if self.quic.cert.is_some() != self.quic.key.is_some() {
            return bad("quic.cert and quic.key go together: set both or neither".into());
        }
        if !(1024..=64 * 1024 * 1024).contains(&self.quic.max_frame_bytes) {
            return bad(format!(
                "quic.max_frame_bytes = {} is outside 1 KiB ..= 64 MiB",
                self.quic.max_frame_bytes
            ));
        }
        if self.quic.idle_timeout < Duration::from_secs(1) {
            return bad("quic.idle_timeout must be at least 1s".into());
        }
        if self.relay.subscriber_queue_frames == 0 || self.relay.subscriber_queue_frames > 65_536 {
            return bad("relay.subscriber_queue_frames must be within 1 ..= 65536".into());
        }
        if self.console.webrtc_ips.is_empty() {
            return bad("console.webrtc_ips is empty: WebRTC needs an address to bind".into());
        }
        if !(1..=64).contains(&self.console.max_tiles) {
            return bad("console.max_tiles must be within 1 ..= 64".into());
        }
        if self.relay.group_cache_frames > 65_536 {
            return bad("relay.group_cache_frames must be at most 65536".into());
        }
        if !(Duration::from_millis(500)..=Duration::from_secs(60))
            .contains(&self.evidence.segment_target)
        {
            return bad("evidence.segment_target must be within 500ms ..= 60s".into());
        }
        if self.court.code.trim().is_empty() || self.court.code.len() > 64 {
            return bad("court.code must be 1 to 64 bytes".into());
        }
        if self.cascade.parent.is_some() && self.cascade.ca.is_none() {
            return bad(
                "cascade.parent needs cascade.ca (hubs link with CA-issued certificates)".into(),
            );
        }
        if self.cascade.ca.is_some() && self.quic.cert.is_none() {
            return bad(
                "cascade.ca needs quic.cert and quic.key issued by that CA (`hub ca issue`)".into(),
            );
        }
        if let Some(name) = self
            .alarms
            .disabled
            .iter()
            .find(|d| tianwang_core::alarms::Rule::from_name(d).is_none())
        {
            return bad(format!("alarms.disabled: no rule named {name:?}"));
        }
        if self.evidence.retention.interval < Duration::from_secs(1) {
            return bad("evidence.retention.interval must be at least 1s".into());
        }
        Ok(())
    }

    pub fn track_config(&self) -> tianwang_core::TrackConfig {
        tianwang_core::TrackConfig {
            queue_frames: self.relay.subscriber_queue_frames,
            group_cache_frames: self.relay.group_cache_frames,
            group_cache_bytes: self.relay.group_cache_bytes,
            max_group_lag: self.relay.max_group_lag,
        }
    }

    pub fn tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }

    /// The certificate and key files the QUIC listener uses.
    pub fn cert_paths(&self) -> (PathBuf, PathBuf) {
        match (&self.quic.cert, &self.quic.key) {
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => (
                self.tls_dir().join("hub.crt"),
                self.tls_dir().join("hub.key"),
            ),
        }
    }

    pub fn console_session_config(&self) -> tianwang_core::console::ConsoleConfig {
        tianwang_core::console::ConsoleConfig {
            max_tiles: self.console.max_tiles,
            auth_timeout: self.console.auth_timeout,
            answer_timeout: self.console.answer_timeout,
        }
    }

    /// Where recordings are written.
    pub fn recordings_dir(&self) -> PathBuf {
        self.evidence
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("recordings"))
    }

    /// The index database's URL.
    pub fn index_url(&self) -> String {
        self.evidence
            .index_url
            .clone()
            .unwrap_or_else(|| crate::evidence::index::Index::sqlite_url(&self.data_dir))
    }

    pub fn signing_key_path(&self) -> PathBuf {
        self.auth
            .signing_key
            .clone()
            .unwrap_or_else(|| self.data_dir.join("keys").join("token-signing.pem"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_exactly_the_defaults() {
        let text = include_str!("../../deploy/hub.example.toml");
        let example = Config::parse(text).expect("deploy/hub.example.toml parses");
        assert_eq!(example, Config::default());
        example.validate().expect("defaults are valid");
    }

    #[test]
    fn the_index_password_never_shows_in_debug() {
        let mut config = Config::default();
        config.evidence.index_url =
            Some("postgres://tianwang:s3cret@db:5432/index?sslmode=require&password=s3cret".into());
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(
            debug.contains("postgres://tianwang:***@db:5432/index?sslmode=require&password=***"),
            "{debug}"
        );
        assert_eq!(
            redact_password("sqlite:///d/index.sqlite?mode=rwc"),
            "sqlite:///d/index.sqlite?mode=rwc"
        );
        assert_eq!(redact_password("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse("[quic]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n").unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
    }

    #[test]
    fn invalid_values_are_refused_with_a_reason() {
        let mut c = Config::default();
        c.quic.cert = Some("a.pem".into());
        assert!(c.validate().unwrap_err().to_string().contains("quic.key"));
        let c = Config::parse("[quic]\nmax_frame_bytes = 10\n").unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("max_frame_bytes")
        );
    }
}
