//! Identity, binding, and connections opened from either side.

use super::*;

#[test]
fn device_identity_and_config() {
    let h = Harness::inactive();
    assert_eq!(h.dev.device_type(), 19);
    assert_eq!(h.dev.queue_max_sizes().len(), 3);
    assert_eq!(
        h.dev.features() & crate::virtio::VIRTIO_F_VERSION_1,
        1 << 32
    );
    let mut cfg = [0u8; 8];
    h.dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), CID);
    let mut hi = [0u8; 4];
    h.dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
}

#[test]
fn reserved_cids_are_rejected() {
    let dir = TempDir::new();
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        let cfg = VsockConfig {
            guest_cid: cid,
            uds_path: dir.0.join("v.sock"),
        };
        assert!(matches!(Vsock::new(cfg), Err(VsockError::InvalidCid(c)) if c == cid));
    }
    assert!(!dir.0.join("v.sock").exists());
}

#[test]
fn bind_errors_name_the_path() {
    let dir = TempDir::new();
    let path = dir.0.join("missing-dir").join("v.sock");
    let err = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: path.clone(),
    })
    .unwrap_err();
    assert!(err.to_string().contains(path.to_str().unwrap()), "{err}");

    // A regular file is not a stale socket: refuse and leave it alone.
    let file = dir.0.join("file");
    std::fs::write(&file, b"keep").unwrap();
    let err = Vsock::new(VsockConfig {
        guest_cid: 3,
        uds_path: file.clone(),
    })
    .unwrap_err();
    assert!(matches!(err, VsockError::NotASocket { .. }), "{err}");
    assert!(err.to_string().contains(file.to_str().unwrap()));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep");
}

#[test]
fn stale_socket_is_replaced_and_socket_file_removed_on_drop() {
    let dir = TempDir::new();
    let path = dir.0.join("v.sock");
    drop(UnixListener::bind(&path).unwrap()); // leaves the file behind
    assert!(path.exists());
    let cfg = VsockConfig {
        guest_cid: 3,
        uds_path: path.clone(),
    };
    let dev = Vsock::new(cfg.clone()).unwrap();
    assert!(UnixStream::connect(&path).is_ok(), "listening");
    drop(dev);
    assert!(!path.exists(), "socket file removed on drop");
    // And a second device can take the path again.
    drop(Vsock::new(cfg).unwrap());
}

#[test]
fn nothing_is_accepted_before_activation() {
    let mut h = Harness::inactive();
    let mut c = client(&h.uds());
    c.write_all(b"CONNECT 5\n").unwrap();
    assert!(
        !h.backend_ready(),
        "inactive device must not wake the transport"
    );
    h.dev.activate().unwrap();
    h.pump();
    let req = h.take_one(|h| h.op == op::REQUEST);
    assert_eq!(req.hdr.dst_port, 5);
}

#[test]
fn host_connect_relays_both_ways() {
    let mut h = Harness::new();
    let (mut c, local) = h.host_connect(1234);

    c.write_all(b"hello from the host").unwrap();
    h.pump();
    let rw = h.take_one(|x| x.op == op::RW);
    assert_eq!((rw.hdr.src_port, rw.hdr.dst_port), (local, 1234));
    assert_eq!(rw.hdr.buf_alloc, CONN_BUF_SIZE);
    assert_eq!(rw.data, b"hello from the host");

    h.send(Hdr::guest(op::RW, 1234, local), b"hello from the guest");
    let mut buf = [0u8; 20];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"hello from the guest");
    h.pump();
    assert_eq!(h.dev.connections(), 1);
}

#[test]
fn bytes_right_after_the_connect_line_are_relayed() {
    let mut h = Harness::new();
    let mut c = client(&h.uds());
    c.write_all(b"CONNECT 77\nearly bytes").unwrap();
    h.pump();
    let req = h.take_one(|x| x.op == op::REQUEST);
    h.send(Hdr::guest(op::RESPONSE, 77, req.hdr.src_port), &[]);
    assert_eq!(read_line(&mut c), format!("OK {}\n", req.hdr.src_port));
    h.pump();
    assert_eq!(h.take_data(req.hdr.src_port, 77), b"early bytes");
}

#[test]
fn guest_refusal_closes_the_client() {
    let mut h = Harness::new();
    let mut c = client(&h.uds());
    c.write_all(b"CONNECT 99\n").unwrap();
    h.pump();
    let req = h.take_one(|x| x.op == op::REQUEST);
    // Nobody listens on guest port 99.
    h.send(Hdr::guest(op::RST, 99, req.hdr.src_port), &[]);
    assert_closed(&mut c);
    h.pump();
    assert_eq!(h.dev.connections(), 0);
    assert!(h.inbox.is_empty(), "no answer to an RST: {:?}", h.inbox);
}

#[test]
fn malformed_connect_lines_close_the_client() {
    let mut h = Harness::new();
    let long = format!("CONNECT {}", "1".repeat(40));
    let lines: [&[u8]; 6] = [
        b"HELLO 5\n",
        b"CONNECT x\n",
        b"CONNECT 1 2\n",
        b"CONNECT 99999999999\n",
        b"\xff\xfe\n",
        long.as_bytes(),
    ];
    let mut clients = Vec::new();
    for line in lines {
        let mut c = client(&h.uds());
        c.write_all(line).unwrap();
        clients.push(c);
    }
    h.pump();
    for c in &mut clients {
        assert_closed(c);
    }
    assert_eq!(h.dev.connections(), 0);
    assert!(h.inbox.is_empty(), "{:?}", h.inbox);
    // A client that closes half-way through its line is dropped too.
    let mut c = client(&h.uds());
    c.write_all(b"CONN").unwrap();
    h.pump();
    assert_eq!(h.dev.connections(), 1);
    drop(c);
    h.pump();
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn guest_connect_reaches_the_port_listener() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(port_path(&h.uds(), 5000)).unwrap();
    h.pump();
    h.send(Hdr::guest(op::REQUEST, 4000, 5000), &[]);
    let resp = h.take_one(|x| x.op == op::RESPONSE);
    assert_eq!((resp.hdr.src_port, resp.hdr.dst_port), (5000, 4000));
    assert_eq!(resp.hdr.buf_alloc, CONN_BUF_SIZE);

    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"ping").unwrap();
    h.pump();
    assert_eq!(h.take_data(5000, 4000), b"ping");
    h.send(Hdr::guest(op::RW, 4000, 5000), b"pong");
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mut h = Harness::new();
    h.pump();
    h.send(Hdr::guest(op::REQUEST, 4001, 5001), &[]);
    let rst = h.take_one(|x| x.op == op::RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (5001, 4001));
    assert_eq!(h.dev.connections(), 0);
    assert!(h.inbox.is_empty());
}
