//! Property tests of what a subscriber receives: for arbitrary packet sequences with loss,
//! duplicates, reordering, mutes, keyframe restarts and source switches, the forwarder's
//! sequence numbers stay consecutive and unique and its timestamps never run backwards; and
//! every header the per-subscriber rewrite produces is one the wire format round-trips.

use proptest::prelude::*;
use rtc::rtp::header::{Extension, Header};
use rtc::shared::marshal::{Marshal, Unmarshal};
use sfu::forwarder::{Decision, DropReason, Forwarder, PacketMeta};
use sfu::rewrite::Binding;
use sfu::transport::AUDIO_LEVEL_URI;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// What happens between two packets of the publisher's stream.
#[derive(Debug, Clone)]
enum Event {
    /// The next packet; `new_frame` advances the timestamp by one frame.
    Packet { new_frame: bool, keyframe: bool },
    /// The network loses the next `n` packets.
    Lose(u16),
    /// The last packet arrives again.
    Duplicate,
    /// The publisher mutes or unmutes.
    Mute(bool),
    /// A decoder asked for a keyframe: restart on the next one.
    RestartOnKeyframe,
    /// The publisher restarted (or a simulcast layer switch): new numbering from here.
    SwitchSource { seq: u16, timestamp: u32 },
    /// Wall time passes.
    Wait(u16),
}

fn event(lossy: bool) -> impl Strategy<Value = Event> {
    let lose = if lossy { 1u16..6 } else { 0u16..1 };
    let dup_weight = if lossy { 2 } else { 0 };
    prop_oneof![
        30 => (any::<bool>(), prop::bool::weighted(0.15))
            .prop_map(|(new_frame, keyframe)| Event::Packet { new_frame, keyframe }),
        3 => lose.prop_map(Event::Lose),
        dup_weight => Just(Event::Duplicate),
        2 => any::<bool>().prop_map(Event::Mute),
        1 => Just(Event::RestartOnKeyframe),
        1 => (any::<u16>(), any::<u32>())
            .prop_map(|(seq, timestamp)| Event::SwitchSource { seq, timestamp }),
        2 => (1u16..2000).prop_map(Event::Wait),
    ]
}

/// The publisher's stream as the forwarder sees it, with what was forwarded.
struct Run {
    forwarder: Forwarder,
    seq: u16,
    timestamp: u32,
    frame_ticks: u32,
    now: Instant,
    /// The newest packet, and whether it was forwarded with nothing but time and loss since
    /// (so a copy of it arriving now is a duplicate the subscriber already has).
    last: Option<(PacketMeta, bool)>,
    /// (out seq, out timestamp) of every forwarded packet, in order.
    forwarded: Vec<(u16, u32)>,
    /// Whether the publisher has muted.
    muted: bool,
}

impl Run {
    fn new(video: bool, start_seq: u16, start_ts: u32) -> Self {
        let (clock_rate, frame_ticks) = if video { (90_000, 3000) } else { (48_000, 960) };
        let mut forwarder = Forwarder::new(video, clock_rate);
        forwarder.set_negotiated();
        Self {
            forwarder,
            seq: start_seq,
            timestamp: start_ts,
            frame_ticks,
            now: Instant::now(),
            last: None,
            forwarded: Vec::new(),
            muted: false,
        }
    }

    /// Feeds one packet and records the decision.
    fn feed(&mut self, packet: PacketMeta) -> Decision {
        let decision = self.forwarder.decide(&packet, self.now);
        if let Decision::Forward { seq, timestamp, .. } = decision {
            self.forwarded.push((seq, timestamp));
        }
        decision
    }

    fn apply(&mut self, event: &Event) -> Result<(), TestCaseError> {
        match *event {
            Event::Packet {
                new_frame,
                keyframe,
            } => {
                self.seq = self.seq.wrapping_add(1);
                if new_frame {
                    self.timestamp = self.timestamp.wrapping_add(self.frame_ticks);
                    self.now += Duration::from_millis(20);
                }
                let packet = PacketMeta {
                    seq: self.seq,
                    timestamp: self.timestamp,
                    keyframe_start: keyframe,
                    numbering: None,
                };
                let decision = self.feed(packet);
                if self.muted {
                    prop_assert_eq!(decision, Decision::Drop(DropReason::Muted));
                }
                self.last = Some((packet, matches!(decision, Decision::Forward { .. })));
            }
            Event::Lose(n) => self.seq = self.seq.wrapping_add(n),
            Event::Duplicate => {
                if let Some((last, delivered)) = self.last {
                    let decision = self.feed(last);
                    if delivered {
                        prop_assert_eq!(decision, Decision::Drop(DropReason::Stale));
                    }
                }
            }
            Event::Mute(muted) => {
                self.muted = muted;
                self.forwarder.set_muted(muted);
                self.last = self.last.map(|(packet, _)| (packet, false));
            }
            Event::RestartOnKeyframe => {
                self.forwarder.restart_on_keyframe();
                self.last = self.last.map(|(packet, _)| (packet, false));
            }
            Event::SwitchSource { seq, timestamp } => {
                self.seq = seq;
                self.timestamp = timestamp;
                // Packets of the old source are history now.
                self.last = None;
                self.forwarder.switch_source();
            }
            Event::Wait(ms) => self.now += Duration::from_millis(u64::from(ms)),
        }
        Ok(())
    }
}

/// Whether `b` comes after `a` in RTP's wrapping timestamp order (or equals it).
fn not_before(a: u32, b: u32) -> bool {
    (b.wrapping_sub(a) as i32) >= 0
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Without network loss, whatever is dropped on purpose (mutes, waiting for a keyframe,
    /// restarts, source switches), the subscriber sees 1, 2, 3, ... with no gap or repeat.
    #[test]
    fn without_loss_forwarded_numbers_are_strictly_consecutive(
        video in any::<bool>(),
        start_seq in any::<u16>(),
        start_ts in any::<u32>(),
        events in prop::collection::vec(event(false), 1..400),
    ) {
        let mut run = Run::new(video, start_seq, start_ts);
        for event in &events {
            run.apply(event)?;
        }
        for pair in run.forwarded.windows(2) {
            let ((seq_a, ts_a), (seq_b, ts_b)) = (pair[0], pair[1]);
            prop_assert_eq!(seq_b, seq_a.wrapping_add(1), "numbering jumped: {:?}", run.forwarded);
            prop_assert!(not_before(ts_a, ts_b), "timestamp went back: {} -> {}", ts_a, ts_b);
        }
    }

    /// With loss and duplicates, the numbering still only moves forward: between two forwarded
    /// packets it steps by 1 (after a restart or switch) or by exactly the publisher's step
    /// (so the receiver sees the real loss and can ask for it), never repeats, and timestamps
    /// never go back, restarts included.
    #[test]
    fn with_loss_numbers_step_by_one_or_by_the_publishers_step_and_never_repeat(
        video in any::<bool>(),
        start_seq in any::<u16>(),
        start_ts in any::<u32>(),
        events in prop::collection::vec(event(true), 1..400),
    ) {
        let mut run = Run::new(video, start_seq, start_ts);
        // The publisher's sequence number of each forwarded packet.
        let mut inputs: Vec<u16> = Vec::new();
        for event in &events {
            let before = run.forwarded.len();
            let fed = match event {
                Event::Packet { .. } => Some(run.seq.wrapping_add(1)),
                Event::Duplicate => run.last.map(|(packet, _)| packet.seq),
                _ => None,
            };
            run.apply(event)?;
            if run.forwarded.len() > before {
                inputs.push(fed.expect("only packets are forwarded"));
            }
        }
        for (i, pair) in run.forwarded.windows(2).enumerate() {
            let ((seq_a, ts_a), (seq_b, ts_b)) = (pair[0], pair[1]);
            let step = seq_b.wrapping_sub(seq_a);
            let publisher_step = inputs[i + 1].wrapping_sub(inputs[i]);
            prop_assert!(
                step == 1 || step == publisher_step,
                "step {} where the publisher stepped {}",
                step,
                publisher_step
            );
            prop_assert!(not_before(ts_a, ts_b), "timestamp went back: {} -> {}", ts_a, ts_b);
        }
        let unique: HashSet<u16> = run.forwarded.iter().map(|(seq, _)| *seq).collect();
        prop_assert_eq!(unique.len(), run.forwarded.len(), "a sequence number was used twice");
    }

    /// Late (reordered) and repeated packets are forwarded at most once each, so the
    /// subscriber's SRTP never sees a sequence number twice.
    #[test]
    fn reordered_and_repeated_packets_never_reuse_a_number(
        start_seq in any::<u16>(),
        arrivals in prop::collection::vec((0u16..200, prop::bool::weighted(0.2)), 1..300),
    ) {
        let mut forwarder = Forwarder::new(false, 48_000);
        forwarder.set_negotiated();
        let now = Instant::now();
        let mut out = HashSet::new();
        let mut forwarded_inputs = HashSet::new();
        for (offset, mute_toggle) in arrivals {
            if mute_toggle {
                forwarder.set_muted(true);
                forwarder.set_muted(false);
            }
            let seq = start_seq.wrapping_add(offset);
            let packet = PacketMeta { seq, timestamp: u32::from(offset) * 960, keyframe_start: false, numbering: None };
            if let Decision::Forward { seq: out_seq, .. } = forwarder.decide(&packet, now) {
                prop_assert!(out.insert(out_seq), "out seq {} forwarded twice", out_seq);
                forwarded_inputs.insert(seq);
            }
        }
        prop_assert!(!forwarded_inputs.is_empty());
    }
}

/// Extension URIs a publisher may negotiate: the ones the SFU forwards and hop-by-hop ones it
/// must not.
const URIS: [&str; 7] = [
    AUDIO_LEVEL_URI,
    "urn:3gpp:video-orientation",
    "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay",
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    "urn:ietf:params:rtp-hdrext:sdes:mid",
    "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
];
const HOP_BY_HOP: [&str; 4] = [URIS[3], URIS[4], URIS[5], URIS[6]];

/// Distinct ids for a subset of the URIs: (id, index into URIS).
fn negotiated(ids: std::ops::RangeInclusive<u16>) -> impl Strategy<Value = Vec<(u16, usize)>> {
    (
        prop::sample::subsequence((0..URIS.len()).collect::<Vec<_>>(), 0..=URIS.len()),
        prop::collection::hash_set(ids, URIS.len()),
    )
        .prop_map(|(uris, ids)| ids.into_iter().zip(uris).collect())
}

fn source_header() -> impl Strategy<Value = (Header, Vec<(u16, usize)>)> {
    (
        negotiated(1..=14),
        any::<bool>(),
        0u8..128,
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        prop::collection::vec(any::<u32>(), 0..4),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..=16), 7),
    )
        .prop_map(
            |(publisher, marker, payload_type, seq, timestamp, ssrc, csrc, payloads)| {
                let extensions: Vec<Extension> = publisher
                    .iter()
                    .zip(payloads)
                    .map(|(&(id, _), payload)| Extension {
                        id: id as u8,
                        payload: payload.into(),
                    })
                    .collect();
                let header = Header {
                    version: 2,
                    extension: !extensions.is_empty(),
                    marker,
                    payload_type,
                    sequence_number: seq,
                    timestamp,
                    ssrc,
                    csrc,
                    extension_profile: if extensions.is_empty() { 0 } else { 0xBEDE },
                    extensions,
                    ..Default::default()
                };
                (header, publisher)
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The rewritten header carries the subscriber's SSRC, payload type and extension ids,
    /// the forwarder's numbers and the source's marker and CSRCs, drops hop-by-hop extensions,
    /// and survives marshal + unmarshal unchanged: it is what webrtc-rs can put on the wire.
    #[test]
    fn rewritten_headers_follow_the_subscriber_and_round_trip_on_the_wire(
        (source, publisher) in source_header(),
        subscriber in negotiated(1..=255),
        ssrc in any::<u32>(),
        payload_type in 0u8..128,
        seq in any::<u16>(),
        timestamp in any::<u32>(),
    ) {
        let subscriber_uris: Vec<(u16, &str)> =
            subscriber.iter().map(|&(id, uri)| (id, URIS[uri])).collect();
        let binding = Binding::new(
            ssrc,
            payload_type,
            publisher.iter().map(|&(id, uri)| (id, URIS[uri])),
            &subscriber_uris,
        );
        let out = binding.rewrite(&source, seq, timestamp);
        prop_assert_eq!(out.ssrc, ssrc);
        prop_assert_eq!(out.payload_type, payload_type);
        prop_assert_eq!((out.sequence_number, out.timestamp), (seq, timestamp));
        prop_assert_eq!(out.marker, source.marker);
        prop_assert_eq!(&out.csrc, &source.csrc);
        prop_assert_eq!(out.extension, !out.extensions.is_empty());
        for extension in &out.extensions {
            let uri = subscriber_uris
                .iter()
                .find(|(id, _)| *id == u16::from(extension.id))
                .map(|(_, uri)| *uri);
            prop_assert!(uri.is_some(), "id {} is not the subscriber's", extension.id);
            let uri = uri.unwrap();
            prop_assert!(!HOP_BY_HOP.contains(&uri), "{} is hop-by-hop", uri);
            let from = publisher.iter().find(|(_, u)| URIS[*u] == uri).map(|(id, _)| *id);
            let original = source.extensions.iter().find(|e| Some(u16::from(e.id)) == from);
            prop_assert_eq!(original.map(|e| &e.payload), Some(&extension.payload));
        }
        let wire = out.marshal();
        prop_assert!(wire.is_ok(), "{:?}", wire.err());
        let mut wire = wire.unwrap().freeze();
        let parsed = Header::unmarshal(&mut wire);
        prop_assert!(parsed.is_ok(), "{:?}", parsed.err());
        let parsed = parsed.unwrap();
        prop_assert_eq!(
            Header { extensions_padding: 0, ..parsed },
            Header { extensions_padding: 0, ..out }
        );
    }
}
