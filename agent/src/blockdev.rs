//! Finds virtio-blk devices by the serial (virtio device id) the shim gave them.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::{AgentError, Result};

/// virtio-mmio disks are probed before init runs; a short grace covers a slow probe.
const APPEAR_TIMEOUT: Duration = Duration::from_secs(2);

fn scan(serial: &str) -> Option<PathBuf> {
    for entry in fs::read_dir("/sys/block").ok()?.flatten() {
        let name = entry.file_name();
        let Ok(found) = fs::read_to_string(entry.path().join("serial")) else {
            continue;
        };
        if found.trim_end_matches(['\n', '\0']) == serial {
            return Some(PathBuf::from("/dev").join(name));
        }
    }
    None
}

/// The /dev node of the virtio-blk disk whose serial is `serial`, waiting for it to appear.
pub fn find_by_serial(serial: &str) -> Result<PathBuf> {
    if serial.is_empty() || serial.len() > 20 || serial.contains(['/', '\0']) {
        return Err(AgentError::invalid(
            "device id",
            format!("{serial:?} is not a virtio-blk serial (1-20 bytes, no '/')"),
        ));
    }
    let start = Instant::now();
    loop {
        if let Some(dev) = scan(serial) {
            if dev.exists() {
                return Ok(dev);
            }
        }
        if start.elapsed() > APPEAR_TIMEOUT {
            return Err(AgentError::NoDevice(serial.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
