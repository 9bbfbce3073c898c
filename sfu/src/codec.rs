//! Codec knowledge the forwarder needs and nothing more: which codec a MIME type names, and
//! whether an RTP payload starts a keyframe (a subscriber may only start, or switch, there).

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
}

/// RFC 7741: the payload descriptor, then, on the partition's first packet, the VP8 frame tag
/// whose lowest bit is 0 for a keyframe.
fn vp8_keyframe_start(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    let extended = first & 0x80 != 0;
    let start_of_partition = first & 0x10 != 0;
    let partition_id = first & 0x07;
    if !start_of_partition || partition_id != 0 {
        return false;
    }
    let mut offset = 1;
    if extended {
        let Some(&ext) = payload.get(offset) else {
            return false;
        };
        offset += 1;
        if ext & 0x80 != 0 {
            // PictureID: 7 or 15 bits.
            let Some(&pid) = payload.get(offset) else {
                return false;
            };
            offset += if pid & 0x80 != 0 { 2 } else { 1 };
        }
        if ext & 0x40 != 0 {
            offset += 1; // TL0PICIDX
        }
        if ext & 0x30 != 0 {
            offset += 1; // TID/Y/KEYIDX
        }
    }
    payload.get(offset).is_some_and(|tag| tag & 0x01 == 0)
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
    let has_layer_indices = first & 0x20 != 0;
    if !has_layer_indices {
        return true;
    }
    let picture_id_present = first & 0x80 != 0;
    let mut offset = 1;
    if picture_id_present {
        let Some(&pid) = payload.get(offset) else {
            return false;
        };
        offset += if pid & 0x80 != 0 { 2 } else { 1 };
    }
    // Spatial id is bits 1..3 of the layer-indices byte; only the base layer starts a picture.
    payload.get(offset).is_some_and(|l| (l >> 1) & 0x07 == 0)
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
    fn vp9_h264_av1_keyframes() {
        // VP9: B=1, P=0, no layer indices.
        assert!(Codec::Vp9.is_keyframe_start(&[0x08, 0x00]));
        // VP9: P=1 → inter frame.
        assert!(!Codec::Vp9.is_keyframe_start(&[0x48, 0x00]));
        // VP9 with I (7-bit pid) and L, spatial id 1 → not a picture start we can switch on.
        assert!(!Codec::Vp9.is_keyframe_start(&[0xa8, 0x01, 0x02]));
        assert!(Codec::Vp9.is_keyframe_start(&[0xa8, 0x01, 0x00]));
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
