//! The QUIC wire format, sans-IO: bytes in, messages and frames out.
//!
//! Every unit on a stream is prefixed by its length as a protobuf varint: control messages,
//! group headers, frame headers and frame payloads. Decoders take the bytes received so far
//! and either return one item (consuming its bytes), ask for more, or fail with a reason that
//! the caller gives the peer when it closes the connection. docs/protocol.md is the prose
//! version.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;

use crate::v1::{FrameHeader, GroupHeader};

/// ALPN of the QUIC connection.
pub const ALPN: &[u8] = b"tianwang/1";
/// Hello.protocol_version this code speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Control messages are small; a larger one is an attack or a bug.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;
/// A group header is two integers.
pub const MAX_GROUP_HEADER: usize = 64;
/// A frame header is two integers.
pub const MAX_FRAME_HEADER: usize = 64;
/// Default bound on one frame's payload (a 4K keyframe fits well inside).
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("malformed length prefix (varint longer than 10 bytes)")]
    BadVarint,
    #[error("{what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: usize,
    },
    #[error("{what} does not decode: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: prost::DecodeError,
    },
    #[error("frame with an empty payload")]
    EmptyFrame,
}

/// The outcome of a decode attempt on a partial buffer.
#[derive(Debug)]
pub enum Progress<T> {
    Done(T),
    /// Not enough bytes yet: the item needs at least this many bytes in the buffer in all
    /// (a lower bound while its length prefix is still incomplete).
    Need(usize),
}

/// Reads a varint at the front of `buf` without consuming it: the value and its length, or
/// `None` when the buffer ends before the varint does.
pub fn peek_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, WireError> {
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().take(10).enumerate() {
        if i == 9 && b > 1 {
            return Err(WireError::BadVarint);
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 10 {
        return Err(WireError::BadVarint);
    }
    Ok(None)
}

/// Decodes one length-delimited message from the front of `buf`.
pub fn decode_delimited<M: Message + Default>(
    buf: &mut BytesMut,
    what: &'static str,
    max: usize,
) -> Result<Progress<M>, WireError> {
    let Some((len, n)) = peek_varint(buf)? else {
        return Ok(Progress::Need(buf.len() + 1));
    };
    if len > max as u64 {
        return Err(WireError::TooLarge { what, len, max });
    }
    // len <= max, so it fits in usize.
    let total = n + len as usize;
    if buf.len() < total {
        return Ok(Progress::Need(total));
    }
    buf.advance(n);
    let body = buf.split_to(len as usize);
    M::decode(body)
        .map(Progress::Done)
        .map_err(|source| WireError::Decode { what, source })
}

/// Appends `msg` with its length prefix.
pub fn encode_delimited<M: Message>(msg: &M, out: &mut BytesMut) {
    let len = msg.encoded_len();
    out.reserve(len + 10);
    // Cannot fail: the buffer was reserved above and BytesMut grows anyway.
    let _ = msg.encode_length_delimited(out);
}

/// Decodes a group stream's header.
pub fn decode_group_header(buf: &mut BytesMut) -> Result<Progress<GroupHeader>, WireError> {
    decode_delimited(buf, "group header", MAX_GROUP_HEADER)
}

/// One frame as it travelled: `encoded` holds the whole frame (both length prefixes, the
/// header and the payload) so a relay forwards it verbatim, without re-encoding.
#[derive(Debug, Clone)]
pub struct WireFrame {
    pub header: FrameHeader,
    pub encoded: Bytes,
    pub payload_offset: usize,
}

impl WireFrame {
    pub fn payload(&self) -> &[u8] {
        &self.encoded[self.payload_offset..]
    }
}

/// Decodes one frame from the front of `buf`, splitting its bytes off without copying.
pub fn decode_frame(
    buf: &mut BytesMut,
    max_payload: usize,
) -> Result<Progress<WireFrame>, WireError> {
    let Some((hlen, n1)) = peek_varint(buf)? else {
        return Ok(Progress::Need(buf.len() + 1));
    };
    if hlen > MAX_FRAME_HEADER as u64 {
        return Err(WireError::TooLarge {
            what: "frame header",
            len: hlen,
            max: MAX_FRAME_HEADER,
        });
    }
    let header_end = n1 + hlen as usize;
    if buf.len() < header_end + 1 {
        return Ok(Progress::Need(header_end + 1));
    }
    let Some((plen, n2)) = peek_varint(&buf[header_end..])? else {
        return Ok(Progress::Need(buf.len() + 1));
    };
    if plen > max_payload as u64 {
        return Err(WireError::TooLarge {
            what: "frame",
            len: plen,
            max: max_payload,
        });
    }
    if plen == 0 {
        return Err(WireError::EmptyFrame);
    }
    let payload_offset = header_end + n2;
    let total = payload_offset + plen as usize;
    if buf.len() < total {
        return Ok(Progress::Need(total));
    }
    let header = FrameHeader::decode(&buf[n1..header_end]).map_err(|source| WireError::Decode {
        what: "frame header",
        source,
    })?;
    let encoded = buf.split_to(total).freeze();
    Ok(Progress::Done(WireFrame {
        header,
        encoded,
        payload_offset,
    }))
}

/// The encoded size of a frame, for reserving buffers.
pub fn encoded_frame_len(header: &FrameHeader, payload_len: usize) -> usize {
    let hlen = header.encoded_len();
    prost::length_delimiter_len(hlen)
        + hlen
        + prost::length_delimiter_len(payload_len)
        + payload_len
}

/// Appends one frame: header and payload with their length prefixes.
pub fn encode_frame(header: &FrameHeader, payload: &[u8], out: &mut BytesMut) {
    out.reserve(encoded_frame_len(header, payload.len()));
    let _ = header.encode_length_delimited(out);
    // Cannot fail: BytesMut grows as needed.
    let _ = prost::encode_length_delimiter(payload.len(), out);
    out.put_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::Hello;
    use crate::{ControlMessage, Kind};

    fn frame(ts: u64, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        encode_frame(
            &FrameHeader {
                timestamp_us: ts,
                duration_us: 33_333,
            },
            payload,
            &mut out,
        );
        out
    }

    #[test]
    fn frames_round_trip_and_keep_their_encoding() {
        let mut buf = frame(7, b"abc");
        buf.extend_from_slice(&frame(8, b"defg"));
        let Progress::Done(a) = decode_frame(&mut buf, 100).unwrap() else {
            panic!()
        };
        let Progress::Done(b) = decode_frame(&mut buf, 100).unwrap() else {
            panic!()
        };
        assert_eq!((a.header.timestamp_us, a.payload()), (7, &b"abc"[..]));
        assert_eq!((b.header.timestamp_us, b.payload()), (8, &b"defg"[..]));
        assert_eq!(a.encoded, frame(7, b"abc").freeze());
        assert!(buf.is_empty());
    }

    #[test]
    fn every_split_point_asks_for_more_then_completes() {
        let whole = frame(123_456_789, &[9u8; 300]);
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            match decode_frame(&mut buf, 1000).unwrap() {
                Progress::Need(n) => assert!(n > cut && n <= whole.len(), "cut {cut} need {n}"),
                Progress::Done(_) => panic!("decoded a frame from {cut} of {} bytes", whole.len()),
            }
            assert_eq!(buf.len(), cut, "nothing consumed while incomplete");
        }
    }

    #[test]
    fn oversized_frame_is_refused_before_it_arrives() {
        let mut buf = frame(1, &[0u8; 2000]);
        buf.truncate(buf.len() - 2000);
        let err = decode_frame(&mut buf, 1000).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::TooLarge {
                    what: "frame",
                    len: 2000,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn empty_frame_and_bad_varints_are_errors() {
        let mut buf = frame(1, b"");
        assert!(matches!(
            decode_frame(&mut buf, 10),
            Err(WireError::EmptyFrame)
        ));
        let mut buf = BytesMut::from(&[0xffu8; 11][..]);
        assert!(matches!(
            decode_frame(&mut buf, 10),
            Err(WireError::BadVarint)
        ));
        assert!(matches!(peek_varint(&[0x80; 9]), Ok(None)));
        assert!(matches!(
            peek_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            Err(WireError::BadVarint)
        ));
        assert_eq!(peek_varint(&[0xac, 0x02]).unwrap(), Some((300, 2)));
    }

    #[test]
    fn control_messages_round_trip_and_limits_hold() {
        let msg = ControlMessage::new(Kind::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            unit_id: "bwc-001".into(),
            ..Default::default()
        }));
        let mut buf = BytesMut::new();
        encode_delimited(&msg, &mut buf);
        let Progress::Done(back) =
            decode_delimited::<ControlMessage>(&mut buf, "control message", MAX_CONTROL_MESSAGE)
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(back, msg);

        let mut big = BytesMut::new();
        let _ = prost::encode_length_delimiter(MAX_CONTROL_MESSAGE + 1, &mut big);
        let err =
            decode_delimited::<ControlMessage>(&mut big, "control message", MAX_CONTROL_MESSAGE)
                .unwrap_err();
        assert!(err.to_string().contains("control message"), "{err}");
    }

    #[test]
    fn garbage_of_every_length_never_panics() {
        // A fixed xorshift sequence: replayable, no global RNG.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..512 {
            let mut bytes = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            let mut a = BytesMut::from(&bytes[..]);
            while let Ok(Progress::Done(_)) = decode_frame(&mut a, 1 << 20) {}
            let mut b = BytesMut::from(&bytes[..]);
            while let Ok(Progress::Done(_)) = decode_delimited::<ControlMessage>(&mut b, "c", 4096)
            {
            }
            let mut c = BytesMut::from(&bytes[..]);
            let _ = decode_group_header(&mut c);
        }
    }
}
