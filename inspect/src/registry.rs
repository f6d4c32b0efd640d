//! A reader of Windows registry hives (regf): the base block, hive bins,
//! key (`nk`) and value (`vk`) cells, subkey lists (`lf`, `lh`, `li`,
//! `ri`). Enough for inspection: walk keys by path, list subkeys, read
//! string and DWORD values. Hives come from guest disks, so every offset
//! and length is checked; a damaged hive gives an error or `None`, never a
//! panic, and walks are bounded (no cycles through crafted offsets).

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum HiveError {
    #[error("not a registry hive: {0}")]
    Bad(String),
}

/// A parsed hive (the bytes stay borrowed).
pub struct Hive<'a> {
    bins: &'a [u8],
    root: u32,
}

/// A key.
#[derive(Clone, Copy)]
pub struct Key<'h, 'a> {
    hive: &'h Hive<'a>,
    cell: &'a [u8],
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// REG_SZ, REG_EXPAND_SZ (UTF-16LE, up to the first NUL).
    Sz(String),
    /// REG_MULTI_SZ.
    MultiSz(Vec<String>),
    Dword(u32),
    Qword(u64),
    /// Anything else: its type and bytes.
    Other(u32, Vec<u8>),
}

impl Value {
    pub fn as_string(&self) -> Option<String> {
        match self {
            Value::Sz(s) => Some(s.clone()),
            Value::MultiSz(v) => Some(v.join(" ")),
            Value::Dword(d) => Some(d.to_string()),
            Value::Qword(d) => Some(d.to_string()),
            Value::Other(..) => None,
        }
    }
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn utf16(b: &[u8]) -> String {
    let u: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&c| c != 0)
        .collect();
    String::from_utf16_lossy(&u)
}

fn name(b: &[u8], ascii: bool) -> String {
    if ascii {
        b.iter().map(|&c| c as char).collect()
    } else {
        utf16(b)
    }
}

const MAX_LIST: usize = 1 << 16;
/// The largest value data decoded (inspection reads names and versions).
const MAX_VALUE: usize = 1 << 20;
/// Data decoded by one `values()` call, in all.
const MAX_VALUES_BYTES: usize = 16 << 20;

impl<'a> Hive<'a> {
    pub fn parse(b: &'a [u8]) -> Result<Hive<'a>, HiveError> {
        if b.len() < 4096 + 32 || &b[..4] != b"regf" {
            return Err(HiveError::Bad("no regf base block".into()));
        }
        let root = u32_at(b, 0x24).ok_or_else(|| HiveError::Bad("short base block".into()))?;
        if &b[4096..4100] != b"hbin" {
            return Err(HiveError::Bad("no hive bin after the base block".into()));
        }
        let declared = u32_at(b, 0x28).unwrap_or(0) as usize;
        let end = if declared > 0 {
            (4096 + declared).min(b.len())
        } else {
            b.len()
        };
        let h = Hive {
            bins: &b[4096..end],
            root,
        };
        let r = h
            .root()
            .ok_or_else(|| HiveError::Bad("the root key cell is not a key".into()))?;
        let _ = r;
        Ok(h)
    }

    /// The data of the cell at `off` (relative to the first bin).
    fn cell(&self, off: u32) -> Option<&'a [u8]> {
        let o = off as usize;
        let size = i32::from_le_bytes(self.bins.get(o..o + 4)?.try_into().ok()?);
        // Allocated cells have a negative size; a free one is not data.
        if size >= 0 {
            return None;
        }
        let len = usize::try_from(-(size as i64)).ok()?;
        if len < 4 {
            return None;
        }
        self.bins.get(o.checked_add(4)?..o.checked_add(len)?)
    }

    fn key_at(&self, off: u32) -> Option<Key<'_, 'a>> {
        let c = self.cell(off)?;
        (c.get(..2)? == b"nk" && c.len() >= 0x4c).then_some(Key {
            hive: self,
            cell: c,
        })
    }

    pub fn root(&self) -> Option<Key<'_, 'a>> {
        self.key_at(self.root)
    }

    /// A key by backslash-separated path from the root, case-insensitive.
    pub fn key(&self, path: &str) -> Option<Key<'_, 'a>> {
        let mut k = self.root()?;
        for part in path.split('\\').filter(|p| !p.is_empty()) {
            k = k.subkey(part)?;
        }
        Some(k)
    }

    /// The offsets a subkey list cell names (following `ri` one level).
    fn list(&self, off: u32, depth: u32, out: &mut Vec<u32>) -> Option<()> {
        let c = self.cell(off)?;
        let n = u16_at(c, 2)? as usize;
        match c.get(..2)? {
            b"lf" | b"lh" => {
                for i in 0..n.min(MAX_LIST) {
                    out.push(u32_at(c, 4 + i * 8)?);
                }
            }
            b"li" => {
                for i in 0..n.min(MAX_LIST) {
                    out.push(u32_at(c, 4 + i * 4)?);
                }
            }
            b"ri" if depth == 0 => {
                for i in 0..n.min(MAX_LIST) {
                    self.list(u32_at(c, 4 + i * 4)?, 1, out)?;
                }
            }
            _ => return None,
        }
        (out.len() <= MAX_LIST).then_some(())
    }
}

impl<'h, 'a> Key<'h, 'a> {
    pub fn name(&self) -> String {
        let len = u16_at(self.cell, 0x48).unwrap_or(0) as usize;
        let ascii = u16_at(self.cell, 2).unwrap_or(0) & 0x20 != 0;
        self.cell
            .get(0x4c..0x4c + len)
            .map(|b| name(b, ascii))
            .unwrap_or_default()
    }

    pub fn subkeys(&self) -> Vec<Key<'h, 'a>> {
        let n = u32_at(self.cell, 0x14).unwrap_or(0);
        if n == 0 {
            return Vec::new();
        }
        let mut offs = Vec::new();
        if self
            .hive
            .list(u32_at(self.cell, 0x1c).unwrap_or(u32::MAX), 0, &mut offs)
            .is_none()
        {
            return Vec::new();
        }
        let mut seen = std::collections::HashSet::new();
        offs.iter()
            .filter(|o| seen.insert(**o))
            .filter_map(|&o| self.hive.key_at(o))
            .collect()
    }

    pub fn subkey(&self, name: &str) -> Option<Key<'h, 'a>> {
        self.subkeys()
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
    }

    /// The value cells of this key, each once (a crafted list can name
    /// one cell many times).
    fn value_cells(&self) -> Vec<&'a [u8]> {
        let n = (u32_at(self.cell, 0x24).unwrap_or(0) as usize).min(MAX_LIST);
        let Some(list) = u32_at(self.cell, 0x28).and_then(|o| self.hive.cell(o)) else {
            return Vec::new();
        };
        let mut seen = std::collections::HashSet::new();
        (0..n)
            .filter_map(|i| u32_at(list, i * 4))
            .filter(|o| seen.insert(*o))
            .filter_map(|o| self.hive.cell(o))
            .filter(|vk| vk.get(..2) == Some(b"vk"))
            .collect()
    }

    fn value_name(vk: &[u8]) -> Option<String> {
        let nlen = u16_at(vk, 2)? as usize;
        let ascii = u16_at(vk, 0x10)? & 1 != 0;
        Some(name(vk.get(0x14..0x14 + nlen)?, ascii))
    }

    /// A value's data, decoded; at most [`MAX_VALUE`] bytes of data.
    fn decode(&self, vk: &[u8]) -> Option<Value> {
        let size = u32_at(vk, 4)?;
        let doff = u32_at(vk, 8)?;
        let ty = u32_at(vk, 0xc)?;
        let data: &[u8] = if size & 0x8000_0000 != 0 {
            let len = (size & 0x7fff_ffff).min(4) as usize;
            vk.get(8..8 + len)?
        } else {
            if size as usize > MAX_VALUE {
                return None;
            }
            // Big data ("db") is not needed for inspection.
            self.hive.cell(doff)?.get(..size as usize)?
        };
        Some(match ty {
            1 | 2 => Value::Sz(utf16(data)),
            7 => Value::MultiSz(
                utf16_all(data)
                    .split('\0')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
            ),
            4 if data.len() >= 4 => Value::Dword(u32_at(data, 0)?),
            11 if data.len() >= 8 => {
                Value::Qword(u64::from_le_bytes(data.get(..8)?.try_into().ok()?))
            }
            t => Value::Other(t, data.to_vec()),
        })
    }

    /// Value names (no data decoded).
    pub fn value_names(&self) -> Vec<String> {
        self.value_cells()
            .into_iter()
            .filter_map(Self::value_name)
            .collect()
    }

    /// Value names and values, decoding at most [`MAX_VALUES_BYTES`] of
    /// data in all.
    pub fn values(&self) -> Vec<(String, Value)> {
        let mut budget = MAX_VALUES_BYTES;
        let mut out = Vec::new();
        for vk in self.value_cells() {
            let (Some(n), Some(v)) = (Self::value_name(vk), self.decode(vk)) else {
                continue;
            };
            let cost = match &v {
                Value::Sz(s) => s.len(),
                Value::MultiSz(m) => m.iter().map(String::len).sum(),
                Value::Other(_, d) => d.len(),
                _ => 8,
            };
            if cost > budget {
                break;
            }
            budget -= cost;
            out.push((n, v));
        }
        out
    }

    /// One value by name (case-insensitive); only its data is decoded.
    pub fn value(&self, want: &str) -> Option<Value> {
        self.value_cells()
            .into_iter()
            .find(|vk| Self::value_name(vk).is_some_and(|n| n.eq_ignore_ascii_case(want)))
            .and_then(|vk| self.decode(vk))
    }
}

fn utf16_all(b: &[u8]) -> String {
    let u: Vec<u16> = b
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regf_write::HiveWriter;

    #[test]
    fn written_hives_read_back() {
        let mut w = HiveWriter::new("ROOT");
        w.set_sz(
            "Microsoft\\Windows NT\\CurrentVersion",
            "ProductName",
            "Windows Server 2019 Standard",
        );
        w.set_dword(
            "Microsoft\\Windows NT\\CurrentVersion",
            "CurrentMajorVersionNumber",
            10,
        );
        w.set_sz(
            "Microsoft\\Windows\\CurrentVersion\\Uninstall\\{A}",
            "DisplayName",
            "Microsoft SQL Server 2019 (64-bit)",
        );
        w.set_sz(
            "Microsoft\\Windows\\CurrentVersion\\Uninstall\\B",
            "DisplayName",
            "7-Zip",
        );
        for i in 0..300 {
            w.set_sz(&format!("Many\\k{i:03}"), "v", "x");
        }
        let b = w.to_bytes();
        let h = Hive::parse(&b).unwrap();
        let cv = h.key("microsoft\\windows nt\\currentversion").unwrap();
        assert_eq!(
            cv.value("productname"),
            Some(Value::Sz("Windows Server 2019 Standard".into()))
        );
        assert_eq!(
            cv.value("CurrentMajorVersionNumber"),
            Some(Value::Dword(10))
        );
        let un = h
            .key("Microsoft\\Windows\\CurrentVersion\\Uninstall")
            .unwrap();
        let names: Vec<String> = un.subkeys().iter().map(|k| k.name()).collect();
        assert_eq!(names, vec!["B", "{A}"]);
        assert_eq!(h.key("Many").unwrap().subkeys().len(), 300);
        assert!(h.key("Nope").is_none());
        // Damage: never a panic.
        for cut in (0..b.len()).step_by(97) {
            if let Ok(h) = Hive::parse(&b[..cut]) {
                let _ = h
                    .key("Microsoft\\Windows NT\\CurrentVersion")
                    .map(|k| k.values());
            }
        }
        let mut bad = b.clone();
        for i in (4096..bad.len()).step_by(13) {
            bad[i] ^= 0x5a;
        }
        if let Ok(h) = Hive::parse(&bad) {
            let _ = h
                .key("Microsoft\\Windows NT\\CurrentVersion")
                .map(|k| k.values());
        }
    }
}
