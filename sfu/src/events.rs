//! What the media plane tells a participant's session: the room's membership and tracks,
//! subscriber offers, and why it ended. Signaling turns each into a protocol message.

use crate::ids::{ParticipantId, TrackId};

/// Audio or video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MediaKind {
    /// Audio.
    Audio,
    /// Video.
    Video,
}

/// A published track as others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackInfo {
    /// Server-assigned id.
    pub track_id: TrackId,
    /// Audio or video.
    pub kind: MediaKind,
    /// Whether the publisher muted it.
    pub muted: bool,
    /// Whether the publisher sends simulcast layers.
    pub simulcast: bool,
}

/// A participant as others see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantInfo {
    /// Server-assigned id.
    pub participant_id: ParticipantId,
    /// Display name.
    pub name: String,
    /// Published tracks.
    pub tracks: Vec<TrackInfo>,
}

/// Why the media plane ended a participant on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// ICE did not connect, or stayed failed/disconnected, for too long.
    MediaTimeout,
    /// The server is shutting down.
    ServerShutdown,
}

/// An event for one participant's session.
#[derive(Debug, Clone, PartialEq)]
pub enum SfuEvent {
    /// Someone joined the room.
    ParticipantJoined(ParticipantInfo),
    /// Someone left (after `TrackUnpublished` for each of its tracks).
    ParticipantLeft(ParticipantId),
    /// A track appeared; `mid` is set only when telling its own publisher.
    TrackPublished {
        /// The publisher.
        participant_id: ParticipantId,
        /// The track.
        track: TrackInfo,
        /// The publisher's transceiver mid (only for the publisher itself).
        mid: Option<String>,
    },
    /// A track is gone.
    TrackUnpublished {
        /// The publisher.
        participant_id: ParticipantId,
        /// The track.
        track_id: TrackId,
    },
    /// A track was muted or unmuted.
    TrackMuted {
        /// The publisher.
        participant_id: ParticipantId,
        /// The track.
        track_id: TrackId,
        /// The new state.
        muted: bool,
    },
    /// A new subscriber offer to send; the next one waits for its answer.
    SubscriberOffer(String),
    /// A chat line.
    Chat {
        /// The sender.
        participant_id: ParticipantId,
        /// The sender's name.
        name: String,
        /// The text.
        text: String,
        /// Unix milliseconds.
        ts: u64,
    },
    /// Who is speaking, loudest first.
    ActiveSpeakers(Vec<ParticipantId>),
    /// The media plane removed this participant; the session should close.
    Ended(EndReason),
}

/// Where a participant's events go.
pub type EventSink = tokio::sync::mpsc::UnboundedSender<SfuEvent>;
