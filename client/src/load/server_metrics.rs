//! Reading the server's CPU time and resident memory: from its Prometheus `/metrics` endpoint
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`), as an operator's scraper
//! would, or, for a server on this machine without such an endpoint (Janus) or to measure
//! two servers the same way, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
//!
//! One plain-HTTP GET per reading: an HTTP/1.0 request, so the answer is never chunked and ends
//! when the server closes. A full HTTP client stack would be a large dependency for this one
//! loopback request.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::report::MetricsSample;

/// How long one reading may take.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Where server readings come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerProbe {
    /// A Prometheus `/metrics` URL.
    Metrics(String),
    /// The process with this id on this machine.
    Process(u32),
}

impl ServerProbe {
    /// One reading.
    pub async fn read(&self) -> Result<MetricsSample, String> {
        match self {
            ServerProbe::Metrics(url) => read_sample(url).await,
            ServerProbe::Process(pid) => read_process_sample(*pid),
        }
    }
}

/// Reads one sample of process `pid` from `/proc`: user + system CPU time of all its threads
/// (`/proc/<pid>/stat`) and its resident memory (`VmRSS` of `/proc/<pid>/status`).
pub fn read_process_sample(pid: u32) -> Result<MetricsSample, String> {
    let at = Instant::now();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e} (is the server running with that pid?)"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("/proc/{pid}/status: {e}"))?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    parse_proc_sample(&stat, &status, ticks_per_second as f64, at)
        .ok_or_else(|| format!("/proc/{pid}: unexpected format"))
}

/// CPU seconds from the text of `/proc/<pid>/stat` and RSS bytes from that of
/// `/proc/<pid>/status`.
pub fn parse_proc_sample(
    stat: &str,
    status: &str,
    ticks_per_second: f64,
    at: Instant,
) -> Option<MetricsSample> {
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    // Then field 3 is the state, and utime and stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    (ticks_per_second > 0.0).then(|| MetricsSample {
        at,
        cpu_seconds: ticks as f64 / ticks_per_second,
        rss_bytes: (rss_kib * 1024) as f64,
    })
}

/// The metrics URL of the server behind a signaling URL: `ws://HOST:PORT/anything` →
/// `http://HOST:PORT/metrics`. `None` for `wss://` (TLS is not spoken here) or a URL without
/// a host.
pub fn metrics_url_for(signaling_url: &str) -> Option<String> {
    let rest = signaling_url.strip_prefix("ws://")?;
    let authority = rest.split('/').next().filter(|a| !a.is_empty())?;
    Some(format!("http://{authority}/metrics"))
}

/// Reads one sample from `url` (`http://HOST:PORT/PATH`).
pub async fn read_sample(url: &str) -> Result<MetricsSample, String> {
    let body = tokio::time::timeout(READ_TIMEOUT, http_get(url))
        .await
        .map_err(|_| format!("{url} did not answer within {READ_TIMEOUT:?}"))??;
    parse_sample(&body, Instant::now())
}

/// Picks the two process series out of a Prometheus text body.
pub fn parse_sample(body: &str, at: Instant) -> Result<MetricsSample, String> {
    let series = |name: &str| {
        body.lines().find_map(|line| {
            let (key, value) = line.trim().split_once(' ')?;
            (key == name).then(|| value.trim().parse::<f64>().ok())?
        })
    };
    let cpu_seconds =
        series("process_cpu_seconds_total").ok_or("no process_cpu_seconds_total in /metrics")?;
    let rss_bytes = series("process_resident_memory_bytes")
        .ok_or("no process_resident_memory_bytes in /metrics")?;
    Ok(MetricsSample {
        at,
        cpu_seconds,
        rss_bytes,
    })
}

async fn http_get(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// metrics URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut stream = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: not an HTTP response"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{url}: {status}"));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_url_follows_the_signaling_url() {
        assert_eq!(
            metrics_url_for("ws://127.0.0.1:8080/ws").as_deref(),
            Some("http://127.0.0.1:8080/metrics")
        );
        assert_eq!(
            metrics_url_for("ws://localhost:9").as_deref(),
            Some("http://localhost:9/metrics")
        );
        assert_eq!(metrics_url_for("wss://example.org/ws"), None);
        assert_eq!(metrics_url_for("ws:///ws"), None);
    }

    #[test]
    fn proc_readings_are_parsed() {
        let stat = "4242 (janus (main)) S 1 4242 4242 0 -1 4194560 5000 0 0 0 250 70 0 0 20 0 \
                    12 0 100 500000000 3000 18446744073709551615";
        let status = "Name:\tjanus\nVmHWM:\t  9000 kB\nVmRSS:\t  8000 kB\nThreads:\t12\n";
        let s = parse_proc_sample(stat, status, 100.0, Instant::now()).unwrap();
        assert_eq!(s.cpu_seconds, 3.2);
        assert_eq!(s.rss_bytes, 8000.0 * 1024.0);
        assert!(parse_proc_sample("garbage", status, 100.0, Instant::now()).is_none());

        // This very process, read the way a server is.
        let me = read_process_sample(std::process::id()).unwrap();
        assert!(me.rss_bytes > 1e6, "{me:?}");
        let err = read_process_sample(u32::MAX).unwrap_err();
        assert!(err.contains("is the server running"), "{err}");
    }

    #[test]
    fn process_series_are_parsed() {
        let body = "# HELP process_cpu_seconds_total Total user and system CPU time.\n\
                    # TYPE process_cpu_seconds_total counter\n\
                    process_cpu_seconds_total 12.34\n\
                    process_resident_memory_bytes 4.5056e+07\n\
                    process_resident_memory_bytes_extra 1\n";
        let s = parse_sample(body, Instant::now()).unwrap();
        assert_eq!(s.cpu_seconds, 12.34);
        assert_eq!(s.rss_bytes, 45_056_000.0);
        let err = parse_sample("sfu_rooms 1\n", Instant::now()).unwrap_err();
        assert!(err.contains("process_cpu_seconds_total"), "{err}");
    }
}
