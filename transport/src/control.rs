//! The control stream: the first bidirectional stream of a connection, carrying
//! length-delimited `ControlMessage`s both ways.

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use tianwang_proto::wire::{self, MAX_CONTROL_MESSAGE, Progress, WireError};
use tianwang_proto::{ControlMessage, ErrorCode, Kind, v1};
use tokio_util::codec::{Decoder, Encoder, FramedRead, FramedWrite};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control stream: {0}")]
    Wire(#[from] WireError),
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("control stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("control stream: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("control stream closed by the peer")]
    Closed,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("the peer closed the session: {code:?}: {reason}")]
    Refused { code: ErrorCode, reason: String },
    #[error("protocol violation: expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

impl ControlError {
    /// The close code to send the peer for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ControlError::Wire(WireError::TooLarge { .. }) => ErrorCode::TooLarge,
            ControlError::Wire(_) | ControlError::Unexpected { .. } => ErrorCode::Protocol,
            ControlError::Timeout(_) => ErrorCode::Protocol,
            _ => ErrorCode::Internal,
        }
    }
}

/// Length-delimited `ControlMessage`s with a size bound.
#[derive(Clone, Copy, Debug)]
pub struct ControlCodec {
    pub max: usize,
}

impl Default for ControlCodec {
    fn default() -> Self {
        Self {
            max: MAX_CONTROL_MESSAGE,
        }
    }
}

impl Decoder for ControlCodec {
    type Item = ControlMessage;
    type Error = ControlError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        match wire::decode_delimited(src, "control message", self.max)? {
            Progress::Done(m) => Ok(Some(m)),
            Progress::Need(n) => {
                src.reserve(n.saturating_sub(src.len()));
                Ok(None)
            }
        }
    }
}

impl Encoder<ControlMessage> for ControlCodec {
    type Error = ControlError;

    fn encode(&mut self, item: ControlMessage, dst: &mut BytesMut) -> Result<(), Self::Error> {
        wire::encode_delimited(&item, dst);
        Ok(())
    }
}

pub type ControlSender = FramedWrite<quinn::SendStream, ControlCodec>;
pub type ControlReceiver = FramedRead<quinn::RecvStream, ControlCodec>;

/// Both halves of a control stream.
pub struct Control {
    pub tx: ControlSender,
    pub rx: ControlReceiver,
}

impl Control {
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Self {
            tx: FramedWrite::new(send, ControlCodec::default()),
            rx: FramedRead::new(recv, ControlCodec::default()),
        }
    }

    pub async fn open(conn: &quinn::Connection) -> Result<Self, ControlError> {
        let (send, recv) = conn.open_bi().await?;
        Ok(Self::new(send, recv))
    }

    pub async fn accept(conn: &quinn::Connection) -> Result<Self, ControlError> {
        let (send, recv) = conn.accept_bi().await?;
        Ok(Self::new(send, recv))
    }

    /// Whether the peer opened this stream in 0-RTT data (replayable but for the
    /// single-use tickets the hub keeps; see `tls`).
    pub fn is_0rtt(&self) -> bool {
        self.rx.get_ref().is_0rtt()
    }

    pub async fn send(&mut self, msg: ControlMessage) -> Result<(), ControlError> {
        self.tx.send(msg).await
    }

    /// The next message; `Err(Closed)` at the end of the stream, `Err(Refused)` when the
    /// peer's message is a Close.
    pub async fn recv(&mut self) -> Result<ControlMessage, ControlError> {
        recv(&mut self.rx).await
    }

    pub fn split(self) -> (ControlSender, ControlReceiver) {
        (self.tx, self.rx)
    }
}

/// Reads the next message from a receiver half (see [`Control::recv`]).
pub async fn recv(rx: &mut ControlReceiver) -> Result<ControlMessage, ControlError> {
    match rx.next().await {
        None => Err(ControlError::Closed),
        Some(Err(e)) => Err(e),
        Some(Ok(ControlMessage {
            kind: Some(Kind::Close(c)),
        })) => Err(ControlError::Refused {
            code: c.code(),
            reason: c.reason,
        }),
        Some(Ok(m)) => Ok(m),
    }
}

/// Writes every message from `outgoing` to `tx` until the channel closes. Run it as its
/// own task so that a peer that stops reading never stalls the session loop that queues
/// the messages.
pub async fn pump(
    mut tx: ControlSender,
    mut outgoing: tokio::sync::mpsc::Receiver<ControlMessage>,
) -> Result<(), ControlError> {
    while let Some(msg) = outgoing.recv().await {
        tx.send(msg).await?;
    }
    Ok(())
}

/// A Close message.
pub fn close_message(code: ErrorCode, reason: impl Into<String>) -> ControlMessage {
    ControlMessage::new(Kind::Close(v1::Close {
        code: code as i32,
        reason: reason.into(),
    }))
}
