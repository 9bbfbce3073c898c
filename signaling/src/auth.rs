//! Join tokens: HS256 JWTs whose claims say which room (and, optionally, which name) a client
//! may join, until when, and whether it may publish. The server checks them on `join` when it
//! has a secret; `sfu-server token` mints them with the same secret. The secret itself is a
//! [`Secret`], whose `Debug` never prints it, so it cannot leak through logged configuration.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds of clock difference tolerated between the host that minted a token and this one.
const CLOCK_SKEW_LEEWAY_SECS: u64 = 30;

/// An HS256 secret. Its `Debug` output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret; empty secrets are refused (they would sign tokens anyone can forge).
    pub fn new(secret: impl Into<String>) -> Result<Self, String> {
        let secret = secret.into();
        if secret.is_empty() {
            return Err("the auth secret must not be empty".into());
        }
        Ok(Self(secret))
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The claims of a join token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The only room the token admits to.
    pub room: String,
    /// When present, the only name the holder may join as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Whether the holder may publish (offer the publisher connection); absent means yes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_publish: Option<bool>,
}

impl Claims {
    /// Claims for `room` that expire `ttl` from now.
    pub fn new(
        room: impl Into<String>,
        name: Option<String>,
        ttl: Duration,
        can_publish: bool,
    ) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            room: room.into(),
            name,
            exp: (now + ttl).as_secs(),
            can_publish: Some(can_publish),
        }
    }
}

/// What a valid token grants for this join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Whether publisher offers are allowed.
    pub can_publish: bool,
}

/// Why a token was refused; the text is sent to the client, so it says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// Signs join tokens.
pub fn mint(secret: &Secret, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.bytes()),
    )
}

/// Checks join tokens against one secret.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(HS256)")
    }
}

impl Verifier {
    /// A verifier for tokens signed with `secret`, HS256 only (no `alg: none`, no others).
    pub fn new(secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = CLOCK_SKEW_LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp"]);
        Self {
            key: DecodingKey::from_secret(secret.bytes()),
            validation,
        }
    }

    /// Whether `token` admits a join of `room` as `name`.
    pub fn check(&self, token: Option<&str>, room: &str, name: &str) -> Result<Grant, Refusal> {
        let Some(token) = token else {
            return Err(Refusal(
                "this server requires a token: send join with a \"token\" for this room".into(),
            ));
        };
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| Refusal(describe(e.kind())))?
            .claims;
        if claims.room != room {
            return Err(Refusal(format!(
                "the token is for another room, not {room:?}; get a token for this room"
            )));
        }
        if claims
            .name
            .as_deref()
            .is_some_and(|allowed| allowed != name)
        {
            return Err(Refusal(
                "the token is for another name; join with the name it was issued for".into(),
            ));
        }
        Ok(Grant {
            can_publish: claims.can_publish.unwrap_or(true),
        })
    }
}

fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired; get a new one".into(),
        ErrorKind::InvalidSignature => {
            "the token's signature is not valid for this server; get a token from it".into()
        }
        ErrorKind::InvalidAlgorithm => "the token must be signed with HS256".into(),
        ErrorKind::MissingRequiredClaim(claim) => {
            format!("the token has no {claim:?} claim; tokens need room and exp")
        }
        ErrorKind::Json(_) => {
            "the token's claims are malformed: room must be a string, exp a number of seconds, \
             name a string and can_publish a boolean"
                .into()
        }
        _ => "the token is not a valid JWT; send the token exactly as issued".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new("test-secret-that-is-long-enough").unwrap()
    }

    #[test]
    fn a_minted_token_admits_its_room_and_name_only() {
        let verifier = Verifier::new(&secret());
        let token = mint(
            &secret(),
            &Claims::new("room1", Some("ann".into()), Duration::from_secs(60), true),
        )
        .unwrap();
        assert_eq!(
            verifier.check(Some(&token), "room1", "ann"),
            Ok(Grant { can_publish: true })
        );
        assert!(verifier.check(Some(&token), "room2", "ann").is_err());
        assert!(verifier.check(Some(&token), "room1", "bob").is_err());
        assert!(verifier.check(None, "room1", "ann").is_err());
    }

    #[test]
    fn without_a_name_claim_any_name_is_fine_and_can_publish_defaults_to_true() {
        let claims = Claims {
            room: "r".into(),
            name: None,
            exp: Claims::new("r", None, Duration::from_secs(60), true).exp,
            can_publish: None,
        };
        let token = mint(&secret(), &claims).unwrap();
        let grant = Verifier::new(&secret()).check(Some(&token), "r", "anyone");
        assert_eq!(grant, Ok(Grant { can_publish: true }));
    }

    #[test]
    fn watch_only_tokens_say_so() {
        let token = mint(
            &secret(),
            &Claims::new("r", None, Duration::from_secs(60), false),
        )
        .unwrap();
        let grant = Verifier::new(&secret()).check(Some(&token), "r", "w");
        assert_eq!(grant, Ok(Grant { can_publish: false }));
    }

    #[test]
    fn expired_forged_and_garbage_tokens_are_refused_with_a_reason() {
        let verifier = Verifier::new(&secret());
        let mut claims = Claims::new("r", None, Duration::ZERO, true);
        claims.exp -= CLOCK_SKEW_LEEWAY_SECS + 10;
        let expired = mint(&secret(), &claims).unwrap();
        let refusal = verifier.check(Some(&expired), "r", "n").unwrap_err();
        assert!(refusal.0.contains("expired"), "{refusal}");

        let other = Secret::new("another-secret").unwrap();
        let forged = mint(
            &other,
            &Claims::new("r", None, Duration::from_secs(60), true),
        )
        .unwrap();
        let refusal = verifier.check(Some(&forged), "r", "n").unwrap_err();
        assert!(refusal.0.contains("signature"), "{refusal}");

        let refusal = verifier.check(Some("not.a.jwt"), "r", "n").unwrap_err();
        assert!(refusal.0.contains("not a valid JWT"), "{refusal}");

        // `alg: none` with the right claims (room "r", exp in 2096), base64url by hand:
        // refused, never trusted.
        let unsigned =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJyb29tIjoiciIsImV4cCI6NDAwMDAwMDAwMH0.";
        assert!(verifier.check(Some(unsigned), "r", "n").is_err());
    }

    #[test]
    fn tokens_without_exp_are_refused() {
        let token = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({ "room": "r" }),
            &EncodingKey::from_secret(secret().bytes()),
        )
        .unwrap();
        let refusal = Verifier::new(&secret())
            .check(Some(&token), "r", "n")
            .unwrap_err();
        assert!(refusal.0.contains("exp"), "{refusal}");
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let text = format!("{:?}", secret());
        assert!(!text.contains("test-secret"));
        assert!(Secret::new("").is_err());
    }
}
