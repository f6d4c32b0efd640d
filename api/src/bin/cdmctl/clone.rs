//! `cdmctl clone`: writable clones of snapshots.

use cdm_api::client::Client;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::Out;
use crate::volume::{volume_show, volumes_table};

#[derive(Subcommand)]
pub(crate) enum CloneCmd {
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

pub(crate) fn run(cmd: CloneCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
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
    }
    Ok(())
}
