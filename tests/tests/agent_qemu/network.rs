//! The pod sandbox through the agent on a real network: a tap in a network namespace the
//! test made, the guest's addresses, routes and DNS, copied files, the clock and a terminal.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use protocol::agent::*;
use tests::agent::*;
use tests::netns::NetNs;

use super::harness::*;

const GUEST_MAC: &str = "02:4b:56:00:00:02";

fn wait_for_tap(ns: &NetNs, tap: &str, vm: &GuestVm) {
    let t0 = Instant::now();
    while !Command::new("ip")
        .args(["-n", &ns.name, "link", "show", tap])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "tap {tap} never appeared; console:\n{}",
            vm.console()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sandbox_network_files_time_and_a_terminal() {
    let dir = TempDir::new("sandbox");
    let ns = NetNs::new("kvagent");
    let tap = format!("kva{}", std::process::id() % 100_000);
    let net = vec![
        "--net".to_string(),
        format!("tap={tap},mac={GUEST_MAC},netns={}", ns.path().display()),
    ];
    let vm = boot(&dir, standard_disks(&dir, 2), net);
    let a = &vm.agent;
    wait_for_tap(&ns, &tap, &vm);
    ns.exec(&["ip", "addr", "add", "10.202.0.1/24", "dev", &tap]);
    ns.exec(&["ip", "link", "set", &tap, "up"]);

    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    let setup = SetupSandboxRequest {
        hostname: "pod-a".into(),
        dns_servers: vec!["10.96.0.10".into()],
        dns_searches: vec!["default.svc.cluster.local".into()],
        dns_options: vec!["ndots:5".into()],
        host_time_unix_ns: now_ns,
        ..Default::default()
    };
    a.setup_sandbox(ctx(), &setup).unwrap();
    let iface = Interface {
        mac: GUEST_MAC.into(),
        name: "eth0".into(),
        mtu: 1400,
        addresses: vec![IpAddress {
            address: "10.202.0.2".into(),
            prefix_len: 24,
            ..Default::default()
        }],
        ..Default::default()
    };
    let route = Route {
        destination: "default".into(),
        gateway: "10.202.0.1".into(),
        device: "eth0".into(),
        ..Default::default()
    };
    let netreq = ConfigureNetworkRequest {
        interfaces: vec![iface],
        routes: vec![route],
        ..Default::default()
    };
    a.configure_network(ctx(), &netreq).unwrap();
    // The pod IP answers from the test's namespace.
    let t0 = Instant::now();
    while !Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "busybox",
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "10.202.0.2",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
    {
        if t0.elapsed() > Duration::from_secs(30) {
            create(
                a,
                "diag",
                "img",
                "s1",
                spec(
                    &[
                        "sh",
                        "-c",
                        "ip addr; ip route; cat /proc/net/dev /proc/interrupts",
                    ],
                    serde_json::json!({}),
                ),
            )
            .unwrap();
            let (out, err, _) = run_to_end(a, "diag");
            let host = Command::new("sh")
                .args([
                    "-c",
                    &format!(
                        "ip -n {0} -s link; ip -n {0} addr; ip -n {0} route",
                        ns.name
                    ),
                ])
                .output()
                .unwrap();
            panic!(
                "pod IP never answered; guest network:\n{out}{err}\nhost tap:\n{}\nconsole:\n{}",
                String::from_utf8_lossy(&host.stdout),
                vm.console()
            );
        }
        thread::sleep(Duration::from_millis(100));
    }

    let copy = |data: &str| {
        let req = CopyFileRequest {
            path: "cm/app.conf".into(),
            data: data.as_bytes().to_vec(),
            mode: 0o640,
            ..Default::default()
        };
        a.copy_file(ctx(), &req).unwrap();
    };
    copy("key=value1\n");
    let mounts = serde_json::json!({"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["newinstance", "ptmxmode=0666", "mode=0620"]},
        {"destination": "/etc/config", "type": "bind", "source": "/run/kubevirt/files/cm", "options": ["rbind", "ro"]},
        {"destination": "/etc/resolv.conf", "type": "bind", "source": "/run/kubevirt/sandbox/resolv.conf", "options": ["rbind", "ro"]}
    ]});
    let script = "hostname; cat /etc/config/app.conf; stat -c %a /etc/config/app.conf; cat /etc/resolv.conf; \
        ip -4 addr show eth0 | grep -o 'inet [0-9./]*'; ip link show eth0 | grep -o 'mtu [0-9]*'; ip route | grep default; date +%Y; sleep 1000";
    create(a, "app", "img", "s0", spec(&["sh", "-c", script], mounts)).unwrap();
    a.start_container(ctx(), &container("app")).unwrap();
    let year = Command::new("date").arg("+%Y").output().unwrap();
    let year = String::from_utf8_lossy(&year.stdout).trim().to_owned();
    let out = read_stdout_until(a, "app", &format!("\n{year}\n"));
    let want = format!(
        "pod-a\nkey=value1\n640\nnameserver 10.96.0.10\nsearch default.svc.cluster.local\noptions ndots:5\n\
         inet 10.202.0.2/24\nmtu 1400\ndefault via 10.202.0.1 dev eth0 \n{year}\n"
    );
    assert_eq!(out, want);

    // An updated file reaches the running container; a terminal exec sees its size.
    copy("key=value2\n");
    let mut tty = serde_json::from_slice::<serde_json::Value>(&process(&[
        "sh",
        "-c",
        "read go; cat /etc/config/app.conf; stty size; tty",
    ]))
    .unwrap();
    tty["terminal"] = serde_json::json!(true);
    let exec = ExecProcessRequest {
        container_id: "app".into(),
        exec_id: "tty".into(),
        process: serde_json::to_vec(&tty).unwrap(),
        stdin: true,
        ..Default::default()
    };
    a.exec_process(ctx(), &exec).unwrap();
    let resize = ResizeTtyRequest {
        container_id: "app".into(),
        exec_id: "tty".into(),
        rows: 40,
        cols: 100,
        ..Default::default()
    };
    a.resize_tty(ctx(), &resize).unwrap();
    let stdin = WriteStreamRequest {
        container_id: "app".into(),
        exec_id: "tty".into(),
        data: b"go\n".to_vec(),
        ..Default::default()
    };
    assert_eq!(a.write_stdin(ctx(), &stdin).unwrap().len, 3);
    let out = String::from_utf8_lossy(&read_all(a, "app", "tty", false)).replace('\r', "");
    assert!(out.contains("key=value2\n40 100\n/dev/pts/"), "{out:?}");
    assert_eq!(
        a.wait_process(ctx(), &proc_req("app", "tty"))
            .unwrap()
            .exit_status,
        0
    );
    vm.shutdown();
}
