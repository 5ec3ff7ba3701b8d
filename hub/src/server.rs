//! Starting and stopping a hub: data directory, keys and certificates, the QUIC listener
//! and the HTTP listener, and a graceful shutdown.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use secrecy::{ExposeSecret, SecretString};
use tianwang_core::RelayStats;
use tianwang_transport::{Limits, tls};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::auth::Authority;
use crate::config::Config;
use crate::evidence::keys::Signer;
use crate::evidence::{Evidence, recorder, retention};
use crate::metrics::Metrics;
use crate::registry::Units;
use crate::session::{self, HubContext};

/// A hub that is running; [`RunningHub::shutdown`] stops it.
pub struct RunningHub {
    pub quic_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub context: Arc<HubContext>,
    tasks: tokio::task::JoinSet<()>,
    recorder: Option<tokio::task::JoinHandle<()>>,
    recorder_stop: CancellationToken,
}

/// Makes sure the QUIC certificate exists: a self-signed one in the data dir on first start
/// unless the configuration names files.
pub fn ensure_certificate(config: &Config) -> anyhow::Result<()> {
    let (cert, key) = config.cert_paths();
    if config.quic.cert.is_some() || (cert.exists() && key.exists()) {
        return Ok(());
    }
    let pair = tls::self_signed(&config.quic.self_signed_names)?;
    crate::files::write_private(&key, pair.key_pem.as_bytes())
        .with_context(|| format!("writing {}", key.display()))?;
    crate::files::write_public(&cert, pair.cert_pem.as_bytes())
        .with_context(|| format!("writing {}", cert.display()))?;
    info!(cert = %cert.display(), "created a self-signed certificate (development only)");
    Ok(())
}

/// The hub's evidence signer: the same Ed25519 key that signs its tokens.
pub fn load_signer(config: &Config) -> anyhow::Result<Signer> {
    let path = config.signing_key_path();
    // Held as a secret: never printable, and wiped once the key pair is made from it.
    let pem = SecretString::from(
        std::fs::read_to_string(&path)
            .with_context(|| format!("reading the signing key {}", path.display()))?,
    );
    Signer::from_pem(pem.expose_secret()).with_context(|| format!("signing key {}", path.display()))
}

pub fn load_authority(config: &Config) -> anyhow::Result<Authority> {
    Ok(Authority::load_or_create(
        &config.signing_key_path(),
        &config.hub_id,
        config.auth.clock_leeway,
    )?)
}

fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))
}

impl RunningHub {
    /// Binds both listeners and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        prepare_data_dir(&config.data_dir)?;
        ensure_certificate(&config)?;
        let authority = Arc::new(load_authority(&config)?);
        let (cert_path, key_path) = config.cert_paths();
        let certs = tls::load_certs(&cert_path)?;
        let key = tls::load_key(&key_path)?;
        let limits = Limits {
            idle_timeout: config.quic.idle_timeout,
            ..Limits::default()
        };
        // With a deployment CA, this hub's certificate says where it sits in the tree.
        let (client_roots, parent_court) = match &config.cascade.ca {
            Some(ca) => {
                let roots = tls::load_certs(ca)?;
                let leaf = certs.first().context("quic.cert holds no certificate")?;
                let identity = tianwang_transport::ca::identity(leaf)
                    .with_context(|| format!("quic.cert {}", cert_path.display()))?;
                if identity.court != config.court.code {
                    anyhow::bail!(
                        "quic.cert is issued for court {:?} but court.code is {:?}",
                        identity.court,
                        config.court.code
                    );
                }
                (Some(roots), identity.parent)
            }
            None => (None, String::new()),
        };
        let endpoint = tianwang_transport::server_endpoint(
            config.quic.listen,
            certs,
            key,
            client_roots.as_deref(),
            &limits,
        )?;
        let quic_addr = endpoint.local_addr()?;
        let http = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("binding HTTP {}", config.http.listen))?;
        let http_addr = http.local_addr()?;

        let units = Arc::new(Units::new(
            Arc::new(RelayStats::default()),
            config.track_config(),
            config.relay.keyframe_request_interval,
        ));
        let metrics = Arc::new(Metrics::new(Arc::clone(&units))?);
        let shutdown = CancellationToken::new();
        let signer = Arc::new(load_signer(&config)?);
        let evidence = Evidence::open(&config.index_url(), &config.recordings_dir(), signer)
            .await
            .context("opening the evidence index")?;
        std::fs::create_dir_all(&evidence.dir)
            .with_context(|| format!("creating {}", evidence.dir.display()))?;
        evidence
            .repair()
            .await
            .context("repairing the recordings")?;
        // Revoked tokens are refused from the first session on.
        authority.set_revoked(
            crate::revocation::load(&evidence.index)
                .await
                .context("reading revoked tokens")?,
        );
        evidence.audit.record(
            "hub",
            "hub.start",
            &config.hub_id,
            serde_json::json!({ "court": config.court.code }),
        );
        let (field, field_task) = crate::field::start(crate::field::FieldTask {
            index: evidence.index.clone(),
            audit: evidence.audit.clone(),
            metrics: Arc::clone(&metrics),
            units: Arc::clone(&units),
            config: config.alarms.engine(),
            shutdown: shutdown.clone(),
            operations_changed: Arc::clone(&evidence.operations_changed),
            escalate_after: config
                .cascade
                .parent
                .as_ref()
                .map(|_| config.alarms.escalate_after),
            alarm_changes: tokio::sync::broadcast::channel(256).0,
        });
        let cascade = Arc::new(crate::cascade::Cascade::new(
            crate::cascade::uplink::court_info(&config, &parent_court),
            config.cascade.release_grace,
            Arc::clone(&metrics),
        ));
        let context = Arc::new(HubContext::new(
            Arc::new(config),
            authority,
            units,
            metrics,
            shutdown.clone(),
            evidence,
            field,
            cascade,
        ));
        let mut tasks = tokio::task::JoinSet::new();
        // The recorder finishes its open segments after the listeners stop, so it has its
        // own stop signal, given once sessions are closed.
        let recorder_stop = CancellationToken::new();
        let recorder = if context.config.evidence.record {
            let shared = Arc::new(recorder::Shared {
                config: recorder::RecorderConfig {
                    dir: context.evidence.dir.clone(),
                    target: context.config.evidence.segment_target,
                    court: context.config.court.code.clone(),
                },
                index: context.evidence.index.clone(),
                signer: Arc::clone(&context.evidence.signer),
                audit: context.evidence.audit.clone(),
                metrics: Arc::clone(&context.metrics),
            });
            Some(tokio::spawn(recorder::run(
                shared,
                Arc::clone(&context.units),
                context.evidence.extras.clone(),
                recorder_stop.clone(),
            )))
        } else {
            None
        };
        tasks.spawn(retention::run(Arc::clone(&context)));
        tasks.spawn(crate::revocation::run(Arc::clone(&context)));
        tasks.spawn(async move {
            if let Err(e) = field_task.await {
                tracing::error!(error = %e, "the field task failed");
            }
        });
        tasks.spawn(session::serve(Arc::clone(&context), endpoint));
        if let Some(parent) = context.config.cascade.parent.clone() {
            tasks.spawn(crate::cascade::uplink::run(Arc::clone(&context), parent));
        }
        tasks.spawn(sample_rates(Arc::clone(&context)));
        let router = crate::http::router(Arc::clone(&context))?;
        let stop = shutdown.clone();
        tasks.spawn(async move {
            // No Nagle: a console's events are small writes in a row (a tile's state, then
            // its offer), and the second waited ~40 ms for the browser's delayed ACK.
            let http = http.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY on an HTTP connection");
                }
            });
            let served = axum::serve(http, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        info!(%quic_addr, %http_addr, hub_id = %context.config.hub_id, "hub serving");
        Ok(Self {
            quic_addr,
            http_addr,
            context,
            tasks,
            recorder,
            recorder_stop,
        })
    }

    /// Stops accepting, closes sessions with a reason, and waits (bounded) for the tasks.
    pub async fn shutdown(mut self) {
        self.context.shutdown.cancel();
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown: tasks still running after 5 s; stopping them");
            self.tasks.shutdown().await;
        }
        // Publishers are gone: the recorder writes what it holds and stops.
        self.recorder_stop.cancel();
        if let Some(mut recorder) = self.recorder.take()
            && tokio::time::timeout(Duration::from_secs(30), &mut recorder)
                .await
                .is_err()
        {
            // Stopped here, its files not yet indexed become orphans at the next start.
            tracing::warn!("shutdown: the recorder did not finish in 30 s; stopping it");
            recorder.abort();
            let _ = recorder.await;
        }
        self.context.evidence.audit.record(
            "hub",
            "hub.stop",
            &self.context.config.hub_id,
            serde_json::json!({}),
        );
        self.context.evidence.audit.flush().await;
        self.context.evidence.index.close().await;
        info!("hub stopped");
    }
}

/// Recomputes units' bitrates and frame rates once a second, until shutdown.
async fn sample_rates(hub: Arc<HubContext>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            now = tick.tick() => {
                hub.units.sample_rates(now - last);
                last = now;
            }
            _ = hub.shutdown.cancelled() => return,
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
