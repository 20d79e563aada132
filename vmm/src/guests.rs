//! Tiny guests assembled from `guests/*.S` at build time (see build.rs).

use std::path::PathBuf;

/// The calibration guest `doctor` runs, embedded in the binary.
pub const CALIBRATE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/calibrate.elf"));

/// Path of the test guest built from `guests/<name>.S`, for tests and benchmarks run from
/// this build tree.
pub fn test_guest(name: &str) -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join(format!("{name}.elf"))
}
