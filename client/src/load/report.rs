//! The load test's report: the math that turns what every peer measured into joins, tracks,
//! bitrates, loss, jitter, latency, server and tester CPU/RSS; the verdict; and the two
//! renderings (text for people, JSON for scripts, whose schema `docs/load-testing.md`
//! documents). Everything here is pure: inputs in, report out, so the math is unit-tested.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::stats::{LatencyHistogram, PeerStats, TrackStats};

/// Version of the JSON layout; bumped when a field changes meaning or disappears.
pub const SCHEMA_VERSION: u32 = 1;

/// Loss at or above this fails the run.
pub const LOSS_LIMIT_PCT: f64 = 1.0;

/// A track whose last packet is older than this when the run ends has stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(2);

/// Tester CPU (share of all cores) above which the tester may be what limits the numbers.
pub const TESTER_CPU_WARN_SHARE: f64 = 0.6;

/// Publishers' synthetic video below this share of the configured bitrate means the tester fell
/// behind.
pub const SEND_SHORTFALL_SHARE: f64 = 0.9;

/// Machine CPU (share of all cores, every process) above which the machine was saturated.
pub const MACHINE_CPU_WARN_SHARE: f64 = 0.9;

/// What a peer does in the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Publishes video (and audio) and subscribes to everything.
    Publisher,
    /// Only subscribes.
    Subscriber,
}

/// Where loss and latency come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Measurement {
    /// The send time and counter embedded in every synthetic payload: exact end-to-end loss
    /// and one-way latency.
    Probes,
    /// RTP sequence numbers and timestamps (real media has no room for probes): loss the SFU
    /// did not hide by renumbering, jitter, and no one-way latency.
    Rtp,
}

impl Measurement {
    /// A sentence saying what the numbers mean.
    pub fn note(self) -> &'static str {
        match self {
            Measurement::Probes => {
                "loss and one-way latency from the send time and counter embedded in every synthetic payload"
            }
            Measurement::Rtp => {
                "real media carries no probes: loss from RTP sequence gaps as received (the SFU renumbers \
                 packets, so loss before it is not seen), jitter from RTP timestamps, one-way latency not measured"
            }
        }
    }
}

/// The run's settings, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigSummary {
    /// The server under test: `ours` or `janus`.
    pub target: super::Target,
    /// Signaling URL.
    pub url: String,
    /// Rooms.
    pub rooms: usize,
    /// Publishers per room.
    pub publishers_per_room: usize,
    /// Subscribers per room.
    pub subscribers_per_room: usize,
    /// How long the full load was to be held, seconds.
    pub duration_s: f64,
    /// Synthetic video bitrate, bits per second (ignored with file media).
    pub video_bitrate_bps: u32,
    /// Whether publishers publish audio.
    pub audio: bool,
    /// Join attempts started per second.
    pub join_rate: f64,
    /// `synthetic`, or the IVF file published.
    pub media: String,
    /// The Ogg file published as audio, if any.
    pub audio_file: Option<String>,
    /// Whether publishers sent simulcast (three synthetic layers).
    #[serde(default)]
    pub simulcast: bool,
    /// How often subscribers changed the quality they ask for, seconds (`--switch-every`).
    #[serde(default)]
    pub switch_every_s: Option<f64>,
}

/// One peer as the run left it: the input to the report.
#[derive(Debug)]
pub struct PeerRecord {
    /// Display name (`pub-<room>-<n>` / `sub-<room>-<n>`).
    pub name: String,
    /// Publisher or subscriber.
    pub role: Role,
    /// Room index.
    pub room: usize,
    /// How its join went.
    pub outcome: PeerOutcome,
}

/// How a peer's join went.
#[derive(Debug)]
pub enum PeerOutcome {
    /// The run stopped before its turn.
    NotStarted,
    /// Joining failed; the reason in words.
    Failed {
        /// Why.
        reason: String,
    },
    /// It joined; what it measured.
    Joined(Box<JoinedPeer>),
}

/// What a joined peer measured.
#[derive(Debug)]
pub struct JoinedPeer {
    /// Its participant id.
    pub participant_id: String,
    /// Where its join clock starts: when it opened the socket, or, if the room had no track
    /// to receive then, when the first one was announced.
    pub clock_start: Instant,
    /// Its measurements at the end.
    pub stats: PeerStats,
    /// Server track ids of what it published (empty for subscribers).
    pub own_track_ids: Vec<String>,
    /// Server `error` messages and local failures it saw.
    pub errors: Vec<String>,
}

/// One `/metrics` reading.
#[derive(Debug, Clone, Copy)]
pub struct MetricsSample {
    /// When it was read.
    pub at: Instant,
    /// `process_cpu_seconds_total`.
    pub cpu_seconds: f64,
    /// `process_resident_memory_bytes`.
    pub rss_bytes: f64,
}

/// What was read from the server.
#[derive(Debug, Clone, Default)]
pub struct ServerInput {
    /// The metrics URL (`None`: not scraped).
    pub metrics_url: Option<String>,
    /// The server's process id, when CPU and memory were read from `/proc/<pid>` instead.
    pub pid: Option<u32>,
    /// Readings in time order.
    pub samples: Vec<MetricsSample>,
    /// Why readings are missing, if they are.
    pub error: Option<String>,
}

/// The tester's own CPU time at one moment.
#[derive(Debug, Clone, Copy)]
pub struct UsageSample {
    /// When.
    pub at: Instant,
    /// User plus system CPU time of the whole process so far.
    pub cpu: Duration,
}

/// The whole machine's CPU time at one moment, in clock ticks summed over cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineCpu {
    /// Ticks spent on anything but idling.
    pub busy_ticks: u64,
    /// All ticks.
    pub total_ticks: u64,
    /// CPUs the machine has (the ticks are summed over them).
    pub cores: usize,
}

/// The tester's own usage.
#[derive(Debug, Clone, Copy)]
pub struct TesterInput {
    /// At the start of the run.
    pub start: UsageSample,
    /// When the hold phase began (all joins done), if it did.
    pub hold: Option<UsageSample>,
    /// At the end (before leaving).
    pub end: UsageSample,
    /// Peak resident memory of the tester, bytes.
    pub max_rss_bytes: u64,
    /// CPU cores of this machine.
    pub cores: usize,
    /// The machine's CPU time when the hold began and at the end, where readable.
    pub machine: Option<(MachineCpu, MachineCpu)>,
}

/// Everything the report is computed from.
#[derive(Debug)]
pub struct ReportInput<'a> {
    /// Settings.
    pub config: ConfigSummary,
    /// Every peer planned, joined or not.
    pub peers: &'a [PeerRecord],
    /// Tracks each publisher publishes (1 video, or 2 with audio).
    pub tracks_per_publisher: usize,
    /// Where loss and latency come from.
    pub measurement: Measurement,
    /// When the first join started.
    pub started: Instant,
    /// When the last join finished and the hold began, if it did.
    pub hold_started: Option<Instant>,
    /// When measuring stopped.
    pub ended: Instant,
    /// Whether Ctrl-C cut the run short.
    pub interrupted: bool,
    /// RTP packets all peers received while the full load was held (from the hold's start to
    /// `ended`), if it was held.
    pub packets_received_hold: Option<u64>,
    /// `set_quality` requests subscribers sent (`--switch-every`).
    pub quality_requests: u64,
    /// Server readings.
    pub server: ServerInput,
    /// Tester readings.
    pub tester: TesterInput,
}

/// Order statistics of a set of values (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// How many values.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// Timing of the run.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// From the first join attempt to the last join finishing, seconds.
    pub join_phase_s: f64,
    /// How long the full load was held, seconds.
    pub hold_s: f64,
    /// Whether Ctrl-C cut the run short.
    pub interrupted: bool,
}

/// A failed join.
#[derive(Debug, Clone, Serialize)]
pub struct JoinFailure {
    /// Peer name.
    pub peer: String,
    /// Why.
    pub reason: String,
}

/// Joins.
#[derive(Debug, Clone, Serialize)]
pub struct JoinSummary {
    /// Peers planned.
    pub planned: usize,
    /// Joins attempted.
    pub attempted: usize,
    /// Joins that got `joined`.
    pub succeeded: usize,
    /// Joins that did not.
    pub failed: usize,
    /// The failures (at most 50 listed).
    pub failures: Vec<JoinFailure>,
    /// Join time (socket open, or first track announced, → first media packet), ms, over peers
    /// that had something to receive and received it.
    pub join_time_ms: Option<Percentiles>,
}

/// Tracks.
#[derive(Debug, Clone, Serialize)]
pub struct TrackSummary {
    /// Tracks that joined peers should receive (every other joined publisher's tracks).
    pub expected: usize,
    /// Of those, received (at least one packet).
    pub received: usize,
    /// Received tracks whose packets stopped for more than 2 s before the end.
    pub stalled: usize,
    /// Joined peers that received every expected track.
    pub peers_complete: usize,
    /// Joined peers.
    pub peers_joined: usize,
}

/// Bitrates, bits per second of RTP payload (headers, SRTP and UDP not counted).
#[derive(Debug, Clone, Serialize)]
pub struct BitrateSummary {
    /// Sum over all joined peers.
    pub total: f64,
    /// Mean per peer that had something to receive.
    pub per_peer_mean: f64,
    /// Lowest of those.
    pub per_peer_min: f64,
    /// What each peer should have received on average: the send bitrate of the publishers it
    /// subscribes to.
    pub expected_per_peer_mean: f64,
}

/// Send bitrates, bits per second of RTP payload.
#[derive(Debug, Clone, Serialize)]
pub struct SendSummary {
    /// Sum over publishers.
    pub total: f64,
    /// Mean per publisher.
    pub per_publisher_mean: f64,
    /// Mean video bitrate per publisher (compare with `config.video_bitrate_bps` for
    /// synthetic media: less means the tester could not send what it was asked to).
    pub video_per_publisher_mean: f64,
}

/// Jitter over received tracks.
#[derive(Debug, Clone, Serialize)]
pub struct JitterSummary {
    /// Mean RFC 3550 jitter over received audio tracks, ms.
    pub audio_mean: Option<f64>,
    /// Mean over received video tracks, ms (a frame's packets leave in a burst, so video
    /// jitter is naturally higher).
    pub video_mean: Option<f64>,
    /// Largest of any track, ms.
    pub max: f64,
}

/// Media quality.
#[derive(Debug, Clone, Serialize)]
pub struct MediaSummary {
    /// Where loss and latency come from.
    pub measurement: Measurement,
    /// What that means, in words.
    pub note: String,
    /// Packets expected over all received tracks.
    pub packets_expected: u64,
    /// Of those, lost.
    pub packets_lost: u64,
    /// `packets_lost / packets_expected`, percent.
    pub loss_pct: f64,
    /// RTP packets all peers received while the full load was held (retransmissions and
    /// duplicates included): what the server forwarded, counted at the receivers.
    pub packets_received_hold: Option<u64>,
    /// What peers received.
    pub receive_bitrate_bps: BitrateSummary,
    /// What publishers sent.
    pub send_bitrate_bps: SendSummary,
    /// Jitter (`None` if nothing was received).
    pub jitter_ms: Option<JitterSummary>,
    /// One-way latency, ms (`None` without probes).
    pub latency_ms: Option<Percentiles>,
    /// With simulcast: the layer switches receivers saw.
    pub simulcast: Option<SimulcastSummary>,
}

/// Simulcast layer switches as the receivers saw them (from the probes, which name their
/// layer): each must start on a keyframe and continue the stream, or a browser's decoder
/// would stall.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SimulcastSummary {
    /// `set_quality` requests the subscribers sent.
    pub quality_requests: u64,
    /// Switches from one layer to another in what receivers got.
    pub layer_switches: u64,
    /// Of those, starting on a keyframe.
    pub on_keyframe: u64,
    /// Of those, with the VP8 picture id continuing (the next number after the last one
    /// received, give or take a picture lost on the way).
    pub pictures_continued: u64,
}

/// The server's CPU and memory, from its `/metrics` or from `/proc/<pid>`.
#[derive(Debug, Clone, Serialize)]
pub struct ServerSummary {
    /// Where they were read (`None` when read from `/proc`).
    pub metrics_url: Option<String>,
    /// The server's process id, when they were read from `/proc/<pid>`.
    pub pid: Option<u32>,
    /// Readings taken.
    pub samples: usize,
    /// CPU over the whole run, percent of one core.
    pub cpu_percent_avg: Option<f64>,
    /// CPU while the full load was held, percent of one core.
    pub cpu_percent_hold: Option<f64>,
    /// CPU seconds the server used while the full load was held.
    pub cpu_seconds_hold: Option<f64>,
    /// `media.packets_received_hold / cpu_seconds_hold`: packets forwarded per second of
    /// server CPU.
    pub packets_per_cpu_second: Option<f64>,
    /// Highest CPU over any window of at least `peak_window_s`, percent of one core.
    pub cpu_percent_peak: Option<f64>,
    /// The shortest window the peak is taken over, seconds: ten steps of the CPU counter, and
    /// at least one second.
    pub peak_window_s: f64,
    /// The step of the server's CPU counter, seconds (1 when it only reports whole seconds,
    /// as the Rust prometheus crate's process collector does).
    pub cpu_counter_step_s: f64,
    /// How far `cpu_percent_avg` can be off because of that step, percentage points.
    pub cpu_percent_avg_error: Option<f64>,
    /// RSS at the first reading, bytes.
    pub rss_bytes_start: Option<f64>,
    /// RSS at the last reading, bytes.
    pub rss_bytes_end: Option<f64>,
    /// Highest RSS read, bytes.
    pub rss_bytes_peak: Option<f64>,
    /// Why readings are missing, if they are.
    pub error: Option<String>,
}

/// The tester's own cost.
#[derive(Debug, Clone, Serialize)]
pub struct TesterSummary {
    /// CPU cores of the machine.
    pub cores: usize,
    /// Peers that joined.
    pub peers: usize,
    /// Tester CPU over the whole run, percent of one core.
    pub cpu_percent_avg: f64,
    /// Tester CPU while the full load was held, percent of one core.
    pub cpu_percent_hold: Option<f64>,
    /// `cpu_percent_hold / peers`: percent of one core per joined peer.
    pub cpu_percent_per_peer: Option<f64>,
    /// Peak resident memory of the tester, bytes.
    pub max_rss_bytes: u64,
    /// How busy the whole machine was while the load was held (every process: tester,
    /// server if local, anything else), percent of one core (at most `machine_cores * 100`).
    pub machine_cpu_percent_hold: Option<f64>,
    /// CPUs of the machine (may exceed `cores` when this process is confined to fewer).
    pub machine_cores: Option<usize>,
}

/// One peer in the report.
#[derive(Debug, Clone, Serialize)]
pub struct PeerSummary {
    /// Name.
    pub name: String,
    /// Publisher or subscriber.
    pub role: Role,
    /// Room index.
    pub room: usize,
    /// `joined`, `failed` or `not_started`.
    pub status: &'static str,
    /// Why the join failed.
    pub failure: Option<String>,
    /// Join time, ms.
    pub join_time_ms: Option<f64>,
    /// Tracks it should receive.
    pub tracks_expected: usize,
    /// Of those, received.
    pub tracks_received: usize,
    /// Of those received, stalled.
    pub tracks_stalled: usize,
    /// Received bitrate, bits per second of RTP payload.
    pub receive_bitrate_bps: f64,
    /// Loss over its received tracks, percent.
    pub loss_pct: f64,
    /// Mean jitter over its received tracks, ms.
    pub jitter_ms: Option<f64>,
    /// Median one-way latency, ms (probes only).
    pub latency_p50_ms: Option<f64>,
    /// 99th percentile one-way latency, ms (probes only).
    pub latency_p99_ms: Option<f64>,
    /// Errors it saw (server `error` messages, local failures).
    pub errors: usize,
}

/// The one-line answer.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// All joins, all tracks flowing, loss under 1%.
    pub pass: bool,
    /// `PASS: ...` or `FAIL: ...`, one line.
    pub line: String,
    /// Why it failed (empty on pass).
    pub failures: Vec<String>,
    /// Things that make the numbers less trustworthy, pass or fail.
    pub warnings: Vec<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Settings.
    pub config: ConfigSummary,
    /// Timing.
    pub run: RunSummary,
    /// Joins.
    pub joins: JoinSummary,
    /// Tracks.
    pub tracks: TrackSummary,
    /// Media quality.
    pub media: MediaSummary,
    /// Server CPU and memory.
    pub server: ServerSummary,
    /// Tester CPU and memory.
    pub tester: TesterSummary,
    /// Every peer.
    pub peers: Vec<PeerSummary>,
    /// The verdict.
    pub verdict: Verdict,
}

/// The nearest-rank percentile `q` (0–1) of ascending `sorted` values.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// p50/p95/p99/max of `values` (any order); `None` if empty.
pub fn percentiles(mut values: Vec<f64>) -> Option<Percentiles> {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    Some(Percentiles {
        count: values.len(),
        p50: percentile(&values, 0.50)?,
        p95: percentile(&values, 0.95)?,
        p99: percentile(&values, 0.99)?,
        max: *values.last()?,
    })
}

/// `(lost, expected)` packets of one received track.
///
/// With probes: counters between the first and last received that never arrived. With RTP:
/// sequence numbers skipped, less those that arrived late to fill the gap, against the
/// packets that should have arrived.
pub fn track_loss(stats: &TrackStats, measurement: Measurement) -> (u64, u64) {
    match measurement {
        // Over every layer the track came from, not only the current one.
        Measurement::Probes => (stats.probe_lost(), stats.probe_expected()),
        Measurement::Rtp => {
            let lost = stats.seq_missing.saturating_sub(stats.seq_late);
            let unique = stats.packets.saturating_sub(stats.seq_duplicates);
            (lost, unique + lost)
        }
    }
}

/// `lost / expected` as a percentage (0 when nothing was expected).
pub fn loss_pct(lost: u64, expected: u64) -> f64 {
    if expected == 0 {
        0.0
    } else {
        lost as f64 * 100.0 / expected as f64
    }
}

/// Bits per second for `bytes` over `window` (0 for an empty window).
pub fn bitrate_bps(bytes: u64, window: Duration) -> f64 {
    let secs = window.as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        bytes as f64 * 8.0 / secs
    }
}

/// CPU time over wall time, percent of one core.
pub fn cpu_percent(cpu: Duration, wall: Duration) -> Option<f64> {
    let wall = wall.as_secs_f64();
    (wall > 0.0).then(|| cpu.as_secs_f64() * 100.0 / wall)
}

/// The bitrate of `bytes` sent or received from `first` (the first packet) to `end`; 0 when
/// there was no packet.
fn bitrate_since(bytes: u64, first: Option<Instant>, end: Instant) -> f64 {
    match first {
        Some(first) => bitrate_bps(bytes, end.saturating_duration_since(first)),
        None => 0.0,
    }
}

/// A received track that stopped before the end.
fn stalled(stats: &TrackStats, end: Instant) -> bool {
    stats
        .last_packet_at
        .is_some_and(|last| end.saturating_duration_since(last) > STALL_AFTER)
}

/// The server readings summarized.
fn summarize_server(input: &ServerInput, hold_started: Option<Instant>) -> ServerSummary {
    let samples = &input.samples;
    let rate = |a: &MetricsSample, b: &MetricsSample| {
        let cpu = (b.cpu_seconds - a.cpu_seconds).max(0.0);
        cpu_percent(
            Duration::from_secs_f64(cpu),
            b.at.saturating_duration_since(a.at),
        )
    };
    let step = cpu_counter_step(samples);
    let avg = match (samples.first(), samples.last()) {
        (Some(a), Some(b)) if samples.len() >= 2 => rate(a, b),
        _ => None,
    };
    let span = match (samples.first(), samples.last()) {
        (Some(a), Some(b)) => b.at.saturating_duration_since(a.at).as_secs_f64(),
        _ => 0.0,
    };
    let hold_samples = hold_started.and_then(|h| {
        let first = samples.iter().find(|s| s.at >= h)?;
        let last = samples.last()?;
        (last.at > first.at).then_some((first, last))
    });
    let hold = hold_samples.and_then(|(first, last)| rate(first, last));
    let cpu_seconds_hold =
        hold_samples.map(|(first, last)| (last.cpu_seconds - first.cpu_seconds).max(0.0));
    // A window as short as one counter step would read 0% or 100%: take the peak over windows
    // of at least ten steps.
    let window = Duration::from_secs_f64((10.0 * step).max(1.0));
    let peak = samples
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let b = samples[i + 1..]
                .iter()
                .find(|b| b.at.saturating_duration_since(a.at) >= window)?;
            rate(a, b)
        })
        .max_by(f64::total_cmp);
    ServerSummary {
        metrics_url: input.metrics_url.clone(),
        pid: input.pid,
        samples: samples.len(),
        cpu_percent_avg: avg,
        cpu_percent_hold: hold,
        cpu_seconds_hold,
        packets_per_cpu_second: None,
        cpu_percent_peak: peak,
        peak_window_s: window.as_secs_f64(),
        cpu_counter_step_s: step,
        cpu_percent_avg_error: (avg.is_some() && span > 0.0).then(|| step * 100.0 / span),
        rss_bytes_start: samples.first().map(|s| s.rss_bytes),
        rss_bytes_end: samples.last().map(|s| s.rss_bytes),
        rss_bytes_peak: samples.iter().map(|s| s.rss_bytes).max_by(f64::total_cmp),
        error: input.error.clone(),
    }
}

/// The step of a CPU-seconds counter: 1 s if every reading is a whole number (a counter that
/// only counts whole seconds), else the 10 ms of a Linux clock tick.
pub fn cpu_counter_step(samples: &[MetricsSample]) -> f64 {
    let whole = samples.iter().all(|s| s.cpu_seconds.fract() == 0.0);
    if whole && samples.len() >= 2 {
        1.0
    } else {
        0.01
    }
}

impl LoadReport {
    /// Computes the report.
    pub fn build(input: ReportInput<'_>) -> LoadReport {
        let end = input.ended;
        let measurement = input.measurement;
        let joined: Vec<(&PeerRecord, &JoinedPeer)> = input
            .peers
            .iter()
            .filter_map(|p| match &p.outcome {
                PeerOutcome::Joined(j) => Some((p, j.as_ref())),
                _ => None,
            })
            .collect();

        // Send bitrate of every joined publisher, by participant id, and of its video alone.
        let mut send_by_publisher = std::collections::HashMap::new();
        let mut video_send_rates = Vec::new();
        for (record, peer) in &joined {
            if record.role == Role::Publisher {
                let rate_of =
                    |s: &crate::stats::SentStats| bitrate_since(s.bytes, s.first_sent_at, end);
                let rate: f64 = peer.stats.sent.values().map(rate_of).sum();
                send_by_publisher.insert(peer.participant_id.as_str(), rate);
                if let Some(video) = peer.stats.sent.get(&crate::TrackKind::Video) {
                    video_send_rates.push(rate_of(video));
                }
            }
        }

        let mut peers = Vec::with_capacity(input.peers.len());
        let mut failures = Vec::new();
        let mut join_times = Vec::new();
        let (mut expected_total, mut received_total, mut stalled_total) = (0, 0, 0);
        let mut peers_complete = 0;
        let (mut lost_total, mut packets_expected_total) = (0u64, 0u64);
        let mut receive_rates = Vec::new();
        let mut expected_rates = Vec::new();
        let mut switches = SimulcastSummary {
            quality_requests: input.quality_requests,
            ..SimulcastSummary::default()
        };
        let mut latency = LatencyHistogram::default();
        let (mut audio_jitter, mut video_jitter) = (Vec::new(), Vec::new());
        for record in input.peers {
            let mut summary = PeerSummary {
                name: record.name.clone(),
                role: record.role,
                room: record.room,
                status: "not_started",
                failure: None,
                join_time_ms: None,
                tracks_expected: 0,
                tracks_received: 0,
                tracks_stalled: 0,
                receive_bitrate_bps: 0.0,
                loss_pct: 0.0,
                jitter_ms: None,
                latency_p50_ms: None,
                latency_p99_ms: None,
                errors: 0,
            };
            let peer = match &record.outcome {
                PeerOutcome::NotStarted => {
                    peers.push(summary);
                    continue;
                }
                PeerOutcome::Failed { reason } => {
                    summary.status = "failed";
                    summary.failure = Some(reason.clone());
                    failures.push(JoinFailure {
                        peer: record.name.clone(),
                        reason: reason.clone(),
                    });
                    peers.push(summary);
                    continue;
                }
                PeerOutcome::Joined(peer) => peer,
            };
            summary.status = "joined";
            summary.errors = peer.errors.len();
            // Every other joined publisher in the room, with the tracks it announced.
            let sources: Vec<&JoinedPeer> = joined
                .iter()
                .filter(|(r, j)| {
                    r.room == record.room
                        && r.role == Role::Publisher
                        && j.participant_id != peer.participant_id
                })
                .map(|(_, j)| *j)
                .collect();
            summary.tracks_expected = sources.len() * input.tracks_per_publisher;
            let mut received: Vec<&TrackStats> = Vec::new();
            let mut expected_rate = 0.0;
            for source in &sources {
                expected_rate += send_by_publisher
                    .get(source.participant_id.as_str())
                    .copied()
                    .unwrap_or(0.0);
                for track_id in &source.own_track_ids {
                    let stats = peer.stats.track(&source.participant_id, track_id);
                    if let Some(s) = stats.filter(|s| s.packets > 0) {
                        received.push(s);
                    }
                }
            }
            summary.tracks_received = received.len();
            summary.tracks_stalled = received.iter().filter(|s| stalled(s, end)).count();
            let first_media = received.iter().filter_map(|s| s.first_packet_at).min();
            if let Some(first) = first_media {
                let ms = first
                    .saturating_duration_since(peer.clock_start)
                    .as_secs_f64()
                    * 1e3;
                summary.join_time_ms = Some(ms);
                join_times.push(ms);
            }
            summary.receive_bitrate_bps = received
                .iter()
                .map(|s| bitrate_since(s.bytes, s.first_packet_at, end))
                .sum::<f64>()
                + 0.0;
            let (mut lost, mut packets) = (0, 0);
            let mut peer_latency = LatencyHistogram::default();
            let mut jitters = Vec::new();
            for s in &received {
                for switch in &s.layer_switches {
                    switches.layer_switches += 1;
                    switches.on_keyframe += u64::from(switch.on_keyframe);
                    // A step of 1, or a few when the last pictures of the old layer were lost.
                    let continued = switch
                        .picture_id_step
                        .is_some_and(|step| (1..=3).contains(&step));
                    switches.pictures_continued += u64::from(continued);
                }
                let (l, e) = track_loss(s, measurement);
                lost += l;
                packets += e;
                if measurement == Measurement::Probes {
                    peer_latency.merge(&s.latency);
                }
                jitters.push(s.jitter_ms);
                match s.kind {
                    Some(crate::TrackKind::Audio) => audio_jitter.push(s.jitter_ms),
                    _ => video_jitter.push(s.jitter_ms),
                }
            }
            summary.loss_pct = loss_pct(lost, packets);
            summary.jitter_ms = mean(&jitters);
            summary.latency_p50_ms = peer_latency.quantile_ms(0.5);
            summary.latency_p99_ms = peer_latency.quantile_ms(0.99);
            latency.merge(&peer_latency);
            lost_total += lost;
            packets_expected_total += packets;
            expected_total += summary.tracks_expected;
            received_total += summary.tracks_received;
            stalled_total += summary.tracks_stalled;
            if summary.tracks_received == summary.tracks_expected {
                peers_complete += 1;
            }
            // Peers with nothing to receive (a lone publisher) would drag the mean and the
            // minimum to zero.
            if summary.tracks_expected > 0 {
                receive_rates.push(summary.receive_bitrate_bps);
                expected_rates.push(expected_rate);
            }
            peers.push(summary);
        }

        let attempted = input
            .peers
            .iter()
            .filter(|p| !matches!(p.outcome, PeerOutcome::NotStarted))
            .count();
        let joins = JoinSummary {
            planned: input.peers.len(),
            attempted,
            succeeded: joined.len(),
            failed: failures.len(),
            failures: failures.iter().take(50).cloned().collect(),
            join_time_ms: percentiles(join_times),
        };
        let tracks = TrackSummary {
            expected: expected_total,
            received: received_total,
            stalled: stalled_total,
            peers_complete,
            peers_joined: joined.len(),
        };
        let send_rates: Vec<f64> = send_by_publisher.values().copied().collect();
        let all_jitter = audio_jitter.iter().chain(&video_jitter).copied();
        let media = MediaSummary {
            measurement,
            note: measurement.note().to_owned(),
            packets_expected: packets_expected_total,
            packets_lost: lost_total,
            loss_pct: loss_pct(lost_total, packets_expected_total),
            packets_received_hold: input.packets_received_hold,
            receive_bitrate_bps: BitrateSummary {
                // `sum` of no floats is -0.0, which would print as "-0".
                total: receive_rates.iter().sum::<f64>() + 0.0,
                per_peer_mean: mean(&receive_rates).unwrap_or(0.0),
                per_peer_min: receive_rates
                    .iter()
                    .copied()
                    .min_by(f64::total_cmp)
                    .unwrap_or(0.0),
                expected_per_peer_mean: mean(&expected_rates).unwrap_or(0.0),
            },
            send_bitrate_bps: SendSummary {
                total: send_rates.iter().sum::<f64>() + 0.0,
                per_publisher_mean: mean(&send_rates).unwrap_or(0.0),
                video_per_publisher_mean: mean(&video_send_rates).unwrap_or(0.0),
            },
            jitter_ms: all_jitter.max_by(f64::total_cmp).map(|max| JitterSummary {
                audio_mean: mean(&audio_jitter),
                video_mean: mean(&video_jitter),
                max,
            }),
            latency_ms: (latency.count() > 0).then(|| Percentiles {
                count: latency.count() as usize,
                p50: latency.quantile_ms(0.5).unwrap_or(0.0),
                p95: latency.quantile_ms(0.95).unwrap_or(0.0),
                p99: latency.quantile_ms(0.99).unwrap_or(0.0),
                max: latency.max_us().unwrap_or(0) as f64 / 1e3,
            }),
            simulcast: input.config.simulcast.then_some(switches),
        };

        let mut server = summarize_server(&input.server, input.hold_started);
        server.packets_per_cpu_second = input
            .packets_received_hold
            .zip(server.cpu_seconds_hold)
            .filter(|(_, cpu)| *cpu > 0.0)
            .map(|(packets, cpu)| packets as f64 / cpu);
        let t = &input.tester;
        let usage = |a: &UsageSample, b: &UsageSample| {
            cpu_percent(
                b.cpu.saturating_sub(a.cpu),
                b.at.saturating_duration_since(a.at),
            )
        };
        let tester_hold = t.hold.as_ref().and_then(|h| usage(h, &t.end));
        let tester = TesterSummary {
            cores: t.cores,
            peers: joined.len(),
            cpu_percent_avg: usage(&t.start, &t.end).unwrap_or(0.0),
            cpu_percent_hold: tester_hold,
            cpu_percent_per_peer: tester_hold
                .filter(|_| !joined.is_empty())
                .map(|c| c / joined.len() as f64),
            max_rss_bytes: t.max_rss_bytes,
            machine_cores: t.machine.map(|(_, b)| b.cores),
            machine_cpu_percent_hold: t.machine.and_then(|(a, b)| {
                let total = b.total_ticks.saturating_sub(a.total_ticks);
                let busy = b.busy_ticks.saturating_sub(a.busy_ticks);
                (total > 0).then(|| busy as f64 * 100.0 * b.cores as f64 / total as f64)
            }),
        };

        let join_phase_end = input.hold_started.unwrap_or(end);
        let run = RunSummary {
            join_phase_s: join_phase_end
                .saturating_duration_since(input.started)
                .as_secs_f64(),
            hold_s: input
                .hold_started
                .map_or(0.0, |h| end.saturating_duration_since(h).as_secs_f64()),
            interrupted: input.interrupted,
        };
        let shortfall = (measurement == Measurement::Probes && run_holds(&input))
            .then(|| {
                let asked = f64::from(input.config.video_bitrate_bps);
                let sent = media.send_bitrate_bps.video_per_publisher_mean;
                (sent > 0.0 && sent < SEND_SHORTFALL_SHARE * asked).then_some((sent, asked))
            })
            .flatten();
        let verdict = verdict(&joins, &tracks, &media, &server, &tester, &run, shortfall);
        LoadReport {
            schema_version: SCHEMA_VERSION,
            config: input.config,
            run,
            joins,
            tracks,
            media,
            server,
            tester,
            peers,
            verdict,
        }
    }

    /// The report as pretty JSON (the `--json` output).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("the report serializes")
    }

    /// The report as text for people.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let c = &self.config;
        let media = if c.media == "synthetic" && c.simulcast {
            let switching = c.switch_every_s.map_or(String::new(), |s| {
                format!(", subscribers switching every {s} s")
            });
            let layers: Vec<String> = crate::SimulcastLayer::three_layers()
                .iter()
                .map(|l| fmt_bps(f64::from(l.bitrate_bps)))
                .collect();
            format!(
                "synthetic VP8 simulcast ({}){switching}",
                layers.join(" + ")
            )
        } else if c.media == "synthetic" {
            format!("synthetic VP8 {}", fmt_bps(f64::from(c.video_bitrate_bps)))
        } else {
            format!("VP8 from {}", c.media)
        };
        let audio = match (&c.audio_file, c.audio) {
            (Some(file), _) => format!(" + Opus from {file}"),
            (None, true) => " + synthetic Opus".to_owned(),
            (None, false) => String::new(),
        };
        let target = match c.target {
            super::Target::Ours => "",
            super::Target::Janus => " (Janus VideoRoom)",
        };
        line(
            &mut out,
            format_args!(
                "sfu-load report: {}{target}, {} room(s) x ({} publishers + {} subscribers), {media}{audio}",
                c.url, c.rooms, c.publishers_per_room, c.subscribers_per_room
            ),
        );
        let interrupted = if self.run.interrupted {
            " (interrupted by Ctrl-C: report so far)"
        } else {
            ""
        };
        row(
            &mut out,
            "run",
            format_args!(
                "joined in {:.1} s, held {:.1} s of {:.0} s{interrupted}",
                self.run.join_phase_s, self.run.hold_s, c.duration_s
            ),
        );
        let j = &self.joins;
        let not_started = if j.attempted < j.planned {
            format!(", {} not started", j.planned - j.attempted)
        } else {
            String::new()
        };
        row(
            &mut out,
            "joins",
            format_args!(
                "{}/{} succeeded, {} failed{not_started}",
                j.succeeded, j.planned, j.failed
            ),
        );
        let join_time =
            j.join_time_ms
                .as_ref()
                .map_or("n/a (no peer received media)".to_owned(), |p| {
                    let quantiles = [
                        ("p50", p.p50),
                        ("p95", p.p95),
                        ("p99", p.p99),
                        ("max", p.max),
                    ];
                    format!(
                        "{}  ({} peers; socket open -> first media packet)",
                        fmt_ms_quantiles(&quantiles, 0),
                        p.count
                    )
                });
        row(&mut out, "join time", join_time);
        let t = &self.tracks;
        row(
            &mut out,
            "tracks",
            format_args!(
                "{}/{} received, {} stalled; {}/{} peers got every track",
                t.received, t.expected, t.stalled, t.peers_complete, t.peers_joined
            ),
        );
        let m = &self.media;
        let r = &m.receive_bitrate_bps;
        // With simulcast a receiver gets one layer of what the publisher sends, whichever
        // it asked for: there is no single rate to expect.
        let expected = if c.simulcast {
            "one layer per simulcast track".to_owned()
        } else {
            format!("expected {}", fmt_bps(r.expected_per_peer_mean))
        };
        row(
            &mut out,
            "receive",
            format_args!(
                "{} per peer ({expected}, lowest {}), {} in all",
                fmt_bps(r.per_peer_mean),
                fmt_bps(r.per_peer_min),
                fmt_bps(r.total)
            ),
        );
        if let Some(sw) = &m.simulcast {
            row(
                &mut out,
                "simulcast",
                format_args!(
                    "{} quality requests; receivers saw {} layer switches, {} on a keyframe, \
                     {} with the picture numbering continued",
                    sw.quality_requests, sw.layer_switches, sw.on_keyframe, sw.pictures_continued
                ),
            );
        }
        row(
            &mut out,
            "send",
            format_args!(
                "{} per publisher, {} in all (RTP payload)",
                fmt_bps(m.send_bitrate_bps.per_publisher_mean),
                fmt_bps(m.send_bitrate_bps.total)
            ),
        );
        row(
            &mut out,
            "loss",
            format_args!(
                "{:.3}% ({} of {} packets)",
                m.loss_pct, m.packets_lost, m.packets_expected
            ),
        );
        let jitter = or_na(m.jitter_ms.as_ref(), |jit| {
            format!(
                "audio {}  video {}  max {:.1} ms",
                fmt_opt_ms(jit.audio_mean),
                fmt_opt_ms(jit.video_mean),
                jit.max
            )
        });
        row(&mut out, "jitter", jitter);
        let latency = m
            .latency_ms
            .as_ref()
            .map_or("not measured".to_owned(), |l| {
                format!(
                    "one-way {}",
                    fmt_ms_quantiles(&[("p50", l.p50), ("p99", l.p99), ("max", l.max)], 1)
                )
            });
        row(&mut out, "latency", latency);
        row(&mut out, "measured", &m.note);
        let s = &self.server;
        if s.samples >= 2 {
            let error = s
                .cpu_percent_avg_error
                .filter(|e| *e >= 0.5)
                .map_or(String::new(), |e| {
                    format!(" (+-{e:.0}: the counter counts whole seconds)")
                });
            row(
                &mut out,
                "server",
                format_args!(
                    "CPU {} avg{error}, {} while held, {} peak over {:.0} s (% of one core); RSS {} -> {} (peak {})",
                    fmt_opt_pct(s.cpu_percent_avg),
                    fmt_opt_pct(s.cpu_percent_hold),
                    fmt_opt_pct(s.cpu_percent_peak),
                    s.peak_window_s,
                    fmt_opt_bytes(s.rss_bytes_start),
                    fmt_opt_bytes(s.rss_bytes_end),
                    fmt_opt_bytes(s.rss_bytes_peak)
                ),
            );
            if let (Some(packets), Some(per_cpu)) =
                (m.packets_received_hold, s.packets_per_cpu_second)
            {
                let source = s
                    .pid
                    .map_or(String::new(), |pid| format!(" (CPU from /proc/{pid})"));
                row(
                    &mut out,
                    "forwarded",
                    format_args!(
                        "{packets} packets received while held = {per_cpu:.0} per server CPU-second{source}"
                    ),
                );
            }
        } else {
            let why = s
                .error
                .as_deref()
                .unwrap_or("fewer than two /metrics readings");
            row(&mut out, "server", format_args!("CPU/RSS unknown: {why}"));
        }
        let te = &self.tester;
        row(
            &mut out,
            "tester",
            format_args!(
                "CPU {} avg, {} while held = {} of a core per peer ({} peers); RSS peak {}",
                fmt_opt_pct(Some(te.cpu_percent_avg)),
                fmt_opt_pct(te.cpu_percent_hold),
                or_na(te.cpu_percent_per_peer, |p| format!("{p:.2}%")),
                te.peers,
                fmt_opt_bytes(Some(te.max_rss_bytes as f64))
            ),
        );
        if let (Some(busy), Some(cores)) = (te.machine_cpu_percent_hold, te.machine_cores) {
            row(
                &mut out,
                "machine",
                format_args!(
                    "{busy:.0}% CPU busy of {}% ({cores} cores) while held, every process counted",
                    cores * 100
                ),
            );
        }
        // Failures grouped by reason: a full room fails a hundred joins the same way.
        let mut reasons: Vec<(&str, Vec<&str>)> = Vec::new();
        for p in &self.peers {
            let Some(reason) = &p.failure else { continue };
            match reasons.iter_mut().find(|(r, _)| r == reason) {
                Some((_, names)) => names.push(&p.name),
                None => reasons.push((reason, vec![&p.name])),
            }
        }
        for (reason, names) in &reasons {
            let more = names.len().saturating_sub(3);
            let shown = names[..names.len().min(3)].join(", ");
            let shown = if more > 0 {
                format!("{shown} and {more} more")
            } else {
                shown
            };
            line(
                &mut out,
                format_args!("  ! {} join(s) failed: {reason} ({shown})", names.len()),
            );
        }
        let incomplete: Vec<&PeerSummary> = self
            .peers
            .iter()
            .filter(|p| {
                p.status == "joined"
                    && (p.tracks_received < p.tracks_expected || p.tracks_stalled > 0)
            })
            .collect();
        for p in incomplete.iter().take(10) {
            line(
                &mut out,
                format_args!(
                    "  ! {:<14} {}/{} tracks, {} stalled",
                    p.name, p.tracks_received, p.tracks_expected, p.tracks_stalled
                ),
            );
        }
        if incomplete.len() > 10 {
            line(
                &mut out,
                format_args!(
                    "  ! ... and {} more peers missing tracks (see --json)",
                    incomplete.len() - 10
                ),
            );
        }
        for w in &self.verdict.warnings {
            line(&mut out, format_args!("  warning: {w}"));
        }
        line(&mut out, &self.verdict.line);
        out
    }
}

/// Whether the run got to hold the load (a report cut short in the join phase has no steady
/// send rate to judge).
fn run_holds(input: &ReportInput<'_>) -> bool {
    input.hold_started.is_some()
}

/// PASS needs every join, every expected track flowing, and loss under [`LOSS_LIMIT_PCT`].
/// `send_shortfall` is (sent, asked) video bitrate per publisher when publishers sent less
/// than asked.
fn verdict(
    joins: &JoinSummary,
    tracks: &TrackSummary,
    media: &MediaSummary,
    server: &ServerSummary,
    tester: &TesterSummary,
    run: &RunSummary,
    send_shortfall: Option<(f64, f64)>,
) -> Verdict {
    let mut failures = Vec::new();
    let mut warnings = Vec::new();
    if joins.failed > 0 {
        failures.push(format!(
            "{} of {} joins failed",
            joins.failed, joins.attempted
        ));
    }
    if joins.succeeded == 0 {
        failures.push("no peer joined".to_owned());
    }
    if tracks.received < tracks.expected {
        failures.push(format!(
            "{} of {} tracks never arrived",
            tracks.expected - tracks.received,
            tracks.expected
        ));
    }
    if tracks.stalled > 0 {
        failures.push(format!("{} tracks stalled", tracks.stalled));
    }
    if media.loss_pct >= LOSS_LIMIT_PCT {
        failures.push(format!("loss {:.2}% >= {LOSS_LIMIT_PCT}%", media.loss_pct));
    }
    if run.interrupted {
        warnings.push("interrupted before the planned duration".to_owned());
    }
    let capacity = tester.cores as f64 * 100.0;
    if let Some(cpu) = tester.cpu_percent_hold {
        if cpu >= TESTER_CPU_WARN_SHARE * capacity {
            warnings.push(format!(
                "the tester itself used {cpu:.0}% CPU of {capacity:.0}%: it may be the bottleneck; \
                 run fewer peers per tester process or the tester on another machine"
            ));
        }
    }
    if let (Some(busy), Some(cores)) = (tester.machine_cpu_percent_hold, tester.machine_cores) {
        let capacity = cores as f64 * 100.0;
        if busy >= MACHINE_CPU_WARN_SHARE * capacity {
            warnings.push(format!(
                "the machine's CPUs were {busy:.0}% busy of {capacity:.0}% while the load was held \
                 (every process counted): latency and loss may reflect the machine, not the server"
            ));
        }
    }
    if let Some((sent, asked)) = send_shortfall {
        warnings.push(format!(
            "publishers sent {} of video where {} was asked: the tester's sending fell behind \
             (a starved process skips frames), so the offered load was lower than configured",
            fmt_bps(sent),
            fmt_bps(asked)
        ));
    }
    if server.samples < 2 {
        warnings.push("server CPU/RSS unknown (no /metrics or /proc readings)".to_owned());
    }
    let pass = failures.is_empty();
    let line = if pass {
        format!(
            "PASS: all {} joins, all {} tracks, loss {:.2}% < {LOSS_LIMIT_PCT}%",
            joins.succeeded, tracks.expected, media.loss_pct
        )
    } else {
        format!("FAIL: {}", failures.join("; "))
    };
    Verdict {
        pass,
        line,
        failures,
        warnings,
    }
}

fn mean(values: &[f64]) -> Option<f64> {
    // `+ 0.0`: a float sum of nothing (or of -0.0s) is -0.0, which would print as "-0".
    (!values.is_empty()).then(|| (values.iter().sum::<f64>() + 0.0) / values.len() as f64)
}

/// `1.23 Mbit/s`, `456 kbit/s`.
pub fn fmt_bps(bps: f64) -> String {
    if bps >= 1e6 {
        format!("{:.2} Mbit/s", bps / 1e6)
    } else {
        format!("{:.0} kbit/s", bps / 1e3)
    }
}

/// One line of the text report.
fn line(out: &mut String, text: impl std::fmt::Display) {
    // Writing to a `String` cannot fail.
    let _ = writeln!(out, "{text}");
}

/// One labelled row of the text report: the label in a 12-wide column after two spaces.
fn row(out: &mut String, label: &str, body: impl std::fmt::Display) {
    line(out, format_args!("  {label:<12}{body}"));
}

/// `value` formatted, or `n/a` when it is missing.
fn or_na<T>(value: Option<T>, format: impl FnOnce(T) -> String) -> String {
    value.map_or("n/a".to_owned(), format)
}

/// `p50 3.0 ms  p99 4.1 ms ...`: named millisecond values, `decimals` after the point.
fn fmt_ms_quantiles(values: &[(&str, f64)], decimals: usize) -> String {
    let parts: Vec<String> = values
        .iter()
        .map(|(name, ms)| format!("{name} {ms:.decimals$} ms"))
        .collect();
    parts.join("  ")
}

fn fmt_opt_ms(ms: Option<f64>) -> String {
    or_na(ms, |v| format!("{v:.1} ms"))
}

fn fmt_opt_pct(p: Option<f64>) -> String {
    or_na(p, |v| format!("{v:.0}%"))
}

fn fmt_opt_bytes(b: Option<f64>) -> String {
    or_na(b, |v| format!("{:.0} MiB", v / 1024.0 / 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::SentStats;
    use crate::TrackKind;

    #[test]
    fn a_mean_of_silent_publishers_prints_as_zero_not_minus_zero() {
        let silent = [-0.0_f64, -0.0];
        assert_eq!(format!("{}", mean(&silent).unwrap()), "0");
        assert_eq!(mean(&[]), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = percentiles(values).unwrap();
        assert_eq!(
            (p.count, p.p50, p.p95, p.p99, p.max),
            (100, 50.0, 95.0, 99.0, 100.0)
        );
        // Order does not matter; small sets round the rank up.
        let p = percentiles(vec![30.0, 10.0, 20.0]).unwrap();
        assert_eq!((p.p50, p.p95, p.p99, p.max), (20.0, 30.0, 30.0, 30.0));
        let p = percentiles(vec![7.0]).unwrap();
        assert_eq!((p.p50, p.max), (7.0, 7.0));
        assert!(percentiles(vec![]).is_none());
        assert_eq!(percentile(&[1.0, 2.0], 0.0), Some(1.0));
    }

    #[test]
    fn loss_from_probes_and_from_rtp() {
        let probes = TrackStats {
            probe_first: Some(100),
            probe_last: Some(299),
            probe_unique: 196,
            ..TrackStats::default()
        };
        assert_eq!(track_loss(&probes, Measurement::Probes), (4, 200));
        assert_eq!(loss_pct(4, 200), 2.0);
        // After simulcast switches: 120 counters spanned on earlier layers, 200 on this one.
        let switched = TrackStats {
            probe_expected_earlier: 120,
            probe_unique: 310,
            ..probes.clone()
        };
        assert_eq!(track_loss(&switched, Measurement::Probes), (10, 320));
        // 1000 packets arrived, 3 of them duplicates; 12 skipped, 2 of which came late.
        let rtp = TrackStats {
            packets: 1000,
            seq_duplicates: 3,
            seq_missing: 12,
            seq_late: 2,
            ..TrackStats::default()
        };
        assert_eq!(track_loss(&rtp, Measurement::Rtp), (10, 1007));
        assert_eq!(
            track_loss(&TrackStats::default(), Measurement::Probes),
            (0, 0)
        );
        assert_eq!(loss_pct(0, 0), 0.0);
    }

    #[test]
    fn bitrate_and_cpu_math() {
        assert_eq!(bitrate_bps(125_000, Duration::from_secs(2)), 500_000.0);
        assert_eq!(bitrate_bps(1, Duration::ZERO), 0.0);
        assert_eq!(
            cpu_percent(Duration::from_millis(1500), Duration::from_secs(3)),
            Some(50.0)
        );
        assert_eq!(cpu_percent(Duration::from_secs(1), Duration::ZERO), None);
        assert_eq!(fmt_bps(1_234_000.0), "1.23 Mbit/s");
        assert_eq!(fmt_bps(456_000.0), "456 kbit/s");
    }

    /// A received track with `bytes` over the last `secs` seconds before `end`.
    fn received(end: Instant, secs: u64, bytes: u64, kind: TrackKind) -> TrackStats {
        TrackStats {
            kind: Some(kind),
            packets: 100,
            bytes,
            first_packet_at: Some(end - Duration::from_secs(secs)),
            last_packet_at: Some(end - Duration::from_millis(10)),
            probe_first: Some(0),
            probe_last: Some(99),
            probe_unique: 100,
            jitter_ms: 2.0,
            ..TrackStats::default()
        }
    }

    /// A peer of room 0.
    fn record(name: &str, role: Role, outcome: PeerOutcome) -> PeerRecord {
        PeerRecord {
            name: name.into(),
            role,
            room: 0,
            outcome,
        }
    }

    fn joined(id: &str, start: Instant, own: &[&str]) -> JoinedPeer {
        JoinedPeer {
            participant_id: id.to_owned(),
            clock_start: start,
            stats: PeerStats::default(),
            own_track_ids: own.iter().map(|s| s.to_string()).collect(),
            errors: vec![],
        }
    }

    fn input<'a>(peers: &'a [PeerRecord], base: Instant, end: Instant) -> ReportInput<'a> {
        ReportInput {
            config: ConfigSummary {
                target: super::super::Target::Ours,
                url: "ws://127.0.0.1:1/ws".into(),
                rooms: 1,
                publishers_per_room: 2,
                subscribers_per_room: 1,
                duration_s: 10.0,
                video_bitrate_bps: 500_000,
                audio: false,
                join_rate: 10.0,
                media: "synthetic".into(),
                audio_file: None,
                simulcast: false,
                switch_every_s: None,
            },
            peers,
            tracks_per_publisher: 1,
            measurement: Measurement::Probes,
            started: base,
            hold_started: Some(base + Duration::from_secs(1)),
            ended: end,
            interrupted: false,
            packets_received_hold: Some(900),
            quality_requests: 0,
            server: ServerInput {
                metrics_url: Some("http://127.0.0.1:1/metrics".into()),
                pid: None,
                samples: vec![
                    MetricsSample {
                        at: base,
                        cpu_seconds: 10.0,
                        rss_bytes: 1e6,
                    },
                    MetricsSample {
                        at: base + Duration::from_secs(1),
                        cpu_seconds: 10.2,
                        rss_bytes: 3e6,
                    },
                    MetricsSample {
                        at: end,
                        cpu_seconds: 12.0,
                        rss_bytes: 2e6,
                    },
                ],
                error: None,
            },
            tester: TesterInput {
                start: UsageSample {
                    at: base,
                    cpu: Duration::ZERO,
                },
                hold: Some(UsageSample {
                    at: base + Duration::from_secs(1),
                    cpu: Duration::from_millis(500),
                }),
                end: UsageSample {
                    at: end,
                    cpu: Duration::from_millis(1400),
                },
                max_rss_bytes: 50 << 20,
                cores: 2,
                machine: Some((
                    MachineCpu {
                        busy_ticks: 1000,
                        total_ticks: 10_000,
                        cores: 2,
                    },
                    MachineCpu {
                        busy_ticks: 1900,
                        total_ticks: 11_000,
                        cores: 2,
                    },
                )),
            },
        }
    }

    #[test]
    fn a_room_report_adds_up() {
        let base = Instant::now();
        let end = base + Duration::from_secs(10);
        // Two publishers (one video track each) and one subscriber.
        let mut a = joined("A", base, &["ta"]);
        let mut b = joined("B", base + Duration::from_millis(100), &["tb"]);
        let mut s = joined("S", base + Duration::from_millis(200), &[]);
        for (p, bytes) in [(&mut a, 625_000u64), (&mut b, 625_000)] {
            p.stats.sent.insert(
                TrackKind::Video,
                SentStats {
                    bytes,
                    first_sent_at: Some(end - Duration::from_secs(10)),
                    ..SentStats::default()
                },
            );
        }
        // A gets B, B gets A, S gets both; S lost 2 of 100 probes on B's track.
        a.stats.tracks.insert(
            ("B".into(), "tb".into()),
            received(end, 5, 312_500, TrackKind::Video),
        );
        b.stats.tracks.insert(
            ("A".into(), "ta".into()),
            received(end, 5, 312_500, TrackKind::Video),
        );
        s.stats.tracks.insert(
            ("A".into(), "ta".into()),
            received(end, 5, 312_500, TrackKind::Video),
        );
        let mut lossy = received(end, 5, 312_500, TrackKind::Video);
        lossy.probe_unique = 98;
        lossy.latency.record(3_000);
        s.stats.tracks.insert(("B".into(), "tb".into()), lossy);
        let peers = vec![
            record("pub-0-0", Role::Publisher, PeerOutcome::Joined(Box::new(a))),
            record("pub-0-1", Role::Publisher, PeerOutcome::Joined(Box::new(b))),
            record(
                "sub-0-0",
                Role::Subscriber,
                PeerOutcome::Joined(Box::new(s)),
            ),
        ];
        let report = LoadReport::build(input(&peers, base, end));
        assert_eq!(report.joins.succeeded, 3);
        assert_eq!((report.tracks.expected, report.tracks.received), (4, 4));
        assert_eq!(report.tracks.peers_complete, 3);
        // 400 probes expected, 2 lost.
        assert_eq!(
            (report.media.packets_lost, report.media.packets_expected),
            (2, 400)
        );
        assert_eq!(report.media.loss_pct, 0.5);
        // Each track: 312_500 bytes over 5 s = 500 kbit/s; the subscriber gets two.
        let r = &report.media.receive_bitrate_bps;
        assert_eq!(r.per_peer_min, 500_000.0);
        assert_eq!(r.total, 2_000_000.0);
        assert_eq!(r.per_peer_mean, 2_000_000.0 / 3.0);
        assert_eq!(r.per_peer_min, 500_000.0);
        // Each publisher sent 625_000 bytes over 10 s = 500 kbit/s.
        assert_eq!(report.media.send_bitrate_bps.total, 1_000_000.0);
        assert_eq!(
            r.expected_per_peer_mean,
            (500_000.0 + 500_000.0 + 1e6) / 3.0
        );
        // Join time: from each clock start to its first packet (end - 5 s = base + 5 s).
        let jt = report.joins.join_time_ms.unwrap();
        assert_eq!((jt.p50, jt.max), (4900.0, 5000.0));
        assert!((report.media.latency_ms.unwrap().p50 - 3.0).abs() < 0.1);
        assert_eq!(
            report.media.jitter_ms.as_ref().unwrap().video_mean,
            Some(2.0)
        );
        // Server: 2 s CPU over 10 s = 20%; while held 1.8 s over 9 s = 20%. The counter has
        // fractions, so its step is a clock tick and the peak is over 1 s windows: the
        // first (0.2 s over 1 s) and, from the second reading, 1.8 s over 9 s.
        let server = &report.server;
        assert!((server.cpu_percent_avg.unwrap() - 20.0).abs() < 1e-9);
        assert!((server.cpu_percent_hold.unwrap() - 20.0).abs() < 1e-9);
        assert!((server.cpu_percent_peak.unwrap() - 20.0).abs() < 1e-9);
        assert_eq!(
            (server.cpu_counter_step_s, server.peak_window_s),
            (0.01, 1.0)
        );
        assert!((server.cpu_percent_avg_error.unwrap() - 0.1).abs() < 1e-9);
        assert_eq!(server.rss_bytes_peak, Some(3e6));
        // 900 packets received while held, over the 1.8 CPU-seconds between the readings at
        // the hold's start and the end.
        assert!((server.cpu_seconds_hold.unwrap() - 1.8).abs() < 1e-9);
        assert!((server.packets_per_cpu_second.unwrap() - 500.0).abs() < 1e-6);
        assert_eq!(report.media.packets_received_hold, Some(900));
        assert!(report
            .to_text()
            .contains("900 packets received while held = 500 per server CPU-second"));
        // Tester: 0.9 s over 9 s held = 10%, over 3 peers.
        assert!((report.tester.cpu_percent_hold.unwrap() - 10.0).abs() < 1e-9);
        assert!((report.tester.cpu_percent_per_peer.unwrap() - 10.0 / 3.0).abs() < 1e-9);
        // The machine: 900 of 1000 ticks busy on 2 cores = 180% of one core, a warning.
        assert_eq!(report.tester.machine_cpu_percent_hold, Some(180.0));
        assert_eq!(report.verdict.warnings.len(), 1, "{:?}", report.verdict);
        assert!(report.verdict.warnings[0].contains("180% busy of 200%"));
        assert_eq!(
            report.media.send_bitrate_bps.video_per_publisher_mean,
            500_000.0
        );
        assert!(report.verdict.pass, "{:?}", report.verdict);
        assert_eq!(
            report.verdict.line,
            "PASS: all 3 joins, all 4 tracks, loss 0.50% < 1%"
        );
        let text = report.to_text();
        assert!(text.contains("4/4 received"), "{text}");
        assert!(text.trim_end().ends_with(&report.verdict.line));

        // Had 1 Mbit/s been asked, the 500 kbit/s sent says the tester fell behind.
        let mut run = input(&peers, base, end);
        run.config.video_bitrate_bps = 1_000_000;
        let starved = LoadReport::build(run);
        assert!(starved.verdict.pass, "a warning, not a failure");
        assert!(
            starved.verdict.warnings[1].contains("sent 500 kbit/s of video where 1.00 Mbit/s"),
            "{:?}",
            starved.verdict.warnings
        );
    }

    #[test]
    fn failures_missing_tracks_and_stalls_fail_the_run() {
        let base = Instant::now();
        let end = base + Duration::from_secs(10);
        let a = joined("A", base, &["ta"]);
        let mut s = joined("S", base, &[]);
        // The only track S got stopped 5 s before the end.
        let mut t = received(end, 8, 1000, TrackKind::Video);
        t.last_packet_at = Some(end - Duration::from_secs(5));
        s.stats.tracks.insert(("A".into(), "ta".into()), t);
        let peers = vec![
            record("pub-0-0", Role::Publisher, PeerOutcome::Joined(Box::new(a))),
            record(
                "pub-0-1",
                Role::Publisher,
                PeerOutcome::Failed {
                    reason: "timed out waiting for joined".into(),
                },
            ),
            record(
                "sub-0-0",
                Role::Subscriber,
                PeerOutcome::Joined(Box::new(s)),
            ),
            record("sub-0-1", Role::Subscriber, PeerOutcome::NotStarted),
        ];
        let report = LoadReport::build(input(&peers, base, end));
        assert_eq!(
            (
                report.joins.planned,
                report.joins.attempted,
                report.joins.failed
            ),
            (4, 3, 1)
        );
        // Only joined publishers are expected: A's track at S. A itself expects nothing.
        assert_eq!((report.tracks.expected, report.tracks.received), (1, 1));
        assert_eq!(report.tracks.stalled, 1);
        assert!(!report.verdict.pass);
        assert_eq!(
            report.verdict.line,
            "FAIL: 1 of 3 joins failed; 1 tracks stalled"
        );
        let text = report.to_text();
        assert!(
            text.contains("! 1 join(s) failed: timed out waiting for joined (pub-0-1)"),
            "{text}"
        );
        assert!(
            text.contains("! sub-0-0        1/1 tracks, 1 stalled"),
            "{text}"
        );
    }

    #[test]
    fn a_whole_second_cpu_counter_widens_the_peak_window() {
        let base = Instant::now();
        // One reading a second for 30 s of a server using 25% of a core, as a counter of whole
        // seconds shows it: 0, 0, 0, 0, 1, 1, ...
        let samples: Vec<MetricsSample> = (0..=30u64)
            .map(|i| MetricsSample {
                at: base + Duration::from_secs(i),
                cpu_seconds: (i / 4) as f64,
                rss_bytes: 1e6,
            })
            .collect();
        assert_eq!(cpu_counter_step(&samples), 1.0);
        let input = ServerInput {
            metrics_url: None,
            pid: None,
            samples,
            error: None,
        };
        let s = summarize_server(&input, None);
        assert_eq!(s.peak_window_s, 10.0);
        // Any 10 s window holds 2 or 3 whole seconds: the peak is 30%, not the 100% a 1 s
        // window would show.
        assert_eq!(s.cpu_percent_peak, Some(30.0));
        assert!((s.cpu_percent_avg.unwrap() - 700.0 / 30.0).abs() < 1e-9);
        assert!((s.cpu_percent_avg_error.unwrap() - 100.0 / 30.0).abs() < 1e-9);
    }

    #[test]
    fn json_has_the_documented_fields() {
        let base = Instant::now();
        let end = base + Duration::from_secs(10);
        let peers = vec![record(
            "pub-0-0",
            Role::Publisher,
            PeerOutcome::Joined(Box::new(joined("A", base, &["ta"]))),
        )];
        let mut run = input(&peers, base, end);
        run.measurement = Measurement::Rtp;
        let report = LoadReport::build(run);
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["media"]["measurement"], "rtp");
        assert!(v["media"]["latency_ms"].is_null());
        assert_eq!(v["peers"][0]["role"], "publisher");
        assert_eq!(v["peers"][0]["status"], "joined");
        assert_eq!(v["verdict"]["pass"], true);
        for section in [
            "config", "run", "joins", "tracks", "media", "server", "tester",
        ] {
            assert!(v[section].is_object(), "{section}");
        }
    }
}
