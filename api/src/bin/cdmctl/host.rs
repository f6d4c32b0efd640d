//! `cdmctl host`: enrolment tokens for agents, enrolled hosts, retirement.

use cdm_api::client::Client;
use cdm_api::control::*;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{opt, table_of, time, Out};

#[derive(Subcommand)]
pub(crate) enum HostCmd {
    /// A one-use token for `cdm-agent serve --enrol TOKEN`.
    EnrolToken {
        /// The host's name (default: the agent's --name, else its host name).
        #[arg(long)]
        name: Option<String>,
        /// Seconds the token stays valid (default 3600, at most 7 days).
        #[arg(long)]
        ttl: Option<u64>,
    },
    List,
    Show {
        name: String,
    },
    /// Revoke the host's credential at once; its queued jobs are cancelled
    /// and its running jobs fail. Its applications and points stay.
    Retire {
        name: String,
    },
}

pub(crate) fn run(cmd: HostCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        HostCmd::EnrolToken { name, ttl } => {
            let t = c.create_enrolment(&EnrolmentCreate {
                name,
                ttl_seconds: ttl,
            })?;
            out.show(&t, |t| {
                format!(
                    "token: {}\nexpires: {}\nenrol with: cdm-agent serve --url URL --enrol {} --state-dir DIR\n",
                    t.token, t.expires_at, t.token
                )
            });
        }
        HostCmd::List => out.show(&c.hosts()?, |v| hosts_table(v)),
        HostCmd::Show { name } => out.show(&c.host(&name)?, host_show),
        HostCmd::Retire { name } => {
            c.retire_host(&name)?;
            out.say(format!("host {name} retired"));
        }
    }
    Ok(())
}

fn hosts_table(v: &[Host]) -> String {
    table_of(
        v,
        &[
            "NAME",
            "STATE",
            "LAST SEEN (UTC)",
            "HOSTNAME",
            "VERSION",
            "OS",
            "RUNNING",
        ],
        |h| {
            vec![
                h.name.clone(),
                h.state.clone(),
                h.last_seen_unix.map(time).unwrap_or_else(|| "-".into()),
                h.hostname.clone(),
                h.version.clone(),
                h.os.clone(),
                h.running_jobs.len().to_string(),
            ]
        },
    )
}

fn host_show(h: &Host) -> String {
    format!(
        "name: {}\nstate: {}\nlast seen: {}\nhostname: {}\nversion: {}\nos: {}\ncapabilities: {}\nrunning jobs: {:?}\nenrolled: {}\n",
        h.name,
        h.state,
        opt(&h.last_seen),
        h.hostname,
        h.version,
        h.os,
        h.capabilities.join(", "),
        h.running_jobs,
        time(h.enrolled_unix)
    )
}
