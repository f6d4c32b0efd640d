//! `cdmctl event` and `cdmctl audit`: the event and audit logs.

use std::time::Duration;

use cdm_api::client::Client;
use cdm_api::types::*;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{table_of, time, Out};

#[derive(Subcommand)]
pub(crate) enum EventCmd {
    List {
        #[arg(long)]
        after: Option<u64>,
        #[arg(long = "type")]
        kind: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Print new events as they come, until interrupted.
    Watch {
        #[arg(long = "type")]
        kind: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    List {
        #[arg(long)]
        after: Option<u64>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
}

pub(crate) fn run(cmd: EventCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        EventCmd::List { after, kind, limit } => {
            let v = c.events(&EventQuery { after, kind, limit })?;
            out.show(&v, |v| events_table(v));
        }
        EventCmd::Watch { kind } => {
            let mut after = c
                .events(&EventQuery {
                    after: None,
                    kind: None,
                    limit: Some(1),
                })?
                .last()
                .map(|e| e.id)
                .unwrap_or(0);
            loop {
                let v = c.events(&EventQuery {
                    after: Some(after),
                    kind: kind.clone(),
                    limit: Some(1000),
                })?;
                for e in &v {
                    after = after.max(e.id);
                    if out.json {
                        println!("{}", serde_json::to_string(e).unwrap_or_default());
                    } else {
                        println!(
                            "{}  {}  {}  {}  {}",
                            time(e.time_unix),
                            e.kind,
                            e.subject,
                            e.actor,
                            e.data
                        );
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    Ok(())
}

pub(crate) fn audit(cmd: AuditCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    let AuditCmd::List { after, user, limit } = cmd;
    let v = c.audit(&AuditQuery { after, user, limit })?;
    out.show(&v, |v| {
        table_of(
            v,
            &[
                "ID",
                "TIME (UTC)",
                "USER",
                "TOKEN",
                "METHOD",
                "PATH",
                "STATUS",
            ],
            |a| {
                vec![
                    a.id.to_string(),
                    time(a.time_unix),
                    a.user.clone(),
                    a.token.clone(),
                    a.method.clone(),
                    a.path.clone(),
                    a.status.to_string(),
                ]
            },
        )
    });
    Ok(())
}

fn events_table(v: &[Event]) -> String {
    table_of(
        v,
        &["ID", "TIME (UTC)", "TYPE", "SUBJECT", "ACTOR", "DATA"],
        |e| {
            vec![
                e.id.to_string(),
                time(e.time_unix),
                e.kind.clone(),
                e.subject.clone(),
                e.actor.clone(),
                e.data.to_string(),
            ]
        },
    )
}
