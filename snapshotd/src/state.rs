//! The appliance's own state next to the pool: users, tokens, policies,
//! webhooks and their delivery log, events, the audit log and job history,
//! in a redb database (`DATA/state.redb`). Records are JSON values keyed by
//! name or by an increasing sequence number.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{
    Database, Durability, Key, ReadableTable, ReadableTableMetadata, StorageError, TableDefinition,
    TableHandle,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Tables keyed by name.
pub const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
pub const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
pub const POLICIES: TableDefinition<&str, &[u8]> = TableDefinition::new("policies");
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Tables keyed by sequence number.
pub const WEBHOOKS: TableDefinition<u64, &[u8]> = TableDefinition::new("webhooks");
pub const DELIVERIES: TableDefinition<u64, &[u8]> = TableDefinition::new("deliveries");
pub const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
pub const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
/// Instant mounts (see recovery.rs).
pub const MOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("mounts");
/// VMs as agents classified them (`PUT /v1/vms`).
pub const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
/// VMs running on the appliance from clones of their points.
pub const VM_RECOVERIES: TableDefinition<&str, &[u8]> = TableDefinition::new("vm_recoveries");

/// The control plane (`crate::control`): one-use enrolment tokens by the
/// SHA-256 of the token, hosts by name, applications by id, protection
/// policies by name, each application's schedule and last RPO state, the
/// clones hosts made (which they may delete), and job logs by (job, line).
pub const ENROLMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("enrolments");
pub const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
pub const APPS: TableDefinition<u64, &[u8]> = TableDefinition::new("applications");
pub const PROTECTION: TableDefinition<&str, &[u8]> = TableDefinition::new("protection_policies");
pub const APP_STATE: TableDefinition<u64, &[u8]> = TableDefinition::new("application_state");
pub const HOST_CLONES: TableDefinition<&str, &[u8]> = TableDefinition::new("host_clones");
/// Recovery drill reports (by the job's id) and when each application's
/// next scheduled drill is due (`control/drills.rs`).
pub const DRILLS: TableDefinition<u64, &[u8]> = TableDefinition::new("drills");
pub const DRILL_DUE: TableDefinition<u64, &[u8]> = TableDefinition::new("drill_due");
pub const JOB_LOGS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("job_logs");

/// Logs keep at most this many newest entries.
pub const LOG_KEEP: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database: {0}")]
    Db(String),
    /// The device failed under the database: redb refuses every later
    /// operation on this handle, so the next one reopens it.
    #[error("state database I/O error: {0}")]
    Io(String),
    #[error("state record {0} is corrupt: {1}")]
    Corrupt(String, String),
}

fn storage(e: StorageError) -> StateError {
    match e {
        StorageError::Io(_) | StorageError::PreviousIo => StateError::Io(e.to_string()),
        e => StateError::Db(e.to_string()),
    }
}

impl From<StorageError> for StateError {
    fn from(e: StorageError) -> Self {
        storage(e)
    }
}

impl From<redb::Error> for StateError {
    fn from(e: redb::Error) -> Self {
        match e {
            redb::Error::Io(_) | redb::Error::PreviousIo => StateError::Io(e.to_string()),
            e => StateError::Db(e.to_string()),
        }
    }
}

/// redb's per-stage errors: a storage error inside is classified, the
/// rest are database errors.
macro_rules! db_err {
    ($($t:ident),*) => {$(
        impl From<redb::$t> for StateError {
            fn from(e: redb::$t) -> Self {
                match e {
                    redb::$t::Storage(s) => storage(s),
                    e => StateError::Db(e.to_string()),
                }
            }
        }
    )*};
}
db_err!(DatabaseError, TransactionError, TableError, CommitError);

pub type Result<T> = std::result::Result<T, StateError>;

/// How durable a write must be: configuration (users, tokens, policies,
/// webhooks) is synced at once; logs ride along with the next synced write.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sync {
    Now,
    Lazy,
}

pub struct State {
    path: PathBuf,
    /// While this file exists, writes and syncs of the database fail with
    /// EIO (`snapshotd --fault-dir`, for tests of a failing state store).
    fault: Option<PathBuf>,
    /// None after an I/O error: the next operation reopens the database,
    /// so a device that recovers needs no restart.
    db: RwLock<Option<Arc<Database>>>,
    /// The handle dropped after the last I/O error, until every request
    /// that holds it is done (a reopen waits for that).
    old: std::sync::Mutex<std::sync::Weak<Database>>,
}

/// A file backend whose writes fail with EIO while a fault file exists.
#[derive(Debug)]
struct Faulty {
    file: redb::backends::FileBackend,
    fault: PathBuf,
}

impl Faulty {
    fn check(&self) -> std::io::Result<()> {
        if self.fault.exists() {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }
}

impl redb::StorageBackend for Faulty {
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.file.read(offset, len)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check()?;
        self.file.set_len(len)
    }
    fn sync_data(&self, eventual: bool) -> std::io::Result<()> {
        self.check()?;
        self.file.sync_data(eventual)
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.check()?;
        self.file.write(offset, data)
    }
}

fn open_db(path: &Path, fault: Option<&Path>) -> Result<Database> {
    let Some(fault) = fault else {
        return Ok(Database::create(path)?);
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| StateError::Io(format!("{}: {e}", path.display())))?;
    let file = redb::backends::FileBackend::new(file)?;
    Ok(redb::Builder::new().create_with_backend(Faulty {
        file,
        fault: fault.to_path_buf(),
    })?)
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StateError::Db(e.to_string()))
}

fn dec<T: DeserializeOwned>(key: &str, b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StateError::Corrupt(key.to_string(), e.to_string()))
}

impl State {
    pub fn open(path: &Path, fault: Option<&Path>) -> Result<State> {
        let db = open_db(path, fault)?;
        // Create every table so readers never meet a missing one.
        let tx = db.begin_write()?;
        tx.open_table(USERS)?;
        tx.open_table(TOKENS)?;
        tx.open_table(POLICIES)?;
        tx.open_table(META)?;
        tx.open_table(WEBHOOKS)?;
        tx.open_table(DELIVERIES)?;
        tx.open_table(EVENTS)?;
        tx.open_table(AUDIT)?;
        tx.open_table(JOBS)?;
        tx.open_table(MOUNTS)?;
        tx.open_table(VMS)?;
        tx.open_table(VM_RECOVERIES)?;
        tx.open_table(ENROLMENTS)?;
        tx.open_table(HOSTS)?;
        tx.open_table(APPS)?;
        tx.open_table(PROTECTION)?;
        tx.open_table(APP_STATE)?;
        tx.open_table(HOST_CLONES)?;
        tx.open_table(JOB_LOGS)?;
        for t in REPLICATION_TABLES {
            tx.open_table(t)?;
        }
        tx.open_table(DRILLS)?;
        tx.open_table(DRILL_DUE)?;
        tx.commit()?;
        Ok(State {
            path: path.to_path_buf(),
            fault: fault.map(Path::to_path_buf),
            db: RwLock::new(Some(Arc::new(db))),
            old: std::sync::Mutex::new(std::sync::Weak::new()),
        })
    }

    /// The database's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates table `t` if it is missing, for modules that define tables
    /// of their own (readers never meet a missing one).
    pub fn ensure_table<K: Key + 'static>(&self, t: TableDefinition<K, &[u8]>) -> Result<()> {
        self.guard(|| {
            let tx = self.write(Sync::Now)?;
            tx.open_table(t)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// The open database, reopened first if an I/O error closed it.
    fn db(&self) -> Result<Arc<Database>> {
        if let Some(db) = cdm_common::lock::read(&self.db).as_ref() {
            return Ok(db.clone());
        }
        let mut slot = cdm_common::lock::write(&self.db);
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        // redb refuses a second handle on the file while the old one lives
        // (requests that took it before the error still hold it): wait for
        // them, briefly, rather than answer 500.
        let old = cdm_common::lock::lock(&self.old).clone();
        for _ in 0..200 {
            if old.strong_count() == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if old.strong_count() > 0 {
            return Err(StateError::Io(
                "the state database is being reopened after an I/O error; retry".into(),
            ));
        }
        let db = Arc::new(open_db(&self.path, self.fault.as_deref())?);
        tracing::warn!(path = %self.path.display(), "state database reopened after an I/O error");
        *slot = Some(db.clone());
        Ok(db)
    }

    /// Runs one operation; an I/O error drops the handle for the next
    /// operation to reopen (redb refuses everything after one).
    fn guard<T>(&self, op: impl FnOnce() -> Result<T>) -> Result<T> {
        let r = op();
        if let Err(StateError::Io(e)) = &r {
            tracing::error!(error = %e, "state database I/O error");
            if crate::ballast::is_no_space(e) {
                crate::ballast::release();
            }
            let mut slot = cdm_common::lock::write(&self.db);
            if let Some(old) = slot.take() {
                *cdm_common::lock::lock(&self.old) = Arc::downgrade(&old);
            }
        }
        r
    }

    /// Makes every earlier lazy write durable (an empty synced commit).
    pub fn sync(&self) -> Result<()> {
        self.guard(|| {
            self.write(Sync::Now)?.commit()?;
            Ok(())
        })
    }

    fn write(&self, sync: Sync) -> Result<redb::WriteTransaction> {
        let mut tx = self.db()?.begin_write()?;
        if sync == Sync::Lazy {
            tx.set_durability(Durability::None);
        }
        Ok(tx)
    }

    // ---- records by key (names or sequence numbers) -------------------------

    pub fn get<K: Key + 'static, T: DeserializeOwned>(
        &self,
        t: TableDefinition<K, &[u8]>,
        key: K::SelfType<'_>,
    ) -> Result<Option<T>> {
        self.guard(|| {
            let tx = self.db()?.begin_read()?;
            let tab = tx.open_table(t)?;
            let v = tab.get(key)?;
            v.map(|v| dec(t.name(), v.value())).transpose()
        })
    }

    pub fn all<T: DeserializeOwned>(&self, t: TableDefinition<&str, &[u8]>) -> Result<Vec<T>> {
        self.guard(|| {
            let tx = self.db()?.begin_read()?;
            let tab = tx.open_table(t)?;
            let mut out = Vec::new();
            for r in tab.iter()? {
                let (k, v) = r?;
                out.push(dec(k.value(), v.value())?);
            }
            Ok(out)
        })
    }

    pub fn put<K: Key + 'static, T: Serialize>(
        &self,
        t: TableDefinition<K, &[u8]>,
        key: K::SelfType<'_>,
        v: &T,
        sync: Sync,
    ) -> Result<()> {
        self.guard(|| {
            let b = enc(v)?;
            let tx = self.write(sync)?;
            tx.open_table(t)?.insert(key, b.as_slice())?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Replaces a table's whole content in one transaction.
    pub fn replace_all<T: Serialize>(
        &self,
        t: TableDefinition<&str, &[u8]>,
        items: &[(String, T)],
    ) -> Result<()> {
        self.guard(|| {
            let enc_items: Vec<(String, Vec<u8>)> = items
                .iter()
                .map(|(k, v)| Ok((k.clone(), enc(v)?)))
                .collect::<Result<_>>()?;
            let tx = self.write(Sync::Now)?;
            {
                let mut tab = tx.open_table(t)?;
                let old: Vec<String> = tab
                    .iter()?
                    .map(|r| r.map(|(k, _)| k.value().to_string()))
                    .collect::<std::result::Result<_, _>>()?;
                for k in old {
                    tab.remove(k.as_str())?;
                }
                for (k, v) in &enc_items {
                    tab.insert(k.as_str(), v.as_slice())?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Inserts only if absent; false if the key exists.
    pub fn put_new<T: Serialize>(
        &self,
        t: TableDefinition<&str, &[u8]>,
        key: &str,
        v: &T,
    ) -> Result<bool> {
        self.guard(|| {
            let b = enc(v)?;
            let tx = self.write(Sync::Now)?;
            {
                let mut tab = tx.open_table(t)?;
                if tab.get(key)?.is_some() {
                    return Ok(false);
                }
                tab.insert(key, b.as_slice())?;
            }
            tx.commit()?;
            Ok(true)
        })
    }

    /// Removes a key; true if it existed.
    pub fn remove<K: Key + 'static>(
        &self,
        t: TableDefinition<K, &[u8]>,
        key: K::SelfType<'_>,
    ) -> Result<bool> {
        self.guard(|| {
            let tx = self.write(Sync::Now)?;
            let existed = tx.open_table(t)?.remove(key)?.is_some();
            tx.commit()?;
            Ok(existed)
        })
    }

    /// Removes every record of `t` for which `f` is true; returns them.
    pub fn remove_where<T: DeserializeOwned>(
        &self,
        t: TableDefinition<&str, &[u8]>,
        f: impl Fn(&T) -> bool,
    ) -> Result<Vec<T>> {
        self.guard(|| {
            let tx = self.write(Sync::Now)?;
            let mut gone = Vec::new();
            {
                let mut tab = tx.open_table(t)?;
                let mut keys = Vec::new();
                for r in tab.iter()? {
                    let (k, v) = r?;
                    let rec: T = dec(k.value(), v.value())?;
                    if f(&rec) {
                        keys.push(k.value().to_string());
                        gone.push(rec);
                    }
                }
                for k in keys {
                    tab.remove(k.as_str())?;
                }
            }
            tx.commit()?;
            Ok(gone)
        })
    }

    /// Removes every record of the sequence table `t` for which `f` is
    /// true, in one transaction; returns how many went.
    pub fn remove_seq_where<T: DeserializeOwned>(
        &self,
        t: TableDefinition<u64, &[u8]>,
        f: impl Fn(&T) -> bool,
    ) -> Result<usize> {
        self.guard(|| {
            let tx = self.write(Sync::Now)?;
            let n;
            {
                let mut tab = tx.open_table(t)?;
                let mut keys = Vec::new();
                for r in tab.iter()? {
                    let (k, v) = r?;
                    if f(&dec::<T>(t.name(), v.value())?) {
                        keys.push(k.value());
                    }
                }
                for k in &keys {
                    tab.remove(*k)?;
                }
                n = keys.len();
            }
            tx.commit()?;
            Ok(n)
        })
    }

    // ---- sequences ----------------------------------------------------------

    /// The highest sequence number in `t`, if any.
    pub fn last_id(&self, t: TableDefinition<u64, &[u8]>) -> Result<Option<u64>> {
        self.guard(|| {
            let tx = self.db()?.begin_read()?;
            let tab = tx.open_table(t)?;
            let last = tab.last()?.map(|(k, _)| k.value());
            Ok(last)
        })
    }

    /// Puts records under the sequence numbers they carry (`key`), in one
    /// transaction: for logs whose ids are given before they are stored
    /// (`crate::pending`), so storing the same records again is harmless.
    /// Logs are trimmed like [`State::append`] trims them.
    pub fn put_all<T: Serialize>(
        &self,
        t: TableDefinition<u64, &[u8]>,
        sync: Sync,
        recs: &[T],
        key: impl Fn(&T) -> u64,
    ) -> Result<()> {
        self.guard(|| {
            let tx = self.write(sync)?;
            {
                let mut tab = tx.open_table(t)?;
                let mut trim = None;
                for r in recs {
                    let id = key(r);
                    let b = enc(r)?;
                    tab.insert(id, b.as_slice())?;
                    if id.is_multiple_of(1000) && id > LOG_KEEP {
                        trim = Some(id - LOG_KEEP);
                    }
                }
                if let Some(cut) = trim {
                    if tab.len()? > LOG_KEEP {
                        tab.retain_in(..cut, |_, _| false)?;
                        if t.name() == JOBS.name() {
                            tx.open_table(JOB_LOGS)?
                                .retain_in(..(cut, 0), |_, _| false)?;
                        }
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Appends a record under the next sequence number, built by `make(id)`;
    /// logs are trimmed to their newest [`LOG_KEEP`] entries.
    pub fn append<T: Serialize>(
        &self,
        t: TableDefinition<u64, &[u8]>,
        sync: Sync,
        make: impl FnOnce(u64) -> T,
    ) -> Result<T> {
        self.guard(|| {
            let tx = self.write(sync)?;
            let rec;
            {
                let mut tab = tx.open_table(t)?;
                let id = match tab.last()? {
                    Some((k, _)) => k.value() + 1,
                    None => 1,
                };
                rec = make(id);
                let b = enc(&rec)?;
                tab.insert(id, b.as_slice())?;
                if id % 1000 == 0 && id > LOG_KEEP && tab.len()? > LOG_KEEP {
                    let cut = id - LOG_KEEP;
                    tab.retain_in(..cut, |_, _| false)?;
                    if t.name() == JOBS.name() {
                        // A trimmed job's log goes with it, in the same
                        // transaction: no orphan lines.
                        tx.open_table(JOB_LOGS)?
                            .retain_in(..(cut, 0), |_, _| false)?;
                    }
                }
            }
            tx.commit()?;
            Ok(rec)
        })
    }

    /// Records with ids above `after` that pass `f`: the newest `limit`
    /// (oldest first) when `newest`, else the first `limit`.
    pub fn scan<T: DeserializeOwned>(
        &self,
        t: TableDefinition<u64, &[u8]>,
        after: u64,
        limit: usize,
        newest: bool,
        f: impl Fn(&T) -> bool,
    ) -> Result<Vec<T>> {
        self.guard(|| {
            let tx = self.db()?.begin_read()?;
            let tab = tx.open_table(t)?;
            let mut out = Vec::new();
            let range = tab.range(after.saturating_add(1)..)?;
            let iter: Box<dyn Iterator<Item = _>> = if newest {
                Box::new(range.rev())
            } else {
                Box::new(range)
            };
            for r in iter {
                let (_, v) = r?;
                let rec: T = dec(t.name(), v.value())?;
                if f(&rec) {
                    out.push(rec);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            if newest {
                out.reverse();
            }
            Ok(out)
        })
    }
}

impl State {
    /// Appends lines to job `job`'s log (`JOB_LOGS`). Every line gets the
    /// next number; the log keeps its first `head` lines and its last
    /// `tail` ones, the ones between are deleted (their numbers then show
    /// as a gap, which [`State::lines`] reports). Returns how many of
    /// `lines` are stored now.
    pub fn append_lines<T: Serialize>(
        &self,
        job: u64,
        lines: &[T],
        head: u64,
        tail: u64,
        sync: Sync,
    ) -> Result<usize> {
        if lines.is_empty() {
            return Ok(0);
        }
        self.guard(|| {
            let tx = self.write(sync)?;
            let mut stored = 0;
            {
                let mut tab = tx.open_table(JOB_LOGS)?;
                let next = tab
                    .range((job, 0)..=(job, u64::MAX))?
                    .next_back()
                    .transpose()?
                    .map_or(0, |(k, _)| k.value().1 + 1);
                let end = next + lines.len() as u64;
                // Lines numbered from `keep_from` on are the tail.
                let keep_from = end.saturating_sub(tail).max(head);
                for (i, l) in lines.iter().enumerate() {
                    let n = next + i as u64;
                    if n < head || n >= keep_from {
                        let b = enc(l)?;
                        tab.insert((job, n), b.as_slice())?;
                        stored += 1;
                    }
                }
                if keep_from > head {
                    tab.retain_in((job, head)..(job, keep_from), |_, _| false)?;
                }
            }
            tx.commit()?;
            Ok(stored)
        })
    }

    /// Job `job`'s log, first line first, each with its number (a gap in
    /// the numbers is lines dropped from the middle).
    pub fn lines<T: DeserializeOwned>(&self, job: u64) -> Result<Vec<(u64, T)>> {
        self.guard(|| {
            let tx = self.db()?.begin_read()?;
            let tab = tx.open_table(JOB_LOGS)?;
            let mut out = Vec::new();
            for r in tab.range((job, 0)..=(job, u64::MAX))? {
                let (k, v) = r?;
                out.push((k.value().1, dec(JOB_LOGS.name(), v.value())?));
            }
            Ok(out)
        })
    }
}

/// Replication's data path (`crate::replication`): replica volumes by
/// name (which peer feeds them), and the receiver's transfer sessions by
/// volume (one unfinished transfer per volume; they survive a restart).
pub const REPLICAS: TableDefinition<&str, &[u8]> = TableDefinition::new("replicas");
pub const REPL_SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("repl_sessions");
const REPLICATION_TABLES: [TableDefinition<&str, &[u8]>; 2] = [REPLICAS, REPL_SESSIONS];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_reopens_the_database_once_the_device_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.redb");
        let fault = dir.path().join("eio");
        let s = State::open(&p, Some(&fault)).unwrap();
        let v = serde_json::json!({"x": 1});
        s.put(USERS, "a", &v, Sync::Now).unwrap();
        std::fs::write(&fault, b"").unwrap();
        assert!(matches!(
            s.put(USERS, "b", &v, Sync::Now),
            Err(StateError::Io(_))
        ));
        // redb refuses every operation on a handle after an I/O error, and
        // reopening needs a write: still failing while the device fails.
        assert!(s.get::<_, serde_json::Value>(USERS, "a").is_err());
        std::fs::remove_file(&fault).unwrap();
        assert_eq!(
            s.get::<_, serde_json::Value>(USERS, "a").unwrap(),
            Some(v.clone())
        );
        assert_eq!(s.get::<_, serde_json::Value>(USERS, "b").unwrap(), None);
        s.put(USERS, "b", &v, Sync::Now).unwrap();
        let recs: Vec<serde_json::Value> =
            (1..=3u64).map(|id| serde_json::json!({"id": id})).collect();
        s.put_all(EVENTS, Sync::Now, &recs, |r| r["id"].as_u64().unwrap_or(0))
            .unwrap();
        assert_eq!(s.last_id(EVENTS).unwrap(), Some(3));
        let evs: Vec<serde_json::Value> = s.scan(EVENTS, 0, 10, false, |_| true).unwrap();
        assert_eq!(evs.len(), 3);
        assert_eq!(evs[2]["id"], 3);
    }

    fn texts(s: &State, job: u64) -> Vec<(u64, String)> {
        s.lines::<String>(job).unwrap()
    }

    #[test]
    fn job_logs_keep_their_head_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(&dir.path().join("s.redb"), None).unwrap();
        assert_eq!(s.append_lines(7, &["a", "b"], 2, 2, Sync::Now).unwrap(), 2);
        assert_eq!(s.append_lines(8, &["x"], 2, 2, Sync::Now).unwrap(), 1);
        assert_eq!(s.append_lines(7, &["c", "d"], 2, 2, Sync::Now).unwrap(), 2);
        assert_eq!(s.append_lines(7, &["e"], 2, 2, Sync::Now).unwrap(), 1);
        let t = texts(&s, 7);
        assert_eq!(
            t,
            [
                (0, "a".into()),
                (1, "b".into()),
                (3, "d".into()),
                (4, "e".into())
            ]
        );
        assert_eq!(texts(&s, 8), [(0, "x".to_string())]);
        assert!(texts(&s, 9).is_empty());
        // One batch larger than head and tail: its middle is never stored.
        let many: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        assert_eq!(s.append_lines(10, &many, 2, 3, Sync::Now).unwrap(), 5);
        let t: Vec<u64> = texts(&s, 10).into_iter().map(|(n, _)| n).collect();
        assert_eq!(t, [0, 1, 97, 98, 99]);
    }

    #[test]
    fn trimmed_jobs_take_their_logs_along() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(&dir.path().join("s.redb"), None).unwrap();
        s.append_lines(1, &["old"], 10, 10, Sync::Lazy).unwrap();
        s.append_lines(5000, &["kept"], 10, 10, Sync::Lazy).unwrap();
        let recs: Vec<u64> = (1..LOG_KEEP + 1000).collect();
        s.put_all(JOBS, Sync::Lazy, &recs, |r| *r).unwrap();
        assert_eq!(texts(&s, 1).len(), 1, "no trim before the next thousand");
        // The append of id LOG_KEEP + 1000 trims jobs below 1000.
        s.append(JOBS, Sync::Lazy, |id| id).unwrap();
        assert!(texts(&s, 1).is_empty(), "the trimmed job's log is gone");
        assert_eq!(texts(&s, 5000).len(), 1);
        s.append_lines(999, &["x"], 10, 10, Sync::Lazy).unwrap();
        let recs: Vec<u64> = (LOG_KEEP + 1001..=LOG_KEEP + 2000).collect();
        s.put_all(JOBS, Sync::Lazy, &recs, |r| *r).unwrap();
        assert!(texts(&s, 999).is_empty(), "put_all trims logs too");
    }

    #[test]
    fn named_and_sequences_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.redb");
        {
            let s = State::open(&p, None).unwrap();
            s.put(USERS, "a", &serde_json::json!({"x": 1}), Sync::Now)
                .unwrap();
            assert!(!s.put_new(USERS, "a", &serde_json::json!({})).unwrap());
            for i in 0..5u64 {
                let r = s
                    .append(
                        EVENTS,
                        Sync::Lazy,
                        |id| serde_json::json!({"id": id, "i": i}),
                    )
                    .unwrap();
                assert_eq!(r["id"], i + 1);
            }
            s.put(META, "sync", &1, Sync::Now).unwrap();
        }
        let s = State::open(&p, None).unwrap();
        let v: serde_json::Value = s.get(USERS, "a").unwrap().unwrap();
        assert_eq!(v["x"], 1);
        let evs: Vec<serde_json::Value> = s.scan(EVENTS, 2, 2, true, |_| true).unwrap();
        assert_eq!(evs.len(), 2);
        assert_eq!(evs[0]["id"], 4);
        assert_eq!(evs[1]["id"], 5);
        let first: Vec<serde_json::Value> = s.scan(EVENTS, 0, 2, false, |_| true).unwrap();
        assert_eq!(first[0]["id"], 1);
        assert!(s.remove(USERS, "a").unwrap());
        assert!(s.get::<_, serde_json::Value>(USERS, "a").unwrap().is_none());
    }
}
