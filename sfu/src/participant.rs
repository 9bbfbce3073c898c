//! One participant's media: its publisher connection (media in, the client offers), its
//! subscriber connection (media out, the SFU offers, one offer in flight at a time), the
//! tracks it publishes and the down-tracks it receives. A task owns all of it and takes
//! commands from the session, the room and its connections' callbacks, in order.

use crate::events::{EndReason, EventSink, MediaKind, SfuEvent, TrackInfo};
use crate::fanout::{DownTrackSink, FanoutHandle};
use crate::ids::{ParticipantId, TrackId};
use crate::media_loop::{ConnEvent, ConnKey, LoopHandle, RemoteTrack};
use crate::rewrite::Binding;
use crate::room::{MuteError, PublishedSection, RoomCommand, RoomHandle, TrackSource};
use crate::sdp;
use crate::simulcast::{DownlinkBudget, DownlinkGovernor, Quality};
use crate::transport::{PeerFactory, PeerRole};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RTCRtpParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpSenderId, RTCRtpTransceiverDirection};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

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
    RemoteTrack(RemoteTrack),
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

/// Turns a connection's events into the participant task's commands.
fn forward_events(
    role: PeerRole,
    commands: mpsc::UnboundedSender<ParticipantCommand>,
) -> crate::media_loop::EventCallback {
    Box::new(move |event| match event {
        ConnEvent::State(state) => {
            let _ = commands.send(ParticipantCommand::PeerState { role, state });
        }
        ConnEvent::Track(track) => {
            if role == PeerRole::Publisher {
                let _ = commands.send(ParticipantCommand::RemoteTrack(track));
            } else {
                track.fanout.close();
            }
        }
        ConnEvent::Feedback(packets) => {
            let feedback = feedback_of(&packets);
            if let Some(bps) = feedback.estimate_bps {
                let _ = commands.send(ParticipantCommand::Bandwidth { bps });
            }
            for ssrc in feedback.keyframe_ssrcs {
                let _ = commands.send(ParticipantCommand::KeyframeRequest { ssrc });
            }
        }
    })
}

/// A connection and what the participant task tracks about it. Dropping it closes the
/// connection.
struct Connection {
    key: ConnKey,
    media: LoopHandle,
    /// Candidates that arrived before the remote description.
    early_candidates: Vec<CandidateInit>,
    has_remote_description: bool,
    /// DTLS is done: SRTP can protect what we write.
    connected: bool,
    /// When the participant is removed unless this connection (re)connects.
    deadline: Option<Instant>,
    /// Set once closed on purpose, so dropping does not close it again.
    closed: bool,
}

impl Connection {
    /// Runs `call` on the connection in its media loop.
    async fn call<R: Send + 'static>(
        &self,
        call: impl FnOnce(&mut RTCPeerConnection, std::time::Instant) -> R + Send + 'static,
    ) -> Result<R, MediaError> {
        self.media
            .call(self.key, call)
            .await
            .map_err(|_| MediaError::Internal("the media connection is gone".into()))
    }

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
        if let Ok(Err(e)) = self.call(move |pc, _| pc.add_remote_candidate(init)).await {
            tracing::debug!(error = %e, "remote candidate not added");
        }
    }

    async fn remote_description_applied(&mut self) {
        self.has_remote_description = true;
        for candidate in std::mem::take(&mut self.early_candidates) {
            self.add_candidate(candidate).await;
        }
    }

    /// Closes the connection, telling the peer, and waits until the loop has forgotten it.
    async fn close(mut self) {
        self.closed = true;
        self.media.close(self.key).await;
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.closed {
            self.media.close_soon(self.key);
        }
    }
}

/// The local description as sent: with the host candidates the factory put in.
fn local_sdp(pc: &RTCPeerConnection) -> Result<String, MediaError> {
    pc.local_description()
        .map(|d| d.sdp)
        .ok_or_else(|| MediaError::Internal("no local description".into()))
}

/// A track this participant receives.
struct DownTrack {
    source: TrackSource,
    sender: RTCRtpSenderId,
    ssrc: u32,
    kind: MediaKind,
    /// The last bandwidth share sent to the fan-out, to send only real changes.
    budget_bps: Option<u64>,
    state: DownTrackState,
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
    fanout: FanoutHandle,
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
    /// The media loop of the room's thread, once a connection needed it.
    media: Option<LoopHandle>,
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
        timeouts: ConnectionTimeouts,
        commands_tx: mpsc::UnboundedSender<ParticipantCommand>,
    ) -> Self {
        Self {
            id,
            room,
            events,
            factory,
            media: None,
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
        let exists = match role {
            PeerRole::Publisher => self.publisher.is_some(),
            PeerRole::Subscriber => self.subscriber.is_some(),
        };
        if !exists {
            let media = match &self.media {
                Some(media) => media.clone(),
                None => {
                    let media = self
                        .room
                        .media_thread()
                        .media_loop(&self.factory)
                        .map_err(|e| MediaError::Internal(e.to_string()))?;
                    self.media = Some(media.clone());
                    media
                }
            };
            let key = media
                .open(role, forward_events(role, self.commands_tx.clone()))
                .await
                .map_err(|e| MediaError::Internal(e.to_string()))?;
            let connection = Connection {
                key,
                media,
                early_candidates: Vec::new(),
                has_remote_description: false,
                connected: false,
                deadline: Some(Instant::now() + self.timeouts.connect),
                closed: false,
            };
            match role {
                PeerRole::Publisher => self.publisher = Some(connection),
                PeerRole::Subscriber => self.subscriber = Some(connection),
            }
        }
        let slot = match role {
            PeerRole::Publisher => &mut self.publisher,
            PeerRole::Subscriber => &mut self.subscriber,
        };
        Ok(slot.as_mut().expect("just created"))
    }

    async fn publisher_offer(&mut self, sdp: String) -> Result<String, MediaError> {
        let offer = RTCSessionDescription::offer(sdp.clone())
            .map_err(|e| MediaError::InvalidSdp(format!("the offer is not valid SDP: {e}")))?;
        let connection = self.connection(PeerRole::Publisher).await?;
        let answer_sdp = connection
            .call(move |pc, now| {
                pc.set_remote_description(now, offer).map_err(|e| {
                    MediaError::InvalidSdp(format!("the offer could not be applied: {e}"))
                })?;
                let answer = pc
                    .create_answer(None)
                    .map_err(|e| MediaError::InvalidSdp(format!("no answer to this offer: {e}")))?;
                pc.set_local_description(now, answer).map_err(|e| {
                    MediaError::Internal(format!("local description not applied: {e}"))
                })?;
                local_sdp(pc)
            })
            .await??;
        connection.remote_description_applied().await;

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
                up.fanout.close();
            }
        }
        self.published = changes.published.into_iter().collect();
        Ok(answer_sdp)
    }

    async fn remote_track(&mut self, track: RemoteTrack) {
        let RemoteTrack {
            mid,
            codec,
            extensions: publisher_extensions,
            fanout,
        } = track;
        let Some(mid) = mid else {
            tracing::warn!(participant = %self.id, "incoming track without a mid; ignored");
            fanout.close();
            return;
        };
        let Some(track_id) = self.published.get(&mid).cloned() else {
            tracing::warn!(participant = %self.id, %mid, "media on an m-section that is not published");
            fanout.close();
            return;
        };
        let room = self.room.clone();
        let participant_id = self.id.clone();
        fanout.set_level_reporter(Box::new(move |level: f32| {
            room.send(RoomCommand::AudioLevel {
                participant_id: participant_id.clone(),
                level,
            });
        }));
        if let Some(old) = self.up_tracks.insert(
            track_id.clone(),
            UpTrack {
                fanout: fanout.clone(),
            },
        ) {
            old.fanout.close();
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
        let local = MediaStreamTrack::new(
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
        );
        let sender = connection
            .call(move |pc, _| {
                let sender = pc.add_track(local)?;
                // The SFU only sends here: `sendonly` (add_track would leave it `sendrecv`).
                if let Some(mut transceiver) = pc.rtp_transceiver(sender.into()) {
                    transceiver.set_direction(RTCRtpTransceiverDirection::Sendonly);
                }
                Ok::<_, rtc::shared::error::Error>(sender)
            })
            .await?
            .map_err(|e| MediaError::Internal(format!("add_track: {e}")))?;
        let conn = connection.key;
        source.fanout.add_subscriber(
            self.id.clone(),
            DownTrackSink {
                conn,
                sender,
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
                ssrc,
                kind: track.kind,
                budget_bps: None,
                state: DownTrackState::Added,
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
        if let Some(subscriber) = &self.subscriber {
            let sender = down.sender;
            let removed = subscriber
                .call(move |pc, _| {
                    pc.remove_track(sender)?;
                    // Set `inactive`, so the next offer says the track is gone.
                    if let Some(mut transceiver) = pc.rtp_transceiver(sender.into()) {
                        transceiver.set_direction(RTCRtpTransceiverDirection::Inactive);
                    }
                    Ok::<_, rtc::shared::error::Error>(())
                })
                .await;
            if let Ok(Err(e)) = removed {
                tracing::debug!(error = %e, "remove_track failed");
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
        let sdp = connection
            .call(|pc, now| {
                let offer = pc
                    .create_offer(None)
                    .map_err(|e| MediaError::Internal(format!("create_offer: {e}")))?;
                pc.set_local_description(now, offer).map_err(|e| {
                    MediaError::Internal(format!("local description not applied: {e}"))
                })?;
                local_sdp(pc)
            })
            .await??;
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
            Ok(answer) => match connection
                .call(move |pc, now| pc.set_remote_description(now, answer))
                .await
            {
                Ok(applied) => applied.map_err(|e| format!("the answer could not be applied: {e}")),
                Err(e) => Err(e.to_string()),
            },
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
        let Some(connection) = self.subscriber.as_ref().filter(|c| c.connected) else {
            return;
        };
        let waiting: Vec<RTCRtpSenderId> = self
            .down_tracks
            .values()
            .filter(|d| d.state == DownTrackState::Negotiated)
            .map(|d| d.sender)
            .collect();
        if waiting.is_empty() {
            return;
        }
        let Ok(negotiated) = connection
            .call(move |pc, _| {
                waiting
                    .into_iter()
                    .filter_map(|id| {
                        let mut sender = pc.rtp_sender(id)?;
                        Some((id, sender.get_parameters().rtp_parameters.clone()))
                    })
                    .collect::<HashMap<RTCRtpSenderId, RTCRtpParameters>>()
            })
            .await
        else {
            return;
        };
        for down in self.down_tracks.values_mut() {
            if down.state != DownTrackState::Negotiated {
                continue;
            }
            let Some(parameters) = negotiated.get(&down.sender) else {
                continue;
            };
            let wanted = &down.source.codec;
            let codecs = &parameters.codecs;
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
                    let ciphers = connection
                        .call(|pc, now| {
                            let stats = pc.get_stats(now, rtc::statistics::StatsSelector::None);
                            stats
                                .transport()
                                .map(|t| (t.srtp_cipher.clone(), t.dtls_cipher.clone()))
                        })
                        .await;
                    if let Ok(Some((srtp, dtls))) = ciphers {
                        tracing::debug!(
                            participant = %self.id, ?role, %srtp, %dtls, "connection secured"
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
        }
        for (_, up) in self.up_tracks.drain() {
            up.fanout.close();
        }
        for connection in [self.publisher.take(), self.subscriber.take()]
            .into_iter()
            .flatten()
        {
            connection.close().await;
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
