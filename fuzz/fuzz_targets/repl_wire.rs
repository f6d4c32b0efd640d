//! The binary bodies of replication (`snapshotd/src/replication/wire.rs`):
//! a batch's fingerprint list, the target's bitmap of lacking blocks and
//! the compressed data of a batch all come from another appliance. Nothing
//! may panic or allocate beyond the caps; a fingerprint list that decodes
//! must encode back to the same bytes; data that decodes has exactly the
//! length of the blocks it was decoded for.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../snapshotd/src/replication/wire.rs"]
#[allow(dead_code)]
mod wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = wire::Fingerprints::decode(data) {
        assert_eq!(f.encode(), data);
        // The data of this batch's data blocks, decoded from the same
        // bytes as if they were a data body.
        let want: Vec<wire::Entry> = f
            .entries
            .iter()
            .copied()
            .filter(|e| e.kind != wire::Kind::Zero)
            .collect();
        if let Ok(plain) = wire::decode_data(data, &want) {
            let n: usize = want.iter().map(|e| e.len as usize).sum();
            assert_eq!(plain.len(), n);
        }
    }
    let count = data.first().map_or(0, |b| *b as usize);
    if let Ok(bits) = wire::decode_lacking(data, count) {
        assert_eq!(wire::encode_lacking(&bits), data);
    }
    // Data bodies against a fixed batch: two whole 4 KiB blocks and a
    // short last one.
    let fp = [7u8; 32];
    let want = [
        wire::Entry {
            offset: 0,
            len: 4096,
            kind: wire::Kind::Data(fp),
        },
        wire::Entry {
            offset: 8192,
            len: 4096,
            kind: wire::Kind::Data(fp),
        },
        wire::Entry {
            offset: 12288,
            len: 100,
            kind: wire::Kind::Data(fp),
        },
    ];
    if let Ok(plain) = wire::decode_data(data, &want) {
        assert_eq!(plain.len(), 8292);
    }
});
