//! The appliance image in a VM, for the image tests: built by
//! `appliance-image/build-image` from this tree's debug binaries (stripped
//! in the image), booted from a copy of its disk with OVMF in software
//! emulation (KVM cannot run a guest kernel in this sandbox:
//! docs/vm-recovery.md), driven over the serial console and, through
//! qemu's user network, the HTTPS API and NBD.
//!
//! The Debian base is cached in `target/appliance-cache` (debootstrap runs
//! once per machine), so a second image costs a root, an initramfs and a
//! squashfs, not a download.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use cdm_api::client::Client;

use crate::guest::{kit_dir, qemu_system};
use crate::{bin, run};

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A signing key pair made by `cdm-update keygen`: `NAME.key`, `NAME.pub`.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).expect("key dir");
    let key = dir.join(format!("{name}.key"));
    run(Command::new(bin("cdm-update"))
        .arg("keygen")
        .arg("--secret")
        .arg(&key)
        .arg("--public")
        .arg(dir.join(format!("{name}.pub"))));
    key
}

/// What one build made.
pub struct Image {
    pub out: PathBuf,
    pub version: String,
    /// `OUT/cdm-appliance.img` (absent for a root-only build).
    pub disk: PathBuf,
    pub bundle: PathBuf,
}

/// Builds the image (or with `root_only` only the root and its bundle) of
/// `version` into `out`, signed with `key`; `modify` is copied over the
/// root before it is packed (a broken version for the rollback tests).
pub fn build(
    out: &Path,
    key: &Path,
    version: &str,
    modify: Option<&Path>,
    root_only: bool,
) -> Image {
    let cache = repo().join("target/appliance-cache");
    let mut c = Command::new(repo().join("appliance-image/build-image"));
    c.arg("--out")
        .arg(out)
        .arg("--cache")
        .arg(&cache)
        .arg("--bin-dir")
        .arg(bin("snapshotd").parent().expect("bin dir"))
        .arg("--key")
        .arg(key)
        .args(["--version", version]);
    if let Some(m) = modify {
        c.arg("--modify").arg(m);
    }
    if root_only {
        c.arg("--root-only");
    }
    let t = Instant::now();
    run(&mut c);
    eprintln!("built the appliance {version} in {:.0?}", t.elapsed());
    Image {
        out: out.to_path_buf(),
        version: version.to_string(),
        disk: out.join("cdm-appliance.img"),
        bundle: out.join(format!("cdm-appliance-{version}.cdmb")),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The appliance running in qemu (killed when dropped). Its disk and UEFI
/// variable store stay in `dir` across boots; the serial console of every
/// boot is appended to `dir/serial.log`.
pub struct Vm {
    child: Option<Child>,
    pub dir: PathBuf,
    pub serial: PathBuf,
    pub api_port: u16,
    pub nbd_port: u16,
    pub token: Option<String>,
    pub ca: PathBuf,
}

impl Vm {
    /// A VM in `dir` whose disk is a sparse copy of `image`, `grow` bytes
    /// larger (the first boot grows the data partition into them).
    pub fn create(dir: &Path, image: &Path, grow: u64) -> Vm {
        std::fs::create_dir_all(dir).expect("vm dir");
        let disk = dir.join("disk.img");
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(image)
            .arg(&disk));
        if grow > 0 {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&disk)
                .expect("disk");
            let len = f.metadata().expect("disk size").len();
            f.set_len(len + grow).expect("grow the disk");
        }
        std::fs::copy(
            kit_dir().join("share/OVMF/OVMF_VARS.fd"),
            dir.join("vars.fd"),
        )
        .expect("OVMF_VARS.fd: scripts/lib.sh qemu_system_private unpacks it");
        Vm {
            child: None,
            dir: dir.to_path_buf(),
            serial: dir.join("serial.log"),
            api_port: free_port(),
            nbd_port: free_port(),
            token: None,
            ca: dir.join("ca.crt"),
        }
    }

    /// Powers the VM on (UEFI, q35, 1 GiB, 2 vCPUs in TCG).
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "the VM already runs");
        let code = kit_dir().join("share/OVMF/OVMF_CODE.fd");
        let child = Command::new(qemu_system())
            .args(["-accel", "tcg", "-m", "1024", "-smp", "2", "-machine", "q35"])
            .args(["-nodefaults", "-display", "none"])
            .arg("-chardev")
            .arg(format!(
                "file,id=s0,path={},append=on",
                self.serial.display()
            ))
            .args(["-serial", "chardev:s0"])
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,readonly=on,file={}",
                code.display()
            ))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,file={}",
                self.dir.join("vars.fd").display()
            ))
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=virtio,cache=unsafe",
                self.dir.join("disk.img").display()
            ))
            .arg("-nic")
            .arg(format!(
                "user,model=virtio-net-pci,restrict=on,hostfwd=tcp:127.0.0.1:{}-:8443,hostfwd=tcp:127.0.0.1:{}-:10809",
                self.api_port, self.nbd_port
            ))
            .spawn()
            .expect("qemu-system-x86_64");
        self.child = Some(child);
    }

    /// Pulls the plug: qemu killed at once (nothing flushed by the guest).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The serial console so far (every boot of this VM).
    pub fn console(&self) -> String {
        std::fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until `needle` is on the console at least `count` times.
    pub fn wait_console(&mut self, needle: &str, count: usize, secs: u64) -> String {
        let t = Instant::now();
        loop {
            let log = self.console();
            if log.matches(needle).count() >= count {
                return log;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("qemu exited ({st}) before {needle:?} #{count}; the console:\n{log}");
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "{needle:?} not on the console {count} time(s) after {secs} s; the console:\n{}",
                tail(&log, 6000)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The HTTPS API's URL through the user network's forward.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// The appliance's CA, fetched once without verification (the test is
    /// the admin reading it off the box) and pinned for every later call.
    pub fn fetch_ca(&self) {
        let out = run(Command::new("curl")
            .args(["-sSfk", "--max-time", "20"])
            .arg(format!("{}/v1/ca", self.url())));
        assert!(out.contains("BEGIN CERTIFICATE"), "not a CA: {out}");
        std::fs::write(&self.ca, out).expect("ca.crt");
    }

    /// An API client with the admin token and the pinned CA.
    pub fn client(&self) -> Client {
        let token = self.token.as_deref().expect("the admin token was read");
        Client::connect(&self.url(), Some(token.to_string()), Some(&self.ca)).expect("client")
    }

    /// cdmctl against the VM's API (admin token, pinned CA).
    pub fn cdmctl(&self, args: &[&str]) -> std::process::Output {
        let token = self.token.as_deref().expect("the admin token was read");
        Command::new(bin("cdmctl"))
            .args(["--url", &self.url(), "--json", "--ca-file"])
            .arg(&self.ca)
            .env("CDM_TOKEN", token)
            .args(args)
            .output()
            .expect("cdmctl")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` bytes of a log (on a character boundary).
pub fn tail(log: &str, n: usize) -> &str {
    let mut i = log.len().saturating_sub(n);
    while !log.is_char_boundary(i) {
        i += 1;
    }
    &log[i..]
}

/// One slot's entry (`"a"` or `"b"`) of an appliance status
/// (`GET /v1/appliance`, `cdmctl appliance status --json`); null if absent.
pub fn slot_of(status: &serde_json::Value, slot: &str) -> serde_json::Value {
    status["slots"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["slot"] == slot).cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// The admin token the first boot's banner showed on the console.
pub fn token_from_console(log: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.split("first boot: admin token ").nth(1))
        .map(|t| t.trim().to_string())
}
