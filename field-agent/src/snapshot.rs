//! SNAPSHOT: the newest group's H.264 access units decoded to a JPEG of its last picture
//! (appsrc → h264parse → avdec_h264 → videoconvert → jpegenc). The encoder is not touched:
//! the picture is what the hub would show.

use std::time::Duration;

use bytes::Bytes;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use crate::directives::DirectiveError;

/// A decoded picture, as a JPEG.
#[derive(Clone, Debug)]
pub struct Picture {
    pub jpeg: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// How long decoding one group may take before the snapshot fails.
const DECODE_DEADLINE: Duration = Duration::from_secs(20);

/// Decodes `access_units` (Annex-B, keyframe first) and returns the last picture as a JPEG.
/// Blocking: run it off the async runtime.
pub fn jpeg_from_h264(access_units: &[Bytes]) -> Result<Picture, DirectiveError> {
    let media = |m: String| DirectiveError::Media(m);
    if access_units.is_empty() {
        return Err(media(
            "no picture yet: the encoder has not made a keyframe".into(),
        ));
    }
    gst::init().map_err(|e| media(format!("initialising GStreamer: {e}")))?;
    let description = "appsrc name=src format=time \
         caps=video/x-h264,stream-format=byte-stream,alignment=au \
         ! h264parse ! avdec_h264 ! videoconvert ! jpegenc quality=85 \
         ! appsink name=jpeg sync=false max-buffers=1 drop=true wait-on-eos=false";
    let pipeline = gst::parse::launch(description)
        .map_err(|e| media(format!("building the snapshot pipeline: {e}")))?
        .downcast::<gst::Pipeline>()
        .map_err(|_| media("the snapshot launch line is not a pipeline".into()))?;
    let result = decode(&pipeline, access_units);
    let _ = pipeline.set_state(gst::State::Null);
    result
}

fn decode(pipeline: &gst::Pipeline, access_units: &[Bytes]) -> Result<Picture, DirectiveError> {
    let media = |m: String| DirectiveError::Media(m);
    let src = pipeline
        .by_name("src")
        .and_then(|e| e.downcast::<gst_app::AppSrc>().ok())
        .ok_or_else(|| media("snapshot pipeline lacks its appsrc".into()))?;
    let sink = pipeline
        .by_name("jpeg")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or_else(|| media("snapshot pipeline lacks its appsink".into()))?;
    pipeline
        .set_state(gst::State::Playing)
        .map_err(|e| media(format!("starting the snapshot decoder: {e}")))?;
    // The decoder wants timestamps; any steady ones do.
    let step = gst::ClockTime::from_mseconds(33);
    for (i, au) in access_units.iter().enumerate() {
        let mut buffer = gst::Buffer::from_slice(au.clone());
        if let Some(b) = buffer.get_mut() {
            b.set_pts(step * i as u64);
            b.set_duration(step);
        }
        src.push_buffer(buffer)
            .map_err(|e| media(format!("feeding the snapshot decoder: {e:?}")))?;
    }
    src.end_of_stream()
        .map_err(|e| media(format!("ending the snapshot input: {e:?}")))?;

    // The sink keeps only the newest JPEG (and does not hold the end of the stream back
    // until it is pulled); the bus says when the last one is in.
    let bus = pipeline
        .bus()
        .ok_or_else(|| media("the snapshot pipeline has no bus".into()))?;
    let ended = bus.timed_pop_filtered(
        gst::ClockTime::from_nseconds(DECODE_DEADLINE.as_nanos() as u64),
        &[gst::MessageType::Eos, gst::MessageType::Error],
    );
    match ended.as_ref().map(|m| m.view()) {
        Some(gst::MessageView::Eos(_)) => {}
        Some(gst::MessageView::Error(e)) => {
            return Err(media(format!("decoding the picture failed: {}", e.error())));
        }
        _ => return Err(media("decoding the picture took too long".into())),
    }
    let sample = sink
        .try_pull_sample(gst::ClockTime::ZERO)
        .ok_or_else(|| media("the decoder made no picture".into()))?;
    let (width, height) = sample
        .caps()
        .and_then(|c| c.structure(0))
        .and_then(|s| Some((s.get::<i32>("width").ok()?, s.get::<i32>("height").ok()?)))
        .map(|(w, h)| (w.max(0) as u32, h.max(0) as u32))
        .unwrap_or((0, 0));
    let buffer = sample
        .buffer()
        .ok_or_else(|| media("the JPEG sample has no buffer".into()))?;
    let map = buffer
        .map_readable()
        .map_err(|_| media("the JPEG buffer is not readable".into()))?;
    Ok(Picture {
        jpeg: map.to_vec(),
        width,
        height,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::EncodeSettings;

    #[test]
    fn a_group_of_encoded_h264_becomes_a_jpeg_of_its_size() {
        let settings = EncodeSettings {
            width: 320,
            height: 180,
            framerate: 10,
            bitrate: 500,
            keyframe_interval: 10,
        };
        let clip = crate::simulate::encode_clip(&settings, 1).expect("encode a clip");
        let group: Vec<Bytes> = clip.video.iter().map(|f| f.payload.clone()).collect();
        let picture = jpeg_from_h264(&group).expect("a picture");
        assert!(picture.jpeg.starts_with(&[0xFF, 0xD8]), "JPEG SOI");
        assert_eq!((picture.width, picture.height), (320, 180));
    }

    #[test]
    fn no_group_no_picture() {
        assert!(matches!(jpeg_from_h264(&[]), Err(DirectiveError::Media(_))));
        let garbage = [Bytes::from_static(&[0, 0, 0, 1, 0x65, 1, 2, 3])];
        assert!(jpeg_from_h264(&garbage).is_err());
    }
}
