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
use nbd_server::listener::{clear_ready_file, json_string, write_ready_file};
use nbd_server::server::{start, wait_for_signal_then_commit};
use nbd_server::{Listener, Server, ServerConfig};

#[derive(Parser)]
#[command(name = "cdm-nbd", version, about = "Serve a cdm pool over NBD")]
struct Args {
    /// Pool file or block device.
    #[arg(short, long, env = "CDMFS_POOL")]
    pool: PathBuf,
    /// HOST:PORT or unix:PATH; repeatable. Ignored under socket activation.
    /// Port 0 lets the kernel choose a free port: see --ready-file.
    #[arg(short, long, default_value = "127.0.0.1:10809")]
    listen: Vec<String>,
    /// Once every listener is bound, write the addresses actually bound
    /// here as JSON, `{"nbd": ["127.0.0.1:41235", "unix:/run/x.sock"]}`
    /// (atomically: a reader sees no file or the whole file). Removed at
    /// start if left by an earlier run.
    #[arg(long)]
    ready_file: Option<PathBuf>,
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
    if let Some(p) = &args.ready_file {
        clear_ready_file(p).with_context(|| format!("cannot remove {}", p.display()))?;
    }
    let server = Server::new(pool.clone(), cfg);
    let listeners = Listener::bind_all(&args.listen)?;
    let addrs = start(&server, listeners, Duration::from_secs(5))?;
    if let Some(p) = &args.ready_file {
        let list: Vec<String> = addrs.iter().map(|a| json_string(a)).collect();
        write_ready_file(p, &format!("{{\"nbd\": [{}]}}", list.join(", ")))
            .with_context(|| format!("cannot write the ready file {}", p.display()))?;
    }
    wait_for_signal_then_commit(&server).context("final commit failed")?;
    // The flush above made every write durable (in the intent log);
    // committing the trees too makes the next open replay nothing.
    pool.commit().context("final commit failed")?;
    Ok(())
}
