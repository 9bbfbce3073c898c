//! `JanusPeer`: the headless participant of [`crate::peer`], signaling with a Janus 1.x
//! VideoRoom instead of our server, so the same media, measurements and load report can be
//! taken against both. Only the signaling differs: one Janus session over a WebSocket
//! (subprotocol `janus-protocol`) with keepalives; a publisher handle that creates the room if
//! it does not exist yet, joins it, and publishes (`publish` with a JSEP offer); a subscriber
//! handle that subscribes to every other publisher as Janus announces it (Janus announces a
//! publisher once its media is up, `webrtcup`), where Janus offers and we answer with `start`;
//! trickle ICE from us, Janus's candidates inside its SDP (its default half-trickle).
//!
//! Received tracks are keyed like ours, by (publisher id, publisher's track id): Janus labels
//! its subscriber m-sections `msid:janus janus<mid>`, so each offer is relabelled from the
//! `streams` list that comes with it (`feed_id`, `feed_mid`) before webrtc-rs reads it.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::{json, Value};
use signaling::protocol::TrackKind;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceGatheringState, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription,
};

use crate::peer::PeerConfig;
use crate::publish::{
    add_configured_tracks, spawn_sender, AudioLevel, PublishedTrack, SendOptions,
};
use crate::rtc_setup::{build_peer_connection, sdp_mid_and_ufrag, PcOptions};
use crate::signal::{Frame, SignalClient};
use crate::stats::{lock, PeerStats, SentStats, StatsStore, TrackKey, TrackStats};
use crate::{Error, Result};

/// The WebSocket subprotocol of the Janus API.
pub const SUBPROTOCOL: &str = "janus-protocol";

/// The VideoRoom plugin's package name.
pub const VIDEOROOM: &str = "janus.plugin.videoroom";

/// Janus ends a session after 60 s (its default) without a message from it.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(25);

/// VideoRoom's "room already exists": another peer created it first, which is fine.
const ROOM_EXISTS: i64 = 427;

/// The room a Janus peer creates when it is the first to arrive.
#[derive(Debug, Clone, Copy)]
pub struct JanusRoomOptions {
    /// How many may publish at once (Janus refuses the next publisher).
    pub publishers: usize,
    /// Janus caps each publisher at this bitrate with REMB; set it above what publishers
    /// send, so the comparison is not throttled.
    pub bitrate_bps: u32,
}

impl Default for JanusRoomOptions {
    fn default() -> Self {
        JanusRoomOptions {
            publishers: 16,
            bitrate_bps: 3_000_000,
        }
    }
}

/// The room as a Janus peer knows it.
#[derive(Debug, Clone, Default)]
pub struct JanusState {
    /// Our VideoRoom participant id (Janus assigns it).
    pub participant_id: String,
    /// The room.
    pub room: String,
    /// Our published tracks as Janus accepted them: (kind, id others receive it under,
    /// see [`track_id`]).
    pub own_tracks: Vec<(TrackKind, String)>,
    /// Other publishers Janus announced: id → number of streams.
    pub feeds: BTreeMap<String, usize>,
    /// Streams of other publishers already up when we joined.
    pub remote_tracks_at_join: usize,
    /// When the first stream of another publisher became known.
    pub first_remote_track_at: Option<Instant>,
    /// When Janus reported our publisher connection up (`webrtcup`).
    pub publisher_up_at: Option<Instant>,
    /// Subscriber offers received from Janus.
    pub subscriber_offers: u64,
    /// Of those, answered.
    pub subscriber_answers: u64,
    /// Janus errors after joining: (code, reason).
    pub errors: Vec<(i64, String)>,
    /// Things that went wrong on our side.
    pub local_errors: Vec<String>,
    /// The publisher connection's state (`None`: not publishing).
    pub publisher_state: Option<RTCPeerConnectionState>,
    /// The subscriber connection's state.
    pub subscriber_state: RTCPeerConnectionState,
    /// The WebSocket closed.
    pub closed: bool,
}

/// What the writer task sends.
enum Outgoing {
    /// A Janus API message.
    Message(Value),
    /// Signals once everything queued before it has been written.
    Flush(oneshot::Sender<()>),
}

/// Our Janus session: its id, the message queue, and transaction numbers.
struct Session {
    /// Janus's session id.
    id: u64,
    /// Messages for Janus, written in order by one task.
    outbox: mpsc::UnboundedSender<Outgoing>,
    /// The next transaction number.
    next_transaction: AtomicU64,
}

impl Session {
    fn transaction(&self) -> String {
        format!("t{}", self.next_transaction.fetch_add(1, Ordering::Relaxed))
    }

    /// Queues `message` (a `transaction` and the `session_id` are added); returns the
    /// transaction.
    fn send(&self, mut message: Value) -> Result<String> {
        let transaction = self.transaction();
        message["transaction"] = json!(transaction);
        message["session_id"] = json!(self.id);
        self.outbox
            .send(Outgoing::Message(message))
            .map_err(|_| Error::Stopped)?;
        Ok(transaction)
    }

    /// Queues a plugin message to `handle`.
    fn plugin_message(&self, handle: u64, body: Value, jsep: Option<Value>) -> Result<String> {
        let mut message = json!({ "janus": "message", "handle_id": handle, "body": body });
        if let Some(jsep) = jsep {
            message["jsep"] = jsep;
        }
        self.send(message)
    }

    /// Waits up to `timeout` until everything queued so far has been written.
    async fn flush(&self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.outbox.send(Outgoing::Flush(tx)).is_ok() {
            let _ = tokio::time::timeout(timeout, rx).await;
        }
    }
}

/// Our candidates wait here until their connection's offer or answer has been queued and its
/// Janus handle is known; then they go out as `trickle`, labelled with the first mid.
#[derive(Debug, Default)]
struct TrickleGate {
    /// The handle to trickle to, once the description is queued.
    handle: Option<u64>,
    /// First mid of the local description.
    mid: Option<String>,
    /// Held candidates (`None`: end of candidates).
    held: Vec<Option<String>>,
}

fn trickle_message(handle: u64, mid: &Option<String>, candidate: Option<String>) -> Value {
    let candidate = match candidate {
        Some(c) => {
            json!({ "candidate": c, "sdpMid": mid.clone().unwrap_or_default(), "sdpMLineIndex": 0 })
        }
        None => json!({ "completed": true }),
    };
    json!({ "janus": "trickle", "handle_id": handle, "candidate": candidate })
}

/// One of our two peer connections, with its trickle gate and state.
struct JanusPc {
    /// The connection.
    pc: Arc<dyn PeerConnection>,
    /// Its candidates' gate.
    gate: Arc<Mutex<TrickleGate>>,
    /// Its state, for the senders.
    conn: Arc<watch::Sender<RTCPeerConnectionState>>,
}

impl JanusPc {
    async fn new(
        publisher: bool,
        options: &PcOptions,
        session: &Arc<Session>,
        state: &Arc<watch::Sender<JanusState>>,
        stats: &StatsStore,
        tasks: &Arc<Mutex<Vec<JoinHandle<()>>>>,
    ) -> Result<JanusPc> {
        let gate = Arc::new(Mutex::new(TrickleGate::default()));
        let conn = Arc::new(watch::Sender::new(RTCPeerConnectionState::New));
        let handler = Arc::new(JanusPcHandler {
            publisher,
            session: Arc::clone(session),
            gate: Arc::clone(&gate),
            state: Arc::clone(state),
            conn: Arc::clone(&conn),
            stats: stats.clone(),
            tasks: Arc::clone(tasks),
        });
        let pc = build_peer_connection(options, handler).await?;
        Ok(JanusPc { pc, gate, conn })
    }

    fn remember_local_description(&self, sdp: &str) {
        lock(&self.gate).mid = sdp_mid_and_ufrag(sdp).0;
    }

    /// After the description was queued for `handle`: lets held candidates go, in order.
    fn open(&self, handle: u64, session: &Session) {
        let mut gate = lock(&self.gate);
        if gate.handle.is_some() {
            return;
        }
        gate.handle = Some(handle);
        for candidate in std::mem::take(&mut gate.held) {
            let _ = session.send(trickle_message(handle, &gate.mid, candidate));
        }
    }
}

/// The event handler of one of our peer connections.
struct JanusPcHandler {
    /// Publisher (else subscriber) connection.
    publisher: bool,
    /// Where trickled candidates go.
    session: Arc<Session>,
    /// Ordering of our candidates.
    gate: Arc<Mutex<TrickleGate>>,
    /// Connection states go here.
    state: Arc<watch::Sender<JanusState>>,
    /// Connection state for the senders.
    conn: Arc<watch::Sender<RTCPeerConnectionState>>,
    /// Where received tracks are recorded.
    stats: StatsStore,
    /// Recording tasks, aborted on leave.
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl JanusPcHandler {
    fn emit(&self, candidate: Option<String>) {
        let mut gate = lock(&self.gate);
        match gate.handle {
            Some(handle) => {
                let _ = self
                    .session
                    .send(trickle_message(handle, &gate.mid, candidate));
            }
            None => gate.held.push(candidate),
        }
    }
}

#[async_trait]
impl PeerConnectionEventHandler for JanusPcHandler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        match event.candidate.to_json() {
            Ok(init) => {
                tracing::trace!(
                    publisher = self.publisher,
                    "local candidate {}",
                    init.candidate
                );
                self.emit(Some(init.candidate));
            }
            Err(e) => tracing::warn!("bad local candidate: {e}"),
        }
    }

    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.emit(None);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        tracing::debug!(publisher = self.publisher, "connection state {state}");
        self.conn.send_replace(state);
        self.state.send_modify(|s| {
            if self.publisher {
                s.publisher_state = Some(state);
            } else {
                s.subscriber_state = state;
            }
        });
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let stats = self.stats.clone();
        let task = tokio::spawn(async move { stats.record_track(track).await });
        lock(&self.tasks).push(task);
    }
}

/// Shared between the handle and its tasks.
struct Inner {
    /// The Janus session.
    session: Arc<Session>,
    /// The socket.
    signal: Arc<SignalClient>,
    /// The room.
    room: String,
    /// The publisher handle (every peer has one: it is how Janus tells us about publishers).
    publisher_handle: u64,
    /// Janus's private id for us, which ties our subscriptions to our participant.
    private_id: Option<Value>,
    /// Present when publishing.
    publisher: Option<JanusPc>,
    /// Receives every subscription.
    subscriber: JanusPc,
    /// What we publish.
    published: Vec<PublishedTrack>,
    /// The room as we know it.
    state: Arc<watch::Sender<JanusState>>,
    /// Measurements.
    stats: StatsStore,
}

/// A participant in a Janus VideoRoom. See the module docs.
pub struct JanusPeer {
    /// State shared with the tasks.
    inner: Arc<Inner>,
    /// Writer, reader and recording tasks, aborted on leave or drop.
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Set by `leave`, so drop does not clean up twice.
    finished: bool,
}

/// A Janus error carried in a reply: the core's `error`, or the plugin's `error_code`.
fn janus_error(message: &Value) -> Option<Error> {
    if message["janus"] == "error" {
        return Some(Error::Janus {
            code: message["error"]["code"].as_i64().unwrap_or(0),
            message: message["error"]["reason"]
                .as_str()
                .unwrap_or("(no reason)")
                .to_owned(),
        });
    }
    let data = &message["plugindata"]["data"];
    data.get("error_code").map(|code| Error::Janus {
        code: code.as_i64().unwrap_or(0),
        message: data["error"].as_str().unwrap_or("(no reason)").to_owned(),
    })
}

/// Sends `request` and reads the socket until Janus's reply to it (not the `ack`) arrives;
/// anything else that arrives meanwhile is kept in `early`, in order.
async fn call(
    signal: &SignalClient,
    mut request: Value,
    transaction: &str,
    deadline: tokio::time::Instant,
    early: &mut Vec<Value>,
) -> Result<Value> {
    request["transaction"] = json!(transaction);
    signal.send_raw(&request.to_string()).await?;
    loop {
        let frame = tokio::time::timeout_at(deadline, signal.recv_frame())
            .await
            .map_err(|_| Error::Timeout("Janus to reply"))?;
        let text = match frame {
            Frame::Text(text) => text,
            Frame::Binary(_) => continue,
            Frame::Closed { code, .. } => return Err(Error::Closed(code)),
        };
        let message: Value = serde_json::from_str(&text)?;
        if message["transaction"] != transaction {
            early.push(message);
            continue;
        }
        if message["janus"] == "ack" {
            continue;
        }
        return match janus_error(&message) {
            Some(e) => Err(e),
            None => Ok(message),
        };
    }
}

/// The publishers listed in a VideoRoom event, as (id, number of enabled streams).
fn listed_publishers(data: &Value) -> Vec<(String, usize)> {
    data["publishers"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|p| {
                    let id = match &p["id"] {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => return None,
                    };
                    let streams = p["streams"]
                        .as_array()
                        .map_or(0, |s| s.iter().filter(|s| s["disabled"] != true).count());
                    Some((id, streams))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn id_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The id a published track is received under: its publisher's id and its mid in the
/// publisher's connection. Janus's own track ids (the mid) repeat across publishers, and
/// webrtc-rs tells remote tracks apart by track id, so the publisher is part of it.
pub fn track_id(publisher: &str, mid: &str) -> String {
    format!("{publisher}-{mid}")
}

/// Labels each m-section of a Janus subscriber offer with the publisher and track it carries
/// (`a=msid:<feed_id> <feed_id>-<feed_mid>`, see [`track_id`]), from the `streams` list that
/// came with the offer.
/// Sections without a listed feed, or without an `a=msid` line (inactive ones), are unchanged.
pub fn label_subscriber_offer(sdp: &str, streams: &Value) -> String {
    let feeds: BTreeMap<String, (String, String)> = streams
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|s| {
                    let mid = s["mid"].as_str()?.to_owned();
                    let feed = s.get("feed_id").map(id_string)?;
                    let feed_mid = s["feed_mid"].as_str()?.to_owned();
                    Some((mid, (feed, feed_mid)))
                })
                .collect()
        })
        .unwrap_or_default();
    // An SDP's lines end in CRLF; keep whatever the offer used.
    let newline = if sdp.contains("\r\n") { "\r\n" } else { "\n" };
    let mut sections: Vec<Vec<String>> = vec![vec![]];
    for line in sdp.lines() {
        if line.starts_with("m=") {
            sections.push(vec![]);
        }
        sections
            .last_mut()
            .expect("one section")
            .push(line.to_owned());
    }
    let mut out = String::with_capacity(sdp.len() + 64);
    for section in &mut sections {
        let label = section
            .iter()
            .find_map(|l| l.strip_prefix("a=mid:"))
            .and_then(|mid| feeds.get(mid.trim()));
        if let Some((feed, feed_mid)) = label {
            for line in section.iter_mut() {
                if line.starts_with("a=msid:") {
                    *line = format!("a=msid:{feed} {}", track_id(feed, feed_mid));
                }
            }
        }
        for line in section.iter() {
            out.push_str(line);
            out.push_str(newline);
        }
    }
    out
}

impl JanusPeer {
    /// Connects to Janus at `config.url`, creates room `config.room` (with `room`'s settings)
    /// unless it exists, joins it as `config.name`, and, if `config` publishes, sends the
    /// publish offer. Returns once joined; subscriptions follow as Janus announces publishers.
    /// `config.token` is not used (Janus's own auth is not configured).
    pub async fn join(config: PeerConfig, room: JanusRoomOptions) -> Result<JanusPeer> {
        let deadline = tokio::time::Instant::now() + config.join_timeout;
        let connect = SignalClient::connect_with_subprotocol(&config.url, SUBPROTOCOL);
        let signal = Arc::new(
            tokio::time::timeout_at(deadline, connect)
                .await
                .map_err(|_| Error::Timeout("the Janus WebSocket"))??,
        );
        let mut early = Vec::new();
        let created = call(
            &signal,
            json!({ "janus": "create" }),
            "create",
            deadline,
            &mut early,
        )
        .await?;
        let session_id = created["data"]["id"]
            .as_u64()
            .ok_or(Error::Timeout("a Janus session id"))?;
        let attached = call(
            &signal,
            json!({ "janus": "attach", "session_id": session_id, "plugin": VIDEOROOM }),
            "attach",
            deadline,
            &mut early,
        )
        .await?;
        let publisher_handle = attached["data"]["id"]
            .as_u64()
            .ok_or(Error::Timeout("a Janus handle id"))?;
        let plugin = |body: Value| {
            json!({
                "janus": "message",
                "session_id": session_id,
                "handle_id": publisher_handle,
                "body": body,
            })
        };
        let create_room = plugin(json!({
            "request": "create",
            "room": config.room,
            "publishers": room.publishers.max(1),
            "bitrate": room.bitrate_bps,
            "bitrate_cap": false,
            "videocodec": "vp8",
            "audiocodec": "opus",
            "notify_joining": false,
            "permanent": false,
        }));
        match call(&signal, create_room, "create-room", deadline, &mut early).await {
            Ok(_) => {}
            Err(Error::Janus { code, .. }) if code == ROOM_EXISTS => {}
            Err(e) => return Err(e),
        }
        let join = plugin(json!({
            "request": "join",
            "ptype": "publisher",
            "room": config.room,
            "display": config.name,
        }));
        let joined = call(&signal, join, "join", deadline, &mut early).await?;
        let data = &joined["plugindata"]["data"];
        let participant_id = id_string(&data["id"]);
        let private_id = data.get("private_id").cloned();
        let present = listed_publishers(data);
        tracing::debug!(%participant_id, room = %config.room, "joined Janus room");

        let remote_tracks_at_join = present.iter().map(|(_, n)| n).sum();
        let publishing = config.publish_video || config.publish_audio;
        let state = Arc::new(watch::Sender::new(JanusState {
            participant_id: participant_id.clone(),
            room: config.room.clone(),
            remote_tracks_at_join,
            first_remote_track_at: (remote_tracks_at_join > 0).then(Instant::now),
            publisher_state: publishing.then_some(RTCPeerConnectionState::New),
            ..JanusState::default()
        }));
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let session = Arc::new(Session {
            id: session_id,
            outbox,
            next_transaction: AtomicU64::new(1),
        });
        let stats = StatsStore::new(config.read_probes);
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        // From here on, the writer takes the socket's sending side.
        lock(&tasks).push(tokio::spawn(run_writer(Arc::clone(&signal), outbox_rx)));

        let subscriber = JanusPc::new(false, &config.pc, &session, &state, &stats, &tasks).await;
        let subscriber = match subscriber {
            Ok(s) => s,
            Err(e) => {
                abort_all(&tasks);
                return Err(e);
            }
        };
        let mut published = Vec::new();
        let publisher = if publishing {
            let built = async {
                let slot = JanusPc::new(true, &config.pc, &session, &state, &stats, &tasks).await?;
                published = add_configured_tracks(&slot.pc, &config, &participant_id).await?;
                Ok(slot)
            }
            .await;
            match built {
                Ok(slot) => Some(slot),
                Err(e) => {
                    let _ = subscriber.pc.close().await;
                    abort_all(&tasks);
                    return Err(e);
                }
            }
        } else {
            None
        };

        let inner = Arc::new(Inner {
            session,
            signal: Arc::clone(&signal),
            room: config.room.clone(),
            publisher_handle,
            private_id,
            publisher,
            subscriber,
            published,
            state,
            stats,
        });
        // From here on, an early return drops the peer, whose `Drop` stops everything.
        let peer = JanusPeer {
            inner: Arc::clone(&inner),
            tasks: Arc::clone(&tasks),
            finished: false,
        };
        lock(&tasks).push(tokio::spawn(run_keepalive(Arc::clone(&inner.session))));

        if let Some(publisher) = &inner.publisher {
            let options = SendOptions {
                video: config.video_media(),
                audio: config.audio_media(),
                audio_level: AudioLevel::new(config.audio_level),
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
            inner.session.plugin_message(
                publisher_handle,
                json!({ "request": "publish", "display": config.name }),
                Some(json!({ "type": "offer", "sdp": offer.sdp })),
            )?;
            publisher.open(publisher_handle, &inner.session);
        }
        let mut driver = Driver {
            inner: Arc::clone(&inner),
            subscription: Subscription::Idle,
            requested: HashSet::new(),
            attach_transaction: None,
        };
        lock(&tasks).push(tokio::spawn(async move {
            driver.want(present);
            driver.run(early).await;
        }));
        Ok(peer)
    }

    /// Our VideoRoom participant id.
    pub fn participant_id(&self) -> String {
        self.inner.state.borrow().participant_id.clone()
    }

    /// A snapshot of the room as we know it.
    pub fn state(&self) -> JanusState {
        self.inner.state.borrow().clone()
    }

    /// Reads the state without copying it (keep `f` short).
    pub fn with_state<R>(&self, f: impl FnOnce(&JanusState) -> R) -> R {
        f(&self.inner.state.borrow())
    }

    /// Waits until `predicate` holds for the state; `false` on timeout.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        mut predicate: impl FnMut(&JanusState) -> bool,
    ) -> bool {
        let mut rx = self.inner.state.subscribe();
        let result = tokio::time::timeout(timeout, rx.wait_for(|s| predicate(s))).await;
        matches!(result, Ok(Ok(_)))
    }

    /// A snapshot of the measurements.
    pub fn stats(&self) -> PeerStats {
        self.inner.stats.snapshot()
    }

    /// Calls `f` with each received track's stats in turn, without copying them.
    pub fn for_each_received_track(&self, f: impl FnMut(&TrackKey, &TrackStats)) {
        self.inner.stats.for_each_received(f);
    }

    /// The stats of what we publish, by kind.
    pub fn sent_stats(&self) -> std::collections::HashMap<TrackKind, SentStats> {
        self.inner.stats.sent()
    }

    /// The room this peer joined.
    pub fn room(&self) -> &str {
        &self.inner.room
    }

    /// Destroys the Janus session (which leaves the room), then closes both connections and
    /// the socket and stops every task.
    pub async fn leave(mut self) -> Result<()> {
        let _ = self.inner.session.send(json!({ "janus": "destroy" }));
        self.inner.session.flush(Duration::from_secs(1)).await;
        self.finished = true;
        let tasks: Vec<JoinHandle<()>> = lock(&self.tasks).drain(..).collect();
        for task in &tasks {
            task.abort();
        }
        if let Some(p) = &self.inner.publisher {
            let _ = p.pc.close().await;
        }
        let _ = self.inner.subscriber.pc.close().await;
        self.inner.signal.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            for task in tasks {
                let _ = task.await;
            }
        })
        .await;
        Ok(())
    }
}

impl Drop for JanusPeer {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        abort_all(&self.tasks);
        // A dropped webrtc-rs connection keeps its driver (and socket) running: close both.
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

fn abort_all(tasks: &Mutex<Vec<JoinHandle<()>>>) {
    for task in lock(tasks).drain(..) {
        task.abort();
    }
}

/// Writes queued messages to the socket in order.
async fn run_writer(signal: Arc<SignalClient>, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(outgoing) = rx.recv().await {
        match outgoing {
            Outgoing::Message(message) => {
                if let Err(e) = signal.send_raw(&message.to_string()).await {
                    tracing::debug!("janus send failed: {e}");
                }
            }
            Outgoing::Flush(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Keeps the session alive while the peer runs.
async fn run_keepalive(session: Arc<Session>) {
    let mut ticker = tokio::time::interval(KEEPALIVE_EVERY);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        if session.send(json!({ "janus": "keepalive" })).is_err() {
            return;
        }
    }
}

/// Where our subscriber handle is.
enum Subscription {
    /// Nothing to subscribe to yet.
    Idle,
    /// `attach` sent; feeds to subscribe to once it is there.
    Attaching(Vec<String>),
    /// `join` as subscriber sent on this handle; feeds that arrived since.
    Joining(u64, Vec<String>),
    /// Joined: new feeds go out as `subscribe` at once (Janus queues its offers itself).
    Ready(u64),
}

/// The task that reads Janus's messages and acts on them.
struct Driver {
    /// The peer.
    inner: Arc<Inner>,
    /// The subscriber handle.
    subscription: Subscription,
    /// Feeds already asked for.
    requested: HashSet<String>,
    /// The transaction of the subscriber handle's `attach`.
    attach_transaction: Option<String>,
}

impl Driver {
    async fn run(&mut self, early: Vec<Value>) {
        for message in early {
            self.handle(message).await;
        }
        loop {
            let text = match self.inner.signal.recv_frame().await {
                Frame::Text(text) => text,
                Frame::Binary(_) => continue,
                Frame::Closed { code, reason } => {
                    tracing::debug!(?code, %reason, "janus socket closed");
                    self.inner.state.send_modify(|s| s.closed = true);
                    return;
                }
            };
            match serde_json::from_str::<Value>(&text) {
                Ok(message) => self.handle(message).await,
                Err(e) => self.local_error(format!("unparseable Janus frame ({e}): {text}")),
            }
        }
    }

    fn local_error(&self, text: String) {
        tracing::warn!("{text}");
        self.inner.state.send_modify(|s| s.local_errors.push(text));
    }

    fn janus_error(&self, error: Error) {
        if let Error::Janus { code, message } = error {
            tracing::debug!("janus error {code}: {message}");
            self.inner
                .state
                .send_modify(|s| s.errors.push((code, message)));
        }
    }

    async fn handle(&mut self, message: Value) {
        let sender = message["sender"].as_u64();
        match message["janus"].as_str().unwrap_or_default() {
            "ack" => {}
            "success" => {
                let ours = self.attach_transaction.is_some()
                    && message["transaction"].as_str() == self.attach_transaction.as_deref();
                if ours {
                    self.attach_transaction = None;
                    match message["data"]["id"].as_u64() {
                        Some(handle) => self.join_as_subscriber(handle),
                        None => self.local_error("attach without a handle id".into()),
                    }
                }
            }
            "error" => {
                if let Some(e) = janus_error(&message) {
                    self.janus_error(e);
                }
            }
            "event" => {
                if let Some(e) = janus_error(&message) {
                    self.janus_error(e);
                    return;
                }
                let data = &message["plugindata"]["data"];
                let jsep = message.get("jsep");
                if sender == Some(self.inner.publisher_handle) {
                    self.publisher_event(data, jsep).await;
                } else {
                    self.subscriber_event(sender, data, jsep).await;
                }
            }
            "webrtcup" if sender == Some(self.inner.publisher_handle) => {
                self.inner
                    .state
                    .send_modify(|s| s.publisher_up_at = Some(Instant::now()));
            }
            "hangup" => {
                let reason = message["reason"].as_str().unwrap_or("no reason");
                self.local_error(format!("Janus hung up handle {sender:?}: {reason}"));
            }
            "timeout" => self.local_error("Janus timed out the session".into()),
            // `media`, `slowlink`, `detached`, keepalive replies: nothing to do.
            _ => {}
        }
    }

    async fn publisher_event(&mut self, data: &Value, jsep: Option<&Value>) {
        let announced = listed_publishers(data);
        if !announced.is_empty() {
            self.want(announced);
        }
        let Some(jsep) = jsep else { return };
        let Some(publisher) = &self.inner.publisher else {
            self.local_error("a JSEP for a publisher connection we do not have".into());
            return;
        };
        if jsep["type"] != "answer" {
            self.local_error(format!("publisher JSEP of type {}", jsep["type"]));
            return;
        }
        let me = self.inner.state.borrow().participant_id.clone();
        let own: Vec<(TrackKind, String)> = data["streams"]
            .as_array()
            .map(|streams| {
                streams
                    .iter()
                    .filter_map(|s| {
                        let kind = match s["type"].as_str()? {
                            "audio" => TrackKind::Audio,
                            "video" => TrackKind::Video,
                            _ => return None,
                        };
                        Some((kind, track_id(&me, s["mid"].as_str()?)))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let sdp = jsep["sdp"].as_str().unwrap_or_default().to_owned();
        tracing::trace!("publisher answer from Janus:\n{sdp}");
        let applied = match RTCSessionDescription::answer(sdp) {
            Ok(desc) => publisher.pc.set_remote_description(desc).await,
            Err(e) => Err(e),
        };
        match applied {
            Ok(()) => {
                for (kind, mid) in &own {
                    let mid = mid.clone();
                    self.inner
                        .stats
                        .update_sent(*kind, |s| s.track_id = Some(mid));
                }
                self.inner.state.send_modify(|s| s.own_tracks = own);
            }
            Err(e) => self.local_error(format!("publisher answer: {e}")),
        }
    }

    /// New publishers: subscribe to those not yet asked for (never ourselves).
    fn want(&mut self, announced: Vec<(String, usize)>) {
        let me = self.inner.state.borrow().participant_id.clone();
        let mut fresh = Vec::new();
        for (id, streams) in announced {
            if id == me || streams == 0 {
                continue;
            }
            self.inner.state.send_modify(|s| {
                s.first_remote_track_at.get_or_insert_with(Instant::now);
                s.feeds.insert(id.clone(), streams);
            });
            if self.requested.insert(id.clone()) {
                fresh.push(id);
            }
        }
        if fresh.is_empty() {
            return;
        }
        match &mut self.subscription {
            Subscription::Idle => {
                match self
                    .inner
                    .session
                    .send(json!({ "janus": "attach", "plugin": VIDEOROOM }))
                {
                    Ok(transaction) => {
                        self.attach_transaction = Some(transaction);
                        self.subscription = Subscription::Attaching(fresh);
                    }
                    Err(e) => self.local_error(format!("attach: {e}")),
                }
            }
            Subscription::Attaching(queued) | Subscription::Joining(_, queued) => {
                queued.extend(fresh)
            }
            Subscription::Ready(handle) => {
                let handle = *handle;
                self.subscribe(handle, fresh);
            }
        }
    }

    fn join_as_subscriber(&mut self, handle: u64) {
        let feeds = match std::mem::replace(
            &mut self.subscription,
            Subscription::Joining(handle, vec![]),
        ) {
            Subscription::Attaching(feeds) => feeds,
            other => {
                self.subscription = other;
                return;
            }
        };
        let mut body = json!({
            "request": "join",
            "ptype": "subscriber",
            "room": self.inner.room,
            "streams": feeds.iter().map(|f| json!({ "feed": f })).collect::<Vec<_>>(),
        });
        if let Some(private_id) = &self.inner.private_id {
            body["private_id"] = private_id.clone();
        }
        if let Err(e) = self.inner.session.plugin_message(handle, body, None) {
            self.local_error(format!("subscriber join: {e}"));
        }
    }

    fn subscribe(&self, handle: u64, feeds: Vec<String>) {
        let body = json!({
            "request": "subscribe",
            "streams": feeds.iter().map(|f| json!({ "feed": f })).collect::<Vec<_>>(),
        });
        if let Err(e) = self.inner.session.plugin_message(handle, body, None) {
            self.local_error(format!("subscribe: {e}"));
        }
    }

    async fn subscriber_event(&mut self, sender: Option<u64>, data: &Value, jsep: Option<&Value>) {
        let handle = match self.subscription {
            Subscription::Joining(h, _) | Subscription::Ready(h) if Some(h) == sender => h,
            _ => return,
        };
        if data["videoroom"] == "attached" {
            if let Subscription::Joining(_, queued) =
                std::mem::replace(&mut self.subscription, Subscription::Ready(handle))
            {
                if !queued.is_empty() {
                    self.subscribe(handle, queued);
                }
            }
        }
        let Some(jsep) = jsep else { return };
        if jsep["type"] != "offer" {
            self.local_error(format!("subscriber JSEP of type {}", jsep["type"]));
            return;
        }
        self.inner.state.send_modify(|s| s.subscriber_offers += 1);
        let sdp =
            label_subscriber_offer(jsep["sdp"].as_str().unwrap_or_default(), &data["streams"]);
        match self.answer(handle, sdp).await {
            Ok(()) => self.inner.state.send_modify(|s| s.subscriber_answers += 1),
            Err(e) => self.local_error(format!("subscriber offer: {e}")),
        }
    }

    async fn answer(&self, handle: u64, sdp: String) -> Result<()> {
        let slot = &self.inner.subscriber;
        slot.pc
            .set_remote_description(RTCSessionDescription::offer(sdp)?)
            .await?;
        let answer = slot.pc.create_answer(None).await?;
        slot.remember_local_description(&answer.sdp);
        slot.pc.set_local_description(answer.clone()).await?;
        self.inner.session.plugin_message(
            handle,
            json!({ "request": "start" }),
            Some(json!({ "type": "answer", "sdp": answer.sdp })),
        )?;
        slot.open(handle, &self.inner.session);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
        a=group:BUNDLE 0 1\r\n\
        m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\na=msid:janus janus0\r\na=ssrc:11 cname:janus\r\n\
        m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendonly\r\na=msid:janus janus1\r\na=ssrc:12 cname:janus\r\n\
        m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=inactive\r\n";

    #[test]
    fn subscriber_offers_are_labelled_with_their_publishers() {
        let streams = json!([
            { "mindex": 0, "mid": "0", "type": "audio", "feed_id": "alice", "feed_mid": "0" },
            { "mindex": 1, "mid": "1", "type": "video", "feed_id": "alice", "feed_mid": "1" },
            { "mindex": 2, "mid": "2", "type": "video", "feed_id": "bob", "feed_mid": "1" },
        ]);
        let labelled = label_subscriber_offer(OFFER, &streams);
        assert!(labelled.contains("a=mid:0\r\na=sendonly\r\na=msid:alice alice-0\r\n"));
        assert!(labelled.contains("a=mid:1\r\na=sendonly\r\na=msid:alice alice-1\r\n"));
        assert!(!labelled.contains("janus janus"));
        // The inactive section has no msid to rewrite; everything else is untouched.
        assert!(labelled.ends_with("m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=inactive\r\n"));
        assert_eq!(labelled.lines().count(), OFFER.lines().count());
        // Numeric feed ids (Janus without string_ids) work too.
        let numeric = json!([{ "mid": "1", "feed_id": 1234, "feed_mid": "1" }]);
        assert!(label_subscriber_offer(OFFER, &numeric).contains("a=msid:1234 1234-1\r\n"));
        // No streams list: unchanged.
        assert_eq!(label_subscriber_offer(OFFER, &Value::Null), OFFER);
    }

    #[test]
    fn publishers_and_errors_are_read_from_events() {
        let data = json!({ "videoroom": "event", "publishers": [
            { "id": "p1", "streams": [{ "type": "audio" }, { "type": "video" }] },
            { "id": 7, "streams": [{ "type": "video", "disabled": true }] },
        ]});
        assert_eq!(
            listed_publishers(&data),
            [("p1".to_owned(), 2), ("7".to_owned(), 0)]
        );
        assert!(listed_publishers(&json!({ "videoroom": "joined" })).is_empty());

        let plugin_error = json!({ "janus": "event", "plugindata": { "data": {
            "videoroom": "event", "error_code": 427, "error": "Room exists" } } });
        assert!(matches!(
            janus_error(&plugin_error),
            Some(Error::Janus { code: 427, .. })
        ));
        let core_error =
            json!({ "janus": "error", "error": { "code": 458, "reason": "No such session" } });
        let e = janus_error(&core_error).unwrap();
        assert_eq!(e.to_string(), "janus error 458: No such session");
        assert!(janus_error(&json!({ "janus": "success", "data": { "id": 1 } })).is_none());
    }
}
