//! The agent's port-forward service as `kubectl port-forward` reaches it through the shim:
//! WatchPorts, then one connection per forward on vsock port 1026.

use std::time::Duration;

use protocol::agent::*;
use tests::agent::*;

/// One connection through the agent's forward port to guest `port`: its answer line (without
/// the newline), then
/// (after OK) what the guest sent back for `request`, the host's side half-closed after it.
fn forward(vm: &GuestVm, port: &str, request: &[u8]) -> (String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = protocol::connect_stream(&vm.uds, protocol::FORWARD_PORT).expect("vsock connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("{port}\n").as_bytes()).unwrap();
    // No line (closed early, or no newline) shows as an empty answer.
    let answer = protocol::read_line(&s, 256).unwrap().unwrap_or_default();
    let mut back = Vec::new();
    if answer == "OK" {
        s.write_all(request).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.read_to_end(&mut back).unwrap();
    }
    (answer, back)
}

/// WatchPorts reports the guest's listeners; the forward port reaches them, passes a half
/// close on, and refuses what it cannot serve.
pub fn port_forward_reaches_the_guests_localhost(vm: &GuestVm) {
    let a = &vm.agent;
    let mut generation = 0;
    let ports = loop {
        let req = WatchPortsRequest {
            generation,
            ..Default::default()
        };
        let r = a.watch_ports(ctx(), &req).expect("WatchPorts");
        if r.ports.contains(&8080) && r.ports.contains(&9001) {
            break r.ports;
        }
        generation = r.generation;
    };
    println!("  guest ports on localhost: {ports:?}");
    let (answer, page) = forward(vm, "8080", b"GET /index.html HTTP/1.0\r\n\r\n");
    assert_eq!(answer, "OK");
    let page = String::from_utf8_lossy(&page);
    assert!(page.ends_with("\r\n\r\nserved-by-c1\n"), "{page:?}");
    // The count comes only after the guest heard the host's half close.
    let body = vec![b'x'; 300_000];
    let (answer, count) = forward(vm, "9001", &body);
    assert_eq!(answer, "OK");
    assert_eq!(String::from_utf8_lossy(&count).trim(), "300000");
    for (port, why) in [
        ("9999", "localhost:9999: IPv4: Connection refused"),
        ("0", "bad port"),
        ("http", "bad port"),
    ] {
        let (answer, _) = forward(vm, port, b"");
        assert!(
            answer.starts_with("ERR ") && answer.contains(why),
            "port {port}: {answer:?}"
        );
    }
}
