//! One published track's fan-out: its simulcast layers and, for each subscriber, its layer
//! choice, forwarder and binding. It lives in the media loop that owns the publisher's and the
//! subscribers' connections, which hands it each incoming packet; packets are decided and
//! rewritten here without locks, then written to each subscriber's connection through
//! [`MediaIo`], so a fan-out can be driven in tests with synthetic packets and no network.
//! Audio tracks also report their level for active-speaker detection.

use crate::codec::{Codec, RenumberedCopies};
use crate::forwarder::{Decision, DropReason, Forwarder, PacketMeta};
use crate::ids::ParticipantId;
use crate::media_loop::{ConnKey, FanoutKey, LoopHandle};
use crate::metrics::Metrics;
use crate::rewrite::Binding;
use crate::simulcast::{self, Layer, LayerSelector, LayerVerdict, Quality};
use crate::transport::AUDIO_LEVEL_URI;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// At most one keyframe request per layer per this interval, however many subscribers ask.
pub(crate) const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);
/// How often subscribers' layer choices are revisited (layers come and go, bitrates move).
const RESELECT_INTERVAL: Duration = Duration::from_millis(250);
/// How often an audio track reports its level.
const LEVEL_REPORT_INTERVAL: Duration = Duration::from_millis(250);

/// Where a subscriber's packets of this track go: its connection and the sender there.
pub(crate) struct DownTrackSink {
    pub(crate) conn: ConnKey,
    pub(crate) sender: RTCRtpSenderId,
    /// RTP bytes handed to the subscriber's connection (all its tracks), so the SFU can
    /// compare the receiver's bandwidth estimate with what it is sent.
    pub(crate) sent_bytes: Arc<AtomicU64>,
}

/// Where the track comes from: the publisher's connection and its receiver there (keyframe
/// requests go to it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PublisherSource {
    pub(crate) conn: ConnKey,
    pub(crate) receiver: RTCRtpReceiverId,
}

/// What became of a packet written to a subscriber's connection.
pub(crate) enum Offer {
    Accepted,
    /// The connection is gone or the sender is not on it any more.
    Failed,
}

/// What a fan-out writes to: the media loop's connections.
pub(crate) trait MediaIo {
    /// Queues `packet` on the subscriber connection's sender (it goes out with the loop's next
    /// flush of that connection).
    fn send_rtp(&mut self, conn: ConnKey, sender: RTCRtpSenderId, packet: rtp::Packet) -> Offer;
    /// Asks the publisher for a keyframe of the stream `media_ssrc` (PLI).
    fn request_keyframe(&mut self, publisher: PublisherSource, media_ssrc: u32);
}

/// Receives an audio track's loudest level (−dBov) of each report interval.
pub(crate) type LevelReporter = Box<dyn Fn(f32) + Send + Sync>;

pub(crate) enum FanoutCommand {
    AddSubscriber {
        subscriber: ParticipantId,
        sink: DownTrackSink,
    },
    Bind {
        subscriber: ParticipantId,
        binding: Box<Binding>,
    },
    RemoveSubscriber(ParticipantId),
    SetMuted(bool),
    RequestKeyframe(ParticipantId),
    SetQuality {
        subscriber: ParticipantId,
        quality: Quality,
    },
    SetBudget {
        subscriber: ParticipantId,
        budget_bps: Option<u64>,
    },
    SetLevelReporter(LevelReporter),
    /// The track is gone: the loop forgets the fan-out.
    Close,
}

/// Commands to a fan-out in its media loop. The fan-out lives until it is closed (by the
/// publisher's participant, or with the publisher's connection).
#[derive(Clone)]
pub(crate) struct FanoutHandle {
    key: FanoutKey,
    media: LoopHandle,
}

impl FanoutHandle {
    pub(crate) fn new(key: FanoutKey, media: LoopHandle) -> Self {
        Self { key, media }
    }

    fn send(&self, command: FanoutCommand) {
        self.media.fanout(self.key, command);
    }

    /// Audio: where the track's level goes.
    pub(crate) fn set_level_reporter(&self, reporter: LevelReporter) {
        self.send(FanoutCommand::SetLevelReporter(reporter));
    }

    pub(crate) fn close(&self) {
        self.send(FanoutCommand::Close);
    }

    pub(crate) fn add_subscriber(&self, subscriber: ParticipantId, sink: DownTrackSink) {
        self.send(FanoutCommand::AddSubscriber { subscriber, sink });
    }

    pub(crate) fn bind(&self, subscriber: ParticipantId, binding: Binding) {
        self.send(FanoutCommand::Bind {
            subscriber,
            binding: Box::new(binding),
        });
    }

    pub(crate) fn remove_subscriber(&self, subscriber: ParticipantId) {
        self.send(FanoutCommand::RemoveSubscriber(subscriber));
    }

    pub(crate) fn set_muted(&self, muted: bool) {
        self.send(FanoutCommand::SetMuted(muted));
    }

    /// A subscriber's decoder needs a keyframe of the layer it receives.
    pub(crate) fn request_keyframe(&self, subscriber: ParticipantId) {
        self.send(FanoutCommand::RequestKeyframe(subscriber));
    }

    pub(crate) fn set_quality(&self, subscriber: ParticipantId, quality: Quality) {
        self.send(FanoutCommand::SetQuality {
            subscriber,
            quality,
        });
    }

    pub(crate) fn set_budget(&self, subscriber: ParticipantId, budget_bps: Option<u64>) {
        self.send(FanoutCommand::SetBudget {
            subscriber,
            budget_bps,
        });
    }
}

/// The negotiated extensions of the publisher's receiver, `(id, uri)`.
pub(crate) type ExtensionMap = Vec<(u16, String)>;

struct Subscription {
    id: ParticipantId,
    sink: DownTrackSink,
    forwarder: Forwarder,
    binding: Option<Binding>,
    selector: LayerSelector,
    quality: Quality,
    budget_bps: Option<u64>,
}

/// The loudest audio level (lowest −dBov) since the last report: speech comes in bursts,
/// and an average over a window with a pause in it would hide a word.
struct LevelMeter {
    loudest: Option<u8>,
    next_report: Instant,
    reporter: LevelReporter,
}

/// One published track's fan-out state.
pub(crate) struct Fanout {
    publisher: PublisherSource,
    codec: Codec,
    clock_rate: u32,
    /// The publisher's id for the RFC 6464 audio level extension, for audio tracks.
    audio_level_id: Option<u8>,
    metrics: Metrics,
    subscriptions: Vec<Subscription>,
    muted: bool,
    layers: Vec<Layer>,
    last_keyframe_request: HashMap<u32, Instant>,
    next_reselect: Instant,
    levels: Option<LevelMeter>,
    /// The current packet's payload copies for subscribers with their own picture numbers.
    renumbered: RenumberedCopies,
}

impl Fanout {
    /// The fan-out of a track arriving with `codec` and the publisher's header `extensions`.
    pub(crate) fn new(
        codec: &RTCRtpCodec,
        extensions: &ExtensionMap,
        publisher: PublisherSource,
        metrics: Metrics,
        now: Instant,
    ) -> Self {
        let audio_level_id = extensions
            .iter()
            .find(|(_, uri)| uri == AUDIO_LEVEL_URI)
            .and_then(|(id, _)| u8::try_from(*id).ok());
        Self {
            publisher,
            codec: Codec::from_mime(&codec.mime_type),
            clock_rate: codec.clock_rate,
            audio_level_id,
            metrics,
            subscriptions: Vec::new(),
            muted: false,
            layers: Vec::new(),
            last_keyframe_request: HashMap::new(),
            next_reselect: now,
            levels: None,
            renumbered: RenumberedCopies::default(),
        }
    }

    /// A stream of the track started: simulcast layers name themselves by rid.
    pub(crate) fn add_layer(&mut self, ssrc: u32, rid: Option<String>, now: Instant) {
        let layer = self.layer_mut(ssrc, rid.clone());
        if layer.rid.is_none() {
            layer.rid = rid;
        }
        self.next_reselect = now;
    }

    pub(crate) fn handle(&mut self, command: FanoutCommand, now: Instant, io: &mut impl MediaIo) {
        match command {
            FanoutCommand::AddSubscriber { subscriber, sink } => {
                self.subscriptions.retain(|s| s.id != subscriber);
                let mut forwarder = Forwarder::new(self.codec.needs_keyframe(), self.clock_rate);
                forwarder.set_muted(self.muted);
                self.subscriptions.push(Subscription {
                    id: subscriber,
                    sink,
                    forwarder,
                    binding: None,
                    selector: LayerSelector::default(),
                    quality: Quality::default(),
                    budget_bps: None,
                });
                self.next_reselect = now;
            }
            FanoutCommand::Bind {
                subscriber,
                binding,
            } => {
                if let Some(s) = self.subscriptions.iter_mut().find(|s| s.id == subscriber) {
                    s.binding = Some(*binding);
                    s.forwarder.set_negotiated();
                }
                // A new subscriber's decoder needs a keyframe to start.
                self.reselect(now);
                self.request_wanted_keyframes(now, io);
            }
            FanoutCommand::RemoveSubscriber(subscriber) => {
                self.subscriptions.retain(|s| s.id != subscriber);
            }
            FanoutCommand::SetMuted(muted) => {
                self.muted = muted;
                for s in &mut self.subscriptions {
                    s.forwarder.set_muted(muted);
                }
                if !muted {
                    self.request_wanted_keyframes(now, io);
                }
            }
            FanoutCommand::RequestKeyframe(subscriber) => {
                let ssrc = self
                    .subscriptions
                    .iter()
                    .find(|s| s.id == subscriber)
                    .and_then(|s| s.selector.current().or(s.selector.pending()));
                if let Some(ssrc) = ssrc {
                    self.request_keyframe(ssrc, now, io);
                }
            }
            FanoutCommand::SetQuality {
                subscriber,
                quality,
            } => {
                if let Some(s) = self.subscriptions.iter_mut().find(|s| s.id == subscriber) {
                    s.quality = quality;
                }
                self.reselect(now);
                self.request_wanted_keyframes(now, io);
            }
            FanoutCommand::SetBudget {
                subscriber,
                budget_bps,
            } => {
                if let Some(s) = self.subscriptions.iter_mut().find(|s| s.id == subscriber) {
                    s.budget_bps = budget_bps;
                }
                self.reselect(now);
            }
            FanoutCommand::SetLevelReporter(reporter) => {
                if self.audio_level_id.is_some() {
                    self.levels = Some(LevelMeter {
                        loudest: None,
                        next_report: now + LEVEL_REPORT_INTERVAL,
                        reporter,
                    });
                }
            }
            // The loop removes the fan-out itself.
            FanoutCommand::Close => {}
        }
    }

    fn layer_mut(&mut self, ssrc: u32, rid: Option<String>) -> &mut Layer {
        let index = match self.layers.iter().position(|l| l.ssrc == ssrc) {
            Some(index) => index,
            None => {
                self.layers.push(Layer::new(ssrc, rid));
                self.layers.len() - 1
            }
        };
        &mut self.layers[index]
    }

    /// Points every subscriber at the layer its quality and budget call for.
    fn reselect(&mut self, now: Instant) {
        self.next_reselect = now + RESELECT_INTERVAL;
        let ranked = simulcast::ranked(&self.layers, now);
        for s in &mut self.subscriptions {
            s.selector
                .set_target(simulcast::choose(&ranked, s.quality, s.budget_bps));
        }
    }

    /// Decides, rewrites and writes one incoming packet for every subscriber.
    pub(crate) fn forward(&mut self, packet: rtp::Packet, now: Instant, io: &mut impl MediaIo) {
        let ssrc = packet.header.ssrc;
        let needs_keyframe = self.codec.needs_keyframe();
        let keyframe_start = needs_keyframe && self.codec.is_keyframe_start(&packet.payload);
        let is_vp8 = self.codec == Codec::Vp8;
        let layers_before = self.layers.len();
        let layer = self.layer_mut(ssrc, None);
        layer.on_packet(packet.payload.len(), now);
        if keyframe_start && is_vp8 {
            if let Some(size) = simulcast::vp8_keyframe_size(&packet.payload) {
                layer.resolution = Some(size);
            }
        }
        let new_layer = self.layers.len() != layers_before;
        if new_layer || now >= self.next_reselect {
            self.reselect(now);
        }
        self.meter_level(&packet, now);

        let meta = PacketMeta {
            seq: packet.header.sequence_number,
            timestamp: packet.header.timestamp,
            keyframe_start,
            numbering: self.codec.picture_numbering(&packet.payload),
        };
        let mut wants_keyframe = false;
        for s in &mut self.subscriptions {
            match s.selector.on_packet(ssrc, keyframe_start, needs_keyframe) {
                LayerVerdict::Drop => {
                    let reason = if Some(ssrc) == s.selector.pending() {
                        DropReason::AwaitingKeyframe
                    } else {
                        DropReason::LayerNotSelected
                    };
                    self.metrics.dropped(reason);
                }
                LayerVerdict::Forward { switched } => {
                    if switched {
                        s.forwarder.switch_source();
                    }
                    match s.forwarder.decide(&meta, now) {
                        Decision::Forward {
                            seq,
                            timestamp,
                            numbering,
                        } => {
                            let Some(binding) = &s.binding else {
                                self.metrics.dropped(DropReason::NotNegotiated);
                                continue;
                            };
                            let size = 12 + packet.payload.len() as u64;
                            let rewritten = rtp::Packet {
                                header: binding.rewrite(&packet.header, seq, timestamp),
                                payload: match numbering {
                                    None => packet.payload.clone(),
                                    Some(numbering) => {
                                        self.renumbered.get(self.codec, &packet.payload, &numbering)
                                    }
                                },
                            };
                            match io.send_rtp(s.sink.conn, s.sink.sender, rewritten) {
                                Offer::Accepted => {
                                    s.sink.sent_bytes.fetch_add(size, Ordering::Relaxed);
                                }
                                Offer::Failed => self.metrics.dropped(DropReason::SubscriberGone),
                            }
                        }
                        Decision::Drop(reason) => self.metrics.dropped(reason),
                    }
                }
            }
            wants_keyframe |= s.forwarder.wants_keyframe() || s.selector.pending().is_some();
        }
        self.renumbered.clear();
        if wants_keyframe {
            self.request_wanted_keyframes(now, io);
        }
    }

    fn meter_level(&mut self, packet: &rtp::Packet, now: Instant) {
        let (Some(meter), Some(extension_id)) = (&mut self.levels, self.audio_level_id) else {
            return;
        };
        if let Some(level) = packet
            .header
            .extensions
            .iter()
            .find(|e| e.id == extension_id)
            .and_then(|e| e.payload.first())
        {
            let level = level & 0x7f;
            meter.loudest = Some(meter.loudest.map_or(level, |l| l.min(level)));
        }
        if now >= meter.next_report {
            meter.next_report = now + LEVEL_REPORT_INTERVAL;
            if let Some(loudest) = meter.loudest.take() {
                if !self.muted {
                    (meter.reporter)(f32::from(loudest));
                }
            }
        }
    }

    /// Asks for a keyframe of every layer some subscriber is waiting on.
    fn request_wanted_keyframes(&mut self, now: Instant, io: &mut impl MediaIo) {
        if !self.codec.needs_keyframe() || self.muted {
            return;
        }
        let mut wanted: Vec<u32> = self
            .subscriptions
            .iter()
            .filter(|s| s.binding.is_some())
            .filter_map(|s| {
                s.selector.pending().or_else(|| {
                    s.forwarder
                        .wants_keyframe()
                        .then(|| s.selector.current())
                        .flatten()
                })
            })
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        for ssrc in wanted {
            self.request_keyframe(ssrc, now, io);
        }
    }

    fn request_keyframe(&mut self, media_ssrc: u32, now: Instant, io: &mut impl MediaIo) {
        if !self.codec.needs_keyframe() {
            return;
        }
        if self
            .last_keyframe_request
            .get(&media_ssrc)
            .is_some_and(|at| now.duration_since(*at) < KEYFRAME_REQUEST_INTERVAL)
        {
            return;
        }
        self.last_keyframe_request.insert(media_ssrc, now);
        io.request_keyframe(self.publisher, media_ssrc);
    }
}
