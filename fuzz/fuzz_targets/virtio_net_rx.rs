//! virtio-net receive: frames from the back end copied into arbitrary rx chains (one or,
//! with MRG_RXBUF, several per frame; too small, read-only, looping or outside the guest).
//! `Host` steps: below 255, the peer sends a frame of `arg * 257` bytes (runts included)
//! that the next `Backend` step delivers; 255, the peer goes away.

#![no_main]

use std::sync::OnceLock;

use devices::virtio::VirtioDevice;
use kubevirt_fuzz::host::send;
use kubevirt_fuzz::net::device;
use kubevirt_fuzz::script::Script;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(script) = Script::parse(data) else {
        return;
    };
    let (mut net, peer) = device(script.config);
    let mut peer = Some(peer);
    static FRAME: OnceLock<Vec<u8>> = OnceLock::new();
    let frame = FRAME.get_or_init(|| (0..=u8::MAX).cycle().take(255 * 257).collect());
    script.run(&mut net, 0, |_, arg| match (arg, &peer) {
        (0..=254, Some(p)) => send(p, &frame[..usize::from(arg) * 257]),
        _ => peer = None,
    });
    net.reset();
});
