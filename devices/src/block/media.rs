//! Media slots: a virtio-blk disk whose backing file the embedding program swaps while the
//! guest runs, like a drive whose medium is changed. virtio-mmio has no hotplug, so a pod VM
//! boots with a few slots and later containers get their image layers by inserting a medium.
//!
//! The slot's capacity is fixed at boot (the size of its first medium); a smaller medium reads
//! as zeros past its end. The guest must drop its cached blocks of the disk (BLKFLSBUF) before
//! it reads a new medium; requests in flight finish on the medium they started on.

use std::path::Path;
use std::sync::{Arc, RwLock};

use super::io::Disk;
use super::BlockError;

/// A shared handle on the medium of one slot.
#[derive(Clone, Debug, Default)]
pub struct MediaSlot(Arc<RwLock<Option<Arc<Disk>>>>);

impl PartialEq for MediaSlot {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for MediaSlot {}

impl MediaSlot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts the file or block device at `path` in the slot; the previous medium is released
    /// once its last request finished.
    pub fn insert(&self, path: &Path, read_only: bool) -> Result<(), BlockError> {
        let mut disk = Disk::open(path, read_only)?;
        disk.zero_past_end = true;
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(disk));
        Ok(())
    }

    /// Empties the slot: reads return zeros, writes fail.
    pub fn eject(&self) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub(crate) fn set(&self, disk: Arc<Disk>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(disk);
    }

    pub(crate) fn current(&self) -> Option<Arc<Disk>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
