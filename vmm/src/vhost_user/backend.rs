//! The adapter from our device trait to `vhost-user-backend`, and a server thread per device.

use std::ops::DerefMut;
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use devices::virtio::{UsedQueues, VirtioDevice, TRANSPORT_FEATURES};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringState, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::poll::{AdaptivePoll, MAX_SESSION};
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

/// Largest ring a vhost-user frontend may choose.
const FRONTEND_MAX_QUEUE: u16 = 1024;

/// One device as a vhost-user back end.
pub struct VhostUserDevice {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    activated: bool,
    /// The polling window of each queue, for those the device asks to poll.
    polls: Vec<AdaptivePoll>,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("activated", &self.activated)
            .finish()
    }
}

impl VhostUserDevice {
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let queues = lock(&device).queue_max_sizes().len();
        Self {
            device,
            mem: None,
            activated: false,
            polls: (0..queues).map(|_| AdaptivePoll::default()).collect(),
        }
    }

    fn queue_count(&self) -> usize {
        lock(&self.device).queue_max_sizes().len()
    }
}

impl VhostUserBackendMut for VhostUserDevice {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queue_count()
    }

    fn max_queue_size(&self) -> usize {
        // The frontend picks the ring size (QEMU's vhost-user-rng asks for 1024) without
        // asking the back end; virtio-queue serves any size up to the spec's 32768.
        let device_max = lock(&self.device).queue_max_sizes().iter().copied().max();
        device_max.unwrap_or(0).max(FRONTEND_MAX_QUEUE) as usize
    }

    fn features(&self) -> u64 {
        lock(&self.device).features()
            | TRANSPORT_FEATURES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        let virtio = features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        lock(&self.device).ack_features(virtio);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn reset_device(&mut self) {
        lock(&self.device).reset();
        self.activated = false;
    }

    fn set_event_idx(&mut self, _enabled: bool) {
        // The queues carry the negotiated setting; the device reads it from them.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0u8; size as usize];
        lock(&self.device).read_config(offset as u64, &mut buf);
        buf
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        lock(&self.device).write_config(offset as u64, buf);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one the library cannot stop its vring worker when the frontend leaves.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let Some(atomic) = &self.mem else {
            return Ok(());
        };
        let mem = atomic.memory();
        let mut dev = lock(&self.device);
        if !self.activated {
            dev.activate()
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.activated = true;
        }
        let mut guards: Vec<_> = vrings.iter().map(|v| v.get_mut()).collect();
        let index = device_event as usize;
        let queue = (index < vrings.len()).then_some(index);
        let used = process(&mut *dev, queue, &mut guards, &mem);
        let polled = queue.filter(|&i| used & (1 << i) != 0 && dev.polls(i));
        let Some(poll) = polled.and_then(|i| self.polls.get_mut(i)) else {
            return signal(&mut guards, used);
        };
        let now = Instant::now();
        poll.woke(now);
        if poll.window().is_zero() {
            poll.gave_up(now);
            return signal(&mut guards, used);
        }
        // Before the driver learns of the answer: one that comes straight back must find
        // the queue quiet already, or it kicks a thread that is looking anyway.
        ask_quiet(guards[index].get_queue_mut(), &mem);
        signal(&mut guards, used)?;
        keep_polling(poll, &mut *dev, index, &mut guards, &mem)
    }
}

/// Lets `dev` serve queue `queue`'s notification (`None`: its back end's event); returns
/// the queues whose used ring changed.
fn process<G: DerefMut<Target = VringState>>(
    dev: &mut dyn VirtioDevice,
    queue: Option<usize>,
    guards: &mut [G],
    mem: &GuestMemoryMmap,
) -> UsedQueues {
    let mut queues: Vec<&mut Queue> = guards.iter_mut().map(|g| g.get_queue_mut()).collect();
    match queue {
        Some(i) => dev.process_queue(i, &mut queues, mem),
        None => dev.process_backend(&mut queues, mem),
    }
}

/// Signals the driver for each queue in `used`, where the ring asks for it.
fn signal<G: DerefMut<Target = VringState>>(
    guards: &mut [G],
    used: UsedQueues,
) -> std::io::Result<()> {
    for (i, g) in guards.iter_mut().enumerate() {
        if used & (1 << i) != 0 && g.needs_notification().unwrap_or(true) {
            g.signal_used_queue()?;
        }
    }
    Ok(())
}

/// After answering queue `index` (and asking the driver not to notify it), keeps reading
/// its avail index for `poll`'s window and answers what comes meanwhile without a
/// notification's wake-up (see [`super::poll`]).
fn keep_polling<G: DerefMut<Target = VringState>>(
    poll: &mut AdaptivePoll,
    dev: &mut dyn VirtioDevice,
    index: usize,
    guards: &mut [G],
    mem: &GuestMemoryMmap,
) -> std::io::Result<()> {
    let started = Instant::now();
    let mut last = started;
    loop {
        let q = guards[index].get_queue_mut();
        let waiting = q
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|avail| avail.0 != q.next_avail());
        if waiting {
            let used = process(dev, Some(index), guards, mem);
            if used & (1 << index) == 0 {
                // Handed to other threads (or not poppable): their events bring us back.
                signal(guards, used)?;
                poll.interrupted();
                return Ok(());
            }
            last = Instant::now();
            if last - started >= MAX_SESSION {
                // The device re-armed notifications as it answered: the driver's next
                // request wakes the thread.
                signal(guards, used)?;
                poll.interrupted();
                return Ok(());
            }
            ask_quiet(guards[index].get_queue_mut(), mem);
            signal(guards, used)?;
        } else if last.elapsed() >= poll.window() {
            // Ask for notifications again, then look once more: a request published
            // before the driver could see that is ours to take now.
            if q.enable_notification(mem).unwrap_or(false) {
                ask_quiet(q, mem);
                continue;
            }
            poll.gave_up(last);
            return Ok(());
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Asks the driver not to notify queue `q`: with EVENT_IDX an avail_event behind what the
/// driver has published (it notifies only on passing it), else the NO_NOTIFY flag.
fn ask_quiet(q: &mut Queue, mem: &GuestMemoryMmap) {
    if !q.event_idx_enabled() {
        let _ = q.disable_notification(mem);
        return;
    }
    let avail_event = GuestAddress(q.used_ring()).checked_add(4 + 8 * u64::from(q.size()));
    if let Some(at) = avail_event {
        let behind = q.next_avail().wrapping_sub(1);
        let _ = mem.store(u16::to_le(behind), at, Ordering::Release);
    }
}

type Daemon = VhostUserDaemon<Arc<Mutex<VhostUserDevice>>>;

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

/// A device being served on a vhost-user socket by thread `vu-<name>`.
#[derive(Debug)]
pub struct VhostUserServer {
    pub socket: PathBuf,
    threads: Vec<JoinHandle<()>>,
}

impl VhostUserServer {
    /// Waits until the frontend connected and then disconnected.
    pub fn join(mut self) {
        self.join_threads();
    }

    fn join_threads(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }

    /// Ends the session once the frontend is gone (QEMU exited or was killed). A frontend
    /// that never came (QEMU failed to start) is stood in for by an empty connection, which
    /// ends the relay (where there is one) and the library's session at once.
    pub fn finish(mut self) {
        self.finish_threads();
    }

    fn finish_threads(&mut self) {
        if !self.threads.is_empty() {
            let _ = UnixStream::connect(&self.socket);
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

/// Listens on `socket` (before returning, so a frontend started afterwards finds it) and
/// serves `device` to the first frontend that connects, until it disconnects. With
/// `seccomp`, the serving threads (and the library's vring workers they start) run under
/// the device filter from before the frontend's first message.
pub fn serve(
    name: &str,
    device: Arc<Mutex<dyn VirtioDevice>>,
    socket: &Path,
    seccomp: bool,
) -> Result<VhostUserServer, VhostUserError> {
    // QEMU's virtio-net front breaks the protocol's message order (see proxy.rs): its
    // frontend connects to `socket`, where the relay listens, and the library listens on a
    // private socket beside it, which the relay connects to. Other fronts reach the library
    // directly (two threads per device fewer).
    let relayed = lock(&device).device_type() == devices::virtio::device_type::NET;
    let inner = if relayed {
        socket.with_extension("lib.sock")
    } else {
        socket.to_owned()
    };
    let listen_err = |source| VhostUserError::Listen {
        path: socket.to_owned(),
        source,
    };
    let mut listener = Listener::new(&inner, true).map_err(listen_err)?;
    let public = if relayed {
        let _ = std::fs::remove_file(socket);
        Some(
            UnixListener::bind(socket)
                .map_err(|e| listen_err(vhost::vhost_user::Error::SocketError(e)))?,
        )
    } else {
        None
    };
    let session_device = device.clone();
    let thread_name = format!("vu-{name}");
    let log_name = name.to_string();
    // The daemon is made on its serving thread, after the filter: the library starts its
    // vring workers as it makes it, and they inherit the filter.
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            let made = confine(seccomp, &log_name).and_then(|()| daemon(&log_name, device));
            let mut daemon = match made {
                Ok(d) => {
                    let _ = ready_tx.send(Ok(()));
                    d
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let served = daemon.start(&mut listener).and_then(|()| daemon.wait());
            if let Err(e) = served {
                // A frontend that simply went away ends the connection with an error too.
                log::debug!("vhost-user {log_name}: {e}");
            }
            // A frontend that died (QEMU killed) never reset the device: do it here, so
            // its host-side connections (the agent's, the containers' streams) end too, and
            // stop the library's vring workers, which would otherwise hold the device.
            for handler in daemon.get_epoll_handlers() {
                handler.send_exit_event();
            }
            lock(&session_device).reset();
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
    let Some(public) = public else {
        return Ok(VhostUserServer {
            socket: socket.to_owned(),
            threads: vec![thread],
        });
    };
    let relay_name = format!("vu-relay-{name}");
    let log_name = name.to_string();
    let relay = std::thread::Builder::new()
        .name(relay_name.clone())
        .spawn(move || {
            if let Err(e) = confine(seccomp, &log_name) {
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
    Ok(VhostUserServer {
        socket: socket.to_owned(),
        threads: vec![thread, relay],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use vmm_sys_util::tempdir::TempDir;

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
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            server.finish();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("finish returns");
        assert!(listed().is_empty(), "left: {:?}", listed());
        let rng = Arc::new(Mutex::new(devices::rng::Rng::new()));
        drop(serve("rng", rng, &socket, false).unwrap());
        assert!(listed().is_empty(), "left: {:?}", listed());
        let left = crate::vhost_user::device_threads();
        assert!(left.is_empty(), "{left:?}");
    }
}
