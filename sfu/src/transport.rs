//! Media IO: how the SFU's peer connections are built (codecs, interceptors, ICE settings,
//! which addresses and UDP ports they bind). Everything webrtc-rs specific about creating a
//! connection lives here, so moving to a single UDP port or a sans-IO core later changes this
//! module, not the room logic.

use crate::metrics::Metrics;
use rtc::interceptor::{Attribute, Interceptor, Packet, Registry, Slot, StreamInfo, TaggedPacket};
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_simulcast_extension_headers, configure_twcc_receiver_only,
};
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::marshal::MarshalSize;
use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use webrtc::peer_connection::{PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler};

/// RFC 6464 audio level: kept on forwarded audio so receivers (and the SFU's active-speaker
/// detection) see who is talking.
pub const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// Where the media plane binds and what it advertises.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Addresses bound for media and advertised as host candidates.
    pub ice_ips: Vec<IpAddr>,
    /// Inclusive UDP port range for media; `None` lets the OS pick.
    pub udp_ports: Option<(u16, u16)>,
}

/// Errors building a peer connection.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Every port of the configured range is in use.
    #[error("no free UDP port left in the media port range")]
    NoFreePort,
    /// webrtc-rs refused the configuration or could not bind.
    #[error("peer connection setup failed: {0}")]
    Setup(String),
}

/// Builds the SFU's peer connections.
pub struct PeerFactory {
    config: MediaConfig,
    ports: Option<Arc<PortPool>>,
    metrics: Metrics,
}

/// Which side of the call a connection serves; they differ in which interceptors matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// Receives a participant's media (the participant offers).
    Publisher,
    /// Sends media to a participant (the SFU offers).
    Subscriber,
}

/// A peer connection and the port it holds; the port returns to the pool on drop.
pub struct BuiltPeer {
    /// The connection.
    pub pc: Arc<dyn PeerConnection>,
    /// Held for as long as the connection lives.
    pub port: Option<PortLease>,
}

impl PeerFactory {
    /// A factory for the given addresses and ports.
    pub fn new(config: MediaConfig, metrics: Metrics) -> Self {
        let ports = config
            .udp_ports
            .map(|(min, max)| Arc::new(PortPool::new(min, max)));
        Self {
            config,
            ports,
            metrics,
        }
    }

    /// The addresses advertised to clients.
    pub fn ice_ips(&self) -> &[IpAddr] {
        &self.config.ice_ips
    }

    /// Builds a connection bound to the configured addresses, on a port from the pool.
    pub async fn build(
        &self,
        role: PeerRole,
        handler: Arc<dyn PeerConnectionEventHandler>,
    ) -> Result<BuiltPeer, TransportError> {
        // A port may be taken by another process: try a few from the pool before giving up.
        let attempts = if self.ports.is_some() { 8 } else { 1 };
        let mut last_error = None;
        for _ in 0..attempts {
            let lease = match &self.ports {
                Some(pool) => Some(pool.acquire().ok_or(TransportError::NoFreePort)?),
                None => None,
            };
            let port = lease.as_ref().map_or(0, |l| l.port);
            match self.try_build(role, handler.clone(), port).await {
                Ok(pc) => return Ok(BuiltPeer { pc, port: lease }),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or(TransportError::NoFreePort))
    }

    async fn try_build(
        &self,
        role: PeerRole,
        handler: Arc<dyn PeerConnectionEventHandler>,
        port: u16,
    ) -> Result<Arc<dyn PeerConnection>, TransportError> {
        let setup = |e: rtc::shared::error::Error| TransportError::Setup(e.to_string());
        let mut media_engine = MediaEngine::default();
        match role {
            PeerRole::Subscriber => media_engine.register_default_codecs().map_err(setup)?,
            // Without RTX, browsers repair simulcast layers on their media SSRC; webrtc-rs
            // drops RTX of simulcast layers (no repaired-rid support), so they would never be
            // repaired at all.
            PeerRole::Publisher => register_codecs_without_rtx(&mut media_engine).map_err(setup)?,
        }
        media_engine
            .register_header_extension(
                RTCRtpHeaderExtensionCapability {
                    uri: AUDIO_LEVEL_URI.to_owned(),
                },
                RtpCodecKind::Audio,
                None,
            )
            .map_err(setup)?;
        let registry = interceptors(role, &mut media_engine, &self.metrics).map_err(setup)?;

        let loopback = self.config.ice_ips.iter().any(IpAddr::is_loopback);
        let setting_engine = SettingEngineBuilder::new()
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
            // Accept peer-reflexive pairs at once: a browser hiding behind an mDNS name (or
            // any client whose checks beat its trickled candidate) would otherwise wait 1 s.
            .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
            .with_host_acceptance_min_wait(Some(Duration::ZERO))
            // As DTLS server when answering, the handshake starts on the client's first
            // flight instead of waiting for our next timer tick.
            .with_answering_dtls_role(rtc::peer_connection::transport::RTCDtlsRole::Server)
            .with_include_loopback_candidate(loopback)
            // The default 200 ms check tick delays the first check and the DTLS hello; 20 ms
            // with the same overall budget connects in tens of milliseconds.
            .with_ice_connection_attempts(Some(Duration::from_millis(20)), Some(70))
            .build();
        let configuration = RTCConfigurationBuilder::new().build();
        let addrs: Vec<SocketAddr> = self
            .config
            .ice_ips
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect();
        let pc = PeerConnectionBuilder::new()
            .with_configuration(configuration)
            .with_media_engine(media_engine)
            .with_setting_engine(setting_engine)
            .with_interceptor_registry(registry)
            .with_handler(handler)
            .with_udp_addrs(addrs)
            .build()
            .await
            .map_err(setup)?;
        Ok(Arc::new(pc))
    }
}

/// The default codec set (same payload types and parameters as webrtc-rs's defaults, so a
/// publisher's codec is always one the subscriber side knows), without RTX.
fn register_codecs_without_rtx(media_engine: &mut MediaEngine) -> rtc::shared::error::Result<()> {
    use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters};
    let audio: [(&str, u32, u16, &str, u8); 4] = [
        ("audio/opus", 48_000, 2, "minptime=10;useinbandfec=1", 111),
        ("audio/G722", 8_000, 0, "", 9),
        ("audio/PCMU", 8_000, 0, "", 0),
        ("audio/PCMA", 8_000, 0, "", 8),
    ];
    for (mime, clock_rate, channels, fmtp, payload_type) in audio {
        media_engine.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: mime.to_owned(),
                    clock_rate,
                    channels,
                    sdp_fmtp_line: fmtp.to_owned(),
                    rtcp_feedback: vec![],
                },
                payload_type,
            },
            RtpCodecKind::Audio,
        )?;
    }
    let feedback: Vec<RTCPFeedback> = [
        ("goog-remb", ""),
        ("ccm", "fir"),
        ("nack", ""),
        ("nack", "pli"),
    ]
    .into_iter()
    .map(|(typ, parameter)| RTCPFeedback {
        typ: typ.to_owned(),
        parameter: parameter.to_owned(),
    })
    .collect();
    let video: [(&str, &str, u8); 9] = [
        ("video/VP8", "", 96),
        ("video/VP9", "profile-id=0", 98),
        ("video/VP9", "profile-id=1", 100),
        (
            "video/H264",
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
            102,
        ),
        (
            "video/H264",
            "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f",
            127,
        ),
        (
            "video/H264",
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
            125,
        ),
        (
            "video/H264",
            "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42e01f",
            108,
        ),
        (
            "video/H264",
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640032",
            123,
        ),
        ("video/AV1", "profile-id=0", 41),
    ];
    for (mime, fmtp, payload_type) in video {
        media_engine.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: mime.to_owned(),
                    clock_rate: 90_000,
                    channels: 0,
                    sdp_fmtp_line: fmtp.to_owned(),
                    rtcp_feedback: feedback.clone(),
                },
                payload_type,
            },
            RtpCodecKind::Video,
        )?;
    }
    Ok(())
}

fn interceptors(
    role: PeerRole,
    media_engine: &mut MediaEngine,
    metrics: &Metrics,
) -> rtc::shared::error::Result<Registry> {
    for parameter in ["", "pli"] {
        media_engine.register_feedback(
            RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: parameter.to_owned(),
            },
            RtpCodecKind::Video,
        );
    }
    configure_simulcast_extension_headers(media_engine)?;
    let mut registry = Registry::new().with(
        Slot::from(3_500),
        SfuTap {
            metrics: metrics.clone(),
            read_queue: VecDeque::new(),
            write_queue: VecDeque::new(),
        },
    );
    // Each interceptor moves every packet through its own queue, so a connection gets only
    // the reports its direction has something to say in: receiver reports where media comes
    // in, sender reports (lip sync) where it goes out.
    match role {
        PeerRole::Publisher => {
            registry = registry.with(
                Slot::ReceiverReport,
                rtc::interceptor::ReceiverReportBuilder::new().build(),
            );
            // The NACK generator asks publishers for what the path lost. Its default has no
            // retry limit and sees RTX before it is unwrapped, so capped at two requests.
            registry = registry.with(
                Slot::NackGenerator,
                rtc::interceptor::NackGeneratorBuilder::new()
                    .with_max_nacks_per_packet(2)
                    .build(),
            );
            // Transport-wide feedback lets the browser's send-side estimator work.
            registry = configure_twcc_receiver_only(registry, media_engine)?;
        }
        PeerRole::Subscriber => {
            registry = registry.with(
                Slot::SenderReport,
                rtc::interceptor::SenderReportBuilder::new().build(),
            );
            // The NACK responder answers subscribers' NACKs from its cache of what we sent.
            registry = registry.with(
                Slot::NackResponder,
                rtc::interceptor::NackResponderBuilder::new()
                    .with_size(1024)
                    .build(),
            );
        }
    }
    Ok(registry)
}

/// An interceptor between the pacer and the NACK responder: it counts RTP in and out (so
/// retransmissions count as forwarded, as the metrics contract says), and it marks keyframe
/// requests and REMB for delivery to the application, which webrtc-rs otherwise keeps to
/// itself.
struct SfuTap {
    metrics: Metrics,
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

/// RTCP the application acts on: keyframe requests, and subscribers' bandwidth estimates.
fn is_for_application(packet: &dyn rtc::rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>()
        || any.is::<FullIntraRequest>()
        || any.is::<ReceiverEstimatedMaximumBitrate>()
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for SfuTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        match &msg.message.packet {
            Packet::Rtp(rtp) => {
                self.metrics.received_packets.inc();
                self.metrics
                    .received_bytes
                    .inc_by((rtp.header.marshal_size() + rtp.payload.len()) as u64);
            }
            Packet::Rtcp(packets) if packets.iter().any(|p| is_for_application(p.as_ref())) => {
                msg.message.add(Attribute::DeliverToApplication);
            }
            _ => {}
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(rtp) = &msg.message.packet {
            self.metrics.forwarded_packets.inc();
            self.metrics
                .forwarded_bytes
                .inc_by((rtp.header.marshal_size() + rtp.payload.len()) as u64);
        }
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for SfuTap {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// The media port range; each peer connection leases one port for all its addresses.
pub struct PortPool {
    free: Mutex<VecDeque<u16>>,
}

impl PortPool {
    /// A pool of the ports `min..=max`.
    pub fn new(min: u16, max: u16) -> Self {
        Self {
            free: Mutex::new((min..=max).collect()),
        }
    }

    /// Takes the least recently used free port.
    pub fn acquire(self: &Arc<Self>) -> Option<PortLease> {
        let port = self.free.lock().ok()?.pop_front()?;
        Some(PortLease {
            port,
            pool: Arc::clone(self),
        })
    }

    /// How many ports are free.
    pub fn available(&self) -> usize {
        self.free.lock().map(|f| f.len()).unwrap_or(0)
    }
}

/// A leased port; returned to the back of the pool on drop, so a just-closed socket's port is
/// the last to be reused.
pub struct PortLease {
    /// The port.
    pub port: u16,
    pool: Arc<PortPool>,
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.free.lock() {
            free.push_back(self.port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_leased_once_and_come_back_on_drop() {
        let pool = Arc::new(PortPool::new(40_000, 40_001));
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        assert_ne!(a.port, b.port);
        assert!(pool.acquire().is_none());
        drop(a);
        assert_eq!(pool.available(), 1);
        assert!(pool.acquire().is_some());
    }
}
