//! [`BindSet`]: the IP addresses every listener binds, apart from the names devices are told.
//!
//! `--listen` gives the addresses (`0.0.0.0` and `::` included); without it the set is what
//! the advertised hosts (`--dps-host`, `--hub-host`) resolve to, so a bare `muster serve`
//! binds loopback only. Every listener (HTTPS, MQTT, and any later one) binds each address of
//! the one set on its own port, through [`BindSet::bind`].
//!
//! IPv6 sockets are IPv6-only, so `0.0.0.0` and `::` can be bound side by side.
//!
//! With `--reuse-port` every socket is bound with `SO_REUSEPORT` (Linux, the BSDs): several
//! Muster nodes on one machine bind the same address and port, and the kernel spreads new
//! connections among their listeners (Linux hashes the connection's addresses and ports; a
//! node that exits leaves the others taking every connection). Only processes of the same
//! user may share a port this way. The admin listener is per node and never shares.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use tokio::net::TcpListener;

use crate::config::Config;
use crate::ServerError;

/// Pending connections the kernel queues per listener before `accept` takes them.
const ACCEPT_BACKLOG: i32 = 1024;

/// Where the addresses of a [`BindSet`] came from, for the hint when a bind fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindSource {
    /// `listen` in the config (`--listen`, `MUSTER_LISTEN`).
    Listen,
    /// No `listen`: the addresses the advertised hosts resolve to.
    AdvertisedHosts,
}

/// The addresses every listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindSet {
    ips: Vec<IpAddr>,
    source: BindSource,
    /// Bind with `SO_REUSEPORT` (`--reuse-port`).
    reuse_port: bool,
}

impl BindSet {
    /// `listen` when given, else the advertised hosts' addresses (resolved now).
    pub async fn from_config(config: &Config) -> Result<BindSet, ServerError> {
        let listen = config.listen_addrs()?;
        if !listen.is_empty() {
            return Ok(BindSet {
                ips: listen,
                source: BindSource::Listen,
                reuse_port: config.reuse_port,
            });
        }
        let mut ips = resolve(&config.dps_host).await?;
        if let Some(hub) = &config.hub_host {
            for ip in resolve(hub).await? {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        Ok(BindSet {
            ips,
            source: BindSource::AdvertisedHosts,
            reuse_port: config.reuse_port,
        })
    }

    pub fn ips(&self) -> &[IpAddr] {
        &self.ips
    }

    pub fn source(&self) -> BindSource {
        self.source
    }

    /// Whether only this machine can connect (every address a loopback one).
    pub fn is_loopback_only(&self) -> bool {
        self.ips.iter().all(IpAddr::is_loopback)
    }

    /// Binds `port` on every address. With port 0 the first bind picks a free port and the
    /// other addresses bind that same one, so each listener has one port to announce.
    pub async fn bind(&self, port: u16, what: &str) -> Result<Vec<TcpListener>, ServerError> {
        let mut listeners = Vec::with_capacity(self.ips.len());
        let mut port = port;
        for ip in &self.ips {
            let addr = SocketAddr::new(*ip, port);
            let listener = bind_one(addr, self.reuse_port).map_err(|source| ServerError::Bind {
                what: what.to_string(),
                addr,
                hint: bind_hint(&addr, &source, self.source),
                source,
            })?;
            if port == 0 {
                port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
            }
            listeners.push(listener);
        }
        Ok(listeners)
    }
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // As std and tokio do: a restart may bind while old connections sit in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuse_address(true)?;
    if reuse_port {
        set_reuse_port(&socket)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(ACCEPT_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

#[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos"))))]
fn set_reuse_port(socket: &socket2::Socket) -> std::io::Result<()> {
    socket.set_reuse_port(true)
}

#[cfg(not(all(unix, not(any(target_os = "solaris", target_os = "illumos")))))]
fn set_reuse_port(_socket: &socket2::Socket) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "--reuse-port needs SO_REUSEPORT, which this platform lacks",
    ))
}

fn bind_hint(addr: &SocketAddr, e: &std::io::Error, source: BindSource) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
            "ports below 1024 need root or CAP_NET_BIND_SERVICE: run as root, grant the capability \
             (setcap cap_net_bind_service=+ep $(which muster)), or choose another port, e.g. --https-port 8443 \
             (port {} was requested)",
            addr.port()
        ),
        std::io::ErrorKind::AddrInUse => format!(
            "another process already listens on {addr}: stop it or choose another port \
             (nodes of one cluster on one machine share it with --reuse-port, all of them)"
        ),
        std::io::ErrorKind::AddrNotAvailable => match source {
            BindSource::Listen => format!("{} is not an address of this machine: check --listen", addr.ip()),
            BindSource::AdvertisedHosts => format!(
                "{} is not an address of this machine: keep --dps-host as the name devices use and \
                 bind an address of this machine with --listen (e.g. --listen 0.0.0.0)",
                addr.ip()
            ),
        },
        _ => "check the address and port".into(),
    }
}

/// Addresses `host` resolves to. `localhost` is loopback without asking DNS.
async fn resolve(host: &str) -> Result<Vec<IpAddr>, ServerError> {
    if let Ok(ip) = host
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<IpAddr>()
    {
        return Ok(vec![ip]);
    }
    if host.eq_ignore_ascii_case("localhost") {
        return Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]);
    }
    let mut ips: Vec<IpAddr> = tokio::net::lookup_host((host, 0))
        .await
        .map_err(|source| ServerError::Resolve {
            host: host.to_string(),
            source,
        })?
        .map(|a| a.ip())
        .collect();
    ips.sort();
    ips.dedup();
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_address_binds_the_port_the_first_one_picked() {
        let set = BindSet {
            ips: vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V4(Ipv4Addr::new(127, 0, 0, 23)),
            ],
            source: BindSource::Listen,
            reuse_port: false,
        };
        let listeners = set.bind(0, "test").await.unwrap();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert_eq!(ports.len(), 2);
        assert_ne!(ports[0], 0);
        assert_eq!(ports[0], ports[1]);
        assert!(set.is_loopback_only());
    }

    #[tokio::test]
    async fn a_bare_config_binds_loopback_and_listen_replaces_the_advertised_hosts() {
        let bare = BindSet::from_config(&Config::default()).await.unwrap();
        assert_eq!(bare.ips(), [IpAddr::V4(Ipv4Addr::LOCALHOST)]);
        assert_eq!(bare.source(), BindSource::AdvertisedHosts);
        // An advertised name nobody resolves does not matter once `listen` is given.
        let behind_nat = Config {
            dps_host: "dps.example.invalid".into(),
            listen: vec!["0.0.0.0".into(), "[::]".into()],
            ..Config::default()
        };
        let set = BindSet::from_config(&behind_nat).await.unwrap();
        assert_eq!(set.ips().len(), 2);
        assert!(!set.is_loopback_only());
        assert_eq!(set.source(), BindSource::Listen);
    }

    #[tokio::test]
    async fn with_reuse_port_two_nodes_bind_one_port_and_both_accept() {
        let node = |reuse_port| BindSet {
            ips: vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 32))],
            source: BindSource::Listen,
            reuse_port,
        };
        let first = node(true).bind(0, "test").await.unwrap();
        let port = first[0].local_addr().unwrap().port();
        let second = node(true).bind(port, "test").await.unwrap();
        assert_eq!(second[0].local_addr().unwrap().port(), port);
        // Without the option the port stays taken.
        let e = node(false).bind(port, "test").await.unwrap_err();
        assert!(e.to_string().contains("--reuse-port"), "{e}");
        // The kernel spreads connections over both listeners (by a hash of the client's
        // address and port): connect until each has accepted one.
        let addr = first[0].local_addr().unwrap();
        let (mut a, mut b) = (0, 0);
        let mut clients = Vec::new();
        while a == 0 || b == 0 {
            assert!(clients.len() < 200, "one listener never got a connection");
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            tokio::select! {
                r = first[0].accept() => { r.unwrap(); a += 1 }
                r = second[0].accept() => { r.unwrap(); b += 1 }
            }
        }
    }

    #[test]
    fn an_unavailable_advertised_address_points_at_listen() {
        let addr = SocketAddr::from(([192, 0, 2, 1], 443));
        let e = std::io::Error::from(std::io::ErrorKind::AddrNotAvailable);
        let hint = bind_hint(&addr, &e, BindSource::AdvertisedHosts);
        assert!(hint.contains("--listen"), "{hint}");
    }
}
