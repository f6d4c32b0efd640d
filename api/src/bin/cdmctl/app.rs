//! `cdmctl app`: applications (protected objects), their policy, on-demand
//! backups and points; `cdmctl restore`: restores run by an agent.

use cdm_api::client::Client;
use cdm_api::control::*;
use clap::Subcommand;

use crate::error::CliError;
use crate::job::{job_show, wait_job};
use crate::output::{opt, table_of, time, Out};

#[derive(Subcommand)]
pub(crate) enum AppCmd {
    List {
        #[arg(long)]
        host: Option<String>,
    },
    Show {
        id: u64,
    },
    /// Register an application by hand (agents register what they discover).
    Add {
        #[arg(long)]
        host: String,
        /// postgresql, mariadb, files, block or vm.
        #[arg(long)]
        kind: String,
        #[arg(long)]
        name: String,
        /// JSON object, e.g. '{"host": "/run/postgresql", "port": 5432, "user": "postgres"}'.
        #[arg(long)]
        config: Option<String>,
        /// The stage volume (default HOST-KIND-NAME).
        #[arg(long)]
        volume: Option<String>,
        #[arg(long)]
        policy: Option<String>,
    },
    /// Forget an application; its volume and points stay.
    Delete {
        id: u64,
    },
    /// Assign a protection policy (or none).
    SetPolicy {
        id: u64,
        #[arg(required_unless_present = "none")]
        policy: Option<String>,
        #[arg(long, conflicts_with = "policy")]
        none: bool,
    },
    /// Back up now.
    Backup {
        id: u64,
        /// Wait for the job; exit 1 if it failed.
        #[arg(long)]
        wait: bool,
    },
    /// Recovery points, newest first.
    Points {
        id: u64,
    },
}

#[derive(Subcommand)]
// Parsed once per run: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum RestoreCmd {
    /// Restore an application's point with an agent, on its host or another.
    Start {
        /// The application.
        id: u64,
        /// instant, clone or regular.
        #[arg(long)]
        kind: String,
        /// The point (default: the newest).
        #[arg(long)]
        snapshot: Option<u64>,
        /// The enrolled host to restore on (default: the application's).
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        /// regular: the directory to restore into.
        #[arg(long)]
        target: Option<String>,
        /// A point in time (RFC 3339 with a zone) instead of --snapshot:
        /// the archived logs replayed up to it.
        #[arg(long)]
        target_time: Option<String>,
        /// PostgreSQL: an LSN to replay up to.
        #[arg(long)]
        target_lsn: Option<String>,
        /// PostgreSQL: a restore point's name.
        #[arg(long)]
        target_name: Option<String>,
        /// MariaDB: a GTID to replay up to.
        #[arg(long)]
        target_gtid: Option<String>,
        #[arg(long)]
        wait: bool,
    },
    /// Restore jobs (of one application).
    List {
        #[arg(long)]
        application: Option<u64>,
    },
}

pub(crate) fn run(cmd: AppCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        AppCmd::List { host } => out.show(&c.applications(host.as_deref())?, |v| apps_table(v)),
        AppCmd::Show { id } => out.show(&c.application(id)?, app_show),
        AppCmd::Add {
            host,
            kind,
            name,
            config,
            volume,
            policy,
        } => {
            let config = match config {
                Some(s) => serde_json::from_str(&s)
                    .map_err(|e| CliError::Usage(format!("--config is no JSON: {e}")))?,
                None => serde_json::json!({}),
            };
            let a = c.create_application(&ApplicationCreate {
                host,
                kind,
                name,
                config,
                volume,
                policy,
            })?;
            out.show(&a, app_show);
        }
        AppCmd::Delete { id } => {
            c.delete_application(id)?;
            out.say(format!(
                "application {id} deleted (its volume and points stay)"
            ));
        }
        AppCmd::SetPolicy { id, policy, none } => {
            let p = if none { None } else { policy };
            out.show(&c.assign_policy(id, p.as_deref())?, app_show);
        }
        AppCmd::Backup { id, wait } => {
            let j = c.start_backup(id)?;
            if wait {
                wait_job(c, j.id, out)?;
            } else {
                out.show(&j, job_show);
            }
        }
        AppCmd::Points { id } => out.show(&c.points(id)?, |v| {
            table_of(
                v,
                &["SNAPSHOT", "CREATED (UTC)", "LABEL", "METADATA"],
                |p| {
                    vec![
                        p.snapshot.to_string(),
                        time(p.created_unix),
                        p.label.clone(),
                        p.metadata.to_string(),
                    ]
                },
            )
        }),
    }
    Ok(())
}

pub(crate) fn restore(cmd: RestoreCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        RestoreCmd::Start {
            id,
            kind,
            snapshot,
            host,
            name,
            port,
            target,
            target_time,
            target_lsn,
            target_name,
            target_gtid,
            wait,
        } => {
            let j = c.start_restore(
                id,
                &RestoreCreate {
                    kind,
                    snapshot,
                    host,
                    name,
                    port,
                    target,
                    target_time,
                    target_lsn,
                    target_name,
                    target_gtid,
                },
            )?;
            if wait {
                wait_job(c, j.id, out)?;
            } else {
                out.show(&j, job_show);
            }
        }
        RestoreCmd::List { application } => {
            let q = JobQuery {
                application,
                kind: Some("restore".into()),
                ..JobQuery::default()
            };
            out.show(&c.jobs_where(&q)?, |v| crate::job::jobs_table(v));
        }
    }
    Ok(())
}

fn apps_table(v: &[Application]) -> String {
    table_of(
        v,
        &[
            "ID",
            "HOST",
            "KIND",
            "NAME",
            "VOLUME",
            "POLICY",
            "RPO",
            "LAST POINT (UTC)",
        ],
        |a| {
            vec![
                a.id.to_string(),
                a.host.clone(),
                a.kind.clone(),
                a.name.clone(),
                a.volume.clone(),
                opt(&a.policy),
                a.rpo.state.clone(),
                a.rpo
                    .last_point_unix
                    .map(time)
                    .unwrap_or_else(|| "-".into()),
            ]
        },
    )
}

fn app_show(a: &Application) -> String {
    let last_job = a
        .rpo
        .last_job
        .as_ref()
        .map(|j| format!("{} {} ({})", j.id, j.state, j.message))
        .unwrap_or_else(|| "-".into());
    format!(
        "id: {}\nhost: {}\nkind: {}\nname: {}\nvolume: {}\npolicy: {}\ndiscovered: {}\nsize: {}\nconfig: {}\nrpo: {} (newest point {}, age {} s, objective {} s)\nlast backup job: {}\nlog archive: {}\n",
        a.id,
        a.host,
        a.kind,
        a.name,
        a.volume,
        opt(&a.policy),
        a.discovered,
        opt(&a.size_bytes),
        a.config,
        a.rpo.state,
        opt(&a.rpo.last_point),
        opt(&a.rpo.age_seconds),
        opt(&a.rpo.rpo_seconds),
        last_job,
        log_archive(a.log_archive.as_ref())
    )
}

/// `streaming (covered 2026-11-30T10:00:00Z, lag 2 s)`, with the error
/// when failing; `off` when the policy does not archive logs.
fn log_archive(l: Option<&LogArchiveStatus>) -> String {
    let Some(l) = l else {
        return "off".into();
    };
    let mut s = format!(
        "{} (covered {}, lag {} s)",
        l.state,
        opt(&l.covered),
        opt(&l.lag_seconds)
    );
    if let Some(e) = &l.error {
        s.push_str(&format!(": {e}"));
    }
    s
}
