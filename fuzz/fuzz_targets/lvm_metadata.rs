//! LVM2 physical volumes are outside bytes (a guest's disk). The input is
//! read as a PV (label, metadata area header, metadata text through their
//! checksums) and, since checksums keep random bytes from reaching it, its
//! text is also parsed directly as VG metadata; every linear LV found is
//! mapped over the input and read across its segments. Nothing may panic,
//! hang or allocate without bound. Seeds: a PV made by pvcreate/vgcreate/
//! lvcreate (its first 1 MiB: label and metadata area) and VG texts.
#![no_main]

use cdm_inspect::lvm::{read_pv, vg_from_text, LvDisk};
use cdm_inspect::{Disk, MemDisk, Shared};
use libfuzzer_sys::fuzz_target;


fuzz_target!(|data: &[u8]| {
    let d = Shared::new(Box::new(MemDisk(data.to_vec())));
    let mut vgs = Vec::new();
    if let Ok(pv) = read_pv(&d, 0, data.len() as u64) {
        let here = vec![(pv.uuid.clone(), 0u64, data.len() as u64)];
        if let Some(Ok(vg)) = pv.vg {
            vgs.push((vg, here));
        }
    }
    if let Ok(vg) = vg_from_text(data) {
        // Every PV the text names is "here", at the input's start.
        let here = vg
            .pvs
            .iter()
            .map(|(_, uuid, _)| (uuid.clone(), 0u64, data.len() as u64))
            .collect();
        vgs.push((vg, here));
    }
    for (vg, here) in vgs {
        for lv in &vg.lvs {
            if let Ok(mut disk) = LvDisk::new(d.clone(), &vg, lv, &here) {
                let n = disk.size().min(4096) as usize;
                let mut buf = vec![0u8; n];
                if n > 0 {
                    let _ = disk.read_at(disk.size() - n as u64, &mut buf);
                    let _ = disk.read_at(0, &mut buf);
                }
            }
        }
    }
});
