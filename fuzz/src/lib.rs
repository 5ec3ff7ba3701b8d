//! The bodies of Tianwang's fuzz targets: one function per parser of remote input, and
//! stateful fuzzers that run operation sequences against the relay core, the segmenter and
//! the device spool and check their invariants. `fuzz/cargo-fuzz` wraps each in a libFuzzer
//! target; `tests/regressions.rs` replays every committed crash input and seed through the
//! same functions in the normal test run, and `tests/properties.rs` runs them on proptest's
//! inputs. A function panics only on a bug: a parser error is an `Err`, never a crash.

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};

mod chain;
mod media;
mod spool;

pub use media::{h264, relay_ops, segmenter_ops};
pub use spool::spool_ops;

/// A target's body: any bytes in, a panic only on a bug.
pub type Target = fn(&[u8]);

/// Every target, by the name its cargo-fuzz binary, seed and regression folders carry.
pub const TARGETS: &[(&str, Target)] = &[
    ("control", control),
    ("group_stream", group_stream),
    ("ws_json", ws_json),
    ("h264", h264),
    ("telemetry", telemetry),
    ("nmea", nmea),
    ("token", token),
    ("export_manifest", export_manifest),
    ("sdp", sdp),
    ("relay_ops", relay_ops),
    ("segmenter_ops", segmenter_ops),
    ("spool_ops", spool_ops),
];

/// Feeds `data` to a decoder in chunks whose sizes the input's first byte picks, as QUIC
/// delivers a stream in pieces: every split point must give the same messages.
fn chunks(data: &[u8]) -> (usize, &[u8]) {
    match data.split_first() {
        Some((&n, rest)) => (usize::from(n % 17) + 1, rest),
        None => (1, data),
    }
}

/// QUIC control stream: length-delimited `ControlMessage`s through the transport's codec.
/// A message that decodes re-encodes to bytes that decode to the same message.
pub fn control(data: &[u8]) {
    use bytes::BytesMut;
    use prost::Message;
    use tianwang_transport::control::ControlCodec;
    use tokio_util::codec::{Decoder, Encoder};

    let (step, data) = chunks(data);
    let mut codec = ControlCodec::default();
    let mut buf = BytesMut::new();
    for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(msg)) => {
                    let _ = msg.kind_name();
                    let _ = format!("{msg:?}");
                    let mut out = BytesMut::new();
                    codec
                        .encode(msg.clone(), &mut out)
                        .expect("encoding into memory cannot fail");
                    let again = codec
                        .decode(&mut out)
                        .expect("own encoding decodes")
                        .expect("a whole message");
                    // Compared encoded: a NaN field is itself but not equal to itself.
                    assert_eq!(
                        again.encode_to_vec(),
                        msg.encode_to_vec(),
                        "control message round trip"
                    );
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// A group stream: its header, then frames, as `GroupReader` decodes them. A frame keeps
/// its encoded bytes (forwarded verbatim), which must be exactly its re-encoding.
pub fn group_stream(data: &[u8]) {
    use bytes::BytesMut;
    use tianwang_proto::wire::{self, Progress};

    let (step, data) = chunks(data);
    let mut buf = BytesMut::new();
    let mut header = false;
    for piece in data.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            if !header {
                match wire::decode_group_header(&mut buf) {
                    Ok(Progress::Done(_)) => header = true,
                    Ok(Progress::Need(n)) => {
                        assert!(n > before, "asks for bytes it has");
                        break;
                    }
                    Err(_) => return,
                }
                continue;
            }
            match wire::decode_frame(&mut buf, 64 * 1024) {
                Ok(Progress::Done(f)) => {
                    assert!(!f.payload().is_empty());
                    let mut again = BytesMut::new();
                    wire::encode_frame(&f.header, f.payload(), &mut again);
                    // A header may arrive in a non-canonical encoding; then only its
                    // meaning must survive.
                    if again.len() == f.encoded.len() {
                        assert_eq!(
                            wire::encoded_frame_len(&f.header, f.payload().len()),
                            f.encoded.len()
                        );
                    }
                }
                Ok(Progress::Need(n)) => {
                    assert!(n > before, "asks for bytes it has");
                    break;
                }
                Err(_) => return,
            }
        }
    }
}

/// Console and unit WebSocket messages: the protobuf JSON mapping, differential against
/// the binary codec. What JSON gives must survive binary and JSON round trips unchanged.
pub fn ws_json(data: &[u8]) {
    use prost::Message;
    use tianwang_proto::ControlMessage;
    use tianwang_proto::v1::SessionRequest;

    fn both<M>(text: &str)
    where
        M: Message + Default + serde::Serialize + serde::de::DeserializeOwned,
    {
        let Ok(msg) = serde_json::from_str::<M>(text) else {
            return;
        };
        // Compared encoded: a NaN field is itself but not equal to itself.
        let encoded = msg.encode_to_vec();
        let binary = M::decode(encoded.as_slice()).expect("own encoding decodes");
        assert!(
            binary.encode_to_vec() == encoded,
            "binary round trip changed the message"
        );
        let json = serde_json::to_string(&msg).expect("a message serializes");
        let back: M = serde_json::from_str(&json).expect("own JSON parses");
        assert!(
            back.encode_to_vec() == encoded,
            "JSON round trip changed the message"
        );
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    both::<SessionRequest>(text);
    both::<ControlMessage>(text);
}

/// Telemetry as a device sends it (protobuf), through the hub's validation: a point it
/// accepts has a position on the globe and a battery in range.
pub fn telemetry(data: &[u8]) {
    use prost::Message;
    use tianwang_proto::v1::Telemetry;

    let Ok(t) = Telemetry::decode(data) else {
        return;
    };
    if hub::field::validate(&t, 1_700_000_000_000_000).is_ok() {
        if let Some(p) = &t.position {
            assert!((-90.0..=90.0).contains(&p.latitude));
            assert!((-180.0..=180.0).contains(&p.longitude));
        }
        assert!((0.0..=100.0).contains(&t.battery_percent));
    }
}

/// NMEA sentences (a serial GNSS receiver) and gpsd JSON reports, line by line.
pub fn nmea(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut reader = field_agent::position::NmeaReader::default();
    for line in text.lines() {
        let _ = reader.line(line);
        let _ = field_agent::position::gpsd_fix(line);
    }
}

fn authority() -> &'static hub::auth::Authority {
    static AUTHORITY: OnceLock<hub::auth::Authority> = OnceLock::new();
    AUTHORITY.get_or_init(|| {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .expect("generating an Ed25519 key")
            .serialize_pem();
        hub::auth::Authority::from_pem(&pem, "fuzz", std::time::Duration::from_secs(30))
            .expect("a fresh key loads")
    })
}

/// A bearer token as any interface receives it, before and through signature checking:
/// nobody without the hub's key gets claims out of it.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    assert!(
        authority().verify(text).is_err(),
        "a token the fuzzer wrote was accepted"
    );
}

/// `hub verify` on an export: the manifest is untrusted (it came with the bundle). Files it
/// names are served from memory; the verifier must report, never panic or accept.
pub fn export_manifest(data: &[u8]) {
    static SIGNER: OnceLock<hub::evidence::keys::Signer> = OnceLock::new();
    let signer = SIGNER.get_or_init(|| {
        let pem = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .expect("generating an Ed25519 key")
            .serialize_pem();
        hub::evidence::keys::Signer::from_pem(&pem).expect("a fresh key loads")
    });
    let report = hub::evidence::verify::verify_manifest(data, "", &signer.verifier(), |name| {
        if name.len() % 3 == 0 {
            Err(std::io::Error::from(std::io::ErrorKind::NotFound))
        } else {
            Ok(name.as_bytes().repeat(4))
        }
    });
    assert!(!report.ok(), "an unsigned manifest verified");
}

/// An SDP offer (WHIP, WHEP, a console's answer) through the parser the hub hands it to,
/// and a trickle/restart fragment (WHIP PATCH) through the hub's own parser.
pub fn sdp(data: &[u8]) {
    use hub::whip::patch;

    if let Ok(frag) = patch::SdpFrag::parse(data) {
        let _ = frag.ice_candidates().count();
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = patch::attribute(text, "ice-ufrag");
    let _ = patch::answer_frag(text);
    let _ = patch::restart_offer(text, "ufrag", "pwd");
    if let Ok(offer) = rtc::peer_connection::sdp::RTCSessionDescription::offer(text.to_string()) {
        let _ = offer.unmarshal();
    }
}

/// Decodes a value from the fuzzer's bytes, or nothing when they have run out (arbitrary
/// itself would go on giving zeros, and an operation loop would never end).
fn take<'a, T: Arbitrary<'a>>(u: &mut Unstructured<'a>) -> Option<T> {
    if u.is_empty() {
        return None;
    }
    T::arbitrary(u).ok()
}
