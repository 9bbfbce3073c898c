//! Loss is repaired both ways: the SFU asks a publisher for what the path lost (NACK) and
//! answers a subscriber's NACKs from its send cache. Loss is simulated inside the clients'
//! interceptor chains (one video packet in 15 dropped once, where a lossy path would drop it),
//! and every lost packet must still reach the subscriber.

mod common;

use client::rtc_setup::LossSimulation;
use client::{HeadlessPeer, PeerConfig, TrackKind};
use common::{metric, start_server, ws_url, WAIT};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Waits until `watcher` has received `packets` video packets from `publisher`, having seen
/// gaps in the sequence (the loss reached it) and every skipped number arrive later (repaired).
async fn video_repaired(watcher: &HeadlessPeer, publisher: &HeadlessPeer, packets: u64) -> bool {
    let publisher_id = publisher.participant_id().to_owned();
    let video_id = publisher
        .own_track_id(TrackKind::Video)
        .expect("video published");
    watcher
        .wait_for_stats(WAIT, |s| {
            s.track(&publisher_id, &video_id).is_some_and(|t| {
                t.packets >= packets
                    && t.seq_missing > 0
                    && t.seq_late == t.seq_missing
                    && t.probe_lost() == 0
            })
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_loss_is_repaired_by_nack_to_the_publisher() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let loss = LossSimulation::one_in(15);
    let mut config = PeerConfig::new(&url, "lossy-up", "sender").publish(true, false);
    config.pc.loss = Some(loss.clone());
    let sender = HeadlessPeer::join(config).await.unwrap();
    let watcher = HeadlessPeer::join(PeerConfig::new(&url, "lossy-up", "watcher").watcher())
        .await
        .unwrap();
    assert!(sender.wait_publishing(WAIT).await);
    assert!(
        video_repaired(&watcher, &sender, 300).await,
        "losses on the way to the SFU were not repaired: {:?}",
        watcher.stats().tracks
    );
    assert!(loss.dropped.load(Ordering::Relaxed) >= 10, "loss happened");
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_loss_is_repaired_from_the_sfu_cache() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let sender =
        HeadlessPeer::join(PeerConfig::new(&url, "lossy-down", "sender").publish(true, false))
            .await
            .unwrap();
    let loss = LossSimulation::one_in(15);
    let mut config = PeerConfig::new(&url, "lossy-down", "watcher").watcher();
    config.pc.loss = Some(loss.clone());
    let watcher = HeadlessPeer::join(config).await.unwrap();
    assert!(sender.wait_publishing(WAIT).await);
    assert!(
        video_repaired(&watcher, &sender, 300).await,
        "losses on the way to the subscriber were not repaired: {:?}",
        watcher.stats().tracks
    );
    assert!(loss.dropped.load(Ordering::Relaxed) >= 10, "loss happened");
    // Retransmissions count as forwarded packets.
    let forwarded = metric(&server, "sfu_forwarded_packets_total").await;
    let received = metric(&server, "sfu_received_packets_total").await;
    assert!(
        forwarded > received,
        "one subscriber, plus retransmissions: {forwarded} > {received}"
    );
    server.shutdown(Duration::from_secs(3)).await;
}
