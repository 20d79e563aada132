//! Shared helpers for the cross-crate and end-to-end tests: the tiny test guests, a console
//! capture, and running a VM with a deadline.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::{SerialOutput, VmConfig, VmExit};

pub mod agent;
pub mod blkbench;
pub mod bootbench;
pub mod cgroups;
pub mod chart;
pub mod containerd;
pub mod cri;
pub mod crienv;
pub mod density;
pub mod images;
pub mod leaks;
pub mod measure;
pub mod netbench;
pub mod netns;
pub mod podbench;
pub mod stream;
pub mod tempdir;
pub mod threads;
pub mod vsockbench;

/// Path of tiny test guest `name` (assembled from `vmm/guests/<name>.S`).
pub fn guest(name: &str) -> PathBuf {
    vmm::guests::test_guest(name)
}

/// The workspace root, for artefacts such as `target/guest/vmlinux`.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A console sink the test can read while the guest writes.
#[derive(Clone, Default, Debug)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the console contains `needle`; false after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    pub fn output(&self) -> SerialOutput {
        SerialOutput::Writer(Box::new(self.clone()))
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A config for tiny guest `name` with its console captured.
pub fn tiny_config(name: &str) -> (VmConfig, Console) {
    let console = Console::default();
    let mut cfg = VmConfig::new(guest(name));
    cfg.memory_mib = 32;
    cfg.serial_output = console.output();
    (cfg, console)
}

/// Runs a VM; stops it if it has not ended after `timeout`. Returns how it ended.
pub fn run_with_timeout(cfg: VmConfig, timeout: Duration) -> VmExit {
    let mut handle = vmm::build_microvm(cfg)
        .expect("build VM")
        .start()
        .expect("start VM");
    match handle.wait_timeout(timeout) {
        Some(exit) => exit,
        None => {
            handle.stop();
            let after = handle.wait();
            VmExit::Error(format!(
                "guest still running after {timeout:?}; stopped: {after}"
            ))
        }
    }
}

/// The release `kubevirt-vmm` binary (`make build`). The tests crate cannot name another
/// package's binary through `CARGO_BIN_EXE_*`, so this is where cargo puts it
/// (`.cargo/config.toml` names the target); panics with what to run when it is missing.
pub fn vmm_binary() -> PathBuf {
    let path = workspace_root().join("target/x86_64-unknown-linux-gnu/release/kubevirt-vmm");
    assert!(
        path.exists(),
        "{} is missing: run `make build`",
        path.display()
    );
    path
}
