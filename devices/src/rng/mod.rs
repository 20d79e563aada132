//! virtio-rng: fills the driver's buffers from the host's `getrandom`.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use crate::virtio::{device_type, ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Largest request served at once; a bigger buffer simply gets this many bytes.
pub const MAX_REQUEST: u32 = 64 * 1024;
const QUEUE_SIZES: [u16; 1] = [256];

/// Errors of the rng device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("getrandom failed: {0}")]
    GetRandom(std::io::Error),
}

enum State {
    Inactive,
    Active {
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        queue: Queue,
    },
}

/// The entropy device.
pub struct Rng {
    acked: u64,
    state: State,
    served_bytes: u64,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("active", &matches!(self.state, State::Active { .. }))
            .field("served_bytes", &self.served_bytes)
            .finish()
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

fn fill_random(buf: &mut [u8]) -> Result<(), RngError> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable slice.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RngError::GetRandom(e));
        }
        filled += n as usize;
    }
    Ok(())
}

impl Rng {
    pub fn new() -> Self {
        Self {
            acked: 0,
            state: State::Inactive,
            served_bytes: 0,
        }
    }

    /// Bytes handed to the guest so far.
    pub fn served_bytes(&self) -> u64 {
        self.served_bytes
    }
}

/// Serves every available request; returns whether any buffer was used.
fn serve(mem: &GuestMemoryMmap, queue: &mut Queue, served: &mut u64) -> bool {
    let mut used = false;
    let mut buf = vec![0u8; 4096];
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut written: u32 = 0;
        // The iterator stops at a malformed descriptor (loop, out of bounds): what was
        // written before it is reported, the rest of the chain is ignored.
        for desc in chain.writable() {
            let want = desc.len().min(MAX_REQUEST - written) as usize;
            let mut done = 0;
            while done < want {
                let n = (want - done).min(buf.len());
                if fill_random(&mut buf[..n]).is_err() {
                    break;
                }
                match desc.addr().checked_add(done as u64) {
                    Some(a) if mem.write_slice(&buf[..n], a).is_ok() => done += n,
                    _ => break,
                }
            }
            written += done as u32;
            if done < want || written >= MAX_REQUEST {
                break;
            }
        }
        if let Err(e) = queue.add_used(mem, head, written) {
            log::warn!("rng: cannot return descriptor {head}: {e}");
            break;
        }
        *served += u64::from(written);
        used = true;
    }
    used
}

impl VirtioDevice for Rng {
    fn name(&self) -> &'static str {
        "virtio-rng"
    }
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0); // virtio-rng has no configuration space
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn Interrupt>,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                device: self.name(),
                got: queues.len(),
                want: QUEUE_SIZES.len(),
            });
        }
        let queue = queues.remove(0);
        if !queue.is_valid(&mem) {
            return Err(ActivateError::InvalidQueue {
                device: self.name(),
                index: 0,
            });
        }
        self.state = State::Active {
            mem,
            interrupt,
            queue,
        };
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        let State::Active {
            mem,
            interrupt,
            queue,
        } = &mut self.state
        else {
            return;
        };
        if index != 0 || !serve(mem, queue, &mut self.served_bytes) {
            return;
        }
        if queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = interrupt.signal_used_queue(0) {
                log::warn!("rng: cannot signal the driver: {e}");
            }
        }
    }

    fn reset(&mut self) {
        self.state = State::Inactive;
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Counter(AtomicU32);
    impl Interrupt for Counter {
        fn signal_used_queue(&self, _q: u16) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn signal_config_change(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Runs `descs` (one or more chains) through an active device and returns the used
    /// lengths, the interrupt count and the memory.
    fn run(descs: &[RawDescriptor]) -> (Vec<u32>, u32, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mq = MockSplitQueue::new(&mem, 16);
        mq.add_desc_chains(descs, 0).unwrap();
        let q: Queue = mq.create_queue().unwrap();
        let irq = Arc::new(Counter::default());
        let mut rng = Rng::new();
        rng.activate(mem.clone(), irq.clone(), vec![q]).unwrap();
        rng.process_queue(0);
        let used_idx: u16 = mem.read_obj(mq.used_addr().unchecked_add(2)).unwrap();
        let lens = (0..used_idx as u64)
            .map(|i| {
                mem.read_obj(mq.used_addr().unchecked_add(4 + i * 8 + 4))
                    .unwrap()
            })
            .collect();
        (lens, irq.0.load(Ordering::SeqCst), mem)
    }

    #[test]
    fn fills_writable_buffers() {
        let (lens, irqs, mem) = run(&[
            desc(0x8000, 100, W | VRING_DESC_F_NEXT as u16, 1),
            desc(0x9000, 28, W, 0),
        ]);
        assert_eq!(lens, vec![128]);
        assert_eq!(irqs, 1);
        let mut b = [0u8; 100];
        mem.read_slice(&mut b, GuestAddress(0x8000)).unwrap();
        assert!(b.iter().any(|&x| x != 0), "random bytes arrived");
    }

    #[test]
    fn readable_only_chain_gets_zero_length() {
        let (lens, irqs, _) = run(&[desc(0x8000, 64, 0, 0)]);
        assert_eq!(lens, vec![0]);
        assert_eq!(irqs, 1);
    }

    #[test]
    fn out_of_bounds_buffer_is_not_written() {
        let (lens, _, _) = run(&[desc(0xff000, 0x2000, W, 0)]);
        assert_eq!(lens, vec![0x1000], "only the in-bounds page");
        let (lens, _, _) = run(&[desc(0x20_0000, 16, W, 0)]);
        assert_eq!(lens, vec![0]);
    }

    #[test]
    fn descriptor_loop_terminates() {
        let (lens, _, _) = run(&[
            desc(0x8000, 8, W | VRING_DESC_F_NEXT as u16, 1),
            desc(0x9000, 8, W | VRING_DESC_F_NEXT as u16, 0),
        ]);
        assert_eq!(lens.len(), 1);
        assert!(lens[0] <= MAX_REQUEST);
    }

    #[test]
    fn huge_request_is_capped() {
        let (lens, _, _) = run(&[desc(0x1000, 0xf0000, W, 0)]);
        assert_eq!(lens, vec![MAX_REQUEST]);
    }

    #[test]
    fn inactive_device_ignores_notifications() {
        let mut rng = Rng::new();
        rng.process_queue(0);
        assert_eq!(rng.served_bytes(), 0);
    }

    #[test]
    fn wrong_queue_count_is_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let err = Rng::new()
            .activate(mem, Arc::new(Counter::default()), vec![])
            .unwrap_err();
        assert!(err.to_string().contains("needs 1"), "{err}");
    }
}
