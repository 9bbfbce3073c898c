//! `sfu-load`: the load tester's command line. Parses flags, runs [`client::load::run_load`]
//! with a progress bar on stderr, prints the report (text, or JSON on stdout with `--json`),
//! and exits 0 on PASS, 1 on FAIL, 2 on bad flags. Ctrl-C ends the run early and still prints
//! the report after every peer has left; a second Ctrl-C exits at once.

use clap::Parser;
use client::load::progress::Progress;
use client::load::{run_load, Args};

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SFU_LOAD_LOG")
                .unwrap_or_else(|_| "warn,webrtc=error,rtc=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match args.to_config() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sfu-load: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    raise_open_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let report = runtime.block_on(async move {
        let progress = Progress::new(config.total_peers());
        let stop = async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nsfu-load: stopping; peers are leaving (Ctrl-C again to quit now)");
                tokio::spawn(async {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        std::process::exit(130);
                    }
                });
            } else {
                // No signal handling here: never stop early.
                std::future::pending::<()>().await;
            }
        };
        let report = run_load(config, stop, |status| progress.update(status)).await;
        progress.finish();
        report
    });
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    if let Some(path) = &args.json_out {
        if let Err(e) = std::fs::write(path, report.to_json() + "\n") {
            eprintln!("sfu-load: could not write {}: {e}", path.display());
        }
    }
    if report.verdict.pass {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

/// Every peer holds a WebSocket and one UDP socket per peer connection: raise the soft limit
/// on open files to the hard limit, so a few hundred peers do not hit a default of 1024.
fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut limit: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
