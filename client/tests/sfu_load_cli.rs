//! The `sfu-load` binary as an operator runs it, against an in-process server on 127.0.0.1:
//! `--json` prints one parseable report on stdout and exits 0 on PASS; bad flags exit 2 with a
//! message; a server that is not there fails every join and exits 1.

use std::process::Command;
use std::time::Duration;

use clap::Parser;
use signaling::config::ServerConfig;
use signaling::Server;

async fn start_server() -> Server {
    Server::start(ServerConfig::parse_from([
        "sfu-server",
        "--listen",
        "127.0.0.1:0",
        "--ice-ip",
        "127.0.0.1",
    ]))
    .await
    .expect("server starts")
}

/// Runs the binary with `args` off the async runtime (the server must keep running).
async fn sfu_load(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_sfu-load"))
            .args(&args)
            .output()
            .expect("sfu-load runs")
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_report_on_stdout_and_exit_status_follow_the_verdict() {
    let server = start_server().await;
    let url = format!("ws://{}/ws", server.addr);
    let out = sfu_load(&[
        "--url",
        &url,
        "--publishers",
        "1",
        "--subscribers",
        "1",
        "--duration",
        "2s",
        "--video-bitrate",
        "300k",
        "--json",
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON report ({e}):\n{stdout}\n{stderr}"));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert_eq!(report["schema_version"], 1);
    assert_eq!(report["verdict"]["pass"], true);
    assert_eq!(report["joins"]["succeeded"], 2);
    assert_eq!(report["tracks"]["expected"], 1);
    assert_eq!(report["tracks"]["received"], 1);
    assert_eq!(report["config"]["video_bitrate_bps"], 300_000);
    assert_eq!(report["config"]["duration_s"], 2.0);
    assert!(report["server"]["samples"].as_u64().unwrap() >= 2);
    server.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn bad_flags_exit_2_and_an_absent_server_fails_every_join() {
    let out = sfu_load(&["--video-bitrate", "fast"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("try 500k or 1M"));
    let out = sfu_load(&["--media", "/nonexistent/clip.ivf"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/clip.ivf"));

    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("ws://127.0.0.1:{port}/ws");
    let json_out = std::env::temp_dir().join(format!("sfu-load-{port}.json"));
    let out = sfu_load(&[
        "--url",
        &url,
        "--publishers",
        "1",
        "--subscribers",
        "1",
        "--duration",
        "1s",
        "--json-out",
        json_out.to_str().unwrap(),
    ])
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("joins       0/2 succeeded, 2 failed"),
        "{stdout}"
    );
    assert!(stdout.contains("FAIL: 2 of 2 joins failed"), "{stdout}");
    // The text went to stdout and the same report, as JSON, to the file.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&json_out);
    assert_eq!(saved["joins"]["failed"], 2);
    assert_eq!(saved["verdict"]["pass"], false);
}
