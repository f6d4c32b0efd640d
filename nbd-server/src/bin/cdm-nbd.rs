//! `cdm-nbd`: serve a pool's volumes and snapshots over NBD without the
//! daemon (tests, socket activation by nbdcopy/libnbd, rescue). The daemon
//! `snapshotd` embeds the same server.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use cdmfs::Pool;
use clap::Parser;
use std::time::Duration;

use cdm_common::signals;
use nbd_server::server::serve_until_signal;
use nbd_server::{Listener, Server, ServerConfig};

#[derive(Parser)]
#[command(name = "cdm-nbd", version, about = "Serve a cdm pool over NBD")]
struct Args {
    /// Pool file or block device.
    #[arg(short, long, env = "CDMFS_POOL")]
    pool: PathBuf,
    /// HOST:PORT or unix:PATH; repeatable. Ignored under socket activation.
    #[arg(short, long, default_value = "127.0.0.1:10809")]
    listen: Vec<String>,
    /// Export served for the empty export name.
    #[arg(short = 'e', long)]
    default_export: Option<String>,
    /// Serve every export read-only.
    #[arg(short, long)]
    read_only: bool,
    /// Worker threads per connection.
    #[arg(long, default_value = "4")]
    workers: usize,
    /// Key file for encrypted volumes (32 random bytes or 64 hex digits).
    #[arg(long, env = "CDMFS_KEY_FILE")]
    key_file: Option<PathBuf>,
    #[command(flatten)]
    tls: nbd_server::tls::TlsArgs,
}

fn main() -> Result<()> {
    cdm_common::log::init(cdm_common::log::LevelFilter::INFO);
    let args = Args::parse();
    signals::block_termination();
    let pool = Arc::new(
        Pool::open_file(&args.pool, args.key_file.as_deref())
            .with_context(|| format!("cannot open pool {}", args.pool.display()))?,
    );
    let cfg = ServerConfig {
        default_export: args.default_export,
        workers: args.workers,
        read_only: args.read_only,
        tls: args.tls.settings().context("TLS settings")?,
        ..Default::default()
    };
    let server = Server::new(pool, cfg);
    let listeners = Listener::bind_all(&args.listen)?;
    serve_until_signal(&server, listeners, Duration::from_secs(5))
        .context("final commit failed")?;
    Ok(())
}
