//! Retention holds (`docs/replication.md`, "Holds"): the newest point a
//! link's target acknowledged is the base of that link's next incremental
//! transfer, so automatic retention keeps it and a manual delete of it is
//! refused (409 `held`) unless forced.
//!
//! The held set is derived, never stored: from the links table and, for
//! each link and volume, its newest successful transfer record (the one
//! durable fact of what the target acknowledged). A deleted link has no
//! record in the links table, so its holds go with it; a paused one keeps
//! them. It is computed once per retention pass.

use std::collections::{BTreeMap, HashMap, HashSet};

use cdm_api::ApiResult;

use super::links::{LinkRec, TransferRec, TRANSFERS};
use super::service::Replication;
use crate::appliance::st;

/// One link's hold on one point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub link: u64,
    pub peer: String,
    pub volume: String,
}

/// The held points: snapshot id → the links that hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holds(BTreeMap<u64, Vec<Hold>>);

impl Holds {
    /// The links holding snapshot `id` (none: it is not held).
    pub fn of(&self, id: u64) -> &[Hold] {
        self.0.get(&id).map_or(&[], Vec::as_slice)
    }

    pub fn is_held(&self, id: u64) -> bool {
        self.0.contains_key(&id)
    }

    /// "link 3 to peer B, link 4 to peer C": who holds `id`, for logs,
    /// events and the 409's message.
    pub fn describe(&self, id: u64) -> String {
        self.of(id)
            .iter()
            .map(|h| format!("link {} to peer {}", h.link, h.peer))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The held set from the links (each with the volumes it replicates now)
/// and the transfer records, newest first: per link and volume, the
/// snapshot of its newest `ok` transfer. Records of links that no longer
/// exist, or of volumes a link no longer replicates, hold nothing.
/// Stops reading records once every (link, volume) has its base.
pub fn compute(
    links: &[(LinkRec, Vec<String>)],
    newest_first: impl IntoIterator<Item = TransferRec>,
) -> Holds {
    let mut wanted: HashMap<(u64, &str), &LinkRec> = HashMap::new();
    for (l, vols) in links {
        for v in vols {
            wanted.insert((l.id, v.as_str()), l);
        }
    }
    let mut found: HashSet<(u64, String)> = HashSet::new();
    let mut out: BTreeMap<u64, Vec<Hold>> = BTreeMap::new();
    for t in newest_first {
        if found.len() == wanted.len() {
            break;
        }
        if t.transfer.result != "ok" {
            continue;
        }
        let Some(l) = wanted.get(&(t.link, t.transfer.volume.as_str())) else {
            continue;
        };
        if !found.insert((t.link, t.transfer.volume.clone())) {
            continue;
        }
        out.entry(t.transfer.snapshot).or_default().push(Hold {
            link: l.id,
            peer: l.peer.clone(),
            volume: t.transfer.volume.clone(),
        });
    }
    Holds(out)
}

impl Replication {
    /// The points this appliance's links hold now (`compute` over the
    /// links table and the transfer records).
    pub fn holds(&self) -> ApiResult<Holds> {
        let links: Vec<(LinkRec, Vec<String>)> = self
            .link_recs()?
            .into_iter()
            .map(|l| {
                // The volumes it replicates now; for a policy link whose
                // applications cannot be read, every volume it sent:
                // holding a point too many costs space, dropping one a
                // full resend.
                let vols = self.lag_volumes(&l);
                (l, vols)
            })
            .collect();
        let wanted: usize = links.iter().map(|(_, v)| v.len()).sum();
        if wanted == 0 {
            return Ok(Holds::default());
        }
        // Newest first, stopping as soon as every (link, volume) has its
        // base: `scan` stops at `limit` accepted records, and only a
        // link's first `ok` record of a volume is accepted.
        let seen = std::cell::RefCell::new(HashSet::new());
        let ids: HashSet<(u64, &str)> = links
            .iter()
            .flat_map(|(l, vs)| vs.iter().map(move |v| (l.id, v.as_str())))
            .collect();
        let recs: Vec<TransferRec> = self
            .state
            .scan(TRANSFERS, 0, wanted, true, |t: &TransferRec| {
                t.transfer.result == "ok"
                    && ids.contains(&(t.link, t.transfer.volume.as_str()))
                    && seen
                        .borrow_mut()
                        .insert((t.link, t.transfer.volume.clone()))
            })
            .map_err(st)?;
        // `scan` hands them back oldest first.
        Ok(compute(&links, recs.into_iter().rev()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdm_api::replication::Transfer;

    fn link(id: u64, peer: &str) -> LinkRec {
        LinkRec {
            id,
            peer: peer.into(),
            ..LinkRec::default()
        }
    }

    fn t(link: u64, volume: &str, snapshot: u64, result: &str) -> TransferRec {
        TransferRec {
            link,
            transfer: Transfer {
                volume: volume.into(),
                snapshot,
                result: result.into(),
                ..Transfer::default()
            },
        }
    }

    #[test]
    fn each_link_holds_its_newest_acknowledged_point_per_volume() {
        let links = vec![
            (link(1, "B"), vec!["v".to_string(), "w".to_string()]),
            // Fan-out: the same volume to another peer, further behind.
            (link(2, "C"), vec!["v".to_string()]),
        ];
        // Newest first.
        let recs = vec![
            t(1, "v", 9, "failed"),
            t(1, "v", 8, "ok"),
            t(2, "v", 5, "cancelled"),
            t(1, "w", 7, "ok"),
            t(1, "v", 6, "ok"),
            t(2, "v", 4, "ok"),
            t(2, "v", 3, "ok"),
            // A deleted link holds nothing.
            t(3, "v", 2, "ok"),
            // Nor a volume a link no longer replicates.
            t(2, "x", 1, "ok"),
        ];
        let h = compute(&links, recs);
        assert_eq!(
            h.of(8),
            [Hold {
                link: 1,
                peer: "B".into(),
                volume: "v".into()
            }]
        );
        assert_eq!(
            h.of(7),
            [Hold {
                link: 1,
                peer: "B".into(),
                volume: "w".into()
            }]
        );
        assert_eq!(
            h.of(4),
            [Hold {
                link: 2,
                peer: "C".into(),
                volume: "v".into()
            }]
        );
        for id in [9, 6, 5, 3, 2, 1] {
            assert!(!h.is_held(id), "{id} is held: {h:?}");
        }
        assert_eq!(h.describe(8), "link 1 to peer B");
        assert_eq!(h.describe(1), "");
    }

    #[test]
    fn two_links_on_one_point_both_hold_it() {
        let links = vec![
            (link(1, "B"), vec!["v".to_string()]),
            (link(2, "C"), vec!["v".to_string()]),
        ];
        let h = compute(&links, vec![t(2, "v", 4, "ok"), t(1, "v", 4, "ok")]);
        assert_eq!(h.describe(4), "link 2 to peer C, link 1 to peer B");
        // No link, no hold.
        assert_eq!(compute(&[], vec![t(1, "v", 4, "ok")]), Holds::default());
    }

    #[test]
    fn the_service_reads_links_and_transfers() {
        let d = tempfile::tempdir().unwrap();
        let r = crate::replication::runs::tests::service(d.path());
        r.pool.create_volume("v", 1 << 20, 65536).unwrap();
        let mut l = link(0, "B");
        l.volume = Some("v".into());
        let l = r
            .state
            .append(super::super::links::LINKS, crate::state::Sync::Now, |id| {
                LinkRec { id, ..l.clone() }
            })
            .unwrap();
        assert_eq!(r.holds().unwrap(), Holds::default());
        for (snap, res) in [(3, "ok"), (4, "ok"), (5, "failed")] {
            r.record_transfer(l.id, t(l.id, "v", snap, res).transfer)
                .unwrap();
        }
        let h = r.holds().unwrap();
        assert!(h.is_held(4) && !h.is_held(3) && !h.is_held(5), "{h:?}");
        // A paused link keeps its hold; a deleted one releases it.
        r.update_link(l.id, |x| x.enabled = false).unwrap();
        assert!(r.holds().unwrap().is_held(4));
        let admin = cdm_api::auth::Caller {
            user: "admin".into(),
            role: cdm_api::auth::Role::Admin,
            grants: Vec::new(),
            token_id: String::new(),
            token_name: String::new(),
        };
        r.delete_link(&admin, l.id).unwrap();
        assert_eq!(r.holds().unwrap(), Holds::default());
        // The next link gets the same id (ids follow the last link): it
        // inherits neither the deleted link's transfers nor its hold.
        let again = r
            .state
            .append(super::super::links::LINKS, crate::state::Sync::Now, |id| {
                LinkRec { id, ..l.clone() }
            })
            .unwrap();
        assert_eq!(again.id, l.id);
        assert_eq!(r.transfers(again.id).unwrap(), Vec::new());
        assert_eq!(r.holds().unwrap(), Holds::default());
    }
}
