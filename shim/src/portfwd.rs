//! `kubectl port-forward` into the pod VM. containerd's CRI dials localhost:<port> inside the
//! pod's network namespace, where the guest is not: it owns the pod's address beyond the tap,
//! and its loopback is its own. The agent reports the guest ports localhost reaches
//! (`WatchPorts`); the shim listens on those ports on the namespace's 127.0.0.1 and ::1 and
//! carries each connection into the guest through the agent's forward port. A port nothing
//! listens on in the guest has no listener here either, so containerd is refused as it is
//! for a runc pod.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{setns, CloneFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{setsockopt, sockopt};
use protocol::agent::WatchPortsRequest;
use protocol::blocking::AgentClient;

use crate::error::{Result, ShimError};

/// Ports mirrored at most: a guest that opens more gets its lowest.
const MAX_PORTS: usize = 256;
/// The agent answers once it has dialled the guest's localhost (5 s per address at most).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// The pod's port forwarding; stopped when dropped.
#[derive(Debug)]
pub struct PortForward {
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    pod: String,
    /// The VM's hybrid vsock socket.
    uds: PathBuf,
    stop: AtomicBool,
    /// Wakes the acceptor: new ports, or the end.
    wake: EventFd,
    wanted: Mutex<Vec<u16>>,
    /// The client side of each relayed connection, shut when the pod ends.
    live: Mutex<HashMap<u64, TcpStream>>,
    next: AtomicU64,
}

impl PortForward {
    /// Mirrors the guest's ports into `netns` until stopped or the agent goes away.
    pub fn start(agent: AgentClient, uds: &Path, netns: &Path, pod: &str) -> Result<PortForward> {
        let ns = File::open(netns).map_err(ShimError::io(format!(
            "open network namespace {}",
            netns.display()
        )))?;
        let wake = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| ShimError::io("eventfd for port forwarding")(e.into()))?;
        let shared = Arc::new(Shared {
            pod: pod.to_owned(),
            uds: uds.to_owned(),
            stop: AtomicBool::new(false),
            wake,
            wanted: Mutex::default(),
            live: Mutex::default(),
            next: AtomicU64::new(0),
        });
        // The acceptor lives in the pod's namespace, so the listeners it makes are there.
        let s = shared.clone();
        let acceptor = std::thread::Builder::new()
            .name("port-forward".into())
            .spawn(move || match setns(&ns, CloneFlags::CLONE_NEWNET) {
                Ok(()) => s.accept_loop(),
                Err(e) => log::warn!("pod {}: no port forwarding: setns: {e}", s.pod),
            })
            .map_err(ShimError::io("spawn the port forwarder"))?;
        let mut forward = PortForward {
            shared: shared.clone(),
            acceptor: Some(acceptor),
        };
        let watcher = std::thread::Builder::new()
            .name("port-watch".into())
            .spawn(move || shared.watch(&agent));
        if let Err(e) = watcher {
            forward.stop();
            return Err(ShimError::io("spawn the port watcher")(e));
        }
        Ok(forward)
    }

    /// Closes the listeners and every relayed connection.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = self.shared.wake.write(1);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for (_, c) in self
            .shared
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
        {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the agent reported, as ports to listen on: valid, each once, at most [`MAX_PORTS`].
fn ports_to_mirror(reported: &[u32]) -> Vec<u16> {
    let mut ports: Vec<u16> = reported
        .iter()
        .filter_map(|&p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports.truncate(MAX_PORTS);
    ports
}

/// Listens on `port` at 127.0.0.1 and ::1 of the calling thread's network namespace (either
/// may fail alone: a namespace without IPv6 still gets IPv4).
fn listen_on(pod: &str, port: u16) -> Vec<TcpListener> {
    let addrs = [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ];
    let mut listeners = Vec::new();
    for addr in addrs {
        match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
            Ok(l) => listeners.push(l),
            // No ::1 where the namespace has IPv6 turned off: containerd dials 127.0.0.1 first.
            Err(e) if addr.is_ipv6() && e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                log::debug!("pod {pod}: no {addr} to forward from: {e}")
            }
            Err(e) => log::warn!("pod {pod}: cannot forward {addr} into the VM: {e}"),
        }
    }
    listeners
}

impl Shared {
    /// Follows the agent's ports until the agent goes (the VM ended) or forwarding stops.
    fn watch(&self, agent: &AgentClient) {
        let mut generation = 0;
        while !self.stop.load(Ordering::SeqCst) {
            let req = WatchPortsRequest {
                generation,
                ..Default::default()
            };
            match agent.watch_ports(protocol::ttrpc::context::Context::default(), &req) {
                Ok(r) => {
                    generation = r.generation;
                    let ports = ports_to_mirror(&r.ports);
                    if ports.len() < r.ports.len() {
                        log::warn!(
                            "pod {}: forwarding {} of the {} guest ports reported",
                            self.pod,
                            ports.len(),
                            r.ports.len()
                        );
                    }
                    log::debug!("pod {}: guest TCP ports on localhost: {ports:?}", self.pod);
                    *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = ports;
                    let _ = self.wake.write(1);
                }
                Err(e) => {
                    log::debug!("pod {}: port watch ended: {e}", self.pod);
                    return;
                }
            }
        }
    }

    fn accept_loop(self: &Arc<Self>) {
        let mut open: BTreeMap<u16, Vec<TcpListener>> = BTreeMap::new();
        loop {
            let listeners: Vec<(u16, &TcpListener)> = open
                .iter()
                .flat_map(|(&p, ls)| ls.iter().map(move |l| (p, l)))
                .collect();
            let mut fds = vec![PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                listeners
                    .iter()
                    .map(|(_, l)| PollFd::new(l.as_fd(), PollFlags::POLLIN)),
            );
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    log::warn!("pod {}: port forwarding stopped: poll: {e}", self.pod);
                    return;
                }
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            let woken = ready(&fds[0]);
            let pending: Vec<usize> = (1..fds.len()).filter(|&i| ready(&fds[i])).collect();
            drop(fds);
            for i in pending {
                let (port, listener) = listeners[i - 1];
                while let Ok((conn, _)) = listener.accept() {
                    self.relay(conn, port);
                }
            }
            drop(listeners);
            if woken {
                let _ = self.wake.read();
                if self.stop.load(Ordering::SeqCst) {
                    return;
                }
                let wanted = self
                    .wanted
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                open.retain(|p, _| wanted.binary_search(p).is_ok());
                for p in wanted {
                    open.entry(p).or_insert_with(|| listen_on(&self.pod, p));
                }
            }
        }
    }

    /// Carries `client` to guest `port` on a thread of its own.
    fn relay(self: &Arc<Self>, client: TcpStream, port: u16) {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        if let Ok(c) = client.try_clone() {
            self.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, c);
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("port-forward-conn".into())
            .spawn(move || {
                match me.open_guest(port) {
                    Ok(guest) => protocol::relay(client.into(), guest.into()),
                    Err(e) => {
                        log::info!("pod {}: port-forward to {port}: {e}", me.pod);
                        // A reset, not an orderly end: the client hears that it failed.
                        let abort = nix::libc::linger {
                            l_onoff: 1,
                            l_linger: 0,
                        };
                        let _ = setsockopt(&client, sockopt::Linger, &abort);
                    }
                }
                me.live
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
        if let Err(e) = spawned {
            log::warn!("pod {}: no thread to forward to port {port}: {e}", self.pod);
            self.live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }

    /// A stream to guest `port` through the agent's forward service.
    fn open_guest(&self, port: u16) -> std::result::Result<UnixStream, String> {
        let mut s = protocol::connect_stream(&self.uds, protocol::FORWARD_PORT)
            .map_err(|e| e.to_string())?;
        let io = |e: std::io::Error| e.to_string();
        s.write_all(format!("{port}\n").as_bytes()).map_err(io)?;
        s.set_read_timeout(Some(ANSWER_TIMEOUT)).map_err(io)?;
        let answer = protocol::read_line(&s, 256).map_err(io)?;
        s.set_read_timeout(None).map_err(io)?;
        match answer.as_deref() {
            Some("OK") => Ok(s),
            Some(other) => Err(format!("the agent answered {other:?}")),
            None => Err("the agent closed the connection".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_ports_are_checked_sorted_and_capped() {
        assert_eq!(
            ports_to_mirror(&[8080, 0, 70000, 22, 8080, 65535]),
            vec![22, 8080, 65535]
        );
        let many: Vec<u32> = (1..=1000).rev().collect();
        let mirrored = ports_to_mirror(&many);
        assert_eq!(mirrored.len(), MAX_PORTS);
        assert_eq!(mirrored[0], 1);
    }
}
