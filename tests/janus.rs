//! `sfu-load --target janus` end to end: Janus 1.1 (Debian's `janus`) started with our config
//! (benches/janus/) in the private network namespace of benches/janus/netns.sh, and the load
//! tester's library entry point run inside that namespace with 1 publisher → 2 subscribers: every
//! subscriber must receive both tracks with almost no loss, and Janus's CPU and memory must be
//! read from /proc. A machine without Janus fails here with the install command, unless
//! SFU_SKIP_JANUS_TESTS=1 says to skip knowingly. Needs root (`ip netns`).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use client::load::{run_load, LoadConfig, LoadReport, Role, Target};

const SKIP_VARIABLE: &str = "SFU_SKIP_JANUS_TESTS";

/// Janus's WebSocket port in our config (free: the namespace is ours alone).
const JANUS_PORT: u16 = 8188;

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// The `janus` binary, `None` when skipping knowingly; panics with the install command when
/// Janus is missing.
fn janus_or_skip() -> Option<PathBuf> {
    if std::env::var(SKIP_VARIABLE).is_ok_and(|v| v == "1") {
        eprintln!("{SKIP_VARIABLE}=1: skipped the Janus test (--target janus was NOT tested)");
        return None;
    }
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|dir| dir.join("janus"))
        .find(|path| path.is_file());
    if found.is_none() {
        panic!(
            "Janus is not installed, so `sfu-load --target janus` cannot be tested. Install it \
             with `apt-get update && apt-get install -y janus` (Debian), or set \
             {SKIP_VARIABLE}=1 to skip this test knowingly."
        );
    }
    found
}

/// A network namespace from benches/janus/netns.sh, removed on drop.
struct Namespace(String);

impl Namespace {
    fn up(name: String) -> Namespace {
        let script = repo_path("benches/janus/netns.sh");
        let status = Command::new("bash")
            .arg(&script)
            .args(["up", &name])
            .status()
            .expect("bash runs");
        assert!(
            status.success(),
            "{} up {name} failed: the Janus test needs root for `ip netns` (iproute2)",
            script.display()
        );
        Namespace(name)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo_path("benches/janus/netns.sh"))
            .args(["down", &self.0])
            .status();
    }
}

/// The Janus process, stopped on drop.
struct Janus {
    child: Child,
    log: PathBuf,
}

impl Janus {
    /// Starts `janus` with our config inside `namespace`. `ip netns exec` execs Janus, so the
    /// child's pid is Janus's own.
    fn start(binary: &Path, namespace: &Namespace) -> Janus {
        let log = std::env::temp_dir().join(format!("{}.janus.log", namespace.0));
        let log_file = std::fs::File::create(&log).expect("a log file in the temp dir");
        let child = Command::new("ip")
            .args(["netns", "exec", &namespace.0])
            .arg(binary)
            .arg("-F")
            .arg(repo_path("benches/janus"))
            .arg("-o")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("a second handle"))
            .stderr(log_file)
            .spawn()
            .expect("ip netns exec janus starts");
        Janus { child, log }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Janus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Runs `f` on a thread that has entered network namespace `name`; threads it starts (a tokio
/// runtime's workers) are in the namespace too.
fn in_namespace<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns with a valid namespace fd only changes this thread's namespace.
        let entered = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            entered,
            0,
            "setns({path}): {}",
            std::io::Error::last_os_error()
        );
        f()
    })
    .join()
    .expect("the namespace thread")
}

async fn wait_for_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[test]
fn janus_target_carries_one_publisher_to_two_subscribers() {
    let Some(binary) = janus_or_skip() else {
        return;
    };
    let namespace = Namespace::up(format!("sfu-janus-test-{}", std::process::id()));
    let janus = Janus::start(&binary, &namespace);
    let pid = janus.child.id();

    let report: Option<LoadReport> = in_namespace(&namespace.0, move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        runtime.block_on(async move {
            if !wait_for_port(JANUS_PORT, Duration::from_secs(20)).await {
                return None;
            }
            let mut config = LoadConfig::new(format!("ws://127.0.0.1:{JANUS_PORT}"));
            config.target = Target::Janus;
            config.publishers = 1;
            config.subscribers = 2;
            config.audio = true;
            config.duration = Duration::from_secs(3);
            config.join_rate = 20.0;
            config.server_pid = Some(pid);
            Some(run_load(config, std::future::pending(), |_| {}).await)
        })
    });
    let Some(report) = report else {
        panic!(
            "Janus did not listen on 127.0.0.1:{JANUS_PORT} within 20 s; its log:\n{}",
            janus.log_tail()
        );
    };

    let summary = format!("{}\nJanus log:\n{}", report.to_text(), janus.log_tail());
    assert_eq!(report.joins.succeeded, 3, "{summary}");
    // Each subscriber gets the publisher's audio and video; the publisher has no one to hear.
    assert_eq!(report.tracks.expected, 4, "{summary}");
    assert_eq!(report.tracks.received, 4, "{summary}");
    assert_eq!(report.tracks.stalled, 0, "{summary}");
    for peer in report.peers.iter().filter(|p| p.role == Role::Subscriber) {
        assert_eq!(peer.tracks_received, 2, "{}: {summary}", peer.name);
        assert!(peer.receive_bitrate_bps > 0.0, "{}: {summary}", peer.name);
    }
    assert!(report.media.packets_expected > 100, "{summary}");
    assert!(report.media.loss_pct < 1.0, "{summary}");
    assert!(report.verdict.pass, "{summary}");
    // Janus's CPU and memory came from /proc/<its pid>, and the packets forwarded while held
    // were counted at the subscribers.
    assert_eq!(report.server.pid, Some(pid), "{summary}");
    assert!(report.server.samples >= 2, "{summary}");
    assert!(
        report.server.rss_bytes_peak.unwrap_or(0.0) > 1e6,
        "{summary}"
    );
    assert!(
        report.media.packets_received_hold.unwrap_or(0) > 0,
        "{summary}"
    );
}
