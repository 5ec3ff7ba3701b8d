//! Tianwang over QUIC (ALPN `tianwang/1`): endpoints and TLS, the control channel of
//! length-delimited `ControlMessage`s, and group streams in both directions. The hub, the
//! field agent, `hub watch` and the load generator all speak through this crate, so the
//! protocol of `docs/protocol.md` is implemented once.

pub mod ca;
pub mod client;
pub mod control;
pub mod endpoint;
pub mod group;
pub mod tls;

use quinn::VarInt;
use tianwang_proto::ErrorCode;

pub use client::{LiveOrder, ReceivedFrame, TrackReceiver};
pub use control::{Control, ControlError};
pub use endpoint::{
    Limits, Reordering, client_endpoint, client_endpoint_with_identity, connect, server_endpoint,
};
pub use group::{GroupError, GroupReader, Priority, SendError, send_track};
pub use tls::{TlsError, Trust};

/// The connection's application close code for an [`ErrorCode`] (the same number).
pub fn close_code(code: ErrorCode) -> VarInt {
    VarInt::from_u32(code as u32)
}

/// Stream reset / stop code: the group was superseded by a newer one.
pub const STREAM_STALE: VarInt = VarInt::from_u32(1);
/// Stream reset / stop code: the sender or receiver is shutting down.
pub const STREAM_SHUTDOWN: VarInt = VarInt::from_u32(2);
/// Stream stop code: the stream broke the protocol.
pub const STREAM_PROTOCOL: VarInt = VarInt::from_u32(3);
