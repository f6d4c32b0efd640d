//! `cdmctl`: the appliance's admin CLI. Every API operation, human tables by
//! default and `--json` for scripts, progress bars for jobs, and exit codes
//! that scripts can trust.

mod app;
mod appliance;
mod clone;
mod drill;
mod error;
mod event;
mod export;
mod files;
mod host;
mod job;
mod mount;
mod output;
mod policy;
mod replication;
mod snapshot;
mod system;
mod tier;
mod units;
mod user;
mod vm;
mod volume;
mod webhook;

use std::path::PathBuf;
use std::process::ExitCode;

use cdm_api::client::Client;
use clap::{Parser, Subcommand};

use crate::app::{AppCmd, RestoreCmd};
use crate::clone::CloneCmd;
use crate::drill::DrillCmd;
use crate::error::CliError;
use crate::event::{AuditCmd, EventCmd};
use crate::export::ExportCmd;
use crate::files::FilesCmd;
use crate::host::HostCmd;
use crate::job::JobCmd;
use crate::mount::MountCmd;
use crate::output::Out;
use crate::policy::PolicyCmd;
use crate::replication::ReplicationCmd;
use crate::snapshot::SnapshotCmd;
use crate::system::{ClockCmd, PoolCmd};
use crate::user::{TokenCmd, UserCmd};
use crate::volume::VolumeCmd;
use crate::webhook::WebhookCmd;

const EXIT_CODES: &str = "Exit codes: 0 ok; 1 failed job or other failure; 2 usage error; \
3 authentication or authorization (401, 403, no token); 4 not found; 5 conflict; \
6 bad request (400, 413); 7 cannot reach the server; 8 server error (5xx).";

#[derive(Parser)]
#[command(name = "cdmctl", version, about = "Manage a cdm appliance through its HTTP API", after_help = EXIT_CODES)]
struct Cli {
    /// API address.
    #[arg(
        long,
        env = "CDM_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    url: String,
    /// API token.
    #[arg(long, env = "CDM_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the API token [default: ./cdm-data/admin.token, then /var/lib/cdm/admin.token].
    #[arg(long, env = "CDM_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The appliance's CA certificate (PEM) to pin for an https:// URL:
    /// only it is trusted (DATA/tls/ca.crt on the appliance).
    #[arg(long, env = "CDM_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stage disks and clones.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Snapshots of a volume.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Writable clones of snapshots.
    #[command(subcommand)]
    Clone(CloneCmd),
    /// NBD exports and connected clients.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Instant mounts of snapshots on the appliance (needs snapshotd --mount).
    #[command(subcommand)]
    Mount(MountCmd),
    /// File-level restore from a snapshot's filesystem.
    #[command(subcommand)]
    Files(FilesCmd),
    /// Jobs: local long operations and agents' backups and restores.
    #[command(subcommand)]
    Job(JobCmd),
    /// Enrolled hosts and enrolment tokens for their agents.
    #[command(subcommand)]
    Host(HostCmd),
    /// Applications (protected objects), their backups and points.
    #[command(subcommand)]
    App(AppCmd),
    /// Protection policies (schedules, windows, retention, RPO).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Restores of applications' points, run by agents.
    #[command(subcommand)]
    Restore(RestoreCmd),
    /// Replication between appliances: pairing, peers, links, transfers.
    #[command(subcommand)]
    Replication(ReplicationCmd),
    /// Recovery drills: a point cloned, started in isolation, checked,
    /// torn down; the reports.
    #[command(subcommand)]
    Drill(DrillCmd),
    /// VMs: points, instant recovery on the appliance, restores.
    #[command(subcommand)]
    Vm(crate::vm::VmCmd),
    /// The event log.
    #[command(subcommand)]
    Event(EventCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Webhook subscriptions.
    #[command(subcommand)]
    Webhook(WebhookCmd),
    /// Users.
    #[command(subcommand)]
    User(UserCmd),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Log in with a password (reads it from stdin); prints a session token.
    Login {
        name: String,
        #[arg(long)]
        password_stdin: bool,
    },
    /// Revoke the token in use.
    Logout,
    /// The pool.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// The appliance image: its A/B slots and signed updates (snapshotd
    /// --appliance).
    #[command(subcommand)]
    Appliance(crate::appliance::ApplianceCmd),
    /// The object-storage tier older points' data moves to.
    #[command(subcommand)]
    Tier(crate::tier::TierCmd),
    /// The appliance clock (advance only with --fake-clock).
    #[command(subcommand)]
    Clock(ClockCmd),
    /// Is the daemon up?
    Health,
    /// Prometheus metrics.
    Metrics,
    /// The OpenAPI document.
    Openapi,
}

fn token(cli: &Cli) -> Result<Option<String>, CliError> {
    if let Some(t) = &cli.token {
        return Ok(Some(t.trim().to_string()));
    }
    let candidates: Vec<PathBuf> = match &cli.token_file {
        Some(p) => vec![p.clone()],
        None => cdm_api::client::DEFAULT_TOKEN_FILES
            .iter()
            .map(PathBuf::from)
            .collect(),
    };
    for p in &candidates {
        match std::fs::read_to_string(p) {
            Ok(t) => return Ok(Some(t.trim().to_string())),
            Err(e) if cli.token_file.is_some() => {
                return Err(CliError::NoToken(format!(
                    "cannot read token file {}: {e}",
                    p.display()
                )))
            }
            Err(_) => {}
        }
    }
    Ok(None)
}

fn needs_token(cmd: &Cmd) -> bool {
    !matches!(cmd, Cmd::Health | Cmd::Login { .. })
}

fn run(cli: Cli) -> Result<(), CliError> {
    let tok = token(&cli)?;
    if tok.is_none() && needs_token(&cli.cmd) {
        return Err(CliError::NoToken(
            "no API token: give --token, CDM_TOKEN, --token-file or CDM_TOKEN_FILE (the first admin token is in DATA/admin.token)".into(),
        ));
    }
    let c = Client::connect(&cli.url, tok, cli.ca_file.as_deref())?;
    let out = Out { json: cli.json };
    match cli.cmd {
        Cmd::Volume(v) => volume::run(v, &c, &out),
        Cmd::Snapshot(s) => snapshot::run(s, &c, &out),
        Cmd::Clone(cl) => clone::run(cl, &c, &out),
        Cmd::Mount(m) => mount::run(m, &c, &out),
        Cmd::Files(f) => files::run(f, &c, &out),
        Cmd::Export(e) => export::run(e, &c, &out),
        Cmd::Job(j) => job::run(j, &c, &out),
        Cmd::Host(h) => host::run(h, &c, &out),
        Cmd::App(a) => app::run(a, &c, &out),
        Cmd::Policy(p) => policy::run(p, &c, &out),
        Cmd::Restore(r) => app::restore(r, &c, &out),
        Cmd::Replication(r) => replication::run(r, &c, &out),
        Cmd::Drill(d) => drill::run(d, &c, &out),
        Cmd::Vm(v) => vm::run(v, &c, &out),
        Cmd::Event(e) => event::run(e, &c, &out),
        Cmd::Audit(a) => event::audit(a, &c, &out),
        Cmd::Webhook(w) => webhook::run(w, &c, &out),
        Cmd::User(u) => user::run_user(u, &c, &out),
        Cmd::Token(t) => user::run_token(t, &c, &out),
        Cmd::Login {
            name,
            password_stdin,
        } => user::login(name, password_stdin, &c, &out),
        Cmd::Logout => user::logout(&c, &out),
        Cmd::Pool(p) => system::pool(p, &c, &out),
        Cmd::Appliance(a) => appliance::run(a, &c, &out),
        Cmd::Tier(t) => tier::run(t, &c, &out),
        Cmd::Clock(k) => system::clock(k, &c, &out),
        Cmd::Health => system::health(&c, &out),
        Cmd::Metrics => system::metrics(&c),
        Cmd::Openapi => system::openapi(&c),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cdmctl: {}", e.message());
            ExitCode::from(e.code())
        }
    }
}
