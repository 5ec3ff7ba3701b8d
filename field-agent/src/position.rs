//! Where the unit is, for its telemetry: a simulated route (`route`), an NMEA 0183 stream
//! (a GPS receiver's serial device, or a recorded file replayed an epoch a second), or
//! gpsd (its JSON protocol over TCP). A live source's fix older than `STALE` is no fix: the
//! hub hears that the position is lost rather than an old one.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tianwang_proto::Sensitive;
use tianwang_proto::v1::Position;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::route::Route;

/// A receiver's fix this old is not reported.
pub const STALE: Duration = Duration::from_secs(5);
/// Horizontal error per unit of HDOP (a common receiver's UERE), for NMEA's accuracy.
const METRES_PER_HDOP: f32 = 5.0;
const KNOT_MPS: f32 = 0.514_444;

#[derive(Clone, Copy, PartialEq)]
pub struct LiveFix {
    pub latitude: f64,
    pub longitude: f64,
    pub accuracy_m: f32,
    pub speed_mps: f32,
    pub heading_deg: f32,
}

/// Where the officer is never reaches a log.
impl std::fmt::Debug for LiveFix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveFix")
            .field("latitude", &Sensitive::new(self.latitude))
            .field("longitude", &Sensitive::new(self.longitude))
            .field("accuracy_m", &self.accuracy_m)
            .field("speed_mps", &self.speed_mps)
            .field("heading_deg", &self.heading_deg)
            .finish()
    }
}

impl LiveFix {
    fn plausible(&self) -> bool {
        self.latitude.is_finite()
            && self.longitude.is_finite()
            && self.latitude.abs() <= 90.0
            && self.longitude.abs() <= 180.0
    }
}

/// The newest fix of a live source, shared with the telemetry.
#[derive(Debug, Default)]
pub struct Latest {
    fix: Mutex<Option<(LiveFix, Instant)>>,
    /// A replayed file's last fix stands (the unit stays where the recording ended).
    keep: bool,
}

impl Latest {
    fn set(&self, fix: LiveFix) {
        if fix.plausible()
            && let Ok(mut f) = self.fix.lock()
        {
            *f = Some((fix, Instant::now()));
        }
    }

    pub fn get(&self) -> Option<LiveFix> {
        let f = *self.fix.lock().ok()?;
        f.filter(|(_, at)| self.keep || at.elapsed() < STALE)
            .map(|(fix, _)| fix)
    }
}

#[derive(Clone, Debug)]
pub enum PositionSource {
    Route(Arc<Route>, Instant),
    Live(Arc<Latest>),
}

impl PositionSource {
    pub fn position(&self) -> Option<Position> {
        match self {
            PositionSource::Route(route, since) => {
                let fix = route.fix(since.elapsed());
                Some(Position {
                    latitude: fix.latitude,
                    longitude: fix.longitude,
                    accuracy_m: 5.0,
                    speed_mps: fix.speed_mps as f32,
                    heading_deg: fix.heading_deg as f32,
                })
            }
            PositionSource::Live(latest) => latest.get().map(|f| Position {
                latitude: f.latitude,
                longitude: f.longitude,
                accuracy_m: f.accuracy_m,
                speed_mps: f.speed_mps,
                heading_deg: f.heading_deg,
            }),
        }
    }
}

/// NMEA sentences → fixes: an RMC with a valid fix gives one (with the last GGA's HDOP).
#[derive(Debug, Default)]
pub struct NmeaReader {
    hdop: Option<f32>,
    pub rejected: u64,
}

impl NmeaReader {
    pub fn line(&mut self, line: &str) -> Option<LiveFix> {
        let line = line.trim();
        if !line.starts_with('$') {
            return None;
        }
        match nmea::parse_str(line) {
            Ok(nmea::ParseResult::GGA(g)) => {
                self.hdop = g.hdop;
                None
            }
            Ok(nmea::ParseResult::RMC(r)) => {
                if r.status_of_fix == nmea::sentences::rmc::RmcStatusOfFix::Invalid {
                    return None;
                }
                Some(LiveFix {
                    latitude: r.lat?,
                    longitude: r.lon?,
                    accuracy_m: self.hdop.map_or(0.0, |h| h * METRES_PER_HDOP),
                    speed_mps: r.speed_over_ground.unwrap_or(0.0) * KNOT_MPS,
                    heading_deg: r.true_course.unwrap_or(0.0),
                })
            }
            Ok(_) => None,
            Err(e) => {
                self.rejected += 1;
                debug!(error = %e, "an NMEA sentence that does not parse: skipped");
                None
            }
        }
    }
}

/// Reads NMEA from a device (as it comes) or a file (an RMC a second, as recorded).
pub fn nmea(path: PathBuf, shutdown: CancellationToken) -> Arc<Latest> {
    let replay = std::fs::metadata(&path).is_ok_and(|m| m.is_file());
    let latest = Arc::new(Latest {
        fix: Mutex::new(None),
        keep: replay,
    });
    let out = Arc::clone(&latest);
    tokio::spawn(async move {
        tokio::select! {
            r = read_nmea(&path, replay, &out) => match r {
                Ok(()) => info!(path = %path.display(), "NMEA source ended; the last fix stands"),
                Err(e) => warn!(path = %path.display(), error = %e, "NMEA source failed"),
            },
            _ = shutdown.cancelled() => {}
        }
    });
    latest
}

async fn read_nmea(path: &Path, replay: bool, latest: &Latest) -> std::io::Result<()> {
    let file = tokio::fs::File::open(path).await?;
    let mut lines = BufReader::new(file).lines();
    let mut reader = NmeaReader::default();
    while let Some(line) = lines.next_line().await? {
        if let Some(fix) = reader.line(&line) {
            latest.set(fix);
            if replay {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    Ok(())
}

/// gpsd's TPV report, the fields a position needs.
#[derive(Deserialize)]
struct Report {
    class: String,
    #[serde(default)]
    mode: u8,
    lat: Option<f64>,
    lon: Option<f64>,
    speed: Option<f64>,
    track: Option<f64>,
    eph: Option<f64>,
    epx: Option<f64>,
    epy: Option<f64>,
}

/// A gpsd JSON line → a fix, if it is a TPV with a 2D or 3D fix.
pub fn gpsd_fix(line: &str) -> Option<LiveFix> {
    let r: Report = serde_json::from_str(line).ok()?;
    if r.class != "TPV" || r.mode < 2 {
        return None;
    }
    let accuracy = r.eph.or_else(|| Some(r.epx?.hypot(r.epy?))).unwrap_or(0.0);
    Some(LiveFix {
        latitude: r.lat?,
        longitude: r.lon?,
        accuracy_m: accuracy as f32,
        speed_mps: r.speed.unwrap_or(0.0) as f32,
        heading_deg: r.track.unwrap_or(0.0) as f32,
    })
}

/// Watches gpsd at `addr`, reconnecting (backoff up to 10 s) when it goes away.
pub fn gpsd(addr: String, shutdown: CancellationToken) -> Arc<Latest> {
    let latest = Arc::new(Latest::default());
    let out = Arc::clone(&latest);
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(250);
        loop {
            let session = async {
                let stream = tokio::net::TcpStream::connect(&addr).await?;
                let (read, mut write) = stream.into_split();
                write
                    .write_all(b"?WATCH={\"enable\":true,\"json\":true}\n")
                    .await?;
                info!(%addr, "watching gpsd");
                let mut lines = BufReader::new(read).lines();
                while let Some(line) = lines.next_line().await? {
                    if let Some(fix) = gpsd_fix(&line) {
                        out.set(fix);
                    }
                }
                Ok::<_, std::io::Error>(())
            };
            tokio::select! {
                r = session => {
                    match r {
                        Ok(()) => debug!(%addr, "gpsd closed the connection"),
                        Err(e) => debug!(%addr, error = %e, "gpsd"),
                    }
                }
                _ = shutdown.cancelled() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    });
    latest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_a_fix_shows_no_coordinates() {
        let fix = LiveFix {
            latitude: 39.912_345,
            longitude: 116.398_765,
            accuracy_m: 4.5,
            speed_mps: 1.0,
            heading_deg: 90.0,
        };
        let printed = format!("{fix:?} {:?}", PositionSource::Live(Arc::default()));
        for value in ["39.91", "116.39"] {
            assert!(!printed.contains(value), "{value} in {printed}");
        }
        assert!(printed.contains("<redacted>") && printed.contains("4.5"));
    }

    /// A sentence with its checksum.
    fn sentence(body: &str) -> String {
        let sum = body.bytes().fold(0u8, |a, b| a ^ b);
        format!("${body}*{sum:02X}")
    }

    #[test]
    fn rmc_gives_a_fix_with_the_last_gga_accuracy() {
        let mut r = NmeaReader::default();
        assert_eq!(
            r.line(&sentence(
                "GPGGA,120000.00,3954.5220,N,11623.850,E,1,08,0.9,50.0,M,0.0,M,,"
            )),
            None
        );
        let fix = r
            .line(&sentence(
                "GPRMC,120000.00,A,3954.5220,N,11623.850,E,3.5,90.0,291126,,,A",
            ))
            .expect("a fix");
        assert!((fix.latitude - 39.908_7).abs() < 1e-6, "{fix:?}");
        assert!((fix.longitude - 116.397_5).abs() < 1e-6, "{fix:?}");
        assert!((fix.accuracy_m - 4.5).abs() < 1e-4);
        assert!((fix.speed_mps - 3.5 * KNOT_MPS).abs() < 1e-4);
        assert_eq!(fix.heading_deg, 90.0);
    }

    #[test]
    fn void_fixes_bad_checksums_and_noise_give_nothing() {
        let mut r = NmeaReader::default();
        assert_eq!(
            r.line(&sentence(
                "GPRMC,120000.00,V,3954.5220,N,11623.850,E,3.5,90.0,291126,,,N"
            )),
            None
        );
        assert_eq!(
            r.line("$GPRMC,120000.00,A,3954.5220,N,11623.850,E,3.5,90.0,291126,,,A*00"),
            None
        );
        assert_eq!(r.line("garbage"), None);
        assert_eq!(r.rejected, 1);
    }

    #[test]
    fn gpsd_tpv_reports_become_fixes() {
        let tpv = r#"{"class":"TPV","device":"/dev/pts/3","mode":3,"lat":39.9092,"lon":116.3975,"track":90.0,"speed":1.8,"eph":17.1}"#;
        let fix = gpsd_fix(tpv).expect("a fix");
        assert_eq!((fix.latitude, fix.longitude), (39.9092, 116.3975));
        assert!((fix.accuracy_m - 17.1).abs() < 1e-4);
        assert!(gpsd_fix(r#"{"class":"TPV","mode":1}"#).is_none());
        assert!(gpsd_fix(r#"{"class":"SKY"}"#).is_none());
        assert!(gpsd_fix("not json").is_none());
    }

    #[test]
    fn a_live_fix_goes_stale_unless_replayed() {
        let live = Latest::default();
        assert!(live.get().is_none());
        let fix = LiveFix {
            latitude: 1.0,
            longitude: 2.0,
            accuracy_m: 3.0,
            speed_mps: 0.0,
            heading_deg: 0.0,
        };
        live.set(LiveFix {
            latitude: 200.0,
            ..fix
        });
        assert!(live.get().is_none(), "an impossible latitude is not a fix");
        live.set(fix);
        assert_eq!(live.get(), Some(fix));
    }
}
