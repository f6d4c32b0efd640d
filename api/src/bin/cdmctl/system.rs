//! `cdmctl pool`, `clock`, `health`, `metrics` and `openapi`: the appliance itself.

use cdm_api::client::Client;
use cdm_api::types::*;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{table_of, time, Out};
use crate::units::{human, parse_size};

#[derive(Subcommand)]
pub(crate) enum PoolCmd {
    Show,
    /// SIZE, or `none` to remove the quota.
    SetQuota {
        quota: String,
    },
    /// Grow the pool to SIZE (e.g. 200G; a multiple of 4 KiB). The new
    /// range of a preallocated pool is allocated on the host filesystem
    /// now, so the host must have the room (else 507 no_space).
    Grow {
        size: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum ClockCmd {
    Show,
    Advance { seconds: u64 },
}

pub(crate) fn pool(cmd: PoolCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        PoolCmd::Show => out.show(&c.pool()?, pool_show),
        PoolCmd::SetQuota { quota } => {
            let q = if quota == "none" {
                None
            } else {
                Some(parse_size(&quota).map_err(|e| CliError::Usage(e.to_string()))?)
            };
            out.show(
                &c.set_pool_policy(&PoolPolicy { quota_bytes: q })?,
                pool_show,
            );
        }
        PoolCmd::Grow { size } => {
            let n = parse_size(&size).map_err(|e| CliError::Usage(e.to_string()))?;
            out.show(&c.grow_pool(n)?, pool_show);
        }
    }
    Ok(())
}

pub(crate) fn clock(cmd: ClockCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    let v = match cmd {
        ClockCmd::Show => c.clock()?,
        ClockCmd::Advance { seconds } => c.advance_clock(seconds)?,
    };
    out.show(&v, |v| {
        format!(
            "{} ({}){}\n",
            time(v.now_unix),
            v.now_unix,
            if v.fake { " fake" } else { "" }
        )
    });
    Ok(())
}

fn pool_show(p: &PoolInfo) -> String {
    format!(
        "uuid: {}\nsize: {}{}\nused: {} ({:.1}%)\nfree: {}\ngeneration: {}\nvolumes: {}\nsnapshots: {}\nquota: {}\n",
        p.uuid,
        human(p.total_bytes),
        if p.preallocated {
            " (preallocated)"
        } else {
            " (sparse)"
        },
        human(p.used_bytes),
        if p.total_bytes > 0 {
            p.used_bytes as f64 * 100.0 / p.total_bytes as f64
        } else {
            0.0
        },
        human(p.free_bytes),
        p.generation,
        p.volumes,
        p.snapshots,
        p.policy.quota_bytes.map(human).unwrap_or_else(|| "none".into())
    ) + &format!(
        "encryption key: {}\ndata reduction: {} logical, {} after dedup, {} after compression ({:.2}x)\ndata allocated: {}\n\n{}",
        p.encryption_key,
        human(p.reduction.pool.logical_bytes),
        human(p.reduction.pool.after_dedup_bytes),
        human(p.reduction.pool.after_compression_bytes),
        p.reduction.pool.ratio,
        human(p.reduction.data_allocated_bytes),
        table_of(
            &p.reduction.volumes,
            &["VOLUME", "LOGICAL", "AFTER DEDUP", "AFTER COMPRESSION", "RATIO"],
            |v| vec![
                v.name.clone(),
                human(v.figures.logical_bytes),
                human(v.figures.after_dedup_bytes),
                human(v.figures.after_compression_bytes),
                format!("{:.2}x", v.figures.ratio),
            ],
        )
    )
}

pub(crate) fn health(c: &Client, out: &Out) -> Result<(), CliError> {
    out.show(&c.health()?, |v| format!("{v}\n"));
    Ok(())
}

pub(crate) fn metrics(c: &Client) -> Result<(), CliError> {
    print!("{}", c.metrics()?);
    Ok(())
}

pub(crate) fn openapi(c: &Client) -> Result<(), CliError> {
    println!(
        "{}",
        serde_json::to_string_pretty(&c.openapi()?).unwrap_or_default()
    );
    Ok(())
}
