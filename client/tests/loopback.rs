//! The publisher wiring (codecs, interceptors, local tracks, paced senders, keyframe requests)
//! against a plain webrtc-rs answering peer over 127.0.0.1, with no SFU and no signaling server.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use client::publish::{add_published_track, spawn_sender, AudioLevel, SendOptions, VideoMedia};
use client::rtc_setup::{build_peer_connection, PcOptions};
use client::stats::StatsStore;
use client::{TrackKind, VideoConfig};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::media_stream::Track;
use webrtc::peer_connection::{
    PeerConnectionEventHandler, RTCIceCandidateInit, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState,
};

/// Forwards candidates to the test and records remote tracks.
struct Handler {
    candidates: mpsc::UnboundedSender<RTCIceCandidateInit>,
    state: Arc<watch::Sender<RTCPeerConnectionState>>,
    stats: StatsStore,
    tracks: Arc<Mutex<Vec<Arc<dyn TrackRemote>>>>,
}

#[async_trait]
impl PeerConnectionEventHandler for Handler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let _ = self.candidates.send(init);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.state.send_replace(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        self.tracks.lock().unwrap().push(Arc::clone(&track));
        let stats = self.stats.clone();
        tokio::spawn(async move { stats.record_track(track).await });
    }
}

struct Side {
    candidates: mpsc::UnboundedReceiver<RTCIceCandidateInit>,
    state: Arc<watch::Sender<RTCPeerConnectionState>>,
    stats: StatsStore,
    tracks: Arc<Mutex<Vec<Arc<dyn TrackRemote>>>>,
    handler: Arc<Handler>,
}

fn side() -> Side {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = Arc::new(watch::Sender::new(RTCPeerConnectionState::New));
    let stats = StatsStore::default();
    let tracks = Arc::default();
    let handler = Arc::new(Handler {
        candidates: tx,
        state: Arc::clone(&state),
        stats: stats.clone(),
        tracks: Arc::clone(&tracks),
    });
    Side {
        candidates: rx,
        state,
        stats,
        tracks,
        handler,
    }
}

async fn wait_stats(
    stats: &StatsStore,
    timeout: Duration,
    mut f: impl FnMut(&client::PeerStats) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if f(&stats.snapshot()) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f(&stats.snapshot())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_reaches_a_plain_webrtc_peer_and_answers_pli() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();

    let mut offerer = side();
    let mut answerer = side();
    let options = PcOptions::default();
    let pub_pc = build_peer_connection(&options, offerer.handler.clone())
        .await
        .unwrap();
    let sub_pc = build_peer_connection(&options, answerer.handler.clone())
        .await
        .unwrap();

    let video = add_published_track(&pub_pc, TrackKind::Video, "pub-1")
        .await
        .unwrap();
    let audio = add_published_track(&pub_pc, TrackKind::Audio, "pub-1")
        .await
        .unwrap();
    let send_options = SendOptions {
        video: VideoMedia::Synthetic(VideoConfig {
            bitrate_bps: 800_000,
            // Only the first keyframe and requested ones, so a PLI's effect is visible.
            keyframe_interval: None,
            ..VideoConfig::default()
        }),
        audio: Default::default(),
        audio_level: AudioLevel::new(Some(40)),
    };
    let _video_task = spawn_sender(
        video.clone(),
        send_options.clone(),
        offerer.stats.clone(),
        offerer.state.subscribe(),
    );
    let _audio_task = spawn_sender(
        audio.clone(),
        send_options,
        offerer.stats.clone(),
        offerer.state.subscribe(),
    );

    let offer = pub_pc.create_offer(None).await.unwrap();
    assert!(offer.sdp.contains("a=sendonly"), "{}", offer.sdp);
    let offer_sdp = offer.sdp.clone();
    if std::env::var("DUMP_SDP").is_ok() {
        eprintln!("{offer_sdp}");
    }
    pub_pc.set_local_description(offer.clone()).await.unwrap();
    sub_pc.set_remote_description(offer).await.unwrap();
    let answer = sub_pc.create_answer(None).await.unwrap();
    sub_pc.set_local_description(answer.clone()).await.unwrap();
    pub_pc.set_remote_description(answer).await.unwrap();

    // Trickle both ways until both sides are connected.
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        let mut pub_state = offerer.state.subscribe();
        let mut sub_state = answerer.state.subscribe();
        loop {
            tokio::select! {
                Some(c) = offerer.candidates.recv() => {
                    assert!(c.candidate.contains("127.0.0.1"), "{}", c.candidate);
                    sub_pc.add_ice_candidate(c).await.unwrap();
                }
                Some(c) = answerer.candidates.recv() => pub_pc.add_ice_candidate(c).await.unwrap(),
                _ = pub_state.changed() => {}
                _ = sub_state.changed() => {}
            }
            if *offerer.state.borrow() == RTCPeerConnectionState::Connected
                && *answerer.state.borrow() == RTCPeerConnectionState::Connected
            {
                break;
            }
        }
    })
    .await;
    assert!(connected.is_ok(), "ICE/DTLS did not connect");

    // Media flows, keyed by msid, starting on a keyframe, gap-free, with probes.
    let video_key = ("pub-1".to_owned(), video.track.track_id().await);
    let audio_key = ("pub-1".to_owned(), audio.track.track_id().await);
    let flowing = wait_stats(&answerer.stats, Duration::from_secs(5), |s| {
        s.tracks.get(&video_key).is_some_and(|t| t.packets >= 60)
            && s.tracks.get(&audio_key).is_some_and(|t| t.packets >= 25)
    })
    .await;
    let stats = answerer.stats.snapshot();
    assert!(flowing, "media did not flow: {stats:#?}");
    let v = &stats.tracks[&video_key];
    assert_eq!(v.kind, Some(TrackKind::Video));
    assert_eq!(v.first_packet_keyframe, Some(true), "{v:#?}");
    assert_eq!(v.keyframes, 1, "{v:#?}");
    assert!(v.ssrcs.contains(&video.ssrc), "{v:#?}");
    assert!(v.seq_continuous(), "{v:#?}");
    assert_eq!(v.probe_lost(), 0, "{v:#?}");
    assert!(v.probe_unique >= 60);
    let latency = v.latency.quantile_ms(0.5).unwrap();
    assert!(latency < 50.0, "median one-way latency {latency} ms");
    let a = &stats.tracks[&audio_key];
    assert_eq!(a.kind, Some(TrackKind::Audio));
    assert_eq!(a.first_packet_keyframe, None);
    assert!(a.seq_continuous(), "{a:#?}");
    assert_eq!(a.probe_lost(), 0, "{a:#?}");
    assert!(a.bytes >= a.packets * 60);
    // The audio level extension rides on every audio packet, under its negotiated id.
    let level_id: u8 = offer_sdp
        .lines()
        .find_map(|l| {
            l.strip_prefix("a=extmap:")
                .filter(|rest| rest.ends_with("ssrc-audio-level"))
                .and_then(|rest| rest.split([' ', '/']).next())
                .and_then(|id| id.parse().ok())
        })
        .expect("audio level negotiated");
    assert_eq!(a.extension_ids, vec![level_id], "{a:#?}");

    // A PLI from the receiver makes the source send a keyframe at once.
    let remote_tracks = answerer.tracks.lock().unwrap().clone();
    let mut remote_video = None;
    for t in remote_tracks {
        if t.track_id().await == video_key.1 {
            remote_video = Some(t);
        }
    }
    let remote_video = remote_video.expect("remote video track");
    let media_ssrc = video.ssrc;
    let before = std::time::Instant::now();
    remote_video
        .write_rtcp(vec![Box::new(PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc,
        })])
        .await
        .unwrap();
    let got_keyframe = wait_stats(&answerer.stats, Duration::from_secs(2), |s| {
        s.tracks[&video_key].keyframes >= 2
    })
    .await;
    let took = before.elapsed();
    let sent = offerer.stats.snapshot().sent[&TrackKind::Video].clone();
    assert!(got_keyframe, "no keyframe after PLI; sender saw {sent:#?}");
    assert!(sent.keyframe_requests >= 1, "{sent:#?}");
    assert!(
        took < Duration::from_millis(300),
        "keyframe took {took:?} after the PLI"
    );
    let v = &answerer.stats.snapshot().tracks[&video_key];
    assert!(v.seq_continuous(), "{v:#?}");
    // The bitrate is roughly what was asked for.
    let elapsed = v
        .last_packet_at
        .unwrap()
        .duration_since(v.first_packet_at.unwrap())
        .as_secs_f64();
    let kbps = v.bytes as f64 * 8.0 / elapsed / 1000.0;
    eprintln!(
        "video: {} packets, {kbps:.0} kbit/s, {} keyframes (PLI→keyframe {took:?}), \
         latency p50 {:?} ms p99 {:?} ms; sender: {sent:?}",
        v.packets,
        v.keyframes,
        v.latency.quantile_ms(0.5),
        v.latency.quantile_ms(0.99),
    );
    assert!((600.0..1000.0).contains(&kbps), "{kbps} kbit/s");

    pub_pc.close().await.unwrap();
    sub_pc.close().await.unwrap();
}
