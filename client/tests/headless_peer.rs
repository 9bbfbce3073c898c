//! `HeadlessPeer` against a tiny in-test signaling server that speaks `protocol.md` and
//! reflects the peer's own media back through a server-offered subscriber connection, so the
//! whole client path (join, publisher offer, subscriber offer/answer, trickle ICE both ways,
//! msid mapping, PLI → keyframe, chat, mute, leave) runs without the real SFU.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use client::rtc_setup::{
    build_peer_connection, candidate_from_wire, candidate_to_wire, negotiated_payload_type,
    new_local_track, PcOptions,
};
use client::{HeadlessPeer, PeerConfig, TrackKind};
use futures_util::{SinkExt, StreamExt};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use signaling::protocol::{ClientMessage, ErrorCode, PcName, ServerMessage, Track};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::media_stream::Track as _;
use webrtc::peer_connection::{
    PeerConnectionEventHandler, RTCPeerConnectionIceEvent, RTCPeerConnectionState,
    RTCSessionDescription,
};

const PID: &str = "p-1";

/// The server's handler for one of its connections.
struct ServerHandler {
    pc: PcName,
    out: mpsc::UnboundedSender<ServerMessage>,
    /// Server-side outgoing tracks, by kind, with their payload types once negotiated.
    reflect: Option<Arc<Reflect>>,
    state: Arc<watch::Sender<RTCPeerConnectionState>>,
}

/// Where received media is written back to the client.
struct Reflect {
    video: Arc<TrackLocalStaticRTP>,
    audio: Arc<TrackLocalStaticRTP>,
    video_pt: watch::Receiver<Option<u8>>,
    audio_pt: watch::Receiver<Option<u8>>,
    /// Lets the test send PLI to the publisher.
    video_in: watch::Sender<Option<Arc<dyn TrackRemote>>>,
}

#[async_trait]
impl PeerConnectionEventHandler for ServerHandler {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        if let Ok(init) = event.candidate.to_json() {
            let _ = self.out.send(ServerMessage::Candidate {
                pc: self.pc,
                candidate: Some(candidate_to_wire(init, Some("0".into()), None)),
            });
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.state.send_replace(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let Some(reflect) = self.reflect.clone() else {
            return;
        };
        tokio::spawn(async move {
            let kind = track.kind().await;
            let video = kind == rtc::rtp_transceiver::rtp_sender::RtpCodecKind::Video;
            if video {
                reflect.video_in.send_replace(Some(Arc::clone(&track)));
            }
            let (out, pt) = if video {
                (&reflect.video, &reflect.video_pt)
            } else {
                (&reflect.audio, &reflect.audio_pt)
            };
            let ssrc = out.ssrcs().await[0];
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(mut packet) = event {
                    let Some(pt) = *pt.borrow() else { continue };
                    packet.header.ssrc = ssrc;
                    packet.header.payload_type = pt;
                    // Before the subscriber connection is up this fails; that is fine.
                    let _ = out.write_rtp(packet).await;
                }
            }
        });
    }
}

/// Runs one client session of the mock server.
async fn serve(listener: TcpListener) {
    let (tcp, _) = listener.accept().await.unwrap();
    let ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
    let (mut sink, mut stream) = ws.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<ServerMessage>();
    tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let text = serde_json::to_string(&m).unwrap();
            if sink.send(Message::text(text)).await.is_err() {
                break;
            }
        }
    });

    let options = PcOptions::default();
    let video = new_local_track(TrackKind::Video, PID, "tv", 1111);
    let audio = new_local_track(TrackKind::Audio, PID, "ta", 2222);
    let (video_pt_tx, video_pt) = watch::channel(None);
    let (audio_pt_tx, audio_pt) = watch::channel(None);
    let (video_in, mut video_in_rx) = watch::channel(None);
    let reflect = Arc::new(Reflect {
        video: Arc::clone(&video),
        audio: Arc::clone(&audio),
        video_pt,
        audio_pt,
        video_in,
    });
    let pub_state = Arc::new(watch::Sender::new(RTCPeerConnectionState::New));
    let sub_state = Arc::new(watch::Sender::new(RTCPeerConnectionState::New));
    let publisher = build_peer_connection(
        &options,
        Arc::new(ServerHandler {
            pc: PcName::Publisher,
            out: out.clone(),
            reflect: Some(reflect),
            state: Arc::clone(&pub_state),
        }),
    )
    .await
    .unwrap();
    let subscriber = build_peer_connection(
        &options,
        Arc::new(ServerHandler {
            pc: PcName::Subscriber,
            out: out.clone(),
            reflect: None,
            state: Arc::clone(&sub_state),
        }),
    )
    .await
    .unwrap();
    let mut senders = vec![];
    for track in [&video, &audio] {
        let t = subscriber
            .add_transceiver_from_track(
                Arc::clone(track) as Arc<dyn TrackLocal>,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Sendonly,
                    streams: vec![PID.into()],
                    send_encodings: vec![],
                }),
            )
            .await
            .unwrap();
        senders.push(t.sender().await.unwrap().unwrap());
    }

    // Once the subscriber side is connected: learn payload types, then ask the publisher for a
    // keyframe the way an SFU does for a new subscriber.
    {
        let mut sub_state = sub_state.subscribe();
        let senders = senders.clone();
        tokio::spawn(async move {
            let _ = sub_state
                .wait_for(|s| *s == RTCPeerConnectionState::Connected)
                .await;
            video_pt_tx.send_replace(negotiated_payload_type(&senders[0], TrackKind::Video).await);
            audio_pt_tx.send_replace(negotiated_payload_type(&senders[1], TrackKind::Audio).await);
            let track = video_in_rx
                .wait_for(|t| t.is_some())
                .await
                .unwrap()
                .clone()
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let ssrc = track.ssrcs().await.first().copied().unwrap_or(0);
            let _ = track
                .write_rtcp(vec![Box::new(PictureLossIndication {
                    sender_ssrc: 0,
                    media_ssrc: ssrc,
                })])
                .await;
        });
    }

    let mut sub_described = false;
    let mut pending_sub = vec![];
    while let Some(Ok(frame)) = stream.next().await {
        let Message::Text(text) = frame else { continue };
        let message: ClientMessage = serde_json::from_str(text.as_str()).unwrap();
        match message {
            ClientMessage::Join { room, name, .. } => {
                assert_eq!(name, "alice");
                out.send(ServerMessage::Joined {
                    participant_id: PID.into(),
                    room,
                    participants: vec![],
                    ice_servers: vec![],
                })
                .unwrap();
            }
            ClientMessage::Offer { pc, sdp } => {
                assert_eq!(pc, PcName::Publisher);
                publisher
                    .set_remote_description(RTCSessionDescription::offer(sdp).unwrap())
                    .await
                    .unwrap();
                let answer = publisher.create_answer(None).await.unwrap();
                publisher
                    .set_local_description(answer.clone())
                    .await
                    .unwrap();
                out.send(ServerMessage::Answer {
                    pc: PcName::Publisher,
                    sdp: answer.sdp,
                })
                .unwrap();
                // Its own tracks, with mids (the client offered audio first, then video).
                for (track_id, kind, mid) in
                    [("ta", TrackKind::Audio, "0"), ("tv", TrackKind::Video, "1")]
                {
                    out.send(ServerMessage::TrackPublished {
                        participant_id: PID.into(),
                        track: Track {
                            track_id: track_id.into(),
                            kind,
                            muted: false,
                            simulcast: false,
                            mid: Some(mid.into()),
                        },
                    })
                    .unwrap();
                }
                let offer = subscriber.create_offer(None).await.unwrap();
                subscriber
                    .set_local_description(offer.clone())
                    .await
                    .unwrap();
                out.send(ServerMessage::Offer {
                    pc: PcName::Subscriber,
                    sdp: offer.sdp,
                })
                .unwrap();
            }
            ClientMessage::Answer { pc, sdp } => {
                assert_eq!(pc, PcName::Subscriber);
                subscriber
                    .set_remote_description(RTCSessionDescription::answer(sdp).unwrap())
                    .await
                    .unwrap();
                sub_described = true;
                for c in pending_sub.drain(..) {
                    subscriber.add_ice_candidate(c).await.unwrap();
                }
            }
            ClientMessage::Candidate { pc, candidate } => {
                let Some(c) = candidate else { continue };
                assert!(c.sdp_mid.as_deref().is_some_and(|m| !m.is_empty()), "{c:?}");
                let init = candidate_from_wire(&c);
                match pc {
                    // The client sends its offer before any publisher candidate.
                    PcName::Publisher => publisher.add_ice_candidate(init).await.unwrap(),
                    PcName::Subscriber if sub_described => {
                        subscriber.add_ice_candidate(init).await.unwrap()
                    }
                    PcName::Subscriber => pending_sub.push(init),
                }
            }
            ClientMessage::Chat { text } => out
                .send(ServerMessage::Chat {
                    participant_id: PID.into(),
                    name: "alice".into(),
                    text,
                    ts: 1,
                })
                .unwrap(),
            ClientMessage::Mute { track_id, muted } => {
                let known = track_id == "ta" || track_id == "tv";
                out.send(if known {
                    ServerMessage::TrackMuted {
                        participant_id: PID.into(),
                        track_id,
                        muted,
                    }
                } else {
                    ServerMessage::Error {
                        code: ErrorCode::BadRequest,
                        message: "unknown track".into(),
                    }
                })
                .unwrap()
            }
            ClientMessage::SetQuality { .. } => {}
            ClientMessage::Leave => break,
        }
    }
    let _ = publisher.close().await;
    let _ = subscriber.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_peer_joins_publishes_and_receives_through_signaling() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let server = tokio::spawn(serve(listener));

    let mut config = PeerConfig::new(url, "room-1", "alice").video_bitrate(300_000);
    // Only the first keyframe and requested ones.
    config.keyframe_interval = None;
    let peer = HeadlessPeer::join(config).await.unwrap();
    assert_eq!(peer.participant_id(), PID);

    assert!(
        peer.wait_publishing(Duration::from_secs(5)).await,
        "{:#?}",
        peer.state()
    );
    assert_eq!(peer.own_track_id(TrackKind::Video).as_deref(), Some("tv"));
    assert_eq!(
        peer.state()
            .own_track(TrackKind::Audio)
            .unwrap()
            .mid
            .as_deref(),
        Some("0")
    );

    // Our own media comes back on the subscriber connection, keyed by msid.
    assert!(
        peer.wait_media_from(PID, 2, 20, Duration::from_secs(5))
            .await,
        "{:#?}\n{:#?}",
        peer.state(),
        peer.stats()
    );
    let state = peer.state();
    assert_eq!(state.subscriber_offers, 1);
    assert_eq!(state.subscriber_answers, 1);
    assert_eq!(state.publisher_answers, 1);
    assert_eq!(state.subscriber_state, RTCPeerConnectionState::Connected);
    assert!(state.local_errors.is_empty(), "{:?}", state.local_errors);

    // The server's PLI reached the video source, whose keyframe came back through the reflection.
    let keyframe = peer
        .wait_for_stats(Duration::from_secs(3), |s| {
            s.track(PID, "tv").is_some_and(|t| t.keyframes >= 1)
                && s.sent
                    .get(&TrackKind::Video)
                    .is_some_and(|v| v.keyframe_requests >= 1)
        })
        .await;
    assert!(keyframe, "{:#?}", peer.stats());
    let stats = peer.stats();
    let v = stats.track(PID, "tv").unwrap();
    assert_eq!(v.kind, Some(TrackKind::Video));
    assert!(v.ssrcs.contains(&1111), "{v:#?}");
    assert!(v.probe_loss_ratio() < 0.01, "{v:#?}");
    let a = stats.track(PID, "ta").unwrap();
    assert_eq!(a.kind, Some(TrackKind::Audio));
    assert!(a.latency.count() > 0);
    assert_eq!(
        stats.sent[&TrackKind::Video].track_id.as_deref(),
        Some("tv")
    );

    // Chat and mute round trips; an error is kept, not fatal.
    peer.chat("hello").unwrap();
    assert!(peer.mute_kind(TrackKind::Audio, true).unwrap());
    peer.mute("nope", true).unwrap();
    let ok = peer
        .wait_for(Duration::from_secs(2), |s| {
            s.chats.iter().any(|c| c.text == "hello")
                && s.own_track(TrackKind::Audio).is_some_and(|t| t.muted)
                && s.has_error(ErrorCode::BadRequest)
        })
        .await;
    assert!(ok, "{:#?}", peer.state());
    assert!(peer
        .events()
        .iter()
        .any(|m| matches!(m, ServerMessage::TrackMuted { muted: true, .. })));

    peer.leave().await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .expect("the server saw leave")
        .unwrap();
}

#[tokio::test]
async fn join_reports_a_server_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let _join = ws.next().await;
        let error = ServerMessage::Error {
            code: ErrorCode::RoomFull,
            message: "full".into(),
        };
        ws.send(Message::text(serde_json::to_string(&error).unwrap()))
            .await
            .unwrap();
        let _ = ws.close(None).await;
    });
    let err = HeadlessPeer::join(PeerConfig::new(url, "r", "bob"))
        .await
        .err()
        .expect("join must fail");
    assert!(
        matches!(
            err,
            client::Error::Server {
                code: ErrorCode::RoomFull,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn signal_client_sees_raw_frames_and_close_codes() {
    use client::signal::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        // Echo one text frame, report a binary one, then close with 1009.
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Message::Text(t) => ws.send(Message::Text(t)).await.unwrap(),
                Message::Binary(_) => {
                    let e = ServerMessage::Error {
                        code: ErrorCode::BadRequest,
                        message: "binary".into(),
                    };
                    ws.send(Message::text(serde_json::to_string(&e).unwrap()))
                        .await
                        .unwrap();
                    ws.close(Some(CloseFrame {
                        code: CloseCode::Size,
                        reason: "too big".into(),
                    }))
                    .await
                    .unwrap();
                }
                _ => {}
            }
        }
    });
    let signal = client::SignalClient::connect(&url).await.unwrap();
    signal.send_raw("{not json").await.unwrap();
    assert_eq!(
        signal
            .recv_text_raw(Duration::from_secs(2))
            .await
            .as_deref(),
        Some("{not json")
    );
    signal.send_binary(&[1, 2, 3]).await.unwrap();
    let m = signal.recv_timeout(Duration::from_secs(2)).await.unwrap();
    assert!(matches!(
        m,
        Some(ServerMessage::Error {
            code: ErrorCode::BadRequest,
            ..
        })
    ));
    assert_eq!(
        signal.recv_frame_timeout(Duration::from_secs(2)).await,
        Some(Frame::Closed {
            code: Some(1009),
            reason: "too big".into()
        })
    );
    assert_eq!(signal.recv().await, None);
}
