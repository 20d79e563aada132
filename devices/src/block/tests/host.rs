//! A host block device (a loop device) and a media slot as the disk.

use super::*;

/// A loop device over a file; detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(file: &Path) -> Option<LoopDevice> {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("losetup: {}", String::from_utf8_lossy(&out.stderr));
            return None;
        }
        Some(LoopDevice(
            String::from_utf8(out.stdout).ok()?.trim().to_owned(),
        ))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

#[test]
fn host_block_device() {
    let dir = TempDir::new();
    let path = dir.disk("backing.img", 4 << 20);
    let Some(dev) = LoopDevice::attach(&path) else {
        eprintln!("skipped: no loop device (needs root and losetup)");
        return;
    };
    let mut h = Harness::open(Path::new(&dev.0), false);
    assert_eq!(h.blk.capacity(), 8192, "size from BLKGETSIZE64");
    let (s, _, back) = h.read(100, 1024);
    assert_eq!((s, back), (OK, sector_pattern(100, 1024)));
    assert_eq!(h.write(5, &[0x5a; 512]), (OK, 1));
    assert_eq!(h.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(h.read(5, 512).2, vec![0x5a; 512]);
    // BLKDISCARD; a loop device over a file discards by punching the file.
    assert_eq!(h.range(VIRTIO_BLK_T_DISCARD, 2048, 2048, 0), OK);
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    assert_eq!(h.range(VIRTIO_BLK_T_WRITE_ZEROES, 16, 8, unmap), OK);
    assert_eq!(h.range(VIRTIO_BLK_T_WRITE_ZEROES, 24, 8, 0), OK);
    assert_eq!(h.read(16, 16 * 512).2, vec![0; 16 * 512]);
    assert_eq!(h.read(32, 512).2, sector_pattern(32, 512));
    drop(h);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(
        &file[5 * 512..6 * 512],
        &[0x5a; 512][..],
        "reached the backing file"
    );
}

#[test]
fn a_media_slot_changes_its_medium_while_serving() {
    let dir = TempDir::new();
    // The first medium fixes the capacity: 64 sectors.
    let first = dir.disk("first.img", 64 * 512);
    let second = dir.join_bytes("second.img", &[0x5a; 4 * 512]);
    let slot = MediaSlot::new();
    let mut cfg = config(&first, false, Some("slot0"));
    cfg.slot = Some(slot.clone());
    let mut h = Harness::new(Block::new(cfg).unwrap());
    assert_eq!(h.blk.capacity(), 64);
    assert_eq!(h.read(10, 512).2, sector_pattern(10, 512));

    // A smaller medium: its data, then zeros past its end, within the slot's capacity.
    // The page cache has only part of such a read: it goes to an I/O thread.
    slot.insert(&second, true).unwrap();
    h.add_read(2, 4 * 512, 0);
    assert!(!h.serve_once());
    h.finish();
    assert_eq!(h.read_status(0), OK);
    let data = h.read_data(0, 4 * 512);
    assert_eq!(&data[..1024], &[0x5a; 1024][..]);
    assert_eq!(&data[1024..], &[0u8; 1024][..]);
    // Inserted read-only: a write fails, and the file is untouched.
    assert_eq!(h.write(0, &[1; 512]).0, IOERR);
    assert_eq!(std::fs::read(&second).unwrap(), vec![0x5a; 4 * 512]);
    // Beyond the slot's capacity is still refused by parsing.
    assert_eq!(h.read(64, 512).0, IOERR);

    // Empty: zeros, no writes.
    slot.eject();
    assert_eq!(h.read(0, 512).2, vec![0u8; 512]);
    assert_eq!(h.write(0, &[1; 512]).0, IOERR);
    // A bad medium is refused by name and leaves the slot as it was.
    let e = slot
        .insert(&dir.0.join("missing.img"), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.img"), "{e}");
}
