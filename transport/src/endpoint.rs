//! QUIC endpoints with Tianwang's transport settings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::tls::{self, TlsError, Trust};

/// Transport settings. Defaults suit a live camera over a mobile link; tests shrink the
/// receive windows to make a stalled reader felt quickly.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A silent peer is gone after this long (keep-alives run at a third of it).
    pub idle_timeout: Duration,
    /// Concurrent group streams the peer may open towards us.
    pub max_uni_streams: u32,
    /// Bytes the peer may have in flight on one stream, and on the whole connection.
    pub stream_receive_window: u32,
    pub receive_window: u32,
    /// Bytes we buffer for sending across all streams.
    pub send_window: u64,
    /// The RTT assumed before one is measured (quinn's default, 333 ms, when None): it
    /// sets how soon a lost handshake packet is sent again.
    pub initial_rtt: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(10),
            max_uni_streams: 256,
            stream_receive_window: 4 * 1024 * 1024,
            receive_window: 16 * 1024 * 1024,
            send_window: 8 * 1024 * 1024,
            initial_rtt: None,
        }
    }
}

impl Limits {
    pub fn transport_config(&self) -> Arc<TransportConfig> {
        let mut t = TransportConfig::default();
        let idle_ms = u32::try_from(self.idle_timeout.as_millis()).unwrap_or(u32::MAX);
        t.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(idle_ms))));
        t.keep_alive_interval(Some(self.idle_timeout / 3));
        t.max_concurrent_uni_streams(VarInt::from_u32(self.max_uni_streams));
        // Only the control stream is bidirectional.
        t.max_concurrent_bidi_streams(VarInt::from_u32(1));
        t.stream_receive_window(VarInt::from_u32(self.stream_receive_window));
        t.receive_window(VarInt::from_u32(self.receive_window));
        t.send_window(self.send_window);
        if let Some(rtt) = self.initial_rtt {
            t.initial_rtt(rtt);
        }
        Arc::new(t)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("binding UDP {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("resolving {addr}: {source}")]
    Resolve {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} resolves to no address")]
    NoAddress { addr: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("connecting to {addr}: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: quinn::ConnectionError,
    },
}

pub fn server_endpoint(
    addr: SocketAddr,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<&[CertificateDer<'static>]>,
    limits: &Limits,
) -> Result<Endpoint, EndpointError> {
    let crypto = tls::server_crypto(certs, key, client_roots)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(limits.transport_config());
    Endpoint::server(config, addr).map_err(|source| EndpointError::Bind { addr, source })
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn client_endpoint(
    trust: &Trust,
    limits: &Limits,
    ipv6: bool,
) -> Result<Endpoint, EndpointError> {
    client_endpoint_with_identity(trust, None, limits, ipv6)
}

/// A client endpoint that presents a certificate chain (a child hub to its parent).
pub fn client_endpoint_with_identity(
    trust: &Trust,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    limits: &Limits,
    ipv6: bool,
) -> Result<Endpoint, EndpointError> {
    let crypto = tls::client_crypto_with_identity(trust, identity)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(limits.transport_config());
    let addr: SocketAddr = if ipv6 {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint =
        Endpoint::client(addr).map_err(|source| EndpointError::Bind { addr, source })?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

/// Resolves `host:port`.
pub async fn resolve(addr: &str) -> Result<SocketAddr, EndpointError> {
    tokio::net::lookup_host(addr)
        .await
        .map_err(|source| EndpointError::Resolve {
            addr: addr.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| EndpointError::NoAddress {
            addr: addr.to_string(),
        })
}

/// Connects to `host:port`; the host part is the TLS server name.
/// Connects over a link that may be down: a fresh attempt starts every `every` while the
/// earlier ones are still waiting for an answer, so a link that comes back is used within
/// `every` rather than at the oldest attempt's next (backed-off) retransmission. The first
/// connection made wins; a refusal other than a timeout ends it at once; after `within`
/// no new attempt starts.
pub async fn connect_staggered(
    endpoint: &Endpoint,
    addr: &str,
    every: Duration,
    within: Duration,
) -> Result<quinn::Connection, EndpointError> {
    use futures::StreamExt;
    let mut attempts = futures::stream::FuturesUnordered::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut tick = tokio::time::interval(every);
    let mut last = None;
    loop {
        let open = tokio::time::Instant::now() < deadline;
        if !open && attempts.is_empty() {
            return Err(last.unwrap_or(EndpointError::Handshake {
                addr: addr.to_string(),
                source: quinn::ConnectionError::TimedOut,
            }));
        }
        tokio::select! {
            _ = tick.tick(), if open => attempts.push(connect(endpoint, addr)),
            Some(result) = attempts.next(), if !attempts.is_empty() => match result {
                Ok(conn) => return Ok(conn),
                Err(e @ EndpointError::Handshake { source: quinn::ConnectionError::TimedOut, .. }) => {
                    last = Some(e);
                }
                Err(e) => return Err(e),
            },
            _ = tokio::time::sleep_until(deadline), if open && attempts.is_empty() => {}
        }
    }
}

pub async fn connect(endpoint: &Endpoint, addr: &str) -> Result<quinn::Connection, EndpointError> {
    let target = resolve(addr).await?;
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(addr);
    let connecting = endpoint
        .connect(target, host)
        .map_err(|source| EndpointError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    connecting.await.map_err(|source| EndpointError::Handshake {
        addr: addr.to_string(),
        source,
    })
}
