//! How the SFU's peer connections are built (codecs, interceptors, ICE credentials and
//! settings, host candidates) and how the media loops' sockets are bound (addresses, port
//! range). Everything rtc-specific about creating a connection lives here; driving it is
//! `media_loop`'s job.

use crate::metrics::Metrics;
use rtc::interceptor::{Attribute, Interceptor, Packet, Registry, Slot, StreamInfo, TaggedPacket};
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_simulcast_extension_headers, configure_twcc_receiver_only,
};
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::shared::marshal::MarshalSize;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// RFC 6464 audio level: kept on forwarded audio so receivers (and the SFU's active-speaker
/// detection) see who is talking.
pub const AUDIO_LEVEL_URI: &str = "urn:ietf:params:rtp-hdrext:ssrc-audio-level";

/// Where the media plane binds, what it advertises, and how it adapts media.
#[derive(Debug, Clone)]
pub struct MediaConfig {
    /// Addresses bound for media and advertised as host candidates.
    pub ice_ips: Vec<IpAddr>,
    /// Inclusive UDP port range for media: each media thread takes one port (for all of
    /// `ice_ips`) when its first connection opens; `None` lets the OS pick.
    pub udp_ports: Option<(u16, u16)>,
    /// Whether subscribers' bandwidth estimates (REMB) cap the simulcast layers they get.
    /// Off, layers follow only what each subscriber asks for (`set_quality`).
    pub bandwidth_adaptation: bool,
}

/// Errors building a peer connection.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Every port of the configured range is in use (each media thread takes one).
    #[error("no free UDP port left in the media port range")]
    NoFreePort,
    /// rtc refused the configuration, or a media socket could not be bound.
    #[error("peer connection setup failed: {0}")]
    Setup(String),
}

/// Builds the SFU's peer connections and binds the media loops' sockets.
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

/// A connection's ICE username fragment and password. The media loop picks them, unique
/// among its connections, so that a STUN check arriving from a new address names the
/// connection it is for.
pub(crate) struct IceCredentials {
    pub(crate) ufrag: String,
    pub(crate) password: String,
}

impl IceCredentials {
    /// Fresh random credentials (RFC 8839 asks for at least 24 bits of randomness in the
    /// ufrag and 128 in the password; these carry about 95 and 190).
    pub(crate) fn random() -> Self {
        use rand::Rng;
        let text = |len: usize| -> String {
            rand::rng()
                .sample_iter(&rand::distr::Alphanumeric)
                .take(len)
                .map(char::from)
                .collect()
        };
        Self {
            ufrag: text(16),
            password: text(32),
        }
    }
}

/// Receive and send buffer asked for on each media socket: one socket carries every
/// connection of a media thread, and a burst of handshakes or a keyframe fanned out to
/// hundreds of subscribers must not overflow it (docs/sans-io.md). The kernel caps it at
/// `net.core.rmem_max` / `wmem_max`.
const MEDIA_SOCKET_BUFFER: usize = 16 << 20;

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

    /// Whether subscribers' bandwidth estimates cap their simulcast layers.
    pub fn bandwidth_adaptation(&self) -> bool {
        self.config.bandwidth_adaptation
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Binds one media loop's sockets: one per advertised address, all on the same port (from
    /// the configured range, else any free one), non-blocking.
    pub(crate) fn bind_media_sockets(
        &self,
    ) -> Result<(Vec<std::net::UdpSocket>, Option<PortLease>), TransportError> {
        if self.config.ice_ips.is_empty() {
            return Err(TransportError::Setup("no address to bind media to".into()));
        }
        // A port may be taken by another process: try others before giving up.
        let attempts = self
            .ports
            .as_ref()
            .map_or(8, |pool| pool.available().max(1));
        let mut last_error = TransportError::NoFreePort;
        for _ in 0..attempts {
            let lease = match &self.ports {
                Some(pool) => Some(pool.acquire().ok_or(TransportError::NoFreePort)?),
                None => None,
            };
            let mut port = lease.as_ref().map_or(0, |l| l.port);
            let mut sockets = Vec::with_capacity(self.config.ice_ips.len());
            let mut failed = None;
            for ip in &self.config.ice_ips {
                match bind_media_socket(SocketAddr::new(*ip, port)) {
                    Ok(socket) => {
                        if port == 0 {
                            port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
                        }
                        sockets.push(socket);
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None => return Ok((sockets, lease)),
                Some(e) => {
                    last_error = TransportError::Setup(format!("media port {port} not bound: {e}"));
                }
            }
        }
        Err(last_error)
    }

    /// Builds a connection whose host candidates are the media loop's socket addresses.
    pub(crate) fn build(
        &self,
        role: PeerRole,
        credentials: IceCredentials,
        local_addrs: &[SocketAddr],
        now: Instant,
    ) -> Result<RTCPeerConnection, TransportError> {
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

        let setting_engine = SettingEngineBuilder::new()
            .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
            .with_ice_credentials(credentials.ufrag, credentials.password)
            // Accept peer-reflexive pairs at once: a browser hiding behind an mDNS name (or
            // any client whose checks beat its trickled candidate) would otherwise wait 1 s.
            .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
            .with_host_acceptance_min_wait(Some(Duration::ZERO))
            // As DTLS server when answering, the handshake starts on the client's first
            // flight instead of waiting for our next timer tick.
            .with_answering_dtls_role(rtc::peer_connection::transport::RTCDtlsRole::Server)
            // The default 200 ms check tick delays the first check and the DTLS hello; 20 ms
            // with the same overall budget connects in tens of milliseconds.
            .with_ice_connection_attempts(Some(Duration::from_millis(20)), Some(70))
            .build();
        let configuration = RTCConfigurationBuilder::new().build();
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(configuration)
            .with_media_engine(media_engine)
            .with_setting_engine(setting_engine)
            .with_interceptor_registry(registry)
            .build(now)
            .map_err(setup)?;
        for addr in local_addrs {
            let candidate = CandidateHostConfig {
                base_config: CandidateConfig {
                    network: "udp".to_owned(),
                    address: addr.ip().to_string(),
                    port: addr.port(),
                    component: 1,
                    ..Default::default()
                },
                ..Default::default()
            }
            .new_candidate_host()
            .map_err(setup)?;
            let init = RTCIceCandidate::from(&candidate).to_json().map_err(setup)?;
            pc.add_local_candidate(init).map_err(setup)?;
        }
        Ok(pc)
    }
}

fn bind_media_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Best effort: the kernel caps these, and a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(MEDIA_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(MEDIA_SOCKET_BUFFER);
    // Without kernel arrival times the read instant stands in (see `arrival`).
    if let Err(e) = crate::arrival::enable(&socket) {
        tracing::warn!(error = %e, "media socket without kernel arrival times");
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
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
            unreported: (role == PeerRole::Publisher).then(UnreportedLayers::default),
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
/// retransmissions count as forwarded, as the metrics contract says), it marks keyframe
/// requests and REMB for delivery to the application, which webrtc-rs otherwise keeps to
/// itself, and on a publisher connection it keeps simulcast layers out of receiver reports
/// (it sits wire-ward of the report generator, so it sees every report on its way out).
struct SfuTap {
    metrics: Metrics,
    /// Publisher connections only: see `UnreportedLayers`.
    unreported: Option<UnreportedLayers>,
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

/// Keeps a publisher's simulcast layers naming themselves, so that a renegotiation does not
/// freeze them.
///
/// webrtc-rs 0.21.1 knows which layer an SSRC carries only from the mid and rid header
/// extensions on its packets, and forgets what it learned whenever the publisher renegotiates
/// (a screen share starting or stopping): every receiver is rebuilt from the new offer with
/// its layers' SSRCs unknown. libwebrtc, for its part, puts those extensions on a stream's
/// packets only until it receives an RTCP report block about that SSRC
/// (`RTPSender::OnReceivedAckOnSsrc`). Reported on, a layer's packets carry no rid by the
/// time of the renegotiation and webrtc-rs drops them all. So the SFU never reports on an SSRC
/// that it has seen carrying a rid: the browser keeps sending the extensions (about 4 bytes a
/// packet) and webrtc-rs learns each layer again from its first packet after a renegotiation.
/// What the browser goes without is the receiver's view of those layers (loss, jitter and
/// round-trip time in its `remote-inbound-rtp` stats); its bandwidth estimate runs on
/// transport-wide feedback, which is unaffected.
#[derive(Debug, Default)]
struct UnreportedLayers {
    /// The rid extension's id on each bound remote stream that negotiated it.
    rid_extension: HashMap<u32, u8>,
    /// SSRCs seen carrying a rid: no report block names them.
    layers: HashSet<u32>,
}

/// The RTP header extension that names a simulcast layer (RFC 8852).
const RID_URI: &str = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id";

impl UnreportedLayers {
    /// webrtc-rs bound a stream; it does so before the chain sees the stream's first packet.
    fn bind(&mut self, info: &StreamInfo) {
        let rid = info.rtp_header_extensions.iter().find(|e| e.uri == RID_URI);
        if let Some(id) = rid.and_then(|e| u8::try_from(e.id).ok()) {
            self.rid_extension.insert(info.ssrc, id);
        }
    }

    fn unbind(&mut self, info: &StreamInfo) {
        self.rid_extension.remove(&info.ssrc);
        self.layers.remove(&info.ssrc);
    }

    /// An incoming packet: a rid on it makes its SSRC a layer.
    fn observe(&mut self, header: &rtc::rtp::header::Header) {
        if self.layers.contains(&header.ssrc) {
            return;
        }
        let Some(&id) = self.rid_extension.get(&header.ssrc) else {
            return;
        };
        if header.get_extension(id).is_some_and(|rid| !rid.is_empty()) {
            self.layers.insert(header.ssrc);
        }
    }

    /// `packets` without report blocks about a layer; a receiver report left with none goes.
    /// The caller drops a compound left empty; one it was given empty (an attribute carrier)
    /// passes through unchanged.
    fn strip(&self, packets: Vec<Box<dyn rtc::rtcp::Packet>>) -> Vec<Box<dyn rtc::rtcp::Packet>> {
        if self.layers.is_empty() {
            return packets;
        }
        packets
            .into_iter()
            .filter_map(|packet| {
                let Some(report) = packet.as_any().downcast_ref::<ReceiverReport>() else {
                    return Some(packet);
                };
                if !report.reports.iter().any(|r| self.layers.contains(&r.ssrc)) {
                    return Some(packet);
                }
                let mut report = report.clone();
                report.reports.retain(|r| !self.layers.contains(&r.ssrc));
                (!report.reports.is_empty()).then(|| Box::new(report) as Box<dyn rtc::rtcp::Packet>)
            })
            .collect()
    }
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
                if let Some(unreported) = &mut self.unreported {
                    unreported.observe(&rtp.header);
                }
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

    fn handle_write(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        match &mut msg.message.packet {
            Packet::Rtp(rtp) => {
                self.metrics.forwarded_packets.inc();
                self.metrics
                    .forwarded_bytes
                    .inc_by((rtp.header.marshal_size() + rtp.payload.len()) as u64);
            }
            Packet::Rtcp(packets) => {
                if let Some(unreported) = &self.unreported {
                    let had_packets = !packets.is_empty();
                    *packets = unreported.strip(std::mem::take(packets));
                    if had_packets && packets.is_empty() {
                        // Only layer reports were in it: nothing is left to send (passed on
                        // empty, the SRTP handler drops it with a warning, once a second per
                        // layer).
                        return Ok(());
                    }
                }
            }
            _ => {}
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
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        if let Some(unreported) = &mut self.unreported {
            unreported.bind(info);
        }
    }
    fn unbind_remote_stream(&mut self, info: &StreamInfo) {
        if let Some(unreported) = &mut self.unreported {
            unreported.unbind(info);
        }
    }
}

/// The media port range; each media loop leases one port for all its addresses.
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
    use bytes::Bytes;
    use rtc::interceptor::RTPHeaderExtension;
    use rtc::rtcp::reception_report::ReceptionReport;
    use rtc::rtp::header::{Extension, Header};

    const RID_ID: u8 = 10;

    /// A remote video stream as webrtc-rs binds it: with the rid extension negotiated.
    fn video_stream(ssrc: u32) -> StreamInfo {
        StreamInfo {
            ssrc,
            rtp_header_extensions: vec![
                RTPHeaderExtension {
                    uri: "urn:ietf:params:rtp-hdrext:sdes:mid".to_owned(),
                    id: 9,
                },
                RTPHeaderExtension {
                    uri: RID_URI.to_owned(),
                    id: u16::from(RID_ID),
                },
            ],
            ..Default::default()
        }
    }

    fn packet(ssrc: u32, rid: Option<&'static str>) -> Header {
        let extensions: Vec<Extension> = rid
            .map(|rid| Extension {
                id: RID_ID,
                payload: Bytes::from_static(rid.as_bytes()),
            })
            .into_iter()
            .collect();
        Header {
            version: 2,
            ssrc,
            extension: !extensions.is_empty(),
            extension_profile: if extensions.is_empty() { 0 } else { 0xBEDE },
            extensions,
            ..Default::default()
        }
    }

    /// One receiver report naming `ssrcs`, as the report interceptor would send it.
    fn report(ssrcs: &[u32]) -> Vec<Box<dyn rtc::rtcp::Packet>> {
        vec![Box::new(ReceiverReport {
            ssrc: 1,
            reports: ssrcs
                .iter()
                .map(|&ssrc| ReceptionReport {
                    ssrc,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })]
    }

    fn reported_ssrcs(packets: &[Box<dyn rtc::rtcp::Packet>]) -> Vec<u32> {
        packets
            .iter()
            .flat_map(|p| p.as_any().downcast_ref::<ReceiverReport>())
            .flat_map(|rr| rr.reports.iter().map(|r| r.ssrc))
            .collect()
    }

    #[test]
    fn simulcast_layers_are_never_reported_other_streams_are() {
        let mut unreported = UnreportedLayers::default();
        for ssrc in [100, 200, 300] {
            unreported.bind(&video_stream(ssrc));
        }
        unreported.observe(&packet(100, Some("q")));
        unreported.observe(&packet(200, Some("f")));
        // A plain stream: the extension is negotiated but its packets carry no rid.
        unreported.observe(&packet(300, None));

        assert!(reported_ssrcs(&unreported.strip(report(&[100]))).is_empty());
        assert_eq!(
            reported_ssrcs(&unreported.strip(report(&[100, 300, 200]))),
            vec![300]
        );
        assert_eq!(reported_ssrcs(&unreported.strip(report(&[300]))), vec![300]);
    }

    #[test]
    fn a_layer_stays_unreported_once_its_packets_stop_naming_it() {
        let mut unreported = UnreportedLayers::default();
        unreported.bind(&video_stream(100));
        unreported.observe(&packet(100, Some("h")));
        unreported.observe(&packet(100, None));
        assert!(unreported.strip(report(&[100])).is_empty());
    }

    #[test]
    fn other_rtcp_and_attribute_carriers_pass_unchanged() {
        let mut unreported = UnreportedLayers::default();
        unreported.bind(&video_stream(100));
        unreported.observe(&packet(100, Some("q")));
        let pli: Vec<Box<dyn rtc::rtcp::Packet>> = vec![Box::new(PictureLossIndication {
            sender_ssrc: 1,
            media_ssrc: 100,
        })];
        let kept = unreported.strip(pli);
        assert_eq!(kept.len(), 1);
        assert!(kept[0].as_any().is::<PictureLossIndication>());
        assert!(unreported.strip(Vec::new()).is_empty());
    }

    #[test]
    fn a_rid_on_an_unbound_or_unbound_again_stream_is_not_remembered() {
        let mut unreported = UnreportedLayers::default();
        unreported.observe(&packet(100, Some("q")));
        assert_eq!(reported_ssrcs(&unreported.strip(report(&[100]))), vec![100]);

        unreported.bind(&video_stream(100));
        unreported.observe(&packet(100, Some("q")));
        unreported.unbind(&video_stream(100));
        assert_eq!(reported_ssrcs(&unreported.strip(report(&[100]))), vec![100]);
    }

    /// What a publisher connection's tap lets through of `packets` on their way out.
    fn written_by_publisher_tap(
        tap: &mut SfuTap,
        packets: Vec<Box<dyn rtc::rtcp::Packet>>,
    ) -> Option<Vec<u32>> {
        tap.handle_write(TaggedPacket {
            now: Instant::now(),
            transport: Default::default(),
            message: Packet::Rtcp(packets).into(),
        })
        .unwrap();
        tap.poll_write().map(|out| match out.message.packet {
            Packet::Rtcp(packets) => reported_ssrcs(&packets),
            _ => panic!("RTCP in, something else out"),
        })
    }

    #[test]
    fn a_report_about_layers_only_is_not_sent_at_all() {
        let mut unreported = UnreportedLayers::default();
        unreported.bind(&video_stream(100));
        unreported.observe(&packet(100, Some("q")));
        let mut tap = SfuTap {
            metrics: Metrics::new(&prometheus::Registry::new()).unwrap(),
            unreported: Some(unreported),
            read_queue: VecDeque::new(),
            write_queue: VecDeque::new(),
        };
        assert_eq!(written_by_publisher_tap(&mut tap, report(&[100])), None);
        assert_eq!(
            written_by_publisher_tap(&mut tap, report(&[100, 300])),
            Some(vec![300])
        );
        // An empty compound it was given (an attribute carrier) passes on.
        assert_eq!(written_by_publisher_tap(&mut tap, Vec::new()), Some(vec![]));
    }

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
