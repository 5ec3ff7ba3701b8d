//! Bad input from the network: each case is closed with a clear reason (code and text),
//! counted, and nobody else notices — a real unit keeps streaming to a real viewer
//! throughout, without a single missing frame.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use bytes::BytesMut;
use prost::Message;
use tianwang_proto::v1::{
    Announce, FrameHeader, GroupHeader, Role, Subscribe, TrackInfo, TrackKind,
};
use tianwang_proto::wire;
use tianwang_proto::{ControlMessage, ErrorCode, Kind};
use tianwang_tests::*;
use tianwang_transport::{Control, ControlError, Limits, Trust, client};

const UNIT: &str = "bwc-001";

async fn dial(hub: &Hub) -> (quinn::Endpoint, quinn::Connection) {
    let ep = tianwang_transport::client_endpoint(&hub.trust(), &Limits::default(), false).unwrap();
    let conn = tianwang_transport::connect(&ep, &hub.quic.to_string())
        .await
        .unwrap();
    (ep, conn)
}

/// Opens the control stream and writes raw bytes on it.
async fn raw_control(hub: &Hub, bytes: &[u8]) -> (quinn::Endpoint, quinn::Connection) {
    let (ep, conn) = dial(hub).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    // Keep the stream open: the hub, not a FIN, must end this.
    std::mem::forget(send);
    (ep, conn)
}

fn encoded(msg: Kind) -> Vec<u8> {
    let mut b = BytesMut::new();
    wire::encode_delimited(&ControlMessage::new(msg), &mut b);
    b.to_vec()
}

/// A publisher session past hello and announce, ready to open group streams.
async fn publisher(
    hub: &Hub,
    unit: &str,
    token: &str,
    tracks: Vec<TrackInfo>,
) -> (quinn::Endpoint, quinn::Connection, Control) {
    let (ep, conn) = dial(hub).await;
    let (mut control, _) = client::hello(
        &conn,
        hello(Role::Publisher, unit, token),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    control
        .send(ControlMessage::new(Kind::Announce(Announce { tracks })))
        .await
        .unwrap();
    (ep, conn, control)
}

fn video_track(id: u32) -> TrackInfo {
    TrackInfo {
        id,
        name: "video".into(),
        kind: TrackKind::Video as i32,
        codec: "h264".into(),
        ..Default::default()
    }
}

async fn group_stream(conn: &quinn::Connection, track_id: u32, body: &[u8]) {
    let mut s = conn.open_uni().await.unwrap();
    let mut b = BytesMut::new();
    wire::encode_delimited(
        &GroupHeader {
            track_id,
            sequence: 1,
            backfill: false,
        },
        &mut b,
    );
    b.extend_from_slice(body);
    s.write_all(&b).await.unwrap();
    std::mem::forget(s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_closes_only_the_offender_with_a_reason() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let hub = Hub::start(
        tmp.path(),
        Some("[quic]\nhello_timeout = \"1s\"\nmax_frame_bytes = 1048576\n"),
    )
    .await?;
    let device = hub.token("device", UNIT);
    let _agent = Agent::start(
        &hub.quic.to_string(),
        &hub.ca(),
        UNIT,
        &device,
        tmp.path(),
        &["--keyframe-interval", "1"],
    )?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(20), |v| {
        v == 1.0
    })
    .await?;
    let viewer = hub.token("viewer", "alice");
    let mut watcher =
        Subscriber::connect(hub.quic, &hub.trust(), &viewer, &Limits::default()).await?;
    let (sub, mut rx) = watcher.subscribe(UNIT, 4096).await?;
    let video = track_id(&sub, TrackKind::Video);
    let before = collect(&mut rx, video, 5, Duration::from_secs(10)).await?;

    let mut cases: Vec<(&str, ErrorCode, String)> = Vec::new();

    // Garbage where a control message should be: a length, then bytes that are no protobuf.
    let (_e, c) = raw_control(&hub, &[0x05, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
    cases.push((
        "garbage control message",
        ErrorCode::Protocol,
        "control message does not decode".into(),
    ));
    assert_case(&c, cases.last()).await;

    // A control message that claims a megabyte.
    let mut big = BytesMut::new();
    prost::encode_length_delimiter(1 << 20, &mut big)?;
    let (_e, c) = raw_control(&hub, &big).await;
    cases.push((
        "oversized control message",
        ErrorCode::TooLarge,
        "exceeds the limit of 65536".into(),
    ));
    assert_case(&c, cases.last()).await;

    // Something other than hello first.
    let (_e, c) = raw_control(&hub, &encoded(Kind::Subscribe(Subscribe::default()))).await;
    cases.push((
        "subscribe before hello",
        ErrorCode::Protocol,
        "expected hello, got subscribe".into(),
    ));
    assert_case(&c, cases.last()).await;

    // A future protocol version.
    let mut h = hello(Role::Publisher, UNIT, &device);
    h.protocol_version = 2;
    let (_e, c) = raw_control(&hub, &encoded(Kind::Hello(h))).await;
    cases.push((
        "unknown protocol version",
        ErrorCode::Protocol,
        "protocol version 2 is not supported".into(),
    ));
    assert_case(&c, cases.last()).await;

    // A unit id that would climb out of the recordings directory, with a token for it.
    let climber = hub.token("device", "../../etc");
    let (_e, c) = raw_control(
        &hub,
        &encoded(Kind::Hello(hello(Role::Publisher, "../../etc", &climber))),
    )
    .await;
    cases.push((
        "unit id unfit for a path",
        ErrorCode::Protocol,
        "unit id \"../../etc\" is not".into(),
    ));
    assert_case(&c, cases.last()).await;

    // Tokens: not a token at all, one signed by another hub, one for another unit, the
    // wrong role each way.
    let (_e, c) = raw_control(
        &hub,
        &encoded(Kind::Hello(hello(Role::Publisher, UNIT, "not-a-jwt"))),
    )
    .await;
    cases.push((
        "malformed token",
        ErrorCode::Unauthorized,
        "token rejected: malformed".into(),
    ));
    assert_case(&c, cases.last()).await;

    let other = tempfile::tempdir()?;
    let foreign = std::process::Command::new(bin("hub"))
        .args([
            "token",
            "issue",
            "--role",
            "device",
            "--subject",
            UNIT,
            "--data",
        ])
        .arg(other.path())
        .output()?;
    let foreign = String::from_utf8(foreign.stdout)?.trim().to_string();
    let (_e, c) = raw_control(
        &hub,
        &encoded(Kind::Hello(hello(Role::Publisher, UNIT, &foreign))),
    )
    .await;
    cases.push((
        "token of another hub",
        ErrorCode::Unauthorized,
        "token rejected: bad signature".into(),
    ));
    assert_case(&c, cases.last()).await;

    let (_e, c) = raw_control(
        &hub,
        &encoded(Kind::Hello(hello(Role::Publisher, "bwc-999", &device))),
    )
    .await;
    cases.push((
        "token for another unit",
        ErrorCode::Forbidden,
        "the token is for unit \"bwc-001\", not \"bwc-999\"".into(),
    ));
    assert_case(&c, cases.last()).await;

    let (_e, c) = raw_control(
        &hub,
        &encoded(Kind::Hello(hello(Role::Publisher, "alice", &viewer))),
    )
    .await;
    cases.push((
        "viewer token publishing",
        ErrorCode::Forbidden,
        "cannot publish".into(),
    ));
    assert_case(&c, cases.last()).await;

    let (_e, c) = raw_control(
        &hub,
        &encoded(Kind::Hello(hello(Role::Subscriber, "", &device))),
    )
    .await;
    cases.push((
        "device token watching",
        ErrorCode::Forbidden,
        "cannot watch live".into(),
    ));
    assert_case(&c, cases.last()).await;

    // A connection that never says hello.
    let (_e, c) = dial(&hub).await;
    cases.push((
        "no hello",
        ErrorCode::Protocol,
        "no control stream in time".into(),
    ));
    assert_case(&c, cases.last()).await;

    // An announce with a codec the hub does not take.
    let intruder = hub.token("device", "bwc-002");
    let mut vp9 = video_track(1);
    vp9.codec = "vp9".into();
    let (_e, c, _ctl) = publisher(&hub, "bwc-002", &intruder, vec![vp9]).await;
    cases.push((
        "unsupported codec",
        ErrorCode::Protocol,
        "codec \"vp9\" is not supported".into(),
    ));
    assert_case(&c, cases.last()).await;

    // Group streams: for a track never announced, with an oversized frame, with garbage.
    let (_e, c, _ctl) = publisher(&hub, "bwc-002", &intruder, vec![video_track(1)]).await;
    group_stream(&c, 9, &[]).await;
    cases.push((
        "group for an unannounced track",
        ErrorCode::UnknownTrack,
        "group for unannounced track 9".into(),
    ));
    assert_case(&c, cases.last()).await;

    let (_e, c, _ctl) = publisher(&hub, "bwc-002", &intruder, vec![video_track(1)]).await;
    let mut frame = BytesMut::new();
    FrameHeader {
        timestamp_us: 1,
        duration_us: 1,
    }
    .encode_length_delimited(&mut frame)?;
    prost::encode_length_delimiter(100 << 20, &mut frame)?;
    group_stream(&c, 1, &frame).await;
    cases.push((
        "oversized frame",
        ErrorCode::TooLarge,
        "frame of 104857600 bytes exceeds the limit of 1048576".into(),
    ));
    assert_case(&c, cases.last()).await;

    let (_e, c, _ctl) = publisher(&hub, "bwc-002", &intruder, vec![video_track(1)]).await;
    group_stream(&c, 1, &[0x03, 0xff, 0xff, 0xff, 0x01, 0x00]).await;
    cases.push((
        "garbage frame header",
        ErrorCode::Protocol,
        "frame header does not decode".into(),
    ));
    assert_case(&c, cases.last()).await;

    // A device claiming more spool windows than any spool reports.
    let (_e, c, mut ctl) = publisher(&hub, "bwc-002", &intruder, vec![video_track(1)]).await;
    let window = tianwang_proto::v1::TimeRange {
        from_us: 1,
        to_us: 2,
    };
    ctl.send(ControlMessage::new(Kind::Holdings(
        tianwang_proto::v1::Holdings {
            ranges: vec![window; 5000],
            ..Default::default()
        },
    )))
    .await?;
    cases.push((
        "holdings with 5000 windows",
        ErrorCode::Protocol,
        "holdings with 5000 windows (at most 4096)".into(),
    ));
    assert_case(&c, cases.last()).await;

    // A viewer asking for a unit that is not there gets an answer, not a hang-up, and can
    // go on to watch a unit that is.
    let mut asker =
        Subscriber::connect(hub.quic, &hub.trust(), &viewer, &Limits::default()).await?;
    match client::subscribe(
        &mut asker.control,
        7,
        "bwc-404",
        &[],
        Duration::from_secs(5),
    )
    .await
    {
        Err(ControlError::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::UnknownUnit);
            assert!(reason.contains("\"bwc-404\" is not online"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Asking for one track many times over would multiply the fan-out: refused.
    let twice = vec!["video".to_string(); 2000];
    match client::subscribe(&mut asker.control, 9, UNIT, &twice, Duration::from_secs(5)).await {
        Err(ControlError::Refused { code, reason }) => {
            assert_eq!(code, ErrorCode::Protocol);
            assert!(reason.contains("asked for twice"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        client::subscribe(&mut asker.control, 8, UNIT, &[], Duration::from_secs(5))
            .await
            .is_ok()
    );

    // A client that does not speak tianwang/1 never gets a session.
    let mut crypto = rustls_client_without_alpn(&hub.trust());
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    let alien = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let qcrypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?;
    let attempt = alien
        .connect_with(
            quinn::ClientConfig::new(std::sync::Arc::new(qcrypto)),
            hub.quic,
            "localhost",
        )?
        .await;
    assert!(
        attempt.is_err(),
        "a handshake with the wrong ALPN must fail"
    );

    // Through all of it the real unit kept streaming to the real viewer, without a hole.
    let after = collect(&mut rx, video, 30, Duration::from_secs(10)).await?;
    let mut all = before;
    all.extend(after);
    assert_whole_groups(&all);
    let m = hub.metrics().await?;
    assert_eq!(m.get("tianwang_units_online"), 1.0);
    for label in [
        "malformed",
        "too_large",
        "protocol",
        "unauthorized",
        "forbidden",
        "timeout",
        "unknown_track",
    ] {
        assert!(
            m.get(&format!(
                "tianwang_sessions_closed_total{{reason=\"{label}\"}}"
            )) >= 1.0,
            "closures counted as {label}"
        );
    }
    eprintln!("{} bad inputs, each closed with its reason:", cases.len());
    for (what, code, reason) in &cases {
        eprintln!("  {what:32} {code:?}: {reason}");
    }
    Ok(())
}

async fn assert_case(conn: &quinn::Connection, case: Option<&(&str, ErrorCode, String)>) {
    let (what, code, reason) = case.expect("a case");
    let (got_code, got_reason) = closed_with(conn).await;
    assert_eq!(got_code, *code, "{what}: {got_reason}");
    assert!(
        got_reason.contains(reason.as_str()),
        "{what}: reason {got_reason:?} lacks {reason:?}"
    );
}

fn rustls_client_without_alpn(trust: &Trust) -> rustls::ClientConfig {
    let Trust::Roots(certs) = trust else {
        panic!("test hubs have a certificate")
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots.add(c.clone()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth()
}
