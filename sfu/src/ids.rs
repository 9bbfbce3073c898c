//! Typed identifiers for rooms, participants and tracks, so a participant id can never be
//! passed where a track id belongs.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Wraps an id received from elsewhere (signaling, another node).
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }

            /// The id as sent on the wire.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A room name, as the client chose it.
    RoomId
);
string_id!(
    /// A participant, unique across the server's lifetime.
    ParticipantId
);
string_id!(
    /// A published track, unique across the server's lifetime.
    TrackId
);

/// Mints ids that are unique within this process and hard to guess across processes: a random
/// per-process prefix plus a counter. Guessing another participant's id grants nothing (all
/// actions are bound to the socket), so this needs uniqueness, not secrecy.
pub(crate) struct IdMint {
    prefix: String,
    next: AtomicU64,
}

impl IdMint {
    pub(crate) fn new() -> Self {
        let prefix = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        Self {
            prefix,
            next: AtomicU64::new(1),
        }
    }

    pub(crate) fn participant(&self) -> ParticipantId {
        ParticipantId(format!("P{}{}", self.prefix, self.bump()))
    }

    pub(crate) fn track(&self) -> TrackId {
        TrackId(format!("T{}{}", self.prefix, self.bump()))
    }

    fn bump(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_are_unique_and_typed() {
        let mint = IdMint::new();
        let a = mint.participant();
        let b = mint.participant();
        assert_ne!(a, b);
        assert!(a.as_str().starts_with('P'));
        assert!(mint.track().as_str().starts_with('T'));
    }
}
