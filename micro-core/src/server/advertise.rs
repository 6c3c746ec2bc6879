//! The address a server announces: the override, the bound address, or the first reachable
//! interface's when bound to every interface.
//!
//! # Examples
//! ```
//! use micro_core::server::advertise_address;
//! let bound = "0.0.0.0:4000".parse().unwrap();
//! let interfaces = [("docker0".to_owned(), "172.17.0.1".parse().unwrap()), ("eth0".to_owned(), "10.0.0.7".parse().unwrap())];
//! assert_eq!(advertise_address(bound, None, &interfaces).unwrap(), "10.0.0.7:4000".parse().unwrap());
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::{Error, Result};

/// Interface name prefixes whose addresses peers on other hosts cannot reach.
const UNREACHABLE_INTERFACE_PREFIXES: [&str; 10] =
    ["docker", "br-", "veth", "virbr", "cni", "flannel", "cali", "vxlan", "lxc", "podman"];

pub(super) fn interfaces() -> Vec<(String, IpAddr)> {
    if_addrs::get_if_addrs()
        .map(|list| list.into_iter().map(|i| (i.name.clone(), i.ip())).collect())
        .unwrap_or_default()
}

/// The address to announce for a listener bound at `bound`: the override when given (a
/// missing port is the bound one), the bound address when it is specific, else the first
/// IPv4 address of an interface that is neither loopback nor a container or VM bridge,
/// else loopback.
pub fn advertise_address(
    bound: SocketAddr,
    advertise: Option<&str>,
    interfaces: &[(String, IpAddr)],
) -> Result<SocketAddr> {
    if let Some(text) = advertise {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(addr);
        }
        if let Ok(ip) = text.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, bound.port()));
        }
        return Err(Error::invalid(
            format!("MICRO_SERVER_ADVERTISE={text:?}"),
            "expected an IP address, with or without :port",
        ));
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    let reachable = interfaces.iter().find(|(name, ip)| {
        ip.is_ipv4()
            && !ip.is_loopback()
            && !UNREACHABLE_INTERFACE_PREFIXES.iter().any(|prefix| name.starts_with(prefix))
    });
    let ip = reachable.map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), |(_, ip)| *ip);
    Ok(SocketAddr::new(ip, bound.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs(list: &[(&str, &str)]) -> Vec<(String, IpAddr)> {
        list.iter().map(|(n, ip)| (n.to_string(), ip.parse().unwrap())).collect()
    }

    #[test]
    fn wildcard_bind_never_advertises_a_bridge() {
        let bound = "0.0.0.0:4000".parse().unwrap();
        let list = ifs(&[
            ("lo", "127.0.0.1"),
            ("docker0", "172.17.0.1"),
            ("veth12", "10.1.0.1"),
            ("eth0", "192.168.1.20"),
        ]);
        assert_eq!(advertise_address(bound, None, &list).unwrap(), "192.168.1.20:4000".parse().unwrap());
        let only_bridges = ifs(&[("lo", "127.0.0.1"), ("br-5f2a", "172.18.0.1")]);
        assert_eq!(advertise_address(bound, None, &only_bridges).unwrap(), "127.0.0.1:4000".parse().unwrap());
    }

    #[test]
    fn specific_bind_and_override_win() {
        let bound = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(advertise_address(bound, None, &[]).unwrap(), bound);
        assert_eq!(
            advertise_address(bound, Some("10.0.0.5"), &[]).unwrap(),
            "10.0.0.5:4000".parse().unwrap()
        );
        assert_eq!(
            advertise_address(bound, Some("10.0.0.5:80"), &[]).unwrap(),
            "10.0.0.5:80".parse().unwrap()
        );
        assert!(advertise_address(bound, Some("vessel.local"), &[]).is_err());
    }
}
