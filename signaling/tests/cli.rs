//! The `sfu-server` binary as an operator runs it: the printed URL, `--listen 127.0.0.1:0`,
//! environment variables for flags, `/health`, and a graceful SIGTERM that tells clients.

use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

struct RunningServer {
    child: Child,
    url: String,
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary and waits for the line with its URL.
fn spawn(args: &[&str], env: &[(&str, &str)]) -> RunningServer {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sfu-server"))
        .args(args)
        .envs(env.iter().copied())
        .env("SFU_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sfu-server starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = lines
        .next()
        .expect("a line on stdout")
        .expect("readable stdout");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    RunningServer { child, url }
}

async fn http_get(url: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn prints_its_url_serves_health_and_shuts_down_on_sigterm_telling_clients() {
    let mut server = spawn(&["--listen", "127.0.0.1:0", "--ice-ip", "127.0.0.1"], &[]);
    assert!(server.url.starts_with("http://127.0.0.1:"));
    assert!(!server.url.ends_with(":0"), "the real port is printed");
    let health = http_get(&server.url, "/health").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("ok"));
    let page = http_get(&server.url, "/").await;
    assert!(page.contains("text/html") && page.contains("<html"));

    let ws_url = format!("{}/ws", server.url.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    ws.send(Message::text(
        r#"{"type":"join","room":"shutdown","name":"last"}"#,
    ))
    .await
    .unwrap();
    let joined = ws.next().await.unwrap().unwrap();
    assert!(joined.to_text().unwrap().contains(r#""type":"joined""#));

    let started = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // The client is told: a close frame saying the server is going away.
    let close_code = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(frame) = ws.next().await {
            if let Ok(Message::Close(Some(frame))) = frame {
                return Some(u16::from(frame.code));
            }
        }
        None
    })
    .await
    .expect("told within 5 s");
    assert_eq!(close_code, Some(1001));
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "clean exit, got {status}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "exits within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn every_flag_has_an_environment_variable() {
    let server = spawn(
        &[],
        &[
            ("SFU_LISTEN", "127.0.0.1:0"),
            ("SFU_ICE_IPS", "127.0.0.1"),
            ("SFU_MAX_FRAME_BYTES", "1000"),
        ],
    );
    assert!(server.url.starts_with("http://127.0.0.1:"));
    let ws_url = format!("{}/ws", server.url.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    ws.send(Message::text(format!(
        r#"{{"type":"chat","text":"{}"}}"#,
        "x".repeat(2000)
    )))
    .await
    .unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert!(
        reply.to_text().unwrap().contains("too_large"),
        "SFU_MAX_FRAME_BYTES applies: {reply:?}"
    );
    let help = Command::new(env!("CARGO_BIN_EXE_sfu-server"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--ice-ip",
        "--udp-ports",
        "--ice-server",
        "--max-frame-bytes",
        "--ice-lost-timeout-secs",
    ] {
        assert!(help.contains(flag), "--help lists {flag}");
    }
    assert!(
        help.matches("[env: SFU_").count() >= 10,
        "every flag names its environment variable"
    );
}

/// Runs `sfu-server` with `args` to completion.
fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sfu-server"))
        .args(args)
        .env_remove("SFU_AUTH_SECRET")
        .envs(env.iter().copied())
        .output()
        .expect("sfu-server runs")
}

#[tokio::test]
async fn token_subcommand_mints_what_the_server_with_the_same_secret_accepts() {
    let secret = ("SFU_AUTH_SECRET", "cli-test-secret");
    let minted = run(
        &["token", "--room", "cli", "--name", "ann", "--ttl", "1h"],
        &[secret],
    );
    assert!(minted.status.success(), "{minted:?}");
    let token = String::from_utf8(minted.stdout).unwrap().trim().to_owned();
    assert_eq!(token.split('.').count(), 3, "a JWT: {token:?}");
    let watch_only = run(
        &[
            "token",
            "--room",
            "cli",
            "--no-publish",
            "--auth-secret",
            "cli-test-secret",
        ],
        &[],
    );
    assert!(watch_only.status.success(), "{watch_only:?}");
    let watch_only = String::from_utf8(watch_only.stdout)
        .unwrap()
        .trim()
        .to_owned();

    let missing = run(&["token", "--room", "cli"], &[]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("SFU_AUTH_SECRET"),
        "says where the secret comes from: {stderr}"
    );
    let bad_room = run(&["token", "--room", "no spaces"], &[secret]);
    assert!(!bad_room.status.success());

    let server = spawn(
        &["--listen", "127.0.0.1:0", "--ice-ip", "127.0.0.1"],
        &[secret],
    );
    let ws_url = format!("{}/ws", server.url.replace("http://", "ws://"));
    let join = |token: &str, name: &str| {
        serde_json::json!({"type": "join", "room": "cli", "name": name, "token": token}).to_string()
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    ws.send(Message::text(join(&token, "ann"))).await.unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert!(
        reply.to_text().unwrap().contains(r#""type":"joined""#),
        "{reply:?}"
    );

    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.unwrap();
    ws.send(Message::text(join(&watch_only, "viewer")))
        .await
        .unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert!(
        reply.to_text().unwrap().contains(r#""type":"joined""#),
        "{reply:?}"
    );
    ws.send(Message::text(
        r#"{"type":"offer","pc":"publisher","sdp":"v=0"}"#,
    ))
    .await
    .unwrap();
    let refused = loop {
        let frame = ws.next().await.unwrap().unwrap();
        let text = frame.to_text().unwrap().to_owned();
        if text.contains(r#""type":"error""#) {
            break text;
        }
    };
    assert!(refused.contains("unauthorized"), "{refused}");

    // The same token against a server without the secret's twin is refused.
    let other = spawn(
        &["--listen", "127.0.0.1:0", "--ice-ip", "127.0.0.1"],
        &[("SFU_AUTH_SECRET", "a-different-secret")],
    );
    let other_ws = format!("{}/ws", other.url.replace("http://", "ws://"));
    let (mut ws, _) = tokio_tungstenite::connect_async(&other_ws).await.unwrap();
    ws.send(Message::text(join(&token, "ann"))).await.unwrap();
    let reply = ws.next().await.unwrap().unwrap();
    assert!(
        reply.to_text().unwrap().contains("unauthorized"),
        "{reply:?}"
    );
}

#[test]
fn help_lists_the_limits_auth_and_origin_flags() {
    let help = run(&["--help"], &[]);
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--max-rooms",
        "--max-connections",
        "--max-participants-per-room",
        "--max-tracks-per-participant",
        "--auth-secret",
        "--allowed-origin",
        "SFU_ALLOWED_ORIGINS",
        "token",
    ] {
        assert!(help.contains(flag), "--help lists {flag}");
    }
    // The secret's value never shows, even when it is set in the environment.
    let help = run(&["--help"], &[("SFU_AUTH_SECRET", "do-not-print-me")]);
    assert!(!String::from_utf8_lossy(&help.stdout).contains("do-not-print-me"));
}
