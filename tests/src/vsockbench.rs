//! Raw vsock throughput between host and guest: the device-test guest (`make guest`) runs
//! guest-kernel/vsock-test.c on `kubevirt-vmm run --machine auto`; the host streams `len`
//! bytes to it over the hybrid vsock socket, then it streams `len` bytes back.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::agent::guest_file;

const DOWN_PORT: u32 = 5000;
const UP_PORT: u32 = 5001;
const WAIT: Duration = Duration::from_secs(120);

/// (host -> guest, guest -> host) in MB/s for `len` bytes each way, in one VM.
pub fn vsock_rates(dir: &Path, len: usize) -> Result<(f64, f64), String> {
    let uds = dir.join("vsockbench.sock");
    let _ = std::fs::remove_file(&uds);
    let up_path = format!("{}_{UP_PORT}", uds.display());
    let _ = std::fs::remove_file(&up_path);
    let listener = UnixListener::bind(&up_path).map_err(|e| format!("bind {up_path}: {e}"))?;
    let script = format!(
        "vsock-test listen vsock {DOWN_PORT} 1 sink\nvsock-test connect vsock 2 {UP_PORT} {len} 21\n"
    );
    let cmdline = format!(
        "{} kvtest.cmd={}",
        vmm::GUEST_CMDLINE,
        base64::engine::general_purpose::STANDARD.encode(script)
    );
    let mut vm = Command::new(crate::vmm_binary())
        .args(["run", "--machine", "auto", "--memory", "256", "--kernel"])
        .arg(guest_file("vmlinux"))
        .arg("--initrd")
        .arg(guest_file("devtest-initramfs.img"))
        .args(["--cmdline", &cmdline])
        .args(["--vsock", &format!("cid=3,uds={}", uds.display())])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("start kubevirt-vmm: {e}"))?;
    let (lines_tx, lines) = mpsc::channel();
    let stdout = vm.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(l).is_err() {
                break;
            }
        }
    });
    let result = (|| {
        let listening = format!("vsock-test: listening vsock {DOWN_PORT}");
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.contains(&listening) => break,
                Ok(_) => {}
                Err(_) => return Err("the guest's vsock-test never listened".to_string()),
            }
        }
        let down = send_to_guest(&uds, len)?;
        let up = receive_from_guest(&listener, len)?;
        Ok((mb_per_s(len, down), mb_per_s(len, up)))
    })();
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = vm.kill();
    let _ = vm.wait();
    let _ = std::fs::remove_file(&up_path);
    result
}

fn mb_per_s(len: usize, t: Duration) -> f64 {
    len as f64 / 1e6 / t.as_secs_f64().max(1e-9)
}

/// Connects through the hybrid socket, streams `len` bytes and waits for the guest to close.
fn send_to_guest(uds: &Path, len: usize) -> Result<Duration, String> {
    let mut c = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
    c.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    c.write_all(format!("CONNECT {DOWN_PORT}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        match c.read(&mut b) {
            Ok(1) => reply.push(b[0]),
            _ => return Err("no answer to CONNECT".into()),
        }
    }
    if !reply.starts_with(b"OK ") {
        return Err(format!("CONNECT: {}", String::from_utf8_lossy(&reply)));
    }
    let chunk = vec![0x5au8; 256 << 10];
    let t = Instant::now();
    let mut sent = 0;
    while sent < len {
        let n = chunk.len().min(len - sent);
        c.write_all(&chunk[..n]).map_err(|e| format!("send: {e}"))?;
        sent += n;
    }
    c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    // The guest closes once it has read everything.
    let _ = c.read_to_end(&mut Vec::new());
    Ok(t.elapsed())
}

/// Accepts the guest's connection and reads `len` bytes to its end.
fn receive_from_guest(listener: &UnixListener, len: usize) -> Result<Duration, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + WAIT;
    let mut c = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("the guest never connected: {e}")),
        }
    };
    c.set_nonblocking(false).map_err(|e| e.to_string())?;
    c.set_read_timeout(Some(WAIT)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0;
    let t = Instant::now();
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(format!("receive: {e}")),
        }
    }
    if got != len {
        return Err(format!("received {got} of {len} bytes"));
    }
    Ok(t.elapsed())
}
