//! `cdmctl export`: NBD exports and their connected clients.

use cdm_api::client::Client;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{table_of, Out};
use crate::units::human;

#[derive(Subcommand)]
pub(crate) enum ExportCmd {
    List,
}

pub(crate) fn run(cmd: ExportCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        ExportCmd::List => out.show(&c.exports()?, |v| {
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
    }
    Ok(())
}
