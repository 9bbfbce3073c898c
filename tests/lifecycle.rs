//! Participants whose media never connects, or whose connection is lost, are removed on
//! their own: the others are told, the socket closes with 4000, and the gauges return to 0.

mod common;

use client::{HeadlessPeer, PeerConfig, SignalClient};
use common::{start_server, wait_metric, ws_url, WAIT};
use signaling::protocol::{ClientMessage, ServerMessage};
use std::time::Duration;

/// A well-formed offer whose ICE agent does not exist: its candidate points at a closed port.
const UNREACHABLE_OFFER: &str = "v=0\r\n\
o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n\
s=-\r\n\
t=0 0\r\n\
a=group:BUNDLE 0\r\n\
a=msid-semantic: WMS\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
c=IN IP4 127.0.0.1\r\n\
a=rtcp:9 IN IP4 0.0.0.0\r\n\
a=candidate:1 1 udp 2122260223 127.0.0.1 9 typ host\r\n\
a=ice-ufrag:abcd\r\n\
a=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=fingerprint:sha-256 8A:5A:37:5B:0D:64:0B:5D:2A:2D:9B:20:0E:2D:47:84:36:44:35:6A:0F:3F:1B:7B:5A:95:12:9A:11:6D:60:80\r\n\
a=setup:actpass\r\n\
a=mid:0\r\n\
a=sendonly\r\n\
a=msid:stream track\r\n\
a=rtcp-mux\r\n\
a=rtpmap:111 opus/48000/2\r\n\
a=ssrc:1234 cname:x\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_that_never_connects_is_cleaned_up() {
    let server = start_server(&["--ice-connect-timeout-secs", "2"]).await;
    let url = ws_url(&server);
    let watcher = HeadlessPeer::join(PeerConfig::new(&url, "stuck", "watcher").watcher())
        .await
        .unwrap();
    let client = SignalClient::connect(&url).await.unwrap();
    client
        .send(&ClientMessage::Join {
            room: "stuck".into(),
            name: "unreachable".into(),
            token: None,
        })
        .await
        .unwrap();
    let id = loop {
        if let Some(ServerMessage::Joined { participant_id, .. }) =
            client.recv_timeout(WAIT).await.unwrap()
        {
            break participant_id;
        }
    };
    client
        .send(&ClientMessage::Offer {
            pc: signaling::protocol::PcName::Publisher,
            sdp: UNREACHABLE_OFFER.into(),
        })
        .await
        .unwrap();
    assert!(wait_metric(&server, "sfu_published_tracks", 1.0).await);
    // Removed after the connect timeout: the socket is closed with 4000, the others told.
    assert_eq!(client.wait_closed(WAIT).await, Some(Some(4000)));
    assert!(watcher.wait_for(WAIT, |s| s.left.contains(&id)).await);
    assert!(wait_metric(&server, "sfu_participants", 1.0).await);
    assert!(wait_metric(&server, "sfu_published_tracks", 0.0).await);
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_media_connection_is_cleaned_up_after_the_ice_timeout() {
    let server = start_server(&["--ice-lost-timeout-secs", "1"]).await;
    let url = ws_url(&server);
    let stays = HeadlessPeer::join(PeerConfig::new(&url, "lossy", "stays"))
        .await
        .unwrap();
    let drops = HeadlessPeer::join(PeerConfig::new(&url, "lossy", "drops"))
        .await
        .unwrap();
    assert!(drops.wait_publishing(WAIT).await);
    assert!(
        stays
            .wait_media_from(drops.participant_id(), 2, 10, WAIT)
            .await
    );
    let id = drops.participant_id().to_owned();
    // The media connections go away; the signaling socket stays open.
    drops.publisher_pc().unwrap().close().await.unwrap();
    drops.subscriber_pc().close().await.unwrap();
    assert!(
        stays
            .wait_for(Duration::from_secs(25), |s| s.left.contains(&id))
            .await,
        "the participant with lost media was never removed"
    );
    assert!(drops.wait_for(WAIT, |s| s.closed == Some(Some(4000))).await);
    assert!(wait_metric(&server, "sfu_participants", 1.0).await);
    assert!(wait_metric(&server, "sfu_published_tracks", 2.0).await);
    server.shutdown(Duration::from_secs(3)).await;
}
