//! The link to a unit drops and comes back; the hub restarts under running agents. Units
//! reconnect by themselves and viewers see them again, from a keyframe.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use tianwang_proto::v1::TrackKind;
use tianwang_tests::relay::{Impairment, UdpRelay};
use tianwang_tests::*;
use tianwang_transport::Limits;

const UNIT: &str = "bwc-007";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_whose_link_drops_reconnects_and_its_viewer_carries_on() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    // A short idle timeout so the hub notices the dead link quickly.
    let hub = Hub::start(tmp.path(), Some("[quic]\nidle_timeout = \"3s\"\n")).await?;
    let relay = UdpRelay::start(hub.quic).await?;
    let token = hub.token("device", UNIT);
    let agent = Agent::start(
        &relay.addr.to_string(),
        &hub.ca(),
        UNIT,
        &token,
        tmp.path(),
        &["--keyframe-interval", "1"],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await?;

    // The viewer is on the hub directly; only the unit's link goes dark.
    let viewer = hub.token("viewer", "alice");
    let mut s = Subscriber::connect(hub.quic, &hub.trust(), &viewer, &Limits::default()).await?;
    let (sub, mut rx) = s.subscribe(UNIT, 1024).await?;
    let video = track_id(&sub, TrackKind::Video);
    collect(&mut rx, video, 30, Duration::from_secs(10)).await?;

    relay.set_blackout(true);
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 0.0
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\n{}", hub.log()))?;
    let restored_at = std::time::Instant::now();
    relay.set_blackout(false);
    hub.wait_metric("tianwang_units_online", Duration::from_secs(30), |v| {
        v == 1.0
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nagent:\n{}", agent.log()))?;
    assert!(relay.dropped.load(std::sync::atomic::Ordering::Relaxed) > 0);
    // The viewer was told on its control stream: offline, then online again.
    let mut states = Vec::new();
    while states.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), s.control.recv()).await??;
        if let Some(tianwang_proto::Kind::UnitState(u)) = msg.kind {
            assert_eq!(u.unit_id, UNIT);
            states.push(u.online);
        }
    }
    assert_eq!(states, vec![false, true]);
    let m = hub.metrics().await?;
    assert!(
        m.get("tianwang_sessions_total{role=\"publisher\"}") >= 2.0,
        "the unit came back on a new session"
    );

    // The same subscription carries on: the first frame to arrive after the link came back
    // starts a group (the one the agent had cached), and the groups run whole from there.
    let mut frames = collect(&mut rx, video, 200, Duration::from_secs(30)).await?;
    frames.retain(|f| f.received_at > restored_at);
    assert!(
        frames.len() >= 30,
        "only {} frames after the link returned",
        frames.len()
    );
    assert_eq!(frames[0].index, 0, "resumes at a keyframe");
    assert!(is_idr_with_parameter_sets(frames[0].frame.payload()));
    assert_whole_groups(&frames);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_change_keeps_the_session_and_a_reconnect_says_hello_in_0rtt()
-> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), Some("[quic]\nidle_timeout = \"3s\"\n")).await?;
    let relay = UdpRelay::start(hub.quic).await?;
    // A 60 ms round trip, so an early hello is plainly read before the handshake ends.
    relay.set_impairment(Impairment {
        delay: Duration::from_millis(30),
        ..Default::default()
    });
    let token = hub.token("device", UNIT);
    let agent = Agent::start(
        &relay.addr.to_string(),
        &hub.ca(),
        UNIT,
        &token,
        tmp.path(),
        &["--keyframe-interval", "1"],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await?;
    let viewer = hub.token("viewer", "alice");
    let mut s = Subscriber::connect(hub.quic, &hub.trust(), &viewer, &Limits::default()).await?;
    let (sub, mut rx) = s.subscribe(UNIT, 1024).await?;
    let video = track_id(&sub, TrackKind::Video);
    collect(&mut rx, video, 30, Duration::from_secs(10)).await?;

    // The unit's packets now come from another address: QUIC migrates the connection.
    relay.change_network();
    let changed_at = std::time::Instant::now();
    let mut frames = collect(&mut rx, video, 90, Duration::from_secs(15)).await?;
    frames.retain(|f| f.received_at > changed_at);
    assert!(
        frames.len() >= 60,
        "{} frames after the change",
        frames.len()
    );
    let m = hub.metrics().await?;
    assert_eq!(
        m.get("tianwang_sessions_total{role=\"publisher\"}"),
        1.0,
        "the same session carried on\n{}",
        agent.log()
    );
    assert_eq!(m.get("tianwang_units_online"), 1.0);
    assert!(!agent.log().contains("uplink down"), "{}", agent.log());
    // Its first hello was a full handshake's.
    assert_eq!(m.get("tianwang_quic_early_hellos_total"), 0.0);

    // An outage the hub gives the session up over: the agent comes back with the session
    // ticket of its first connection, its hello in the first packets.
    relay.set_blackout(true);
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 0.0
    })
    .await?;
    relay.set_blackout(false);
    hub.wait_metric("tianwang_units_online", Duration::from_secs(30), |v| {
        v == 1.0
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nagent:\n{}", agent.log()))?;
    let m = hub.metrics().await?;
    assert_eq!(m.get("tianwang_sessions_total{role=\"publisher\"}"), 2.0);
    // The hub took the early data (the agent learns it from TLS at the handshake's end);
    // whether the hub also read the hello before that end depends on its scheduling.
    assert!(
        agent.log().contains("early=true"),
        "the reconnect said hello in 0-RTT\nagent:\n{}",
        agent.log()
    );
    println!(
        "hellos read before the handshake ended: {}",
        m.get("tianwang_quic_early_hellos_total")
    );
    // And it carries media again.
    let restored_at = std::time::Instant::now();
    let mut frames = collect(&mut rx, video, 200, Duration::from_secs(20)).await?;
    frames.retain(|f| f.received_at > restored_at);
    assert!(
        frames.len() >= 30,
        "{} frames after the reconnect",
        frames.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_come_back_after_the_hub_restarts() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut hub = Hub::start(tmp.path(), None).await?;
    let token = hub.token("device", UNIT);
    let mut agent = Agent::start(
        &hub.quic.to_string(),
        &hub.ca(),
        UNIT,
        &token,
        tmp.path(),
        &[],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await?;

    hub.restart().await?;
    assert!(hub.is_running());
    hub.wait_metric("tianwang_units_online", Duration::from_secs(30), |v| {
        v == 1.0
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}\nagent:\n{}", agent.log()))?;
    assert!(agent.is_running(), "the agent rode out the restart");

    // The restarted hub (same data dir: same certificate and signing key) relays again.
    let viewer = hub.token("viewer", "alice");
    let mut s = Subscriber::connect(hub.quic, &hub.trust(), &viewer, &Limits::default()).await?;
    let (sub, mut rx) = s.subscribe(UNIT, 1024).await?;
    let frames = collect(
        &mut rx,
        track_id(&sub, TrackKind::Video),
        30,
        Duration::from_secs(15),
    )
    .await?;
    assert!(is_idr_with_parameter_sets(frames[0].frame.payload()));
    assert_whole_groups(&frames);
    assert!(
        agent.log().contains("uplink down"),
        "the agent noticed the restart"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_agent_gives_up_and_a_second_device_with_the_same_id_wins() -> anyhow::Result<()>
{
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(tmp.path(), None).await?;

    // A token for another unit will be refused every time: the agent stops, saying why.
    let other = hub.token("device", "bwc-other");
    let mut wrong = Agent::start(
        &hub.quic.to_string(),
        &hub.ca(),
        UNIT,
        &other,
        tmp.path(),
        &[],
    )?;
    let status = wrong
        .exited(Duration::from_secs(20))
        .await
        .expect("the refused agent exits");
    assert!(!status.success());
    let log = wrong.log();
    assert!(
        log.contains("refused") && log.contains("Forbidden"),
        "{log}"
    );

    // Two devices claiming one unit id: the newer connection takes over and the older one
    // stops instead of fighting back.
    let token = hub.token("device", UNIT);
    let dir_a = tmp.path().join("a");
    let dir_b = tmp.path().join("b");
    std::fs::create_dir_all(&dir_a)?;
    std::fs::create_dir_all(&dir_b)?;
    let mut first = Agent::start(&hub.quic.to_string(), &hub.ca(), UNIT, &token, &dir_a, &[])?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await?;
    let mut second = Agent::start(&hub.quic.to_string(), &hub.ca(), UNIT, &token, &dir_b, &[])?;
    let status = first
        .exited(Duration::from_secs(20))
        .await
        .expect("the replaced agent exits");
    assert!(!status.success());
    assert!(first.log().contains("Replaced"), "{}", first.log());
    assert!(second.is_running());
    hub.wait_metric("tianwang_units_online", Duration::from_secs(5), |v| {
        v == 1.0
    })
    .await?;
    Ok(())
}
