//! VMs: inspection of their disks without booting (`cdm_inspect`), read
//! from image files or through NBD (our exports, `qemu-nbd` serving raw or
//! qcow2 files, a hypervisor's backup export).

use std::path::Path;
use std::time::Instant;

use cdm_inspect::{Disk, FileDisk, Inspection};
use nbd_server::client::{Client, ClientOptions};
use serde_json::{json, Value};

/// An NBD export as a disk.
pub struct NbdDisk(Client);

impl NbdDisk {
    pub fn connect(uri: &str) -> anyhow::Result<NbdDisk> {
        let opts = ClientOptions {
            allocation: false,
            timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        };
        Ok(NbdDisk(
            Client::connect(uri, None, &opts).map_err(|e| anyhow::anyhow!("{uri}: {e}"))?,
        ))
    }
}

impl Disk for NbdDisk {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0.read(off, buf).map_err(|e| e.to_string())
    }
}

/// Opens `spec`: `nbd://…`, `nbd+unix://…`, or a raw image / block device.
pub fn open_disk(spec: &str) -> anyhow::Result<Box<dyn Disk>> {
    if spec.starts_with("nbd://") || spec.starts_with("nbd+unix://") {
        return Ok(Box::new(NbdDisk::connect(spec)?));
    }
    let p = Path::new(spec);
    let f = FileDisk::open(p).map_err(|e| anyhow::anyhow!("{spec}: {e}"))?;
    Ok(Box::new(f))
}

/// Inspects one disk; an unreadable one is "unknown" with the reason.
pub fn inspect_one(spec: &str) -> (Inspection, f64) {
    let t = Instant::now();
    let i = match open_disk(spec) {
        Ok(d) => cdm_inspect::inspect(d),
        Err(e) => Inspection {
            status: "unknown".into(),
            reason: Some(format!("{e:#}")),
            size: 0,
            partition_table: "none".into(),
            partitions: vec![],
            root: None,
            os: None,
            apps: vec![],
            bytes_read: 0,
        },
    };
    (i, t.elapsed().as_secs_f64())
}

pub fn inspect_cmd(disks: &[String]) -> anyhow::Result<Value> {
    let mut out = Vec::new();
    for d in disks {
        let (i, secs) = inspect_one(d);
        let mut v = serde_json::to_value(&i)?;
        v["disk"] = json!(d);
        v["seconds"] = json!(secs);
        out.push(v);
    }
    Ok(Value::Array(out))
}
