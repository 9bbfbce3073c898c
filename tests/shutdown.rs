//! Graceful shutdown under load, with the real `sfu-server` binary: SIGTERM during a 20-peer
//! call with media flowing ends the process cleanly within 5 s, and every client is told with
//! a close frame 1001 (going away) before its socket goes.

use client::{HeadlessPeer, PeerConfig};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Everyone receives everything; the first `PUBLISHERS` also publish audio and 150 kbit/s
/// video: 8 × 19 × 2 forwarded tracks, about 12 000 packets a second, which a debug build on
/// two cores shared with the 20 clients keeps up with.
const PEERS: usize = 20;
const PUBLISHERS: usize = 8;
const WAIT: Duration = Duration::from_secs(30);

/// The binary `cargo test --workspace` builds next to this test's executable.
fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/shutdown-<hash> -> target/<profile>/sfu-server
    let binary = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join(format!("sfu-server{}", std::env::consts::EXE_SUFFIX)))
        .expect("the target directory");
    assert!(
        binary.exists(),
        "{} is missing: build it first with `cargo build -p signaling --bin sfu-server` \
         (`cargo test --workspace` builds it)",
        binary.display()
    );
    binary
}

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

fn spawn_server() -> RunningServer {
    let mut child = Command::new(server_binary())
        .args(["--listen", "127.0.0.1:0", "--ice-ip", "127.0.0.1"])
        .env("SFU_LOG", "warn")
        .env_remove("SFU_AUTH_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("sfu-server starts");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = lines.next().expect("a line on stdout").expect("readable");
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_owned();
    // Keep reading the server's log (it writes to stdout) so that it never hits a closed pipe;
    // it shows in the test's output when the test fails.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("sfu-server: {line}");
        }
    });
    RunningServer { child, url }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_20_peer_call_tells_everyone_and_exits_within_5_s() {
    let mut server = spawn_server();
    let ws_url = format!("{}/ws", server.url.replace("http://", "ws://"));

    let mut peers = Vec::new();
    for i in 0..PEERS {
        let config =
            PeerConfig::new(&ws_url, "all-hands", format!("peer{i}")).video_bitrate(150_000);
        let config = if i < PUBLISHERS {
            config
        } else {
            config.watcher()
        };
        peers.push(HeadlessPeer::join(config).await.expect("joins"));
    }
    let publishers: Vec<String> = peers[..PUBLISHERS]
        .iter()
        .map(|p| p.participant_id().to_owned())
        .collect();
    // The call is up: every peer receives audio and video from every other publisher.
    for peer in &peers {
        for publisher in publishers.iter().filter(|p| *p != peer.participant_id()) {
            assert!(
                peer.wait_media_from(publisher, 2, 5, WAIT).await,
                "{} gets no media from {publisher}",
                peer.participant_id()
            );
        }
    }

    let signalled = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    // Every client is told the server is going away.
    for peer in &peers {
        let left = Duration::from_secs(5).saturating_sub(signalled.elapsed());
        assert!(
            peer.wait_for(left, |s| s.closed.is_some()).await,
            "{} was not told within 5 s",
            peer.participant_id()
        );
        assert_eq!(
            peer.state().closed,
            Some(Some(1001)),
            "{} got the wrong close",
            peer.participant_id()
        );
    }
    // And the process is gone, cleanly, within 5 s of the signal.
    let exit = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "still running 5 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = signalled.elapsed();
    assert!(exit.success(), "exit status {exit}");
    println!(
        "shutdown: {PEERS} peers ({PUBLISHERS} publishing) told, process exited {took:?} after \
         SIGTERM"
    );
    for peer in peers {
        peer.disconnect().await;
    }
}
