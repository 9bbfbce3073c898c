//! A peer with an RSA DTLS certificate (as GStreamer's webrtcbin has) holds a call through
//! the server in both DTLS roles: as a publisher it offers and the server is the DTLS server;
//! as a subscriber it answers `setup:passive`, so the server is the DTLS client and must
//! accept an RSA server certificate.

mod common;

use client::media::{VideoConfig, VideoSource};
use client::rtc_setup::{media_engine_and_registry, negotiated_payload_type, new_local_track};
use client::{HeadlessPeer, PeerConfig, SignalClient, TrackKind};
use common::{
    eventually, next_offer, publishing_peer, raw_join, send_publisher_offer, start_server, ws_url,
    WAIT,
};
use rtc::crypto::SignatureScheme;
use rtc::peer_connection::certificate::RTCCertificate;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::RTCDtlsRole;
use signaling::protocol::{ClientMessage, PcName, ServerMessage};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::watch;
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCIceGatheringState,
    RTCPeerConnectionState,
};

fn rsa_certificate() -> RTCCertificate {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/testdata");
    let cert = std::fs::read(format!("{dir}/rsa-peer.cert.der")).unwrap();
    let key = std::fs::read(format!("{dir}/rsa-peer.key.der")).unwrap();
    let provider = rtc::crypto::default_provider().unwrap();
    RTCCertificate::from_pkcs8(
        provider.crypto(),
        SignatureScheme::RsaPkcs1Sha256,
        vec![cert.into()],
        &key,
        SystemTime::now() + Duration::from_secs(3600),
    )
    .expect("RSA certificate loads")
}

/// Counts what arrives and reports connection state and gathering.
struct Events {
    connected: watch::Sender<bool>,
    gathered: watch::Sender<bool>,
    received: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Events {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self
            .connected
            .send(state == RTCPeerConnectionState::Connected);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let received = Arc::clone(&self.received);
        tokio::spawn(async move {
            while let Some(event) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(_) = event {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

struct RsaPeer {
    pc: Arc<dyn PeerConnection>,
    connected: watch::Receiver<bool>,
    gathered: watch::Receiver<bool>,
    received: Arc<AtomicU64>,
}

async fn rsa_peer(answering_role: RTCDtlsRole) -> RsaPeer {
    let (media_engine, registry) = media_engine_and_registry().unwrap();
    let (connected_tx, connected) = watch::channel(false);
    let (gathered_tx, gathered) = watch::channel(false);
    let received = Arc::new(AtomicU64::new(0));
    let pc = PeerConnectionBuilder::new()
        .with_configuration(
            RTCConfigurationBuilder::new()
                .with_certificates(vec![rsa_certificate()])
                .build(),
        )
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .with_setting_engine(
            SettingEngineBuilder::new()
                .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
                .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
                .with_answering_dtls_role(answering_role)
                .build(),
        )
        .with_handler(Arc::new(Events {
            connected: connected_tx,
            gathered: gathered_tx,
            received: Arc::clone(&received),
        }))
        .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
        .build()
        .await
        .unwrap();
    RsaPeer {
        pc: Arc::new(pc),
        connected,
        gathered,
        received,
    }
}

async fn local_sdp(peer: &mut RsaPeer) -> String {
    let _ = tokio::time::timeout(WAIT, peer.gathered.wait_for(|g| *g)).await;
    peer.pc.local_description().await.unwrap().sdp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_publisher_reaches_a_subscriber() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let watcher = HeadlessPeer::join(PeerConfig::new(&url, "rsa", "watcher").watcher())
        .await
        .unwrap();

    let client = SignalClient::connect(&url).await.unwrap();
    let id = raw_join(&client, "rsa", "gst-like").await;
    let mut peer = rsa_peer(RTCDtlsRole::Server).await;
    let ssrc = 0x5a5a_0001;
    let track = new_local_track(TrackKind::Video, &id, "cam", ssrc);
    let sender = peer
        .pc
        .add_track(Arc::clone(&track) as Arc<dyn TrackLocal>)
        .await
        .unwrap();
    let offer = peer.pc.create_offer(None).await.unwrap();
    peer.pc.set_local_description(offer).await.unwrap();
    let sdp = local_sdp(&mut peer).await;
    send_publisher_offer(&client, sdp).await;
    let answer = loop {
        match client.recv_timeout(WAIT).await.unwrap() {
            Some(ServerMessage::Answer { sdp, .. }) => break sdp,
            Some(ServerMessage::Error { code, message }) => panic!("{code:?}: {message}"),
            Some(_) => continue,
            None => panic!("closed"),
        }
    };
    peer.pc
        .set_remote_description(RTCSessionDescription::answer(answer).unwrap())
        .await
        .unwrap();
    tokio::time::timeout(WAIT, peer.connected.wait_for(|c| *c))
        .await
        .expect("DTLS with an RSA client certificate completes")
        .unwrap();

    let payload_type = negotiated_payload_type(&sender, TrackKind::Video)
        .await
        .unwrap();
    let mut source = VideoSource::new(VideoConfig::default(), ssrc, payload_type);
    let sending = tokio::spawn(async move {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(8) {
            for packet in source
                .next_frame(Instant::now(), client::unix_micros())
                .packets
            {
                let _ = track.write_rtp(packet).await;
            }
            tokio::time::sleep(Duration::from_millis(33)).await;
        }
    });
    assert!(
        watcher.wait_media_from(&id, 1, 30, WAIT).await,
        "video from the RSA peer never reached the subscriber"
    );
    sending.abort();
    let _ = peer.pc.close().await;
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_subscriber_as_dtls_server_receives_media() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let _publisher = publishing_peer(&url, "rsa-sub", "publisher").await;

    let client = SignalClient::connect(&url).await.unwrap();
    raw_join(&client, "rsa-sub", "gst-like").await;
    // Answering as DTLS server (`setup:passive`) makes the SFU the DTLS client.
    let mut peer = rsa_peer(RTCDtlsRole::Server).await;
    let offer = next_offer(&client, WAIT).await.expect("a subscriber offer");
    peer.pc
        .set_remote_description(RTCSessionDescription::offer(offer).unwrap())
        .await
        .unwrap();
    let answer = peer.pc.create_answer(None).await.unwrap();
    peer.pc.set_local_description(answer).await.unwrap();
    let sdp = local_sdp(&mut peer).await;
    assert!(
        sdp.contains("a=setup:passive"),
        "the RSA peer is the DTLS server"
    );
    client
        .send(&ClientMessage::Answer {
            pc: PcName::Subscriber,
            sdp,
        })
        .await
        .unwrap();
    tokio::time::timeout(WAIT, peer.connected.wait_for(|c| *c))
        .await
        .expect("DTLS with an RSA server certificate completes")
        .unwrap();
    eventually(WAIT, || {
        std::future::ready(peer.received.load(Ordering::Relaxed) >= 50)
    })
    .await;
    assert!(
        peer.received.load(Ordering::Relaxed) >= 50,
        "the RSA subscriber received {} packets",
        peer.received.load(Ordering::Relaxed)
    );
    let _ = peer.pc.close().await;
    server.shutdown(Duration::from_secs(3)).await;
}
