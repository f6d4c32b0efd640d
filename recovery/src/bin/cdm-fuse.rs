//! `cdm-fuse`: the FUSE view of an offline pool (what `cdmfs mount` runs).
//! Mounts `volumes/NAME/disk` and `snapshots/VOLUME/ID/disk` at DIR until
//! SIGINT/SIGTERM, then unmounts and commits.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use cdmfs::Pool;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "cdm-fuse",
    version,
    about = "Mount the FUSE view of an offline cdm pool"
)]
struct Args {
    /// Pool file or block device.
    #[arg(short, long, env = "CDMFS_POOL", default_value = "./cdm-data/pool")]
    pool: PathBuf,
    /// Key file for encrypted volumes.
    #[arg(long, env = "CDMFS_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// I/O worker threads.
    #[arg(long, default_value = "4")]
    threads: usize,
    /// Where to mount.
    dir: PathBuf,
}

fn main() -> Result<()> {
    cdm_common::log::init(cdm_common::log::LevelFilter::INFO);
    let args = Args::parse();
    cdm_common::signals::block_termination();
    let pool = Arc::new(
        Pool::open_file(&args.pool, args.key_file.as_deref())
            .with_context(|| format!("cannot open pool {}", args.pool.display()))?,
    );
    let dir = std::env::current_dir()?.join(&args.dir);
    let m = cdm_recovery::fuse::mount(pool.clone(), &dir, args.threads)
        .with_context(|| format!("cannot mount at {}", args.dir.display()))?;
    tracing::info!(dir = %args.dir.display(), "mounted; SIGINT or SIGTERM unmounts");
    let sig = cdm_common::signals::wait_for_termination();
    tracing::info!(sig, "unmounting");
    m.unmount();
    pool.flush().context("final commit failed")?;
    Ok(())
}
