//! One WebSocket session: reads client frames in order, applies the contract's checks
//! (size, rate, JSON, type, join state and token, fields, SDP limits), drives the
//! participant's media through the `sfu` crate, and writes the room's events back. A separate
//! writer task owns the socket's sending half. What one client can cost is bounded: bytes read
//! (reading pauses beyond a budget), replies to dropped frames, queued messages and the time
//! one write may wait. The session ends when the socket closes, the client leaves or stops
//! reading, the media plane ends the participant, or the server shuts down, and then nothing
//! of it is left behind.

use crate::protocol::{
    self, ClientMessage, ClientMessageType, ErrorCode, IceCandidate, PcName, ProtocolError,
    SdpLimits, ServerMessage,
};
use crate::ratelimit::TokenBucket;
use crate::AppState;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{SinkExt, StreamExt};
use sfu::{
    CandidateInit, EndReason, JoinError, MediaError, MediaKind, Participant, ParticipantInfo,
    PeerRole, RoomId, SfuEvent, TrackId, TrackInfo,
};
use std::cell::Cell;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// What the writer task sends.
enum Outbound {
    Message(ServerMessage),
    Close(u16, &'static str),
}

/// Close codes (RFC 6455).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;
/// Application code: the media connection was lost.
const CLOSE_MEDIA_LOST: u16 = 4000;

struct Joined {
    participant: Participant,
    room: RoomId,
    events: mpsc::UnboundedReceiver<SfuEvent>,
    /// False for a watch-only token: publisher offers are refused.
    can_publish: bool,
    /// m-sections in the latest subscriber offer sent, which bounds the client's answer.
    offered_sections: Option<usize>,
    /// Candidates trickled for each connection since its last negotiation (publisher,
    /// subscriber): each one makes the server send ICE checks, so their number is bounded.
    trickled: [usize; 2],
    /// Other participants' tracks this client has been told about and not told are gone:
    /// what `set_quality` may name, even before the track's media reaches this client.
    announced_tracks: HashSet<String>,
}

/// Most candidates a client may trickle for one connection per negotiation; real clients
/// send a handful per network interface.
const MAX_TRICKLED_CANDIDATES: usize = 128;

enum Flow {
    Continue,
    Close(u16, &'static str),
}

/// Runs a session to its end.
pub async fn run(socket: WebSocket, state: Arc<AppState>) {
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Outbound>(OUTBOUND_QUEUE);
    let mut writer = tokio::spawn(async move {
        while let Some(outbound) = out_rx.recv().await {
            let (frame, last) = match outbound {
                Outbound::Message(message) => match serde_json::to_string(&message) {
                    Ok(text) => (Message::Text(text.into()), false),
                    Err(e) => {
                        tracing::error!(error = %e, "unserializable message");
                        continue;
                    }
                },
                Outbound::Close(code, reason) => (
                    Message::Close(Some(CloseFrame {
                        code,
                        reason: Utf8Bytes::from_static(reason),
                    })),
                    true,
                ),
            };
            // A client that stops reading fills its TCP window and would block this forever.
            let sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(frame)).await;
            if !matches!(sent, Ok(Ok(()))) || last {
                break;
            }
        }
        let _ = tokio::time::timeout(WRITE_TIMEOUT, sink.close()).await;
    });

    let mut session = Session {
        state: Arc::clone(&state),
        out: out_tx,
        joined: None,
        rate: TokenBucket::new(100, 20, Instant::now()),
        rate_limited_replies: TokenBucket::new(100, 1, Instant::now()),
        read_budget: TokenBucket::new(
            u32::try_from(READ_BURST_BYTES.max(2 * state.config.max_frame_bytes))
                .unwrap_or(u32::MAX),
            READ_BYTES_PER_SECOND,
            Instant::now(),
        ),
        unreachable: Cell::new(false),
    };
    let join_deadline =
        tokio::time::Instant::now() + Duration::from_secs(state.config.join_timeout_secs);
    let shutdown = state.shutdown.clone();

    // Set while the client is over its byte budget: nothing more is read until then, so TCP
    // holds the client back, while room events still reach it.
    let mut reading_resumes: Option<tokio::time::Instant> = None;
    let close = loop {
        let flow = tokio::select! {
            frame = stream.next(), if reading_resumes.is_none() => match frame {
                Some(Ok(message)) => {
                    let wait = session.read_budget.take_or_wait(frame_bytes(&message), Instant::now());
                    if !wait.is_zero() {
                        reading_resumes = Some(tokio::time::Instant::now() + wait);
                    }
                    session.on_frame(message).await
                }
                Some(Err(e)) => session.on_read_error(e),
                None => break None,
            },
            () = tokio::time::sleep_until(reading_resumes.unwrap_or_else(tokio::time::Instant::now)),
                if reading_resumes.is_some() => {
                reading_resumes = None;
                Flow::Continue
            }
            event = next_event(&mut session.joined) => match event {
                Some(event) => session.on_event(event),
                None => Flow::Close(CLOSE_GOING_AWAY, "participant ended"),
            },
            _ = tokio::time::sleep_until(join_deadline), if session.joined.is_none() => {
                session.send_error(ProtocolError::new(
                    ErrorCode::BadRequest,
                    "no join within the join timeout; send join first",
                ));
                Flow::Close(CLOSE_POLICY, "join timeout")
            }
            _ = shutdown.cancelled(), if session.joined.is_none() => {
                Flow::Close(CLOSE_GOING_AWAY, "server shutting down")
            }
        };
        if let Flow::Close(code, reason) = flow {
            break Some((code, reason));
        }
        if session.unreachable.get() {
            tracing::debug!("client stopped reading; closing its session");
            break Some((CLOSE_POLICY, "client does not read"));
        }
    };

    if let Some((code, reason)) = close {
        let _ = session.out.try_send(Outbound::Close(code, reason));
        // Read until the client answers the close (or briefly), so that closing does not reset
        // a connection with unread data and the client sees our error and close frame.
        let drain = async {
            while let Some(Ok(frame)) = stream.next().await {
                if matches!(frame, Message::Close(_)) {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
    if let Some(joined) = session.joined.take() {
        joined.participant.leave().await;
    }
    drop(session);
    // The writer ends once it has sent what is queued; one stuck on a client that does not
    // read is stopped, so the session (and its connection slot) never outlives the socket.
    if tokio::time::timeout(Duration::from_secs(2), &mut writer)
        .await
        .is_err()
    {
        writer.abort();
    }
}

fn frame_bytes(frame: &Message) -> f64 {
    match frame {
        Message::Text(text) => text.len() as f64,
        Message::Binary(bytes) => bytes.len() as f64,
        _ => 0.0,
    }
}

async fn next_event(joined: &mut Option<Joined>) -> Option<SfuEvent> {
    match joined {
        Some(joined) => joined.events.recv().await,
        None => std::future::pending().await,
    }
}

struct Session {
    state: Arc<AppState>,
    out: mpsc::Sender<Outbound>,
    joined: Option<Joined>,
    rate: TokenBucket,
    /// How many dropped frames get a `rate_limited` reply: 100, then one per second.
    rate_limited_replies: TokenBucket,
    /// Bytes the client may send: beyond it the session stops reading for a while.
    read_budget: TokenBucket,
    /// Set when the client can no longer be written to (its queue is full or the writer gave
    /// up); the session then ends.
    unreachable: Cell<bool>,
}

/// What a client may send, in bytes: a burst (at least two of the largest frames) and then a
/// steady rate far above any real client's signaling (offers are kilobytes), far below what
/// a flood could make the server read and parse.
const READ_BURST_BYTES: usize = 2 << 20;
const READ_BYTES_PER_SECOND: u32 = 512 << 10;
/// Messages queued for a client before it counts as not reading and is disconnected; far
/// more than any burst of room events (a join into a full room is about 100 + 800 messages).
const OUTBOUND_QUEUE: usize = 4096;
/// How long one frame may wait for the client's TCP window before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

impl Session {
    fn send(&self, message: ServerMessage) {
        if self.out.try_send(Outbound::Message(message)).is_err() {
            // Full: the client has not read for a long while; closed: the writer gave up.
            self.unreachable.set(true);
        }
    }

    fn send_error(&self, error: ProtocolError) {
        self.state
            .signaling_errors
            .with_label_values(&[error.code.as_str()])
            .inc();
        tracing::debug!(code = error.code.as_str(), message = %error.message, "signaling error");
        self.send(error.to_message());
    }

    /// Sends the error, and closes the socket when the contract says so.
    fn fail(&self, error: ProtocolError) -> Flow {
        let code = error.code;
        self.send_error(error);
        match code {
            ErrorCode::TooLarge => Flow::Close(CLOSE_TOO_BIG, "frame too large"),
            c if c.closes_socket() => Flow::Close(CLOSE_POLICY, c.as_str()),
            _ => Flow::Continue,
        }
    }

    fn on_read_error(&self, error: axum::Error) -> Flow {
        let text = error.to_string();
        // tungstenite refuses frames over the configured size before reading them.
        if text.contains("too long") || text.contains("Space limit") || text.contains("capacity") {
            return self.fail(ProtocolError::new(
                ErrorCode::TooLarge,
                format!(
                    "frame larger than {} bytes; keep messages under the limit",
                    self.state.config.max_frame_bytes
                ),
            ));
        }
        tracing::debug!(error = %text, "websocket read error");
        Flow::Close(CLOSE_NORMAL, "read error")
    }

    async fn on_frame(&mut self, frame: Message) -> Flow {
        let (text, frame_bytes) = match frame {
            Message::Text(text) => {
                let len = text.len();
                (Some(text), len)
            }
            Message::Binary(bytes) => (None, bytes.len()),
            Message::Close(_) => return Flow::Close(CLOSE_NORMAL, "bye"),
            Message::Ping(_) | Message::Pong(_) => return Flow::Continue,
        };
        if frame_bytes > self.state.config.max_frame_bytes {
            return self.fail(ProtocolError::new(
                ErrorCode::TooLarge,
                format!(
                    "frame of {frame_bytes} bytes is larger than the {}-byte limit",
                    self.state.config.max_frame_bytes
                ),
            ));
        }
        // Every frame costs a token, binary and malformed ones too, so no kind of flood gets
        // more than the contract's rate of answers.
        let now = Instant::now();
        if !self.rate.try_take(now) {
            if !self.rate_limited_replies.try_take(now) {
                // Still flooding: answering every frame would let a client that never reads
                // make the server queue replies without end. Dropped without a reply.
                return Flow::Continue;
            }
            return self.fail(ProtocolError::new(
                ErrorCode::RateLimited,
                "more than 20 messages per second (bursts of 100); slow down",
            ));
        }
        let Some(text) = text else {
            return self.fail(ProtocolError::new(
                ErrorCode::BadRequest,
                "binary frames are not accepted; send each JSON message as a text frame",
            ));
        };
        let envelope = match protocol::parse_envelope(&text) {
            Ok(envelope) => envelope,
            Err(e) => return self.fail(e),
        };
        match (envelope.kind, self.joined.is_some()) {
            (ClientMessageType::Join, true) => {
                return self.fail(ProtocolError::new(
                    ErrorCode::AlreadyJoined,
                    "already joined; join is sent once per connection",
                ));
            }
            (kind, false) if kind != ClientMessageType::Join => {
                return self.fail(ProtocolError::new(
                    ErrorCode::NotJoined,
                    "send join first; nothing else is accepted before it",
                ));
            }
            _ => {}
        }
        match envelope.into_message() {
            Ok(message) => self.on_message(message).await,
            Err(e) => self.fail(e),
        }
    }

    async fn on_message(&mut self, message: ClientMessage) -> Flow {
        match message {
            ClientMessage::Join { room, name, token } => self.join(room, name, token).await,
            ClientMessage::Offer { sdp, .. } => {
                let Some(can_publish) = self.joined.as_ref().map(|j| j.can_publish) else {
                    return Flow::Continue;
                };
                if !can_publish {
                    // `unauthorized` closes the socket: a watch-only client that offers has a
                    // bug, and the contract gives no code that keeps it open.
                    return self.fail(ProtocolError::new(
                        ErrorCode::Unauthorized,
                        "your token does not allow publishing (can_publish is false); watch \
                         without offering, or get a token that allows publishing",
                    ));
                }
                let limits = SdpLimits::for_offer(self.state.config.max_tracks_per_participant);
                if let Err(e) = protocol::check_sdp(&sdp, &limits) {
                    return self.fail(e);
                }
                let Some(joined) = &mut self.joined else {
                    return Flow::Continue;
                };
                joined.trickled[0] = 0;
                match joined.participant.publisher_offer(sdp).await {
                    Ok(answer) => {
                        self.send(ServerMessage::Answer {
                            pc: PcName::Publisher,
                            sdp: answer,
                        });
                        Flow::Continue
                    }
                    Err(e) => self.fail(media_error(e)),
                }
            }
            ClientMessage::Answer { sdp, .. } => {
                let Some(joined) = &mut self.joined else {
                    return Flow::Continue;
                };
                joined.trickled[1] = 0;
                let guard = joined
                    .offered_sections
                    .map(|offered| protocol::check_sdp(&sdp, &SdpLimits::for_answer(offered)));
                if let Some(Err(too_big)) = guard {
                    // The contract: an answer that cannot be applied gets invalid_sdp and then
                    // a fresh offer. The media plane does both when an answer fails to parse,
                    // so it gets an empty one in place of the hostile SDP, which it never sees.
                    return match joined.participant.subscriber_answer(String::new()).await {
                        Err(MediaError::InvalidSdp(_)) => self.fail(too_big),
                        Err(other) => self.fail(media_error(other)),
                        Ok(()) => self.fail(too_big),
                    };
                }
                match joined.participant.subscriber_answer(sdp).await {
                    Ok(()) => Flow::Continue,
                    Err(e) => self.fail(media_error(e)),
                }
            }
            ClientMessage::Candidate { pc, candidate } => {
                if let (Some(joined), Some(candidate)) = (&mut self.joined, candidate) {
                    // An empty candidate line is the end of a generation: nothing to add.
                    if !candidate.candidate.trim().is_empty() {
                        let count = &mut joined.trickled[usize::from(pc == PcName::Subscriber)];
                        *count += 1;
                        if *count > MAX_TRICKLED_CANDIDATES {
                            return self.fail(ProtocolError::new(
                                ErrorCode::BadRequest,
                                format!(
                                    "more than {MAX_TRICKLED_CANDIDATES} candidates for the {} \
                                     connection since its last negotiation; further ones are \
                                     ignored",
                                    pc.as_str()
                                ),
                            ));
                        }
                        joined
                            .participant
                            .add_candidate(peer_role(pc), candidate_init(candidate));
                    }
                }
                Flow::Continue
            }
            ClientMessage::Mute { track_id, muted } => {
                let Some(joined) = &self.joined else {
                    return Flow::Continue;
                };
                match joined.participant.mute(TrackId::new(track_id), muted).await {
                    Ok(()) => Flow::Continue,
                    Err(e) => self.fail(ProtocolError::new(
                        ErrorCode::BadRequest,
                        format!("{e}; mute a track_id you received in track_published"),
                    )),
                }
            }
            ClientMessage::Chat { text } => {
                if let Some(joined) = &self.joined {
                    joined.participant.chat(text);
                }
                Flow::Continue
            }
            ClientMessage::SetQuality { track_id, quality } => {
                let Some(joined) = &self.joined else {
                    return Flow::Continue;
                };
                if !joined.announced_tracks.contains(&track_id) {
                    return self.fail(ProtocolError::new(
                        ErrorCode::BadRequest,
                        format!(
                            "no track \"{track_id}\" of another participant is in the room; \
                             set_quality takes a track_id from joined or track_published"
                        ),
                    ));
                }
                let quality = match quality {
                    protocol::Quality::Low => sfu::Quality::Low,
                    protocol::Quality::Medium => sfu::Quality::Medium,
                    protocol::Quality::High => sfu::Quality::High,
                };
                match joined
                    .participant
                    .set_quality(TrackId::new(track_id), quality)
                    .await
                {
                    Ok(()) => Flow::Continue,
                    Err(e) => self.fail(ProtocolError::new(
                        ErrorCode::BadRequest,
                        format!("{e}; set_quality takes a track_id you receive"),
                    )),
                }
            }
            ClientMessage::Leave => Flow::Close(CLOSE_NORMAL, "left"),
        }
    }

    async fn join(&mut self, room: String, name: String, token: Option<String>) -> Flow {
        let can_publish = match &self.state.auth {
            None => true,
            Some(verifier) => match verifier.check(token.as_deref(), &room, &name) {
                Ok(grant) => grant.can_publish,
                Err(refusal) => {
                    return self.fail(ProtocolError::new(ErrorCode::Unauthorized, refusal.0));
                }
            },
        };
        let (events_tx, events) = mpsc::unbounded_channel();
        let room_id = RoomId::new(room);
        match self.state.sfu.join(&room_id, name, events_tx).await {
            Ok(joined) => {
                tracing::debug!(room = %room_id, participant = %joined.participant.id(), "session joined");
                let announced_tracks = joined
                    .others
                    .iter()
                    .flat_map(|p| p.tracks.iter().map(|t| t.track_id.to_string()))
                    .collect();
                self.send(ServerMessage::Joined {
                    participant_id: joined.participant.id().to_string(),
                    room: room_id.to_string(),
                    participants: joined.others.iter().map(participant_message).collect(),
                    ice_servers: self.state.ice_servers.clone(),
                });
                self.joined = Some(Joined {
                    participant: joined.participant,
                    room: room_id,
                    events,
                    can_publish,
                    offered_sections: None,
                    trickled: [0; 2],
                    announced_tracks,
                });
                Flow::Continue
            }
            Err(JoinError::RoomFull(max)) => self.fail(ProtocolError::new(
                ErrorCode::RoomFull,
                format!("room is full ({max} participants); try another room later"),
            )),
            Err(JoinError::TooManyRooms(max)) => self.fail(ProtocolError::new(
                ErrorCode::RoomFull,
                format!(
                    "the server has its maximum of {max} rooms open and cannot open another; \
                     join an existing room or try again later"
                ),
            )),
            Err(JoinError::Closed) => self.fail(ProtocolError::new(
                ErrorCode::Internal,
                "the room could not be joined; try again",
            )),
        }
    }

    fn on_event(&mut self, event: SfuEvent) -> Flow {
        let message = match event {
            SfuEvent::ParticipantJoined(info) => ServerMessage::ParticipantJoined {
                participant: participant_message(&info),
            },
            SfuEvent::ParticipantLeft(id) => ServerMessage::ParticipantLeft {
                participant_id: id.to_string(),
            },
            SfuEvent::TrackPublished {
                participant_id,
                track,
                mid,
            } => {
                if let Some(joined) = &mut self.joined {
                    if &participant_id != joined.participant.id() {
                        joined.announced_tracks.insert(track.track_id.to_string());
                    }
                }
                ServerMessage::TrackPublished {
                    participant_id: participant_id.to_string(),
                    track: protocol::Track {
                        mid,
                        ..track_message(&track)
                    },
                }
            }
            SfuEvent::TrackUnpublished {
                participant_id,
                track_id,
            } => {
                if let Some(joined) = &mut self.joined {
                    joined.announced_tracks.remove(track_id.as_str());
                }
                ServerMessage::TrackUnpublished {
                    participant_id: participant_id.to_string(),
                    track_id: track_id.to_string(),
                }
            }
            SfuEvent::TrackMuted {
                participant_id,
                track_id,
                muted,
            } => ServerMessage::TrackMuted {
                participant_id: participant_id.to_string(),
                track_id: track_id.to_string(),
                muted,
            },
            SfuEvent::SubscriberOffer(sdp) => {
                if let Some(joined) = &mut self.joined {
                    joined.offered_sections = Some(protocol::media_section_count(&sdp));
                }
                ServerMessage::Offer {
                    pc: PcName::Subscriber,
                    sdp,
                }
            }
            SfuEvent::Chat {
                participant_id,
                name,
                text,
                ts,
            } => ServerMessage::Chat {
                participant_id: participant_id.to_string(),
                name,
                text,
                ts,
            },
            SfuEvent::ActiveSpeakers(ids) => ServerMessage::ActiveSpeakers {
                participant_ids: ids.iter().map(ToString::to_string).collect(),
            },
            SfuEvent::Ended(EndReason::ServerShutdown) => {
                return Flow::Close(CLOSE_GOING_AWAY, "server shutting down");
            }
            SfuEvent::Ended(EndReason::MediaTimeout) => {
                return Flow::Close(CLOSE_MEDIA_LOST, "media connection lost");
            }
        };
        if let Some(joined) = &self.joined {
            tracing::trace!(room = %joined.room, "event");
        }
        self.send(message);
        Flow::Continue
    }
}

fn media_error(error: MediaError) -> ProtocolError {
    match error {
        MediaError::InvalidSdp(message) => ProtocolError::new(ErrorCode::InvalidSdp, message),
        MediaError::NoPendingOffer => ProtocolError::new(
            ErrorCode::BadRequest,
            "no subscriber offer is waiting for an answer; answer only the server's offers",
        ),
        MediaError::Internal(message) => ProtocolError::new(
            ErrorCode::Internal,
            format!("media setup failed: {message}"),
        ),
        MediaError::Gone => ProtocolError::new(ErrorCode::Internal, "the participant has ended"),
        MediaError::UnknownTrack(track) => ProtocolError::new(
            ErrorCode::BadRequest,
            format!("no track {track} is forwarded to you"),
        ),
    }
}

fn peer_role(pc: PcName) -> PeerRole {
    match pc {
        PcName::Publisher => PeerRole::Publisher,
        PcName::Subscriber => PeerRole::Subscriber,
    }
}

fn candidate_init(c: IceCandidate) -> CandidateInit {
    CandidateInit {
        candidate: c.candidate,
        sdp_mid: c.sdp_mid,
        sdp_mline_index: c.sdp_mline_index,
        username_fragment: c.username_fragment,
    }
}

fn track_message(track: &TrackInfo) -> protocol::Track {
    protocol::Track {
        track_id: track.track_id.to_string(),
        kind: match track.kind {
            MediaKind::Audio => protocol::TrackKind::Audio,
            MediaKind::Video => protocol::TrackKind::Video,
        },
        muted: track.muted,
        simulcast: track.simulcast,
        mid: None,
    }
}

fn participant_message(info: &ParticipantInfo) -> protocol::Participant {
    protocol::Participant {
        participant_id: info.participant_id.to_string(),
        name: info.name.clone(),
        tracks: info.tracks.iter().map(track_message).collect(),
    }
}
