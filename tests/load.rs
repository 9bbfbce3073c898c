//! The load tester (`client::load`, behind `sfu-load`) against an in-process server on
//! 127.0.0.1: a short run of 2 rooms × 3 peers passes with every join, every track and no
//! loss; real media from files is measured from RTP; a stop (Ctrl-C) mid-run still reports and
//! every peer leaves; the JSON carries the fields docs/load-testing.md documents.

mod common;

use std::time::Duration;

use client::load::{run_load, LoadConfig, LoadMedia, LoadReport, Measurement};
use client::{IvfClip, OggOpusClip};
use common::{start_server, wait_metric, ws_url};
use signaling::Server;

/// Every field path docs/load-testing.md documents for the JSON report.
const DOCUMENTED_FIELDS: &[&str] = &[
    "schema_version",
    "config.target",
    "config.url",
    "config.rooms",
    "config.publishers_per_room",
    "config.subscribers_per_room",
    "config.duration_s",
    "config.video_bitrate_bps",
    "config.audio",
    "config.join_rate",
    "config.media",
    "config.audio_file",
    "run.join_phase_s",
    "run.hold_s",
    "run.interrupted",
    "joins.planned",
    "joins.attempted",
    "joins.succeeded",
    "joins.failed",
    "joins.failures",
    "joins.join_time_ms.count",
    "joins.join_time_ms.p50",
    "joins.join_time_ms.p95",
    "joins.join_time_ms.p99",
    "joins.join_time_ms.max",
    "tracks.expected",
    "tracks.received",
    "tracks.stalled",
    "tracks.peers_complete",
    "tracks.peers_joined",
    "media.measurement",
    "media.note",
    "media.packets_expected",
    "media.packets_lost",
    "media.loss_pct",
    "media.packets_received_hold",
    "media.receive_bitrate_bps.total",
    "media.receive_bitrate_bps.per_peer_mean",
    "media.receive_bitrate_bps.per_peer_min",
    "media.receive_bitrate_bps.expected_per_peer_mean",
    "media.send_bitrate_bps.total",
    "media.send_bitrate_bps.per_publisher_mean",
    "media.send_bitrate_bps.video_per_publisher_mean",
    "media.jitter_ms.audio_mean",
    "media.jitter_ms.video_mean",
    "media.jitter_ms.max",
    "media.latency_ms.p50",
    "media.latency_ms.p99",
    "media.latency_ms.max",
    "server.metrics_url",
    "server.pid",
    "server.samples",
    "server.cpu_percent_avg",
    "server.cpu_percent_hold",
    "server.cpu_seconds_hold",
    "server.packets_per_cpu_second",
    "server.cpu_percent_peak",
    "server.peak_window_s",
    "server.cpu_counter_step_s",
    "server.cpu_percent_avg_error",
    "server.rss_bytes_start",
    "server.rss_bytes_end",
    "server.rss_bytes_peak",
    "server.error",
    "tester.cores",
    "tester.peers",
    "tester.cpu_percent_avg",
    "tester.cpu_percent_hold",
    "tester.cpu_percent_per_peer",
    "tester.max_rss_bytes",
    "tester.machine_cpu_percent_hold",
    "tester.machine_cores",
    "verdict.pass",
    "verdict.line",
    "verdict.failures",
    "verdict.warnings",
];

/// Fields every entry of `peers` has.
const DOCUMENTED_PEER_FIELDS: &[&str] = &[
    "name",
    "role",
    "room",
    "status",
    "failure",
    "join_time_ms",
    "tracks_expected",
    "tracks_received",
    "tracks_stalled",
    "receive_bitrate_bps",
    "loss_pct",
    "jitter_ms",
    "latency_p50_ms",
    "latency_p99_ms",
    "errors",
];

fn config(server: &Server, rooms: usize, publishers: usize, subscribers: usize) -> LoadConfig {
    let mut config = LoadConfig::new(ws_url(server));
    config.rooms = rooms;
    config.publishers = publishers;
    config.subscribers = subscribers;
    config.join_rate = 20.0;
    config
}

fn testdata(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../client/testdata")
        .join(name)
}

/// What a passing run must show, whatever the media.
fn assert_clean_run(report: &LoadReport, peers: usize) {
    let summary = report.to_text();
    assert_eq!(report.joins.succeeded, peers, "{summary}");
    assert_eq!(report.joins.failed, 0, "{summary}");
    assert!(report.tracks.expected > 0, "{summary}");
    assert_eq!(report.tracks.received, report.tracks.expected, "{summary}");
    assert_eq!(report.tracks.peers_complete, peers, "{summary}");
    assert_eq!(report.tracks.stalled, 0, "{summary}");
    assert!(report.media.packets_expected > 0, "{summary}");
    assert!(report.media.loss_pct < 1.0, "{summary}");
    assert!(report.verdict.pass, "{summary}");
    assert!(report.verdict.line.starts_with("PASS"), "{summary}");
}

/// Every peer left: the server counts no participant and no room.
async fn assert_everyone_left(server: &Server) {
    assert!(wait_metric(server, "sfu_participants", 0.0).await);
    assert!(wait_metric(server, "sfu_rooms", 0.0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rooms_of_three_pass_with_every_track() {
    let server = start_server(&[]).await;
    let mut config = config(&server, 2, 2, 1);
    config.duration = Duration::from_secs(5);
    config.audio = true;
    let report = run_load(config, std::future::pending(), |_| {}).await;
    let text = report.to_text();
    assert_clean_run(&report, 6);
    // Per room: each publisher gets the other's audio and video (2 + 2), the subscriber gets
    // both publishers' (4).
    assert_eq!(report.tracks.expected, 16, "{text}");
    assert_eq!(report.media.measurement, Measurement::Probes);
    let latency = report.media.latency_ms.expect("probes measure latency");
    assert!(latency.count > 100 && latency.p50 > 0.0, "{text}");
    let jitter = report.media.jitter_ms.as_ref().expect("jitter measured");
    assert!(jitter.audio_mean.is_some() && jitter.video_mean.is_some());
    // Each publisher offers ~500 kbit/s of video. On a starved machine the tester may send
    // less, and then the report must say so rather than pass it off as the asked load.
    let send = report.media.send_bitrate_bps.per_publisher_mean;
    assert!(send > 100e3 && send < 650e3, "{text}");
    if send < 400e3 {
        assert!(
            text.contains("publishers sent"),
            "a shortfall is reported: {text}"
        );
    }
    let received = &report.media.receive_bitrate_bps;
    assert!(
        received.per_peer_min > 0.5 * received.expected_per_peer_mean,
        "{text}"
    );
    assert!(report.joins.join_time_ms.is_some_and(|j| j.count == 6));
    // The server's /metrics were read throughout, and the tester measured itself.
    assert!(report.server.samples >= 3, "{text}");
    assert!(report.server.rss_bytes_peak.is_some_and(|r| r > 1e6));
    assert!(report.tester.cpu_percent_per_peer.is_some());
    assert!(report.run.hold_s >= 5.0 && !report.run.interrupted);
    assert_everyone_left(&server).await;

    // The JSON carries every documented field.
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    for path in DOCUMENTED_FIELDS {
        let mut value = &json;
        for key in path.split('.') {
            value = value
                .get(key)
                .unwrap_or_else(|| panic!("the JSON report has no {path}"));
        }
    }
    let peers = json["peers"].as_array().expect("peers is an array");
    assert_eq!(peers.len(), 6);
    for peer in peers {
        for field in DOCUMENTED_PEER_FIELDS {
            assert!(peer.get(field).is_some(), "a peer has no {field}: {peer}");
        }
    }
    assert_eq!(json["verdict"]["pass"], true);
    assert_eq!(json["tracks"]["received"], 16);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulcast_subscribers_switching_all_the_time_see_clean_switches() {
    let server = start_server(&[]).await;
    let mut config = config(&server, 1, 1, 3);
    config.duration = Duration::from_secs(3);
    config.simulcast = true;
    config.switch_every = Some(Duration::from_millis(400));
    let report = run_load(config, std::future::pending(), |_| {}).await;
    let text = report.to_text();
    assert_clean_run(&report, 4);
    let switches = report
        .media
        .simulcast
        .clone()
        .expect("a simulcast run reports switches");
    // Three subscribers, one simulcast track each, a request per 400 ms over 3 s.
    assert!(switches.quality_requests >= 3 * 6, "{text}");
    assert!(switches.layer_switches >= 3 * 3, "{text}");
    assert_eq!(switches.on_keyframe, switches.layer_switches, "{text}");
    assert_eq!(
        switches.pictures_continued, switches.layer_switches,
        "{text}"
    );
    assert!(text.contains("layer switches"), "{text}");
    assert_everyone_left(&server).await;
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_media_from_files_is_measured_from_rtp() {
    let server = start_server(&[]).await;
    let mut config = config(&server, 1, 2, 1);
    config.duration = Duration::from_secs(3);
    config.media = LoadMedia::Files {
        video: IvfClip::open(testdata("testsrc-320x240-30fps.ivf")).unwrap(),
        audio: Some(OggOpusClip::open(testdata("sine-440hz-48k.ogg")).unwrap()),
    };
    let report = run_load(config, std::future::pending(), |_| {}).await;
    let text = report.to_text();
    assert_clean_run(&report, 3);
    assert_eq!(report.tracks.expected, 8, "{text}");
    assert_eq!(report.media.measurement, Measurement::Rtp);
    assert!(report.media.latency_ms.is_none(), "no probes in real media");
    assert!(text.contains("real media carries no probes"), "{text}");
    // The clip is ~214 kbit/s of VP8 and the tone ~35 kbit/s of Opus: sent at the files' own
    // pace, never faster (a starved machine may make it slower, which the pacing allows).
    let send = report.media.send_bitrate_bps.per_publisher_mean;
    assert!(send > 50e3 && send < 350e3, "{text}");
    assert_everyone_left(&server).await;
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_mid_run_reports_so_far_and_everyone_leaves() {
    let server = start_server(&[]).await;
    let mut config = config(&server, 1, 2, 1);
    config.duration = Duration::from_secs(600);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut statuses = 0;
    let run = run_load(
        config,
        async move {
            let _ = stop_rx.await;
        },
        |_| statuses += 1,
    );
    let stopper = async move {
        // Once everyone is in and media flows, as a user pressing Ctrl-C would.
        assert!(wait_metric(&server, "sfu_participants", 3.0).await);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _ = stop_tx.send(());
        server
    };
    let started = std::time::Instant::now();
    let (report, server) = tokio::join!(run, stopper);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the stop was ignored"
    );
    assert!(report.run.interrupted);
    assert!(report.run.hold_s < 60.0);
    assert!(statuses >= 2, "live status was reported");
    assert_eq!(report.joins.succeeded, 3, "{}", report.to_text());
    assert_eq!(report.tracks.received, report.tracks.expected);
    assert!(report
        .verdict
        .warnings
        .iter()
        .any(|w| w.contains("interrupted")));
    assert_everyone_left(&server).await;
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_join_tokens_admits_the_tester_only_with_its_secret() {
    let server = start_server(&["--auth-secret", "load-test-secret"]).await;
    let mut without = config(&server, 1, 1, 1);
    without.duration = Duration::from_secs(1);
    let refused = run_load(without, std::future::pending(), |_| {}).await;
    assert_eq!(refused.joins.failed, 2, "{}", refused.to_text());
    assert!(refused.joins.failures[0].reason.contains("unauthorized"));
    assert!(!refused.verdict.pass);

    let mut with = config(&server, 1, 1, 1);
    with.duration = Duration::from_secs(2);
    with.auth_secret = Some(signaling::auth::Secret::new("load-test-secret").unwrap());
    let report = run_load(with, std::future::pending(), |_| {}).await;
    assert_clean_run(&report, 2);
    assert_everyone_left(&server).await;
    server.shutdown(Duration::from_secs(5)).await;
}
