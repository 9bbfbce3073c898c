//! The tester's own cost: CPU time (user + system) and peak resident memory of this process,
//! from `getrusage(RUSAGE_SELF)`, so a report can show that the tester was not the bottleneck
//! it set out to measure; and how busy the whole machine was (`/proc/stat`), since a server and
//! tester sharing a busy machine measure the machine.

use std::time::{Duration, Instant};

use super::report::{MachineCpu, UsageSample};

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
    // Linux keeps ru_maxrss across exec, so under `cargo run` it would report cargo's own
    // peak: the current image's high-water mark (VmHWM) is the tester's. ru_maxrss is in KiB.
    let max_rss = peak_rss_of_this_image().unwrap_or((usage.ru_maxrss.max(0) as u64) * 1024);
    (tv(usage.ru_utime) + tv(usage.ru_stime), max_rss)
}

/// `VmHWM` of `/proc/self/status` in bytes, where there is one.
fn peak_rss_of_this_image() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A [`UsageSample`] of now.
pub fn sample() -> UsageSample {
    UsageSample {
        at: Instant::now(),
        cpu: self_usage().0,
    }
}

/// The machine's CPU time so far, from the first line of `/proc/stat` (`None` where there is
/// no such file).
pub fn machine_cpu() -> Option<MachineCpu> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat(&stat)
}

/// Busy and total clock ticks from the text of `/proc/stat`: idle and iowait count as idle.
pub fn parse_proc_stat(stat: &str) -> Option<MachineCpu> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0);
    let cores = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Some(MachineCpu {
        busy_ticks: total - idle,
        total_ticks: total,
        cores: cores.max(1),
    })
}

/// CPU cores available to this process.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_comes_from_vm_hwm() {
        let status = "Name:\tsfu-load\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(12_345 * 1024));
        assert_eq!(parse_vm_hwm("Name: x\n"), None);
        // This test process has touched some memory.
        assert!(peak_rss_of_this_image().unwrap() > 1 << 20);
    }

    #[test]
    fn proc_stat_is_read() {
        let stat = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n";
        let cpu = parse_proc_stat(stat).unwrap();
        assert_eq!((cpu.busy_ticks, cpu.total_ticks, cpu.cores), (160, 980, 1));
        assert!(parse_proc_stat("intr 1 2 3").is_none());
        let here = machine_cpu().expect("Linux has /proc/stat");
        assert!(here.total_ticks >= here.busy_ticks);
    }

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
