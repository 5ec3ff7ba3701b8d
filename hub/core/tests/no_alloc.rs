//! The hot path allocates nothing per frame: pushing a frame to every subscriber and draining
//! it, inside a group, touches no allocator. Counted with a global allocator, not timed.
#![allow(unsafe_code)] // a counting global allocator needs unsafe impl GlobalAlloc
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tianwang_core::frame::FrameIn;
use tianwang_core::{RelayStats, Track, TrackConfig};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Per thread: the test harness's own threads allocate as they please meanwhile.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

// Forwards to System and counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn pushing_and_draining_frames_allocates_nothing() {
    let track = Track::new(
        "video",
        TrackConfig::default(),
        Arc::new(RelayStats::default()),
    );
    let mut fast: Vec<_> = (0..10).map(|_| track.subscribe()).collect();
    // One subscriber never reads: its full queue evicts on every push.
    let _stalled = track.subscribe();
    let payload = Bytes::from(vec![7u8; 1200]);
    let received_at = Instant::now();
    let mut group = track.begin_group();
    let mut push = |n: u64| {
        group.push(FrameIn {
            data: payload.clone(),
            payload_offset: 0,
            timestamp_us: n,
            duration_us: 33_333,
            received_at,
        })
    };
    // Warm up past the stalled queue's bound.
    for n in 0..600 {
        push(n);
        for s in fast.iter_mut() {
            while s.try_next().is_some() {}
        }
    }
    COUNTING.with(|c| c.set(true));
    for n in 600..1000 {
        push(n);
        for s in fast.iter_mut() {
            while s.try_next().is_some() {}
        }
    }
    COUNTING.with(|c| c.set(false));
    assert_eq!(ALLOCATIONS.load(Ordering::SeqCst), 0);
}
