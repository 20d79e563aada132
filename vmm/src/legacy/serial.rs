//! The 16550 console on COM1: output to any writer, input from stdin or a Unix socket,
//! interrupts through an irqfd.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::EventFdTrigger;
use crate::bus::{lock, BusDevice};

/// Tells the input side when the guest drained the receive FIFO, so reading can resume.
#[derive(Debug)]
pub struct DrainEvents(EventFd);

impl SerialEvents for DrainEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

type Uart = vm_superio::Serial<EventFdTrigger, DrainEvents, Box<dyn Write + Send>>;

/// The COM1 UART.
pub struct Serial(Uart);

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Serial")
    }
}

impl Serial {
    /// `interrupt` is the irqfd of IRQ 4; returns the device and the FIFO-drained event.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> std::io::Result<(Self, EventFd)> {
        let drained = EventFd::new(EFD_NONBLOCK)?;
        let events = DrainEvents(drained.try_clone()?);
        Ok((
            Self(Uart::with_events(EventFdTrigger(interrupt), events, out)),
            drained,
        ))
    }

    fn enqueue(&mut self, bytes: &[u8]) -> usize {
        self.0.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    fn capacity(&self) -> usize {
        self.0.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            // A closed output (say, a pipe whose reader left) must not stop the guest.
            let _ = self.0.write(offset as u8, b);
        }
    }
}

/// Where console input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialInputSource {
    Stdin,
    /// A Unix socket the VMM listens on; one client at a time types into the console.
    Socket(PathBuf),
}

enum Source {
    Stdin,
    Listener(UnixListener, Option<UnixStream>),
}

/// Event-loop glue feeding host input into the UART without overrunning its FIFO.
pub struct SerialInput {
    serial: Arc<Mutex<Serial>>,
    source: Source,
    drained: EventFd,
    paused: bool,
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialInput")
            .field("paused", &self.paused)
            .finish()
    }
}

const DRAINED: u32 = 1;
const INPUT: u32 = 2;
const LISTENER: u32 = 3;

impl SerialInput {
    pub fn new(
        serial: Arc<Mutex<Serial>>,
        drained: EventFd,
        source: &SerialInputSource,
    ) -> std::io::Result<Self> {
        let source = match source {
            SerialInputSource::Stdin => Source::Stdin,
            SerialInputSource::Socket(path) => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("serial socket {}: {e}", path.display()))
                })?;
                l.set_nonblocking(true)?;
                Source::Listener(l, None)
            }
        };
        Ok(Self {
            serial,
            source,
            drained,
            paused: false,
        })
    }

    fn input_fd(&self) -> Option<RawFd> {
        match &self.source {
            Source::Stdin => Some(libc::STDIN_FILENO),
            Source::Listener(_, s) => s.as_ref().map(|s| s.as_raw_fd()),
        }
    }

    fn read_input(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.source {
            Source::Stdin => std::io::stdin().lock().read(buf),
            Source::Listener(_, Some(s)) => s.read(buf),
            Source::Listener(_, None) => Ok(0),
        }
    }

    fn on_input(&mut self, ops: &mut EventOps) {
        let Some(fd) = self.input_fd() else { return };
        let room = lock(&self.serial).capacity();
        if room == 0 {
            // FIFO full: stop watching input until the guest drains it.
            let _ = ops.remove(Events::empty_raw(fd));
            self.paused = true;
            return;
        }
        let mut buf = [0u8; 64];
        match self.read_input(&mut buf[..room.min(64)]) {
            Ok(0) | Err(_) => {
                let _ = ops.remove(Events::empty_raw(fd));
                if let Source::Listener(_, s) = &mut self.source {
                    *s = None;
                }
            }
            Ok(n) => {
                lock(&self.serial).enqueue(&buf[..n]);
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::with_data(&self.drained, DRAINED, EventSet::IN));
        match &self.source {
            Source::Stdin => {
                // Fails for stdin that cannot be polled (a regular file): then no input.
                let _ = ops.add(Events::with_data_raw(
                    libc::STDIN_FILENO,
                    INPUT,
                    EventSet::IN,
                ));
            }
            Source::Listener(l, _) => {
                let _ = ops.add(Events::with_data(l, LISTENER, EventSet::IN));
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            DRAINED => {
                let _ = self.drained.read();
                if self.paused {
                    self.paused = false;
                    if let Some(fd) = self.input_fd() {
                        let _ = ops.add(Events::with_data_raw(fd, INPUT, EventSet::IN));
                    }
                }
            }
            INPUT => self.on_input(ops),
            LISTENER => {
                let Source::Listener(l, current) = &mut self.source else {
                    return;
                };
                if let Ok((stream, _)) = l.accept() {
                    if let Some(old) = current.take() {
                        let _ = ops.remove(Events::empty(&old));
                    }
                    let _ = ops.add(Events::with_data(&stream, INPUT, EventSet::IN));
                    *current = Some(stream);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_writer_and_input_reaches_guest() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let (mut s, _drained) =
            Serial::new(irq.try_clone().unwrap(), Box::new(out.clone())).unwrap();
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        s.write(1, &[0x01]); // IER: data-available interrupt
        let _ = irq.read();
        assert_eq!(s.enqueue(b"x"), 1);
        assert_eq!(irq.read().unwrap(), 1, "receive interrupt raised");
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut d = [0u8];
        s.read(0, &mut d);
        assert_eq!(d, *b"x");
    }
}
