//! The signaling wire format of `shared/protocol.md`: every client and server message as a
//! serde type, and the parser that applies the contract's error order (`bad_json`, then
//! `bad_request` for a missing `type`, then `unknown_type`, then the session's `not_joined`,
//! then the message's own fields). Both the server and the headless clients use these types,
//! so the two can never drift apart.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which of a participant's two peer connections a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PcName {
    /// Client → server media; the client always offers.
    Publisher,
    /// Server → client media; the server always offers.
    Subscriber,
}

impl PcName {
    /// The wire spelling, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PcName::Publisher => "publisher",
            PcName::Subscriber => "subscriber",
        }
    }
}

/// The W3C `RTCIceCandidateInit` dictionary, verbatim, so a browser can send
/// `event.candidate.toJSON()` as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceCandidate {
    /// The `candidate:` attribute line (may be empty: end of candidates for that generation).
    pub candidate: String,
    /// The mid of the m-section; any mid of the connection is accepted (everything is bundled).
    #[serde(rename = "sdpMid", default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    /// The index of the m-section.
    #[serde(
        rename = "sdpMLineIndex",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sdp_mline_index: Option<u16>,
    /// The ICE ufrag this candidate belongs to.
    #[serde(
        rename = "usernameFragment",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub username_fragment: Option<String>,
}

/// The layer a subscriber wants of a simulcast track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    /// The smallest layer.
    Low,
    /// The middle layer (with two layers, the same as `low`).
    Medium,
    /// The largest layer (the default).
    High,
}

/// A message from a client to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// Enter a room; must be the first message, once.
    Join {
        /// 1–64 characters, each a letter, digit, `_` or `-`.
        room: String,
        /// 1–64 characters.
        name: String,
        /// Optional credential, required when the server has an auth secret.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// A publisher offer (pc is always `publisher`).
    Offer {
        /// Always `publisher`.
        pc: PcName,
        /// The SDP text.
        sdp: String,
    },
    /// The answer to the server's latest subscriber offer (pc is always `subscriber`).
    Answer {
        /// Always `subscriber`.
        pc: PcName,
        /// The SDP text.
        sdp: String,
    },
    /// A trickled ICE candidate, or `null` for end of candidates.
    Candidate {
        /// Which connection it belongs to.
        pc: PcName,
        /// `None` on the wire is `null`: end of candidates.
        candidate: Option<IceCandidate>,
    },
    /// Stop or resume forwarding one of the sender's own tracks.
    Mute {
        /// A track the sender published.
        track_id: String,
        /// The new state.
        muted: bool,
    },
    /// A chat line for the whole room.
    Chat {
        /// 1–4096 characters.
        text: String,
    },
    /// The highest simulcast layer this subscriber wants of a track.
    SetQuality {
        /// A track forwarded to the sender.
        track_id: String,
        /// The wanted layer.
        quality: Quality,
    },
    /// Leave the room; the server closes both peer connections.
    Leave,
}

/// The `type` of a client message, known before its fields are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientMessageType {
    /// `join`
    Join,
    /// `offer`
    Offer,
    /// `answer`
    Answer,
    /// `candidate`
    Candidate,
    /// `mute`
    Mute,
    /// `chat`
    Chat,
    /// `set_quality`
    SetQuality,
    /// `leave`
    Leave,
}

impl ClientMessageType {
    fn from_wire(name: &str) -> Option<Self> {
        Some(match name {
            "join" => Self::Join,
            "offer" => Self::Offer,
            "answer" => Self::Answer,
            "candidate" => Self::Candidate,
            "mute" => Self::Mute,
            "chat" => Self::Chat,
            "set_quality" => Self::SetQuality,
            "leave" => Self::Leave,
            _ => return None,
        })
    }
}

/// A message from the server to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// The reply to `join`.
    Joined {
        /// The id the server gave the joiner.
        participant_id: String,
        /// The room joined.
        room: String,
        /// Everyone else already in the room, with their tracks.
        participants: Vec<Participant>,
        /// ICE servers the client should use.
        ice_servers: Vec<IceServer>,
    },
    /// Someone entered the room.
    ParticipantJoined {
        /// Who.
        participant: Participant,
    },
    /// Someone left the room (after `track_unpublished` for each of its tracks).
    ParticipantLeft {
        /// Who.
        participant_id: String,
    },
    /// A track is available (or, for the publisher itself, was assigned an id).
    TrackPublished {
        /// The publisher.
        participant_id: String,
        /// The track.
        track: Track,
    },
    /// A track is gone.
    TrackUnpublished {
        /// The publisher.
        participant_id: String,
        /// The track.
        track_id: String,
    },
    /// A publisher muted or unmuted a track.
    TrackMuted {
        /// The publisher.
        participant_id: String,
        /// The track.
        track_id: String,
        /// The new state.
        muted: bool,
    },
    /// A subscriber offer (pc is always `subscriber`).
    Offer {
        /// Always `subscriber`.
        pc: PcName,
        /// The SDP text.
        sdp: String,
    },
    /// The answer to a publisher offer (pc is always `publisher`).
    Answer {
        /// Always `publisher`.
        pc: PcName,
        /// The SDP text.
        sdp: String,
    },
    /// A server ICE candidate (`None`: end of candidates).
    Candidate {
        /// Which connection.
        pc: PcName,
        /// The candidate.
        candidate: Option<IceCandidate>,
    },
    /// A chat line.
    Chat {
        /// The sender.
        participant_id: String,
        /// The sender's name.
        name: String,
        /// The text.
        text: String,
        /// Unix milliseconds when the server received it.
        ts: u64,
    },
    /// Who is speaking, loudest first.
    ActiveSpeakers {
        /// Participant ids.
        participant_ids: Vec<String>,
    },
    /// Something the client sent was wrong, or the server refused it.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// What was wrong and what to do.
        message: String,
    },
}

/// A participant as others see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Participant {
    /// Server-assigned id.
    pub participant_id: String,
    /// Display name.
    pub name: String,
    /// Its published tracks.
    pub tracks: Vec<Track>,
}

/// A published track.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Track {
    /// Server-assigned id.
    pub track_id: String,
    /// `audio` or `video`.
    pub kind: TrackKind,
    /// Whether the publisher muted it.
    pub muted: bool,
    /// Whether it has several simulcast layers.
    pub simulcast: bool,
    /// Only to the publisher itself: the mid of its transceiver carrying the track.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mid: Option<String>,
}

/// Media kind of a track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackKind {
    /// Audio.
    Audio,
    /// Video.
    Video,
}

/// A W3C `RTCIceServer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// STUN or TURN URLs.
    pub urls: Vec<String>,
    /// TURN user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// The contract's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The text is not JSON.
    BadJson,
    /// A field is missing or invalid, or the frame is binary.
    BadRequest,
    /// The `type` is not one the server knows.
    UnknownType,
    /// Anything but `join` before joining.
    NotJoined,
    /// A second `join`.
    AlreadyJoined,
    /// SDP that could not be applied.
    InvalidSdp,
    /// The token is missing, invalid or expired (the socket closes).
    Unauthorized,
    /// The room or server is at its participant limit (the socket closes).
    RoomFull,
    /// A frame larger than the limit (the socket closes).
    TooLarge,
    /// Too many messages per second.
    RateLimited,
    /// The server failed; the message says whether to retry.
    Internal,
}

impl ErrorCode {
    /// Every code, for pre-registering metric labels.
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::BadJson,
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::NotJoined,
        ErrorCode::AlreadyJoined,
        ErrorCode::InvalidSdp,
        ErrorCode::Unauthorized,
        ErrorCode::RoomFull,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::Internal,
    ];

    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::InvalidSdp => "invalid_sdp",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
        }
    }

    /// After these the server closes the socket.
    pub fn closes_socket(self) -> bool {
        matches!(
            self,
            ErrorCode::Unauthorized | ErrorCode::RoomFull | ErrorCode::TooLarge
        )
    }
}

/// A protocol error: the code and the human-readable message sent with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    /// The contract's code.
    pub code: ErrorCode,
    /// What was wrong and what to do.
    pub message: String,
}

impl ProtocolError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    /// The `error` message to send.
    pub fn to_message(&self) -> ServerMessage {
        ServerMessage::Error {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ProtocolError {}

/// A client frame whose JSON and `type` are valid, but whose fields are not checked yet, so the
/// session can apply `not_joined` before `bad_request` as the contract orders.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The message type.
    pub kind: ClientMessageType,
    value: Value,
}

/// Longest room name, in characters.
pub const MAX_ROOM_CHARS: usize = 64;
/// Longest participant name, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Longest chat line, in characters.
pub const MAX_CHAT_CHARS: usize = 4096;
/// Longest track id the server ever assigns; longer ones cannot be ours.
const MAX_TRACK_ID_CHARS: usize = 128;

/// First stage of parsing: JSON, an object, a string `type`, a known type.
pub fn parse_envelope(text: &str) -> Result<Envelope, ProtocolError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        ProtocolError::new(
            ErrorCode::BadJson,
            format!("the frame is not valid JSON ({e}); send one JSON object per text frame"),
        )
    })?;
    let Some(object) = value.as_object() else {
        return Err(ProtocolError::bad_request(
            "a message must be a JSON object with a string \"type\" field",
        ));
    };
    let Some(type_name) = object.get("type").and_then(Value::as_str) else {
        return Err(ProtocolError::bad_request(
            "the message has no string \"type\" field",
        ));
    };
    let Some(kind) = ClientMessageType::from_wire(type_name) else {
        return Err(ProtocolError::new(
            ErrorCode::UnknownType,
            format!(
                "unknown message type {:?}; expected one of join, offer, answer, candidate, \
                 mute, chat, set_quality, leave",
                truncate_for_message(type_name)
            ),
        ));
    };
    Ok(Envelope { kind, value })
}

impl Envelope {
    /// Second stage: the message's own fields, validated against the contract.
    pub fn into_message(self) -> Result<ClientMessage, ProtocolError> {
        let kind = self.kind;
        if kind == ClientMessageType::Candidate
            && self
                .value
                .as_object()
                .is_some_and(|o| !o.contains_key("candidate"))
        {
            return Err(ProtocolError::bad_request(
                "candidate needs a \"candidate\" field: an RTCIceCandidateInit object, or null \
                 for end of candidates",
            ));
        }
        let message: ClientMessage = serde_json::from_value(self.value).map_err(|e| {
            ProtocolError::bad_request(format!("invalid {} message: {e}", kind_name(kind)))
        })?;
        validate(&message)?;
        Ok(message)
    }
}

fn kind_name(kind: ClientMessageType) -> &'static str {
    match kind {
        ClientMessageType::Join => "join",
        ClientMessageType::Offer => "offer",
        ClientMessageType::Answer => "answer",
        ClientMessageType::Candidate => "candidate",
        ClientMessageType::Mute => "mute",
        ClientMessageType::Chat => "chat",
        ClientMessageType::SetQuality => "set_quality",
        ClientMessageType::Leave => "leave",
    }
}

/// Whether `room` is a valid room name: 1–64 letters, digits, `_` or `-`.
pub fn is_valid_room(room: &str) -> bool {
    let count = room.chars().count();
    (1..=MAX_ROOM_CHARS).contains(&count)
        && room
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
}

fn validate(message: &ClientMessage) -> Result<(), ProtocolError> {
    match message {
        ClientMessage::Join { room, name, .. } => {
            if !is_valid_room(room) {
                return Err(ProtocolError::bad_request(
                    "\"room\" must be 1–64 characters, each a letter, digit, '_' or '-'",
                ));
            }
            let name_chars = name.chars().count();
            if !(1..=MAX_NAME_CHARS).contains(&name_chars) || name.trim().is_empty() {
                return Err(ProtocolError::bad_request(
                    "\"name\" must be 1–64 characters and not only white space",
                ));
            }
        }
        ClientMessage::Offer { pc, sdp } => {
            if *pc != PcName::Publisher {
                return Err(ProtocolError::bad_request(
                    "offers from a client are for pc \"publisher\" only; the server offers the \
                     subscriber connection",
                ));
            }
            if sdp.trim().is_empty() {
                return Err(ProtocolError::bad_request("\"sdp\" must not be empty"));
            }
        }
        ClientMessage::Answer { pc, sdp } => {
            if *pc != PcName::Subscriber {
                return Err(ProtocolError::bad_request(
                    "answers from a client are for pc \"subscriber\" only; the server answers \
                     publisher offers",
                ));
            }
            if sdp.trim().is_empty() {
                return Err(ProtocolError::bad_request("\"sdp\" must not be empty"));
            }
        }
        ClientMessage::Candidate { .. } | ClientMessage::Leave => {}
        ClientMessage::Mute { track_id, .. } | ClientMessage::SetQuality { track_id, .. } => {
            let chars = track_id.chars().count();
            if chars == 0 || chars > MAX_TRACK_ID_CHARS {
                return Err(ProtocolError::bad_request(
                    "\"track_id\" must be a track id the server announced",
                ));
            }
        }
        ClientMessage::Chat { text } => {
            let chars = text.chars().count();
            if !(1..=MAX_CHAT_CHARS).contains(&chars) {
                return Err(ProtocolError::bad_request(format!(
                    "\"text\" must be 1–{MAX_CHAT_CHARS} characters (got {chars})"
                )));
            }
        }
    }
    Ok(())
}

/// Keeps echoed client input short in error messages.
fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(MAX).collect();
        t.push('…');
        t
    }
}

/// Parses a whole client frame, ignoring session state (for clients and tests).
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ProtocolError> {
    parse_envelope(text)?.into_message()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> ErrorCode {
        parse_client_message(text).unwrap_err().code
    }

    #[test]
    fn errors_follow_the_contract_order() {
        assert_eq!(code("{nope"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"room":"a"}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::BadRequest);
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"type":"join","room":"a"}"#), ErrorCode::BadRequest);
    }

    #[test]
    fn join_fields_are_validated_in_characters() {
        let ok = parse_client_message(r#"{"type":"join","room":"a-b_9","name":"Zoë"}"#).unwrap();
        assert_eq!(
            ok,
            ClientMessage::Join {
                room: "a-b_9".into(),
                name: "Zoë".into(),
                token: None
            }
        );
        assert_eq!(
            code(r#"{"type":"join","room":"a b","name":"x"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"join","room":"","name":"x"}"#),
            ErrorCode::BadRequest
        );
        let long_room = "r".repeat(65);
        assert_eq!(
            code(&format!(
                r#"{{"type":"join","room":"{long_room}","name":"x"}}"#
            )),
            ErrorCode::BadRequest
        );
        // 64 multi-byte characters are fine: lengths count characters, not bytes.
        let name = "é".repeat(64);
        assert!(
            parse_client_message(&format!(r#"{{"type":"join","room":"r","name":"{name}"}}"#))
                .is_ok()
        );
        let name = "é".repeat(65);
        assert_eq!(
            code(&format!(r#"{{"type":"join","room":"r","name":"{name}"}}"#)),
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn candidate_accepts_browser_json_and_null_but_not_absence() {
        let m = parse_client_message(
            r#"{"type":"candidate","pc":"publisher","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0,"usernameFragment":"abcd"}}"#,
        )
        .unwrap();
        let ClientMessage::Candidate { pc, candidate } = m else {
            panic!("not a candidate")
        };
        assert_eq!(pc, PcName::Publisher);
        let c = candidate.unwrap();
        assert_eq!(c.sdp_mid.as_deref(), Some("0"));
        assert_eq!(c.sdp_mline_index, Some(0));
        assert_eq!(c.username_fragment.as_deref(), Some("abcd"));
        assert_eq!(
            parse_client_message(r#"{"type":"candidate","pc":"subscriber","candidate":null}"#)
                .unwrap(),
            ClientMessage::Candidate {
                pc: PcName::Subscriber,
                candidate: None
            }
        );
        assert_eq!(
            code(r#"{"type":"candidate","pc":"subscriber"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"candidate","pc":"sideways","candidate":null}"#),
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn offers_and_answers_are_tied_to_their_connection() {
        assert_eq!(
            code(r#"{"type":"offer","pc":"subscriber","sdp":"v=0"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(r#"{"type":"answer","pc":"publisher","sdp":"v=0"}"#),
            ErrorCode::BadRequest
        );
        assert!(parse_client_message(r#"{"type":"offer","pc":"publisher","sdp":"v=0"}"#).is_ok());
    }

    #[test]
    fn chat_length_limits() {
        assert_eq!(code(r#"{"type":"chat","text":""}"#), ErrorCode::BadRequest);
        let text = "x".repeat(4097);
        assert_eq!(
            code(&format!(r#"{{"type":"chat","text":"{text}"}}"#)),
            ErrorCode::BadRequest
        );
        let text = "😀".repeat(4096);
        assert!(parse_client_message(&format!(r#"{{"type":"chat","text":"{text}"}}"#)).is_ok());
    }

    #[test]
    fn server_messages_serialize_as_the_contract_says() {
        let m = ServerMessage::TrackPublished {
            participant_id: "p1".into(),
            track: Track {
                track_id: "t1".into(),
                kind: TrackKind::Video,
                muted: false,
                simulcast: false,
                mid: None,
            },
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            serde_json::json!({"type":"track_published","participant_id":"p1",
                "track":{"track_id":"t1","kind":"video","muted":false,"simulcast":false}})
        );
        let e = ProtocolError::new(ErrorCode::RateLimited, "slow down").to_message();
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"type":"error","code":"rate_limited","message":"slow down"})
        );
        let c = ServerMessage::Candidate {
            pc: PcName::Subscriber,
            candidate: None,
        };
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::json!({"type":"candidate","pc":"subscriber","candidate":null})
        );
    }
}
