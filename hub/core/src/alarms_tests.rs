use super::*;

const S: u64 = 1_000_000;
const T0: u64 = 1_800_000_000 * S;

fn op(units: &[&str]) -> Operation {
    Operation {
        id: "op-1".into(),
        case_number: "(2026)京0113执1234号".into(),
        starts_us: T0,
        ends_us: T0 + 3600 * S,
        latitude: 39.9087,
        longitude: 116.3975,
        radius_m: 200.0,
        units: units.iter().map(|u| u.to_string()).collect(),
    }
}

fn at(lat: f64, lon: f64) -> Telemetry {
    Telemetry {
        at_us: 0,
        position: Some((lat, lon, 5.0)),
        battery_percent: Some(80.0),
        storage_free_bytes: Some(10 << 30),
        recording: true,
        sos: false,
    }
}

/// An engine with one active operation and its unit online and well.
fn engine() -> AlarmEngine {
    let mut e = AlarmEngine::new(AlarmConfig::default());
    e.handle(T0, Event::Operation(op(&["bwc-1"])));
    e.handle(T0, Event::Online("bwc-1".into()));
    e.handle(T0, Event::Telemetry("bwc-1".into(), at(39.9087, 116.3975)));
    assert_eq!(e.poll_alarm(), None);
    e
}

/// Runs the clock forward second by second with media and the given telemetry.
fn run(e: &mut AlarmEngine, from: u64, seconds: u64, t: &Telemetry) -> Vec<Alarm> {
    let mut out = Vec::new();
    for i in 1..=seconds {
        let now = from + i * S;
        e.handle(now, Event::Media("bwc-1".into()));
        e.handle(now, Event::Telemetry("bwc-1".into(), t.clone()));
        out.extend(std::iter::from_fn(|| e.poll_alarm()));
    }
    out
}

fn rules(alarms: &[Alarm]) -> Vec<Rule> {
    alarms.iter().map(|a| a.rule).collect()
}

#[test]
fn leaving_the_geofence_raises_once_until_the_unit_is_back() {
    let mut e = engine();
    // 0.01° of latitude is about 1.1 km: far outside a 200 m fence.
    let out = run(&mut e, T0, 5, &at(39.9187, 116.3975));
    assert_eq!(rules(&out), vec![Rule::LeftGeofence], "{out:?}");
    assert_eq!(out[0].at_us, T0 + S, "raised on the first point outside");
    assert_eq!(out[0].operation.as_deref(), Some("op-1"));
    assert_eq!(out[0].case_number.as_deref(), Some("(2026)京0113执1234号"));
    assert!(
        out[0].evidence.contains("m from the centre"),
        "{}",
        out[0].evidence
    );
    // Just outside the radius but within margin and accuracy: not an alarm.
    let mut e = engine();
    assert!(run(&mut e, T0, 3, &at(39.9087 + 0.0020, 116.3975)).is_empty());
    // Back inside re-arms; leaving again raises again.
    let mut e = engine();
    run(&mut e, T0, 2, &at(39.9187, 116.3975));
    assert!(run(&mut e, T0 + 2 * S, 2, &at(39.9087, 116.3975)).is_empty());
    let again = run(&mut e, T0 + 4 * S, 2, &at(39.9187, 116.3975));
    assert_eq!(rules(&again), vec![Rule::LeftGeofence]);
}

#[test]
fn a_unit_offline_during_an_operation_raises_after_the_grace_period() {
    let mut e = engine();
    e.handle(T0 + S, Event::Offline("bwc-1".into()));
    e.handle_timeout(T0 + 30 * S);
    assert_eq!(e.poll_alarm(), None, "still within the grace period");
    e.handle_timeout(T0 + 31 * S);
    let a = e.poll_alarm().expect("offline alarm");
    assert_eq!(
        (a.rule, a.severity),
        (Rule::UnitOffline, Severity::Critical)
    );
    e.handle_timeout(T0 + 40 * S);
    assert_eq!(e.poll_alarm(), None, "raised once");
    // Outside any operation, going offline is not a deviation.
    let mut e = AlarmEngine::new(AlarmConfig::default());
    e.handle(T0, Event::Online("bwc-2".into()));
    e.handle(T0 + S, Event::Offline("bwc-2".into()));
    e.handle_timeout(T0 + 120 * S);
    assert_eq!(e.poll_alarm(), None);
}

#[test]
fn stalled_media_and_stopped_recording_are_told_apart() {
    let mut e = engine();
    // Telemetry keeps coming, media does not.
    let mut alarms = Vec::new();
    for i in 1..=11 {
        e.handle(
            T0 + i * S,
            Event::Telemetry("bwc-1".into(), at(39.9087, 116.3975)),
        );
        alarms.extend(std::iter::from_fn(|| e.poll_alarm()));
    }
    assert_eq!(rules(&alarms), vec![Rule::StreamStalled]);

    let mut e = engine();
    let mut t = at(39.9087, 116.3975);
    t.recording = false;
    let out = run(&mut e, T0, 12, &t);
    assert_eq!(rules(&out), vec![Rule::RecordingStopped], "{out:?}");
    assert_eq!(out[0].at_us, T0 + 11 * S, "after the 10 s grace");
}

#[test]
fn sos_is_critical_at_once_and_battery_and_storage_have_thresholds() {
    let mut e = engine();
    let mut t = at(39.9087, 116.3975);
    t.sos = true;
    let out = run(&mut e, T0, 1, &t);
    assert_eq!(rules(&out), vec![Rule::Sos]);
    assert_eq!(out[0].severity, Severity::Critical);

    let mut e = engine();
    let mut t = at(39.9087, 116.3975);
    t.battery_percent = Some(9.0);
    t.storage_free_bytes = Some(100 << 20);
    let out = run(&mut e, T0, 3, &t);
    assert_eq!(rules(&out), vec![Rule::BatteryLow, Rule::StorageLow]);
    // Hovering just above the threshold does not re-raise; well above re-arms.
    t.battery_percent = Some(16.0);
    assert!(run(&mut e, T0 + 3 * S, 1, &t).is_empty());
    t.battery_percent = Some(9.0);
    assert!(run(&mut e, T0 + 4 * S, 1, &t).is_empty());
}

#[test]
fn a_spool_that_refused_groups_is_critical_with_the_case_until_it_keeps_everything_again() {
    let mut e = engine();
    let spool = |n| Event::Spool {
        unit: "bwc-1".into(),
        refused_groups: n,
    };
    e.handle(T0 + S, spool(0));
    assert_eq!(e.poll_alarm(), None);
    e.handle(T0 + 2 * S, spool(3));
    let a = e.poll_alarm().expect("an alarm");
    assert_eq!(a.rule, Rule::SpoolFull);
    assert_eq!(a.severity, Severity::Critical);
    assert_eq!(a.case_number.as_deref(), Some("(2026)京0113执1234号"));
    assert!(a.evidence.contains("3 groups"), "{}", a.evidence);
    // Still refusing: one alarm for the condition.
    e.handle(T0 + 3 * S, spool(5));
    assert_eq!(e.poll_alarm(), None);
    // Keeping everything again re-arms it.
    e.handle(T0 + 4 * S, spool(0));
    e.handle(T0 + 5 * S, spool(1));
    assert_eq!(e.poll_alarm().map(|a| a.rule), Some(Rule::SpoolFull));
}

#[test]
fn an_operation_open_past_its_end_overruns() {
    let mut e = engine();
    let end = T0 + 3600 * S;
    e.handle_timeout(end + 15 * 60 * S - 1);
    let before: Vec<_> = std::iter::from_fn(|| e.poll_alarm())
        .filter(|a| a.rule == Rule::OperationOverrun)
        .collect();
    assert!(before.is_empty());
    e.handle_timeout(end + 15 * 60 * S);
    let after: Vec<_> = std::iter::from_fn(|| e.poll_alarm()).collect();
    assert!(rules(&after).contains(&Rule::OperationOverrun), "{after:?}");
}

#[test]
fn closing_an_operation_with_holes_in_a_units_recording_is_missing_evidence() {
    let mut e = AlarmEngine::new(AlarmConfig::default());
    e.handle(T0, Event::Operation(op(&["bwc-1", "bwc-2"])));
    let close = T0 + 600 * S;
    let recorded = HashMap::from([
        // Whole window, in two touching pieces.
        (
            "bwc-1".to_string(),
            vec![(T0 - 5 * S, T0 + 300 * S), (T0 + 300 * S, close + S)],
        ),
        // A two-minute hole.
        (
            "bwc-2".to_string(),
            vec![(T0, T0 + 200 * S), (T0 + 320 * S, close)],
        ),
    ]);
    // Everything else that happened on the way is not this test's concern.
    while e.poll_alarm().is_some() {}
    e.handle(
        close,
        Event::OperationClosed {
            id: "op-1".into(),
            recorded,
        },
    );
    let out: Vec<_> = std::iter::from_fn(|| e.poll_alarm())
        .filter(|a| a.rule == Rule::MissingEvidence)
        .collect();
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].unit, "bwc-2");
    assert!(out[0].evidence.starts_with("120 s"), "{}", out[0].evidence);
}

#[test]
fn disabled_rules_stay_silent_and_names_round_trip() {
    let mut config = AlarmConfig::default();
    config.enabled.remove(&Rule::LeftGeofence);
    let mut e = AlarmEngine::new(config);
    e.handle(T0, Event::Operation(op(&["bwc-1"])));
    e.handle(T0, Event::Online("bwc-1".into()));
    assert!(run(&mut e, T0, 3, &at(39.9187, 116.3975)).is_empty());
    for r in Rule::ALL {
        assert_eq!(Rule::from_name(r.name()), Some(r));
    }
    assert_eq!(Rule::from_name("nope"), None);
}

#[test]
fn distances_are_great_circle_metres() {
    let d = distance_m((39.9087, 116.3975), (39.9187, 116.3975));
    assert!((d - 1112.0).abs() < 2.0, "{d}");
    assert_eq!(distance_m((0.0, 0.0), (0.0, 0.0)), 0.0);
}

#[test]
fn telemetry_before_the_online_event_does_not_count_as_offline() {
    let mut e = AlarmEngine::new(AlarmConfig::default());
    // The operation began a minute ago, longer than the offline grace.
    let mut o = op(&["bwc-1"]);
    o.starts_us = T0 - 60 * S;
    e.handle(T0, Event::Operation(o));
    e.handle(T0, Event::Telemetry("bwc-1".into(), at(39.9087, 116.3975)));
    e.handle(T0, Event::Online("bwc-1".into()));
    let out: Vec<_> = std::iter::from_fn(|| e.poll_alarm()).collect();
    assert!(out.is_empty(), "{out:?}");
}
