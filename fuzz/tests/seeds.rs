//! Writes the seed inputs of every fuzz target into fuzz/seeds/<target> (committed):
//! valid examples of each input, so the fuzzer starts from inputs that reach deep into a
//! parser instead of rediscovering the format. Regenerate with
//! `cargo test -p tianwang-fuzz --test seeds -- --ignored` (scripts/fuzz does).

use std::path::Path;

use bytes::BytesMut;
use prost::Message;
use tianwang_proto::v1::{
    FrameHeader, GroupHeader, Hello, Position, Role, Telemetry, TrackInfo, TrackKind,
};
use tianwang_proto::{ControlMessage, Kind, wire};

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    std::fs::create_dir_all(&dir).expect("creating the seed folder");
    std::fs::write(dir.join(name), data).expect("writing a seed");
}

/// Deterministic bytes for the operation-sequence fuzzers (xorshift).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const KEYFRAME: &[u8] = &[
    0, 0, 0, 1, 0x67, 0x42, 0xe0, 0x1f, 0xda, 0x02, 0x80, 0xbf, 0, 0, 0, 1, 0x68, 0xce, 0x3c, 0x80,
    0, 0, 1, 0x65, 0x88, 0x84, 0x21, 0xa0,
];

#[test]
#[ignore = "writes the committed seeds; run by scripts/fuzz"]
fn write_seeds() {
    // The control stream: a device's hello, its announce and a telemetry point, in one
    // stream (the first byte picks the chunk size).
    let telemetry = Telemetry {
        timestamp_us: 1_700_000_000_000_000,
        position: Some(Position {
            latitude: 39.9087,
            longitude: 116.3975,
            accuracy_m: 5.0,
            speed_mps: 1.2,
            heading_deg: 90.0,
        }),
        battery_percent: 80.0,
        ..Default::default()
    };
    let mut control = BytesMut::from(&[3u8][..]);
    for kind in [
        Kind::Hello(Hello {
            protocol_version: 1,
            role: Role::Publisher as i32,
            unit_id: "unit-1".into(),
            token: "eyJhbGciOiJFZERTQSJ9.e30.c2ln".into(),
            ..Default::default()
        }),
        Kind::Announce(tianwang_proto::v1::Announce {
            tracks: vec![TrackInfo {
                id: 1,
                kind: TrackKind::Video as i32,
                codec: "h264".into(),
                ..Default::default()
            }],
        }),
        Kind::Telemetry(telemetry),
    ] {
        wire::encode_delimited(&ControlMessage::new(kind), &mut control);
    }
    write("control", "device-session", &control);

    let mut group = BytesMut::from(&[5u8][..]);
    wire::encode_delimited(
        &GroupHeader {
            track_id: 1,
            sequence: 7,
            backfill: false,
        },
        &mut group,
    );
    for i in 0..3u64 {
        let header = FrameHeader {
            timestamp_us: 1_700_000_000_000_000 + i * 33_333,
            duration_us: 33_333,
        };
        wire::encode_frame(
            &header,
            if i == 0 {
                KEYFRAME
            } else {
                &[0, 0, 0, 1, 0x41, 0x9a]
            },
            &mut group,
        );
    }
    write("group_stream", "three-frames", &group);

    write(
        "ws_json",
        "auth",
        br#"{"auth":{"token":"eyJhbGciOiJFZERTQSJ9.e30.c2ln"}}"#,
    );
    write(
        "ws_json",
        "add-tile",
        br#"{"addTile":{"tileId":"s0-1","unitId":"sim-1"}}"#,
    );
    write(
        "ws_json",
        "answer",
        br#"{"answer":{"type":"answer","sdp":"v=0\r\n","revision":"1"}}"#,
    );
    write(
        "ws_json",
        "ice",
        br#"{"iceCandidate":{"candidate":"candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host","sdpMid":"0","sdpMlineIndex":0}}"#,
    );
    let unit_json = serde_json::to_vec(&ControlMessage::new(Kind::Telemetry(telemetry)))
        .expect("telemetry serializes");
    write("ws_json", "unit-telemetry", &unit_json);

    let mut h264 = vec![2u8];
    h264.extend_from_slice(KEYFRAME);
    write("h264", "keyframe", &h264);
    let stamped = {
        let mut au = Vec::new();
        tianwang_proto::stamp::write(&mut au, 1_700_000_000_000_000);
        au.extend_from_slice(KEYFRAME);
        au
    };
    write("h264", "stamped-keyframe", &stamped);
    // An RTP payload: FU-A fragments of an IDR.
    write(
        "h264",
        "fu-a",
        &[1, 0x7c, 0x85, 0x88, 0x84, 0x7c, 0x45, 0x21, 0xa0],
    );

    write("telemetry", "point", &telemetry.encode_to_vec());

    write(
        "nmea",
        "rmc-gga",
        b"$GPGGA,120000.00,3954.5220,N,11623.850,E,1,08,0.9,50.0,M,0.0,M,,*5C\n\
          $GPRMC,120000.00,A,3954.5220,N,11623.850,E,3.5,90.0,291126,,,A*6A\n\
          {\"class\":\"TPV\",\"mode\":3,\"lat\":39.9087,\"lon\":116.3975,\"eph\":4.0,\"speed\":1.0,\"track\":90.0}\n",
    );

    write(
        "token",
        "eddsa-shape",
        b"eyJ0eXAiOiJKV1QiLCJhbGciOiJFZERTQSJ9.eyJpc3MiOiJmdXp6Iiwic3ViIjoidW5pdC0xIiwiYXVkIjoidGlhbndhbmciLCJyb2xlIjoiZGV2aWNlIiwiaWF0IjoxLCJuYmYiOjEsImV4cCI6NDEwMjQ0NDgwMCwianRpIjoiMSJ9.c2lnbmF0dXJl",
    );
    write(
        "token",
        "alg-none",
        b"eyJhbGciOiJub25lIn0.eyJzdWIiOiJ1bml0LTEifQ.",
    );

    write(
        "export_manifest",
        "one-file",
        br#"{"format":"tianwang-export/1","case":{"number":"C-1"},"hub_public_key":"00","created_us":1,
"files":[{"name":"unit-1.mp4","unit":"unit-1","operation":null,"recording":"r1","sha256":"00",
"parts":[{"offset":0,"length":10,"row":{"unit":"unit-1","seq":1,"kind":"init","recording":"r1","number":0,"path":"p","codecs":"avc1","start_us":0,"end_us":1,"media_start":0,"media_duration":0,"bytes":10,"sha256":"00","prev_sha256":"00","case_number":null,"operation_id":null,"officer":null,"court":"c","recorded_us":1,"signature":"00"}},
{"offset":10,"length":10,"row":{"unit":"unit-1","seq":2,"kind":"media","recording":"r1","number":1,"path":"p","codecs":"avc1","start_us":0,"end_us":1,"media_start":0,"media_duration":0,"bytes":10,"sha256":"00","prev_sha256":"00","case_number":null,"operation_id":null,"officer":null,"court":"c","recorded_us":1,"signature":"00"}}]}],
"gaps":[],"audit":[]}"#,
    );

    write(
        "sdp",
        "whip-offer",
        b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n\
a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=fingerprint:sha-256 00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\na=rtcp-mux\r\n\
a=setup:actpass\r\na=rtpmap:111 opus/48000/2\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 102\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=sendonly\r\na=rtcp-mux\r\n\
a=setup:actpass\r\na=rtpmap:102 H264/90000\r\n\
a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n\
a=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\n",
    );
    write(
        "sdp",
        "trickle-fragment",
        b"a=ice-ufrag:efgh\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\nm=audio 9 RTP/AVP 0\r\na=mid:0\r\n\
a=candidate:1 1 udp 2130706431 127.0.0.1 5001 typ host\r\n",
    );

    for (i, len) in [64usize, 512, 2048].into_iter().enumerate() {
        for target in ["relay_ops", "segmenter_ops", "spool_ops"] {
            write(target, &format!("noise-{i}"), &noise(i as u64 + 1, len));
        }
    }
}
