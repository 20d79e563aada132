//! Serving devices on vhost-user sockets. Each device listens before the frontend starts;
//! one thread (`vu-<name>`) serves all of a machine's devices: it accepts each frontend
//! connection as it comes (QEMU connects in its own order), and once the sessions are over
//! it resets the devices. The library runs each session on a thread of its own, and the
//! device's queues on its vring worker.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::virtio::{device_type, VirtioDevice};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::backend::VhostUserDevice;
use crate::bus::lock;

/// Errors of a vhost-user device server.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("cannot listen on vhost-user socket {path}: {source}")]
    Listen {
        path: PathBuf,
        source: vhost::vhost_user::Error,
    },
    #[error("cannot create the vhost-user daemon for {name}: {reason}")]
    Daemon { name: String, reason: String },
    #[error("cannot watch the back end of {name}: {source}")]
    Backend {
        name: String,
        source: std::io::Error,
    },
    #[error("cannot start thread {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
}

type Daemon = VhostUserDaemon<Arc<Mutex<VhostUserDevice>>>;

/// One device to serve on a socket.
pub struct Served {
    /// The device's name in thread names and logs.
    pub name: String,
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub socket: PathBuf,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("name", &self.name)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// Puts the calling device thread under the device filter.
fn confine(seccomp: bool, name: &str) -> Result<(), VhostUserError> {
    if !seccomp {
        return Ok(());
    }
    crate::seccomp::install(crate::seccomp::ThreadKind::Device).map_err(|e| {
        VhostUserError::Daemon {
            name: name.to_string(),
            reason: e.to_string(),
        }
    })
}

/// The library's daemon for `device`, its back-end descriptor watched by every vring worker.
fn daemon(name: &str, device: Arc<Mutex<dyn VirtioDevice>>) -> Result<Daemon, VhostUserError> {
    let backend_fd: Option<RawFd> = {
        let mut d = lock(&device);
        d.set_own_thread();
        d.backend_fd()
    };
    let adapter = Arc::new(Mutex::new(VhostUserDevice::new(device)));
    let queues = lock(&adapter).queue_count();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let daemon: Daemon = VhostUserDaemon::new(name.to_string(), adapter, mem).map_err(|e| {
        VhostUserError::Daemon {
            name: name.to_string(),
            reason: format!("{e:?}"),
        }
    })?;
    if let Some(fd) = backend_fd {
        // Tokens up to the queue count are the library's: the back end takes the next one.
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(fd, EventSet::IN, queues as u64 + 1)
                .map_err(|source| VhostUserError::Backend {
                    name: name.to_string(),
                    source,
                })?;
        }
    }
    Ok(daemon)
}

/// Devices being served on vhost-user sockets.
#[derive(Debug)]
pub struct VhostUserServer {
    /// Where a frontend connects to each device, then where the library listens behind a
    /// relay.
    sockets: Vec<PathBuf>,
    threads: Vec<JoinHandle<()>>,
}

impl VhostUserServer {
    /// Waits until the frontend connected to every device and then disconnected.
    pub fn join(mut self) {
        self.join_threads();
    }

    fn join_threads(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }

    /// Ends the sessions once the frontend is gone (QEMU exited or was killed). A frontend
    /// that never came (QEMU failed to start) is stood in for by an empty connection to
    /// each socket, which ends the relay (where there is one) and the library's session at
    /// once; one that was served already leaves it unanswered.
    pub fn finish(mut self) {
        self.finish_threads();
    }

    fn finish_threads(&mut self) {
        if !self.threads.is_empty() {
            for s in &self.sockets {
                let _ = UnixStream::connect(s);
            }
            self.join_threads();
        }
    }
}

/// A server dropped without [`VhostUserServer::finish`] (a machine that failed to start
/// after its servers did) finishes, so that none of its threads is left waiting.
impl Drop for VhostUserServer {
    fn drop(&mut self) {
        self.finish_threads();
    }
}

/// Serves `device` on `socket`, on thread `vu-<name>` (see [`serve_all`]).
pub fn serve(
    name: &str,
    device: Arc<Mutex<dyn VirtioDevice>>,
    socket: &std::path::Path,
    seccomp: bool,
) -> Result<VhostUserServer, VhostUserError> {
    let served = Served {
        name: name.to_string(),
        device,
        socket: socket.to_owned(),
    };
    serve_all(name, vec![served], seccomp)
}

/// A device whose listener is ready.
struct Session {
    name: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    listener: Listener,
}

/// Listens on each device's socket (before returning, so a frontend started afterwards
/// finds them all) and serves each device to the first frontend that connects to it, until
/// it disconnects; thread `vu-<name>` waits for them all. With `seccomp`, the serving
/// threads (and the library's threads they start) run under the device filter from before
/// the frontend's first message.
pub fn serve_all(
    name: &str,
    served: Vec<Served>,
    seccomp: bool,
) -> Result<VhostUserServer, VhostUserError> {
    let mut sockets = Vec::new();
    let mut sessions = Vec::new();
    let mut relays = Vec::new();
    for Served {
        name,
        device,
        socket,
    } in served
    {
        // QEMU's virtio-net front breaks the protocol's message order (see proxy.rs): its
        // frontend connects to `socket`, where the relay listens, and the library listens
        // on a private socket beside it, which the relay connects to. Other fronts reach
        // the library directly (a thread per device fewer).
        let relayed = lock(&device).device_type() == device_type::NET;
        let inner = if relayed {
            socket.with_extension("lib.sock")
        } else {
            socket.clone()
        };
        let listen_err = |source| VhostUserError::Listen {
            path: socket.clone(),
            source,
        };
        let listener = Listener::new(&inner, true).map_err(listen_err)?;
        if relayed {
            let _ = std::fs::remove_file(&socket);
            let public = UnixListener::bind(&socket)
                .map_err(|e| listen_err(vhost::vhost_user::Error::SocketError(e)))?;
            relays.push((name.clone(), public, inner.clone()));
            sockets.push(socket);
        }
        sockets.push(inner);
        sessions.push(Session {
            name,
            device,
            listener,
        });
    }
    let thread_name = format!("vu-{name}");
    let log_name = name.to_string();
    // The daemons are made on the serving thread, after the filter: the library starts its
    // vring workers as it makes each, and they inherit the filter.
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            let made = confine(seccomp, &log_name).and_then(|()| {
                sessions
                    .into_iter()
                    .map(|s| Ok((daemon(&s.name, s.device.clone())?, s)))
                    .collect::<Result<Vec<_>, _>>()
            });
            match made {
                Ok(daemons) => {
                    let _ = ready_tx.send(Ok(()));
                    run(daemons);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })
        .map_err(|source| VhostUserError::Spawn {
            name: thread_name.clone(),
            source,
        })?;
    let started = ready.recv().unwrap_or_else(|_| {
        Err(VhostUserError::Daemon {
            name: name.to_string(),
            reason: "its thread ended".into(),
        })
    });
    if let Err(e) = started {
        let _ = thread.join();
        return Err(e);
    }
    // From here a failure drops the server, which finishes what was started.
    let mut server = VhostUserServer {
        sockets,
        threads: vec![thread],
    };
    for (name, public, inner) in relays {
        let relay_name = format!("vu-relay-{name}");
        let relay = std::thread::Builder::new()
            .name(relay_name.clone())
            .spawn(move || {
                if let Err(e) = confine(seccomp, &name) {
                    log::error!("{e}");
                    return;
                }
                let relayed = public.accept().and_then(|(front, _)| {
                    let back = UnixStream::connect(&inner);
                    let _ = std::fs::remove_file(&inner);
                    super::proxy::relay(front, back?)
                });
                if let Err(e) = relayed {
                    log::debug!("vhost-user relay: {e}");
                }
            })
            .map_err(|source| VhostUserError::Spawn {
                name: relay_name,
                source,
            })?;
        server.threads.push(relay);
    }
    Ok(server)
}

/// The serving thread: starts each device's session as its frontend connects, then waits
/// for the sessions to end and resets the devices.
fn run(mut daemons: Vec<(Daemon, Session)>) {
    if let Err(e) = accept_all(&mut daemons) {
        log::error!("vhost-user: cannot wait for the frontend: {e}");
    }
    for (mut daemon, s) in daemons {
        // A frontend that simply went away ends the connection with an error too.
        if let Err(e) = daemon.wait() {
            log::debug!("vhost-user {}: {e}", s.name);
        }
        // A frontend that died (QEMU killed) never reset the device: do it here, so its
        // host-side connections (the agent's, the containers' streams) end too, and stop
        // the library's vring workers, which would otherwise hold the device.
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        lock(&s.device).reset();
    }
}

/// Starts each session as its frontend connects, in whatever order they come.
fn accept_all(daemons: &mut [(Daemon, Session)]) -> std::io::Result<()> {
    let epoll = Epoll::new()?;
    for (i, (_, s)) in daemons.iter().enumerate() {
        let event = EpollEvent::new(EventSet::IN, i as u64);
        epoll.ctl(ControlOperation::Add, s.listener.as_raw_fd(), event)?;
    }
    let mut waiting = daemons.len();
    let mut events = vec![EpollEvent::default(); waiting];
    while waiting > 0 {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for event in &events[..n] {
            let Some((daemon, s)) = daemons.get_mut(event.data() as usize) else {
                continue;
            };
            let fd = s.listener.as_raw_fd();
            epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())?;
            waiting -= 1;
            if let Err(e) = daemon.start(&mut s.listener) {
                log::debug!("vhost-user {}: {e}", s.name);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vmm_sys_util::tempdir::TempDir;

    /// `f`'s result, taken on a thread of its own: one that never comes fails the test
    /// rather than hang it.
    fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("{what}: not within 10 s"))
    }

    /// Served without the relay (only virtio-net needs it): one socket, and a server
    /// whose frontend never came ends and leaves nothing in its directory; one dropped
    /// instead leaves no thread.
    #[test]
    fn a_server_without_a_frontend_finishes_and_leaves_nothing() {
        let _one_at_a_time = crate::vhost_user::TEST_SERVERS.lock();
        let dir = TempDir::new_with_prefix("/tmp/kv-vu-").unwrap();
        let socket = dir.as_path().join("rng.sock");
        let rng = Arc::new(Mutex::new(devices::rng::Rng::new()));
        let server = serve("rng", rng, &socket, false).unwrap();
        let listed = || -> Vec<_> {
            std::fs::read_dir(dir.as_path())
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect()
        };
        assert_eq!(listed(), ["rng.sock"]);
        within_10s("finish", move || server.finish());
        assert!(listed().is_empty(), "left: {:?}", listed());
        let rng = Arc::new(Mutex::new(devices::rng::Rng::new()));
        drop(serve("rng", rng, &socket, false).unwrap());
        assert!(listed().is_empty(), "left: {:?}", listed());
        let left = crate::vhost_user::device_threads();
        assert!(left.is_empty(), "{left:?}");
    }

    /// One thread serves every device, and each session starts as its frontend connects,
    /// whatever the order: a frontend waiting on the second device is answered while the
    /// first has none.
    #[test]
    fn one_thread_serves_the_devices_in_the_order_the_frontend_comes() {
        use vhost::vhost_user::Frontend;
        use vhost::VhostBackend;

        let _one_at_a_time = crate::vhost_user::TEST_SERVERS.lock();
        let dir = TempDir::new_with_prefix("/tmp/kv-vu-").unwrap();
        let served: Vec<Served> = ["rng0", "rng1"]
            .iter()
            .map(|n| Served {
                name: n.to_string(),
                device: Arc::new(Mutex::new(devices::rng::Rng::new())),
                socket: dir.as_path().join(format!("{n}.sock")),
            })
            .collect();
        let sockets: Vec<PathBuf> = served.iter().map(|s| s.socket.clone()).collect();
        let server = serve_all("pair", served, false).unwrap();
        assert_eq!(crate::vhost_user::device_threads(), ["vu-pair"]);
        let features = |socket: &PathBuf| {
            let socket = socket.clone();
            within_10s("an answer to the frontend", move || {
                let fe = Frontend::connect(&socket, 1).unwrap();
                let f = fe.get_features().unwrap();
                (fe, f)
            })
        };
        let (second, f1) = features(&sockets[1]);
        let (first, f0) = features(&sockets[0]);
        assert_eq!(f0, f1);
        let version_1 = devices::virtio::VIRTIO_F_VERSION_1;
        assert!(f0 & version_1 != 0, "VIRTIO_F_VERSION_1 offered: {f0:#x}");
        drop((first, second));
        within_10s("the sessions' end with their frontends", move || {
            server.join()
        });
        let left = crate::vhost_user::device_threads();
        assert!(left.is_empty(), "{left:?}");
    }
}
