//! The pending journal: how a log kept in the state database (the audit
//! log, the events) never drops a record silently. One home for the rule:
//!
//! - A record gets its id (its sequence number in the table) when it is
//!   made, from a counter kept here (at start: the highest id in the table
//!   or in the pending file), not from the database when it is stored. So
//!   ids are unique and increasing whatever fails, a record kept aside is
//!   known by its final id from the start, and storing a record again (a
//!   crash after the database took the records kept aside but before their
//!   file was removed; a failed write that reached the disk anyway) only
//!   puts the same record under the same id again.
//! - The caller's `store` writes records durably (synced) under their ids.
//! - A record the database cannot take is appended to the pending file
//!   beside it (`DATA/NAME-pending.jsonl`) and synced.
//! - Records kept there are stored, in order and before any newer record,
//!   at the next record and whenever [`Journal::replay`] runs (at start,
//!   and whenever the owner retries); then the file is removed.
//! - Only when neither can be written is a record lost: that is logged as
//!   an error with the record's content and counted ([`Journal::lost`]).
//!
//! What to do about a loss (refuse changes, raise an alert) is the owner's
//! policy: `audit.rs` and `events.rs`.

use std::fs::OpenOptions;
use std::io::Write;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cdm_common::lock::lock;
use redb::TableDefinition;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::state::{self, State, StateError};

/// A record of a journaled log: it carries its own id.
pub trait Entry: Serialize + DeserializeOwned + Clone {
    fn id(&self) -> u64;
    fn set_id(&mut self, id: u64);
}

/// Stores records durably under the ids they carry. The flag says they
/// come from the pending file, so an earlier attempt may have stored part
/// of what goes with them already.
pub type Store<'a, T> = &'a dyn Fn(&[T], bool) -> state::Result<()>;

/// Where one record went.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    /// In the database, after `replayed` records kept aside earlier.
    Database { replayed: usize },
    /// In the pending file (the database failed); `first` if the file held
    /// no record before, i.e. the failure has just begun.
    Aside { first: bool },
    /// Nowhere: the database and the pending file both failed.
    Lost,
}

struct Inner {
    /// The highest id given out; None only if it could not be read at start
    /// (records are then kept aside with id 0 and numbered when replayed).
    last: Option<u64>,
    /// Records in the pending file.
    pending: usize,
}

pub struct Journal<T> {
    state: Arc<State>,
    table: TableDefinition<'static, u64, &'static [u8]>,
    file: PathBuf,
    /// What a record is, for the logs ("audit record", "event").
    what: &'static str,
    /// One writer at a time, so records keep their order.
    inner: Mutex<Inner>,
    lost: AtomicU64,
    _t: PhantomData<fn() -> T>,
}

impl<T: Entry> Journal<T> {
    /// The journal of `table`, its pending file `file_name` beside the
    /// state database.
    pub fn new(
        state: Arc<State>,
        table: TableDefinition<'static, u64, &'static [u8]>,
        file_name: &str,
        what: &'static str,
    ) -> Journal<T> {
        let file = state.path().with_file_name(file_name);
        let j = Journal {
            state,
            table,
            file,
            what,
            inner: Mutex::new(Inner {
                last: None,
                pending: 0,
            }),
            lost: AtomicU64::new(0),
            _t: PhantomData,
        };
        let kept = j.read().unwrap_or_default();
        let last = j.highest_id(&kept);
        {
            let mut g = lock(&j.inner);
            g.pending = kept.len();
            match last {
                Ok(l) => g.last = Some(l),
                Err(e) => {
                    tracing::error!(error = %e, what, "cannot read the last id; records kept aside are numbered when stored")
                }
            }
        }
        j
    }

    /// The pending file.
    #[cfg(test)]
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Records kept aside, not yet in the database.
    pub fn pending(&self) -> usize {
        lock(&self.inner).pending
    }

    /// Records lost since start (neither the database nor the file took them).
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::SeqCst)
    }

    /// Stores one record under the next id (the id it carries is replaced):
    /// the records kept aside first, then this one; aside if the database
    /// fails. Returns where it went and the record with its id.
    pub fn record(&self, mut rec: T, store: Store<'_, T>) -> (Stored, T) {
        let mut g = lock(&self.inner);
        // Records kept aside go first: a newer one never overtakes them.
        let replayed = self.replay_locked(&mut g, store);
        rec.set_id(next_id(&mut g));
        let stored = match replayed {
            Err(e) => self.aside(&mut g, &rec, &e.to_string()),
            Ok(replayed) => match store(std::slice::from_ref(&rec), false) {
                Ok(()) => Stored::Database { replayed },
                Err(e) => self.aside(&mut g, &rec, &e.to_string()),
            },
        };
        (stored, rec)
    }

    /// Moves the records kept aside into the database; how many.
    pub fn replay(&self, store: Store<'_, T>) -> state::Result<usize> {
        let mut g = lock(&self.inner);
        self.replay_locked(&mut g, store)
    }

    /// Whether both the database and the pending file can be written now
    /// (after moving the records kept aside into the database).
    pub fn writable(&self, store: Store<'_, T>) -> Result<(), String> {
        let mut g = lock(&self.inner);
        self.replay_locked(&mut g, store)
            .and_then(|_| self.state.sync())
            .map_err(|e| e.to_string())?;
        open_append(&self.file)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("{}: {e}", self.file.display()))?;
        // The probe's empty file is harmless; drop it anyway.
        if g.pending == 0 {
            let _ = std::fs::remove_file(&self.file);
        }
        Ok(())
    }

    /// The records kept aside, oldest first.
    pub fn kept(&self) -> Vec<T> {
        let _g = lock(&self.inner);
        self.read().unwrap_or_default()
    }

    fn aside(&self, g: &mut Inner, rec: &T, why: &str) -> Stored {
        match self.append(rec) {
            Ok(()) => {
                g.pending += 1;
                tracing::error!(error = why, file = %self.file.display(), id = rec.id(),
                    "cannot store an {} in the state database; kept aside", self.what);
                Stored::Aside {
                    first: g.pending == 1,
                }
            }
            Err(io) => {
                self.lost.fetch_add(1, Ordering::SeqCst);
                let text = serde_json::to_string(rec).unwrap_or_default();
                tracing::error!(error = why, aside = %io, file = %self.file.display(), record = %text,
                    "{} LOST: neither the state database nor the pending file can be written",
                    self.what.to_uppercase());
                Stored::Lost
            }
        }
    }

    fn append(&self, rec: &T) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let once = || -> std::io::Result<()> {
            let mut f = open_append(&self.file)?;
            let len = f.metadata()?.len();
            let r = f.write_all(&line).and_then(|()| f.sync_data());
            if r.is_err() {
                // No half line for the next append to follow.
                let _ = f.set_len(len);
            }
            r?;
            sync_dir(&self.file)
        };
        match once() {
            // A full filesystem: the state reserve makes room, once.
            Err(e) if crate::ballast::is_no_space(&e.to_string()) && crate::ballast::release() => {
                once()
            }
            r => r,
        }
    }

    fn replay_locked(&self, g: &mut Inner, store: Store<'_, T>) -> state::Result<usize> {
        let mut recs = match self.read() {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(StateError::Io(format!("{}: {e}", self.file.display()))),
        };
        // The counter is set only once they are stored: records kept aside
        // meanwhile stay unnumbered (0) behind them, in order.
        let mut last = match g.last {
            Some(l) => l,
            None => self.highest_id(&recs)?,
        };
        for r in recs.iter_mut().filter(|r| r.id() == 0) {
            last += 1;
            r.set_id(last);
        }
        if !recs.is_empty() {
            store(&recs, true)?;
        }
        std::fs::remove_file(&self.file)
            .and_then(|()| sync_dir(&self.file))
            .map_err(|e| StateError::Io(format!("{}: {e}", self.file.display())))?;
        g.last = Some(last);
        g.pending = 0;
        if !recs.is_empty() {
            tracing::warn!(
                records = recs.len(),
                "{}s kept aside are now in the state database",
                self.what
            );
        }
        Ok(recs.len())
    }

    /// The highest id in the table or among `kept`.
    fn highest_id(&self, kept: &[T]) -> state::Result<u64> {
        let db = self.state.last_id(self.table)?.unwrap_or(0);
        Ok(kept.iter().map(Entry::id).fold(db, u64::max))
    }

    /// The records in the pending file, oldest first.
    fn read(&self) -> std::io::Result<Vec<T>> {
        let text = std::fs::read_to_string(&self.file)?;
        let mut recs = Vec::new();
        for (n, l) in text.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<T>(l) {
                Ok(r) => recs.push(r),
                // Only a record cut by a crash while being kept aside: whoever
                // made it never saw it stored.
                Err(e) => tracing::warn!(line = n + 1, error = %e, file = %self.file.display(),
                    "skipping a torn pending record"),
            }
        }
        Ok(recs)
    }
}

/// The next id, or 0 (numbered when stored) while the counter is unknown.
fn next_id(g: &mut Inner) -> u64 {
    match g.last.as_mut() {
        Some(l) => {
            *l += 1;
            *l
        }
        None => 0,
    }
}

/// Opens a pending file for appending; created 0600 whatever the umask,
/// like the database it stands in for (it holds the same records).
fn open_append(file: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(file)
}

/// Syncs the directory holding `file`, so its creation or removal lasts.
fn sync_dir(file: &Path) -> std::io::Result<()> {
    match file.parent() {
        Some(d) => cdm_common::fs::sync_dir(d).map_err(|e| e.source),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Sync, EVENTS};
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
    struct Rec {
        id: u64,
        n: u32,
    }

    impl Entry for Rec {
        fn id(&self) -> u64 {
            self.id
        }
        fn set_id(&mut self, id: u64) {
            self.id = id;
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        fault: PathBuf,
        state: Arc<State>,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let fault = dir.path().join("eio");
        let state = Arc::new(State::open(&dir.path().join("s.redb"), Some(&fault)).unwrap());
        Setup {
            _dir: dir,
            fault,
            state,
        }
    }

    fn journal(s: &Setup) -> Journal<Rec> {
        Journal::new(s.state.clone(), EVENTS, "t-pending.jsonl", "test record")
    }

    fn store(state: &State) -> impl Fn(&[Rec], bool) -> state::Result<()> + '_ {
        move |recs, _| state.put_all(EVENTS, Sync::Now, recs, |r| r.id)
    }

    fn stored(state: &State) -> Vec<Rec> {
        state.scan(EVENTS, 0, 1000, false, |_| true).unwrap()
    }

    fn rec(n: u32) -> Rec {
        Rec { id: 0, n }
    }

    #[test]
    fn records_kept_aside_keep_their_ids_and_go_first() {
        let s = setup();
        let j = journal(&s);
        let st = store(&s.state);
        assert_eq!(j.record(rec(1), &st).0, Stored::Database { replayed: 0 });
        std::fs::write(&s.fault, b"").unwrap();
        let (a, r2) = j.record(rec(2), &st);
        assert_eq!(a, Stored::Aside { first: true });
        let (b, r3) = j.record(rec(3), &st);
        assert_eq!(b, Stored::Aside { first: false });
        assert_eq!((r2.id, r3.id), (2, 3), "numbered when made");
        assert_eq!(j.pending(), 2);
        assert_eq!(j.kept(), vec![r2.clone(), r3.clone()]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(j.file()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_file(&s.fault).unwrap();
        let (c, r4) = j.record(rec(4), &st);
        assert_eq!(c, Stored::Database { replayed: 2 });
        assert_eq!(r4.id, 4);
        assert_eq!(j.pending(), 0);
        assert!(!j.file().exists());
        let all = stored(&s.state);
        let got: Vec<(u64, u32)> = all.iter().map(|r| (r.id, r.n)).collect();
        assert_eq!(got, vec![(1, 1), (2, 2), (3, 3), (4, 4)]);
    }

    #[test]
    fn a_replay_cut_before_the_file_is_removed_stores_nothing_twice() {
        let s = setup();
        let j = journal(&s);
        let st = store(&s.state);
        j.record(rec(1), &st);
        std::fs::write(&s.fault, b"").unwrap();
        j.record(rec(2), &st);
        j.record(rec(3), &st);
        std::fs::remove_file(&s.fault).unwrap();
        // As if the last run stored them and died before removing the file:
        // a new journal (a restart) replays the same file again.
        st(&j.kept(), true).unwrap();
        drop(j);
        let j = journal(&s);
        assert_eq!(j.pending(), 2);
        assert_eq!(j.replay(&st).unwrap(), 2);
        let (_, r) = j.record(rec(4), &st);
        assert_eq!(r.id, 4, "the counter counts what was kept aside");
        let ids: Vec<u64> = stored(&s.state).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2, 3, 4]);
    }

    #[test]
    fn records_made_before_the_counter_is_known_are_numbered_when_stored() {
        let s = setup();
        let j = journal(&s);
        let st = store(&s.state);
        j.record(rec(1), &st);
        std::fs::write(&s.fault, b"").unwrap();
        j.record(rec(2), &st);
        drop(j);
        // A journal made while the database cannot even be read: it cannot
        // know the last id, so the record waits unnumbered behind the one
        // kept aside, and is numbered after it once they are stored.
        let j = journal(&s);
        let (a, r) = j.record(rec(3), &st);
        assert_eq!((a, r.id), (Stored::Aside { first: false }, 0));
        std::fs::remove_file(&s.fault).unwrap();
        assert_eq!(j.replay(&st).unwrap(), 2);
        let got: Vec<(u64, u32)> = stored(&s.state).iter().map(|r| (r.id, r.n)).collect();
        assert_eq!(got, vec![(1, 1), (2, 2), (3, 3)]);
        assert_eq!(j.record(rec(4), &st).1.id, 4);
    }

    #[test]
    fn a_record_neither_place_takes_is_lost_and_counted() {
        let s = setup();
        let j = journal(&s);
        let st = store(&s.state);
        j.record(rec(1), &st);
        // The pending file cannot be created: its name is a directory.
        std::fs::create_dir(j.file()).unwrap();
        std::fs::write(&s.fault, b"").unwrap();
        let (a, lost) = j.record(rec(2), &st);
        assert_eq!(a, Stored::Lost);
        assert_eq!(j.lost(), 1);
        assert!(j.writable(&st).is_err());
        std::fs::remove_file(&s.fault).unwrap();
        std::fs::remove_dir(j.file()).unwrap();
        j.writable(&st).unwrap();
        let (b, r) = j.record(rec(3), &st);
        assert_eq!(b, Stored::Database { replayed: 0 });
        assert!(r.id > lost.id, "ids keep increasing past a lost record");
        assert_eq!(j.lost(), 1);
    }
}
