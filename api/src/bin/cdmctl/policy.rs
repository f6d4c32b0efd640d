//! `cdmctl policy`: protection policies (SLA templates) assigned to
//! applications: schedule and windows, retention, RPO, bandwidth, volume
//! settings, retries.

use cdm_api::client::Client;
use cdm_api::control::*;
use clap::{Args, Subcommand};

use crate::error::CliError;
use crate::output::{opt, table_of, Out};

#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    Create(PolicyArgs),
    /// Replace a policy (every application that has it follows).
    Update(PolicyArgs),
    List,
    Show {
        name: String,
    },
    /// Refused while applications have it.
    Delete {
        name: String,
    },
}

#[derive(Args)]
pub(crate) struct PolicyArgs {
    name: String,
    /// Back up every SECONDS (at least 60).
    #[arg(long, conflicts_with = "cron", required_unless_present = "cron")]
    interval: Option<u64>,
    /// Back up at the times of a five-field cron expression (UTC).
    #[arg(long)]
    cron: Option<String>,
    /// Largest age of the newest point before the application is late (seconds).
    #[arg(long)]
    rpo: u64,
    /// HH:MM-HH:MM (UTC) when backups may start (repeatable; default any time).
    #[arg(long = "window")]
    windows: Vec<String>,
    #[arg(long)]
    keep_last: Option<u32>,
    #[arg(long)]
    keep_days: Option<u32>,
    #[arg(long)]
    min_keep: Option<u32>,
    /// MiB/s for the agent's transfers.
    #[arg(long)]
    bandwidth: Option<u64>,
    /// HH:MM-HH:MM=MIBPS (repeatable).
    #[arg(long = "bandwidth-window")]
    bandwidth_windows: Vec<String>,
    /// Stage volume block size (bytes).
    #[arg(long)]
    block_size: Option<u32>,
    #[arg(long)]
    dedup: Option<bool>,
    /// zstd level, 0 = off.
    #[arg(long)]
    compression: Option<u8>,
    /// none, aes-256-xts, aes-128-xts or sm4-xts.
    #[arg(long)]
    encryption: Option<String>,
    /// Retries of a failed scheduled backup [default: 2].
    #[arg(long)]
    retries: Option<u32>,
    /// A recovery drill every SECONDS (`cdmctl drill` shows the reports).
    #[arg(long)]
    drill_interval: Option<u64>,
    /// The drills' RTO target (seconds).
    #[arg(long)]
    drill_rto: Option<u64>,
    /// The drills' RPO target (seconds).
    #[arg(long)]
    drill_rpo: Option<u64>,
    /// A drill's time limit (seconds) [default: 600].
    #[arg(long)]
    drill_timeout: Option<u64>,
    /// Archive the WAL or binlogs of its PostgreSQL and MariaDB
    /// applications continuously (their agents run the archiver).
    #[arg(long)]
    archive_logs: bool,
}

impl PolicyArgs {
    fn policy(self) -> Result<ProtectionPolicy, CliError> {
        let windows = self
            .windows
            .iter()
            .map(|w| {
                w.split_once('-')
                    .map(|(s, e)| Window {
                        start: s.to_string(),
                        end: e.to_string(),
                    })
                    .ok_or_else(|| CliError::Usage(format!("--window {w:?}: use HH:MM-HH:MM")))
            })
            .collect::<Result<_, _>>()?;
        Ok(ProtectionPolicy {
            name: self.name,
            interval_seconds: self.interval,
            cron: self.cron,
            windows,
            keep_last: self.keep_last,
            keep_days: self.keep_days,
            min_keep: self.min_keep,
            rpo_seconds: self.rpo,
            bandwidth_mibps: self.bandwidth,
            bandwidth_windows: self.bandwidth_windows,
            volume: VolumeSettings {
                block_size: self.block_size,
                dedup: self.dedup,
                compression: self.compression,
                encryption: self.encryption,
            },
            retries: self.retries.unwrap_or(2),
            replication: None,
            drill_interval_seconds: self.drill_interval,
            drill_point: None,
            drill_probes: Vec::new(),
            drill_rto_seconds: self.drill_rto,
            drill_rpo_seconds: self.drill_rpo,
            drill_timeout_seconds: self.drill_timeout,
            drill_host: None,
            archive_logs: self.archive_logs,
        })
    }
}

pub(crate) fn run(cmd: PolicyCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        PolicyCmd::Create(a) => out.show(&c.create_protection_policy(&a.policy()?)?, policy_show),
        PolicyCmd::Update(a) => out.show(&c.update_protection_policy(&a.policy()?)?, policy_show),
        PolicyCmd::List => out.show(&c.protection_policies()?, |v| {
            table_of(
                v,
                &[
                    "NAME",
                    "SCHEDULE",
                    "WINDOWS",
                    "RPO (s)",
                    "RETENTION",
                    "RETRIES",
                ],
                |p| {
                    vec![
                        p.name.clone(),
                        schedule(p),
                        windows(p),
                        p.rpo_seconds.to_string(),
                        retention(p),
                        p.retries.to_string(),
                    ]
                },
            )
        }),
        PolicyCmd::Show { name } => out.show(&c.protection_policy(&name)?, policy_show),
        PolicyCmd::Delete { name } => {
            c.delete_protection_policy(&name)?;
            out.say(format!("protection policy {name} deleted"));
        }
    }
    Ok(())
}

fn schedule(p: &ProtectionPolicy) -> String {
    match (&p.cron, p.interval_seconds) {
        (Some(c), _) => format!("cron {c}"),
        (None, Some(i)) => format!("every {i} s"),
        _ => "-".into(),
    }
}

fn windows(p: &ProtectionPolicy) -> String {
    if p.windows.is_empty() {
        return "any".into();
    }
    p.windows
        .iter()
        .map(|w| format!("{}-{}", w.start, w.end))
        .collect::<Vec<_>>()
        .join(",")
}

fn retention(p: &ProtectionPolicy) -> String {
    format!(
        "last {} / days {} / min {}",
        opt(&p.keep_last),
        opt(&p.keep_days),
        opt(&p.min_keep)
    )
}

fn policy_show(p: &ProtectionPolicy) -> String {
    format!(
        "name: {}\nschedule: {}\nwindows: {}\nrpo: {} s\nretention: {}\nbandwidth: {} MiB/s {}\nvolume: {}\nretries: {}\narchive logs: {}\n",
        p.name,
        schedule(p),
        windows(p),
        p.rpo_seconds,
        retention(p),
        opt(&p.bandwidth_mibps),
        p.bandwidth_windows.join(","),
        serde_json::to_string(&p.volume).unwrap_or_default(),
        p.retries,
        if p.archive_logs { "yes" } else { "no" }
    )
}
