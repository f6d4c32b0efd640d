//! Disk images for the inspection tests, made with real tools: trees of
//! files, ext4 (`mkfs.ext4 -d`), XFS (an `mkfs.xfs` protofile), NTFS with
//! registry hives (`mkntfs` + `ntfs-3g`), disks with an MBR or GPT
//! partition table (`sfdisk`).

use std::path::{Path, PathBuf};
use std::process::Command;

use cdm_inspect::regf_write::HiveWriter;
use serde_json::Value;

use crate::{run, sh};

/// A directory of images made by the tests.
pub struct Corpus {
    pub dir: tempfile::TempDir,
}

impl Corpus {
    pub fn p(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    /// A directory tree from (path, content) pairs; a path ending in '/'
    /// is a directory.
    pub fn tree(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = self.p(name);
        for (f, c) in files {
            let p = root.join(f.trim_start_matches('/'));
            if f.ends_with('/') {
                std::fs::create_dir_all(&p).unwrap();
            } else if let Some(target) = c.strip_prefix("-> ") {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(target, &p).unwrap();
            } else {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, c).unwrap();
            }
        }
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    pub fn ext4(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let t = self.tree(&format!("{name}.d"), files);
        let img = self.p(&format!("{name}.fs"));
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&t)
            .arg(&img)
            .arg("24M"));
        img
    }

    /// An XFS filesystem filled from a tree through an mkfs.xfs protofile.
    pub fn xfs(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        fn proto(dir: &Path, depth: usize, out: &mut String) {
            let mut names: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            let pad = " ".repeat(depth);
            for p in names {
                let n = p.file_name().unwrap().to_string_lossy().to_string();
                let m = std::fs::symlink_metadata(&p).unwrap();
                if m.file_type().is_symlink() {
                    out.push_str(&format!(
                        "{pad}{n} l--777 0 0 {}\n",
                        std::fs::read_link(&p).unwrap().display()
                    ));
                } else if m.is_dir() {
                    out.push_str(&format!("{pad}{n} d--755 0 0\n"));
                    proto(&p, depth + 1, out);
                    out.push_str(&format!("{pad}$\n"));
                } else {
                    out.push_str(&format!("{pad}{n} ---644 0 0 {}\n", p.display()));
                }
            }
        }
        let t = self.tree(&format!("{name}.d"), files);
        let mut text = String::from("/dev/null\n0 0\nd--755 0 0\n");
        proto(&t, 1, &mut text);
        text.push_str("$\n");
        let pf = self.p(&format!("{name}.proto"));
        std::fs::write(&pf, text).unwrap();
        let img = self.p(&format!("{name}.fs"));
        run(Command::new("truncate").args(["-s", "320M"]).arg(&img));
        run(Command::new("mkfs.xfs")
            .args(["-q", "-f", "-p"])
            .arg(&pf)
            .arg(&img));
        img
    }

    /// An NTFS filesystem holding Windows/System32/config/{SOFTWARE,SYSTEM}.
    pub fn ntfs(&self, name: &str, software: &HiveWriter, system: &HiveWriter) -> PathBuf {
        let img = self.p(&format!("{name}.fs"));
        run(Command::new("truncate").args(["-s", "32M"]).arg(&img));
        run(Command::new("mkntfs").args(["-F", "-Q", "-q"]).arg(&img));
        let mnt = self.p(&format!("{name}.mnt"));
        std::fs::create_dir_all(&mnt).unwrap();
        run(Command::new("ntfs-3g").arg(&img).arg(&mnt));
        let cfg = mnt.join("Windows/System32/config");
        std::fs::create_dir_all(&cfg).unwrap();
        std::fs::write(cfg.join("SOFTWARE"), software.to_bytes()).unwrap();
        std::fs::write(cfg.join("SYSTEM"), system.to_bytes()).unwrap();
        std::fs::create_dir_all(mnt.join("Program Files")).unwrap();
        run(Command::new("umount").arg(&mnt));
        img
    }

    /// A disk with one partition holding `fs` (label dos or gpt).
    pub fn disk(&self, name: &str, label: &str, bootable: bool, fs: &Path) -> PathBuf {
        self.disk_parts(name, label, bootable, &[fs])
    }

    /// A disk with one partition per image, in order, each holding it
    /// (label dos or gpt; the boot flag on the first).
    pub fn disk_parts(&self, name: &str, label: &str, bootable: bool, images: &[&Path]) -> PathBuf {
        let disk = self.p(&format!("{name}.img"));
        let lens: Vec<u64> = images
            .iter()
            .map(|f| std::fs::metadata(f).unwrap().len())
            .collect();
        // 1 MiB before the first partition and after each (alignment).
        let total: u64 = lens.iter().map(|l| (l >> 20) + 1).sum::<u64>() + 3;
        run(Command::new("truncate")
            .arg("-s")
            .arg(total.to_string() + "M")
            .arg(&disk));
        let ty = if label == "gpt" {
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
        } else {
            "83"
        };
        let mut script = format!("label: {label}\\n");
        for (i, l) in lens.iter().enumerate() {
            let boot = if bootable && i == 0 { ", bootable" } else { "" };
            let start = if i == 0 { "start=2048, " } else { "" };
            script.push_str(&format!("{start}size={}, type={ty}{boot}\\n", l / 512));
        }
        sh(&format!("printf '{script}' | sfdisk -q {}", disk.display()));
        let j: Value =
            serde_json::from_str(&run(Command::new("sfdisk").arg("-J").arg(&disk))).unwrap();
        for (i, fs) in images.iter().enumerate() {
            let start = j["partitiontable"]["partitions"][i]["start"]
                .as_u64()
                .unwrap();
            place(fs, &disk, start);
        }
        disk
    }
}

/// Writes filesystem image `fs` into `disk` at sector `start` (holes kept).
fn place(fs: &Path, disk: &Path, start: u64) {
    run(Command::new("dd")
        .arg(format!("if={}", fs.display()))
        .arg(format!("of={}", disk.display()))
        .args([
            "bs=512",
            &format!("seek={start}"),
            "conv=notrunc,sparse",
            "status=none",
        ]));
}

impl Corpus {
    /// A disk whose filesystem is in logical partition 5, inside an
    /// extended partition.
    pub fn disk_logical(&self, name: &str, fs: &Path) -> PathBuf {
        let disk = self.p(&format!("{name}.img"));
        let fs_len = std::fs::metadata(fs).unwrap().len();
        run(Command::new("truncate")
            .arg("-s")
            .arg(((fs_len >> 20) + 8).to_string() + "M")
            .arg(&disk));
        sh(&format!(
            "printf 'label: dos\\nstart=2048, type=5\\nstart=6144, size={}, type=83\\n' | sfdisk -q {}",
            fs_len / 512,
            disk.display()
        ));
        let j: Value =
            serde_json::from_str(&run(Command::new("sfdisk").arg("-J").arg(&disk))).unwrap();
        let parts = j["partitiontable"]["partitions"].as_array().unwrap();
        let logical = parts
            .iter()
            .find(|p| p["node"].as_str().unwrap().ends_with('5'))
            .unwrap();
        let start = logical["start"].as_u64().unwrap();
        place(fs, &disk, start);
        disk
    }
}

/// For `scripts/bench-inspect`: with `CDM_CORPUS_KEEP=DIR`, copies the
/// (name, image) pairs into DIR and lists them in `DIR/LIST`.
pub fn keep(list: &str, images: &[(&str, &Path)]) {
    let Ok(keep) = std::env::var("CDM_CORPUS_KEEP") else {
        return;
    };
    let keep = PathBuf::from(keep);
    std::fs::create_dir_all(&keep).unwrap();
    let mut out = String::new();
    for (name, img) in images {
        let dst = keep.join(format!("{name}.img"));
        std::fs::copy(img, &dst).unwrap();
        out.push_str(&format!("{}\n", dst.display()));
    }
    std::fs::write(keep.join(list), out).unwrap();
}
