//! Assembles the calibration guest (guests/*.S) with binutils into an ELF embedded in the VMM.

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
    println!("cargo:rerun-if-changed={}", script.display());
    for name in ["calibrate"] {
        let src = format!("guests/{name}.S");
        let obj = format!("{out}/{name}.o");
        let elf = format!("{out}/{name}.elf");
        println!("cargo:rerun-if-changed={src}");
        run(Command::new("as").args(["--64", "-o", &obj, &src]));
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
