//! The load tester behind `sfu-load`: rooms of headless publishers and subscribers in one
//! process (against our server or, for comparison, a Janus VideoRoom), joined at a steady rate
//! and held for a duration, with live progress and a final report (joins, join time, tracks,
//! bitrate, loss, jitter, latency, server and tester CPU/RSS, verdict). `docs/load-testing.md` explains how to run it and read the report.

pub mod cli;
pub mod progress;
pub mod report;
pub mod run;
pub mod server_metrics;
pub mod target;
pub mod usage;

pub use cli::Args;
pub use report::{LoadReport, Measurement, Role};
pub use run::{run_load, LiveStatus, LoadConfig, LoadMedia, Phase};
pub use target::{LoadPeer, Target};
