//! Simulcast layer choice, as plain values: which layers a track has (ranked by resolution,
//! whatever their rids), which one a subscriber should get for the quality it asked for and
//! the bandwidth it has, and when a switch may happen (only on a keyframe of the target
//! layer; until then the current layer keeps flowing, so the picture never freezes).

use std::time::{Duration, Instant};

/// The quality a subscriber asks for (`set_quality`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Quality {
    /// The smallest layer.
    Low,
    /// The middle layer (with two layers, the same as `Low`).
    Medium,
    /// The largest layer.
    #[default]
    High,
}

/// A layer stops counting as available when nothing arrived on it for this long (a browser
/// pauses layers its uplink cannot carry).
const LAYER_IDLE: Duration = Duration::from_millis(1500);
/// Bitrate is measured over windows of this length.
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// What the fan-out knows about one incoming layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The layer's SSRC.
    pub ssrc: u32,
    /// Its rid, if the publisher named it.
    pub rid: Option<String>,
    /// Frame size from its last keyframe, where the codec says (VP8, VP9).
    pub resolution: Option<(u16, u16)>,
    /// Measured bitrate, bits per second.
    pub bitrate_bps: u64,
    last_packet: Option<Instant>,
    window_start: Option<Instant>,
    window_bytes: u64,
}

impl Layer {
    /// A layer seen for the first time.
    pub fn new(ssrc: u32, rid: Option<String>) -> Self {
        Self {
            ssrc,
            rid,
            resolution: None,
            bitrate_bps: 0,
            last_packet: None,
            window_start: None,
            window_bytes: 0,
        }
    }

    /// Accounts one packet of `bytes`.
    pub fn on_packet(&mut self, bytes: usize, now: Instant) {
        self.last_packet = Some(now);
        let start = *self.window_start.get_or_insert(now);
        self.window_bytes += bytes as u64;
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= RATE_WINDOW {
            self.bitrate_bps =
                self.window_bytes * 8 * 1_000_000 / elapsed.as_micros().max(1) as u64;
            self.window_start = Some(now);
            self.window_bytes = 0;
        }
    }

    fn available(&self, now: Instant) -> bool {
        self.last_packet
            .is_some_and(|at| now.saturating_duration_since(at) < LAYER_IDLE)
    }

    fn size_key(&self) -> (u32, u64) {
        let area = self
            .resolution
            .map_or(0, |(w, h)| u32::from(w) * u32::from(h));
        (area, self.bitrate_bps)
    }
}

/// The available layers, smallest first: by resolution where every layer's is known, else by
/// bitrate (a larger picture costs more bits).
pub fn ranked(layers: &[Layer], now: Instant) -> Vec<&Layer> {
    let mut available: Vec<&Layer> = layers.iter().filter(|l| l.available(now)).collect();
    let all_sized = available.iter().all(|l| l.resolution.is_some());
    if all_sized {
        available.sort_by_key(|l| l.size_key());
    } else {
        available.sort_by_key(|l| l.bitrate_bps);
    }
    available
}

/// The layer a subscriber should receive: the one its quality names, stepped down while it
/// exceeds the subscriber's bandwidth budget. `None` while no layer is available.
pub fn choose(ranked: &[&Layer], quality: Quality, budget_bps: Option<u64>) -> Option<u32> {
    if ranked.is_empty() {
        return None;
    }
    let n = ranked.len();
    let mut index = match quality {
        Quality::High => n - 1,
        Quality::Medium if n >= 3 => n / 2,
        Quality::Medium | Quality::Low => 0,
    };
    if let Some(budget) = budget_bps {
        while index > 0 && ranked[index].bitrate_bps > budget {
            index -= 1;
        }
    }
    Some(ranked[index].ssrc)
}

/// Whether a packet of a layer goes to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerVerdict {
    /// Forward it; `switched` when it starts a new layer (the sequence must be re-based).
    Forward {
        /// The first packet of a newly switched-to layer.
        switched: bool,
    },
    /// Not this subscriber's layer.
    Drop,
}

/// One subscriber's layer state for one track.
#[derive(Debug, Clone, Default)]
pub struct LayerSelector {
    current: Option<u32>,
    target: Option<u32>,
}

impl LayerSelector {
    /// Sets the layer to move to; it takes effect at that layer's next keyframe.
    pub fn set_target(&mut self, ssrc: Option<u32>) {
        self.target = ssrc;
    }

    /// The layer being forwarded.
    pub fn current(&self) -> Option<u32> {
        self.current
    }

    /// The layer whose keyframe the subscriber waits for, if a switch is pending.
    pub fn pending(&self) -> Option<u32> {
        self.target.filter(|t| Some(*t) != self.current)
    }

    /// Decides for one packet of layer `ssrc`. `needs_keyframe`: the codec can only start on a
    /// keyframe (video); audio and unknown codecs switch at once.
    pub fn on_packet(
        &mut self,
        ssrc: u32,
        keyframe_start: bool,
        needs_keyframe: bool,
    ) -> LayerVerdict {
        if Some(ssrc) == self.pending() && (keyframe_start || !needs_keyframe) {
            self.current = Some(ssrc);
            return LayerVerdict::Forward { switched: true };
        }
        if Some(ssrc) == self.current {
            return LayerVerdict::Forward { switched: false };
        }
        LayerVerdict::Drop
    }
}

/// How long after the last sign of congestion a subscriber's layers stay capped.
const CONGESTION_HOLD: Duration = Duration::from_secs(8);
/// An estimate this much above what is being sent means the path has room.
const HEADROOM: f64 = 1.15;

/// What a subscriber's connection may carry, as far as layer choice is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownlinkBudget {
    /// No sign of congestion: every track gets the quality it asked for.
    Unlimited,
    /// The receiver's estimate, bits per second, to be shared among its video tracks.
    Cap(u64),
}

/// Reads a receiver's bandwidth estimates (REMB) as a congestion signal. A receiver only
/// estimates a little above what it receives (it learns capacity by being sent more), so the
/// estimate cannot be used as a target — every subscriber would stay on its first layer. It
/// caps the layers while it is not comfortably above what the SFU sends, and for a while
/// after, and is lifted once the path has shown room for long enough.
#[derive(Debug, Default)]
pub struct DownlinkGovernor {
    congested_at: Option<Instant>,
    last_sample: Option<(u64, Instant)>,
    sent_bps: u64,
}

impl DownlinkGovernor {
    /// A new estimate, with the total bytes sent to this receiver so far.
    pub fn on_estimate(
        &mut self,
        estimate_bps: u64,
        sent_bytes: u64,
        now: Instant,
    ) -> DownlinkBudget {
        if let Some((bytes, at)) = self.last_sample {
            let elapsed = now.saturating_duration_since(at);
            if elapsed >= Duration::from_millis(100) {
                self.sent_bps = sent_bytes.saturating_sub(bytes) * 8 * 1_000_000
                    / elapsed.as_micros().max(1) as u64;
                self.last_sample = Some((sent_bytes, now));
            }
        } else {
            self.last_sample = Some((sent_bytes, now));
        }
        if (estimate_bps as f64) < self.sent_bps as f64 * HEADROOM {
            self.congested_at = Some(now);
        }
        match self.congested_at {
            Some(at) if now.saturating_duration_since(at) < CONGESTION_HOLD => {
                DownlinkBudget::Cap(estimate_bps)
            }
            _ => DownlinkBudget::Unlimited,
        }
    }
}

/// Frame size from a VP8 keyframe's payload (RFC 7741 descriptor, then the frame header).
pub fn vp8_keyframe_size(payload: &[u8]) -> Option<(u16, u16)> {
    let first = *payload.first()?;
    let mut offset = 1;
    if first & 0x80 != 0 {
        let ext = *payload.get(offset)?;
        offset += 1;
        if ext & 0x80 != 0 {
            offset += if payload.get(offset)? & 0x80 != 0 {
                2
            } else {
                1
            };
        }
        if ext & 0x40 != 0 {
            offset += 1;
        }
        if ext & 0x30 != 0 {
            offset += 1;
        }
    }
    let frame = payload.get(offset..offset + 10)?;
    if frame[0] & 0x01 != 0 || frame[3..6] != [0x9d, 0x01, 0x2a] {
        return None;
    }
    let width = u16::from_le_bytes([frame[6], frame[7]]) & 0x3fff;
    let height = u16::from_le_bytes([frame[8], frame[9]]) & 0x3fff;
    Some((width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(ssrc: u32, resolution: Option<(u16, u16)>, bitrate: u64, now: Instant) -> Layer {
        let mut l = Layer::new(ssrc, None);
        l.resolution = resolution;
        l.bitrate_bps = bitrate;
        l.last_packet = Some(now);
        l
    }

    #[test]
    fn layers_rank_by_resolution_whatever_their_order_or_rids() {
        let now = Instant::now();
        let layers = vec![
            layer(1, Some((1280, 720)), 1_500_000, now),
            layer(2, Some((320, 180)), 150_000, now),
            layer(3, Some((640, 360)), 500_000, now),
        ];
        let r = ranked(&layers, now);
        assert_eq!(r.iter().map(|l| l.ssrc).collect::<Vec<_>>(), vec![2, 3, 1]);
        assert_eq!(choose(&r, Quality::Low, None), Some(2));
        assert_eq!(choose(&r, Quality::Medium, None), Some(3));
        assert_eq!(choose(&r, Quality::High, None), Some(1));
    }

    #[test]
    fn without_sizes_layers_rank_by_bitrate_and_two_layers_make_medium_low() {
        let now = Instant::now();
        let layers = vec![
            layer(7, None, 900_000, now),
            layer(8, Some((320, 180)), 100_000, now),
        ];
        let r = ranked(&layers, now);
        assert_eq!(r[0].ssrc, 8);
        assert_eq!(choose(&r, Quality::Medium, None), Some(8));
        assert_eq!(choose(&r, Quality::High, None), Some(7));
    }

    #[test]
    fn bandwidth_steps_the_choice_down_but_never_below_the_lowest() {
        let now = Instant::now();
        let layers = vec![
            layer(1, Some((1280, 720)), 1_500_000, now),
            layer(2, Some((320, 180)), 150_000, now),
            layer(3, Some((640, 360)), 500_000, now),
        ];
        let r = ranked(&layers, now);
        assert_eq!(choose(&r, Quality::High, Some(600_000)), Some(3));
        assert_eq!(choose(&r, Quality::High, Some(10_000)), Some(2));
        assert_eq!(choose(&r, Quality::Low, Some(10_000_000)), Some(2));
    }

    #[test]
    fn idle_layers_are_not_offered() {
        let now = Instant::now();
        let mut stale = layer(1, Some((1280, 720)), 1_500_000, now);
        stale.last_packet = Some(now - Duration::from_secs(3));
        let layers = vec![stale, layer(2, Some((320, 180)), 150_000, now)];
        assert_eq!(choose(&ranked(&layers, now), Quality::High, None), Some(2));
        assert_eq!(choose(&ranked(&[], now), Quality::High, None), None);
    }

    #[test]
    fn a_switch_waits_for_the_target_keyframe_while_the_current_layer_flows() {
        let mut s = LayerSelector::default();
        s.set_target(Some(10));
        assert_eq!(
            s.on_packet(10, false, true),
            LayerVerdict::Drop,
            "start on a keyframe"
        );
        assert_eq!(
            s.on_packet(20, true, true),
            LayerVerdict::Drop,
            "not the target"
        );
        assert_eq!(
            s.on_packet(10, true, true),
            LayerVerdict::Forward { switched: true }
        );
        assert_eq!(
            s.on_packet(10, false, true),
            LayerVerdict::Forward { switched: false }
        );
        s.set_target(Some(20));
        assert_eq!(s.pending(), Some(20));
        assert_eq!(
            s.on_packet(20, false, true),
            LayerVerdict::Drop,
            "a non-keyframe of the target is dropped"
        );
        assert_eq!(
            s.on_packet(10, false, true),
            LayerVerdict::Forward { switched: false },
            "the current layer keeps flowing"
        );
        assert_eq!(
            s.on_packet(20, true, true),
            LayerVerdict::Forward { switched: true }
        );
        assert_eq!(
            s.on_packet(10, true, true),
            LayerVerdict::Drop,
            "the old layer stops"
        );
        assert_eq!(s.pending(), None);
    }

    #[test]
    fn bitrate_is_measured_per_window() {
        let t0 = Instant::now();
        let mut l = Layer::new(1, Some("f".into()));
        for i in 0..=50 {
            l.on_packet(1250, t0 + Duration::from_millis(i * 10));
        }
        // 50 packets of 10 kbit over 0.5 s, measured at the window's end.
        assert!(
            (900_000..=1_100_000).contains(&l.bitrate_bps),
            "{}",
            l.bitrate_bps
        );
    }

    #[test]
    fn estimates_above_what_is_sent_leave_layers_alone() {
        let t0 = Instant::now();
        let mut g = DownlinkGovernor::default();
        // 500 kbit/s sent; the receiver estimates 1.5x that, as Chromium does on a good path.
        let mut bytes = 0;
        for i in 0..10 {
            bytes += 62_500 / 5;
            let now = t0 + Duration::from_millis(200 * (i + 1));
            assert_eq!(
                g.on_estimate(750_000, bytes, now),
                DownlinkBudget::Unlimited
            );
        }
    }

    #[test]
    fn an_estimate_below_what_is_sent_caps_until_the_path_has_room_for_a_while() {
        let t0 = Instant::now();
        let mut g = DownlinkGovernor::default();
        let mut bytes = 0u64;
        let mut at = t0;
        let mut step = |g: &mut DownlinkGovernor, estimate: u64, secs: f64| {
            // 1 Mbit/s sent.
            bytes += (125_000.0 * secs) as u64;
            at += Duration::from_secs_f64(secs);
            g.on_estimate(estimate, bytes, at)
        };
        assert_eq!(step(&mut g, 2_000_000, 0.2), DownlinkBudget::Unlimited);
        assert_eq!(step(&mut g, 2_000_000, 0.2), DownlinkBudget::Unlimited);
        assert_eq!(step(&mut g, 600_000, 0.2), DownlinkBudget::Cap(600_000));
        // The path recovers: still capped (following the estimate) during the hold.
        assert_eq!(step(&mut g, 2_000_000, 2.0), DownlinkBudget::Cap(2_000_000));
        assert_eq!(step(&mut g, 2_000_000, 7.0), DownlinkBudget::Unlimited);
    }

    #[test]
    fn vp8_keyframe_size_is_read_from_the_frame_header() {
        // Descriptor with X, I (15-bit picture id); frame tag (keyframe), start code, 640x360.
        let payload = [
            0x90, 0x80, 0x81, 0x02, 0x50, 0x01, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0x68, 0x01,
        ];
        assert_eq!(vp8_keyframe_size(&payload), Some((640, 360)));
        let interframe = [
            0x10, 0x51, 0x01, 0x00, 0x9d, 0x01, 0x2a, 0x80, 0x02, 0x68, 0x01,
        ];
        assert_eq!(vp8_keyframe_size(&interframe), None);
        assert_eq!(vp8_keyframe_size(&[0x90]), None);
    }
}
