//! Signaling: the WebSocket protocol of `shared/protocol.md`, the axum server that speaks it,
//! the call page, and the `sfu-server` binary. Media lives in the `sfu` crate; this crate only
//! translates between JSON and the media plane's API.

pub mod auth;
pub mod config;
#[cfg(target_os = "linux")]
pub mod process_metrics;
pub mod protocol;
pub mod ratelimit;
pub mod session;

use axum::extract::{Path, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::Router;
use config::ServerConfig;
use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};
use protocol::{ErrorCode, IceServer};
use sfu::{ConnectionTimeouts, MediaConfig, Metrics, RoomLimits, Sfu, SfuConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Shared by every request and session.
pub struct AppState {
    /// The media plane.
    pub sfu: Sfu,
    /// The command line the server runs with.
    pub config: ServerConfig,
    /// Handed to clients in `joined`.
    pub ice_servers: Vec<IceServer>,
    /// Every metric series, for `/metrics`.
    pub registry: Registry,
    /// `sfu_signaling_errors_total{code}`.
    pub signaling_errors: IntCounterVec,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// Sessions in flight, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// Caps concurrent WebSocket connections.
    pub connections: Arc<Semaphore>,
    /// Checks join tokens; `None` when the server runs without an auth secret.
    pub auth: Option<auth::Verifier>,
}

impl AppState {
    /// Builds the state (and the media plane) for `config`.
    pub fn new(config: ServerConfig) -> anyhow::Result<Arc<Self>> {
        let registry = Registry::new();
        let metrics = Metrics::new(&registry)?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(process_metrics::ProcessMetrics::for_self()))?;
        let signaling_errors = IntCounterVec::new(
            Opts::new(
                "sfu_signaling_errors_total",
                "Error messages sent to clients, by code",
            ),
            &["code"],
        )?;
        for code in ErrorCode::ALL {
            signaling_errors.with_label_values(&[code.as_str()]);
        }
        registry.register(Box::new(signaling_errors.clone()))?;
        let sfu = Sfu::new(
            SfuConfig {
                media: MediaConfig {
                    ice_ips: config.resolved_ice_ips(),
                    udp_ports: config.udp_ports,
                    bandwidth_adaptation: config.bandwidth_adaptation,
                },
                limits: RoomLimits {
                    max_participants: config.max_participants_per_room,
                    max_tracks_per_participant: config.max_tracks_per_participant,
                },
                timeouts: ConnectionTimeouts {
                    ice_lost: Duration::from_secs(config.ice_lost_timeout_secs),
                    connect: Duration::from_secs(config.ice_connect_timeout_secs),
                },
                max_rooms: config.max_rooms,
                media_threads: config.media_threads(),
            },
            metrics,
        )?;
        let ice_servers = ice_servers(&config);
        Ok(Arc::new(Self {
            sfu,
            ice_servers,
            registry,
            signaling_errors,
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            connections: Arc::new(Semaphore::new(config.max_connections)),
            auth: config.auth_secret.as_ref().map(auth::Verifier::new),
            config,
        }))
    }
}

fn ice_servers(config: &ServerConfig) -> Vec<IceServer> {
    config
        .ice_servers
        .iter()
        .map(|url| {
            let turn = url.starts_with("turn:") || url.starts_with("turns:");
            IceServer {
                urls: vec![url.clone()],
                username: turn.then(|| config.ice_username.clone()).flatten(),
                credential: turn.then(|| config.ice_credential.clone()).flatten(),
            }
        })
        .collect()
}

/// The HTTP routes: `/ws`, `/health`, `/metrics` and the call page.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws", get(websocket))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route("/", get(|| async { asset_response("index.html") }))
        .route(
            "/{file}",
            get(|Path(file): Path<String>| async move { asset_response(&file) }),
        )
        .with_state(state)
}

/// Bytes read from a signaling socket at once.
const SIGNALING_READ_BUFFER: usize = 4096;

async fn websocket(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !origin_allowed(&state.config.allowed_origins, &headers) {
        return (
            StatusCode::FORBIDDEN,
            "this origin may not open the signaling socket; the server's --allowed-origin list \
             does not include it",
        )
            .into_response();
    }
    let Ok(permit) = Arc::clone(&state.connections).try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections; try again later",
        )
            .into_response();
    };
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    // The socket reads frames up to 4× the limit so it can answer `too_large` and close
    // cleanly; beyond that it refuses to buffer and drops the connection.
    let read_limit = state.config.max_frame_bytes.saturating_mul(4).max(1 << 20);
    let tracker = state.sessions.clone();
    upgrade
        .max_message_size(read_limit)
        .max_frame_size(read_limit)
        // tungstenite zero-fills this much before every read attempt, even one that finds
        // nothing; at its 128 KiB default that was 8% of the server's CPU at 200 sessions
        // (docs/benchmarks.md). Signaling messages are small, and bigger ones take more reads.
        .read_buffer_size(SIGNALING_READ_BUFFER)
        .on_upgrade(move |socket| {
            tracker.track_future(async move {
                session::run(socket, state).await;
                drop(permit);
            })
        })
}

/// Whether a WebSocket upgrade passes the origin check: always when no origins are
/// configured or the request has no `Origin` (browsers always send one, so only non-browser
/// clients omit it, and those can send any header they like anyway); otherwise the origin must
/// be listed or be the server's own (its host and port equal the request's `Host`), so the
/// call page served by this server keeps working. This stops other web pages from opening
/// sockets with their visitors' browsers (cross-site WebSocket hijacking).
fn origin_allowed(allowed: &[String], headers: &HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim().trim_end_matches('/').to_ascii_lowercase();
    if allowed.contains(&origin) {
        return true;
    }
    let origin_host = origin.split_once("://").map(|(_, host)| host);
    let request_host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_ascii_lowercase);
    matches!((origin_host, request_host), (Some(o), Some(h)) if o == h)
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut body = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// The call page's files, embedded at build time.
const ASSETS: &[(&str, &[u8])] = include!(concat!(env!("OUT_DIR"), "/assets.rs"));

fn asset_response(name: &str) -> Response {
    let Some((_, body)) = ASSETS.iter().find(|(n, _)| *n == name) else {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    };
    let content_type = match name.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        *body,
    )
        .into_response()
}

/// A running server.
pub struct Server {
    /// The address it listens on (the real port when 0 was asked for).
    pub addr: SocketAddr,
    state: Arc<AppState>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Binds and starts serving.
    pub async fn start(config: ServerConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let state = AppState::new(config)?;
        let app = router(Arc::clone(&state));
        let shutdown = state.shutdown.clone();
        // Signaling is small messages in bursts (joined, then an offer; an answer, then
        // candidates): with Nagle's algorithm each one after the first waits for the peer's
        // delayed ACK, ~40 ms on Linux, which was half of a participant's join time.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
        });
        Ok(Self { addr, state, task })
    }

    /// The shared state (metrics, media plane), for tests.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Tells every client, closes every connection and stops, within `timeout`.
    pub async fn shutdown(self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        self.state.shutdown.cancel();
        self.state.sfu.shutdown(timeout.mul_f32(0.6)).await;
        self.state.sessions.close();
        let _ = tokio::time::timeout_at(deadline, self.state.sessions.wait()).await;
        let _ = tokio::time::timeout_at(deadline, self.task).await;
    }
}
