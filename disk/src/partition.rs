//! MBR (with extended partitions) and GPT partition tables, read from any
//! byte source. Only what recovery needs: where each partition starts and
//! how long it is.

use serde::Serialize;

/// One partition.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as Linux numbers them (logical MBR partitions from 5).
    pub number: u32,
    pub start: u64,
    pub len: u64,
    /// `mbr:0x83`, `gpt:<type guid>`.
    pub kind: String,
    pub bootable: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PartError {
    #[error("I/O error reading the partition table: {0}")]
    Io(String),
    #[error("bad partition table: {0}")]
    Bad(String),
}

const SECTOR: u64 = 512;

/// Reads `dst.len()` bytes at a byte offset of the disk.
pub type ReadAt<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> Result<(), String>;

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

fn guid(b: &[u8]) -> String {
    format!(
        "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10..16]
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

/// Reads the partition table of a disk of `size` bytes. An empty list
/// means no table (a filesystem on the whole disk, or a blank disk).
pub fn read_table(read: ReadAt<'_>, size: u64) -> Result<Vec<Partition>, PartError> {
    if size < SECTOR {
        return Ok(Vec::new());
    }
    let mut mbr = vec![0u8; SECTOR as usize];
    read(0, &mut mbr).map_err(PartError::Io)?;
    if mbr[510] != 0x55 || mbr[511] != 0xaa {
        return Ok(Vec::new());
    }
    let entry = |i: usize| &mbr[446 + 16 * i..446 + 16 * (i + 1)];
    // A FAT/NTFS boot sector also ends in 55AA: its "entries" are code.
    // Real tables have status 0x00 or 0x80 only.
    if (0..4).any(|i| entry(i)[0] != 0 && entry(i)[0] != 0x80) {
        return Ok(Vec::new());
    }
    if (0..4).any(|i| entry(i)[4] == 0xee) {
        return read_gpt(read, size);
    }
    let mut out = Vec::new();
    let check = |start: u64, len: u64, what: &str| {
        if len == 0 || start.checked_add(len).is_none_or(|e| e > size) {
            Err(PartError::Bad(format!(
                "{what} at byte {start} of {len} bytes lies outside the {size}-byte disk"
            )))
        } else {
            Ok(())
        }
    };
    for i in 0..4 {
        let e = entry(i).to_vec();
        let kind = e[4];
        if kind == 0 {
            continue;
        }
        let start = le32(&e, 8) as u64 * SECTOR;
        let len = le32(&e, 12) as u64 * SECTOR;
        check(start, len, &format!("MBR partition {}", i + 1))?;
        if matches!(kind, 0x05 | 0x0f | 0x85) {
            // Extended: a chain of EBRs, each with one logical partition.
            let mut ebr_at = start;
            let mut number = 5;
            for _ in 0..128 {
                let mut ebr = vec![0u8; SECTOR as usize];
                read(ebr_at, &mut ebr).map_err(PartError::Io)?;
                if ebr[510] != 0x55 || ebr[511] != 0xaa {
                    return Err(PartError::Bad(format!("no EBR signature at byte {ebr_at}")));
                }
                let l = &ebr[446..462];
                if l[4] != 0 {
                    let ls = ebr_at + le32(l, 8) as u64 * SECTOR;
                    let ll = le32(l, 12) as u64 * SECTOR;
                    check(ls, ll, &format!("logical partition {number}"))?;
                    out.push(Partition {
                        number,
                        start: ls,
                        len: ll,
                        kind: format!("mbr:0x{:02x}", l[4]),
                        bootable: l[0] == 0x80,
                    });
                    number += 1;
                }
                let next = &ebr[462..478];
                if next[4] == 0 {
                    break;
                }
                ebr_at = start + le32(next, 8) as u64 * SECTOR;
            }
            continue;
        }
        out.push(Partition {
            number: i as u32 + 1,
            start,
            len,
            kind: format!("mbr:0x{kind:02x}"),
            bootable: e[0] == 0x80,
        });
    }
    Ok(out)
}

fn read_gpt(read: ReadAt<'_>, size: u64) -> Result<Vec<Partition>, PartError> {
    let mut h = vec![0u8; SECTOR as usize];
    read(SECTOR, &mut h).map_err(PartError::Io)?;
    if &h[0..8] != b"EFI PART" {
        return Err(PartError::Bad(
            "protective MBR but no GPT header at LBA 1".into(),
        ));
    }
    let entries_lba = le64(&h, 72);
    let count = le32(&h, 80) as u64;
    let esize = le32(&h, 84) as u64;
    if !(128..=4096).contains(&esize) || count > 1024 || entries_lba.saturating_mul(SECTOR) >= size
    {
        return Err(PartError::Bad(format!(
            "GPT header: {count} entries of {esize} bytes at LBA {entries_lba}"
        )));
    }
    let mut t = vec![0u8; (count * esize) as usize];
    read(entries_lba * SECTOR, &mut t).map_err(PartError::Io)?;
    let mut out = Vec::new();
    for i in 0..count as usize {
        let e = &t[i * esize as usize..(i + 1) * esize as usize];
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        let start = first.saturating_mul(SECTOR);
        let end = last.saturating_add(1).saturating_mul(SECTOR);
        if last < first || end > size {
            return Err(PartError::Bad(format!(
                "GPT partition {} spans LBA {first}..{last}, outside the disk",
                i + 1
            )));
        }
        out.push(Partition {
            number: i as u32 + 1,
            start,
            len: end - start,
            kind: format!("gpt:{}", guid(&e[0..16])),
            bootable: le64(e, 48) & 4 != 0,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(img: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<(), String> + '_ {
        move |off, dst| {
            let o = off as usize;
            img.get(o..o + dst.len())
                .map(|s| dst.copy_from_slice(s))
                .ok_or_else(|| "short".to_string())
        }
    }

    #[test]
    fn mbr_primary_and_logical() {
        let mut img = vec![0u8; 8 << 20];
        img[510] = 0x55;
        img[511] = 0xaa;
        let put = |img: &mut Vec<u8>, at: usize, boot: u8, kind: u8, lba: u32, n: u32| {
            img[at] = boot;
            img[at + 4] = kind;
            img[at + 8..at + 12].copy_from_slice(&lba.to_le_bytes());
            img[at + 12..at + 16].copy_from_slice(&n.to_le_bytes());
        };
        put(&mut img, 446, 0x80, 0x83, 2048, 4096);
        put(&mut img, 462, 0, 0x05, 8192, 8192);
        // EBR at sector 8192: logical at +2048 for 2048 sectors.
        let ebr = 8192 * 512;
        img[ebr + 510] = 0x55;
        img[ebr + 511] = 0xaa;
        put(&mut img, ebr + 446, 0, 0x83, 2048, 2048);
        let p = read_table(&mut reader(&img), img.len() as u64).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].number, p[0].start, p[0].len, p[0].bootable),
            (1, 1 << 20, 2 << 20, true)
        );
        assert_eq!((p[1].number, p[1].start), (5, (8192 + 2048) * 512));
        // A partition past the end is an error, not a panic.
        put(&mut img, 478, 0, 0x83, 100_000, 100_000);
        assert!(matches!(
            read_table(&mut reader(&img), img.len() as u64),
            Err(PartError::Bad(_))
        ));
    }

    #[test]
    fn no_table_and_garbage() {
        let img = vec![0u8; 4096];
        assert!(read_table(&mut reader(&img), 4096).unwrap().is_empty());
        let mut g = vec![0x41u8; 4096];
        g[510] = 0x55;
        g[511] = 0xaa;
        // Boot code in the entries: treated as no table.
        assert!(read_table(&mut reader(&g), 4096).unwrap().is_empty());
        // Protective MBR without a GPT header.
        let mut p = vec![0u8; 4096];
        p[510] = 0x55;
        p[511] = 0xaa;
        p[446 + 4] = 0xee;
        assert!(matches!(
            read_table(&mut reader(&p), 4096),
            Err(PartError::Bad(_))
        ));
    }
}
