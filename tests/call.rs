//! A multi-party call through the server, with headless clients on 127.0.0.1: everyone
//! receives everyone else, leaving and joining late renegotiate, mute stops and resumes
//! forwarding, chat reaches the room, and the gauges count exactly what exists.

mod common;

use client::{HeadlessPeer, PeerConfig, TrackKind};
use common::{metric, start_server, wait_metric, ws_url, WAIT};
use signaling::protocol::ServerMessage;
use std::time::Duration;

async fn join(url: &str, room: &str, name: &str) -> HeadlessPeer {
    HeadlessPeer::join(PeerConfig::new(url, room, name))
        .await
        .unwrap_or_else(|e| panic!("{name} could not join: {e}"))
}

async fn join_watcher(url: &str, room: &str, name: &str) -> HeadlessPeer {
    HeadlessPeer::join(PeerConfig::new(url, room, name).watcher())
        .await
        .unwrap_or_else(|e| panic!("{name} could not join: {e}"))
}

/// Every track `me` receives has a gap-free sequence, and every video track started on a
/// keyframe.
fn assert_clean_reception(me: &HeadlessPeer, who: &str) {
    let stats = me.stats();
    for ((publisher, track_id), track) in &stats.tracks {
        assert!(
            track.seq_continuous(),
            "{who} got a broken sequence on {publisher}/{track_id}: {track:?}"
        );
        if track.kind == Some(TrackKind::Video) {
            assert_eq!(
                track.first_packet_keyframe,
                Some(true),
                "{who}'s video from {publisher} did not start on a keyframe"
            );
        }
    }
}

/// The last subscriber offer `me` received.
fn last_offer(me: &HeadlessPeer) -> String {
    me.events()
        .into_iter()
        .rev()
        .find_map(|e| match e {
            ServerMessage::Offer { sdp, .. } => Some(sdp),
            _ => None,
        })
        .expect("a subscriber offer")
}

/// The m-sections of the last subscriber offer `me` received: (direction or "port0", msid).
fn last_offer_sections(me: &HeadlessPeer) -> Vec<(String, Option<String>)> {
    let sdp = last_offer(me);
    let mut sections: Vec<(String, Option<String>)> = Vec::new();
    for line in sdp.lines() {
        if let Some(m) = line.strip_prefix("m=") {
            let port_zero = m.split_whitespace().nth(1) == Some("0");
            sections.push((if port_zero { "port0" } else { "sendrecv" }.into(), None));
        } else if let Some(last) = sections.last_mut() {
            if let Some(msid) = line.strip_prefix("a=msid:") {
                last.1 = Some(msid.trim().to_owned());
            } else if ["a=sendonly", "a=recvonly", "a=inactive", "a=sendrecv"]
                .contains(&line.trim())
                && last.0 != "port0"
            {
                last.0 = line.trim()[2..].to_owned();
            }
        }
    }
    sections
}

/// Every forwarded track in the offer is `sendonly` with `a=msid` and per-SSRC msid lines.
fn assert_offer_maps_streams(me: &HeadlessPeer, who: &str) {
    let sdp = last_offer(me);
    for (direction, msid) in last_offer_sections(me) {
        if direction == "sendonly" {
            let msid = msid.unwrap_or_else(|| panic!("{who}: a sending m-section without msid"));
            assert!(
                sdp.lines()
                    .any(|l| l.starts_with("a=ssrc:") && l.ends_with(&format!("msid:{msid}"))),
                "{who}: no a=ssrc line with msid:{msid}"
            );
        }
    }
}

fn packets_from(me: &HeadlessPeer, publisher: &str) -> u64 {
    me.stats()
        .from_publisher(publisher)
        .map(|(_, t)| t.packets)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_way_call_then_one_leaves() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let alice = join(&url, "standup", "alice").await;
    let bob = join(&url, "standup", "bob").await;
    let carol = join(&url, "standup", "carol").await;
    let peers = [("alice", &alice), ("bob", &bob), ("carol", &carol)];

    for (name, me) in peers {
        assert!(me.wait_publishing(WAIT).await, "{name} never published");
    }
    for (name, me) in peers {
        for (other, them) in peers {
            if other != name {
                assert!(
                    me.wait_media_from(them.participant_id(), 2, 50, WAIT).await,
                    "{name} did not receive audio and video from {other}: {:?}",
                    me.stats().tracks
                );
            }
        }
        assert_eq!(
            me.stats().tracks.len(),
            4,
            "{name} receives exactly 4 tracks"
        );
    }
    for (name, me) in peers {
        assert_clean_reception(me, name);
        assert_offer_maps_streams(me, name);
        let sending = last_offer_sections(me)
            .into_iter()
            .filter(|(d, _)| d == "sendonly")
            .count();
        assert_eq!(sending, 4, "{name}'s offer sends 4 tracks");
    }
    assert_eq!(metric(&server, "sfu_rooms").await, 1.0);
    assert_eq!(metric(&server, "sfu_participants").await, 3.0);
    assert_eq!(metric(&server, "sfu_published_tracks").await, 6.0);
    assert!(metric(&server, "sfu_forwarded_packets_total").await > 0.0);
    assert!(metric(&server, "sfu_received_packets_total").await > 0.0);

    // Carol leaves: the others hear about each of her tracks, then about her, and get an offer
    // without her tracks; they keep receiving each other.
    let carol_id = carol.participant_id().to_owned();
    let offers_before = [
        alice.state().subscriber_offers,
        bob.state().subscriber_offers,
    ];
    carol.leave().await.unwrap();
    for (i, (name, me)) in [("alice", &alice), ("bob", &bob)].into_iter().enumerate() {
        assert!(
            me.wait_for(WAIT, |s| s.left.contains(&carol_id)
                && !s.participants.contains_key(&carol_id))
                .await,
            "{name} was not told carol left"
        );
        let events = me.events();
        let unpublished = events
            .iter()
            .filter(|e| matches!(e, ServerMessage::TrackUnpublished { participant_id, .. } if *participant_id == carol_id))
            .count();
        assert_eq!(
            unpublished, 2,
            "{name} gets track_unpublished for both of carol's tracks"
        );
        let order_ok = events.iter().rposition(|e| matches!(e, ServerMessage::TrackUnpublished { participant_id, .. } if *participant_id == carol_id))
            < events.iter().position(|e| matches!(e, ServerMessage::ParticipantLeft { participant_id } if *participant_id == carol_id));
        assert!(order_ok, "track_unpublished comes before participant_left");
        assert!(
            me.wait_for(WAIT, |s| s.subscriber_offers > offers_before[i]
                && s.subscriber_answers == s.subscriber_offers)
                .await,
            "{name} got no renegotiation after carol left"
        );
    }
    for (name, me) in [("alice", &alice), ("bob", &bob)] {
        // Changes may arrive in more than one offer; wait for the one that settles them.
        let deadline = tokio::time::Instant::now() + WAIT;
        while last_offer_sections(me)
            .iter()
            .filter(|(d, _)| d == "sendonly")
            .count()
            != 2
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let sections = last_offer_sections(me);
        let sending: Vec<_> = sections.iter().filter(|(d, _)| d == "sendonly").collect();
        assert_eq!(
            sending.len(),
            2,
            "{name}'s new offer sends only the remaining 2 tracks"
        );
        assert!(
            sending
                .iter()
                .all(|(_, msid)| !msid.as_deref().unwrap_or("").starts_with(&carol_id)),
            "{name}'s offer still sends carol's tracks"
        );
        let stopped = sections
            .iter()
            .filter(|(d, _)| d == "inactive" || d == "port0")
            .count();
        assert_eq!(
            stopped, 2,
            "{name}: carol's m-sections are inactive: {sections:?}"
        );
    }
    let (a_from_b, b_from_a) = (
        packets_from(&alice, bob.participant_id()),
        packets_from(&bob, alice.participant_id()),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(packets_from(&alice, bob.participant_id()) > a_from_b + 10);
    assert!(packets_from(&bob, alice.participant_id()) > b_from_a + 10);
    assert!(wait_metric(&server, "sfu_participants", 2.0).await);
    assert!(wait_metric(&server, "sfu_published_tracks", 4.0).await);

    alice.leave().await.unwrap();
    bob.leave().await.unwrap();
    assert!(wait_metric(&server, "sfu_participants", 0.0).await);
    assert!(wait_metric(&server, "sfu_published_tracks", 0.0).await);
    assert!(wait_metric(&server, "sfu_rooms", 0.0).await);
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_receives_existing_tracks_from_a_keyframe() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let alice = join(&url, "late", "alice").await;
    let bob = join(&url, "late", "bob").await;
    assert!(alice.wait_publishing(WAIT).await && bob.wait_publishing(WAIT).await);
    assert!(
        bob.wait_media_from(alice.participant_id(), 2, 20, WAIT)
            .await
    );
    // Let the keyframe that started the first subscribers age, so the late joiner needs a new one.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let dave = join_watcher(&url, "late", "dave").await;
    let state = dave.state();
    assert_eq!(state.participants.len(), 2, "joined lists both publishers");
    for p in state.participants.values() {
        assert_eq!(p.tracks.len(), 2, "joined lists each publisher's tracks");
    }
    for them in [&alice, &bob] {
        assert!(
            dave.wait_media_from(them.participant_id(), 2, 20, WAIT)
                .await,
            "late joiner did not receive {}",
            them.participant_id()
        );
    }
    assert_clean_reception(&dave, "dave");
    // The publishers were asked for a keyframe for the newcomer.
    let sent = alice.stats().sent;
    assert!(sent[&TrackKind::Video].keyframe_requests >= 1);
    // A watcher never opened a publisher connection.
    assert!(dave.publisher_pc().is_none());
    assert_eq!(metric(&server, "sfu_participants").await, 3.0);
    assert_eq!(metric(&server, "sfu_published_tracks").await, 4.0);
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_stops_forwarding_and_unmute_resumes() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let alice = join(&url, "mute", "alice").await;
    let bob = join_watcher(&url, "mute", "bob").await;
    assert!(alice.wait_publishing(WAIT).await);
    let alice_id = alice.participant_id().to_owned();
    assert!(bob.wait_media_from(&alice_id, 2, 20, WAIT).await);
    let video_id = alice.own_track_id(TrackKind::Video).unwrap();
    let video_packets = |bob: &HeadlessPeer| {
        bob.stats()
            .track(&alice_id, &video_id)
            .map(|t| t.packets)
            .unwrap_or(0)
    };

    assert!(alice.mute_kind(TrackKind::Video, true).unwrap());
    assert!(
        bob.wait_for(WAIT, |s| s.participants[&alice_id].tracks[&video_id].muted)
            .await,
        "bob never got track_muted"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let muted_at = video_packets(&bob);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        video_packets(&bob),
        muted_at,
        "video still flows while muted"
    );
    assert!(metric(&server, "sfu_dropped_packets_total{reason=\"muted\"}").await > 0.0);
    let audio_id = alice.own_track_id(TrackKind::Audio).unwrap();
    let audio_before = bob.stats().track(&alice_id, &audio_id).unwrap().packets;

    assert!(alice.mute_kind(TrackKind::Video, false).unwrap());
    assert!(
        bob.wait_for(WAIT, |s| !s.participants[&alice_id].tracks[&video_id].muted)
            .await
    );
    assert!(
        bob.wait_for_stats(WAIT, |s| s
            .track(&alice_id, &video_id)
            .is_some_and(|t| t.packets > muted_at + 20))
            .await,
        "video did not resume after unmute"
    );
    assert!(
        bob.stats().track(&alice_id, &audio_id).unwrap().packets > audio_before,
        "audio was never muted"
    );
    // Resumed without a gap in numbering, on a fresh keyframe.
    let video = bob.stats().track(&alice_id, &video_id).unwrap().clone();
    assert!(video.seq_continuous(), "{video:?}");
    assert!(video.keyframes >= 2, "resumed on a keyframe");
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_reaches_everyone_including_the_sender() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let a = join_watcher(&url, "chat", "alice").await;
    let b = join_watcher(&url, "chat", "bob").await;
    let c = join_watcher(&url, "chat", "carol").await;
    assert!(a.wait_for(WAIT, |s| s.participants.len() == 2).await);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    a.chat("héllo, wörld").unwrap();
    for (name, me) in [("alice", &a), ("bob", &b), ("carol", &c)] {
        assert!(
            me.wait_for(WAIT, |s| !s.chats.is_empty()).await,
            "{name} got no chat"
        );
        let line = me.state().chats[0].clone();
        assert_eq!(line.text, "héllo, wörld");
        assert_eq!(line.name, "alice");
        assert_eq!(line.participant_id, a.participant_id());
        assert!(
            line.ts >= before && line.ts < before + 10_000,
            "ts is Unix ms"
        );
    }
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_speakers_follow_audio_levels_loudest_first() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let alice = join(&url, "talk", "alice").await;
    let bob = join(&url, "talk", "bob").await;
    let watcher = join_watcher(&url, "talk", "watcher").await;
    assert!(alice.wait_publishing(WAIT).await && bob.wait_publishing(WAIT).await);
    let (alice_id, bob_id) = (
        alice.participant_id().to_owned(),
        bob.participant_id().to_owned(),
    );
    // Silence (127 −dBov, the client's default) makes no speaker.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(watcher.state().active_speaker_updates, 0);

    alice.set_audio_level(Some(25));
    for me in [&alice, &bob, &watcher] {
        assert!(
            me.wait_for(WAIT, |s| s.active_speakers == vec![alice_id.clone()])
                .await,
            "alice speaking was not announced: {:?}",
            me.state().active_speakers
        );
    }
    bob.set_audio_level(Some(10));
    assert!(
        watcher
            .wait_for(WAIT, |s| s.active_speakers
                == vec![bob_id.clone(), alice_id.clone()])
            .await,
        "loudest first: {:?}",
        watcher.state().active_speakers
    );
    alice.set_audio_level(Some(127));
    assert!(
        watcher
            .wait_for(WAIT, |s| s.active_speakers == vec![bob_id.clone()])
            .await
    );
    // A muted microphone is not a speaker.
    assert!(bob.mute_kind(TrackKind::Audio, true).unwrap());
    assert!(
        watcher
            .wait_for(WAIT, |s| s.active_speakers.is_empty())
            .await
    );
    let updates = watcher.state().active_speaker_updates;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        watcher.state().active_speaker_updates,
        updates,
        "sent only on change"
    );
    server.shutdown(Duration::from_secs(3)).await;
}
