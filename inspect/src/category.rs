//! A VM with what inspection found on its disks. Categories and the
//! regrouped tree over it are `cdm_api::vms` (one implementation, shared by
//! the appliance's API and the agent).

use serde::{Deserialize, Serialize};

use crate::inventory::Vm;
use crate::Inspection;

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

    /// Applications found on any disk, sorted, once each.
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

    /// How the OS is named in categories: `debian 12`, or the Windows
    /// product name.
    pub fn os_name(&self) -> String {
        match self.os() {
            Some(o) if o.family == "windows" => o.product_name.clone(),
            Some(o) => format!("{} {}", o.distro, o.version).trim().to_string(),
            None => String::new(),
        }
    }
}
