//! Property tests of the message parser and the SDP guard: no input, however malformed, makes
//! them panic; errors follow the contract's order; every valid message survives a round trip
//! through its JSON form unchanged.

use proptest::prelude::*;
use serde_json::{Map, Value};
use signaling::protocol::{
    check_sdp, parse_client_message, parse_envelope, ClientMessage, ErrorCode, IceCandidate,
    PcName, Quality, SdpLimits,
};

/// Strings a hostile or confused client would put in fields.
fn interesting_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("join".to_owned()),
        Just("offer".to_owned()),
        Just("answer".to_owned()),
        Just("candidate".to_owned()),
        Just("mute".to_owned()),
        Just("chat".to_owned()),
        Just("set_quality".to_owned()),
        Just("leave".to_owned()),
        Just("publisher".to_owned()),
        Just("subscriber".to_owned()),
        Just("high".to_owned()),
        Just("v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n".to_owned()),
        "[a-z_-]{1,70}",
        "\\PC{0,80}",
        any::<String>(),
    ]
}

const FIELD_NAMES: [&str; 15] = [
    "type",
    "room",
    "name",
    "token",
    "pc",
    "sdp",
    "candidate",
    "sdpMid",
    "sdpMLineIndex",
    "usernameFragment",
    "track_id",
    "muted",
    "text",
    "quality",
    "extra",
];

/// Arbitrary JSON, biased towards the contract's field names and values.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        interesting_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        prop::sample::select(&FIELD_NAMES[..]).prop_map(str::to_owned),
                        "[a-zA-Z]{1,8}"
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|fields| Value::Object(fields.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A message object with a known type and arbitrary other fields.
fn message_like() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(
            &[
                "join",
                "offer",
                "answer",
                "candidate",
                "mute",
                "chat",
                "set_quality",
                "leave",
            ][..],
        ),
        prop::collection::vec(
            (prop::sample::select(&FIELD_NAMES[1..]), json_value()),
            0..6,
        ),
    )
        .prop_map(|(kind, fields)| {
            let mut object: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            object.insert("type".into(), Value::from(kind));
            Value::Object(object)
        })
}

fn room() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

fn name() -> impl Strategy<Value = String> {
    // 1–64 characters, no control characters, not only white space.
    "[a-zA-Zé😀 ]{0,40}[a-zA-Z0-9ü]"
}

fn track_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]{1,128}"
}

fn pc() -> impl Strategy<Value = PcName> {
    prop_oneof![Just(PcName::Publisher), Just(PcName::Subscriber)]
}

fn candidate() -> impl Strategy<Value = Option<IceCandidate>> {
    prop::option::of(
        (
            "candidate:[0-9]{1,10} 1 udp [0-9]{1,10} 127\\.0\\.0\\.1 [0-9]{1,5} typ host",
            prop::option::of("[0-9a-z]{1,8}"),
            prop::option::of(any::<u16>()),
            prop::option::of("[A-Za-z0-9+/]{4,32}"),
        )
            .prop_map(|(candidate, sdp_mid, sdp_mline_index, username_fragment)| {
                IceCandidate {
                    candidate,
                    sdp_mid,
                    sdp_mline_index,
                    username_fragment,
                }
            }),
    )
}

/// Every kind of valid client message, with valid fields.
fn valid_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        (room(), name(), prop::option::of("[A-Za-z0-9._-]{1,300}"))
            .prop_map(|(room, name, token)| ClientMessage::Join { room, name, token }),
        "v=0\r\n[ -~\r\n]{0,200}".prop_map(|sdp| ClientMessage::Offer {
            pc: PcName::Publisher,
            sdp
        }),
        "v=0\r\n[ -~\r\n]{0,200}".prop_map(|sdp| ClientMessage::Answer {
            pc: PcName::Subscriber,
            sdp
        }),
        (pc(), candidate()).prop_map(|(pc, candidate)| ClientMessage::Candidate { pc, candidate }),
        (track_id(), any::<bool>())
            .prop_map(|(track_id, muted)| ClientMessage::Mute { track_id, muted }),
        "\\PC{1,300}".prop_map(|text| ClientMessage::Chat { text }),
        (
            track_id(),
            prop_oneof![
                Just(Quality::Low),
                Just(Quality::Medium),
                Just(Quality::High)
            ]
        )
            .prop_map(|(track_id, quality)| ClientMessage::SetQuality { track_id, quality }),
        Just(ClientMessage::Leave),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics_and_gets_a_contract_code(text in interesting_string()) {
        match parse_client_message(&text) {
            Ok(message) => {
                // Whatever parsed is valid: it survives its own round trip.
                let again = parse_client_message(&serde_json::to_string(&message).unwrap());
                prop_assert_eq!(again, Ok(message));
            }
            Err(e) => {
                prop_assert!(matches!(
                    e.code,
                    ErrorCode::BadJson | ErrorCode::BadRequest | ErrorCode::UnknownType
                ));
                prop_assert!(!e.message.is_empty());
            }
        }
    }

    #[test]
    fn arbitrary_json_never_panics_and_errors_follow_the_contract_order(value in json_value()) {
        let text = value.to_string();
        match parse_client_message(&text) {
            Ok(message) => {
                let again = parse_client_message(&serde_json::to_string(&message).unwrap());
                prop_assert_eq!(again, Ok(message));
            }
            Err(e) => {
                // Valid JSON is never bad_json; a non-object or a missing string type is
                // bad_request before anything else.
                prop_assert_ne!(e.code, ErrorCode::BadJson);
                let typed = value.as_object().and_then(|o| o.get("type")).and_then(Value::as_str);
                if typed.is_none() {
                    prop_assert_eq!(e.code, ErrorCode::BadRequest);
                }
            }
        }
    }

    #[test]
    fn a_known_type_passes_the_envelope_whatever_its_fields(value in message_like()) {
        // The envelope only looks at `type`, so the session can answer not_joined before
        // checking fields, as the contract orders.
        let envelope = parse_envelope(&value.to_string());
        prop_assert!(envelope.is_ok(), "{:?}", envelope.err());
        match envelope.unwrap().into_message() {
            Ok(message) => {
                let again = parse_client_message(&serde_json::to_string(&message).unwrap());
                prop_assert_eq!(again, Ok(message));
            }
            Err(e) => {
                prop_assert_eq!(e.code, ErrorCode::BadRequest);
                prop_assert!(e.message.len() > 10, "says what to fix: {:?}", e.message);
            }
        }
    }

    #[test]
    fn every_valid_message_round_trips(message in valid_message()) {
        let text = serde_json::to_string(&message).unwrap();
        prop_assert_eq!(parse_client_message(&text), Ok(message));
    }

    #[test]
    fn the_sdp_guard_never_panics_and_refuses_only_with_invalid_sdp(sdp in interesting_string()) {
        for limits in [SdpLimits::for_offer(8), SdpLimits::for_answer(2)] {
            if let Err(e) = check_sdp(&sdp, &limits) {
                prop_assert_eq!(e.code, ErrorCode::InvalidSdp);
                prop_assert!(e.message.contains("at most"), "{}", e.message);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn the_sdp_guard_counts_m_sections_exactly(sections in 0usize..100, max_tracks in 1usize..60) {
        let sdp = "v=0\r\n".to_owned()
            + &(0..sections)
                .map(|i| format!("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:{i}\r\n"))
                .collect::<String>();
        let limits = SdpLimits::for_offer(max_tracks);
        prop_assert_eq!(
            check_sdp(&sdp, &limits).is_ok(),
            sections <= limits.max_media_sections
        );
        prop_assert!(limits.max_media_sections >= 2 * max_tracks);
        prop_assert_eq!(check_sdp(&sdp, &SdpLimits::for_answer(sections)).is_ok(), true);
    }
}
