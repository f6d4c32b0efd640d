//! The snapshotd under test: started with its data directory on the soak's
//! filesystem and its log, socket and ready file beside the driver's work
//! directory (a full data filesystem must not silence the log), killed
//! with SIGKILL or stopped with SIGTERM; its API called without panics
//! (a dead daemon is an expected answer during a kill).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// How long a start may take before it counts as hung.
const START_TIMEOUT: Duration = Duration::from_secs(180);

pub struct Daemon {
    pub bin_dir: PathBuf,
    pub data: PathBuf,
    pub work: PathBuf,
    pub pool_size: u64,
    /// Extra arguments for the pool's kind (`--pool-sparse`), if any.
    pool_args: Vec<String>,
    pub sock: PathBuf,
    pub api: String,
    pub token: String,
    child: Option<Child>,
    pub starts: u32,
}

impl Daemon {
    pub fn new(
        bin_dir: &Path,
        data: &Path,
        work: &Path,
        pool_size: u64,
        sparse: bool,
    ) -> Result<Daemon> {
        std::fs::write(work.join("snapshotd.toml"), "scheduler_tick_ms = 1000\n")?;
        // Builds from before preallocated pools make sparse pools only
        // (and know no --pool-sparse).
        let help = Command::new(bin_dir.join("snapshotd"))
            .arg("--help")
            .output()
            .context("cannot run snapshotd --help")?;
        let can_choose = String::from_utf8_lossy(&help.stdout).contains("--pool-sparse");
        let pool_args = match (sparse, can_choose) {
            (true, true) => vec!["--pool-sparse".to_string()],
            (true, false) | (false, true) => Vec::new(),
            (false, false) => bail!("this snapshotd makes sparse pools only"),
        };
        Ok(Daemon {
            bin_dir: bin_dir.to_path_buf(),
            data: data.to_path_buf(),
            work: work.to_path_buf(),
            pool_size,
            pool_args,
            sock: work.join("nbd.sock"),
            api: String::new(),
            token: String::new(),
            child: None,
            starts: 0,
        })
    }

    pub fn log_path(&self) -> PathBuf {
        self.work.join("snapshotd.log")
    }

    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.sock.display())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn start(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("snapshotd is already running");
        }
        let ready = self.work.join("snapshotd.ready");
        let _ = std::fs::remove_file(&ready);
        let _ = std::fs::remove_file(&self.sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = Command::new(self.bin_dir.join("snapshotd"));
        cmd.arg("--data")
            .arg(&self.data)
            .arg("--nbd")
            .arg(self.endpoint())
            .args(["--api", "127.0.0.1:0", "--ready-file"])
            .arg(&ready)
            .arg("--pool-size")
            .arg(self.pool_size.to_string())
            .args(&self.pool_args)
            .arg("--config")
            .arg(self.work.join("snapshotd.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl(2) in the child before exec, async-signal-safe: a
        // driver that dies (killed, interrupted) takes snapshotd with it
        // instead of leaving it holding the soak's filesystem.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("cannot start snapshotd")?;
        let deadline = Instant::now() + START_TIMEOUT;
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&ready) {
                break t;
            }
            if let Some(st) = child.try_wait()? {
                bail!(
                    "snapshotd exited with {st} before it was ready (log: {})",
                    self.log_path().display()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("snapshotd not ready after {START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let v: Value = serde_json::from_str(&text).context("ready file")?;
        self.api = v["api"]
            .as_str()
            .context("no API address in the ready file")?
            .to_string();
        self.token = std::fs::read_to_string(self.data.join("admin.token"))
            .context("DATA/admin.token")?
            .trim()
            .to_string();
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// SIGKILL, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; fails unless it exits 0.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the child we started.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait()?;
            if !st.success() {
                bail!(
                    "snapshotd exited with {st} after SIGTERM (log: {})",
                    self.log_path().display()
                );
            }
        }
        Ok(())
    }

    pub fn api(&self) -> Api {
        Api {
            base: format!("http://{}", self.api),
            token: self.token.clone(),
        }
    }

    /// Runs `cdmfs fsck` on the pool (snapshotd must be stopped).
    pub fn fsck(&self) -> Result<String> {
        let out = Command::new(self.bin_dir.join("cdmfs"))
            .arg("--pool")
            .arg(self.data.join("pool"))
            .arg("fsck")
            .output()
            .context("cannot run cdmfs fsck")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() || !text.contains("clean") {
            bail!("cdmfs fsck failed ({}): {text}", out.status);
        }
        Ok(text)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The API of the current daemon.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: String,
}

/// An answer: status and body (JSON, or the text as a JSON string).
pub type Answer = (u16, Value);

impl Api {
    /// One call; `Err` only when no answer came (connection refused or
    /// reset, timeout): the daemon is down.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Answer, String> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(120))
            .build();
        let req = agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token));
        let res = match body {
            Some(b) => req
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(format!("{method} {path}: {e}")),
        };
        let status = resp.status();
        let text = resp
            .into_string()
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }

    pub fn get(&self, path: &str) -> Result<Answer, String> {
        self.call("GET", path, None)
    }

    /// A call that must answer `want`: the body, or a message naming what came.
    pub fn expect(
        &self,
        want: u16,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        match self.call(method, path, body) {
            Ok((s, v)) if s == want => Ok(v),
            Ok((s, v)) => bail!("{method} {path} answered {s} (wanted {want}): {v}"),
            Err(e) => bail!("{e}"),
        }
    }
}

/// One sample of the daemon's resources.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Seconds since the soak started.
    pub at: f64,
    /// Seconds since this snapshotd started.
    pub uptime: f64,
    pub rss_kib: u64,
    pub fds: u64,
}

/// Reads VmRSS and the number of open descriptors of `pid`.
pub fn sample(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((rss, fds))
}
