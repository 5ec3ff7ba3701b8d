//! The Tianwang field agent: the device side. GStreamer captures and encodes into local
//! relay-core tracks; the QUIC uplink streams them to the unit's hub and reconnects when the
//! link drops; `simulate` runs many virtual units from one pre-encoded clip.

pub mod broadcast;
pub mod capture;
pub mod route;
pub mod simulate;
pub mod uplink;

/// Wall clock, microseconds since the Unix epoch: the capture timestamps' clock.
pub fn unix_now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
