//! Credit, teardown, malformed packets and limits.

use super::*;

#[test]
fn device_sends_no_more_than_the_guest_credit() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect_with(600, 10);
    c.write_all(b"0123456789abcdefghijKLMNO").unwrap();
    // pump() also checks the backend fd goes quiet while the guest has no credit.
    h.pump();
    assert_eq!(h.take_data(local, 600), b"0123456789");
    h.pump();
    assert!(h.inbox.is_empty(), "{:?}", h.inbox);

    let mut upd = Hdr::guest(op::CREDIT_UPDATE, 600, local);
    upd.buf_alloc = 10;
    upd.fwd_cnt = 10;
    h.send(upd, &[]);
    h.pump();
    assert_eq!(h.take_data(local, 600), b"abcdefghij");

    // Credit carried by any packet counts too, here an RW toward the host.
    let mut rw = Hdr::guest(op::RW, 600, local);
    rw.buf_alloc = 10;
    rw.fwd_cnt = 20;
    h.send(rw, b"x");
    h.pump();
    assert_eq!(h.take_data(local, 600), b"KLMNO");
    let mut x = [0u8];
    c.read_exact(&mut x).unwrap();
    assert_eq!(&x, b"x");
}

#[test]
fn credit_request_gets_credit_update() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(601);
    h.send(Hdr::guest(op::RW, 601, local), &[7u8; 100]);
    let mut buf = [0u8; 100];
    c.read_exact(&mut buf).unwrap();
    h.send(Hdr::guest(op::CREDIT_REQUEST, 601, local), &[]);
    let upd = h.take_one(|x| x.op == op::CREDIT_UPDATE);
    assert_eq!((upd.hdr.buf_alloc, upd.hdr.fwd_cnt), (CONN_BUF_SIZE, 100));
}

#[test]
fn credit_updates_keep_a_streaming_guest_going() {
    // The guest sends 2 MiB respecting the device's credit, while the host reads slowly.
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(602);
    c.set_nonblocking(true).unwrap();
    let total = 2 << 20;
    let payload: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
    let (mut sent, mut fwd_cnt, mut got) = (0usize, 0u32, Vec::new());
    let mut buf = vec![0u8; 48 * 1024];
    let mut rounds = 0;
    while got.len() < total {
        rounds += 1;
        assert!(rounds < 10_000, "stalled at {} of {total}", got.len());
        let credit = CONN_BUF_SIZE as usize - (sent - fwd_cnt as usize);
        let n = credit.min(32 * 1024).min(total - sent);
        if n > 0 {
            h.send(Hdr::guest(op::RW, 602, local), &payload[sent..sent + n]);
            sent += n;
        }
        // The host takes a little at a time.
        match c.read(&mut buf) {
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        h.pump();
        for p in h.take(|x| x.src_port == local) {
            assert_eq!(p.hdr.op, op::CREDIT_UPDATE, "{p:?}");
            assert!(p.hdr.fwd_cnt >= fwd_cnt);
            fwd_cnt = p.hdr.fwd_cnt;
        }
        assert!(sent - fwd_cnt as usize <= CONN_BUF_SIZE as usize);
    }
    assert!(got == payload, "bytes arrive intact and in order");
}

#[test]
fn guest_overrunning_credit_is_reset_and_memory_stays_bounded() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(603);
    // The host never reads: the socket buffer fills, then the device's buffer, then the
    // guest (ignoring its credit) gets an RST instead of more host memory.
    let chunk = vec![1u8; MAX_PKT_DATA as usize];
    let mut sent = 0usize;
    loop {
        h.send(Hdr::guest(op::RW, 603, local), &chunk);
        sent += chunk.len();
        h.rx_ready();
        if !h.take(|x| x.op == op::RST).is_empty() {
            break;
        }
        assert!(sent < 64 << 20, "no reset after {sent} bytes");
    }
    // What was accepted fits in the socket buffer plus the device's bound.
    let mut buf = vec![0u8; 1 << 16];
    let mut read = 0;
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(read < sent);
    assert!(
        sent - read <= CONN_BUF_SIZE as usize + 2 * chunk.len(),
        "sent {sent}, read {read}"
    );
    h.pump();
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn guest_rst_closes_the_host_side() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(700);
    h.send(Hdr::guest(op::RST, 700, local), &[]);
    assert_closed(&mut c);
    h.pump();
    assert_eq!(h.dev.connections(), 0);
    assert!(h.inbox.is_empty(), "{:?}", h.inbox);
}

#[test]
fn guest_shutdown_closes_the_host_side_and_resets() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(701);
    let mut sd = Hdr::guest(op::SHUTDOWN, 701, local);
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    assert_closed(&mut c);
    h.pump();
    let rst = h.take_one(|x| x.op == op::RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (local, 701));
    assert_eq!(h.dev.connections(), 0);
    // Packets after the end get an RST of their own.
    h.send(Hdr::guest(op::RW, 701, local), b"late");
    h.take_one(|x| x.op == op::RST);
}

#[test]
fn host_close_sends_shutdown_then_rst() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(702);
    c.write_all(b"last words").unwrap();
    drop(c);
    h.pump();
    let ops: Vec<(u16, u32)> = h.inbox.iter().map(|p| (p.hdr.op, p.hdr.flags)).collect();
    assert_eq!(
        ops,
        [(op::RW, 0), (op::SHUTDOWN, SHUTDOWN_BOTH), (op::RST, 0)]
    );
    assert_eq!(h.take_data(local, 702), b"last words");
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn host_half_close_leaves_the_guest_direction_open() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(703);
    c.write_all(b"request").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    h.pump();
    let ops: Vec<(u16, u32)> = h.inbox.iter().map(|p| (p.hdr.op, p.hdr.flags)).collect();
    assert_eq!(ops, [(op::RW, 0), (op::SHUTDOWN, SHUTDOWN_SEND)]);
    h.inbox.clear();
    h.send(Hdr::guest(op::RW, 703, local), b"response");
    let mut buf = [0u8; 8];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"response");
    let mut sd = Hdr::guest(op::SHUTDOWN, 703, local);
    sd.flags = SHUTDOWN_BOTH;
    h.send(sd, &[]);
    assert_closed(&mut c);
    h.pump();
    h.take_one(|x| x.op == op::RST);
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn guest_half_close_shuts_the_host_write_side() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(704);
    h.send(Hdr::guest(op::RW, 704, local), b"all of it");
    let mut sd = Hdr::guest(op::SHUTDOWN, 704, local);
    sd.flags = SHUTDOWN_SEND;
    h.send(sd, &[]);
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"all of it");
    // The host can still answer.
    c.write_all(b"ack").unwrap();
    h.pump();
    assert_eq!(h.take_data(local, 704), b"ack");
    assert_eq!(h.dev.connections(), 1);
}

#[test]
fn packets_for_unknown_connections_get_rst() {
    let mut h = Harness::new();
    h.pump();
    h.send(Hdr::guest(op::RW, 6666, 5555), b"who?");
    let rst = h.take_one(|_| true);
    assert_eq!(rst.hdr.op, op::RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (5555, 6666));
    // An RST is never answered.
    h.send(Hdr::guest(op::RST, 6666, 5555), &[]);
    h.pump();
    assert!(h.inbox.is_empty());
}

#[test]
fn malformed_tx_packets_are_dropped() {
    let mut h = Harness::new();
    h.pump();
    let good = Hdr::guest(op::RW, 1, 2);
    let write = |h: &mut Harness, hdr: Hdr| {
        let a = h.hdr_addr();
        h.drv.write(a, &hdr.encode());
        a
    };
    // Header descriptor too short.
    let a = write(&mut h, good);
    h.add_tx(&[(a, 20, 0)]);
    // Length beyond the data descriptor.
    let a = write(&mut h, Hdr { len: 100, ..good });
    h.add_tx(&[(a, HDR as u32, 0), (TX_DATA, 10, 0)]);
    // Length beyond the single descriptor holding header and data.
    let a = write(&mut h, Hdr { len: 100, ..good });
    h.add_tx(&[(a, HDR as u32 + 10, 0)]);
    // Header out of guest memory; data out of guest memory.
    h.add_tx(&[(0x20_0000, HDR as u32, 0)]);
    let a = write(&mut h, Hdr { len: 16, ..good });
    h.add_tx(&[(a, HDR as u32, 0), (0xffff_fff0, 16, 0)]);
    // Device-writable header; payload larger than the device takes.
    let a = write(&mut h, good);
    h.add_tx(&[(a, HDR as u32, W)]);
    let a = write(
        &mut h,
        Hdr {
            len: MAX_PKT_DATA + 1,
            ..good
        },
    );
    h.add_tx(&[(a, HDR as u32, 0), (TX_DATA, MAX_PKT_DATA + 1, 0)]);
    // Wrong type, a spoofed source CID, a wrong destination CID.
    let a = write(&mut h, Hdr { type_: 2, ..good });
    h.add_tx(&[(a, HDR as u32, 0)]);
    let a = write(&mut h, Hdr { src_cid: 7, ..good });
    h.add_tx(&[(a, HDR as u32, 0)]);
    let a = write(&mut h, Hdr { dst_cid: 1, ..good });
    h.add_tx(&[(a, HDR as u32, 0)]);
    // A descriptor chain that loops, and one whose `next` is out of the table.
    let a = write(&mut h, Hdr { len: 8, ..good });
    let s = h.tx_desc_next;
    let next = (s + 1) % QUEUE_SIZE;
    h.add_tx_raw(&[desc(a, HDR as u32, N, next), desc(TX_DATA, 4, N, s)]);
    let a = write(&mut h, Hdr { len: 8, ..good });
    h.add_tx_raw(&[desc(a, HDR as u32, N, 200)]);

    let used = h.tx_used();
    assert_eq!(used.len(), 12, "every chain is returned");
    assert!(used.iter().all(|&(_, len)| len == 0));
    h.pump();
    assert!(h.inbox.is_empty(), "dropped, not answered: {:?}", h.inbox);

    // Still working.
    let (mut c, local) = h.host_connect(9);
    h.send(Hdr::guest(op::RW, 9, local), b"fine");
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"fine");
}

#[test]
fn fifty_connections_carry_their_own_bytes() {
    let mut h = Harness::new();
    let mut clients = Vec::new();
    for i in 0..50u32 {
        let port = 8000 + i % 5; // several connections per guest port
        let (c, local) = h.host_connect(port);
        clients.push((c, local, port));
    }
    assert_eq!(h.dev.connections(), 50);
    for (i, (c, _, _)) in clients.iter_mut().enumerate() {
        c.write_all(format!("from host client {i}").as_bytes())
            .unwrap();
    }
    h.pump();
    for (i, (_, local, port)) in clients.iter().enumerate() {
        let got = h.take_data(*local, *port);
        assert_eq!(got, format!("from host client {i}").as_bytes());
    }
    for (i, (_, local, port)) in clients.iter().enumerate() {
        h.send(
            Hdr::guest(op::RW, *port, *local),
            format!("to host client {i}").as_bytes(),
        );
    }
    for (i, (c, _, _)) in clients.iter_mut().enumerate() {
        let want = format!("to host client {i}");
        let mut buf = vec![0u8; want.len()];
        c.read_exact(&mut buf).unwrap();
        assert_eq!(buf, want.as_bytes());
    }
    drop(clients);
    h.pump();
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn connection_count_is_bounded() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(port_path(&h.uds(), 6000)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    for src in 0..MAX_CONNECTIONS as u32 + 4 {
        h.send(Hdr::guest(op::REQUEST, 10_000 + src, 6000), &[]);
        h.pump();
        while let Ok((s, _)) = listener.accept() {
            accepted.push(s);
        }
    }
    assert_eq!(h.take(|x| x.op == op::RESPONSE).len(), MAX_CONNECTIONS);
    assert_eq!(h.take(|x| x.op == op::RST).len(), 4);
    assert_eq!(h.dev.connections(), MAX_CONNECTIONS);
    // A host client waits in the backlog rather than being accepted.
    let mut c = client(&h.uds());
    c.write_all(b"CONNECT 1\n").unwrap();
    h.pump();
    assert!(h.inbox.is_empty());
    // One closes: the waiting client gets its turn.
    h.send(Hdr::guest(op::RST, 10_000, 6000), &[]);
    h.pump();
    h.take_one(|x| x.op == op::REQUEST && x.dst_port == 1);
}

#[test]
fn full_rst_queue_pauses_tx_until_rx_buffers_come() {
    let mut h = Harness::new();
    // No rx buffers: each packet for an unknown connection queues an RST.
    for i in 0..MAX_PENDING_RESETS as u32 + 1 {
        h.send(Hdr::guest(op::RW, 100 + i, 200), b"x");
    }
    assert_eq!(h.tx_used().len(), MAX_PENDING_RESETS, "the last one waits");
    // Rx buffers: RSTs flow and the waiting packet is taken.
    let used = h.rx_ready();
    assert_eq!(used, 0b11);
    assert_eq!(h.tx_used().len(), MAX_PENDING_RESETS + 1);
    for _ in 0..10 {
        h.rx_ready();
    }
    let rsts = h.take(|x| x.op == op::RST);
    assert_eq!(rsts.len(), MAX_PENDING_RESETS + 1);
    for (i, p) in rsts.iter().enumerate() {
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (200, 100 + i as u32));
    }
}

#[test]
fn two_descriptor_rx_buffers_work() {
    // The pre-6.2 Linux layout: header and data in separate descriptors.
    let mut h = Harness::new();
    h.collect_rx = false;
    let mut c = client(&h.uds());
    c.write_all(b"CONNECT 31\n").unwrap();
    h.call(|d, q, m| d.process_backend(q, m));
    h.call(|d, q, m| d.process_backend(q, m));
    h.drv
        .add_chain(0, &[(0x40000, HDR as u32, W), (0x41000, 4096, W)]);
    h.call(|d, q, m| d.process_queue(RX_QUEUE, q, m));
    let used = h.drv.used(0);
    assert_eq!(used, [(0, HDR as u32)]);
    let req = Hdr::decode(&h.drv.read(0x40000, HDR));
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 31));
    h.send(Hdr::guest(op::RESPONSE, 31, req.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}\n", req.src_port));
    c.write_all(b"split").unwrap();
    h.call(|d, q, m| d.process_backend(q, m));
    h.drv
        .add_chain(0, &[(0x40000, HDR as u32, W), (0x41000, 4096, W)]);
    h.call(|d, q, m| d.process_queue(RX_QUEUE, q, m));
    let used = h.drv.used(0);
    assert_eq!(used[1], (2, HDR as u32 + 5));
    assert_eq!(Hdr::decode(&h.drv.read(0x40000, HDR)).op, op::RW);
    assert_eq!(h.drv.read(0x41000, 5), b"split");
}

#[test]
fn reset_closes_every_connection() {
    let mut h = Harness::new();
    let (mut c1, _) = h.host_connect(1);
    let listener = UnixListener::bind(port_path(&h.uds(), 6001)).unwrap();
    h.send(Hdr::guest(op::REQUEST, 3000, 6001), &[]);
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h.dev.reset();
    assert_eq!(h.dev.connections(), 0);
    assert_closed(&mut c1);
    assert_closed(&mut s);
    // Clients wait for the next activation without waking the transport.
    let _c2 = client(&h.uds());
    assert!(!h.backend_ready());
}

/// `avail_event` of queue `q`: where the driver's next kick is due (EVENT_IDX).
fn avail_event(h: &Harness, q: u64) -> u16 {
    let used_ring = 0x1800 + q * 0x1000;
    let raw = h.drv.read(used_ring + 4 + 8 * QUEUE_SIZE as u64, 2);
    u16::from_le_bytes([raw[0], raw[1]])
}

#[test]
fn event_idx_is_rearmed_when_rings_run_dry() {
    let mut h = Harness::new();
    for q in &mut h.qs {
        q.set_event_idx(true);
    }
    let mut clients = Vec::new();
    for port in 40..43 {
        let mut c = client(&h.uds());
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        clients.push(c);
    }
    for _ in 0..3 {
        h.call(|d, q, m| d.process_backend(q, m));
    }
    // Three REQUESTs wait, two buffers come: the device asks for a kick at the third.
    h.post_rx_n(2);
    h.call(|d, q, m| d.process_queue(RX_QUEUE, q, m));
    assert_eq!(h.take(|x| x.op == op::REQUEST).len(), 2);
    assert_eq!(avail_event(&h, 0), 2);
    h.post_rx_n(1);
    h.call(|d, q, m| d.process_queue(RX_QUEUE, q, m));
    assert_eq!(h.take(|x| x.op == op::REQUEST).len(), 1);
    // The tx ring is drained and re-armed after every batch.
    h.send(Hdr::guest(op::RST, 1, 2), &[]);
    h.send(Hdr::guest(op::RST, 1, 2), &[]);
    assert_eq!(avail_event(&h, 1), 2);
}
