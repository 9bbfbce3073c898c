//! The per-subscriber packet path, rebuilt outside webrtc-rs so it can be timed alone: for each
//! subscriber of one published track, `Forwarder::decide`, `Binding::rewrite` (as
//! `sfu::fanout` does), then what webrtc-rs's SRTP write handler does with the packet:
//! `rtp::Packet::marshal` and `Context::encrypt_rtp`, through rtc's own SRTP context and
//! default crypto provider (ring), one context per subscriber as on the server.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rtc::crypto::RTCCrypto;
use rtc::rtp::header::{Extension, Header};
use rtc::rtp::Packet;
use rtc::shared::marshal::Marshal;
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;
use sfu::codec::{Codec, RenumberedCopies};
use sfu::forwarder::{Decision, Forwarder, PacketMeta};
use sfu::rewrite::Binding;
use sfu::transport::AUDIO_LEVEL_URI;

/// abs-send-time: a transport-level extension browsers put on every video packet.
pub const ABS_SEND_TIME_URI: &str = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time";
/// transport-wide congestion control: on every packet a browser sends.
pub const TRANSPORT_CC_URI: &str =
    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01";

/// The publisher connection's extension ids, as a browser negotiates them.
pub const PUBLISHER_EXTENSIONS: [(u16, &str); 3] = [
    (1, AUDIO_LEVEL_URI),
    (2, ABS_SEND_TIME_URI),
    (3, TRANSPORT_CC_URI),
];
/// A subscriber connection's extension ids (different on purpose: the rewrite must map them).
pub const SUBSCRIBER_EXTENSIONS: [(u16, &str); 3] = [
    (4, AUDIO_LEVEL_URI),
    (5, ABS_SEND_TIME_URI),
    (6, TRANSPORT_CC_URI),
];

/// Payload bytes of a full video packet: the headless client's `VideoConfig::max_payload`
/// and about what browsers send at 1.5 Mbit/s.
pub const VIDEO_PAYLOAD_LEN: usize = 1100;
/// Payload bytes of an Opus packet at ~64 kbit/s in 20 ms frames.
pub const AUDIO_PAYLOAD_LEN: usize = 160;

/// What the publisher sends, which decides the codec rules and the header extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    /// VP8 with abs-send-time and transport-cc, neither forwarded: the rewrite drops every
    /// extension, the common case for video.
    Video,
    /// Opus with audio level (forwarded, remapped) and transport-cc (dropped).
    Audio,
}

impl Media {
    fn codec(self) -> Codec {
        match self {
            Media::Video => Codec::Vp8,
            Media::Audio => Codec::Opus,
        }
    }

    fn clock_rate(self) -> u32 {
        match self {
            Media::Video => 90_000,
            Media::Audio => 48_000,
        }
    }

    fn payload_type(self) -> u8 {
        match self {
            Media::Video => 96,
            Media::Audio => 111,
        }
    }
}

/// The publisher's packets: one packet, advanced in place (no allocation per packet), as the
/// fan-out task receives them from webrtc-rs.
#[derive(Debug, Clone)]
pub struct SourceStream {
    media: Media,
    packet: Packet,
}

impl SourceStream {
    /// A stream of full-size packets of `media` (VP8 continuation packets, or Opus frames).
    pub fn new(media: Media) -> Self {
        let (payload, extensions) = match media {
            Media::Video => (
                vp8_payload(false, VIDEO_PAYLOAD_LEN),
                vec![
                    extension(2, &[0x12, 0x34, 0x56]),
                    extension(3, &[0x00, 0x01]),
                ],
            ),
            Media::Audio => (
                Bytes::from(vec![0xfc; AUDIO_PAYLOAD_LEN]),
                vec![extension(1, &[0x85]), extension(3, &[0x00, 0x01])],
            ),
        };
        let header = Header {
            version: 2,
            extension: true,
            extension_profile: 0xBEDE,
            payload_type: media.payload_type(),
            sequence_number: 1000,
            timestamp: 90_000,
            ssrc: 0x5eed_cafe,
            extensions,
            ..Default::default()
        };
        Self {
            media,
            packet: Packet { header, payload },
        }
    }

    /// The packet a subscriber can start on: a VP8 keyframe start (any Opus packet will do).
    pub fn start_packet(&mut self) -> &Packet {
        if self.media == Media::Video {
            self.packet.payload = vp8_payload(true, VIDEO_PAYLOAD_LEN);
        }
        self.advance();
        &self.packet
    }

    /// The next packet in the stream.
    pub fn next_packet(&mut self) -> &Packet {
        if self.media == Media::Video && self.packet.payload[0] & 0x10 != 0 {
            self.packet.payload = vp8_payload(false, VIDEO_PAYLOAD_LEN);
        }
        self.advance();
        &self.packet
    }

    fn advance(&mut self) {
        let header = &mut self.packet.header;
        header.sequence_number = header.sequence_number.wrapping_add(1);
        header.timestamp = header.timestamp.wrapping_add(match self.media {
            Media::Video => 500,
            Media::Audio => 960,
        });
    }
}

fn extension(id: u8, payload: &'static [u8]) -> Extension {
    Extension {
        id,
        payload: Bytes::from_static(payload),
    }
}

/// A VP8 payload (RFC 7741 descriptor with a 15-bit picture id) of `len` bytes.
fn vp8_payload(keyframe_start: bool, len: usize) -> Bytes {
    let mut payload = vec![0x5a; len];
    // X, and S on the first packet of a frame; then I with a 15-bit picture id.
    payload[0] = if keyframe_start { 0x90 } else { 0x80 };
    payload[1] = 0x80;
    payload[2] = 0x80 | 0x12;
    payload[3] = 0x34;
    // VP8 frame tag: bit 0 clear means keyframe.
    payload[4] = if keyframe_start { 0x10 } else { 0x11 };
    Bytes::from(payload)
}

/// How far along the path [`FanoutPath::forward`] goes for each subscriber, so each step's
/// share of the cost can be measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// `Forwarder::decide` only.
    Decide,
    /// ... then `Binding::rewrite` and the outgoing `rtp::Packet` (payload shared): everything
    /// `sfu::fanout` does per subscriber before handing the packet to webrtc-rs.
    Rewrite,
    /// ... then `Packet::marshal`, as webrtc-rs's SRTP handler does.
    Marshal,
    /// ... then `Context::encrypt_rtp`: the packet as it goes to `sendto`.
    Protect,
}

/// What one [`FanoutPath::forward`] produced (returned so the optimiser keeps the work).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// Subscribers the packet was forwarded to.
    pub packets: usize,
    /// Bytes produced at the last stage run (header bytes for `Rewrite`, 0 for `Decide`).
    pub bytes: usize,
}

/// One subscriber's state for one track: what `sfu::fanout` keeps per subscription, plus the
/// SRTP context webrtc-rs keeps per subscriber connection.
struct Subscriber {
    forwarder: Forwarder,
    binding: Binding,
    srtp: Context,
}

impl Subscriber {
    /// What `sfu::fanout` hands webrtc-rs for this subscriber: the decision, then the packet
    /// with the rewritten header and the shared payload (or a copy with this subscriber's own
    /// picture numbers, shared with the subscribers that have the same ones).
    fn forwarded(
        &mut self,
        meta: &PacketMeta,
        packet: &Packet,
        now: Instant,
        codec: Codec,
        copies: &mut RenumberedCopies,
    ) -> Option<Packet> {
        let Decision::Forward {
            seq,
            timestamp,
            numbering,
        } = self.forwarder.decide(meta, now)
        else {
            return None;
        };
        Some(Packet {
            header: self.binding.rewrite(&packet.header, seq, timestamp),
            payload: match numbering {
                None => packet.payload.clone(),
                Some(numbering) => copies.get(codec, &packet.payload, &numbering),
            },
        })
    }
}

/// One published track fanned out to N subscribers.
pub struct FanoutPath {
    codec: Codec,
    subscribers: Vec<Subscriber>,
    copies: RenumberedCopies,
}

impl FanoutPath {
    /// `subscribers` negotiated subscribers of a `media` track, each with its own SRTP keys
    /// under `profile`.
    pub fn new(subscribers: usize, media: Media, profile: ProtectionProfile) -> Self {
        let subscribers = (0..subscribers)
            .map(|index| {
                let mut forwarder =
                    Forwarder::new(media.codec().needs_keyframe(), media.clock_rate());
                forwarder.set_negotiated();
                let binding = Binding::new(
                    0x1000_0000 + index as u32,
                    media.payload_type() + 1,
                    PUBLISHER_EXTENSIONS,
                    &SUBSCRIBER_EXTENSIONS,
                );
                Subscriber {
                    forwarder,
                    binding,
                    srtp: srtp_context(profile, index),
                }
            })
            .collect();
        Self {
            codec: media.codec(),
            subscribers,
            copies: RenumberedCopies::default(),
        }
    }

    /// Subscriber `index`'s packets now come from another source (a simulcast layer switch):
    /// from here on it gets its own picture numbers, in a copy of every payload.
    pub fn switch_source_of(&mut self, index: usize) {
        self.subscribers[index].forwarder.switch_source();
    }

    /// Runs `stage` of the path for every subscriber (as `sfu::fanout` does on each packet:
    /// keyframe detection once, then the per-subscriber steps).
    pub fn forward(&mut self, packet: &Packet, now: Instant, stage: Stage) -> Forwarded {
        let mut out = Forwarded::default();
        match stage {
            Stage::Decide => {
                let meta = self.meta(packet);
                for s in &mut self.subscribers {
                    if matches!(s.forwarder.decide(&meta, now), Decision::Forward { .. }) {
                        out.packets += 1;
                    }
                }
            }
            Stage::Rewrite => {
                let meta = self.meta(packet);
                for s in &mut self.subscribers {
                    let forwarded = s.forwarded(&meta, packet, now, self.codec, &mut self.copies);
                    if let Some(forwarded) = forwarded {
                        out.packets += 1;
                        out.bytes += std::hint::black_box(&forwarded).header.extensions.len() + 12;
                    }
                }
                self.copies.clear();
            }
            Stage::Marshal | Stage::Protect => {
                let protect = stage == Stage::Protect;
                self.forward_marshalled(packet, now, protect, |_, wire| {
                    out.packets += 1;
                    out.bytes += wire.len();
                });
            }
        }
        out
    }

    /// The whole path, handing each subscriber's packet (marshalled, and SRTP-protected when
    /// `protect`) to `sink` with the subscriber's index.
    pub fn forward_marshalled(
        &mut self,
        packet: &Packet,
        now: Instant,
        protect: bool,
        mut sink: impl FnMut(usize, BytesMut),
    ) {
        let meta = self.meta(packet);
        for (index, s) in self.subscribers.iter_mut().enumerate() {
            let Some(forwarded) = s.forwarded(&meta, packet, now, self.codec, &mut self.copies)
            else {
                continue;
            };
            let plain = forwarded.marshal().expect("a rewritten header marshals");
            if protect {
                let wire = s
                    .srtp
                    .encrypt_rtp(&plain)
                    .expect("SRTP protects a marshalled packet");
                sink(index, wire);
            } else {
                sink(index, plain);
            }
        }
        self.copies.clear();
    }

    fn meta(&self, packet: &Packet) -> PacketMeta {
        PacketMeta {
            seq: packet.header.sequence_number,
            timestamp: packet.header.timestamp,
            keyframe_start: self.codec.needs_keyframe()
                && self.codec.is_keyframe_start(&packet.payload),
            numbering: self.codec.picture_numbering(&packet.payload),
        }
    }
}

/// The SRTP context of subscriber `index` (fixed keys per index, no replay protection on the
/// sending side, as webrtc-rs builds its local context).
pub fn srtp_context(profile: ProtectionProfile, index: usize) -> Context {
    let key: Vec<u8> = (0..profile.key_len())
        .map(|i| (index.wrapping_mul(31) + i) as u8)
        .collect();
    let salt: Vec<u8> = (0..profile.salt_len())
        .map(|i| (index.wrapping_mul(17) + 3 * i) as u8)
        .collect();
    let provider = rtc::crypto::default_provider().expect("rtc is built with its ring provider");
    let crypto: &dyn RTCCrypto = provider.crypto();
    Context::new(&key, &salt, profile, None, None, crypto).expect("valid key and salt lengths")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::shared::marshal::Unmarshal;

    #[test]
    fn every_subscriber_gets_its_own_decryptable_rewritten_packet() {
        for (media, profile) in [
            (Media::Video, ProtectionProfile::Aes128CmHmacSha1_80),
            (Media::Audio, ProtectionProfile::AeadAes128Gcm),
        ] {
            let mut stream = SourceStream::new(media);
            let mut path = FanoutPath::new(3, media, profile);
            let now = Instant::now();
            let start = stream.start_packet().clone();
            let mut wires = Vec::new();
            path.forward_marshalled(&start, now, true, |i, wire| wires.push((i, wire)));
            assert_eq!(wires.len(), 3, "{media:?}: every subscriber starts");

            for (index, wire) in wires {
                let plain = srtp_context(profile, index)
                    .decrypt_rtp(&wire)
                    .expect("the subscriber's keys decrypt it");
                let got = Packet::unmarshal(&mut &plain[..]).expect("valid RTP");
                assert_eq!(got.header.ssrc, 0x1000_0000 + index as u32);
                assert_eq!(got.header.payload_type, media.payload_type() + 1);
                assert_eq!(got.header.sequence_number, start.header.sequence_number);
                assert_eq!(got.payload, start.payload);
                let ids: Vec<u8> = got.header.extensions.iter().map(|e| e.id).collect();
                match media {
                    Media::Video => assert!(ids.is_empty(), "transport extensions dropped"),
                    Media::Audio => assert_eq!(ids, vec![4], "audio level remapped"),
                }
            }
        }
    }

    #[test]
    fn stages_forward_every_packet_and_video_waits_for_a_keyframe() {
        let mut stream = SourceStream::new(Media::Video);
        let mut path = FanoutPath::new(4, Media::Video, ProtectionProfile::AeadAes128Gcm);
        let now = Instant::now();
        let before_keyframe = stream.next_packet().clone();
        assert_eq!(
            path.forward(&before_keyframe, now, Stage::Decide).packets,
            0
        );
        let start = stream.start_packet().clone();
        assert_eq!(path.forward(&start, now, Stage::Decide).packets, 4);
        let rewrite = path.forward(&stream.next_packet().clone(), now, Stage::Rewrite);
        assert_eq!(rewrite.packets, 4);
        let marshal = path.forward(&stream.next_packet().clone(), now, Stage::Marshal);
        assert_eq!(marshal.bytes, 4 * (12 + VIDEO_PAYLOAD_LEN));
        let protect = path.forward(&stream.next_packet().clone(), now, Stage::Protect);
        assert_eq!(
            protect.bytes,
            4 * (12 + VIDEO_PAYLOAD_LEN + 16),
            "GCM adds a 16-byte tag"
        );
    }
}
