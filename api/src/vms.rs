//! Categories of virtual machines (the category-based backup method's
//! step 1 and its claim 2) and the regrouped tree (step 4): by operating
//! system (family, then distribution and version), by application (a VM
//! can be in several), by a keyword in the name, by storage path, by
//! resource pool. One implementation, used by the API and by `cdm-agent`.

use crate::error::{InputError, InputKind};
use crate::types::{VmGroup, VmRecord};

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
    pub fn parse(s: &str) -> Result<By, InputError> {
        match s {
            "os" => Ok(By::Os),
            "app" => Ok(By::App),
            "path" => Ok(By::Path),
            "pool" => Ok(By::Pool),
            _ => match s.strip_prefix("keyword:") {
                Some(w) if !w.is_empty() => Ok(By::Keyword(w.to_string())),
                _ => Err(InputError::new(
                    InputKind::Grouping,
                    format!("{s:?}: group by os, app, keyword:WORD, path or pool"),
                )),
            },
        }
    }
}

fn family(f: &str) -> &'static str {
    match f {
        "linux" => "Linux",
        "windows" => "Windows",
        "unix" => "Unix",
        _ => "Unknown",
    }
}

/// The category names a VM belongs to (several for applications); OS
/// labels are `Family/Name`.
pub fn labels(v: &VmRecord, by: &By) -> Vec<String> {
    match by {
        By::Os => {
            let f = family(&v.os_family);
            vec![if v.os.is_empty() || f == "Unknown" {
                f.to_string()
            } else {
                format!("{f}/{}", v.os)
            }]
        }
        By::App => {
            if v.apps.is_empty() {
                vec!["(no application)".into()]
            } else {
                v.apps.clone()
            }
        }
        By::Keyword(w) => vec![if v.name.to_lowercase().contains(&w.to_lowercase()) {
            format!("name contains {w}")
        } else {
            format!("name without {w}")
        }],
        By::Path => vec![if v.storage_path.is_empty() {
            "(none)".into()
        } else {
            v.storage_path.clone()
        }],
        By::Pool => vec![if v.pool.is_empty() {
            "(none)".into()
        } else {
            v.pool.clone()
        }],
    }
}

fn group<'a>(gs: &'a mut Vec<VmGroup>, name: &str) -> &'a mut VmGroup {
    let i = match gs.iter().position(|g| g.name == name) {
        Some(i) => i,
        None => {
            gs.push(VmGroup {
                name: name.to_string(),
                groups: vec![],
                vms: vec![],
            });
            gs.len() - 1
        }
    };
    &mut gs[i]
}

/// The regrouped tree; groups and VMs sorted by name.
pub fn tree(vms: &[VmRecord], by: &By) -> Vec<VmGroup> {
    let mut top: Vec<VmGroup> = Vec::new();
    for v in vms {
        for label in labels(v, by) {
            // Only OS labels have two levels; paths and pools keep their
            // slashes.
            match (by, label.split_once('/')) {
                (By::Os, Some((f, leaf))) => {
                    let g = group(&mut top, f);
                    group(&mut g.groups, leaf).vms.push(v.name.clone());
                }
                _ => group(&mut top, &label).vms.push(v.name.clone()),
            }
        }
    }
    fn sort(gs: &mut [VmGroup]) {
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
/// `pool:/production`; case-insensitive, `os:` a prefix of `Family/Name`.
pub fn selects(v: &VmRecord, sel: &str) -> Result<bool, InputError> {
    let bad = |m: String| InputError::new(InputKind::Category, m);
    let (kind, want) = sel.split_once(':').ok_or_else(|| {
        bad(format!(
            "{sel:?}: want KIND:VALUE (os, app, keyword, path, pool)"
        ))
    })?;
    let want = want.to_lowercase();
    Ok(match kind {
        "os" => labels(v, &By::Os)
            .iter()
            .any(|l| l.to_lowercase().starts_with(&want)),
        "app" => v.apps.iter().any(|a| a.to_lowercase() == want),
        "keyword" => v.name.to_lowercase().contains(&want),
        "path" => v.storage_path.to_lowercase() == want,
        "pool" => v.pool.to_lowercase() == want,
        _ => {
            return Err(bad(format!(
                "{kind:?}: categories are os, app, keyword, path, pool"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, fam: &str, os: &str, apps: &[&str], path: &str, pool: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            os_family: fam.into(),
            os: os.into(),
            apps: apps.iter().map(|s| s.to_string()).collect(),
            storage_path: path.into(),
            pool: pool.into(),
            ..Default::default()
        }
    }

    #[test]
    fn trees_and_selectors() {
        let vms = vec![
            vm(
                "db1",
                "linux",
                "debian 12",
                &["PostgreSQL", "MySQL"],
                "/san/a",
                "/prod",
            ),
            vm("web", "linux", "ubuntu 22.04", &[], "/san/b", "/dev"),
            vm(
                "sql",
                "windows",
                "Windows Server 2019 Standard",
                &["SQL Server"],
                "/san/a",
                "/prod",
            ),
            vm("x", "", "", &[], "", ""),
        ];
        let t = tree(&vms, &By::Os);
        assert_eq!(
            t.iter().map(|g| g.name.as_str()).collect::<Vec<_>>(),
            ["Linux", "Unknown", "Windows"]
        );
        assert_eq!(t[0].groups[0].name, "debian 12");
        let a = tree(&vms, &By::App);
        assert_eq!(a.iter().find(|g| g.name == "MySQL").unwrap().vms, ["db1"]);
        assert_eq!(
            a.iter().find(|g| g.name == "PostgreSQL").unwrap().vms,
            ["db1"]
        );
        assert_eq!(tree(&vms, &By::Path)[1].name, "/san/a");
        assert_eq!(tree(&vms, &By::Keyword("D".into()))[0].vms, ["db1"]);
        assert!(selects(&vms[0], "os:linux/debian").unwrap());
        assert!(!selects(&vms[1], "os:windows").unwrap());
        assert!(selects(&vms[2], "app:sql server").unwrap());
        assert!(selects(&vms[0], "pool:/PROD").unwrap());
        assert!(selects(&vms[0], "nope").is_err());
        assert!(selects(&vms[0], "color:red").is_err());
        assert!(By::parse("keyword:").is_err());
    }
}
