//! Where hoard may connect on behalf of a registry it was not configured
//! for (`allow_any_upstream`): never to the mirror's own machine or the
//! network it sits in (loopback, private, link-local where cloud metadata
//! services live, unspecified, ...), and only to the allowed ports.
//! Owns the address classes, the port rule and the DNS resolver that
//! applies them to the addresses actually connected to. Configured
//! registries are never checked here: the operator named them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Why a destination was refused. `as_str()` is the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918, unique-local fc00::/7, CGNAT 100.64.0.0/10.
    Private,
    /// 169.254.0.0/16 (cloud metadata), fe80::/10.
    LinkLocal,
    /// 0.0.0.0/8, ::.
    Unspecified,
    /// Multicast and the limited broadcast address.
    Multicast,
    /// Other special-purpose ranges (documentation, benchmarking,
    /// reserved): not a public registry.
    Reserved,
    /// A port not in `upstream.any_ports`.
    Port,
}

impl Rule {
    /// The bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::Loopback => "loopback",
            Rule::Private => "private",
            Rule::LinkLocal => "link_local",
            Rule::Unspecified => "unspecified",
            Rule::Multicast => "multicast",
            Rule::Reserved => "reserved",
            Rule::Port => "port",
        }
    }
}

/// For the operator's log: the rule's name. What a client is told is
/// `registry::error`'s business (less than this).
impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rule an address breaks, `None` for a public address.
pub fn classify(ip: IpAddr) -> Option<Rule> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Rule> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (127, ..) => Rule::Loopback,
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => Rule::Private,
        // RFC 6598 shared address space: a carrier's or an office's NAT.
        (100, 64..=127, _) => Rule::Private,
        (169, 254, _) => Rule::LinkLocal,
        (0, ..) => Rule::Unspecified,
        (224..=239, ..) => Rule::Multicast,
        _ if ip.is_broadcast() => Rule::Multicast,
        // IETF protocol assignments, TEST-NET-1/2/3, benchmarking, 240/4.
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Rule::Reserved,
        (198, 18..=19, _) | (240..=255, ..) => Rule::Reserved,
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<Rule> {
    // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible) reach the v4
    // address: `::ffff:127.0.0.1` is loopback.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    if ip.is_loopback() {
        return Some(Rule::Loopback);
    }
    if ip.is_unspecified() {
        return Some(Rule::Unspecified);
    }
    let s = ip.segments();
    if s[..6] == [0; 6] {
        // Deprecated IPv4-compatible form.
        return classify_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ))
        .or(Some(Rule::Reserved));
    }
    let embedded =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    // Forms that carry an IPv4 address a gateway connects to: NAT64
    // (64:ff9b::/96, RFC 6052; on IPv6-only clusters DNS64 hands these
    // out for every v4 name), SIIT (::ffff:0:a.b.c.d, RFC 6145) and 6to4
    // (2002:aabb:ccdd::/48, RFC 3056). They are as internal as the v4
    // address inside.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        return classify_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return classify_v4(embedded(s[1], s[2]));
    }
    Some(match s[0] {
        // Local-use NAT64 (64:ff9b:1::/48, RFC 8215): a site's own gateway.
        0x64 if s[1] == 0xff9b && s[2] == 1 => Rule::Private,
        x if x & 0xfe00 == 0xfc00 => Rule::Private,
        // Site-local (fec0::/10): deprecated, still routed inside sites.
        x if x & 0xffc0 == 0xfec0 => Rule::Private,
        x if x & 0xffc0 == 0xfe80 => Rule::LinkLocal,
        x if x & 0xff00 == 0xff00 => Rule::Multicast,
        // 2001:db8::/32 documentation.
        0x2001 if s[1] == 0x0db8 => Rule::Reserved,
        _ => return None,
    })
}

/// The port and IP-literal checks for one URL of an unconfigured registry
/// (the resolver cannot see either: reqwest does not resolve IP literals
/// and resolves names without their port).
pub fn check_url(url: &reqwest::Url, ports: &[u16]) -> Result<(), Rule> {
    let port = url.port_or_known_default().unwrap_or(0);
    if !ports.contains(&port) {
        return Err(Rule::Port);
    }
    let host = url.host_str().unwrap_or_default();
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    match literal.parse::<IpAddr>() {
        Ok(ip) => classify(ip).map_or(Ok(()), Err),
        Err(_) => Ok(()),
    }
}

/// A destination refused by the guard, as an error the HTTP client carries
/// back from its resolver (found again by walking `source()`).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("destination not allowed: {0}")]
pub struct Refusal(pub Rule);

/// A name that did not resolve (found again by walking `source()`).
#[derive(Debug, thiserror::Error)]
#[error("dns lookup failed: {0}")]
pub struct LookupFailed(#[source] pub std::io::Error);

/// The system resolver, keeping only allowed addresses when `guarded`.
/// Used for every upstream request so a DNS failure is named as one.
#[derive(Debug, Clone, Copy)]
pub struct Resolver {
    pub guarded: bool,
}

impl Resolve for Resolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guarded = self.guarded;
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await
                .map_err(LookupFailed)?
                .collect();
            let (allowed, refused) = keep_allowed(found, guarded);
            if allowed.is_empty() {
                if let Some(rule) = refused {
                    return Err(Box::new(Refusal(rule)) as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The addresses that may be connected to, and the rule of the first one
/// dropped.
fn keep_allowed(found: Vec<SocketAddr>, guarded: bool) -> (Vec<SocketAddr>, Option<Rule>) {
    if !guarded {
        return (found, None);
    }
    let mut refused = None;
    let allowed = found
        .into_iter()
        .filter(|addr| match classify(addr.ip()) {
            Some(rule) => {
                refused.get_or_insert(rule);
                false
            }
            None => true,
        })
        .collect();
    (allowed, refused)
}

/// The refusal somewhere in an error's `source()` chain.
pub fn refusal_in(e: &(dyn std::error::Error + 'static)) -> Option<Rule> {
    super::cause::chain(e).find_map(|e| e.downcast_ref::<Refusal>().map(|r| r.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Option<Rule> {
        classify(s.parse().unwrap())
    }

    #[test]
    fn every_range_is_classified() {
        for (addr, expected) in [
            ("127.0.0.1", Some(Rule::Loopback)),
            ("127.255.255.254", Some(Rule::Loopback)),
            ("10.0.0.1", Some(Rule::Private)),
            ("10.255.255.255", Some(Rule::Private)),
            ("172.16.0.1", Some(Rule::Private)),
            ("172.31.255.255", Some(Rule::Private)),
            ("172.15.255.255", None),
            ("172.32.0.0", None),
            ("192.168.1.1", Some(Rule::Private)),
            ("100.64.0.1", Some(Rule::Private)),
            ("100.127.255.255", Some(Rule::Private)),
            ("100.63.255.255", None),
            ("100.128.0.0", None),
            ("169.254.169.254", Some(Rule::LinkLocal)),
            ("169.253.0.1", None),
            ("0.0.0.0", Some(Rule::Unspecified)),
            ("0.1.2.3", Some(Rule::Unspecified)),
            ("224.0.0.1", Some(Rule::Multicast)),
            ("239.255.255.250", Some(Rule::Multicast)),
            ("255.255.255.255", Some(Rule::Multicast)),
            ("192.0.2.1", Some(Rule::Reserved)),
            ("198.51.100.1", Some(Rule::Reserved)),
            ("203.0.113.1", Some(Rule::Reserved)),
            ("198.18.0.1", Some(Rule::Reserved)),
            ("240.0.0.1", Some(Rule::Reserved)),
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("104.16.0.1", None),
            ("::1", Some(Rule::Loopback)),
            ("::", Some(Rule::Unspecified)),
            ("fc00::1", Some(Rule::Private)),
            ("fd12:3456::1", Some(Rule::Private)),
            ("fe80::1", Some(Rule::LinkLocal)),
            ("febf::1", Some(Rule::LinkLocal)),
            ("ff02::1", Some(Rule::Multicast)),
            ("2001:db8::1", Some(Rule::Reserved)),
            ("::ffff:127.0.0.1", Some(Rule::Loopback)),
            ("::ffff:10.1.2.3", Some(Rule::Private)),
            ("::ffff:169.254.169.254", Some(Rule::LinkLocal)),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some(Rule::Loopback)),
            ("::169.254.169.254", Some(Rule::LinkLocal)),
            ("::8.8.8.8", Some(Rule::Reserved)),
            ("2606:4700::1111", None),
            ("2a00:1450::1", None),
        ] {
            assert_eq!(rule(addr), expected, "{addr}");
        }
    }

    #[test]
    fn ipv6_forms_carrying_an_internal_ipv4_address_are_refused() {
        let rule = |a: &str| classify(a.parse().unwrap());
        // NAT64 (RFC 6052): what DNS64 answers on IPv6-only clusters.
        assert_eq!(rule("64:ff9b::a00:1"), Some(Rule::Private));
        assert_eq!(rule("64:ff9b::7f00:1"), Some(Rule::Loopback));
        assert_eq!(rule("64:ff9b::a9fe:a9fe"), Some(Rule::LinkLocal));
        assert_eq!(rule("64:ff9b::808:808"), None, "a public v4 through NAT64");
        // Local-use NAT64 (RFC 8215), site-local, SIIT and 6to4.
        assert_eq!(rule("64:ff9b:1::a00:1"), Some(Rule::Private));
        assert_eq!(rule("fec0::1"), Some(Rule::Private));
        assert_eq!(rule("::ffff:0:a00:1"), Some(Rule::Private));
        assert_eq!(rule("2002:a00:1::1"), Some(Rule::Private));
        assert_eq!(rule("2002:a9fe:a9fe::1"), Some(Rule::LinkLocal));
        assert_eq!(rule("2002:808:808::1"), None);
    }

    #[test]
    fn urls_are_checked_for_port_and_ip_literal() {
        let ports = [80, 443];
        let check = |u: &str| check_url(&u.parse().unwrap(), &ports);
        assert_eq!(check("https://registry.example/v2/"), Ok(()));
        assert_eq!(check("http://registry.example/v2/"), Ok(()));
        assert_eq!(check("https://registry.example:443/"), Ok(()));
        assert_eq!(check("https://registry.example:8443/"), Err(Rule::Port));
        assert_eq!(check("http://registry.example:22/"), Err(Rule::Port));
        assert_eq!(check("https://127.0.0.1/"), Err(Rule::Loopback));
        assert_eq!(check("http://169.254.169.254/"), Err(Rule::LinkLocal));
        assert_eq!(check("https://[::1]/"), Err(Rule::Loopback));
        assert_eq!(check("https://[::ffff:10.0.0.1]/"), Err(Rule::Private));
        assert_eq!(check("https://8.8.8.8/"), Ok(()));
        // The port rule comes first: a refused port is never looked up.
        assert_eq!(check("https://127.0.0.1:18777/"), Err(Rule::Port));
        assert_eq!(
            check_url(&"https://127.0.0.1:5000/".parse().unwrap(), &[5000]),
            Err(Rule::Loopback)
        );
        assert_eq!(
            check_url(&"https://registry.example:5000/".parse().unwrap(), &[5000]),
            Ok(())
        );
    }

    #[test]
    fn only_allowed_addresses_are_kept() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let found = vec![a("127.0.0.1:0"), a("8.8.8.8:0"), a("[fe80::1]:0")];
        assert_eq!(
            keep_allowed(found.clone(), true),
            (vec![a("8.8.8.8:0")], Some(Rule::Loopback))
        );
        assert_eq!(keep_allowed(found.clone(), false), (found, None));
        assert_eq!(
            keep_allowed(vec![a("[::1]:0")], true),
            (vec![], Some(Rule::Loopback))
        );
    }

    #[test]
    fn a_refusal_is_found_in_a_source_chain() {
        let inner = Refusal(Rule::LinkLocal);
        assert_eq!(refusal_in(&Wrapper(inner)), Some(Rule::LinkLocal));
        let outer = std::io::Error::other(inner);
        assert_eq!(refusal_in(&outer), Some(Rule::LinkLocal));
        let plain = std::io::Error::other("no");
        assert_eq!(refusal_in(&plain), None);
    }

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapper(#[source] Refusal);
}
