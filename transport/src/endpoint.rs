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
    /// Tolerate a path that reorders (see [`Reordering`]); quinn's thresholds when None.
    pub reordering: Option<Reordering>,
}

/// How far out of order a packet may arrive before it counts as lost. Mobile paths reorder:
/// per-packet jitter of tens of ms is 10+ packets at a few Mbit/s, and quinn (3 packets or
/// 9/8 of an RTT) reads that as loss and halves its window, so live video starves on a path
/// that loses nothing. Wider thresholds delay a real loss's repair by a fraction of an RTT:
/// the trade suits the device's uplink, which carries the evidence over radio.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reordering {
    pub packets: u32,
    /// In RTTs.
    pub time: f32,
}

impl Reordering {
    /// Measured through the impairment harness with 200 ms RTT and ±25 ms jitter per
    /// packet: live frames delivered went from 71 % to 90–96 % over runs at the full
    /// rate (docs/benchmarks.md, "Impaired networks").
    pub const MOBILE: Reordering = Reordering {
        packets: 16,
        time: 1.5,
    };
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
            reordering: None,
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
        if let Some(r) = self.reordering {
            t.packet_threshold(r.packets);
            t.time_threshold(r.time);
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
    #[error("saying hello to {addr}: {source}")]
    Hello {
        addr: String,
        #[source]
        source: crate::ControlError,
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

/// A connection made by [`connect_staggered`], with the control stream its hello went on.
pub struct Connected {
    pub conn: quinn::Connection,
    pub control: crate::Control,
    /// The hello went in 0-RTT data with the first packets, and the hub took it: the
    /// Welcome is on its way a round trip sooner than after a full handshake.
    pub early: bool,
}

/// Connects over a link that may be down, and says `hello`: a fresh attempt starts every
/// `every` while the earlier ones are still waiting for an answer, so a link that comes
/// back is used within `every` rather than at the oldest attempt's next (backed-off)
/// retransmission. The first connection made wins; a refusal other than a timeout ends it
/// at once; after `within` no new attempt starts.
///
/// An attempt that holds a session ticket from an earlier connection to this hub sends the
/// hello in 0-RTT data, before the handshake completes; one the hub does not take (its
/// tickets are gone after a restart) says hello again once the handshake is done. Tickets
/// are single-use on both sides, so a long outage spends them and later attempts go
/// without (a full handshake, as before).
pub async fn connect_staggered(
    endpoint: &Endpoint,
    addr: &str,
    every: Duration,
    within: Duration,
    hello: &tianwang_proto::v1::Hello,
) -> Result<Connected, EndpointError> {
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
            _ = tick.tick(), if open => attempts.push(attempt(endpoint, addr, hello.clone())),
            Some(result) = attempts.next(), if !attempts.is_empty() => match result {
                Ok(c) => return Ok(c),
                Err(e @ EndpointError::Handshake { source: quinn::ConnectionError::TimedOut, .. }) => {
                    last = Some(e);
                }
                Err(e) => return Err(e),
            },
            _ = tokio::time::sleep_until(deadline), if open && attempts.is_empty() => {}
        }
    }
}

/// One connection attempt of [`connect_staggered`]: done when the handshake is and the
/// hello is sent.
async fn attempt(
    endpoint: &Endpoint,
    addr: &str,
    hello: tianwang_proto::v1::Hello,
) -> Result<Connected, EndpointError> {
    let handshake = |source| EndpointError::Handshake {
        addr: addr.to_string(),
        source,
    };
    let hello_failed = |source| EndpointError::Hello {
        addr: addr.to_string(),
        source,
    };
    let connecting = start(endpoint, addr).await?;
    let conn = match connecting.into_0rtt() {
        Ok((conn, accepted)) => {
            let sent = crate::client::send_hello(&conn, hello.clone()).await;
            let taken = accepted.await;
            if let Some(reason) = conn.close_reason() {
                return Err(handshake(reason));
            }
            match sent {
                Ok(control) if taken => {
                    return Ok(Connected {
                        conn,
                        control,
                        early: true,
                    });
                }
                // Not taken: what went early is void; the connection itself stands.
                _ => conn,
            }
        }
        Err(connecting) => connecting.await.map_err(handshake)?,
    };
    let control = crate::client::send_hello(&conn, hello)
        .await
        .map_err(hello_failed)?;
    Ok(Connected {
        conn,
        control,
        early: false,
    })
}

/// Resolves `addr` and starts a handshake; the host part is the TLS server name.
async fn start(endpoint: &Endpoint, addr: &str) -> Result<quinn::Connecting, EndpointError> {
    let target = resolve(addr).await?;
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or(addr);
    endpoint
        .connect(target, host)
        .map_err(|source| EndpointError::Connect {
            addr: addr.to_string(),
            source,
        })
}

/// Connects to `host:port` (a full handshake); the host part is the TLS server name.
pub async fn connect(endpoint: &Endpoint, addr: &str) -> Result<quinn::Connection, EndpointError> {
    start(endpoint, addr)
        .await?
        .await
        .map_err(|source| EndpointError::Handshake {
            addr: addr.to_string(),
            source,
        })
}
