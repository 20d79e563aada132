//! virtio-balloon: arbitrary chains on the inflate, deflate and reporting queues (ranges
//! unaligned, outside guest memory, across its end, over the rings themselves) given back to
//! the host with madvise.

#![no_main]

use devices::balloon::Balloon;
use devices::virtio::VirtioDevice;
use kubevirt_fuzz::script::Script;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(script) = Script::parse(data) else {
        return;
    };
    let mut balloon = Balloon::new();
    balloon.ack_features(balloon.features());
    script.run(&mut balloon, 0, |_, _| {});
    balloon.reset();
});
