//! Categories (the method's step 1 and its claim 2): by operating system
//! (family, then distribution and version), by application (a VM can be
//! in several), by a keyword in the name, by storage path, by resource
//! pool; and the regrouped tree of VMs (step 4).

use serde::{Deserialize, Serialize};

use crate::inventory::Vm;
use crate::Inspection;

/// A VM with what inspection found on its disks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Classified {
    pub vm: Vm,
    /// One per disk, in order.
    pub inspections: Vec<Inspection>,
}

impl Classified {
    /// The first disk that holds an operating system.
    pub fn os(&self) -> Option<&crate::Os> {
        self.inspections.iter().find_map(|i| i.os.as_ref())
    }

    pub fn apps(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inspections
            .iter()
            .flat_map(|i| i.apps.iter().map(|a| a.name.clone()))
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// What to group by.
#[derive(Clone, Debug, PartialEq)]
pub enum By {
    Os,
    App,
    Keyword(String),
    Path,
    Pool,
}

impl By {
    pub fn parse(s: &str) -> Result<By, String> {
        match s {
            "os" => Ok(By::Os),
            "app" => Ok(By::App),
            "path" => Ok(By::Path),
            "pool" => Ok(By::Pool),
            _ => match s.strip_prefix("keyword:") {
                Some(w) if !w.is_empty() => Ok(By::Keyword(w.to_string())),
                _ => Err(format!(
                    "{s:?}: group by os, app, keyword:WORD, path or pool"
                )),
            },
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Group {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Group>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<String>,
}

fn family(f: &str) -> String {
    match f {
        "linux" => "Linux",
        "windows" => "Windows",
        "unix" => "Unix",
        _ => "Unknown",
    }
    .to_string()
}

fn os_leaf(c: &Classified) -> (String, String) {
    match c.os() {
        Some(o) => (
            family(&o.family),
            if o.family == "windows" {
                o.product_name.clone()
            } else {
                format!("{} {}", o.distro, o.version).trim().to_string()
            },
        ),
        None => ("Unknown".into(), String::new()),
    }
}

/// The category names a VM belongs to under `by` (several for apps).
pub fn labels(c: &Classified, by: &By) -> Vec<String> {
    match by {
        By::Os => {
            let (f, l) = os_leaf(c);
            vec![if l.is_empty() { f } else { format!("{f}/{l}") }]
        }
        By::App => {
            let a = c.apps();
            if a.is_empty() {
                vec!["(no application)".into()]
            } else {
                a
            }
        }
        By::Keyword(w) => vec![if c.vm.name.to_lowercase().contains(&w.to_lowercase()) {
            format!("name contains {w}")
        } else {
            format!("name without {w}")
        }],
        By::Path => vec![if c.vm.storage_path.is_empty() {
            "(none)".into()
        } else {
            c.vm.storage_path.clone()
        }],
        By::Pool => vec![if c.vm.pool.is_empty() {
            "(none)".into()
        } else {
            c.vm.pool.clone()
        }],
    }
}

/// The regrouped tree; groups and VMs sorted by name.
pub fn tree(vms: &[Classified], by: &By) -> Vec<Group> {
    let mut top: Vec<Group> = Vec::new();
    for c in vms {
        for label in labels(c, by) {
            // Only OS labels are two levels (FAMILY/DISTRO VERSION); paths
            // and pools keep their slashes.
            let (first, second) = match (by, label.split_once('/')) {
                (By::Os, Some((f, l))) => (f.to_string(), Some(l.to_string())),
                _ => (label.clone(), None),
            };
            let g = match top.iter_mut().position(|g| g.name == first) {
                Some(i) => &mut top[i],
                None => {
                    top.push(Group {
                        name: first.clone(),
                        groups: vec![],
                        vms: vec![],
                    });
                    top.last_mut().expect("just pushed")
                }
            };
            match (by, second) {
                (By::Os, Some(leaf)) => {
                    let sub = match g.groups.iter_mut().position(|s| s.name == leaf) {
                        Some(i) => &mut g.groups[i],
                        None => {
                            g.groups.push(Group {
                                name: leaf.clone(),
                                groups: vec![],
                                vms: vec![],
                            });
                            g.groups.last_mut().expect("just pushed")
                        }
                    };
                    sub.vms.push(c.vm.name.clone());
                }
                _ => g.vms.push(c.vm.name.clone()),
            }
        }
    }
    fn sort(gs: &mut [Group]) {
        gs.sort_by(|a, b| a.name.cmp(&b.name));
        for g in gs.iter_mut() {
            g.vms.sort();
            sort(&mut g.groups);
        }
    }
    sort(&mut top);
    top
}

/// A category selector for backups: `os:linux`, `os:linux/debian`,
/// `os:windows`, `app:PostgreSQL`, `keyword:db`, `path:/srv/images`,
/// `pool:/production`. Matching is case-insensitive; `os:` matches a
/// prefix of FAMILY/DISTRO VERSION.
pub fn selects(c: &Classified, sel: &str) -> Result<bool, String> {
    let (kind, want) = sel
        .split_once(':')
        .ok_or_else(|| format!("{sel:?}: want KIND:VALUE (os, app, keyword, path, pool)"))?;
    let want = want.to_lowercase();
    Ok(match kind {
        "os" => labels(c, &By::Os)
            .iter()
            .any(|l| l.to_lowercase().starts_with(&want)),
        "app" => c.apps().iter().any(|a| a.to_lowercase() == want),
        "keyword" => c.vm.name.to_lowercase().contains(&want),
        "path" => c.vm.storage_path.to_lowercase() == want,
        "pool" => c.vm.pool.to_lowercase() == want,
        _ => {
            return Err(format!(
                "{kind:?}: categories are os, app, keyword, path, pool"
            ))
        }
    })
}
