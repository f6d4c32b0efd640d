//! `cdmctl tier`: the object store older points' data moves to (issue 21).
//! The secret key is read from a file, never from the command line (where
//! `ps` and shell histories would show it).

use cdm_api::client::Client;
use cdm_api::tier::{TierConfigPut, TierConfigView, DEFAULT_CACHE_BYTES, DEFAULT_PACK_MIB};
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{opt, time, Out};
use crate::units::{human, parse_size};

#[derive(Subcommand)]
pub(crate) enum TierCmd {
    /// Configure the object store (replaces the whole configuration).
    Set {
        /// http:// or https:// URL of the S3-compatible service.
        #[arg(long)]
        endpoint: String,
        #[arg(long)]
        bucket: String,
        /// Signing region (default us-east-1).
        #[arg(long)]
        region: Option<String>,
        /// Access key id.
        #[arg(long)]
        access_key: String,
        /// A file whose first line is the secret access key.
        #[arg(long)]
        secret_key_file: std::path::PathBuf,
        /// Path-style addressing (MinIO, Garage, Ceph without wildcard DNS).
        #[arg(long)]
        path_style: bool,
        /// Object key prefix (default cdm/POOL-UUID/).
        #[arg(long)]
        prefix: Option<String>,
        /// Local read cache (default 1G, at least 64M).
        #[arg(long, value_parser = parse_size)]
        cache_bytes: Option<u64>,
        /// Pack object size in MiB (16-64, default 32).
        #[arg(long)]
        pack_mib: Option<u32>,
        /// Most requests per second to the store.
        #[arg(long)]
        max_requests_per_sec: Option<u32>,
        /// Most MiB per second to and from the store.
        #[arg(long)]
        max_mib_per_sec: Option<u32>,
    },
    /// The configuration (never the secret key).
    Show,
    /// Forget the configuration (refused while points are tiered).
    Delete,
}

pub(crate) fn run(cmd: TierCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        TierCmd::Set {
            endpoint,
            bucket,
            region,
            access_key,
            secret_key_file,
            path_style,
            prefix,
            cache_bytes,
            pack_mib,
            max_requests_per_sec,
            max_mib_per_sec,
        } => {
            let req = TierConfigPut {
                endpoint,
                bucket,
                region: region.unwrap_or_else(|| cdm_api::tier::DEFAULT_REGION.to_string()),
                access_key,
                secret_key: read_secret(&secret_key_file)?,
                path_style,
                prefix,
                cache_bytes: cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES),
                max_requests_per_sec,
                max_mib_per_sec,
                pack_mib: pack_mib.unwrap_or(DEFAULT_PACK_MIB),
            };
            out.show(&c.set_tier(&req)?, tier_show);
        }
        TierCmd::Show => out.show(&c.tier()?, tier_show),
        TierCmd::Delete => {
            c.delete_tier()?;
            out.say("object tier configuration deleted".into());
        }
    }
    Ok(())
}

/// The first line of `p`, which must not be empty.
fn read_secret(p: &std::path::Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(p)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", p.display())))?;
    let line = text.lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return Err(CliError::Usage(format!(
            "{}: the first line (the secret key) is empty",
            p.display()
        )));
    }
    Ok(line.to_string())
}

fn tier_show(t: &TierConfigView) -> String {
    format!(
        "endpoint: {}\nbucket: {}\nregion: {}\naddressing: {}\nprefix: {}\naccess key: {}\nsecret key: {}\ncache: {}\npack size: {} MiB\nmax requests/s: {}\nmax MiB/s: {}\nupdated (UTC): {}\n",
        t.endpoint,
        t.bucket,
        t.region,
        if t.path_style { "path-style" } else { "virtual-host" },
        t.prefix,
        t.access_key,
        if t.secret_key_set { "set" } else { "not set" },
        human(t.cache_bytes),
        t.pack_mib,
        opt(&t.max_requests_per_sec),
        opt(&t.max_mib_per_sec),
        time(t.updated_unix),
    )
}
