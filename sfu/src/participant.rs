//! One participant's media: its publisher connection (media in, the client offers), its
//! subscriber connection (media out, the SFU offers, one offer in flight at a time), the
//! tracks it publishes and the down-tracks it receives. A task owns all of it and takes
//! commands from the session, the room and its connections' callbacks, in order.

use crate::codec::Codec;
use crate::events::{EndReason, EventSink, MediaKind, SfuEvent, TrackInfo};
use crate::fanout::{self, DownTrackSink};
use crate::ids::{ParticipantId, TrackId};
use crate::metrics::Metrics;
use crate::rewrite::Binding;
use crate::room::{MuteError, PublishedSection, RoomCommand, RoomHandle, TrackSource};
use crate::sdp;
use crate::simulcast::{DownlinkBudget, DownlinkGovernor, Quality};
use crate::transport::{BuiltPeer, PeerFactory, PeerRole, PortLease, AUDIO_LEVEL_URI};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::RTCRtpTransceiverDirection;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceCandidateInit, RTCIceGatheringState,
    RTCPeerConnectionState,
};
use webrtc::rtp_transceiver::{RtpSender, RtpTransceiver};

/// An ICE candidate from the client, W3C `RTCIceCandidateInit` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateInit {
    /// The `candidate:` line.
    pub candidate: String,
    /// The m-section's mid.
    pub sdp_mid: Option<String>,
    /// The m-section's index.
    pub sdp_mline_index: Option<u16>,
    /// The ICE ufrag.
    pub username_fragment: Option<String>,
}

/// Why a media operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// The SDP could not be parsed or applied.
    #[error("{0}")]
    InvalidSdp(String),
    /// An answer arrived with no offer outstanding.
    #[error("there is no subscriber offer waiting for an answer")]
    NoPendingOffer,
    /// The server could not set up media (e.g. no free port).
    #[error("{0}")]
    Internal(String),
    /// The participant already left.
    #[error("the participant has left")]
    Gone,
    /// No such track is forwarded to this participant.
    #[error("no track {0} is forwarded to you")]
    UnknownTrack(String),
}

/// Timing rules for a participant's connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionTimeouts {
    /// How long a connection may stay failed or disconnected before the participant is removed.
    pub ice_lost: Duration,
    /// How long a new connection may take to connect.
    pub connect: Duration,
}

impl Default for ConnectionTimeouts {
    fn default() -> Self {
        Self {
            ice_lost: Duration::from_secs(15),
            connect: Duration::from_secs(30),
        }
    }
}

pub(crate) enum ParticipantCommand {
    PublisherOffer {
        sdp: String,
        reply: oneshot::Sender<Result<String, MediaError>>,
    },
    SubscriberAnswer {
        sdp: String,
        reply: oneshot::Sender<Result<(), MediaError>>,
    },
    Candidate {
        role: PeerRole,
        candidate: CandidateInit,
    },
    Subscribe {
        publisher: ParticipantId,
        track: TrackInfo,
        source: TrackSource,
    },
    Unsubscribe {
        track_id: TrackId,
    },
    RemoteTrack(Arc<dyn TrackRemote>),
    PeerState {
        role: PeerRole,
        state: RTCPeerConnectionState,
    },
    /// A subscriber asked for a keyframe of the track it receives as `ssrc`.
    KeyframeRequest {
        ssrc: u32,
    },
    SetQuality {
        track_id: TrackId,
        quality: Quality,
        reply: oneshot::Sender<Result<(), MediaError>>,
    },
    /// The subscriber's receiver estimated its downlink (REMB).
    Bandwidth {
        bps: u64,
    },
    Mute {
        track_id: TrackId,
        muted: bool,
        reply: oneshot::Sender<Result<(), MuteError>>,
    },
    Chat {
        text: String,
    },
    End(Option<EndReason>),
}

/// Forwards a connection's callbacks into the participant task.
struct PeerEvents {
    role: PeerRole,
    commands: mpsc::UnboundedSender<ParticipantCommand>,
    gathered: watch::Sender<bool>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for PeerEvents {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.commands.send(ParticipantCommand::PeerState {
            role: self.role,
            state,
        });
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if self.role == PeerRole::Publisher {
            let _ = self.commands.send(ParticipantCommand::RemoteTrack(track));
        }
    }
}

/// A connection and what the participant task tracks about it.
struct Connection {
    pc: Arc<dyn PeerConnection>,
    _port: Option<PortLease>,
    gathered: watch::Receiver<bool>,
    /// Candidates that arrived before the remote description.
    early_candidates: Vec<CandidateInit>,
    has_remote_description: bool,
    /// DTLS is done: SRTP can protect what we write.
    connected: bool,
    /// When the participant is removed unless this connection (re)connects.
    deadline: Option<Instant>,
}

impl Connection {
    async fn add_candidate(&mut self, candidate: CandidateInit) {
        if !self.has_remote_description {
            // Bounded: a client flooding candidates early cannot grow this without limit.
            if self.early_candidates.len() < 64 {
                self.early_candidates.push(candidate);
            }
            return;
        }
        let init = RTCIceCandidateInit {
            candidate: candidate.candidate,
            sdp_mid: candidate.sdp_mid,
            sdp_mline_index: candidate.sdp_mline_index,
            username_fragment: candidate.username_fragment,
            url: None,
        };
        if let Err(e) = self.pc.add_ice_candidate(init).await {
            tracing::debug!(error = %e, "remote candidate not added");
        }
    }

    async fn remote_description_applied(&mut self) {
        self.has_remote_description = true;
        for candidate in std::mem::take(&mut self.early_candidates) {
            self.add_candidate(candidate).await;
        }
    }

    /// Applies our own offer or answer; returns it as sent, with host candidates in it.
    async fn set_local(
        &mut self,
        description: RTCSessionDescription,
    ) -> Result<String, MediaError> {
        self.pc
            .set_local_description(description)
            .await
            .map_err(|e| MediaError::Internal(format!("local description not applied: {e}")))?;
        self.local_sdp().await
    }

    /// The local description once host candidates are in it.
    async fn local_sdp(&mut self) -> Result<String, MediaError> {
        let wait = self.gathered.wait_for(|done| *done);
        let _ = tokio::time::timeout(Duration::from_secs(3), wait).await;
        self.pc
            .local_description()
            .await
            .map(|d| d.sdp)
            .ok_or_else(|| MediaError::Internal("no local description".into()))
    }
}

/// A track this participant receives.
struct DownTrack {
    source: TrackSource,
    sender: Arc<dyn RtpSender>,
    /// Set `inactive` when the track goes, so the next offer says so.
    transceiver: Option<Arc<dyn RtpTransceiver>>,
    local: Arc<TrackLocalStaticRTP>,
    ssrc: u32,
    kind: MediaKind,
    /// The last bandwidth share sent to the fan-out, to send only real changes.
    budget_bps: Option<u64>,
    state: DownTrackState,
    /// Watches the subscriber's keyframe requests once bound (a track's events only flow then).
    rtcp_task: Option<JoinHandle<()>>,
}

/// How far a down-track is on its way to carrying media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DownTrackState {
    /// Added to the connection, in no offer yet.
    Added,
    /// In the outstanding offer.
    Offered,
    /// In an applied answer, waiting for the connection to be up (SRTP keys exist only then).
    Negotiated,
    /// The fan-out forwards to it.
    Bound,
}

/// A track this participant publishes, once media arrived.
struct UpTrack {
    task: JoinHandle<()>,
}

/// Where the subscriber connection is in its offer/answer cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Negotiation {
    Stable,
    /// An offer is out; `again` records changes made since, to offer once it is answered.
    AwaitingAnswer {
        again: bool,
    },
}

/// Most tracks a participant may ask a quality for before their media reaches it: a room's
/// worth, and a bound on what a client naming made-up tracks can make the server keep.
const MAX_EARLY_QUALITY_WISHES: usize = 256;

pub(crate) struct ParticipantTask {
    id: ParticipantId,
    room: RoomHandle,
    events: EventSink,
    factory: Arc<PeerFactory>,
    metrics: Metrics,
    timeouts: ConnectionTimeouts,
    /// Handed to connection callbacks.
    commands_tx: mpsc::UnboundedSender<ParticipantCommand>,
    publisher: Option<Connection>,
    subscriber: Option<Connection>,
    negotiation: Negotiation,
    /// Changes wait for an offer until the command queue is drained.
    offer_pending: bool,
    /// mid → track id of what this participant publishes.
    published: HashMap<String, TrackId>,
    up_tracks: HashMap<TrackId, UpTrack>,
    down_tracks: HashMap<TrackId, DownTrack>,
    /// The quality this participant asked for, per track, kept from before the track's media
    /// reaches it (a client may ask as soon as the track is announced) until it is removed.
    wanted_quality: HashMap<TrackId, Quality>,
    /// RTP bytes the fan-outs handed to the subscriber connection.
    sent_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// Reads the subscriber's bandwidth estimates.
    downlink: DownlinkGovernor,
}

impl ParticipantTask {
    pub(crate) fn new(
        id: ParticipantId,
        room: RoomHandle,
        events: EventSink,
        factory: Arc<PeerFactory>,
        metrics: Metrics,
        timeouts: ConnectionTimeouts,
        commands_tx: mpsc::UnboundedSender<ParticipantCommand>,
    ) -> Self {
        Self {
            id,
            room,
            events,
            factory,
            metrics,
            timeouts,
            commands_tx,
            publisher: None,
            subscriber: None,
            negotiation: Negotiation::Stable,
            offer_pending: false,
            published: HashMap::new(),
            up_tracks: HashMap::new(),
            down_tracks: HashMap::new(),
            wanted_quality: HashMap::new(),
            sent_bytes: Arc::default(),
            downlink: DownlinkGovernor::default(),
        }
    }

    pub(crate) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<ParticipantCommand>) {
        let end_reason = loop {
            let deadline = self.next_deadline();
            let command = tokio::select! {
                command = commands.recv() => command,
                _ = sleep_until(deadline) => {
                    tracing::info!(participant = %self.id, "media connection timed out");
                    break Some(EndReason::MediaTimeout);
                }
            };
            match command {
                Some(ParticipantCommand::End(reason)) => break reason,
                None => break None,
                Some(command) => {
                    self.handle(command).await;
                    if commands.is_empty() {
                        self.send_pending_offer().await;
                    }
                }
            }
        };
        self.close(end_reason).await;
    }

    fn next_deadline(&self) -> Option<Instant> {
        [&self.publisher, &self.subscriber]
            .into_iter()
            .flatten()
            .filter_map(|c| c.deadline)
            .min()
    }

    async fn handle(&mut self, command: ParticipantCommand) {
        match command {
            ParticipantCommand::PublisherOffer { sdp, reply } => {
                let result = self.publisher_offer(sdp).await;
                let _ = reply.send(result);
            }
            ParticipantCommand::SubscriberAnswer { sdp, reply } => {
                let result = self.subscriber_answer(sdp).await;
                let _ = reply.send(result);
            }
            ParticipantCommand::Candidate { role, candidate } => {
                let connection = match role {
                    PeerRole::Publisher => self.publisher.as_mut(),
                    PeerRole::Subscriber => self.subscriber.as_mut(),
                };
                if let Some(connection) = connection {
                    connection.add_candidate(candidate).await;
                }
            }
            ParticipantCommand::Subscribe {
                publisher,
                track,
                source,
            } => {
                if let Err(e) = self.subscribe(publisher, track, source).await {
                    tracing::warn!(participant = %self.id, error = %e, "subscription failed");
                }
            }
            ParticipantCommand::Unsubscribe { track_id } => self.unsubscribe(&track_id).await,
            ParticipantCommand::RemoteTrack(track) => self.remote_track(track).await,
            ParticipantCommand::PeerState { role, state } => self.peer_state(role, state).await,
            ParticipantCommand::KeyframeRequest { ssrc } => {
                if let Some(down) = self.down_tracks.values().find(|d| d.ssrc == ssrc) {
                    down.source.fanout.request_keyframe(self.id.clone());
                }
            }
            ParticipantCommand::SetQuality {
                track_id,
                quality,
                reply,
            } => {
                let result = if let Some(down) = self.down_tracks.get(&track_id) {
                    down.source.fanout.set_quality(self.id.clone(), quality);
                    self.wanted_quality.insert(track_id, quality);
                    Ok(())
                } else if self.wanted_quality.len() < MAX_EARLY_QUALITY_WISHES
                    || self.wanted_quality.contains_key(&track_id)
                {
                    // Announced but its media not here yet: applied when it is.
                    self.wanted_quality.insert(track_id, quality);
                    Ok(())
                } else {
                    Err(MediaError::UnknownTrack(track_id.to_string()))
                };
                let _ = reply.send(result);
            }
            ParticipantCommand::Bandwidth { bps } => self.share_bandwidth(bps),
            ParticipantCommand::Mute {
                track_id,
                muted,
                reply,
            } => {
                self.room.send(RoomCommand::Mute {
                    participant_id: self.id.clone(),
                    track_id,
                    muted,
                    reply,
                });
            }
            ParticipantCommand::Chat { text } => {
                self.room.send(RoomCommand::Chat {
                    participant_id: self.id.clone(),
                    text,
                });
            }
            ParticipantCommand::End(_) => {}
        }
    }

    async fn connection(&mut self, role: PeerRole) -> Result<&mut Connection, MediaError> {
        let slot = match role {
            PeerRole::Publisher => &mut self.publisher,
            PeerRole::Subscriber => &mut self.subscriber,
        };
        if slot.is_none() {
            let (gathered_tx, gathered) = watch::channel(false);
            let handler = Arc::new(PeerEvents {
                role,
                commands: self.commands_tx.clone(),
                gathered: gathered_tx,
            });
            let BuiltPeer { pc, port } = self
                .factory
                .build(role, handler)
                .await
                .map_err(|e| MediaError::Internal(e.to_string()))?;
            *slot = Some(Connection {
                pc,
                _port: port,
                gathered,
                early_candidates: Vec::new(),
                has_remote_description: false,
                connected: false,
                deadline: Some(Instant::now() + self.timeouts.connect),
            });
        }
        Ok(slot.as_mut().expect("just created"))
    }

    async fn publisher_offer(&mut self, sdp: String) -> Result<String, MediaError> {
        let offer = RTCSessionDescription::offer(sdp.clone())
            .map_err(|e| MediaError::InvalidSdp(format!("the offer is not valid SDP: {e}")))?;
        let connection = self.connection(PeerRole::Publisher).await?;
        connection
            .pc
            .set_remote_description(offer)
            .await
            .map_err(|e| MediaError::InvalidSdp(format!("the offer could not be applied: {e}")))?;
        connection.remote_description_applied().await;
        let answer = connection
            .pc
            .create_answer(None)
            .await
            .map_err(|e| MediaError::InvalidSdp(format!("no answer to this offer: {e}")))?;
        let answer_sdp = connection.set_local(answer).await?;

        let sections: Vec<PublishedSection> = sdp::media_sections(&sdp)
            .into_iter()
            .filter(|s| s.sends_media())
            .filter_map(|s| {
                Some(PublishedSection {
                    mid: s.mid?,
                    kind: s.kind?,
                    simulcast: s.simulcast,
                })
            })
            .collect();
        let (reply, changes) = oneshot::channel();
        self.room.send(RoomCommand::SetTracks {
            participant_id: self.id.clone(),
            sections,
            reply,
        });
        let changes = changes.await.map_err(|_| MediaError::Gone)?;
        for track_id in &changes.removed {
            if let Some(up) = self.up_tracks.remove(track_id) {
                up.task.abort();
            }
        }
        self.published = changes.published.into_iter().collect();
        Ok(answer_sdp)
    }

    async fn remote_track(&mut self, track: Arc<dyn TrackRemote>) {
        let Some(publisher) = &self.publisher else {
            return;
        };
        // The track's mid names which published track it is.
        let mut found = None;
        for transceiver in publisher.pc.get_transceivers().await {
            let Ok(Some(receiver)) = transceiver.receiver().await else {
                continue;
            };
            if std::ptr::addr_eq(Arc::as_ptr(receiver.track()), Arc::as_ptr(&track)) {
                let mid = transceiver.mid().await.ok().flatten();
                let extensions: fanout::ExtensionMap = receiver
                    .get_parameters()
                    .await
                    .map(|p| {
                        p.rtp_parameters
                            .header_extensions
                            .into_iter()
                            .map(|e| (e.id, e.uri))
                            .collect()
                    })
                    .unwrap_or_default();
                found = Some((mid, extensions));
                break;
            }
        }
        let Some((Some(mid), publisher_extensions)) = found else {
            tracing::warn!(participant = %self.id, "incoming track without a mid; ignored");
            return;
        };
        let Some(track_id) = self.published.get(&mid).cloned() else {
            tracing::warn!(participant = %self.id, %mid, "media on an m-section that is not published");
            return;
        };
        let Some(ssrc) = track.ssrcs().await.first().copied() else {
            return;
        };
        let Some(codec) = track.codec(ssrc).await else {
            tracing::warn!(participant = %self.id, %mid, "incoming track without a codec");
            return;
        };
        let codec_kind = Codec::from_mime(&codec.mime_type);
        let audio_level_id = publisher_extensions
            .iter()
            .find(|(_, uri)| uri == AUDIO_LEVEL_URI)
            .and_then(|(id, _)| u8::try_from(*id).ok());
        let level_reporter: Option<fanout::LevelReporter> = audio_level_id.map(|_| {
            let room = self.room.clone();
            let participant_id = self.id.clone();
            Box::new(move |level: f32| {
                room.send(RoomCommand::AudioLevel {
                    participant_id: participant_id.clone(),
                    level,
                });
            }) as fanout::LevelReporter
        });
        let (fanout, task) = fanout::spawn(
            track,
            fanout::TrackSpec {
                codec: codec_kind,
                clock_rate: codec.clock_rate,
                audio_level_id,
                level_reporter,
            },
            self.metrics.clone(),
        );
        if let Some(old) = self.up_tracks.insert(track_id.clone(), UpTrack { task }) {
            old.task.abort();
        }
        tracing::info!(participant = %self.id, track = %track_id, codec = %codec.mime_type, "media arrived");
        self.room.send(RoomCommand::MediaReady {
            participant_id: self.id.clone(),
            track_id,
            source: TrackSource {
                fanout,
                codec,
                publisher_extensions,
            },
        });
    }

    async fn subscribe(
        &mut self,
        publisher: ParticipantId,
        track: TrackInfo,
        source: TrackSource,
    ) -> Result<(), MediaError> {
        if self.down_tracks.contains_key(&track.track_id) {
            return Ok(());
        }
        let connection = self.connection(PeerRole::Subscriber).await?;
        let ssrc = rand::random::<u32>();
        let kind = match track.kind {
            MediaKind::Audio => RtpCodecKind::Audio,
            MediaKind::Video => RtpCodecKind::Video,
        };
        let local = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            publisher.to_string(),
            track.track_id.to_string(),
            track.track_id.to_string(),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: source.codec.clone(),
                ..Default::default()
            }],
        )));
        let sender = connection
            .pc
            .add_track(Arc::clone(&local) as Arc<dyn TrackLocal>)
            .await
            .map_err(|e| MediaError::Internal(format!("add_track: {e}")))?;
        // The SFU only sends here: `sendonly` (add_track would leave it `sendrecv`).
        let mut transceiver = None;
        for t in connection.pc.get_transceivers().await {
            if matches!(t.sender().await, Ok(Some(s)) if s.id() == sender.id()) {
                if let Err(e) = t.set_direction(RTCRtpTransceiverDirection::Sendonly).await {
                    tracing::debug!(error = %e, "set_direction(sendonly) failed");
                }
                transceiver = Some(t);
                break;
            }
        }
        source.fanout.add_subscriber(
            self.id.clone(),
            DownTrackSink {
                track: Arc::clone(&local),
                sent_bytes: Arc::clone(&self.sent_bytes),
            },
        );
        if let Some(quality) = self.wanted_quality.get(&track.track_id) {
            source.fanout.set_quality(self.id.clone(), *quality);
        }
        self.down_tracks.insert(
            track.track_id.clone(),
            DownTrack {
                source,
                sender,
                transceiver,
                local,
                ssrc,
                kind: track.kind,
                budget_bps: None,
                state: DownTrackState::Added,
                rtcp_task: None,
            },
        );
        self.renegotiate().await;
        Ok(())
    }

    async fn unsubscribe(&mut self, track_id: &TrackId) {
        self.wanted_quality.remove(track_id);
        let Some(down) = self.down_tracks.remove(track_id) else {
            return;
        };
        down.source.fanout.remove_subscriber(self.id.clone());
        if let Some(task) = down.rtcp_task {
            task.abort();
        }
        if let Some(subscriber) = &self.subscriber {
            if let Err(e) = subscriber.pc.remove_track(&down.sender).await {
                tracing::debug!(error = %e, "remove_track failed");
            }
            if let Some(t) = &down.transceiver {
                if let Err(e) = t.set_direction(RTCRtpTransceiverDirection::Inactive).await {
                    tracing::debug!(error = %e, "set_direction(inactive) failed");
                }
            }
        }
        self.renegotiate().await;
    }

    /// Offers now, or after the outstanding offer is answered.
    /// Marks the subscriber connection as needing an offer; the run loop sends it once no
    /// more commands are queued, so a burst of changes (a participant leaving with two
    /// tracks, a newcomer receiving ten) makes one offer.
    async fn renegotiate(&mut self) {
        match self.negotiation {
            Negotiation::AwaitingAnswer { .. } => {
                self.negotiation = Negotiation::AwaitingAnswer { again: true };
            }
            Negotiation::Stable => self.offer_pending = true,
        }
    }

    async fn send_pending_offer(&mut self) {
        if !self.offer_pending || self.negotiation != Negotiation::Stable {
            return;
        }
        self.offer_pending = false;
        if let Err(e) = self.send_offer().await {
            tracing::warn!(participant = %self.id, error = %e, "subscriber offer failed");
        }
    }

    async fn send_offer(&mut self) -> Result<(), MediaError> {
        let Some(connection) = self.subscriber.as_mut() else {
            return Ok(());
        };
        let offer = connection
            .pc
            .create_offer(None)
            .await
            .map_err(|e| MediaError::Internal(format!("create_offer: {e}")))?;
        let sdp = connection.set_local(offer).await?;
        self.negotiation = Negotiation::AwaitingAnswer { again: false };
        for down in self.down_tracks.values_mut() {
            if down.state == DownTrackState::Added {
                down.state = DownTrackState::Offered;
            }
        }
        let _ = self.events.send(SfuEvent::SubscriberOffer(sdp));
        Ok(())
    }

    async fn subscriber_answer(&mut self, sdp: String) -> Result<(), MediaError> {
        let Negotiation::AwaitingAnswer { again } = self.negotiation else {
            return Err(MediaError::NoPendingOffer);
        };
        let Some(connection) = self.subscriber.as_mut() else {
            return Err(MediaError::NoPendingOffer);
        };
        let applied = match RTCSessionDescription::answer(sdp) {
            Ok(answer) => connection
                .pc
                .set_remote_description(answer)
                .await
                .map_err(|e| format!("the answer could not be applied: {e}")),
            Err(e) => Err(format!("the answer is not valid SDP: {e}")),
        };
        if let Err(message) = applied {
            // The contract: after invalid_sdp the server sends a fresh offer.
            self.negotiation = Negotiation::Stable;
            if let Err(e) = self.send_offer().await {
                tracing::warn!(participant = %self.id, error = %e, "fresh offer failed");
            }
            return Err(MediaError::InvalidSdp(message));
        }
        connection.remote_description_applied().await;
        self.negotiation = Negotiation::Stable;
        for down in self.down_tracks.values_mut() {
            if down.state == DownTrackState::Offered {
                down.state = DownTrackState::Negotiated;
            }
        }
        self.bind_down_tracks().await;
        if again {
            self.renegotiate().await;
        }
        Ok(())
    }

    /// Tells each fan-out what this subscriber negotiated, so its packets can flow: only once
    /// the connection is up, because webrtc-rs silently drops what is written before SRTP
    /// has keys (and a dropped keyframe means a frozen start).
    async fn bind_down_tracks(&mut self) {
        if !self.subscriber.as_ref().is_some_and(|c| c.connected) {
            return;
        }
        for down in self.down_tracks.values_mut() {
            if down.state != DownTrackState::Negotiated {
                continue;
            }
            let Ok(parameters) = down.sender.get_parameters().await else {
                continue;
            };
            let wanted = &down.source.codec;
            let codecs = &parameters.rtp_parameters.codecs;
            let codec = codecs
                .iter()
                .find(|c| {
                    c.rtp_codec
                        .mime_type
                        .eq_ignore_ascii_case(&wanted.mime_type)
                        && c.rtp_codec.sdp_fmtp_line == wanted.sdp_fmtp_line
                })
                .or_else(|| {
                    codecs.iter().find(|c| {
                        c.rtp_codec
                            .mime_type
                            .eq_ignore_ascii_case(&wanted.mime_type)
                    })
                });
            let Some(codec) = codec else {
                tracing::warn!(participant = %self.id, codec = %wanted.mime_type, "subscriber did not accept the codec");
                continue;
            };
            let subscriber_extensions: Vec<(u16, &str)> = parameters
                .rtp_parameters
                .header_extensions
                .iter()
                .map(|e| (e.id, e.uri.as_str()))
                .collect();
            let binding = Binding::new(
                down.ssrc,
                codec.payload_type,
                down.source
                    .publisher_extensions
                    .iter()
                    .map(|(id, uri)| (*id, uri.as_str())),
                &subscriber_extensions,
            );
            down.source.fanout.bind(self.id.clone(), binding);
            down.state = DownTrackState::Bound;
            down.rtcp_task = Some(tokio::spawn(watch_subscriber_feedback(
                Arc::clone(&down.local),
                self.commands_tx.clone(),
            )));
        }
    }

    /// Turns the subscriber's estimate into layer budgets: none while its path shows room;
    /// while congested, the estimate split among its video tracks (audio is small and always
    /// forwarded), so each simulcast track picks the best layer that fits its share.
    fn share_bandwidth(&mut self, bps: u64) {
        if !self.factory.bandwidth_adaptation() {
            return;
        }
        let sent = self.sent_bytes.load(std::sync::atomic::Ordering::Relaxed);
        let budget = self
            .downlink
            .on_estimate(bps, sent, std::time::Instant::now());
        tracing::debug!(participant = %self.id, bps, ?budget, "subscriber bandwidth estimate (REMB)");
        let audio = self
            .down_tracks
            .values()
            .filter(|d| d.kind == MediaKind::Audio)
            .count() as u64;
        let video = self
            .down_tracks
            .values()
            .filter(|d| d.kind == MediaKind::Video)
            .count() as u64;
        if video == 0 {
            return;
        }
        const AUDIO_BPS: u64 = 64_000;
        const MIN_SHARE_BPS: u64 = 50_000;
        let share = match budget {
            DownlinkBudget::Unlimited => None,
            DownlinkBudget::Cap(total) => {
                Some((total.saturating_sub(audio * AUDIO_BPS) / video).max(MIN_SHARE_BPS))
            }
        };
        for down in self.down_tracks.values_mut() {
            if down.kind != MediaKind::Video {
                continue;
            }
            // Estimates wobble; only a change of more than a tenth moves layers.
            let changed = match (down.budget_bps, share) {
                (Some(old), Some(new)) => old.abs_diff(new) * 10 > old,
                (old, new) => old != new,
            };
            if changed {
                down.budget_bps = share;
                down.source.fanout.set_budget(self.id.clone(), share);
            }
        }
    }

    async fn peer_state(&mut self, role: PeerRole, state: RTCPeerConnectionState) {
        let lost_after = self.timeouts.ice_lost;
        let connection = match role {
            PeerRole::Publisher => self.publisher.as_mut(),
            PeerRole::Subscriber => self.subscriber.as_mut(),
        };
        let Some(connection) = connection else {
            return;
        };
        tracing::debug!(participant = %self.id, ?role, %state, "connection state");
        match state {
            RTCPeerConnectionState::Connected => {
                connection.deadline = None;
                connection.connected = true;
                if tracing::enabled!(tracing::Level::DEBUG) {
                    // The SRTP profile decides much of what a forwarded packet costs
                    // (docs/benchmarks.md): worth seeing per connection when debugging.
                    let stats = connection
                        .pc
                        .get_stats(
                            std::time::Instant::now(),
                            rtc::statistics::StatsSelector::None,
                        )
                        .await;
                    if let Some(transport) = stats.transport() {
                        tracing::debug!(
                            participant = %self.id, ?role,
                            srtp = %transport.srtp_cipher, dtls = %transport.dtls_cipher,
                            "connection secured"
                        );
                    }
                }
                if role == PeerRole::Subscriber {
                    self.bind_down_tracks().await;
                }
            }
            // Closed here means the remote end closed DTLS; we close ours only when ending.
            RTCPeerConnectionState::Disconnected
            | RTCPeerConnectionState::Failed
            | RTCPeerConnectionState::Closed
                if connection.deadline.is_none() =>
            {
                connection.deadline = Some(Instant::now() + lost_after);
            }
            _ => {}
        }
    }

    async fn close(mut self, reason: Option<EndReason>) {
        if let Some(reason) = reason {
            let _ = self.events.send(SfuEvent::Ended(reason));
        }
        self.room.send(RoomCommand::Leave {
            participant_id: self.id.clone(),
        });
        for (_, down) in self.down_tracks.drain() {
            down.source.fanout.remove_subscriber(self.id.clone());
            if let Some(task) = down.rtcp_task {
                task.abort();
            }
        }
        for (_, up) in self.up_tracks.drain() {
            up.task.abort();
        }
        for connection in [self.publisher.take(), self.subscriber.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = connection.pc.close().await {
                tracing::debug!(error = %e, "close failed");
            }
        }
        tracing::debug!(participant = %self.id, "media closed");
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What a subscriber's RTCP asks of the SFU.
#[derive(Debug, Default, PartialEq, Eq)]
struct Feedback {
    /// The SSRCs (ours, as the subscriber knows the tracks) it wants a keyframe of.
    keyframe_ssrcs: Vec<u32>,
    /// Its estimate of its downlink, bits per second.
    estimate_bps: Option<u64>,
}

/// Reads PLI, FIR and REMB out of an RTCP compound. Keyframe requests name their track by
/// media SSRC: webrtc-rs hands a whole compound to the track its *first* packet is about,
/// so the track whose stream delivered it is not necessarily the one asking.
fn feedback_of(packets: &[Box<dyn rtc::rtcp::Packet>]) -> Feedback {
    let mut feedback = Feedback::default();
    for packet in packets {
        let any = packet.as_any();
        if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
            feedback.keyframe_ssrcs.push(pli.media_ssrc);
        } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
            feedback
                .keyframe_ssrcs
                .extend(fir.fir.iter().map(|entry| entry.ssrc));
        } else if let Some(remb) = any.downcast_ref::<ReceiverEstimatedMaximumBitrate>() {
            feedback.estimate_bps = Some(remb.bitrate as u64);
        }
    }
    feedback
}

/// Turns a subscriber's keyframe requests (PLI/FIR) into requests to the publisher, and its
/// bandwidth estimates (REMB) into layer budgets.
async fn watch_subscriber_feedback(
    track: Arc<TrackLocalStaticRTP>,
    commands: mpsc::UnboundedSender<ParticipantCommand>,
) {
    while let Some(event) = track.poll().await {
        let TrackLocalEvent::OnRtcpPacket(packets) = event else {
            continue;
        };
        let feedback = feedback_of(&packets);
        if let Some(bps) = feedback.estimate_bps {
            let _ = commands.send(ParticipantCommand::Bandwidth { bps });
        }
        for ssrc in feedback.keyframe_ssrcs {
            if commands
                .send(ParticipantCommand::KeyframeRequest { ssrc })
                .is_err()
            {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::payload_feedbacks::full_intra_request::FirEntry;
    use rtc::rtcp::receiver_report::ReceiverReport;

    #[test]
    fn feedback_names_tracks_by_media_ssrc_and_reads_remb() {
        let packets: Vec<Box<dyn rtc::rtcp::Packet>> = vec![
            Box::new(ReceiverReport::default()),
            Box::new(PictureLossIndication {
                sender_ssrc: 1,
                media_ssrc: 111,
            }),
            Box::new(FullIntraRequest {
                sender_ssrc: 1,
                media_ssrc: 0,
                fir: vec![FirEntry {
                    ssrc: 222,
                    sequence_number: 3,
                }],
            }),
            Box::new(ReceiverEstimatedMaximumBitrate {
                sender_ssrc: 1,
                bitrate: 750_000.0,
                ssrcs: vec![111, 222],
            }),
        ];
        assert_eq!(
            feedback_of(&packets),
            Feedback {
                keyframe_ssrcs: vec![111, 222],
                estimate_bps: Some(750_000),
            }
        );
        assert_eq!(feedback_of(&[]), Feedback::default());
    }
}
