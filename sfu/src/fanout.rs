//! One published track's fan-out: a task that owns the incoming track (all its simulcast
//! layers) and, for each subscriber, its layer choice, forwarder and binding. Packets are
//! decided and rewritten here without locks (the task owns all of it; changes arrive as
//! commands), then offered to each subscriber's connection without waiting, so a slow
//! subscriber loses its own packets and never stalls the others. Audio tracks also report
//! their level for active-speaker detection.

use crate::codec::Codec;
use crate::forwarder::{Decision, DropReason, Forwarder, PacketMeta};
use crate::ids::ParticipantId;
use crate::metrics::Metrics;
use crate::rewrite::Binding;
use crate::simulcast::{self, Layer, LayerSelector, LayerVerdict, Quality};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

/// At most one keyframe request per layer per this interval, however many subscribers ask.
pub(crate) const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);
/// How often subscribers' layer choices are revisited (layers come and go, bitrates move).
const RESELECT_INTERVAL: Duration = Duration::from_millis(250);
/// How often an audio track reports its level.
const LEVEL_REPORT_INTERVAL: Duration = Duration::from_millis(250);

/// Where a subscriber's packets of this track go.
pub(crate) struct DownTrackSink {
    pub(crate) track: Arc<TrackLocalStaticRTP>,
    /// RTP bytes handed to the subscriber's connection (all its tracks), so the SFU can
    /// compare the receiver's bandwidth estimate with what it is sent.
    pub(crate) sent_bytes: Arc<AtomicU64>,
}

/// What became of a packet offered to a subscriber's connection.
enum Offer {
    Accepted,
    /// The connection's queue is full (or its track is busy being rebound).
    Congested,
    /// The connection is gone or the track is not bound to it.
    Failed,
}

/// Hands `packet` to the subscriber connection's driver if that takes no waiting.
///
/// `write_rtp` only locks the track's context and pushes onto the connection's bounded
/// event queue; a future dropped before completing has sent nothing. Polling it once here,
/// instead of through a writer task per subscriber, saves a queue, a task and a wake-up
/// per subscriber-packet (docs/benchmarks.md).
fn offer(track: &TrackLocalStaticRTP, packet: rtp::Packet) -> Offer {
    let mut write = track.write_rtp(packet);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match write.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(())) => Offer::Accepted,
        Poll::Ready(Err(e)) => {
            tracing::trace!(error = %e, "write_rtp failed");
            Offer::Failed
        }
        Poll::Pending => Offer::Congested,
    }
}

/// Receives an audio track's loudest level (−dBov) of each report interval.
pub(crate) type LevelReporter = Box<dyn Fn(f32) + Send + Sync>;

enum Command {
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
}

/// Commands to a running fan-out; the task stops when every handle is dropped.
#[derive(Clone)]
pub(crate) struct FanoutHandle {
    commands: mpsc::UnboundedSender<Command>,
}

impl FanoutHandle {
    pub(crate) fn add_subscriber(&self, subscriber: ParticipantId, sink: DownTrackSink) {
        let _ = self
            .commands
            .send(Command::AddSubscriber { subscriber, sink });
    }

    pub(crate) fn bind(&self, subscriber: ParticipantId, binding: Binding) {
        let _ = self.commands.send(Command::Bind {
            subscriber,
            binding: Box::new(binding),
        });
    }

    pub(crate) fn remove_subscriber(&self, subscriber: ParticipantId) {
        let _ = self.commands.send(Command::RemoveSubscriber(subscriber));
    }

    pub(crate) fn set_muted(&self, muted: bool) {
        let _ = self.commands.send(Command::SetMuted(muted));
    }

    /// A subscriber's decoder needs a keyframe of the layer it receives.
    pub(crate) fn request_keyframe(&self, subscriber: ParticipantId) {
        let _ = self.commands.send(Command::RequestKeyframe(subscriber));
    }

    pub(crate) fn set_quality(&self, subscriber: ParticipantId, quality: Quality) {
        let _ = self.commands.send(Command::SetQuality {
            subscriber,
            quality,
        });
    }

    pub(crate) fn set_budget(&self, subscriber: ParticipantId, budget_bps: Option<u64>) {
        let _ = self.commands.send(Command::SetBudget {
            subscriber,
            budget_bps,
        });
    }
}

/// The negotiated extensions of the publisher's receiver, `(id, uri)`.
pub(crate) type ExtensionMap = Vec<(u16, String)>;

/// What the fan-out needs to know about the incoming track.
pub(crate) struct TrackSpec {
    pub(crate) codec: Codec,
    pub(crate) clock_rate: u32,
    /// The publisher's id for the RFC 6464 audio level extension, for audio tracks.
    pub(crate) audio_level_id: Option<u8>,
    pub(crate) level_reporter: Option<LevelReporter>,
}

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
    extension_id: u8,
    loudest: Option<u8>,
    next_report: Instant,
    reporter: LevelReporter,
}

struct Fanout {
    track: Arc<dyn TrackRemote>,
    codec: Codec,
    clock_rate: u32,
    metrics: Metrics,
    subscriptions: Vec<Subscription>,
    muted: bool,
    layers: Vec<Layer>,
    last_keyframe_request: HashMap<u32, Instant>,
    next_reselect: Instant,
    levels: Option<LevelMeter>,
}

/// Starts the fan-out of `track`.
pub(crate) fn spawn(
    track: Arc<dyn TrackRemote>,
    spec: TrackSpec,
    metrics: Metrics,
) -> (FanoutHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let now = Instant::now();
    let levels = match (spec.audio_level_id, spec.level_reporter) {
        (Some(extension_id), Some(reporter)) => Some(LevelMeter {
            extension_id,
            loudest: None,
            next_report: now + LEVEL_REPORT_INTERVAL,
            reporter,
        }),
        _ => None,
    };
    let fanout = Fanout {
        track,
        codec: spec.codec,
        clock_rate: spec.clock_rate,
        metrics,
        subscriptions: Vec::new(),
        muted: false,
        layers: Vec::new(),
        last_keyframe_request: HashMap::new(),
        next_reselect: now,
        levels,
    };
    let task = tokio::spawn(fanout.run(rx));
    (FanoutHandle { commands: tx }, task)
}

impl Fanout {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let track = Arc::clone(&self.track);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.handle(command).await,
                    None => break,
                },
                event = track.poll() => match event {
                    Some(TrackRemoteEvent::OnRtpPacket(packet)) => self.forward(packet).await,
                    Some(TrackRemoteEvent::OnOpen(init)) => {
                        self.layer_mut(init.ssrc, init.rid.clone());
                        self.next_reselect = Instant::now();
                    }
                    Some(TrackRemoteEvent::OnEnded) | None => break,
                    Some(_) => {}
                },
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::AddSubscriber { subscriber, sink } => {
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
            Command::Bind {
                subscriber,
                binding,
            } => {
                if let Some(s) = self.subscriptions.iter_mut().find(|s| s.id == subscriber) {
                    s.binding = Some(*binding);
                    s.forwarder.set_negotiated();
                }
                // A new subscriber's decoder needs a keyframe to start.
                self.reselect(now);
                self.request_wanted_keyframes(now).await;
            }
            Command::RemoveSubscriber(subscriber) => {
                self.subscriptions.retain(|s| s.id != subscriber);
            }
            Command::SetMuted(muted) => {
                self.muted = muted;
                for s in &mut self.subscriptions {
                    s.forwarder.set_muted(muted);
                }
                if !muted {
                    self.request_wanted_keyframes(now).await;
                }
            }
            Command::RequestKeyframe(subscriber) => {
                let ssrc = self
                    .subscriptions
                    .iter()
                    .find(|s| s.id == subscriber)
                    .and_then(|s| s.selector.current().or(s.selector.pending()));
                if let Some(ssrc) = ssrc {
                    self.request_keyframe(ssrc, now).await;
                }
            }
            Command::SetQuality {
                subscriber,
                quality,
            } => {
                if let Some(s) = self.subscriptions.iter_mut().find(|s| s.id == subscriber) {
                    s.quality = quality;
                }
                self.reselect(now);
                self.request_wanted_keyframes(now).await;
            }
            Command::SetBudget {
                subscriber,
                budget_bps,
            } => {
                if let Some(s) = self.subscriptions.iter_mut().find(|s| s.id == subscriber) {
                    s.budget_bps = budget_bps;
                }
                self.reselect(now);
            }
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

    async fn forward(&mut self, packet: rtp::Packet) {
        let now = Instant::now();
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
                                        self.codec.renumbered(&packet.payload, &numbering)
                                    }
                                },
                            };
                            match offer(&s.sink.track, rewritten) {
                                Offer::Accepted => {
                                    s.sink.sent_bytes.fetch_add(size, Ordering::Relaxed);
                                }
                                Offer::Congested => {
                                    self.metrics.dropped(DropReason::SubscriberCongested)
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
        if wants_keyframe {
            self.request_wanted_keyframes(now).await;
        }
    }

    fn meter_level(&mut self, packet: &rtp::Packet, now: Instant) {
        let Some(meter) = &mut self.levels else {
            return;
        };
        if let Some(level) = packet
            .header
            .extensions
            .iter()
            .find(|e| e.id == meter.extension_id)
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
    async fn request_wanted_keyframes(&mut self, now: Instant) {
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
            self.request_keyframe(ssrc, now).await;
        }
    }

    async fn request_keyframe(&mut self, media_ssrc: u32, now: Instant) {
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
        let pli = PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc,
        };
        if let Err(e) = self.track.write_rtcp(vec![Box::new(pli)]).await {
            tracing::debug!(error = %e, "keyframe request not sent");
        }
    }
}
