//! `sfu-server`: the whole SFU in one process (signaling, call page, media).

use clap::Parser;
use signaling::config::ServerConfig;
use signaling::Server;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// How long shutdown may take before the process exits anyway.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(4);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ServerConfig::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&config.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let ice_ips = config.resolved_ice_ips();
    let server = Server::start(config).await?;
    tracing::info!(?ice_ips, "media addresses");
    println!("sfu-server listening on http://{}", server.addr);
    wait_for_signal().await;
    tracing::info!("shutting down");
    server.shutdown(SHUTDOWN_BUDGET).await;
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
