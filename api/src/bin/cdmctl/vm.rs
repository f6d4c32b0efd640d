//! `cdmctl vm`: a VM's points, and restores of them to image files on the
//! appliance.

use cdm_api::client::Client;
use cdm_api::vm_recovery::{VmPoint, VmRestoreCreate};
use clap::Subcommand;

use crate::error::CliError;
use crate::job::{job_show, wait_job};
use crate::output::{table_of, time, Out};

#[derive(Subcommand)]
pub(crate) enum VmCmd {
    /// A VM's points (one per backup run), oldest first; incomplete ones
    /// name their missing disks.
    Points { name: String },
    /// Write a point's disks as sparse image files (DIR/VM-diskN.raw or
    /// .qcow2) into a directory on the appliance (a job).
    Restore {
        name: String,
        /// An absolute directory on the appliance.
        #[arg(long)]
        to: String,
        /// raw or qcow2 [default: raw].
        #[arg(long)]
        format: Option<String>,
        /// The point's run id or one of its disks' snapshot ids [default:
        /// the newest complete point].
        #[arg(long)]
        point: Option<String>,
        /// Only this disk.
        #[arg(long)]
        disk: Option<usize>,
        /// Replace existing image files.
        #[arg(long)]
        force: bool,
        /// Wait for the job with a progress bar; exit 1 if it fails.
        #[arg(long)]
        wait: bool,
    },
}

pub(crate) fn run(cmd: VmCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        VmCmd::Points { name } => {
            let p = c.vm_points(&name)?;
            out.show(&p, |p| points_table(p));
        }
        VmCmd::Restore {
            name,
            to,
            format,
            point,
            disk,
            force,
            wait,
        } => {
            let req = VmRestoreCreate {
                point,
                to,
                format,
                disk,
                force,
            };
            let j = c.vm_restore(&name, &req)?;
            if wait {
                wait_job(c, j.id, out)?;
            } else {
                out.show(&j, job_show);
            }
        }
    }
    Ok(())
}

fn points_table(p: &[VmPoint]) -> String {
    table_of(
        p,
        &["POINT", "CREATED", "DISKS", "COMPLETE", "SNAPSHOTS"],
        |p| {
            vec![
                p.point.clone(),
                time(p.created_unix),
                format!("{}/{}", p.disks.len(), p.expected_disks),
                if p.complete {
                    "yes".into()
                } else {
                    format!("no (missing disk {:?})", p.missing)
                },
                p.disks
                    .iter()
                    .map(|d| format!("{}:{}@{}", d.disk, d.volume, d.snapshot))
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        },
    )
}
