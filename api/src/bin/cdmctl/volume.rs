//! `cdmctl volume`: stage disks, their size and their snapshot policy,
//! failover (promote, demote) and the keys of sealed volumes.

use cdm_api::client::Client;
use cdm_api::types::*;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{opt, table_of, time, Out};
use crate::units::{human, parse_duration, parse_size};

#[derive(Subcommand)]
pub(crate) enum VolumeCmd {
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
    /// Make a replica an ordinary writable volume (failover).
    Promote {
        name: String,
    },
    /// Make a volume a read-only replica fed by PEER (fail-back).
    Demote {
        name: String,
        #[arg(long)]
        peer: String,
    },
    /// Load the key of a sealed volume (a raw replica) so it can be read:
    /// the source appliance's key file or passphrase. Kept in memory only.
    LoadKey {
        name: String,
        /// The source's key file (32 or 64 bytes, or as many in hex).
        #[arg(
            long,
            required_unless_present = "passphrase_file",
            conflicts_with = "passphrase_file"
        )]
        key_file: Option<std::path::PathBuf>,
        /// A file whose first line is the source's passphrase.
        #[arg(long)]
        passphrase_file: Option<std::path::PathBuf>,
    },
    /// Forget the key of a sealed volume.
    UnloadKey {
        name: String,
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
        /// Object tier: move points older than N days to the object store.
        #[arg(long)]
        tier_after_days: Option<u32>,
        /// Object tier: move points beyond the newest N too.
        #[arg(long)]
        tier_keep_last: Option<u32>,
    },
}

pub(crate) fn run(cmd: VolumeCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
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
        VolumeCmd::Promote { name } => {
            let v = c.promote_volume(&name)?;
            out.show(&v, |v| {
                format!("volume {} is writable ({})\n", v.name, v.kind)
            });
        }
        VolumeCmd::Demote { name, peer } => {
            let v = c.demote_volume(&name, &peer)?;
            out.show(&v, |v| {
                format!("volume {} is a replica of {peer}\n", v.name)
            });
        }
        VolumeCmd::LoadKey {
            name,
            key_file,
            passphrase_file,
        } => {
            let key = read_key(key_file, passphrase_file)?;
            let v = c.load_volume_key(&name, &key)?;
            out.show(&v, |v| format!("key of volume {} loaded\n", v.name));
        }
        VolumeCmd::UnloadKey { name } => {
            let v = c.unload_volume_key(&name)?;
            out.show(&v, |v| format!("key of volume {} unloaded\n", v.name));
        }
        VolumeCmd::Policy { name } => out.show(&c.policy(&name)?, policy_show),
        VolumeCmd::SetPolicy {
            name,
            interval,
            cron,
            keep_last,
            keep_days,
            min_keep,
            tier_after_days,
            tier_keep_last,
        } => {
            let schedule = if interval.is_some() || cron.is_some() {
                Some(Schedule {
                    interval_secs: interval,
                    cron,
                })
            } else {
                None
            };
            let p = SnapshotPolicy {
                schedule,
                retention: Retention {
                    keep_last,
                    keep_days,
                    min_keep,
                },
                tier_after_days,
                tier_keep_last,
            };
            out.show(&c.set_policy(&name, &p)?, policy_show);
        }
    }
    Ok(())
}

pub(crate) fn volumes_table(v: &[Volume]) -> String {
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
            if v.sealed {
                p.push(
                    if v.key_loaded {
                        "sealed"
                    } else {
                        "sealed(no key)"
                    }
                    .into(),
                );
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

/// The request of `volume load-key`: the key file's bytes in hex (the
/// appliance reads them as it reads its own key file), or the first line
/// of the passphrase file.
fn read_key(
    key_file: Option<std::path::PathBuf>,
    passphrase_file: Option<std::path::PathBuf>,
) -> Result<cdm_api::replication::VolumeKey, CliError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| CliError::Usage(format!("cannot read {}: {e}", p.display())))
    };
    match (key_file, passphrase_file) {
        (Some(k), None) => {
            let b = read(&k)?;
            Ok(cdm_api::replication::VolumeKey {
                key_file_hex: Some(b.iter().map(|x| format!("{x:02x}")).collect()),
                passphrase: None,
            })
        }
        (None, Some(p)) => {
            let b = read(&p)?;
            let text = String::from_utf8(b)
                .map_err(|_| CliError::Usage(format!("{} is not text", p.display())))?;
            let line = text.lines().next().unwrap_or("").to_string();
            if line.is_empty() {
                return Err(CliError::Usage(format!(
                    "{}: the first line (the passphrase) is empty",
                    p.display()
                )));
            }
            Ok(cdm_api::replication::VolumeKey {
                key_file_hex: None,
                passphrase: Some(line),
            })
        }
        _ => Err(CliError::Usage(
            "give exactly one of --key-file and --passphrase-file".into(),
        )),
    }
}

/// `VOLUME@ID` of a clone's origin, or `-`.
pub(crate) fn origin(o: &Option<Origin>) -> String {
    o.as_ref()
        .map(|o| format!("{}@{}", o.volume.as_deref().unwrap_or("?"), o.snapshot))
        .unwrap_or_else(|| "-".into())
}

pub(crate) fn volume_show(v: &Volume) -> String {
    let frag = match &v.fragmentation {
        Some(f) => format!(
            "fragmentation: {} extents in {} runs ({:.2} extents/MiB, {:.3} runs/MiB, average run {})\n",
            f.extents,
            f.runs,
            f.extents_per_mib,
            f.runs_per_mib,
            human(f.avg_run_bytes)
        ),
        None => String::new(),
    };
    let s = format!(
        "name: {}\nkind: {}\nexport: {}\nsize: {} ({} bytes)\nblock size: {}\ncreated: {}\norigin: {}\nallocated: {}\nunique: {}\nsnapshots: {}\ndedup: {}\ncompression: {}\nencryption: {}\nsealed: {}\nkey loaded: {}\nclients: {}\n",
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
        v.sealed,
        v.key_loaded,
        v.clients
    );
    s + &frag
}

pub(crate) fn policy_show(p: &SnapshotPolicy) -> String {
    let sched = match &p.schedule {
        Some(Schedule {
            interval_secs: Some(i),
            ..
        }) => format!("every {i} s"),
        Some(Schedule { cron: Some(c), .. }) => format!("cron {c:?} (UTC)"),
        _ => "none".into(),
    };
    format!(
        "schedule: {sched}\nkeep last: {}\nkeep days: {}\nmin keep: {}\ntier after days: {}\ntier beyond newest: {}\n",
        opt(&p.retention.keep_last),
        opt(&p.retention.keep_days),
        p.retention.min_keep,
        opt(&p.tier_after_days),
        opt(&p.tier_keep_last),
    )
}
