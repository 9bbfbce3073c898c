//! Publishing media on a peer connection: adding a send-only VP8 or Opus track, and the task
//! that paces its packets in real time (synthetic sources on a fixed frame clock, file sources on
//! the file's own clock), answers keyframe requests (PLI/FIR), and counts what it sent.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rtc::rtp::extension::audio_level_extension::AudioLevelExtension;
use rtc::rtp::extension::HeaderExtension;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use signaling::protocol::TrackKind;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::peer_connection::{PeerConnection, RTCPeerConnectionState};
use webrtc::rtp_transceiver::{RtpSender, RtpTransceiver};

use crate::media::{AudioConfig, AudioSource, VideoConfig, VideoSource, AUDIO_FRAME};
use crate::media_file::{FileAudioSource, FileVideoSource, IvfClip, OggOpusClip};
use crate::rtc_setup::{is_keyframe_request, negotiated_payload_type, new_local_track};
use crate::stats::StatsStore;
use crate::{Error, Result};

/// Raw value meaning "send no audio level extension".
const NO_LEVEL: u16 = u16::MAX;

/// The audio level the audio sender writes, changeable while it runs.
#[derive(Debug, Clone)]
pub struct AudioLevel(Arc<AtomicU16>);

impl AudioLevel {
    /// Starts at `level` (−dBov, 0 loudest … 127 silence; `None`: no extension).
    pub fn new(level: Option<u8>) -> Self {
        AudioLevel(Arc::new(AtomicU16::new(level_to_raw(level))))
    }

    /// Changes the level.
    pub fn set(&self, level: Option<u8>) {
        self.0.store(level_to_raw(level), Ordering::Relaxed);
    }

    /// The current level.
    pub fn get(&self) -> Option<u8> {
        level_value(self.0.load(Ordering::Relaxed))
    }
}

fn level_to_raw(level: Option<u8>) -> u16 {
    level.map_or(NO_LEVEL, |l| u16::from(l.min(127)))
}

fn level_value(raw: u16) -> Option<u8> {
    (raw != NO_LEVEL).then_some(raw as u8)
}

/// A send-only track on a peer connection.
#[derive(Clone)]
pub struct PublishedTrack {
    /// Audio or video.
    pub kind: TrackKind,
    /// The local track packets are written to.
    pub track: Arc<TrackLocalStaticRTP>,
    /// Its sender (for the negotiated payload type).
    pub sender: Arc<dyn RtpSender>,
    /// Its transceiver (for the mid).
    pub transceiver: Arc<dyn RtpTransceiver>,
    /// The SSRC packets carry.
    pub ssrc: u32,
}

/// Adds a send-only track of `kind` in media stream `stream_id` to `pc`.
pub async fn add_published_track(
    pc: &Arc<dyn PeerConnection>,
    kind: TrackKind,
    stream_id: &str,
) -> Result<PublishedTrack> {
    let ssrc = (crate::random_u64() as u32).max(1);
    let track_id = format!(
        "{}-{:08x}",
        match kind {
            TrackKind::Audio => "audio",
            TrackKind::Video => "video",
        },
        crate::random_u64() as u32
    );
    let track = new_local_track(kind, stream_id, &track_id, ssrc);
    let transceiver = pc
        .add_transceiver_from_track(
            Arc::clone(&track) as Arc<dyn TrackLocal>,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Sendonly,
                streams: vec![stream_id.to_owned()],
                send_encodings: vec![],
            }),
        )
        .await?;
    let sender = transceiver.sender().await?.ok_or(Error::Stopped)?;
    Ok(PublishedTrack {
        kind,
        track,
        sender,
        transceiver,
        ssrc,
    })
}

/// What a published video track sends.
#[derive(Debug, Clone)]
pub enum VideoMedia {
    /// Synthetic VP8 carrying probes, shaped by the configuration.
    Synthetic(VideoConfig),
    /// A VP8 clip read from an IVF file, looped.
    File(Arc<IvfClip>),
}

/// What a published audio track sends.
#[derive(Debug, Clone)]
pub enum AudioMedia {
    /// Synthetic Opus-sized packets carrying probes.
    Synthetic(AudioConfig),
    /// Opus packets read from an Ogg file, looped.
    File(Arc<OggOpusClip>),
}

impl Default for VideoMedia {
    fn default() -> Self {
        VideoMedia::Synthetic(VideoConfig::default())
    }
}

impl Default for AudioMedia {
    fn default() -> Self {
        AudioMedia::Synthetic(AudioConfig::default())
    }
}

/// How far a sender may fall behind its clock and still catch up: past this, the missed time
/// is skipped instead of being sent as a burst.
const CATCH_UP_LIMIT: std::time::Duration = std::time::Duration::from_millis(250);

/// What the sender task needs besides the track.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// What the video track sends.
    pub video: VideoMedia,
    /// What the audio track sends.
    pub audio: AudioMedia,
    /// The audio level written on audio packets.
    pub audio_level: AudioLevel,
}

/// Aborts a task when dropped (so a sender's RTCP reader dies with it).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Spawns the task that sends `published`'s media once `connection` reports `Connected`, until
/// the connection fails or closes (or the task is aborted).
pub fn spawn_sender(
    published: PublishedTrack,
    options: SendOptions,
    stats: StatsStore,
    mut connection: watch::Receiver<RTCPeerConnectionState>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let connected = connection
            .wait_for(|s| {
                matches!(
                    s,
                    RTCPeerConnectionState::Connected
                        | RTCPeerConnectionState::Failed
                        | RTCPeerConnectionState::Closed
                )
            })
            .await
            .map(|s| *s == RTCPeerConnectionState::Connected)
            .unwrap_or(false);
        if !connected {
            tracing::debug!(kind = ?published.kind, "publisher never connected; not sending");
            return;
        }
        let kind = published.kind;
        let default_pt = match kind {
            TrackKind::Video => 96,
            TrackKind::Audio => 111,
        };
        let payload_type = negotiated_payload_type(&published.sender, kind)
            .await
            .unwrap_or(default_pt);
        stats.update_sent(kind, |s| s.ssrc = published.ssrc);
        tracing::debug!(?kind, payload_type, ssrc = published.ssrc, "sending");

        let requests = Arc::new(Notify::new());
        let _reader = AbortOnDrop(spawn_rtcp_reader(
            Arc::clone(&published.track),
            kind,
            Arc::clone(&requests),
            stats.clone(),
        ));
        let mut sender = Sender {
            track: published.track,
            kind,
            stats,
            audio_level: options.audio_level,
            errors: 0,
        };
        let stopped = |s: &RTCPeerConnectionState| {
            matches!(
                s,
                RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
            )
        };
        match (kind, options.video, options.audio) {
            (TrackKind::Video, VideoMedia::Synthetic(config), _) => {
                let mut source = VideoSource::new(config, published.ssrc, payload_type);
                let frame_interval = source.config().frame_interval();
                let mut clock = PacingClock::new();
                let mut frames: u32 = 0;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(clock.due(frame_interval * frames)) => {}
                        _ = requests.notified() => {
                            source.request_keyframe();
                            let now = Instant::now();
                            let recent = source
                                .last_keyframe()
                                .is_some_and(|k| now.duration_since(k) < frame_interval);
                            if recent {
                                // One was just sent; the next frame due makes another.
                                continue;
                            }
                            // At once, and restart the frame clock from here.
                            clock.restart(frame_interval * frames);
                        }
                        changed = connection.changed() => {
                            if changed.is_err() || stopped(&connection.borrow()) {
                                break;
                            }
                            continue;
                        }
                    }
                    clock.sent(frame_interval * frames);
                    let frame = source.next_frame(Instant::now(), crate::unix_micros());
                    sender.send_video(frame).await;
                    frames = frames.wrapping_add(1);
                }
            }
            (TrackKind::Video, VideoMedia::File(clip), _) => {
                let mut source = FileVideoSource::new(clip, published.ssrc, payload_type);
                let mut clock = PacingClock::new();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(clock.due(source.next_due())) => {}
                        // A file cannot make a keyframe now: the next frame due skips ahead to
                        // the clip's next keyframe instead.
                        _ = requests.notified() => {
                            source.request_keyframe();
                            continue;
                        }
                        changed = connection.changed() => {
                            if changed.is_err() || stopped(&connection.borrow()) {
                                break;
                            }
                            continue;
                        }
                    }
                    clock.sent(source.next_due());
                    sender.send_video(source.next_frame()).await;
                }
            }
            (TrackKind::Audio, _, AudioMedia::Synthetic(config)) => {
                let mut source = AudioSource::new(config, published.ssrc, payload_type);
                let mut clock = PacingClock::new();
                let mut packets: u32 = 0;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(clock.due(AUDIO_FRAME * packets)) => {}
                        changed = connection.changed() => {
                            if changed.is_err() || stopped(&connection.borrow()) {
                                break;
                            }
                            continue;
                        }
                    }
                    clock.sent(AUDIO_FRAME * packets);
                    let packet = source.next_packet(Instant::now(), crate::unix_micros());
                    sender.send_audio(packet).await;
                    packets = packets.wrapping_add(1);
                }
            }
            (TrackKind::Audio, _, AudioMedia::File(clip)) => {
                let mut source = FileAudioSource::new(clip, published.ssrc, payload_type);
                let mut clock = PacingClock::new();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(clock.due(source.next_due())) => {}
                        changed = connection.changed() => {
                            if changed.is_err() || stopped(&connection.borrow()) {
                                break;
                            }
                            continue;
                        }
                    }
                    clock.sent(source.next_due());
                    sender.send_audio(source.next_packet()).await;
                }
            }
        }
        tracing::debug!(?kind, "sender stopped");
    })
}

/// Maps a source's media time (frames or packets sent so far, as time) to wall-clock
/// deadlines. A sender that wakes late sends what is due at once, catching up so the average
/// rate stays what was asked; one that fell behind by more than [`CATCH_UP_LIMIT`] slips
/// instead (a stalled process must not send seconds of media as one burst).
struct PacingClock {
    /// The wall-clock instant of media time zero (moves forward when slipping).
    origin: tokio::time::Instant,
}

impl PacingClock {
    fn new() -> Self {
        PacingClock {
            origin: tokio::time::Instant::now(),
        }
    }

    /// When the media at `media_time` is due.
    fn due(&self, media_time: std::time::Duration) -> tokio::time::Instant {
        self.origin + media_time
    }

    /// Makes the media at `media_time` due now (later media follows from here).
    fn restart(&mut self, media_time: std::time::Duration) {
        self.origin = tokio::time::Instant::now()
            .checked_sub(media_time)
            .unwrap_or(self.origin);
    }

    /// Called as the media at `media_time` is sent.
    fn sent(&mut self, media_time: std::time::Duration) {
        let late = tokio::time::Instant::now().saturating_duration_since(self.due(media_time));
        if late > CATCH_UP_LIMIT {
            self.origin += late;
        }
    }
}

/// Reads RTCP delivered to `track` and signals `requests` on every PLI/FIR.
fn spawn_rtcp_reader(
    track: Arc<TrackLocalStaticRTP>,
    kind: TrackKind,
    requests: Arc<Notify>,
    stats: StatsStore,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = track.poll().await {
            let TrackLocalEvent::OnRtcpPacket(packets) = event else {
                continue;
            };
            if packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
                tracing::debug!(?kind, "keyframe request");
                stats.update_sent(kind, |s| {
                    s.keyframe_requests += 1;
                    s.last_keyframe_request_at = Some(Instant::now());
                });
                requests.notify_one();
            }
        }
    })
}

/// Writes packets to a track and counts them.
struct Sender {
    /// Where packets go.
    track: Arc<TrackLocalStaticRTP>,
    /// Which stats entry to update.
    kind: TrackKind,
    /// Where sent counts go.
    stats: StatsStore,
    /// Audio level to attach to audio packets.
    audio_level: AudioLevel,
    /// Write failures so far (only the first few are logged loudly).
    errors: u64,
}

impl Sender {
    async fn send_video(&mut self, frame: crate::media::VideoFrame) {
        let mut sent = 0u64;
        let mut bytes = 0u64;
        for packet in frame.packets {
            let len = packet.payload.len() as u64;
            match self.track.write_rtp(packet).await {
                Ok(()) => {
                    sent += 1;
                    bytes += len;
                }
                Err(e) => self.on_error(e),
            }
        }
        let errors = self.errors;
        self.stats.update_sent(self.kind, |s| {
            s.packets += sent;
            s.bytes += bytes;
            s.frames += 1;
            if frame.keyframe {
                s.keyframes += 1;
            }
            s.write_errors = errors;
            if sent > 0 {
                s.first_sent_at.get_or_insert_with(Instant::now);
            }
        });
    }

    async fn send_audio(&mut self, packet: rtc::rtp::Packet) {
        let len = packet.payload.len() as u64;
        let result = match self.audio_level.get() {
            Some(level) => {
                let ext = HeaderExtension::AudioLevel(AudioLevelExtension {
                    level,
                    voice: level < 127,
                });
                self.track.write_rtp_with_extensions(packet, &[ext]).await
            }
            None => self.track.write_rtp(packet).await,
        };
        let ok = match result {
            Ok(()) => true,
            Err(e) => {
                self.on_error(e);
                false
            }
        };
        let errors = self.errors;
        self.stats.update_sent(self.kind, |s| {
            s.frames += 1;
            s.write_errors = errors;
            if ok {
                s.packets += 1;
                s.bytes += len;
                s.first_sent_at.get_or_insert_with(Instant::now);
            }
        });
    }

    fn on_error(&mut self, e: webrtc::error::Error) {
        self.errors += 1;
        if self.errors <= 3 {
            tracing::warn!(kind = ?self.kind, "write_rtp failed: {e}");
        } else {
            tracing::trace!(kind = ?self.kind, "write_rtp failed: {e}");
        }
    }
}
