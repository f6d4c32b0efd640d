//! `cdm-update`: make, verify and install signed appliance update bundles,
//! bless a healthy boot, report the slots. Exit codes: 0 success, 1 error,
//! 2 a bundle refused by verification (one line on stderr saying why).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use cdm_appliance::{bundle, keys};
use clap::{Parser, Subcommand};

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
    },
    /// Verify a bundle; print its manifest as JSON.
    Verify {
        #[arg(long, default_value = cdm_appliance::DEFAULT_KEYS_DIR)]
        keys: PathBuf,
        file: PathBuf,
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
        } => {
            let sk = keys::read_secret(&key)?;
            let inp = bundle::Inputs {
                version: &version,
                arch: &arch,
                rootfs: &rootfs,
                kernel: &kernel,
                initrd: &initrd,
            };
            let m = bundle::create(&sk, &inp, &out)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
        }
        Cmd::Verify { keys, file } => {
            let t = trusted(&keys)?;
            let v = bundle::verify_path(&file, &t).map_err(refusal)?;
            println!("{}", serde_json::to_string_pretty(v.manifest())?);
        }
    }
    Ok(ExitCode::SUCCESS)
}
