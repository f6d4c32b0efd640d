//! `cdm-update`: make, verify and install signed appliance update bundles,
//! bless a healthy boot, report the slots. Exit codes: 0 success, 1 error,
//! 2 a bundle refused by verification (one line on stderr saying why).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cdm_appliance::health::Verdict;
use cdm_appliance::install::InstallError;
use cdm_appliance::status::{self, Paths};
use cdm_appliance::{bundle, health, install, keys};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cdm-update",
    version,
    about = "cdm appliance updates: signed A/B bundles"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the appliance's files are (defaults: the running appliance).
#[derive(Args)]
struct Site {
    /// The ESP (holds loader/entries and cdm/).
    #[arg(long, default_value = cdm_appliance::DEFAULT_ESP)]
    esp: PathBuf,
    /// The kernel command line (cdm.slot= names the booted slot).
    #[arg(long, default_value = "/proc/cmdline")]
    cmdline: PathBuf,
    /// The running version (one line).
    #[arg(long, default_value = cdm_appliance::DEFAULT_VERSION_FILE)]
    version_file: PathBuf,
    /// The status file.
    #[arg(long, default_value = cdm_appliance::DEFAULT_STATUS_FILE)]
    status_file: PathBuf,
}

impl Site {
    fn paths(self) -> Paths {
        Paths {
            esp: self.esp,
            cmdline: self.cmdline,
            version_file: self.version_file,
            status_file: self.status_file,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a signing key pair (secret: PKCS#8, mode 0600; public: hex).
    Keygen {
        #[arg(long)]
        secret: PathBuf,
        #[arg(long)]
        public: PathBuf,
    },
    /// Make a signed bundle.
    Bundle {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        version: String,
        #[arg(long, default_value = cdm_appliance::ARCH)]
        arch: String,
        #[arg(long)]
        rootfs: PathBuf,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Downgrade protection: appliances refuse bundles below the index
        /// of their last blessed update. Default: $SOURCE_DATE_EPOCH if
        /// set (reproducible builds), else the current Unix time.
        #[arg(long)]
        rollback_index: Option<u64>,
    },
    /// Verify a bundle; print its manifest as JSON.
    Verify {
        #[arg(long, default_value = cdm_appliance::DEFAULT_KEYS_DIR)]
        keys: PathBuf,
        file: PathBuf,
    },
    /// Verify a bundle and install it into the slot that is not booted.
    Install {
        #[arg(long, default_value = cdm_appliance::DEFAULT_KEYS_DIR)]
        keys: PathBuf,
        #[command(flatten)]
        site: Site,
        /// Reboot into the new slot after a successful install.
        #[arg(long)]
        reboot: bool,
        /// FILE is a spool file: opened without following a symlink, must
        /// be a regular file, and is removed when done (success or not).
        #[arg(long)]
        spool: bool,
        /// Install even if the bundle's rollback index is below the
        /// appliance's (never with --spool: uploads cannot downgrade).
        #[arg(long)]
        allow_downgrade: bool,
        file: PathBuf,
    },
    /// Wait for the health URL, then bless the booted boot entry.
    Health {
        #[arg(long, default_value = "http://127.0.0.1:8080/health")]
        url: String,
        /// Seconds to wait for a healthy answer.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
        /// The systemd unit serving the URL: once it has failed for good
        /// (its restarts exhausted) the check fails at once. Empty: none.
        #[arg(long, default_value = "snapshotd.service")]
        unit: String,
        #[command(flatten)]
        site: Site,
    },
    /// Show the slots and the last update.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        /// Also write the status file (atomically, mode 0644).
        #[arg(long)]
        write: bool,
        #[command(flatten)]
        site: Site,
    },
}

/// A refusal of the bundle itself (exit 2), as opposed to an error of ours.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Refused {}

fn main() -> ExitCode {
    cdm_common::log::init(cdm_common::log::LevelFilter::WARN);
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(r) = e.downcast_ref::<Refused>() {
                eprintln!("{r}");
                return ExitCode::from(2);
            }
            eprintln!("cdm-update: {}", chain(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes on one line, each cause once (an error that
/// prints its source in its own message would otherwise repeat it).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for c in e.chain() {
        let m = c.to_string();
        if !out.contains(&m) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&m);
        }
    }
    out
}

fn trusted(dir: &Path) -> anyhow::Result<Vec<keys::PublicKey>> {
    let t = keys::read_trusted(dir).context("reading the trusted keys")?;
    if t.is_empty() {
        anyhow::bail!("no trusted keys (*.pub) in {}", dir.display());
    }
    Ok(t)
}

/// Bundle errors that are about the bundle's content become refusals; I/O
/// errors stay errors.
fn refusal(e: bundle::BundleError) -> anyhow::Error {
    match e {
        bundle::BundleError::Io { .. } => anyhow::Error::new(e),
        other => anyhow::Error::new(Refused(other.to_string())),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Keygen { secret, public } => {
            let pk = keys::generate(&secret, &public)?;
            println!("key id {}", pk.id);
        }
        Cmd::Bundle {
            key,
            version,
            arch,
            rootfs,
            kernel,
            initrd,
            out,
            rollback_index,
        } => {
            let rollback_index = match rollback_index {
                Some(n) => n,
                None => default_rollback_index()?,
            };
            let sk = keys::read_secret(&key)?;
            let inp = bundle::Inputs {
                version: &version,
                arch: &arch,
                rootfs: &rootfs,
                kernel: &kernel,
                initrd: &initrd,
                rollback_index,
            };
            let m = bundle::create(&sk, &inp, &out)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Cmd::Verify { keys, file } => {
            let t = trusted(&keys)?;
            let v = bundle::verify_path(&file, &t).map_err(refusal)?;
            println!("{}", serde_json::to_string_pretty(v.manifest())?);
        }
        Cmd::Install {
            keys,
            site,
            reboot,
            spool,
            allow_downgrade,
            file,
        } => {
            if spool && allow_downgrade {
                anyhow::bail!(
                    "--allow-downgrade is refused with --spool (an upload can never downgrade)"
                );
            }
            let opts = install::Options { allow_downgrade };
            cmd_install(&keys, site.paths(), reboot, spool, opts, &file)?
        }
        Cmd::Health {
            url,
            timeout,
            unit,
            site,
        } => {
            let gave_up = || {
                (!unit.is_empty())
                    .then(|| health::unit_failed(&unit))
                    .flatten()
            };
            let v = health::run(&site.paths(), &url, Duration::from_secs(timeout), &gave_up);
            return Ok(match v {
                Ok(Verdict::Healthy(Some((old, new)))) => {
                    println!("healthy: blessed {old} -> {new}");
                    ExitCode::SUCCESS
                }
                Ok(Verdict::Healthy(None)) => {
                    println!("healthy: the booted entry needs no blessing");
                    ExitCode::SUCCESS
                }
                // 1: the unit's FailureAction reboots; the try is spent.
                Ok(Verdict::RollBack(e)) => {
                    eprintln!(
                        "cdm-update: unhealthy on a slot being tried, rebooting to roll back: {e}"
                    );
                    ExitCode::from(1)
                }
                // 3 (a success for the unit: no reboot loop on a good slot).
                Ok(Verdict::Unhealthy(e)) => {
                    eprintln!("cdm-update: UNHEALTHY on a good slot (no roll-back): {e}");
                    ExitCode::from(3)
                }
                Err(e) => {
                    eprintln!("cdm-update: {e}");
                    ExitCode::from(1)
                }
            });
        }
        Cmd::Status { json, write, site } => {
            let p = site.paths();
            let s = if write {
                status::refresh(&p, None)?
            } else {
                status::collect(&p, status::last_update(&p.status_file))?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `$SOURCE_DATE_EPOCH` (set by reproducible builds: the same commit
/// gives the same bundle), else the current Unix time.
fn default_rollback_index() -> anyhow::Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("SOURCE_DATE_EPOCH {v:?} is not a Unix time")),
        Err(_) => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_secs()),
    }
}

fn print_status(s: &status::Status) {
    println!("version  {}", s.version);
    println!("booted   {}", s.booted_slot.as_deref().unwrap_or("-"));
    for sl in &s.slots {
        let tries = sl
            .tries_left
            .map(|t| format!(" ({t} tries left)"))
            .unwrap_or_default();
        println!(
            "slot {}   {}{}  version {}  generation {}{}",
            sl.slot,
            sl.state,
            tries,
            sl.version.as_deref().unwrap_or("-"),
            sl.generation.map_or("-".into(), |g| g.to_string()),
            if sl.booted { "  (booted)" } else { "" }
        );
    }
    if let Some(u) = &s.update {
        println!(
            "update   {} {} at {}{}",
            u.state,
            u.version.as_deref().unwrap_or("-"),
            u.at,
            u.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
}

/// Opens the bundle. A spool file (in a directory the cdm user owns) is
/// taken through its directory's fd, never following a symlink, must be a
/// regular file, and its name is removed at once (see `spool::take`); the
/// fd is then used for every read, so swapping the name later changes
/// nothing.
fn open_bundle(file: &Path, spool: bool) -> anyhow::Result<File> {
    if spool {
        return Ok(cdm_appliance::spool::take(file)?);
    }
    let f = File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let md = f
        .metadata()
        .with_context(|| format!("{}", file.display()))?;
    if !md.is_file() {
        anyhow::bail!("{} is not a regular file", file.display());
    }
    Ok(f)
}

fn cmd_install(
    keys: &Path,
    p: Paths,
    reboot: bool,
    spool: bool,
    opts: install::Options,
    file: &Path,
) -> anyhow::Result<()> {
    // The spool file is consumed as soon as it is open (every read goes
    // through the fd), before anything else can fail: the path unit does
    // not start us again on it, and an install cut by a power failure is
    // not resumed behind the admin's back at the next boot; the old slot
    // boots and the admin uploads again.
    let bundle = open_bundle(file, spool);
    let opened = trusted(keys).and_then(|t| Ok((t, bundle?)));
    let r = opened
        .inspect_err(|e| install::record(&p, "failed", None, Some(chain(e))))
        .and_then(|(t, f)| {
            // install() records its own progress and failure.
            install::install(&f, file, &t, &p, opts).map_err(|e| match e {
                InstallError::Refused(b) => anyhow::Error::new(Refused(b.to_string())),
                e @ InstallError::Downgrade { .. } => anyhow::Error::new(Refused(e.to_string())),
                other => anyhow::Error::new(other),
            })
        });
    let i = r?;
    println!(
        "installed {} into slot {} (entry {}, generation {})",
        i.version,
        i.slot.name(),
        i.entry.display(),
        i.generation
    );
    if reboot {
        let st = std::process::Command::new("systemctl")
            .arg("reboot")
            .status()
            .context("running systemctl reboot")?;
        if !st.success() {
            anyhow::bail!("systemctl reboot failed ({st})");
        }
    }
    Ok(())
}
