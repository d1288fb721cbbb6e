//! Which peers are trusted reverse proxies, and what a request's forwarded headers are allowed to
//! say because of it.
//!
//! The operator listener speaks plain HTTP; behind a TLS-terminating proxy the browser's scheme
//! and address are only known from the proxy's `X-Forwarded-Proto` and `X-Forwarded-For`. Anyone
//! can send those headers, so they are read **only on connections from a configured proxy**
//! (`--trusted-proxy ADDR`, an address or a CIDR block, repeatable); from any other peer they are
//! ignored and the request is taken as `http` from the peer's own address.
//!
//! From a trusted proxy:
//! - the scheme is the **last** `X-Forwarded-Proto` value (the one the nearest proxy — the
//!   trusted one — wrote; an `https` a client put in front of it does not count), `http` or
//!   `https`; anything else is taken as `http`;
//! - the client address is the last `X-Forwarded-For` entry that is not itself a trusted proxy
//!   (entries to its left were written by parties we do not trust); an unparsable entry stops
//!   the walk there and the peer's address stands.
//!
//! The scheme decides whether the session cookie is `Secure` and which `Origin` counts as this
//! site's ([`super::auth::same_origin`]); the address is the source the login limiter counts.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use hyper::HeaderMap;

/// The scheme a browser used to reach the operator listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP (the listener itself).
    Http,
    /// HTTPS, terminated by a trusted proxy.
    Https,
}

impl Scheme {
    /// `"http"` or `"https"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An address block: an address and a prefix length (`10.0.0.0/8`, `fd00::/8`, `192.0.2.7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a `--trusted-proxy` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not an IP address or CIDR block (`192.0.2.1`, `10.0.0.0/8`, `fd00::/8`)")]
pub struct CidrError {
    input: String,
}

/// An address as the limiter and the proxy list compare it: IPv4-mapped IPv6 as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl Cidr {
    /// Whether `ip` is in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, CidrError> {
        let bad = || CidrError {
            input: s.to_owned(),
        };
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr = canonical(addr.parse::<IpAddr>().map_err(|_| bad())?);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?,
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Where a request came from, once trusted proxies are accounted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Client {
    /// The client's address: the peer's, or the one a trusted proxy forwarded.
    pub ip: IpAddr,
    /// The scheme the client used.
    pub scheme: Scheme,
}

/// The reverse proxies whose forwarded headers are believed (none by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    /// Trusts peers in any of `blocks`.
    pub fn new(blocks: impl IntoIterator<Item = Cidr>) -> Self {
        Self(blocks.into_iter().collect())
    }

    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// Who sent a request that arrived from `peer` with `headers` (see the module docs). An
    /// unknown peer is an untrusted one at the unspecified address.
    pub fn client(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Client {
        let peer_ip = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| canonical(p.ip()));
        let direct = Client {
            ip: peer_ip,
            scheme: Scheme::Http,
        };
        if !self.trusts(peer_ip) {
            return direct;
        }
        let last_value = |name: &str| {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .rfind(|v| !v.is_empty())
        };
        let scheme = match last_value("x-forwarded-proto") {
            Some(p) if p.eq_ignore_ascii_case("https") => Scheme::Https,
            _ => Scheme::Http,
        };
        let mut ip = peer_ip;
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        for hop in hops.iter().rev() {
            let Ok(hop) = hop.parse::<IpAddr>() else {
                break;
            };
            ip = canonical(hop);
            if !self.trusts(ip) {
                break;
            }
        }
        Client { ip, scheme }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn peer(s: &str) -> Option<SocketAddr> {
        Some(SocketAddr::new(s.parse().unwrap(), 4711))
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn blocks_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(
            c.contains("::ffff:10.1.2.3".parse().unwrap()),
            "mapped IPv4"
        );
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert_eq!(one.to_string(), "192.0.2.7/32");
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.1".parse().unwrap()));
        for bad in ["", "10.0.0.0/33", "::/129", "host.example", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_headers_count_only_from_a_trusted_proxy() {
        let h = headers(&[
            ("x-forwarded-proto", "https"),
            ("x-forwarded-for", "198.51.100.9"),
        ]);
        let none = TrustedProxies::default();
        assert_eq!(
            none.client(peer("127.0.0.1"), &h),
            Client {
                ip: "127.0.0.1".parse().unwrap(),
                scheme: Scheme::Http
            }
        );
        let proxies = TrustedProxies::new(["127.0.0.1".parse().unwrap()]);
        assert_eq!(
            proxies.client(peer("127.0.0.1"), &h),
            Client {
                ip: "198.51.100.9".parse().unwrap(),
                scheme: Scheme::Https
            }
        );
        // Another peer's headers are still ignored.
        assert_eq!(proxies.client(peer("192.0.2.1"), &h).scheme, Scheme::Http);
        assert_eq!(proxies.client(None, &h).scheme, Scheme::Http);
    }

    #[test]
    fn only_what_the_trusted_proxy_wrote_counts() {
        let proxies = TrustedProxies::new(["10.0.0.0/8".parse().unwrap()]);
        // The client put `https` and a fake address first; the proxy appended the truth.
        let h = headers(&[
            ("x-forwarded-proto", "https, http"),
            ("x-forwarded-for", "1.1.1.1, 203.0.113.5, 10.0.0.2"),
        ]);
        let c = proxies.client(peer("10.0.0.1"), &h);
        assert_eq!(c.scheme, Scheme::Http);
        assert_eq!(c.ip, "203.0.113.5".parse::<IpAddr>().unwrap());
        // Garbage stops the walk.
        let h = headers(&[("x-forwarded-for", "203.0.113.5, nonsense")]);
        assert_eq!(
            proxies.client(peer("10.0.0.1"), &h).ip,
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
