//! The media plane of the SFU: rooms, participants, their peer connections, and the RTP
//! fan-out that forwards every published track to every other participant. It knows nothing
//! of HTTP or JSON; the signaling crate drives it through [`Sfu`] and [`Participant`] and
//! receives [`SfuEvent`]s.

pub mod codec;
pub mod events;
pub mod fanout;
pub mod forwarder;
pub mod ids;
pub mod metrics;
pub mod rewrite;
pub mod simulcast;
pub mod speakers;
pub mod transport;

mod arrival;
mod media_loop;
mod media_threads;
mod participant;
mod room;
mod sdp;

pub use events::{EndReason, EventSink, MediaKind, ParticipantInfo, SfuEvent, TrackInfo};
pub use ids::{ParticipantId, RoomId, TrackId};
pub use metrics::Metrics;
pub use participant::{CandidateInit, ConnectionTimeouts, MediaError};
pub use room::{JoinError, MuteError, RoomLimits};
pub use simulcast::Quality;
pub use transport::{MediaConfig, PeerRole};

use media_threads::MediaThreads;
use participant::{ParticipantCommand, ParticipantTask};
use room::{LocalRooms, RoomCommand, RoomRegistry};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use transport::PeerFactory;

/// Everything the media plane is configured with.
#[derive(Debug, Clone)]
pub struct SfuConfig {
    /// Addresses and ports for media.
    pub media: MediaConfig,
    /// Per-room limits.
    pub limits: RoomLimits,
    /// Connection timing rules.
    pub timeouts: ConnectionTimeouts,
    /// Rooms that may exist at once; a join that would open one more is refused with
    /// [`JoinError::TooManyRooms`].
    pub max_rooms: usize,
    /// Threads media runs on, each carrying whole rooms; `0` runs media on the caller's
    /// runtime instead.
    pub media_threads: usize,
}

/// The media plane: create one per process and share it.
#[derive(Clone)]
pub struct Sfu {
    inner: Arc<SfuInner>,
}

struct SfuInner {
    rooms: LocalRooms,
    factory: Arc<PeerFactory>,
    metrics: Metrics,
    timeouts: ConnectionTimeouts,
    /// Live participants, so shutdown can end them all.
    participants: Mutex<HashMap<ParticipantId, mpsc::UnboundedSender<ParticipantCommand>>>,
}

/// The result of a successful join.
pub struct Joined {
    /// The handle through which the session acts for the participant.
    pub participant: Participant,
    /// Everyone else already in the room.
    pub others: Vec<ParticipantInfo>,
}

impl Sfu {
    /// Creates the media plane, starting its media threads (with `media_threads: 0`, call it
    /// within the tokio runtime media should use).
    pub fn new(config: SfuConfig, metrics: Metrics) -> std::io::Result<Self> {
        let mint = Arc::new(ids::IdMint::new());
        let media_threads = Arc::new(MediaThreads::start(config.media_threads)?);
        Ok(Self {
            inner: Arc::new(SfuInner {
                rooms: LocalRooms::new(
                    mint,
                    metrics.clone(),
                    config.limits,
                    config.max_rooms,
                    media_threads,
                ),
                factory: Arc::new(PeerFactory::new(config.media, metrics.clone())),
                metrics,
                timeouts: config.timeouts,
                participants: Mutex::default(),
            }),
        })
    }

    /// The media plane's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// How many rooms exist.
    pub fn room_count(&self) -> usize {
        self.inner.rooms.len()
    }

    /// Joins `room` as `name`; the room's events go to `events`.
    pub async fn join(
        &self,
        room: &RoomId,
        name: String,
        events: EventSink,
    ) -> Result<Joined, JoinError> {
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (reply, joined) = oneshot::channel();
        let room_handle = self.inner.rooms.dispatch(
            room,
            RoomCommand::Join {
                name,
                events: events.clone(),
                participant: commands_tx.clone(),
                reply,
            },
        )?;
        let media_thread = Arc::clone(room_handle.media_thread());
        let reply = joined.await.map_err(|_| JoinError::Closed)??;
        let id = reply.participant_id;
        let task = ParticipantTask::new(
            id.clone(),
            room_handle,
            events,
            Arc::clone(&self.inner.factory),
            self.inner.timeouts,
            commands_tx.clone(),
        );
        self.inner
            .participants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), commands_tx.clone());
        let (done_tx, done) = oneshot::channel();
        let inner = Arc::clone(&self.inner);
        let task_id = id.clone();
        // On the room's media thread, with everything the participant's connections spawn.
        media_thread.spawn(async move {
            task.run(commands_rx).await;
            inner
                .participants
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&task_id);
            let _ = done_tx.send(());
        });
        Ok(Joined {
            participant: Participant {
                id,
                commands: commands_tx,
                done: Some(done),
            },
            others: reply.others,
        })
    }

    /// Ends every participant (they get [`SfuEvent::Ended`]) and waits up to `timeout` for
    /// their connections to close.
    pub async fn shutdown(&self, timeout: Duration) {
        let senders: Vec<_> = self
            .inner
            .participants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for sender in senders {
            let _ = sender.send(ParticipantCommand::End(Some(EndReason::ServerShutdown)));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            let empty = self
                .inner
                .participants
                .lock()
                .map(|p| p.is_empty())
                .unwrap_or(true);
            if empty {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A joined participant, as its session acts for it. Dropping it leaves the room.
pub struct Participant {
    id: ParticipantId,
    commands: mpsc::UnboundedSender<ParticipantCommand>,
    done: Option<oneshot::Receiver<()>>,
}

impl Participant {
    /// The participant's id.
    pub fn id(&self) -> &ParticipantId {
        &self.id
    }

    /// Applies a publisher offer; returns the answer SDP.
    pub async fn publisher_offer(&self, sdp: String) -> Result<String, MediaError> {
        let (reply, answer) = oneshot::channel();
        self.send(ParticipantCommand::PublisherOffer { sdp, reply })?;
        answer.await.map_err(|_| MediaError::Gone)?
    }

    /// Applies the answer to the latest subscriber offer.
    pub async fn subscriber_answer(&self, sdp: String) -> Result<(), MediaError> {
        let (reply, done) = oneshot::channel();
        self.send(ParticipantCommand::SubscriberAnswer { sdp, reply })?;
        done.await.map_err(|_| MediaError::Gone)?
    }

    /// Adds a trickled candidate (buffered until the connection has a remote description).
    pub fn add_candidate(&self, role: PeerRole, candidate: CandidateInit) {
        let _ = self.send(ParticipantCommand::Candidate { role, candidate });
    }

    /// Mutes or unmutes one of this participant's tracks.
    pub async fn mute(&self, track_id: TrackId, muted: bool) -> Result<(), MuteError> {
        let (reply, done) = oneshot::channel();
        let unknown = MuteError::UnknownTrack(track_id.to_string());
        if self
            .send(ParticipantCommand::Mute {
                track_id,
                muted,
                reply,
            })
            .is_err()
        {
            return Err(unknown);
        }
        done.await.map_err(|_| unknown)?
    }

    /// Sets the highest simulcast layer this participant wants of a track it receives, or will:
    /// a track announced but not yet forwarded to it gets the quality once it is.
    pub async fn set_quality(&self, track_id: TrackId, quality: Quality) -> Result<(), MediaError> {
        let (reply, done) = oneshot::channel();
        self.send(ParticipantCommand::SetQuality {
            track_id,
            quality,
            reply,
        })?;
        done.await.map_err(|_| MediaError::Gone)?
    }

    /// Sends a chat line to the room.
    pub fn chat(&self, text: String) {
        let _ = self.send(ParticipantCommand::Chat { text });
    }

    /// Leaves the room and waits until its connections are closed.
    pub async fn leave(mut self) {
        let _ = self.commands.send(ParticipantCommand::End(None));
        if let Some(done) = self.done.take() {
            let _ = done.await;
        }
    }

    fn send(&self, command: ParticipantCommand) -> Result<(), MediaError> {
        self.commands.send(command).map_err(|_| MediaError::Gone)
    }
}

impl Drop for Participant {
    fn drop(&mut self) {
        let _ = self.commands.send(ParticipantCommand::End(None));
    }
}
