//! Codec knowledge the forwarder needs and nothing more: which codec a MIME type names,
//! whether an RTP payload starts a keyframe (a subscriber may only start, or switch, there),
//! and the picture numbers in VP8 and VP9 payload descriptors (kept continuous per subscriber
//! across simulcast switches).

use bytes::{Bytes, BytesMut};

/// The codecs the SFU forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Opus audio.
    Opus,
    /// VP8 video (RFC 7741).
    Vp8,
    /// VP9 video.
    Vp9,
    /// H.264 video (RFC 6184).
    H264,
    /// AV1 video.
    Av1,
    /// Anything else: forwarded, but never waited on for a keyframe.
    Other,
}

impl Codec {
    /// The codec named by an RTP MIME type such as `video/VP8`.
    pub fn from_mime(mime: &str) -> Self {
        let sub = mime.rsplit('/').next().unwrap_or("");
        match sub.to_ascii_lowercase().as_str() {
            "opus" => Codec::Opus,
            "vp8" => Codec::Vp8,
            "vp9" => Codec::Vp9,
            "h264" => Codec::H264,
            "av1" => Codec::Av1,
            _ => Codec::Other,
        }
    }

    /// Whether a decoder needs a keyframe before it can show anything.
    pub fn needs_keyframe(self) -> bool {
        matches!(self, Codec::Vp8 | Codec::Vp9 | Codec::H264 | Codec::Av1)
    }

    /// Whether this RTP payload is the first packet of a keyframe.
    pub fn is_keyframe_start(self, payload: &[u8]) -> bool {
        match self {
            Codec::Vp8 => vp8_keyframe_start(payload),
            Codec::Vp9 => vp9_keyframe_start(payload),
            Codec::H264 => h264_has_idr(payload),
            Codec::Av1 => av1_new_sequence(payload),
            Codec::Opus | Codec::Other => false,
        }
    }

    /// The picture numbers this payload carries, for codecs whose receivers order frames by them.
    pub fn picture_numbering(self, payload: &[u8]) -> Option<PictureNumbering> {
        let fields = match self {
            Codec::Vp8 => vp8_numbering_fields(payload)?,
            Codec::Vp9 => vp9_numbering_fields(payload)?,
            _ => return None,
        };
        Some(fields.read(payload))
    }

    /// Writes `numbering` into `payload`, a payload of this codec whose descriptor carries the
    /// same fields (any it lacks are left alone).
    pub fn write_picture_numbering(self, payload: &mut [u8], numbering: &PictureNumbering) {
        let fields = match self {
            Codec::Vp8 => vp8_numbering_fields(payload),
            Codec::Vp9 => vp9_numbering_fields(payload),
            _ => None,
        };
        if let Some(fields) = fields {
            fields.write(payload, numbering);
        }
    }
}

/// The payload copies one packet needs. Only subscribers that have switched layers need their
/// own picture numbers (the others share the publisher's payload), and those that switched
/// together (at the same keyframe, from the same layer) share the same numbers: one copy each
/// distinct set, per packet.
#[derive(Debug, Default)]
pub struct RenumberedCopies {
    copies: Vec<(PictureNumbering, Bytes)>,
}

/// How many distinct copies of one packet are kept for sharing. Subscribers that switched
/// together form a few groups; beyond that each gets its own copy, so the search for a match
/// stays short however many subscribers switched apart.
const SHARED_COPIES: usize = 8;

impl RenumberedCopies {
    /// `payload` (of `codec`) carrying `numbering`: made on the first request this packet,
    /// shared after.
    pub fn get(&mut self, codec: Codec, payload: &Bytes, numbering: &PictureNumbering) -> Bytes {
        if let Some((_, copy)) = self.copies.iter().find(|(n, _)| n == numbering) {
            return copy.clone();
        }
        let mut copy = BytesMut::from(&payload[..]);
        codec.write_picture_numbering(&mut copy, numbering);
        let copy = copy.freeze();
        if self.copies.len() < SHARED_COPIES {
            self.copies.push((*numbering, copy.clone()));
        }
        copy
    }

    /// The packet is done: its copies go (the capacity stays).
    pub fn clear(&mut self) {
        self.copies.clear();
    }
}

/// The picture numbers of a VP8 (RFC 7741) or VP9 (RFC 9628) payload descriptor. Each
/// simulcast layer numbers its own pictures, and a browser's reference finder keys frames by
/// these numbers: a subscriber switched from one layer to another must see them continue, or
/// it discards the new layer's frames as old ones (a frozen tile, with packets arriving) until
/// their numbers pass the old layer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PictureNumbering {
    /// PictureID, as wide as the publisher sends it.
    pub picture_id: Option<PictureId>,
    /// TL0PICIDX: the running index of base temporal layer pictures.
    pub tl0_pic_idx: Option<u8>,
    /// VP8's KEYIDX (5 bits): the running index of temporal layer sync points.
    pub key_idx: Option<u8>,
}

/// A PictureID: 7 bits, or 15 when the descriptor's M bit is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PictureId {
    /// The value, below 2^7 or 2^15.
    pub value: u16,
    /// 15 bits wide.
    pub long: bool,
}

impl PictureId {
    /// The largest value plus one: numbers wrap there.
    pub fn modulus(self) -> u16 {
        if self.long {
            1 << 15
        } else {
            1 << 7
        }
    }
}

/// The layout of a payload descriptor: where it keeps its picture numbers (byte offsets into
/// the payload), and where it ends. Each codec's descriptor is walked once, here, for the
/// keyframe checks and the picture numbers alike.
#[derive(Debug, Clone, Copy, Default)]
struct NumberingFields {
    /// Offset of the PictureID and whether it takes two bytes.
    picture_id: Option<(usize, bool)>,
    tl0_pic_idx: Option<usize>,
    key_idx: Option<usize>,
    /// VP9: offset of the layer indices byte.
    layer_indices: Option<usize>,
    /// Offset of the first byte after the descriptor.
    end: usize,
}

impl NumberingFields {
    fn read(&self, payload: &[u8]) -> PictureNumbering {
        PictureNumbering {
            picture_id: self.picture_id.map(|(at, long)| PictureId {
                value: if long {
                    u16::from_be_bytes([payload[at] & 0x7f, payload[at + 1]])
                } else {
                    u16::from(payload[at] & 0x7f)
                },
                long,
            }),
            tl0_pic_idx: self.tl0_pic_idx.map(|at| payload[at]),
            key_idx: self.key_idx.map(|at| payload[at] & 0x1f),
        }
    }

    fn write(&self, payload: &mut [u8], numbering: &PictureNumbering) {
        if let (Some((at, long)), Some(id)) = (self.picture_id, numbering.picture_id) {
            if long {
                let value = id.value & 0x7fff;
                payload[at] = 0x80 | (value >> 8) as u8;
                payload[at + 1] = value as u8;
            } else {
                payload[at] = (id.value & 0x7f) as u8;
            }
        }
        if let (Some(at), Some(tl0)) = (self.tl0_pic_idx, numbering.tl0_pic_idx) {
            payload[at] = tl0;
        }
        if let (Some(at), Some(key_idx)) = (self.key_idx, numbering.key_idx) {
            payload[at] = (payload[at] & 0xe0) | (key_idx & 0x1f);
        }
    }
}

/// RFC 7741 §4.2: X, then I (PictureID, M for 15 bits), L (TL0PICIDX), T/K (TID|Y|KEYIDX).
fn vp8_numbering_fields(payload: &[u8]) -> Option<NumberingFields> {
    let mut fields = NumberingFields {
        end: 1,
        ..NumberingFields::default()
    };
    if payload.first()? & 0x80 == 0 {
        return Some(fields);
    }
    let ext = *payload.get(1)?;
    let mut offset = 2;
    if ext & 0x80 != 0 {
        let long = payload.get(offset)? & 0x80 != 0;
        fields.picture_id = Some((offset, long));
        offset += if long { 2 } else { 1 };
    }
    if ext & 0x40 != 0 {
        fields.tl0_pic_idx = Some(offset);
        offset += 1;
    }
    if ext & 0x30 != 0 {
        if ext & 0x10 != 0 {
            fields.key_idx = Some(offset);
        }
        offset += 1;
    }
    fields.end = offset;
    // Every field read or written lies inside the payload.
    (offset <= payload.len()).then_some(fields)
}

/// RFC 9628 §4.2: I (PictureID, M for 15 bits), then with L the layer indices, followed in
/// non-flexible mode (F=0) by TL0PICIDX.
fn vp9_numbering_fields(payload: &[u8]) -> Option<NumberingFields> {
    let first = *payload.first()?;
    let mut fields = NumberingFields::default();
    let mut offset = 1;
    if first & 0x80 != 0 {
        let long = payload.get(offset)? & 0x80 != 0;
        fields.picture_id = Some((offset, long));
        offset += if long { 2 } else { 1 };
    }
    let layer_indices = first & 0x20 != 0;
    let flexible = first & 0x10 != 0;
    if layer_indices {
        fields.layer_indices = Some(offset);
        offset += 1;
        if !flexible {
            fields.tl0_pic_idx = Some(offset);
            offset += 1;
        }
    }
    fields.end = offset;
    (offset <= payload.len()).then_some(fields)
}

/// RFC 7741: the payload descriptor, then, on the partition's first packet, the VP8 frame tag
/// whose lowest bit is 0 for a keyframe.
fn vp8_keyframe_start(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let start_of_partition = first & 0x10 != 0;
    let partition_id = first & 0x07;
    if !start_of_partition || partition_id != 0 {
        return false;
    }
    vp8_numbering_fields(payload)
        .and_then(|fields| payload.get(fields.end))
        .is_some_and(|tag| tag & 0x01 == 0)
}

/// VP9 payload descriptor (draft-ietf-payload-vp9): P=0 (not inter-predicted) on the first
/// packet (B=1) of the frame, in the base spatial layer.
fn vp9_keyframe_start(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let inter_picture = first & 0x40 != 0;
    let begins_frame = first & 0x08 != 0;
    if inter_picture || !begins_frame {
        return false;
    }
    let Some(fields) = vp9_numbering_fields(payload) else {
        return false;
    };
    // Spatial id is bits 1..3 of the layer-indices byte; only the base layer starts a picture.
    fields
        .layer_indices
        .is_none_or(|at| (payload[at] >> 1) & 0x07 == 0)
}

/// RFC 6184: an IDR slice (NAL type 5) or SPS (7), alone, in a STAP-A, or starting a FU-A.
fn h264_has_idr(payload: &[u8]) -> bool {
    let Some(&header) = payload.first() else {
        return false;
    };
    let is_key_nal = |nal_type: u8| nal_type == 5 || nal_type == 7;
    match header & 0x1f {
        24 => {
            // STAP-A: 16-bit size, then a NAL unit, repeated.
            let mut offset = 1;
            while offset + 2 < payload.len() {
                let size = u16::from_be_bytes([payload[offset], payload[offset + 1]]) as usize;
                let Some(&nal) = payload.get(offset + 2) else {
                    return false;
                };
                if is_key_nal(nal & 0x1f) {
                    return true;
                }
                offset += 2 + size;
            }
            false
        }
        28 => payload
            .get(1)
            .is_some_and(|fu| fu & 0x80 != 0 && is_key_nal(fu & 0x1f)),
        nal_type => is_key_nal(nal_type),
    }
}

/// AV1 RTP aggregation header: N=1 marks the first packet of a coded video sequence, which
/// is where a decoder can start.
fn av1_new_sequence(payload: &[u8]) -> bool {
    payload.first().is_some_and(|h| h & 0x08 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_types_map_case_insensitively() {
        assert_eq!(Codec::from_mime("video/VP8"), Codec::Vp8);
        assert_eq!(Codec::from_mime("audio/opus"), Codec::Opus);
        assert_eq!(Codec::from_mime("video/H264"), Codec::H264);
        assert_eq!(Codec::from_mime("video/AV1"), Codec::Av1);
        assert_eq!(Codec::from_mime("video/rtx"), Codec::Other);
        assert!(!Codec::Opus.needs_keyframe());
        assert!(Codec::Vp9.needs_keyframe());
    }

    #[test]
    fn vp8_keyframe_start_is_detected_with_and_without_extensions() {
        // S=1, PID=0, no extensions; frame tag bit0 = 0 → keyframe.
        assert!(Codec::Vp8.is_keyframe_start(&[0x10, 0x50, 0x01, 0x00]));
        // Same but an interframe.
        assert!(!Codec::Vp8.is_keyframe_start(&[0x10, 0x51, 0x01, 0x00]));
        // Not the start of the partition.
        assert!(!Codec::Vp8.is_keyframe_start(&[0x00, 0x50]));
        // X=1 with I (15-bit picture id), L and T/K present, then the keyframe tag.
        assert!(Codec::Vp8.is_keyframe_start(&[0x90, 0xf0, 0x81, 0x23, 0x05, 0x20, 0x10]));
        // Truncated descriptors never panic and are not keyframes.
        assert!(!Codec::Vp8.is_keyframe_start(&[0x90, 0xf0, 0x81]));
        assert!(!Codec::Vp8.is_keyframe_start(&[]));
    }

    #[test]
    fn vp8_picture_numbers_are_read_and_written_in_place() {
        // X=1 with I (15-bit picture id 0x1234), L (TL0PICIDX 0x05), T/K (TID 1, Y, KEYIDX 9).
        let mut payload = [0x90, 0xf0, 0x92, 0x34, 0x05, 0x69, 0x9d, 0x01, 0x2a];
        let numbering = Codec::Vp8.picture_numbering(&payload).unwrap();
        assert_eq!(
            numbering,
            PictureNumbering {
                picture_id: Some(PictureId {
                    value: 0x1234,
                    long: true
                }),
                tl0_pic_idx: Some(0x05),
                key_idx: Some(9),
            }
        );
        let renumbered = PictureNumbering {
            picture_id: Some(PictureId {
                value: 0x7ffe,
                long: true,
            }),
            tl0_pic_idx: Some(0xff),
            key_idx: Some(31),
        };
        Codec::Vp8.write_picture_numbering(&mut payload, &renumbered);
        // TID and Y keep their bits; the frame that follows is untouched.
        assert_eq!(
            payload,
            [0x90, 0xf0, 0xff, 0xfe, 0xff, 0x7f, 0x9d, 0x01, 0x2a]
        );
        assert_eq!(Codec::Vp8.picture_numbering(&payload), Some(renumbered));
    }

    #[test]
    fn vp8_short_and_missing_fields() {
        // 7-bit picture id 0x55, nothing else.
        let mut payload = [0x90, 0x80, 0x55, 0x00];
        let numbering = Codec::Vp8.picture_numbering(&payload).unwrap();
        assert_eq!(
            numbering.picture_id,
            Some(PictureId {
                value: 0x55,
                long: false
            })
        );
        assert_eq!(numbering.tl0_pic_idx, None);
        let id = PictureId {
            value: 0x7f,
            long: false,
        };
        Codec::Vp8.write_picture_numbering(
            &mut payload,
            &PictureNumbering {
                picture_id: Some(id),
                tl0_pic_idx: Some(3),
                key_idx: None,
            },
        );
        assert_eq!(payload, [0x90, 0x80, 0x7f, 0x00]);
        // No extension byte: no numbers. Truncated descriptors: none, and no panic.
        assert_eq!(
            Codec::Vp8.picture_numbering(&[0x10, 0x00]),
            Some(PictureNumbering::default())
        );
        assert_eq!(Codec::Vp8.picture_numbering(&[0x90, 0xc0, 0x81]), None);
        assert_eq!(Codec::Vp8.picture_numbering(&[0x90]), None);
        assert_eq!(Codec::Vp8.picture_numbering(&[]), None);
        assert_eq!(Codec::Opus.picture_numbering(&[0x90, 0x80, 0x55]), None);
    }

    #[test]
    fn subscribers_with_the_same_numbers_share_one_copy() {
        let payload = Bytes::from_static(&[0x90, 0x80, 0x81, 0x00, 0x10]);
        let numbering = |value| PictureNumbering {
            picture_id: Some(PictureId { value, long: true }),
            ..PictureNumbering::default()
        };
        let mut copies = RenumberedCopies::default();
        let a = copies.get(Codec::Vp8, &payload, &numbering(7));
        let b = copies.get(Codec::Vp8, &payload, &numbering(7));
        let c = copies.get(Codec::Vp8, &payload, &numbering(9));
        assert_eq!(&a[..], &[0x90, 0x80, 0x80, 0x07, 0x10]);
        assert_eq!(a.as_ptr(), b.as_ptr(), "the same numbers share one copy");
        assert_eq!(&c[..], &[0x90, 0x80, 0x80, 0x09, 0x10]);
        assert_eq!(
            &payload[..],
            &[0x90, 0x80, 0x81, 0x00, 0x10],
            "the original is untouched"
        );
        copies.clear();
        let d = copies.get(Codec::Vp8, &payload, &numbering(7));
        assert_ne!(a.as_ptr(), d.as_ptr(), "each packet has its own copies");
    }

    #[test]
    fn vp9_picture_numbers_in_non_flexible_mode() {
        // I, L, B set (F=0): 15-bit picture id 0x0102, layer indices, TL0PICIDX 7.
        let mut payload = [0xa8, 0x81, 0x02, 0x00, 0x07, 0xaa];
        let numbering = Codec::Vp9.picture_numbering(&payload).unwrap();
        assert_eq!(numbering.picture_id.map(|p| p.value), Some(0x0102));
        assert_eq!(numbering.tl0_pic_idx, Some(7));
        let renumbered = PictureNumbering {
            picture_id: Some(PictureId {
                value: 0x0300,
                long: true,
            }),
            tl0_pic_idx: Some(8),
            key_idx: None,
        };
        Codec::Vp9.write_picture_numbering(&mut payload, &renumbered);
        assert_eq!(payload, [0xa8, 0x83, 0x00, 0x00, 0x08, 0xaa]);
        // Flexible mode (F=1) has no TL0PICIDX.
        let flexible = Codec::Vp9
            .picture_numbering(&[0xb8, 0x05, 0x00, 0x01])
            .unwrap();
        assert_eq!(flexible.tl0_pic_idx, None);
        assert_eq!(flexible.picture_id.map(|p| p.value), Some(5));
    }

    #[test]
    fn vp9_h264_av1_keyframes() {
        // VP9: B=1, P=0, no layer indices.
        assert!(Codec::Vp9.is_keyframe_start(&[0x08, 0x00]));
        // VP9: P=1 → inter frame.
        assert!(!Codec::Vp9.is_keyframe_start(&[0x48, 0x00]));
        // VP9 with I (7-bit pid) and L (then TL0PICIDX), spatial id 1 → not a picture start we
        // can switch on; spatial id 0 → one; a descriptor cut short → none.
        assert!(!Codec::Vp9.is_keyframe_start(&[0xa8, 0x01, 0x02, 0x05]));
        assert!(Codec::Vp9.is_keyframe_start(&[0xa8, 0x01, 0x00, 0x05]));
        assert!(!Codec::Vp9.is_keyframe_start(&[0xa8, 0x01, 0x00]));
        // H264: a single IDR NAL, an SPS in a STAP-A, an FU-A start of IDR, a P slice.
        assert!(Codec::H264.is_keyframe_start(&[0x65, 0x88]));
        assert!(Codec::H264.is_keyframe_start(&[0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x01, 0x68]));
        assert!(Codec::H264.is_keyframe_start(&[0x7c, 0x85, 0x00]));
        assert!(!Codec::H264.is_keyframe_start(&[0x7c, 0x05, 0x00]));
        assert!(!Codec::H264.is_keyframe_start(&[0x41, 0x9a]));
        // AV1: N bit.
        assert!(Codec::Av1.is_keyframe_start(&[0x18]));
        assert!(!Codec::Av1.is_keyframe_start(&[0x10]));
    }
}
