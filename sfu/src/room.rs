//! Rooms: who is in a room, which tracks exist and who receives them. Each room is a task
//! that owns its state and takes commands in order, so membership changes need no locks and
//! every participant sees events in one consistent order. The registry that finds a room by
//! name sits behind [`RoomRegistry`], so a shared directory (several nodes) can replace it.

use crate::events::{EventSink, MediaKind, ParticipantInfo, SfuEvent, TrackInfo};
use crate::fanout::FanoutHandle;
use crate::ids::{IdMint, ParticipantId, RoomId, TrackId};
use crate::media_threads::{MediaThread, MediaThreads, RoomPlacement};
use crate::metrics::Metrics;
use crate::participant::ParticipantCommand;
use crate::speakers::SpeakerDetector;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// Limits a room enforces.
#[derive(Debug, Clone, Copy)]
pub struct RoomLimits {
    /// Participants per room.
    pub max_participants: usize,
    /// Published tracks per participant; further m-sections are not published.
    pub max_tracks_per_participant: usize,
}

impl Default for RoomLimits {
    fn default() -> Self {
        Self {
            max_participants: 100,
            max_tracks_per_participant: 8,
        }
    }
}

/// A media source that subscribers can be attached to.
#[derive(Clone)]
pub(crate) struct TrackSource {
    pub(crate) fanout: FanoutHandle,
    pub(crate) codec: RTCRtpCodec,
    pub(crate) publisher_extensions: crate::fanout::ExtensionMap,
}

/// A publisher m-section that carries media to the SFU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PublishedSection {
    pub(crate) mid: String,
    pub(crate) kind: MediaKind,
    pub(crate) simulcast: bool,
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The room is at its participant limit.
    #[error("room is full ({0} participants)")]
    RoomFull(usize),
    /// Joining would open a room beyond the server's room limit.
    #[error("the server has its maximum of {0} rooms open")]
    TooManyRooms(usize),
    /// The room is shutting down or failed.
    #[error("room is closed")]
    Closed,
}

/// Why a mute was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuteError {
    /// No such track, or not the sender's.
    #[error("no published track {0} of yours")]
    UnknownTrack(String),
}

pub(crate) struct JoinReply {
    pub(crate) participant_id: ParticipantId,
    pub(crate) others: Vec<ParticipantInfo>,
}

/// The outcome of a publisher renegotiation.
pub(crate) struct TrackChanges {
    /// mid → track id, for every published section.
    pub(crate) published: Vec<(String, TrackId)>,
    /// Tracks whose m-section is gone.
    pub(crate) removed: Vec<TrackId>,
}

pub(crate) enum RoomCommand {
    Join {
        name: String,
        events: EventSink,
        participant: mpsc::UnboundedSender<ParticipantCommand>,
        reply: oneshot::Sender<Result<JoinReply, JoinError>>,
    },
    Leave {
        participant_id: ParticipantId,
    },
    SetTracks {
        participant_id: ParticipantId,
        sections: Vec<PublishedSection>,
        reply: oneshot::Sender<TrackChanges>,
    },
    MediaReady {
        participant_id: ParticipantId,
        track_id: TrackId,
        source: TrackSource,
    },
    Mute {
        participant_id: ParticipantId,
        track_id: TrackId,
        muted: bool,
        reply: oneshot::Sender<Result<(), MuteError>>,
    },
    Chat {
        participant_id: ParticipantId,
        text: String,
    },
    /// An audio track's average level (−dBov) over the last report period.
    AudioLevel {
        participant_id: ParticipantId,
        level: f32,
    },
}

/// Sends commands to a room task.
#[derive(Clone)]
pub(crate) struct RoomHandle {
    commands: mpsc::UnboundedSender<RoomCommand>,
    media_thread: Arc<MediaThread>,
}

impl RoomHandle {
    pub(crate) fn send(&self, command: RoomCommand) -> bool {
        self.commands.send(command).is_ok()
    }

    /// The thread the room runs on, where its participants' tasks belong too.
    pub(crate) fn media_thread(&self) -> &Arc<MediaThread> {
        &self.media_thread
    }
}

/// Finds or creates rooms by name. The in-process implementation is [`LocalRooms`]; a
/// directory shared by several nodes implements the same two calls.
pub(crate) trait RoomRegistry: Send + Sync {
    /// Hands `command` to the room named `room`, creating the room if needed, and returns
    /// the room's handle for the sender's later commands. Refuses (and drops `command`) when
    /// the room does not exist and the registry already holds its maximum of rooms.
    fn dispatch(&self, room: &RoomId, command: RoomCommand) -> Result<RoomHandle, JoinError>;
    /// How many rooms exist.
    fn len(&self) -> usize;
}

/// Rooms of this process.
pub(crate) struct LocalRooms {
    rooms: Arc<Mutex<HashMap<RoomId, RoomHandle>>>,
    mint: Arc<IdMint>,
    metrics: Metrics,
    limits: RoomLimits,
    /// Rooms that may exist at once: each costs a task and memory before anyone publishes.
    max_rooms: usize,
    media_threads: Arc<MediaThreads>,
}

impl LocalRooms {
    pub(crate) fn new(
        mint: Arc<IdMint>,
        metrics: Metrics,
        limits: RoomLimits,
        max_rooms: usize,
        media_threads: Arc<MediaThreads>,
    ) -> Self {
        Self {
            rooms: Arc::default(),
            mint,
            metrics,
            limits,
            max_rooms,
            media_threads,
        }
    }
}

impl RoomRegistry for LocalRooms {
    fn dispatch(&self, room: &RoomId, command: RoomCommand) -> Result<RoomHandle, JoinError> {
        // Sending under the registry lock is what makes room removal race-free: a room only
        // removes itself while holding this lock and after checking its queue is empty. The
        // same lock makes the room limit exact under concurrent joins.
        let mut rooms = self.rooms.lock().unwrap_or_else(|e| e.into_inner());
        if !rooms.contains_key(room) && rooms.len() >= self.max_rooms {
            return Err(JoinError::TooManyRooms(self.max_rooms));
        }
        let handle = rooms.entry(room.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let placement = self.media_threads.place_room();
            let media_thread = Arc::clone(placement.thread());
            let state = Room {
                id: room.clone(),
                members: Vec::new(),
                tracks: HashMap::new(),
                mint: Arc::clone(&self.mint),
                metrics: self.metrics.clone(),
                limits: self.limits,
                registry: Arc::clone(&self.rooms),
                speakers: SpeakerDetector::default(),
                _placement: placement,
            };
            self.metrics.rooms.inc();
            media_thread.spawn(state.run(rx));
            RoomHandle {
                commands: tx,
                media_thread,
            }
        });
        handle.send(command);
        Ok(handle.clone())
    }

    fn len(&self) -> usize {
        self.rooms.lock().map(|r| r.len()).unwrap_or(0)
    }
}

struct Member {
    id: ParticipantId,
    name: String,
    events: EventSink,
    participant: mpsc::UnboundedSender<ParticipantCommand>,
    /// Published tracks, in publication order.
    tracks: Vec<TrackId>,
}

struct RoomTrack {
    owner: ParticipantId,
    mid: String,
    info: TrackInfo,
    source: Option<TrackSource>,
}

struct Room {
    id: RoomId,
    /// In join order, so `joined` lists participants the same way for everyone.
    members: Vec<Member>,
    tracks: HashMap<TrackId, RoomTrack>,
    mint: Arc<IdMint>,
    metrics: Metrics,
    limits: RoomLimits,
    registry: Arc<Mutex<HashMap<RoomId, RoomHandle>>>,
    speakers: SpeakerDetector,
    /// Counts this room on its media thread until the room ends.
    _placement: RoomPlacement,
}

impl Room {
    fn announce_speakers(&mut self) {
        if let Some(speakers) = self.speakers.poll(Instant::now()) {
            let event = SfuEvent::ActiveSpeakers(speakers);
            for m in &self.members {
                let _ = m.events.send(event.clone());
            }
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<RoomCommand>) {
        loop {
            let Some(command) = commands.recv().await else {
                break;
            };
            self.handle(command);
            if self.members.is_empty() {
                let mut rooms = self.registry.lock().unwrap_or_else(|e| e.into_inner());
                match commands.try_recv() {
                    Ok(command) => {
                        drop(rooms);
                        self.handle(command);
                    }
                    Err(_) => {
                        rooms.remove(&self.id);
                        break;
                    }
                }
            }
        }
        self.metrics.rooms.dec();
        tracing::debug!(room = %self.id, "room closed");
    }

    fn handle(&mut self, command: RoomCommand) {
        match command {
            RoomCommand::Join {
                name,
                events,
                participant,
                reply,
            } => self.join(name, events, participant, reply),
            RoomCommand::Leave { participant_id } => self.leave(&participant_id),
            RoomCommand::SetTracks {
                participant_id,
                sections,
                reply,
            } => {
                let changes = self.set_tracks(&participant_id, sections);
                let _ = reply.send(changes);
            }
            RoomCommand::MediaReady {
                participant_id,
                track_id,
                source,
            } => self.media_ready(&participant_id, track_id, source),
            RoomCommand::Mute {
                participant_id,
                track_id,
                muted,
                reply,
            } => {
                let _ = reply.send(self.mute(&participant_id, &track_id, muted));
            }
            RoomCommand::Chat {
                participant_id,
                text,
            } => self.chat(&participant_id, text),
            RoomCommand::AudioLevel {
                participant_id,
                level,
            } => {
                if self.members.iter().any(|m| m.id == participant_id) {
                    self.speakers.report(&participant_id, level, Instant::now());
                    self.announce_speakers();
                }
            }
        }
    }

    fn info(&self, member: &Member) -> ParticipantInfo {
        ParticipantInfo {
            participant_id: member.id.clone(),
            name: member.name.clone(),
            tracks: member
                .tracks
                .iter()
                .filter_map(|t| self.tracks.get(t).map(|t| t.info.clone()))
                .collect(),
        }
    }

    fn broadcast_except(&self, except: &ParticipantId, event: &SfuEvent) {
        for m in self.members.iter().filter(|m| &m.id != except) {
            let _ = m.events.send(event.clone());
        }
    }

    fn join(
        &mut self,
        name: String,
        events: EventSink,
        participant: mpsc::UnboundedSender<ParticipantCommand>,
        reply: oneshot::Sender<Result<JoinReply, JoinError>>,
    ) {
        if self.members.len() >= self.limits.max_participants {
            let _ = reply.send(Err(JoinError::RoomFull(self.limits.max_participants)));
            return;
        }
        let id = self.mint.participant();
        let others: Vec<ParticipantInfo> = self.members.iter().map(|m| self.info(m)).collect();
        let member = Member {
            id: id.clone(),
            name,
            events,
            participant,
            tracks: Vec::new(),
        };
        if reply
            .send(Ok(JoinReply {
                participant_id: id.clone(),
                others,
            }))
            .is_err()
        {
            // The joiner went away while waiting; it was never a member.
            return;
        }
        self.metrics.participants.inc();
        tracing::info!(room = %self.id, participant = %id, name = %member.name, "joined");
        self.broadcast_except(&id, &SfuEvent::ParticipantJoined(self.info(&member)));
        // Existing media goes to the newcomer.
        for (track_id, track) in &self.tracks {
            if let Some(source) = &track.source {
                let _ = member.participant.send(ParticipantCommand::Subscribe {
                    publisher: track.owner.clone(),
                    track: track.info.clone(),
                    source: source.clone(),
                });
                tracing::debug!(track = %track_id, subscriber = %id, "subscribing newcomer");
            }
        }
        self.members.push(member);
    }

    fn leave(&mut self, id: &ParticipantId) {
        let Some(index) = self.members.iter().position(|m| &m.id == id) else {
            return;
        };
        let member = self.members.remove(index);
        for track_id in &member.tracks {
            self.unpublish(id, track_id);
        }
        self.metrics.participants.dec();
        self.broadcast_except(id, &SfuEvent::ParticipantLeft(id.clone()));
        self.speakers.remove(id);
        self.announce_speakers();
        tracing::info!(room = %self.id, participant = %id, "left");
    }

    /// Removes a track: subscribers drop it, everyone is told.
    fn unpublish(&mut self, owner: &ParticipantId, track_id: &TrackId) {
        if self.tracks.remove(track_id).is_none() {
            return;
        }
        self.metrics.published_tracks.dec();
        for m in self.members.iter().filter(|m| &m.id != owner) {
            let _ = m.participant.send(ParticipantCommand::Unsubscribe {
                track_id: track_id.clone(),
            });
        }
        self.broadcast_except(
            owner,
            &SfuEvent::TrackUnpublished {
                participant_id: owner.clone(),
                track_id: track_id.clone(),
            },
        );
    }

    fn set_tracks(&mut self, id: &ParticipantId, sections: Vec<PublishedSection>) -> TrackChanges {
        let Some(index) = self.members.iter().position(|m| &m.id == id) else {
            return TrackChanges {
                published: Vec::new(),
                removed: Vec::new(),
            };
        };
        let current: Vec<TrackId> = self.members[index].tracks.clone();
        let mut kept = Vec::new();
        let mut published = Vec::new();
        let mut removed = Vec::new();
        for track_id in current {
            let Some(track) = self.tracks.get(&track_id) else {
                continue;
            };
            let still_there = sections
                .iter()
                .any(|s| s.mid == track.mid && s.kind == track.info.kind);
            if still_there {
                published.push((track.mid.clone(), track_id.clone()));
                kept.push(track_id);
            } else {
                removed.push(track_id);
            }
        }
        for track_id in &removed {
            self.unpublish(id, track_id);
        }
        let mut new_tracks = Vec::new();
        for section in sections {
            if published.iter().any(|(mid, _)| *mid == section.mid) {
                continue;
            }
            if kept.len() + new_tracks.len() >= self.limits.max_tracks_per_participant {
                tracing::warn!(participant = %id, mid = %section.mid, "track limit reached; m-section not published");
                continue;
            }
            let track_id = self.mint.track();
            let info = TrackInfo {
                track_id: track_id.clone(),
                kind: section.kind,
                muted: false,
                simulcast: section.simulcast,
            };
            self.tracks.insert(
                track_id.clone(),
                RoomTrack {
                    owner: id.clone(),
                    mid: section.mid.clone(),
                    info,
                    source: None,
                },
            );
            self.metrics.published_tracks.inc();
            published.push((section.mid, track_id.clone()));
            new_tracks.push(track_id);
        }
        let member = &mut self.members[index];
        member.tracks = kept;
        member.tracks.extend(new_tracks.iter().cloned());
        for track_id in &new_tracks {
            let track = &self.tracks[track_id];
            let _ = self.members[index].events.send(SfuEvent::TrackPublished {
                participant_id: id.clone(),
                track: track.info.clone(),
                mid: Some(track.mid.clone()),
            });
            self.broadcast_except(
                id,
                &SfuEvent::TrackPublished {
                    participant_id: id.clone(),
                    track: track.info.clone(),
                    mid: None,
                },
            );
        }
        TrackChanges { published, removed }
    }

    fn media_ready(&mut self, owner: &ParticipantId, track_id: TrackId, source: TrackSource) {
        let Some(track) = self.tracks.get_mut(&track_id) else {
            return;
        };
        if &track.owner != owner {
            return;
        }
        if track.info.muted {
            source.fanout.set_muted(true);
        }
        track.source = Some(source.clone());
        let info = track.info.clone();
        for m in self.members.iter().filter(|m| &m.id != owner) {
            let _ = m.participant.send(ParticipantCommand::Subscribe {
                publisher: owner.clone(),
                track: info.clone(),
                source: source.clone(),
            });
        }
    }

    fn mute(
        &mut self,
        owner: &ParticipantId,
        track_id: &TrackId,
        muted: bool,
    ) -> Result<(), MuteError> {
        let track = self
            .tracks
            .get_mut(track_id)
            .filter(|t| &t.owner == owner)
            .ok_or_else(|| MuteError::UnknownTrack(track_id.to_string()))?;
        if track.info.muted == muted {
            return Ok(());
        }
        track.info.muted = muted;
        if let Some(source) = &track.source {
            source.fanout.set_muted(muted);
        }
        let silenced = muted && track.info.kind == MediaKind::Audio;
        self.broadcast_except(
            owner,
            &SfuEvent::TrackMuted {
                participant_id: owner.clone(),
                track_id: track_id.clone(),
                muted,
            },
        );
        if silenced {
            self.speakers.remove(owner);
            self.announce_speakers();
        }
        Ok(())
    }

    fn chat(&self, from: &ParticipantId, text: String) {
        let Some(sender) = self.members.iter().find(|m| &m.id == from) else {
            return;
        };
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let event = SfuEvent::Chat {
            participant_id: from.clone(),
            name: sender.name.clone(),
            text,
            ts,
        };
        for m in &self.members {
            let _ = m.events.send(event.clone());
        }
    }
}
