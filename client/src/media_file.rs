//! Real media from files: VP8 frames from an IVF file and Opus packets from an Ogg file, loaded
//! once into memory (an `Arc` clip is shared by every peer that publishes it), the RFC 7741 VP8
//! packetizer, and the looping sources a publisher sends from, paced by the file's own clock
//! (IVF timestamps, Opus packet durations).
//!
//! Real payloads cannot carry the synthetic probes of [`crate::media`], so receivers of file
//! media measure loss and jitter from RTP sequence numbers and timestamps only.
//!
//! Like the synthetic sources, these are clocked from outside: the sender asks
//! [`FileVideoSource::next_due`] when the next frame is due (media time since the first one) and
//! sleeps until then, so the sources themselves are deterministic.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use rtc::media::io::ivf_reader::{IVFReader, IVF_FILE_HEADER_SIZE, IVF_FRAME_HEADER_SIZE};
use rtc::rtp;

use crate::media::{next_rtp_packet, VideoFrame, AUDIO_CLOCK_RATE, VIDEO_CLOCK_RATE};

/// A media file that could not be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct MediaFileError {
    /// The file (or `<memory>` for bytes parsed directly).
    pub path: String,
    /// What is wrong with it, in words a user can act on.
    pub reason: String,
}

impl MediaFileError {
    fn new(path: &Path, reason: impl Into<String>) -> Self {
        MediaFileError {
            path: path.display().to_string(),
            reason: reason.into(),
        }
    }
}

/// Where bytes parsed without a file come from, in error messages.
const IN_MEMORY: &str = "<memory>";

/// One VP8 frame of an IVF clip.
#[derive(Debug, Clone)]
pub struct IvfFrame {
    /// Presentation time relative to the clip's first frame, in 90 kHz RTP clock ticks.
    pub pts_ticks: u64,
    /// Ticks until the next frame (for the last frame: the clip's typical frame interval).
    pub duration_ticks: u64,
    /// Whether it is a keyframe (bit 0 of the VP8 frame tag is clear).
    pub keyframe: bool,
    /// The encoded frame, as the encoder wrote it.
    pub data: Bytes,
}

/// A VP8 IVF file held in memory.
#[derive(Debug, Clone)]
pub struct IvfClip {
    /// The file it came from.
    pub path: PathBuf,
    /// Frame width from the IVF header.
    pub width: u16,
    /// Frame height from the IVF header.
    pub height: u16,
    /// The frames, in file order; at least one, and the first is a keyframe.
    pub frames: Vec<IvfFrame>,
}

impl IvfClip {
    /// Reads and checks a VP8 IVF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<IvfClip>, MediaFileError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| MediaFileError::new(path, e.to_string()))?;
        let mut clip = Self::parse(&bytes).map_err(|e| MediaFileError::new(path, e.reason))?;
        clip.path = path.to_owned();
        Ok(Arc::new(clip))
    }

    /// Parses the bytes of a VP8 IVF file.
    pub fn parse(bytes: &[u8]) -> Result<IvfClip, MediaFileError> {
        let fail = |reason: String| MediaFileError::new(Path::new(IN_MEMORY), reason);
        let (mut reader, header) = IVFReader::new(Cursor::new(bytes))
            .map_err(|e| fail(format!("not an IVF file ({e})")))?;
        if &header.four_cc != b"VP80" {
            return Err(fail(format!(
                "codec {:?} is not VP8 (make one with ffmpeg -c:v libvpx)",
                String::from_utf8_lossy(&header.four_cc)
            )));
        }
        // IVF's "denominator" field holds the rate and "numerator" the scale: a timestamp of
        // `t` means `t * numerator / denominator` seconds.
        let (rate, scale) = (
            u64::from(header.timebase_denominator),
            u64::from(header.timebase_numerator),
        );
        if rate == 0 || scale == 0 {
            return Err(fail("the IVF header has a zero timebase".into()));
        }
        let mut raw = Vec::new();
        let mut consumed = IVF_FILE_HEADER_SIZE;
        while consumed < bytes.len() {
            let (data, frame) = reader
                .parse_next_frame()
                .map_err(|e| fail(format!("frame {} is truncated ({e})", raw.len())))?;
            consumed += IVF_FRAME_HEADER_SIZE + data.len();
            if data.is_empty() {
                continue;
            }
            raw.push((frame.timestamp, data.freeze()));
        }
        if raw.is_empty() {
            return Err(fail("the IVF file has no frames".into()));
        }
        // Exact in the RTP clock for the usual timebases (1/30 s is 3000 ticks).
        let to_ticks = |ts: u64| ts.saturating_mul(scale) * u64::from(VIDEO_CLOCK_RATE) / rate;
        let first_ts = raw[0].0;
        let pts: Vec<u64> = raw
            .iter()
            .map(|(ts, _)| to_ticks(ts.saturating_sub(first_ts)))
            .collect();
        // The interval the encoder used most of the time stands in for the last frame's.
        let mut intervals: Vec<u64> = pts.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
        intervals.sort_unstable();
        let typical = intervals
            .get(intervals.len() / 2)
            .copied()
            .filter(|&d| d > 0)
            .unwrap_or_else(|| to_ticks(1).max(1));
        let mut frames = Vec::with_capacity(raw.len());
        for (i, (_, data)) in raw.into_iter().enumerate() {
            let duration_ticks = match pts.get(i + 1) {
                Some(&next) if next > pts[i] => next - pts[i],
                // Timestamps that go backwards or repeat still take some time to show.
                Some(_) => u64::from(VIDEO_CLOCK_RATE / 1000),
                None => typical,
            };
            frames.push(IvfFrame {
                pts_ticks: pts[i],
                duration_ticks,
                keyframe: data[0] & 0x01 == 0,
                data,
            });
        }
        if !frames[0].keyframe {
            return Err(fail(
                "the first frame is not a keyframe, so no receiver could start decoding".into(),
            ));
        }
        Ok(IvfClip {
            path: PathBuf::from(IN_MEMORY),
            width: header.width,
            height: header.height,
            frames,
        })
    }

    /// How long one pass over the clip lasts.
    pub fn duration(&self) -> Duration {
        ticks_to_duration(self.frames.iter().map(|f| f.duration_ticks).sum())
    }

    /// Average payload bitrate of the clip, bits per second.
    pub fn bitrate_bps(&self) -> u64 {
        let bytes: u64 = self.frames.iter().map(|f| f.data.len() as u64).sum();
        let micros = self.duration().as_micros().max(1) as u64;
        bytes * 8 * 1_000_000 / micros
    }
}

/// 90 kHz RTP clock ticks as time.
fn ticks_to_duration(ticks: u64) -> Duration {
    Duration::from_micros(ticks * 1_000_000 / u64::from(VIDEO_CLOCK_RATE))
}

/// One Opus packet of an Ogg clip.
#[derive(Debug, Clone)]
pub struct OpusPacket {
    /// Its duration in 48 kHz samples, from its TOC byte.
    pub samples: u32,
    /// The packet, as the encoder wrote it.
    pub data: Bytes,
}

/// An Ogg Opus file held in memory.
#[derive(Debug, Clone)]
pub struct OggOpusClip {
    /// The file it came from.
    pub path: PathBuf,
    /// Channels from the `OpusHead` header.
    pub channels: u8,
    /// Audio packets in order (the `OpusHead` and `OpusTags` headers left out); at least one.
    pub packets: Vec<OpusPacket>,
}

/// The Ogg capture pattern every page starts with.
const OGG_CAPTURE: &[u8; 4] = b"OggS";
/// The fixed part of an Ogg page header, before its segment table.
const OGG_PAGE_HEADER_LEN: usize = 27;
/// Page flag: the page's first packet continues one from the previous page.
const OGG_CONTINUED: u8 = 0x01;

impl OggOpusClip {
    /// Reads and checks an Ogg Opus file.
    pub fn open(path: impl AsRef<Path>) -> Result<Arc<OggOpusClip>, MediaFileError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| MediaFileError::new(path, e.to_string()))?;
        let mut clip = Self::parse(&bytes).map_err(|e| MediaFileError::new(path, e.reason))?;
        clip.path = path.to_owned();
        Ok(Arc::new(clip))
    }

    /// Parses the bytes of an Ogg Opus file: pages (checksums verified) are split into packets
    /// by their lacing values, packets spanning pages are joined, and only the first logical
    /// stream is kept.
    pub fn parse(bytes: &[u8]) -> Result<OggOpusClip, MediaFileError> {
        let fail = |reason: String| MediaFileError::new(Path::new(IN_MEMORY), reason);
        let mut packets: Vec<Bytes> = Vec::new();
        let mut partial = BytesMut::new();
        let mut serial = None;
        let mut pos = 0;
        let mut page_index = 0usize;
        while pos < bytes.len() {
            let header = bytes
                .get(pos..pos + OGG_PAGE_HEADER_LEN)
                .ok_or_else(|| fail(format!("page {page_index} is truncated")))?;
            if &header[..4] != OGG_CAPTURE || header[4] != 0 {
                return Err(fail(format!(
                    "page {page_index} at byte {pos} is not an Ogg page"
                )));
            }
            let flags = header[5];
            let page_serial = u32::from_le_bytes(header[14..18].try_into().expect("4 bytes"));
            let stored_crc = u32::from_le_bytes(header[22..26].try_into().expect("4 bytes"));
            let segments = usize::from(header[26]);
            let table_end = pos + OGG_PAGE_HEADER_LEN + segments;
            let table = bytes
                .get(pos + OGG_PAGE_HEADER_LEN..table_end)
                .ok_or_else(|| fail(format!("page {page_index} is truncated")))?;
            let body_len: usize = table.iter().map(|&l| usize::from(l)).sum();
            let page_end = table_end + body_len;
            let page = bytes
                .get(pos..page_end)
                .ok_or_else(|| fail(format!("page {page_index} is truncated")))?;
            if ogg_crc(page) != stored_crc {
                return Err(fail(format!("page {page_index} fails its checksum")));
            }
            let first_serial = *serial.get_or_insert(page_serial);
            if page_serial == first_serial {
                if flags & OGG_CONTINUED == 0 && !partial.is_empty() {
                    // The previous page promised a continuation that never came.
                    partial.clear();
                }
                let mut offset = table_end;
                for &lace in table {
                    partial.put_slice(&bytes[offset..offset + usize::from(lace)]);
                    offset += usize::from(lace);
                    // A lacing value below 255 ends a packet.
                    if lace < 255 {
                        packets.push(std::mem::take(&mut partial).freeze());
                    }
                }
            }
            pos = page_end;
            page_index += 1;
        }
        let mut packets = packets.into_iter();
        let head = packets
            .next()
            .ok_or_else(|| fail("the file holds no Ogg packets".into()))?;
        if head.len() < 19 || &head[..8] != b"OpusHead" {
            return Err(fail(
                "the first packet is not OpusHead: not an Ogg Opus file (make one with ffmpeg -c:a libopus)"
                    .into(),
            ));
        }
        let channels = head[9];
        match packets.next() {
            Some(tags) if tags.starts_with(b"OpusTags") => {}
            _ => return Err(fail("the second packet is not OpusTags".into())),
        }
        let mut audio = Vec::new();
        for (i, data) in packets.enumerate() {
            let samples = opus_packet_samples(&data)
                .ok_or_else(|| fail(format!("audio packet {i} is not a valid Opus packet")))?;
            audio.push(OpusPacket { samples, data });
        }
        if audio.is_empty() {
            return Err(fail("the file holds no audio packets".into()));
        }
        Ok(OggOpusClip {
            path: PathBuf::from(IN_MEMORY),
            channels,
            packets: audio,
        })
    }

    /// How long one pass over the clip lasts.
    pub fn duration(&self) -> Duration {
        let samples: u64 = self.packets.iter().map(|p| u64::from(p.samples)).sum();
        Duration::from_micros(samples * 1_000_000 / u64::from(AUDIO_CLOCK_RATE))
    }
}

/// The Ogg page checksum: CRC-32 with polynomial 0x04c11db7, no reflection, initial value 0,
/// computed with the checksum field read as zero.
fn ogg_crc(page: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut r = (i as u32) << 24;
            for _ in 0..8 {
                r = if r & 0x8000_0000 != 0 {
                    (r << 1) ^ 0x04c1_1db7
                } else {
                    r << 1
                };
            }
            *entry = r;
        }
        table
    });
    let mut crc = 0u32;
    for (i, &b) in page.iter().enumerate() {
        let b = if (22..26).contains(&i) { 0 } else { b };
        crc = (crc << 8) ^ table[((crc >> 24) as u8 ^ b) as usize];
    }
    crc
}

/// The duration of an Opus packet in 48 kHz samples, from its TOC byte and frame count
/// (RFC 6716 §3.1); `None` for an empty or malformed packet.
pub fn opus_packet_samples(packet: &[u8]) -> Option<u32> {
    let toc = *packet.first()?;
    let config = toc >> 3;
    // Frame sizes in 48 kHz samples: SILK 10/20/40/60 ms, Hybrid 10/20 ms, CELT 2.5/5/10/20 ms.
    let frame = match config {
        0..=11 => [480, 960, 1920, 2880][usize::from(config % 4)],
        12..=15 => [480, 960][usize::from(config % 2)],
        _ => [120, 240, 480, 960][usize::from(config % 4)],
    };
    let frames = match toc & 0x03 {
        0 => 1,
        1 | 2 => 2,
        _ => u32::from(*packet.get(1)? & 0x3f),
    };
    let samples = frame * frames;
    // RFC 6716 caps a packet at 120 ms.
    (frames > 0 && samples <= 5760).then_some(samples)
}

/// Length of the VP8 payload descriptor [`packetize_vp8`] writes: X, then I with a 15-bit
/// picture id (the same layout as the synthetic source, so receivers see one shape).
pub const VP8_DESCRIPTOR_LEN: usize = 4;

/// Splits one encoded VP8 frame into RTP payloads of at most `max_payload` bytes (RFC 7741):
/// each starts with a descriptor carrying `picture_id` (15 bits), S set on the first, partition
/// index 0; the frame is divided into near-equal chunks so no tiny last packet is sent.
pub fn packetize_vp8(frame: &[u8], picture_id: u16, max_payload: usize) -> Vec<Bytes> {
    let chunk_cap = max_payload.saturating_sub(VP8_DESCRIPTOR_LEN).max(1);
    let count = frame.len().div_ceil(chunk_cap).max(1);
    let base = frame.len() / count;
    let extra = frame.len() % count;
    let mut payloads = Vec::with_capacity(count);
    let mut offset = 0;
    for index in 0..count {
        let len = base + usize::from(index < extra);
        let mut payload = BytesMut::with_capacity(VP8_DESCRIPTOR_LEN + len);
        payload.put_u8(0x80 | if index == 0 { 0x10 } else { 0 });
        payload.put_u8(0x80);
        payload.put_u16(0x8000 | (picture_id & 0x7fff));
        payload.put_slice(&frame[offset..offset + len]);
        offset += len;
        payloads.push(payload.freeze());
    }
    payloads
}

/// Largest VP8 RTP payload the file source writes (as the synthetic source).
pub const DEFAULT_MAX_PAYLOAD: usize = 1100;

/// Sends an [`IvfClip`] as VP8 RTP, looping forever: RTP timestamps follow the file's
/// timestamps (continuing across loops), and a keyframe request makes the source skip ahead to
/// the clip's next keyframe (a file cannot encode one on demand).
#[derive(Debug)]
pub struct FileVideoSource {
    /// The frames.
    clip: Arc<IvfClip>,
    /// SSRC written on every packet.
    ssrc: u32,
    /// Payload type written on every packet.
    payload_type: u8,
    /// Largest RTP payload.
    max_payload: usize,
    /// Next RTP sequence number.
    seq: u16,
    /// RTP timestamp of the first frame.
    ts_base: u32,
    /// VP8 picture id of the next frame (15 bits).
    picture_id: u16,
    /// Index of the next frame in the clip.
    index: usize,
    /// RTP clock ticks from the first frame to the next one, summed over loops.
    ticks: u64,
    /// A keyframe was asked for.
    keyframe_requested: bool,
}

impl FileVideoSource {
    /// A source sending `clip` on `ssrc` with `payload_type`.
    pub fn new(clip: Arc<IvfClip>, ssrc: u32, payload_type: u8) -> Self {
        let seed = crate::random_u64() | 1;
        FileVideoSource {
            clip,
            ssrc,
            payload_type,
            max_payload: DEFAULT_MAX_PAYLOAD,
            seq: (seed >> 16) as u16,
            ts_base: (seed >> 32) as u32,
            picture_id: (seed >> 8) as u16 & 0x7fff,
            index: 0,
            ticks: 0,
            keyframe_requested: false,
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

    /// Changes the largest RTP payload.
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.max_payload = max_payload.max(VP8_DESCRIPTOR_LEN + 1);
    }

    /// When the next frame is due, as media time since the first frame.
    pub fn next_due(&self) -> Duration {
        ticks_to_duration(self.ticks)
    }

    /// Makes the next frame a keyframe, by skipping ahead to the clip's next one.
    pub fn request_keyframe(&mut self) {
        self.keyframe_requested = true;
    }

    /// Packetizes the next frame and advances (wrapping at the end of the clip).
    pub fn next_frame(&mut self) -> VideoFrame {
        if self.keyframe_requested {
            self.keyframe_requested = false;
            let frames = &self.clip.frames;
            if !frames[self.index].keyframe {
                // The first frame is a keyframe, so the search always ends.
                self.index = (self.index..frames.len())
                    .find(|&i| frames[i].keyframe)
                    .unwrap_or(0);
            }
        }
        let frame = &self.clip.frames[self.index];
        let timestamp = self.ts_base.wrapping_add(self.ticks as u32);
        let payloads = packetize_vp8(&frame.data, self.picture_id, self.max_payload);
        let count = payloads.len();
        let packets = payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| {
                next_rtp_packet(
                    &mut self.seq,
                    self.ssrc,
                    self.payload_type,
                    timestamp,
                    i + 1 == count,
                    payload,
                )
            })
            .collect();
        let keyframe = frame.keyframe;
        self.ticks += frame.duration_ticks;
        self.picture_id = (self.picture_id + 1) & 0x7fff;
        self.index = (self.index + 1) % self.clip.frames.len();
        VideoFrame { packets, keyframe }
    }
}

/// Sends an [`OggOpusClip`] as Opus RTP, one packet per Ogg packet, looping forever; RTP
/// timestamps advance by each packet's duration.
#[derive(Debug)]
pub struct FileAudioSource {
    /// The packets.
    clip: Arc<OggOpusClip>,
    /// SSRC written on every packet.
    ssrc: u32,
    /// Payload type written on every packet.
    payload_type: u8,
    /// Next RTP sequence number.
    seq: u16,
    /// RTP timestamp of the first packet.
    ts_base: u32,
    /// Index of the next packet in the clip.
    index: usize,
    /// 48 kHz samples sent so far, summed over loops.
    samples: u64,
}

impl FileAudioSource {
    /// A source sending `clip` on `ssrc` with `payload_type`.
    pub fn new(clip: Arc<OggOpusClip>, ssrc: u32, payload_type: u8) -> Self {
        let seed = crate::random_u64() | 1;
        FileAudioSource {
            clip,
            ssrc,
            payload_type,
            seq: (seed >> 16) as u16,
            ts_base: (seed >> 32) as u32,
            index: 0,
            samples: 0,
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

    /// When the next packet is due, as media time since the first one.
    pub fn next_due(&self) -> Duration {
        Duration::from_micros(self.samples * 1_000_000 / u64::from(AUDIO_CLOCK_RATE))
    }

    /// The next packet; advances (wrapping at the end of the clip).
    pub fn next_packet(&mut self) -> rtp::Packet {
        let opus = &self.clip.packets[self.index];
        let packet = next_rtp_packet(
            &mut self.seq,
            self.ssrc,
            self.payload_type,
            self.ts_base.wrapping_add(self.samples as u32),
            // The start of the first talk spurt.
            self.samples == 0,
            opus.data.clone(),
        );
        self.samples += u64::from(opus.samples);
        self.index = (self.index + 1) % self.clip.packets.len();
        packet
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{parse_vp8_descriptor, vp8_is_keyframe};

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name)
    }

    /// An IVF file with the given (timestamp, frame) pairs and a 1/30 s timebase.
    fn ivf(frames: &[(u64, &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"DKIF");
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&32u16.to_le_bytes());
        b.extend_from_slice(b"VP80");
        b.extend_from_slice(&320u16.to_le_bytes());
        b.extend_from_slice(&240u16.to_le_bytes());
        b.extend_from_slice(&30u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&(frames.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for (ts, data) in frames {
            b.extend_from_slice(&(data.len() as u32).to_le_bytes());
            b.extend_from_slice(&ts.to_le_bytes());
            b.extend_from_slice(data);
        }
        b
    }

    /// An Ogg page holding `segments` (already laced) with a valid checksum.
    fn ogg_page(flags: u8, sequence: u32, lacing: &[u8], body: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(b"OggS");
        p.push(0);
        p.push(flags);
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&7u32.to_le_bytes());
        p.extend_from_slice(&sequence.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        p.push(lacing.len() as u8);
        p.extend_from_slice(lacing);
        p.extend_from_slice(body);
        let crc = ogg_crc(&p);
        p[22..26].copy_from_slice(&crc.to_le_bytes());
        p
    }

    fn opus_head() -> Vec<u8> {
        let mut h = b"OpusHead".to_vec();
        h.extend_from_slice(&[1, 1, 0x38, 0x01, 0x80, 0xbb, 0, 0, 0, 0, 0]);
        h
    }

    #[test]
    fn ivf_frames_keep_their_timing_and_keyframes() {
        let clip = IvfClip::parse(&ivf(&[
            (0, &[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a]),
            (1, &[0x31, 0x00, 0x00]),
            (3, &[0x31, 0x00, 0x00]),
        ]))
        .unwrap();
        assert_eq!((clip.width, clip.height), (320, 240));
        let pts: Vec<u64> = clip.frames.iter().map(|f| f.pts_ticks).collect();
        assert_eq!(pts, vec![0, 3000, 9000]);
        let durations: Vec<u64> = clip.frames.iter().map(|f| f.duration_ticks).collect();
        // The last frame lasts the typical (median) interval.
        assert_eq!(durations, vec![3000, 6000, 6000]);
        assert_eq!(clip.duration(), Duration::from_micros(166_666));
        let keys: Vec<bool> = clip.frames.iter().map(|f| f.keyframe).collect();
        assert_eq!(keys, vec![true, false, false]);
    }

    #[test]
    fn bad_ivf_files_are_refused_with_a_reason() {
        let err = IvfClip::parse(b"RIFF....").unwrap_err();
        assert!(err.reason.contains("not an IVF"), "{err}");
        let mut vp9 = ivf(&[(0, &[0x10])]);
        vp9[8..12].copy_from_slice(b"VP90");
        assert!(IvfClip::parse(&vp9).unwrap_err().reason.contains("VP8"));
        let mut truncated = ivf(&[(0, &[0x10, 0, 0, 0])]);
        truncated.pop();
        assert!(IvfClip::parse(&truncated)
            .unwrap_err()
            .reason
            .contains("truncated"));
        let interframe_first = ivf(&[(0, &[0x31, 0, 0])]);
        assert!(IvfClip::parse(&interframe_first)
            .unwrap_err()
            .reason
            .contains("keyframe"));
        assert!(IvfClip::parse(&ivf(&[]))
            .unwrap_err()
            .reason
            .contains("no frames"));
        let missing = IvfClip::open("/nonexistent/clip.ivf").unwrap_err();
        assert_eq!(missing.path, "/nonexistent/clip.ivf");
    }

    #[test]
    fn packetizer_follows_rfc_7741() {
        let frame: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let payloads = packetize_vp8(&frame, 0x1234, 1100);
        assert_eq!(payloads.len(), 3);
        let mut joined = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            assert!(p.len() <= 1100);
            let d = parse_vp8_descriptor(p).unwrap();
            assert_eq!(d.len, VP8_DESCRIPTOR_LEN);
            assert_eq!(d.start_of_partition, i == 0);
            assert_eq!(d.partition_id, 0);
            assert_eq!(d.picture_id, Some(0x1234));
            joined.extend_from_slice(&p[d.len..]);
        }
        assert_eq!(joined, frame, "the frame is carried whole and in order");
        // Near-equal chunks: 834, 833, 833.
        let sizes: Vec<usize> = payloads.iter().map(|p| p.len() - 4).collect();
        assert_eq!(sizes, vec![834, 833, 833]);
        // A picture id wider than 15 bits is masked, not spilled into the M bit.
        let p = &packetize_vp8(&[0x10], 0xffff, 1100)[0];
        assert_eq!(parse_vp8_descriptor(p).unwrap().picture_id, Some(0x7fff));
    }

    #[test]
    fn file_video_source_loops_with_continuous_rtp() {
        let clip = Arc::new(
            IvfClip::parse(&ivf(&[
                (0, &[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a]),
                (1, &[0x31; 1500]),
                (2, &[0x31, 0x00, 0x00]),
            ]))
            .unwrap(),
        );
        let mut source = FileVideoSource::new(Arc::clone(&clip), 99, 96);
        let mut last_seq = None;
        let mut timestamps = Vec::new();
        let mut keyframes = Vec::new();
        for _ in 0..7 {
            assert_eq!(
                source.next_due().as_micros(),
                timestamps.len() as u128 * 1_000_000 / 30
            );
            let frame = source.next_frame();
            keyframes.push(frame.keyframe);
            assert_eq!(frame.keyframe, vp8_is_keyframe(&frame.packets[0].payload));
            for (i, p) in frame.packets.iter().enumerate() {
                if let Some(last) = last_seq {
                    assert_eq!(p.header.sequence_number, u16::wrapping_add(last, 1));
                }
                last_seq = Some(p.header.sequence_number);
                assert_eq!(p.header.marker, i + 1 == frame.packets.len());
                assert_eq!(p.header.ssrc, 99);
            }
            timestamps.push(frame.packets[0].header.timestamp);
        }
        assert_eq!(
            keyframes,
            vec![true, false, false, true, false, false, true]
        );
        let steps: Vec<u32> = timestamps
            .windows(2)
            .map(|w| w[1].wrapping_sub(w[0]))
            .collect();
        assert_eq!(steps, vec![3000; 6]);
        // A keyframe request skips ahead to the next keyframe (here: the clip's start).
        source.next_frame();
        source.request_keyframe();
        assert!(source.next_frame().keyframe);
    }

    #[test]
    fn opus_durations_come_from_the_toc() {
        // CELT 20 ms, one frame.
        assert_eq!(opus_packet_samples(&[0xfc, 0x00]), Some(960));
        // SILK 60 ms, two frames of equal size: 120 ms.
        assert_eq!(opus_packet_samples(&[(3 << 3) | 1]), Some(5760));
        // Hybrid 10 ms, code 3 with 3 frames.
        assert_eq!(opus_packet_samples(&[(12 << 3) | 3, 3]), Some(1440));
        // CELT 2.5 ms.
        assert_eq!(opus_packet_samples(&[16 << 3]), Some(120));
        // More than 120 ms, zero frames, empty: invalid.
        assert_eq!(opus_packet_samples(&[(3 << 3) | 3, 3]), None);
        assert_eq!(opus_packet_samples(&[(16 << 3) | 3, 0]), None);
        assert_eq!(opus_packet_samples(&[]), None);
    }

    #[test]
    fn ogg_pages_split_into_packets() {
        let tags = b"OpusTags\x00\x00\x00\x00\x00\x00\x00\x00";
        let long = vec![0xfc; 300];
        let mut file = ogg_page(0x02, 0, &[19], &opus_head());
        file.extend(ogg_page(0, 1, &[16], tags));
        // Two packets on one page (3 bytes, then 300 bytes laced as 255 + 45 but cut after
        // 255 so it continues on the next page).
        let mut body = vec![0xfc, 1, 2];
        body.extend_from_slice(&long[..255]);
        file.extend(ogg_page(0, 2, &[3, 255], &body));
        file.extend(ogg_page(
            OGG_CONTINUED,
            3,
            &[45, 1],
            &[&long[255..], &[0xf8]].concat(),
        ));
        let clip = OggOpusClip::parse(&file).unwrap();
        assert_eq!(clip.channels, 1);
        let lens: Vec<usize> = clip.packets.iter().map(|p| p.data.len()).collect();
        assert_eq!(lens, vec![3, 300, 1]);
        assert_eq!(clip.packets[1].data.as_ref(), &long[..]);
        assert_eq!(clip.duration(), Duration::from_millis(60));

        let mut corrupt = file.clone();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 0xff;
        assert!(OggOpusClip::parse(&corrupt)
            .unwrap_err()
            .reason
            .contains("checksum"));
        let vorbis = ogg_page(0x02, 0, &[7], b"\x01vorbis");
        assert!(OggOpusClip::parse(&vorbis)
            .unwrap_err()
            .reason
            .contains("OpusHead"));
    }

    #[test]
    fn file_audio_source_paces_by_packet_duration() {
        let tags = b"OpusTags\x00\x00\x00\x00\x00\x00\x00\x00";
        let mut file = ogg_page(0x02, 0, &[19], &opus_head());
        file.extend(ogg_page(0, 1, &[16], tags));
        // 20 ms then 10 ms (CELT).
        file.extend(ogg_page(0, 2, &[2, 2], &[0xf8, 0, 0xf0, 0]));
        let clip = OggOpusClip::parse(&file).unwrap();
        let mut source = FileAudioSource::new(Arc::new(clip), 5, 111);
        let mut dues = Vec::new();
        let mut stamps = Vec::new();
        for _ in 0..4 {
            dues.push(source.next_due().as_millis());
            stamps.push(source.next_packet().header.timestamp);
        }
        assert_eq!(dues, vec![0, 20, 30, 50]);
        let steps: Vec<u32> = stamps.windows(2).map(|w| w[1].wrapping_sub(w[0])).collect();
        assert_eq!(steps, vec![960, 480, 960]);
    }

    #[test]
    fn committed_test_media_parses() {
        let video = IvfClip::open(testdata("testsrc-320x240-30fps.ivf")).unwrap();
        assert_eq!((video.width, video.height), (320, 240));
        assert_eq!(video.frames.len(), 90);
        assert_eq!(video.duration(), Duration::from_secs(3));
        // ffmpeg was asked for a keyframe every 30 frames.
        let keys: Vec<usize> = (0..90).filter(|&i| video.frames[i].keyframe).collect();
        assert_eq!(keys, vec![0, 30, 60]);
        let audio = OggOpusClip::open(testdata("sine-440hz-48k.ogg")).unwrap();
        assert_eq!(audio.channels, 1);
        assert!(audio.packets.iter().all(|p| p.samples == 960));
        let secs = audio.duration().as_secs_f64();
        assert!((2.9..3.2).contains(&secs), "{secs} s");
    }
}
