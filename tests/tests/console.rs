//! The console API over WebSocket and WHEP with bad input: each case gets a clear error on
//! its own session (closed where it cannot go on), and a good console beside them keeps
//! receiving media.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use tianwang_proto::v1::session_event::Kind as Event;
use tianwang_proto::v1::tile_state::State;
use tianwang_tests::console::Console;
use tianwang_tests::*;
use tokio_tungstenite::tungstenite::Message;

const SECS: Duration = Duration::from_secs(10);

async fn hub_with_units(dir: &std::path::Path) -> anyhow::Result<(Hub, Simulator)> {
    let hub = Hub::start(
        dir,
        Some("[console]\nauth_timeout = \"2s\"\nanswer_timeout = \"2s\"\n"),
    )
    .await?;
    let tokens = hub.fleet("sim-", 2);
    let sim = Simulator::start(&hub, 2, &tokens, &[])?;
    hub.wait_metric("tianwang_units_online", Duration::from_secs(30), |v| {
        v == 2.0
    })
    .await?;
    Ok((hub, sim))
}

async fn alive(c: &mut Console) -> bool {
    c.send(serde_json::json!({"ping": {"nonce": "42"}}))
        .await
        .is_ok()
        && c.until(SECS, |e| match &e.kind {
            Some(Event::Pong(p)) => Some(p.nonce == 42),
            _ => None,
        })
        .await
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_console_input_gets_a_clear_error_on_that_session_only() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (hub, _sim) = hub_with_units(tmp.path()).await?;
    let token = hub.token("commander", "duty");

    // A good console with media, watching all along.
    let mut good = Console::connect(hub.http).await?;
    good.with_media().await?;
    good.auth(&token).await?;
    good.add_tile("main", "sim-1").await?;
    good.tile("main", State::Live, SECS).await?;

    // Before signing in: nothing but an error, and the session stays.
    let mut c = Console::connect(hub.http).await?;
    c.send(serde_json::json!({"addTile": {"tileId": "a", "unitId": "sim-1"}}))
        .await?;
    assert_eq!(c.error(SECS).await?, "authenticate first");
    // Not JSON, JSON of the wrong shape, binary garbage: errors, the session goes on.
    c.send_raw(Message::text("{nope")).await?;
    assert!(c.error(SECS).await?.starts_with("message not understood"));
    c.send(serde_json::json!({"addTile": 5})).await?;
    assert!(c.error(SECS).await?.starts_with("message not understood"));
    c.send_raw(Message::binary(vec![0xff_u8; 16])).await?;
    assert!(c.error(SECS).await?.starts_with("message not understood"));
    assert!(alive(&mut c).await, "the session survived its bad messages");

    // Signed in: a unit that does not exist is refused for that tile only.
    c.auth(&token).await?;
    c.add_tile("x", "bwc-404").await?;
    assert_eq!(c.error(SECS).await?, "unit \"bwc-404\" is not online");
    c.tile("x", State::Removed, SECS).await?;
    assert!(alive(&mut c).await);
    // A malformed SDP answer ends that console's session, with the reason.
    c.add_tile("t1", "sim-2").await?;
    let revision = c
        .until(SECS, |e| match &e.kind {
            Some(Event::Offer(o)) => Some(o.revision),
            _ => None,
        })
        .await?;
    c.send(serde_json::json!({"answer": {"type": "answer", "sdp": "this is not SDP", "revision": revision}}))
        .await?;
    assert!(c.error(SECS).await?.starts_with("the answer was refused"));
    assert!(
        c.next(SECS).await?.is_none(),
        "closed after the refused answer"
    );

    // A console that never answers its offer is closed after answer_timeout.
    let mut mute = Console::connect(hub.http).await?;
    mute.auth(&token).await?;
    mute.add_tile("t", "sim-1").await?;
    assert_eq!(mute.error(SECS).await?, "no answer to offer 1 in time");
    assert!(mute.next(SECS).await?.is_none());

    // A console that never signs in is closed after auth_timeout.
    let mut silent = Console::connect(hub.http).await?;
    assert_eq!(silent.error(SECS).await?, "no authentication in time");
    assert!(silent.next(SECS).await?.is_none());

    // A bad token closes at once; so does a device's.
    let mut wrong = Console::connect(hub.http).await?;
    wrong
        .send(serde_json::json!({"auth": {"token": "not-a-jwt"}}))
        .await?;
    assert_eq!(wrong.error(SECS).await?, "token rejected: malformed");
    assert!(wrong.next(SECS).await?.is_none());
    let mut device = Console::connect(hub.http).await?;
    device
        .send(serde_json::json!({"auth": {"token": hub.token("device", "sim-1")}}))
        .await?;
    assert_eq!(
        device.error(SECS).await?,
        "a Device token cannot use the console"
    );

    // A message over the size limit closes the WebSocket with "message too big".
    let mut big = Console::connect(hub.http).await?;
    big.send_raw(Message::text(format!(
        "{{\"auth\":{{\"token\":\"{}\"}}}}",
        "a".repeat(200_000)
    )))
    .await?;
    assert!(big.next(SECS).await.map(|e| e.is_none()).unwrap_or(true));

    // Through all of it the good console kept receiving its tile's media.
    let before = good.media_of("main").packets;
    assert!(before > 0, "the good console receives RTP");
    let deadline = tokio::time::Instant::now() + SECS;
    while good.media_of("main").packets <= before + 30 && tokio::time::Instant::now() < deadline {
        let _ = good.next(Duration::from_millis(200)).await;
    }
    assert!(good.media_of("main").packets > before + 30);
    assert!(alive(&mut good).await);
    let m = hub.metrics().await?;
    assert_eq!(
        m.get("tianwang_console_sessions"),
        1.0,
        "only the good console is left"
    );
    good.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whep_refuses_bad_requests_with_the_reason() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let (hub, _sim) = hub_with_units(tmp.path()).await?;
    let token = hub.token("viewer", "player");
    let client = reqwest::Client::new();
    let url = |unit: &str| format!("http://{}/whep/{unit}", hub.http);
    let vp8_only = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 VP8/90000\r\na=recvonly\r\na=mid:0\r\n";
    let garbage_h264 = "v=0\r\nthis is not an offer but mentions H264/90000\r\n";
    // (what, bearer token, content type, body, status, reason)
    type Case<'a> = (&'a str, Option<String>, &'a str, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no token",
            None,
            "application/sdp",
            vp8_only.into(),
            401,
            "Bearer",
        ),
        (
            "bad token",
            Some("nope".into()),
            "application/sdp",
            vp8_only.into(),
            401,
            "token rejected",
        ),
        (
            "device token",
            Some(hub.token("device", "sim-1")),
            "application/sdp",
            vp8_only.into(),
            403,
            "cannot watch live",
        ),
        (
            "wrong type",
            Some(token.clone()),
            "text/plain",
            vp8_only.into(),
            415,
            "application/sdp",
        ),
        (
            "not SDP",
            Some(token.clone()),
            "application/sdp",
            "hello".into(),
            400,
            "not an SDP offer",
        ),
        (
            "no H.264",
            Some(token.clone()),
            "application/sdp",
            vp8_only.into(),
            406,
            "no H.264",
        ),
        (
            "malformed SDP",
            Some(token.clone()),
            "application/sdp",
            garbage_h264.into(),
            400,
            "offer was refused",
        ),
    ];
    for (what, bearer, content_type, body, status, reason) in cases {
        let mut req = client
            .post(url("sim-1"))
            .header("content-type", content_type)
            .body(body);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let res = req.send().await?;
        let got = res.status().as_u16();
        let text = res.text().await?;
        assert_eq!(got, status, "{what}: {text}");
        assert!(text.contains(reason), "{what}: {text:?} lacks {reason:?}");
    }
    let res = client
        .post(url("bwc-404"))
        .bearer_auth(&token)
        .header("content-type", "application/sdp")
        .body("v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 102\r\na=rtpmap:102 H264/90000\r\n")
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 404);
    assert!(res.text().await?.contains("not online"));
    let res = client
        .delete(format!("http://{}/whep/sim-1/0000", hub.http))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 404);
    // Nothing was left behind, and the hub is fine.
    let m = hub.metrics().await?;
    assert_eq!(m.get("tianwang_webrtc_peers"), 0.0);
    assert_eq!(m.get("tianwang_units_online"), 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyframe_requests_from_consoles_reach_the_unit_coalesced() -> anyhow::Result<()> {
    use tianwang_tests::unit::FakeUnit;
    let tmp = tempfile::tempdir()?;
    // Keyframe requests to a device at most once per second.
    let mut hub = Hub::start(
        tmp.path(),
        Some("[relay]\nkeyframe_request_interval = \"1s\"\n"),
    )
    .await?;
    let unit = FakeUnit::start(
        hub.quic,
        &hub.trust(),
        "bwc-009",
        &hub.token("device", "bwc-009"),
    )
    .await?;
    hub.wait_metric("tianwang_units_online", SECS, |v| v == 1.0)
        .await?;
    let token = hub.token("commander", "duty");
    let mut c = Console::connect(hub.http).await?;
    c.with_media().await?;
    c.auth(&token).await?;
    c.add_tile("k", "bwc-009").await?;
    c.tile("k", State::Live, SECS).await?;
    let deadline = tokio::time::Instant::now() + SECS;
    while c.media_of("k").packets == 0 && tokio::time::Instant::now() < deadline {
        let _ = c.next(Duration::from_millis(100)).await;
    }
    assert!(
        c.media_of("k").packets > 0,
        "media flows before asking for a keyframe"
    );
    assert_eq!(unit.keyframe_requests(), 0);

    // A burst of PLIs, as a browser sends after loss: the unit gets one request at once and
    // at most one more when the interval has passed, not one per PLI.
    for _ in 0..10 {
        c.pli("k").await?;
        let _ = c.next(Duration::from_millis(20)).await;
    }
    let deadline = tokio::time::Instant::now() + SECS;
    while unit.keyframe_requests() == 0 && tokio::time::Instant::now() < deadline {
        let _ = c.next(Duration::from_millis(100)).await;
    }
    assert!(unit.keyframe_requests() >= 1, "the PLI reached the unit");
    // Let the deferred one fall due.
    let settle = tokio::time::Instant::now() + Duration::from_millis(1500);
    while tokio::time::Instant::now() < settle {
        let _ = c.next(Duration::from_millis(100)).await;
    }
    assert!(
        unit.keyframe_requests() <= 2,
        "coalesced: {} requests for 10 PLIs",
        unit.keyframe_requests()
    );
    c.close().await;
    drop(unit);

    // Who signed in and watched which unit, for how long, is in the audit trail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    hub.stop();
    sqlx::any::install_default_drivers();
    let db = format!("sqlite://{}", hub.dir.join("data/index.sqlite").display());
    let pool = sqlx::AnyPool::connect(&db).await?;
    let rows: Vec<(String, String, String, String)> =
        sqlx::query_as("SELECT actor, action, subject, detail FROM audit ORDER BY seq")
            .fetch_all(&pool)
            .await?;
    pool.close().await;
    let has = |actor: &str, action: &str, subject: &str| {
        rows.iter()
            .any(|(a, x, s, _)| a == actor && x == action && s == subject)
    };
    assert!(has("duty", "login", "console"), "{rows:?}");
    assert!(has("bwc-009", "login", "quic"), "{rows:?}");
    assert!(has("duty", "view.start", "bwc-009"), "{rows:?}");
    let (_, _, _, detail) = rows
        .iter()
        .find(|(a, x, _, _)| a == "duty" && x == "view.end")
        .expect("the view's end is audited");
    let seconds = serde_json::from_str::<serde_json::Value>(detail)?["seconds"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(seconds > 0.5, "{detail}");
    Ok(())
}
