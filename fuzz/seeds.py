#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/corpus/<target>/: a few valid requests per target, in
the input layouts that fuzz/src/script.rs and fuzz_targets/agent_messages.rs describe, so the
fuzzer starts from real traffic. Run it again after changing a layout: `python3 fuzz/seeds.py`.
"""

import os
import struct

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

NEXT, WRITE, INDIRECT = 1, 2, 4
BUF = 0x20000  # guest buffers start here (rings live below)


# --- script steps (fuzz/src/script.rs) ---------------------------------------------------
def desc(q, slot, addr, length, flags=0, nxt=0):
    return bytes([0, q, slot]) + struct.pack("<QIHH", addr, length, flags, nxt)


def avail(q, head):
    return bytes([1, q]) + struct.pack("<H", head)


def write(addr, data):
    out = b""
    for i in range(0, len(data), 255):
        chunk = data[i : i + 255]
        out += bytes([2]) + struct.pack("<IB", addr + i, len(chunk)) + chunk
    return out


def kick(q):
    return bytes([3, q])


BACKEND = bytes([4])


def host(arg):
    return bytes([5, arg])


def chain(q, first_slot, bufs):
    """Descriptors for one chain in consecutive slots, made available: [(addr, len, flags)]."""
    out = b""
    for i, (addr, length, flags) in enumerate(bufs):
        last = i + 1 == len(bufs)
        f = flags if last else flags | NEXT
        out += desc(q, first_slot + i, addr, length, f, (first_slot + i + 1) % 16)
    return out + avail(q, first_slot)


def save(target, name, config, *steps):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes([config]) + b"".join(steps))


# --- virtio-blk --------------------------------------------------------------------------
def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


HDR, SEG, DATA, STATUS = BUF, BUF + 0x100, BUF + 0x1000, BUF + 0x3000
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def blk_request(kind, sector, data=None, slot=0):
    """Header, optional data (readable bytes for a write, a writable length for a read) and
    status, at addresses of their own per slot."""
    off = slot * 0x8000
    steps = write(HDR + off, blk_header(kind, sector))
    bufs = [(HDR + off, 16, 0)]
    if isinstance(data, bytes):
        steps += write(DATA + off, data)
        bufs.append((DATA + off, len(data), 0))
    elif data:
        bufs.append((DATA + off, data, WRITE))
    bufs.append((STATUS + off, 1, WRITE))
    return steps + chain(0, slot, bufs)


def blk_range(kind, sector, sectors, flags):
    steps = write(HDR, blk_header(kind, sector)) + write(SEG, struct.pack("<QII", sector, sectors, flags))
    return steps + chain(0, 0, [(HDR, 16, 0), (SEG, 16, 0), (STATUS, 1, WRITE)])


def blk():
    t = "virtio_blk"
    save(t, "read", 0, blk_request(T_IN, 1, 1024), kick(0), BACKEND)
    save(t, "write_then_read", 2, blk_request(T_OUT, 2, bytes(range(256)) * 2), kick(0), BACKEND,
         blk_request(T_IN, 2, 512, slot=4), kick(0), BACKEND)
    save(t, "flush_and_get_id", 0x82, blk_request(T_FLUSH, 0), blk_request(T_GET_ID, 0, 20, slot=4),
         kick(0), BACKEND)
    save(t, "discard", 0, blk_range(T_DISCARD, 8, 16, 0), kick(0), BACKEND)
    save(t, "write_zeroes_unmap", 0, blk_range(T_WRITE_ZEROES, 0, 64, 1), kick(0), BACKEND)
    save(t, "read_only_write", 1, blk_request(T_OUT, 0, bytes(512)), kick(0), BACKEND)
    save(t, "media_slot", 4, host(0), blk_request(T_IN, 0, 4096), kick(0), BACKEND,
         host(1 + 3 * 4), blk_request(T_IN, 0, 4096, slot=4), kick(0), BACKEND)
    # A chain whose descriptor points back at itself.
    save(t, "loop", 0, write(HDR, blk_header(T_IN, 0)), desc(0, 0, HDR, 16, NEXT, 0), avail(0, 0),
         kick(0))


# --- virtio-net --------------------------------------------------------------------------
RX, TX = 0, 1


def frame(payload_len):
    vnet = bytes(12)
    eth = bytes([0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00])
    return vnet + eth + bytes(i & 0xFF for i in range(payload_len))


def net():
    t = "virtio_net_tx"
    f = frame(64)
    save(t, "one_frame", 0, write(BUF, f), chain(TX, 0, [(BUF, len(f), 0)]), kick(TX), host(0))
    save(t, "split_frame", 0x84, write(BUF, f),
         chain(TX, 0, [(BUF, 12, 0), (BUF + 12, len(f) - 12, 0)]), kick(TX), host(0))
    table = struct.pack("<QIHH", BUF, 12, NEXT, 1) + struct.pack("<QIHH", BUF + 12, len(f) - 12, 0, 0)
    save(t, "indirect", 0, write(BUF, f), write(BUF + 0x1000, table),
         desc(TX, 0, BUF + 0x1000, len(table), INDIRECT), avail(TX, 0), kick(TX), host(0))
    t = "virtio_net_rx"
    save(t, "one_buffer", 0, chain(RX, 0, [(BUF, 2048, WRITE)]), kick(RX), host(1), BACKEND)
    bufs = b"".join(chain(RX, i, [(BUF + i * 0x1000, 0x1000, WRITE)]) for i in range(4))
    save(t, "mergeable", 1 | 2 | 4 | 0x80, bufs, kick(RX), host(40), BACKEND, host(1), BACKEND)


# --- virtio-vsock ------------------------------------------------------------------------
GUEST_CID, HOST_CID, HOST_PORT, GUEST_PORT = 3, 2, 1024, 5000
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
EPHEMERAL_PORT = 1 << 30


def vsock_hdr(op, length=0, flags=0, src_port=GUEST_PORT, dst_port=HOST_PORT):
    return struct.pack("<QQIIIHHIII", GUEST_CID, HOST_CID, src_port, dst_port, length, 1, op,
                       flags, 1 << 20, 0)


def vsock_tx(slot, hdr, payload=b""):
    """Header (and payload) at a slot-specific address; header and payload in two descriptors."""
    at = 0x40000 + slot * 0x100
    steps = write(at, hdr)
    bufs = [(at, 44, 0)]
    if payload:
        steps += write(at + 0x80, payload)
        bufs.append((at + 0x80, len(payload), 0))
    return steps + chain(1, slot, bufs)


def rx_buffers(n):
    return b"".join(chain(0, i, [(BUF + i * 0x1000, 0x1000, WRITE)]) for i in range(n))


def vsock():
    t = "vsock_packet"
    save(t, "connect", 0, rx_buffers(4), kick(0), vsock_tx(0, vsock_hdr(OP_REQUEST)), kick(1),
         host(0), BACKEND)
    data = b"hello, host\n"
    save(t, "connect_send_shutdown", 0, rx_buffers(8), kick(0),
         vsock_tx(0, vsock_hdr(OP_REQUEST)), kick(1), host(0),
         vsock_tx(2, vsock_hdr(OP_RW, len(data)), data), vsock_tx(4, vsock_hdr(OP_CREDIT_REQUEST)),
         kick(1), host(5), BACKEND,
         vsock_tx(5, vsock_hdr(OP_SHUTDOWN, flags=3)), kick(1), host(3), BACKEND)
    save(t, "unknown_port_reset", 0, rx_buffers(2), kick(0),
         vsock_tx(0, vsock_hdr(OP_RW, dst_port=7)), vsock_tx(1, vsock_hdr(OP_RST, dst_port=7)),
         kick(1))
    # A host client connects to guest port 6 ("CONNECT 6"); the guest answers RESPONSE.
    save(t, "host_connect", 0, rx_buffers(4), kick(0), host(6), BACKEND, BACKEND,
         vsock_tx(0, vsock_hdr(OP_RESPONSE, src_port=6, dst_port=EPHEMERAL_PORT)), kick(1),
         vsock_tx(1, vsock_hdr(OP_RW, 4, src_port=6, dst_port=EPHEMERAL_PORT), b"ping"), kick(1),
         host(1 + 4 * 3), BACKEND)


# --- virtio-rng --------------------------------------------------------------------------
def rng():
    t = "virtio_rng"
    save(t, "one_buffer", 0, chain(0, 0, [(BUF, 64, WRITE)]), kick(0))
    save(t, "two_chains_event_idx", 0x80, chain(0, 0, [(BUF, 16, WRITE), (BUF + 0x100, 4096, WRITE)]),
         chain(0, 2, [(BUF + 0x2000, 100000, WRITE)]), kick(0))


# --- virtio-balloon ----------------------------------------------------------------------
def balloon():
    t = "virtio_balloon"
    # Queue 2 reports free ranges (device-writable, as Linux adds them); 0 inflates by PFN.
    save(t, "report_two_ranges", 0, write(BUF, b"\xa5" * 64),
         chain(2, 0, [(BUF, 0x4000, WRITE), (BUF + 0x8000, 0x2000, WRITE)]), kick(2))
    save(t, "inflate_pfns", 0x80, write(BUF, struct.pack("<II", 0x40, 0x41)),
         chain(0, 0, [(BUF, 8, 0)]), kick(0), chain(1, 0, [(BUF, 4, 0)]), kick(1))


# --- agent replies (fuzz_targets/agent_messages.rs) ----------------------------------------
def varint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def field(num, value):
    """A protobuf field: an int (varint) or bytes (length-delimited)."""
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    return varint(num << 3 | 2) + varint(len(value)) + value


def ttrpc_frame(payload, status=None):
    resp = (field(1, status) if status is not None else b"") + field(2, payload)
    return struct.pack(">IIBB", len(resp), 1, 2, 0) + resp


def agent():
    t = "agent_messages"
    replies = {
        0: field(1, b"0.1.0") + field(2, b"6.12.0") + field(3, 123456789),
        1: field(1, 42),
        3: field(1, 137) + field(2, 1700000000123456789),
        4: field(1, varint(1) + varint(42) + varint(4000000000)),
        5: b"".join(field(i, 1000 * i) for i in range(1, 10)),
        6: field(1, 5),
        7: field(1, b"some output\n"),
        8: field(1, b"c1"),
        9: b"",
    }
    for call, msg in replies.items():
        save(t, f"call{call}", call, ttrpc_frame(msg))
        save(t, f"bare{call}", 0x80 | call, msg)
    status = field(1, 5) + field(2, b"container c1 not found")
    save(t, "error_status", 1, ttrpc_frame(b"", status))


if __name__ == "__main__":
    blk()
    net()
    vsock()
    rng()
    balloon()
    agent()
