//! Event-loop glue: queue notifications (ioeventfds) run the device's queue processing on
//! the VMM thread, never on a vCPU thread.

use std::sync::{Arc, Mutex};

use devices::virtio::VirtioDevice;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::lock;

/// Watches one device's queue eventfds.
pub struct QueueEvents {
    device: Arc<Mutex<dyn VirtioDevice>>,
    queue_evts: Vec<EventFd>,
}

impl std::fmt::Debug for QueueEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueEvents")
            .field("queues", &self.queue_evts.len())
            .finish()
    }
}

impl QueueEvents {
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>, queue_evts: Vec<EventFd>) -> Self {
        Self { device, queue_evts }
    }
}

impl MutEventSubscriber for QueueEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("cannot watch queue {i}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let index = events.data() as usize;
        if let Some(evt) = self.queue_evts.get(index) {
            let _ = evt.read();
            lock(&self.device).process_queue(index);
        }
    }
}
