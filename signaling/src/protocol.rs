//! The signaling wire format of `shared/protocol.md`: every client and server message as a
//! serde type, and the parser that applies the contract's error order (`bad_json`, then
//! `bad_request` for a missing `type`, then `unknown_type`, then the session's `not_joined`,
//! then the message's own fields, each failure naming the field), and the limits client SDP
//! must meet before webrtc-rs sees it. Both the server and the headless clients use these
//! types, so the two can never drift apart.

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
/// Longest join token accepted, in characters (a JWT with these claims is a few hundred).
pub const MAX_TOKEN_CHARS: usize = 4096;
/// Longest ICE candidate line, in characters (real ones are under 300).
pub const MAX_CANDIDATE_CHARS: usize = 1024;
/// Longest `sdpMid` / `usernameFragment` (RFC 8839 caps ufrags at 256 characters).
pub const MAX_ICE_ID_CHARS: usize = 256;

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
        check_field_types(kind, &self.value)?;
        let message: ClientMessage = serde_json::from_value(self.value).map_err(|e| {
            ProtocolError::bad_request(format!("invalid {} message: {e}", kind_name(kind)))
        })?;
        validate(&message)?;
        Ok(message)
    }
}

/// What a field's JSON value must be.
#[derive(Debug, Clone, Copy)]
enum Expect {
    Text,
    Bool,
    OneOf(&'static [&'static str]),
    /// An `RTCIceCandidateInit` object, or `null` for end of candidates.
    CandidateOrNull,
}

impl Expect {
    fn describe(self) -> String {
        match self {
            Expect::Text => "a string".into(),
            Expect::Bool => "true or false".into(),
            Expect::OneOf(values) => {
                let quoted: Vec<String> = values.iter().map(|v| format!("{v:?}")).collect();
                format!("one of {}", quoted.join(", "))
            }
            Expect::CandidateOrNull => {
                "an RTCIceCandidateInit object (event.candidate.toJSON()), or null for end of \
                 candidates"
                    .into()
            }
        }
    }

    fn accepts(self, value: &Value) -> bool {
        match self {
            Expect::Text => value.is_string(),
            Expect::Bool => value.is_boolean(),
            Expect::OneOf(values) => value.as_str().is_some_and(|v| values.contains(&v)),
            Expect::CandidateOrNull => value.is_null() || value.is_object(),
        }
    }
}

const PC_NAMES: &[&str] = &["publisher", "subscriber"];
const QUALITIES: &[&str] = &["low", "medium", "high"];

/// The required fields of each message type and what each must be.
fn required_fields(kind: ClientMessageType) -> &'static [(&'static str, Expect)] {
    match kind {
        ClientMessageType::Join => &[("room", Expect::Text), ("name", Expect::Text)],
        ClientMessageType::Offer | ClientMessageType::Answer => {
            &[("pc", Expect::OneOf(PC_NAMES)), ("sdp", Expect::Text)]
        }
        ClientMessageType::Candidate => &[
            ("pc", Expect::OneOf(PC_NAMES)),
            ("candidate", Expect::CandidateOrNull),
        ],
        ClientMessageType::Mute => &[("track_id", Expect::Text), ("muted", Expect::Bool)],
        ClientMessageType::Chat => &[("text", Expect::Text)],
        ClientMessageType::SetQuality => &[
            ("track_id", Expect::Text),
            ("quality", Expect::OneOf(QUALITIES)),
        ],
        ClientMessageType::Leave => &[],
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(field: &str, expect: Expect, got: &Value) -> ProtocolError {
    let got = match got.as_str() {
        Some(text) => format!("{:?}", truncate_for_message(text)),
        None => json_type(got).to_owned(),
    };
    ProtocolError::bad_request(format!(
        "\"{field}\" must be {}, not {got}",
        expect.describe()
    ))
}

/// Names the first missing or mistyped field, so the message says exactly what to fix.
/// Unknown fields are ignored: the contract allows additions.
fn check_field_types(kind: ClientMessageType, value: &Value) -> Result<(), ProtocolError> {
    let Some(object) = value.as_object() else {
        return Ok(());
    };
    for &(field, expect) in required_fields(kind) {
        match object.get(field) {
            None => {
                return Err(ProtocolError::bad_request(format!(
                    "{} needs a \"{field}\" field: {}",
                    kind_name(kind),
                    expect.describe()
                )))
            }
            Some(got) if !expect.accepts(got) => return Err(wrong_type(field, expect, got)),
            Some(_) => {}
        }
    }
    if kind == ClientMessageType::Join {
        if let Some(token) = object
            .get("token")
            .filter(|t| !t.is_null() && !t.is_string())
        {
            return Err(wrong_type("token", Expect::Text, token));
        }
    }
    if let Some(candidate) = object.get("candidate").and_then(Value::as_object) {
        check_candidate_types(candidate)?;
    }
    Ok(())
}

fn check_candidate_types(candidate: &serde_json::Map<String, Value>) -> Result<(), ProtocolError> {
    match candidate.get("candidate") {
        Some(Value::String(_)) => {}
        Some(other) => return Err(wrong_type("candidate.candidate", Expect::Text, other)),
        None => {
            return Err(ProtocolError::bad_request(
                "the candidate object needs a \"candidate\" string (the a=candidate line; \
                 empty for end of a generation)",
            ))
        }
    }
    for field in ["sdpMid", "usernameFragment"] {
        if let Some(value) = candidate
            .get(field)
            .filter(|v| !v.is_null() && !v.is_string())
        {
            return Err(ProtocolError::bad_request(format!(
                "\"candidate.{field}\" must be a string or null, not {}",
                json_type(value)
            )));
        }
    }
    if let Some(index) = candidate.get("sdpMLineIndex").filter(|v| !v.is_null()) {
        if index.as_u64().is_none_or(|i| i > u64::from(u16::MAX)) {
            return Err(ProtocolError::bad_request(format!(
                "\"candidate.sdpMLineIndex\" must be an integer from 0 to 65535, or null; got {}",
                truncate_for_message(&index.to_string())
            )));
        }
    }
    Ok(())
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
        ClientMessage::Join { room, name, token } => {
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
            // Names are shown to everyone and written to logs: no line breaks or escapes.
            if name.chars().any(char::is_control) {
                return Err(ProtocolError::bad_request(
                    "\"name\" must not contain control characters (line breaks, tabs, escapes)",
                ));
            }
            if token
                .as_ref()
                .is_some_and(|t| t.chars().count() > MAX_TOKEN_CHARS)
            {
                return Err(ProtocolError::bad_request(format!(
                    "\"token\" is longer than {MAX_TOKEN_CHARS} characters; send the token as issued"
                )));
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
        ClientMessage::Candidate { candidate, .. } => {
            if let Some(candidate) = candidate {
                validate_candidate(candidate)?;
            }
        }
        ClientMessage::Leave => {}
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

fn validate_candidate(candidate: &IceCandidate) -> Result<(), ProtocolError> {
    let line = &candidate.candidate;
    if line.chars().count() > MAX_CANDIDATE_CHARS {
        return Err(ProtocolError::bad_request(format!(
            "\"candidate.candidate\" is longer than {MAX_CANDIDATE_CHARS} characters; send one \
             candidate line"
        )));
    }
    if line.contains(['\r', '\n']) {
        return Err(ProtocolError::bad_request(
            "\"candidate.candidate\" must be a single line; send one candidate per message",
        ));
    }
    let ids = [
        ("sdpMid", &candidate.sdp_mid),
        ("usernameFragment", &candidate.username_fragment),
    ];
    for (field, value) in ids {
        if value
            .as_ref()
            .is_some_and(|v| v.chars().count() > MAX_ICE_ID_CHARS)
        {
            return Err(ProtocolError::bad_request(format!(
                "\"candidate.{field}\" is longer than {MAX_ICE_ID_CHARS} characters"
            )));
        }
    }
    Ok(())
}

/// Bounds on SDP from clients, checked before webrtc-rs sees it: without them an offer of a
/// few hundred KiB (thousands of m-sections, simulcast rids or candidates) costs webrtc-rs
/// around a second of CPU per offer and makes the server send ICE checks to every listed
/// address. Within them, applying the largest SDP a frame can carry takes milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdpLimits {
    /// Most m-sections.
    pub max_media_sections: usize,
    /// Longest line, in bytes.
    pub max_line_bytes: usize,
    /// Most lines in the session part or in one m-section.
    pub max_lines_per_section: usize,
    /// Most `a=candidate` lines in the whole SDP.
    pub max_candidates: usize,
    /// Most `a=rid` lines (simulcast layers) in one m-section.
    pub max_rids_per_section: usize,
}

impl SdpLimits {
    /// Limits for a publisher offer when a participant may publish `max_tracks` tracks:
    /// room for every track plus as many recycled or inactive m-sections again, and never
    /// fewer than 64.
    pub fn for_offer(max_tracks: usize) -> Self {
        Self {
            max_media_sections: max_tracks.saturating_mul(2).max(64),
            ..Self::base()
        }
    }

    /// Limits for an answer to an offer of `offered_sections` m-sections (an answer has
    /// exactly as many).
    pub fn for_answer(offered_sections: usize) -> Self {
        Self {
            max_media_sections: offered_sections,
            ..Self::base()
        }
    }

    fn base() -> Self {
        Self {
            max_media_sections: 64,
            max_line_bytes: 4096,
            max_lines_per_section: 512,
            max_candidates: 128,
            max_rids_per_section: 16,
        }
    }
}

/// How many m-sections an SDP has.
pub fn media_section_count(sdp: &str) -> usize {
    sdp.lines().filter(|l| l.starts_with("m=")).count()
}

/// Checks `sdp` against `limits`; the error is `invalid_sdp` and names the limit.
pub fn check_sdp(sdp: &str, limits: &SdpLimits) -> Result<(), ProtocolError> {
    let invalid = |message: String| Err(ProtocolError::new(ErrorCode::InvalidSdp, message));
    let mut sections = 0usize;
    let mut lines_in_section = 0usize;
    let mut rids_in_section = 0usize;
    let mut candidates = 0usize;
    for (index, line) in sdp.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.len() > limits.max_line_bytes {
            return invalid(format!(
                "SDP line {} is {} bytes long; lines may be at most {} bytes",
                index + 1,
                line.len(),
                limits.max_line_bytes
            ));
        }
        if line.starts_with("m=") {
            sections += 1;
            if sections > limits.max_media_sections {
                return invalid(format!(
                    "the SDP has more than {0} m-sections; this server accepts at most {0} \
                     here: remove unused transceivers",
                    limits.max_media_sections
                ));
            }
            lines_in_section = 0;
            rids_in_section = 0;
        }
        lines_in_section += 1;
        if lines_in_section > limits.max_lines_per_section {
            return invalid(format!(
                "an SDP section has more than {} lines; this server accepts at most that many \
                 per m-section",
                limits.max_lines_per_section
            ));
        }
        if line.starts_with("a=candidate:") {
            candidates += 1;
            if candidates > limits.max_candidates {
                return invalid(format!(
                    "the SDP lists more than {} ICE candidates; this server accepts at most that \
                     many",
                    limits.max_candidates
                ));
            }
        } else if line.starts_with("a=rid:") {
            rids_in_section += 1;
            if rids_in_section > limits.max_rids_per_section {
                return invalid(format!(
                    "an m-section has more than {0} a=rid lines; this server accepts at most \
                     {0} simulcast layers per track",
                    limits.max_rids_per_section
                ));
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
