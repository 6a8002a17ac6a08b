//! Where a replica may listen without TLS.
//!
//! A plain port lets anyone who can reach it read and write the store and,
//! on the peer port, forge consensus messages. A loopback address
//! (127.0.0.0/8, ::1, or a name such as `localhost` that resolves only to
//! them) is reachable from this machine only, so it may be plain; any other
//! address (`0.0.0.0` and `[::]` included) needs TLS, or `--insecure` to
//! say that the network is trusted.

use std::net::{IpAddr, ToSocketAddrs};

/// Refuses, with the reason and what to do, to listen without TLS on any
/// of `addrs` that is not loopback, unless `tls_configured` or `insecure`.
/// A name is resolved (a blocking lookup); one that does not resolve is
/// refused too, since it cannot be shown to be loopback.
pub fn refuse_plain_public_bind(
    addrs: &[&str],
    tls_configured: bool,
    insecure: bool,
) -> Result<(), String> {
    if tls_configured || insecure {
        return Ok(());
    }
    for addr in addrs {
        if let Err(why) = loopback_only(addr) {
            return Err(format!(
                "{addr} {why}; without TLS anyone who can reach it can read and write the \
                 store and forge consensus messages: configure --tls-ca/--tls-cert/--tls-key \
                 or pass --insecure"
            ));
        }
    }
    Ok(())
}

/// `Ok` if every address `addr` resolves to is loopback; otherwise what it
/// is instead.
fn loopback_only(addr: &str) -> Result<(), String> {
    let resolved: Vec<IpAddr> = addr
        .to_socket_addrs()
        .map_err(|e| {
            format!("cannot be resolved ({e}), so it is not known to be a loopback address")
        })?
        .map(|a| a.ip())
        .collect();
    if resolved.is_empty() {
        return Err("resolves to no address, so it is not known to be a loopback address".into());
    }
    match resolved.iter().find(|ip| !ip.to_canonical().is_loopback()) {
        None => Ok(()),
        // An address given as such: naming it again would add nothing.
        Some(_) if addr.parse::<std::net::SocketAddr>().is_ok() => {
            Err("is not a loopback address".into())
        }
        Some(ip) => Err(format!("is not a loopback address (it resolves to {ip})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_addresses_may_be_plain() {
        for addr in [
            "127.0.0.1:7001",
            "127.1.2.3:7001",
            "[::1]:7001",
            "[::ffff:127.0.0.1]:7001",
            "localhost:7001",
        ] {
            assert_eq!(
                refuse_plain_public_bind(&[addr], false, false),
                Ok(()),
                "{addr}"
            );
        }
        assert_eq!(
            refuse_plain_public_bind(&["127.0.0.1:1", "[::1]:2"], false, false),
            Ok(())
        );
    }

    #[test]
    fn other_addresses_are_refused_with_the_reason_and_the_way_out() {
        for addr in [
            "0.0.0.0:7001",
            "[::]:7001",
            "10.0.0.5:7001",
            "192.168.1.1:7001",
            "[2001:db8::1]:7001",
            "[::ffff:10.0.0.1]:7001",
        ] {
            let why =
                refuse_plain_public_bind(&["127.0.0.1:1", addr], false, false).expect_err(addr);
            assert!(
                why.starts_with(&format!("{addr} is not a loopback address; without TLS")),
                "{why}"
            );
            for needed in ["--tls-ca/--tls-cert/--tls-key", "--insecure", "forge"] {
                assert!(why.contains(needed), "{why}");
            }
            // TLS, or --insecure, lifts the refusal.
            assert_eq!(refuse_plain_public_bind(&[addr], true, false), Ok(()));
            assert_eq!(refuse_plain_public_bind(&[addr], false, true), Ok(()));
        }
    }

    #[test]
    fn an_address_that_does_not_resolve_is_refused() {
        for addr in ["no-such-host.invalid:7001", "not an address"] {
            let why = refuse_plain_public_bind(&[addr], false, false).expect_err(addr);
            assert!(
                why.contains("not known to be a loopback address") && why.contains("--insecure"),
                "{why}"
            );
        }
    }
}
