//! The per-packet forwarding decision for one track to one subscriber: forward (with the
//! rewritten sequence number and timestamp) or drop with a named reason. It is a plain value
//! with no IO and no clock of its own (time is an argument), so every rule is unit-tested with
//! synthetic packets. Sending is someone else's job.

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
                Decision::Forward { seq, timestamp }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pkt(seq: u16, timestamp: u32, keyframe_start: bool) -> PacketMeta {
        PacketMeta {
            seq,
            timestamp,
            keyframe_start,
        }
    }

    fn forwarded(d: Decision) -> (u16, u32) {
        match d {
            Decision::Forward { seq, timestamp } => (seq, timestamp),
            Decision::Drop(r) => panic!("dropped: {r:?}"),
        }
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
