//! One stream connection between a guest port and a host Unix stream: its state machine,
//! credit accounting (virtio spec 1.2, 5.10.6.3) and the relay of bytes both ways.
//!
//! Bytes toward the guest are read from the Unix stream straight into the guest's rx buffer,
//! never more than the guest's credit allows, so nothing is buffered on that side. Bytes from
//! the guest go straight to the Unix stream; what a slow peer does not take waits in `out`,
//! which can never exceed the credit the device offers (`CONN_BUF_SIZE`), because `fwd_cnt`
//! only advances once bytes reach the peer.

use std::io::{self, ErrorKind};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice};
use vmm_sys_util::epoll::EventSet;

use super::packet::{
    op, op_name, write_reply, Packet, Reply, HEADER_SIZE, SHUTDOWN_BOTH, SHUTDOWN_RCV,
    SHUTDOWN_SEND,
};

/// Credit the device offers the guest on each connection (`buf_alloc`): the most bytes from
/// the guest that may wait for a slow Unix peer. It is also the bound on that buffer.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Largest payload of one packet either way (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PKT_DATA: u32 = 64 * 1024;
/// Bytes forwarded without telling the guest after which an OP_CREDIT_UPDATE goes out.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 2;

/// A connection's identity: host-side port, guest-side port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// A host client asked for a guest port; waiting for the guest's OP_RESPONSE.
    LocalInit,
    Established,
    /// The host side is shut; an OP_RST is on its way to the guest.
    Resetting,
    /// Finished; the muxer drops it.
    Closed,
}

/// Control packets waiting for an rx buffer.
mod pending {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const CREDIT_UPDATE: u8 = 4;
    pub const RST: u8 = 8;
}

#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    key: ConnKey,
    state: State,
    pending: u8,
    /// OP_SHUTDOWN flags to send to the guest.
    shutdown_to_send: u32,
    /// OP_SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// The Unix stream has bytes or EOF to read (seen by epoll, not yet drained).
    host_readable: bool,
    /// Read EOF: the host sends no more.
    host_eof: bool,
    /// The host peer closed both ways (EPOLLHUP): nothing more can be written to it.
    host_hup: bool,
    /// The Unix stream's write side was shut after the guest's SHUTDOWN_SEND.
    wrote_shutdown: bool,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes received from the guest.
    rx_cnt: u32,
    /// Bytes received from the guest and written to the host.
    fwd_cnt: u32,
    /// `fwd_cnt` as the guest last heard it.
    last_fwd_cnt_sent: u32,
    /// Guest bytes the host peer has not taken yet: `out[out_off..]`.
    out: Vec<u8>,
    out_off: usize,
    /// Epoll token of the stream.
    pub token: u64,
    /// Queued in the muxer's rx queue.
    pub in_rxq: bool,
    /// What the stream is registered for in the muxer's epoll (`None`: not registered).
    pub registered: Option<EventSet>,
}

impl Connection {
    fn new(stream: UnixStream, token: u64, key: ConnKey, state: State, pending: u8) -> Self {
        Self {
            stream,
            key,
            state,
            pending,
            shutdown_to_send: 0,
            peer_shutdown: 0,
            host_readable: false,
            host_eof: false,
            host_hup: false,
            wrote_shutdown: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            out: Vec::new(),
            out_off: 0,
            token,
            in_rxq: false,
            registered: None,
        }
    }

    /// A host client's connection to a guest port: OP_REQUEST goes out first.
    pub fn new_local(stream: UnixStream, token: u64, key: ConnKey) -> Self {
        Self::new(stream, token, key, State::LocalInit, pending::REQUEST)
    }

    /// A guest connection that reached a host listener: OP_RESPONSE goes out first.
    pub fn new_peer(
        stream: UnixStream,
        token: u64,
        key: ConnKey,
        buf_alloc: u32,
        fwd_cnt: u32,
    ) -> Self {
        let mut c = Self::new(stream, token, key, State::Established, pending::RESPONSE);
        c.peer_buf_alloc = buf_alloc;
        c.peer_fwd_cnt = fwd_cnt;
        c
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Done with: the muxer drops it (and so closes the Unix stream).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Bytes the device may still send the guest within the credit it announced.
    fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn out_len(&self) -> usize {
        self.out.len() - self.out_off
    }

    fn can_read_host(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    fn needs_credit_update(&self) -> bool {
        if self.state != State::Established {
            return false;
        }
        let unannounced = self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent);
        // What the guest believes it may still send.
        let guest_view =
            CONN_BUF_SIZE.saturating_sub(self.rx_cnt.wrapping_sub(self.last_fwd_cnt_sent));
        self.pending & pending::CREDIT_UPDATE != 0
            || unannounced >= CREDIT_UPDATE_THRESHOLD
            || (unannounced > 0 && guest_view < MAX_PKT_DATA)
    }

    /// Has a packet for the guest as soon as there is an rx buffer.
    pub fn wants_rx(&self) -> bool {
        self.state != State::Closed
            && (self.pending != 0
                || self.shutdown_to_send != 0
                || self.can_read_host()
                || self.needs_credit_update())
    }

    /// What to watch the Unix stream for. Readability only while the guest has credit and
    /// the last readiness was consumed, so a level-triggered epoll never spins; `None` once
    /// the stream is shut (EPOLLHUP would fire for ever).
    pub fn interest(&self) -> Option<EventSet> {
        if self.host_hup {
            return None;
        }
        match self.state {
            // Only hang-ups, which epoll always reports.
            State::LocalInit => Some(EventSet::empty()),
            State::Established => {
                let mut set = EventSet::empty();
                if !self.host_readable
                    && !self.host_eof
                    && self.peer_shutdown & SHUTDOWN_RCV == 0
                    && self.peer_credit() > 0
                {
                    set |= EventSet::IN;
                }
                if self.out_len() > 0 {
                    set |= EventSet::OUT;
                }
                Some(set)
            }
            State::Resetting | State::Closed => None,
        }
    }

    /// The device gives up on the connection: shut the host side, tell the guest with an RST.
    pub fn reset(&mut self) {
        if matches!(self.state, State::Resetting | State::Closed) {
            return;
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        self.drop_out();
        self.host_readable = false;
        if self.pending & pending::REQUEST != 0 {
            // The guest never heard of it.
            self.state = State::Closed;
            return;
        }
        if self.pending & pending::RESPONSE != 0 {
            // A refused connect: no SHUTDOWN before the RST.
            self.shutdown_to_send = 0;
        }
        self.pending = pending::RST;
        self.state = State::Resetting;
    }

    /// The host closed for good: the guest hears SHUTDOWN (both ways), then RST.
    fn close_both_ways(&mut self) {
        self.shutdown_to_send = SHUTDOWN_BOTH;
        self.reset();
    }

    /// The guest reset the connection: close the host side, say nothing more.
    fn close(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.drop_out();
        self.state = State::Closed;
    }

    /// Once the guest stopped sending and its bytes reached the peer, shut the stream's write
    /// side; once neither side has anything more to say, end the connection with an RST.
    fn settle(&mut self) {
        if self.state != State::Established {
            return;
        }
        let guest_done = self.peer_shutdown & SHUTDOWN_SEND != 0 && self.out_len() == 0;
        if guest_done && !self.wrote_shutdown {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.wrote_shutdown = true;
        }
        let host_done = self.host_eof || self.peer_shutdown & SHUTDOWN_RCV != 0;
        if guest_done && host_done {
            self.reset();
        }
    }

    /// A packet from the guest for this connection.
    pub fn on_guest_packet(&mut self, pkt: &Packet<'_>) {
        // Every header carries the sender's credit.
        self.peer_buf_alloc = pkt.buf_alloc();
        self.peer_fwd_cnt = pkt.fwd_cnt();
        match (self.state, pkt.op()) {
            (State::Closed, _) => {}
            (_, op::RST) => self.close(),
            (State::Resetting, _) => {}
            (State::LocalInit, op::RESPONSE) => self.confirm_to_client(),
            (State::Established, op::RW) => self.take_guest_data(pkt.data_slice()),
            (State::Established, op::CREDIT_UPDATE) => {}
            (State::Established, op::CREDIT_REQUEST) => self.pending |= pending::CREDIT_UPDATE,
            (State::Established, op::SHUTDOWN) => self.peer_shutdown |= pkt.flags() & SHUTDOWN_BOTH,
            (state, o) => {
                log::debug!(
                    "vsock: {}<->{}: unexpected {} in {state:?}",
                    self.key.local_port,
                    self.key.peer_port,
                    op_name(o)
                );
                self.reset();
            }
        }
        self.settle();
    }

    /// The guest accepted a host client's connection: tell the client (hybrid protocol).
    fn confirm_to_client(&mut self) {
        let line = format!("OK {}\n", self.key.local_port);
        // A fresh stream's send buffer is empty: the short line goes in whole or not at all.
        match send_bytes(&self.stream, line.as_bytes()) {
            Ok(n) if n == line.len() => self.state = State::Established,
            Ok(_) => self.reset(),
            Err(e) => {
                log::debug!("vsock: cannot confirm port {}: {e}", self.key.peer_port);
                self.reset();
            }
        }
    }

    /// OP_RW payload from the guest: to the host peer, or into `out` if it is slow.
    fn take_guest_data(&mut self, data: Option<&VolatileSlice<'_, ()>>) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            return self.reset();
        }
        let Some(data) = data else { return };
        let len = data.len() as u32;
        if self.rx_cnt.wrapping_sub(self.fwd_cnt) as u64 + len as u64 > CONN_BUF_SIZE as u64 {
            log::warn!(
                "vsock: guest port {} overran its credit; resetting",
                self.key.peer_port
            );
            return self.reset();
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        if self.host_hup {
            // Nobody will read it; count it as taken so the guest is not left waiting.
            self.fwd_cnt = self.fwd_cnt.wrapping_add(len);
            return;
        }
        let mut written = 0;
        if self.out_len() == 0 {
            match send_volatile(&self.stream, data) {
                Ok(n) => written = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    log::debug!("vsock: host port {}: {e}", self.key.local_port);
                    return self.reset();
                }
            }
        }
        self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        if written < data.len() {
            // In bounds: `written <= data.len()`.
            if let Ok(rest) = data.offset(written) {
                self.append_out(&rest);
            }
        }
    }

    fn append_out(&mut self, data: &VolatileSlice<'_, ()>) {
        if self.out_off > 0 {
            self.out.drain(..self.out_off);
            self.out_off = 0;
        }
        if self.out.capacity() == 0 {
            // The credit check bounds the contents by CONN_BUF_SIZE: allocate it once.
            self.out.reserve_exact(CONN_BUF_SIZE as usize);
        }
        let old = self.out.len();
        self.out.resize(old + data.len(), 0);
        data.copy_to(&mut self.out[old..]);
    }

    /// Writes what waits in `out` to the host peer.
    fn flush_out(&mut self) {
        while self.out_len() > 0 {
            match send_bytes(&self.stream, &self.out[self.out_off..]) {
                Ok(0) => break,
                Ok(n) => {
                    self.out_off += n;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::debug!("vsock: host port {}: {e}", self.key.local_port);
                    return self.reset();
                }
            }
        }
        if self.out_len() == 0 {
            self.out = Vec::new();
            self.out_off = 0;
        }
    }

    /// Forgets what waits for the host peer (it is gone), counting it as forwarded.
    fn drop_out(&mut self) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(self.out_len() as u32);
        self.out = Vec::new();
        self.out_off = 0;
    }

    /// Epoll readiness of the Unix stream.
    pub fn on_host_event(&mut self, events: EventSet) {
        if events.contains(EventSet::ERROR) {
            log::debug!("vsock: host port {}: socket error", self.key.local_port);
            self.reset();
            return;
        }
        if events.contains(EventSet::IN) {
            self.host_readable = true;
        }
        if events.contains(EventSet::OUT) {
            self.flush_out();
        }
        if events.contains(EventSet::HANG_UP) {
            self.on_host_hangup();
        }
        self.settle();
    }

    fn on_host_hangup(&mut self) {
        self.host_hup = true;
        self.drop_out();
        match self.state {
            State::LocalInit => self.reset(),
            State::Established if self.host_eof || self.peer_shutdown & SHUTDOWN_RCV != 0 => {
                self.close_both_ways()
            }
            // Relay what the client wrote before closing; EOF follows, then SHUTDOWN and RST.
            State::Established => self.host_readable = true,
            State::Resetting | State::Closed => {}
        }
    }

    fn on_host_eof(&mut self) {
        self.host_eof = true;
        self.host_readable = false;
        if self.host_hup {
            self.close_both_ways();
        } else {
            // A half close: the guest may still send.
            self.shutdown_to_send |= SHUTDOWN_SEND;
            self.settle();
        }
    }

    /// Fills `pkt`, an rx buffer, with this connection's next packet for the guest; returns
    /// the used length, or `None` when there is nothing to send.
    pub fn next_rx(&mut self, pkt: &mut Packet<'_>, guest_cid: u64) -> Option<u32> {
        if self.state == State::Closed {
            return None;
        }
        for (flag, o) in [
            (pending::REQUEST, op::REQUEST),
            (pending::RESPONSE, op::RESPONSE),
        ] {
            if self.pending & flag != 0 {
                self.pending &= !flag;
                return Some(self.send(pkt, guest_cid, o, 0, 0));
            }
        }
        if self.can_read_host() {
            if let Some(len) = self.read_host(pkt, guest_cid) {
                return Some(len);
            }
        }
        if self.shutdown_to_send != 0 {
            let flags = std::mem::take(&mut self.shutdown_to_send);
            return Some(self.send(pkt, guest_cid, op::SHUTDOWN, flags, 0));
        }
        if self.pending & pending::RST != 0 {
            self.state = State::Closed;
            return Some(self.send(pkt, guest_cid, op::RST, 0, 0));
        }
        if self.needs_credit_update() {
            return Some(self.send(pkt, guest_cid, op::CREDIT_UPDATE, 0, 0));
        }
        None
    }

    /// Reads host bytes straight into the packet's data buffer, within the guest's credit.
    fn read_host(&mut self, pkt: &mut Packet<'_>, guest_cid: u64) -> Option<u32> {
        let data = pkt.data_slice()?;
        let room = data
            .len()
            .min(self.peer_credit() as usize)
            .min(MAX_PKT_DATA as usize);
        let mut buf = data.subslice(0, room).ok()?;
        loop {
            match (&self.stream).read_volatile(&mut buf) {
                Ok(0) => {
                    self.on_host_eof();
                    return None;
                }
                Ok(n) => {
                    self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
                    return Some(self.send(pkt, guest_cid, op::RW, 0, n as u32));
                }
                Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::Interrupted => {}
                Err(VolatileMemoryError::IOError(e)) if e.kind() == ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return None;
                }
                Err(e) => {
                    log::debug!("vsock: host port {}: {e}", self.key.local_port);
                    self.reset();
                    return None;
                }
            }
        }
    }

    fn send(&mut self, pkt: &mut Packet<'_>, guest_cid: u64, o: u16, flags: u32, len: u32) -> u32 {
        // Every header tells the guest our credit, so no separate update is due after it.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !pending::CREDIT_UPDATE;
        let reply = Reply {
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            op: o,
            flags,
            len,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        };
        write_reply(pkt, guest_cid, &reply);
        HEADER_SIZE as u32 + len
    }
}

/// `send(2)` with MSG_NOSIGNAL: a vanished peer is an EPIPE error, not a SIGPIPE that kills
/// the VMM.
///
/// # Safety
/// `ptr` must be valid for reads of `len` bytes for the duration of the call.
unsafe fn send_raw(stream: &UnixStream, ptr: *const u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: the caller guarantees `ptr`/`len`; the descriptor is owned by `stream`.
        let n = unsafe { libc::send(stream.as_raw_fd(), ptr.cast(), len, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn send_bytes(stream: &UnixStream, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is a live slice of `data.len()` bytes.
    unsafe { send_raw(stream, data.as_ptr(), data.len()) }
}

fn send_volatile(stream: &UnixStream, data: &VolatileSlice<'_, ()>) -> io::Result<usize> {
    let guard = data.ptr_guard();
    // SAFETY: the guard keeps the slice's `data.len()` bytes of guest memory mapped while
    // the kernel copies them; the guest changing them meanwhile only changes what is sent.
    unsafe { send_raw(stream, guard.as_ptr(), data.len()) }
}
