//! virtio-rng: fills the driver's buffers from the host's `getrandom`.

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use crate::virtio::{device_type, serve_each, UsedQueues, VirtioDevice, VIRTIO_F_VERSION_1};

/// Largest request served at once; a bigger buffer simply gets this many bytes.
pub const MAX_REQUEST: u32 = 64 * 1024;
const QUEUE_SIZES: [u16; 1] = [256];

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    acked: u64,
    served_bytes: u64,
}

fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
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
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes handed to the guest so far.
    pub fn served_bytes(&self) -> u64 {
        self.served_bytes
    }
}

/// Fills the writable buffers of `chain` with random bytes, [`MAX_REQUEST`] at most; returns
/// how many were written. The iterator stops at a malformed descriptor (loop, out of
/// bounds): what was written before it is reported, the rest of the chain is ignored.
fn fill_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    buf: &mut [u8],
) -> u32 {
    let mut written: u32 = 0;
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
    written
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

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [&mut Queue],
        mem: &GuestMemoryMmap,
    ) -> UsedQueues {
        match queues.get_mut(index) {
            Some(q) if index == 0 => {
                let mut buf = vec![0u8; 4096];
                let served = &mut self.served_bytes;
                serve_each("rng", q, mem, |chain| {
                    let written = fill_chain(mem, chain, &mut buf);
                    *served += u64::from(written);
                    written
                }) as UsedQueues
            }
            _ => 0,
        }
    }

    fn reset(&mut self) {
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{desc, refs, Driver, N, W};
    use virtio_queue::QueueT;

    /// Runs the given chains through the device; returns used lengths and the used mask.
    fn run(chains: &[&[(u64, u32, u16)]]) -> (Vec<u32>, UsedQueues, Driver) {
        let mut d = Driver::new(1);
        for c in chains {
            d.add_chain(0, c);
        }
        let mut qs = d.queues();
        let used = Rng::new().process_queue(0, &mut refs(&mut qs), &d.mem);
        let lens = d.used(0).iter().map(|&(_, l)| l).collect();
        (lens, used, d)
    }

    #[test]
    fn fills_writable_buffers() {
        let (lens, used, d) = run(&[&[(0x20000, 100, W), (0x21000, 28, W)]]);
        assert_eq!(lens, vec![128]);
        assert_eq!(used, 1);
        assert!(
            d.read(0x20000, 100).iter().any(|&x| x != 0),
            "random bytes arrived"
        );
    }

    #[test]
    fn readable_only_chain_gets_zero_length() {
        let (lens, used, _) = run(&[&[(0x20000, 64, 0)]]);
        assert_eq!((lens, used), (vec![0], 1));
    }

    #[test]
    fn out_of_bounds_buffer_is_not_written() {
        let (lens, _, _) = run(&[&[(0xff000, 0x2000, W)]]);
        assert_eq!(lens, vec![0x1000], "only the in-bounds page");
        let (lens, _, _) = run(&[&[(0x20_0000, 16, W)]]);
        assert_eq!(lens, vec![0]);
    }

    #[test]
    fn descriptor_loop_terminates() {
        let mut d = Driver::new(1);
        d.add_raw(0, &[desc(0x20000, 8, W | N, 1), desc(0x21000, 8, W | N, 0)]);
        let mut qs = d.queues();
        Rng::new().process_queue(0, &mut refs(&mut qs), &d.mem);
        let used = d.used(0);
        assert_eq!(used.len(), 1);
        assert!(used[0].1 <= MAX_REQUEST);
    }

    #[test]
    fn huge_request_is_capped() {
        let (lens, _, _) = run(&[&[(0x20000, 0xf0000, W)]]);
        assert_eq!(lens, vec![MAX_REQUEST]);
    }

    #[test]
    fn event_idx_publishes_avail_event() {
        // With EVENT_IDX the driver notifies only when its avail index passes avail_event:
        // the device must move it on, or the driver never notifies again.
        let mut d = Driver::new(1);
        d.add_chain(0, &[(0x20000, 64, W)]);
        let mut qs = d.queues();
        qs[0].set_event_idx(true);
        assert_eq!(Rng::new().process_queue(0, &mut refs(&mut qs), &d.mem), 1);
        // avail_event sits after the used ring's elements: used + 4 + 8 * size.
        let avail_event = 0x1000 + 0x800 + 4 + 8 * u64::from(crate::virtio::testing::QUEUE_SIZE);
        let v = d.read(avail_event, 2);
        assert_eq!(
            u16::from_le_bytes([v[0], v[1]]),
            1,
            "notify on the next buffer"
        );
    }

    #[test]
    fn unknown_queue_is_ignored() {
        let d = Driver::new(1);
        let mut qs = d.queues();
        assert_eq!(Rng::new().process_queue(3, &mut refs(&mut qs), &d.mem), 0);
    }
}
