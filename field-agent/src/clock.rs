//! Capture times. A frame's capture time is the wall clock (the evidence's timeline, shared
//! with the hub and the courts), but read per frame it jumps wherever the wall clock is
//! stepped (NTP correcting a unit that slept, an officer setting the time), in the middle
//! of a group: the hub would then hold a group whose frames lie an hour apart, which no
//! recording can play and no confirmation covers. So the wall clock is read when a video
//! group begins and carried through the group by the monotonic clock the frames were taken
//! by; a step takes effect at the next keyframe, where the hub can begin a new recording.

use std::sync::Mutex;

/// How far the wall clock may move from the carried one before a keyframe takes it up.
/// The monotonic clock is slewed with the wall clock, so only a step moves them apart;
/// this absorbs the time between reading the two.
const RESYNC_US: i64 = 20_000;

/// The capture clock of one capture (its tracks share it, so audio and video stay on one
/// timeline across a step).
#[derive(Debug, Default)]
pub struct CaptureClock(Mutex<Anchor>);

#[derive(Debug, Default)]
struct Anchor {
    /// Wall minus monotonic time, µs; none before the first frame.
    offset: Option<i64>,
    /// Since when (monotonic µs) the offset holds, and the one before it: audio taken
    /// before the keyframe that moved the anchor may reach its sink after it.
    since: Option<(u64, i64)>,
}

impl CaptureClock {
    /// The capture time (wall µs) of a frame taken at monotonic time `taken_us`, given the
    /// wall and monotonic clocks read together now. A video keyframe (`resync`) takes up a
    /// step of the wall clock; other frames follow the anchor of their group.
    pub fn stamp(&self, taken_us: u64, wall_now_us: u64, mono_now_us: u64, resync: bool) -> u64 {
        let now = wall_now_us as i64 - mono_now_us as i64;
        let mut anchor = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let offset = match anchor.offset {
            None => {
                anchor.offset = Some(now);
                now
            }
            Some(o) if resync && (now - o).abs() > RESYNC_US => {
                anchor.offset = Some(now);
                anchor.since = Some((taken_us, o));
                now
            }
            Some(o) => match anchor.since {
                Some((since, before)) if taken_us < since => before,
                _ => o,
            },
        };
        (taken_us as i64).saturating_add(offset).max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000_000;
    const WALL: u64 = 1_800_000_000_000_000;

    #[test]
    fn a_step_waits_for_the_next_keyframe() {
        let clock = CaptureClock::default();
        // Frames every 33 ms; the wall clock steps back an hour after the fourth.
        let mut stamps = Vec::new();
        for i in 0..8u64 {
            let mono = 1_000_000 + i * 33_000;
            let wall = if i < 4 {
                WALL + mono
            } else {
                WALL - HOUR + mono
            };
            stamps.push(clock.stamp(mono, wall, mono, i == 0 || i == 6));
        }
        // The group begun at frame 0 runs on unbroken; the keyframe at 6 takes the step.
        for (i, s) in stamps.iter().enumerate().take(6) {
            assert_eq!(*s, WALL + 1_000_000 + i as u64 * 33_000);
        }
        assert_eq!(stamps[6], WALL - HOUR + 1_000_000 + 6 * 33_000);
        assert_eq!(stamps[7], stamps[6] + 33_000);
    }

    #[test]
    fn audio_taken_before_the_keyframe_keeps_the_old_anchor() {
        let clock = CaptureClock::default();
        assert_eq!(clock.stamp(0, WALL, 0, true), WALL);
        // The wall clock stepped forward an hour; the keyframe at 2 s takes it up.
        let wall = |mono: u64| WALL + HOUR + mono;
        assert_eq!(
            clock.stamp(2_000_000, wall(2_010_000), 2_010_000, true),
            wall(2_000_000)
        );
        // An audio packet taken at 1.99 s, reaching its sink after, is on the old timeline.
        assert_eq!(
            clock.stamp(1_990_000, wall(2_020_000), 2_020_000, false),
            WALL + 1_990_000
        );
        assert_eq!(
            clock.stamp(2_005_000, wall(2_020_000), 2_020_000, false),
            wall(2_005_000)
        );
    }

    #[test]
    fn small_differences_are_not_steps() {
        let clock = CaptureClock::default();
        assert_eq!(clock.stamp(0, WALL, 0, true), WALL);
        // Reading the two clocks 5 ms apart at the next keyframe moves nothing.
        assert_eq!(
            clock.stamp(4_000_000, WALL + 4_005_000, 4_000_000, true),
            WALL + 4_000_000
        );
    }
}
