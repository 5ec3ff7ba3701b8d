//! H.264 access units into RTP payloads, as a console tile's video pump does for every frame
//! (`console/media.rs`): the payloader its track's codec gives (`RTCRtpCodec::payloader()`,
//! webrtc-rs's `H264Payloader`) at the pump's budget (`console::media::MTU`). A keyframe of
//! about 40 KB carrying SPS and PPS (the agents repeat them at every IDR) and a 5 KB delta.
//! Throughput counts RTP payloads, so time per packet = time per access unit / packets.
//! Only the payloader: RTP headers, `write_rtp`'s interceptors and SRTP come after it.
//! Run: cargo bench -p hub --bench rtp
use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use hub::console::media::MTU;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_H264;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;

#[path = "../core/benches/support/nal.rs"]
mod nal;
use nal::{PPS, SPS, START, slice};

fn access_unit(nals: &[&[u8]]) -> Bytes {
    let mut au = Vec::new();
    for nal in nals {
        au.extend_from_slice(&START);
        au.extend_from_slice(nal);
    }
    Bytes::from(au)
}

fn packetize(c: &mut Criterion) {
    let codec = RTCRtpCodec {
        mime_type: MIME_TYPE_H264.into(),
        clock_rate: 90_000,
        ..Default::default()
    };
    let keyframe = access_unit(&[SPS, PPS, &slice(0x65, 40_000, 1)]);
    let delta = access_unit(&[&slice(0x41, 5_000, 2)]);
    let mut group = c.benchmark_group("h264_payload");
    for (name, au) in [("keyframe_40k", keyframe), ("delta_5k", delta)] {
        // One payloader per pump, kept across frames (it holds SPS/PPS for the next IDR).
        let mut payloader = codec.payloader().expect("webrtc-rs has an H.264 payloader");
        let packets = payloader
            .payload(MTU, &au)
            .expect("a well-formed access unit packetizes")
            .len();
        group.throughput(Throughput::Elements(packets as u64));
        group.bench_function(name, |b| {
            b.iter(|| black_box(payloader.payload(MTU, black_box(&au))));
        });
    }
    group.finish();
}

criterion_group!(benches, packetize);
criterion_main!(benches);
