//! One published track's fan-out: a task that owns the incoming track and, for each
//! subscriber, its forwarder and binding. Packets are decided and rewritten here without locks
//! (the task owns all of it; changes arrive as commands), then handed to each subscriber's
//! writer queue without waiting, so a slow subscriber loses its own packets and never stalls
//! the others.

use crate::codec::Codec;
use crate::forwarder::{Decision, DropReason, Forwarder, PacketMeta};
use crate::ids::ParticipantId;
use crate::metrics::Metrics;
use crate::rewrite::Binding;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

/// At most one keyframe request per track per this interval, however many subscribers ask.
pub(crate) const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);

/// A packet on its way to one subscriber's connection.
pub(crate) struct WriteJob {
    pub(crate) track: Arc<TrackLocalStaticRTP>,
    pub(crate) packet: rtp::Packet,
}

/// Where a subscriber's packets of this track go.
pub(crate) struct DownTrackSink {
    pub(crate) track: Arc<TrackLocalStaticRTP>,
    pub(crate) writer: mpsc::Sender<WriteJob>,
}

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
    RequestKeyframe,
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

    pub(crate) fn request_keyframe(&self) {
        let _ = self.commands.send(Command::RequestKeyframe);
    }
}

/// The negotiated extensions of the publisher's receiver, `(id, uri)`.
pub(crate) type ExtensionMap = Vec<(u16, String)>;

struct Subscription {
    id: ParticipantId,
    sink: DownTrackSink,
    forwarder: Forwarder,
    binding: Option<Binding>,
}

struct Fanout {
    track: Arc<dyn TrackRemote>,
    codec: Codec,
    clock_rate: u32,
    metrics: Metrics,
    subscriptions: Vec<Subscription>,
    muted: bool,
    media_ssrc: Option<u32>,
    last_keyframe_request: Option<Instant>,
}

/// Starts the fan-out of `track`.
pub(crate) fn spawn(
    track: Arc<dyn TrackRemote>,
    codec: Codec,
    clock_rate: u32,
    metrics: Metrics,
) -> (FanoutHandle, JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let fanout = Fanout {
        track,
        codec,
        clock_rate,
        metrics,
        subscriptions: Vec::new(),
        muted: false,
        media_ssrc: None,
        last_keyframe_request: None,
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
                    Some(TrackRemoteEvent::OnEnded) | None => break,
                    Some(_) => {}
                },
            }
        }
    }

    async fn handle(&mut self, command: Command) {
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
                });
            }
            Command::Bind {
                subscriber,
                binding,
            } => {
                if let Some(s) = self.subscriptions.iter_mut().find(|s| s.id == subscriber) {
                    s.binding = Some(*binding);
                    s.forwarder.set_negotiated();
                    // A new subscriber's decoder needs a keyframe to start.
                    if s.forwarder.wants_keyframe() {
                        self.request_keyframe(Instant::now()).await;
                    }
                }
            }
            Command::RemoveSubscriber(subscriber) => {
                self.subscriptions.retain(|s| s.id != subscriber);
            }
            Command::SetMuted(muted) => {
                self.muted = muted;
                for s in &mut self.subscriptions {
                    s.forwarder.set_muted(muted);
                }
                if !muted && self.codec.needs_keyframe() {
                    self.request_keyframe(Instant::now()).await;
                }
            }
            Command::RequestKeyframe => self.request_keyframe(Instant::now()).await,
        }
    }

    async fn forward(&mut self, packet: rtp::Packet) {
        self.media_ssrc = Some(packet.header.ssrc);
        let meta = PacketMeta {
            seq: packet.header.sequence_number,
            timestamp: packet.header.timestamp,
            keyframe_start: self.codec.needs_keyframe()
                && self.codec.is_keyframe_start(&packet.payload),
        };
        let now = Instant::now();
        let mut wants_keyframe = false;
        for s in &mut self.subscriptions {
            match s.forwarder.decide(&meta, now) {
                Decision::Forward { seq, timestamp } => {
                    let Some(binding) = &s.binding else {
                        self.metrics.dropped(DropReason::NotNegotiated);
                        continue;
                    };
                    let job = WriteJob {
                        track: Arc::clone(&s.sink.track),
                        packet: rtp::Packet {
                            header: binding.rewrite(&packet.header, seq, timestamp),
                            payload: packet.payload.clone(),
                        },
                    };
                    if s.sink.writer.try_send(job).is_err() {
                        self.metrics.dropped(DropReason::SubscriberCongested);
                    }
                }
                Decision::Drop(reason) => self.metrics.dropped(reason),
            }
            wants_keyframe |= s.forwarder.wants_keyframe();
        }
        if wants_keyframe {
            self.request_keyframe(now).await;
        }
    }

    async fn request_keyframe(&mut self, now: Instant) {
        if !self.codec.needs_keyframe() || self.muted {
            return;
        }
        let Some(media_ssrc) = self.media_ssrc else {
            return;
        };
        if self
            .last_keyframe_request
            .is_some_and(|at| now.duration_since(at) < KEYFRAME_REQUEST_INTERVAL)
        {
            return;
        }
        self.last_keyframe_request = Some(now);
        let pli = PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc,
        };
        if let Err(e) = self.track.write_rtcp(vec![Box::new(pli)]).await {
            tracing::debug!(error = %e, "keyframe request not sent");
        }
    }
}

/// Drains one subscriber connection's queue into webrtc-rs, whose write waits when that
/// connection is behind; only this task waits then.
pub(crate) async fn run_writer(mut jobs: mpsc::Receiver<WriteJob>) {
    while let Some(job) = jobs.recv().await {
        if let Err(e) = job.track.write_rtp(job.packet).await {
            tracing::trace!(error = %e, "write_rtp failed");
        }
    }
}
