//! What every agent test shares: a scratch directory, the standard disks, booting the VM,
//! the ttrpc status code of an error.

use protocol::ttrpc::Code;
use tests::agent::*;
use tests::images;
pub use tests::tempdir::TempDir;

/// The image disk (id `img`) and `n` scratch disks (ids `s0`..) every test VM gets.
pub fn standard_disks(dir: &TempDir, n: usize) -> Vec<Disk> {
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

pub fn boot(dir: &TempDir, disks: Vec<Disk>, extra: Vec<String>) -> GuestVm {
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
