//! Synthetic media: VP8 and Opus RTP packet sources whose payloads are well-formed enough for an
//! SFU (VP8 payload descriptor, frame tag, keyframe header; Opus-sized audio) and carry a probe
//! (send time and a per-source counter) so a receiver can measure loss and latency exactly; and
//! the parsers a receiver needs (`parse_probe`, `vp8_is_keyframe`, `parse_vp8_descriptor`).
//!
//! Sources are clocked from outside: the caller passes the current time to every call, so they
//! are deterministic in tests.

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use rtc::rtp;
use signaling::protocol::TrackKind;

/// Bytes of probe in every payload: an 8-byte send time (µs since the UNIX epoch, big endian)
/// then a 4-byte per-source packet counter (big endian).
pub const PROBE_LEN: usize = 12;

/// A video source's probe counter starts at its simulcast layer index shifted this far, so a
/// receiver can tell which layer a packet came from (see [`probe_layer`]); 2^28 packets per
/// layer before the counter would run into the next layer's range is days of video.
pub const PROBE_LAYER_SHIFT: u32 = 28;

/// RTP clock rate of VP8.
pub const VIDEO_CLOCK_RATE: u32 = 90_000;
/// RTP clock rate of Opus.
pub const AUDIO_CLOCK_RATE: u32 = 48_000;
/// Duration of one Opus frame.
pub const AUDIO_FRAME: Duration = Duration::from_millis(20);

/// Length of the VP8 payload descriptor the video source writes (X, I with a 15-bit picture id).
const VP8_DESCRIPTOR_LEN: usize = 4;
/// VP8 frame tag length.
const VP8_FRAME_TAG_LEN: usize = 3;
/// VP8 keyframe header after the tag: start code and 16-bit width and height.
const VP8_KEYFRAME_EXTRA_LEN: usize = 7;

/// Send times outside [2020-01-01, 2100-01-01) are not probes (they protect against reading
/// a real encoder's bytes as one).
const PLAUSIBLE_US: std::ops::Range<u64> = 1_577_836_800_000_000..4_102_444_800_000_000;

/// How the synthetic video source behaves.
#[derive(Debug, Clone)]
pub struct VideoConfig {
    /// Target bitrate of the payloads, bits per second; each frame is `bitrate / fps / 8` bytes.
    pub bitrate_bps: u32,
    /// Frames per second.
    pub fps: u32,
    /// Width written in keyframe headers.
    pub width: u16,
    /// Height written in keyframe headers.
    pub height: u16,
    /// A keyframe at least this often (`None`: only the first and requested ones).
    pub keyframe_interval: Option<Duration>,
    /// Largest RTP payload (descriptor included).
    pub max_payload: usize,
    /// Simulcast layer index, smallest layer 0 (0 for a single stream), carried in the probe
    /// counter's top bits (see [`probe_layer`]).
    pub layer: u8,
}

impl Default for VideoConfig {
    fn default() -> Self {
        VideoConfig {
            bitrate_bps: 500_000,
            fps: 30,
            width: 320,
            height: 240,
            keyframe_interval: Some(Duration::from_secs(2)),
            max_payload: 1100,
            layer: 0,
        }
    }
}

impl VideoConfig {
    /// Bytes of VP8 data per frame for the configured bitrate (at least one packet's worth of
    /// headers and probe).
    pub fn frame_bytes(&self) -> usize {
        let fps = self.fps.max(1) as u64;
        let bytes = (self.bitrate_bps as u64 / fps / 8) as usize;
        bytes.max(VP8_FRAME_TAG_LEN + VP8_KEYFRAME_EXTRA_LEN + PROBE_LEN)
    }

    /// Time between frames.
    pub fn frame_interval(&self) -> Duration {
        Duration::from_micros(1_000_000 / self.fps.max(1) as u64)
    }
}

/// One video frame, packetized.
#[derive(Debug, Clone)]
pub struct VideoFrame {
    /// Its RTP packets, in order; the last has the marker bit.
    pub packets: Vec<rtp::Packet>,
    /// Whether it is a keyframe.
    pub keyframe: bool,
}

/// A synthetic VP8 source producing RTP packets.
#[derive(Debug)]
pub struct VideoSource {
    /// Behaviour.
    config: VideoConfig,
    /// SSRC written on every packet.
    ssrc: u32,
    /// Payload type written on every packet (set once negotiated).
    payload_type: u8,
    /// Next RTP sequence number.
    seq: u16,
    /// RTP timestamp of the first frame.
    ts_base: u32,
    /// Last RTP timestamp offset used, to keep timestamps strictly increasing.
    last_ts_offset: Option<u64>,
    /// When the first frame was made (the origin of the RTP clock).
    start: Option<Instant>,
    /// VP8 picture id (15 bits), one per frame.
    picture_id: u16,
    /// Probe counter of the next packet.
    counter: u32,
    /// A keyframe was asked for (PLI/FIR).
    keyframe_requested: bool,
    /// When the last keyframe was made.
    last_keyframe: Option<Instant>,
    /// Filler generator state.
    rng: u64,
}

impl VideoSource {
    /// A source writing `ssrc` and `payload_type`.
    pub fn new(config: VideoConfig, ssrc: u32, payload_type: u8) -> Self {
        let seed = crate::random_u64() | 1;
        let counter = u32::from(config.layer & 0x0f) << PROBE_LAYER_SHIFT;
        VideoSource {
            config,
            ssrc,
            payload_type,
            seq: (seed >> 16) as u16,
            ts_base: (seed >> 32) as u32,
            last_ts_offset: None,
            start: None,
            picture_id: (seed >> 8) as u16 & 0x7fff,
            counter,
            keyframe_requested: false,
            last_keyframe: None,
            rng: seed,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &VideoConfig {
        &self.config
    }

    /// The SSRC.
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// Changes the payload type (after negotiation).
    pub fn set_payload_type(&mut self, payload_type: u8) {
        self.payload_type = payload_type;
    }

    /// Changes the target bitrate from the next frame on.
    pub fn set_bitrate(&mut self, bitrate_bps: u32) {
        self.config.bitrate_bps = bitrate_bps;
    }

    /// Makes the next frame a keyframe.
    pub fn request_keyframe(&mut self) {
        self.keyframe_requested = true;
    }

    /// When the last keyframe was made.
    pub fn last_keyframe(&self) -> Option<Instant> {
        self.last_keyframe
    }

    /// Whether the next frame made at `now` will be a keyframe.
    pub fn next_is_keyframe(&self, now: Instant) -> bool {
        match self.last_keyframe {
            None => true,
            Some(last) => {
                self.keyframe_requested
                    || self.config.keyframe_interval.is_some_and(|every| {
                        // Half a frame of slack, so a 2 s interval at 30 fps is 60 frames.
                        now.duration_since(last) + self.config.frame_interval() / 2 >= every
                    })
            }
        }
    }

    /// Makes the frame for `now`; `now_us` (µs since the UNIX epoch) goes into the probes.
    pub fn next_frame(&mut self, now: Instant, now_us: u64) -> VideoFrame {
        let keyframe = self.next_is_keyframe(now);
        if keyframe {
            self.keyframe_requested = false;
            self.last_keyframe = Some(now);
        }
        let start = *self.start.get_or_insert(now);
        let offset =
            now.duration_since(start).as_micros() as u64 * VIDEO_CLOCK_RATE as u64 / 1_000_000;
        let offset = match self.last_ts_offset {
            Some(last) if offset <= last => last + 1,
            _ => offset,
        };
        self.last_ts_offset = Some(offset);
        let timestamp = self.ts_base.wrapping_add(offset as u32);

        let frame_bytes = self.config.frame_bytes();
        let header_len = VP8_FRAME_TAG_LEN + if keyframe { VP8_KEYFRAME_EXTRA_LEN } else { 0 };
        let chunk_cap = self
            .config
            .max_payload
            .saturating_sub(VP8_DESCRIPTOR_LEN)
            .max(header_len + PROBE_LEN);
        let count = frame_bytes.div_ceil(chunk_cap).max(1);
        let base = frame_bytes / count;
        let extra = frame_bytes % count;

        let mut packets = Vec::with_capacity(count);
        for index in 0..count {
            let first = index == 0;
            let mut chunk = base + usize::from(index < extra);
            chunk = chunk.max(PROBE_LEN + if first { header_len } else { 0 });
            let mut payload = BytesMut::with_capacity(VP8_DESCRIPTOR_LEN + chunk);
            // RFC 7741 payload descriptor: X, S on the first packet, PID 0; I with M (15 bits).
            payload.put_u8(0x80 | if first { 0x10 } else { 0 });
            payload.put_u8(0x80);
            payload.put_u16(0x8000 | self.picture_id);
            let mut used = 0;
            if first {
                // Frame tag (RFC 6386 §9.1): P (inverse keyframe), version 0, show_frame,
                // first_part_size (19 bits), little endian.
                let first_part = (frame_bytes.min(0x7ffff) as u32) / 2;
                let tag: u32 = (first_part << 5) | (1 << 4) | u32::from(!keyframe);
                payload.put_slice(&tag.to_le_bytes()[..3]);
                if keyframe {
                    payload.put_slice(&[0x9d, 0x01, 0x2a]);
                    payload.put_u16_le(self.config.width & 0x3fff);
                    payload.put_u16_le(self.config.height & 0x3fff);
                }
                used += header_len;
            }
            payload.put_u64(now_us);
            payload.put_u32(self.counter);
            used += PROBE_LEN;
            fill_nonzero(&mut payload, chunk - used, &mut self.rng);

            packets.push(next_rtp_packet(
                &mut self.seq,
                self.ssrc,
                self.payload_type,
                timestamp,
                index + 1 == count,
                payload.freeze(),
            ));
            self.counter = self.counter.wrapping_add(1);
        }
        self.picture_id = (self.picture_id + 1) & 0x7fff;
        VideoFrame { packets, keyframe }
    }
}

/// How the synthetic audio source behaves.
#[derive(Debug, Clone)]
pub struct AudioConfig {
    /// Smallest payload, bytes (at least the probe).
    pub min_payload: usize,
    /// Largest payload, bytes.
    pub max_payload: usize,
}

impl Default for AudioConfig {
    fn default() -> Self {
        AudioConfig {
            min_payload: 60,
            max_payload: 120,
        }
    }
}

/// A synthetic Opus source: one packet per 20 ms.
#[derive(Debug)]
pub struct AudioSource {
    /// Behaviour.
    config: AudioConfig,
    /// SSRC written on every packet.
    ssrc: u32,
    /// Payload type written on every packet.
    payload_type: u8,
    /// Next RTP sequence number.
    seq: u16,
    /// RTP timestamp of the first packet.
    ts_base: u32,
    /// When the first packet was made.
    start: Option<Instant>,
    /// Frame index of the last packet, to keep timestamps strictly increasing.
    last_frame: Option<u64>,
    /// Probe counter of the next packet.
    counter: u32,
    /// Payload size and filler generator state.
    rng: u64,
}

impl AudioSource {
    /// A source writing `ssrc` and `payload_type`.
    pub fn new(config: AudioConfig, ssrc: u32, payload_type: u8) -> Self {
        let seed = crate::random_u64() | 1;
        AudioSource {
            config,
            ssrc,
            payload_type,
            seq: (seed >> 16) as u16,
            ts_base: (seed >> 32) as u32,
            start: None,
            last_frame: None,
            counter: 0,
            rng: seed,
        }
    }

    /// The SSRC.
    pub fn ssrc(&self) -> u32 {
        self.ssrc
    }

    /// Changes the payload type (after negotiation).
    pub fn set_payload_type(&mut self, payload_type: u8) {
        self.payload_type = payload_type;
    }

    /// Makes the packet for `now`; `now_us` goes into the probe.
    pub fn next_packet(&mut self, now: Instant, now_us: u64) -> rtp::Packet {
        let start = *self.start.get_or_insert(now);
        let frame_us = AUDIO_FRAME.as_micros() as u64;
        let elapsed = now.duration_since(start).as_micros() as u64;
        let mut frame = (elapsed + frame_us / 2) / frame_us;
        if let Some(last) = self.last_frame {
            frame = frame.max(last + 1);
        }
        let first = self.last_frame.is_none();
        self.last_frame = Some(frame);
        let samples_per_frame = AUDIO_CLOCK_RATE as u64 * frame_us / 1_000_000;
        let timestamp = self
            .ts_base
            .wrapping_add((frame * samples_per_frame) as u32);

        let min = self.config.min_payload.max(PROBE_LEN);
        let max = self.config.max_payload.max(min);
        let size = min + (xorshift(&mut self.rng) % (max - min + 1) as u64) as usize;
        let mut payload = BytesMut::with_capacity(size);
        payload.put_u64(now_us);
        payload.put_u32(self.counter);
        fill_nonzero(&mut payload, size - PROBE_LEN, &mut self.rng);

        let packet = next_rtp_packet(
            &mut self.seq,
            self.ssrc,
            self.payload_type,
            timestamp,
            // The start of a talk spurt.
            first,
            payload.freeze(),
        );
        self.counter = self.counter.wrapping_add(1);
        packet
    }
}

/// The next RTP packet of a source's stream (version 2, no CSRCs or extensions), numbered `seq`,
/// which it then advances.
pub(crate) fn next_rtp_packet(
    seq: &mut u16,
    ssrc: u32,
    payload_type: u8,
    timestamp: u32,
    marker: bool,
    payload: Bytes,
) -> rtp::Packet {
    let packet = rtp::Packet {
        header: rtp::header::Header {
            version: 2,
            marker,
            payload_type,
            sequence_number: *seq,
            timestamp,
            ssrc,
            ..Default::default()
        },
        payload,
    };
    *seq = seq.wrapping_add(1);
    packet
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// Appends `len` pseudo-random bytes, none of them zero.
fn fill_nonzero(buf: &mut BytesMut, len: usize, rng: &mut u64) {
    let mut left = len;
    while left > 0 {
        let word = xorshift(rng).to_le_bytes();
        for &b in word.iter().take(left) {
            buf.put_u8(if b == 0 { 0x5a } else { b });
        }
        left = left.saturating_sub(8);
    }
}

/// The fields of an RFC 7741 VP8 payload descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Descriptor {
    /// Length of the descriptor in bytes: the VP8 payload starts there.
    pub len: usize,
    /// S: this packet starts a VP8 partition.
    pub start_of_partition: bool,
    /// N: a non-reference frame.
    pub non_reference: bool,
    /// PID: the partition index.
    pub partition_id: u8,
    /// The picture id (7 or 15 bits), if present.
    pub picture_id: Option<u16>,
    /// TL0PICIDX, if present.
    pub tl0_pic_idx: Option<u8>,
    /// The temporal layer index, if present.
    pub tid: Option<u8>,
    /// KEYIDX, if present.
    pub key_idx: Option<u8>,
}

/// Parses the VP8 payload descriptor at the start of `payload` (handles the X, I, L, T and K
/// extensions and the M bit). `None` if the payload is too short for what it announces.
pub fn parse_vp8_descriptor(payload: &[u8]) -> Option<Vp8Descriptor> {
    let b0 = *payload.first()?;
    let mut d = Vp8Descriptor {
        len: 1,
        start_of_partition: b0 & 0x10 != 0,
        non_reference: b0 & 0x20 != 0,
        partition_id: b0 & 0x07,
        picture_id: None,
        tl0_pic_idx: None,
        tid: None,
        key_idx: None,
    };
    if b0 & 0x80 == 0 {
        return Some(d);
    }
    let x = *payload.get(1)?;
    d.len = 2;
    if x & 0x80 != 0 {
        let p0 = *payload.get(d.len)?;
        if p0 & 0x80 != 0 {
            let p1 = *payload.get(d.len + 1)?;
            d.picture_id = Some(u16::from(p0 & 0x7f) << 8 | u16::from(p1));
            d.len += 2;
        } else {
            d.picture_id = Some(u16::from(p0 & 0x7f));
            d.len += 1;
        }
    }
    if x & 0x40 != 0 {
        d.tl0_pic_idx = Some(*payload.get(d.len)?);
        d.len += 1;
    }
    if x & 0x30 != 0 {
        let tk = *payload.get(d.len)?;
        if x & 0x20 != 0 {
            d.tid = Some(tk >> 6);
        }
        if x & 0x10 != 0 {
            d.key_idx = Some(tk & 0x1f);
        }
        d.len += 1;
    }
    Some(d)
}

/// Whether a VP8 RTP payload starts a keyframe: S=1, PID=0, and the frame tag's inverse
/// keyframe bit is 0.
pub fn vp8_is_keyframe(payload: &[u8]) -> bool {
    match parse_vp8_descriptor(payload) {
        Some(d) if d.start_of_partition && d.partition_id == 0 => {
            payload.get(d.len).is_some_and(|tag| tag & 0x01 == 0)
        }
        _ => false,
    }
}

/// The simulcast layer index a video probe counter carries (0 for a single stream).
pub fn probe_layer(counter: u32) -> u8 {
    (counter >> PROBE_LAYER_SHIFT) as u8
}

/// The frame size a VP8 keyframe's first packet announces (RFC 6386 §9.1: after the frame tag,
/// the start code and the 14-bit width and height). `None` for anything else.
pub fn vp8_keyframe_size(payload: &[u8]) -> Option<(u16, u16)> {
    if !vp8_is_keyframe(payload) {
        return None;
    }
    let d = parse_vp8_descriptor(payload)?;
    let start = d.len + VP8_FRAME_TAG_LEN;
    let header = payload.get(start..start + VP8_KEYFRAME_EXTRA_LEN)?;
    if header[..3] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let width = u16::from_le_bytes([header[3], header[4]]) & 0x3fff;
    let height = u16::from_le_bytes([header[5], header[6]]) & 0x3fff;
    Some((width, height))
}

/// Reads the probe of a payload made by [`VideoSource`] or [`AudioSource`]:
/// `(send_time_us, counter)`. `None` if the payload is too short or carries no plausible probe
/// (e.g. a real encoder's output).
pub fn parse_probe(kind: TrackKind, payload: &[u8]) -> Option<(u64, u32)> {
    let offset = match kind {
        TrackKind::Audio => 0,
        TrackKind::Video => {
            let d = parse_vp8_descriptor(payload)?;
            let mut offset = d.len;
            if d.start_of_partition && d.partition_id == 0 {
                let tag = *payload.get(offset)?;
                offset += VP8_FRAME_TAG_LEN;
                if tag & 0x01 == 0 {
                    offset += VP8_KEYFRAME_EXTRA_LEN;
                }
            }
            offset
        }
    };
    let probe = payload.get(offset..offset + PROBE_LEN)?;
    let send_us = u64::from_be_bytes(probe[..8].try_into().ok()?);
    let counter = u32::from_be_bytes(probe[8..].try_into().ok()?);
    PLAUSIBLE_US
        .contains(&send_us)
        .then_some((send_us, counter))
}

/// The 12 probe bytes for `send_us` and `counter`, for callers building their own payloads.
pub fn probe_bytes(send_us: u64, counter: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(PROBE_LEN);
    b.put_u64(send_us);
    b.put_u32(counter);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_US: u64 = 1_750_000_000_000_000;

    #[test]
    fn descriptor_variants_are_parsed() {
        // No extension.
        let d = parse_vp8_descriptor(&[0x10, 0x00]).unwrap();
        assert_eq!((d.len, d.start_of_partition, d.partition_id), (1, true, 0));
        // X with a 7-bit picture id.
        let d = parse_vp8_descriptor(&[0x90, 0x80, 0x25, 0x00]).unwrap();
        assert_eq!((d.len, d.picture_id), (3, Some(0x25)));
        // X with a 15-bit picture id, TL0PICIDX, and T/K.
        let d = parse_vp8_descriptor(&[0x90, 0xf0, 0x81, 0x02, 0x07, 0xa3, 0x00]).unwrap();
        assert_eq!(d.len, 6);
        assert_eq!(d.picture_id, Some(0x0102));
        assert_eq!(d.tl0_pic_idx, Some(7));
        assert_eq!(d.tid, Some(2));
        assert_eq!(d.key_idx, Some(3));
        // Only K (T bit clear) still takes the T/K byte.
        let d = parse_vp8_descriptor(&[0x90, 0x10, 0x05]).unwrap();
        assert_eq!((d.len, d.tid, d.key_idx), (3, None, Some(5)));
        // Truncated.
        assert!(parse_vp8_descriptor(&[]).is_none());
        assert!(parse_vp8_descriptor(&[0x80]).is_none());
        assert!(parse_vp8_descriptor(&[0x90, 0x80, 0x80]).is_none());
    }

    #[test]
    fn keyframe_detection() {
        // Minimal descriptor, S=1 PID=0, keyframe tag (bit 0 clear).
        assert!(vp8_is_keyframe(&[0x10, 0x50, 0x01, 0x00, 0x9d, 0x01, 0x2a]));
        // Same, but an interframe.
        assert!(!vp8_is_keyframe(&[0x10, 0x51, 0x01, 0x00]));
        // S=0: a continuation packet, whatever its bytes look like.
        assert!(!vp8_is_keyframe(&[0x00, 0x50, 0x01, 0x00]));
        // S=1 but PID=1.
        assert!(!vp8_is_keyframe(&[0x11, 0x50, 0x01, 0x00]));
        // Extensions (I with M, L, T) before the tag: a keyframe, then an interframe.
        assert!(vp8_is_keyframe(&[0x90, 0xe0, 0x80, 0x01, 0x03, 0x40, 0x50]));
        assert!(!vp8_is_keyframe(&[
            0x90, 0xe0, 0x80, 0x01, 0x03, 0x40, 0x51
        ]));
        // A 7-bit picture id must not be read as 15 bits.
        assert!(vp8_is_keyframe(&[0x90, 0x80, 0x7f, 0x50]));
        assert!(!vp8_is_keyframe(&[0x90, 0x80, 0x7f, 0x51]));
        // Descriptor but no VP8 payload.
        assert!(!vp8_is_keyframe(&[0x90, 0x80, 0x7f]));
        assert!(!vp8_is_keyframe(&[]));
    }

    #[test]
    fn video_source_frames_are_valid_vp8() {
        let config = VideoConfig::default();
        let mut source = VideoSource::new(config.clone(), 1234, 96);
        let t0 = Instant::now();
        let first = source.next_frame(t0, NOW_US);
        assert!(first.keyframe, "the first frame is a keyframe");
        assert!(vp8_is_keyframe(&first.packets[0].payload));
        let p0 = &first.packets[0].payload;
        let d = parse_vp8_descriptor(p0).unwrap();
        assert_eq!(&p0[d.len + 3..d.len + 6], &[0x9d, 0x01, 0x2a]);
        assert_eq!(u16::from_le_bytes([p0[d.len + 6], p0[d.len + 7]]), 320);
        assert_eq!(u16::from_le_bytes([p0[d.len + 8], p0[d.len + 9]]), 240);
        for (i, p) in first.packets.iter().enumerate() {
            assert!(p.payload.len() <= 1100);
            assert_eq!(p.header.marker, i + 1 == first.packets.len());
            assert_eq!(p.header.ssrc, 1234);
            let d = parse_vp8_descriptor(&p.payload).unwrap();
            assert_eq!(d.start_of_partition, i == 0);
            assert_eq!(d.partition_id, 0);
            if i > 0 {
                assert!(!vp8_is_keyframe(&p.payload));
            }
        }
        let t1 = t0 + config.frame_interval();
        let second = source.next_frame(t1, NOW_US + 33_333);
        assert!(!second.keyframe);
        assert!(!vp8_is_keyframe(&second.packets[0].payload));
        // Sequence numbers continue, timestamps advance by one frame at 90 kHz.
        let last_seq = first.packets.last().unwrap().header.sequence_number;
        assert_eq!(
            second.packets[0].header.sequence_number,
            last_seq.wrapping_add(1)
        );
        let dt = second.packets[0]
            .header
            .timestamp
            .wrapping_sub(first.packets[0].header.timestamp);
        assert_eq!(dt, 2999, "33_333 µs at 90 kHz");
        // Picture ids advance per frame.
        let pid = |f: &VideoFrame| {
            parse_vp8_descriptor(&f.packets[0].payload)
                .unwrap()
                .picture_id
        };
        assert_eq!(pid(&second).unwrap(), (pid(&first).unwrap() + 1) & 0x7fff);
    }

    #[test]
    fn a_layer_source_names_its_layer_and_size() {
        let config = VideoConfig {
            width: 1280,
            height: 720,
            layer: 2,
            ..VideoConfig::default()
        };
        let mut source = VideoSource::new(config, 9, 96);
        let t0 = Instant::now();
        let key = source.next_frame(t0, NOW_US);
        assert_eq!(
            vp8_keyframe_size(&key.packets[0].payload),
            Some((1280, 720))
        );
        for p in &key.packets[1..] {
            assert_eq!(vp8_keyframe_size(&p.payload), None, "not a frame start");
        }
        let delta = source.next_frame(t0 + Duration::from_millis(33), NOW_US);
        assert_eq!(vp8_keyframe_size(&delta.packets[0].payload), None);
        for p in key.packets.iter().chain(&delta.packets) {
            let (_, counter) = parse_probe(TrackKind::Video, &p.payload).unwrap();
            assert_eq!(probe_layer(counter), 2);
        }
        // A single stream is layer 0.
        let mut single = VideoSource::new(VideoConfig::default(), 1, 96);
        let frame = single.next_frame(t0, NOW_US);
        let (_, counter) = parse_probe(TrackKind::Video, &frame.packets[0].payload).unwrap();
        assert_eq!((probe_layer(counter), counter), (0, 0));
    }

    #[test]
    fn keyframes_follow_the_interval_and_requests() {
        let config = VideoConfig {
            keyframe_interval: Some(Duration::from_secs(2)),
            ..VideoConfig::default()
        };
        let mut source = VideoSource::new(config, 1, 96);
        let t0 = Instant::now();
        let mut keyframes = vec![];
        for i in 0..150u64 {
            let t = t0 + Duration::from_micros(i * 33_333);
            if source.next_frame(t, NOW_US).keyframe {
                keyframes.push(i);
            }
        }
        assert_eq!(keyframes, vec![0, 60, 120]);
        let t = t0 + Duration::from_secs(5);
        assert!(!source.next_frame(t, NOW_US).keyframe);
        source.request_keyframe();
        assert!(
            source
                .next_frame(t + Duration::from_millis(33), NOW_US)
                .keyframe
        );
        assert!(
            !source
                .next_frame(t + Duration::from_millis(66), NOW_US)
                .keyframe
        );
    }

    #[test]
    fn payload_sizes_follow_the_bitrate() {
        for bitrate in [100_000u32, 300_000, 1_000_000, 2_500_000] {
            let config = VideoConfig {
                bitrate_bps: bitrate,
                keyframe_interval: None,
                ..VideoConfig::default()
            };
            let mut source = VideoSource::new(config, 1, 96);
            let t0 = Instant::now();
            let mut bytes = 0usize;
            let frames = 90u64;
            for i in 0..frames {
                let frame = source.next_frame(t0 + Duration::from_micros(i * 33_333), NOW_US);
                for p in &frame.packets {
                    assert!(p.payload.len() <= 1100, "{} > 1100", p.payload.len());
                    bytes += p.payload.len() - VP8_DESCRIPTOR_LEN;
                }
            }
            // 90 frames at 30 fps = 3 s.
            let measured = bytes as f64 * 8.0 / 3.0;
            let ratio = measured / bitrate as f64;
            assert!(
                (0.97..1.03).contains(&ratio),
                "bitrate {bitrate}: measured {measured} (ratio {ratio})"
            );
        }
        // 1 Mbit/s at 30 fps is ~4167 bytes per frame: 4 packets.
        let config = VideoConfig {
            bitrate_bps: 1_000_000,
            ..VideoConfig::default()
        };
        let mut source = VideoSource::new(config, 1, 96);
        assert_eq!(source.next_frame(Instant::now(), NOW_US).packets.len(), 4);
    }

    #[test]
    fn probe_roundtrip_video_and_audio() {
        let mut video = VideoSource::new(VideoConfig::default(), 1, 96);
        let t0 = Instant::now();
        let mut expected = 0u32;
        for i in 0..5u64 {
            let frame = video.next_frame(t0 + Duration::from_millis(33 * i), NOW_US + i);
            for p in &frame.packets {
                assert_eq!(
                    parse_probe(TrackKind::Video, &p.payload),
                    Some((NOW_US + i, expected))
                );
                expected += 1;
            }
        }
        // A requested keyframe mid-stream keeps the probe readable.
        video.request_keyframe();
        let frame = video.next_frame(t0 + Duration::from_millis(200), NOW_US + 9);
        assert!(frame.keyframe);
        assert_eq!(
            parse_probe(TrackKind::Video, &frame.packets[0].payload),
            Some((NOW_US + 9, expected))
        );

        let mut audio = AudioSource::new(AudioConfig::default(), 2, 111);
        for i in 0..50u32 {
            let t = t0 + AUDIO_FRAME * i;
            let p = audio.next_packet(t, NOW_US + u64::from(i));
            assert!((60..=120).contains(&p.payload.len()));
            assert!(p.payload[PROBE_LEN..].iter().all(|&b| b != 0));
            assert_eq!(p.header.marker, i == 0);
            assert_eq!(
                parse_probe(TrackKind::Audio, &p.payload),
                Some((NOW_US + u64::from(i), i))
            );
        }
        // Garbage is not a probe.
        assert_eq!(parse_probe(TrackKind::Audio, &[0xff; 40]), None);
        assert_eq!(parse_probe(TrackKind::Audio, &[1, 2, 3]), None);
        assert_eq!(parse_probe(TrackKind::Video, &[0x10, 0x00]), None);
    }

    #[test]
    fn audio_timestamps_advance_by_960_per_frame() {
        let mut audio = AudioSource::new(AudioConfig::default(), 2, 111);
        let t0 = Instant::now();
        let a = audio.next_packet(t0, NOW_US);
        let b = audio.next_packet(t0 + Duration::from_millis(21), NOW_US);
        // Jitter does not make two packets share a timestamp.
        let c = audio.next_packet(t0 + Duration::from_millis(29), NOW_US);
        assert_eq!(b.header.timestamp.wrapping_sub(a.header.timestamp), 960);
        assert_eq!(c.header.timestamp.wrapping_sub(b.header.timestamp), 960);
        assert_eq!(
            b.header.sequence_number,
            a.header.sequence_number.wrapping_add(1)
        );
    }
}
