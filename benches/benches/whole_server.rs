//! Whole-server fan-out on 127.0.0.1: the SFU in a process of its own (this bench binary
//! re-executed in server mode, which runs `signaling::Server::start` as `sfu-server` does, or
//! the binary named by `SFU_SERVER_BIN`), one headless publisher (synthetic VP8 + Opus) and N
//! headless subscribers in this process. For each N it reports forwarded packets per server
//! CPU-second (both read from the server's `/metrics`, so the clients' CPU is not counted),
//! loss from the subscribers' probe counters, and at the end the largest N under 1% loss.
//! Prints a table and writes `target/sfu-benches/whole_server.json`.
//!
//! `cargo bench -p sfu-benches --bench whole_server`, tuned by environment variables:
//! `SFU_BENCH_SUBSCRIBERS` (default `10,50,100,200`), `SFU_BENCH_SECS` (measured seconds per
//! N, default 10), `SFU_BENCH_VIDEO_BPS` (default 1500000), `SFU_SERVER_BIN` (a built
//! `sfu-server` to measure instead of the in-tree code).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use client::{HeadlessPeer, PeerConfig, PeerStats, TrackKind};
use sfu_benches::report::{
    largest_served, load_average_1m, metric_value, own_cpu_seconds, process_cpu_seconds,
    target_dir, ProbeCounts, WindowLoss,
};
use signaling::config::ServerConfig;
use signaling::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Set in the environment of the re-executed server process.
const SERVER_MODE_ENV: &str = "SFU_BENCH_SERVER_CHILD";
/// Loss under which a subscriber count counts as served.
const LOSS_LIMIT: f64 = 0.01;
/// The publisher must achieve this fraction of its configured video bitrate for a run to
/// count: a thinned source would make any N look served.
const SOURCE_RATE_FLOOR: f64 = 0.95;
/// Subscribers joining at once (each join is a WebSocket, two DTLS handshakes and ICE).
const JOIN_CONCURRENCY: usize = 8;
/// How long joining and first media may take per subscriber count.
const SETUP_TIMEOUT: Duration = Duration::from_secs(90);
/// Media flows this long before the measured window, so joins and keyframes are behind us.
const WARM_UP: Duration = Duration::from_secs(2);

/// What one run measures.
struct Settings {
    subscriber_counts: Vec<usize>,
    measure: Duration,
    video_bps: u32,
    server_bin: Option<PathBuf>,
}

impl Settings {
    fn from_env() -> Self {
        let subscriber_counts = std::env::var("SFU_BENCH_SUBSCRIBERS")
            .ok()
            .map(|list| {
                list.split(',')
                    .filter_map(|n| n.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_else(|| vec![10, 50, 100, 200]);
        let secs: f64 = std::env::var("SFU_BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10.0);
        let video_bps = std::env::var("SFU_BENCH_VIDEO_BPS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1_500_000);
        Self {
            subscriber_counts,
            measure: Duration::from_secs_f64(secs),
            video_bps,
            server_bin: std::env::var_os("SFU_SERVER_BIN").map(PathBuf::from),
        }
    }
}

/// The server as a child process; ended with SIGTERM (then SIGKILL) when dropped.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
}

impl ServerProcess {
    fn spawn(settings: &Settings, log: &std::path::Path) -> std::io::Result<Self> {
        let mut command = match &settings.server_bin {
            Some(bin) => Command::new(bin),
            None => {
                let mut own = Command::new(std::env::current_exe()?);
                own.env(SERVER_MODE_ENV, "1");
                own
            }
        };
        command
            .args([
                "--listen",
                "127.0.0.1:0",
                "--ice-ip",
                "127.0.0.1",
                "--max-participants-per-room",
                "100000",
                "--max-connections",
                "100000",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log)?);
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let addr: SocketAddr = loop {
            let Some(line) = lines.next().transpose()? else {
                let _ = child.kill();
                return Err(std::io::Error::other(format!(
                    "the server exited before listening; see {}",
                    log.display()
                )));
            };
            if let Some(addr) = line.split("listening on http://").nth(1) {
                break addr
                    .trim()
                    .parse()
                    .map_err(|e| std::io::Error::other(format!("bad address {addr}: {e}")))?;
            }
        };
        // `sfu-server` logs to stdout: keep draining it so a full pipe never blocks it.
        std::thread::spawn(move || lines.for_each(drop));
        Ok(Self { child, addr })
    }

    /// `GET /metrics`, as Prometheus would.
    async fn metrics(&self) -> std::io::Result<String> {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await?;
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok(response)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(6);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The publisher, on a thread and tokio runtime of its own: its media clock skips frames when
/// its sender task runs late, and on the subscribers' runtime 200 busy peers delay it enough
/// to thin the source (seen at N=200: 183 instead of 230 packets/s). A real publisher is a
/// browser elsewhere; this keeps the source steady so the server is what is measured.
struct Publisher {
    peer: HeadlessPeer,
    /// Dropping it ends the publisher's runtime thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Publisher {
    async fn join(config: PeerConfig) -> client::Result<Self> {
        let (joined_tx, joined_rx) = tokio::sync::oneshot::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime for the publisher");
            runtime.block_on(async move {
                let _ = joined_tx.send(HeadlessPeer::join(config).await);
                let _ = stopped.await;
            });
        });
        let peer = joined_rx.await.map_err(|_| client::Error::Stopped)??;
        Ok(Self { peer, _stop: stop })
    }
}

/// Counters read at one end of the measured window.
struct Snapshot {
    at: Instant,
    /// From `/proc/<server pid>/stat` (10 ms resolution).
    server_cpu: f64,
    /// The server's own `process_cpu_seconds_total` (from getrusage), as a cross-check.
    server_cpu_metric: f64,
    forwarded: f64,
    received: f64,
    congested: f64,
    client_cpu: f64,
    /// Per subscriber, per track kind: probe counts of what it received from the publisher.
    subscribers: Vec<Vec<(TrackKind, ProbeCounts)>>,
    /// Packets the publisher handed to webrtc-rs, per kind.
    published: Vec<(TrackKind, u64)>,
    /// Video payload bytes the publisher handed to webrtc-rs.
    published_video_bytes: u64,
}

impl Snapshot {
    async fn take(
        server: &ServerProcess,
        publisher: &HeadlessPeer,
        subscribers: &[HeadlessPeer],
    ) -> std::io::Result<Self> {
        let body = server.metrics().await?;
        let read = |series: &str| metric_value(&body, series).unwrap_or(f64::NAN);
        let publisher_id = publisher.participant_id();
        let subscribers = subscribers
            .iter()
            .map(|s| probe_counts(&s.stats(), publisher_id))
            .collect();
        let sent = publisher.stats().sent;
        Ok(Self {
            at: Instant::now(),
            server_cpu: process_cpu_seconds(server.child.id()).unwrap_or(f64::NAN),
            server_cpu_metric: read("process_cpu_seconds_total"),
            forwarded: read("sfu_forwarded_packets_total"),
            received: read("sfu_received_packets_total"),
            congested: read("sfu_dropped_packets_total{reason=\"subscriber_congested\"}"),
            client_cpu: own_cpu_seconds().unwrap_or(f64::NAN),
            subscribers,
            published: [TrackKind::Audio, TrackKind::Video]
                .into_iter()
                .map(|k| (k, sent.get(&k).map_or(0, |s| s.packets)))
                .collect(),
            published_video_bytes: sent.get(&TrackKind::Video).map_or(0, |s| s.bytes),
        })
    }

    fn published(&self, kind: TrackKind) -> u64 {
        self.published
            .iter()
            .find(|(k, _)| *k == kind)
            .map_or(0, |(_, n)| *n)
    }
}

fn probe_counts(stats: &PeerStats, publisher: &str) -> Vec<(TrackKind, ProbeCounts)> {
    [TrackKind::Audio, TrackKind::Video]
        .into_iter()
        .map(|kind| {
            let mut counts = ProbeCounts::default();
            for track in stats.kind_from(publisher, kind) {
                if let (Some(first), Some(last)) = (track.probe_first, track.probe_last) {
                    counts.expected += last - first + 1;
                }
                counts.received += track.probe_unique;
            }
            (kind, counts)
        })
        .collect()
}

/// One row of the results.
struct Row {
    subscribers: usize,
    joined: usize,
    receiving: usize,
    seconds: f64,
    /// Video bitrate the publisher achieved, as a fraction of the configured one.
    source_ratio: f64,
    published_pps: f64,
    forwarded_pps: f64,
    server_cpu_util: f64,
    /// The window's server CPU seconds by `process_cpu_seconds_total`.
    server_cpu_metric_seconds: f64,
    forwarded_per_cpu_second: f64,
    client_cpu_util: f64,
    loss: WindowLoss,
    congested_drops: f64,
    /// The machine's 1-minute load average at the end of the window (other work included).
    load_1m: f64,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    error: Option<String>,
}

impl Row {
    fn failed(subscribers: usize, error: String) -> Self {
        Row {
            subscribers,
            joined: 0,
            receiving: 0,
            seconds: 0.0,
            source_ratio: 0.0,
            published_pps: 0.0,
            forwarded_pps: 0.0,
            server_cpu_util: 0.0,
            server_cpu_metric_seconds: 0.0,
            forwarded_per_cpu_second: 0.0,
            client_cpu_util: 0.0,
            loss: WindowLoss::default(),
            congested_drops: 0.0,
            load_1m: load_average_1m().unwrap_or(f64::NAN),
            latency_p50_ms: None,
            latency_p99_ms: None,
            error: Some(error),
        }
    }

    fn served(&self) -> bool {
        self.error.is_none()
            && self.source_ratio >= SOURCE_RATE_FLOOR
            && self.receiving == self.subscribers
            && self.loss.expected > 0
            && self.loss.ratio() < LOSS_LIMIT
    }
}

async fn run_one(settings: &Settings, subscribers: usize, logs: &std::path::Path) -> Row {
    let log = logs.join(format!("server-{subscribers}.log"));
    let server = match ServerProcess::spawn(settings, &log) {
        Ok(server) => server,
        Err(e) => return Row::failed(subscribers, format!("server did not start: {e}")),
    };
    let url = format!("ws://{}/ws", server.addr);
    let room = format!("fanout{subscribers}");
    let publisher = match Publisher::join(
        PeerConfig::new(&url, &room, "publisher").video_bitrate(settings.video_bps),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => return Row::failed(subscribers, format!("publisher could not join: {e}")),
    };
    if !publisher.peer.wait_publishing(SETUP_TIMEOUT).await {
        return Row::failed(subscribers, "publisher never published".into());
    }
    let publisher_id = publisher.peer.participant_id().to_owned();

    let setup_started = Instant::now();
    let gate = Arc::new(Semaphore::new(JOIN_CONCURRENCY));
    let mut joins = JoinSet::new();
    for i in 0..subscribers {
        let (url, room, gate, publisher_id) = (
            url.clone(),
            room.clone(),
            gate.clone(),
            publisher_id.clone(),
        );
        joins.spawn(async move {
            let peer = {
                let _permit = gate.acquire_owned().await.ok()?;
                HeadlessPeer::join(PeerConfig::new(&url, &room, format!("sub{i}")).watcher())
                    .await
                    .ok()?
            };
            // Both tracks arriving is what "joined" means to a viewer.
            let receiving = peer
                .wait_media_from(&publisher_id, 2, 10, SETUP_TIMEOUT)
                .await;
            Some((peer, receiving))
        });
    }
    let mut peers = Vec::with_capacity(subscribers);
    let mut receiving = 0;
    while let Some(joined) = joins.join_next().await {
        if let Ok(Some((peer, ok))) = joined {
            receiving += usize::from(ok);
            peers.push(peer);
        }
    }
    println!(
        "  N={subscribers}: {} joined, {receiving} receiving, setup {:.1} s",
        peers.len(),
        setup_started.elapsed().as_secs_f64()
    );

    tokio::time::sleep(WARM_UP).await;
    let row = match measure(settings, subscribers, &server, &publisher.peer, &peers).await {
        Ok(mut row) => {
            row.joined = peers.len();
            row.receiving = receiving;
            row
        }
        Err(e) => Row::failed(subscribers, format!("metrics unreadable: {e}")),
    };

    let mut leaving = JoinSet::new();
    for peer in peers {
        leaving.spawn(peer.leave());
    }
    while leaving.join_next().await.is_some() {}
    let _ = publisher.peer.leave().await;
    drop(server);
    row
}

async fn measure(
    settings: &Settings,
    subscribers: usize,
    server: &ServerProcess,
    publisher: &HeadlessPeer,
    peers: &[HeadlessPeer],
) -> std::io::Result<Row> {
    let start = Snapshot::take(server, publisher, peers).await?;
    tokio::time::sleep(settings.measure).await;
    let end = Snapshot::take(server, publisher, peers).await?;

    let seconds = end.at.duration_since(start.at).as_secs_f64();
    let server_cpu = end.server_cpu - start.server_cpu;
    let forwarded = end.forwarded - start.forwarded;
    let mut loss = WindowLoss::default();
    for (before, after) in start.subscribers.iter().zip(&end.subscribers) {
        for ((kind, b), (_, a)) in before.iter().zip(after) {
            let published = end.published(*kind) - start.published(*kind);
            loss.add(*b, *a, published);
        }
    }
    let mut latency = client::LatencyHistogram::default();
    for peer in peers {
        latency.merge(&peer.stats().merged_latency());
    }
    Ok(Row {
        subscribers,
        joined: 0,
        receiving: 0,
        seconds,
        source_ratio: (end.published_video_bytes - start.published_video_bytes) as f64 * 8.0
            / seconds
            / f64::from(settings.video_bps),
        published_pps: (end.received - start.received) / seconds,
        forwarded_pps: forwarded / seconds,
        server_cpu_util: server_cpu / seconds,
        server_cpu_metric_seconds: end.server_cpu_metric - start.server_cpu_metric,
        forwarded_per_cpu_second: forwarded / server_cpu,
        client_cpu_util: (end.client_cpu - start.client_cpu) / seconds,
        loss,
        congested_drops: end.congested - start.congested,
        load_1m: load_average_1m().unwrap_or(f64::NAN),
        latency_p50_ms: latency.quantile_ms(0.5),
        latency_p99_ms: latency.quantile_ms(0.99),
        error: None,
    })
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:>5} {:>9} {:>7} {:>8} {:>9} {:>8} {:>12} {:>7} {:>8} {:>8} {:>9} {:>9} {:>6}",
        "N",
        "receiving",
        "source",
        "in pps",
        "fwd pps",
        "srv CPU",
        "fwd/CPU-s",
        "loss %",
        "worst %",
        "cong.",
        "p50 ms",
        "p99 ms",
        "load"
    );
    for r in rows {
        if let Some(error) = &r.error {
            println!("{:>5} failed: {error}", r.subscribers);
            continue;
        }
        println!(
            "{:>5} {:>9} {:>6.0}% {:>8.0} {:>9.0} {:>7.0}% {:>12.0} {:>7.2} {:>8.2} {:>8.0} {:>9} {:>9} {:>6.1}",
            r.subscribers,
            format!("{}/{}", r.receiving, r.subscribers),
            r.source_ratio * 100.0,
            r.published_pps,
            r.forwarded_pps,
            r.server_cpu_util * 100.0,
            r.forwarded_per_cpu_second,
            r.loss.ratio() * 100.0,
            r.loss.worst * 100.0,
            r.congested_drops,
            r.latency_p50_ms.map_or("-".into(), |v| format!("{v:.1}")),
            r.latency_p99_ms.map_or("-".into(), |v| format!("{v:.1}")),
            r.load_1m,
        );
    }
    println!(
        "(source: the publisher's video bitrate as a share of the configured one; srv CPU: server \
         process CPU per wall second; this process (the headless clients) used {})",
        rows.iter()
            .filter(|r| r.error.is_none())
            .map(|r| format!(
                "{:.0}% of a core at N={}",
                r.client_cpu_util * 100.0,
                r.subscribers
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "(load: the machine's 1-minute load average at the end of the window; on 2 cores, above \
         ~2 means other work competed with this run)"
    );
    let results: Vec<(usize, bool)> = rows.iter().map(|r| (r.subscribers, r.served())).collect();
    match largest_served(&results) {
        Some(n) => {
            println!("Largest N with < 1% loss, source at full rate, and every smaller N too: {n}")
        }
        None => println!("The smallest N already failed (< 1% loss with the source at full rate)"),
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.served())
        .map(|r| r.subscribers.to_string())
        .collect();
    if !failed.is_empty() {
        println!("Not served: N = {}", failed.join(", "));
    }
}

fn write_json(rows: &[Row], settings: &Settings, path: &std::path::Path) -> std::io::Result<()> {
    let rows_served: Vec<(usize, bool)> =
        rows.iter().map(|r| (r.subscribers, r.served())).collect();
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "subscribers": r.subscribers,
                "joined": r.joined,
                "receiving": r.receiving,
                "seconds": r.seconds,
                "source_video_bitrate_ratio": r.source_ratio,
                "published_packets_per_second": r.published_pps,
                "forwarded_packets_per_second": r.forwarded_pps,
                "server_cpu_utilisation": r.server_cpu_util,
                "server_cpu_seconds_by_metric": r.server_cpu_metric_seconds,
                "forwarded_packets_per_server_cpu_second": r.forwarded_per_cpu_second,
                "client_cpu_utilisation": r.client_cpu_util,
                "loss_ratio": r.loss.ratio(),
                "worst_track_loss_ratio": r.loss.worst,
                "expected_packets": r.loss.expected,
                "received_packets": r.loss.received,
                "subscriber_congested_drops": r.congested_drops,
                "latency_p50_ms": r.latency_p50_ms,
                "latency_p99_ms": r.latency_p99_ms,
                "load_average_1m": r.load_1m,
                "served": r.served(),
                "error": r.error,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "video_bps": settings.video_bps,
        "measure_seconds": settings.measure.as_secs_f64(),
        "largest_served": largest_served(&rows_served),
        "rows": rows,
    });
    std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
}

/// Server mode: what `sfu-server`'s `main` does, ending on SIGTERM or when the parent goes
/// away (its end of our stdin closes).
fn run_server() {
    let config = ServerConfig::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&config.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    runtime.block_on(async {
        let server = Server::start(config).await.expect("the server starts");
        println!("sfu-server listening on http://{}", server.addr);
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        let mut stdin = tokio::io::stdin();
        let mut sink = [0u8; 64];
        tokio::select! {
            _ = term.recv() => {}
            _ = async { while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {} } => {}
        }
        server.shutdown(Duration::from_secs(4)).await;
    });
}

fn main() {
    if std::env::var_os(SERVER_MODE_ENV).is_some() {
        run_server();
        return;
    }
    // `cargo bench -- <filter>` passes the filter to every bench binary: run only if it
    // names this one.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| "whole_server".contains(f.as_str())) {
        return;
    }

    let settings = Settings::from_env();
    let out_dir = target_dir().join("sfu-benches");
    std::fs::create_dir_all(&out_dir).expect("create target/sfu-benches");
    println!(
        "whole_server: 1 publisher (VP8 {} kbit/s + Opus) -> N subscribers, {:.0} s measured per N, server: {}",
        settings.video_bps / 1000,
        settings.measure.as_secs_f64(),
        settings
            .server_bin
            .as_ref()
            .map_or("this bench re-executed in server mode".into(), |p| p
                .display()
                .to_string())
    );
    println!(
        "load average at start: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let rows: Vec<Row> = settings
        .subscriber_counts
        .iter()
        .map(|&n| runtime.block_on(run_one(&settings, n, &out_dir)))
        .collect();
    print_table(&rows);
    let json = out_dir.join("whole_server.json");
    match write_json(&rows, &settings, &json) {
        Ok(()) => println!("wrote {}", json.display()),
        Err(e) => eprintln!("could not write {}: {e}", json.display()),
    }
}
