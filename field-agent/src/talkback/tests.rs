//! Talkback with real GStreamer and real QUIC: Opus packets of a 440 Hz tone go through the
//! player into an Ogg Opus file that ffprobe accepts, of the talk's length, not silent;
//! the record counts the frames; bad input from a hub in this process costs a stream or a
//! talk, never the session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tianwang_proto::v1::{self, FrameHeader, GroupHeader, Welcome};
use tianwang_proto::wire::{self, Progress};
use tianwang_proto::{ControlMessage, Kind};
use tianwang_transport::{Control, Limits, Trust};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::broadcast::{LocalBroadcast, audio_info};
use crate::directives::{DirectiveError, Directives, Executor, QualityChange, QualityControl};
use crate::uplink::{self, UplinkConfig, UplinkStats};

/// Every wait in these tests gives up after this long (then the test fails).
const PATIENCE: Duration = Duration::from_secs(30);

/// The agent's log in the test's output (`--nocapture` shows it).
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,field_agent=debug,quinn=warn")
        .with_test_writer()
        .try_init();
}

/// `n` Opus packets (20 ms each) of a 440 Hz sine.
fn opus_packets(n: usize, channels: u32) -> Vec<Bytes> {
    gst::init().expect("GStreamer");
    let description = format!(
        "audiotestsrc wave=sine freq=440 samplesperbuffer=960 num-buffers={n} \
         ! audio/x-raw,rate=48000,channels={channels} ! audioconvert \
         ! opusenc frame-size=20 ! appsink name=sink sync=false"
    );
    let pipeline = gst::parse::launch(&description)
        .expect("encoder pipeline")
        .downcast::<gst::Pipeline>()
        .expect("a pipeline");
    let sink = pipeline
        .by_name("sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .expect("appsink");
    pipeline.set_state(gst::State::Playing).expect("encode");
    let mut packets = Vec::new();
    // One sample per packet; the encoder may flush one more at the end.
    for _ in 0..n + 8 {
        match sink.try_pull_sample(gst::ClockTime::from_seconds(10)) {
            Some(sample) => {
                let buffer = sample.buffer().expect("a buffer");
                let map = buffer.map_readable().expect("readable");
                packets.push(Bytes::copy_from_slice(&map));
            }
            None => break,
        }
    }
    let _ = pipeline.set_state(gst::State::Null);
    assert!(
        packets.len() >= n,
        "{} of {n} packets encoded",
        packets.len()
    );
    packets.truncate(n);
    packets
}

/// Decodes an Ogg Opus file to mono samples: (seconds of audio, RMS).
fn decode(path: &Path) -> (f64, f64) {
    gst::init().expect("GStreamer");
    let pipeline = gst::parse::launch(
        "filesrc name=file ! oggdemux ! opusdec ! audioconvert ! audioresample \
         ! audio/x-raw,format=F32LE,channels=1,rate=48000 ! appsink name=pcm sync=false",
    )
    .expect("decoder pipeline")
    .downcast::<gst::Pipeline>()
    .expect("a pipeline");
    pipeline
        .by_name("file")
        .expect("filesrc")
        .set_property("location", path.to_string_lossy().as_ref());
    let sink = pipeline
        .by_name("pcm")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .expect("appsink");
    pipeline.set_state(gst::State::Playing).expect("decode");
    let (mut samples, mut energy) = (0u64, 0f64);
    // Bounded: a minute of 20 ms buffers at most.
    for _ in 0..3000 {
        let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(10)) else {
            break;
        };
        let buffer = sample.buffer().expect("a buffer");
        let map = buffer.map_readable().expect("readable");
        for s in map.chunks_exact(4) {
            let v = f32::from_le_bytes([s[0], s[1], s[2], s[3]]) as f64;
            energy += v * v;
            samples += 1;
        }
    }
    let errors = pipeline
        .bus()
        .and_then(|b| b.pop_filtered(&[gst::MessageType::Error]));
    let _ = pipeline.set_state(gst::State::Null);
    assert!(
        errors.is_none(),
        "decoding {} failed: {errors:?}",
        path.display()
    );
    assert!(samples > 0, "nothing decoded from {}", path.display());
    (samples as f64 / 48_000.0, (energy / samples as f64).sqrt())
}

/// What ffprobe says of a file: (format, codec, channels, duration in seconds).
fn ffprobe(path: &Path) -> (String, String, u64, f64) {
    let out = std::process::Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-print_format",
            "json",
            "-show_format",
            "-show_streams",
        ])
        .arg(path)
        .output()
        .expect("ffprobe (scripts/deps test installs ffmpeg)");
    assert!(
        out.status.success(),
        "ffprobe refused {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ffprobe JSON");
    let stream = &v["streams"][0];
    (
        v["format"]["format_name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        stream["codec_name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        stream["channels"].as_u64().unwrap_or_default(),
        v["format"]["duration"]
            .as_str()
            .and_then(|d| d.parse().ok())
            .unwrap_or_default(),
    )
}

/// Checks a talk's file: valid Ogg Opus of `frames` × 20 ms, with the tone in it.
fn assert_good_file(path: &Path, frames: usize, channels: u64) {
    let want = frames as f64 * 0.020;
    let (format, codec, ch, duration) = ffprobe(path);
    eprintln!("{}: {format} {codec} {ch} ch {duration} s", path.display());
    assert_eq!(
        (format.as_str(), codec.as_str(), ch),
        ("ogg", "opus", channels)
    );
    assert!(
        (duration - want).abs() < 0.1,
        "{}: {duration} s, expected about {want} s",
        path.display()
    );
    let (decoded, rms) = decode(path);
    assert!(
        (decoded - want).abs() < 0.1,
        "decoded {decoded} s, expected about {want} s"
    );
    // A full-scale sine has an RMS of 0.71; audiotestsrc plays it at 0.8.
    assert!(rms > 0.2, "the tone is missing: RMS {rms}");
}

fn records(dir: &Path) -> Vec<TalkRecord> {
    std::fs::read_to_string(dir.join(TALKBACK_LOG))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("a talk record"))
        .collect()
}

fn spec(id: &str, channels: u32) -> TalkSpec {
    TalkSpec {
        id: id.into(),
        by: "commander-7".into(),
        track_id: 7,
        format: AudioFormat {
            sample_rate: 48_000,
            channels,
        },
        video_track_id: None,
        video_codec: None,
    }
}

/// A frame as a group stream carries it, read back.
fn incoming(group: u64, packet: &Bytes) -> Incoming {
    let header = FrameHeader {
        timestamp_us: crate::unix_now_us(),
        duration_us: 20_000,
    };
    let mut buf = BytesMut::new();
    wire::encode_frame(&header, packet, &mut buf);
    let Ok(Progress::Done(frame)) = wire::decode_frame(&mut buf, MAX_FRAME) else {
        panic!("a frame of {} bytes does not decode", packet.len());
    };
    Incoming {
        group,
        frame,
        arrived_us: crate::unix_now_us(),
    }
}

fn config(dir: &Path, speaker: bool) -> TalkbackConfig {
    TalkbackConfig {
        data_dir: dir.to_path_buf(),
        speaker,
    }
}

#[test]
fn a_talk_is_kept_as_a_valid_ogg_opus_file_and_recorded() {
    logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let stats = Arc::new(TalkbackStats::default());
    let packets = opus_packets(100, 2);
    let mut talk = Talk::start(
        spec("talk/1", 2),
        &config(dir.path(), false),
        Arc::clone(&stats),
    );
    for (i, p) in packets.iter().enumerate() {
        assert!(talk.frame(incoming(i as u64 / 50, p)), "frame {i} refused");
    }
    let record = talk.end().expect("a record");
    assert_eq!(record.frames, 100);
    assert_eq!(record.error, None);
    assert_eq!(record.file.as_deref(), Some("talkback/talk%2F1.ogg"));
    assert!(record.first_frame_us <= record.last_frame_us);
    assert!(record.delay_p50_ms.is_some() && record.delay_p50_ms <= record.delay_p95_ms);
    assert_eq!(records(dir.path()), vec![record]);
    assert_good_file(&dir.path().join("talkback/talk%2F1.ogg"), 100, 2);
    assert_eq!(stats.frames.load(Ordering::Relaxed), 100);

    // The same talk id again (a talk resumed after a reconnect) keeps the first file.
    let mut again = Talk::start(spec("talk/1", 2), &config(dir.path(), false), stats);
    for p in &packets[..10] {
        assert!(again.frame(incoming(0, p)));
    }
    let record = again.end().expect("a record");
    assert_eq!(record.file.as_deref(), Some("talkback/talk%2F1~2.ogg"));
    assert_good_file(&dir.path().join("talkback/talk%2F1.ogg"), 100, 2);
    assert_good_file(&dir.path().join("talkback/talk%2F1~2.ogg"), 10, 2);
}

#[test]
fn with_a_speaker_the_talk_is_played_and_still_kept() {
    logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let packets = opus_packets(25, 1);
    let mut talk = Talk::start(spec("spoken", 1), &config(dir.path(), true), Arc::default());
    for p in &packets {
        assert!(talk.frame(incoming(0, p)));
    }
    let record = talk.end().expect("a record");
    assert_eq!((record.frames, record.error), (25, None));
    assert_good_file(&dir.path().join("talkback/spoken.ogg"), 25, 1);
}

#[test]
fn a_talk_without_frames_leaves_no_file() {
    logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut talk = Talk::start(
        spec("silent", 1),
        &config(dir.path(), false),
        Arc::default(),
    );
    let record = talk.end().expect("a record");
    assert_eq!(
        (record.frames, record.file, record.delay_p50_ms),
        (0, None, None)
    );
    assert!(!dir.path().join("talkback/silent.ogg").exists());
}

#[test]
fn a_failing_pipeline_ends_the_talk_with_its_error() {
    logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let stats = Arc::new(TalkbackStats::default());
    // A disk that is always full.
    let format = AudioFormat {
        sample_rate: 48_000,
        channels: 1,
    };
    let player = Player::start(Path::new("/dev/full"), format, false);
    let mut talk = Talk::opened(
        spec("full", 1),
        dir.path(),
        "talkback/full.ogg".into(),
        player,
        Arc::clone(&stats),
    );
    for p in &opus_packets(50, 1) {
        if !talk.frame(incoming(0, p)) {
            break;
        }
    }
    let record = talk.end().expect("a record");
    let error = record.error.expect("the error is recorded");
    assert!(error.contains("No space left"), "{error}");
    assert_eq!(stats.talks_failed.load(Ordering::Relaxed), 1);
    assert_eq!(records(dir.path()).len(), 1);
}

#[test]
fn talkback_on_is_checked() {
    let on = |codec: &str, rate, channels, id: &str| v1::Talkback {
        talk_id: id.into(),
        track_id: 1,
        codec: codec.into(),
        sample_rate: rate,
        channels,
        on: true,
        by: "x".into(),
        ..Default::default()
    };
    assert!(validate(&on("opus", 48_000, 2, "t")).is_ok());
    // A video link: a track of its own, a codec the screen plays (or none yet).
    let link = |video_track_id, video_codec: &str| v1::Talkback {
        video_track_id,
        video_codec: video_codec.into(),
        ..on("opus", 48_000, 2, "t")
    };
    let spec = validate(&link(2, "")).expect("a link before its codec is known");
    assert_eq!((spec.video_track_id, spec.video_codec), (Some(2), None));
    let spec = validate(&link(2, "H264")).expect("an H.264 link");
    assert_eq!(spec.video_codec, Some(VideoCodec::H264));
    assert!(validate(&link(2, "vp8")).is_ok());
    for bad in [link(1, "h264"), link(0, "h264"), link(2, "av1")] {
        assert!(
            matches!(validate(&bad), Err(TalkbackError::Refused(_))),
            "{bad:?}"
        );
    }
    assert!(validate(&on("OPUS", 16_000, 1, "t")).is_ok());
    for bad in [
        on("pcm", 48_000, 1, "t"),
        on("opus", 44_100, 1, "t"),
        on("opus", 48_000, 0, "t"),
        on("opus", 48_000, 3, "t"),
        on("opus", 48_000, 1, ""),
        on("opus", 48_000, 1, "a\nb"),
        on("opus", 48_000, 1, &"x".repeat(MAX_TALK_ID_BYTES + 1)),
    ] {
        assert!(
            matches!(validate(&bad), Err(TalkbackError::Refused(_))),
            "{bad:?}"
        );
    }
    assert_eq!(percentile_ms(&[1000, 2000, 3000, 4000], 50), Some(2.0));
    assert_eq!(percentile_ms(&[1000, 2000, 3000, 4000], 95), Some(4.0));
    assert_eq!(percentile_ms(&[], 50), None);
}

// ---- Over QUIC: a hub in this process, the real uplink session. ----

struct NoQuality;

impl QualityControl for NoQuality {
    fn set_quality(
        self: Arc<Self>,
        _: u32,
        _: u32,
    ) -> futures::future::BoxFuture<'static, Result<QualityChange, DirectiveError>> {
        Box::pin(std::future::ready(Err(DirectiveError::Refused(
            "not in this test".into(),
        ))))
    }
}

/// A hub that does just enough: welcomes one unit, then the test speaks for it.
struct FakeHub {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
}

impl FakeHub {
    fn start(dir: &Path) -> Self {
        let pair = tianwang_transport::tls::self_signed(&["localhost".into()]).expect("cert");
        let (cert, key) = (dir.join("hub.crt"), dir.join("hub.key"));
        std::fs::write(&cert, pair.cert_pem).expect("write cert");
        std::fs::write(&key, pair.key_pem).expect("write key");
        let certs = tianwang_transport::tls::load_certs(&cert).expect("certs");
        let key = tianwang_transport::tls::load_key(&key).expect("key");
        let endpoint = tianwang_transport::server_endpoint(
            "127.0.0.1:0".parse().expect("addr"),
            certs,
            key,
            None,
            &Limits::default(),
        )
        .expect("hub endpoint");
        let addr = endpoint.local_addr().expect("hub address");
        Self { endpoint, addr }
    }

    /// The next unit's session, after Hello, Welcome and Announce.
    async fn accept(&self) -> (quinn::Connection, Control) {
        let incoming = tokio::time::timeout(PATIENCE, self.endpoint.accept())
            .await
            .expect("a unit in time")
            .expect("endpoint open");
        let conn = incoming.await.expect("handshake");
        let mut control = Control::accept(&conn).await.expect("control stream");
        let hello = control.recv().await.expect("hello");
        assert!(matches!(hello.kind, Some(Kind::Hello(_))));
        control
            .send(ControlMessage::new(Kind::Welcome(Welcome::default())))
            .await
            .expect("welcome");
        let announce = control.recv().await.expect("announce");
        assert!(matches!(announce.kind, Some(Kind::Announce(_))));
        (conn, control)
    }
}

/// A unit's agent (the real uplink) connected to `hub`, keeping its files in `dir`.
struct Unit {
    stats: Arc<UplinkStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), uplink::UplinkError>>,
}

impl Unit {
    fn start(hub: &FakeHub, dir: &Path) -> Self {
        let broadcast = LocalBroadcast::new("unit-1", vec![audio_info(1)], 16);
        let executor =
            Executor::open(dir, Arc::clone(&broadcast), Arc::new(NoQuality)).expect("executor");
        let mut config = UplinkConfig::new(hub.addr.to_string(), "token", Trust::Insecure);
        config.data_dir = dir.to_path_buf();
        let stats = Arc::new(UplinkStats::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(uplink::run(
            config,
            broadcast,
            Directives::start(executor),
            Arc::clone(&stats),
            stop.clone(),
        ));
        Self { stats, stop, task }
    }

    fn talkback(&self) -> &TalkbackStats {
        &self.stats.talkback
    }

    async fn stop(self) {
        self.stop.cancel();
        let ended = tokio::time::timeout(PATIENCE, self.task).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))), "the agent stopped badly");
    }
}

fn talkback(id: &str, on: bool) -> ControlMessage {
    ControlMessage::new(Kind::Talkback(v1::Talkback {
        talk_id: id.into(),
        track_id: 0x7a1c,
        codec: "opus".into(),
        sample_rate: 48_000,
        channels: 1,
        on,
        by: "commander-7".into(),
        ..Default::default()
    }))
}

/// Sends one group of `packets` on `track`, finished (FIN) or left open; returns its
/// stream.
async fn send_group(
    conn: &quinn::Connection,
    track: u32,
    sequence: u64,
    packets: &[Bytes],
    finish: bool,
) -> quinn::SendStream {
    let mut buf = BytesMut::new();
    wire::encode_delimited(
        &GroupHeader {
            track_id: track,
            sequence,
            backfill: false,
        },
        &mut buf,
    );
    for p in packets {
        let header = FrameHeader {
            timestamp_us: crate::unix_now_us(),
            duration_us: 20_000,
        };
        wire::encode_frame(&header, p, &mut buf);
    }
    let mut stream = conn.open_uni().await.expect("open a group stream");
    // The agent may stop a stream mid-way: that is its answer, not an error here.
    let _ = stream.write_all(&buf).await;
    if finish {
        let _ = stream.finish();
    }
    stream
}

/// The code the agent stopped a stream left open with. (A finished stream, once all its
/// data is acknowledged, can no longer be stopped.)
async fn stopped_with(stream: &quinn::SendStream) -> Option<quinn::VarInt> {
    tokio::time::timeout(PATIENCE, stream.stopped())
        .await
        .expect("the agent stops the stream in time")
        .unwrap_or(None)
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !done() {
        assert!(Instant::now() < deadline, "waited too long for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn frames_played(unit: &Unit) -> u64 {
    unit.talkback().frames.load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_talk_from_the_hub_is_played_into_a_file_and_recorded() {
    logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = FakeHub::start(dir.path());
    let data = dir.path().join("unit");
    std::fs::create_dir_all(&data).expect("data dir");
    let unit = Unit::start(&hub, &data);
    let (conn, mut control) = hub.accept().await;
    let packets = opus_packets(60, 1);

    control.send(talkback("talk-1", true)).await.expect("on");
    for (seq, group) in packets.chunks(30).enumerate() {
        send_group(&conn, 0x7a1c, seq as u64, group, true).await;
        until("the group", || {
            frames_played(&unit) == 30 * (seq as u64 + 1)
        })
        .await;
    }
    control.send(talkback("talk-1", false)).await.expect("off");
    until("the record", || !records(&data).is_empty()).await;

    let record = &records(&data)[0];
    assert_eq!(
        (record.talk_id.as_str(), record.by.as_str(), record.frames),
        ("talk-1", "commander-7", 60)
    );
    assert_eq!(record.file.as_deref(), Some("talkback/talk-1.ogg"));
    assert!(record.delay_p50_ms.is_some_and(|d| d >= 0.0), "{record:?}");
    assert_good_file(&data.join("talkback/talk-1.ogg"), 60, 1);
    assert_eq!(unit.stats.connects.load(Ordering::Relaxed), 1);
    unit.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_talkback_input_costs_a_stream_or_a_talk_never_the_session() {
    logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = FakeHub::start(dir.path());
    let data = dir.path().join("unit");
    std::fs::create_dir_all(&data).expect("data dir");
    let unit = Unit::start(&hub, &data);
    let (conn, mut control) = hub.accept().await;
    let packets = opus_packets(30, 1);
    let count = |c: &AtomicU64| c.load(Ordering::Relaxed);

    // A group for a track no talk is on: stopped.
    let stray = send_group(&conn, 999, 0, &packets[..5], false).await;
    assert_eq!(stopped_with(&stray).await, Some(STREAM_PROTOCOL));
    assert_eq!(count(&unit.talkback().streams_refused), 1);

    // Not Opus: refused. Off for a talk never on: ignored.
    let mut pcm = talkback("talk-pcm", true);
    if let Some(Kind::Talkback(t)) = pcm.kind.as_mut() {
        t.codec = "pcm".into();
    }
    control.send(pcm).await.expect("pcm");
    control.send(talkback("nope", false)).await.expect("off");
    until("the refusal", || count(&unit.talkback().talks_refused) == 1).await;

    // Talk A: a good group, a group broken by a frame too large for Opus (the frames
    // before it are played), another good group.
    control.send(talkback("talk-a", true)).await.expect("on a");
    send_group(&conn, 0x7a1c, 0, &packets[..10], true).await;
    until("group 0", || frames_played(&unit) == 10).await;
    let mut broken = packets[10..15].to_vec();
    broken.push(Bytes::from(vec![0xFC; 3000]));
    broken.extend_from_slice(&packets[15..20]);
    let g1 = send_group(&conn, 0x7a1c, 1, &broken, false).await;
    assert_eq!(stopped_with(&g1).await, Some(STREAM_PROTOCOL));
    assert_eq!(count(&unit.talkback().streams_bad), 1);
    until("group 1's good frames", || frames_played(&unit) == 15).await;
    send_group(&conn, 0x7a1c, 2, &packets[20..30], true).await;
    until("group 2", || frames_played(&unit) == 25).await;

    // Talk B while A is on: A ends (its file finished), B plays.
    control.send(talkback("talk-b", true)).await.expect("on b");
    until("talk a's record", || !records(&data).is_empty()).await;
    send_group(&conn, 0x7a1c, 0, &packets[..10], true).await;
    until("talk b's frames", || frames_played(&unit) == 35).await;
    control
        .send(talkback("talk-b", false))
        .await
        .expect("off b");
    until("talk b's record", || records(&data).len() == 2).await;

    let got: Vec<(String, u64)> = records(&data)
        .into_iter()
        .map(|r| (r.talk_id, r.frames))
        .collect();
    assert_eq!(
        got,
        [("talk-a".to_string(), 25), ("talk-b".to_string(), 10)]
    );
    assert_good_file(&data.join("talkback/talk-a.ogg"), 25, 1);
    assert_good_file(&data.join("talkback/talk-b.ogg"), 10, 1);
    assert!(!data.join("talkback/talk-pcm.ogg").exists());

    // The session never dropped, and it still carries the unit's telemetry.
    assert_eq!(unit.stats.connects.load(Ordering::Relaxed), 1);
    assert!(conn.close_reason().is_none());
    let sent = unit.stats.telemetry_sent.load(Ordering::Relaxed);
    until("more telemetry", || {
        unit.stats.telemetry_sent.load(Ordering::Relaxed) > sent
    })
    .await;
    assert_eq!(count(&unit.talkback().talks_failed), 0);
    drop(control);
    unit.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_talk_ends_with_its_session_and_a_failing_one_does_not_end_the_session() {
    logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = FakeHub::start(dir.path());
    let data = dir.path().join("unit");
    std::fs::create_dir_all(&data).expect("data dir");
    let unit = Unit::start(&hub, &data);
    let (conn, mut control) = hub.accept().await;
    let packets = opus_packets(20, 1);

    control.send(talkback("cut", true)).await.expect("on");
    send_group(&conn, 0x7a1c, 0, &packets, true).await;
    until("the frames", || frames_played(&unit) == 20).await;
    // The link goes without a word: the talk ends with the session, its file complete.
    conn.close(0u32.into(), b"gone");
    until("the record", || !records(&data).is_empty()).await;
    assert_eq!(records(&data)[0].frames, 20);
    assert_good_file(&data.join("talkback/cut.ogg"), 20, 1);

    // Back again; the talkback folder is now unusable (a file in its place): the talk
    // fails, the session carries on.
    let (conn, mut control) = hub.accept().await;
    std::fs::remove_dir_all(data.join(TALKBACK_DIR)).expect("remove the folder");
    std::fs::write(data.join(TALKBACK_DIR), b"in the way").expect("block the folder");
    control.send(talkback("blocked", true)).await.expect("on");
    until("its record", || records(&data).len() == 2).await;
    let record = &records(&data)[1];
    assert_eq!((record.talk_id.as_str(), record.frames), ("blocked", 0));
    assert_eq!(record.file, None);
    assert!(record.error.is_some());
    assert_eq!(unit.talkback().talks_failed.load(Ordering::Relaxed), 1);
    // Its streams find the talk over.
    let g = send_group(&conn, 0x7a1c, 0, &packets[..5], false).await;
    assert_eq!(stopped_with(&g).await, Some(STREAM_SHUTDOWN));
    control.send(talkback("blocked", false)).await.expect("off");
    assert_eq!(unit.stats.connects.load(Ordering::Relaxed), 2);
    assert!(conn.close_reason().is_none());
    unit.stop().await;
}
