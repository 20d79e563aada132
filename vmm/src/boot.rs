//! Linux boot: kernel image (ELF `vmlinux` or bzImage), initrd, command line and the zero page
//! with its e820 map, following Documentation/arch/x86/boot.rst's 64-bit boot protocol.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::{self, BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::arch::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START,
};
use crate::arch::memory::ram_ranges;

/// Errors while loading the guest's kernel, initrd or boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage")]
    UnknownKernelFormat { path: PathBuf },
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        source: loader::Error,
    },
    #[error("bzImage {path} does not support the 64-bit boot protocol (XLF_KERNEL_64)")]
    Not64Bit { path: PathBuf },
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge { path: PathBuf, size: u64 },
    #[error("cannot read initrd {path} into guest memory")]
    ReadInitrd { path: PathBuf },
    #[error("invalid kernel command line {cmdline:?}: {reason}")]
    Cmdline { cmdline: String, reason: String },
    #[error("cannot write {0} into guest memory")]
    Write(&'static str),
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const XLF_KERNEL_64: u16 = 1;
/// Offset of the 64-bit entry point inside a bzImage's protected-mode part.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Initrds stay below 2 GiB, the most conservative `initrd_addr_max`.
const INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Guest address of the 64-bit entry point.
    pub entry: u64,
    /// First byte past the kernel image (including its bss).
    pub end: u64,
    /// The bzImage's setup header, to be copied into the zero page.
    pub setup_header: Option<setup_header>,
}

/// An initrd placed in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

/// Loads `path`, recognising ELF and bzImage by their magic numbers.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let open_err = |source| BootError::OpenKernel {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let mut head = [0u8; BZIMAGE_MAGIC_OFFSET + 4];
    let n = read_up_to(&mut file, &mut head).map_err(open_err)?;
    let load_err = |source| BootError::LoadKernel {
        path: path.to_owned(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    if n >= 4 && head[..4] == ELF_MAGIC {
        let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
        Ok(LoadedKernel {
            entry: r.kernel_load.raw_value(),
            end: r.kernel_end,
            setup_header: None,
        })
    } else if n == head.len() && head[BZIMAGE_MAGIC_OFFSET..] == BZIMAGE_MAGIC {
        let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
        let hdr = r
            .setup_header
            .ok_or_else(|| BootError::UnknownKernelFormat {
                path: path.to_owned(),
            })?;
        if hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::Not64Bit {
                path: path.to_owned(),
            });
        }
        Ok(LoadedKernel {
            entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
            end: r.kernel_end,
            setup_header: Some(hdr),
        })
    } else {
        Err(BootError::UnknownKernelFormat {
            path: path.to_owned(),
        })
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Places the initrd at the top of low RAM, page aligned, above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
) -> Result<LoadedInitrd, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenInitrd {
        path: path.to_owned(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::OpenInitrd {
            path: path.to_owned(),
            source,
        })?
        .len();
    let low_end = mem
        .last_addr()
        .raw_value()
        .saturating_add(1)
        .min(MMIO_GAP_START)
        .min(INITRD_ADDR_MAX + 1);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
    };
    let addr = low_end.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|_| BootError::ReadInitrd {
            path: path.to_owned(),
        })?;
    Ok(LoadedInitrd { addr, size })
}

/// Builds the command line: the user's arguments plus one `virtio_mmio.device=` per device
/// (given as (size, base, irq)), which must come before any `--` init arguments.
pub fn build_cmdline(user: &str, mmio_devices: &[(u64, u64, u32)]) -> Result<Cmdline, BootError> {
    let err = |e: linux_loader::cmdline::Error| BootError::Cmdline {
        cmdline: user.to_string(),
        reason: e.to_string(),
    };
    let mut cmdline = Cmdline::try_from(user, CMDLINE_MAX_SIZE).map_err(err)?;
    for &(size, base, irq) in mmio_devices {
        cmdline
            .add_virtio_mmio_device(size, GuestAddress(base), irq, None)
            .map_err(err)?;
    }
    Ok(cmdline)
}

/// The e820 map for a guest of `mem_size` bytes: low RAM, the reserved EBDA and BIOS area,
/// RAM from 1 MiB up to the MMIO hole, and RAM above 4 GiB for large guests.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (base, len) in ram_ranges(mem_size) {
        let start = base.raw_value().max(HIMEM_START);
        let end = base.raw_value() + len;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Writes the command line and the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<LoadedInitrd>,
) -> Result<(), BootError> {
    let cmdline_c = cmdline.as_cstring().map_err(|e| BootError::Cmdline {
        cmdline: String::new(),
        reason: e.to_string(),
    })?;
    let bytes = cmdline_c.as_bytes_with_nul();
    mem.write_slice(bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| BootError::Write("command line"))?;

    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = (bytes.len() - 1) as u32;
    if let Some(rd) = initrd {
        params.hdr.ramdisk_image = rd.addr as u32;
        params.hdr.ramdisk_size = rd.size as u32;
    }
    let map = e820_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::Write("e820 map (too many entries)"));
    }
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(&map) {
        (slot.addr, slot.size, slot.r#type) = (addr, size, kind);
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::Write("zero page"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::MMIO_GAP_END;

    fn mem(mib: u64) -> GuestMemoryMmap {
        crate::arch::memory::allocate(mib, false).unwrap()
    }

    #[test]
    fn e820_small_guest() {
        assert_eq!(
            e820_map(128 << 20),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x60400, E820_RESERVED),
                (0x10_0000, (128 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_large_guest_has_high_ram() {
        let m = e820_map(5 << 30);
        assert_eq!(m[2], (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM));
        assert_eq!(m[3], (MMIO_GAP_END, (5 << 30) - MMIO_GAP_START, E820_RAM));
    }

    #[test]
    fn cmdline_gets_devices_before_init_args() {
        let c = build_cmdline("console=ttyS0 -- hello", &[(0x1000, 0xd000_0000, 5)]).unwrap();
        let s = c.as_cstring().unwrap().into_string().unwrap();
        assert_eq!(
            s,
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 -- hello"
        );
    }

    #[test]
    fn cmdline_too_long_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            build_cmdline(&long, &[]),
            Err(BootError::Cmdline { .. })
        ));
    }

    #[test]
    fn zero_page_for_elf_kernel() {
        let m = mem(64);
        let k = LoadedKernel {
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
        };
        let c = build_cmdline("console=ttyS0", &[]).unwrap();
        let rd = LoadedInitrd {
            addr: 0x300_0000,
            size: 1234,
        };
        write_boot_params(&m, 64 << 20, &k, &c, Some(rd)).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 13);
        assert_eq!(
            ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
            (0x300_0000, 1234)
        );
        assert_eq!(p.e820_entries, 3);
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn unknown_kernel_format_named() {
        let dir = std::env::temp_dir().join(format!("vmm-boot-{}", std::process::id()));
        std::fs::write(&dir, b"not a kernel at all").unwrap();
        let err = load_kernel(&mem(32), &dir).unwrap_err();
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(err, BootError::UnknownKernelFormat { .. }));
        assert!(err.to_string().contains("neither an ELF"));
    }

    #[test]
    fn missing_kernel_named() {
        let err = load_kernel(&mem(32), Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn initrd_goes_to_top_of_low_memory() {
        let m = mem(32);
        let path = std::env::temp_dir().join(format!("vmm-initrd-{}", std::process::id()));
        std::fs::write(&path, vec![0xabu8; 5000]).unwrap();
        let rd = load_initrd(&m, &path, 0x100_0000).unwrap();
        assert_eq!(
            rd,
            LoadedInitrd {
                addr: ((32 << 20) - 5000) & !0xfff,
                size: 5000
            }
        );
        let b: u8 = m.read_obj(GuestAddress(rd.addr + 4999)).unwrap();
        assert_eq!(b, 0xab);
        let err = load_initrd(&m, &path, 32 << 20).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }));
    }
}
