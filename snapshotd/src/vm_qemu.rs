//! How a recovered VM is run: the qemu-system command line and the
//! libvirt domain XML for it, from the VM's shape at backup and the NBD
//! exports of its clones. Pure functions (tested here); the appliance
//! (`appliance/vm_recovery.rs`) starts and watches the process.

use std::path::{Path, PathBuf};

/// Where a recovered VM's disks are served.
#[derive(Clone, Debug, PartialEq)]
pub enum NbdAt {
    Unix(PathBuf),
    Tcp { host: String, port: u16 },
}

impl NbdAt {
    /// The first NBD listener qemu can reach on this machine: a unix
    /// socket if there is one, else a TCP address (a wildcard bind is
    /// reached on loopback).
    pub fn from_listeners(addrs: &[String]) -> Option<NbdAt> {
        if let Some(p) = addrs.iter().find_map(|a| a.strip_prefix("unix:")) {
            return Some(NbdAt::Unix(PathBuf::from(p)));
        }
        let a: std::net::SocketAddr = addrs.first()?.parse().ok()?;
        let host = match a.ip() {
            ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_string(),
            ip if ip.is_unspecified() => "::1".to_string(),
            ip => ip.to_string(),
        };
        Some(NbdAt::Tcp {
            host,
            port: a.port(),
        })
    }

    fn qemu_server(&self) -> String {
        match self {
            NbdAt::Unix(p) => format!(
                "server.type=unix,server.path={}",
                qemu_escape(&p.display().to_string())
            ),
            NbdAt::Tcp { host, port } => {
                format!("server.type=inet,server.host={host},server.port={port}")
            }
        }
    }
}

/// qemu's option syntax: a comma in a value is written twice.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// One disk of the recovered VM: its clone's export and the guest's bus.
#[derive(Clone, Debug)]
pub struct RunDisk {
    pub export: String,
    pub bus: Option<String>,
}

/// A NIC of the VM at backup.
#[derive(Clone, Debug, Default)]
pub struct RunNic {
    pub model: Option<String>,
    pub mac: Option<String>,
}

/// Everything the command line is made of.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub name: String,
    pub disks: Vec<RunDisk>,
    pub nbd: NbdAt,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// `kvm` or `tcg` (resolved).
    pub accel: String,
    /// `none` or `user`.
    pub network: String,
    pub nics: Vec<RunNic>,
    /// `bios` or `efi`.
    pub firmware: String,
    /// The VM's machine type at backup (`pc-q35-7.2`, `pc-i440fx-…`).
    pub machine: Option<String>,
    /// The recovery's directory: serial log, QMP socket, UEFI variables.
    pub dir: PathBuf,
    /// OVMF code and the recovery's own copy of its variables (UEFI VMs).
    pub ovmf: Option<(PathBuf, PathBuf)>,
}

/// The serial console's log in a recovery's directory.
pub fn serial_log(dir: &Path) -> PathBuf {
    dir.join("serial.log")
}

/// The machine type to run: q35 for a q35 guest, else the i440FX `pc`
/// (a versioned type of another qemu may not exist in this one).
fn machine(m: Option<&str>) -> &'static str {
    match m {
        Some(m) if m.contains("q35") => "q35",
        _ => "pc",
    }
}

/// NIC models this qemu has; others become virtio.
fn nic_model(m: Option<&str>) -> &'static str {
    match m {
        Some("e1000") => "e1000",
        Some("e1000e") => "e1000e",
        Some("rtl8139") => "rtl8139",
        Some("vmxnet3") => "vmxnet3",
        _ => "virtio-net-pci",
    }
}

/// The qemu arguments (after the program). Every disk is a `-blockdev`
/// on qemu's NBD client with a device on the VM's bus; the guest powering
/// off or resetting ends qemu (`-no-reboot`), so a guest that panics and
/// reboots shows as stopped with its console kept.
pub fn args(s: &RunSpec) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|x| x.to_string()));
    push(&[
        "-name",
        &format!("guest={},debug-threads=on", qemu_escape(&s.name)),
    ]);
    push(&[
        "-machine",
        &format!("{},accel={}", machine(s.machine.as_deref()), s.accel),
    ]);
    if s.accel == "kvm" {
        push(&["-cpu", "host"]);
    }
    push(&[
        "-m",
        &s.memory_mib.to_string(),
        "-smp",
        &s.vcpus.to_string(),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-vga", "std"]);
    // The guest may be hostile (a recovered ransomware victim): qemu may
    // not gain privileges, start programs or use obsolete system calls.
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    // Appended to, so the appliance can cut it when a guest floods it
    // (see `SERIAL_CAP` in appliance/vm_recovery.rs).
    let serial = serial_log(&s.dir);
    push(&[
        "-chardev",
        &format!(
            "file,id=serial0,append=on,path={}",
            qemu_escape(&serial.display().to_string())
        ),
        "-serial",
        "chardev:serial0",
    ]);
    let qmp = s.dir.join("qmp.sock");
    push(&[
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            qemu_escape(&qmp.display().to_string())
        ),
    ]);
    if let Some((code, vars)) = &s.ovmf {
        push(&[
            "-drive",
            &format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                qemu_escape(&code.display().to_string())
            ),
            "-drive",
            &format!(
                "if=pflash,format=raw,unit=1,file={}",
                qemu_escape(&vars.display().to_string())
            ),
        ]);
    }
    let mut ahci = false;
    let mut sata_port = 0;
    let mut scsi = false;
    for (i, d) in s.disks.iter().enumerate() {
        push(&[
            "-blockdev",
            &format!(
                "driver=nbd,{},export={},node-name=disk{i},cache.direct=off,reconnect-delay=10",
                s.nbd.qemu_server(),
                qemu_escape(&d.export)
            ),
        ]);
        let boot = if i == 0 { ",bootindex=1" } else { "" };
        let dev = match d.bus.as_deref() {
            Some("sata") => {
                if !ahci {
                    push(&["-device", "ahci,id=ahci0"]);
                    ahci = true;
                }
                sata_port += 1;
                format!("ide-hd,drive=disk{i},bus=ahci0.{}{boot}", sata_port - 1)
            }
            Some("ide") => format!("ide-hd,drive=disk{i}{boot}"),
            Some("scsi") => {
                if !scsi {
                    push(&["-device", "virtio-scsi-pci,id=scsi0"]);
                    scsi = true;
                }
                format!("scsi-hd,drive=disk{i},bus=scsi0.0{boot}")
            }
            _ => format!("virtio-blk-pci,drive=disk{i}{boot}"),
        };
        push(&["-device", &dev]);
    }
    if s.network == "user" {
        // restrict=on: the guest reaches nothing outside, so a recovered
        // copy cannot talk to the production systems it came from.
        let nics = if s.nics.is_empty() {
            vec![RunNic::default()]
        } else {
            s.nics.clone()
        };
        for n in &nics {
            let mut o = format!("user,restrict=on,model={}", nic_model(n.model.as_deref()));
            if let Some(m) = n.mac.as_deref().filter(|m| valid_mac(m)) {
                o.push_str(&format!(",mac={m}"));
            }
            push(&["-nic", &o]);
        }
    } else {
        push(&["-nic", "none"]);
    }
    a
}

fn valid_mac(m: &str) -> bool {
    let parts: Vec<&str> = m.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A libvirt domain XML that runs the same VM from the same exports (for
/// hosts that run libvirt: `virsh define`).
pub fn domain_xml(s: &RunSpec) -> String {
    let mut x = String::new();
    x.push_str(&format!(
        "<domain type='{}'>\n  <name>{}</name>\n  <memory unit='MiB'>{}</memory>\n  <vcpu>{}</vcpu>\n",
        if s.accel == "kvm" { "kvm" } else { "qemu" },
        xml_escape(&s.name),
        s.memory_mib,
        s.vcpus
    ));
    let fw = if s.firmware == "efi" {
        " firmware='efi'"
    } else {
        ""
    };
    x.push_str(&format!(
        "  <os{fw}>\n    <type arch='x86_64' machine='{}'>hvm</type>\n  </os>\n  <on_reboot>destroy</on_reboot>\n  <devices>\n",
        machine(s.machine.as_deref())
    ));
    for (i, d) in s.disks.iter().enumerate() {
        let host = match &s.nbd {
            NbdAt::Unix(p) => format!(
                "<host transport='unix' socket='{}'/>",
                xml_escape(&p.display().to_string())
            ),
            NbdAt::Tcp { host, port } => {
                format!("<host name='{}' port='{port}'/>", xml_escape(host))
            }
        };
        let (dev, bus) = match d.bus.as_deref() {
            Some("sata") => (format!("sd{}", letter(i)), "sata"),
            Some("scsi") => (format!("sd{}", letter(i)), "scsi"),
            Some("ide") => (format!("hd{}", letter(i)), "ide"),
            _ => (format!("vd{}", letter(i)), "virtio"),
        };
        x.push_str(&format!(
            "    <disk type='network' device='disk'>\n      <driver name='qemu' type='raw' cache='none'/>\n      <source protocol='nbd' name='{}'>{host}</source>\n      <target dev='{dev}' bus='{bus}'/>\n    </disk>\n",
            xml_escape(&d.export)
        ));
    }
    if s.network == "user" {
        for n in &s.nics {
            x.push_str("    <interface type='user'>\n");
            if let Some(m) = n.mac.as_deref().filter(|m| valid_mac(m)) {
                x.push_str(&format!("      <mac address='{m}'/>\n"));
            }
            x.push_str(&format!(
                "      <model type='{}'/>\n    </interface>\n",
                xml_escape(n.model.as_deref().unwrap_or("virtio"))
            ));
        }
    }
    x.push_str("    <serial type='pty'/>\n    <console type='pty'/>\n  </devices>\n</domain>\n");
    x
}

fn letter(i: usize) -> String {
    // vda … vdz, vdaa …: enough for any VM.
    let mut n = i;
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    s.reverse();
    String::from_utf8_lossy(&s).into_owned()
}

/// The qemu-system to run: `$CDM_QEMU_SYSTEM`, else `qemu-system-x86_64`
/// on PATH, else the private one `scripts/lib.sh` unpacks.
pub fn find_qemu() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("CDM_QEMU_SYSTEM") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!(
                "qemu-system-x86_64 is not installed: CDM_QEMU_SYSTEM names {}, which does not exist",
                p.display()
            ))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("qemu-system-x86_64"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/opt/cdm-qemu/bin/qemu-system-x86_64")])
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "qemu-system-x86_64 is not installed on the appliance (Debian: qemu-system-x86; or set CDM_QEMU_SYSTEM)".to_string()
        })
}

/// UEFI firmware (OVMF) beside the qemu found, or Debian's.
pub fn find_ovmf(qemu: &Path) -> Option<(PathBuf, PathBuf)> {
    let mut dirs = vec![PathBuf::from("/usr/share/OVMF")];
    if let Some(root) = qemu.parent().and_then(Path::parent) {
        dirs.insert(0, root.join("share/OVMF"));
    }
    dirs.into_iter()
        .map(|d| (d.join("OVMF_CODE.fd"), d.join("OVMF_VARS.fd")))
        .find(|(c, v)| c.is_file() && v.is_file())
}

/// Whether KVM can be used: `/dev/kvm` opens for reading and writing.
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("KVM is not available on this appliance (/dev/kvm: {e})"))
}

/// `auto` → kvm where usable, else tcg; `kvm` → kvm or the reason it cannot.
pub fn resolve_accel(want: &str) -> Result<String, String> {
    match want {
        "tcg" => Ok("tcg".into()),
        "kvm" => kvm_usable().map(|_| "kvm".into()).map_err(|e| {
            format!("{e}; ask for \"accel\": \"tcg\" to run it in software emulation")
        }),
        _ => Ok(if kvm_usable().is_ok() { "kvm" } else { "tcg" }.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            name: "web,1".into(),
            disks: vec![
                RunDisk {
                    export: "vmrec-w-disk0".into(),
                    bus: Some("virtio".into()),
                },
                RunDisk {
                    export: "vmrec-w-disk1".into(),
                    bus: Some("sata".into()),
                },
            ],
            nbd: NbdAt::Unix("/run/cdm/nbd.sock".into()),
            memory_mib: 512,
            vcpus: 2,
            accel: "tcg".into(),
            network: "none".into(),
            nics: vec![RunNic {
                model: Some("e1000".into()),
                mac: Some("52:54:00:aa:bb:cc".into()),
            }],
            firmware: "bios".into(),
            machine: Some("pc-q35-7.2".into()),
            dir: "/data/vm-recoveries/w".into(),
            ovmf: None,
        }
    }

    #[test]
    fn command_line_follows_the_shape() {
        let a = args(&spec()).join(" ");
        assert!(a.contains("-name guest=web,,1"), "{a}");
        assert!(a.contains("-machine q35,accel=tcg"), "{a}");
        assert!(a.contains("-m 512 -smp 2"), "{a}");
        assert!(a.contains("driver=nbd,server.type=unix,server.path=/run/cdm/nbd.sock,export=vmrec-w-disk0,node-name=disk0"), "{a}");
        assert!(a.contains("virtio-blk-pci,drive=disk0,bootindex=1"), "{a}");
        assert!(
            a.contains("ahci,id=ahci0") && a.contains("ide-hd,drive=disk1,bus=ahci0.0"),
            "{a}"
        );
        assert!(a.contains("-nic none"), "{a}");
        assert!(a.contains("-no-reboot"), "{a}");
        assert!(a.contains("-sandbox on,"), "{a}");
        assert!(
            a.contains("-chardev file,id=serial0,append=on,path=/data/vm-recoveries/w/serial.log -serial chardev:serial0"),
            "{a}"
        );
        let mut s = spec();
        s.network = "user".into();
        s.accel = "kvm".into();
        let a = args(&s).join(" ");
        assert!(
            a.contains("-nic user,restrict=on,model=e1000,mac=52:54:00:aa:bb:cc"),
            "{a}"
        );
        assert!(a.contains("-cpu host"), "{a}");
        s.nics = vec![RunNic {
            model: Some("weird".into()),
            mac: Some("zz".into()),
        }];
        let a = args(&s).join(" ");
        assert!(
            a.ends_with("-nic user,restrict=on,model=virtio-net-pci"),
            "{a}"
        );
    }

    #[test]
    fn domain_xml_parses_and_names_the_exports() {
        let mut s = spec();
        s.network = "user".into();
        s.name = "a<b".into();
        let x = domain_xml(&s);
        let d = roxmltree::Document::parse(&x).unwrap();
        let names: Vec<&str> = d
            .descendants()
            .filter(|n| n.tag_name().name() == "source")
            .filter_map(|n| n.attribute("name"))
            .collect();
        assert_eq!(names, ["vmrec-w-disk0", "vmrec-w-disk1"]);
        assert!(x.contains("<name>a&lt;b</name>"), "{x}");
        assert!(x.contains("socket='/run/cdm/nbd.sock'"), "{x}");
        assert!(x.contains("<target dev='sdb' bus='sata'/>"), "{x}");
        assert_eq!(letter(0), "a");
        assert_eq!(letter(25), "z");
        assert_eq!(letter(26), "aa");
    }

    /// The only test that sets CDM_QEMU_SYSTEM (the environment is the
    /// process's): a missing qemu is an error that says what to install.
    #[test]
    fn missing_qemu_is_said() {
        std::env::set_var("CDM_QEMU_SYSTEM", "/nonexistent/qemu-system-x86_64");
        let e = find_qemu().unwrap_err();
        std::env::remove_var("CDM_QEMU_SYSTEM");
        assert!(
            e.contains("not installed") && e.contains("/nonexistent"),
            "{e}"
        );
        assert!(
            find_ovmf(Path::new("/nonexistent/bin/qemu")).is_none()
                || Path::new("/usr/share/OVMF/OVMF_CODE.fd").exists()
        );
    }

    #[test]
    fn listeners_and_accelerators() {
        assert_eq!(
            NbdAt::from_listeners(&["0.0.0.0:10809".into(), "unix:/s".into()]),
            Some(NbdAt::Unix("/s".into()))
        );
        assert_eq!(
            NbdAt::from_listeners(&["0.0.0.0:10809".into()]),
            Some(NbdAt::Tcp {
                host: "127.0.0.1".into(),
                port: 10809
            })
        );
        assert_eq!(NbdAt::from_listeners(&[]), None);
        assert_eq!(resolve_accel("tcg").unwrap(), "tcg");
        assert!(["kvm", "tcg"].contains(&resolve_accel("auto").unwrap().as_str()));
    }
}
