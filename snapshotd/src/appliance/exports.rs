//! NBD exports and the clients connected to them.

use std::collections::HashMap;

use cdm_api::types::*;
use cdm_api::ApiResult;

use super::{engine, Appliance};

impl Appliance {
    pub(super) fn clients_of(&self, export: &str) -> Vec<ExportClient> {
        self.nbd
            .clients()
            .into_iter()
            .filter(|c| c.export == export)
            .map(|c| ExportClient {
                id: c.id,
                peer: c.peer,
                since_unix: c.since_unix,
            })
            .collect()
    }

    pub(super) fn export_list(&self) -> ApiResult<Vec<Export>> {
        let uris = |name: &str| -> Vec<String> {
            self.nbd_addrs
                .iter()
                .map(|a| match a.strip_prefix("unix:") {
                    Some(p) => format!("nbd+unix:///{name}?socket={p}"),
                    None => format!("nbd://{a}/{name}"),
                })
                .collect()
        };
        let mut out = Vec::new();
        let (vols, snaps) = self.pool.catalog().map_err(engine)?;
        let mut vols = vols;
        vols.sort_by(|a, b| a.name.cmp(&b.name));
        for v in &vols {
            out.push(Export {
                uris: uris(&v.name),
                clients: self.clients_of(&v.name),
                kind: if v.origin.is_some() { "clone" } else { "stage" }.into(),
                read_only: false,
                size: v.size,
                name: v.name.clone(),
            });
        }
        let names: HashMap<u64, &str> = vols.iter().map(|v| (v.id, v.name.as_str())).collect();
        for s in snaps {
            let Some(vn) = names.get(&s.volume_id) else {
                continue;
            };
            let name = format!("{vn}@{}", s.id);
            out.push(Export {
                uris: uris(&name),
                clients: self.clients_of(&name),
                kind: "snapshot".into(),
                read_only: true,
                size: s.size,
                name,
            });
        }
        Ok(out)
    }
}
