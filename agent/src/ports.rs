//! The guest's TCP ports `kubectl port-forward` can reach. containerd dials localhost:<port>
//! in the pod's network namespace on the host, where the shim answers for the ports this
//! reports (`WatchPorts`); the forward service then dials the same on the guest's localhost.
//! Listening sockets come from sock_diag, which filters on the LISTEN state in the kernel, so
//! a read costs the same however many connections the pod has.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr};

use crate::error::{AgentError, Result};

/// How often the listening sockets are read once somebody watches: 100 ms after a change or
/// a process start (a server opens its port a moment after it starts, and `kubectl
/// port-forward` should find it then, not seconds later), then half as often after each
/// read that found nothing new, down to every 8 s (an idle pod's guest under TCG pays ~2 ms
/// of host CPU per read: 7 reads in the 13 s after a start, then one per 8 s).
const POLL_MIN: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(8);

#[derive(Debug, Default)]
struct Seen {
    /// Bumped on each change; 0 until the first read.
    generation: u64,
    ports: Vec<u16>,
    polling: bool,
    /// A process started: read soon.
    kicked: bool,
}

/// The reachable ports, read from the first watch on.
#[derive(Debug, Default)]
pub struct Ports {
    seen: Mutex<Seen>,
    changed: Condvar,
    kick: Condvar,
}

impl Ports {
    /// Blocks until the ports differ from those of `generation`; returns the generation and
    /// ports now.
    pub fn wait_change(self: &Arc<Self>, generation: u64) -> Result<(u64, Vec<u16>)> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if !seen.polling {
            // Nothing reads sockets in a VM nobody forwards to (`kubevirt-vmm` runs).
            let me = self.clone();
            std::thread::Builder::new()
                .name("ports".into())
                .spawn(move || me.poll())
                .map_err(AgentError::io("spawn the port watcher"))?;
            seen.polling = true;
        }
        while seen.generation == 0 || seen.generation == generation {
            seen = self.changed.wait(seen).unwrap_or_else(|e| e.into_inner());
        }
        Ok((seen.generation, seen.ports.clone()))
    }

    /// A process started in the guest: it may open ports, so read often again.
    pub fn kick(&self) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).kicked = true;
        self.kick.notify_all();
    }

    fn poll(&self) {
        let mut socket = None;
        let mut failing = false;
        let mut interval = POLL_MIN;
        loop {
            let read = listening(&mut socket);
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            interval = (interval * 2).min(POLL_MAX);
            match read {
                Ok(ports) => {
                    failing = false;
                    if seen.generation == 0 || seen.ports != ports {
                        seen.generation += 1;
                        seen.ports = ports;
                        interval = POLL_MIN;
                        self.changed.notify_all();
                    }
                }
                Err(e) => {
                    // A new socket next time; say so once, not on every read.
                    socket = None;
                    if !failing {
                        log::warn!("reading the listening TCP sockets: {e}");
                        failing = true;
                    }
                }
            }
            let deadline = Instant::now() + interval;
            while !seen.kicked {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                seen = self
                    .kick
                    .wait_timeout(seen, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if seen.kicked {
                seen.kicked = false;
                interval = POLL_MIN;
            }
        }
    }
}

/// Whether a socket listening on `addr` takes connections to 127.0.0.1 or ::1, the
/// addresses containerd dials for `localhost`.
fn loopback_reachable(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.is_unspecified() || a == Ipv4Addr::LOCALHOST,
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => loopback_reachable(IpAddr::V4(v4)),
            None => a.is_unspecified() || a.is_loopback(),
        },
    }
}

/// The ports of the TCP sockets listening where localhost reaches them, ascending.
fn listening(socket: &mut Option<Socket>) -> std::io::Result<Vec<u16>> {
    if socket.is_none() {
        let mut s = Socket::new(NETLINK_SOCK_DIAG)?;
        s.bind_auto()?;
        s.connect(&SocketAddr::new(0, 0))?;
        *socket = Some(s);
    }
    let Some(s) = socket.as_ref() else {
        unreachable!("set above");
    };
    let mut ports = BTreeSet::new();
    for (family, id) in [
        (AF_INET, SocketId::new_v4()),
        (AF_INET6, SocketId::new_v6()),
    ] {
        dump(s, family, id, &mut ports)?;
    }
    Ok(ports.into_iter().collect())
}

/// One sock_diag dump of the listening TCP sockets of `family`.
fn dump(s: &Socket, family: u8, id: SocketId, ports: &mut BTreeSet<u16>) -> std::io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut req = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::LISTEN,
            socket_id: id,
        })
        .into(),
    );
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    s.send(&buf, 0)?;
    let mut rx = vec![0u8; 32 << 10];
    loop {
        let n = s.recv(&mut &mut rx[..], 0)?;
        let mut at = 0;
        while at < n {
            let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&rx[at..n])
                .map_err(|e| std::io::Error::other(format!("a sock_diag answer: {e}")))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r))
                    if loopback_reachable(r.header.socket_id.source_address) =>
                {
                    ports.insert(r.header.socket_id.source_port);
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return Err(e.to_io());
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn only_what_localhost_reaches_counts() {
        for (addr, reached) in [
            ("0.0.0.0", true),
            ("127.0.0.1", true),
            ("127.0.0.2", false),
            ("10.0.0.5", false),
            ("::", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:0.0.0.0", true),
            ("::ffff:10.0.0.5", false),
            ("fd00::5", false),
        ] {
            let ip: IpAddr = addr.parse().unwrap();
            assert_eq!(loopback_reachable(ip), reached, "{addr}");
        }
    }

    #[test]
    fn listening_sockets_are_found_and_others_not() {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").ok();
        // localhost does not reach 127.0.0.2.
        let aside = TcpListener::bind("127.0.0.2:0").unwrap();
        let mut socket = None;
        let ports = listening(&mut socket).unwrap();
        let port = v4.local_addr().unwrap().port();
        assert!(ports.contains(&port), "{port} in {ports:?}");
        if let Some(v6) = &v6 {
            let port = v6.local_addr().unwrap().port();
            assert!(ports.contains(&port), "{port} in {ports:?}");
        }
        let aside = aside.local_addr().unwrap().port();
        assert!(!ports.contains(&aside), "{aside} in {ports:?}");
        assert!(ports.windows(2).all(|w| w[0] < w[1]), "{ports:?}");
        drop(v4);
        let after = listening(&mut socket).unwrap();
        assert!(!after.contains(&port), "{port} closed, still in {after:?}");
    }

    /// A server opens its port a moment after its process started (the kick): the read
    /// that finds it comes a fraction of a second later, not after a backed-off interval.
    #[test]
    fn a_port_opened_just_after_a_process_start_is_reported_soon() {
        let ports = Arc::new(Ports::default());
        let (first, _) = ports.wait_change(0).unwrap();
        ports.kick();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut generation = first;
        loop {
            let (g, now) = ports.wait_change(generation).unwrap();
            if now.contains(&port) {
                break;
            }
            generation = g;
        }
        assert!(
            t0.elapsed() < Duration::from_millis(800),
            "reported {:?} after the start",
            t0.elapsed()
        );
    }

    #[test]
    fn a_watcher_hears_of_a_new_listener_soon_after_a_kick() {
        let ports = Arc::new(Ports::default());
        let (first, _) = ports.wait_change(0).unwrap();
        assert!(first > 0);
        // Let the reads back off first: without the kick the next one is seconds away.
        std::thread::sleep(Duration::from_millis(3500));
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t0 = Instant::now();
        ports.kick();
        let (tx, rx) = std::sync::mpsc::channel();
        let watcher = ports.clone();
        std::thread::spawn(move || {
            let mut generation = first;
            loop {
                let (g, now) = watcher.wait_change(generation).unwrap();
                if now.contains(&port) {
                    let _ = tx.send(g);
                    return;
                }
                generation = g;
            }
        });
        let g = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the new port reported");
        assert!(g > first);
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t0.elapsed()
        );
    }
}
