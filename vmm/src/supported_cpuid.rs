//! KVM's supported CPUID, kept in a file per host boot and KVM.
//!
//! KVM_GET_SUPPORTED_CPUID runs the host's CPUID instruction for each leaf, and on a nested
//! host every one of those traps to the outer hypervisor: ~0.3 ms a VM here, a tenth of a
//! whole `kubevirt-vmm run`. The answer only changes when the host boots again or KVM is
//! loaded again, so it is kept in a file keyed by both: the boot id, and /dev/kvm's inode
//! and change time (a module loaded again makes a new device node).

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Where `kubevirt-vmm run` keeps it; the shim keeps it beside its state directory, which
/// by default makes the same file.
pub const DEFAULT_CACHE: &str = "/run/kubevirt-shim.cpuid";

/// KVM's supported CPUID: read from `cache` where the file holds this boot's and this
/// KVM's, otherwise asked of KVM and written there for the next VM (where that fails,
/// the next VM asks KVM again).
pub fn supported_cpuid(kvm: &Kvm, cache: Option<&Path>) -> Result<CpuId, kvm_ioctls::Error> {
    let keyed = cache.and_then(|path| Some((path, key()?)));
    if let Some(found) = keyed.as_ref().and_then(|(path, key)| read(path, key)) {
        return Ok(found);
    }
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    if let Some((path, key)) = keyed {
        if let Err(e) = write(path, &key, &cpuid) {
            log::debug!("cannot keep KVM's CPUID in {}: {e}", path.display());
        }
    }
    Ok(cpuid)
}

/// This boot's and this KVM's identity; `None` where either cannot be read.
fn key() -> Option<String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let kvm = std::fs::metadata("/dev/kvm").ok()?;
    Some(format!(
        "{} {} {}.{:09}",
        boot.trim(),
        kvm.ino(),
        kvm.ctime(),
        kvm.ctime_nsec()
    ))
}

/// The entries in `path` if its first line is `key` and every other line is one entry;
/// anything else (another boot, a torn or foreign file) is `None`.
fn read(path: &Path, key: &str) -> Option<CpuId> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    if lines.next()? != key {
        return None;
    }
    let entries = lines.map(parse_entry).collect::<Option<Vec<_>>>()?;
    if entries.is_empty() || entries.len() > KVM_MAX_CPUID_ENTRIES {
        return None;
    }
    CpuId::from_entries(&entries).ok()
}

/// `function index flags eax ebx ecx edx`, in hex.
fn parse_entry(line: &str) -> Option<kvm_cpuid_entry2> {
    let f = line
        .split(' ')
        .map(|w| u32::from_str_radix(w, 16).ok())
        .collect::<Option<Vec<u32>>>()?;
    let [function, index, flags, eax, ebx, ecx, edx] = f[..] else {
        return None;
    };
    Some(kvm_cpuid_entry2 {
        function,
        index,
        flags,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    })
}

/// Writes the file whole, then renames it into place, so no reader sees half of it.
fn write(path: &Path, key: &str, cpuid: &CpuId) -> std::io::Result<()> {
    let mut text = format!("{key}\n");
    for e in cpuid.as_slice() {
        let _ = writeln!(
            text,
            "{:x} {:x} {:x} {:x} {:x} {:x} {:x}",
            e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx
        );
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    fn entry(function: u32, eax: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index: 1,
            flags: 2,
            eax,
            ebx: 0xffff_ffff,
            ecx: 0,
            edx: 7,
            ..Default::default()
        }
    }

    #[test]
    fn entries_come_back_only_under_their_key() {
        let dir = TempDir::new_with_prefix("/tmp/kv-cpuid-").unwrap();
        let path = dir.as_path().join("cpuid");
        let cpuid = CpuId::from_entries(&[entry(0, 0xd), entry(0x8000_0001, 3)]).unwrap();
        write(&path, "boot 1 2.3", &cpuid).unwrap();
        let back = read(&path, "boot 1 2.3").expect("same key");
        assert_eq!(back.as_slice(), cpuid.as_slice());
        assert!(read(&path, "boot 1 2.4").is_none(), "KVM loaded again");
        assert!(read(&path, "other 1 2.3").is_none(), "another boot");
        let left: Vec<_> = std::fs::read_dir(dir.as_path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left");
    }

    #[test]
    fn a_torn_or_foreign_file_is_not_used() {
        let dir = TempDir::new_with_prefix("/tmp/kv-cpuid-").unwrap();
        let path = dir.as_path().join("cpuid");
        for bad in [
            "k\n",
            "k\n0 0 0 d 0 0\n",
            "k\n0 0 0 d 0 0 0 0\n",
            "k\nx 0 0 0 0 0 0\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(read(&path, "k").is_none(), "{bad:?}");
        }
        assert!(read(&dir.as_path().join("none"), "k").is_none());
    }

    /// Needs /dev/kvm, as every KVM test here.
    #[test]
    fn a_kept_answer_is_kvms_answer() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let dir = TempDir::new_with_prefix("/tmp/kv-cpuid-").unwrap();
        let path = dir.as_path().join("cpuid");
        let asked = supported_cpuid(&kvm, None).unwrap();
        let first = supported_cpuid(&kvm, Some(&path)).unwrap();
        assert!(path.exists(), "kept for the next VM");
        let kept = supported_cpuid(&kvm, Some(&path)).unwrap();
        assert_eq!(first.as_slice(), asked.as_slice());
        assert_eq!(kept.as_slice(), asked.as_slice());
        // What the file holds is what the next VM gets, without asking KVM.
        let mut marked = asked.clone();
        marked.as_mut_slice()[0].ebx ^= 1;
        write(&path, &key().unwrap(), &marked).unwrap();
        let read_back = supported_cpuid(&kvm, Some(&path)).unwrap();
        assert_eq!(read_back.as_slice(), marked.as_slice());
        let unwritable = dir.as_path().join("no/such/dir/cpuid");
        let without = supported_cpuid(&kvm, Some(&unwritable)).unwrap();
        assert_eq!(
            without.as_slice(),
            asked.as_slice(),
            "a cache that fails costs nothing"
        );
    }
}
