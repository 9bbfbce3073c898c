//! Shared pieces of the SFU's benchmarks: a counting global allocator, the per-subscriber
//! packet path as the server runs it (decide, rewrite, marshal, SRTP protect) built outside
//! any peer connection so it can be timed alone, and readers for the server's `/metrics` text
//! and the clients' probe counters that the whole-server bench turns into rates and loss.

#![warn(missing_docs)]

pub mod alloc_count;
pub mod hot_path;
pub mod report;
