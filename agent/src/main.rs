//! `cdm-agent`: the host side of cdm. Attaches stage disks (NBD → FUSE
//! file → loop device → filesystem), backs up PostgreSQL, file trees and
//! block devices into them incremental-forever, asks the appliance for a
//! snapshot of each merged full, and restores: regular (copy back),
//! instant and clone (a writable clone served to a PostgreSQL started on
//! it, no data copied).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use cdm_agent::attach::{self, AttachRequest};
use cdm_agent::config::Config;
use cdm_agent::throttle::{Bandwidth, Window};
use cdm_agent::{ops, Ctx};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cdm-agent",
    version,
    about = "cdm host agent: stage disks, backup and restore"
)]
struct Cli {
    /// Configuration file [default: /etc/cdm/agent.toml if present].
    #[arg(long, env = "CDM_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Appliance API address [default: http://127.0.0.1:8080].
    #[arg(long, env = "CDM_URL", global = true)]
    url: Option<String>,
    /// API token.
    #[arg(long, env = "CDM_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the API token.
    #[arg(long, env = "CDM_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The appliance's CA certificate (PEM), pinned for the API (https://)
    /// and NBD (STARTTLS over TCP): only it is trusted.
    #[arg(long, env = "CDM_CA_FILE", global = true)]
    ca_file: Option<PathBuf>,
    /// Appliance NBD address (HOST:PORT or unix:PATH) [default: the API host, port 10809].
    #[arg(long, env = "CDM_NBD", global = true)]
    nbd: Option<String>,
    /// Where the agent keeps attachments and fingerprints [default: /var/lib/cdm-agent].
    #[arg(long, env = "CDM_AGENT_STATE", global = true)]
    state_dir: Option<PathBuf>,
    /// Bandwidth limit in MiB/s (0 = none); overrides the configuration.
    #[arg(long, global = true)]
    limit: Option<f64>,
    /// A window of the day with its own limit: HH:MM-HH:MM=MIBPS (repeatable).
    #[arg(long = "window", global = true, value_parser = Window::parse)]
    windows: Vec<Window>,
    /// JSON output (one object) instead of text; no progress bars.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach a volume, clone or snapshot (VOLUME@ID, read-only) and mount it.
    Attach {
        export: String,
        /// Mount point [default: STATE/mnt/NAME].
        #[arg(long)]
        mount: Option<PathBuf>,
        /// Attachment name [default: the export, '@' as '_'].
        #[arg(long)]
        name: Option<String>,
        /// Create the volume with this size (bytes, or K/M/G/T) if missing.
        #[arg(long, value_parser = cdm_common::size::parse_nonzero)]
        create: Option<u64>,
        /// Filesystem to make on first use (ext4, xfs).
        #[arg(long, default_value = "ext4")]
        mkfs: String,
        /// Mount read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Unmount and detach (stops a PostgreSQL the agent started there).
    Detach {
        name: String,
        /// Also delete the clone the attachment was made on.
        #[arg(long)]
        delete_clone: bool,
    },
    /// What is attached.
    List,
    /// Back up into a stage disk and snapshot it.
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Bring a snapshot back.
    #[command(subcommand)]
    Restore(RestoreCmd),
    /// Archive a database's logs to the appliance, continuously.
    #[command(subcommand)]
    Logs(LogsCmd),
    /// Virtual machines: inspect their disks without booting.
    #[command(subcommand)]
    Vm(VmCmd),
    /// A recovery drill of a PostgreSQL or MariaDB point: clone, start
    /// isolated, check (consistency and pg_amcheck, or mariadb-check;
    /// probes; a scrub of the point),
    /// tear down; prints the report.
    Drill {
        /// VOLUME@ID
        snapshot: String,
        /// Clone and attachment name (drill-APP-JOB).
        #[arg(long)]
        name: String,
        /// Time limit in seconds: stopped and cleaned up after it.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Probes: a JSON array of {"sql", "expect", "database"?}.
        #[arg(long, default_value = "[]")]
        probes: String,
        /// The port that names the server's socket (it listens on no TCP
        /// port); 0: one free on this host, never production's.
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// The long-running agent: enrols once, heartbeats, discovers what it
    /// can protect, pulls jobs from the appliance and runs them.
    Serve(ServeArgs),
    /// Serve an NBD export as a FUSE file (run by attach).
    #[command(hide = true)]
    ServeDisk {
        #[arg(long)]
        export: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        status: PathBuf,
        /// NBD connections (used when the server advertises
        /// CAN_MULTI_CONN).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// FUSE worker threads (flush, trim, zeroing; reads and writes need
        /// none).
        #[arg(long, default_value_t = 32)]
        workers: usize,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// One-time enrolment token (cdmctl host enrol-token); used only while
    /// the state directory holds no credential.
    #[arg(long, env = "CDM_ENROL_TOKEN", hide_env_values = true)]
    enrol: Option<String>,
    /// The host's name on the appliance [default: the one given with the
    /// token, else the hostname].
    #[arg(long)]
    name: Option<String>,
    /// What to look for on this host: all, postgres (running postmasters
    /// and Debian clusters), mariadb (running servers) or none.
    #[arg(long, default_value = "all", value_parser = ["all", "postgres", "mariadb", "none"])]
    discover: String,
    /// Jobs run at the same time.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    max_jobs: u16,
}

/// How a new stage volume is made (an existing one is used as it is).
#[derive(clap::Args, Clone)]
struct VolumeArgs {
    /// Fingerprint deduplication of a new stage volume.
    #[arg(long)]
    dedup: Option<bool>,
    /// zstd level of a new stage volume (0 = off).
    #[arg(long)]
    compression: Option<u8>,
    /// Encryption of a new stage volume (aes-256-xts, …).
    #[arg(long)]
    encryption: Option<String>,
    /// Extra snapshot metadata (a JSON object), merged into what the agent
    /// records.
    #[arg(long, value_parser = parse_metadata)]
    metadata: Option<serde_json::Value>,
}

fn parse_metadata(s: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str(s) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err("want a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

impl VolumeArgs {
    fn settings(&self, block_size: Option<u32>) -> ops::VolumeSettings {
        ops::VolumeSettings {
            block_size,
            dedup: self.dedup,
            compression: self.compression,
            encryption: self.encryption.clone(),
        }
    }
}

#[derive(clap::Args, Clone)]
struct StageArgs {
    /// Stage volume on the appliance.
    #[arg(long)]
    volume: String,
    /// Create the stage volume with this size if it does not exist.
    #[arg(long, value_parser = cdm_common::size::parse_nonzero)]
    size: Option<u64>,
    /// Fingerprint block size (bytes).
    #[arg(long, default_value_t = 8192)]
    block_size: u32,
    /// Snapshot label.
    #[arg(long)]
    label: Option<String>,
    /// Block size of a new stage volume [default: 65536].
    #[arg(long)]
    stage_block_size: Option<u32>,
    #[command(flatten)]
    vol: VolumeArgs,
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Online backup of a running PostgreSQL (pg_backup_start/stop).
    Postgres {
        #[command(flatten)]
        stage: StageArgs,
        #[command(flatten)]
        conn: PgConnArgs,
        /// The data directory as this host sees it [default: what the server reports].
        #[arg(long)]
        pgdata: Option<PathBuf>,
    },
    /// Online backup of a running MariaDB (mariadb-backup): the first
    /// one full, the next ones incremental, each prepared into a point.
    Mariadb {
        #[command(flatten)]
        stage: StageArgs,
        #[command(flatten)]
        conn: MariaConnArgs,
        /// The data directory as this host sees it [default: what the server reports].
        #[arg(long)]
        datadir: Option<PathBuf>,
    },
    /// A directory tree.
    Files {
        #[command(flatten)]
        stage: StageArgs,
        source: PathBuf,
    },
    /// A block device, an image file or an NBD source (nbd://…).
    Block {
        /// Stage volume on the appliance (made the source's size if missing).
        #[arg(long)]
        volume: String,
        source: String,
        /// qemu dirty bitmap to read changes from on incremental runs.
        #[arg(long)]
        bitmap: Option<String>,
        /// Fingerprint block size (bytes).
        #[arg(long, default_value_t = 65536)]
        block_size: u32,
        #[arg(long)]
        label: Option<String>,
        #[command(flatten)]
        vol: VolumeArgs,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Partition table, filesystems, operating system and applications of
    /// disk images or NBD exports (nothing is booted or mounted).
    Inspect {
        /// Image files, block devices or NBD URIs.
        #[arg(required = true)]
        disks: Vec<String>,
    },
    /// The VMs an inventory lists (libvirt domain XML directory, or a
    /// TOML/JSON inventory file).
    List {
        #[arg(long)]
        inventory: PathBuf,
    },
    /// The VMs regrouped by category (their disks inspected, cached).
    Tree {
        #[arg(long)]
        inventory: PathBuf,
        /// os, app, keyword:WORD, path or pool.
        #[arg(long, default_value = "os")]
        by: String,
        /// Also send the classified inventory to the appliance (served as
        /// /v1/vms and /v1/vms/tree).
        #[arg(long)]
        publish: bool,
    },
    /// Back up every VM of a category (os:linux, os:windows, app:PostgreSQL,
    /// keyword:WORD, path:DIR, pool:NAME).
    Backup {
        #[arg(long)]
        inventory: PathBuf,
        #[arg(long)]
        category: String,
        /// VMs backed up at the same time.
        #[arg(long, default_value_t = 2)]
        parallel: usize,
        /// A persistent qemu dirty bitmap in the qcow2 disks.
        #[arg(long)]
        bitmap: Option<String>,
        /// The stage volumes are PREFIX-VM-diskN (a VM application's
        /// jobs use the application's volume).
        #[arg(long, default_value = cdm_agent::vm::DEFAULT_PREFIX)]
        volume_prefix: String,
        /// Running VMs' QMP sockets are DIR/NAME.qmp (besides the
        /// inventory's `qmp`): such VMs are backed up live through them.
        #[arg(long)]
        qmp_dir: Option<PathBuf>,
        /// Freeze live VMs' filesystems through their guest agent (the
        /// inventory's `guest_agent`, or DIR/NAME.qga) around the point.
        #[arg(long)]
        freeze: bool,
    },
    /// Write a point's disks back as sparse image files (DIR/VM-diskN.raw
    /// or .qcow2) or one disk onto a block device; only allocated data is
    /// read.
    Restore {
        #[arg(long)]
        vm: String,
        /// A directory for the image files.
        #[arg(
            long,
            conflicts_with = "to_device",
            required_unless_present = "to_device"
        )]
        to: Option<PathBuf>,
        /// A block device for one disk (written whole: holes zeroed).
        #[arg(long)]
        to_device: Option<PathBuf>,
        /// raw or qcow2.
        #[arg(long, default_value = "raw", conflicts_with = "to_device")]
        format: String,
        /// The point's run id (`cdmctl vm points`); the newest complete
        /// point by default.
        #[arg(long, conflicts_with = "snapshot")]
        point: Option<String>,
        /// Any of the point's disks' snapshot ids.
        #[arg(long)]
        snapshot: Option<u64>,
        /// Only this disk (its index in the VM).
        #[arg(long)]
        disk: Option<usize>,
        /// Replace existing image files.
        #[arg(long)]
        force: bool,
        /// Connections reading from the appliance (and writing qcow2).
        #[arg(long, default_value_t = cdm_agent::vm_restore::DEFAULT_CONNECTIONS)]
        connections: usize,
    },
}

/// How to reach a PostgreSQL server.
#[derive(clap::Args)]
struct PgConnArgs {
    /// Server socket directory or host.
    #[arg(long, env = "PGHOST", default_value = "/var/run/postgresql")]
    host: String,
    #[arg(long, env = "PGPORT", default_value_t = 5432)]
    port: u16,
    #[arg(long, env = "PGUSER", default_value = "postgres")]
    user: String,
    #[arg(long, default_value = "postgres")]
    dbname: String,
    /// File holding the password (or PGPASSWORD).
    #[arg(long)]
    password_file: Option<PathBuf>,
}

/// How to reach a MariaDB server.
#[derive(clap::Args)]
struct MariaConnArgs {
    /// The server's Unix socket.
    #[arg(long, default_value = "/run/mysqld/mysqld.sock")]
    socket: PathBuf,
    #[arg(long, default_value = "root")]
    user: String,
    /// File holding the password (none: unix_socket authentication).
    #[arg(long)]
    password_file: Option<PathBuf>,
}

fn read_password(f: &Option<PathBuf>) -> anyhow::Result<Option<String>> {
    f.as_ref()
        .map(|f| {
            Ok(std::fs::read_to_string(f)
                .with_context(|| format!("password file {}", f.display()))?
                .trim_end_matches('\n')
                .to_string())
        })
        .transpose()
}

impl PgConnArgs {
    fn conn(&self) -> anyhow::Result<cdm_agent::pg::Conn> {
        let password = match read_password(&self.password_file)? {
            Some(p) => Some(p),
            None => std::env::var("PGPASSWORD").ok(),
        };
        Ok(cdm_agent::pg::Conn {
            host: self.host.clone(),
            port: self.port,
            user: self.user.clone(),
            dbname: self.dbname.clone(),
            password,
        })
    }
}

impl MariaConnArgs {
    fn conn(&self) -> anyhow::Result<cdm_agent::maria::Conn> {
        Ok(cdm_agent::maria::Conn {
            socket: self.socket.clone(),
            user: self.user.clone(),
            password: read_password(&self.password_file)?,
        })
    }
}

/// Continuous log archiving (the ground of point-in-time restores).
#[derive(Subcommand)]
enum LogsCmd {
    /// Stream a PostgreSQL cluster's WAL (pg_receivewal through a
    /// replication slot) into the log volume VOLUME-log, until stopped.
    Postgres {
        /// The cluster's stage volume (its log volume is VOLUME-log).
        #[arg(long)]
        volume: String,
        #[command(flatten)]
        conn: PgConnArgs,
        /// Replication slot [default: cdm_VOLUME, '-' as '_'].
        #[arg(long)]
        slot: Option<String>,
        /// Seconds between removals of WAL that no kept point needs.
        #[arg(long, default_value_t = 300)]
        prune_interval: u64,
    },
    /// Stream a MariaDB server's binlogs (mariadb-binlog --raw
    /// --stop-never) into the log volume VOLUME-log, until stopped.
    Mariadb {
        #[arg(long)]
        volume: String,
        #[command(flatten)]
        conn: MariaConnArgs,
    },
}

#[derive(Subcommand)]
enum RestoreCmd {
    /// Copy a snapshot's files to a directory.
    Regular {
        /// VOLUME@ID
        snapshot: String,
        #[arg(long)]
        target: PathBuf,
        /// Start PostgreSQL (or MariaDB) on the copy, on this port.
        #[arg(long)]
        start_port: Option<u16>,
    },
    /// A writable clone of the snapshot, attached and started (no copy).
    Instant {
        /// VOLUME@ID
        snapshot: String,
        /// Clone name [default: VOLUME-ID-instant].
        #[arg(long)]
        name: Option<String>,
        /// PostgreSQL (or MariaDB) port.
        #[arg(long, default_value_t = 5433)]
        port: u16,
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// A writable clone of the nearest earlier point, started, the
    /// archived WAL or binlogs replayed onto it up to a time, an LSN, a
    /// restore point or a GTID (needs `cdm-agent logs` running).
    Pitr {
        /// The application's stage volume.
        volume: String,
        /// RFC 3339 (with a zone).
        #[arg(long)]
        target_time: Option<String>,
        /// PostgreSQL: an LSN (X/Y).
        #[arg(long)]
        target_lsn: Option<String>,
        /// PostgreSQL: a restore point's name (pg_create_restore_point).
        #[arg(long)]
        target_name: Option<String>,
        /// MariaDB: a GTID (domain-server-seq), included.
        #[arg(long)]
        target_gtid: Option<String>,
        /// Clone name [default: VOLUME-pitr].
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 5433)]
        port: u16,
        #[arg(long)]
        mount: Option<PathBuf>,
    },
    /// A named clone for test or development (several may run at once).
    Clone {
        /// VOLUME@ID
        snapshot: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        mount: Option<PathBuf>,
    },
}

/// The agent's state directory (flag, then config, then
/// /var/lib/cdm-agent), made if missing, as an absolute path: the
/// processes it starts may run elsewhere.
fn state_dir(cli: &Cli, cfg: &Config) -> anyhow::Result<PathBuf> {
    let dir = cli
        .state_dir
        .clone()
        .or(cfg.state_dir.clone())
        .unwrap_or_else(|| PathBuf::from("/var/lib/cdm-agent"));
    std::fs::create_dir_all(&dir).with_context(|| format!("state directory {}", dir.display()))?;
    std::fs::canonicalize(&dir).with_context(|| format!("state directory {}", dir.display()))
}

fn ctx(cli: &Cli) -> anyhow::Result<Ctx> {
    let cfg = Config::load(cli.config.as_deref())?;
    let url = cli
        .url
        .clone()
        .or(cfg.url.clone())
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let token = match (&cli.token, &cli.token_file, &cfg.token, &cfg.token_file) {
        (Some(t), ..) => Some(t.trim().to_string()),
        (None, Some(f), ..) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, None, Some(t), _) => Some(t.trim().to_string()),
        (None, None, None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        _ => cdm_api::client::default_token(),
    };
    let nbd = cli.nbd.clone().or(cfg.nbd.clone()).unwrap_or_else(|| {
        let host = url
            .split("://")
            .nth(1)
            .unwrap_or("127.0.0.1")
            .split(['/', ':'])
            .next()
            .unwrap_or("127.0.0.1")
            .to_string();
        format!("{host}:10809")
    });
    let mut bandwidth = cfg.bandwidth.clone();
    if let Some(l) = cli.limit {
        bandwidth.limit_mibps = Some(l);
    }
    if !cli.windows.is_empty() {
        bandwidth.windows = cli.windows.clone();
    }
    bandwidth.validate()?;
    let state_dir = state_dir(cli, &cfg)?;
    let nbd_tls = match &cli.ca_file {
        Some(p) => Some(nbd_proto::ClientTls::from_ca_file(p)?),
        None => None,
    };
    Ok(Ctx {
        api: cdm_api::client::Client::connect(&url, token, cli.ca_file.as_deref())?,
        // Absolute: serve-disk processes get it and may run elsewhere.
        ca_file: match &cli.ca_file {
            Some(p) => {
                Some(std::fs::canonicalize(p).with_context(|| format!("CA file {}", p.display()))?)
            }
            None => None,
        },
        nbd_tls,
        nbd,
        state_dir,
        bandwidth: Bandwidth { ..bandwidth },
        json: cli.json,
        progress: !cli.json && std::io::stderr().is_terminal(),
    })
}

/// `serve-disk`: the appliance at `cli.nbd`, with STARTTLS against
/// `cli.ca_file` if given.
fn serve_disk(
    cli: &Cli,
    export: &str,
    dir: &Path,
    status: &Path,
    conns: usize,
    workers: usize,
    timeout: u64,
) -> anyhow::Result<()> {
    let nbd = cli.nbd.as_deref().unwrap_or("127.0.0.1:10809");
    let tls = cli
        .ca_file
        .as_deref()
        .map(nbd_proto::ClientTls::from_ca_file)
        .transpose()?;
    let timeout = std::time::Duration::from_secs(timeout);
    let r = cdm_agent::nbdfile::connect(nbd, export, conns, timeout, tls)
        .map_err(|e| cdm_agent::err!(Host, "NBD {nbd} export {export}: {e}"))
        .and_then(|c| cdm_agent::nbdfile::serve(c, dir, workers));
    let text = match &r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("{e:#}"),
    };
    std::fs::write(status, text)?;
    Ok(r?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.cmd, Cmd::ServeDisk { .. } | Cmd::Serve(_));
    // The disk server is a daemon (info); commands print their own results.
    cdm_common::log::init(if serving {
        cdm_common::log::LevelFilter::INFO
    } else {
        cdm_common::log::LevelFilter::WARN
    });
    let json = cli.json;
    let started = Instant::now();
    if let Cmd::Serve(a) = &cli.cmd {
        return serve_cmd(&cli, a);
    }
    match run(&cli) {
        Ok(v) => {
            if !serving {
                ops::print(json, &v, started.elapsed());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            // The whole chain, each cause once (as the library's report).
            let text = cdm_agent::error::chain_text(e.as_ref());
            if json {
                println!("{}", serde_json::json!({ "error": text }));
            } else {
                eprintln!("cdm-agent: {text}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs the command; its result is what `main` prints.
fn run(cli: &Cli) -> anyhow::Result<serde_json::Value> {
    if let Cmd::ServeDisk {
        export,
        dir,
        status,
        connections,
        workers,
        timeout_secs,
    } = &cli.cmd
    {
        serve_disk(
            cli,
            export,
            dir,
            status,
            *connections,
            *workers,
            *timeout_secs,
        )?;
        return Ok(serde_json::Value::Null);
    }
    let ctx = ctx(cli)?;
    Ok(match &cli.cmd {
        Cmd::Attach {
            export,
            mount,
            name,
            create,
            mkfs,
            read_only,
        } => attach_cmd(&ctx, export, mount, name, *create, mkfs, *read_only)?,
        Cmd::Detach { name, delete_clone } => ops::detach(&ctx, name, *delete_clone)?,
        Cmd::List => serde_json::to_value(attach::list(&ctx))?,
        Cmd::Backup(b) => backup_cmd(&ctx, b)?,
        Cmd::Restore(r) => restore_cmd(&ctx, r)?,
        Cmd::Logs(l) => logs_cmd(&ctx, l)?,
        Cmd::Vm(v) => vm_cmd(&ctx, v)?,
        Cmd::Drill {
            snapshot,
            name,
            timeout,
            probes,
            port,
        } => {
            let probes =
                serde_json::from_str(probes).context("--probes: a JSON array of probes")?;
            cdm_agent::drill::run(
                std::sync::Arc::new(ctx),
                cdm_agent::drill::DrillArgs {
                    snapshot: snapshot.clone(),
                    name: name.clone(),
                    timeout: std::time::Duration::from_secs((*timeout).max(1)),
                    probes,
                    port: *port,
                },
            )?
        }
        Cmd::ServeDisk { .. } | Cmd::Serve(_) => unreachable!("handled above"),
    })
}

fn attach_cmd(
    ctx: &Ctx,
    export: &str,
    mount: &Option<PathBuf>,
    name: &Option<String>,
    create: Option<u64>,
    mkfs: &str,
    read_only: bool,
) -> anyhow::Result<serde_json::Value> {
    let name = name.clone().unwrap_or_else(|| attach::name_of(export));
    ops::check_name(&name)?;
    let writable = !read_only && !export.contains('@');
    // A filesystem is made only on a volume nothing was ever written to: a
    // disk blkid does not recognise may still hold data (a block backup, a
    // partitioned image).
    let blank = if writable {
        // Whatever is written now is not in the block fingerprints: the
        // next block backup compares.
        ops::invalidate_block_fingerprints(ctx, export)?;
        ops::ensure_volume(ctx, export, create, 4096)?
            .0
            .allocated_bytes
            == 0
    } else {
        false
    };
    let mount = mount
        .clone()
        .unwrap_or_else(|| ctx.state_dir.join("mnt").join(&name));
    let (a, _child) = attach::attach(
        ctx,
        &AttachRequest {
            name,
            export: export.to_string(),
            writable,
            mount,
            mkfs: blank.then(|| mkfs.to_string()),
        },
    )?;
    Ok(serde_json::to_value(a)?)
}

fn backup_cmd(ctx: &Ctx, b: &BackupCmd) -> anyhow::Result<serde_json::Value> {
    Ok(match b {
        BackupCmd::Postgres {
            stage,
            conn,
            pgdata,
        } => ops::backup_postgres(
            ctx,
            &ops::Stage::from(stage),
            &conn.conn()?,
            pgdata.as_deref(),
        )?,
        BackupCmd::Mariadb {
            stage,
            conn,
            datadir,
        } => cdm_agent::maria_backup::backup_mariadb(
            ctx,
            &ops::Stage::from(stage),
            &conn.conn()?,
            datadir.as_deref(),
        )?,
        BackupCmd::Files { stage, source } => {
            ops::backup_files(ctx, &ops::Stage::from(stage), source)?
        }
        BackupCmd::Block {
            volume,
            source,
            bitmap,
            block_size,
            label,
            vol,
        } => ops::backup_block_with(
            ctx,
            &ops::BlockBackup {
                volume,
                source,
                bitmap: bitmap.as_deref(),
                block_size: *block_size,
                settings: &vol.settings(None),
            },
            label.clone(),
            vol.metadata.clone(),
        )?,
    })
}

fn logs_cmd(ctx: &Ctx, l: &LogsCmd) -> anyhow::Result<serde_json::Value> {
    use cdm_agent::logs;
    let stop = logs::stop_on_signal();
    Ok(match l {
        LogsCmd::Postgres {
            volume,
            conn,
            slot,
            prune_interval,
        } => {
            let slot = slot.clone().unwrap_or_else(|| {
                format!("cdm_{}", volume.replace(['-', '.'], "_").to_lowercase())
            });
            logs::archive_postgres(
                ctx,
                volume,
                &logs::PgArchive {
                    conn: conn.conn()?,
                    slot,
                    prune_every: Duration::from_secs(*prune_interval),
                },
                &stop,
            )?
        }
        LogsCmd::Mariadb { volume, conn } => {
            logs::archive_mariadb(ctx, volume, &conn.conn()?, &stop)?
        }
    })
}

fn restore_cmd(ctx: &Ctx, r: &RestoreCmd) -> anyhow::Result<serde_json::Value> {
    Ok(match r {
        RestoreCmd::Regular {
            snapshot,
            target,
            start_port,
        } => ops::restore_regular(ctx, snapshot, target, *start_port)?,
        RestoreCmd::Instant {
            snapshot,
            name,
            port,
            mount,
        } => {
            let name = match name {
                Some(n) => n.clone(),
                None => format!("{}-instant", attach::name_of(snapshot).replace('_', "-")),
            };
            ops::restore_clone(ctx, snapshot, &name, *port, mount.clone())?
        }
        RestoreCmd::Pitr {
            volume,
            target_time,
            target_lsn,
            target_name,
            target_gtid,
            name,
            port,
            mount,
        } => {
            let target = cdm_agent::pitr::Target::from_flags(
                target_time.as_deref(),
                target_lsn.as_deref(),
                target_name.as_deref(),
                target_gtid.as_deref(),
            )?;
            let name = name.clone().unwrap_or_else(|| format!("{volume}-pitr"));
            cdm_agent::pitr::restore(ctx, volume, &target, &name, *port, mount.clone())?
        }
        RestoreCmd::Clone {
            snapshot,
            name,
            port,
            mount,
        } => ops::restore_clone(ctx, snapshot, name, *port, mount.clone())?,
    })
}

fn vm_cmd(ctx: &Ctx, v: &VmCmd) -> anyhow::Result<serde_json::Value> {
    use cdm_agent::vm;
    Ok(match v {
        VmCmd::Inspect { disks } => vm::inspect_cmd(disks)?,
        VmCmd::List { inventory } => vm::list_cmd(inventory)?,
        VmCmd::Tree {
            inventory,
            by,
            publish,
        } => vm::tree_cmd(ctx, inventory, by, *publish)?,
        VmCmd::Backup {
            inventory,
            category,
            parallel,
            bitmap,
            volume_prefix,
            qmp_dir,
            freeze,
        } => vm::backup_cmd(
            ctx,
            inventory,
            category,
            *parallel,
            bitmap.as_deref(),
            volume_prefix,
            &cdm_agent::vm_live::LiveOptions {
                qmp_dir: qmp_dir.clone(),
                freeze: *freeze,
            },
        )?,
        VmCmd::Restore {
            vm,
            to,
            to_device,
            format,
            point,
            snapshot,
            disk,
            force,
            connections,
        } => {
            use cdm_agent::vm_restore::{restore_cmd, Format, Restore, Target};
            let target = match (to, to_device) {
                (_, Some(d)) => Target::Device(d.clone()),
                (Some(dir), None) => Target::Dir {
                    dir: dir.clone(),
                    format: Format::parse(format)?,
                },
                (None, None) => anyhow::bail!("--to DIR or --to-device DEV is needed"),
            };
            let snap = snapshot.map(|s| s.to_string());
            restore_cmd(
                ctx,
                &Restore {
                    vm,
                    target,
                    point: point.as_deref().or(snap.as_deref()),
                    disk: *disk,
                    force: *force,
                    connections: *connections,
                },
            )?
        }
    })
}

impl From<&StageArgs> for ops::Stage {
    fn from(s: &StageArgs) -> ops::Stage {
        ops::Stage {
            volume: s.volume.clone(),
            size: s.size,
            block_size: s.block_size,
            label: s.label.clone(),
            metadata: s.vol.metadata.clone(),
            settings: s.vol.settings(s.stage_block_size),
        }
    }
}

/// `cdm-agent serve`: runs until SIGTERM (exit 0), or until the appliance
/// refuses the credential (exit `EXIT_RETIRED`, which the systemd unit
/// does not restart).
fn serve_cmd(cli: &Cli, a: &ServeArgs) -> ExitCode {
    use cdm_agent::serve;
    let opts = (|| -> anyhow::Result<serve::Options> {
        let cfg = Config::load(cli.config.as_deref())?;
        let url = cli
            .url
            .clone()
            .or(cfg.url.clone())
            .unwrap_or_else(|| "http://127.0.0.1:8080".into());
        let nbd = cli
            .nbd
            .clone()
            .or(cfg.nbd.clone())
            .unwrap_or_else(|| serve::default_nbd(&url));
        Ok(serve::Options {
            url,
            nbd,
            state_dir: state_dir(cli, &cfg)?,
            enrol: a.enrol.clone(),
            name: a.name.clone(),
            discover: (a.discover != "none").then(|| serve::discover::Roots {
                postgres: a.discover != "mariadb",
                mariadb: a.discover != "postgres",
                ..Default::default()
            }),
            max_jobs: usize::from(a.max_jobs),
            ca_file: cli.ca_file.clone(),
            exe: std::env::current_exe().context("cannot find the agent's executable")?,
            os_release: PathBuf::from("/etc/os-release"),
        })
    })();
    let r = match opts {
        Ok(o) => serve::run(o).map_err(|e| (e.exit_code(), e.to_string())),
        Err(e) => Err((1, format!("{e:#}"))),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, text)) => {
            tracing::error!("{text}");
            eprintln!("cdm-agent: {text}");
            ExitCode::from(code)
        }
    }
}
