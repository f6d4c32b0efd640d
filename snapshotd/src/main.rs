//! `snapshotd`: the appliance daemon. One process owns the pool under the
//! data directory and serves its volumes (read-write) and snapshots
//! (read-only, `VOLUME@ID`) over NBD. On first start it creates the pool.
//!
//! The HTTP API, scheduler and webhooks come with the daemon issue; until
//! then volumes and snapshots are managed offline with `cdmfs` while the
//! daemon is stopped.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use cdmfs::units::{human, parse_size};
use cdmfs::{FileDev, FormatOptions, OpenOptions, Pool};
use clap::Parser;
use nbd_server::server::serve_until_signal;
use nbd_server::{signals, Listener, Server, ServerConfig};

#[derive(Parser)]
#[command(
    name = "snapshotd",
    version,
    about = "cdm appliance daemon: owns the pool and serves it over NBD"
)]
struct Args {
    /// Data directory; the pool is DATA/pool.
    #[arg(long, default_value = "./cdm-data")]
    data: PathBuf,
    /// NBD listener, HOST:PORT or unix:PATH; repeatable.
    #[arg(long, default_value = "127.0.0.1:10809")]
    nbd: Vec<String>,
    /// Size of the pool file created on first start (sparse).
    #[arg(long, default_value = "64G", value_parser = parse_size)]
    pool_size: u64,
    /// Seconds between background commits.
    #[arg(long, default_value = "5")]
    commit_interval: u64,
    #[command(flatten)]
    tls: nbd_server::tls::TlsArgs,
}

fn main() -> Result<()> {
    nbd_server::init_logging();
    let args = Args::parse();
    signals::block_termination();
    std::fs::create_dir_all(&args.data)
        .with_context(|| format!("cannot create {}", args.data.display()))?;
    let path = args.data.join("pool");
    let dev = if path.exists() {
        FileDev::open(&path).with_context(|| format!("cannot open {}", path.display()))?
    } else {
        let dev = FileDev::create(&path, args.pool_size)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Pool::format(&dev, &FormatOptions::default()).context("cannot format the pool")?;
        tracing::info!(path = %path.display(), size = %human(args.pool_size), "created a new pool");
        dev
    };
    let pool = Arc::new(
        Pool::open(Arc::new(dev), &OpenOptions::default()).context("cannot open the pool")?,
    );
    let space = pool.space()?;
    tracing::info!(
        volumes = pool.list_volumes()?.len(),
        used = %human(space.used_bytes),
        total = %human(space.total_bytes),
        "pool open"
    );
    let cfg = ServerConfig {
        tls: args.tls.settings().context("TLS settings")?,
        ..Default::default()
    };
    let server = Server::new(pool, cfg);
    let listeners = Listener::bind_all(&args.nbd)?;
    serve_until_signal(
        &server,
        listeners,
        Duration::from_secs(args.commit_interval.max(1)),
    )
    .context("final commit failed")?;
    tracing::info!("pool committed; exiting");
    Ok(())
}
