//! Fragmented MP4 for evidence, sans-IO: H.264 (Annex-B access units) or VP8 (`vp08`, as
//! the VP codec ISO media binding has it) and Opus frames in,
//! an init segment and GOP-aligned media segments (moof + mdat) out. The boxes are built
//! with `mp4-atom`; the sample data is passed through as `Bytes`, not copied into boxes.
//!
//! Segments start at a keyframe and close at the first keyframe after the target duration.
//! Times: a recording's decode timeline starts at 0 and advances by each sample's duration,
//! measured between capture timestamps (so a skipped or late frame stretches its
//! predecessor rather than shifting everything after it). A new recording (and init segment)
//! begins when the video's parameter sets (VP8: its picture size) change.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};
use mp4_atom::{
    Audio, Avc1, Avcc, Dinf, Dops, Dref, Encode, Ftyp, Hdlr, Matrix, Mdhd, Mdia, Mfhd, Minf, Moof,
    Moov, Mvex, Mvhd, Opus, Smhd, Stbl, Stco, Stsc, Stsd, Stsz, Stts, Tfdt, Tfhd, Tkhd, Traf, Trak,
    Trex, Trun, TrunEntry, TrunSamples, Url, Visual, Vmhd, Vp08, VpcC,
};

pub use crate::codec::VideoCodec;
use crate::codec::vp8_keyframe_size;

pub const VIDEO_TRACK: u32 = 1;
pub const AUDIO_TRACK: u32 = 2;
pub const VIDEO_TIMESCALE: u64 = 90_000;
pub const AUDIO_TIMESCALE: u64 = 48_000;

/// Sample flags (ISO/IEC 14496-12 8.8.3.1): a sync sample, and a sample that depends on
/// others and is not a sync sample.
const FLAGS_SYNC: u32 = 0x0200_0000;
const FLAGS_DEPENDENT: u32 = 0x0101_0000;
/// A keyframe this long after the frame before it is taken for a step of the capture
/// clock, not a stall: a unit whose frames stop this long has gone offline, or its frames
/// come later as backfill.
const CLOCK_STEP_US: u64 = 10_000_000;

#[derive(Debug, thiserror::Error)]
pub enum SegmenterError {
    #[error("building MP4 boxes: {0}")]
    Mp4(#[from] mp4_atom::Error),
}

#[derive(Clone, Copy, Debug)]
pub struct SegmenterConfig {
    /// Segments close at the first keyframe after this much media.
    pub target_us: u64,
    pub width: u16,
    pub height: u16,
    pub audio: bool,
    pub video: VideoCodec,
}

/// What a recording's init segment is made from; a change begins a new recording.
#[derive(Clone, Debug, PartialEq)]
enum Params {
    H264 { sps: Bytes, pps: Bytes },
    Vp8 { width: u16, height: u16 },
}

impl Params {
    /// From a keyframe; None if it does not carry them.
    fn of(codec: VideoCodec, frame: &[u8]) -> Option<Self> {
        match codec {
            VideoCodec::H264 => parameter_sets(frame).map(|(sps, pps)| Params::H264 { sps, pps }),
            VideoCodec::Vp8 => {
                vp8_keyframe_size(frame).map(|(width, height)| Params::Vp8 { width, height })
            }
        }
    }
}

/// A recording begins: its init segment (ftyp + moov).
#[derive(Clone, Debug)]
pub struct Init {
    pub data: Bytes,
    /// RFC 6381 codecs, e.g. `avc1.42c01e,opus` (for MSE: `video/mp4; codecs="…"`).
    pub codecs: String,
    /// Capture time (device clock, µs) of the recording's first keyframe.
    pub start_us: u64,
}

/// One media segment (moof + mdat), GOP-aligned.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Within its recording, from 1.
    pub sequence: u32,
    /// The file's bytes, in order.
    pub chunks: Vec<Bytes>,
    pub bytes: u64,
    /// Capture times (device clock, µs): of the first video frame, and the end of the last.
    pub start_us: u64,
    pub end_us: u64,
    /// Decode time of the first video sample and the video duration, at 90 kHz.
    pub media_start: u64,
    pub media_duration: u64,
    pub video_frames: u32,
    pub audio_frames: u32,
}

#[derive(Clone, Debug)]
pub enum Output {
    Init(Init),
    Segment(Segment),
}

struct Sample {
    data: Bytes,
    timestamp_us: u64,
    duration_us: u32,
    keyframe: bool,
}

/// The NAL units of an Annex-B access unit (without their start codes).
pub fn annexb_nals(au: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= au.len() {
        if au[i] == 0 && au[i + 1] == 0 && au[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let ends: Vec<usize> = starts
        .iter()
        .skip(1)
        .map(|&s| {
            // Back over the start code and a leading zero of a four-byte one.
            let mut e = s - 3;
            while e > 0 && au[e - 1] == 0 {
                e -= 1;
            }
            e
        })
        .chain(std::iter::once(au.len()))
        .collect();
    starts
        .into_iter()
        .zip(ends)
        .filter(|(s, e)| e > s)
        .map(move |(s, e)| &au[s..e])
}

fn nal_type(nal: &[u8]) -> u8 {
    nal.first().map(|b| b & 0x1f).unwrap_or(0)
}

/// Annex-B → length-prefixed NAL units (the MP4 sample format), without parameter sets and
/// access unit delimiters (they live in the init segment).
fn to_avcc(au: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(au.len() + 16);
    for nal in annexb_nals(au) {
        if matches!(nal_type(nal), 7..=9) {
            continue;
        }
        out.put_u32(nal.len() as u32);
        out.put_slice(nal);
    }
    out.freeze()
}

fn parameter_sets(au: &[u8]) -> Option<(Bytes, Bytes)> {
    let mut sps = None;
    let mut pps = None;
    for nal in annexb_nals(au) {
        match nal_type(nal) {
            7 if sps.is_none() => sps = Some(Bytes::copy_from_slice(nal)),
            8 if pps.is_none() => pps = Some(Bytes::copy_from_slice(nal)),
            _ => {}
        }
    }
    Some((sps?, pps?))
}

fn matrix() -> Matrix {
    Matrix {
        a: 0x0001_0000,
        b: 0,
        u: 0,
        c: 0,
        d: 0x0001_0000,
        v: 0,
        x: 0,
        y: 0,
        w: 0x4000_0000,
    }
}

fn empty_stbl(codec: mp4_atom::Codec) -> Stbl {
    Stbl {
        stsd: Stsd {
            codecs: vec![codec],
        },
        stts: Stts::default(),
        stsc: Stsc::default(),
        stsz: Stsz::default(),
        stco: Some(Stco::default()),
        ..Default::default()
    }
}

fn visual(width: u16, height: u16) -> Visual {
    Visual {
        data_reference_index: 1,
        width,
        height,
        horizresolution: 72.into(),
        vertresolution: 72.into(),
        frame_count: 1,
        compressor: "".into(),
        depth: 24,
    }
}

/// The sample entry and its RFC 6381 codec string.
fn video_entry(config: &SegmenterConfig, params: &Params) -> (mp4_atom::Codec, String, u16, u16) {
    match params {
        Params::H264 { sps, pps } => {
            let (profile, compat, level) = (
                sps.get(1).copied().unwrap_or(66),
                sps.get(2).copied().unwrap_or(0),
                sps.get(3).copied().unwrap_or(31),
            );
            let entry = Avc1 {
                visual: visual(config.width, config.height),
                avcc: Avcc {
                    configuration_version: 1,
                    avc_profile_indication: profile,
                    profile_compatibility: compat,
                    avc_level_indication: level,
                    length_size: 4,
                    sequence_parameter_sets: vec![sps.to_vec()],
                    picture_parameter_sets: vec![pps.to_vec()],
                    ext: None,
                },
                ..Default::default()
            };
            (
                entry.into(),
                format!("avc1.{profile:02x}{compat:02x}{level:02x}"),
                config.width,
                config.height,
            )
        }
        Params::Vp8 { width, height } => {
            let entry = Vp08 {
                visual: visual(*width, *height),
                vpcc: VpcC {
                    // VP8 has one profile family; level 1.0 ("10") is what browsers write.
                    profile: 0,
                    level: 10,
                    bit_depth: 8,
                    chroma_subsampling: 1,
                    ..Default::default()
                },
                ..Default::default()
            };
            (entry.into(), "vp08.00.10.08".into(), *width, *height)
        }
    }
}

fn init_segment(
    config: &SegmenterConfig,
    params: &Params,
    start_us: u64,
) -> Result<Init, SegmenterError> {
    let (entry, video_codecs, width, height) = video_entry(config, params);
    let video = Trak {
        tkhd: Tkhd {
            track_id: VIDEO_TRACK,
            enabled: true,
            in_movie: true,
            matrix: matrix(),
            width: width.into(),
            height: height.into(),
            ..Default::default()
        },
        mdia: Mdia {
            mdhd: Mdhd {
                timescale: VIDEO_TIMESCALE as u32,
                language: "und".into(),
                ..Default::default()
            },
            hdlr: Hdlr {
                handler: b"vide".into(),
                name: "Tianwang video".into(),
            },
            minf: Minf {
                vmhd: Some(Vmhd::default()),
                dinf: Dinf {
                    dref: Dref {
                        entries: vec![Url::default().into()],
                    },
                },
                stbl: empty_stbl(entry),
                ..Default::default()
            },
        },
        ..Default::default()
    };
    let mut traks = vec![video];
    let mut trex = vec![Trex {
        track_id: VIDEO_TRACK,
        default_sample_description_index: 1,
        ..Default::default()
    }];
    if config.audio {
        traks.push(Trak {
            tkhd: Tkhd {
                track_id: AUDIO_TRACK,
                enabled: true,
                in_movie: true,
                alternate_group: 1,
                volume: 1.into(),
                matrix: matrix(),
                ..Default::default()
            },
            mdia: Mdia {
                mdhd: Mdhd {
                    timescale: AUDIO_TIMESCALE as u32,
                    language: "und".into(),
                    ..Default::default()
                },
                hdlr: Hdlr {
                    handler: b"soun".into(),
                    name: "Tianwang audio".into(),
                },
                minf: Minf {
                    smhd: Some(Smhd::default()),
                    dinf: Dinf {
                        dref: Dref {
                            entries: vec![Url::default().into()],
                        },
                    },
                    stbl: empty_stbl(
                        Opus {
                            audio: Audio {
                                data_reference_index: 1,
                                channel_count: 1,
                                sample_size: 16,
                                sample_rate: 48_000.into(),
                            },
                            dops: Dops {
                                output_channel_count: 1,
                                pre_skip: 0,
                                input_sample_rate: 48_000,
                                output_gain: 0,
                                channel_mapping: None,
                            },
                            btrt: None,
                        }
                        .into(),
                    ),
                    ..Default::default()
                },
            },
            ..Default::default()
        });
        trex.push(Trex {
            track_id: AUDIO_TRACK,
            default_sample_description_index: 1,
            ..Default::default()
        });
    }
    let moov = Moov {
        mvhd: Mvhd {
            timescale: 1000,
            rate: 1.into(),
            volume: 1.into(),
            matrix: matrix(),
            next_track_id: traks.len() as u32 + 1,
            ..Default::default()
        },
        mvex: Some(Mvex { mehd: None, trex }),
        trak: traks,
        ..Default::default()
    };
    let mut buf = BytesMut::new();
    Ftyp {
        major_brand: b"iso6".into(),
        minor_version: 0,
        compatible_brands: vec![
            b"iso6".into(),
            b"cmfc".into(),
            b"isom".into(),
            b"mp41".into(),
        ],
    }
    .encode(&mut buf)?;
    moov.encode(&mut buf)?;
    let mut codecs = video_codecs;
    if config.audio {
        codecs.push_str(",opus");
    }
    Ok(Init {
        data: buf.freeze(),
        codecs,
        start_us,
    })
}

pub struct Segmenter {
    config: SegmenterConfig,
    parameters: Option<Params>,
    video: Vec<Sample>,
    audio: VecDeque<Sample>,
    video_decode: u64,
    audio_decode: u64,
    /// Capture time of the recording's first keyframe: media time 0.
    start_us: u64,
    sequence: u32,
    outputs: VecDeque<Output>,
}

fn us_to(timescale: u64, us: u64) -> u64 {
    us * timescale / 1_000_000
}

impl Segmenter {
    pub fn new(config: SegmenterConfig) -> Self {
        Self {
            config,
            parameters: None,
            video: Vec::new(),
            audio: VecDeque::new(),
            video_decode: 0,
            audio_decode: 0,
            start_us: 0,
            sequence: 0,
            outputs: VecDeque::new(),
        }
    }

    pub fn poll(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Whether a recording has begun (an init segment went out).
    pub fn is_recording(&self) -> bool {
        self.parameters.is_some()
    }

    /// One video frame: an H.264 access unit (Annex-B) or a VP8 frame. Frames before the
    /// first keyframe are dropped.
    pub fn push_video(
        &mut self,
        au: &[u8],
        timestamp_us: u64,
        duration_us: u32,
        keyframe: bool,
    ) -> Result<(), SegmenterError> {
        if keyframe {
            let buffered_us = self
                .video
                .first()
                .map_or(0, |a| timestamp_us.saturating_sub(a.timestamp_us));
            // The capture clock stepped (back, or forward by more than any stall): the
            // keyframe's time says nothing of where the segment ends, and media time on
            // could not follow capture time. The segment ends with its own last frame and
            // a recording of its own begins, as a change of parameters would.
            let newest = self.video.iter().map(|v| v.timestamp_us).max();
            let stepped = newest.is_some_and(|n| {
                timestamp_us < n || timestamp_us > n.saturating_add(CLOCK_STEP_US)
            });
            let params = Params::of(self.config.video, au)
                .filter(|p| self.parameters.as_ref() != Some(p))
                .or_else(|| self.parameters.clone().filter(|_| stepped));
            if let Some(params) = params {
                let end = self
                    .video
                    .iter()
                    .map(|v| v.timestamp_us + u64::from(v.duration_us.max(1_000)))
                    .max();
                match end {
                    Some(end) if stepped => {
                        self.close(Some(end))?;
                        // Sound left from the time before a step back is not this
                        // recording's either.
                        self.audio.retain(|a| {
                            a.timestamp_us < timestamp_us.saturating_add(CLOCK_STEP_US)
                        });
                    }
                    _ => self.close(Some(timestamp_us))?,
                }
                let init = init_segment(&self.config, &params, timestamp_us)?;
                self.parameters = Some(params);
                self.video_decode = 0;
                self.audio_decode = 0;
                self.start_us = timestamp_us;
                self.sequence = 0;
                // Sound from before the picture has no place in this recording.
                self.audio.retain(|a| a.timestamp_us >= timestamp_us);
                self.outputs.push_back(Output::Init(init));
            } else if buffered_us + u64::from(duration_us) > self.config.target_us {
                // Within a frame of the target counts: a 4 s GOP at 30 fps is 3.99996 s.
                self.close(Some(timestamp_us))?
            }
        }
        if self.parameters.is_none() || (self.video.is_empty() && !keyframe) {
            // Nothing can decode this yet.
            return Ok(());
        }
        self.video.push(Sample {
            data: match self.config.video {
                VideoCodec::H264 => to_avcc(au),
                VideoCodec::Vp8 => Bytes::copy_from_slice(au),
            },
            timestamp_us,
            duration_us,
            keyframe,
        });
        Ok(())
    }

    /// One Opus packet. Packets before the recording's first keyframe are dropped: the
    /// recording's time begins with its picture.
    pub fn push_audio(&mut self, packet: Bytes, timestamp_us: u64, duration_us: u32) {
        if self.config.audio && self.parameters.is_some() && timestamp_us >= self.start_us {
            self.audio.push_back(Sample {
                data: packet,
                timestamp_us,
                duration_us,
                keyframe: true,
            });
        }
    }

    /// Closes the segment under way (end of stream).
    pub fn flush(&mut self) -> Result<(), SegmenterError> {
        self.close(None)
    }

    /// Closes the current segment at `cut_us` (the next keyframe's capture time), or at its
    /// end when flushing.
    fn close(&mut self, cut_us: Option<u64>) -> Result<(), SegmenterError> {
        if self.video.is_empty() {
            return Ok(());
        }
        let video = std::mem::take(&mut self.video);
        // Durations between capture times; the last one up to the cut (or its own). Ticks
        // are taken on the recording's timeline and differenced, so rounding never adds up
        // to drift (33 333 µs is 2 999.97 ticks).
        let start = self.start_us;
        let ticks = |t: u64| us_to(VIDEO_TIMESCALE, t.saturating_sub(start));
        let mut durations = Vec::with_capacity(video.len());
        for (i, s) in video.iter().enumerate() {
            let next = video.get(i + 1).map(|n| n.timestamp_us).or(cut_us);
            let d = match next {
                Some(n) if n > s.timestamp_us && n - s.timestamp_us <= 1_000_000 => {
                    ticks(n) - ticks(s.timestamp_us)
                }
                // A stall longer than a second is not stretched over one frame.
                Some(n) if n > s.timestamp_us => VIDEO_TIMESCALE,
                _ => us_to(VIDEO_TIMESCALE, u64::from(s.duration_us.max(1_000))),
            };
            durations.push(d.max(1) as u32);
        }
        let end_us = match cut_us {
            Some(c) => c,
            None => video
                .iter()
                .map(|s| s.timestamp_us + u64::from(s.duration_us))
                .max()
                .unwrap_or(0),
        };
        let audio: Vec<Sample> = if self.config.audio {
            let mut taken = Vec::new();
            while let Some(a) = self.audio.front() {
                if cut_us.is_some_and(|c| a.timestamp_us >= c) {
                    break;
                }
                if let Some(a) = self.audio.pop_front() {
                    taken.push(a);
                }
            }
            taken
        } else {
            Vec::new()
        };
        self.sequence += 1;
        let media_start = self.video_decode;
        let media_duration: u64 = durations.iter().map(|&d| u64::from(d)).sum();
        let segment = self.fragment(&video, &durations, &audio, media_start)?;
        self.video_decode += media_duration;
        let bytes = segment.iter().map(|c| c.len() as u64).sum();
        self.outputs.push_back(Output::Segment(Segment {
            sequence: self.sequence,
            chunks: segment,
            bytes,
            start_us: video.first().map(|s| s.timestamp_us).unwrap_or(0),
            end_us,
            media_start,
            media_duration,
            video_frames: video.len() as u32,
            audio_frames: audio.len() as u32,
        }));
        Ok(())
    }

    fn fragment(
        &mut self,
        video: &[Sample],
        durations: &[u32],
        audio: &[Sample],
        video_decode: u64,
    ) -> Result<Vec<Bytes>, SegmenterError> {
        let video_bytes: usize = video.iter().map(|s| s.data.len()).sum();
        // Audio's decode time follows its capture time (a lost packet leaves a hole rather
        // than pulling the rest early), never overlapping what came before.
        let audio_decode = audio
            .first()
            .map(|a| {
                us_to(
                    AUDIO_TIMESCALE,
                    a.timestamp_us.saturating_sub(self.start_us),
                )
            })
            .unwrap_or(0)
            .max(self.audio_decode);
        let mut audio_duration = 0u64;
        let audio_entries: Vec<TrunEntry> = audio
            .iter()
            .map(|s| {
                let d = us_to(AUDIO_TIMESCALE, u64::from(s.duration_us.max(1))).max(1) as u32;
                audio_duration += u64::from(d);
                TrunEntry {
                    duration: Some(d),
                    size: Some(s.data.len() as u32),
                    ..Default::default()
                }
            })
            .collect();
        self.audio_decode = audio_decode + audio_duration;
        let video_entries: Vec<TrunEntry> = video
            .iter()
            .zip(durations)
            .map(|(s, &d)| TrunEntry {
                duration: Some(d),
                size: Some(s.data.len() as u32),
                flags: Some(if s.keyframe {
                    FLAGS_SYNC
                } else {
                    FLAGS_DEPENDENT
                }),
                cts: None,
            })
            .collect();
        let build = |video_offset: i32, audio_offset: i32| {
            let mut traf = vec![Traf {
                tfhd: Tfhd {
                    track_id: VIDEO_TRACK,
                    default_base_is_moof: true,
                    ..Default::default()
                },
                tfdt: Some(Tfdt {
                    base_media_decode_time: video_decode,
                }),
                trun: vec![Trun {
                    data_offset: Some(video_offset),
                    samples: TrunSamples::Explicit(video_entries.clone()),
                }],
                ..Default::default()
            }];
            if !audio_entries.is_empty() {
                traf.push(Traf {
                    tfhd: Tfhd {
                        track_id: AUDIO_TRACK,
                        default_base_is_moof: true,
                        ..Default::default()
                    },
                    tfdt: Some(Tfdt {
                        base_media_decode_time: audio_decode,
                    }),
                    trun: vec![Trun {
                        data_offset: Some(audio_offset),
                        samples: TrunSamples::Explicit(audio_entries.clone()),
                    }],
                    ..Default::default()
                });
            }
            Moof {
                mfhd: Mfhd {
                    sequence_number: self.sequence,
                },
                traf,
            }
        };
        // Offsets count from the start of the moof, whose size does not depend on them.
        let mut probe = BytesMut::new();
        build(0, 0).encode(&mut probe)?;
        let data_start = probe.len() + 8;
        let moof = build(data_start as i32, (data_start + video_bytes) as i32);
        let mut head = BytesMut::with_capacity(probe.len() + 8);
        moof.encode(&mut head)?;
        let mdat_len = 8 + video_bytes + audio.iter().map(|s| s.data.len()).sum::<usize>();
        head.put_u32(mdat_len as u32);
        head.put_slice(b"mdat");
        let mut chunks = Vec::with_capacity(1 + video.len() + audio.len());
        chunks.push(head.freeze());
        chunks.extend(video.iter().map(|s| s.data.clone()));
        chunks.extend(audio.iter().map(|s| s.data.clone()));
        Ok(chunks)
    }
}

#[cfg(test)]
#[path = "segmenter_tests.rs"]
mod tests;
