//! The console session over WebSocket (tokio-tungstenite), for browsers: the same messages
//! as gRPC, in the protobuf JSON mapping (text frames; binary frames carry protobuf). The
//! token comes in the first message (`{"auth":{"token":"…"}}`), never in the URL.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use prost::Message as _;
use tianwang_proto::v1::SessionRequest;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::debug;

use super::{ConsoleIo, EVENT_QUEUE, Incoming, MAX_MESSAGE};
use crate::session::HubContext;

fn header_has(req: &Request, name: header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case(token))
}

/// GET /api/session: upgrades to a WebSocket and runs a console session on it.
pub async fn upgrade(State(hub): State<Arc<HubContext>>, req: Request) -> Response {
    accept(hub, req, MAX_MESSAGE, serve)
}

/// The upgraded connection a WebSocket handler serves.
pub type Upgraded = WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Answers a WebSocket upgrade and hands the socket to `serve` (the console's session, or
/// a unit's control session).
pub fn accept<F, Fut>(hub: Arc<HubContext>, req: Request, max_message: usize, serve: F) -> Response
where
    F: FnOnce(Arc<HubContext>, Upgraded) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let (Some(key), true, true, true) = (
        key,
        version_ok,
        header_has(&req, header::UPGRADE, "websocket"),
        header_has(&req, header::CONNECTION, "upgrade"),
    ) else {
        return (
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade (version 13)",
        )
            .into_response();
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let config = WebSocketConfig::default()
                    .max_message_size(Some(max_message))
                    .max_frame_size(Some(max_message));
                let io = hyper_util::rt::TokioIo::new(upgraded);
                let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
                serve(hub, ws).await;
            }
            Err(e) => debug!(error = %e, "WebSocket upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "Upgrade")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

fn decode(msg: Message) -> Option<Incoming> {
    match msg {
        Message::Text(text) => Some(
            match serde_json::from_str::<SessionRequest>(text.as_str()) {
                Ok(r) => Incoming::Request(r),
                Err(e) => Incoming::Undecodable(e.to_string()),
            },
        ),
        Message::Binary(bytes) => Some(match SessionRequest::decode(bytes) {
            Ok(r) => Incoming::Request(r),
            Err(e) => Incoming::Undecodable(e.to_string()),
        }),
        _ => None,
    }
}

async fn serve<S>(hub: Arc<HubContext>, ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    let (in_tx, in_rx) = mpsc::channel(64);
    let (out_tx, mut out_rx) = mpsc::channel(EVENT_QUEUE);
    let driver = tokio::spawn(super::driver::run(
        hub,
        ConsoleIo {
            incoming: in_rx,
            outgoing: out_tx,
        },
        None,
        "websocket",
    ));
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(m)) => {
                    if let Some(item) = decode(m)
                        && in_tx.send(item).await.is_err()
                    {
                        break;
                    }
                }
                Some(Err(WsError::Capacity(e))) => {
                    debug!(error = %e, "console message too large");
                    let close = CloseFrame {
                        code: CloseCode::Size,
                        reason: format!("message too large (limit {MAX_MESSAGE} bytes)").into(),
                    };
                    let _ = sink.send(Message::Close(Some(close))).await;
                    break;
                }
                Some(Err(e)) => {
                    debug!(error = %e, "console WebSocket failed");
                    break;
                }
            },
            event = out_rx.recv() => match event {
                Some(event) => {
                    let text = match serde_json::to_string(&event) {
                        Ok(t) => t,
                        Err(e) => {
                            debug!(error = %e, "encoding a console event");
                            continue;
                        }
                    };
                    if sink.send(Message::text(text)).await.is_err() {
                        break;
                    }
                }
                // The session ended (its last events were sent above).
                None => {
                    let _ = sink.send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "session ended".into(),
                    }))).await;
                    break;
                }
            },
        }
    }
    drop(in_tx);
    let _ = driver.await;
}
