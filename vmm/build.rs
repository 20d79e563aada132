//! Assembles the tiny guests in guests/*.S with binutils into ELF images that boot through
//! the VMM's normal Linux path (64-bit entry, zero page in rsi): the calibration guest that
//! `doctor` embeds, and the test guests of the KVM tests and benchmarks.

use std::path::Path;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = std::env::var("OUT_DIR").unwrap();
    let script = Path::new("guests/guest.ld");
    println!("cargo:rerun-if-changed=guests");
    let mut names: Vec<String> = std::fs::read_dir("guests")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".S").map(str::to_string))
        .collect();
    names.sort();
    for name in names {
        let src = format!("guests/{name}.S");
        let obj = format!("{out}/{name}.o");
        let elf = format!("{out}/{name}.elf");
        run(Command::new("as").args(["--64", "-I", "guests", "-o", &obj, &src]));
        run(Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "--build-id=none",
                "-z",
                "noexecstack",
                "-T",
            ])
            .arg(script)
            .args(["-o", &elf, &obj]));
    }
}
