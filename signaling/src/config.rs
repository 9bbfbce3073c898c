//! The `sfu-server` command line: the server's flags ([`ServerConfig`], every one also read
//! from an environment variable) and the `token` subcommand that mints join tokens ([`Cli`]).

use crate::auth::Secret;
use clap::{Args, Parser, Subcommand};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// A WebRTC SFU: browsers and headless clients call in over a WebSocket; everyone's audio
/// and video is forwarded to everyone else in the room. With no subcommand it serves;
/// `sfu-server token` prints a join token.
#[derive(Debug, Clone, Parser)]
#[command(name = "sfu-server", version)]
pub struct Cli {
    /// What to do instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The server's flags (also accepted before a subcommand).
    #[command(flatten)]
    pub server: ServerConfig,
}

/// Subcommands of `sfu-server`.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Prints a join token signed with the auth secret (`--auth-secret` or SFU_AUTH_SECRET).
    Token(TokenArgs),
}

/// `sfu-server token`: what the token allows.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The room the token admits to.
    #[arg(long)]
    pub room: String,
    /// The only name the holder may join as (any name when omitted).
    #[arg(long)]
    pub name: Option<String>,
    /// How long the token is valid, e.g. `90s`, `30m`, `1h`, `7d`.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// A watch-only token: the holder may not publish.
    #[arg(long)]
    pub no_publish: bool,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| format!("{e} (try 90s, 30m, 1h or 7d)"))?;
    if ttl.is_zero() {
        return Err("the ttl must be longer than zero".into());
    }
    Ok(ttl)
}

/// A WebRTC SFU: browsers and headless clients call in over a WebSocket; everyone's audio
/// and video is forwarded to everyone else in the room.
#[derive(Debug, Clone, Parser)]
#[command(name = "sfu-server", version, about)]
pub struct ServerConfig {
    /// Address for HTTP and WebSocket signaling (port 0 picks a free port).
    #[arg(long, env = "SFU_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address bound for media and advertised in ICE candidates (repeatable). Default: the
    /// host's non-loopback addresses, or loopback where there is no other.
    #[arg(long = "ice-ip", env = "SFU_ICE_IPS", value_delimiter = ',')]
    pub ice_ips: Vec<IpAddr>,

    /// UDP port range for media, `MIN-MAX` (one port per peer connection). Default: any free port.
    #[arg(long, env = "SFU_UDP_PORTS", value_parser = parse_port_range)]
    pub udp_ports: Option<(u16, u16)>,

    /// STUN/TURN server URL handed to clients in `joined` (repeatable).
    #[arg(long = "ice-server", env = "SFU_ICE_SERVERS", value_delimiter = ',')]
    pub ice_servers: Vec<String>,

    /// User name for the TURN URLs among `--ice-server`.
    #[arg(long, env = "SFU_ICE_USERNAME")]
    pub ice_username: Option<String>,

    /// Credential for the TURN URLs among `--ice-server`.
    #[arg(long, env = "SFU_ICE_CREDENTIAL")]
    pub ice_credential: Option<String>,

    /// Largest WebSocket frame accepted, in bytes; larger ones get `too_large` and a close.
    #[arg(long, env = "SFU_MAX_FRAME_BYTES", default_value_t = 256 * 1024)]
    pub max_frame_bytes: usize,

    /// Participants per room; more get `room_full`.
    #[arg(long, env = "SFU_MAX_PARTICIPANTS_PER_ROOM", default_value_t = 100)]
    pub max_participants_per_room: usize,

    /// Tracks one participant may publish.
    #[arg(long, env = "SFU_MAX_TRACKS_PER_PARTICIPANT", default_value_t = 8)]
    pub max_tracks_per_participant: usize,

    /// Rooms that may exist at once; a join that would open one more gets `room_full`.
    #[arg(long, env = "SFU_MAX_ROOMS", default_value_t = 1000)]
    pub max_rooms: usize,

    /// Concurrent WebSocket connections; more get HTTP 503.
    #[arg(long, env = "SFU_MAX_CONNECTIONS", default_value_t = 2000)]
    pub max_connections: usize,

    /// Secret for HS256 join tokens. When set, every join needs a valid token for its room
    /// (see `sfu-server token`); without it, tokens are ignored.
    #[arg(long, env = "SFU_AUTH_SECRET", global = true, hide_env_values = true)]
    pub auth_secret: Option<Secret>,

    /// Origin allowed to open the WebSocket (repeatable). When any is set, a browser upgrade
    /// from another origin gets HTTP 403; the server's own origin and requests without an
    /// Origin header (non-browser clients) are always allowed.
    #[arg(long = "allowed-origin", env = "SFU_ALLOWED_ORIGINS", value_delimiter = ',', value_parser = parse_origin)]
    pub allowed_origins: Vec<String>,

    /// Seconds a socket may stay open without joining.
    #[arg(long, env = "SFU_JOIN_TIMEOUT_SECS", default_value_t = 10)]
    pub join_timeout_secs: u64,

    /// Seconds a participant's ICE may stay failed or disconnected before it is removed.
    #[arg(long, env = "SFU_ICE_LOST_TIMEOUT_SECS", default_value_t = 15)]
    pub ice_lost_timeout_secs: u64,

    /// Seconds a new peer connection may take to connect before its participant is removed.
    #[arg(long, env = "SFU_ICE_CONNECT_TIMEOUT_SECS", default_value_t = 30)]
    pub ice_connect_timeout_secs: u64,

    /// Threads media runs on; each room (its connections and forwarding) lives on one of
    /// them. Default: one per CPU core. `0` runs media on the server's shared runtime.
    #[arg(long, env = "SFU_MEDIA_THREADS")]
    pub media_threads: Option<usize>,

    /// Whether each subscriber's bandwidth estimate (REMB) caps the simulcast layers it gets
    /// (`false`: layers follow only the quality each subscriber asks for).
    #[arg(
        long,
        env = "SFU_BANDWIDTH_ADAPTATION",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub bandwidth_adaptation: bool,

    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, env = "SFU_LOG", default_value = "info,webrtc=warn,rtc=warn")]
    pub log: String,
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (min, max) = s
        .split_once('-')
        .ok_or_else(|| format!("expected MIN-MAX, got {s:?}"))?;
    let min: u16 = min.trim().parse().map_err(|e| format!("bad MIN: {e}"))?;
    let max: u16 = max.trim().parse().map_err(|e| format!("bad MAX: {e}"))?;
    if min == 0 || min > max {
        return Err(format!("need 0 < MIN <= MAX, got {min}-{max}"));
    }
    Ok((min, max))
}

/// An origin as browsers send it: `scheme://host[:port]`, lower case, no path.
fn parse_origin(s: &str) -> Result<String, String> {
    let origin = s.trim().trim_end_matches('/').to_ascii_lowercase();
    let Some((scheme, host)) = origin.split_once("://") else {
        return Err(format!(
            "{s:?} is not an origin; write it as scheme://host[:port], e.g. https://meet.example.org"
        ));
    };
    if scheme.is_empty() || host.is_empty() || host.contains('/') {
        return Err(format!(
            "{s:?} is not an origin; write it as scheme://host[:port] without a path"
        ));
    }
    Ok(origin)
}

impl ServerConfig {
    /// The media threads to start: as configured, else one per CPU core.
    pub fn media_threads(&self) -> usize {
        self.media_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1)
        })
    }

    /// The media addresses: as configured, else the host's non-loopback IPv4 addresses, else
    /// loopback.
    pub fn resolved_ice_ips(&self) -> Vec<IpAddr> {
        if !self.ice_ips.is_empty() {
            return self.ice_ips.clone();
        }
        let mut found: Vec<IpAddr> = rtc::shared::ifaces::ifaces()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| i.addr.map(|a| a.ip()))
            .filter(|ip| ip.is_ipv4() && !ip.is_loopback() && !ip.is_unspecified())
            .collect();
        found.dedup();
        if found.is_empty() {
            found.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_reject_nonsense() {
        assert_eq!(parse_port_range("50000-50100"), Ok((50000, 50100)));
        assert!(parse_port_range("50100-50000").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("5000").is_err());
    }

    #[test]
    fn flags_parse() {
        let c = ServerConfig::parse_from([
            "sfu-server",
            "--listen",
            "127.0.0.1:0",
            "--ice-ip",
            "127.0.0.1",
            "--ice-server",
            "stun:stun.example.org:3478",
        ]);
        assert_eq!(c.resolved_ice_ips(), vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        assert_eq!(c.ice_servers.len(), 1);
        assert_eq!(c.max_frame_bytes, 262_144);
        assert!(c.auth_secret.is_none());
        assert!(c.allowed_origins.is_empty());
    }

    #[test]
    fn no_subcommand_runs_the_server_and_token_takes_the_secret_before_or_after() {
        let cli = Cli::parse_from(["sfu-server", "--listen", "127.0.0.1:0"]);
        assert!(cli.command.is_none());
        assert_eq!(cli.server.listen.port(), 0);

        let cli = Cli::parse_from([
            "sfu-server",
            "token",
            "--room",
            "r",
            "--ttl",
            "2h",
            "--no-publish",
            "--auth-secret",
            "s3cret",
        ]);
        let Some(Command::Token(args)) = cli.command else {
            panic!("token subcommand")
        };
        assert_eq!(args.ttl, Duration::from_secs(7200));
        assert!(args.no_publish);
        assert_eq!(args.name, None);
        assert_eq!(cli.server.auth_secret, Secret::new("s3cret").ok());

        let cli = Cli::parse_from(["sfu-server", "--auth-secret", "x", "token", "--room", "r"]);
        assert!(cli.server.auth_secret.is_some());
        assert!(
            Cli::try_parse_from(["sfu-server", "token", "--room", "r", "--ttl", "0s"]).is_err()
        );
        assert!(Cli::try_parse_from(["sfu-server", "--auth-secret", ""]).is_err());
    }

    #[test]
    fn allowed_origins_are_normalised_and_checked() {
        let c = ServerConfig::parse_from([
            "sfu-server",
            "--allowed-origin",
            "https://Meet.Example.org/",
            "--allowed-origin",
            "http://127.0.0.1:8080",
        ]);
        assert_eq!(
            c.allowed_origins,
            vec!["https://meet.example.org", "http://127.0.0.1:8080"]
        );
        assert!(parse_origin("meet.example.org").is_err());
        assert!(parse_origin("https://meet.example.org/call").is_err());
    }
}
