//! `cdmctl snapshot`: snapshots of a volume.

use cdm_api::client::Client;
use cdm_api::types::*;
use clap::Subcommand;
use serde_json::Value;

use crate::error::CliError;
use crate::output::{table_of, time, Out};
use crate::units::human;

#[derive(Subcommand)]
pub(crate) enum SnapshotCmd {
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

pub(crate) fn run(cmd: SnapshotCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
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
    }
    Ok(())
}

pub(crate) fn snapshots_table(v: &[Snapshot]) -> String {
    table_of(
        v,
        &[
            "ID",
            "EXPORT",
            "LABEL",
            "CREATED (UTC)",
            "ALLOCATED",
            "UNIQUE",
            "LOCATION",
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
                s.location.clone(),
                if s.clones.is_empty() {
                    "-".into()
                } else {
                    s.clones.join(",")
                },
            ]
        },
    )
}

pub(crate) fn snapshot_show(s: &Snapshot) -> String {
    format!(
        "id: {}\nvolume: {}\nexport: {}\nlabel: {}\ncreated: {}\nsize: {}\nallocated: {}\nunique: {}\nlocation: {}\nclones: {}\nmetadata: {}\n",
        s.id,
        s.volume,
        s.export,
        s.label,
        time(s.created_unix),
        human(s.size),
        human(s.allocated_bytes),
        human(s.unique_bytes),
        s.location,
        s.clones.join(", "),
        s.metadata
    )
}
