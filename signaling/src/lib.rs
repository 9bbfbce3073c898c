//! Signaling: the WebSocket protocol of `shared/protocol.md`, the axum server that speaks it,
//! the call page, and the `sfu-server` binary. Media lives in the `sfu` crate; this crate only
//! translates between JSON and the media plane's API.

pub mod protocol;
