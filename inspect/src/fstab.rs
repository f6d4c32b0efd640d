//! `/etc/fstab` followed: the filesystems a root mounts where the
//! operating system and applications keep their files (`/usr`, `/var`,
//! `/opt`, `/u01`) are found among the disk's partitions and logical
//! volumes (by `UUID=`, `LABEL=`, `/dev/disk/by-*`, `/dev/mapper/VG-LV`,
//! `/dev/VG/LV` or a partition's device path) and searched as part of the
//! root, so the evidence names the path the guest sees.

use crate::fsview::FsView;
use crate::{Found, MountInfo};

/// Mount points searched with the root: where the detectors look.
const FOLLOWED: &[&str] = &["/usr", "/var", "/opt", "/u01"];
const FSTAB_MAX: u64 = 1 << 20;

/// `(device, mount point)` of the followed entries of an fstab text.
pub fn entries(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.starts_with('#') {
                return None;
            }
            let mut f = l.split_whitespace();
            let (dev, mp) = (f.next()?, f.next()?);
            let mp = mp.trim_end_matches('/');
            FOLLOWED
                .contains(&mp)
                .then(|| (dev.to_string(), mp.to_string()))
        })
        .take(64)
        .collect()
}

/// Which of `found` an fstab device names (`None`: not on this disk, or
/// named in a way that cannot be matched, such as `PARTUUID=`).
pub(crate) fn resolve(dev: &str, found: &[Found]) -> Option<usize> {
    let by = |f: &dyn Fn(&Found) -> bool| found.iter().position(f);
    if let Some(u) = dev
        .strip_prefix("UUID=")
        .or_else(|| dev.strip_prefix("/dev/disk/by-uuid/"))
    {
        let u = u.trim_matches('"').to_ascii_lowercase();
        return by(&|f| f.id.uuid.as_deref() == Some(u.as_str()));
    }
    if let Some(l) = dev
        .strip_prefix("LABEL=")
        .or_else(|| dev.strip_prefix("/dev/disk/by-label/"))
    {
        let l = l.trim_matches('"');
        return by(&|f| f.id.label.as_deref() == Some(l));
    }
    if let Some(m) = dev.strip_prefix("/dev/mapper/") {
        return by(&|f| {
            f.lv.as_deref()
                .and_then(|n| n.split_once('/'))
                .is_some_and(|(vg, lv)| crate::lvm::mapper_name(vg, lv) == m)
        });
    }
    let rest = dev.strip_prefix("/dev/")?;
    if rest.matches('/').count() == 1 {
        return by(&|f| f.lv.as_deref() == Some(rest));
    }
    // sda3, vda3, xvda3, hda3, nvme0n1p3: partition 3 of this disk (the
    // VM's other disks are inspected on their own).
    let n: u32 = if let Some(r) = rest.strip_prefix("nvme") {
        r.rsplit_once('p')?.1.parse().ok()?
    } else {
        let k = rest.find(|c: char| c.is_ascii_digit())?;
        let (disk, num) = rest.split_at(k);
        if disk.is_empty() || !disk.chars().all(|c| c.is_ascii_lowercase()) {
            return None;
        }
        num.parse().ok()?
    };
    by(&|f| f.lv.is_none() && f.part == n)
}

/// A root filesystem with the filesystems its fstab mounts under it.
pub struct Mounted {
    root: Box<dyn FsView>,
    /// (mount point, device as fstab names it, index in `found`, view).
    mounts: Vec<(String, String, usize, Box<dyn FsView>)>,
}

impl Mounted {
    /// Reads the root's fstab and takes the views it mounts out of
    /// `views` (each filesystem is mounted once).
    pub(crate) fn new(
        mut root: Box<dyn FsView>,
        found: &[Found],
        views: &mut [Option<Box<dyn FsView>>],
        me: usize,
    ) -> Mounted {
        let mut mounts = Vec::new();
        if let Some(t) = root.read("/etc/fstab", FSTAB_MAX) {
            for (dev, mp) in entries(&String::from_utf8_lossy(&t)) {
                let Some(i) = resolve(&dev, found).filter(|&i| i != me) else {
                    continue;
                };
                if let Some(v) = views.get_mut(i).and_then(Option::take) {
                    mounts.push((mp, dev, i, v));
                }
            }
        }
        // The longest mount point first: it wins for paths under it.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.0.len()));
        Mounted { root, mounts }
    }

    /// Gives the mounted views back and returns the root's.
    pub(crate) fn unmount(self, views: &mut [Option<Box<dyn FsView>>]) -> Box<dyn FsView> {
        for (_, _, i, v) in self.mounts {
            if let Some(slot) = views.get_mut(i) {
                *slot = Some(v);
            }
        }
        self.root
    }

    pub(crate) fn info(&self, found: &[Found]) -> Vec<MountInfo> {
        let mut v: Vec<MountInfo> = self
            .mounts
            .iter()
            .map(|(mp, dev, i, _)| MountInfo {
                path: mp.clone(),
                device: dev.clone(),
                partition: found[*i].part,
                volume: found[*i].lv.clone(),
            })
            .collect();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        v
    }

    /// The view holding `path` and the path inside it.
    fn route(&mut self, path: &str) -> (&mut dyn FsView, String) {
        for (mp, _, _, v) in self.mounts.iter_mut() {
            if let Some(rest) = path.strip_prefix(mp.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    let inner = if rest.is_empty() { "/" } else { rest };
                    return (v.as_mut(), inner.to_string());
                }
            }
        }
        (self.root.as_mut(), path.to_string())
    }
}

impl FsView for Mounted {
    fn read(&mut self, path: &str, max: u64) -> Option<Vec<u8>> {
        let (v, p) = self.route(path);
        v.read(&p, max)
    }
    fn exists(&mut self, path: &str) -> bool {
        let (v, p) = self.route(path);
        v.exists(&p)
    }
    fn list(&mut self, path: &str) -> Vec<String> {
        let (v, p) = self.route(path);
        v.list(&p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_resolved_by_every_naming() {
        struct Empty;
        impl crate::Disk for Empty {
            fn size(&self) -> u64 {
                0
            }
            fn read_at(&mut self, _: u64, _: &mut [u8]) -> Result<(), String> {
                Err("empty".into())
            }
        }
        let d = crate::Shared::new(Box::new(Empty));
        let f = |part: u32, lv: Option<&str>, uuid: Option<&str>, label: Option<&str>| Found {
            name: String::new(),
            part,
            lv: lv.map(str::to_string),
            d: d.clone(),
            start: 0,
            len: 0,
            id: crate::FsId {
                kind: "ext4".into(),
                uuid: uuid.map(str::to_string),
                label: label.map(str::to_string),
            },
        };
        let found = [
            f(1, None, Some("0a1b"), Some("boot")),
            f(3, None, None, None),
            f(2, Some("rhel-x/var-log"), None, None),
            f(2, Some("vg0/usr"), Some("77ff"), Some("usr")),
        ];
        let r = |dev: &str| resolve(dev, &found);
        assert_eq!(r("UUID=0A1B"), Some(0));
        assert_eq!(r("/dev/disk/by-uuid/77ff"), Some(3));
        assert_eq!(r("LABEL=usr"), Some(3));
        assert_eq!(r("/dev/disk/by-label/boot"), Some(0));
        assert_eq!(r("/dev/mapper/rhel--x-var--log"), Some(2));
        assert_eq!(r("/dev/mapper/rhel-x-var-log"), None);
        assert_eq!(r("/dev/vg0/usr"), Some(3));
        assert_eq!(r("/dev/sda3"), Some(1));
        assert_eq!(r("/dev/vda1"), Some(0));
        assert_eq!(r("/dev/nvme0n1p3"), Some(1));
        assert_eq!(r("/dev/sda2"), None, "partition 2 holds only LVs");
        assert_eq!(r("PARTUUID=1234-01"), None);
        assert_eq!(r("UUID=ffff"), None);
    }

    #[test]
    fn fstab_entries_followed() {
        let t = "# /etc/fstab\nUUID=1234 / xfs defaults 0 0\n/dev/mapper/vg-var /var xfs defaults 0 0\n\
                 LABEL=usr /usr/ ext4 defaults 0 0\n/dev/sdb1 /data ext4 defaults 0 0\n#/dev/x /opt\n";
        assert_eq!(
            entries(t),
            vec![
                ("/dev/mapper/vg-var".to_string(), "/var".to_string()),
                ("LABEL=usr".to_string(), "/usr".to_string())
            ]
        );
    }
}
