//! The live progress line on stderr (indicatif): joined/planned as a bar, then bitrate in and
//! out, loss, errors and the server's CPU, refreshed every second. Hidden when stderr is not a
//! terminal, so logs and CI output stay clean.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::report::fmt_bps;
use super::run::{LiveStatus, Phase};

/// The progress display of one run.
pub struct Progress {
    /// The bar.
    bar: ProgressBar,
}

impl Progress {
    /// A bar for `planned` joins on stderr.
    pub fn new(planned: usize) -> Self {
        let bar = ProgressBar::with_draw_target(
            Some(planned as u64),
            ProgressDrawTarget::stderr_with_hz(4),
        );
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {elapsed:>4} [{bar:20}] {pos}/{len} joined  {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        Progress { bar }
    }

    /// Shows `status`.
    pub fn update(&self, status: &LiveStatus) {
        self.bar.set_position(status.joined as u64);
        self.bar.set_message(status_line(status));
        self.bar.tick();
    }

    /// Removes the bar (before the report is printed).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// The text after the bar.
pub fn status_line(status: &LiveStatus) -> String {
    let phase = match status.phase {
        Phase::Joining => "joining".to_owned(),
        Phase::Holding { remaining } => format!("holding, {}s left", remaining.as_secs()),
        Phase::Leaving => "leaving".to_owned(),
    };
    let server = status
        .server_cpu_percent
        .map_or(String::new(), |cpu| format!("  server CPU {cpu:.0}%"));
    format!(
        "{phase}  in {}  out {}  loss {:.2}%  errors {}{}{server}",
        fmt_bps(status.receive_bps),
        fmt_bps(status.send_bps),
        status.loss_pct,
        status.errors,
        if status.failed > 0 {
            format!(" ({} joins failed)", status.failed)
        } else {
            String::new()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_line_says_what_is_happening() {
        let status = LiveStatus {
            phase: Phase::Holding {
                remaining: Duration::from_millis(12_400),
            },
            planned: 4,
            joined: 4,
            failed: 1,
            receive_bps: 2_000_000.0,
            send_bps: 1_000_000.0,
            loss_pct: 0.25,
            errors: 1,
            server_cpu_percent: Some(37.4),
        };
        assert_eq!(
            status_line(&status),
            "holding, 12s left  in 2.00 Mbit/s  out 1.00 Mbit/s  loss 0.25%  errors 1 (1 joins failed)  server CPU 37%"
        );
    }
}
