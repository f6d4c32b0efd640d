//! LVM2 physical volumes (the RHEL/CentOS/SLES default layout): the PV
//! label (`LABELONE` in one of the first four sectors), the metadata
//! area's header (`mda_header`) and the newest volume group text it
//! points at, parsed by a small bounded parser of LVM's config format.
//! Linear logical volumes (`striped` with one stripe) are mapped to
//! offsets of the disk and read like partitions ([`LvDisk`]). Every
//! number comes from the image and is checked; sizes, nesting and item
//! counts are bounded, so garbage costs little and never panics.

use crate::{Disk, Shared};

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum LvmError {
    #[error("LVM: {0}")]
    Bad(String),
}

fn bad<T>(m: impl Into<String>) -> Result<T, LvmError> {
    Err(LvmError::Bad(m.into()))
}

const SECTOR: u64 = 512;
const LABEL_ID: &[u8; 8] = b"LABELONE";
const LABEL_TYPE: &[u8; 8] = b"LVM2 001";
const MDA_MAGIC: &[u8; 16] = b" LVM2 x[5A%r0N*>";
/// LVM's CRC-32 seed (`INITIAL_CRC` in lvm2's lib/misc/crc.c).
const INITIAL_CRC: u32 = 0xf597a6cf;
/// The largest metadata text read (LVM's default area is 1 MiB; big
/// installations raise it, rarely past a few MiB).
const MAX_TEXT: u64 = 16 << 20;
/// Nesting, values and list items the parser accepts.
const MAX_DEPTH: usize = 16;
const MAX_ITEMS: usize = 1 << 20;
/// Segments one disk's LVs may have in all.
const MAX_SEGMENTS: usize = 1 << 16;

fn le32(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}
fn le64(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// LVM's CRC-32 (the IEEE polynomial, its own seed, no final inversion).
pub fn crc(mut c: u32, data: &[u8]) -> u32 {
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = (c >> 1) ^ (0xEDB8_8320 & (c & 1).wrapping_neg());
        }
    }
    c
}

/// Whether a PV label is in the first four sectors of `head` (at least
/// 2 KiB read from the start of a partition).
pub fn is_pv(head: &[u8]) -> bool {
    (0..4).any(|s| {
        let o = s * SECTOR as usize;
        head.get(o..o + 8) == Some(LABEL_ID) && head.get(o + 24..o + 32) == Some(LABEL_TYPE)
    })
}

/// A physical volume found on the disk.
#[derive(Debug, Clone)]
pub struct Pv {
    /// Its UUID without dashes.
    pub uuid: String,
    /// Where it starts on the disk and how long the container is.
    pub start: u64,
    pub len: u64,
    /// The newest volume group text its metadata areas hold, if any.
    pub vg: Option<Result<Vg, LvmError>>,
}

/// Reads the PV at `start` (a partition or the whole disk).
pub fn read_pv(d: &Shared, start: u64, len: u64) -> Result<Pv, LvmError> {
    let mut head = vec![0u8; 4 * SECTOR as usize];
    if len < 4 * SECTOR || d.read_at(start, &mut head).is_err() {
        return bad("cannot read the PV label");
    }
    let s = (0..4usize)
        .find(|s| head[s * 512..s * 512 + 8] == *LABEL_ID)
        .ok_or_else(|| LvmError::Bad("no PV label".into()))?;
    let l = &head[s * 512..(s + 1) * 512];
    if le64(l, 8) != s as u64 {
        return bad("PV label names another sector than its own");
    }
    if crc(INITIAL_CRC, &l[20..]) != le32(l, 16) {
        return bad("PV label checksum mismatch (damaged label)");
    }
    if &l[24..32] != LABEL_TYPE {
        return bad("PV label is not LVM2 001");
    }
    let off = le32(l, 20) as usize;
    // pv_header: uuid[32], device_size, then (offset, size) lists of data
    // areas and metadata areas, each ended by a zero pair.
    let h = l
        .get(off..)
        .filter(|h| h.len() >= 40)
        .ok_or_else(|| LvmError::Bad("PV header outside its label sector".into()))?;
    let uuid = String::from_utf8_lossy(&h[..32]).into_owned();
    let mut pos = 40;
    let mut lists: [Vec<(u64, u64)>; 2] = [Vec::new(), Vec::new()];
    for list in lists.iter_mut() {
        loop {
            if pos + 16 > h.len() {
                return bad("PV header's area lists run past the label sector");
            }
            let (o, z) = (le64(h, pos), le64(h, pos + 8));
            pos += 16;
            if o == 0 && z == 0 {
                break;
            }
            list.push((o, z));
        }
    }
    let mut newest: Option<Result<Vg, LvmError>> = None;
    for &(o, z) in &lists[1] {
        let r = read_mda(d, start, len, o, z);
        newest = match (newest, r) {
            (Some(Ok(a)), Ok(b)) => Some(Ok(if b.seqno > a.seqno { b } else { a })),
            (Some(Ok(a)), Err(_)) => Some(Ok(a)),
            (_, r) => Some(r),
        };
    }
    Ok(Pv {
        uuid,
        start,
        len,
        vg: newest,
    })
}

/// The VG text a metadata area's first raw location points at.
fn read_mda(d: &Shared, start: u64, len: u64, off: u64, size: u64) -> Result<Vg, LvmError> {
    if off.checked_add(size).is_none_or(|e| e > len) || size < SECTOR * 2 {
        return bad("metadata area outside the PV");
    }
    let mut h = vec![0u8; SECTOR as usize];
    d.read_at(start + off, &mut h)
        .map_err(|e| LvmError::Bad(format!("metadata area header: {e}")))?;
    if &h[4..20] != MDA_MAGIC {
        return bad("metadata area header magic is wrong (damaged metadata)");
    }
    if crc(INITIAL_CRC, &h[4..]) != le32(&h, 0) {
        return bad("metadata area header checksum mismatch (damaged metadata)");
    }
    // raw_locn: offset (from the area's start), size, checksum, flags.
    let (roff, rsize, rcrc, rflags) = (le64(&h, 40), le64(&h, 48), le32(&h, 56), le32(&h, 60));
    if rflags & 1 != 0 || rsize == 0 {
        return bad("metadata area holds no metadata");
    }
    // The text sits in a ring after the 512-byte header and may wrap.
    if rsize > MAX_TEXT || rsize > size - SECTOR || roff < SECTOR || roff >= size {
        return bad("metadata location out of its area");
    }
    let mut text = vec![0u8; rsize as usize];
    let first = rsize.min(size - roff) as usize;
    let rd = |o: u64, b: &mut [u8]| {
        d.read_at(start + off + o, b)
            .map_err(|e| LvmError::Bad(format!("metadata text: {e}")))
    };
    rd(roff, &mut text[..first])?;
    if first < text.len() {
        rd(SECTOR, &mut text[first..])?;
    }
    if crc(INITIAL_CRC, &text) != rcrc {
        return bad("metadata text checksum mismatch (damaged metadata)");
    }
    vg_from_text(&text)
}

/// A volume group from its metadata text (what a metadata area holds).
pub fn vg_from_text(text: &[u8]) -> Result<Vg, LvmError> {
    Vg::from_config(&parse(text)?)
}

/// A value of LVM's config text.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Str(String),
    List(Vec<Value>),
    Section(Vec<(String, Value)>),
}

impl Value {
    fn get(&self, k: &str) -> Option<&Value> {
        match self {
            Value::Section(s) => s.iter().find(|(n, _)| n == k).map(|(_, v)| v),
            _ => None,
        }
    }
    fn int(&self, k: &str) -> Option<i64> {
        match self.get(k)? {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    fn str(&self, k: &str) -> Option<&str> {
        match self.get(k)? {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    fn entries(&self) -> &[(String, Value)] {
        match self {
            Value::Section(s) => s,
            _ => &[],
        }
    }
}

struct Parser<'a> {
    b: &'a [u8],
    p: usize,
    items: usize,
}

/// Parses LVM's config text (`name = value`, `name { ... }`, lists in
/// brackets, `#` comments) into a section.
pub fn parse(text: &[u8]) -> Result<Value, LvmError> {
    let mut p = Parser {
        b: text,
        p: 0,
        items: 0,
    };
    let v = p.section(0)?;
    p.skip();
    if p.p < p.b.len() {
        return bad(format!(
            "metadata text: unexpected '{}' at byte {}",
            p.b[p.p] as char, p.p
        ));
    }
    Ok(v)
}

impl Parser<'_> {
    fn skip(&mut self) {
        while let Some(&c) = self.b.get(self.p) {
            if c == b'#' {
                while self.b.get(self.p).is_some_and(|&c| c != b'\n') {
                    self.p += 1;
                }
            } else if c.is_ascii_whitespace() || c == 0 {
                self.p += 1;
            } else {
                break;
            }
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip();
        self.b.get(self.p).copied()
    }
    fn err<T>(&self, what: &str) -> Result<T, LvmError> {
        bad(format!("metadata text: {what} at byte {}", self.p))
    }
    fn count(&mut self) -> Result<(), LvmError> {
        self.items += 1;
        if self.items > MAX_ITEMS {
            return self.err("too many items");
        }
        Ok(())
    }
    fn ident(&mut self) -> Result<String, LvmError> {
        let s = self.p;
        while self
            .b
            .get(self.p)
            .is_some_and(|&c| c.is_ascii_alphanumeric() || b"_.+-".contains(&c))
        {
            self.p += 1;
        }
        if s == self.p {
            return self.err("a name expected");
        }
        Ok(String::from_utf8_lossy(&self.b[s..self.p]).into_owned())
    }
    /// Entries until `}` (nested) or the end of the text (top level).
    fn section(&mut self, depth: usize) -> Result<Value, LvmError> {
        if depth > MAX_DEPTH {
            return self.err("sections nested too deep");
        }
        let mut out = Vec::new();
        loop {
            match self.peek() {
                None if depth == 0 => break,
                None => return self.err("unterminated section"),
                Some(b'}') if depth > 0 => {
                    self.p += 1;
                    break;
                }
                Some(_) => {}
            }
            self.count()?;
            let name = self.ident()?;
            match self.peek() {
                Some(b'{') => {
                    self.p += 1;
                    let v = self.section(depth + 1)?;
                    out.push((name, v));
                }
                Some(b'=') => {
                    self.p += 1;
                    let v = self.value()?;
                    out.push((name, v));
                }
                _ => return self.err("'=' or '{' expected"),
            }
        }
        Ok(Value::Section(out))
    }
    fn value(&mut self) -> Result<Value, LvmError> {
        match self.peek() {
            Some(b'"') => self.string(),
            Some(b'[') => {
                self.p += 1;
                let mut items = Vec::new();
                loop {
                    match self.peek() {
                        Some(b']') => {
                            self.p += 1;
                            break;
                        }
                        Some(b',') if !items.is_empty() => self.p += 1,
                        None => return self.err("unterminated list"),
                        _ => {}
                    }
                    if self.peek() == Some(b']') {
                        continue;
                    }
                    self.count()?;
                    if self.peek() == Some(b'[') {
                        return self.err("nested list");
                    }
                    items.push(self.value()?);
                }
                Ok(Value::List(items))
            }
            Some(c) if c == b'-' || c.is_ascii_digit() => {
                let s = self.p;
                self.p += 1;
                while self
                    .b
                    .get(self.p)
                    .is_some_and(|c| c.is_ascii_digit() || *c == b'.')
                {
                    self.p += 1;
                }
                let t = String::from_utf8_lossy(&self.b[s..self.p]).into_owned();
                // Floats appear only in settings inspection ignores.
                match t.parse::<i64>() {
                    Ok(i) => Ok(Value::Int(i)),
                    Err(_) if t.parse::<f64>().is_ok() => Ok(Value::Str(t)),
                    Err(_) => self.err("bad number"),
                }
            }
            _ => self.err("a value expected"),
        }
    }
    fn string(&mut self) -> Result<Value, LvmError> {
        self.p += 1;
        let mut s = Vec::new();
        loop {
            match self.b.get(self.p) {
                None => return self.err("unterminated string"),
                Some(b'"') => {
                    self.p += 1;
                    break;
                }
                Some(b'\\') => {
                    let c = *self.b.get(self.p + 1).ok_or_else(|| {
                        LvmError::Bad("metadata text: unterminated string".into())
                    })?;
                    s.push(c);
                    self.p += 2;
                }
                Some(&c) => {
                    s.push(c);
                    self.p += 1;
                }
            }
        }
        Ok(Value::Str(String::from_utf8_lossy(&s).into_owned()))
    }
}

/// A volume group as its metadata describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Vg {
    pub name: String,
    pub seqno: i64,
    /// Bytes per extent.
    pub extent: u64,
    /// Metadata name ("pv0") → (UUID without dashes, first extent's byte
    /// offset in the PV).
    pub pvs: Vec<(String, String, u64)>,
    pub lvs: Vec<Lv>,
}

/// A logical volume: its segments, or why it cannot be read here.
#[derive(Debug, Clone, PartialEq)]
pub struct Lv {
    pub name: String,
    pub size: u64,
    pub segments: Result<Vec<Seg>, String>,
}

/// One linear piece: LV bytes `[start, start+len)` are PV `pv`'s bytes
/// from `pv_off` (relative to the PV's start).
#[derive(Debug, Clone, PartialEq)]
pub struct Seg {
    pub start: u64,
    pub len: u64,
    pub pv: String,
    pub pv_off: u64,
}

impl Vg {
    fn from_config(top: &Value) -> Result<Vg, LvmError> {
        let (name, vg) = top
            .entries()
            .iter()
            .find(|(_, v)| matches!(v, Value::Section(_)))
            .ok_or_else(|| LvmError::Bad("metadata text holds no volume group".into()))?;
        let num = |v: &Value, k: &str, what: &str| -> Result<u64, LvmError> {
            v.int(k)
                .and_then(|i| u64::try_from(i).ok())
                .ok_or_else(|| LvmError::Bad(format!("VG {name}: {what} without a valid {k}")))
        };
        let extent = num(vg, "extent_size", "the VG")?
            .checked_mul(SECTOR)
            .filter(|&e| e > 0)
            .ok_or_else(|| LvmError::Bad(format!("VG {name}: bad extent_size")))?;
        let mut pvs = Vec::new();
        for (pn, p) in vg
            .get("physical_volumes")
            .map(Value::entries)
            .unwrap_or(&[])
        {
            let id = p.str("id").unwrap_or("").replace('-', "");
            let pe_start = num(p, "pe_start", &format!("PV {pn}"))?
                .checked_mul(SECTOR)
                .ok_or_else(|| LvmError::Bad(format!("VG {name}: PV {pn}: bad pe_start")))?;
            pvs.push((pn.clone(), id, pe_start));
        }
        let mut lvs = Vec::new();
        let mut nseg = 0usize;
        for (ln, l) in vg.get("logical_volumes").map(Value::entries).unwrap_or(&[]) {
            let visible = matches!(l.get("status"), Some(Value::List(s)) if s.contains(&Value::Str("VISIBLE".into())));
            if !visible {
                // Pieces of other LVs (thin pools' data, RAID images).
                continue;
            }
            let mut segs = Vec::new();
            let mut why = None;
            // The size the metadata gives, also for LVs not read here.
            let mut size = 0u64;
            for (sn, s) in l
                .entries()
                .iter()
                .filter(|(_, v)| matches!(v, Value::Section(_)))
            {
                nseg += 1;
                if nseg > MAX_SEGMENTS {
                    return bad(format!("VG {name}: too many segments"));
                }
                let n = |k| s.int(k).and_then(|i| u64::try_from(i).ok()).unwrap_or(0);
                let end = n("start_extent")
                    .saturating_add(n("extent_count"))
                    .saturating_mul(extent);
                size = size.max(end);
                if why.is_some() {
                    continue;
                }
                match seg(s, extent) {
                    Ok(sg) => segs.push(sg),
                    Err(e) => why = Some(format!("{sn}: {e}")),
                }
            }
            segs.sort_by_key(|s| s.start);
            let mut end = 0u64;
            for s in &segs {
                if s.start != end {
                    why.get_or_insert_with(|| "its segments leave a hole".into());
                }
                end = s.start.saturating_add(s.len);
            }
            if segs.is_empty() {
                why.get_or_insert_with(|| "no segments".into());
            }
            lvs.push(Lv {
                name: ln.clone(),
                size,
                segments: match why {
                    Some(w) => Err(w),
                    None => Ok(segs),
                },
            });
        }
        Ok(Vg {
            name: name.clone(),
            seqno: vg.int("seqno").unwrap_or(0),
            extent,
            pvs,
            lvs,
        })
    }
}

fn seg(s: &Value, extent: u64) -> Result<Seg, String> {
    let ty = s.str("type").unwrap_or("?");
    let stripes = s.int("stripe_count").unwrap_or(1);
    if !(ty == "striped" || ty == "linear") || stripes != 1 {
        let what = if ty == "striped" {
            format!("striped over {stripes} PVs")
        } else {
            ty.to_string()
        };
        return Err(format!(
            "segment type {what} is not supported (linear only)"
        ));
    }
    let n = |k: &str| {
        s.int(k)
            .and_then(|i| u64::try_from(i).ok())
            .and_then(|i| i.checked_mul(extent))
            .ok_or_else(|| format!("bad {k}"))
    };
    let (start, len) = (n("start_extent")?, n("extent_count")?);
    let (pv, at) = match s.get("stripes") {
        Some(Value::List(l)) if l.len() == 2 => match (&l[0], &l[1]) {
            (Value::Str(p), Value::Int(e)) => (p.clone(), *e),
            _ => return Err("bad stripes".into()),
        },
        _ => return Err("bad stripes".into()),
    };
    let pv_off = u64::try_from(at)
        .ok()
        .and_then(|e| e.checked_mul(extent))
        .ok_or("bad stripe offset")?;
    if start.checked_add(len).is_none() || len == 0 {
        return Err("bad extent range".into());
    }
    Ok(Seg {
        start,
        len,
        pv,
        pv_off,
    })
}

/// An LV as a disk: reads go to its segments' places on the disk.
pub struct LvDisk {
    d: Shared,
    size: u64,
    /// (LV offset, length, disk offset), sorted and contiguous.
    map: Vec<(u64, u64, u64)>,
}

impl LvDisk {
    /// Maps `lv`'s segments through the PVs found on this disk (`pvs`:
    /// UUID → (start, length) on the disk).
    pub fn new(d: Shared, vg: &Vg, lv: &Lv, pvs: &[(String, u64, u64)]) -> Result<LvDisk, String> {
        let segs = lv.segments.as_ref().map_err(|e| e.clone())?;
        let mut map = Vec::new();
        for s in segs {
            let (_, uuid, pe_start) = vg
                .pvs
                .iter()
                .find(|(n, _, _)| *n == s.pv)
                .ok_or_else(|| format!("segment on {} which the VG does not list", s.pv))?;
            let (start, len) = pvs
                .iter()
                .find(|(u, _, _)| u == uuid)
                .map(|(_, a, b)| (*a, *b))
                .ok_or_else(|| format!("PV {} ({uuid}) is not on this disk", s.pv))?;
            let off = pe_start
                .checked_add(s.pv_off)
                .filter(|o| o.checked_add(s.len).is_some_and(|e| e <= len))
                .ok_or_else(|| format!("a segment runs past the end of PV {}", s.pv))?;
            map.push((s.start, s.len, start + off));
        }
        Ok(LvDisk {
            d,
            size: lv.size,
            map,
        })
    }
}

impl Disk for LvDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, mut off: u64, mut buf: &mut [u8]) -> Result<(), String> {
        while !buf.is_empty() {
            let i = self.map.partition_point(|&(s, l, _)| s + l <= off);
            let &(s, l, at) = self
                .map
                .get(i)
                .filter(|(s, _, _)| *s <= off)
                .ok_or_else(|| format!("read past the end of the LV at {off}"))?;
            let n = ((s + l - off) as usize).min(buf.len());
            let (now, rest) = buf.split_at_mut(n);
            self.d.read_at(at + (off - s), now)?;
            off += n as u64;
            buf = rest;
        }
        Ok(())
    }
}

/// The name a mapped LV is known by (`/dev/mapper/VG-LV` doubles dashes).
pub fn mapper_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"vg0 {
id = "abc"
seqno = 4
format = "lvm2" # informational
status = ["RESIZEABLE", "READ", "WRITE"]
flags = []
extent_size = 8192
physical_volumes {
pv0 {
id = "aaaaaa-bbbb-cccc-dddd-eeee-ffff-gggggg"
device = "/dev/sda2"
pe_start = 2048
pe_count = 100
}
}
logical_volumes {
root {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment1 {
start_extent = 0
extent_count = 10
type = "striped"
stripe_count = 1
stripes = [
"pv0", 5
]
}
segment2 {
start_extent = 10
extent_count = 2
type = "striped"
stripe_count = 1
stripes = ["pv0", 50]
}
}
thin {
status = ["READ", "WRITE", "VISIBLE"]
segment1 {
start_extent = 0
extent_count = 10
type = "thin"
}
}
}
}
contents = "Text Format Volume Group"
version = 1
description = "a \"quoted\" word"
"#;

    #[test]
    fn parses_a_vg_and_maps_linear_segments() {
        let v = parse(TEXT.as_bytes()).unwrap();
        assert_eq!(v.str("description"), Some("a \"quoted\" word"));
        let vg = Vg::from_config(&v).unwrap();
        assert_eq!(vg.name, "vg0");
        assert_eq!(vg.seqno, 4);
        assert_eq!(vg.extent, 4 << 20);
        assert_eq!(
            vg.pvs,
            vec![(
                "pv0".into(),
                "aaaaaabbbbccccddddeeeeffffgggggg".into(),
                1 << 20
            )]
        );
        let root = &vg.lvs[0];
        assert_eq!(root.size, 12 * (4 << 20));
        let segs = root.segments.as_ref().unwrap();
        assert_eq!(segs[1].pv_off, 50 * (4 << 20));
        assert_eq!(vg.lvs[1].size, 10 * (4 << 20));
        assert!(vg.lvs[1]
            .segments
            .as_ref()
            .unwrap_err()
            .contains("thin is not supported"));
        let mut img = vec![0u8; 1024 << 20];
        let pv_start = 1 << 20;
        img[pv_start + (1 << 20) + 5 * (4 << 20)] = 7; // LV byte 0
        img[pv_start + (1 << 20) + 50 * (4 << 20)] = 9; // LV byte 10 extents in
        let d = Shared::new(Box::new(crate::MemDisk(img)));
        let pvs = [(vg.pvs[0].1.clone(), pv_start as u64, 900 << 20)];
        let mut lv = LvDisk::new(d.clone(), &vg, root, &pvs).unwrap();
        let mut b = [0u8; 1];
        lv.read_at(0, &mut b).unwrap();
        assert_eq!(b[0], 7);
        lv.read_at(10 * (4 << 20), &mut b).unwrap();
        assert_eq!(b[0], 9);
        let mut two = [0u8; 2];
        lv.read_at(10 * (4 << 20) - 1, &mut two).unwrap();
        assert_eq!(two, [0, 9]);
        assert!(lv.read_at(12 * (4 << 20), &mut b).is_err());
        let missing = LvDisk::new(d, &vg, root, &[]).err().unwrap();
        assert!(missing.contains("not on this disk"), "{missing}");
    }

    /// The head of a PV made by pvcreate/vgcreate/lvcreate (lvm2 2.03;
    /// 1 MiB extents, root extended after var was made): label, metadata
    /// area and text through their checksums.
    #[test]
    fn reads_a_real_pv() {
        let head: &'static [u8] = include_bytes!("../../fuzz/seeds/lvm_metadata/pv-head");
        let d = Shared::new(Box::new(crate::MemDisk(head.to_vec())));
        let pv = read_pv(&d, 0, head.len() as u64).unwrap();
        let vg = pv.vg.unwrap().unwrap();
        assert_eq!(
            (vg.name.as_str(), vg.seqno, vg.extent),
            ("seedvg", 4, 1 << 20)
        );
        assert_eq!(vg.pvs[0].1, pv.uuid);
        assert_eq!(vg.pvs[0].2, 128 << 10);
        let segs = |i: usize| -> Vec<(u64, u64, u64)> {
            vg.lvs[i]
                .segments
                .as_ref()
                .unwrap()
                .iter()
                .map(|s| (s.start >> 20, s.len >> 20, s.pv_off >> 20))
                .collect()
        };
        assert_eq!(vg.lvs[0].name, "root");
        assert_eq!(segs(0), vec![(0, 4, 0), (4, 2, 6)]);
        assert_eq!(vg.lvs[1].name, "var");
        assert_eq!(segs(1), vec![(0, 2, 4)]);
        // One changed byte of the text: its checksum says so.
        let mut bad_text = head.to_vec();
        let at = bad_text.windows(6).rposition(|w| w == b"seedvg").unwrap();
        bad_text[at] = b'S';
        let d = Shared::new(Box::new(crate::MemDisk(bad_text)));
        let e = read_pv(&d, 0, head.len() as u64)
            .unwrap()
            .vg
            .unwrap()
            .unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for t in [
            &b"vg {"[..],
            b"a = [1, [2]]",
            b"a = \"x",
            b"= 1",
            b"a = --",
            b"a { b { c { d { e { f { g { h { i { j { k { l { m { n { o { p { q { r {",
        ] {
            assert!(parse(t).is_err(), "{}", String::from_utf8_lossy(t));
        }
        assert!(Vg::from_config(&parse(b"a = 1").unwrap()).is_err());
        assert!(Vg::from_config(&parse(b"vg { extent_size = -1 }").unwrap()).is_err());
    }
}
