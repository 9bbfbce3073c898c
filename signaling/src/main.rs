//! `sfu-server`: the whole SFU in one process (signaling, call page, media), and
//! `sfu-server token`, which prints a join token signed with the server's auth secret.

use anyhow::Context;
use clap::Parser;
use signaling::auth::{self, Claims};
use signaling::config::{Cli, Command, TokenArgs};
use signaling::Server;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// How long shutdown may take before the process exits anyway.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(4);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Token(args)) = cli.command {
        return print_token(cli.server.auth_secret.as_ref(), args);
    }
    let config = cli.server;
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

fn print_token(secret: Option<&auth::Secret>, args: TokenArgs) -> anyhow::Result<()> {
    let secret = secret.context(
        "no auth secret: pass --auth-secret or set SFU_AUTH_SECRET to the server's secret",
    )?;
    if !signaling::protocol::is_valid_room(&args.room) {
        anyhow::bail!("--room must be 1–64 characters, each a letter, digit, '_' or '-'");
    }
    let claims = Claims::new(args.room, args.name, args.ttl, !args.no_publish);
    println!("{}", auth::mint(secret, &claims)?);
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
