//! The host side: a Unix listener for host-initiated connections (Firecracker's hybrid
//! `CONNECT <port>\n` / `OK <port>\n` protocol), Unix streams to `<uds_path>_<port>` for
//! guest-initiated ones, one internal epoll over all of them (the device's backend fd), and
//! the queues of packets waiting for guest rx buffers.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnKey, Connection, MAX_PKT_DATA};
use super::packet::{op, write_reply, Packet, Reply, HEADER_SIZE, HOST_CID, TYPE_STREAM};
use super::VsockError;

/// Most host streams at once (connections plus clients still sending `CONNECT`). With
/// `CONN_BUF_SIZE` it bounds what a guest can make the host buffer.
pub const MAX_CONNECTIONS: usize = 256;
/// Most RSTs for unknown connections waiting for rx buffers; past it the device stops taking
/// tx packets until the guest gives rx buffers.
pub const MAX_PENDING_RESETS: usize = 64;
/// Longest `CONNECT <port>\n` line accepted.
const MAX_CONNECT_LINE: usize = 32;
/// Host-side ports of host-initiated connections count up from here.
const EPHEMERAL_PORT_BASE: u32 = 1 << 30;
/// Epoll events taken per `process_events`; the rest stay ready (level-triggered).
const EVENT_BATCH: usize = 64;
/// Epoll token of the listener; streams count up from 1.
const LISTENER: u64 = 0;

/// A host client that has not finished its `CONNECT` line.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
}

enum LineRead {
    Pending,
    Port(u32),
    Fail(&'static str),
}

impl Handshake {
    /// Reads one byte at a time so that bytes after the line stay in the stream for the guest.
    fn read_line(&mut self) -> LineRead {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return LineRead::Fail("closed before CONNECT"),
                Ok(_) if byte[0] == b'\n' => return parse_connect(&self.line),
                Ok(_) if self.line.len() >= MAX_CONNECT_LINE => {
                    return LineRead::Fail("line too long")
                }
                Ok(_) => self.line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return LineRead::Pending,
                Err(_) => return LineRead::Fail("read error"),
            }
        }
    }
}

fn parse_connect(line: &[u8]) -> LineRead {
    let Ok(text) = std::str::from_utf8(line) else {
        return LineRead::Fail("not text");
    };
    let mut words = text.split_whitespace();
    match (
        words.next(),
        words.next().map(str::parse::<u32>),
        words.next(),
    ) {
        (Some("CONNECT"), Some(Ok(port)), None) => LineRead::Port(port),
        _ => LineRead::Fail("not CONNECT <port>"),
    }
}

/// `<uds_path>_<port>`: where a guest connection to host port `port` goes.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds_path.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Connects without blocking: a listener with a full backlog fails (EAGAIN) instead of
/// stalling the VMM thread.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let flags = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket(2) with constant arguments; it returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is an initialised sockaddr_un of `len` bytes with a NUL-terminated path.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Pops the next chain; on an empty ring, re-enables driver notifications (with EVENT_IDX:
/// publishes `avail_event`, which the transport leaves to the device) and pops once more in
/// case the driver added a chain meanwhile. One retry only: a corrupt avail index would
/// otherwise look non-empty for ever.
fn pop_or_rearm<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    if let Some(chain) = queue.pop_descriptor_chain(mem) {
        return Some(chain);
    }
    match queue.enable_notification(mem) {
        Ok(true) => queue.pop_descriptor_chain(mem),
        _ => None,
    }
}

/// Adds, changes or removes `fd`'s registration from `from` to `to`.
fn set_interest(
    epoll: &Epoll,
    fd: RawFd,
    token: u64,
    from: Option<EventSet>,
    to: Option<EventSet>,
) -> io::Result<()> {
    let operation = match (from, to) {
        (None, Some(_)) => ControlOperation::Add,
        (Some(_), Some(_)) => ControlOperation::Modify,
        (Some(_), None) => ControlOperation::Delete,
        (None, None) => return Ok(()),
    };
    epoll.ctl(
        operation,
        fd,
        EpollEvent::new(to.unwrap_or(EventSet::empty()), token),
    )
}

#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    /// The driver is up: host clients are accepted.
    active: bool,
    /// The listener is in the epoll.
    listening: bool,
    /// accept(2) failed with something other than EAGAIN (e.g. EMFILE): stop watching the
    /// listener, which would stay ready, until a connection closes.
    accept_paused: bool,
    conns: HashMap<ConnKey, Connection>,
    handshakes: HashMap<u64, Handshake>,
    /// Epoll token of each connection's stream.
    tokens: HashMap<u64, ConnKey>,
    next_token: u64,
    next_port: u32,
    /// Connections with a packet for the guest, served round-robin.
    rxq: VecDeque<ConnKey>,
    /// RSTs answering packets for unknown connections.
    resets: VecDeque<ConnKey>,
    /// Tx processing stopped because `resets` was full.
    tx_stalled: bool,
}

impl Muxer {
    /// Listens on `uds_path`, replacing a stale socket file left there.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        match std::fs::symlink_metadata(&uds_path) {
            Ok(m) if m.file_type().is_socket() => {
                std::fs::remove_file(&uds_path).map_err(|source| VsockError::RemoveStale {
                    path: uds_path.clone(),
                    source,
                })?
            }
            Ok(_) => return Err(VsockError::NotASocket { path: uds_path }),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => {
                return Err(VsockError::Bind {
                    path: uds_path,
                    source,
                })
            }
        }
        let listener = UnixListener::bind(&uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        })?;
        if let Err(source) = listener.set_nonblocking(true) {
            let _ = std::fs::remove_file(&uds_path);
            return Err(VsockError::Bind {
                path: uds_path,
                source,
            });
        }
        Ok(Self {
            guest_cid,
            uds_path,
            listener,
            epoll,
            active: false,
            listening: false,
            accept_paused: false,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            tokens: HashMap::new(),
            next_token: LISTENER + 1,
            next_port: EPHEMERAL_PORT_BASE,
            rxq: VecDeque::new(),
            resets: VecDeque::new(),
            tx_stalled: false,
        })
    }

    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Host streams open: connections and clients still handshaking.
    pub fn live(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    pub fn tx_stalled(&self) -> bool {
        self.tx_stalled
    }

    /// The driver is ready: start accepting host clients.
    pub fn activate(&mut self) -> io::Result<()> {
        self.active = true;
        self.update_listener()
    }

    /// Driver reset: every connection ends (host streams close), the listener waits for the
    /// next activation.
    pub fn reset(&mut self) {
        self.active = false;
        let _ = self.update_listener();
        for (_, conn) in self.conns.drain() {
            if conn.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, conn.fd(), EpollEvent::default());
            }
        }
        for (_, hs) in self.handshakes.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                hs.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.tokens.clear();
        self.rxq.clear();
        self.resets.clear();
        self.tx_stalled = false;
        self.accept_paused = false;
    }

    /// Watches the listener while accepting is possible and allowed.
    fn update_listener(&mut self) -> io::Result<()> {
        let want = self.active && !self.accept_paused && self.live() < MAX_CONNECTIONS;
        if want == self.listening {
            return Ok(());
        }
        let (from, to) = if want {
            (None, Some(EventSet::IN))
        } else {
            (Some(EventSet::IN), None)
        };
        set_interest(&self.epoll, self.listener.as_raw_fd(), LISTENER, from, to)?;
        self.listening = want;
        Ok(())
    }

    fn take_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    /// Handles what the epoll reports ready.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != ErrorKind::Interrupted {
                    log::warn!("vsock: epoll_wait: {e}");
                }
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER {
                self.accept_clients();
            } else if let Some(&key) = self.tokens.get(&token) {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.on_host_event(ev.event_set());
                }
                self.refresh(key);
            } else if self.handshakes.contains_key(&token) {
                self.continue_handshake(token);
            }
        }
    }

    fn accept_clients(&mut self) {
        while self.active && self.live() < MAX_CONNECTIONS {
            match self.listener.accept() {
                Ok((stream, _)) => self.add_handshake(stream),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    log::warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    self.accept_paused = true;
                    break;
                }
            }
        }
        if let Err(e) = self.update_listener() {
            log::warn!("vsock: epoll on {}: {e}", self.uds_path.display());
        }
    }

    fn add_handshake(&mut self, stream: UnixStream) {
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("vsock: host client: {e}");
            return;
        }
        let token = self.take_token();
        let ev = EpollEvent::new(EventSet::IN, token);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
        {
            log::warn!("vsock: host client: epoll: {e}");
            return;
        }
        let line = Vec::with_capacity(MAX_CONNECT_LINE);
        self.handshakes.insert(token, Handshake { stream, line });
    }

    fn drop_handshake(&mut self, token: u64) {
        if let Some(hs) = self.handshakes.remove(&token) {
            let fd = hs.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        let _ = self.update_listener();
    }

    fn continue_handshake(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        match hs.read_line() {
            LineRead::Pending => {}
            LineRead::Fail(why) => {
                log::debug!("vsock: host client on {}: {why}", self.uds_path.display());
                self.drop_handshake(token);
            }
            LineRead::Port(peer_port) => {
                let Some(hs) = self.handshakes.remove(&token) else {
                    return;
                };
                let key = ConnKey {
                    local_port: self.alloc_port(peer_port),
                    peer_port,
                };
                let mut conn = Connection::new_local(hs.stream, token, key);
                // It keeps the handshake's registration; `refresh` narrows it.
                conn.registered = Some(EventSet::IN);
                self.conns.insert(key, conn);
                self.tokens.insert(token, key);
                self.refresh(key);
            }
        }
    }

    /// A free host-side port for a connection to guest port `peer_port`.
    fn alloc_port(&mut self, peer_port: u32) -> u32 {
        // Ends: at most MAX_CONNECTIONS of the 3 * 2^30 ports are taken.
        loop {
            let port = self.next_port;
            self.next_port = port.checked_add(1).unwrap_or(EPHEMERAL_PORT_BASE);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return port;
            }
        }
    }

    /// After any change to a connection: drop it when finished, else bring its epoll
    /// registration and its place in the rx queue up to date.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.is_closed() {
            return self.remove(key);
        }
        let want = conn.interest();
        if want != conn.registered {
            match set_interest(&self.epoll, conn.fd(), conn.token, conn.registered, want) {
                Ok(()) => conn.registered = want,
                Err(e) => {
                    log::warn!("vsock: epoll for port {}: {e}", key.local_port);
                    conn.reset();
                    if conn.registered.is_some() {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            conn.fd(),
                            EpollEvent::default(),
                        );
                        conn.registered = None;
                    }
                }
            }
        }
        if conn.wants_rx() && !conn.in_rxq {
            conn.in_rxq = true;
            self.rxq.push_back(key);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            if conn.registered.is_some() {
                let _ = self
                    .epoll
                    .ctl(ControlOperation::Delete, conn.fd(), EpollEvent::default());
            }
            self.tokens.remove(&conn.token);
            if conn.in_rxq {
                self.rxq.retain(|k| *k != key);
            }
        }
        self.accept_paused = false;
        if let Err(e) = self.update_listener() {
            log::warn!("vsock: epoll on {}: {e}", self.uds_path.display());
        }
    }

    /// Handles every packet the guest made available on the tx queue; malformed ones are
    /// dropped. Returns whether the used ring changed.
    pub fn process_tx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        self.tx_stalled = false;
        loop {
            // Each packet may add one RST: keep room for it or leave the rest for later.
            if self.resets.len() >= MAX_PENDING_RESETS {
                self.tx_stalled = true;
                break;
            }
            let Some(mut chain) = pop_or_rearm(queue, mem) else {
                break;
            };
            let head = chain.head_index();
            match Packet::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_DATA) {
                Ok(pkt) => self.on_guest_packet(&pkt),
                Err(e) => log::debug!("vsock: dropping malformed tx packet: {e}"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                log::warn!("vsock: cannot return tx descriptor {head}: {e}");
                break;
            }
            used = true;
        }
        used
    }

    fn on_guest_packet(&mut self, pkt: &Packet<'_>) {
        if pkt.type_() != TYPE_STREAM
            || pkt.src_cid() != self.guest_cid
            || pkt.dst_cid() != HOST_CID
        {
            log::debug!(
                "vsock: dropping packet type {} from cid {} to cid {}",
                pkt.type_(),
                pkt.src_cid(),
                pkt.dst_cid()
            );
            return;
        }
        let key = ConnKey {
            local_port: pkt.dst_port(),
            peer_port: pkt.src_port(),
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.on_guest_packet(pkt);
            return self.refresh(key);
        }
        match pkt.op() {
            op::REQUEST => self.connect_to_host(key, pkt),
            // Never answer a reset with a reset.
            op::RST => {}
            _ => self.resets.push_back(key),
        }
    }

    /// A guest connect to host port P goes to the Unix listener at `<uds_path>_P`.
    fn connect_to_host(&mut self, key: ConnKey, pkt: &Packet<'_>) {
        if self.live() >= MAX_CONNECTIONS {
            log::warn!("vsock: {MAX_CONNECTIONS} connections open; refusing guest connect");
            return self.resets.push_back(key);
        }
        let path = port_path(&self.uds_path, key.local_port);
        match connect_nonblocking(&path) {
            Ok(stream) => {
                let token = self.take_token();
                let conn = Connection::new_peer(stream, token, key, pkt.buf_alloc(), pkt.fwd_cnt());
                self.conns.insert(key, conn);
                self.tokens.insert(token, key);
                self.refresh(key);
                let _ = self.update_listener();
            }
            Err(e) => {
                log::debug!("vsock: guest connect to {}: {e}", path.display());
                self.resets.push_back(key);
            }
        }
    }

    /// Puts waiting packets in the guest's rx buffers. Returns whether the used ring changed.
    pub fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut used = false;
        while !self.resets.is_empty() || !self.rxq.is_empty() {
            // Out of buffers with packets waiting: the re-arm makes the driver's next
            // buffer kick us.
            let Some(mut chain) = pop_or_rearm(queue, mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match Packet::from_rx_virtq_chain(mem, &mut chain, u32::MAX) {
                Ok(mut pkt) => match self.next_rx_packet(&mut pkt) {
                    Some(len) => len,
                    None if pkt.data_slice().is_some() => {
                        // Nothing to send after all: keep the buffer for later.
                        queue.go_to_previous_position();
                        break;
                    }
                    // A header-only buffer while only data waits: it can carry nothing.
                    None => 0,
                },
                Err(e) => {
                    log::debug!("vsock: dropping malformed rx buffer: {e}");
                    0
                }
            };
            if let Err(e) = queue.add_used(mem, head, len) {
                log::warn!("vsock: cannot return rx descriptor {head}: {e}");
                break;
            }
            used = true;
        }
        used
    }

    /// The next packet for the guest: pending RSTs first, then connections round-robin.
    fn next_rx_packet(&mut self, pkt: &mut Packet<'_>) -> Option<u32> {
        if let Some(key) = self.resets.pop_front() {
            write_reply(
                pkt,
                self.guest_cid,
                &Reply::rst(key.local_port, key.peer_port),
            );
            return Some(HEADER_SIZE as u32);
        }
        // Each queued connection gets one chance, so this ends even if none can send.
        for _ in 0..self.rxq.len() {
            let key = self.rxq.pop_front()?;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rxq = false;
            let sent = conn.next_rx(pkt, self.guest_cid);
            self.refresh(key);
            if sent.is_some() {
                return sent;
            }
        }
        None
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            if e.kind() != ErrorKind::NotFound {
                log::warn!("vsock: cannot remove {}: {e}", self.uds_path.display());
            }
        }
    }
}
