//! What every agent test shares: a scratch directory, the standard disks, booting the VM,
//! the ttrpc status code of an error.

use std::fs;
use std::path::PathBuf;

use protocol::ttrpc::Code;
use tests::agent::*;
use tests::images;

/// A temporary directory for one test's disks and sockets, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("kvagent-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn join(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The image disk (id `img`) and `n` scratch disks (ids `s0`..) every test VM gets.
pub fn standard_disks(dir: &Scratch, n: usize) -> Vec<Disk> {
    let image = dir.join("busybox.erofs");
    images::busybox_erofs(&image);
    let mut disks = vec![Disk {
        path: image,
        id: "img".into(),
        read_only: true,
    }];
    for i in 0..n {
        let p = dir.join(&format!("scratch{i}.ext4"));
        images::ext4(&p, 64);
        disks.push(Disk {
            path: p,
            id: format!("s{i}"),
            read_only: false,
        });
    }
    disks
}

pub fn boot(dir: &Scratch, disks: Vec<Disk>, extra: Vec<String>) -> GuestVm {
    let vm = GuestVm::boot(
        &dir.0,
        &GuestOptions {
            disks,
            extra,
            memory_mib: 256,
            collect_log: true,
        },
    );
    println!(
        "  VM start to agent ready: {:.2} s",
        vm.ready_after.as_secs_f64()
    );
    vm
}

pub fn code_of(e: &protocol::ttrpc::Error) -> Code {
    match e {
        protocol::ttrpc::Error::RpcStatus(s) => s.code(),
        _ => Code::UNKNOWN,
    }
}
