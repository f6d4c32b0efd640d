//! `cdmctl`: the appliance's admin CLI. Every API operation, human tables by
//! default and `--json` for scripts, progress bars for jobs, and exit codes
//! that scripts can trust.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cdm_api::client::{Client, ClientError};
use cdm_api::types::*;
use clap::{Parser, Subcommand};
use serde::Serialize;
use serde_json::Value;

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
    /// Long operations.
    #[command(subcommand)]
    Job(JobCmd),
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

#[derive(Subcommand)]
enum VolumeCmd {
    Create {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, value_parser = parse_size)]
        block_size: Option<u64>,
        #[arg(long)]
        dedup: bool,
        /// zstd level 1-29 (0 = off).
        #[arg(long)]
        compression: Option<u8>,
        /// none, aes-256-xts, aes-128-xts or sm4-xts.
        #[arg(long)]
        encryption: Option<String>,
    },
    List,
    Show {
        name: String,
    },
    Grow {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Show the snapshot schedule and retention.
    Policy {
        name: String,
    },
    /// Set the snapshot schedule and retention (replaces the whole policy).
    SetPolicy {
        name: String,
        /// Snapshot every DURATION (e.g. 1h).
        #[arg(long, value_parser = parse_duration, conflicts_with = "cron")]
        interval: Option<u64>,
        /// Five-field cron expression in UTC.
        #[arg(long)]
        cron: Option<String>,
        #[arg(long)]
        keep_last: Option<u32>,
        #[arg(long)]
        keep_days: Option<u32>,
        #[arg(long, default_value = "1")]
        min_keep: u32,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    Create {
        volume: String,
        #[arg(long)]
        label: Option<String>,
        /// A JSON object.
        #[arg(long)]
        metadata: Option<String>,
    },
    List {
        volume: String,
    },
    Show {
        volume: String,
        id: u64,
    },
    Delete {
        volume: String,
        id: u64,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum CloneCmd {
    Create {
        volume: String,
        snapshot: u64,
        name: String,
    },
    List,
    Promote {
        name: String,
    },
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum ExportCmd {
    List,
}

#[derive(Subcommand)]
enum MountCmd {
    /// Mount VOLUME@ID read-only, or with --writable a new clone of it.
    Create {
        snapshot: String,
        #[arg(long)]
        writable: bool,
        /// Clone name for --writable (default VOLUME-ID-rw).
        #[arg(long)]
        clone: Option<String>,
        /// Partition number (0 = whole disk; default: the first partition, if any).
        #[arg(long)]
        partition: Option<u32>,
    },
    List,
    /// Unmount; --delete-clone also deletes a writable mount's clone.
    Delete {
        name: String,
        #[arg(long)]
        delete_clone: bool,
    },
}

#[derive(Subcommand)]
enum FilesCmd {
    /// Partitions of VOLUME@ID.
    Partitions { snapshot: String },
    /// List a directory of VOLUME@ID.
    Ls {
        snapshot: String,
        #[arg(default_value = "/")]
        path: String,
        #[arg(long)]
        partition: Option<u32>,
    },
    /// Stat one path.
    Stat {
        snapshot: String,
        path: String,
        #[arg(long)]
        partition: Option<u32>,
    },
    /// Download a file (-o FILE, default stdout).
    Get {
        snapshot: String,
        path: String,
        #[arg(short, long)]
        output: Option<std::path::PathBuf>,
        #[arg(long)]
        partition: Option<u32>,
    },
    /// Download a tar of a directory tree (-o FILE, default stdout).
    Tar {
        snapshot: String,
        path: String,
        #[arg(short, long)]
        output: Option<std::path::PathBuf>,
        #[arg(long)]
        partition: Option<u32>,
    },
}

fn snap_ref(s: &str) -> Result<(String, u64), CliError> {
    s.split_once('@')
        .and_then(|(v, id)| Some((v.to_string(), id.parse().ok()?)))
        .ok_or_else(|| CliError::Usage(format!("{s:?}: expected VOLUME@ID")))
}

/// `VOLUME@ID` and a path in it (and a partition) as a files query.
fn file_ref(
    snapshot: &str,
    path: String,
    partition: Option<u32>,
) -> Result<(String, u64, FilesQuery), CliError> {
    let (v, id) = snap_ref(snapshot)?;
    Ok((
        v,
        id,
        FilesQuery {
            path,
            partition,
            ..FilesQuery::default()
        },
    ))
}

fn fetch(
    c: &Client,
    snapshot: &str,
    path: String,
    partition: Option<u32>,
    output: Option<std::path::PathBuf>,
    tar: bool,
) -> Result<u64, CliError> {
    let (v, id, q) = file_ref(snapshot, path, partition)?;
    match output {
        Some(p) => {
            let tmp = p.with_extension("partial");
            let mut f = std::fs::File::create(&tmp)
                .map_err(|e| CliError::Other(format!("cannot create {}: {e}", tmp.display())))?;
            let n = c.download(&v, id, &q, tar, &mut f).inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            std::fs::rename(&tmp, &p)
                .map_err(|e| CliError::Other(format!("cannot rename to {}: {e}", p.display())))?;
            Ok(n)
        }
        None => Ok(c.download(&v, id, &q, tar, &mut std::io::stdout().lock())?),
    }
}

#[derive(Subcommand)]
enum JobCmd {
    List,
    Show {
        id: u64,
    },
    /// Start scrub, retention, delete-volume or vm-backup.
    Start {
        kind: String,
        #[arg(long)]
        volume: Option<String>,
        #[arg(long)]
        force: bool,
        /// vm-backup: the VM inventory (a path on the appliance).
        #[arg(long)]
        inventory: Option<String>,
        /// vm-backup: the category (os:linux, app:PostgreSQL, keyword:db, path:DIR, pool:NAME).
        #[arg(long)]
        category: Option<String>,
        /// vm-backup: VMs at a time.
        #[arg(long)]
        parallel: Option<usize>,
        /// Wait for it, with a progress bar.
        #[arg(long)]
        wait: bool,
    },
    /// Wait for a job, with a progress bar; exit 1 if it failed.
    Wait {
        id: u64,
    },
}

#[derive(Subcommand)]
enum EventCmd {
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
enum AuditCmd {
    List {
        #[arg(long)]
        after: Option<u64>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Subcommand)]
enum WebhookCmd {
    Create {
        url: String,
        /// Event type, MODULE.* or * (repeatable; default *).
        #[arg(long = "event")]
        events: Vec<String>,
        #[arg(long)]
        secret: Option<String>,
    },
    List,
    Show {
        id: u64,
    },
    Delete {
        id: u64,
    },
    Deliveries {
        id: u64,
    },
}

#[derive(Subcommand)]
enum UserCmd {
    Create {
        name: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        password_stdin: bool,
        #[arg(long = "grant")]
        grants: Vec<String>,
    },
    List,
    Show {
        name: String,
    },
    Update {
        name: String,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        password_stdin: bool,
        /// Replaces the grants (give --grant none to clear them).
        #[arg(long = "grant")]
        grants: Vec<String>,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    Create {
        user: String,
        name: String,
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<u64>,
    },
    List {
        user: String,
    },
    Delete {
        user: String,
        id: String,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    Show,
    /// SIZE, or `none` to remove the quota.
    SetQuota {
        quota: String,
    },
}

#[derive(Subcommand)]
enum ClockCmd {
    Show,
    Advance { seconds: u64 },
}

/// `10G`, `512M`, `64K`, `1T`, `4096` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let m: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                "P" => 1 << 50,
                _ => return Err(format!("unknown size unit in {s:?}")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("bad size {s:?}"))?;
    if !n.is_finite() || n < 0.0 || n * mult as f64 > u64::MAX as f64 {
        return Err(format!("bad size {s:?}"));
    }
    Ok((n * mult as f64) as u64)
}

/// `90s`, `15m`, `1h`, `7d`, `2w`, `3600` (seconds).
fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86_400),
        Some('w') => (&s[..s.len() - 1], 7 * 86_400),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("bad duration {s:?}: use e.g. 90s, 15m, 1h, 7d"))
}

fn human(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn time(unix: u64) -> String {
    cdm_api::cron::utc(unix)
}

/// A table of `items`, one row each.
fn table_of<T>(items: &[T], header: &[&str], row: impl Fn(&T) -> Vec<String>) -> String {
    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
    table(header, &rows)
}

/// Columns padded to their widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(c);
                s.push_str(&" ".repeat(w[i] - c.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(|s| s.as_str()).collect()));
    }
    out
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

struct Out {
    json: bool,
}

impl Out {
    /// A confirmation for people; nothing with `--json`.
    fn say(&self, msg: String) {
        if !self.json {
            println!("{msg}");
        }
    }

    fn show<T: Serialize>(&self, v: &T, human: impl FnOnce(&T) -> String) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("\"{e}\""))
            );
        } else {
            print!("{}", human(v));
        }
    }
}

fn volumes_table(v: &[Volume]) -> String {
    table_of(
        v,
        &[
            "NAME",
            "KIND",
            "SIZE",
            "BLOCK",
            "ALLOCATED",
            "UNIQUE",
            "SNAPSHOTS",
            "ORIGIN",
            "CLIENTS",
            "DATA PIPELINE",
        ],
        |v| {
            let mut p: Vec<String> = Vec::new();
            if v.dedup {
                p.push("dedup".into());
            }
            if v.compression > 0 {
                p.push(format!("zstd-{}", v.compression));
            }
            if v.encryption != "none" {
                p.push(v.encryption.clone());
            }
            vec![
                v.name.clone(),
                v.kind.clone(),
                human(v.size),
                human(v.block_size as u64),
                human(v.allocated_bytes),
                human(v.unique_bytes),
                v.snapshots.to_string(),
                origin(&v.origin),
                v.clients.to_string(),
                if p.is_empty() {
                    "-".into()
                } else {
                    p.join(",")
                },
            ]
        },
    )
}

/// `VOLUME@ID` of a clone's origin, or `-`.
fn origin(o: &Option<Origin>) -> String {
    o.as_ref()
        .map(|o| format!("{}@{}", o.volume.as_deref().unwrap_or("?"), o.snapshot))
        .unwrap_or_else(|| "-".into())
}

fn volume_show(v: &Volume) -> String {
    format!(
        "name: {}\nkind: {}\nexport: {}\nsize: {} ({} bytes)\nblock size: {}\ncreated: {}\norigin: {}\nallocated: {}\nunique: {}\nsnapshots: {}\ndedup: {}\ncompression: {}\nencryption: {}\nclients: {}\n",
        v.name,
        v.kind,
        v.export,
        human(v.size),
        v.size,
        human(v.block_size as u64),
        time(v.created_unix),
        origin(&v.origin),
        human(v.allocated_bytes),
        human(v.unique_bytes),
        v.snapshots,
        v.dedup,
        v.compression,
        v.encryption,
        v.clients
    )
}

fn snapshots_table(v: &[Snapshot]) -> String {
    table_of(
        v,
        &[
            "ID",
            "EXPORT",
            "LABEL",
            "CREATED (UTC)",
            "ALLOCATED",
            "UNIQUE",
            "CLONES",
        ],
        |s| {
            vec![
                s.id.to_string(),
                s.export.clone(),
                s.label.clone(),
                time(s.created_unix),
                human(s.allocated_bytes),
                human(s.unique_bytes),
                if s.clones.is_empty() {
                    "-".into()
                } else {
                    s.clones.join(",")
                },
            ]
        },
    )
}

fn snapshot_show(s: &Snapshot) -> String {
    format!(
        "id: {}\nvolume: {}\nexport: {}\nlabel: {}\ncreated: {}\nsize: {}\nallocated: {}\nunique: {}\nclones: {}\nmetadata: {}\n",
        s.id,
        s.volume,
        s.export,
        s.label,
        time(s.created_unix),
        human(s.size),
        human(s.allocated_bytes),
        human(s.unique_bytes),
        s.clones.join(", "),
        s.metadata
    )
}

fn jobs_table(v: &[Job]) -> String {
    table_of(
        v,
        &[
            "ID",
            "KIND",
            "STATE",
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
                format!("{:.0}%", j.progress * 100.0),
                j.created_by.clone(),
                time(j.created_unix),
                j.message.clone(),
            ]
        },
    )
}

fn job_show(j: &Job) -> String {
    format!(
        "id: {}\nkind: {}\nstate: {}\nprogress: {:.1}% ({} of {})\nby: {}\nstarted: {}\nfinished: {}\nmessage: {}\nresult: {}\n",
        j.id,
        j.kind,
        j.state,
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

fn webhook_show(w: &Webhook) -> String {
    let mut s = format!(
        "id: {}\nurl: {}\nevents: {}\ncreated: {}\n",
        w.id,
        w.url,
        w.events.join(", "),
        time(w.created_unix)
    );
    if let Some(sec) = &w.secret {
        s.push_str(&format!("secret (shown once): {sec}\n"));
    }
    s
}

fn user_show(u: &User) -> String {
    format!(
        "name: {}\nrole: {}\ngrants: {}\npassword: {}\ncreated: {}\n",
        u.name,
        u.role,
        u.grants.join(", "),
        if u.has_password { "set" } else { "none" },
        time(u.created_unix)
    )
}

fn token_created(t: &TokenCreated) -> String {
    format!(
        "token {} ({}) for user {}, expires {}:\n{}\n(shown once: store it now)\n",
        t.id,
        t.name,
        t.user,
        t.expires_unix.map(time).unwrap_or_else(|| "never".into()),
        t.token
    )
}

fn pool_show(p: &PoolInfo) -> String {
    format!(
        "uuid: {}\nsize: {}\nused: {} ({:.1}%)\nfree: {}\ngeneration: {}\nvolumes: {}\nsnapshots: {}\nquota: {}\n",
        p.uuid,
        human(p.total_bytes),
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

fn read_password() -> Result<String, CliError> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| CliError::Other(format!("cannot read the password from stdin: {e}")))?;
    let p = s.trim_end_matches(['\n', '\r']).to_string();
    if p.is_empty() {
        return Err(CliError::Usage("empty password on stdin".into()));
    }
    Ok(p)
}

#[derive(Debug)]
enum CliError {
    Client(ClientError),
    Usage(String),
    NoToken(String),
    JobFailed(String),
    Other(String),
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(e)
    }
}

impl CliError {
    fn code(&self) -> u8 {
        match self {
            CliError::Client(e) => e.exit_code() as u8,
            CliError::Usage(_) => 2,
            CliError::NoToken(_) => 3,
            CliError::JobFailed(_) | CliError::Other(_) => 1,
        }
    }
    fn message(&self) -> String {
        match self {
            CliError::Client(ClientError::Api { message, .. }) => message.clone(),
            CliError::Client(e) => e.to_string(),
            CliError::Usage(m)
            | CliError::NoToken(m)
            | CliError::JobFailed(m)
            | CliError::Other(m) => m.clone(),
        }
    }
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

/// Polls a job until it ends, drawing a progress bar on a terminal.
fn wait_job(c: &Client, id: u64, out: &Out) -> Result<Job, CliError> {
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
        if j.state != "running" {
            break j;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    out.show(&j, job_show);
    if j.state == "failed" {
        return Err(CliError::JobFailed(format!(
            "job {id} failed: {}",
            j.message
        )));
    }
    Ok(j)
}

fn run(cli: Cli) -> Result<(), CliError> {
    let tok = token(&cli)?;
    if tok.is_none() && needs_token(&cli.cmd) {
        return Err(CliError::NoToken(
            "no API token: give --token, CDM_TOKEN, --token-file or CDM_TOKEN_FILE (the first admin token is in DATA/admin.token)".into(),
        ));
    }
    let c = Client::new(&cli.url, tok);
    let out = Out { json: cli.json };
    match cli.cmd {
        Cmd::Volume(v) => match v {
            VolumeCmd::Create {
                name,
                size,
                block_size,
                dedup,
                compression,
                encryption,
            } => {
                let bs = block_size
                    .map(|b| {
                        u32::try_from(b).map_err(|_| CliError::Usage("block size too large".into()))
                    })
                    .transpose()?;
                let v = c.create_volume(&VolumeCreate {
                    name,
                    size,
                    block_size: bs,
                    dedup: dedup.then_some(true),
                    compression,
                    encryption,
                })?;
                out.show(&v, volume_show);
            }
            VolumeCmd::List => out.show(&c.list_volumes()?, |v| volumes_table(v)),
            VolumeCmd::Show { name } => out.show(&c.volume(&name)?, volume_show),
            VolumeCmd::Grow { name, size } => out.show(&c.grow_volume(&name, size)?, volume_show),
            VolumeCmd::Delete { name, force } => {
                c.delete_volume(&name, force)?;
                out.say(format!("deleted volume {name}"));
            }
            VolumeCmd::Policy { name } => out.show(&c.policy(&name)?, policy_show),
            VolumeCmd::SetPolicy {
                name,
                interval,
                cron,
                keep_last,
                keep_days,
                min_keep,
            } => {
                let schedule = if interval.is_some() || cron.is_some() {
                    Some(Schedule {
                        interval_secs: interval,
                        cron,
                    })
                } else {
                    None
                };
                let p = Policy {
                    schedule,
                    retention: Retention {
                        keep_last,
                        keep_days,
                        min_keep,
                    },
                };
                out.show(&c.set_policy(&name, &p)?, policy_show);
            }
        },
        Cmd::Snapshot(s) => match s {
            SnapshotCmd::Create {
                volume,
                label,
                metadata,
            } => {
                let metadata = metadata
                    .map(|m| {
                        serde_json::from_str::<Value>(&m)
                            .map_err(|e| CliError::Usage(format!("--metadata is not JSON: {e}")))
                    })
                    .transpose()?;
                let s = c.create_snapshot(&volume, &SnapshotCreate { label, metadata })?;
                out.show(&s, snapshot_show);
            }
            SnapshotCmd::List { volume } => {
                out.show(&c.list_snapshots(&volume)?, |v| snapshots_table(v))
            }
            SnapshotCmd::Show { volume, id } => out.show(&c.snapshot(&volume, id)?, snapshot_show),
            SnapshotCmd::Delete { volume, id, force } => {
                c.delete_snapshot(&volume, id, force)?;
                out.say(format!("deleted snapshot {volume}@{id}"));
            }
        },
        Cmd::Clone(cl) => match cl {
            CloneCmd::Create {
                volume,
                snapshot,
                name,
            } => out.show(&c.create_clone(&volume, snapshot, &name)?, volume_show),
            CloneCmd::List => out.show(&c.list_clones()?, |v| volumes_table(v)),
            CloneCmd::Promote { name } => out.show(&c.promote_clone(&name)?, volume_show),
            CloneCmd::Delete { name, force } => {
                c.delete_clone(&name, force)?;
                out.say(format!("deleted clone {name}"));
            }
        },
        Cmd::Mount(m) => match m {
            MountCmd::Create {
                snapshot,
                writable,
                clone,
                partition,
            } => {
                let m = c.create_mount(&MountCreate {
                    snapshot,
                    writable,
                    clone,
                    partition,
                })?;
                out.show(&m, |m| {
                    format!(
                        "mounted {} ({}, {}) at {} on {}\n",
                        m.snapshot,
                        m.fstype,
                        if m.writable {
                            "read-write clone"
                        } else {
                            "read-only"
                        },
                        m.path,
                        m.device
                    )
                })
            }
            MountCmd::List => out.show(&c.mounts()?, |v| {
                table_of(
                    v,
                    &["NAME", "SNAPSHOT", "MODE", "FS", "STATE", "PATH"],
                    |m| {
                        vec![
                            m.name.clone(),
                            m.snapshot.clone(),
                            if m.writable { "rw" } else { "ro" }.into(),
                            m.fstype.clone(),
                            match &m.message {
                                Some(x) => format!("{}: {x}", m.state),
                                None => m.state.clone(),
                            },
                            m.path.clone(),
                        ]
                    },
                )
            }),
            MountCmd::Delete { name, delete_clone } => {
                c.delete_mount(&name, delete_clone)?;
                out.say(format!("unmounted {name}"));
            }
        },
        Cmd::Files(f) => match f {
            FilesCmd::Partitions { snapshot } => {
                let (v, id) = snap_ref(&snapshot)?;
                out.show(&c.partitions(&v, id)?, |p| {
                    table_of(p, &["#", "START", "SIZE", "TYPE", "BOOT"], |p| {
                        vec![
                            p.number.to_string(),
                            p.start.to_string(),
                            human(p.size),
                            p.kind.clone(),
                            if p.bootable { "*" } else { "" }.into(),
                        ]
                    })
                })
            }
            FilesCmd::Ls {
                snapshot,
                path,
                partition,
            } => {
                let (v, id, q) = file_ref(&snapshot, path, partition)?;
                out.show(&c.files(&v, id, &q)?, |e| {
                    table_of(e, &["MODE", "UID", "GID", "SIZE", "NAME"], |e| {
                        vec![
                            format!("{} {:o}", &e.kind, e.mode & 0o7777),
                            e.uid.to_string(),
                            e.gid.to_string(),
                            e.size.to_string(),
                            match &e.target {
                                Some(t) => format!("{} -> {t}", e.name),
                                None => e.name.clone(),
                            },
                        ]
                    })
                })
            }
            FilesCmd::Stat {
                snapshot,
                path,
                partition,
            } => {
                let (v, id, q) = file_ref(&snapshot, path, partition)?;
                out.show(&c.stat_file(&v, id, &q)?, |e| {
                    format!(
                        "path: {}\nkind: {}\nsize: {}\nmode: {:o}\nuid: {}\ngid: {}\n{}",
                        e.path,
                        e.kind,
                        e.size,
                        e.mode,
                        e.uid,
                        e.gid,
                        e.target
                            .as_ref()
                            .map(|t| format!("target: {t}\n"))
                            .unwrap_or_default()
                    )
                })
            }
            FilesCmd::Get {
                snapshot,
                path,
                output,
                partition,
            } => {
                let to_file = output.is_some();
                let n = fetch(&c, &snapshot, path, partition, output, false)?;
                if to_file {
                    out.say(format!("restored {n} bytes"));
                }
            }
            FilesCmd::Tar {
                snapshot,
                path,
                output,
                partition,
            } => {
                let to_file = output.is_some();
                let n = fetch(&c, &snapshot, path, partition, output, true)?;
                if to_file {
                    out.say(format!("wrote a {n}-byte tar"));
                }
            }
        },
        Cmd::Export(ExportCmd::List) => out.show(&c.exports()?, |v| {
            table_of(
                v,
                &["EXPORT", "KIND", "MODE", "SIZE", "CLIENTS", "URI"],
                |e| {
                    vec![
                        e.name.clone(),
                        e.kind.clone(),
                        if e.read_only { "ro" } else { "rw" }.into(),
                        human(e.size),
                        e.clients
                            .iter()
                            .map(|c| c.peer.clone())
                            .collect::<Vec<_>>()
                            .join(","),
                        e.uris.first().cloned().unwrap_or_default(),
                    ]
                },
            )
        }),
        Cmd::Job(j) => match j {
            JobCmd::List => out.show(&c.jobs()?, |v| jobs_table(v)),
            JobCmd::Show { id } => out.show(&c.job(id)?, job_show),
            JobCmd::Start {
                kind,
                volume,
                force,
                inventory,
                category,
                parallel,
                wait,
            } => {
                let j = c.start_job(&JobCreate {
                    kind,
                    volume,
                    force,
                    inventory,
                    category,
                    parallel,
                })?;
                if wait {
                    wait_job(&c, j.id, &out)?;
                } else {
                    out.show(&j, job_show);
                }
            }
            JobCmd::Wait { id } => {
                wait_job(&c, id, &out)?;
            }
        },
        Cmd::Event(e) => match e {
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
        },
        Cmd::Audit(AuditCmd::List { after, user, limit }) => {
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
        }
        Cmd::Webhook(w) => match w {
            WebhookCmd::Create {
                url,
                events,
                secret,
            } => {
                let events = if events.is_empty() {
                    vec!["*".to_string()]
                } else {
                    events
                };
                out.show(
                    &c.create_webhook(&WebhookCreate {
                        url,
                        events,
                        secret,
                    })?,
                    webhook_show,
                );
            }
            WebhookCmd::List => out.show(&c.webhooks()?, |v| {
                table_of(v, &["ID", "URL", "EVENTS", "CREATED (UTC)"], |w| {
                    vec![
                        w.id.to_string(),
                        w.url.clone(),
                        w.events.join(","),
                        time(w.created_unix),
                    ]
                })
            }),
            WebhookCmd::Show { id } => out.show(&c.webhook(id)?, webhook_show),
            WebhookCmd::Delete { id } => {
                c.delete_webhook(id)?;
                out.say(format!("deleted webhook {id}"));
            }
            WebhookCmd::Deliveries { id } => out.show(&c.deliveries(id)?, |v| {
                table_of(
                    v,
                    &[
                        "ID",
                        "EVENT",
                        "TYPE",
                        "STATE",
                        "ATTEMPTS",
                        "STATUS",
                        "ERROR",
                        "UPDATED (UTC)",
                    ],
                    |d| {
                        vec![
                            d.id.to_string(),
                            d.event.to_string(),
                            d.event_type.clone(),
                            d.state.clone(),
                            d.attempts.to_string(),
                            opt(&d.last_status),
                            opt(&d.last_error),
                            time(d.updated_unix),
                        ]
                    },
                )
            }),
        },
        Cmd::User(u) => match u {
            UserCmd::Create {
                name,
                role,
                password_stdin,
                grants,
            } => {
                let password = password_stdin.then(read_password).transpose()?;
                out.show(
                    &c.create_user(&UserCreate {
                        name,
                        role,
                        password,
                        grants,
                    })?,
                    user_show,
                );
            }
            UserCmd::List => out.show(&c.users()?, |v| {
                table_of(
                    v,
                    &["NAME", "ROLE", "GRANTS", "PASSWORD", "CREATED (UTC)"],
                    |u| {
                        vec![
                            u.name.clone(),
                            u.role.clone(),
                            u.grants.join(","),
                            u.has_password.to_string(),
                            time(u.created_unix),
                        ]
                    },
                )
            }),
            UserCmd::Show { name } => out.show(&c.user(&name)?, user_show),
            UserCmd::Update {
                name,
                role,
                password_stdin,
                grants,
            } => {
                let password = password_stdin.then(read_password).transpose()?;
                let grants = if grants.is_empty() {
                    None
                } else {
                    Some(grants.into_iter().filter(|g| g != "none").collect())
                };
                out.show(
                    &c.update_user(
                        &name,
                        &UserUpdate {
                            role,
                            password,
                            grants,
                        },
                    )?,
                    user_show,
                );
            }
            UserCmd::Delete { name } => {
                c.delete_user(&name)?;
                out.say(format!("deleted user {name}"));
            }
        },
        Cmd::Token(t) => match t {
            TokenCmd::Create {
                user,
                name,
                expires_in,
            } => out.show(
                &c.create_token(
                    &user,
                    &TokenCreate {
                        name,
                        expires_in_secs: expires_in,
                    },
                )?,
                token_created,
            ),
            TokenCmd::List { user } => out.show(&c.tokens(&user)?, |v| {
                table_of(v, &["ID", "NAME", "CREATED (UTC)", "EXPIRES (UTC)"], |t| {
                    vec![
                        t.id.clone(),
                        t.name.clone(),
                        time(t.created_unix),
                        t.expires_unix.map(time).unwrap_or_else(|| "never".into()),
                    ]
                })
            }),
            TokenCmd::Delete { user, id } => {
                c.delete_token(&user, &id)?;
                out.say(format!("deleted token {id} of {user}"));
            }
        },
        Cmd::Login {
            name,
            password_stdin,
        } => {
            if !password_stdin {
                return Err(CliError::Usage(
                    "give the password on stdin with --password-stdin".into(),
                ));
            }
            let password = read_password()?;
            out.show(&c.login(&Login { name, password })?, token_created);
        }
        Cmd::Logout => {
            c.logout()?;
            out.say("logged out: the token is revoked".to_string());
        }
        Cmd::Pool(p) => match p {
            PoolCmd::Show => out.show(&c.pool()?, pool_show),
            PoolCmd::SetQuota { quota } => {
                let q = if quota == "none" {
                    None
                } else {
                    Some(parse_size(&quota).map_err(CliError::Usage)?)
                };
                out.show(
                    &c.set_pool_policy(&PoolPolicy { quota_bytes: q })?,
                    pool_show,
                );
            }
        },
        Cmd::Clock(k) => {
            let v = match k {
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
        }
        Cmd::Health => out.show(&c.health()?, |v| format!("{v}\n")),
        Cmd::Metrics => print!("{}", c.metrics()?),
        Cmd::Openapi => println!(
            "{}",
            serde_json::to_string_pretty(&c.openapi()?).unwrap_or_default()
        ),
    }
    Ok(())
}

fn policy_show(p: &Policy) -> String {
    let sched = match &p.schedule {
        Some(Schedule {
            interval_secs: Some(i),
            ..
        }) => format!("every {i} s"),
        Some(Schedule { cron: Some(c), .. }) => format!("cron {c:?} (UTC)"),
        _ => "none".into(),
    };
    format!(
        "schedule: {sched}\nkeep last: {}\nkeep days: {}\nmin keep: {}\n",
        opt(&p.retention.keep_last),
        opt(&p.retention.keep_days),
        p.retention.min_keep
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_size("512mb").unwrap(), 512 << 20);
        for bad in ["", "G", "10X", "-1G", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), 90);
        assert_eq!(parse_duration("15m").unwrap(), 900);
        assert_eq!(parse_duration("1h").unwrap(), 3600);
        assert_eq!(parse_duration("7d").unwrap(), 604_800);
        assert_eq!(parse_duration("3600").unwrap(), 3600);
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn times_and_sizes_print() {
        assert_eq!(time(0), "1970-01-01 00:00:00");
        assert_eq!(time(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(time(1_795_484_096), "2026-11-24 01:34:56");
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["NAME", "SIZE"],
            &[
                vec!["a".into(), "1".into()],
                vec!["longer".into(), "22".into()],
            ],
        );
        assert_eq!(t, "NAME    SIZE\na       1\nlonger  22\n");
    }
}
