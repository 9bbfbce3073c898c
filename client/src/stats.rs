//! What a headless peer measured: per received track (packets, bytes, keyframes, frame size,
//! simulcast layer and layer switches, sequence continuity, probe loss and one-way latency)
//! and per published track (packets sent, keyframes, keyframe requests, per simulcast layer
//! too), plus the recorder that fills them from webrtc-rs remote tracks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use signaling::protocol::TrackKind;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

use crate::media::{
    parse_probe, parse_vp8_descriptor, probe_layer, vp8_is_keyframe, vp8_keyframe_size,
};

/// A received track: (publisher `participant_id`, server `track_id`), i.e. its msid.
pub type TrackKey = (String, String);

/// Everything measured about one received track.
#[derive(Debug, Clone, Default)]
pub struct TrackStats {
    /// Audio or video (from the negotiated m-section).
    pub kind: Option<TrackKind>,
    /// Every SSRC seen, in order of appearance.
    pub ssrcs: Vec<u32>,
    /// Every rid announced for the track (simulcast layers as they opened).
    pub rids: Vec<String>,
    /// Payload type of the last packet.
    pub payload_type: Option<u8>,
    /// Distinct RTP header extension ids seen, in order of appearance.
    pub extension_ids: Vec<u8>,
    /// When `on_track` fired.
    pub opened_at: Option<Instant>,
    /// Whether webrtc-rs ended the track.
    pub ended: bool,
    /// RTP packets received (duplicates included).
    pub packets: u64,
    /// RTP payload bytes received.
    pub bytes: u64,
    /// When the first packet arrived.
    pub first_packet_at: Option<Instant>,
    /// When the last packet arrived.
    pub last_packet_at: Option<Instant>,
    /// For video: whether the first packet received started a keyframe (an SFU must start a
    /// subscriber on a keyframe). `None` for audio or before any packet.
    pub first_packet_keyframe: Option<bool>,
    /// The first packet's sequence number, marker bit and first payload bytes (≤ 16), for
    /// diagnosing how a stream started.
    pub first_packet: Option<(u16, bool, Vec<u8>)>,
    /// For video: packets that started a keyframe.
    pub keyframes: u64,
    /// When the first keyframe started.
    pub first_keyframe_at: Option<Instant>,
    /// When the last keyframe started.
    pub last_keyframe_at: Option<Instant>,
    /// Packets with the marker bit (video: frames completed).
    pub markers: u64,
    /// Forward jumps in the RTP sequence (a gap of any size counts once).
    pub seq_gaps: u64,
    /// Sequence numbers skipped by those jumps.
    pub seq_missing: u64,
    /// Packets whose sequence number had been seen already.
    pub seq_duplicates: u64,
    /// Packets older than the newest one that filled a gap (reordered or retransmitted).
    pub seq_late: u64,
    /// Times the SSRC changed (sequence tracking restarts then).
    pub ssrc_changes: u64,
    /// Packets carrying a readable probe (duplicates included).
    pub probe_packets: u64,
    /// Distinct probe counters received.
    pub probe_unique: u64,
    /// Probe counters received more than once.
    pub probe_duplicates: u64,
    /// Smallest probe counter received on the current simulcast layer, extended to 64 bits
    /// (only differences are meaningful). Each layer counts on its own, so a layer switch
    /// starts these afresh; what earlier layers spanned is in `probe_expected_earlier`.
    pub probe_first: Option<u64>,
    /// Largest probe counter received on the current layer, extended like `probe_first`.
    pub probe_last: Option<u64>,
    /// Probe counters spanned (first to last) on the layers received before the current one.
    pub probe_expected_earlier: u64,
    /// One-way latency (receive time minus the probe's send time) of every distinct probe.
    pub latency: LatencyHistogram,
    /// RFC 3550 interarrival jitter of the current SSRC, in milliseconds (0 before the
    /// second packet).
    pub jitter_ms: f64,
    /// In-order packets whose RTP timestamp is behind the previous in-order packet's (a
    /// sender or SFU timeline that stepped back).
    pub timestamp_regressions: u64,
    /// Video: the frame size announced by the last keyframe received.
    pub frame_size: Option<(u16, u16)>,
    /// Video with probes: the simulcast layer the newest in-order packet came from (0 for a
    /// single stream), read from its probe.
    pub layer: Option<u8>,
    /// Every change of that layer, in order.
    pub layer_switches: Vec<LayerSwitch>,
}

/// The moment a received track's packets started coming from another simulcast layer, as
/// the first packet of the new layer showed it.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSwitch {
    /// When it arrived.
    pub at: Instant,
    /// The layer before.
    pub from: u8,
    /// The layer after.
    pub to: u8,
    /// Whether that packet started a keyframe (a decoder can only join a layer there).
    pub on_keyframe: bool,
    /// The frame size that keyframe announced.
    pub frame_size: Option<(u16, u16)>,
    /// Its sequence number minus the previous packet's: 1 when the numbering continued.
    pub seq_step: u64,
    /// Its RTP timestamp minus the previous packet's, in clock units: positive when the
    /// timeline moved forward.
    pub timestamp_step: i64,
    /// Its VP8 picture id minus the previous packet's (modulo 2^15): 1 when the pictures'
    /// numbering continued, as a browser's decoder needs. `None` without picture ids.
    pub picture_id_step: Option<u16>,
}

impl TrackStats {
    /// Probe counters expected: from the first to the last received, on every layer.
    pub fn probe_expected(&self) -> u64 {
        let current = match (self.probe_first, self.probe_last) {
            (Some(first), Some(last)) => last - first + 1,
            _ => 0,
        };
        self.probe_expected_earlier + current
    }

    /// Probe counters between the first and last received that never arrived.
    pub fn probe_lost(&self) -> u64 {
        self.probe_expected().saturating_sub(self.probe_unique)
    }

    /// `probe_lost` as a fraction of the counters expected.
    pub fn probe_loss_ratio(&self) -> f64 {
        match self.probe_expected() {
            0 => 0.0,
            expected => self.probe_lost() as f64 / expected as f64,
        }
    }

    /// Whether the RTP sequence so far is gap-free and without duplicates or reordering.
    pub fn seq_continuous(&self) -> bool {
        self.seq_gaps == 0 && self.seq_duplicates == 0 && self.seq_late == 0
    }
}

/// What a published track sent.
#[derive(Debug, Clone, Default)]
pub struct SentStats {
    /// The server's `track_id` for it, once `track_published` told us.
    pub track_id: Option<String>,
    /// Its SSRC.
    pub ssrc: u32,
    /// RTP packets handed to webrtc-rs.
    pub packets: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Frames (video) or packets (audio) sent.
    pub frames: u64,
    /// Keyframes sent (video).
    pub keyframes: u64,
    /// PLI/FIR received for this track.
    pub keyframe_requests: u64,
    /// When the first packet was sent.
    pub first_sent_at: Option<Instant>,
    /// When the last keyframe request arrived.
    pub last_keyframe_request_at: Option<Instant>,
    /// `write_rtp` failures.
    pub write_errors: u64,
    /// Per simulcast layer, smallest first (empty for a single stream); the fields above sum
    /// over them.
    pub layers: Vec<SentLayerStats>,
}

/// What one simulcast layer of a published track sent.
#[derive(Debug, Clone, Default)]
pub struct SentLayerStats {
    /// Its rid.
    pub rid: String,
    /// Its SSRC.
    pub ssrc: u32,
    /// The frame size its keyframes announce.
    pub frame_size: (u16, u16),
    /// RTP packets handed to webrtc-rs.
    pub packets: u64,
    /// Their payload bytes.
    pub bytes: u64,
    /// Keyframes sent.
    pub keyframes: u64,
    /// PLI/FIR received for this layer's SSRC.
    pub keyframe_requests: u64,
}

/// A snapshot of everything a peer measured.
#[derive(Debug, Clone, Default)]
pub struct PeerStats {
    /// Received tracks by (publisher participant id, track id).
    pub tracks: HashMap<TrackKey, TrackStats>,
    /// Published tracks by kind.
    pub sent: HashMap<TrackKind, SentStats>,
}

impl PeerStats {
    /// The received track `track_id` of `publisher`.
    pub fn track(&self, publisher: &str, track_id: &str) -> Option<&TrackStats> {
        self.tracks
            .get(&(publisher.to_owned(), track_id.to_owned()))
    }

    /// Received tracks published by `publisher`.
    pub fn from_publisher(&self, publisher: &str) -> impl Iterator<Item = (&String, &TrackStats)> {
        let publisher = publisher.to_owned();
        self.tracks
            .iter()
            .filter(move |((p, _), _)| *p == publisher)
            .map(|((_, t), s)| (t, s))
    }

    /// Received tracks of `publisher` and `kind`.
    pub fn kind_from(&self, publisher: &str, kind: TrackKind) -> Vec<&TrackStats> {
        self.from_publisher(publisher)
            .filter(|(_, s)| s.kind == Some(kind))
            .map(|(_, s)| s)
            .collect()
    }

    /// Packets received over all tracks.
    pub fn total_packets(&self) -> u64 {
        self.tracks.values().map(|s| s.packets).sum()
    }

    /// Latency of all received tracks merged.
    pub fn merged_latency(&self) -> LatencyHistogram {
        let mut h = LatencyHistogram::default();
        for s in self.tracks.values() {
            h.merge(&s.latency);
        }
        h
    }
}

/// Sub-buckets per power of two (≈3% resolution).
const SUB_BUCKETS: u64 = 32;

/// A log-linear histogram of microsecond values (exact below 64 µs, ≤ 3.2% error above),
/// cheap to record and to merge across tracks and peers.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    /// Counts per bucket (grown on demand).
    buckets: Vec<u64>,
    /// Values recorded.
    count: u64,
    /// Sum of values, for the mean.
    sum: u128,
    /// Smallest value.
    min: Option<u64>,
    /// Largest value.
    max: Option<u64>,
}

impl LatencyHistogram {
    fn index(v: u64) -> usize {
        if v < 2 * SUB_BUCKETS {
            return v as usize;
        }
        let e = 63 - v.leading_zeros() as u64; // e >= 6
        let shift = e - 5;
        let mantissa = v >> shift; // 32..=63
        (2 * SUB_BUCKETS + (e - 6) * SUB_BUCKETS + (mantissa - SUB_BUCKETS)) as usize
    }

    fn value(index: usize) -> u64 {
        let i = index as u64;
        if i < 2 * SUB_BUCKETS {
            return i;
        }
        let e = (i - 2 * SUB_BUCKETS) / SUB_BUCKETS + 6;
        let mantissa = (i - 2 * SUB_BUCKETS) % SUB_BUCKETS + SUB_BUCKETS;
        let shift = e - 5;
        // Middle of the bucket.
        (mantissa << shift) + (1 << shift) / 2
    }

    /// Records one value, in microseconds.
    pub fn record(&mut self, micros: u64) {
        let i = Self::index(micros);
        if self.buckets.len() <= i {
            self.buckets.resize(i + 1, 0);
        }
        self.buckets[i] += 1;
        self.count += 1;
        self.sum += u128::from(micros);
        self.min = Some(self.min.map_or(micros, |m| m.min(micros)));
        self.max = Some(self.max.map_or(micros, |m| m.max(micros)));
    }

    /// Adds another histogram's values.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// Values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean in microseconds.
    pub fn mean_us(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum as f64 / self.count as f64)
    }

    /// Smallest value in microseconds.
    pub fn min_us(&self) -> Option<u64> {
        self.min
    }

    /// Largest value in microseconds.
    pub fn max_us(&self) -> Option<u64> {
        self.max
    }

    /// The value at quantile `q` (0.0–1.0) in microseconds, within bucket resolution
    /// (clamped to the exact min and max).
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        if q >= 1.0 {
            return self.max;
        }
        if q <= 0.0 {
            return self.min;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let v = Self::value(i);
                return Some(v.clamp(self.min.unwrap_or(v), self.max.unwrap_or(v)));
            }
        }
        self.max
    }

    /// [`quantile_us`](Self::quantile_us) in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        self.quantile_us(q).map(|us| us as f64 / 1000.0)
    }
}

/// How a value arrived relative to those before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    /// Newer than everything before; `gap` values were skipped.
    New { gap: u64 },
    /// Older than the newest, not seen before.
    Late,
    /// Seen before.
    Duplicate,
    /// Too old to tell.
    TooOld,
}

/// Bits remembered behind the newest value.
const WINDOW: u64 = 4096;

/// Which of the last [`WINDOW`] values of an increasing sequence have been seen.
#[derive(Debug, Clone)]
struct SeqWindow {
    /// Newest value seen.
    highest: Option<u64>,
    /// Seen-bits indexed by value modulo the window.
    bits: Vec<u64>,
}

impl Default for SeqWindow {
    fn default() -> Self {
        SeqWindow {
            highest: None,
            bits: vec![0; (WINDOW / 64) as usize],
        }
    }
}

impl SeqWindow {
    fn bit(&self, v: u64) -> bool {
        let i = v % WINDOW;
        self.bits[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, v: u64, on: bool) {
        let i = v % WINDOW;
        let word = &mut self.bits[(i / 64) as usize];
        if on {
            *word |= 1 << (i % 64);
        } else {
            *word &= !(1 << (i % 64));
        }
    }

    fn insert(&mut self, v: u64) -> Arrival {
        let Some(highest) = self.highest else {
            self.highest = Some(v);
            self.set(v, true);
            return Arrival::New { gap: 0 };
        };
        if v > highest {
            if v - highest >= WINDOW {
                self.bits.iter_mut().for_each(|w| *w = 0);
            } else {
                for x in highest + 1..v {
                    self.set(x, false);
                }
            }
            self.set(v, true);
            self.highest = Some(v);
            Arrival::New {
                gap: v - highest - 1,
            }
        } else if highest - v >= WINDOW {
            Arrival::TooOld
        } else if self.bit(v) {
            Arrival::Duplicate
        } else {
            self.set(v, true);
            Arrival::Late
        }
    }
}

/// Extends a wrapping `bits`-bit counter to 64 bits around the last extended value.
fn extend(last: Option<u64>, value: u64, bits: u32) -> u64 {
    let Some(last) = last else {
        // Start high, so values slightly older than the first never go negative.
        return (1u64 << 40) + value;
    };
    let modulus = 1u64 << bits;
    let last_low = last & (modulus - 1);
    let forward = value.wrapping_sub(last_low) & (modulus - 1);
    if forward < modulus / 2 {
        last + forward
    } else {
        last - (modulus - forward)
    }
}

/// A received track's stats plus the state needed to keep them.
#[derive(Debug)]
struct TrackRecord {
    /// What is published in snapshots.
    stats: TrackStats,
    /// SSRC of the sequence being tracked.
    ssrc: Option<u32>,
    /// RTP sequence numbers seen (extended).
    seq: SeqWindow,
    /// Probe counters seen (extended).
    probe: SeqWindow,
    /// Whether payloads are searched for probes.
    read_probes: bool,
    /// Interarrival jitter of the current SSRC.
    jitter: JitterEstimator,
    /// Extended sequence number and RTP timestamp of the newest in-order packet.
    last_in_order: Option<(u64, u32)>,
    /// Video: the VP8 picture id of the newest in-order packet that had one.
    last_picture_id: Option<u16>,
}

/// RFC 3550 §6.4.1 interarrival jitter: the smoothed absolute difference between how far
/// apart two packets arrived and how far apart their RTP timestamps say they were sent.
#[derive(Debug, Default, Clone)]
pub struct JitterEstimator {
    /// Transit time (arrival in RTP clock units minus RTP timestamp) of the previous packet.
    last_transit: Option<u32>,
    /// The estimate, in RTP clock units.
    jitter: f64,
}

impl JitterEstimator {
    /// Takes one packet: its arrival time in RTP clock units (any origin, wrapping) and its RTP
    /// timestamp.
    pub fn on_packet(&mut self, arrival_units: u32, rtp_timestamp: u32) {
        let transit = arrival_units.wrapping_sub(rtp_timestamp);
        if let Some(last) = self.last_transit {
            let d = f64::from((transit.wrapping_sub(last) as i32).unsigned_abs());
            self.jitter += (d - self.jitter) / 16.0;
        }
        self.last_transit = Some(transit);
    }

    /// The estimate in RTP clock units.
    pub fn units(&self) -> f64 {
        self.jitter
    }
}

/// A fixed origin for arrival times in RTP clock units (any origin works; differences matter).
fn arrival_units(now: Instant, clock_rate: u32) -> u32 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let micros = now.saturating_duration_since(origin).as_micros() as u64;
    (micros * u64::from(clock_rate) / 1_000_000) as u32
}

impl TrackRecord {
    fn new(read_probes: bool) -> Self {
        TrackRecord {
            stats: TrackStats::default(),
            ssrc: None,
            seq: SeqWindow::default(),
            probe: SeqWindow::default(),
            read_probes,
            jitter: JitterEstimator::default(),
            last_in_order: None,
            last_picture_id: None,
        }
    }

    fn on_packet(&mut self, packet: &rtc::rtp::Packet, now: Instant, now_us: u64) {
        let s = &mut self.stats;
        let header = &packet.header;
        s.packets += 1;
        s.bytes += packet.payload.len() as u64;
        s.payload_type = Some(header.payload_type);
        s.last_packet_at = Some(now);
        if header.marker {
            s.markers += 1;
        }
        for ext in &header.extensions {
            if !s.extension_ids.contains(&ext.id) {
                s.extension_ids.push(ext.id);
            }
        }
        if !s.ssrcs.contains(&header.ssrc) {
            s.ssrcs.push(header.ssrc);
        }
        if self.ssrc != Some(header.ssrc) {
            if self.ssrc.is_some() {
                s.ssrc_changes += 1;
            }
            self.ssrc = Some(header.ssrc);
            self.seq = SeqWindow::default();
            self.jitter = JitterEstimator::default();
            self.last_in_order = None;
            self.last_picture_id = None;
        }
        let clock_rate = match s.kind {
            Some(TrackKind::Audio) => crate::media::AUDIO_CLOCK_RATE,
            _ => crate::media::VIDEO_CLOCK_RATE,
        };
        self.jitter
            .on_packet(arrival_units(now, clock_rate), header.timestamp);
        s.jitter_ms = self.jitter.units() * 1000.0 / f64::from(clock_rate);
        let is_video = s.kind == Some(TrackKind::Video);
        let keyframe = is_video && vp8_is_keyframe(&packet.payload);
        let keyframe_size = if keyframe {
            vp8_keyframe_size(&packet.payload)
        } else {
            None
        };
        if s.first_packet_at.is_none() {
            s.first_packet_at = Some(now);
            s.first_packet_keyframe = is_video.then_some(keyframe);
            let head = packet.payload.len().min(16);
            s.first_packet = Some((
                header.sequence_number,
                header.marker,
                packet.payload[..head].to_vec(),
            ));
        }
        if keyframe {
            s.keyframes += 1;
            s.first_keyframe_at.get_or_insert(now);
            s.last_keyframe_at = Some(now);
            s.frame_size = keyframe_size.or(s.frame_size);
        }

        let ext = extend(self.seq.highest, u64::from(header.sequence_number), 16);
        let arrival = self.seq.insert(ext);
        match arrival {
            Arrival::New { gap } => {
                if gap > 0 {
                    s.seq_gaps += 1;
                    s.seq_missing += gap;
                }
            }
            Arrival::Late => s.seq_late += 1,
            Arrival::Duplicate => s.seq_duplicates += 1,
            Arrival::TooOld => s.seq_late += 1,
        }
        let in_order = matches!(arrival, Arrival::New { .. });
        let previous = if in_order {
            self.last_in_order.replace((ext, header.timestamp))
        } else {
            None
        };
        let timestamp_step =
            previous.map(|(_, ts)| i64::from(header.timestamp.wrapping_sub(ts) as i32));
        let picture_id = is_video
            .then(|| parse_vp8_descriptor(&packet.payload))
            .flatten()
            .and_then(|d| d.picture_id);
        let picture_id_step = match (in_order, picture_id) {
            (true, Some(id)) => self
                .last_picture_id
                .replace(id)
                .map(|last| id.wrapping_sub(last) & 0x7fff),
            _ => None,
        };
        if timestamp_step.is_some_and(|step| step < 0) {
            s.timestamp_regressions += 1;
        }

        let kind = s.kind.unwrap_or(TrackKind::Video);
        let probe = if self.read_probes {
            parse_probe(kind, &packet.payload)
        } else {
            None
        };
        let Some((send_us, counter)) = probe else {
            return;
        };
        s.probe_packets += 1;
        if kind == TrackKind::Video {
            let layer = probe_layer(counter);
            match s.layer {
                Some(current) if current != layer => {
                    if !in_order {
                        // A late copy (a retransmission) of the layer before the switch: it
                        // counts for neither layer's probes.
                        return;
                    }
                    s.layer_switches.push(LayerSwitch {
                        at: now,
                        from: current,
                        to: layer,
                        on_keyframe: keyframe,
                        frame_size: keyframe_size,
                        seq_step: previous.map_or(0, |(seq, _)| ext - seq),
                        timestamp_step: timestamp_step.unwrap_or(0),
                        picture_id_step,
                    });
                    // Each layer has its own counter: loss is counted per layer.
                    if let (Some(first), Some(last)) = (s.probe_first, s.probe_last) {
                        s.probe_expected_earlier += last - first + 1;
                    }
                    s.probe_first = None;
                    s.probe_last = None;
                    self.probe = SeqWindow::default();
                    s.layer = Some(layer);
                }
                Some(_) => {}
                None => s.layer = Some(layer),
            }
        }
        let ext = extend(self.probe.highest, u64::from(counter), 32);
        let fresh = match self.probe.insert(ext) {
            Arrival::New { .. } | Arrival::Late => true,
            Arrival::Duplicate => {
                s.probe_duplicates += 1;
                false
            }
            Arrival::TooOld => false,
        };
        if fresh {
            s.probe_unique += 1;
            s.probe_first = Some(s.probe_first.map_or(ext, |f| f.min(ext)));
            s.probe_last = Some(s.probe_last.map_or(ext, |l| l.max(ext)));
            s.latency.record(now_us.saturating_sub(send_us));
        }
    }
}

/// Shared, lock-per-track store of what a peer receives and sends.
#[derive(Debug, Clone)]
pub struct StatsStore {
    /// Whether received payloads are searched for probes.
    read_probes: bool,
    /// Received tracks.
    received: Arc<Mutex<HashMap<TrackKey, Arc<Mutex<TrackRecord>>>>>,
    /// Published tracks.
    sent: Arc<Mutex<HashMap<TrackKind, SentStats>>>,
}

impl Default for StatsStore {
    fn default() -> Self {
        StatsStore::new(true)
    }
}

impl StatsStore {
    /// An empty store; `read_probes` says whether received payloads carry synthetic probes.
    pub fn new(read_probes: bool) -> Self {
        StatsStore {
            read_probes,
            received: Arc::default(),
            sent: Arc::default(),
        }
    }

    /// A snapshot of everything.
    pub fn snapshot(&self) -> PeerStats {
        let records: Vec<(TrackKey, Arc<Mutex<TrackRecord>>)> = lock(&self.received)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        let tracks = records
            .into_iter()
            .map(|(k, v)| (k, lock(&v).stats.clone()))
            .collect();
        PeerStats {
            tracks,
            sent: lock(&self.sent).clone(),
        }
    }

    /// Calls `f` with every received track's stats in turn, without copying them (each
    /// track's lock is held only during its call). For frequent polling of many peers.
    pub fn for_each_received(&self, mut f: impl FnMut(&TrackKey, &TrackStats)) {
        let records: Vec<(TrackKey, Arc<Mutex<TrackRecord>>)> = lock(&self.received)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        for (key, record) in records {
            f(&key, &lock(&record).stats);
        }
    }

    /// A copy of the published tracks' stats only.
    pub fn sent(&self) -> HashMap<TrackKind, SentStats> {
        lock(&self.sent).clone()
    }

    /// Updates the stats of the published track of `kind`.
    pub fn update_sent(&self, kind: TrackKind, f: impl FnOnce(&mut SentStats)) {
        f(lock(&self.sent).entry(kind).or_default());
    }

    fn record(&self, key: TrackKey) -> Arc<Mutex<TrackRecord>> {
        let read_probes = self.read_probes;
        Arc::clone(
            lock(&self.received)
                .entry(key)
                .or_insert_with(|| Arc::new(Mutex::new(TrackRecord::new(read_probes)))),
        )
    }

    /// Reads `track` until it ends, recording every packet under its msid.
    pub async fn record_track(&self, track: Arc<dyn TrackRemote>) {
        let key = (track.stream_id().await, track.track_id().await);
        let kind = match track.kind().await {
            rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Audio => Some(TrackKind::Audio),
            rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Video => Some(TrackKind::Video),
            _ => None,
        };
        tracing::debug!(publisher = %key.0, track = %key.1, ?kind, "remote track");
        let record = self.record(key.clone());
        {
            let mut r = lock(&record);
            r.stats.kind = kind.or(r.stats.kind);
            r.stats.opened_at.get_or_insert_with(Instant::now);
            r.stats.ended = false;
        }
        while let Some(event) = track.poll().await {
            match event {
                TrackRemoteEvent::OnRtpPacket(packet) => {
                    let now = Instant::now();
                    let now_us = crate::unix_micros();
                    lock(&record).on_packet(&packet, now, now_us);
                }
                TrackRemoteEvent::OnOpen(init) => {
                    let mut r = lock(&record);
                    if !r.stats.ssrcs.contains(&init.ssrc) {
                        r.stats.ssrcs.push(init.ssrc);
                    }
                    if let Some(rid) = init.rid {
                        if !r.stats.rids.contains(&rid) {
                            r.stats.rids.push(rid);
                        }
                    }
                }
                TrackRemoteEvent::OnEnded => break,
                _ => {}
            }
        }
        tracing::debug!(publisher = %key.0, track = %key.1, "remote track ended");
        lock(&record).stats.ended = true;
    }
}

/// Locks a std mutex, ignoring poisoning (stats stay usable after a panic elsewhere).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn packet(seq: u16, payload: Bytes) -> rtc::rtp::Packet {
        rtc::rtp::Packet {
            header: rtc::rtp::header::Header {
                version: 2,
                sequence_number: seq,
                ssrc: 7,
                ..Default::default()
            },
            payload,
        }
    }

    #[test]
    fn extend_handles_wraparound() {
        let a = extend(None, 65_534, 16);
        let b = extend(Some(a), 1, 16);
        assert_eq!(b - a, 3);
        let c = extend(Some(b), 65_535, 16);
        assert_eq!(b - c, 2);
    }

    #[test]
    fn sequence_gaps_duplicates_and_late_packets_are_counted() {
        let mut r = TrackRecord::new(true);
        r.stats.kind = Some(TrackKind::Audio);
        let now = Instant::now();
        let probe = |c: u32| crate::media::probe_bytes(1_750_000_000_000_000, c);
        for (seq, counter) in [
            (65_534u16, 0u32),
            (65_535, 1),
            (0, 2),
            (3, 5),
            (1, 3),
            (1, 3),
        ] {
            r.on_packet(&packet(seq, probe(counter)), now, 1_750_000_000_001_000);
        }
        let s = &r.stats;
        assert_eq!(s.packets, 6);
        assert_eq!((s.seq_gaps, s.seq_missing), (1, 2));
        assert_eq!(s.seq_late, 1);
        assert_eq!(s.seq_duplicates, 1);
        assert!(!s.seq_continuous());
        assert_eq!(s.probe_unique, 5);
        assert_eq!(s.probe_duplicates, 1);
        assert_eq!(s.probe_lost(), 1, "counter 4 never arrived");
        assert_eq!(s.latency.count(), 5);
        assert_eq!(s.latency.quantile_us(0.5), Some(1000));
    }

    /// What an SFU forwards of a simulcast track: layer 0 then, from a keyframe on, layer 2,
    /// renumbered as one stream.
    #[test]
    fn layer_switches_are_recorded_with_their_continuity() {
        use crate::media::{VideoConfig, VideoSource};
        let layer = |index: u8, width: u16| {
            let config = VideoConfig {
                width,
                height: width * 9 / 16,
                layer: index,
                keyframe_interval: None,
                ..VideoConfig::default()
            };
            VideoSource::new(config, 100 + u32::from(index), 96)
        };
        let (mut low, mut high) = (layer(0, 320), layer(2, 1280));
        let mut r = TrackRecord::new(true);
        r.stats.kind = Some(TrackKind::Video);
        let t0 = Instant::now();
        let now_us = 1_750_000_000_000_000;
        let (mut seq, mut ts) = (65_530u16, 1_000u32);
        let mut forward = |r: &mut TrackRecord, mut p: rtc::rtp::Packet, ts_step: u32| {
            p.header.ssrc = 7;
            p.header.sequence_number = seq;
            ts = ts.wrapping_add(ts_step);
            p.header.timestamp = ts;
            seq = seq.wrapping_add(1);
            r.on_packet(&p, t0, now_us);
        };
        for i in 0..5u64 {
            let at = t0 + std::time::Duration::from_millis(33 * i);
            let frame = low.next_frame(at, now_us);
            for (k, p) in frame.packets.into_iter().enumerate() {
                forward(&mut r, p, if k == 0 && i > 0 { 3000 } else { 0 });
            }
            // The high layer runs alongside; the SFU drops it until its keyframe.
            high.next_frame(at, now_us);
        }
        assert_eq!(
            (r.stats.layer, r.stats.frame_size),
            (Some(0), Some((320, 180)))
        );
        high.request_keyframe();
        let frame = high.next_frame(t0 + std::time::Duration::from_millis(200), now_us);
        for (k, p) in frame.packets.into_iter().enumerate() {
            forward(&mut r, p, if k == 0 { 3000 } else { 0 });
        }
        let s = &r.stats;
        assert_eq!((s.layer, s.frame_size), (Some(2), Some((1280, 720))));
        assert_eq!(s.layer_switches.len(), 1);
        let switch = &s.layer_switches[0];
        assert_eq!((switch.from, switch.to), (0, 2));
        assert!(switch.on_keyframe);
        assert_eq!(switch.frame_size, Some((1280, 720)));
        assert_eq!((switch.seq_step, switch.timestamp_step), (1, 3000));
        assert!(s.seq_continuous(), "{s:#?}");
        assert_eq!(s.timestamp_regressions, 0);
        // Each layer's counter is its own: no loss across the switch.
        assert_eq!(s.probe_lost(), 0, "{s:#?}");
        assert_eq!(s.probe_expected(), s.probe_unique);

        // A late retransmission of the old layer is not a switch back.
        let mut late = low.next_frame(t0 + std::time::Duration::from_millis(233), now_us);
        let mut p = late.packets.remove(0);
        p.header.ssrc = 7;
        p.header.sequence_number = seq.wrapping_sub(3);
        p.header.timestamp = ts;
        r.on_packet(&p, t0, now_us);
        assert_eq!(r.stats.layer, Some(2));
        assert_eq!(r.stats.layer_switches.len(), 1);
        // A timeline that steps back is counted.
        let mut next = high.next_frame(t0 + std::time::Duration::from_millis(266), now_us);
        let mut p = next.packets.remove(0);
        p.header.ssrc = 7;
        p.header.sequence_number = seq;
        p.header.timestamp = ts.wrapping_sub(90);
        r.on_packet(&p, t0, now_us);
        assert_eq!(r.stats.timestamp_regressions, 1);
    }

    #[test]
    fn jitter_follows_rfc_3550() {
        // Packets 20 ms apart in RTP time (960 units at 48 kHz) arriving exactly on time: none.
        let mut j = JitterEstimator::default();
        for i in 0..50u32 {
            j.on_packet(1_000 + i * 960, 7_000 + i * 960);
        }
        assert_eq!(j.units(), 0.0);
        // Every other packet 480 units (10 ms) late: |D| is always 480, so the estimate
        // converges on 480.
        let mut j = JitterEstimator::default();
        for i in 0..400u32 {
            let late = if i % 2 == 1 { 480 } else { 0 };
            j.on_packet(i * 960 + late, (u32::MAX - 100).wrapping_add(i * 960));
        }
        assert!((j.units() - 480.0).abs() < 1.0, "{}", j.units());
        // One step of the recurrence: J = J + (|D| - J) / 16.
        let mut j = JitterEstimator::default();
        j.on_packet(0, 0);
        j.on_packet(1160, 960);
        assert_eq!(j.units(), 200.0 / 16.0);
    }

    #[test]
    fn probes_are_ignored_when_not_read() {
        let mut r = TrackRecord::new(false);
        r.stats.kind = Some(TrackKind::Audio);
        let probe = crate::media::probe_bytes(1_750_000_000_000_000, 0);
        r.on_packet(&packet(1, probe), Instant::now(), 1_750_000_000_001_000);
        assert_eq!(r.stats.packets, 1);
        assert_eq!(r.stats.probe_packets, 0);
        assert_eq!(r.stats.latency.count(), 0);
    }

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = LatencyHistogram::default();
        for v in 1..=10_000u64 {
            h.record(v * 10);
        }
        for (q, exact) in [(0.5, 50_000.0), (0.9, 90_000.0), (0.99, 99_000.0)] {
            let got = h.quantile_us(q).unwrap() as f64;
            assert!((got - exact).abs() / exact < 0.04, "q{q}: {got} vs {exact}");
        }
        assert_eq!(h.quantile_us(1.0), Some(100_000));
        assert_eq!(h.quantile_us(0.0), Some(10));
        let mut other = LatencyHistogram::default();
        other.record(5);
        h.merge(&other);
        assert_eq!(h.min_us(), Some(5));
        assert_eq!(h.count(), 10_001);
        // Exact for small values.
        for v in 0..64 {
            assert_eq!(LatencyHistogram::value(LatencyHistogram::index(v)), v);
        }
    }
}
