//! Shared test helpers: an in-process server on 127.0.0.1, metric reading, waiting for a
//! condition, and the bare-signaling steps (connect, join, offers, errors, close) that several
//! test files take.

#![allow(dead_code)]

use clap::Parser;
use client::signal::Frame;
use client::{HeadlessPeer, PeerConfig, SignalClient};
use signaling::config::ServerConfig;
use signaling::protocol::{ClientMessage, ErrorCode, PcName, ServerMessage};
use signaling::Server;
use std::future::Future;
use std::time::Duration;

/// Generous for CI on 2 cores with debug builds; tests finish as soon as the condition holds.
pub const WAIT: Duration = Duration::from_secs(15);

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("TEST_LOG").unwrap_or_else(|_| "warn,webrtc=error,rtc=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Starts a server on a free port, media on 127.0.0.1, with extra flags.
pub async fn start_server(extra: &[&str]) -> Server {
    init_tracing();
    let mut args = vec![
        "sfu-server",
        "--listen",
        "127.0.0.1:0",
        "--ice-ip",
        "127.0.0.1",
    ];
    args.extend_from_slice(extra);
    Server::start(ServerConfig::parse_from(args))
        .await
        .expect("server starts")
}

pub fn ws_url(server: &Server) -> String {
    format!("ws://{}/ws", server.addr)
}

/// Reads one series from `/metrics` over HTTP, as an operator would.
pub async fn metric(server: &Server, series: &str) -> f64 {
    let body = http_get(server, "/metrics").await;
    body.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("series {series} not in /metrics"))
}

/// Checks `holds` every 50 ms until it is true (`true`) or `timeout` has passed (`false`).
pub async fn eventually<F, Fut>(timeout: Duration, mut holds: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if holds().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Waits until `series` reads `want`.
pub async fn wait_metric(server: &Server, series: &str, want: f64) -> bool {
    eventually(WAIT, || async { metric(server, series).await == want }).await
}

/// A bare HTTP/1.1 GET (no client library needed for three endpoints).
pub async fn http_get(server: &Server, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        server.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// How long a bare signaling client waits for one reply.
pub const REPLY: Duration = Duration::from_secs(5);

/// A headless peer that joined `room` and whose tracks the server has published.
pub async fn publishing_peer(url: &str, room: &str, name: &str) -> HeadlessPeer {
    let peer = HeadlessPeer::join(PeerConfig::new(url, room, name))
        .await
        .unwrap();
    assert!(peer.wait_publishing(WAIT).await, "{name} never published");
    peer
}

/// A bare signaling socket to `server`.
pub async fn connect(server: &Server) -> SignalClient {
    SignalClient::connect(&ws_url(server))
        .await
        .expect("websocket opens")
}

/// A bare signaling socket to `server` that has joined `room` as `name`.
pub async fn joined_client(server: &Server, room: &str, name: &str) -> SignalClient {
    let client = connect(server).await;
    raw_join(&client, room, name).await;
    client
}

/// Joins over a bare signaling socket; returns the participant id.
pub async fn raw_join(client: &SignalClient, room: &str, name: &str) -> String {
    client
        .send(&ClientMessage::Join {
            room: room.into(),
            name: name.into(),
            token: None,
        })
        .await
        .unwrap();
    let joined = client
        .recv_until(REPLY, |m| match m {
            ServerMessage::Joined { participant_id, .. } => Some(Ok(participant_id.clone())),
            ServerMessage::Error { code, message } => Some(Err(format!("{code:?}: {message}"))),
            _ => None,
        })
        .await;
    match joined {
        Ok(Some(Ok(id))) => id,
        other => panic!("join failed: {other:?}"),
    }
}

/// Sends `sdp` as an offer on the publisher connection.
pub async fn send_publisher_offer(client: &SignalClient, sdp: String) {
    client
        .send(&ClientMessage::Offer {
            pc: PcName::Publisher,
            sdp,
        })
        .await
        .unwrap();
}

/// The next `error` the server sends, skipping other messages.
pub async fn next_error(client: &SignalClient) -> (ErrorCode, String) {
    loop {
        match client.recv_timeout(REPLY).await {
            Ok(Some(ServerMessage::Error { code, message })) => return (code, message),
            Ok(Some(_)) => continue,
            other => panic!("expected an error message, got {other:?}"),
        }
    }
}

/// The socket still works: a chat comes back to its sender.
pub async fn assert_usable(client: &SignalClient, text: &str) {
    client
        .send(&ClientMessage::Chat { text: text.into() })
        .await
        .unwrap();
    let echoed = client
        .recv_until(REPLY, |m| {
            matches!(m, ServerMessage::Chat { text: got, .. } if got == text).then_some(())
        })
        .await;
    assert!(
        matches!(echoed, Ok(Some(()))),
        "socket no longer usable: {echoed:?}"
    );
}

/// The close code the server sends, skipping everything before it.
pub async fn close_code(client: &SignalClient) -> Option<u16> {
    loop {
        match client.recv_frame_timeout(REPLY).await {
            Some(Frame::Closed { code, .. }) => return code,
            Some(_) => continue,
            None => panic!("socket was not closed"),
        }
    }
}

/// The SDP of the next subscriber offer, if one comes within `timeout`.
pub async fn next_offer(client: &SignalClient, timeout: Duration) -> Option<String> {
    client
        .recv_until(timeout, |m| match m {
            ServerMessage::Offer {
                pc: PcName::Subscriber,
                sdp,
            } => Some(sdp.clone()),
            _ => None,
        })
        .await
        .ok()
        .flatten()
}
