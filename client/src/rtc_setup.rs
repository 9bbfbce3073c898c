//! webrtc-rs 0.21 wiring shared by the headless peer and the tests: how a peer connection is
//! built (codecs, interceptors, loopback sockets, ICE/DTLS settings), the interceptor that hands
//! keyframe requests to the application, local tracks, and conversions between webrtc-rs ICE
//! candidates and the protocol's `RTCIceCandidateInit` JSON.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{
    Attribute, Interceptor, NackGeneratorBuilder, NackResponderBuilder, Packet, Registry, Slot,
    StreamInfo, TaggedPacket,
};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_rtcp_reports, configure_simulcast_extension_headers,
};
use rtc::peer_connection::configuration::media_engine::{
    MediaEngine, MIME_TYPE_OPUS, MIME_TYPE_VP8,
};
use rtc::peer_connection::transport::RTCDtlsRole;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::sdp::extmap::{AUDIO_LEVEL_URI, SDES_MID_URI, SDES_RTP_STREAM_ID_URI};
use signaling::protocol::{IceCandidate, IceServer, TrackKind};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceCandidateInit, RTCIceServer, SettingEngineBuilder,
};
use webrtc::rtp_transceiver::RtpSender;

use crate::Result;

/// Where [`KeyframeRequestMarker`] sits: application-most, after every built-in interceptor.
pub const KEYFRAME_MARKER_SLOT: usize = 14_000;

/// How to build a peer connection.
#[derive(Debug, Clone)]
pub struct PcOptions {
    /// Local UDP sockets to bind (one host candidate each).
    pub udp_addrs: Vec<String>,
    /// STUN/TURN servers (empty on loopback).
    pub ice_servers: Vec<IceServer>,
    /// Take the DTLS server role when answering (saves a 200 ms timer tick; see field notes).
    pub answering_dtls_server: bool,
    /// Simulated loss on this connection (tests of NACK repair); `None` on a real path.
    pub loss: Option<LossSimulation>,
}

/// Drops one in `one_in` RTP packets of NACK-capable streams, each only the first time it is
/// seen, in both directions: what a lossy path does, placed so that NACK can repair it (below
/// the NACK responder when sending, below the NACK generator when receiving).
#[derive(Debug, Clone)]
pub struct LossSimulation {
    /// One packet in this many is dropped.
    pub one_in: u64,
    /// How many were dropped, for the test to check that loss happened.
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl LossSimulation {
    /// Drops one packet in `one_in`.
    pub fn one_in(one_in: u64) -> Self {
        LossSimulation {
            one_in: one_in.max(2),
            dropped: Arc::default(),
        }
    }
}

impl Default for PcOptions {
    fn default() -> Self {
        PcOptions {
            udp_addrs: vec!["127.0.0.1:0".to_owned()],
            ice_servers: vec![],
            answering_dtls_server: true,
            loss: None,
        }
    }
}

/// The media engine (default codecs) and interceptor registry every headless connection uses:
/// NACK (generator capped at 2 NACKs per packet), RTCP reports, and [`KeyframeRequestMarker`];
/// header extensions mid, rid, repaired-rid and ssrc-audio-level.
pub fn media_engine_and_registry() -> Result<(MediaEngine, Registry)> {
    let mut media_engine = MediaEngine::default();
    media_engine.register_default_codecs()?;
    // `configure_nack`, but with a capped generator (the default one re-requests a lost packet
    // until the end of time). Default codecs already carry the nack/nack pli feedback.
    for parameter in ["", "pli"] {
        media_engine.register_feedback(
            RTCPFeedback {
                typ: "nack".to_owned(),
                parameter: parameter.to_owned(),
            },
            RtpCodecKind::Video,
        );
    }
    // Header extensions a browser offers too: mid (both kinds), rid/repaired-rid (video), and
    // the audio level the server may use for active speakers.
    configure_simulcast_extension_headers(&mut media_engine)?;
    for (uri, kind) in [
        (SDES_MID_URI, RtpCodecKind::Audio),
        (AUDIO_LEVEL_URI, RtpCodecKind::Audio),
    ] {
        media_engine.register_header_extension(
            RTCRtpHeaderExtensionCapability {
                uri: uri.to_owned(),
            },
            kind,
            None,
        )?;
    }
    let registry = Registry::new()
        .with(Slot::NackResponder, NackResponderBuilder::new().build())
        .with(
            Slot::NackGenerator,
            NackGeneratorBuilder::new()
                .with_max_nacks_per_packet(2)
                .build(),
        );
    let registry = configure_rtcp_reports(registry);
    let registry = registry.with(
        Slot::from(KEYFRAME_MARKER_SLOT),
        KeyframeRequestMarker::default(),
    );
    Ok((media_engine, registry))
}

/// Builds a peer connection with the headless defaults: loopback sockets, mDNS off,
/// peer-reflexive candidates accepted at once, default codecs, NACK, RTCP reports and
/// keyframe requests delivered to local tracks.
pub async fn build_peer_connection(
    options: &PcOptions,
    handler: Arc<dyn PeerConnectionEventHandler>,
) -> Result<Arc<dyn PeerConnection>> {
    let (media_engine, mut registry) = media_engine_and_registry()?;
    if let Some(loss) = &options.loss {
        registry = registry.with(Slot::from(LOSS_SLOT), LossInjector::new(loss.clone()));
    }
    let mut settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(MulticastDnsMode::Disabled)
        // `None` means 1000 ms here, not "immediately".
        .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
        .with_host_acceptance_min_wait(Some(Duration::ZERO))
        // Check every 20 ms instead of 200 ms (same 1.4 s budget): on loopback the first check
        // otherwise waits for the second 200 ms tick.
        .with_ice_connection_attempts(Some(Duration::from_millis(20)), Some(70));
    if options.answering_dtls_server {
        settings = settings.with_answering_dtls_role(RTCDtlsRole::Server);
    }
    let ice_servers = options
        .ice_servers
        .iter()
        .map(|s| RTCIceServer {
            urls: s.urls.clone(),
            username: s.username.clone().unwrap_or_default(),
            credential: s.credential.clone().unwrap_or_default(),
        })
        .collect();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(
            RTCConfigurationBuilder::new()
                .with_ice_servers(ice_servers)
                .build(),
        )
        .with_media_engine(media_engine)
        .with_interceptor_registry(registry)
        .with_setting_engine(settings.build())
        .with_handler(handler)
        .with_udp_addrs(options.udp_addrs.clone())
        .build()
        .await?;
    Ok(Arc::new(pc))
}

/// The codec a local track of `kind` is created with (as in the default media engine).
pub fn codec_for(kind: TrackKind) -> RTCRtpCodec {
    match kind {
        TrackKind::Video => RTCRtpCodec {
            mime_type: MIME_TYPE_VP8.to_owned(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![],
        },
        TrackKind::Audio => RTCRtpCodec {
            mime_type: MIME_TYPE_OPUS.to_owned(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
            rtcp_feedback: vec![],
        },
    }
}

/// A local RTP track of `kind` sending on `ssrc`, in media stream `stream_id`.
pub fn new_local_track(
    kind: TrackKind,
    stream_id: &str,
    track_id: &str,
    ssrc: u32,
) -> Arc<TrackLocalStaticRTP> {
    let rtp_kind = match kind {
        TrackKind::Audio => RtpCodecKind::Audio,
        TrackKind::Video => RtpCodecKind::Video,
    };
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        stream_id.to_owned(),
        track_id.to_owned(),
        format!("headless-{track_id}"),
        rtp_kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec: codec_for(kind),
            active: true,
            ..Default::default()
        }],
    )))
}

/// A local VP8 track sending one simulcast layer per `(rid, ssrc)`, in media stream
/// `stream_id`: its offer carries `a=rid:<rid> send` per layer and `a=simulcast:send`, and
/// every packet must carry the mid and rid header extensions (see
/// [`simulcast_extension_ids`]), because the SDP names no SSRCs.
pub fn new_simulcast_track(
    stream_id: &str,
    track_id: &str,
    layers: &[(String, u32)],
) -> Arc<TrackLocalStaticRTP> {
    let codings = layers
        .iter()
        .map(|(rid, ssrc)| RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                rid: rid.clone(),
                ssrc: Some(*ssrc),
                ..Default::default()
            },
            codec: codec_for(TrackKind::Video),
            active: true,
            ..Default::default()
        })
        .collect();
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        stream_id.to_owned(),
        track_id.to_owned(),
        format!("headless-{track_id}"),
        RtpCodecKind::Video,
        codings,
    )))
}

/// The negotiated ids of the mid and rid header extensions on `sender`, which a simulcast
/// receiver needs on every packet to tell the layers apart. `None` for one not negotiated.
pub async fn simulcast_extension_ids(sender: &Arc<dyn RtpSender>) -> (Option<u8>, Option<u8>) {
    let Ok(params) = sender.get_parameters().await else {
        return (None, None);
    };
    let id = |uri: &str| {
        params
            .rtp_parameters
            .header_extensions
            .iter()
            .find(|e| e.uri == uri)
            .map(|e| e.id as u8)
    };
    (id(SDES_MID_URI), id(SDES_RTP_STREAM_ID_URI))
}

/// The payload type negotiated for `sender`'s codec of `kind` (`write_rtp` drops packets with
/// any other).
pub async fn negotiated_payload_type(sender: &Arc<dyn RtpSender>, kind: TrackKind) -> Option<u8> {
    let mime = codec_for(kind).mime_type;
    let params = sender.get_parameters().await.ok()?;
    params
        .rtp_parameters
        .codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(&mime))
        .map(|c| c.payload_type)
}

/// Whether an RTCP packet asks for a keyframe (PLI or FIR).
pub fn is_keyframe_request(packet: &dyn rtc::rtcp::Packet) -> bool {
    let any = packet.as_any();
    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
}

/// The SSRCs an RTCP packet asks keyframes of: a PLI's media SSRC, a FIR's entries (empty for
/// anything else).
pub fn keyframe_request_ssrcs(packet: &dyn rtc::rtcp::Packet) -> Vec<u32> {
    let any = packet.as_any();
    if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
        vec![pli.media_ssrc]
    } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
        fir.fir.iter().map(|entry| entry.ssrc).collect()
    } else {
        Vec::new()
    }
}

/// Marks inbound RTCP compounds that contain a PLI or FIR with
/// `Attribute::DeliverToApplication`, so they reach the sending track as
/// `TrackLocalEvent::OnRtcpPacket`. Every packet passes on unchanged otherwise.
#[derive(Default)]
pub struct KeyframeRequestMarker {
    /// Inbound packets waiting for `poll_read`.
    read_queue: VecDeque<TaggedPacket>,
    /// Outbound packets waiting for `poll_write`.
    write_queue: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for KeyframeRequestMarker {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(packets) = &msg.message.packet {
            if packets.iter().any(|p| is_keyframe_request(p.as_ref())) {
                msg.message.add(Attribute::DeliverToApplication);
            }
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for KeyframeRequestMarker {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// Below the NACK responder (4000) on the way out, below the NACK generator (7000) on the way in.
const LOSS_SLOT: usize = 3_500;

/// See [`LossSimulation`].
struct LossInjector {
    loss: LossSimulation,
    /// SSRCs that negotiated NACK (video here); audio is not repaired, so not dropped.
    nack_ssrcs: std::collections::HashSet<u32>,
    /// (SSRC, sequence number) of every packet dropped once, to let its repair through.
    dropped: std::collections::HashSet<(u32, u16)>,
    seen: u64,
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl LossInjector {
    fn new(loss: LossSimulation) -> Self {
        LossInjector {
            loss,
            nack_ssrcs: Default::default(),
            dropped: Default::default(),
            seen: 0,
            read_queue: VecDeque::new(),
            write_queue: VecDeque::new(),
        }
    }

    /// Whether to lose this packet.
    fn lose(&mut self, msg: &TaggedPacket) -> bool {
        let Packet::Rtp(rtp) = &msg.message.packet else {
            return false;
        };
        let key = (rtp.header.ssrc, rtp.header.sequence_number);
        if !self.nack_ssrcs.contains(&key.0) || self.dropped.contains(&key) {
            return false;
        }
        self.seen += 1;
        if !self.seen.is_multiple_of(self.loss.one_in) {
            return false;
        }
        self.dropped.insert(key);
        self.loss
            .dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    fn note_stream(&mut self, info: &StreamInfo) {
        if info.rtcp_feedback.iter().any(|f| f.typ == "nack") {
            self.nack_ssrcs.insert(info.ssrc);
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for LossInjector {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if !self.lose(&msg) {
            self.read_queue.push_back(msg);
        }
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if !self.lose(&msg) {
            self.write_queue.push_back(msg);
        }
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for LossInjector {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        self.note_stream(info);
    }
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        self.note_stream(info);
    }
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// The first `a=mid:` and `a=ice-ufrag:` of an SDP, for labelling trickled candidates.
pub fn sdp_mid_and_ufrag(sdp: &str) -> (Option<String>, Option<String>) {
    let find = |prefix: &str| {
        sdp.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_owned()))
    };
    (find("a=mid:"), find("a=ice-ufrag:"))
}

/// A webrtc-rs local candidate as the protocol's JSON, labelled with the connection's first
/// mid and ufrag (webrtc-rs itself writes `sdpMid: ""`).
pub fn candidate_to_wire(
    init: RTCIceCandidateInit,
    mid: Option<String>,
    ufrag: Option<String>,
) -> IceCandidate {
    IceCandidate {
        candidate: init.candidate,
        sdp_mid: mid.or(init.sdp_mid.filter(|m| !m.is_empty())),
        sdp_mline_index: Some(0),
        username_fragment: ufrag.or(init.username_fragment),
    }
}

/// A protocol candidate as webrtc-rs wants it.
pub fn candidate_from_wire(c: &IceCandidate) -> RTCIceCandidateInit {
    RTCIceCandidateInit {
        candidate: c.candidate.clone(),
        sdp_mid: c.sdp_mid.clone(),
        sdp_mline_index: c.sdp_mline_index,
        username_fragment: c.username_fragment.clone(),
        url: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::payload_feedbacks::full_intra_request::FirEntry;

    #[test]
    fn keyframe_requests_name_their_ssrcs() {
        let pli = PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc: 42,
        };
        assert_eq!(keyframe_request_ssrcs(&pli), vec![42]);
        let fir = FullIntraRequest {
            sender_ssrc: 0,
            media_ssrc: 0,
            fir: vec![
                FirEntry {
                    ssrc: 7,
                    sequence_number: 1,
                },
                FirEntry {
                    ssrc: 9,
                    sequence_number: 1,
                },
            ],
        };
        assert_eq!(keyframe_request_ssrcs(&fir), vec![7, 9]);
        let receiver_report = rtc::rtcp::receiver_report::ReceiverReport::default();
        assert!(keyframe_request_ssrcs(&receiver_report).is_empty());
    }
}
