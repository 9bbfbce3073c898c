//! The standard process series (`process_cpu_seconds_total`, `process_resident_memory_bytes`,
//! …) from the prometheus crate's collector, with one fix: that collector counts CPU in whole
//! seconds, so a 10-second load-test window reads 0 % or 10 %. Here the CPU counter carries
//! `getrusage`'s microseconds.

use prometheus::core::{Collector, Desc};
use prometheus::process_collector::ProcessCollector;
use prometheus::proto::{Counter, MetricFamily};

const CPU_SERIES: &str = "process_cpu_seconds_total";

/// Process series for this process.
pub struct ProcessMetrics {
    inner: ProcessCollector,
}

impl ProcessMetrics {
    /// Collects for the current process.
    pub fn for_self() -> Self {
        Self {
            inner: ProcessCollector::for_self(),
        }
    }
}

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.inner.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.inner.collect();
        if let Some(seconds) = cpu_seconds() {
            for family in families.iter_mut().filter(|f| f.name() == CPU_SERIES) {
                for metric in family.mut_metric() {
                    let mut counter = Counter::default();
                    counter.set_value(seconds);
                    metric.set_counter(counter);
                }
            }
        }
        families
    }
}

/// User plus system CPU time of this process, in seconds.
pub fn cpu_seconds() -> Option<f64> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given and nothing else.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: rc == 0, so the struct was filled in.
    let usage = unsafe { usage.assume_init() };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(seconds(usage.ru_utime) + seconds(usage.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, Registry, TextEncoder};
    use std::time::{Duration, Instant};

    fn scrape_cpu(registry: &Registry) -> f64 {
        let mut body = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut body)
            .unwrap();
        let text = String::from_utf8(body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
            .expect("series present")
            .parse()
            .unwrap()
    }

    #[test]
    fn cpu_seconds_move_in_less_than_whole_seconds() {
        let registry = Registry::new();
        registry
            .register(Box::new(ProcessMetrics::for_self()))
            .unwrap();
        let before = scrape_cpu(&registry);
        // Burn about 150 ms of CPU.
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(150) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let spent = scrape_cpu(&registry) - before;
        assert!(
            (0.05..1.0).contains(&spent),
            "150 ms of work shows as {spent} s"
        );
    }
}
