//! Parsing of virtio-blk requests (virtio 1.2, section 5.2.6): pure functions from a
//! descriptor chain to a checked [`Request`] or an answer, with no file I/O, so every
//! malformed shape a guest can send is unit-tested here.
//!
//! The guest is untrusted: every length, direction and address is checked before a request
//! reaches the worker, which may then rely on its buffers being in guest memory and its
//! sector range being inside the disk.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Bytes per virtio-blk sector, whatever the disk's own block size.
pub const SECTOR_SIZE: u64 = 512;
/// Length of `struct virtio_blk_outhdr` (type, reserved, sector).
pub const HEADER_LEN: usize = 16;
/// Length of one `struct virtio_blk_discard_write_zeroes` segment.
pub const RANGE_SEG_LEN: usize = 16;
/// Bytes of the GET_ID answer (`VIRTIO_BLK_ID_BYTES`).
pub const ID_LEN: usize = 20;
/// Most sectors in one discard or write-zeroes request (2 GiB), as offered in config space.
pub const MAX_RANGE_SECTORS: u32 = 1 << 22;
/// Longest chain accepted; far above the `seg_max` + 2 a driver may use, and it bounds
/// what one request may hold while it waits for the worker.
pub const MAX_CHAIN_LEN: usize = 1024;

/// One descriptor as the driver wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A piece of guest memory of a request, checked to lie in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// What a checked request asks of the disk. Sectors are 512-byte units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read {
        sector: u64,
    },
    Write {
        sector: u64,
    },
    Flush,
    GetId,
    Discard {
        sector: u64,
        sectors: u32,
    },
    WriteZeroes {
        sector: u64,
        sectors: u32,
        unmap: bool,
    },
}

/// A request that passed every check and goes to the worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    /// Data buffers: device-writable for `Read` and `GetId`, device-readable for `Write`,
    /// empty for the others.
    pub data: Vec<Segment>,
    /// Bytes in `data`; for `Read` and `Write` a multiple of [`SECTOR_SIZE`].
    pub len: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a chain was refused (for logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// The chain has no end: a loop, a `next` outside the table, an unreadable descriptor.
    Unterminated,
    TooManyDescriptors,
    /// The last descriptor is not device-writable or is empty.
    NoStatus,
    StatusOutOfMemory,
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable,
    BufferOutOfMemory,
    ShortHeader,
    /// Data in the direction the request type does not have.
    WrongDirection,
    Unaligned,
    OutOfRange,
    ReadOnly,
    BadRangeSegment,
    RangeTooLarge,
    UnknownFlags,
    Unsupported(u32),
}

/// The outcome of parsing one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    Io(Request),
    /// Answer at once with `status` at `at` (used length 1), without touching the disk.
    Reply {
        at: GuestAddress,
        status: u8,
        why: Invalid,
    },
    /// No status byte can be written: the chain goes back with used length 0.
    Drop(Invalid),
}

/// What parsing needs to know about the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
}

/// Reads a chain's descriptors; the flag says whether the chain ended properly (its last
/// descriptor has no NEXT flag), which the iterator alone does not tell: it stops quietly
/// on a loop or a bad `next`.
pub fn collect(chain: DescriptorChain<&GuestMemoryMmap>) -> (Vec<Desc>, bool) {
    let mut descs = Vec::new();
    let mut terminated = false;
    // One past the limit is enough for `parse` to refuse the chain.
    for d in chain.take(MAX_CHAIN_LEN + 1) {
        descs.push(Desc {
            addr: d.addr().0,
            len: d.len(),
            writable: d.is_write_only(),
        });
        terminated = !d.has_next();
    }
    (descs, terminated)
}

/// Checks a chain against the request format and the disk.
pub fn parse(descs: &[Desc], terminated: bool, mem: &GuestMemoryMmap, disk: &DiskInfo) -> Parsed {
    if descs.len() > MAX_CHAIN_LEN {
        return Parsed::Drop(Invalid::TooManyDescriptors);
    }
    if !terminated {
        return Parsed::Drop(Invalid::Unterminated);
    }
    // The status byte is the last byte of the last descriptor (no framing is assumed, so it
    // may share that descriptor with data).
    let Some(last) = descs.last().filter(|d| d.writable && d.len > 0) else {
        return Parsed::Drop(Invalid::NoStatus);
    };
    let at = match GuestAddress(last.addr).checked_add(u64::from(last.len) - 1) {
        Some(a) if mem.check_range(a, 1) => a,
        _ => return Parsed::Drop(Invalid::StatusOutOfMemory),
    };
    match parse_body(descs, mem, disk, at) {
        Ok(req) => Parsed::Io(req),
        Err((status, why)) => Parsed::Reply {
            at,
            status: status as u8,
            why,
        },
    }
}

type Refusal = (u32, Invalid);

fn ioerr(why: Invalid) -> Refusal {
    (VIRTIO_BLK_S_IOERR, why)
}

fn parse_body(
    descs: &[Desc],
    mem: &GuestMemoryMmap,
    disk: &DiskInfo,
    status: GuestAddress,
) -> Result<Request, Refusal> {
    let n_readable = descs.iter().take_while(|d| !d.writable).count();
    if descs[n_readable..].iter().any(|d| !d.writable) {
        return Err(ioerr(Invalid::ReadableAfterWritable));
    }
    for d in descs {
        if d.len > 0 && !mem.check_range(GuestAddress(d.addr), d.len as usize) {
            return Err(ioerr(Invalid::BufferOutOfMemory));
        }
    }
    let readable = segments(&descs[..n_readable]);
    let mut writable = segments(&descs[n_readable..]);
    trim_last_byte(&mut writable);

    let mut header = [0u8; HEADER_LEN];
    let rest = read_prefix(mem, &readable, &mut header).ok_or(ioerr(Invalid::ShortHeader))?;
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let in_len = total(&rest);
    let out_len = total(&writable);

    let (op, data, len) = match kind {
        VIRTIO_BLK_T_IN => {
            if in_len != 0 {
                return Err(ioerr(Invalid::WrongDirection));
            }
            check_data(sector, out_len, disk)?;
            (Op::Read { sector }, writable, out_len)
        }
        VIRTIO_BLK_T_OUT => {
            if out_len != 0 {
                return Err(ioerr(Invalid::WrongDirection));
            }
            if disk.read_only {
                return Err(ioerr(Invalid::ReadOnly));
            }
            check_data(sector, in_len, disk)?;
            (Op::Write { sector }, rest, in_len)
        }
        VIRTIO_BLK_T_FLUSH => (Op::Flush, Vec::new(), 0),
        VIRTIO_BLK_T_GET_ID => {
            if in_len != 0 {
                return Err(ioerr(Invalid::WrongDirection));
            }
            (Op::GetId, writable, out_len)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if out_len != 0 {
                return Err(ioerr(Invalid::WrongDirection));
            }
            (parse_range(kind, mem, &rest, in_len, disk)?, Vec::new(), 0)
        }
        other => return Err((VIRTIO_BLK_S_UNSUPP, Invalid::Unsupported(other))),
    };
    Ok(Request {
        op,
        data,
        len,
        status,
    })
}

/// Discard and write-zeroes carry exactly one (`max_*_seg` = 1) range segment.
fn parse_range(
    kind: u32,
    mem: &GuestMemoryMmap,
    rest: &[Segment],
    in_len: u64,
    disk: &DiskInfo,
) -> Result<Op, Refusal> {
    let mut seg = [0u8; RANGE_SEG_LEN];
    if in_len != RANGE_SEG_LEN as u64 || read_prefix(mem, rest, &mut seg).is_none() {
        return Err(ioerr(Invalid::BadRangeSegment));
    }
    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
    let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap());
    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    // The spec asks for UNSUPP on unknown flags, and on the unmap flag for a discard.
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (kind == VIRTIO_BLK_T_DISCARD && unmap) {
        return Err((VIRTIO_BLK_S_UNSUPP, Invalid::UnknownFlags));
    }
    if disk.read_only {
        return Err(ioerr(Invalid::ReadOnly));
    }
    if sectors > MAX_RANGE_SECTORS {
        return Err(ioerr(Invalid::RangeTooLarge));
    }
    check_range(sector, u64::from(sectors), disk)?;
    Ok(if kind == VIRTIO_BLK_T_DISCARD {
        Op::Discard { sector, sectors }
    } else {
        Op::WriteZeroes {
            sector,
            sectors,
            unmap,
        }
    })
}

fn check_data(sector: u64, len: u64, disk: &DiskInfo) -> Result<(), Refusal> {
    if len & (SECTOR_SIZE - 1) != 0 {
        return Err(ioerr(Invalid::Unaligned));
    }
    check_range(sector, len / SECTOR_SIZE, disk)
}

fn check_range(sector: u64, sectors: u64, disk: &DiskInfo) -> Result<(), Refusal> {
    match sector.checked_add(sectors) {
        Some(end) if end <= disk.capacity => Ok(()),
        _ => Err(ioerr(Invalid::OutOfRange)),
    }
}

fn segments(descs: &[Desc]) -> Vec<Segment> {
    descs
        .iter()
        .filter(|d| d.len > 0)
        .map(|d| Segment {
            addr: GuestAddress(d.addr),
            len: d.len,
        })
        .collect()
}

/// Takes the status byte off the end of the writable data.
fn trim_last_byte(segs: &mut Vec<Segment>) {
    if let Some(last) = segs.last_mut() {
        last.len -= 1;
        if last.len == 0 {
            segs.pop();
        }
    }
}

fn total(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Fills `buf` from the start of `segs` (a header may span descriptors); returns the
/// segments after it, or `None` when they hold fewer bytes than `buf`.
fn read_prefix(mem: &GuestMemoryMmap, segs: &[Segment], buf: &mut [u8]) -> Option<Vec<Segment>> {
    let mut filled = 0;
    let mut rest = Vec::new();
    for (i, s) in segs.iter().enumerate() {
        let take = (buf.len() - filled).min(s.len as usize);
        mem.read_slice(&mut buf[filled..filled + take], s.addr)
            .ok()?;
        filled += take;
        if filled == buf.len() {
            if take < s.len as usize {
                rest.push(Segment {
                    addr: s.addr.checked_add(take as u64)?,
                    len: s.len - take as u32,
                });
            }
            rest.extend_from_slice(&segs[i + 1..]);
            return Some(rest);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: DiskInfo = DiskInfo {
        capacity: 64,
        read_only: false,
    };

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: false,
        }
    }

    fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: true,
        }
    }

    fn seg(addr: u64, len: u32) -> Segment {
        Segment {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn reply(parsed: Parsed) -> (u32, Invalid) {
        match parsed {
            Parsed::Reply { status, why, .. } => (u32::from(status), why),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn read_request() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 3);
        let descs = [r(0x1000, 16), w(0x2000, 1024), w(0x3000, 1)];
        let p = parse(&descs, true, &m, &DISK);
        assert_eq!(
            p,
            Parsed::Io(Request {
                op: Op::Read { sector: 3 },
                data: vec![seg(0x2000, 1024)],
                len: 1024,
                status: GuestAddress(0x3000),
            })
        );
    }

    #[test]
    fn header_spanning_descriptors_and_status_sharing_data() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 1);
        // Header split 4 + 12 plus data in the same descriptor; status after 512 bytes.
        let descs = [r(0x1000, 4), r(0x1004, 12 + 512), w(0x3000, 1)];
        match parse(&descs, true, &m, &DISK) {
            Parsed::Io(req) => {
                assert_eq!(req.op, Op::Write { sector: 1 });
                assert_eq!(req.data, vec![seg(0x1010, 512)]);
            }
            other => panic!("{other:?}"),
        }
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let descs = [r(0x1000, 16), w(0x2000, 513)];
        match parse(&descs, true, &m, &DISK) {
            Parsed::Io(req) => {
                assert_eq!(req.data, vec![seg(0x2000, 512)]);
                assert_eq!(req.status, GuestAddress(0x2200));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn chains_without_status_are_dropped() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let cases: [(&[Desc], Invalid); 4] = [
            (&[], Invalid::NoStatus),
            (&[r(0x1000, 16)], Invalid::NoStatus),
            (&[r(0x1000, 16), w(0x2000, 0)], Invalid::NoStatus),
            (
                &[r(0x1000, 16), w(0x20_0000, 1)],
                Invalid::StatusOutOfMemory,
            ),
        ];
        for (descs, why) in cases {
            assert_eq!(parse(descs, true, &m, &DISK), Parsed::Drop(why));
        }
        let ok = [r(0x1000, 16), w(0x3000, 1)];
        assert_eq!(
            parse(&ok, false, &m, &DISK),
            Parsed::Drop(Invalid::Unterminated)
        );
        let long = vec![w(0x3000, 1); MAX_CHAIN_LEN + 1];
        assert_eq!(
            parse(&long, true, &m, &DISK),
            Parsed::Drop(Invalid::TooManyDescriptors)
        );
    }

    #[test]
    fn wrong_directions_are_io_errors() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let io = VIRTIO_BLK_S_IOERR;
        // Header device-writable: no readable header at all.
        let p = parse(&[w(0x1000, 16), w(0x3000, 1)], true, &m, &DISK);
        assert_eq!(reply(p), (io, Invalid::ShortHeader));
        // Readable after writable.
        let p = parse(
            &[r(0x1000, 16), w(0x2000, 512), r(0x2200, 512), w(0x3000, 1)],
            true,
            &m,
            &DISK,
        );
        assert_eq!(reply(p), (io, Invalid::ReadableAfterWritable));
        // A read with device-readable data.
        let p = parse(
            &[r(0x1000, 16), r(0x2000, 512), w(0x3000, 1)],
            true,
            &m,
            &DISK,
        );
        assert_eq!(reply(p), (io, Invalid::WrongDirection));
        // A write with device-writable data.
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let p = parse(
            &[r(0x1000, 16), w(0x2000, 512), w(0x3000, 1)],
            true,
            &m,
            &DISK,
        );
        assert_eq!(reply(p), (io, Invalid::WrongDirection));
        // Short header.
        let p = parse(&[r(0x1000, 8), w(0x3000, 1)], true, &m, &DISK);
        assert_eq!(reply(p), (io, Invalid::ShortHeader));
    }

    #[test]
    fn buffers_outside_guest_memory_are_io_errors() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        for bad in [
            w(0xff000, 0x2000),
            w(0x40_0000, 512),
            w(u64::MAX - 100, 512),
            w(0x2000, u32::MAX),
        ] {
            let p = parse(&[r(0x1000, 16), bad, w(0x3000, 1)], true, &m, &DISK);
            assert_eq!(reply(p), (VIRTIO_BLK_S_IOERR, Invalid::BufferOutOfMemory));
        }
        let p = parse(&[r(u64::MAX, 16), w(0x3000, 1)], true, &m, &DISK);
        assert_eq!(reply(p), (VIRTIO_BLK_S_IOERR, Invalid::BufferOutOfMemory));
    }

    #[test]
    fn sector_ranges_and_alignment() {
        let m = mem();
        let io = VIRTIO_BLK_S_IOERR;
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 63);
        let descs = [r(0x1000, 16), w(0x2000, 512), w(0x3000, 1)];
        assert!(matches!(parse(&descs, true, &m, &DISK), Parsed::Io(_)));
        let two = [r(0x1000, 16), w(0x2000, 1024), w(0x3000, 1)];
        assert_eq!(
            reply(parse(&two, true, &m, &DISK)),
            (io, Invalid::OutOfRange)
        );
        header(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX);
        assert_eq!(
            reply(parse(&descs, true, &m, &DISK)),
            (io, Invalid::OutOfRange)
        );
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let odd = [r(0x1000, 16), w(0x2000, 100), w(0x3000, 1)];
        assert_eq!(
            reply(parse(&odd, true, &m, &DISK)),
            (io, Invalid::Unaligned)
        );
    }

    #[test]
    fn read_only_refuses_writes_but_reads() {
        let m = mem();
        let ro = DiskInfo {
            capacity: 64,
            read_only: true,
        };
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        let descs = [r(0x1000, 16), r(0x2000, 512), w(0x3000, 1)];
        assert_eq!(
            reply(parse(&descs, true, &m, &ro)),
            (VIRTIO_BLK_S_IOERR, Invalid::ReadOnly)
        );
        for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            header(&m, 0x1000, kind, 0);
            m.write_slice(&[0u8; 16], GuestAddress(0x2000)).unwrap();
            let descs = [r(0x1000, 16), r(0x2000, 16), w(0x3000, 1)];
            assert_eq!(
                reply(parse(&descs, true, &m, &ro)),
                (VIRTIO_BLK_S_IOERR, Invalid::ReadOnly)
            );
        }
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let descs = [r(0x1000, 16), w(0x2000, 512), w(0x3000, 1)];
        assert!(matches!(parse(&descs, true, &m, &ro), Parsed::Io(_)));
    }

    fn range_seg(m: &GuestMemoryMmap, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&s, GuestAddress(0x2000)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        let descs = [r(0x1000, 16), r(0x2000, 16), w(0x3000, 1)];
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        range_seg(&m, 8, 16, 0);
        assert!(matches!(
            parse(&descs, true, &m, &DISK),
            Parsed::Io(Request {
                op: Op::Discard {
                    sector: 8,
                    sectors: 16
                },
                ..
            })
        ));
        range_seg(&m, 8, 16, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(
            reply(parse(&descs, true, &m, &DISK)),
            (VIRTIO_BLK_S_UNSUPP, Invalid::UnknownFlags)
        );
        header(&m, 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert!(matches!(
            parse(&descs, true, &m, &DISK),
            Parsed::Io(Request {
                op: Op::WriteZeroes {
                    sector: 8,
                    sectors: 16,
                    unmap: true
                },
                ..
            })
        ));
        range_seg(&m, 8, 16, 4);
        assert_eq!(
            reply(parse(&descs, true, &m, &DISK)),
            (VIRTIO_BLK_S_UNSUPP, Invalid::UnknownFlags)
        );
        range_seg(&m, 60, 16, 0);
        assert_eq!(
            reply(parse(&descs, true, &m, &DISK)),
            (VIRTIO_BLK_S_IOERR, Invalid::OutOfRange)
        );
        range_seg(&m, 0, MAX_RANGE_SECTORS + 1, 0);
        assert_eq!(
            reply(parse(&descs, true, &m, &DISK)),
            (VIRTIO_BLK_S_IOERR, Invalid::RangeTooLarge)
        );
        // Two segments (max_*_seg is 1) or a short one.
        for len in [32, 8] {
            let descs = [r(0x1000, 16), r(0x2000, len), w(0x3000, 1)];
            assert_eq!(
                reply(parse(&descs, true, &m, &DISK)),
                (VIRTIO_BLK_S_IOERR, Invalid::BadRangeSegment)
            );
        }
    }

    #[test]
    fn get_id_flush_and_unknown_types() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let descs = [r(0x1000, 16), w(0x2000, 20), w(0x3000, 1)];
        assert!(matches!(
            parse(&descs, true, &m, &DISK),
            Parsed::Io(Request {
                op: Op::GetId,
                len: 20,
                ..
            })
        ));
        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let descs = [r(0x1000, 16), w(0x3000, 1)];
        assert!(matches!(
            parse(&descs, true, &m, &DISK),
            Parsed::Io(Request {
                op: Op::Flush,
                len: 0,
                ..
            })
        ));
        header(&m, 0x1000, 99, 0);
        assert_eq!(
            reply(parse(&descs, true, &m, &DISK)),
            (VIRTIO_BLK_S_UNSUPP, Invalid::Unsupported(99))
        );
    }
}
