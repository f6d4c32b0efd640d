//! `snapshotd`: the appliance daemon. One process owns the pool under the
//! data directory, serves its volumes (read-write), clones and snapshots
//! (read-only, `VOLUME@ID`) over NBD, and the HTTP API that manages them;
//! runs snapshot schedules, retention and webhooks. On first start it
//! creates the pool and an admin token.

mod appliance;
mod audit;
mod ballast;
mod clock;
mod control;
mod error;
mod events;
mod jobs;
mod metrics;
mod pending;
mod recovery;
mod replication;
mod scheduler;
mod secrets;
mod state;
mod targets;
mod tier;
mod tls;
mod vm_qemu;

use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cdm_common::signals;
use cdm_common::size::{human, parse_size};
use cdmfs::{BlockDev, FileDev, FormatOptions, OpenOptions, Pool};
use clap::Parser;
use nbd_server::{Listener, Server, ServerConfig};
use serde::Deserialize;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "snapshotd",
    version,
    about = "cdm appliance daemon: owns the pool, serves it over NBD and the HTTP API"
)]
struct Args {
    /// Configuration file (TOML); command-line options override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory: the pool is DATA/pool, the appliance state DATA/state.redb
    /// [default: ./cdm-data].
    #[arg(long)]
    data: Option<PathBuf>,
    /// NBD listener, HOST:PORT or unix:PATH; repeatable [default: 127.0.0.1:10809].
    /// Port 0 lets the kernel choose a free port: see --ready-file.
    #[arg(long)]
    nbd: Vec<String>,
    /// HTTP API listener, HOST:PORT [default: 127.0.0.1:8080]. Port 0 lets
    /// the kernel choose a free port: see --ready-file.
    #[arg(long)]
    api: Option<String>,
    /// Once every listener is bound and the admin token written, write the
    /// addresses actually bound here as JSON, `{"api": "127.0.0.1:41234",
    /// "api_tls": "127.0.0.1:41236" (or null), "ca": "DATA/tls/ca.crt",
    /// "nbd": ["127.0.0.1:41235", "unix:/run/cdm/nbd.sock"]}` (atomically:
    /// a reader sees no file or the whole file). Removed at start if left
    /// by an earlier run.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Size of the pool file created on first start [default: 64G, or half
    /// the host filesystem's free space if less]: bytes (`500G`) or a share
    /// of the host filesystem's free space at creation (`90%`, as the
    /// appliance image's data partition uses). It is preallocated (its
    /// blocks reserved on the host filesystem) unless --pool-sparse.
    #[arg(long, value_parser = PoolSize::parse)]
    pool_size: Option<PoolSize>,
    /// Create the pool file sparse (blocks taken as data lands) instead of
    /// preallocated: then a full host filesystem stops the pool's commits.
    /// Overrides `pool_prealloc` of the configuration file.
    #[arg(long)]
    pool_sparse: bool,
    /// Seconds between background commits [default: 5].
    #[arg(long)]
    commit_interval: Option<u64>,
    /// A clock that `POST /v1/clock` moves forward (for tests of schedules
    /// and retention; never in production).
    #[arg(long)]
    fake_clock: bool,
    /// Agent jobs (backups, restores) running at once on the appliance.
    #[arg(long, default_value_t = control::MAX_JOBS)]
    max_jobs: usize,
    /// Agent jobs running at once on one host.
    #[arg(long, default_value_t = control::HOST_JOBS)]
    max_jobs_per_host: usize,
    /// A running agent job with no progress call for this long fails.
    #[arg(long, default_value_t = control::STALL_SECS)]
    job_stall_seconds: u64,
    /// A cancelled agent job whose agent does not stop it ends this long
    /// after the cancel.
    #[arg(long, default_value_t = control::CANCEL_GRACE_SECS)]
    cancel_grace_seconds: u64,
    /// Seconds between agents' heartbeats (they say which jobs and log
    /// archivers run; a host is offline after three missed). Lower values
    /// notice a failing archiver sooner, at the cost of more calls.
    #[arg(long, default_value_t = cdm_api::control::HEARTBEAT_SECS,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat_seconds: u64,
    /// Seconds between sweeps that start a `tier` job for each volume
    /// whose policy (`tier_after_days`, `tier_keep_last`) makes points due
    /// that are not tiered yet (with an object tier configured).
    #[arg(long, default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..=86400))]
    tier_sweep_seconds: u64,
    /// Fault injection for tests (never in production): while the file
    /// DIR/state-eio exists, writes to the state database fail with EIO;
    /// DIR/pool-enospc, pool-short-write, pool-eio-write, pool-eio-read,
    /// pool-eio-sync and pool-slow-sync (milliseconds) make the pool's
    /// device fail or stall.
    #[arg(long, value_name = "DIR")]
    fault_dir: Option<PathBuf>,
    /// Key for encrypted volumes: a file of 32 random bytes (or 64 hex
    /// digits). The first start with a key sets it up; later starts check
    /// it and refuse a wrong one.
    #[arg(long, conflicts_with = "passphrase_file")]
    key_file: Option<PathBuf>,
    /// Like --key-file, but a passphrase (first line of the file),
    /// stretched with Argon2id.
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
    /// Accept a key or passphrase file that the group or others may read
    /// (logged as a warning); without it such a file stops the start.
    #[arg(long)]
    allow_insecure_key_file: bool,
    /// Serve the FUSE view of the pool here (volumes/NAME/disk,
    /// snapshots/VOLUME/ID/disk) and enable instant mounts (under
    /// DATA/mounts). Needs root (or CAP_SYS_ADMIN) and /dev/fuse.
    #[arg(long)]
    mount: Option<PathBuf>,
    /// The appliance's name among its replication peers [default: the
    /// host name].
    #[arg(long)]
    name: Option<String>,
    /// Replication listener, HOST:PORT (port 0: see --ready-file): mutually
    /// authenticated HTTPS for paired appliances. Off when not given.
    #[arg(long, value_name = "ADDR")]
    replication: Option<String>,
    /// Appliance mode (the appliance image): `GET /v1/appliance` serves
    /// the A/B slots' status and `POST /v1/appliance/updates` takes signed
    /// update bundles for the installer (DATA/updates/pending.cdmb).
    #[arg(long)]
    appliance: bool,
    /// The update tool that verifies uploaded bundles [default: /usr/bin/cdm-update].
    #[arg(long, value_name = "PATH")]
    update_tool: Option<PathBuf>,
    /// The trusted update keys (`*.pub`) [default: /etc/cdm/update-keys].
    #[arg(long, value_name = "DIR")]
    update_keys: Option<PathBuf>,
    /// The status file `cdm-update status --write` keeps
    /// [default: /run/cdm-update/status.json].
    #[arg(long, value_name = "FILE")]
    appliance_status: Option<PathBuf>,
    #[command(flatten)]
    tls: tls::TlsArgs,
}

/// The configuration file; every key is optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    data: Option<PathBuf>,
    nbd: Option<Vec<String>>,
    api: Option<String>,
    ready_file: Option<PathBuf>,
    pool_size: Option<String>,
    /// Preallocate a new pool file (default true); false makes it sparse.
    pool_prealloc: Option<bool>,
    commit_interval: Option<u64>,
    fake_clock: Option<bool>,
    fault_dir: Option<PathBuf>,
    /// Milliseconds between scheduler ticks.
    scheduler_tick_ms: Option<u64>,
    key_file: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    allow_insecure_key_file: Option<bool>,
    mount: Option<PathBuf>,
    /// HTTPS API listener (`--api-tls`).
    api_tls: Option<String>,
    /// More names for the appliance's own certificate (`--tls-san`).
    tls_san: Option<Vec<String>>,
    /// Plain HTTP and NBD for non-loopback peers too (`--plain-remote`).
    plain_remote: Option<bool>,
    /// The appliance's name (`--name`).
    name: Option<String>,
    /// Replication listener (`--replication`).
    replication: Option<String>,
    /// Appliance mode (`--appliance`) and its files (`--update-tool`,
    /// `--update-keys`, `--appliance-status`).
    appliance: Option<bool>,
    update_tool: Option<PathBuf>,
    update_keys: Option<PathBuf>,
    appliance_status: Option<PathBuf>,
    /// Pool-wide defaults for new volumes (a request's fields win).
    #[serde(default)]
    defaults: cdmfs::DataPolicy,
    #[serde(default)]
    webhooks: events::WebhookConfig,
}

struct Settings {
    data: PathBuf,
    nbd: Vec<String>,
    api: String,
    ready_file: Option<PathBuf>,
    pool_size: PoolSize,
    pool_prealloc: bool,
    commit_interval: u64,
    fake_clock: bool,
    fault_dir: Option<PathBuf>,
    tick: Duration,
    webhooks: events::WebhookConfig,
    key: Option<cdmfs::KeySource>,
    defaults: cdmfs::DataPolicy,
    mount: Option<PathBuf>,
    /// TLS options, the configuration file's merged in.
    tls: tls::TlsArgs,
    name: String,
    replication: Option<String>,
    /// With `--appliance`: the appliance image's status file and updates.
    appliance: Option<appliance::UpdateSetup>,
}

/// Refuses a key or passphrase file the group or others may access: whoever
/// reads it can decrypt every encrypted volume. With `allow` it is only a
/// (loud) warning, for setups that protect the file some other way.
fn check_key_file_mode(path: &Path, allow: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    if allow {
        tracing::warn!(
            file = %path.display(),
            mode = format!("{mode:o}"),
            "INSECURE: key file is accessible to group or others; anyone who reads it can \
             decrypt the encrypted volumes (allowed by allow_insecure_key_file)"
        );
        return Ok(());
    }
    bail!(
        "key file {} has mode {mode:o}: group or others may read it; fix it with \
         `chmod 600 {}` (or start with --allow-insecure-key-file)",
        path.display(),
        path.display()
    )
}

fn read_key(args: &Args, cfg: &Config) -> Result<Option<cdmfs::KeySource>> {
    let key_file = args.key_file.clone().or(cfg.key_file.clone());
    let pass_file = args.passphrase_file.clone().or(cfg.passphrase_file.clone());
    let allow = args.allow_insecure_key_file || cfg.allow_insecure_key_file.unwrap_or(false);
    if let Some(p) = key_file {
        check_key_file_mode(&p, allow)?;
        return Ok(Some(cdmfs::KeySource::from_key_file(&p)?));
    }
    if let Some(p) = pass_file {
        check_key_file_mode(&p, allow)?;
        let t = std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read passphrase file {}", p.display()))?;
        let line = t.lines().next().unwrap_or("").to_string();
        anyhow::ensure!(!line.is_empty(), "passphrase file {} is empty", p.display());
        return Ok(Some(cdmfs::KeySource::Passphrase(line)));
    }
    Ok(None)
}

fn settings(args: &Args) -> Result<Settings> {
    let cfg: Config = match &args.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("bad configuration in {}", p.display()))?
        }
        None => Config::default(),
    };
    let pool_size = match (&args.pool_size, &cfg.pool_size) {
        (Some(s), _) => *s,
        (None, Some(s)) => PoolSize::parse(s).map_err(|e| anyhow::anyhow!("pool_size: {e}"))?,
        // Chosen at creation: 64 GiB, or less where the host has less.
        (None, None) => PoolSize::Default,
    };
    cfg.defaults
        .check()
        .map_err(|e| anyhow::anyhow!("[defaults]: {e}"))?;
    let mut tls = args.tls.clone();
    tls.api_tls = tls.api_tls.or(cfg.api_tls.clone());
    if tls.tls_san.is_empty() {
        tls.tls_san = cfg.tls_san.clone().unwrap_or_default();
    }
    tls.plain_remote |= cfg.plain_remote.unwrap_or(false);
    let name = match args.name.clone().or(cfg.name.clone()) {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| cdm_common::names::check(h).is_ok())
            .unwrap_or_else(|| "cdm".to_string()),
    };
    cdm_common::names::check(&name)
        .map_err(|e| anyhow::anyhow!("bad appliance name {name:?}: it {e}"))?;
    let data = args
        .data
        .clone()
        .or(cfg.data.clone())
        .unwrap_or_else(|| PathBuf::from("./cdm-data"));
    let appliance = (args.appliance || cfg.appliance.unwrap_or(false)).then(|| {
        let or = |a: &Option<PathBuf>, c: &Option<PathBuf>, d: &str| {
            a.clone().or(c.clone()).unwrap_or_else(|| PathBuf::from(d))
        };
        appliance::UpdateSetup {
            status_file: or(
                &args.appliance_status,
                &cfg.appliance_status,
                "/run/cdm-update/status.json",
            ),
            tool: or(&args.update_tool, &cfg.update_tool, "/usr/bin/cdm-update"),
            keys: or(&args.update_keys, &cfg.update_keys, "/etc/cdm/update-keys"),
            spool: data.join("updates"),
            busy: Default::default(),
        }
    });
    Ok(Settings {
        appliance,
        tls,
        name,
        replication: args.replication.clone().or(cfg.replication.clone()),
        key: read_key(args, &cfg)?,
        mount: args.mount.clone().or(cfg.mount.clone()),
        defaults: cfg.defaults,
        data,
        nbd: if !args.nbd.is_empty() {
            args.nbd.clone()
        } else {
            cfg.nbd
                .unwrap_or_else(|| vec!["127.0.0.1:10809".to_string()])
        },
        api: args
            .api
            .clone()
            .or(cfg.api)
            .unwrap_or_else(|| "127.0.0.1:8080".to_string()),
        ready_file: args.ready_file.clone().or(cfg.ready_file),
        pool_size,
        pool_prealloc: !args.pool_sparse && cfg.pool_prealloc.unwrap_or(true),
        commit_interval: args
            .commit_interval
            .or(cfg.commit_interval)
            .unwrap_or(5)
            .max(1),
        fake_clock: args.fake_clock || cfg.fake_clock.unwrap_or(false),
        fault_dir: args.fault_dir.clone().or(cfg.fault_dir),
        tick: Duration::from_millis(cfg.scheduler_tick_ms.unwrap_or(1000).max(10)),
        webhooks: cfg.webhooks,
    })
}

/// The size asked for a new pool file.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PoolSize {
    /// Not configured: see [`default_pool_size`].
    Default,
    Bytes(u64),
    /// A share (1..=100) of the host filesystem's free space at creation.
    PercentFree(u8),
}

impl PoolSize {
    fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.trim().strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(n @ 1..=100) => Ok(PoolSize::PercentFree(n)),
                _ => Err(format!("{s:?}: a share of the free space is 1% to 100%")),
            };
        }
        parse_size(s)
            .map(PoolSize::Bytes)
            .map_err(|e| e.to_string())
    }

    /// Bytes for a new pool file at `path` (whole MiB for a share).
    fn resolve(self, path: &Path, prealloc: bool) -> Result<u64> {
        match self {
            PoolSize::Default => Ok(default_pool_size(path, prealloc)),
            PoolSize::Bytes(n) => Ok(n),
            PoolSize::PercentFree(p) => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let free = ballast::free_bytes(dir)
                    .with_context(|| format!("cannot read the free space of {}", dir.display()))?;
                let size = (free as u128 * p as u128 / 100) as u64 >> 20 << 20;
                if size < 1 << 30 {
                    bail!(
                        "pool_size {p}% of the {} free on {} is {}: less than the 1 GiB a pool needs",
                        human(free),
                        dir.display(),
                        human(size)
                    );
                }
                Ok(size)
            }
        }
    }
}

/// The size of a new pool when none is configured: 64 GiB, but a
/// preallocated pool takes at most half the host filesystem's free space
/// (whole GiB, at least 1 GiB), so a first start works on a small disk and
/// leaves room for everything else. `cdmctl pool grow` adds more later.
fn default_pool_size(path: &Path, prealloc: bool) -> u64 {
    const DEFAULT: u64 = 64 << 30;
    if !prealloc {
        return DEFAULT;
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let Some(free) = ballast::free_bytes(dir) else {
        return DEFAULT;
    };
    let size = (free / 2 / (1 << 30) * (1 << 30)).clamp(1 << 30, DEFAULT);
    if size < DEFAULT {
        tracing::warn!(
            size = %human(size),
            free = %human(free),
            "no pool_size configured: the new pool takes half the free space (at most 64 GiB); grow it with `cdmctl pool grow`"
        );
    }
    size
}

/// A new pool file: preallocated if asked and the host filesystem can;
/// sparse (with a loud warning) where it cannot preallocate.
fn create_pool_file(path: &Path, size: PoolSize, prealloc: bool) -> Result<FileDev> {
    let cannot = || format!("cannot create {}", path.display());
    let size = size.resolve(path, prealloc)?;
    if !prealloc {
        return FileDev::create(path, size).with_context(cannot);
    }
    match FileDev::create_preallocated(path, size) {
        Ok(dev) => Ok(dev),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            tracing::warn!(
                error = %e,
                path = %path.display(),
                "CANNOT PREALLOCATE the pool on this filesystem: creating it sparse; a full \
                 host filesystem will stop its commits"
            );
            FileDev::create(path, size).with_context(cannot)
        }
        Err(e) if e.kind() == std::io::ErrorKind::StorageFull => Err(e).with_context(|| {
            format!(
                "cannot create the pool: choose a smaller pool_size (--pool-size), free space, \
                 or create it sparse (--pool-sparse, not recommended); {}",
                path.display()
            )
        }),
        Err(e) => Err(e).with_context(cannot),
    }
}

/// A sparse pool file is worth a warning at every start: its blocks are
/// taken from the host filesystem only as data lands.
fn warn_if_sparse(path: &Path) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.file_type().is_file() && !cdmfs::fully_allocated(&meta) {
        tracing::warn!(
            path = %path.display(),
            size = %human(meta.len()),
            "sparse pool: a full host filesystem stops commits; preallocate it with \
             `fallocate -l {} {}` while snapshotd is stopped",
            meta.len(),
            path.display()
        );
    }
}

fn open_pool(
    path: &Path,
    size: PoolSize,
    prealloc: bool,
    key: Option<cdmfs::KeySource>,
    fault_dir: Option<&Path>,
) -> Result<Pool> {
    let dev = if path.exists() {
        FileDev::open(path).with_context(|| format!("cannot open {}", path.display()))?
    } else {
        let dev = create_pool_file(path, size, prealloc)?;
        restrict(path, 0o600, false)?;
        Pool::format(&dev, &FormatOptions::default()).context("cannot format the pool")?;
        tracing::info!(
            path = %path.display(),
            size = %human(dev.len().unwrap_or_default()),
            preallocated = dev.preallocated(),
            "created a new pool"
        );
        dev
    };
    warn_if_sparse(path);
    let opts = OpenOptions {
        key,
        ..OpenOptions::default()
    };
    let dev: Arc<dyn cdmfs::BlockDev> = match fault_dir {
        // Tests make the pool's device fail on demand (see cdmfs::FaultDev).
        Some(d) => Arc::new(cdmfs::FaultDev::new(Arc::new(dev), d)),
        None => Arc::new(dev),
    };
    Pool::open(dev, &opts).context("cannot open the pool")
}

/// Sets `path`'s mode to `mode` if it allows more (the umask decides the
/// mode of what we create, and an older snapshotd left 0755/0644): the pool
/// holds volume data and state.redb password hashes. `warn` logs the change,
/// for files that existed before this start.
fn restrict(path: &Path, mode: u32, warn: bool) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let old = meta.permissions().mode() & 0o777;
    if old & !mode == 0 {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {:o} {}", mode, path.display()))?;
    if warn {
        tracing::warn!(
            path = %path.display(),
            old = format!("{old:o}"),
            new = format!("{mode:o}"),
            "tightened the mode of an existing file in the data directory"
        );
    }
    Ok(())
}

/// The data directory, 0700 whatever the umask; an existing one and its
/// pool, state and token files are tightened (with a warning) if looser.
fn secure_data_dir(data: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let existed = data.exists();
    if !existed {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data)
            .with_context(|| format!("cannot create {}", data.display()))?;
    }
    restrict(data, 0o700, existed)?;
    for name in ["pool", "state.redb", "admin.token"] {
        let p = data.join(name);
        if p.exists() {
            restrict(&p, 0o600, true)?;
        }
    }
    Ok(())
}

fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

/// NBD: the server over the pool, its connect/leave events, its listeners.
fn start_nbd(
    s: &Settings,
    tls: &tls::Material,
    pool: &Arc<Pool>,
    state: &Arc<state::State>,
    events: &Arc<events::Events>,
) -> Result<(Arc<Server>, Vec<String>)> {
    let ev = events.clone();
    let cfg = ServerConfig {
        tls: Some(tls::nbd_settings(tls, &s.tls).context("NBD TLS settings")?),
        on_event: Some(Arc::new(move |e: nbd_server::server::ConnEvent| {
            let (kind, c) = match e {
                nbd_server::server::ConnEvent::Connected(c) => ("export.connected", c),
                nbd_server::server::ConnEvent::Disconnected(c) => ("export.disconnected", c),
            };
            ev.emit(
                kind,
                &c.export,
                "nbd",
                json!({"client": c.id, "peer": c.peer}),
            );
        })),
        ..Default::default()
    };
    // Replica volumes are exported read-only.
    let catalog = replication::exports::ReplicaCatalog::new(pool.clone(), state.clone());
    let server = Server::with_catalog(Arc::new(catalog), cfg);
    let listeners = Listener::bind_all(&s.nbd)?;
    let nbd_addrs =
        nbd_server::server::start(&server, listeners, Duration::from_secs(s.commit_interval))?;
    Ok((server, nbd_addrs))
}

/// The FUSE view (with `--mount`), then the instant mounts recorded before
/// a restart.
fn start_fuse(
    s: &Settings,
    pool: &Arc<Pool>,
    state: &Arc<state::State>,
) -> Result<(
    Option<cdm_recovery::fuse::Mounted>,
    Option<recovery::Mounts>,
)> {
    let Some(dir) = &s.mount else {
        return Ok((None, None));
    };
    // Not canonicalize(): a view left by a crashed run cannot be stat'ed.
    let dir = std::env::current_dir()?.join(dir);
    let fuse = cdm_recovery::fuse::mount(pool.clone(), &dir, 4)
        .with_context(|| format!("cannot mount the FUSE view at {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), "FUSE view mounted");
    let root = s.data.canonicalize()?.join("mounts");
    std::fs::create_dir_all(&root)?;
    let mounts = recovery::Mounts::new(fuse.dir.clone(), root);
    mounts.restore(pool, state);
    Ok((Some(fuse), Some(mounts)))
}

/// Delivery bookkeeping and other lazy writes: sync them every few
/// seconds so a crash loses at most that much of it (events and audit
/// records are synced when written, see pending.rs).
fn spawn_state_sync(state: Arc<state::State>, stop: Arc<AtomicBool>, every: u64) -> Result<()> {
    std::thread::Builder::new()
        .name("state-sync".into())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(every));
                if let Err(e) = state.sync() {
                    tracing::error!(error = %e, "cannot sync the state database");
                }
            }
        })?;
    Ok(())
}

/// Replication: the client certificate (made for this name and pool on
/// first start) and the service the API and the listener share.
fn start_replication(
    s: &Settings,
    m: &tls::Material,
    app: &Arc<appliance::Appliance>,
) -> Result<Arc<replication::Replication>> {
    let identity = replication::service::identity(&app.pool)?;
    let client = tls::ensure_client(&s.data.join("tls"), &s.name, &identity)
        .context("replication client certificate")?;
    let repl = replication::Replication::new(replication::service::Setup {
        pool: app.pool.clone(),
        state: app.state.clone(),
        events: app.events.clone(),
        clock: app.clock.clone(),
        jobs: app.jobs.clone(),
        name: s.name.clone(),
        client,
        server_ca: m.ca_pem.clone(),
        compression: s.defaults.compression,
    })
    .context("cannot set up replication")?;
    let _ = repl.control.set(app.control.clone());
    let _ = app.replication.set(repl.clone());
    Ok(repl)
}

/// The first admin's token, written once to `DATA/admin.token`.
fn bootstrap_admin(app: &appliance::Appliance, data: &Path) -> Result<()> {
    match app.bootstrap_admin() {
        Ok(Some(token)) => {
            let p = data.join("admin.token");
            write_secret(&p, &token)?;
            println!("admin token (shown once; also in {}): {token}", p.display());
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => bail!("cannot create the admin user: {}", e.message),
    }
}

/// The API's listeners: plain HTTP (loopback peers only unless
/// `--plain-remote`) and HTTPS if asked for.
struct ApiListeners {
    plain: std::net::TcpListener,
    tls: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
    /// The replication listener (`--replication`), its verifier following
    /// the pairings.
    repl: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
    plain_remote: bool,
}

impl ApiListeners {
    fn bind(
        s: &Settings,
        m: &tls::Material,
        repl: &replication::Replication,
    ) -> Result<ApiListeners> {
        let bind = |addr: &str, what: &str| -> Result<std::net::TcpListener> {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr} for the {what}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        let tls = match &s.tls.api_tls {
            Some(a) => Some((
                bind(a, "HTTPS API")?,
                tls::https_config(m).context("HTTPS certificate")?,
            )),
            None => None,
        };
        let repl = match &s.replication {
            Some(a) => {
                let l = bind(a, "replication listener")?;
                let _ = repl.port.set(l.local_addr()?.port());
                let cfg = replication::listener::tls_config(m, &repl.trust)
                    .context("replication listener certificate")?;
                Some((l, cfg))
            }
            None => None,
        };
        Ok(ApiListeners {
            plain: bind(&s.api, "API")?,
            tls,
            repl,
            plain_remote: s.tls.plain_remote,
        })
    }

    /// The addresses bound, not the ones asked for: port 0 means "any".
    fn addrs(&self) -> Result<(String, Option<String>, Option<String>)> {
        let tls = match &self.tls {
            Some((l, _)) => Some(l.local_addr()?.to_string()),
            None => None,
        };
        let repl = match &self.repl {
            Some((l, _)) => Some(l.local_addr()?.to_string()),
            None => None,
        };
        Ok((self.plain.local_addr()?.to_string(), tls, repl))
    }
}

/// The API on a small tokio runtime of its own thread (NBD keeps its own
/// threads); it stops gracefully when `stop` fires.
fn spawn_api(
    app: Arc<appliance::Appliance>,
    ls: ApiListeners,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<std::thread::JoinHandle<std::io::Result<()>>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(64)
        .enable_all()
        .build()?;
    let repl_router = app
        .replication
        .get()
        .map(|r| replication::listener::router(r.clone()));
    let backend = app as Arc<dyn cdm_api::backend::Backend>;
    let plain_router = cdm_api::routes::plain_router(backend.clone(), ls.plain_remote);
    let router = cdm_api::routes::router(backend);
    Ok(std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            rt.block_on(async move {
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                tokio::spawn(async move {
                    let _ = stop.await;
                    let _ = stop_tx.send(true);
                });
                let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                    let _ = rx.wait_for(|v| *v).await;
                };
                let l = tokio::net::TcpListener::from_std(ls.plain)?;
                // With connect info: login rate limiting and the loopback
                // check need the peer address.
                let svc = plain_router.into_make_service_with_connect_info::<SocketAddr>();
                let plain = axum::serve(l, svc).with_graceful_shutdown(stopped(stop_rx.clone()));
                let repl = async {
                    match (ls.repl, repl_router) {
                        (Some((rl, cfg)), Some(r)) => {
                            replication::listener::serve(rl, cfg, r, stopped(stop_rx.clone())).await
                        }
                        _ => Ok(()),
                    }
                };
                let https = async {
                    let Some((tl, cfg)) = ls.tls else {
                        return Ok(());
                    };
                    let tl = tls::HttpsListener::new(tokio::net::TcpListener::from_std(tl)?, cfg)?;
                    // tap_io: connect info for a listener of our own.
                    use axum::serve::ListenerExt;
                    let svc = router.into_make_service_with_connect_info::<SocketAddr>();
                    axum::serve(tl.tap_io(|_| {}), svc)
                        .with_graceful_shutdown(stopped(stop_rx.clone()))
                        .await
                };
                let (a, b, c) = tokio::join!(plain, https, repl);
                a.and(b).and(c)
            })
        })?)
}

fn main() -> Result<()> {
    cdm_common::log::init(cdm_common::log::LevelFilter::INFO);
    let args = Args::parse();
    let s = settings(&args)?;
    signals::block_termination();
    if let Some(p) = &s.ready_file {
        nbd_server::listener::clear_ready_file(p)
            .with_context(|| format!("cannot remove {}", p.display()))?;
    }
    secure_data_dir(&s.data)?;
    ballast::install(&s.data);
    appliance::COMMIT_INTERVAL_S.store(s.commit_interval, std::sync::atomic::Ordering::Relaxed);
    let pool_file = s.data.join("pool");
    let pool = Arc::new(open_pool(
        &pool_file,
        s.pool_size,
        s.pool_prealloc,
        s.key.clone(),
        s.fault_dir.as_deref(),
    )?);
    let state_path = s.data.join("state.redb");
    if let Some(d) = &s.fault_dir {
        tracing::warn!(dir = %d.display(), "fault injection enabled (tests only)");
    }
    let state_fault = s.fault_dir.as_ref().map(|d| d.join("state-eio"));
    let state = Arc::new(
        state::State::open(&state_path, state_fault.as_deref())
            .context("cannot open the state database")?,
    );
    // redb creates the file with the umask's mode.
    restrict(&state_path, 0o600, false)?;
    let clock = Arc::new(clock::Clock::new(s.fake_clock));
    if s.fake_clock {
        tracing::warn!("fake clock enabled: POST /v1/clock moves time forward");
    }
    let events = events::Events::new(state.clone(), clock.clone(), s.webhooks.clone());
    events.start();
    let tls = tls::material(&s.tls, &s.data.join("tls")).context("TLS certificate")?;
    let (server, nbd_addrs) = start_nbd(&s, &tls, &pool, &state, &events)?;
    let (fuse, mounts) = start_fuse(&s, &pool, &state)?;
    let jobs = jobs::Jobs::new(state.clone(), clock.clone(), events.clone());
    let sched = scheduler::Scheduler::new(
        pool.clone(),
        state.clone(),
        events.clone(),
        clock.clone(),
        server.clone(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    sched.start(s.tick, stop.clone());
    spawn_state_sync(state.clone(), stop.clone(), s.commit_interval)?;
    let app = appliance::Appliance::new(
        pool.clone(),
        server.clone(),
        state.clone(),
        events.clone(),
        clock.clone(),
        jobs,
        sched,
        nbd_addrs.clone(),
        s.defaults,
        mounts,
    );
    tier::runtime()
        .start(&state, &pool, &s.data)
        .context("object-store tier")?;
    let _ = app.pool_file.set(pool_file);
    let _ = app.tls_ca.set(tls.ca_pem.clone());
    let _ = app.vm_recovery_dir.set(s.data.join("vm-recoveries"));
    if let Some(u) = &s.appliance {
        tracing::info!(status = %u.status_file.display(), tool = %u.tool.display(),
            keys = %u.keys.display(), "appliance mode: update uploads go to DATA/updates");
        u.clear_stale_uploads();
        let _ = app.updates.set(u.clone());
    }
    app.vm_recoveries_after_restart()
        .map_err(|e| anyhow::anyhow!("VM recoveries: {}", e.message))?;
    let repl = start_replication(&s, &tls, &app)?;
    bootstrap_admin(&app, &s.data)?;
    app.control
        .set_limits(args.max_jobs, args.max_jobs_per_host);
    app.control
        .set_timeouts(args.job_stall_seconds, args.cancel_grace_seconds);
    app.control.set_heartbeat(args.heartbeat_seconds);
    appliance::Appliance::start_tier_sweep(
        &app,
        Duration::from_secs(args.tier_sweep_seconds),
        stop.clone(),
    );
    app.scheduler.set_control(app.control.clone());
    app.scheduler.set_replication(repl.clone());
    repl.start(s.tick, stop.clone());
    // Bound only now, so whoever sees the API up also finds admin.token.
    let api_listeners = ApiListeners::bind(&s, &tls, &repl)?;
    let (api_addr, api_tls_addr, repl_addr) = api_listeners.addrs()?;
    // For jobs that run cdm-agent (vm-backup): this API and a state
    // directory of its own.
    let _ = app.agent.set(appliance::AgentSetup {
        api_url: format!("http://{}", api_addr.replace("0.0.0.0", "127.0.0.1")),
        state_dir: s.data.join("agent"),
    });
    let space = pool.space()?;
    events.emit(
        "pool.opened",
        "pool",
        "snapshotd",
        json!({"used_bytes": space.used_bytes, "total_bytes": space.total_bytes}),
    );
    tracing::info!(
        volumes = pool.list_volumes()?.len(),
        used = %human(space.used_bytes),
        total = %human(space.total_bytes),
        api = %api_addr,
        api_tls = ?api_tls_addr,
        replication = ?repl_addr,
        name = %s.name,
        ca = %tls.ca_path.display(),
        nbd = ?nbd_addrs,
        "snapshotd ready"
    );
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let api_thread = spawn_api(app.clone(), api_listeners, rx)?;
    if let Some(p) = &s.ready_file {
        let ready = json!({"api": api_addr, "api_tls": api_tls_addr,
            "ca": tls.ca_path, "nbd": nbd_addrs, "replication": repl_addr});
        nbd_server::listener::write_ready_file(p, &ready.to_string())
            .with_context(|| format!("cannot write the ready file {}", p.display()))?;
    }

    let sig = signals::wait_for_termination();
    tracing::info!(sig, "terminating: draining NBD and API requests");
    let _ = tx.send(());
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    server.shutdown();
    if !server.drain(Duration::from_secs(10)) {
        tracing::warn!("NBD requests still in flight after 10 s; committing anyway");
    }
    match api_thread.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "API server ended with an error"),
        Err(_) => tracing::warn!("API thread panicked"),
    }
    if let Some(m) = &app.mounts {
        m.unmount_all(&state);
    }
    if let Some(f) = fuse {
        f.unmount();
    }
    // A commit, not just a flush: the next open then has no intent log
    // to replay.
    pool.commit().context("final commit failed")?;
    events.stop();
    state.sync().context("cannot sync the state database")?;
    tracing::info!("pool committed; exiting");
    Ok(())
}

#[cfg(test)]
mod pool_size_tests {
    use super::PoolSize;

    #[test]
    fn pool_size_parses_bytes_and_shares() {
        assert_eq!(PoolSize::parse("2G"), Ok(PoolSize::Bytes(2 << 30)));
        assert_eq!(PoolSize::parse("90%"), Ok(PoolSize::PercentFree(90)));
        assert_eq!(PoolSize::parse(" 100% "), Ok(PoolSize::PercentFree(100)));
        for bad in ["0%", "101%", "x%", "%", "-5%"] {
            assert!(PoolSize::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_share_of_free_space_resolves_to_whole_mib_below_the_free_space() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pool");
        let free = crate::ballast::free_bytes(dir.path()).expect("free");
        match PoolSize::PercentFree(50).resolve(&path, true) {
            Ok(size) => {
                assert_eq!(size % (1 << 20), 0);
                assert!(size <= free / 2 && size + (2 << 20) >= free / 2 - (64 << 20));
            }
            // A machine with under 2 GiB free: the refusal names the share.
            Err(e) => assert!(free / 2 < 1 << 30 && e.to_string().contains("50%"), "{e}"),
        }
    }
}
