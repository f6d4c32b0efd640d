//! The service's calls to the appliance (`/v1/agent/*`), each answer
//! sorted into what the service does next: go on, retry later (the
//! appliance is down or restarting), or stop (the credential is refused:
//! the host was retired).

use std::path::Path;
use std::time::Duration;

use cdm_api::client::{encode_segment, Client, ClientError};
use serde::Deserialize;
use serde_json::{json, Value};

use super::archive::Task;
use super::ServeError;

/// Longest long poll the contract allows.
pub const MAX_WAIT: u64 = 30;

/// The appliance as seen with this host's credential.
pub struct Link {
    /// Short calls: heartbeat, progress, finish.
    calls: Client,
    /// The long poll, whose answer may take `MAX_WAIT` seconds.
    poll: Client,
}

/// `POST /v1/agent/enrol`'s answer.
#[derive(Debug, Deserialize)]
pub struct Enrolled {
    pub host: String,
    pub credential: String,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u64,
}

fn default_heartbeat() -> u64 {
    10
}

/// What the appliance said of a running job's progress.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Continue,
    /// Cancelled on the appliance: stop the child, finish as cancelled.
    Cancel,
    /// Not this host's, or no longer running: stop the child.
    Gone(String),
}

/// What the appliance said of a job's outcome.
#[derive(Debug, PartialEq, Eq)]
pub enum Finished {
    Recorded,
    /// The job is not this host's, or no longer running (404/409/410):
    /// the appliance has its own outcome for it.
    Gone(String),
    /// The body is over the API's limit (413).
    TooLarge(String),
    /// Any other refusal (4xx).
    Refused(String),
}

/// What a heartbeat's answer says.
#[derive(Debug, PartialEq)]
pub struct Beat {
    pub interval: u64,
    pub archives: Vec<Task>,
}

/// Reads a heartbeat's answer; an archive task the agent cannot read is
/// left out (and said).
pub fn beat(v: &Value) -> Beat {
    let archives = match &v["archives"] {
        Value::Array(a) => a
            .iter()
            .filter_map(|t| match serde_json::from_value::<Task>(t.clone()) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(task = %t, error = %e, "an archive task this agent cannot read: ignored");
                    None
                }
            })
            .collect(),
        _ => Vec::new(),
    };
    Beat {
        interval: v["heartbeat_seconds"].as_u64().unwrap_or(10).clamp(1, 3600),
        archives,
    }
}

/// A call's transport failure or 5xx is worth retrying; 401 means the
/// credential is gone; other statuses are answers.
fn classify(r: Result<(u16, Value), ClientError>) -> Result<(u16, Value), ServeError> {
    match r {
        Err(e) => Err(ServeError::Unreachable(e.to_string())),
        Ok((401, v)) => Err(ServeError::Retired(message(401, &v))),
        Ok((s, v)) if s >= 500 => Err(ServeError::Unreachable(message(s, &v))),
        Ok(x) => Ok(x),
    }
}

/// The API's error message of an answer.
pub fn message(status: u16, v: &Value) -> String {
    match (&v["error"]["message"], v) {
        (Value::String(m), _) => format!("{m} (HTTP {status})"),
        (_, Value::String(s)) if !s.is_empty() => format!("{s} (HTTP {status})"),
        _ => format!("HTTP {status}"),
    }
}

/// The job poll: the wait (at most [`MAX_WAIT`]) and how many jobs this
/// agent can start now (its free `--max-jobs` slots).
pub fn jobs_path(wait: u64, slots: usize) -> String {
    format!("/v1/agent/jobs?wait={}&slots={slots}", wait.min(MAX_WAIT))
}

/// A client of `url` that trusts only the CA in `ca` for https.
fn client(
    url: &str,
    token: Option<&str>,
    timeout: Duration,
    ca: Option<&Path>,
) -> Result<Client, ServeError> {
    Client::with_ca(url, token.map(str::to_string), timeout, ca)
        .map_err(|e| ServeError::Invalid(e.to_string()))
}

impl Link {
    /// The appliance at `url`, with the host's credential; `ca` pinned.
    pub fn new(url: &str, credential: &str, ca: Option<&Path>) -> Result<Link, ServeError> {
        Ok(Link {
            calls: client(url, Some(credential), Duration::from_secs(30), ca)?,
            poll: client(
                url,
                Some(credential),
                Duration::from_secs(MAX_WAIT + 30),
                ca,
            )?,
        })
    }

    /// Enrols with a one-time token (no credential yet).
    pub fn enrol(url: &str, ca: Option<&Path>, body: &Value) -> Result<Enrolled, ServeError> {
        let c = client(url, None, Duration::from_secs(30), ca)?;
        match c.request("POST", "/v1/agent/enrol", Some(body)) {
            Err(e) => Err(ServeError::Unreachable(e.to_string())),
            Ok((s, v)) if s >= 500 => Err(ServeError::Unreachable(message(s, &v))),
            Ok((200..=299, v)) => serde_json::from_value(v)
                .map_err(|e| ServeError::Unreachable(format!("unexpected enrolment answer: {e}"))),
            Ok((s, v)) => Err(ServeError::EnrolRefused(message(s, &v))),
        }
    }

    /// Returns the heartbeat interval the appliance wants and the log
    /// archivers it asks for (none from an appliance that predates them).
    pub fn heartbeat(&self, body: &Value) -> Result<Beat, ServeError> {
        let (s, v) = classify(
            self.calls
                .request("POST", "/v1/agent/heartbeat", Some(body)),
        )?;
        if !(200..300).contains(&s) {
            return Err(ServeError::Refused(message(s, &v)));
        }
        Ok(beat(&v))
    }

    /// At most `slots` jobs for this host, after at most `wait` seconds.
    pub fn jobs(&self, wait: u64, slots: usize) -> Result<Vec<Value>, ServeError> {
        let path = jobs_path(wait, slots);
        let (s, v) = classify(self.poll.request("GET", &path, None))?;
        match (s, v) {
            (200..=299, Value::Array(a)) => Ok(a),
            (200..=299, v) => Err(ServeError::Unreachable(format!(
                "unexpected answer to the job poll: {v}"
            ))),
            (s, v) => Err(ServeError::Refused(message(s, &v))),
        }
    }

    pub fn progress(&self, id: u64, log: &[String]) -> Result<Progress, ServeError> {
        let body = json!({"done": 0, "total": 0, "log": log});
        let path = format!(
            "/v1/agent/jobs/{}/progress",
            encode_segment(&id.to_string())
        );
        let (s, v) = classify(self.calls.request("POST", &path, Some(&body)))?;
        Ok(match s {
            200..=299 if v["cancel"] == Value::Bool(true) => Progress::Cancel,
            200..=299 => Progress::Continue,
            404 | 409 | 410 => Progress::Gone(message(s, &v)),
            _ => return Err(ServeError::Refused(message(s, &v))),
        })
    }

    pub fn finish(&self, id: u64, body: &Value) -> Result<Finished, ServeError> {
        let path = format!("/v1/agent/jobs/{}/finish", encode_segment(&id.to_string()));
        let (s, v) = classify(self.calls.request("POST", &path, Some(body)))?;
        Ok(match s {
            200..=299 => Finished::Recorded,
            404 | 409 | 410 => Finished::Gone(message(s, &v)),
            413 => Finished::TooLarge(message(s, &v)),
            _ => Finished::Refused(message(s, &v)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_answers_with_and_without_archives() {
        let b = beat(&json!({"heartbeat_seconds": 2, "archives": [
            {"application": 4, "kind": "postgresql", "volume": "v", "config": {"host": "/s"}},
            {"application": "x"}
        ]}));
        assert_eq!(b.interval, 2);
        assert_eq!(b.archives.len(), 1);
        assert_eq!(b.archives[0].application, 4);
        let old = beat(&json!({"heartbeat_seconds": 10}));
        assert_eq!((old.interval, old.archives.len()), (10, 0));
    }

    #[test]
    fn the_poll_says_how_many_jobs_fit() {
        assert_eq!(jobs_path(25, 3), "/v1/agent/jobs?wait=25&slots=3");
        assert_eq!(jobs_path(600, 1), "/v1/agent/jobs?wait=30&slots=1");
    }
}
