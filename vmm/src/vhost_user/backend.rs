//! The adapter from our device trait to `vhost-user-backend`.

use std::ops::DerefMut;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::virtio::{UsedQueues, VirtioDevice, TRANSPORT_FEATURES};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringState, VringT};
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

    pub(super) fn queue_count(&self) -> usize {
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
