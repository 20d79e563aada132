//! A guest decoded from fuzzer bytes: it writes raw descriptors, avail entries and memory as
//! it likes (loops, out-of-range heads and addresses, wrong directions, rings overwritten)
//! and notifies queues, while the target's host side acts in between.
//!
//! Layout: one config byte (bit 7: the transport turns EVENT_IDX on in every queue, as it
//! does once the driver accepts it; the target reads the other bits: features, device
//! variant), then steps until the input ends. Each step is an opcode byte (taken modulo 6) and its arguments, all
//! little-endian:
//!
//! | op | step    | arguments                                                  |
//! |----|---------|------------------------------------------------------------|
//! | 0  | Desc    | queue u8, slot u8, addr u64, len u32, flags u16, next u16  |
//! | 1  | Avail   | queue u8, head u16                                         |
//! | 2  | Write   | guest address u32 (modulo guest memory), len u8, bytes     |
//! | 3  | Kick    | queue u8                                                   |
//! | 4  | Backend | (none)                                                     |
//! | 5  | Host    | argument u8                                                |
//!
//! Queue numbers are taken modulo the device's queue count. A step cut short ends the script.

use std::os::fd::RawFd;

use devices::virtio::testing::{desc, refs, Driver};
use devices::virtio::VirtioDevice;
use virtio_queue::QueueT;

/// Guest memory of the test driver: 1 MiB.
pub const MEM_SIZE: u64 = 0x10_0000;
/// Most steps played from one input, so one input stays fast.
const MAX_STEPS: usize = 256;

/// One thing the guest (or the host side) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    Desc {
        queue: u8,
        slot: u8,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    },
    Avail {
        queue: u8,
        head: u16,
    },
    Write {
        addr: u64,
        bytes: &'a [u8],
    },
    Kick {
        queue: u8,
    },
    Backend,
    Host(u8),
}

/// A decoded input.
#[derive(Debug)]
pub struct Script<'a> {
    pub config: u8,
    pub steps: Vec<Step<'a>>,
}

/// Reads fixed-size fields off the front of the input.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    fn step(&mut self) -> Option<Step<'a>> {
        Some(match self.u8()? % 6 {
            0 => Step::Desc {
                queue: self.u8()?,
                slot: self.u8()?,
                addr: self.u64()?,
                len: self.u32()?,
                flags: self.u16()?,
                next: self.u16()?,
            },
            1 => Step::Avail {
                queue: self.u8()?,
                head: self.u16()?,
            },
            2 => {
                let addr = u64::from(self.u32()?) % MEM_SIZE;
                let len = usize::from(self.u8()?);
                Step::Write {
                    addr,
                    bytes: self.take(len)?,
                }
            }
            3 => Step::Kick { queue: self.u8()? },
            4 => Step::Backend,
            _ => Step::Host(self.u8()?),
        })
    }
}

impl<'a> Script<'a> {
    /// `None` for an empty input.
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let mut r = Reader(data);
        let config = r.u8()?;
        let mut steps = Vec::new();
        while steps.len() < MAX_STEPS {
            match r.step() {
                Some(s) => steps.push(s),
                None => break,
            }
        }
        Some(Script { config, steps })
    }

    /// Plays the script against `dev`, which the caller created and activated. While chains
    /// are popped and not used, `Backend` first waits up to `backend_wait_ms` for the device's
    /// back-end descriptor (the block device's I/O threads answer asynchronously). `host`
    /// performs the `Host` steps.
    pub fn run(
        &self,
        dev: &mut dyn VirtioDevice,
        backend_wait_ms: i32,
        mut host: impl FnMut(&mut dyn VirtioDevice, u8),
    ) {
        let n = dev.queue_max_sizes().len();
        let mut d = Driver::new(n);
        let mut queues = d.queues();
        for q in &mut queues {
            q.set_event_idx(self.config & 0x80 != 0);
        }
        let q = |queue: u8| usize::from(queue) % n;
        let mut idle = false;
        for step in &self.steps {
            match *step {
                Step::Desc {
                    queue,
                    slot,
                    addr,
                    len,
                    flags,
                    next,
                } => d.set_desc(q(queue), slot.into(), desc(addr, len, flags, next)),
                Step::Avail { queue, head } => d.push_avail(q(queue), head),
                Step::Write { addr, bytes } => {
                    // Clipped at the end of guest memory.
                    let len = bytes.len().min((MEM_SIZE - addr) as usize);
                    d.write(addr, &bytes[..len]);
                }
                Step::Kick { queue } => {
                    idle = false;
                    dev.process_queue(q(queue), &mut refs(&mut queues), &d.mem);
                }
                Step::Backend => {
                    // Chains popped and not yet used may be with the device's I/O threads;
                    // after one wait in vain, only a kick makes waiting worth it again (a
                    // chain with a head outside the table is popped and never used).
                    let pending = queues.iter().any(|q| q.next_avail() != q.next_used());
                    if let Some(fd) = dev.backend_fd().filter(|_| pending && !idle) {
                        idle = !wait_readable(fd, backend_wait_ms);
                    }
                    dev.process_backend(&mut refs(&mut queues), &d.mem);
                }
                Step::Host(arg) => host(dev, arg),
            }
        }
    }
}

/// Whether `fd` became readable within `timeout_ms`.
fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd that lives for the call.
    unsafe { libc::poll(&mut p, 1, timeout_ms) > 0 }
}
