//! The configuration of one S3 target. Secrets are kept out of `Debug`
//! (logs, panics) but serialized: the caller stores the config encrypted
//! at rest like the volume keys.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::TierError;

fn default_region() -> String {
    "us-east-1".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_retries() -> u32 {
    4
}

#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct S3Config {
    /// `http://` or `https://` URL of the service (no bucket in it).
    pub endpoint: String,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// Path-style (`endpoint/bucket/key`) rather than virtual-host
    /// (`bucket.endpoint/key`) addressing; most self-hosted servers want it.
    #[serde(default)]
    pub path_style: bool,
    /// Every key goes under it (e.g. `cdm/appliance-1/`); empty for the
    /// bucket's root.
    #[serde(default)]
    pub prefix: String,
    /// Per request: connecting, and each read or write on the socket.
    #[serde(default = "default_timeout", with = "secs")]
    pub timeout: Duration,
    /// Further attempts after a retryable failure (connection, timeout,
    /// 5xx, 429, SlowDown).
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default)]
    pub max_requests_per_sec: Option<u32>,
    #[serde(default)]
    pub max_bytes_per_sec: Option<u64>,
    /// A PEM file of extra CA certificates trusted besides the public
    /// roots (self-signed endpoints).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("path_style", &self.path_style)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field("max_requests_per_sec", &self.max_requests_per_sec)
            .field("max_bytes_per_sec", &self.max_bytes_per_sec)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl S3Config {
    /// A config with the defaults for everything but the target.
    pub fn new(endpoint: &str, bucket: &str, access_key: &str, secret_key: &str) -> S3Config {
        S3Config {
            endpoint: endpoint.into(),
            bucket: bucket.into(),
            region: default_region(),
            access_key: access_key.into(),
            secret_key: secret_key.into(),
            path_style: true,
            prefix: String::new(),
            timeout: default_timeout(),
            retries: default_retries(),
            max_requests_per_sec: None,
            max_bytes_per_sec: None,
            ca_file: None,
        }
    }

    /// Refuses what no request could work with, before any is made.
    pub fn validate(&self) -> Result<(), TierError> {
        let bad = |m: String| Err(TierError::Config(m));
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            return bad(format!(
                "endpoint {:?} is not an http:// or https:// URL",
                self.endpoint
            ));
        }
        if self.bucket.is_empty() || self.bucket.contains('/') {
            return bad(format!("bucket {:?} is not a bucket name", self.bucket));
        }
        if self.access_key.is_empty() || self.secret_key.is_empty() {
            return bad("access key and secret key are required".into());
        }
        if !self.prefix.is_empty() && !self.prefix.ends_with('/') {
            return bad(format!("prefix {:?} must end with '/'", self.prefix));
        }
        if self.prefix.starts_with('/') {
            return bad(format!("prefix {:?} must not start with '/'", self.prefix));
        }
        if self.timeout.is_zero() {
            return bad("timeout must be above zero".into());
        }
        if self.max_requests_per_sec == Some(0) || self.max_bytes_per_sec == Some(0) {
            return bad("a limit of 0 would stop every request (leave it out for none)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_the_secret_and_serde_keeps_it() {
        let c = S3Config::new("http://127.0.0.1:9000", "b", "AK", "very-secret-value");
        let d = format!("{c:?}");
        assert!(!d.contains("very-secret-value"), "{d}");
        assert!(d.contains("AK"));
        let j = serde_json::to_string(&c).unwrap();
        let back: S3Config = serde_json::from_str(&j).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn defaults_fill_a_minimal_config() {
        let c: S3Config = serde_json::from_str(
            r#"{"endpoint":"https://s3.example","bucket":"b","access_key":"a","secret_key":"s"}"#,
        )
        .unwrap();
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert!(!c.path_style);
        c.validate().unwrap();
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        let ok = S3Config::new("http://h:1", "b", "a", "s");
        type Edit = fn(&mut S3Config);
        let cases: [(&str, Edit); 6] = [
            ("not an http", |c| c.endpoint = "ftp://h".into()),
            ("not a bucket", |c| c.bucket = "a/b".into()),
            ("required", |c| c.secret_key.clear()),
            ("end with '/'", |c| c.prefix = "x".into()),
            ("above zero", |c| c.timeout = Duration::ZERO),
            ("stop every request", |c| c.max_requests_per_sec = Some(0)),
        ];
        for (want, f) in cases {
            let mut c = ok.clone();
            f(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
