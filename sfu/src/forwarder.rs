//! The per-packet forwarding decision for one track to one subscriber: forward (with the
//! rewritten sequence number, timestamp and picture numbers) or drop with a named reason. It
//! is a plain value with no IO and no clock of its own (time is an argument), so every rule is
//! unit-tested with synthetic packets. Sending is someone else's job.

use crate::codec::PictureNumbering;
use std::time::Instant;

/// Why a packet was not forwarded to a subscriber; each is counted in
/// `sfu_dropped_packets_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The publisher muted the track.
    Muted,
    /// The subscriber has not yet answered an offer containing this track.
    NotNegotiated,
    /// Video for a subscriber that must start (or restart) on a keyframe.
    AwaitingKeyframe,
    /// A packet already forwarded (a duplicate), or from before the last restart point.
    Stale,
    /// The subscriber's send queue was full: it cannot keep up.
    SubscriberCongested,
    /// The subscriber's connection is closing (or its track no longer bound to it).
    SubscriberGone,
    /// A simulcast layer this subscriber is not receiving.
    LayerNotSelected,
}

impl DropReason {
    /// Every reason, for pre-registering metric labels.
    pub const ALL: [DropReason; 7] = [
        DropReason::Muted,
        DropReason::NotNegotiated,
        DropReason::AwaitingKeyframe,
        DropReason::Stale,
        DropReason::SubscriberCongested,
        DropReason::SubscriberGone,
        DropReason::LayerNotSelected,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Muted => "muted",
            DropReason::NotNegotiated => "not_negotiated",
            DropReason::AwaitingKeyframe => "awaiting_keyframe",
            DropReason::Stale => "stale",
            DropReason::SubscriberCongested => "subscriber_congested",
            DropReason::SubscriberGone => "subscriber_gone",
            DropReason::LayerNotSelected => "layer_not_selected",
        }
    }
}

/// What the forwarder needs to know about an incoming packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketMeta {
    /// The publisher's RTP sequence number.
    pub seq: u16,
    /// The publisher's RTP timestamp.
    pub timestamp: u32,
    /// Whether the packet is the first packet of a keyframe.
    pub keyframe_start: bool,
    /// The picture numbers in its payload descriptor (VP8, VP9), if any.
    pub numbering: Option<PictureNumbering>,
}

/// The forwarding decision for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it with these header values.
    Forward {
        /// Sequence number in the subscriber's numbering (gap-free across drops).
        seq: u16,
        /// Timestamp in the subscriber's timeline.
        timestamp: u32,
        /// Picture numbers to write into the payload, when they differ from the publisher's
        /// (after a switch between simulcast layers); `None`: send the payload as it is.
        numbering: Option<PictureNumbering>,
    },
    /// Do not send it.
    Drop(DropReason),
}

/// Forwarding state of one track towards one subscriber.
#[derive(Debug)]
pub struct Forwarder {
    /// Video must start on a keyframe; audio can start anywhere.
    needs_keyframe: bool,
    /// Set once the subscriber's answer bound this track to a payload type and SSRC.
    negotiated: bool,
    /// Mirrors the publisher's mute.
    muted: bool,
    /// True until a keyframe arrives after the start, an unmute or a switch.
    awaiting_keyframe: bool,
    munger: Munger,
    renumber: Renumber,
}

impl Forwarder {
    /// A forwarder for a track of the given clock rate.
    pub fn new(needs_keyframe: bool, clock_rate: u32) -> Self {
        Self {
            needs_keyframe,
            negotiated: false,
            muted: false,
            awaiting_keyframe: needs_keyframe,
            munger: Munger::new(clock_rate),
            renumber: Renumber::default(),
        }
    }

    /// The subscriber answered: packets may flow.
    pub fn set_negotiated(&mut self) {
        self.negotiated = true;
    }

    /// The publisher muted or unmuted the track.
    pub fn set_muted(&mut self, muted: bool) {
        if muted && !self.muted {
            self.munger.pause();
        }
        if !muted && self.muted {
            self.awaiting_keyframe = self.needs_keyframe;
        }
        self.muted = muted;
    }

    /// Restart on the next keyframe, continuing the numbering (a simulcast layer switch, or a
    /// decoder that asked for a keyframe after losing too much).
    pub fn restart_on_keyframe(&mut self) {
        if self.needs_keyframe {
            self.awaiting_keyframe = true;
            self.munger.pause();
        }
    }

    /// The packets now come from another source (a simulcast layer switch, or a publisher that
    /// restarted with a new SSRC): the numbering continues from the last forwarded packet.
    pub fn switch_source(&mut self) {
        self.munger.pause_new_source();
        self.renumber.switch_source();
    }

    /// Whether this subscriber is blocked on a keyframe the publisher should be asked for.
    pub fn wants_keyframe(&self) -> bool {
        self.negotiated && !self.muted && self.awaiting_keyframe
    }

    /// Decides what to do with one packet of the source this subscriber receives.
    pub fn decide(&mut self, packet: &PacketMeta, now: Instant) -> Decision {
        if !self.negotiated {
            return Decision::Drop(DropReason::NotNegotiated);
        }
        if self.muted {
            return Decision::Drop(DropReason::Muted);
        }
        if self.awaiting_keyframe {
            if !packet.keyframe_start {
                return Decision::Drop(DropReason::AwaitingKeyframe);
            }
            self.munger.pause();
        }
        match self.munger.rewrite(packet.seq, packet.timestamp, now) {
            Some((seq, timestamp)) => {
                // Only a keyframe that is actually forwarded ends the wait (a stale copy of
                // an old one does not).
                self.awaiting_keyframe = false;
                let numbering = packet.numbering.and_then(|numbering| {
                    let out = self.renumber.rewrite(numbering);
                    (out != numbering).then_some(out)
                });
                Decision::Forward {
                    seq,
                    timestamp,
                    numbering,
                }
            }
            None => Decision::Drop(DropReason::Stale),
        }
    }
}

/// How many sequence numbers behind the newest one a late packet may still be forwarded (and
/// duplicates recognised).
const REORDER_WINDOW: u16 = 128;

/// Whether, and how, the munger re-bases its offsets on the next forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rebase {
    /// Packets continue the current segment.
    No,
    /// The same source resumes after a gap; its packets up to `newest_in` were seen already.
    SameSource { newest_in: u16 },
    /// A new source (or the very first packet): any packet may start the segment.
    NewSource,
}

/// Rewrites sequence numbers and timestamps so that the subscriber sees one gap-free stream
/// whatever was dropped in between (SRTP drops a reused sequence number as a replay, and a
/// decoder treats a gap as loss and asks for retransmission).
#[derive(Debug)]
struct Munger {
    clock_rate: u32,
    /// No packet has been forwarded yet.
    fresh: bool,
    /// Whether the next forwarded packet starts a new segment (offsets re-based on it).
    rebase: Rebase,
    seq_offset: u16,
    ts_offset: u32,
    /// Newest incoming sequence number forwarded in this segment.
    highest_in: u16,
    /// First incoming sequence number of this segment: older packets belong to a previous one.
    segment_start_in: u16,
    /// Which of the last `REORDER_WINDOW` incoming numbers were forwarded (bit i = highest_in - i).
    seen: u128,
    last_out_seq: u16,
    last_out_ts: u32,
    last_out_at: Option<Instant>,
}

impl Munger {
    fn new(clock_rate: u32) -> Self {
        Self {
            clock_rate: clock_rate.max(1),
            fresh: true,
            rebase: Rebase::NewSource,
            seq_offset: 0,
            ts_offset: 0,
            highest_in: 0,
            segment_start_in: 0,
            seen: 0,
            last_out_seq: 0,
            last_out_ts: 0,
            last_out_at: None,
        }
    }

    /// The same source continues after a gap (mute, restart on a keyframe): only packets newer
    /// than the newest one forwarded may start the next segment.
    fn pause(&mut self) {
        if self.rebase == Rebase::No {
            self.rebase = Rebase::SameSource {
                newest_in: self.highest_in,
            };
        }
    }

    /// Another source follows, with its own numbering.
    fn pause_new_source(&mut self) {
        self.rebase = Rebase::NewSource;
    }

    fn rewrite(&mut self, seq: u16, ts: u32, now: Instant) -> Option<(u16, u32)> {
        if self.rebase != Rebase::No {
            if let Rebase::SameSource { newest_in } = self.rebase {
                // A late or duplicate packet from before the gap must not start the segment:
                // the subscriber already has it (or has given up on it).
                if !self.fresh && (seq.wrapping_sub(newest_in) as i16) <= 0 {
                    return None;
                }
            }
            if self.fresh {
                // The subscriber's stream is new: keep the publisher's numbering.
                self.seq_offset = 0;
                self.ts_offset = 0;
                self.fresh = false;
            } else {
                let next_seq = self.last_out_seq.wrapping_add(1);
                self.seq_offset = seq.wrapping_sub(next_seq);
                // Advance the timeline by the wall time that passed, so playout keeps pace.
                let elapsed = self
                    .last_out_at
                    .map(|at| now.saturating_duration_since(at))
                    .unwrap_or_default();
                let ticks =
                    (elapsed.as_micros() as u64 * self.clock_rate as u64 / 1_000_000).max(1) as u32;
                self.ts_offset = ts.wrapping_sub(self.last_out_ts.wrapping_add(ticks));
            }
            self.rebase = Rebase::No;
            self.highest_in = seq;
            self.segment_start_in = seq;
            self.seen = 1;
            return Some(self.emit(seq, ts, now, true));
        }

        let ahead = seq.wrapping_sub(self.highest_in) as i16;
        if ahead > 0 {
            let shift = ahead as u32;
            self.seen = if shift >= 128 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.highest_in = seq;
            return Some(self.emit(seq, ts, now, true));
        }
        let behind = (-(ahead as i32)) as u16;
        let in_segment = (seq.wrapping_sub(self.segment_start_in) as i16) >= 0;
        if behind >= REORDER_WINDOW || !in_segment {
            return None;
        }
        let bit = 1u128 << behind;
        if self.seen & bit != 0 {
            return None;
        }
        self.seen |= bit;
        Some(self.emit(seq, ts, now, false))
    }

    fn emit(&mut self, seq: u16, ts: u32, now: Instant, newest: bool) -> (u16, u32) {
        let out_seq = seq.wrapping_sub(self.seq_offset);
        let out_ts = ts.wrapping_sub(self.ts_offset);
        if newest {
            self.last_out_seq = out_seq;
            self.last_out_ts = out_ts;
            self.last_out_at = Some(now);
        }
        (out_seq, out_ts)
    }
}

/// Keeps a subscriber's picture numbers (PictureID, TL0PICIDX, KEYIDX) continuous across
/// source switches, as the munger does for sequence numbers: the new source's numbers are
/// shifted to continue from the last ones sent. Within one source they pass through with the
/// same shift (their gaps are the publisher's, and mean the same to the subscriber).
#[derive(Debug, Default)]
struct Renumber {
    /// The shifts are re-based on the next packet that carries numbers.
    rebase: bool,
    picture_id_shift: u16,
    tl0_shift: u8,
    key_idx_shift: u8,
    /// The newest numbers sent (those of the newest picture).
    last_out: Option<PictureNumbering>,
}

impl Renumber {
    fn switch_source(&mut self) {
        self.rebase = true;
    }

    fn rewrite(&mut self, input: PictureNumbering) -> PictureNumbering {
        if std::mem::take(&mut self.rebase) {
            if let Some(last) = self.last_out {
                if let (Some(id), Some(last_id)) = (input.picture_id, last.picture_id) {
                    let mask = id.modulus() - 1;
                    let next = last_id.value.wrapping_add(1) & mask;
                    self.picture_id_shift = id.value.wrapping_sub(next) & mask;
                }
                if let (Some(tl0), Some(last_tl0)) = (input.tl0_pic_idx, last.tl0_pic_idx) {
                    self.tl0_shift = tl0.wrapping_sub(last_tl0.wrapping_add(1));
                }
                if let (Some(key_idx), Some(last_key_idx)) = (input.key_idx, last.key_idx) {
                    self.key_idx_shift = key_idx.wrapping_sub(last_key_idx.wrapping_add(1)) & 0x1f;
                }
            }
        }
        let out = PictureNumbering {
            picture_id: input.picture_id.map(|mut id| {
                id.value = id.value.wrapping_sub(self.picture_id_shift) & (id.modulus() - 1);
                id
            }),
            tl0_pic_idx: input.tl0_pic_idx.map(|t| t.wrapping_sub(self.tl0_shift)),
            key_idx: input
                .key_idx
                .map(|k| k.wrapping_sub(self.key_idx_shift) & 0x1f),
        };
        let newest = match (out.picture_id, self.last_out.and_then(|l| l.picture_id)) {
            (Some(id), Some(last)) => {
                let ahead = id.value.wrapping_sub(last.value) & (id.modulus() - 1);
                ahead < id.modulus() / 2
            }
            _ => true,
        };
        if newest {
            self.last_out = Some(out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::PictureId;
    use std::time::Duration;

    fn pkt(seq: u16, timestamp: u32, keyframe_start: bool) -> PacketMeta {
        PacketMeta {
            seq,
            timestamp,
            keyframe_start,
            numbering: None,
        }
    }

    fn forwarded(d: Decision) -> (u16, u32) {
        match d {
            Decision::Forward { seq, timestamp, .. } => (seq, timestamp),
            Decision::Drop(r) => panic!("dropped: {r:?}"),
        }
    }

    /// A VP8 packet of picture `picture_id` (15 bits), base-layer index `tl0` and `key_idx`.
    fn vp8(seq: u16, keyframe_start: bool, picture_id: u16, tl0: u8, key_idx: u8) -> PacketMeta {
        PacketMeta {
            numbering: Some(PictureNumbering {
                picture_id: Some(PictureId {
                    value: picture_id,
                    long: true,
                }),
                tl0_pic_idx: Some(tl0),
                key_idx: Some(key_idx),
            }),
            ..pkt(seq, u32::from(seq) * 3000, keyframe_start)
        }
    }

    /// The picture numbers a forwarded packet goes out with: (PictureID, TL0PICIDX, KEYIDX).
    fn numbers_sent(packet: &PacketMeta, decision: Decision) -> (u16, u8, u8) {
        let Decision::Forward { numbering, .. } = decision else {
            panic!("dropped: {decision:?}");
        };
        let n = numbering.or(packet.numbering).expect("a numbered packet");
        (
            n.picture_id.unwrap().value,
            n.tl0_pic_idx.unwrap(),
            n.key_idx.unwrap(),
        )
    }

    #[test]
    fn picture_numbers_pass_through_until_a_switch_then_continue() {
        let mut f = Forwarder::new(true, 90_000);
        f.set_negotiated();
        let now = Instant::now();
        // Layer A: pictures 30000.. on base-layer index 200, sent as they are.
        let first = vp8(10, true, 30_000, 200, 4);
        let decision = f.decide(&first, now);
        assert!(matches!(
            decision,
            Decision::Forward {
                numbering: None,
                ..
            }
        ));
        assert_eq!(numbers_sent(&first, decision), (30_000, 200, 4));
        let next = vp8(11, false, 30_001, 201, 4);
        assert_eq!(numbers_sent(&next, f.decide(&next, now)), (30_001, 201, 4));

        // Switch to layer B, whose numbers are behind A's: they continue A's instead.
        f.switch_source();
        let key = vp8(5000, true, 100, 7, 30);
        assert_eq!(numbers_sent(&key, f.decide(&key, now)), (30_002, 202, 5));
        let delta = vp8(5001, false, 101, 7, 30);
        assert_eq!(
            numbers_sent(&delta, f.decide(&delta, now)),
            (30_003, 202, 5)
        );
        // A reordered packet keeps the same shift, and does not count as the newest picture.
        let ahead = vp8(5003, false, 102, 8, 30);
        assert_eq!(
            numbers_sent(&ahead, f.decide(&ahead, now)),
            (30_004, 203, 5)
        );
        let late = vp8(5002, false, 101, 7, 30);
        assert_eq!(numbers_sent(&late, f.decide(&late, now)), (30_003, 202, 5));
        // A restart on the same source (a keyframe after loss) keeps the shift: B's own gap
        // from picture 102 to 110 passes on as it is.
        f.restart_on_keyframe();
        let key2 = vp8(5010, true, 110, 9, 31);
        assert_eq!(numbers_sent(&key2, f.decide(&key2, now)), (30_012, 204, 6));

        // Back to A, far ahead now: numbering wraps past 2^15 and 2^8 and continues.
        f.switch_source();
        let back = vp8(12, true, 32_767, 255, 0);
        assert_eq!(numbers_sent(&back, f.decide(&back, now)), (30_013, 205, 7));
        let wrapped = vp8(13, false, 0, 0, 1);
        assert_eq!(
            numbers_sent(&wrapped, f.decide(&wrapped, now)),
            (30_014, 206, 8)
        );
    }

    #[test]
    fn picture_numbers_wrap_at_their_width() {
        let mut f = Forwarder::new(true, 90_000);
        f.set_negotiated();
        let now = Instant::now();
        let short = |seq, keyframe_start, value| PacketMeta {
            numbering: Some(PictureNumbering {
                picture_id: Some(PictureId { value, long: false }),
                ..PictureNumbering::default()
            }),
            ..pkt(seq, 0, keyframe_start)
        };
        let picture_id = |d: Decision, p: &PacketMeta| match d {
            Decision::Forward { numbering, .. } => {
                numbering.or(p.numbering).unwrap().picture_id.unwrap().value
            }
            Decision::Drop(r) => panic!("dropped: {r:?}"),
        };
        let p = short(1, true, 127);
        assert_eq!(picture_id(f.decide(&p, now), &p), 127);
        f.switch_source();
        let p = short(900, true, 40);
        assert_eq!(
            picture_id(f.decide(&p, now), &p),
            0,
            "127 + 1 wraps to 0 in 7 bits"
        );
        let p = short(901, false, 41);
        assert_eq!(picture_id(f.decide(&p, now), &p), 1);
    }

    #[test]
    fn nothing_flows_before_negotiation() {
        let mut f = Forwarder::new(false, 48_000);
        let now = Instant::now();
        assert_eq!(
            f.decide(&pkt(1, 960, false), now),
            Decision::Drop(DropReason::NotNegotiated)
        );
        f.set_negotiated();
        assert_eq!(forwarded(f.decide(&pkt(2, 1920, false), now)), (2, 1920));
    }

    #[test]
    fn video_starts_on_a_keyframe_and_keeps_numbering_gap_free() {
        let mut f = Forwarder::new(true, 90_000);
        f.set_negotiated();
        let now = Instant::now();
        assert!(f.wants_keyframe());
        assert_eq!(
            f.decide(&pkt(100, 0, false), now),
            Decision::Drop(DropReason::AwaitingKeyframe)
        );
        assert_eq!(forwarded(f.decide(&pkt(101, 3000, true), now)), (101, 3000));
        assert!(!f.wants_keyframe());
        assert_eq!(
            forwarded(f.decide(&pkt(102, 3000, false), now)),
            (102, 3000)
        );
    }

    #[test]
    fn mute_then_unmute_continues_sequence_and_advances_time() {
        let mut f = Forwarder::new(true, 90_000);
        f.set_negotiated();
        let t0 = Instant::now();
        forwarded(f.decide(&pkt(10, 1000, true), t0));
        forwarded(f.decide(&pkt(11, 1000, false), t0));
        f.set_muted(true);
        assert_eq!(
            f.decide(&pkt(12, 4000, false), t0),
            Decision::Drop(DropReason::Muted)
        );
        f.set_muted(false);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            f.decide(&pkt(500, 400_000, false), t1),
            Decision::Drop(DropReason::AwaitingKeyframe)
        );
        let (seq, ts) = forwarded(f.decide(&pkt(501, 403_000, true), t1));
        assert_eq!(
            seq, 12,
            "numbering continues right after the last forwarded packet"
        );
        assert_eq!(
            ts,
            1000 + 90_000,
            "timeline advances by the wall time that passed"
        );
        assert_eq!(
            forwarded(f.decide(&pkt(502, 406_000, false), t1)),
            (13, 94_000)
        );
    }

    #[test]
    fn sequence_numbers_wrap_around() {
        let mut f = Forwarder::new(false, 48_000);
        f.set_negotiated();
        let now = Instant::now();
        forwarded(f.decide(&pkt(65_534, u32::MAX - 959, false), now));
        assert_eq!(
            forwarded(f.decide(&pkt(65_535, u32::MAX, false), now)).0,
            65_535
        );
        assert_eq!(forwarded(f.decide(&pkt(0, 959, false), now)), (0, 959));
        assert_eq!(forwarded(f.decide(&pkt(1, 1919, false), now)).0, 1);
    }

    #[test]
    fn wrap_around_across_a_rebase() {
        let mut f = Forwarder::new(true, 90_000);
        f.set_negotiated();
        let t0 = Instant::now();
        forwarded(f.decide(&pkt(65_535, u32::MAX - 10, true), t0));
        f.restart_on_keyframe();
        let (seq, ts) = forwarded(f.decide(&pkt(7, 50, true), t0 + Duration::from_millis(10)));
        assert_eq!(seq, 0);
        assert_eq!(ts, (u32::MAX - 10).wrapping_add(900));
    }

    #[test]
    fn a_duplicate_of_the_last_keyframe_does_not_restart_the_stream_twice() {
        let mut f = Forwarder::new(true, 90_000);
        f.set_negotiated();
        let now = Instant::now();
        assert_eq!(forwarded(f.decide(&pkt(0, 0, true), now)), (0, 0));
        f.restart_on_keyframe();
        // Packet 0 arrives again (a retransmission) after the restart: already forwarded.
        assert_eq!(
            f.decide(&pkt(0, 0, true), now),
            Decision::Drop(DropReason::Stale)
        );
        assert_eq!(
            f.decide(&pkt(2, 3000, false), now),
            Decision::Drop(DropReason::AwaitingKeyframe)
        );
        assert_eq!(forwarded(f.decide(&pkt(3, 6000, true), now)).0, 1);
    }

    #[test]
    fn a_new_source_may_start_with_any_numbering() {
        let mut f = Forwarder::new(false, 48_000);
        f.set_negotiated();
        let now = Instant::now();
        forwarded(f.decide(&pkt(500, 0, false), now));
        f.switch_source();
        assert_eq!(forwarded(f.decide(&pkt(3, 10, false), now)).0, 501);
    }

    #[test]
    fn late_packets_pass_duplicates_and_pre_segment_packets_do_not() {
        let mut f = Forwarder::new(false, 48_000);
        f.set_negotiated();
        let now = Instant::now();
        forwarded(f.decide(&pkt(1, 0, false), now));
        forwarded(f.decide(&pkt(3, 0, false), now));
        assert_eq!(
            forwarded(f.decide(&pkt(2, 0, false), now)).0,
            2,
            "reordered"
        );
        assert_eq!(
            f.decide(&pkt(2, 0, false), now),
            Decision::Drop(DropReason::Stale),
            "duplicate"
        );
        assert_eq!(
            f.decide(&pkt(3, 0, false), now),
            Decision::Drop(DropReason::Stale)
        );
        // A packet from before the segment started is never forwarded after a rebase.
        f.set_muted(true);
        f.set_muted(false);
        forwarded(f.decide(&pkt(10, 0, false), now));
        assert_eq!(
            f.decide(&pkt(9, 0, false), now),
            Decision::Drop(DropReason::Stale)
        );
        // Far too old.
        forwarded(f.decide(&pkt(400, 0, false), now));
        assert_eq!(
            f.decide(&pkt(200, 0, false), now),
            Decision::Drop(DropReason::Stale)
        );
    }
}
