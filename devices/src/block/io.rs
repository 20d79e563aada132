//! The disk back end: file I/O runs with pread/pwrite straight between the file and guest
//! memory (no bounce buffer), on the I/O threads of [`super::pool`] or, for a request that
//! cannot stall anything, on the queue's own thread.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::request::{Op, Request, Segment, ID_LEN, SECTOR_SIZE};
use super::BlockError;

// linux/fs.h
vmm_sys_util::ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, u64);
vmm_sys_util::ioctl_io_nr!(BLKDISCARD, 0x12, 119);

/// Most iovecs per preadv/pwritev call (the kernel's UIO_MAXIOV is 1024).
const MAX_IOVECS: usize = 256;
/// Largest zero buffer written when the file system cannot zero a range itself.
const ZERO_CHUNK: u64 = 1 << 20;

/// An open disk: a regular file or a host block device.
#[derive(Debug)]
pub(crate) struct Disk {
    file: File,
    block_device: bool,
    /// Size in bytes, a multiple of 512.
    pub size: u64,
    /// The host's preferred I/O size for the file, in bytes.
    pub block_size: u64,
    /// A medium in a slot may be smaller than the slot: reads past its end are zeros.
    pub zero_past_end: bool,
    /// Reads may ask the page cache alone (RWF_NOWAIT); cleared the first time the file
    /// system refuses the flag.
    nowait_reads: AtomicBool,
}

impl Disk {
    /// Opens `path`; `read_only` opens it without write access, so even a request that
    /// slipped past parsing could not change it.
    pub fn open(path: &Path, read_only: bool) -> Result<Disk, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(BlockError::NotADisk {
                path: path.to_owned(),
                kind: "a directory",
            });
        }
        if !ft.is_file() && !ft.is_block_device() {
            return Err(BlockError::NotADisk {
                path: path.to_owned(),
                kind: "neither a regular file nor a block device",
            });
        }
        // Root may open a file without write bits for writing; a disk marked read-only on
        // the host is still refused, so a mistake in the config cannot change it.
        if !read_only && ft.is_file() && meta.permissions().readonly() {
            return Err(BlockError::ReadOnlyFile {
                path: path.to_owned(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let size = if ft.is_block_device() {
            block_device_size(&file).map_err(open_err)?
        } else {
            meta.len()
        };
        if size & (SECTOR_SIZE - 1) != 0 {
            return Err(BlockError::Size {
                path: path.to_owned(),
                size,
            });
        }
        Ok(Disk {
            file,
            block_device: ft.is_block_device(),
            size,
            block_size: meta.blksize().clamp(SECTOR_SIZE, 1 << 20),
            zero_past_end: false,
            nowait_reads: AtomicBool::new(true),
        })
    }
}

fn block_device_size(file: &File) -> io::Result<u64> {
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is a live, exclusive
    // reference for the duration of the call.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(file, BLKGETSIZE64(), &mut size) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// One request handed to an I/O thread, with the guest memory it refers to.
#[derive(Debug)]
pub(crate) struct Job {
    pub head: u16,
    pub req: Request,
    pub mem: GuestMemoryMmap,
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Done {
    pub head: u16,
    pub op: Op,
    /// Bytes written into device-writable buffers, status byte included.
    pub used_len: u32,
    /// Bytes moved between the disk and the guest (read or written data).
    pub bytes: u64,
    pub status: u8,
}

/// What the worker threads serve: one disk, or whatever medium a slot holds.
#[derive(Debug, Clone)]
pub(crate) enum DiskSource {
    Fixed(Arc<Disk>),
    Slot(super::media::MediaSlot),
}

impl DiskSource {
    pub(crate) fn current(&self) -> Option<Arc<Disk>> {
        match self {
            DiskSource::Fixed(d) => Some(d.clone()),
            DiskSource::Slot(s) => s.current(),
        }
    }
}

/// Runs one request and writes its status byte; `disk` is `None` for an empty slot, which
/// reads as zeros and refuses writes.
pub(crate) fn execute(disk: Option<&Disk>, id: &[u8; ID_LEN], job: Job) -> Done {
    let Job { head, req, mem } = job;
    let result = match (req.op, disk) {
        (Op::GetId, _) => write_id(&mem, &req.data, id),
        (Op::Read { .. }, None) => zero_fill(&mem, &req.data),
        (Op::Flush, None) => Ok(0),
        (_, None) => Err(io::Error::other("no medium in the slot")),
        (Op::Read { sector }, Some(disk)) => {
            transfer(disk, &mem, &req.data, sector * SECTOR_SIZE, Dir::Read)
        }
        (Op::Write { sector }, Some(disk)) => {
            transfer(disk, &mem, &req.data, sector * SECTOR_SIZE, Dir::Write)
        }
        (Op::Flush, Some(disk)) => disk.file.sync_data().map(|()| 0),
        (Op::Discard { sector, sectors }, Some(disk)) => discard(disk, sector, sectors).map(|()| 0),
        (
            Op::WriteZeroes {
                sector,
                sectors,
                unmap,
            },
            Some(disk),
        ) => write_zeroes(disk, sector, sectors, unmap).map(|()| 0),
    };
    finish(head, &req, &mem, result)
}

/// Serves a read on the caller's thread where the page cache holds all of its data
/// (RWF_NOWAIT never waits for the disk); gives the job back, for an I/O thread, where any
/// of it would have to wait, or where the file system cannot answer from the cache alone.
pub(crate) fn read_cached(disk: &Disk, job: Job) -> Result<Done, Job> {
    let Op::Read { sector } = job.req.op else {
        return Err(job);
    };
    if !disk.nowait_reads.load(Ordering::Relaxed) {
        return Err(job);
    }
    let offset = sector * SECTOR_SIZE;
    match transfer(disk, &job.mem, &job.req.data, offset, Dir::CachedRead) {
        Ok(n) => Ok(finish(job.head, &job.req, &job.mem, Ok(n))),
        Err(e) => {
            if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) {
                disk.nowait_reads.store(false, Ordering::Relaxed);
            }
            Err(job)
        }
    }
}

/// Answers `job` with an I/O error, doing nothing else.
pub(crate) fn refuse(job: Job) -> Done {
    let refused = Err(io::Error::other("the I/O thread is not set up"));
    finish(job.head, &job.req, &job.mem, refused)
}

/// Writes the status byte of a request that ended with `result` and describes it.
fn finish(head: u16, req: &Request, mem: &GuestMemoryMmap, result: io::Result<u64>) -> Done {
    let (status, bytes) = match result {
        Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
        Err(e) => {
            log::warn!("virtio-blk: {:?} failed: {e}", req.op);
            (VIRTIO_BLK_S_IOERR as u8, 0)
        }
    };
    // The address was checked when the request was parsed; memory never shrinks under it.
    if let Err(e) = mem.write_obj(status, req.status) {
        log::warn!("virtio-blk: cannot write the status byte: {e}");
    }
    let data_in = match req.op {
        Op::Read { .. } | Op::GetId => bytes,
        _ => 0,
    };
    Done {
        head,
        op: req.op,
        used_len: u32::try_from(data_in + 1).unwrap_or(u32::MAX),
        bytes,
        status,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Read,
    Write,
    /// A read from the page cache only: anything short of all of it is `WouldBlock`.
    CachedRead,
}

/// Moves the data of `segs` at byte `offset` of the disk, in batches of iovecs pointing
/// into guest memory; returns the bytes moved.
fn transfer(
    disk: &Disk,
    mem: &GuestMemoryMmap,
    segs: &[Segment],
    offset: u64,
    dir: Dir,
) -> io::Result<u64> {
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(MAX_IOVECS.min(segs.len() + 1));
    let mut guards = Vec::with_capacity(iovs.capacity());
    let mut pos = offset;
    let mut moved = 0;
    for s in segs {
        for slice in mem.get_slices(s.addr, s.len as usize) {
            let slice = slice.map_err(io::Error::other)?;
            // The guard keeps the mapping valid while the pointer is in use (a no-op for
            // plain mmap regions, which live as long as `mem`).
            let guard = slice.ptr_guard_mut();
            iovs.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: guard.len(),
            });
            guards.push(guard);
            if iovs.len() == MAX_IOVECS {
                let n = transfer_iovs(disk, &mut iovs, pos, dir)?;
                pos += n;
                moved += n;
                iovs.clear();
                guards.clear();
            }
        }
    }
    if !iovs.is_empty() {
        moved += transfer_iovs(disk, &mut iovs, pos, dir)?;
    }
    Ok(moved)
}

/// One preadv/pwritev of the whole batch, repeated over short transfers.
fn transfer_iovs(disk: &Disk, iovs: &mut [libc::iovec], offset: u64, dir: Dir) -> io::Result<u64> {
    let fd = disk.file.as_raw_fd();
    let mut first = 0;
    let mut done: u64 = 0;
    while first < iovs.len() {
        let rest = &iovs[first..];
        let off = libc::off_t::try_from(offset + done).map_err(io::Error::other)?;
        let n = match dir {
            // SAFETY: every iovec points into guest memory that `transfer` checked and
            // holds a guard for; the kernel writes at most `iov_len` bytes into each.
            Dir::Read => unsafe { libc::preadv(fd, rest.as_ptr(), rest.len() as i32, off) },
            // SAFETY: as above; the kernel only reads from the buffers.
            Dir::Write => unsafe { libc::pwritev(fd, rest.as_ptr(), rest.len() as i32, off) },
            // SAFETY: as for `Read`; the flag only makes the call fail instead of waiting.
            Dir::CachedRead => unsafe {
                let (iovs, count) = (rest.as_ptr(), rest.len() as i32);
                libc::preadv2(fd, iovs, count, off, libc::RWF_NOWAIT)
            },
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if dir == Dir::CachedRead && (n as usize) < rest.iter().map(|v| v.iov_len).sum() {
            // Part of it is not cached (or the end of the file is near): the I/O thread
            // reads it all again, the normal way.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if n == 0 {
            if disk.zero_past_end && matches!(dir, Dir::Read) {
                for iov in rest {
                    // SAFETY: each iovec points into checked, guarded guest memory of
                    // `iov_len` bytes (see `transfer`).
                    unsafe { std::ptr::write_bytes(iov.iov_base.cast::<u8>(), 0, iov.iov_len) };
                    done += iov.iov_len as u64;
                }
                return Ok(done);
            }
            // The file shrank under us.
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let mut n = n as usize;
        done += n as u64;
        while first < iovs.len() && n >= iovs[first].iov_len {
            n -= iovs[first].iov_len;
            first += 1;
        }
        if n > 0 {
            let iov = &mut iovs[first];
            // SAFETY: `n` is less than this iovec's length, so the pointer stays inside it.
            iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n).cast() };
            iov.iov_len -= n;
        }
    }
    Ok(done)
}

/// Zeroes the guest buffers of a read from an empty slot.
fn zero_fill(mem: &GuestMemoryMmap, segs: &[Segment]) -> io::Result<u64> {
    let zeroes = [0u8; 4096];
    let mut n = 0;
    for s in segs {
        let mut done = 0u64;
        while done < u64::from(s.len) {
            let len = (u64::from(s.len) - done).min(zeroes.len() as u64) as usize;
            mem.write_slice(&zeroes[..len], s.addr.unchecked_add(done))
                .map_err(io::Error::other)?;
            done += len as u64;
        }
        n += done;
    }
    Ok(n)
}

/// Writes the serial, NUL padded, into the first `ID_LEN` bytes of `segs`.
fn write_id(mem: &GuestMemoryMmap, segs: &[Segment], id: &[u8; ID_LEN]) -> io::Result<u64> {
    let mut written = 0;
    for s in segs {
        let n = (ID_LEN - written).min(s.len as usize);
        mem.write_slice(&id[written..written + n], s.addr)
            .map_err(io::Error::other)?;
        written += n;
        if written == ID_LEN {
            break;
        }
    }
    Ok(written as u64)
}

fn fallocate(disk: &Disk, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    let len = libc::off_t::try_from(len).map_err(io::Error::other)?;
    loop {
        // SAFETY: fallocate takes only integers; the descriptor is owned by `disk`.
        let ret = unsafe { libc::fallocate(disk.file.as_raw_fd(), mode, off, len) };
        if ret == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EINVAL | libc::ENOSYS)
    )
}

/// Deallocates a range. Discard is a hint: where the host cannot deallocate, the data
/// stays and the request still succeeds.
fn discard(disk: &Disk, sector: u64, sectors: u32) -> io::Result<()> {
    let (offset, len) = (sector * SECTOR_SIZE, u64::from(sectors) * SECTOR_SIZE);
    if len == 0 {
        return Ok(());
    }
    let result = if disk.block_device {
        let range = [offset, len];
        // SAFETY: BLKDISCARD reads two u64s (start, length) through the pointer, which
        // points at `range`, alive for the call.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&disk.file, BLKDISCARD(), &range) };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    } else {
        fallocate(
            disk,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    match result {
        Err(e) if unsupported(&e) => Ok(()),
        other => other,
    }
}

/// Zeroes a range: by deallocating it where the driver allows, else by asking the file
/// system (or block device) to zero it, else by writing zeroes.
fn write_zeroes(disk: &Disk, sector: u64, sectors: u32, unmap: bool) -> io::Result<()> {
    let (offset, len) = (sector * SECTOR_SIZE, u64::from(sectors) * SECTOR_SIZE);
    if len == 0 {
        return Ok(());
    }
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    if unmap {
        // Reads of a punched range return zeroes, on files and block devices alike.
        match fallocate(disk, libc::FALLOC_FL_PUNCH_HOLE | keep, offset, len) {
            Err(e) if unsupported(&e) => {}
            other => return other,
        }
    }
    match fallocate(disk, libc::FALLOC_FL_ZERO_RANGE | keep, offset, len) {
        Err(e) if unsupported(&e) => {}
        other => return other,
    }
    let zeroes = vec![0u8; ZERO_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        disk.file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::block::tests::TempDir;

    fn segs(start: u64, stride: u64, n: u64, len: u32) -> Vec<Segment> {
        (0..n)
            .map(|i| Segment {
                addr: GuestAddress(start + i * stride),
                len,
            })
            .collect()
    }

    #[test]
    fn transfers_span_iovec_batches_and_memory_regions() {
        let dir = TempDir::new();
        let path = dir.disk("disk.img", 1 << 20);
        let disk = Disk::open(&path, false).unwrap();
        // Two adjacent regions, so a buffer across 0x80000 maps to two host slices.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x8_0000),
            (GuestAddress(0x8_0000), 0x8_0000),
        ])
        .unwrap();
        // 600 buffers of 512 bytes 1 KiB apart: more than two preadv/pwritev batches.
        let out = segs(0, 1024, 600, 512);
        for (i, s) in out.iter().enumerate() {
            mem.write_slice(&[i as u8; 512], s.addr).unwrap();
        }
        assert_eq!(
            transfer(&disk, &mem, &out, 4096, Dir::Write).unwrap(),
            600 * 512
        );
        let file = std::fs::read(&path).unwrap();
        for i in 0..600 {
            let at = 4096 + i * 512;
            assert_eq!(&file[at..at + 512], &[i as u8; 512][..], "sector {i}");
        }

        let across = [Segment {
            addr: GuestAddress(0x7_ff00),
            len: 1024,
        }];
        assert_eq!(
            transfer(&disk, &mem, &across, 4096, Dir::Read).unwrap(),
            1024
        );
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(0x7_ff00)).unwrap();
        assert_eq!(back, file[4096..5120]);
    }

    #[test]
    fn a_file_that_shrank_is_an_error_not_a_hang() {
        let dir = TempDir::new();
        let path = dir.disk("disk.img", 8192);
        let disk = Disk::open(&path, false).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1024)
            .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let e = transfer(&disk, &mem, &segs(0, 0, 1, 4096), 0, Dir::Read).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
