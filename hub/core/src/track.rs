//! A track: one publisher's frames fanned out to any number of subscribers.
//!
//! The publisher never waits: each subscriber has a bounded ring (`ArrayQueue`) and a full
//! ring evicts its oldest frame. The subscriber side notices the hole and skips to the next
//! group it can have whole, so it only ever sees groups that start at their keyframe and run
//! without gaps. The current group is cached, so a new subscriber starts at once from its
//! keyframe instead of waiting for the next one.
//!
//! In steady state a frame costs, per subscriber, one `Bytes` clone, one ring push and one
//! waker check: no lock and no allocation. The subscriber list is a copy-on-write snapshot
//! (changed on subscribe and unsubscribe only); the group cache is allocated once per group.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use arc_swap::{ArcSwap, ArcSwapOption};
use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;

use crate::frame::{Frame, FrameIn};
use crate::stats::{RelayStats, SubscriberStats, SubscriberStatsSnapshot};

#[derive(Clone, Copy, Debug)]
pub struct TrackConfig {
    /// Bound of each subscriber's queue, in frames.
    pub queue_frames: usize,
    /// Frames of the current group kept for late joiners; a longer group is not cached past
    /// this, and a subscriber joining then waits for the next keyframe.
    pub group_cache_frames: usize,
    /// How many groups a subscriber may trail the newest one before it skips ahead. With 1,
    /// the previous group may finish while the next one starts.
    pub max_group_lag: u64,
    /// Bytes of the current group kept for late joiners (with `group_cache_frames`, the
    /// cache's bound).
    pub group_cache_bytes: usize,
}

impl Default for TrackConfig {
    fn default() -> Self {
        Self {
            queue_frames: 512,
            group_cache_frames: 1024,
            max_group_lag: 1,
            group_cache_bytes: 16 * 1024 * 1024,
        }
    }
}

struct GroupCache {
    sequence: u64,
    frames: Box<[OnceLock<Frame>]>,
    len: AtomicUsize,
    bytes: AtomicUsize,
    /// A frame did not fit (count or bytes): the cache is no longer the whole group.
    overflowed: AtomicBool,
}

struct Slot {
    queue: ArrayQueue<Frame>,
    waker: AtomicWaker,
    closed: AtomicBool,
    stats: SubscriberStats,
}

/// One track of a broadcast.
pub struct Track {
    name: String,
    config: TrackConfig,
    subscribers: ArcSwap<Vec<Arc<Slot>>>,
    current: ArcSwapOption<GroupCache>,
    /// Sequence of the newest group begun; 0 before the first.
    latest_group: AtomicU64,
    closed: AtomicBool,
    relay: Arc<RelayStats>,
    totals: TrackTotals,
    /// Held by [`Track::push_group`] while it writes.
    whole: std::sync::Mutex<()>,
}

/// Running totals of a track, for rates (bitrate, frame rate) read by the shell.
#[derive(Debug, Default)]
pub struct TrackTotals {
    pub frames: AtomicU64,
    pub payload_bytes: AtomicU64,
    /// Capture time of the newest frame, µs since the Unix epoch.
    pub last_timestamp_us: AtomicU64,
}

impl std::fmt::Debug for Track {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Track")
            .field("name", &self.name)
            .field("latest_group", &self.latest_group())
            .field("subscribers", &self.subscriber_count())
            .finish()
    }
}

impl Track {
    pub fn new(name: impl Into<String>, config: TrackConfig, relay: Arc<RelayStats>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            config: TrackConfig {
                queue_frames: config.queue_frames.max(1),
                ..config
            },
            subscribers: ArcSwap::from_pointee(Vec::new()),
            current: ArcSwapOption::empty(),
            latest_group: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            relay,
            totals: TrackTotals::default(),
            whole: std::sync::Mutex::new(()),
        })
    }

    /// Writes a whole group at once. Groups of one track begun concurrently overtake one
    /// another, and a subscription skips a group that a newer one overtook; groups written
    /// only through this never interleave, so a reader that never skips for lag sees each
    /// whole (the recorder's read of a unit's backfill, which many streams write at once).
    pub fn push_group(self: &Arc<Self>, frames: impl IntoIterator<Item = FrameIn>) {
        let _whole = self.whole.lock().unwrap_or_else(|e| e.into_inner());
        let mut group = self.begin_group();
        for frame in frames {
            group.push(frame);
        }
    }

    pub fn totals(&self) -> &TrackTotals {
        &self.totals
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn latest_group(&self) -> u64 {
        self.latest_group.load(Ordering::Acquire)
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.load().len()
    }

    /// Starts a new group; it becomes the track's newest and is cached for late joiners.
    /// Frames still arriving for older groups are dropped as stale from now on.
    pub fn begin_group(self: &Arc<Self>) -> GroupWriter {
        let sequence = self.latest_group.fetch_add(1, Ordering::AcqRel) + 1;
        let cache = Arc::new(GroupCache {
            sequence,
            frames: (0..self.config.group_cache_frames)
                .map(|_| OnceLock::new())
                .collect(),
            len: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            overflowed: AtomicBool::new(false),
        });
        // Two groups begun at once: keep the newer in the cache.
        self.current.rcu(|cur| match cur {
            Some(c) if c.sequence > sequence => Some(Arc::clone(c)),
            _ => Some(Arc::clone(&cache)),
        });
        self.relay.groups_in.fetch_add(1, Ordering::Relaxed);
        GroupWriter {
            track: Arc::clone(self),
            cache,
            sequence,
            next_index: 0,
        }
    }

    /// Adds a subscriber. It starts with the cached frames of the current group, so its
    /// first frame is a keyframe available at once.
    pub fn subscribe(self: &Arc<Self>) -> Subscription {
        self.subscribe_with(self.config.queue_frames, self.config.max_group_lag)
    }

    /// A subscriber with its own queue bound and lag. The recorder, which must keep every
    /// frame it can, uses a deep queue and never skips for lag (`u64::MAX`).
    pub fn subscribe_with(
        self: &Arc<Self>,
        queue_frames: usize,
        max_group_lag: u64,
    ) -> Subscription {
        let slot = Arc::new(Slot {
            queue: ArrayQueue::new(queue_frames.max(1)),
            waker: AtomicWaker::new(),
            closed: AtomicBool::new(self.closed.load(Ordering::Acquire)),
            stats: SubscriberStats::default(),
        });
        self.subscribers.rcu(|list| {
            let mut list = Vec::clone(list);
            list.push(Arc::clone(&slot));
            list
        });
        // A close() that walked the list before the slot was in it has set `closed` first.
        if self.closed.load(Ordering::SeqCst) {
            slot.closed.store(true, Ordering::Release);
        }
        // Registered first, read the cache second: a frame pushed in between lands in both,
        // and the cursor below discards the queue's copy as a duplicate. The fence pairs
        // with the one in push(): at least one of the two sees the other's write.
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut prefill = VecDeque::new();
        let mut cursor = Cursor::Joining;
        if let Some(cache) = self.current.load_full() {
            let len = cache.len.load(Ordering::Acquire);
            // An overflowed cache is not the whole group: frames past it are gone.
            let len = if cache.overflowed.load(Ordering::Acquire) {
                0
            } else {
                len
            };
            prefill.extend(cache.frames[..len].iter().filter_map(|f| f.get().cloned()));
            if prefill.len() == len && len > 0 {
                cursor = Cursor::In {
                    group: cache.sequence,
                    next: len as u32,
                    skipping: false,
                };
            } else {
                prefill.clear();
            }
        }
        Subscription {
            track: Arc::clone(self),
            slot,
            prefill,
            cursor,
            abandoned: None,
            max_group_lag,
        }
    }

    /// Forgets the cached group (the publisher went away): a subscriber joining now waits
    /// for the next keyframe rather than starting from stale pictures.
    pub fn clear_cache(&self) {
        self.current.store(None);
    }

    /// Ends every subscription once it has drained its queue.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for slot in self.subscribers.load().iter() {
            slot.closed.store(true, Ordering::Release);
            slot.waker.wake();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn remove(&self, slot: &Arc<Slot>) {
        self.subscribers.rcu(|list| {
            list.iter()
                .filter(|s| !Arc::ptr_eq(s, slot))
                .cloned()
                .collect::<Vec<_>>()
        });
    }
}

/// What became of a pushed frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// Queued for this many subscribers; `evicted` of their queues were full and dropped
    /// their oldest frame.
    Forwarded { subscribers: usize, evicted: usize },
    /// A newer group has begun: this group's frames are no longer relayed.
    Stale,
}

/// The publisher's handle on one group: frames pushed here get the group's sequence and
/// their index in it. One writer per group, so indices are dense.
pub struct GroupWriter {
    track: Arc<Track>,
    cache: Arc<GroupCache>,
    sequence: u64,
    next_index: u32,
}

impl GroupWriter {
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    pub fn frames_pushed(&self) -> u32 {
        self.next_index
    }

    pub fn push(&mut self, frame: FrameIn) -> PushOutcome {
        let track = &*self.track;
        if self.sequence < track.latest_group() {
            track.relay.frames_stale_in.fetch_add(1, Ordering::Relaxed);
            return PushOutcome::Stale;
        }
        let index = self.next_index;
        self.next_index = self.next_index.saturating_add(1);
        let frame = Frame {
            data: frame.data,
            payload_offset: frame.payload_offset,
            timestamp_us: frame.timestamp_us,
            duration_us: frame.duration_us,
            group: self.sequence,
            index,
            received_at: frame.received_at,
        };
        let cached_bytes = self
            .cache
            .bytes
            .fetch_add(frame.data.len(), Ordering::Relaxed)
            + frame.data.len();
        if cached_bytes <= track.config.group_cache_bytes
            && let Some(slot) = self.cache.frames.get(index as usize)
        {
            // Only this writer sets slots of this group, each once, in order.
            let _ = slot.set(frame.clone());
            self.cache.len.store(index as usize + 1, Ordering::Release);
        } else {
            // Past the cache's bound: joiners wait for the next group.
            self.cache.overflowed.store(true, Ordering::Release);
        }
        // Pairs with the fence in subscribe(): a joiner either sees this frame in the cache
        // or is in the list loaded below.
        std::sync::atomic::fence(Ordering::SeqCst);
        let subscribers = track.subscribers.load();
        let mut evicted = 0;
        for slot in subscribers.iter() {
            if slot.queue.force_push(frame.clone()).is_some() {
                slot.stats
                    .dropped_queue_full
                    .fetch_add(1, Ordering::Relaxed);
                evicted += 1;
            }
            slot.waker.wake();
        }
        track.relay.frames_in.fetch_add(1, Ordering::Relaxed);
        track
            .relay
            .bytes_in
            .fetch_add(frame.payload_len() as u64, Ordering::Relaxed);
        let totals = &track.totals;
        totals.frames.fetch_add(1, Ordering::Relaxed);
        totals
            .payload_bytes
            .fetch_add(frame.payload_len() as u64, Ordering::Relaxed);
        totals
            .last_timestamp_us
            .store(frame.timestamp_us, Ordering::Relaxed);
        if evicted > 0 {
            track
                .relay
                .dropped_queue_full
                .fetch_add(evicted as u64, Ordering::Relaxed);
        }
        PushOutcome::Forwarded {
            subscribers: subscribers.len(),
            evicted,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cursor {
    /// Nothing delivered yet and no cached group to start from: the first frame decides.
    Joining,
    /// Inside `group`; `next` is the index expected next. While `skipping`, the rest of the
    /// group is dropped because part of it is missing or it is too old.
    In {
        group: u64,
        next: u32,
        skipping: bool,
    },
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Deliver,
    /// Dropped: counted against the subscriber.
    Drop {
        new_skip: bool,
    },
    /// Not for this subscriber at all (a duplicate of the prefill, or a late frame of a
    /// group it already left): not a drop.
    Ignore,
}

impl Cursor {
    fn accept(&mut self, group: u64, index: u32, latest: u64, lag: u64) -> Verdict {
        let fresh = group.saturating_add(lag) >= latest;
        match *self {
            Cursor::Joining => {
                if index == 0 && fresh {
                    *self = Cursor::In {
                        group,
                        next: 1,
                        skipping: false,
                    };
                    Verdict::Deliver
                } else {
                    *self = Cursor::In {
                        group,
                        next: index.saturating_add(1),
                        skipping: true,
                    };
                    Verdict::Drop { new_skip: true }
                }
            }
            Cursor::In {
                group: g,
                next,
                skipping,
            } => {
                if group < g || (group == g && index < next) {
                    return Verdict::Ignore;
                }
                if group == g && index == next && !skipping && fresh {
                    *self = Cursor::In {
                        group,
                        next: next + 1,
                        skipping: false,
                    };
                    return Verdict::Deliver;
                }
                if group > g && index == 0 && fresh {
                    *self = Cursor::In {
                        group,
                        next: 1,
                        skipping: false,
                    };
                    return Verdict::Deliver;
                }
                // A hole in the group (evicted frames), a group without its keyframe, or a
                // group too far behind the newest: drop until a fresh keyframe.
                let new_skip = !(skipping && group == g);
                *self = Cursor::In {
                    group,
                    next: index.saturating_add(1),
                    skipping: true,
                };
                Verdict::Drop { new_skip }
            }
        }
    }
}

/// A subscriber's end of a track. Frames come out whole-group-wise: each group it sees
/// starts at the keyframe and has no holes (it may be cut short when the subscriber falls
/// behind: see [`Subscription::take_abandoned`]).
pub struct Subscription {
    track: Arc<Track>,
    slot: Arc<Slot>,
    prefill: VecDeque<Frame>,
    cursor: Cursor,
    abandoned: Option<u64>,
    max_group_lag: u64,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("track", &self.track.name)
            .field("cursor", &self.cursor)
            .finish()
    }
}

impl Subscription {
    pub fn track(&self) -> &Arc<Track> {
        &self.track
    }

    pub fn stats(&self) -> SubscriberStatsSnapshot {
        self.slot.stats.snapshot()
    }

    /// The group this subscriber was delivering when it had to give the rest of it up, if
    /// that happened since the last call. A QUIC sender resets that group's stream.
    pub fn take_abandoned(&mut self) -> Option<u64> {
        self.abandoned.take()
    }

    /// Whether the newest group is further ahead than the allowed lag: a sender blocked on a
    /// slow link should give up the group it is writing.
    pub fn is_behind(&self) -> bool {
        match self.cursor {
            Cursor::In { group, .. } => {
                group.saturating_add(self.max_group_lag) < self.track.latest_group()
            }
            Cursor::Joining => false,
        }
    }

    /// The next frame if one is ready, without waiting.
    pub fn try_next(&mut self) -> Option<Frame> {
        if let Some(f) = self.prefill.pop_front() {
            self.slot.stats.delivered.fetch_add(1, Ordering::Relaxed);
            return Some(f);
        }
        let lag = self.max_group_lag;
        while let Some(f) = self.slot.queue.pop() {
            let before = self.cursor;
            match self
                .cursor
                .accept(f.group, f.index, self.track.latest_group(), lag)
            {
                Verdict::Deliver => {
                    self.slot.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    return Some(f);
                }
                Verdict::Drop { new_skip } => {
                    let stats = &self.slot.stats;
                    stats.dropped_skipped.fetch_add(1, Ordering::Relaxed);
                    self.track
                        .relay
                        .dropped_skipped
                        .fetch_add(1, Ordering::Relaxed);
                    if new_skip {
                        stats.groups_skipped.fetch_add(1, Ordering::Relaxed);
                        // Giving up the group being delivered (a hole in it), or entering a
                        // newer group past its keyframe: the queue overflowed and the
                        // delivered group's tail is likely gone too.
                        if let Cursor::In {
                            group,
                            skipping: false,
                            ..
                        } = before
                            && (group == f.group || f.index > 0)
                        {
                            self.abandoned = Some(group);
                        }
                    }
                }
                Verdict::Ignore => {}
            }
        }
        None
    }

    /// Waits for the next frame; `None` once the track is closed and drained.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        if let Some(f) = self.try_next() {
            return Poll::Ready(Some(f));
        }
        self.slot.waker.register(cx.waker());
        // A frame pushed between the first check and the registration woke nobody.
        if let Some(f) = self.try_next() {
            return Poll::Ready(Some(f));
        }
        if self.slot.closed.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    pub async fn next(&mut self) -> Option<Frame> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Ready once [`Subscription::is_behind`] holds (or the track closed): lets a sender
    /// blocked on its transport notice that what it is writing has gone stale.
    pub fn poll_behind(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_behind() || self.slot.closed.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.slot.waker.register(cx.waker());
        if self.is_behind() || self.slot.closed.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    pub async fn behind(&self) {
        std::future::poll_fn(|cx| self.poll_behind(cx)).await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.slot.closed.store(true, Ordering::Release);
        self.track.remove(&self.slot);
    }
}

#[cfg(test)]
#[path = "track_tests.rs"]
mod tests;
