//! A writer of small registry hives: a base block with its checksum and
//! one hive bin holding `nk`, `lh`, `vk` and data cells. The test suite
//! builds Windows guests' `SOFTWARE` and `SYSTEM` hives with it (no Debian
//! package ships a blank hive), and `hivexget` reads them back.

use std::collections::BTreeMap;

#[derive(Clone, Debug)]
enum Val {
    Sz(String),
    Dword(u32),
}

#[derive(Default, Debug)]
struct Node {
    /// Keyed by upper-case name (the order Windows keeps), with the name.
    kids: BTreeMap<String, (String, Node)>,
    values: Vec<(String, Val)>,
}

pub struct HiveWriter {
    root_name: String,
    root: Node,
}

fn lh_hash(name: &str) -> u32 {
    name.chars().fold(0u32, |h, c| {
        h.wrapping_mul(37)
            .wrapping_add(c.to_ascii_uppercase() as u32)
    })
}

impl HiveWriter {
    pub fn new(root_name: &str) -> HiveWriter {
        HiveWriter {
            root_name: root_name.into(),
            root: Node::default(),
        }
    }

    fn node(&mut self, path: &str) -> &mut Node {
        let mut n = &mut self.root;
        for part in path.split('\\').filter(|p| !p.is_empty()) {
            n = &mut n
                .kids
                .entry(part.to_ascii_uppercase())
                .or_insert_with(|| (part.to_string(), Node::default()))
                .1;
        }
        n
    }

    /// Makes the key (and its parents).
    pub fn key(&mut self, path: &str) {
        self.node(path);
    }

    pub fn set_sz(&mut self, path: &str, name: &str, v: &str) {
        self.node(path)
            .values
            .push((name.into(), Val::Sz(v.into())));
    }

    pub fn set_dword(&mut self, path: &str, name: &str, v: u32) {
        self.node(path).values.push((name.into(), Val::Dword(v)));
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bin: Vec<u8> = vec![0; 32];
        bin[..4].copy_from_slice(b"hbin");
        let root = write_key(&mut bin, &self.root_name, &self.root, None, true);
        // Pad the bin to 4 KiB multiples with one free cell.
        let len = bin.len().div_ceil(4096).max(1) * 4096;
        let pad = len - bin.len();
        if pad >= 8 {
            bin.extend_from_slice(&(pad as i32).to_le_bytes());
            bin.resize(len, 0);
        } else {
            // Too small for a free cell: grow by a whole page.
            let len = len + 4096;
            let pad = len - bin.len();
            bin.extend_from_slice(&(pad as i32).to_le_bytes());
            bin.resize(len, 0);
        }
        let blen = bin.len() as u32;
        bin[8..12].copy_from_slice(&blen.to_le_bytes());
        let mut base = vec![0u8; 4096];
        base[..4].copy_from_slice(b"regf");
        base[4..8].copy_from_slice(&1u32.to_le_bytes()); // sequence 1
        base[8..12].copy_from_slice(&1u32.to_le_bytes()); // sequence 2
        base[0x14..0x18].copy_from_slice(&1u32.to_le_bytes()); // major
        base[0x18..0x1c].copy_from_slice(&5u32.to_le_bytes()); // minor
        base[0x20..0x24].copy_from_slice(&1u32.to_le_bytes()); // format: direct memory load
        base[0x24..0x28].copy_from_slice(&root.to_le_bytes());
        base[0x28..0x2c].copy_from_slice(&blen.to_le_bytes());
        base[0x2c..0x30].copy_from_slice(&1u32.to_le_bytes()); // clustering factor
        let sum = (0..0x1fc).step_by(4).fold(0u32, |x, o| {
            x ^ u32::from_le_bytes(base[o..o + 4].try_into().unwrap_or([0; 4]))
        });
        base[0x1fc..0x200].copy_from_slice(&sum.to_le_bytes());
        base.extend_from_slice(&bin);
        base
    }
}

/// Appends a cell holding `data` (8-byte aligned); its offset in the bin
/// area (the bin starts at 0).
fn cell(bin: &mut Vec<u8>, data: &[u8]) -> u32 {
    let off = bin.len() as u32;
    let size = (data.len() + 4).div_ceil(8) * 8;
    bin.extend_from_slice(&(-(size as i32)).to_le_bytes());
    bin.extend_from_slice(data);
    bin.resize(off as usize + size, 0);
    off
}

fn write_key(bin: &mut Vec<u8>, name: &str, n: &Node, parent: Option<u32>, root: bool) -> u32 {
    // The nk cell first (its size is fixed by the name), patched later.
    let mut nk = vec![0u8; 0x4c + name.len()];
    nk[..2].copy_from_slice(b"nk");
    let flags: u16 = 0x20 | if root { 0x0c } else { 0 };
    nk[2..4].copy_from_slice(&flags.to_le_bytes());
    nk[0x48..0x4a].copy_from_slice(&(name.len() as u16).to_le_bytes());
    nk[0x4c..].copy_from_slice(name.as_bytes());
    let me = cell(bin, &nk);
    let at = me as usize + 4;
    let put = |bin: &mut Vec<u8>, o: usize, v: u32| {
        bin[at + o..at + o + 4].copy_from_slice(&v.to_le_bytes())
    };
    put(bin, 0x10, parent.unwrap_or(0));
    put(bin, 0x20, u32::MAX);
    put(bin, 0x2c, u32::MAX);
    put(bin, 0x30, u32::MAX);
    // Subkeys.
    let mut kids = Vec::new();
    for (upper, (kname, kn)) in &n.kids {
        kids.push((write_key(bin, kname, kn, Some(me), false), lh_hash(upper)));
    }
    put(bin, 0x14, kids.len() as u32);
    if kids.is_empty() {
        put(bin, 0x1c, u32::MAX);
    } else {
        let mut lh = Vec::with_capacity(4 + kids.len() * 8);
        lh.extend_from_slice(b"lh");
        lh.extend_from_slice(&(kids.len() as u16).to_le_bytes());
        for (o, h) in &kids {
            lh.extend_from_slice(&o.to_le_bytes());
            lh.extend_from_slice(&h.to_le_bytes());
        }
        let l = cell(bin, &lh);
        put(bin, 0x1c, l);
    }
    // Values.
    put(bin, 0x24, n.values.len() as u32);
    if n.values.is_empty() {
        put(bin, 0x28, u32::MAX);
    } else {
        let mut offs = Vec::new();
        for (vname, v) in &n.values {
            let (ty, data): (u32, Vec<u8>) = match v {
                Val::Sz(s) => (
                    1,
                    s.encode_utf16()
                        .chain(std::iter::once(0))
                        .flat_map(|c| c.to_le_bytes())
                        .collect(),
                ),
                Val::Dword(d) => (4, d.to_le_bytes().to_vec()),
            };
            let mut vk = vec![0u8; 0x14 + vname.len()];
            vk[..2].copy_from_slice(b"vk");
            vk[2..4].copy_from_slice(&(vname.len() as u16).to_le_bytes());
            if data.len() <= 4 {
                vk[4..8].copy_from_slice(&(data.len() as u32 | 0x8000_0000).to_le_bytes());
                vk[8..8 + data.len()].copy_from_slice(&data);
            } else {
                let d = cell(bin, &data);
                vk[4..8].copy_from_slice(&(data.len() as u32).to_le_bytes());
                vk[8..12].copy_from_slice(&d.to_le_bytes());
            }
            vk[0xc..0x10].copy_from_slice(&ty.to_le_bytes());
            vk[0x10..0x12].copy_from_slice(&1u16.to_le_bytes());
            vk[0x14..].copy_from_slice(vname.as_bytes());
            offs.push(cell(bin, &vk));
        }
        let list: Vec<u8> = offs.iter().flat_map(|o| o.to_le_bytes()).collect();
        let l = cell(bin, &list);
        put(bin, 0x28, l);
    }
    me
}
