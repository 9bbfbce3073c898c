//! Which SFU a load test drives: ours (its own signaling protocol, `HeadlessPeer`) or Janus's
//! VideoRoom (`JanusPeer`). Both publish the same media and record it in the same statistics;
//! [`LoadPeer`] is what the runner needs from either.

use std::collections::HashMap;
use std::time::Instant;

use crate::janus::{JanusPeer, JanusRoomOptions};
use crate::stats::{PeerStats, SentStats, TrackKey, TrackStats};
use crate::{HeadlessPeer, PeerConfig, TrackKind};
use signaling::protocol::Quality;

/// The server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Our SFU (`sfu-server`), with its own signaling protocol.
    #[default]
    Ours,
    /// Janus 1.x with its VideoRoom plugin, over the Janus WebSocket API.
    Janus,
}

impl Target {
    /// The signaling URL a server of this kind listens on by default on this machine.
    pub fn default_url(self) -> &'static str {
        match self {
            Target::Ours => "ws://127.0.0.1:8080/ws",
            Target::Janus => "ws://127.0.0.1:8188",
        }
    }

    /// The name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Ours => "ours",
            Target::Janus => "janus",
        }
    }
}

/// A joined participant of either server.
pub enum LoadPeer {
    /// On our server.
    Ours(HeadlessPeer),
    /// In a Janus VideoRoom.
    Janus(JanusPeer),
}

impl LoadPeer {
    /// Joins `config.room` on `target`; `room` is how a Janus room is created when this peer
    /// is the first in it (our server creates rooms by itself).
    pub async fn join(
        target: Target,
        config: PeerConfig,
        room: JanusRoomOptions,
    ) -> crate::Result<LoadPeer> {
        match target {
            Target::Ours => HeadlessPeer::join(config).await.map(LoadPeer::Ours),
            Target::Janus => JanusPeer::join(config, room).await.map(LoadPeer::Janus),
        }
    }

    /// The participant id other peers see this peer's tracks under.
    pub fn participant_id(&self) -> String {
        match self {
            LoadPeer::Ours(p) => p.participant_id().to_owned(),
            LoadPeer::Janus(p) => p.participant_id(),
        }
    }

    /// The ids its published tracks are received under (empty when it does not publish).
    pub fn own_track_ids(&self) -> Vec<String> {
        match self {
            LoadPeer::Ours(p) => p.with_state(|s| {
                [TrackKind::Video, TrackKind::Audio]
                    .into_iter()
                    .filter_map(|k| s.own_track(k).map(|t| t.track_id.clone()))
                    .collect()
            }),
            LoadPeer::Janus(p) => {
                p.with_state(|s| s.own_tracks.iter().map(|(_, mid)| mid.clone()).collect())
            }
        }
    }

    /// Where its join clock starts, given when its join began: then, if there was media to
    /// receive when it joined, else when the first track was announced.
    pub fn media_clock_start(&self, join_started: Instant) -> Instant {
        let (at_join, first) = match self {
            LoadPeer::Ours(p) => {
                p.with_state(|s| (s.remote_tracks_at_join, s.first_remote_track_at))
            }
            LoadPeer::Janus(p) => {
                p.with_state(|s| (s.remote_tracks_at_join, s.first_remote_track_at))
            }
        };
        if at_join > 0 {
            join_started
        } else {
            first.map_or(join_started, |t| t.max(join_started))
        }
    }

    /// Errors it saw, in words: the server's and its own.
    pub fn errors(&self) -> Vec<String> {
        match self {
            LoadPeer::Ours(p) => p.with_state(|s| {
                s.errors
                    .iter()
                    .map(|(code, message)| format!("{}: {message}", code.as_str()))
                    .chain(s.local_errors.iter().cloned())
                    .collect()
            }),
            LoadPeer::Janus(p) => p.with_state(|s| {
                s.errors
                    .iter()
                    .map(|(code, message)| format!("janus {code}: {message}"))
                    .chain(s.local_errors.iter().cloned())
                    .collect()
            }),
        }
    }

    /// How many errors it saw (cheap, for the live line).
    pub fn error_count(&self) -> usize {
        match self {
            LoadPeer::Ours(p) => p.with_state(|s| s.errors.len() + s.local_errors.len()),
            LoadPeer::Janus(p) => p.with_state(|s| s.errors.len() + s.local_errors.len()),
        }
    }

    /// A snapshot of its measurements.
    pub fn stats(&self) -> PeerStats {
        match self {
            LoadPeer::Ours(p) => p.stats(),
            LoadPeer::Janus(p) => p.stats(),
        }
    }

    /// Calls `f` with each received track's stats in turn, without copying them.
    pub fn for_each_received_track(&self, f: impl FnMut(&TrackKey, &TrackStats)) {
        match self {
            LoadPeer::Ours(p) => p.for_each_received_track(f),
            LoadPeer::Janus(p) => p.for_each_received_track(f),
        }
    }

    /// What it publishes, by kind.
    pub fn sent_stats(&self) -> HashMap<TrackKind, SentStats> {
        match self {
            LoadPeer::Ours(p) => p.sent_stats(),
            LoadPeer::Janus(p) => p.sent_stats(),
        }
    }

    /// Asks for `quality` of every simulcast video track this peer receives; returns the
    /// requests sent (none on Janus, whose rooms here carry no simulcast).
    pub fn set_simulcast_quality(&self, quality: Quality) -> u64 {
        match self {
            LoadPeer::Ours(p) => {
                let tracks: Vec<String> = p.with_state(|s| {
                    s.remote_tracks()
                        .filter(|(_, t)| t.simulcast && t.kind == TrackKind::Video)
                        .map(|(_, t)| t.track_id.clone())
                        .collect()
                });
                tracks
                    .iter()
                    .filter(|track_id| p.set_quality(track_id, quality).is_ok())
                    .count() as u64
            }
            LoadPeer::Janus(_) => 0,
        }
    }

    /// Leaves the room and closes everything.
    pub async fn leave(self) -> crate::Result<()> {
        match self {
            LoadPeer::Ours(p) => p.leave().await,
            LoadPeer::Janus(p) => p.leave().await,
        }
    }
}
