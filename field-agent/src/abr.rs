//! Adaptive bitrate: the encoder's target follows what the path to the hub carries.
//!
//! Sans-IO: once a second the uplink hands [`RateController::tick`] the QUIC path's figures
//! (smoothed and minimum RTT, packets sent and lost, congestion events since the last
//! tick) and gets the bitrate the encoder should aim at. The rule is additive increase,
//! multiplicative decrease, on two signs of a full path: a queue building up (RTT well
//! above the path's base RTT), or heavy loss. Some loss is what a radio link does whatever
//! the rate: between `hold_loss` and `loss` the target holds. It never goes above the cap
//! (the configured bitrate, or the hub's QUALITY directive) nor below the floor.
//!
//! Below the floor the picture gives way instead: a path still full at the floor for a few
//! ticks steps the picture down ([`PICTURE_STEPS`]: smaller, then fewer frames), and the
//! floor with it (a quarter of the pixels needs about a quarter of the bits, half the
//! frames about half). A path calm for a while with the target well above the bigger
//! picture's floor steps it back up. A new size is a keyframe and, at the hub, a new
//! recording, so steps are slow to come and slower to go. Size goes first, to half the
//! height: a face or a number plate needs lines more than motion; then the frame rate.

use std::time::Duration;

/// The path's figures over the last tick.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PathSample {
    pub rtt: Duration,
    pub min_rtt: Duration,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
    /// Backfill was on its way: the path carried more than the encoder's output, so a
    /// queue may be of the uplink's own making whatever the target.
    pub backfilling: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateConfig {
    /// kbit/s
    pub floor: u32,
    /// Added per calm tick, as a share of the cap.
    pub step: f64,
    /// Kept per congested tick.
    pub backoff: f64,
    /// Loss above this share of the tick's packets is congestion.
    pub loss: f64,
    /// Loss above this share holds the target where it is.
    pub hold_loss: f64,
    /// RTT above the minimum by more than this is a queue.
    pub queue: Duration,
}

impl Default for RateConfig {
    fn default() -> Self {
        Self {
            floor: 150,
            step: 0.05,
            backoff: 0.8,
            loss: 0.10,
            hold_loss: 0.02,
            queue: Duration::from_millis(80),
        }
    }
}

/// What the encoder makes of the captured picture below the bitrate floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Picture {
    /// Share of the configured height, in %.
    pub height: u32,
    /// One captured frame in this many is encoded.
    pub frames_1_in: u32,
}

impl Picture {
    pub const FULL: Picture = Picture::new(100, 1);

    const fn new(height: u32, frames_1_in: u32) -> Self {
        Self {
            height,
            frames_1_in,
        }
    }

    /// Its share of the full picture's bits.
    fn share(self) -> f64 {
        let h = f64::from(self.height) / 100.0;
        h * h / f64::from(self.frames_1_in)
    }
}

impl std::fmt::Display for Picture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} % of its height, 1 frame in {}",
            self.height, self.frames_1_in
        )
    }
}

/// The picture's steps below the bitrate floor. The first is the picture as configured.
pub const PICTURE_STEPS: [Picture; 6] = [
    Picture::FULL,
    Picture::new(75, 1),
    Picture::new(50, 1),
    Picture::new(50, 2),
    Picture::new(33, 2),
    Picture::new(33, 3),
];
/// Ticks full at a step's floor before the picture steps down.
const STARVED_TICKS: u32 = 3;
/// Calm ticks, with the target at twice the bigger picture's floor, before it steps up.
const CALM_TICKS: u32 = 10;
/// Ticks of RTT sitting flat above the base, without loss or backfill, before it is the
/// new base.
const REBASE_TICKS: usize = 4;

#[derive(Debug)]
pub struct RateController {
    config: RateConfig,
    cap: u32,
    target: f64,
    /// Index into [`PICTURE_STEPS`].
    step: usize,
    starved: u32,
    calm: u32,
    /// The path's RTT without a queue (see [`RateController::rebase`]).
    base: Option<Duration>,
    /// RTTs of the last ticks that read as a queue without loss, newest last.
    queued: [Duration; REBASE_TICKS],
    queued_ticks: usize,
}

impl RateController {
    /// Starts at the cap: a good path carries it from the first second.
    pub fn new(config: RateConfig, cap: u32) -> Self {
        let cap = cap.max(config.floor);
        Self {
            config,
            cap,
            target: f64::from(cap),
            step: 0,
            starved: 0,
            calm: 0,
            base: None,
            queued: [Duration::ZERO; REBASE_TICKS],
            queued_ticks: 0,
        }
    }

    pub fn target(&self) -> u32 {
        self.target.round() as u32
    }

    /// The picture the encoder should make.
    pub fn picture(&self) -> Picture {
        PICTURE_STEPS[self.step]
    }

    /// The bitrate floor of a picture step: the configured floor scaled by its pixels and
    /// frames.
    fn floor_at(&self, step: usize) -> f64 {
        f64::from(self.config.floor) * PICTURE_STEPS[step].share()
    }

    pub fn cap(&self) -> u32 {
        self.cap
    }

    /// A new cap (a QUALITY directive): the target never exceeds it.
    pub fn set_cap(&mut self, cap: u32) {
        self.cap = cap.max(self.config.floor);
        self.target = self.target.min(f64::from(self.cap));
    }

    fn loss(s: &PathSample) -> f64 {
        s.lost_packets as f64 / s.sent_packets.max(1) as f64
    }

    fn is_queued(&self, s: &PathSample) -> bool {
        let base = self.base.unwrap_or(s.min_rtt);
        !base.is_zero() && s.rtt > base + self.config.queue
    }

    /// Whether the last sample showed a full path.
    pub fn congested(&self, s: &PathSample) -> bool {
        self.is_queued(s) || Self::loss(s) > self.config.loss
    }

    /// Keeps the base RTT: the lowest seen, unless the RTT has sat above it, flat,
    /// without loss and without backfill, for a few ticks while the target backed off.
    /// A queue would have drained (or overflowed, with loss) when the rate fell; an RTT
    /// that holds still is the path's own: a new route, a migration to another network, a
    /// long-haul link that came up after the handshake. Without this the controller would read the
    /// longer path as a standing queue and starve the picture for good.
    fn rebase(&mut self, s: &PathSample) {
        let lowest = match self.base {
            Some(b) => b.min(s.rtt),
            None if !s.min_rtt.is_zero() => s.min_rtt.min(s.rtt),
            None => s.rtt,
        };
        self.base = Some(lowest);
        if !self.is_queued(s) || Self::loss(s) > self.config.hold_loss || s.backfilling {
            self.queued_ticks = 0;
            return;
        }
        self.queued.rotate_left(1);
        self.queued[REBASE_TICKS - 1] = s.rtt;
        self.queued_ticks += 1;
        if self.queued_ticks >= REBASE_TICKS {
            let (lo, hi) = self
                .queued
                .iter()
                .fold((Duration::MAX, Duration::ZERO), |(lo, hi), r| {
                    (lo.min(*r), hi.max(*r))
                });
            if hi - lo <= self.config.queue / 2 {
                self.base = Some(lo);
                self.queued_ticks = 0;
            }
        }
    }

    /// One tick: the new target, kbit/s (see [`RateController::picture`] for the
    /// picture).
    pub fn tick(&mut self, s: &PathSample) -> u32 {
        self.rebase(s);
        let cap = f64::from(self.cap);
        let floor = self.floor_at(self.step);
        if self.congested(s) {
            self.calm = 0;
            let at_floor = self.target <= floor;
            self.target = (self.target * self.config.backoff).max(floor);
            if at_floor {
                self.starved += 1;
                if self.starved >= STARVED_TICKS && self.step + 1 < PICTURE_STEPS.len() {
                    self.step += 1;
                    self.starved = 0;
                }
            }
        } else if Self::loss(s) > self.config.hold_loss {
            self.starved = 0;
            self.calm = 0;
        } else {
            self.starved = 0;
            self.target = (self.target + cap * self.config.step).min(cap);
            if self.step > 0 && self.target >= 2.0 * self.floor_at(self.step - 1) {
                self.calm += 1;
                if self.calm >= CALM_TICKS {
                    self.step -= 1;
                    self.calm = 0;
                }
            } else {
                self.calm = 0;
            }
        }
        self.target()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calm() -> PathSample {
        PathSample {
            rtt: Duration::from_millis(20),
            min_rtt: Duration::from_millis(20),
            sent_packets: 200,
            lost_packets: 0,
            congestion_events: 0,
            backfilling: false,
        }
    }

    fn full() -> PathSample {
        PathSample {
            rtt: Duration::from_millis(300),
            min_rtt: Duration::from_millis(20),
            sent_packets: 200,
            lost_packets: 20,
            congestion_events: 3,
            backfilling: false,
        }
    }

    #[test]
    fn a_full_path_brings_the_target_under_it_and_a_calm_one_back_up() {
        let mut c = RateController::new(RateConfig::default(), 2000);
        assert_eq!(c.tick(&calm()), 2000);
        // A path of 1 Mbit/s: full until the target is below it, within a few ticks.
        let mut ticks = 0;
        while c.target() > 900 {
            c.tick(&full());
            ticks += 1;
        }
        assert!(ticks <= 5, "{ticks}");
        // Calm again: back to the cap, a step a tick.
        let mut ticks = 0;
        while c.target() < 2000 {
            c.tick(&calm());
            ticks += 1;
        }
        assert!(ticks <= 20, "{ticks}");
    }

    #[test]
    fn the_target_stays_between_floor_and_cap() {
        let mut c = RateController::new(RateConfig::default(), 1000);
        for _ in 0..100 {
            c.tick(&full());
        }
        // The smallest picture's floor: a ninth of the pixels, a third of the frames.
        assert_eq!(c.target(), 5);
        c.set_cap(400);
        for _ in 0..100 {
            c.tick(&calm());
        }
        assert_eq!(c.target(), 400);
        c.set_cap(50);
        assert_eq!(c.target(), 150);
    }

    #[test]
    fn a_path_too_narrow_for_the_floor_shrinks_the_picture_and_a_wide_one_restores_it() {
        let mut c = RateController::new(RateConfig::default(), 1000);
        let mut pictures = vec![c.picture()];
        for _ in 0..60 {
            c.tick(&full());
            if pictures.last() != Some(&c.picture()) {
                pictures.push(c.picture());
            }
        }
        // Down every step, one at a time, to the smallest and its floor (150 kbit/s at a
        // ninth of the pixels and a third of the frames).
        assert_eq!(pictures, PICTURE_STEPS.to_vec());
        assert_eq!(c.target(), 5);
        // A path that is only briefly calm does not step up (each step is a keyframe and a
        // new recording).
        for _ in 0..3 {
            c.tick(&calm());
        }
        c.tick(&full());
        assert_eq!(c.picture(), Picture::new(33, 3));
        // A path calm for long climbs back, step by step, to the full picture and the cap.
        let mut ticks = 0;
        while c.picture() != Picture::FULL || c.target() < 1000 {
            c.tick(&calm());
            ticks += 1;
            assert!(ticks < 100, "stuck at {:?} {}", c.picture(), c.target());
        }
    }

    #[test]
    fn a_path_at_the_floor_but_not_below_keeps_the_picture() {
        let mut c = RateController::new(RateConfig::default(), 1000);
        // Full until the floor, then calm/full in turn: the target hovers over the floor.
        for i in 0..60 {
            if c.target() > 200 || i % 2 == 0 {
                c.tick(&full());
            } else {
                c.tick(&calm());
            }
        }
        assert_eq!(c.picture(), Picture::FULL);
    }

    #[test]
    fn a_longer_path_is_the_new_base_but_a_growing_queue_is_not() {
        let mut c = RateController::new(RateConfig::default(), 1000);
        c.tick(&calm());
        // The unit moves to a path of 180 ms (was 20) that loses nothing: a few ticks read
        // it as a queue, then it is the base and the target climbs back to the cap.
        let longer = PathSample {
            rtt: Duration::from_millis(180),
            ..calm()
        };
        let mut lowest = u32::MAX;
        for _ in 0..40 {
            lowest = lowest.min(c.tick(&longer));
        }
        assert!(lowest < 1000, "{lowest}");
        assert_eq!(c.target(), 1000);
        assert_eq!(c.picture(), Picture::FULL);
        // A queue that grows as the rate falls (a path narrower than the floor, no loss
        // yet) is never taken for the base.
        let mut c = RateController::new(RateConfig::default(), 1000);
        c.tick(&calm());
        for i in 0..60u64 {
            c.tick(&PathSample {
                rtt: Duration::from_millis(120 + 40 * i),
                ..calm()
            });
        }
        assert_ne!(c.picture(), Picture::FULL);
        // Nor is a flat one while backfill fills the path: the backlog keeps the queue
        // standing however low the target goes.
        let mut c = RateController::new(RateConfig::default(), 1000);
        c.tick(&calm());
        for _ in 0..60 {
            c.tick(&PathSample {
                rtt: Duration::from_millis(300),
                backfilling: true,
                ..calm()
            });
        }
        assert_ne!(c.picture(), Picture::FULL);
    }

    #[test]
    fn radio_loss_and_jitter_are_not_congestion() {
        let c = RateController::new(RateConfig::default(), 1000);
        let mut s = calm();
        s.lost_packets = 10; // 5 %: a lossy radio link, whatever the rate
        s.rtt = Duration::from_millis(60);
        s.congestion_events = 3;
        assert!(!c.congested(&s));
        // It holds rather than climbs on such a link.
        let mut low = RateController::new(RateConfig::default(), 1000);
        low.tick(&full());
        let held = low.target();
        assert_eq!(low.tick(&s), held);
    }
}
