//! virtio-blk: arbitrary descriptor tables, avail rings and guest memory against the block
//! device on an in-memory disk, its I/O threads included. Config byte: bit 0 read-only, bit 1
//! EVENT_IDX, bit 2 a media slot whose medium `Host` steps change (eject, insert smaller or
//! full size).

#![no_main]

use devices::block::{Block, BlockConfig, MediaSlot};
use devices::virtio::{VirtioDevice, VIRTIO_RING_F_EVENT_IDX};
use kubevirt_fuzz::host::memfd;
use kubevirt_fuzz::script::Script;
use libfuzzer_sys::fuzz_target;

/// 64 sectors: small enough that every request is cheap.
const DISK_LEN: u64 = 64 * 512;
/// How long a `Backend` step waits for the I/O threads.
const BACKEND_WAIT_MS: i32 = 5;

fuzz_target!(|data: &[u8]| {
    let Some(script) = Script::parse(data) else {
        return;
    };
    let read_only = script.config & 1 != 0;
    let (_disk, path) = memfd(DISK_LEN).expect("memfd");
    let slot = (script.config & 4 != 0).then(MediaSlot::new);
    let mut blk = Block::new(BlockConfig {
        path,
        read_only,
        id: Some("fuzz0".into()),
        slot: slot.clone(),
        rate: Default::default(),
    })
    .expect("block device on a memfd");
    let mut features = blk.features();
    if script.config & 2 == 0 {
        features &= !VIRTIO_RING_F_EVENT_IDX;
    }
    blk.ack_features(features);
    blk.activate().expect("activate");
    script.run(&mut blk, BACKEND_WAIT_MS, |_, arg| {
        let Some(slot) = &slot else { return };
        match arg % 3 {
            0 => slot.eject(),
            n => {
                let len = if n == 1 {
                    u64::from(arg / 3) * 512
                } else {
                    DISK_LEN
                };
                // The slot opens its own descriptor; `_fd` only has to outlive `insert`.
                let (_fd, path) = memfd(len).expect("memfd");
                slot.insert(&path, read_only).expect("insert a medium");
            }
        }
    });
    // Waits for what the I/O threads still hold, as a driver reset does.
    blk.reset();
});
