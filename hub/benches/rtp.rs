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

const START: [u8; 4] = [0, 0, 0, 1];
const SPS: &[u8] = &[0x67, 0x42, 0xe0, 0x1f, 0xda, 0x02, 0x80, 0xbf];
const PPS: &[u8] = &[0x68, 0xce, 0x3c, 0x80];

/// A slice NAL unit: its header byte, then `len` bytes that look like entropy-coded data to a
/// start-code scanner (the payloader reads every byte): pseudo-random, with emulation
/// prevention, so no start code occurs inside, and a non-zero last byte.
fn slice(header: u8, len: usize, seed: u32) -> Vec<u8> {
    let mut nal = Vec::with_capacity(len + len / 64 + 1);
    nal.push(header);
    let (mut x, mut zeros) = (seed, 0);
    while nal.len() <= len {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let b = (x >> 24) as u8;
        if zeros >= 2 && b <= 3 {
            nal.push(3);
            zeros = 0;
        }
        nal.push(b);
        zeros = if b == 0 { zeros + 1 } else { 0 };
    }
    if let Some(last) = nal.last_mut().filter(|b| **b == 0) {
        *last = 0x80;
    }
    nal
}

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
