//! virtio-rng: arbitrary request chains (read-only, looping, outside the guest, larger than
//! a request may be) filled from the host's getrandom.

#![no_main]

use devices::rng::Rng;
use devices::virtio::VirtioDevice;
use kubevirt_fuzz::script::Script;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(script) = Script::parse(data) else {
        return;
    };
    let mut rng = Rng::new();
    rng.ack_features(rng.features());
    script.run(&mut rng, 0, |_, _| {});
    rng.reset();
});
