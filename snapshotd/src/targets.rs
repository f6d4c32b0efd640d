//! Where webhooks may go. Whoever may create a webhook could otherwise make
//! snapshotd send requests to itself or its host (loopback), to a cloud
//! metadata service (link-local 169.254.169.254) and the like — a
//! server-side request forgery. By default such addresses are refused at
//! creation and again at every delivery (DNS answers change), and the
//! delivery agent only connects to addresses that passed the check
//! ([`Guard`]), so a name cannot be re-pointed between check and connect.
//! `[webhooks] allow_private = true` lifts the restriction.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

/// Why `ip` may not be a webhook target, if it may not.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => {
            if a.is_loopback() {
                Some("loopback")
            } else if a.is_link_local() {
                Some("link-local")
            } else if a.is_unspecified() {
                Some("unspecified")
            } else if a.is_multicast() || a.is_broadcast() {
                Some("multicast or broadcast")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            // ::ffff:127.0.0.1 reaches 127.0.0.1.
            if let Some(v4) = a.to_ipv4_mapped() {
                return forbidden(IpAddr::V4(v4));
            }
            if a.is_loopback() {
                Some("loopback")
            } else if a.segments()[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if a.is_unspecified() {
                Some("unspecified")
            } else if a.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
    }
}

/// `Err(reason)` if any of `addrs` is forbidden (a name that resolves to
/// one good and one bad address is refused: the client may pick either).
pub fn check_addrs(host: &str, addrs: &[SocketAddr]) -> Result<(), String> {
    for a in addrs {
        if let Some(why) = forbidden(a.ip()) {
            return Err(format!(
                "webhook host {host} resolves to {} ({why}); such targets are refused \
                 unless [webhooks] allow_private = true",
                a.ip()
            ));
        }
    }
    Ok(())
}

/// Checks a webhook URL's host. A name that does not resolve now passes
/// (the delivery checks again, and fails if it still cannot resolve).
pub fn check_url(url: &str) -> Result<(), String> {
    let u = url::Url::parse(url).map_err(|e| format!("bad webhook url {url:?}: {e}"))?;
    let port = u.port_or_known_default().unwrap_or(80);
    let addrs: Vec<SocketAddr> = match u.host() {
        Some(url::Host::Ipv4(a)) => vec![SocketAddr::new(IpAddr::V4(a), port)],
        Some(url::Host::Ipv6(a)) => vec![SocketAddr::new(IpAddr::V6(a), port)],
        Some(url::Host::Domain(d)) => match (d, port).to_socket_addrs() {
            Ok(it) => it.collect(),
            Err(_) => return Ok(()),
        },
        None => return Err(format!("webhook url {url:?} has no host")),
    };
    check_addrs(u.host_str().unwrap_or(""), &addrs)
}

/// The delivery agent's resolver: resolves as usual, then refuses
/// forbidden addresses unless `allow_private`.
pub struct Guard {
    pub allow_private: bool,
}

impl ureq::Resolver for Guard {
    fn resolve(&self, netloc: &str) -> io::Result<Vec<SocketAddr>> {
        let addrs: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        if !self.allow_private {
            let host = netloc.rsplit_once(':').map_or(netloc, |(h, _)| h);
            check_addrs(host, &addrs)
                .map_err(|m| io::Error::new(io::ErrorKind::PermissionDenied, m))?;
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(s: &str) -> Option<&'static str> {
        forbidden(s.parse().unwrap())
    }

    #[test]
    fn classifies_addresses() {
        assert_eq!(why("127.0.0.1"), Some("loopback"));
        assert_eq!(why("127.8.9.10"), Some("loopback"));
        assert_eq!(why("169.254.169.254"), Some("link-local"));
        assert_eq!(why("0.0.0.0"), Some("unspecified"));
        assert_eq!(why("224.0.0.1"), Some("multicast or broadcast"));
        assert_eq!(why("255.255.255.255"), Some("multicast or broadcast"));
        assert_eq!(why("::1"), Some("loopback"));
        assert_eq!(why("fe80::1"), Some("link-local"));
        assert_eq!(why("febf::1"), Some("link-local"));
        assert_eq!(why("::"), Some("unspecified"));
        assert_eq!(why("ff02::1"), Some("multicast"));
        assert_eq!(why("::ffff:127.0.0.1"), Some("loopback"));
        // Private networks are where webhook receivers usually live.
        assert_eq!(why("10.1.2.3"), None);
        assert_eq!(why("192.168.1.1"), None);
        assert_eq!(why("93.184.216.34"), None);
        assert_eq!(why("fec0::1"), None);
        assert_eq!(why("2001:db8::1"), None);
    }

    #[test]
    fn checks_urls() {
        assert!(check_url("http://127.0.0.1:9/hook").is_err());
        assert!(check_url("http://[::1]/").is_err());
        assert!(check_url("https://169.254.169.254/latest").is_err());
        assert!(check_url("http://localhost:8080/").is_err());
        assert!(check_url("http://10.0.0.1/").is_ok());
        // Not resolvable now: the delivery decides.
        assert!(check_url("http://no-such-host.invalid/").is_ok());
        let e = check_url("http://127.0.0.1/").unwrap_err();
        assert!(e.contains("loopback") && e.contains("allow_private"), "{e}");
    }
}
