//! `cdmctl drill`: recovery drills of applications' points and their
//! reports (measured RTO and RPO, every check with its output).

use cdm_api::client::Client;
use cdm_api::drills::{Drill, DrillCreate, DrillProbe};
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{opt, table_of, time, Out};

#[derive(Subcommand)]
pub(crate) enum DrillCmd {
    /// Drill an application's point (default: as its policy says, else the
    /// newest); waits for the report with --wait.
    Run {
        application: u64,
        #[arg(long)]
        snapshot: Option<u64>,
        /// SQL=EXPECT: the query's first value compared with EXPECT (text,
        /// or ">= N", "<= N", "= N"); repeatable, replaces the policy's.
        #[arg(long = "probe")]
        probes: Vec<String>,
        /// Time limit in seconds (default: the policy's, else 600).
        #[arg(long)]
        timeout: Option<u64>,
        /// Wait for the drill's report; exit 1 if it did not pass.
        #[arg(long)]
        wait: bool,
    },
    /// Drill reports, newest first.
    List {
        #[arg(long)]
        application: Option<u64>,
    },
    Show {
        id: u64,
    },
}

/// `SQL=EXPECT`, split at the last `=` whose left side does not end in
/// an operator character: `select count(*) from t=>= 100` is the query
/// `select count(*) from t` and the expectation `>= 100`.
fn parse_probe(s: &str) -> Result<DrillProbe, CliError> {
    let bad = || CliError::Usage(format!("--probe {s:?}: want SQL=EXPECT"));
    let split = s.match_indices('=').rev().find_map(|(i, _)| {
        let (sql, expect) = (s[..i].trim(), s[i + 1..].trim());
        (!sql.is_empty() && !expect.is_empty() && !sql.ends_with(['>', '<', '=']))
            .then(|| (sql.to_string(), expect.to_string()))
    });
    let (sql, expect) = split.ok_or_else(bad)?;
    Ok(DrillProbe {
        sql: Some(sql),
        expect: Some(expect),
        ..DrillProbe::default()
    })
}

fn rto(d: &Drill) -> String {
    d.rto_seconds
        .map(|r| format!("{r:.2}"))
        .unwrap_or_else(|| "-".into())
}

fn drills_table(v: &[Drill]) -> String {
    table_of(
        v,
        &[
            "ID", "APP", "POINT", "HOST", "STARTED", "PASSED", "RTO_S", "RPO_S", "MESSAGE",
        ],
        |d| {
            vec![
                d.id.to_string(),
                d.application.to_string(),
                format!("{}@{}", d.volume, d.snapshot),
                d.host.clone(),
                time(d.started_unix),
                if d.passed { "yes" } else { "NO" }.into(),
                rto(d),
                opt(&d.rpo_seconds),
                d.message.clone(),
            ]
        },
    )
}

fn drill_show(d: &Drill) -> String {
    let mut s = format!(
        "id: {}\napplication: {}\npoint: {}@{}\nhost: {}\njob: {}\nstarted: {}\npassed: {}\nrto_seconds: {} (target {})\nrpo_seconds: {} (target {})\nmessage: {}\nchecks:\n",
        d.id,
        d.application,
        d.volume,
        d.snapshot,
        d.host,
        d.job,
        time(d.started_unix),
        d.passed,
        rto(d),
        opt(&d.rto_target),
        opt(&d.rpo_seconds),
        opt(&d.rpo_target),
        d.message
    );
    for c in &d.checks {
        s.push_str(&format!(
            "  [{}] {} ({:.2} s)\n",
            if c.passed { "ok" } else { "FAILED" },
            c.name,
            c.seconds
        ));
        for l in c.output.lines() {
            s.push_str(&format!("      {l}\n"));
        }
    }
    s
}

pub(crate) fn run(cmd: DrillCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        DrillCmd::Run {
            application,
            snapshot,
            probes,
            timeout,
            wait,
        } => {
            let probes = if probes.is_empty() {
                None
            } else {
                Some(
                    probes
                        .iter()
                        .map(|p| parse_probe(p))
                        .collect::<Result<Vec<_>, _>>()?,
                )
            };
            let req = DrillCreate {
                snapshot,
                probes,
                timeout_seconds: timeout,
            };
            let j = c.start_drill(application, &req)?;
            if !wait {
                out.show(&j, crate::job::job_show);
                return Ok(());
            }
            // The report is written when the job ends: print it, not the job.
            let d = loop {
                let j = c.job(j.id)?;
                if j.state != "queued" && j.state != "running" {
                    break c.drill(j.id)?;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            };
            out.show(&d, drill_show);
            if d.passed {
                Ok(())
            } else {
                Err(CliError::JobFailed(format!(
                    "drill {} did not pass: {}",
                    d.id, d.message
                )))
            }
        }
        DrillCmd::List { application } => {
            out.show(&c.drills(application)?, |v| drills_table(v));
            Ok(())
        }
        DrillCmd::Show { id } => {
            out.show(&c.drill(id)?, drill_show);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse() {
        let p = parse_probe("select count(*) from t=>= 100").unwrap();
        assert_eq!(p.sql.as_deref(), Some("select count(*) from t"));
        assert_eq!(p.expect.as_deref(), Some(">= 100"));
        let p = parse_probe("select 1=1").unwrap();
        assert_eq!(
            (p.sql.as_deref(), p.expect.as_deref()),
            (Some("select 1"), Some("1"))
        );
        let p = parse_probe("select count(*) from t where a = 1=<=3").unwrap();
        assert_eq!(p.sql.as_deref(), Some("select count(*) from t where a = 1"));
        assert_eq!(p.expect.as_deref(), Some("<=3"));
        assert!(parse_probe("select 1").is_err());
        assert!(parse_probe("=1").is_err());
    }
}
