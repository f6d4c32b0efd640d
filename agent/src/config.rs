//! The agent's configuration file (TOML): where the appliance is, how to
//! authenticate, where the agent keeps its state, and bandwidth limits.
//! Command-line flags win over the file.
//!
//! ```toml
//! url = "http://appliance:8080"
//! token_file = "/etc/cdm/agent.token"   # or token = "cdm_…"
//! nbd = "appliance:10809"                # or "unix:/run/cdm/nbd.sock"
//! state_dir = "/var/lib/cdm-agent"
//! [bandwidth]
//! limit_mibps = 200
//! [[bandwidth.window]]
//! start = "08:00"
//! end = "18:00"
//! limit_mibps = 20
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::throttle::Bandwidth;
use crate::{Error, ErrorKind};

pub const DEFAULT_PATH: &str = "/etc/cdm/agent.toml";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub url: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    pub nbd: Option<String>,
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub bandwidth: Bandwidth,
}

impl Config {
    /// Reads `path`; a missing default file is an empty configuration, a
    /// missing named file or a bad one is an error.
    pub fn load(path: Option<&Path>) -> Result<Config, Error> {
        let (p, named) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !named => {
                return Ok(Config::default())
            }
            Err(e) => {
                return Err(Error::with_source(
                    ErrorKind::Io,
                    p.display().to_string(),
                    e,
                ))
            }
        };
        let c: Config = toml::from_str(&text)
            .map_err(|e| Error::with_source(ErrorKind::Invalid, p.display().to_string(), e))?;
        c.bandwidth.validate().map_err(|e| {
            Error::with_source(ErrorKind::Invalid, format!("{}: bandwidth", p.display()), e)
        })?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.toml");
        std::fs::write(
            &p,
            "url = \"http://x:1\"\nnbd = \"x:2\"\n[bandwidth]\nlimit_mibps = 5\n[[bandwidth.window]]\nstart = \"08:00\"\nend = \"18:00\"\nlimit_mibps = 1\n",
        )
        .unwrap();
        let c = Config::load(Some(&p)).unwrap();
        assert_eq!(c.url.as_deref(), Some("http://x:1"));
        assert_eq!(c.bandwidth.windows.len(), 1);
        std::fs::write(&p, "urll = 1\n").unwrap();
        assert!(Config::load(Some(&p))
            .unwrap_err()
            .report()
            .contains("unknown field"));
        std::fs::write(
            &p,
            "[[bandwidth.window]]\nstart = \"9\"\nend = \"10:00\"\nlimit_mibps = 1\n",
        )
        .unwrap();
        assert!(Config::load(Some(&p)).is_err());
        assert!(Config::load(Some(&d.path().join("none"))).is_err());
    }
}
