//! Every error code of the contract that can be provoked, provoked over a real socket: the
//! right code, a message that says what to do, the socket closed exactly when the contract
//! says, and nothing left behind.

mod common;

use client::{HeadlessPeer, PeerConfig, SignalClient};
use common::{
    assert_usable, close_code, connect, joined_client, metric, next_error, next_offer,
    publishing_peer, raw_join as join, start_server, wait_metric, ws_url, WAIT,
};
use signaling::protocol::{ClientMessage, ErrorCode, ServerMessage};
use std::time::Duration;

async fn expect_error(client: &SignalClient, frame: &str, want: ErrorCode) {
    client.send_raw(frame).await.unwrap();
    let (code, message) = next_error(client).await;
    assert_eq!(code, want, "for {frame:?}: {message}");
    assert!(
        message.len() > 10,
        "the message explains what to fix: {message:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_out_of_order_messages_get_their_codes_in_contract_order() {
    let server = start_server(&[]).await;
    let client = connect(&server).await;

    let before_join = [
        ("{not json", ErrorCode::BadJson),
        ("[1, 2, 3]", ErrorCode::BadRequest),
        (r#"{"room":"x"}"#, ErrorCode::BadRequest),
        (r#"{"type":"teleport"}"#, ErrorCode::UnknownType),
        // Before joining, anything but join is not_joined — even with bad fields.
        (r#"{"type":"chat","text":"hi"}"#, ErrorCode::NotJoined),
        (r#"{"type":"chat"}"#, ErrorCode::NotJoined),
        (
            r#"{"type":"join","room":"no spaces","name":"x"}"#,
            ErrorCode::BadRequest,
        ),
        (r#"{"type":"join","room":"r"}"#, ErrorCode::BadRequest),
    ];
    for (frame, code) in before_join {
        expect_error(&client, frame, code).await;
    }
    client.send_binary(b"\x00\x01binary").await.unwrap();
    assert_eq!(next_error(&client).await.0, ErrorCode::BadRequest);

    join(&client, "errors", "eve").await;
    let after_join = [
        (
            r#"{"type":"join","room":"errors","name":"eve"}"#,
            ErrorCode::AlreadyJoined,
        ),
        (r#"{"type":"chat","text":""}"#, ErrorCode::BadRequest),
        (
            r#"{"type":"mute","track_id":"nope","muted":true}"#,
            ErrorCode::BadRequest,
        ),
        (
            r#"{"type":"offer","pc":"subscriber","sdp":"v=0"}"#,
            ErrorCode::BadRequest,
        ),
        (
            r#"{"type":"offer","pc":"publisher","sdp":"this is not sdp"}"#,
            ErrorCode::InvalidSdp,
        ),
        (
            r#"{"type":"answer","pc":"subscriber","sdp":"v=0"}"#,
            ErrorCode::BadRequest,
        ),
        (
            r#"{"type":"candidate","pc":"publisher"}"#,
            ErrorCode::BadRequest,
        ),
    ];
    for (frame, code) in after_join {
        expect_error(&client, frame, code).await;
    }
    // A candidate before any offer is buffered or dropped, never an error.
    client
        .send_raw(r#"{"type":"candidate","pc":"publisher","candidate":{"candidate":"candidate:1 1 udp 2122260223 127.0.0.1 40000 typ host","sdpMid":"0","sdpMLineIndex":0}}"#)
        .await
        .unwrap();
    client
        .send_raw(r#"{"type":"candidate","pc":"subscriber","candidate":null}"#)
        .await
        .unwrap();
    // None of that closed the socket or disturbed it.
    assert_usable(&client, "still here").await;
    assert!(metric(&server, "sfu_signaling_errors_total{code=\"bad_json\"}").await >= 1.0);
    assert!(metric(&server, "sfu_signaling_errors_total{code=\"invalid_sdp\"}").await >= 1.0);

    client.close().await;
    assert!(wait_metric(&server, "sfu_participants", 0.0).await);
    assert!(wait_metric(&server, "sfu_rooms", 0.0).await);
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_too_large_and_closes() {
    let server = start_server(&[]).await;
    let client = connect(&server).await;
    let huge = format!(r#"{{"type":"chat","text":"{}"}}"#, "x".repeat(300 * 1024));
    client.send_raw(&huge).await.unwrap();
    assert_eq!(next_error(&client).await.0, ErrorCode::TooLarge);
    assert_eq!(close_code(&client).await, Some(1009));
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_beyond_the_limit_are_rate_limited_and_the_socket_survives() {
    let server = start_server(&[]).await;
    let client = joined_client(&server, "burst", "flood").await;
    for i in 0..150 {
        client
            .send(&ClientMessage::Chat {
                text: format!("spam {i}"),
            })
            .await
            .unwrap();
    }
    let mut limited = 0;
    let mut chats = 0;
    while let Ok(Some(message)) = client.recv_timeout(Duration::from_millis(500)).await {
        match message {
            ServerMessage::Error {
                code: ErrorCode::RateLimited,
                ..
            } => limited += 1,
            ServerMessage::Chat { .. } => chats += 1,
            _ => {}
        }
    }
    assert!(
        limited >= 40,
        "about 50 of 150 are over the burst (got {limited})"
    );
    assert!(
        chats >= 99,
        "the burst of 100 (join included) passes (got {chats})"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_usable(&client, "after the storm").await;
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_room_is_refused_and_closed() {
    let server = start_server(&["--max-participants-per-room", "1"]).await;
    let _first = joined_client(&server, "tiny", "one").await;
    let second = connect(&server).await;
    expect_error(
        &second,
        r#"{"type":"join","room":"tiny","name":"two"}"#,
        ErrorCode::RoomFull,
    )
    .await;
    assert_eq!(close_code(&second).await, Some(1008));
    // Another room is fine.
    let _third = joined_client(&server, "other", "three").await;
    assert_eq!(metric(&server, "sfu_participants").await, 2.0);
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_subscriber_answer_is_invalid_sdp_then_a_fresh_offer_follows() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let publisher = publishing_peer(&url, "answers", "pub").await;
    let client = joined_client(&server, "answers", "raw").await;
    let first_offer = next_offer(&client, WAIT).await.expect("a subscriber offer");
    assert!(
        first_offer.contains("a=msid:"),
        "forwarded tracks carry msid"
    );
    assert!(first_offer.contains(&format!("msid:{} ", publisher.participant_id())));
    expect_error(
        &client,
        r#"{"type":"answer","pc":"subscriber","sdp":"garbage"}"#,
        ErrorCode::InvalidSdp,
    )
    .await;
    let fresh = next_offer(&client, WAIT)
        .await
        .expect("a fresh subscriber offer");
    assert!(fresh.contains("a=msid:"));
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_setup_failure_is_internal_and_leaves_nothing_behind() {
    // One media port for two media threads: each room goes to its own thread, and the second
    // thread finds no port to bind.
    let server = start_server(&["--udp-ports", "47811-47811", "--media-threads", "2"]).await;
    let url = ws_url(&server);
    let first = HeadlessPeer::join(PeerConfig::new(&url, "ports-a", "first"))
        .await
        .unwrap();
    assert!(
        first.wait_for(WAIT, |s| s.publisher_answers > 0).await,
        "the first room's media is set up"
    );
    let second = HeadlessPeer::join(PeerConfig::new(&url, "ports-b", "second"))
        .await
        .unwrap();
    assert!(
        second
            .wait_for(WAIT, |s| s.has_error(ErrorCode::Internal))
            .await,
        "the room on the thread without a port gets an internal error"
    );
    assert!(!first.state().has_error(ErrorCode::Internal));
    first.disconnect().await;
    second.disconnect().await;
    assert!(wait_metric(&server, "sfu_participants", 0.0).await);
    assert!(wait_metric(&server, "sfu_published_tracks", 0.0).await);
    assert!(wait_metric(&server, "sfu_rooms", 0.0).await);
    server.shutdown(Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_handshake_leaves_nothing_behind() {
    let server = start_server(&[]).await;
    let url = ws_url(&server);
    let watcher = HeadlessPeer::join(PeerConfig::new(&url, "vanish", "stays").watcher())
        .await
        .unwrap();
    // Joins and offers, then drops the socket before media could flow.
    let ghost = HeadlessPeer::join(PeerConfig::new(&url, "vanish", "ghost"))
        .await
        .unwrap();
    let ghost_id = ghost.participant_id().to_owned();
    ghost.disconnect().await;
    assert!(watcher.wait_for(WAIT, |s| s.left.contains(&ghost_id)).await);
    assert!(wait_metric(&server, "sfu_participants", 1.0).await);
    assert!(wait_metric(&server, "sfu_published_tracks", 0.0).await);
    watcher.leave().await.unwrap();
    assert!(wait_metric(&server, "sfu_rooms", 0.0).await);
    server.shutdown(Duration::from_secs(3)).await;
}
