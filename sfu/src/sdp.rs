//! The little the SFU reads from SDP itself: each m-section's kind, mid, direction and
//! whether it sends simulcast. Applying SDP is webrtc-rs's job; this only decides which
//! m-sections of a publisher's offer are published tracks.

use crate::events::MediaKind;

/// What one m-section says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct MediaSection {
    pub(crate) kind: Option<MediaKind>,
    pub(crate) mid: Option<String>,
    pub(crate) port_zero: bool,
    /// `sendrecv` when absent, as RFC 3264 says.
    pub(crate) direction: Direction,
    pub(crate) simulcast: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Direction {
    #[default]
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl MediaSection {
    /// Whether the offerer sends media in this section (it is a published track).
    pub(crate) fn sends_media(&self) -> bool {
        !self.port_zero && matches!(self.direction, Direction::SendRecv | Direction::SendOnly)
    }
}

/// The m-sections of an SDP, in order.
pub(crate) fn media_sections(sdp: &str) -> Vec<MediaSection> {
    let mut sections = Vec::new();
    for line in sdp.lines().map(str::trim_end) {
        if let Some(media) = line.strip_prefix("m=") {
            let mut fields = media.split_whitespace();
            let kind = match fields.next() {
                Some("audio") => Some(MediaKind::Audio),
                Some("video") => Some(MediaKind::Video),
                _ => None,
            };
            let port_zero = fields.next() == Some("0");
            sections.push(MediaSection {
                kind,
                port_zero,
                ..Default::default()
            });
            continue;
        }
        let Some(section) = sections.last_mut() else {
            continue;
        };
        let Some(attribute) = line.strip_prefix("a=") else {
            continue;
        };
        match attribute {
            "sendrecv" => section.direction = Direction::SendRecv,
            "sendonly" => section.direction = Direction::SendOnly,
            "recvonly" => section.direction = Direction::RecvOnly,
            "inactive" => section.direction = Direction::Inactive,
            _ => {
                if let Some(mid) = attribute.strip_prefix("mid:") {
                    section.mid = Some(mid.trim().to_owned());
                } else if let Some(simulcast) = attribute.strip_prefix("simulcast:") {
                    section.simulcast = simulcast.trim_start().starts_with("send");
                }
            }
        }
    }
    sections
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_sections_are_the_sending_ones() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendonly\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendrecv\r\n\
                   a=simulcast:send f;h;q\r\n\
                   m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=sendonly\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:3\r\na=inactive\r\n\
                   m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:4\r\n";
        let sections = media_sections(sdp);
        assert_eq!(sections.len(), 5);
        let sending: Vec<_> = sections.iter().filter(|s| s.sends_media()).collect();
        assert_eq!(
            sending.len(),
            3,
            "audio, simulcast video and the data section"
        );
        assert_eq!(sending[0].kind, Some(MediaKind::Audio));
        assert!(sending[1].simulcast);
        assert_eq!(sending[1].mid.as_deref(), Some("1"));
        assert_eq!(sending[2].kind, None, "application sections are not tracks");
    }
}
