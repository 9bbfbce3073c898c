//! `HeadlessPeer`: one participant that joins a room through the signaling server the way a
//! browser does (a `publisher` connection it offers, a `subscriber` connection the server
//! offers, trickle ICE both ways), publishes synthetic media, records what it receives, and
//! keeps the room as the server describes it so tests can wait for conditions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use signaling::protocol::{
    ClientMessage, ErrorCode, IceCandidate, PcName, Quality, ServerMessage, Track, TrackKind,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceConnectionState, RTCIceGatheringState,
    RTCPeerConnectionIceEvent, RTCPeerConnectionState, RTCSessionDescription,
};

use crate::media::{AudioConfig, VideoConfig};
use crate::media_file::{IvfClip, OggOpusClip};
use crate::publish::{
    add_configured_tracks, check_simulcast_layers, spawn_sender, AudioLevel, AudioMedia,
    PublishedTrack, SendOptions, SimulcastLayer, VideoMedia,
};
use crate::rtc_setup::{
    build_peer_connection, candidate_from_wire, candidate_to_wire, sdp_mid_and_ufrag, PcOptions,
};
use crate::signal::{SignalClient, SignalEvent};
use crate::stats::{lock, PeerStats, SentStats, StatsStore, TrackKey, TrackStats};
use crate::{Error, Result};

/// How a headless peer joins and what it publishes.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// The signaling WebSocket, e.g. `ws://127.0.0.1:8080/ws`.
    pub url: String,
    /// Room to join.
    pub room: String,
    /// Display name.
    pub name: String,
    /// Credential, when the server requires one.
    pub token: Option<String>,
    /// Publish a synthetic VP8 track.
    pub publish_video: bool,
    /// Publish a synthetic Opus track.
    pub publish_audio: bool,
    /// Target bitrate of the video payloads.
    pub video_bitrate_bps: u32,
    /// A keyframe at least this often (plus one per PLI/FIR).
    pub keyframe_interval: Option<Duration>,
    /// Audio level written on audio packets (−dBov: 0 loudest, 127 silence; `None`: none).
    pub audio_level: Option<u8>,
    /// How long to wait for `joined`.
    pub join_timeout: Duration,
    /// Use the `ice_servers` of `joined` (off: host candidates only, nothing leaves loopback).
    pub use_server_ice_servers: bool,
    /// Peer connection settings (local sockets).
    pub pc: PcOptions,
    /// Publish this VP8 clip instead of synthetic video (set by [`PeerConfig::video_file`]).
    pub video_clip: Option<Arc<IvfClip>>,
    /// Publish this Opus clip instead of synthetic audio (set by [`PeerConfig::audio_file`]).
    pub audio_clip: Option<Arc<OggOpusClip>>,
    /// Read the synthetic probes out of received payloads (loss and one-way latency). Off when
    /// the room carries real media, whose bytes could now and then look like a probe.
    pub read_probes: bool,
    /// Publish the video as simulcast with these layers, smallest first (empty: one stream of
    /// `video_bitrate_bps`). Synthetic video only.
    pub simulcast: Vec<SimulcastLayer>,
}

impl PeerConfig {
    /// A peer publishing audio and 500 kbit/s video, with the defaults of everything else.
    pub fn new(url: impl Into<String>, room: impl Into<String>, name: impl Into<String>) -> Self {
        PeerConfig {
            url: url.into(),
            room: room.into(),
            name: name.into(),
            token: None,
            publish_video: true,
            publish_audio: true,
            video_bitrate_bps: 500_000,
            keyframe_interval: Some(Duration::from_secs(2)),
            audio_level: Some(127),
            join_timeout: Duration::from_secs(10),
            use_server_ice_servers: false,
            pc: PcOptions::default(),
            video_clip: None,
            audio_clip: None,
            read_probes: true,
            simulcast: Vec::new(),
        }
    }

    /// Publishes the video as simulcast in the three layers a browser sends of a 720p camera
    /// ([`SimulcastLayer::three_layers`]).
    pub fn simulcast(self) -> Self {
        self.simulcast_layers(SimulcastLayer::three_layers())
    }

    /// Publishes the video as simulcast with `layers`, smallest first.
    pub fn simulcast_layers(mut self, layers: Vec<SimulcastLayer>) -> Self {
        self.simulcast = layers;
        self
    }

    /// Refuses combinations that cannot work, before anything connects.
    fn check(&self) -> Result<()> {
        if self.simulcast.is_empty() {
            return Ok(());
        }
        check_simulcast_layers(&self.simulcast)?;
        if self.video_clip.is_some() {
            return Err(Error::InvalidConfig(
                "simulcast sends synthetic layers; it cannot publish a video file".into(),
            ));
        }
        Ok(())
    }

    /// Publishes the VP8 clip of an IVF file (looped, paced by its timestamps) as video.
    /// Fails if the file cannot be read or is not VP8 IVF.
    pub fn video_file(self, path: impl AsRef<std::path::Path>) -> Result<Self> {
        Ok(self.video_clip(IvfClip::open(path)?))
    }

    /// Publishes an already loaded VP8 clip as video (many peers can share one clip).
    pub fn video_clip(mut self, clip: Arc<IvfClip>) -> Self {
        self.video_clip = Some(clip);
        self.publish_video = true;
        self
    }

    /// Publishes the Opus packets of an Ogg file (looped, paced by packet durations) as
    /// audio. Fails if the file cannot be read or is not Ogg Opus.
    pub fn audio_file(self, path: impl AsRef<std::path::Path>) -> Result<Self> {
        Ok(self.audio_clip(OggOpusClip::open(path)?))
    }

    /// Publishes an already loaded Opus clip as audio.
    pub fn audio_clip(mut self, clip: Arc<OggOpusClip>) -> Self {
        self.audio_clip = Some(clip);
        self.publish_audio = true;
        self
    }

    /// Only watches: publishes nothing (and never opens the publisher connection).
    pub fn watcher(mut self) -> Self {
        self.publish_video = false;
        self.publish_audio = false;
        self
    }

    /// Sets what is published.
    pub fn publish(mut self, video: bool, audio: bool) -> Self {
        self.publish_video = video;
        self.publish_audio = audio;
        self
    }

    /// Sets the video bitrate.
    pub fn video_bitrate(mut self, bps: u32) -> Self {
        self.video_bitrate_bps = bps;
        self
    }

    /// Sets the token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// What the video sender publishes (a clip, or synthetic VP8 at the configured bitrate).
    pub(crate) fn video_media(&self) -> VideoMedia {
        match &self.video_clip {
            Some(clip) => VideoMedia::File(Arc::clone(clip)),
            None => VideoMedia::Synthetic(VideoConfig {
                bitrate_bps: self.video_bitrate_bps,
                keyframe_interval: self.keyframe_interval,
                ..VideoConfig::default()
            }),
        }
    }

    /// What the audio sender publishes (a clip, or synthetic Opus).
    pub(crate) fn audio_media(&self) -> AudioMedia {
        match &self.audio_clip {
            Some(clip) => AudioMedia::File(Arc::clone(clip)),
            None => AudioMedia::Synthetic(AudioConfig::default()),
        }
    }
}

/// Another participant as the server described it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParticipantInfo {
    /// Display name.
    pub name: String,
    /// Published tracks by track id.
    pub tracks: BTreeMap<String, Track>,
}

/// A chat line received.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatLine {
    /// Sender.
    pub participant_id: String,
    /// Sender's name.
    pub name: String,
    /// Text.
    pub text: String,
    /// Server time, Unix milliseconds.
    pub ts: u64,
}

/// The room as this peer knows it, updated from every server message.
#[derive(Debug, Clone, Default)]
pub struct RoomState {
    /// Our id.
    pub participant_id: String,
    /// Our room.
    pub room: String,
    /// Everyone else, by participant id.
    pub participants: BTreeMap<String, ParticipantInfo>,
    /// Participants that left, in order.
    pub left: Vec<String>,
    /// Our own tracks (with `mid`), by track id.
    pub own_tracks: BTreeMap<String, Track>,
    /// Chat lines, in order.
    pub chats: Vec<ChatLine>,
    /// `error` messages, in order.
    pub errors: Vec<(ErrorCode, String)>,
    /// The last `active_speakers`.
    pub active_speakers: Vec<String>,
    /// How many `active_speakers` messages arrived.
    pub active_speaker_updates: u64,
    /// Subscriber offers received.
    pub subscriber_offers: u64,
    /// Subscriber offers answered.
    pub subscriber_answers: u64,
    /// Publisher offers sent.
    pub publisher_offers: u64,
    /// Publisher answers applied.
    pub publisher_answers: u64,
    /// Server candidates received (per connection: publisher, subscriber).
    pub remote_candidates: (u64, u64),
    /// The publisher connection's state (`None`: no publisher connection).
    pub publisher_state: Option<RTCPeerConnectionState>,
    /// The subscriber connection's state.
    pub subscriber_state: RTCPeerConnectionState,
    /// Things that went wrong on our side (SDP that could not be applied, unparseable frames).
    pub local_errors: Vec<String>,
    /// Set when the signaling socket closed: the close code, if any.
    pub closed: Option<Option<u16>>,
    /// Tracks of others listed in `joined` (media was available the moment we joined).
    pub remote_tracks_at_join: usize,
    /// When the first track of another participant became known: at `joined` if it listed
    /// one, else at the first such `track_published`.
    pub first_remote_track_at: Option<Instant>,
}

impl RoomState {
    /// Our own track of `kind`, if the server announced one.
    pub fn own_track(&self, kind: TrackKind) -> Option<&Track> {
        self.own_tracks.values().find(|t| t.kind == kind)
    }

    /// Every track of others: (publisher id, track).
    pub fn remote_tracks(&self) -> impl Iterator<Item = (&String, &Track)> {
        self.participants
            .iter()
            .flat_map(|(id, p)| p.tracks.values().map(move |t| (id, t)))
    }

    /// Whether the server has sent an `error` with `code`.
    pub fn has_error(&self, code: ErrorCode) -> bool {
        self.errors.iter().any(|(c, _)| *c == code)
    }
}

/// What the outbox task writes.
enum Outgoing {
    /// A message for the server.
    Message(ClientMessage),
    /// Signals once everything queued before it has been written.
    Flush(oneshot::Sender<()>),
}

/// The queue of messages for the server (written in order by one task).
#[derive(Clone)]
struct Outbox(mpsc::UnboundedSender<Outgoing>);

impl Outbox {
    fn send(&self, message: ClientMessage) -> Result<()> {
        self.0
            .send(Outgoing::Message(message))
            .map_err(|_| Error::Stopped)
    }

    /// Waits up to `timeout` until everything queued so far has been written.
    async fn flush(&self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Outgoing::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(timeout, rx).await;
        }
    }
}

/// Candidates a connection gathered before its offer or answer was sent wait here, so the
/// server always sees the description first; also labels candidates with mid and ufrag.
#[derive(Debug, Default)]
struct CandidateGate {
    /// The offer/answer has been queued for sending.
    open: bool,
    /// First mid of the local description.
    mid: Option<String>,
    /// ICE ufrag of the local description.
    ufrag: Option<String>,
    /// Held candidates (`None`: end of candidates).
    held: Vec<Option<IceCandidate>>,
}

/// The event handler of one of our peer connections.
struct PcHandler {
    /// Which connection.
    pc: PcName,
    /// Outgoing signaling.
    outbox: Outbox,
    /// Ordering and labels for our candidates.
    gate: Arc<Mutex<CandidateGate>>,
    /// Room state (connection states go here).
    state: Arc<watch::Sender<RoomState>>,
    /// Connection state for the senders.
    conn: Arc<watch::Sender<RTCPeerConnectionState>>,
    /// Where received tracks are recorded.
    stats: StatsStore,
    /// Recording tasks, aborted on leave.
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl CandidateGate {
    /// `candidate` with the local description's mid and ufrag filled in.
    fn label(&self, candidate: Option<IceCandidate>) -> Option<IceCandidate> {
        candidate.map(|c| IceCandidate {
            sdp_mid: c.sdp_mid.or_else(|| self.mid.clone()),
            username_fragment: c.username_fragment.or_else(|| self.ufrag.clone()),
            ..c
        })
    }
}

impl PcHandler {
    fn emit(&self, candidate: Option<IceCandidate>) {
        let mut gate = lock(&self.gate);
        if !gate.open {
            gate.held.push(candidate);
            return;
        }
        let _ = self.outbox.send(ClientMessage::Candidate {
            pc: self.pc,
            candidate: gate.label(candidate),
        });
    }
}

#[async_trait]
impl PeerConnectionEventHandler for PcHandler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        match event.candidate.to_json() {
            Ok(init) => {
                tracing::trace!(pc = self.pc.as_str(), "local candidate {}", init.candidate);
                self.emit(Some(candidate_to_wire(init, None, None)));
            }
            Err(e) => tracing::warn!(pc = self.pc.as_str(), "bad local candidate: {e}"),
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.emit(None);
        }
    }

    async fn on_ice_connection_state_change(&self, state: RTCIceConnectionState) {
        tracing::debug!(pc = self.pc.as_str(), "ice connection state {state}");
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        tracing::debug!(pc = self.pc.as_str(), "connection state {state}");
        self.conn.send_replace(state);
        self.state.send_modify(|s| match self.pc {
            PcName::Publisher => s.publisher_state = Some(state),
            PcName::Subscriber => s.subscriber_state = state,
        });
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let stats = self.stats.clone();
        let task = tokio::spawn(async move { stats.record_track(track).await });
        lock(&self.tasks).push(task);
    }
}

/// One of our two peer connections with what the signaling loop needs for it.
struct PcSlot {
    /// The connection.
    pc: Arc<dyn PeerConnection>,
    /// Its candidate gate.
    gate: Arc<Mutex<CandidateGate>>,
    /// Its state, for senders and waiters.
    conn: Arc<watch::Sender<RTCPeerConnectionState>>,
}

impl PcSlot {
    async fn new(
        name: PcName,
        options: &PcOptions,
        outbox: &Outbox,
        state: &Arc<watch::Sender<RoomState>>,
        stats: &StatsStore,
        tasks: &Arc<Mutex<Vec<JoinHandle<()>>>>,
    ) -> Result<PcSlot> {
        let gate = Arc::new(Mutex::new(CandidateGate::default()));
        let conn = Arc::new(watch::Sender::new(RTCPeerConnectionState::New));
        let handler = Arc::new(PcHandler {
            pc: name,
            outbox: outbox.clone(),
            gate: Arc::clone(&gate),
            state: Arc::clone(state),
            conn: Arc::clone(&conn),
            stats: stats.clone(),
            tasks: Arc::clone(tasks),
        });
        let pc = build_peer_connection(options, handler).await?;
        Ok(PcSlot { pc, gate, conn })
    }

    /// Records the local description's mid/ufrag before it is applied (candidates follow it).
    fn remember_local_description(&self, sdp: &str) {
        let (mid, ufrag) = sdp_mid_and_ufrag(sdp);
        let mut gate = lock(&self.gate);
        gate.mid = mid;
        gate.ufrag = ufrag;
    }

    /// After the description was queued: lets held candidates go, in order.
    fn open(&self, name: PcName, outbox: &Outbox) {
        let mut gate = lock(&self.gate);
        if gate.open {
            return;
        }
        gate.open = true;
        for candidate in std::mem::take(&mut gate.held) {
            let _ = outbox.send(ClientMessage::Candidate {
                pc: name,
                candidate: gate.label(candidate),
            });
        }
    }
}

/// Shared between the handle and the tasks.
struct Inner {
    /// Our id.
    participant_id: String,
    /// The socket.
    signal: Arc<SignalClient>,
    /// Outgoing messages, in order.
    outbox: Outbox,
    /// Present when publishing.
    publisher: Option<PcSlot>,
    /// Always present.
    subscriber: PcSlot,
    /// What we published.
    published: Vec<PublishedTrack>,
    /// The room as we know it.
    state: Arc<watch::Sender<RoomState>>,
    /// Every server message, in order.
    log: Mutex<Vec<ServerMessage>>,
    /// Every server message, to subscribers.
    events: broadcast::Sender<ServerMessage>,
    /// Measurements.
    stats: StatsStore,
    /// The audio level the audio sender writes.
    audio_level: AudioLevel,
}

/// A participant without a browser. See the module docs.
pub struct HeadlessPeer {
    /// State shared with the tasks.
    inner: Arc<Inner>,
    /// Signaling, sending and recording tasks, aborted on leave or drop.
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Set by `leave`/`disconnect`, so drop does not clean up twice.
    finished: bool,
}

impl HeadlessPeer {
    /// Connects, joins `config.room`, and (if publishing) offers the publisher connection.
    /// Returns once `joined` arrived and the offer is sent; media starts when ICE connects.
    /// A server `error` instead of `joined` is `Err(Error::Server { .. })`.
    pub async fn join(config: PeerConfig) -> Result<HeadlessPeer> {
        config.check()?;
        let signal = Arc::new(SignalClient::connect(&config.url).await?);
        signal
            .send(&ClientMessage::Join {
                room: config.room.clone(),
                name: config.name.clone(),
                token: config.token.clone(),
            })
            .await?;
        let mut early = Vec::new();
        let deadline = tokio::time::Instant::now() + config.join_timeout;
        let (participant_id, room, participants, ice_servers) = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, signal.recv_event()).await {
                Err(_) => return Err(Error::Timeout("joined")),
                Ok(SignalEvent::Message(ServerMessage::Joined {
                    participant_id,
                    room,
                    participants,
                    ice_servers,
                })) => break (participant_id, room, participants, ice_servers),
                Ok(SignalEvent::Message(ServerMessage::Error { code, message })) => {
                    return Err(Error::Server { code, message })
                }
                Ok(SignalEvent::Message(other)) => early.push(other),
                Ok(SignalEvent::Closed { code, .. }) => return Err(Error::Closed(code)),
                Ok(SignalEvent::Unparsed(_) | SignalEvent::Binary(_)) => {}
            }
        };
        tracing::debug!(%participant_id, %room, "joined");

        let remote_tracks_at_join = participants.iter().map(|p| p.tracks.len()).sum();
        let mut initial = RoomState {
            participant_id: participant_id.clone(),
            room,
            remote_tracks_at_join,
            first_remote_track_at: (remote_tracks_at_join > 0).then(Instant::now),
            ..RoomState::default()
        };
        for p in participants {
            initial.participants.insert(
                p.participant_id.clone(),
                ParticipantInfo {
                    name: p.name,
                    tracks: p
                        .tracks
                        .into_iter()
                        .map(|t| (t.track_id.clone(), t))
                        .collect(),
                },
            );
        }
        let publishing = config.publish_video || config.publish_audio;
        if publishing {
            initial.publisher_state = Some(RTCPeerConnectionState::New);
        }
        let state = Arc::new(watch::Sender::new(initial));
        let stats = StatsStore::new(config.read_probes);
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (outbox_tx, outbox_rx) = mpsc::unbounded_channel();
        let outbox = Outbox(outbox_tx);

        let mut pc_options = config.pc.clone();
        if config.use_server_ice_servers {
            pc_options.ice_servers = ice_servers;
        }
        let subscriber = PcSlot::new(
            PcName::Subscriber,
            &pc_options,
            &outbox,
            &state,
            &stats,
            &tasks,
        )
        .await?;
        let mut published = Vec::new();
        let publisher = if publishing {
            let built = async {
                let slot = PcSlot::new(
                    PcName::Publisher,
                    &pc_options,
                    &outbox,
                    &state,
                    &stats,
                    &tasks,
                )
                .await?;
                published = add_configured_tracks(&slot.pc, &config, &participant_id).await?;
                Ok(slot)
            }
            .await;
            match built {
                Ok(slot) => Some(slot),
                Err(e) => {
                    // A webrtc-rs connection is not stopped by dropping it.
                    let _ = subscriber.pc.close().await;
                    return Err(e);
                }
            }
        } else {
            None
        };

        let (events, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            participant_id,
            signal: Arc::clone(&signal),
            outbox,
            publisher,
            subscriber,
            published,
            state,
            log: Mutex::new(Vec::new()),
            events,
            stats,
            audio_level: AudioLevel::new(config.audio_level),
        });

        {
            let mut t = lock(&tasks);
            t.push(tokio::spawn(run_outbox(Arc::clone(&signal), outbox_rx)));
            t.push(tokio::spawn(run_signaling(Arc::clone(&inner), early)));
        }
        // From here on, an early return drops the peer, whose `Drop` stops everything.
        let peer = HeadlessPeer {
            inner: Arc::clone(&inner),
            tasks: Arc::clone(&tasks),
            finished: false,
        };

        if let Some(publisher) = &inner.publisher {
            let options = SendOptions {
                video: config.video_media(),
                audio: config.audio_media(),
                audio_level: inner.audio_level.clone(),
            };
            for p in &inner.published {
                let task = spawn_sender(
                    p.clone(),
                    options.clone(),
                    inner.stats.clone(),
                    publisher.conn.subscribe(),
                );
                lock(&tasks).push(task);
            }
            let offer = publisher.pc.create_offer(None).await?;
            publisher.remember_local_description(&offer.sdp);
            publisher.pc.set_local_description(offer.clone()).await?;
            inner.outbox.send(ClientMessage::Offer {
                pc: PcName::Publisher,
                sdp: offer.sdp,
            })?;
            publisher.open(PcName::Publisher, &inner.outbox);
            inner.state.send_modify(|s| s.publisher_offers += 1);
        }
        Ok(peer)
    }

    /// Our participant id.
    pub fn participant_id(&self) -> &str {
        &self.inner.participant_id
    }

    /// A snapshot of the room as we know it.
    pub fn state(&self) -> RoomState {
        self.inner.state.borrow().clone()
    }

    /// A snapshot of the measurements.
    pub fn stats(&self) -> PeerStats {
        self.inner.stats.snapshot()
    }

    /// Calls `f` with each received track's stats in turn, without copying them: the cheap way
    /// to poll many peers often.
    pub fn for_each_received_track(&self, f: impl FnMut(&TrackKey, &TrackStats)) {
        self.inner.stats.for_each_received(f);
    }

    /// The stats of what we publish, by kind.
    pub fn sent_stats(&self) -> std::collections::HashMap<TrackKind, SentStats> {
        self.inner.stats.sent()
    }

    /// Reads the room state without copying it (the state cannot change meanwhile, so keep `f`
    /// short).
    pub fn with_state<R>(&self, f: impl FnOnce(&RoomState) -> R) -> R {
        f(&self.inner.state.borrow())
    }

    /// Every server message received since joining (after `joined`), in order.
    pub fn events(&self) -> Vec<ServerMessage> {
        lock(&self.inner.log).clone()
    }

    /// Server messages from now on.
    pub fn subscribe_events(&self) -> broadcast::Receiver<ServerMessage> {
        self.inner.events.subscribe()
    }

    /// Watches the room state.
    pub fn watch_state(&self) -> watch::Receiver<RoomState> {
        self.inner.state.subscribe()
    }

    /// The server's track id for our published track of `kind`.
    pub fn own_track_id(&self, kind: TrackKind) -> Option<String> {
        self.inner
            .state
            .borrow()
            .own_track(kind)
            .map(|t| t.track_id.clone())
    }

    /// The SSRCs we publish, by kind.
    pub fn published_ssrcs(&self) -> Vec<(TrackKind, u32)> {
        self.inner
            .published
            .iter()
            .map(|p| (p.kind, p.ssrc))
            .collect()
    }

    /// Waits until `predicate` holds for the room state; `false` on timeout.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut predicate: impl FnMut(&RoomState) -> bool,
    ) -> bool {
        let mut rx = self.inner.state.subscribe();
        let result = tokio::time::timeout(timeout, rx.wait_for(|s| predicate(s))).await;
        matches!(result, Ok(Ok(_)))
    }

    /// Waits until `predicate` holds for the measurements (checked every 20 ms); `false` on
    /// timeout.
    pub async fn wait_for_stats(
        &self,
        timeout: Duration,
        mut predicate: impl FnMut(&PeerStats) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if predicate(&self.stats()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until our publisher is connected and the server announced every track we publish
    /// (with its track id); `false` on timeout or when not publishing.
    pub async fn wait_publishing(&self, timeout: Duration) -> bool {
        let kinds: Vec<TrackKind> = self.inner.published.iter().map(|p| p.kind).collect();
        if kinds.is_empty() {
            return false;
        }
        self.wait_for(timeout, |s| {
            s.publisher_state == Some(RTCPeerConnectionState::Connected)
                && kinds.iter().all(|k| s.own_track(*k).is_some())
        })
        .await
    }

    /// Waits until, from `publisher`, at least `tracks` tracks have each delivered at least
    /// `packets` packets; `false` on timeout.
    pub async fn wait_media_from(
        &self,
        publisher: &str,
        tracks: usize,
        packets: u64,
        timeout: Duration,
    ) -> bool {
        self.wait_for_stats(timeout, |s| {
            s.from_publisher(publisher)
                .filter(|(_, t)| t.packets >= packets)
                .count()
                >= tracks
        })
        .await
    }

    /// Queues a message for the server.
    pub fn send(&self, message: ClientMessage) -> Result<()> {
        self.inner.outbox.send(message)
    }

    /// Sends `text` verbatim, bypassing the queue (for malformed-input tests).
    pub async fn send_raw(&self, text: &str) -> Result<()> {
        self.inner.signal.send_raw(text).await
    }

    /// Asks the server to stop or resume forwarding our track `track_id`.
    pub fn mute(&self, track_id: &str, muted: bool) -> Result<()> {
        self.send(ClientMessage::Mute {
            track_id: track_id.to_owned(),
            muted,
        })
    }

    /// [`mute`](Self::mute) for our track of `kind`; `Ok(false)` if its id is not known yet.
    pub fn mute_kind(&self, kind: TrackKind, muted: bool) -> Result<bool> {
        match self.own_track_id(kind) {
            Some(id) => self.mute(&id, muted).map(|()| true),
            None => Ok(false),
        }
    }

    /// Sends a chat line.
    pub fn chat(&self, text: &str) -> Result<()> {
        self.send(ClientMessage::Chat {
            text: text.to_owned(),
        })
    }

    /// Asks for a simulcast layer of a received track.
    pub fn set_quality(&self, track_id: &str, quality: Quality) -> Result<()> {
        self.send(ClientMessage::SetQuality {
            track_id: track_id.to_owned(),
            quality,
        })
    }

    /// Changes the audio level written on our audio packets.
    pub fn set_audio_level(&self, level: Option<u8>) {
        self.inner.audio_level.set(level);
    }

    /// The publisher connection, if publishing (for tests that poke at webrtc-rs).
    pub fn publisher_pc(&self) -> Option<Arc<dyn PeerConnection>> {
        self.inner.publisher.as_ref().map(|p| Arc::clone(&p.pc))
    }

    /// The subscriber connection.
    pub fn subscriber_pc(&self) -> Arc<dyn PeerConnection> {
        Arc::clone(&self.inner.subscriber.pc)
    }

    /// Sends `leave`, then closes both connections and the socket and stops every task.
    pub async fn leave(mut self) -> Result<()> {
        let _ = self.inner.outbox.send(ClientMessage::Leave);
        // Let the leave reach the socket before it closes.
        self.inner.outbox.flush(Duration::from_secs(1)).await;
        self.shutdown(true).await;
        Ok(())
    }

    /// Drops the socket without `leave` (as a crashed browser tab would) and closes both
    /// connections.
    pub async fn disconnect(mut self) {
        self.shutdown(false).await;
    }

    async fn shutdown(&mut self, close_socket: bool) {
        self.finished = true;
        let tasks: Vec<JoinHandle<()>> = lock(&self.tasks).drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        if let Some(p) = &self.inner.publisher {
            let _ = p.pc.close().await;
        }
        let _ = self.inner.subscriber.pc.close().await;
        if close_socket {
            self.inner.signal.close().await;
        }
        // Wait for the aborted tasks to drop what they hold (the socket among it), so the
        // socket is gone when the caller drops this peer.
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            for task in tasks {
                let _ = task.await;
            }
        })
        .await;
    }
}

impl Drop for HeadlessPeer {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        // A dropped webrtc-rs connection keeps its driver (and socket) running on the tokio
        // runtime: close both explicitly.
        let publisher = self.inner.publisher.as_ref().map(|p| Arc::clone(&p.pc));
        let subscriber = Arc::clone(&self.inner.subscriber.pc);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Some(p) = publisher {
                    let _ = p.close().await;
                }
                let _ = subscriber.close().await;
            });
        }
    }
}

/// Writes queued messages to the socket in order.
async fn run_outbox(signal: Arc<SignalClient>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(outgoing) = rx.recv().await {
        match outgoing {
            Outgoing::Message(message) => {
                if let Err(e) = signal.send(&message).await {
                    tracing::debug!("signaling send failed: {e}");
                }
            }
            Outgoing::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Remote-description state and early candidates of one connection, owned by the signaling loop.
#[derive(Default)]
struct RemoteSide {
    /// A remote description has been applied.
    described: bool,
    /// Candidates that arrived before it.
    pending: Vec<IceCandidate>,
}

/// Reads the socket and applies every server message until it closes.
async fn run_signaling(inner: Arc<Inner>, early: Vec<ServerMessage>) {
    let mut sides: [RemoteSide; 2] = Default::default();
    for message in early {
        handle_message(&inner, &mut sides, message).await;
    }
    loop {
        match inner.signal.recv_event().await {
            SignalEvent::Message(message) => handle_message(&inner, &mut sides, message).await,
            SignalEvent::Unparsed(text) => inner.state.send_modify(|s| {
                s.local_errors
                    .push(format!("unparseable server frame: {text}"))
            }),
            SignalEvent::Binary(_) => inner
                .state
                .send_modify(|s| s.local_errors.push("binary frame from the server".into())),
            SignalEvent::Closed { code, reason } => {
                tracing::debug!(?code, %reason, "signaling closed");
                inner.state.send_modify(|s| s.closed = Some(code));
                break;
            }
        }
    }
}

fn side_index(pc: PcName) -> usize {
    match pc {
        PcName::Publisher => 0,
        PcName::Subscriber => 1,
    }
}

async fn handle_message(inner: &Inner, sides: &mut [RemoteSide; 2], message: ServerMessage) {
    lock(&inner.log).push(message.clone());
    let _ = inner.events.send(message.clone());
    let me = inner.participant_id.as_str();
    match message {
        ServerMessage::Joined { .. } => {
            local_error(inner, "a second joined".into());
        }
        ServerMessage::ParticipantJoined { participant } => inner.state.send_modify(|s| {
            if !participant.tracks.is_empty() {
                s.first_remote_track_at.get_or_insert_with(Instant::now);
            }
            s.participants.insert(
                participant.participant_id.clone(),
                ParticipantInfo {
                    name: participant.name,
                    tracks: participant
                        .tracks
                        .into_iter()
                        .map(|t| (t.track_id.clone(), t))
                        .collect(),
                },
            );
        }),
        ServerMessage::ParticipantLeft { participant_id } => inner.state.send_modify(|s| {
            s.participants.remove(&participant_id);
            s.left.push(participant_id);
        }),
        ServerMessage::TrackPublished {
            participant_id,
            track,
        } => {
            if participant_id == me {
                let kind = track.kind;
                let id = track.track_id.clone();
                inner.stats.update_sent(kind, |s| s.track_id = Some(id));
                inner.state.send_modify(|s| {
                    s.own_tracks.insert(track.track_id.clone(), track);
                });
            } else {
                inner.state.send_modify(|s| {
                    s.first_remote_track_at.get_or_insert_with(Instant::now);
                    s.participants
                        .entry(participant_id)
                        .or_insert_with(|| ParticipantInfo {
                            name: String::new(),
                            tracks: BTreeMap::new(),
                        })
                        .tracks
                        .insert(track.track_id.clone(), track);
                });
            }
        }
        ServerMessage::TrackUnpublished {
            participant_id,
            track_id,
        } => inner.state.send_modify(|s| {
            if participant_id == me {
                s.own_tracks.remove(&track_id);
            } else if let Some(p) = s.participants.get_mut(&participant_id) {
                p.tracks.remove(&track_id);
            }
        }),
        ServerMessage::TrackMuted {
            participant_id,
            track_id,
            muted,
        } => inner.state.send_modify(|s| {
            let track = if participant_id == me {
                s.own_tracks.get_mut(&track_id)
            } else {
                s.participants
                    .get_mut(&participant_id)
                    .and_then(|p| p.tracks.get_mut(&track_id))
            };
            if let Some(t) = track {
                t.muted = muted;
            }
        }),
        ServerMessage::Offer { pc, sdp } => {
            if pc != PcName::Subscriber {
                local_error(inner, format!("offer for pc {}", pc.as_str()));
                return;
            }
            inner.state.send_modify(|s| s.subscriber_offers += 1);
            match answer_subscriber(inner, sdp).await {
                Ok(()) => {
                    inner.state.send_modify(|s| s.subscriber_answers += 1);
                    described(inner, sides, PcName::Subscriber).await;
                }
                Err(e) => local_error(inner, format!("subscriber offer: {e}")),
            }
        }
        ServerMessage::Answer { pc, sdp } => {
            let Some(publisher) = (pc == PcName::Publisher)
                .then_some(inner.publisher.as_ref())
                .flatten()
            else {
                local_error(inner, format!("unexpected answer for pc {}", pc.as_str()));
                return;
            };
            let applied = match RTCSessionDescription::answer(sdp) {
                Ok(desc) => publisher.pc.set_remote_description(desc).await,
                Err(e) => Err(e),
            };
            match applied {
                Ok(()) => {
                    inner.state.send_modify(|s| s.publisher_answers += 1);
                    described(inner, sides, PcName::Publisher).await;
                }
                Err(e) => local_error(inner, format!("publisher answer: {e}")),
            }
        }
        ServerMessage::Candidate { pc, candidate } => {
            inner.state.send_modify(|s| match pc {
                PcName::Publisher => s.remote_candidates.0 += 1,
                PcName::Subscriber => s.remote_candidates.1 += 1,
            });
            let Some(candidate) = candidate.filter(|c| !c.candidate.trim().is_empty()) else {
                tracing::trace!(pc = pc.as_str(), "end of remote candidates");
                return;
            };
            let side = &mut sides[side_index(pc)];
            if side.described {
                add_candidates(inner, pc, vec![candidate]).await;
            } else {
                side.pending.push(candidate);
            }
        }
        ServerMessage::Chat {
            participant_id,
            name,
            text,
            ts,
        } => inner.state.send_modify(|s| {
            s.chats.push(ChatLine {
                participant_id,
                name,
                text,
                ts,
            })
        }),
        ServerMessage::ActiveSpeakers { participant_ids } => inner.state.send_modify(|s| {
            s.active_speakers = participant_ids;
            s.active_speaker_updates += 1;
        }),
        ServerMessage::Error { code, message } => {
            tracing::debug!("server error {}: {message}", code.as_str());
            inner.state.send_modify(|s| s.errors.push((code, message)));
        }
    }
}

fn local_error(inner: &Inner, text: String) {
    tracing::warn!("{text}");
    inner.state.send_modify(|s| s.local_errors.push(text));
}

/// Applies a subscriber offer and sends the answer.
async fn answer_subscriber(inner: &Inner, sdp: String) -> Result<()> {
    let slot = &inner.subscriber;
    slot.pc
        .set_remote_description(RTCSessionDescription::offer(sdp)?)
        .await?;
    let answer = slot.pc.create_answer(None).await?;
    slot.remember_local_description(&answer.sdp);
    slot.pc.set_local_description(answer.clone()).await?;
    inner.outbox.send(ClientMessage::Answer {
        pc: PcName::Subscriber,
        sdp: answer.sdp,
    })?;
    slot.open(PcName::Subscriber, &inner.outbox);
    Ok(())
}

/// `pc` has its remote description: later candidates go straight in, and those that came
/// early are added now.
async fn described(inner: &Inner, sides: &mut [RemoteSide; 2], pc: PcName) {
    let side = &mut sides[side_index(pc)];
    side.described = true;
    let pending = std::mem::take(&mut side.pending);
    add_candidates(inner, pc, pending).await;
}

async fn add_candidates(inner: &Inner, pc: PcName, candidates: Vec<IceCandidate>) {
    let slot = match pc {
        PcName::Publisher => match &inner.publisher {
            Some(p) => p,
            None => {
                tracing::debug!("candidate for a publisher connection we do not have");
                return;
            }
        },
        PcName::Subscriber => &inner.subscriber,
    };
    for c in candidates {
        if let Err(e) = slot.pc.add_ice_candidate(candidate_from_wire(&c)).await {
            local_error(
                inner,
                format!("{} candidate {:?}: {e}", pc.as_str(), c.candidate),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_simulcast_config_that_cannot_work_is_refused_before_connecting() {
        // Nothing listens here: the refusal must come before any connection attempt.
        let url = "ws://127.0.0.1:9/ws";
        let clip = PeerConfig::new(url, "r", "n")
            .simulcast()
            .video_file(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/testdata/testsrc-320x240-30fps.ivf"
            ))
            .unwrap();
        let one_layer = PeerConfig::new(url, "r", "n")
            .simulcast_layers(vec![SimulcastLayer::new("q", 320, 180, 150_000)]);
        for (config, reason) in [(clip, "video file"), (one_layer, "2 to 16 layers")] {
            match HeadlessPeer::join(config).await {
                Err(Error::InvalidConfig(why)) => assert!(why.contains(reason), "{why}"),
                Err(other) => panic!("expected an invalid configuration, got {other}"),
                Ok(_) => panic!("joined with an impossible configuration"),
            }
        }
    }
}
