//! `cdm-update` end to end: keys, a bundle of a real squashfs root image
//! (mksquashfs), verification and its refusals (exit 2, one line), and
//! installation into an ESP directory whose slot devices are plain files.

use std::path::{Path, PathBuf};
use std::process::Command;

use cdm_e2e::{bin, output, random_bytes, require, run, write_file};

struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    fn new() -> Site {
        Site {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn p(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn tool(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("cdm-update"));
        c.args(args);
        c
    }

    fn keygen(&self) {
        std::fs::create_dir_all(self.p("keys")).expect("keys dir");
        let p = |n: &str| self.p(n).to_string_lossy().into_owned();
        run(&mut self.tool(&[
            "keygen",
            "--secret",
            &p("secret"),
            "--public",
            &p("keys/release.pub"),
        ]));
    }

    /// A squashfs root image holding /usr/lib/cdm/version, plus kernel
    /// and initrd files; returns the bundle path.
    fn bundle(&self, version: &str, arch: &str) -> PathBuf {
        require("mksquashfs");
        let root = self.p(&format!("root-{version}"));
        std::fs::create_dir_all(root.join("usr/lib/cdm")).expect("root dir");
        write_file(
            &root.join("usr/lib/cdm/version"),
            format!("{version}\n").as_bytes(),
        );
        write_file(&root.join("usr/lib/cdm/filler"), &random_bytes(300_000, 7));
        let img = self.p(&format!("rootfs-{version}.squashfs"));
        let _ = std::fs::remove_file(&img);
        run(Command::new("mksquashfs")
            .args([root.as_os_str(), img.as_os_str()])
            .args(["-quiet", "-noappend", "-no-progress"]));
        write_file(&self.p("vmlinuz"), &random_bytes(40_000, 1));
        write_file(&self.p("initrd.img"), &random_bytes(60_000, 2));
        let out = self.p(&format!("{version}-{arch}.cdmb"));
        let s = |p: &Path| p.to_string_lossy().into_owned();
        run(&mut self.tool(&[
            "bundle",
            "--key",
            &s(&self.p("secret")),
            "--version",
            version,
            "--arch",
            arch,
            "--rootfs",
            &s(&img),
            "--kernel",
            &s(&self.p("vmlinuz")),
            "--initrd",
            &s(&self.p("initrd.img")),
            "--out",
            &s(&out),
        ]));
        out
    }

    /// Runs `cdm-update verify`; returns (exit code, stdout, stderr).
    fn verify(&self, file: &Path) -> (i32, String, String) {
        let keys = self.p("keys");
        let o = output(self.tool(&["verify", "--keys"]).arg(&keys).arg(file));
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}

#[test]
fn verify_prints_the_manifest_and_refuses_with_one_line() {
    let s = Site::new();
    s.keygen();
    let good = s.bundle("0.2.0+gabc", std::env::consts::ARCH);
    let (code, out, err) = s.verify(&good);
    assert_eq!(code, 0, "{err}");
    let m: serde_json::Value = serde_json::from_str(&out).expect("manifest JSON");
    assert_eq!(m["version"], "0.2.0+gabc");
    assert_eq!(m["compatible"], "cdm-appliance");
    assert_eq!(m["files"][0]["name"], "rootfs");
    let key = std::fs::read_to_string(s.p("keys/release.pub")).expect("pub");
    assert_eq!(key.len(), 65);

    let bytes = std::fs::read(&good).expect("bundle");
    let bad = s.p("bad.cdmb");
    let refuse = |data: &[u8], want: &str| {
        write_file(&bad, data);
        let (code, out, err) = s.verify(&bad);
        assert_eq!(code, 2, "{want}: {err}");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "want {want:?}, got {err:?}");
    };
    let mut b = bytes.clone();
    b[0] = b'X';
    refuse(&b, "bad magic");
    refuse(&bytes[..bytes.len() - 10], "truncated");
    let mut b = bytes.clone();
    b.extend_from_slice(b"junk");
    refuse(&b, "trailing bytes");
    let mut b = bytes.clone();
    let last = b.len() - 1;
    b[last] ^= 1;
    refuse(&b, "hash mismatch of initrd");
    let mlen = u32::from_le_bytes(bytes[8..12].try_into().expect("len")) as usize;
    let mut b = bytes.clone();
    b[12 + mlen] ^= 1;
    refuse(&b, "bad signature");

    let other = if std::env::consts::ARCH == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    let foreign = s.bundle("0.2.1", other);
    let (code, _, err) = s.verify(&foreign);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim(),
        format!(
            "bundle is for {other}, this appliance is {}",
            std::env::consts::ARCH
        )
    );

    // A bundle from a key that is not trusted.
    let t = Site::new();
    t.keygen();
    let stranger = t.bundle("6.6.6", std::env::consts::ARCH);
    let (code, _, err) = s.verify(&stranger);
    assert_eq!(code, 2);
    assert!(err.contains("unknown key"), "{err}");
}
