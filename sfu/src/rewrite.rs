//! Per-subscriber RTP header rewriting: the publisher's SSRC, payload type and header
//! extension ids mean nothing on the subscriber's connection, so each forwarded header is
//! rebuilt with the values that connection negotiated (webrtc-rs rejects anything else).

use crate::transport::AUDIO_LEVEL_URI;
use rtc::rtp::header::{Extension, Header};

/// Header extensions worth carrying from publisher to subscriber. Transport-level ones
/// (transport-cc, abs-send-time, mid, rid) describe the publisher's hop and are not forwarded.
const FORWARDED_EXTENSIONS: [&str; 3] = [
    AUDIO_LEVEL_URI,
    "urn:3gpp:video-orientation",
    "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay",
];

const ONE_BYTE_PROFILE: u16 = 0xBEDE;
const TWO_BYTE_PROFILE: u16 = 0x1000;

/// What one subscriber's connection negotiated for one forwarded track.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The SSRC the subscriber knows this track by.
    pub ssrc: u32,
    /// The payload type negotiated for the track's codec.
    pub payload_type: u8,
    /// Publisher extension id → subscriber extension id (0: not forwarded).
    extension_ids: [u8; 256],
}

impl Binding {
    /// Builds the binding from both sides' negotiated extensions `(id, uri)`.
    pub fn new<'a>(
        ssrc: u32,
        payload_type: u8,
        publisher_extensions: impl IntoIterator<Item = (u16, &'a str)>,
        subscriber_extensions: &[(u16, &str)],
    ) -> Self {
        let mut extension_ids = [0u8; 256];
        for (src_id, uri) in publisher_extensions {
            if !FORWARDED_EXTENSIONS.contains(&uri) {
                continue;
            }
            let dst = subscriber_extensions.iter().find(|(_, u)| *u == uri);
            if let (Ok(src), Some(&(dst_id, _))) = (u8::try_from(src_id), dst) {
                extension_ids[src as usize] = u8::try_from(dst_id).unwrap_or(0);
            }
        }
        Self {
            ssrc,
            payload_type,
            extension_ids,
        }
    }

    /// The header to send: the source header with this subscriber's values.
    pub fn rewrite(&self, source: &Header, seq: u16, timestamp: u32) -> Header {
        let mut extensions = Vec::new();
        let mut needs_two_byte = false;
        for ext in &source.extensions {
            let dst = self.extension_ids[ext.id as usize];
            if dst != 0 {
                needs_two_byte |= dst > 14 || ext.payload.len() > 16 || ext.payload.is_empty();
                extensions.push(Extension {
                    id: dst,
                    payload: ext.payload.clone(),
                });
            }
        }
        Header {
            version: 2,
            padding: false,
            extension: !extensions.is_empty(),
            marker: source.marker,
            payload_type: self.payload_type,
            sequence_number: seq,
            timestamp,
            ssrc: self.ssrc,
            csrc: source.csrc.clone(),
            extension_profile: if extensions.is_empty() {
                0
            } else if needs_two_byte {
                TWO_BYTE_PROFILE
            } else {
                ONE_BYTE_PROFILE
            },
            extensions,
            extensions_padding: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn ids_payload_type_and_ssrc_follow_the_subscriber() {
        let binding = Binding::new(
            0xabcd,
            111,
            [
                (1, AUDIO_LEVEL_URI),
                (
                    3,
                    "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
                ),
            ],
            &[
                (5, AUDIO_LEVEL_URI),
                (2, "urn:ietf:params:rtp-hdrext:sdes:mid"),
            ],
        );
        let source = Header {
            version: 2,
            extension: true,
            marker: true,
            payload_type: 109,
            sequence_number: 7,
            timestamp: 99,
            ssrc: 1234,
            extension_profile: ONE_BYTE_PROFILE,
            extensions: vec![
                Extension {
                    id: 1,
                    payload: Bytes::from_static(&[0x85]),
                },
                Extension {
                    id: 3,
                    payload: Bytes::from_static(&[0, 1]),
                },
            ],
            ..Default::default()
        };
        let out = binding.rewrite(&source, 1000, 5000);
        assert_eq!(out.ssrc, 0xabcd);
        assert_eq!(out.payload_type, 111);
        assert_eq!((out.sequence_number, out.timestamp), (1000, 5000));
        assert!(out.marker);
        assert_eq!(out.extensions.len(), 1, "transport-cc is hop-by-hop");
        assert_eq!(out.extensions[0].id, 5);
        assert_eq!(out.extensions[0].payload.as_ref(), &[0x85]);
        assert_eq!(out.extension_profile, ONE_BYTE_PROFILE);
    }

    #[test]
    fn no_extensions_means_no_extension_block() {
        let binding = Binding::new(1, 96, [], &[]);
        let source = Header {
            extension: true,
            extension_profile: ONE_BYTE_PROFILE,
            extensions: vec![Extension {
                id: 4,
                payload: Bytes::from_static(b"0"),
            }],
            ..Default::default()
        };
        let out = binding.rewrite(&source, 1, 1);
        assert!(!out.extension);
        assert!(out.extensions.is_empty());
    }
}
