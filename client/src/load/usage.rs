//! The tester's own cost: CPU time (user + system) and peak resident memory of this process,
//! from `getrusage(RUSAGE_SELF)`, so a report can show that the tester was not the bottleneck
//! it set out to measure.

use std::time::{Duration, Instant};

use super::report::UsageSample;

/// CPU time used by this process so far, and its peak resident memory in bytes.
pub fn self_usage() -> (Duration, u64) {
    // SAFETY: getrusage only writes the struct we pass; all-zero is a valid `rusage`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a properly sized struct.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return (Duration::ZERO, 0);
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    // Linux reports ru_maxrss in KiB.
    let max_rss = (usage.ru_maxrss.max(0) as u64) * 1024;
    (tv(usage.ru_utime) + tv(usage.ru_stime), max_rss)
}

/// A [`UsageSample`] of now.
pub fn sample() -> UsageSample {
    UsageSample {
        at: Instant::now(),
        cpu: self_usage().0,
    }
}

/// CPU cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_work_shows_up_as_cpu_time() {
        let (before, rss) = self_usage();
        assert!(rss > 0);
        // Spin until 50 ms of CPU shows up (on a loaded machine that takes longer than 50 ms
        // of wall time, never forever).
        let start = Instant::now();
        let mut x = 0u64;
        loop {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            let used = self_usage().0 - before;
            if used >= Duration::from_millis(50) {
                // Never more CPU than wall time allows on this machine's cores.
                let wall = start.elapsed() + Duration::from_millis(20);
                assert!(used <= wall * cores() as u32, "{used:?} in {wall:?}");
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "CPU time does not advance"
            );
        }
    }
}
