//! The arithmetic of the whole-server bench, kept apart from its IO so it is unit-tested:
//! reading series from Prometheus text, this process's CPU time, and turning counter
//! snapshots taken at both ends of a measurement window into rates and loss; and where the
//! benches write their outputs.

use std::path::PathBuf;

/// The value of the sample named exactly `series` (labels included, as printed), if present.
pub fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
}

/// CPU seconds (user + system) this process has used, from `/proc/self/stat` (Linux).
pub fn own_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_seconds_from_stat(&stat)
}

/// CPU seconds (user + system) process `pid` has used, to 10 ms (Linux). Finer than the
/// server's `process_cpu_seconds_total`, which the `prometheus` crate truncates to whole
/// seconds.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_seconds_from_stat(&stat)
}

/// utime + stime of a `/proc/<pid>/stat` line, in seconds. Linux reports them in clock ticks
/// of `USER_HZ`, which is 100 on every architecture Linux exposes to user space.
fn cpu_seconds_from_stat(stat: &str) -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of the line are utime and stime; `fields[0]` is field 3.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// The 1-minute load average (Linux), to show how busy the machine was during a run.
pub fn load_average_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The largest subscriber count that was served with every smaller count served too, from
/// `(subscribers, served)` results in any order. A larger count that passed after a smaller
/// one failed is noise or luck, not capacity, so it does not count.
pub fn largest_served(results: &[(usize, bool)]) -> Option<usize> {
    let mut sorted = results.to_vec();
    sorted.sort_unstable();
    sorted
        .iter()
        .take_while(|(_, served)| *served)
        .last()
        .map(|(n, _)| *n)
}

/// One subscriber's probe counters for one track at one instant (from the client's
/// `TrackStats`: the span of counters seen and how many distinct ones arrived).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeCounts {
    /// Counters from the first to the last seen (`probe_last - probe_first + 1`).
    pub expected: u64,
    /// Distinct counters received.
    pub received: u64,
}

/// Probe counts over a window, summed over subscribers and tracks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowLoss {
    /// Packets the subscribers should have received in the window.
    pub expected: u64,
    /// Packets they did receive.
    pub received: u64,
    /// The worst single track's loss ratio.
    pub worst: f64,
}

impl WindowLoss {
    /// Adds one track's counts at the start and end of the window. A track that received
    /// nothing in the window while the publisher sent `published` packets lost all of them
    /// (its own counters cannot tell, as their span did not grow).
    pub fn add(&mut self, start: ProbeCounts, end: ProbeCounts, published: u64) {
        let received = end.received.saturating_sub(start.received);
        let expected = if received == 0 {
            published
        } else {
            end.expected.saturating_sub(start.expected).max(received)
        };
        self.expected += expected;
        self.received += received;
        if expected > 0 {
            self.worst = self.worst.max(1.0 - received as f64 / expected as f64);
        }
    }

    /// The fraction of expected packets that never arrived.
    pub fn ratio(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            1.0 - self.received as f64 / self.expected as f64
        }
    }
}

/// `target/` of this build: benches run from `target/<profile>/deps/`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(|| PathBuf::from("target"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.34
sfu_forwarded_packets_total 98765
sfu_dropped_packets_total{reason=\"stale\"} 3
sfu_dropped_packets_total{reason=\"subscriber_congested\"} 17
";

    #[test]
    fn reads_plain_and_labelled_series() {
        assert_eq!(
            metric_value(METRICS, "process_cpu_seconds_total"),
            Some(12.34)
        );
        assert_eq!(
            metric_value(METRICS, "sfu_forwarded_packets_total"),
            Some(98765.0)
        );
        assert_eq!(
            metric_value(
                METRICS,
                "sfu_dropped_packets_total{reason=\"subscriber_congested\"}"
            ),
            Some(17.0)
        );
        assert_eq!(metric_value(METRICS, "sfu_forwarded_packets"), None);
    }

    #[test]
    fn cpu_time_comes_from_utime_and_stime() {
        let stat = "4242 (my (odd) bench) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 130 0 0 20 0 \
                    3 0 100 1000000 200 18446744073709551615";
        assert_eq!(cpu_seconds_from_stat(stat), Some(3.8));
        assert!(
            own_cpu_seconds().is_some(),
            "this process's own stat line parses"
        );
    }

    #[test]
    fn capacity_is_the_largest_count_with_no_failure_below_it() {
        assert_eq!(
            largest_served(&[(200, true), (10, true), (100, true), (50, true)]),
            Some(200)
        );
        assert_eq!(
            largest_served(&[(10, true), (50, true), (100, false), (200, true)]),
            Some(50)
        );
        assert_eq!(largest_served(&[(10, false), (50, true)]), None);
        assert_eq!(largest_served(&[]), None);
    }

    #[test]
    fn window_loss_counts_gaps_and_silent_tracks() {
        let mut loss = WindowLoss::default();
        // 1000 expected, 990 arrived.
        loss.add(
            ProbeCounts {
                expected: 100,
                received: 100,
            },
            ProbeCounts {
                expected: 1100,
                received: 1090,
            },
            1000,
        );
        assert_eq!((loss.expected, loss.received), (1000, 990));
        assert!((loss.ratio() - 0.01).abs() < 1e-9);
        // A track that stalled: nothing new while the publisher sent 1000.
        loss.add(
            ProbeCounts {
                expected: 50,
                received: 50,
            },
            ProbeCounts {
                expected: 50,
                received: 50,
            },
            1000,
        );
        assert_eq!((loss.expected, loss.received), (2000, 990));
        assert_eq!(loss.worst, 1.0);
        assert_eq!(WindowLoss::default().ratio(), 0.0);
    }
}
