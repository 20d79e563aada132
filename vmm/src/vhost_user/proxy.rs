//! A relay between the vhost-user frontend (QEMU) and the vhost-user library.
//!
//! QEMU 7.2's virtio-net sends VHOST_USER_SET_VRING_ENABLE as soon as the guest driver
//! sets features, before VHOST_USER_SET_FEATURES. The `vhost` crate treats that as a fatal
//! protocol error and drops the connection, leaving the guest a NIC that moves nothing.
//! The relay forwards every message both ways with its file descriptors; it acknowledges
//! such an early SET_VRING_ENABLE itself and hands it to the library right after
//! SET_FEATURES, where the protocol allows it. Only virtio-net's connection goes through it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const HEADER: usize = 12;
/// Largest body we relay; vhost-user messages are a few hundred bytes.
const MAX_BODY: usize = 64 * 1024;
const MAX_FDS: usize = 32;
const SET_FEATURES: u32 = 2;
const SET_VRING_ENABLE: u32 = 18;
const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;

/// One message: header and body bytes, and the descriptors that came with it.
struct Message {
    bytes: Vec<u8>,
    files: Vec<File>,
}

impl Message {
    fn field(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes[at..at + 4].try_into().expect("4 bytes"))
    }
    fn request(&self) -> u32 {
        self.field(0)
    }
    fn flags(&self) -> u32 {
        self.field(4)
    }
}

/// Reads one message; `None` when the peer closed the connection.
fn recv(from: &UnixStream) -> io::Result<Option<Message>> {
    let mut header = [0u8; HEADER];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    // SAFETY: the iovec points at `header`, which outlives the call; `fds` has room for
    // MAX_FDS descriptors, which the call fills and we take ownership of below.
    let (n, nfds) = unsafe { from.recv_with_fds(&mut iov, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    // SAFETY: the first `nfds` entries are descriptors the kernel just gave us.
    let files = fds[..nfds]
        .iter()
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Ok(None);
    }
    let mut reader = from;
    if n < HEADER {
        reader.read_exact(&mut header[n..])?;
    }
    let size = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes")) as usize;
    if size > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{size}-byte message"),
        ));
    }
    let mut bytes = header.to_vec();
    bytes.resize(HEADER + size, 0);
    reader.read_exact(&mut bytes[HEADER..])?;
    Ok(Some(Message { bytes, files }))
}

fn send(to: &UnixStream, msg: &Message) -> io::Result<()> {
    let fds: Vec<RawFd> = msg.files.iter().map(AsRawFd::as_raw_fd).collect();
    let n = to
        .send_with_fds(&[&msg.bytes[..]], &fds)
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let mut writer = to;
    writer.write_all(&msg.bytes[n..])
}

/// An acknowledgement (u64 0: success) for `request`.
fn ack(request: u32) -> Message {
    let mut bytes = Vec::with_capacity(HEADER + 8);
    bytes.extend_from_slice(&request.to_le_bytes());
    bytes.extend_from_slice(&(FLAG_VERSION | FLAG_REPLY).to_le_bytes());
    bytes.extend_from_slice(&8u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes());
    Message {
        bytes,
        files: Vec::new(),
    }
}

/// Relays between `frontend` and `backend`, both ways on the calling thread, until either
/// side closes; then closes both.
pub fn relay(frontend: UnixStream, backend: UnixStream) -> io::Result<()> {
    let relayed = pump(&frontend, &backend);
    let _ = frontend.shutdown(Shutdown::Both);
    let _ = backend.shutdown(Shutdown::Both);
    relayed
}

const FRONT: u64 = 0;
const BACK: u64 = 1;

/// Moves each message as its side becomes readable: the frontend's to the back end (see
/// [`Early`]), the back end's replies to the frontend. Messages are a few hundred bytes,
/// so a send never waits on a peer that waits on us.
fn pump(frontend: &UnixStream, backend: &UnixStream) -> io::Result<()> {
    let epoll = Epoll::new()?;
    for (side, token) in [(frontend, FRONT), (backend, BACK)] {
        let event = EpollEvent::new(EventSet::IN, token);
        epoll.ctl(ControlOperation::Add, side.as_raw_fd(), event)?;
    }
    let mut early = Early::default();
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for event in &events[..n] {
            let (from, to) = match event.data() {
                FRONT => (frontend, backend),
                _ => (backend, frontend),
            };
            // Either side closing (or breaking the protocol) ends the relay.
            let Ok(Some(msg)) = recv(from) else {
                return Ok(());
            };
            let sent = match event.data() {
                FRONT => early.forward(msg, frontend, backend)?,
                _ => send(to, &msg).is_ok(),
            };
            if !sent {
                return Ok(());
            }
        }
    }
}

/// The vring enables that came before the features (see the module's doc).
#[derive(Default)]
struct Early {
    features_set: bool,
    deferred: Vec<Message>,
}

impl Early {
    /// Forwards one of the frontend's messages to the back end, or holds it back; `false`
    /// where the back end is gone.
    fn forward(
        &mut self,
        mut msg: Message,
        frontend: &UnixStream,
        backend: &UnixStream,
    ) -> io::Result<bool> {
        match msg.request() {
            SET_VRING_ENABLE if !self.features_set => {
                // Too early for the library: acknowledge it here, replay it later without
                // asking the library for a second acknowledgement.
                if msg.flags() & FLAG_NEED_REPLY != 0 {
                    send(frontend, &ack(SET_VRING_ENABLE))?;
                    let flags = msg.flags() & !FLAG_NEED_REPLY;
                    msg.bytes[4..8].copy_from_slice(&flags.to_le_bytes());
                }
                self.deferred.push(msg);
                return Ok(true);
            }
            SET_FEATURES => self.features_set = true,
            _ => {}
        }
        let replay = msg.request() == SET_FEATURES;
        if send(backend, &msg).is_err() {
            return Ok(false);
        }
        if replay {
            for early in self.deferred.drain(..) {
                send(backend, &early)?;
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(request: u32, flags: u32, body: &[u8]) -> Message {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&request.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(body);
        Message {
            bytes,
            files: Vec::new(),
        }
    }

    #[test]
    fn early_vring_enable_is_answered_and_the_rest_relayed_with_fds() {
        let (qemu, front) = UnixStream::pair().unwrap();
        let (back, daemon) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay(front, back));
        // An early enable needing a reply: answered by the relay, never seen by the daemon.
        send(
            &qemu,
            &msg(SET_VRING_ENABLE, FLAG_VERSION | FLAG_NEED_REPLY, &[0; 8]),
        )
        .unwrap();
        let reply = recv(&qemu).unwrap().unwrap();
        assert_eq!(
            (reply.request(), reply.flags()),
            (SET_VRING_ENABLE, FLAG_VERSION | FLAG_REPLY)
        );
        // A message with a descriptor reaches the daemon with its descriptor.
        let mut with_fd = msg(13, FLAG_VERSION, &[1, 0, 0, 0, 0, 0, 0, 0]);
        with_fd.files.push(File::open("/dev/null").unwrap());
        send(&qemu, &with_fd).unwrap();
        let got = recv(&daemon).unwrap().unwrap();
        assert_eq!(
            (got.request(), got.files.len(), &got.bytes[HEADER..]),
            (13, 1, &[1, 0, 0, 0, 0, 0, 0, 0][..])
        );
        // SET_FEATURES goes through, followed by the early enable without its reply flag;
        // later enables go straight through; replies flow back.
        send(&qemu, &msg(SET_FEATURES, FLAG_VERSION, &[0; 8])).unwrap();
        assert_eq!(recv(&daemon).unwrap().unwrap().request(), SET_FEATURES);
        let replayed = recv(&daemon).unwrap().unwrap();
        assert_eq!(
            (replayed.request(), replayed.flags()),
            (SET_VRING_ENABLE, FLAG_VERSION)
        );
        send(&qemu, &msg(SET_VRING_ENABLE, FLAG_VERSION, &[0; 8])).unwrap();
        assert_eq!(recv(&daemon).unwrap().unwrap().request(), SET_VRING_ENABLE);
        send(&daemon, &ack(7)).unwrap();
        assert_eq!(recv(&qemu).unwrap().unwrap().request(), 7);
        drop(qemu);
        t.join().unwrap().unwrap();
        assert!(recv(&daemon).unwrap().is_none(), "daemon side closed too");
    }

    /// A relay that cannot answer its frontend (gone before the acknowledgement) ends with
    /// the error, still closes the back end's side and leaves no thread.
    #[test]
    fn a_relay_that_fails_leaves_no_thread_and_closes_both_sides() {
        let _one_at_a_time = crate::vhost_user::TEST_SERVERS.lock();
        let (qemu, front) = UnixStream::pair().unwrap();
        let (back, daemon) = UnixStream::pair().unwrap();
        let early = msg(SET_VRING_ENABLE, FLAG_VERSION | FLAG_NEED_REPLY, &[0; 8]);
        send(&qemu, &early).unwrap();
        drop(qemu);
        assert!(
            relay(front, back).is_err(),
            "the acknowledgement cannot be sent"
        );
        let left = crate::vhost_user::device_threads();
        assert!(left.is_empty(), "{left:?}");
        assert!(recv(&daemon).unwrap().is_none(), "daemon side closed");
    }
}
