//! The Tianwang field agent: the device side. GStreamer captures and encodes into local
//! relay-core tracks; the QUIC uplink streams them to the unit's hub and reconnects when the
//! link drops; `simulate` runs many virtual units from one pre-encoded clip. Directives from
//! the command centre are executed exactly once (`directives`); what the command centre says
//! to the officer is played and kept (`talkback`).

pub mod abr;
pub mod broadcast;
pub mod capture;
pub mod clock;
pub mod directives;
pub mod position;
pub mod route;
pub mod seen;
pub mod simulate;
pub mod snapshot;
pub mod spool;
pub mod talkback;
pub mod uplink;

/// Wall clock, microseconds since the Unix epoch: the capture timestamps' clock (read
/// through [`clock::CaptureClock`] for frames).
pub fn unix_now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A name from the network or the command line made safe as one file name: letters and
/// digits (any script: hub ids carry court names), `-`, `_` and inner dots stay, every
/// other byte becomes `%XX` (so distinct names stay distinct and none can climb out of its
/// directory).
pub fn file_name_for(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, c) in name.chars().enumerate() {
        if c.is_alphanumeric() || c == '-' || c == '_' || (c == '.' && i > 0) {
            out.push(c);
        } else {
            let mut utf8 = [0; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    if out.is_empty() {
        // No name maps to a bare `%`: every `%` in a name is escaped.
        out.push('%');
    }
    out
}
