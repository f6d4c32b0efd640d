//! Guest disks are outside bytes: a VM image can hold anything. The whole
//! inspection (partition table, ext4 and NTFS readers, release files,
//! registry hives) runs over the input as a disk; the registry reader and
//! the inventory parsers (libvirt XML, TOML, JSON) over the input as a
//! file. Nothing may panic, hang or allocate without bound; every app
//! found carries its evidence. Our own readers (XFS, registry, partition
//! table) run without `catch_unwind`; the guard around the ext4-view and
//! ntfs crates is compiled out under `cfg(fuzzing)`, so every panic
//! reaches libFuzzer. Seeds: an ext4 disk, a hive, a minimal XFS and
//! `regression-*` inputs of bugs found.
#![no_main]

use cdm_inspect::registry::Hive;
use cdm_inspect::{inspect, MemDisk};
use libfuzzer_sys::fuzz_target;


fuzz_target!(|data: &[u8]| {
    let i = inspect(Box::new(MemDisk(data.to_vec())));
    for a in &i.apps {
        assert!(!a.evidence.is_empty());
    }
    assert!(i.status == "ok" || i.reason.is_some());
    if let Ok(h) = Hive::parse(data) {
        if let Some(k) = h.key("Microsoft\\Windows NT\\CurrentVersion") {
            let _ = k.values();
            let _ = k.subkeys();
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let p = std::path::Path::new("fuzz.xml");
        let _ = cdm_inspect::inventory::parse_domain(text, p);
        let _ = cdm_inspect::inventory::parse_file(text, std::path::Path::new("fuzz.toml"));
        let _ = cdm_inspect::inventory::parse_file(text, std::path::Path::new("fuzz.json"));
    }
});
