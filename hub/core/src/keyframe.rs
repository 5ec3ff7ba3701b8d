//! Coalescing of keyframe requests. Every viewer that joins late or loses packets may ask for
//! a keyframe; the device should get one request per interval, not one per viewer.

use std::time::{Duration, Instant};

/// What to do with a keyframe request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyframeDecision {
    SendNow,
    /// Folded into a request already due; `due` is set the first time, when the caller should
    /// arrange to call [`KeyframeCoalescer::handle_timeout`] then.
    Deferred {
        due: Option<Instant>,
    },
}

#[derive(Debug, Clone)]
pub struct KeyframeCoalescer {
    min_interval: Duration,
    last_sent: Option<Instant>,
    pending: bool,
}

impl KeyframeCoalescer {
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval,
            last_sent: None,
            pending: false,
        }
    }

    /// A receiver asked for a keyframe: send one upstream now, or remember it for when the
    /// interval has passed.
    pub fn request(&mut self, now: Instant) -> KeyframeDecision {
        match self.last_sent {
            Some(t) if now.saturating_duration_since(t) < self.min_interval => {
                let first = !self.pending;
                self.pending = true;
                KeyframeDecision::Deferred {
                    due: first.then(|| t + self.min_interval),
                }
            }
            _ => {
                self.last_sent = Some(now);
                self.pending = false;
                KeyframeDecision::SendNow
            }
        }
    }

    /// A keyframe arrived from upstream: whatever was pending is answered.
    pub fn on_keyframe(&mut self) {
        self.pending = false;
    }

    /// When the deferred request falls due, if one is pending.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.pending, self.last_sent) {
            (true, Some(t)) => Some(t + self.min_interval),
            _ => None,
        }
    }

    /// Call at [`KeyframeCoalescer::poll_timeout`]: true when the deferred request goes now.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        match self.poll_timeout() {
            Some(due) if now >= due => {
                self.pending = false;
                self.last_sent = Some(now);
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn many_requests_within_an_interval_become_one_then_one_deferred() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut k = KeyframeCoalescer::new(ms(500));
        assert_eq!(k.request(t0), KeyframeDecision::SendNow);
        assert_eq!(
            k.request(t0 + ms(10)),
            KeyframeDecision::Deferred {
                due: Some(t0 + ms(500))
            }
        );
        assert_eq!(
            k.request(t0 + ms(20)),
            KeyframeDecision::Deferred { due: None }
        );
        assert_eq!(k.poll_timeout(), Some(t0 + ms(500)));
        assert!(!k.handle_timeout(t0 + ms(499)));
        assert!(k.handle_timeout(t0 + ms(500)));
        assert_eq!(k.poll_timeout(), None);
        assert!(!k.handle_timeout(t0 + ms(2000)));
    }

    #[test]
    fn a_keyframe_arriving_answers_the_pending_request() {
        let t0 = Instant::now();
        let mut k = KeyframeCoalescer::new(Duration::from_millis(500));
        assert_eq!(k.request(t0), KeyframeDecision::SendNow);
        assert!(matches!(
            k.request(t0 + Duration::from_millis(100)),
            KeyframeDecision::Deferred { .. }
        ));
        k.on_keyframe();
        assert_eq!(k.poll_timeout(), None);
        assert!(!k.handle_timeout(t0 + Duration::from_millis(600)));
        assert_eq!(
            k.request(t0 + Duration::from_millis(600)),
            KeyframeDecision::SendNow
        );
    }
}
