//! `cdmctl mount`: instant mounts of snapshots on the appliance.

use cdm_api::client::Client;
use cdm_api::types::*;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{table_of, Out};

#[derive(Subcommand)]
pub(crate) enum MountCmd {
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

pub(crate) fn run(cmd: MountCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
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
    }
    Ok(())
}
