//! Who may connect and join: HS256 join tokens (`--auth-secret`) and the WebSocket origin
//! check (`--allowed-origin`), against an in-process server on 127.0.0.1, as a client sees them.

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use signaling::auth::{self, Claims, Secret};
use signaling::config::ServerConfig;
use signaling::Server;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

const SECRET: &str = "a-secret-for-tests-only";
const WAIT: Duration = Duration::from_secs(5);

async fn start(extra: &[&str]) -> Server {
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

fn ws_url(server: &Server) -> String {
    format!("ws://{}/ws", server.addr)
}

fn token(room: &str, name: Option<&str>, ttl: Duration, can_publish: bool) -> String {
    let claims = Claims::new(room, name.map(str::to_owned), ttl, can_publish);
    auth::mint(&Secret::new(SECRET).unwrap(), &claims).unwrap()
}

async fn connect(server: &Server) -> Socket {
    tokio_tungstenite::connect_async(ws_url(server))
        .await
        .expect("websocket opens")
        .0
}

/// The next text frame as JSON, or `None` once the socket closed.
async fn next_json(socket: &mut Socket) -> Option<serde_json::Value> {
    loop {
        let frame = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("the server answers in time");
        match frame {
            Some(Ok(Message::Text(text))) => return Some(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

/// The close code, skipping any frames before it.
async fn close_code(socket: &mut Socket) -> Option<u16> {
    loop {
        let frame = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("the server closes in time");
        match frame {
            Some(Ok(Message::Close(Some(frame)))) => return Some(u16::from(frame.code)),
            Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => continue,
        }
    }
}

async fn send_join(socket: &mut Socket, room: &str, name: &str, token: Option<&str>) {
    let mut join = serde_json::json!({ "type": "join", "room": room, "name": name });
    if let Some(token) = token {
        join["token"] = token.into();
    }
    socket.send(Message::text(join.to_string())).await.unwrap();
}

/// Joins and expects `unauthorized` with a message containing `mentions`, then a close.
async fn assert_refused(
    server: &Server,
    room: &str,
    name: &str,
    token: Option<&str>,
    mentions: &str,
) {
    let mut socket = connect(server).await;
    send_join(&mut socket, room, name, token).await;
    let reply = next_json(&mut socket)
        .await
        .expect("an error before the close");
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    let message = reply["message"].as_str().unwrap();
    assert!(
        message.contains(mentions),
        "{message:?} should mention {mentions:?}"
    );
    assert_eq!(close_code(&mut socket).await, Some(1008));
}

/// One series as `/metrics` shows it.
fn metric(server: &Server, series: &str) -> f64 {
    let body = metrics_text(server);
    body.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or_else(|| panic!("series {series} not in /metrics"))
}

fn metrics_text(server: &Server) -> String {
    use prometheus::Encoder;
    let mut body = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&server.state().registry.gather(), &mut body)
        .unwrap();
    String::from_utf8(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_need_a_valid_token_for_their_room_and_name() {
    let server = start(&["--auth-secret", SECRET]).await;
    let hour = Duration::from_secs(3600);

    assert_refused(&server, "r", "ann", None, "requires a token").await;
    let forged = auth::mint(
        &Secret::new("someone-elses-secret").unwrap(),
        &Claims::new("r", None, hour, true),
    )
    .unwrap();
    assert_refused(&server, "r", "ann", Some(&forged), "signature").await;
    let mut expired = Claims::new("r", None, Duration::ZERO, true);
    expired.exp -= 120;
    let expired = auth::mint(&Secret::new(SECRET).unwrap(), &expired).unwrap();
    assert_refused(&server, "r", "ann", Some(&expired), "expired").await;
    assert_refused(
        &server,
        "other",
        "ann",
        Some(&token("r", None, hour, true)),
        "another room",
    )
    .await;
    assert_refused(
        &server,
        "r",
        "bob",
        Some(&token("r", Some("ann"), hour, true)),
        "another name",
    )
    .await;
    assert_refused(&server, "r", "ann", Some("garbage"), "not a valid JWT").await;
    // Refused joins leave nothing behind: no room was opened for them.
    assert_eq!(metric(&server, "sfu_rooms"), 0.0);
    assert_eq!(
        metric(&server, "sfu_signaling_errors_total{code=\"unauthorized\"}"),
        6.0
    );

    // A token for the room (and the name, when it names one) is let in.
    for (name, token) in [
        ("ann", token("r", Some("ann"), hour, true)),
        ("anyone", token("r", None, hour, true)),
    ] {
        let mut socket = connect(&server).await;
        send_join(&mut socket, "r", name, Some(&token)).await;
        let reply = next_json(&mut socket).await.unwrap();
        assert_eq!(reply["type"], "joined", "{reply}");
    }
    server.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_only_token_joins_but_its_offer_is_unauthorized_and_closes() {
    let server = start(&["--auth-secret", SECRET]).await;
    let hour = Duration::from_secs(3600);
    let offer = serde_json::json!({ "type": "offer", "pc": "publisher", "sdp": "not sdp" });

    // With publishing allowed, the same offer reaches the media plane (which finds it invalid).
    let mut publisher = connect(&server).await;
    send_join(
        &mut publisher,
        "watch",
        "pub",
        Some(&token("watch", None, hour, true)),
    )
    .await;
    assert_eq!(next_json(&mut publisher).await.unwrap()["type"], "joined");
    publisher
        .send(Message::text(offer.to_string()))
        .await
        .unwrap();
    let reply = next_json(&mut publisher).await.unwrap();
    assert_eq!(reply["code"], "invalid_sdp", "{reply}");

    let mut watcher = connect(&server).await;
    send_join(
        &mut watcher,
        "watch",
        "w",
        Some(&token("watch", None, hour, false)),
    )
    .await;
    let mut joined = false;
    while let Some(message) = next_json(&mut watcher).await {
        if message["type"] == "joined" {
            joined = true;
            break;
        }
    }
    assert!(joined, "a watch-only token may join");
    // Watching is fine: chat works.
    watcher
        .send(Message::text(r#"{"type":"chat","text":"just watching"}"#))
        .await
        .unwrap();
    loop {
        let message = next_json(&mut watcher).await.expect("chat echoed");
        if message["type"] == "chat" {
            break;
        }
    }
    watcher
        .send(Message::text(offer.to_string()))
        .await
        .unwrap();
    let reply = loop {
        let message = next_json(&mut watcher)
            .await
            .expect("an error before the close");
        if message["type"] == "error" {
            break message;
        }
    };
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("can_publish"),
        "{reply}"
    );
    assert_eq!(close_code(&mut watcher).await, Some(1008));
    server.shutdown(WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_tokens_are_ignored() {
    let server = start(&[]).await;
    let mut socket = connect(&server).await;
    send_join(&mut socket, "open", "x", Some("anything at all")).await;
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "joined");
    server.shutdown(WAIT).await;
}

/// The HTTP status of a WebSocket upgrade sent with `origin` (none: no header).
async fn upgrade_status(server: &Server, origin: Option<&str>) -> u16 {
    let mut request = ws_url(server).into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("Origin", HeaderValue::from_str(origin).unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("upgrade failed without a status: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_listed_origins_may_open_the_socket() {
    let server = start(&[
        "--allowed-origin",
        "https://meet.example.org",
        "--allowed-origin",
        "http://localhost:3000",
    ])
    .await;
    assert_eq!(
        upgrade_status(&server, Some("https://meet.example.org")).await,
        101
    );
    assert_eq!(
        upgrade_status(&server, Some("HTTP://LOCALHOST:3000")).await,
        101
    );
    assert_eq!(
        upgrade_status(&server, Some("https://evil.example")).await,
        403
    );
    assert_eq!(
        upgrade_status(&server, Some("https://meet.example.org.evil.example")).await,
        403
    );
    assert_eq!(upgrade_status(&server, Some("null")).await, 403);
    // Non-browser clients send no Origin and are let in.
    assert_eq!(upgrade_status(&server, None).await, 101);
    // The call page served by this server is its own origin and always works.
    let own = format!("http://{}", server.addr);
    assert_eq!(upgrade_status(&server, Some(&own)).await, 101);
    server.shutdown(WAIT).await;

    let open = start(&[]).await;
    assert_eq!(
        upgrade_status(&open, Some("https://evil.example")).await,
        101
    );
    open.shutdown(WAIT).await;
}
