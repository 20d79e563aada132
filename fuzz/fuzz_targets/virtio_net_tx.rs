//! virtio-net transmit: arbitrary tx chains (device-writable buffers, memory outside the
//! guest, loops, runts, frames over the limit) gathered and written to the back end. `Host`
//! steps: even, the peer reads what waits (until then writes may block and stall the queue);
//! odd, the peer goes away.

#![no_main]

use devices::virtio::VirtioDevice;
use kubevirt_fuzz::host::drain;
use kubevirt_fuzz::net::device;
use kubevirt_fuzz::script::Script;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(script) = Script::parse(data) else {
        return;
    };
    let (mut net, peer) = device(script.config);
    let mut peer = Some(peer);
    script.run(&mut net, 0, |_, arg| match (arg % 2, &peer) {
        (0, Some(p)) => drain(p),
        _ => peer = None,
    });
    net.reset();
});
