//! Packet constants (virtio spec 1.2, 5.10.6) and the writer for packets the device sends.
//! Parsing and the header layout are rust-vmm's `virtio-vsock` crate.

use virtio_vsock::packet::VsockPacket;

/// Size of a packet header on the rings (44 bytes, little-endian).
pub use virtio_vsock::packet::PKT_HEADER_SIZE as HEADER_SIZE;

/// The host's CID: every packet the device sends comes from it.
pub const HOST_CID: u64 = 2;
/// VIRTIO_VSOCK_TYPE_STREAM, the only socket type served.
pub const TYPE_STREAM: u16 = 1;

/// Operations (`op` header field).
pub mod op {
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// OP_SHUTDOWN flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// OP_SHUTDOWN flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A packet in guest memory (`GuestMemoryMmap<()>` keeps no dirty bitmap).
pub type Packet<'a> = VsockPacket<'a, ()>;

/// The fields of a packet the device sends to the guest; CIDs and type are fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Host-side port.
    pub src_port: u32,
    /// Guest-side port.
    pub dst_port: u32,
    pub op: u16,
    pub flags: u32,
    /// Payload bytes already in the packet's data buffer.
    pub len: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Reply {
    /// An RST with no connection behind it (the guest spoke to nobody).
    pub fn rst(src_port: u32, dst_port: u32) -> Self {
        Self {
            src_port,
            dst_port,
            op: op::RST,
            flags: 0,
            len: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }
}

/// Writes the header of `pkt`, an rx buffer, from `reply`.
pub fn write_reply(pkt: &mut Packet<'_>, guest_cid: u64, reply: &Reply) {
    // The setters write one field each: clear the guest's stale bytes first. Both calls only
    // fail on a header slice shorter than HEADER_SIZE, which the crate never builds.
    let _ = pkt.set_header_from_raw(&[0u8; HEADER_SIZE]);
    pkt.set_src_cid(HOST_CID)
        .set_dst_cid(guest_cid)
        .set_src_port(reply.src_port)
        .set_dst_port(reply.dst_port)
        .set_type(TYPE_STREAM)
        .set_op(reply.op)
        .set_flags(reply.flags)
        .set_len(reply.len)
        .set_buf_alloc(reply.buf_alloc)
        .set_fwd_cnt(reply.fwd_cnt);
}

/// Operation name for logs.
pub fn op_name(op: u16) -> &'static str {
    match op {
        op::REQUEST => "REQUEST",
        op::RESPONSE => "RESPONSE",
        op::RST => "RST",
        op::SHUTDOWN => "SHUTDOWN",
        op::RW => "RW",
        op::CREDIT_UPDATE => "CREDIT_UPDATE",
        op::CREDIT_REQUEST => "CREDIT_REQUEST",
        _ => "unknown",
    }
}
