//! Simulcast from a headless publisher through the real server: the publisher sends its video
//! as three layers (rids q, h, f: 320×180, 640×360 and 1280×720, each a synthetic VP8 source
//! whose keyframes announce its size and whose probes name its layer). The server announces
//! the track as simulcast; a subscriber that asks for `low` gets the smallest layer, one that
//! asks for `high` (and one that never asks) the largest; when two of them swap, each gets the
//! other layer, starting on a keyframe, with its sequence numbers and timestamps running on as
//! one stream.
//!
//! The publisher makes keyframes only when asked (its first frame aside), so every layer a
//! subscriber reaches proves that the server asked that layer for a keyframe and the publisher
//! answered on that layer.

mod common;

use client::{HeadlessPeer, PeerConfig, TrackStats};
use common::{start_server, ws_url, WAIT};
use signaling::protocol::{Quality, TrackKind};
use std::time::Duration;

const ROOM: &str = "simulcast";
/// The layers of `SimulcastLayer::three_layers`, smallest first: (index, frame size).
const LOW: (u8, (u16, u16)) = (0, (320, 180));
const HIGH: (u8, (u16, u16)) = (2, (1280, 720));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_subscriber_gets_the_layer_it_asks_for_and_switches_on_a_keyframe() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let mut camera = PeerConfig::new(&url, ROOM, "camera")
        .publish(true, false)
        .simulcast();
    camera.keyframe_interval = None;
    let camera = HeadlessPeer::join(camera).await.expect("publisher joins");
    assert!(
        camera.wait_publishing(WAIT).await,
        "the simulcast publisher never got its track announced: {:#?}",
        camera.state()
    );
    let own = camera
        .state()
        .own_track(TrackKind::Video)
        .cloned()
        .expect("own video track");
    assert!(own.simulcast, "track_published says simulcast: {own:?}");
    let track_id = own.track_id.clone();
    let camera_id = camera.participant_id().to_owned();

    let join_viewer = |name: &'static str| {
        let url = url.clone();
        async move {
            HeadlessPeer::join(PeerConfig::new(&url, ROOM, name).watcher())
                .await
                .unwrap_or_else(|e| panic!("{name} joins: {e}"))
        }
    };
    let low = join_viewer("low").await;
    // Asked as soon as `joined` announces the track, before its media reaches this viewer:
    // the server keeps the wish until it subscribes the viewer.
    low.set_quality(&track_id, Quality::Low).unwrap();
    let high = join_viewer("high").await;
    let default = join_viewer("default").await;
    for viewer in [&low, &high, &default] {
        let state = viewer.state();
        let announced = state
            .remote_tracks()
            .find(|(publisher, t)| **publisher == camera_id && t.track_id == track_id)
            .map(|(_, t)| t.clone())
            .unwrap_or_else(|| panic!("the video track was not announced: {state:#?}"));
        assert!(announced.simulcast, "announced as simulcast: {announced:?}");
        assert!(
            viewer.wait_media_from(&camera_id, 1, 1, WAIT).await,
            "no video arrived: {:#?}",
            viewer.stats()
        );
    }

    high.set_quality(&track_id, Quality::High).unwrap();
    wait_for_layer(&low, "low", &camera_id, &track_id, LOW).await;
    for viewer in [&low, &high, &default] {
        let errors = viewer.state().errors;
        assert!(
            errors.is_empty(),
            "the server refused something: {errors:?}"
        );
    }
    wait_for_layer(&high, "high", &camera_id, &track_id, HIGH).await;
    let at_default = wait_for_layer(&default, "default", &camera_id, &track_id, HIGH).await;
    for switch in &at_default.layer_switches {
        assert!(
            switch.on_keyframe,
            "a subscriber that never asked switched layers off a keyframe: {switch:?}"
        );
    }

    let low_before = received(&low, &camera_id, &track_id).layer_switches.len();
    let high_before = received(&high, &camera_id, &track_id).layer_switches.len();
    low.set_quality(&track_id, Quality::High).unwrap();
    high.set_quality(&track_id, Quality::Low).unwrap();
    let low_after = wait_for_layer(&low, "low→high", &camera_id, &track_id, HIGH).await;
    let high_after = wait_for_layer(&high, "high→low", &camera_id, &track_id, LOW).await;
    check_switch(&low_after, low_before, LOW, HIGH);
    check_switch(&high_after, high_before, HIGH, LOW);

    // Keyframes are made only when asked, and only on the layer asked for.
    let sent = camera.sent_stats();
    let layers = &sent
        .get(&TrackKind::Video)
        .expect("video sent stats")
        .layers;
    let rids: Vec<&str> = layers.iter().map(|l| l.rid.as_str()).collect();
    assert_eq!(rids, ["q", "h", "f"], "{layers:#?}");
    for layer in layers {
        assert!(
            layer.packets > 0,
            "layer {} sent nothing: {layers:#?}",
            layer.rid
        );
        assert!(
            layer.keyframes <= 1 + layer.keyframe_requests,
            "layer {} made keyframes nobody asked it for: {layers:#?}",
            layer.rid
        );
    }
    for rid in ["q", "f"] {
        let layer = layers.iter().find(|l| l.rid == rid).unwrap();
        assert!(
            layer.keyframe_requests > 0 && layer.keyframes > 1,
            "layer {rid} was switched to, so it was asked for a keyframe and made one: \
             {layers:#?}"
        );
    }

    for peer in [low, high, default, camera] {
        peer.leave().await.unwrap();
    }
    server.shutdown(Duration::from_secs(5)).await;
}

/// What `peer` has received of the track so far.
fn received(peer: &HeadlessPeer, publisher: &str, track_id: &str) -> TrackStats {
    peer.stats()
        .track(publisher, track_id)
        .cloned()
        .unwrap_or_default()
}

/// Waits until `peer` receives layer `layer` (probe layer index, keyframe size) of the track;
/// returns what it received then.
async fn wait_for_layer(
    peer: &HeadlessPeer,
    who: &str,
    publisher: &str,
    track_id: &str,
    (layer, size): (u8, (u16, u16)),
) -> TrackStats {
    let arrived = peer
        .wait_for_stats(WAIT, |s| {
            s.track(publisher, track_id)
                .is_some_and(|t| t.layer == Some(layer) && t.frame_size == Some(size))
        })
        .await;
    let stats = received(peer, publisher, track_id);
    assert!(
        arrived,
        "{who}: layer {layer} ({}x{}) never arrived: {stats:#?}",
        size.0, size.1
    );
    stats
}

/// The switch from layer `from` to `to` (after the first `before` switches) started on a
/// keyframe of the new size and continued the stream: the next sequence number (any number
/// skipped was lost and arrived later, repaired), a later timestamp, the next picture id.
fn check_switch(stats: &TrackStats, before: usize, from: (u8, (u16, u16)), to: (u8, (u16, u16))) {
    let switches = &stats.layer_switches[before..];
    let switch = switches
        .iter()
        .find(|s| s.from == from.0 && s.to == to.0)
        .unwrap_or_else(|| panic!("no switch {} → {}: {stats:#?}", from.0, to.0));
    assert!(switch.on_keyframe, "started off a keyframe: {switch:?}");
    assert_eq!(switch.frame_size, Some(to.1), "{switch:?}");
    assert!(
        switch.seq_step >= 1 && switch.seq_step - 1 <= stats.seq_late,
        "the sequence jumped at the switch by more than loss explains: {switch:?} {stats:#?}"
    );
    assert!(
        switch.timestamp_step > 0,
        "the timestamp did not move forward at the switch: {switch:?}"
    );
    // Each layer numbers its pictures from its own start; a browser's decoder drops the new
    // layer's frames as old ones unless the numbering runs on.
    assert!(
        switch
            .picture_id_step
            .is_some_and(|step| step >= 1 && u64::from(step) - 1 <= stats.seq_late),
        "the VP8 picture id did not continue at the switch: {switch:?}"
    );
    assert_eq!(
        stats.timestamp_regressions, 0,
        "timestamps went back: {stats:#?}"
    );
    assert!(
        switches.iter().all(|s| s.on_keyframe),
        "every switch starts on a keyframe: {switches:#?}"
    );
}
