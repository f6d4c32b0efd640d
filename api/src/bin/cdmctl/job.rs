//! `cdmctl job`: long operations, and waiting for them with a progress bar.

use std::io::IsTerminal;
use std::time::Duration;

use cdm_api::client::Client;
use cdm_api::control::JobQuery;
use cdm_api::types::*;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{opt, table_of, time, Out};

#[derive(Subcommand)]
pub(crate) enum JobCmd {
    /// The newest 200 jobs (that pass the filters).
    List {
        #[arg(long)]
        application: Option<u64>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        /// queued, running, succeeded, failed or cancelled.
        #[arg(long)]
        state: Option<String>,
    },
    /// The log an agent streamed for the job.
    Log {
        id: u64,
    },
    /// Cancel a queued job, or ask the agent running it to stop.
    Cancel {
        id: u64,
    },
    Show {
        id: u64,
    },
    /// Start scrub, retention, delete-volume, vm-backup, defrag
    /// (`job start defrag VOLUME [--rate MB/s]`), or with an object tier
    /// `tier VOLUME [--snapshot ID]`, `recall VOLUME --snapshot ID`,
    /// `tier-gc`.
    Start {
        kind: String,
        /// The volume (delete-volume, defrag, tier, recall); same as --volume.
        #[arg(conflicts_with = "volume")]
        name: Option<String>,
        #[arg(long)]
        volume: Option<String>,
        #[arg(long)]
        force: bool,
        /// tier: this point now (whatever its age); recall: the point.
        #[arg(long)]
        snapshot: Option<u64>,
        /// vm-backup: the VM inventory (a path on the appliance).
        #[arg(long)]
        inventory: Option<String>,
        /// vm-backup: the category (os:linux, app:PostgreSQL, keyword:db, path:DIR, pool:NAME).
        #[arg(long)]
        category: Option<String>,
        /// vm-backup: VMs at a time.
        #[arg(long)]
        parallel: Option<usize>,
        /// defrag: most MB/s rewritten (default 50).
        #[arg(long)]
        rate: Option<u64>,
        /// defrag: the block to start at (to resume a pass).
        #[arg(long)]
        from_block: Option<u64>,
        /// Wait for it, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Wait for a job, with a progress bar; exit 1 if it failed.
    Wait {
        id: u64,
    },
}

pub(crate) fn run(cmd: JobCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        JobCmd::List {
            application,
            host,
            kind,
            state,
        } => {
            let q = JobQuery {
                application,
                host,
                kind,
                state,
            };
            out.show(&c.jobs_where(&q)?, |v| jobs_table(v))
        }
        JobCmd::Log { id } => out.show(&c.job_log(id)?, |l| {
            l.lines
                .iter()
                .map(|x| format!("{}  {}\n", time(x.time_unix), x.line))
                .collect()
        }),
        JobCmd::Cancel { id } => out.show(&c.cancel_job(id)?, job_show),
        JobCmd::Show { id } => out.show(&c.job(id)?, job_show),
        JobCmd::Start {
            kind,
            name,
            volume,
            force,
            snapshot,
            inventory,
            category,
            parallel,
            rate,
            from_block,
            wait,
        } => {
            let j = c.start_job(&JobCreate {
                kind,
                volume: name.or(volume),
                snapshot,
                force,
                inventory,
                category,
                parallel,
                rate_mb_s: rate,
                from_block,
            })?;
            if wait {
                wait_job(c, j.id, out)?;
            } else {
                out.show(&j, job_show);
            }
        }
        JobCmd::Wait { id } => {
            wait_job(c, id, out)?;
        }
    }
    Ok(())
}

pub(crate) fn jobs_table(v: &[Job]) -> String {
    table_of(
        v,
        &[
            "ID",
            "KIND",
            "STATE",
            "HOST",
            "APP",
            "PROGRESS",
            "BY",
            "STARTED (UTC)",
            "MESSAGE",
        ],
        |j| {
            vec![
                j.id.to_string(),
                j.kind.clone(),
                j.state.clone(),
                opt(&j.host),
                opt(&j.application),
                format!("{:.0}%", j.progress * 100.0),
                j.created_by.clone(),
                time(j.created_unix),
                j.message.clone(),
            ]
        },
    )
}

pub(crate) fn job_show(j: &Job) -> String {
    format!(
        "id: {}\nkind: {}\nstate: {}\nhost: {}\napplication: {}\nattempt: {}\nprogress: {:.1}% ({} of {})\nby: {}\nstarted: {}\nfinished: {}\nmessage: {}\nresult: {}\n",
        j.id,
        j.kind,
        j.state,
        opt(&j.host),
        opt(&j.application),
        j.attempt,
        j.progress * 100.0,
        j.done,
        j.total,
        j.created_by,
        time(j.created_unix),
        j.finished_unix.map(time).unwrap_or_else(|| "-".into()),
        j.message,
        j.result.as_ref().map(|r| r.to_string()).unwrap_or_else(|| "-".into())
    )
}

/// Polls a job until it ends, drawing a progress bar on a terminal.
pub(crate) fn wait_job(c: &Client, id: u64, out: &Out) -> Result<Job, CliError> {
    let bar = if !out.json && std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(1000);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} job {prefix} [{bar:40}] {percent:>3}% {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_prefix(id.to_string());
        Some(b)
    } else {
        None
    };
    let j = loop {
        let j = c.job(id)?;
        if let Some(b) = &bar {
            b.set_position((j.progress * 1000.0) as u64);
            b.set_message(format!("{} {}", j.kind, j.state));
        }
        // Agent jobs wait for their host first.
        if j.state != "running" && j.state != "queued" {
            break j;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    out.show(&j, job_show);
    if j.state == "failed" || j.state == "cancelled" {
        return Err(CliError::JobFailed(format!(
            "job {id} {}: {}",
            j.state, j.message
        )));
    }
    Ok(j)
}
