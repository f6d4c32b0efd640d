//! A job handed out by the appliance, and the `cdm-agent` command line
//! that runs it (a child process of this binary: a crash of a job never
//! takes the service down). Pure: what to run, not running it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

/// `AgentJob` of `GET /v1/agent/jobs`.
#[derive(Clone, Debug, Deserialize)]
pub struct AgentJob {
    pub id: u64,
    pub kind: String,
    #[serde(default)]
    pub attempt: u32,
    pub application: Application,
    #[serde(default)]
    pub params: Value,
    #[serde(default)]
    pub volume_settings: VolumeSettings,
    #[serde(default)]
    pub bandwidth_mibps: Option<f64>,
    #[serde(default)]
    pub bandwidth_windows: Option<Vec<String>>,
}

/// The fields of the appliance's `Application` a job needs.
#[derive(Clone, Debug, Deserialize)]
pub struct Application {
    pub id: u64,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub config: Value,
    pub volume: String,
    #[serde(default)]
    pub size_bytes: Option<u64>,
}

/// How the stage volume is made when it does not exist yet.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct VolumeSettings {
    pub block_size: Option<u32>,
    pub dedup: Option<bool>,
    pub compression: Option<u8>,
    pub encryption: Option<String>,
}

/// Where the child reaches the appliance and keeps its state.
#[derive(Clone, Debug)]
pub struct Globals {
    pub url: String,
    pub nbd: String,
    pub state_dir: PathBuf,
    /// The CA the service pinned, passed on when there is one.
    pub ca_file: Option<PathBuf>,
}

/// What a job's child does, for reading its result.
#[derive(Clone, Debug, PartialEq)]
pub enum Work {
    Backup,
    /// An instant or clone restore: the result gains `host`, `port`,
    /// `socket_dir` and `attachment` from what the child started.
    CloneRestore,
    RegularRestore,
    /// A recovery drill: the result is the drill's report.
    Drill,
}

/// The child's arguments (after the program name).
#[derive(Clone, Debug)]
pub struct Plan {
    pub args: Vec<OsString>,
    pub work: Work,
}

/// Stage volumes are thin: a generous size costs nothing and leaves room
/// to grow (4 × what the application holds, at least 8 GiB).
pub fn stage_size(app_bytes: Option<u64>) -> u64 {
    const GIB: u64 = 1 << 30;
    let want = app_bytes.unwrap_or(0).saturating_mul(4).max(8 * GIB);
    want.div_ceil(GIB) * GIB
}

pub(super) fn s(v: impl ToString) -> OsString {
    OsString::from(v.to_string())
}

pub(super) fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

pub(super) fn number(v: &Value, key: &str) -> Option<u64> {
    match v.get(key) {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
}

/// The global options every child gets: JSON output, where the appliance
/// is, the state directory, the pinned CA.
pub fn global_args(g: &Globals) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        s("--json"),
        s("--url"),
        s(&g.url),
        s("--nbd"),
        s(&g.nbd),
        s("--state-dir"),
        g.state_dir.clone().into(),
    ];
    if let Some(ca) = &g.ca_file {
        args.push(s("--ca-file"));
        args.push(ca.clone().into());
    }
    args
}

/// The command line of `job`, or why this agent cannot run it.
pub fn plan(job: &AgentJob, g: &Globals) -> Result<Plan, String> {
    let mut args = global_args(g);
    if let Some(l) = job.bandwidth_mibps {
        if !(l.is_finite() && l >= 0.0) {
            return Err(format!("bandwidth {l} MiB/s is not a rate"));
        }
        args.push(s("--limit"));
        args.push(s(l));
    }
    for w in job.bandwidth_windows.iter().flatten() {
        args.push(s("--window"));
        args.push(s(w));
    }
    let work = match job.kind.as_str() {
        "backup" => {
            backup_args(job, &mut args)?;
            Work::Backup
        }
        "restore" => restore_args(job, &mut args)?,
        "drill" => super::drill::args(job, &mut args)?,
        k => return Err(format!("job kind {k:?} is not one this agent runs")),
    };
    Ok(Plan { args, work })
}

fn backup_args(job: &AgentJob, args: &mut Vec<OsString>) -> Result<(), String> {
    let app = &job.application;
    let c = &app.config;
    let label = text(&job.params, "label")
        .map(str::to_string)
        .unwrap_or_else(|| format!("job {} {}", job.id, app.name));
    let metadata = match job.params.get("metadata") {
        Some(m @ Value::Object(_)) => m.clone(),
        _ => json!({ "job": job.id, "application": app.id }),
    };
    let common = |args: &mut Vec<OsString>, size: bool| {
        args.extend([s("--volume"), s(&app.volume)]);
        if size {
            args.extend([s("--size"), s(stage_size(app.size_bytes))]);
        }
        args.extend([s("--label"), s(&label), s("--metadata"), s(&metadata)]);
        let v = &job.volume_settings;
        if let Some(d) = v.dedup {
            args.extend([s("--dedup"), s(d)]);
        }
        if let Some(z) = v.compression {
            args.extend([s("--compression"), s(z)]);
        }
        if let Some(e) = &v.encryption {
            args.extend([s("--encryption"), s(e)]);
        }
    };
    match app.kind.as_str() {
        "postgresql" => {
            args.extend([s("backup"), s("postgres")]);
            common(args, true);
            if let Some(b) = job.volume_settings.block_size {
                args.extend([s("--stage-block-size"), s(b)]);
            }
            let host = text(c, "host").ok_or("the application's config has no \"host\"")?;
            args.extend([s("--host"), s(host)]);
            if let Some(p) = number(c, "port") {
                args.extend([s("--port"), s(p)]);
            }
            for (key, flag) in [
                ("user", "--user"),
                ("dbname", "--dbname"),
                ("pgdata", "--pgdata"),
                ("password_file", "--password-file"),
            ] {
                if let Some(v) = text(c, key) {
                    args.extend([s(flag), s(v)]);
                }
            }
        }
        "mariadb" => {
            args.extend([s("backup"), s("mariadb")]);
            common(args, true);
            if let Some(b) = job.volume_settings.block_size {
                args.extend([s("--stage-block-size"), s(b)]);
            }
            // Debian's socket and root over unix_socket when not said.
            for (key, flag) in [
                ("socket", "--socket"),
                ("user", "--user"),
                ("datadir", "--datadir"),
                ("password_file", "--password-file"),
            ] {
                if let Some(v) = text(c, key) {
                    args.extend([s(flag), s(v)]);
                }
            }
        }
        "files" => {
            let path = text(c, "path").ok_or("the application's config has no \"path\"")?;
            args.extend([s("backup"), s("files")]);
            common(args, true);
            if let Some(b) = job.volume_settings.block_size {
                args.extend([s("--stage-block-size"), s(b)]);
            }
            args.push(s("--"));
            args.push(s(path));
        }
        "block" => {
            let source = text(c, "source").ok_or("the application's config has no \"source\"")?;
            args.extend([s("backup"), s("block")]);
            common(args, false);
            args.push(s("--"));
            args.push(s(source));
        }
        "vm" => vm_args(job, args)?,
        k => {
            return Err(format!(
                "this agent does not back up applications of kind {k:?}"
            ))
        }
    }
    Ok(())
}

/// VMs at once when the config does not say.
pub const VM_PARALLEL: u64 = 2;

/// `vm backup` of the VMs of one category of an inventory, into stage
/// volumes named after the application's volume (`VOLUME-VM-diskN`).
fn vm_args(job: &AgentJob, args: &mut Vec<OsString>) -> Result<(), String> {
    let app = &job.application;
    let c = &app.config;
    let inventory = text(c, "inventory").ok_or("the application's config has no \"inventory\"")?;
    let category = text(c, "category").ok_or("the application's config has no \"category\"")?;
    let parallel = match c.get("parallel") {
        None | Some(Value::Null) => VM_PARALLEL,
        Some(_) => number(c, "parallel")
            .filter(|n| (1..=64).contains(n))
            .ok_or("the application's \"parallel\" is not a number from 1 to 64")?,
    };
    args.extend([
        s("vm"),
        s("backup"),
        s("--inventory"),
        s(inventory),
        s("--category"),
        s(category),
        s("--parallel"),
        s(parallel),
        s("--volume-prefix"),
        s(&app.volume),
    ]);
    if let Some(b) = text(c, "bitmap") {
        args.extend([s("--bitmap"), s(b)]);
    }
    Ok(())
}

fn restore_args(job: &AgentJob, args: &mut Vec<OsString>) -> Result<Work, String> {
    let p = &job.params;
    let volume = text(p, "volume").unwrap_or(&job.application.volume);
    if let Some(w) = pitr_args(job, volume, args)? {
        return Ok(w);
    }
    let snap = number(p, "snapshot").ok_or("the restore names no snapshot")?;
    let export = format!("{volume}@{snap}");
    let kind = text(p, "kind").unwrap_or("instant");
    let port = number(p, "port");
    if let Some(port) = port {
        if port == 0 || port > u64::from(u16::MAX) {
            return Err(format!("port {port} is not a port"));
        }
    }
    match kind {
        "instant" | "clone" => {
            let name = text(p, "name")
                .map(str::to_string)
                .unwrap_or_else(|| format!("{volume}-{snap}-job{}", job.id));
            args.extend([s("restore"), s("clone"), s(&export)]);
            args.extend([s("--name"), s(name), s("--port"), s(port.unwrap_or(5433))]);
            Ok(Work::CloneRestore)
        }
        "regular" => {
            let target =
                text(p, "target").ok_or("a regular restore needs a \"target\" directory")?;
            if !Path::new(target).is_absolute() {
                return Err(format!("target {target:?} is not an absolute path"));
            }
            args.extend([
                s("restore"),
                s("regular"),
                s(&export),
                s("--target"),
                s(target),
            ]);
            if let Some(port) = port {
                args.extend([s("--start-port"), s(port)]);
            }
            Ok(Work::RegularRestore)
        }
        k => Err(format!("restore kind {k:?}: instant, clone or regular")),
    }
}

/// `restore pitr` when the job names a point in time instead of a point.
fn pitr_args(
    job: &AgentJob,
    volume: &str,
    args: &mut Vec<OsString>,
) -> Result<Option<Work>, String> {
    let p = &job.params;
    let keys = ["target_time", "target_lsn", "target_name", "target_gtid"];
    let Some((key, value)) = keys.iter().find_map(|k| text(p, k).map(|v| (*k, v))) else {
        return Ok(None);
    };
    let port = match number(p, "port") {
        Some(port) if port == 0 || port > u64::from(u16::MAX) => {
            return Err(format!("port {port} is not a port"))
        }
        Some(port) => port,
        None => 5433,
    };
    let name = text(p, "name")
        .map(str::to_string)
        .unwrap_or_else(|| format!("{volume}-pitr-job{}", job.id));
    args.extend([s("restore"), s("pitr"), s(volume)]);
    args.extend([s(format!("--{}", key.replace('_', "-"))), s(value)]);
    args.extend([s("--name"), s(name), s("--port"), s(port)]);
    Ok(Some(Work::CloneRestore))
}

/// The job's result from the child's JSON: what the contract promises on
/// top of what the command prints (`host`, `port`, `socket_dir`,
/// `attachment` of a started clone).
pub fn result(work: &Work, mut v: Value) -> Value {
    if *work == Work::CloneRestore {
        let pg = v.get("postgres").cloned().unwrap_or(Value::Null);
        let maria = v.get("mariadb").cloned().unwrap_or(Value::Null);
        if let Value::Object(o) = &mut v {
            // A MariaDB clone answers on its socket only.
            if let Some(sock) = maria.get("socket") {
                o.insert("socket".into(), sock.clone());
            }
            if let Some(sock) = pg.get("socket_dir") {
                o.insert("host".into(), sock.clone());
                o.insert("socket_dir".into(), sock.clone());
            }
            if let Some(port) = pg.get("port") {
                o.insert("port".into(), port.clone());
            }
            if let Some(c) = o.get("clone").cloned() {
                o.insert("attachment".into(), c);
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globals() -> Globals {
        Globals {
            url: "https://a:8443".into(),
            nbd: "a:10809".into(),
            state_dir: "/var/lib/cdm-agent".into(),
            ca_file: None,
        }
    }

    fn job(v: Value) -> AgentJob {
        serde_json::from_value(v).unwrap()
    }

    fn strings(p: &Plan) -> Vec<String> {
        p.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn after<'a>(a: &'a [String], flag: &str) -> Option<&'a str> {
        a.iter().position(|x| x == flag).map(|i| a[i + 1].as_str())
    }

    #[test]
    fn postgres_backup() {
        let j = job(json!({
            "id": 7, "kind": "backup", "attempt": 1,
            "application": {"id": 3, "host": "db1", "kind": "postgresql", "name": "15/main",
                "config": {"host": "/run/pg", "port": 5434, "user": "postgres", "pgdata": "/var/lib/pg"},
                "volume": "db1-postgresql-15_main", "size_bytes": 10u64 << 30},
            "params": {"label": "hourly", "metadata": {"application": 3, "job": 7, "policy": "gold"}},
            "volume_settings": {"block_size": 16384, "dedup": true, "compression": 3},
            "bandwidth_mibps": 50.0, "bandwidth_windows": ["08:00-18:00=10"],
            "some_new_field": 1
        }));
        let p = plan(&j, &globals()).unwrap();
        assert_eq!(p.work, Work::Backup);
        let a = strings(&p);
        assert_eq!(
            &a[..7],
            [
                "--json",
                "--url",
                "https://a:8443",
                "--nbd",
                "a:10809",
                "--state-dir",
                "/var/lib/cdm-agent"
            ]
        );
        let i = a.iter().position(|x| x == "backup").unwrap();
        assert_eq!(a[i + 1], "postgres");
        assert_eq!(after(&a, "--limit"), Some("50"));
        assert_eq!(after(&a, "--window"), Some("08:00-18:00=10"));
        assert_eq!(after(&a, "--volume"), Some("db1-postgresql-15_main"));
        assert_eq!(after(&a, "--size"), Some(&*(40u64 << 30).to_string()));
        assert_eq!(after(&a, "--label"), Some("hourly"));
        let m: Value = serde_json::from_str(after(&a, "--metadata").unwrap()).unwrap();
        assert_eq!(m, json!({"application": 3, "job": 7, "policy": "gold"}));
        assert_eq!(after(&a, "--host"), Some("/run/pg"));
        assert_eq!(after(&a, "--port"), Some("5434"));
        assert_eq!(after(&a, "--pgdata"), Some("/var/lib/pg"));
        assert_eq!(after(&a, "--stage-block-size"), Some("16384"));
        assert_eq!(after(&a, "--dedup"), Some("true"));
        assert_eq!(after(&a, "--compression"), Some("3"));
        assert_eq!(after(&a, "--encryption"), None);
        assert_eq!(after(&a, "--dbname"), None);
    }

    #[test]
    fn files_block_and_what_cannot_run() {
        let app = |kind: &str, config: Value| json!({"id": 1, "kind": kind, "name": "n", "config": config, "volume": "v"});
        let j = job(
            json!({"id": 2, "kind": "backup", "application": app("files", json!({"path": "/srv/-x"}))}),
        );
        let a = strings(&plan(&j, &globals()).unwrap());
        assert_eq!(a[a.len() - 2..], ["--", "/srv/-x"]);
        assert_eq!(after(&a, "--size"), Some(&*(8u64 << 30).to_string()));
        assert_eq!(after(&a, "--label"), Some("job 2 n"));
        let j = job(
            json!({"id": 2, "kind": "backup", "application": app("block", json!({"source": "/dev/vdb"}))}),
        );
        let a = strings(&plan(&j, &globals()).unwrap());
        assert!(a.contains(&"block".to_string()));
        assert_eq!(
            after(&a, "--size"),
            None,
            "a block stage takes its source's size"
        );
        for (j, why) in [
            (
                json!({"id": 1, "kind": "backup", "application": app("files", json!({}))}),
                "path",
            ),
            (
                json!({"id": 1, "kind": "backup", "application": app("postgresql", json!({"port": 1}))}),
                "host",
            ),
            (
                json!({"id": 1, "kind": "backup", "application": app("oracle", json!({}))}),
                "oracle",
            ),
            (
                json!({"id": 1, "kind": "scrub", "application": app("files", json!({"path": "/"}))}),
                "scrub",
            ),
            (
                json!({"id": 1, "kind": "backup", "bandwidth_mibps": -1.0, "application": app("files", json!({"path": "/"}))}),
                "rate",
            ),
        ] {
            let e = plan(&job(j), &globals()).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn mariadb_backup_and_clone() {
        let j = job(json!({"id": 8, "kind": "backup",
            "application": {"id": 2, "kind": "mariadb", "name": "/var/lib/mysql",
                "config": {"socket": "/run/mysqld/mysqld.sock", "user": "bk",
                    "password_file": "/etc/cdm/bk.pw", "datadir": "/var/lib/mysql"},
                "volume": "db1-mariadb-_var_lib_mysql", "size_bytes": 1u64 << 30},
            "volume_settings": {"block_size": 16384}}));
        let p = plan(&j, &globals()).unwrap();
        assert_eq!(p.work, Work::Backup);
        let a = strings(&p);
        assert_eq!(after(&a, "backup"), Some("mariadb"));
        assert_eq!(after(&a, "--volume"), Some("db1-mariadb-_var_lib_mysql"));
        assert_eq!(after(&a, "--size"), Some(&*(8u64 << 30).to_string()));
        assert_eq!(after(&a, "--socket"), Some("/run/mysqld/mysqld.sock"));
        assert_eq!(after(&a, "--user"), Some("bk"));
        assert_eq!(after(&a, "--password-file"), Some("/etc/cdm/bk.pw"));
        assert_eq!(after(&a, "--datadir"), Some("/var/lib/mysql"));
        assert_eq!(after(&a, "--stage-block-size"), Some("16384"));
        // An empty config: the agent's defaults (Debian's socket, root).
        let j = job(json!({"id": 8, "kind": "backup", "application":
            {"id": 2, "kind": "mariadb", "name": "m", "config": {}, "volume": "v"}}));
        let a = strings(&plan(&j, &globals()).unwrap());
        assert_eq!(after(&a, "--socket"), None);
        let v = json!({"kind": "clone", "clone": "c2", "mariadb": {"port": 5433, "socket": "/m/run/mariadbd.sock"}});
        let r = result(&Work::CloneRestore, v);
        assert_eq!(r["socket"], "/m/run/mariadbd.sock");
        assert_eq!(r["attachment"], "c2");
    }

    #[test]
    fn vm_backups() {
        let app = |config: Value| json!({"id": 4, "kind": "vm", "name": "linux", "config": config, "volume": "h1-vm-linux"});
        let j = job(json!({"id": 5, "kind": "backup", "attempt": 1,
            "application": app(json!({"inventory": "/etc/cdm/vms.toml", "category": "os:linux"})),
            "bandwidth_mibps": 20.0, "bandwidth_windows": ["01:00-05:00=0"]}));
        let p = plan(&j, &globals()).unwrap();
        assert_eq!(p.work, Work::Backup);
        let a = strings(&p);
        let i = a.iter().position(|x| x == "vm").unwrap();
        assert_eq!(a[i + 1], "backup");
        assert!(
            i > a.iter().position(|x| x == "--limit").unwrap(),
            "global flags first"
        );
        assert_eq!(after(&a, "--limit"), Some("20"));
        assert_eq!(after(&a, "--window"), Some("01:00-05:00=0"));
        assert_eq!(after(&a, "--inventory"), Some("/etc/cdm/vms.toml"));
        assert_eq!(after(&a, "--category"), Some("os:linux"));
        assert_eq!(after(&a, "--parallel"), Some("2"));
        assert_eq!(after(&a, "--volume-prefix"), Some("h1-vm-linux"));
        assert_eq!(after(&a, "--bitmap"), None);
        let j = job(json!({"id": 5, "kind": "backup", "application": app(json!({
            "inventory": "/i", "category": "app:PostgreSQL", "parallel": "4", "bitmap": "b0"}))}));
        let a = strings(&plan(&j, &globals()).unwrap());
        assert_eq!(after(&a, "--parallel"), Some("4"));
        assert_eq!(after(&a, "--bitmap"), Some("b0"));
        for (config, why) in [
            (json!({"category": "os:linux"}), "inventory"),
            (json!({"inventory": "/i"}), "category"),
            (
                json!({"inventory": "/i", "category": "c", "parallel": 0}),
                "parallel",
            ),
            (
                json!({"inventory": "/i", "category": "c", "parallel": "x"}),
                "parallel",
            ),
        ] {
            let j = job(json!({"id": 5, "kind": "backup", "application": app(config)}));
            let e = plan(&j, &globals()).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn restores() {
        let app =
            json!({"id": 1, "kind": "postgresql", "name": "n", "config": {}, "volume": "src"});
        let mut g = globals();
        g.ca_file = Some("/var/lib/cdm-agent/serve/ca.crt".into());
        let j = job(json!({"id": 9, "kind": "restore", "application": app,
            "params": {"kind": "instant", "volume": "src", "snapshot": 4}}));
        let p = plan(&j, &g).unwrap();
        assert_eq!(p.work, Work::CloneRestore);
        let a = strings(&p);
        assert_eq!(
            after(&a, "--ca-file"),
            Some("/var/lib/cdm-agent/serve/ca.crt")
        );
        assert_eq!(after(&a, "clone"), Some("src@4"));
        assert_eq!(after(&a, "--name"), Some("src-4-job9"));
        assert_eq!(after(&a, "--port"), Some("5433"));
        let j = job(json!({"id": 9, "kind": "restore", "application": app,
            "params": {"kind": "clone", "volume": "src", "snapshot": 4, "name": "dev1", "port": 6543}}));
        let a = strings(&plan(&j, &g).unwrap());
        assert_eq!(after(&a, "--name"), Some("dev1"));
        assert_eq!(after(&a, "--port"), Some("6543"));
        let j = job(json!({"id": 9, "kind": "restore", "application": app,
            "params": {"kind": "regular", "volume": "src", "snapshot": 4, "target": "/restore/x"}}));
        let p = plan(&j, &g).unwrap();
        assert_eq!(p.work, Work::RegularRestore);
        let a = strings(&p);
        assert_eq!(after(&a, "regular"), Some("src@4"));
        assert_eq!(after(&a, "--target"), Some("/restore/x"));
        assert_eq!(after(&a, "--start-port"), None);
        for (params, why) in [
            (json!({"kind": "regular", "snapshot": 4}), "target"),
            (
                json!({"kind": "regular", "snapshot": 4, "target": "rel"}),
                "absolute",
            ),
            (json!({"kind": "instant"}), "snapshot"),
            (
                json!({"kind": "instant", "snapshot": 1, "port": 70000}),
                "port",
            ),
            (json!({"kind": "live", "snapshot": 1}), "live"),
        ] {
            let j = job(json!({"id": 9, "kind": "restore", "application": app, "params": params}));
            let e = plan(&j, &g).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn clone_results_name_the_database() {
        let v = json!({"kind": "clone", "clone": "c1", "postgres": {"port": 5433, "socket_dir": "/s/run"}});
        let r = result(&Work::CloneRestore, v.clone());
        assert_eq!(r["host"], "/s/run");
        assert_eq!(r["socket_dir"], "/s/run");
        assert_eq!(r["port"], 5433);
        assert_eq!(r["attachment"], "c1");
        assert_eq!(result(&Work::Backup, v.clone()), v);
        assert_eq!(stage_size(Some(1)), 8 << 30);
        assert_eq!(stage_size(Some((3 << 30) + 1)), 13 << 30);
    }
}
