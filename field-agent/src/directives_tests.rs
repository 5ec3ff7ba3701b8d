//! The executor without a network: exactly once across repeats and restarts, each kind's
//! refusals, the files it leaves, and QUALITY and SNAPSHOT on a real x264 pipeline.

use std::sync::Arc;
use std::time::Duration;

use tianwang_proto::v1::{Ack, Directive, DirectiveKind, DirectiveState, TrackKind};

use super::*;
use crate::broadcast::{LocalBroadcast, audio_info, video_info};
use crate::capture::{Capture, EncodeSettings, video_encoder_branch};
use crate::seen::{INTERRUPTED, SEEN_FILE};

/// Remembers the QUALITY targets it is given and claims to apply them: for the tests that
/// are about the executor, not the encoder.
#[derive(Default)]
struct Targets(std::sync::Mutex<Vec<(u32, u32)>>);

impl QualityControl for Targets {
    fn set_quality(
        self: Arc<Self>,
        bitrate: u32,
        height: u32,
    ) -> BoxFuture<'static, Result<QualityChange, DirectiveError>> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((bitrate, height));
        Box::pin(std::future::ready(Ok(QualityChange {
            bitrate,
            width: 640,
            height: 360,
            summary: format!("bitrate {bitrate}"),
        })))
    }
}

fn broadcast() -> Arc<LocalBroadcast> {
    LocalBroadcast::new(
        "unit-1",
        vec![video_info(0, 640, 360, 30, 1_500_000), audio_info(1)],
        64,
    )
}

fn executor(dir: &Path) -> (Executor, Arc<Targets>) {
    let targets = Arc::new(Targets::default());
    let quality: Arc<dyn QualityControl> = targets.clone();
    let e = Executor::open(dir, broadcast(), quality).expect("open the executor");
    (e, targets)
}

fn directive(id: &str, kind: DirectiveKind) -> Directive {
    Directive {
        id: id.into(),
        kind: kind as i32,
        unit_id: "unit-1".into(),
        issued_by: "commander-7".into(),
        court: "京01".into(),
        ..Default::default()
    }
}

fn mark(id: &str, text: &str) -> Directive {
    Directive {
        text: text.into(),
        ..directive(id, DirectiveKind::Mark)
    }
}

fn quality(id: &str, bitrate: u32, height: u32) -> Directive {
    Directive {
        bitrate,
        height,
        ..directive(id, DirectiveKind::Quality)
    }
}

fn states(acks: &[Ack]) -> Vec<DirectiveState> {
    acks.iter().map(|a| a.state()).collect()
}

/// The one final Ack of a directive run once: DELIVERED first, then this.
async fn run_once(e: &Executor, d: &Directive) -> Ack {
    let acks = e.handle(d).await;
    assert_eq!(
        acks.first().map(|a| a.state()),
        Some(DirectiveState::Delivered),
        "{acks:?}"
    );
    acks.last().cloned().expect("a final ack")
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

#[tokio::test]
async fn a_repeated_id_is_answered_with_its_state_and_not_run_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (e, _) = executor(dir.path());
    let d = mark("d-1", "start arrest");

    let first = e.handle(&d).await;
    assert_eq!(
        states(&first),
        [DirectiveState::Delivered, DirectiveState::Done]
    );
    assert!(
        first
            .iter()
            .all(|a| a.ok && a.unit_id == "unit-1" && a.directive_id == "d-1")
    );

    let again = e.handle(&d).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(
        again[0], first[1],
        "the repeat carries the last state and message"
    );
    assert_eq!(lines(&dir.path().join(MARKS_FILE)).len(), 1, "marked once");
}

#[tokio::test]
async fn the_seen_log_survives_a_restart_even_with_a_torn_last_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (e, _) = executor(dir.path());
        run_once(&e, &mark("d-1", "start search")).await;
        run_once(&e, &mark("d-2", "stop search")).await;
    }
    // A crash mid-write: the last line is cut short, with half a UTF-8 character.
    let log = dir.path().join(SEEN_FILE);
    let mut bytes = std::fs::read(&log).expect("the log");
    bytes.extend_from_slice(b"{\"id\":\"d-3\",\"state\":\"del\xe4");
    std::fs::write(&log, &bytes).expect("tear the log");

    let (e, _) = executor(dir.path());
    let again = e.handle(&mark("d-2", "stop search")).await;
    assert_eq!(states(&again), [DirectiveState::Done], "{again:?}");
    // The torn id was never recorded whole: it is new, and runs.
    let d3 = e.handle(&mark("d-3", "start interview")).await;
    assert_eq!(
        states(&d3),
        [DirectiveState::Delivered, DirectiveState::Done]
    );
    assert_eq!(lines(&dir.path().join(MARKS_FILE)).len(), 3);

    // The rewritten log reads back whole.
    let text = std::fs::read_to_string(&log).expect("the log");
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("every line parses");
    }
    let (e, _) = executor(dir.path());
    for id in ["d-1", "d-2", "d-3"] {
        assert_eq!(
            e.last_state(id).map(|s| s.state.proto()),
            Some(DirectiveState::Done)
        );
    }
}

#[tokio::test]
async fn a_directive_cut_off_by_a_restart_fails_and_is_not_run_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (e, _) = executor(dir.path());
        // Received and recorded, then the agent died before acting.
        assert!(e.receive(&mark("d-1", "start arrest")).execute);
    }
    let (e, _) = executor(dir.path());
    let acks = e.handle(&mark("d-1", "start arrest")).await;
    assert_eq!(states(&acks), [DirectiveState::Failed]);
    assert_eq!(acks[0].message, INTERRUPTED);
    assert!(!dir.path().join(MARKS_FILE).exists(), "never marked");
}

#[test]
fn the_seen_log_is_bounded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut log = SeenLog::open(dir.path(), 4).expect("open");
    for i in 0..30 {
        for state in [State::Delivered, State::Done] {
            log.record(Seen {
                id: format!("d-{i}"),
                state,
                ok: true,
                message: String::new(),
            })
            .expect("record");
        }
    }
    assert_eq!(log.len(), 4);
    assert!(log.get("d-25").is_none() && log.get("d-26").is_some());
    let on_disk = std::fs::read_to_string(dir.path().join(SEEN_FILE)).expect("log");
    assert!(on_disk.lines().count() <= 16, "rewritten as it grows");
    let reopened = SeenLog::open(dir.path(), 4).expect("reopen");
    assert_eq!(reopened.len(), 4);
    assert_eq!(reopened.get("d-29").map(|s| s.state), Some(State::Done));
}

#[tokio::test]
async fn each_kind_refuses_bad_input_with_its_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (e, targets) = executor(dir.path());
    let cases = [
        (
            quality("q-1", 5, 0),
            "quality: bitrate 5 kbit/s is outside 100..=8000",
        ),
        (
            quality("q-2", 9000, 0),
            "quality: bitrate 9000 kbit/s is outside 100..=8000",
        ),
        (
            quality("q-3", 500, 100),
            "quality: height 100 px is outside 144..=2160 (0 keeps it)",
        ),
        (
            quality("q-4", 500, 4320),
            "quality: height 4320 px is outside 144..=2160 (0 keeps it)",
        ),
        (
            mark("m-1", "begin arrest"),
            "mark: expected \"start <label>\" or \"stop <label>\", got \"begin arrest\"",
        ),
        (mark("m-2", "start"), "mark: start without a label"),
        (
            mark("m-3", ""),
            "mark: expected \"start <label>\" or \"stop <label>\", got \"\"",
        ),
        (
            directive("t-1", DirectiveKind::Message),
            "message: no text to show",
        ),
        (
            directive("u-1", DirectiveKind::Unspecified),
            "unknown directive kind",
        ),
        (
            Directive {
                kind: 99,
                ..directive("u-2", DirectiveKind::Unspecified)
            },
            "unknown directive kind",
        ),
        (
            Directive {
                unit_id: "unit-2".into(),
                ..directive("w-1", DirectiveKind::Keyframe)
            },
            "keyframe: directive for unit \"unit-2\" reached unit \"unit-1\"",
        ),
        // The broadcast has had no frame yet.
        (
            directive("s-1", DirectiveKind::Snapshot),
            "snapshot: no picture yet: the encoder has not made a keyframe",
        ),
    ];
    for (d, reason) in cases {
        let last = run_once(&e, &d).await;
        assert_eq!(last.state(), DirectiveState::Failed, "{d:?}");
        assert!(!last.ok);
        assert_eq!(last.message, reason);
    }
    assert!(
        targets.0.lock().map(|t| t.is_empty()).unwrap_or(false),
        "no bad target reached the encoder"
    );

    // Within the limits it goes through, 0 keeping the height.
    for (id, bitrate, height) in [("q-5", 100, 0), ("q-6", 8000, 2160), ("q-7", 300, 144)] {
        let last = run_once(&e, &quality(id, bitrate, height)).await;
        assert_eq!(last.state(), DirectiveState::Done, "{last:?}");
    }
    assert_eq!(
        targets.0.lock().map(|t| t.clone()).unwrap_or_default(),
        [(100, 0), (8000, 2160), (300, 144)]
    );

    // No id: nothing to remember it by, refused at once.
    let acks = e.handle(&mark("", "start x")).await;
    assert_eq!(states(&acks), [DirectiveState::Failed]);
    let long = "x".repeat(MAX_ID_BYTES + 1);
    assert_eq!(
        states(&e.handle(&mark(&long, "start x")).await),
        [DirectiveState::Failed]
    );
}

#[tokio::test]
async fn marks_are_appended_as_json_lines() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (e, _) = executor(dir.path());
    let before = crate::unix_now_us();
    let done = run_once(&e, &mark("m-1", "start search of 3rd floor")).await;
    assert_eq!(
        done.message,
        "mark start \"search of 3rd floor\" in marks.jsonl"
    );
    run_once(&e, &mark("m-2", "  stop   search of 3rd floor ")).await;
    let marks = lines(&dir.path().join(MARKS_FILE));
    assert_eq!(marks.len(), 2);
    assert_eq!(marks[0]["id"], "m-1");
    assert_eq!(marks[0]["action"], "start");
    assert_eq!(marks[0]["label"], "search of 3rd floor");
    assert_eq!(marks[1]["id"], "m-2");
    assert_eq!(marks[1]["action"], "stop");
    assert_eq!(marks[1]["label"], "search of 3rd floor");
    let t0 = marks[0]["device_time_us"].as_u64().expect("a time");
    let t1 = marks[1]["device_time_us"].as_u64().expect("a time");
    assert!(before <= t0 && t0 <= t1, "{before} {t0} {t1}");
}

#[tokio::test]
async fn a_message_is_delivered_acknowledged_then_done_and_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (e, _) = executor(dir.path());
    let d = Directive {
        text: "Hold position at the east gate".into(),
        issued_at_us: 1_700_000_000_000_000,
        ..directive("t-1", DirectiveKind::Message)
    };
    let acks = e.handle(&d).await;
    assert_eq!(
        states(&acks),
        [
            DirectiveState::Delivered,
            DirectiveState::Acknowledged,
            DirectiveState::Done
        ]
    );
    assert!(acks.iter().all(|a| a.ok));
    let kept = lines(&dir.path().join(INSTRUCTIONS_FILE));
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0]["text"], "Hold position at the east gate");
    assert_eq!(kept[0]["issued_by"], "commander-7");
    assert_eq!(kept[0]["court"], "京01");
    assert_eq!(kept[0]["issued_at_us"], 1_700_000_000_000_000u64);
}

#[tokio::test]
async fn stop_live_pauses_media_and_go_live_resumes_it_from_a_keyframe() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (e, _) = executor(dir.path());
    let b = Arc::clone(&e.broadcast);
    let video = b.track(TrackKind::Video).expect("video");
    assert!(b.is_live(), "units start live");
    video.push(b"key", 1, 33_000, true);
    video.push(b"delta", 2, 33_000, false);
    assert_eq!(video.track.latest_group(), 1);

    let done = run_once(&e, &directive("l-1", DirectiveKind::StopLive)).await;
    assert_eq!(
        done.message,
        "off live: no media goes to the hub (control and telemetry carry on)"
    );
    assert!(!b.is_live());
    // Off live nothing reaches the track, not even a keyframe, and a late joiner gets
    // no cached picture from before the stop.
    video.push(b"key", 3, 33_000, true);
    video.push(b"delta", 4, 33_000, false);
    assert_eq!(video.track.latest_group(), 1);
    let mut late = video.track.subscribe();
    assert!(late.try_next().is_none());
    // The snapshot picture is still kept.
    assert_eq!(video.picture().len(), 2);
    let again = run_once(&e, &directive("l-2", DirectiveKind::StopLive)).await;
    assert_eq!(
        (again.state(), again.message.as_str()),
        (DirectiveState::Done, "already off live")
    );

    let live = run_once(&e, &directive("l-3", DirectiveKind::GoLive)).await;
    assert_eq!(
        live.message,
        "live again: media goes to the hub from the next keyframe"
    );
    // A delta frame cannot start a group; the next keyframe does.
    video.push(b"delta", 5, 33_000, false);
    assert!(late.try_next().is_none());
    video.push(b"key", 6, 33_000, true);
    let first = late.try_next().expect("the first frame after going live");
    assert!(first.is_keyframe());
    assert_eq!(first.timestamp_us, 6);
    let again = run_once(&e, &directive("l-4", DirectiveKind::GoLive)).await;
    assert_eq!(again.message, "already live");
}

#[test]
fn file_names_from_ids_stay_in_their_directory() {
    use crate::file_name_for;
    assert_eq!(
        file_name_for("hub-1-18c2f-0a0b0c0d"),
        "hub-1-18c2f-0a0b0c0d"
    );
    assert_eq!(file_name_for("../etc/passwd"), "%2E.%2Fetc%2Fpasswd");
    assert_eq!(file_name_for(".hidden"), "%2Ehidden");
    assert_eq!(file_name_for("a%2Fb"), "a%252Fb");
    assert_eq!(
        file_name_for("hub-最高法-66164678d7034-5cf132b2"),
        "hub-最高法-66164678d7034-5cf132b2"
    );
    assert_eq!(file_name_for("a\u{2028}b"), "a%E2%80%A8b");
    assert_eq!(file_name_for(""), "%");
}

// Real media from here on: x264 on a live test pattern, the agent's encoder branch.

fn test_settings() -> EncodeSettings {
    EncodeSettings {
        width: 320,
        height: 180,
        framerate: 60,
        bitrate: 2000,
        keyframe_interval: 30,
    }
}

/// A capture of a live test pattern through the agent's encoder branch, and its executor.
fn live_capture(dir: &Path) -> (Capture, Executor) {
    let settings = test_settings();
    let b = LocalBroadcast::new("unit-1", vec![video_info(0, 320, 180, 60, 2_000_000)], 4096);
    let description = format!(
        "videotestsrc is-live=true pattern=smpte \
         ! video/x-raw,width={},height={},framerate={}/1 ! timeoverlay ! videoconvert \
         ! {} ! appsink name=video sync=false max-buffers=64",
        settings.width,
        settings.height,
        settings.framerate,
        video_encoder_branch(&settings)
    );
    let capture = Capture::start(&description, &b, &settings).expect("start the capture");
    let executor = Executor::open(dir, b, capture.encoder()).expect("open the executor");
    (capture, executor)
}

/// Encoded bytes of the next `n` video frames (and how many were keyframes). Bounded: a
/// frame that takes more than 10 s to come fails the test.
async fn next_frames(sub: &mut tianwang_core::Subscription, n: usize) -> (usize, usize) {
    let (mut bytes, mut keys) = (0, 0);
    for _ in 0..n {
        let f = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a frame within 10 s")
            .expect("the track is open");
        bytes += f.payload_len();
        keys += usize::from(f.is_keyframe());
    }
    (bytes, keys)
}

/// Reads frames until the next keyframe (at most `limit`).
async fn until_keyframe(sub: &mut tianwang_core::Subscription, limit: usize) {
    for _ in 0..limit {
        let f = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("a frame within 10 s")
            .expect("the track is open");
        if f.is_keyframe() {
            return;
        }
    }
    panic!("no keyframe in {limit} frames");
}

fn jpeg_size(jpeg: &[u8]) -> (i32, i32) {
    use gstreamer as gst;
    use gstreamer::prelude::*;
    use gstreamer_app as gst_app;
    let pipeline = gst::parse::launch(
        "appsrc name=src caps=image/jpeg ! jpegdec ! appsink name=out sync=false",
    )
    .expect("jpeg decoder")
    .downcast::<gst::Pipeline>()
    .expect("a pipeline");
    let src = pipeline
        .by_name("src")
        .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
        .expect("appsrc");
    let out = pipeline
        .by_name("out")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .expect("appsink");
    pipeline.set_state(gst::State::Playing).expect("play");
    src.push_buffer(gst::Buffer::from_slice(jpeg.to_vec()))
        .expect("push");
    src.end_of_stream().expect("eos");
    let sample = out
        .try_pull_sample(gst::ClockTime::from_seconds(10))
        .expect("the JPEG decodes");
    let _ = pipeline.set_state(gst::State::Null);
    let s = sample.caps().and_then(|c| c.structure(0)).expect("caps");
    (
        s.get::<i32>("width").expect("width"),
        s.get::<i32>("height").expect("height"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quality_changes_the_live_encoders_bitrate_and_picture_size() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_capture, e) = live_capture(dir.path());
    let video = e.broadcast.track(TrackKind::Video).expect("video");
    let mut sub = video.track.subscribe_with(4096, u64::MAX);

    // Settle, then measure a fixed number of frames at each bitrate.
    const N: usize = 60;
    next_frames(&mut sub, 30).await;
    let (high, _) = next_frames(&mut sub, N).await;

    let done = run_once(&e, &quality("q-1", 200, 0)).await;
    assert_eq!(
        (done.state(), done.message.as_str()),
        (
            DirectiveState::Done,
            "bitrate 2000 → 200 kbit/s, 320x180 kept"
        )
    );
    // The rate control gets a group to adapt.
    next_frames(&mut sub, 30).await;
    let (low, _) = next_frames(&mut sub, N).await;
    eprintln!("bytes over {N} frames: {high} at 2000 kbit/s, {low} at 200 kbit/s");
    assert!(
        low * 3 < high,
        "{high} bytes at 2000 kbit/s, {low} at 200 kbit/s"
    );

    let done = run_once(&e, &quality("q-2", 200, 144)).await;
    assert_eq!(
        done.message, "bitrate 200 → 200 kbit/s, 320x180 → 256x144",
        "{done:?}"
    );
    assert_eq!(e.broadcast.infos()[0].height, 144, "announced next time");
    // The encoder restarts on the new size with a keyframe: a snapshot of the group that
    // follows decodes to the new size (it comes from the stream's own SPS).
    until_keyframe(&mut sub, 120).await;
    next_frames(&mut sub, 5).await;
    let snap = run_once(&e, &directive("s-1", DirectiveKind::Snapshot)).await;
    assert_eq!(snap.state(), DirectiveState::Done, "{snap:?}");
    let jpeg = std::fs::read(dir.path().join("snapshots/s-1.jpg")).expect("the snapshot");
    assert_eq!(jpeg_size(&jpeg), (256, 144));

    // Above the capture's size it keeps the capture's.
    let done = run_once(&e, &quality("q-3", 800, 720)).await;
    assert_eq!(
        done.message,
        "bitrate 200 → 800 kbit/s, 256x144 → 320x180 (the capture's 320x180 is the largest)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_a_jpeg_of_the_newest_picture() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_capture, e) = live_capture(dir.path());
    let video = e.broadcast.track(TrackKind::Video).expect("video");
    let mut sub = video.track.subscribe_with(4096, u64::MAX);
    until_keyframe(&mut sub, 120).await;
    next_frames(&mut sub, 10).await;

    let id = "hub-a/b 1";
    let done = run_once(&e, &directive(id, DirectiveKind::Snapshot)).await;
    assert_eq!(done.state(), DirectiveState::Done, "{done:?}");
    let name = "hub-a%2Fb%201.jpg";
    let jpeg = std::fs::read(dir.path().join(SNAPSHOTS_DIR).join(name)).expect("the snapshot");
    assert_eq!(
        done.message,
        format!("snapshots/{name}: 320x180, {} bytes", jpeg.len())
    );
    assert!(jpeg.starts_with(&[0xFF, 0xD8]), "JPEG SOI");
    assert!(jpeg.ends_with(&[0xFF, 0xD9]), "JPEG EOI");
    assert_eq!(jpeg_size(&jpeg), (320, 180));
    // Asked again, it is not taken again.
    std::fs::remove_file(dir.path().join(SNAPSHOTS_DIR).join(name)).expect("remove");
    let again = e.handle(&directive(id, DirectiveKind::Snapshot)).await;
    assert_eq!(again, [done]);
    assert!(!dir.path().join(SNAPSHOTS_DIR).join(name).exists());
}

#[tokio::test]
async fn the_uplink_handle_answers_receipts_at_once_and_runs_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (e, _) = executor(dir.path());
    let directives = Directives::start(e);
    directives.submit(mark("m-1", "start a"));
    directives.submit(mark("m-2", "stop a"));
    directives.submit(mark("m-1", "start a"));
    let mut acks = directives.acks().lock().await;
    let mut got = Vec::new();
    // Two directives: DELIVERED and DONE each, and the repeat's answer.
    for _ in 0..5 {
        let ack = tokio::time::timeout(Duration::from_secs(10), acks.recv())
            .await
            .expect("an ack within 10 s")
            .expect("the channel is open");
        let state = ack.state();
        got.push((ack.directive_id, state));
    }
    use DirectiveState::{Delivered, Done};
    // Receipts are answered on arrival (the repeat's while m-1 still waits to run); the
    // worker's reports follow, in arrival order.
    let expected = [
        ("m-1", Delivered),
        ("m-2", Delivered),
        ("m-1", Delivered),
        ("m-1", Done),
        ("m-2", Done),
    ];
    assert_eq!(got, expected.map(|(id, s)| (id.to_string(), s)), "{got:?}");
    let marks = lines(&dir.path().join(MARKS_FILE));
    assert_eq!(marks.len(), 2);
    assert_eq!(
        (marks[0]["id"].as_str(), marks[1]["id"].as_str()),
        (Some("m-1"), Some("m-2"))
    );
}
