use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Instant;

use bytes::Bytes;

use super::*;

fn track(queue: usize, lag: u64) -> Arc<Track> {
    Track::new(
        "video",
        TrackConfig {
            queue_frames: queue,
            group_cache_frames: 64,
            max_group_lag: lag,
            ..TrackConfig::default()
        },
        Arc::new(RelayStats::default()),
    )
}

fn frame(n: u64) -> FrameIn {
    FrameIn {
        data: Bytes::from(n.to_le_bytes().to_vec()),
        payload_offset: 0,
        timestamp_us: n,
        duration_us: 33_333,
        received_at: Instant::now(),
    }
}

/// Pushes `groups` groups of `len` frames; timestamps count up from `start`.
fn publish(track: &Arc<Track>, groups: usize, len: usize, start: u64) -> u64 {
    let mut n = start;
    for _ in 0..groups {
        let mut g = track.begin_group();
        for _ in 0..len {
            g.push(frame(n));
            n += 1;
        }
    }
    n
}

fn drain(sub: &mut Subscription) -> Vec<(u64, u32)> {
    std::iter::from_fn(|| sub.try_next().map(|f| (f.group, f.index))).collect()
}

/// Each group seen starts at its keyframe and has no holes; groups only move forward.
fn assert_whole_groups(seen: &[(u64, u32)]) {
    let mut last: Option<(u64, u32)> = None;
    for &(g, i) in seen {
        match last {
            Some((lg, li)) if lg == g => assert_eq!(i, li + 1, "hole in group {g}: {seen:?}"),
            Some((lg, _)) => {
                assert!(g > lg, "group went back: {seen:?}");
                assert_eq!(i, 0, "group {g} starts without its keyframe: {seen:?}");
            }
            None => assert_eq!(i, 0, "first frame is not a keyframe: {seen:?}"),
        }
        last = Some((g, i));
    }
}

#[test]
fn subscriber_receives_every_frame_in_order_starting_at_a_keyframe() {
    let t = track(64, 1);
    let mut sub = t.subscribe();
    let mut seen = Vec::new();
    for g in 0..3 {
        publish(&t, 1, 5, g * 5);
        seen.extend(drain(&mut sub));
    }
    assert_eq!(seen.len(), 15);
    assert_whole_groups(&seen);
    assert_eq!(sub.stats().dropped(), 0);
}

#[test]
fn late_joiner_starts_from_the_cached_keyframe_without_waiting() {
    let t = track(64, 1);
    let mut g = t.begin_group();
    for n in 0..4 {
        g.push(frame(n));
    }
    let mut sub = t.subscribe();
    // The cached group is there before the publisher sends anything else.
    let first = sub.try_next().expect("cached keyframe at once");
    assert!(first.is_keyframe());
    assert_eq!(first.timestamp_us, 0);
    g.push(frame(4));
    let rest = drain(&mut sub);
    assert_eq!(rest, vec![(1, 1), (1, 2), (1, 3), (1, 4)]);
}

#[test]
fn frame_pushed_while_joining_is_not_delivered_twice() {
    let t = track(64, 1);
    let mut g = t.begin_group();
    g.push(frame(0));
    let mut sub = t.subscribe();
    // Simulates the race: the queue gets a copy of a frame the prefill also holds.
    sub.slot.queue.force_push(sub.prefill[0].clone());
    g.push(frame(1));
    assert_eq!(drain(&mut sub), vec![(1, 0), (1, 1)]);
}

#[test]
fn joiner_without_a_cached_group_waits_for_the_next_keyframe() {
    let t = Track::new(
        "video",
        TrackConfig {
            queue_frames: 64,
            group_cache_frames: 2,
            max_group_lag: 1,
            ..TrackConfig::default()
        },
        Arc::new(RelayStats::default()),
    );
    let mut g = t.begin_group();
    for n in 0..3 {
        g.push(frame(n));
    }
    // The group outgrew its cache: nothing to start from.
    let mut sub = t.subscribe();
    g.push(frame(3));
    assert!(sub.try_next().is_none());
    publish(&t, 1, 2, 10);
    assert_eq!(drain(&mut sub), vec![(2, 0), (2, 1)]);
    // The rest of the uncached group is of no use without its keyframe: skipped, counted.
    assert_eq!(sub.stats().dropped_skipped, 1);
}

#[test]
fn slow_subscriber_never_holds_back_the_publisher_or_a_fast_one() {
    let t = track(16, 1);
    let mut fast = t.subscribe();
    let mut slow = t.subscribe();
    let mut fast_seen = Vec::new();
    let mut g = t.begin_group();
    for n in 0..40u64 {
        if n.is_multiple_of(10) && n > 0 {
            g = t.begin_group();
        }
        let out = g.push(frame(n));
        assert!(matches!(out, PushOutcome::Forwarded { subscribers: 2, .. }));
        fast_seen.extend(drain(&mut fast));
    }
    assert_eq!(fast_seen.len(), 40);
    assert_eq!(fast.stats().dropped(), 0);

    // The slow one read nothing: its queue kept the newest 16 (the tail of group 3 and all
    // of group 4); the rest were evicted and counted.
    let slow_seen = drain(&mut slow);
    assert_whole_groups(&slow_seen);
    assert_eq!(slow_seen, (0..10).map(|i| (4, i)).collect::<Vec<_>>());
    let stats = slow.stats();
    assert_eq!(stats.dropped_queue_full, 24);
    assert_eq!(
        stats.dropped_skipped, 6,
        "the tail of group 3 is useless without its start"
    );
    assert_eq!(stats.delivered + stats.dropped(), 40, "{stats:?}");

    // It keeps up from there on.
    publish(&t, 2, 5, 100);
    let later = drain(&mut slow);
    assert_eq!(later.len(), 10);
    assert_whole_groups(&later);
    assert_eq!(later[0], (5, 0));
    assert_eq!(t.relay.dropped_queue_full.load(Ordering::Relaxed), 24);
}

#[test]
fn a_subscriber_too_far_behind_skips_to_the_newest_group() {
    let t = track(512, 1);
    let mut sub = t.subscribe();
    publish(&t, 5, 4, 0);
    let seen = drain(&mut sub);
    // Groups 1..=3 are more than one behind the newest (5): skipped whole.
    assert_eq!(
        seen,
        vec![
            (4, 0),
            (4, 1),
            (4, 2),
            (4, 3),
            (5, 0),
            (5, 1),
            (5, 2),
            (5, 3)
        ]
    );
    let stats = sub.stats();
    assert_eq!(stats.dropped_skipped, 12);
    assert_eq!(stats.groups_skipped, 3);
}

#[test]
fn giving_up_a_group_mid_way_reports_it_as_abandoned() {
    let t = track(512, 1);
    let mut sub = t.subscribe();
    let mut g1 = t.begin_group();
    g1.push(frame(0));
    assert_eq!(sub.try_next().map(|f| f.group), Some(1));
    g1.push(frame(1));
    publish(&t, 2, 2, 10);
    let seen = drain(&mut sub);
    assert_eq!(seen, vec![(2, 0), (2, 1), (3, 0), (3, 1)]);
    assert_eq!(sub.take_abandoned(), Some(1));
    assert_eq!(sub.take_abandoned(), None);
}

#[test]
fn frames_of_an_older_group_are_stale_once_a_newer_one_began() {
    let t = track(64, 1);
    let mut sub = t.subscribe();
    let mut old = t.begin_group();
    old.push(frame(0));
    let mut new = t.begin_group();
    assert_eq!(old.push(frame(1)), PushOutcome::Stale);
    new.push(frame(2));
    assert_eq!(drain(&mut sub), vec![(1, 0), (2, 0)]);
    assert_eq!(t.relay.frames_stale_in.load(Ordering::Relaxed), 1);
}

#[test]
fn all_subscribers_share_one_allocation_per_frame() {
    let t = track(64, 1);
    let mut a = t.subscribe();
    let mut b = t.subscribe();
    publish(&t, 1, 1, 0);
    let fa = a.try_next().unwrap();
    let fb = b.try_next().unwrap();
    assert_eq!(fa.data.as_ptr(), fb.data.as_ptr());
}

#[test]
fn dropping_a_subscription_removes_it_and_close_ends_the_rest() {
    let t = track(64, 1);
    let a = t.subscribe();
    let mut b = t.subscribe();
    assert_eq!(t.subscriber_count(), 2);
    drop(a);
    assert_eq!(t.subscriber_count(), 1);
    publish(&t, 1, 2, 0);
    t.close();
    let waker = Waker::from(Arc::new(Counter::default()));
    let mut cx = Context::from_waker(&waker);
    assert!(matches!(b.poll_next(&mut cx), Poll::Ready(Some(_))));
    assert!(matches!(b.poll_next(&mut cx), Poll::Ready(Some(_))));
    assert!(matches!(b.poll_next(&mut cx), Poll::Ready(None)));
}

#[derive(Default)]
struct Counter(std::sync::atomic::AtomicUsize);

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn a_waiting_subscriber_is_woken_by_the_next_frame_and_by_falling_behind() {
    let t = track(64, 1);
    let mut sub = t.subscribe();
    let counter = Arc::new(Counter::default());
    let waker = Waker::from(Arc::clone(&counter));
    let mut cx = Context::from_waker(&waker);
    assert!(sub.poll_next(&mut cx).is_pending());
    publish(&t, 1, 1, 0);
    assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    assert!(matches!(sub.poll_next(&mut cx), Poll::Ready(Some(_))));

    assert!(sub.poll_behind(&mut cx).is_pending());
    publish(&t, 1, 1, 10);
    assert!(
        sub.poll_behind(&mut cx).is_pending(),
        "one group ahead is within the lag"
    );
    publish(&t, 1, 1, 20);
    assert!(sub.poll_behind(&mut cx).is_ready());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Frame,
        Group,
        Drain(usize, usize),
        Subscribe,
        Unsubscribe(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => Just(Op::Frame),
            2 => Just(Op::Group),
            4 => (0..4usize, 0..20usize).prop_map(|(s, n)| Op::Drain(s, n)),
            1 => Just(Op::Subscribe),
            1 => (0..4usize).prop_map(Op::Unsubscribe),
        ]
    }

    proptest! {
        /// Whatever the interleaving of publishing, joining, leaving and reading, every
        /// subscriber sees whole groups in order, starting at a keyframe; queues stay within
        /// their bound; and a subscriber is only charged drops for frames it did not get.
        #[test]
        fn subscribers_only_ever_see_whole_groups_in_order(
            ops in proptest::collection::vec(op(), 1..300),
            queue in 1usize..16,
            lag in 0u64..3,
        ) {
            let t = track(queue, lag);
            let mut g = t.begin_group();
            let mut subs: Vec<(Subscription, Vec<(u64, u32)>)> = Vec::new();
            let mut n = 0;
            for op in ops {
                match op {
                    Op::Frame => { g.push(frame(n)); n += 1; }
                    Op::Group => g = t.begin_group(),
                    Op::Subscribe => subs.push((t.subscribe(), Vec::new())),
                    Op::Unsubscribe(i) => if i < subs.len() { subs.remove(i); },
                    Op::Drain(i, k) => if let Some((s, seen)) = subs.get_mut(i) {
                        for _ in 0..k {
                            match s.try_next() { Some(f) => seen.push((f.group, f.index)), None => break }
                        }
                    },
                }
                for (s, _) in &subs {
                    prop_assert!(s.slot.queue.len() <= queue);
                }
            }
            prop_assert_eq!(t.subscriber_count(), subs.len());
            for (mut s, mut seen) in subs {
                seen.extend(drain(&mut s));
                assert_whole_groups(&seen);
                let st = s.stats();
                prop_assert_eq!(st.delivered as usize, seen.len());
            }
        }
    }
}

#[test]
fn subscribing_to_a_closed_track_ends_at_once() {
    let t = track(8, 1);
    t.close();
    let mut sub = t.subscribe();
    let waker = Waker::from(Arc::new(Counter::default()));
    let mut cx = Context::from_waker(&waker);
    assert!(matches!(sub.poll_next(&mut cx), Poll::Ready(None)));
}

#[test]
fn the_join_cache_is_bounded_in_bytes_and_cleared_when_the_publisher_leaves() {
    let t = Track::new(
        "video",
        TrackConfig {
            group_cache_bytes: 20,
            ..TrackConfig::default()
        },
        Arc::new(RelayStats::default()),
    );
    let mut g = t.begin_group();
    g.push(frame(0)); // 8 bytes
    g.push(frame(1)); // 16
    assert_eq!(drain(&mut t.subscribe()), vec![(1, 0), (1, 1)]);
    g.push(frame(2)); // 24: past the bound
    assert!(
        drain(&mut t.subscribe()).is_empty(),
        "an overflowed cache is no start"
    );

    let mut g = t.begin_group();
    g.push(frame(3));
    t.clear_cache();
    assert!(
        drain(&mut t.subscribe()).is_empty(),
        "no stale pictures after the publisher left"
    );
}

#[test]
fn groups_pushed_whole_from_many_threads_reach_a_never_skipping_reader_whole() {
    let t = track(1 << 16, u64::MAX);
    let mut sub = t.subscribe_with(1 << 16, u64::MAX);
    std::thread::scope(|s| {
        for w in 0..4u64 {
            let t = &t;
            s.spawn(move || {
                for g in 0..50u64 {
                    let start = (w * 1000 + g) * 100;
                    t.push_group((0..20).map(|i| frame(start + i)));
                }
            });
        }
    });
    let seen = drain(&mut sub);
    // Every group of every writer, each whole: none overtaken and skipped.
    assert_eq!(seen.len(), 4 * 50 * 20);
    assert_whole_groups(&seen);
}
