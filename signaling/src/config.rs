//! The `sfu-server` command line; every flag also reads an environment variable.

use clap::Parser;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

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

    /// Concurrent WebSocket connections.
    #[arg(long, env = "SFU_MAX_CONNECTIONS", default_value_t = 2000)]
    pub max_connections: usize,

    /// Seconds a socket may stay open without joining.
    #[arg(long, env = "SFU_JOIN_TIMEOUT_SECS", default_value_t = 10)]
    pub join_timeout_secs: u64,

    /// Seconds a participant's ICE may stay failed or disconnected before it is removed.
    #[arg(long, env = "SFU_ICE_LOST_TIMEOUT_SECS", default_value_t = 15)]
    pub ice_lost_timeout_secs: u64,

    /// Seconds a new peer connection may take to connect before its participant is removed.
    #[arg(long, env = "SFU_ICE_CONNECT_TIMEOUT_SECS", default_value_t = 30)]
    pub ice_connect_timeout_secs: u64,

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

impl ServerConfig {
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
    }
}
