//! `cdmctl vm`: VMs' points and instant recovery (a point booted on the
//! appliance, its console, stopped and discarded or kept).

use cdm_api::client::Client;
use cdm_api::vm_recovery::{VmPoint, VmRecovery, VmRecoveryCreate};
use clap::Subcommand;

use crate::error::CliError;
use crate::output::{opt, table_of, time, Out};

#[derive(Subcommand)]
pub(crate) enum VmCmd {
    /// A VM's points: its disks' snapshots of one backup run each.
    Points { vm: String },
    /// Instant recovery: boot a point of the VM on the appliance from
    /// clones of its disks (default: the newest complete point).
    Recover {
        vm: String,
        /// The point's run id, or a snapshot id of one of its disks.
        #[arg(long)]
        point: Option<String>,
        /// none (default: no NIC) or user (isolated user-mode network).
        #[arg(long)]
        network: Option<String>,
        /// auto (default), kvm or tcg (software emulation).
        #[arg(long)]
        accel: Option<String>,
        #[arg(long)]
        memory_mib: Option<u64>,
        #[arg(long)]
        vcpus: Option<u32>,
        /// The recovery's name (default VM-N).
        #[arg(long)]
        name: Option<String>,
        /// Wait until the VM runs; print the recovery.
        #[arg(long)]
        wait: bool,
    },
    /// VMs running (or stopped) from their points on the appliance.
    ListRecovered,
    /// One recovered VM.
    Show { name: String },
    /// The tail of a recovered VM's serial console.
    Console {
        name: String,
        #[arg(long, default_value_t = 65536)]
        bytes: u64,
    },
    /// A libvirt domain XML that runs the recovered VM from its NBD exports.
    DomainXml { name: String },
    /// Stop a recovered VM: its clones are deleted, or kept (promoted to
    /// volumes) with --keep.
    Stop {
        name: String,
        #[arg(long)]
        keep: bool,
    },
    /// Write a point's disks as sparse image files (DIR/VM-diskN.raw or
    /// .qcow2) into a directory on the appliance (a job).
    Restore {
        vm: String,
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

fn points_table(v: &[VmPoint]) -> String {
    table_of(
        v,
        &["POINT", "CREATED", "DISKS", "COMPLETE", "SNAPSHOTS"],
        |p| {
            vec![
                p.point.clone(),
                p.created.clone(),
                format!("{}/{}", p.disks.len(), p.expected_disks),
                if p.complete {
                    "yes".into()
                } else {
                    format!("NO (missing {:?})", p.missing)
                },
                p.disks
                    .iter()
                    .map(|d| format!("{}@{}", d.volume, d.snapshot))
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        },
    )
}

fn recoveries_table(v: &[VmRecovery]) -> String {
    table_of(
        v,
        &[
            "NAME", "VM", "POINT", "STATE", "ACCEL", "NETWORK", "MEM_MIB", "STARTED", "REASON",
        ],
        |r| {
            vec![
                r.name.clone(),
                r.vm.clone(),
                r.point.clone(),
                r.state.clone(),
                r.accel.clone(),
                r.network.clone(),
                r.memory_mib.to_string(),
                time(r.started_unix),
                opt(&r.reason),
            ]
        },
    )
}

fn recovery_show(r: &VmRecovery) -> String {
    format!(
        "name: {}\nvm: {}\npoint: {} (snapshots {:?})\nstate: {}\nreason: {}\naccel: {}\nnetwork: {}\nmemory_mib: {}\nvcpus: {}\nfirmware: {}\npid: {}\nclones: {}\nstarted: {}\nby: {}\n",
        r.name,
        r.vm,
        r.point,
        r.snapshots,
        r.state,
        opt(&r.reason),
        r.accel,
        r.network,
        r.memory_mib,
        r.vcpus,
        r.firmware,
        opt(&r.pid),
        r.clones.join(" "),
        time(r.started_unix),
        r.by
    )
}

pub(crate) fn run(cmd: VmCmd, c: &Client, out: &Out) -> Result<(), CliError> {
    match cmd {
        VmCmd::Points { vm } => out.show(&c.vm_points(&vm)?, |v| points_table(v)),
        VmCmd::Restore {
            vm,
            to,
            format,
            point,
            disk,
            force,
            wait,
        } => {
            let req = cdm_api::vm_recovery::VmRestoreCreate {
                point,
                to,
                format,
                disk,
                force,
            };
            let j = c.vm_restore(&vm, &req)?;
            if wait {
                crate::job::wait_job(c, j.id, out)?;
            } else {
                out.show(&j, crate::job::job_show);
            }
        }
        VmCmd::Recover {
            vm,
            point,
            network,
            accel,
            memory_mib,
            vcpus,
            name,
            wait,
        } => {
            // A number is a disk's snapshot id, anything else a run id.
            let (snapshot, point) = match point.as_deref().map(str::parse::<u64>) {
                Some(Ok(id)) => (Some(id), None),
                _ => (None, point),
            };
            let req = VmRecoveryCreate {
                snapshot,
                point,
                network,
                accel,
                memory_mib,
                vcpus,
                name,
            };
            let j = c.start_vm_recovery(&vm, &req)?;
            if !wait {
                out.show(&j, crate::job::job_show);
                return Ok(());
            }
            // The recovery is printed, not the job.
            let j = loop {
                let j = c.job(j.id)?;
                if j.state != "queued" && j.state != "running" {
                    break j;
                }
                std::thread::sleep(std::time::Duration::from_millis(300));
            };
            if j.state != "succeeded" {
                return Err(CliError::JobFailed(format!(
                    "job {} {}: {}",
                    j.id, j.state, j.message
                )));
            }
            let name = j
                .result
                .as_ref()
                .and_then(|r| r["recovery"].as_str())
                .ok_or_else(|| CliError::JobFailed(format!("job {} named no recovery", j.id)))?
                .to_string();
            out.show(&c.vm_recovery(&name)?, recovery_show);
        }
        VmCmd::ListRecovered => out.show(&c.vm_recoveries()?, |v| recoveries_table(v)),
        VmCmd::Show { name } => out.show(&c.vm_recovery(&name)?, recovery_show),
        VmCmd::Console { name, bytes } => print!("{}", c.vm_console(&name, bytes)?),
        VmCmd::DomainXml { name } => print!("{}", c.vm_domain_xml(&name)?),
        VmCmd::Stop { name, keep } => out.show(&c.stop_vm_recovery(&name, keep)?, recovery_show),
    }
    Ok(())
}
