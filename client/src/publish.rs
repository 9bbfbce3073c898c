//! Publishing media on a peer connection: adding a send-only VP8 or Opus track (VP8 also as
//! simulcast: several synthetic layers of different sizes on one track, told apart by rid),
//! and the task that paces its packets in real time (synthetic sources on a fixed frame clock,
//! file sources on the file's own clock), answers keyframe requests (PLI/FIR, per layer), and
//! counts what it sent.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
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
use crate::rtc_setup::{
    keyframe_request_ssrcs, negotiated_payload_type, new_local_track, new_simulcast_track,
    simulcast_extension_ids,
};
use crate::stats::{lock, SentLayerStats, StatsStore};
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
    /// The SSRC packets carry (for simulcast, the smallest layer's).
    pub ssrc: u32,
    /// Simulcast layers, smallest first, each with its SSRC (empty for a single stream).
    pub layers: Vec<(SimulcastLayer, u32)>,
}

/// One layer of a simulcast video track: a synthetic VP8 source of its own size and bitrate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulcastLayer {
    /// Its RTP stream id (`a=rid`): letters and digits, at most 16 (one header extension).
    pub rid: String,
    /// Width its keyframes announce.
    pub width: u16,
    /// Height its keyframes announce.
    pub height: u16,
    /// Target bitrate, bits per second.
    pub bitrate_bps: u32,
}

impl SimulcastLayer {
    /// A layer `rid` of `width`×`height` at `bitrate_bps`.
    pub fn new(rid: impl Into<String>, width: u16, height: u16, bitrate_bps: u32) -> Self {
        SimulcastLayer {
            rid: rid.into(),
            width,
            height,
            bitrate_bps,
        }
    }

    /// The three layers a browser sends of a 720p camera (rids as Chromium names them):
    /// q 320×180 at 150 kbit/s, h 640×360 at 500 kbit/s, f 1280×720 at 1.5 Mbit/s.
    pub fn three_layers() -> Vec<SimulcastLayer> {
        vec![
            SimulcastLayer::new("q", 320, 180, 150_000),
            SimulcastLayer::new("h", 640, 360, 500_000),
            SimulcastLayer::new("f", 1280, 720, 1_500_000),
        ]
    }
}

/// Largest width or height a VP8 keyframe header can carry (14 bits).
const VP8_MAX_DIMENSION: u16 = 0x3fff;
/// Most layers a simulcast track may have: as many as the server accepts (`a=rid` lines per
/// m-section) and the probe counter can name.
const MAX_SIMULCAST_LAYERS: usize = 16;

/// Checks a simulcast layer list, saying what is wrong: 2 to 16 layers, distinct rids of 1–16
/// letters or digits, sizes 1–16383, nonzero bitrates.
pub fn check_simulcast_layers(layers: &[SimulcastLayer]) -> Result<()> {
    let invalid = |why: String| Err(Error::InvalidConfig(why));
    if !(2..=MAX_SIMULCAST_LAYERS).contains(&layers.len()) {
        return invalid(format!(
            "simulcast needs 2 to {MAX_SIMULCAST_LAYERS} layers, got {}",
            layers.len()
        ));
    }
    for (i, layer) in layers.iter().enumerate() {
        let rid = &layer.rid;
        if rid.is_empty() || rid.len() > 16 || !rid.chars().all(|c| c.is_ascii_alphanumeric()) {
            return invalid(format!(
                "simulcast rid {rid:?}: use 1 to 16 ASCII letters or digits"
            ));
        }
        if layers[..i].iter().any(|l| l.rid == *rid) {
            return invalid(format!("simulcast rid {rid:?} is used twice"));
        }
        let sizes = 1..=VP8_MAX_DIMENSION;
        if !sizes.contains(&layer.width) || !sizes.contains(&layer.height) {
            return invalid(format!(
                "simulcast layer {rid:?}: {}x{} is not a VP8 frame size (1 to {VP8_MAX_DIMENSION})",
                layer.width, layer.height
            ));
        }
        if layer.bitrate_bps == 0 {
            return invalid(format!("simulcast layer {rid:?}: bitrate must be above 0"));
        }
    }
    Ok(())
}

/// A fresh track id of `kind`.
fn new_track_id(kind: TrackKind) -> String {
    format!(
        "{}-{:08x}",
        match kind {
            TrackKind::Audio => "audio",
            TrackKind::Video => "video",
        },
        crate::random_u64() as u32
    )
}

/// Adds `track` to `pc` as send-only in media stream `stream_id`; returns its transceiver
/// and sender.
async fn add_send_only(
    pc: &Arc<dyn PeerConnection>,
    track: &Arc<TrackLocalStaticRTP>,
    stream_id: &str,
) -> Result<(Arc<dyn RtpTransceiver>, Arc<dyn RtpSender>)> {
    let transceiver = pc
        .add_transceiver_from_track(
            Arc::clone(track) as Arc<dyn TrackLocal>,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Sendonly,
                streams: vec![stream_id.to_owned()],
                send_encodings: vec![],
            }),
        )
        .await?;
    let sender = transceiver.sender().await?.ok_or(Error::Stopped)?;
    Ok((transceiver, sender))
}

/// Adds the tracks `config` publishes (audio, then video: simulcast if it lists layers) to
/// `pc` in media stream `stream_id`, closing `pc` when one cannot be added.
pub(crate) async fn add_configured_tracks(
    pc: &Arc<dyn PeerConnection>,
    config: &crate::PeerConfig,
    stream_id: &str,
) -> Result<Vec<PublishedTrack>> {
    let mut kinds = vec![];
    if config.publish_audio {
        kinds.push(TrackKind::Audio);
    }
    if config.publish_video {
        kinds.push(TrackKind::Video);
    }
    let mut published = Vec::with_capacity(kinds.len());
    for kind in kinds {
        let added = if kind == TrackKind::Video && !config.simulcast.is_empty() {
            add_simulcast_video_track(pc, stream_id, &config.simulcast).await
        } else {
            add_published_track(pc, kind, stream_id).await
        };
        match added {
            Ok(track) => published.push(track),
            Err(e) => {
                // A webrtc-rs connection is not stopped by dropping it.
                let _ = pc.close().await;
                return Err(e);
            }
        }
    }
    Ok(published)
}

/// Adds a send-only track of `kind` in media stream `stream_id` to `pc`.
pub async fn add_published_track(
    pc: &Arc<dyn PeerConnection>,
    kind: TrackKind,
    stream_id: &str,
) -> Result<PublishedTrack> {
    let ssrc = (crate::random_u64() as u32).max(1);
    let track = new_local_track(kind, stream_id, &new_track_id(kind), ssrc);
    let (transceiver, sender) = add_send_only(pc, &track, stream_id).await?;
    Ok(PublishedTrack {
        kind,
        track,
        sender,
        transceiver,
        ssrc,
        layers: Vec::new(),
    })
}

/// Adds a send-only VP8 track in media stream `stream_id` to `pc` that sends `layers` as
/// simulcast (listed smallest first). Fails with [`Error::InvalidConfig`] on a bad layer list.
pub async fn add_simulcast_video_track(
    pc: &Arc<dyn PeerConnection>,
    stream_id: &str,
    layers: &[SimulcastLayer],
) -> Result<PublishedTrack> {
    check_simulcast_layers(layers)?;
    let mut ssrcs: Vec<u32> = Vec::with_capacity(layers.len());
    while ssrcs.len() < layers.len() {
        let ssrc = (crate::random_u64() as u32).max(1);
        if !ssrcs.contains(&ssrc) {
            ssrcs.push(ssrc);
        }
    }
    let rids: Vec<(String, u32)> = layers
        .iter()
        .zip(&ssrcs)
        .map(|(l, ssrc)| (l.rid.clone(), *ssrc))
        .collect();
    let track = new_simulcast_track(stream_id, &new_track_id(TrackKind::Video), &rids);
    let (transceiver, sender) = add_send_only(pc, &track, stream_id).await?;
    Ok(PublishedTrack {
        kind: TrackKind::Video,
        track,
        sender,
        transceiver,
        ssrc: ssrcs[0],
        layers: layers.iter().cloned().zip(ssrcs).collect(),
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
        // Before the RTCP reader starts, so it can count every request per layer.
        stats.update_sent(kind, |s| {
            s.ssrc = published.ssrc;
            s.layers = published
                .layers
                .iter()
                .map(|(layer, ssrc)| SentLayerStats {
                    rid: layer.rid.clone(),
                    ssrc: *ssrc,
                    frame_size: (layer.width, layer.height),
                    ..SentLayerStats::default()
                })
                .collect();
        });
        tracing::debug!(?kind, payload_type, ssrc = published.ssrc, "sending");

        let requests = Arc::new(KeyframeRequests::default());
        let _reader = AbortOnDrop(spawn_rtcp_reader(
            Arc::clone(&published.track),
            kind,
            Arc::clone(&requests),
            stats.clone(),
        ));
        let mut sender = Sender {
            track: Arc::clone(&published.track),
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
            (TrackKind::Video, VideoMedia::Synthetic(config), _)
                if !published.layers.is_empty() =>
            {
                send_simulcast(
                    &published,
                    config,
                    payload_type,
                    &mut sender,
                    &requests,
                    &mut connection,
                )
                .await;
            }
            (TrackKind::Video, VideoMedia::Synthetic(config), _) => {
                let mut source = VideoSource::new(config, published.ssrc, payload_type);
                let frame_interval = source.config().frame_interval();
                let mut clock = PacingClock::new();
                let mut frames: u32 = 0;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(clock.due(frame_interval * frames)) => {}
                        _ = requests.notified() => {
                            requests.take();
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
                            requests.take();
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

/// Keyframe requests on their way from the RTCP reader to the sending loop: which SSRCs were
/// asked for since the loop last looked.
#[derive(Default)]
struct KeyframeRequests {
    /// Requested SSRCs, in arrival order.
    ssrcs: Mutex<Vec<u32>>,
    /// Wakes the sending loop.
    notify: Notify,
}

impl KeyframeRequests {
    fn push(&self, ssrcs: &[u32]) {
        lock(&self.ssrcs).extend_from_slice(ssrcs);
        self.notify.notify_one();
    }

    async fn notified(&self) {
        self.notify.notified().await;
    }

    /// The SSRCs requested since the last call.
    fn take(&self) -> Vec<u32> {
        std::mem::take(&mut *lock(&self.ssrcs))
    }
}

/// Reads RTCP delivered to `track` and passes on every PLI/FIR to `requests`.
fn spawn_rtcp_reader(
    track: Arc<TrackLocalStaticRTP>,
    kind: TrackKind,
    requests: Arc<KeyframeRequests>,
    stats: StatsStore,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(event) = track.poll().await {
            let TrackLocalEvent::OnRtcpPacket(packets) = event else {
                continue;
            };
            let ssrcs: Vec<u32> = packets
                .iter()
                .flat_map(|p| keyframe_request_ssrcs(p.as_ref()))
                .collect();
            if ssrcs.is_empty() {
                continue;
            }
            tracing::debug!(?kind, ?ssrcs, "keyframe request");
            stats.update_sent(kind, |s| {
                s.keyframe_requests += 1;
                s.last_keyframe_request_at = Some(Instant::now());
                for layer in &mut s.layers {
                    if ssrcs.contains(&layer.ssrc) {
                        layer.keyframe_requests += 1;
                    }
                }
            });
            requests.push(&ssrcs);
        }
    })
}

/// Sends a simulcast track: one synthetic VP8 source per layer, all on one frame clock, each
/// packet tagged with the mid and its layer's rid (the SDP names no SSRCs, so that is how the
/// receiver tells the layers apart). A keyframe request makes a keyframe on the layers it
/// names only.
async fn send_simulcast(
    published: &PublishedTrack,
    base: VideoConfig,
    payload_type: u8,
    sender: &mut Sender,
    requests: &KeyframeRequests,
    connection: &mut watch::Receiver<RTCPeerConnectionState>,
) {
    let (mid_id, rid_id) = simulcast_extension_ids(&published.sender).await;
    let mid = published.transceiver.mid().await.ok().flatten();
    if rid_id.is_none() || mid_id.is_none() || mid.is_none() {
        tracing::warn!(
            ?mid_id,
            ?rid_id,
            ?mid,
            "the mid or rid header extension was not negotiated: the receiver cannot tell the \
             simulcast layers apart"
        );
    }
    let mut layers: Vec<(VideoSource, Vec<(u8, Bytes)>)> = published
        .layers
        .iter()
        .enumerate()
        .map(|(index, (layer, ssrc))| {
            let config = VideoConfig {
                width: layer.width,
                height: layer.height,
                bitrate_bps: layer.bitrate_bps,
                layer: index as u8,
                ..base.clone()
            };
            let mut extensions = Vec::new();
            if let (Some(id), Some(mid)) = (mid_id, &mid) {
                extensions.push((id, Bytes::from(mid.clone())));
            }
            if let Some(id) = rid_id {
                extensions.push((id, Bytes::from(layer.rid.clone())));
            }
            (VideoSource::new(config, *ssrc, payload_type), extensions)
        })
        .collect();
    let frame_interval = base.frame_interval();
    let mut clock = PacingClock::new();
    let mut frames: u32 = 0;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(clock.due(frame_interval * frames)) => {}
            _ = requests.notified() => {
                let asked = requests.take();
                let now = Instant::now();
                let mut overdue = false;
                for (source, _) in &mut layers {
                    if asked.contains(&source.ssrc()) {
                        source.request_keyframe();
                        // One just sent answers it, and the next frame due makes another.
                        overdue |= source
                            .last_keyframe()
                            .is_none_or(|k| now.duration_since(k) >= frame_interval);
                    }
                }
                if !overdue {
                    continue;
                }
                // At once, and restart the frame clock from here.
                clock.restart(frame_interval * frames);
            }
            changed = connection.changed() => {
                let stopped = changed.is_err()
                    || matches!(
                        *connection.borrow(),
                        RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
                    );
                if stopped {
                    break;
                }
                continue;
            }
        }
        clock.sent(frame_interval * frames);
        let now = Instant::now();
        let now_us = crate::unix_micros();
        for (index, (source, extensions)) in layers.iter_mut().enumerate() {
            let frame = source.next_frame(now, now_us);
            sender
                .send_video_layer(frame, Some((index, extensions.as_slice())))
                .await;
        }
        frames = frames.wrapping_add(1);
    }
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
        self.send_video_layer(frame, None).await;
    }

    /// Sends a frame; for a simulcast layer, `layer` is its index and the header extensions
    /// its packets carry.
    async fn send_video_layer(
        &mut self,
        frame: crate::media::VideoFrame,
        layer: Option<(usize, &[(u8, Bytes)])>,
    ) {
        let mut sent = 0u64;
        let mut bytes = 0u64;
        for mut packet in frame.packets {
            let len = packet.payload.len() as u64;
            for (id, value) in layer.map_or(&[][..], |(_, extensions)| extensions) {
                if let Err(e) = packet.header.set_extension(*id, value.clone()) {
                    tracing::debug!("header extension {id} not set: {e}");
                }
            }
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
            if let Some(l) = layer.and_then(|(index, _)| s.layers.get_mut(index)) {
                l.packets += sent;
                l.bytes += bytes;
                if frame.keyframe {
                    l.keyframes += 1;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulcast_layer_lists_are_checked_with_a_reason() {
        assert!(check_simulcast_layers(&SimulcastLayer::three_layers()).is_ok());
        let reason = |layers: Vec<SimulcastLayer>| match check_simulcast_layers(&layers) {
            Err(Error::InvalidConfig(why)) => why,
            other => panic!("{layers:?} was not refused: {other:?}"),
        };
        let q = SimulcastLayer::new("q", 320, 180, 150_000);
        assert!(reason(vec![q.clone()]).contains("2 to 16 layers"));
        assert!(reason(vec![q.clone(); 17]).contains("2 to 16 layers"));
        assert!(reason(vec![q.clone(), q.clone()]).contains("used twice"));
        let rid = |r: &str| SimulcastLayer::new(r, 640, 360, 500_000);
        for bad in ["", "h;1", "a-very-long-rid-name", "h\u{e9}"] {
            assert!(
                reason(vec![q.clone(), rid(bad)]).contains("ASCII letters or digits"),
                "{bad:?}"
            );
        }
        let size = SimulcastLayer::new("f", 20_000, 720, 1_500_000);
        assert!(reason(vec![q.clone(), size]).contains("not a VP8 frame size"));
        let silent = SimulcastLayer::new("f", 1280, 720, 0);
        assert!(reason(vec![q, silent]).contains("bitrate"));
    }
}
