//! The shim's side of the agent protocol: what an agent (a guest program, so untrusted) sends
//! back. The shim is a binary with no library to call into, so this drives the code it runs
//! on every reply: `protocol::blocking::AgentClient` (ttrpc's async client), as
//! `connect_agent` builds it, against a fake agent that answers the first request with the
//! input's bytes (ttrpc frame header, `ttrpc.Response`, the response message) and closes.
//!
//! First byte: bits 0-6 pick the call (modulo the calls below); bit 7 set skips ttrpc and
//! decodes the rest as that call's response message directly. Every decoded message must
//! survive an encode/decode round trip unchanged.

#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use protocol::agent::*;
use protocol::blocking::AgentClient;
use protocol::protobuf::Message;
use protocol::ttrpc::{self, context};

/// ttrpc's frame header: length (big-endian u32), stream id, type, flags.
const FRAME_HEADER_LEN: usize = 10;
/// Calls whose replies the shim reads (each response type once, and one `Empty`).
const CALLS: u8 = 10;
/// Longest frame a reply may announce here. ttrpc refuses frames over 4 MiB and discards
/// them 4 KiB at a time, and at the end of the stream it goes on calling read() until the
/// whole announced length is "discarded": up to a million calls for 4 GiB, bounded but slow.
/// Twice the limit keeps the refusal covered and every input fast.
const MAX_ANNOUNCED: usize = 8 << 20;

/// Re-encodes `m` and checks it decodes to the same message.
fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = m.write_to_bytes().expect("a decoded message encodes");
    assert_eq!(&M::parse_from_bytes(&bytes).expect("re-decodes"), m);
}

fn decode<M: Message + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = M::parse_from_bytes(data) {
        round_trip(&m);
    }
}

/// Decodes `data` as the response message of call `call`.
fn decode_bare(call: u8, data: &[u8]) {
    match call {
        0 => decode::<PingResponse>(data),
        1 | 2 => decode::<StartResponse>(data),
        3 => decode::<WaitResponse>(data),
        4 => decode::<ListProcessesResponse>(data),
        5 => decode::<StatsResponse>(data),
        6 => decode::<WriteStreamResponse>(data),
        7 => decode::<ReadStreamResponse>(data),
        8 => decode::<OomEvent>(data),
        _ => decode::<Empty>(data),
    }
}

fn check<M: Message + PartialEq + std::fmt::Debug>(reply: ttrpc::Result<M>) {
    match reply {
        Ok(m) => round_trip(&m),
        // What the shim's `ShimError::agent` keeps of an agent's error.
        Err(ttrpc::Error::RpcStatus(s)) => drop(s.message().to_owned()),
        Err(e) => drop(e.to_string()),
    }
}

/// Makes call `call` on `client` as the shim does, with a deadline as a hang guard (well
/// under libFuzzer's -timeout).
fn call_agent(client: &AgentClient, call: u8) {
    let ctx = || context::with_timeout(Duration::from_secs(2).as_nanos() as i64);
    let c = ContainerRequest {
        container_id: "c1".into(),
        ..Default::default()
    };
    match call {
        0 => check(client.ping(ctx(), &PingRequest::new())),
        1 => check(client.start_container(ctx(), &c)),
        2 => check(client.exec_process(ctx(), &ExecProcessRequest::new())),
        3 => check(client.wait_process(ctx(), &ProcessRequest::new())),
        4 => check(client.list_processes(ctx(), &c)),
        5 => check(client.stats_container(ctx(), &c)),
        6 => check(client.write_stdin(ctx(), &WriteStreamRequest::new())),
        7 => check(client.read_stdout(ctx(), &ReadStreamRequest::new())),
        8 => check(client.get_oom_event(ctx(), &Empty::new())),
        _ => check(client.create_container(ctx(), &CreateContainerRequest::new())),
    }
}

/// Whether some frame header in `reply` announces more than `MAX_ANNOUNCED` bytes.
fn announces_too_much(reply: &[u8]) -> bool {
    let mut at = 0;
    while let Some(header) = reply.get(at..at + FRAME_HEADER_LEN) {
        let len = u32::from_be_bytes(header[..4].try_into().unwrap()) as usize;
        if len > MAX_ANNOUNCED {
            return true;
        }
        at += FRAME_HEADER_LEN + len;
    }
    false
}

/// The fake agent: takes one request frame, answers `reply`, hangs up.
fn answer(mut agent: UnixStream, reply: Vec<u8>) {
    let mut header = [0u8; FRAME_HEADER_LEN];
    if agent.read_exact(&mut header).is_err() {
        return;
    }
    let len = u32::from_be_bytes(header[..4].try_into().unwrap());
    let mut body = vec![0u8; len as usize];
    if agent.read_exact(&mut body).is_ok() {
        let _ = agent.write_all(&reply);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, reply)) = data.split_first() else {
        return;
    };
    let call = (first & 0x7f) % CALLS;
    if first & 0x80 != 0 {
        return decode_bare(call, reply);
    }
    if announces_too_much(reply) {
        return;
    }
    let (shim, agent) = UnixStream::pair().expect("socket pair");
    let reply = reply.to_vec();
    let fake = std::thread::spawn(move || answer(agent, reply));
    let client = AgentClient::new(shim).expect("ttrpc client");
    call_agent(&client, call);
    fake.join().expect("fake agent");
});
