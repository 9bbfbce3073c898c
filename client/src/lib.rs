//! The headless client: a signaling client, media sources (synthetic VP8/Opus with probes, or
//! real VP8/Opus from IVF/Ogg files) and a headless peer that joins a room like a browser does,
//! publishes and measures what it receives. Tests and the load tester build on it.

#![warn(missing_docs)]

pub mod janus;
pub mod load;
pub mod media;
pub mod media_file;
pub mod peer;
pub mod publish;
pub mod rtc_setup;
pub mod signal;
pub mod stats;

pub use media::{parse_probe, vp8_is_keyframe, AudioConfig, AudioSource, VideoConfig, VideoSource};
pub use media_file::{FileAudioSource, FileVideoSource, IvfClip, MediaFileError, OggOpusClip};
pub use peer::{ChatLine, HeadlessPeer, ParticipantInfo, PeerConfig, RoomState};
pub use publish::SimulcastLayer;
pub use signal::{Frame, SignalClient, SignalEvent};
pub use signaling::protocol::TrackKind;
pub use stats::{
    LatencyHistogram, LayerSwitch, PeerStats, SentLayerStats, SentStats, TrackKey, TrackStats,
};

use signaling::protocol::ErrorCode;

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The WebSocket failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
    /// A message could not be encoded or decoded.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// webrtc-rs refused an operation.
    #[error("webrtc: {0}")]
    WebRtc(#[from] webrtc::error::Error),
    /// The server answered with a protocol `error`.
    #[error("server error {}: {message}", code.as_str())]
    Server {
        /// The contract's code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// Janus answered a request with an error (`janus.rs`).
    #[error("janus error {code}: {message}")]
    Janus {
        /// Janus's error code (core API codes 4xx, VideoRoom plugin codes 42x).
        code: i64,
        /// Janus's explanation.
        message: String,
    },
    /// The signaling socket closed.
    #[error("the signaling socket closed (code {0:?})")]
    Closed(Option<u16>),
    /// Something did not happen in time; the text says what was awaited.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A media file could not be used.
    #[error("media file {0}")]
    MediaFile(#[from] MediaFileError),
    /// The peer has left or its tasks have stopped.
    #[error("the peer is no longer running")]
    Stopped,
    /// A configuration that cannot work; the text says what is wrong.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

/// The client's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Microseconds since the UNIX epoch, the clock the media probes carry.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A random 64-bit value from the standard library's hasher keys (no `rand` dependency).
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(unix_micros());
    hasher.finish()
}
