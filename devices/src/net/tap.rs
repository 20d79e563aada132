//! The tap back end: open or create a tap with a 12-byte virtio-net header inside a chosen
//! network namespace, and set the receive offloads the guest accepts.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::{NetBackend, NetError, VNET_HDR_LEN};

const TUN_PATH: &str = "/dev/net/tun";
/// A tap (Ethernet frames), no packet-info prefix, a virtio-net header on every frame.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// One open tap queue.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

fn netns_label(netns: Option<&Path>) -> String {
    match netns {
        Some(p) => format!("network namespace {}", p.display()),
        None => "the current network namespace".to_owned(),
    }
}

fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name array and a union of integers, addresses and a
    // pointer); all zeroes is a valid value of it.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr
}

fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Interface names are 1 to IFNAMSIZ-1 bytes, without '/', NUL or white space.
fn check_name(name: &str) -> Result<(), NetError> {
    let bad = |b: u8| b == 0 || b == b'/' || b.is_ascii_whitespace();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.bytes().any(bad) {
        return Err(NetError::TapName(name.to_owned()));
    }
    Ok(())
}

fn enter_netns(path: &Path) -> io::Result<()> {
    let ns = File::open(path)?;
    // SAFETY: setns only reads the descriptor; it moves the calling thread (a short-lived
    // helper) into the namespace.
    cvt(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })
}

fn set_vnet_hdr_len(fd: &OwnedFd) -> io::Result<()> {
    let len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from `len`, which lives for the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) })
}

/// Sets IFF_UP through a socket of the current thread's network namespace.
fn bring_up(name: &str) -> io::Result<()> {
    // SAFETY: plain socket creation; the result is checked before it is owned.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    cvt(s)?;
    // SAFETY: `s` is a fresh descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(s) };
    let mut ifr = ifreq(name);
    // SAFETY: SIOCGIFFLAGS writes into `ifr`, which lives for the call.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) })?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads `ifr`, which lives for the call.
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) })
}

/// Opens the tap in the current thread's network namespace.
fn open_here(name: &str, netns: &str) -> Result<Tap, NetError> {
    let err = |what: &'static str| {
        move |source| NetError::Tap {
            tap: name.to_owned(),
            netns: netns.to_owned(),
            what,
            source,
        }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(err("open /dev/net/tun"))?;
    let fd = OwnedFd::from(file);
    let mut ifr = ifreq(name);
    ifr.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes `ifr`, which lives for the call.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) })
        .map_err(err("create or attach it through /dev/net/tun (TUNSETIFF)"))?;
    set_vnet_hdr_len(&fd).map_err(err("set the vnet header size (TUNSETVNETHDRSZ)"))?;
    // The kernel fills in templates such as "tap%d".
    let name = ifreq_name(&ifr);
    bring_up(&name).map_err(err("bring it up"))?;
    Ok(Tap { fd, name })
}

impl Tap {
    /// Opens the tap `name`, creating it if absent, inside the network namespace at `netns`
    /// (`None`: the caller's), with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a 12-byte header,
    /// and brings it up. The namespace is entered on a short-lived helper thread, so the
    /// caller's thread keeps its own; the tap stays in the namespace it was created in.
    pub fn open(name: &str, netns: Option<&Path>) -> Result<Self, NetError> {
        check_name(name)?;
        let label = netns_label(netns);
        let Some(ns) = netns else {
            return open_here(name, &label);
        };
        let (ns, tap, label2) = (ns.to_path_buf(), name.to_owned(), label.clone());
        let helper = std::thread::Builder::new()
            .name("tap-netns".into())
            .spawn(move || {
                enter_netns(&ns).map_err(|source| NetError::EnterNetns {
                    tap: tap.clone(),
                    netns: label2.clone(),
                    source,
                })?;
                open_here(&tap, &label2)
            })
            .map_err(|source| NetError::HelperThread {
                tap: name.to_owned(),
                netns: label.clone(),
                source,
            })?;
        helper.join().map_err(|_| NetError::HelperPanicked {
            tap: name.to_owned(),
            netns: label,
        })?
    }

    /// Adopts an already open tap queue. It must have been set up with `IFF_TAP |
    /// IFF_NO_PI | IFF_VNET_HDR` (flags cannot change once a queue is attached); the header
    /// size is set to 12 here.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, NetError> {
        let label = format!("fd {}", fd.as_raw_fd());
        let err = |name: &str, what, source| NetError::Tap {
            tap: name.to_owned(),
            netns: "its network namespace".to_owned(),
            what,
            source,
        };
        let mut ifr = ifreq("");
        // SAFETY: TUNGETIFF writes into `ifr`, which lives for the call.
        cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut ifr) })
            .map_err(|e| err(&label, "read its tap flags (TUNGETIFF)", e))?;
        let name = ifreq_name(&ifr);
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = i32::from(unsafe { ifr.ifr_ifru.ifru_flags }) & 0xffff;
        if flags & TAP_FLAGS != TAP_FLAGS {
            return Err(NetError::NotVnetTap {
                tap: name,
                flags: flags as u32,
            });
        }
        set_vnet_hdr_len(&fd)
            .map_err(|e| err(&name, "set the vnet header size (TUNSETVNETHDRSZ)", e))?;
        Ok(Self { fd, name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Gives up the descriptor (to hand it over as [`super::TapSource::Fd`]).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl NetBackend for Tap {
    fn name(&self) -> &str {
        &self.name
    }

    fn set_offloads(&self, tun_flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        cvt(unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(tun_flags),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_net as vn;
    use virtio_queue::Queue;

    use super::*;
    use crate::net::{Net, NetConfig, TapSource, RX_QUEUE, TX_QUEUE};
    use crate::virtio::testing::{refs, Driver, QUEUE_SIZE, W};
    use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

    const GUEST_MAC: [u8; 6] = [0x02, 0x6b, 0x76, 0x00, 0x00, 0x02];

    fn ip(args: &[&str]) -> std::process::Output {
        Command::new("ip").args(args).output().expect("run ip")
    }

    fn ip_ok(args: &[&str]) {
        let out = ip(args);
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A network namespace of the test's own, deleted on drop (also when the test fails).
    struct Netns(String);

    impl Netns {
        fn new(name: String) -> Self {
            ip_ok(&["netns", "add", &name]);
            Self(name)
        }
        fn path(&self) -> PathBuf {
            PathBuf::from("/var/run/netns").join(&self.0)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = ip(&["netns", "del", &self.0]);
        }
    }

    /// The real tap test needs root, /dev/net/tun and iproute2.
    fn can_make_taps() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let ok = root && Path::new(TUN_PATH).exists() && ip(&["-V"]).status.success();
        if !ok {
            eprintln!("skipped: needs root, {TUN_PATH} and iproute2");
        }
        ok
    }

    fn thread_netns() -> PathBuf {
        std::fs::read_link("/proc/thread-self/ns/net").unwrap()
    }

    fn csum(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn eth(dst: [u8; 6], ethertype: u16) -> Vec<u8> {
        let mut f = vec![0u8; 12]; // virtio_net_hdr_v1: no offloads
        f.extend(dst);
        f.extend(GUEST_MAC);
        f.extend(ethertype.to_be_bytes());
        f
    }

    fn arp(op: u16, dst_mac: [u8; 6], sip: [u8; 4], tip: [u8; 4]) -> Vec<u8> {
        let mut f = eth(if op == 1 { [0xff; 6] } else { dst_mac }, 0x0806);
        f.extend([0, 1, 0x08, 0, 6, 4]);
        f.extend(op.to_be_bytes());
        f.extend(GUEST_MAC);
        f.extend(sip);
        f.extend(if op == 1 { [0; 6] } else { dst_mac });
        f.extend(tip);
        f
    }

    fn icmp_echo(dst_mac: [u8; 6], sip: [u8; 4], dip: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
        icmp.extend(payload);
        let c = csum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        let total = (20 + icmp.len()) as u16;
        let mut iph = vec![0x45, 0];
        iph.extend(total.to_be_bytes());
        iph.extend([0, 1, 0x40, 0, 64, 1, 0, 0]);
        iph.extend(sip);
        iph.extend(dip);
        let c = csum(&iph);
        iph[10..12].copy_from_slice(&c.to_be_bytes());
        let mut f = eth(dst_mac, 0x0800);
        f.extend(iph);
        f.extend(icmp);
        f
    }

    /// Guest side of the test: the device, the driver's queues, and rx buffers kept full.
    struct Guest {
        net: Net,
        d: Driver,
        qs: Vec<Queue>,
        rx_added: u64,
        rx_seen: usize,
        tx_added: u64,
    }

    const RX_BUF: u64 = 0x20000;
    const RX_BUF_LEN: u32 = 2048;
    const TX_BUF: u64 = 0x80000;

    impl Guest {
        fn add_rx(&mut self) {
            let slot = self.rx_added % u64::from(QUEUE_SIZE);
            let addr = RX_BUF + slot * u64::from(RX_BUF_LEN);
            self.d.add_chain(RX_QUEUE, &[(addr, RX_BUF_LEN, W)]);
            self.rx_added += 1;
        }

        fn send(&mut self, frame: &[u8]) {
            let slot = self.tx_added % u64::from(QUEUE_SIZE);
            let addr = TX_BUF + slot * 0x1000;
            self.d.write(addr, frame);
            self.d.add_chain(TX_QUEUE, &[(addr, frame.len() as u32, 0)]);
            self.tx_added += 1;
            let mut r = refs(&mut self.qs);
            self.net.process_queue(TX_QUEUE, &mut r, &self.d.mem);
            assert_eq!(self.d.used(TX_QUEUE).len() as u64, self.tx_added);
        }

        /// Runs the device's back end, as the event loop would, until `want` accepts a
        /// received frame (given without the virtio-net header) or time runs out.
        fn receive<T>(&mut self, mut want: impl FnMut(&[u8]) -> Option<T>) -> Option<T> {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                let mut p = libc::pollfd {
                    fd: self.net.backend_fd().unwrap(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: poll reads and writes one pollfd that lives for the call.
                if unsafe { libc::poll(&mut p, 1, 100) } != 1 {
                    continue;
                }
                let mut r = refs(&mut self.qs);
                self.net.process_backend(&mut r, &self.d.mem);
                let used = self.d.used(RX_QUEUE);
                for &(head, len) in &used[self.rx_seen..] {
                    let addr = RX_BUF + u64::from(head) * u64::from(RX_BUF_LEN);
                    let frame = self.d.read(addr, len as usize);
                    assert_eq!(&frame[10..12], &[1, 0], "num_buffers");
                    self.rx_seen += 1;
                    self.add_rx();
                    if let Some(t) = want(&frame[12..]) {
                        return Some(t);
                    }
                }
                let mut r = refs(&mut self.qs);
                self.net.process_queue(RX_QUEUE, &mut r, &self.d.mem);
            }
            None
        }
    }

    /// A tap in a namespace of the test's own: the guest's ARP request and ICMP echo request
    /// (tx queue) reach the kernel there, whose replies come back on the rx queue.
    #[test]
    fn tap_in_netns_answers_arp_and_ping() {
        if !can_make_taps() {
            return;
        }
        let pid = std::process::id();
        let ns = Netns::new(format!("kvtest-{pid}"));
        let x = (pid % 250) as u8;
        let (host_ip, guest_ip) = ([10, 200, x, 1], [10, 200, x, 2]);
        let host_addr = format!("10.200.{x}.1/24");

        let before = thread_netns();
        let config = NetConfig {
            tap: TapSource::Name {
                name: "kvtap0".into(),
                netns: Some(ns.path()),
            },
            mac: Some(GUEST_MAC),
            rx_rate: Default::default(),
            tx_rate: Default::default(),
        };
        let mut net = Net::new(config).unwrap();
        assert_eq!(
            thread_netns(),
            before,
            "the caller's thread keeps its namespace"
        );
        assert_eq!(net.backend_name(), "kvtap0");
        let link = ip(&["-n", &ns.0, "-o", "link", "show", "kvtap0"]);
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        assert!(link.contains(",UP"), "brought up: {link}");
        ip_ok(&["-n", &ns.0, "addr", "add", &host_addr, "dev", "kvtap0"]);
        ip_ok(&["-n", &ns.0, "link", "set", "kvtap0", "up"]);

        let bit = |b: u32| 1u64 << b;
        net.ack_features(
            VIRTIO_F_VERSION_1
                | VIRTIO_RING_F_EVENT_IDX
                | bit(vn::VIRTIO_NET_F_MAC)
                | bit(vn::VIRTIO_NET_F_MRG_RXBUF)
                | bit(vn::VIRTIO_NET_F_CSUM)
                | bit(vn::VIRTIO_NET_F_HOST_TSO4)
                | bit(vn::VIRTIO_NET_F_GUEST_CSUM)
                | bit(vn::VIRTIO_NET_F_GUEST_TSO4)
                | bit(vn::VIRTIO_NET_F_GUEST_TSO6),
        );
        net.activate().unwrap();
        let d = Driver::new(2);
        let qs = d.queues();
        let mut g = Guest {
            net,
            d,
            qs,
            rx_added: 0,
            rx_seen: 0,
            tx_added: 0,
        };
        for _ in 0..QUEUE_SIZE {
            g.add_rx();
        }

        g.send(&arp(1, [0; 6], guest_ip, host_ip));
        let host_mac = g
            .receive(|f| {
                let is_reply = f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2];
                (is_reply && f[28..32] == host_ip && f[38..42] == guest_ip && f[..6] == GUEST_MAC)
                    .then(|| <[u8; 6]>::try_from(&f[22..28]).unwrap())
            })
            .expect("an ARP reply from the namespace's kernel");

        let payload = b"kubevirt-shim virtio-net";
        g.send(&icmp_echo(host_mac, guest_ip, host_ip, payload));
        let mut asked = Vec::new();
        let reply = g.receive(|f| {
            if f[12..14] == [0x08, 0x06] && f[20..22] == [0, 1] && f[38..42] == guest_ip {
                asked.push(arp(2, host_mac, guest_ip, host_ip)); // the kernel asks for us
            }
            let ip4 = f.get(14..34)?;
            let icmp = f.get(34..)?;
            let is_reply = f[12..14] == [0x08, 0x00] && ip4[9] == 1 && icmp[0] == 0;
            (is_reply && ip4[12..16] == host_ip && ip4[16..20] == guest_ip)
                .then(|| (csum(ip4), csum(icmp), icmp[8..].to_vec()))
        });
        let reply = match reply {
            Some(r) => Some(r),
            None if !asked.is_empty() => {
                g.send(&asked[0]);
                g.receive(|f| {
                    let (ip4, icmp) = (f.get(14..34)?, f.get(34..)?);
                    (f[12..14] == [0x08, 0x00] && ip4[9] == 1 && icmp[0] == 0)
                        .then(|| (csum(ip4), csum(icmp), icmp[8..].to_vec()))
                })
            }
            None => None,
        };
        let (ip_sum, icmp_sum, echoed) = reply.expect("an ICMP echo reply");
        assert_eq!((ip_sum, icmp_sum), (0, 0), "checksums are complete");
        assert_eq!(echoed, payload);

        let s = g.net.stats();
        assert_eq!((s.tx_frames, s.tx_dropped), (g.tx_added, 0));
        assert!(s.rx_frames >= 2 && s.rx_dropped == 0, "{s:?}");
        drop(g);
    }

    /// An already open tap works as `TapSource::Fd`; anything else is refused.
    #[test]
    fn tap_from_fd() {
        let (r, _w) = {
            let mut fds = [0; 2];
            // SAFETY: pipe writes two descriptors into `fds`, which lives for the call.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: both descriptors are fresh and owned by nothing else.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        };
        let e = Net::new(NetConfig {
            tap: TapSource::Fd(r),
            mac: None,
            rx_rate: Default::default(),
            tx_rate: Default::default(),
        })
        .unwrap_err();
        assert!(e.to_string().contains("TUNGETIFF"), "{e}");

        if !can_make_taps() {
            return;
        }
        let ns = Netns::new(format!("kvtest-fd-{}", std::process::id()));
        let tap = Tap::open("kvtap1", Some(&ns.path())).unwrap();
        // The offload rule tun_offloads() relies on: no segmentation without checksums.
        let all = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
        tap.set_offloads(all).unwrap();
        assert!(tap.set_offloads(libc::TUN_F_TSO4).is_err());
        let net = Net::new(NetConfig {
            tap: TapSource::Fd(tap.into_fd()),
            mac: None,
            rx_rate: Default::default(),
            tx_rate: Default::default(),
        })
        .unwrap();
        assert_eq!(net.backend_name(), "kvtap1");
    }

    #[test]
    fn bad_names_and_namespaces_are_reported() {
        let e = Tap::open("a-name-longer-than-15", None).unwrap_err();
        assert!(matches!(e, NetError::TapName(_)), "{e}");
        assert!(Tap::open("", None).is_err());
        let missing = Path::new("/var/run/netns/kvtest-no-such-namespace");
        let e = Tap::open("kvtap9", Some(missing)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("kvtap9") && msg.contains("kvtest-no-such-namespace"),
            "{msg}"
        );
    }
}
