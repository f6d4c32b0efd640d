//! btrfs filesystems are outside bytes (a guest's root). The input is the
//! filesystem from its first superblock on (placed at 64 KiB, so a short
//! input can be a whole image): the chunk tree, the root tree, the default
//! subvolume, directory items, inodes and file extents (inline, regular,
//! zstd) are read by following paths the inspection asks for. Our own
//! reader runs without `catch_unwind`: nothing may panic, hang or
//! allocate without bound.
#![no_main]

use cdm_inspect::btrfs::Btrfs;
use cdm_inspect::{MemDisk, Shared};
use libfuzzer_sys::fuzz_target;


fuzz_target!(|data: &[u8]| {
    let mut img = vec![0u8; 64 << 10];
    img.extend_from_slice(data);
    if img.len() < (68 << 10) {
        img.resize(68 << 10, 0);
    }
    let len = img.len() as u64;
    let d = Shared::new(Box::new(MemDisk(img)));
    if let Ok(fs) = Btrfs::open(d, 0, len) {
        let _ = fs.read_file("/etc/os-release", 1 << 20);
        let _ = fs.exists("/var/lib/postgresql");
        for n in fs.list("/") {
            let _ = fs.read_file(&format!("/{n}"), 1 << 20);
        }
    }
});
