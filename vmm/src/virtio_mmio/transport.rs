//! The virtio-mmio register file of one device.

use std::sync::{Arc, Mutex};

use devices::virtio::{
    UsedQueues, VirtioDevice, TRANSPORT_FEATURES, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::MmioInterrupt;
use super::{regs, status};
use crate::bus::{lock, BusDevice};

pub const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
pub const MMIO_VERSION: u32 = 2;
pub const VENDOR_ID: u32 = 0x4b56_4d4d; // "MMVK"

/// The transport state the driver programs through MMIO.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<Queue>,
    queue_sel: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish()
    }
}

impl MmioTransport {
    /// `queue_evts` are written on a QueueNotify that reaches the VMM (when no ioeventfd
    /// caught it first); they are the same eventfds the event loop watches.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<MmioInterrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let queues = lock(&device)
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("queue sizes are powers of two"))
            .collect();
        Self {
            device,
            mem,
            interrupt,
            queue_evts,
            queues,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change before the driver is done setting up.
    fn queue_writable(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let new = value & !self.status;
        if new & status::FEATURES_OK != 0 {
            let offered = lock(&self.device).features() | TRANSPORT_FEATURES;
            // Only modern drivers, and only features we offered.
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                self.status = value & !status::FEATURES_OK;
                return;
            }
            lock(&self.device).ack_features(self.driver_features);
        }
        self.status = value;
        if new & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK != 0 && !self.activated
        {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        let mut dev = lock(&self.device);
        let name = dev.name();
        let invalid = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem));
        let result = match invalid {
            Some(i) => Err(format!("queue {i} does not fit in guest memory")),
            None => dev.activate().map_err(|e| e.to_string()),
        };
        drop(dev);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                log::error!("{name}: activation failed: {e}");
                self.status |= status::NEEDS_RESET;
                let _ = self.interrupt.signal_config_change();
            }
        }
    }

    /// The driver notified queue `index` (through its ioeventfd).
    pub fn process_queue(&mut self, index: usize) {
        if !self.activated || !self.queues.get(index).is_some_and(|q| q.ready()) {
            return;
        }
        let mut refs: Vec<&mut Queue> = self.queues.iter_mut().collect();
        let used = lock(&self.device).process_queue(index, &mut refs, &self.mem);
        self.signal(used);
    }

    /// The device's host-side descriptor is readable.
    pub fn process_backend(&mut self) {
        if !self.activated {
            return;
        }
        let mut refs: Vec<&mut Queue> = self.queues.iter_mut().collect();
        let used = lock(&self.device).process_backend(&mut refs, &self.mem);
        self.signal(used);
    }

    /// Interrupts the driver for each used queue that asks for it (event index aware).
    fn signal(&mut self, used: UsedQueues) {
        for (i, q) in self.queues.iter_mut().enumerate() {
            if used & (1 << i) != 0 && q.needs_notification(&self.mem).unwrap_or(true) {
                if let Err(e) = self.interrupt.signal_used_queue(i as u16) {
                    log::warn!("virtio-mmio: cannot interrupt the driver: {e}");
                }
            }
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            regs::MAGIC => MAGIC_VALUE,
            regs::VERSION => MMIO_VERSION,
            regs::DEVICE_ID => lock(&self.device).device_type(),
            regs::VENDOR_ID => VENDOR_ID,
            regs::DEVICE_FEATURES => {
                let f = lock(&self.device).features() | TRANSPORT_FEATURES;
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            regs::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size() as u32),
            regs::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready() as u32),
            regs::INTERRUPT_STATUS => self.interrupt.status(),
            regs::STATUS => self.status,
            regs::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let qw = self.queue_writable();
        match offset {
            regs::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            regs::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            regs::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                    }
                    _ => {}
                }
            }
            regs::QUEUE_SEL => self.queue_sel = v,
            regs::QUEUE_NUM if qw => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            regs::QUEUE_READY if qw => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            regs::QUEUE_DESC_LOW..=regs::QUEUE_DEVICE_HIGH if qw => {
                self.write_queue_addr(offset, v)
            }
            regs::QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            regs::INTERRUPT_ACK => self.interrupt.ack(v),
            regs::STATUS => self.set_status(v),
            _ => log::debug!("virtio-mmio: ignored write {v:#x} to register {offset:#x}"),
        }
    }

    fn write_queue_addr(&mut self, offset: u64, v: u32) {
        let Some(q) = self.selected_queue() else {
            return;
        };
        match offset {
            regs::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            regs::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            regs::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
            regs::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
            regs::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
            regs::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= regs::CONFIG {
            lock(&self.device).read_config(offset - regs::CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0); // registers are 32-bit wide; other sizes are a driver bug
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= regs::CONFIG {
            lock(&self.device).write_config(offset - regs::CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let (4, 0, Ok(b)) = (data.len(), offset % 4, <[u8; 4]>::try_from(data)) {
            self.write_reg(offset, u32::from_le_bytes(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::rng::Rng;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn transport() -> (MmioTransport, Arc<MmioInterrupt>, EventFd) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let int = Arc::new(MmioInterrupt::new(irq.try_clone().unwrap()));
        let qe = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Arc::new(Mutex::new(Rng::new())),
            mem,
            int.clone(),
            vec![qe.try_clone().unwrap()],
        );
        (t, int, qe)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the driver side of section 3.1.1 (device initialization) for queue 0.
    fn init(t: &mut MmioTransport, features_hi: u32) {
        w(t, regs::STATUS, status::ACKNOWLEDGE);
        w(t, regs::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        w(t, regs::DRIVER_FEATURES_SEL, 1);
        w(t, regs::DRIVER_FEATURES, features_hi);
        w(
            t,
            regs::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(r(&mut t, regs::MAGIC), MAGIC_VALUE);
        assert_eq!(r(&mut t, regs::VERSION), 2);
        assert_eq!(r(&mut t, regs::DEVICE_ID), 4);
        w(&mut t, regs::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, regs::DEVICE_FEATURES), 1, "VERSION_1");
        w(&mut t, regs::DEVICE_FEATURES_SEL, 0);
        assert_eq!(
            r(&mut t, regs::DEVICE_FEATURES),
            3 << 28,
            "indirect descriptors, event idx"
        );
        assert_eq!(r(&mut t, regs::QUEUE_NUM_MAX), 256);
        w(&mut t, regs::QUEUE_SEL, 7);
        assert_eq!(r(&mut t, regs::QUEUE_NUM_MAX), 0, "no such queue");
    }

    #[test]
    fn legacy_driver_is_refused() {
        let (mut t, _, _) = transport();
        init(&mut t, 0);
        assert_eq!(r(&mut t, regs::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn full_negotiation_activates_and_reset_clears() {
        let (mut t, int, qe) = transport();
        init(&mut t, 1);
        assert_ne!(r(&mut t, regs::STATUS) & status::FEATURES_OK, 0);
        w(&mut t, regs::QUEUE_NUM, 16);
        w(&mut t, regs::QUEUE_DESC_LOW, 0x1000);
        w(&mut t, regs::QUEUE_DRIVER_LOW, 0x2000);
        w(&mut t, regs::QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, regs::QUEUE_READY, 1);
        assert_eq!(r(&mut t, regs::QUEUE_READY), 1);
        w(&mut t, regs::STATUS, 0xf);
        assert!(t.activated);
        assert_eq!(r(&mut t, regs::STATUS), 0xf);
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, regs::QUEUE_NUM, 8);
        assert_eq!(t.queues[0].size(), 16);
        w(&mut t, regs::QUEUE_NOTIFY, 0);
        assert_eq!(qe.read().unwrap(), 1);
        // An empty ring: processing uses nothing and raises no interrupt.
        t.process_queue(0);
        assert_eq!(r(&mut t, regs::INTERRUPT_STATUS), 0);
        int.signal_used_queue(0).unwrap();
        assert_eq!(r(&mut t, regs::INTERRUPT_STATUS), 1);
        w(&mut t, regs::INTERRUPT_ACK, 1);
        assert_eq!(r(&mut t, regs::INTERRUPT_STATUS), 0);
        w(&mut t, regs::STATUS, 0);
        assert!(!t.activated);
        assert_eq!(r(&mut t, regs::STATUS), 0);
        assert!(!t.queues[0].ready());
    }

    #[test]
    fn invalid_queue_sets_needs_reset() {
        let (mut t, int, _) = transport();
        init(&mut t, 1);
        // Ring addresses beyond guest memory: activation fails.
        w(&mut t, regs::QUEUE_DESC_LOW, 0x7000_0000);
        w(&mut t, regs::QUEUE_READY, 1);
        w(&mut t, regs::STATUS, 0xf);
        assert!(!t.activated);
        assert_ne!(r(&mut t, regs::STATUS) & status::NEEDS_RESET, 0);
        assert_eq!(int.status() & super::super::INT_CONFIG_CHANGE, 2);
    }

    #[test]
    fn odd_sized_accesses_are_ignored() {
        let (mut t, _, _) = transport();
        let mut b = [0xffu8; 2];
        t.read(regs::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(regs::STATUS, &[1]);
        assert_eq!(r(&mut t, regs::STATUS), 0);
    }
}
