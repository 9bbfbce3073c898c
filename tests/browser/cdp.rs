//! A small Chrome DevTools Protocol driver for the browser tests: launches headless Chromium
//! with fake camera and microphone, opens pages as targets on one browser connection, and lets
//! a test evaluate JavaScript, click and type like a user, and take screenshots.
//!
//! Only what the tests use is here: one WebSocket to the browser, flattened sessions (one per
//! page), request/response matching by id, and each page's console errors and uncaught
//! exceptions kept so that a failing test can show what the page said.

#![allow(dead_code)] // each browser test binary uses its own part of this driver

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

/// How long Chromium may take to print its DevTools address (a cold start on 2 busy cores).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one protocol command may take before the driver reports it as hung.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Console lines kept per page for failure messages.
const MAX_LOG_LINES: usize = 200;

/// Set to `1` to skip the browser tests on a machine without Chromium.
pub const SKIP_VARIABLE: &str = "SFU_SKIP_BROWSER_TESTS";

/// The Chromium binary to drive, `None` when the browser tests are skipped on purpose.
///
/// Panics with the install command when Chromium is missing, so a machine without it fails
/// loudly instead of passing without having tested the page.
pub fn chromium_or_skip() -> Option<PathBuf> {
    if std::env::var(SKIP_VARIABLE).is_ok_and(|v| v == "1") {
        eprintln!("{SKIP_VARIABLE}=1: skipped the browser tests (the call page was NOT tested)");
        return None;
    }
    let candidates = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)));
    if let Some(found) = candidates.into_iter().find(|path| path.is_file()) {
        return Some(found);
    }
    panic!(
        "Chromium is not installed, so the call page cannot be tested. Install it with \
         `apt-get update && apt-get install -y chromium` (Debian), or set \
         {SKIP_VARIABLE}=1 to skip the browser tests knowingly."
    );
}

/// A driver failure: a protocol error, a page exception, a timeout or a lost browser.
#[derive(Debug)]
pub struct CdpError(pub String);

impl std::fmt::Display for CdpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CdpError {}

pub type Result<T> = std::result::Result<T, CdpError>;

fn err(message: impl Into<String>) -> CdpError {
    CdpError(message.into())
}

/// The browser connection shared by every page: sends commands, routes replies and events.
struct Connection {
    /// Frames to the browser, written by the writer task.
    outgoing: mpsc::UnboundedSender<String>,
    /// Commands waiting for their reply, by id.
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Value>>>>,
    /// Console errors and exceptions per session id, newest last.
    logs: Mutex<HashMap<String, Vec<String>>>,
    /// Every page opened, as (label, session id), so a failing test can show them all.
    pages: Mutex<Vec<(String, String)>>,
    /// Ids for commands; the protocol only needs them unique per connection.
    next_id: AtomicU64,
}

impl Connection {
    /// Sends one command (to a page when `session` is set) and waits for its result.
    async fn call(&self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            frame["sessionId"] = json!(session);
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, reply_tx);
        if self.outgoing.send(frame.to_string()).is_err() {
            self.pending.lock().unwrap().remove(&id);
            return Err(err(format!("{method}: the browser connection is closed")));
        }
        match tokio::time::timeout(COMMAND_TIMEOUT, reply_rx).await {
            Ok(Ok(result)) => result.map_err(|e| err(format!("{method}: {e}"))),
            Ok(Err(_)) => Err(err(format!("{method}: the browser connection closed"))),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(err(format!("{method}: no reply in {COMMAND_TIMEOUT:?}")))
            }
        }
    }

    /// Handles one frame from the browser: a reply to a command, or an event.
    fn dispatch(&self, text: &str) {
        let Ok(frame) = serde_json::from_str::<Value>(text) else {
            return;
        };
        if let Some(id) = frame["id"].as_u64() {
            let reply = match frame.get("error") {
                Some(error) => Err(err(error.to_string())),
                None => Ok(frame["result"].clone()),
            };
            if let Some(waiter) = self.pending.lock().unwrap().remove(&id) {
                let _ = waiter.send(reply);
            }
            return;
        }
        let Some(session) = frame["sessionId"].as_str() else {
            return;
        };
        let line = match frame["method"].as_str() {
            Some("Runtime.consoleAPICalled") => console_line(&frame["params"]),
            Some("Runtime.exceptionThrown") => Some(exception_line(&frame["params"])),
            Some("Inspector.targetCrashed") => Some("the page crashed".to_owned()),
            _ => None,
        };
        if let Some(line) = line {
            let mut logs = self.logs.lock().unwrap();
            let log = logs.entry(session.to_owned()).or_default();
            log.push(line);
            if log.len() > MAX_LOG_LINES {
                log.remove(0);
            }
        }
    }

    /// Fails every waiting command: the browser went away.
    fn fail_all(&self) {
        for (_, waiter) in self.pending.lock().unwrap().drain() {
            let _ = waiter.send(Err(err("the browser connection closed")));
        }
    }
}

/// Console warnings and errors (and `[call]`-style logs), as one line.
fn console_line(params: &Value) -> Option<String> {
    let level = params["type"].as_str().unwrap_or("log");
    if !matches!(level, "warning" | "error" | "assert") {
        return None;
    }
    let text = params["args"]
        .as_array()
        .map(|args| {
            args.iter()
                .map(|arg| match &arg["value"] {
                    Value::String(s) => s.clone(),
                    Value::Null => arg["description"].as_str().unwrap_or("").to_owned(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Some(format!("console.{level}: {text}"))
}

fn exception_line(params: &Value) -> String {
    let details = &params["exceptionDetails"];
    let description = details["exception"]["description"]
        .as_str()
        .or_else(|| details["text"].as_str())
        .unwrap_or("unknown exception");
    format!("uncaught: {description}")
}

/// One headless Chromium process with a fresh profile; killed and cleaned up on drop.
pub struct Browser {
    connection: Arc<Connection>,
    process: Child,
    profile_dir: PathBuf,
    /// Chromium's own stderr, newest last, for failure messages about the browser itself.
    stderr_tail: Arc<Mutex<Vec<String>>>,
}

impl Browser {
    /// Starts Chromium with `flags` added to the ones every test needs (headless, fake media
    /// devices with permission granted, loopback ICE, no background traffic).
    pub async fn launch(binary: &Path, flags: &[&str]) -> Result<Browser> {
        let profile_dir = std::env::temp_dir().join(format!(
            "sfu-browser-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&profile_dir)
            .map_err(|e| err(format!("creating {}: {e}", profile_dir.display())))?;
        let mut command = Command::new(binary);
        command
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--use-fake-device-for-media-stream",
                "--use-fake-ui-for-media-stream",
                "--allow-loopback-in-peer-connection",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile_dir.display()))
            .args(flags)
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut process = command
            .spawn()
            .map_err(|e| err(format!("starting {}: {e}", binary.display())))?;
        let stderr = process.stderr.take().expect("stderr is piped");
        let stderr_tail = Arc::new(Mutex::new(Vec::new()));
        let (address_tx, address_rx) = oneshot::channel();
        tokio::spawn(drain_stderr(stderr, Arc::clone(&stderr_tail), address_tx));
        let address = match tokio::time::timeout(LAUNCH_TIMEOUT, address_rx).await {
            Ok(Ok(address)) => address,
            outcome => {
                let why = if outcome.is_err() {
                    format!("printed no DevTools address in {LAUNCH_TIMEOUT:?}")
                } else {
                    "exited before printing its DevTools address".to_owned()
                };
                let _ = std::fs::remove_dir_all(&profile_dir);
                return Err(err(format!(
                    "Chromium {why}; its stderr:\n{}",
                    stderr_tail.lock().unwrap().join("\n")
                )));
            }
        };
        let (socket, _) = tokio_tungstenite::connect_async(address.as_str())
            .await
            .map_err(|e| err(format!("connecting to DevTools at {address}: {e}")))?;
        let (mut sink, mut stream) = socket.split();
        let (outgoing, mut outgoing_rx) = mpsc::unbounded_channel::<String>();
        let connection = Arc::new(Connection {
            outgoing,
            pending: Mutex::new(HashMap::new()),
            logs: Mutex::new(HashMap::new()),
            pages: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(async move {
            while let Some(frame) = outgoing_rx.recv().await {
                if sink.send(Message::Text(frame.into())).await.is_err() {
                    break;
                }
            }
        });
        let reader = Arc::clone(&connection);
        tokio::spawn(async move {
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Text(text) = message {
                    reader.dispatch(&text);
                }
            }
            reader.fail_all();
        });
        Ok(Browser {
            connection,
            process,
            profile_dir,
            stderr_tail,
        })
    }

    /// Opens `url` in a new window and waits until it has loaded. A window of its own, not a
    /// background tab, so the page renders (and animates) as it would for a person.
    pub async fn open(&self, label: &str, url: &str) -> Result<Page> {
        let created = self
            .connection
            .call(
                None,
                "Target.createTarget",
                json!({ "url": "about:blank", "newWindow": true }),
            )
            .await?;
        let target_id = created["targetId"]
            .as_str()
            .ok_or_else(|| err("Target.createTarget returned no targetId"))?
            .to_owned();
        let attached = self
            .connection
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        let session_id = attached["sessionId"]
            .as_str()
            .ok_or_else(|| err("Target.attachToTarget returned no sessionId"))?
            .to_owned();
        self.connection
            .pages
            .lock()
            .unwrap()
            .push((label.to_owned(), session_id.clone()));
        let page = Page {
            connection: Arc::clone(&self.connection),
            label: label.to_owned(),
            session_id,
        };
        // Enabled before navigating, so that nothing the page logs at start-up is missed.
        page.call("Runtime.enable", json!({})).await?;
        page.call("Page.enable", json!({})).await?;
        let navigated = page.call("Page.navigate", json!({ "url": url })).await?;
        if let Some(error) = navigated["errorText"].as_str() {
            return Err(err(format!("{label}: opening {url} failed: {error}")));
        }
        page.wait_for(
            "document.readyState === 'complete'",
            COMMAND_TIMEOUT,
            "the page loaded",
        )
        .await?;
        Ok(page)
    }

    /// Saves a screenshot of every page opened, as `<dir>/<label>.png`, and returns where each
    /// went (or why it could not be taken), one line per page: what each person saw when a
    /// test failed.
    pub async fn screenshot_every_page(&self, dir: &Path) -> String {
        let pages = self.connection.pages.lock().unwrap().clone();
        let mut lines = Vec::new();
        for (label, session_id) in pages {
            let path = dir.join(format!("{label}.png"));
            let line = match capture_png(&self.connection, &session_id, &path).await {
                Ok(()) => path.display().to_string(),
                Err(e) => format!("{label}: no screenshot: {e}"),
            };
            lines.push(line);
        }
        lines.join("\n")
    }

    /// The last lines Chromium printed, for diagnosing a browser that misbehaves.
    pub fn stderr_tail(&self) -> String {
        self.stderr_tail.lock().unwrap().join("\n")
    }

    /// Asks Chromium to exit, then makes sure it did, and removes its profile.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.connection.call(None, "Browser.close", json!({})),
        )
        .await;
        if tokio::time::timeout(Duration::from_secs(5), self.process.wait())
            .await
            .is_err()
        {
            let _ = self.process.kill().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.process.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile_dir);
    }
}

/// Reads Chromium's stderr for its whole life (a full pipe would block it), reports the
/// DevTools address once, and keeps the last lines.
async fn drain_stderr(
    stderr: tokio::process::ChildStderr,
    tail: Arc<Mutex<Vec<String>>>,
    address_tx: oneshot::Sender<String>,
) {
    let mut address_tx = Some(address_tx);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(address) = line.strip_prefix("DevTools listening on ") {
            if let Some(tx) = address_tx.take() {
                let _ = tx.send(address.trim().to_owned());
            }
        }
        let mut tail = tail.lock().unwrap();
        tail.push(line);
        if tail.len() > MAX_LOG_LINES {
            tail.remove(0);
        }
    }
}

/// One page (tab) of the browser.
pub struct Page {
    connection: Arc<Connection>,
    /// Who this page is in the test ("Ada"), for messages.
    pub label: String,
    /// The flattened session that addresses this page on the browser connection.
    session_id: String,
}

impl Page {
    async fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.connection
            .call(Some(&self.session_id), method, params)
            .await
            .map_err(|e| err(format!("{}: {e}", self.label)))
    }

    /// Evaluates a JavaScript expression (awaiting a promise) and returns its JSON value.
    /// It runs as a user gesture, as if the user had just interacted with the page.
    pub async fn eval(&self, expression: &str) -> Result<Value> {
        let reply = self
            .call(
                "Runtime.evaluate",
                json!({
                    "expression": expression,
                    "awaitPromise": true,
                    "returnByValue": true,
                    "userGesture": true,
                }),
            )
            .await?;
        if let Some(details) = reply.get("exceptionDetails") {
            let description = details["exception"]["description"]
                .as_str()
                .or_else(|| details["text"].as_str())
                .unwrap_or("exception");
            return Err(err(format!(
                "{}: `{expression}` threw: {description}",
                self.label
            )));
        }
        Ok(reply["result"]["value"].clone())
    }

    /// Polls `expression` until it returns something truthy (not false, null, 0 or "") and
    /// returns that. On timeout the error names `what` and shows the last value and the page's
    /// console errors.
    pub async fn wait_for(&self, expression: &str, timeout: Duration, what: &str) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let last = match self.eval(expression).await {
                Ok(value) if truthy(&value) => return Ok(value),
                Ok(value) => value,
                Err(e) => Value::String(e.to_string()),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(err(format!(
                    "{}: waited {timeout:?} for {what}; last value: {last}\npage log:\n{}",
                    self.label,
                    self.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Clicks the centre of the element matched by `selector` with real mouse events, as a
    /// user would (so it counts as a user gesture, and a hidden button cannot be clicked).
    pub async fn click(&self, selector: &str) -> Result<()> {
        let selector_js = serde_json::to_string(selector).unwrap();
        let point = self
            .eval(&format!(
                "(() => {{
                    const el = document.querySelector({selector_js});
                    if (!el) return 'missing';
                    el.scrollIntoView({{ block: 'center', inline: 'center' }});
                    const r = el.getBoundingClientRect();
                    if (r.width === 0 || r.height === 0) return 'invisible';
                    if (el.disabled) return 'disabled';
                    return {{ x: r.left + r.width / 2, y: r.top + r.height / 2 }};
                }})()"
            ))
            .await?;
        let (Some(x), Some(y)) = (point["x"].as_f64(), point["y"].as_f64()) else {
            return Err(err(format!(
                "{}: cannot click {selector}: {point}",
                self.label
            )));
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await?;
        }
        Ok(())
    }

    /// Types `text` into the focused element, as a keyboard (IME) would insert it.
    pub async fn type_text(&self, text: &str) -> Result<()> {
        self.call("Input.insertText", json!({ "text": text }))
            .await
            .map(drop)
    }

    /// Saves a PNG of what the page shows now.
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        capture_png(&self.connection, &self.session_id, path)
            .await
            .map_err(|e| err(format!("{}: {e}", self.label)))
    }

    /// The console errors, warnings and exceptions this page produced, one per line.
    pub fn log(&self) -> String {
        self.connection
            .logs
            .lock()
            .unwrap()
            .get(&self.session_id)
            .map(|lines| lines.join("\n"))
            .unwrap_or_default()
    }
}

/// Captures what the page of `session_id` shows as a PNG file at `path`.
async fn capture_png(connection: &Connection, session_id: &str, path: &Path) -> Result<()> {
    let shot = connection
        .call(
            Some(session_id),
            "Page.captureScreenshot",
            json!({ "format": "png" }),
        )
        .await?;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().unwrap_or_default())
        .map_err(|e| err(format!("the screenshot is not base64: {e}")))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
    }
    std::fs::write(path, png).map_err(|e| err(format!("writing {}: {e}", path.display())))
}

/// JavaScript truthiness of a JSON value.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}
