//! Group streams: one unidirectional QUIC stream per group (GOP), a header, then frames.
//!
//! Sending: [`send_track`] drains a relay-core [`Subscription`] onto the connection, a new
//! stream per group with a higher priority than the last, so under congestion the newest
//! group goes first; a group the subscriber falls behind on is reset, never queued behind.
//!
//! Receiving: [`GroupReader`] reads frames into a shared arena, so each frame is split off as
//! a `Bytes` without a per-frame allocation.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tianwang_core::{Frame, Subscription};
use tianwang_proto::v1::GroupHeader;
use tianwang_proto::wire::{self, Progress, WireError, WireFrame};
use tokio::io::AsyncReadExt;

use crate::STREAM_STALE;

/// Frames are read into shared arenas: eight frames' worth, within these bounds (or the
/// frame's own size, if larger). Small frames (audio) so do not pin big buffers.
const ARENA_MIN: usize = 16 * 1024;
const ARENA_MAX: usize = 256 * 1024;
/// Do not issue reads smaller than this into the tail of an arena.
const MIN_READ: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("group stream: {0}")]
    Wire(#[from] WireError),
    #[error("group stream: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("group stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("group stream ended inside a {0}")]
    Truncated(&'static str),
    #[error("group stream reset by the sender (code {0})")]
    Reset(u64),
}

impl GroupError {
    /// Whether the sender gave this group up (superseded or shutting down): not an error of
    /// the protocol.
    pub fn is_reset(&self) -> bool {
        match self {
            GroupError::Reset(_) => true,
            GroupError::Read(quinn::ReadError::Reset(_)) => true,
            GroupError::Io(e) => e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<quinn::ReadError>())
                .is_some_and(|r| matches!(r, quinn::ReadError::Reset(_))),
            _ => false,
        }
    }
}

/// Reads one group stream.
pub struct GroupReader {
    recv: quinn::RecvStream,
    buf: BytesMut,
    max_frame: usize,
    frames: u32,
}

impl GroupReader {
    /// Reads the group header of a freshly accepted stream.
    pub async fn open(
        mut recv: quinn::RecvStream,
        max_frame: usize,
    ) -> Result<(GroupHeader, GroupReader), GroupError> {
        // Small until the header is in: an idle stream holds little.
        let mut buf = BytesMut::with_capacity(MIN_READ);
        let header = loop {
            match wire::decode_group_header(&mut buf)? {
                Progress::Done(h) => break h,
                Progress::Need(_) => {
                    if read_more(&mut recv, &mut buf).await? == 0 {
                        return Err(GroupError::Truncated("group header"));
                    }
                }
            }
        };
        Ok((
            header,
            GroupReader {
                recv,
                buf,
                max_frame,
                frames: 0,
            },
        ))
    }

    /// The next frame, or `None` at the end of the group.
    pub async fn next_frame(&mut self) -> Result<Option<WireFrame>, GroupError> {
        loop {
            match wire::decode_frame(&mut self.buf, self.max_frame)? {
                Progress::Done(f) => {
                    self.frames += 1;
                    return Ok(Some(f));
                }
                Progress::Need(total) => {
                    let spare = self.buf.capacity() - self.buf.len();
                    let wanted = total.saturating_sub(self.buf.len()).max(MIN_READ);
                    if spare < wanted {
                        // A new arena; the partial frame moves over, earlier frames keep
                        // the old one alive for as long as they live.
                        let size = (8 * total)
                            .clamp(ARENA_MIN, ARENA_MAX)
                            .max(total + MIN_READ);
                        let mut fresh = BytesMut::with_capacity(size);
                        fresh.extend_from_slice(&self.buf);
                        self.buf = fresh;
                    }
                    if read_more(&mut self.recv, &mut self.buf).await? == 0 {
                        if self.buf.is_empty() {
                            return Ok(None);
                        }
                        return Err(GroupError::Truncated("frame"));
                    }
                }
            }
        }
    }

    /// Whether the sender has reset this group (it gave it up). Frames already read ahead
    /// are then better left undelivered.
    pub fn was_reset(&mut self) -> bool {
        use futures::FutureExt;
        matches!(self.recv.received_reset().now_or_never(), Some(Ok(Some(_))))
    }

    pub fn frames_read(&self) -> u32 {
        self.frames
    }

    /// Tells the sender to stop sending this group.
    pub fn stop(mut self, code: quinn::VarInt) {
        let _ = self.recv.stop(code);
    }
}

async fn read_more(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> Result<usize, GroupError> {
    match recv.read_buf(buf).await {
        Ok(n) => Ok(n),
        Err(e) => {
            let err = GroupError::Io(e);
            if err.is_reset() {
                Err(GroupError::Reset(0))
            } else {
                Err(err)
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("writing a group: {0}")]
    Write(#[from] quinn::WriteError),
}

/// What became of a track sent by [`send_track`].
#[derive(Debug, Default, Clone, Copy)]
pub struct SendSummary {
    pub frames: u64,
    pub groups: u64,
    /// Groups given up because the receiver fell behind or stopped them.
    pub groups_abandoned: u64,
    /// Frames not sent because their group was given up.
    pub frames_skipped: u64,
}

/// Stream priorities of one connection. Every new group stream, of any track, ranks above
/// all earlier ones (a connection-wide counter), so under congestion the newest media goes
/// first; `base` lifts a whole track (audio) above the others.
#[derive(Clone, Debug, Default)]
pub struct Priority {
    clock: Arc<AtomicI32>,
}

impl Priority {
    /// Audio rides this far above video.
    pub const AUDIO: i32 = 1 << 24;
    /// Backfill from a device's spool rides below all live media.
    pub const BACKFILL: i32 = -(1 << 25);

    /// The priority of a new stream of a track lifted by `base`.
    pub fn next(&self, base: i32) -> i32 {
        // Wraps after 2^24 groups per connection; within a session that is years.
        let n = self.clock.fetch_add(1, Ordering::Relaxed) & (Self::AUDIO - 1);
        base.saturating_add(n)
    }
}

/// Sends a track's frames from `sub` over `conn` until the track closes or the connection
/// fails. `track_id` names the track in each group header; `priority` orders this
/// connection's group streams, `base` lifts this track. `on_sent(frame, now)` runs as each
/// frame is handed to QUIC.
///
/// A group is given up (its stream reset, the rest of its frames skipped) when the
/// subscription falls behind while writing it, or the receiver stops the stream.
pub async fn send_track(
    conn: &quinn::Connection,
    track_id: u32,
    priority: &Priority,
    base: i32,
    mut sub: Subscription,
    on_sent: impl Fn(&Frame, Instant),
) -> Result<SendSummary, SendError> {
    let mut summary = SendSummary::default();
    // The group being written, and the one before it (finished, possibly still in flight).
    let mut current: Option<(u64, quinn::SendStream)> = None;
    let mut previous: Option<quinn::SendStream> = None;
    // A group given up: its remaining frames are not sent.
    let mut skipping: Option<u64> = None;

    while let Some(frame) = sub.next().await {
        // The subscription gave up the group being written: reset its stream.
        if let Some(g) = sub.take_abandoned()
            && current.as_ref().is_some_and(|(cg, _)| *cg == g)
            && let Some((_, mut s)) = current.take()
        {
            let _ = s.reset(STREAM_STALE);
            summary.groups_abandoned += 1;
        }
        if skipping == Some(frame.group) {
            summary.frames_skipped += 1;
            continue;
        }
        let mut header = None;
        if current.as_ref().map(|(g, _)| *g) != Some(frame.group) {
            if !frame.is_keyframe() {
                // Never start a stream mid-group: receivers enter groups at index 0.
                skipping = Some(frame.group);
                summary.frames_skipped += 1;
                continue;
            }
            if let Some(mut old) = previous.take() {
                // Two groups back and still not delivered: stale. (An error here means it
                // was delivered already.)
                let _ = old.reset(STREAM_STALE);
            }
            if let Some((_, mut s)) = current.take() {
                let _ = s.finish();
                previous = Some(s);
            }
            let stream = tokio::select! {
                biased;
                s = conn.open_uni() => s?,
                // The peer grants no new stream and the track moved on: skip ahead.
                _ = sub.behind() => {
                    skipping = Some(frame.group);
                    summary.groups_abandoned += 1;
                    continue;
                }
            };
            let _ = stream.set_priority(priority.next(base));
            let mut h = BytesMut::with_capacity(16);
            wire::encode_delimited(
                &GroupHeader {
                    track_id,
                    sequence: frame.group,
                    backfill: false,
                },
                &mut h,
            );
            header = Some(h.freeze());
            summary.groups += 1;
            current = Some((frame.group, stream));
        }
        let Some((group, stream)) = current.as_mut() else {
            continue;
        };
        let data: Bytes = frame.data.clone();
        let written = tokio::select! {
            biased;
            r = async {
                match header.take() {
                    Some(h) => stream.write_all_chunks(&mut [h, data]).await,
                    None => stream.write_chunk(data).await,
                }
            } => r,
            // The receiver is so slow that a newer group is waiting: give this one up.
            _ = sub.behind() => Err(quinn::WriteError::Stopped(STREAM_STALE)),
        };
        match written {
            Ok(()) => {
                summary.frames += 1;
                on_sent(&frame, Instant::now());
            }
            // We fell behind, or the receiver stopped the stream (it has a newer group):
            // give this group up, not the track.
            Err(quinn::WriteError::Stopped(_)) => {
                let _ = stream.reset(STREAM_STALE);
                skipping = Some(*group);
                summary.groups_abandoned += 1;
                summary.frames_skipped += 1;
                current = None;
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some((_, mut s)) = current.take() {
        let _ = s.finish();
    }
    Ok(summary)
}
