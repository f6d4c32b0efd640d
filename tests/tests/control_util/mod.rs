//! What the control plane's tests share: an agent speaking the protocol
//! over HTTP, the appliance started with the fake clock, and short helpers
//! for the API. (A module, not a test target: `mod control_util;`.)
#![allow(dead_code)]

use cdm_e2e::*;
use serde_json::{json, Value};

/// An agent as the appliance sees one: a host credential over HTTP.
pub struct Agent {
    pub base: String,
    pub token: String,
    pub name: String,
}

impl Agent {
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let b = body.map(|v| v.to_string());
        http(&self.base, method, path, Some(&self.token), b.as_deref())
    }
    pub fn expect(&self, status: u16, method: &str, path: &str, body: Option<Value>) -> Value {
        let (s, v) = self.call(method, path, body);
        assert_eq!(s, status, "{} {method} {path} answered {s}: {v}", self.name);
        v
    }
    pub fn heartbeat(&self, first: bool, running: &[u64], apps: Value) -> Value {
        self.expect(
            200,
            "POST",
            "/v1/agent/heartbeat",
            Some(json!({"version": "0.1.0", "os": "linux", "hostname": format!("{}.example", self.name),
                        "capabilities": ["postgresql", "files"], "running": running, "first": first,
                        "applications": apps})),
        )
    }
    /// The jobs handed out now (no waiting).
    pub fn pull(&self) -> Vec<Value> {
        let v = self.expect(200, "GET", "/v1/agent/jobs?wait=0", None);
        v.as_array().expect("jobs").clone()
    }
    pub fn progress(&self, id: u64, log: &[&str]) -> (u16, Value) {
        self.call(
            "POST",
            &format!("/v1/agent/jobs/{id}/progress"),
            Some(json!({"done": 1, "total": 4, "log": log})),
        )
    }
    pub fn finish(&self, id: u64, body: Value) -> (u16, Value) {
        self.call("POST", &format!("/v1/agent/jobs/{id}/finish"), Some(body))
    }
}

pub fn start(args: &[&str]) -> (Appliance, Api) {
    let mut all = vec!["--pool-size", "4G", "--pool-sparse"];
    all.extend_from_slice(args);
    let a = Appliance::start_with(Some(FAST_CONFIG), None, &all);
    let api = Api::new(&a, &a.admin_token());
    (a, api)
}

pub fn token(api: &Api, body: Value) -> String {
    let v = api.expect(201, "POST", "/v1/hosts/enrolments", Some(body));
    assert!(
        v["expires_at"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{v}"
    );
    v["token"].as_str().expect("token").to_string()
}

pub fn enrol_raw(a: &Appliance, body: Value) -> (u16, Value) {
    http(
        &a.url(),
        "POST",
        "/v1/agent/enrol",
        None,
        Some(&body.to_string()),
    )
}

pub fn enrol(a: &Appliance, api: &Api, name: &str) -> Agent {
    let t = token(api, json!({"name": name}));
    let (s, v) = enrol_raw(
        a,
        json!({"token": t, "hostname": format!("{name}.example"), "version": "0.1.0", "os": "linux"}),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["host"], name);
    assert_eq!(v["heartbeat_seconds"], 10);
    Agent {
        base: a.url(),
        token: v["credential"].as_str().expect("credential").to_string(),
        name: name.to_string(),
    }
}

pub fn advance(api: &Api, secs: u64) {
    api.expect(
        200,
        "POST",
        "/v1/clock",
        Some(json!({"advance_secs": secs})),
    );
}

pub fn app(api: &Api, host: &str, name: &str) -> u64 {
    let v = api.expect(
        201,
        "POST",
        "/v1/applications",
        Some(json!({"host": host, "kind": "postgresql", "name": name,
                    "config": {"host": "/run/postgresql", "port": 5432, "user": "postgres"}})),
    );
    v["id"].as_u64().expect("id")
}

pub fn policy(api: &Api, body: Value) {
    api.expect(201, "POST", "/v1/protection-policies", Some(body));
}

pub fn assign(api: &Api, id: u64, p: Option<&str>) -> Value {
    api.expect(
        200,
        "PUT",
        &format!("/v1/applications/{id}/policy"),
        Some(json!({"policy": p})),
    )
}

/// Takes a point of `vol` by the API (`body`: label, metadata); its id.
pub fn snapshot(api: &Api, vol: &str, body: Value) -> u64 {
    let s = api.expect(
        201,
        "POST",
        &format!("/v1/volumes/{vol}/snapshots"),
        Some(body),
    );
    s["id"].as_u64().expect("a snapshot id")
}

pub fn job(api: &Api, id: u64) -> Value {
    api.get(&format!("/v1/jobs/{id}"))
}

pub fn jobs(api: &Api, q: &str) -> Vec<Value> {
    api.get(&format!("/v1/jobs?{q}"))
        .as_array()
        .expect("jobs")
        .clone()
}

pub fn host_state(api: &Api, name: &str) -> String {
    api.get(&format!("/v1/hosts/{name}"))["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

pub fn events_of(api: &Api, kind: &str) -> Vec<Value> {
    api.get(&format!("/v1/events?type={kind}&limit=1000"))
        .as_array()
        .expect("events")
        .clone()
}

/// A text answer of the API (metrics), with the admin's token.
pub fn api_text(a: &Appliance, path: &str) -> String {
    let (s, v) = http(&a.url(), "GET", path, Some(&a.admin_token()), None);
    assert_eq!(s, 200);
    v.as_str().unwrap_or_default().to_string()
}
