//! The on-disk metadata decoders on arbitrary bytes: `Superblock::decode` on
//! the input, and `Node::decode` on a 4096-byte node built from it.
//!
//! Input layout for the node part:
//!   byte 0        mode; bit 0 set: "seal" the node (write the node magic,
//!                 its address and a correct checksum, and expect that
//!                 checksum), so most runs get past the checksum gate into
//!                 the structural checks
//!   bytes 1..9    addr (u64 LE)
//!   bytes 9..13   expected checksum (u32 LE; ignored when sealing)
//!   bytes 13..    the node, padded with zeros or truncated to NODE_SIZE
#![no_main]

use cdmfs::format::{crc, Node, Superblock, NODE_MAGIC, NODE_SIZE, SB_BYTES};
use libfuzzer_sys::fuzz_target;

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    u64::from_le_bytes(a)
}

fn le_u32(b: &[u8]) -> u32 {
    le_u64(b) as u32
}

fuzz_target!(|data: &[u8]| {
    // Superblock slot: whatever decodes must re-encode to something that
    // decodes to the same superblock.
    if let Ok(Some(sb)) = Superblock::decode(data) {
        assert!(data.len() >= SB_BYTES);
        let again = Superblock::decode(&sb.encode())
            .expect("re-encoded superblock does not decode")
            .expect("re-encoded superblock decodes as empty");
        assert_eq!(sb, again, "superblock does not round-trip");
    }

    // Tree node.
    let mode = data.first().copied().unwrap_or(0);
    let addr = le_u64(data.get(1..).unwrap_or(&[]));
    let mut expect = le_u32(data.get(9..).unwrap_or(&[]));
    let body = data.get(13..).unwrap_or(&[]);
    let mut node = vec![0u8; NODE_SIZE];
    let n = body.len().min(NODE_SIZE);
    node[..n].copy_from_slice(&body[..n]);
    if mode & 1 != 0 {
        node[0..4].copy_from_slice(&NODE_MAGIC.to_le_bytes());
        node[8..16].copy_from_slice(&addr.to_le_bytes());
        expect = crc(&node[8..]);
        node[4..8].copy_from_slice(&expect.to_le_bytes());
    }
    if let Ok(decoded) = Node::decode(&node, addr, expect) {
        assert_eq!(decoded.vals.len(), decoded.len() * decoded.stride());
        assert!(decoded.keys.windows(2).all(|w| w[0] < w[1]));
        for i in 0..decoded.len() {
            let _ = decoded.val(i);
            if !decoded.is_leaf() {
                let _ = decoded.child(i);
            }
        }
        let generation = le_u64(node.get(16..).unwrap_or(&[]));
        let (bytes, c) = decoded.encode(addr, generation);
        let again = Node::decode(&bytes, addr, c).expect("re-encoded node does not decode");
        assert_eq!(decoded, again, "node does not round-trip");
    }
    // Short and long buffers must be refused, not indexed past.
    let _ = Node::decode(body, addr, expect);
});
