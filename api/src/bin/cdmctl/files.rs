//! `cdmctl files`: file-level restore from a snapshot's filesystem.

use cdm_api::client::Client;
use cdm_api::types::*;
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{table_of, Out};
use crate::units::human;

#[derive(Subcommand)]
pub(crate) enum FilesCmd {
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

pub(crate) fn run(cmd: FilesCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
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
            let n = fetch(c, &snapshot, path, partition, output, false)?;
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
            let n = fetch(c, &snapshot, path, partition, output, true)?;
            if to_file {
                out.say(format!("wrote a {n}-byte tar"));
            }
        }
    }
    Ok(())
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
