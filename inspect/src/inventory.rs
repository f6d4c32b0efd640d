//! Where VMs are listed ("the hypervisor's public API" of the method): a
//! directory of libvirt domain XML files (`virsh dumpxml`, or
//! `/etc/libvirt/qemu`), or an inventory file in TOML or JSON. Each VM has
//! a name, disks (image files, block devices or NBD URIs, with a format),
//! a storage path and a resource pool. A listing that fails is an error
//! that names the file: the job ends there.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmDisk {
    /// A path or an NBD URI.
    pub source: String,
    /// raw, qcow2, vmdk, vpc (VHD) or vhdx (files); NBD sources are raw.
    #[serde(default = "raw")]
    pub format: String,
    /// The guest's name for it (vda, sdb), if known.
    #[serde(default)]
    pub target: Option<String>,
    /// The bus the guest sees it on (`virtio`, `sata`, `scsi`, `ide`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
}

/// A network card of the VM (recovered VMs get the same model and MAC,
/// on an isolated network).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmNic {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// The VM's shape: what a recovered copy boots with.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct VmShape {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// `bios` or `efi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<String>,
    /// The machine type (`pc`, `q35`, `pc-q35-7.2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<VmNic>,
}

fn raw() -> String {
    "raw".into()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Vm {
    pub name: String,
    #[serde(default)]
    pub uuid: Option<String>,
    pub disks: Vec<VmDisk>,
    /// Where its disks live (the first disk's directory, or its storage
    /// pool for libvirt volumes).
    #[serde(default)]
    pub storage_path: String,
    /// The resource pool (libvirt `<resource><partition>`).
    #[serde(default)]
    pub pool: String,
    /// CPU, memory, firmware and NICs, where the listing says them.
    #[serde(default)]
    pub shape: VmShape,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{path}: {msg}")]
    Bad { path: PathBuf, msg: String },
}

fn bad(path: &Path, msg: impl Into<String>) -> InventoryError {
    InventoryError::Bad {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn dir_of(source: &str) -> String {
    if source.contains("://") {
        return source
            .rsplit_once('/')
            .map(|(a, _)| a.to_string())
            .unwrap_or_default();
    }
    Path::new(source)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.tag_name().name() == tag)
}

/// One libvirt domain.
pub fn parse_domain(xml: &str, path: &Path) -> Result<Vm, InventoryError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| bad(path, format!("not XML: {e}")))?;
    let dom = doc.root_element();
    if dom.tag_name().name() != "domain" {
        return Err(bad(path, "not a libvirt <domain>"));
    }
    let name = child(dom, "name")
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(path, "<domain> without <name>"))?
        .to_string();
    let uuid = child(dom, "uuid")
        .and_then(|n| n.text())
        .map(|s| s.trim().to_string());
    let pool = child(dom, "resource")
        .and_then(|r| child(r, "partition"))
        .and_then(|p| p.text())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mut disks = Vec::new();
    let mut storage = String::new();
    if let Some(devs) = child(dom, "devices") {
        for d in devs.children().filter(|c| c.tag_name().name() == "disk") {
            if d.attribute("device").unwrap_or("disk") != "disk" {
                continue;
            }
            let format = child(d, "driver")
                .and_then(|x| x.attribute("type"))
                .unwrap_or("raw")
                .to_string();
            let target = child(d, "target")
                .and_then(|t| t.attribute("dev"))
                .map(str::to_string);
            let bus = child(d, "target")
                .and_then(|t| t.attribute("bus"))
                .map(str::to_string);
            let Some(src) = child(d, "source") else {
                continue;
            };
            let (source, place) = match d.attribute("type").unwrap_or("file") {
                "file" => match src.attribute("file") {
                    Some(f) => (f.to_string(), dir_of(f)),
                    None => continue,
                },
                "block" => match src.attribute("dev") {
                    Some(f) => (f.to_string(), dir_of(f)),
                    None => continue,
                },
                "network" if src.attribute("protocol") == Some("nbd") => {
                    let host = child(src, "host");
                    let export = src.attribute("name").unwrap_or("");
                    let uri = match host.and_then(|h| h.attribute("socket")) {
                        Some(sock) => format!("nbd+unix:///{export}?socket={sock}"),
                        None => {
                            let h = host
                                .and_then(|h| h.attribute("name"))
                                .unwrap_or("localhost");
                            let p = host.and_then(|h| h.attribute("port")).unwrap_or("10809");
                            format!("nbd://{h}:{p}/{export}")
                        }
                    };
                    let place = dir_of(&uri);
                    (uri, place)
                }
                "volume" => {
                    let (p, v) = (
                        src.attribute("pool").unwrap_or(""),
                        src.attribute("volume").unwrap_or(""),
                    );
                    return Err(bad(path, format!("disk {p}/{v}: libvirt storage volumes need the pool's path; give the file instead")));
                }
                other => return Err(bad(path, format!("disk type {other} is not supported"))),
            };
            if storage.is_empty() {
                storage = place;
            }
            disks.push(VmDisk {
                source,
                format,
                target,
                bus,
            });
        }
    }
    Ok(Vm {
        name,
        uuid,
        disks,
        storage_path: storage,
        pool,
        shape: domain_shape(dom),
    })
}

/// Memory (`<memory unit=…>`), `<vcpu>`, firmware (`<os firmware='efi'>`
/// or a `<loader>`), machine type and `<interface>`s of a domain.
fn domain_shape(dom: roxmltree::Node<'_, '_>) -> VmShape {
    let memory_mib = child(dom, "memory").and_then(|m| {
        let n: u64 = m.text()?.trim().parse().ok()?;
        let unit = m.attribute("unit").unwrap_or("KiB");
        let bytes = match unit {
            "b" | "bytes" => Some(n),
            "KB" => n.checked_mul(1000),
            "k" | "KiB" => n.checked_mul(1 << 10),
            "MB" => n.checked_mul(1_000_000),
            "M" | "MiB" => n.checked_mul(1 << 20),
            "GB" => n.checked_mul(1_000_000_000),
            "G" | "GiB" => n.checked_mul(1 << 30),
            "T" | "TiB" => n.checked_mul(1 << 40),
            _ => None,
        }?;
        Some(bytes >> 20).filter(|&m| m > 0)
    });
    let vcpus = child(dom, "vcpu")
        .and_then(|v| v.text())
        .and_then(|t| t.trim().parse().ok())
        .filter(|&n| n > 0);
    let os = child(dom, "os");
    let firmware = os.map(|o| {
        if o.attribute("firmware") == Some("efi") || child(o, "loader").is_some() {
            "efi".to_string()
        } else {
            "bios".to_string()
        }
    });
    let machine = os
        .and_then(|o| child(o, "type"))
        .and_then(|t| t.attribute("machine"))
        .map(str::to_string);
    let nics = child(dom, "devices")
        .map(|d| {
            d.children()
                .filter(|c| c.tag_name().name() == "interface")
                .map(|i| VmNic {
                    model: child(i, "model")
                        .and_then(|m| m.attribute("type"))
                        .map(str::to_string),
                    mac: child(i, "mac")
                        .and_then(|m| m.attribute("address"))
                        .map(str::to_string),
                })
                .collect()
        })
        .unwrap_or_default();
    VmShape {
        memory_mib,
        vcpus,
        firmware,
        machine,
        nics,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InventoryFile {
    #[serde(default)]
    vm: Vec<FileVm>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVm {
    name: String,
    #[serde(default)]
    uuid: Option<String>,
    disks: Vec<FileDisk>,
    #[serde(default)]
    storage_path: Option<String>,
    #[serde(default)]
    pool: String,
    #[serde(default)]
    memory_mib: Option<u64>,
    #[serde(default)]
    vcpus: Option<u32>,
    #[serde(default)]
    firmware: Option<String>,
    #[serde(default)]
    machine: Option<String>,
    #[serde(default)]
    nics: Vec<VmNic>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FileDisk {
    Plain(String),
    Full(VmDisk),
}

/// Image formats read through `qemu-nbd` (qemu's names: `vpc` is VHD).
pub const QEMU_FORMATS: &[&str] = &["qcow2", "vmdk", "vpc", "vhdx"];

/// The format a plain inventory path names by its extension (qemu's
/// names); anything else is read as raw.
pub fn format_of_path(path: &str) -> &'static str {
    let ext = Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("qcow2") => "qcow2",
        Some("vmdk") => "vmdk",
        Some("vhd") => "vpc",
        Some("vhdx") => "vhdx",
        _ => "raw",
    }
}

/// An inventory file: `[[vm]]` tables (TOML) or `{"vm": [...]}` (JSON).
pub fn parse_file(text: &str, path: &Path) -> Result<Vec<Vm>, InventoryError> {
    let f: InventoryFile = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|e| bad(path, e.to_string()))?
    } else {
        toml::from_str(text).map_err(|e| bad(path, e.to_string()))?
    };
    let mut out = Vec::new();
    for v in f.vm {
        if v.name.trim().is_empty() {
            return Err(bad(path, "a VM without a name"));
        }
        let disks: Vec<VmDisk> = v
            .disks
            .into_iter()
            .map(|d| match d {
                FileDisk::Plain(s) => VmDisk {
                    format: format_of_path(&s).into(),
                    source: s,
                    target: None,
                    bus: None,
                },
                FileDisk::Full(d) => d,
            })
            .collect();
        let storage = v
            .storage_path
            .unwrap_or_else(|| disks.first().map(|d| dir_of(&d.source)).unwrap_or_default());
        out.push(Vm {
            name: v.name,
            uuid: v.uuid,
            disks,
            storage_path: storage,
            pool: v.pool,
            shape: VmShape {
                memory_mib: v.memory_mib,
                vcpus: v.vcpus,
                firmware: v.firmware,
                machine: v.machine,
                nics: v.nics,
            },
        });
    }
    Ok(out)
}

/// Lists VMs from a directory of domain XML files or an inventory file.
pub fn load(path: &Path) -> Result<Vec<Vm>, InventoryError> {
    let meta = std::fs::metadata(path).map_err(|e| bad(path, e.to_string()))?;
    let mut vms = if meta.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| bad(path, e.to_string()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "xml"))
            .collect();
        files.sort();
        let mut v = Vec::new();
        for f in files {
            let t = std::fs::read_to_string(&f).map_err(|e| bad(&f, e.to_string()))?;
            v.push(parse_domain(&t, &f)?);
        }
        v
    } else {
        let t = std::fs::read_to_string(path).map_err(|e| bad(path, e.to_string()))?;
        parse_file(&t, path)?
    };
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    for w in vms.windows(2) {
        if w[0].name == w[1].name {
            return Err(bad(path, format!("VM {} is listed twice", w[0].name)));
        }
    }
    Ok(vms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_domains() {
        let x = r#"<domain type='kvm'><name>db1</name><uuid>1b4e28ba-2fa1-11d2-883f-0016d3cca427</uuid>
          <memory unit='GiB'>4</memory><vcpu placement='static'>2</vcpu>
          <os firmware='efi'><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
          <resource><partition>/production</partition></resource>
          <devices>
            <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/><model type='virtio'/></interface>
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/db1.qcow2'/><target dev='vda' bus='virtio'/></disk>
            <disk type='file' device='cdrom'><source file='/iso/x.iso'/></disk>
            <disk type='network' device='disk'><source protocol='nbd' name='db1-data'><host name='appliance' port='10809'/></source><target dev='vdb'/></disk>
          </devices></domain>"#;
        let v = parse_domain(x, Path::new("db1.xml")).unwrap();
        assert_eq!(v.name, "db1");
        assert_eq!(v.pool, "/production");
        assert_eq!(v.storage_path, "/var/lib/libvirt/images");
        assert_eq!(v.disks.len(), 2);
        assert_eq!(v.disks[0].format, "qcow2");
        assert_eq!(v.disks[1].source, "nbd://appliance:10809/db1-data");
        assert_eq!(v.disks[0].bus.as_deref(), Some("virtio"));
        assert_eq!(v.shape.memory_mib, Some(4096));
        assert_eq!(v.shape.vcpus, Some(2));
        assert_eq!(v.shape.firmware.as_deref(), Some("efi"));
        assert_eq!(v.shape.machine.as_deref(), Some("pc-q35-7.2"));
        assert_eq!(
            v.shape.nics,
            vec![VmNic {
                model: Some("virtio".into()),
                mac: Some("52:54:00:12:34:56".into())
            }]
        );
        let bare = parse_domain(
            "<domain><name>b</name><memory>524288</memory><os><type>hvm</type></os></domain>",
            Path::new("b.xml"),
        )
        .unwrap();
        assert_eq!(bare.shape.memory_mib, Some(512));
        assert_eq!(bare.shape.firmware.as_deref(), Some("bios"));
        assert_eq!(bare.shape.vcpus, None);
        assert!(
            parse_domain("<domain><uuid>x</uuid></domain>", Path::new("a.xml"))
                .unwrap_err()
                .to_string()
                .contains("without <name>")
        );
        assert!(parse_domain("<dom", Path::new("a.xml")).is_err());
        assert!(parse_domain("<network/>", Path::new("a.xml")).is_err());
    }

    #[test]
    fn inventory_files() {
        let t = "[[vm]]\nname = \"web1\"\npool = \"dev\"\ndisks = [\"/img/web1.qcow2\", { source = \"nbd://a/x\" }]\n";
        let v = parse_file(t, Path::new("i.toml")).unwrap();
        assert_eq!(v[0].disks[0].format, "qcow2");
        assert_eq!(v[0].disks[1].format, "raw");
        assert_eq!(v[0].storage_path, "/img");
        let t = "[[vm]]\nname = \"w\"\ndisks = [\"/i/a.vmdk\", \"/i/b.VHD\", \"/i/c.vhdx\", \"/i/d.img\"]\n";
        let v = parse_file(t, Path::new("i.toml")).unwrap();
        let f: Vec<&str> = v[0].disks.iter().map(|d| d.format.as_str()).collect();
        assert_eq!(f, ["vmdk", "vpc", "vhdx", "raw"]);
        let j = r#"{"vm":[{"name":"a","disks":["/x/a.img"],"storage_path":"/san1","memory_mib":256,"vcpus":1,"nics":[{"model":"e1000"}]}]}"#;
        let v = parse_file(j, Path::new("i.json")).unwrap();
        assert_eq!(v[0].storage_path, "/san1");
        assert_eq!(v[0].shape.memory_mib, Some(256));
        assert_eq!(v[0].shape.nics[0].model.as_deref(), Some("e1000"));
        assert!(parse_file("[[vm]]\nname = \"\"\ndisks = []\n", Path::new("i.toml")).is_err());
        assert!(parse_file("[[vm]]\nnam = \"x\"\n", Path::new("i.toml")).is_err());
    }
}
