//! Shared by the fuzz targets: a guest decoded from the fuzzer's bytes ([`script`]), played
//! against the real devices through the test-side queue driver of `devices`, and the host
//! resources the devices run on ([`host`]).

pub mod host;
pub mod net;
pub mod script;
