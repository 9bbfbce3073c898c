//! Running one load test: plan the peers (per room, publishers then subscribers), start joins
//! at a steady rate, hold the full load for the configured duration while reading the server's
//! `/metrics` and reporting live numbers, then take the final measurements, make every peer
//! leave (`leave`, then close), and build the report. A stop signal (Ctrl-C) at any point skips
//! to the measuring and leaving, so the report covers the run so far.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use super::report::{
    loss_pct, track_loss, ConfigSummary, JoinedPeer, LoadReport, Measurement, MetricsSample,
    PeerOutcome, PeerRecord, ReportInput, Role, ServerInput, TesterInput,
};
use super::server_metrics::{self, ServerProbe};
use super::target::{LoadPeer, Target};
use super::usage;
use crate::janus::JanusRoomOptions;
use crate::media_file::{IvfClip, OggOpusClip};
use crate::stats::lock;
use crate::PeerConfig;
use signaling::protocol::Quality;

/// How often live numbers are computed and `/metrics` is read.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// How long joins still in flight may finish after a stop before they are abandoned.
const STOP_JOIN_GRACE: Duration = Duration::from_secs(3);

/// What publishers send.
#[derive(Debug, Clone)]
pub enum LoadMedia {
    /// Synthetic VP8 at the configured bitrate (and synthetic Opus with audio), carrying
    /// probes for exact loss and one-way latency.
    Synthetic,
    /// Real media from files.
    Files {
        /// The VP8 clip every publisher sends.
        video: Arc<IvfClip>,
        /// The Opus clip every publisher sends, if any (else synthetic audio with `audio`).
        audio: Option<Arc<OggOpusClip>>,
    },
}

/// One load test.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server under test.
    pub target: Target,
    /// Signaling URL, `ws://HOST:PORT/ws` (Janus: `ws://HOST:PORT`).
    pub url: String,
    /// Rooms.
    pub rooms: usize,
    /// Publishers per room: publish video (and audio), subscribe to everything.
    pub publishers: usize,
    /// Subscribers per room: only subscribe.
    pub subscribers: usize,
    /// How long to hold the full load once every join has finished.
    pub duration: Duration,
    /// Synthetic video bitrate, bits per second.
    pub video_bitrate_bps: u32,
    /// Publishers also publish audio.
    pub audio: bool,
    /// Join attempts started per second.
    pub join_rate: f64,
    /// What publishers send.
    pub media: LoadMedia,
    /// Room names are `<prefix>-<run id>-<index>`, so runs never share a room.
    pub room_prefix: String,
    /// Where to read server CPU/RSS (`None`: derived from `url`).
    pub metrics_url: Option<String>,
    /// Read server CPU/RSS from `/proc/<pid>` of this process instead of `/metrics` (a
    /// server on this machine; the only way for Janus).
    pub server_pid: Option<u32>,
    /// How long one join may take before it counts as failed.
    pub join_timeout: Duration,
    /// Mint a join token per peer with this secret (for a server started with
    /// `--auth-secret`); subscribers' tokens do not allow publishing.
    pub auth_secret: Option<signaling::auth::Secret>,
    /// The local address peers bind for media (loopback for a server on this machine; an
    /// address that reaches the server otherwise).
    pub local_ip: std::net::IpAddr,
    /// Publishers send their video as simulcast: three synthetic layers
    /// (`SimulcastLayer::three_layers`) instead of one stream at `video_bitrate_bps`.
    pub simulcast: bool,
    /// With `simulcast`: every this often, each subscriber asks for another quality of every
    /// simulcast track (high → low → medium → high…), each subscriber a step apart from the
    /// one before, so switches happen all the time and never all at once.
    pub switch_every: Option<Duration>,
}

impl LoadConfig {
    /// The defaults of a first run against `url`: 1 room, 2 publishers, 2 subscribers, 15 s,
    /// 500 kbit/s synthetic video, no audio, 10 joins per second.
    pub fn new(url: impl Into<String>) -> Self {
        LoadConfig {
            target: Target::Ours,
            url: url.into(),
            rooms: 1,
            publishers: 2,
            subscribers: 2,
            duration: Duration::from_secs(15),
            video_bitrate_bps: 500_000,
            audio: false,
            join_rate: 10.0,
            media: LoadMedia::Synthetic,
            room_prefix: "load".to_owned(),
            metrics_url: None,
            server_pid: None,
            join_timeout: Duration::from_secs(10),
            auth_secret: None,
            local_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            simulcast: false,
            switch_every: None,
        }
    }

    /// Tracks each publisher publishes.
    pub fn tracks_per_publisher(&self) -> usize {
        1 + usize::from(self.publishes_audio())
    }

    fn publishes_audio(&self) -> bool {
        self.audio || matches!(&self.media, LoadMedia::Files { audio: Some(_), .. })
    }

    /// Probes are read only when everything published is synthetic: real payloads could now
    /// and then look like one.
    pub fn measurement(&self) -> Measurement {
        match self.media {
            LoadMedia::Synthetic => Measurement::Probes,
            LoadMedia::Files { .. } => Measurement::Rtp,
        }
    }

    /// Peers in all.
    pub fn total_peers(&self) -> usize {
        self.rooms * (self.publishers + self.subscribers)
    }

    /// Where server CPU and memory are read: `/proc/<server_pid>` if given, else our server's
    /// `/metrics`; an error says why there is nowhere (Janus has no `/metrics` of this kind).
    pub fn server_probe(&self) -> Result<ServerProbe, String> {
        if let Some(pid) = self.server_pid {
            return Ok(ServerProbe::Process(pid));
        }
        match self.target {
            Target::Ours => self
                .metrics_url
                .clone()
                .or_else(|| server_metrics::metrics_url_for(&self.url))
                .map(ServerProbe::Metrics)
                .ok_or_else(|| "no metrics URL".to_owned()),
            Target::Janus => Err("Janus has no /metrics of this kind: pass --server-pid \
                                  to read its CPU and memory from /proc"
                .to_owned()),
        }
    }

    /// The Janus room a first peer creates: as many publishers as planned, and a REMB cap
    /// well above what they send.
    fn janus_room(&self) -> JanusRoomOptions {
        JanusRoomOptions {
            publishers: self.publishers.max(1),
            bitrate_bps: self.video_bitrate_bps.saturating_mul(2).max(3_000_000),
        }
    }
    fn summary(&self) -> ConfigSummary {
        let (media, audio_file) = match &self.media {
            LoadMedia::Synthetic => ("synthetic".to_owned(), None),
            LoadMedia::Files { video, audio } => (
                video.path.display().to_string(),
                audio.as_ref().map(|a| a.path.display().to_string()),
            ),
        };
        ConfigSummary {
            target: self.target,
            url: self.url.clone(),
            rooms: self.rooms,
            publishers_per_room: self.publishers,
            subscribers_per_room: self.subscribers,
            duration_s: self.duration.as_secs_f64(),
            video_bitrate_bps: self.video_bitrate_bps,
            audio: self.publishes_audio(),
            join_rate: self.join_rate,
            media,
            audio_file,
            simulcast: self.simulcast,
            switch_every_s: self.switch_every.map(|d| d.as_secs_f64()),
        }
    }
}

/// Where the run is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    /// Joins are being started.
    Joining,
    /// Every join finished; the full load is held for `remaining` more.
    Holding {
        /// Time left.
        remaining: Duration,
    },
    /// Measuring is over; peers are leaving.
    Leaving,
}

/// Live numbers, every [`SAMPLE_INTERVAL`].
#[derive(Debug, Clone)]
pub struct LiveStatus {
    /// Where the run is.
    pub phase: Phase,
    /// Peers planned.
    pub planned: usize,
    /// Peers joined.
    pub joined: usize,
    /// Joins that failed.
    pub failed: usize,
    /// RTP payload received by all peers over the last interval, bits per second.
    pub receive_bps: f64,
    /// RTP payload sent by all publishers over the last interval, bits per second.
    pub send_bps: f64,
    /// Loss so far over all received tracks, percent.
    pub loss_pct: f64,
    /// Failed joins plus errors peers saw.
    pub errors: usize,
    /// Server CPU over the last interval, percent of one core, if readable.
    pub server_cpu_percent: Option<f64>,
}

/// One planned peer.
struct Slot {
    /// Name, role, room.
    name: String,
    role: Role,
    room: usize,
    /// Where its join is.
    state: SlotState,
}

enum SlotState {
    NotStarted,
    Joining,
    Joined {
        peer: LoadPeer,
        /// Where the join clock starts (see [`JoinedPeer::clock_start`]).
        started: Instant,
    },
    Failed(String),
}

/// A random hex id for this run's room names.
fn run_id() -> String {
    format!("{:06x}", crate::random_u64() & 0xff_ffff)
}

/// The peers of a run, in join order: rooms interleaved, every publisher before any subscriber
/// (so subscribers find media waiting, as in a real webinar).
fn plan(config: &LoadConfig) -> Vec<Slot> {
    let mut slots = Vec::with_capacity(config.total_peers());
    for (role, count, prefix) in [
        (Role::Publisher, config.publishers, "pub"),
        (Role::Subscriber, config.subscribers, "sub"),
    ] {
        for n in 0..count {
            for room in 0..config.rooms {
                slots.push(Slot {
                    name: format!("{prefix}-{room}-{n}"),
                    role,
                    room,
                    state: SlotState::NotStarted,
                });
            }
        }
    }
    slots
}

/// How long minted tokens stay valid: the whole run, with room to spare.
fn token_ttl(config: &LoadConfig) -> Duration {
    let joins = Duration::from_secs_f64(config.total_peers() as f64 / config.join_rate.max(0.001));
    joins + config.duration + config.join_timeout + Duration::from_secs(600)
}

fn peer_config(config: &LoadConfig, room_name: &str, slot: &Slot) -> PeerConfig {
    let mut pc = PeerConfig::new(config.url.clone(), room_name, slot.name.clone());
    if let Some(secret) = &config.auth_secret {
        let claims = signaling::auth::Claims::new(
            room_name,
            Some(slot.name.clone()),
            token_ttl(config),
            slot.role == Role::Publisher,
        );
        match signaling::auth::mint(secret, &claims) {
            Ok(token) => pc = pc.token(token),
            // The join then fails `unauthorized`, and the report says so.
            Err(e) => tracing::warn!("could not mint a token: {e}"),
        }
    }
    pc.join_timeout = config.join_timeout;
    pc.pc.udp_addrs = vec![std::net::SocketAddr::new(config.local_ip, 0).to_string()];
    pc.read_probes = config.measurement() == Measurement::Probes;
    if slot.role == Role::Subscriber {
        return pc.watcher();
    }
    pc = pc
        .publish(true, config.publishes_audio())
        .video_bitrate(config.video_bitrate_bps);
    if config.simulcast {
        pc = pc.simulcast();
    }
    if let LoadMedia::Files { video, audio } = &config.media {
        pc = pc.video_clip(Arc::clone(video));
        if let Some(audio) = audio {
            pc = pc.audio_clip(Arc::clone(audio));
        }
    }
    pc
}

/// Totals for the live line.
#[derive(Default)]
struct Totals {
    received_packets: u64,
    received_bytes: u64,
    sent_bytes: u64,
    lost: u64,
    expected: u64,
    errors: usize,
}

fn totals(slots: &[Slot], measurement: Measurement) -> Totals {
    let mut t = Totals::default();
    for slot in slots {
        match &slot.state {
            // Nothing is copied: a subscriber's room state lists every participant, and
            // copying that for every peer every second grows with the square of the room.
            SlotState::Joined { peer, .. } => {
                peer.for_each_received_track(|_, track| {
                    t.received_packets += track.packets;
                    t.received_bytes += track.bytes;
                    let (lost, expected) = track_loss(track, measurement);
                    t.lost += lost;
                    t.expected += expected;
                });
                for sent in peer.sent_stats().values() {
                    t.sent_bytes += sent.bytes;
                    t.errors += sent.write_errors as usize;
                }
                t.errors += peer.error_count();
            }
            SlotState::Failed(_) => t.errors += 1,
            _ => {}
        }
    }
    t
}

/// Reads the server every [`SAMPLE_INTERVAL`] until `stop` flips.
async fn sample_server(
    probe: ServerProbe,
    samples: Arc<Mutex<Vec<MetricsSample>>>,
    error: Arc<Mutex<Option<String>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(SAMPLE_INTERVAL);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        match probe.read().await {
            Ok(sample) => lock(&samples).push(sample),
            Err(e) => {
                tracing::debug!("server readings: {e}");
                lock(&error).get_or_insert(e);
            }
        }
    }
}

/// Runs the load test described by `config` until its duration is over or `stop` resolves,
/// calling `on_status` with live numbers every [`SAMPLE_INTERVAL`]; every peer has left when
/// this returns.
pub async fn run_load(
    config: LoadConfig,
    stop: impl Future<Output = ()>,
    mut on_status: impl FnMut(&LiveStatus),
) -> LoadReport {
    let measurement = config.measurement();
    let run = run_id();
    let room_names: Vec<String> = (0..config.rooms)
        .map(|i| format!("{}-{run}-{i}", config.room_prefix))
        .collect();
    let mut slots = plan(&config);
    let planned = slots.len();

    let (probe, probe_error) = match config.server_probe() {
        Ok(probe) => (Some(probe), None),
        Err(e) => (None, Some(e)),
    };
    let samples: Arc<Mutex<Vec<MetricsSample>>> = Arc::default();
    let metrics_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(probe_error));
    let (stop_sampler, sampler_stopped) = watch::channel(false);
    let sampler = probe.clone().map(|probe| {
        tokio::spawn(sample_server(
            probe,
            Arc::clone(&samples),
            Arc::clone(&metrics_error),
            sampler_stopped,
        ))
    });

    let started = Instant::now();
    let tester_start = usage::sample();
    let mut tester_hold = None;
    let mut machine_at_hold = None;
    let mut hold_started: Option<Instant> = None;
    let mut packets_at_hold = 0u64;
    let mut interrupted = false;

    let mut joins: JoinSet<(usize, Instant, crate::Result<LoadPeer>)> = JoinSet::new();
    let mut next_join = 0usize;
    let pace = Duration::from_secs_f64(1.0 / config.join_rate.max(0.001));
    let mut pacer = tokio::time::interval(pace);
    pacer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut status_tick = tokio::time::interval(SAMPLE_INTERVAL);
    status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut switch_tick = config.switch_every.map(|every| {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick
    });
    let mut switch_round = 0usize;
    let mut quality_requests = 0u64;
    let mut last_totals = (Instant::now(), 0u64, 0u64);
    tokio::pin!(stop);

    let hold_end = |hold_started: Option<Instant>| hold_started.map(|h| h + config.duration);
    loop {
        let joining = next_join < planned || !joins.is_empty();
        let anyone_in = slots
            .iter()
            .any(|s| matches!(s.state, SlotState::Joined { .. }));
        if !joining && !anyone_in {
            // Every join failed: there is no load to hold.
            break;
        }
        if !joining && hold_started.is_none() {
            hold_started = Some(Instant::now());
            tester_hold = Some(usage::sample());
            machine_at_hold = usage::machine_cpu();
            packets_at_hold = totals(&slots, measurement).received_packets;
            // A reading right at the hold's start, so server CPU while held covers exactly the
            // window the packets are counted over.
            if let Some(probe) = &probe {
                if let Ok(sample) = probe.read().await {
                    lock(&samples).push(sample);
                }
            }
        }
        let deadline = hold_end(hold_started);
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let sleep_until = deadline.map_or_else(
            || tokio::time::Instant::now() + Duration::from_secs(3600),
            tokio::time::Instant::from_std,
        );
        tokio::select! {
            () = &mut stop => {
                interrupted = true;
                break;
            }
            _ = pacer.tick(), if next_join < planned => {
                let index = next_join;
                next_join += 1;
                let slot = &mut slots[index];
                let pc = peer_config(&config, &room_names[slot.room], slot);
                slot.state = SlotState::Joining;
                let (target, room) = (config.target, config.janus_room());
                joins.spawn(async move {
                    let opened = Instant::now();
                    (index, opened, LoadPeer::join(target, pc, room).await)
                });
            }
            Some(result) = joins.join_next(), if !joins.is_empty() => {
                settle_join(&mut slots, result);
            }
            // Evaluated only when the guard holds (`select!`), so the tick is there.
            _ = async { switch_tick.as_mut().expect("guarded").tick().await },
                if switch_tick.is_some() && hold_started.is_some() => {
                quality_requests += switch_qualities(&slots, switch_round);
                switch_round += 1;
            }
            _ = status_tick.tick() => {
                let phase = match deadline {
                    Some(d) => Phase::Holding { remaining: d.saturating_duration_since(Instant::now()) },
                    None => Phase::Joining,
                };
                let status = live_status(&slots, measurement, phase, &mut last_totals, &samples);
                on_status(&status);
            }
            _ = tokio::time::sleep_until(sleep_until) => {}
        }
    }

    // Joins still in flight get a moment to finish, so they can leave properly.
    let grace = tokio::time::Instant::now() + STOP_JOIN_GRACE;
    while !joins.is_empty() {
        match tokio::time::timeout_at(grace, joins.join_next()).await {
            Ok(Some(result)) => settle_join(&mut slots, result),
            Ok(None) => break,
            Err(_) => {
                // Dropping a join closes its socket, which the server treats as leaving.
                joins.abort_all();
                for slot in &mut slots {
                    if matches!(slot.state, SlotState::Joining) {
                        slot.state = SlotState::Failed("abandoned at stop".to_owned());
                    }
                }
                break;
            }
        }
    }

    let ended = Instant::now();
    let packets_received_hold = hold_started.map(|_| {
        totals(&slots, measurement)
            .received_packets
            .saturating_sub(packets_at_hold)
    });
    let tester_end = usage::sample();
    let machine_at_end = usage::machine_cpu();
    let (_, max_rss_bytes) = usage::self_usage();
    let _ = stop_sampler.send(true);
    if let Some(sampler) = sampler {
        let _ = sampler.await;
    }
    // The closing reading, so the server's numbers cover the run to its end.
    if let Some(probe) = &probe {
        match probe.read().await {
            Ok(sample) => lock(&samples).push(sample),
            Err(e) => {
                lock(&metrics_error).get_or_insert(e);
            }
        }
    }
    let status = live_status(
        &slots,
        measurement,
        Phase::Leaving,
        &mut last_totals,
        &samples,
    );
    on_status(&status);

    // Final measurements, then everyone leaves at once.
    let mut records = Vec::with_capacity(planned);
    let mut leaving = JoinSet::new();
    for slot in slots {
        let outcome = match slot.state {
            SlotState::NotStarted => PeerOutcome::NotStarted,
            SlotState::Joining => PeerOutcome::Failed {
                reason: "abandoned at stop".to_owned(),
            },
            SlotState::Failed(reason) => PeerOutcome::Failed { reason },
            SlotState::Joined { peer, started } => {
                let joined = JoinedPeer {
                    participant_id: peer.participant_id(),
                    clock_start: peer.media_clock_start(started),
                    stats: peer.stats(),
                    own_track_ids: peer.own_track_ids(),
                    errors: peer.errors(),
                };
                leaving.spawn(peer.leave());
                PeerOutcome::Joined(Box::new(joined))
            }
        };
        records.push(PeerRecord {
            name: slot.name,
            role: slot.role,
            room: slot.room,
            outcome,
        });
    }
    while leaving.join_next().await.is_some() {}

    let mut server_samples = std::mem::take(&mut *lock(&samples));
    // The hold's reading and the sampler's may have landed out of order.
    server_samples.sort_by_key(|s| s.at);
    let server_error = if server_samples.len() >= 2 {
        None
    } else {
        lock(&metrics_error).clone()
    };
    LoadReport::build(ReportInput {
        config: config.summary(),
        peers: &records,
        tracks_per_publisher: config.tracks_per_publisher(),
        measurement,
        started,
        hold_started,
        ended,
        interrupted,
        packets_received_hold,
        quality_requests,
        server: ServerInput {
            metrics_url: match &probe {
                Some(ServerProbe::Metrics(url)) => Some(url.clone()),
                _ => None,
            },
            pid: match probe {
                Some(ServerProbe::Process(pid)) => Some(pid),
                _ => None,
            },
            samples: server_samples,
            error: server_error,
        },
        tester: TesterInput {
            start: tester_start,
            hold: tester_hold,
            end: tester_end,
            max_rss_bytes,
            cores: usage::cores(),
            machine: machine_at_hold.zip(machine_at_end),
        },
    })
}

/// The qualities subscribers cycle through with `--switch-every`.
const SWITCH_CYCLE: [Quality; 3] = [Quality::High, Quality::Low, Quality::Medium];

/// One round of quality changes: the n-th joined subscriber asks for step `round + n` of the
/// cycle for every simulcast track it receives. Returns the requests sent.
fn switch_qualities(slots: &[Slot], round: usize) -> u64 {
    let subscribers = slots.iter().filter_map(|slot| match &slot.state {
        SlotState::Joined { peer, .. } if slot.role == Role::Subscriber => Some(peer),
        _ => None,
    });
    subscribers
        .enumerate()
        .map(|(n, peer)| peer.set_simulcast_quality(SWITCH_CYCLE[(round + n) % SWITCH_CYCLE.len()]))
        .sum()
}

fn settle_join(
    slots: &mut [Slot],
    result: Result<(usize, Instant, crate::Result<LoadPeer>), tokio::task::JoinError>,
) {
    match result {
        Ok((index, started, Ok(peer))) => {
            slots[index].state = SlotState::Joined { peer, started };
        }
        Ok((index, _, Err(e))) => {
            tracing::debug!(peer = %slots[index].name, "join failed: {e}");
            slots[index].state = SlotState::Failed(e.to_string());
        }
        Err(e) => tracing::warn!("a join task died: {e}"),
    }
}

fn live_status(
    slots: &[Slot],
    measurement: Measurement,
    phase: Phase,
    last: &mut (Instant, u64, u64),
    samples: &Mutex<Vec<MetricsSample>>,
) -> LiveStatus {
    let t = totals(slots, measurement);
    let now = Instant::now();
    let secs = now.saturating_duration_since(last.0).as_secs_f64();
    let rate = |now_bytes: u64, then: u64| {
        if secs > 0.0 {
            now_bytes.saturating_sub(then) as f64 * 8.0 / secs
        } else {
            0.0
        }
    };
    let status = LiveStatus {
        phase,
        planned: slots.len(),
        joined: slots
            .iter()
            .filter(|s| matches!(s.state, SlotState::Joined { .. }))
            .count(),
        failed: slots
            .iter()
            .filter(|s| matches!(s.state, SlotState::Failed(_)))
            .count(),
        receive_bps: rate(t.received_bytes, last.1),
        send_bps: rate(t.sent_bytes, last.2),
        loss_pct: loss_pct(t.lost, t.expected),
        errors: t.errors,
        server_cpu_percent: recent_server_cpu(&lock(samples)),
    };
    *last = (now, t.received_bytes, t.sent_bytes);
    status
}

/// Server CPU over the latest readings: the last second, or the last ten when the counter only
/// counts whole seconds (one second of such a counter reads 0% or 100%).
fn recent_server_cpu(samples: &[MetricsSample]) -> Option<f64> {
    let last = samples.last()?;
    let step = super::report::cpu_counter_step(samples);
    let window = Duration::from_secs_f64((10.0 * step).max(1.0));
    let first = samples
        .iter()
        .rev()
        .find(|s| last.at.saturating_duration_since(s.at) >= window)
        .or_else(|| samples.first())?;
    super::report::cpu_percent(
        Duration::from_secs_f64((last.cpu_seconds - first.cpu_seconds).max(0.0)),
        last.at.saturating_duration_since(first.at),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_puts_publishers_first_and_interleaves_rooms() {
        let mut config = LoadConfig::new("ws://127.0.0.1:1/ws");
        config.rooms = 2;
        config.publishers = 2;
        config.subscribers = 1;
        let names: Vec<String> = plan(&config).into_iter().map(|s| s.name).collect();
        assert_eq!(
            names,
            ["pub-0-0", "pub-1-0", "pub-0-1", "pub-1-1", "sub-0-0", "sub-1-0"]
        );
    }

    #[test]
    fn live_server_cpu_smooths_a_whole_second_counter() {
        let base = Instant::now();
        let sample = |secs: u64, cpu: f64| MetricsSample {
            at: base + Duration::from_secs(secs),
            cpu_seconds: cpu,
            rss_bytes: 0.0,
        };
        assert_eq!(recent_server_cpu(&[]), None);
        assert_eq!(recent_server_cpu(&[sample(0, 1.0)]), None);
        // Whole seconds: 3 s of CPU over the last 10 s, not the 100% of the last second.
        let whole: Vec<MetricsSample> = (0..=12).map(|i| sample(i, (i * 3 / 10) as f64)).collect();
        assert_eq!(recent_server_cpu(&whole), Some(30.0));
        // Fractions: the last second alone.
        let fine = [sample(0, 0.0), sample(1, 0.25), sample(2, 0.75)];
        assert_eq!(recent_server_cpu(&fine), Some(50.0));
    }

    #[test]
    fn probes_only_with_synthetic_media() {
        let mut config = LoadConfig::new("ws://127.0.0.1:1/ws");
        assert_eq!(config.measurement(), Measurement::Probes);
        assert_eq!(config.tracks_per_publisher(), 1);
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        config.media = LoadMedia::Files {
            video: IvfClip::open(dir.join("testsrc-320x240-30fps.ivf")).unwrap(),
            audio: Some(OggOpusClip::open(dir.join("sine-440hz-48k.ogg")).unwrap()),
        };
        assert_eq!(config.measurement(), Measurement::Rtp);
        // An audio file publishes audio even without `audio`.
        assert_eq!(config.tracks_per_publisher(), 2);
        let slots = plan(&config);
        let pc = peer_config(&config, "r", &slots[0]);
        assert!(pc.publish_video && pc.publish_audio && !pc.read_probes);
        assert!(pc.video_clip.is_some() && pc.audio_clip.is_some());
        let sub = peer_config(&config, "r", slots.last().unwrap());
        assert!(!sub.publish_video && !sub.publish_audio);
        assert_eq!(sub.pc.udp_addrs, ["127.0.0.1:0"]);
    }
}
