//! The client side of a session: hello, subscribe, and receiving group streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tianwang_proto::v1::{self, Hello, Subscribed, Welcome};
use tianwang_proto::wire::{PROTOCOL_VERSION, WireFrame};
use tianwang_proto::{ControlMessage, ErrorCode, Kind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::control::{Control, ControlError};
use crate::group::{GroupError, GroupReader};

/// Opens the control stream and says hello; returns the hub's Welcome.
pub async fn hello(
    conn: &quinn::Connection,
    hello: Hello,
    timeout: Duration,
) -> Result<(Control, Welcome), ControlError> {
    let mut control = send_hello(conn, hello).await?;
    let welcome = welcome(&mut control, timeout).await?;
    Ok((control, welcome))
}

/// Opens the control stream and sends a hello, without waiting for the answer (on a 0-RTT
/// connection it goes with the first packets).
pub async fn send_hello(
    conn: &quinn::Connection,
    mut hello: Hello,
) -> Result<Control, ControlError> {
    hello.protocol_version = PROTOCOL_VERSION;
    let mut control = Control::open(conn).await?;
    control
        .send(ControlMessage::new(Kind::Hello(hello)))
        .await?;
    Ok(control)
}

/// The hub's answer to a hello.
pub async fn welcome(control: &mut Control, timeout: Duration) -> Result<Welcome, ControlError> {
    let answer = tokio::time::timeout(timeout, control.recv())
        .await
        .map_err(|_| ControlError::Timeout("welcome"))??;
    match answer.kind {
        Some(Kind::Welcome(w)) => Ok(w),
        _ => Err(ControlError::Unexpected {
            expected: "welcome",
            got: answer.kind_name(),
        }),
    }
}

/// Sends a Subscribe and waits for its answer (other messages meanwhile are returned to
/// nobody: call this before anything else is expected on the stream).
pub async fn subscribe(
    control: &mut Control,
    request_id: u64,
    unit_id: &str,
    tracks: &[String],
    timeout: Duration,
) -> Result<Subscribed, ControlError> {
    control
        .send(ControlMessage::new(Kind::Subscribe(v1::Subscribe {
            request_id,
            unit_id: unit_id.to_string(),
            tracks: tracks.to_vec(),
        })))
        .await?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let msg = tokio::time::timeout_at(deadline, control.recv())
            .await
            .map_err(|_| ControlError::Timeout("subscribed"))??;
        match msg.kind {
            Some(Kind::Subscribed(s)) if s.request_id == request_id => return Ok(s),
            Some(Kind::SubscribeError(e)) if e.request_id == request_id => {
                return Err(ControlError::Refused {
                    code: e.code(),
                    reason: e.reason,
                });
            }
            _ => continue,
        }
    }
}

/// A frame as a subscriber received it.
#[derive(Debug, Clone)]
pub struct ReceivedFrame {
    pub track_id: u32,
    pub group: u64,
    /// Position in its group: 0 is the keyframe.
    pub index: u32,
    pub frame: WireFrame,
    pub received_at: Instant,
}

/// Accepts a connection's group streams and yields their frames as they arrive, across
/// groups and tracks. Reading is bounded: a caller that stops calling [`next`] stops the
/// readers, and QUIC flow control pushes back on the sender. With a `max_group_lag`, a
/// group more than that many behind the newest of its track is stopped (STOP_SENDING), so
/// a live viewer that paused resumes at the newest group instead of working through a
/// backlog; without one, every group is read to its end.
///
/// [`next`]: TrackReceiver::next
pub struct TrackReceiver {
    rx: mpsc::Receiver<ReceivedFrame>,
    stats: Arc<ReceiverStats>,
    _tasks: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Default)]
pub struct ReceiverStats {
    pub groups: AtomicU64,
    /// Groups the sender reset (it gave them up).
    pub groups_reset: AtomicU64,
    /// Groups this receiver stopped because newer ones had begun.
    pub groups_stopped: AtomicU64,
    pub errors: AtomicU64,
}

/// Newest group sequence seen per track.
type Newest = Arc<std::sync::Mutex<HashMap<u32, u64>>>;

impl TrackReceiver {
    pub fn spawn(
        conn: quinn::Connection,
        max_frame: usize,
        queue: usize,
        max_group_lag: Option<u64>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let stats = Arc::new(ReceiverStats::default());
        let reader = Reader {
            max_frame,
            max_group_lag,
            tx,
            stats: Arc::clone(&stats),
            newest: Newest::default(),
        };
        let task = tokio::spawn(accept_groups(conn, reader));
        Self {
            rx,
            stats,
            _tasks: task,
        }
    }

    /// The next frame; `None` once the connection is gone and everything read was taken.
    pub async fn next(&mut self) -> Option<ReceivedFrame> {
        self.rx.recv().await
    }

    pub fn stats(&self) -> &ReceiverStats {
        &self.stats
    }
}

impl Drop for TrackReceiver {
    fn drop(&mut self) {
        self._tasks.abort();
    }
}

#[derive(Clone)]
struct Reader {
    max_frame: usize,
    max_group_lag: Option<u64>,
    tx: mpsc::Sender<ReceivedFrame>,
    stats: Arc<ReceiverStats>,
    newest: Newest,
}

impl Reader {
    /// Records `group` as seen; whether it is too far behind the newest of its track.
    fn is_stale(&self, track: u32, group: u64) -> bool {
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        let n = newest.entry(track).or_insert(group);
        *n = (*n).max(group);
        self.max_group_lag
            .is_some_and(|lag| group.saturating_add(lag) < *n)
    }
}

async fn accept_groups(conn: quinn::Connection, reader: Reader) {
    let mut readers = JoinSet::new();
    loop {
        tokio::select! {
            s = conn.accept_uni() => match s {
                Ok(recv) => {
                    readers.spawn(read_group(recv, reader.clone()));
                }
                Err(_) => break,
            },
            Some(_) = readers.join_next(), if !readers.is_empty() => {}
        }
    }
    // Let the readers drain what already arrived.
    while readers.join_next().await.is_some() {}
}

async fn read_group(recv: quinn::RecvStream, r: Reader) {
    let stats = Arc::clone(&r.stats);
    let result: Result<(), GroupError> = async {
        let (header, mut reader) = GroupReader::open(recv, r.max_frame).await?;
        stats.groups.fetch_add(1, Ordering::Relaxed);
        // Known as newest from its header on, before any of its frames can be delivered.
        r.is_stale(header.track_id, header.sequence);
        let mut index = 0;
        while let Some(frame) = reader.next_frame().await? {
            // Wait for room first, then decide: a group that went stale while this reader
            // waited is stopped rather than delivered late.
            let Ok(permit) = r.tx.reserve().await else {
                reader.stop(crate::STREAM_SHUTDOWN);
                break;
            };
            if r.is_stale(header.track_id, header.sequence) {
                stats.groups_stopped.fetch_add(1, Ordering::Relaxed);
                reader.stop(crate::STREAM_STALE);
                break;
            }
            if r.max_group_lag.is_some() && reader.was_reset() {
                // Given up by the sender while this reader waited: do not deliver the rest.
                stats.groups_reset.fetch_add(1, Ordering::Relaxed);
                break;
            }
            permit.send(ReceivedFrame {
                track_id: header.track_id,
                group: header.sequence,
                index,
                frame,
                received_at: Instant::now(),
            });
            index += 1;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {}
        Err(e) if e.is_reset() => {
            stats.groups_reset.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "group stream failed");
        }
    }
}

/// Puts a live subscriber's frames in order per track: once a newer group has begun, late
/// frames of older ones are dropped, and a group is only entered at its keyframe.
#[derive(Debug, Default)]
pub struct LiveOrder {
    tracks: HashMap<u32, (u64, u32)>,
}

impl LiveOrder {
    /// Whether to use this frame.
    pub fn accept(&mut self, f: &ReceivedFrame) -> bool {
        match self.tracks.get_mut(&f.track_id) {
            None if f.index == 0 => {
                self.tracks.insert(f.track_id, (f.group, 1));
                true
            }
            None => false,
            Some((group, next)) => {
                if f.group == *group && f.index == *next {
                    *next += 1;
                    true
                } else if f.group > *group && f.index == 0 {
                    *group = f.group;
                    *next = 1;
                    true
                } else {
                    false
                }
            }
        }
    }
}

/// Says goodbye on the control stream and closes the connection.
pub async fn close(conn: &quinn::Connection, control: Option<&mut Control>, reason: &str) {
    if let Some(c) = control {
        let _ = c
            .send(crate::control::close_message(
                ErrorCode::Unspecified,
                reason,
            ))
            .await;
    }
    conn.close(crate::close_code(ErrorCode::Unspecified), reason.as_bytes());
}
