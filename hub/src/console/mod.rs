//! The command console: its session (one per console, over gRPC or WebSocket), the WebRTC
//! PeerConnection that carries its tiles, WHEP for generic players, and the browser console's
//! files.
//!
//! One session logic, two transports: `grpc.rs` and `ws.rs` only turn their wire into
//! [`Incoming`] requests and [`tianwang_proto::v1::SessionEvent`]s; `driver.rs` runs the
//! sans-IO `tianwang_core::console::ConsoleSession` against them.

pub mod driver;
pub mod grpc;
pub mod media;
pub mod peer;
mod rtcp;
pub mod whep;
pub mod ws;

use tianwang_proto::v1::{SessionEvent, SessionRequest};
use tokio::sync::mpsc;

/// Largest console message accepted (an SDP answer for 25 tiles fits well).
pub const MAX_MESSAGE: usize = 128 * 1024;

/// What a transport hands the session.
#[derive(Debug)]
pub enum Incoming {
    Request(SessionRequest),
    /// A message that arrived but could not be decoded: the console is told, the session
    /// goes on.
    Undecodable(String),
}

/// A console session's two directions, whatever carries them.
pub struct ConsoleIo {
    pub incoming: mpsc::Receiver<Incoming>,
    /// Bounded: a console that stops reading its events is closed, never waited for.
    pub outgoing: mpsc::Sender<SessionEvent>,
}

/// Capacity of the outgoing event queue of a session.
pub const EVENT_QUEUE: usize = 256;
