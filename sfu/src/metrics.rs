//! The media plane's Prometheus series (names fixed by `shared/protocol.md`). Counters are
//! atomics, so the packet path only pays an uncontended add; label lookups happen once, when
//! the handles are built, never per packet.

use crate::forwarder::DropReason;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Handles to every media-plane series.
#[derive(Clone)]
pub struct Metrics {
    /// Rooms that exist now.
    pub rooms: IntGauge,
    /// Participants joined now.
    pub participants: IntGauge,
    /// Tracks published now.
    pub published_tracks: IntGauge,
    /// RTP packets received from publishers.
    pub received_packets: IntCounter,
    /// RTP bytes received from publishers.
    pub received_bytes: IntCounter,
    /// RTP packets sent to subscribers, one per packet per subscriber, retransmissions included.
    pub forwarded_packets: IntCounter,
    /// RTP bytes sent to subscribers.
    pub forwarded_bytes: IntCounter,
    dropped: [IntCounter; DropReason::ALL.len()],
}

impl Metrics {
    /// Creates the series and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let rooms = IntGauge::new("sfu_rooms", "Rooms that exist now")?;
        let participants = IntGauge::new("sfu_participants", "Participants joined now")?;
        let published_tracks = IntGauge::new("sfu_published_tracks", "Tracks published now")?;
        let received_packets = IntCounter::new(
            "sfu_received_packets_total",
            "RTP packets received from publishers",
        )?;
        let received_bytes = IntCounter::new(
            "sfu_received_bytes_total",
            "RTP bytes received from publishers",
        )?;
        let forwarded_packets = IntCounter::new(
            "sfu_forwarded_packets_total",
            "RTP packets sent to subscribers (one per packet per subscriber, retransmissions included)",
        )?;
        let forwarded_bytes =
            IntCounter::new("sfu_forwarded_bytes_total", "RTP bytes sent to subscribers")?;
        let dropped_vec = IntCounterVec::new(
            Opts::new(
                "sfu_dropped_packets_total",
                "RTP packets not forwarded to a subscriber, by reason",
            ),
            &["reason"],
        )?;
        let dropped = DropReason::ALL.map(|r| dropped_vec.with_label_values(&[r.as_str()]));
        registry.register(Box::new(rooms.clone()))?;
        registry.register(Box::new(participants.clone()))?;
        registry.register(Box::new(published_tracks.clone()))?;
        registry.register(Box::new(received_packets.clone()))?;
        registry.register(Box::new(received_bytes.clone()))?;
        registry.register(Box::new(forwarded_packets.clone()))?;
        registry.register(Box::new(forwarded_bytes.clone()))?;
        registry.register(Box::new(dropped_vec))?;
        Ok(Self {
            rooms,
            participants,
            published_tracks,
            received_packets,
            received_bytes,
            forwarded_packets,
            forwarded_bytes,
            dropped,
        })
    }

    /// Metrics registered nowhere, for tests and benches.
    pub fn unregistered() -> Self {
        Self::new(&Registry::new()).expect("fresh registry accepts every series")
    }

    /// Counts one dropped packet.
    pub fn dropped(&self, reason: DropReason) {
        let index = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("ALL lists every reason");
        self.dropped[index].inc();
    }

    /// The dropped-packet count for one reason.
    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        let index = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.dropped[index].get()
    }
}
