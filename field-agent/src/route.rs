//! A simulated route: the unit walks its waypoints at a steady speed and reports where it
//! is as its GPS position (`--route FILE`). The file has one `latitude,longitude` per line
//! (`#` comments and blank lines ignored) and may set `speed <m/s>` (default 1.4, walking)
//! and `loop` (start over at the end; otherwise the unit stays at the last waypoint).

use std::path::Path;
use std::time::Duration;

use tianwang_proto::Sensitive;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {what}")]
    Line {
        path: String,
        line: usize,
        what: String,
    },
    #[error("{0}: a route needs at least one waypoint")]
    Empty(String),
}

#[derive(Clone, PartialEq)]
pub struct Route {
    pub waypoints: Vec<(f64, f64)>,
    pub speed_mps: f64,
    pub looped: bool,
}

/// Where the unit is: latitude, longitude, heading (degrees from north), speed.
#[derive(Clone, Copy, PartialEq)]
pub struct Fix {
    pub latitude: f64,
    pub longitude: f64,
    pub heading_deg: f64,
    pub speed_mps: f64,
}

// Where an officer goes or is never reaches a log: `Debug` redacts the coordinates.
impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("waypoints", &Sensitive::new(self.waypoints.len()))
            .field("speed_mps", &self.speed_mps)
            .field("looped", &self.looped)
            .finish()
    }
}

impl std::fmt::Debug for Fix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fix")
            .field("latitude", &Sensitive::new(self.latitude))
            .field("longitude", &Sensitive::new(self.longitude))
            .field("heading_deg", &self.heading_deg)
            .field("speed_mps", &self.speed_mps)
            .finish()
    }
}

const EARTH_M: f64 = 6_371_000.0;

fn distance_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, la2) = (a.0.to_radians(), b.0.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((b.1 - a.1).to_radians() / 2.0).sin().powi(2);
    2.0 * EARTH_M * h.sqrt().asin()
}

fn bearing_deg(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, la2) = (a.0.to_radians(), b.0.to_radians());
    let dlo = (b.1 - a.1).to_radians();
    let y = dlo.sin() * la2.cos();
    let x = la1.cos() * la2.sin() - la1.sin() * la2.cos() * dlo.cos();
    (y.atan2(x).to_degrees() + 360.0) % 360.0
}

impl Route {
    pub fn load(path: &Path) -> Result<Self, RouteError> {
        let text = std::fs::read_to_string(path).map_err(|source| RouteError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, name: &str) -> Result<Self, RouteError> {
        let mut route = Route {
            waypoints: Vec::new(),
            speed_mps: 1.4,
            looped: false,
        };
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            let bad = |what: &str| RouteError::Line {
                path: name.to_string(),
                line: i + 1,
                what: what.to_string(),
            };
            if line.is_empty() {
                continue;
            }
            if line == "loop" {
                route.looped = true;
            } else if let Some(v) = line.strip_prefix("speed") {
                route.speed_mps = v
                    .trim()
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s < 100.0)
                    .ok_or_else(|| bad("speed is a number of m/s in (0, 100)"))?;
            } else {
                let (lat, lon) = line
                    .split_once(',')
                    .ok_or_else(|| bad("expected latitude,longitude"))?;
                let (lat, lon): (f64, f64) = (
                    lat.trim()
                        .parse()
                        .map_err(|_| bad("latitude is not a number"))?,
                    lon.trim()
                        .parse()
                        .map_err(|_| bad("longitude is not a number"))?,
                );
                if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                    return Err(bad("latitude or longitude out of range"));
                }
                route.waypoints.push((lat, lon));
            }
        }
        if route.waypoints.is_empty() {
            return Err(RouteError::Empty(name.to_string()));
        }
        Ok(route)
    }

    /// Where the unit is `elapsed` after it set off.
    pub fn fix(&self, elapsed: Duration) -> Fix {
        let legs: Vec<f64> = self
            .waypoints
            .windows(2)
            .map(|w| distance_m(w[0], w[1]))
            .collect();
        let total: f64 = legs.iter().sum();
        let first = self.waypoints[0];
        if total <= 0.0 {
            return Fix {
                latitude: first.0,
                longitude: first.1,
                heading_deg: 0.0,
                speed_mps: 0.0,
            };
        }
        let mut travelled = elapsed.as_secs_f64() * self.speed_mps;
        if self.looped {
            travelled %= total;
        } else if travelled >= total {
            let n = self.waypoints.len();
            let (a, b) = (self.waypoints[n - 2], self.waypoints[n - 1]);
            return Fix {
                latitude: b.0,
                longitude: b.1,
                heading_deg: bearing_deg(a, b),
                speed_mps: 0.0,
            };
        }
        for (i, leg) in legs.iter().enumerate() {
            if travelled <= *leg && *leg > 0.0 {
                let (a, b) = (self.waypoints[i], self.waypoints[i + 1]);
                let f = travelled / leg;
                return Fix {
                    latitude: a.0 + (b.0 - a.0) * f,
                    longitude: a.1 + (b.1 - a.1) * f,
                    heading_deg: bearing_deg(a, b),
                    speed_mps: self.speed_mps,
                };
            }
            travelled -= leg;
        }
        let last = self.waypoints[self.waypoints.len() - 1];
        Fix {
            latitude: last.0,
            longitude: last.1,
            heading_deg: 0.0,
            speed_mps: 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn debug_shows_no_coordinates() {
        let route = Route {
            waypoints: vec![(39.912_345, 116.398_765), (39.913_456, 116.399_876)],
            speed_mps: 1.5,
            looped: false,
        };
        let fix = route.fix(Duration::from_secs(1));
        let printed = format!("{route:?} {fix:?} {fix:#?}");
        for value in ["39.91", "116.39"] {
            assert!(!printed.contains(value), "{value} in {printed}");
        }
        assert!(printed.contains("<redacted>") && printed.contains("1.5"));
    }

    #[test]
    fn a_unit_walks_its_route_at_its_speed_and_stops_at_the_end() {
        // 0.001° of latitude is 111 m.
        let r = Route::parse(
            "# north\nspeed 10\n39.9087,116.3975\n39.9097,116.3975\n",
            "t",
        )
        .unwrap();
        let start = r.fix(Duration::ZERO);
        assert_eq!((start.latitude, start.longitude), (39.9087, 116.3975));
        let mid = r.fix(Duration::from_secs_f64(5.56));
        assert!((mid.latitude - 39.9092).abs() < 1e-5, "{mid:?}");
        assert!(
            mid.heading_deg < 1.0 || mid.heading_deg > 359.0,
            "north: {mid:?}"
        );
        assert_eq!(mid.speed_mps, 10.0);
        let end = r.fix(Duration::from_secs(60));
        assert_eq!((end.latitude, end.speed_mps), (39.9097, 0.0));
    }

    #[test]
    fn a_looped_route_starts_over_and_bad_files_say_which_line() {
        let r = Route::parse("speed 10\nloop\n0,0\n0.001,0\n0,0\n", "t").unwrap();
        let lap = 2.0 * 111.2 / 10.0;
        let again = r.fix(Duration::from_secs_f64(lap + 0.01));
        assert!(again.latitude.abs() < 1e-5, "{again:?}");
        let e = Route::parse("0,0\n91,0\n", "r.route").unwrap_err();
        assert_eq!(
            e.to_string(),
            "r.route line 2: latitude or longitude out of range"
        );
        assert!(Route::parse("speed fast\n0,0", "r").is_err());
        assert!(Route::parse("# nothing\n", "r").is_err());
    }
}
