//! A small client of qemu's JSON monitors over a unix socket: QMP (the
//! greeting, `qmp_capabilities`, commands with ids, asynchronous events
//! skipped) and the guest agent (no greeting; `guest-sync` first, as its
//! protocol asks, so a stale answer in the pipe is never taken for ours).
//! Every read has a deadline: a monitor that stops answering is an error,
//! never a hang.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::{Context as _, ErrorKind, Result};

/// Longest line a monitor may send (a `query-named-block-nodes` of a VM
/// with many disks stays far below).
const MAX_LINE: usize = 16 << 20;

/// One connection to a QMP or guest-agent socket.
pub struct Monitor {
    r: BufReader<UnixStream>,
    w: UnixStream,
    what: String,
    next_id: u64,
    timeout: Duration,
}

impl Monitor {
    fn connect(path: &Path, what: &str, timeout: Duration) -> Result<Monitor> {
        let s = UnixStream::connect(path).context_with(ErrorKind::Host, || {
            format!("{what} socket {} is not reachable", path.display())
        })?;
        let w = s.try_clone()?;
        Ok(Monitor {
            r: BufReader::new(s),
            w,
            what: format!("{what} {}", path.display()),
            next_id: 1,
            timeout,
        })
    }

    /// Connects to a QMP socket and leaves capabilities negotiation.
    pub fn qmp(path: &Path, timeout: Duration) -> Result<Monitor> {
        let mut m = Monitor::connect(path, "QMP", timeout)?;
        let g = m.read_line()?;
        if g.get("QMP").is_none() {
            crate::fail!(Host, "{}: no QMP greeting (got {g})", m.what);
        }
        m.execute("qmp_capabilities", json!({}))?;
        Ok(m)
    }

    /// Connects to a guest agent's socket and syncs with it.
    pub fn guest_agent(path: &Path, timeout: Duration) -> Result<Monitor> {
        let mut m = Monitor::connect(path, "guest agent", timeout)?;
        let token = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 & 0xffff_ffff)
            .unwrap_or_default()
            ^ (std::process::id() as u64) << 32;
        // 0xFF resets the agent's parser after a half-written command.
        m.w.write_all(&[0xff])?;
        let send = json!({"execute": "guest-sync", "arguments": {"id": token}});
        m.send(&send)?;
        let deadline = Instant::now() + timeout;
        loop {
            let v = m.read_line_until(deadline)?;
            if v.get("return") == Some(&json!(token)) {
                return Ok(m);
            }
        }
    }

    fn send(&mut self, v: &Value) -> Result<()> {
        let mut line = serde_json::to_vec(v)?;
        line.push(b'\n');
        self.w
            .write_all(&line)
            .context_with(ErrorKind::Host, || format!("{}: write", self.what))
    }

    fn read_line(&mut self) -> Result<Value> {
        let deadline = Instant::now() + self.timeout;
        self.read_line_until(deadline)
    }

    /// One JSON message, before `deadline`.
    fn read_line_until(&mut self, deadline: Instant) -> Result<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            crate::fail!(Host, "{}: no answer in {:?}", self.what, self.timeout);
        }
        self.r.get_ref().set_read_timeout(Some(left))?;
        let mut line = Vec::new();
        let n = Read::take(&mut self.r, MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    crate::err!(Host, "{}: no answer in {:?}", self.what, self.timeout)
                }
                _ => crate::err!(Host, "{}: read: {e}", self.what),
            })?;
        if n == 0 {
            crate::fail!(Host, "{}: the monitor closed the connection", self.what);
        }
        // The guest agent may answer a 0xFF reset with one: not JSON.
        let text = line.strip_prefix(&[0xff]).unwrap_or(&line);
        serde_json::from_slice(text).context_with(ErrorKind::Host, || {
            format!("{}: not a JSON message", self.what)
        })
    }

    /// Runs `cmd` and returns its `return`; events met on the way are
    /// skipped, an `error` answer is an error with qemu's words.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": cmd, "id": id});
        if args.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = args;
        }
        self.send(&msg)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let v = self.read_line_until(deadline)?;
            if v.get("event").is_some() {
                tracing::debug!(monitor = %self.what, event = %v, "event");
                continue;
            }
            // The guest agent does not echo ids; QMP always does.
            if v.get("id").is_some_and(|x| x != &json!(id)) {
                continue;
            }
            if let Some(e) = v.get("error") {
                crate::fail!(
                    Host,
                    "{}: {cmd} failed: {} ({})",
                    self.what,
                    e["desc"].as_str().unwrap_or("no description"),
                    e["class"].as_str().unwrap_or("no class")
                );
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted monitor: answers each command line with the next reply.
    fn fake(dir: &Path, greeting: &str, replies: Vec<&'static str>) -> std::path::PathBuf {
        let p = dir.join("m.sock");
        let l = UnixListener::bind(&p).unwrap();
        let greeting = greeting.to_string();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            if !greeting.is_empty() {
                writeln!(w, "{greeting}").unwrap();
            }
            for rep in replies {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                writeln!(w, "{rep}").unwrap();
            }
            std::thread::sleep(Duration::from_secs(5));
        });
        p
    }

    #[test]
    fn executes_skips_events_and_reports_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = fake(
            d.path(),
            r#"{"QMP": {"version": {}, "capabilities": []}}"#,
            vec![
                r#"{"return": {}, "id": 1}"#,
                "{\"event\": \"JOB_STATUS_CHANGE\"}\n{\"return\": [1], \"id\": 2}",
                r#"{"error": {"class": "GenericError", "desc": "Cannot find device=x"}, "id": 3}"#,
            ],
        );
        let mut m = Monitor::qmp(&p, Duration::from_secs(2)).unwrap();
        assert_eq!(m.execute("query-block", json!({})).unwrap(), json!([1]));
        let e = m.execute("x", json!({"a": 1})).unwrap_err();
        assert!(format!("{e:#}").contains("Cannot find device=x"), "{e:#}");
        // No answer at all: a timeout, not a hang.
        let e = m.execute("y", json!({})).unwrap_err();
        assert!(format!("{e:#}").contains("no answer"), "{e:#}");
    }

    #[test]
    fn unreachable_and_silent_monitors_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = Monitor::qmp(&d.path().join("none"), Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("is not reachable"), "{e:#}");
        let p = fake(d.path(), "", vec![]);
        let e = Monitor::qmp(&p, Duration::from_millis(300)).err().unwrap();
        assert!(format!("{e:#}").contains("no answer"), "{e:#}");
    }
}
