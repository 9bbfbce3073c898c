//! The `sfu-load` command line: its flags, the parsers for durations (`30s`, `2m`) and
//! bitrates (`500k`, `1M`), and turning the flags into a [`LoadConfig`] (loading media files
//! once, so a bad file fails before any peer joins).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use super::run::{LoadConfig, LoadMedia};
use super::target::Target;
use crate::media_file::{IvfClip, OggOpusClip};

/// Load-tests an SFU: joins rooms of headless publishers and subscribers, holds the load, and
/// reports joins, join time, tracks, bitrate, loss, jitter, latency, and the server's and its
/// own CPU and memory, ending with a PASS/FAIL verdict (exit status 0/1).
#[derive(Debug, Clone, Parser)]
#[command(name = "sfu-load", version)]
pub struct Args {
    /// The server under test: `ours` (sfu-server) or `janus` (Janus's VideoRoom plugin over
    /// its WebSocket API, for comparison).
    #[arg(long, value_enum, default_value_t = Target::Ours)]
    pub target: Target,
    /// The server's signaling WebSocket (default: ws://127.0.0.1:8080/ws for ours,
    /// ws://127.0.0.1:8188 for janus).
    #[arg(long)]
    pub url: Option<String>,
    /// Rooms.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rooms: u32,
    /// Publishers per room (publish video, and audio with --audio; subscribe to everything).
    #[arg(long, default_value_t = 2)]
    pub publishers: u32,
    /// Subscribers per room (only subscribe).
    #[arg(long, default_value_t = 2)]
    pub subscribers: u32,
    /// How long to hold the full load once every peer has joined, e.g. `30s`, `2m`.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Synthetic video bitrate, e.g. `500k`, `1M`, `1.5M` (bits per second).
    #[arg(long, default_value = "500k", value_parser = parse_bitrate)]
    pub video_bitrate: u32,
    /// Publishers also publish audio (synthetic Opus, or --audio-file).
    #[arg(long)]
    pub audio: bool,
    /// Join attempts started per second (paced evenly).
    #[arg(long, default_value_t = 10.0, value_parser = parse_rate)]
    pub join_rate: f64,
    /// `synthetic` (VP8 with embedded send time and counter: exact loss and one-way latency)
    /// or a VP8 IVF file to publish, looped.
    #[arg(long, default_value = "synthetic")]
    pub media: String,
    /// An Ogg Opus file publishers send as audio, looped (implies --audio).
    #[arg(long)]
    pub audio_file: Option<PathBuf>,
    /// Print the report as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file (whatever stdout shows), to keep runs on record.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
    /// Room names are `<prefix>-<run id>-<n>`.
    #[arg(long, default_value = "load", value_parser = parse_room_prefix)]
    pub room_prefix: String,
    /// Where to read the server's CPU and memory (default: /metrics of the --url host).
    #[arg(long, conflicts_with = "server_pid")]
    pub metrics_url: Option<String>,
    /// Read the server's CPU and memory from /proc/PID instead (a server on this machine;
    /// the way to measure Janus, and to measure both servers alike).
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// How long one join may take before it counts as failed, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub join_timeout: Duration,
    /// The server's join-token secret (its --auth-secret): each peer gets a token for its room
    /// and name; subscribers' tokens do not allow publishing.
    #[arg(long, env = "SFU_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<signaling::auth::Secret>,
    /// Local address peers bind for media: 127.0.0.1 for a server on this machine, else an
    /// address of this machine that reaches the server.
    #[arg(long, default_value = "127.0.0.1")]
    pub local_ip: std::net::IpAddr,
    /// Publishers send their video as simulcast: three synthetic layers (320×180 at 150k,
    /// 640×360 at 500k, 1280×720 at 1.5M) instead of one stream at --video-bitrate.
    #[arg(long, conflicts_with = "video_bitrate")]
    pub simulcast: bool,
    /// With --simulcast: every this often (e.g. `2s`) each subscriber asks for another quality
    /// of every simulcast track (high, low, medium, …), each subscriber a step apart from the
    /// one before, and the report counts the layer switches receivers saw.
    #[arg(long, value_parser = parse_duration, requires = "simulcast")]
    pub switch_every: Option<Duration>,
}

/// `30s`, `2m`, `1h30m`, `500ms`; a bare number means seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let parsed = match s.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
        _ => humantime::parse_duration(s).map_err(|e| format!("{e} (try 30s, 2m or 500ms)"))?,
    };
    if parsed.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(parsed)
}

/// `500k`, `1M`, `1.5M`, `2500000` (bits per second; k = 1000, M = 1 000 000).
pub fn parse_bitrate(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let (number, multiplier) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1e3),
        Some((i, 'm' | 'M')) => (&s[..i], 1e6),
        _ => (s, 1.0),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a bitrate (try 500k or 1M)"))?;
    let bps = value * multiplier;
    if !(1e3..=1e9).contains(&bps) {
        return Err(format!(
            "{s:?} is outside 1k..1000M bits per second (try 500k or 1M)"
        ));
    }
    Ok(bps.round() as u32)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of joins per second"))?;
    if !(rate.is_finite() && rate > 0.0 && rate <= 1000.0) {
        return Err("joins per second must be above 0 and at most 1000".into());
    }
    Ok(rate)
}

fn parse_room_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.chars().count() <= 40
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(s.to_owned())
    } else {
        Err("1-40 letters, digits, '_' or '-' (room names allow only those)".into())
    }
}

impl Args {
    /// The load test these flags describe. Fails (with a message for the user) if a media
    /// file cannot be used or the flags make no sense together.
    pub fn to_config(&self) -> Result<LoadConfig, String> {
        if self.publishers == 0 && self.subscribers == 0 {
            return Err("--publishers and --subscribers are both 0: nobody would join".into());
        }
        if self.publishers == 0 {
            return Err("--publishers 0: subscribers would have nothing to receive".into());
        }
        let url = self
            .url
            .clone()
            .unwrap_or_else(|| self.target.default_url().to_owned());
        if !url.starts_with("ws://") && !url.starts_with("wss://") {
            return Err(format!(
                "--url {url:?} must be a ws:// or wss:// URL such as {}",
                self.target.default_url()
            ));
        }
        if self.target == Target::Janus && self.auth_secret.is_some() {
            return Err(
                "--auth-secret is for our server's join tokens; --target janus does not use it"
                    .into(),
            );
        }
        if self.target == Target::Janus && self.simulcast {
            return Err(
                "--simulcast: the Janus rooms sfu-load creates carry no simulcast; run it \
                 against our server"
                    .into(),
            );
        }
        if self.simulcast && self.media != "synthetic" {
            return Err(
                "--simulcast sends synthetic layers; it cannot publish --media files".into(),
            );
        }
        if self.target == Target::Janus && self.metrics_url.is_some() {
            return Err(
                "--metrics-url: Janus has no /metrics of this kind; use --server-pid".into(),
            );
        }
        let media = if self.media == "synthetic" {
            if let Some(audio) = &self.audio_file {
                return Err(format!(
                    "--audio-file {} needs --media FILE.ivf: mixing real and synthetic media \
                     would leave neither probes nor RTP stats comparable",
                    audio.display()
                ));
            }
            LoadMedia::Synthetic
        } else {
            let video = IvfClip::open(&self.media).map_err(|e| format!("--media {e}"))?;
            let audio = match &self.audio_file {
                Some(path) => {
                    Some(OggOpusClip::open(path).map_err(|e| format!("--audio-file {e}"))?)
                }
                None => None,
            };
            LoadMedia::Files { video, audio }
        };
        Ok(LoadConfig {
            target: self.target,
            url,
            rooms: self.rooms as usize,
            publishers: self.publishers as usize,
            subscribers: self.subscribers as usize,
            duration: self.duration,
            // With simulcast each layer has its own rate; what a publisher should send, for the
            // report's shortfall check, is their sum.
            video_bitrate_bps: if self.simulcast {
                crate::SimulcastLayer::three_layers()
                    .iter()
                    .map(|l| l.bitrate_bps)
                    .sum()
            } else {
                self.video_bitrate
            },
            audio: self.audio || self.audio_file.is_some(),
            join_rate: self.join_rate,
            media,
            room_prefix: self.room_prefix.clone(),
            metrics_url: self.metrics_url.clone(),
            server_pid: self.server_pid,
            join_timeout: self.join_timeout,
            local_ip: self.local_ip,
            auth_secret: self.auth_secret.clone(),
            simulcast: self.simulcast,
            switch_every: self.switch_every,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").unwrap_err().contains("try 30s"));
    }

    #[test]
    fn bitrates() {
        assert_eq!(parse_bitrate("500k"), Ok(500_000));
        assert_eq!(parse_bitrate("1M"), Ok(1_000_000));
        assert_eq!(parse_bitrate("1.5M"), Ok(1_500_000));
        assert_eq!(parse_bitrate("64K"), Ok(64_000));
        assert_eq!(parse_bitrate("2500000"), Ok(2_500_000));
        assert!(parse_bitrate("fast").is_err());
        assert!(parse_bitrate("10").is_err(), "10 bit/s is surely a typo");
        assert!(parse_bitrate("5000M").is_err());
    }

    #[test]
    fn defaults_make_a_first_run() {
        let args = Args::parse_from(["sfu-load"]);
        let config = args.to_config().unwrap();
        assert_eq!(config.url, "ws://127.0.0.1:8080/ws");
        assert_eq!(config.target, Target::Ours);
        assert_eq!(
            (config.rooms, config.publishers, config.subscribers),
            (1, 2, 2)
        );
        assert_eq!(config.duration, Duration::from_secs(15));
        assert_eq!(config.video_bitrate_bps, 500_000);
        assert_eq!(config.join_rate, 10.0);
        assert!(!args.json);
    }

    #[test]
    fn flags_and_their_mistakes() {
        let args = Args::parse_from([
            "sfu-load",
            "--rooms",
            "10",
            "--publishers",
            "5",
            "--subscribers",
            "0",
            "--duration",
            "2m",
            "--video-bitrate",
            "1M",
            "--audio",
            "--join-rate",
            "20",
            "--json",
        ]);
        let config = args.to_config().unwrap();
        assert_eq!(config.total_peers(), 50);
        assert_eq!(config.tracks_per_publisher(), 2);
        assert_eq!(config.duration, Duration::from_secs(120));
        assert!(args.json);

        let no_one = Args::parse_from(["sfu-load", "--publishers", "0", "--subscribers", "0"]);
        assert!(no_one.to_config().unwrap_err().contains("nobody"));
        let missing = Args::parse_from(["sfu-load", "--media", "/nonexistent.ivf"]);
        assert!(missing
            .to_config()
            .unwrap_err()
            .contains("/nonexistent.ivf"));
        let mixed = Args::parse_from(["sfu-load", "--audio-file", "x.ogg"]);
        assert!(mixed.to_config().unwrap_err().contains("--media"));
        assert!(Args::try_parse_from(["sfu-load", "--rooms", "0"]).is_err());
        assert!(Args::try_parse_from(["sfu-load", "--join-rate", "0"]).is_err());
        assert!(Args::try_parse_from(["sfu-load", "--room-prefix", "a b"]).is_err());
    }

    #[test]
    fn janus_target_flags() {
        let args = Args::parse_from(["sfu-load", "--target", "janus", "--server-pid", "42"]);
        let config = args.to_config().unwrap();
        assert_eq!(config.target, Target::Janus);
        assert_eq!(config.url, "ws://127.0.0.1:8188");
        assert_eq!(
            config.server_probe(),
            Ok(super::super::server_metrics::ServerProbe::Process(42))
        );
        let no_pid = Args::parse_from(["sfu-load", "--target", "janus"])
            .to_config()
            .unwrap();
        assert!(no_pid.server_probe().unwrap_err().contains("--server-pid"));
        let secret = Args::parse_from([
            "sfu-load",
            "--target",
            "janus",
            "--auth-secret",
            "s3cret-s3cret-s3cret",
        ]);
        assert!(secret.to_config().unwrap_err().contains("--auth-secret"));
        assert!(Args::try_parse_from(["sfu-load", "--target", "mediasoup"]).is_err());
        assert!(Args::try_parse_from([
            "sfu-load",
            "--metrics-url",
            "http://x/metrics",
            "--server-pid",
            "1"
        ])
        .is_err());
    }

    #[test]
    fn simulcast_flags() {
        let args = Args::parse_from(["sfu-load", "--simulcast", "--switch-every", "2s"]);
        let config = args.to_config().unwrap();
        assert!(config.simulcast);
        assert_eq!(config.switch_every, Some(Duration::from_secs(2)));
        // What a publisher should send is the layers' sum.
        assert_eq!(config.video_bitrate_bps, 2_150_000);
        // Switching needs layers; layers have their own rates; Janus rooms here have none.
        assert!(Args::try_parse_from(["sfu-load", "--switch-every", "2s"]).is_err());
        assert!(
            Args::try_parse_from(["sfu-load", "--simulcast", "--video-bitrate", "1M"]).is_err()
        );
        let janus = Args::parse_from(["sfu-load", "--target", "janus", "--simulcast"]);
        assert!(janus.to_config().unwrap_err().contains("--simulcast"));
        let file = Args::parse_from(["sfu-load", "--simulcast", "--media", "clip.ivf"]);
        assert!(file.to_config().unwrap_err().contains("--simulcast"));
    }
}
