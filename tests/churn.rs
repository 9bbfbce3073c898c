//! Churn: 1000 join/leave cycles over signaling and 50 with real media (a publisher and a
//! watcher exchanging audio and video), against an in-process server. Afterwards the room
//! gauges read 0, no session is left, and the process's live tokio tasks and resident memory
//! are back at the baseline taken after a warm-up: nothing leaks per join.

mod common;

use client::{HeadlessPeer, PeerConfig, SignalClient};
use common::{metric, start_server, wait_metric, ws_url, WAIT};
use signaling::protocol::{ClientMessage, ServerMessage};
use signaling::Server;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Signaling-only cycles, run this many at a time.
const SIGNALING_CYCLES: usize = 1000;
const SIGNALING_PARALLEL: usize = 10;
/// Media cycles: this many rooms at a time, each a publisher and a watcher.
const MEDIA_CYCLES: usize = 50;
const MEDIA_PARALLEL: usize = 5;
/// Resident memory may end this much above the baseline: allocator caches and lazily grown
/// pools. A leak of one session (tens of KiB) per cycle would be several times more.
const RSS_TOLERANCE_BYTES: u64 = 8 << 20;

/// The process's resident memory as the server reports it (the server runs in this process).
async fn resident_bytes(server: &Server) -> u64 {
    metric(server, "process_resident_memory_bytes").await as u64
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Joins `room` over signaling only, then leaves and waits for the server to close.
async fn signaling_cycle(url: String, room: String, name: String) {
    let client = SignalClient::connect(&url).await.expect("connects");
    client
        .send(&ClientMessage::Join {
            room,
            name,
            token: None,
        })
        .await
        .unwrap();
    let joined = client
        .recv_until(WAIT, |m| {
            matches!(m, ServerMessage::Joined { .. }).then_some(())
        })
        .await;
    assert!(matches!(joined, Ok(Some(()))), "join failed: {joined:?}");
    client.send(&ClientMessage::Leave).await.unwrap();
    assert!(
        client.wait_closed(WAIT).await.is_some(),
        "the server closes after leave"
    );
}

/// A publisher and a watcher meet in `room`, media flows both ways it should, both leave.
async fn media_cycle(url: String, room: String) {
    let publisher = HeadlessPeer::join(PeerConfig::new(&url, &room, "pub"))
        .await
        .expect("publisher joins");
    let watcher = HeadlessPeer::join(PeerConfig::new(&url, &room, "watch").watcher())
        .await
        .expect("watcher joins");
    assert!(
        watcher
            .wait_media_from(publisher.participant_id(), 2, 10, WAIT)
            .await,
        "media did not flow in {room}"
    );
    publisher.leave().await.unwrap();
    watcher.leave().await.unwrap();
}

async fn run_signaling_cycles(server: &Server, count: usize, tag: &str) {
    let url = ws_url(server);
    let mut cycles = JoinSet::new();
    for i in 0..count {
        if cycles.len() >= SIGNALING_PARALLEL {
            cycles.join_next().await.unwrap().unwrap();
        }
        cycles.spawn(signaling_cycle(
            url.clone(),
            format!("{tag}-{}", i % 20),
            format!("n{i}"),
        ));
    }
    while let Some(done) = cycles.join_next().await {
        done.unwrap();
    }
}

async fn run_media_cycles(server: &Server, count: usize, tag: &str) {
    let url = ws_url(server);
    let mut cycles = JoinSet::new();
    for i in 0..count {
        if cycles.len() >= MEDIA_PARALLEL {
            cycles.join_next().await.unwrap().unwrap();
        }
        cycles.spawn(media_cycle(url.clone(), format!("{tag}-{i}")));
    }
    while let Some(done) = cycles.join_next().await {
        done.unwrap();
    }
}

/// Waits until nothing of any call is left: gauges at 0 and no session running.
async fn assert_idle(server: &Server) {
    for gauge in ["sfu_participants", "sfu_published_tracks", "sfu_rooms"] {
        assert!(
            wait_metric(server, gauge, 0.0).await,
            "{gauge} is {} after everyone left",
            metric(server, gauge).await
        );
    }
    let deadline = Instant::now() + WAIT;
    while !server.state().sessions.is_empty() {
        assert!(Instant::now() < deadline, "sessions left behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (a while) for the live task count to come down to `baseline`; returns the last count.
async fn settled_tasks(baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = alive_tasks();
        if now <= baseline || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_joins_and_leaves_leave_no_tasks_or_memory_behind() {
    let server = start_server(&[]).await;

    // Warm-up: first-use allocations (codecs, pools, lazily spawned helpers) happen here.
    run_signaling_cycles(&server, 100, "warm").await;
    run_media_cycles(&server, 10, "warm-media").await;
    assert_idle(&server).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline_tasks = alive_tasks();
    let baseline_rss = resident_bytes(&server).await;

    let started = Instant::now();
    run_signaling_cycles(&server, SIGNALING_CYCLES, "churn").await;
    let signaling_time = started.elapsed();
    let started = Instant::now();
    run_media_cycles(&server, MEDIA_CYCLES, "churn-media").await;
    let media_time = started.elapsed();
    let peak_rss = resident_bytes(&server).await;
    assert_idle(&server).await;

    let tasks = settled_tasks(baseline_tasks).await;
    let rss = resident_bytes(&server).await;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!(
        "churn: {SIGNALING_CYCLES} signaling cycles in {:.1} s ({:.1} ms each, {SIGNALING_PARALLEL} at a time); \
         {MEDIA_CYCLES} media cycles in {:.1} s ({MEDIA_PARALLEL} rooms at a time); \
         tasks {baseline_tasks} -> {tasks}; RSS {:.1} MiB -> {:.1} MiB (peak {:.1} MiB)",
        signaling_time.as_secs_f64(),
        signaling_time.as_secs_f64() * 1000.0 / SIGNALING_CYCLES as f64,
        media_time.as_secs_f64(),
        mib(baseline_rss),
        mib(rss),
        mib(peak_rss),
    );
    assert!(
        tasks <= baseline_tasks,
        "{} tasks still alive after churn, {baseline_tasks} before",
        tasks
    );
    assert!(
        rss <= baseline_rss + RSS_TOLERANCE_BYTES,
        "resident memory grew from {:.1} MiB to {:.1} MiB",
        mib(baseline_rss),
        mib(rss)
    );
    server.shutdown(Duration::from_secs(5)).await;
}
