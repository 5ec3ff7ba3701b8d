//! RTP packets back in sequence order, sans-IO, for a WebRTC publisher's media: on a phone's
//! link packets arrive late, twice, out of order, and retransmitted (after a NACK) well
//! after their neighbours. In-order packets pass at once — no added delay while nothing is
//! missing — and a hole is waited for up to `max_wait` (long enough for a retransmission),
//! then declared lost so the caller can drop what depended on it.
//!
//! webrtc-rs's `SampleBuilder` does this and more, but holds each frame until a packet of
//! the next one arrives (a frame of delay on every frame) and allocates 64 Ki slots.

use std::time::{Duration, Instant};

/// What comes out, in sequence order.
#[derive(Debug, PartialEq, Eq)]
pub enum Released<T> {
    Packet(T),
    /// This many packets never came (or came too late) before the next one released.
    Lost(u16),
}

pub struct Reorder<T> {
    slots: Vec<Option<(u16, T)>>,
    /// The next sequence number to release; None before the first packet.
    next: Option<u16>,
    held: usize,
    /// When the oldest packet now held (waiting behind a hole) arrived.
    waiting_since: Option<Instant>,
    max_wait: Duration,
    /// Packets that came after their place was released or declared lost, and duplicates.
    pub late: u64,
}

impl<T> Reorder<T> {
    /// `capacity` packets can wait behind a hole (a power of two is not needed).
    pub fn new(capacity: usize, max_wait: Duration) -> Self {
        Self {
            slots: (0..capacity.max(2)).map(|_| None).collect(),
            next: None,
            held: 0,
            waiting_since: None,
            max_wait,
            late: 0,
        }
    }

    fn slot(&self, seq: u16) -> usize {
        usize::from(seq) % self.slots.len()
    }

    /// One packet in; whatever can be released now goes to `out`, in order.
    pub fn push(&mut self, seq: u16, packet: T, now: Instant, out: &mut impl FnMut(Released<T>)) {
        let next = *self.next.get_or_insert(seq);
        let ahead = seq.wrapping_sub(next);
        if ahead >= 0x8000 {
            // Behind what was already released: a duplicate or too late.
            self.late += 1;
            return;
        }
        if usize::from(ahead) >= self.slots.len() {
            // Too far ahead to hold: everything up to it is given up on.
            self.skip_to(seq.wrapping_sub(self.slots.len() as u16 - 1), out);
        }
        let i = self.slot(seq);
        if self.slots[i].as_ref().is_some_and(|(s, _)| *s == seq) {
            self.late += 1;
            return;
        }
        self.slots[i] = Some((seq, packet));
        self.held += 1;
        self.release(out);
        if self.held > 0 && self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
        self.poll(now, out);
    }

    /// Gives up on a hole waited for longer than `max_wait`.
    pub fn poll(&mut self, now: Instant, out: &mut impl FnMut(Released<T>)) {
        while self.held > 0
            && self
                .waiting_since
                .is_some_and(|t| now.duration_since(t) >= self.max_wait)
        {
            let Some(next) = self.next else { return };
            // The first packet held after the hole.
            let first = (0..self.slots.len() as u16)
                .map(|d| next.wrapping_add(d))
                .find(|s| {
                    self.slots[self.slot(*s)]
                        .as_ref()
                        .is_some_and(|(x, _)| x == s)
                });
            let Some(first) = first else { return };
            self.skip_to(first, out);
            self.waiting_since = (self.held > 0).then_some(now);
        }
    }

    /// When `poll` must next be called if nothing arrives (a hole is being waited for).
    pub fn deadline(&self) -> Option<Instant> {
        self.waiting_since.map(|t| t + self.max_wait)
    }

    /// Declares everything before `seq` lost, releases what follows in order.
    fn skip_to(&mut self, seq: u16, out: &mut impl FnMut(Released<T>)) {
        let Some(mut next) = self.next else { return };
        let mut lost = 0u16;
        while next != seq {
            let i = self.slot(next);
            match self.slots[i].take() {
                Some((s, p)) if s == next => {
                    if lost > 0 {
                        out(Released::Lost(lost));
                        lost = 0;
                    }
                    self.held -= 1;
                    out(Released::Packet(p));
                }
                other => {
                    self.slots[i] = other;
                    lost = lost.saturating_add(1);
                }
            }
            next = next.wrapping_add(1);
        }
        if lost > 0 {
            out(Released::Lost(lost));
        }
        self.next = Some(next);
        self.release(out);
    }

    fn release(&mut self, out: &mut impl FnMut(Released<T>)) {
        let Some(mut next) = self.next else { return };
        loop {
            let i = self.slot(next);
            match self.slots[i].take() {
                Some((s, p)) if s == next => {
                    self.held -= 1;
                    out(Released::Packet(p));
                    next = next.wrapping_add(1);
                }
                other => {
                    self.slots[i] = other;
                    break;
                }
            }
        }
        self.next = Some(next);
        if self.held == 0 {
            self.waiting_since = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(r: &mut Reorder<u16>, seq: u16, now: Instant) -> Vec<Released<u16>> {
        let mut out = Vec::new();
        r.push(seq, seq, now, &mut |x| out.push(x));
        out
    }

    #[test]
    fn in_order_packets_pass_at_once_and_a_hole_waits_for_its_packet() {
        let t = Instant::now();
        let mut r = Reorder::new(64, Duration::from_millis(100));
        assert_eq!(run(&mut r, 65534, t), vec![Released::Packet(65534)]);
        assert_eq!(run(&mut r, 65535, t), vec![Released::Packet(65535)]);
        // 0 is missing: 1 and 2 wait.
        assert_eq!(run(&mut r, 1, t), vec![]);
        assert_eq!(run(&mut r, 2, t), vec![]);
        // The retransmission fills the hole: all three, in order.
        assert_eq!(
            run(&mut r, 0, t + Duration::from_millis(50)),
            vec![
                Released::Packet(0),
                Released::Packet(1),
                Released::Packet(2)
            ]
        );
        // A duplicate is late.
        assert_eq!(run(&mut r, 1, t), vec![]);
        assert_eq!(r.late, 1);
    }

    #[test]
    fn a_hole_not_filled_in_time_is_lost_and_what_follows_released() {
        let t = Instant::now();
        let mut r = Reorder::new(64, Duration::from_millis(100));
        run(&mut r, 10, t);
        assert_eq!(run(&mut r, 13, t), vec![]);
        assert_eq!(r.deadline(), Some(t + Duration::from_millis(100)));
        let mut out = Vec::new();
        r.poll(t + Duration::from_millis(100), &mut |x| out.push(x));
        assert_eq!(out, vec![Released::Lost(2), Released::Packet(13)]);
        // 11 comes now: too late.
        assert_eq!(run(&mut r, 11, t), vec![]);
        assert_eq!(r.late, 1);
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn a_jump_beyond_the_capacity_gives_up_on_the_hole() {
        let t = Instant::now();
        let mut r = Reorder::new(8, Duration::from_secs(10));
        run(&mut r, 0, t);
        run(&mut r, 2, t);
        let out = run(&mut r, 20, t);
        assert_eq!(out.first(), Some(&Released::Lost(1)));
        assert!(out.contains(&Released::Packet(2)));
        assert_eq!(r.deadline().is_some(), r.held > 0);
    }

    proptest! {
        /// Whatever the arrival order (within the window), every packet comes out once, in
        /// order, and none is declared lost while the wait has not run out.
        #[test]
        fn shuffled_within_the_window_comes_out_in_order(
            start in any::<u16>(),
            late in proptest::collection::vec(0u16..8, 200),
        ) {
            // Each packet arrives up to 7 places late (chained swaps would carry one
            // further than the window, which the test does not claim).
            let mut order: Vec<(u16, u16)> = (0..200u16).map(|i| (i + late[usize::from(i)], i)).collect();
            order.sort_unstable();
            let mut seqs: Vec<u16> = order.into_iter().map(|(_, i)| start.wrapping_add(i)).collect();
            let t = Instant::now();
            let mut r = Reorder::new(32, Duration::from_secs(1));
            let mut out = Vec::new();
            // The first packet sets where the sequence starts: begin with the lowest.
            let first = seqs.iter().position(|s| *s == start).unwrap_or(0);
            seqs.swap(0, first);
            for s in seqs {
                r.push(s, s, t, &mut |x| out.push(x));
            }
            let expected: Vec<_> = (0..200u16).map(|i| Released::Packet(start.wrapping_add(i))).collect();
            prop_assert_eq!(out, expected);
        }
    }
}
