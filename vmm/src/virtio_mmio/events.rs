//! Event-loop glue: queue notifications (ioeventfds) and the device's host-side descriptor
//! run the device on the VMM thread, never on a vCPU thread.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::MmioTransport;
use crate::bus::lock;

/// Token of the device's host-side descriptor; queue tokens are their indices.
const BACKEND: u32 = u32::MAX;

/// Watches one device's queue eventfds and back-end descriptor.
pub struct QueueEvents {
    transport: Arc<Mutex<MmioTransport>>,
    queue_evts: Vec<EventFd>,
    backend: Option<RawFd>,
}

impl std::fmt::Debug for QueueEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueEvents")
            .field("queues", &self.queue_evts.len())
            .finish()
    }
}

impl QueueEvents {
    pub fn new(
        transport: Arc<Mutex<MmioTransport>>,
        queue_evts: Vec<EventFd>,
        backend: Option<RawFd>,
    ) -> Self {
        Self {
            transport,
            queue_evts,
            backend,
        }
    }
}

impl MutEventSubscriber for QueueEvents {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                log::error!("cannot watch queue {i}: {e}");
            }
        }
        if let Some(fd) = self.backend {
            if let Err(e) = ops.add(Events::with_data_raw(fd, BACKEND, EventSet::IN)) {
                log::error!("cannot watch a device back end: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            BACKEND => lock(&self.transport).process_backend(),
            i => {
                if let Some(evt) = self.queue_evts.get(i as usize) {
                    let _ = evt.read();
                    lock(&self.transport).process_queue(i as usize);
                }
            }
        }
    }
}
